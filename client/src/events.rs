//! What the client tells the application: [`Events`], a stream of [`Notice`]s.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use imedge_protocol::session::Event;
use tokio::sync::mpsc;

use crate::{Error, Result};

/// One thing that happened: a session event (the Java SDK's callbacks) or a transport fact.
#[derive(Debug)]
#[non_exhaustive]
pub enum Notice {
    /// What the session reports: login results, messages, ACKs, losses, kickouts.
    Session(Event),
    /// A transport link is up and the login has been written on it: at [`crate::Client::connect`]
    /// and after every reconnection of an automatic re-login.
    Connected,
    /// A connection attempt of an automatic re-login failed; the session asks again one re-login
    /// interval later.
    ConnectFailed(Error),
    /// The link failed: read or write error, closed by the server, or input that is not a valid
    /// frame or message. Followed by what the session makes of it (usually
    /// [`Event::LinkLost`] and an automatic re-login).
    Disconnected(Error),
}

/// The receiving end of a client's notices. The stream ends when the client's task does: after a
/// logout, a kickout, a refused login, [`crate::Client::close`], or when the session can do
/// nothing more (a first login whose link failed).
///
/// The queue is bounded ([`crate::ClientOptions::event_capacity`]) and the client's task never
/// waits for the application (a stalled task would miss its keep-alives): while it is full,
/// received messages are left unacknowledged for their sender to resend (see
/// [`crate::DEFAULT_EVENT_CAPACITY`]). Keep reading, or drop `Events` to discard every notice.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::Receiver<Notice>,
}

impl Events {
    pub(crate) fn new(rx: mpsc::Receiver<Notice>) -> Self {
        Self { rx }
    }

    /// The next notice, transport notices included; `None` once the client's task has ended and
    /// every notice was read.
    pub async fn recv(&mut self) -> Option<Notice> {
        self.rx.recv().await
    }

    /// The next notice if one is already queued.
    pub fn try_recv(&mut self) -> Option<Notice> {
        self.rx.try_recv().ok()
    }

    /// The next session event, skipping transport notices; `None` at the end.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if let Notice::Session(event) = self.rx.recv().await? {
                return Some(event);
            }
        }
    }

    /// Waits up to `timeout` for a session event that satisfies `pred`; events before it are
    /// discarded.
    ///
    /// # Errors
    /// [`Error::Timeout`] when none came in time, [`Error::Closed`] when the stream ended first.
    pub async fn wait_for(
        &mut self,
        mut pred: impl FnMut(&Event) -> bool,
        timeout: Duration,
    ) -> Result<Event> {
        let wait = async {
            while let Some(event) = self.next().await {
                if pred(&event) {
                    return Ok(event);
                }
            }
            Err(Error::Closed)
        };
        tokio::time::timeout(timeout, wait)
            .await
            .map_err(|_| Error::Timeout)?
    }
}

impl Stream for Events {
    type Item = Notice;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Notice>> {
        self.rx.poll_recv(cx)
    }
}

//! The client's task: the I/O loop around one [`ClientSession`].
//!
//! ```text
//! loop {
//!     drive():  poll_output → write Transmit batches / Reconnect / Close
//!               poll_event  → Events
//!     select! {
//!         command from a Client handle → session.send / logout, or a raw write
//!         message body from the link   → decode → session.handle_message
//!         a reconnection completes     → session.handle_connected
//!         poll_timeout() is reached    → session.handle_timeout
//!         room in the event queue      → overflowed notices to Events
//!     }
//! }
//! ```
//!
//! Backpressure: the event queue is bounded. A received data message is handed to the session
//! only when the queue has room for the event it makes; otherwise it is dropped unread (a QoS one
//! unacknowledged, so its sender resends it). Other notices never wait: they go to a small
//! overflow queue drained as the application reads.
//!
//! The session decides everything (when to log in, send keep-alives, resend, give up on the link);
//! this loop only performs it. A link failure of any kind — read or write error, a frame or message
//! the codecs refuse, the server closing — drops the link and is reported to the session as
//! `handle_disconnected`, which answers with `LinkLost` and a re-login as the Java SDK does.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::future::{pending, Future};
use std::pin::Pin;
use std::time::Duration;

use bytes::BytesMut;
use imedge_protocol::session::{ClientSession, Output};
use imedge_protocol::{Decoder, Fingerprint, Kind, Message, UserId};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::link::{Link, Target};
use crate::{Error, Notice, Result, State, MAX_OVERFLOW_NOTICES};

/// What a [`crate::Client`] handle asks of the task. Every command that expects an answer gets it
/// once the task has acted on it (for writes: once the bytes were handed to the socket).
#[derive(Debug)]
pub(crate) enum Command {
    /// Application data through the session (QoS when `fp` is set).
    Send {
        to: UserId<'static>,
        text: Cow<'static, str>,
        fp: Option<Fingerprint<'static>>,
        typeu: i32,
        reply: oneshot::Sender<Result<()>>,
    },
    /// A message written as it is, bypassing the session (echo, tests, tools).
    Raw {
        msg: Message<'static>,
        reply: oneshot::Sender<Result<()>>,
    },
    /// Logout, then the task ends.
    Logout { reply: oneshot::Sender<()> },
    /// A snapshot of the session.
    State { reply: oneshot::Sender<State> },
    /// End the task now, without a logout.
    Close,
}

/// A connection attempt in progress (automatic re-login).
type Connecting = Pin<Box<dyn Future<Output = Result<Link>> + Send>>;

/// The task's state. One per client.
pub(crate) struct Driver {
    target: Target,
    session: ClientSession,
    link: Option<Link>,
    connecting: Option<Connecting>,
    decoder: Decoder,
    commands: mpsc::Receiver<Command>,
    notices: mpsc::Sender<Notice>,
    /// Notices that found the event queue full, in order; everything after them waits here too.
    overflow: VecDeque<Notice>,
    /// Received data messages dropped unread because the event queue was full.
    deferred_messages: u64,
    /// Most notices `overflow` holds (`ClientOptions::overflow_capacity`).
    overflow_capacity: usize,
    /// Notices dropped because `overflow` was full.
    dropped_notices: u64,
    /// A write that takes longer than the keep-alive timeout means the link is dead: the session
    /// would declare it lost for want of keep-alive responses anyway.
    write_timeout: Duration,
    /// Messages of the current output batch, written together.
    batch: Vec<Message<'static>>,
    /// The session asked to close, or the application did: the task ends.
    done: bool,
}

impl Driver {
    /// A task for `session` whose first link, `link`, is already up: the login is queued at once.
    pub(crate) fn new(
        target: Target,
        session: ClientSession,
        link: Link,
        commands: mpsc::Receiver<Command>,
        notices: mpsc::Sender<Notice>,
    ) -> Self {
        let write_timeout = session.config().keep_alive.timeout;
        let mut driver = Self {
            target,
            session,
            link: None,
            connecting: None,
            decoder: Decoder::new(),
            commands,
            notices,
            overflow: VecDeque::new(),
            deferred_messages: 0,
            overflow_capacity: MAX_OVERFLOW_NOTICES,
            dropped_notices: 0,
            write_timeout,
            batch: Vec::new(),
            done: false,
        };
        driver.link_up(link);
        driver
    }

    /// See `ClientOptions::overflow_capacity`.
    pub(crate) fn set_overflow_capacity(&mut self, capacity: usize) {
        self.overflow_capacity = capacity;
    }

    /// Runs until the session closes, the application closes, or nothing can happen any more.
    pub(crate) async fn run(mut self) {
        loop {
            self.drive().await;
            if self.done || self.stalled() {
                break;
            }
            let deadline = self.session.poll_timeout().map(Instant::from_std);
            tokio::select! {
                command = self.commands.recv() => self.command(command).await,
                body = recv(self.link.as_mut()) => self.received(body),
                link = connect(self.connecting.as_mut()) => self.connected(link),
                () = sleep(deadline) => self.session.handle_timeout(now()),
                open = room(&self.notices, !self.overflow.is_empty()) => self.drain_overflow(open),
            }
        }
        if let Some(link) = self.link.take() {
            link.close().await;
        }
        // The last notices (losses reported by a logout, the end of a session) still reach an
        // application that reads; one that dropped `Events` makes `send` fail at once.
        while let Some(notice) = self.overflow.pop_front() {
            if self.notices.send(notice).await.is_err() {
                break;
            }
        }
        tracing::debug!(user_id = %self.session.config().user_id, "client task ended");
    }

    /// Performs everything the session asked for and forwards its events, until it asks nothing
    /// more (a failed write is itself input that can produce more outputs).
    async fn drive(&mut self) {
        loop {
            let mut progressed = false;
            while let Some(output) = self.session.poll_output() {
                progressed = true;
                match output {
                    Output::Transmit(msg) => self.batch.push(msg),
                    Output::Reconnect => {
                        self.flush().await;
                        self.reconnect();
                    }
                    Output::Close => {
                        self.flush().await;
                        self.connecting = None;
                        if let Some(link) = self.link.take() {
                            link.close().await;
                        }
                        self.done = true;
                    }
                }
            }
            self.flush().await;
            while let Some(event) = self.session.poll_event() {
                progressed = true;
                self.notify(Notice::Session(event));
            }
            if !progressed {
                return;
            }
        }
    }

    /// Writes the pending batch on the link; a failure is a link failure.
    async fn flush(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let mut batch = std::mem::take(&mut self.batch);
        if let Some(link) = self.link.as_mut() {
            let error = match tokio::time::timeout(self.write_timeout, link.send(&batch)).await {
                Ok(Ok(())) => None,
                Ok(Err(error)) => Some(error),
                Err(_) => Some(Error::WriteTimeout),
            };
            if let Some(error) = error {
                self.link_failed(error);
            }
        } else {
            // The session never transmits without a link; raw writes check for one.
            tracing::debug!(count = batch.len(), "no link: messages dropped");
        }
        batch.clear();
        self.batch = batch;
    }

    /// Drops the current link, if any, and starts a new connection attempt, abandoning a previous
    /// one that has not completed (the SDK restarts its attempt at every re-login tick).
    fn reconnect(&mut self) {
        self.link = None;
        tracing::debug!(server = %self.target.server, "reconnecting");
        self.connecting = Some(Box::pin(Link::connect(self.target.clone())));
    }

    fn link_up(&mut self, link: Link) {
        self.link = Some(link);
        self.notify(Notice::Connected);
        self.session.handle_connected(now());
    }

    fn link_failed(&mut self, error: Error) {
        tracing::debug!(%error, "link failed");
        self.link = None;
        self.notify(Notice::Disconnected(error));
        self.session.handle_disconnected(now());
    }

    fn connected(&mut self, link: Result<Link>) {
        self.connecting = None;
        match link {
            Ok(link) => self.link_up(link),
            Err(error) => {
                tracing::debug!(%error, "reconnection failed");
                self.notify(Notice::ConnectFailed(error));
            }
        }
    }

    fn received(&mut self, body: Result<BytesMut>) {
        let mut body = match body {
            Ok(body) => body,
            Err(error) => return self.link_failed(error),
        };
        match self.decoder.decode(&mut body[..]) {
            Ok(msg) if msg.kind == Kind::CommonData && !self.has_room() => {
                // Not taken: no ACK, no de-duplication entry. The sender resends a QoS message
                // later; one without QoS is lost, as on a lossy link.
                self.deferred_messages += 1;
                tracing::debug!(qos = msg.qos, "event queue full: message left unread");
            }
            Ok(msg) => self.session.handle_message(now(), &msg),
            // Not a message: the reference closes such a session (SPEC §2.2); so do we, and the
            // session re-logs in on a fresh link.
            Err(error) => self.link_failed(Error::Decode(error)),
        }
    }

    async fn command(&mut self, command: Option<Command>) {
        let Some(command) = command else {
            // Every handle is gone: nobody can send or log out any more, so log out now.
            self.session.logout(now());
            return;
        };
        match command {
            Command::Send {
                to,
                text,
                fp,
                typeu,
                reply,
            } => {
                let result = self.session.send(now(), to, text, fp, typeu);
                self.drive().await;
                let _ = reply.send(result.map_err(Error::from));
            }
            Command::Raw { msg, reply } => {
                let result = if self.link.is_some() {
                    self.batch.push(msg);
                    self.drive().await;
                    Ok(())
                } else {
                    Err(Error::NotConnected)
                };
                let _ = reply.send(result);
            }
            Command::Logout { reply } => {
                self.session.logout(now());
                self.drive().await;
                let _ = reply.send(());
            }
            Command::State { reply } => {
                let _ = reply.send(State {
                    connected: self.link.is_some(),
                    logged_in: self.session.is_logged_in(),
                    first_login_time: self.session.first_login_time(),
                    pending_qos: self.session.pending_qos(),
                    deferred_messages: self.deferred_messages,
                    dropped_notices: self.dropped_notices,
                });
            }
            Command::Close => self.done = true,
        }
    }

    /// No link, no attempt under way, no timer: the session can never act again.
    fn stalled(&self) -> bool {
        self.link.is_none() && self.connecting.is_none() && self.session.poll_timeout().is_none()
    }

    /// Moves overflowed notices to the event queue while it has room; `open` is false when the
    /// application dropped its `Events`, and nobody will read them.
    fn drain_overflow(&mut self, open: bool) {
        if !open {
            self.overflow.clear();
            return;
        }
        while let Some(notice) = self.overflow.pop_front() {
            if let Err(error) = self.notices.try_send(notice) {
                if let mpsc::error::TrySendError::Full(notice) = error {
                    self.overflow.push_front(notice);
                }
                return;
            }
        }
    }

    /// Whether the event queue can take one more notice now. Always true when the application
    /// dropped its `Events` (messages are then taken and ACKed, and their events discarded).
    fn has_room(&self) -> bool {
        self.notices.is_closed() || (self.overflow.is_empty() && self.notices.capacity() > 0)
    }

    fn notify(&mut self, notice: Notice) {
        if self.overflow.is_empty() {
            match self.notices.try_send(notice) {
                // Nobody listening is fine: the application dropped its `Events`.
                Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
                Err(mpsc::error::TrySendError::Full(notice)) => self.overflow.push_back(notice),
            }
        } else if self.overflow.len() < self.overflow_capacity {
            self.overflow.push_back(notice);
        } else {
            self.dropped_notices += 1;
            tracing::debug!(?notice, "event queue and overflow full: notice dropped");
        }
    }
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("target", &self.target)
            .field("session", &self.session)
            .field("link", &self.link)
            .field("connecting", &self.connecting.is_some())
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

/// The session's clock: tokio's, so that a paused test runtime drives it too.
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

async fn recv(link: Option<&mut Link>) -> Result<BytesMut> {
    match link {
        Some(link) => link.recv().await,
        None => pending().await,
    }
}

async fn connect(connecting: Option<&mut Connecting>) -> Result<Link> {
    match connecting {
        Some(connecting) => connecting.await,
        None => pending().await,
    }
}

/// Once `wanted`, waits until the event queue has room (true) or the application dropped its
/// `Events` (false). The slot is not kept: this task is the only sender, so it stays free.
async fn room(notices: &mpsc::Sender<Notice>, wanted: bool) -> bool {
    if wanted {
        notices.reserve().await.is_ok()
    } else {
        pending().await
    }
}

async fn sleep(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => pending().await,
    }
}

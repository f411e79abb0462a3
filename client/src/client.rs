//! The application's handle: [`Client`].

use std::borrow::Cow;

use imedge_protocol::message::UNSET;
use imedge_protocol::session::{ClientSession, Event};
use imedge_protocol::{Fingerprint, Kind, Message, UserId};
use tokio::sync::{mpsc, oneshot};

use crate::driver::{Command, Driver};
use crate::link::{Link, Target};
use crate::{ClientOptions, Error, Events, Result};

/// A handle to one logged-in (or logging-in) client. Cheap to clone; every clone talks to the
/// same task. Dropping the last one logs out.
#[derive(Debug, Clone)]
pub struct Client {
    commands: mpsc::Sender<Command>,
    user_id: UserId<'static>,
}

/// A snapshot of a client's session, from [`Client::state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    /// A transport link is up.
    pub connected: bool,
    /// The server accepted the login on the current link.
    pub logged_in: bool,
    /// `firstLoginTime` of the first successful login, which automatic re-logins send back.
    pub first_login_time: Option<i64>,
    /// Sent QoS messages awaiting an ACK.
    pub pending_qos: usize,
    /// Received data messages not taken because the event queue was full (QoS ones were not
    /// ACKed, so their senders resend them). See [`crate::DEFAULT_EVENT_CAPACITY`].
    pub deferred_messages: u64,
    /// Other notices dropped because the event queue and its overflow were full (see
    /// [`crate::MAX_OVERFLOW_NOTICES`]).
    pub dropped_notices: u64,
}

impl Client {
    /// Opens the transport link to `options.server` and starts the client's task, which sends the
    /// login at once. Returns as soon as the link is up: the outcome of the login arrives on
    /// [`Events`] ([`Event::LoginOk`] or [`Event::LoginFailed`]); [`Client::login`] waits for it.
    ///
    /// Must be called within a tokio runtime (the task is spawned on it).
    ///
    /// # Errors
    /// [`Error::Options`] for a sense mode the transport lacks; [`Error::Connect`],
    /// [`Error::Handshake`] or [`Error::Timeout`] when the first link cannot be opened within
    /// `options.connect_timeout`. Later link failures are handled by automatic re-login.
    pub async fn connect(options: ClientOptions) -> Result<(Client, Events)> {
        let config = options.session_config()?;
        let target = Target {
            transport: options.transport,
            server: options.server,
            ws_path: options.ws_path,
            timeout: options.connect_timeout,
        };
        let link = Link::connect(target.clone()).await?;
        let (commands, command_rx) = mpsc::channel(options.command_capacity.max(1));
        let (notices, notice_rx) = mpsc::channel(options.event_capacity.max(1));
        let user_id = config.user_id.clone();
        let session = ClientSession::new(config, tokio::time::Instant::now().into_std());
        let mut driver = Driver::new(target, session, link, command_rx, notices);
        driver.set_overflow_capacity(options.overflow_capacity);
        tokio::spawn(driver.run());
        Ok((Client { commands, user_id }, Events::new(notice_rx)))
    }

    /// [`Client::connect`], then waits up to `options.connect_timeout` for the login response.
    /// Notices before [`Event::LoginOk`] are consumed.
    ///
    /// # Errors
    /// Those of [`Client::connect`]; [`Error::LoginFailed`] with the server's code when the login
    /// is refused; [`Error::Timeout`] when no response came in time (the client is then logged
    /// out); [`Error::Closed`] or the link error when the link failed first.
    pub async fn login(options: ClientOptions) -> Result<(Client, Events)> {
        let timeout = options.connect_timeout;
        let (client, mut events) = Self::connect(options).await?;
        let wait = async {
            let mut link_error = None;
            while let Some(notice) = events.recv().await {
                match notice {
                    crate::Notice::Session(Event::LoginOk { .. }) => return Ok(()),
                    crate::Notice::Session(Event::LoginFailed { code }) => {
                        return Err(Error::LoginFailed(code))
                    }
                    crate::Notice::Session(Event::Kicked { code, .. }) => {
                        return Err(Error::Kicked(code))
                    }
                    crate::Notice::Disconnected(error) => link_error = Some(error),
                    _ => {}
                }
            }
            Err(link_error.unwrap_or(Error::Closed))
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(())) => Ok((client, events)),
            Ok(Err(error)) => Err(error),
            Err(_) => {
                client.logout().await;
                Err(Error::Timeout)
            }
        }
    }

    /// The uid this client logs in as.
    pub fn user_id(&self) -> &UserId<'static> {
        &self.user_id
    }

    /// Sends `text` to `to` (`"0"` = the server), as the SDK's `sendCommonData`. With `qos` the
    /// message gets a fresh UUID v4 fingerprint, which is returned: watch [`Events`] for
    /// [`Event::Delivered`] or [`Event::Lost`] with it; without, `None`.
    ///
    /// Returns once the message has been handed to the socket. Should the link fail in that very
    /// write, the failure is reported on [`Events`] (link lost, re-login) and a QoS message is
    /// resent after the re-login, as the session resends anything unacknowledged.
    ///
    /// # Errors
    /// [`Error::Send`] when not logged in or when too many QoS messages are unacknowledged;
    /// [`Error::Closed`] when the client has ended.
    pub async fn send(
        &self,
        to: impl Into<UserId<'static>>,
        text: impl Into<Cow<'static, str>>,
        qos: bool,
    ) -> Result<Option<Fingerprint<'static>>> {
        let fp = qos.then(new_fingerprint);
        self.send_with(to, text, fp.clone(), UNSET as i32).await?;
        Ok(fp)
    }

    /// Sends `text` to `to` with the caller's fingerprint (QoS when `Some`) and application
    /// sub-type `typeu` (`-1` = unset).
    ///
    /// # Errors
    /// As [`Client::send`].
    pub async fn send_with(
        &self,
        to: impl Into<UserId<'static>>,
        text: impl Into<Cow<'static, str>>,
        fp: Option<Fingerprint<'static>>,
        typeu: i32,
    ) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.request(Command::Send {
            to: to.into(),
            text: text.into(),
            fp,
            typeu,
            reply,
        })
        .await?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// Sends an echo request (type 5) with `text`; the server answers with
    /// [`Event::EchoResponse`] (SPEC §4.7). Works before the login is answered too.
    ///
    /// # Errors
    /// [`Error::NotConnected`] while no link is up; [`Error::Closed`].
    pub async fn echo(&self, text: impl Into<Cow<'static, str>>) -> Result<()> {
        let msg = Message::new(Kind::Echo)
            .from(self.user_id.clone())
            .to(UserId::SERVER)
            .content(imedge_protocol::Content::Text(text.into()));
        self.send_raw(msg).await
    }

    /// Writes `msg` exactly as given on the current link, bypassing the session: no QoS tracking,
    /// no login check. For tests and tools that must send what a regular client would not
    /// (a spoofed `from`, a message before login, …).
    ///
    /// # Errors
    /// [`Error::NotConnected`] while no link is up; [`Error::Closed`].
    pub async fn send_raw(&self, msg: Message<'static>) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.request(Command::Raw { msg, reply }).await?;
        answer.await.map_err(|_| Error::Closed)?
    }

    /// Logs out (a logout message if logged in, then the link is closed) and ends the client's
    /// task; pending QoS messages are reported [`Event::Lost`]. Returns once that is done; does
    /// nothing if the client has already ended.
    pub async fn logout(&self) {
        let (reply, answer) = oneshot::channel();
        if self.request(Command::Logout { reply }).await.is_ok() {
            let _ = answer.await;
        }
    }

    /// Ends the client's task at once, without a logout: the server sees the connection drop.
    /// Pending QoS messages are not reported.
    pub async fn close(&self) {
        let _ = self.request(Command::Close).await;
    }

    /// A snapshot of the session.
    ///
    /// # Errors
    /// [`Error::Closed`] when the client has ended.
    pub async fn state(&self) -> Result<State> {
        let (reply, answer) = oneshot::channel();
        self.request(Command::State { reply }).await?;
        answer.await.map_err(|_| Error::Closed)
    }

    /// Whether the client's task has ended.
    pub fn is_closed(&self) -> bool {
        self.commands.is_closed()
    }

    async fn request(&self, command: Command) -> Result<()> {
        self.commands.send(command).await.map_err(|_| Error::Closed)
    }
}

/// A fresh fingerprint: random UUID v4 text, lowercase with dashes, as the Java SDK makes them
/// (SPEC §8.2).
pub fn new_fingerprint() -> Fingerprint<'static> {
    Fingerprint::from(uuid::Uuid::new_v4().to_string())
}

//! What a client is configured with: [`ClientOptions`].

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use imedge_protocol::frame::ws;
use imedge_protocol::qos::receiver::TRANSIT_MARGIN;
use imedge_protocol::qos::sender::MIN_CHECK_INTERVAL;
use imedge_protocol::qos::{QosReceiverConfig, QosSenderConfig};
use imedge_protocol::session::{ClientConfig, KeepAlive, SenseMode, Transport};

use crate::Error;

/// The reference server's UDP port (SPEC §1).
pub const DEFAULT_UDP_PORT: u16 = 7901;
/// The reference server's TCP port (SPEC §1).
pub const DEFAULT_TCP_PORT: u16 = 8901;
/// The reference server's WebSocket port (SPEC §1).
pub const DEFAULT_WS_PORT: u16 = 3000;

/// Bound on establishing the first link (TCP connect plus, for WebSocket, the upgrade) and, in
/// [`crate::Client::login`], on the wait for the login response. Loopback and LAN servers answer
/// in milliseconds; 10 s leaves room for a congested mobile link without hanging an application
/// for long on a dead address.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Commands (`send`, `logout`, …) queued towards the client's task before callers wait. Each
/// command is answered once the task has acted on it, so a caller has at most one in flight; the
/// bound only matters for a [`crate::Client`] cloned into many tasks.
pub const DEFAULT_COMMAND_CAPACITY: usize = 128;

/// Notices ([`crate::Notice`]) queued towards the application before the client applies
/// backpressure. A chat application takes its messages as they come; 1024 leaves room for a
/// burst (a stored backlog drained at login arrives in pages of a few hundred) without letting a
/// stalled application grow memory without bound.
///
/// When the queue is full, a received data message is **not taken**: a QoS message is not ACKed,
/// so its sender resends it later (and the de-duplication window has not recorded it, so the
/// resend is delivered); a message without QoS is dropped, as a lossy link would. Other notices
/// (login results, ACKs, losses, link events) wait in a small overflow queue, bounded by
/// [`MAX_OVERFLOW_NOTICES`].
pub const DEFAULT_EVENT_CAPACITY: usize = 1024;

/// Default of [`ClientOptions::overflow_capacity`]: notices other than received messages kept
/// while the event queue is full. One `Delivered` or `Lost` per message the resend table can
/// hold (`qos::sender::CLIENT_MAX_PENDING`, 4096) plus room for login and link notices; past it
/// (only a server flooding echo responses or errors at an application that never reads) further
/// notices are dropped and counted in [`crate::State::dropped_notices`].
pub const MAX_OVERFLOW_NOTICES: usize = 4096 + 256;

/// The reference server's listening port for `transport` (SPEC §1).
pub const fn default_port(transport: Transport) -> u16 {
    match transport {
        Transport::Tcp => DEFAULT_TCP_PORT,
        Transport::Udp => DEFAULT_UDP_PORT,
        Transport::Ws => DEFAULT_WS_PORT,
    }
}

/// How to reach the server and whom to log in as.
///
/// [`ClientOptions::new`] fills in everything but the four essentials with the Java SDK's
/// defaults; fields are public so that tests and tools can change the rest with struct update
/// syntax. `Debug` redacts the token.
#[derive(Clone)]
pub struct ClientOptions {
    /// TCP (4-byte length prefix), UDP (one datagram per message) or WebSocket (one text frame
    /// per message).
    pub transport: Transport,
    /// The server's address.
    pub server: SocketAddr,
    /// Request path of the WebSocket upgrade; the reference accepts only `/websocket`
    /// (SPEC §1.3). Ignored by TCP and UDP.
    pub ws_path: String,
    /// The uid to log in as (`loginUserId`, and `from` of everything sent).
    pub user_id: String,
    /// `loginToken`, handed to the server's verify callback.
    pub token: String,
    /// `extra` of the login, opaque application data; omitted when `None`.
    pub extra: Option<String>,
    /// The SDK sense mode (keep-alive interval and liveness timeout, SPEC §6.2); `None` = the
    /// SDK default of the transport (TCP and WebSocket 15S, UDP 3S). Must match the server's
    /// idle timeout (the reference demo server expects 5S on TCP and WebSocket).
    pub sense_mode: Option<SenseMode>,
    /// A keep-alive interval and timeout outside the SDK's table; overrides `sense_mode`. For
    /// tests and servers with non-standard idle timeouts.
    pub keep_alive: Option<KeepAlive>,
    /// Resend timing of sent QoS messages; the Java SDK's by default (SPEC §8.3: a check every
    /// 5000 ms, messages older than 3000 ms resent, 2 resends, then `Lost`). Set with
    /// [`ClientOptions::with_qos_resends`] and [`ClientOptions::with_qos_resend_interval`].
    ///
    /// It also sizes the de-duplication window of received messages (see
    /// [`ClientOptions::session_config`]).
    pub qos: QosSenderConfig,
    /// See [`DEFAULT_CONNECT_TIMEOUT`].
    pub connect_timeout: Duration,
    /// See [`DEFAULT_COMMAND_CAPACITY`].
    pub command_capacity: usize,
    /// Capacity of the [`crate::Events`] queue, see [`DEFAULT_EVENT_CAPACITY`] for what happens
    /// when it is full. At least 1.
    pub event_capacity: usize,
    /// Notices other than received messages held while the event queue is full; see
    /// [`MAX_OVERFLOW_NOTICES`].
    pub overflow_capacity: usize,
}

impl ClientOptions {
    /// Options for logging in as `user_id` with `token` to `server` over `transport`, with the
    /// Java SDK's defaults for everything else.
    pub fn new(
        transport: Transport,
        server: SocketAddr,
        user_id: impl Into<String>,
        token: impl Into<String>,
    ) -> Self {
        Self {
            transport,
            server,
            user_id: user_id.into(),
            token: token.into(),
            ..Self::default()
        }
    }

    /// Uses the SDK sense mode `mode` (see [`ClientOptions::sense_mode`]).
    pub fn with_sense_mode(mut self, mode: SenseMode) -> Self {
        self.sense_mode = Some(mode);
        self
    }

    /// Resends of an unacknowledged QoS message before it is reported [`crate::Event::Lost`]
    /// (Java SDK: 2). More resends ride out a lossier link: with 10 % loss each way a message
    /// and its ACK both get through with p = 0.81 per attempt, so 2 resends lose ~0.7 % of
    /// messages and 8 resends ~3·10⁻⁷.
    pub fn with_qos_resends(mut self, resends: u32) -> Self {
        self.qos.max_resends = resends;
        self
    }

    /// Period of the QoS resend checks (Java SDK: 5000 ms). A message is resent at the first
    /// check at least the SDK's grace (3000 ms) after its first send, or one interval after it
    /// when the interval is shorter, then at every check. Clamped to
    /// [`MIN_CHECK_INTERVAL`].
    pub fn with_qos_resend_interval(mut self, interval: Duration) -> Self {
        let interval = interval.max(MIN_CHECK_INTERVAL);
        self.qos.check_interval = interval;
        self.qos.grace = QosSenderConfig::CLIENT.grace.min(interval);
        self
    }

    /// Sets the capacity of the event queue (see [`DEFAULT_EVENT_CAPACITY`]).
    pub fn with_event_capacity(mut self, capacity: usize) -> Self {
        self.event_capacity = capacity;
        self
    }

    /// Sets the `extra` login field.
    pub fn with_extra(mut self, extra: impl Into<String>) -> Self {
        self.extra = Some(extra.into());
        self
    }

    /// The session configuration these options describe.
    ///
    /// The de-duplication window of received QoS messages is the SDK's
    /// ([`QosReceiverConfig::CLIENT`], 58 s), widened to cover a sender that resends on the same
    /// schedule as this client: the server relays a message to us with its own policy, which a
    /// deployment sets alike on both ends (`--qos-resends`), and may deliver it once more after
    /// giving up (stored for an online recipient) — so twice [`QosSenderConfig::holding_time`]
    /// of [`ClientOptions::qos`], plus [`TRANSIT_MARGIN`]. A key forgotten too early would let a
    /// late resend reach the application twice.
    ///
    /// # Errors
    /// [`Error::Options`] when the transport's SDK has no such sense mode (UDP has no 5S or 15S).
    pub fn session_config(&self) -> Result<ClientConfig, Error> {
        let mut config =
            ClientConfig::new(self.user_id.clone(), self.token.clone(), self.transport);
        if let Some(keep_alive) = self.keep_alive {
            config.keep_alive = keep_alive;
        } else if let Some(mode) = self.sense_mode {
            config = config.with_sense_mode(mode)?;
        }
        config.extra.clone_from(&self.extra);
        config.qos = self.qos;
        config.dedup = dedup_window(&self.qos);
        Ok(config)
    }
}

/// The de-duplication window for a peer resending on `qos`'s schedule (see
/// [`ClientOptions::session_config`]).
fn dedup_window(qos: &QosSenderConfig) -> QosReceiverConfig {
    QosReceiverConfig::CLIENT.covering(qos.holding_time().saturating_mul(2), TRANSIT_MARGIN)
}

impl Default for ClientOptions {
    /// TCP to `127.0.0.1:8901` as an empty uid: only useful with struct update syntax.
    fn default() -> Self {
        Self {
            transport: Transport::Tcp,
            server: SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_TCP_PORT)),
            ws_path: ws::PATH.to_owned(),
            user_id: String::new(),
            token: String::new(),
            extra: None,
            sense_mode: None,
            keep_alive: None,
            qos: QosSenderConfig::CLIENT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            command_capacity: DEFAULT_COMMAND_CAPACITY,
            event_capacity: DEFAULT_EVENT_CAPACITY,
            overflow_capacity: MAX_OVERFLOW_NOTICES,
        }
    }
}

impl fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientOptions")
            .field("transport", &self.transport)
            .field("server", &self.server)
            .field("ws_path", &self.ws_path)
            .field("user_id", &self.user_id)
            .field("token", &"<redacted>")
            .field("extra", &self.extra)
            .field("sense_mode", &self.sense_mode)
            .field("keep_alive", &self.keep_alive)
            .field("qos", &self.qos)
            .field("connect_timeout", &self.connect_timeout)
            .field("command_capacity", &self.command_capacity)
            .field("event_capacity", &self.event_capacity)
            .field("overflow_capacity", &self.overflow_capacity)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn session_config_applies_the_options() {
        let server = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
        let options = ClientOptions::new(Transport::Tcp, server, "alice", "secret")
            .with_sense_mode(SenseMode::S5)
            .with_extra("x");
        let config = options.session_config().unwrap();
        assert_eq!(config.keep_alive, KeepAlive::from_millis(5000, 8000));
        assert_eq!(config.extra.as_deref(), Some("x"));
        assert_eq!(config.user_id, "alice");
        assert!(!format!("{options:?}").contains("secret"));

        let udp =
            ClientOptions::new(Transport::Udp, server, "alice", "t").with_sense_mode(SenseMode::S5);
        assert!(matches!(udp.session_config(), Err(Error::Options(_))));

        let custom = ClientOptions {
            keep_alive: Some(KeepAlive::from_millis(100, 300)),
            ..udp
        };
        assert_eq!(
            custom.session_config().unwrap().keep_alive,
            KeepAlive::from_millis(100, 300)
        );
    }

    #[test]
    fn qos_defaults_are_the_java_sdks() {
        let server = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
        let config = ClientOptions::new(Transport::Udp, server, "a", "t")
            .session_config()
            .unwrap();
        assert_eq!(config.qos.max_resends, 2);
        assert_eq!(config.qos.check_interval, Duration::from_millis(5000));
        assert_eq!(config.qos.grace, Duration::from_millis(3000));
        // 2 × 18 s + 20 s is under the SDK's own 58 s.
        assert_eq!(config.dedup, QosReceiverConfig::CLIENT);
    }

    #[test]
    fn qos_resend_policy_is_configurable_and_dedup_covers_it() {
        let server = SocketAddr::from((Ipv4Addr::LOCALHOST, 1));
        let options = ClientOptions::new(Transport::Udp, server, "a", "t")
            .with_qos_resends(8)
            .with_qos_resend_interval(Duration::from_millis(10_000));
        let config = options.session_config().unwrap();
        assert_eq!(config.qos.max_resends, 8);
        assert_eq!(config.qos.check_interval, Duration::from_secs(10));
        assert_eq!(config.qos.grace, Duration::from_secs(3));
        // Held 3 + 9·10 = 93 s; a peer on the same schedule resends for as long, twice over.
        assert_eq!(config.qos.holding_time(), Duration::from_secs(93));
        assert_eq!(config.dedup.window, Duration::from_secs(2 * 93 + 20));
        assert!(config.dedup.window >= config.qos.resend_span());

        // A short interval shortens the grace too, so the first resend comes one interval late.
        let fast = options
            .with_qos_resend_interval(Duration::from_millis(200))
            .session_config()
            .unwrap();
        assert_eq!(fast.qos.grace, Duration::from_millis(200));
        assert_eq!(fast.dedup, QosReceiverConfig::CLIENT);
        let zero = ClientOptions::default().with_qos_resend_interval(Duration::ZERO);
        assert!(zero.qos.check_interval > Duration::ZERO);
    }
}

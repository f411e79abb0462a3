//! Sense modes: the heartbeat interval and liveness timeout of clients and servers (SPEC §6.2–§6.4).
//!
//! A *sense mode* names a heartbeat period. The Java SDKs map it to a keep-alive interval and a
//! "no response for this long = link lost" timeout; the server maps it to a read-idle timeout.
//! Client and server must agree (SPEC §6.3, hazard R8): a TCP client on the SDK default 15 s
//! interval is cut by the demo server's 11 s idle timeout between two heartbeats.

use std::time::Duration;

/// The transport a session runs on (SPEC §1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// 4-byte length-prefixed frames over TCP (§1.1).
    Tcp,
    /// One message per datagram (§1.2).
    Udp,
    /// One text frame per message over WebSocket (§1.3). There is no Java WebSocket SDK: clients
    /// use the TCP SDK's numbers.
    Ws,
}

/// A heartbeat period, as named by the SDKs' and the server's `MODE_*` constants (SPEC §6.2, §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SenseMode {
    /// `MODE_3S`
    S3,
    /// `MODE_5S` (the demo's TCP/WebSocket mode; the UDP SDK has none)
    S5,
    /// `MODE_10S`
    S10,
    /// `MODE_15S` (the TCP SDK default; the UDP SDK has none)
    S15,
    /// `MODE_30S`
    S30,
    /// `MODE_60S`
    S60,
    /// `MODE_120S`
    S120,
}

/// A client's heartbeat: send a keep-alive every `interval`; declare the link lost when the last
/// keep-alive response (or, before any, the first keep-alive sent) is `timeout` old (SPEC §6.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeepAlive {
    /// Period of the keep-alives; the first goes one interval after the login response.
    pub interval: Duration,
    /// Silence after which the link is declared lost.
    pub timeout: Duration,
}

impl KeepAlive {
    /// A heartbeat from milliseconds.
    pub const fn from_millis(interval: u64, timeout: u64) -> Self {
        Self {
            interval: Duration::from_millis(interval),
            timeout: Duration::from_millis(timeout),
        }
    }
}

/// TCP SDK `MODE_3S` (SPEC §6.2).
pub const TCP_KEEP_ALIVE_3S: KeepAlive = KeepAlive::from_millis(3000, 5000);
/// TCP SDK `MODE_5S`, the demo clients' mode (SPEC §6.2).
pub const TCP_KEEP_ALIVE_5S: KeepAlive = KeepAlive::from_millis(5000, 8000);
/// TCP SDK `MODE_10S` (SPEC §6.2).
pub const TCP_KEEP_ALIVE_10S: KeepAlive = KeepAlive::from_millis(10_000, 15_000);
/// TCP SDK `MODE_15S`, the SDK default (SPEC §6.2, §14).
pub const TCP_KEEP_ALIVE_15S: KeepAlive = KeepAlive::from_millis(15_000, 20_000);
/// TCP SDK `MODE_30S` (SPEC §6.2).
pub const TCP_KEEP_ALIVE_30S: KeepAlive = KeepAlive::from_millis(30_000, 35_000);
/// TCP SDK `MODE_60S` (SPEC §6.2).
pub const TCP_KEEP_ALIVE_60S: KeepAlive = KeepAlive::from_millis(60_000, 65_000);
/// TCP SDK `MODE_120S` (SPEC §6.2).
pub const TCP_KEEP_ALIVE_120S: KeepAlive = KeepAlive::from_millis(120_000, 125_000);

/// UDP SDK `MODE_3S`, the SDK default (SPEC §6.2, §14).
pub const UDP_KEEP_ALIVE_3S: KeepAlive = KeepAlive::from_millis(3000, 10_000);
/// UDP SDK `MODE_10S` (SPEC §6.2).
pub const UDP_KEEP_ALIVE_10S: KeepAlive = KeepAlive::from_millis(10_000, 21_000);
/// UDP SDK `MODE_30S` (SPEC §6.2).
pub const UDP_KEEP_ALIVE_30S: KeepAlive = KeepAlive::from_millis(30_000, 61_000);
/// UDP SDK `MODE_60S` (SPEC §6.2).
pub const UDP_KEEP_ALIVE_60S: KeepAlive = KeepAlive::from_millis(60_000, 121_000);
/// UDP SDK `MODE_120S` (SPEC §6.2).
pub const UDP_KEEP_ALIVE_120S: KeepAlive = KeepAlive::from_millis(120_000, 241_000);

/// The TCP SDK's default mode (SPEC §6.2).
pub const TCP_DEFAULT_CLIENT_MODE: SenseMode = SenseMode::S15;
/// The UDP SDK's default mode (SPEC §6.2).
pub const UDP_DEFAULT_CLIENT_MODE: SenseMode = SenseMode::S3;

/// How often the SDK checks whether the keep-alive timeout has passed
/// (`NETWORK_CONNECTION_TIME_OUT_CHECK_INTERVAL`, SPEC §6.2).
pub const LIVENESS_CHECK_INTERVAL: Duration = Duration::from_millis(2000);

/// Period of the TCP SDK's automatic re-login attempts (`AUTO_RE$LOGIN_INTERVAL`, SPEC §6.4, §14).
pub const TCP_RELOGIN_INTERVAL: Duration = Duration::from_millis(3000);
/// Period of the UDP SDK's automatic re-login attempts (SPEC §6.4, §14).
pub const UDP_RELOGIN_INTERVAL: Duration = Duration::from_millis(2000);

/// Server idle timeout, TCP and WebSocket, `MODE_3S` (= 3·2+1 s, SPEC §6.3).
pub const SERVER_TCP_IDLE_3S: Duration = Duration::from_secs(7);
/// Server idle timeout, TCP and WebSocket, `MODE_5S` (= 5·2+1 s), the demo's (SPEC §6.3).
pub const SERVER_TCP_IDLE_5S: Duration = Duration::from_secs(11);
/// Server idle timeout, TCP and WebSocket, `MODE_10S` (= 10+5 s, SPEC §6.3).
pub const SERVER_TCP_IDLE_10S: Duration = Duration::from_secs(15);
/// Server idle timeout, TCP and WebSocket, `MODE_15S` (= 15+5 s, SPEC §6.3).
pub const SERVER_TCP_IDLE_15S: Duration = Duration::from_secs(20);
/// Server idle timeout, TCP and WebSocket, `MODE_30S` (SPEC §6.3).
pub const SERVER_TCP_IDLE_30S: Duration = Duration::from_secs(35);
/// Server idle timeout, TCP and WebSocket, `MODE_60S` (SPEC §6.3).
pub const SERVER_TCP_IDLE_60S: Duration = Duration::from_secs(65);
/// Server idle timeout, TCP and WebSocket, `MODE_120S` (SPEC §6.3).
pub const SERVER_TCP_IDLE_120S: Duration = Duration::from_secs(125);

/// Server idle timeout, UDP, `MODE_3S` (= 3·3+1 s, SPEC §6.3).
pub const SERVER_UDP_IDLE_3S: Duration = Duration::from_secs(10);
/// Server idle timeout, UDP, `MODE_10S` (= 10·2+1 s, SPEC §6.3).
pub const SERVER_UDP_IDLE_10S: Duration = Duration::from_secs(21);
/// Server idle timeout, UDP, `MODE_30S` (= 30·2+2 s, SPEC §6.3).
pub const SERVER_UDP_IDLE_30S: Duration = Duration::from_secs(62);
/// Server idle timeout, UDP, `MODE_60S` (SPEC §6.3).
pub const SERVER_UDP_IDLE_60S: Duration = Duration::from_secs(122);
/// Server idle timeout, UDP, `MODE_120S` (SPEC §6.3).
pub const SERVER_UDP_IDLE_120S: Duration = Duration::from_secs(242);

/// Server idle timeout, TCP and WebSocket, when no mode is set (SPEC §6.3, §14).
pub const SERVER_TCP_DEFAULT_IDLE: Duration = Duration::from_secs(20);
/// Server idle timeout, UDP, when no mode is set; the demo keeps it (SPEC §6.3, §14).
pub const SERVER_UDP_DEFAULT_IDLE: Duration = Duration::from_secs(10);
/// The demo server's TCP and WebSocket idle timeout (`MODE_5S`); the captured vectors were
/// recorded against it (SPEC §6.3: "closed 11.0 s after its last frame").
pub const DEMO_SERVER_IDLE: Duration = SERVER_TCP_IDLE_5S;

impl SenseMode {
    /// Every mode, shortest first.
    pub const ALL: [SenseMode; 7] = [
        Self::S3,
        Self::S5,
        Self::S10,
        Self::S15,
        Self::S30,
        Self::S60,
        Self::S120,
    ];

    /// The Java SDK heartbeat of this mode on `transport`; `None` where the SDK has no such mode
    /// (UDP 5S and 15S). WebSocket uses the TCP SDK's table (SPEC §6.2).
    pub const fn client_keep_alive(self, transport: Transport) -> Option<KeepAlive> {
        match transport {
            Transport::Tcp | Transport::Ws => Some(match self {
                Self::S3 => TCP_KEEP_ALIVE_3S,
                Self::S5 => TCP_KEEP_ALIVE_5S,
                Self::S10 => TCP_KEEP_ALIVE_10S,
                Self::S15 => TCP_KEEP_ALIVE_15S,
                Self::S30 => TCP_KEEP_ALIVE_30S,
                Self::S60 => TCP_KEEP_ALIVE_60S,
                Self::S120 => TCP_KEEP_ALIVE_120S,
            }),
            Transport::Udp => match self {
                Self::S3 => Some(UDP_KEEP_ALIVE_3S),
                Self::S5 | Self::S15 => None,
                Self::S10 => Some(UDP_KEEP_ALIVE_10S),
                Self::S30 => Some(UDP_KEEP_ALIVE_30S),
                Self::S60 => Some(UDP_KEEP_ALIVE_60S),
                Self::S120 => Some(UDP_KEEP_ALIVE_120S),
            },
        }
    }

    /// The reference server's read-idle timeout for this mode on `transport`; `None` where the
    /// server has no such mode (UDP 5S and 15S). TCP and WebSocket share a table (SPEC §6.3).
    pub const fn server_idle_timeout(self, transport: Transport) -> Option<Duration> {
        match transport {
            Transport::Tcp | Transport::Ws => Some(match self {
                Self::S3 => SERVER_TCP_IDLE_3S,
                Self::S5 => SERVER_TCP_IDLE_5S,
                Self::S10 => SERVER_TCP_IDLE_10S,
                Self::S15 => SERVER_TCP_IDLE_15S,
                Self::S30 => SERVER_TCP_IDLE_30S,
                Self::S60 => SERVER_TCP_IDLE_60S,
                Self::S120 => SERVER_TCP_IDLE_120S,
            }),
            Transport::Udp => match self {
                Self::S3 => Some(SERVER_UDP_IDLE_3S),
                Self::S5 | Self::S15 => None,
                Self::S10 => Some(SERVER_UDP_IDLE_10S),
                Self::S30 => Some(SERVER_UDP_IDLE_30S),
                Self::S60 => Some(SERVER_UDP_IDLE_60S),
                Self::S120 => Some(SERVER_UDP_IDLE_120S),
            },
        }
    }
}

impl Transport {
    /// The Java SDK's default sense mode: TCP 15S, UDP 3S; WebSocket as TCP (SPEC §6.2).
    pub const fn default_client_mode(self) -> SenseMode {
        match self {
            Self::Tcp | Self::Ws => TCP_DEFAULT_CLIENT_MODE,
            Self::Udp => UDP_DEFAULT_CLIENT_MODE,
        }
    }

    /// The heartbeat of [`Self::default_client_mode`]: TCP 15 s / 20 s, UDP 3 s / 10 s (SPEC §14).
    pub const fn default_client_keep_alive(self) -> KeepAlive {
        match self {
            Self::Tcp | Self::Ws => TCP_KEEP_ALIVE_15S,
            Self::Udp => UDP_KEEP_ALIVE_3S,
        }
    }

    /// The server's idle timeout when no mode is set: TCP/WebSocket 20 s, UDP 10 s (SPEC §6.3).
    pub const fn default_server_idle_timeout(self) -> Duration {
        match self {
            Self::Tcp | Self::Ws => SERVER_TCP_DEFAULT_IDLE,
            Self::Udp => SERVER_UDP_DEFAULT_IDLE,
        }
    }

    /// Period of the SDK's automatic re-login: TCP 3000 ms, UDP 2000 ms; WebSocket as TCP
    /// (SPEC §6.4).
    pub const fn relogin_interval(self) -> Duration {
        match self {
            Self::Tcp | Self::Ws => TCP_RELOGIN_INTERVAL,
            Self::Udp => UDP_RELOGIN_INTERVAL,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_tables() {
        assert_eq!(
            SenseMode::S5.client_keep_alive(Transport::Tcp),
            Some(KeepAlive::from_millis(5000, 8000))
        );
        assert_eq!(SenseMode::S5.client_keep_alive(Transport::Udp), None);
        assert_eq!(SenseMode::S15.client_keep_alive(Transport::Udp), None);
        assert_eq!(
            SenseMode::S10.client_keep_alive(Transport::Udp),
            Some(KeepAlive::from_millis(10_000, 21_000))
        );
        for mode in SenseMode::ALL {
            assert_eq!(
                mode.client_keep_alive(Transport::Ws),
                mode.client_keep_alive(Transport::Tcp)
            );
            // Every client timeout leaves room for at least one late response.
            for transport in [Transport::Tcp, Transport::Udp] {
                if let Some(ka) = mode.client_keep_alive(transport) {
                    assert!(ka.timeout > ka.interval);
                }
            }
        }
    }

    #[test]
    fn defaults() {
        assert_eq!(Transport::Tcp.default_client_mode(), SenseMode::S15);
        assert_eq!(Transport::Udp.default_client_mode(), SenseMode::S3);
        for transport in [Transport::Tcp, Transport::Udp, Transport::Ws] {
            assert_eq!(
                transport.default_client_mode().client_keep_alive(transport),
                Some(transport.default_client_keep_alive())
            );
        }
        assert_eq!(
            Transport::Tcp.default_server_idle_timeout(),
            Duration::from_secs(20)
        );
        assert_eq!(
            Transport::Udp.default_server_idle_timeout(),
            Duration::from_secs(10)
        );
        assert_eq!(DEMO_SERVER_IDLE, Duration::from_secs(11));
        assert_eq!(
            Transport::Udp.relogin_interval(),
            Duration::from_millis(2000)
        );
        assert_eq!(
            Transport::Ws.relogin_interval(),
            Duration::from_millis(3000)
        );
    }

    #[test]
    fn server_tables() {
        assert_eq!(
            SenseMode::S5.server_idle_timeout(Transport::Ws),
            Some(Duration::from_secs(11))
        );
        assert_eq!(
            SenseMode::S30.server_idle_timeout(Transport::Udp),
            Some(Duration::from_secs(62))
        );
        assert_eq!(SenseMode::S15.server_idle_timeout(Transport::Udp), None);
        // The demo pairing: a 5S client (5 s / 8 s) fits in the 5S server's 11 s, while the SDK
        // default 15 s interval does not (hazard R8).
        let idle = SenseMode::S5.server_idle_timeout(Transport::Tcp);
        assert!(idle > Some(TCP_KEEP_ALIVE_5S.interval));
        assert!(idle < Some(TCP_KEEP_ALIVE_15S.interval));
    }
}

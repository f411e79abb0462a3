//! The run's configuration: a typed [`Config`] with defaults, and the parsers of the command
//! line's value syntaxes (durations `30s`/`500ms`, rates `5000`/`5k`/`max`, source address ranges,
//! loss limits). The command line itself (clap) lives in `main.rs`.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use imedge_protocol::qos::receiver::TRANSIT_MARGIN;
use imedge_protocol::qos::sender::MIN_CHECK_INTERVAL;
use imedge_protocol::qos::{QosReceiverConfig, QosSenderConfig};
use serde::{Deserialize, Serialize};

/// Default TCP port of a MobileIMSDK server (the reference's `8901`).
pub const DEFAULT_TCP_PORT: u16 = 8901;
/// Default UDP port of a MobileIMSDK server (the reference's `7901`).
pub const DEFAULT_UDP_PORT: u16 = 7901;
/// Default WebSocket port of a MobileIMSDK server (the reference's `3000`).
pub const DEFAULT_WS_PORT: u16 = 3000;
/// Largest source address range accepted: a /16 is already far more than the ephemeral port
/// arithmetic ever needs (28k connections per address and destination).
pub const MAX_SOURCE_IPS: usize = 65_536;
/// Largest `dataContent` we generate: the whole message must fit the reference's 2048-byte UDP
/// datagram limit (SPEC §1.2), and the envelope (keys, uids, fingerprint) takes ≈ 250 bytes.
pub const MAX_MESSAGE_SIZE: usize = 1_700;

/// What the clients do once logged in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Clients in pairs (cross-transport when several are enabled), each sending to its partner.
    C2c,
    /// Every client sends to the server (`to = "0"`); delivery is confirmed by the server's ACK.
    C2s,
    /// Log in and heart-beat only: connection capacity.
    Idle,
    /// Log in, then every client drops its link at once and re-logs in: a login storm.
    Storm,
    /// One sender per worker sends, via C2C, to every other client of its worker in turn.
    Fanout,
}

impl Scenario {
    /// Whether the scenario sends application messages.
    pub fn sends(self) -> bool {
        matches!(self, Self::C2c | Self::C2s | Self::Fanout)
    }
}

/// The message rate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Rate {
    /// Open loop: this many messages per second in total, on a fixed schedule.
    PerSecond(f64),
    /// Closed loop: each sender keeps `window` messages outstanding, to find the ceiling.
    Max,
}

/// When the run counts as failed for loss (`--max-loss`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum MaxLoss {
    /// At most this many messages lost (an integer on the command line: `0`, `10`).
    Count(u64),
    /// At most this fraction of the messages due (a decimal or a percentage: `0.001`, `0.1%`).
    Fraction(f64),
}

impl MaxLoss {
    /// Whether `lost` out of `due` messages exceeds the limit.
    pub fn exceeded(self, lost: u64, due: u64) -> bool {
        match self {
            Self::Count(max) => lost > max,
            Self::Fraction(max) => due > 0 && (lost as f64 / due as f64) > max,
        }
    }
}

/// The transports a client can use, in report order.
pub const TRANSPORTS: [&str; 3] = ["tcp", "udp", "ws"];

/// Everything a run needs; the parent sends it to every worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Server addresses; clients are spread over them round-robin.
    pub hosts: Vec<IpAddr>,
    /// TCP port of every host.
    pub tcp_port: u16,
    /// UDP port of every host.
    pub udp_port: u16,
    /// WebSocket port of every host.
    pub ws_port: u16,
    /// WebSocket upgrade path.
    pub ws_path: String,
    /// Number of clients in total.
    pub clients: usize,
    /// Weights of TCP, UDP and WebSocket in the client mix (0 disables a transport).
    pub weights: [u32; 3],
    /// Logins per second, in total.
    pub login_rate: f64,
    /// Prefix of the user ids; client `i` logs in as `{uid_prefix}{i}`.
    pub uid_prefix: String,
    /// `loginToken` of every client.
    pub token: String,
    /// Worker count; `None` = as many as the client count needs (file descriptor limit).
    pub workers: Option<usize>,
    /// Source addresses to spread connections over; empty = the kernel's choice (spread over
    /// 127.0.0.2–127.0.0.250 automatically when a loopback destination needs it).
    pub source_ips: Vec<IpAddr>,
    /// What the clients do.
    pub scenario: Scenario,
    /// Message rate.
    pub rate: Rate,
    /// Outstanding messages per sender in closed loop (`Rate::Max`).
    pub window: usize,
    /// Bytes of `dataContent` per message.
    pub message_size: usize,
    /// Send with QoS (a fingerprint, ACKs, resends).
    pub qos: bool,
    /// Resends of an unacknowledged QoS message before the client reports it lost; `None` = the
    /// Java SDK's 2 (SPEC §8.3). See [`Config::qos_schedule`].
    #[serde(default)]
    pub qos_resends: Option<u32>,
    /// Period of the clients' QoS resend checks; `None` = the Java SDK's 5000 ms.
    #[serde(default)]
    pub qos_resend_interval: Option<Duration>,
    /// How long messages are sent (after the login phase).
    pub duration: Option<Duration>,
    /// Total messages to send; sending stops at whichever of this and `duration` comes first.
    pub messages: Option<u64>,
    /// How long after the last send undelivered messages are still waited for.
    pub grace: Duration,
    /// Loss limit for the exit status.
    pub max_loss: MaxLoss,
    /// Identifies the run in every payload, so that messages of an earlier run (still resent, or
    /// stored offline by the server for the same user ids) are not counted. 0 = chosen at start.
    #[serde(default)]
    pub run_id: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            hosts: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            tcp_port: DEFAULT_TCP_PORT,
            udp_port: DEFAULT_UDP_PORT,
            ws_port: DEFAULT_WS_PORT,
            ws_path: "/websocket".to_owned(),
            clients: 1000,
            weights: [1, 1, 1],
            login_rate: 5000.0,
            uid_prefix: "lg".to_owned(),
            token: "token".to_owned(),
            workers: None,
            source_ips: Vec::new(),
            scenario: Scenario::C2c,
            rate: Rate::PerSecond(1000.0),
            window: 2,
            message_size: 100,
            qos: true,
            qos_resends: None,
            qos_resend_interval: None,
            duration: Some(Duration::from_secs(10)),
            messages: None,
            grace: Duration::from_secs(5),
            max_loss: MaxLoss::Count(0),
            run_id: 0,
        }
    }
}

impl Config {
    /// The clients' QoS resend table and de-duplication window: the Java SDK's, with
    /// `qos_resends` and `qos_resend_interval` applied as the SDK crate's
    /// `ClientOptions::with_qos_resends` / `with_qos_resend_interval` do (a grace no longer than
    /// the interval), and the window widened to cover a server resending on the same schedule,
    /// twice (a resent round, then its redelivery), plus transit.
    pub fn qos_schedule(&self) -> (QosSenderConfig, QosReceiverConfig) {
        let mut qos = QosSenderConfig::CLIENT;
        if let Some(n) = self.qos_resends {
            qos.max_resends = n;
        }
        if let Some(interval) = self.qos_resend_interval {
            let interval = interval.max(MIN_CHECK_INTERVAL);
            qos.check_interval = interval;
            qos.grace = qos.grace.min(interval);
        }
        let dedup = QosReceiverConfig::CLIENT
            .covering(qos.holding_time().saturating_mul(2), TRANSIT_MARGIN);
        (qos, dedup)
    }
}

/// A command-line value the parsers refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

fn err(msg: impl Into<String>) -> ParseError {
    ParseError(msg.into())
}

/// `30s`, `500ms`, `2m`, `1h`, `250us`, or a bare number of seconds (`1.5`).
pub fn parse_duration(s: &str) -> Result<Duration, ParseError> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| err(format!("invalid duration {s:?} (e.g. 30s, 500ms)")))?;
    let scale = match unit {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        _ => return Err(err(format!("unknown duration unit {unit:?} in {s:?}"))),
    };
    let secs = value * scale;
    if !secs.is_finite() || secs < 0.0 {
        return Err(err(format!("invalid duration {s:?}")));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `max`, `5000`, `5k`, `1.5m` (messages per second).
pub fn parse_rate(s: &str) -> Result<Rate, ParseError> {
    if s.eq_ignore_ascii_case("max") {
        return Ok(Rate::Max);
    }
    let value = parse_count_f64(s)?;
    if value <= 0.0 {
        return Err(err("--rate must be positive, or `max`"));
    }
    Ok(Rate::PerSecond(value))
}

/// A number with an optional `k`/`m` suffix.
pub fn parse_count_f64(s: &str) -> Result<f64, ParseError> {
    let s = s.trim();
    let (num, scale) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (s.get(..i).unwrap_or_default(), 1e3),
        Some((i, 'm' | 'M')) => (s.get(..i).unwrap_or_default(), 1e6),
        _ => (s, 1.0),
    };
    let value: f64 = num
        .parse()
        .map_err(|_| err(format!("invalid number {s:?}")))?;
    let value = value * scale;
    if !value.is_finite() {
        return Err(err(format!("invalid number {s:?}")));
    }
    Ok(value)
}

/// `0`, `10` (a count) or `0.01`, `1%` (a fraction of the messages due).
pub fn parse_max_loss(s: &str) -> Result<MaxLoss, ParseError> {
    let s = s.trim();
    if let Some(pct) = s.strip_suffix('%') {
        let value: f64 = pct
            .parse()
            .map_err(|_| err(format!("invalid loss {s:?}")))?;
        return fraction(value / 100.0);
    }
    if s.contains('.') {
        let value: f64 = s.parse().map_err(|_| err(format!("invalid loss {s:?}")))?;
        return fraction(value);
    }
    s.parse().map(MaxLoss::Count).map_err(|_| {
        err(format!(
            "invalid loss {s:?} (a count such as 0, or a fraction such as 0.001 or 0.1%)"
        ))
    })
}

fn fraction(value: f64) -> Result<MaxLoss, ParseError> {
    if (0.0..=1.0).contains(&value) {
        Ok(MaxLoss::Fraction(value))
    } else {
        Err(err("a loss fraction must be between 0 and 1"))
    }
}

/// `127.0.0.2-127.0.0.250`, a single address, or a comma-separated list of either.
pub fn parse_source_ips(s: &str) -> Result<Vec<IpAddr>, ParseError> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((lo, hi)) = part.split_once('-') {
            let lo: Ipv4Addr = lo
                .trim()
                .parse()
                .map_err(|_| err(format!("invalid address {lo:?}")))?;
            let hi: Ipv4Addr = hi
                .trim()
                .parse()
                .map_err(|_| err(format!("invalid address {hi:?}")))?;
            let (lo, hi) = (u32::from(lo), u32::from(hi));
            if hi < lo {
                return Err(err(format!("empty address range {part:?}")));
            }
            if (hi - lo) as usize >= MAX_SOURCE_IPS {
                return Err(err(format!(
                    "address range {part:?} is larger than {MAX_SOURCE_IPS}"
                )));
            }
            out.extend((lo..=hi).map(|a| IpAddr::V4(Ipv4Addr::from(a))));
        } else {
            out.push(
                part.parse()
                    .map_err(|_| err(format!("invalid address {part:?}")))?,
            );
        }
        if out.len() > MAX_SOURCE_IPS {
            return Err(err(format!("more than {MAX_SOURCE_IPS} source addresses")));
        }
    }
    if out.is_empty() {
        return Err(err("no source address given"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qos_schedule_defaults_and_overrides() {
        let (qos, dedup) = Config::default().qos_schedule();
        assert_eq!(qos, QosSenderConfig::CLIENT);
        assert_eq!(dedup, QosReceiverConfig::CLIENT);
        let config = Config {
            qos_resends: Some(8),
            qos_resend_interval: Some(Duration::from_millis(10_000)),
            ..Config::default()
        };
        let (qos, dedup) = config.qos_schedule();
        assert_eq!(qos.max_resends, 8);
        assert_eq!(qos.check_interval, Duration::from_secs(10));
        assert_eq!(qos.grace, Duration::from_secs(3));
        assert_eq!(dedup.window, Duration::from_secs(2 * 93 + 20));
        // A configuration from an older parent (no such fields) still parses.
        let mut json = serde_json::to_value(Config::default()).unwrap_or_default();
        if let Some(map) = json.as_object_mut() {
            map.remove("qos_resends");
            map.remove("qos_resend_interval");
        }
        let parsed: Result<Config, _> = serde_json::from_value(json);
        assert_eq!(parsed.ok(), Some(Config::default()));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn rates() {
        assert_eq!(parse_rate("max"), Ok(Rate::Max));
        assert_eq!(parse_rate("5000"), Ok(Rate::PerSecond(5000.0)));
        assert_eq!(parse_rate("5k"), Ok(Rate::PerSecond(5000.0)));
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("fast").is_err());
    }

    #[test]
    fn losses() {
        assert_eq!(parse_max_loss("0"), Ok(MaxLoss::Count(0)));
        assert_eq!(parse_max_loss("12"), Ok(MaxLoss::Count(12)));
        assert_eq!(parse_max_loss("0.01"), Ok(MaxLoss::Fraction(0.01)));
        assert_eq!(parse_max_loss("1%"), Ok(MaxLoss::Fraction(0.01)));
        assert!(parse_max_loss("2.0").is_err());
        assert!(MaxLoss::Count(0).exceeded(1, 100));
        assert!(!MaxLoss::Count(1).exceeded(1, 100));
        assert!(!MaxLoss::Fraction(0.01).exceeded(1, 100));
        assert!(MaxLoss::Fraction(0.01).exceeded(2, 100));
    }

    #[test]
    fn source_ranges() {
        let ips = parse_source_ips("127.0.0.2-127.0.0.4,127.0.0.9").unwrap();
        assert_eq!(ips.len(), 4);
        assert_eq!(ips[3], IpAddr::V4(Ipv4Addr::new(127, 0, 0, 9)));
        assert!(parse_source_ips("127.0.0.4-127.0.0.2").is_err());
        assert!(parse_source_ips("").is_err());
    }
}

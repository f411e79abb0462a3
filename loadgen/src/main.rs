//! imedge-loadgen: simulates thousands of MobileIMSDK clients (TCP, UDP, WebSocket) against imedge
//! or any MobileIMSDK-compatible server and reports throughput, latency percentiles, loss and
//! duplicates. This file is only the command line; everything else is the library.
//!
//! Exit status: 0 = ok, 1 = loss over `--max-loss` (or no client could log in), 2 = usage error.

use std::net::{IpAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use imedge_loadgen::config::{self, Config, MaxLoss, Rate, Scenario};
use imedge_loadgen::report::{html, json};
use imedge_loadgen::Options;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load generator for MobileIMSDK-compatible servers.
///
/// Messages count for the transport of their sender. Loss = messages sent and not delivered by
/// the end of --duration plus --grace, plus messages due that could not be sent (client not
/// logged in). Latency = receive time − intended send time (open loop, coordinated omission
/// corrected); for c2s it is the server's ACK time.
#[derive(Debug, Parser)]
#[command(name = "imedge-loadgen", version)]
struct Args {
    /// Server host (repeatable: clients are spread over several servers).
    #[arg(long = "host", default_value = "127.0.0.1")]
    hosts: Vec<String>,
    /// TCP port.
    #[arg(long, default_value_t = config::DEFAULT_TCP_PORT)]
    tcp_port: u16,
    /// UDP port.
    #[arg(long, default_value_t = config::DEFAULT_UDP_PORT)]
    udp_port: u16,
    /// WebSocket port.
    #[arg(long, default_value_t = config::DEFAULT_WS_PORT)]
    ws_port: u16,
    /// WebSocket upgrade path.
    #[arg(long, default_value = "/websocket")]
    ws_path: String,
    /// Number of clients.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Weight of TCP clients in the mix (0 disables TCP).
    #[arg(long, default_value_t = 1)]
    tcp: u32,
    /// Weight of UDP clients in the mix (0 disables UDP).
    #[arg(long, default_value_t = 1)]
    udp: u32,
    /// Weight of WebSocket clients in the mix (0 disables WebSocket).
    #[arg(long, default_value_t = 1)]
    ws: u32,
    /// Logins per second, in total.
    #[arg(long, default_value = "5000", value_parser = config::parse_count_f64)]
    login_rate: f64,
    /// User id prefix: client i logs in as PREFIX{i}.
    #[arg(long, default_value = "lg")]
    uid_prefix: String,
    /// Login token of every client.
    #[arg(long, default_value = "token")]
    token: String,
    /// Worker processes (default: as many as the open-file limit needs, 18,000 clients each).
    #[arg(long)]
    workers: Option<usize>,
    /// Source addresses to spread connections over, e.g. 127.0.0.2-127.0.0.250 (default: the
    /// kernel's choice; spread over that range automatically past 25k connections per
    /// destination on loopback).
    #[arg(long, value_parser = config::parse_source_ips)]
    source_ips: Option<Vec<IpAddr>>,
    /// c2c (pairs), c2s (to the server), idle (log in only), storm (mass re-login), fanout.
    #[arg(long, default_value = "c2c", value_parser = parse_scenario)]
    scenario: Scenario,
    /// Messages per second in total (open loop), or `max` (closed loop with --window).
    #[arg(long, default_value = "1000", value_parser = config::parse_rate)]
    rate: Rate,
    /// Closed loop: outstanding messages per sender.
    #[arg(long, default_value_t = 2)]
    window: usize,
    /// Bytes of dataContent per message.
    #[arg(long, default_value_t = 100)]
    message_size: usize,
    /// Send with QoS (true/false).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    qos: bool,
    /// Send without QoS (same as --qos false).
    #[arg(long)]
    no_qos: bool,
    /// Resends of an unacknowledged QoS message before a client reports it lost
    /// [default: 2, the Java SDK's].
    #[arg(long)]
    qos_resends: Option<u32>,
    /// Period of the clients' QoS resend checks, milliseconds [default: 5000, the Java SDK's].
    #[arg(long)]
    qos_resend_interval: Option<u64>,
    /// How long to send, e.g. 30s, 500ms (default 10s unless --messages is given).
    #[arg(long, value_parser = config::parse_duration)]
    duration: Option<std::time::Duration>,
    /// Messages to send in total.
    #[arg(long, value_parser = config::parse_count_f64)]
    messages: Option<f64>,
    /// How long to wait for undelivered messages after the last send.
    #[arg(long, default_value = "5s", value_parser = config::parse_duration)]
    grace: std::time::Duration,
    /// Allowed loss: a count (0, 10) or a fraction of the messages due (0.001, 0.1%).
    #[arg(long, default_value = "0", value_parser = config::parse_max_loss)]
    max_loss: MaxLoss,
    /// Write the report as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write an HdrHistogram interval log of the latencies.
    #[arg(long)]
    hdr_log: Option<PathBuf>,
    /// Write an HTML report with charts (or just the percentile chart for a .svg name).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Run the workers as threads of this process instead of child processes (limited by this
    /// process's open-file limit).
    #[arg(long)]
    threads: bool,
    /// No live progress.
    #[arg(long)]
    quiet: bool,
    /// PID of the server, when it runs on this machine: its CPU per delivered message (over
    /// the send phase only) and its memory are reported too.
    #[arg(long)]
    server_pid: Option<u32>,
}

fn parse_scenario(s: &str) -> Result<Scenario, String> {
    match s {
        "c2c" => Ok(Scenario::C2c),
        "c2s" => Ok(Scenario::C2s),
        "idle" => Ok(Scenario::Idle),
        "storm" => Ok(Scenario::Storm),
        "fanout" => Ok(Scenario::Fanout),
        _ => Err(format!(
            "unknown scenario {s:?} (c2c, c2s, idle, storm, fanout)"
        )),
    }
}

fn main() -> ExitCode {
    imedge_loadgen::clock::disable_huge_pages();
    let argv: Vec<String> = std::env::args().collect();
    // Hidden worker mode: `imedge-loadgen --worker INDEX COUNT`, configuration on stdin.
    if argv.get(1).map(String::as_str) == Some("--worker") {
        let index = argv.get(2).and_then(|s| s.parse().ok());
        let count = argv.get(3).and_then(|s| s.parse().ok());
        let (Some(index), Some(count)) = (index, count) else {
            eprintln!("usage: imedge-loadgen --worker INDEX COUNT");
            return ExitCode::from(2);
        };
        return match imedge_loadgen::run::serve_worker(index, count) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("imedge-loadgen worker {index}: {e}");
                ExitCode::from(2)
            }
        };
    }
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match run_cli(args) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("imedge-loadgen: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run_cli(args: Args) -> anyhow::Result<u8> {
    let config = to_config(&args)?;
    let options = Options {
        progress: !args.quiet,
        server_pid: args.server_pid,
    };
    let report = if args.threads {
        imedge_loadgen::run_in_process(&config, options)?
    } else {
        let exe = std::env::current_exe().context("locating this executable")?;
        imedge_loadgen::run_processes(&config, &exe, options)?
    };
    // The table is the program's output (progress goes to stderr).
    let table = imedge_loadgen::report::table::render(&report);
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), table.as_bytes());
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&json::to_json(&report))?;
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.hdr_log {
        let mut file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        report.write_hdr_log(&mut file)?;
    }
    if let Some(path) = &args.report {
        let svg = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("svg"));
        let text = if svg {
            html::render_svg(&report)
        } else {
            html::render(&report)
        };
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(u8::try_from(report.exit_code()).unwrap_or(1))
}

fn to_config(args: &Args) -> anyhow::Result<Config> {
    let mut hosts = Vec::new();
    for host in &args.hosts {
        let ip = match host.parse::<IpAddr>() {
            Ok(ip) => ip,
            Err(_) => (host.as_str(), 0)
                .to_socket_addrs()
                .with_context(|| format!("resolving {host}"))?
                .next()
                .map(|a| a.ip())
                .with_context(|| format!("{host} has no address"))?,
        };
        hosts.push(ip);
    }
    anyhow::ensure!(
        args.tcp + args.udp + args.ws > 0,
        "at least one of --tcp, --udp, --ws must have a weight"
    );
    anyhow::ensure!(
        args.message_size <= config::MAX_MESSAGE_SIZE,
        "--message-size is limited to {} bytes (UDP datagram limit)",
        config::MAX_MESSAGE_SIZE
    );
    anyhow::ensure!(args.login_rate > 0.0, "--login-rate must be positive");
    anyhow::ensure!(
        args.qos_resend_interval != Some(0),
        "--qos-resend-interval must be at least 1 ms"
    );
    anyhow::ensure!(
        !(args.rate == Rate::Max && args.scenario == Scenario::C2s && (args.no_qos || !args.qos)),
        "--rate max with --scenario c2s needs QoS: only the server's ACK confirms a C2S message"
    );
    let messages = args.messages.map(|m| m.max(0.0) as u64);
    let duration = match (args.duration, messages) {
        (None, None) => Some(std::time::Duration::from_secs(10)),
        (d, _) => d,
    };
    Ok(Config {
        hosts,
        tcp_port: args.tcp_port,
        udp_port: args.udp_port,
        ws_port: args.ws_port,
        ws_path: args.ws_path.clone(),
        clients: args.clients,
        weights: [args.tcp, args.udp, args.ws],
        login_rate: args.login_rate,
        uid_prefix: args.uid_prefix.clone(),
        token: args.token.clone(),
        workers: args.workers,
        source_ips: args.source_ips.clone().unwrap_or_default(),
        scenario: args.scenario,
        rate: args.rate,
        window: args.window.max(1),
        message_size: args.message_size,
        qos: args.qos && !args.no_qos,
        qos_resends: args.qos_resends,
        qos_resend_interval: args
            .qos_resend_interval
            .map(std::time::Duration::from_millis),
        duration,
        messages,
        grace: args.grace,
        max_loss: args.max_loss,
        run_id: 0,
    })
}

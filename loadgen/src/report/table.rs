//! The final human-readable table.

use std::fmt::Write;

use super::{percentiles, Report, TransportReport};
use crate::config::TRANSPORTS;

/// The report as a text table.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    let c = &report.config;
    let _ = writeln!(
        out,
        "imedge-loadgen: {:?} scenario, {} clients ({} workers), rate {:?}, {} B messages, QoS {}",
        c.scenario, c.clients, report.workers, c.rate, c.message_size, c.qos
    );
    let _ = writeln!(
        out,
        "{:<6} {:>7} {:>10} {:>10} {:>10} {:>8} {:>6} {:>7} {:>6} {:>8} {:>10} {:>8} {:>8} {:>8} {:>8} {:>9}",
        "", "clients", "sent", "delivered", "acked", "lost", "dup", "app dup", "reord", "unsent", "msg/s", "p50 µs", "p90 µs", "p99 µs", "p999 µs", "max µs"
    );
    for (name, t) in TRANSPORTS.iter().zip(&report.transports) {
        if t.clients > 0 {
            row(&mut out, report, name, t);
        }
    }
    row(&mut out, report, "total", &report.totals);
    let l = &report.logins;
    let [p50, _, p99, _, max] = percentiles(&report.login_latency);
    let _ = writeln!(
        out,
        "logins: {} ok ({:.0}/s), {} refused, {} never logged in, {} connect errors, {} links lost, {} kicked; login latency p50 {p50} µs p99 {p99} µs max {max} µs",
        l.ok, l.per_second(), l.failed, l.timed_out, l.connect_errors, l.link_lost, l.kicked
    );
    if l.stormed > 0 {
        let [p50, _, p99, _, max] = percentiles(&report.relogin_latency);
        let rate = if max > 0 {
            l.relogins_ok as f64 / (max as f64 / 1e6)
        } else {
            0.0
        };
        let _ = writeln!(
            out,
            "storm: {} dropped, {} re-logged in; re-login latency p50 {p50} µs p99 {p99} µs max {max} µs (≈ {rate:.0} logins/s)",
            l.stormed, l.relogins_ok
        );
    }
    let _ = writeln!(
        out,
        "loadgen: {:.2} CPU s = {:.0}% of a core (busiest worker {:.0}%), {:.2} µs per message; send phase {:.1} s, max schedule lag {} µs",
        report.cpu.total_s,
        report.cpu.total_core * 100.0,
        report.cpu.max_worker_core * 100.0,
        report.cpu.us_per_msg,
        report.send_s,
        report.max_lag_us
    );
    if let Some(s) = &report.server {
        let _ = writeln!(
            out,
            "server (pid {}): {:.2} µs CPU per delivered message, {:.0}% of a core over {:.1} s of the send phase; RSS {} → {} KiB (max {}), up to {} open files",
            s.pid,
            s.cpu_us_per_msg,
            s.cpu_core * 100.0,
            s.window_s,
            s.rss_first_kb,
            s.rss_last_kb,
            s.rss_max_kb,
            s.fds_max
        );
    }
    for w in &report.warnings {
        let _ = writeln!(out, "WARNING: {w}");
    }
    let (lost, due) = report.loss();
    let _ = writeln!(
        out,
        "result: {} ({lost} of {due} messages lost or unsent; --max-loss {:?})",
        if report.exit_code() == 0 {
            "PASS"
        } else {
            "FAIL"
        },
        c.max_loss
    );
    out
}

fn row(out: &mut String, report: &Report, name: &str, t: &TransportReport) {
    let c = &t.counters;
    let [p50, p90, p99, p999, max] = percentiles(&t.latency);
    let _ = writeln!(
        out,
        "{:<6} {:>7} {:>10} {:>10} {:>10} {:>8} {:>6} {:>7} {:>6} {:>8} {:>10.0} {:>8} {:>8} {:>8} {:>8} {:>9}",
        name,
        t.clients,
        c.sent,
        c.delivered,
        c.acked,
        c.lost,
        c.duplicated,
        c.app_duplicated,
        c.reordered,
        c.unsent,
        report.msgs_per_s(c),
        p50,
        p90,
        p99,
        p999,
        max
    );
}

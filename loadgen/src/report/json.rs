//! `--json`: the report as a JSON document.
//!
//! `{"totals": {...}, "transports": {"tcp": {...}, "udp": {...}, "ws": {...}}, "logins": {...},
//! "loadgen": {...}, "config": {...}, "timeline": [...], "warnings": [...]}`, where every transport
//! object has `sent, delivered, acked, lost, duplicated, app_duplicated, reordered, unsent,
//! qos_lost, late, msgs_per_s, clients` and `latency_us: {p50, p90, p99, p999, max, mean, count}`.

use hdrhistogram::Histogram;
use serde_json::{json, Value};

use super::{percentiles, Report, TransportReport};
use crate::config::TRANSPORTS;

/// The report as JSON.
pub fn to_json(report: &Report) -> Value {
    let mut transports = serde_json::Map::new();
    for (name, t) in TRANSPORTS.iter().zip(&report.transports) {
        transports.insert((*name).to_owned(), transport(report, t));
    }
    let l = &report.logins;
    let (lost, due) = report.loss();
    json!({
        "totals": transport(report, &report.totals),
        "transports": transports,
        "logins": {
            "ok": l.ok,
            "per_s": l.per_second(),
            "failed": l.failed,
            "timed_out": l.timed_out,
            "connect_errors": l.connect_errors,
            "link_lost": l.link_lost,
            "kicked": l.kicked,
            "server_errors": l.server_errors,
            "stormed": l.stormed,
            "relogins_ok": l.relogins_ok,
            "latency_us": latency(&report.login_latency),
            "relogin_latency_us": latency(&report.relogin_latency),
        },
        "loss": {"lost_or_unsent": lost, "due": due, "exceeded": report.config.max_loss.exceeded(lost, due)},
        "loadgen": {
            "workers": report.workers,
            "cpu_s": report.cpu.total_s,
            "cpu_percent_of_core": report.cpu.total_core * 100.0,
            "max_worker_percent_of_core": report.cpu.max_worker_core * 100.0,
            "cpu_us_per_msg": report.cpu.us_per_msg,
            "max_schedule_lag_us": report.max_lag_us,
            "send_s": report.send_s,
            "elapsed_s": report.elapsed_s,
        },
        "server": report.server.as_ref().map_or(Value::Null, |s| json!({
            "pid": s.pid,
            "window_s": s.window_s,
            "msgs": s.msgs,
            "cpu_us_per_msg": s.cpu_us_per_msg,
            "cpu_percent_of_core": s.cpu_core * 100.0,
            "rss_kb_first": s.rss_first_kb,
            "rss_kb_last": s.rss_last_kb,
            "rss_kb_max": s.rss_max_kb,
            "fds_max": s.fds_max,
        })),
        "config": serde_json::to_value(&report.config).unwrap_or(Value::Null),
        "timeline": report.timeline.iter().map(|t| json!({
            "t_s": t.t_s, "sent_per_s": t.sent_per_s, "delivered_per_s": t.delivered_per_s,
            "p50_us": t.p50_us, "p99_us": t.p99_us, "max_us": t.max_us,
            "errors": t.errors, "logged_in": t.logged_in, "phase": t.phase,
        })).collect::<Vec<_>>(),
        "warnings": report.warnings,
        "exit_code": report.exit_code(),
    })
}

fn transport(report: &Report, t: &TransportReport) -> Value {
    let c = &t.counters;
    json!({
        "clients": t.clients,
        "sent": c.sent,
        "delivered": c.delivered,
        "acked": c.acked,
        "lost": c.lost,
        "duplicated": c.duplicated,
        "app_duplicated": c.app_duplicated,
        "reordered": c.reordered,
        "unsent": c.unsent,
        "qos_lost": c.qos_lost,
        "late": c.late,
        "msgs_per_s": report.msgs_per_s(c),
        "latency_us": latency(&t.latency),
    })
}

fn latency(h: &Histogram<u64>) -> Value {
    let [p50, p90, p99, p999, max] = percentiles(h);
    json!({"p50": p50, "p90": p90, "p99": p99, "p999": p999, "max": max, "mean": h.mean(), "count": h.len()})
}

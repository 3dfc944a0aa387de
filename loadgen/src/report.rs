//! The report of one run, in `reports/RUN/`: `timeseries.csv` (per second), `latency.csv`
//! (percentiles), `deliver.hlog` (HdrHistogram interval log, the exact data `merge` adds
//! up), `summary.json`, and `report.html`, a self-contained page with SVG charts.

use crate::ledger::Shared;
use crate::LoadConfig;
use hdrhistogram::serialization::interval_log::IntervalLogWriterBuilder;
use hdrhistogram::serialization::V2DeflateSerializer;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// Percentiles of one latency, in microseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Pct {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Pct {
    /// Percentiles of `h`.
    pub fn of(h: &Histogram<u64>) -> Pct {
        if h.is_empty() {
            return Pct::default();
        }
        Pct {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// Figures scraped from the server's `/metrics`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ServerFigures {
    pub connections: u64,
    pub resident_kib: u64,
    pub kib_per_connection: f64,
    pub cpu_us_per_delivered: f64,
}

/// What a run measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Summary {
    pub run_id: String,
    pub target: String,
    pub users: usize,
    pub group_size: usize,
    pub rate_per_user: f64,
    pub measured_s: f64,
    /// Second of the run (timeseries.csv row) where the measured phase starts: when the
    /// last user had connected.
    pub measured_from_s: u64,
    pub sent: u64,
    /// Deliveries expected: each send times its recipients.
    pub expected_deliveries: u64,
    pub delivered: u64,
    pub acked: u64,
    pub errors: u64,
    /// Errors by kind: `connect`, `auth` (a refused token), `send`, `error CODE` (an error
    /// frame from the server).
    #[serde(default)]
    pub errors_by_kind: std::collections::BTreeMap<String, u64>,
    pub peak_connections: i64,
    pub sent_per_s: f64,
    pub delivered_per_s: f64,
    /// Send→deliver from the intended send time (coordinated omission corrected).
    pub deliver_us: Pct,
    /// Send→deliver from the actual send time.
    pub deliver_raw_us: Pct,
    pub ack_us: Pct,
    /// How late the open-loop schedule ran, and event-loop lag: the generator's health.
    pub schedule_slip_us: Pct,
    pub event_loop_lag_us: Pct,
    /// False when the figures cannot be trusted: connections failed or fell away, messages
    /// went missing, errors passed the budget, or the generator was the bottleneck.
    pub valid: bool,
    /// Every reason the run is invalid, joined with "; " (None when valid).
    pub invalid_reason: Option<String>,
    pub server: Option<ServerFigures>,
    /// Reconnect storm: drop → reconnected, and drop → backlog drained (absent without one).
    pub storm_reconnect_us: Option<Pct>,
    pub storm_catch_up_us: Option<Pct>,
}

/// What a run's verdict is judged from.
pub struct Evidence<'a> {
    /// Device connections asked for.
    pub users: i64,
    /// Fewest connections seen in the measured phase.
    pub lowest_connections: i64,
    pub sent: u64,
    pub expected: u64,
    pub delivered: u64,
    pub errors: u64,
    pub max_errors: u64,
    pub errors_by_kind: &'a std::collections::BTreeMap<String, u64>,
    pub slip_p99_us: u64,
    pub lag_p99_us: u64,
}

/// Every reason a run's figures cannot be trusted; empty when it is valid.
pub fn verdict(e: &Evidence<'_>) -> Vec<String> {
    let mut out = Vec::new();
    let kind = |k: &str| e.errors_by_kind.get(k).copied().unwrap_or(0);
    let (auth, connect) = (kind("auth"), kind("connect"));
    if auth + connect > 0 {
        out.push(format!(
            "{} connections failed ({auth} refused at auth, {connect} could not connect)",
            auth + connect
        ));
    }
    if e.lowest_connections < e.users {
        out.push(format!(
            "the measured phase had {} of the {} connections asked for",
            e.lowest_connections.max(0),
            e.users
        ));
    }
    if e.sent == 0 {
        out.push("nothing was sent in the measured phase".into());
    }
    if e.delivered < e.expected {
        out.push(format!(
            "{} of {} deliveries missing after the drain",
            e.expected - e.delivered,
            e.expected
        ));
    }
    if e.errors > e.max_errors {
        let kinds: Vec<String> = e
            .errors_by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        out.push(format!(
            "{} errors ({}) over the budget of {} (--max-errors)",
            e.errors,
            kinds.join(", "),
            e.max_errors
        ));
    }
    // The generator was the bottleneck if it could not keep its own schedule.
    if e.slip_p99_us > 100_000 {
        out.push(format!(
            "send schedule slipped by {:.1} ms at p99: the generator was saturated",
            e.slip_p99_us as f64 / 1000.0
        ));
    } else if e.lag_p99_us > 50_000 {
        out.push(format!(
            "event loop lagged {:.1} ms at p99: the generator was saturated",
            e.lag_p99_us as f64 / 1000.0
        ));
    }
    out
}

/// Raw `/metrics` values of interest.
#[derive(Clone, Debug, Default)]
pub struct Scrape {
    pub connections: u64,
    pub rss_bytes: u64,
    pub cpu_us: u64,
    pub messages_out: u64,
}

/// Reads `http://HOST:PORT/metrics` (loopback) with a bare HTTP/1.1 request.
pub async fn scrape(url: &str) -> anyhow::Result<Scrape> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("metrics url must be http://"))?;
    let (host, path) = rest
        .split_once('/')
        .map(|(h, p)| (h, format!("/{p}")))
        .unwrap_or((rest, "/metrics".into()));
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(host))
        .await??;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut body)).await??;
    let get = |name: &str| -> u64 {
        body.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|v| v.strip_prefix(' '))
                    .and_then(|v| v.trim().parse().ok())
            })
            .unwrap_or(0)
    };
    Ok(Scrape {
        connections: get("chatsim_connections"),
        rss_bytes: get("chatsim_process_resident_bytes"),
        cpu_us: get("chatsim_process_cpu_microseconds_total"),
        messages_out: get("chatsim_messages_out_total"),
    })
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Writes every report file and returns the summary.
pub fn write(
    shared: &Shared,
    cfg: &LoadConfig,
    before: Option<Scrape>,
    mid: Option<Scrape>,
    _goose: &goose::metrics::GooseMetrics,
) -> anyhow::Result<Summary> {
    let dir = &cfg.report_dir;
    let ramp_s = cfg.ramp.as_secs() as usize;
    let windows = shared.windows.lock().unwrap_or_else(|p| p.into_inner());
    // The measured phase began when the last user connected, on a whole second.
    let from_s = shared
        .span()
        .map(|(from, _)| from.saturating_duration_since(shared.start).as_secs() as usize)
        .unwrap_or(ramp_s);
    let measured: Vec<_> = windows
        .iter()
        .enumerate()
        .skip(from_s)
        .take(cfg.duration.as_secs() as usize)
        .collect();
    let mut deliver = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    let (mut sent, mut delivered, mut acked) = (0u64, 0u64, 0u64);
    let mut peak = 0i64;
    let mut low = i64::MAX;
    for (_, w) in &measured {
        deliver.add(&w.deliver)?;
        sent += w.sent;
        delivered += w.delivered;
        acked += w.acked;
        peak = peak.max(w.connections);
        low = low.min(w.connections);
    }
    if measured.is_empty() {
        low = 0;
    }
    let secs = cfg.duration.as_secs_f64().max(1.0);
    // timeseries.csv
    let mut ts = csv::Writer::from_path(dir.join("timeseries.csv"))?;
    // Rows are seconds of intended send time; delivered/acked/percentiles describe the
    // messages sent in that second.
    ts.write_record([
        "second",
        "connections",
        "sent",
        "delivered",
        "acked",
        "p50_deliver_ms",
        "p99_deliver_ms",
        "p999_deliver_ms",
    ])?;
    for (i, w) in windows.iter().enumerate() {
        let p = Pct::of(&w.deliver);
        ts.write_record([
            i.to_string(),
            w.connections.to_string(),
            w.sent.to_string(),
            w.delivered.to_string(),
            w.acked.to_string(),
            format!("{:.3}", ms(p.p50)),
            format!("{:.3}", ms(p.p99)),
            format!("{:.3}", ms(p.p999)),
        ])?;
    }
    ts.flush()?;
    // deliver.hlog: one interval per measured second.
    {
        let mut f = std::fs::File::create(dir.join("deliver.hlog"))?;
        let mut ser = V2DeflateSerializer::new();
        let start = std::time::SystemTime::now() - shared.start.elapsed();
        let mut log = IntervalLogWriterBuilder::new()
            .add_comment(&format!(
                "chatsim load run {} against {} (send→deliver, µs)",
                cfg.run_id, cfg.target
            ))
            .with_start_time(start)
            .with_base_time(start)
            .begin_log_with(&mut f, &mut ser)?;
        for (i, w) in &measured {
            log.write_histogram(
                &w.deliver,
                Duration::from_secs(*i as u64),
                Duration::from_secs(1),
                None,
            )
            .map_err(|e| anyhow::anyhow!("writing deliver.hlog: {e}"))?;
        }
    }
    let lock = |m: &std::sync::Mutex<Histogram<u64>>| {
        Pct::of(&m.lock().unwrap_or_else(|p| p.into_inner()))
    };
    let slip = lock(&shared.slip);
    let lag = lock(&shared.lag);
    let recipients = if cfg.group_size >= 2 {
        cfg.group_size as u64 - 1
    } else {
        1
    };
    let errors_by_kind = shared
        .error_kinds
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let errors = shared.errors.load(Ordering::Relaxed);
    let reasons = verdict(&Evidence {
        users: cfg.users as i64,
        // A reconnect storm drops sockets on purpose: judge its peak instead.
        lowest_connections: if cfg.storm_at.is_some() { peak } else { low },
        sent,
        expected: sent * recipients,
        delivered,
        errors,
        max_errors: cfg.max_errors,
        errors_by_kind: &errors_by_kind,
        slip_p99_us: slip.p99,
        lag_p99_us: lag.p99,
    });
    let invalid_reason = (!reasons.is_empty()).then(|| reasons.join("; "));
    let server = match (before, mid) {
        (Some(b), Some(m)) if m.connections > 0 => {
            let out = m.messages_out.saturating_sub(b.messages_out).max(1);
            Some(ServerFigures {
                connections: m.connections,
                resident_kib: m.rss_bytes / 1024,
                kib_per_connection: (m.rss_bytes.saturating_sub(b.rss_bytes)) as f64
                    / 1024.0
                    / m.connections as f64,
                cpu_us_per_delivered: (m.cpu_us.saturating_sub(b.cpu_us)) as f64 / out as f64,
            })
        }
        _ => None,
    };
    let summary = Summary {
        run_id: cfg.run_id.clone(),
        target: cfg.target.clone(),
        users: cfg.users,
        group_size: cfg.group_size,
        rate_per_user: cfg.rate_per_user,
        measured_s: secs,
        measured_from_s: from_s as u64,
        sent,
        expected_deliveries: sent * recipients,
        delivered,
        acked,
        errors,
        errors_by_kind,
        peak_connections: peak,
        sent_per_s: sent as f64 / secs,
        delivered_per_s: delivered as f64 / secs,
        deliver_us: Pct::of(&deliver),
        deliver_raw_us: lock(&shared.deliver_raw),
        ack_us: lock(&shared.ack),
        schedule_slip_us: slip,
        event_loop_lag_us: lag,
        valid: invalid_reason.is_none(),
        invalid_reason,
        server,
        storm_reconnect_us: cfg.storm_at.map(|_| lock(&shared.storm_reconnect)),
        storm_catch_up_us: cfg.storm_at.map(|_| lock(&shared.storm_catch_up)),
    };
    write_latency_csv(dir, &summary)?;
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    std::fs::write(dir.join("report.html"), html(&summary, &windows))?;
    Ok(summary)
}

/// `latency.csv`: the percentile table.
pub fn write_latency_csv(dir: &std::path::Path, s: &Summary) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_path(dir.join("latency.csv"))?;
    w.write_record([
        "measure", "count", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms",
    ])?;
    for (name, p) in [
        ("send_to_deliver", &s.deliver_us),
        ("send_to_deliver_raw", &s.deliver_raw_us),
        ("send_to_ack", &s.ack_us),
    ] {
        w.write_record([
            name.to_string(),
            p.count.to_string(),
            format!("{:.3}", ms(p.p50)),
            format!("{:.3}", ms(p.p90)),
            format!("{:.3}", ms(p.p99)),
            format!("{:.3}", ms(p.p999)),
            format!("{:.3}", ms(p.max)),
        ])?;
    }
    w.flush()?;
    Ok(())
}

/// An SVG line chart of `series` (name, colour, points) over seconds.
fn chart(title: &str, unit: &str, series: &[(&str, &str, Vec<f64>)]) -> String {
    let (w, h, pad) = (720.0, 220.0, 40.0);
    let n = series.iter().map(|s| s.2.len()).max().unwrap_or(0).max(2);
    let max = series
        .iter()
        .flat_map(|s| s.2.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let mut out = format!(
        "<figure><figcaption>{title}</figcaption><svg viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" role=\"img\" aria-label=\"{title}\">\
         <line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#888\"/><line x1=\"{pad}\" y1=\"10\" x2=\"{pad}\" y2=\"{}\" stroke=\"#888\"/>\
         <text x=\"2\" y=\"16\" font-size=\"11\">{max:.1} {unit}</text><text x=\"{pad}\" y=\"{}\" font-size=\"11\">0 s</text><text x=\"{}\" y=\"{}\" font-size=\"11\">{} s</text>",
        h - pad, w - 10.0, h - pad, h - pad, h - pad + 14.0, w - 40.0, h - pad + 14.0, n - 1
    );
    for (i, (name, colour, pts)) in series.iter().enumerate() {
        let mut path = String::new();
        for (x, y) in pts.iter().enumerate() {
            let px = pad + (w - pad - 10.0) * x as f64 / (n - 1) as f64;
            let py = (h - pad) - (h - pad - 10.0) * (y / max);
            let _ = write!(
                path,
                "{}{px:.1},{py:.1}",
                if path.is_empty() { "" } else { " " }
            );
        }
        let _ = write!(
            out,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{path}\"/><text x=\"{}\" y=\"{}\" font-size=\"11\" fill=\"{colour}\">{name}</text>",
            w - 160.0,
            20.0 + 14.0 * i as f64
        );
    }
    out.push_str("</svg></figure>");
    out
}

fn html(s: &Summary, windows: &[crate::ledger::Window]) -> String {
    let pcts: Vec<Pct> = windows.iter().map(|w| Pct::of(&w.deliver)).collect();
    let lat = chart(
        "Send→deliver latency per second",
        "ms",
        &[
            ("p50", "#1b7837", pcts.iter().map(|p| ms(p.p50)).collect()),
            ("p99", "#d95f02", pcts.iter().map(|p| ms(p.p99)).collect()),
            (
                "p99.9",
                "#7570b3",
                pcts.iter().map(|p| ms(p.p999)).collect(),
            ),
        ],
    );
    let thr = chart(
        "Throughput per second",
        "msgs/s",
        &[
            (
                "sent",
                "#1f78b4",
                windows.iter().map(|w| w.sent as f64).collect(),
            ),
            (
                "delivered",
                "#33a02c",
                windows.iter().map(|w| w.delivered as f64).collect(),
            ),
        ],
    );
    let conns = chart(
        "Connections",
        "conns",
        &[(
            "connections",
            "#444",
            windows.iter().map(|w| w.connections as f64).collect(),
        )],
    );
    let row = |name: &str, p: &Pct| {
        format!(
            "<tr><td>{name}</td><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td></tr>",
            p.count,
            ms(p.p50),
            ms(p.p90),
            ms(p.p99),
            ms(p.p999),
            ms(p.max)
        )
    };
    let storm = match (&s.storm_reconnect_us, &s.storm_catch_up_us) {
        (Some(r), Some(c)) => format!(
            "<p>Reconnect storm: {} devices dropped; reconnected p50 {:.1} ms / p99 {:.1} ms after the drop; backlog drained p50 {:.1} ms / p99 {:.1} ms after the drop.</p>",
            r.count,
            ms(r.p50),
            ms(r.p99),
            ms(c.p50),
            ms(c.p99)
        ),
        _ => String::new(),
    };
    let validity = match &s.invalid_reason {
        None => "<p class=\"ok\">Valid run: the generator kept its schedule.</p>".to_string(),
        Some(r) => format!("<p class=\"bad\">INVALID run: {r}</p>"),
    };
    let server = s
        .server
        .as_ref()
        .map(|f| format!("<p>Server: {} connections, {} KiB resident, {:.1} KiB per connection, {:.1} CPU µs per delivered message.</p>", f.connections, f.resident_kib, f.kib_per_connection, f.cpu_us_per_delivered))
        .unwrap_or_default();
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>chatsim load report {id}</title>\
<style>body{{font-family:sans-serif;max-width:780px;margin:2em auto;color:#222}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}figcaption{{font-weight:bold;margin-top:1em}}.bad{{color:#b00;font-weight:bold}}.ok{{color:#060}}</style></head><body>\
<h1>chatsim load report</h1><p>Run <code>{id}</code> against <code>{target}</code>: {users} users, {rate} msgs/s each, {secs:.0} s measured.</p>{validity}\
<p>Sent {sent} ({sps:.1}/s), delivered {delivered} of {expected} expected ({dps:.1}/s), acked {acked}, errors {errors}.</p>{server}{storm}\
<table><tr><th>measure</th><th>count</th><th>p50 ms</th><th>p90 ms</th><th>p99 ms</th><th>p99.9 ms</th><th>max ms</th></tr>{r1}{r2}{r3}</table>\
{lat}{thr}{conns}<p>Send→deliver is measured from the intended (scheduled) send time; \"raw\" from the actual send.</p></body></html>",
        id = s.run_id,
        target = s.target,
        users = s.users,
        rate = s.rate_per_user,
        secs = s.measured_s,
        sent = s.sent,
        sps = s.sent_per_s,
        delivered = s.delivered,
        expected = s.expected_deliveries,
        dps = s.delivered_per_s,
        acked = s.acked,
        errors = s.errors,
        r1 = row("send→deliver", &s.deliver_us),
        r2 = row("send→deliver (raw)", &s.deliver_raw_us),
        r3 = row("send→ack", &s.ack_us),
    )
}

#[cfg(test)]
mod verdict_tests {
    use super::{verdict, Evidence};
    use std::collections::BTreeMap;

    fn healthy(kinds: &BTreeMap<String, u64>) -> Evidence<'_> {
        Evidence {
            users: 100,
            lowest_connections: 100,
            sent: 1000,
            expected: 1000,
            delivered: 1000,
            errors: 0,
            max_errors: 0,
            errors_by_kind: kinds,
            slip_p99_us: 500,
            lag_p99_us: 500,
        }
    }

    #[test]
    fn a_clean_run_is_valid() {
        assert!(verdict(&healthy(&BTreeMap::new())).is_empty());
    }

    #[test]
    fn refused_tokens_dropped_connections_and_missing_messages_each_invalidate() {
        // The lies of issue 10: every connection refused; every connection dropped at the
        // start of the measured phase; 153 messages never delivered.
        let mut kinds = BTreeMap::new();
        kinds.insert("auth".to_string(), 4);
        let e = Evidence {
            errors: 4,
            sent: 0,
            expected: 0,
            delivered: 0,
            lowest_connections: 0,
            ..healthy(&kinds)
        };
        let r = verdict(&e).join("; ");
        assert!(r.contains("4 connections failed (4 refused at auth"), "{r}");
        assert!(r.contains("had 0 of the 100 connections"), "{r}");
        assert!(r.contains("nothing was sent"), "{r}");
        assert!(r.contains("4 errors (auth 4) over the budget of 0"), "{r}");
        let empty = BTreeMap::new();
        let lost = Evidence {
            sent: 6703,
            expected: 6703,
            delivered: 6550,
            ..healthy(&empty)
        };
        assert_eq!(
            verdict(&lost),
            vec!["153 of 6703 deliveries missing after the drain".to_string()]
        );
    }

    #[test]
    fn errors_within_the_budget_are_allowed() {
        let mut kinds = BTreeMap::new();
        kinds.insert("error 429".to_string(), 3);
        let e = Evidence {
            errors: 3,
            max_errors: 5,
            ..healthy(&kinds)
        };
        assert!(verdict(&e).is_empty());
    }
}

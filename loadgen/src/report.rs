//! The report of one run, in `reports/RUN/`: `timeseries.csv` (per second, server figures
//! included), `latency.csv` (percentiles), `deliver.hlog` (HdrHistogram interval log per
//! second: untagged send→deliver, tagged `ack`), `histograms.hlog` (the rest, whole),
//! `summary.json`, and `report.html`, a self-contained page with SVG charts (`charts`).

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
    /// Open connections late in the measured phase.
    pub connections: u64,
    /// Resident memory late in the measured phase.
    pub resident_kib: u64,
    /// Resident memory before this run opened any connection.
    #[serde(default)]
    pub baseline_kib: Option<u64>,
    /// Resident memory at the end of the idle phase, and the connections open then.
    #[serde(default)]
    pub idle_kib: Option<u64>,
    #[serde(default)]
    pub idle_connections: Option<u64>,
    /// (idle − baseline) / idle connections: what one connected, idle device costs the
    /// server. `None` when it could not be measured honestly (`memory_note` says why).
    pub kib_per_connection: Option<f64>,
    #[serde(default)]
    pub memory_note: Option<String>,
    /// Server CPU time per message it sent, over the measured phase (0: unknown).
    pub cpu_us_per_delivered: f64,
}

impl ServerFigures {
    /// One line on the server's memory: the figure and its basis, or why there is none.
    pub fn memory_line(&self) -> String {
        match (
            self.kib_per_connection,
            self.baseline_kib,
            self.idle_kib,
            self.idle_connections,
        ) {
            (Some(k), Some(b), Some(i), Some(n)) => format!(
                "{k:.1} KiB per connection (resident {b} KiB before any client, {i} KiB with \
                 {n} idle connections)"
            ),
            _ => format!(
                "KiB per connection not measured: {}",
                self.memory_note
                    .as_deref()
                    .unwrap_or("no idle-phase figures")
            ),
        }
    }
}

/// The server's `/metrics` read at the points of a run that its figures compare.
#[derive(Clone, Debug, Default)]
pub struct Scrapes {
    /// Before this run opened any connection.
    pub baseline: Option<Scrape>,
    /// At the end of the idle phase.
    pub idle: Option<Scrape>,
    /// At the start and late in the measured phase.
    pub measured: Option<(Scrape, Scrape)>,
}

/// The server's figures from `s`, for a run of `users` devices with an idle phase of
/// `idle_s` seconds; `None` when the target has no `/metrics`.
pub fn server_figures(s: &Scrapes, users: usize, idle_s: u64) -> Option<ServerFigures> {
    let (start, late) = s.measured.clone()?;
    let out = late.messages_out.saturating_sub(start.messages_out);
    let cpu = if out > 0 {
        late.cpu_us.saturating_sub(start.cpu_us) as f64 / out as f64
    } else {
        0.0
    };
    let mut f = ServerFigures {
        connections: late.connections,
        resident_kib: late.rss_bytes / 1024,
        baseline_kib: s.baseline.as_ref().map(|b| b.rss_bytes / 1024),
        idle_kib: s.idle.as_ref().map(|i| i.rss_bytes / 1024),
        idle_connections: s.idle.as_ref().map(|i| i.connections),
        kib_per_connection: None,
        memory_note: None,
        cpu_us_per_delivered: cpu,
    };
    f.memory_note = match (&s.baseline, &s.idle) {
        _ if idle_s == 0 => Some("--idle 0 skipped the idle phase".into()),
        (Some(b), _) if b.connections_opened > 0 => Some(format!(
            "the server had accepted {} connection{} before this run (a probe with a wrong \
             secret counts), and an allocator does not hand freed memory back, so its growth \
             would understate the cost; restart the server for this figure",
            b.connections_opened,
            if b.connections_opened == 1 { "" } else { "s" }
        )),
        (Some(_), Some(i)) if (i.connections as usize) < users => Some(format!(
            "only {} of {users} devices were connected in the idle phase",
            i.connections
        )),
        (Some(b), Some(i)) => {
            f.kib_per_connection = Some(
                i.rss_bytes.saturating_sub(b.rss_bytes) as f64 / 1024.0 / i.connections as f64,
            );
            None
        }
        _ => Some("/metrics could not be read before the run or in the idle phase".into()),
    };
    Some(f)
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
    /// Send→deliver in two hops, split at the server's own commit timestamp (whole ms, same
    /// machine's clock): actual send → commit, commit → received by the recipient.
    #[serde(default)]
    pub send_to_commit_us: Pct,
    #[serde(default)]
    pub commit_to_receive_us: Pct,
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
    /// Wall-clock time (Unix ms) of second 0 of timeseries.csv and deliver.hlog, and of the
    /// measured phase [from, until): what `report merge` aligns runs by.
    #[serde(default)]
    pub start_unix_ms: u64,
    #[serde(default)]
    pub measured_from_unix_ms: u64,
    #[serde(default)]
    pub measured_until_unix_ms: u64,
    /// Idle phase (every device connected, nothing sent) before the measured phase, s.
    #[serde(default)]
    pub idle_s: u64,
    /// Idle devices asked for (`--idle-devices`), besides the `users` that send.
    #[serde(default)]
    pub idle_devices: usize,
    /// Settings not given above: ramp, reconnect storm, typing, error budget.
    #[serde(default)]
    pub ramp_s: u64,
    #[serde(default)]
    pub storm_at_s: Option<u64>,
    #[serde(default)]
    pub typing_per_s: f64,
    #[serde(default)]
    pub max_errors: u64,
    /// Each `--fail-if` condition and its outcome on this run.
    #[serde(default)]
    pub fail_if: Vec<FailIfOutcome>,
    /// Send→deliver `(quantile, µs)` over the measured phase, for the distribution plot.
    #[serde(default)]
    pub deliver_distribution_us: Vec<(f64, u64)>,
    #[serde(default)]
    pub generator: GeneratorFigures,
    /// For a merged report: how the runs were combined, and each run's measured window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<MergeInfo>,
}

/// One `--fail-if` condition judged on a run.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FailIfOutcome {
    pub condition: String,
    pub actual: f64,
    /// True when the condition holds, which fails the run.
    pub holds: bool,
}

/// Judges `conditions` (parsed once already by the caller, which refuses bad ones) on `s`.
pub fn judge_fail_if(s: &Summary, conditions: &[String]) -> Vec<FailIfOutcome> {
    conditions
        .iter()
        .filter_map(|c| crate::fail_if::Condition::parse(c).ok().map(|p| (c, p)))
        .map(|(c, p)| FailIfOutcome {
            condition: c.clone(),
            actual: p.actual(s),
            holds: p.holds(s),
        })
        .collect()
}

/// What the generator itself cost, from its own resident memory.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct GeneratorFigures {
    /// Idle devices (`--idle-devices`) that connected.
    pub idle_devices_connected: usize,
    /// Resident memory before the idle fleet opened and with all of it connected, KiB.
    pub rss_before_fleet_kib: Option<u64>,
    pub rss_with_fleet_kib: Option<u64>,
    /// (with − before) / connected idle devices.
    pub kib_per_idle_device: Option<f64>,
    /// Resident memory at the end of the run (Goose users included), KiB.
    pub rss_end_kib: Option<u64>,
}

/// How a merged report combined its runs.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MergeInfo {
    /// `concurrent`: the measured windows share at least half of the shortest, rates are
    /// the sum of each run's; `sequential`: they do not, rates are over the sum of the
    /// windows.
    pub kind: String,
    /// Seconds during which every run was in its measured phase.
    #[serde(default)]
    pub overlap_s: f64,
    pub runs: Vec<RunWindow>,
}

impl MergeInfo {
    /// What the merged rates are over, in words.
    pub fn rate_basis(&self) -> &'static str {
        if self.kind == "concurrent" {
            "rates over the seconds every run was measuring in"
        } else {
            "rates over the sum of their measured windows"
        }
    }
}

/// One merged run's measured window.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct RunWindow {
    pub run_id: String,
    pub target: String,
    pub from_unix_ms: u64,
    pub until_unix_ms: u64,
    pub valid: bool,
}

/// One second of a report's charts and timeseries.csv.
#[derive(Clone, Debug, Default)]
pub struct Row {
    pub connections: i64,
    pub sent: u64,
    pub delivered: u64,
    pub acked: u64,
    pub deliver: Pct,
    pub ack: Pct,
    pub errors: u64,
    /// The server's `/metrics` in this second, when scraped.
    pub server: Option<ServerSecond>,
}

/// The server in one second of the run, from `/metrics` scraped every second.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServerSecond {
    /// CPU time used in this second, as a share of one core (100 = one core busy).
    pub cpu_pct: f64,
    pub rss_kib: u64,
    pub queue_frames: u64,
    pub connections: u64,
}

/// Per-second server rows from scrapes taken about once a second: `(seconds since the
/// start of the run, scrape)`; CPU is over the real time between two scrapes.
pub fn server_seconds(samples: &[(f64, Scrape)], len: usize) -> Vec<Option<ServerSecond>> {
    let mut out = vec![None; len];
    for pair in samples.windows(2) {
        let ((t0, a), (t1, b)) = (&pair[0], &pair[1]);
        let sec = *t1 as usize;
        let secs = t1 - t0;
        if secs <= 0.05 || sec >= len {
            continue;
        }
        out[sec] = Some(ServerSecond {
            cpu_pct: b.cpu_us.saturating_sub(a.cpu_us) as f64 / 1e6 / secs * 100.0,
            rss_kib: b.rss_bytes / 1024,
            queue_frames: b.queue_frames,
            connections: b.connections,
        });
    }
    out
}

/// Histograms written whole to `histograms.hlog` (one tagged interval each over the
/// measured phase), so `report merge` adds every one of them exactly.
pub const TAGGED: [&str; 8] = [
    "deliver_raw",
    "ack",
    "schedule_slip",
    "event_loop_lag",
    "storm_reconnect",
    "storm_catch_up",
    "send_to_commit",
    "commit_to_receive",
];

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
    /// Senders asked for, and those that connected and finished their set-up.
    pub senders: u64,
    pub ready_senders: u64,
    /// Seconds of the measured phase asked for, and seconds that have a window.
    pub duration_s: u64,
    pub measured_windows: u64,
    /// Sends the open-loop schedule called for in the measured phase.
    pub scheduled: u64,
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
    if e.ready_senders < e.senders {
        out.push(format!(
            "{} of {} senders never finished connecting and setting up",
            e.senders - e.ready_senders,
            e.senders
        ));
    }
    if e.measured_windows < e.duration_s {
        out.push(format!(
            "the measured phase was cut short: {} of {} s",
            e.measured_windows, e.duration_s
        ));
    }
    if e.sent == 0 {
        out.push("nothing was sent in the measured phase".into());
    } else if (e.sent + e.senders) * 100 < e.scheduled * 95 {
        out.push(format!(
            "only {} of the {} sends scheduled in the measured phase went out",
            e.sent, e.scheduled
        ));
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
    /// Connections the server has accepted since it started.
    pub connections_opened: u64,
    /// Frames waiting in every outbound queue.
    pub queue_frames: u64,
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
    parse_scrape(url, &body)
}

/// The chat service's figures from a Prometheus text page; an error when the page lacks
/// them (a gateway node's page, another server's), never zeros in their place.
pub fn parse_scrape(url: &str, body: &str) -> anyhow::Result<Scrape> {
    let find = |name: &str| -> Option<u64> {
        body.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
    };
    // A page without the chat service's own figures (a gateway node's, another server's)
    // measures nothing: never read its absence as zero.
    for name in [
        "chatsim_messages_out_total",
        "chatsim_process_cpu_microseconds_total",
        "chatsim_process_resident_bytes",
    ] {
        anyhow::ensure!(
            find(name).is_some(),
            "{url} has no {name}: not the chat service's metrics"
        );
    }
    let get = |name: &str| find(name).unwrap_or(0);
    Ok(Scrape {
        connections: get("chatsim_connections"),
        rss_bytes: get("chatsim_process_resident_bytes"),
        cpu_us: get("chatsim_process_cpu_microseconds_total"),
        messages_out: get("chatsim_messages_out_total"),
        connections_opened: get("chatsim_connections_opened_total"),
        queue_frames: get("chatsim_outbound_queue_frames"),
    })
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Writes every report file and returns the summary.
pub fn write(
    shared: &Shared,
    cfg: &LoadConfig,
    scrapes: &Scrapes,
    generator: &GeneratorFigures,
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
    let samples = shared
        .server_samples
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let per_second = server_seconds(&samples, windows.len());
    let rows: Vec<Row> = windows
        .iter()
        .zip(per_second)
        .map(|(w, server)| Row {
            connections: w.connections,
            sent: w.sent,
            delivered: w.delivered,
            acked: w.acked,
            deliver: Pct::of(&w.deliver),
            ack: Pct::of(&w.ack),
            errors: w.errors,
            server,
        })
        .collect();
    write_timeseries(dir, &rows)?;
    // deliver.hlog: one interval per measured second.
    let start = std::time::SystemTime::now() - shared.start.elapsed();
    let start_unix_ms = start
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    {
        let mut f = std::fs::File::create(dir.join("deliver.hlog"))?;
        let mut ser = V2DeflateSerializer::new();
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
            // The same second's send→ack, tagged, for merged per-second ack charts.
            log.write_histogram(
                &w.ack,
                Duration::from_secs(*i as u64),
                Duration::from_secs(1),
                hdrhistogram::serialization::interval_log::Tag::new("ack"),
            )
            .map_err(|e| anyhow::anyhow!("writing deliver.hlog: {e}"))?;
        }
    }
    let lock = |m: &std::sync::Mutex<Histogram<u64>>| {
        Pct::of(&m.lock().unwrap_or_else(|p| p.into_inner()))
    };
    // histograms.hlog: every other histogram, whole, one tagged interval each.
    {
        let whole = [
            &shared.deliver_raw,
            &shared.ack,
            &shared.slip,
            &shared.lag,
            &shared.storm_reconnect,
            &shared.storm_catch_up,
            &shared.to_commit,
            &shared.commit_to_receive,
        ];
        let mut f = std::fs::File::create(dir.join("histograms.hlog"))?;
        let mut ser = V2DeflateSerializer::new();
        let mut log = IntervalLogWriterBuilder::new()
            .add_comment(&format!(
                "chatsim load run {}: whole-run histograms by tag (µs)",
                cfg.run_id
            ))
            .with_start_time(start)
            .with_base_time(start)
            .begin_log_with(&mut f, &mut ser)?;
        for (tag, h) in TAGGED.iter().zip(whole) {
            let h = h.lock().unwrap_or_else(|p| p.into_inner());
            log.write_histogram(
                &h,
                Duration::from_secs(from_s as u64),
                cfg.duration,
                hdrhistogram::serialization::interval_log::Tag::new(tag),
            )
            .map_err(|e| anyhow::anyhow!("writing histograms.hlog: {e}"))?;
        }
    }
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
        users: (cfg.users + cfg.idle_devices) as i64,
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
        senders: cfg.users as u64,
        ready_senders: shared.ready.load(Ordering::Relaxed) as u64,
        duration_s: cfg.duration.as_secs(),
        measured_windows: measured.len() as u64,
        scheduled: (cfg.users as f64 * cfg.rate_per_user * cfg.duration.as_secs_f64()) as u64,
    });
    let invalid_reason = (!reasons.is_empty()).then(|| reasons.join("; "));
    let server = server_figures(scrapes, cfg.users + cfg.idle_devices, cfg.idle.as_secs());
    let summary = Summary {
        run_id: cfg.run_id.clone(),
        target: std::iter::once(&cfg.target)
            .chain(&cfg.gateways)
            .cloned()
            .collect::<Vec<_>>()
            .join(" "),
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
        send_to_commit_us: lock(&shared.to_commit),
        commit_to_receive_us: lock(&shared.commit_to_receive),
        schedule_slip_us: slip,
        event_loop_lag_us: lag,
        valid: invalid_reason.is_none(),
        invalid_reason,
        server,
        storm_reconnect_us: cfg.storm_at.map(|_| lock(&shared.storm_reconnect)),
        storm_catch_up_us: cfg.storm_at.map(|_| lock(&shared.storm_catch_up)),
        start_unix_ms,
        measured_from_unix_ms: start_unix_ms + from_s as u64 * 1000,
        measured_until_unix_ms: start_unix_ms
            + from_s as u64 * 1000
            + cfg.duration.as_millis() as u64,
        idle_s: cfg.idle.as_secs(),
        idle_devices: cfg.idle_devices,
        generator: generator.clone(),
        merge: None,
        ramp_s: cfg.ramp.as_secs(),
        storm_at_s: cfg.storm_at.map(|d| d.as_secs()),
        typing_per_s: cfg.typing_per_sec,
        max_errors: cfg.max_errors,
        fail_if: Vec::new(),
        deliver_distribution_us: distribution(&deliver),
    };
    let mut summary = summary;
    summary.fail_if = judge_fail_if(&summary, &cfg.fail_if);
    write_latency_csv(dir, &summary)?;
    std::fs::write(
        dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?,
    )?;
    std::fs::write(dir.join("report.html"), html(&summary, &rows))?;
    Ok(summary)
}

/// `timeseries.csv`: one row per second of the run. Rows are seconds of intended send
/// time; delivered/acked/percentiles describe the messages sent in that second.
pub fn write_timeseries(dir: &std::path::Path, rows: &[Row]) -> anyhow::Result<()> {
    let mut ts = csv::Writer::from_path(dir.join("timeseries.csv"))?;
    ts.write_record([
        "second",
        "connections",
        "sent",
        "delivered",
        "acked",
        "p50_deliver_ms",
        "p99_deliver_ms",
        "p999_deliver_ms",
        "p99_ack_ms",
        "errors",
        "server_cpu_pct",
        "server_rss_kib",
        "server_queue_frames",
    ])?;
    for (i, r) in rows.iter().enumerate() {
        let sv = |f: &dyn Fn(&ServerSecond) -> String| r.server.as_ref().map(f).unwrap_or_default();
        ts.write_record([
            i.to_string(),
            r.connections.to_string(),
            r.sent.to_string(),
            r.delivered.to_string(),
            r.acked.to_string(),
            format!("{:.3}", ms(r.deliver.p50)),
            format!("{:.3}", ms(r.deliver.p99)),
            format!("{:.3}", ms(r.deliver.p999)),
            format!("{:.3}", ms(r.ack.p99)),
            r.errors.to_string(),
            sv(&|s| format!("{:.1}", s.cpu_pct)),
            sv(&|s| s.rss_kib.to_string()),
            sv(&|s| s.queue_frames.to_string()),
        ])?;
    }
    ts.flush()?;
    Ok(())
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
        ("send_to_commit", &s.send_to_commit_us),
        ("commit_to_receive", &s.commit_to_receive_us),
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

/// report.html: the verdict, the settings, the percentile table and per-second charts of
/// `rows` (a self-contained page: inline SVG, no script, no network).
pub fn html(s: &Summary, rows: &[Row]) -> String {
    use crate::charts::{distribution_chart, line_chart, Frame, Series};
    let from = s.measured_from_s as usize;
    let frame = Frame {
        measured: Some((from, from + s.measured_s.round() as usize)),
        markers: s
            .storm_at_s
            .map(|t| vec![(t as usize, "reconnect storm".to_string())])
            .unwrap_or_default(),
    };
    let col = |f: &dyn Fn(&Row) -> Option<f64>| rows.iter().map(f).collect::<Vec<_>>();
    // Seconds with no message sent have no latency: leave a gap rather than draw zero.
    let lat = |f: fn(&Pct) -> u64, ack: bool| {
        col(&move |r: &Row| {
            let p = if ack { &r.ack } else { &r.deliver };
            (p.count > 0).then(|| ms(f(p)))
        })
    };
    let mut charts = vec![
        line_chart(
            "Send→deliver latency, by second of intended send",
            "ms",
            &[
                Series {
                    name: "p50",
                    colour: "#1b7837",
                    points: lat(|p| p.p50, false),
                },
                Series {
                    name: "p99",
                    colour: "#d95f02",
                    points: lat(|p| p.p99, false),
                },
                Series {
                    name: "p99.9",
                    colour: "#7570b3",
                    points: lat(|p| p.p999, false),
                },
            ],
            &frame,
        ),
        line_chart(
            "Send→ack latency (the server's commit), p99 by second of intended send",
            "ms",
            &[Series {
                name: "ack p99",
                colour: "#e7298a",
                points: lat(|p| p.p99, true),
            }],
            &frame,
        ),
        line_chart(
            "Throughput",
            "msgs/s",
            &[
                Series {
                    name: "sent",
                    colour: "#1f78b4",
                    points: col(&|r: &Row| Some(r.sent as f64)),
                },
                Series {
                    name: "delivered",
                    colour: "#33a02c",
                    points: col(&|r: &Row| Some(r.delivered as f64)),
                },
            ],
            &frame,
        ),
        line_chart(
            "Errors per second (when they happened)",
            "errors/s",
            &[Series {
                name: "errors",
                colour: "#b00",
                points: col(&|r: &Row| Some(r.errors as f64)),
            }],
            &frame,
        ),
        line_chart(
            "Connections open (generator side)",
            "connections",
            &[Series {
                name: "connections",
                colour: "#444",
                points: col(&|r: &Row| Some(r.connections as f64)),
            }],
            &frame,
        ),
    ];
    if rows.iter().any(|r| r.server.is_some()) {
        let sv = |f: fn(&ServerSecond) -> f64| col(&move |r: &Row| r.server.as_ref().map(f));
        charts.push(line_chart(
            "Server CPU (/metrics every second)",
            "% of one core",
            &[Series {
                name: "CPU",
                colour: "#a6761d",
                points: sv(|s| s.cpu_pct),
            }],
            &frame,
        ));
        charts.push(line_chart(
            "Server resident memory",
            "MiB",
            &[Series {
                name: "RSS",
                colour: "#666",
                points: sv(|s| s.rss_kib as f64 / 1024.0),
            }],
            &frame,
        ));
        charts.push(line_chart(
            "Server outbound queues",
            "frames waiting",
            &[Series {
                name: "queued",
                colour: "#1f78b4",
                points: sv(|s| s.queue_frames as f64),
            }],
            &frame,
        ));
    }
    if !s.deliver_distribution_us.is_empty() {
        charts.push(distribution_chart(
            "Send→deliver percentile distribution (measured phase, HdrHistogram)",
            &s.deliver_distribution_us,
        ));
    }
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
        None => "<p class=\"ok\">Valid run: every connection held, every message delivered, errors within the budget, and the generator kept its schedule.</p>".to_string(),
        Some(r) => format!("<p class=\"bad\">INVALID run: {}</p>", esc(r)),
    };
    let mut fail_if = String::new();
    for f in &s.fail_if {
        let _ = write!(
            fail_if,
            "<li class=\"{}\"><code>--fail-if '{}'</code>: actual {:.3}, {}</li>",
            if f.holds { "bad" } else { "ok" },
            esc(&f.condition),
            f.actual,
            if f.holds { "FAILS the run" } else { "passes" }
        );
    }
    if !fail_if.is_empty() {
        fail_if = format!(
            "<ul>{fail_if}</ul>{}",
            if s.valid {
                ""
            } else {
                "<p class=\"bad\">The run is INVALID, so it fails whatever these conditions say: its figures are not the server's.</p>"
            }
        );
    }
    let merged = match &s.merge {
        Some(m) => {
            let mut li = String::new();
            for r in &m.runs {
                let _ = write!(
                    li,
                    "<li><code>{}</code> against <code>{}</code>: measured {} to {}{}</li>",
                    esc(&r.run_id),
                    esc(&r.target),
                    crate::merge::utc(r.from_unix_ms),
                    crate::merge::utc(r.until_unix_ms),
                    if r.valid { "" } else { " (INVALID)" }
                );
            }
            format!(
                "<p>Merged {} {} runs, overlapping for {:.1} s ({}); charts are by wall-clock second from the earliest start; the server's per-second charts are in each run's own report.</p><ul>{li}</ul>",
                m.runs.len(),
                m.kind,
                m.overlap_s,
                m.rate_basis()
            )
        }
        None => "<p>Goose's own report, <code>goose.md</code>, counts the whole run (ramp, idle phase, warm-up and drain); the figures here count only the measured phase.</p>".to_string(),
    };
    let server = s
        .server
        .as_ref()
        .map(|f| format!("<p>Server: {} connections, {} KiB resident late in the measured phase, {:.1} CPU µs per delivery, i.e. per message copy sent to a device (measured phase). Memory: {}.</p>", f.connections, f.resident_kib, f.cpu_us_per_delivered, esc(&f.memory_line())))
        .unwrap_or_default();
    let settings = format!(
        "<p>Settings: {} senders at {} msgs/s each{}, {}; ramp {} s, idle phase {} s, 1 s warm-up, {:.0} s measured{}{}; error budget {}.</p>",
        s.users,
        s.rate_per_user,
        if s.idle_devices > 0 {
            let g = &s.generator;
            format!(
                " and {} idle devices ({} connected{})",
                s.idle_devices,
                g.idle_devices_connected,
                g.kib_per_idle_device
                    .map(|k| format!(", {k:.1} KiB of generator memory each"))
                    .unwrap_or_default()
            )
        } else {
            String::new()
        },
        if s.group_size >= 2 {
            format!("groups of {}", s.group_size)
        } else {
            "1:1 pairs".into()
        },
        s.ramp_s,
        s.idle_s,
        s.measured_s,
        s.storm_at_s
            .map(|t| format!(", reconnect storm at {t} s"))
            .unwrap_or_default(),
        if s.typing_per_s > 0.0 {
            format!(", {} typing notices/s each", s.typing_per_s)
        } else {
            String::new()
        },
        s.max_errors
    );
    let kinds = if s.errors_by_kind.is_empty() {
        String::new()
    } else {
        format!(
            " ({})",
            s.errors_by_kind
                .iter()
                .map(|(k, n)| format!("{} {n}", esc(k)))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>chatsim load report {id}</title>\
<style>body{{font-family:sans-serif;max-width:800px;margin:2em auto;color:#222}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}figcaption{{font-weight:bold;margin-top:1em}}.bad{{color:#b00;font-weight:bold}}.ok{{color:#060}}</style></head><body>\
<h1>chatsim load report</h1><p>Run <code>{id}</code> against <code>{target}</code>.</p>{validity}{fail_if}{settings}\
<p>Sent {sent} ({sps:.1}/s), delivered {delivered} of {expected} expected ({dps:.1}/s), acked {acked}, errors {errors}{kinds}.</p>{merged}{server}{storm}\
<table><tr><th>measure</th><th>count</th><th>p50 ms</th><th>p90 ms</th><th>p99 ms</th><th>p99.9 ms</th><th>max ms</th></tr>{r1}{r2}{r3}{r4}{r5}</table>\
<p>The last two rows split send→deliver at the server's commit timestamp: it is its own clock truncated to whole milliseconds twice, so each hop is uncertain by up to 2 ms; read them only when the hops are well above that (under load).</p>\
{charts}<p>Send→deliver is measured from the intended (scheduled) send time; \"raw\" from the actual send. Grey: seconds outside the measured phase (ramp, idle phase, warm-up; drain), left out of each chart's scale.</p></body></html>",
        id = esc(&s.run_id),
        target = esc(&s.target),
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
        r4 = row("send→commit (server stamp)", &s.send_to_commit_us),
        r5 = row("commit→received", &s.commit_to_receive_us),
        charts = charts.join(""),
    )
}

/// HTML-escapes text from a run (ids, reasons).
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `(quantile, µs)` points of `h` for the percentile-distribution plot.
pub fn distribution(h: &Histogram<u64>) -> Vec<(f64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    // Quantiles evenly spaced on the log scale of 1/(1-q), up to five nines.
    for k in 0..=50 {
        let q = 1.0 - 10f64.powf(-(k as f64) / 10.0);
        out.push((q, h.value_at_quantile(q)));
    }
    out
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
            senders: 100,
            ready_senders: 100,
            duration_s: 10,
            measured_windows: 10,
            scheduled: 1000,
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
    fn senders_lost_in_set_up_and_a_cut_short_phase_invalidate() {
        let empty = BTreeMap::new();
        let e = Evidence {
            ready_senders: 97,
            measured_windows: 7,
            sent: 700,
            expected: 700,
            delivered: 700,
            ..healthy(&empty)
        };
        let r = verdict(&e).join("; ");
        assert!(r.contains("3 of 100 senders never finished"), "{r}");
        assert!(r.contains("cut short: 7 of 10 s"), "{r}");
        assert!(r.contains("only 700 of the 1000 sends"), "{r}");
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

#[cfg(test)]
mod scrape_tests {
    use super::parse_scrape;

    #[test]
    fn a_page_without_the_chat_services_figures_measures_nothing() {
        let gateway = "chatsim_gateway_connections 7\nchatsim_gateway_chat_link_up 1\n";
        assert!(parse_scrape("http://gw/metrics", gateway).is_err());
        let chat = "chatsim_connections 7\nchatsim_messages_out_total 40\n\
                    chatsim_process_cpu_microseconds_total 900\nchatsim_process_resident_bytes 4096\n";
        let s = parse_scrape("http://chat/metrics", chat).expect("chat page");
        assert_eq!((s.connections, s.messages_out, s.cpu_us), (7, 40, 900));
    }
}

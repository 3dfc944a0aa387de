//! `chatsim report merge RUN...`: combines runs from several generator processes or
//! machines exactly: it adds their HdrHistogram logs (never averages percentiles), sums
//! their counts second by second of wall-clock time, and writes a full report.
//!
//! Runs are merged only when that means something: concurrent runs (every run measuring
//! together for at least half of the shortest window) give rates over those shared seconds
//! only; runs taken one after another are refused unless `sequential` is asked for,
//! and then rates are over the sum of their windows, each window listed. The same run
//! twice is refused.

use crate::report::{MergeInfo, Pct, Row, RunWindow, ServerFigures, Summary, TAGGED};
use base64::Engine;
use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
use hdrhistogram::serialization::Deserializer;
use hdrhistogram::Histogram;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn hist() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?)
}

/// One interval of an interval log: its tag, start offset in whole seconds, histogram.
type Interval = (Option<String>, u64, Histogram<u64>);

/// Every interval of an interval log.
fn intervals(path: &Path) -> anyhow::Result<Vec<Interval>> {
    let text = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut de = Deserializer::new();
    let mut out = Vec::new();
    for entry in IntervalLogIterator::new(&text) {
        let entry =
            entry.map_err(|e| anyhow::anyhow!("{}: bad interval log: {e:?}", path.display()))?;
        if let LogEntry::Interval(ilh) = entry {
            let raw = base64::engine::general_purpose::STANDARD.decode(ilh.encoded_histogram())?;
            let h: Histogram<u64> = de
                .deserialize(&mut raw.as_slice())
                .map_err(|e| anyhow::anyhow!("{}: bad histogram: {e:?}", path.display()))?;
            out.push((
                ilh.tag().map(|t| t.as_str().to_string()),
                ilh.start_timestamp().as_secs(),
                h,
            ));
        }
    }
    Ok(out)
}

/// Reads every send→deliver (untagged) interval of `RUN/deliver.hlog` into one histogram.
pub fn read_hlog(path: &Path) -> anyhow::Result<Histogram<u64>> {
    let mut total = hist()?;
    for (tag, _, h) in intervals(path)? {
        if tag.is_none() {
            total.add(&h)?;
        }
    }
    Ok(total)
}

/// One run as read from its directory.
struct Run {
    dir: PathBuf,
    s: Summary,
    /// timeseries.csv rows: (connections, sent, delivered, acked).
    rows: Vec<(i64, u64, u64, u64)>,
    /// deliver.hlog by second of the run: send→deliver, and send→ack (tagged `ack`).
    deliver: Vec<(u64, Histogram<u64>)>,
    ack: Vec<(u64, Histogram<u64>)>,
    /// Errors per second (timeseries.csv's `errors`, absent in older reports).
    errors: Vec<u64>,
    tagged: BTreeMap<String, Histogram<u64>>,
}

fn read_run(dir: &Path) -> anyhow::Result<Run> {
    let path = dir.join("summary.json");
    let raw = std::fs::read(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let s: Summary = serde_json::from_slice(&raw)
        .map_err(|e| anyhow::anyhow!("{}: not a load summary: {e}", path.display()))?;
    anyhow::ensure!(
        s.measured_from_unix_ms > 0 && s.merge.is_none(),
        "{}: {}",
        path.display(),
        if s.merge.is_some() {
            "is itself a merged report; merge the original runs instead"
        } else {
            "has no wall-clock measured window (written by an older chatsim); re-run it"
        }
    );
    let ts = dir.join("timeseries.csv");
    let mut rdr =
        csv::Reader::from_path(&ts).map_err(|e| anyhow::anyhow!("{}: {e}", ts.display()))?;
    let errors_col = rdr
        .headers()
        .ok()
        .and_then(|h| h.iter().position(|c| c == "errors"));
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.map_err(|e| anyhow::anyhow!("{}: {e}", ts.display()))?;
        let f = |k: usize| -> anyhow::Result<i64> {
            rec.get(k).and_then(|v| v.parse().ok()).ok_or_else(|| {
                anyhow::anyhow!(
                    "{} line {}: column {k} is not a number",
                    ts.display(),
                    i + 2
                )
            })
        };
        rows.push((f(1)?, f(2)? as u64, f(3)? as u64, f(4)? as u64));
        errors.push(match errors_col {
            Some(k) => f(k)? as u64,
            None => 0,
        });
    }
    let (mut deliver, mut ack) = (Vec::new(), Vec::new());
    for (tag, t, h) in intervals(&dir.join("deliver.hlog"))? {
        match tag.as_deref() {
            None => deliver.push((t, h)),
            Some("ack") => ack.push((t, h)),
            Some(_) => {}
        }
    }
    let hp = dir.join("histograms.hlog");
    anyhow::ensure!(
        hp.exists(),
        "{}: missing (written by an older chatsim), so its ack and health histograms cannot \
         be merged; re-run it",
        hp.display()
    );
    let mut tagged = BTreeMap::new();
    for (tag, _, h) in intervals(&hp)? {
        if let Some(t) = tag {
            tagged.insert(t, h);
        }
    }
    Ok(Run {
        dir: dir.to_path_buf(),
        s,
        rows,
        deliver,
        ack,
        errors,
        tagged,
    })
}

/// Server figures of the merge: per distinct server (target), the figures of the run that
/// saw the most connections (runs against one server scrape the same process); across
/// servers, sums and weighted means.
fn merge_servers(runs: &[Run]) -> Option<ServerFigures> {
    let mut by_target: BTreeMap<&str, (&ServerFigures, u64)> = BTreeMap::new();
    let mut runs_per_target: BTreeMap<&str, usize> = BTreeMap::new();
    for r in runs {
        *runs_per_target.entry(r.s.target.as_str()).or_default() += 1;
    }
    for r in runs {
        let Some(f) = &r.s.server else { continue };
        let e = by_target.entry(r.s.target.as_str()).or_insert((f, 0));
        // Prefer a run with a memory figure, then the one that saw the most connections.
        let key = |f: &ServerFigures| (f.kib_per_connection.is_some(), f.connections);
        if key(f) > key(e.0) {
            e.0 = f;
        }
        e.1 += r.s.delivered;
    }
    if by_target.is_empty() {
        return None;
    }
    // Several runs loading one server each kept their own phases: its idle-phase reading
    // may have come while another run was still connecting or already sending.
    let shared_server = |t: &str| runs_per_target.get(t).copied().unwrap_or(0) > 1;
    let strip = |f: &ServerFigures, t: &str| {
        let mut f = f.clone();
        if shared_server(t) && f.kib_per_connection.is_some() {
            f.kib_per_connection = None;
            f.memory_note = Some(format!(
                "{} generator runs loaded {t}, each with its own idle phase, so no reading \
                 was taken with all of them idle; give each server one run",
                runs_per_target[t]
            ));
        }
        f
    };
    let stripped: Vec<(ServerFigures, u64)> = by_target
        .iter()
        .map(|(t, (f, d))| (strip(f, t), *d))
        .collect();
    if stripped.len() == 1 {
        return stripped.into_iter().next().map(|(f, _)| f);
    }
    let figs: Vec<(&ServerFigures, u64)> = stripped.iter().map(|(f, d)| (f, *d)).collect();
    let sum = |g: &dyn Fn(&ServerFigures) -> Option<u64>| -> Option<u64> {
        figs.iter().map(|(f, _)| g(f)).sum()
    };
    let delivered: u64 = figs.iter().map(|(_, d)| d).sum();
    let mut m = ServerFigures {
        connections: figs.iter().map(|(f, _)| f.connections).sum(),
        resident_kib: figs.iter().map(|(f, _)| f.resident_kib).sum(),
        baseline_kib: sum(&|f| f.baseline_kib),
        idle_kib: sum(&|f| f.idle_kib),
        idle_connections: sum(&|f| f.idle_connections),
        kib_per_connection: None,
        memory_note: None,
        cpu_us_per_delivered: if figs.iter().all(|(f, _)| f.cpu_us_per_delivered > 0.0) {
            figs.iter()
                .map(|(f, d)| f.cpu_us_per_delivered * *d as f64)
                .sum::<f64>()
                / delivered.max(1) as f64
        } else {
            0.0
        },
    };
    if figs.iter().all(|(f, _)| f.kib_per_connection.is_some()) {
        if let (Some(b), Some(i), Some(n)) = (m.baseline_kib, m.idle_kib, m.idle_connections) {
            m.kib_per_connection = Some(i.saturating_sub(b) as f64 / n.max(1) as f64);
        }
    } else {
        m.memory_note = Some(format!(
            "not every one of the {} servers has an idle-phase figure ({})",
            figs.len(),
            figs.iter()
                .filter_map(|(f, _)| f.memory_note.as_deref())
                .next()
                .unwrap_or("")
        ));
    }
    Some(m)
}

/// Merges runs into `out`: summary.json, latency.csv, timeseries.csv, deliver.hlog's union
/// as figures, and report.html. `sequential` allows runs whose windows do not overlap.
pub fn merge(runs: &[&Path], out: &Path, sequential: bool) -> anyhow::Result<Summary> {
    anyhow::ensure!(
        runs.len() >= 2,
        "name at least two run directories to merge"
    );
    merge_with(runs, out, sequential, &[], &[], None)
}

/// [`merge`], with reasons the merged run is invalid beyond its runs' own (a shard that
/// wrote no report) and `--fail-if` conditions to judge on the merged figures; one run is
/// allowed.
pub fn merge_with(
    runs: &[&Path],
    out: &Path,
    sequential: bool,
    extra_invalid: &[String],
    fail_if: &[String],
    max_errors: Option<u64>,
) -> anyhow::Result<Summary> {
    anyhow::ensure!(!runs.is_empty(), "name at least one run directory");
    let runs: Vec<Run> = runs.iter().map(|d| read_run(d)).collect::<Result<_, _>>()?;
    for (i, a) in runs.iter().enumerate() {
        for b in &runs[..i] {
            anyhow::ensure!(
                a.s.run_id != b.s.run_id,
                "{} and {} are the same run ({}): merging it twice would count it twice",
                b.dir.display(),
                a.dir.display(),
                a.s.run_id
            );
        }
    }
    let shortest = runs
        .iter()
        .map(|r| r.s.measured_until_unix_ms - r.s.measured_from_unix_ms)
        .min()
        .unwrap_or(0);
    // Measured seconds of each run on the merged timeline (whole seconds from the earliest
    // start), and the seconds every run was measuring in.
    let t0 = runs.iter().map(|r| r.s.start_unix_ms).min().unwrap_or(0);
    let offset = |r: &Run| ((r.s.start_unix_ms - t0) as f64 / 1000.0).round() as usize;
    let span = |r: &Run| {
        let from = offset(r) + r.s.measured_from_s as usize;
        (from, from + r.s.measured_s.round() as usize)
    };
    let both_from = runs.iter().map(|r| span(r).0).max().unwrap_or(0);
    let both_until = runs.iter().map(|r| span(r).1).min().unwrap_or(0);
    let overlap_s = both_until.saturating_sub(both_from);
    let overlap_ms = overlap_s as u64 * 1000;
    // Concurrent: every run was measuring together for at least half of the shortest
    // window. Rates are then taken over those shared seconds only, so an offset between
    // shards does not inflate them.
    let concurrent = overlap_s > 0 && overlap_ms * 2 >= shortest;
    if !concurrent && !sequential {
        let windows: Vec<String> = runs.iter().map(window_line).collect();
        anyhow::bail!(
            "these runs' measured windows overlap for {:.1} s, less than half of the shortest \
             ({:.1} s), so they did not load the server together and adding their rates would \
             be false:\n  {}\nto merge them as sequential runs (rates over the sum of their \
             windows) use `chatsim report merge --sequential`",
            overlap_ms as f64 / 1000.0,
            shortest as f64 / 1000.0,
            windows.join("\n  ")
        );
    }
    let union_from = runs
        .iter()
        .map(|r| r.s.measured_from_unix_ms)
        .min()
        .unwrap_or(0);
    let union_until = runs
        .iter()
        .map(|r| r.s.measured_until_unix_ms)
        .max()
        .unwrap_or(0);
    let secs = if concurrent {
        (union_until - union_from) as f64 / 1000.0
    } else {
        runs.iter().map(|r| r.s.measured_s).sum()
    }
    .max(1e-3);
    // Second by second of wall-clock time from the earliest start.
    let len = runs
        .iter()
        .map(|r| offset(r) + r.rows.len())
        .max()
        .unwrap_or(0);
    let mut rows = vec![Row::default(); len];
    let mut per_second: Vec<Histogram<u64>> = (0..len).map(|_| hist()).collect::<Result<_, _>>()?;
    let mut ack_second: Vec<Histogram<u64>> = (0..len).map(|_| hist()).collect::<Result<_, _>>()?;
    let mut deliver = hist()?;
    let mut tagged: BTreeMap<&str, Histogram<u64>> = BTreeMap::new();
    for t in TAGGED {
        tagged.insert(t, hist()?);
    }
    let mut m = Summary {
        run_id: runs
            .iter()
            .map(|r| r.s.run_id.as_str())
            .collect::<Vec<_>>()
            .join("+"),
        valid: true,
        start_unix_ms: t0,
        measured_from_unix_ms: union_from,
        measured_until_unix_ms: union_until,
        measured_s: secs,
        measured_from_s: ((union_from - t0) / 1000),
        ..Summary::default()
    };
    let mut targets: Vec<&str> = Vec::new();
    let mut reasons: Vec<String> = extra_invalid.to_vec();
    if !reasons.is_empty() {
        m.valid = false;
    }
    let mut rate_sum = 0.0;
    let (mut fleet_before, mut fleet_after, mut fleet_ok) = (Some(0u64), Some(0u64), 0usize);
    let add = |a: usize, b: usize| if concurrent { a + b } else { a.max(b) };
    for r in &runs {
        let o = offset(r);
        for (i, (c, sent, d, a)) in r.rows.iter().enumerate() {
            let row = &mut rows[o + i];
            row.connections += c;
            row.sent += sent;
            row.delivered += d;
            row.acked += a;
        }
        for (t, h) in &r.deliver {
            deliver.add(h)?;
            if let Some(ps) = per_second.get_mut(o + *t as usize) {
                ps.add(h)?;
            }
        }
        for (t, h) in &r.ack {
            if let Some(ps) = ack_second.get_mut(o + *t as usize) {
                ps.add(h)?;
            }
        }
        for (i, e) in r.errors.iter().enumerate() {
            rows[o + i].errors += e;
        }
        for (tag, h) in &r.tagged {
            if let Some(into) = tagged.get_mut(tag.as_str()) {
                into.add(h)?;
            }
        }
        if !targets.contains(&r.s.target.as_str()) {
            targets.push(&r.s.target);
        }
        // Sequential runs did not hold their devices at once: the most any one held.
        m.users = add(m.users, r.s.users);
        m.sent += r.s.sent;
        m.expected_deliveries += r.s.expected_deliveries;
        m.delivered += r.s.delivered;
        m.acked += r.s.acked;
        m.errors += r.s.errors;
        for (k, n) in &r.s.errors_by_kind {
            *m.errors_by_kind.entry(k.clone()).or_default() += n;
        }
        m.peak_connections = if concurrent {
            m.peak_connections + r.s.peak_connections
        } else {
            m.peak_connections.max(r.s.peak_connections)
        };
        m.idle_s = m.idle_s.max(r.s.idle_s);
        m.idle_devices = add(m.idle_devices, r.s.idle_devices);
        let g = &r.s.generator;
        fleet_ok += g.idle_devices_connected;
        if r.s.idle_devices > 0 {
            fleet_before = fleet_before.zip(g.rss_before_fleet_kib).map(|(a, b)| a + b);
            fleet_after = fleet_after.zip(g.rss_with_fleet_kib).map(|(a, b)| a + b);
        }
        m.generator.rss_end_kib =
            Some(m.generator.rss_end_kib.unwrap_or(0) + g.rss_end_kib.unwrap_or(0));
        rate_sum += r.s.rate_per_user * r.s.users as f64;
        m.valid &= r.s.valid;
        if let Some(why) = &r.s.invalid_reason {
            reasons.push(format!("{}: {why}", r.s.run_id));
        }
    }
    for ((row, h), a) in rows.iter_mut().zip(&per_second).zip(&ack_second) {
        row.deliver = Pct::of(h);
        row.ack = Pct::of(a);
    }
    m.deliver_distribution_us = crate::report::distribution(&deliver);
    let first = &runs[0].s;
    m.ramp_s = first.ramp_s;
    m.storm_at_s = first.storm_at_s;
    m.typing_per_s = first.typing_per_s;
    m.max_errors = runs.iter().map(|r| r.s.max_errors).sum();
    let group_sizes: Vec<usize> = runs.iter().map(|r| r.s.group_size).collect();
    m.group_size = if group_sizes.iter().all(|g| *g == group_sizes[0]) {
        group_sizes[0]
    } else {
        0
    };
    m.rate_per_user = rate_sum / m.users.max(1) as f64;
    m.target = targets.join(" ");
    if concurrent {
        // Over the seconds every run was measuring in: the load they offered together.
        let shared = &rows[both_from.min(rows.len())..both_until.min(rows.len())];
        let n = shared.len().max(1) as f64;
        m.sent_per_s = shared.iter().map(|r| r.sent).sum::<u64>() as f64 / n;
        m.delivered_per_s = shared.iter().map(|r| r.delivered).sum::<u64>() as f64 / n;
    } else {
        m.sent_per_s = m.sent as f64 / secs;
        m.delivered_per_s = m.delivered as f64 / secs;
    }
    m.deliver_us = Pct::of(&deliver);
    m.deliver_raw_us = Pct::of(&tagged["deliver_raw"]);
    m.ack_us = Pct::of(&tagged["ack"]);
    m.send_to_commit_us = Pct::of(&tagged["send_to_commit"]);
    m.commit_to_receive_us = Pct::of(&tagged["commit_to_receive"]);
    m.schedule_slip_us = Pct::of(&tagged["schedule_slip"]);
    m.event_loop_lag_us = Pct::of(&tagged["event_loop_lag"]);
    if runs.iter().any(|r| r.s.storm_reconnect_us.is_some()) {
        m.storm_reconnect_us = Some(Pct::of(&tagged["storm_reconnect"]));
        m.storm_catch_up_us = Some(Pct::of(&tagged["storm_catch_up"]));
    }
    // One error budget for a run spread over processes, not one per process.
    if let Some(budget) = max_errors {
        m.max_errors = budget;
        if m.errors > budget {
            m.valid = false;
            reasons.push(format!(
                "{} errors in all over the budget of {budget} (--max-errors)",
                m.errors
            ));
        }
    }
    m.invalid_reason = (!reasons.is_empty()).then(|| reasons.join("; "));
    m.generator.idle_devices_connected = fleet_ok;
    if m.idle_devices > 0 {
        m.generator.rss_before_fleet_kib = fleet_before;
        m.generator.rss_with_fleet_kib = fleet_after;
        m.generator.kib_per_idle_device = fleet_before
            .zip(fleet_after)
            .filter(|_| fleet_ok > 0)
            .map(|(b, a)| a.saturating_sub(b) as f64 / fleet_ok as f64);
    }
    m.server = merge_servers(&runs);
    m.merge = Some(MergeInfo {
        overlap_s: overlap_ms as f64 / 1000.0,
        kind: if concurrent {
            "concurrent"
        } else {
            "sequential"
        }
        .into(),
        runs: runs
            .iter()
            .map(|r| RunWindow {
                run_id: r.s.run_id.clone(),
                target: r.s.target.clone(),
                from_unix_ms: r.s.measured_from_unix_ms,
                until_unix_ms: r.s.measured_until_unix_ms,
                valid: r.s.valid,
            })
            .collect(),
    });
    m.fail_if = crate::report::judge_fail_if(&m, fail_if);
    std::fs::create_dir_all(out).map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    crate::report::write_latency_csv(out, &m)?;
    crate::report::write_timeseries(out, &rows)?;
    std::fs::write(out.join("summary.json"), serde_json::to_string_pretty(&m)?)?;
    std::fs::write(out.join("report.html"), crate::report::html(&m, &rows))?;
    Ok(m)
}

/// `RUN: measured HH:MM:SS.mmm for N s` (UTC), for messages about windows.
fn window_line(r: &Run) -> String {
    format!(
        "{} ({}): measured from {} for {:.1} s",
        r.s.run_id,
        r.dir.display(),
        utc(r.s.measured_from_unix_ms),
        (r.s.measured_until_unix_ms - r.s.measured_from_unix_ms) as f64 / 1000.0
    )
}

/// Unix ms as `HH:MM:SS.mmm UTC`.
pub fn utc(ms: u64) -> String {
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03} UTC",
        s / 3600 % 24,
        s / 60 % 60,
        s % 60,
        ms % 1000
    )
}

//! `chatsim report merge RUN...`: combines runs from several generator processes or
//! machines exactly, by adding their HdrHistogram interval logs (not averaging
//! percentiles), and summing their counts.

use crate::report::{Pct, Summary};
use base64::Engine;
use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
use hdrhistogram::serialization::Deserializer;
use hdrhistogram::Histogram;
use std::path::Path;

/// Reads every interval of `RUN/deliver.hlog` into one histogram.
pub fn read_hlog(path: &Path) -> anyhow::Result<Histogram<u64>> {
    let text = std::fs::read(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut total = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    let mut de = Deserializer::new();
    for entry in IntervalLogIterator::new(&text) {
        let entry =
            entry.map_err(|e| anyhow::anyhow!("{}: bad interval log: {e:?}", path.display()))?;
        if let LogEntry::Interval(ilh) = entry {
            let raw = base64::engine::general_purpose::STANDARD.decode(ilh.encoded_histogram())?;
            let h: Histogram<u64> = de
                .deserialize(&mut raw.as_slice())
                .map_err(|e| anyhow::anyhow!("{}: bad histogram: {e:?}", path.display()))?;
            total.add(&h)?;
        }
    }
    Ok(total)
}

/// Merges runs into `out`: summary.json and latency.csv of the union.
pub fn merge(runs: &[&Path], out: &Path) -> anyhow::Result<Summary> {
    anyhow::ensure!(!runs.is_empty(), "name at least one run directory");
    let mut deliver = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)?;
    let mut merged = Summary {
        run_id: String::new(),
        valid: true,
        ..Summary::default()
    };
    let mut ids = Vec::new();
    for r in runs {
        let s: Summary = serde_json::from_slice(
            &std::fs::read(r.join("summary.json"))
                .map_err(|e| anyhow::anyhow!("{}: {e}", r.join("summary.json").display()))?,
        )?;
        deliver.add(&read_hlog(&r.join("deliver.hlog"))?)?;
        ids.push(s.run_id.clone());
        merged.target = s.target.clone();
        merged.users += s.users;
        merged.sent += s.sent;
        merged.expected_deliveries += s.expected_deliveries;
        merged.delivered += s.delivered;
        merged.acked += s.acked;
        merged.errors += s.errors;
        merged.peak_connections += s.peak_connections;
        merged.measured_s = merged.measured_s.max(s.measured_s);
        merged.sent_per_s += s.sent_per_s;
        merged.delivered_per_s += s.delivered_per_s;
        merged.valid &= s.valid;
        if let Some(r) = s.invalid_reason {
            merged.invalid_reason = Some(r);
        }
    }
    merged.run_id = ids.join("+");
    merged.deliver_us = Pct::of(&deliver);
    std::fs::create_dir_all(out)?;
    crate::report::write_latency_csv(out, &merged)?;
    std::fs::write(
        out.join("summary.json"),
        serde_json::to_string_pretty(&merged)?,
    )?;
    Ok(merged)
}

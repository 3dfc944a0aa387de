//! Figures of a run in simulated time (send→ack, send→deliver, send→read percentiles,
//! reconnect storm shape) and the verdict: oracle violations against what the scenario
//! expects, and latency thresholds.

use crate::oracle::{Violation, ViolationKind};
use crate::scenario::Scenario;
use crate::world::Outcome;
use hdrhistogram::Histogram;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// Latency percentiles of one measure, simulated ms.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
}

fn percentiles(values: &[u64]) -> Percentiles {
    let Ok(mut h) = Histogram::<u64>::new_with_bounds(1, 24 * 3_600_000, 3) else {
        return Percentiles::default();
    };
    for v in values {
        let _ = h.record((*v).max(1));
    }
    if h.is_empty() {
        return Percentiles::default();
    }
    Percentiles {
        count: h.len(),
        p50: h.value_at_quantile(0.5),
        p99: h.value_at_quantile(0.99),
        max: h.max(),
    }
}

/// What a run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Figures {
    pub sends: usize,
    pub acked: usize,
    pub send_to_ack_ms: Percentiles,
    pub send_to_deliver_ms: Percentiles,
    pub send_to_read_ms: Percentiles,
    /// Most connections opened in one simulated second.
    pub peak_reconnects_per_sec: u64,
    pub connect_failures: u64,
    /// Spread of the backoff delays clients chose, ms (min, median, max).
    pub backoff_ms: (u64, u64, u64),
    pub redeliveries: u64,
    pub pushes: usize,
    /// Largest outbound queue seen on one connection: (frames, bytes).
    pub max_queue: (u64, u64),
}

impl Figures {
    /// Computes the figures of a finished run.
    pub fn of(o: &Outcome) -> Figures {
        let l = &o.ledger;
        let mut ack = Vec::new();
        let mut deliver = Vec::new();
        let mut read = Vec::new();
        let mut by_mid: BTreeMap<&str, u64> = BTreeMap::new();
        for s in &l.sends {
            if let (Some(t0), Some((_, _, mid, at))) = (s.first_sent_ms, &s.acked) {
                ack.push(at.saturating_sub(t0));
                by_mid.insert(mid.as_str(), t0);
                if let Some(r) = s.read_ms {
                    read.push(r.saturating_sub(t0));
                }
            }
        }
        let mut per_sec: BTreeMap<u64, u64> = BTreeMap::new();
        let mut backoffs = Vec::new();
        let mut failures = 0;
        let mut redeliveries = 0;
        for ((u, _), d) in &l.devices {
            for sh in d.shown.values() {
                if sh.sender != *u {
                    if let Some(t0) = by_mid.get(sh.message_id.as_str()) {
                        deliver.push(sh.at_ms.saturating_sub(*t0));
                    }
                }
            }
            for c in &d.connects {
                *per_sec.entry(c / 1000).or_default() += 1;
            }
            backoffs.extend(d.backoffs.iter().copied());
            failures += d.connect_failures;
            redeliveries += d.redeliveries;
        }
        backoffs.sort_unstable();
        Figures {
            sends: l.sends.len(),
            acked: l.sends.iter().filter(|s| s.acked.is_some()).count(),
            send_to_ack_ms: percentiles(&ack),
            send_to_deliver_ms: percentiles(&deliver),
            send_to_read_ms: percentiles(&read),
            // The first second is everyone's initial connect, not a storm.
            peak_reconnects_per_sec: per_sec
                .iter()
                .filter(|(s, _)| **s > 0)
                .map(|(_, n)| *n)
                .max()
                .unwrap_or(0),
            connect_failures: failures,
            backoff_ms: (
                backoffs.first().copied().unwrap_or(0),
                backoffs.get(backoffs.len() / 2).copied().unwrap_or(0),
                backoffs.last().copied().unwrap_or(0),
            ),
            redeliveries,
            max_queue: l.max_queue,
            pushes: l.pushes.len(),
        }
    }
}

/// The verdict on one seed.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    pub scenario: String,
    pub seed: u64,
    pub passed: bool,
    /// Why it failed, one line each (unexpected violations, missing expected ones,
    /// thresholds).
    pub failures: Vec<String>,
    pub violations: Vec<Violation>,
    pub figures: Figures,
    pub trace_hash: u64,
    pub steps: u64,
}

impl RunResult {
    /// Judges a run against the scenario's expectations.
    pub fn judge(sc: &Scenario, o: &Outcome, violations: Vec<Violation>) -> RunResult {
        let figures = Figures::of(o);
        let mut failures = Vec::new();
        let found: BTreeSet<ViolationKind> = violations.iter().map(|v| v.kind).collect();
        if sc.expect.violations.is_empty() {
            for v in &violations {
                failures.push(v.to_string());
            }
        } else {
            for k in &sc.expect.violations {
                if !found.contains(k) {
                    failures.push(format!("expected a {} violation, found none", k.name()));
                }
            }
        }
        // A group the admin tried to grow past the cap must have been refused with 413.
        for (g, spec) in sc.workload.groups.iter().enumerate() {
            let Some(at) = spec.grow_at_ms else { continue };
            let admin = format!("u{}/d0", o.plan.groups[g].admin);
            let refused = o.ledger.trace.iter().any(|e| {
                e.t >= at && e.at == admin && e.event == "error" && e.detail.starts_with("413")
            });
            if !refused {
                failures.push(format!(
                    "group {g}: growing it past group_cap was not refused with 413"
                ));
            }
        }
        if let Some(max) = sc.expect.p99_deliver_ms {
            if figures.send_to_deliver_ms.p99 > max {
                failures.push(format!(
                    "p99 send→deliver {} ms > {max} ms",
                    figures.send_to_deliver_ms.p99
                ));
            }
        }
        if let Some(max) = sc.expect.p99_ack_ms {
            if figures.send_to_ack_ms.p99 > max {
                failures.push(format!(
                    "p99 send→ack {} ms > {max} ms",
                    figures.send_to_ack_ms.p99
                ));
            }
        }
        RunResult {
            scenario: sc.name.clone(),
            seed: o.seed,
            passed: failures.is_empty(),
            failures,
            violations,
            figures,
            trace_hash: o.ledger.trace_hash(),
            steps: o.steps,
        }
    }

    /// The violation kinds found.
    pub fn kinds(&self) -> BTreeSet<ViolationKind> {
        self.violations.iter().map(|v| v.kind).collect()
    }
}

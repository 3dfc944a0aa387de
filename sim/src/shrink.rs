//! Shrinking a failing run to a small scenario that still fails the same way, written as a
//! runnable TOML file.
//!
//! A delta debugger (Zeller's ddmin) over the fault timeline, then halving of the
//! workload (messages, groups, users, devices), each candidate re-run with the same seed and
//! kept only if it still shows the same violation kind. Every step is a full deterministic
//! simulation, so the budget is counted in runs.

use crate::oracle::ViolationKind;
use crate::scenario::Scenario;
use crate::world::RunOptions;

/// Result of shrinking.
pub struct Shrunk {
    pub scenario: Scenario,
    pub runs: usize,
}

/// True if `sc` at `seed` still shows a violation of `kind`.
fn still_fails(sc: &Scenario, seed: u64, opts: &RunOptions, kind: ViolationKind) -> bool {
    let text = match toml::to_string(sc) {
        Ok(t) => t,
        Err(_) => return false,
    };
    // Candidates must be valid scenarios (as a user would write them).
    if Scenario::parse(&text, "candidate").is_err() {
        return false;
    }
    match crate::run_seed(sc, seed, opts) {
        Ok((r, _)) => r.kinds().contains(&kind),
        Err(_) => false,
    }
}

/// Shrinks `sc` (failing at `seed` with `kind`) within `budget` runs.
pub fn shrink(
    sc: &Scenario,
    seed: u64,
    opts: &RunOptions,
    kind: ViolationKind,
    budget: usize,
) -> Shrunk {
    let mut best = sc.clone();
    // Make swarm-drawn faults explicit so that they can be removed one by one.
    best.faults = crate::plan::Plan::draw(sc, seed).faults;
    best.swarm = None;
    let mut runs = 0usize;
    let try_keep = |cand: Scenario, best: &mut Scenario, runs: &mut usize| -> bool {
        if *runs >= budget {
            return false;
        }
        *runs += 1;
        if still_fails(&cand, seed, opts, kind) {
            *best = cand;
            true
        } else {
            false
        }
    };
    // ddmin over faults.
    let mut n = 2usize;
    while best.faults.len() >= 2 && runs < budget {
        let len = best.faults.len();
        let chunk = len.div_ceil(n);
        let mut reduced = false;
        let parts = n;
        for i in 0..parts {
            let lo = i * chunk;
            if lo >= len {
                break;
            }
            let hi = (lo + chunk).min(len);
            let mut cand = best.clone();
            cand.faults = best.faults[..lo]
                .iter()
                .chain(best.faults[hi..].iter())
                .cloned()
                .collect();
            if try_keep(cand, &mut best, &mut runs) {
                n = (n - 1).max(2);
                reduced = true;
                break;
            }
        }
        if !reduced {
            if n >= len {
                break;
            }
            n = (n * 2).min(len);
        }
    }
    if best.faults.len() == 1 {
        let mut cand = best.clone();
        cand.faults.clear();
        try_keep(cand, &mut best, &mut runs);
    }
    // Halve the workload while it still fails.
    loop {
        let before = runs;
        let mut progressed = false;
        let w = &best.workload;
        let mut cands = Vec::new();
        // Big steps first, then small ones, so a local minimum of halving is not the end.
        let m = w.messages_per_user;
        let mut steps = vec![m / 2, m * 3 / 4, m.saturating_sub(1)];
        steps.dedup();
        for to in steps {
            if to >= 1 && to < m {
                let mut c = best.clone();
                c.workload.messages_per_user = to;
                cands.push(c);
            }
        }
        for gi in 0..w.groups.len() {
            let mut c = best.clone();
            c.workload.groups.remove(gi);
            cands.push(c);
            if w.groups[gi].messages > 1 {
                let mut c = best.clone();
                c.workload.groups[gi].messages /= 2;
                cands.push(c);
            }
        }
        let mut user_steps = vec![
            (w.users / 2).max(2),
            w.users.saturating_sub(2).max(2),
            w.users - 1,
        ];
        user_steps.dedup();
        for to in user_steps {
            if to >= 2 && to < w.users {
                let mut c = best.clone();
                c.workload.users = to;
                for g in &mut c.workload.groups {
                    g.size = g.size.min(to);
                }
                cands.push(c);
            }
        }
        if w.devices_per_user > 1 {
            let mut c = best.clone();
            c.workload.devices_per_user = 1;
            cands.push(c);
        }
        if best.topology.client_hosts > 1 {
            let mut c = best.clone();
            c.topology.client_hosts = 1;
            cands.push(c);
        }
        for c in cands {
            if try_keep(c, &mut best, &mut runs) {
                progressed = true;
                break;
            }
        }
        if !progressed || runs == before || runs >= budget {
            break;
        }
    }
    Shrunk {
        scenario: best,
        runs,
    }
}

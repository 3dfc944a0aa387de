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
    // Start from what the seed drew: every knob of the design space written out, and the
    // swarm's faults made explicit so that they can be removed one by one.
    let mut best = crate::space::draw(sc, seed)
        .map(|d| d.scenario)
        .unwrap_or_else(|_| sc.clone());
    best.faults = crate::plan::Plan::draw(&best, seed).faults;
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
            cands.push(remove_group(&best, gi));
            if w.groups[gi].messages > 1 {
                let mut c = best.clone();
                c.workload.groups[gi].messages /= 2;
                cands.push(c);
            }
            // A smaller group: drop its highest member (not the admin, not one whose
            // membership changes).
            if let Some(m) = &w.groups[gi].members {
                if let Some(&last) = m.iter().max() {
                    let touched = w.membership.iter().any(|c| c.group == gi && c.user == last);
                    if m.len() > 2 && !touched {
                        let mut c = best.clone();
                        let g = &mut c.workload.groups[gi];
                        g.members = Some(m.iter().copied().filter(|u| *u != last).collect());
                        g.size -= 1;
                        cands.push(c);
                    }
                }
            }
        }
        // Operations during the run, all at once, then one by one.
        if !w.links.is_empty() || !w.membership.is_empty() || !w.unlinks.is_empty() {
            let mut c = best.clone();
            c.workload.links.clear();
            c.workload.membership.clear();
            c.workload.unlinks.clear();
            cands.push(c);
        }
        for i in 0..w.unlinks.len() {
            let mut c = best.clone();
            c.workload.unlinks.remove(i);
            cands.push(c);
        }
        for i in 0..w.links.len() {
            let mut c = best.clone();
            c.workload.links.remove(i);
            cands.push(c);
        }
        for i in 0..w.membership.len() {
            let mut c = best.clone();
            c.workload.membership.remove(i);
            cands.push(c);
        }
        let mut user_steps = vec![
            (w.users / 2).max(2),
            w.users.saturating_sub(2).max(2),
            w.users - 1,
        ];
        user_steps.dedup();
        for to in user_steps {
            if to >= 2 && to < w.users {
                cands.push(cut_users(&best, to));
            }
        }
        if w.devices_per_user > 1 {
            let mut c = best.clone();
            c.workload.devices_per_user = 1;
            c.workload.links.retain(|l| l.device < 1);
            c.workload.unlinks.clear(); // a user's only device is never unlinked
            cands.push(c);
        }
        if best.topology.client_hosts > 1 {
            let mut c = best.clone();
            c.topology.client_hosts = 1;
            cands.push(c);
        }
        // Knobs back to their defaults, one at a time: what is left is what the bug needs.
        if let Some(t) = &best.server {
            for key in t.keys() {
                let mut c = best.clone();
                if let Some(t) = c.server.as_mut() {
                    t.remove(key);
                }
                cands.push(c);
            }
        }
        let defaults = toml::Table::try_from(crate::scenario::ClientConfig::default()).ok();
        let current = toml::Table::try_from(&best.client).ok();
        if let (Some(def), Some(cur)) = (defaults, current) {
            for (key, v) in &cur {
                if def.get(key) != Some(v) {
                    let mut t = cur.clone();
                    // A default that is unset (`token_life_ms`) is not written: remove it.
                    match def.get(key) {
                        Some(d) => t.insert(key.clone(), d.clone()),
                        None => t.remove(key),
                    };
                    if let Ok(cfg) = t.try_into() {
                        let mut c = best.clone();
                        c.client = cfg;
                        cands.push(c);
                    }
                }
            }
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

/// `sc` without group `gi` (membership changes renumbered).
fn remove_group(sc: &Scenario, gi: usize) -> Scenario {
    let mut c = sc.clone();
    c.workload.groups.remove(gi);
    c.workload.membership.retain(|m| m.group != gi);
    for m in &mut c.workload.membership {
        if m.group > gi {
            m.group -= 1;
        }
    }
    c
}

/// `sc` with only the first `to` users: groups lose the others (and vanish below two
/// members), links and membership changes of the others go.
fn cut_users(sc: &Scenario, to: usize) -> Scenario {
    let mut c = sc.clone();
    c.workload.users = to;
    c.workload.links.retain(|l| l.user < to);
    c.workload.membership.retain(|m| m.user < to);
    c.workload.unlinks.retain(|u| u.user < to);
    let mut gi = 0;
    while gi < c.workload.groups.len() {
        let g = &mut c.workload.groups[gi];
        g.size = g.size.min(to);
        if let Some(m) = &mut g.members {
            m.retain(|u| *u < to);
            g.size = m.len();
        }
        if g.size < 2 {
            c = remove_group(&c, gi);
        } else {
            gi += 1;
        }
    }
    c
}

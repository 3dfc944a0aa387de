//! The deterministic simulator: the chatsim server inside turmoil, with simulated
//! offline-first phones, a fault timeline, a chat oracle, seeds that replay bit for bit,
//! swarm runs and shrinking of failing scenarios.
//!
//! - `scenario`: the TOML format; `plan`: what a seed makes of it.
//! - `world`: builds and drives the turmoil simulation; `client`: the simulated phone.
//! - `disk`: what a crash or failover keeps; `crypto`: end-to-end encryption of bodies;
//!   `media`: the phone's upload/download lane for files.
//! - `ledger`: what devices saw, and the JSONL trace; `oracle`: the invariants, with
//!   `reference` (what the design promises) and `horizon` (what retention lets it forget).
//! - `report`: latency and reconnect figures; `shrink`: minimal failing scenarios.

pub mod bench;
pub mod buggify;
pub mod client;
pub mod crypto;
pub mod device;
pub mod disk;
pub mod horizon;
pub mod invariant;
pub mod knobs;
pub mod ledger;
pub mod logcheck;
pub mod media;
pub mod oracle;
pub mod plan;
pub mod playback;
pub mod reference;
pub mod report;
pub mod scenario;
pub mod shrink;
pub mod space;
pub mod world;

pub use oracle::{Violation, ViolationKind};
pub use report::{Figures, RunResult};
pub use scenario::{Scenario, ScenarioError};
pub use world::RunOptions;

/// Runs one seed of a scenario and judges it.
pub fn run_seed(
    sc: &Scenario,
    seed: u64,
    opts: &RunOptions,
) -> Result<(RunResult, world::Outcome), String> {
    let outcome = world::run(sc, seed, opts)?;
    let violations = oracle::check(&outcome);
    let result = RunResult::judge(sc, &outcome, violations);
    Ok((result, outcome))
}

/// Runs many seeds of a scenario on `jobs` threads (a turmoil `Sim` is single-threaded and
/// `!Send`, so each thread builds its own). `on_done` is called as each seed finishes;
/// results come back in seed order.
pub fn run_seeds(
    sc: &Scenario,
    seeds: &[u64],
    opts: &RunOptions,
    jobs: usize,
    on_done: &(dyn Fn(&Result<RunResult, String>) + Sync),
) -> Vec<(u64, Result<RunResult, String>)> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let next = AtomicUsize::new(0);
    let out: Mutex<Vec<(u64, Result<RunResult, String>)>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs.max(1).min(seeds.len().max(1)) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&seed) = seeds.get(i) else { break };
                let r = run_seed(sc, seed, opts).map(|(r, _)| r);
                on_done(&r);
                out.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((seed, r));
            });
        }
    });
    let mut v = out.into_inner().unwrap_or_else(|p| p.into_inner());
    v.sort_by_key(|(s, _)| *s);
    v
}

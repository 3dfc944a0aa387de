//! The plain design-space swarm (`scenarios/swarm-space.toml`, not a scenario written for
//! any one bug) catches every planted bug within 100 seeds, the checks that only a history
//! oracle can make fire on the bug made for them, the correct server passes the same seeds,
//! and the regression scenarios of the bugs the swarm found pass.

use sim::{RunOptions, Scenario, ViolationKind};
use std::path::Path;

fn load(rel: &str) -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
    Scenario::load(&path).expect("shipped scenario parses")
}

/// A bug and, if caught, the seed and the kinds found then.
type Catch = (&'static str, Option<(u64, Vec<ViolationKind>)>);

/// For each bug: the first seed in 1..=100 at which the swarm fails showing `want(bug)`
/// (any failure when `None`), and the kinds found then.
fn first_catches(
    bugs: &[&'static str],
    want: &(dyn Fn(&str) -> Option<ViolationKind> + Sync),
) -> Vec<Catch> {
    let sc = load("scenarios/swarm-space.toml");
    let next = std::sync::atomic::AtomicUsize::new(0);
    let out = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&bug) = bugs.get(i) else { break };
                let mut opts = RunOptions::default();
                opts.bugs.enable(bug).expect("known bug");
                let mut found = None;
                for seed in 1..=100 {
                    let (r, _) = sim::run_seed(&sc, seed, &opts).expect("simulation runs");
                    let kinds = r.kinds();
                    if !r.passed && want(bug).is_none_or(|k| kinds.contains(&k)) {
                        found = Some((seed, kinds.into_iter().collect()));
                        break;
                    }
                }
                out.lock().expect("lock").push((bug, found));
            });
        }
    });
    let mut v = out.into_inner().expect("lock");
    v.sort_by_key(|(b, _)| bugs.iter().position(|x| x == b));
    v
}

#[test]
fn every_planted_bug_is_caught_by_the_plain_swarm_within_100_seeds() {
    // The check each bug must trip (where a bug is the evidence that a check can fail).
    let must_show = |bug: &str| match bug {
        "ack-before-persist" | "async-replication-failover" => Some(ViolationKind::NotDurable),
        "no-dedup" => Some(ViolationKind::Duplicate),
        "order-by-client-clock" => Some(ViolationKind::Order),
        "unbounded-outbound-queue" => Some(ViolationKind::QueueBound),
        "push-with-content" | "log-content" => Some(ViolationKind::Plaintext),
        "truncated-media"
        | "skip-sync-on-reconnect"
        | "inbox-outside-commit"
        | "no-inbox-when-online" => Some(ViolationKind::Loss),
        "early-delivery-receipt" => Some(ViolationKind::FalseReceipt),
        "forget-delivery-acks" => Some(ViolationKind::Redelivery),
        "stale-group-members" => Some(ViolationKind::NonMember),
        "accept-expired-tokens" | "unlinked-tokens-work" => Some(ViolationKind::Auth),
        "unlink-keeps-copies" => Some(ViolationKind::StorageLeak),
        "typing-to-own-devices" => Some(ViolationKind::Typing),
        _ => None,
    };
    let bugs: Vec<&'static str> = model_server::config::Bugs::NAMES.to_vec();
    let mut missed = Vec::new();
    for (bug, found) in first_catches(&bugs, &must_show) {
        match found {
            None => missed.push(format!(
                "{bug}: not caught in seeds 1..=100 (chatsim run scenarios/swarm-space.toml --seeds 1..100 --bug {bug})"
            )),
            Some((seed, kinds)) => {
                eprintln!("{bug}: caught at seed {seed}: {kinds:?}");
                if let Some(k) = must_show(bug) {
                    if !kinds.contains(&k) {
                        missed.push(format!(
                            "{bug}: caught at seed {seed} as {kinds:?}, but not as {}",
                            k.name()
                        ));
                    }
                } else {
                    missed.push(format!("{bug}: no expected check named in this test"));
                }
            }
        }
    }
    assert!(missed.is_empty(), "{}", missed.join("\n"));
}

#[test]
fn the_swarm_passes_on_the_correct_server() {
    let sc = load("scenarios/swarm-space.toml");
    let seeds: Vec<u64> = (1..=24).collect();
    let failed: Vec<String> = sim::run_seeds(&sc, &seeds, &RunOptions::default(), 2, &|_| {})
        .into_iter()
        .filter_map(|(seed, r)| match r {
            Ok(r) if r.passed => None,
            Ok(r) => Some(format!("seed {seed}: {:?}", r.failures)),
            Err(e) => Some(format!("seed {seed}: simulation error: {e}")),
        })
        .collect();
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn the_regressions_the_swarm_found_stay_fixed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/regressions");
    let files = sim::scenario::collect(&dir).expect("regressions dir");
    assert!(files.len() >= 3, "one regression scenario per bug found");
    for f in files {
        let sc = Scenario::load(&f).expect("parses");
        for seed in 1..=3 {
            let (r, _) = sim::run_seed(&sc, seed, &RunOptions::default()).expect("runs");
            assert!(r.passed, "{} seed {seed}: {:?}", f.display(), r.failures);
        }
    }
}

#[test]
fn a_drawn_seed_written_out_replays_as_a_plain_scenario() {
    // What `--explain` and a shrunk repro rely on: the concrete scenario of a seed, as
    // TOML, runs to the same trace as the swarm seed itself.
    let sc = load("scenarios/swarm-space.toml");
    let drawn = sim::space::draw(&sc, 7).expect("draws").scenario;
    let text = toml::to_string(&drawn).expect("encodes");
    let plain = Scenario::parse(&text, "drawn.toml").expect("parses");
    assert!(plain.swarm.as_ref().is_none_or(|s| s.space.is_none()));
    let (a, _) = sim::run_seed(&sc, 7, &RunOptions::default()).expect("runs");
    let (b, _) = sim::run_seed(&plain, 7, &RunOptions::default()).expect("runs");
    assert_eq!(a.trace_hash, b.trace_hash);
}

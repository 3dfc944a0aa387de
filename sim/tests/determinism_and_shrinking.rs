//! Same seed, same bytes of trace (sequentially and on parallel threads); failures shrink
//! to a small scenario that is still a valid, failing scenario file.

use sim::{RunOptions, Scenario, ViolationKind};
use std::path::Path;

fn scenario(name: &str) -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scenarios")
        .join(format!("{name}.toml"));
    Scenario::load(&path).expect("shipped scenario parses")
}

fn trace(sc: &Scenario, seed: u64) -> String {
    let (_, o) = sim::run_seed(sc, seed, &RunOptions::default()).expect("runs");
    o.ledger.trace_jsonl()
}

#[test]
fn same_seed_replays_the_same_trace_bytes_even_with_crashes() {
    // swarm-chaos draws crashes (gateways and the chat service), kills and partitions.
    let sc = scenario("swarm-chaos");
    for seed in [2, 7] {
        let a = trace(&sc, seed);
        let b = trace(&sc, seed);
        assert!(!a.is_empty());
        assert!(a == b, "seed {seed} diverged on replay");
    }
    assert_ne!(
        trace(&sc, 2),
        trace(&sc, 7),
        "different seeds, different runs"
    );
}

#[test]
fn same_seed_on_parallel_threads_gives_the_same_trace() {
    let sc = scenario("chat-crash");
    let expected = trace(&sc, 3);
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let sc = sc.clone();
            std::thread::spawn(move || trace(&sc, 3))
        })
        .collect();
    for h in handles {
        assert!(h.join().expect("thread") == expected);
    }
}

#[test]
fn a_failing_run_shrinks_to_a_small_scenario_that_still_fails() {
    let sc = scenario("chat-crash");
    let mut opts = RunOptions::default();
    opts.bugs.enable("ack-before-persist").expect("known bug");
    let seed = (1..=20)
        .find(|s| {
            sim::run_seed(&sc, *s, &opts)
                .expect("runs")
                .0
                .kinds()
                .contains(&ViolationKind::Loss)
        })
        .expect("the bug is caught");
    let shrunk = sim::shrink::shrink(&sc, seed, &opts, ViolationKind::Loss, 40);
    let s = &shrunk.scenario;
    assert!(
        s.faults.len() < sc.faults.len()
            || s.workload.users < sc.workload.users
            || s.workload.messages_per_user < sc.workload.messages_per_user,
        "something was removed"
    );
    assert!(s.faults.len() <= 1, "one crash is enough: {:?}", s.faults);
    assert!(
        s.workload.users * s.workload.messages_per_user
            < sc.workload.users * sc.workload.messages_per_user,
        "workload shrank: {} users x {} messages",
        s.workload.users,
        s.workload.messages_per_user
    );
    // It is a valid scenario file, and it still fails the same way.
    let text = toml::to_string(s).expect("encodes");
    let back = Scenario::parse(&text, "shrunk.toml").expect("shrunk scenario parses");
    let (r, _) = sim::run_seed(&back, seed, &opts).expect("runs");
    assert!(r.kinds().contains(&ViolationKind::Loss));
}

#[test]
fn every_shipped_scenario_meets_its_expectations_on_its_seed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let files = sim::scenario::collect(&dir).expect("scenarios dir");
    assert!(files.len() >= 10);
    for f in files {
        let sc = Scenario::load(&f).expect("parses");
        let (r, _) = sim::run_seed(&sc, sc.seed, &RunOptions::default()).expect("runs");
        assert!(r.passed, "{}: {:?}", f.display(), r.failures);
    }
}

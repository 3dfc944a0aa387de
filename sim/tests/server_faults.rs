//! Faults inside the chat service (BUGGIFY): each crash point fires where it says and the
//! correct server loses nothing through it; store errors expose a write made outside its
//! commit; a frozen service handles nothing until it resumes; a stepped clock and the
//! seeded host order keep runs deterministic.

use sim::{RunOptions, Scenario, ViolationKind};
use std::path::Path;

fn shipped() -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/server-faults.toml");
    Scenario::load(&path).expect("shipped scenario parses")
}

fn small(faults: &str, extra: &str) -> Scenario {
    Scenario::parse(
        &format!(
            r#"
name = "faults"
duration_ms = 12000
quiet_ms = 30000
{extra}
[workload]
users = 4
devices_per_user = 2
messages_per_user = 12
send_window_ms = [0, 10000]
[[workload.groups]]
size = 3
messages = 8
{faults}
"#
        ),
        "faults.toml",
    )
    .expect("parses")
}

#[test]
fn every_crash_point_fires_and_the_correct_server_loses_nothing() {
    let sc = shipped();
    for seed in 1..=3 {
        let (r, o) = sim::run_seed(&sc, seed, &RunOptions::default()).expect("runs");
        assert!(r.passed, "seed {seed}: {:?}", r.failures);
        for point in ["after_commit", "after_ack", "mid_fanout"] {
            let want = format!("crash_point fired at {point}");
            assert!(
                o.ledger.trace.iter().any(|e| e.detail.starts_with(&want)),
                "seed {seed}: {want} is in the trace"
            );
        }
    }
}

#[test]
fn inbox_copies_committed_apart_from_their_message_are_lost_when_that_commit_fails() {
    let mut opts = RunOptions::default();
    opts.bugs.enable("inbox-outside-commit").expect("known bug");
    let sc = small(
        "[[faults]]\nat_ms = 2000\nkind = \"store_errors\"\nfail_rate = 0.4\nuntil_ms = 8000\n",
        "",
    );
    let caught = (1..=5).any(|seed| {
        let (r, _) = sim::run_seed(&sc, seed, &opts).expect("runs");
        r.kinds().contains(&ViolationKind::Loss)
    });
    assert!(
        caught,
        "a store error between the two commits loses a message"
    );
    for seed in 1..=3 {
        let (r, _) = sim::run_seed(&sc, seed, &RunOptions::default()).expect("runs");
        assert!(r.passed, "correct server, seed {seed}: {:?}", r.failures);
    }
}

#[test]
fn a_frozen_chat_service_stores_nothing_until_it_resumes() {
    let sc = small(
        "[[faults]]\nat_ms = 3000\nkind = \"pause\"\nhost = \"chat\"\nuntil_ms = 7000\n",
        "",
    );
    let (r, o) = sim::run_seed(&sc, 1, &RunOptions::default()).expect("runs");
    assert!(r.passed, "{:?}", r.failures);
    let stored: Vec<u64> = o
        .ledger
        .trace
        .iter()
        .filter(|e| e.event == "stored")
        .map(|e| e.t)
        .collect();
    assert!(stored.iter().any(|t| *t < 3000), "stores before the pause");
    assert!(stored.iter().any(|t| *t >= 7000), "stores after it");
    // A frame read just before the pause may finish within a tick of it.
    let during: Vec<&u64> = stored
        .iter()
        .filter(|t| (3050..7000).contains(*t))
        .collect();
    assert!(during.is_empty(), "nothing stored while frozen: {during:?}");
}

#[test]
fn stepped_clocks_and_seeded_host_order_replay_bit_for_bit() {
    let sc = small(
        "[[faults]]\nat_ms = 2000\nkind = \"clock_jump\"\nskew_ms = 7200000\n\n[[faults]]\nat_ms = 4000\nkind = \"clock_jump\"\nskew_ms = -90000\n",
        "[topology]\nrandom_order = true\ngateways_per_region = 2\nclient_hosts = 2\n",
    );
    let (a, _) = sim::run_seed(&sc, 4, &RunOptions::default()).expect("runs");
    let (b, _) = sim::run_seed(&sc, 4, &RunOptions::default()).expect("runs");
    assert!(a.passed, "{:?}", a.failures);
    assert_eq!(a.trace_hash, b.trace_hash, "same seed, same trace");
    let mut fixed = sc.clone();
    fixed.topology.random_order = false;
    let (c, _) = sim::run_seed(&fixed, 4, &RunOptions::default()).expect("runs");
    assert!(c.passed, "{:?}", c.failures);
    assert_ne!(
        a.trace_hash, c.trace_hash,
        "the host order is part of the draw"
    );
}

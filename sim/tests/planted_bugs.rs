//! Every planted bug is caught by a shipped scenario within 100 seeds, and the same
//! scenarios pass without it. This is the evidence that the oracle can fail.

use sim::{RunOptions, Scenario, ViolationKind};
use std::path::Path;

fn scenario(name: &str) -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../scenarios")
        .join(format!("{name}.toml"));
    Scenario::load(&path).expect("shipped scenario parses")
}

/// First seed in 1..=100 at which `bug` makes `name` show a `kind` violation.
fn caught_at(name: &str, bug: &str, kind: ViolationKind) -> u64 {
    let sc = scenario(name);
    let mut opts = RunOptions::default();
    opts.bugs.enable(bug).expect("known bug");
    for seed in 1..=100 {
        let (r, _) = sim::run_seed(&sc, seed, &opts).expect("simulation runs");
        if r.kinds().contains(&kind) {
            assert!(!r.passed, "a found violation fails the run");
            return seed;
        }
    }
    panic!("{bug} was not caught by {name} within 100 seeds; replay: chatsim run scenarios/{name}.toml --seeds 1..100 --bug {bug}");
}

fn passes_without_bugs(name: &str) {
    let sc = scenario(name);
    let (r, _) = sim::run_seed(&sc, sc.seed, &RunOptions::default()).expect("runs");
    assert!(
        r.passed,
        "{name} seed {} fails without bugs: {:?}",
        sc.seed, r.failures
    );
}

#[test]
fn ack_before_persist_loses_acked_messages_when_the_chat_service_crashes() {
    passes_without_bugs("chat-crash");
    caught_at("chat-crash", "ack-before-persist", ViolationKind::Loss);
}

#[test]
fn no_dedup_duplicates_a_retried_send() {
    passes_without_bugs("elevator-retry");
    caught_at("elevator-retry", "no-dedup", ViolationKind::Duplicate);
}

#[test]
fn order_by_client_clock_breaks_per_chat_order() {
    passes_without_bugs("clock-skew");
    caught_at("clock-skew", "order-by-client-clock", ViolationKind::Order);
}

#[test]
fn unbounded_outbound_queue_breaks_the_queue_bound() {
    passes_without_bugs("slow-consumer");
    caught_at(
        "slow-consumer",
        "unbounded-outbound-queue",
        ViolationKind::QueueBound,
    );
}

#[test]
fn skip_sync_on_reconnect_loses_the_offline_backlog() {
    passes_without_bugs("offline-inbox");
    caught_at(
        "offline-inbox",
        "skip-sync-on-reconnect",
        ViolationKind::Loss,
    );
}

#[test]
fn push_with_content_leaks_message_content() {
    caught_at(
        "offline-inbox",
        "push-with-content",
        ViolationKind::Plaintext,
    );
}

#[test]
fn async_replication_loses_messages_on_region_failover() {
    passes_without_bugs("region-failover");
    caught_at(
        "region-failover",
        "async-replication-failover",
        ViolationKind::Loss,
    );
}

#[test]
fn truncated_media_is_caught_as_a_lost_file() {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios/stories/family-group-video.toml");
    let sc = Scenario::load(&path).expect("story parses");
    let (clean, _) = sim::run_seed(&sc, sc.seed, &RunOptions::default()).expect("runs");
    assert!(clean.passed, "passes without the bug: {:?}", clean.failures);
    let mut opts = RunOptions::default();
    opts.bugs.enable("truncated-media").expect("known bug");
    let (r, _) = sim::run_seed(&sc, sc.seed, &opts).expect("runs");
    assert!(!r.passed);
    assert!(r.kinds().contains(&ViolationKind::Loss));
    assert!(
        r.violations
            .iter()
            .any(|v| v.seen.contains("differs from the one sent")),
        "{:?}",
        r.violations
    );
}

#[test]
fn unlinked_tokens_that_still_work_are_an_auth_breach() {
    passes_without_bugs("device-unlink");
    caught_at("device-unlink", "unlinked-tokens-work", ViolationKind::Auth);
}

#[test]
fn an_unlink_that_keeps_the_copies_waiting_for_it_leaks_storage() {
    caught_at(
        "device-unlink",
        "unlink-keeps-copies",
        ViolationKind::StorageLeak,
    );
}

#[test]
fn no_inbox_when_online_loses_what_a_cut_off_gateway_was_handed() {
    passes_without_bugs("gateway-cut-off");
    assert_eq!(
        caught_at(
            "gateway-cut-off",
            "no-inbox-when-online",
            ViolationKind::Loss
        ),
        1
    );
    // The same scenario with every gateway in-process (no link to cut) does not see it:
    // the loss needs the window in which the chat service still routes to connections of
    // a gateway that can no longer reach their phones.
    let mut flat = scenario("gateway-cut-off");
    flat.topology.tiered = false;
    let mut opts = RunOptions::default();
    opts.bugs.enable("no-inbox-when-online").expect("known bug");
    let (r, _) = sim::run_seed(&flat, flat.seed, &opts).expect("runs");
    assert!(r.passed, "untiered: {:?}", r.failures);
}

#[test]
fn no_inbox_when_online_loses_what_was_routed_to_a_vanished_gateways_stale_connections() {
    passes_without_bugs("stale-registry-after-gateway-crash");
    caught_at(
        "stale-registry-after-gateway-crash",
        "no-inbox-when-online",
        ViolationKind::Loss,
    );
    // In-process gateways learn of the crash at once: no stale window, no loss.
    let mut flat = scenario("stale-registry-after-gateway-crash");
    flat.topology.tiered = false;
    let mut opts = RunOptions::default();
    opts.bugs.enable("no-inbox-when-online").expect("known bug");
    let (r, _) = sim::run_seed(&flat, flat.seed, &opts).expect("runs");
    assert!(r.passed, "untiered: {:?}", r.failures);
}

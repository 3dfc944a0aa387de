//! The knobs of the design space (`[swarm.space]`): names, default bounds and hard limits.
//! Plain data, below the scenario format that checks bounds against it and the drawing in
//! `space` that uses it.

use std::collections::BTreeMap;

/// One knob: its name, default bounds, hard limits and what it sets.
pub struct Knob {
    pub name: &'static str,
    pub default: [f64; 2],
    pub limits: [f64; 2],
    pub what: &'static str,
}

const fn k(name: &'static str, lo: f64, hi: f64, min: f64, max: f64, what: &'static str) -> Knob {
    Knob {
        name,
        default: [lo, hi],
        limits: [min, max],
        what,
    }
}

/// Every knob a seed draws, grouped by what it sets.
#[rustfmt::skip]
pub const KNOBS: &[Knob] = &[
    // Topology.
    k("regions", 1.0, 3.0, 1.0, 3.0, "regions (eu, us, ap)"),
    k("gateways_per_region", 1.0, 2.0, 1.0, 4.0, "gateways per region"),
    k("client_hosts", 1.0, 3.0, 1.0, 8.0, "hosts carrying the phones"),
    k("latency_max_ms", 5.0, 80.0, 1.0, 1000.0, "per-segment latency cap"),
    k("tcp_segments", 16.0, 256.0, 4.0, 4096.0, "TCP buffer and accept backlog"),
    // Workload.
    k("users", 2.0, 16.0, 2.0, 2000.0, "users"),
    k("devices_per_user", 1.0, 4.0, 1.0, 8.0, "devices per user"),
    k("messages_per_user", 0.0, 24.0, 0.0, 1000.0, "1:1 messages per user"),
    k("groups", 0.0, 3.0, 0.0, 10.0, "groups"),
    k("group_messages", 0.0, 40.0, 0.0, 2000.0, "messages per group"),
    k("burst_probability", 0.25, 0.25, 0.0, 1.0, "chance all sends fall in one short burst"),
    k("announcement_probability", 0.15, 0.15, 0.0, 1.0, "chance a group is announcement-only"),
    k("media_probability", 0.1, 0.1, 0.0, 1.0, "chance a group's first message carries a file"),
    k("link_probability", 0.0, 0.35, 0.0, 1.0, "chance a second..fourth device is linked mid-run"),
    k("membership_changes", 0.0, 3.0, 0.0, 20.0, "members added or removed mid-run"),
    k("fault_max_ms", 1000.0, 20000.0, 1000.0, 600000.0, "longest a drawn fault lasts"),
    k("typing_probability", 0.2, 0.2, 0.0, 1.0, "chance users type before each send"),
    // Server limits.
    k("sync_page_cap", 1.0, 64.0, 1.0, 10000.0, "messages per sync page"),
    k("sync_scan_rows", 8.0, 512.0, 1.0, 100000.0, "inbox rows one pending sync page scans"),
    k("group_fanout_threshold", 2.0, 10.0, 1.0, 1000.0, "largest copy-on-send group"),
    k("outbound_max_frames", 8.0, 1024.0, 4.0, 100000.0, "outbound queue frames"),
    k("outbound_max_bytes", 16384.0, 1048576.0, 4096.0, 67108864.0, "outbound queue bytes"),
    k("send_rate_per_sec", 2.0, 40.0, 1.0, 10000.0, "sends per second per user"),
    k("send_burst", 2.0, 100.0, 1.0, 10000.0, "send burst per user"),
    k("presence_timeout_ms", 20000.0, 60000.0, 5000.0, 600000.0, "server idle timeout"),
    k("media_chunk_bytes", 4096.0, 262144.0, 1024.0, 1048576.0, "media chunk size"),
    k("keep_history_probability", 0.2, 0.2, 0.0, 1.0, "chance the server keeps bodies after every device acked"),
    k("auth_timeout_ms", 3000.0, 10000.0, 1000.0, 60000.0, "server's deadline for the auth frame"),
    k("typing_min_interval_ms", 100.0, 5000.0, 0.0, 60000.0, "typing notices one user may send per conversation"),
    k("short_retention_probability", 0.35, 0.35, 0.0, 1.0, "chance retention (and so the dedup window) is short enough to cross in the run"),
    k("retention_ms", 2000.0, 120000.0, 1000.0, 2592000000.0, "a short retention, when drawn (else 30 days)"),
    k("sweep_interval_ms", 250.0, 60000.0, 250.0, 3600000.0, "expiry sweep interval"),
    k("sweep_batch", 1.0, 1024.0, 1.0, 100000.0, "messages one sweep step deletes"),
    // Phones.
    k("heartbeat_ms", 1000.0, 8000.0, 100.0, 60000.0, "phone heartbeat"),
    k("idle_timeout_ms", 6000.0, 20000.0, 1000.0, 120000.0, "phone idle timeout (at least 3 heartbeats)"),
    k("ack_timeout_ms", 300.0, 8000.0, 50.0, 60000.0, "resend an unacked message after"),
    k("backoff_initial_ms", 50.0, 2000.0, 1.0, 60000.0, "first reconnect backoff"),
    k("backoff_max_ms", 1000.0, 20000.0, 1.0, 600000.0, "backoff cap"),
    k("read_probability", 0.0, 1.0, 0.0, 1.0, "share of messages read"),
    k("read_delay_max_ms", 0.0, 5000.0, 0.0, 600000.0, "longest delay before reading"),
    k("sync_after_seq_probability", 0.0, 1.0, 0.0, 1.0, "chance a connection also syncs per conversation after_seq"),
    k("sync_limit", 0.0, 64.0, 0.0, 10000.0, "page size phones ask for (0: none)"),
    k("start_jitter_ms", 0.0, 3000.0, 0.0, 600000.0, "spread of app starts"),
    // Simulation.
    k("random_order_probability", 0.5, 0.5, 0.0, 1.0, "chance hosts run in a seeded random order each step"),
    k("short_token_probability", 0.3, 0.3, 0.0, 1.0, "chance session tokens expire within the run"),
    k("token_life_ms", 2000.0, 60000.0, 500.0, 2592000000.0, "a short token life, when drawn"),
    // Store.
    k("group_commit_probability", 0.5, 0.5, 0.0, 1.0, "chance the store groups commits (answers wait for a sync round; a crash keeps a prefix of the unsynced batches)"),
    k("fsync_ms", 0.0, 20.0, 0.0, 10000.0, "how long one group-commit sync round takes"),
    // Operations (drawn last).
    k("unlink_probability", 0.0, 0.3, 0.0, 1.0, "chance each device but the first is unlinked mid-run (by the first device or itself)"),
    // Topology (drawn last).
    k("tiered_probability", 0.75, 0.75, 0.0, 1.0, "chance gateways are nodes of their own linked to the chat service over the network (links faults can cut); otherwise in-process"),
];

/// Checks `[swarm.space]` bounds: known names, `min <= max`, within the hard limits.
pub fn check_bounds(b: &BTreeMap<String, [f64; 2]>) -> Result<(), String> {
    for (name, [lo, hi]) in b {
        let Some(kn) = KNOBS.iter().find(|k| k.name == name) else {
            return Err(format!(
                "unknown knob '{name}' in [swarm.space]; known: {}",
                KNOBS.iter().map(|k| k.name).collect::<Vec<_>>().join(", ")
            ));
        };
        if !(lo <= hi && *lo >= kn.limits[0] && *hi <= kn.limits[1]) {
            return Err(format!(
                "[swarm.space] {name} = [{lo}, {hi}]: need min <= max within [{}, {}]",
                kn.limits[0], kn.limits[1]
            ));
        }
    }
    Ok(())
}

//! `/metrics` in Prometheus text format: connections, queue depths, messages in and out,
//! inbox size, and the process's CPU time and resident memory (for KiB per connection and
//! CPU per delivered message in load reports).

use super::{lock, Server};
use crate::store::Table;
use std::fmt::Write as _;

/// Largest inbox counted exactly on one scrape.
const INBOX_COUNT_CAP: usize = 1_000_000;

/// Renders every metric of `server`.
pub fn render(server: &Server) -> String {
    let (g, s, inbox) = {
        let core = lock(&server.hub.core);
        let inbox = core
            .store()
            .scan(Table::Inbox, b"", b"", INBOX_COUNT_CAP)
            .map(|r| r.len())
            .unwrap_or(0);
        (core.gauges(), core.stats().clone(), inbox)
    };
    let mut out = String::with_capacity(2048);
    let mut m = |name: &str, kind: &str, help: &str, v: u64| {
        let _ = writeln!(
            out,
            "# HELP chatsim_{name} {help}\n# TYPE chatsim_{name} {kind}\nchatsim_{name} {v}"
        );
    };
    m(
        "connections",
        "gauge",
        "Open WebSocket connections.",
        g.connections,
    );
    m(
        "connections_authenticated",
        "gauge",
        "Connections that completed auth.",
        g.authenticated,
    );
    m(
        "outbound_queue_frames",
        "gauge",
        "Frames waiting in all outbound queues.",
        g.outbound_frames,
    );
    m(
        "outbound_queue_bytes",
        "gauge",
        "Bytes waiting in all outbound queues.",
        g.outbound_bytes,
    );
    m(
        "outbound_queue_max_frames",
        "gauge",
        "Deepest outbound queue now, in frames.",
        g.outbound_max_frames,
    );
    m(
        "outbound_queue_high_water_frames",
        "gauge",
        "Deepest outbound queue ever, in frames.",
        s.outbound_high_water,
    );
    m(
        "inbox_entries",
        "gauge",
        "Inbox copies not yet acked by every device.",
        inbox as u64,
    );
    m(
        "connections_opened_total",
        "counter",
        "Connections accepted.",
        s.connections_opened,
    );
    m(
        "frames_in_total",
        "counter",
        "Client frames received.",
        s.frames_in,
    );
    m(
        "frames_out_total",
        "counter",
        "Server frames written.",
        s.frames_out,
    );
    m(
        "messages_in_total",
        "counter",
        "Messages stored (after dedup).",
        s.messages_stored,
    );
    m(
        "messages_deduplicated_total",
        "counter",
        "Retries answered with 409.",
        s.messages_deduplicated,
    );
    m(
        "messages_out_total",
        "counter",
        "Message deliveries queued to devices.",
        s.deliveries_enqueued,
    );
    m(
        "pushes_total",
        "counter",
        "Content-free push wake-ups.",
        s.pushes,
    );
    m(
        "errors_total",
        "counter",
        "Error frames sent.",
        s.errors_sent,
    );
    m(
        "dropped_frames_total",
        "counter",
        "Typing/presence frames shed under backpressure.",
        s.droppable_frames_dropped,
    );
    m(
        "slow_consumer_disconnects_total",
        "counter",
        "Connections closed for a full outbound queue.",
        s.slow_consumer_disconnects,
    );
    m(
        "messages_expired_total",
        "counter",
        "Messages removed after retention.",
        s.messages_expired,
    );
    m(
        "bodies_purged_total",
        "counter",
        "Message bodies removed after every device acked.",
        s.bodies_purged,
    );
    if let Some((cpu_us, rss)) = process_usage() {
        m(
            "process_cpu_microseconds_total",
            "counter",
            "CPU time of the server process.",
            cpu_us,
        );
        m(
            "process_resident_bytes",
            "gauge",
            "Resident memory of the server process.",
            rss,
        );
    }
    // Traffic per storage partition and the hottest conversation (core/hot.rs).
    let _ = writeln!(
        out,
        "# HELP chatsim_partition_messages_total Messages stored, by partition of the conversation keyspace (FNV-1a of the id mod {}).\n# TYPE chatsim_partition_messages_total counter",
        crate::core::hot::PARTITIONS
    );
    for (p, n) in s.hot.per_partition.iter().enumerate() {
        let _ = writeln!(
            out,
            "chatsim_partition_messages_total{{partition=\"{p}\"}} {n}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP chatsim_hottest_conversation_messages Messages stored in the busiest conversation of the last complete minute (Space-Saving estimate, at least this many).\n# TYPE chatsim_hottest_conversation_messages gauge"
    );
    match s.hot.hottest(server.now()) {
        Some((conv, n)) => {
            let _ = writeln!(
                out,
                "chatsim_hottest_conversation_messages{{conversation=\"{conv}\",partition=\"{}\"}} {n}",
                crate::core::hot::partition_of(&conv)
            );
        }
        None => {
            let _ = writeln!(out, "chatsim_hottest_conversation_messages 0");
        }
    }
    out
}

/// (CPU microseconds, resident bytes) of this process, from /proc on Linux.
pub(crate) fn process_usage() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    // Linux reports these in clock ticks; USER_HZ is 100 on every mainstream platform.
    let cpu_us = (utime + stime) * 10_000;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some((cpu_us, pages * 4096))
}

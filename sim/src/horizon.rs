//! Retention as the oracle sees it. The server deletes every message (with its inbox
//! copies and its dedup record) once it is `retention_ms` old on the server's clock,
//! delivered or not, so retention is also the dedup window. A run whose retention is short,
//! or whose server clock jumps past it, has messages the server may rightly have forgotten:
//! missing on a device that was away, or stored a second time when a retry came after the
//! dedup record went. And it has rows that must be gone by the end.
//!
//! Both questions are answered from the phones' own times and the clock steps the fault
//! timeline made, never from the server's state, and both err on the side of the server:
//! `expirable` says yes whenever expiry was possible, `gone_before` says nothing while a
//! sweep could still be due.

use crate::device::EPOCH_MS;
use crate::ledger::Ledger;
use model_server::config::Limits;

/// How often the simulated chat service ticks its core (the sweep runs on ticks).
const TICK_MS: u64 = 250;
/// Slack on top of the sweep's own schedule (scheduling, a tick or two).
const SLACK_MS: u64 = 1_000;

/// The server clock's steps over a run (clock-jump faults), so the oracle can bound what
/// the server's clock read at any simulated time: `EPOCH + t + offset`, the offset within
/// `[min_offset_ms, max_offset_ms]` (both include 0, the offset at the start).
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerClock {
    pub min_offset_ms: i64,
    pub max_offset_ms: i64,
    /// The offset at the end of the run.
    pub end_offset_ms: i64,
    /// Simulated ms of the last step, if any.
    pub last_step_ms: Option<u64>,
}

impl ServerClock {
    /// Records a step of `ms` at simulated `t`.
    pub fn step(&mut self, t: u64, ms: i64) {
        self.end_offset_ms += ms;
        self.min_offset_ms = self.min_offset_ms.min(self.end_offset_ms);
        self.max_offset_ms = self.max_offset_ms.max(self.end_offset_ms);
        self.last_step_ms = Some(t);
    }
}

/// The earliest simulated time at which a message first put on a socket at simulated
/// `first_attempt_ms` can have expired: it was stored no earlier than that, on a clock no
/// further back than `min_offset_ms`, and the server's clock reads at most `t +
/// max_offset_ms` at simulated `t`.
pub fn expires_from(
    first_attempt_ms: u64,
    retention_ms: u64,
    min_offset_ms: i64,
    max_offset_ms: i64,
) -> u64 {
    let t = first_attempt_ms as i128 + min_offset_ms as i128 + retention_ms as i128
        - max_offset_ms as i128;
    t.clamp(0, u64::MAX as i128) as u64
}

/// May that message have expired by simulated `at`?
pub fn may_have_expired(
    first_attempt_ms: u64,
    at: u64,
    retention_ms: u64,
    min_offset_ms: i64,
    max_offset_ms: i64,
) -> bool {
    at >= expires_from(first_attempt_ms, retention_ms, min_offset_ms, max_offset_ms)
}

/// What retention allows in one finished run.
pub struct Horizon {
    retention_ms: u64,
    end_ms: u64,
    min_offset_ms: i64,
    max_offset_ms: i64,
    /// Server-clock ms before which every stored message must be gone, when known.
    cutoff: Option<u64>,
}

impl Horizon {
    /// The horizon of a run that ended at `end_ms` under `limits` and `clock`, judged from
    /// what the phones recorded.
    pub fn new(limits: &Limits, clock: ServerClock, end_ms: u64, ledger: &Ledger) -> Self {
        let c = clock;
        // Every attempt may store one message (a retry after expiry is stored again).
        let stored_at_most: u64 = ledger.sends.iter().map(|s| u64::from(s.attempts)).sum();
        let batch = limits.sweep_batch.max(1) as u64;
        // A due message is gone one interval after it fell due (the next sweep), plus one
        // tick per full batch ahead of it.
        let lag = limits.sweep_interval_ms + (stored_at_most / batch + 2) * TICK_MS + SLACK_MS;
        // Only judged when the clock was steady and nothing froze or crashed the chat
        // service (the quiet phase) for that whole lag before the end.
        let steady_from = c.last_step_ms.unwrap_or(0).max(ledger.quiet_from_ms);
        let cutoff = (end_ms.saturating_sub(steady_from) >= lag).then(|| {
            (EPOCH_MS + end_ms)
                .saturating_add_signed(c.end_offset_ms)
                .saturating_sub(lag + limits.retention_ms)
        });
        Horizon {
            retention_ms: limits.retention_ms,
            end_ms,
            min_offset_ms: c.min_offset_ms,
            max_offset_ms: c.max_offset_ms,
            cutoff,
        }
    }

    /// The earliest simulated time the server can have expired (and forgotten the dedup
    /// record of) a message first put on a socket at `first_attempt_ms`, if that is within
    /// the run.
    pub fn expires_from(&self, first_attempt_ms: u64) -> Option<u64> {
        let e = expires_from(
            first_attempt_ms,
            self.retention_ms,
            self.min_offset_ms,
            self.max_offset_ms,
        );
        (e <= self.end_ms).then_some(e)
    }

    /// Server-clock ms (`stored_at`) before which no message may still be stored at the
    /// end, or `None` when the run gave the sweep no steady window to finish in.
    pub fn gone_before(&self) -> Option<u64> {
        self.cutoff
    }
}

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

/// The server clock's steps over a run (clock-jump faults): the server's clock reads
/// `EPOCH + t + offset(t)` at simulated `t`, the offset 0 until the first step.
#[derive(Clone, Debug, Default)]
pub struct ServerClock {
    /// (simulated ms, offset from then on), in time order.
    pub steps: Vec<(u64, i64)>,
}

impl ServerClock {
    /// The timeline of the clock-jump faults `(at, step)` (in any order).
    pub fn from_jumps(mut jumps: Vec<(u64, i64)>) -> Self {
        jumps.sort_by_key(|j| j.0);
        let mut c = ServerClock::default();
        for (t, ms) in jumps {
            c.step(t, ms);
        }
        c
    }

    /// Records a step of `ms` at simulated `t` (not before the previous one).
    pub fn step(&mut self, t: u64, ms: i64) {
        let now = self.end_offset_ms();
        self.steps.push((t, now + ms));
    }

    /// The offset at the end of the run.
    pub fn end_offset_ms(&self) -> i64 {
        self.steps.last().map_or(0, |s| s.1)
    }

    /// Simulated ms of the last step, if any.
    pub fn last_step_ms(&self) -> Option<u64> {
        self.steps.last().map(|s| s.0)
    }

    /// The server clock's reading at simulated `t`, in ms after the epoch.
    pub fn reading(&self, t: u64) -> i64 {
        t as i64 + self.offset_at(t)
    }

    /// The lowest reading of the server clock at any time in `[a, b]` (within a stretch
    /// between steps it only grows, so only `a` and the steps inside count).
    pub fn min_reading(&self, a: u64, b: u64) -> i64 {
        self.steps
            .iter()
            .filter(|s| s.0 > a && s.0 <= b)
            .map(|&(at, o)| at as i64 + o)
            .fold(self.reading(a), i64::min)
    }

    /// The offset in effect at simulated `t`.
    fn offset_at(&self, t: u64) -> i64 {
        self.steps
            .iter()
            .take_while(|s| s.0 <= t)
            .last()
            .map_or(0, |s| s.1)
    }

    /// The earliest simulated time at which a message first put on a socket at simulated
    /// `first_attempt_ms` can have expired. It was stored at some `s` at or after that, at
    /// the reading `s + offset(s)`, and expires at the first `y >= s` whose reading
    /// `y + offset(y)` is retention past it; the earliest over every possible `s` (within
    /// a stretch between steps, the earliest `s` is the worst case).
    pub fn expires_from(&self, first_attempt_ms: u64, retention_ms: u64) -> u64 {
        let t = first_attempt_ms;
        // Stretches of constant offset from `t` on: (start, end, offset).
        let mut stretches: Vec<(u64, u64, i64)> = Vec::new();
        let mut start = t;
        let mut off = self.offset_at(t);
        for &(at, o) in self.steps.iter().filter(|s| s.0 > t) {
            stretches.push((start, at, off));
            start = at;
            off = o;
        }
        stretches.push((start, u64::MAX, off));
        let mut best = u64::MAX;
        for (k, &(s, _, o)) in stretches.iter().enumerate() {
            let target = s as i128 + o as i128 + retention_ms as i128;
            for &(a, end, oj) in &stretches[k..] {
                let y = (target - oj as i128).max(a as i128);
                if y < end as i128 {
                    best = best.min(y.clamp(0, u64::MAX as i128) as u64);
                    break;
                }
            }
        }
        best
    }
}

/// May a message first put on a socket at `first_attempt_ms` have expired by `at`?
pub fn may_have_expired(
    clock: &ServerClock,
    first_attempt_ms: u64,
    at: u64,
    retention_ms: u64,
) -> bool {
    at >= clock.expires_from(first_attempt_ms, retention_ms)
}

/// What retention allows in one finished run.
pub struct Horizon {
    retention_ms: u64,
    end_ms: u64,
    clock: ServerClock,
    /// Server-clock ms before which every stored message must be gone, when known.
    cutoff: Option<u64>,
}

impl Horizon {
    /// The horizon of a run that ended at `end_ms` under `limits` and `clock`, judged from
    /// what the phones recorded.
    pub fn new(limits: &Limits, clock: &ServerClock, end_ms: u64, ledger: &Ledger) -> Self {
        let c = clock;
        // Every attempt may store one message (a retry after expiry is stored again).
        let stored_at_most: u64 = ledger.sends.iter().map(|s| u64::from(s.attempts)).sum();
        let batch = limits.sweep_batch.max(1) as u64;
        // A due message is gone one interval after it fell due (the next sweep), plus one
        // tick per full batch ahead of it.
        let lag = limits.sweep_interval_ms + (stored_at_most / batch + 2) * TICK_MS + SLACK_MS;
        // Only judged when the clock was steady and nothing froze or crashed the chat
        // service (the quiet phase) for that whole lag before the end.
        let steady_from = c.last_step_ms().unwrap_or(0).max(ledger.quiet_from_ms);
        let cutoff = (end_ms.saturating_sub(steady_from) >= lag).then(|| {
            (EPOCH_MS + end_ms)
                .saturating_add_signed(c.end_offset_ms())
                .saturating_sub(lag + limits.retention_ms)
        });
        Horizon {
            retention_ms: limits.retention_ms,
            end_ms,
            clock: clock.clone(),
            cutoff,
        }
    }

    /// The earliest simulated time the server can have expired (and forgotten the dedup
    /// record of) a message first put on a socket at `first_attempt_ms`, if that is within
    /// the run.
    pub fn expires_from(&self, first_attempt_ms: u64) -> Option<u64> {
        let e = self.clock.expires_from(first_attempt_ms, self.retention_ms);
        (e <= self.end_ms).then_some(e)
    }

    /// Server-clock ms (`stored_at`) before which no message may still be stored at the
    /// end, or `None` when the run gave the sweep no steady window to finish in.
    pub fn gone_before(&self) -> Option<u64> {
        self.cutoff
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_lowest_reading_over_a_window_sees_a_step_back_inside_it() {
        let c = ServerClock::from_jumps(vec![(1_000, -600), (2_000, 5_000)]);
        assert_eq!(c.reading(500), 500);
        assert_eq!(c.reading(1_000), 400);
        assert_eq!(c.min_reading(900, 1_500), 400, "the step back at 1 s");
        assert_eq!(
            c.min_reading(1_100, 2_500),
            500,
            "readings grow within a stretch"
        );
        assert_eq!(c.min_reading(2_100, 2_200), 2_100 + 4_400);
    }

    use super::ServerClock;

    #[test]
    fn without_steps_a_message_expires_retention_after_its_first_attempt() {
        assert_eq!(ServerClock::default().expires_from(1_000, 5_000), 6_000);
    }

    #[test]
    fn a_forward_step_brings_expiry_to_the_step_and_only_after_it() {
        let c = ServerClock::from_jumps(vec![(2_000, 3_600_000)]);
        assert_eq!(
            c.expires_from(1_000, 5_000),
            2_000,
            "the jump ages it at once"
        );
        // A message first sent after the jump is only as old as it looks.
        assert_eq!(c.expires_from(10_000, 5_000), 15_000);
    }

    #[test]
    fn a_backward_step_never_brings_expiry_before_the_message_existed() {
        let c = ServerClock::from_jumps(vec![(2_000, -600_000)]);
        assert_eq!(c.expires_from(3_000, 5_000), 8_000);
        // Attempted before the step: stored before it, the reading that expires it comes
        // 600 s after the step; stored just after it (at 2 s), retention after that.
        assert_eq!(c.expires_from(1_000, 5_000), 7_000);
    }
}

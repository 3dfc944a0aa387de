//! The shared latency ledger: what was sent when (intended and actual), and what arrived.
//!
//! Sends are scheduled open loop; the corrected latency is measured from the *intended*
//! send time, so a stalled server cannot hide behind a stalled generator (coordinated
//! omission). The raw figure (from the actual send) is kept too. One monotonic clock
//! (`Instant`) serves sender and receiver: both live in this process.

use crate::LoadConfig;
use hdrhistogram::Histogram;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Highest latency recorded, µs (an hour).
const MAX_US: u64 = 3_600_000_000;

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3)
        .unwrap_or_else(|_| Histogram::new(3).expect("3 sig figs is valid"))
}

/// A send not yet fully accounted for.
#[derive(Clone, Copy, Debug)]
pub struct InFlight {
    pub intended: Instant,
    pub actual: Instant,
    /// Recipient devices still to receive it.
    pub waiting: u32,
    pub acked: bool,
}

/// One second of the run, by intended send time.
pub struct Window {
    pub sent: u64,
    pub delivered: u64,
    pub acked: u64,
    pub connections: i64,
    pub deliver: Histogram<u64>,
    /// Send→ack of the messages sent in this second.
    pub ack: Histogram<u64>,
    /// Errors that happened in this second (by when they happened, not by send time).
    pub errors: u64,
}

/// When each phase of a run starts, fixed when the last user has connected.
///
/// `connected` (the next whole second) → idle phase (`cfg.idle`: every socket open, no
/// sends, the server's memory is read at its end) → `sends_from`: warm-up ([`WARM_UP`],
/// sent but not measured) → `from`: the measured phase, [from, until) of intended send
/// times, lasting `cfg.duration`; no send is scheduled after it.
#[derive(Clone, Copy, Debug)]
pub struct Phases {
    pub connected: Instant,
    pub sends_from: Instant,
    pub from: Instant,
    pub until: Instant,
}

/// Sending before the measured phase, so first-message costs are not measured.
pub const WARM_UP: std::time::Duration = std::time::Duration::from_secs(1);

/// The whole run's shared state.
pub struct Shared {
    pub cfg: LoadConfig,
    /// Time zero of the run (users start ramping here), and the same instant in Unix µs
    /// (to compare with the server's timestamps, on the same machine's clock).
    pub start: Instant,
    pub start_unix_us: u64,
    /// The run's phases once every user has connected (Goose may take a while to build its
    /// users); `None` until then.
    phases: Mutex<Option<Phases>>,
    /// Users whose on_start finished (connected or failed).
    pub started: AtomicUsize,
    pub next_user: AtomicUsize,
    /// Senders that connected and finished their set-up (ready to send).
    pub ready: AtomicUsize,
    pub connections: AtomicI64,
    pub sent: AtomicU64,
    pub delivered: AtomicU64,
    pub acked: AtomicU64,
    pub errors: AtomicU64,
    /// Errors by kind (`connect`, `auth`, `send`, `error CODE`), for the report.
    pub error_kinds: Mutex<std::collections::BTreeMap<String, u64>>,
    /// client_message_id -> in-flight send, until it is acked and every recipient has it.
    pub pending: Mutex<HashMap<String, InFlight>>,
    pub deliver: Mutex<Histogram<u64>>,
    pub deliver_raw: Mutex<Histogram<u64>>,
    pub ack: Mutex<Histogram<u64>>,
    /// The hops of send→deliver, from the server's own timestamp of the commit (1 ms
    /// resolution): actual send → commit, and commit → received by the recipient.
    pub to_commit: Mutex<Histogram<u64>>,
    pub commit_to_receive: Mutex<Histogram<u64>>,
    /// Generator health: how late the send schedule ran, and event-loop lag, µs.
    pub slip: Mutex<Histogram<u64>>,
    pub lag: Mutex<Histogram<u64>>,
    pub windows: Mutex<Vec<Window>>,
    /// Reconnect storm: time from drop to reconnected, and from drop to backlog drained, µs.
    pub storm_reconnect: Mutex<Histogram<u64>>,
    pub storm_catch_up: Mutex<Histogram<u64>>,
    /// The server's `/metrics`, scraped about once a second: (second of the run, values).
    pub server_samples: Mutex<Vec<(f64, crate::report::Scrape)>>,
    /// Group workload: first member's index -> server group id.
    pub groups: Mutex<HashMap<usize, String>>,
}

impl Shared {
    /// Counts one error of `kind`.
    pub fn error(&self, kind: impl Into<String>) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.window(Instant::now(), |w| w.errors += 1);
        let mut k = self.error_kinds.lock().unwrap_or_else(|p| p.into_inner());
        *k.entry(kind.into()).or_default() += 1;
    }

    /// Fresh state for `cfg`.
    pub fn new(cfg: LoadConfig) -> Self {
        let start = Instant::now();
        let start_unix_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        Shared {
            start_unix_us,
            to_commit: Mutex::new(hist()),
            commit_to_receive: Mutex::new(hist()),
            phases: Mutex::new(None),
            started: AtomicUsize::new(0),
            cfg,
            start,
            next_user: AtomicUsize::new(0),
            ready: AtomicUsize::new(0),
            connections: AtomicI64::new(0),
            sent: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            error_kinds: Mutex::default(),
            pending: Mutex::new(HashMap::new()),
            deliver: Mutex::new(hist()),
            deliver_raw: Mutex::new(hist()),
            ack: Mutex::new(hist()),
            slip: Mutex::new(hist()),
            lag: Mutex::new(hist()),
            windows: Mutex::new(Vec::new()),
            groups: Mutex::new(HashMap::new()),
            server_samples: Mutex::default(),
            storm_reconnect: Mutex::new(hist()),
            storm_catch_up: Mutex::new(hist()),
        }
    }

    fn window<R>(&self, at: Instant, f: impl FnOnce(&mut Window) -> R) -> R {
        let sec = at.saturating_duration_since(self.start).as_secs() as usize;
        let mut w = self.windows.lock().unwrap_or_else(|p| p.into_inner());
        while w.len() <= sec {
            w.push(Window {
                sent: 0,
                delivered: 0,
                acked: 0,
                connections: self.connections.load(Ordering::Relaxed),
                deliver: hist(),
                ack: hist(),
                errors: 0,
            });
        }
        f(&mut w[sec])
    }

    /// Whether a send intended at `at` is measured.
    pub fn measuring(&self, at: Instant) -> bool {
        self.span()
            .is_some_and(|(from, until)| at >= from && at < until)
    }

    /// The measured phase, once every user has connected.
    pub fn span(&self) -> Option<(Instant, Instant)> {
        self.phases().map(|p| (p.from, p.until))
    }

    /// Every phase, once every user has connected.
    pub fn phases(&self) -> Option<Phases> {
        *self.phases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A user finished connecting (or failed to); the last one fixes the phases.
    pub fn user_started(&self) {
        if self.started.fetch_add(1, Ordering::Relaxed) + 1 == self.cfg.users {
            // Phases start on whole seconds of the run, so per-second windows align.
            let now = Instant::now();
            let secs = now.saturating_duration_since(self.start).as_secs() + 1;
            let connected = self.start + std::time::Duration::from_secs(secs);
            let sends_from = connected + self.cfg.idle;
            let from = sends_from + WARM_UP;
            *self.phases.lock().unwrap_or_else(|p| p.into_inner()) = Some(Phases {
                connected,
                sends_from,
                from,
                until: from + self.cfg.duration,
            });
        }
    }

    /// Whether the measured phase is over (no more sends are scheduled).
    pub fn finished(&self, at: Instant) -> bool {
        self.span().is_some_and(|(_, until)| at >= until)
    }

    /// A send left: remember it until `recipients` devices have it. `judge_slip` is false
    /// for a send the reconnect storm held back (its lateness is the outage's, not the
    /// generator's).
    pub fn on_send(
        &self,
        cmid: String,
        intended: Instant,
        actual: Instant,
        recipients: u32,
        judge_slip: bool,
    ) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                cmid,
                InFlight {
                    intended,
                    actual,
                    waiting: recipients,
                    acked: false,
                },
            );
        self.sent.fetch_add(1, Ordering::Relaxed);
        self.window(intended, |w| w.sent += 1);
        if judge_slip && self.measuring(intended) {
            let slip = actual.saturating_duration_since(intended).as_micros() as u64;
            let _ = self
                .slip
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record(slip.clamp(1, MAX_US));
        }
    }

    /// The sender got its ack; returns the ack latency.
    pub fn on_ack(&self, cmid: &str, now: Instant) -> Option<std::time::Duration> {
        let intended = {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let e = p.get_mut(cmid)?;
            if e.acked {
                return None;
            }
            e.acked = true;
            let i = e.intended;
            if e.waiting == 0 {
                p.remove(cmid);
            }
            i
        };
        self.acked.fetch_add(1, Ordering::Relaxed);
        let d = now.saturating_duration_since(intended);
        self.window(intended, |w| {
            w.acked += 1;
            let _ = w.ack.record((d.as_micros() as u64).clamp(1, MAX_US));
        });
        if self.measuring(intended) {
            let _ = self
                .ack
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record((d.as_micros() as u64).clamp(1, MAX_US));
        }
        Some(d)
    }

    /// A recipient device got message `cmid`; returns (corrected, raw) latency.
    pub fn on_deliver(
        &self,
        cmid: &str,
        now: Instant,
        committed_unix_ms: u64,
    ) -> Option<(std::time::Duration, std::time::Duration)> {
        let (intended, actual) = {
            let mut p = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let e = p.get_mut(cmid)?;
            if e.waiting == 0 {
                return None; // a redelivery (sync after a live delivery): counted once
            }
            let r = (e.intended, e.actual);
            e.waiting -= 1;
            if e.waiting == 0 && e.acked {
                p.remove(cmid);
            }
            r
        };
        let corrected = now.saturating_duration_since(intended);
        let raw = now.saturating_duration_since(actual);
        self.delivered.fetch_add(1, Ordering::Relaxed);
        let c_us = (corrected.as_micros() as u64).clamp(1, MAX_US);
        // Windows are keyed by the intended send second: a window's delivered count and
        // histogram describe the messages sent in that second, wherever they arrived.
        self.window(intended, |w| {
            w.delivered += 1;
            let _ = w.deliver.record(c_us);
        });
        if self.measuring(intended) {
            let _ = self
                .deliver
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record(c_us);
            let _ = self
                .deliver_raw
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record((raw.as_micros() as u64).clamp(1, MAX_US));
            let unix = |t: Instant| {
                self.start_unix_us + t.saturating_duration_since(self.start).as_micros() as u64
            };
            // The commit stamp is whole ms: its end of each hop is up to 1 ms early.
            let commit = committed_unix_ms * 1000;
            let _ = self
                .to_commit
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record(commit.saturating_sub(unix(actual)).clamp(1, MAX_US));
            let _ = self
                .commit_to_receive
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record(unix(now).saturating_sub(commit).clamp(1, MAX_US));
        }
        Some((corrected, raw))
    }

    /// A stormed device is connected again after `d`.
    pub fn on_reconnect(&self, d: std::time::Duration) {
        let _ = self
            .storm_reconnect
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record((d.as_micros() as u64).clamp(1, MAX_US));
    }

    /// A stormed device has drained its backlog `d` after its socket dropped.
    pub fn on_caught_up(&self, d: std::time::Duration) {
        let _ = self
            .storm_catch_up
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record((d.as_micros() as u64).clamp(1, MAX_US));
    }

    /// Records the connections open now in this second's window (sampled, so quiet seconds
    /// get their own count rather than a later one).
    pub fn sample_connections(&self) {
        let c = self.connections.load(Ordering::Relaxed);
        self.window(Instant::now(), |w| w.connections = c);
    }

    /// Event-loop lag sample, µs.
    pub fn on_lag(&self, us: u64) {
        let _ = self
            .lag
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(us.clamp(1, MAX_US));
    }
}

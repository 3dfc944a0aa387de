//! The simulator's side of the chat service's fault points (BUGGIFY): what the fault
//! timeline armed (a crash at the next commit, ack or fan-out; frozen or slow gateways; a
//! stepped server clock), checked by the server at each point, and the crash they trigger.
//!
//! The server calls these from inside turmoil hosts, so `now_ms` is simulated time.

use crate::client::{now_ms, EPOCH_MS};
use crate::disk::SimDisk;
use crate::scenario::CrashPoint;
use model_server::auth::Secret;
use model_server::config::Bugs;
use model_server::core::CoreEvent;
use model_server::ids::{GatewayId, Millis};
use model_server::runtime::{FaultPoints, Hub};
use model_server::Limits;
use std::sync::Mutex;
use std::time::Duration;

/// A frozen or slowed host, from `from` to `until` (simulated ms).
#[derive(Clone, Debug)]
struct HoldWindow {
    /// A gateway, or `chat` for every gateway.
    host: String,
    from: u64,
    until: u64,
    /// `None`: frozen until `until`; `Some(d)`: `d` ms before each frame.
    delay_ms: Option<u64>,
}

#[derive(Default)]
struct State {
    /// An armed crash point and the time it disarms.
    crash: Option<(CrashPoint, u64)>,
    /// `mid_fanout`: a message was committed; crash after the next delivery written.
    fanout_started: bool,
    holds: Vec<HoldWindow>,
    offset_ms: i64,
}

/// Fault points of one run.
pub struct ServerFaults {
    state: Mutex<State>,
    disk: SimDisk,
    limits: Limits,
    secret: Secret,
    bugs: Bugs,
    /// Crashes that fired: (simulated ms, which point), drained into the trace.
    fired: Mutex<Vec<(u64, CrashPoint)>>,
    /// Events of cores replaced by a crash, drained into the trace.
    events: Mutex<Vec<CoreEvent>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn frame_type(f: &str) -> &str {
    // Frames are serialised with `type` first (serde's internal tag).
    f.strip_prefix("{\"type\":\"")
        .and_then(|r| r.split('"').next())
        .unwrap_or("")
}

impl ServerFaults {
    /// Points that, when they crash the service, restart it over `disk` with these settings.
    pub fn new(disk: SimDisk, limits: Limits, secret: Secret, bugs: Bugs) -> Self {
        ServerFaults {
            state: Mutex::default(),
            disk,
            limits,
            secret,
            bugs,
            fired: Mutex::default(),
            events: Mutex::default(),
        }
    }

    /// Crashes the service at the next `point` before `until` ms.
    pub fn arm_crash(&self, point: CrashPoint, until: u64) {
        let mut s = lock(&self.state);
        s.crash = Some((point, until));
        s.fanout_started = false;
    }

    /// Freezes `host` (delay `None`) or slows it until `until`.
    pub fn hold(&self, host: &str, from: u64, until: u64, delay_ms: Option<u64>) {
        lock(&self.state).holds.push(HoldWindow {
            host: host.to_string(),
            from,
            until,
            delay_ms,
        });
    }

    /// Steps the server's clock by `ms`.
    pub fn step_clock(&self, ms: i64) {
        lock(&self.state).offset_ms += ms;
    }

    /// The server's clock at simulated time `t`.
    pub fn server_now(&self, t: u64) -> Millis {
        Millis((EPOCH_MS + t).saturating_add_signed(lock(&self.state).offset_ms))
    }

    /// Whether `host` is frozen at `t`.
    pub fn frozen(&self, host: &str, t: u64) -> bool {
        lock(&self.state)
            .holds
            .iter()
            .any(|h| h.delay_ms.is_none() && h.host == host && h.from <= t && t < h.until)
    }

    /// Crashes that fired since the last call.
    pub fn take_fired(&self) -> Vec<(u64, CrashPoint)> {
        std::mem::take(&mut *lock(&self.fired))
    }

    /// Events of replaced cores since the last call.
    pub fn take_events(&self) -> Vec<CoreEvent> {
        std::mem::take(&mut *lock(&self.events))
    }

    /// Whether the armed point is `point` and still live; disarms it when it fires.
    fn fire(&self, s: &mut State, point: CrashPoint) -> bool {
        match s.crash {
            Some((p, until)) if p == point && now_ms() <= until => {
                s.crash = None;
                lock(&self.fired).push((now_ms(), point));
                true
            }
            _ => false,
        }
    }
}

impl FaultPoints for ServerFaults {
    fn after_commit(&self, _gateway: &GatewayId) -> bool {
        let mut s = lock(&self.state);
        if matches!(s.crash, Some((CrashPoint::MidFanout, _))) {
            s.fanout_started = true;
        }
        self.fire(&mut s, CrashPoint::AfterCommit)
    }

    fn after_write(&self, _gateway: &GatewayId, frames: &[String]) -> bool {
        let mut s = lock(&self.state);
        let types = || frames.iter().map(|f| frame_type(f));
        match s.crash {
            Some((CrashPoint::AfterAck, _)) if types().any(|t| t == "message_ack") => {
                self.fire(&mut s, CrashPoint::AfterAck)
            }
            Some((CrashPoint::MidFanout, _))
                if s.fanout_started && types().any(|t| t == "message" || t == "group_message") =>
            {
                self.fire(&mut s, CrashPoint::MidFanout)
            }
            _ => false,
        }
    }

    fn hold(&self, gateway: &GatewayId) -> Option<Duration> {
        let t = now_ms();
        let s = lock(&self.state);
        s.holds
            .iter()
            .filter(|h| (h.host == gateway.as_str() || h.host == "chat") && h.from <= t)
            .filter(|h| t < h.until)
            .map(|h| h.delay_ms.unwrap_or(h.until - t))
            .max()
            .map(Duration::from_millis)
    }

    fn clock_offset_ms(&self) -> i64 {
        lock(&self.state).offset_ms
    }

    fn crash(&self, hub: &Hub) {
        self.disk.crash();
        self.restart(hub);
    }
}

impl ServerFaults {
    /// Replaces the chat core by a fresh one over the disk as it now is (after a crash or
    /// a failover), keeping the old core's unread events for the trace.
    pub fn restart(&self, hub: &Hub) {
        lock(&self.events).extend(hub.with_core(|c| c.take_events()));
        hub.restart_core(self.limits.clone(), self.secret.clone(), self.disk.store());
        hub.with_core(|c| {
            c.set_bugs(self.bugs.clone());
            c.enable_event_log();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::frame_type;

    #[test]
    fn frame_type_reads_the_serde_tag() {
        assert_eq!(
            frame_type(r#"{"type":"message_ack","payload":{}}"#),
            "message_ack"
        );
        assert_eq!(frame_type(r#"{"type":"group_message"}"#), "group_message");
        assert_eq!(frame_type("not json"), "");
    }
}

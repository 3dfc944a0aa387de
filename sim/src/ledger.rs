//! What every simulated device did and saw, recorded outside the hosts so it survives
//! crashes and app kills; the oracle and the measurements read it after the run, and the
//! trace (one JSON line per protocol event) is what playback narrates.
//!
//! A device's `outbox` and `shown` messages are its local database: they survive an app
//! kill, as on a phone.

use crate::invariant::{Breach, ViolationKind};
use model_server::protocol::Status;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

/// (user index, device index).
pub type DeviceKey = (usize, usize);

/// A push request as the simulated push service got it: (at ms, user, pending count,
/// preview).
pub type PushRecord = (u64, String, u64, Option<String>);

/// One protocol event, as written to the JSONL trace.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct TraceEvent {
    /// Simulated ms since the start.
    pub t: u64,
    /// Host or device that saw it (`u3/d0`, `gw-eu-0`, `chat`, `sim`).
    pub at: String,
    pub event: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conv: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cmid: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

/// A message this device shows.
#[derive(Clone, Debug, PartialEq)]
pub struct Shown {
    pub conv: String,
    pub seq: u64,
    pub message_id: String,
    pub sender: usize,
    pub cmid: String,
    pub at_ms: u64,
}

/// A device's local state and observations.
#[derive(Clone, Debug, Default)]
pub struct DeviceLog {
    /// Sends not yet acked (by send index into the plan), in order: the local pending
    /// queue that survives an app kill.
    pub outbox: Vec<usize>,
    /// message_id -> what is shown.
    pub shown: BTreeMap<String, Shown>,
    /// Frames carrying a message this device already had (at-least-once redelivery).
    pub redeliveries: u64,
    /// Sender-side statuses observed per message id, in arrival order.
    pub statuses: BTreeMap<String, Vec<Status>>,
    /// Times this device opened a connection.
    pub connects: Vec<u64>,
    /// Times this device (re)tried a connection that failed.
    pub connect_failures: u64,
    /// Backoff delays used, ms.
    pub backoffs: Vec<u64>,
    /// Files downloaded, by send index: whether the bytes matched what was sent.
    pub media: BTreeMap<usize, bool>,
    /// For a device linked during the run: when its first `auth` succeeded.
    pub linked_ms: Option<u64>,
    /// Messages whose `delivery_ack` the server has certainly read: a `heartbeat_ack`
    /// came back on the same connection for a heartbeat sent after the ack.
    pub acks_confirmed: BTreeSet<String>,
    /// Last group receipt counts seen per message: (delivered, read).
    pub group_counts: BTreeMap<String, (u64, u64)>,
    /// Recipients the server counts for each group message this device got counts for.
    pub group_recipients: BTreeMap<String, u64>,
    /// Pending syncs this device finished: (first request sent, last page received).
    pub syncs: Vec<(u64, u64)>,
    /// Per connection that heard a `heartbeat_ack`: (when its session began, after
    /// `auth_success`; when the latest heartbeat answered on it was sent). The server
    /// handled that heartbeat after everything it had queued before on the connection.
    pub answered: Vec<(u64, u64)>,
    /// The presence probe near the end of the quiet phase: (sent, the user asked about,
    /// when the probing session began).
    pub probe: Option<(u64, usize, u64)>,
    /// `presence` frames about the probed user on the probing session: (received, online).
    pub probe_answers: Vec<(u64, bool)>,
}

/// Per planned send: when it was tapped, acked, delivered and read.
#[derive(Clone, Debug, Default)]
pub struct SendLog {
    pub first_sent_ms: Option<u64>,
    pub attempts: u32,
    /// When the phone first and last put this send on a socket (the server stored it no
    /// earlier than the first; a copy stored after its expiry came from an attempt at or
    /// after it).
    pub first_attempt_ms: Option<u64>,
    pub last_attempt_ms: Option<u64>,
    /// (conversation, seq, message id, at) from the first ack (or 409).
    pub acked: Option<(String, u64, String, u64)>,
    /// Every distinct (conversation, seq) the server answered with for this cmid.
    pub seqs_seen: BTreeSet<(String, u64)>,
    pub read_ms: Option<u64>,
    /// A final refusal by the server: (error code, at ms). The phone gave the send up.
    pub refused: Option<(u16, u64)>,
    /// The server answered this send with 429 at least once (it may then overtake).
    pub rate_limited: bool,
}

/// A `[[workload.membership]]` change as the admin's phone saw it.
#[derive(Clone, Debug, Default)]
pub struct MembershipLog {
    /// When the request first left the admin's phone.
    pub requested_ms: Option<u64>,
    /// When a `group_update` showing the change first reached the admin's phone.
    pub confirmed_ms: Option<u64>,
}

/// A `[[workload.unlinks]]` entry as the phones saw it.
#[derive(Clone, Debug, Default)]
pub struct UnlinkLog {
    /// When the request first left the asking phone.
    pub requested_ms: Option<u64>,
    /// When the `device_unlinked` answer first reached it.
    pub confirmed_ms: Option<u64>,
}

/// The whole run's record.
#[derive(Debug, Default)]
pub struct Ledger {
    pub trace: Vec<TraceEvent>,
    pub devices: BTreeMap<DeviceKey, DeviceLog>,
    pub sends: Vec<SendLog>,
    /// Every push request.
    pub pushes: Vec<PushRecord>,
    /// message id -> plan index of the send it acked.
    pub send_by_message: BTreeMap<String, usize>,
    /// Time the fault phase ended and the quiet phase began.
    pub quiet_from_ms: u64,
    /// Invariants seen broken while the run went on.
    pub breaches: Vec<Breach>,
    /// message id -> user -> when a device of that user first sent a read receipt for it.
    pub reads_sent: BTreeMap<String, BTreeMap<usize, u64>>,
    /// One entry per `[[workload.membership]]` change.
    pub membership: Vec<MembershipLog>,
    /// Largest outbound queue seen on any connection after any step: (frames, bytes).
    pub max_queue: (u64, u64),
    /// Per device unlinked during the run.
    pub unlinks: BTreeMap<DeviceKey, UnlinkLog>,
    /// (conversation, seq) -> simulated times of the steps in which the chat service
    /// committed a message under it (the commit came within that step; the server's own
    /// clock, which faults may step, is not used).
    pub stored_ms: BTreeMap<(String, u64), Vec<u64>>,
    /// (user, conversation) pairs in which a phone of that user sent a `typing` notice.
    pub typed: std::collections::BTreeSet<(usize, String)>,
}

/// Breaches kept per kind (the first ones are the useful witnesses).
const MAX_BREACHES_PER_KIND: usize = 20;

impl Ledger {
    /// Appends a trace event. (Eight arguments: one per trace column, kept flat so call
    /// sites read like the JSON line they produce.)
    #[allow(clippy::too_many_arguments)]
    pub fn trace(
        &mut self,
        t: u64,
        at: impl Into<String>,
        event: &str,
        conv: Option<&str>,
        seq: Option<u64>,
        cmid: Option<&str>,
        detail: impl Into<String>,
    ) {
        self.trace.push(TraceEvent {
            t,
            at: at.into(),
            event: event.to_string(),
            conv: conv.map(str::to_string),
            seq,
            cmid: cmid.map(str::to_string),
            detail: detail.into(),
        });
    }

    /// The trace as JSON lines.
    pub fn trace_jsonl(&self) -> String {
        let mut out = String::new();
        for e in &self.trace {
            out.push_str(&serde_json::to_string(e).unwrap_or_default());
            out.push('\n');
        }
        out
    }

    /// FNV-1a hash of the trace bytes: equal hashes mean byte-identical replays.
    pub fn trace_hash(&self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in self.trace_jsonl().bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h
    }

    /// Records a breach of an invariant seen at `t`.
    #[allow(clippy::too_many_arguments)]
    pub fn breach(
        &mut self,
        kind: ViolationKind,
        t: u64,
        conversation: Option<&str>,
        device: Option<String>,
        cmid: Option<&str>,
        expected: String,
        seen: String,
    ) {
        if self.breaches.iter().filter(|b| b.kind == kind).count() < MAX_BREACHES_PER_KIND {
            self.breaches.push(Breach {
                kind,
                t,
                conversation: conversation.map(str::to_string),
                device,
                cmid: cmid.map(str::to_string),
                expected,
                seen,
            });
        }
    }

    /// The device's log, created on first use.
    pub fn device(&mut self, k: DeviceKey) -> &mut DeviceLog {
        self.devices.entry(k).or_default()
    }
}

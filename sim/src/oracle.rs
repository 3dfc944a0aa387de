//! The chat oracle: after every run, check the invariants the design promises, and report
//! each violation with a minimal witness (conversation, device, expected vs seen, and the
//! trace lines around it).

use crate::crypto::PLAINTEXT_MARKER;
use crate::ledger::{DeviceKey, TraceEvent};
use crate::plan::{device_name, user_name, Target};
use crate::world::Outcome;
use model_server::protocol::Status;
use model_server::store::{KvStore, Table};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The invariants, by name (also what `expect.violations` lists).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ViolationKind {
    /// An acked message never reached a recipient device.
    Loss,
    /// A device shows one send twice, or a retry got a second seq.
    Duplicate,
    /// A device's conversation is not seq 1..n without gaps.
    Order,
    /// A sender saw a status go backward.
    ReceiptRegression,
    /// Plaintext reached the server, or a push carried content.
    Plaintext,
    /// An outbound queue grew past its bound.
    QueueBound,
    /// After the quiet phase, something was still pending or presence had not converged.
    Liveness,
}

impl ViolationKind {
    /// Name as written in scenario files.
    pub fn name(self) -> &'static str {
        match self {
            ViolationKind::Loss => "loss",
            ViolationKind::Duplicate => "duplicate",
            ViolationKind::Order => "order",
            ViolationKind::ReceiptRegression => "receipt_regression",
            ViolationKind::Plaintext => "plaintext",
            ViolationKind::QueueBound => "queue_bound",
            ViolationKind::Liveness => "liveness",
        }
    }
}

/// One broken invariant with its witness.
#[derive(Clone, Debug, Serialize)]
pub struct Violation {
    pub kind: ViolationKind,
    pub conversation: Option<String>,
    pub device: Option<String>,
    pub expected: String,
    pub seen: String,
    /// Trace lines about the same conversation or device, around the problem.
    pub context: Vec<TraceEvent>,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.kind.name())?;
        if let Some(c) = &self.conversation {
            write!(f, " in {c}")?;
        }
        if let Some(d) = &self.device {
            write!(f, " on {d}")?;
        }
        write!(f, ": expected {}, saw {}", self.expected, self.seen)
    }
}

/// Most violations reported per kind (the first ones are the useful witnesses).
const MAX_PER_KIND: usize = 5;
/// Trace lines of context per violation.
const CONTEXT_LINES: usize = 8;

fn context(o: &Outcome, conv: Option<&str>, device: Option<&str>) -> Vec<TraceEvent> {
    context_of(o, conv, device, None)
}

/// Trace lines about one send (when `cmid` is known), else about the conversation or device.
fn context_of(
    o: &Outcome,
    conv: Option<&str>,
    device: Option<&str>,
    cmid: Option<&str>,
) -> Vec<TraceEvent> {
    if let Some(c) = cmid {
        let about: Vec<&TraceEvent> = o
            .ledger
            .trace
            .iter()
            .filter(|e| e.cmid.as_deref() == Some(c) || e.event == "fault")
            .collect();
        if about.iter().any(|e| e.event != "fault") {
            return about[about.len().saturating_sub(CONTEXT_LINES)..]
                .iter()
                .map(|e| (*e).clone())
                .collect();
        }
    }
    let hits: Vec<&TraceEvent> = o
        .ledger
        .trace
        .iter()
        .filter(|e| {
            conv.is_some_and(|c| e.conv.as_deref() == Some(c))
                || device.is_some_and(|d| e.at == d)
                || e.event == "fault"
        })
        .collect();
    hits[hits.len().saturating_sub(CONTEXT_LINES)..]
        .iter()
        .map(|e| (*e).clone())
        .collect()
}

/// Checks every invariant of a finished run.
/// A receipt for a message shown this close to the end of the run is not required yet.
const RECEIPT_GRACE_MS: u64 = 5_000;

pub fn check(o: &Outcome) -> Vec<Violation> {
    let mut out: Vec<Violation> = Vec::new();
    let push = |out: &mut Vec<Violation>, v: Violation| {
        if out.iter().filter(|x| x.kind == v.kind).count() < MAX_PER_KIND {
            out.push(v);
        }
    };
    let plan = &o.plan;
    let l = &o.ledger;
    let dkey = |k: DeviceKey| format!("{}/{}", user_name(k.0), device_name(k.1));

    // Conversations: who is in each, and the seqs the server acked in each.
    let mut acked_by_conv: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    let mut members: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
    for (i, s) in plan.sends.iter().enumerate() {
        if let Some((conv, seq, _, _)) = &l.sends[i].acked {
            acked_by_conv.entry(conv.clone()).or_default().insert(*seq);
            let m = members.entry(conv.clone()).or_default();
            m.insert(s.user);
            match s.target {
                Target::User(u) => {
                    m.insert(u);
                }
                Target::Group(g) => m.extend(plan.groups[g].members.iter().copied()),
            }
        }
    }

    // 1. No loss: every acked message is shown on every device of every participant.
    for (i, s) in plan.sends.iter().enumerate() {
        let Some((conv, seq, mid, _)) = &l.sends[i].acked else {
            continue;
        };
        let mut users = plan.recipients(s);
        users.push(s.user);
        for u in users {
            for d in 0..plan.devices_per_user {
                let k = (u, d);
                // Shown under this id *with this content*: a failover that reuses a seq for
                // another message must not hide the loss of the first.
                let shown = l.devices.get(&k).is_some_and(|dl| {
                    dl.shown
                        .get(mid)
                        .is_some_and(|x| x.cmid == s.cmid && x.sender == s.user)
                });
                if !shown {
                    let dev = dkey(k);
                    push(
                        &mut out,
                        Violation {
                            kind: ViolationKind::Loss,
                            conversation: Some(conv.clone()),
                            device: Some(dev.clone()),
                            expected: format!(
                                "{mid} (seq {seq}, {} from {})",
                                s.cmid,
                                user_name(s.user)
                            ),
                            seen: match l.devices.get(&k).and_then(|dl| dl.shown.get(mid)) {
                                Some(other) => format!(
                                    "{mid} shows {} from {} instead",
                                    other.cmid,
                                    user_name(other.sender)
                                ),
                                None => "never delivered".into(),
                            },
                            context: context(o, Some(conv), Some(&dev)),
                        },
                    );
                }
            }
        }
    }

    // 1b. A file is part of its message: every recipient device that shows a message with
    // media has downloaded exactly the bytes that were sent.
    for (i, s) in plan.sends.iter().enumerate() {
        let Some((conv, seq, mid, _)) = &l.sends[i].acked else {
            continue;
        };
        if s.media_bytes == 0 {
            continue;
        }
        for u in plan.recipients(s) {
            for d in 0..plan.devices_per_user {
                let k = (u, d);
                let Some(dl) = l.devices.get(&k) else {
                    continue;
                };
                if !dl.shown.contains_key(mid) {
                    continue; // already reported as a loss
                }
                let seen = match dl.media.get(&i) {
                    Some(true) => continue,
                    Some(false) => "downloaded a file that differs from the one sent",
                    None => "shows the message but never downloaded its file",
                };
                let dev = dkey(k);
                push(
                    &mut out,
                    Violation {
                        kind: ViolationKind::Loss,
                        conversation: Some(conv.clone()),
                        device: Some(dev.clone()),
                        expected: format!(
                            "{mid} (seq {seq}, {} from {}) with its {}-byte file",
                            s.cmid,
                            user_name(s.user),
                            s.media_bytes
                        ),
                        seen: seen.into(),
                        context: context(o, Some(conv), Some(&dev)),
                    },
                );
            }
        }
    }

    // 2. No duplicates: one send, one seq; one shown copy per device.
    for (i, s) in plan.sends.iter().enumerate() {
        if l.sends[i].seqs_seen.len() > 1 {
            let conv = l.sends[i].seqs_seen.iter().next().map(|x| x.0.clone());
            push(
                &mut out,
                Violation {
                    kind: ViolationKind::Duplicate,
                    conversation: conv.clone(),
                    device: None,
                    expected: format!("one seq for {} from {}", s.cmid, user_name(s.user)),
                    seen: format!(
                        "seqs {:?}",
                        l.sends[i].seqs_seen.iter().map(|x| x.1).collect::<Vec<_>>()
                    ),
                    context: context(o, conv.as_deref(), None),
                },
            );
        }
    }
    for (k, dl) in &l.devices {
        let mut by_send: BTreeMap<(usize, &str), Vec<&str>> = BTreeMap::new();
        for sh in dl.shown.values() {
            by_send
                .entry((sh.sender, sh.cmid.as_str()))
                .or_default()
                .push(sh.message_id.as_str());
        }
        for ((sender, cmid), mut ids) in by_send {
            if ids.len() > 1 && !cmid.is_empty() {
                ids.sort_by_key(|id| {
                    id.rsplit_once('#')
                        .and_then(|(_, s)| s.parse::<u64>().ok())
                        .unwrap_or(0)
                });
                let dev = dkey(*k);
                push(
                    &mut out,
                    Violation {
                        kind: ViolationKind::Duplicate,
                        conversation: dl.shown.get(ids[0]).map(|x| x.conv.clone()),
                        device: Some(dev.clone()),
                        expected: format!("{cmid} from {} shown once", user_name(sender)),
                        seen: format!("it {} times, as {}", ids.len(), ids.join(", ")),
                        context: context_of(o, None, Some(&dev), Some(cmid)),
                    },
                );
            }
        }
    }

    // 3. Order: each device ends with seq 1..n of each of its conversations, no gaps.
    for (conv, seqs) in &acked_by_conv {
        let n = seqs.iter().copied().max().unwrap_or(0);
        let server_contiguous = seqs.len() as u64 == n;
        // Compared without materialising 1..=n: a broken server may hand out huge seqs.
        let is_one_to_n = |v: &[u64]| {
            v.len() as u64 == n && v.iter().enumerate().all(|(i, s)| *s == i as u64 + 1)
        };
        for &u in members.get(conv).into_iter().flatten() {
            for d in 0..plan.devices_per_user {
                let k = (u, d);
                let mut got: Vec<u64> = l
                    .devices
                    .get(&k)
                    .map(|dl| {
                        dl.shown
                            .values()
                            .filter(|x| &x.conv == conv)
                            .map(|x| x.seq)
                            .collect()
                    })
                    .unwrap_or_default();
                got.sort_unstable();
                if !is_one_to_n(&got) || !server_contiguous {
                    let dev = dkey(k);
                    let show = |v: &[u64]| {
                        if v.len() > 12 {
                            format!("{:?}.. ({} seqs)", &v[..12], v.len())
                        } else {
                            format!("{v:?}")
                        }
                    };
                    push(
                        &mut out,
                        Violation {
                            kind: ViolationKind::Order,
                            conversation: Some(conv.clone()),
                            device: Some(dev.clone()),
                            expected: format!("seqs 1..={n} without gaps"),
                            seen: if server_contiguous {
                                show(&got)
                            } else {
                                let acked: Vec<u64> = seqs.iter().copied().collect();
                                format!(
                                    "the server acked seqs {} (a gap or a reused number); the device shows {}",
                                    show(&acked),
                                    show(&got)
                                )
                            },
                            context: context(o, Some(conv), Some(&dev)),
                        },
                    );
                }
            }
        }
    }

    // 3b. Receipts converge (messages shown in the last `RECEIPT_GRACE_MS` are not judged): a 1:1 message every recipient device shows is at least
    // delivered (✓✓) on every device of its sender by the end, even when the receipt was
    // pushed while the sender's socket was down.
    for (i, s) in plan.sends.iter().enumerate() {
        let (Target::User(to), Some((conv, _, mid, _))) = (&s.target, &l.sends[i].acked) else {
            continue;
        };
        // Shown on every recipient device, early enough for the receipt to travel back
        // (and for a sender that was away to reconnect and ask) before the run ends.
        let everywhere = (0..plan.devices_per_user).all(|d| {
            l.devices
                .get(&(*to, d))
                .and_then(|dl| dl.shown.get(mid))
                .is_some_and(|x| x.cmid == s.cmid && x.at_ms + RECEIPT_GRACE_MS <= o.end_ms)
        });
        if !everywhere {
            continue;
        }
        for d in 0..plan.devices_per_user {
            let k = (s.user, d);
            let best = l
                .devices
                .get(&k)
                .and_then(|dl| dl.statuses.get(mid))
                .and_then(|v| v.iter().max().copied());
            if best.is_none_or(|b| b < Status::Delivered) {
                let dev = dkey(k);
                push(
                    &mut out,
                    Violation {
                        kind: ViolationKind::Liveness,
                        conversation: Some(conv.clone()),
                        device: Some(dev.clone()),
                        expected: format!(
                            "✓✓ (delivered) for {mid}: every device of {} shows it",
                            user_name(*to)
                        ),
                        seen: match best {
                            Some(b) => format!("status {b:?}"),
                            None => "no receipt at all (one tick)".into(),
                        },
                        context: context(o, Some(conv), Some(&dev)),
                    },
                );
            }
        }
    }

    // 4. Receipts never go backward at the sender.
    for (k, dl) in &l.devices {
        for (mid, st) in &dl.statuses {
            if st.windows(2).any(|w| w[1] < w[0]) {
                let dev = dkey(*k);
                push(
                    &mut out,
                    Violation {
                        kind: ViolationKind::ReceiptRegression,
                        conversation: mid.rsplit_once('#').map(|x| x.0.to_string()),
                        device: Some(dev.clone()),
                        expected: format!("statuses of {mid} never decrease"),
                        seen: format!("{st:?}"),
                        context: context(o, None, Some(&dev)),
                    },
                );
            }
        }
    }

    // 5. No plaintext on the server; pushes carry no content.
    for t in [
        Table::Messages,
        Table::Inbox,
        Table::Dedup,
        Table::Meta,
        Table::Users,
        Table::Groups,
    ] {
        if let Ok(rows) = o.store.scan(t, b"", b"", usize::MAX) {
            if rows
                .iter()
                .any(|(k, v)| contains(k, PLAINTEXT_MARKER) || contains(v, PLAINTEXT_MARKER))
            {
                push(
                    &mut out,
                    Violation {
                        kind: ViolationKind::Plaintext,
                        conversation: None,
                        device: None,
                        expected: format!("no plaintext in table {}", t.name()),
                        seen: "plaintext marker found".into(),
                        context: Vec::new(),
                    },
                );
            }
        }
    }
    for (at, user, _, preview) in &l.pushes {
        if preview.as_ref().is_some_and(|p| !p.is_empty()) {
            push(
                &mut out,
                Violation {
                    kind: ViolationKind::Plaintext,
                    conversation: None,
                    device: Some(user.clone()),
                    expected: "push carries no content".into(),
                    seen: format!(
                        "push at {at} ms carried {} bytes of message content",
                        preview.as_ref().map_or(0, |p| p.len())
                    ),
                    context: Vec::new(),
                },
            );
        }
    }

    // 6. Outbound queues within bound.
    if o.stats.outbound_high_water > o.limits.outbound_max_frames as u64 {
        push(
            &mut out,
            Violation {
                kind: ViolationKind::QueueBound,
                conversation: None,
                device: None,
                expected: format!("outbound queue <= {} frames", o.limits.outbound_max_frames),
                seen: format!("{} frames", o.stats.outbound_high_water),
                context: Vec::new(),
            },
        );
    }

    // 7. Liveness: after the quiet phase nothing is pending and everyone is back online.
    for (k, dl) in &l.devices {
        if !dl.outbox.is_empty() {
            let dev = dkey(*k);
            let cmids: Vec<&str> = dl
                .outbox
                .iter()
                .map(|i| plan.sends[*i].cmid.as_str())
                .collect();
            push(
                &mut out,
                Violation {
                    kind: ViolationKind::Liveness,
                    conversation: None,
                    device: Some(dev.clone()),
                    expected: "outbox empty after the quiet phase".into(),
                    seen: format!(
                        "{} unacked: {}",
                        cmids.len(),
                        cmids.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
                    ),
                    context: context(o, None, Some(&dev)),
                },
            );
        }
    }
    for (u, online) in o.online_at_end.iter().enumerate() {
        if !online {
            push(
                &mut out,
                Violation {
                    kind: ViolationKind::Liveness,
                    conversation: None,
                    device: Some(user_name(u)),
                    expected: "online at the end of the quiet phase (presence converged)".into(),
                    seen: "offline".into(),
                    context: context(
                        o,
                        None,
                        Some(&format!("{}/{}", user_name(u), device_name(0))),
                    ),
                },
            );
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

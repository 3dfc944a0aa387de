//! The chat oracle: after every run, check the invariants the design promises, and report
//! each violation with a minimal witness (conversation, device, expected vs seen, and the
//! trace lines around it).

use crate::client::EPOCH_MS;
use crate::crypto::PLAINTEXT_MARKER;
use crate::horizon::Horizon;
pub use crate::invariant::ViolationKind;
use crate::ledger::{DeviceKey, TraceEvent};
use crate::plan::{device_name, user_name, Target};
use crate::reference::{Membership, Reference};
use crate::world::Outcome;
use model_server::ids::{ConversationId, Seq};
use model_server::protocol::Status;
use model_server::store::records::{dec, key_num, key_parts, StoredMessage};
use model_server::store::{KvStore, Table};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

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
    let r = Reference::new(plan, l);
    // Messages retention may have let the server forget (see `horizon`).
    let h = Horizon::new(&o.limits, &o.clock, o.end_ms, &o.ledger);
    // From when send i may have been expired, if within the run.
    let expires = |i: usize| l.sends[i].first_attempt_ms.and_then(|t| h.expires_from(t));
    let expirable = |i: usize| expires(i).is_some();
    // A second copy is rightly stored only from an attempt made once the first copy (and
    // its dedup record) may have gone.
    let restored =
        |i: usize| expires(i).is_some_and(|e| l.sends[i].last_attempt_ms.is_some_and(|a| a >= e));
    // A device is excused a message it does not show only if the message may have
    // expired before the device could fetch it: no pending sync of that device both
    // began after the message was known stored (`stored`: the ack the sender saw, or,
    // for a copy whose ack never came, the first time any device showed it) and finished
    // before the message may have expired.
    let excused_file = |i: usize, k: DeviceKey, stored: u64| {
        let Some(e) = expires(i) else {
            return false;
        };
        !l.devices.get(&k).is_some_and(|d| {
            d.syncs
                .iter()
                .any(|(start, done)| *start >= stored && *done < e)
        })
    };
    // Nor is a device that was connected when the message was stored and still there
    // after: a connection authenticated before the first attempt that later answered a
    // heartbeat sent after the message was known stored. The server queued the message on
    // it live at the store, ahead of that answer, and frames on a connection are never
    // dropped without closing it. (Its file may still have expired before the download:
    // `excused_file`.)
    let excused_on = |i: usize, k: DeviceKey, stored: u64| {
        let live = l.sends[i].first_attempt_ms.is_some_and(|first| {
            l.devices.get(&k).is_some_and(|d| {
                d.answered
                    .iter()
                    .any(|(began, hb)| *began < first && *hb > stored)
            })
        });
        !live && excused_file(i, k, stored)
    };

    // 0. What the phones, the disk and the world saw broken while the run went on
    // (panics first: after one, the rest of the run is not to be trusted).
    let mut breaches: Vec<&crate::invariant::Breach> = l.breaches.iter().collect();
    breaches.sort_by_key(|b| (b.kind != ViolationKind::Panic, b.t));
    for b in breaches {
        let mut ctx = context_of(
            o,
            b.conversation.as_deref(),
            b.device.as_deref(),
            b.cmid.as_deref(),
        );
        ctx.retain(|e| e.t <= b.t);
        push(
            &mut out,
            Violation {
                kind: b.kind,
                conversation: b.conversation.clone(),
                device: b.device.clone(),
                expected: b.expected.clone(),
                seen: format!("{} at {} ms", b.seen, b.t),
                context: ctx,
            },
        );
    }

    // Conversations: who may be in each, one of its sends, and the seqs the server used
    // in it (acked by a sender or shown by a device).
    let mut seqs_by_conv: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    let mut acked_by_conv: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    let mut members: BTreeMap<String, (BTreeSet<usize>, usize)> = BTreeMap::new();
    for (i, _) in plan.sends.iter().enumerate() {
        if let Some((conv, seq, _, _)) = &l.sends[i].acked {
            acked_by_conv.entry(conv.clone()).or_default().insert(*seq);
            seqs_by_conv.entry(conv.clone()).or_default().insert(*seq);
            let m = members
                .entry(conv.clone())
                .or_insert_with(|| (BTreeSet::new(), i));
            m.0.extend(r.participants(i));
        }
    }
    for dl in l.devices.values() {
        for sh in dl.shown.values() {
            if let Some(set) = seqs_by_conv.get_mut(&sh.conv) {
                set.insert(sh.seq);
            }
        }
    }

    // 1. No loss: every acked message is shown on every device the design promises it to.
    for (i, s) in plan.sends.iter().enumerate() {
        let Some((conv, seq, mid, acked_at)) = &l.sends[i].acked else {
            continue;
        };
        for u in r.participants(i) {
            for d in 0..plan.devices_per_user {
                let k = (u, d);
                if !r.required(i, k) {
                    continue;
                }
                // Shown under this id *with this content*: a failover that reuses a seq for
                // another message must not hide the loss of the first.
                let shown = l.devices.get(&k).is_some_and(|dl| {
                    dl.shown
                        .get(mid)
                        .is_some_and(|x| x.cmid == s.cmid && x.sender == s.user)
                });
                if !shown && !excused_on(i, k, *acked_at) {
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
        let Some((conv, seq, mid, acked_at)) = &l.sends[i].acked else {
            continue;
        };
        if s.media_bytes == 0 {
            continue;
        }
        for u in r.participants(i) {
            if u == s.user {
                continue;
            }
            for d in 0..plan.devices_per_user {
                let k = (u, d);
                if !r.required(i, k) {
                    continue;
                }
                let Some(dl) = l.devices.get(&k) else {
                    continue;
                };
                if !dl.shown.contains_key(mid) || excused_file(i, k, *acked_at) {
                    continue; // a loss (reported), or a file deleted with its message
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
        // (A retry after the message expired is rightly stored again: retention is the
        // dedup window.)
        if l.sends[i].seqs_seen.len() > 1 && !restored(i) {
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
    let send_of: BTreeMap<(usize, &str), usize> = plan
        .sends
        .iter()
        .enumerate()
        .map(|(i, s)| ((s.user, s.cmid.as_str()), i))
        .collect();
    for (k, dl) in &l.devices {
        let mut by_send: BTreeMap<(usize, &str), Vec<&str>> = BTreeMap::new();
        for sh in dl.shown.values() {
            by_send
                .entry((sh.sender, sh.cmid.as_str()))
                .or_default()
                .push(sh.message_id.as_str());
        }
        for ((sender, cmid), mut ids) in by_send {
            let past_window = send_of.get(&(sender, cmid)).is_some_and(|i| restored(*i));
            if ids.len() > 1 && !cmid.is_empty() && !past_window {
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

    // 3. Order: each device shows every seq of each of its conversations, without gaps,
    // from the start (or, for a device linked or a member added during the run, from the
    // first message promised to it); the server's own seqs are 1..n.
    // Which send each seq of each conversation belongs to (from acks and from what
    // devices show: a copy whose ack the sender never saw is known only there), for the
    // gaps retention excuses; and conversations where a send may have been stored again
    // (its first copy possibly expired unseen: a seq nobody saw).
    let mut seq_send: BTreeMap<(&str, u64), usize> = BTreeMap::new();
    let mut restored_in: BTreeSet<&str> = BTreeSet::new();
    let mut expirable_in: BTreeSet<&str> = BTreeSet::new();
    for (i, sl) in l.sends.iter().enumerate() {
        for (c, q) in &sl.seqs_seen {
            seq_send.insert((c.as_str(), *q), i);
            if expirable(i) {
                expirable_in.insert(c.as_str());
            }
            if restored(i) {
                restored_in.insert(c.as_str());
            }
        }
    }
    // When each seq was stored: the step in which the chat service committed it, the
    // last such before the seq was first seen (a crash may have lost an earlier commit
    // of the same seq); failing that, its ack or the first time a device showed it.
    let mut stored_at: BTreeMap<(&str, u64), u64> = BTreeMap::new();
    for sl in &l.sends {
        if let Some((c, q, _, t)) = &sl.acked {
            stored_at.insert((c.as_str(), *q), *t);
        }
    }
    for dl in l.devices.values() {
        for sh in dl.shown.values() {
            let t = stored_at
                .entry((sh.conv.as_str(), sh.seq))
                .or_insert(sh.at_ms);
            *t = (*t).min(sh.at_ms);
            if let Some(&i) = send_of.get(&(sh.sender, sh.cmid.as_str())) {
                seq_send.insert((sh.conv.as_str(), sh.seq), i);
                if expirable(i) {
                    expirable_in.insert(sh.conv.as_str());
                }
            }
        }
    }
    for ((c, q), seen) in stored_at.iter_mut() {
        if let Some(t) = l
            .stored_ms
            .get(&(c.to_string(), *q))
            .and_then(|ts| ts.iter().copied().filter(|t| *t <= *seen).max())
        {
            *seen = t;
        }
    }
    // The sending device gets no inbox copy of its own message: it learns the message's
    // seq from the ack alone. So it cannot show a copy whose ack it never saw (one stored
    // again after retention let the first copy and its dedup record go).
    let own_unacked_copy = |i: usize, k: DeviceKey, q: u64| {
        (plan.sends[i].user, plan.sends[i].device) == k
            && (restored(i) || l.sends[i].acked.is_none())
            && l.sends[i].acked.as_ref().map(|a| a.1) != Some(q)
    };
    for (conv, (users, rep)) in &members {
        let seqs = &seqs_by_conv[conv];
        let acked = &acked_by_conv[conv];
        let n = seqs.iter().copied().max().unwrap_or(0);
        let server_contiguous = seqs.len() as u64 == n;
        for &u in users {
            for d in 0..plan.devices_per_user {
                let k = (u, d);
                if let Target::Group(g) = plan.sends[*rep].target {
                    if matches!(r.membership(g, u), Membership::Removed { .. }) {
                        continue; // promised nothing of the group (see `reference`)
                    }
                }
                let lo = if r.from_the_start(*rep, k) {
                    1
                } else {
                    // The first seq promised to this device in this conversation.
                    let first = plan
                        .sends
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| r.required(*j, k))
                        .filter_map(|(j, _)| l.sends[j].acked.as_ref())
                        .filter(|a| &a.0 == conv)
                        .map(|a| a.1)
                        .min();
                    match first {
                        Some(f) => f,
                        None => continue,
                    }
                };
                if r.linked_at(k).is_none() {
                    continue; // never logged in: reported under liveness
                }
                if r.unlink_asked(k) {
                    continue; // promised nothing more from its unlink on
                }
                let got: BTreeSet<u64> = l
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
                // Compared without materialising lo..=n: a broken server may hand out huge
                // seqs.
                let missing = if expirable_in.contains(conv.as_str()) {
                    seqs.range(lo..=n).any(|q| {
                        !got.contains(q)
                            && !seq_send.get(&(conv.as_str(), *q)).is_some_and(|i| {
                                own_unacked_copy(*i, k, *q)
                                    || stored_at
                                        .get(&(conv.as_str(), *q))
                                        .is_some_and(|t| excused_on(*i, k, *t))
                            })
                    })
                } else {
                    got.range(lo..=n).count() as u64 != n.saturating_sub(lo) + 1
                };
                let gaps_excused = restored_in.contains(conv.as_str());
                if missing || (lo == 1 && !server_contiguous && !gaps_excused) {
                    let dev = dkey(k);
                    let show = |v: &BTreeSet<u64>| {
                        let v: Vec<u64> = v.iter().copied().collect();
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
                            expected: format!("seqs {lo}..={n} without gaps"),
                            seen: if server_contiguous || lo > 1 {
                                show(&got)
                            } else {
                                format!(
                                    "the server used seqs {} (a gap or a reused number; acked {}); the device shows {}",
                                    show(seqs),
                                    show(acked),
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

    // 3a. Per-sender FIFO: a later tap by the same device, in the same conversation, never
    // gets a lower seq (unless the earlier one waited on a 429 or on its file's upload, or
    // may have expired and been stored again).
    let mut by_device: BTreeMap<(DeviceKey, &str), Vec<usize>> = BTreeMap::new();
    for (i, s) in plan.sends.iter().enumerate() {
        if let Some(a) = &l.sends[i].acked {
            by_device
                .entry(((s.user, s.device), a.0.as_str()))
                .or_default()
                .push(i);
        }
    }
    for ((k, conv), sends) in &by_device {
        // `plan.sends` is in tap order already.
        let mut worst: Option<(usize, u64)> = None;
        for &j in sends {
            let seq = l.sends[j].acked.as_ref().map_or(0, |a| a.1);
            if let Some((i, prev)) = worst {
                // (An earlier send stored again after its first copy expired takes a new,
                // higher seq.)
                let excused = l.sends[i].rate_limited
                    || restored(i)
                    || plan.sends[i].media_bytes > 0
                    || plan.sends[j].media_bytes > 0;
                if seq < prev && !excused {
                    let dev = dkey(*k);
                    push(
                        &mut out,
                        Violation {
                            kind: ViolationKind::Order,
                            conversation: Some(conv.to_string()),
                            device: Some(dev.clone()),
                            expected: format!(
                                "{} (tapped after {}) gets a seq above {prev}",
                                plan.sends[j].cmid, plan.sends[i].cmid
                            ),
                            seen: format!("seq {seq}: sender FIFO broken"),
                            context: context_of(
                                o,
                                Some(conv),
                                Some(&dev),
                                Some(&plan.sends[j].cmid),
                            ),
                        },
                    );
                }
            }
            if plan.sends[j].media_bytes == 0 && worst.is_none_or(|(_, p)| seq > p) {
                worst = Some((j, seq));
            }
        }
    }

    // 3c. Refusals: a send the design allows is never refused for good (a member's group
    // send is refused only once its removal was asked for).
    for (i, s) in plan.sends.iter().enumerate() {
        let Some((code, at)) = l.sends[i].refused else {
            continue;
        };
        let excused = match s.target {
            Target::Group(g) => match r.membership(g, s.user) {
                Membership::Removed { requested, .. } => requested.is_some_and(|t| t <= at),
                _ => false,
            },
            Target::User(_) => false,
        };
        if !excused {
            let dev = dkey((s.user, s.device));
            push(
                &mut out,
                Violation {
                    kind: ViolationKind::Loss,
                    conversation: None,
                    device: Some(dev.clone()),
                    expected: format!("{} from {} accepted", s.cmid, user_name(s.user)),
                    seen: format!("refused for good with {code} at {at} ms"),
                    context: context_of(o, None, Some(&dev), Some(&s.cmid)),
                },
            );
        }
    }

    // 3d. Membership: nobody shows a group message while not a member, and the server
    // accepts no group send tapped after its sender's removal was seen done.
    for (k, dl) in &l.devices {
        for sh in dl.shown.values() {
            let Some(&i) = l.send_by_message.get(&sh.message_id) else {
                continue;
            };
            let Target::Group(g) = plan.sends[i].target else {
                continue;
            };
            let bad = match r.membership(g, k.0) {
                Membership::Always => false,
                Membership::Never => true,
                Membership::Added { requested, .. } => requested.is_none_or(|t| sh.at_ms < t),
                Membership::Removed { confirmed, .. } => {
                    confirmed.is_some_and(|c| plan.sends[i].at_ms >= c)
                }
            };
            if bad && plan.sends[i].user != k.0 {
                let dev = dkey(*k);
                push(
                    &mut out,
                    Violation {
                        kind: ViolationKind::NonMember,
                        conversation: Some(sh.conv.clone()),
                        device: Some(dev.clone()),
                        expected: format!(
                            "{} shows no message of {} while not a member",
                            dev, sh.conv
                        ),
                        seen: format!("{} ({}) shown at {} ms", sh.message_id, sh.cmid, sh.at_ms),
                        context: context_of(o, Some(&sh.conv), Some(&dev), Some(&sh.cmid)),
                    },
                );
            }
        }
    }
    for (i, s) in plan.sends.iter().enumerate() {
        let (Target::Group(g), Some((conv, _, mid, _))) = (&s.target, &l.sends[i].acked) else {
            continue;
        };
        if let Membership::Removed {
            confirmed: Some(c), ..
        } = r.membership(*g, s.user)
        {
            if s.at_ms >= c {
                let dev = dkey((s.user, s.device));
                push(
                    &mut out,
                    Violation {
                        kind: ViolationKind::NonMember,
                        conversation: Some(conv.clone()),
                        device: Some(dev.clone()),
                        expected: format!(
                            "a send tapped after {}'s removal refused",
                            user_name(s.user)
                        ),
                        seen: format!("stored as {mid}"),
                        context: context_of(o, Some(conv), Some(&dev), Some(&s.cmid)),
                    },
                );
            }
        }
    }

    // 3e. Unlinked devices: once its user saw the unlink answered, a device shows nothing
    // first transmitted later (the server must neither copy to it, deliver to it nor let
    // it sync).
    for (k, dl) in &l.devices {
        let Some(at) = r.unlinked_at(*k) else {
            continue;
        };
        for sh in dl.shown.values() {
            let Some(&i) = l.send_by_message.get(&sh.message_id) else {
                continue;
            };
            if (plan.sends[i].user, plan.sends[i].device) == *k {
                continue;
            }
            if l.sends[i].first_attempt_ms.is_some_and(|t| t >= at) {
                let dev = dkey(*k);
                push(
                    &mut out,
                    Violation {
                        kind: ViolationKind::NonMember,
                        conversation: Some(sh.conv.clone()),
                        device: Some(dev.clone()),
                        expected: format!(
                            "{dev}, unlinked at {at} ms, shows nothing sent after that"
                        ),
                        seen: format!("{} ({}) shown at {} ms", sh.message_id, sh.cmid, sh.at_ms),
                        context: context_of(o, Some(&sh.conv), Some(&dev), Some(&sh.cmid)),
                    },
                );
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
        if expirable(i) {
            continue; // a receipt for an expired message changes nothing
        }
        // Shown on every recipient device, early enough for the receipt to travel back
        // (and for a sender that was away to reconnect and ask) before the run ends.
        // (Devices being unlinked are left out: they may never show it.)
        let judged: Vec<usize> = (0..plan.devices_per_user)
            .filter(|d| !r.unlink_asked((*to, *d)))
            .collect();
        let everywhere = !judged.is_empty()
            && judged.iter().all(|d| {
                l.devices
                    .get(&(*to, *d))
                    .and_then(|dl| dl.shown.get(mid))
                    .is_some_and(|x| x.cmid == s.cmid && x.at_ms + RECEIPT_GRACE_MS <= o.end_ms)
            });
        if !everywhere {
            continue;
        }
        for d in 0..plan.devices_per_user {
            let k = (s.user, d);
            if r.unlink_asked(k) {
                continue;
            }
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

    // 3c'. Group receipts converge too: once every member shows a message (on some device,
    // early enough), the sending device's counts say every member has it. Groups whose
    // membership changes during the run are left out (their recipient count moves).
    for (i, s) in plan.sends.iter().enumerate() {
        let (Target::Group(g), Some((conv, _, mid, _))) = (&s.target, &l.sends[i].acked) else {
            continue;
        };
        if plan.membership.iter().any(|c| c.group == *g) || expirable(i) {
            continue;
        }
        let members: Vec<usize> = (0..plan.users)
            .filter(|u| *u != s.user && r.membership(*g, *u) == Membership::Always)
            .collect();
        let shows = |u: usize| {
            (0..plan.devices_per_user).any(|d| {
                !r.unlink_asked((u, d))
                    && l.devices
                        .get(&(u, d))
                        .and_then(|dl| dl.shown.get(mid))
                        .is_some_and(|x| x.cmid == s.cmid && x.at_ms + RECEIPT_GRACE_MS <= o.end_ms)
            })
        };
        if members.is_empty() || !members.iter().all(|u| shows(*u)) {
            continue;
        }
        let k = (s.user, s.device);
        if r.unlink_asked(k) {
            continue;
        }
        let got = l
            .devices
            .get(&k)
            .and_then(|dl| dl.group_counts.get(mid))
            .map_or(0, |c| c.0);
        if got < members.len() as u64 {
            let dev = dkey(k);
            push(
                &mut out,
                Violation {
                    kind: ViolationKind::Liveness,
                    conversation: Some(conv.clone()),
                    device: Some(dev.clone()),
                    expected: format!(
                        "group receipt for {mid} counts all {} members delivered: each shows it",
                        members.len()
                    ),
                    seen: format!("delivered {got}"),
                    context: context(o, Some(conv), Some(&dev)),
                },
            );
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

    // 5b. No plaintext in anything the chat service logged.
    if let Some(e) = l
        .trace
        .iter()
        .find(|e| e.at == "chat" && e.detail.contains(PLAINTEXT_MARKER))
    {
        push(
            &mut out,
            Violation {
                kind: ViolationKind::Plaintext,
                conversation: e.conv.clone(),
                device: None,
                expected: "no plaintext in the chat service's log".into(),
                seen: format!("'{}' at {} ms carried the plaintext marker", e.event, e.t),
                context: vec![e.clone()],
            },
        );
    }

    // 6. Outbound queues within bound: what was actually buffered on any connection after
    // any step, frames and bytes.
    let (frames, bytes) = l.max_queue;
    if frames > o.limits.outbound_max_frames as u64 || bytes > o.limits.outbound_max_bytes as u64 {
        push(
            &mut out,
            Violation {
                kind: ViolationKind::QueueBound,
                conversation: None,
                device: None,
                expected: format!(
                    "outbound queue <= {} frames and <= {} bytes",
                    o.limits.outbound_max_frames, o.limits.outbound_max_bytes
                ),
                seen: format!("{frames} frames, {bytes} bytes buffered on one connection"),
                context: Vec::new(),
            },
        );
    }

    // 6b. Storage drains: an inbox copy of a message every device of its user shows (well
    // before the end) must be gone; a device seen unlinked counts as showing it (nothing
    // may wait for it).
    // (Read once: 6c looks at the same rows.)
    let inbox_rows = o
        .store
        .scan(Table::Inbox, b"", b"", usize::MAX)
        .unwrap_or_default();
    for (key, _) in &inbox_rows {
        let (Some(parts), Some(seq)) = (key_parts(key, 2), key_num(key)) else {
            continue;
        };
        let Some(u) = parts[0]
            .strip_prefix('u')
            .and_then(|x| x.parse::<usize>().ok())
        else {
            continue;
        };
        let mid = format!("{}#{seq}", parts[1]);
        let everywhere = (0..plan.devices_per_user).all(|d| {
            r.linked_at((u, d)).is_none()
                || r.unlinked_at((u, d)).is_some()
                || l.devices
                    .get(&(u, d))
                    .and_then(|dl| dl.shown.get(&mid))
                    .is_some_and(|x| x.at_ms + RECEIPT_GRACE_MS <= o.end_ms)
        });
        if everywhere {
            push(
                &mut out,
                Violation {
                    kind: ViolationKind::StorageLeak,
                    conversation: Some(parts[1].clone()),
                    device: Some(parts[0].clone()),
                    expected: format!(
                        "the inbox copy of {mid} for {} deleted: every device shows it",
                        parts[0]
                    ),
                    seen: "still stored at the end".into(),
                    context: context(o, Some(&parts[1]), None),
                },
            );
        }
    }

    // 6c. Nothing outlives retention: every inbox copy and dedup record belongs to a
    // stored message (they are written and deleted with it in one commit), and once the
    // sweep had a steady window to catch up in, no message past retention is stored.
    let stored: BTreeMap<(String, u64), StoredMessage> = o
        .store
        .scan(Table::Messages, b"", b"", usize::MAX)
        .unwrap_or_default()
        .iter()
        .filter_map(|(_, v)| dec::<StoredMessage>(Table::Messages, v).ok())
        .map(|m| ((m.conversation_id.0.clone(), m.seq.0), m))
        .collect();
    let mut leaks: Vec<(String, String, String)> = Vec::new();
    for (key, _) in &inbox_rows {
        if let (Some(parts), Some(seq)) = (key_parts(key, 2), key_num(key)) {
            if !stored.contains_key(&(parts[1].clone(), seq)) {
                leaks.push((
                    parts[1].clone(),
                    format!(
                        "no inbox copy of {}#{seq} for {} once the message is gone",
                        parts[1], parts[0]
                    ),
                    "the copy is still stored".into(),
                ));
            }
        }
    }
    for (_, v) in o
        .store
        .scan(Table::Dedup, b"", b"", usize::MAX)
        .unwrap_or_default()
    {
        if let Ok((conv, seq)) = dec::<(ConversationId, Seq)>(Table::Dedup, &v) {
            if !stored.contains_key(&(conv.0.clone(), seq.0)) {
                leaks.push((
                    conv.0.clone(),
                    format!(
                        "no dedup record of {}#{} once the message is gone",
                        conv.0, seq.0
                    ),
                    "the record is still stored".into(),
                ));
            }
        }
    }
    if let Some(cut) = h.gone_before() {
        for m in stored.values().filter(|m| m.stored_at.0 < cut) {
            leaks.push((
                m.conversation_id.0.clone(),
                format!(
                    "{} deleted: stored {} ms before the end, retention {} ms",
                    m.message_id().0,
                    (EPOCH_MS + o.end_ms)
                        .saturating_add_signed(o.clock.end_offset_ms())
                        .saturating_sub(m.stored_at.0),
                    o.limits.retention_ms
                ),
                "still stored at the end".into(),
            ));
        }
    }
    for (conv, expected, seen) in leaks {
        push(
            &mut out,
            Violation {
                kind: ViolationKind::StorageLeak,
                context: context(o, Some(&conv), None),
                conversation: Some(conv),
                device: None,
                expected,
                seen,
            },
        );
    }

    // 7. Liveness: after the quiet phase nothing is pending and everyone is back online.
    for (k, dl) in &l.devices {
        if !dl.outbox.is_empty() && !r.unlink_asked(*k) {
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
    for k in plan.links.keys() {
        if r.linked_at(*k).is_none() {
            let dev = dkey(*k);
            push(
                &mut out,
                Violation {
                    kind: ViolationKind::Liveness,
                    conversation: None,
                    device: Some(dev.clone()),
                    expected: format!("{dev}, linked during the run, logged in"),
                    seen: "never logged in".into(),
                    context: context(o, None, Some(&dev)),
                },
            );
        }
    }
    // 7b. Presence answers the truth: the probe near the end (see `client`) gets an answer
    // (where the queue bound leaves room for it), and it says online whenever a connection
    // of that user was held from before the probe until after the answer.
    for (k, dl) in &l.devices {
        let Some((sent, x, began)) = dl.probe else {
            continue;
        };
        let dev = dkey(*k);
        // Proof that the server held a connection of x throughout: one that began before
        // the probe answered a heartbeat sent after the frame arrived.
        let through = |from: u64, to: u64| {
            (0..plan.devices_per_user).any(|d| {
                l.devices
                    .get(&(x, d))
                    .is_some_and(|xd| xd.answered.iter().any(|(b, hb)| *b < from && *hb > to))
            })
        };
        for (at, online) in &dl.probe_answers {
            if !online && through(sent, *at) {
                push(
                    &mut out,
                    Violation {
                        kind: ViolationKind::Liveness,
                        conversation: None,
                        device: Some(dev.clone()),
                        expected: format!(
                            "presence of {} online: a device of theirs was connected from before the probe at {sent} ms until after the answer",
                            user_name(x)
                        ),
                        seen: format!("offline at {at} ms"),
                        context: context(o, None, Some(&dev)),
                    },
                );
            }
        }
        // The answer is droppable: it is owed only where a quiet connection's queue cannot
        // have filled (a bound of at least 64 frames).
        let heard_after = dl.answered.iter().any(|(b, hb)| *b == began && *hb > sent);
        if dl.probe_answers.is_empty() && heard_after && o.limits.outbound_max_frames >= 64 {
            push(
                &mut out,
                Violation {
                    kind: ViolationKind::Liveness,
                    conversation: None,
                    device: Some(dev.clone()),
                    expected: format!(
                        "a presence frame for {} answering presence_subscribe at {sent} ms",
                        user_name(x)
                    ),
                    seen: "none, though a later heartbeat was answered on the same connection"
                        .into(),
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

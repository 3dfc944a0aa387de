//! Each check of the oracle fails on a history crafted to break it (a real run, then one
//! thing changed in what the phones saw or the server stored) and passes on the run as it
//! happened. Checks made during the run (not_durable, false_receipt, redelivery, panic,
//! queue_bound) are shown failing by planted bugs in `swarm_finds_bugs.rs`; here the
//! oracle's handling of them is checked too.

use model_server::store::records::{inbox_key, msg_key};
use model_server::store::{KvStore, Table, Write};
use sim::invariant::Breach;
use sim::ledger::{Shown, TraceEvent};
use sim::world::Outcome;
use sim::{RunOptions, Scenario, ViolationKind};

/// Four users with two phones each: u0 and u1 chat, u0..u2 share a group (u3 is not in it).
fn run() -> Outcome {
    let sc = Scenario::parse(
        r#"
name = "crafted"
duration_ms = 8000
quiet_ms = 20000
[workload]
users = 4
devices_per_user = 2
messages_per_user = 3
[[workload.groups]]
size = 3
messages = 4
members = [0, 1, 2]
"#,
        "crafted.toml",
    )
    .expect("parses");
    let (r, o) = sim::run_seed(&sc, 1, &RunOptions::default()).expect("runs");
    assert!(r.passed, "the untouched run passes: {:?}", r.failures);
    o
}

fn kinds(o: &Outcome) -> Vec<ViolationKind> {
    sim::oracle::check(o).into_iter().map(|v| v.kind).collect()
}

/// A (send index, conversation, seq, message id) of an acked send matching `pred`.
fn acked(o: &Outcome, group: bool) -> (usize, String, u64, String) {
    o.ledger
        .sends
        .iter()
        .enumerate()
        .find_map(|(i, s)| {
            let (c, seq, mid, _) = s.acked.clone()?;
            (c.starts_with("grp:") == group).then_some((i, c, seq, mid))
        })
        .expect("an acked send")
}

#[test]
fn the_untouched_history_passes_every_check() {
    assert!(kinds(&run()).is_empty());
}

#[test]
fn a_message_missing_on_one_device_is_a_loss_and_a_gap() {
    let mut o = run();
    let (_, _, _, mid) = acked(&o, false);
    let dl = o
        .ledger
        .devices
        .values_mut()
        .find(|d| d.shown.get(&mid).is_some_and(|s| s.sender != usize::MAX) && d.outbox.is_empty())
        .expect("a device shows it");
    dl.shown.remove(&mid);
    let k = kinds(&o);
    assert!(k.contains(&ViolationKind::Loss), "{k:?}");
    assert!(k.contains(&ViolationKind::Order), "{k:?}");
}

#[test]
fn one_send_shown_twice_is_a_duplicate() {
    let mut o = run();
    let (i, conv, _, mid) = acked(&o, false);
    let sim::plan::Target::User(to) = o.plan.sends[i].target else {
        unreachable!()
    };
    let d = o.ledger.devices.get_mut(&(to, 0)).expect("device");
    let sh = d.shown.get(&mid).cloned().expect("shown");
    d.shown.insert(
        format!("{conv}#99"),
        Shown {
            message_id: format!("{conv}#99"),
            seq: 99,
            ..sh
        },
    );
    assert!(kinds(&o).contains(&ViolationKind::Duplicate));
}

#[test]
fn a_later_tap_with_a_lower_seq_breaks_sender_fifo() {
    let mut o = run();
    // Two acked sends of one device in one conversation: swap their seqs.
    let mut by: std::collections::BTreeMap<((usize, usize), String), Vec<usize>> =
        Default::default();
    for (i, s) in o.plan.sends.iter().enumerate() {
        if let Some(a) = &o.ledger.sends[i].acked {
            by.entry(((s.user, s.device), a.0.clone()))
                .or_default()
                .push(i);
        }
    }
    let pair = by
        .values()
        .find(|v| v.len() >= 2)
        .expect("two sends of one device")
        .clone();
    let (a, b) = (pair[0], pair[1]);
    let sa = o.ledger.sends[a].acked.as_ref().expect("acked").1;
    let sb = o.ledger.sends[b].acked.as_ref().expect("acked").1;
    o.ledger.sends[a].acked.as_mut().expect("acked").1 = sb;
    o.ledger.sends[b].acked.as_mut().expect("acked").1 = sa;
    let v = sim::oracle::check(&o);
    assert!(
        v.iter()
            .any(|v| v.kind == ViolationKind::Order && v.seen.contains("FIFO")),
        "{v:?}"
    );
}

#[test]
fn a_status_going_backward_is_a_receipt_regression() {
    let mut o = run();
    let (i, _, _, mid) = acked(&o, false);
    let s = &o.plan.sends[i];
    let d = o
        .ledger
        .devices
        .get_mut(&(s.user, s.device))
        .expect("device");
    d.statuses.insert(
        mid,
        vec![
            model_server::protocol::Status::Read,
            model_server::protocol::Status::Delivered,
        ],
    );
    assert!(kinds(&o).contains(&ViolationKind::ReceiptRegression));
}

#[test]
fn a_group_message_on_a_non_members_phone_is_non_member() {
    let mut o = run();
    let (_, conv, seq, mid) = acked(&o, true);
    let sh = o.ledger.devices[&(0, 0)].shown[&mid].clone();
    o.ledger
        .devices
        .get_mut(&(3, 0))
        .expect("u3")
        .shown
        .insert(mid.clone(), Shown { conv, seq, ..sh });
    assert!(kinds(&o).contains(&ViolationKind::NonMember));
}

#[test]
fn an_inbox_copy_left_for_a_message_every_device_shows_is_a_storage_leak() {
    let mut o = run();
    let (i, conv, seq, _) = acked(&o, false);
    let sim::plan::Target::User(to) = o.plan.sends[i].target else {
        unreachable!()
    };
    let row = inbox_key(
        &format!("u{to}").as_str().into(),
        &model_server::ids::ConversationId(conv),
        model_server::ids::Seq(seq),
    );
    o.store
        .commit(vec![Write::Put(
            Table::Inbox,
            row,
            b"{\"acked\":[]}".to_vec(),
        )])
        .expect("commit");
    assert!(kinds(&o).contains(&ViolationKind::StorageLeak));
}

#[test]
fn more_buffered_than_the_bound_is_queue_bound() {
    let mut o = run();
    o.ledger.max_queue = (o.limits.outbound_max_frames as u64 + 1, 10);
    assert!(kinds(&o).contains(&ViolationKind::QueueBound));
    let mut o = run();
    o.ledger.max_queue = (1, o.limits.outbound_max_bytes as u64 + 1);
    assert!(kinds(&o).contains(&ViolationKind::QueueBound));
}

#[test]
fn plaintext_in_a_chat_log_line_or_a_push_is_plaintext() {
    let mut o = run();
    o.ledger.trace.push(TraceEvent {
        t: 1,
        at: "chat".into(),
        event: "stored".into(),
        conv: None,
        seq: None,
        cmid: None,
        detail: format!("{}u0:m1", sim::crypto::PLAINTEXT_MARKER),
    });
    assert!(kinds(&o).contains(&ViolationKind::Plaintext));
    let mut o = run();
    o.ledger
        .pushes
        .push((1, "u1".into(), 1, Some("hello".into())));
    assert!(kinds(&o).contains(&ViolationKind::Plaintext));
}

#[test]
fn a_valid_send_refused_for_good_is_a_loss() {
    let mut o = run();
    let (i, _, _, _) = acked(&o, false);
    o.ledger.sends[i].acked = None;
    o.ledger.sends[i].refused = Some((403, 100));
    let v = sim::oracle::check(&o);
    assert!(
        v.iter()
            .any(|v| v.kind == ViolationKind::Loss && v.seen.contains("refused")),
        "{v:?}"
    );
}

#[test]
fn breaches_seen_during_the_run_are_reported_panics_first() {
    let mut o = run();
    for kind in [ViolationKind::FalseReceipt, ViolationKind::Panic] {
        o.ledger.breaches.push(Breach {
            kind,
            t: 10,
            conversation: None,
            device: Some("u0/d0".into()),
            cmid: None,
            expected: "x".into(),
            seen: "y".into(),
        });
    }
    let k = kinds(&o);
    assert_eq!(k.first(), Some(&ViolationKind::Panic), "{k:?}");
    assert!(k.contains(&ViolationKind::FalseReceipt));
}

#[test]
fn an_unacked_send_left_in_an_outbox_is_liveness() {
    let mut o = run();
    o.ledger.devices.get_mut(&(0, 0)).expect("d").outbox.push(0);
    assert!(kinds(&o).contains(&ViolationKind::Liveness));
}

#[test]
fn group_counts_that_never_reach_every_member_are_liveness() {
    let mut o = run();
    let (i, _, _, mid) = acked(&o, true);
    let k = (o.plan.sends[i].user, o.plan.sends[i].device);
    assert!(!kinds(&o).contains(&ViolationKind::Liveness));
    let counts = o
        .ledger
        .devices
        .get_mut(&k)
        .and_then(|d| d.group_counts.get_mut(&mid))
        .expect("the sender saw counts for its group message");
    counts.0 = 1; // of two other members, both of whom show it
    assert!(kinds(&o).contains(&ViolationKind::Liveness));
}

#[test]
fn shown_before_the_store_is_not_required_of_a_device_linked_later() {
    // A device linked during the run is promised only what was tapped after its login.
    let sc = Scenario::parse(
        r#"
name = "late"
duration_ms = 10000
quiet_ms = 20000
[workload]
users = 2
devices_per_user = 2
messages_per_user = 4
send_window_ms = [0, 9000]
[[workload.links]]
user = 1
device = 1
at_ms = 5000
"#,
        "late.toml",
    )
    .expect("parses");
    let (r, o) = sim::run_seed(&sc, 2, &RunOptions::default()).expect("runs");
    assert!(r.passed, "{:?}", r.failures);
    let linked = o.ledger.devices[&(1, 1)].linked_ms.expect("logged in");
    assert!(linked >= 5000);
    let mut o = o;
    // Taking away one message tapped after the link is a loss; one tapped before is not.
    let after = o
        .plan
        .sends
        .iter()
        .enumerate()
        .find(|(i, s)| s.at_ms > linked && o.ledger.sends[*i].acked.is_some())
        .map(|(i, _)| o.ledger.sends[i].acked.clone().expect("acked").2)
        .expect("a send after the link");
    o.ledger
        .devices
        .get_mut(&(1, 1))
        .expect("d")
        .shown
        .remove(&after);
    assert!(kinds(&o).contains(&ViolationKind::Loss));
}

#[test]
fn an_inbox_copy_or_dedup_record_of_a_message_no_longer_stored_is_a_storage_leak() {
    let mut left = run();
    let (_, conv, seq, _) = acked(&left, false);
    let conv = model_server::ids::ConversationId(conv);
    let seq = model_server::ids::Seq(seq);
    // The message goes, its inbox copies and dedup record stay: half of a retention sweep.
    left.store
        .commit(vec![Write::Delete(Table::Messages, msg_key(&conv, seq))])
        .expect("commit");
    let leaks: Vec<String> = sim::oracle::check(&left)
        .into_iter()
        .filter(|v| v.kind == ViolationKind::StorageLeak)
        .map(|v| v.expected)
        .collect();
    assert!(
        leaks.iter().any(|e| e.contains("no dedup record")),
        "{leaks:?}"
    );
}

#[test]
fn a_message_stored_past_retention_is_a_storage_leak_once_the_sweep_had_time() {
    // The same history judged as if retention were one second and the sweep ran every
    // 250 ms: every message is past it, yet stored.
    let mut o = run();
    o.limits.retention_ms = 1_000;
    o.limits.sweep_interval_ms = 250;
    let v = sim::oracle::check(&o);
    assert!(
        v.iter()
            .any(|v| v.kind == ViolationKind::StorageLeak
                && v.expected.contains("retention 1000 ms")),
        "{:?}",
        v.iter().map(|v| v.to_string()).collect::<Vec<_>>()
    );
    // A sweep that could not have caught up yet (an interval longer than the quiet phase)
    // is not judged.
    o.limits.sweep_interval_ms = 3_600_000;
    assert!(!sim::oracle::check(&o)
        .iter()
        .any(|v| v.expected.contains("retention 1000 ms")));
}

#[test]
fn a_missing_message_is_excused_only_if_retention_may_have_expired_it() {
    let mut o = run();
    let (i, _, _, mid) = acked(&o, false);
    let key = *o
        .ledger
        .devices
        .iter()
        .find(|(_, d)| d.shown.contains_key(&mid) && d.outbox.is_empty())
        .expect("a device shows it")
        .0;
    let dl = o.ledger.devices.get_mut(&key).expect("device");
    dl.shown.remove(&mid);
    assert!(kinds(&o).contains(&ViolationKind::Loss));
    // Had retention been a second, the server may rightly have deleted it before that
    // device came for it (had it not been connected all along): not a loss, nor a gap.
    o.limits.retention_ms = 1_000;
    let answered = std::mem::take(&mut o.ledger.devices.get_mut(&key).expect("device").answered);
    let k = kinds(&o);
    assert!(!k.contains(&ViolationKind::Loss), "{k:?}");
    assert!(!k.contains(&ViolationKind::Order), "{k:?}");
    // A device connected from before the first attempt until a heartbeat answered after
    // the ack got it live at the store, whatever retention did later: a loss.
    let first = o.ledger.sends[i].first_attempt_ms.expect("attempted");
    let acked_at = o.ledger.sends[i].acked.as_ref().expect("acked").3;
    assert!(
        answered.iter().any(|(b, h)| *b < first && *h > acked_at),
        "the crafted run keeps {key:?} connected through the send: {answered:?}"
    );
    o.ledger.devices.get_mut(&key).expect("device").answered = answered;
    assert!(kinds(&o).contains(&ViolationKind::Loss));
    o.ledger
        .devices
        .get_mut(&key)
        .expect("device")
        .answered
        .clear();
    // But a device that finished a pending sync after the ack and before the message could
    // expire should have had it: a loss again.
    o.ledger
        .devices
        .get_mut(&key)
        .expect("device")
        .syncs
        .push((acked_at, acked_at + 1));
    assert!(kinds(&o).contains(&ViolationKind::Loss));
}

#[test]
fn a_copy_whose_ack_never_came_is_excused_a_gap_only_if_it_may_have_expired_before_a_sync() {
    let mut o = run();
    let (i, conv, seq, mid) = acked(&o, false);
    let sender = (o.plan.sends[i].user, o.plan.sends[i].device);
    let key = *o
        .ledger
        .devices
        .iter()
        .find(|(k, d)| **k != sender && d.shown.contains_key(&mid) && d.outbox.is_empty())
        .expect("another device shows it")
        .0;
    // The sender never saw the ack (the seq is known from what the other devices show),
    // and one recipient device does not show it.
    o.ledger.sends[i].acked = None;
    o.ledger.sends[i].seqs_seen.clear();
    let dl = o.ledger.devices.get_mut(&key).expect("device");
    dl.shown.remove(&mid);
    dl.answered.clear();
    o.limits.retention_ms = 1_000;
    let first_shown = o
        .ledger
        .devices
        .values()
        .filter_map(|d| d.shown.get(&mid))
        .map(|s| s.at_ms)
        .min()
        .expect("shown somewhere");
    // It may have expired before the device came for it: no gap.
    let k = kinds(&o);
    assert!(
        !k.contains(&ViolationKind::Order),
        "{conv} seq {seq}: {k:?}"
    );
    // A pending sync that began after a device showed it (so after the store) and ended
    // before it could expire should have brought it: a gap.
    o.ledger
        .devices
        .get_mut(&key)
        .expect("device")
        .syncs
        .push((first_shown, first_shown + 1));
    assert!(kinds(&o).contains(&ViolationKind::Order));
}

#[test]
fn the_sending_device_owes_only_the_copy_it_was_acked() {
    // The sending device learns a copy's seq only from its ack: with no ack, it owes no
    // copy of its own message (the server keeps it no inbox copy)...
    let mut o = run();
    let (i, _, _, mid) = acked(&o, false);
    let sender = (o.plan.sends[i].user, o.plan.sends[i].device);
    o.limits.retention_ms = 1_000;
    let acked_at = o.ledger.sends[i].acked.as_ref().expect("acked").3;
    let dl = o.ledger.devices.get_mut(&sender).expect("sender");
    dl.shown.remove(&mid);
    // (A sync after the ack and before expiry: retention excuses nothing here.)
    dl.syncs.push((acked_at, acked_at + 1));
    let k = kinds(&o);
    assert!(
        k.contains(&ViolationKind::Order),
        "the acked copy is owed: {k:?}"
    );
    o.ledger.sends[i].acked = None;
    o.ledger.sends[i].seqs_seen.clear();
    let k = kinds(&o);
    assert!(!k.contains(&ViolationKind::Order), "{k:?}");
}

/// u1's phone unlinks u1's laptop at 3 s; u0 and u1 keep talking.
fn run_with_unlink() -> Outcome {
    let sc = Scenario::parse(
        r#"
name = "unlinked"
duration_ms = 10000
quiet_ms = 20000
[workload]
users = 2
devices_per_user = 2
messages_per_user = 5
send_window_ms = [0, 9000]
[[workload.unlinks]]
user = 1
device = 1
by = 0
at_ms = 3000
"#,
        "unlinked.toml",
    )
    .expect("parses");
    let (r, o) = sim::run_seed(&sc, 3, &RunOptions::default()).expect("runs");
    assert!(r.passed, "{:?}", r.failures);
    o
}

#[test]
fn an_unlinked_device_showing_a_later_message_is_non_member_and_owes_nothing_else() {
    let o = run_with_unlink();
    let at = o.ledger.unlinks[&(1, 1)]
        .confirmed_ms
        .expect("the unlink was answered");
    // A message first sent after the unlink, as the phone u1/d0 shows it.
    let (i, mid) = o
        .ledger
        .sends
        .iter()
        .enumerate()
        .find_map(|(i, s)| {
            let a = s.acked.as_ref()?;
            (s.first_attempt_ms? > at && o.plan.sends[i].user == 0).then(|| (i, a.2.clone()))
        })
        .expect("a send after the unlink");
    let sh = o.ledger.devices[&(1, 0)].shown[&mid].clone();
    // The unlinked laptop owes nothing: not showing it is no loss...
    assert!(!o.ledger.devices[&(1, 1)].shown.contains_key(&mid));
    assert!(kinds(&o).is_empty());
    // ...but showing it is a breach of the unlink.
    let mut bad = o;
    bad.ledger
        .devices
        .get_mut(&(1, 1))
        .expect("laptop")
        .shown
        .insert(mid.clone(), sh);
    assert!(
        kinds(&bad).contains(&ViolationKind::NonMember),
        "send {i} shown on the unlinked laptop"
    );
}

#[test]
fn an_inbox_copy_left_waiting_for_an_unlinked_device_is_a_storage_leak() {
    let mut o = run_with_unlink();
    // A message the phone shows and the laptop never did, with a copy still waiting for
    // the laptop alone.
    let laptop = &o.ledger.devices[&(1, 1)].shown;
    let (conv, seq) = o.ledger.devices[&(1, 0)]
        .shown
        .values()
        .find(|s| s.sender == 0 && !laptop.contains_key(&s.message_id))
        .map(|s| (s.conv.clone(), s.seq))
        .expect("u1's phone shows a message of u0");
    o.store
        .commit(vec![Write::Put(
            Table::Inbox,
            inbox_key(
                &"u1".into(),
                &model_server::ids::ConversationId(conv),
                model_server::ids::Seq(seq),
            ),
            b"{\"acked\":[\"d0\"]}".to_vec(),
        )])
        .expect("commit");
    assert!(kinds(&o).contains(&ViolationKind::StorageLeak));
}

#[test]
fn a_presence_probe_answered_offline_for_a_connected_user_or_not_at_all_is_liveness() {
    let o = run();
    let (k, answers) = o
        .ledger
        .devices
        .iter()
        .find_map(|(k, d)| {
            (d.probe.is_some() && !d.probe_answers.is_empty())
                .then_some((*k, d.probe_answers.clone()))
        })
        .expect("a device probed presence near the end and heard the answer");
    assert!(answers.iter().all(|(_, online)| *online), "{answers:?}");
    // Answered "offline" while the user was connected all along.
    let mut bad = run();
    bad.ledger.devices.get_mut(&k).expect("d").probe_answers[0].1 = false;
    assert!(kinds(&bad).contains(&ViolationKind::Liveness));
    // Not answered, though the connection answered a later heartbeat.
    let mut bad = run();
    bad.ledger
        .devices
        .get_mut(&k)
        .expect("d")
        .probe_answers
        .clear();
    assert!(kinds(&bad).contains(&ViolationKind::Liveness));
}

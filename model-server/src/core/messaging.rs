//! Send, store, deliver, acknowledge, sync: the life of one message.
//!
//! The order inside `store_and_fan_out` is the design: dedup on (sender,
//! `client_message_id`), assign the next `seq` of the conversation, commit the message and
//! every inbox copy in one batch, and only then ack the sender and deliver to online
//! devices (or emit a content-free push). Nothing acked can be lost, and a retry can never
//! create a second `seq`.

use super::outbound::FrameClass;
use super::registry::Session;
use super::{ChatCore, Handled, PushRequest, Reject, PUSH_COUNT_CAP};
use crate::ids::{
    is_valid_id, ClientMsgId, ConnId, ConversationId, ConversationKind, DeviceId, GroupId, MediaId,
    MessageId, Millis, Seq, UserId,
};
use crate::protocol::{
    DeliveredMessage, ErrorPayload, GroupReceiptPayload, MessageAckPayload, ReceiptPayload,
    SendPayload, ServerFrame, Status, SyncPagePayload, SyncPayload,
};
use crate::store::records::{
    conv_meta_put, dedup_key, enc, expiry_key, group_cursor_put, inbox_key, msg_key, InboxEntry,
    StoredMessage,
};
use crate::store::{KvStore, Table, Write};
use std::collections::{BTreeMap, BTreeSet};

/// One page of a device's pending messages.
#[derive(Default)]
struct PendingPage {
    messages: Vec<StoredMessage>,
    /// More may remain after `next`.
    has_more: bool,
    /// Where the next page starts (after this conversation and seq).
    next: Option<(ConversationId, Seq)>,
}

/// A send that passed validation, ready to be stored.
pub(super) struct NewMessage {
    pub conv: ConversationId,
    pub cmid: ClientMsgId,
    pub receiver: Option<UserId>,
    pub group: Option<(GroupId, BTreeSet<UserId>)>,
    pub content: String,
    pub media_id: Option<MediaId>,
    pub reply_to: Option<MessageId>,
    pub client_timestamp: Option<u64>,
}

impl<S: KvStore> ChatCore<S> {
    pub(super) fn handle_send(
        &mut self,
        conn: ConnId,
        sess: &Session,
        cmid: ClientMsgId,
        p: SendPayload,
        now: Millis,
    ) -> Handled {
        let with_id = |mut r: Reject, cmid: &ClientMsgId| {
            r.0.client_message_id = Some(cmid.clone());
            r
        };
        if !is_valid_id(p.receiver_id.as_str()) || p.receiver_id == sess.user {
            return Err(with_id(
                Reject::new(400, "receiver_id must be another user's id"),
                &cmid,
            ));
        }
        let conv = ConversationId::direct(&sess.user, &p.receiver_id);
        self.store_and_fan_out(
            conn,
            sess,
            NewMessage {
                conv,
                cmid: cmid.clone(),
                receiver: Some(p.receiver_id),
                group: None,
                content: p.content,
                media_id: p.media_id,
                reply_to: p.reply_to,
                client_timestamp: p.timestamp,
            },
            now,
        )
        .map_err(|r| with_id(r, &cmid))
    }

    /// Checks shared by 1:1 and group sends, then stores and delivers.
    pub(super) fn store_and_fan_out(
        &mut self,
        conn: ConnId,
        sess: &Session,
        m: NewMessage,
        now: Millis,
    ) -> Handled {
        if !is_valid_id(m.cmid.as_str()) {
            return Err(Reject::new(
                400,
                "client_message_id must be 1-64 of [A-Za-z0-9_-]",
            ));
        }
        if m.content.len() > self.cfg.max_content_bytes {
            return Err(Reject::new(
                413,
                format!("content exceeds {} bytes", self.cfg.max_content_bytes),
            ));
        }
        // A retry: answer with the original id and seq, store nothing.
        let seen = if self.bugs.no_dedup {
            None
        } else {
            self.db.dedup(&sess.user, &m.cmid)?
        };
        if let Some((conv, seq)) = seen {
            self.stats.messages_deduplicated += 1;
            self.log(|| super::CoreEvent::Deduplicated {
                at: now,
                conversation: conv.clone(),
                seq,
                client_message_id: m.cmid.0.clone(),
                sender: sess.user.clone(),
            });
            let mut e = ErrorPayload::new(409, "duplicate client_message_id: already stored");
            e.message_id = Some(MessageId::new(&conv, seq));
            e.conversation_id = Some(conv);
            e.seq = Some(seq);
            return Err(Reject(Box::new(e)));
        }
        let burst = self.cfg.send_burst;
        let rate = self.cfg.send_rate_per_sec;
        let bucket = self
            .rates
            .entry(sess.user.clone())
            .or_insert_with(|| super::TokenBucket::full(burst, now));
        if let Err(wait) = bucket.try_take(rate, burst, now) {
            let mut e = ErrorPayload::new(429, "send rate exceeded");
            e.retry_after_ms = Some(wait);
            return Err(Reject(Box::new(e)));
        }
        if let Some(mid) = &m.media_id {
            self.check_media_reference(&sess.user, mid, &m.conv)?;
        }
        let seq = match (self.bugs.order_by_client_clock, m.client_timestamp) {
            (true, Some(ts)) => Seq(ts),
            _ => self.db.last_seq(&m.conv)?.next(),
        };
        // Who keeps an inbox copy: copy-on-send for 1:1 and small groups; a shared log
        // (no copies) for groups above the threshold.
        let recipients: Vec<UserId> = match (&m.receiver, &m.group) {
            (Some(r), _) => vec![r.clone()],
            (None, Some((_, members))) => members
                .iter()
                .filter(|u| **u != sess.user)
                .cloned()
                .collect(),
            (None, None) => Vec::new(),
        };
        let shared_log = m
            .group
            .as_ref()
            .is_some_and(|(_, members)| members.len() > self.cfg.group_fanout_threshold);
        let mut inbox_users: Vec<(UserId, InboxEntry)> = Vec::new();
        if !shared_log {
            for r in &recipients {
                inbox_users.push((r.clone(), InboxEntry::default()));
            }
            if self.bugs.no_inbox_when_online {
                let mut offline = Vec::new();
                for (u, e) in inbox_users.drain(..) {
                    let live = self.reg.user_conns(&u).len();
                    if live == 0 || live < self.db.devices(&u)?.len() {
                        offline.push((u, e));
                    }
                }
                inbox_users = offline;
            }
            // The sender's other devices need it too.
            let own = self.db.devices(&sess.user)?;
            if own.iter().any(|d| d != &sess.device) {
                let mut e = InboxEntry::default();
                e.acked.insert(sess.device.clone());
                inbox_users.push((sess.user.clone(), e));
            }
        }
        let msg = StoredMessage {
            conversation_id: m.conv.clone(),
            seq,
            sender: sess.user.clone(),
            sender_device: sess.device.clone(),
            client_message_id: m.cmid.clone(),
            receiver: m.receiver.clone(),
            group_id: m.group.as_ref().map(|(g, _)| g.clone()),
            content: Some(m.content),
            media_id: m.media_id,
            reply_to: m.reply_to,
            stored_at: now,
            client_timestamp: m.client_timestamp,
            status: crate::protocol::Status::Sent,
            pending_users: inbox_users.len() as u32,
            delivered_by: BTreeSet::new(),
            read_by: BTreeSet::new(),
            recipients: recipients.len() as u32,
            shared_log,
            copied_to: if m.group.is_some() {
                inbox_users.iter().map(|(u, _)| u.clone()).collect()
            } else {
                Vec::new()
            },
        };
        let mut batch = vec![
            Write::Put(Table::Messages, msg_key(&m.conv, seq), enc(&msg)),
            conv_meta_put(&m.conv, seq),
            Write::Put(
                Table::Dedup,
                dedup_key(&sess.user, &m.cmid),
                enc(&(m.conv.clone(), seq)),
            ),
            Write::Put(Table::Expiry, expiry_key(now, &m.conv, seq), Vec::new()),
        ];
        for (u, e) in &inbox_users {
            batch.push(Write::Put(Table::Inbox, inbox_key(u, &m.conv, seq), enc(e)));
        }
        if shared_log {
            // The sending device has its own message: mark it read in its cursor, so the
            // cursor can move past it (its other devices still get it by sync).
            if let Some((g, _)) = &m.group {
                let mut c = self.db.group_cursor(g, &sess.user, &sess.device)?;
                if c.ack(seq.0) {
                    batch.push(group_cursor_put(g, &sess.user, &sess.device, &c));
                }
            }
        }
        if self.bugs.log_content {
            tracing::debug!(conversation = %m.conv, content = ?msg.content, "storing message");
        }
        // Save before ack: if this commit fails, the client gets an error and no ack.
        if self.bugs.inbox_outside_commit {
            let (inbox, rest): (Vec<Write>, Vec<Write>) = batch
                .into_iter()
                .partition(|w| matches!(w, Write::Put(Table::Inbox, ..)));
            let batch = rest;
            self.db.commit(batch)?;
            self.stats.messages_stored += 1;
            self.db.commit(inbox)?;
        } else {
            self.db.commit(batch)?;
            self.stats.messages_stored += 1;
        }
        self.stats.hot.record(&m.conv, now);
        let gateway = self
            .reg
            .conns
            .get(&conn)
            .map(|c| c.gateway.clone())
            .unwrap_or(crate::ids::GatewayId(String::new()));
        let copies = inbox_users.len();
        self.log(|| super::CoreEvent::Stored {
            at: now,
            conversation: m.conv.clone(),
            seq,
            client_message_id: m.cmid.0.clone(),
            sender: sess.user.clone(),
            gateway,
            inbox_copies: copies,
            shared_log,
        });
        tracing::debug!(conv = %m.conv, %seq, sender = %sess.user, "stored");

        let message_id = msg.message_id();
        self.enqueue(
            conn,
            &ServerFrame::MessageAck {
                client_message_id: m.cmid,
                payload: MessageAckPayload {
                    message_id,
                    conversation_id: m.conv,
                    seq,
                    status: Status::Sent,
                    timestamp: now.0,
                },
            },
            FrameClass::Essential,
            None,
            now,
        );
        if self.bugs.early_delivery_receipt && msg.receiver.is_some() {
            let early = ServerFrame::DeliveryAck {
                payload: ReceiptPayload {
                    conversation_id: msg.conversation_id.clone(),
                    message_ids: vec![msg.message_id()],
                    status: Status::Delivered,
                    by: msg.receiver.clone().unwrap_or_else(|| sess.user.clone()),
                    timestamp: now.0,
                },
            };
            self.deliver_to_user(&sess.user, &early, None, None, now);
        }
        let frame = delivered_frame(&msg);
        self.deliver_to_user(&sess.user, &frame, Some(conn), Some(conn), now);
        let preview = if self.bugs.push_with_content {
            msg.content.clone()
        } else {
            None
        };
        for r in &recipients {
            if self.deliver_to_user(r, &frame, None, Some(conn), now) == 0 {
                self.push_wakeup(r, preview.clone(), now)?;
            }
        }
        Ok(())
    }

    /// Emits a content-free push for `user`.
    fn push_wakeup(&mut self, user: &UserId, preview: Option<String>, now: Millis) -> Handled {
        let pending = self.db.inbox_count(user, PUSH_COUNT_CAP)? as u64;
        self.log(|| super::CoreEvent::Pushed {
            at: now,
            user: user.clone(),
            pending: pending.max(1),
        });
        self.stats.pushes += 1;
        self.fx.push.push(PushRequest {
            user: user.clone(),
            pending: pending.max(1),
            preview,
        });
        Ok(())
    }

    /// Is `user` a participant of the conversation named in a message id or sync request?
    pub(super) fn check_member(&self, user: &UserId, kind: &ConversationKind) -> Handled {
        let ok = match kind {
            ConversationKind::Direct(a, b) => a == user || b == user,
            ConversationKind::Group(g) => self
                .db
                .group(g)?
                .is_some_and(|grp| grp.members.contains(user)),
        };
        if ok {
            Ok(())
        } else {
            Err(Reject::new(403, "not a member of this conversation"))
        }
    }

    pub(super) fn keeps_history(&self, msg: &StoredMessage) -> Result<bool, Reject> {
        if self.cfg.keep_history {
            return Ok(true);
        }
        if let Some(r) = &msg.receiver {
            return Ok(self.db.user(&msg.sender)?.keep_history || self.db.user(r)?.keep_history);
        }
        Ok(false)
    }

    pub(super) fn handle_delivery_ack(
        &mut self,
        sess: &Session,
        id: &MessageId,
        now: Millis,
    ) -> Handled {
        let (conv, kind, seq) = id
            .parse()
            .ok_or_else(|| Reject::new(400, "unknown message_id"))?;
        if self.bugs.forget_delivery_acks {
            return Ok(());
        }
        // A member removed from a group may still clear the inbox copies it was sent.
        if self.db.inbox_entry(&sess.user, &conv, seq)?.is_none() {
            self.check_member(&sess.user, &kind)?;
        }
        let Some(mut msg) = self.db.message(&conv, seq)? else {
            return Ok(()); // expired or never existed in a conversation we share: nothing to do
        };
        let mut batch = Vec::new();
        let mut msg_changed = false;
        if msg.shared_log {
            if let ConversationKind::Group(g) = &kind {
                let mut c = self.db.group_cursor(g, &sess.user, &sess.device)?;
                if c.ack(seq.0) {
                    batch.push(group_cursor_put(g, &sess.user, &sess.device, &c));
                }
            }
        } else if let Some(mut entry) = self.db.inbox_entry(&sess.user, &conv, seq)? {
            entry.acked.insert(sess.device.clone());
            let devices = self.db.devices(&sess.user)?;
            if devices.iter().all(|d| entry.acked.contains(d)) {
                batch.push(Write::Delete(
                    Table::Inbox,
                    inbox_key(&sess.user, &conv, seq),
                ));
                msg.pending_users = msg.pending_users.saturating_sub(1);
                msg_changed = true;
            } else {
                batch.push(Write::Put(
                    Table::Inbox,
                    inbox_key(&sess.user, &conv, seq),
                    enc(&entry),
                ));
            }
        }
        let mut notify_sender = false;
        if sess.user != msg.sender {
            if msg.group_id.is_some() {
                if msg.delivered_by.insert(sess.user.clone()) {
                    msg_changed = true;
                    self.dirty_group_receipts.insert((conv.clone(), seq));
                }
            } else if msg.status < Status::Delivered {
                msg.status = Status::Delivered;
                msg_changed = true;
                notify_sender = true;
            }
        }
        if msg_changed
            && !msg.shared_log
            && msg.pending_users == 0
            && msg.content.is_some()
            && !self.keeps_history(&msg)?
        {
            // Every recipient device has it: the body leaves the server.
            msg.content = None;
            self.stats.bodies_purged += 1;
        }
        if msg_changed {
            batch.push(Write::Put(Table::Messages, msg_key(&conv, seq), enc(&msg)));
        }
        if batch.is_empty() {
            return Ok(());
        }
        self.db.commit(batch)?;
        if notify_sender {
            let frame = ServerFrame::DeliveryAck {
                payload: ReceiptPayload {
                    conversation_id: conv,
                    message_ids: vec![id.clone()],
                    status: Status::Delivered,
                    by: sess.user.clone(),
                    timestamp: now.0,
                },
            };
            self.deliver_to_user(&msg.sender, &frame, None, None, now);
        }
        Ok(())
    }

    pub(super) fn handle_read(
        &mut self,
        sess: &Session,
        ids: &[MessageId],
        now: Millis,
    ) -> Handled {
        self.check_receipt_ids(ids, "read_receipt")?;
        // (conversation, sender) -> ids that just turned read, for one frame per sender.
        let mut to_tell: BTreeMap<(ConversationId, UserId), Vec<MessageId>> = BTreeMap::new();
        let mut batch = Vec::new();
        for id in ids {
            let (conv, kind, seq) = id
                .parse()
                .ok_or_else(|| Reject::new(400, "unknown message_id"))?;
            self.check_member(&sess.user, &kind)?;
            let Some(mut msg) = self.db.message(&conv, seq)? else {
                continue;
            };
            if msg.sender == sess.user {
                continue;
            }
            let changed = if msg.group_id.is_some() {
                let a = msg.delivered_by.insert(sess.user.clone());
                let b = msg.read_by.insert(sess.user.clone());
                if a || b {
                    self.dirty_group_receipts.insert((conv.clone(), seq));
                }
                a || b
            } else if msg.status < Status::Read {
                msg.status = Status::Read;
                to_tell
                    .entry((conv.clone(), msg.sender.clone()))
                    .or_default()
                    .push(id.clone());
                true
            } else {
                false
            };
            if changed {
                batch.push(Write::Put(Table::Messages, msg_key(&conv, seq), enc(&msg)));
            }
        }
        if !batch.is_empty() {
            self.db.commit(batch)?;
        }
        for ((conv, sender), message_ids) in to_tell {
            let frame = ServerFrame::ReadReceipt {
                payload: ReceiptPayload {
                    conversation_id: conv,
                    message_ids,
                    status: Status::Read,
                    by: sess.user.clone(),
                    timestamp: now.0,
                },
            };
            self.deliver_to_user(&sender, &frame, None, None, now);
        }
        Ok(())
    }

    /// A receipt frame may name at most `max_receipt_ids` messages.
    fn check_receipt_ids(&self, ids: &[MessageId], frame: &str) -> Result<(), Reject> {
        if ids.len() > self.cfg.max_receipt_ids {
            return Err(Reject::new(
                413,
                format!(
                    "at most {} message_ids per {frame}",
                    self.cfg.max_receipt_ids
                ),
            ));
        }
        Ok(())
    }

    /// Answers `status_query` with the current status of the listed messages the user
    /// sent, on every online device of the user (they all show the same ticks): receipts
    /// are pushed once, so a sender whose socket died meanwhile asks again after
    /// reconnecting. Messages that are not the user's own are skipped, so
    /// the answer reveals nothing about other people's messages.
    pub(super) fn handle_status_query(
        &mut self,
        conn: ConnId,
        sess: &Session,
        ids: &[MessageId],
        now: Millis,
    ) -> Handled {
        self.check_receipt_ids(ids, "status_query")?;
        // Each query costs a token of the user's send bucket: it reads the store once per id.
        let (burst, rate) = (self.cfg.send_burst, self.cfg.send_rate_per_sec);
        let bucket = self
            .rates
            .entry(sess.user.clone())
            .or_insert_with(|| super::TokenBucket::full(burst, now));
        if let Err(wait) = bucket.try_take(rate, burst, now) {
            let mut e = ErrorPayload::new(429, "rate exceeded");
            e.retry_after_ms = Some(wait);
            return Err(Reject(Box::new(e)));
        }
        // Answers go out in the order the ids were asked (a repeated id once), as spare
        // frames: what does not fit the queue now is left out, and nothing already queued
        // (an earlier answer of this query included) is pushed out for it. A client that
        // puts the ids it heard least recently first gets every answer over a few queries
        // however small its queue (found by the simulator: with a 9-frame queue, the group
        // counts answered last shed the 1:1 receipts answered first, on every repeat, so
        // the sender never saw its ticks).
        let mut seen = std::collections::BTreeSet::new();
        // One frame per (conversation, recipient, status) for 1:1 receipts, in the order
        // of its first id; one per group message.
        enum Answer {
            Receipt(ConversationId, UserId, Status, Vec<MessageId>),
            Group(Box<GroupReceiptPayload>),
        }
        let mut answers: Vec<Answer> = Vec::new();
        for id in ids {
            if !seen.insert(id) {
                continue;
            }
            let (conv, _kind, seq) = id
                .parse()
                .ok_or_else(|| Reject::new(400, "unknown message_id"))?;
            let Some(msg) = self.db.message(&conv, seq)? else {
                continue;
            };
            if msg.sender != sess.user {
                continue;
            }
            if msg.group_id.is_some() {
                answers.push(Answer::Group(Box::new(group_receipt(&msg))));
            } else if let Some(to) = msg.receiver.clone() {
                if msg.status > Status::Sent {
                    let found = answers.iter_mut().find_map(|a| match a {
                        Answer::Receipt(c, b, st, v)
                            if *c == conv && *b == to && *st == msg.status =>
                        {
                            Some(v)
                        }
                        _ => None,
                    });
                    match found {
                        Some(v) => v.push(msg.message_id()),
                        None => answers.push(Answer::Receipt(
                            conv.clone(),
                            to,
                            msg.status,
                            vec![msg.message_id()],
                        )),
                    }
                }
            }
        }
        for a in answers {
            match a {
                Answer::Receipt(conv, by, status, message_ids) => {
                    let payload = ReceiptPayload {
                        conversation_id: conv,
                        message_ids,
                        status,
                        by,
                        timestamp: now.0,
                    };
                    let frame = if status == Status::Read {
                        ServerFrame::ReadReceipt { payload }
                    } else {
                        ServerFrame::DeliveryAck { payload }
                    };
                    self.enqueue(conn, &frame, FrameClass::Spare, None, now);
                }
                Answer::Group(payload) => {
                    // A newer count for the same message replaces an older one still
                    // queued, so counts never go backward.
                    let key = format!("grcpt:{}", payload.message_id);
                    let frame = ServerFrame::GroupReceipt { payload: *payload };
                    self.enqueue(conn, &frame, FrameClass::Spare, Some(key), now);
                }
            }
        }
        Ok(())
    }

    /// Sends one aggregated receipt per changed group message to its sender (seed 002:
    /// combine read receipts in groups rather than one event per member).
    pub(super) fn flush_group_receipts(&mut self, now: Millis) {
        let dirty = std::mem::take(&mut self.dirty_group_receipts);
        for (conv, seq) in dirty {
            let msg = match self.db.message(&conv, seq) {
                Ok(Some(m)) => m,
                _ => continue,
            };
            let frame = ServerFrame::GroupReceipt {
                payload: group_receipt(&msg),
            };
            let key = format!("grcpt:{}", msg.message_id());
            for (_, c) in self.reg.user_conns(&msg.sender) {
                self.enqueue(c, &frame, FrameClass::Droppable, Some(key.clone()), now);
            }
        }
    }

    /// Messages waiting for one device: inbox copies it has not acked, plus shared-log
    /// group messages past its cursor.
    pub(super) fn pending_for_device(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<u64, Reject> {
        let page = self.pending_page(user, device, None, 10_000)?;
        Ok(page.messages.len() as u64)
    }

    /// Up to `limit` pending messages for a device after `cursor`, in (conversation, seq)
    /// order, whether more may remain, and where the next page starts.
    ///
    /// Every store read is bounded by `sync_scan_rows`: a page that stops scanning early
    /// (many copies this device already acked, a shared log it mostly read) returns only
    /// what lies before the point it reached, says `has_more`, and resumes from there, so
    /// nothing past that point is skipped however large the inbox.
    fn pending_page(
        &self,
        user: &UserId,
        device: &DeviceId,
        cursor: Option<(ConversationId, Seq)>,
        limit: usize,
    ) -> Result<PendingPage, Reject> {
        let scan_cap = self.cfg.sync_scan_rows.max(1);
        let mut found: Vec<(ConversationId, Seq)> = Vec::new();
        // The furthest position fully looked at, when a scan stopped before the end.
        let mut horizon: Option<(ConversationId, Seq)> = None;
        let mut stop_at = |at: (ConversationId, Seq)| {
            if horizon.as_ref().is_none_or(|h| at < *h) {
                horizon = Some(at);
            }
        };
        // Inbox copies, skipping ones this device already acked.
        let batch = scan_cap.clamp(1, 256);
        let mut from = cursor.clone().map(|(c, s)| (c, s.next()));
        let mut scanned = 0usize;
        loop {
            let want = batch.min(scan_cap - scanned);
            let rows = self
                .db
                .inbox_scan(user, from.as_ref().map(|(c, s)| (c, *s)), want)?;
            for (c, s, e) in &rows {
                scanned += 1;
                if !e.acked.contains(device) {
                    found.push((c.clone(), *s));
                }
            }
            if rows.len() < want {
                break; // the whole inbox after the cursor was looked at
            }
            let (c, s, _) = &rows[rows.len() - 1];
            if found.len() > limit {
                break; // enough: the page is cut at `limit` below
            }
            if scanned >= scan_cap {
                stop_at((c.clone(), *s));
                break;
            }
            from = Some((c.clone(), s.next()));
        }
        // Shared-log groups: messages past this device's cursor that it has not acked and
        // did not send itself (the user's other devices do need those).
        for g in self.db.user_groups(user)? {
            let conv = ConversationId::group(&g);
            if let Some((cc, _)) = &cursor {
                if &conv < cc {
                    continue;
                }
            }
            let read = self.db.group_cursor(&g, user, device)?;
            let mut after = Seq(read.upto);
            if let Some((cc, cs)) = &cursor {
                if cc == &conv {
                    after = after.max(*cs);
                }
            }
            let (mut got, mut looked) = (0usize, 0usize);
            loop {
                let want = (limit + 1).min(scan_cap - looked).max(1);
                let msgs = self.db.messages_after(&conv, after, want)?;
                for m in &msgs {
                    looked += 1;
                    let own = m.sender == *user && m.sender_device == *device;
                    if m.shared_log && !own && !read.has(m.seq.0) {
                        found.push((conv.clone(), m.seq));
                        got += 1;
                    }
                }
                if msgs.len() < want || got > limit {
                    break;
                }
                let last = msgs[msgs.len() - 1].seq;
                if looked >= scan_cap {
                    stop_at((conv.clone(), last));
                    break;
                }
                after = last;
            }
        }
        found.sort();
        found.dedup();
        if let Some(h) = &horizon {
            found.retain(|x| x <= h);
        }
        let cut = found.len() > limit;
        found.truncate(limit);
        let next = if cut {
            found.last().cloned()
        } else {
            horizon.clone().or_else(|| found.last().cloned())
        };
        let mut out = Vec::with_capacity(found.len());
        for (c, s) in found {
            if let Some(m) = self.db.message(&c, s)? {
                if m.content.is_some() {
                    out.push(m);
                }
            }
        }
        Ok(PendingPage {
            messages: out,
            has_more: cut || horizon.is_some(),
            next,
        })
    }

    pub(super) fn handle_sync(
        &mut self,
        conn: ConnId,
        sess: &Session,
        p: SyncPayload,
        now: Millis,
    ) -> Handled {
        let limit = p
            .limit
            .unwrap_or(self.cfg.sync_page_cap)
            .clamp(1, self.cfg.sync_page_cap);
        let page = match &p.conversation_id {
            Some(conv) => {
                let kind = conv
                    .kind()
                    .ok_or_else(|| Reject::new(400, "unknown conversation_id"))?;
                self.check_member(&sess.user, &kind)?;
                let after = match (&p.after_seq, &p.cursor) {
                    (Some(s), _) => *s,
                    (None, Some(c)) => {
                        Seq(c.parse().map_err(|_| Reject::new(400, "bad cursor"))?)
                    }
                    (None, None) => Seq(0),
                };
                let mut msgs = self.db.messages_after(conv, after, limit + 1)?;
                let has_more = msgs.len() > limit;
                msgs.truncate(limit);
                let next = msgs.last().map(|m| m.seq.to_string());
                let messages = msgs
                    .iter()
                    .filter(|m| m.content.is_some())
                    .map(delivered_message)
                    .collect();
                SyncPagePayload {
                    conversation_id: Some(conv.clone()),
                    messages,
                    next_cursor: next,
                    has_more,
                }
            }
            None => {
                let cursor = match &p.cursor {
                    Some(c) => {
                        let (conv, _, seq) = MessageId(c.clone())
                            .parse()
                            .ok_or_else(|| Reject::new(400, "bad cursor"))?;
                        Some((conv, seq))
                    }
                    None => None,
                };
                let page = if self.bugs.skip_sync_on_reconnect {
                    PendingPage::default()
                } else {
                    self.pending_page(&sess.user, &sess.device, cursor, limit)?
                };
                SyncPagePayload {
                    conversation_id: None,
                    messages: page.messages.iter().map(delivered_message).collect(),
                    next_cursor: page.next.map(|(c, s)| MessageId::new(&c, s).0),
                    has_more: page.has_more,
                }
            }
        };
        self.enqueue(
            conn,
            &ServerFrame::SyncPage {
                payload: self.fit_page(page),
            },
            FrameClass::Essential,
            None,
            now,
        );
        Ok(())
    }

    /// Trims a page from the end until it takes at most half the outbound queue's bytes, so
    /// a page of large messages can never overflow an empty queue (which would disconnect
    /// the client on every sync, forever). The cursor then points at the last message kept.
    fn fit_page(&self, mut page: SyncPagePayload) -> SyncPagePayload {
        let budget = self.cfg.outbound_max_bytes / 2;
        let size =
            |m: &DeliveredMessage| serde_json::to_string(m).map(|s| s.len() + 1).unwrap_or(0);
        let mut total = 256;
        let mut keep = 0;
        for m in &page.messages {
            total += size(m);
            if total > budget && keep > 0 {
                break;
            }
            keep += 1;
        }
        if keep < page.messages.len() {
            page.messages.truncate(keep);
            page.has_more = true;
            page.next_cursor = page.messages.last().map(|m| {
                if page.conversation_id.is_some() {
                    m.seq.to_string()
                } else {
                    m.message_id.0.clone()
                }
            });
        }
        page
    }

    /// Removes messages past retention (and their inbox copies), and expired uploads, at
    /// most `sweep_batch` messages; returns whether a full batch was removed (more may be
    /// due: the next tick continues).
    pub(super) fn sweep_expired(&mut self, now: Millis) -> Result<bool, Reject> {
        let cutoff = Millis(now.0.saturating_sub(self.cfg.retention_ms));
        let batch_cap = self.cfg.sweep_batch.max(1);
        let due = self.db.expired(cutoff, batch_cap)?;
        let more = due.len() >= batch_cap;
        for (at, conv, seq) in due {
            let mut batch = vec![Write::Delete(Table::Expiry, expiry_key(at, &conv, seq))];
            if let Some(m) = self.db.message(&conv, seq)? {
                batch.push(Write::Delete(Table::Messages, msg_key(&conv, seq)));
                batch.push(Write::Delete(
                    Table::Dedup,
                    dedup_key(&m.sender, &m.client_message_id),
                ));
                // Every copy it was given: the 1:1 pair, or the group members at send time
                // (members removed since keep theirs until they ack it, or until now).
                // Records written before `copied_to` existed fall back to today's members.
                let mut users: Vec<UserId> = m.receiver.iter().cloned().collect();
                if !m.copied_to.is_empty() {
                    users.extend(m.copied_to.iter().cloned());
                } else if let (Some(g), false) = (&m.group_id, m.shared_log) {
                    if let Some(grp) = self.db.group(g)? {
                        users.extend(grp.members);
                    }
                }
                users.push(m.sender.clone());
                users.sort();
                users.dedup();
                for u in users {
                    batch.push(Write::Delete(Table::Inbox, inbox_key(&u, &conv, seq)));
                }
                self.stats.messages_expired += 1;
            }
            self.db.commit(batch)?;
        }
        self.sweep_media(now)?;
        Ok(more)
    }
}

/// The message as a device receives it.
pub(super) fn delivered_message(m: &StoredMessage) -> DeliveredMessage {
    DeliveredMessage {
        message_id: m.message_id(),
        conversation_id: m.conversation_id.clone(),
        seq: m.seq,
        sender_id: m.sender.clone(),
        receiver_id: m.receiver.clone(),
        group_id: m.group_id.clone(),
        content: m.content.clone().unwrap_or_default(),
        media_id: m.media_id.clone(),
        reply_to: m.reply_to.clone(),
        timestamp: m.stored_at.0,
        client_timestamp: m.client_timestamp,
    }
}

/// The frame that carries a stored message to a device.
pub(super) fn delivered_frame(m: &StoredMessage) -> ServerFrame {
    let payload = delivered_message(m);
    if m.group_id.is_some() {
        ServerFrame::GroupMessage { payload }
    } else {
        ServerFrame::Message { payload }
    }
}

/// The aggregated counts a group sender sees for one of its messages.
fn group_receipt(msg: &StoredMessage) -> GroupReceiptPayload {
    GroupReceiptPayload {
        message_id: msg.message_id(),
        conversation_id: msg.conversation_id.clone(),
        seq: msg.seq,
        recipients: u64::from(msg.recipients),
        delivered: msg.delivered_by.len() as u64,
        read: msg.read_by.len() as u64,
    }
}

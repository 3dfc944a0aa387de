//! Unlinking a device: the user removes one of their devices (a lost phone, a logged-out
//! desktop). It exists apart from auth because it is a store operation over the whole
//! inbox: nothing may keep waiting for a device that will never ack again, or the
//! message bodies it was holding back would stay on the server until retention.

use super::outbound::FrameClass;
use super::registry::Session;
use super::{ChatCore, CloseReason, Handled, Reject};
use crate::ids::{is_valid_id, ConnId, ConversationId, DeviceId, Millis, Seq, UserId};
use crate::protocol::{DeviceUnlinkPayload, ServerFrame};
use crate::store::records::{device_key, enc, group_cursor_key, inbox_key, msg_key, DeviceRecord};
use crate::store::{KvStore, Table, Write};

/// Inbox rows read per store scan while unlinking.
const SCAN_PAGE: usize = 1024;

impl<S: KvStore> ChatCore<S> {
    /// Whether `device` of `user` was unlinked: its tokens then work nowhere, the media
    /// lane included.
    pub fn device_unlinked(&self, user: &UserId, device: &DeviceId) -> Result<bool, String> {
        if self.bugs.unlinked_tokens_work {
            return Ok(false);
        }
        let rec = self.db.device(user, device).map_err(|e| e.to_string())?;
        Ok(rec.is_some_and(|r| r.unlinked_at.is_some()))
    }

    /// `device_unlink`: in one commit, the device becomes a tombstone (its tokens stop
    /// working), every inbox copy that only it had left to ack is removed (and a body
    /// nobody else waits for with it), and its shared-log cursors go. Then its live
    /// connection is closed and the asking connection told. Unlinking a device that is
    /// already unlinked answers the same, so a retry after a lost answer is safe.
    pub(super) fn handle_device_unlink(
        &mut self,
        conn: ConnId,
        sess: &Session,
        p: DeviceUnlinkPayload,
        now: Millis,
    ) -> Handled {
        if !is_valid_id(p.device_id.as_str()) {
            return Err(Reject::new(400, "invalid device_id"));
        }
        let user = &sess.user;
        let target = &p.device_id;
        let Some(rec) = self.db.device(user, target)? else {
            return Err(Reject::new(404, "no such device"));
        };
        if rec.unlinked_at.is_none() {
            let remaining: Vec<_> = self
                .db
                .devices(user)?
                .into_iter()
                .filter(|d| d != target)
                .collect();
            let mut batch = vec![Write::Put(
                Table::Devices,
                device_key(user, target),
                enc(&DeviceRecord {
                    unlinked_at: Some(now.0),
                }),
            )];
            let mut from: Option<(ConversationId, Seq)> = None;
            while !self.bugs.unlink_keeps_copies {
                // `from` is inclusive: after the first page, its first row was seen.
                let skip = usize::from(from.is_some());
                let limit = SCAN_PAGE + skip;
                let rows = self
                    .db
                    .inbox_scan(user, from.as_ref().map(|(c, s)| (c, *s)), limit)?;
                let full = rows.len() == limit;
                for (conv, seq, entry) in rows.iter().skip(skip) {
                    let mut entry = entry.clone();
                    let had = entry.acked.remove(target);
                    if remaining.iter().all(|d| entry.acked.contains(d)) {
                        batch.push(Write::Delete(Table::Inbox, inbox_key(user, conv, *seq)));
                        if let Some(mut msg) = self.db.message(conv, *seq)? {
                            msg.pending_users = msg.pending_users.saturating_sub(1);
                            if msg.pending_users == 0
                                && !msg.shared_log
                                && msg.content.is_some()
                                && !self.keeps_history(&msg)?
                            {
                                // Nobody waits for the body any more: it leaves the server.
                                msg.content = None;
                                self.stats.bodies_purged += 1;
                            }
                            batch.push(Write::Put(Table::Messages, msg_key(conv, *seq), enc(&msg)));
                        }
                    } else if had {
                        batch.push(Write::Put(
                            Table::Inbox,
                            inbox_key(user, conv, *seq),
                            enc(&entry),
                        ));
                    }
                }
                match rows.last() {
                    Some((c, s, _)) if full => from = Some((c.clone(), *s)),
                    _ => break,
                }
            }
            for g in self.db.user_groups(user)? {
                batch.push(Write::Delete(
                    Table::GroupCursor,
                    group_cursor_key(&g, user, target),
                ));
            }
            self.db.commit(batch)?;
            tracing::info!(%user, device = %target, "device unlinked");
        }
        let answer = ServerFrame::DeviceUnlinked { payload: p.clone() };
        self.enqueue(conn, &answer, FrameClass::Essential, None, now);
        if let Some(live) = self
            .reg
            .by_device
            .get(&(user.clone(), target.clone()))
            .copied()
        {
            // Its queued frames (the answer, when it unlinked itself) go first.
            self.close(live, CloseReason::Unlinked, now);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::core::testkit::Harness;
    use crate::core::CloseReason;
    use crate::ids::{ConversationId, DeviceId, Seq, UserId};
    use crate::protocol::ServerFrame;
    use crate::store::records::Records;
    use serde_json::json;

    fn unlink(h: &mut Harness, c: crate::ids::ConnId, device: &str) -> Vec<ServerFrame> {
        let f = json!({"type":"device_unlink","payload":{"device_id":device}});
        h.send(c, &f.to_string());
        h.recv(c)
    }

    fn ack_of(frames: &[ServerFrame]) -> (ConversationId, Seq, crate::ids::MessageId) {
        frames
            .iter()
            .find_map(|f| match f {
                ServerFrame::MessageAck { payload, .. } => Some((
                    payload.conversation_id.clone(),
                    payload.seq,
                    payload.message_id.clone(),
                )),
                _ => None,
            })
            .expect("message_ack")
    }

    /// The final frames of `c`'s close, which must have `reason`.
    fn closed_with(h: &Harness, c: crate::ids::ConnId, reason: CloseReason) -> Vec<ServerFrame> {
        let close = h
            .closes
            .iter()
            .find(|x| x.conn == c)
            .unwrap_or_else(|| panic!("{c} was not closed: {:?}", h.closes));
        assert_eq!(close.reason, reason);
        close
            .final_frames
            .iter()
            .map(|t| serde_json::from_str(t).expect("decodes"))
            .collect()
    }

    fn delivery_ack(h: &mut Harness, c: crate::ids::ConnId, id: &crate::ids::MessageId) {
        h.send(
            c,
            &json!({"type":"delivery_ack","message_id":id.as_str()}).to_string(),
        );
    }

    #[test]
    fn an_unlinked_device_is_closed_and_its_token_no_longer_logs_it_in() {
        let mut h = Harness::new();
        let phone = h.login("bob", "phone");
        let laptop = h.login("bob", "laptop");
        let frames = unlink(&mut h, phone, "laptop");
        assert!(
            frames.iter().any(|f| matches!(f,
                ServerFrame::DeviceUnlinked { payload } if payload.device_id.as_str() == "laptop")),
            "{frames:?}"
        );
        assert!(
            h.closes
                .iter()
                .any(|c| c.conn == laptop && c.reason == CloseReason::Unlinked),
            "the laptop's socket is closed: {:?}",
            h.closes
        );
        let records = Records::new(h.store.clone());
        assert_eq!(
            records.devices(&UserId::from("bob")).expect("read"),
            vec![DeviceId::from("phone")]
        );
        // The old, unexpired token is refused: it cannot register the device again.
        let c = h.open("gw1");
        let tok = h.token("bob", "laptop");
        h.send(
            c,
            &json!({"type":"auth","payload":{"user_id":"bob","auth_token":tok,"device_id":"laptop"}})
                .to_string(),
        );
        let last = closed_with(&h, c, CloseReason::Unauthorized);
        assert!(
            matches!(last.first(), Some(ServerFrame::Error { payload })
                if payload.code == 401 && payload.message.contains("unlinked")),
            "{last:?}"
        );
        // Asking again answers again and changes nothing.
        let again = unlink(&mut h, phone, "laptop");
        assert!(matches!(
            again.first(),
            Some(ServerFrame::DeviceUnlinked { .. })
        ));
    }

    #[test]
    fn unlinking_the_device_that_had_not_acked_frees_the_inbox_copy_and_the_body() {
        let mut h = Harness::new();
        let alice = h.login("alice", "phone");
        let phone = h.login("bob", "phone");
        let _laptop = h.login("bob", "laptop");
        h.say(alice, "bob", "c1", "Ym9keQ");
        let (conv, seq, id) = ack_of(&h.recv(alice));
        delivery_ack(&mut h, phone, &id);
        let records = Records::new(h.store.clone());
        let bob = UserId::from("bob");
        assert!(
            records
                .inbox_entry(&bob, &conv, seq)
                .expect("read")
                .is_some(),
            "the laptop has not acked yet"
        );
        unlink(&mut h, phone, "laptop");
        assert!(
            records
                .inbox_entry(&bob, &conv, seq)
                .expect("read")
                .is_none(),
            "nothing waits for an unlinked device"
        );
        let m = records.message(&conv, seq).expect("read").expect("kept");
        assert_eq!(m.content, None, "its body leaves the server");
        assert_eq!(m.pending_users, 0);
    }

    #[test]
    fn a_device_may_unlink_itself_and_later_messages_do_not_wait_for_it() {
        let mut h = Harness::new();
        let alice = h.login("alice", "phone");
        let phone = h.login("bob", "phone");
        let laptop = h.login("bob", "laptop");
        unlink(&mut h, laptop, "laptop");
        let last = closed_with(&h, laptop, CloseReason::Unlinked);
        assert!(
            matches!(last.first(), Some(ServerFrame::DeviceUnlinked { .. })),
            "the answer is written before the close: {last:?}"
        );
        h.say(alice, "bob", "c2", "Ym9keQ");
        let (conv, seq, id) = ack_of(&h.recv(alice));
        delivery_ack(&mut h, phone, &id);
        let records = Records::new(h.store.clone());
        assert!(
            records
                .inbox_entry(&UserId::from("bob"), &conv, seq)
                .expect("read")
                .is_none(),
            "the phone's ack was the last one needed"
        );
    }

    #[test]
    fn unlinking_a_device_that_never_logged_in_is_404_and_bad_ids_400() {
        let mut h = Harness::new();
        let phone = h.login("bob", "phone");
        let frames = unlink(&mut h, phone, "tablet");
        assert!(
            matches!(frames.first(), Some(ServerFrame::Error { payload }) if payload.code == 404),
            "{frames:?}"
        );
        let frames = unlink(&mut h, phone, "bad id!");
        assert!(
            matches!(frames.first(), Some(ServerFrame::Error { payload }) if payload.code == 400),
            "{frames:?}"
        );
        // Another user's device is out of reach: ids are per user.
        let _alice = h.login("alice", "tablet");
        let frames = unlink(&mut h, phone, "tablet");
        assert!(
            matches!(frames.first(), Some(ServerFrame::Error { payload }) if payload.code == 404),
            "{frames:?}"
        );
    }
}

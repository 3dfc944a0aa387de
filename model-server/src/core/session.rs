//! Authentication, the device registry, presence, typing and settings: everything about
//! who is connected rather than what they send.

use super::outbound::{FrameClass, PushOutcome};
use super::registry::Session;
use super::{ChatCore, CloseReason, Handled, Reject};
use crate::auth::{self, Secret};
use crate::ids::{is_valid_id, ConnId, ConversationKind, DeviceId, Millis, UserId};
use crate::protocol::{
    AuthPayload, AuthSuccessPayload, PresencePayload, PresenceStatus, PresenceSubscribePayload,
    ServerFrame, SettingsPayload, SettingsState, TypingNotice, TypingPayload,
};
use crate::store::records::{device_key, enc, key};
use crate::store::{KvStore, Table, Write};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Resume token for a device disconnected for slowness: proves the server issued it to
/// this (user, device). Deterministic, so it needs no storage.
pub fn resume_token(secret: &Secret, user: &UserId, device: &DeviceId) -> String {
    let mut mac = match <Hmac<Sha256> as Mac>::new_from_slice(secret_bytes(secret)) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    mac.update(format!("resume.{user}.{device}").as_bytes());
    URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

fn secret_bytes(s: &Secret) -> &[u8] {
    s.as_bytes()
}

impl<S: KvStore> ChatCore<S> {
    pub(super) fn handle_auth(&mut self, conn: ConnId, p: AuthPayload, now: Millis) -> Handled {
        if !is_valid_id(p.user_id.as_str()) || !is_valid_id(p.device_id.as_str()) {
            return Err(Reject::new(401, "invalid user_id or device_id"));
        }
        let verified =
            match auth::verify(&self.secret, &p.auth_token, &p.user_id, &p.device_id, now) {
                Err(auth::AuthError::Expired) if self.bugs.accept_expired_tokens => Ok(()),
                v => v,
            };
        if let Err(e) = verified {
            tracing::info!(user = %p.user_id, device = %p.device_id, error = %e, "auth refused");
            return Err(Reject::new(401, format!("auth refused: {e}")));
        }
        let record = self.db.device(&p.user_id, &p.device_id)?;
        if record.as_ref().is_some_and(|r| r.unlinked_at.is_some())
            && !self.bugs.unlinked_tokens_work
        {
            // Its tokens were revoked with it: a leaked token must not re-register it.
            tracing::info!(user = %p.user_id, device = %p.device_id, "auth refused: unlinked");
            return Err(Reject::new(401, "auth refused: device unlinked"));
        }
        let resumed = p
            .resume_token
            .as_deref()
            .is_some_and(|t| t == resume_token(&self.secret, &p.user_id, &p.device_id));
        // One connection per device: a newer one replaces the older.
        if let Some(old) = self
            .reg
            .by_device
            .get(&(p.user_id.clone(), p.device_id.clone()))
            .copied()
        {
            self.close(old, CloseReason::Replaced, now);
        }
        let was_online = self.reg.is_online(&p.user_id);
        // Register the device and home region durably before telling the client it is in.
        let mut batch = Vec::new();
        if record.is_none() || record.as_ref().is_some_and(|r| r.unlinked_at.is_some()) {
            batch.push(Write::Put(
                Table::Devices,
                device_key(&p.user_id, &p.device_id),
                b"{}".to_vec(),
            ));
        }
        let mut user = self.db.user(&p.user_id)?;
        if user.home_region.is_none() {
            if let Some(r) = self.reg.region_of(conn) {
                user.home_region = Some(r.0.clone());
                batch.push(Write::Put(
                    Table::Users,
                    key(&[p.user_id.as_str()], None),
                    enc(&user),
                ));
            }
        }
        if !batch.is_empty() {
            self.db.commit(batch)?;
        }
        self.next_session += 1;
        let session_id = format!("sess_{}", self.next_session);
        let unread = self.pending_for_device(&p.user_id, &p.device_id)?;
        let Some(c) = self.reg.conns.get_mut(&conn) else {
            return Ok(());
        };
        c.session = Some(Session {
            user: p.user_id.clone(),
            device: p.device_id.clone(),
            session_id: session_id.clone(),
        });
        self.reg
            .by_device
            .insert((p.user_id.clone(), p.device_id.clone()), conn);
        tracing::debug!(%conn, user = %p.user_id, device = %p.device_id, "authenticated");
        self.enqueue(
            conn,
            &ServerFrame::AuthSuccess {
                payload: AuthSuccessPayload {
                    session_id,
                    server_time: now.0,
                    unread_count: unread,
                    resumed,
                    heartbeat_interval_ms: self.cfg.heartbeat_interval_ms,
                },
            },
            FrameClass::Essential,
            None,
            now,
        );
        if !was_online {
            self.announce_presence(&p.user_id, now)?;
        }
        Ok(())
    }

    /// Registers (links) a device for `user` outside any connection, as a device-linking
    /// flow would: from then on messages wait for it too.
    pub fn admin_register_device(
        &mut self,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<(), String> {
        if !is_valid_id(user.as_str()) || !is_valid_id(device.as_str()) {
            return Err("invalid user or device id".into());
        }
        self.db
            .commit(vec![Write::Put(
                Table::Devices,
                device_key(user, device),
                b"{}".to_vec(),
            )])
            .map_err(|e| e.to_string())
    }

    /// Removes `conn` from the registry and tells watchers if its user went offline.
    pub(super) fn forget_conn(&mut self, conn: ConnId, now: Millis) {
        let Some(c) = self.reg.conns.remove(&conn) else {
            return;
        };
        self.fx.wake.remove(&conn);
        self.held.remove(&conn);
        self.presence.drop_conn(conn, &c.subscriptions);
        if let Some(s) = c.session {
            let k = (s.user.clone(), s.device.clone());
            if self.reg.by_device.get(&k) == Some(&conn) {
                self.reg.by_device.remove(&k);
            }
            if !self.reg.is_online(&s.user) {
                self.presence.last_seen.insert(s.user.clone(), now);
                if let Err(e) = self.announce_presence(&s.user, now) {
                    tracing::error!(error = %e.0.message, "presence announce failed");
                }
            }
        }
    }

    fn presence_of(&self, user: &UserId) -> Result<PresencePayload, Reject> {
        let online = self.reg.is_online(user);
        let hide = self.db.user(user)?.hide_last_seen;
        Ok(PresencePayload {
            user_id: user.clone(),
            status: if online {
                PresenceStatus::Online
            } else {
                PresenceStatus::Offline
            },
            last_seen: if hide || online {
                None
            } else {
                self.presence.last_seen.get(user).map(|m| m.0)
            },
        })
    }

    fn announce_presence(&mut self, user: &UserId, now: Millis) -> Handled {
        let watchers = self.presence.watchers(user);
        if watchers.is_empty() {
            return Ok(());
        }
        let frame = ServerFrame::Presence {
            payload: self.presence_of(user)?,
        };
        for w in watchers {
            self.enqueue(
                w,
                &frame,
                FrameClass::Droppable,
                Some(format!("presence:{user}")),
                now,
            );
        }
        Ok(())
    }

    pub(super) fn handle_presence_subscribe(
        &mut self,
        conn: ConnId,
        _sess: &Session,
        p: PresenceSubscribePayload,
        now: Millis,
    ) -> Handled {
        if p.user_ids.iter().any(|u| !is_valid_id(u.as_str())) {
            return Err(Reject::new(400, "invalid user id in user_ids"));
        }
        let held = self
            .reg
            .conns
            .get(&conn)
            .map(|c| c.subscriptions.len())
            .unwrap_or(0);
        let new: Vec<UserId> = {
            let c = self.reg.conns.get(&conn);
            p.user_ids
                .iter()
                .filter(|u| c.is_some_and(|c| !c.subscriptions.contains(*u)))
                .cloned()
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        if held + new.len() > self.cfg.max_presence_subscriptions {
            return Err(Reject::new(
                413,
                format!(
                    "at most {} presence subscriptions per connection",
                    self.cfg.max_presence_subscriptions
                ),
            ));
        }
        for u in &p.user_ids {
            if let Some(c) = self.reg.conns.get_mut(&conn) {
                c.subscriptions.insert(u.clone());
            }
            self.presence.subscribe(conn, u);
            let frame = ServerFrame::Presence {
                payload: self.presence_of(u)?,
            };
            self.enqueue(
                conn,
                &frame,
                FrameClass::Droppable,
                Some(format!("presence:{u}")),
                now,
            );
        }
        Ok(())
    }

    pub(super) fn handle_typing(
        &mut self,
        sess: &Session,
        p: TypingPayload,
        now: Millis,
    ) -> Handled {
        let (mut others, conv) = match p.conversation_id.kind() {
            Some(ConversationKind::Direct(a, b)) if a == sess.user || b == sess.user => {
                (vec![if a == sess.user { b } else { a }], p.conversation_id)
            }
            Some(ConversationKind::Group(g)) => {
                let grp = self
                    .db
                    .group(&g)?
                    .filter(|g| g.members.contains(&sess.user))
                    .ok_or_else(|| Reject::new(403, "not a member of this conversation"))?;
                (
                    grp.members
                        .into_iter()
                        .filter(|u| u != &sess.user)
                        .collect(),
                    p.conversation_id,
                )
            }
            _ => return Err(Reject::new(403, "not a member of this conversation")),
        };
        if self.bugs.typing_to_own_devices {
            others.push(sess.user.clone());
        }
        // Throttle: at most one typing notice per user per conversation per interval.
        let k = (sess.user.clone(), conv.clone());
        if let Some(last) = self.typing_last.get(&k) {
            // A clock stepped back (`now` before `last`) ends the throttle rather than
            // holding it for the length of the step.
            if now >= *last && now.since(*last) < self.cfg.typing_min_interval_ms {
                self.log(|| super::CoreEvent::Typing {
                    at: now,
                    conversation: conv.clone(),
                    user: sess.user.clone(),
                    devices: 0,
                    coalesced: 0,
                    throttled: true,
                });
                return Ok(());
            }
        }
        self.typing_last.insert(k, now);
        let frame = ServerFrame::Typing {
            payload: TypingNotice {
                conversation_id: conv.clone(),
                user_id: sess.user.clone(),
            },
        };
        let key = format!("typing:{conv}:{}", sess.user);
        let (mut devices, mut coalesced) = (0, 0);
        for u in others {
            for (_, c) in self.reg.user_conns(&u) {
                match self.enqueue(c, &frame, FrameClass::Droppable, Some(key.clone()), now) {
                    Some(PushOutcome::Queued) => devices += 1,
                    Some(PushOutcome::Coalesced) => {
                        devices += 1;
                        coalesced += 1;
                    }
                    _ => {}
                }
            }
        }
        self.log(|| super::CoreEvent::Typing {
            at: now,
            conversation: conv.clone(),
            user: sess.user.clone(),
            devices,
            coalesced,
            throttled: false,
        });
        Ok(())
    }

    pub(super) fn handle_settings(
        &mut self,
        conn: ConnId,
        sess: &Session,
        p: SettingsPayload,
        now: Millis,
    ) -> Handled {
        let mut u = self.db.user(&sess.user)?;
        if let Some(h) = p.hide_last_seen {
            u.hide_last_seen = h;
        }
        if let Some(h) = p.keep_history {
            u.keep_history = h;
        }
        self.db.commit(vec![Write::Put(
            Table::Users,
            key(&[sess.user.as_str()], None),
            enc(&u),
        )])?;
        self.enqueue(
            conn,
            &ServerFrame::SettingsAck {
                payload: SettingsState {
                    hide_last_seen: u.hide_last_seen,
                    keep_history: u.keep_history,
                },
            },
            FrameClass::Essential,
            None,
            now,
        );
        Ok(())
    }
}

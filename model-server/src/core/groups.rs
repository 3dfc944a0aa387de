//! Groups: create, add, remove, announcement-only mode, and the group send path.
//!
//! Membership is checked on every group operation (non-members get 403). Groups up to
//! `group_fanout_threshold` members use copy-on-send (an inbox copy per member); larger ones
//! keep one shared log that members read by cursor (seed 002), up to `group_cap`.

use super::messaging::NewMessage;
use super::outbound::FrameClass;
use super::registry::Session;
use super::{ChatCore, Handled, Reject};
use crate::ids::{is_valid_id, ClientMsgId, ConnId, ConversationId, GroupId, Millis, UserId};
use crate::protocol::{
    GroupCreatePayload, GroupInfo, GroupMembersPayload, GroupSendPayload, ServerFrame,
};
use crate::store::records::{enc, key, user_group_key, GroupRecord};
use crate::store::{KvStore, Table, Write};
use std::collections::BTreeSet;

/// Longest group name, in bytes.
const MAX_GROUP_NAME: usize = 128;

fn info(g: &GroupRecord) -> GroupInfo {
    GroupInfo {
        group_id: g.group_id.clone(),
        conversation_id: ConversationId::group(&g.group_id),
        name: g.name.clone(),
        members: g.members.iter().cloned().collect(),
        admins: g.admins.iter().cloned().collect(),
        announcement_only: g.announcement_only,
    }
}

impl<S: KvStore> ChatCore<S> {
    fn load_group(&self, g: &GroupId) -> Result<GroupRecord, Reject> {
        self.db
            .group(g)?
            .ok_or_else(|| Reject::new(404, "no such group"))
    }

    fn check_user_ids(ids: &[UserId]) -> Handled {
        if ids.iter().any(|u| !is_valid_id(u.as_str())) {
            return Err(Reject::new(400, "invalid user id"));
        }
        Ok(())
    }

    /// Tells every online device of `users` the group's new state.
    fn announce_group(&mut self, g: &GroupRecord, users: &BTreeSet<UserId>, now: Millis) {
        let frame = ServerFrame::GroupUpdate { payload: info(g) };
        for u in users {
            self.deliver_to_user(u, &frame, None, None, now);
        }
    }

    /// Creates a group outside any connection (simulator set-up, admin tools): the same
    /// rules as `group_create`, `creator` becomes the admin.
    pub fn admin_create_group(
        &mut self,
        creator: &UserId,
        members: &[UserId],
        announcement_only: bool,
        now: Millis,
    ) -> Result<GroupId, String> {
        let g = self
            .create_group_record(creator, members.to_vec(), None, announcement_only, now)
            .map_err(|r| r.0.message)?;
        Ok(g.group_id)
    }

    fn create_group_record(
        &mut self,
        creator: &UserId,
        members: Vec<UserId>,
        name: Option<String>,
        announcement_only: bool,
        now: Millis,
    ) -> Result<GroupRecord, Reject> {
        Self::check_user_ids(&members)?;
        if name.as_ref().is_some_and(|n| n.len() > MAX_GROUP_NAME) {
            return Err(Reject::new(
                413,
                format!("group name exceeds {MAX_GROUP_NAME} bytes"),
            ));
        }
        let mut members: BTreeSet<UserId> = members.into_iter().collect();
        members.insert(creator.clone());
        if members.len() > self.cfg.group_cap {
            return Err(Reject::new(
                413,
                format!(
                    "group would have {} members; the cap is {}",
                    members.len(),
                    self.cfg.group_cap
                ),
            ));
        }
        let (n, counter) = self.db.next_counter("groups")?;
        let group_id = GroupId(format!("g{n}"));
        let g = GroupRecord {
            group_id: group_id.clone(),
            name,
            admins: BTreeSet::from([creator.clone()]),
            members,
            announcement_only,
            created_at: now,
        };
        let mut batch = vec![
            counter,
            Write::Put(Table::Groups, key(&[group_id.as_str()], None), enc(&g)),
        ];
        for u in &g.members {
            batch.push(Write::Put(
                Table::UserGroups,
                user_group_key(u, &group_id),
                Vec::new(),
            ));
        }
        self.db.commit(batch)?;
        Ok(g)
    }

    pub(super) fn handle_group_create(
        &mut self,
        conn: ConnId,
        sess: &Session,
        p: GroupCreatePayload,
        now: Millis,
    ) -> Handled {
        let g =
            self.create_group_record(&sess.user, p.members, p.name, p.announcement_only, now)?;
        self.enqueue(
            conn,
            &ServerFrame::GroupCreated { payload: info(&g) },
            FrameClass::Essential,
            None,
            now,
        );
        // Everyone else, including the creator's other devices, learns of it.
        let frame = ServerFrame::GroupUpdate { payload: info(&g) };
        for u in g.members.iter() {
            self.deliver_to_user(u, &frame, Some(conn), None, now);
        }
        Ok(())
    }

    pub(super) fn handle_group_add(
        &mut self,
        sess: &Session,
        p: GroupMembersPayload,
        now: Millis,
    ) -> Handled {
        Self::check_user_ids(&p.user_ids)?;
        let mut g = self.load_group(&p.group_id)?;
        if !g.admins.contains(&sess.user) {
            return Err(Reject::new(403, "only group admins may add members"));
        }
        let added: BTreeSet<UserId> = p
            .user_ids
            .into_iter()
            .filter(|u| !g.members.contains(u))
            .collect();
        if g.members.len() + added.len() > self.cfg.group_cap {
            return Err(Reject::new(
                413,
                format!(
                    "group would have {} members; the cap is {}",
                    g.members.len() + added.len(),
                    self.cfg.group_cap
                ),
            ));
        }
        let mut batch = Vec::new();
        for u in &added {
            g.members.insert(u.clone());
            batch.push(Write::Put(
                Table::UserGroups,
                user_group_key(u, &g.group_id),
                Vec::new(),
            ));
        }
        batch.push(Write::Put(
            Table::Groups,
            key(&[g.group_id.as_str()], None),
            enc(&g),
        ));
        self.db.commit(batch)?;
        let everyone = g.members.clone();
        self.announce_group(&g, &everyone, now);
        Ok(())
    }

    pub(super) fn handle_group_remove(
        &mut self,
        sess: &Session,
        p: GroupMembersPayload,
        now: Millis,
    ) -> Handled {
        Self::check_user_ids(&p.user_ids)?;
        let mut g = self.load_group(&p.group_id)?;
        let only_self = p.user_ids.iter().all(|u| *u == sess.user);
        if !g.members.contains(&sess.user) || (!only_self && !g.admins.contains(&sess.user)) {
            return Err(Reject::new(
                403,
                "only group admins may remove other members",
            ));
        }
        let before = g.members.clone();
        let mut batch = Vec::new();
        for u in &p.user_ids {
            if g.members.remove(u) {
                g.admins.remove(u);
                batch.push(Write::Delete(
                    Table::UserGroups,
                    user_group_key(u, &g.group_id),
                ));
            }
        }
        // A group is never left without an admin while it has members.
        if g.admins.is_empty() {
            if let Some(first) = g.members.iter().next().cloned() {
                g.admins.insert(first);
            }
        }
        batch.push(Write::Put(
            Table::Groups,
            key(&[g.group_id.as_str()], None),
            enc(&g),
        ));
        self.db.commit(batch)?;
        self.announce_group(&g, &before, now);
        Ok(())
    }

    pub(super) fn handle_group_send(
        &mut self,
        conn: ConnId,
        sess: &Session,
        cmid: ClientMsgId,
        p: GroupSendPayload,
        now: Millis,
    ) -> Handled {
        let with_id = |mut r: Reject| {
            r.0.client_message_id = Some(cmid.clone());
            r
        };
        let g = self.load_group(&p.group_id).map_err(with_id)?;
        if !g.members.contains(&sess.user) {
            return Err(with_id(Reject::new(403, "not a member of this group")));
        }
        if g.announcement_only && !g.admins.contains(&sess.user) {
            return Err(with_id(Reject::new(
                403,
                "announcement-only group: only admins may post",
            )));
        }
        let members = if self.bugs.stale_group_members {
            self.stale_members
                .entry(g.group_id.clone())
                .or_insert_with(|| g.members.clone())
                .clone()
        } else {
            g.members
        };
        self.store_and_fan_out(
            conn,
            sess,
            NewMessage {
                conv: ConversationId::group(&g.group_id),
                cmid: cmid.clone(),
                receiver: None,
                group: Some((g.group_id.clone(), members)),
                content: p.content,
                media_id: p.media_id,
                reply_to: p.reply_to,
                client_timestamp: p.timestamp,
            },
            now,
        )
        .map_err(with_id)
    }
}

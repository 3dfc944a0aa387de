//! Typed records and key encodings over `KvStore`: the one place that knows how a message,
//! an inbox entry or a group is laid out in storage.
//!
//! Keys join their parts with a NUL byte (ids cannot contain one) and encode numbers as
//! big-endian so that byte order is numeric order: `(conversation, seq)` scans in seq order.

use super::{KvStore, StoreError, Table, Write};
use crate::ids::{
    ClientMsgId, ConversationId, DeviceId, GroupId, MediaId, MessageId, Millis, Seq, UserId,
};
use crate::protocol::Status;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::collections::BTreeSet;

/// Builds a key from string parts and a trailing number.
pub fn key(parts: &[&str], num: Option<u64>) -> Vec<u8> {
    let mut k = Vec::with_capacity(64);
    for p in parts {
        k.extend_from_slice(p.as_bytes());
        k.push(0);
    }
    if let Some(n) = num {
        k.extend_from_slice(&n.to_be_bytes());
    }
    k
}

/// Reads the trailing big-endian number of a key built with `key(_, Some(n))`.
pub fn key_num(k: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = k.get(k.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

/// Splits the string parts of a key (the trailing number, if any, is not returned).
pub fn key_parts(k: &[u8], n_parts: usize) -> Option<Vec<String>> {
    let mut out = Vec::with_capacity(n_parts);
    let mut rest = k;
    for _ in 0..n_parts {
        let i = rest.iter().position(|&b| b == 0)?;
        out.push(String::from_utf8(rest[..i].to_vec()).ok()?);
        rest = &rest[i + 1..];
    }
    Some(out)
}

/// Serializes a record value.
pub fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    // Record types are plain structs of strings, numbers and vectors: cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// Deserializes a record value read from `table`.
pub fn dec<T: DeserializeOwned>(table: Table, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        table: table.name(),
        detail: e.to_string(),
    })
}

/// A message as stored in its conversation's log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub conversation_id: ConversationId,
    pub seq: Seq,
    pub sender: UserId,
    pub sender_device: DeviceId,
    pub client_message_id: ClientMsgId,
    /// The 1:1 recipient; `None` for groups.
    pub receiver: Option<UserId>,
    pub group_id: Option<GroupId>,
    /// Opaque ciphertext; `None` once every recipient device acked it and no participant
    /// keeps history (the body leaves the server, the receipt metadata stays).
    pub content: Option<String>,
    pub media_id: Option<MediaId>,
    pub reply_to: Option<MessageId>,
    pub stored_at: Millis,
    pub client_timestamp: Option<u64>,
    /// Sender-visible status (1:1); never moves backward.
    pub status: Status,
    /// Users whose inbox still holds this message (copy-on-send).
    pub pending_users: u32,
    /// Group receipts: members who have it / have read it.
    pub delivered_by: BTreeSet<UserId>,
    pub read_by: BTreeSet<UserId>,
    /// Number of recipients (group members other than the sender) at send time.
    pub recipients: u32,
    /// True when stored in a shared group log (large group), not copied to inboxes.
    pub shared_log: bool,
    /// Users given an inbox copy of a copy-on-send group message (members at send time):
    /// the retention sweep deletes exactly these copies, including those of members
    /// removed since. Empty for 1:1 messages (the two participants) and shared logs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copied_to: Vec<UserId>,
}

impl StoredMessage {
    /// The server-assigned id.
    pub fn message_id(&self) -> MessageId {
        MessageId::new(&self.conversation_id, self.seq)
    }
}

/// One user's inbox copy of a message: which of their devices have acked it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InboxEntry {
    pub acked: BTreeSet<DeviceId>,
}

/// A device's read position in a group's shared log: every seq up to `upto` is acked, and
/// so is each seq in `above` (acked out of order: a message that arrived live while a
/// sync was still paging through older ones). A bare high-water mark would skip the
/// pages not fetched yet.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupCursor {
    pub upto: u64,
    #[serde(default)]
    pub above: BTreeSet<u64>,
}

impl GroupCursor {
    /// Most out-of-order acks kept; past it the highest are forgotten (those messages are
    /// then sent again: at-least-once, never lost).
    pub const MAX_ABOVE: usize = 1024;

    /// Records an ack of `seq`; false if it was already acked (nothing to write).
    pub fn ack(&mut self, seq: u64) -> bool {
        if seq <= self.upto || !self.above.insert(seq) {
            return false;
        }
        while self.above.remove(&(self.upto + 1)) {
            self.upto += 1;
        }
        while self.above.len() > Self::MAX_ABOVE {
            self.above.pop_last();
        }
        true
    }

    /// Has `seq` been acked?
    pub fn has(&self, seq: u64) -> bool {
        seq <= self.upto || self.above.contains(&seq)
    }
}

/// A user's settings (and home region).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UserRecord {
    pub hide_last_seen: bool,
    pub keep_history: bool,
    pub home_region: Option<String>,
}

/// A device of a user. Linked devices are stored as `{}`; an unlinked one keeps a
/// tombstone so that its old tokens cannot log it in (and register it) again.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceRecord {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unlinked_at: Option<u64>,
}

/// A group.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupRecord {
    pub group_id: GroupId,
    pub name: Option<String>,
    pub members: BTreeSet<UserId>,
    pub admins: BTreeSet<UserId>,
    pub announcement_only: bool,
    pub created_at: Millis,
}

/// An upload in progress or complete.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MediaRecord {
    pub media_id: MediaId,
    pub owner: UserId,
    pub conversation_id: ConversationId,
    pub file_type: String,
    pub size: u64,
    pub received: u64,
    pub created_at: Millis,
    pub expires_at: Millis,
}

impl MediaRecord {
    /// True when every byte has arrived.
    pub fn complete(&self) -> bool {
        self.received == self.size
    }
}

/// Typed access to the chat tables, and a write batch being built.
pub struct Records<S: KvStore> {
    pub kv: S,
    /// Commits that succeeded so far (numbering them lets the runtime hold what came after
    /// a commit until a sync covers it).
    pub commits: u64,
}

macro_rules! get_json {
    ($self:ident, $table:expr, $key:expr) => {{
        match $self.kv.get($table, &$key)? {
            Some(b) => Some(dec($table, &b)?),
            None => None,
        }
    }};
}

impl<S: KvStore> Records<S> {
    /// Wraps a store.
    pub fn new(kv: S) -> Self {
        Records { kv, commits: 0 }
    }

    /// Commits a batch atomically.
    pub fn commit(&mut self, batch: Vec<Write>) -> Result<(), StoreError> {
        self.kv.commit(batch)?;
        self.commits += 1;
        Ok(())
    }

    pub fn message(
        &self,
        conv: &ConversationId,
        seq: Seq,
    ) -> Result<Option<StoredMessage>, StoreError> {
        Ok(get_json!(self, Table::Messages, msg_key(conv, seq)))
    }

    /// Messages of `conv` with seq > `after`, in seq order, at most `limit`.
    pub fn messages_after(
        &self,
        conv: &ConversationId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let prefix = key(&[conv.as_str()], None);
        let from = msg_key(conv, after.next());
        self.kv
            .scan(Table::Messages, &prefix, &from, limit)?
            .into_iter()
            .map(|(_, v)| dec(Table::Messages, &v))
            .collect()
    }

    pub fn last_seq(&self, conv: &ConversationId) -> Result<Seq, StoreError> {
        Ok(self
            .kv
            .get(Table::ConvMeta, &key(&[conv.as_str()], None))?
            .and_then(|b| key_num(&b))
            .map(Seq)
            .unwrap_or_default())
    }

    pub fn dedup(
        &self,
        sender: &UserId,
        cmid: &ClientMsgId,
    ) -> Result<Option<(ConversationId, Seq)>, StoreError> {
        Ok(get_json!(self, Table::Dedup, dedup_key(sender, cmid)))
    }

    pub fn inbox_entry(
        &self,
        user: &UserId,
        conv: &ConversationId,
        seq: Seq,
    ) -> Result<Option<InboxEntry>, StoreError> {
        Ok(get_json!(self, Table::Inbox, inbox_key(user, conv, seq)))
    }

    /// Inbox entries of `user` from `from` (inclusive), in (conversation, seq) order.
    pub fn inbox_scan(
        &self,
        user: &UserId,
        from: Option<(&ConversationId, Seq)>,
        limit: usize,
    ) -> Result<Vec<(ConversationId, Seq, InboxEntry)>, StoreError> {
        let prefix = key(&[user.as_str()], None);
        let start = match from {
            Some((c, s)) => inbox_key(user, c, s),
            None => prefix.clone(),
        };
        let mut out = Vec::new();
        for (k, v) in self.kv.scan(Table::Inbox, &prefix, &start, limit)? {
            let parts = key_parts(&k, 2).ok_or_else(|| corrupt(Table::Inbox, "key"))?;
            let seq = key_num(&k).ok_or_else(|| corrupt(Table::Inbox, "key"))?;
            out.push((
                ConversationId(parts[1].clone()),
                Seq(seq),
                dec(Table::Inbox, &v)?,
            ));
        }
        Ok(out)
    }

    /// Registered (linked) devices of `user`, in order; unlinked ones are left out.
    pub fn devices(&self, user: &UserId) -> Result<Vec<DeviceId>, StoreError> {
        let prefix = key(&[user.as_str()], None);
        let mut out = Vec::new();
        for (k, v) in self.kv.scan(Table::Devices, &prefix, &prefix, 1024)? {
            let parts = key_parts(&k, 2).ok_or_else(|| corrupt(Table::Devices, "key"))?;
            let rec: DeviceRecord = dec(Table::Devices, &v)?;
            if rec.unlinked_at.is_none() {
                out.push(DeviceId(parts[1].clone()));
            }
        }
        Ok(out)
    }

    /// The record of one device: `None` if it never logged in nor was linked.
    pub fn device(
        &self,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<Option<DeviceRecord>, StoreError> {
        Ok(get_json!(self, Table::Devices, device_key(user, device)))
    }

    pub fn user(&self, user: &UserId) -> Result<UserRecord, StoreError> {
        Ok(get_json!(self, Table::Users, key(&[user.as_str()], None)).unwrap_or_default())
    }

    pub fn group(&self, g: &GroupId) -> Result<Option<GroupRecord>, StoreError> {
        Ok(get_json!(self, Table::Groups, key(&[g.as_str()], None)))
    }

    /// Groups `user` belongs to, in order.
    pub fn user_groups(&self, user: &UserId) -> Result<Vec<GroupId>, StoreError> {
        let prefix = key(&[user.as_str()], None);
        let mut out = Vec::new();
        for (k, _) in self.kv.scan(Table::UserGroups, &prefix, &prefix, 4096)? {
            let parts = key_parts(&k, 2).ok_or_else(|| corrupt(Table::UserGroups, "key"))?;
            out.push(GroupId(parts[1].clone()));
        }
        Ok(out)
    }

    pub fn group_cursor(
        &self,
        g: &GroupId,
        user: &UserId,
        device: &DeviceId,
    ) -> Result<GroupCursor, StoreError> {
        match self
            .kv
            .get(Table::GroupCursor, &group_cursor_key(g, user, device))?
        {
            None => Ok(GroupCursor::default()),
            // Stores written before out-of-order acks were kept hold a bare seq.
            Some(b) if b.len() == 8 => Ok(GroupCursor {
                upto: key_num(&b).unwrap_or(0),
                above: BTreeSet::new(),
            }),
            Some(b) => dec(Table::GroupCursor, &b),
        }
    }

    pub fn media(&self, id: &MediaId) -> Result<Option<MediaRecord>, StoreError> {
        Ok(get_json!(self, Table::Media, key(&[id.as_str()], None)))
    }

    /// The chunk of an upload stored at byte `offset`.
    pub fn media_chunk(&self, id: &MediaId, offset: u64) -> Result<Option<Vec<u8>>, StoreError> {
        self.kv
            .get(Table::MediaChunks, &media_chunk_key(id, offset))
    }

    /// All bytes of a media object, in order.
    pub fn media_bytes(&self, id: &MediaId) -> Result<Vec<u8>, StoreError> {
        let prefix = key(&[id.as_str()], None);
        let mut out = Vec::new();
        for (_, v) in self
            .kv
            .scan(Table::MediaChunks, &prefix, &prefix, usize::MAX)?
        {
            out.extend_from_slice(&v);
        }
        Ok(out)
    }

    /// Next value of a named counter (1, 2, 3, ...), and the write that records it.
    pub fn next_counter(&self, name: &str) -> Result<(u64, Write), StoreError> {
        let k = key(&[name], None);
        let cur = self.kv.get(Table::Meta, &k)?.and_then(|b| key_num(&b));
        let n = cur.unwrap_or(0) + 1;
        Ok((n, Write::Put(Table::Meta, k, n.to_be_bytes().to_vec())))
    }

    /// Expiry index entries stored before `before`, at most `limit`.
    pub fn expired(
        &self,
        before: Millis,
        limit: usize,
    ) -> Result<Vec<(Millis, ConversationId, Seq)>, StoreError> {
        let mut out = Vec::new();
        for (k, _) in self.kv.scan(Table::Expiry, b"", b"", limit)? {
            let ts = k
                .get(..8)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| corrupt(Table::Expiry, "key"))?;
            if ts >= before.0 {
                break;
            }
            let parts = key_parts(&k[8..], 1).ok_or_else(|| corrupt(Table::Expiry, "key"))?;
            let seq = key_num(&k).ok_or_else(|| corrupt(Table::Expiry, "key"))?;
            out.push((Millis(ts), ConversationId(parts[0].clone()), Seq(seq)));
        }
        Ok(out)
    }

    /// Every media record (for expiry sweeps), at most `limit`.
    pub fn all_media(&self, limit: usize) -> Result<Vec<MediaRecord>, StoreError> {
        self.kv
            .scan(Table::Media, b"", b"", limit)?
            .into_iter()
            .map(|(_, v)| dec(Table::Media, &v))
            .collect()
    }

    /// Number of inbox entries of `user`, counting at most `cap`.
    pub fn inbox_count(&self, user: &UserId, cap: usize) -> Result<usize, StoreError> {
        let prefix = key(&[user.as_str()], None);
        Ok(self.kv.scan(Table::Inbox, &prefix, &prefix, cap)?.len())
    }
}

fn corrupt(t: Table, what: &str) -> StoreError {
    StoreError::Corrupt {
        table: t.name(),
        detail: format!("bad {what}"),
    }
}

pub fn msg_key(conv: &ConversationId, seq: Seq) -> Vec<u8> {
    key(&[conv.as_str()], Some(seq.0))
}
pub fn conv_meta_put(conv: &ConversationId, seq: Seq) -> Write {
    Write::Put(
        Table::ConvMeta,
        key(&[conv.as_str()], None),
        seq.0.to_be_bytes().to_vec(),
    )
}
pub fn dedup_key(sender: &UserId, cmid: &ClientMsgId) -> Vec<u8> {
    key(&[sender.as_str(), cmid.as_str()], None)
}
pub fn inbox_key(user: &UserId, conv: &ConversationId, seq: Seq) -> Vec<u8> {
    key(&[user.as_str(), conv.as_str()], Some(seq.0))
}
pub fn device_key(user: &UserId, device: &DeviceId) -> Vec<u8> {
    key(&[user.as_str(), device.as_str()], None)
}
pub fn user_group_key(user: &UserId, g: &GroupId) -> Vec<u8> {
    key(&[user.as_str(), g.as_str()], None)
}
pub fn group_cursor_key(g: &GroupId, user: &UserId, device: &DeviceId) -> Vec<u8> {
    key(&[g.as_str(), user.as_str(), device.as_str()], None)
}
pub fn group_cursor_put(g: &GroupId, user: &UserId, device: &DeviceId, c: &GroupCursor) -> Write {
    Write::Put(
        Table::GroupCursor,
        group_cursor_key(g, user, device),
        enc(c),
    )
}
pub fn expiry_key(at: Millis, conv: &ConversationId, seq: Seq) -> Vec<u8> {
    let mut k = at.0.to_be_bytes().to_vec();
    k.extend_from_slice(&key(&[conv.as_str()], Some(seq.0)));
    k
}
pub fn media_chunk_key(id: &MediaId, offset: u64) -> Vec<u8> {
    key(&[id.as_str()], Some(offset))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[test]
    fn keys_sort_by_seq_numerically() {
        let c = ConversationId::direct(&"a".into(), &"b".into());
        assert!(msg_key(&c, Seq(2)) < msg_key(&c, Seq(10)));
        assert!(msg_key(&c, Seq(255)) < msg_key(&c, Seq(256)));
    }

    #[test]
    fn counters_start_at_one_and_advance_once_committed() {
        let mut r = Records::new(MemoryStore::new());
        let (n, w) = r.next_counter("groups").expect("read");
        assert_eq!(n, 1);
        r.commit(vec![w]).expect("commit");
        assert_eq!(r.next_counter("groups").expect("read").0, 2);
    }
}

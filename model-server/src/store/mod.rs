//! Storage behind one trait: an ordered key-value store with atomic batches.
//!
//! The chat rules are written once, in `records` (typed tables over this trait); the two
//! backends only move bytes: `MemoryStore` for tests and the simulator, `RedbStore`
//! (durable) as the default for `serve`. Keeping the trait this small is what lets the
//! simulator crash a host and keep exactly what was committed.
//!
//! Durability comes in two shapes. A backend without a `syncer` makes each commit durable
//! before `commit` returns. A backend with one groups commits: `commit` only applies the
//! batch, and a later `Syncer::sync` (one fsync) makes every earlier commit durable at
//! once. The runtime then holds every frame and answer that came after a commit until a
//! sync covers it, so "save before ack" still holds, at one fsync per round, not per
//! message.

mod durable;
mod group;
mod memory;
pub mod records;

pub use durable::RedbStore;
pub use group::GroupCommit;
pub use memory::MemoryStore;

use std::sync::Arc;

/// The tables of the chat store. Keys are byte strings whose order is the scan order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    /// (conversation, seq) -> stored message.
    Messages,
    /// conversation -> last assigned seq.
    ConvMeta,
    /// (sender, client_message_id) -> (conversation, seq).
    Dedup,
    /// (user, conversation, seq) -> which of the user's devices acked it.
    Inbox,
    /// (user, device) -> registered device.
    Devices,
    /// user -> settings.
    Users,
    /// group -> members, admins, mode.
    Groups,
    /// (user, group) -> membership index.
    UserGroups,
    /// (group, user, device) -> highest seq acked in a shared-log group.
    GroupCursor,
    /// (stored_at, conversation, seq) -> expiry index.
    Expiry,
    /// media id -> upload state.
    Media,
    /// (media id, offset) -> bytes.
    MediaChunks,
    /// name -> counters.
    Meta,
}

impl Table {
    /// Every table, for backends that create them up front.
    pub const ALL: [Table; 13] = [
        Table::Messages,
        Table::ConvMeta,
        Table::Dedup,
        Table::Inbox,
        Table::Devices,
        Table::Users,
        Table::Groups,
        Table::UserGroups,
        Table::GroupCursor,
        Table::Expiry,
        Table::Media,
        Table::MediaChunks,
        Table::Meta,
    ];

    /// Stable name, used as the redb table name.
    pub fn name(self) -> &'static str {
        match self {
            Table::Messages => "messages",
            Table::ConvMeta => "conv_meta",
            Table::Dedup => "dedup",
            Table::Inbox => "inbox",
            Table::Devices => "devices",
            Table::Users => "users",
            Table::Groups => "groups",
            Table::UserGroups => "user_groups",
            Table::GroupCursor => "group_cursor",
            Table::Expiry => "expiry",
            Table::Media => "media",
            Table::MediaChunks => "media_chunks",
            Table::Meta => "meta",
        }
    }
}

/// One (key, value) pair read from a table.
pub type Row = (Vec<u8>, Vec<u8>);

/// One write in a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    Put(Table, Vec<u8>, Vec<u8>),
    Delete(Table, Vec<u8>),
}

/// A storage failure. The core answers it with an error frame and sends no ack.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage backend: {0}")]
    Backend(String),
    #[error("corrupt record in {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
}

/// Makes a grouping store's earlier commits durable (see `KvStore::syncer`). Called from
/// outside the core's lock, so commits may go on while a sync runs.
pub trait Syncer: Send + Sync {
    /// Returns once every commit that returned before this call began is durable.
    fn sync(&self) -> Result<(), StoreError>;
}

/// An ordered key-value store with atomic, durable batches.
///
/// Without a `syncer`, `commit` returns only once the whole batch is durable (for durable
/// backends): the core sends `message_ack` after `commit` returns, which is the "save
/// before ack" rule. With one, the runtime holds the ack until a sync covers the commit.
pub trait KvStore: Send {
    /// The value at `key`.
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Up to `limit` entries with keys `>= from` that start with `prefix`, in key order.
    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<Row>, StoreError>;
    /// Applies every write or none.
    fn commit(&mut self, batch: Vec<Write>) -> Result<(), StoreError>;
    /// `None` (the default): each commit is durable when `commit` returns. `Some`: commits
    /// are durable only once a later `sync` of the returned handle returns (group commit).
    fn syncer(&self) -> Option<Arc<dyn Syncer>> {
        None
    }
}

impl<T: KvStore + ?Sized> KvStore for Box<T> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        (**self).get(table, key)
    }
    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<Row>, StoreError> {
        (**self).scan(table, prefix, from, limit)
    }
    fn commit(&mut self, batch: Vec<Write>) -> Result<(), StoreError> {
        (**self).commit(batch)
    }
    fn syncer(&self) -> Option<Arc<dyn Syncer>> {
        (**self).syncer()
    }
}

#[cfg(test)]
pub(crate) mod contract {
    //! The behaviour every backend must show; run against each one.
    use super::*;

    pub fn check(store: &mut dyn KvStore) {
        store
            .commit(vec![
                Write::Put(Table::Messages, b"a\0\x02".to_vec(), b"two".to_vec()),
                Write::Put(Table::Messages, b"a\0\x01".to_vec(), b"one".to_vec()),
                Write::Put(Table::Messages, b"b\0\x01".to_vec(), b"other".to_vec()),
                Write::Put(Table::Inbox, b"a\0\x01".to_vec(), b"inbox".to_vec()),
            ])
            .expect("commit");
        assert_eq!(
            store.get(Table::Messages, b"a\0\x01").expect("get"),
            Some(b"one".to_vec())
        );
        let rows = store
            .scan(Table::Messages, b"a\0", b"a\0", 10)
            .expect("scan");
        let vals: Vec<_> = rows.iter().map(|(_, v)| v.as_slice()).collect();
        assert_eq!(
            vals,
            vec![&b"one"[..], &b"two"[..]],
            "ordered, prefix-bounded"
        );
        let rows = store
            .scan(Table::Messages, b"a\0", b"a\0\x02", 10)
            .expect("scan");
        assert_eq!(rows.len(), 1, "from is inclusive");
        let rows = store.scan(Table::Messages, b"", b"", 1).expect("scan");
        assert_eq!(rows.len(), 1, "limit holds");
        store
            .commit(vec![Write::Delete(Table::Messages, b"a\0\x01".to_vec())])
            .expect("delete");
        assert_eq!(store.get(Table::Messages, b"a\0\x01").expect("get"), None);
        assert_eq!(
            store.get(Table::Inbox, b"a\0\x01").expect("get"),
            Some(b"inbox".to_vec()),
            "tables are separate"
        );
    }
}

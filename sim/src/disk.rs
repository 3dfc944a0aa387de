//! The simulated disk under the chat service: what a crash keeps, and what a region
//! failover keeps.
//!
//! Reads and writes go to `live`. With correct settings every commit is also durable and
//! replicated before `commit` returns, so a crash or failover loses nothing acked. The
//! planted bugs make durability (`ack-before-persist`) or cross-region replication
//! (`async-replication-failover`) lag until the next `flush`, which the chat service's
//! timer calls: a crash in between loses what the server already acknowledged.
//!
//! A `store_errors` fault makes commits fail at random (an I/O error: nothing of the batch
//! is applied, as with redb's atomic commits), drawn from the seed.
//!
//! Group commit (`topology.group_commit_ms`) comes two ways (`store()` hands the core the
//! right one):
//! - the server's own `GroupCommit` overlay over this disk, as `chatsim serve` runs it:
//!   batches wait in the process's memory and each sync writes one round here as one
//!   commit; a crash loses every batch no sync covered;
//! - `torn_writes`: the disk itself has the `syncer`: a commit is applied to `live` only,
//!   and a sync makes every batch before it durable and replicated. A crash keeps a prefix
//!   of the unsynced batches, its length drawn from the seed (none, some or all, as a torn
//!   write-ahead log would). Batches stay whole: the store's commits are atomic.

use crate::crypto::PLAINTEXT_MARKER;
use model_server::ids::{ConversationId, Seq};
use model_server::store::records::{dec, msg_key, StoredMessage};
use model_server::store::{KvStore, MemoryStore, Row, StoreError, Syncer, Table, Write};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Lagging {
    /// Batches applied to `live` but not yet durable, oldest first.
    durable: Vec<Vec<Write>>,
    replica: Vec<Write>,
}

/// Live, durable and replica copies of the store.
#[derive(Clone)]
pub struct SimDisk {
    pub live: MemoryStore,
    pub durable: MemoryStore,
    pub replica: MemoryStore,
    lag: Arc<Mutex<Lagging>>,
    /// Tables of committed writes that carried the plaintext marker (checked at every
    /// commit, not only in the final store).
    pub plaintext_commits: Arc<Mutex<Vec<&'static str>>>,
    ack_before_persist: bool,
    async_replication: bool,
    /// Injected commit failures: the probability and the seeded draw.
    errors: Arc<Mutex<(f64, SmallRng)>>,
    /// Torn group commit: the seeded draw of how many unsynced batches a crash keeps.
    group: Option<Arc<Mutex<SmallRng>>>,
    /// The server's group-commit overlay sits in front of this disk (see `store`).
    overlay: bool,
}

impl SimDisk {
    /// A fresh disk with the given (buggy or not) settings.
    pub fn new(ack_before_persist: bool, async_replication: bool) -> Self {
        SimDisk {
            live: MemoryStore::new(),
            durable: MemoryStore::new(),
            replica: MemoryStore::new(),
            lag: Arc::default(),
            plaintext_commits: Arc::default(),
            ack_before_persist,
            async_replication,
            errors: Arc::new(Mutex::new((0.0, SmallRng::seed_from_u64(0)))),
            group: None,
            overlay: false,
        }
    }

    /// Turns on group commit in the disk itself (`torn_writes`, see the module doc);
    /// `seed` draws what crashes keep.
    pub fn torn_group_commit(mut self, seed: u64) -> Self {
        self.group = Some(Arc::new(Mutex::new(SmallRng::seed_from_u64(seed))));
        self
    }

    /// Puts the server's group-commit overlay in front of this disk (see `store`).
    pub fn overlay_group_commit(mut self) -> Self {
        self.overlay = true;
        self
    }

    /// The store a (re)started chat core runs on: this disk, or a fresh group-commit
    /// overlay over it (a restart starts with an empty overlay: the crash lost it).
    pub fn store(&self) -> Box<dyn KvStore> {
        if self.overlay {
            Box::new(model_server::store::GroupCommit::new(self.clone()))
        } else {
            Box::new(self.clone())
        }
    }

    /// From now on every commit fails with probability `rate` (0 stops it), drawn from
    /// `seed`.
    pub fn inject_errors(&self, rate: f64, seed: u64) {
        *self.errors.lock().unwrap_or_else(|p| p.into_inner()) =
            (rate, SmallRng::seed_from_u64(seed));
    }

    /// Writes what has lagged to the durable copy and the replica (the timer's fsync and
    /// replication round).
    pub fn flush(&self) {
        let (d, r) = {
            let mut lag = self.lag.lock().unwrap_or_else(|p| p.into_inner());
            // Under group commit only a sync makes batches durable.
            let d = if self.group.is_some() {
                Vec::new()
            } else {
                std::mem::take(&mut lag.durable)
            };
            (d, std::mem::take(&mut lag.replica))
        };
        let _ = self.durable.clone().commit(d.concat());
        let _ = self.replica.clone().commit(r);
    }

    /// A group-commit round: every batch so far becomes durable (and replicated, unless
    /// replication lags by the planted bug).
    fn sync_now(&self) {
        let d = std::mem::take(&mut self.lag.lock().unwrap_or_else(|p| p.into_inner()).durable);
        let batch = d.concat();
        if !self.async_replication {
            let _ = self.replica.clone().commit(batch.clone());
        }
        let _ = self.durable.clone().commit(batch);
    }

    /// Whether message `seq` of `conv`, sent as `cmid`, is on the durable copy and on the
    /// replica right now (what an ack promises).
    pub fn durable_and_replicated(&self, conv: &str, seq: u64, cmid: &str) -> (bool, bool) {
        let key = msg_key(&ConversationId(conv.to_string()), Seq(seq));
        let has = |m: &MemoryStore| {
            m.get(Table::Messages, &key)
                .ok()
                .flatten()
                .and_then(|v| dec::<StoredMessage>(Table::Messages, &v).ok())
                .is_some_and(|m| m.client_message_id.0 == cmid)
        };
        (has(&self.durable), has(&self.replica))
    }

    /// A crash of the chat service: live state becomes what was durable (under group
    /// commit, plus a drawn prefix of the batches no sync covered).
    pub fn crash(&self) {
        let lagged =
            std::mem::take(&mut self.lag.lock().unwrap_or_else(|p| p.into_inner()).durable);
        if let Some(rng) = &self.group {
            let keep = rng
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .random_range(0..=lagged.len());
            let kept: Vec<Write> = lagged.into_iter().take(keep).flatten().collect();
            if !self.async_replication {
                let _ = self.replica.clone().commit(kept.clone());
            }
            let _ = self.durable.clone().commit(kept);
        }
        self.live.replace_with(&self.durable);
    }

    /// Batches applied but not yet durable (group commit or the planted lag).
    pub fn unsynced_batches(&self) -> usize {
        self.lag
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .durable
            .len()
    }

    /// A region failover: the other region's replica becomes the truth.
    pub fn failover(&self) {
        {
            let mut lag = self.lag.lock().unwrap_or_else(|p| p.into_inner());
            lag.durable.clear();
            lag.replica.clear();
        }
        self.live.replace_with(&self.replica);
        self.durable.replace_with(&self.replica);
    }
}

impl KvStore for SimDisk {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.live.get(table, key)
    }
    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<Row>, StoreError> {
        self.live.scan(table, prefix, from, limit)
    }
    fn commit(&mut self, batch: Vec<Write>) -> Result<(), StoreError> {
        {
            let mut e = self.errors.lock().unwrap_or_else(|p| p.into_inner());
            let rate = e.0.min(1.0);
            if rate > 0.0 && e.1.random_bool(rate) {
                return Err(StoreError::Backend(
                    "injected I/O error (store_errors)".into(),
                ));
            }
        }
        let marker = PLAINTEXT_MARKER.as_bytes();
        let has = |b: &[u8]| b.windows(marker.len()).any(|w| w == marker);
        for w in &batch {
            let (t, k, v) = match w {
                Write::Put(t, k, v) => (t, k.as_slice(), v.as_slice()),
                Write::Delete(t, k) => (t, k.as_slice(), &[][..]),
            };
            if has(k) || has(v) {
                if let Ok(mut p) = self.plaintext_commits.lock() {
                    p.push(t.name());
                }
            }
        }
        self.live.commit(batch.clone())?;
        let mut lag = self.lag.lock().unwrap_or_else(|p| p.into_inner());
        if self.async_replication {
            lag.replica.extend(batch.iter().cloned());
        }
        if self.group.is_some() {
            // Durable and replicated by the sync round that covers it.
            lag.durable.push(batch);
            return Ok(());
        }
        if self.ack_before_persist {
            lag.durable.push(batch.clone());
        } else {
            self.durable.commit(batch.clone())?;
        }
        if !self.async_replication {
            self.replica.commit(batch)?;
        }
        Ok(())
    }

    fn syncer(&self) -> Option<Arc<dyn Syncer>> {
        self.group
            .is_some()
            .then(|| Arc::new(DiskSync(self.clone())) as Arc<dyn Syncer>)
    }
}

/// The group-commit handle of a `SimDisk`.
struct DiskSync(SimDisk);

impl Syncer for DiskSync {
    fn sync(&self) -> Result<(), StoreError> {
        self.0.sync_now();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &[u8]) -> Vec<Write> {
        vec![Write::Put(Table::Meta, k.to_vec(), b"v".to_vec())]
    }

    #[test]
    fn correct_disk_keeps_every_commit_through_crash_and_failover() {
        let mut d = SimDisk::new(false, false);
        d.commit(put(b"a")).expect("commit");
        d.crash();
        assert!(d.get(Table::Meta, b"a").expect("get").is_some());
        d.failover();
        assert!(d.get(Table::Meta, b"a").expect("get").is_some());
    }

    #[test]
    fn a_commit_carrying_plaintext_is_recorded_at_once() {
        let mut d = SimDisk::new(false, false);
        d.commit(put(b"k")).expect("commit");
        assert!(d.plaintext_commits.lock().expect("lock").is_empty());
        let v = format!("{{\"body\":\"{PLAINTEXT_MARKER}u0:m1\"}}").into_bytes();
        d.commit(vec![Write::Put(Table::Messages, b"m".to_vec(), v)])
            .expect("commit");
        assert_eq!(*d.plaintext_commits.lock().expect("lock"), vec!["messages"]);
    }

    #[test]
    fn an_ack_is_durable_only_once_disk_and_replica_have_it() {
        use model_server::store::records::enc;
        let msg: StoredMessage = serde_json::from_value(serde_json::json!({
            "conversation_id": "dm:u0:u1", "seq": 1, "sender": "u0", "sender_device": "d0",
            "client_message_id": "m1", "receiver": "u1", "group_id": null,
            "content": "x", "media_id": null, "reply_to": null, "stored_at": 0,
            "client_timestamp": null, "status": "sent", "pending_users": 1,
            "delivered_by": [], "read_by": [], "recipients": 1, "shared_log": false
        }))
        .expect("a stored message");
        let key = msg_key(&ConversationId("dm:u0:u1".into()), Seq(1));
        let mut lagging = SimDisk::new(true, true);
        lagging
            .commit(vec![Write::Put(Table::Messages, key.clone(), enc(&msg))])
            .expect("commit");
        assert_eq!(
            lagging.durable_and_replicated("dm:u0:u1", 1, "m1"),
            (false, false)
        );
        lagging.flush();
        assert_eq!(
            lagging.durable_and_replicated("dm:u0:u1", 1, "m1"),
            (true, true)
        );
        assert_eq!(
            lagging.durable_and_replicated("dm:u0:u1", 1, "m2"),
            (false, false)
        );
    }

    #[test]
    fn an_injected_error_fails_the_commit_and_applies_nothing() {
        let mut d = SimDisk::new(false, false);
        d.inject_errors(1.0, 7);
        assert!(d.commit(put(b"a")).is_err());
        assert!(d.get(Table::Meta, b"a").expect("get").is_none());
        d.crash();
        assert!(d.get(Table::Meta, b"a").expect("get").is_none());
        d.inject_errors(0.0, 7);
        d.commit(put(b"a")).expect("commit once errors stop");
        assert!(d.get(Table::Meta, b"a").expect("get").is_some());
    }

    #[test]
    fn under_group_commit_only_a_sync_makes_batches_durable_and_a_crash_keeps_a_prefix() {
        let mut kept = std::collections::BTreeSet::new();
        for seed in 0..40 {
            let mut d = SimDisk::new(false, false).torn_group_commit(seed);
            let sync = d.syncer().expect("a syncer");
            d.commit(put(b"a")).expect("commit");
            sync.sync().expect("sync");
            d.commit(put(b"b")).expect("commit");
            d.commit(put(b"c")).expect("commit");
            d.flush(); // the chat service's timer: no sync
            assert_eq!(d.unsynced_batches(), 2);
            d.crash();
            let has = |k: &[u8]| d.get(Table::Meta, k).expect("get").is_some();
            assert!(has(b"a"), "synced survives");
            assert!(
                !has(b"c") || has(b"b"),
                "a prefix, never a later batch alone"
            );
            kept.insert((has(b"b"), has(b"c")));
            d.failover();
            assert!(has(b"a"), "synced is replicated");
        }
        assert_eq!(kept.len(), 3, "the seed draws none, some and all: {kept:?}");
    }

    #[test]
    fn buggy_disk_loses_unflushed_commits() {
        let mut d = SimDisk::new(true, true);
        d.commit(put(b"a")).expect("commit");
        d.flush();
        d.commit(put(b"b")).expect("commit");
        d.crash();
        assert!(d.get(Table::Meta, b"a").expect("get").is_some());
        assert!(
            d.get(Table::Meta, b"b").expect("get").is_none(),
            "lost in the crash"
        );
        d.commit(put(b"c")).expect("commit");
        d.failover();
        assert!(
            d.get(Table::Meta, b"c").expect("get").is_none(),
            "lost in the failover"
        );
    }
}

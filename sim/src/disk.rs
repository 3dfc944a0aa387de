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

use crate::crypto::PLAINTEXT_MARKER;
use model_server::ids::{ConversationId, Seq};
use model_server::store::records::{dec, msg_key, StoredMessage};
use model_server::store::{KvStore, MemoryStore, Row, StoreError, Table, Write};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::sync::{Arc, Mutex};

#[derive(Default)]
struct Lagging {
    durable: Vec<Write>,
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
            (
                std::mem::take(&mut lag.durable),
                std::mem::take(&mut lag.replica),
            )
        };
        let _ = self.durable.clone().commit(d);
        let _ = self.replica.clone().commit(r);
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

    /// A crash of the chat service: live state becomes what was durable.
    pub fn crash(&self) {
        self.lag
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .durable
            .clear();
        self.live.replace_with(&self.durable);
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
        if self.ack_before_persist {
            lag.durable.extend(batch.iter().cloned());
        } else {
            self.durable.commit(batch.clone())?;
        }
        if self.async_replication {
            lag.replica.extend(batch);
        } else {
            self.replica.commit(batch)?;
        }
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

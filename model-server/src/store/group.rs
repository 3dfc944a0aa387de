//! Group commit in front of any store: batches are applied to an in-memory overlay at
//! once, and each `sync` writes every batch since the last one to the store beneath as
//! one commit (one B-tree update and one fsync for the whole round).
//!
//! Why an overlay rather than redb's own non-durable commits: those still copy B-tree
//! pages per commit, which measured about 600 µs of CPU per message here; an overlay
//! insert costs a few map operations, and the round's single commit amortises the rest.
//!
//! Reads see the overlay first (the batches being written by a sync in progress, then the
//! newer ones), then the store. A crash loses the overlay: whole batches, never part of
//! one, and only batches no sync covered, which the runtime has told nobody about.

use super::{KvStore, Row, StoreError, Syncer, Table, Write};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Per table: key -> `Some(value)` written or `None` deleted.
type Layer = BTreeMap<Table, BTreeMap<Vec<u8>, Option<Vec<u8>>>>;

#[derive(Default)]
struct Overlay {
    /// Batches committed since the last sync began.
    active: Layer,
    /// Batches a sync in progress is writing to the store.
    flushing: Option<Arc<Layer>>,
}

impl Overlay {
    /// The overlay's word on `key`: `Some(Some(v))` written, `Some(None)` deleted, `None`
    /// not in the overlay.
    fn get(&self, table: Table, key: &[u8]) -> Option<Option<Vec<u8>>> {
        if let Some(v) = self.active.get(&table).and_then(|t| t.get(key)) {
            return Some(v.clone());
        }
        self.flushing
            .as_ref()
            .and_then(|f| f.get(&table))
            .and_then(|t| t.get(key))
            .cloned()
    }

    /// Every overlay entry of `table` with a key `>= start` that starts with `prefix`,
    /// newer layer winning.
    fn range(
        &self,
        table: Table,
        prefix: &[u8],
        start: &[u8],
    ) -> BTreeMap<Vec<u8>, Option<Vec<u8>>> {
        let mut out = BTreeMap::new();
        let layers = self
            .flushing
            .as_deref()
            .into_iter()
            .chain(std::iter::once(&self.active));
        for layer in layers {
            if let Some(t) = layer.get(&table) {
                for (k, v) in t
                    .range(start.to_vec()..)
                    .take_while(|(k, _)| k.starts_with(prefix))
                {
                    out.insert(k.clone(), v.clone());
                }
            }
        }
        out
    }
}

/// A store whose commits become durable in rounds (see the module doc).
pub struct GroupCommit<S> {
    inner: S,
    overlay: Arc<Mutex<Overlay>>,
}

fn lock(m: &Mutex<Overlay>) -> MutexGuard<'_, Overlay> {
    // Every change to the overlay is one whole step under the lock.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<S: KvStore + Clone + Sync + 'static> GroupCommit<S> {
    /// Group commit over `inner`, whose clones must share its data (the syncer writes
    /// through one while reads go through another).
    pub fn new(inner: S) -> Self {
        GroupCommit {
            inner,
            overlay: Arc::default(),
        }
    }
}

impl<S: KvStore + Clone + Sync + 'static> KvStore for GroupCommit<S> {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = lock(&self.overlay).get(table, key) {
            return Ok(v);
        }
        // A sync may have moved the key from the overlay to the store meanwhile: the
        // store has it then, as the sync writes before it forgets.
        self.inner.get(table, key)
    }

    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<Row>, StoreError> {
        let start = if from < prefix { prefix } else { from };
        let over = lock(&self.overlay).range(table, prefix, start);
        // Each overlay entry hides or replaces at most one stored row: this many rows
        // always hold the `limit` smallest keys of the merged view.
        let below = self
            .inner
            .scan(table, prefix, start, limit.saturating_add(over.len()))?;
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = below.into_iter().collect();
        for (k, v) in over {
            match v {
                Some(v) => {
                    merged.insert(k, v);
                }
                None => {
                    merged.remove(&k);
                }
            }
        }
        Ok(merged.into_iter().take(limit).collect())
    }

    fn commit(&mut self, batch: Vec<Write>) -> Result<(), StoreError> {
        let mut o = lock(&self.overlay);
        for w in batch {
            match w {
                Write::Put(t, k, v) => {
                    o.active.entry(t).or_default().insert(k, Some(v));
                }
                Write::Delete(t, k) => {
                    o.active.entry(t).or_default().insert(k, None);
                }
            }
        }
        Ok(())
    }

    fn syncer(&self) -> Option<Arc<dyn Syncer>> {
        Some(Arc::new(GroupSyncer {
            inner: Mutex::new(self.inner.clone()),
            overlay: self.overlay.clone(),
        }))
    }
}

/// Writes one round of a `GroupCommit` to the store beneath.
struct GroupSyncer<S> {
    /// Held for the whole round: one sync at a time.
    inner: Mutex<S>,
    overlay: Arc<Mutex<Overlay>>,
}

impl<S: KvStore + Sync> Syncer for GroupSyncer<S> {
    fn sync(&self) -> Result<(), StoreError> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let round = {
            let mut o = lock(&self.overlay);
            if o.active.is_empty() {
                return Ok(());
            }
            let round = Arc::new(std::mem::take(&mut o.active));
            o.flushing = Some(round.clone());
            round
        };
        let batch: Vec<Write> = round
            .iter()
            .flat_map(|(t, rows)| {
                rows.iter().map(|(k, v)| match v {
                    Some(v) => Write::Put(*t, k.clone(), v.clone()),
                    None => Write::Delete(*t, k.clone()),
                })
            })
            .collect();
        // Until the commit below succeeds, an error or a panic puts the round back.
        let mut guard = RestoreOnFailure {
            overlay: &self.overlay,
            round: Some(round),
        };
        inner.commit(batch)?;
        guard.round = None;
        lock(&self.overlay).flushing = None;
        Ok(())
    }
}

/// Puts a round that did not reach the store back into the overlay, under anything newer,
/// for the next sync; forgets it once it did (`round` taken).
struct RestoreOnFailure<'a> {
    overlay: &'a Mutex<Overlay>,
    round: Option<Arc<Layer>>,
}

impl Drop for RestoreOnFailure<'_> {
    fn drop(&mut self) {
        let Some(round) = self.round.take() else {
            return;
        };
        let mut o = lock(self.overlay);
        for (t, rows) in round.iter() {
            let newer = o.active.entry(*t).or_default();
            for (k, v) in rows {
                newer.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        o.flushing = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    fn put(k: &[u8], v: &[u8]) -> Write {
        Write::Put(Table::Inbox, k.to_vec(), v.to_vec())
    }

    #[test]
    fn group_commit_meets_the_store_contract_before_and_after_a_sync() {
        let mut s = GroupCommit::new(MemoryStore::new());
        super::super::contract::check(&mut s);
        let mut s = GroupCommit::new(MemoryStore::new());
        let sync = s.syncer().expect("a syncer");
        s.commit(vec![put(b"z", b"0")]).expect("commit");
        sync.sync().expect("sync");
        super::super::contract::check(&mut s);
    }

    #[test]
    fn nothing_reaches_the_store_beneath_until_a_sync() {
        let below = MemoryStore::new();
        let mut s = GroupCommit::new(below.clone());
        let sync = s.syncer().expect("a syncer");
        s.commit(vec![put(b"a", b"1")]).expect("commit");
        assert_eq!(s.get(Table::Inbox, b"a").expect("get"), Some(b"1".to_vec()));
        assert_eq!(below.get(Table::Inbox, b"a").expect("get"), None);
        sync.sync().expect("sync");
        assert_eq!(
            below.get(Table::Inbox, b"a").expect("get"),
            Some(b"1".to_vec())
        );
        s.commit(vec![Write::Delete(Table::Inbox, b"a".to_vec())])
            .expect("delete");
        assert_eq!(
            s.get(Table::Inbox, b"a").expect("get"),
            None,
            "deleted above"
        );
        assert!(below.get(Table::Inbox, b"a").expect("get").is_some());
        sync.sync().expect("sync");
        assert_eq!(below.get(Table::Inbox, b"a").expect("get"), None);
    }

    #[test]
    fn a_scan_merges_the_overlay_with_the_store_in_key_order_within_the_limit() {
        let mut s = GroupCommit::new(MemoryStore::new());
        let sync = s.syncer().expect("a syncer");
        s.commit((0u8..6).map(|i| put(&[b'p', i], b"old")).collect())
            .expect("commit");
        sync.sync().expect("sync");
        // Above the store: two deleted, one replaced, one new between them.
        s.commit(vec![
            Write::Delete(Table::Inbox, vec![b'p', 0]),
            Write::Delete(Table::Inbox, vec![b'p', 1]),
            put(&[b'p', 2], b"new"),
            put(&[b'p', 3, 9], b"added"),
            put(b"q", b"other prefix"),
        ])
        .expect("commit");
        let rows = s.scan(Table::Inbox, b"p", b"p", 3).expect("scan");
        let got: Vec<(Vec<u8>, Vec<u8>)> = rows;
        assert_eq!(
            got,
            vec![
                (vec![b'p', 2], b"new".to_vec()),
                (vec![b'p', 3], b"old".to_vec()),
                (vec![b'p', 3, 9], b"added".to_vec()),
            ]
        );
        let all = s.scan(Table::Inbox, b"p", &[b'p', 4], 10).expect("scan");
        assert_eq!(all.len(), 2, "from is inclusive, prefix bounds it");
    }

    #[test]
    fn a_failed_sync_keeps_the_round_for_the_next_under_newer_writes() {
        #[derive(Clone)]
        struct Flaky(MemoryStore, Arc<std::sync::atomic::AtomicBool>);
        impl KvStore for Flaky {
            fn get(&self, t: Table, k: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
                self.0.get(t, k)
            }
            fn scan(&self, t: Table, p: &[u8], f: &[u8], l: usize) -> Result<Vec<Row>, StoreError> {
                self.0.scan(t, p, f, l)
            }
            fn commit(&mut self, b: Vec<Write>) -> Result<(), StoreError> {
                if self.1.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(StoreError::Backend("disk full".into()));
                }
                self.0.commit(b)
            }
        }
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let below = MemoryStore::new();
        let mut s = GroupCommit::new(Flaky(below.clone(), fail.clone()));
        let sync = s.syncer().expect("a syncer");
        s.commit(vec![put(b"a", b"1"), put(b"b", b"1")])
            .expect("commit");
        assert!(sync.sync().is_err());
        s.commit(vec![put(b"a", b"2")]).expect("commit");
        assert_eq!(s.get(Table::Inbox, b"b").expect("get"), Some(b"1".to_vec()));
        fail.store(false, std::sync::atomic::Ordering::Relaxed);
        sync.sync().expect("sync");
        assert_eq!(
            below.get(Table::Inbox, b"a").expect("get"),
            Some(b"2".to_vec())
        );
        assert_eq!(
            below.get(Table::Inbox, b"b").expect("get"),
            Some(b"1".to_vec())
        );
    }

    proptest::proptest! {
        #[test]
        fn reads_match_a_plain_store_whatever_the_syncs(
            ops in proptest::collection::vec((0u8..4, 0u8..12, proptest::bool::ANY), 1..120),
            limit in proptest::prop_oneof![1usize..6, proptest::strategy::Just(usize::MAX)],
        ) {
            let mut plain = MemoryStore::new();
            let mut s = GroupCommit::new(MemoryStore::new());
            let sync = s.syncer().expect("a syncer");
            for (op, k, b) in ops {
                let key = vec![b'p' + (k % 2), k];
                let w = if b { Write::Put(Table::Inbox, key.clone(), vec![op, k]) }
                        else { Write::Delete(Table::Inbox, key.clone()) };
                match op {
                    0 => { sync.sync().expect("sync"); }
                    _ => {
                        plain.commit(vec![w.clone()]).expect("commit");
                        s.commit(vec![w]).expect("commit");
                    }
                }
                proptest::prop_assert_eq!(s.get(Table::Inbox, &key).expect("get"),
                    plain.get(Table::Inbox, &key).expect("get"));
                for from in [&b"p"[..], &[b'p', k][..]] {
                    proptest::prop_assert_eq!(
                        s.scan(Table::Inbox, b"p", from, limit).expect("scan"),
                        plain.scan(Table::Inbox, b"p", from, limit).expect("scan"));
                }
            }
        }
    }
}

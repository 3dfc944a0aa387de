//! In-memory store: a `BTreeMap` per table. Used by tests and by the simulator, which keeps
//! it outside the crashing host so that a restart sees exactly what was committed.

use super::{KvStore, Row, StoreError, Table, Write};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

type Tables = BTreeMap<Table, BTreeMap<Vec<u8>, Vec<u8>>>;

/// An in-memory store. Clones share the same data (like a disk shared across restarts).
#[derive(Clone, Default)]
pub struct MemoryStore {
    tables: Arc<Mutex<Tables>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes this store hold exactly what `other` holds (a restore from another copy; the
    /// simulator's crash and failover).
    pub fn replace_with(&self, other: &MemoryStore) {
        if Arc::ptr_eq(&self.tables, &other.tables) {
            return;
        }
        let copy = other.lock().clone();
        *self.lock() = copy;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        // A panic while holding the lock leaves the maps consistent (each commit is applied
        // in one go below), so a poisoned lock is safe to keep using.
        self.tables.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl KvStore for MemoryStore {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock().get(&table).and_then(|t| t.get(key)).cloned())
    }

    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<Row>, StoreError> {
        let guard = self.lock();
        let Some(t) = guard.get(&table) else {
            return Ok(Vec::new());
        };
        let start = if from < prefix { prefix } else { from };
        Ok(t.range(start.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn commit(&mut self, batch: Vec<Write>) -> Result<(), StoreError> {
        let mut guard = self.lock();
        for w in batch {
            match w {
                Write::Put(t, k, v) => {
                    guard.entry(t).or_default().insert(k, v);
                }
                Write::Delete(t, k) => {
                    if let Some(m) = guard.get_mut(&t) {
                        m.remove(&k);
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn memory_store_meets_the_store_contract() {
        let mut s = super::MemoryStore::new();
        super::super::contract::check(&mut s);
    }
}

//! Durable store on redb.
//!
//! Why redb: a pure-Rust, embedded, ACID B-tree with no C toolchain or background threads,
//! copy-on-write pages so a crash mid-commit leaves the previous commit intact, and
//! `Durability::Immediate` (the default) fsyncs before `commit` returns, which is what
//! "save to the inbox before ack" needs. Ordered byte keys map one-to-one onto `KvStore`.

use super::{KvStore, Row, StoreError, Table, Write};
use redb::{Database, ReadableDatabase, TableDefinition};
use std::path::Path;

fn def(t: Table) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
    TableDefinition::new(t.name())
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// A redb database file holding every table.
pub struct RedbStore {
    db: Database,
}

impl RedbStore {
    /// Opens (or creates) the store at `dir/chatsim.redb`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| {
            StoreError::Backend(format!("cannot create data dir {}: {e}", dir.display()))
        })?;
        let path = dir.join("chatsim.redb");
        let db = Database::create(&path)
            .map_err(|e| StoreError::Backend(format!("cannot open {}: {e}", path.display())))?;
        let tx = db.begin_write().map_err(backend)?;
        for t in Table::ALL {
            tx.open_table(def(t)).map_err(backend)?;
        }
        tx.commit().map_err(backend)?;
        Ok(RedbStore { db })
    }
}

impl KvStore for RedbStore {
    fn get(&self, table: Table, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let t = tx.open_table(def(table)).map_err(backend)?;
        Ok(t.get(key).map_err(backend)?.map(|v| v.value().to_vec()))
    }

    fn scan(
        &self,
        table: Table,
        prefix: &[u8],
        from: &[u8],
        limit: usize,
    ) -> Result<Vec<Row>, StoreError> {
        let tx = self.db.begin_read().map_err(backend)?;
        let t = tx.open_table(def(table)).map_err(backend)?;
        let start = if from < prefix { prefix } else { from };
        let mut out = Vec::new();
        for row in t.range::<&[u8]>(start..).map_err(backend)? {
            if out.len() >= limit {
                break;
            }
            let (k, v) = row.map_err(backend)?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_vec(), v.value().to_vec()));
        }
        Ok(out)
    }

    fn commit(&mut self, batch: Vec<Write>) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(backend)?;
        {
            for w in &batch {
                match w {
                    Write::Put(t, k, v) => {
                        let mut table = tx.open_table(def(*t)).map_err(backend)?;
                        table.insert(k.as_slice(), v.as_slice()).map_err(backend)?;
                    }
                    Write::Delete(t, k) => {
                        let mut table = tx.open_table(def(*t)).map_err(backend)?;
                        table.remove(k.as_slice()).map_err(backend)?;
                    }
                }
            }
        }
        tx.commit().map_err(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redb_store_meets_the_store_contract() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = RedbStore::open(dir.path()).expect("open");
        super::super::contract::check(&mut s);
    }

    #[test]
    fn committed_writes_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let mut s = RedbStore::open(dir.path()).expect("open");
            s.commit(vec![Write::Put(Table::Meta, b"k".to_vec(), b"v".to_vec())])
                .expect("commit");
        }
        let s = RedbStore::open(dir.path()).expect("reopen");
        assert_eq!(s.get(Table::Meta, b"k").expect("get"), Some(b"v".to_vec()));
    }
}

//! Durable store on redb.
//!
//! Why redb: a pure-Rust, embedded, ACID B-tree with no C toolchain or background threads,
//! copy-on-write pages so a crash mid-commit leaves the previous commit intact, and
//! `Durability::Immediate` (the default) fsyncs before `commit` returns, which is what
//! "save to the inbox before ack" needs. Ordered byte keys map one-to-one onto `KvStore`.
//!
//! Group commit (`open_grouped`, the default of `serve`) puts a `GroupCommit` overlay in
//! front: batches are applied in memory, and each sync writes everything since the last
//! one as a single redb transaction (one B-tree update and one fsync per round, not per
//! message). A crash before that sync loses those batches whole; the runtime has told no
//! one about them.

use super::group::GroupCommit;
use super::{KvStore, Row, StoreError, Table, Write};
use redb::{Database, ReadableDatabase, TableDefinition};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

fn def(t: Table) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
    TableDefinition::new(t.name())
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// A redb database file holding every table. Clones share the database (the group-commit
/// syncer writes through one while the core reads through another: redb readers do not
/// wait for a writer).
#[derive(Clone)]
pub struct RedbStore {
    db: Arc<Database>,
}

impl RedbStore {
    /// Opens (or creates) the store at `dir/chatsim.redb`, fsyncing every commit before
    /// it returns.
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
        Ok(RedbStore { db: Arc::new(db) })
    }

    /// Opens (or creates) the store at `dir/chatsim.redb` with group commit: commits are
    /// durable once a later sync of `syncer()` returns.
    pub fn open_grouped(dir: &Path) -> Result<GroupCommit<RedbStore>, StoreError> {
        Ok(GroupCommit::new(Self::open(dir)?))
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
            // Each table opened once per batch (a group-commit round touches every table
            // many times); writes still apply in batch order.
            let mut open = BTreeMap::new();
            for w in &batch {
                let t = match w {
                    Write::Put(t, ..) | Write::Delete(t, _) => *t,
                };
                let table = match open.entry(t) {
                    std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::btree_map::Entry::Vacant(e) => {
                        e.insert(tx.open_table(def(t)).map_err(backend)?)
                    }
                };
                match w {
                    Write::Put(_, k, v) => {
                        table.insert(k.as_slice(), v.as_slice()).map_err(backend)?;
                    }
                    Write::Delete(_, k) => {
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

    #[test]
    fn grouped_store_meets_the_store_contract_and_has_a_syncer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = RedbStore::open_grouped(dir.path()).expect("open");
        super::super::contract::check(&mut s);
        assert!(s.syncer().is_some());
    }

    /// The child half of `a_kill_loses_only_what_no_sync_covered`: commits `synced`, syncs,
    /// commits `unsynced`, and dies without unwinding (as `kill -9` would).
    #[test]
    #[ignore = "run by a_kill_loses_only_what_no_sync_covered in a child process"]
    fn grouped_child_commits_then_aborts() {
        let Some(dir) = std::env::var_os("CHATSIM_GROUPED_CHILD_DIR") else {
            return;
        };
        let mut s = RedbStore::open_grouped(Path::new(&dir)).expect("open");
        let put = |k: &[u8]| vec![Write::Put(Table::Meta, k.to_vec(), b"v".to_vec())];
        s.commit(put(b"synced")).expect("commit");
        s.syncer().expect("grouped").sync().expect("sync");
        s.commit(put(b"unsynced")).expect("commit");
        assert!(s.get(Table::Meta, b"unsynced").expect("get").is_some());
        std::process::abort();
    }

    #[test]
    fn a_kill_loses_only_what_no_sync_covered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let exe = std::env::current_exe().expect("test binary");
        let out = std::process::Command::new(exe)
            .args([
                "--ignored",
                "--exact",
                "store::durable::tests::grouped_child_commits_then_aborts",
                "--nocapture",
            ])
            .env("CHATSIM_GROUPED_CHILD_DIR", dir.path())
            .output()
            .expect("run the child");
        assert!(!out.status.success(), "the child must die by abort");
        let s = RedbStore::open(dir.path()).expect("reopen after the kill");
        assert!(
            s.get(Table::Meta, b"synced").expect("get").is_some(),
            "a synced commit survives the kill"
        );
        assert!(
            s.get(Table::Meta, b"unsynced").expect("get").is_none(),
            "a commit no sync covered is lost whole (so nothing may have been acked for it)"
        );
    }
}

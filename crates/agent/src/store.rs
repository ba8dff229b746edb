//! The agent's VM records, persisted so that a restarted agent takes its VMs back.
//!
//! One redb database file with one table, `vms`: key = VM name, value = the record as JSON
//! (the record type belongs to the caller). Every write is committed durably before the call
//! returns. The file holds CHAP secrets, so it is created with mode 0600 (and tightened to it
//! if found looser) in a directory created with mode 0700.
//!
//! Not here: what a record contains or means, validation of records or names, caching, and
//! migrations between record versions.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");

/// Why the store could not do what was asked. Messages are one line and name the file or VM.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    #[error("cannot open VM store {}: {problem}", path.display())]
    Open { path: PathBuf, problem: String },
    #[error("{} is not a VM store (not a redb database)", path.display())]
    NotADatabase { path: PathBuf },
    #[error("VM store {} is in use by another process", path.display())]
    InUse { path: PathBuf },
    #[error("VM store {}: {problem}", path.display())]
    Database { path: PathBuf, problem: String },
    #[error("cannot encode the record of VM {name}: {problem}")]
    Encode { name: String, problem: String },
    /// A stored record that does not decode as the requested type.
    #[error("record of VM {name} does not decode: {problem}")]
    Corrupt { name: String, problem: String },
}

/// The VM record store; cheap calls, safe to share between tasks and threads.
pub struct Store {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens the store at `path`, creating it (and its missing parent directories) if absent.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_err = |problem: String| StoreError::Open {
            path: path.to_path_buf(),
            problem,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(|e| open_err(format!("cannot create {}: {e}", parent.display())))?;
        }
        // Opening a FIFO or device for writing could block or do worse than fail.
        match fs::metadata(path) {
            Ok(meta) if !meta.is_file() => return Err(open_err("not a regular file".into())),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(open_err(e.to_string())),
        }
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| open_err(e.to_string()))?;
        let meta = file.metadata().map_err(|e| open_err(e.to_string()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            tracing::warn!(path = %path.display(), "VM store readable by others; setting mode 0600");
            file.set_permissions(fs::Permissions::from_mode(0o600))
                .map_err(|e| open_err(format!("cannot set mode 0600: {e}")))?;
        }
        // redb may panic on some damaged files; a damaged file must be an error, not a crash.
        let db =
            std::panic::catch_unwind(AssertUnwindSafe(|| Database::builder().create_file(file)))
                .map_err(|_| open_err("database file is damaged".into()))?
                .map_err(|e| match e {
                    redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse {
                        path: path.to_path_buf(),
                    },
                    redb::DatabaseError::Storage(redb::StorageError::Io(io))
                        if io.kind() == ErrorKind::InvalidData =>
                    {
                        StoreError::NotADatabase {
                            path: path.to_path_buf(),
                        }
                    }
                    other => open_err(other.to_string()),
                })?;
        let store = Store {
            db,
            path: path.to_path_buf(),
        };
        // Create the table now so that readers never meet a database without it.
        let txn = store.db.begin_write().map_err(|e| store.db_err(e))?;
        txn.open_table(VMS).map_err(|e| store.db_err(e))?;
        txn.commit().map_err(|e| store.db_err(e))?;
        Ok(store)
    }

    /// The file the store lives in.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stores (or replaces) the record of VM `name`; durable when this returns.
    pub fn put<T: Serialize>(&self, name: &str, record: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).map_err(|e| StoreError::Encode {
            name: name.to_string(),
            problem: e.to_string(),
        })?;
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        {
            let mut table = txn.open_table(VMS).map_err(|e| self.db_err(e))?;
            table
                .insert(name, bytes.as_slice())
                .map_err(|e| self.db_err(e))?;
        }
        txn.commit().map_err(|e| self.db_err(e))
    }

    /// The record of VM `name`, if stored.
    pub fn get<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(VMS).map_err(|e| self.db_err(e))?;
        let Some(value) = table.get(name).map_err(|e| self.db_err(e))? else {
            return Ok(None);
        };
        decode(name, value.value()).map(Some)
    }

    /// Removes the record of VM `name`; false if there was none.
    pub fn delete(&self, name: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        let existed = {
            let mut table = txn.open_table(VMS).map_err(|e| self.db_err(e))?;
            let removed = table.remove(name).map_err(|e| self.db_err(e))?;
            removed.is_some()
        };
        txn.commit().map_err(|e| self.db_err(e))?;
        Ok(existed)
    }

    /// Every record, sorted by VM name. A record that does not decode is reported in its
    /// entry, so that one bad record does not hide the others.
    #[allow(clippy::type_complexity)] // the shape callers asked for, spelled out
    pub fn list<T: DeserializeOwned>(
        &self,
    ) -> Result<Vec<(String, Result<T, StoreError>)>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(VMS).map_err(|e| self.db_err(e))?;
        let mut records = Vec::new();
        for entry in table.iter().map_err(|e| self.db_err(e))? {
            let (key, value) = entry.map_err(|e| self.db_err(e))?;
            let name = key.value().to_string();
            let record = decode(&name, value.value());
            records.push((name, record));
        }
        Ok(records)
    }

    fn db_err(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Database {
            path: self.path.clone(),
            problem: e.into().to_string(),
        }
    }
}

fn decode<T: DeserializeOwned>(name: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        name: name.to_string(),
        problem: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use peer_harness::TempDir;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Rec {
        target: String,
        luns: Vec<u64>,
    }

    fn rec(target: &str) -> Rec {
        Rec {
            target: target.into(),
            luns: vec![0, 1],
        }
    }

    #[test]
    fn store_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Store>();
    }

    #[test]
    fn roundtrip_and_sorted_list() {
        let dir = TempDir::new("store");
        let store = Store::open(&dir.join("vms.redb")).unwrap();
        assert_eq!(store.get::<Rec>("vm1").unwrap(), None);
        assert!(store.list::<Rec>().unwrap().is_empty());
        store.put("vm2", &rec("b")).unwrap();
        store.put("vm1", &rec("a")).unwrap();
        store.put("vm1", &rec("a2")).unwrap();
        assert_eq!(store.get::<Rec>("vm1").unwrap(), Some(rec("a2")));
        let list: Vec<_> = store
            .list::<Rec>()
            .unwrap()
            .into_iter()
            .map(|(n, r)| (n, r.unwrap()))
            .collect();
        assert_eq!(
            list,
            [
                ("vm1".to_string(), rec("a2")),
                ("vm2".to_string(), rec("b"))
            ]
        );
    }

    #[test]
    fn reopen_keeps_data_and_delete() {
        let dir = TempDir::new("store");
        let path = dir.join("vms.redb");
        {
            let store = Store::open(&path).unwrap();
            store.put("vm1", &rec("a")).unwrap();
            store.put("vm2", &rec("b")).unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.get::<Rec>("vm2").unwrap(), Some(rec("b")));
        assert!(store.delete("vm1").unwrap());
        assert!(!store.delete("vm1").unwrap());
        drop(store);
        let store = Store::open(&path).unwrap();
        let names: Vec<_> = store
            .list::<Rec>()
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["vm2"]);
    }

    #[test]
    fn corrupt_entry_reported_per_entry() {
        let dir = TempDir::new("store");
        let store = Store::open(&dir.join("vms.redb")).unwrap();
        store.put("a", &rec("a")).unwrap();
        store.put("b", &"not a record").unwrap();
        {
            let txn = store.db.begin_write().unwrap();
            txn.open_table(VMS)
                .unwrap()
                .insert("c", &b"\xff{"[..])
                .unwrap();
            txn.commit().unwrap();
        }
        let list = store.list::<Rec>().unwrap();
        assert_eq!(list.len(), 3);
        assert_eq!(list[0].1.as_ref().unwrap(), &rec("a"));
        for (name, result) in &list[1..] {
            match result {
                Err(e @ StoreError::Corrupt { name: n, .. }) => {
                    assert_eq!(n, name);
                    let msg = e.to_string();
                    assert!(
                        msg.contains(&format!("VM {name}")) && !msg.contains('\n'),
                        "{msg}"
                    );
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        assert!(matches!(
            store.get::<Rec>("c"),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn file_mode_0600_and_dirs_0700() {
        let dir = TempDir::new("store");
        let path = dir.join("state/deeper/vms.redb");
        let store = Store::open(&path).unwrap();
        store.put("vm", &rec("secret")).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(&dir.join("state")), 0o700);
        assert_eq!(mode(&dir.join("state/deeper")), 0o700);
        drop(store);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let _store = Store::open(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn garbage_file_is_a_clear_error() {
        let dir = TempDir::new("store");
        for (i, contents) in [&b"hello, I am not a database\n"[..], b"x", &[0u8; 8192]]
            .iter()
            .enumerate()
        {
            let path = dir.join(&format!("garbage{i}"));
            fs::write(&path, contents).unwrap();
            let e = Store::open(&path).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains(&path.display().to_string()) && !msg.contains('\n'),
                "{msg}"
            );
            assert!(matches!(e, StoreError::NotADatabase { .. }), "{e:?}");
            // Untouched.
            assert_eq!(fs::read(&path).unwrap(), *contents);
        }
        let e = Store::open(dir.path()).unwrap_err();
        assert!(matches!(e, StoreError::Open { .. }), "{e:?}");
    }

    #[test]
    fn second_open_is_refused() {
        let dir = TempDir::new("store");
        let path = dir.join("vms.redb");
        let _first = Store::open(&path).unwrap();
        let e = Store::open(&path).unwrap_err();
        assert!(matches!(e, StoreError::InUse { .. }), "{e:?}");
    }

    #[test]
    fn shared_between_threads() {
        let dir = TempDir::new("store");
        let store = std::sync::Arc::new(Store::open(&dir.join("vms.redb")).unwrap());
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..10 {
                        store.put(&format!("vm-{t}-{i}"), &rec("x")).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(store.list::<Rec>().unwrap().len(), 40);
    }
}

//! Group fsync of a SQLite database's write-ahead log, outside SQLite's write lock, for
//! writers that commit with `synchronous = NORMAL` and need some of their commits on disk
//! before they answer.
//!
//! With `synchronous = FULL` every commit fsyncs the log while it still holds the
//! database's write lock, so every other writer of the file waits for that fsync too. On
//! the test machine an fsync takes about 0.5 ms when the disk is quiet and 20-80 ms when
//! it queues behind a checkpoint's flush of the telemetry database, and the command
//! ledger's writes (a creation, a result) queued behind one another's fsyncs. Here a
//! commit only writes its frames to the log (visible to every reader at once, and safe
//! from a crash of the hub), and [`WalSync::sync`] makes everything committed so far
//! durable with one fsync of the log file that holds no lock: writers keep committing
//! meanwhile, and callers that wait at the same time share one fsync.
//!
//! Why an fsync of the log file is enough: a WAL commit `write`s its frames to the
//! `-wal` file before it returns, and an fsync on any descriptor of that file makes them
//! durable. If the log restarted in between, its frames had been checkpointed into the
//! database file first, and SQLite syncs the database file at the end of every checkpoint
//! (at `NORMAL` and `FULL`) before a writer may restart the log.

use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use super::StoreError;

/// Group fsync of one database's write-ahead log; see the module documentation.
pub struct WalSync {
    /// The database file (synced instead when its log does not exist).
    db: PathBuf,
    /// Its `-wal` file.
    wal: PathBuf,
    state: Mutex<SyncState>,
    synced: Condvar,
}

#[derive(Default)]
struct SyncState {
    /// The last ticket handed out: every caller of `sync` takes the next one.
    requested: u64,
    /// Every ticket up to this one is durable.
    synced: u64,
    /// Tickets up to this one were covered by an fsync that failed.
    failed_through: u64,
    /// Why that fsync failed.
    error: String,
    /// Whether a caller is running an fsync now.
    syncing: bool,
}

impl WalSync {
    /// Group fsync for the database file at `db`. Nothing is opened until the first
    /// [`WalSync::sync`].
    pub fn new(db: &Path) -> WalSync {
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        WalSync {
            db: db.to_path_buf(),
            wal: PathBuf::from(wal),
            state: Mutex::new(SyncState::default()),
            synced: Condvar::new(),
        }
    }

    /// Blocks until everything committed to the database before this call is durable.
    /// The first caller to find no fsync running runs one for everyone waiting; callers
    /// that arrive during it wait for the next, which one of them runs.
    ///
    /// # Errors
    /// The fsync failed (the disk is failing or full): what was committed may not survive
    /// a power cut, and the caller must not report it as durable.
    pub fn sync(&self) -> Result<(), StoreError> {
        let mut state = self.lock()?;
        state.requested += 1;
        let ticket = state.requested;
        loop {
            if state.synced >= ticket {
                return Ok(());
            }
            if state.failed_through >= ticket {
                return Err(StoreError::Other(format!(
                    "cannot make the hub database durable: {}",
                    state.error
                )));
            }
            if state.syncing {
                state = self
                    .synced
                    .wait(state)
                    .map_err(|_| StoreError::Other("WAL sync lock poisoned".into()))?;
                continue;
            }
            // This caller runs the fsync: it covers every ticket handed out so far, since
            // their commits all returned before their callers took a ticket.
            state.syncing = true;
            let target = state.requested;
            drop(state);
            let outcome = self.fsync();
            state = self.lock()?;
            state.syncing = false;
            match outcome {
                Ok(()) => state.synced = state.synced.max(target),
                Err(err) => {
                    state.failed_through = state.failed_through.max(target);
                    state.error = err.to_string();
                    metrics::counter!("hub_sqlite_sync_failures_total").increment(1);
                }
            }
            self.synced.notify_all();
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, SyncState>, StoreError> {
        self.state
            .lock()
            .map_err(|_| StoreError::Other("WAL sync lock poisoned".into()))
    }

    /// One fsync of the log, opened afresh so that it is the file SQLite uses now. No log
    /// means that its last connection merged it into the database and removed it, so the
    /// database file is synced instead.
    fn fsync(&self) -> std::io::Result<()> {
        let started = std::time::Instant::now();
        let result = match std::fs::File::open(&self.wal) {
            Ok(wal) => wal.sync_data(),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                std::fs::File::open(&self.db)?.sync_data()
            }
            Err(err) => Err(err),
        };
        metrics::histogram!("hub_sqlite_sync_seconds").record(started.elapsed().as_secs_f64());
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn callers_share_fsyncs_and_all_return() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("x.db");
        let conn = rusqlite::Connection::open(&db).expect("open");
        conn.pragma_update(None, "journal_mode", "WAL")
            .expect("wal");
        conn.execute_batch("CREATE TABLE t (v INTEGER); INSERT INTO t VALUES (1);")
            .expect("write");
        let sync = Arc::new(WalSync::new(&db));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let sync = sync.clone();
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        sync.sync().expect("sync");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let state = sync.lock().expect("lock");
        assert_eq!(state.requested, 160);
        assert_eq!(state.synced, 160, "every ticket was covered");
        assert!(!state.syncing);
    }

    #[test]
    fn a_missing_log_syncs_the_database_and_a_missing_database_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("x.db");
        std::fs::write(&db, b"").expect("db file");
        WalSync::new(&db)
            .sync()
            .expect("no log: the database file is synced");
        let gone = WalSync::new(&dir.path().join("gone.db"));
        let err = gone.sync().expect_err("nothing to sync");
        assert!(err
            .to_string()
            .contains("cannot make the hub database durable"));
        // A failed fsync does not stick: the next caller tries again.
        assert!(gone.sync().is_err());
        std::fs::write(dir.path().join("gone.db"), b"").expect("db file");
        gone.sync().expect("the file is back");
    }
}

//! The hub's SQLite files: the hub database's schema and connections, the pragmas every
//! connection gets (WAL, durability, a busy handler that polls), the [`WalCheckpointer`]
//! that copies each file's WAL off the commit path, and [`SqliteSeq`], the high-water
//! marks of a hub that stores telemetry elsewhere. The telemetry store itself is
//! `sqlite_telemetry`.

use std::path::Path;
use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension};

use super::{telemetry_db, StoreError};
use crate::config::{SqliteOptions, Synchronous};

/// The schema of the hub database: devices, presence and revocations here; commands,
/// jobs and updates are added by their stores. Telemetry has a file of its own
/// (`telemetry_db`), so that the two never wait for each other's commits.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    firmware TEXT NOT NULL DEFAULT '',
    capabilities TEXT NOT NULL DEFAULT '',
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    online INTEGER NOT NULL DEFAULT 0,
    connected_at INTEGER,
    disconnected_at INTEGER,
    last_cause TEXT NOT NULL DEFAULT '',
    rtt_us INTEGER,
    remote_addr TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT '{}'
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS revocations (
    device TEXT PRIMARY KEY,
    revoked_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS presence_log (
    at_ms INTEGER NOT NULL,
    device TEXT NOT NULL,
    online INTEGER NOT NULL,
    cause TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS presence_log_device ON presence_log (device, at_ms);
";

/// Opens a connection to the hub database with the hub's pragmas, creating the schema.
///
/// # Errors
/// The file cannot be opened or the schema cannot be created.
pub fn open(path: &Path, options: impl Into<SqliteOptions>) -> Result<Connection, rusqlite::Error> {
    let conn = configured(path, options.into())?;
    conn.execute_batch(SCHEMA)?;
    migrate(&conn)?;
    Ok(conn)
}

/// Opens a connection to a database file of the hub with its pragmas: WAL, the
/// durability and size limit asked for, checkpoints left to a [`WalCheckpointer`], and
/// [`wait_for_lock`] as the busy handler.
///
/// # Errors
/// The file cannot be opened or a pragma cannot be set.
pub(super) fn configured(
    path: &Path,
    options: SqliteOptions,
) -> Result<Connection, rusqlite::Error> {
    let mut conn = Connection::open(path)?;
    conn.busy_handler(Some(wait_for_lock))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    if options.max_bytes > 0 {
        let page_size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let pages = (options.max_bytes as i64 / page_size.max(512)).max(1);
        conn.pragma_update(None, "max_page_count", pages)?;
    }
    conn.pragma_update(
        None,
        "synchronous",
        match options.synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        },
    )?;
    conn.pragma_update(None, "cache_size", -32_000)?;
    // Commits do not copy the WAL back into the database: the hub's `WalCheckpointer`
    // does, on its own connection, so that no commit (a command, a presence record, an
    // ingest group) pays for the others' pages. A process without one (the CLI on a
    // stopped hub, a test) checkpoints when its last connection closes.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    Ok(conn)
}

/// Busy-handler attempts spent polling every [`LOCK_POLL_FAST`] before polling every
/// [`LOCK_POLL_SLOW`].
const LOCK_FAST_ATTEMPTS: i32 = 200;
const LOCK_POLL_FAST: std::time::Duration = std::time::Duration::from_micros(250);
const LOCK_POLL_SLOW: std::time::Duration = std::time::Duration::from_millis(1);
/// Attempts before a statement gives up with `SQLITE_BUSY`: about 5 s of waiting.
const LOCK_ATTEMPTS: i32 = LOCK_FAST_ATTEMPTS + 4_950;

/// Waits for another connection's write lock, for about 5 s in all. Several connections of
/// this process write to each file (commands, presence, last_seen, jobs to `hub.db`; the
/// ingest writer and the pruner to `telemetry.db`); SQLite's own busy handler sleeps 1,
/// 2, 5, 10 ... up to 100 ms between attempts, so a command's write that finds a presence
/// commit in progress could sleep long after the lock was free. Polling in short steps
/// takes the lock within a fraction of a millisecond.
fn wait_for_lock(attempt: i32) -> bool {
    if attempt >= LOCK_ATTEMPTS {
        return false;
    }
    std::thread::sleep(if attempt < LOCK_FAST_ATTEMPTS {
        LOCK_POLL_FAST
    } else {
        LOCK_POLL_SLOW
    });
    true
}

/// Brings a database written by an older hub up to the current schema: columns are added
/// (never removed or renamed), so an older hub can still read what it knows. Each step
/// checks for itself, so two connections opening the file at once do not trip.
fn migrate(conn: &Connection) -> Result<(), rusqlite::Error> {
    let add_column = |table: &str, column: &str, definition: &str| {
        let exists = conn
            .prepare_cached("SELECT 1 FROM pragma_table_info(?1) WHERE name = ?2")?
            .exists(rusqlite::params![table, column])?;
        if !exists {
            match conn.execute(
                &format!("ALTER TABLE {table} ADD COLUMN {column} {definition}"),
                [],
            ) {
                Ok(_) => {}
                Err(e) if e.to_string().contains("duplicate column") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    };
    // Fleet registry: tags, and when a device was registered.
    add_column("devices", "tags", "TEXT NOT NULL DEFAULT '{}'")?;
    add_column("devices", "registered_at", "INTEGER")?;
    // Desired state; the reported document is `state`.
    add_column("devices", "desired", "TEXT NOT NULL DEFAULT '{}'")?;
    add_column("devices", "desired_version", "INTEGER NOT NULL DEFAULT 0")?;
    add_column("devices", "reported_version", "INTEGER NOT NULL DEFAULT 0")?;
    add_column("devices", "refused", "TEXT NOT NULL DEFAULT '{}'")?;
    Ok(())
}

/// What the WAL file is cut back to after the log restarts (bytes).
const WAL_SIZE_LIMIT: i64 = 64 << 20;

/// WAL frames (pages) past which a checkpoint makes sure the log starts over, briefly
/// holding writers back, instead of only copying what it can (a log that is always being
/// appended to while a checkpoint copies it would otherwise never restart, and grow).
const WAL_RESTART_FRAMES: i64 = 8_192;

/// How long a restarting checkpoint waits for readers on an older snapshot (a long query)
/// before giving up until its next turn; writers wait behind it meanwhile.
const WAL_RESTART_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// Copies committed pages from the WAL into the database file, on its own connection, so
/// that commits never do it themselves (see [`open`]).
pub struct WalCheckpointer {
    conn: Connection,
    /// [`WAL_RESTART_FRAMES`], lower in tests.
    restart_frames: i64,
}

/// What one checkpoint found and did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// Frames in the WAL when it ran.
    pub wal_frames: i64,
    /// Frames copied into the database so far (all of them when equal to `wal_frames`).
    pub copied: i64,
    /// Whether it restarted the log (the WAL had grown past [`WAL_RESTART_FRAMES`]).
    pub restarted: bool,
}

impl WalCheckpointer {
    /// Opens its own connection to the database file at `path` (the hub's or the
    /// telemetry database: each has its own WAL and needs its own checkpointer).
    ///
    /// # Errors
    /// The database cannot be opened.
    pub fn open(
        path: &Path,
        options: impl Into<SqliteOptions>,
    ) -> Result<WalCheckpointer, StoreError> {
        let conn = configured(path, options.into())?;
        conn.busy_timeout(WAL_RESTART_WAIT)?;
        Ok(WalCheckpointer {
            conn,
            restart_frames: WAL_RESTART_FRAMES,
        })
    }

    /// Copies what it can without waiting for anyone (a passive checkpoint); when the
    /// log has grown past [`WAL_RESTART_FRAMES`], it then waits (at most
    /// [`WAL_RESTART_WAIT`]) for a moment with no writer and no old reader to copy the
    /// rest and restart the log.
    ///
    /// # Errors
    /// The store failed. A restart that could not get its moment is not an error: it is
    /// tried again next time.
    pub fn checkpoint(&mut self) -> Result<Checkpoint, StoreError> {
        let run = |mode: &str| -> Result<(bool, i64, i64), rusqlite::Error> {
            self.conn
                .query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                    Ok((r.get::<_, i64>(0)? != 0, r.get(1)?, r.get(2)?))
                })
        };
        let (_, wal_frames, copied) = run("PASSIVE")?;
        if wal_frames < self.restart_frames {
            return Ok(Checkpoint {
                wal_frames,
                copied,
                restarted: false,
            });
        }
        let (busy, _, restart_copied) = match run("RESTART") {
            Ok(done) => done,
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy =>
            {
                (true, wal_frames, copied)
            }
            Err(e) => return Err(e.into()),
        };
        Ok(Checkpoint {
            wal_frames,
            copied: restart_copied.max(copied),
            restarted: !busy,
        })
    }
}

/// High-water marks in the `device_seq` table of the telemetry database, for backends that keep
/// the data elsewhere.
pub struct SqliteSeq {
    conn: Connection,
}

impl SqliteSeq {
    /// Opens the telemetry database at `path`.
    ///
    /// # Errors
    /// The database cannot be opened.
    pub fn open(path: &Path, options: impl Into<SqliteOptions>) -> Result<SqliteSeq, StoreError> {
        Ok(SqliteSeq {
            conn: telemetry_db::open(path, options)?,
        })
    }
}

impl super::SeqStore for SqliteSeq {
    fn get(&mut self, device: &str) -> Result<u64, StoreError> {
        let seq: Option<i64> = self
            .conn
            .query_row(
                "SELECT last_seq FROM device_seq WHERE device = ?1",
                [device],
                |r| r.get(0),
            )
            .optional()?;
        Ok(seq.unwrap_or(0) as u64)
    }

    fn raise(&mut self, marks: &[(Arc<str>, u64)]) -> Result<(), StoreError> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO device_seq (device, last_seq) VALUES (?1, ?2)
                 ON CONFLICT (device) DO UPDATE SET last_seq = max(last_seq, excluded.last_seq)",
            )?;
            for (device, seq) in marks {
                stmt.execute(params![&**device, *seq as i64])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use super::*;
    use crate::store::sqlite_telemetry::{batch, SqliteTelemetry};
    use crate::store::TelemetryStore;

    #[test]
    fn the_checkpointer_copies_the_wal_and_restarts_it_when_no_reader_holds_it_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.db");
        let mut store = SqliteTelemetry::open(&path, Synchronous::Normal).expect("open");
        let mut checkpointer = WalCheckpointer::open(&path, Synchronous::Normal).expect("open");
        checkpointer.restart_frames = 10;
        let mut seq = 0;
        let mut write = |store: &mut SqliteTelemetry| {
            for _ in 0..10 {
                seq += 1;
                store.commit(&[batch("a", seq, 64)]).expect("commit");
            }
        };
        // Commits leave their pages in the WAL; a checkpoint copies all of them.
        write(&mut store);
        let first = checkpointer.checkpoint().expect("checkpoint");
        assert!(first.wal_frames >= 10, "{first:?}");
        assert_eq!(first.copied, first.wal_frames, "{first:?}");
        // A reader on an old snapshot holds the restart back, for a bounded time, and
        // writers go on meanwhile.
        let reader = Connection::open(&path).expect("reader");
        reader.execute_batch("BEGIN").expect("begin");
        let _: i64 = reader
            .query_row("SELECT count(*) FROM reading_chunks", [], |r| r.get(0))
            .expect("read");
        write(&mut store);
        let started = std::time::Instant::now();
        let held = checkpointer.checkpoint().expect("checkpoint");
        assert!(!held.restarted, "{held:?}");
        assert!(
            started.elapsed() < WAL_RESTART_WAIT * 10,
            "{:?}",
            started.elapsed()
        );
        write(&mut store);
        reader.execute_batch("COMMIT").expect("end the read");
        // Without it the log restarts, and the next commit writes from its start.
        let restarted = checkpointer.checkpoint().expect("checkpoint");
        assert!(restarted.restarted, "{restarted:?}");
        write(&mut store);
        let after = checkpointer.checkpoint().expect("checkpoint");
        assert!(
            after.wal_frames < restarted.wal_frames,
            "{after:?} after {restarted:?}"
        );
        let count: i64 = Connection::open(&path)
            .expect("open")
            .query_row("SELECT count(*) FROM readings", [], |r| r.get(0))
            .expect("count");
        assert_eq!(count, 40 * 64);
    }
}

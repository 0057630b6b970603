//! The command ledger's storage: every command with its state, in the hub's SQLite
//! database, so that queued commands and results survive a restart.
//!
//! States: `queued -> sent -> acked -> succeeded | failed | expired | cancelled`.
//! `queued` commands expire at `expires_at` (the TTL, for devices that are offline);
//! once sent, a command fails if no result arrives by `deadline` (sent + timeout).

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::read_connections::ReadConnections;
use super::wal_sync::WalSync;
use super::{CommandStore, NewCommand, StoreError};
use crate::config::{SqliteOptions, Synchronous};

/// Where a command is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandState {
    /// Waiting for the device (offline, or its per-connection window is full).
    Queued,
    /// Sent to the device at least once, not acknowledged yet.
    Sent,
    /// The device acknowledged it.
    Acked,
    /// The device reported success.
    Succeeded,
    /// The device reported failure, or no result arrived within the timeout.
    Failed,
    /// Not delivered within its TTL.
    Expired,
    /// Cancelled by an operator before it finished.
    Cancelled,
}

impl CommandState {
    /// Every state, in lifecycle order.
    pub const ALL: [CommandState; 7] = [
        CommandState::Queued,
        CommandState::Sent,
        CommandState::Acked,
        CommandState::Succeeded,
        CommandState::Failed,
        CommandState::Expired,
        CommandState::Cancelled,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            CommandState::Queued => "queued",
            CommandState::Sent => "sent",
            CommandState::Acked => "acked",
            CommandState::Succeeded => "succeeded",
            CommandState::Failed => "failed",
            CommandState::Expired => "expired",
            CommandState::Cancelled => "cancelled",
        }
    }

    /// Parses a stored name (unknown names read as `failed`).
    pub fn parse(s: &str) -> CommandState {
        CommandState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .unwrap_or(CommandState::Failed)
    }

    /// Whether the state is final.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            CommandState::Succeeded
                | CommandState::Failed
                | CommandState::Expired
                | CommandState::Cancelled
        )
    }
}

/// A command as the ledger knows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CommandRecord {
    /// Ledger id (also the protocol's command id).
    pub id: u64,
    /// Target device.
    pub device: String,
    /// Command name.
    pub name: String,
    /// Arguments (a JSON document).
    pub args: serde_json::Value,
    /// Current state.
    pub state: CommandState,
    /// Created, ms since the epoch.
    pub created_at: u64,
    /// A queued command expires at this time (ms since the epoch).
    pub expires_at: u64,
    /// Result timeout after the first send, in ms.
    pub timeout_ms: u64,
    /// Result deadline (first send + timeout), once sent.
    pub deadline: Option<u64>,
    /// First sent.
    pub sent_at: Option<u64>,
    /// Acknowledged by the device.
    pub acked_at: Option<u64>,
    /// Reached a final state.
    pub finished_at: Option<u64>,
    /// How many times it was sent (re-deliveries after reconnects included).
    pub attempts: u32,
    /// The device's result, when it reported one.
    pub result: Option<CommandOutcome>,
    /// Why it failed, expired or was cancelled, when the hub decided it.
    pub reason: Option<String>,
    /// The job that created it, if a job did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<u64>,
}

impl CommandRecord {
    /// The command as it goes to the device; `now_ms` sets the result deadline of one not
    /// sent before.
    pub fn to_wire(&self, now_ms: u64) -> schemas::Command {
        schemas::Command {
            id: self.id,
            name: schemas::message::truncated(&self.name),
            args: schemas::message::truncated(&self.args.to_string()),
            deadline: self.deadline.unwrap_or(now_ms + self.timeout_ms),
        }
    }
}

/// A device-reported result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CommandOutcome {
    /// Success.
    pub ok: bool,
    /// Status code.
    pub code: i32,
    /// Output text.
    pub output: String,
}

/// Why a cancel was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelRefused {
    /// No such command.
    NotFound,
    /// Already final.
    AlreadyFinal(CommandState),
}

/// The ledger's SQLite storage.
///
/// Writes go through one connection. Reads (a device's deliverable commands when it
/// connects, a long poll's look at its command) have connections of their own, so they
/// never queue behind a write that is waiting for the database's write lock: a reconnect
/// storm's ten thousand look-ups and a command's delivery do not wait for each other.
///
/// The write connection commits with `synchronous = NORMAL`: a commit is visible at once
/// and survives a crash of the hub, and it never holds the database's write lock through
/// an fsync. What must survive a power cut as well is made durable afterwards by a
/// [`WalSync`], outside the lock, shared by every caller waiting at the time (see
/// [`CommandStore::sync`] for which writes wait for it).
pub struct LedgerStore {
    conn: Mutex<Writer>,
    readers: ReadConnections,
    /// `None` when the hub was configured with `synchronous = NORMAL`: nothing waits for
    /// the disk then.
    wal_sync: Option<WalSync>,
}

/// The write connection and the block of command ids it hands out.
struct Writer {
    conn: Connection,
    /// The next id to hand out.
    next_id: u64,
    /// The first id past the block reserved on disk.
    reserved_to: u64,
}

/// Command ids reserved on disk at a time. A command can reach its device before its
/// creation is on disk (see [`CommandStore::create`]), and devices de-duplicate commands by
/// id, so an id must never be handed out twice, even after a power cut lost the newest
/// commands. Ids therefore come from blocks whose end is made durable before the first of
/// them is used; a restart continues after the block it finds, so up to this many ids go
/// unused per restart. One command in this many waits for an fsync of the reservation.
const ID_BLOCK: u64 = 1024;

/// Read connections of the ledger: two cores' worth (a read is a short indexed look-up).
const LEDGER_READERS: usize = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS commands (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    name TEXT NOT NULL,
    args TEXT NOT NULL,
    state TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    timeout_ms INTEGER NOT NULL,
    deadline INTEGER,
    sent_at INTEGER,
    acked_at INTEGER,
    finished_at INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    ok INTEGER,
    code INTEGER,
    output TEXT,
    reason TEXT,
    job INTEGER
);
CREATE INDEX IF NOT EXISTS commands_by_device ON commands (device, id);
CREATE INDEX IF NOT EXISTS commands_open ON commands (state, id) WHERE state IN ('queued', 'sent', 'acked');
CREATE TABLE IF NOT EXISTS command_ids (reserved_to INTEGER NOT NULL);
";

/// Created after the `job` column exists (databases of hubs before jobs gain it first).
/// Unique, so that a job creates at most one command per device even when its runner
/// restarts between creating a command and remembering that it did.
const JOB_INDEX: &str =
    "CREATE UNIQUE INDEX IF NOT EXISTS commands_by_job ON commands (job, device) WHERE job IS NOT NULL;";

pub(super) const COLUMNS: &str =
    "SELECT id, device, name, args, state, created_at, expires_at, timeout_ms, deadline, sent_at,
    acked_at, finished_at, attempts, ok, code, output, reason, job FROM commands";

pub(super) fn row(r: &rusqlite::Row<'_>) -> Result<CommandRecord, rusqlite::Error> {
    let args: String = r.get(3)?;
    let state: String = r.get(4)?;
    let opt = |i: usize| -> Result<Option<u64>, rusqlite::Error> {
        Ok(r.get::<_, Option<i64>>(i)?.map(|v| v as u64))
    };
    let ok: Option<i64> = r.get(13)?;
    Ok(CommandRecord {
        id: r.get::<_, i64>(0)? as u64,
        device: r.get(1)?,
        name: r.get(2)?,
        args: serde_json::from_str(&args).unwrap_or(serde_json::Value::String(args)),
        state: CommandState::parse(&state),
        created_at: r.get::<_, i64>(5)? as u64,
        expires_at: r.get::<_, i64>(6)? as u64,
        timeout_ms: r.get::<_, i64>(7)? as u64,
        deadline: opt(8)?,
        sent_at: opt(9)?,
        acked_at: opt(10)?,
        finished_at: opt(11)?,
        attempts: r.get::<_, i64>(12)? as u32,
        result: match ok {
            Some(ok) => Some(CommandOutcome {
                ok: ok != 0,
                code: r.get::<_, Option<i64>>(14)?.unwrap_or(0) as i32,
                output: r.get::<_, Option<String>>(15)?.unwrap_or_default(),
            }),
            None => None,
        },
        reason: r.get(16)?,
        job: r.get::<_, Option<i64>>(17)?.map(|j| j as u64),
    })
}

impl LedgerStore {
    /// Opens the ledger in the hub database at `path`.
    ///
    /// # Errors
    /// The database cannot be opened.
    pub fn open(path: &Path, options: impl Into<SqliteOptions>) -> Result<LedgerStore, StoreError> {
        let options: SqliteOptions = options.into();
        let conn = super::sqlite::open(path, options)?;
        conn.execute_batch(SCHEMA)?;
        let has_job: bool = conn.query_row(
            "SELECT count(*) FROM pragma_table_info('commands') WHERE name = 'job'",
            [],
            |r| r.get::<_, i64>(0).map(|n| n > 0),
        )?;
        if !has_job {
            conn.execute_batch("ALTER TABLE commands ADD COLUMN job INTEGER")?;
        }
        conn.execute_batch(JOB_INDEX)?;
        conn.execute_batch(super::jobs::SCHEMA)?;
        // Continue after the last reservation and after every id in use (a database from
        // a hub before reservations has only the latter).
        let next_id: i64 = conn.query_row(
            "SELECT max(coalesce((SELECT max(reserved_to) FROM command_ids), 1),
                        coalesce((SELECT max(id) FROM commands), 0) + 1,
                        coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'commands'), 0) + 1)",
            [],
            |r| r.get(0),
        )?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        let store = LedgerStore {
            conn: Mutex::new(Writer {
                conn,
                next_id: next_id as u64,
                reserved_to: next_id as u64,
            }),
            readers: ReadConnections::open(path, options, LEDGER_READERS)?,
            wal_sync: (options.synchronous == Synchronous::Full).then(|| WalSync::new(path)),
        };
        Ok(store)
    }

    /// Runs `f` on the write connection and returns once its commit is durable (as the
    /// hub was configured: see [`LedgerStore`]).
    pub(super) fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        let value = self.visible(f)?;
        self.durable()?;
        Ok(value)
    }

    /// Runs `f` on the write connection; its commit is visible to every reader and safe
    /// from a crash of the hub, not yet from a power cut.
    fn visible<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        let mut writer = self.writer()?;
        Ok(f(&mut writer.conn)?)
    }

    fn writer(&self) -> Result<std::sync::MutexGuard<'_, Writer>, StoreError> {
        self.conn
            .lock()
            .map_err(|_| StoreError::Other("ledger lock poisoned".into()))
    }

    /// Makes every commit so far durable.
    fn durable(&self) -> Result<(), StoreError> {
        match &self.wal_sync {
            Some(wal_sync) => wal_sync.sync(),
            None => Ok(()),
        }
    }

    /// The next command id, reserving (durably) a new block when this one is used up.
    fn next_id(&self, writer: &mut Writer) -> Result<u64, StoreError> {
        if writer.next_id >= writer.reserved_to {
            let end = writer.next_id + ID_BLOCK;
            writer.conn.execute_batch(&format!(
                "BEGIN IMMEDIATE; DELETE FROM command_ids; INSERT INTO command_ids VALUES ({end}); COMMIT;"
            ))?;
            // Before any id of the block can reach a device.
            self.durable()?;
            writer.reserved_to = end;
        }
        let id = writer.next_id;
        writer.next_id += 1;
        Ok(id)
    }
}

impl CommandStore for LedgerStore {
    fn create(&self, new: &NewCommand<'_>, now: u64) -> Result<CommandRecord, StoreError> {
        let NewCommand {
            device,
            name,
            args,
            timeout_ms,
            ttl_ms,
            job,
        } = *new;
        let mut writer = self.writer()?;
        if let Some(job) = job {
            let existing = writer
                .conn
                .query_row(
                    &format!("{COLUMNS} WHERE job = ?1 AND device = ?2"),
                    params![job as i64, device],
                    row,
                )
                .optional()?;
            if let Some(existing) = existing {
                return Ok(existing);
            }
        }
        let id = self.next_id(&mut writer)?;
        let c = &writer.conn;
        c.prepare_cached(
            "INSERT INTO commands (id, device, name, args, state, created_at, expires_at, timeout_ms, job)
             VALUES (?1, ?2, ?3, ?4, 'queued', ?5, ?6, ?7, ?8)",
        )?
        .execute(params![id as i64, device, name, args, now as i64, now.saturating_add(ttl_ms) as i64, timeout_ms as i64, job.map(|j| j as i64)])?;
        Ok(c.query_row(&format!("{COLUMNS} WHERE id = ?1"), [id as i64], row)?)
    }

    fn sync(&self) -> Result<(), StoreError> {
        self.durable()
    }

    fn get(&self, id: u64) -> Result<Option<CommandRecord>, StoreError> {
        self.readers.read(|c| {
            c.query_row(&format!("{COLUMNS} WHERE id = ?1"), [id as i64], row)
                .optional()
        })
    }

    fn list(&self, device: &str, limit: usize) -> Result<Vec<CommandRecord>, StoreError> {
        self.readers.read(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "{COLUMNS} WHERE device = ?1 ORDER BY id DESC LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![device, limit as i64], row)?;
            rows.collect()
        })
    }

    fn deliverable(
        &self,
        device: &str,
        after: u64,
        limit: usize,
        now: u64,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        self.readers.read(|c| {
            let mut stmt = c.prepare_cached(&format!(
                "{COLUMNS} WHERE device = ?1 AND id > ?2 AND state IN ('queued', 'sent', 'acked')
                 AND (state != 'queued' OR expires_at > ?4) ORDER BY id LIMIT ?3"
            ))?;
            let rows =
                stmt.query_map(params![device, after as i64, limit as i64, now as i64], row)?;
            rows.collect()
        })
    }

    fn mark_sent(&self, id: u64, now: u64) -> Result<Option<CommandRecord>, StoreError> {
        self.visible(|c| {
            let changed = c.execute(
                "UPDATE commands SET state = 'sent', sent_at = ?2, deadline = ?2 + timeout_ms, attempts = attempts + 1
                 WHERE id = ?1 AND state = 'queued'",
                params![id as i64, now as i64],
            )?;
            if changed == 0 {
                c.execute("UPDATE commands SET attempts = attempts + 1 WHERE id = ?1", [id as i64])?;
                return Ok(None);
            }
            c.query_row(&format!("{COLUMNS} WHERE id = ?1"), [id as i64], row).optional()
        })
    }

    fn ack(&self, device: &str, id: u64, now: u64) -> Result<Option<CommandRecord>, StoreError> {
        self.visible(|c| {
            let changed = c.execute(
                "UPDATE commands SET state = 'acked', acked_at = ?3, sent_at = coalesce(sent_at, ?3),
                   deadline = coalesce(deadline, ?3 + timeout_ms)
                 WHERE id = ?1 AND device = ?2 AND state IN ('queued', 'sent')",
                params![id as i64, device, now as i64],
            )?;
            if changed == 0 {
                return Ok(None);
            }
            c.query_row(&format!("{COLUMNS} WHERE id = ?1"), [id as i64], row).optional()
        })
    }

    fn finish(
        &self,
        device: &str,
        id: u64,
        ok: bool,
        code: i32,
        output: &str,
        now: u64,
    ) -> Result<Option<CommandRecord>, StoreError> {
        self.visible(|c| {
            let state = if ok { "succeeded" } else { "failed" };
            let changed = c.execute(
                "UPDATE commands SET state = ?3, finished_at = ?4, ok = ?5, code = ?6, output = ?7,
                   sent_at = coalesce(sent_at, ?4), acked_at = coalesce(acked_at, ?4)
                 WHERE id = ?1 AND device = ?2 AND state IN ('queued', 'sent', 'acked')",
                params![id as i64, device, state, now as i64, ok as i64, code, output],
            )?;
            if changed == 0 {
                return Ok(None);
            }
            c.query_row(&format!("{COLUMNS} WHERE id = ?1"), [id as i64], row)
                .optional()
        })
    }

    fn cancel(
        &self,
        id: u64,
        now: u64,
    ) -> Result<Result<CommandRecord, CancelRefused>, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let Some(current) = tx.query_row(&format!("{COLUMNS} WHERE id = ?1"), [id as i64], row).optional()? else {
                return Ok(Err(CancelRefused::NotFound));
            };
            if current.state.is_final() {
                return Ok(Err(CancelRefused::AlreadyFinal(current.state)));
            }
            tx.execute(
                "UPDATE commands SET state = 'cancelled', finished_at = ?2, reason = 'cancelled by operator' WHERE id = ?1",
                params![id as i64, now as i64],
            )?;
            let updated = tx.query_row(&format!("{COLUMNS} WHERE id = ?1"), [id as i64], row)?;
            tx.commit()?;
            Ok(Ok(updated))
        })
    }

    fn expire_due(&self, now: u64) -> Result<Vec<CommandRecord>, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let due: Vec<(i64, String)> = {
                let mut stmt = tx.prepare_cached(
                    "SELECT id, state FROM commands WHERE state IN ('queued', 'sent', 'acked')
                     AND ((state = 'queued' AND expires_at <= ?1) OR (state != 'queued' AND deadline <= ?1))",
                )?;
                let rows = stmt.query_map([now as i64], |r| Ok((r.get(0)?, r.get(1)?)))?;
                rows.collect::<Result<_, _>>()?
            };
            let mut changed = Vec::with_capacity(due.len());
            for (id, state) in due {
                if state == "queued" {
                    tx.execute(
                        "UPDATE commands SET state = 'expired', finished_at = ?2,
                           reason = 'not delivered within its TTL (device offline)' WHERE id = ?1",
                        params![id, now as i64],
                    )?;
                } else {
                    tx.execute(
                        "UPDATE commands SET state = 'failed', finished_at = ?2,
                           reason = 'timeout: no result within ' || (timeout_ms / 1000.0) || ' s' WHERE id = ?1",
                        params![id, now as i64],
                    )?;
                }
                changed.push(tx.query_row(&format!("{COLUMNS} WHERE id = ?1"), [id], row)?);
            }
            tx.commit()?;
            Ok(changed)
        })
    }

    fn counts(&self) -> Result<Vec<(CommandState, u64)>, StoreError> {
        self.readers.read(|c| {
            let mut stmt =
                c.prepare_cached("SELECT state, count(*) FROM commands GROUP BY state")?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    CommandState::parse(&r.get::<_, String>(0)?),
                    r.get::<_, i64>(1)? as u64,
                ))
            })?;
            rows.collect()
        })
    }

    fn prune_finished(&self, before_ms: u64) -> Result<usize, StoreError> {
        self.with(|c| {
            c.execute(
                "DELETE FROM commands WHERE state IN ('succeeded', 'failed', 'expired', 'cancelled')
                 AND finished_at < ?1",
                [before_ms as i64],
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store in a fresh directory, removed when the returned guard drops.
    fn store() -> (LedgerStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        (
            LedgerStore::open(&dir.path().join("l.db"), Synchronous::Normal).expect("open"),
            dir,
        )
    }

    /// A command can reach its device before its creation is on disk, and devices
    /// de-duplicate by id: a reopened ledger must never hand out an id again, even one
    /// whose command was lost.
    #[test]
    fn ids_are_never_handed_out_twice_across_restarts() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("l.db");
        let new = NewCommand::new("d", "led", "{}", 1_000, 5_000);
        let first = {
            let l = LedgerStore::open(&path, Synchronous::Full).expect("open");
            let a = l.create(&new, 100).expect("create").id;
            let b = l.create(&new, 100).expect("create").id;
            assert_eq!(b, a + 1);
            // The newest command is lost, as a power cut before its sync would lose it.
            l.with(|c| c.execute("DELETE FROM commands WHERE id = ?1", [b as i64]))
                .expect("lose it");
            b
        };
        let l = LedgerStore::open(&path, Synchronous::Full).expect("reopen");
        let next = l.create(&new, 200).expect("create").id;
        assert!(next > first, "id {next} after {first}");
        assert_eq!(next, 1 + ID_BLOCK, "the next block");
        // A block used up reserves the next one.
        let mut last = next;
        for _ in 0..ID_BLOCK {
            let id = l.create(&new, 300).expect("create").id;
            assert_eq!(id, last + 1);
            last = id;
        }
        let reserved: i64 = l
            .with(|c| c.query_row("SELECT reserved_to FROM command_ids", [], |r| r.get(0)))
            .expect("reservation");
        assert_eq!(reserved as u64, 1 + 3 * ID_BLOCK);
    }

    #[test]
    fn reads_see_every_commit_and_writes_never_fsync_under_the_lock() {
        let dir = tempfile::tempdir().expect("temp dir");
        let l = LedgerStore::open(&dir.path().join("l.db"), Synchronous::Full).expect("open");
        let synchronous = |l: &LedgerStore| {
            l.with(|c| c.query_row("PRAGMA synchronous", [], |r| r.get::<_, i64>(0)))
                .expect("pragma")
        };
        // NORMAL is 1: durability comes from the WAL sync, outside SQLite's lock.
        assert_eq!(synchronous(&l), 1);
        assert!(l.wal_sync.is_some(), "FULL asks for the WAL sync");
        let a = l
            .create(&NewCommand::new("d", "led", "{}", 1_000, 5_000), 100)
            .expect("create");
        l.sync().expect("durable");
        // The read connections see the write connection's commit at once.
        assert_eq!(
            l.get(a.id).expect("get").map(|r| r.state),
            Some(CommandState::Queued)
        );
        l.mark_sent(a.id, 200).expect("sent");
        l.ack("d", a.id, 210).expect("ack");
        assert_eq!(
            l.get(a.id).expect("get").map(|r| r.state),
            Some(CommandState::Acked)
        );
        assert_eq!(l.deliverable("d", 0, 10, 220).expect("open").len(), 1);
        l.finish("d", a.id, true, 0, "on", 230).expect("finish");
        assert!(l.deliverable("d", 0, 10, 240).expect("open").is_empty());
        // Every reader at once (held by other threads) still lets a read through.
        let held = l.readers.hold_all();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| tx.send(l.get(a.id).expect("get").map(|r| r.state)));
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert!(rx.try_recv().is_err(), "the read waits for a reader");
            drop(held);
            assert_eq!(rx.recv().expect("read"), Some(CommandState::Succeeded));
        });
    }

    #[test]
    fn lifecycle_ttl_timeout_cancel() {
        let (l, _dir) = store();
        let a = l
            .create(&NewCommand::new("d", "led", "{}", 1_000, 5_000), 100)
            .expect("create");
        assert_eq!(a.state, CommandState::Queued);
        let b = l
            .create(
                &NewCommand::new("d", "relay", r#"{"on":true}"#, 1_000, 5_000),
                100,
            )
            .expect("create");
        assert_eq!(l.deliverable("d", 0, 10, 200).expect("q").len(), 2);
        assert_eq!(
            l.mark_sent(a.id, 200).expect("sent").map(|r| r.state),
            Some(CommandState::Sent)
        );
        assert_eq!(l.mark_sent(a.id, 300).expect("resent"), None);
        assert_eq!(l.ack("other-device", a.id, 250).expect("ack"), None);
        assert_eq!(
            l.ack("d", a.id, 250).expect("ack").map(|r| r.state),
            Some(CommandState::Acked)
        );
        let done = l
            .finish("d", a.id, true, 0, "on", 260)
            .expect("finish")
            .expect("changed");
        assert_eq!(done.state, CommandState::Succeeded);
        assert_eq!(done.attempts, 2);
        assert_eq!(
            l.finish("d", a.id, false, 1, "late", 270).expect("finish"),
            None
        );
        // b expires in the queue; c times out after delivery; d is cancelled.
        let c = l
            .create(&NewCommand::new("d", "slow", "{}", 1_000, 60_000), 100)
            .expect("create");
        l.mark_sent(c.id, 300).expect("sent");
        let d = l
            .create(&NewCommand::new("d", "x", "{}", 1_000, 60_000), 100)
            .expect("create");
        let changed = l.expire_due(5_200).expect("expire");
        let states: Vec<_> = changed.iter().map(|r| (r.id, r.state)).collect();
        assert_eq!(
            states,
            [(b.id, CommandState::Expired), (c.id, CommandState::Failed)]
        );
        assert!(changed[1]
            .reason
            .as_deref()
            .is_some_and(|r| r.starts_with("timeout")));
        assert_eq!(
            l.cancel(d.id, 5_300).expect("cancel").map(|r| r.state),
            Ok(CommandState::Cancelled)
        );
        assert_eq!(
            l.cancel(d.id, 5_300).expect("cancel"),
            Err(CancelRefused::AlreadyFinal(CommandState::Cancelled))
        );
        assert_eq!(
            l.cancel(999, 5_300).expect("cancel"),
            Err(CancelRefused::NotFound)
        );
        // Retention: finished commands go, open ones stay whatever their age.
        let open = l
            .create(&NewCommand::new("d", "later", "{}", 1_000, 60_000), 100)
            .expect("create");
        assert_eq!(l.prune_finished(1_000_000).expect("prune"), 4);
        assert_eq!(
            l.list("d", 10)
                .expect("list")
                .iter()
                .map(|r| r.id)
                .collect::<Vec<_>>(),
            vec![open.id]
        );
    }
}

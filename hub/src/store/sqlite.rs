//! The embedded telemetry store: SQLite in WAL mode in the data directory, with group
//! commit and a per-device high-water mark that makes re-sent batches idempotent, and
//! the pruner that deletes readings older than the retention.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::{Batch, Outcome, StoreError, TelemetryStore};
use crate::config::{SqliteOptions, Synchronous};

/// Most (device, metric) → series id entries cached; the cache is cleared when full (it
/// is only a cache: ids are in the `series` table).
const SERIES_CACHE_LIMIT: usize = 1_000_000;

/// The schema of the whole hub database (telemetry and metadata share one file).
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    metric TEXT NOT NULL,
    UNIQUE (device, metric)
);
CREATE TABLE IF NOT EXISTS readings (
    series INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    value REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS readings_by_series_ts ON readings (series, ts);
CREATE TABLE IF NOT EXISTS device_seq (
    device TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL
) WITHOUT ROWID;
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
    let options = options.into();
    let conn = Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
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
    conn.execute_batch(SCHEMA)?;
    migrate(&conn)?;
    Ok(conn)
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

/// SQLite telemetry store. Owned by the ingest writer thread.
pub struct SqliteTelemetry {
    conn: Connection,
    last_seq: HashMap<Arc<str>, u64>,
    series: HashMap<
        (
            Arc<str>,
            heapless::String<{ schemas::limits::MAX_METRIC_LEN }>,
        ),
        i64,
    >,
}

impl SqliteTelemetry {
    /// Opens (and if needed creates) the store at `path`.
    ///
    /// # Errors
    /// The database cannot be opened.
    pub fn open(
        path: &Path,
        options: impl Into<SqliteOptions>,
    ) -> Result<SqliteTelemetry, StoreError> {
        Ok(SqliteTelemetry {
            conn: open(path, options)?,
            last_seq: HashMap::new(),
            series: HashMap::new(),
        })
    }

    fn stored_seq(&mut self, device: &Arc<str>) -> Result<u64, StoreError> {
        if let Some(&seq) = self.last_seq.get(device) {
            return Ok(seq);
        }
        let seq: Option<i64> = self
            .conn
            .query_row(
                "SELECT last_seq FROM device_seq WHERE device = ?1",
                [&**device],
                |r| r.get(0),
            )
            .optional()?;
        let seq = seq.unwrap_or(0) as u64;
        self.last_seq.insert(device.clone(), seq);
        Ok(seq)
    }
}

impl TelemetryStore for SqliteTelemetry {
    fn last_seq(&mut self, device: &str) -> Result<u64, StoreError> {
        self.stored_seq(&Arc::from(device))
    }

    fn purge(&mut self, device: &str) -> Result<u64, StoreError> {
        let tx = self.conn.transaction()?;
        let readings = tx.execute(
            "DELETE FROM readings WHERE series IN (SELECT id FROM series WHERE device = ?1)",
            [device],
        )?;
        tx.execute("DELETE FROM series WHERE device = ?1", [device])?;
        tx.execute("DELETE FROM device_seq WHERE device = ?1", [device])?;
        tx.commit()?;
        // The caches would point at deleted rows.
        self.last_seq.remove(device);
        self.series.retain(|(d, _), _| &**d != device);
        Ok(readings as u64)
    }

    fn commit(&mut self, batches: &[Batch]) -> Result<Vec<Outcome>, StoreError> {
        // Load high-water marks first so the transaction below only writes.
        for b in batches {
            self.stored_seq(&b.device)?;
        }
        let mut outcomes = Vec::with_capacity(batches.len());
        let mut new_seq: HashMap<Arc<str>, u64> = HashMap::new();
        let mut new_series = Vec::new();
        let tx = self.conn.transaction()?;
        {
            let mut insert_reading =
                tx.prepare_cached("INSERT INTO readings (series, ts, value) VALUES (?1, ?2, ?3)")?;
            let mut insert_series =
                tx.prepare_cached("INSERT OR IGNORE INTO series (device, metric) VALUES (?1, ?2)")?;
            let mut select_series =
                tx.prepare_cached("SELECT id FROM series WHERE device = ?1 AND metric = ?2")?;
            let mut upsert_seq = tx.prepare_cached(
                "INSERT INTO device_seq (device, last_seq) VALUES (?1, ?2)
                 ON CONFLICT (device) DO UPDATE SET last_seq = excluded.last_seq",
            )?;
            let mut batch_series: HashMap<&str, i64> = HashMap::new();
            for b in batches {
                let stored = new_seq
                    .get(&b.device)
                    .or_else(|| self.last_seq.get(&b.device))
                    .copied()
                    .unwrap_or(0);
                if b.seq <= stored {
                    outcomes.push(Outcome::Duplicate);
                    continue;
                }
                batch_series.clear();
                for r in &b.readings {
                    let key = (b.device.clone(), r.metric.clone());
                    let id = match self
                        .series
                        .get(&key)
                        .or_else(|| batch_series.get(r.metric.as_str()))
                    {
                        Some(&id) => id,
                        None => {
                            insert_series.execute(params![&*b.device, r.metric.as_str()])?;
                            let id: i64 = select_series
                                .query_row(params![&*b.device, r.metric.as_str()], |row| {
                                    row.get(0)
                                })?;
                            batch_series.insert(r.metric.as_str(), id);
                            new_series.push((key, id));
                            id
                        }
                    };
                    insert_reading.execute(params![id, r.ts as i64, r.value])?;
                }
                upsert_seq.execute(params![&*b.device, b.seq as i64])?;
                new_seq.insert(b.device.clone(), b.seq);
                outcomes.push(Outcome::Stored);
            }
        }
        tx.commit()?;
        // Only now that the commit is durable do the caches learn about it.
        self.last_seq.extend(new_seq);
        if self.series.len() + new_series.len() > SERIES_CACHE_LIMIT {
            self.series.clear();
        }
        self.series.extend(new_series);
        Ok(outcomes)
    }
}

/// Series one pruning step visits at most, so that a step stays short with millions of
/// series.
const PRUNE_SERIES_PER_STEP: usize = 512;

/// Deletes readings older than a retention, in steps: each step is one short write
/// transaction of its own connection, so the ingest writer waits at most one step for
/// the database. It goes through the series in id order, through the `(series, ts)`
/// index, and remembers where it stopped.
pub struct TelemetryPruner {
    conn: Connection,
    /// The last series whose old readings are all gone in this round.
    after_series: i64,
}

/// What one pruning step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneStep {
    /// Readings deleted.
    pub deleted: usize,
    /// Whether this step finished a round over every series (the next starts another).
    pub round_done: bool,
}

impl TelemetryPruner {
    /// Opens its own connection to the hub database at `path`. Its commits are not
    /// synced to disk one by one (`synchronous = NORMAL`, whatever the store's setting):
    /// a deletion lost to a power cut is made again by the next round, and an fsync per
    /// step would double the time it holds the write lock.
    ///
    /// # Errors
    /// The database cannot be opened.
    pub fn open(
        path: &Path,
        options: impl Into<SqliteOptions>,
    ) -> Result<TelemetryPruner, StoreError> {
        let options = SqliteOptions {
            synchronous: Synchronous::Normal,
            ..options.into()
        };
        Ok(TelemetryPruner {
            conn: open(path, options)?,
            after_series: 0,
        })
    }

    /// Deletes at most `max_rows` readings with a timestamp before `before_ms`, in one
    /// transaction, continuing the round where the last step stopped.
    ///
    /// # Errors
    /// The store failed; nothing of this step was deleted, and the next step retries it.
    pub fn step(&mut self, before_ms: u64, max_rows: usize) -> Result<PruneStep, StoreError> {
        let before = i64::try_from(before_ms).unwrap_or(i64::MAX);
        let max_rows = max_rows.max(1);
        // The write lock up front: a deferred transaction that read first could find
        // another writer's commit in between and fail.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut deleted = 0usize;
        let mut after = self.after_series;
        let mut round_done = true;
        {
            let mut series =
                tx.prepare_cached("SELECT id FROM series WHERE id > ?1 ORDER BY id LIMIT ?2")?;
            let ids: Vec<i64> = series
                .query_map(params![after, PRUNE_SERIES_PER_STEP as i64], |r| r.get(0))?
                .collect::<Result<_, _>>()?;
            if ids.len() == PRUNE_SERIES_PER_STEP {
                round_done = false;
            }
            let mut delete = tx.prepare_cached(
                "DELETE FROM readings WHERE rowid IN
                   (SELECT rowid FROM readings WHERE series = ?1 AND ts < ?2 LIMIT ?3)",
            )?;
            for id in ids {
                let room = max_rows - deleted;
                let n = delete.execute(params![id, before, room as i64])?;
                deleted += n;
                if n == room {
                    // The step is full; this series may hold more, so it is visited again.
                    round_done = false;
                    break;
                }
                after = id;
            }
        }
        tx.commit()?;
        self.after_series = if round_done { 0 } else { after };
        Ok(PruneStep {
            deleted,
            round_done,
        })
    }
}

/// High-water marks in the `device_seq` table of the hub database, for backends that keep
/// the data elsewhere.
pub struct SqliteSeq {
    conn: Connection,
}

impl SqliteSeq {
    /// Opens the hub database at `path`.
    ///
    /// # Errors
    /// The database cannot be opened.
    pub fn open(path: &Path, options: impl Into<SqliteOptions>) -> Result<SqliteSeq, StoreError> {
        Ok(SqliteSeq {
            conn: open(path, options)?,
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
    use super::*;
    use schemas::message::truncated;
    use schemas::Reading;

    fn batch(device: &str, seq: u64, n: usize) -> Batch {
        let mut readings = Vec::new();
        for i in 0..n {
            readings.push(Reading {
                metric: truncated(&format!("m{}", i % 3)),
                ts: i as u64,
                value: i as f64,
            });
        }
        Batch {
            device: Arc::from(device),
            seq,
            readings,
        }
    }

    fn readings_left(store: &SqliteTelemetry) -> Vec<(String, i64)> {
        let mut stmt = store
            .conn
            .prepare(
                "SELECT series.device, readings.ts FROM readings
                 JOIN series ON series.id = readings.series ORDER BY 1, 2",
            )
            .expect("prepare");
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query")
            .collect::<Result<Vec<_>, _>>()
            .expect("rows");
        rows
    }

    #[test]
    fn pruning_deletes_old_readings_in_bounded_steps_and_keeps_the_rest() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.db");
        let mut store = SqliteTelemetry::open(&path, Synchronous::Normal).expect("open");
        // Three devices, three metrics each, readings at ts 0..=9 per metric (batch()
        // gives each reading ts = its index, metrics round-robin).
        for device in ["a", "b", "c"] {
            store.commit(&[batch(device, 1, 30)]).expect("commit");
        }
        let mut pruner = TelemetryPruner::open(&path, Synchronous::Normal).expect("pruner");
        // Everything before ts 20 goes: 20 readings per device, 60 in all, at most 7 per
        // step.
        let mut steps = Vec::new();
        loop {
            let step = pruner.step(20, 7).expect("step");
            assert!(step.deleted <= 7, "{step:?}");
            steps.push(step);
            if step.round_done {
                break;
            }
            assert!(steps.len() < 100, "the round never ends: {steps:?}");
        }
        assert_eq!(steps.iter().map(|s| s.deleted).sum::<usize>(), 60);
        let left = readings_left(&store);
        assert_eq!(left.len(), 30);
        assert!(left.iter().all(|(_, ts)| *ts >= 20), "{left:?}");
        // A new round finds nothing more, and ingest goes on with the pruner open.
        assert_eq!(
            pruner.step(20, 7).expect("step"),
            PruneStep {
                deleted: 0,
                round_done: true
            }
        );
        store
            .commit(&[batch("a", 2, 3)])
            .expect("commit after pruning");
        assert_eq!(readings_left(&store).len(), 33);
    }

    #[test]
    fn a_round_over_many_series_takes_several_steps() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.db");
        let mut store = SqliteTelemetry::open(&path, Synchronous::Normal).expect("open");
        let devices: Vec<String> = (0..PRUNE_SERIES_PER_STEP + 10)
            .map(|i| format!("d{i}"))
            .collect();
        let batches: Vec<Batch> = devices.iter().map(|d| batch(d, 1, 1)).collect();
        store.commit(&batches).expect("commit");
        let mut pruner = TelemetryPruner::open(&path, Synchronous::Normal).expect("pruner");
        let first = pruner.step(1, 100_000).expect("step");
        assert_eq!(first.deleted, PRUNE_SERIES_PER_STEP);
        assert!(!first.round_done);
        let second = pruner.step(1, 100_000).expect("step");
        assert_eq!(
            second,
            PruneStep {
                deleted: 10,
                round_done: true
            }
        );
        assert!(readings_left(&store).is_empty());
    }

    #[test]
    fn duplicates_are_not_stored_twice() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.db");
        let mut store = SqliteTelemetry::open(&path, Synchronous::Normal).expect("open");
        let out = store
            .commit(&[
                batch("a", 1, 5),
                batch("a", 2, 5),
                batch("a", 2, 5),
                batch("b", 1, 1),
            ])
            .expect("commit");
        assert_eq!(
            out,
            [
                Outcome::Stored,
                Outcome::Stored,
                Outcome::Duplicate,
                Outcome::Stored
            ]
        );
        assert_eq!(
            store.commit(&[batch("a", 1, 5)]).expect("commit"),
            [Outcome::Duplicate]
        );
        drop(store);
        let mut reopened = SqliteTelemetry::open(&path, Synchronous::Normal).expect("open");
        assert_eq!(reopened.last_seq("a").expect("seq"), 2);
        let count: i64 = reopened
            .conn
            .query_row("SELECT count(*) FROM readings", [], |r| r.get(0))
            .expect("count");
        assert_eq!(count, 11);
    }
}

//! The telemetry database (`telemetry.db` in the data directory): series, readings in
//! chunks (see `chunk`) and each device's high-water mark, in a file of its own so that
//! telemetry commits and the hub database's writers (commands, presence, jobs) never wait
//! for each other. Opening it creates the schema; [`separate_telemetry`] moves telemetry
//! out of the hub database of an older hub, and older row layouts are converted.
//!
//! A group commit appends to two logs, tables without a secondary index that only grow at
//! their end: `reading_log` (one chunk per device) and `seq_log` (one row of high-water
//! marks). Folds move them, in key order, into `reading_chunks` (indexed by device and
//! time) and `device_seq`. Writing the indexed tables at every commit touched one index
//! page per device in the commit, which was most of what a commit wrote to the WAL; a fold
//! touches each page once for many commits. The `readings` and `last_seqs` views, and the
//! query API, read both the folded tables and the logs.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{
    params, Connection, OptionalExtension, Statement, Transaction, TransactionBehavior,
};

use super::chunk::{self, ChunkBuilder, Point};
use super::sqlite::configured;
use crate::config::SqliteOptions;

/// The schema of the telemetry database.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS series (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    metric TEXT NOT NULL,
    UNIQUE (device, metric)
);
CREATE TABLE IF NOT EXISTS reading_chunks (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    ts_first INTEGER NOT NULL,
    ts_last INTEGER NOT NULL,
    n INTEGER NOT NULL,
    points TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS reading_chunks_by_device_ts ON reading_chunks (device, ts_first);
CREATE TABLE IF NOT EXISTS reading_log (
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    ts_first INTEGER NOT NULL,
    ts_last INTEGER NOT NULL,
    n INTEGER NOT NULL,
    points TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS device_seq (
    device TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS seq_log (
    id INTEGER PRIMARY KEY,
    marks TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS moved_from_hub_db (
    at_ms INTEGER NOT NULL
);
";

/// What a chunk in the log adds to its id where readings are ordered as stored: 2^62, above
/// every folded chunk's id.
pub const LOG_CHUNK_OFFSET: i64 = 1 << 62;

/// One row per reading, unpacked from the chunks and from the chunks still in the log:
/// what plain SQL (and the `sqlite3` shell) reads. `chunk` and `pos` give the order
/// readings were stored in (a chunk in the log is newer than every folded one, so its
/// `chunk` is its id plus [`LOG_CHUNK_OFFSET`]).
fn readings_view() -> String {
    format!(
        "CREATE VIEW readings AS
             SELECT p.value ->> 0 AS series, p.value ->> 1 AS ts, p.value ->> 2 AS value,
                    c.id AS chunk, p.key AS pos
             FROM reading_chunks c, json_each(c.points) p
             UNION ALL
             SELECT p.value ->> 0, p.value ->> 1, p.value ->> 2, l.id + {LOG_CHUNK_OFFSET}, p.key
             FROM reading_log l, json_each(l.points) p;"
    )
}

/// Each device's high-water mark as plain SQL reads it: the folded marks in `device_seq`
/// and those of recent commits still in `seq_log` (JSON `[[device, seq], ...]` per commit).
const LAST_SEQS_VIEW: &str = "
CREATE VIEW IF NOT EXISTS last_seqs AS
    SELECT device, max(last_seq) AS last_seq FROM (
        SELECT device, last_seq FROM device_seq
        UNION ALL
        SELECT m.value ->> 0, m.value ->> 1 FROM seq_log l, json_each(l.marks) m
    ) GROUP BY device;
";

/// Folds the marks in `seq_log` into `device_seq` and empties the log, in the caller's
/// transaction. Returns the rows the log had.
///
/// # Errors
/// SQLite failed.
pub fn fold_seq_log(conn: &Connection) -> Result<usize, rusqlite::Error> {
    conn.execute(
        "INSERT INTO device_seq (device, last_seq)
             SELECT m.value ->> 0, max(m.value ->> 1) FROM seq_log l, json_each(l.marks) m
             WHERE true GROUP BY 1
         ON CONFLICT (device) DO UPDATE SET last_seq = max(last_seq, excluded.last_seq)",
        [],
    )?;
    conn.execute("DELETE FROM seq_log", [])
}

/// Moves the chunks in `reading_log` into `reading_chunks` and empties the log, in the
/// caller's transaction: per device (in key order, so that neighbouring devices share
/// index pages), the log's chunks of one hour window are merged, in the order they were
/// stored, into chunks of up to [`chunk::CHUNK_MAX_READINGS`] readings. Returns the
/// readings folded.
///
/// The log is read in the order it was written and grouped here, not sorted by SQLite,
/// whose sorter would need a page cache as large as the log to stay in memory. What the
/// fold holds is bounded by the log's size (the ingest writer folds at 65,536 readings).
/// Chunks are merged as text, not read reading by reading: the log holds only what
/// [`ChunkBuilder`] wrote, one window per chunk.
///
/// # Errors
/// SQLite failed, or a chunk in the log is not a JSON array.
pub fn fold_reading_log(conn: &Connection) -> Result<usize, super::StoreError> {
    /// One device's chunks being merged: one open per window, and those that filled, in
    /// the order they filled.
    #[derive(Default)]
    struct Merged {
        open: Vec<(i64, ChunkBuilder)>,
        full: Vec<ChunkBuilder>,
    }
    let mut devices: BTreeMap<String, Merged> = BTreeMap::new();
    let mut folded = 0usize;
    {
        let mut read = conn.prepare_cached(
            "SELECT device, ts_first, ts_last, n, points FROM reading_log ORDER BY id",
        )?;
        let mut rows = read.query([])?;
        while let Some(row) = rows.next()? {
            let device = row.get_ref(0)?.as_str().map_err(rusqlite::Error::from)?;
            let (ts_first, ts_last): (i64, i64) = (row.get(1)?, row.get(2)?);
            let n = usize::try_from(row.get::<_, i64>(3)?).unwrap_or(0);
            let points = row.get_ref(4)?.as_str().map_err(rusqlite::Error::from)?;
            let merged = match devices.get_mut(device) {
                Some(merged) => merged,
                None => devices.entry(device.to_string()).or_default(),
            };
            let window = chunk::window_of(ts_first);
            let at = match merged.open.iter().position(|(w, _)| *w == window) {
                Some(at) => at,
                None => {
                    merged.open.push((window, ChunkBuilder::with_capacity(n)));
                    merged.open.len() - 1
                }
            };
            if merged.open[at].1.len + n > chunk::CHUNK_MAX_READINGS {
                let full =
                    std::mem::replace(&mut merged.open[at].1, ChunkBuilder::with_capacity(n));
                merged.full.push(full);
            }
            if !merged.open[at]
                .1
                .append_finished(points, n, ts_first, ts_last)
            {
                return Err(super::StoreError::Other(format!(
                    "a chunk of {device} in the reading log is damaged: it is not a JSON array"
                )));
            }
            folded += n;
        }
    }
    let mut insert = conn.prepare_cached(INSERT_CHUNK)?;
    for (device, merged) in devices {
        // Full chunks first: of one window, they hold what was stored before the open one.
        let open = merged.open.into_iter().map(|(_, c)| c);
        for c in merged.full.into_iter().chain(open) {
            insert_chunk(&mut insert, &device, c)?;
        }
    }
    conn.execute("DELETE FROM reading_log", [])?;
    Ok(folded)
}

/// Opens a connection to the telemetry database at `path` with the hub's pragmas,
/// creating the schema, and the views where they are missing or older.
///
/// # Errors
/// The file cannot be opened or the schema cannot be created.
pub fn open(path: &Path, options: impl Into<SqliteOptions>) -> Result<Connection, rusqlite::Error> {
    let conn = configured(path, options.into())?;
    conn.execute_batch(SCHEMA)?;
    let existing_view: Option<String> = conn
        .query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'view' AND name = 'readings'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    // A hub from before the reading log made a view that does not read it.
    if !existing_view.is_some_and(|sql| sql.contains("reading_log")) {
        let tx = Transaction::new_unchecked(&conn, TransactionBehavior::Immediate)?;
        tx.execute_batch("DROP VIEW IF EXISTS readings")?;
        tx.execute_batch(&readings_view())?;
        tx.commit()?;
    }
    conn.execute_batch(LAST_SEQS_VIEW)?;
    Ok(conn)
}

/// Why telemetry could not be moved out of the hub database.
#[derive(Debug, thiserror::Error)]
pub enum SeparateError {
    /// SQLite failed (the move is retried at the next start).
    #[error("moving telemetry out of the hub database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Both files hold telemetry and the telemetry database was not filled by a move: an
    /// older hub wrote to the hub database after a newer one had started.
    #[error(
        "both {hub} and {telemetry} hold readings; stop the hub and keep the one you want \
         (move the other away), then start it again"
    )]
    BothHoldTelemetry {
        /// The hub database.
        hub: String,
        /// The telemetry database.
        telemetry: String,
    },
}

impl From<SeparateError> for super::StoreError {
    fn from(e: SeparateError) -> super::StoreError {
        match e {
            SeparateError::Sqlite(e) => super::StoreError::Sqlite(e),
            other => super::StoreError::Refused(other.to_string()),
        }
    }
}

/// Moves the telemetry of a hub from before the telemetry database (series, readings,
/// high-water marks in the hub database) into the telemetry database, then drops it from
/// the hub database. The copy is one transaction of the telemetry database, marked there
/// as a move; a crash before the hub database forgot its copy is finished at the next
/// start without copying again. Returns the readings moved.
///
/// # Errors
/// SQLite failed (nothing was lost: the hub database keeps its telemetry until the copy
/// is committed), or both files hold telemetry (see [`SeparateError::BothHoldTelemetry`]).
pub fn separate_telemetry(
    hub_db: &Path,
    telemetry_db: &Path,
    options: impl Into<SqliteOptions>,
) -> Result<u64, SeparateError> {
    let options = options.into();
    if !hub_db.exists() {
        return Ok(0);
    }
    let hub = configured(hub_db, options)?;
    if !has_table(&hub, "series")? {
        return Ok(0);
    }
    let telemetry = open(telemetry_db, options)?;
    let mut moved = 0u64;
    if !has_rows(&telemetry, "moved_from_hub_db")? {
        if has_rows(&telemetry, "series")? && has_rows(&hub, "series")? {
            return Err(SeparateError::BothHoldTelemetry {
                hub: hub_db.display().to_string(),
                telemetry: telemetry_db.display().to_string(),
            });
        }
        // An older layout in the hub database is brought to chunks first, in place.
        hub.execute_batch(SCHEMA)?;
        convert_readings_to_chunks(&hub)?;
        telemetry.execute("ATTACH DATABASE ?1 AS legacy", [hub_db.to_string_lossy()])?;
        let tx = Transaction::new_unchecked(&telemetry, TransactionBehavior::Immediate)?;
        tx.execute_batch(
            "INSERT INTO main.series (id, device, metric)
               SELECT id, device, metric FROM legacy.series;
             INSERT INTO main.reading_chunks (id, device, ts_first, ts_last, n, points)
               SELECT id, device, ts_first, ts_last, n, points FROM legacy.reading_chunks;
             INSERT INTO main.device_seq (device, last_seq)
               SELECT device, last_seq FROM legacy.device_seq;",
        )?;
        tx.execute(
            "INSERT INTO moved_from_hub_db (at_ms) VALUES (?1)",
            [super::now_ms() as i64],
        )?;
        moved = tx.query_row(
            "SELECT coalesce(sum(n), 0) FROM main.reading_chunks",
            [],
            |r| r.get::<_, i64>(0),
        )? as u64;
        tx.commit()?;
        telemetry.execute_batch("DETACH DATABASE legacy")?;
    }
    // `readings` is a table (an older hub) or a view (a hub that kept chunks there).
    let readings_kind: Option<String> = hub
        .query_row(
            "SELECT type FROM sqlite_master WHERE name = 'readings'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let drop_readings = match readings_kind.as_deref() {
        Some("view") => "DROP VIEW readings;",
        Some(_) => "DROP TABLE readings;",
        None => "",
    };
    hub.execute_batch(&format!(
        "BEGIN IMMEDIATE;
         {drop_readings}
         DROP TABLE IF EXISTS reading_chunks;
         DROP TABLE IF EXISTS reading_log;
         DROP TABLE IF EXISTS device_seq;
         DROP TABLE IF EXISTS seq_log;
         DROP TABLE IF EXISTS series;
         DROP TABLE IF EXISTS moved_from_hub_db;
         COMMIT;"
    ))?;
    tracing::info!(
        readings = moved,
        from = %hub_db.display(),
        to = %telemetry_db.display(),
        "moved telemetry into its own database"
    );
    Ok(moved)
}

/// Stores a finished chunk of `device` with `insert`, a statement prepared from
/// [`INSERT_CHUNK`].
///
/// # Errors
/// SQLite refused the row.
pub(super) fn insert_chunk(
    insert: &mut Statement<'_>,
    device: &str,
    chunk: ChunkBuilder,
) -> Result<(), rusqlite::Error> {
    let (first, last, n) = (chunk.ts_first, chunk.ts_last, chunk.len as i64);
    insert.execute(params![device, first, last, n, chunk.finish()])?;
    Ok(())
}

/// The statement [`insert_chunk`] runs.
pub(super) const INSERT_CHUNK: &str =
    "INSERT INTO reading_chunks (device, ts_first, ts_last, n, points) VALUES (?1, ?2, ?3, ?4, ?5)";

/// The statement that appends a chunk to the reading log (with [`insert_chunk`]).
pub(super) const INSERT_LOG_CHUNK: &str =
    "INSERT INTO reading_log (device, ts_first, ts_last, n, points) VALUES (?1, ?2, ?3, ?4, ?5)";

/// Whether the database has a table called `name`.
fn has_table(conn: &Connection, name: &str) -> Result<bool, rusqlite::Error> {
    conn.prepare_cached("SELECT 1 FROM sqlite_master WHERE name = ?1 AND type = 'table'")?
        .exists([name])
}

/// Whether `table` (one of this module's) holds any row.
fn has_rows(conn: &Connection, table: &str) -> Result<bool, rusqlite::Error> {
    Ok(conn
        .query_row(&format!("SELECT 1 FROM {table} LIMIT 1"), [], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Converts the `readings` table of a hub from before chunks (one row per reading) into
/// chunks, in one transaction, and drops it. Readings keep their order
/// (by device, time, then insertion), so ties between equal timestamps still go to the
/// later one. A crash part way leaves the old table as it was, and the next start converts
/// it again. (Only the hub database of an older hub has such a table.)
fn convert_readings_to_chunks(conn: &Connection) -> Result<(), rusqlite::Error> {
    if !has_table(conn, "readings")? {
        return Ok(());
    }
    let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
    // Another connection may have converted it while this one waited for the lock.
    if !has_table(&tx, "readings")? {
        return Ok(());
    }
    let mut converted = 0u64;
    {
        let mut read = tx.prepare(
            "SELECT s.device, r.series, r.ts, r.value FROM readings r
             JOIN series s ON s.id = r.series ORDER BY s.device, r.ts, r.rowid",
        )?;
        let mut insert = tx.prepare(INSERT_CHUNK)?;
        let mut rows = read.query([])?;
        let mut open: Option<((String, i64), ChunkBuilder)> = None;
        while let Some(row) = rows.next()? {
            let device: String = row.get(0)?;
            let point = Point {
                series: row.get(1)?,
                ts: row.get(2)?,
                value: row.get(3)?,
            };
            let key = (device, chunk::window_of(point.ts));
            match &mut open {
                Some((k, c)) if *k == key && !c.is_full() => c.push(point),
                _ => {
                    if let Some(((device, _), c)) = open.take() {
                        insert_chunk(&mut insert, &device, c)?;
                    }
                    let mut c = ChunkBuilder::with_capacity(64);
                    c.push(point);
                    open = Some((key, c));
                }
            }
            converted += 1;
        }
        if let Some(((device, _), c)) = open.take() {
            insert_chunk(&mut insert, &device, c)?;
        }
    }
    tx.execute_batch("DROP TABLE readings")?;
    tx.commit()?;
    if converted > 0 {
        tracing::info!(
            readings = converted,
            "converted the readings table into chunks"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Synchronous;

    /// A hub database as a hub from before chunks left it: series and one row per reading,
    /// two devices over four hour windows, every timestamp twice (ties), inserted newest
    /// first so that the conversion has to sort. Returns the readings in the order they
    /// must come back: by device, time, then insertion.
    fn old_hub_db(path: &Path, values: &[f64]) -> Vec<(i64, i64, u64)> {
        let conn = Connection::open(path).expect("open");
        conn.execute_batch(
            "CREATE TABLE series (id INTEGER PRIMARY KEY, device TEXT NOT NULL,
               metric TEXT NOT NULL, UNIQUE (device, metric));
             CREATE TABLE readings (series INTEGER NOT NULL, ts INTEGER NOT NULL,
               value REAL NOT NULL);
             CREATE INDEX readings_by_series_ts ON readings (series, ts);
             CREATE TABLE device_seq (device TEXT PRIMARY KEY, last_seq INTEGER NOT NULL)
               WITHOUT ROWID;
             CREATE TABLE devices (id TEXT PRIMARY KEY);
             INSERT INTO devices (id) VALUES ('a'), ('b');
             INSERT INTO series (id, device, metric) VALUES (1, 'a', 'x'), (2, 'b', 'y');
             INSERT INTO device_seq (device, last_seq) VALUES ('a', 41), ('b', 7);
             BEGIN;",
        )
        .expect("old schema");
        {
            let mut insert = conn
                .prepare("INSERT INTO readings (series, ts, value) VALUES (?1, ?2, ?3)")
                .expect("prepare");
            for (i, v) in values.iter().enumerate() {
                let ts = ((values.len() - i) / 2) as i64 * 8_000;
                insert
                    .execute(params![1 + (i % 2) as i64, ts, v])
                    .expect("insert");
            }
        }
        conn.execute_batch("COMMIT").expect("commit");
        let mut stmt = conn
            .prepare("SELECT series, ts, value FROM readings ORDER BY series, ts, rowid")
            .expect("prepare");
        let rows = stmt
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, f64>(2)?.to_bits()))
            })
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        rows
    }

    fn tables(path: &Path) -> Vec<String> {
        let conn = Connection::open(path).expect("open");
        let mut stmt = conn
            .prepare("SELECT name FROM sqlite_master WHERE type IN ('table', 'view') ORDER BY name")
            .expect("prepare");
        let names = stmt
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        names
    }

    #[test]
    fn an_old_hub_database_gives_its_readings_to_the_telemetry_database_in_chunks() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (hub_db, telemetry_db) = (dir.path().join("hub.db"), dir.path().join("telemetry.db"));
        let values = chunk::awkward_values(3_000);
        let expected = old_hub_db(&hub_db, &values);
        let moved = separate_telemetry(&hub_db, &telemetry_db, Synchronous::Normal).expect("move");
        assert_eq!(moved as usize, values.len());
        // The hub database keeps what is not telemetry, and nothing else.
        assert_eq!(tables(&hub_db), vec!["devices".to_string()]);
        let conn = open(&telemetry_db, Synchronous::Normal).expect("open");
        let mut stmt = conn
            .prepare("SELECT series, ts, value FROM readings ORDER BY series, chunk, pos")
            .expect("prepare");
        let back: Vec<(i64, i64, u64)> = stmt
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get::<_, f64>(2)?.to_bits()))
            })
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(back, expected);
        let chunks: i64 = conn
            .query_row("SELECT count(*) FROM reading_chunks", [], |r| r.get(0))
            .expect("count");
        assert!(
            chunks >= 8,
            "one chunk per device and window at least: {chunks}"
        );
        let seq: i64 = conn
            .query_row(
                "SELECT last_seq FROM device_seq WHERE device = 'a'",
                [],
                |r| r.get(0),
            )
            .expect("seq");
        assert_eq!(seq, 41);
        // Starting again moves nothing.
        assert_eq!(
            separate_telemetry(&hub_db, &telemetry_db, Synchronous::Normal).expect("again"),
            0
        );
    }

    #[test]
    fn a_move_cut_short_is_finished_without_copying_twice_and_a_real_conflict_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (hub_db, telemetry_db) = (dir.path().join("hub.db"), dir.path().join("telemetry.db"));
        let values = chunk::awkward_values(10);
        old_hub_db(&hub_db, &values);
        let copy = dir.path().join("hub-copy.db");
        std::fs::copy(&hub_db, &copy).expect("copy");
        separate_telemetry(&hub_db, &telemetry_db, Synchronous::Normal).expect("move");
        // As if the hub had died after the copy's commit, before the hub database forgot
        // its telemetry: the next start only forgets.
        std::fs::copy(&copy, &hub_db).expect("restore");
        assert_eq!(
            separate_telemetry(&hub_db, &telemetry_db, Synchronous::Normal).expect("finish"),
            0
        );
        assert_eq!(tables(&hub_db), vec!["devices".to_string()]);
        let count = |path: &Path| -> i64 {
            Connection::open(path)
                .expect("open")
                .query_row("SELECT count(*) FROM readings", [], |r| r.get(0))
                .expect("count")
        };
        assert_eq!(count(&telemetry_db), 10);
        // Two files holding telemetry without a move between them: refused, both kept.
        let other = dir.path().join("other.db");
        let filled = open(&other, Synchronous::Normal).expect("open");
        filled
            .execute_batch("INSERT INTO series (id, device, metric) VALUES (1, 'c', 'z')")
            .expect("fill");
        drop(filled);
        std::fs::copy(&copy, &hub_db).expect("restore");
        let err = separate_telemetry(&hub_db, &other, Synchronous::Normal).expect_err("refused");
        assert!(
            matches!(err, SeparateError::BothHoldTelemetry { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("keep the one you want"), "{err}");
        assert_eq!(count(&hub_db), 10);
    }
}

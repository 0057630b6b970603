//! The ingest writer's telemetry store on SQLite ([`SqliteTelemetry`]): group commits into
//! the logs of `telemetry.db` (see `telemetry_db`), folded into its indexed tables, with a
//! per-device high-water mark that makes re-sent batches idempotent; and the
//! [`TelemetryPruner`] that deletes readings older than the retention.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::chunk::{self, ChunkBuilder, Point};
use super::telemetry_db;
use super::{Batch, Outcome, StoreError, TelemetryStore};
use crate::config::{SqliteOptions, Synchronous};

/// Most (device, metric) → series id entries cached; the cache is cleared when full (it
/// is only a cache: ids are in the `series` table).
const SERIES_CACHE_LIMIT: usize = 1_000_000;

/// How often the ingest writer folds the high-water marks of its recent commits into
/// `device_seq`, and the most commits whose marks wait in `seq_log` meanwhile.
///
/// Each commit used to upsert the mark of every device in it: one B-tree page of
/// `device_seq` per device (they are spread over the table), which with the chunk index's
/// page per device was most of what a commit wrote to the WAL. Now a commit appends one
/// `seq_log` row with all its marks (a page or two at the end of a table), and a fold
/// writes each device's mark once per interval, in key order, so that neighbouring devices
/// share pages.
const SEQ_FOLD_EVERY: Duration = Duration::from_secs(10);
const SEQ_LOG_MAX_ROWS: usize = 4_096;

/// How often the ingest writer folds the reading log into `reading_chunks` (see
/// `telemetry_db`), and the most readings the log holds meanwhile. Queries scan the log
/// (it has no index), and a fold holds what it merges in memory: both are bounded by the
/// readings. A second of 100,000 readings a second from 200 devices is about 1,000 log
/// rows, which a fold turns into 200 chunks.
const READING_FOLD_EVERY: Duration = Duration::from_secs(1);
const READING_LOG_MAX_READINGS: usize = 65_536;

/// The ingest writer's maps keyed by device: foldhash, seeded per process, instead of
/// SipHash, which was about 6 % of the writer thread at one reading per frame (several
/// lookups per batch). Device names come from authenticated devices only.
type DeviceMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type DeviceSet<K> = HashSet<K, foldhash::fast::RandomState>;

/// SQLite telemetry store. Owned by the ingest writer thread.
///
/// Architecture invariant: `last_seq` holds the mark of every device with a mark in
/// `seq_log` (the log is folded when the store opens, and every later mark comes from a
/// commit of this store, whose devices stay in the cache; a purge folds the log first), so
/// a device missing from the cache has its mark in `device_seq`.
pub struct SqliteTelemetry {
    conn: Connection,
    last_seq: DeviceMap<Arc<str>, u64>,
    /// Devices whose mark is in `seq_log` and not yet in `device_seq`.
    seq_unfolded: DeviceSet<Arc<str>>,
    /// Rows in `seq_log`.
    seq_log_rows: usize,
    /// When the log was last folded.
    seq_folded_at: Instant,
    /// Readings in `reading_log` (at most; a purge does not count its own out).
    log_readings: usize,
    /// When the reading log was last folded.
    log_folded_at: Instant,
    series: DeviceMap<
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
        let mut conn = telemetry_db::open(path, options)?;
        // SQLite's default page cache (2 MB), not the 32 MB of the hub database's
        // connections: this one kept every page it had touched, so it grew with the
        // devices that had sent a reading, about 850 bytes each (16 MB at 19,000; see
        // BENCHMARKS.md, connection density), and what a commit and a fold touch is the
        // end of the logs and a few index pages per device. A miss is a copy from the
        // kernel's page cache.
        conn.pragma_update(None, "cache_size", -2_000)?;
        // Readings and marks of commits since the last fold (before a crash, say) join the
        // others.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        telemetry_db::fold_seq_log(&tx)?;
        telemetry_db::fold_reading_log(&tx)?;
        tx.commit()?;
        Ok(SqliteTelemetry {
            conn,
            last_seq: DeviceMap::default(),
            seq_unfolded: DeviceSet::default(),
            seq_log_rows: 0,
            seq_folded_at: Instant::now(),
            log_readings: 0,
            log_folded_at: Instant::now(),
            series: DeviceMap::default(),
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
        // The device's marks may wait in the log; folded first, they go with the row.
        telemetry_db::fold_seq_log(&tx)?;
        let mut readings = 0f64;
        for table in ["reading_chunks", "reading_log"] {
            readings += tx.query_row(
                &format!("SELECT total(n) FROM {table} WHERE device = ?1"),
                [device],
                |r| r.get::<_, f64>(0),
            )?;
            tx.execute(&format!("DELETE FROM {table} WHERE device = ?1"), [device])?;
        }
        tx.execute("DELETE FROM series WHERE device = ?1", [device])?;
        tx.execute("DELETE FROM device_seq WHERE device = ?1", [device])?;
        tx.commit()?;
        self.seq_unfolded.clear();
        self.seq_log_rows = 0;
        self.seq_folded_at = Instant::now();
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
        let mut new_seq: DeviceMap<Arc<str>, u64> = DeviceMap::default();
        let mut new_series = Vec::new();
        // The readings of this commit, one chunk per device and time window (more when a
        // chunk fills); full chunks wait in `full` in the order they filled.
        let mut open: DeviceMap<(Arc<str>, i64), ChunkBuilder> = DeviceMap::default();
        let mut full: Vec<(Arc<str>, ChunkBuilder)> = Vec::new();
        let fold = self.seq_log_rows >= SEQ_LOG_MAX_ROWS
            || (!self.seq_unfolded.is_empty() && self.seq_folded_at.elapsed() >= SEQ_FOLD_EVERY);
        let mut logged = 0usize;
        let tx = self.conn.transaction()?;
        {
            let mut insert_series =
                tx.prepare_cached("INSERT OR IGNORE INTO series (device, metric) VALUES (?1, ?2)")?;
            let mut select_series =
                tx.prepare_cached("SELECT id FROM series WHERE device = ?1 AND metric = ?2")?;
            let mut batch_series: DeviceMap<&str, i64> = DeviceMap::default();
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
                    let ts = i64::try_from(r.ts).unwrap_or(i64::MAX);
                    let chunk = open
                        .entry((b.device.clone(), chunk::window_of(ts)))
                        .or_insert_with(|| ChunkBuilder::with_capacity(b.readings.len()));
                    chunk.push(Point {
                        series: id,
                        ts,
                        value: r.value,
                    });
                    if chunk.is_full() {
                        let done =
                            std::mem::replace(chunk, ChunkBuilder::with_capacity(b.readings.len()));
                        full.push((b.device.clone(), done));
                    }
                }
                new_seq.insert(b.device.clone(), b.seq);
                outcomes.push(Outcome::Stored);
            }
            let mut insert_chunk = tx.prepare_cached(telemetry_db::INSERT_LOG_CHUNK)?;
            let still_open = open
                .into_iter()
                .filter(|(_, c)| c.len > 0)
                .map(|((device, _), c)| (device, c));
            for (device, c) in full.into_iter().chain(still_open) {
                logged += c.len;
                telemetry_db::insert_chunk(&mut insert_chunk, &device, c)?;
            }
            if fold {
                // Every mark not yet in `device_seq`, this commit's included, in key order.
                let mut marks: Vec<(&Arc<str>, u64)> = self
                    .seq_unfolded
                    .iter()
                    .filter(|d| !new_seq.contains_key(*d))
                    .filter_map(|d| self.last_seq.get(d).map(|&seq| (d, seq)))
                    .chain(new_seq.iter().map(|(d, &seq)| (d, seq)))
                    .collect();
                marks.sort_unstable_by(|a, b| a.0.cmp(b.0));
                let mut upsert_seq = tx.prepare_cached(
                    "INSERT INTO device_seq (device, last_seq) VALUES (?1, ?2)
                     ON CONFLICT (device) DO UPDATE SET last_seq = excluded.last_seq",
                )?;
                for (device, seq) in marks {
                    upsert_seq.execute(params![&**device, seq as i64])?;
                }
                tx.execute("DELETE FROM seq_log", [])?;
            } else if !new_seq.is_empty() {
                // One high-water mark per device and commit (the last batch's), all in one
                // row appended to the log.
                let marks: Vec<(&str, u64)> = new_seq.iter().map(|(d, &seq)| (&**d, seq)).collect();
                let marks = serde_json::to_string(&marks)
                    .map_err(|e| StoreError::Other(format!("encoding marks: {e}")))?;
                tx.prepare_cached("INSERT INTO seq_log (marks) VALUES (?1)")?
                    .execute([marks])?;
            }
        }
        let fold_readings = self.log_readings + logged >= READING_LOG_MAX_READINGS
            || (self.log_readings + logged > 0
                && self.log_folded_at.elapsed() >= READING_FOLD_EVERY);
        if fold_readings {
            telemetry_db::fold_reading_log(&tx)?;
        }
        tx.commit()?;
        if fold_readings {
            self.log_readings = 0;
            self.log_folded_at = Instant::now();
        } else {
            self.log_readings += logged;
        }
        // Only now that the commit is durable do the caches learn about it.
        if fold {
            self.seq_unfolded.clear();
            self.seq_log_rows = 0;
            self.seq_folded_at = Instant::now();
        } else if !new_seq.is_empty() {
            self.seq_unfolded.extend(new_seq.keys().cloned());
            self.seq_log_rows += 1;
        }
        self.last_seq.extend(new_seq);
        if self.series.len() + new_series.len() > SERIES_CACHE_LIMIT {
            self.series.clear();
        }
        self.series.extend(new_series);
        Ok(outcomes)
    }
}

/// Devices one pruning step visits at most, so that a step stays short with millions of
/// devices.
const PRUNE_DEVICES_PER_STEP: usize = 512;

/// Deletes readings older than a retention, in steps: each step is one short write
/// transaction of its own connection, so the ingest writer waits at most one step for
/// the database. It goes through the devices in name order, through the
/// `(device, ts_first)` index of the chunks, and remembers where it stopped.
pub struct TelemetryPruner {
    conn: Connection,
    /// The last device whose old readings are all gone in this round.
    after_device: String,
}

/// What one pruning step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PruneStep {
    /// Readings deleted.
    pub deleted: usize,
    /// Whether this step finished a round over every device (the next starts another).
    pub round_done: bool,
}

impl TelemetryPruner {
    /// Opens its own connection to the telemetry database at `path`. Its commits are not
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
            conn: telemetry_db::open(path, options)?,
            after_device: String::new(),
        })
    }

    /// Deletes at most `max_rows` readings with a timestamp before `before_ms`, in one
    /// transaction, continuing the round where the last step stopped. A chunk that holds
    /// newer readings too, or more old ones than the step has room for, is rewritten
    /// with what stays.
    ///
    /// # Errors
    /// The store failed, or holds a damaged chunk; nothing of this step was deleted, and
    /// the next step retries it.
    pub fn step(&mut self, before_ms: u64, max_rows: usize) -> Result<PruneStep, StoreError> {
        let before = i64::try_from(before_ms).unwrap_or(i64::MAX);
        let max_rows = max_rows.max(1);
        // The write lock up front: a deferred transaction that read first could find
        // another writer's commit in between and fail.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        if self.after_device.is_empty() {
            // A round sees every reading: those of recent commits are folded first (the
            // ingest writer folds only when it commits, and an idle hub does not commit).
            telemetry_db::fold_reading_log(&tx)?;
        }
        let mut deleted = 0usize;
        let mut after = self.after_device.clone();
        let mut round_done = true;
        {
            // Distinct devices through the index: each next one is a seek past the last.
            let mut next_device = tx.prepare_cached(
                "SELECT device FROM reading_chunks WHERE device > ?1 ORDER BY device LIMIT 1",
            )?;
            // Chunks with anything older than `before`: at most one per reading the step
            // may still delete.
            let mut old_chunks = tx.prepare_cached(
                "SELECT id, ts_last, n, points FROM reading_chunks
                 WHERE device = ?1 AND ts_first < ?2 ORDER BY ts_first LIMIT ?3",
            )?;
            let mut delete = tx.prepare_cached("DELETE FROM reading_chunks WHERE id = ?1")?;
            let mut rewrite = tx.prepare_cached(
                "UPDATE reading_chunks SET ts_first = ?2, ts_last = ?3, n = ?4, points = ?5
                 WHERE id = ?1",
            )?;
            for visited in 0..=PRUNE_DEVICES_PER_STEP {
                let device: Option<String> =
                    next_device.query_row([&after], |r| r.get(0)).optional()?;
                let Some(device) = device else {
                    break;
                };
                if visited == PRUNE_DEVICES_PER_STEP {
                    // More devices wait: the next step goes on from here.
                    round_done = false;
                    break;
                }
                let chunks: Vec<(i64, i64, usize, String)> = old_chunks
                    .query_map(params![&device, before, (max_rows - deleted) as i64], |r| {
                        Ok((
                            r.get(0)?,
                            r.get(1)?,
                            r.get::<_, i64>(2)? as usize,
                            r.get(3)?,
                        ))
                    })?
                    .collect::<Result<_, _>>()?;
                for (chunk_id, ts_last, n, points) in chunks {
                    let room = max_rows - deleted;
                    if ts_last < before && n <= room {
                        delete.execute([chunk_id])?;
                        deleted += n;
                        continue;
                    }
                    // The chunk straddles `before`, or holds more old readings than the
                    // step has room for: keep what is newer, and what does not fit.
                    let points =
                        chunk::decode(&points).map_err(|e| StoreError::Other(e.to_string()))?;
                    let mut removed = 0usize;
                    let kept: Vec<Point> = points
                        .into_iter()
                        .filter(|p| {
                            let remove = p.ts < before && removed < room;
                            removed += usize::from(remove);
                            !remove
                        })
                        .collect();
                    deleted += removed;
                    if kept.is_empty() {
                        delete.execute([chunk_id])?;
                    } else if removed > 0 {
                        let first = kept.iter().map(|p| p.ts).min().unwrap_or(0);
                        let last = kept.iter().map(|p| p.ts).max().unwrap_or(0);
                        rewrite.execute(params![
                            chunk_id,
                            first,
                            last,
                            kept.len() as i64,
                            chunk::encode(&kept)
                        ])?;
                    }
                }
                if deleted == max_rows {
                    // The step is full; this device may hold more, so it is visited again.
                    round_done = false;
                    break;
                }
                after = device;
            }
        }
        tx.commit()?;
        self.after_device = if round_done { String::new() } else { after };
        Ok(PruneStep {
            deleted,
            round_done,
        })
    }
}

/// A batch of `n` readings of `device`, metrics `m0`-`m2` in turn, timestamps and values
/// 0, 1, 2 ...: for the tests here and the checkpointer's.
#[cfg(test)]
pub(super) fn batch(device: &str, seq: u64, n: usize) -> Batch {
    let mut readings = Vec::new();
    for i in 0..n {
        readings.push(schemas::Reading {
            metric: schemas::message::truncated(&format!("m{}", i % 3)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::message::truncated;
    use schemas::Reading;

    /// The rows `sql` selects, read with `row`.
    fn rows<T>(
        store: &SqliteTelemetry,
        sql: &str,
        row: impl FnMut(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
    ) -> Vec<T> {
        let mut stmt = store.conn.prepare(sql).expect("prepare");
        let rows = stmt
            .query_map([], row)
            .expect("query")
            .collect::<Result<Vec<_>, _>>()
            .expect("rows");
        rows
    }

    fn readings_left(store: &SqliteTelemetry) -> Vec<(String, i64)> {
        rows(
            store,
            "SELECT series.device, readings.ts FROM readings
             JOIN series ON series.id = readings.series ORDER BY 1, 2",
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
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
        let devices: Vec<String> = (0..PRUNE_DEVICES_PER_STEP + 10)
            .map(|i| format!("d{i}"))
            .collect();
        let batches: Vec<Batch> = devices.iter().map(|d| batch(d, 1, 1)).collect();
        store.commit(&batches).expect("commit");
        let mut pruner = TelemetryPruner::open(&path, Synchronous::Normal).expect("pruner");
        let first = pruner.step(1, 100_000).expect("step");
        assert_eq!(first.deleted, PRUNE_DEVICES_PER_STEP);
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

    #[test]
    fn marks_wait_in_the_log_until_folded_and_survive_a_crash_there() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.db");
        let mut store = SqliteTelemetry::open(&path, Synchronous::Normal).expect("open");
        let table = |store: &SqliteTelemetry, sql: &str| -> Vec<(String, i64)> {
            rows(store, sql, |r| Ok((r.get(0)?, r.get(1)?)))
        };
        let folded = "SELECT device, last_seq FROM device_seq ORDER BY device";
        let all = "SELECT device, last_seq FROM last_seqs ORDER BY device";
        store
            .commit(&[batch("a", 1, 1), batch("a", 2, 1), batch("b", 1, 1)])
            .expect("commit");
        store.commit(&[batch("b", 2, 1)]).expect("commit");
        // Two commits, two log rows; nothing folded yet, and plain SQL sees them all.
        assert!(table(&store, folded).is_empty());
        assert_eq!(table(&store, all), [("a".into(), 2), ("b".into(), 2)]);
        assert_eq!(store.seq_log_rows, 2);

        // A crash here (the store dropped without a fold): the marks are folded at the next
        // open, and what was stored stays refused as a duplicate.
        drop(store);
        let mut store = SqliteTelemetry::open(&path, Synchronous::Normal).expect("open");
        assert_eq!(table(&store, folded), [("a".into(), 2), ("b".into(), 2)]);
        assert_eq!(
            store
                .commit(&[batch("a", 2, 1), batch("b", 3, 1)])
                .expect("commit"),
            [Outcome::Duplicate, Outcome::Stored]
        );

        // A full log is folded by the next commit, in it.
        store.seq_log_rows = SEQ_LOG_MAX_ROWS;
        store.commit(&[batch("c", 7, 1)]).expect("commit");
        assert_eq!(
            table(&store, folded),
            [("a".into(), 2), ("b".into(), 3), ("c".into(), 7)]
        );
        assert_eq!(store.seq_log_rows, 0);
        let log: i64 = store
            .conn
            .query_row("SELECT count(*) FROM seq_log", [], |r| r.get(0))
            .expect("count");
        assert_eq!(log, 0);

        // A purged device's mark goes, also when it was waiting in the log: its next
        // first batch is new.
        store.commit(&[batch("a", 3, 1)]).expect("commit");
        assert_eq!(store.purge("a").expect("purge"), 3);
        assert!(!table(&store, all).iter().any(|(d, _)| d == "a"));
        assert_eq!(
            store.commit(&[batch("a", 1, 1)]).expect("commit"),
            [Outcome::Stored]
        );
    }

    #[test]
    fn readings_wait_in_the_log_until_folded_and_read_the_same_before_and_after() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.db");
        let mut store = SqliteTelemetry::open(&path, Synchronous::Normal).expect("open");
        use crate::store::query::TelemetryQuery;
        let queries = crate::store::query::SqliteQuery::open(&path).expect("query");
        let count = |store: &SqliteTelemetry, table: &str| -> i64 {
            store
                .conn
                .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
                .expect("count")
        };
        // Five commits of one reading each, all at the same time: the later of a tie wins.
        let tie = |seq: u64| Batch {
            device: Arc::from("a"),
            seq,
            readings: vec![Reading {
                metric: truncated("m"),
                ts: 1_700_000_000_000,
                value: seq as f64,
            }],
        };
        let in_order = |store: &SqliteTelemetry| -> Vec<f64> {
            rows(
                store,
                "SELECT value FROM readings ORDER BY chunk, pos",
                |r| r.get(0),
            )
        };
        let last = || -> Vec<(f64, u64)> {
            let (rows, _) = queries
                .query(&crate::store::query::Query {
                    device: "a".into(),
                    metric: None,
                    from: 1_699_999_999_000,
                    until: 1_700_000_001_000,
                    window: Some((60_000, crate::store::query::Aggregate::Last)),
                    limit: 10,
                })
                .expect("query");
            rows.iter().map(|r| (r.value, r.count)).collect()
        };
        for seq in 1..=5 {
            store.commit(&[tie(seq)]).expect("commit");
        }
        // In the log, one chunk per commit; SQL and the query API read them.
        assert_eq!(count(&store, "reading_log"), 5);
        assert_eq!(count(&store, "reading_chunks"), 0);
        assert_eq!(in_order(&store), [1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(last(), [(5.0, 5)]);

        // A crash here (no fold): the next open folds them into one chunk, same order.
        drop(store);
        let mut store = SqliteTelemetry::open(&path, Synchronous::Normal).expect("reopen");
        assert_eq!(count(&store, "reading_log"), 0);
        assert_eq!(count(&store, "reading_chunks"), 1);
        assert_eq!(in_order(&store), [1.0, 2.0, 3.0, 4.0, 5.0]);
        assert_eq!(last(), [(5.0, 5)]);

        // Newer readings in the log still come after the folded ones.
        store.commit(&[tie(6)]).expect("commit");
        assert_eq!(in_order(&store), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(last(), [(6.0, 6)]);

        // A log older than the fold interval is folded by the next commit, in it, and so
        // is a full one.
        store.log_folded_at = Instant::now()
            .checked_sub(READING_FOLD_EVERY)
            .expect("an instant a second ago");
        store.commit(&[tie(7)]).expect("commit");
        assert_eq!(count(&store, "reading_log"), 0);
        store.commit(&[batch("b", 1, 3)]).expect("commit");
        store.log_readings = READING_LOG_MAX_READINGS;
        store.commit(&[batch("c", 1, 3)]).expect("commit");
        assert_eq!(count(&store, "reading_log"), 0);
        assert_eq!(store.log_readings, 0);
        assert_eq!(in_order(&store)[..7], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
        assert_eq!(last(), [(7.0, 7)]);

        // A fold merges up to a full chunk: three commits of 600 readings in one window
        // stay three chunks, in the order they were stored.
        for seq in 1..=3 {
            store.commit(&[batch("e", seq, 600)]).expect("commit");
        }
        store.log_readings = READING_LOG_MAX_READINGS;
        store.commit(&[batch("e", 4, 1)]).expect("commit");
        let sizes: Vec<i64> = rows(
            &store,
            "SELECT n FROM reading_chunks WHERE device = 'e' ORDER BY id",
            |r| r.get(0),
        );
        assert_eq!(sizes, [600, 600, 601]);
        assert_eq!(store.purge("e").expect("purge"), 1_801);

        // A purge takes a device's readings from the log too.
        store.commit(&[batch("d", 1, 4)]).expect("commit");
        assert_eq!(count(&store, "reading_log"), 1);
        assert_eq!(store.purge("d").expect("purge"), 4);
        assert_eq!(count(&store, "reading_log"), 0);
        assert_eq!(count(&store, "readings"), 13);
    }

    #[test]
    fn sql_reads_every_value_back_bit_exact() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("t.db");
        let mut store = SqliteTelemetry::open(&path, Synchronous::Normal).expect("open");
        let values = chunk::awkward_values(2_000);
        let batches: Vec<Batch> = values
            .chunks(64)
            .enumerate()
            .map(|(i, vs)| Batch {
                device: Arc::from("a"),
                seq: i as u64 + 1,
                readings: vs
                    .iter()
                    .map(|&value| Reading {
                        metric: truncated("m"),
                        ts: 1_700_000_000_000 + i as u64,
                        value,
                    })
                    .collect(),
            })
            .collect();
        store.commit(&batches).expect("commit");
        let mut stmt = store
            .conn
            .prepare("SELECT value FROM readings ORDER BY chunk, pos")
            .expect("prepare");
        let back: Vec<f64> = stmt
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(back.len(), values.len());
        for (sent, read) in values.iter().zip(&back) {
            assert_eq!(
                sent.to_bits(),
                read.to_bits(),
                "{sent:e} came back as {read:e}"
            );
        }
    }
}

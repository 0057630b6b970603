//! Telemetry queries: raw points or windows aggregated with mean/min/max/sum/count/last,
//! over a time range and an optional metric, with a row limit. The trait is what the API
//! uses; the SQLite implementation reads the embedded store.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params_from_iter, Connection, OpenFlags};
use serde::Serialize;

use super::{chunk, telemetry_db, StoreError};

/// Aggregation over a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Aggregate {
    /// Arithmetic mean.
    Mean,
    /// Minimum.
    Min,
    /// Maximum.
    Max,
    /// Sum.
    Sum,
    /// Number of readings.
    Count,
    /// The value with the latest timestamp.
    Last,
}

impl Aggregate {
    /// Parses `mean|min|max|sum|count|last`.
    pub fn parse(s: &str) -> Option<Aggregate> {
        Some(match s {
            "mean" | "avg" => Aggregate::Mean,
            "min" => Aggregate::Min,
            "max" => Aggregate::Max,
            "sum" => Aggregate::Sum,
            "count" => Aggregate::Count,
            "last" => Aggregate::Last,
            _ => return None,
        })
    }
}

/// A telemetry query. Times are ms since the epoch; `from` inclusive, `until` exclusive.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    /// The device.
    pub device: String,
    /// Only this metric, if set.
    pub metric: Option<String>,
    /// Range start (inclusive).
    pub from: u64,
    /// Range end (exclusive).
    pub until: u64,
    /// Window length in ms for aggregation; windows are aligned to the Unix epoch
    /// (like InfluxDB's `aggregateWindow`), so a window starts at a multiple of `every`.
    pub window: Option<(u64, Aggregate)>,
    /// Most rows returned.
    pub limit: usize,
}

/// One result row: a raw point (`count` = 1) or a window (`ts` = window start).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// Metric name.
    pub metric: String,
    /// Point time, or window start.
    pub ts: u64,
    /// The value or the aggregate.
    pub value: f64,
    /// Readings in the window (1 for raw points).
    pub count: u64,
}

/// Reads telemetry.
pub trait TelemetryQuery: Send + Sync {
    /// Runs a query. Rows are ordered by time, then metric. Returns the rows and whether
    /// the limit cut the result short.
    ///
    /// # Errors
    /// The store failed.
    fn query(&self, q: &Query) -> Result<(Vec<Row>, bool), StoreError>;
}

/// Queries against the embedded SQLite store, on a read-only connection (WAL lets it read
/// while the writer commits).
pub struct SqliteQuery {
    conn: Mutex<Connection>,
}

impl SqliteQuery {
    /// Opens a read-only connection to the database at `path`.
    ///
    /// # Errors
    /// The database cannot be opened.
    pub fn open(path: &Path) -> Result<SqliteQuery, StoreError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        Ok(SqliteQuery {
            conn: Mutex::new(conn),
        })
    }
}

impl TelemetryQuery for SqliteQuery {
    fn query(&self, q: &Query) -> Result<(Vec<Row>, bool), StoreError> {
        let conn = self
            .conn
            .lock()
            .map_err(|_| StoreError::Other("query lock poisoned".into()))?;
        let from = i64::try_from(q.from).unwrap_or(i64::MAX);
        let mut args: Vec<rusqlite::types::Value> = vec![
            q.device.clone().into(),
            from.into(),
            i64::try_from(q.until).unwrap_or(i64::MAX).into(),
            chunk::window_start(from).into(),
        ];
        let metric_filter = match &q.metric {
            Some(m) => {
                args.push(m.clone().into());
                "AND s.metric = ?5"
            }
            None => "",
        };
        // The readings of the device's chunks that can hold anything in the range: a
        // chunk covers one window, so its first reading is at or after the start of
        // `from`'s window (the index on (device, ts_first) finds them). Then those of the
        // reading log (a second or so of commits, scanned: it has no index), whose chunks
        // are newer than every folded one.
        let readings = format!(
            "(SELECT p.value ->> 0 AS series, p.value ->> 1 AS ts,
                     p.value ->> 2 AS value, c.id AS chunk, p.key AS pos
              FROM reading_chunks c, json_each(c.points) p
              WHERE c.device = ?1 AND c.ts_first >= ?4 AND c.ts_first < ?3
                AND c.ts_last >= ?2
              UNION ALL
              SELECT p.value ->> 0, p.value ->> 1, p.value ->> 2, l.id + {offset}, p.key
              FROM reading_log l, json_each(l.points) p
              WHERE l.device = ?1 AND l.ts_first < ?3 AND l.ts_last >= ?2)",
            offset = telemetry_db::LOG_CHUNK_OFFSET
        );
        // One more row than asked tells whether the limit cut the result.
        let fetch = q.limit.saturating_add(1) as i64;
        let sql = match q.window {
            None => format!(
                "SELECT s.metric, r.ts, r.value, 1 FROM {readings} r JOIN series s ON s.id = r.series
                 WHERE r.ts >= ?2 AND r.ts < ?3 {metric_filter}
                 ORDER BY r.ts, s.metric LIMIT {fetch}"
            ),
            Some((every, Aggregate::Last)) => {
                let every = every.max(1) as i64;
                // The latest reading per window; the order they were stored in breaks
                // ties between equal timestamps in favour of the later one.
                format!(
                    "SELECT metric, start, value, n FROM (
                       SELECT s.metric AS metric, (r.ts / {every}) * {every} AS start, r.value AS value,
                         count(*) OVER (PARTITION BY s.metric, r.ts / {every}) AS n,
                         row_number() OVER (PARTITION BY s.metric, r.ts / {every} ORDER BY r.ts DESC, r.chunk DESC, r.pos DESC) AS rn
                       FROM {readings} r JOIN series s ON s.id = r.series
                       WHERE r.ts >= ?2 AND r.ts < ?3 {metric_filter})
                     WHERE rn = 1 ORDER BY start, metric LIMIT {fetch}"
                )
            }
            Some((every, agg)) => {
                let every = every.max(1) as i64;
                let value = match agg {
                    Aggregate::Mean => "avg(r.value)",
                    Aggregate::Min => "min(r.value)",
                    Aggregate::Max => "max(r.value)",
                    Aggregate::Sum => "total(r.value)",
                    Aggregate::Count | Aggregate::Last => "count(*)",
                };
                format!(
                    "SELECT s.metric, (r.ts / {every}) * {every} AS start, {value}, count(*)
                     FROM {readings} r JOIN series s ON s.id = r.series
                     WHERE r.ts >= ?2 AND r.ts < ?3 {metric_filter}
                     GROUP BY s.metric, start ORDER BY start, s.metric LIMIT {fetch}"
                )
            }
        };
        let mut stmt = conn.prepare_cached(&sql)?;
        let rows = stmt.query_map(params_from_iter(args), |r| {
            Ok(Row {
                metric: r.get(0)?,
                ts: r.get::<_, i64>(1)? as u64,
                value: r.get(2)?,
                count: r.get::<_, i64>(3)? as u64,
            })
        })?;
        let mut out: Vec<Row> = rows.collect::<Result<_, _>>()?;
        let truncated = out.len() > q.limit;
        out.truncate(q.limit);
        Ok((out, truncated))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use schemas::message::truncated;
    use schemas::Reading;

    use super::*;
    use crate::config::Synchronous;
    use crate::store::sqlite_telemetry::SqliteTelemetry;
    use crate::store::{Batch, TelemetryStore};

    const H: u64 = chunk::CHUNK_SPAN_MS as u64;

    fn reading(metric: &str, ts: u64, value: f64) -> Reading {
        Reading {
            metric: truncated(metric),
            ts,
            value,
        }
    }

    /// A store with readings on both sides of window boundaries, and a tie (two readings
    /// of one metric at one time, stored in two commits).
    fn store() -> (tempfile::TempDir, SqliteQuery) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("q.db");
        let mut store = SqliteTelemetry::open(&path, Synchronous::Normal).expect("open");
        let batch = |seq, readings| Batch {
            device: Arc::from("a"),
            seq,
            readings,
        };
        store
            .commit(&[
                batch(
                    1,
                    vec![
                        reading("x", H - 100, 10.0),
                        reading("x", H - 500, 9.0),
                        reading("x", H + 100, 11.0),
                        reading("y", H + 50, 1.5),
                        reading("x", 2 * H + 7, 1.0),
                    ],
                ),
                batch(2, vec![reading("y", 3 * H, 99.0)]),
            ])
            .expect("commit");
        store
            .commit(&[batch(3, vec![reading("x", 2 * H + 7, 2.0)])])
            .expect("commit");
        (dir, SqliteQuery::open(&path).expect("query"))
    }

    fn ask(
        q: &SqliteQuery,
        metric: Option<&str>,
        from: u64,
        until: u64,
    ) -> Vec<(String, u64, f64)> {
        let (rows, _) = q
            .query(&Query {
                device: "a".into(),
                metric: metric.map(String::from),
                from,
                until,
                window: None,
                limit: 100,
            })
            .expect("query");
        rows.into_iter()
            .map(|r| (r.metric, r.ts, r.value))
            .collect()
    }

    #[test]
    fn raw_points_come_from_every_chunk_the_range_touches_and_nothing_else() {
        let (_dir, q) = store();
        let row = |m: &str, ts, v| (m.to_string(), ts, v);
        assert_eq!(
            ask(&q, None, H - 300, 3 * H),
            vec![
                row("x", H - 100, 10.0),
                row("y", H + 50, 1.5),
                row("x", H + 100, 11.0),
                row("x", 2 * H + 7, 1.0),
                row("x", 2 * H + 7, 2.0),
            ]
        );
        assert_eq!(
            ask(&q, Some("y"), 0, u64::MAX),
            vec![row("y", H + 50, 1.5), row("y", 3 * H, 99.0)]
        );
        assert_eq!(ask(&q, None, 2 * H + 8, 3 * H), vec![]);
    }

    #[test]
    fn windows_aggregate_and_the_later_of_a_tie_is_last() {
        let (_dir, q) = store();
        let agg = |aggregate| {
            q.query(&Query {
                device: "a".into(),
                metric: Some("x".into()),
                from: 0,
                until: 3 * H,
                window: Some((H, aggregate)),
                limit: 100,
            })
            .expect("query")
            .0
            .into_iter()
            .map(|r| (r.ts, r.value, r.count))
            .collect::<Vec<_>>()
        };
        assert_eq!(
            agg(Aggregate::Last),
            vec![(0, 10.0, 2), (H, 11.0, 1), (2 * H, 2.0, 2)]
        );
        assert_eq!(
            agg(Aggregate::Mean),
            vec![(0, 9.5, 2), (H, 11.0, 1), (2 * H, 1.5, 2)]
        );
        let (rows, truncated) = q
            .query(&Query {
                device: "a".into(),
                metric: None,
                from: 0,
                until: u64::MAX,
                window: None,
                limit: 3,
            })
            .expect("query");
        assert_eq!((rows.len(), truncated), (3, true));
    }
}

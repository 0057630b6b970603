//! Telemetry queries: raw points or windows aggregated with mean/min/max/sum/count/last,
//! over a time range and an optional metric, with a row limit. The trait is what the API
//! uses; the SQLite implementation reads the embedded store.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params_from_iter, Connection, OpenFlags};
use serde::Serialize;

use super::StoreError;

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
        let mut args: Vec<rusqlite::types::Value> = vec![
            q.device.clone().into(),
            (q.from as i64).into(),
            (q.until as i64).into(),
        ];
        let metric_filter = match &q.metric {
            Some(m) => {
                args.push(m.clone().into());
                "AND s.metric = ?4"
            }
            None => "",
        };
        // One more row than asked tells whether the limit cut the result.
        let fetch = q.limit.saturating_add(1) as i64;
        let sql = match q.window {
            None => format!(
                "SELECT s.metric, r.ts, r.value, 1 FROM readings r JOIN series s ON s.id = r.series
                 WHERE s.device = ?1 AND r.ts >= ?2 AND r.ts < ?3 {metric_filter}
                 ORDER BY r.ts, s.metric LIMIT {fetch}"
            ),
            Some((every, Aggregate::Last)) => {
                let every = every.max(1) as i64;
                // The latest reading per window; the rowid breaks ties between equal
                // timestamps in favour of the later insert.
                format!(
                    "SELECT metric, start, value, n FROM (
                       SELECT s.metric AS metric, (r.ts / {every}) * {every} AS start, r.value AS value,
                         count(*) OVER (PARTITION BY s.metric, r.ts / {every}) AS n,
                         row_number() OVER (PARTITION BY s.metric, r.ts / {every} ORDER BY r.ts DESC, r.rowid DESC) AS rn
                       FROM readings r JOIN series s ON s.id = r.series
                       WHERE s.device = ?1 AND r.ts >= ?2 AND r.ts < ?3 {metric_filter})
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
                     FROM readings r JOIN series s ON s.id = r.series
                     WHERE s.device = ?1 AND r.ts >= ?2 AND r.ts < ?3 {metric_filter}
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

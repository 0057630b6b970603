//! InfluxDB 2 telemetry backend: line-protocol writes through the `influxdb2` crate with a
//! durable disk spool for when InfluxDB is unreachable, and Flux queries for `hub query`
//! and the API.
//!
//! # Writes
//!
//! [`InfluxTelemetry`] is driven by the ingest writer thread. A group commit drops batches
//! at or below the device's high-water mark ([`SeqStore`]), turns the rest into line
//! protocol (`<measurement>,device=<id>,metric=<name> value=<float> <ms>`, written with
//! `precision=ms`) and writes it in one request. Then:
//!
//! - 2xx: InfluxDB has it; the marks are raised and the batches acknowledged.
//! - unreachable, timed out, 5xx or 429: the group is appended to the spool (fsynced) and
//!   acknowledged; the marks are raised at spool time too, because a spooled batch is
//!   durable, which keeps `Welcome.last_seq` right and lets re-sends be dropped.
//! - 422 (InfluxDB stored what it could and rejected points, e.g. older than the bucket's
//!   retention): acknowledged, logged as an error. Retrying could never succeed, and
//!   refusing would close every device in the group again and again.
//! - any other 4xx (bad token, missing bucket, ...): a configuration error. The commit
//!   fails, the ingest writer retries and then closes the devices with 1011, so they keep
//!   their data; the log says what to fix.
//!
//! While the spool holds anything, new groups go to the spool too, behind the older data,
//! and a drain thread writes it to InfluxDB in order, one request at a time, deleting it
//! only after InfluxDB accepted it. Every write to InfluxDB (direct or drain) holds one
//! writer lock, so there is at most one write in flight and nothing overtakes the spool.
//! The drain needs its own thread because the ingest writer sleeps while no device sends.
//!
//! Crashes are harmless because InfluxDB writes are idempotent: a point with the same
//! measurement, tag set and timestamp replaces the old one. A crash between a write and
//! the mark raise, or between a drain write and the spool head moving, re-writes the same
//! points. The flip side: two readings of the same device and metric with the same
//! millisecond timestamp collapse into one point in InfluxDB (the SQLite store keeps both).
//!
//! # Queries
//!
//! [`InfluxQuery`] sends Flux to `POST /api/v2/query` and parses the annotated CSV
//! answer. The `influxdb2` crate's query path `unwrap()`s on response contents (the CSV
//! reader, float and time parsing), so the request is made here and the answer read with
//! the `csv` crate, its times with `humantime`. No InfluxDB 2 server can run on the
//! machines this is built on (VictoriaMetrics accepts the write API but has no Flux), so
//! the Flux path is tested against recorded InfluxDB 2 responses
//! (`hub/tests/fixtures/influx/`) served by a local HTTP server in the unit tests, which
//! also check the Flux text and headers sent.
//!
//! # Modules
//!
//! - `line_protocol`: batches as InfluxDB line protocol;
//! - `writer`: the one path to InfluxDB writes (the `influxdb2` client, timeouts,
//!   answers classified as accepted, unavailable or refused);
//! - `telemetry`: the write path, [`InfluxTelemetry`] (marks, group commits, direct
//!   write or spool);
//! - `spooling`: the spool shared with the drain thread, and the drain thread;
//! - `flux`: the Flux text of a query;
//! - `annotated_csv`: InfluxDB's annotated CSV answer, read with the `csv` crate;
//! - `query_api`: [`InfluxQuery`], the query client that ties the last two together.

mod annotated_csv;
mod flux;
mod line_protocol;
mod query_api;
mod spooling;
mod telemetry;
mod writer;

#[cfg(test)]
mod fake_influx;
#[cfg(test)]
mod query_tests;
#[cfg(test)]
mod write_tests;

use std::sync::{Mutex, MutexGuard, PoisonError};

pub use query_api::InfluxQuery;
pub use telemetry::InfluxTelemetry;

use super::spool::SpoolError;
use super::StoreError;
use crate::config::InfluxConfig;

/// The latest time InfluxDB can store, in ms since the epoch (`i64::MAX` ns,
/// 2262-04-11T23:47:16.854Z). Later readings cannot be written and are dropped.
pub const MAX_TIME_MS: u64 = (i64::MAX / 1_000_000) as u64;
/// How often a growing spool or a lasting refusal is logged again.
const REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// Why the InfluxDB backend failed.
#[derive(Debug, thiserror::Error)]
pub enum InfluxError {
    /// The `storage.influxdb.*` settings cannot work.
    #[error("storage.influxdb: {0}")]
    Config(String),
    /// InfluxDB could not be reached, timed out, or answered 5xx or 429.
    #[error("InfluxDB unavailable: {0}")]
    Unavailable(String),
    /// InfluxDB refused the request for a reason retrying will not fix.
    #[error("InfluxDB refused the write with HTTP {status}: {message}. {hint}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// InfluxDB's message.
        message: String,
        /// What to fix.
        hint: &'static str,
    },
    /// The spool failed (full, or a disk error).
    #[error("telemetry spool: {0}")]
    Spool(#[from] SpoolError),
    /// A Flux query failed.
    #[error("InfluxDB query failed: {0}")]
    Query(String),
    /// The backend is shutting down.
    #[error("the InfluxDB writer is shutting down")]
    Cancelled,
}

impl From<InfluxError> for StoreError {
    fn from(e: InfluxError) -> StoreError {
        match e {
            // InfluxDB answered and refused: retrying the same query will not help.
            InfluxError::Query(_) => StoreError::Refused(e.to_string()),
            e => StoreError::Other(e.to_string()),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not wedge ingest; the data behind these locks stays valid.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Checks the URL up front: the `influxdb2` client panics on one it cannot parse, and it
/// replaces the URL's path with `/api/v2/...`, so a path prefix would silently be lost.
fn check_url(url: &str) -> Result<(), InfluxError> {
    let uri: ureq::http::Uri = url
        .parse()
        .map_err(|e| InfluxError::Config(format!("url `{url}` is not a URL: {e}")))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(InfluxError::Config(format!(
            "url `{url}` must start with http:// or https://"
        )));
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(InfluxError::Config(format!("url `{url}` has no host")));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(InfluxError::Config(format!(
            "url `{url}` must be just scheme://host:port: the InfluxDB client ignores paths (put a reverse proxy's prefix on its side)"
        )));
    }
    Ok(())
}

/// The measurement from the config (default `telemetry`), checked against line protocol.
fn measurement_of(cfg: &InfluxConfig) -> Result<String, InfluxError> {
    let m = if cfg.measurement.is_empty() {
        "telemetry"
    } else {
        cfg.measurement.as_str()
    };
    if m.starts_with('#') || m.starts_with('_') || m.contains(['\n', '\r']) {
        return Err(InfluxError::Config(format!(
            "measurement `{m}` cannot be written: it must not start with `#` (a comment) or `_` (reserved by InfluxDB) nor contain line breaks"
        )));
    }
    Ok(m.to_string())
}

#[cfg(test)]
mod tests {
    use super::fake_influx::cfg;
    use super::*;

    #[test]
    fn settings_are_checked() {
        for bad in [
            "ftp://influx:8086",
            "http://",
            "http://influx:8086/prefix",
            "http://influx:8086?x=1",
            "not a url",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
        assert!(check_url("http://influx:8086").is_ok());
        assert!(check_url("https://eu-central-1-1.aws.cloud2.influxdata.com/").is_ok());
        let mut c = cfg("http://influx:8086");
        c.measurement = String::new();
        assert_eq!(measurement_of(&c).expect("default"), "telemetry");
        c.measurement = "_internal".into();
        assert!(measurement_of(&c).is_err());
        c.measurement = "#comment".into();
        assert!(InfluxQuery::new(&c).is_err());
    }
}

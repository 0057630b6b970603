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
//! reader, float and time parsing), so the request and the parser are written here. No
//! InfluxDB 2 server can run on the machines this is built on (VictoriaMetrics accepts the
//! write API but has no Flux), so the Flux path is tested against recorded InfluxDB 2
//! responses (`hub/tests/fixtures/influx/`) served by a local HTTP server in the unit
//! tests, which also check the Flux text and headers sent.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use influxdb2::api::write::TimestampPrecision;
use influxdb2::RequestError;

use super::query::{Aggregate, Query, Row, TelemetryQuery};
use super::spool::{Spool, SpoolError, SpoolOptions};
use super::{Batch, Outcome, SeqStore, StoreError, TelemetryStore};
use crate::config::InfluxConfig;

/// The latest time InfluxDB can store, in ms since the epoch (`i64::MAX` ns,
/// 2262-04-11T23:47:16.854Z). Later readings cannot be written and are dropped.
pub const MAX_TIME_MS: u64 = (i64::MAX / 1_000_000) as u64;
/// Most line protocol sent in one drain request.
const DRAIN_CHUNK_BYTES: u64 = 2 << 20;
/// First wait before retrying InfluxDB after a failure; doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(250);
/// Longest wait between attempts to reach InfluxDB while data is spooled.
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How often a growing spool or a lasting refusal is logged again.
const REPORT_EVERY: Duration = Duration::from_secs(30);
/// Most devices whose marks are cached; the cache is cleared when full (it is only a
/// cache: the marks are in the [`SeqStore`]).
const MARK_CACHE_LIMIT: usize = 1_000_000;
/// Largest query answer read, in bytes (100,000 rows of two results fit comfortably).
const QUERY_BODY_LIMIT: u64 = 64 << 20;
/// Queries are analyst-driven and may scan a lot; they get at least this long.
const QUERY_MIN_TIMEOUT: Duration = Duration::from_secs(30);

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

// ---------------------------------------------------------------------------------------
// Line protocol

fn escape_into(out: &mut Vec<u8>, s: &str, special: &[u8]) {
    for b in s.bytes() {
        if b == b'\\' || special.contains(&b) {
            out.push(b'\\');
        }
        out.push(b);
    }
}

/// Appends the line protocol of a batch; returns the points written and the readings
/// dropped because InfluxDB cannot represent them (a time after [`MAX_TIME_MS`], a value
/// that is not finite, a name with a line break; the hub's validation admits none of the
/// last two, but a bad line would fail the whole request).
fn encode_batch(out: &mut Vec<u8>, measurement: &str, batch: &Batch) -> (u32, u64) {
    use std::io::Write as _;
    let mut points = 0;
    let mut dropped = 0;
    let bad_name = |s: &str| s.is_empty() || s.contains(['\n', '\r']);
    for r in &batch.readings {
        if r.ts > MAX_TIME_MS
            || !r.value.is_finite()
            || bad_name(&batch.device)
            || bad_name(&r.metric)
        {
            dropped += 1;
            continue;
        }
        escape_into(out, measurement, b", ");
        out.extend_from_slice(b",device=");
        escape_into(out, &batch.device, b",= ");
        out.extend_from_slice(b",metric=");
        escape_into(out, &r.metric, b",= ");
        // `{:?}` is the shortest text that reads back as the same f64 (`1.0`, `1e21`),
        // which line protocol parses as a float.
        let _ = writeln!(out, " value={:?} {}", r.value, r.ts);
        points += 1;
    }
    (points, dropped)
}

// ---------------------------------------------------------------------------------------
// The one path to InfluxDB writes

/// How InfluxDB took a write.
enum Accepted {
    /// Every point.
    All,
    /// Some points were rejected for good (422); InfluxDB's message says which.
    Partial(String),
}

/// The `influxdb2` client on a small current-thread runtime of its own. Behind a mutex
/// in [`Shared`]: holding it is what makes writes one at a time and in order.
struct Writer {
    rt: tokio::runtime::Runtime,
    client: influxdb2::Client,
    org: String,
    bucket: String,
    timeout: Duration,
}

impl Writer {
    fn new(cfg: &InfluxConfig) -> Result<Writer, InfluxError> {
        check_url(&cfg.url)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| {
                InfluxError::Config(format!("cannot start the InfluxDB client runtime: {e}"))
            })?;
        let (url, org, token) = (cfg.url.clone(), cfg.org.clone(), cfg.token.clone());
        // `Client::new` panics if it cannot parse the URL or build its HTTP client; the URL
        // was checked above, this only keeps a surprise from taking the hub down.
        let client = std::panic::catch_unwind(move || influxdb2::Client::new(url, org, token))
            .map_err(|_| {
                InfluxError::Config(format!("the InfluxDB client rejected url `{}`", cfg.url))
            })?;
        Ok(Writer {
            rt,
            client,
            org: cfg.org.clone(),
            bucket: cfg.bucket.clone(),
            timeout: cfg.timeout,
        })
    }

    /// Writes line protocol (ms precision), waiting at most the configured timeout, or
    /// until `cancel` is notified.
    fn write(
        &self,
        body: &[u8],
        cancel: Option<&tokio::sync::Notify>,
    ) -> Result<Accepted, InfluxError> {
        let started = Instant::now();
        let result = self.write_once(body, cancel).or_else(|e| match e {
            // A keep-alive connection that InfluxDB closed while idle fails the first
            // request sent on it; one immediate retry on a fresh connection covers that.
            // Re-sending is safe: writes are idempotent.
            WriteFailure::Transport(_) => self.write_once(body, cancel),
            other => Err(other),
        });
        metrics::histogram!("hub_influx_write_seconds").record(started.elapsed().as_secs_f64());
        let outcome = match result {
            Ok(()) => Ok(Accepted::All),
            Err(WriteFailure::Cancelled) => Err(InfluxError::Cancelled),
            Err(WriteFailure::Timeout) => Err(InfluxError::Unavailable(format!(
                "no answer within {} (storage.influxdb.timeout)",
                humantime::format_duration(self.timeout)
            ))),
            Err(WriteFailure::Transport(why) | WriteFailure::Unreachable(why)) => {
                Err(InfluxError::Unavailable(why))
            }
            Err(WriteFailure::Status(status, text)) => self.classify(status, &text),
        };
        let label = match &outcome {
            Ok(Accepted::All) => "ok",
            Ok(Accepted::Partial(_)) => "partial",
            Err(InfluxError::Unavailable(_)) => "unavailable",
            Err(InfluxError::Cancelled) => "cancelled",
            Err(_) => "refused",
        };
        metrics::counter!("hub_influx_writes_total", "result" => label).increment(1);
        outcome
    }

    fn write_once(
        &self,
        body: &[u8],
        cancel: Option<&tokio::sync::Notify>,
    ) -> Result<(), WriteFailure> {
        let request = self.client.write_line_protocol_with_precision(
            &self.org,
            &self.bucket,
            body.to_vec(),
            TimestampPrecision::Milliseconds,
        );
        let result = self.rt.block_on(async {
            // Created inside the runtime: the timer needs its time driver.
            let timed = tokio::time::timeout(self.timeout, request);
            match cancel {
                Some(cancel) => tokio::select! {
                    r = timed => Some(r),
                    () = cancel.notified() => None,
                },
                None => Some(timed.await),
            }
        });
        match result {
            None => Err(WriteFailure::Cancelled),
            Some(Err(_elapsed)) => Err(WriteFailure::Timeout),
            Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(RequestError::Http { status, text }))) => {
                // The crate treats anything but 204 as an error; any 2xx is success.
                if status.is_success() {
                    Ok(())
                } else {
                    Err(WriteFailure::Status(status.as_u16(), text))
                }
            }
            Some(Ok(Err(RequestError::ReqwestProcessing { source }))) => {
                let why = error_chain(&source);
                if source.is_connect() || source.is_timeout() {
                    Err(WriteFailure::Unreachable(why))
                } else {
                    Err(WriteFailure::Transport(why))
                }
            }
            Some(Ok(Err(other))) => Err(WriteFailure::Unreachable(other.to_string())),
        }
    }

    fn classify(&self, status: u16, text: &str) -> Result<Accepted, InfluxError> {
        let message = influx_message(text);
        let hint = match status {
            200..=299 => return Ok(Accepted::All),
            422 => return Ok(Accepted::Partial(message)),
            429 | 500..=599 => {
                return Err(InfluxError::Unavailable(format!("HTTP {status}: {message}")))
            }
            400 => "InfluxDB could not parse the points: if the bucket has an explicit schema, it must accept the float field `value` with tags `device` and `metric`",
            401 => "Check storage.influxdb.token: it must be a valid API token",
            403 => "The token in storage.influxdb.token needs write permission on the bucket",
            404 => "Check storage.influxdb.org and storage.influxdb.bucket: they must name an existing organisation and bucket",
            413 => "The request is larger than InfluxDB accepts: lower ingest.max_group",
            300..=399 => "Check storage.influxdb.url: InfluxDB redirected the request (http vs https?)",
            _ => "Check the storage.influxdb.* settings",
        };
        Err(InfluxError::Refused {
            status,
            message,
            hint,
        })
    }
}

enum WriteFailure {
    Cancelled,
    Timeout,
    /// Could not connect, or the client's own timeout fired: InfluxDB is not there.
    Unreachable(String),
    /// The connection failed mid-request (worth one immediate retry).
    Transport(String),
    Status(u16, String),
}

/// An error and its sources, e.g. "error sending request: ... : Connection refused".
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

/// InfluxDB answers errors as `{"code": "...", "message": "..."}`; returns the message
/// (or the trimmed body), at most 500 characters.
fn influx_message(body: &str) -> String {
    let message = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("message")
                .and_then(|m| m.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| body.trim().to_string());
    let mut message: String = message.chars().take(500).collect();
    if message.is_empty() {
        message.push_str("(no message)");
    }
    message
}

// ---------------------------------------------------------------------------------------
// The backend

/// Spool state shared by the ingest writer (appends) and the drain thread (reads, advances).
struct SpoolState {
    spool: Spool,
    /// When the drain thread may try InfluxDB again.
    retry_at: Instant,
    backoff: Duration,
    /// Set while InfluxDB refuses spooled data (4xx): new commits fail instead of
    /// spooling behind data that cannot drain, just as a refused direct write fails.
    refused: Option<String>,
    /// Set while the spool is in use: since when, why, and how much went into it.
    outage: Option<Outage>,
    last_report: Instant,
    /// When a full spool was last reported (it refuses every commit while full).
    last_full_report: Option<Instant>,
}

struct Outage {
    since: Instant,
    records: u64,
    points: u64,
}

impl SpoolState {
    fn publish(&self) {
        metrics::gauge!("hub_spool_bytes").set(self.spool.bytes() as f64);
        metrics::gauge!("hub_spool_records").set(self.spool.records() as f64);
    }

    fn percent_full(&self) -> f64 {
        if self.spool.max_bytes() == 0 {
            100.0
        } else {
            self.spool.bytes() as f64 * 100.0 / self.spool.max_bytes() as f64
        }
    }
}

struct Shared {
    state: Mutex<SpoolState>,
    /// Wakes the drain thread: data spooled, or shutting down.
    wake: Condvar,
    writer: Mutex<Writer>,
    stop: AtomicBool,
    /// Cancels a drain write in flight at shutdown.
    cancel: tokio::sync::Notify,
}

/// Writes telemetry to InfluxDB, spooling to disk when it is unreachable. Owned by the
/// ingest writer thread; its calls block. Dropping it stops the drain thread (whatever is
/// spooled stays on disk for the next start).
pub struct InfluxTelemetry {
    shared: Arc<Shared>,
    seq: Box<dyn SeqStore>,
    /// Cached high-water marks (never above the [`SeqStore`]'s).
    marks: HashMap<Arc<str>, u64>,
    measurement: String,
    lines: Vec<u8>,
    drainer: Option<JoinHandle<()>>,
    last_refusal_log: Option<Instant>,
}

impl InfluxTelemetry {
    /// Opens the backend: checks the settings, recovers the spool in `spool_dir` (raising
    /// the marks of everything in it, in case the hub died between spooling and raising),
    /// and starts the drain thread. Does not contact InfluxDB: the hub starts while
    /// InfluxDB is down, and spools.
    ///
    /// # Errors
    /// The settings are unusable, the spool cannot be opened, or the marks cannot be raised.
    pub fn open(
        cfg: &InfluxConfig,
        spool_dir: &Path,
        mut seq: Box<dyn SeqStore>,
    ) -> Result<InfluxTelemetry, StoreError> {
        let measurement = measurement_of(cfg)?;
        let writer = Writer::new(cfg)?;
        let (spool, recovery) =
            Spool::open(spool_dir, SpoolOptions::for_capacity(cfg.spool_max_bytes))
                .map_err(InfluxError::from)?;
        let dir = spool_dir.display().to_string();
        if recovery.truncated_bytes > 0 {
            tracing::warn!(spool = %dir, bytes = recovery.truncated_bytes, "cut off a torn record at the end of the telemetry spool (an append interrupted by a crash; it was never acknowledged)");
        }
        if recovery.corrupt_bytes > 0 {
            tracing::error!(spool = %dir, bytes = recovery.corrupt_bytes, "telemetry spool data failed its CRC and was discarded: the disk corrupted acknowledged readings");
        }
        if recovery.head_reset {
            tracing::warn!(spool = %dir, "the spool's head pointer was unreadable: draining from the oldest segment again (InfluxDB replaces re-written points)");
        }
        if !recovery.marks.is_empty() {
            seq.raise(&recovery.marks)?;
        }
        if recovery.records > 0 {
            tracing::warn!(spool = %dir, records = recovery.records, readings = recovery.points, bytes = recovery.bytes, "telemetry spool holds data from a previous run; draining it to InfluxDB in order");
        }
        let state = SpoolState {
            spool,
            retry_at: Instant::now(),
            backoff: RETRY_MIN,
            refused: None,
            outage: (recovery.records > 0).then(|| Outage {
                since: Instant::now(),
                records: recovery.records,
                points: recovery.points,
            }),
            last_report: Instant::now(),
            last_full_report: None,
        };
        state.publish();
        let shared = Arc::new(Shared {
            state: Mutex::new(state),
            wake: Condvar::new(),
            writer: Mutex::new(writer),
            stop: AtomicBool::new(false),
            cancel: tokio::sync::Notify::new(),
        });
        let drain_shared = shared.clone();
        let drainer = std::thread::Builder::new()
            .name("influx-drain".into())
            .spawn(move || drain_loop(&drain_shared))
            .map_err(|e| StoreError::Other(format!("cannot start the spool drain thread: {e}")))?;
        Ok(InfluxTelemetry {
            shared,
            seq,
            marks: HashMap::new(),
            measurement,
            lines: Vec::new(),
            drainer: Some(drainer),
            last_refusal_log: None,
        })
    }

    /// Records and bytes currently in the spool.
    pub fn spooled(&self) -> (u64, u64) {
        let st = lock(&self.shared.state);
        (st.spool.records(), st.spool.bytes())
    }

    fn mark(&mut self, device: &Arc<str>) -> Result<u64, StoreError> {
        if let Some(&m) = self.marks.get(device) {
            return Ok(m);
        }
        let m = self.seq.get(device)?;
        self.remember(device.clone(), m);
        Ok(m)
    }

    fn remember(&mut self, device: Arc<str>, seq: u64) {
        if self.marks.len() >= MARK_CACHE_LIMIT && !self.marks.contains_key(&device) {
            self.marks.clear();
        }
        let m = self.marks.entry(device).or_insert(0);
        *m = (*m).max(seq);
    }

    fn raise(&mut self, marks: &[(Arc<str>, u64)]) -> Result<(), StoreError> {
        self.seq.raise(marks)?;
        for (device, seq) in marks {
            self.remember(device.clone(), *seq);
        }
        Ok(())
    }

    /// Appends the group to the spool and wakes the drain thread.
    fn spool(
        &self,
        marks: &[(Arc<str>, u64)],
        points: u32,
        reason: Option<&str>,
    ) -> Result<(), InfluxError> {
        let mut st = lock(&self.shared.state);
        let was_empty = st.spool.is_empty();
        if let Err(e) = st.spool.append(marks, points, &self.lines) {
            let now = Instant::now();
            let report = st
                .last_full_report
                .is_none_or(|t| now.duration_since(t) >= REPORT_EVERY);
            if let (SpoolError::Full { .. }, true) = (&e, report) {
                st.last_full_report = Some(now);
                tracing::error!(spool = %st.spool.dir().display(), error = %e, "telemetry spool is full and InfluxDB is still unavailable: refusing batches (devices are closed with 1011 and keep their data); raise storage.influxdb.spool_max_bytes or bring InfluxDB back");
            }
            if let SpoolError::Full { .. } = e {
                metrics::counter!("hub_spool_full_total").increment(1);
            }
            return Err(e.into());
        }
        metrics::counter!("hub_spool_appends_total").increment(1);
        let now = Instant::now();
        if was_empty {
            st.retry_at = now + RETRY_MIN;
            st.backoff = RETRY_MIN;
            st.last_report = now;
            st.outage = Some(Outage {
                since: now,
                records: 0,
                points: 0,
            });
            tracing::warn!(
                reason = reason.unwrap_or("unknown"),
                spool = %st.spool.dir().display(),
                max_bytes = st.spool.max_bytes(),
                "InfluxDB is unavailable: acknowledging telemetry from a durable disk spool; it drains to InfluxDB in order once InfluxDB is back"
            );
        } else if now.duration_since(st.last_report) >= REPORT_EVERY {
            st.last_report = now;
            tracing::warn!(
                records = st.spool.records(),
                bytes = st.spool.bytes(),
                percent_full = format!("{:.1}", st.percent_full()),
                "telemetry spool is growing: InfluxDB is still unavailable"
            );
        }
        if let Some(outage) = st.outage.as_mut() {
            outage.records += 1;
            outage.points += u64::from(points);
        }
        st.publish();
        drop(st);
        self.shared.wake.notify_one();
        Ok(())
    }

    fn log_refusal(&mut self, err: &InfluxError) {
        let now = Instant::now();
        if self
            .last_refusal_log
            .is_none_or(|t| now.duration_since(t) >= REPORT_EVERY)
        {
            self.last_refusal_log = Some(now);
            tracing::error!(error = %err, "InfluxDB refuses telemetry writes: devices are being refused (1011) and keep their data until this is fixed");
        }
    }
}

impl TelemetryStore for InfluxTelemetry {
    fn last_seq(&mut self, device: &str) -> Result<u64, StoreError> {
        // Always ask the mark store: another node may have raised it (cluster mode).
        let stored = self.seq.get(device)?;
        let device: Arc<str> = Arc::from(device);
        self.remember(device.clone(), stored);
        Ok(self.marks.get(&device).copied().unwrap_or(stored))
    }

    fn commit(&mut self, batches: &[Batch]) -> Result<Vec<Outcome>, StoreError> {
        let mut outcomes = Vec::with_capacity(batches.len());
        // Marks as this group raises them, so a repeated batch within it is a duplicate too.
        let mut raised: HashMap<Arc<str>, u64> = HashMap::new();
        let mut lines = std::mem::take(&mut self.lines);
        lines.clear();
        let mut points = 0u32;
        let mut dropped = 0u64;
        for b in batches {
            let stored = match raised.get(&b.device) {
                Some(&m) => m,
                None => self.mark(&b.device)?,
            };
            if b.seq <= stored {
                outcomes.push(Outcome::Duplicate);
                continue;
            }
            let (p, d) = encode_batch(&mut lines, &self.measurement, b);
            points += p;
            dropped += d;
            raised.insert(b.device.clone(), b.seq);
            outcomes.push(Outcome::Stored);
        }
        self.lines = lines;
        if dropped > 0 {
            metrics::counter!("hub_influx_points_dropped_total").increment(dropped);
            tracing::warn!(dropped, "dropped readings InfluxDB cannot store (a time after 2262-04-11, or a value that is not finite)");
        }
        if raised.is_empty() {
            return Ok(outcomes);
        }
        let marks: Vec<(Arc<str>, u64)> = raised.into_iter().collect();
        if self.lines.is_empty() {
            // Nothing representable: the batches are done all the same.
            self.raise(&marks)?;
            return Ok(outcomes);
        }
        let direct = {
            let mut st = lock(&self.shared.state);
            // Also here, not only on spool changes: the metrics recorder may be installed
            // after `open` ran, and the gauges should show up as zero all the same.
            st.publish();
            let empty = st.spool.is_empty();
            if empty {
                // Nothing refused is waiting any more.
                st.refused = None;
            } else if let Some(why) = &st.refused {
                return Err(StoreError::Other(format!(
                    "InfluxDB refuses the spooled telemetry ({why}); not accepting more until it drains"
                )));
            }
            empty
        };
        // Only this thread appends to the spool, so it stays empty until we append: a
        // direct write cannot overtake spooled data.
        let reason = if direct {
            let result = lock(&self.shared.writer).write(&self.lines, None);
            match result {
                Ok(accepted) => {
                    if let Accepted::Partial(message) = accepted {
                        tracing::error!(%message, "InfluxDB rejected some points for good (HTTP 422: e.g. older than the bucket's retention, or a field type conflict); the rest are stored");
                    }
                    self.raise(&marks)?;
                    return Ok(outcomes);
                }
                Err(InfluxError::Unavailable(why)) => Some(why),
                Err(err) => {
                    self.log_refusal(&err);
                    return Err(err.into());
                }
            }
        } else {
            None
        };
        self.spool(&marks, points, reason.as_deref())?;
        // The batches are durable in the spool: acknowledge them like stored ones.
        self.raise(&marks)?;
        Ok(outcomes)
    }
}

impl Drop for InfluxTelemetry {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.cancel.notify_one();
        {
            // Under the lock, so the drain thread cannot miss the wake-up between its
            // check of `stop` and its wait.
            let _st = lock(&self.shared.state);
            self.shared.wake.notify_all();
        }
        if let Some(drainer) = self.drainer.take() {
            let _ = drainer.join();
        }
    }
}

/// The drain thread: waits for spooled data, writes it to InfluxDB in order, and moves the
/// spool's head only after InfluxDB accepted it. Backs off while InfluxDB is unavailable.
fn drain_loop(shared: &Shared) {
    loop {
        let chunk = {
            let mut st = lock(&shared.state);
            loop {
                if shared.stop.load(Ordering::Acquire) {
                    return;
                }
                let now = Instant::now();
                if !st.spool.is_empty() && now >= st.retry_at {
                    break;
                }
                let wait = if st.spool.is_empty() {
                    Duration::from_secs(3600)
                } else {
                    st.retry_at - now
                };
                st = shared
                    .wake
                    .wait_timeout(st, wait)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            match st.spool.read_chunk(DRAIN_CHUNK_BYTES) {
                Ok(Some(chunk)) => chunk,
                Ok(None) => continue,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the telemetry spool");
                    st.retry_at = Instant::now() + RETRY_MAX;
                    st.publish();
                    continue;
                }
            }
        };
        let mut body = Vec::with_capacity(chunk.records.iter().map(|r| r.lines.len()).sum());
        for record in &chunk.records {
            body.extend_from_slice(&record.lines);
        }
        let result = lock(&shared.writer).write(&body, Some(&shared.cancel));
        let mut st = lock(&shared.state);
        let now = Instant::now();
        match result {
            Ok(accepted) => {
                if let Accepted::Partial(message) = accepted {
                    tracing::error!(%message, "InfluxDB rejected some spooled points for good (HTTP 422: e.g. older than the bucket's retention); the rest are stored");
                }
                let records = chunk.records.len() as u64;
                if let Err(e) = st.spool.advance(chunk.end) {
                    // The data is in InfluxDB; at worst it is written again later.
                    tracing::error!(error = %e, "cannot advance the telemetry spool");
                    st.retry_at = now + RETRY_MAX;
                    st.publish();
                    continue;
                }
                metrics::counter!("hub_spool_drained_records_total").increment(records);
                st.backoff = RETRY_MIN;
                st.retry_at = now;
                if st.refused.take().is_some() {
                    tracing::info!("InfluxDB accepts spooled telemetry again");
                }
                if st.spool.is_empty() {
                    let (since, records, points) = st
                        .outage
                        .take()
                        .map_or((now, 0, 0), |o| (o.since, o.records, o.points));
                    tracing::info!(
                        records,
                        readings = points,
                        after = %humantime::format_duration(Duration::from_secs(now.duration_since(since).as_secs())),
                        "telemetry spool drained into InfluxDB; writing directly again"
                    );
                }
            }
            Err(InfluxError::Cancelled) => return,
            Err(err) => {
                st.retry_at = now + st.backoff;
                st.backoff = (st.backoff * 2).min(RETRY_MAX);
                let refused = !matches!(err, InfluxError::Unavailable(_));
                // A refusal is news the first time; after that, like unavailability, it
                // is repeated every REPORT_EVERY.
                let first_refusal = refused && st.refused.is_none();
                if refused {
                    st.refused = Some(err.to_string());
                }
                if first_refusal || now.duration_since(st.last_report) >= REPORT_EVERY {
                    st.last_report = now;
                    if refused {
                        tracing::error!(error = %err, records = st.spool.records(), "InfluxDB refuses spooled telemetry: it cannot drain until this is fixed, and new batches are refused meanwhile");
                    } else {
                        tracing::warn!(error = %err, records = st.spool.records(), bytes = st.spool.bytes(), percent_full = format!("{:.1}", st.percent_full()), "InfluxDB still unavailable; telemetry stays in the spool");
                    }
                }
            }
        }
        st.publish();
    }
}

// ---------------------------------------------------------------------------------------
// Queries

/// Flux queries against InfluxDB (`POST /api/v2/query`, annotated CSV back). Blocking;
/// the API calls it from `spawn_blocking`. The HTTP client is `ureq` as the hub builds it,
/// without TLS: an `https://` InfluxDB gets a query error saying so (writes go through the
/// `influxdb2` client, which has TLS).
pub struct InfluxQuery {
    agent: ureq::Agent,
    endpoint: String,
    org: String,
    bucket: String,
    token: String,
    measurement: String,
}

impl InfluxQuery {
    /// A query client. Does not contact InfluxDB.
    ///
    /// # Errors
    /// The configuration is unusable.
    pub fn new(cfg: &InfluxConfig) -> Result<InfluxQuery, StoreError> {
        check_url(&cfg.url)?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(cfg.timeout.max(QUERY_MIN_TIMEOUT)))
            .build()
            .into();
        Ok(InfluxQuery {
            agent,
            endpoint: format!("{}/api/v2/query", cfg.url.trim_end_matches('/')),
            org: cfg.org.clone(),
            bucket: cfg.bucket.clone(),
            token: cfg.token.clone(),
            measurement: measurement_of(cfg)?,
        })
    }

    fn post(&self, flux: &str) -> Result<String, InfluxError> {
        // JSON rather than `application/vnd.flux`: only a JSON request can ask for the
        // annotation rows (`#datatype`, `#group`, `#default`); raw Flux gets plain CSV.
        let body = serde_json::json!({
            "query": flux,
            "type": "flux",
            "dialect": {
                "header": true,
                "delimiter": ",",
                "annotations": ["datatype", "group", "default"],
                "dateTimeFormat": "RFC3339",
            },
        })
        .to_string();
        let mut request = self
            .agent
            .post(&self.endpoint)
            .query("org", &self.org)
            .header("Content-Type", "application/json")
            .header("Accept", "application/csv");
        if !self.token.is_empty() {
            request = request.header("Authorization", &format!("Token {}", self.token));
        }
        let mut response = request.send(body.as_str()).map_err(|e| {
            InfluxError::Unavailable(format!("querying {}: {}", self.endpoint, error_chain(&e)))
        })?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .with_config()
            .limit(QUERY_BODY_LIMIT)
            .read_to_string()
            .map_err(|e| InfluxError::Query(format!("reading the answer: {}", error_chain(&e))))?;
        if status != 200 {
            let hint = match status {
                _ if text.contains("unsupported path requested") => {
                    " (the store has no Flux query API: VictoriaMetrics accepts InfluxDB writes but is queried with PromQL/MetricsQL, e.g. telemetry_value{device=\"...\"}; `hub query` needs InfluxDB 2)"
                }
                401 => " (check storage.influxdb.token)",
                403 => " (the token needs read permission on the bucket)",
                404 => " (check storage.influxdb.org and storage.influxdb.bucket)",
                _ => "",
            };
            return Err(InfluxError::Query(format!(
                "HTTP {status}: {}{hint}",
                influx_message(&text)
            )));
        }
        Ok(text)
    }
}

impl TelemetryQuery for InfluxQuery {
    fn query(&self, q: &Query) -> Result<(Vec<Row>, bool), StoreError> {
        let Some(flux) = flux_query(&self.bucket, &self.measurement, q) else {
            return Ok((Vec::new(), false));
        };
        let text = self.post(&flux)?;
        let rows = parse_flux_csv(&text)?;
        Ok(assemble(q, rows))
    }
}

/// A Flux string literal: backslash, double quote and the interpolation opener `${`
/// are escaped.
fn flux_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '$' if chars.peek() == Some(&'{') => out.push_str("\\$"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A Flux time literal for ms since the epoch (`2026-11-25T08:00:00.000Z`).
fn flux_time(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// The Flux for a query, or `None` when the range is empty once clamped to what InfluxDB
/// can hold. Raw points keep `_time`, `_value` and `metric`, sorted by time then metric,
/// with one row more than the limit to tell whether it cut the result. Windows use
/// `aggregateWindow` (epoch-aligned, like [`Query::window`]) twice, yielding the aggregate
/// as `agg` and the per-window count as `count`; `timeSrc: "_start"` puts each window's
/// start in `_time` (the first window's start is clipped to the range start by Flux and
/// is aligned again when parsed).
fn flux_query(bucket: &str, measurement: &str, q: &Query) -> Option<String> {
    let until = q.until.min(MAX_TIME_MS + 1);
    if q.from >= until {
        return None;
    }
    let mut filter = format!(
        "r._measurement == {} and r._field == \"value\" and r.device == {}",
        flux_str(measurement),
        flux_str(&q.device)
    );
    if let Some(metric) = &q.metric {
        filter.push_str(&format!(" and r.metric == {}", flux_str(metric)));
    }
    let source = format!(
        "from(bucket: {})\n  |> range(start: {}, stop: {})\n  |> filter(fn: (r) => {filter})",
        flux_str(bucket),
        flux_time(q.from),
        flux_time(until)
    );
    let n = q.limit.saturating_add(1);
    let shape = format!(
        "\n  |> keep(columns: [\"_time\", \"_value\", \"metric\"])\n  |> group()\n  |> sort(columns: [\"_time\", \"metric\"])\n  |> limit(n: {n})"
    );
    let Some((every, agg)) = q.window else {
        return Some(format!("{source}{shape}\n"));
    };
    let every = every.max(1);
    let window = |f: &str| {
        format!("\n  |> aggregateWindow(every: {every}ms, fn: {f}, createEmpty: false, timeSrc: \"_start\")")
    };
    let f = match agg {
        Aggregate::Mean => "mean",
        Aggregate::Min => "min",
        Aggregate::Max => "max",
        Aggregate::Sum => "sum",
        Aggregate::Last => "last",
        Aggregate::Count => {
            return Some(format!(
                "{source}{}{shape}\n  |> yield(name: \"count\")\n",
                window("count")
            ))
        }
    };
    Some(format!(
        "data = {source}\n\ndata{}{shape}\n  |> yield(name: \"agg\")\n\ndata{}{shape}\n  |> yield(name: \"count\")\n",
        window(f),
        window("count")
    ))
}

/// One data row of a Flux answer.
#[derive(Debug, Clone, PartialEq)]
struct FluxRow {
    result: String,
    time_ms: u64,
    value: f64,
    metric: String,
}

/// Turns Flux rows into query rows: raw points as they are, windows aligned to `every`
/// (Flux clips the first window's start to the range start) with the count of the
/// `count` result. Sorted by time then metric, cut at the limit.
fn assemble(q: &Query, rows: Vec<FluxRow>) -> (Vec<Row>, bool) {
    let mut out: Vec<Row> = match q.window {
        None => rows
            .into_iter()
            .map(|r| Row {
                metric: r.metric,
                ts: r.time_ms,
                value: r.value,
                count: 1,
            })
            .collect(),
        Some((every, agg)) => {
            let every = every.max(1);
            let mut counts: HashMap<(String, u64), u64> = HashMap::new();
            let mut values = Vec::new();
            for r in rows {
                let ts = r.time_ms - r.time_ms % every;
                match r.result.as_str() {
                    "count" => {
                        let n = r.value.max(0.0) as u64;
                        if agg == Aggregate::Count {
                            values.push(Row {
                                metric: r.metric,
                                ts,
                                value: r.value,
                                count: n,
                            });
                        } else {
                            counts.insert((r.metric, ts), n);
                        }
                    }
                    "agg" if agg != Aggregate::Count => values.push(Row {
                        metric: r.metric,
                        ts,
                        value: r.value,
                        count: 0,
                    }),
                    _ => {}
                }
            }
            if agg != Aggregate::Count {
                for row in &mut values {
                    // Both results come from the same data; a window missing from the
                    // count could only be a write landing between the two reads.
                    row.count = counts
                        .get(&(row.metric.clone(), row.ts))
                        .copied()
                        .unwrap_or(0);
                }
            }
            values
        }
    };
    out.sort_by(|a, b| a.ts.cmp(&b.ts).then_with(|| a.metric.cmp(&b.metric)));
    let truncated = out.len() > q.limit;
    out.truncate(q.limit);
    (out, truncated)
}

/// Splits CSV text (RFC 4180: quoted fields, `""` escapes, CRLF or LF line ends) into
/// records; an empty line becomes an empty record.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut records = Vec::new();
    let mut record: Vec<String> = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut line_has_content = false;
    while let Some(c) = chars.next() {
        match c {
            '"' if field.is_empty() => {
                line_has_content = true;
                while let Some(q) = chars.next() {
                    if q == '"' {
                        if chars.peek() == Some(&'"') {
                            chars.next();
                            field.push('"');
                        } else {
                            break;
                        }
                    } else {
                        field.push(q);
                    }
                }
            }
            ',' => {
                line_has_content = true;
                record.push(std::mem::take(&mut field));
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                if line_has_content || !field.is_empty() {
                    record.push(std::mem::take(&mut field));
                }
                records.push(std::mem::take(&mut record));
                line_has_content = false;
            }
            c => {
                line_has_content = true;
                field.push(c);
            }
        }
    }
    if line_has_content || !field.is_empty() {
        record.push(field);
        records.push(record);
    }
    records
}

/// Parses InfluxDB's CSV answer: tables separated by empty lines, each with optional
/// annotation rows (`#datatype`, `#group`, `#default`), a header row, then data rows whose
/// first column is empty. Columns are found by name; an empty cell takes the column's
/// `#default` (that is how the `result` name is sent). An `error` table is an error.
fn parse_flux_csv(text: &str) -> Result<Vec<FluxRow>, InfluxError> {
    let bad = |why: String| InfluxError::Query(format!("unexpected answer from InfluxDB: {why}"));
    let mut rows = Vec::new();
    let mut header: Option<Vec<String>> = None;
    let mut defaults: Vec<String> = Vec::new();
    for record in parse_csv(text) {
        if record.iter().all(String::is_empty) {
            // A table boundary: annotations and a header follow.
            header = None;
            defaults.clear();
            continue;
        }
        if record[0].starts_with('#') {
            if header.is_some() {
                header = None;
                defaults.clear();
            }
            if record[0] == "#default" {
                defaults = record;
            }
            continue;
        }
        let Some(columns) = &header else {
            header = Some(record);
            continue;
        };
        let cell = |name: &str| -> Option<&str> {
            let i = columns.iter().position(|c| c == name)?;
            match record.get(i).map(String::as_str) {
                Some("") | None => defaults.get(i).map(String::as_str),
                some => some,
            }
        };
        if columns.get(1).map(String::as_str) == Some("error") {
            let message = cell("error").unwrap_or("unknown error");
            let reference = cell("reference").filter(|r| !r.is_empty());
            return Err(InfluxError::Query(match reference {
                Some(r) => format!("{message} (reference {r})"),
                None => message.to_string(),
            }));
        }
        let time = cell("_time").ok_or_else(|| bad("no _time column".into()))?;
        let time_ns = parse_rfc3339_ns(time)
            .ok_or_else(|| bad(format!("`{time}` is not an RFC 3339 time")))?;
        let value = cell("_value").ok_or_else(|| bad("no _value column".into()))?;
        let value: f64 = value
            .parse()
            .map_err(|_| bad(format!("`{value}` is not a number")))?;
        rows.push(FluxRow {
            result: cell("result").unwrap_or("_result").to_string(),
            time_ms: u64::try_from(time_ns.div_euclid(1_000_000)).unwrap_or(0),
            value,
            metric: cell("metric").unwrap_or("").to_string(),
        });
    }
    Ok(rows)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (inverse of [`days_from_civil`]).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)` to ns since the epoch. InfluxDB
/// writes UTC with trailing zeros of the fraction removed (`...:20Z`, `...:20.5Z`).
fn parse_rfc3339_ns(s: &str) -> Option<i128> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    let sep = |i: usize, c: &[u8]| b.get(i).is_some_and(|x| c.contains(x));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut nanos: i128 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let digits = i - start;
        if digits == 0 {
            return None;
        }
        let frac = &s[start..i.min(start + 9)];
        nanos = i128::from(frac.parse::<i64>().ok()?) * 10i128.pow(9 - frac.len() as u32);
    }
    let offset_secs: i64 = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let secs = num(i + 1..i + 3)? * 3600 + num(i + 4..i + 6)? * 60;
            if *sign == b'+' {
                secs
            } else {
                -secs
            }
        }
        _ => return None,
    };
    let secs = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec - offset_secs;
    Some(i128::from(secs) * 1_000_000_000 + nanos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::path::PathBuf;
    use std::sync::atomic::AtomicUsize;

    use schemas::message::truncated;
    use schemas::Reading;

    const T: Duration = Duration::from_secs(15);

    /// A request the fake server received.
    #[derive(Debug, Clone)]
    struct Request {
        method: String,
        target: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    impl Request {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.body).into_owned()
        }
    }

    type Responder = dyn Fn(usize, &Request) -> (u16, String) + Send + Sync;

    /// A tiny HTTP/1.1 server on a loopback port standing in for InfluxDB: it records every
    /// request and answers the n-th with whatever `respond(n, request)` says, closing the
    /// connection after each answer.
    struct FakeInflux {
        port: u16,
        requests: Arc<Mutex<Vec<(Request, u16)>>>,
        stop: Arc<AtomicBool>,
        thread: Option<JoinHandle<()>>,
    }

    impl FakeInflux {
        fn start(
            respond: impl Fn(usize, &Request) -> (u16, String) + Send + Sync + 'static,
        ) -> FakeInflux {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let port = listener.local_addr().expect("addr").port();
            let requests = Arc::new(Mutex::new(Vec::new()));
            let stop = Arc::new(AtomicBool::new(false));
            let respond: Arc<Responder> = Arc::new(respond);
            let (reqs, halt) = (requests.clone(), stop.clone());
            let thread = std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if halt.load(Ordering::Acquire) {
                        break;
                    }
                    if let Ok(stream) = stream {
                        let _ = serve(stream, &reqs, &*respond);
                    }
                }
            });
            FakeInflux {
                port,
                requests,
                stop,
                thread: Some(thread),
            }
        }

        fn url(&self) -> String {
            format!("http://127.0.0.1:{}", self.port)
        }

        /// Requests so far, with the status each was answered with.
        fn requests(&self) -> Vec<(Request, u16)> {
            lock(&self.requests).clone()
        }
    }

    impl Drop for FakeInflux {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Release);
            let _ = TcpStream::connect(("127.0.0.1", self.port));
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn serve(
        stream: TcpStream,
        requests: &Mutex<Vec<(Request, u16)>>,
        respond: &Responder,
    ) -> std::io::Result<()> {
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let mut parts = line.split_whitespace();
        let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
            return Ok(());
        };
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            reader.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        let len = headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.parse::<usize>().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        reader.read_exact(&mut body)?;
        let request = Request {
            method: method.to_string(),
            target: target.to_string(),
            headers,
            body,
        };
        let n = lock(requests).len();
        let (status, answer) = respond(n, &request);
        lock(requests).push((request, status));
        let kind = if answer.starts_with('{') {
            "application/json; charset=utf-8"
        } else {
            "text/csv; charset=utf-8"
        };
        let mut out = stream;
        write!(
            out,
            "HTTP/1.1 {status} Fake\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
            answer.len()
        )?;
        out.flush()
    }

    /// High-water marks in memory, shared with the test.
    #[derive(Clone, Default)]
    struct MemSeq(Arc<Mutex<HashMap<String, u64>>>);

    impl MemSeq {
        fn mark(&self, device: &str) -> u64 {
            lock(&self.0).get(device).copied().unwrap_or(0)
        }
    }

    impl SeqStore for MemSeq {
        fn get(&mut self, device: &str) -> Result<u64, StoreError> {
            Ok(self.mark(device))
        }
        fn raise(&mut self, marks: &[(Arc<str>, u64)]) -> Result<(), StoreError> {
            let mut m = lock(&self.0);
            for (device, seq) in marks {
                let e = m.entry(device.to_string()).or_insert(0);
                *e = (*e).max(*seq);
            }
            Ok(())
        }
    }

    struct Dir(PathBuf);
    impl Dir {
        fn new(label: &str) -> Dir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "hub-influx-{label}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&path);
            Dir(path)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn cfg(url: &str) -> InfluxConfig {
        InfluxConfig {
            url: url.to_string(),
            org: "acme".into(),
            bucket: "fleet".into(),
            token: "s3cret".into(),
            measurement: "telemetry".into(),
            timeout: Duration::from_secs(2),
            spool_max_bytes: 1 << 20,
        }
    }

    /// A port nothing listens on.
    fn closed_url() -> String {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        format!("http://127.0.0.1:{port}")
    }

    const BASE_MS: u64 = 1_764_057_600_000; // 2025-11-25T08:00:00Z

    fn batch(device: &str, seq: u64, n: u64) -> Batch {
        Batch {
            device: Arc::from(device),
            seq,
            readings: (0..n)
                .map(|i| Reading {
                    metric: truncated(&format!("m{}", i % 2)),
                    ts: BASE_MS + seq * 10 + i,
                    value: (seq * 100 + i) as f64,
                })
                .collect(),
        }
    }

    /// The line protocol a batch becomes.
    fn lines_of(batches: &[Batch]) -> String {
        batches
            .iter()
            .flat_map(|b| {
                b.readings.iter().map(move |r| {
                    format!(
                        "telemetry,device={},metric={} value={:?} {}\n",
                        b.device, r.metric, r.value, r.ts
                    )
                })
            })
            .collect()
    }

    fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + T;
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn line_protocol_escapes_names_and_drops_unrepresentable_readings() {
        let b = Batch {
            device: Arc::from("dev 1,a=b\\"),
            seq: 1,
            readings: vec![
                Reading {
                    metric: truncated("temp"),
                    ts: 1000,
                    value: 21.5,
                },
                Reading {
                    metric: truncated("late"),
                    ts: MAX_TIME_MS + 1,
                    value: 1.0,
                },
                Reading {
                    metric: truncated("big"),
                    ts: 5,
                    value: 1e21,
                },
                Reading {
                    metric: truncated("one"),
                    ts: MAX_TIME_MS,
                    value: 1.0,
                },
                Reading {
                    metric: truncated("nan"),
                    ts: 7,
                    value: f64::NAN,
                },
            ],
        };
        let mut out = Vec::new();
        let (points, dropped) = encode_batch(&mut out, "tele metry,x", &b);
        assert_eq!((points, dropped), (3, 2));
        let tags = r"tele\ metry\,x,device=dev\ 1\,a\=b\\";
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            format!(
                "{tags},metric=temp value=21.5 1000\n{tags},metric=big value=1e21 5\n{tags},metric=one value=1.0 {MAX_TIME_MS}\n"
            )
        );
    }

    #[test]
    fn a_group_is_one_write_and_duplicates_are_dropped() {
        let server = FakeInflux::start(|_, _| (204, String::new()));
        let seq = MemSeq::default();
        let dir = Dir::new("direct");
        let mut store = InfluxTelemetry::open(&cfg(&server.url()), &dir.0, Box::new(seq.clone()))
            .expect("open");
        let group = [
            batch("a", 1, 3),
            batch("a", 2, 1),
            batch("a", 2, 1),
            batch("b", 1, 2),
        ];
        let out = store.commit(&group).expect("commit");
        assert_eq!(
            out,
            [
                Outcome::Stored,
                Outcome::Stored,
                Outcome::Duplicate,
                Outcome::Stored
            ]
        );
        let requests = server.requests();
        assert_eq!(requests.len(), 1);
        let (req, _) = &requests[0];
        assert_eq!(req.method, "POST");
        assert_eq!(
            req.target,
            "/api/v2/write?bucket=fleet&org=acme&precision=ms"
        );
        assert_eq!(req.header("authorization"), Some("Token s3cret"));
        assert_eq!(
            req.text(),
            lines_of(&[group[0].clone(), group[1].clone(), group[3].clone()])
        );
        assert_eq!((seq.mark("a"), seq.mark("b")), (2, 1));
        assert_eq!(store.last_seq("a").expect("seq"), 2);
        // A re-sent batch is acknowledged without a write.
        assert_eq!(
            store.commit(&[batch("a", 2, 1)]).expect("commit"),
            [Outcome::Duplicate]
        );
        assert_eq!(server.requests().len(), 1);
        assert_eq!(store.spooled(), (0, 0));
    }

    #[test]
    fn an_unavailable_influxdb_is_spooled_and_drained_in_order() {
        // The direct write and the drain's first retry get 503, then InfluxDB is back.
        let server = FakeInflux::start(|n, _| {
            if n < 2 {
                (503, r#"{"code":"unavailable","message":"too busy"}"#.into())
            } else {
                (204, String::new())
            }
        });
        let seq = MemSeq::default();
        let dir = Dir::new("drain");
        let mut store = InfluxTelemetry::open(&cfg(&server.url()), &dir.0, Box::new(seq.clone()))
            .expect("open");
        let first = [batch("a", 1, 4), batch("b", 7, 2)];
        assert_eq!(
            store.commit(&first).expect("commit"),
            [Outcome::Stored, Outcome::Stored]
        );
        // Acknowledged from the spool: the marks are up already.
        assert_eq!(store.last_seq("b").expect("seq"), 7);
        assert_eq!(store.spooled().0, 1);
        // InfluxDB may be back, but older data waits in the spool: this goes behind it.
        let second = [batch("a", 2, 3)];
        store.commit(&second).expect("commit");
        assert_eq!(seq.mark("a"), 2);
        wait_until("the spool to drain", || store.spooled() == (0, 0));
        let requests = server.requests();
        let accepted: String = requests
            .iter()
            .filter(|(_, s)| *s == 204)
            .map(|(r, _)| r.text())
            .collect();
        assert_eq!(
            accepted,
            format!("{}{}", lines_of(&first), lines_of(&second))
        );
        assert!(requests
            .iter()
            .all(|(r, _)| r.target.starts_with("/api/v2/write?")));
        // Drained: the next group is written directly.
        let before = requests.len();
        store.commit(&[batch("a", 3, 1)]).expect("commit");
        let requests = server.requests();
        assert_eq!(requests.len(), before + 1);
        assert_eq!(requests[before].0.text(), lines_of(&[batch("a", 3, 1)]));
    }

    #[test]
    fn an_unreachable_influxdb_is_spooled_and_a_full_spool_refuses() {
        let seq = MemSeq::default();
        let dir = Dir::new("full");
        let mut config = cfg(&closed_url());
        // Room for one small group, not two.
        config.spool_max_bytes = 150;
        let mut store =
            InfluxTelemetry::open(&config, &dir.0, Box::new(seq.clone())).expect("open");
        assert_eq!(
            store.commit(&[batch("a", 1, 1)]).expect("spooled"),
            [Outcome::Stored]
        );
        assert_eq!(seq.mark("a"), 1);
        let err = store.commit(&[batch("a", 2, 1)]).expect_err("full");
        assert!(err.to_string().contains("full"), "{err}");
        // Refused means not acknowledged: the mark stays, the device keeps the batch.
        assert_eq!(seq.mark("a"), 1);
        assert_eq!(store.spooled().0, 1);
    }

    #[test]
    fn a_refused_write_is_an_error_that_says_what_to_fix() {
        let server = FakeInflux::start(|_, _| {
            (
                401,
                r#"{"code":"unauthorized","message":"unauthorized access"}"#.into(),
            )
        });
        let seq = MemSeq::default();
        let dir = Dir::new("refused");
        let mut store = InfluxTelemetry::open(&cfg(&server.url()), &dir.0, Box::new(seq.clone()))
            .expect("open");
        let err = store
            .commit(&[batch("a", 1, 1)])
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("401")
                && err.contains("unauthorized access")
                && err.contains("storage.influxdb.token"),
            "{err}"
        );
        assert_eq!(store.spooled(), (0, 0));
        assert_eq!(seq.mark("a"), 0);
    }

    #[test]
    fn a_partial_write_is_accepted() {
        let server = FakeInflux::start(|_, _| {
            (422, r#"{"code":"unprocessable entity","message":"failure writing points to database: partial write: points beyond retention policy dropped=1"}"#.into())
        });
        let seq = MemSeq::default();
        let dir = Dir::new("partial");
        let mut store = InfluxTelemetry::open(&cfg(&server.url()), &dir.0, Box::new(seq.clone()))
            .expect("open");
        assert_eq!(
            store.commit(&[batch("a", 1, 2)]).expect("commit"),
            [Outcome::Stored]
        );
        assert_eq!(seq.mark("a"), 1);
        assert_eq!(store.spooled(), (0, 0));
    }

    #[test]
    fn a_restart_raises_the_marks_of_spooled_data_and_drains_it() {
        let dir = Dir::new("restart");
        let first = [batch("a", 5, 2), batch("b", 3, 1)];
        {
            let mut store =
                InfluxTelemetry::open(&cfg(&closed_url()), &dir.0, Box::new(MemSeq::default()))
                    .expect("open");
            store.commit(&first).expect("spooled");
        }
        // As if the hub died after spooling but before raising the marks.
        let server = FakeInflux::start(|_, _| (204, String::new()));
        let seq = MemSeq::default();
        let store = InfluxTelemetry::open(&cfg(&server.url()), &dir.0, Box::new(seq.clone()))
            .expect("reopen");
        assert_eq!((seq.mark("a"), seq.mark("b")), (5, 3));
        wait_until("the spool to drain", || store.spooled() == (0, 0));
        let requests = server.requests();
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].0.text(), lines_of(&first));
    }

    #[test]
    fn while_influxdb_refuses_spooled_data_new_batches_are_refused() {
        // 0: unavailable, 1: refusing (bad token), 2: fixed.
        let mode = Arc::new(AtomicUsize::new(0));
        let m = mode.clone();
        let server = FakeInflux::start(move |_, _| match m.load(Ordering::Acquire) {
            0 => (503, String::new()),
            1 => (
                401,
                r#"{"code":"unauthorized","message":"unauthorized access"}"#.into(),
            ),
            _ => (204, String::new()),
        });
        let dir = Dir::new("refusing");
        let mut store =
            InfluxTelemetry::open(&cfg(&server.url()), &dir.0, Box::new(MemSeq::default()))
                .expect("open");
        store.commit(&[batch("a", 1, 1)]).expect("spooled");
        mode.store(1, Ordering::Release);
        let mut seq = 2;
        wait_until("a commit to be refused", || {
            seq += 1;
            store.commit(&[batch("a", seq, 1)]).is_err()
        });
        mode.store(2, Ordering::Release);
        wait_until("the spool to drain", || store.spooled() == (0, 0));
        seq += 1;
        assert_eq!(
            store.commit(&[batch("a", seq, 1)]).expect("accepted again"),
            [Outcome::Stored]
        );
    }

    /// A server that accepts connections and never answers.
    struct Silent {
        port: u16,
        stop: Arc<AtomicBool>,
        accepted: Arc<std::sync::atomic::AtomicUsize>,
        thread: Option<JoinHandle<()>>,
    }

    impl Silent {
        fn start() -> Silent {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            listener.set_nonblocking(true).expect("nonblocking");
            let port = listener.local_addr().expect("addr").port();
            let stop = Arc::new(AtomicBool::new(false));
            let halt = stop.clone();
            let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let counter = accepted.clone();
            let thread = std::thread::spawn(move || {
                let mut held = Vec::new();
                while !halt.load(Ordering::Acquire) {
                    if let Ok((stream, _)) = listener.accept() {
                        held.push(stream);
                        counter.fetch_add(1, Ordering::AcqRel);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
            Silent {
                port,
                stop,
                accepted,
                thread: Some(thread),
            }
        }
    }

    impl Drop for Silent {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Release);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    #[test]
    fn a_silent_influxdb_times_out_into_the_spool_and_does_not_hold_up_shutdown() {
        let silent = Silent::start();
        let url = format!("http://127.0.0.1:{}", silent.port);
        let dir = Dir::new("silent");
        let mut config = cfg(&url);
        config.timeout = Duration::from_millis(300);
        let seq = MemSeq::default();
        {
            let mut store =
                InfluxTelemetry::open(&config, &dir.0, Box::new(seq.clone())).expect("open");
            let started = Instant::now();
            assert_eq!(
                store.commit(&[batch("a", 1, 1)]).expect("spooled"),
                [Outcome::Stored]
            );
            assert!(started.elapsed() >= Duration::from_millis(300));
            assert_eq!(store.spooled().0, 1);
        }
        // With a long timeout, the drain's write hangs; dropping the store cancels it.
        config.timeout = Duration::from_secs(60);
        let before = silent.accepted.load(Ordering::Acquire);
        let store = InfluxTelemetry::open(&config, &dir.0, Box::new(seq)).expect("reopen");
        // The drain thread has connected: its write is now hanging.
        wait_until("the drain to connect", || {
            silent.accepted.load(Ordering::Acquire) > before
        });
        let started = Instant::now();
        drop(store);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "shutdown took {:?}",
            started.elapsed()
        );
    }

    // --- Flux queries, against recorded InfluxDB 2 answers -----------------------------

    fn fixture(name: &str) -> String {
        let text = match name {
            "raw" => include_str!("../../tests/fixtures/influx/raw.csv"),
            "window_mean" => include_str!("../../tests/fixtures/influx/window_mean.csv"),
            "window_count" => include_str!("../../tests/fixtures/influx/window_count.csv"),
            "error" => include_str!("../../tests/fixtures/influx/error.csv"),
            other => panic!("no fixture {other}"),
        };
        assert!(
            text.contains("\r\n"),
            "fixture {name} lost InfluxDB's CRLF line ends"
        );
        text.to_string()
    }

    fn ms(rfc3339: &str) -> u64 {
        u64::try_from(parse_rfc3339_ns(rfc3339).expect("time") / 1_000_000).expect("after 1970")
    }

    fn row(metric: &str, ts: &str, value: f64, count: u64) -> Row {
        Row {
            metric: metric.into(),
            ts: ms(ts),
            value,
            count,
        }
    }

    type QueryResult = Result<(Vec<Row>, bool), StoreError>;

    /// Runs a query against a server answering `answer`; returns the result and the request.
    fn run(q: &Query, status: u16, answer: String) -> (QueryResult, Option<Request>) {
        let server = FakeInflux::start(move |_, _| (status, answer.clone()));
        let result = InfluxQuery::new(&cfg(&server.url()))
            .expect("client")
            .query(q);
        (result, server.requests().into_iter().next().map(|(r, _)| r))
    }

    fn sent_flux(req: &Request) -> String {
        let body: serde_json::Value = serde_json::from_slice(&req.body).expect("json body");
        assert_eq!(body["type"], "flux");
        assert_eq!(
            body["dialect"]["annotations"],
            serde_json::json!(["datatype", "group", "default"])
        );
        assert_eq!(body["dialect"]["header"], true);
        body["query"].as_str().expect("query").to_string()
    }

    #[test]
    fn raw_points_come_from_flux_sorted_and_limited() {
        let q = Query {
            device: "sensor-7".into(),
            metric: None,
            from: ms("2026-11-25T08:00:00Z"),
            until: ms("2026-11-25T09:00:00Z"),
            window: None,
            limit: 3,
        };
        let (result, req) = run(&q, 200, fixture("raw"));
        let (rows, truncated) = result.expect("query");
        assert!(truncated);
        assert_eq!(
            rows,
            [
                row("humidity", "2026-11-25T08:00:00Z", 48.0, 1),
                row("temp", "2026-11-25T08:00:00Z", 21.5, 1),
                row("humidity", "2026-11-25T08:00:00.250Z", 47.5, 1),
            ]
        );
        let req = req.expect("request");
        assert_eq!(req.method, "POST");
        assert_eq!(req.target, "/api/v2/query?org=acme");
        assert_eq!(req.header("authorization"), Some("Token s3cret"));
        assert_eq!(req.header("content-type"), Some("application/json"));
        assert_eq!(req.header("accept"), Some("application/csv"));
        assert_eq!(
            sent_flux(&req),
            r#"from(bucket: "fleet")
  |> range(start: 2026-11-25T08:00:00.000Z, stop: 2026-11-25T09:00:00.000Z)
  |> filter(fn: (r) => r._measurement == "telemetry" and r._field == "value" and r.device == "sensor-7")
  |> keep(columns: ["_time", "_value", "metric"])
  |> group()
  |> sort(columns: ["_time", "metric"])
  |> limit(n: 4)
"#
        );
    }

    #[test]
    fn windows_merge_the_aggregate_with_its_count_and_align_to_the_epoch() {
        let q = Query {
            device: "sensor-7".into(),
            metric: Some("temp".into()),
            from: ms("2026-11-25T08:00:07.500Z"),
            until: ms("2026-11-25T08:03:00Z"),
            window: Some((60_000, Aggregate::Mean)),
            limit: 10,
        };
        let (result, req) = run(&q, 200, fixture("window_mean"));
        let (rows, truncated) = result.expect("query");
        assert!(!truncated);
        assert_eq!(
            rows,
            [
                // Flux reports the first window at the range start; it starts at 08:00.
                row("temp", "2026-11-25T08:00:00Z", 20.5, 2),
                row("temp", "2026-11-25T08:01:00Z", 21.125, 8),
                row("temp", "2026-11-25T08:02:00Z", 19.0, 1),
            ]
        );
        assert_eq!(
            sent_flux(&req.expect("request")),
            r#"data = from(bucket: "fleet")
  |> range(start: 2026-11-25T08:00:07.500Z, stop: 2026-11-25T08:03:00.000Z)
  |> filter(fn: (r) => r._measurement == "telemetry" and r._field == "value" and r.device == "sensor-7" and r.metric == "temp")

data
  |> aggregateWindow(every: 60000ms, fn: mean, createEmpty: false, timeSrc: "_start")
  |> keep(columns: ["_time", "_value", "metric"])
  |> group()
  |> sort(columns: ["_time", "metric"])
  |> limit(n: 11)
  |> yield(name: "agg")

data
  |> aggregateWindow(every: 60000ms, fn: count, createEmpty: false, timeSrc: "_start")
  |> keep(columns: ["_time", "_value", "metric"])
  |> group()
  |> sort(columns: ["_time", "metric"])
  |> limit(n: 11)
  |> yield(name: "count")
"#
        );
    }

    #[test]
    fn a_count_query_uses_the_count_alone() {
        let q = Query {
            device: "sensor-7".into(),
            metric: None,
            from: ms("2026-11-25T00:00:00Z"),
            until: ms("2026-11-25T02:00:00Z"),
            window: Some((3_600_000, Aggregate::Count)),
            limit: 2,
        };
        let (result, req) = run(&q, 200, fixture("window_count"));
        let (rows, truncated) = result.expect("query");
        assert!(truncated);
        assert_eq!(
            rows,
            [
                row("humidity", "2026-11-25T00:00:00Z", 120.0, 120),
                row("temp", "2026-11-25T00:00:00Z", 118.0, 118),
            ]
        );
        let flux = sent_flux(&req.expect("request"));
        assert!(flux.contains("aggregateWindow(every: 3600000ms, fn: count, createEmpty: false, timeSrc: \"_start\")"), "{flux}");
        assert!(
            flux.contains("|> limit(n: 3)\n  |> yield(name: \"count\")"),
            "{flux}"
        );
        assert!(!flux.contains("\"agg\""), "{flux}");
        // Each aggregate maps to its Flux function.
        for (agg, f) in [
            (Aggregate::Min, "min"),
            (Aggregate::Max, "max"),
            (Aggregate::Sum, "sum"),
            (Aggregate::Last, "last"),
        ] {
            let q = Query {
                window: Some((1000, agg)),
                ..q.clone()
            };
            let flux = flux_query("fleet", "telemetry", &q).expect("flux");
            assert!(
                flux.contains(&format!("every: 1000ms, fn: {f}, createEmpty: false")),
                "{flux}"
            );
        }
    }

    #[test]
    fn query_errors_are_reported_with_influxdb_s_message() {
        let q = Query {
            device: "sensor-7".into(),
            metric: None,
            from: 0,
            until: 1000,
            window: Some((100, Aggregate::Mean)),
            limit: 10,
        };
        let err = run(&q, 200, fixture("error"))
            .0
            .expect_err("error table")
            .to_string();
        assert!(
            err.contains(r#"aggregateWindow: missing time column "_start""#) && err.contains("897"),
            "{err}"
        );
        let (result, _) = run(
            &q,
            401,
            r#"{"code":"unauthorized","message":"unauthorized access"}"#.into(),
        );
        let err = result.expect_err("401").to_string();
        assert!(
            err.contains("HTTP 401")
                && err.contains("unauthorized access")
                && err.contains("storage.influxdb.token"),
            "{err}"
        );
        let (result, _) = run(&q, 404, r#"{"code":"not found","message":"failed to initialize execute state: could not find bucket \"fleet\""}"#.into());
        let err = result.expect_err("404").to_string();
        assert!(
            err.contains("could not find bucket") && err.contains("storage.influxdb.bucket"),
            "{err}"
        );
        // https is spoken (ureq with rustls); a server that does not answer TLS is
        // reported as unavailable, naming the endpoint.
        let server = FakeInflux::start(|_, _| (200, String::new()));
        let https = server.url().replace("http://", "https://");
        let err = InfluxQuery::new(&cfg(&https))
            .expect("client")
            .query(&q)
            .expect_err("https to a plain http server")
            .to_string();
        assert!(
            err.contains("unavailable") && err.contains("https://"),
            "{err}"
        );
        let err = InfluxQuery::new(&cfg(&closed_url()))
            .expect("client")
            .query(&q)
            .expect_err("down")
            .to_string();
        assert!(err.contains("unavailable"), "{err}");
    }

    #[test]
    fn empty_answers_and_empty_ranges() {
        let q = Query {
            device: "sensor-7".into(),
            metric: None,
            from: 0,
            until: 1000,
            window: None,
            limit: 10,
        };
        assert_eq!(
            run(&q, 200, "\r\n".into()).0.expect("query"),
            (vec![], false)
        );
        assert_eq!(
            run(&q, 200, String::new()).0.expect("query"),
            (vec![], false)
        );
        // Beyond what InfluxDB can hold: no request at all.
        let late = Query {
            from: MAX_TIME_MS + 1,
            until: u64::MAX,
            ..q
        };
        let (result, req) = run(&late, 200, String::new());
        assert_eq!(result.expect("query"), (vec![], false));
        assert!(req.is_none());
    }

    #[test]
    fn csv_times_and_flux_literals() {
        assert_eq!(
            parse_csv("a,\"b,c\",\"d\"\"e\"\r\n\r\n,x\r\n,\n"),
            vec![
                vec!["a".to_string(), "b,c".into(), "d\"e".into()],
                vec![],
                vec![String::new(), "x".into()],
                vec![String::new(), String::new()],
            ]
        );
        assert_eq!(parse_rfc3339_ns("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(
            parse_rfc3339_ns("1970-01-01T00:00:00.123456789Z"),
            Some(123_456_789)
        );
        assert_eq!(
            parse_rfc3339_ns("2026-11-25T08:00:07.5Z"),
            Some(1_795_593_607_500_000_000)
        );
        assert_eq!(
            parse_rfc3339_ns("2026-11-25T09:00:07.5+01:00"),
            parse_rfc3339_ns("2026-11-25T08:00:07.5Z")
        );
        for bad in [
            "",
            "garbage",
            "2026-13-01T00:00:00Z",
            "2026-11-25T08:00:00",
            "2026-11-25T08:00:00.Z",
            "2026-11-25T08:00:00Zjunk",
        ] {
            assert_eq!(parse_rfc3339_ns(bad), None, "{bad}");
        }
        for t in [
            0,
            1,
            999,
            1_000,
            86_399_999,
            1_795_593_607_500,
            951_782_400_000,
            MAX_TIME_MS,
        ] {
            assert_eq!(ms(&flux_time(t)), t, "{}", flux_time(t));
        }
        assert_eq!(flux_time(MAX_TIME_MS), "2262-04-11T23:47:16.854Z");
        assert_eq!(flux_str(r#"a"b\c${x}$y"#), r#""a\"b\\c\${x}$y""#);
    }

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

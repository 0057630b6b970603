//! Spool orchestration: the spool state the ingest writer (appends) shares with the drain
//! thread (reads, advances), appending a group when InfluxDB is unavailable, and the drain
//! thread that writes spooled data to InfluxDB in order, with backoff.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::writer::{Accepted, Writer};
use super::{lock, InfluxError, REPORT_EVERY};
use crate::store::spool::{Recovery, Spool, SpoolError, SpoolOptions};
use crate::store::StoreError;

/// Most line protocol sent in one drain request.
const DRAIN_CHUNK_BYTES: u64 = 2 << 20;
/// First wait before retrying InfluxDB after a failure; doubles up to [`RETRY_MAX`].
const RETRY_MIN: Duration = Duration::from_millis(250);
/// Longest wait between attempts to reach InfluxDB while data is spooled.
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Opens the spool in `dir` with `max_bytes` of capacity and logs what its recovery found
/// (the caller raises the marks of what it holds).
///
/// # Errors
/// The spool cannot be opened.
pub(super) fn open_spool(dir: &Path, max_bytes: u64) -> Result<(Spool, Recovery), InfluxError> {
    let (spool, recovery) = Spool::open(dir, SpoolOptions::for_capacity(max_bytes))?;
    let dir = dir.display().to_string();
    if recovery.truncated_bytes > 0 {
        tracing::warn!(spool = %dir, bytes = recovery.truncated_bytes, "cut off a torn record at the end of the telemetry spool (an append interrupted by a crash; it was never acknowledged)");
    }
    if recovery.corrupt_bytes > 0 {
        tracing::error!(spool = %dir, bytes = recovery.corrupt_bytes, "telemetry spool data failed its CRC and was discarded: the disk corrupted acknowledged readings");
    }
    if recovery.head_reset {
        tracing::warn!(spool = %dir, "the spool's head pointer was unreadable: draining from the oldest segment again (InfluxDB replaces re-written points)");
    }
    if recovery.records > 0 {
        tracing::warn!(spool = %dir, records = recovery.records, readings = recovery.points, bytes = recovery.bytes, "telemetry spool holds data from a previous run; draining it to InfluxDB in order");
    }
    Ok((spool, recovery))
}

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

/// An episode of spooling, for the report when it ends.
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

/// What the ingest writer thread and the drain thread share.
pub(super) struct Shared {
    state: Mutex<SpoolState>,
    /// Wakes the drain thread: data spooled, or shutting down.
    wake: Condvar,
    /// Held for every write to InfluxDB, direct or drained.
    pub(super) writer: Mutex<Writer>,
    stop: AtomicBool,
    /// Cancels a drain write in flight at shutdown.
    cancel: tokio::sync::Notify,
}

impl Shared {
    /// Shares the opened spool (and what its recovery found waiting) and the writer with a
    /// new drain thread, which starts draining at once.
    ///
    /// # Errors
    /// The thread cannot be started.
    pub(super) fn start(
        spool: Spool,
        recovery: &Recovery,
        writer: Writer,
    ) -> Result<(Arc<Shared>, JoinHandle<()>), StoreError> {
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
        Ok((shared, drainer))
    }

    /// Records and bytes currently in the spool.
    pub(super) fn spooled(&self) -> (u64, u64) {
        let st = lock(&self.state);
        (st.spool.records(), st.spool.bytes())
    }

    /// Whether a new group may be written to InfluxDB directly: only when the spool is
    /// empty, so nothing overtakes spooled data. Only the ingest writer appends to the
    /// spool, so it stays empty until that thread spools.
    ///
    /// # Errors
    /// InfluxDB refuses the spooled data: new groups are refused too, as a refused direct
    /// write is.
    pub(super) fn may_write_directly(&self) -> Result<bool, StoreError> {
        let mut st = lock(&self.state);
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
        Ok(empty)
    }

    /// Appends a group (its marks, points and line protocol) to the spool and wakes the
    /// drain thread; `reason` says why it was not written directly, for the log line when
    /// spooling starts.
    ///
    /// # Errors
    /// The spool is full or the disk failed: the group is refused.
    pub(super) fn spool(
        &self,
        marks: &[(Arc<str>, u64)],
        points: u32,
        lines: &[u8],
        reason: Option<&str>,
    ) -> Result<(), InfluxError> {
        let mut st = lock(&self.state);
        let was_empty = st.spool.is_empty();
        if let Err(e) = st.spool.append(marks, points, lines) {
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
        self.wake.notify_one();
        Ok(())
    }

    /// Tells the drain thread to stop and cancels its write in flight; the caller joins it.
    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.cancel.notify_one();
        // Under the lock, so the drain thread cannot miss the wake-up between its check of
        // `stop` and its wait.
        let _st = lock(&self.state);
        self.wake.notify_all();
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

//! The write path: [`InfluxTelemetry`], the [`TelemetryStore`] the ingest writer commits
//! groups to. It drops what the high-water marks say is stored already, writes the rest
//! as one request, and spools the group when InfluxDB is unavailable (or while older data
//! waits in the spool), raising the marks either way.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use super::line_protocol::encode_batch;
use super::spooling::{open_spool, Shared};
use super::writer::{Accepted, Writer};
use super::{lock, measurement_of, InfluxError, REPORT_EVERY};
use crate::config::InfluxConfig;
use crate::store::{Batch, Outcome, SeqStore, StoreError, TelemetryStore};

/// Most devices whose marks are cached; the cache is cleared when full (it is only a
/// cache: the marks are in the [`SeqStore`]).
const MARK_CACHE_LIMIT: usize = 1_000_000;

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
        let (spool, recovery) = open_spool(spool_dir, cfg.spool_max_bytes)?;
        if !recovery.marks.is_empty() {
            seq.raise(&recovery.marks)?;
        }
        let (shared, drainer) = Shared::start(spool, &recovery, writer)?;
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
        self.shared.spooled()
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
    fn purge(&mut self, device: &str) -> Result<u64, StoreError> {
        Err(StoreError::Refused(format!(
            "the hub does not delete from InfluxDB; use its delete API, e.g. `influx delete --bucket BUCKET --start 1970-01-01T00:00:00Z --stop $(date -u +%FT%TZ) --predicate 'device=\"{device}\"'`, then remove the device without --purge"
        )))
    }

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
        let reason = if self.shared.may_write_directly()? {
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
        self.shared
            .spool(&marks, points, &self.lines, reason.as_deref())?;
        // The batches are durable in the spool: acknowledge them like stored ones.
        self.raise(&marks)?;
        Ok(outcomes)
    }
}

impl Drop for InfluxTelemetry {
    fn drop(&mut self) {
        self.shared.stop();
        if let Some(drainer) = self.drainer.take() {
            let _ = drainer.join();
        }
    }
}

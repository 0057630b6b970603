//! The store-and-forward queue: [`schemas::session::Outbox`] on disk, so that readings
//! survive an agent restart, a `kill -9` and a power cut, and the sequence counter never
//! goes backwards.
//!
//! # Layout (one directory per device)
//!
//! The queue is a [`segment_log::SegmentLog`] (its crate documentation gives the file
//! format and the crash guarantees) plus a `lock` file:
//!
//! - each record is one batch as a postcard `telemetry` message (seq 0; the real seq is
//!   derived, see below), so the storage format is the wire format defined in `schemas`;
//! - the log's head is the oldest unacknowledged batch, and its 16 bytes of metadata are
//!   the head's sequence number and the readings dropped so far (`u64` LE each);
//! - `lock` is `flock`ed by the running agent and holds its pid.
//!
//! Records are numbered consecutively forever; the batch in record `r` has sequence
//! `front_seq + (r - head)`. Renumbering (the hub says the counter went backwards)
//! therefore rewrites only the head.
//!
//! # What is fsynced when
//!
//! - **push** (a batch is recorded): the record is appended and `fdatasync`ed (with the
//!   directory, for a new segment) before `push_back` returns. Only then does the batch
//!   count as recorded, and only then can the session send it, so every sequence number
//!   that ever went on the wire is on disk.
//! - **ack** (`pop_front`): the head is committed buffered, *not* fsynced. Losing it in a
//!   power cut only means re-sending batches the hub already stored; the hub acknowledges
//!   them again without storing them twice.
//! - **before a segment file is deleted** the log makes the head durable, so the next
//!   sequence number can always be derived from head + segments.
//! - **renumber**: the head is committed durably at once; losing it could turn batches the
//!   hub already stored into "new" data.
//!
//! # Recovery
//!
//! The log cuts off a torn append (never reported as recorded). A batch lost to media
//! corruption keeps its number: it is sent as a placeholder batch with one reading
//! `agent.queue_lost_batches = 1`, so numbering stays consecutive and the loss is visible
//! on the hub. Without a head (first start, or the head file lost) the queue starts at the
//! oldest batch with sequence 1; if the hub has seen higher numbers, the session
//! renumbers on Welcome.
//!
//! # Bounds
//!
//! At most `max_batches` batches and `max_bytes` bytes of segment files. When a push does
//! not fit, the oldest batches are dropped first: single batches for the batch limit, and
//! whole segments (1/16 of `max_bytes`, between 4 KiB and 8 MiB) for the byte limit, since
//! only deleting a segment frees space. Dropped readings are counted in
//! [`QueueStats::dropped_readings`], which survives restarts; the agent reports it as the
//! reading `agent.dropped_readings`.
//!
//! # Upgrading
//!
//! A queue directory written by an agent before the segment log (`seg-*.log` and
//! `head.log`) is moved to this layout when the queue is opened (`queue/upgrade.rs`). Its
//! batches keep their sequence numbers.

mod upgrade;

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use heapless::Vec as HVec;
use schemas::codec::{decode_postcard, encode_postcard_vec};
use schemas::limits::MAX_READINGS;
use schemas::message::truncated;
use schemas::session::{Outbox, Pushed};
use schemas::{DeviceMessage, Reading, Telemetry};
use segment_log::{Durability, HeadState, LogError, LogOptions, Meta, SegmentLog};

const LOCK_FILE: &str = "lock";
/// The metric of the placeholder sent for a batch that could not be read back.
pub const LOST_BATCH_METRIC: &str = "agent.queue_lost_batches";

/// Why the queue failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// A file operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The segment log under the queue failed.
    #[error("queue log: {0}")]
    Log(#[from] LogError),
    /// Another process holds the queue's lock.
    #[error("the queue in {} is in use by another device-agent process (pid {pid})", dir.display())]
    Locked {
        /// The queue directory.
        dir: PathBuf,
        /// The pid written in the lock file, if readable.
        pid: String,
    },
    /// A batch with no readings or more than the protocol allows.
    #[error("a batch must hold 1 to {MAX_READINGS} readings, got {0}")]
    BadBatch(usize),
    /// `read` past the end.
    #[error("batch index {index} is beyond the {len} stored batches")]
    OutOfRange {
        /// Requested index.
        index: usize,
        /// Stored batches.
        len: usize,
    },
    /// The files contradict each other in a way recovery cannot repair.
    #[error("queue in {} is inconsistent: {why}", dir.display())]
    Corrupt {
        /// The queue directory.
        dir: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// `inspect` found a queue in the layout of an older agent, which only opening the
    /// queue (starting the agent) upgrades.
    #[error("the queue in {} is in an older agent's format; it is upgraded when the agent starts", dir.display())]
    OldFormat {
        /// The queue directory.
        dir: PathBuf,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> QueueError + 'a {
    move |source| QueueError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// How much the queue may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueLimits {
    /// Most bytes of segment files.
    pub max_bytes: u64,
    /// Most batches.
    pub max_batches: usize,
}

impl QueueLimits {
    /// The size at which a segment is closed and a new one started.
    pub fn segment_bytes(&self) -> u64 {
        (self.max_bytes / 16).clamp(4096, 8 << 20)
    }

    fn log_options(&self) -> LogOptions {
        LogOptions {
            max_bytes: self.max_bytes,
            segment_bytes: self.segment_bytes(),
        }
    }
}

/// A snapshot of the queue, for `device-agent status` and the agent's own readings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct QueueStats {
    /// Batches waiting for an acknowledgement.
    pub batches: usize,
    /// Readings in those batches.
    pub readings: u64,
    /// Bytes of segment files on disk (including acknowledged records of partly
    /// acknowledged segments).
    pub bytes: u64,
    /// Segment files.
    pub segments: usize,
    /// Sequence number of the oldest waiting batch.
    pub front_seq: u64,
    /// Sequence number the next batch will get.
    pub next_seq: u64,
    /// Readings dropped because the queue was full, since the queue was created.
    pub dropped_readings: u64,
    /// Batches that could not be read back (media corruption), now placeholders.
    pub lost_batches: u64,
}

/// What the queue keeps in the log's head metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HeadMeta {
    /// Sequence number of the batch at the log's head.
    front_seq: u64,
    /// Readings dropped because the queue was full, since it was created.
    dropped: u64,
}

impl HeadMeta {
    /// What a queue without a head starts from.
    const FRESH: HeadMeta = HeadMeta {
        front_seq: 1,
        dropped: 0,
    };

    fn encode(&self) -> Meta {
        let mut meta = [0u8; segment_log::META_BYTES];
        meta[..8].copy_from_slice(&self.front_seq.to_le_bytes());
        meta[8..].copy_from_slice(&self.dropped.to_le_bytes());
        meta
    }

    fn decode(meta: &Meta) -> HeadMeta {
        let mut front_seq = [0u8; 8];
        let mut dropped = [0u8; 8];
        front_seq.copy_from_slice(&meta[..8]);
        dropped.copy_from_slice(&meta[8..]);
        HeadMeta {
            front_seq: u64::from_le_bytes(front_seq),
            dropped: u64::from_le_bytes(dropped),
        }
    }
}

/// The on-disk queue. See the module documentation.
#[derive(Debug)]
pub struct DiskQueue {
    log: SegmentLog,
    limits: QueueLimits,
    head: HeadMeta,
    /// Readings of each waiting batch, oldest first (1 for a lost batch: its placeholder).
    readings: VecDeque<u8>,
    /// Batches found unreadable when the queue was opened.
    lost: u64,
    /// Timestamp for placeholders of lost batches: when the queue was opened.
    opened_at: u64,
    _lock: File,
}

/// The waiting batches as the log's recovery scan found them.
struct Found {
    head: HeadMeta,
    readings: VecDeque<u8>,
    lost: u64,
}

impl DiskQueue {
    /// Opens (creating if needed) the queue in `dir`, upgrading an older agent's layout
    /// and recovering from any crash, and takes its lock.
    ///
    /// # Errors
    /// I/O failures, [`QueueError::Locked`] when another agent uses `dir`, and
    /// [`QueueError::Corrupt`] for damage recovery cannot repair.
    pub fn open(dir: &Path, limits: QueueLimits) -> Result<DiskQueue, QueueError> {
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        let lock = take_lock(dir)?;
        if let Some(upgraded) = upgrade::from_v1(dir)? {
            tracing::info!(dir = %dir.display(), segments = upgraded.segments, "moved the queue from the previous on-disk layout to the segment log");
        }
        let mut scanned = Vec::new();
        let (log, recovery) = SegmentLog::open(dir, limits.log_options(), |number, payload| {
            scanned.push((number, batch_readings(payload)));
        })?;
        if recovery.truncated_bytes > 0 {
            tracing::warn!(dir = %dir.display(), bytes = recovery.truncated_bytes, "cut off a torn batch at the end of the queue (a write interrupted by a crash; it was never recorded)");
        }
        let found = found(&log, recovery.head, scanned, limits)?;
        Ok(DiskQueue {
            log,
            limits,
            head: found.head,
            readings: found.readings,
            lost: found.lost,
            opened_at: crate::epoch_ms(),
            _lock: lock,
        })
    }

    /// Reads the queue's state without changing anything (a running agent may be using it).
    ///
    /// # Errors
    /// I/O failures; [`QueueError::Corrupt`] as for [`DiskQueue::open`];
    /// [`QueueError::OldFormat`] for a queue an older agent wrote.
    pub fn inspect(dir: &Path) -> Result<QueueStats, QueueError> {
        if upgrade::has_v1_files(dir)? {
            return Err(QueueError::OldFormat {
                dir: dir.to_path_buf(),
            });
        }
        let mut scanned = Vec::new();
        let (log, recovery) = SegmentLog::open_read_only(dir, |number, payload| {
            scanned.push((number, batch_readings(payload)));
        })?;
        let unbounded = QueueLimits {
            max_bytes: u64::MAX,
            max_batches: usize::MAX,
        };
        let found = found(&log, recovery.head, scanned, unbounded)?;
        Ok(stats_of(&log, &found.head, &found.readings, found.lost))
    }

    /// A snapshot of the queue.
    pub fn stats(&self) -> QueueStats {
        stats_of(&self.log, &self.head, &self.readings, self.lost)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        self.log.dir()
    }

    /// Makes every acknowledgement durable (on clean shutdown; not needed for correctness).
    ///
    /// # Errors
    /// The fsync failed.
    pub fn sync(&self) -> Result<(), QueueError> {
        Ok(self.log.sync()?)
    }

    /// Drops the oldest `count` batches as acknowledged (`evicted` is `None`) or as lost to
    /// a full queue, and commits the head buffered.
    fn drop_front(&mut self, count: usize, evicted: Option<&mut Pushed>) -> Result<(), QueueError> {
        let count = count.min(self.readings.len());
        if count == 0 {
            return Ok(());
        }
        let readings: u64 = self
            .readings
            .iter()
            .take(count)
            .map(|&n| u64::from(n))
            .sum();
        let head = HeadMeta {
            front_seq: self.head.front_seq + count as u64,
            dropped: self.head.dropped + if evicted.is_some() { readings } else { 0 },
        };
        let front = self.log.front() + count as u64;
        self.log
            .commit(front, head.encode(), Durability::Buffered)?;
        self.head = head;
        self.readings.drain(..count);
        if let Some(pushed) = evicted {
            pushed.evicted_batches += u32::try_from(count).unwrap_or(u32::MAX);
            pushed.evicted_readings = pushed
                .evicted_readings
                .saturating_add(u32::try_from(readings).unwrap_or(u32::MAX));
        }
        Ok(())
    }

    /// Frees the oldest segment by dropping the batches in it; `false` when there is none.
    fn drop_oldest_segment(&mut self, pushed: &mut Pushed) -> Result<bool, QueueError> {
        let Some(end) = self.log.oldest_segment_end() else {
            return Ok(false);
        };
        // Records before the head were acknowledged already and need no eviction.
        let count = end.saturating_sub(self.log.front());
        self.drop_front(usize::try_from(count).unwrap_or(usize::MAX), Some(pushed))?;
        // Committing deletes it, unless it is the tail.
        self.log.remove_consumed_tail()?;
        Ok(true)
    }
}

/// The waiting batches from the head to the end of the log, from what the recovery scan
/// saw: the number of readings of each, and a placeholder for each lost one.
fn found(
    log: &SegmentLog,
    head: HeadState,
    scanned: Vec<(u64, Option<u8>)>,
    limits: QueueLimits,
) -> Result<Found, QueueError> {
    let head = match head {
        HeadState::Valid => HeadMeta::decode(&log.meta()),
        HeadState::Missing | HeadState::Corrupt => HeadMeta::FRESH,
    };
    // A corrupt segment name could claim billions of missing records; refuse rather than
    // allocate placeholders for them.
    if log.missing_records() > limits.max_batches.max(1 << 20) as u64 {
        return Err(QueueError::Corrupt {
            dir: log.dir().to_path_buf(),
            why: format!(
                "{} unreadable records between {} and {}",
                log.missing_records(),
                log.front(),
                log.end()
            ),
        });
    }
    let mut scanned = scanned.into_iter().peekable();
    let mut readings = VecDeque::new();
    let mut lost = 0;
    for number in log.front()..log.end() {
        let n = match scanned.next_if(|&(n, _)| n == number) {
            Some((_, Some(n))) => n,
            // Missing, or its payload is not a batch although its CRC matched.
            _ => {
                lost += 1;
                1
            }
        };
        readings.push_back(n);
    }
    Ok(Found {
        head,
        readings,
        lost,
    })
}

impl Outbox for DiskQueue {
    type Error = QueueError;

    fn front_seq(&self) -> u64 {
        self.head.front_seq
    }

    fn len(&self) -> usize {
        self.readings.len()
    }

    fn push_back(&mut self, readings: &[Reading]) -> Result<Pushed, QueueError> {
        if readings.is_empty() || readings.len() > MAX_READINGS {
            return Err(QueueError::BadBatch(readings.len()));
        }
        let payload = encode_batch(readings)?;
        let mut pushed = Pushed::default();
        let over = (self.readings.len() + 1).saturating_sub(self.limits.max_batches.max(1));
        self.drop_front(over, Some(&mut pushed))?;
        loop {
            match self.log.append(&payload, Durability::Durable) {
                Ok(_) => break,
                // Only deleting a whole segment frees bytes.
                Err(LogError::Full { .. }) if self.drop_oldest_segment(&mut pushed)? => {}
                Err(e) => return Err(e.into()),
            }
        }
        // At most MAX_READINGS (64) per batch.
        self.readings.push_back(readings.len() as u8);
        Ok(pushed)
    }

    fn read(
        &mut self,
        index: usize,
        out: &mut HVec<Reading, MAX_READINGS>,
    ) -> Result<(), QueueError> {
        let len = self.readings.len();
        if index >= len {
            return Err(QueueError::OutOfRange { index, len });
        }
        let number = self.log.front() + index as u64;
        let batch = match self.log.read(number) {
            Ok(payload) => decode_batch(&payload),
            Err(LogError::Missing { .. } | LogError::Corrupt { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        out.clear();
        match batch {
            Some(readings) => *out = readings,
            None => {
                // Lost at open, or unreadable now although it was fine then (media
                // corruption). Keep the number, make the loss visible.
                tracing::error!(record = number, dir = %self.dir().display(), "a queued batch is unreadable; sending a placeholder");
                let _ = out.push(lost_placeholder(self.opened_at));
            }
        }
        Ok(())
    }

    fn pop_front(&mut self, count: usize) -> Result<(), QueueError> {
        self.drop_front(count, None)
    }

    fn renumber(&mut self, front_seq: u64) -> Result<(), QueueError> {
        let head = HeadMeta {
            front_seq,
            ..self.head
        };
        self.log
            .commit(self.log.front(), head.encode(), Durability::Durable)?;
        self.head = head;
        Ok(())
    }
}

fn stats_of(log: &SegmentLog, head: &HeadMeta, readings: &VecDeque<u8>, lost: u64) -> QueueStats {
    QueueStats {
        batches: readings.len(),
        readings: readings.iter().map(|&n| u64::from(n)).sum(),
        bytes: log.bytes(),
        segments: log.segment_count(),
        front_seq: head.front_seq,
        next_seq: head.front_seq + readings.len() as u64,
        dropped_readings: head.dropped,
        lost_batches: lost,
    }
}

fn lost_placeholder(ts: u64) -> Reading {
    Reading {
        metric: truncated(LOST_BATCH_METRIC),
        ts,
        value: 1.0,
    }
}

fn encode_batch(readings: &[Reading]) -> Result<Vec<u8>, QueueError> {
    let mut batch = HVec::new();
    for r in readings {
        batch
            .push(r.clone())
            .map_err(|_| QueueError::BadBatch(readings.len()))?;
    }
    Ok(encode_postcard_vec(&DeviceMessage::Telemetry(Telemetry {
        seq: 0,
        readings: batch,
    })))
}

fn decode_batch(payload: &[u8]) -> Option<HVec<Reading, MAX_READINGS>> {
    match decode_postcard::<DeviceMessage>(payload) {
        Ok(DeviceMessage::Telemetry(t)) if !t.readings.is_empty() => Some(t.readings),
        _ => None,
    }
}

/// The number of readings in a stored batch, `None` if it does not decode.
fn batch_readings(payload: &[u8]) -> Option<u8> {
    decode_batch(payload).map(|b| b.len() as u8)
}

/// Takes the queue's `flock` (released by the kernel when the process dies, even by
/// `kill -9`) and writes our pid into the lock file for operators.
fn take_lock(dir: &Path) -> Result<File, QueueError> {
    use rustix::fs::{flock, FlockOperation};
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_err("open", &path))?;
    if let Err(err) = flock(&file, FlockOperation::NonBlockingLockExclusive) {
        if err == rustix::io::Errno::WOULDBLOCK {
            let pid = fs::read_to_string(&path).unwrap_or_default();
            return Err(QueueError::Locked {
                dir: dir.to_path_buf(),
                pid: pid.trim().to_string(),
            });
        }
        return Err(io_err("lock", &path)(err.into()));
    }
    file.set_len(0).map_err(io_err("truncate", &path))?;
    writeln!(file, "{}", std::process::id()).map_err(io_err("write", &path))?;
    Ok(file)
}

#[cfg(test)]
mod tests;

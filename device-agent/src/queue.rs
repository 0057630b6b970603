//! The store-and-forward queue: [`schemas::session::Outbox`] on disk, so that readings
//! survive an agent restart, a `kill -9` and a power cut, and the sequence counter never
//! goes backwards.
//!
//! # Layout (one directory per device)
//!
//! - `seg-<first record number, 20 digits>.log`: append-only segments of records. A record
//!   is a 16-byte header — payload length (`u32` LE), CRC-32 of the record number and the
//!   payload (`u32` LE), record number (`u64` LE) — followed by the payload: the batch as
//!   a postcard `telemetry` message (seq 0; the real seq is derived, see below), so the
//!   storage format is the wire format defined in `schemas`.
//! - `head.log`: an append-only log of 40-byte entries `(front record, front seq, dropped
//!   readings)`, each with its own CRC. The last valid entry wins. It is rewritten
//!   (temp file, fsync, rename, fsync of the directory) at open and every 1024 entries.
//! - `lock`: `flock`ed by the running agent, holding its pid.
//!
//! Records are numbered consecutively forever; the batch in record `r` has sequence
//! `front_seq + (r - front_record)`. Renumbering (the hub says the counter went
//! backwards) therefore rewrites only the head.
//!
//! # What is fsynced when
//!
//! - **push** (a batch is recorded): the record is appended to the tail segment and
//!   `fdatasync`ed before `push_back` returns; a newly created segment also gets its
//!   directory fsynced. Only then does the batch count as recorded, and only then can the
//!   session send it, so every sequence number that ever went on the wire is on disk.
//! - **ack** (`pop_front`): a head entry is appended but *not* fsynced. Losing it in a
//!   power cut only means re-sending batches the hub already stored; the hub acknowledges
//!   them again without storing them twice.
//! - **before a segment file is deleted** (all of it acknowledged or evicted), `head.log`
//!   is fsynced, so the surviving head never points into a deleted segment and the next
//!   sequence number can always be derived from head + segments.
//! - **renumber**: the head entry is fsynced at once; losing it could turn batches the hub
//!   already stored into "new" data.
//!
//! # Recovery
//!
//! At open, each segment is scanned. A record whose header or CRC does not check out at
//! the end of the last segment is a write torn by a crash: it was never acknowledged as
//! recorded, so it is cut off (the file is truncated to the last good record). A bad
//! record inside an older segment (media corruption) keeps its number: it is sent as a
//! placeholder batch with one reading `agent.queue_lost_batches = 1`, so numbering stays
//! consecutive and the loss is visible on the hub.
//!
//! # Bounds
//!
//! At most `max_batches` batches and `max_bytes` bytes of segment files. When a push does
//! not fit, the oldest batches are dropped first: single batches for the batch limit, and
//! whole segments (1/16 of `max_bytes`, between 4 KiB and 8 MiB) for the byte limit, since
//! only deleting a segment frees space. Dropped readings are counted in
//! [`QueueStats::dropped_readings`], which survives restarts; the agent reports it as the
//! reading `agent.dropped_readings`.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use heapless::Vec as HVec;
use schemas::codec::{decode_postcard, encode_postcard_vec};
use schemas::limits::{MAX_MESSAGE_BYTES, MAX_READINGS};
use schemas::message::truncated;
use schemas::session::{Outbox, Pushed};
use schemas::{DeviceMessage, Reading, Telemetry};

/// Bytes of a record header: payload length, CRC, record number.
const RECORD_HEADER: usize = 16;
/// Bytes of one head entry.
const HEAD_ENTRY: usize = 40;
const HEAD_MAGIC: &[u8; 4] = b"DAQH";
const HEAD_VERSION: u32 = 1;
/// `head.log` is rewritten with a single entry after this many appends.
const HEAD_COMPACT_AFTER: u64 = 1024;
const HEAD_FILE: &str = "head.log";
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    front_record: u64,
    front_seq: u64,
    dropped: u64,
}

impl Head {
    fn encode(&self) -> [u8; HEAD_ENTRY] {
        let mut e = [0u8; HEAD_ENTRY];
        e[0..4].copy_from_slice(HEAD_MAGIC);
        e[4..8].copy_from_slice(&HEAD_VERSION.to_le_bytes());
        e[8..16].copy_from_slice(&self.front_record.to_le_bytes());
        e[16..24].copy_from_slice(&self.front_seq.to_le_bytes());
        e[24..32].copy_from_slice(&self.dropped.to_le_bytes());
        let crc = crc32(&[&e[0..32]]);
        e[32..36].copy_from_slice(&crc.to_le_bytes());
        e
    }

    fn decode(e: &[u8]) -> Option<Head> {
        if e.len() != HEAD_ENTRY || &e[0..4] != HEAD_MAGIC {
            return None;
        }
        if u32::from_le_bytes(e[4..8].try_into().ok()?) != HEAD_VERSION {
            return None;
        }
        if u32::from_le_bytes(e[32..36].try_into().ok()?) != crc32(&[&e[0..32]]) {
            return None;
        }
        Some(Head {
            front_record: u64::from_le_bytes(e[8..16].try_into().ok()?),
            front_seq: u64::from_le_bytes(e[16..24].try_into().ok()?),
            dropped: u64::from_le_bytes(e[24..32].try_into().ok()?),
        })
    }
}

/// Where one live batch is.
#[derive(Debug, Clone, Copy)]
enum Slot {
    At {
        segment: u64,
        offset: u64,
        len: u32,
        readings: u8,
    },
    /// Unreadable (media corruption): sent as a placeholder.
    Lost,
}

impl Slot {
    fn readings(&self) -> u64 {
        match self {
            Slot::At { readings, .. } => u64::from(*readings),
            Slot::Lost => 1,
        }
    }
}

#[derive(Debug, Clone)]
struct Segment {
    /// Number of its first record.
    base: u64,
    /// Number after its last record.
    end: u64,
    /// File length in bytes.
    bytes: u64,
}

fn segment_name(base: u64) -> String {
    format!("seg-{base:020}.log")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    name.strip_prefix("seg-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

/// The on-disk queue. See the module documentation.
#[derive(Debug)]
pub struct DiskQueue {
    dir: PathBuf,
    limits: QueueLimits,
    head: Head,
    head_file: File,
    head_entries: u64,
    segments: VecDeque<Segment>,
    slots: VecDeque<Slot>,
    /// Append handle of the last segment.
    tail: Option<File>,
    /// A failed append left bytes that could not be cut off: start a new segment.
    tail_poisoned: bool,
    /// Read handle of the segment read last (reads are mostly sequential).
    reader: Option<(u64, File)>,
    next_record: u64,
    lost: u64,
    /// Timestamp for placeholders of lost batches: when the queue was opened.
    opened_at: u64,
    _lock: File,
}

/// What scanning the directory found.
struct Loaded {
    head: Head,
    segments: VecDeque<Segment>,
    slots: VecDeque<Slot>,
    next_record: u64,
    lost: u64,
    /// Torn tails to cut off: (file, good length).
    truncate: Option<(PathBuf, u64)>,
    /// Segments entirely before the front (left over by a crash).
    stale: Vec<PathBuf>,
}

impl DiskQueue {
    /// Opens (creating if needed) the queue in `dir`, recovering from any crash, and takes
    /// its lock.
    ///
    /// # Errors
    /// I/O failures, [`QueueError::Locked`] when another agent uses `dir`, and
    /// [`QueueError::Corrupt`] for damage recovery cannot repair.
    pub fn open(dir: &Path, limits: QueueLimits) -> Result<DiskQueue, QueueError> {
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        let lock = take_lock(dir)?;
        let loaded = load(dir, limits)?;
        for path in &loaded.stale {
            fs::remove_file(path).map_err(io_err("remove", path))?;
        }
        if let Some((path, len)) = &loaded.truncate {
            let f = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io_err("open", path))?;
            f.set_len(*len).map_err(io_err("truncate", path))?;
            f.sync_all().map_err(io_err("fsync", path))?;
        }
        // Always start from a fresh head.log holding one entry: it cannot have a torn entry
        // at its end that later appends would follow.
        let head_file = rewrite_head(dir, &loaded.head)?;
        let tail = match loaded.segments.back() {
            // Append to the last segment only if its records end exactly where the next
            // one begins (a fully acknowledged tail may end before the front); otherwise
            // the next push starts a new segment.
            Some(seg) if seg.end == loaded.next_record => {
                let path = dir.join(segment_name(seg.base));
                Some(
                    OpenOptions::new()
                        .append(true)
                        .open(&path)
                        .map_err(io_err("open", &path))?,
                )
            }
            _ => None,
        };
        Ok(DiskQueue {
            dir: dir.to_path_buf(),
            limits,
            head: loaded.head,
            head_file,
            head_entries: 1,
            segments: loaded.segments,
            slots: loaded.slots,
            tail,
            tail_poisoned: false,
            reader: None,
            next_record: loaded.next_record,
            lost: loaded.lost,
            opened_at: crate::epoch_ms(),
            _lock: lock,
        })
    }

    /// Reads the queue's state without changing anything (a running agent may be using it).
    ///
    /// # Errors
    /// I/O failures; [`QueueError::Corrupt`] as for [`DiskQueue::open`].
    pub fn inspect(dir: &Path) -> Result<QueueStats, QueueError> {
        let limits = QueueLimits {
            max_bytes: u64::MAX,
            max_batches: usize::MAX,
        };
        let loaded = load(dir, limits)?;
        Ok(stats_of(
            &loaded.head,
            &loaded.segments,
            &loaded.slots,
            loaded.lost,
        ))
    }

    /// A snapshot of the queue.
    pub fn stats(&self) -> QueueStats {
        stats_of(&self.head, &self.segments, &self.slots, self.lost)
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes every head entry durable (on clean shutdown; not needed for correctness).
    ///
    /// # Errors
    /// The fsync failed.
    pub fn sync(&self) -> Result<(), QueueError> {
        self.head_file
            .sync_data()
            .map_err(io_err("fsync", &self.dir.join(HEAD_FILE)))
    }

    fn total_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    fn write_head(&mut self, sync: bool) -> Result<(), QueueError> {
        let path = self.dir.join(HEAD_FILE);
        if self.head_entries >= HEAD_COMPACT_AFTER {
            self.head_file = rewrite_head(&self.dir, &self.head)?;
            self.head_entries = 1;
            return Ok(());
        }
        let entry = self.head.encode();
        if let Err(err) = self.head_file.write_all(&entry) {
            // A partial entry may be at the end now: start a clean file so later entries
            // stay aligned, then report the original failure.
            if let Ok(f) = rewrite_head(&self.dir, &self.head) {
                self.head_file = f;
                self.head_entries = 1;
            }
            return Err(io_err("append to", &path)(err));
        }
        self.head_entries += 1;
        if sync {
            self.head_file.sync_data().map_err(io_err("fsync", &path))?;
        }
        Ok(())
    }

    /// Drops the oldest batch, counting it as lost.
    fn evict_front(&mut self, pushed: &mut Pushed) {
        if let Some(slot) = self.slots.pop_front() {
            let n = slot.readings();
            self.head.front_record += 1;
            self.head.front_seq += 1;
            self.head.dropped += n;
            pushed.evicted_batches += 1;
            pushed.evicted_readings += u32::try_from(n).unwrap_or(u32::MAX);
        }
    }

    /// Deletes segments whose records are all before the front. The last (tail) segment
    /// goes only with `tail_too`. `head.log` is fsynced first (module docs).
    fn collect_garbage(&mut self, tail_too: bool) -> Result<(), QueueError> {
        let front = self.head.front_record;
        let keep_last = usize::from(!tail_too);
        let mut doomed = 0;
        while doomed + keep_last < self.segments.len() && self.segments[doomed].end <= front {
            doomed += 1;
        }
        if doomed == 0 {
            return Ok(());
        }
        self.sync()?;
        for _ in 0..doomed {
            let Some(seg) = self.segments.pop_front() else {
                break;
            };
            let path = self.dir.join(segment_name(seg.base));
            if matches!(self.reader, Some((base, _)) if base == seg.base) {
                self.reader = None;
            }
            fs::remove_file(&path).map_err(io_err("remove", &path))?;
        }
        if self.segments.is_empty() {
            self.tail = None;
            self.tail_poisoned = false;
        }
        Ok(())
    }

    fn start_segment(&mut self) -> Result<(), QueueError> {
        let base = self.next_record;
        let path = self.dir.join(segment_name(base));
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        fsync_dir(&self.dir)?;
        self.segments.push_back(Segment {
            base,
            end: base,
            bytes: 0,
        });
        self.tail = Some(file);
        self.tail_poisoned = false;
        Ok(())
    }

    /// Makes room for a record of `record_len` bytes by dropping the oldest batches.
    fn make_room(&mut self, record_len: u64) -> Result<Pushed, QueueError> {
        let mut pushed = Pushed::default();
        while self.slots.len() >= self.limits.max_batches.max(1) {
            self.evict_front(&mut pushed);
        }
        // Only deleting whole segments frees bytes: find how many of the oldest must go.
        let total = self.total_bytes();
        let mut freed = 0;
        let mut doomed = 0;
        while total - freed + record_len > self.limits.max_bytes && doomed < self.segments.len() {
            freed += self.segments[doomed].bytes;
            doomed += 1;
        }
        if doomed > 0 {
            let new_front = self.segments[doomed - 1].end;
            while self.head.front_record < new_front && !self.slots.is_empty() {
                self.evict_front(&mut pushed);
            }
            // Records before the front that were already acknowledged need no eviction.
            self.head.front_record = self.head.front_record.max(new_front);
        }
        if pushed.evicted_batches > 0 || doomed > 0 {
            self.write_head(false)?;
            self.collect_garbage(doomed == self.segments.len())?;
        }
        Ok(pushed)
    }

    fn segment_path(&self, base: u64) -> PathBuf {
        self.dir.join(segment_name(base))
    }

    fn read_record(&mut self, segment: u64, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        if !matches!(self.reader, Some((base, _)) if base == segment) {
            let path = self.segment_path(segment);
            self.reader = Some((segment, File::open(path)?));
        }
        let mut buf = vec![0u8; RECORD_HEADER + len as usize];
        match &self.reader {
            Some((_, f)) => f.read_exact_at(&mut buf, offset)?,
            None => return Err(io::Error::other("no reader")),
        }
        Ok(buf)
    }
}

impl Outbox for DiskQueue {
    type Error = QueueError;

    fn front_seq(&self) -> u64 {
        self.head.front_seq
    }

    fn len(&self) -> usize {
        self.slots.len()
    }

    fn push_back(&mut self, readings: &[Reading]) -> Result<Pushed, QueueError> {
        if readings.is_empty() || readings.len() > MAX_READINGS {
            return Err(QueueError::BadBatch(readings.len()));
        }
        let payload = encode_batch(readings)?;
        let record_len = (RECORD_HEADER + payload.len()) as u64;
        let pushed = self.make_room(record_len)?;
        let segment_bytes = self.limits.segment_bytes();
        let rotate = match self.segments.back() {
            None => true,
            Some(seg) => {
                self.tail.is_none()
                    || self.tail_poisoned
                    || (seg.bytes > 0 && seg.bytes + record_len > segment_bytes)
            }
        };
        if rotate {
            self.start_segment()?;
            // The previous tail may be fully acknowledged already.
            self.collect_garbage(false)?;
        }
        let record = self.next_record;
        let mut buf = Vec::with_capacity(RECORD_HEADER + payload.len());
        buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        buf.extend_from_slice(&crc32(&[&record.to_le_bytes(), &payload]).to_le_bytes());
        buf.extend_from_slice(&record.to_le_bytes());
        buf.extend_from_slice(&payload);
        let (base, offset) = match self.segments.back() {
            Some(seg) => (seg.base, seg.bytes),
            None => return Err(QueueError::BadBatch(0)),
        };
        let path = self.segment_path(base);
        let Some(tail) = self.tail.as_mut() else {
            return Err(io_err("append to", &path)(io::Error::other(
                "no open segment",
            )));
        };
        let written = tail.write_all(&buf).and_then(|()| tail.sync_data());
        if let Err(err) = written {
            // Cut off whatever part of the record made it, so later records follow a good
            // one; if even that fails, the next push starts a new segment.
            if tail.set_len(offset).is_err() {
                self.tail_poisoned = true;
            }
            return Err(io_err("append to", &path)(err));
        }
        if let Some(seg) = self.segments.back_mut() {
            seg.bytes += record_len;
            seg.end = record + 1;
        }
        self.slots.push_back(Slot::At {
            segment: base,
            offset,
            len: payload.len() as u32,
            readings: readings.len() as u8,
        });
        self.next_record += 1;
        Ok(pushed)
    }

    fn read(
        &mut self,
        index: usize,
        out: &mut HVec<Reading, MAX_READINGS>,
    ) -> Result<(), QueueError> {
        let len = self.slots.len();
        let Some(slot) = self.slots.get(index).copied() else {
            return Err(QueueError::OutOfRange { index, len });
        };
        let record = self.head.front_record + index as u64;
        let batch = match slot {
            Slot::Lost => None,
            Slot::At {
                segment,
                offset,
                len,
                ..
            } => {
                let path = self.segment_path(segment);
                let buf = self
                    .read_record(segment, offset, len)
                    .map_err(io_err("read", &path))?;
                parse_record(&buf, record).and_then(|(payload, _)| decode_batch(payload))
            }
        };
        out.clear();
        match batch {
            Some(readings) => *out = readings,
            None => {
                // Unreadable now although it was fine at open: media corruption. Keep the
                // number, make the loss visible.
                tracing::error!(record, dir = %self.dir.display(), "a queued batch is unreadable; sending a placeholder");
                let _ = out.push(lost_placeholder(self.opened_at));
            }
        }
        Ok(())
    }

    fn pop_front(&mut self, count: usize) -> Result<(), QueueError> {
        let count = count.min(self.slots.len());
        if count == 0 {
            return Ok(());
        }
        self.slots.drain(..count);
        self.head.front_record += count as u64;
        self.head.front_seq += count as u64;
        self.write_head(false)?;
        self.collect_garbage(false)
    }

    fn renumber(&mut self, front_seq: u64) -> Result<(), QueueError> {
        self.head.front_seq = front_seq;
        self.write_head(true)
    }
}

fn stats_of(
    head: &Head,
    segments: &VecDeque<Segment>,
    slots: &VecDeque<Slot>,
    lost: u64,
) -> QueueStats {
    QueueStats {
        batches: slots.len(),
        readings: slots.iter().map(Slot::readings).sum(),
        bytes: segments.iter().map(|s| s.bytes).sum(),
        segments: segments.len(),
        front_seq: head.front_seq,
        next_seq: head.front_seq + slots.len() as u64,
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

/// Checks a record (header + payload) with the expected record number; returns the payload
/// and the record's total length.
fn parse_record(buf: &[u8], record: u64) -> Option<(&[u8], usize)> {
    let header = buf.get(..RECORD_HEADER)?;
    let len = u32::from_le_bytes(header[0..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().ok()?);
    let number = u64::from_le_bytes(header[8..16].try_into().ok()?);
    if len == 0 || len > MAX_MESSAGE_BYTES || number != record {
        return None;
    }
    let payload = buf.get(RECORD_HEADER..RECORD_HEADER + len)?;
    (crc32(&[&header[8..16], payload]) == crc).then_some((payload, RECORD_HEADER + len))
}

/// Scans the directory: the head, every segment, every record.
fn load(dir: &Path, limits: QueueLimits) -> Result<Loaded, QueueError> {
    let head_path = dir.join(HEAD_FILE);
    let head = match fs::read(&head_path) {
        Ok(bytes) => bytes.chunks(HEAD_ENTRY).rev().find_map(Head::decode),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err("read", &head_path)(e)),
    };
    let mut bases = Vec::new();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Ok(Loaded {
                head: head.unwrap_or(Head {
                    front_record: 0,
                    front_seq: 1,
                    dropped: 0,
                }),
                segments: VecDeque::new(),
                slots: VecDeque::new(),
                next_record: 0,
                lost: 0,
                truncate: None,
                stale: Vec::new(),
            })
        }
        Err(e) => return Err(io_err("list", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err("list", dir))?;
        if let Some(base) = entry.file_name().to_str().and_then(parse_segment_name) {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    // Without a head (first start, or head.log lost) start at the oldest segment with
    // sequence 1; if the hub has seen higher numbers, the session renumbers on Welcome.
    let head = head.unwrap_or(Head {
        front_record: bases.first().copied().unwrap_or(0),
        front_seq: 1,
        dropped: 0,
    });
    let corrupt = |why: String| QueueError::Corrupt {
        dir: dir.to_path_buf(),
        why,
    };
    let mut loaded = Loaded {
        head,
        segments: VecDeque::new(),
        slots: VecDeque::new(),
        next_record: head.front_record,
        lost: 0,
        truncate: None,
        stale: Vec::new(),
    };
    // The next record number expected, to detect gaps between segments.
    let mut expected: Option<u64> = None;
    for (i, &base) in bases.iter().enumerate() {
        let path = dir.join(segment_name(base));
        let next_base = bases.get(i + 1).copied();
        let last = next_base.is_none();
        if next_base.is_some_and(|nb| nb <= head.front_record) {
            // Entirely acknowledged; a crash came between the head fsync and the unlink.
            loaded.stale.push(path);
            continue;
        }
        if let Some(exp) = expected {
            if base < exp {
                return Err(corrupt(format!(
                    "segment {} overlaps the previous one",
                    segment_name(base)
                )));
            }
        }
        let bytes = fs::read(&path).map_err(io_err("read", &path))?;
        let mut offset = 0usize;
        let mut record = base;
        let mut records = Vec::new();
        while offset < bytes.len() {
            match parse_record(&bytes[offset..], record) {
                Some((payload, total)) => {
                    let readings = decode_batch(payload).map(|b| b.len() as u8);
                    records.push((offset as u64, payload.len() as u32, readings));
                    offset += total;
                    record += 1;
                }
                None => break,
            }
        }
        let good_len = offset as u64;
        if good_len < bytes.len() as u64 && last {
            // A torn write at the very end: never reported as recorded.
            loaded.truncate = Some((path.clone(), good_len));
        }
        let mut end = record;
        if let Some(nb) = next_base {
            if nb < end {
                return Err(corrupt(format!(
                    "segment {} overlaps the next one",
                    segment_name(base)
                )));
            }
            // Records between the last readable one and the next segment are lost.
            end = nb;
        }
        // Gap before this segment (a segment went missing).
        let from = expected.unwrap_or(head.front_record).max(head.front_record);
        for r in from..base {
            push_lost(&mut loaded, r, limits, dir)?;
        }
        for (k, (off, len, readings)) in records.iter().enumerate() {
            let r = base + k as u64;
            if r < head.front_record {
                continue;
            }
            match readings {
                Some(n) => loaded.slots.push_back(Slot::At {
                    segment: base,
                    offset: *off,
                    len: *len,
                    readings: *n,
                }),
                None => push_lost(&mut loaded, r, limits, dir)?,
            }
        }
        for r in record.max(head.front_record)..end {
            push_lost(&mut loaded, r, limits, dir)?;
        }
        loaded.segments.push_back(Segment {
            base,
            end,
            bytes: if last { good_len } else { bytes.len() as u64 },
        });
        expected = Some(end);
    }
    loaded.next_record = expected.unwrap_or(head.front_record).max(head.front_record);
    let live = loaded.next_record - head.front_record;
    if live != loaded.slots.len() as u64 {
        return Err(corrupt(format!(
            "{} batches found for {} record numbers",
            loaded.slots.len(),
            live
        )));
    }
    Ok(loaded)
}

fn push_lost(
    loaded: &mut Loaded,
    record: u64,
    limits: QueueLimits,
    dir: &Path,
) -> Result<(), QueueError> {
    // A corrupt segment name could claim billions of missing records; refuse rather than
    // allocate placeholders for them.
    if loaded.lost as usize >= limits.max_batches.max(1 << 20) {
        return Err(QueueError::Corrupt {
            dir: dir.to_path_buf(),
            why: format!("too many unreadable records (at record {record})"),
        });
    }
    loaded.lost += 1;
    loaded.slots.push_back(Slot::Lost);
    Ok(())
}

/// Writes `head.log` afresh with one entry (temp file, fsync, rename, fsync of the
/// directory) and returns an append handle to it.
fn rewrite_head(dir: &Path, head: &Head) -> Result<File, QueueError> {
    let tmp = dir.join("head.log.tmp");
    let path = dir.join(HEAD_FILE);
    {
        let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(&head.encode()).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
    }
    fs::rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
    fsync_dir(dir)?;
    OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(io_err("open", &path))
}

fn fsync_dir(dir: &Path) -> Result<(), QueueError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
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

/// CRC-32 of the concatenation of `parts`. It catches torn and corrupted records; it is
/// not a defence against tampering (whoever can write the queue can also send readings).
fn crc32(parts: &[&[u8]]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Dir {
        fn new(label: &str) -> Dir {
            use std::sync::atomic::{AtomicU32, Ordering};
            static N: AtomicU32 = AtomicU32::new(0);
            let p = std::env::temp_dir().join(format!(
                "agent-queue-{label}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&p);
            Dir(p)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const ROOMY: QueueLimits = QueueLimits {
        max_bytes: 64 << 20,
        max_batches: 100_000,
    };

    fn batch(v: u64, n: usize) -> Vec<Reading> {
        (0..n)
            .map(|i| Reading {
                metric: truncated("counter"),
                ts: 1_700_000_000_000 + v,
                value: (v * 100 + i as u64) as f64,
            })
            .collect()
    }

    fn first_value(q: &mut DiskQueue, index: usize) -> f64 {
        let mut out = HVec::new();
        q.read(index, &mut out).expect("read");
        out[0].value
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(dir)
            .expect("list")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .and_then(parse_segment_name)
                    .is_some()
            })
            .collect();
        v.sort();
        v
    }

    #[test]
    fn crc_matches_the_standard_check_value() {
        assert_eq!(crc32(&[b"123456789"]), 0xCBF4_3926);
        assert_eq!(crc32(&[b"1234", b"56789"]), 0xCBF4_3926);
    }

    #[test]
    fn batches_survive_reopen_in_order() {
        let d = Dir::new("reopen");
        {
            let mut q = DiskQueue::open(&d.0, ROOMY).expect("open");
            assert_eq!((q.front_seq(), q.len()), (1, 0));
            for v in 0..5 {
                q.push_back(&batch(v, 3)).expect("push");
            }
            q.pop_front(2).expect("ack");
        }
        let mut q = DiskQueue::open(&d.0, ROOMY).expect("reopen");
        assert_eq!((q.front_seq(), q.len()), (3, 3));
        assert_eq!(first_value(&mut q, 0), 200.0);
        assert_eq!(first_value(&mut q, 2), 400.0);
        let mut out = HVec::new();
        q.read(0, &mut out).expect("read");
        assert_eq!(out.len(), 3);
        assert!(matches!(
            q.read(3, &mut out),
            Err(QueueError::OutOfRange { index: 3, len: 3 })
        ));
        assert_eq!(q.stats().readings, 9);
    }

    #[test]
    fn a_torn_tail_record_is_detected_and_ignored() {
        let d = Dir::new("torn");
        {
            let mut q = DiskQueue::open(&d.0, ROOMY).expect("open");
            for v in 0..3 {
                q.push_back(&batch(v, 2)).expect("push");
            }
        }
        let seg = segment_files(&d.0).pop().expect("segment");
        let good_len = fs::metadata(&seg).expect("meta").len();
        // A power cut in the middle of the fourth append: a header and half a payload.
        let mut f = OpenOptions::new().append(true).open(&seg).expect("open");
        let payload = encode_batch(&batch(3, 2)).expect("encode");
        f.write_all(&(payload.len() as u32).to_le_bytes())
            .expect("w");
        f.write_all(&crc32(&[&3u64.to_le_bytes(), &payload]).to_le_bytes())
            .expect("w");
        f.write_all(&3u64.to_le_bytes()).expect("w");
        f.write_all(&payload[..payload.len() / 2]).expect("w");
        drop(f);
        // And a torn head entry.
        let mut h = OpenOptions::new()
            .append(true)
            .open(d.0.join(HEAD_FILE))
            .expect("head");
        h.write_all(b"DAQ").expect("w");
        drop(h);

        let stats = DiskQueue::inspect(&d.0).expect("inspect");
        assert_eq!(stats.batches, 3, "inspect ignores the torn record");
        let mut q = DiskQueue::open(&d.0, ROOMY).expect("reopen");
        assert_eq!(q.len(), 3);
        assert_eq!(fs::metadata(&seg).expect("meta").len(), good_len, "cut off");
        // The next batch reuses the torn record's number: it was never recorded.
        q.push_back(&batch(9, 1)).expect("push");
        assert_eq!(q.len(), 4);
        assert_eq!(first_value(&mut q, 3), 900.0);
        drop(q);
        let mut q = DiskQueue::open(&d.0, ROOMY).expect("reopen 2");
        assert_eq!(q.len(), 4);
        assert_eq!(first_value(&mut q, 3), 900.0);
    }

    #[test]
    fn a_corrupted_last_record_is_treated_as_torn() {
        let d = Dir::new("flip");
        {
            let mut q = DiskQueue::open(&d.0, ROOMY).expect("open");
            for v in 0..2 {
                q.push_back(&batch(v, 1)).expect("push");
            }
        }
        let seg = segment_files(&d.0).pop().expect("segment");
        let mut bytes = fs::read(&seg).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&seg, &bytes).expect("write");
        let q = DiskQueue::open(&d.0, ROOMY).expect("reopen");
        assert_eq!(q.len(), 1);
    }

    #[test]
    fn segments_rotate_and_numbering_continues_across_restarts() {
        let d = Dir::new("wrap");
        let limits = QueueLimits {
            max_bytes: 1 << 20,
            max_batches: 100_000,
        };
        // 64 KiB segments; each batch of 20 readings is ~450 bytes.
        let mut q = DiskQueue::open(&d.0, limits).expect("open");
        for v in 0..600 {
            q.push_back(&batch(v, 20)).expect("push");
        }
        assert!(q.stats().segments >= 4, "{:?}", q.stats());
        // Acknowledge most: the fully acknowledged segments are deleted.
        q.pop_front(550).expect("ack");
        assert!(segment_files(&d.0).len() <= 2, "{:?}", segment_files(&d.0));
        assert_eq!(q.front_seq(), 551);
        drop(q);
        let mut q = DiskQueue::open(&d.0, limits).expect("reopen");
        assert_eq!((q.front_seq(), q.len()), (551, 50));
        assert_eq!(first_value(&mut q, 0), 55_000.0);
        // Drain completely, restart: the counter continues, it never goes back.
        q.pop_front(50).expect("ack");
        drop(q);
        let mut q = DiskQueue::open(&d.0, limits).expect("reopen 2");
        assert_eq!((q.front_seq(), q.len()), (601, 0));
        q.push_back(&batch(1000, 1)).expect("push");
        assert_eq!(q.front_seq(), 601);
        assert_eq!(first_value(&mut q, 0), 100_000.0);
    }

    #[test]
    fn when_full_the_oldest_are_dropped_and_counted() {
        let d = Dir::new("full");
        let limits = QueueLimits {
            max_bytes: 1 << 20,
            max_batches: 3,
        };
        let mut q = DiskQueue::open(&d.0, limits).expect("open");
        let mut evicted = Pushed::default();
        for v in 0..5 {
            let p = q.push_back(&batch(v, 4)).expect("push");
            evicted.evicted_batches += p.evicted_batches;
            evicted.evicted_readings += p.evicted_readings;
        }
        assert_eq!(evicted.evicted_batches, 2);
        assert_eq!(evicted.evicted_readings, 8);
        assert_eq!((q.front_seq(), q.len()), (3, 3));
        assert_eq!(first_value(&mut q, 0), 200.0);
        assert_eq!(q.stats().dropped_readings, 8);
        drop(q);
        let q = DiskQueue::open(&d.0, limits).expect("reopen");
        assert_eq!(q.stats().dropped_readings, 8, "the count survives restarts");
        assert_eq!((q.front_seq(), q.len()), (3, 3));
    }

    #[test]
    fn the_byte_limit_drops_whole_segments() {
        let d = Dir::new("bytes");
        let limits = QueueLimits {
            max_bytes: 64 << 10,
            max_batches: 100_000,
        };
        let mut q = DiskQueue::open(&d.0, limits).expect("open");
        let mut dropped = 0u64;
        for v in 0..1000 {
            dropped += u64::from(q.push_back(&batch(v, 10)).expect("push").evicted_readings);
            assert!(q.stats().bytes <= limits.max_bytes, "{:?}", q.stats());
        }
        let stats = q.stats();
        assert_eq!(stats.dropped_readings, dropped);
        assert!(dropped > 0);
        // Every reading is either still queued or counted as dropped.
        assert_eq!(stats.readings + dropped, 10_000);
        assert_eq!(stats.next_seq, 1001);
        // The newest batch is the last one pushed.
        let last = q.len() - 1;
        assert_eq!(first_value(&mut q, last), 99_900.0);
        drop(q);
        let q = DiskQueue::open(&d.0, limits).expect("reopen");
        assert_eq!(q.stats(), stats);
    }

    #[test]
    fn renumbering_is_durable() {
        let d = Dir::new("renumber");
        {
            let mut q = DiskQueue::open(&d.0, ROOMY).expect("open");
            q.push_back(&batch(0, 1)).expect("push");
            q.push_back(&batch(1, 1)).expect("push");
            q.renumber(42).expect("renumber");
        }
        let q = DiskQueue::open(&d.0, ROOMY).expect("reopen");
        assert_eq!((q.front_seq(), q.len()), (42, 2));
        assert_eq!(q.stats().next_seq, 44);
    }

    #[test]
    fn a_second_agent_cannot_open_the_same_queue() {
        let d = Dir::new("lock");
        let _q = DiskQueue::open(&d.0, ROOMY).expect("open");
        match DiskQueue::open(&d.0, ROOMY) {
            Err(QueueError::Locked { pid, .. }) => {
                assert_eq!(pid, std::process::id().to_string())
            }
            other => panic!("expected Locked, got {other:?}"),
        }
    }

    #[test]
    fn a_damaged_older_segment_keeps_numbering_with_placeholders() {
        let d = Dir::new("damaged");
        let limits = QueueLimits {
            max_bytes: 64 << 10, // 4 KiB segments
            max_batches: 100_000,
        };
        {
            let mut q = DiskQueue::open(&d.0, limits).expect("open");
            for v in 0..40 {
                q.push_back(&batch(v, 10)).expect("push");
            }
        }
        let segs = segment_files(&d.0);
        assert!(segs.len() >= 2);
        // Flip a byte in the middle of the first segment.
        let mut bytes = fs::read(&segs[0]).expect("read");
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x55;
        fs::write(&segs[0], &bytes).expect("write");
        let mut q = DiskQueue::open(&d.0, limits).expect("reopen");
        assert_eq!(q.len(), 40, "numbering is kept");
        let lost = q.stats().lost_batches;
        assert!(lost >= 1, "{:?}", q.stats());
        let mut out = HVec::new();
        let mut placeholders = 0;
        for i in 0..40 {
            q.read(i, &mut out).expect("read");
            if out[0].metric == LOST_BATCH_METRIC {
                placeholders += 1;
            } else {
                assert_eq!(out[0].value, (i * 100) as f64);
            }
        }
        assert_eq!(placeholders, lost);
    }

    #[test]
    fn empty_and_oversized_batches_are_refused() {
        let d = Dir::new("bad");
        let mut q = DiskQueue::open(&d.0, ROOMY).expect("open");
        assert!(matches!(q.push_back(&[]), Err(QueueError::BadBatch(0))));
        assert!(matches!(
            q.push_back(&batch(0, 65)),
            Err(QueueError::BadBatch(65))
        ));
        assert_eq!(q.len(), 0);
    }

    #[test]
    #[allow(clippy::print_stdout)]
    fn append_throughput() {
        // Not a benchmark harness, just a number for the report: every push is an
        // fdatasync, so this measures the disk as much as the code.
        let d = Dir::new("speed");
        let mut q = DiskQueue::open(&d.0, ROOMY).expect("open");
        let b = batch(1, 32);
        let start = std::time::Instant::now();
        let n = 200;
        for _ in 0..n {
            q.push_back(&b).expect("push");
        }
        let per_s = f64::from(n) / start.elapsed().as_secs_f64();
        println!("queue append+fdatasync: {per_s:.0} batches/s of 32 readings");
    }
}

//! A bounded, durable, on-disk FIFO ("spool") for telemetry that InfluxDB could not take.
//!
//! The InfluxDB backend acknowledges a batch either once InfluxDB accepted it or once it is
//! in this spool, so the spool must be exactly as durable as an acknowledgement promises.
//! It is a [`segment_log::SegmentLog`]; that crate documents the files and the crash
//! guarantees. What the spool adds:
//!
//! - **Append** is a durable append: when it returns, the record survives a crash or a
//!   power cut, and only then is the batch acknowledged.
//! - **The head** is the first record InfluxDB does not have yet. It is committed durably
//!   after InfluxDB accepted the records before it, so a crash can only make the spool
//!   re-send records InfluxDB already has. That is harmless: a point written twice (same
//!   measurement, tags and time) replaces itself.
//! - **Recovery** at open: the log cuts off a torn append (never acknowledged) and damaged
//!   data (acknowledged: reported loudly in [`Recovery::corrupt_bytes`]); an unreadable
//!   head restarts draining at the oldest segment ([`Recovery::head_reset`]).
//! - **Bounds**: the log's byte cap. An append that would pass it is refused with
//!   [`SpoolError::Full`], and the caller refuses the batch (nothing acked is ever dropped
//!   to make room). Drained segments are deleted, and when the spool is empty every
//!   segment is, so an idle spool takes no disk space.
//!
//! Each record is one group commit: the line protocol written to InfluxDB, the number of
//! points in it, and the `(device, seq)` marks it carries, so that a restart can raise the
//! high-water marks of everything the spool holds. Its payload is a version byte (`1`),
//! the points (`u32` LE), the number of marks (`u32` LE), each mark as the device id's
//! length (`u16` LE), the id and the seq (`u64` LE), then the line protocol.
//!
//! A spool directory written by a hub before the segment log is moved to it when the
//! spool is opened (`spool/upgrade.rs`).

mod upgrade;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use segment_log::{Durability, HeadState, LogError, LogOptions, Meta, SegmentLog};

/// Version byte at the start of every record payload.
const RECORD_VERSION: u8 = 1;
/// The spool keeps no metadata in the log's head.
const NO_META: Meta = [0; segment_log::META_BYTES];

/// Sizes of a spool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolOptions {
    /// Most bytes all segment files may take together.
    pub max_bytes: u64,
    /// A segment is closed and a new one started once it would grow past this (a single
    /// record larger than this gets a segment of its own).
    pub segment_bytes: u64,
}

impl SpoolOptions {
    /// Options for a spool of `max_bytes`, with segments of an eighth of it (between
    /// 64 KiB and 16 MiB), so a drained segment is freed long before the spool is full.
    pub fn for_capacity(max_bytes: u64) -> SpoolOptions {
        SpoolOptions {
            max_bytes,
            segment_bytes: (max_bytes / 8).clamp(64 * 1024, 16 * 1024 * 1024),
        }
    }

    fn log_options(&self) -> LogOptions {
        LogOptions {
            max_bytes: self.max_bytes,
            segment_bytes: self.segment_bytes,
        }
    }
}

/// One spooled group commit.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The highest sequence number per device in this record.
    pub marks: Vec<(Arc<str>, u64)>,
    /// Points (lines) in `lines`.
    pub points: u32,
    /// InfluxDB line protocol, one point per `\n`-terminated line.
    pub lines: Vec<u8>,
}

/// Records read from the head of the spool, in order.
#[derive(Debug)]
pub struct Chunk {
    /// The records.
    pub records: Vec<Record>,
    /// The number of the record after the last of them: pass it to [`Spool::advance`]
    /// once they are safely elsewhere.
    pub end: u64,
}

/// What [`Spool::open`] found.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Records waiting to be drained.
    pub records: u64,
    /// Points (lines of line protocol) in those records.
    pub points: u64,
    /// Bytes of segment files kept.
    pub bytes: u64,
    /// Bytes of a torn last record (an interrupted, never acknowledged append) cut off.
    pub truncated_bytes: u64,
    /// Bytes cut off in the middle of the spool because they failed their CRC (the disk
    /// corrupted acknowledged data); reported so it can be logged loudly.
    pub corrupt_bytes: u64,
    /// The head pointer was unreadable, so draining restarts at the oldest segment
    /// (re-sending points InfluxDB may already have, which is harmless).
    pub head_reset: bool,
    /// The highest sequence number per device among the waiting records.
    pub marks: Vec<(Arc<str>, u64)>,
}

/// Why a spool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The file system failed.
    #[error("spool I/O error on {}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The segment log under the spool failed.
    #[error("spool: {0}")]
    Log(LogError),
    /// The record does not fit in the remaining capacity.
    #[error("the spool is full ({used} of {max} bytes used, the record needs {need} more)")]
    Full {
        /// Bytes in use.
        used: u64,
        /// The capacity.
        max: u64,
        /// Bytes the refused record needed.
        need: u64,
    },
    /// A record cannot be framed (its payload is 4 GiB or larger, or a device id is
    /// longer than 64 KiB).
    #[error("a spool record of {0} bytes is too large to frame")]
    TooLarge(usize),
    /// A record read back from disk failed its checks (the disk corrupted it after the
    /// spool was opened); it was skipped so that draining can go on.
    #[error("spool record {number} failed its checks ({why}) and was skipped")]
    Corrupt {
        /// The record's number.
        number: u64,
        /// What was wrong.
        why: &'static str,
    },
}

impl From<LogError> for SpoolError {
    fn from(e: LogError) -> SpoolError {
        match e {
            LogError::Full { used, max, need } => SpoolError::Full { used, max, need },
            LogError::TooLarge { len } => SpoolError::TooLarge(len),
            other => SpoolError::Log(other),
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A bounded on-disk FIFO of [`Record`]s. Not thread-safe by itself; callers wrap it in a
/// mutex. All methods block on file I/O.
#[derive(Debug)]
pub struct Spool {
    log: SegmentLog,
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir`, moving an older hub's spool into the
    /// current layout and recovering from a crash: torn tails are cut off, drained
    /// segments deleted.
    ///
    /// # Errors
    /// The directory or a segment cannot be read, written or truncated.
    pub fn open(dir: &Path, opts: SpoolOptions) -> Result<(Spool, Recovery), SpoolError> {
        let upgraded = upgrade::from_v1(dir, opts)?;
        if let Some(u) = &upgraded {
            tracing::info!(spool = %dir.display(), records = u.records, "moved the telemetry spool from the previous on-disk layout to the segment log");
        }
        let mut points = 0u64;
        let mut marks: HashMap<Arc<str>, u64> = HashMap::new();
        let (log, found) = SegmentLog::open(dir, opts.log_options(), |_, payload| {
            if let Some((header, _)) = decode_header(payload) {
                points += u64::from(header.points);
                for (device, seq) in header.marks {
                    let m = marks.entry(device).or_insert(0);
                    *m = (*m).max(seq);
                }
            }
        })?;
        let mut spool = Spool { log };
        spool.remove_if_empty()?;
        let mut recovery = Recovery {
            records: spool.records(),
            points,
            bytes: spool.bytes(),
            truncated_bytes: found.truncated_bytes,
            corrupt_bytes: found.corrupt_bytes,
            head_reset: found.head == HeadState::Corrupt,
            marks: marks.into_iter().collect(),
        };
        if let Some(u) = upgraded {
            recovery.truncated_bytes += u.truncated_bytes;
            recovery.corrupt_bytes += u.corrupt_bytes;
            recovery.head_reset |= u.head_reset;
        }
        recovery.marks.sort();
        Ok((spool, recovery))
    }

    /// Whether nothing waits to be drained.
    pub fn is_empty(&self) -> bool {
        self.log.live_records() == 0
    }

    /// Records waiting to be drained.
    pub fn records(&self) -> u64 {
        self.log.live_records()
    }

    /// Bytes of all segment files (what the spool takes on disk).
    pub fn bytes(&self) -> u64 {
        self.log.bytes()
    }

    /// The capacity in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.log.options().max_bytes
    }

    /// The spool's directory.
    pub fn dir(&self) -> &Path {
        self.log.dir()
    }

    /// Appends a record durably: when this returns `Ok`, the record survives a crash or a
    /// power cut.
    ///
    /// # Errors
    /// [`SpoolError::Full`] when it does not fit (nothing was written); an I/O error
    /// (the partial record is cut off again, or, if even that fails, later records go to a
    /// fresh segment and recovery cuts it off).
    pub fn append(
        &mut self,
        marks: &[(Arc<str>, u64)],
        points: u32,
        lines: &[u8],
    ) -> Result<(), SpoolError> {
        let payload = encode_payload(marks, points, lines)?;
        self.log.append(&payload, Durability::Durable)?;
        Ok(())
    }

    /// Reads records from the head, in order, until about `max_bytes` of line protocol (at
    /// least one record). Returns `None` when the spool is empty. Nothing is removed: call
    /// [`Spool::advance`] with the chunk's `end` once the records are safely elsewhere.
    ///
    /// # Errors
    /// I/O errors; [`SpoolError::Corrupt`] when the first record fails its checks (the disk
    /// corrupted it after the spool was opened): it is skipped so that draining can go on.
    pub fn read_chunk(&mut self, max_bytes: u64) -> Result<Option<Chunk>, SpoolError> {
        let mut records = Vec::new();
        let mut size = 0u64;
        let mut number = self.log.front();
        while number < self.log.end() && (records.is_empty() || size < max_bytes) {
            let decoded = match self.log.read(number) {
                Ok(payload) => decode_payload(payload).ok_or("malformed record"),
                // Lost before the spool was opened, and reported then.
                Err(LogError::Missing { .. }) => {
                    number += 1;
                    continue;
                }
                Err(LogError::Corrupt { why, .. }) => Err(why),
                Err(e) => return Err(e.into()),
            };
            match decoded {
                Ok(record) => {
                    size += record.lines.len() as u64;
                    records.push(record);
                }
                Err(why) if records.is_empty() => {
                    self.advance(number + 1)?;
                    return Err(SpoolError::Corrupt { number, why });
                }
                // Hand out what is good; the next call meets the bad record first.
                Err(_) => break,
            }
            number += 1;
        }
        Ok((!records.is_empty()).then_some(Chunk {
            records,
            end: number,
        }))
    }

    /// Marks everything before record `end` as drained: durably moves the head there, then
    /// deletes segments that are wholly drained (all of them when the spool is now empty).
    ///
    /// # Errors
    /// The head cannot be written, or a drained segment cannot be deleted. Either way,
    /// nothing waiting is lost; at worst some drained records are drained again.
    pub fn advance(&mut self, end: u64) -> Result<(), SpoolError> {
        self.log.commit(end, NO_META, Durability::Durable)?;
        self.remove_if_empty()
    }

    /// When nothing waits (perhaps only records lost to damage), moves the head to the end
    /// and deletes every segment.
    fn remove_if_empty(&mut self) -> Result<(), SpoolError> {
        if !self.is_empty() {
            return Ok(());
        }
        if self.log.front() < self.log.end() {
            self.log
                .commit(self.log.end(), NO_META, Durability::Durable)?;
        }
        self.log.remove_consumed_tail()?;
        Ok(())
    }
}

/// A record's payload without the line protocol: points and marks.
struct Header {
    points: u32,
    marks: Vec<(Arc<str>, u64)>,
}

fn encode_payload(
    marks: &[(Arc<str>, u64)],
    points: u32,
    lines: &[u8],
) -> Result<Vec<u8>, SpoolError> {
    let marks_len: usize = marks.iter().map(|(d, _)| 2 + d.len() + 8).sum();
    let payload_len = 1 + 4 + 4 + marks_len + lines.len();
    let mark_count = u32::try_from(marks.len()).map_err(|_| SpoolError::TooLarge(payload_len))?;
    let mut payload = Vec::with_capacity(payload_len);
    payload.push(RECORD_VERSION);
    payload.extend_from_slice(&points.to_le_bytes());
    payload.extend_from_slice(&mark_count.to_le_bytes());
    for (device, seq) in marks {
        // Device ids are at most 64 bytes; a longer one cannot be framed.
        let n = u16::try_from(device.len()).map_err(|_| SpoolError::TooLarge(payload_len))?;
        payload.extend_from_slice(&n.to_le_bytes());
        payload.extend_from_slice(device.as_bytes());
        payload.extend_from_slice(&seq.to_le_bytes());
    }
    payload.extend_from_slice(lines);
    Ok(payload)
}

/// Decodes the points and marks of a payload whose CRC matched and returns where its line
/// protocol starts; `None` if its structure is wrong anyway.
fn decode_header(payload: &[u8]) -> Option<(Header, usize)> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let field = payload.get(at..at.checked_add(n)?)?;
        at += n;
        Some(field)
    };
    if take(1)? != [RECORD_VERSION] {
        return None;
    }
    let points = u32::from_le_bytes(take(4)?.try_into().ok()?);
    let count = u32::from_le_bytes(take(4)?.try_into().ok()?);
    let mut marks = Vec::new();
    for _ in 0..count {
        let n = u16::from_le_bytes(take(2)?.try_into().ok()?) as usize;
        let device: Arc<str> = Arc::from(std::str::from_utf8(take(n)?).ok()?);
        let seq = u64::from_le_bytes(take(8)?.try_into().ok()?);
        marks.push((device, seq));
    }
    Some((Header { points, marks }, at))
}

/// Decodes a payload whose CRC matched; `None` if its structure is wrong anyway.
fn decode_payload(mut payload: Vec<u8>) -> Option<Record> {
    let (header, at) = decode_header(&payload)?;
    payload.drain(..at);
    Some(Record {
        marks: header.marks,
        points: header.points,
        lines: payload,
    })
}

#[cfg(test)]
mod tests;

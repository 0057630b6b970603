//! A bounded, durable, on-disk FIFO ("spool") for telemetry that InfluxDB could not take.
//!
//! The InfluxDB backend acknowledges a batch either once InfluxDB accepted it or once it is
//! in this spool, so the spool must be exactly as durable as an acknowledgement promises:
//!
//! - **Segments** `seg-<id>.log` are append-only files of framed records. A frame is
//!   `len: u32 LE | crc: u32 LE | payload`, where `crc` is CRC-32 (IEEE) over the four
//!   length bytes and the payload. Every append is followed by `fdatasync` before it
//!   returns, and a new segment's directory entry is synced before anything relies on it.
//! - **The head** (`head`: segment id, offset and a CRC) says where the next undrained
//!   record starts. It is replaced atomically (write a temp file, fsync, rename, fsync the
//!   directory) after InfluxDB accepted the records before it, so a crash can only make the
//!   spool re-send records InfluxDB already has. That is harmless: a point written twice
//!   (same measurement, tags and time) replaces itself.
//! - **Recovery** at open validates every frame. A torn tail (a crash in the middle of an
//!   append, which was never acknowledged) fails its length or CRC check and is cut off;
//!   everything before it is kept. Segments wholly before the head are deleted.
//! - **Bounds**: the files never exceed `max_bytes` together; an append that would is
//!   refused with [`SpoolError::Full`], and the caller refuses the batch (nothing acked is
//!   ever dropped to make room). Fully drained segments are deleted, and when the spool is
//!   empty every segment is, so an idle spool takes no disk space.
//!
//! Each record is one group commit: the line protocol written to InfluxDB, the number of
//! points in it, and the `(device, seq)` marks it carries, so that a restart can raise the
//! high-water marks of everything the spool holds.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Bytes of a frame header (length and CRC).
const FRAME_HEADER: u64 = 8;
/// The head pointer file.
const HEAD_FILE: &str = "head";
/// Where a new head pointer is written before it is renamed over [`HEAD_FILE`].
const HEAD_TMP: &str = "head.tmp";
/// Version byte at the start of every record payload.
const RECORD_VERSION: u8 = 1;

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

/// Where a record starts, or where the spool's content ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// Segment id.
    pub segment: u64,
    /// Byte offset in the segment.
    pub offset: u64,
}

/// Records read from the head of the spool, in order.
#[derive(Debug)]
pub struct Chunk {
    /// The records.
    pub records: Vec<Record>,
    /// The position just after the last of them: pass it to [`Spool::advance`] once
    /// they are safely elsewhere.
    pub end: Position,
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
    /// A record cannot be framed (its payload is 4 GiB or larger).
    #[error("a spool record of {0} bytes is too large to frame")]
    TooLarge(usize),
    /// A frame read back from disk failed its checks; the rest of its segment was skipped.
    #[error("corrupt spool data in {} at offset {offset}: {why}; skipped {skipped} bytes", path.display())]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// Where the bad frame starts.
        offset: u64,
        /// What was wrong.
        why: &'static str,
        /// Bytes skipped.
        skipped: u64,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |source| SpoolError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug)]
struct Segment {
    id: u64,
    /// Bytes of valid frames (the file may not be longer).
    len: u64,
}

/// A bounded on-disk FIFO of [`Record`]s. Not thread-safe by itself; callers wrap it in a
/// mutex. All methods block on file I/O.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    opts: SpoolOptions,
    /// Existing segments, oldest first; all have ids at or after the head's.
    segments: VecDeque<Segment>,
    head: Position,
    /// The newest segment, open for appending. `None` until the first append after open
    /// or after the spool emptied, so a new segment is started then.
    tail: Option<File>,
    /// Records waiting (exact unless corrupt data was skipped; reset when empty).
    records: u64,
    /// Bytes of all segment files.
    bytes: u64,
    next_id: u64,
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir`, recovering from a crash: torn tails
    /// are cut off, drained segments deleted.
    ///
    /// # Errors
    /// The directory or a segment cannot be read, written or truncated.
    pub fn open(dir: &Path, opts: SpoolOptions) -> Result<(Spool, Recovery), SpoolError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let _ = fs::remove_file(dir.join(HEAD_TMP));
        let mut ids = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            if let Some(id) = entry.file_name().to_str().and_then(segment_id) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        let mut recovery = Recovery::default();
        let oldest = Position {
            segment: ids.first().copied().unwrap_or(0),
            offset: 0,
        };
        let mut head = match read_head(dir)? {
            HeadFile::Missing => oldest,
            HeadFile::Valid(p) => p,
            HeadFile::Corrupt => {
                recovery.head_reset = true;
                oldest
            }
        };
        let mut segments = VecDeque::new();
        let mut marks: HashMap<Arc<str>, u64> = HashMap::new();
        for (i, &id) in ids.iter().enumerate() {
            let path = segment_path(dir, id);
            if id < head.segment {
                // Drained before a crash prevented its deletion.
                fs::remove_file(&path).map_err(io_err(&path))?;
                continue;
            }
            let scan = scan_segment(&path)?;
            if scan.valid_len < scan.file_len {
                let cut = scan.file_len - scan.valid_len;
                if i + 1 == ids.len() {
                    recovery.truncated_bytes += cut;
                } else {
                    recovery.corrupt_bytes += cut;
                }
                let file = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                file.set_len(scan.valid_len)
                    .and_then(|()| file.sync_all())
                    .map_err(io_err(&path))?;
            }
            let start = if id == head.segment {
                // The head must sit on a frame boundary; if it does not (it always should),
                // back off to the previous boundary: re-sending a record is harmless.
                let boundary = scan
                    .frames
                    .iter()
                    .map(|f| f.offset)
                    .chain(std::iter::once(scan.valid_len))
                    .filter(|&o| o <= head.offset)
                    .max()
                    .unwrap_or(0);
                head.offset = boundary;
                boundary
            } else {
                0
            };
            for frame in scan.frames {
                if frame.offset >= start {
                    recovery.records += 1;
                    recovery.points += u64::from(frame.points);
                    for (device, seq) in frame.marks {
                        let m = marks.entry(device).or_insert(0);
                        *m = (*m).max(seq);
                    }
                }
            }
            segments.push_back(Segment {
                id,
                len: scan.valid_len,
            });
        }
        let next_id = ids.last().copied().unwrap_or(0).max(head.segment) + 1;
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            opts,
            segments,
            head,
            tail: None,
            records: recovery.records,
            bytes: 0,
            next_id,
        };
        spool.bytes = spool.segments.iter().map(|s| s.len).sum();
        if spool.pending_bytes() == 0 {
            spool.clear()?;
        }
        recovery.bytes = spool.bytes;
        recovery.marks = marks.into_iter().collect();
        recovery.marks.sort();
        Ok((spool, recovery))
    }

    /// Whether nothing waits to be drained.
    pub fn is_empty(&self) -> bool {
        self.pending_bytes() == 0
    }

    /// Records waiting to be drained.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Bytes of all segment files (what the spool takes on disk).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The capacity in bytes.
    pub fn max_bytes(&self) -> u64 {
        self.opts.max_bytes
    }

    /// The spool's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn pending_bytes(&self) -> u64 {
        self.segments
            .iter()
            .map(|s| {
                if s.id == self.head.segment {
                    s.len.saturating_sub(self.head.offset)
                } else {
                    s.len
                }
            })
            .sum()
    }

    /// Appends a record durably: when this returns `Ok`, the record survives a crash or a
    /// power cut.
    ///
    /// # Errors
    /// [`SpoolError::Full`] when it does not fit (nothing was written); an I/O error
    /// (the partial frame is cut off again, or, if even that fails, the segment is closed
    /// so that recovery cuts it off and later records go to a fresh segment).
    pub fn append(
        &mut self,
        marks: &[(Arc<str>, u64)],
        points: u32,
        lines: &[u8],
    ) -> Result<(), SpoolError> {
        let frame = encode_frame(marks, points, lines)?;
        let need = frame.len() as u64;
        if self.bytes + need > self.opts.max_bytes {
            return Err(SpoolError::Full {
                used: self.bytes,
                max: self.opts.max_bytes,
                need,
            });
        }
        let tail_len = self.segments.back().map_or(0, |s| s.len);
        if self.tail.is_none() || (tail_len > 0 && tail_len + need > self.opts.segment_bytes) {
            self.rotate()?;
        }
        let (Some(file), Some(segment)) = (self.tail.as_mut(), self.segments.back_mut()) else {
            return Err(SpoolError::Io {
                path: self.dir.clone(),
                source: io::Error::other("no open segment after rotation"),
            });
        };
        let path = segment_path(&self.dir, segment.id);
        match file.write_all(&frame).and_then(|()| file.sync_data()) {
            Ok(()) => {
                segment.len += need;
                self.bytes += need;
                self.records += 1;
                Ok(())
            }
            Err(source) => {
                // Cut the partial frame off so the next append does not land behind garbage.
                let undone = file
                    .set_len(segment.len)
                    .and_then(|()| file.sync_data())
                    .is_ok();
                if !undone {
                    self.tail = None;
                }
                Err(SpoolError::Io { path, source })
            }
        }
    }

    fn rotate(&mut self) -> Result<(), SpoolError> {
        self.tail = None;
        let id = self.next_id;
        let path = segment_path(&self.dir, id);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io_err(&path))?;
        // The new file's directory entry must be durable before a record in it is acked.
        sync_dir(&self.dir)?;
        self.next_id += 1;
        self.segments.push_back(Segment { id, len: 0 });
        self.tail = Some(file);
        Ok(())
    }

    /// Reads records from the head, in order, until about `max_bytes` of payload (at least
    /// one record). Returns `None` when the spool is empty. Nothing is removed: call
    /// [`Spool::advance`] with the chunk's `end` once the records are safely elsewhere.
    ///
    /// # Errors
    /// I/O errors; [`SpoolError::Corrupt`] when a frame fails its checks (the disk
    /// corrupted it after recovery): the rest of that segment is skipped so that draining
    /// can go on, and the error says how much was lost.
    pub fn read_chunk(&mut self, max_bytes: u64) -> Result<Option<Chunk>, SpoolError> {
        let mut records = Vec::new();
        let mut size = 0u64;
        let mut pos = self.head;
        let segments: Vec<(u64, u64)> = self
            .segments
            .iter()
            .filter(|s| s.id >= self.head.segment)
            .map(|s| (s.id, s.len))
            .collect();
        for (id, len) in segments {
            let mut offset = if id == self.head.segment {
                self.head.offset
            } else {
                0
            };
            if offset >= len {
                pos = Position {
                    segment: id,
                    offset: len,
                };
                continue;
            }
            let path = segment_path(&self.dir, id);
            let mut file = File::open(&path).map_err(io_err(&path))?;
            file.seek(SeekFrom::Start(offset)).map_err(io_err(&path))?;
            let mut reader = BufReader::with_capacity(256 * 1024, file);
            while offset < len {
                if !records.is_empty() && size >= max_bytes {
                    return Ok(Some(Chunk {
                        records,
                        end: Position {
                            segment: id,
                            offset,
                        },
                    }));
                }
                match read_frame(&mut reader, len - offset) {
                    Ok((record, frame_len)) => {
                        size += record.lines.len() as u64;
                        records.push(record);
                        offset += frame_len;
                    }
                    Err(FrameError::Io(source)) => return Err(SpoolError::Io { path, source }),
                    Err(FrameError::Bad(why)) => {
                        if !records.is_empty() {
                            // Hand out what is good; the next call meets the bad frame first.
                            return Ok(Some(Chunk {
                                records,
                                end: Position {
                                    segment: id,
                                    offset,
                                },
                            }));
                        }
                        let skipped = len - offset;
                        self.advance(
                            Position {
                                segment: id,
                                offset: len,
                            },
                            0,
                        )?;
                        return Err(SpoolError::Corrupt {
                            path,
                            offset,
                            why,
                            skipped,
                        });
                    }
                }
            }
            pos = Position {
                segment: id,
                offset: len,
            };
        }
        Ok((!records.is_empty()).then_some(Chunk { records, end: pos }))
    }

    /// Marks everything before `end` as drained (`records` of them): durably moves the head
    /// there, then deletes segments that are wholly drained (all of them when the spool is
    /// now empty).
    ///
    /// # Errors
    /// The head pointer cannot be written, or a drained segment cannot be deleted. Either
    /// way, nothing waiting is lost; at worst some drained records are drained again.
    pub fn advance(&mut self, end: Position, records: u64) -> Result<(), SpoolError> {
        write_head(&self.dir, end)?;
        self.head = end;
        self.records = self.records.saturating_sub(records);
        while let Some(front) = self.segments.front() {
            if front.id >= end.segment {
                break;
            }
            let path = segment_path(&self.dir, front.id);
            remove_if_exists(&path)?;
            self.bytes -= front.len;
            self.segments.pop_front();
        }
        if self.pending_bytes() == 0 {
            self.clear()?;
        }
        Ok(())
    }

    /// Deletes every segment (the spool holds nothing waiting). The head stays where it
    /// is; new segments get higher ids, so they are read from their start.
    fn clear(&mut self) -> Result<(), SpoolError> {
        self.tail = None;
        while let Some(segment) = self.segments.pop_front() {
            remove_if_exists(&segment_path(&self.dir, segment.id))?;
        }
        self.bytes = 0;
        self.records = 0;
        Ok(())
    }
}

fn remove_if_exists(path: &Path) -> Result<(), SpoolError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("seg-{id:020}.log"))
}

fn segment_id(name: &str) -> Option<u64> {
    name.strip_prefix("seg-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

enum HeadFile {
    Missing,
    Valid(Position),
    Corrupt,
}

fn read_head(dir: &Path) -> Result<HeadFile, SpoolError> {
    let path = dir.join(HEAD_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(HeadFile::Missing),
        Err(e) => return Err(io_err(&path)(e)),
    };
    let parsed = (|| {
        let segment = u64::from_le_bytes(bytes.get(0..8)?.try_into().ok()?);
        let offset = u64::from_le_bytes(bytes.get(8..16)?.try_into().ok()?);
        let crc = u32::from_le_bytes(bytes.get(16..20)?.try_into().ok()?);
        (bytes.len() == 20 && crc32(0, &bytes[..16]) == crc).then_some(Position { segment, offset })
    })();
    Ok(parsed.map_or(HeadFile::Corrupt, HeadFile::Valid))
}

fn write_head(dir: &Path, pos: Position) -> Result<(), SpoolError> {
    let mut buf = [0u8; 20];
    buf[..8].copy_from_slice(&pos.segment.to_le_bytes());
    buf[8..16].copy_from_slice(&pos.offset.to_le_bytes());
    let crc = crc32(0, &buf[..16]);
    buf[16..].copy_from_slice(&crc.to_le_bytes());
    let tmp = dir.join(HEAD_TMP);
    File::create(&tmp)
        .and_then(|mut f| f.write_all(&buf).and_then(|()| f.sync_all()))
        .map_err(io_err(&tmp))?;
    let path = dir.join(HEAD_FILE);
    fs::rename(&tmp, &path).map_err(io_err(&path))?;
    sync_dir(dir)
}

fn encode_frame(
    marks: &[(Arc<str>, u64)],
    points: u32,
    lines: &[u8],
) -> Result<Vec<u8>, SpoolError> {
    let marks_len: usize = marks.iter().map(|(d, _)| 2 + d.len() + 8).sum();
    let payload_len = 1 + 4 + 4 + marks_len + lines.len();
    let len = u32::try_from(payload_len).map_err(|_| SpoolError::TooLarge(payload_len))?;
    let mark_count = u32::try_from(marks.len()).map_err(|_| SpoolError::TooLarge(payload_len))?;
    let mut frame = Vec::with_capacity(FRAME_HEADER as usize + payload_len);
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&[0; 4]);
    frame.push(RECORD_VERSION);
    frame.extend_from_slice(&points.to_le_bytes());
    frame.extend_from_slice(&mark_count.to_le_bytes());
    for (device, seq) in marks {
        // Device ids are at most 64 bytes; a longer one cannot be framed.
        let n = u16::try_from(device.len()).map_err(|_| SpoolError::TooLarge(payload_len))?;
        frame.extend_from_slice(&n.to_le_bytes());
        frame.extend_from_slice(device.as_bytes());
        frame.extend_from_slice(&seq.to_le_bytes());
    }
    frame.extend_from_slice(lines);
    let crc = crc32(crc32(0, &frame[0..4]), &frame[8..]);
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(frame)
}

enum FrameError {
    Io(io::Error),
    Bad(&'static str),
}

/// Reads one frame of at most `room` bytes; returns the record and the frame's length.
fn read_frame(reader: &mut impl Read, room: u64) -> Result<(Record, u64), FrameError> {
    let mut header = [0u8; FRAME_HEADER as usize];
    if room < FRAME_HEADER {
        return Err(FrameError::Bad("truncated frame header"));
    }
    reader.read_exact(&mut header).map_err(FrameError::Io)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as u64;
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > room - FRAME_HEADER {
        return Err(FrameError::Bad("frame runs past the end of the segment"));
    }
    let mut payload = vec![0u8; len as usize];
    reader.read_exact(&mut payload).map_err(FrameError::Io)?;
    if crc32(crc32(0, &header[0..4]), &payload) != crc {
        return Err(FrameError::Bad("CRC mismatch"));
    }
    let record = decode_payload(payload).ok_or(FrameError::Bad("malformed record"))?;
    Ok((record, FRAME_HEADER + len))
}

/// Decodes a payload whose CRC matched; `None` if its structure is wrong anyway.
fn decode_payload(mut payload: Vec<u8>) -> Option<Record> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<std::ops::Range<usize>> {
        let r = at..at.checked_add(n)?;
        at = r.end;
        (r.end <= payload.len()).then_some(r)
    };
    let version = payload.get(take(1)?)?[0];
    if version != RECORD_VERSION {
        return None;
    }
    let points = u32::from_le_bytes(payload.get(take(4)?)?.try_into().ok()?);
    let count = u32::from_le_bytes(payload.get(take(4)?)?.try_into().ok()?);
    let mut marks = Vec::new();
    for _ in 0..count {
        let n = u16::from_le_bytes(payload.get(take(2)?)?.try_into().ok()?) as usize;
        let device = std::str::from_utf8(payload.get(take(n)?)?).ok()?;
        let device: Arc<str> = Arc::from(device);
        let seq = u64::from_le_bytes(payload.get(take(8)?)?.try_into().ok()?);
        marks.push((device, seq));
    }
    let lines = payload.split_off(at);
    Some(Record {
        marks,
        points,
        lines,
    })
}

/// A valid frame found by [`scan_segment`].
struct FrameInfo {
    offset: u64,
    points: u32,
    marks: Vec<(Arc<str>, u64)>,
}

/// Everything valid in a segment file.
struct Scan {
    /// Length of the valid prefix.
    valid_len: u64,
    file_len: u64,
    /// Offset and marks of each valid frame.
    frames: Vec<FrameInfo>,
}

fn scan_segment(path: &Path) -> Result<Scan, SpoolError> {
    let file = File::open(path).map_err(io_err(path))?;
    let file_len = file.metadata().map_err(io_err(path))?.len();
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let mut offset = 0;
    let mut frames = Vec::new();
    while offset < file_len {
        match read_frame(&mut reader, file_len - offset) {
            Ok((record, frame_len)) => {
                frames.push(FrameInfo {
                    offset,
                    points: record.points,
                    marks: record.marks,
                });
                offset += frame_len;
            }
            // A frame that claims more bytes than the file has is a torn append.
            Err(FrameError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(FrameError::Io(e)) => return Err(io_err(path)(e)),
            Err(FrameError::Bad(_)) => break,
        }
    }
    Ok(Scan {
        valid_len: offset,
        file_len,
        frames,
    })
}

/// Continues the CRC-32 `crc` (0 to start) over `bytes`.
pub fn crc32(crc: u32, bytes: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new_with_initial(crc);
    hasher.update(bytes);
    hasher.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);
    impl Dir {
        fn new(label: &str) -> Dir {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "hub-spool-{label}-{}-{}",
                std::process::id(),
                N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&path);
            Dir(path)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn opts(max_bytes: u64, segment_bytes: u64) -> SpoolOptions {
        SpoolOptions {
            max_bytes,
            segment_bytes,
        }
    }

    fn lines(i: u64) -> Vec<u8> {
        // Fixed width, so every frame has the same length.
        format!("telemetry,device=d{},metric=m value={i:04} {i:04}\n", i % 3).into_bytes()
    }

    fn append(spool: &mut Spool, i: u64) {
        let marks = [(Arc::from(format!("d{}", i % 3).as_str()), i)];
        spool.append(&marks, 1, &lines(i)).expect("append");
    }

    /// Drains everything, `max_bytes` per chunk; returns the lines in drain order.
    fn drain_all(spool: &mut Spool, max_bytes: u64) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Some(chunk) = spool.read_chunk(max_bytes).expect("read") {
            let n = chunk.records.len() as u64;
            out.extend(chunk.records.into_iter().map(|r| r.lines));
            spool.advance(chunk.end, n).expect("advance");
        }
        out
    }

    fn segment_files(dir: &Path) -> usize {
        fs::read_dir(dir)
            .expect("dir")
            .filter(|e| {
                e.as_ref()
                    .ok()
                    .and_then(|e| e.file_name().to_str().and_then(segment_id))
                    .is_some()
            })
            .count()
    }

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(0, b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(crc32(0, b"1234"), b"56789"), 0xCBF4_3926);
    }

    #[test]
    fn appends_drain_in_order_and_an_empty_spool_takes_no_disk() {
        let dir = Dir::new("order");
        let (mut spool, rec) = Spool::open(&dir.0, opts(1 << 20, 1 << 16)).expect("open");
        assert_eq!(rec.records, 0);
        assert!(spool.is_empty());
        for i in 0..100 {
            append(&mut spool, i);
        }
        assert_eq!(spool.records(), 100);
        assert!(!spool.is_empty());
        // Small chunks: many reads and head moves.
        let drained = drain_all(&mut spool, 200);
        assert_eq!(drained, (0..100).map(lines).collect::<Vec<_>>());
        assert!(spool.is_empty());
        assert_eq!((spool.records(), spool.bytes()), (0, 0));
        assert_eq!(segment_files(&dir.0), 0);
        // It keeps working after emptying.
        append(&mut spool, 7);
        assert_eq!(drain_all(&mut spool, 1 << 20), vec![lines(7)]);
    }

    #[test]
    fn a_reopened_spool_resumes_at_the_head_and_reports_marks() {
        let dir = Dir::new("reopen");
        {
            let (mut spool, _) = Spool::open(&dir.0, opts(1 << 20, 1 << 16)).expect("open");
            for i in 1..=10 {
                append(&mut spool, i);
            }
            let chunk = spool.read_chunk(1).expect("read").expect("chunk");
            assert_eq!(chunk.records.len(), 1);
            spool.advance(chunk.end, 1).expect("advance");
            let chunk = spool.read_chunk(1).expect("read").expect("chunk");
            spool.advance(chunk.end, 1).expect("advance");
            // Read but not advanced: must come back after a crash.
            let _ = spool.read_chunk(1).expect("read");
        }
        let (mut spool, rec) = Spool::open(&dir.0, opts(1 << 20, 1 << 16)).expect("reopen");
        assert_eq!((rec.records, rec.points), (8, 8));
        assert_eq!(rec.truncated_bytes, 0);
        // Marks of the waiting records 3..=10: d0 -> 9, d1 -> 10, d2 -> 8.
        let want: Vec<(Arc<str>, u64)> = vec![
            (Arc::from("d0"), 9),
            (Arc::from("d1"), 10),
            (Arc::from("d2"), 8),
        ];
        assert_eq!(rec.marks, want);
        append(&mut spool, 11);
        assert_eq!(
            drain_all(&mut spool, 1 << 20),
            (3..=11).map(lines).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_torn_tail_is_cut_off_and_everything_before_it_kept() {
        let dir = Dir::new("torn");
        let seg_path;
        {
            let (mut spool, _) = Spool::open(&dir.0, opts(1 << 20, 1 << 16)).expect("open");
            for i in 0..5 {
                append(&mut spool, i);
            }
            seg_path = segment_path(&dir.0, spool.segments.back().expect("segment").id);
        }
        // A crash in the middle of an append: half a frame at the end.
        let frame = encode_frame(&[(Arc::from("d9"), 9)], 1, &lines(9)).expect("frame");
        let mut f = OpenOptions::new()
            .append(true)
            .open(&seg_path)
            .expect("segment");
        f.write_all(&frame[..frame.len() / 2]).expect("torn write");
        drop(f);
        let (mut spool, rec) = Spool::open(&dir.0, opts(1 << 20, 1 << 16)).expect("reopen");
        assert_eq!(rec.records, 5);
        assert_eq!(rec.truncated_bytes, (frame.len() / 2) as u64);
        assert_eq!(rec.corrupt_bytes, 0);
        assert!(!rec.marks.iter().any(|(d, _)| &**d == "d9"));
        append(&mut spool, 5);
        assert_eq!(
            drain_all(&mut spool, 1 << 20),
            (0..=5).map(lines).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_last_record_with_a_bad_crc_is_cut_off() {
        let dir = Dir::new("crc");
        let seg_path;
        {
            let (mut spool, _) = Spool::open(&dir.0, opts(1 << 20, 1 << 16)).expect("open");
            for i in 0..3 {
                append(&mut spool, i);
            }
            seg_path = segment_path(&dir.0, spool.segments.back().expect("segment").id);
        }
        // The length made it to disk but the payload's last byte did not.
        let mut bytes = fs::read(&seg_path).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&seg_path, &bytes).expect("write");
        let (mut spool, rec) = Spool::open(&dir.0, opts(1 << 20, 1 << 16)).expect("reopen");
        assert_eq!(rec.records, 2);
        assert!(rec.truncated_bytes > 0);
        assert_eq!(
            drain_all(&mut spool, 1 << 20),
            (0..2).map(lines).collect::<Vec<_>>()
        );
    }

    #[test]
    fn segments_rotate_and_drained_ones_are_deleted() {
        let dir = Dir::new("rotate");
        let frame_len = encode_frame(&[(Arc::from("d0"), 0)], 1, &lines(0))
            .expect("frame")
            .len() as u64;
        // Four records per segment.
        let (mut spool, _) = Spool::open(&dir.0, opts(1 << 20, frame_len * 4)).expect("open");
        for i in 0..20 {
            append(&mut spool, i);
        }
        assert_eq!(segment_files(&dir.0), 5);
        // Drain six records: the first segment is gone, the second half drained.
        for _ in 0..6 {
            let chunk = spool.read_chunk(1).expect("read").expect("chunk");
            spool.advance(chunk.end, 1).expect("advance");
        }
        assert_eq!(segment_files(&dir.0), 4);
        assert_eq!(spool.records(), 14);
        assert_eq!(spool.bytes(), frame_len * 16);
        // A restart in between changes nothing.
        drop(spool);
        let (mut spool, rec) = Spool::open(&dir.0, opts(1 << 20, frame_len * 4)).expect("reopen");
        assert_eq!(rec.records, 14);
        assert_eq!(
            drain_all(&mut spool, 64),
            (6..20).map(lines).collect::<Vec<_>>()
        );
        assert_eq!(segment_files(&dir.0), 0);
    }

    #[test]
    fn a_full_spool_refuses_appends_until_drained() {
        let dir = Dir::new("full");
        let frame_len = encode_frame(&[(Arc::from("d0"), 0)], 1, &lines(0))
            .expect("frame")
            .len() as u64;
        let (mut spool, _) = Spool::open(&dir.0, opts(frame_len * 3, frame_len * 2)).expect("open");
        for i in 0..3 {
            append(&mut spool, i);
        }
        let err = spool
            .append(&[(Arc::from("d0"), 3)], 1, &lines(3))
            .expect_err("full");
        assert!(matches!(err, SpoolError::Full { .. }), "{err}");
        assert_eq!(spool.records(), 3);
        // Draining the first segment (two records) makes room.
        let chunk = spool.read_chunk(1).expect("read").expect("chunk");
        spool.advance(chunk.end, 1).expect("advance");
        let chunk = spool.read_chunk(1).expect("read").expect("chunk");
        spool.advance(chunk.end, 1).expect("advance");
        append(&mut spool, 3);
        assert_eq!(drain_all(&mut spool, 1 << 20), vec![lines(2), lines(3)]);
        // Zero capacity refuses everything.
        let dir = Dir::new("zero");
        let (mut spool, _) = Spool::open(&dir.0, opts(0, 1 << 16)).expect("open");
        assert!(matches!(
            spool.append(&[], 1, &lines(0)),
            Err(SpoolError::Full { .. })
        ));
    }

    #[test]
    fn an_unreadable_head_restarts_from_the_oldest_segment() {
        let dir = Dir::new("head");
        {
            let (mut spool, _) = Spool::open(&dir.0, opts(1 << 20, 1 << 16)).expect("open");
            for i in 0..4 {
                append(&mut spool, i);
            }
            let chunk = spool.read_chunk(1).expect("read").expect("chunk");
            spool.advance(chunk.end, 1).expect("advance");
        }
        fs::write(dir.0.join(HEAD_FILE), b"garbage").expect("corrupt head");
        let (mut spool, rec) = Spool::open(&dir.0, opts(1 << 20, 1 << 16)).expect("reopen");
        assert!(rec.head_reset);
        // Record 0 comes again: re-sending is harmless, losing would not be.
        assert_eq!(
            drain_all(&mut spool, 1 << 20),
            (0..4).map(lines).collect::<Vec<_>>()
        );
    }

    #[test]
    fn corruption_in_an_older_segment_is_reported_and_skipped() {
        let dir = Dir::new("corrupt");
        let frame_len = encode_frame(&[(Arc::from("d0"), 0)], 1, &lines(0))
            .expect("frame")
            .len() as u64;
        let first;
        {
            let (mut spool, _) = Spool::open(&dir.0, opts(1 << 20, frame_len * 2)).expect("open");
            for i in 0..4 {
                append(&mut spool, i);
            }
            first = segment_path(&dir.0, spool.segments.front().expect("segment").id);
        }
        // Bit rot in the second record of the first segment.
        let mut bytes = fs::read(&first).expect("read");
        let at = frame_len as usize + 12;
        bytes[at] ^= 0x01;
        fs::write(&first, &bytes).expect("write");
        let (mut spool, rec) = Spool::open(&dir.0, opts(1 << 20, frame_len * 2)).expect("reopen");
        assert_eq!(rec.corrupt_bytes, frame_len);
        assert_eq!(rec.records, 3);
        assert_eq!(
            drain_all(&mut spool, 1 << 20),
            vec![lines(0), lines(2), lines(3)]
        );
    }
}

//! [`SegmentLog`]: opening with recovery, appending, reading by record number, and
//! committing the head. The format and the guarantees are in the crate documentation.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{io_err, LogError};
use crate::files::{list_segments, segment_file_name, sync_dir, HEAD_TMP};
use crate::head::{self, Entry, Found, Meta, META_BYTES};
use crate::record::{self, Header, RECORD_HEADER_BYTES};

/// Sizes of a log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogOptions {
    /// Most bytes all segment files may take together; see [`LogError::Full`].
    pub max_bytes: u64,
    /// A segment is closed and a new one started once the next record would take it past
    /// this. Deleting a segment is the only way to free space, so smaller segments free it
    /// sooner, at the cost of more files.
    pub segment_bytes: u64,
}

/// How durable a write must be when the call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// fsynced: survives a power cut.
    Durable,
    /// Written to the operating system only: survives a crash of the process; a power cut
    /// may undo it. Cheap; for head moves that may safely be repeated, and for bulk imports
    /// finished by [`SegmentLog::sync`].
    Buffered,
}

/// What [`SegmentLog::open`] found of the head file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadState {
    /// A valid head: [`SegmentLog::front`] and [`SegmentLog::meta`] are as last committed
    /// (or, after a power cut, as committed at some earlier point).
    Valid,
    /// No head file (a new log, or the file was deleted): the head is the oldest segment's
    /// first record and the metadata is all zeros.
    Missing,
    /// A head file without one valid entry: as [`HeadState::Missing`].
    Corrupt,
}

/// What [`SegmentLog::open`] repaired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recovery {
    /// What the head file held.
    pub head: HeadState,
    /// Bytes cut off the end of the log: a torn append, interrupted by a crash before it
    /// returned, so never acknowledged.
    pub truncated_bytes: u64,
    /// Bytes cut off older segments because a record failed its checks: acknowledged data
    /// the disk damaged. The numbers of the records lost are [`SegmentLog::is_missing`].
    pub corrupt_bytes: u64,
    /// Segments deleted because every record in them was before the head.
    pub removed_segments: usize,
}

#[derive(Debug)]
struct Segment {
    /// Number of its first record (its file name).
    base: u64,
    /// Offsets of its records.
    offsets: Vec<u64>,
    /// Bytes of its records (the file is not longer).
    bytes: u64,
}

impl Segment {
    /// The number after its last record.
    fn end(&self) -> u64 {
        self.base + self.offsets.len() as u64
    }
}

/// Repairs recovery found necessary; a read-only open leaves them undone.
#[derive(Debug, Default)]
struct Repairs {
    /// Segments to cut to their valid prefix: (file, valid length).
    truncate: Vec<(PathBuf, u64)>,
    /// Segments wholly before the head.
    stale: Vec<PathBuf>,
}

/// A crash-safe, bounded, segmented append-only log in one directory. See the crate
/// documentation. Not thread-safe by itself (owners wrap it in a mutex); one process at a
/// time may open a directory writable (owners hold a lock). All methods block on file I/O.
#[derive(Debug)]
pub struct SegmentLog {
    dir: PathBuf,
    opts: LogOptions,
    writable: bool,
    /// Existing segments, oldest first.
    segments: VecDeque<Segment>,
    /// The head: the first record the owner still needs.
    front: u64,
    /// The number the next record gets.
    end: u64,
    meta: Meta,
    /// Numbers in `front..end` that no segment holds, as sorted, disjoint ranges.
    missing: VecDeque<Range<u64>>,
    /// Bytes of all segment files.
    bytes: u64,
    head: head::Writer,
    /// Append handle of the last segment, when the next record may go there.
    tail: Option<File>,
    /// Records were appended to the tail without an fsync.
    tail_dirty: bool,
    /// Read handle of the segment read last (reads are mostly sequential).
    reader: Option<(u64, File)>,
}

impl SegmentLog {
    /// Opens (creating if needed) the log in `dir` and recovers it from any crash: torn
    /// appends are cut off, damaged data is cut off and its numbers marked missing, and
    /// segments wholly before the head are deleted. Calls `visit` with the number and
    /// payload of every record from the head on, in order, as the check reads them.
    ///
    /// # Errors
    /// The directory or a file in it cannot be created, read, truncated, deleted or synced.
    pub fn open(
        dir: &Path,
        opts: LogOptions,
        mut visit: impl FnMut(u64, &[u8]),
    ) -> Result<(SegmentLog, Recovery), LogError> {
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        remove_if_exists(&dir.join(HEAD_TMP))?;
        let (mut log, mut recovery, repairs) = load(dir, opts, true, &mut visit)?;
        for (path, len) in &repairs.truncate {
            let file = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(io_err("open", path))?;
            file.set_len(*len)
                .and_then(|()| file.sync_all())
                .map_err(io_err("truncate", path))?;
        }
        if !repairs.stale.is_empty() {
            // The head that put them behind it must survive before they go.
            log.head.sync(dir)?;
            for path in &repairs.stale {
                remove_if_exists(path)?;
            }
            recovery.removed_segments = repairs.stale.len();
        }
        if let Some(last) = log.segments.back() {
            if last.end() == log.end {
                let path = dir.join(segment_file_name(last.base));
                log.tail = Some(
                    OpenOptions::new()
                        .append(true)
                        .open(&path)
                        .map_err(io_err("open", &path))?,
                );
            }
        }
        Ok((log, recovery))
    }

    /// Reads the log in `dir` without changing anything, for looking at a log another
    /// process has open: nothing is repaired, and every write fails with
    /// [`LogError::ReadOnly`]. A missing directory is an empty log. Calls `visit` as
    /// [`SegmentLog::open`] does.
    ///
    /// # Errors
    /// A file cannot be read.
    pub fn open_read_only(
        dir: &Path,
        mut visit: impl FnMut(u64, &[u8]),
    ) -> Result<(SegmentLog, Recovery), LogError> {
        let unbounded = LogOptions {
            max_bytes: u64::MAX,
            segment_bytes: u64::MAX,
        };
        let (log, recovery, _) = load(dir, unbounded, false, &mut visit)?;
        Ok((log, recovery))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The sizes it was opened with.
    pub fn options(&self) -> LogOptions {
        self.opts
    }

    /// The head: the first record the owner still needs.
    pub fn front(&self) -> u64 {
        self.front
    }

    /// The number the next appended record gets (one past the last record).
    pub fn end(&self) -> u64 {
        self.end
    }

    /// The metadata committed with the head.
    pub fn meta(&self) -> Meta {
        self.meta
    }

    /// Bytes of all segment files (including records before the head in segments not yet
    /// deleted).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Segment files.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// The number after the last record of the oldest segment: committing a head there
    /// lets that segment be deleted. `None` when there is no segment.
    pub fn oldest_segment_end(&self) -> Option<u64> {
        self.segments.front().map(Segment::end)
    }

    /// Whether record `number` (between the head and the end) was lost before the log was
    /// opened.
    pub fn is_missing(&self, number: u64) -> bool {
        self.missing.iter().any(|r| r.contains(&number))
    }

    /// Records from the head to the end that were lost ([`SegmentLog::is_missing`]).
    pub fn missing_records(&self) -> u64 {
        self.missing.iter().map(|r| r.end - r.start).sum()
    }

    /// Readable records from the head to the end.
    pub fn live_records(&self) -> u64 {
        self.end - self.front - self.missing_records()
    }

    fn check_writable(&self) -> Result<(), LogError> {
        if self.writable {
            Ok(())
        } else {
            Err(LogError::ReadOnly {
                dir: self.dir.clone(),
            })
        }
    }

    /// Appends a record and returns its number. With [`Durability::Durable`] the record
    /// survives a power cut once this returns (crate documentation).
    ///
    /// # Errors
    /// [`LogError::Full`] when it would take the log past its byte cap and
    /// [`LogError::TooLarge`] for a payload of 4 GiB or more (nothing was written); an I/O
    /// error (whatever part of the record was written is cut off again, or, if even that
    /// fails, the next record starts a new segment and recovery cuts this one).
    pub fn append(&mut self, payload: &[u8], durability: Durability) -> Result<u64, LogError> {
        self.check_writable()?;
        let number = self.end;
        let frame = record::frame(number, payload)?;
        let need = frame.len() as u64;
        if self.bytes.saturating_add(need) > self.opts.max_bytes {
            return Err(LogError::Full {
                used: self.bytes,
                max: self.opts.max_bytes,
                need,
            });
        }
        let fits = self.segments.back().is_some_and(|s| {
            s.end() == number && (s.bytes == 0 || s.bytes + need <= self.opts.segment_bytes)
        });
        if self.tail.is_none() || !fits {
            self.rotate()?;
        }
        let (Some(file), Some(segment)) = (self.tail.as_mut(), self.segments.back_mut()) else {
            return Err(io_err("append to", &self.dir)(io::Error::other(
                "no open segment after starting one",
            )));
        };
        let offset = segment.bytes;
        let written = file.write_all(&frame).and_then(|()| match durability {
            Durability::Durable => file.sync_data(),
            Durability::Buffered => Ok(()),
        });
        if let Err(err) = written {
            let path = self.dir.join(segment_file_name(segment.base));
            // Cut off whatever part of the record made it, so the next one follows a good
            // record; if even that fails, the next append starts a new segment.
            if file
                .set_len(offset)
                .and_then(|()| file.sync_data())
                .is_err()
            {
                self.tail = None;
            }
            return Err(io_err("append to", &path)(err));
        }
        segment.offsets.push(offset);
        segment.bytes += need;
        self.bytes += need;
        self.end += 1;
        // An fdatasync covers the records appended before this one, too.
        self.tail_dirty = durability == Durability::Buffered;
        Ok(number)
    }

    /// The last segment's file.
    fn tail_path(&self) -> PathBuf {
        let base = self.segments.back().map_or(self.end, |s| s.base);
        self.dir.join(segment_file_name(base))
    }

    /// Closes the tail and starts a segment for record `self.end`.
    fn rotate(&mut self) -> Result<(), LogError> {
        if let (Some(file), true) = (&self.tail, self.tail_dirty) {
            file.sync_data()
                .map_err(io_err("fsync", &self.tail_path()))?;
        }
        self.tail = None;
        self.tail_dirty = false;
        let base = self.end;
        let path = self.dir.join(segment_file_name(base));
        // A last segment that starts here holds no record (its first append failed and
        // could not be undone, or its directory entry could not be synced): start it anew.
        if self.segments.back().is_some_and(|s| s.base == base) {
            remove_if_exists(&path)?;
            if let Some(segment) = self.segments.pop_back() {
                self.bytes -= segment.bytes;
            }
            self.forget_reader(base);
        }
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        self.segments.push_back(Segment {
            base,
            offsets: Vec::new(),
            bytes: 0,
        });
        // The new file's directory entry must be durable before a record in it counts as
        // written; until then it is not the tail.
        sync_dir(&self.dir)?;
        self.tail = Some(file);
        // The previous tail may be wholly before the head; now that it is not the tail,
        // it can go.
        self.remove_consumed()
    }

    /// Reads record `number`.
    ///
    /// # Errors
    /// [`LogError::OutOfRange`] before the head or at or after the end;
    /// [`LogError::Missing`] for a record lost before opening; [`LogError::Corrupt`] when it
    /// fails its checks now; an I/O error.
    pub fn read(&mut self, number: u64) -> Result<Vec<u8>, LogError> {
        if number < self.front || number >= self.end {
            return Err(LogError::OutOfRange {
                number,
                front: self.front,
                end: self.end,
            });
        }
        let index = self.segments.partition_point(|s| s.base <= number);
        let located = index
            .checked_sub(1)
            .and_then(|i| self.segments.get(i))
            .and_then(|s| {
                let k = usize::try_from(number - s.base).ok()?;
                let offset = *s.offsets.get(k)?;
                let next = s.offsets.get(k + 1).copied().unwrap_or(s.bytes);
                Some((s.base, offset, next - offset))
            });
        let Some((base, offset, len)) = located else {
            return Err(LogError::Missing { number });
        };
        let path = self.dir.join(segment_file_name(base));
        let mut buf = vec![0u8; len as usize];
        self.reader_for(base)?
            .read_exact_at(&mut buf, offset)
            .map_err(io_err("read", &path))?;
        let corrupt = |why| LogError::Corrupt {
            number,
            path: path.clone(),
            offset,
            why,
        };
        let payload = buf.split_off(RECORD_HEADER_BYTES.min(buf.len()));
        let header: [u8; RECORD_HEADER_BYTES] = buf
            .try_into()
            .map_err(|_| corrupt("shorter than a header"))?;
        Header::parse(&header)
            .check(number, &payload)
            .map_err(corrupt)?;
        Ok(payload)
    }

    fn reader_for(&mut self, base: u64) -> Result<&File, LogError> {
        if !matches!(&self.reader, Some((b, _)) if *b == base) {
            let path = self.dir.join(segment_file_name(base));
            let file = File::open(&path).map_err(io_err("open", &path))?;
            self.reader = Some((base, file));
        }
        match &self.reader {
            Some((_, file)) => Ok(file),
            None => Err(io_err("read", &self.dir)(io::Error::other("no reader"))),
        }
    }

    fn forget_reader(&mut self, base: u64) {
        if matches!(&self.reader, Some((b, _)) if *b == base) {
            self.reader = None;
        }
    }

    /// Moves the head to `front` with the owner's `meta`, then deletes the segments now
    /// wholly before it, except the tail (the next record may still go there; see
    /// [`SegmentLog::remove_consumed_tail`]). Before deleting, the head is made durable.
    ///
    /// # Errors
    /// [`LogError::BadHead`] unless `head <= front <= end`; the head could not be written
    /// (it is then unchanged in memory and on disk), or a segment could not be deleted
    /// (the head did move; the next commit tries again).
    pub fn commit(
        &mut self,
        front: u64,
        meta: Meta,
        durability: Durability,
    ) -> Result<(), LogError> {
        self.check_writable()?;
        if front < self.front || front > self.end {
            return Err(LogError::BadHead {
                front,
                min: self.front,
                max: self.end,
            });
        }
        self.head.commit(
            &self.dir,
            &Entry { front, meta },
            durability == Durability::Durable,
        )?;
        self.front = front;
        self.meta = meta;
        while let Some(range) = self.missing.front_mut() {
            if range.end <= front {
                self.missing.pop_front();
            } else {
                range.start = range.start.max(front);
                break;
            }
        }
        self.remove_consumed()
    }

    /// Deletes the tail too if every record in it is before the head (so an empty log takes
    /// no disk space; the next append starts a new segment).
    ///
    /// # Errors
    /// The head could not be made durable or the file could not be deleted.
    pub fn remove_consumed_tail(&mut self) -> Result<(), LogError> {
        self.check_writable()?;
        self.remove_consumed()?;
        if self.segments.len() == 1 && self.segments[0].end() <= self.front {
            self.remove_oldest_segment()?;
        }
        Ok(())
    }

    /// Deletes the segments wholly before the head, except the tail.
    fn remove_consumed(&mut self) -> Result<(), LogError> {
        while self.segments.len() > 1 && self.segments[0].end() <= self.front {
            self.remove_oldest_segment()?;
        }
        Ok(())
    }

    fn remove_oldest_segment(&mut self) -> Result<(), LogError> {
        self.head.sync(&self.dir)?;
        let Some(segment) = self.segments.front() else {
            return Ok(());
        };
        let base = segment.base;
        self.forget_reader(base);
        remove_if_exists(&self.dir.join(segment_file_name(base)))?;
        if let Some(segment) = self.segments.pop_front() {
            self.bytes -= segment.bytes;
        }
        if self.segments.is_empty() {
            self.tail = None;
            self.tail_dirty = false;
        }
        Ok(())
    }

    /// Makes every append and head commit so far durable (after buffered writes; on a
    /// clean shutdown). Takes `&self` so that an owner can call it through a shared
    /// reference; it may then fsync again next time although nothing changed.
    ///
    /// # Errors
    /// An fsync failed.
    pub fn sync(&self) -> Result<(), LogError> {
        if let (Some(file), true) = (&self.tail, self.tail_dirty) {
            file.sync_data()
                .map_err(io_err("fsync", &self.tail_path()))?;
        }
        if self.writable {
            self.head.flush(&self.dir)?;
        }
        Ok(())
    }
}

/// Reads the head and scans every segment; returns the log as found, what recovery
/// repaired (or would repair), and the repairs to make.
fn load(
    dir: &Path,
    opts: LogOptions,
    writable: bool,
    visit: &mut dyn FnMut(u64, &[u8]),
) -> Result<(SegmentLog, Recovery, Repairs), LogError> {
    let bases = list_segments(dir)?;
    let oldest = Entry {
        front: bases.first().copied().unwrap_or(0),
        meta: [0; META_BYTES],
    };
    let (state, entry) = match head::read(dir)? {
        Found::Valid(entry) => (HeadState::Valid, entry),
        Found::Missing => (HeadState::Missing, oldest),
        Found::Corrupt => (HeadState::Corrupt, oldest),
    };
    let front = entry.front;
    let mut recovery = Recovery {
        head: state,
        truncated_bytes: 0,
        corrupt_bytes: 0,
        removed_segments: 0,
    };
    let mut repairs = Repairs::default();
    let mut segments = VecDeque::new();
    let mut missing = VecDeque::new();
    // The number the next segment should start with.
    let mut expected = front;
    for (i, &base) in bases.iter().enumerate() {
        let next_base = bases.get(i + 1).copied();
        let path = dir.join(segment_file_name(base));
        if next_base.is_some_and(|next| next <= front) {
            repairs.stale.push(path);
            continue;
        }
        let limit = next_base.unwrap_or(u64::MAX);
        let scan = match record::scan(&path, base, limit, front, visit) {
            Ok(scan) => scan,
            // A read-only look races with the owner deleting consumed segments.
            Err(LogError::Io { source, .. })
                if !writable && source.kind() == io::ErrorKind::NotFound =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        if base > expected {
            missing.push_back(expected..base);
        }
        if scan.valid_len < scan.file_len {
            let cut = scan.file_len - scan.valid_len;
            if next_base.is_some() && scan.hit_bad_record {
                recovery.corrupt_bytes += cut;
            } else {
                // The end of the log, or a failed append into an older segment that a
                // newer segment superseded: never acknowledged either way.
                recovery.truncated_bytes += cut;
            }
            repairs.truncate.push((path, scan.valid_len));
        }
        let segment = Segment {
            base,
            offsets: scan.offsets,
            bytes: scan.valid_len,
        };
        expected = expected.max(segment.end());
        segments.push_back(segment);
    }
    let bytes = segments.iter().map(|s| s.bytes).sum();
    let log = SegmentLog {
        dir: dir.to_path_buf(),
        opts,
        writable,
        segments,
        front,
        end: expected,
        meta: entry.meta,
        missing,
        bytes,
        head: head::Writer::default(),
        tail: None,
        tail_dirty: false,
        reader: None,
    };
    Ok((log, recovery, repairs))
}

fn remove_if_exists(path: &Path) -> Result<(), LogError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("remove", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOMY: LogOptions = LogOptions {
        max_bytes: 1 << 20,
        segment_bytes: 1 << 12,
    };

    fn payload(n: u64) -> Vec<u8> {
        format!("record {n:05}").into_bytes()
    }

    fn open(dir: &Path, opts: LogOptions) -> (SegmentLog, Recovery) {
        SegmentLog::open(dir, opts, |_, _| {}).expect("open")
    }

    fn segment_files(dir: &Path) -> usize {
        list_segments(dir).expect("list").len()
    }

    #[test]
    fn records_are_numbered_read_back_and_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, recovery) = open(dir.path(), ROOMY);
        assert_eq!(recovery.head, HeadState::Missing);
        assert_eq!((log.front(), log.end(), log.bytes()), (0, 0, 0));
        for n in 0..10 {
            assert_eq!(
                log.append(&payload(n), Durability::Durable)
                    .expect("append"),
                n
            );
        }
        assert_eq!(log.read(3).expect("read"), payload(3));
        assert_eq!(log.live_records(), 10);
        log.commit(4, *b"meta-for-owner!!", Durability::Buffered)
            .expect("commit");
        assert!(matches!(
            log.read(3),
            Err(LogError::OutOfRange {
                number: 3,
                front: 4,
                end: 10
            })
        ));
        assert!(matches!(log.read(10), Err(LogError::OutOfRange { .. })));
        drop(log);
        let mut seen = Vec::new();
        let (mut log, recovery) =
            SegmentLog::open(dir.path(), ROOMY, |n, p| seen.push((n, p.to_vec()))).expect("reopen");
        assert_eq!(recovery.head, HeadState::Valid);
        assert_eq!(seen, (4..10).map(|n| (n, payload(n))).collect::<Vec<_>>());
        assert_eq!((log.front(), log.end(), log.live_records()), (4, 10, 6));
        assert_eq!(&log.meta(), b"meta-for-owner!!");
        assert_eq!(log.read(9).expect("read"), payload(9));
        assert_eq!(
            log.append(b"", Durability::Durable).expect("empty payload"),
            10
        );
        assert_eq!(log.read(10).expect("read"), b"");
    }

    #[test]
    fn segments_rotate_and_consumed_ones_are_deleted_except_the_tail() {
        let dir = tempfile::tempdir().expect("tempdir");
        let frame = (RECORD_HEADER_BYTES + payload(0).len()) as u64;
        let opts = LogOptions {
            max_bytes: 1 << 20,
            segment_bytes: frame * 4,
        };
        let (mut log, _) = open(dir.path(), opts);
        for n in 0..10 {
            log.append(&payload(n), Durability::Durable)
                .expect("append");
        }
        assert_eq!(segment_files(dir.path()), 3);
        assert_eq!(log.oldest_segment_end(), Some(4));
        assert!(dir.path().join(segment_file_name(8)).exists());
        log.commit(5, [0; META_BYTES], Durability::Buffered)
            .expect("commit");
        assert_eq!(segment_files(dir.path()), 2);
        assert_eq!(log.bytes(), frame * 6);
        log.commit(10, [0; META_BYTES], Durability::Buffered)
            .expect("commit");
        assert_eq!(segment_files(dir.path()), 1, "the tail stays");
        assert_eq!(log.bytes(), frame * 2);
        // The next record still goes into the tail.
        log.append(&payload(10), Durability::Durable)
            .expect("append");
        assert_eq!(segment_files(dir.path()), 1);
        log.commit(11, [0; META_BYTES], Durability::Buffered)
            .expect("commit");
        log.remove_consumed_tail().expect("remove tail");
        assert_eq!((segment_files(dir.path()), log.bytes()), (0, 0));
        // Numbering goes on in a new segment, named for its first record.
        assert_eq!(
            log.append(&payload(11), Durability::Durable)
                .expect("append"),
            11
        );
        assert!(dir.path().join(segment_file_name(11)).exists());
        drop(log);
        let (mut log, _) = open(dir.path(), opts);
        assert_eq!((log.front(), log.end()), (11, 12));
        assert_eq!(log.read(11).expect("read"), payload(11));
    }

    #[test]
    fn a_consumed_tail_is_deleted_when_a_new_segment_starts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let frame = (RECORD_HEADER_BYTES + payload(0).len()) as u64;
        let opts = LogOptions {
            max_bytes: 1 << 20,
            segment_bytes: frame * 2,
        };
        let (mut log, _) = open(dir.path(), opts);
        log.append(&payload(0), Durability::Durable)
            .expect("append");
        log.append(&payload(1), Durability::Durable)
            .expect("append");
        log.commit(2, [0; META_BYTES], Durability::Buffered)
            .expect("commit");
        assert_eq!(segment_files(dir.path()), 1);
        log.append(&payload(2), Durability::Durable)
            .expect("append");
        assert_eq!(segment_files(dir.path()), 1);
        assert!(dir.path().join(segment_file_name(2)).exists());
        assert_eq!(log.bytes(), frame);
    }

    #[test]
    fn a_full_log_refuses_appends_until_segments_are_freed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let frame = (RECORD_HEADER_BYTES + payload(0).len()) as u64;
        let opts = LogOptions {
            max_bytes: frame * 3,
            segment_bytes: frame * 2,
        };
        let (mut log, _) = open(dir.path(), opts);
        for n in 0..3 {
            log.append(&payload(n), Durability::Durable)
                .expect("append");
        }
        match log.append(&payload(3), Durability::Durable) {
            Err(LogError::Full { used, max, need }) => {
                assert_eq!((used, max, need), (frame * 3, frame * 3, frame));
            }
            other => panic!("expected Full, got {other:?}"),
        }
        assert_eq!(log.end(), 3, "nothing was written");
        assert_eq!(log.oldest_segment_end(), Some(2));
        log.commit(2, [0; META_BYTES], Durability::Buffered)
            .expect("commit");
        assert_eq!(
            log.append(&payload(3), Durability::Durable)
                .expect("append"),
            3
        );
        drop(log);
        let dir = tempfile::tempdir().expect("tempdir");
        let zero = LogOptions {
            max_bytes: 0,
            segment_bytes: 1 << 12,
        };
        let (mut log, _) = open(dir.path(), zero);
        assert!(matches!(
            log.append(b"", Durability::Durable),
            Err(LogError::Full { need: 16, .. })
        ));
    }

    #[test]
    fn a_record_larger_than_a_segment_gets_one_of_its_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let opts = LogOptions {
            max_bytes: 1 << 20,
            segment_bytes: 64,
        };
        let (mut log, _) = open(dir.path(), opts);
        log.append(b"small", Durability::Durable).expect("append");
        log.append(&[7u8; 500], Durability::Durable).expect("big");
        log.append(b"small", Durability::Durable).expect("append");
        assert_eq!(segment_files(dir.path()), 3);
        assert_eq!(log.read(1).expect("read"), vec![7u8; 500]);
    }

    #[test]
    fn the_head_cannot_move_back_or_past_the_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = open(dir.path(), ROOMY);
        log.append(b"a", Durability::Durable).expect("append");
        log.commit(1, [0; META_BYTES], Durability::Durable)
            .expect("commit");
        assert!(matches!(
            log.commit(0, [0; META_BYTES], Durability::Durable),
            Err(LogError::BadHead {
                front: 0,
                min: 1,
                max: 1
            })
        ));
        assert!(matches!(
            log.commit(2, [0; META_BYTES], Durability::Durable),
            Err(LogError::BadHead { .. })
        ));
        // The metadata alone may change.
        log.commit(1, [9; META_BYTES], Durability::Durable)
            .expect("commit");
        assert_eq!(log.meta(), [9; META_BYTES]);
    }

    #[test]
    fn buffered_appends_are_readable_and_durable_after_sync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let frame = (RECORD_HEADER_BYTES + payload(0).len()) as u64;
        let opts = LogOptions {
            max_bytes: 1 << 20,
            segment_bytes: frame * 3,
        };
        let (mut log, _) = open(dir.path(), opts);
        for n in 0..7 {
            log.append(&payload(n), Durability::Buffered)
                .expect("append");
        }
        log.sync().expect("sync");
        assert_eq!(log.read(6).expect("read"), payload(6));
        drop(log);
        let (log, _) = open(dir.path(), opts);
        assert_eq!(log.live_records(), 7);
    }

    #[test]
    fn a_read_only_open_changes_nothing_and_refuses_writes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut log, _) = open(dir.path(), ROOMY);
        for n in 0..3 {
            log.append(&payload(n), Durability::Durable)
                .expect("append");
        }
        log.commit(1, [0; META_BYTES], Durability::Durable)
            .expect("commit");
        // A torn append the owner has not recovered yet.
        let seg = dir.path().join(segment_file_name(0));
        let len = fs::metadata(&seg).expect("meta").len();
        let mut f = OpenOptions::new().append(true).open(&seg).expect("open");
        f.write_all(&[1, 2, 3]).expect("torn");
        let mut seen = Vec::new();
        let (mut view, recovery) =
            SegmentLog::open_read_only(dir.path(), |n, _| seen.push(n)).expect("inspect");
        assert_eq!(seen, vec![1, 2]);
        assert_eq!(recovery.truncated_bytes, 3);
        assert_eq!(fs::metadata(&seg).expect("meta").len(), len + 3, "not cut");
        assert_eq!(view.read(2).expect("read"), payload(2));
        assert!(matches!(
            view.append(b"x", Durability::Durable),
            Err(LogError::ReadOnly { .. })
        ));
        assert!(matches!(
            view.commit(2, [0; META_BYTES], Durability::Durable),
            Err(LogError::ReadOnly { .. })
        ));
        let missing = dir.path().join("nothing-here");
        let (view, _) = SegmentLog::open_read_only(&missing, |_, _| {}).expect("inspect");
        assert_eq!((view.end(), view.segment_count()), (0, 0));
        assert!(!missing.exists());
    }
}

//! Moving a spool directory from the layout hubs wrote before the segment log ("v1") to
//! the segment log, when the spool is opened.
//!
//! The v1 layout was `seg-<id, 20 digits>.log` segments (ids counting up), each a sequence
//! of frames `length u32 | CRC-32 u32 | payload`, the CRC taken over the four length bytes
//! and the payload; and `head`, 20 bytes: the segment id and byte offset (`u64` each) of
//! the first undrained frame and the CRC-32 of those 16 bytes. All integers little-endian.
//! The payloads are the records the spool still writes (module documentation of
//! [`super`]).
//!
//! V1 frames carry no record numbers, so the upgrade copies:
//!
//! 1. unless the log's head file exists, it deletes any log segments (a copy an
//!    interrupted upgrade left), appends every undrained v1 payload to the log in order
//!    (buffered, fsynced once at the end) and then commits the log's head durably: from
//!    then on the copy is complete;
//! 2. it deletes the v1 segments, then `head`, and fsyncs the directory.
//!
//! A crash during step 1 leaves no log head, and the next open copies again from the
//! untouched v1 files; a crash during step 2 leaves the log head, and the next open only
//! finishes deleting. V1 frames that fail their checks are skipped where v1 recovery
//! would have cut them off, and counted. The copy is not held to the spool's capacity (the
//! log's framing is 8 bytes longer per record): until the spool drains below it, new
//! batches are refused as by any full spool.

use std::fs;
use std::io;
use std::path::Path;

use segment_log::{Durability, LogOptions, SegmentLog};

use super::{decode_header, io_err, SpoolError, SpoolOptions, NO_META};

/// The v1 head file.
const V1_HEAD: &str = "head";
/// Bytes of a v1 frame header (length and CRC).
const V1_FRAME_HEADER: usize = 8;

/// What an upgrade copied and skipped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Upgraded {
    /// Undrained records copied into the log.
    pub(super) records: u64,
    /// Bytes of a torn last v1 frame skipped.
    pub(super) truncated_bytes: u64,
    /// Bytes of damaged v1 frames (and the rest of their segments) skipped.
    pub(super) corrupt_bytes: u64,
    /// The v1 head was unreadable: everything from the oldest v1 segment was copied.
    pub(super) head_reset: bool,
}

fn v1_segment_path(dir: &Path, id: u64) -> std::path::PathBuf {
    dir.join(format!("seg-{id:020}.log"))
}

/// The ids of the v1 segments in `dir`, sorted.
fn v1_segments(dir: &Path) -> Result<Vec<u64>, SpoolError> {
    segment_log::numbered_files(dir, |name| {
        name.strip_prefix("seg-")?
            .strip_suffix(".log")?
            .parse()
            .ok()
    })
    .map_err(io_err(dir))
}

/// The v1 head: `Ok(None)` when there is none, `Ok(Some(None))` when it is unreadable.
fn v1_head(dir: &Path) -> Result<Option<Option<(u64, u64)>>, SpoolError> {
    let path = dir.join(V1_HEAD);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path)(e)),
    };
    let word = |at: usize| {
        bytes
            .get(at..at + 8)?
            .try_into()
            .ok()
            .map(u64::from_le_bytes)
    };
    let valid = bytes.len() == 20 && bytes[16..20] == crc32fast::hash(&bytes[..16]).to_le_bytes();
    Ok(Some(if valid { word(0).zip(word(8)) } else { None }))
}

/// The payload of the v1 frame at `at` in `bytes` and where the next frame starts; `None`
/// if it fails its checks.
fn v1_frame(bytes: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let header = bytes.get(at..at.checked_add(V1_FRAME_HEADER)?)?;
    let len = u32::from_le_bytes(header[0..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().ok()?);
    let start = at + V1_FRAME_HEADER;
    let payload = bytes.get(start..start.checked_add(len)?)?;
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&header[0..4]);
    hasher.update(payload);
    (hasher.finalize() == crc && decode_header(payload).is_some()).then_some((payload, start + len))
}

/// Moves a v1 spool in `dir` into the segment log (module documentation). `None` when
/// there was nothing to move.
///
/// # Errors
/// A file cannot be read, written or deleted; the next open tries again.
pub(super) fn from_v1(dir: &Path, opts: SpoolOptions) -> Result<Option<Upgraded>, SpoolError> {
    let ids = v1_segments(dir)?;
    let head_path = dir.join(V1_HEAD);
    if ids.is_empty() && !head_path.exists() {
        return Ok(None);
    }
    let upgraded = if dir.join(segment_log::HEAD_FILE).exists() {
        Upgraded::default()
    } else {
        segment_log::remove_segments(dir)?;
        copy_v1(dir, &ids, opts)?
    };
    for &id in &ids {
        let path = v1_segment_path(dir, id);
        fs::remove_file(&path).map_err(io_err(&path))?;
    }
    match fs::remove_file(&head_path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(&head_path)(e)),
    }
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(Some(upgraded))
}

/// Step 1: copies the undrained v1 records into the (empty) log and commits its head.
fn copy_v1(dir: &Path, ids: &[u64], opts: SpoolOptions) -> Result<Upgraded, SpoolError> {
    let oldest = (ids.first().copied().unwrap_or(0), 0);
    let mut upgraded = Upgraded::default();
    let (from_segment, from_offset) = match v1_head(dir)? {
        Some(Some(head)) => head,
        Some(None) => {
            upgraded.head_reset = true;
            oldest
        }
        None => oldest,
    };
    let unbounded = LogOptions {
        max_bytes: u64::MAX,
        segment_bytes: opts.segment_bytes,
    };
    let (mut log, _) = SegmentLog::open(dir, unbounded, |_, _| {})?;
    for (i, &id) in ids.iter().enumerate() {
        if id < from_segment {
            continue;
        }
        let path = v1_segment_path(dir, id);
        let bytes = fs::read(&path).map_err(io_err(&path))?;
        let mut at = 0;
        while let Some((payload, next)) = v1_frame(&bytes, at) {
            // v1 drained from the frame the head points into (a head inside a frame
            // backs off to its start), so a frame is waiting if it ends after the head.
            if id > from_segment || next as u64 > from_offset {
                log.append(payload, Durability::Buffered)?;
                upgraded.records += 1;
            }
            at = next;
        }
        let cut = (bytes.len() - at) as u64;
        if i + 1 == ids.len() {
            upgraded.truncated_bytes += cut;
        } else {
            upgraded.corrupt_bytes += cut;
        }
    }
    log.sync()?;
    log.commit(log.front(), NO_META, Durability::Durable)?;
    Ok(upgraded)
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::Arc;

    use super::super::tests::{drain_all, lines, segment_files, Dir};
    use super::super::Spool;
    use super::*;

    /// A spool directory written by the v1 code (see the fixture's README): 10 records
    /// `lines(i)` with mark `(d{i%3}, i)`, in segments of 4 records, 5 drained.
    fn v1_fixture(label: &str) -> Dir {
        let d = Dir::new(label);
        copy_fixture(&d.0);
        d
    }

    fn copy_fixture(to: &Path) {
        let from = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/spool-v1"
        ));
        fs::create_dir_all(to).expect("create");
        for entry in fs::read_dir(&from).expect("fixture") {
            let entry = entry.expect("entry");
            let name = entry.file_name();
            if name != "README.md" {
                fs::copy(entry.path(), to.join(&name)).expect("copy");
            }
        }
    }

    fn opts() -> SpoolOptions {
        SpoolOptions {
            max_bytes: 1 << 20,
            segment_bytes: 1 << 16,
        }
    }

    fn assert_v1_contents(dir: &Path) {
        let (mut spool, rec) = Spool::open(dir, opts()).expect("open");
        assert_eq!((rec.records, rec.points), (5, 5));
        let want: Vec<(Arc<str>, u64)> = vec![
            (Arc::from("d0"), 9),
            (Arc::from("d1"), 7),
            (Arc::from("d2"), 8),
        ];
        assert_eq!(rec.marks, want);
        assert!(v1_segments(dir).expect("list").is_empty());
        assert!(!dir.join(V1_HEAD).exists());
        assert_eq!(
            drain_all(&mut spool, 1 << 20),
            (5..10).map(lines).collect::<Vec<_>>()
        );
        assert_eq!(segment_files(dir), 0);
    }

    #[test]
    fn a_v1_spool_is_copied_into_the_log_from_its_head() {
        let d = v1_fixture("v1");
        let (_, rec) = Spool::open(&d.0, opts()).expect("open");
        assert_eq!(
            (rec.truncated_bytes, rec.corrupt_bytes, rec.head_reset),
            (0, 0, false)
        );
        drop(rec);
        assert_v1_contents(&d.0);
    }

    #[test]
    fn a_half_done_copy_is_discarded_and_made_again() {
        let d = v1_fixture("v1-copy");
        fs::write(
            d.0.join(segment_log::segment_file_name(0)),
            b"part of an interrupted copy",
        )
        .expect("write");
        assert_v1_contents(&d.0);
    }

    #[test]
    fn a_finished_copy_is_not_made_twice() {
        let d = v1_fixture("v1-delete");
        from_v1(&d.0, opts()).expect("upgrade");
        // The v1 files came back: a crash before their deletion reached the disk.
        copy_fixture(&d.0);
        assert_v1_contents(&d.0);
    }

    #[test]
    fn a_torn_v1_frame_is_skipped_and_counted() {
        let d = v1_fixture("v1-torn");
        let last = v1_segment_path(&d.0, 3);
        let mut bytes = fs::read(&last).expect("read");
        let torn = bytes[..20].to_vec();
        bytes.extend_from_slice(&torn);
        fs::write(&last, &bytes).expect("write");
        let (mut spool, rec) = Spool::open(&d.0, opts()).expect("open");
        assert_eq!((rec.records, rec.truncated_bytes), (5, 20));
        assert_eq!(
            drain_all(&mut spool, 1 << 20),
            (5..10).map(lines).collect::<Vec<_>>()
        );
    }

    #[test]
    fn an_unreadable_v1_head_copies_from_the_oldest_segment() {
        let d = v1_fixture("v1-head");
        fs::write(d.0.join(V1_HEAD), b"garbage").expect("write");
        let (mut spool, rec) = Spool::open(&d.0, opts()).expect("open");
        assert!(rec.head_reset);
        // Segment 2 starts at record 4 (segments of four records; 0..4 were drained and
        // their segment deleted by v1).
        assert_eq!(
            drain_all(&mut spool, 1 << 20),
            (4..10).map(lines).collect::<Vec<_>>()
        );
    }
}

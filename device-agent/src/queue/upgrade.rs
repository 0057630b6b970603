//! Moving a queue directory from the layout agents wrote before the segment log ("v1") to
//! the segment log, when the queue is opened.
//!
//! The v1 layout was `seg-<first record, 20 digits>.log` segments and a `head.log`. Its
//! records are byte for byte the segment log's (16-byte header: payload length, CRC-32 of
//! the record number and the payload, record number; then the postcard batch), and its
//! segments were named for their first record as the log's are. `head.log` held 40-byte
//! entries, the last valid one winning: `"DAQH"`, version `1` (`u32`), head record,
//! head sequence number, dropped readings (`u64` each), CRC-32 of those 32 bytes, 4 zero
//! bytes. All integers little-endian.
//!
//! So nothing is copied. The upgrade
//!
//! 1. renames every `seg-N.log` to the log's name for segment `N`, and fsyncs the
//!    directory;
//! 2. writes the log's head from the last valid `head.log` entry (record, and sequence
//!    number and dropped readings as the queue's metadata), durably, by rename;
//! 3. deletes `head.log`, and fsyncs the directory.
//!
//! A crash anywhere in between leaves `head.log` (and perhaps some `seg-*.log`) in place,
//! and the next open runs the steps again: renaming is idempotent per file, and writing
//! the head from `head.log` again is right as long as `head.log` exists, because nothing
//! else moves the head before step 3 is done. Without a valid `head.log` entry no head is
//! written, which the queue reads as v1 did: from the oldest batch, sequence 1.

use std::fs;
use std::io;
use std::path::Path;

use super::{io_err, HeadMeta, QueueError};

/// The v1 head file.
const V1_HEAD: &str = "head.log";
/// Bytes of a v1 head entry.
const V1_HEAD_ENTRY: usize = 40;

/// What an upgrade did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Upgraded {
    /// Segment files moved.
    pub(super) segments: usize,
}

/// The first record number of a v1 segment file name.
fn v1_segment(name: &str) -> Option<u64> {
    name.strip_prefix("seg-")?
        .strip_suffix(".log")?
        .parse()
        .ok()
}

/// The v1 segments in `dir` (first record numbers), sorted.
fn v1_segments(dir: &Path) -> Result<Vec<u64>, QueueError> {
    segment_log::numbered_files(dir, v1_segment).map_err(io_err("list", dir))
}

/// Whether `dir` holds files of the v1 layout.
///
/// # Errors
/// The directory cannot be listed.
pub(super) fn has_v1_files(dir: &Path) -> Result<bool, QueueError> {
    Ok(dir.join(V1_HEAD).exists() || !v1_segments(dir)?.is_empty())
}

/// The last valid entry of a v1 `head.log`: head record and the queue's metadata.
fn v1_head(bytes: &[u8]) -> Option<(u64, HeadMeta)> {
    bytes.chunks_exact(V1_HEAD_ENTRY).rev().find_map(|e| {
        let word = |at: usize| e.get(at..at + 8)?.try_into().ok().map(u64::from_le_bytes);
        let valid = &e[0..4] == b"DAQH"
            && e[4..8] == 1u32.to_le_bytes()
            && e[32..36] == crc32fast::hash(&e[0..32]).to_le_bytes();
        valid.then_some(())?;
        Some((
            word(8)?,
            HeadMeta {
                front_seq: word(16)?,
                dropped: word(24)?,
            },
        ))
    })
}

/// Moves a v1 queue in `dir` to the segment log (module documentation). `None` when
/// there was nothing to move. The caller holds the queue's lock.
///
/// # Errors
/// A file cannot be read, renamed, written or deleted; the next open tries again.
pub(super) fn from_v1(dir: &Path) -> Result<Option<Upgraded>, QueueError> {
    let head_path = dir.join(V1_HEAD);
    let head = match fs::read(&head_path) {
        Ok(bytes) => Some(v1_head(&bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_err("read", &head_path)(e)),
    };
    let bases = v1_segments(dir)?;
    if head.is_none() && bases.is_empty() {
        return Ok(None);
    }
    for &base in &bases {
        let from = dir.join(format!("seg-{base:020}.log"));
        let to = dir.join(segment_log::segment_file_name(base));
        fs::rename(&from, &to).map_err(io_err("rename", &from))?;
    }
    fsync_dir(dir)?;
    if let Some(Some((front, meta))) = head {
        segment_log::install_head(dir, front, meta.encode())?;
    }
    if head.is_some() {
        fs::remove_file(&head_path).map_err(io_err("remove", &head_path))?;
        fsync_dir(dir)?;
    }
    Ok(Some(Upgraded {
        segments: bases.len(),
    }))
}

fn fsync_dir(dir: &Path) -> Result<(), QueueError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use schemas::session::Outbox;

    use super::super::tests::{first_value, segment_files, Dir, ROOMY};
    use super::super::{DiskQueue, QueueStats};
    use super::*;

    /// A queue directory written by the v1 code (see the fixture's README): 60 batches of
    /// 3 readings `v*100 + i` (`v` = 0..60) pushed with `max_batches = 50` (10 dropped),
    /// 20 acknowledged, renumbered to 500, 1 more acknowledged.
    fn v1_fixture(label: &str) -> Dir {
        let from = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/queue-v1"
        ));
        let d = Dir::new(label);
        fs::create_dir_all(&d.0).expect("create");
        for entry in fs::read_dir(&from).expect("fixture") {
            let entry = entry.expect("entry");
            let name = entry.file_name();
            if name != "README.md" {
                fs::copy(entry.path(), d.0.join(&name)).expect("copy");
            }
        }
        d
    }

    const V1_STATS: QueueStats = QueueStats {
        batches: 29,
        readings: 87,
        bytes: 5100,
        segments: 2,
        front_seq: 501,
        next_seq: 530,
        dropped_readings: 30,
        lost_batches: 0,
    };

    fn assert_v1_contents(q: &mut DiskQueue) {
        assert_eq!(q.stats(), V1_STATS);
        // Record 31 (v = 31) is the oldest waiting batch, with sequence number 501.
        assert_eq!(q.front_seq(), 501);
        assert_eq!(first_value(q, 0), 3100.0);
        assert_eq!(first_value(q, 28), 5900.0);
    }

    #[test]
    fn a_v1_queue_is_upgraded_in_place_and_keeps_its_numbers() {
        let d = v1_fixture("v1");
        assert!(matches!(
            DiskQueue::inspect(&d.0),
            Err(QueueError::OldFormat { .. })
        ));
        let mut q = DiskQueue::open(&d.0, ROOMY).expect("open");
        assert_v1_contents(&mut q);
        assert!(!has_v1_files(&d.0).expect("list"));
        assert_eq!(segment_files(&d.0).len(), 2);
        // It goes on as any queue: the next batch gets the next number.
        q.pop_front(28).expect("ack");
        q.push_back(&[schemas::Reading {
            metric: schemas::message::truncated("counter"),
            ts: 1,
            value: 6000.0,
        }])
        .expect("push");
        drop(q);
        let mut q = DiskQueue::open(&d.0, ROOMY).expect("reopen");
        assert_eq!((q.front_seq(), q.len()), (529, 2));
        assert_eq!(first_value(&mut q, 1), 6000.0);
        assert_eq!(q.stats().dropped_readings, 30);
        assert_eq!(DiskQueue::inspect(&d.0).expect("inspect"), q.stats());
    }

    #[test]
    fn an_upgrade_interrupted_after_any_step_finishes_on_the_next_open() {
        // Step 1 half done: one segment renamed.
        let d = v1_fixture("v1-step1");
        fs::rename(
            d.0.join("seg-00000000000000000000.log"),
            d.0.join(segment_log::segment_file_name(0)),
        )
        .expect("rename");
        let mut q = DiskQueue::open(&d.0, ROOMY).expect("open");
        assert_v1_contents(&mut q);
        drop(q);

        // Steps 1 and 2 done, `head.log` not yet deleted.
        let d = v1_fixture("v1-step2");
        let head = fs::read(d.0.join(V1_HEAD)).expect("head");
        from_v1(&d.0).expect("upgrade");
        fs::write(d.0.join(V1_HEAD), &head).expect("restore head.log");
        let mut q = DiskQueue::open(&d.0, ROOMY).expect("open");
        assert_v1_contents(&mut q);
        assert!(!d.0.join(V1_HEAD).exists());
    }

    #[test]
    fn a_v1_queue_without_a_valid_head_starts_at_its_oldest_batch() {
        let d = v1_fixture("v1-nohead");
        fs::write(d.0.join(V1_HEAD), [0u8; V1_HEAD_ENTRY]).expect("garbage head");
        let mut q = DiskQueue::open(&d.0, ROOMY).expect("open");
        // The oldest segment starts at record 0, whose batch was dropped and acknowledged
        // long ago: it comes again, as v1 would have sent it, from sequence 1.
        assert_eq!((q.front_seq(), q.len()), (1, 60));
        assert_eq!(first_value(&mut q, 0), 0.0);
    }

    #[test]
    fn v1_head_entries_are_checked() {
        let bytes = fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/queue-v1/head.log"
        ))
        .expect("fixture");
        let (front, meta) = v1_head(&bytes).expect("valid");
        assert_eq!((front, meta.front_seq, meta.dropped), (31, 501, 30));
        let mut torn = bytes.clone();
        torn.extend_from_slice(b"DAQH\x01\0");
        assert_eq!(v1_head(&torn).map(|(f, _)| f), Some(31));
        let mut flipped = bytes;
        let last = flipped.len() - V1_HEAD_ENTRY + 10;
        flipped[last] ^= 1;
        assert_ne!(
            v1_head(&flipped).map(|(f, _)| f),
            Some(31),
            "the previous entry wins"
        );
    }
}

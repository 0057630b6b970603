//! Tests of the spool over the segment log: order, marks, capacity, draining, what
//! recovery reports. The log's own crash recovery is tested in its crate.

use std::fs::{self, OpenOptions};
use std::io::Write;

use super::*;

/// A path in a fresh temporary directory, which is removed when this is dropped. The path
/// itself does not exist yet: the code under test creates it. The `TempDir` is held only
/// for its drop.
pub(super) struct Dir(pub(super) PathBuf, #[allow(dead_code)] tempfile::TempDir);
impl Dir {
    pub(super) fn new(label: &str) -> Dir {
        let temp = tempfile::Builder::new()
            .prefix(&format!("hub-spool-{label}-"))
            .tempdir()
            .expect("temp dir");
        Dir(temp.path().join("dir"), temp)
    }
}

fn opts(max_bytes: u64, segment_bytes: u64) -> SpoolOptions {
    SpoolOptions {
        max_bytes,
        segment_bytes,
    }
}

pub(super) fn lines(i: u64) -> Vec<u8> {
    // Fixed width, so every record has the same length.
    format!("telemetry,device=d{},metric=m value={i:04} {i:04}\n", i % 3).into_bytes()
}

fn marks(i: u64) -> [(Arc<str>, u64); 1] {
    [(Arc::from(format!("d{}", i % 3).as_str()), i)]
}

fn append(spool: &mut Spool, i: u64) {
    spool.append(&marks(i), 1, &lines(i)).expect("append");
}

/// Bytes one record of [`append`] takes in a segment.
fn record_len() -> u64 {
    let payload = encode_payload(&marks(0), 1, &lines(0)).expect("payload");
    (payload.len() + segment_log::RECORD_HEADER_BYTES) as u64
}

/// Drains everything, `max_bytes` per chunk; returns the lines in drain order.
pub(super) fn drain_all(spool: &mut Spool, max_bytes: u64) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(chunk) = spool.read_chunk(max_bytes).expect("read") {
        out.extend(chunk.records.into_iter().map(|r| r.lines));
        spool.advance(chunk.end).expect("advance");
    }
    out
}

/// The segment files in `dir`, oldest first.
fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "seglog") && !p.ends_with(segment_log::HEAD_FILE)
        })
        .collect();
    v.sort();
    v
}

pub(super) fn segment_files(dir: &Path) -> usize {
    segments(dir).len()
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
fn a_chunk_holds_about_max_bytes_of_lines_and_at_least_one_record() {
    let dir = Dir::new("chunk");
    let (mut spool, _) = Spool::open(&dir.0, opts(1 << 20, 1 << 16)).expect("open");
    for i in 0..10 {
        append(&mut spool, i);
    }
    let one = lines(0).len() as u64;
    let chunk = spool.read_chunk(1).expect("read").expect("chunk");
    assert_eq!((chunk.records.len(), chunk.end), (1, 1));
    let chunk = spool.read_chunk(3 * one).expect("read").expect("chunk");
    assert_eq!((chunk.records.len(), chunk.end), (3, 3));
    assert_eq!(chunk.records[2].marks, marks(2).to_vec());
    assert_eq!(chunk.records[2].points, 1);
    // Reading moves nothing.
    assert_eq!(spool.records(), 10);
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
        spool.advance(chunk.end).expect("advance");
        let chunk = spool.read_chunk(1).expect("read").expect("chunk");
        spool.advance(chunk.end).expect("advance");
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
fn a_torn_tail_is_cut_off_and_its_marks_not_reported() {
    let dir = Dir::new("torn");
    {
        let (mut spool, _) = Spool::open(&dir.0, opts(1 << 20, 1 << 16)).expect("open");
        for i in 0..5 {
            append(&mut spool, i);
        }
        // Record 5 goes to another spool, to be torn onto this one below.
        let other = Dir::new("torn-source");
        let (mut source, _) = Spool::open(&other.0, opts(1 << 20, 1 << 16)).expect("open");
        for i in 0..5 {
            append(&mut source, i);
        }
        source
            .append(&[(Arc::from("d9"), 9)], 1, &lines(9))
            .expect("append");
        let bytes = fs::read(segments(&other.0).pop().expect("segment")).expect("read");
        let last = &bytes[5 * record_len() as usize..];
        // A crash in the middle of the append: half of record 5 at the end.
        let mut f = OpenOptions::new()
            .append(true)
            .open(segments(&dir.0).pop().expect("segment"))
            .expect("segment");
        f.write_all(&last[..last.len() / 2]).expect("torn write");
    }
    let (mut spool, rec) = Spool::open(&dir.0, opts(1 << 20, 1 << 16)).expect("reopen");
    assert_eq!(rec.records, 5);
    assert_eq!(rec.truncated_bytes, record_len() / 2);
    assert_eq!(rec.corrupt_bytes, 0);
    assert!(!rec.marks.iter().any(|(d, _)| &**d == "d9"));
    append(&mut spool, 5);
    assert_eq!(
        drain_all(&mut spool, 1 << 20),
        (0..=5).map(lines).collect::<Vec<_>>()
    );
}

#[test]
fn segments_rotate_and_drained_ones_are_deleted() {
    let dir = Dir::new("rotate");
    let frame_len = record_len();
    // Four records per segment.
    let (mut spool, _) = Spool::open(&dir.0, opts(1 << 20, frame_len * 4)).expect("open");
    for i in 0..20 {
        append(&mut spool, i);
    }
    assert_eq!(segment_files(&dir.0), 5);
    // Drain six records: the first segment is gone, the second half drained.
    for _ in 0..6 {
        let chunk = spool.read_chunk(1).expect("read").expect("chunk");
        spool.advance(chunk.end).expect("advance");
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
    let frame_len = record_len();
    let (mut spool, _) = Spool::open(&dir.0, opts(frame_len * 3, frame_len * 2)).expect("open");
    for i in 0..3 {
        append(&mut spool, i);
    }
    let err = spool.append(&marks(3), 1, &lines(3)).expect_err("full");
    assert!(matches!(err, SpoolError::Full { .. }), "{err}");
    assert_eq!(spool.records(), 3);
    // Draining the first segment (two records) makes room.
    let chunk = spool.read_chunk(1).expect("read").expect("chunk");
    spool.advance(chunk.end).expect("advance");
    let chunk = spool.read_chunk(1).expect("read").expect("chunk");
    spool.advance(chunk.end).expect("advance");
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
        spool.advance(chunk.end).expect("advance");
    }
    fs::write(dir.0.join(segment_log::HEAD_FILE), b"garbage").expect("corrupt head");
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
    let frame_len = record_len();
    {
        let (mut spool, _) = Spool::open(&dir.0, opts(1 << 20, frame_len * 2)).expect("open");
        for i in 0..4 {
            append(&mut spool, i);
        }
    }
    // Bit rot in the second record of the first segment.
    let first = segments(&dir.0).remove(0);
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

#[test]
fn a_record_damaged_after_opening_is_skipped_with_an_error() {
    let dir = Dir::new("rot");
    let (mut spool, _) = Spool::open(&dir.0, opts(1 << 20, 1 << 16)).expect("open");
    for i in 0..3 {
        append(&mut spool, i);
    }
    let seg = segments(&dir.0).remove(0);
    let mut bytes = fs::read(&seg).expect("read");
    let at = record_len() as usize + 40;
    bytes[at] ^= 0x01;
    fs::write(&seg, &bytes).expect("write");
    // The good record before it comes alone; then the bad one is skipped, loudly.
    let chunk = spool.read_chunk(1 << 20).expect("read").expect("chunk");
    assert_eq!(chunk.records.len(), 1);
    spool.advance(chunk.end).expect("advance");
    match spool.read_chunk(1 << 20) {
        Err(SpoolError::Corrupt { number: 1, .. }) => {}
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(drain_all(&mut spool, 1 << 20), vec![lines(2)]);
    assert!(spool.is_empty());
}

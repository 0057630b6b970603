//! Crash and damage tests of recovery: every way a crash or the disk can leave the files,
//! made by hand, and what [`SegmentLog::open`] makes of it.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::files::HEAD_TMP;
use crate::{
    segment_file_name, Durability, HeadState, LogError, LogOptions, Recovery, SegmentLog,
    HEAD_FILE, META_BYTES, RECORD_HEADER_BYTES,
};

/// Payloads of different lengths, so a cut can land anywhere.
fn payload(n: u64) -> Vec<u8> {
    format!("payload {n} {}", "x".repeat((n % 7) as usize)).into_bytes()
}

fn frame_len(n: u64) -> u64 {
    (RECORD_HEADER_BYTES + payload(n).len()) as u64
}

const OPTS: LogOptions = LogOptions {
    max_bytes: 1 << 20,
    segment_bytes: 200,
};

/// A log holding records `0..count` with the head at `front`, closed again.
fn written(dir: &Path, count: u64, front: u64) {
    let (mut log, _) = SegmentLog::open(dir, OPTS, |_, _| {}).expect("open");
    for n in 0..count {
        assert_eq!(
            log.append(&payload(n), Durability::Durable)
                .expect("append"),
            n
        );
    }
    log.commit(front, [7; META_BYTES], Durability::Durable)
        .expect("commit");
}

/// Opens the log and returns it, what recovery did, and the records it visited.
fn reopen(dir: &Path) -> (SegmentLog, Recovery, Vec<u64>) {
    let mut seen = Vec::new();
    let (log, recovery) = SegmentLog::open(dir, OPTS, |n, p| {
        assert_eq!(p, payload(n), "record {n} visited with the wrong payload");
        seen.push(n);
    })
    .expect("reopen");
    (log, recovery, seen)
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .expect("list")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seglog") && !p.ends_with(HEAD_FILE))
        .collect();
    v.sort();
    v
}

/// The first record number of a segment file.
fn base_of(path: &Path) -> u64 {
    path.file_stem()
        .and_then(|s| s.to_str())
        .and_then(|s| s.parse().ok())
        .expect("a segment file name")
}

fn append_bytes(path: &Path, bytes: &[u8]) {
    let mut f = OpenOptions::new().append(true).open(path).expect("open");
    f.write_all(bytes).expect("write");
}

/// Every record in `from..to` reads back as written.
fn assert_readable(log: &mut SegmentLog, from: u64, to: u64) {
    for n in from..to {
        assert_eq!(log.read(n).expect("read"), payload(n), "record {n}");
    }
}

#[test]
fn a_cut_at_every_byte_of_the_last_record_loses_only_that_record() {
    let template = tempfile::tempdir().expect("tempdir");
    written(template.path(), 6, 2);
    let last_segment = segments(template.path()).pop().expect("segment");
    let full = fs::read(&last_segment).expect("read");
    let last = frame_len(5);
    let name = last_segment.file_name().expect("name").to_owned();
    for cut in 0..last {
        let dir = tempfile::tempdir().expect("tempdir");
        for entry in fs::read_dir(template.path()).expect("list") {
            let entry = entry.expect("entry");
            fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
        }
        let kept = full.len() as u64 - last + cut;
        fs::write(dir.path().join(&name), &full[..kept as usize]).expect("cut");
        let (mut log, recovery, seen) = reopen(dir.path());
        assert_eq!(recovery.truncated_bytes, cut, "cut at {cut}");
        assert_eq!(recovery.corrupt_bytes, 0);
        assert_eq!(seen, vec![2, 3, 4], "cut at {cut}");
        assert_eq!((log.front(), log.end()), (2, 5), "cut at {cut}");
        assert_eq!(
            fs::metadata(dir.path().join(&name)).expect("meta").len(),
            full.len() as u64 - last,
            "the torn bytes are gone from the file"
        );
        assert_readable(&mut log, 2, 5);
        // The torn record's number goes to the next record; it sticks after a reopen.
        assert_eq!(
            log.append(&payload(5), Durability::Durable)
                .expect("append"),
            5
        );
        drop(log);
        let (mut log, recovery, seen) = reopen(dir.path());
        assert_eq!(recovery.truncated_bytes, 0);
        assert_eq!(seen, vec![2, 3, 4, 5]);
        assert_readable(&mut log, 2, 6);
    }
}

#[test]
fn a_flipped_byte_anywhere_in_the_last_record_cuts_it_off() {
    let template = tempfile::tempdir().expect("tempdir");
    written(template.path(), 4, 0);
    let seg = segments(template.path()).pop().expect("segment");
    let good = fs::read(&seg).expect("read");
    let last = frame_len(3) as usize;
    for i in good.len() - last..good.len() {
        let dir = tempfile::tempdir().expect("tempdir");
        for entry in fs::read_dir(template.path()).expect("list") {
            let entry = entry.expect("entry");
            fs::copy(entry.path(), dir.path().join(entry.file_name())).expect("copy");
        }
        let mut bad = good.clone();
        bad[i] ^= 0x40;
        fs::write(dir.path().join(seg.file_name().expect("name")), &bad).expect("write");
        let (log, recovery, seen) = reopen(dir.path());
        assert_eq!(seen, vec![0, 1, 2], "flipped byte {i}");
        assert_eq!(log.end(), 3);
        assert_eq!(recovery.truncated_bytes, last as u64, "flipped byte {i}");
    }
}

#[test]
fn garbage_after_the_last_record_is_cut_off() {
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        ("zeros (size written, data not)", vec![0; 100]),
        ("ones", vec![0xff; 40]),
        ("a short header", vec![1, 0, 0]),
        // A complete, valid record with the wrong number (a stale block).
        (
            "a replayed record",
            crate::record::frame(1, &payload(4)).expect("frame"),
        ),
        // A header claiming more bytes than the file has.
        ("a length past the end", {
            let mut f = crate::record::frame(4, &payload(4)).expect("frame");
            f.truncate(RECORD_HEADER_BYTES);
            f
        }),
    ];
    for (what, bytes) in garbage {
        let dir = tempfile::tempdir().expect("tempdir");
        written(dir.path(), 4, 1);
        let seg = segments(dir.path()).pop().expect("segment");
        append_bytes(&seg, &bytes);
        let (mut log, recovery, seen) = reopen(dir.path());
        assert_eq!(recovery.truncated_bytes, bytes.len() as u64, "{what}");
        assert_eq!(seen, vec![1, 2, 3], "{what}");
        assert_readable(&mut log, 1, 4);
        assert_eq!(
            log.append(&payload(4), Durability::Durable)
                .expect("append"),
            4
        );
    }
}

#[test]
fn a_lost_head_file_restarts_at_the_oldest_segment() {
    let dir = tempfile::tempdir().expect("tempdir");
    written(dir.path(), 30, 25);
    let bases: Vec<u64> = segments(dir.path()).iter().map(|p| base_of(p)).collect();
    assert!(
        bases[0] > 0 && bases[0] <= 25,
        "consumed segments are gone: {bases:?}"
    );
    fs::remove_file(dir.path().join(HEAD_FILE)).expect("remove head");
    let (mut log, recovery, seen) = reopen(dir.path());
    assert_eq!(recovery.head, HeadState::Missing);
    assert_eq!(log.front(), bases[0], "the oldest segment that is left");
    assert_eq!(log.meta(), [0; META_BYTES]);
    assert_eq!(seen, (bases[0]..30).collect::<Vec<_>>());
    assert_readable(&mut log, bases[0], 30);
    // Nothing is deleted for it, and committing writes a new head file.
    log.commit(26, [1; META_BYTES], Durability::Buffered)
        .expect("commit");
    drop(log);
    let (log, recovery, _) = reopen(dir.path());
    assert_eq!(recovery.head, HeadState::Valid);
    assert_eq!((log.front(), log.meta()), (26, [1; META_BYTES]));
}

#[test]
fn an_unreadable_head_file_restarts_at_the_oldest_segment() {
    let dir = tempfile::tempdir().expect("tempdir");
    written(dir.path(), 5, 3);
    fs::write(
        dir.path().join(HEAD_FILE),
        b"not a head entry at all, 32 b.",
    )
    .expect("write");
    let (log, recovery, seen) = reopen(dir.path());
    assert_eq!(recovery.head, HeadState::Corrupt);
    assert_eq!(log.front(), 0);
    assert_eq!(seen, vec![0, 1, 2, 3, 4]);
}

#[test]
fn a_torn_head_commit_falls_back_to_the_previous_one_and_a_temp_file_is_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (mut log, _) = SegmentLog::open(dir.path(), OPTS, |_, _| {}).expect("open");
        for n in 0..5 {
            log.append(&payload(n), Durability::Durable)
                .expect("append");
        }
        log.commit(2, [2; META_BYTES], Durability::Buffered)
            .expect("commit");
        log.commit(3, [3; META_BYTES], Durability::Buffered)
            .expect("commit");
    }
    // A crash in the middle of appending the next entry, and in the middle of a rename
    // commit.
    append_bytes(&dir.path().join(HEAD_FILE), b"SLH1\x04\0\0");
    fs::write(dir.path().join(HEAD_TMP), b"SLH1").expect("tmp");
    let (log, recovery, seen) = reopen(dir.path());
    assert_eq!(recovery.head, HeadState::Valid);
    assert_eq!((log.front(), log.meta()), (3, [3; META_BYTES]));
    assert_eq!(seen, vec![3, 4]);
    assert!(!dir.path().join(HEAD_TMP).exists());
}

#[test]
fn damage_in_an_older_segment_keeps_the_numbering_and_marks_records_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    written(dir.path(), 30, 0);
    let segs = segments(dir.path());
    assert!(segs.len() >= 3, "{segs:?}");
    let (second_base, third_base) = (base_of(&segs[1]), base_of(&segs[2]));
    // Damage the second record of the second segment.
    let mut bytes = fs::read(&segs[1]).expect("read");
    let at = frame_len(second_base) as usize + RECORD_HEADER_BYTES + 2;
    bytes[at] ^= 0x01;
    let file_len = bytes.len() as u64;
    fs::write(&segs[1], &bytes).expect("write");
    let mut seen = Vec::new();
    let (mut log, recovery) =
        SegmentLog::open(dir.path(), OPTS, |n, _| seen.push(n)).expect("reopen");
    let lost: Vec<u64> = (second_base + 1..third_base).collect();
    assert_eq!(recovery.truncated_bytes, 0);
    assert_eq!(
        recovery.corrupt_bytes,
        file_len - frame_len(second_base),
        "the rest of the segment"
    );
    assert_eq!((log.front(), log.end()), (0, 30), "numbering is kept");
    assert_eq!(log.missing_records(), lost.len() as u64);
    assert_eq!(log.live_records(), 30 - lost.len() as u64);
    assert_eq!(
        seen,
        (0..30).filter(|n| !lost.contains(n)).collect::<Vec<_>>()
    );
    for n in 0..30 {
        match log.read(n) {
            Err(LogError::Missing { number }) => assert!(lost.contains(&number)),
            Ok(p) => assert_eq!(p, payload(n)),
            Err(e) => panic!("record {n}: {e}"),
        }
    }
    // Moving the head past them forgets them.
    log.commit(third_base, [0; META_BYTES], Durability::Durable)
        .expect("commit");
    assert_eq!(log.missing_records(), 0);
    drop(log);
    let (log, recovery, _) = reopen(dir.path());
    assert_eq!(recovery.corrupt_bytes, 0, "cut once");
    assert_eq!(log.live_records(), 30 - third_base);
}

#[test]
fn a_deleted_segment_file_leaves_its_numbers_missing() {
    let dir = tempfile::tempdir().expect("tempdir");
    written(dir.path(), 30, 0);
    let segs = segments(dir.path());
    fs::remove_file(&segs[1]).expect("remove");
    fs::remove_file(&segs[0]).expect("remove");
    let third_base = base_of(&segs[2]);
    let (mut log, _, seen) = reopen(dir.path());
    assert_eq!(seen, (third_base..30).collect::<Vec<_>>());
    assert_eq!((log.front(), log.end()), (0, 30));
    assert_eq!(log.missing_records(), third_base);
    assert!(matches!(log.read(0), Err(LogError::Missing { number: 0 })));
    assert_readable(&mut log, third_base, 30);
}

#[test]
fn segments_left_behind_the_head_by_a_crash_are_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    written(dir.path(), 30, 0);
    let segs = segments(dir.path());
    let saved: Vec<Vec<u8>> = segs
        .iter()
        .take(2)
        .map(|p| fs::read(p).expect("read"))
        .collect();
    {
        let (mut log, _) = SegmentLog::open(dir.path(), OPTS, |_, _| {}).expect("open");
        log.commit(25, [0; META_BYTES], Durability::Durable)
            .expect("commit");
    }
    // A crash after the head moved and before the unlinks reached the disk.
    for (path, bytes) in segs.iter().zip(&saved) {
        fs::write(path, bytes).expect("restore");
    }
    let (mut log, recovery, seen) = reopen(dir.path());
    assert_eq!(recovery.removed_segments, 2);
    assert!(!segs[0].exists() && !segs[1].exists());
    assert_eq!(seen, (25..30).collect::<Vec<_>>());
    assert_readable(&mut log, 25, 30);
}

#[test]
fn a_newer_segment_wins_over_a_failed_append_left_in_an_older_one() {
    // An append whose fsync failed and whose cut-off failed too leaves a complete record
    // in the old tail; the next record, with the same number, starts a new segment.
    let dir = tempfile::tempdir().expect("tempdir");
    written(dir.path(), 3, 0);
    let old_tail = segments(dir.path()).pop().expect("segment");
    let unacked = crate::record::frame(3, b"never acknowledged").expect("frame");
    append_bytes(&old_tail, &unacked);
    fs::write(
        dir.path().join(segment_file_name(3)),
        crate::record::frame(3, &payload(3)).expect("frame"),
    )
    .expect("write");
    let (mut log, recovery, seen) = reopen(dir.path());
    assert_eq!(recovery.truncated_bytes, unacked.len() as u64);
    assert_eq!(seen, vec![0, 1, 2, 3]);
    assert_readable(&mut log, 0, 4);
}

#[test]
fn an_empty_last_segment_from_a_crash_after_creating_it_is_used() {
    let dir = tempfile::tempdir().expect("tempdir");
    written(dir.path(), 3, 1);
    fs::write(dir.path().join(segment_file_name(3)), b"").expect("create");
    let (mut log, recovery, _) = reopen(dir.path());
    assert_eq!(recovery.truncated_bytes, 0);
    assert_eq!(log.end(), 3);
    assert_eq!(
        log.append(&payload(3), Durability::Durable)
            .expect("append"),
        3
    );
    assert_eq!(
        fs::metadata(dir.path().join(segment_file_name(3)))
            .expect("meta")
            .len(),
        frame_len(3)
    );
}

#[test]
fn other_files_in_the_directory_are_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(dir.path().join("lock"), b"1234\n").expect("lock");
    fs::write(dir.path().join("seg-00000000000000000000.log"), b"old").expect("old");
    written(dir.path(), 3, 3);
    let (mut log, _) = SegmentLog::open(dir.path(), OPTS, |_, _| {}).expect("open");
    log.remove_consumed_tail().expect("remove");
    assert_eq!(fs::read(dir.path().join("lock")).expect("lock"), b"1234\n");
    assert!(dir.path().join("seg-00000000000000000000.log").exists());
}

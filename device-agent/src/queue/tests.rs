//! Tests of the queue's own policy over the segment log: sequence numbers, acks, limits,
//! renumbering, placeholders, the lock. The log's crash recovery is tested in its crate.

use super::*;

/// A path in a fresh temporary directory, which is removed when this is dropped. The path
/// itself does not exist yet: the code under test creates it. The `TempDir` is held only
/// for its drop.
pub(super) struct Dir(pub(super) PathBuf, #[allow(dead_code)] tempfile::TempDir);
impl Dir {
    pub(super) fn new(label: &str) -> Dir {
        let temp = tempfile::Builder::new()
            .prefix(&format!("agent-queue-{label}-"))
            .tempdir()
            .expect("temp dir");
        Dir(temp.path().join("dir"), temp)
    }
}

pub(super) const ROOMY: QueueLimits = QueueLimits {
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

pub(super) fn first_value(q: &mut DiskQueue, index: usize) -> f64 {
    let mut out = HVec::new();
    q.read(index, &mut out).expect("read");
    out[0].value
}

pub(super) fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .expect("list")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "seglog") && !p.ends_with(segment_log::HEAD_FILE)
        })
        .collect();
    v.sort();
    v
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
fn a_torn_batch_is_ignored_by_inspect_cut_at_open_and_its_number_reused() {
    let d = Dir::new("torn");
    {
        let mut q = DiskQueue::open(&d.0, ROOMY).expect("open");
        for v in 0..3 {
            q.push_back(&batch(v, 2)).expect("push");
        }
    }
    let seg = segment_files(&d.0).pop().expect("segment");
    let good = fs::read(&seg).expect("read");
    // A power cut in the middle of the fourth append: half a record.
    let mut torn = good.clone();
    torn.extend_from_slice(&good[..good.len() / 5]);
    fs::write(&seg, &torn).expect("write");

    let stats = DiskQueue::inspect(&d.0).expect("inspect");
    assert_eq!(stats.batches, 3, "inspect ignores the torn record");
    assert_eq!(
        fs::read(&seg).expect("read"),
        torn,
        "inspect changes nothing"
    );
    let mut q = DiskQueue::open(&d.0, ROOMY).expect("reopen");
    assert_eq!(q.len(), 3);
    assert_eq!(fs::read(&seg).expect("read"), good, "cut off");
    // The next batch takes the torn record's number: it was never recorded.
    q.push_back(&batch(9, 1)).expect("push");
    assert_eq!(q.len(), 4);
    assert_eq!(q.stats().next_seq, 5);
    assert_eq!(first_value(&mut q, 3), 900.0);
    drop(q);
    let mut q = DiskQueue::open(&d.0, ROOMY).expect("reopen 2");
    assert_eq!(q.len(), 4);
    assert_eq!(first_value(&mut q, 3), 900.0);
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
fn the_byte_limit_also_frees_an_acknowledged_tail() {
    let d = Dir::new("tail");
    let limits = QueueLimits {
        max_bytes: 64 << 10, // 4 KiB segments
        max_batches: 100_000,
    };
    let mut q = DiskQueue::open(&d.0, limits).expect("open");
    let mut dropped = 0u64;
    for v in 0..400 {
        dropped += u64::from(q.push_back(&batch(v, 10)).expect("push").evicted_readings);
        // Acknowledge all but the newest now and then: acknowledged records still take
        // bytes until their segment goes.
        if v % 50 == 49 {
            q.pop_front(q.len() - 1).expect("ack");
        }
        assert!(q.stats().bytes <= limits.max_bytes, "{:?}", q.stats());
    }
    assert_eq!(q.stats().next_seq, 401);
    assert_eq!(q.stats().dropped_readings, dropped);
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
fn a_lost_head_restarts_at_sequence_one_from_the_oldest_batch() {
    let d = Dir::new("nohead");
    {
        let mut q = DiskQueue::open(&d.0, ROOMY).expect("open");
        for v in 0..3 {
            q.push_back(&batch(v, 1)).expect("push");
        }
        q.renumber(70).expect("renumber");
        q.pop_front(1).expect("ack");
    }
    fs::remove_file(d.0.join(segment_log::HEAD_FILE)).expect("remove head");
    let mut q = DiskQueue::open(&d.0, ROOMY).expect("reopen");
    // The session renumbers on Welcome; the acknowledged batch comes again.
    assert_eq!((q.front_seq(), q.len()), (1, 3));
    assert_eq!(first_value(&mut q, 0), 0.0);
    assert_eq!(q.stats().dropped_readings, 0);
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
    let inspected = DiskQueue::inspect(&d.0).expect("inspect");
    let mut q = DiskQueue::open(&d.0, limits).expect("reopen");
    assert_eq!(q.len(), 40, "numbering is kept");
    assert_eq!(inspected, q.stats());
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
fn a_record_damaged_after_opening_is_read_as_a_placeholder() {
    let d = Dir::new("rot");
    let mut q = DiskQueue::open(&d.0, ROOMY).expect("open");
    for v in 0..3 {
        q.push_back(&batch(v, 2)).expect("push");
    }
    let seg = segment_files(&d.0).pop().expect("segment");
    let mut bytes = fs::read(&seg).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&seg, &bytes).expect("write");
    let mut out = HVec::new();
    q.read(2, &mut out).expect("read");
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].metric, LOST_BATCH_METRIC);
    assert_eq!(first_value(&mut q, 1), 100.0);
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

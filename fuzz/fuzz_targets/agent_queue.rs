//! The agent's on-disk queue (`device_agent::queue::DiskQueue`, on `segment-log`) recovering
//! from whatever its directory holds: a queue is built with random pushes, acks and
//! renumberings, then its files are damaged at random (or written from scratch, in the
//! current or the older layout), then it is opened again. Opening and inspecting never
//! panic; an opened queue reads back every waiting batch, takes a new one, and a clean
//! reopen finds exactly what was there. Without damage, the reopened queue is the queue
//! that was closed.
#![no_main]

use arbitrary::Arbitrary;
use device_agent::queue::{DiskQueue, QueueLimits, LOST_BATCH_METRIC};
use hub_fuzz::disk::{damage, fresh_dir, Damage};
use libfuzzer_sys::fuzz_target;
use schemas::limits::MAX_READINGS;
use schemas::message::truncated;
use schemas::session::Outbox;
use schemas::Reading;

#[derive(Arbitrary, Debug)]
enum Op {
    Push(u8),
    Pop(u8),
    Renumber(u16),
}

#[derive(Arbitrary, Debug)]
struct Input {
    ops: Vec<Op>,
    damage: Vec<Damage>,
    max_batches: u8,
}

type Batches = Vec<heapless::Vec<Reading, MAX_READINGS>>;

fn readings(n: u8, value: u64) -> Vec<Reading> {
    (0..=n % 8)
        .map(|i| Reading {
            metric: truncated("m"),
            ts: value,
            value: (value * 10 + u64::from(i)) as f64,
        })
        .collect()
}

/// Every waiting batch, read back. A placeholder for a lost batch is stamped with the time
/// the queue was opened, so its timestamp is left out of the comparison.
fn contents(q: &mut DiskQueue) -> Batches {
    (0..q.len())
        .map(|i| {
            let mut out: heapless::Vec<Reading, MAX_READINGS> = heapless::Vec::new();
            q.read(i, &mut out).expect("every waiting batch reads back");
            for r in out.iter_mut().filter(|r| r.metric == LOST_BATCH_METRIC) {
                r.ts = 0;
            }
            out
        })
        .collect()
}

fuzz_target!(|input: Input| {
    let dir = fresh_dir();
    let limits = QueueLimits {
        max_bytes: 16 * 1024,
        max_batches: usize::from(input.max_batches).max(1),
    };
    let mut value = 0;
    let before = {
        let Ok(mut q) = DiskQueue::open(&dir, limits) else {
            panic!("a fresh queue opens")
        };
        for op in input.ops.iter().take(64) {
            match op {
                Op::Push(n) => {
                    value += 1;
                    q.push_back(&readings(*n, value)).expect("push");
                }
                Op::Pop(k) => {
                    let k = usize::from(*k) % (q.len() + 1);
                    q.pop_front(k).expect("pop");
                }
                Op::Renumber(seq) => q.renumber(u64::from(*seq) + 1).expect("renumber"),
            }
        }
        (q.front_seq(), contents(&mut q))
    };
    damage(&dir, &input.damage);
    let _ = DiskQueue::inspect(&dir);
    let Ok(mut q) = DiskQueue::open(&dir, limits) else {
        return;
    };
    let found = (q.front_seq(), contents(&mut q));
    if input.damage.is_empty() {
        assert_eq!(found, before, "a clean reopen changed the queue");
    }
    q.push_back(&readings(3, 1_000_000))
        .expect("push after recovery");
    let after = (q.front_seq(), contents(&mut q));
    drop(q);
    let mut q = DiskQueue::open(&dir, limits).expect("a clean reopen");
    assert_eq!((q.front_seq(), contents(&mut q)), after);
});

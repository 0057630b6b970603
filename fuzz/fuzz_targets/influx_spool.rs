//! The hub's InfluxDB spool (`hub::store::spool::Spool`, on `segment-log`) recovering from
//! whatever its directory holds: a spool is built with random appends and drains, its files
//! are damaged at random (or written from scratch, in the current or the older layout), then
//! it is opened again. Opening never panics; an opened spool drains to the end (skipping
//! what is corrupt, never looping), takes a new record, and a clean reopen finds exactly the
//! records that were waiting. Without damage, the reopened spool holds what was waiting.
#![no_main]

use std::sync::Arc;

use arbitrary::Arbitrary;
use hub::store::spool::{Record, Spool, SpoolError, SpoolOptions};
use hub_fuzz::disk::{damage, fresh_dir, Damage};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
enum Op {
    Append { device: u8, seq: u8, lines: u8 },
    Drain(u8),
}

#[derive(Arbitrary, Debug)]
struct Input {
    ops: Vec<Op>,
    damage: Vec<Damage>,
}

fn options() -> SpoolOptions {
    SpoolOptions {
        max_bytes: 64 * 1024,
        segment_bytes: 2 * 1024,
    }
}

/// Everything waiting, without draining it (read, then put back by reopening).
fn waiting(spool: &mut Spool) -> Vec<Record> {
    let mut all = Vec::new();
    // Read chunk by chunk without advancing: the first chunk is all there is to read
    // without moving the head, so read it with a size that takes everything.
    match spool.read_chunk(u64::MAX) {
        Ok(Some(chunk)) => all.extend(chunk.records),
        Ok(None) | Err(_) => {}
    }
    all
}

fn append(spool: &mut Spool, device: u8, seq: u8, lines: u8) -> Result<(), SpoolError> {
    let marks = vec![(Arc::<str>::from(format!("d{}", device % 4)), u64::from(seq))];
    let text: String = (0..=lines % 16)
        .map(|i| format!("telemetry,device=d,metric=m value={i} {seq}\n"))
        .collect();
    spool.append(&marks, u32::from(lines % 16) + 1, text.as_bytes())
}

fuzz_target!(|input: Input| {
    let dir = fresh_dir();
    let before = {
        let (mut spool, _) = Spool::open(&dir, options()).expect("a fresh spool opens");
        for op in input.ops.iter().take(64) {
            match op {
                Op::Append { device, seq, lines } => {
                    match append(&mut spool, *device, *seq, *lines) {
                        Ok(()) | Err(SpoolError::Full { .. }) => {}
                        Err(e) => panic!("append: {e}"),
                    }
                }
                Op::Drain(max) => {
                    if let Some(chunk) = spool.read_chunk(u64::from(*max)).expect("read") {
                        spool.advance(chunk.end).expect("advance");
                    }
                }
            }
        }
        waiting(&mut spool)
    };
    damage(&dir, &input.damage);
    let Ok((mut spool, _recovery)) = Spool::open(&dir, options()) else {
        return;
    };
    if input.damage.is_empty() {
        assert_eq!(
            waiting(&mut spool),
            before,
            "a clean reopen changed the spool"
        );
    }
    let _ = append(&mut spool, 1, 200, 3);
    drop(spool);
    let (mut spool, _) = Spool::open(&dir, options()).expect("a clean reopen");
    // Drain to the end: every read makes progress, corrupt records are skipped.
    for _ in 0..10_000 {
        match spool.read_chunk(1024) {
            Ok(Some(chunk)) => spool.advance(chunk.end).expect("advance"),
            Ok(None) => {
                assert!(spool.is_empty(), "nothing to read but not empty");
                return;
            }
            Err(SpoolError::Corrupt { .. }) => {}
            Err(e) => panic!("drain: {e}"),
        }
    }
    panic!("the spool did not drain");
});

//! An [`Outbox`] in RAM (with an allocator): for hosts that keep unacknowledged batches in
//! memory (test devices, the in-memory pair harness) rather than in flash or on disk.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use heapless::Vec as FixedVec;

use crate::limits::MAX_READINGS;
use crate::message::Reading;
use crate::session::{Outbox, Pushed};

/// Unacknowledged batches in RAM, oldest first. With a capacity it drops the oldest batch
/// to make room (and reports it, as every outbox must); without one it holds everything,
/// which tests use to count every reading.
#[derive(Debug, Clone)]
pub struct MemOutbox {
    front: u64,
    batches: VecDeque<Vec<Reading>>,
    capacity: Option<usize>,
}

/// The error of a [`MemOutbox`]: only a read past the end, which the session never asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfRange;

impl MemOutbox {
    /// An outbox that holds every batch until it is acknowledged.
    pub fn unbounded() -> MemOutbox {
        MemOutbox {
            front: 1,
            batches: VecDeque::new(),
            capacity: None,
        }
    }

    /// An outbox of at most `batches` batches (at least one) that drops the oldest when full.
    pub fn with_capacity(batches: usize) -> MemOutbox {
        MemOutbox {
            capacity: Some(batches.max(1)),
            ..MemOutbox::unbounded()
        }
    }

    /// The stored batches, oldest first, with their sequence numbers.
    pub fn batches(&self) -> impl Iterator<Item = (u64, &[Reading])> {
        self.batches
            .iter()
            .enumerate()
            .map(|(i, b)| (self.front + i as u64, b.as_slice()))
    }
}

impl Default for MemOutbox {
    fn default() -> MemOutbox {
        MemOutbox::unbounded()
    }
}

impl Outbox for MemOutbox {
    type Error = OutOfRange;

    fn front_seq(&self) -> u64 {
        self.front
    }

    fn len(&self) -> usize {
        self.batches.len()
    }

    fn push_back(&mut self, readings: &[Reading]) -> Result<Pushed, OutOfRange> {
        let mut pushed = Pushed::default();
        if let Some(capacity) = self.capacity {
            while self.batches.len() >= capacity {
                let Some(old) = self.batches.pop_front() else {
                    break;
                };
                self.front += 1;
                pushed.evicted_batches += 1;
                pushed.evicted_readings += old.len() as u32;
            }
        }
        self.batches.push_back(readings.to_vec());
        Ok(pushed)
    }

    fn read(
        &mut self,
        index: usize,
        out: &mut FixedVec<Reading, MAX_READINGS>,
    ) -> Result<(), OutOfRange> {
        let batch = self.batches.get(index).ok_or(OutOfRange)?;
        out.clear();
        for reading in batch.iter().take(MAX_READINGS) {
            out.push(reading.clone()).map_err(|_| OutOfRange)?;
        }
        Ok(())
    }

    fn pop_front(&mut self, count: usize) -> Result<(), OutOfRange> {
        let count = count.min(self.batches.len());
        self.batches.drain(..count);
        self.front += count as u64;
        Ok(())
    }

    fn renumber(&mut self, front_seq: u64) -> Result<(), OutOfRange> {
        self.front = front_seq;
        Ok(())
    }
}

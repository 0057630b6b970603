//! The unacknowledged-telemetry ring: `schemas::session::Outbox` over a [`Flash`] region.
//!
//! Layout of the region: a 32-byte header, then a circular data area of records.
//!
//! ```text
//! header  "FWR1" | format u8 | 3 reserved | front_seq u64 | count u32 | head u32 | used u32 | crc32 u32
//! record  len u16 | readings u8 | postcard(&[Reading]) (len bytes)
//! ```
//!
//! All integers are little-endian. `front_seq` is the sequence number of the oldest record,
//! or, when the ring is empty, the number the next batch will get: it is the device's
//! persistent sequence counter. Records never straddle the end of the data area: when one
//! does not fit there, the rest of the area is skipped (marked with `len = 0xFFFF` when at
//! least a record header fits) and the record goes to offset 0. `used` counts those
//! skipped bytes too, so free space is always `data_len - used`.
//!
//! Every update writes the record(s) first and the header last, then calls
//! [`Flash::sync`]. The header is the commit point: a reset before it leaves the previous
//! state intact. (On NOR flash, put a wear-levelling layer such as
//! `embedded_storage::nor_flash::RmwNorFlashStorage` underneath; the header is rewritten on
//! every update.)

use heapless::Vec;
use schemas::limits::{MAX_METRIC_LEN, MAX_READINGS};
use schemas::session::{Outbox, Pushed};
use schemas::Reading;

use crate::crc::crc32;
use crate::flash::Flash;

/// Size of the header at the start of the region.
pub const HEADER_LEN: usize = 32;
/// Per-record overhead: length and reading count.
pub const RECORD_HEADER_LEN: usize = 3;
/// Largest postcard encoding of a batch: a length byte, then 64 readings of at most
/// 1 + 64 (metric) + 10 (ts varint) + 8 (f64) bytes.
pub const MAX_RECORD_LEN: usize = 1 + MAX_READINGS * (1 + MAX_METRIC_LEN + 10 + 8);
/// Smallest region that holds the header and one maximal record, which guarantees that any
/// valid batch fits.
pub const MIN_FULL_CAPACITY: usize = HEADER_LEN + RECORD_HEADER_LEN + MAX_RECORD_LEN;
/// Smallest region accepted at all (header plus a little data); batches that do not fit
/// are refused with [`RingError::TooLarge`].
pub const MIN_CAPACITY: usize = HEADER_LEN + 64;

const MAGIC: [u8; 4] = *b"FWR1";
const FORMAT: u8 = 1;
const WRAP_MARK: u16 = 0xFFFF;

/// Why the ring failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError<E: core::fmt::Debug> {
    /// The flash failed.
    #[error("flash failed: {0:?}")]
    Flash(E),
    /// The region holds something that is not a valid ring (the text says what). The device
    /// should not silently wipe it: that would lose unacknowledged data and reuse sequence
    /// numbers; re-provision it instead.
    #[error("ring state is corrupt: {0}")]
    Corrupt(&'static str),
    /// The region is smaller than [`MIN_CAPACITY`] or larger than 4 GiB.
    #[error(
        "flash region of {0} bytes is unusable (at least {MIN_CAPACITY} bytes, at most 4 GiB)"
    )]
    BadCapacity(usize),
    /// A batch does not fit even in an empty ring.
    #[error("a batch of {needed} bytes does not fit in a ring data area of {available} bytes")]
    TooLarge {
        /// Bytes the record needs.
        needed: usize,
        /// Bytes in the data area.
        available: usize,
    },
    /// An empty batch was pushed, or a batch index beyond the stored ones was read.
    #[error("invalid ring operation: {0}")]
    Invalid(&'static str),
}

type Result<T, F> = core::result::Result<T, RingError<<F as Flash>::Error>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    front_seq: u64,
    count: u32,
    head: u32,
    used: u32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = FORMAT;
        b[8..16].copy_from_slice(&self.front_seq.to_le_bytes());
        b[16..20].copy_from_slice(&self.count.to_le_bytes());
        b[20..24].copy_from_slice(&self.head.to_le_bytes());
        b[24..28].copy_from_slice(&self.used.to_le_bytes());
        let crc = crc32(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// `Ok(None)` for a blank region (erased flash or zeroed RAM).
    fn decode<E: core::fmt::Debug>(
        b: &[u8; HEADER_LEN],
    ) -> core::result::Result<Option<Header>, RingError<E>> {
        if b.iter().all(|&x| x == 0xFF) || b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        if b[0..4] != MAGIC {
            return Err(RingError::Corrupt("no ring header (bad magic)"));
        }
        if b[4] != FORMAT {
            return Err(RingError::Corrupt("unsupported ring format version"));
        }
        let le32 = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        if crc32(&b[..28]) != le32(28) {
            return Err(RingError::Corrupt("ring header checksum mismatch"));
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&b[8..16]);
        Ok(Some(Header {
            front_seq: u64::from_le_bytes(seq),
            count: le32(16),
            head: le32(20),
            used: le32(24),
        }))
    }
}

/// Counters of the ring since it was mounted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Readings in batches removed because the hub acknowledged them.
    pub acked_readings: u64,
    /// Readings in batches evicted (oldest first) to make room.
    pub evicted_readings: u64,
}

/// The outbox of unacknowledged batches, stored in a [`Flash`] region. See the module
/// documentation for the layout.
///
/// RAM use is the struct itself (about 40 bytes plus `F`); encoding and decoding a batch
/// uses a [`MAX_RECORD_LEN`]-byte buffer on the stack.
#[derive(Debug)]
pub struct RingOutbox<F: Flash> {
    flash: F,
    data_len: u32,
    hdr: Header,
    stats: RingStats,
}

impl<F: Flash> RingOutbox<F> {
    /// Erases the ring: it becomes empty, and the next batch gets `first_seq` (at least 1).
    ///
    /// # Errors
    /// The region is too small or large, or the flash failed.
    pub fn format(flash: F, first_seq: u64) -> Result<RingOutbox<F>, F> {
        let data_len = Self::data_len_of(&flash)?;
        let mut ring = RingOutbox {
            flash,
            data_len,
            hdr: Header {
                front_seq: first_seq.max(1),
                count: 0,
                head: 0,
                used: 0,
            },
            stats: RingStats::default(),
        };
        ring.commit()?;
        Ok(ring)
    }

    /// Opens the ring stored in `flash`. A blank region (all `0x00` or all `0xFF`) is
    /// formatted with sequence 1; the second value says whether that happened.
    ///
    /// # Errors
    /// [`RingError::Corrupt`] when the region holds an invalid ring (it is left untouched),
    /// [`RingError::BadCapacity`] or a flash failure.
    pub fn mount(mut flash: F) -> Result<(RingOutbox<F>, bool), F> {
        let data_len = Self::data_len_of(&flash)?;
        let mut raw = [0u8; HEADER_LEN];
        flash.read(0, &mut raw).map_err(RingError::Flash)?;
        let Some(hdr) = Header::decode(&raw)? else {
            return Ok((RingOutbox::format(flash, 1)?, true));
        };
        if hdr.front_seq == 0 || hdr.head >= data_len || hdr.used > data_len {
            return Err(RingError::Corrupt("ring header fields out of range"));
        }
        let mut ring = RingOutbox {
            flash,
            data_len,
            hdr,
            stats: RingStats::default(),
        };
        ring.check_records()?;
        Ok((ring, false))
    }

    fn data_len_of(flash: &F) -> Result<u32, F> {
        let cap = flash.capacity();
        if cap < MIN_CAPACITY || cap - HEADER_LEN > u32::MAX as usize {
            return Err(RingError::BadCapacity(cap));
        }
        Ok((cap - HEADER_LEN) as u32)
    }

    /// Walks every record once, so that a damaged ring is found at boot and not while
    /// sending.
    fn check_records(&mut self) -> Result<(), F> {
        let mut at = self.hdr.head;
        let mut consumed: u64 = 0;
        for _ in 0..self.hdr.count {
            let (rec, skipped) = self.locate(at)?;
            let (len, _) = self.record_header(rec)?;
            consumed += u64::from(skipped) + (RECORD_HEADER_LEN + len) as u64;
            at = (rec + (RECORD_HEADER_LEN + len) as u32) % self.data_len;
        }
        if consumed != u64::from(self.hdr.used) {
            return Err(RingError::Corrupt("records do not match the used space"));
        }
        Ok(())
    }

    /// The flash region.
    pub fn flash(&self) -> &F {
        &self.flash
    }

    /// The flash region, mutably (for a board that shares it with other data).
    pub fn flash_mut(&mut self) -> &mut F {
        &mut self.flash
    }

    /// Gives the flash region back.
    pub fn into_flash(self) -> F {
        self.flash
    }

    /// Bytes in the data area.
    pub fn data_capacity(&self) -> usize {
        self.data_len as usize
    }

    /// Bytes of the data area in use.
    pub fn used_bytes(&self) -> usize {
        self.hdr.used as usize
    }

    /// Counters since mounting.
    pub fn stats(&self) -> RingStats {
        self.stats
    }

    /// Readings stored in the batch at `index` (0 is the oldest), without decoding it.
    ///
    /// # Errors
    /// `index` is out of range, the ring is corrupt, or the flash failed.
    pub fn readings_in(&mut self, index: usize) -> Result<usize, F> {
        let rec = self.record_at(index)?;
        Ok(self.record_header(rec)?.1)
    }

    fn data_offset(at: u32) -> u32 {
        at + HEADER_LEN as u32
    }

    fn read_data(&mut self, at: u32, buf: &mut [u8]) -> Result<(), F> {
        self.flash
            .read(Self::data_offset(at), buf)
            .map_err(RingError::Flash)
    }

    fn write_data(&mut self, at: u32, data: &[u8]) -> Result<(), F> {
        self.flash
            .write(Self::data_offset(at), data)
            .map_err(RingError::Flash)
    }

    /// The offset of the record that starts at or after `at`, skipping the unused end of
    /// the data area, and how many bytes were skipped.
    fn locate(&mut self, at: u32) -> Result<(u32, u32), F> {
        let tail_room = self.data_len - at;
        if (tail_room as usize) < RECORD_HEADER_LEN {
            return Ok((0, tail_room));
        }
        let mut len = [0u8; 2];
        self.read_data(at, &mut len)?;
        if u16::from_le_bytes(len) == WRAP_MARK {
            return Ok((0, tail_room));
        }
        Ok((at, 0))
    }

    /// Length of the record's payload and how many readings it holds.
    fn record_header(&mut self, rec: u32) -> Result<(usize, usize), F> {
        let mut h = [0u8; RECORD_HEADER_LEN];
        self.read_data(rec, &mut h)?;
        let len = usize::from(u16::from_le_bytes([h[0], h[1]]));
        if len == 0
            || len > MAX_RECORD_LEN
            || rec as usize + RECORD_HEADER_LEN + len > self.data_len as usize
        {
            return Err(RingError::Corrupt("record length out of range"));
        }
        if h[2] == 0 || usize::from(h[2]) > MAX_READINGS {
            return Err(RingError::Corrupt("record reading count out of range"));
        }
        Ok((len, usize::from(h[2])))
    }

    fn record_at(&mut self, index: usize) -> Result<u32, F> {
        if index >= self.hdr.count as usize {
            return Err(RingError::Invalid("batch index beyond the stored batches"));
        }
        let mut at = self.hdr.head;
        for _ in 0..index {
            let (rec, _) = self.locate(at)?;
            let (len, _) = self.record_header(rec)?;
            at = (rec + (RECORD_HEADER_LEN + len) as u32) % self.data_len;
        }
        Ok(self.locate(at)?.0)
    }

    /// Removes the oldest record; returns how many readings it held.
    fn remove_front(&mut self) -> Result<usize, F> {
        let (rec, skipped) = self.locate(self.hdr.head)?;
        let (len, readings) = self.record_header(rec)?;
        let size = (RECORD_HEADER_LEN + len) as u32;
        self.hdr.used = self
            .hdr
            .used
            .checked_sub(skipped + size)
            .ok_or(RingError::Corrupt("used space underflow"))?;
        self.hdr.head = (rec + size) % self.data_len;
        self.hdr.count -= 1;
        self.hdr.front_seq += 1;
        if self.hdr.count == 0 {
            // Start over at the beginning: no padding to carry around.
            self.hdr.head = 0;
            self.hdr.used = 0;
        }
        Ok(readings)
    }

    fn commit(&mut self) -> Result<(), F> {
        let raw = self.hdr.encode();
        self.flash.write(0, &raw).map_err(RingError::Flash)?;
        self.flash.sync().map_err(RingError::Flash)
    }
}

impl<F: Flash> Outbox for RingOutbox<F> {
    type Error = RingError<F::Error>;

    fn front_seq(&self) -> u64 {
        self.hdr.front_seq
    }

    fn len(&self) -> usize {
        self.hdr.count as usize
    }

    fn push_back(&mut self, readings: &[Reading]) -> Result<Pushed, F> {
        if readings.is_empty() || readings.len() > MAX_READINGS {
            return Err(RingError::Invalid("a batch holds 1 to 64 readings"));
        }
        let mut buf = [0u8; RECORD_HEADER_LEN + MAX_RECORD_LEN];
        let payload_len = postcard::to_slice(readings, &mut buf[RECORD_HEADER_LEN..])
            .map_err(|_| RingError::Invalid("batch does not encode"))?
            .len();
        let need = (RECORD_HEADER_LEN + payload_len) as u32;
        if need > self.data_len {
            return Err(RingError::TooLarge {
                needed: need as usize,
                available: self.data_len as usize,
            });
        }
        buf[0..2].copy_from_slice(&(payload_len as u16).to_le_bytes());
        buf[2] = readings.len() as u8;

        let mut pushed = Pushed::default();
        let (at, padding) = loop {
            let tail = (self.hdr.head + self.hdr.used) % self.data_len;
            let wrapped = self.hdr.used > 0 && tail <= self.hdr.head;
            let (at, padding) = if wrapped || tail + need <= self.data_len {
                (tail, 0)
            } else {
                (0, self.data_len - tail)
            };
            if self.hdr.used + padding + need <= self.data_len {
                break (at, padding);
            }
            // Full: the oldest unacknowledged batch makes room (it is lost; the session
            // counts it). `need <= data_len` guarantees an empty ring has room.
            let readings = self.remove_front()?;
            pushed.evicted_batches += 1;
            pushed.evicted_readings += readings as u32;
            self.stats.evicted_readings += readings as u64;
        };
        if padding as usize >= RECORD_HEADER_LEN {
            let tail = self.data_len - padding;
            self.write_data(tail, &[0xFF, 0xFF, 0])?;
        }
        self.write_data(at, &buf[..need as usize])?;
        self.hdr.used += padding + need;
        self.hdr.count += 1;
        self.commit()?;
        Ok(pushed)
    }

    fn read(&mut self, index: usize, out: &mut Vec<Reading, MAX_READINGS>) -> Result<(), F> {
        let rec = self.record_at(index)?;
        let (len, _) = self.record_header(rec)?;
        let mut buf = [0u8; MAX_RECORD_LEN];
        self.read_data(rec + RECORD_HEADER_LEN as u32, &mut buf[..len])?;
        *out = postcard::from_bytes(&buf[..len])
            .map_err(|_| RingError::Corrupt("stored batch does not decode"))?;
        Ok(())
    }

    fn pop_front(&mut self, count: usize) -> Result<(), F> {
        for _ in 0..count.min(self.hdr.count as usize) {
            let readings = self.remove_front()?;
            self.stats.acked_readings += readings as u64;
        }
        self.commit()
    }

    fn renumber(&mut self, front_seq: u64) -> Result<(), F> {
        self.hdr.front_seq = front_seq.max(1);
        self.commit()
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::vec;

    use super::*;
    use crate::flash::RamFlash;
    use schemas::message::truncated;

    fn batch(n: usize, v: f64) -> Vec<Reading, MAX_READINGS> {
        let mut out = Vec::new();
        for i in 0..n {
            let _ = out.push(Reading {
                metric: truncated(if i % 2 == 0 {
                    "temperature"
                } else {
                    "battery.volts"
                }),
                ts: 1_764_000_000_000 + i as u64,
                value: v + i as f64,
            });
        }
        out
    }

    fn ring(bytes: usize) -> RingOutbox<RamFlash<std::vec::Vec<u8>>> {
        RingOutbox::format(RamFlash::new(vec![0u8; bytes]), 1).expect("format")
    }

    fn read(r: &mut RingOutbox<RamFlash<std::vec::Vec<u8>>>, i: usize) -> f64 {
        let mut out = Vec::new();
        r.read(i, &mut out).expect("read");
        out[0].value
    }

    #[test]
    fn push_read_pop_and_persist() {
        let mut r = ring(1024);
        for i in 0..5 {
            r.push_back(&batch(3, i as f64)).expect("push");
        }
        assert_eq!((r.front_seq(), r.len()), (1, 5));
        assert_eq!(read(&mut r, 4), 4.0);
        r.pop_front(2).expect("pop");
        assert_eq!((r.front_seq(), r.len()), (3, 3));
        assert_eq!(r.stats().acked_readings, 6);
        // Remount from the same bytes: same state.
        let bytes = r.into_flash().into_inner();
        let (mut r, formatted) = RingOutbox::mount(RamFlash::new(bytes)).expect("mount");
        assert!(!formatted);
        assert_eq!((r.front_seq(), r.len()), (3, 3));
        assert_eq!(read(&mut r, 0), 2.0);
        r.pop_front(3).expect("pop");
        assert_eq!((r.front_seq(), r.len(), r.used_bytes()), (6, 0, 0));
    }

    #[test]
    fn wraps_and_evicts_oldest_when_full() {
        // Each 3-reading batch is 3 + 1 + 3 * ~28 bytes; a small ring forces wrapping.
        let mut r = ring(HEADER_LEN + 300);
        let mut evicted = 0;
        for i in 0..40u64 {
            // Consume some so that head moves and the ring wraps in varied places.
            if i % 3 == 0 && r.len() > 0 {
                r.pop_front(1).expect("pop");
            }
            let p = r.push_back(&batch(3, i as f64)).expect("push");
            evicted += p.evicted_batches;
            let len = r.len();
            let newest = read(&mut r, len - 1);
            assert_eq!(newest, i as f64);
            // Sequence numbers stay consecutive through evictions.
            assert_eq!(r.front_seq() + len as u64 - 1, i + 1);
        }
        assert!(evicted > 0);
        assert!(r.stats().evicted_readings > 0);
        let bytes = r.into_flash().into_inner();
        let (mut r, _) = RingOutbox::mount(RamFlash::new(bytes)).expect("mount");
        for i in 0..r.len() {
            read(&mut r, i);
        }
    }

    #[test]
    fn blank_is_formatted_and_garbage_is_refused() {
        let (r, formatted) = RingOutbox::mount(RamFlash::new(vec![0xFFu8; 256])).expect("blank");
        assert!(formatted);
        assert_eq!(r.front_seq(), 1);
        let mut bytes = r.into_flash().into_inner();
        bytes[10] ^= 1;
        assert!(matches!(
            RingOutbox::mount(RamFlash::new(bytes)),
            Err(RingError::Corrupt(_))
        ));
        let mut junk = vec![0u8; 256];
        junk[0] = b'X';
        assert!(matches!(
            RingOutbox::mount(RamFlash::new(junk)),
            Err(RingError::Corrupt(_))
        ));
        assert!(matches!(
            RingOutbox::format(RamFlash::new(vec![0u8; 40]), 1),
            Err(RingError::BadCapacity(40))
        ));
    }

    #[test]
    fn too_large_and_renumber() {
        let mut r = ring(MIN_CAPACITY);
        assert!(matches!(
            r.push_back(&batch(10, 0.0)),
            Err(RingError::TooLarge { .. })
        ));
        r.push_back(&batch(1, 0.0)).expect("push");
        r.renumber(41).expect("renumber");
        assert_eq!(r.front_seq(), 41);
        assert!(r.push_back(&[]).is_err());
    }
}

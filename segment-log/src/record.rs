//! The record frame (a 16-byte header: payload length, CRC-32, record number; then the
//! payload) and the scan of a segment file that recovery runs.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use crate::error::{io_err, LogError};

/// Bytes of a record header: payload length, CRC-32, record number. A record takes this
/// many bytes more than its payload.
pub const RECORD_HEADER_BYTES: usize = 16;

/// A record framed for appending.
///
/// # Errors
/// [`LogError::TooLarge`] for a payload of 4 GiB or more.
pub(crate) fn frame(number: u64, payload: &[u8]) -> Result<Vec<u8>, LogError> {
    let len =
        u32::try_from(payload.len()).map_err(|_| LogError::TooLarge { len: payload.len() })?;
    let mut buf = Vec::with_capacity(RECORD_HEADER_BYTES + payload.len());
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&checksum(number, payload).to_le_bytes());
    buf.extend_from_slice(&number.to_le_bytes());
    buf.extend_from_slice(payload);
    Ok(buf)
}

/// CRC-32 of the record number and the payload. It catches torn and corrupted records; it
/// is no defence against tampering (whoever can write the directory owns the data anyway).
fn checksum(number: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&number.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// A parsed record header.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Header {
    /// Payload length.
    pub(crate) len: u32,
    crc: u32,
    number: u64,
}

impl Header {
    pub(crate) fn parse(bytes: &[u8; RECORD_HEADER_BYTES]) -> Header {
        let word = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let mut number = [0u8; 8];
        number.copy_from_slice(&bytes[8..16]);
        Header {
            len: word(0),
            crc: word(4),
            number: u64::from_le_bytes(number),
        }
    }

    /// Checks that this header, with `payload`, is record `number`.
    pub(crate) fn check(&self, number: u64, payload: &[u8]) -> Result<(), &'static str> {
        if self.number != number {
            return Err("wrong record number");
        }
        if self.len as usize != payload.len() {
            return Err("wrong length");
        }
        if checksum(number, payload) != self.crc {
            return Err("CRC mismatch");
        }
        Ok(())
    }
}

/// What scanning a segment file found.
#[derive(Debug)]
pub(crate) struct Scan {
    /// Offsets of the valid records, in order; the first is numbered as the file says.
    pub(crate) offsets: Vec<u64>,
    /// Bytes of the valid prefix.
    pub(crate) valid_len: u64,
    /// Bytes of the file.
    pub(crate) file_len: u64,
    /// The scan stopped at a record that failed its checks (rather than at the end of the
    /// file or at `limit`).
    pub(crate) hit_bad_record: bool,
}

/// Reads the segment at `path` whose first record is `base`, record by record, until the
/// end of the file, the first record that fails its checks, or record number `limit` (the
/// next segment's first record: a later segment wins over an older one that runs into
/// it). Calls `visit` with each valid record numbered `visit_from` or later.
///
/// # Errors
/// The file cannot be opened or read.
pub(crate) fn scan(
    path: &Path,
    base: u64,
    limit: u64,
    visit_from: u64,
    visit: &mut dyn FnMut(u64, &[u8]),
) -> Result<Scan, LogError> {
    let file = File::open(path).map_err(io_err("open", path))?;
    let file_len = file.metadata().map_err(io_err("stat", path))?.len();
    let mut reader = BufReader::with_capacity(256 * 1024, file);
    let mut offsets = Vec::new();
    let mut offset = 0u64;
    let mut number = base;
    let mut payload = Vec::new();
    let mut hit_bad_record = false;
    while offset < file_len && number < limit {
        let room = file_len - offset;
        let mut header = [0u8; RECORD_HEADER_BYTES];
        if room < RECORD_HEADER_BYTES as u64 {
            hit_bad_record = true;
            break;
        }
        reader
            .read_exact(&mut header)
            .map_err(io_err("read", path))?;
        let parsed = Header::parse(&header);
        if u64::from(parsed.len) > room - RECORD_HEADER_BYTES as u64 {
            hit_bad_record = true;
            break;
        }
        payload.resize(parsed.len as usize, 0);
        reader
            .read_exact(&mut payload)
            .map_err(io_err("read", path))?;
        if parsed.check(number, &payload).is_err() {
            hit_bad_record = true;
            break;
        }
        if number >= visit_from {
            visit(number, &payload);
        }
        offsets.push(offset);
        offset += RECORD_HEADER_BYTES as u64 + u64::from(parsed.len);
        number += 1;
    }
    Ok(Scan {
        offsets,
        valid_len: offset,
        file_len,
        hit_bad_record,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checksum_is_crc32_ieee_over_number_and_payload() {
        // The standard check value of CRC-32/ISO-HDLC, for "123456789" split across the
        // number (its 8 bytes) and the payload.
        let number = u64::from_le_bytes(*b"12345678");
        assert_eq!(checksum(number, b"9"), 0xCBF4_3926);
    }

    #[test]
    fn a_frame_is_header_then_payload() {
        let f = frame(7, b"abc").expect("frame");
        assert_eq!(f.len(), RECORD_HEADER_BYTES + 3);
        assert_eq!(&f[0..4], &3u32.to_le_bytes());
        assert_eq!(&f[8..16], &7u64.to_le_bytes());
        assert_eq!(&f[16..], b"abc");
        let mut header = [0u8; RECORD_HEADER_BYTES];
        header.copy_from_slice(&f[..RECORD_HEADER_BYTES]);
        let h = Header::parse(&header);
        assert_eq!(h.check(7, b"abc"), Ok(()));
        assert_eq!(h.check(8, b"abc"), Err("wrong record number"));
        assert_eq!(h.check(7, b"abd"), Err("CRC mismatch"));
        assert_eq!(h.check(7, b"ab"), Err("wrong length"));
    }
}

//! CRC-32 (IEEE 802.3, the zlib/PNG one: CRC-32/ISO-HDLC) for the flash ring's header and
//! the host image, from the `crc` crate.
//!
//! Bitwise on purpose (`NoTable`): it runs over a 32-byte header per ring update and over
//! an image a few kilobytes long per write, so a 1 KiB lookup table would cost more flash
//! than the cycles it saves.

use crc::{Crc, NoTable, CRC_32_ISO_HDLC};

/// The algorithm, without a lookup table.
const CRC32: Crc<u32, NoTable> = Crc::<u32, NoTable>::new(&CRC_32_ISO_HDLC);

/// The CRC-32 of `bytes`.
pub fn crc32(bytes: &[u8]) -> u32 {
    CRC32.checksum(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_value() {
        // The standard check value of CRC-32/ISO-HDLC.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        // A ring header's first 28 bytes and its checksum as the hand-written bitwise CRC
        // the firmware used before computed it: flash written then still reads back.
        let header: [u8; 28] = *b"FWR1\x01\0\0\0\x2a\0\0\0\0\0\0\0\x03\0\0\0\x40\0\0\0\x80\0\0\0";
        assert_eq!(crc32(&header), 0x8F57_C59D);
    }
}

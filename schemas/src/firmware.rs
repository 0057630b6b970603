//! Firmware updates: what an update's Ed25519 signature covers, the rule for version
//! names, and the hex form of hashes and signatures. The hub signs with these bytes and
//! every device verifies them, so the definition lives here, once.
//!
//! The signature does not cover the image itself but a short statement about it: a fixed
//! context, the version, the size and the image's SHA-256. A device hashes the image as it
//! writes it to flash (it never holds the whole image in memory), then checks the signature
//! over this statement; a match proves the hub's key signed exactly this image as exactly
//! this version.

use core::fmt;

use heapless::Vec;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::limits::MAX_FIRMWARE_LEN;

/// The first bytes of every signed statement, so that a firmware signature can never be
/// mistaken for a signature over anything else made with the same key.
pub const SIGNING_CONTEXT: &[u8; 16] = b"hub-firmware-v1\0";

/// Length of a SHA-256 digest.
pub const SHA256_LEN: usize = 32;
/// Length of an Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// Length of an Ed25519 public key.
pub const PUBLIC_KEY_LEN: usize = 32;
/// Longest signed statement: context, version length, version, size, hash.
pub const MAX_STATEMENT_LEN: usize = SIGNING_CONTEXT.len() + 1 + MAX_FIRMWARE_LEN + 8 + SHA256_LEN;

/// The bytes an update's signature covers: [`SIGNING_CONTEXT`], the version's length as
/// one byte, the version (UTF-8), the image size as 8 bytes little-endian, and the image's
/// SHA-256. `None` for a version longer than [`MAX_FIRMWARE_LEN`] bytes.
pub fn signed_statement(
    version: &str,
    size: u64,
    sha256: &[u8; SHA256_LEN],
) -> Option<Vec<u8, MAX_STATEMENT_LEN>> {
    if version.len() > MAX_FIRMWARE_LEN {
        return None;
    }
    let mut out = Vec::new();
    // Cannot fail: the capacity is the sum of the parts' largest sizes.
    out.extend_from_slice(SIGNING_CONTEXT).ok()?;
    out.push(version.len() as u8).ok()?;
    out.extend_from_slice(version.as_bytes()).ok()?;
    out.extend_from_slice(&size.to_le_bytes()).ok()?;
    out.extend_from_slice(sha256).ok()?;
    Some(out)
}

/// Whether `version` can name a firmware version: 1 to 32 bytes of `[A-Za-z0-9._+-]`, not
/// starting with `.` (the hub uses it as a directory name).
pub fn is_valid_version(version: &str) -> bool {
    !version.is_empty()
        && version.len() <= MAX_FIRMWARE_LEN
        && !version.starts_with('.')
        && version
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'+' | b'-'))
}

/// Writes `bytes` as lowercase hex into `out`; `None` when `out` is too small.
pub fn encode_hex<'a>(bytes: &[u8], out: &'a mut [u8]) -> Option<&'a str> {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let out = out.get_mut(..bytes.len() * 2)?;
    for (pair, b) in out.chunks_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0xf)];
    }
    core::str::from_utf8(out).ok()
}

/// Reads exactly `N` bytes from hex (either case); `None` for another length or a bad digit.
pub fn decode_hex_array<const N: usize>(hex: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    if hex.len() != 2 * N {
        return None;
    }
    crate::golden::decode_hex(hex, &mut out)?;
    Some(out)
}

/// Up to `N` bytes that travel raw in postcard and as base64 (standard alphabet, padded)
/// in JSON, where an array of numbers would take four times the room.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Blob<const N: usize>(pub Vec<u8, N>);

impl<const N: usize> Blob<N> {
    /// The first `N` bytes of `bytes` (all of them when they fit).
    pub fn from_slice(bytes: &[u8]) -> Blob<N> {
        let mut v = Vec::new();
        // Cannot fail: cut to the capacity.
        let _ = v.extend_from_slice(&bytes[..bytes.len().min(N)]);
        Blob(v)
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Writes bytes as base64 without an allocator.
struct Base64<'a>(&'a [u8]);

impl fmt::Display for Base64<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for group in self.0.chunks(3) {
            let b = [
                group[0],
                group.get(1).copied().unwrap_or(0),
                group.get(2).copied().unwrap_or(0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            let mut out = [b'='; 4];
            for (i, slot) in out.iter_mut().enumerate().take(group.len() + 1) {
                *slot = BASE64[((n >> (18 - 6 * i)) & 63) as usize];
            }
            // Cannot fail: every byte is ASCII.
            f.write_str(core::str::from_utf8(&out).map_err(|_| fmt::Error)?)?;
        }
        Ok(())
    }
}

/// Decodes padded standard base64 into at most `N` bytes.
fn decode_base64<const N: usize>(text: &str) -> Option<Vec<u8, N>> {
    let bytes = text.as_bytes();
    if bytes.len() % 4 != 0 {
        return None;
    }
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let mut out = Vec::new();
    let groups = bytes.len() / 4;
    for (g, quad) in bytes.chunks(4).enumerate() {
        let pad = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && g + 1 != groups) {
            return None;
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            n = (n << 6) | value(c)?;
        }
        n <<= 6 * pad as u32;
        let decoded = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&decoded[..3 - pad]).ok()?;
    }
    Some(out)
}

impl<const N: usize> Serialize for Blob<N> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(&Base64(&self.0))
        } else {
            serializer.serialize_bytes(&self.0)
        }
    }
}

impl<'de, const N: usize> Deserialize<'de> for Blob<N> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Blob<N>, D::Error> {
        struct BlobVisitor<const N: usize>;
        impl<const N: usize> Visitor<'_> for BlobVisitor<N> {
            type Value = Blob<N>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "at most {N} bytes (base64 in JSON)")
            }

            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Blob<N>, E> {
                Vec::from_slice(v)
                    .map(Blob)
                    .map_err(|_| E::invalid_length(v.len(), &self))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Blob<N>, E> {
                decode_base64(v).map(Blob).ok_or_else(|| {
                    E::invalid_value(
                        de::Unexpected::Str("(not base64 of at most the limit)"),
                        &self,
                    )
                })
            }
        }
        if deserializer.is_human_readable() {
            deserializer.deserialize_str(BlobVisitor::<N>)
        } else {
            deserializer.deserialize_bytes(BlobVisitor::<N>)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_statement_binds_version_size_and_hash() {
        let hash = [7u8; 32];
        let s = signed_statement("1.1", 1024, &hash).expect("fits");
        assert_eq!(&s[..16], SIGNING_CONTEXT);
        assert_eq!(s[16], 3);
        assert_eq!(&s[17..20], b"1.1");
        assert_eq!(&s[20..28], &1024u64.to_le_bytes());
        assert_eq!(&s[28..], &hash);
        // Another version or size gives other bytes, so the signature does not carry over.
        assert_ne!(signed_statement("1.10", 1024, &hash), Some(s.clone()));
        assert_ne!(signed_statement("1.1", 1025, &hash), Some(s));
        let longest = "v".repeat(MAX_FIRMWARE_LEN);
        assert_eq!(
            signed_statement(&longest, 0, &hash).map(|s| s.len()),
            Some(MAX_STATEMENT_LEN)
        );
        assert!(signed_statement(&"v".repeat(MAX_FIRMWARE_LEN + 1), 0, &hash).is_none());
    }

    #[test]
    fn versions() {
        assert!(is_valid_version("1.1.0-rc1+build.7"));
        assert!(!is_valid_version(""));
        assert!(!is_valid_version(".."));
        assert!(!is_valid_version("1/2"));
        assert!(!is_valid_version("a b"));
        assert!(!is_valid_version(&"1".repeat(33)));
    }

    #[test]
    fn blobs_are_base64_in_json_and_raw_in_postcard() {
        extern crate alloc;
        for len in 0..8usize {
            let data: alloc::vec::Vec<u8> = (0..len as u8).map(|b| b.wrapping_mul(77)).collect();
            let blob = Blob::<8>::from_slice(&data);
            let json = serde_json::to_string(&blob).expect("json");
            let back: Blob<8> = serde_json::from_str(&json).expect("from json");
            assert_eq!(back, blob, "{json}");
            let bytes = postcard::to_allocvec(&blob).expect("postcard");
            assert_eq!(bytes.len(), 1 + len);
            assert_eq!(
                postcard::from_bytes::<Blob<8>>(&bytes).expect("from postcard"),
                blob
            );
        }
        assert_eq!(
            serde_json::to_string(&Blob::<8>::from_slice(b"hub")).expect("json"),
            "\"aHVi\""
        );
        assert_eq!(
            serde_json::to_string(&Blob::<8>::from_slice(b"hu")).expect("json"),
            "\"aHU=\""
        );
        for bad in [
            "\"aHU\"",
            "\"a=U=\"",
            "\"aHU=aHU=\"",
            "\"****\"",
            "\"AAAAAAAAAAAA\"",
        ] {
            assert!(serde_json::from_str::<Blob<8>>(bad).is_err(), "{bad}");
        }
        let too_long = postcard::to_allocvec(&[0u8; 9].as_slice()).expect("postcard");
        assert!(postcard::from_bytes::<Blob<8>>(&too_long).is_err());
    }

    #[test]
    fn hex_round_trip() {
        let mut buf = [0u8; 8];
        assert_eq!(encode_hex(&[0x00, 0xab, 0x7f], &mut buf), Some("00ab7f"));
        assert_eq!(decode_hex_array::<3>("00AB7f"), Some([0x00, 0xab, 0x7f]));
        assert_eq!(decode_hex_array::<3>("00ab"), None);
        assert_eq!(decode_hex_array::<2>("zzzz"), None);
        assert!(encode_hex(&[1; 5], &mut buf).is_none());
    }
}

//! Golden vectors: every v1 message in both encodings, as shipped in
//! `schemas/vectors/v1.json`. The hub, agent and firmware tests all decode them, so the
//! encoders can never drift apart; `PROTOCOL.md` shows the same examples.
//!
//! The file is a JSON array of objects `{"name", "direction", "message", "postcard_hex"}`,
//! where `direction` is `device_to_hub` or `hub_to_device`, `message` is the JSON encoding
//! and `postcard_hex` the postcard encoding as lowercase hex.

/// The v1 golden vectors (JSON text, see the module documentation).
pub const V1: &str = include_str!("../vectors/v1.json");

/// Decodes lowercase or uppercase hex into `out`, returning the used part, or `None` on a
/// bad digit, odd length, or too small `out`.
pub fn decode_hex<'a>(hex: &str, out: &'a mut [u8]) -> Option<&'a [u8]> {
    let bytes = hex.as_bytes();
    if bytes.len() % 2 != 0 || bytes.len() / 2 > out.len() {
        return None;
    }
    for (i, pair) in bytes.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(&out[..bytes.len() / 2])
}

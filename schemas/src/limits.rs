//! Protocol limits. They are the capacities of the message types, so a message that
//! decodes is within them by construction; the hub also enforces them on raw frame sizes.

/// Largest WebSocket message (and frame) either side accepts, in bytes. Bigger ones are
/// refused with close code 1009.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;
/// Most readings in one telemetry batch.
pub const MAX_READINGS: usize = 64;
/// Longest metric name, in bytes. Names use `[A-Za-z0-9_.:/-]` and are not empty.
pub const MAX_METRIC_LEN: usize = 64;
/// Longest device id, in bytes. Ids use `[A-Za-z0-9_.-]` and are not empty.
pub const MAX_DEVICE_ID_LEN: usize = 64;
/// Longest firmware version string, in bytes.
pub const MAX_FIRMWARE_LEN: usize = 32;
/// Most capabilities a device may announce in `Hello`.
pub const MAX_CAPABILITIES: usize = 8;
/// Longest capability name, in bytes.
pub const MAX_CAPABILITY_LEN: usize = 16;
/// Longest command name, in bytes. Same alphabet as metric names.
pub const MAX_COMMAND_NAME_LEN: usize = 32;
/// Longest command argument document (JSON text), in bytes.
pub const MAX_ARGS_LEN: usize = 512;
/// Longest command result output, in bytes. Devices truncate longer output.
pub const MAX_OUTPUT_LEN: usize = 1024;
/// Most reported properties in one `State` message.
pub const MAX_PROPERTIES: usize = 16;
/// Longest property key, in bytes.
pub const MAX_PROPERTY_KEY_LEN: usize = 32;
/// Longest property value, in bytes.
pub const MAX_PROPERTY_VALUE_LEN: usize = 64;
/// Latest reading timestamp accepted, in ms since the Unix epoch: 2262-04-11T23:47:16.854Z,
/// the end of InfluxDB's (nanosecond, signed 64-bit) time range.
pub const MAX_TIMESTAMP_MS: u64 = 9_223_372_036_854;
/// Largest sequence number accepted (2^63 - 1, so that every store can keep it signed).
pub const MAX_SEQ: u64 = i64::MAX as u64;
/// Most image bytes in one `FirmwareChunk` (and one `FirmwareRequest`). A chunk's JSON
/// (base64) encoding stays well under [`MAX_MESSAGE_BYTES`] and a device's receive buffer
/// stays small.
pub const MAX_CHUNK_BYTES: usize = 4096;
/// Most `FirmwareRequest`s a device may have outstanding (unanswered) on a connection.
pub const MAX_FIRMWARE_REQUESTS: usize = 16;
/// Longest text in an `Error` message, in bytes.
pub const MAX_ERROR_TEXT_LEN: usize = 128;

/// Whether `name` is a valid metric or command name of at most `max` bytes.
pub fn is_valid_name(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'/' | b'-'))
}

/// Whether `id` is a valid device id.
pub fn is_valid_device_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_DEVICE_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_valid_name("cpu.load_1m", MAX_METRIC_LEN));
        assert!(is_valid_name("thermal/zone0:temp", MAX_METRIC_LEN));
        assert!(!is_valid_name("", MAX_METRIC_LEN));
        assert!(!is_valid_name("has space", MAX_METRIC_LEN));
        assert!(!is_valid_name(&"a".repeat(65), MAX_METRIC_LEN));
        assert!(is_valid_device_id("d-1.a_b"));
        assert!(!is_valid_device_id("d/1"));
        assert!(!is_valid_device_id(""));
    }
}

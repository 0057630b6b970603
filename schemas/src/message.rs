//! The v1 messages. `DeviceMessage` flows from device to hub, `HubMessage` from hub to
//! device. Both encodings carry these exact types: postcard (variant index, then fields in
//! order) and JSON (externally tagged, `{"telemetry": {...}}`).

use heapless::{String, Vec};
use serde::{Deserialize, Serialize};

use crate::limits::{
    is_valid_name, MAX_ARGS_LEN, MAX_CAPABILITIES, MAX_CAPABILITY_LEN, MAX_CHUNK_BYTES,
    MAX_COMMAND_NAME_LEN, MAX_ERROR_TEXT_LEN, MAX_FIRMWARE_LEN, MAX_METRIC_LEN, MAX_OUTPUT_LEN,
    MAX_PROPERTIES, MAX_PROPERTY_KEY_LEN, MAX_PROPERTY_VALUE_LEN, MAX_READINGS, MAX_SEQ,
    MAX_TIMESTAMP_MS,
};

/// One measured value.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Reading {
    /// Metric name, `[A-Za-z0-9_.:/-]{1,64}`.
    pub metric: String<MAX_METRIC_LEN>,
    /// When it was measured, in milliseconds since the Unix epoch (device clock; devices
    /// without a clock derive it from `Welcome::server_time`).
    pub ts: u64,
    /// The value. Must be finite.
    pub value: f64,
}

/// First message on every connection, device to hub.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Hello {
    /// Firmware or agent version, free text.
    pub firmware: String<MAX_FIRMWARE_LEN>,
    /// What the device can do, for example `commands` or `state`.
    pub capabilities: Vec<String<MAX_CAPABILITY_LEN>, MAX_CAPABILITIES>,
    /// The highest telemetry sequence the device has seen acknowledged (0 for none).
    pub last_acked_seq: u64,
}

/// A batch of readings with its per-device sequence number.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Telemetry {
    /// Per-device sequence number, starting at 1, strictly increasing by 1 per batch.
    pub seq: u64,
    /// 1 to 64 readings.
    pub readings: Vec<Reading, MAX_READINGS>,
}

/// The device has received command `id` and will run it.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandAck {
    /// The command id from [`Command::id`].
    pub id: u64,
}

/// The outcome of command `id`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct CommandResult {
    /// The command id from [`Command::id`].
    pub id: u64,
    /// Whether the command succeeded.
    pub ok: bool,
    /// A status code: 0 for success, otherwise device-defined (an exit status, say).
    pub code: i32,
    /// Output or error text, at most 1024 bytes.
    pub output: String<MAX_OUTPUT_LEN>,
}

/// One reported property.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Property {
    /// Property name, same alphabet as metric names, at most 32 bytes.
    pub key: String<MAX_PROPERTY_KEY_LEN>,
    /// Property value, free text, at most 64 bytes.
    pub value: String<MAX_PROPERTY_VALUE_LEN>,
}

/// Reported properties (the device's view of its own configuration or state).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// Up to 16 properties; each replaces the stored value of the same key.
    pub properties: Vec<Property, MAX_PROPERTIES>,
}

/// The device applied (part of) desired state version `version`: the values it now has,
/// and the keys it refused, each with a reason. Sent only after a [`Desired`] from this hub
/// (so only to a hub that understands it); several may follow one version.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The desired-state version this answers.
    pub version: u64,
    /// Applied values: key and the value's JSON text (≤ 64 bytes).
    pub properties: Vec<Property, MAX_PROPERTIES>,
    /// Refused keys: key and why, as text.
    pub refused: Vec<Property, MAX_PROPERTIES>,
}

/// Messages from a device to the hub. New variants are appended (postcard indices never
/// move) and sent only to a hub that showed it understands them.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum DeviceMessage {
    /// Must be first.
    Hello(Hello),
    /// A batch of readings.
    Telemetry(Telemetry),
    /// A command was received.
    CommandAck(CommandAck),
    /// A command finished.
    CommandResult(CommandResult),
    /// Reported properties.
    State(State),
    /// Desired state applied (answer to [`HubMessage::Desired`]).
    Applied(Applied),
    /// Asks for part of an offered firmware image (capability `firmware`).
    FirmwareRequest(FirmwareRequest),
    /// Where an update stands on the device (capability `firmware`).
    FirmwareStatus(FirmwareStatus),
}

/// The hub's answer to `Hello`: the session is ready.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    /// The hub's clock, milliseconds since the Unix epoch.
    pub server_time: u64,
    /// How often the hub pings, in milliseconds.
    pub ping_interval_ms: u32,
    /// How long the hub waits for any frame after a ping, in milliseconds.
    pub pong_timeout_ms: u32,
    /// The highest sequence number the hub has stored for this device (0 for none).
    /// Batches at or below it are already stored; the device can drop them.
    pub last_seq: u64,
    /// Most readings per batch this hub accepts.
    pub max_readings: u16,
    /// Largest message this hub accepts, in bytes.
    pub max_message_bytes: u32,
}

/// Every batch up to and including `up_to_seq` is durably stored.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// The highest stored sequence number.
    pub up_to_seq: u64,
}

/// A control command for the device.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Command {
    /// Hub-assigned id; the same command may arrive more than once (at-least-once), with
    /// the same id.
    pub id: u64,
    /// Command name, same alphabet as metric names, at most 32 bytes.
    pub name: String<MAX_COMMAND_NAME_LEN>,
    /// Arguments as a JSON document (text), at most 512 bytes; `{}` when there are none.
    pub args: String<MAX_ARGS_LEN>,
    /// Hub time (ms since the Unix epoch) after which a result no longer counts.
    pub deadline: u64,
}

/// A non-fatal error report from the hub (fatal ones close the connection instead).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ErrorMessage {
    /// A close-code-like number saying what went wrong.
    pub code: u16,
    /// Human-readable text.
    pub message: String<MAX_ERROR_TEXT_LEN>,
}

/// The hub has closed command `id` (recorded its result, or timed it out, expired or
/// cancelled it) and will never deliver it again: the device may forget its id. Sent only to
/// a device whose `Hello` announced [`capability::COMMAND_CLOSED`].
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandClosed {
    /// The command id from [`Command::id`].
    pub id: u64,
}

/// Messages from the hub to a device. New variants are appended (postcard indices never
/// move) and sent only to devices that announced them in `Hello::capabilities`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum HubMessage {
    /// Answer to `Hello`.
    Welcome(Welcome),
    /// Telemetry durably stored up to a sequence number.
    Ack(Ack),
    /// A command to run.
    Command(Command),
    /// A non-fatal error.
    Error(ErrorMessage),
    /// A command is closed; its id may be forgotten (capability `command_closed`).
    CommandClosed(CommandClosed),
    /// Desired state the device does not have yet (capability `desired`).
    Desired(Desired),
    /// A firmware update to install, or none (capability `firmware`).
    FirmwareOffer(FirmwareOffer),
    /// Part of an offered image, answering a [`FirmwareRequest`] (capability `firmware`).
    FirmwareChunk(FirmwareChunk),
}

/// The part of the device's desired state (set by operators) that differs from what it
/// reported: each key with the JSON text of its value (`null`: back to the device's
/// default). A delta of more than 16 keys comes in several messages of the same version,
/// the last one with `last` set. Apply the values, then answer with
/// [`DeviceMessage::Applied`] for `version`. Sent only to a device whose `Hello` announced
/// [`capability::DESIRED`], right after `Welcome` and whenever desired state changes.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// The desired-state version; it rises by one with every change.
    pub version: u64,
    /// Keys and values (JSON text, ≤ 64 bytes).
    pub properties: Vec<Property, MAX_PROPERTIES>,
    /// Whether this is the last message of this version's delta.
    pub last: bool,
}

/// A firmware update for the device: the image's version, size, SHA-256 and the Ed25519
/// signature over [`crate::firmware::signed_statement`]. The device fetches the image with
/// [`FirmwareRequest`]s, checks size, hash and signature against the key it was provisioned
/// with, installs it, and reports with [`FirmwareStatus`]. An offer with an empty `version`
/// offers nothing: the hub sends it right after `Welcome` to say it understands firmware
/// messages, so a device may report an outcome it holds (a rollback, say). Sent only to a
/// device whose `Hello` announced [`capability::FIRMWARE`]; a newer offer replaces an
/// older one.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FirmwareOffer {
    /// The version to install (empty: nothing to install).
    pub version: String<MAX_FIRMWARE_LEN>,
    /// The image size in bytes.
    pub size: u64,
    /// SHA-256 of the image, 64 lowercase hex digits.
    pub sha256: String<64>,
    /// Ed25519 signature over the signed statement, 128 lowercase hex digits.
    pub signature: String<128>,
}

/// Bytes `offset..offset + len` of the offered image `version`, asked for by the device.
/// The device chooses `len` (1 to [`MAX_CHUNK_BYTES`]) and how many requests it keeps
/// outstanding (its window, at most [`crate::limits::MAX_FIRMWARE_REQUESTS`]); to resume after a
/// reconnect it asks from the offset it has stored.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FirmwareRequest {
    /// The offered version.
    pub version: String<MAX_FIRMWARE_LEN>,
    /// Where the wanted bytes start.
    pub offset: u64,
    /// How many bytes, 1 to [`MAX_CHUNK_BYTES`].
    pub len: u32,
}

/// Image bytes answering a [`FirmwareRequest`]: fewer than asked only at the end of the
/// image, none past it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FirmwareChunk {
    /// The version they belong to.
    pub version: String<MAX_FIRMWARE_LEN>,
    /// The offset of the first byte.
    pub offset: u64,
    /// The bytes: raw in postcard, base64 (standard alphabet, padded) in JSON.
    pub data: ChunkData,
}

/// Up to [`MAX_CHUNK_BYTES`] of image data.
pub type ChunkData = crate::firmware::Blob<MAX_CHUNK_BYTES>;

/// Where an update stands on the device.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UpdateState {
    /// Fetching the image; `percent` says how far.
    Downloading,
    /// The image is complete and verified; writing it to the inactive slot.
    Installing,
    /// Restarting into the new image, on trial.
    Rebooting,
    /// Running the new version, confirmed.
    Succeeded,
    /// Refused or not installed (bad hash or signature, no space, install error);
    /// `reason` says why. The device still runs its old version.
    Failed,
    /// The new version did not come up and the device went back to the old one; `reason`
    /// says why.
    RolledBack,
}

impl UpdateState {
    /// Whether the update is over (nothing more will be reported about it).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            UpdateState::Succeeded | UpdateState::Failed | UpdateState::RolledBack
        )
    }

    /// The name used in JSON and by the hub's API.
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateState::Downloading => "downloading",
            UpdateState::Installing => "installing",
            UpdateState::Rebooting => "rebooting",
            UpdateState::Succeeded => "succeeded",
            UpdateState::Failed => "failed",
            UpdateState::RolledBack => "rolled_back",
        }
    }
}

/// The state of the update to `version` on the device. Sent only after a
/// [`FirmwareOffer`] arrived on the connection (so only to a hub that understands it); an
/// outcome reached while offline goes out on the next connection.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct FirmwareStatus {
    /// The version being installed.
    pub version: String<MAX_FIRMWARE_LEN>,
    /// Where it stands.
    pub state: UpdateState,
    /// Download progress, 0 to 100.
    pub percent: u8,
    /// Why it failed or rolled back, or installer output; empty otherwise.
    pub reason: String<MAX_ERROR_TEXT_LEN>,
}

/// Capability names a device announces in `Hello::capabilities`; the hub sends a message
/// type added after v1.0 only to a device that announced it.
pub mod capability {
    /// The device runs commands.
    pub const COMMANDS: &str = "commands";
    /// The device reports properties (`State`).
    pub const STATE: &str = "state";
    /// The device understands `CommandClosed`.
    pub const COMMAND_CLOSED: &str = "command_closed";
    /// The device applies desired state (`Desired`) and answers with `Applied`.
    pub const DESIRED: &str = "desired";
    /// The device installs firmware updates (`FirmwareOffer`, `FirmwareChunk`) and sends
    /// `FirmwareRequest` and `FirmwareStatus`.
    pub const FIRMWARE: &str = "firmware";
}

/// A rule of the protocol's values that a decoded message breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// A telemetry batch with no readings.
    EmptyBatch,
    /// Sequence number 0.
    ZeroSeq,
    /// A reading whose value is NaN or infinite.
    NonFiniteValue,
    /// A metric name that is empty or has characters outside `[A-Za-z0-9_.:/-]`.
    BadMetricName,
    /// A property key that is empty or has characters outside the name alphabet.
    BadPropertyKey,
    /// A timestamp after [`MAX_TIMESTAMP_MS`] or a sequence number above [`MAX_SEQ`].
    OutOfRange,
    /// A firmware request for 0 bytes or more than [`MAX_CHUNK_BYTES`].
    BadChunkLength,
}

impl Violation {
    /// A short explanation, suitable as a WebSocket close reason (under 123 bytes).
    pub fn reason(self) -> &'static str {
        match self {
            Violation::EmptyBatch => "telemetry batch has no readings",
            Violation::ZeroSeq => "telemetry seq must start at 1",
            Violation::NonFiniteValue => "reading value is NaN or infinite",
            Violation::BadMetricName => {
                "metric name is empty or uses characters outside [A-Za-z0-9_.:/-]"
            }
            Violation::OutOfRange => "ts after 2262-04-11 (9223372036854 ms) or seq above 2^63-1",
            Violation::BadPropertyKey => {
                "property key is empty or uses characters outside [A-Za-z0-9_.:/-]"
            }
            Violation::BadChunkLength => "firmware request len must be 1 to 4096 bytes",
        }
    }
}

impl DeviceMessage {
    /// Checks the rules that the types alone cannot express.
    ///
    /// # Errors
    /// The first [`Violation`] found.
    pub fn validate(&self) -> Result<(), Violation> {
        match self {
            DeviceMessage::Telemetry(t) => {
                if t.seq == 0 {
                    return Err(Violation::ZeroSeq);
                }
                if t.seq > MAX_SEQ {
                    return Err(Violation::OutOfRange);
                }
                if t.readings.is_empty() {
                    return Err(Violation::EmptyBatch);
                }
                for r in &t.readings {
                    if !is_valid_name(&r.metric, MAX_METRIC_LEN) {
                        return Err(Violation::BadMetricName);
                    }
                    if !r.value.is_finite() {
                        return Err(Violation::NonFiniteValue);
                    }
                    if r.ts > MAX_TIMESTAMP_MS {
                        return Err(Violation::OutOfRange);
                    }
                }
                Ok(())
            }
            DeviceMessage::State(s) => {
                for p in &s.properties {
                    if !is_valid_name(&p.key, MAX_PROPERTY_KEY_LEN) {
                        return Err(Violation::BadPropertyKey);
                    }
                }
                Ok(())
            }
            DeviceMessage::Applied(a) => {
                for p in a.properties.iter().chain(&a.refused) {
                    if !is_valid_name(&p.key, MAX_PROPERTY_KEY_LEN) {
                        return Err(Violation::BadPropertyKey);
                    }
                }
                Ok(())
            }
            DeviceMessage::FirmwareRequest(r) => {
                if r.len == 0 || r.len as usize > MAX_CHUNK_BYTES {
                    return Err(Violation::BadChunkLength);
                }
                Ok(())
            }
            DeviceMessage::Hello(_)
            | DeviceMessage::CommandAck(_)
            | DeviceMessage::CommandResult(_)
            | DeviceMessage::FirmwareStatus(_) => Ok(()),
        }
    }

    /// The message's type name as it appears in JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceMessage::Hello(_) => "hello",
            DeviceMessage::Telemetry(_) => "telemetry",
            DeviceMessage::CommandAck(_) => "command_ack",
            DeviceMessage::CommandResult(_) => "command_result",
            DeviceMessage::State(_) => "state",
            DeviceMessage::Applied(_) => "applied",
            DeviceMessage::FirmwareRequest(_) => "firmware_request",
            DeviceMessage::FirmwareStatus(_) => "firmware_status",
        }
    }
}

/// Copies `text` into a fixed-capacity string, cutting it at a character boundary when
/// it is longer than `N` bytes.
pub fn truncated<const N: usize>(text: &str) -> String<N> {
    let mut end = text.len().min(N);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut out = String::new();
    // Cannot fail: `end <= N` bytes.
    let _ = out.push_str(&text[..end]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_char_boundaries() {
        let s: String<4> = truncated("aé€");
        assert_eq!(s.as_str(), "aé");
        let s: String<8> = truncated("short");
        assert_eq!(s.as_str(), "short");
    }

    #[test]
    fn validation() {
        let mut t = Telemetry {
            seq: 1,
            readings: Vec::new(),
        };
        assert_eq!(
            DeviceMessage::Telemetry(t.clone()).validate(),
            Err(Violation::EmptyBatch)
        );
        let r = Reading {
            metric: truncated("temp"),
            ts: 1,
            value: f64::NAN,
        };
        let _ = t.readings.push(r);
        assert_eq!(
            DeviceMessage::Telemetry(t.clone()).validate(),
            Err(Violation::NonFiniteValue)
        );
        t.readings[0].value = 1.0;
        assert_eq!(DeviceMessage::Telemetry(t.clone()).validate(), Ok(()));
        t.readings[0].metric = truncated("bad name");
        assert_eq!(
            DeviceMessage::Telemetry(t.clone()).validate(),
            Err(Violation::BadMetricName)
        );
        t.readings[0].metric = truncated("ok");
        t.readings[0].ts = crate::limits::MAX_TIMESTAMP_MS + 1;
        assert_eq!(
            DeviceMessage::Telemetry(t.clone()).validate(),
            Err(Violation::OutOfRange)
        );
        t.readings[0].ts = 1;
        t.seq = u64::MAX;
        assert_eq!(
            DeviceMessage::Telemetry(t.clone()).validate(),
            Err(Violation::OutOfRange)
        );
        t.seq = 0;
        assert_eq!(
            DeviceMessage::Telemetry(t).validate(),
            Err(Violation::ZeroSeq)
        );
    }
}

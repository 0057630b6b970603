//! WebSocket close codes the hub uses, and what each means to a device.

/// Normal closure.
pub const NORMAL: u16 = 1000;
/// The hub is shutting down; reconnect (with backoff) to this or another node.
pub const GOING_AWAY: u16 = 1001;
/// The WebSocket framing itself was broken (unmasked client frame, bad opcode).
pub const PROTOCOL_ERROR: u16 = 1002;
/// Text frames on a postcard connection, or binary frames on a JSON connection.
pub const UNSUPPORTED_DATA: u16 = 1003;
/// Reserved (RFC 6455): never sent; stands for a close frame that carried no code.
pub const NO_STATUS: u16 = 1005;
/// The payload did not decode, or broke a rule of the protocol's values (a non-finite
/// reading, a bad metric name, an empty batch, sequence 0).
pub const INVALID_PAYLOAD: u16 = 1007;
/// Policy: the device's token was revoked, or expired, while it was connected. A new
/// token is needed; retrying soon with the same one will not help.
pub const POLICY: u16 = 1008;
/// A message or frame was larger than [`crate::limits::MAX_MESSAGE_BYTES`].
pub const TOO_BIG: u16 = 1009;
/// The hub failed internally (for example its store is unavailable); retry with backoff.
pub const INTERNAL: u16 = 1011;
/// A newer connection for the same device id took over this one. Do not reconnect
/// automatically from this connection's process if you did not expect a second one.
pub const SUPERSEDED: u16 = 4000;
/// A message came in the wrong order (telemetry before `Hello`, a second `Hello`).
pub const PROTOCOL_VIOLATION: u16 = 4001;
/// A message of a type this protocol version does not know.
pub const UNKNOWN_MESSAGE: u16 = 4002;
/// The hub heard nothing from the device within the pong timeout after a ping.
pub const LIVENESS_TIMEOUT: u16 = 4003;
/// No `Hello` arrived within the hub's hello timeout after the upgrade.
pub const HELLO_TIMEOUT: u16 = 4004;
/// The hub asks the device to reconnect now: it is handing devices to other nodes of a
/// cluster (rebalancing), or it lost its cluster backplane and another node should take
/// the device. Reconnect at once (after a short random delay, so that a fleet asked to
/// move does not arrive in one wave); it is not a failure.
pub const RECONNECT: u16 = 4010;

/// The device sent more messages per second than the hub allows
/// (`device.max_messages_per_sec`). Its token is fine: reconnect after a short wait
/// ([`RATE_LIMITED_WAIT_MS`] plus jitter) and send less.
pub const RATE_LIMITED: u16 = 4005;

/// How long a device waits before reconnecting after [`RATE_LIMITED`], in milliseconds
/// (plus its usual backoff jitter): long enough that a device stuck in a loop that floods
/// the hub costs it one short connection every few seconds, short enough that a burst
/// loses little time.
pub const RATE_LIMITED_WAIT_MS: u64 = 5_000;

//! The native Linux device agent: reads system and custom sensors, runs the operator's
//! commands safely, and forwards readings to the hub over wss without losing them when
//! the network or the hub goes away.
//!
//! The protocol logic (sequence numbers, the unacknowledged window, acks, command
//! de-duplication, backoff) is not here: it lives once in [`schemas::session`], and
//! [`agent`] drives it. This crate supplies what a Linux box adds around it:
//!
//! - [`config`]: `agent.toml` + `DEVICE_AGENT_*` environment, validated all at once;
//! - [`queue`]: the on-disk, crash-safe, bounded [`schemas::session::Outbox`];
//! - [`sensors`]: system readings (sysinfo), `exec` and `file` sensors;
//! - [`actions`] and [`commands`]: built-in commands and configured actions, never
//!   through a shell, with per-argument allowlists;
//! - [`process`]: running a program with a timeout and a cap on captured output;
//! - [`transport`]: TCP + TLS (rustls, ring) + WebSocket handshake and its failures;
//! - [`update`]: firmware downloads, resumable and verified before installing;
//! - [`agent`]: the event loop that ties them to the session.

pub mod actions;
pub mod agent;
pub mod commands;
pub mod config;
pub mod names;
pub mod process;
pub mod queue;
pub mod sensors;
pub mod transport;
pub mod update;

/// The agent's version, reported in `Hello` (as `device-agent/<version>`) and by `ping`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Milliseconds since the Unix epoch by the system clock (0 if the clock is before 1970).
pub fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

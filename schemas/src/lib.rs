//! The hub's wire protocol, version 1: every message, both encodings, the limits, the close
//! codes, golden vectors, and the device-side protocol logic as a sans-io state machine.
//!
//! This crate is the only place the wire format is defined. The hub, the native agent and
//! the firmware all encode and decode through it. It is `#![no_std]` and needs no allocator
//! on its main path: strings and lists are fixed-capacity (`heapless`) with the protocol
//! limits as their capacities, so a decoded message can never exceed them. The JSON
//! encoding (feature `json`) needs `alloc`; the postcard encoding does not.
//!
//! `PROTOCOL.md` next to this crate documents the protocol for people writing devices with
//! any WebSocket library.
#![no_std]
// Messages hold their fixed-capacity contents inline on purpose: boxing would need an
// allocator, and the firmware path has none.
#![allow(clippy::large_enum_variant)]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod close;
pub mod codec;
pub mod firmware;
pub mod golden;
pub mod limits;
pub mod link;
#[cfg(feature = "alloc")]
mod mem_outbox;
pub mod message;
pub mod session;

pub use codec::{DecodeError, EncodeError, Encoding};
pub use message::{
    capability, Ack, Applied, Command, CommandAck, CommandClosed, CommandResult, Desired,
    DeviceMessage, ErrorMessage, FirmwareChunk, FirmwareOffer, FirmwareRequest, FirmwareStatus,
    Hello, HubMessage, Property, Reading, State, Telemetry, UpdateState, Violation, Welcome,
};

/// The URL path of the device endpoint.
pub const DEVICE_PATH: &str = "/v1/device";

//! The firmware client for the hub: a `#![no_std]` library, no allocator, fixed buffers.
//!
//! It connects to the hub over WebSocket (embedded-websocket; `Authorization: Bearer`
//! token, subprotocol `hub.v1.postcard`, binary frames), says `Hello`, samples the board's
//! sensors on an interval, keeps unacknowledged batches in a ring in flash and re-sends
//! them after a reconnect, runs commands on the board's actuators and reports acks and
//! results, answers pings, notices a silent hub, and reconnects with exponential backoff
//! and full jitter. The protocol logic itself (sequence numbers, the window, acks, command
//! de-duplication, backoff) is `schemas::session`, shared with the Linux agent; this crate
//! drives it.
//!
//! # Layers (embassy-style)
//!
//! | layer | what | you provide |
//! |---|---|---|
//! | [`Board`] | sensors, actuators, optional RTC, status events | an implementation |
//! | [`Flash`] | persistent bytes for the ring ([`RingOutbox`]) | an implementation, [`StorageFlash`] over an `embedded_storage::Storage`, or [`RamFlash`] |
//! | `rand_core::RngCore` | jitter, WebSocket keys and masks | the HAL's TRNG |
//! | [`driver::Connector`] | TCP (+ TLS) to the hub as `embedded_io_async::{Read, Write}` | e.g. embassy-net `TcpSocket` + embedded-tls |
//! | [`driver::Timer`] | monotonic ms and async waiting | e.g. `embassy_time` |
//! | [`Client`] | the sans-io state machine: session, sampling, commands | — |
//! | [`link::Link`] | under the client: WebSocket upgrade, framing, rx/tx buffers, pong and close echo | — |
//! | [`driver::run`] | the event loop | — |
//!
//! # On a real board
//!
//! ```text
//! static RX: StaticCell<[u8; 1024]> = StaticCell::new();
//! static TX: StaticCell<[u8; 1536]> = StaticCell::new();
//!
//! #[embassy_executor::main]
//! async fn main(spawner: Spawner) {
//!     let p = embassy_rp::init(Default::default());
//!     // A 16 KiB flash partition for the unacknowledged ring (and the sequence counter).
//!     let flash = StorageFlash(RmwNorFlashStorage::new(partition, &mut erase_buf));
//!     let (ring, _fresh) = RingOutbox::mount(flash).unwrap_or_else(|_| reprovision());
//!     let config = ClientConfig::new(TOKEN, "1.0.0");
//!     let mut client = Client::new(config, ring, MyBoard::new(p), Trng::new(p.TRNG), RX.init([0; 1024]), TX.init([0; 1536]))?;
//!     let mut net = MyConnector::new(stack, "hub.example.net:8443", CA_DER); // TcpSocket + TLS
//!     match driver::run(&mut client, &mut net, &EmbassyTimer, core::future::pending(), 0).await {
//!         Ok(Exit::Reboot) => cortex_m::peripheral::SCB::sys_reset(),
//!         _ => panic!("storage failed"),
//!     }
//! }
//! ```
//!
//! Implement [`Board`] (`sample` pushes `(metric, value)` pairs; `execute` runs a
//! command whose `args` is JSON text — `serde-json-core` parses it without an allocator),
//! [`Flash`], [`driver::Connector`] and [`driver::Timer`]; bring an `RngCore`. A board
//! without an async executor can drive [`Client`] from its own loop: the table in
//! [`client`] lists what each [`Io`] asks for.
//!
//! # Memory
//!
//! Per device: the rx and tx buffers you lend (at least [`client::MIN_RX_BUFFER`] and
//! [`client::MIN_TX_BUFFER`]; 1 KiB and 1.5 KiB are good values), the [`Client`] struct
//! (about 5.6 KiB, most of it `schemas::session::Session`'s reply queue), the board, and
//! the flash region. Stack: about 16 KiB at peak, in synchronous calls (a 5.3 KiB message
//! encode buffer, the session's 5.6 KiB `Telemetry` value, a 2 KiB receive payload).
//!
//! # Features
//!
//! `std` adds `std::error::Error` impls; `host` (default) builds the `firmware-sim`
//! simulator binary (tokio, rustls). With `default-features = false` the dependency graph
//! is `no_std` and allocation-free; `nostd-proof/` next to this crate proves it.
#![no_std]
// The session's messages hold fixed-capacity data inline; see `schemas`.
#![allow(clippy::large_enum_variant)]

#[cfg(feature = "std")]
extern crate std;

pub mod board;
pub mod client;
pub mod crc;
pub mod driver;
pub mod endpoint;
pub mod flash;
pub mod link;
pub mod ring;
pub mod rng;
pub mod update;

#[cfg(test)]
mod tests;

pub use board::{AfterDisconnect, Board, CommandContext, Event, Outcome, SampleError, Samples};
pub use client::{Client, ClientConfig, ClientError, ClientStats, Exit, Io};
pub use endpoint::{Endpoint, EndpointError};
pub use flash::{Flash, RamFlash, StorageFlash};
pub use ring::{RingError, RingOutbox};
pub use rng::MaskRng;

/// Decodes one hub-to-device frame payload the way the client does (postcard, trailing
/// bytes ignored). Exposed so that tests can run the golden vectors through the firmware's
/// own decode path.
///
/// # Errors
/// The payload is not a v1 hub message.
pub fn decode_hub_message(payload: &[u8]) -> Result<schemas::HubMessage, schemas::DecodeError> {
    schemas::codec::decode_postcard(payload)
}

//! The event bus: presence changes (and, later, command state changes and readings) fan
//! out to `hub watch`, the API's event stream and the log.
//!
//! It is a bounded broadcast channel: a subscriber that falls more than
//! [`EVENT_BUFFER`] events behind loses the oldest ones and is told how many.

use serde::Serialize;
use tokio::sync::broadcast;

/// Events kept for slow subscribers.
pub const EVENT_BUFFER: usize = 4096;

/// Something that happened in the hub.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum HubEvent {
    /// A device came online or went offline.
    Presence {
        /// The device.
        device: String,
        /// Whether it is now online.
        online: bool,
        /// Why: `connected`, `pong_timeout`, `closed:<code>`, `superseded`, `shutdown`,
        /// `io_error`, `protocol:<code>`, `store_failure`.
        cause: String,
        /// When, ms since the epoch.
        at_ms: u64,
    },
}

/// The bus.
#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<HubEvent>,
}

impl Default for EventBus {
    fn default() -> Self {
        EventBus::new()
    }
}

impl EventBus {
    /// An empty bus.
    pub fn new() -> EventBus {
        EventBus {
            tx: broadcast::channel(EVENT_BUFFER).0,
        }
    }

    /// Publishes an event (dropped when nobody listens).
    pub fn publish(&self, event: HubEvent) {
        let _ = self.tx.send(event);
    }

    /// A new subscription, starting now.
    pub fn subscribe(&self) -> broadcast::Receiver<HubEvent> {
        self.tx.subscribe()
    }
}

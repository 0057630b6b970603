//! The event bus: presence changes, command state changes and (for subscribers who ask)
//! readings fan out to `hub watch` and the API's event stream.
//!
//! It is a bounded broadcast channel: a subscriber that falls more than
//! [`EVENT_BUFFER`] events behind loses the oldest ones and is told how many.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

use crate::store::ledger::CommandRecord;

/// Events kept for slow subscribers.
pub const EVENT_BUFFER: usize = 4096;

/// Something that happened in the hub.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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
    /// A command changed state.
    Command {
        /// The command as it is now.
        command: Box<CommandRecord>,
        /// When, ms since the epoch.
        at_ms: u64,
    },
    /// A device's desired or reported state changed.
    State {
        /// The device.
        device: String,
        /// Desired-state version now.
        desired_version: u64,
        /// The desired version the device last applied.
        reported_version: u64,
        /// Keys whose desired and reported values still differ.
        pending: usize,
        /// When, ms since the epoch.
        at_ms: u64,
    },
    /// A telemetry batch arrived (published only while someone subscribed to readings).
    Readings {
        /// The device.
        device: String,
        /// The batch's sequence number.
        seq: u64,
        /// The readings: (metric, ts ms, value).
        readings: Vec<(String, u64, f64)>,
    },
}

impl HubEvent {
    /// The device the event concerns.
    pub fn device(&self) -> &str {
        match self {
            HubEvent::Presence { device, .. }
            | HubEvent::Readings { device, .. }
            | HubEvent::State { device, .. } => device,
            HubEvent::Command { command, .. } => &command.device,
        }
    }
}

/// The bus.
#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<HubEvent>,
    reading_subscribers: Arc<AtomicUsize>,
    /// In a cluster: whether a subscriber on another node wants readings.
    remote_readings: Arc<std::sync::atomic::AtomicBool>,
    /// In a cluster: local events also go here, to be published to the other nodes.
    forward: Option<mpsc::Sender<HubEvent>>,
}

/// Keeps readings flowing onto the bus while it lives.
#[derive(Debug)]
pub struct ReadingsInterest(Arc<AtomicUsize>);

impl Drop for ReadingsInterest {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
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
            reading_subscribers: Arc::new(AtomicUsize::new(0)),
            remote_readings: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            forward: None,
        }
    }

    /// A bus that also hands every local presence and command event to `forward` (the
    /// cluster backplane). When that bounded queue is full the event is not forwarded
    /// (counted in `hub_events_forward_dropped_total`); local subscribers still get it.
    pub fn forwarding(forward: mpsc::Sender<HubEvent>) -> EventBus {
        EventBus {
            forward: Some(forward),
            ..EventBus::new()
        }
    }

    /// Publishes an event that happened on this node (dropped when nobody listens).
    pub fn publish(&self, event: HubEvent) {
        if let Some(forward) = &self.forward {
            // Readings cross to other nodes only while someone there asked for them.
            let wanted = !matches!(event, HubEvent::Readings { .. })
                || self.remote_readings.load(Ordering::Acquire);
            if wanted && forward.try_send(event.clone()).is_err() {
                metrics::counter!("hub_events_forward_dropped_total").increment(1);
            }
        }
        let _ = self.tx.send(event);
    }

    /// Delivers an event that happened on another node to local subscribers only.
    pub fn deliver_remote(&self, event: HubEvent) {
        let _ = self.tx.send(event);
    }

    /// A new subscription, starting now.
    pub fn subscribe(&self) -> broadcast::Receiver<HubEvent> {
        self.tx.subscribe()
    }

    /// Asks for readings to be published too, until the returned guard is dropped.
    pub fn want_readings(&self) -> ReadingsInterest {
        self.reading_subscribers.fetch_add(1, Ordering::AcqRel);
        ReadingsInterest(self.reading_subscribers.clone())
    }

    /// Whether anyone wants readings (so connections skip the work otherwise).
    pub fn readings_wanted(&self) -> bool {
        self.local_readings_wanted() || self.remote_readings.load(Ordering::Acquire)
    }

    /// Whether a subscriber on this node wants readings.
    pub fn local_readings_wanted(&self) -> bool {
        self.reading_subscribers.load(Ordering::Acquire) > 0
    }

    /// In a cluster: records whether a subscriber on another node wants readings.
    pub fn set_remote_readings(&self, wanted: bool) {
        self.remote_readings.store(wanted, Ordering::Release);
    }
}

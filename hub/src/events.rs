//! The event bus: presence changes, command state changes and (for subscribers who ask)
//! readings fan out to `hub watch` and the API's event stream.
//!
//! It is a bounded broadcast channel: a subscriber that falls more than
//! [`EVENT_BUFFER`] events behind loses the oldest ones and is told how many.
//!
//! Presence and command events are numbered as they enter the bus, and the last
//! [`REPLAY_BUFFER`] of them are kept, so that a client whose event stream broke (the
//! network, a restarted proxy) can resume after the last [`EventId`] it saw and miss
//! nothing that is still kept. Readings are not numbered and not kept: they are stored,
//! and `hub query` reads them back.

use std::collections::VecDeque;
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

use crate::store::ledger::CommandRecord;

/// Events kept for slow subscribers.
pub const EVENT_BUFFER: usize = 4096;

/// Presence and command events kept for subscribers that resume after a broken stream.
pub const REPLAY_BUFFER: usize = 1024;

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
    /// A job was created, progressed or ended.
    Job {
        /// The job as it is now.
        job: Box<crate::store::jobs::JobRecord>,
        /// Its targets per state.
        counts: crate::jobs::JobCounts,
        /// When, ms since the epoch.
        at_ms: u64,
    },
    /// A device's firmware update changed stage (offered, downloading, ..., an outcome).
    Firmware {
        /// The device.
        device: String,
        /// The version it is to install.
        version: String,
        /// `offered`, `downloading`, `installing`, `rebooting`, `succeeded`, `failed` or
        /// `rolled_back`.
        state: String,
        /// Download progress, 0 to 100.
        percent: u8,
        /// Why it failed or rolled back, as the device said.
        reason: String,
        /// The rollout that assigned it, if one did.
        rollout: Option<u64>,
        /// When, ms since the epoch.
        at_ms: u64,
    },
    /// A rollout started, changed state (paused, resumed, aborted, completed).
    Rollout {
        /// Its id.
        id: u64,
        /// The version it offers.
        version: String,
        /// `running`, `paused`, `aborted` or `completed`.
        state: String,
        /// Why it was paused or aborted.
        reason: String,
        /// Its devices by stage.
        counts: crate::rollouts::RolloutCounts,
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
    /// The event that a device's twin is now `twin`.
    pub fn state(device: &str, twin: &crate::store::twin::Twin) -> HubEvent {
        HubEvent::State {
            device: device.to_string(),
            desired_version: twin.desired_version,
            reported_version: twin.reported_version,
            pending: twin.delta().len(),
            at_ms: crate::store::now_ms(),
        }
    }

    /// The device the event concerns (none for a job's).
    pub fn device(&self) -> Option<&str> {
        match self {
            HubEvent::Presence { device, .. }
            | HubEvent::Readings { device, .. }
            | HubEvent::State { device, .. }
            | HubEvent::Firmware { device, .. } => Some(device),
            HubEvent::Command { command, .. } => Some(&command.device),
            HubEvent::Job { .. } | HubEvent::Rollout { .. } => None,
        }
    }
}

/// Where an event stands in this bus's sequence: the bus's start time (so that ids from a
/// hub that restarted are recognised as such) and the event's number on it. Written
/// `START-NUMBER`, as in the `id:` lines of the event stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventId {
    /// When the bus started, ms since the epoch.
    pub bus: u64,
    /// The event's number on that bus (1 for the first; 0 is "before the first").
    pub seq: u64,
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.bus, self.seq)
    }
}

/// An event id that is not `START-NUMBER`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an event id (START-NUMBER, as sent in the stream's id: lines)")]
pub struct BadEventId(pub String);

impl FromStr for EventId {
    type Err = BadEventId;

    fn from_str(text: &str) -> Result<EventId, BadEventId> {
        let bad = || BadEventId(text.chars().take(64).collect());
        let (bus, seq) = text.trim().split_once('-').ok_or_else(bad)?;
        Ok(EventId {
            bus: bus.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

/// An event as it travels on the bus: with its number when it is a presence or command
/// event.
#[derive(Debug, Clone)]
pub struct Numbered {
    /// Its id, for presence and command events.
    pub id: Option<EventId>,
    /// The event.
    pub event: HubEvent,
}

/// A subscription to the bus, from the moment it was made.
#[derive(Debug)]
pub struct Subscription(broadcast::Receiver<Numbered>);

impl Subscription {
    /// The next event.
    ///
    /// Cancel safety: safe (as `broadcast::Receiver::recv`).
    ///
    /// # Errors
    /// `Lagged(n)` when the subscriber fell behind and `n` events were lost; `Closed` when
    /// the bus is gone.
    pub async fn recv(&mut self) -> Result<HubEvent, broadcast::error::RecvError> {
        self.0.recv().await.map(|n| n.event)
    }

    /// The next event with its id.
    ///
    /// Cancel safety: safe (as `broadcast::Receiver::recv`).
    ///
    /// # Errors
    /// As [`Subscription::recv`].
    pub async fn recv_numbered(&mut self) -> Result<Numbered, broadcast::error::RecvError> {
        self.0.recv().await
    }
}

/// What a subscriber that resumes after an id gets besides the live events.
#[derive(Debug)]
pub struct Resumed {
    /// The kept events after the id, oldest first.
    pub replay: Vec<Numbered>,
    /// Events after the id that are no longer known.
    pub gap: Option<Gap>,
    /// The id of the last numbered event when the subscription was made.
    pub position: EventId,
}

/// Why a resumed subscriber cannot be given every event after its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gap {
    /// This many events were published after the id and are no longer kept.
    Missed(u64),
    /// The id is from another run of the hub (or another hub): what happened before this
    /// run is not known here (what this run kept is replayed).
    OtherRun,
}

/// The numbered events kept for resuming subscribers.
#[derive(Debug)]
struct Replay {
    /// The number of the last numbered event (0: none yet).
    last: u64,
    kept: VecDeque<Numbered>,
}

/// The bus.
#[derive(Debug, Clone)]
pub struct EventBus {
    tx: broadcast::Sender<Numbered>,
    /// When this bus started, ms since the epoch: the first half of its event ids.
    started: u64,
    replay: Arc<Mutex<Replay>>,
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
            started: crate::store::now_ms(),
            replay: Arc::new(Mutex::new(Replay {
                last: 0,
                kept: VecDeque::with_capacity(REPLAY_BUFFER),
            })),
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
        self.send(event);
    }

    /// Delivers an event that happened on another node to local subscribers only.
    pub fn deliver_remote(&self, event: HubEvent) {
        self.send(event);
    }

    /// Numbers presence and command events, keeps them for resuming subscribers, and
    /// broadcasts every event.
    fn send(&self, event: HubEvent) {
        if matches!(event, HubEvent::Readings { .. }) {
            let _ = self.tx.send(Numbered { id: None, event });
            return;
        }
        let mut replay = self.replay();
        replay.last += 1;
        let numbered = Numbered {
            id: Some(EventId {
                bus: self.started,
                seq: replay.last,
            }),
            event,
        };
        if replay.kept.len() == REPLAY_BUFFER {
            replay.kept.pop_front();
        }
        replay.kept.push_back(numbered.clone());
        // Sent while the lock is held, so that the channel carries ids in order and a
        // resuming subscriber can tell replayed events from live ones by their number.
        let _ = self.tx.send(numbered);
    }

    fn replay(&self) -> MutexGuard<'_, Replay> {
        // The lock guards plain data that every holder leaves consistent; a panic
        // elsewhere while holding it does not make the data wrong.
        self.replay.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new subscription, starting now.
    pub fn subscribe(&self) -> Subscription {
        Subscription(self.tx.subscribe())
    }

    /// The id of the last numbered event (number 0 before the first): where a new
    /// subscriber starts.
    pub fn position(&self) -> EventId {
        EventId {
            bus: self.started,
            seq: self.replay().last,
        }
    }

    /// A new subscription and the id of the last event before it.
    pub fn subscribe_at(&self) -> (Subscription, EventId) {
        let replay = self.replay();
        let position = EventId {
            bus: self.started,
            seq: replay.last,
        };
        (Subscription(self.tx.subscribe()), position)
    }

    /// A subscription that resumes after `after`: the kept events since then, to be
    /// delivered before the subscription's own (which start right after them), and what
    /// is missing.
    pub fn resume(&self, after: EventId) -> (Subscription, Resumed) {
        // Subscribed under the lock, so no event falls between the replay and the
        // subscription.
        let replay = self.replay();
        let subscription = Subscription(self.tx.subscribe());
        let position = EventId {
            bus: self.started,
            seq: replay.last,
        };
        let other_run = after.bus != self.started || after.seq > replay.last;
        // Everything this run kept came after an id from another run (an earlier one,
        // as a restarted hub's clients have): all of it is replayed.
        let after = if other_run {
            EventId {
                bus: self.started,
                seq: 0,
            }
        } else {
            after
        };
        let events: Vec<Numbered> = replay
            .kept
            .iter()
            .filter(|n| n.id.is_some_and(|id| id.seq > after.seq))
            .cloned()
            .collect();
        let oldest_kept = replay
            .kept
            .front()
            .and_then(|n| n.id)
            .map_or(replay.last + 1, |id| id.seq);
        let missed = oldest_kept.saturating_sub(after.seq + 1);
        (
            subscription,
            Resumed {
                replay: events,
                gap: if other_run {
                    Some(Gap::OtherRun)
                } else {
                    (missed > 0).then_some(Gap::Missed(missed))
                },
                position,
            },
        )
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

#[cfg(test)]
mod tests {
    use super::*;

    fn presence(device: &str, at_ms: u64) -> HubEvent {
        HubEvent::Presence {
            device: device.to_string(),
            online: true,
            cause: "connected".to_string(),
            at_ms,
        }
    }

    fn seqs(events: &[Numbered]) -> Vec<u64> {
        events
            .iter()
            .filter_map(|n| n.id.map(|id| id.seq))
            .collect()
    }

    #[test]
    fn event_ids_read_back_as_written() {
        let id = EventId {
            bus: 1_764_000_000_123,
            seq: 42,
        };
        assert_eq!(id.to_string(), "1764000000123-42");
        assert_eq!("1764000000123-42".parse::<EventId>(), Ok(id));
        for bad in ["", "42", "a-1", "1-b", "1-2-3"] {
            assert!(bad.parse::<EventId>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn a_resumed_subscriber_gets_what_it_missed_then_live_events() {
        let bus = EventBus::new();
        let start = bus.position();
        assert_eq!(start.seq, 0);
        bus.publish(presence("a", 1));
        bus.publish(HubEvent::Readings {
            device: "a".to_string(),
            seq: 1,
            readings: Vec::new(),
        });
        bus.publish(presence("b", 2));
        let seen = EventId { seq: 1, ..start };
        let (mut live, resumed) = bus.resume(seen);
        assert_eq!(resumed.gap, None);
        assert_eq!(
            seqs(&resumed.replay),
            [2],
            "readings are neither numbered nor kept"
        );
        bus.publish(presence("c", 3));
        let next = live.recv_numbered().await.expect("live event");
        assert_eq!(next.id.map(|id| id.seq), Some(3));
        assert_eq!(next.event.device(), Some("c"));
        // From the start: everything kept.
        let (_, resumed) = bus.resume(start);
        assert_eq!(seqs(&resumed.replay), [1, 2, 3]);
        assert_eq!(resumed.gap, None);
    }

    #[test]
    fn a_subscriber_too_far_behind_or_from_another_run_is_told() {
        let bus = EventBus::new();
        let start = bus.position();
        for i in 0..(REPLAY_BUFFER as u64 + 10) {
            bus.publish(presence("a", i));
        }
        let (_, resumed) = bus.resume(EventId { seq: 5, ..start });
        // Events 6..=10 fell out of the buffer; 11 onwards are replayed.
        assert_eq!(resumed.gap, Some(Gap::Missed(5)));
        assert_eq!(resumed.replay.len(), REPLAY_BUFFER);
        assert_eq!(seqs(&resumed.replay).first(), Some(&11));
        // An id from another run: what this run kept is replayed, and the gap before it
        // is unknown.
        let (_, resumed) = bus.resume(EventId {
            bus: start.bus - 1,
            seq: 3,
        });
        assert_eq!(resumed.gap, Some(Gap::OtherRun));
        assert_eq!(resumed.replay.len(), REPLAY_BUFFER);
        // An id from the future of this bus is from another run too.
        let (_, resumed) = bus.resume(EventId {
            seq: 1 << 40,
            ..start
        });
        assert_eq!(resumed.gap, Some(Gap::OtherRun));
    }
}

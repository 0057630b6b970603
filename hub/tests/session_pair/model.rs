//! The parts of the pair harness's world: scenarios and their faults, the frames on the
//! link, one connection, the ledger and store models (the real ones' rules), the device,
//! and the knobs that restore an old behaviour for a regression scenario.

use std::collections::{BTreeMap, HashMap, VecDeque};

use hub::device::session::HubSession;
use hub::store::Batch;
use proptest::prelude::*;
use proptest::test_runner::{RngAlgorithm, TestRng};
use schemas::message::truncated;
use schemas::session::{MemOutbox, Session, SessionConfig};
use schemas::Command;

/// The virtual clock advances in steps of this many milliseconds.
pub(crate) const TICK: u64 = 5;
pub(crate) const PING_INTERVAL: u64 = 1_000;
pub(crate) const PONG_TIMEOUT: u64 = 500;
pub(crate) const HELLO_TIMEOUT: u64 = 2_000;
/// The most a frame takes to cross the link, one way.
pub(crate) const MAX_LATENCY: u64 = 100;
/// How many batches the ingest queue holds before connections stop reading.
pub(crate) const INGEST_QUEUE: usize = 4;
/// After the last fault: how long everything has to converge.
pub(crate) const QUIET: u64 = 30_000;
/// The device's window: batches sent and not yet acknowledged.
pub(crate) const WINDOW: u64 = 8;

/// Something that goes wrong, at a moment of the scenario.
#[derive(Debug, Clone)]
pub(crate) enum Fault {
    /// The connection breaks; both ends learn it one latency later.
    Cut,
    /// The connection goes silent in both directions, and nobody is told (half-open).
    Blackhole,
    /// The device stops for this many ms: no reads, no timers, no pongs.
    Freeze(u64),
    /// The device stops reading for this many ms (a stuck read loop) but keeps its timers
    /// and keeps sending: no pongs.
    Deaf(u64),
    /// The device loses power: its connection goes silent, RAM is lost, its outbox (in
    /// flash) survives, and it boots again at once.
    Reboot,
    /// The hub process dies: its connections reset, batches not yet committed are lost,
    /// and it is back at once (store and ledger survive, as on disk).
    HubCrash,
    /// The next commit fails: its connections are closed with 1011 and nothing is acked.
    StoreFailure,
    /// New connections fail for this many ms.
    Partition(u64),
}

#[derive(Debug, Clone)]
pub(crate) struct Scenario {
    pub(crate) seed: u64,
    /// Faults and traffic stop here; then the world has `QUIET` ms to converge, plus the
    /// time the device needs to send its backlog at its window's worst-case rate.
    pub(crate) duration: u64,
    pub(crate) batch_every: u64,
    pub(crate) readings_per_batch: usize,
    /// Command creation times.
    pub(crate) commands: Vec<u64>,
    pub(crate) faults: Vec<(u64, Fault)>,
    /// The hub's per-connection command window.
    pub(crate) command_window: usize,
    /// Desired-state changes: when, which key (`k0`..`k3`), and its new value (`None`
    /// deletes it).
    pub(crate) desired: Vec<(u64, u8, Option<u8>)>,
    /// A firmware update offered from the start: the image size and the device's window
    /// (chunk requests it keeps outstanding).
    pub(crate) firmware: Option<(u64, u32)>,
}

impl Scenario {
    /// A scenario without commands, faults or desired state: one reading every 10 ms, a
    /// command window of 4. Tests change what they are about.
    pub(crate) fn calm(seed: u64, duration: u64) -> Scenario {
        Scenario {
            seed,
            duration,
            batch_every: 10,
            readings_per_batch: 1,
            commands: Vec::new(),
            faults: Vec::new(),
            command_window: 4,
            desired: Vec::new(),
            firmware: None,
        }
    }
}

pub(crate) fn fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        3 => Just(Fault::Cut),
        2 => Just(Fault::Blackhole),
        2 => (1u64..3_000).prop_map(Fault::Freeze),
        1 => (1u64..3_000).prop_map(Fault::Deaf),
        2 => Just(Fault::Reboot),
        1 => Just(Fault::HubCrash),
        1 => Just(Fault::StoreFailure),
        1 => (1u64..5_000).prop_map(Fault::Partition),
    ]
}

pub(crate) fn scenario() -> impl Strategy<Value = Scenario> {
    (5_000u64..40_000)
        .prop_flat_map(|duration| {
            (
                any::<u64>(),
                Just(duration),
                prop_oneof![Just(10u64), Just(50), Just(200)],
                1usize..4,
                prop::collection::vec(0..duration, 0..80),
                prop::collection::vec((0..duration, fault()), 0..12),
                prop_oneof![Just(1usize), Just(4), Just(32)],
                prop::collection::vec((0..duration, 0u8..4, prop::option::of(0u8..5)), 0..20),
                prop::option::of((1u64..120_000, 1u32..17)),
            )
        })
        .prop_map(
            |(
                seed,
                duration,
                batch_every,
                readings_per_batch,
                commands,
                faults,
                window,
                desired,
                firmware,
            )| {
                Scenario {
                    seed,
                    duration,
                    batch_every,
                    readings_per_batch,
                    commands,
                    faults,
                    command_window: window,
                    desired,
                    firmware,
                }
            },
        )
}

/// The random source for what proptest does not choose directly (latencies, jitter, how
/// long a command runs): proptest's own generator, seeded from the scenario, so a failing
/// case replays exactly.
pub(crate) struct Dice(TestRng);

impl Dice {
    pub(crate) fn seeded(seed: u64) -> Dice {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        Dice(TestRng::from_seed(RngAlgorithm::ChaCha, &bytes))
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0.next_u64()
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A frame from the device to the hub.
#[derive(Debug)]
pub(crate) enum Up {
    Data(Vec<u8>),
    Pong([u8; 8]),
    Close(u16),
    /// The device's side of the TCP connection reset.
    Reset,
}

/// A frame from the hub to the device.
#[derive(Debug)]
pub(crate) enum Down {
    Data(Vec<u8>),
    Ping([u8; 8]),
    Close(u16),
    /// The hub's side of the TCP connection reset (or closed without a close frame).
    Reset,
}

/// One connection: the hub's session (until it ends) and the frames in flight each way.
pub(crate) struct Conn {
    pub(crate) hub: Option<HubSession>,
    pub(crate) up: VecDeque<(u64, Up)>,
    pub(crate) down: VecDeque<(u64, Down)>,
    /// When it went silent (half-open); frames are dropped from then on.
    pub(crate) blackholed: Option<u64>,
    /// When the device stopped using it (closed it, saw it break, rebooted).
    pub(crate) device_left: Option<u64>,
    /// Whether the hub welcomed it and it holds the device's presence.
    pub(crate) registered: bool,
    /// The store's acknowledgement watermark for this connection's batches.
    pub(crate) slot: u64,
    /// A commit of this connection's batches failed; later ones are not stored.
    pub(crate) slot_failed: bool,
    /// The last tick at which a batch of this connection waited for the ingest queue: the
    /// hub does not read then, so it does not count silence either.
    pub(crate) backpressured: u64,
    /// When the device opened it.
    pub(crate) opened: u64,
}

impl Conn {
    pub(crate) fn send_up(&mut self, now: u64, rng: &mut Dice, frame: Up) {
        transmit(&mut self.up, self.blackholed.is_some(), now, rng, frame);
    }
    pub(crate) fn send_down(&mut self, now: u64, rng: &mut Dice, frame: Down) {
        transmit(&mut self.down, self.blackholed.is_some(), now, rng, frame);
    }
}

/// Puts a frame on one direction of the link: it arrives after a random latency, never
/// before the frame sent ahead of it (a stream keeps order); a silent link loses it.
fn transmit<T>(queue: &mut VecDeque<(u64, T)>, silent: bool, now: u64, rng: &mut Dice, frame: T) {
    if !silent {
        let at = queue
            .back()
            .map_or(0, |(t, _)| *t)
            .max(now + rng.below(MAX_LATENCY));
        queue.push_back((at, frame));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CommandState {
    Queued,
    Sent,
    Acked,
    Succeeded,
    /// No result by its deadline (the hub's result timeout).
    TimedOut,
}

impl CommandState {
    pub(crate) fn is_open(self) -> bool {
        matches!(
            self,
            CommandState::Queued | CommandState::Sent | CommandState::Acked
        )
    }
}

/// How long after its first delivery a command's result counts (the hub's result timeout).
pub(crate) const COMMAND_TIMEOUT: u64 = 8_000;
/// How long after the last fault a device is surely back: its longest backoff (2 s), the
/// silence that tells it a half-open link is dead (2.5 s), and a connect.
pub(crate) const RECONNECT_SETTLE: u64 = 5_000;
/// The hub's wall clock at virtual time 0.
pub(crate) const WALL_EPOCH: u64 = 1_700_000_000_000;

pub(crate) struct LedgerEntry {
    pub(crate) state: CommandState,
    /// Hub wall time after which a result no longer counts; set at the first delivery.
    pub(crate) deadline: Option<u64>,
    pub(crate) created: u64,
}

/// The ledger's rules: open commands are delivered oldest first within the window; a
/// result counts only for an open command; a command without a result by its deadline is
/// closed (timed out).
#[derive(Default)]
pub(crate) struct Ledger {
    pub(crate) commands: BTreeMap<u64, LedgerEntry>,
}

impl Ledger {
    pub(crate) fn open(&self, window: usize, wall: u64) -> Vec<Command> {
        self.commands
            .iter()
            .filter(|(_, c)| c.state.is_open())
            .take(window)
            .map(|(id, c)| Command {
                id: *id,
                name: truncated("led"),
                args: truncated("{}"),
                deadline: c.deadline.unwrap_or(wall + COMMAND_TIMEOUT),
            })
            .collect()
    }

    pub(crate) fn time_out(&mut self, wall: u64) {
        for c in self.commands.values_mut() {
            if c.state.is_open() && c.deadline.is_some_and(|d| d < wall) {
                c.state = CommandState::TimedOut;
            }
        }
    }
}

/// A batch handed to the store, committed at `at`.
pub(crate) struct Submission {
    pub(crate) conn: usize,
    pub(crate) batch: Batch,
    pub(crate) at: u64,
}

/// The store's rules: one writer commits in order; a batch at or below the device's
/// high-water mark is a duplicate and not stored again; a failed commit acknowledges
/// nothing.
#[derive(Default)]
pub(crate) struct Store {
    pub(crate) hwm: u64,
    /// A reading stored a second time, if that ever happened.
    pub(crate) stored_twice: Option<u64>,
    /// How many times each reading (by its unique value) was stored.
    pub(crate) stored: HashMap<u64, u32>,
    pub(crate) queue: VecDeque<Submission>,
    pub(crate) fail_next: bool,
}

pub(crate) struct Device {
    pub(crate) session: Session<MemOutbox, 8, 16>,
    pub(crate) boot: u32,
    pub(crate) frozen_until: u64,
    /// The connection the device is using.
    pub(crate) conn: Option<usize>,
    /// Commands running, with the time they finish.
    pub(crate) running: VecDeque<(u64, u64)>,
    /// Runs per (boot, command id).
    pub(crate) runs: HashMap<(u32, u64), u32>,
    /// Commands run in this boot.
    pub(crate) ran_this_boot: std::collections::HashSet<u64>,
    /// Settings applied from desired state (key to JSON text); lost at a reboot.
    pub(crate) settings: BTreeMap<String, String>,
    /// A command run twice in one boot, if that ever happened.
    pub(crate) dedup_broken: Option<String>,
    /// Every reading value recorded so far is below this.
    pub(crate) next_value: u64,
    pub(crate) freezes: Vec<(u64, u64)>,
    /// Until when the device does not read.
    pub(crate) deaf_until: u64,
    /// Periods in which the device did not read, as (from, until).
    pub(crate) deafs: Vec<(u64, u64)>,
    /// The firmware image received so far (in flash: it survives reboots).
    pub(crate) image: Vec<u8>,
    /// The next image offset to ask for on this connection.
    pub(crate) image_next: u64,
    /// Chunk requests outstanding on this connection.
    pub(crate) image_outstanding: u32,
}

/// Image bytes the device asks for per request.
pub(crate) const CHUNK: u32 = 1_000;
/// The version of the pair harness's update.
pub(crate) const UPDATE_VERSION: &str = "pair-2.0";

/// The hub's image of `size` bytes: a pattern no offset mistake can reproduce.
pub(crate) fn update_image(size: u64) -> Vec<u8> {
    (0..size)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 8)) as u8)
        .collect()
}

/// What the world runs with, to show that a regression test's scenario still exercises the
/// defect it was written for (the old behaviour must fail it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Knobs {
    /// The ingest writer drops later batches of a connection whose commit failed.
    pub(crate) writer_skips_failed: bool,
    /// The device announces `command_closed`, so the hub confirms results.
    pub(crate) device_closes: bool,
}

pub(crate) const CURRENT: Knobs = Knobs {
    writer_skips_failed: true,
    device_closes: true,
};

/// The device's session settings; it announces `firmware` when it is to get an update
/// (`updates`), so scenarios without one run exactly as before.
pub(crate) fn device_config(knobs: Knobs, updates: bool) -> SessionConfig {
    let mut config = SessionConfig::new("pair-1.0");
    let _ = config
        .capabilities
        .push(truncated(schemas::capability::DESIRED));
    if updates {
        let _ = config
            .capabilities
            .push(truncated(schemas::capability::FIRMWARE));
    }
    if !knobs.device_closes {
        config
            .capabilities
            .retain(|c| c != schemas::capability::COMMAND_CLOSED);
    }
    config.backoff_initial_ms = 100;
    config.backoff_max_ms = 2_000;
    config.refused_backoff_ms = 2_000;
    config.welcome_timeout_ms = 2_000;
    config.window = WINDOW as usize;
    config
}

//! The pair harness's world: the device's session and the hub's session wired together in
//! memory with a virtual clock, driven tick by tick through a scenario, with the
//! invariants checked at every tick and at the end.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hub::device::session::{Effect, HubSession, Inbound, SessionParams, Transmit};
use hub::store::twin::{self, Twin};
use proptest::prelude::*;
use schemas::codec::{decode_postcard, encode_postcard_vec};
use schemas::message::truncated;
use schemas::session::{
    Action, Delivered, DisconnectCause, MemOutbox, Outbox, Session, SessionError,
};
use schemas::{close, Encoding, HubMessage, Reading};

use super::model::*;

/// Why a connection's hub session ended, and when.
pub(crate) struct Verdict {
    pub(crate) conn: usize,
    pub(crate) at: u64,
    pub(crate) cause: String,
}

pub(crate) struct World {
    pub(crate) scenario: Scenario,
    pub(crate) now: u64,
    pub(crate) t0: Instant,
    pub(crate) rng: Dice,
    pub(crate) device: Device,
    pub(crate) conns: Vec<Conn>,
    pub(crate) store: Store,
    pub(crate) ledger: Ledger,
    /// The hub's record of the device's desired and reported state.
    pub(crate) twin: Twin,
    pub(crate) partitioned_until: u64,
    pub(crate) verdicts: Vec<Verdict>,
    pub(crate) hub_params: SessionParams,
    /// Readings up to this value were checked to be stored.
    pub(crate) acked_checked: u64,
    /// Print every event (set `PAIR_TRACE=1`).
    pub(crate) trace: bool,
    pub(crate) knobs: Knobs,
    /// The offered image (empty: none).
    pub(crate) hub_image: Vec<u8>,
    /// The device reported the update succeeded.
    pub(crate) update_done: bool,
    /// Image bytes the hub sent, over all connections.
    pub(crate) image_bytes_sent: u64,
}

impl World {
    pub(crate) fn new(scenario: Scenario) -> World {
        World::with_knobs(scenario, CURRENT)
    }

    pub(crate) fn with_knobs(scenario: Scenario, knobs: Knobs) -> World {
        let hub_params = SessionParams {
            ping_interval: Duration::from_millis(PING_INTERVAL),
            pong_timeout: Duration::from_millis(PONG_TIMEOUT),
            hello_timeout: Duration::from_millis(HELLO_TIMEOUT),
            max_messages_per_sec: 100_000,
            command_window: scenario.command_window,
            ack_drain: Duration::from_millis(2_000),
        };
        let scenario_firmware = scenario.firmware;
        World {
            rng: Dice::seeded(scenario.seed),
            scenario,
            now: 0,
            t0: Instant::now(),
            device: Device {
                session: Session::with_reply_capacity(
                    device_config(knobs, scenario_firmware.is_some()),
                    MemOutbox::unbounded(),
                ),
                boot: 0,
                frozen_until: 0,
                conn: None,
                running: VecDeque::new(),
                runs: HashMap::new(),
                ran_this_boot: std::collections::HashSet::new(),
                settings: BTreeMap::new(),
                dedup_broken: None,
                next_value: 0,
                freezes: Vec::new(),
                deaf_until: 0,
                deafs: Vec::new(),
                image: Vec::new(),
                image_next: 0,
                image_outstanding: 0,
            },
            conns: Vec::new(),
            store: Store::default(),
            ledger: Ledger::default(),
            twin: Twin::default(),
            partitioned_until: 0,
            verdicts: Vec::new(),
            hub_params,
            acked_checked: 0,
            trace: std::env::var_os("PAIR_TRACE").is_some(),
            knobs,
            hub_image: scenario_image(&scenario_firmware),
            update_done: false,
            image_bytes_sent: 0,
        }
    }

    fn instant(&self) -> Instant {
        self.t0 + Duration::from_millis(self.now)
    }

    fn frozen(&self) -> bool {
        self.now < self.device.frozen_until
    }

    fn deaf(&self) -> bool {
        self.now < self.device.deaf_until
    }

    /// Runs the scenario, then the quiet period, checking invariants at every tick.
    pub(crate) fn run(&mut self) -> Result<(), TestCaseError> {
        let mut faults = self.scenario.faults.clone();
        faults.sort_by_key(|(t, _)| *t);
        let mut faults: VecDeque<_> = faults.into();
        let mut commands = self.scenario.commands.clone();
        commands.sort();
        let mut commands: VecDeque<_> = commands.into();
        let mut desired = self.scenario.desired.clone();
        desired.sort();
        let mut desired: VecDeque<_> = desired.into();
        let batches = self.scenario.duration / self.scenario.batch_every;
        let backlog = batches / WINDOW * (2 * MAX_LATENCY + 50);
        let end = self.scenario.duration + QUIET + backlog;
        while self.now <= end && !(self.now > self.scenario.duration && self.converged()) {
            if self.now < self.scenario.duration && self.now % self.scenario.batch_every == 0 {
                self.record();
            }
            while commands.front().is_some_and(|t| *t <= self.now) {
                commands.pop_front();
                self.create_command();
            }
            while desired.front().is_some_and(|(t, _, _)| *t <= self.now) {
                if let Some((_, key, value)) = desired.pop_front() {
                    self.change_desired(key, value);
                }
            }
            while faults.front().is_some_and(|(t, _)| *t <= self.now) {
                if let Some((_, fault)) = faults.pop_front() {
                    if self.trace {
                        eprintln!("{:>6} fault {fault:?}", self.now);
                    }
                    self.inject(fault);
                }
            }
            self.step();
            self.check_liveness()?;
            self.check_acked_is_stored()?;
            self.now += TICK;
        }
        self.check_converged()
    }

    fn record(&mut self) {
        let d = &mut self.device;
        let readings: Vec<Reading> = (0..self.scenario.readings_per_batch)
            .map(|_| {
                d.next_value += 1;
                Reading {
                    metric: truncated("m"),
                    ts: d.next_value,
                    value: d.next_value as f64,
                }
            })
            .collect();
        d.session.record(&readings).expect("RAM outbox");
    }

    fn create_command(&mut self) {
        let id = self
            .ledger
            .commands
            .keys()
            .next_back()
            .map_or(1, |id| id + 1);
        self.ledger.commands.insert(
            id,
            LedgerEntry {
                state: CommandState::Queued,
                deadline: None,
                created: self.now,
            },
        );
        for conn in &mut self.conns {
            if let (true, Some(hub)) = (conn.registered, conn.hub.as_mut()) {
                hub.handle_commands_ready();
            }
        }
    }

    /// An operator changes desired state; the device's connection, if any, is told.
    fn change_desired(&mut self, key: u8, value: Option<u8>) {
        let mut patch = serde_json::Map::new();
        patch.insert(
            format!("k{key}"),
            value.map_or(serde_json::Value::Null, serde_json::Value::from),
        );
        if self.twin.patch_desired(&patch).unwrap_or(false) {
            for conn in &mut self.conns {
                if let (true, Some(hub)) = (conn.registered, conn.hub.as_mut()) {
                    hub.handle_desired_changed();
                }
            }
        }
    }

    fn inject(&mut self, fault: Fault) {
        let now = self.now;
        match fault {
            Fault::Cut => {
                if let Some(c) = self.device.conn {
                    let conn = &mut self.conns[c];
                    if conn.blackholed.is_none() {
                        conn.up.clear();
                        conn.down.clear();
                        let at = now + self.rng.below(MAX_LATENCY);
                        conn.up.push_back((at, Up::Reset));
                        conn.down.push_back((at, Down::Reset));
                    }
                }
            }
            Fault::Blackhole => {
                if let Some(c) = self.device.conn {
                    self.blackhole(c);
                }
            }
            Fault::Freeze(ms) => {
                let until = (now + ms).max(self.device.frozen_until);
                self.device.freezes.push((now, until));
                self.device.frozen_until = until;
            }
            Fault::Deaf(ms) => {
                let until = (now + ms).max(self.device.deaf_until);
                self.device.deafs.push((now, until));
                self.device.deaf_until = until;
            }
            Fault::Reboot => {
                if let Some(c) = self.device.conn.take() {
                    self.blackhole(c);
                    self.conns[c].device_left = Some(now);
                }
                let outbox = std::mem::replace(
                    &mut self.device.session,
                    Session::with_reply_capacity(
                        device_config(self.knobs, self.scenario.firmware.is_some()),
                        MemOutbox::unbounded(),
                    ),
                )
                .into_outbox();
                self.device.session = Session::with_reply_capacity(
                    device_config(self.knobs, self.scenario.firmware.is_some()),
                    outbox,
                );
                self.device.boot += 1;
                self.device.running.clear();
                self.device.ran_this_boot.clear();
                self.device.settings.clear();
                // Power comes back at once: a freeze or a stuck read loop ends here.
                self.device.frozen_until = now;
                self.device.deaf_until = now;
                for (_, until) in self.device.freezes.iter_mut().chain(&mut self.device.deafs) {
                    *until = (*until).min(now);
                }
            }
            Fault::HubCrash => {
                self.store.queue.clear();
                for conn in &mut self.conns {
                    if conn.hub.take().is_some() && conn.blackholed.is_none() {
                        conn.up.clear();
                        conn.down.clear();
                        let at = now + self.rng.below(MAX_LATENCY);
                        conn.down.push_back((at, Down::Reset));
                    }
                    conn.registered = false;
                }
            }
            Fault::StoreFailure => self.store.fail_next = true,
            Fault::Partition(ms) => self.partitioned_until = now + ms,
        }
    }

    fn blackhole(&mut self, c: usize) {
        let conn = &mut self.conns[c];
        if conn.blackholed.is_none() {
            conn.blackholed = Some(self.now);
            conn.up.clear();
            conn.down.clear();
        }
    }

    /// One tick: the link, the store, the timers, and both sessions until quiet.
    fn step(&mut self) {
        self.ledger.time_out(WALL_EPOCH + self.now);
        self.commit();
        for c in 0..self.conns.len() {
            self.deliver_up(c);
        }
        if !self.frozen() {
            if !self.deaf() {
                self.deliver_down();
            }
            self.device_timers();
        }
        let now = self.instant();
        for c in 0..self.conns.len() {
            let conn = &mut self.conns[c];
            if let Some(hub) = conn.hub.as_mut() {
                if hub.has_batch() {
                    conn.backpressured = self.now;
                }
                hub.handle_timeout(now);
            }
            self.pump_hub(c);
        }
        if !self.frozen() {
            self.pump_device();
        }
    }

    fn commit(&mut self) {
        let due = self
            .store
            .queue
            .iter()
            .take_while(|s| s.at <= self.now)
            .count();
        if due == 0 {
            return;
        }
        let group: Vec<Submission> = self.store.queue.drain(..due).collect();
        let failed = std::mem::take(&mut self.store.fail_next);
        for s in group {
            // As the real writer does: nothing more of a connection that lost a batch.
            let failed =
                failed || (self.knobs.writer_skips_failed && self.conns[s.conn].slot_failed);
            if !failed && s.batch.seq > self.store.hwm {
                self.store.hwm = s.batch.seq;
                for r in &s.batch.readings {
                    let times = self.store.stored.entry(r.value as u64).or_default();
                    *times += 1;
                    if *times > 1 {
                        self.store.stored_twice.get_or_insert(r.value as u64);
                    }
                }
            }
            let conn = &mut self.conns[s.conn];
            if failed {
                conn.slot_failed = true;
            } else {
                conn.slot = conn.slot.max(s.batch.seq);
            }
            let acked = conn.slot;
            if let Some(hub) = conn.hub.as_mut() {
                hub.handle_stored(acked, failed);
            }
        }
    }

    fn deliver_up(&mut self, c: usize) {
        let now = self.instant();
        loop {
            let conn = &mut self.conns[c];
            let Some(hub) = conn.hub.as_mut() else {
                conn.up.clear();
                return;
            };
            if conn.up.front().is_none_or(|(t, _)| *t > self.now) {
                return;
            }
            // A frame that is a reset or close is seen even while the hub does not read.
            let is_data = matches!(conn.up.front(), Some((_, Up::Data(_)) | (_, Up::Pong(_))));
            if is_data && !hub.wants_read() {
                return;
            }
            let Some((_, frame)) = conn.up.pop_front() else {
                return;
            };
            if self.trace {
                eprintln!("{:>6} conn {c} up   {}", self.now, describe_up(&frame));
            }
            match frame {
                Up::Data(bytes) => hub.handle_frame(now, Inbound::Binary(&bytes)),
                Up::Pong(payload) => hub.handle_frame(now, Inbound::Pong(&payload)),
                Up::Close(code) => hub.handle_frame(now, Inbound::Close(Some(code))),
                Up::Reset => hub.handle_read_error(hub::device::session::ReadError::Reset),
            }
            self.pump_hub(c);
        }
    }

    fn deliver_down(&mut self) {
        while let Some(c) = self.device.conn {
            let conn = &mut self.conns[c];
            if conn.down.front().is_none_or(|(t, _)| *t > self.now) {
                return;
            }
            let Some((_, frame)) = conn.down.pop_front() else {
                return;
            };
            let now = self.now;
            if self.trace {
                eprintln!("{now:>6} conn {c} down {}", describe_down(&frame));
            }
            match frame {
                Down::Data(bytes) => {
                    let msg = decode_postcard::<HubMessage>(&bytes).expect("hub frames decode");
                    let arriving = match &msg {
                        HubMessage::Command(cmd) => Some(cmd.id),
                        _ => None,
                    };
                    let outcome = self.device.session.handle_message(now, msg);
                    if let Some(id) = arriving {
                        self.check_dedup(id, matches!(outcome, Ok(Delivered::Command(_))));
                    }
                    match outcome {
                        Ok(Delivered::Desired(d)) => {
                            for p in &d.properties {
                                if p.value == "null" {
                                    self.device.settings.remove(p.key.as_str());
                                } else {
                                    self.device
                                        .settings
                                        .insert(p.key.to_string(), p.value.to_string());
                                }
                                self.device
                                    .session
                                    .report_state(&p.key, &p.value)
                                    .expect("16 report slots");
                            }
                            if d.last {
                                self.device.session.applied(d.version);
                            }
                        }
                        Ok(Delivered::FirmwareOffer(offer)) => {
                            if !offer.version.is_empty() {
                                self.device.image_next = self.device.image.len() as u64;
                                self.device.image_outstanding = 0;
                                self.request_image(offer.size);
                            }
                        }
                        Ok(Delivered::FirmwareChunk(chunk)) => {
                            let d = &mut self.device;
                            d.image_outstanding = d.image_outstanding.saturating_sub(1);
                            // Chunks of one connection come in the order asked for; the
                            // device stores the next one and its offset (in flash).
                            if chunk.offset == d.image.len() as u64 {
                                d.image.extend_from_slice(chunk.data.as_slice());
                            }
                            let size = self.hub_image.len() as u64;
                            self.request_image(size);
                        }
                        Ok(Delivered::Command(cmd)) => {
                            *self
                                .device
                                .runs
                                .entry((self.device.boot, cmd.id))
                                .or_default() += 1;
                            let done = now + self.rng.below(50);
                            self.device.running.push_back((done, cmd.id));
                        }
                        Ok(_) => {}
                        Err(SessionError::Protocol(why)) => {
                            panic!("the hub broke the protocol: {why}")
                        }
                        Err(SessionError::Outbox(e)) => panic!("RAM outbox failed: {e:?}"),
                    }
                }
                Down::Ping(payload) => {
                    // The WebSocket layer answers pings on its own.
                    self.device.session.handle_activity(now);
                    self.conns[c].send_up(now, &mut self.rng, Up::Pong(payload));
                }
                Down::Close(code) => self.device_disconnected(DisconnectCause::Closed(code)),
                Down::Reset => self.device_disconnected(DisconnectCause::Io),
            }
            // Like the agent and the firmware while their uplink keeps up, the device sends
            // its replies after every frame, so its reply queue only fills while offline.
            self.pump_device();
        }
    }

    /// Keeps the device's window of image requests full, and reports the outcome once the
    /// image is complete.
    fn request_image(&mut self, size: u64) {
        let window = self.scenario.firmware.map_or(1, |(_, w)| w);
        let d = &mut self.device;
        if d.image.len() as u64 >= size {
            d.session
                .report_firmware(UPDATE_VERSION, schemas::UpdateState::Succeeded, 100, "");
            return;
        }
        while d.image_outstanding < window && d.image_next < size {
            if !d
                .session
                .request_firmware(UPDATE_VERSION, d.image_next, CHUNK)
            {
                break;
            }
            d.image_next += u64::from(CHUNK);
            d.image_outstanding += 1;
        }
        let percent = (d.image.len() as u64 * 100 / size) as u8;
        d.session.report_firmware(
            UPDATE_VERSION,
            schemas::UpdateState::Downloading,
            percent,
            "",
        );
    }

    /// Checks that a command runs at most once per boot of the device: the device forgets a
    /// command only when the hub said it is closed or its deadline has passed.
    fn check_dedup(&mut self, id: u64, run: bool) {
        let d = &mut self.device;
        if run && !d.ran_this_boot.insert(id) {
            d.dedup_broken
                .get_or_insert(format!("command {id} ran twice in boot {}", d.boot));
        }
    }

    fn device_disconnected(&mut self, cause: DisconnectCause) {
        if let Some(c) = self.device.conn.take() {
            self.conns[c].device_left = Some(self.now);
        }
        let random = self.rng.next() as u32;
        self.device
            .session
            .handle_disconnected(self.now, cause, random);
    }

    fn device_timers(&mut self) {
        let now = self.now;
        while self.device.running.front().is_some_and(|(t, _)| *t <= now) {
            if let Some((_, id)) = self.device.running.pop_front() {
                self.device.session.command_finished(id, true, 0, "done");
                self.pump_device();
            }
        }
        match self.device.session.handle_timeout(now) {
            Some(Action::Connect) => {
                if now < self.partitioned_until {
                    let random = self.rng.next() as u32;
                    self.device.session.handle_disconnected(
                        now,
                        DisconnectCause::ConnectFailed,
                        random,
                    );
                    return;
                }
                let hub = HubSession::new(
                    self.instant(),
                    Arc::from("pair-device"),
                    Encoding::Postcard,
                    self.hub_params.clone(),
                );
                self.conns.push(Conn {
                    hub: Some(hub),
                    up: VecDeque::new(),
                    down: VecDeque::new(),
                    blackholed: None,
                    device_left: None,
                    registered: false,
                    slot: 0,
                    slot_failed: false,
                    backpressured: 0,
                    opened: now,
                });
                self.device.conn = Some(self.conns.len() - 1);
                self.device.session.handle_connected(now);
            }
            Some(Action::Close(reason)) => {
                if let Some(c) = self.device.conn {
                    self.conns[c].send_up(now, &mut self.rng, Up::Close(reason.close_code()));
                }
                self.device_disconnected(DisconnectCause::Local(reason));
            }
            None => {}
        }
    }

    fn pump_device(&mut self) {
        let Some(c) = self.device.conn else {
            return;
        };
        while let Some(msg) = self.device.session.poll_transmit().expect("RAM outbox") {
            let bytes = encode_postcard_vec(&msg);
            self.conns[c].send_up(self.now, &mut self.rng, Up::Data(bytes));
        }
    }

    /// Performs the hub session's effects and sends its frames until it is quiet.
    fn pump_hub(&mut self, c: usize) {
        loop {
            let mut progressed = false;
            let Some(hub) = self.conns[c].hub.as_mut() else {
                return;
            };
            let mut effects = Vec::new();
            while let Some(effect) = hub.poll_effect() {
                effects.push(effect);
            }
            for effect in effects {
                progressed = true;
                self.perform(c, effect);
            }
            let conn = &mut self.conns[c];
            let Some(hub) = conn.hub.as_mut() else {
                return;
            };
            let frames: Vec<Down> = std::iter::from_fn(|| hub.poll_transmit())
                .map(|transmit| match transmit {
                    Transmit::Message(msg) => Down::Data(encode_postcard_vec(&*msg)),
                    Transmit::Ack(ack) => Down::Data(encode_postcard_vec(&HubMessage::Ack(ack))),
                    Transmit::Ping(payload) => Down::Ping(payload),
                })
                .collect();
            for frame in frames {
                progressed = true;
                conn.send_down(self.now, &mut self.rng, frame);
            }
            let Some(hub) = conn.hub.as_mut() else {
                return;
            };
            // As the connection task does: a chunk only when nothing else is waiting.
            if hub.has_chunk_due() {
                hub.handle_chunk_due();
                progressed = true;
            }
            if hub.has_batch() && self.store.queue.len() < INGEST_QUEUE {
                if let Some(batch) = hub.take_batch() {
                    progressed = true;
                    let at = self
                        .store
                        .queue
                        .back()
                        .map_or(0, |s| s.at)
                        .max(self.now + 1 + self.rng.below(40));
                    self.store
                        .queue
                        .push_back(Submission { conn: c, batch, at });
                }
            }
            if let Some(end) = hub.end().cloned() {
                let frame = match end.code {
                    Some(code) => Down::Close(code),
                    None => Down::Reset,
                };
                conn.send_down(self.now, &mut self.rng, frame);
                conn.hub = None;
                conn.registered = false;
                self.verdicts.push(Verdict {
                    conn: c,
                    at: self.now,
                    cause: end.cause,
                });
                return;
            }
            if !progressed {
                return;
            }
        }
    }

    fn perform(&mut self, c: usize, effect: Effect) {
        let now = self.instant();
        let window = self.scenario.command_window;
        match effect {
            Effect::Start(_) => {
                // The newest connection holds the device's presence; an older one is
                // superseded.
                for (i, other) in self.conns.iter_mut().enumerate() {
                    if i != c && other.registered {
                        if let Some(hub) = other.hub.as_mut() {
                            hub.handle_kick(close::SUPERSEDED, "superseded");
                        }
                        other.registered = false;
                    }
                }
                let conn = &mut self.conns[c];
                conn.registered = true;
                conn.slot = self.store.hwm;
                let hwm = self.store.hwm;
                if let Some(hub) = conn.hub.as_mut() {
                    hub.handle_started(now, WALL_EPOCH + self.now, Ok(hwm));
                }
                for i in 0..self.conns.len() {
                    if i != c {
                        self.pump_hub(i);
                    }
                }
            }
            Effect::FetchCommands => {
                let open = self.ledger.open(window, WALL_EPOCH + self.now);
                if let Some(hub) = self.conns[c].hub.as_mut() {
                    hub.handle_deliverable(open);
                }
            }
            Effect::CommandSent(id) => {
                if let Some(entry) = self.ledger.commands.get_mut(&id) {
                    if entry.state == CommandState::Queued {
                        entry.state = CommandState::Sent;
                    }
                    entry
                        .deadline
                        .get_or_insert(WALL_EPOCH + self.now + COMMAND_TIMEOUT);
                }
            }
            Effect::CommandAcked(id) => {
                if let Some(entry) = self.ledger.commands.get_mut(&id) {
                    if matches!(entry.state, CommandState::Queued | CommandState::Sent) {
                        entry.state = CommandState::Acked;
                    }
                }
            }
            Effect::CommandFinished(result) => {
                let taken = match self.ledger.commands.get_mut(&result.id) {
                    Some(entry) if entry.state.is_open() => {
                        entry.state = CommandState::Succeeded;
                        true
                    }
                    _ => false,
                };
                if let Some(hub) = self.conns[c].hub.as_mut() {
                    if taken {
                        hub.handle_result_recorded(result.id);
                    } else {
                        hub.handle_result_ignored(result.id);
                    }
                    // The ledger's window slid: the hub looks again.
                    hub.handle_commands_ready();
                }
            }
            Effect::FetchDesired { full } => {
                let version = self.twin.desired_version;
                if let (Some(keys), Some(hub)) =
                    (self.twin.outgoing(full), self.conns[c].hub.as_mut())
                {
                    hub.handle_desired(version, &keys);
                }
            }
            Effect::StoreApplied(applied) => {
                let values = twin::applied_values(&applied);
                self.twin.apply_report(applied.version, &values, &[]);
                if self.twin.reported_stale(&values) {
                    if let Some(hub) = self.conns[c].hub.as_mut() {
                        hub.handle_desired_changed();
                    }
                }
            }
            Effect::FetchOffer => {
                let offer = (!self.hub_image.is_empty() && !self.update_done).then(|| {
                    schemas::FirmwareOffer {
                        version: truncated(UPDATE_VERSION),
                        size: self.hub_image.len() as u64,
                        sha256: truncated("00"),
                        signature: truncated("00"),
                    }
                });
                if let Some(hub) = self.conns[c].hub.as_mut() {
                    hub.handle_offer(offer);
                }
            }
            Effect::ReadChunk(request) => {
                let start = (request.offset as usize).min(self.hub_image.len());
                let end = (start + request.len as usize).min(self.hub_image.len());
                self.image_bytes_sent += (end - start) as u64;
                let bytes = self.hub_image[start..end].to_vec();
                if let Some(hub) = self.conns[c].hub.as_mut() {
                    hub.handle_chunk_read(&request, Ok(&bytes));
                }
            }
            Effect::StoreFirmwareStatus(status) => {
                if status.state == schemas::UpdateState::Succeeded {
                    self.update_done = true;
                    if let Some(hub) = self.conns[c].hub.as_mut() {
                        hub.handle_offer_changed();
                    }
                }
            }
            Effect::StoreState(_) | Effect::Rtt(_) => {}
        }
    }

    /// When the device side of connection `c` stopped answering, if it did: the link went
    /// silent, the device left it, or the device has been frozen (or deaf) since.
    fn silent_since(&self, c: usize) -> Option<u64> {
        let conn = &self.conns[c];
        let frozen = self
            .device
            .freezes
            .iter()
            .chain(&self.device.deafs)
            .filter(|(from, until)| *from <= self.now && self.now < *until)
            .map(|(from, _)| *from)
            .min();
        [conn.blackholed, conn.device_left, frozen]
            .into_iter()
            .flatten()
            .min()
    }

    fn check_liveness(&self) -> Result<(), TestCaseError> {
        let bound = PING_INTERVAL + PONG_TIMEOUT + MAX_LATENCY + 2 * TICK;
        for (c, conn) in self.conns.iter().enumerate() {
            if let Some(hub) = &conn.hub {
                if !hub.is_ready() {
                    prop_assert!(
                        self.now <= conn.opened + HELLO_TIMEOUT + TICK,
                        "connection {c} opened at {} ms still waits for hello at {} ms",
                        conn.opened,
                        self.now
                    );
                } else if let Some(since) = self.silent_since(c) {
                    // A device that does not read can still open a connection (its own
                    // silence timer closes the old one): silence on it starts when it opened.
                    let since = since.max(conn.opened).max(conn.backpressured);
                    prop_assert!(
                        self.now <= since + bound,
                        "connection {c} silent since {since} ms is still alive at {} ms",
                        self.now
                    );
                }
            }
        }
        for v in &self.verdicts {
            if v.cause != "pong_timeout" {
                continue;
            }
            // A pong timeout needs a silence that began before the pong was due.
            let conn = &self.conns[v.conn];
            let window_start =
                v.at.saturating_sub(PING_INTERVAL + PONG_TIMEOUT + 2 * MAX_LATENCY);
            let frozen = self
                .device
                .freezes
                .iter()
                .chain(&self.device.deafs)
                .any(|(from, until)| *from <= v.at && *until >= window_start);
            let silenced = [conn.blackholed, conn.device_left]
                .into_iter()
                .flatten()
                .any(|t| t <= v.at);
            prop_assert!(
                frozen || silenced,
                "connection {} declared dead at {} ms while the device answered",
                v.conn,
                v.at
            );
        }
        Ok(())
    }

    /// Every reading the device dropped from its outbox (because the hub acknowledged it)
    /// is stored, and no reading is stored twice. Checks only what is new since the last
    /// tick, so a long scenario stays fast.
    fn check_acked_is_stored(&mut self) -> Result<(), TestCaseError> {
        prop_assert_eq!(self.store.stored_twice, None, "a reading was stored twice");
        let pending_from = self
            .device
            .session
            .outbox()
            .batches()
            .next()
            .and_then(|(_, readings)| readings.first())
            .map_or(self.device.next_value + 1, |r| r.value as u64);
        while self.acked_checked + 1 < pending_from {
            self.acked_checked += 1;
            let value = self.acked_checked;
            let times = self.store.stored.get(&value).copied().unwrap_or(0);
            prop_assert_eq!(times, 1, "acked reading {} stored {} times", value, times);
        }
        Ok(())
    }

    fn converged(&self) -> bool {
        self.device.session.outbox().is_empty()
            && self.device.running.is_empty()
            && self.ledger.commands.values().all(|c| !c.state.is_open())
            && !self.twin.needs_sync()
            && self.device_matches_desired()
            && (self.hub_image.is_empty() || self.update_done)
    }

    /// Whether the device's settings are what desired state says.
    fn device_matches_desired(&self) -> bool {
        let want: BTreeMap<String, String> = self
            .twin
            .desired
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect();
        want == self.device.settings
    }

    fn check_converged(&self) -> Result<(), TestCaseError> {
        prop_assert!(
            self.device.session.outbox().is_empty(),
            "{} batches never acknowledged",
            self.device.session.outbox().len()
        );
        prop_assert_eq!(
            self.store.stored.len() as u64,
            self.device.next_value,
            "stored readings"
        );
        prop_assert_eq!(self.device.dedup_broken.clone(), None);
        // Desired state reached the device, and the hub knows it.
        prop_assert!(
            self.twin.delta().is_empty(),
            "desired {:?} but reported {:?}",
            self.twin.desired,
            self.twin.reported
        );
        prop_assert_eq!(self.twin.reported_version, self.twin.desired_version);
        // The update arrived whole and right, and a reconnect resumed it rather than
        // starting over: the hub sent the image once, plus at most one window per
        // connection that broke with requests outstanding.
        if let Some((size, window)) = self.scenario.firmware {
            prop_assert!(self.update_done, "the update never finished");
            prop_assert!(
                self.device.image == self.hub_image,
                "the device's image differs"
            );
            let bound = size + self.conns.len() as u64 * u64::from(window * CHUNK);
            prop_assert!(
                self.image_bytes_sent <= bound,
                "{} image bytes sent for {} over {} connections",
                self.image_bytes_sent,
                size,
                self.conns.len()
            );
        }
        prop_assert!(
            self.device_matches_desired(),
            "device has {:?}, desired {:?}",
            self.device.settings,
            self.twin.desired
        );
        // Every command is closed. One created once the faults were over (and the device
        // had time to reconnect) succeeded; an earlier one may have timed out.
        let calm = self
            .scenario
            .faults
            .iter()
            .map(|(t, f)| match f {
                Fault::Freeze(ms) | Fault::Deaf(ms) | Fault::Partition(ms) => t + ms,
                _ => *t,
            })
            .max()
            .unwrap_or(0)
            + RECONNECT_SETTLE;
        for (id, c) in &self.ledger.commands {
            prop_assert!(!c.state.is_open(), "command {} is still {:?}", id, c.state);
            if c.created >= calm {
                prop_assert_eq!(
                    c.state,
                    CommandState::Succeeded,
                    "command {} created at {} ms, after the faults",
                    id,
                    c.created
                );
            }
        }
        Ok(())
    }
}

fn scenario_image(firmware: &Option<(u64, u32)>) -> Vec<u8> {
    firmware.map_or_else(Vec::new, |(size, _)| update_image(size))
}

pub(crate) fn describe_up(frame: &Up) -> String {
    match frame {
        Up::Data(bytes) => format!("{:?}", decode_postcard::<schemas::DeviceMessage>(bytes)),
        other => format!("{other:?}"),
    }
}

pub(crate) fn describe_down(frame: &Down) -> String {
    match frame {
        Down::Data(bytes) => format!("{:?}", decode_postcard::<HubMessage>(bytes)),
        other => format!("{other:?}"),
    }
}

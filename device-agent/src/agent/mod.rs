//! The agent's event loop: one task that owns the [`Session`] (and through it the disk
//! queue) and feeds it everything that happens — sensor samples, frames from the hub,
//! finished commands, timers — then sends what the session asks for.
//!
//! ```text
//! sensors ──samples (64)──▶ ┌──────────────┐ ──frames (16)──▶ writer task ──▶ hub
//!                           │  event loop  │ ◀──────────────── WebSocket reads
//! actions ──results (64)──▶ │  Session +   │ ──spawn──▶ connect task (TCP, TLS, upgrade)
//!                           │  DiskQueue   │ ──spawn──▶ action tasks (≤ max_concurrent)
//!                           └──────────────┘
//! ```
//!
//! Every channel is bounded. The frame channel to the writer is only offered a message
//! when it has room ([`mpsc::Sender::try_reserve`]), so when the hub stops reading (its
//! store is busy, TCP pushes back) the loop stops taking messages from the session and keeps
//! recording readings to disk; nothing queues up in memory.
//!
//! Firmware updates ([`crate::update`]) run in the loop too: chunks are written as they
//! arrive, the next requests go to the session (which sends them after telemetry), and
//! the install program runs as a task whose outcome comes back as an event.
//!
//! Time for the session is milliseconds since the agent started (monotonic); randomness
//! for the backoff jitter comes from the OS (`ring::rand::SystemRandom`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use schemas::codec::{encode_json, encode_postcard_vec};
use schemas::limits::MAX_READINGS;
use schemas::link::{self, DataFrame};
use schemas::message::truncated;
use schemas::session::{
    Action, CloseReason, Delivered, DisconnectCause, Outbox, Session, SessionConfig, SessionError,
};
use schemas::{close, Command, DeviceMessage, Encoding, HubMessage, Reading, UpdateState};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::{JoinError, JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::actions::{Outcome, REFUSED};
use crate::commands::{Commands, Dispatch};
use crate::config::AgentConfig;
use crate::queue::{DiskQueue, QueueError, QueueLimits};
use crate::sensors::{self, Sample};
use crate::transport::{self, ConnectError, Ws};

/// Capacity of the channel to the writer task, in frames.
const FRAME_CHANNEL: usize = 16;
/// Capacity of the channel of finished commands.
const RESULT_CHANNEL: usize = 64;
/// Most samples taken from the sensor channel before recording them (one fsync per
/// batch of up to 64 readings).
const SAMPLES_PER_ROUND: usize = 64;

/// Least time between two reports of the agent's own readings caused by drops.
const DROP_REPORT_SPACING: Duration = Duration::from_secs(5);

/// Why the agent could not run.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The queue could not be opened.
    #[error("store-and-forward queue: {0}")]
    Queue(#[from] QueueError),
    /// The firmware download directory could not be opened.
    #[error(transparent)]
    Firmware(#[from] crate::update::UpdateError),
}

/// Milliseconds since the agent started, the session's clock.
struct Clock {
    start: Instant,
}

impl Clock {
    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn instant(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }
}

/// Runs `f`, which may fsync, without stalling the other tasks on this worker thread.
fn blocking<R>(f: impl FnOnce() -> R) -> R {
    let multi = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

/// The open connection, split so that the event loop can wait on each part.
#[derive(Default)]
struct Conn {
    rx: Option<SplitStream<Ws>>,
    tx: Option<mpsc::Sender<Message>>,
    writer: Option<JoinHandle<Result<(), String>>>,
    /// The frame channel was full: wait for room before polling the session again.
    blocked: bool,
}

impl Conn {
    fn open(ws: Ws) -> Conn {
        let (sink, stream) = ws.split();
        let (tx, rx) = mpsc::channel(FRAME_CHANNEL);
        Conn {
            rx: Some(stream),
            tx: Some(tx),
            writer: Some(tokio::spawn(writer(sink, rx))),
            blocked: false,
        }
    }

    fn is_open(&self) -> bool {
        self.rx.is_some()
    }

    /// Sends a close frame (if there is room) and lets the writer finish within
    /// [`transport::CLOSE_TIMEOUT`]; returns a handle to wait for that.
    fn close(&mut self, code: u16, reason: &str) -> Option<JoinHandle<()>> {
        self.rx = None;
        self.blocked = false;
        if let Some(tx) = self.tx.take() {
            let _ = tx.try_send(Message::Close(Some(CloseFrame {
                code: CloseCode::from(code),
                reason: reason.into(),
            })));
        }
        let writer = self.writer.take()?;
        let abort = writer.abort_handle();
        Some(tokio::spawn(async move {
            if tokio::time::timeout(transport::CLOSE_TIMEOUT, writer)
                .await
                .is_err()
            {
                abort.abort();
            }
        }))
    }

    /// The hub closed: let the close handshake finish in the background (bounded by
    /// [`transport::CLOSE_TIMEOUT`]); the writer ends when its channel is dropped.
    fn finish_peer_close(&mut self) {
        self.tx = None;
        self.blocked = false;
        if let Some(mut rx) = self.rx.take() {
            tokio::spawn(async move {
                let drain = async { while rx.next().await.is_some() {} };
                let _ = tokio::time::timeout(transport::CLOSE_TIMEOUT, drain).await;
            });
        }
        if let Some(writer) = self.writer.take() {
            let abort = writer.abort_handle();
            tokio::spawn(async move {
                if tokio::time::timeout(transport::CLOSE_TIMEOUT, writer)
                    .await
                    .is_err()
                {
                    abort.abort();
                }
            });
        }
    }

    /// The connection broke: drop everything now.
    fn drop_now(&mut self) {
        self.rx = None;
        self.tx = None;
        self.blocked = false;
        if let Some(w) = self.writer.take() {
            w.abort();
        }
    }
}

/// Sends frames in order; a close frame ends it. Dropping the channel closes the sink.
async fn writer(
    mut sink: SplitSink<Ws, Message>,
    mut rx: mpsc::Receiver<Message>,
) -> Result<(), String> {
    while let Some(msg) = rx.recv().await {
        let closing = matches!(msg, Message::Close(_));
        sink.send(msg).await.map_err(|e| e.to_string())?;
        if closing {
            return Ok(());
        }
    }
    let _ = sink.close().await;
    Ok(())
}

async fn join_opt<T>(handle: &mut Option<JoinHandle<T>>) -> Result<T, JoinError> {
    match handle {
        Some(h) => h.await,
        None => std::future::pending().await,
    }
}

async fn next_frame(rx: &mut Option<SplitStream<Ws>>) -> Option<Result<Message, WsError>> {
    match rx {
        Some(r) => r.next().await,
        None => std::future::pending().await,
    }
}

async fn room(tx: &Option<mpsc::Sender<Message>>) {
    match tx {
        Some(tx) => {
            // Wait for room and give it back at once: the loop takes it with try_reserve.
            let _ = tx.reserve().await;
        }
        None => std::future::pending().await,
    }
}

async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

enum Event {
    Shutdown,
    Connected(Box<Result<Result<Ws, ConnectError>, JoinError>>),
    Frame(Option<Result<Message, WsError>>),
    WriterEnded(Result<Result<(), String>, JoinError>),
    Room,
    Samples(Option<Sample>),
    Finished(Option<(u64, String, Outcome)>),
    Applied(Option<DesiredApplied>),
    Installed(Option<crate::update::Outcome>),
    Reaped,
    Report,
    Timer,
}

/// Command acks and results that can wait while the hub is unreachable: an agent may run
/// several long actions at once, and a Linux host can afford the 16 KiB.
const AGENT_REPLIES: usize = 16;

/// Desired-state keys the agent can report applied or refused in one `Applied` answer.
const AGENT_STATES: usize = schemas::limits::MAX_PROPERTIES;

/// What the desired-state program made of one hub message's keys.
#[derive(Debug)]
struct DesiredApplied {
    version: u64,
    last: bool,
    applied: Vec<(String, String)>,
    refused: Vec<(String, String)>,
}

/// The event loop's state.
struct Agent {
    config: Arc<AgentConfig>,
    session: Session<DiskQueue, AGENT_REPLIES, AGENT_STATES>,
    clock: Clock,
    rng: ring::rand::SystemRandom,
    conn: Conn,
    connecting: Option<JoinHandle<Result<Ws, ConnectError>>>,
    commands: Commands,
    slots: Arc<Semaphore>,
    running: JoinSet<()>,
    results: mpsc::Sender<(u64, String, Outcome)>,
    desired_done: mpsc::Sender<DesiredApplied>,
    /// Firmware downloads (`None`: no `[update] key`, the capability is not announced).
    download: Option<crate::update::Download>,
    /// The version the install program is running for.
    installing: Option<String>,
    /// The download percentage last reported, so a status goes out per percent, not
    /// per chunk.
    reported_percent: Option<u8>,
    /// Where the install task sends the program's outcome.
    install_done: mpsc::Sender<crate::update::Outcome>,
    /// Readings per batch: the protocol's 64, or less if the hub says so.
    batch_limit: usize,
    /// Record the agent's own readings at the next turn (after the queue dropped some).
    report_soon: bool,
    /// Consecutive failed connections (for the log level).
    failures: u32,
    /// When the agent last recorded its own readings.
    last_report: Instant,
}

/// Runs the agent until `shutdown` completes.
///
/// # Errors
/// The queue could not be opened (another agent holds it, or the disk fails).
///
/// Cancel safety: not cancel safe: dropping it abandons the connection without a close
/// frame (readings already recorded are on disk and are re-sent by the next run). Complete
/// `shutdown` instead.
pub async fn run(
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let config = Arc::new(config);
    let queue = DiskQueue::open(
        &config.queue_dir(),
        QueueLimits {
            max_bytes: config.queue.max_bytes,
            max_batches: config.queue.max_batches,
        },
    )?;
    let stats = queue.stats();
    tracing::info!(
        device = %config.hub.device_id,
        hub = %config.hub.url,
        encoding = config.hub.encoding.subprotocol(),
        queue = %queue.dir().display(),
        waiting_batches = stats.batches,
        next_seq = stats.next_seq,
        dropped_readings = stats.dropped_readings,
        sensors = config.sensors.len(),
        actions = config.actions.len(),
        "device-agent {} starting", crate::VERSION
    );
    let mut session_config = SessionConfig::new(&format!("device-agent/{}", crate::VERSION));
    let _ = session_config
        .capabilities
        .push(truncated(schemas::capability::DESIRED));
    let download = match config.update.public_key() {
        Some(key) => {
            let _ = session_config
                .capabilities
                .push(truncated(schemas::capability::FIRMWARE));
            Some(crate::update::Download::open(&config.firmware_dir(), key)?)
        }
        None => None,
    };
    session_config.backoff_initial_ms = millis(config.reconnect.initial);
    session_config.backoff_max_ms = millis(config.reconnect.max);
    session_config.refused_backoff_ms = millis(config.reconnect.refused);
    let session = Session::with_reply_capacity(session_config, queue);

    let (sample_tx, mut sample_rx) = mpsc::channel(sensors::CHANNEL);
    let handles = sensors::spawn_all(&config.sensors, &sample_tx);
    // Only the sensors hold senders now: recv() ends if they all stop.
    drop(sample_tx);
    let (results, mut result_rx) = mpsc::channel(RESULT_CHANNEL);
    let (desired_done, mut desired_rx) = mpsc::channel(RESULT_CHANNEL);
    let (install_done, mut install_rx) = mpsc::channel(1);
    let mut agent = Agent {
        commands: Commands::new(config.clone(), handles),
        slots: Arc::new(Semaphore::new(config.commands.max_concurrent)),
        config,
        session,
        clock: Clock {
            start: Instant::now(),
        },
        rng: ring::rand::SystemRandom::new(),
        conn: Conn::default(),
        connecting: None,
        running: JoinSet::new(),
        results,
        desired_done,
        download,
        installing: None,
        reported_percent: None,
        install_done,
        batch_limit: MAX_READINGS,
        report_soon: false,
        failures: 0,
        last_report: Instant::now(),
    };
    let mut report = tokio::time::interval_at(
        Instant::now() + agent.config.queue.report_interval,
        agent.config.queue.report_interval,
    );
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut samples_open = true;
    tokio::pin!(shutdown);

    loop {
        agent.drive_timers();
        agent.pump();
        // After the queue dropped readings, report the new total soon, at most once per
        // DROP_REPORT_SPACING: each report is a batch too, and when the queue is full it
        // pushes out another one.
        if agent.report_soon && agent.last_report.elapsed() >= DROP_REPORT_SPACING {
            agent.report_soon = false;
            agent.record_own_readings();
        }
        let mut wake = agent.session.poll_timeout().map(|t| agent.clock.instant(t));
        if agent.report_soon {
            let at = agent.last_report + DROP_REPORT_SPACING;
            wake = Some(wake.map_or(at, |w| w.min(at)));
        }
        let event = tokio::select! {
            () = &mut shutdown => Event::Shutdown,
            r = join_opt(&mut agent.connecting) => Event::Connected(Box::new(r)),
            f = next_frame(&mut agent.conn.rx) => Event::Frame(f),
            w = join_opt(&mut agent.conn.writer) => Event::WriterEnded(w),
            () = room(&agent.conn.tx), if agent.conn.blocked => Event::Room,
            s = sample_rx.recv(), if samples_open => Event::Samples(s),
            r = result_rx.recv() => Event::Finished(r),
            d = desired_rx.recv() => Event::Applied(d),
            i = install_rx.recv() => Event::Installed(i),
            Some(_) = agent.running.join_next(), if !agent.running.is_empty() => Event::Reaped,
            _ = report.tick() => Event::Report,
            () = sleep_opt(wake) => Event::Timer,
        };
        match event {
            Event::Shutdown => break,
            Event::Connected(r) => {
                agent.connecting = None;
                agent.on_connected(*r);
            }
            Event::Frame(f) => agent.on_frame(f),
            Event::WriterEnded(r) => {
                let why = match r {
                    Ok(Ok(())) => "the writer stopped".to_string(),
                    Ok(Err(e)) => e,
                    Err(e) => e.to_string(),
                };
                agent.conn.drop_now();
                agent.disconnected(DisconnectCause::Io, &format!("sending failed: {why}"));
            }
            Event::Room => agent.conn.blocked = false,
            Event::Samples(None) => samples_open = false,
            Event::Samples(Some(first)) => {
                let mut readings = first.readings;
                for _ in 1..SAMPLES_PER_ROUND {
                    match sample_rx.try_recv() {
                        Ok(s) => readings.extend(s.readings),
                        Err(_) => break,
                    }
                }
                agent.record(&readings, true);
            }
            Event::Finished(Some((id, name, out))) => {
                tracing::info!(id, command = %name, ok = out.ok, code = out.code, "command finished");
                agent
                    .session
                    .command_finished(id, out.ok, out.code, &out.output);
            }
            Event::Applied(Some(done)) => agent.desired_applied(done),
            Event::Installed(Some(outcome)) => agent.installed(outcome),
            Event::Finished(None)
            | Event::Applied(None)
            | Event::Installed(None)
            | Event::Reaped
            | Event::Timer => {}
            Event::Report => agent.record_own_readings(),
        }
    }
    agent.shutdown(&mut sample_rx).await;
    Ok(())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn encode(encoding: Encoding, msg: &DeviceMessage) -> Message {
    match encoding {
        Encoding::Postcard => Message::binary(encode_postcard_vec(msg)),
        Encoding::Json => Message::text(encode_json(msg)),
    }
}

impl Agent {
    fn random(&self) -> u32 {
        match ring::rand::generate::<[u8; 4]>(&self.rng) {
            Ok(b) => u32::from_le_bytes(b.expose()),
            // The OS RNG failing is near impossible; time still spreads devices apart.
            Err(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0),
        }
    }

    fn drive_timers(&mut self) {
        let now = self.clock.now();
        while let Some(action) = self.session.handle_timeout(now) {
            match action {
                Action::Connect => {
                    tracing::debug!(hub = %self.config.hub.url, "connecting");
                    let hub = self.config.hub.clone();
                    self.connecting =
                        Some(tokio::spawn(async move { transport::connect(&hub).await }));
                }
                Action::Close(reason) => {
                    let why = match reason {
                        CloseReason::HubSilent => {
                            "nothing heard from the hub (not even a ping) in time"
                        }
                        CloseReason::WelcomeTimeout => "the hub did not answer hello in time",
                        CloseReason::ProtocolViolation => "the hub broke the protocol",
                    };
                    self.close(reason.close_code(), why);
                    self.disconnected(DisconnectCause::Local(reason), why);
                }
            }
        }
    }

    /// Closes the connection ourselves (the session is told separately).
    fn close(&mut self, code: u16, reason: &str) {
        // The close completes in the background, bounded by CLOSE_TIMEOUT.
        let _ = self.conn.close(code, transport_reason(reason));
    }

    /// Tells the session the connection is gone and logs when the next attempt is.
    fn disconnected(&mut self, cause: DisconnectCause, detail: &str) {
        let now = self.clock.now();
        let random = self.random();
        self.session.handle_disconnected(now, cause, random);
        let delay = self
            .session
            .poll_timeout()
            .map_or(0, |t| t.saturating_sub(now));
        let retry = humantime::format_duration(Duration::from_millis(delay));
        let waiting = self.session.outbox().len();
        match cause {
            DisconnectCause::Refused => tracing::error!(
                waiting_batches = waiting,
                "{detail}; retrying slowly, next attempt in {retry}"
            ),
            DisconnectCause::Closed(close::SUPERSEDED) | DisconnectCause::Closed(close::POLICY) => {
                tracing::error!(
                    waiting_batches = waiting,
                    "{detail}; next attempt in {retry}"
                )
            }
            // The first failure of a series is a warning; the retries that follow are
            // routine while the hub is away (one line each, at most one a minute).
            _ if self.failures == 0 => tracing::warn!(
                waiting_batches = waiting,
                "{detail}; readings wait on disk, next attempt in {retry}"
            ),
            _ => tracing::info!(
                waiting_batches = waiting,
                failures = self.failures,
                "{detail}; next attempt in {retry}"
            ),
        }
        self.failures += 1;
    }

    fn on_connected(&mut self, r: Result<Result<Ws, ConnectError>, JoinError>) {
        match r {
            Ok(Ok(ws)) => {
                tracing::debug!("WebSocket open, sending hello");
                self.conn = Conn::open(ws);
                self.session.handle_connected(self.clock.now());
            }
            Ok(Err(e)) => self.disconnected(e.cause, &e.detail),
            Err(e) => self.disconnected(
                DisconnectCause::ConnectFailed,
                &format!("connect task failed: {e}"),
            ),
        }
    }

    fn on_frame(&mut self, frame: Option<Result<Message, WsError>>) {
        let now = self.clock.now();
        let encoding = self.config.hub.encoding;
        let data = match &frame {
            Some(Ok(Message::Binary(b))) => DataFrame::Binary(b),
            Some(Ok(Message::Text(t))) => DataFrame::Text(t.as_str()),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {
                self.session.handle_activity(now);
                return;
            }
            Some(Ok(Message::Close(close_frame))) => {
                let (code, reason) = close_frame
                    .as_ref()
                    .map(|f| (Some(u16::from(f.code)), f.reason.to_string()))
                    .unwrap_or((None, String::new()));
                // tungstenite queues the answering close frame; keep reading briefly so
                // that it goes out, then the stream ends.
                self.conn.finish_peer_close();
                let cause = link::peer_closed(code);
                let code = code.unwrap_or(close::NO_STATUS);
                let meaning = link::close_meaning(code);
                // The hub's own reason often says the same as the code's meaning.
                let text = if reason.is_empty() || reason == meaning {
                    format!("hub closed the connection with {code} ({meaning})")
                } else {
                    format!("hub closed the connection with {code} ({meaning}: {reason})")
                };
                self.disconnected(cause, &text);
                return;
            }
            Some(Err(e)) => {
                let text = format!("connection lost: {e}");
                self.conn.drop_now();
                self.disconnected(DisconnectCause::Io, &text);
                return;
            }
            None => {
                self.conn.drop_now();
                self.disconnected(
                    DisconnectCause::Io,
                    "connection ended without a close frame",
                );
                return;
            }
        };
        let msg = match link::decode_frame::<HubMessage>(encoding, data) {
            Ok(m) => m,
            Err(refused) => {
                let why = match &refused.error {
                    Some(err) => format!("{}: {err}", refused.reason),
                    None => refused.reason.to_string(),
                };
                self.protocol_error(refused.code, &format!("from the hub: {why}"));
                return;
            }
        };
        let result = blocking(|| self.session.handle_message(now, msg));
        match result {
            Ok(Delivered::Nothing) => {}
            Ok(Delivered::Welcome(w)) => {
                self.failures = 0;
                self.batch_limit = usize::from(w.max_readings).clamp(1, MAX_READINGS);
                let stats = self.session.outbox().stats();
                tracing::info!(
                    hub_last_seq = w.last_seq,
                    waiting_batches = stats.batches,
                    next_seq = stats.next_seq,
                    "connected to the hub"
                );
            }
            Ok(Delivered::Command(cmd)) => self.on_command(cmd),
            Ok(Delivered::Desired(desired)) => self.on_desired(desired),
            Ok(Delivered::Error(e)) => {
                tracing::warn!(code = e.code, "the hub reported an error: {}", e.message);
            }
            Ok(Delivered::FirmwareOffer(offer)) => self.on_firmware_offer(&offer),
            Ok(Delivered::FirmwareChunk(chunk)) => {
                let step = self
                    .download
                    .as_mut()
                    .filter(|_| self.installing.is_none())
                    .map(|d| blocking(|| d.chunk(&chunk)));
                if let Some(step) = step {
                    self.firmware_step(&chunk.version, step);
                }
            }
            Err(SessionError::Protocol(why)) => self.protocol_error(close::PROTOCOL_VIOLATION, why),
            Err(SessionError::Outbox(e)) => {
                tracing::error!("store-and-forward queue failed: {e}");
                self.close(close::INTERNAL, "device storage failed");
                self.disconnected(DisconnectCause::Io, "closed after a storage failure");
            }
        }
    }

    /// Applies desired state: `sensors.NAME.interval` here and now; any other key through
    /// `[desired] program`, in a task (it may take a while), whose outcome comes back as
    /// [`Event::Applied`]. Refusals carry the reason.
    fn on_desired(&mut self, desired: schemas::Desired) {
        let mut done = DesiredApplied {
            version: desired.version,
            last: desired.last,
            applied: Vec::new(),
            refused: Vec::new(),
        };
        let mut external = Vec::new();
        for p in &desired.properties {
            let (key, value) = (p.key.to_string(), p.value.to_string());
            match self.apply_interval(&key, &value) {
                Some(Ok(())) => done.applied.push((key, value)),
                Some(Err(why)) => done.refused.push((key, why)),
                None => external.push((key, value)),
            }
        }
        let program = self.config.desired.program().map(Path::to_path_buf);
        let timeout = self.config.desired.timeout;
        let Some(program) = program.filter(|_| !external.is_empty()) else {
            for (key, _) in external {
                done.refused.push((
                    key,
                    "no [desired] program is configured for this key".to_string(),
                ));
            }
            self.desired_applied(done);
            return;
        };
        let tx = self.desired_done.clone();
        self.running.spawn(async move {
            for (key, value) in external {
                let args = [key.clone(), value.clone()];
                let spec = crate::process::Spec {
                    program: &program,
                    args: &args,
                    env: &[],
                    cwd: None,
                    timeout,
                    max_output: 256,
                };
                match crate::process::run(&spec).await {
                    Ok(out) if out.exit.success() => done.applied.push((key, value)),
                    Ok(out) => {
                        let text = String::from_utf8_lossy(if out.stderr.is_empty() {
                            &out.stdout
                        } else {
                            &out.stderr
                        })
                        .trim()
                        .to_string();
                        done.refused
                            .push((key, format!("exit {}: {text}", out.exit.code())));
                    }
                    Err(err) => done.refused.push((key, err.to_string())),
                }
            }
            let _ = tx.send(done).await;
        });
    }

    /// `sensors.NAME.interval` = `"5s"` or a number of seconds: `None` for another key.
    fn apply_interval(&mut self, key: &str, value: &str) -> Option<Result<(), String>> {
        let name = key.strip_prefix("sensors.")?.strip_suffix(".interval")?;
        let Some(handle) = self.commands.sensors().iter().find(|h| h.name == name) else {
            return Some(Err(format!("no sensor named {name}")));
        };
        let interval = match serde_json::from_str::<serde_json::Value>(value) {
            Ok(serde_json::Value::String(text)) => humantime::parse_duration(&text).ok(),
            Ok(serde_json::Value::Number(n)) => n
                .as_f64()
                .filter(|s| s.is_finite() && *s > 0.0)
                .map(Duration::from_secs_f64),
            _ => None,
        };
        match interval {
            Some(i) if i >= crate::commands::MIN_INTERVAL => {
                handle.set_interval(i);
                tracing::info!(sensor = name, interval = %humantime::format_duration(i), "sensor interval set by desired state");
                Some(Ok(()))
            }
            Some(_) => Some(Err(format!(
                "shorter than {}",
                humantime::format_duration(crate::commands::MIN_INTERVAL)
            ))),
            None => Some(Err("not a duration (\"5s\") or seconds".to_string())),
        }
    }

    /// Reports what was applied and refused; after the last message of a version, answers
    /// the hub with `Applied` for it.
    fn desired_applied(&mut self, done: DesiredApplied) {
        for (key, value) in &done.applied {
            if let Err(e) = self.session.report_state(key, value) {
                tracing::warn!(key, "cannot report an applied desired key: {e:?}");
            }
        }
        for (key, why) in &done.refused {
            tracing::warn!(key, reason = %why, "desired state refused");
            if let Err(e) = self.session.report_refused(key, why) {
                tracing::warn!(key, "cannot report a refused desired key: {e:?}");
            }
        }
        if done.last {
            self.session.applied(done.version);
        }
    }

    fn protocol_error(&mut self, code: u16, why: &str) {
        self.close(code, why);
        self.disconnected(
            DisconnectCause::Local(CloseReason::ProtocolViolation),
            &format!("closed with {code}: {why}"),
        );
    }

    fn on_command(&mut self, cmd: Command) {
        let id = cmd.id;
        let name = cmd.name.to_string();
        let hub_now = self.session.server_time(self.clock.now());
        // A zero deadline means none (defensive: the hub always sets one).
        let remaining = match (cmd.deadline, hub_now) {
            (0, _) | (_, None) => None,
            (deadline, Some(now)) => Some(Duration::from_millis(deadline.saturating_sub(now))),
        };
        tracing::info!(id, command = %name, args = %cmd.args, "command received");
        if remaining == Some(Duration::ZERO) {
            self.finish(
                id,
                &name,
                Outcome::refused("refused: the deadline passed before the command arrived"),
            );
            return;
        }
        match self.commands.dispatch(&name, &cmd.args) {
            Dispatch::Done(out) => self.finish(id, &name, out),
            Dispatch::Run(action) => {
                let slots = self.slots.clone();
                let results = self.results.clone();
                let args = cmd.args.to_string();
                let deadline = remaining.map(|r| Instant::now() + r);
                self.running.spawn(async move {
                    // Waiting for a free slot counts against the deadline.
                    let _permit = slots.acquire_owned().await;
                    let limit = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                    let out = if limit == Some(Duration::ZERO) {
                        Outcome::refused(
                            "refused: the deadline passed while waiting for a free slot",
                        )
                    } else {
                        action.run(&args, limit).await
                    };
                    let _ = results.send((id, name, out)).await;
                });
            }
        }
    }

    fn finish(&mut self, id: u64, name: &str, out: Outcome) {
        if out.code == REFUSED {
            tracing::warn!(id, command = %name, "command refused: {}", out.output);
        } else {
            tracing::info!(id, command = %name, ok = out.ok, "command answered");
        }
        self.session
            .command_finished(id, out.ok, out.code, &out.output);
    }

    /// Offers the session's next messages to the writer while it has room.
    fn pump(&mut self) {
        let encoding = self.config.hub.encoding;
        let mut failed = None;
        if let Some(tx) = self.conn.tx.as_ref() {
            loop {
                let permit = match tx.try_reserve() {
                    Ok(p) => p,
                    Err(mpsc::error::TrySendError::Full(())) => {
                        self.conn.blocked = true;
                        break;
                    }
                    Err(mpsc::error::TrySendError::Closed(())) => break,
                };
                match self.session.poll_transmit() {
                    Ok(Some(msg)) => {
                        if let DeviceMessage::Telemetry(t) = &msg {
                            tracing::trace!(
                                seq = t.seq,
                                readings = t.readings.len(),
                                "sending batch"
                            );
                        }
                        permit.send(encode(encoding, &msg));
                    }
                    Ok(None) => break,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
        }
        if let Some(e) = failed {
            tracing::error!("cannot read a queued batch: {e}");
            self.close(close::INTERNAL, "device storage failed");
            self.disconnected(DisconnectCause::Io, "closed after a storage failure");
        }
    }

    /// Records readings in batches of up to `batch_limit`: each batch is on disk (fsynced)
    /// when this returns.
    fn record(&mut self, readings: &[Reading], from_sensors: bool) {
        for chunk in readings.chunks(self.batch_limit.max(1)) {
            match blocking(|| self.session.record(chunk)) {
                Ok((seq, pushed)) => {
                    tracing::debug!(seq, readings = chunk.len(), "recorded");
                    if pushed.evicted_batches > 0 {
                        tracing::warn!(
                            batches = pushed.evicted_batches,
                            readings = pushed.evicted_readings,
                            "queue full: dropped the oldest readings to make room (see queue.max_bytes / queue.max_batches)"
                        );
                        // Report the new agent.dropped_readings total soon, but not in
                        // reaction to our own report (which may evict in turn).
                        self.report_soon |= from_sensors;
                    }
                }
                Err(e) => tracing::error!(lost = chunk.len(), "cannot record readings: {e}"),
            }
        }
    }

    /// The agent's own readings: queue state and drop count.
    fn record_own_readings(&mut self) {
        self.last_report = Instant::now();
        let s = self.session.outbox().stats();
        let ts = crate::epoch_ms();
        let values = [
            ("agent.queue_batches", s.batches as f64),
            ("agent.queue_readings", s.readings as f64),
            ("agent.queue_bytes", s.bytes as f64),
            ("agent.dropped_readings", s.dropped_readings as f64),
            (
                "agent.connected",
                if self.session.is_ready() { 1.0 } else { 0.0 },
            ),
        ];
        let readings: Vec<Reading> = values
            .iter()
            .map(|(m, v)| Reading {
                metric: truncated(m),
                ts,
                value: *v,
            })
            .collect();
        self.record(&readings, false);
    }

    async fn shutdown(mut self, sample_rx: &mut mpsc::Receiver<Sample>) {
        tracing::info!("stopping");
        // Readings already taken go to disk; sensors and actions stop.
        let mut pending = Vec::new();
        while let Ok(s) = sample_rx.try_recv() {
            pending.extend(s.readings);
        }
        if !pending.is_empty() {
            self.record(&pending, false);
        }
        self.running.abort_all();
        if let Some(c) = self.connecting.take() {
            c.abort();
        }
        if self.conn.is_open() {
            if let Some(closing) = self.conn.close(close::GOING_AWAY, "agent stopping") {
                let _ = closing.await;
            }
        }
        if let Err(e) = self.session.outbox().sync() {
            tracing::warn!("final queue sync failed: {e}");
        }
        let stats = self.session.outbox().stats();
        tracing::info!(
            waiting_batches = stats.batches,
            next_seq = stats.next_seq,
            "stopped; waiting readings stay on disk for the next start"
        );
    }
}

/// Close reasons must fit a control frame (123 bytes).
fn transport_reason(reason: &str) -> &str {
    crate::process::cut(reason, 120)
}

mod firmware;

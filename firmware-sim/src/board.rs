//! What a board plugs into the client: its sensors, its actuators, optionally a real-time
//! clock, and a hook for status events (an LED, a log, counters).

use core::fmt;

use heapless::{String, Vec};
use schemas::limits::{is_valid_name, MAX_METRIC_LEN, MAX_OUTPUT_LEN, MAX_READINGS};
use schemas::message::truncated;
use schemas::session::DisconnectCause;
use schemas::{Command, Reading};

use crate::client::Exit;

/// The hardware behind the firmware. One value of this type is the whole board.
///
/// Every method runs synchronously inside [`crate::Client::poll`] or
/// [`crate::Client::rx_filled`], so keep them short: read a sensor, flip a GPIO.
pub trait Board {
    /// Reads every sensor once. Called every sample interval, connected or not (readings
    /// are stored and forwarded).
    fn sample(&mut self, now_ms: u64, samples: &mut Samples<'_>);

    /// Runs a command from the hub (already de-duplicated by id) and says how it went;
    /// write human-readable output with `write!(ctx, ...)`.
    fn execute(&mut self, command: &Command, ctx: &mut CommandContext<'_>) -> Outcome;

    /// Applies one desired setting from the hub (`value` is its JSON text, `null` meaning
    /// "back to the default"). The client applies `interval` itself and passes every
    /// other key here. Returns why it cannot, for the operator to see; the default knows
    /// no settings.
    ///
    /// # Errors
    /// A short reason (at most 64 bytes are shown).
    fn apply_setting(&mut self, key: &str, value: &str) -> Result<(), &'static str> {
        let _ = (key, value);
        Err("unknown setting")
    }

    /// Milliseconds since the Unix epoch from a real-time clock, if the board has one.
    /// Without one, readings are stamped with the hub's clock as learned from `Welcome`,
    /// and sampling waits for the first `Welcome` after a reset.
    fn wall_clock_ms(&mut self) -> Option<u64> {
        None
    }

    /// The board's firmware-update storage, if it takes updates: the client then handles
    /// the hub's offers and chunks with it (announce the `firmware` capability in the
    /// client's session configuration too). The default takes none.
    fn updates(&mut self) -> Option<&mut dyn crate::update::Updates> {
        None
    }

    /// Something happened (connected, batch acknowledged, ...). The default ignores it.
    fn on_event(&mut self, event: &Event<'_>) {
        let _ = event;
    }
}

/// Why a reading was not added to a sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SampleError {
    /// The batch already holds 64 readings.
    #[error("a batch holds at most 64 readings")]
    Full,
    /// The metric name is empty, too long, or uses characters outside `[A-Za-z0-9_.:/-]`.
    #[error(
        "metric name is empty, longer than 64 bytes, or uses characters outside [A-Za-z0-9_.:/-]"
    )]
    BadName,
    /// The value is NaN or infinite.
    #[error("reading value is NaN or infinite")]
    NotFinite,
}

/// Collects one sample's readings; they become one telemetry batch, stamped with one time.
#[derive(Debug)]
pub struct Samples<'s> {
    pub(crate) readings: &'s mut Vec<Reading, MAX_READINGS>,
    pub(crate) ts: u64,
    pub(crate) rejected: u32,
}

impl Samples<'_> {
    /// Adds a reading. Invalid ones are refused here, so that one bad sensor cannot make
    /// the hub close the connection for the whole batch.
    ///
    /// # Errors
    /// See [`SampleError`]; the reading is not added.
    pub fn push(&mut self, metric: &str, value: f64) -> Result<(), SampleError> {
        let result = if !is_valid_name(metric, MAX_METRIC_LEN) {
            Err(SampleError::BadName)
        } else if !value.is_finite() {
            Err(SampleError::NotFinite)
        } else {
            self.readings
                .push(Reading {
                    metric: truncated(metric),
                    ts: self.ts,
                    value,
                })
                .map_err(|_| SampleError::Full)
        };
        if result.is_err() {
            self.rejected += 1;
        }
        result
    }

    /// The timestamp every reading of this sample gets (epoch ms).
    pub fn timestamp(&self) -> u64 {
        self.ts
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Whether it succeeded.
    pub ok: bool,
    /// 0 for success, otherwise a board-defined code (the simulator uses errno values).
    pub code: i32,
}

impl Outcome {
    /// Success.
    pub const OK: Outcome = Outcome { ok: true, code: 0 };

    /// Failure with `code`.
    pub fn failed(code: i32) -> Outcome {
        Outcome { ok: false, code }
    }
}

/// What a command handler can see and change besides its output.
#[derive(Debug)]
pub struct CommandContext<'c> {
    pub(crate) output: &'c mut String<MAX_OUTPUT_LEN>,
    pub(crate) server_time: Option<u64>,
    pub(crate) interval_ms: u32,
    pub(crate) new_interval_ms: Option<u32>,
    pub(crate) reboot: bool,
}

impl CommandContext<'_> {
    /// The hub's clock now (epoch ms), to compare with [`Command::deadline`].
    pub fn server_time(&self) -> Option<u64> {
        self.server_time
    }

    /// The current sample interval in milliseconds.
    pub fn interval_ms(&self) -> u32 {
        self.interval_ms
    }

    /// Changes the sample interval (until the next reset). The client clamps it to
    /// [`crate::client::MIN_INTERVAL_MS`] and [`crate::client::MAX_INTERVAL_MS`].
    pub fn set_interval_ms(&mut self, ms: u32) {
        self.new_interval_ms = Some(ms);
    }

    /// Asks for a reset once the result has been sent: the driver then returns
    /// [`crate::Exit::Reboot`].
    pub fn request_reboot(&mut self) {
        self.reboot = true;
    }

    /// The output written so far.
    pub fn output(&self) -> &str {
        self.output
    }
}

impl fmt::Write for CommandContext<'_> {
    /// Appends to the output; text beyond the protocol's 1024 bytes is dropped (at a
    /// character boundary), never an error.
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            if self.output.push(c).is_err() {
                break;
            }
        }
        Ok(())
    }
}

/// Something the client did or saw, for [`Board::on_event`].
#[derive(Debug, Clone, PartialEq)]
pub enum Event<'e> {
    /// The driver is opening a connection.
    Connecting,
    /// The WebSocket is up; `Hello` goes out next.
    Connected,
    /// The hub welcomed the device.
    Welcome {
        /// The highest sequence number the hub has stored for this device.
        hub_last_seq: u64,
        /// Batches still unacknowledged after reconciling with the hub; they are re-sent.
        pending: usize,
        /// Sequence number of the first of them (or of the next batch if none).
        next_seq: u64,
    },
    /// A sample became a batch in the ring.
    Recorded {
        /// Its sequence number.
        seq: u64,
        /// How many readings it holds.
        readings: usize,
        /// Readings lost from the oldest batches to make room.
        evicted_readings: u32,
    },
    /// A sample was skipped because no clock was available yet (no RTC, no `Welcome`
    /// since the reset).
    SampleSkipped,
    /// A batch was handed to the transport.
    Sent {
        /// Its sequence number.
        seq: u64,
        /// How many readings it holds.
        readings: usize,
    },
    /// The hub acknowledged batches.
    Acked {
        /// Every batch up to this one is stored.
        up_to_seq: u64,
        /// Batches this acknowledgement removed from the ring.
        batches: u64,
        /// Readings in them.
        readings: u64,
    },
    /// A command ran.
    Command {
        /// Its id.
        id: u64,
        /// Its name.
        name: &'e str,
        /// How it went.
        outcome: Outcome,
        /// Its output.
        output: &'e str,
    },
    /// The hub reported a non-fatal error.
    HubError {
        /// Its code.
        code: u16,
        /// Its text.
        message: &'e str,
    },
    /// The connection ended (or never came up); `next` says what follows.
    Disconnected {
        /// Why.
        cause: DisconnectCause,
        /// The HTTP status when the hub (or a proxy) answered the upgrade with something
        /// other than `101`: 401 (token), 403, 400 (subprotocol), 503 (busy), 404, ...
        /// `None` when the upgrade got that far or the status line was unreadable.
        http_status: Option<u16>,
        /// Whether the hub had welcomed this connection.
        was_ready: bool,
        /// Another attempt, or the end of a shutdown or reboot.
        next: AfterDisconnect,
    },
}

/// What the client does after [`Event::Disconnected`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterDisconnect {
    /// It connects again in this many milliseconds (backoff with full jitter).
    RetryIn(u64),
    /// It does not reconnect: a shutdown or a reboot has finished (or its deadline comes
    /// before the next attempt would), and the driver returns this.
    Exit(Exit),
}

//! Storage seams. Telemetry goes through [`TelemetryStore`] and [`TelemetryQuery`]
//! (SQLite by default, InfluxDB at scale); device records and revocations through
//! [`DeviceRegistry`]; the command ledger through [`CommandStore`] (SQLite on one node,
//! Redis in a cluster). The rest of the hub does not know which backend is in use.

pub mod chunk;
pub mod influx;
pub mod jobs;
pub mod ledger;
pub mod meta;
pub mod query;
mod read_connections;
pub mod spool;
pub mod sqlite;
pub mod sqlite_telemetry;
pub mod telemetry_db;
pub mod twin;
pub mod updates;
pub mod wal_sync;

use std::collections::BTreeMap;
use std::sync::Arc;

use schemas::Reading;

/// A validated telemetry batch on its way to the store.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The device that sent it.
    pub device: Arc<str>,
    /// Its per-device sequence number.
    pub seq: u64,
    /// The readings (1 to 64).
    pub readings: Vec<Reading>,
}

/// What happened to one batch in a commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Newly stored.
    Stored,
    /// Its sequence number was at or below the highest stored one: not stored again.
    Duplicate,
}

/// Why the store failed. Nothing in a failed commit was stored or acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite reported an error (disk full, I/O error, locked beyond the busy timeout).
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The Redis backplane failed (unreachable, timed out, or refused a command).
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The store answered, and refused the request for good (a configuration problem,
    /// or a store without the needed API); retrying will not help.
    #[error("{0}")]
    Refused(String),
    /// Anything else, described.
    #[error("{0}")]
    Other(String),
}

/// A durable telemetry store with per-device exactly-once semantics.
///
/// Implementations are driven from one writer thread and may block.
pub trait TelemetryStore: Send {
    /// The highest sequence number stored for `device` (0 for none).
    ///
    /// # Errors
    /// The store is unavailable.
    fn last_seq(&mut self, device: &str) -> Result<u64, StoreError>;

    /// Durably stores the batches (in order) in one group commit. A batch whose sequence
    /// number is at or below the highest stored for its device is a duplicate and is not
    /// stored. When this returns `Ok`, every `Stored` batch survives a crash.
    ///
    /// # Errors
    /// Nothing was stored.
    fn commit(&mut self, batches: &[Batch]) -> Result<Vec<Outcome>, StoreError>;

    /// Deletes every reading of `device` and forgets its high-water mark (`hub devices
    /// remove --purge`). Returns how many readings went.
    ///
    /// # Errors
    /// The store failed, or cannot delete (then it says how to do it another way).
    fn purge(&mut self, device: &str) -> Result<u64, StoreError> {
        let _ = device;
        Err(StoreError::Refused(
            "this telemetry store cannot delete a device's readings through the hub".into(),
        ))
    }
}

/// Per-device high-water marks (highest stored sequence number) for telemetry backends
/// that cannot keep them in the same transaction as the data (InfluxDB). Such backends
/// write idempotently (a re-written point replaces itself), so a crash between writing
/// data and raising the mark costs a harmless re-write, never a loss or a duplicate.
pub trait SeqStore: Send {
    /// The highest stored sequence number of `device` (0 for none).
    ///
    /// # Errors
    /// The store is unavailable.
    fn get(&mut self, device: &str) -> Result<u64, StoreError>;

    /// Raises the marks (never lowers them), durably.
    ///
    /// # Errors
    /// The store is unavailable; nothing may have been raised.
    fn raise(&mut self, marks: &[(Arc<str>, u64)]) -> Result<(), StoreError>;
}

/// Device records, presence history and token revocations: the SQLite store on a single
/// node, Redis in a cluster. Calls may block; async code calls them via `spawn_blocking`.
pub trait DeviceRegistry: Send + Sync {
    /// Checks that the store answers.
    ///
    /// # Errors
    /// The store is unavailable.
    fn ping(&self) -> Result<(), StoreError>;
    /// Records a device's new connection.
    ///
    /// # Errors
    /// The store failed.
    fn device_connected(
        &self,
        id: &str,
        firmware: &str,
        capabilities: &str,
        remote: &str,
        at_ms: u64,
    ) -> Result<(), StoreError>;
    /// Records the end of a device's connection.
    ///
    /// # Errors
    /// The store failed.
    fn device_disconnected(
        &self,
        id: &str,
        at_ms: u64,
        cause: &str,
        last_seen: u64,
        rtt_us: Option<u64>,
    ) -> Result<(), StoreError>;
    /// Records liveness of online devices: (id, last_seen ms, rtt µs). It blocks for a
    /// while (the SQLite store writes in short transactions with pauses between them, so
    /// other writers get in): call it on a blocking thread.
    ///
    /// # Errors
    /// The store failed.
    fn devices_seen(&self, seen: &[(String, u64, Option<u64>)]) -> Result<(), StoreError>;
    /// Merges reported properties into a device's state.
    ///
    /// # Errors
    /// The store failed.
    fn device_state(&self, id: &str, properties: &[(String, String)]) -> Result<(), StoreError>;
    /// Marks devices offline at start-up (their connections belonged to a previous run).
    ///
    /// # Errors
    /// The store failed.
    fn mark_all_offline(&self, at_ms: u64, cause: &str) -> Result<usize, StoreError>;
    /// Revokes every token of `device` issued at or before `at_ms`.
    ///
    /// # Errors
    /// The store failed.
    fn revoke(&self, device: &str, at_ms: u64) -> Result<(), StoreError>;
    /// Every revocation: (device, revoked at ms).
    ///
    /// # Errors
    /// The store failed.
    fn revocations(&self) -> Result<Vec<(String, u64)>, StoreError>;
    /// Every device record, by id.
    ///
    /// # Errors
    /// The store failed.
    fn devices(&self) -> Result<Vec<meta::DeviceRecord>, StoreError>;
    /// One device record.
    ///
    /// # Errors
    /// The store failed.
    fn device(&self, id: &str) -> Result<Option<meta::DeviceRecord>, StoreError>;
    /// A device's presence history, newest first, at most `limit` entries; `None` when this
    /// registry keeps none (the Redis registry of a cluster keeps only the current state).
    ///
    /// # Errors
    /// The store failed.
    fn presence_history(
        &self,
        _id: &str,
        _limit: usize,
    ) -> Result<Option<Vec<meta::PresenceChange>>, StoreError> {
        Ok(None)
    }
    /// Deletes presence history older than `before_ms`; returns how many rows went.
    ///
    /// # Errors
    /// The store failed.
    fn prune_history(&self, before_ms: u64) -> Result<usize, StoreError>;
    /// Registers devices: creates a record (never connected) for each id not known yet and
    /// merges the given tags into each. Returns, per device, whether it was new.
    ///
    /// # Errors
    /// The store failed; nothing was registered.
    fn register(
        &self,
        devices: &[(String, BTreeMap<String, String>)],
        at_ms: u64,
    ) -> Result<Vec<bool>, StoreError>;
    /// Sets and removes tags of a device. Returns its tags afterwards, or `None` when the
    /// device is not registered.
    ///
    /// # Errors
    /// The store failed.
    fn tag(
        &self,
        id: &str,
        set: &BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<Option<BTreeMap<String, String>>, StoreError>;
    /// Forgets a device: its record, tags, state and presence history (its revocation and
    /// its telemetry stay). Returns whether it was known.
    ///
    /// # Errors
    /// The store failed.
    fn forget(&self, id: &str) -> Result<bool, StoreError>;
    /// A device's desired and reported state, or `None` when it is not registered.
    ///
    /// # Errors
    /// The store failed.
    fn twin(&self, id: &str) -> Result<Option<twin::Twin>, StoreError>;
    /// Applies an operator's patch to a device's desired state, atomically, if its desired
    /// version is `expected` (or whatever it is, without `expected`).
    ///
    /// # Errors
    /// The store failed (outer), or the patch breaks a limit (inner).
    fn update_desired(
        &self,
        id: &str,
        patch: &serde_json::Map<String, serde_json::Value>,
        expected: Option<u64>,
    ) -> Result<Result<twin::DesiredOutcome, twin::TwinError>, StoreError>;
    /// Records what a device applied for desired version `version`.
    ///
    /// # Errors
    /// The store failed.
    fn record_applied(
        &self,
        id: &str,
        version: u64,
        applied: &[(String, serde_json::Value)],
        refused: &[(String, String)],
    ) -> Result<(), StoreError>;
}

/// A command to queue.
#[derive(Debug, Clone, Copy)]
pub struct NewCommand<'a> {
    /// Target device.
    pub device: &'a str,
    /// Command name.
    pub name: &'a str,
    /// Arguments (JSON text).
    pub args: &'a str,
    /// Result timeout once sent, ms.
    pub timeout_ms: u64,
    /// How long it waits for an offline device, ms.
    pub ttl_ms: u64,
    /// The job creating it, if any.
    pub job: Option<u64>,
}

impl<'a> NewCommand<'a> {
    /// A command outside any job.
    pub fn new(
        device: &'a str,
        name: &'a str,
        args: &'a str,
        timeout_ms: u64,
        ttl_ms: u64,
    ) -> Self {
        NewCommand {
            device,
            name,
            args,
            timeout_ms,
            ttl_ms,
            job: None,
        }
    }

    /// The same command, created by `job`.
    pub fn for_job(self, job: u64) -> Self {
        NewCommand {
            job: Some(job),
            ..self
        }
    }
}

/// The command ledger's storage: SQLite on a single node, Redis in a cluster. State
/// transitions are atomic; each returns the record only when it changed it, so exactly one
/// caller publishes each transition. Calls may block.
pub trait CommandStore: Send + Sync {
    /// Queues a new command. With a `job`, at most one command exists per job and device:
    /// when the job already created one for `device`, that one is returned unchanged.
    ///
    /// The command is visible (and may be delivered) when this returns, but it may not
    /// survive a power cut until [`CommandStore::sync`] has returned; its id is never
    /// handed out again either way. Results ([`CommandStore::finish`]) and progress marks
    /// are the same; cancellations, expiries and prunes are durable when they return.
    ///
    /// # Errors
    /// The store failed.
    fn create(&self, new: &NewCommand<'_>, now: u64) -> Result<ledger::CommandRecord, StoreError>;
    /// Blocks until every write so far survives a power cut (as the hub was configured).
    /// Stores whose writes are durable when they return have nothing to do.
    ///
    /// # Errors
    /// The store cannot make them durable (a failing disk).
    fn sync(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// One command.
    ///
    /// # Errors
    /// The store failed.
    fn get(&self, id: u64) -> Result<Option<ledger::CommandRecord>, StoreError>;
    /// A device's most recent commands, newest first.
    ///
    /// # Errors
    /// The store failed.
    fn list(&self, device: &str, limit: usize) -> Result<Vec<ledger::CommandRecord>, StoreError>;
    /// Open commands of a device with id > `after`, oldest first, queued ones only while
    /// within their TTL.
    ///
    /// # Errors
    /// The store failed.
    fn deliverable(
        &self,
        device: &str,
        after: u64,
        limit: usize,
        now: u64,
    ) -> Result<Vec<ledger::CommandRecord>, StoreError>;
    /// Records a (re-)delivery; returns the record when it moved from queued to sent.
    ///
    /// # Errors
    /// The store failed.
    fn mark_sent(&self, id: u64, now: u64) -> Result<Option<ledger::CommandRecord>, StoreError>;
    /// Records the device's ack; returns the record when its state changed.
    ///
    /// # Errors
    /// The store failed.
    fn ack(
        &self,
        device: &str,
        id: u64,
        now: u64,
    ) -> Result<Option<ledger::CommandRecord>, StoreError>;
    /// Records the device's result; `None` when unknown for this device or already final.
    ///
    /// # Errors
    /// The store failed.
    fn finish(
        &self,
        device: &str,
        id: u64,
        ok: bool,
        code: i32,
        output: &str,
        now: u64,
    ) -> Result<Option<ledger::CommandRecord>, StoreError>;
    /// Cancels an open command.
    ///
    /// # Errors
    /// The store failed (outer), or it cannot be cancelled (inner).
    fn cancel(
        &self,
        id: u64,
        now: u64,
    ) -> Result<Result<ledger::CommandRecord, ledger::CancelRefused>, StoreError>;
    /// Expires queued commands past their TTL and fails delivered ones past their deadline.
    ///
    /// # Errors
    /// The store failed.
    fn expire_due(&self, now: u64) -> Result<Vec<ledger::CommandRecord>, StoreError>;
    /// Number of commands per state.
    ///
    /// # Errors
    /// The store failed.
    fn counts(&self) -> Result<Vec<(ledger::CommandState, u64)>, StoreError>;
    /// Deletes commands that reached a final state before `before_ms`; returns how many.
    ///
    /// # Errors
    /// The store failed.
    fn prune_finished(&self, before_ms: u64) -> Result<usize, StoreError>;
}

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

//! Storage seams. Telemetry goes through [`TelemetryStore`] (SQLite by default); the
//! rest of the hub does not know which backend is in use. Device records, revocations and
//! the command ledger live in the hub's own SQLite database ([`meta::MetaStore`]).

pub mod ledger;
pub mod meta;
pub mod query;
pub mod spool;
pub mod sqlite;

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
}

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

//! A read of the store that one connection needs (its device's commands, its desired
//! state) and that failed, tried again later: the retry timer of the hub session, sans-io.

use std::time::{Duration, Instant};

/// A read of the store for one connection (its commands, its desired state) that failed:
/// it is tried again after 1 s, doubling up to 30 s while it keeps failing, so what the
/// device is owed reaches it once the store is back, without a reconnect, and a dead store
/// is not read in a loop by every connection.
#[derive(Debug, Default)]
pub(super) struct ReadRetry {
    /// When the read is tried again, if it failed.
    pub(super) at: Option<Instant>,
    failures: u8,
}

impl ReadRetry {
    const FIRST: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(30);

    /// The read failed at `now`: the next try waits twice as long as the last.
    pub(super) fn failed(&mut self, now: Instant) {
        let delay = Self::FIRST
            .saturating_mul(1 << self.failures.min(5))
            .min(Self::MAX);
        self.failures = self.failures.saturating_add(1);
        self.at = Some(now + delay);
    }

    /// The read worked: no retry, and the next failure waits 1 s again.
    pub(super) fn succeeded(&mut self) {
        *self = ReadRetry::default();
    }

    /// Whether the retry is due at `now`; it is taken if so.
    pub(super) fn take_due(&mut self, now: Instant) -> bool {
        let due = self.at.is_some_and(|at| now >= at);
        if due {
            self.at = None;
        }
        due
    }
}

//! The hub-wide cap on firmware transfer throughput (`firmware.max_transfer_rate`): a
//! token bucket shared by every connection, which a connection asks for the bytes of its
//! next chunk before it reads and sends it.
//!
//! The bucket hands out reservations rather than refusals: [`TransferCap::reserve`] takes
//! the bytes at once (the bucket may go into debt) and answers the instant they are paid
//! for, which the connection then waits for. So a thousand waiting connections are served
//! in the order they asked, each waking once, instead of all retrying whenever a few
//! tokens come back; and a connection that waits holds nothing but that instant. The
//! bucket reads no clock: callers pass `now`, which keeps it testable in virtual time.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use schemas::limits::MAX_CHUNK_BYTES;

/// The shortest burst, in bytes: one chunk, so that a chunk never waits on a full bucket.
const MIN_BURST: u64 = MAX_CHUNK_BYTES as u64;

/// A token bucket of firmware bytes per second over all devices, or no limit.
#[derive(Debug)]
pub struct TransferCap {
    /// Bytes per second; 0 is no limit.
    rate: u64,
    /// How long the bucket takes to fill from empty: what an idle bucket lets out at once.
    burst: Duration,
    /// The instant the bucket counts from, and how far past it the bucket is full again
    /// once everything reserved so far is paid for (the generic cell rate algorithm's
    /// "theoretical arrival time"; before that instant it holds `burst` minus the rest).
    state: Mutex<(Instant, Duration)>,
}

impl TransferCap {
    /// A cap of `rate` bytes per second (0: no cap), letting out a tenth of a second's
    /// worth (at least one chunk) at once after an idle spell. A burst of a tenth of a
    /// second keeps the rate over any second close to the cap while sparing a lone
    /// device's first chunk any wait.
    pub fn new(rate: u64, now: Instant) -> TransferCap {
        let burst_bytes = (rate / 10).max(MIN_BURST);
        let burst = duration_of(burst_bytes, rate);
        TransferCap {
            rate,
            burst,
            state: Mutex::new((now, Duration::ZERO)),
        }
    }

    /// Whether there is a cap at all.
    pub fn is_limited(&self) -> bool {
        self.rate != 0
    }

    /// The cap in bytes per second (0: none).
    pub fn rate(&self) -> u64 {
        self.rate
    }

    /// Takes `bytes` from the bucket at `now` and answers the instant they are paid for:
    /// `now` itself when the bucket held them, later when it goes into debt for them.
    /// The caller sends the bytes at that instant, not before. Without a cap, `now`.
    pub fn reserve(&self, now: Instant, bytes: u64) -> Instant {
        if self.rate == 0 {
            return now;
        }
        let cost = duration_of(bytes, self.rate);
        // A poisoned lock only means another connection panicked while holding it; the
        // two numbers inside are always consistent.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (origin, paid_until) = &mut *state;
        let elapsed = now.saturating_duration_since(*origin);
        // A bucket full since before `now` holds `burst` and no more: the idle time
        // before it filled up is not saved.
        *paid_until = (*paid_until).max(elapsed) + cost;
        // The bytes are paid for once the bucket would be back at zero.
        *origin + (*paid_until).saturating_sub(self.burst).max(elapsed)
    }
}

/// How long `bytes` take at `rate` bytes per second (0: no time).
fn duration_of(bytes: u64, rate: u64) -> Duration {
    if rate == 0 {
        return Duration::ZERO;
    }
    let nanos = u128::from(bytes) * 1_000_000_000 / u128::from(rate);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * 1024;

    #[test]
    fn no_cap_never_waits() {
        let t0 = Instant::now();
        let cap = TransferCap::new(0, t0);
        assert!(!cap.is_limited());
        for _ in 0..1000 {
            assert_eq!(cap.reserve(t0, 1 << 20), t0);
        }
    }

    #[test]
    fn a_full_bucket_lets_out_its_burst_then_paces_at_the_rate() {
        let t0 = Instant::now();
        // 32 KiB/s: the burst is one chunk (a tenth of a second, 3.2 KiB, is less).
        let cap = TransferCap::new(32 * KIB, t0);
        // Long idle: the bucket is full, but holds only the burst.
        let now = t0 + Duration::from_secs(60);
        assert_eq!(cap.reserve(now, 4 * KIB), now);
        // The next chunk waits for its own 4 KiB at 32 KiB/s: 125 ms.
        let second = cap.reserve(now, 4 * KIB);
        assert_eq!(second - now, Duration::from_millis(125));
        // And the one after that for another 125 ms: reservations queue up in order.
        let third = cap.reserve(now, 4 * KIB);
        assert_eq!(third - now, Duration::from_millis(250));
        // Asked for later, when the bucket has paid some of it back, it waits less.
        let later = now + Duration::from_millis(200);
        assert_eq!(
            cap.reserve(later, 4 * KIB) - later,
            Duration::from_millis(175)
        );
    }

    #[test]
    fn many_connections_get_the_rate_between_them_over_virtual_time() {
        let t0 = Instant::now();
        let rate = MIB;
        let cap = TransferCap::new(rate, t0);
        // 100 connections, each sending its next chunk when its reservation comes due
        // and then asking for the next one: ten virtual seconds.
        let mut due: Vec<Instant> = (0..100).map(|_| cap.reserve(t0, 4 * KIB)).collect();
        let end = t0 + Duration::from_secs(10);
        let mut sent = 0u64;
        loop {
            let (i, at) = due
                .iter()
                .copied()
                .enumerate()
                .min_by_key(|(_, at)| *at)
                .expect("connections");
            if at > end {
                break;
            }
            sent += 4 * KIB;
            due[i] = cap.reserve(at, 4 * KIB);
        }
        // Ten seconds at the rate plus the burst the idle bucket started with, to a chunk.
        let most = 10 * rate + rate / 10 + 4 * KIB;
        assert!(sent <= most, "{sent} > {most}");
        assert!(sent >= 10 * rate - 4 * KIB, "{sent} is well below the rate");
    }

    #[test]
    fn an_idle_bucket_saves_a_tenth_of_a_second_and_no_more() {
        let t0 = Instant::now();
        // 1 MiB/s: the burst is 104,857 bytes, 25 whole chunks.
        let cap = TransferCap::new(MIB, t0);
        let now = t0 + Duration::from_secs(10);
        for i in 0..25 {
            assert_eq!(cap.reserve(now, 4 * KIB), now, "chunk {i} of the burst");
        }
        assert!(cap.reserve(now, 4 * KIB) > now, "the 26th waits");
    }
}

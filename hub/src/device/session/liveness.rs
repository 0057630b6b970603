//! Hub-side liveness of one device connection as a sans-io state machine: when to ping,
//! the round trip of each pong, and when silence means the device is gone.
//!
//! Rule: the hub pings every `interval`, with at most one ping waiting for its pong; the
//! device must answer each ping within `timeout`, or it is offline. Only the pong that
//! answers the waiting ping counts: other frames prove that the device can write, not that
//! it reads, and a device that sends but never reads (a stuck read loop) would otherwise
//! stay online forever while everything sent to it is lost. A device frozen right after
//! its last pong is declared offline at most `interval + timeout` later.
//!
//! While the hub itself does not read (backpressure from the ingest queue), a pong cannot
//! arrive, so that time is not counted against the device: [`Liveness::hold`] moves the
//! deadline.

use std::time::{Duration, Instant};

/// What the connection must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LivenessAction {
    /// Send a ping with this payload.
    Ping([u8; 8]),
    /// The waiting ping was not answered in time: the device is offline.
    Dead,
}

/// The ping that waits for its pong.
#[derive(Debug, Clone, Copy)]
struct Waiting {
    /// Its number, which is also its payload (8 bytes, big-endian).
    seq: u64,
    /// When it went out (for the round trip).
    sent: Instant,
    /// When the device is offline if no pong has come.
    due: Instant,
}

/// Liveness state of one connection.
#[derive(Debug)]
pub struct Liveness {
    interval: Duration,
    timeout: Duration,
    next_ping: Instant,
    waiting: Option<Waiting>,
    ping_seq: u64,
}

impl Liveness {
    /// Starts the clock at `now`: the first ping goes out after one interval.
    pub fn new(now: Instant, interval: Duration, timeout: Duration) -> Liveness {
        Liveness {
            interval,
            timeout,
            next_ping: now + interval,
            waiting: None,
            ping_seq: 0,
        }
    }

    /// A pong arrived. It counts only if it answers the waiting ping; then returns the
    /// round trip.
    pub fn on_pong(&mut self, now: Instant, payload: &[u8]) -> Option<Duration> {
        let waiting = self.waiting?;
        if payload != waiting.seq.to_be_bytes() {
            return None;
        }
        self.waiting = None;
        Some(now.saturating_duration_since(waiting.sent))
    }

    /// The hub is not reading at `now` (backpressure): a pong could not be seen, so the
    /// device gets a full `timeout` again from here.
    pub fn hold(&mut self, now: Instant) {
        if let Some(waiting) = &mut self.waiting {
            waiting.due = waiting.due.max(now + self.timeout);
        }
    }

    /// When [`Liveness::handle_timeout`] must run next.
    pub fn poll_timeout(&self) -> Instant {
        match self.waiting {
            Some(waiting) => waiting.due,
            None => self.next_ping,
        }
    }

    /// Advances the timers.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<LivenessAction> {
        if let Some(waiting) = self.waiting {
            // One ping at a time: the next goes out once this one is answered.
            return (now >= waiting.due).then_some(LivenessAction::Dead);
        }
        if now >= self.next_ping {
            self.next_ping = now + self.interval;
            self.ping_seq += 1;
            self.waiting = Some(Waiting {
                seq: self.ping_seq,
                sent: now,
                due: now + self.timeout,
            });
            return Some(LivenessAction::Ping(self.ping_seq.to_be_bytes()));
        }
        None
    }
}

/// A token bucket for a device's messages: `rate` per second on average, bursts of up to
/// twice that. Sans-io like [`Liveness`]: the caller passes `now`.
#[derive(Debug)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    /// A full bucket at `now`.
    pub fn new(now: Instant, per_sec: usize) -> RateLimit {
        let rate = per_sec.max(1) as f64;
        RateLimit {
            rate,
            burst: 2.0 * rate,
            tokens: 2.0 * rate,
            last: now,
        }
    }

    /// Takes a token for one message; false when the device is over its rate.
    pub fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frozen_device_is_dead_within_interval_plus_timeout() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut l = Liveness::new(t0, ms(1000), ms(500));
        assert_eq!(l.poll_timeout(), t0 + ms(1000));
        let Some(LivenessAction::Ping(p)) = l.handle_timeout(t0 + ms(1000)) else {
            panic!("ping")
        };
        assert_eq!(l.on_pong(t0 + ms(1010), &p), Some(ms(10)));
        // Frozen from t0 + 1010 on: the next ping at 2000, dead at 2500.
        assert!(matches!(
            l.handle_timeout(t0 + ms(2000)),
            Some(LivenessAction::Ping(_))
        ));
        assert_eq!(l.poll_timeout(), t0 + ms(2500));
        assert_eq!(l.handle_timeout(t0 + ms(2499)), None);
        assert_eq!(l.handle_timeout(t0 + ms(2500)), Some(LivenessAction::Dead));
    }

    #[test]
    fn the_rate_limit_allows_bursts_then_the_average() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(t0, 10);
        assert!((0..20).all(|_| r.allow(t0)));
        assert!(!r.allow(t0));
        assert!(r.allow(t0 + Duration::from_millis(100)));
        assert!(!r.allow(t0 + Duration::from_millis(100)));
    }

    #[test]
    fn only_the_pong_that_answers_the_waiting_ping_counts() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut l = Liveness::new(t0, ms(100), ms(50));
        let Some(LivenessAction::Ping(p)) = l.handle_timeout(t0 + ms(100)) else {
            panic!("ping")
        };
        // An unsolicited pong, or one with another payload, proves nothing.
        assert_eq!(l.on_pong(t0 + ms(120), &[0; 8]), None);
        assert_eq!(l.on_pong(t0 + ms(120), b"x"), None);
        assert_eq!(l.poll_timeout(), t0 + ms(150));
        assert_eq!(l.handle_timeout(t0 + ms(150)), Some(LivenessAction::Dead));
        // The right pong, late but in time, counts once.
        let mut l = Liveness::new(t0, ms(100), ms(50));
        l.handle_timeout(t0 + ms(100));
        assert_eq!(l.on_pong(t0 + ms(149), &p), Some(ms(49)));
        assert_eq!(l.on_pong(t0 + ms(149), &p), None);
        assert_eq!(l.poll_timeout(), t0 + ms(200));
    }

    #[test]
    fn one_ping_waits_at_a_time_and_a_hold_moves_its_deadline() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // A timeout longer than the interval: no second ping while the first waits.
        let mut l = Liveness::new(t0, ms(100), ms(300));
        assert!(matches!(
            l.handle_timeout(t0 + ms(100)),
            Some(LivenessAction::Ping(_))
        ));
        assert_eq!(l.handle_timeout(t0 + ms(200)), None);
        assert_eq!(l.poll_timeout(), t0 + ms(400));
        l.hold(t0 + ms(350));
        assert_eq!(l.poll_timeout(), t0 + ms(650));
        assert_eq!(l.handle_timeout(t0 + ms(649)), None);
        assert_eq!(l.handle_timeout(t0 + ms(650)), Some(LivenessAction::Dead));
        // A hold with no ping waiting changes nothing.
        let mut l = Liveness::new(t0, ms(100), ms(50));
        l.hold(t0 + ms(90));
        assert_eq!(l.poll_timeout(), t0 + ms(100));
    }
}

//! Hub-side liveness of one device connection as a sans-io state machine: when to ping,
//! the round trip of each pong, and when silence means the device is gone.
//!
//! Rule: the hub pings every `interval`; after a ping, if nothing at all (a pong or any
//! other frame) arrives within `timeout`, the device is offline. A device frozen right after
//! its last frame is therefore declared offline at most `interval + timeout` later.

use std::time::{Duration, Instant};

/// What the connection must do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LivenessAction {
    /// Send a ping with this payload.
    Ping([u8; 8]),
    /// Nothing arrived within the timeout: the device is offline.
    Dead,
}

/// Liveness state of one connection.
#[derive(Debug)]
pub struct Liveness {
    interval: Duration,
    timeout: Duration,
    next_ping: Instant,
    awaiting_since: Option<Instant>,
    outstanding: Option<(u64, Instant)>,
    ping_seq: u64,
}

impl Liveness {
    /// Starts the clock at `now`: the first ping goes out after one interval.
    pub fn new(now: Instant, interval: Duration, timeout: Duration) -> Liveness {
        Liveness {
            interval,
            timeout,
            next_ping: now + interval,
            awaiting_since: None,
            outstanding: None,
            ping_seq: 0,
        }
    }

    /// Any frame arrived.
    pub fn on_frame(&mut self, _now: Instant) {
        self.awaiting_since = None;
    }

    /// A pong arrived; returns the round trip if it answers the latest ping.
    pub fn on_pong(&mut self, now: Instant, payload: &[u8]) -> Option<Duration> {
        self.on_frame(now);
        let (seq, sent) = self.outstanding?;
        if payload == seq.to_be_bytes() {
            self.outstanding = None;
            let rtt = now.saturating_duration_since(sent);
            return Some(rtt);
        }
        None
    }

    /// When [`Liveness::handle_timeout`] must run next.
    pub fn poll_timeout(&self) -> Instant {
        match self.awaiting_since {
            Some(since) => self.next_ping.min(since + self.timeout),
            None => self.next_ping,
        }
    }

    /// Advances the timers.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<LivenessAction> {
        if let Some(since) = self.awaiting_since {
            if now >= since + self.timeout {
                return Some(LivenessAction::Dead);
            }
        }
        if now >= self.next_ping {
            self.next_ping = now + self.interval;
            self.ping_seq += 1;
            self.outstanding = Some((self.ping_seq, now));
            self.awaiting_since.get_or_insert(now);
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
    fn any_frame_counts_and_stale_pongs_give_no_rtt() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut l = Liveness::new(t0, ms(100), ms(50));
        assert!(matches!(
            l.handle_timeout(t0 + ms(100)),
            Some(LivenessAction::Ping(_))
        ));
        l.on_frame(t0 + ms(120));
        assert_eq!(l.poll_timeout(), t0 + ms(200));
        assert_eq!(l.on_pong(t0 + ms(130), &[0; 8]), None);
    }
}

//! Handshake slots: how many TCP connections may be between accept and the end of the
//! WebSocket upgrade at once (`device.max_handshakes`), and how many of those one source
//! address may hold (`device.max_handshakes_per_source`), so that one client that opens
//! connections and sends nothing cannot lock every device out.
//!
//! When every slot is taken the listener stops accepting until one is given back
//! ([`HandshakeSlots::room`]): further connections wait in the kernel's accept queue (a
//! device sees a slower connect, not a failure that would grow its backoff), and the hub
//! never handshakes more at once than it can finish in time.
//!
//! A source is an IPv4 address, or the /64 prefix of an IPv6 address (one subscriber
//! usually gets a whole /64, so counting single IPv6 addresses would not limit anyone). An
//! IPv4-mapped IPv6 address counts as its IPv4 address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Where a connection comes from, as far as the per-source share is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// An IPv4 address.
    V4(u32),
    /// The first 64 bits of an IPv6 address.
    V6(u64),
}

impl Source {
    /// The source `ip` counts as.
    pub fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(u32::from(v4)),
                None => Source::V6((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

/// Why a connection got no slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot is taken.
    Full,
    /// Its source holds its whole share.
    SourceShare,
}

#[derive(Debug)]
struct Counts {
    total: usize,
    by_source: HashMap<Source, usize>,
}

/// The slots of one listener. Cheap to share: clone the `Arc`.
#[derive(Debug)]
pub struct HandshakeSlots {
    max: usize,
    per_source: usize,
    counts: Mutex<Counts>,
    /// Signalled when a slot is given back while every slot was taken.
    freed: Notify,
}

/// One taken slot; dropping it gives the slot back.
#[derive(Debug)]
pub struct Slot {
    slots: Arc<HandshakeSlots>,
    source: Source,
}

impl HandshakeSlots {
    /// `max` slots in all, at most `per_source` of them (capped at `max`) for one source.
    pub fn new(max: usize, per_source: usize) -> Arc<HandshakeSlots> {
        Arc::new(HandshakeSlots {
            max,
            per_source: per_source.min(max),
            counts: Mutex::new(Counts {
                total: 0,
                by_source: HashMap::new(),
            }),
            freed: Notify::new(),
        })
    }

    /// Whether every slot is taken.
    pub fn is_full(&self) -> bool {
        self.taken() >= self.max
    }

    /// Waits until a slot is free (at once when one is). One waiter at a time: the
    /// listener.
    ///
    /// Cancel safety: cancel safe; nothing is taken.
    pub async fn room(&self) {
        loop {
            let freed = self.freed.notified();
            if !self.is_full() {
                return;
            }
            freed.await;
        }
    }

    /// Takes a slot for a connection from `ip`.
    ///
    /// # Errors
    /// [`Refusal`] when every slot is taken or the source holds its share.
    pub fn try_take(self: &Arc<Self>, ip: IpAddr) -> Result<Slot, Refusal> {
        let source = Source::of(ip);
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.total >= self.max {
            return Err(Refusal::Full);
        }
        let held = counts.by_source.entry(source).or_insert(0);
        if *held >= self.per_source {
            return Err(Refusal::SourceShare);
        }
        *held += 1;
        counts.total += 1;
        Ok(Slot {
            slots: self.clone(),
            source,
        })
    }

    /// Slots taken now.
    pub fn taken(&self) -> usize {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).total
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.slots.counts.lock().unwrap_or_else(|e| e.into_inner());
        if counts.total >= self.slots.max {
            // A permit is kept when nobody waits yet, so the wake-up cannot be missed.
            self.slots.freed.notify_one();
        }
        counts.total = counts.total.saturating_sub(1);
        if let Some(held) = counts.by_source.get_mut(&self.source) {
            *held -= 1;
            if *held == 0 {
                // Forget the source, so the map holds only sources with a handshake going.
                counts.by_source.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("address")
    }

    #[test]
    fn one_source_gets_its_share_and_others_the_rest() {
        let slots = HandshakeSlots::new(4, 2);
        let a1 = slots.try_take(ip("127.0.0.2")).expect("first");
        let _a2 = slots.try_take(ip("127.0.0.2")).expect("second");
        assert_eq!(
            slots.try_take(ip("127.0.0.2")).err(),
            Some(Refusal::SourceShare)
        );
        let _b1 = slots.try_take(ip("127.0.0.1")).expect("another source");
        let _c1 = slots.try_take(ip("10.0.0.1")).expect("another source");
        assert_eq!(slots.try_take(ip("10.0.0.2")).err(), Some(Refusal::Full));
        // A slot given back can be taken again.
        drop(a1);
        assert_eq!(slots.taken(), 3);
        let _a3 = slots.try_take(ip("127.0.0.2")).expect("after a release");
    }

    #[test]
    fn an_ipv6_slash_64_is_one_source_and_mapped_ipv4_is_ipv4() {
        let slots = HandshakeSlots::new(10, 1);
        let _a = slots.try_take(ip("2001:db8:1:2::1")).expect("first");
        assert_eq!(
            slots.try_take(ip("2001:db8:1:2:ffff::9")).err(),
            Some(Refusal::SourceShare)
        );
        let _b = slots.try_take(ip("2001:db8:1:3::1")).expect("another /64");
        let _c = slots.try_take(ip("192.0.2.7")).expect("ipv4");
        assert_eq!(
            slots.try_take(ip("::ffff:192.0.2.7")).err(),
            Some(Refusal::SourceShare)
        );
    }

    #[test]
    fn the_share_is_capped_at_the_total() {
        let slots = HandshakeSlots::new(2, 100);
        let _a = slots.try_take(ip("127.0.0.1")).expect("1");
        let _b = slots.try_take(ip("127.0.0.1")).expect("2");
        assert_eq!(slots.try_take(ip("127.0.0.1")).err(), Some(Refusal::Full));
    }

    #[tokio::test]
    async fn room_waits_until_a_slot_is_given_back() {
        let slots = HandshakeSlots::new(1, 1);
        slots.room().await;
        let held = slots.try_take(ip("127.0.0.1")).expect("the only slot");
        assert!(slots.is_full());
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), slots.room());
        assert!(waiting.await.is_err(), "no room while the slot is held");
        let waiter = tokio::spawn({
            let slots = slots.clone();
            async move { slots.room().await }
        });
        tokio::task::yield_now().await;
        drop(held);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken when the slot came back")
            .expect("task");
        // Given back before anyone waited: the next wait returns at once.
        let held = slots.try_take(ip("127.0.0.1")).expect("again");
        drop(held);
        slots.room().await;
    }
}

//! A wake-up for one waiting task that says what woke it: bits that other threads raise,
//! and the task's wait that takes them. The ingest writer rings a connection's ack slot,
//! the rest of the hub its signals (kick, commands, desired state, firmware offer).
//!
//! A flag and an [`AtomicWaker`] instead of a Tokio `Notify`: a connection waits on both in
//! every turn of its loop (several per frame), and a `Notify` locks its list of waiters to
//! add each wait and again to drop it (5.4 % of the hub's samples at one reading per frame).

use std::sync::atomic::{AtomicU8, Ordering};
use std::task::Poll;

use futures_util::task::AtomicWaker;

/// Bits raised for one waiter, and that waiter's wake-up.
#[derive(Debug, Default)]
pub struct Doorbell {
    /// Raised and not yet taken.
    bits: AtomicU8,
    waker: AtomicWaker,
}

impl Doorbell {
    /// Raises `bits` (not zero) and wakes the waiter, if one waits.
    pub fn ring(&self, bits: u8) {
        debug_assert_ne!(bits, 0, "a ring raises something");
        self.bits.fetch_or(bits, Ordering::AcqRel);
        self.waker.wake();
    }

    /// Waits until something is raised and takes all of it (at once if something was
    /// raised before this call). Rings before this looks count once.
    ///
    /// Cancel safety: cancel safe: what it has not returned stays raised for the next
    /// call. Meant for one waiter; a second one takes the first one's place.
    pub async fn rung(&self) -> u8 {
        std::future::poll_fn(|cx| {
            let bits = self.bits.swap(0, Ordering::AcqRel);
            if bits != 0 {
                return Poll::Ready(bits);
            }
            self.waker.register(cx.waker());
            // A ring between the swap and the registration would otherwise be missed.
            match self.bits.swap(0, Ordering::AcqRel) {
                0 => Poll::Pending,
                bits => Poll::Ready(bits),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rings_before_the_wait_are_kept_and_taken_together() {
        let bell = std::sync::Arc::new(Doorbell::default());
        bell.ring(1);
        bell.ring(4);
        assert_eq!(bell.rung().await, 5);
        let waiting = tokio::spawn({
            let bell = bell.clone();
            async move { bell.rung().await }
        });
        tokio::task::yield_now().await;
        bell.ring(2);
        assert_eq!(waiting.await.expect("the waiter"), 2);
    }
}

//! Test harness for the end-to-end tests: starts the real `hub` binary (and other
//! binaries) in temporary directories on ephemeral loopback ports, and provides a wss
//! client that speaks the protocol the way a third-party device would.

pub mod agent;
pub mod boards;
pub mod client;
pub mod cluster;
pub mod console;
pub mod docs;
pub mod load;
pub mod process;
pub mod servers;
pub mod sim;
pub mod webdriver;

pub use process::{Hub, HubOptions, TempDir};

use std::time::{Duration, Instant};

/// Polls `check` every 20 ms until it returns `Some`, or panics with `what` after
/// `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        pause(Duration::from_millis(20));
    }
}

/// Like `wait_for` but returns `None` on timeout, so the caller can explain.
pub fn try_wait<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        pause(Duration::from_millis(20));
    }
}

/// Sleeps the calling thread between two polls. Inside a multi-threaded tokio runtime the
/// worker is handed over first (`block_in_place`), so the test's own devices and clients on
/// that runtime keep running; on a current-thread runtime a blocking sleep would stop them
/// all, so there it panics and says what to use instead.
pub fn pause(d: Duration) {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(|| std::thread::sleep(d)),
        Ok(_) => panic!(
            "a blocking wait on a current-thread runtime stalls every task on it: use \
             wait_for_async, or #[tokio::test(flavor = \"multi_thread\")]"
        ),
        Err(_) => std::thread::sleep(d),
    }
}

/// Async version of [`wait_for`].
pub async fn wait_for_async<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

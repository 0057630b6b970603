//! The hub as a library: configuration, the data directory, device authentication, the
//! wss device listener, the ingest pipeline and stores, presence and events. The `hub`
//! binary is a thin CLI over [`server::start`].

pub mod api;
pub mod auth;
pub mod client_cert;
pub mod cluster;
pub mod config;
pub mod datadir;
pub mod device;
pub mod doorbell;
pub mod events;
pub mod firmware;
pub mod ingest;
pub mod jobs;
pub mod ledger;
pub mod presence;
pub mod rollouts;
pub mod selector;
pub mod server;
pub mod store;
pub mod tls;
pub mod token;
pub mod updates;

/// Completes when the shutdown flag becomes `true` (or its sender is gone).
///
/// Cancel safety: safe; it only observes the flag.
pub async fn stopping(flag: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = flag.wait_for(|stop| *stop).await;
}

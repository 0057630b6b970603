//! The device side of the hub: the wss listener, the per-connection protocol task, and
//! its sans-io protocol core (`session`).

pub mod connection;
pub mod handshakes;
pub mod listener;
pub mod replay;
pub mod session;
pub mod wire_counters;

use std::sync::Arc;

use tokio::sync::watch;

use crate::auth::Auth;
use crate::config::DeviceConfig;
use crate::events::EventBus;
use crate::ingest::Ingest;
use crate::ledger::Ledger;
use crate::presence::Presence;
use crate::store::DeviceRegistry;

/// Everything a connection task needs, shared by all of them.
pub struct DeviceContext {
    /// Listener and protocol settings.
    pub config: DeviceConfig,
    /// Token verification.
    pub auth: Arc<Auth>,
    /// The telemetry pipeline.
    pub ingest: Ingest,
    /// The command ledger.
    pub ledger: Ledger,
    /// Device records.
    pub meta: Arc<dyn DeviceRegistry>,
    /// Who is connected.
    pub presence: Arc<Presence>,
    /// Event fan-out.
    pub events: EventBus,
    /// The Redis backplane, when clustered.
    pub cluster: Option<Arc<crate::cluster::Backplane>>,
    /// Becomes `true` when the hub shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// Firmware images and the devices' updates.
    pub updates: Arc<crate::updates::Updates>,
}

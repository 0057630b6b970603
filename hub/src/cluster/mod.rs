//! The Redis backplane that lets several hubs serve one fleet: shared presence (which node
//! holds which device), node heartbeats with a dead-node reaper, presence that converges
//! after stalls and partitions, command routing to the node that holds the device, a
//! shared command ledger and device registry, event fan-out, cross-node supersede, and
//! rebalancing. Any node accepts any device, so a load balancer needs no stickiness.
//!
//! Keys: hash `hub:presence` (device -> `node|conn_id`), set `hub:nodes`, key
//! `hub:node:{node}` (the heartbeat: JSON, expires after three missed beats), set
//! `hub:node:{node}:devices`; channels `hub:control` (nudge, update, kick, shed) and `hub:events`.
//!
//! How the parts agree (see `deploy/README.md`, "When a node fails"):
//! - `membership.rs`: every node beats; a node whose beat expired is dead, and any live
//!   node's reaper atomically takes its devices offline (exactly one reaper gets them).
//! - `ownership.rs`: a node that finds it was absent (a stall, a partition, a Redis
//!   restart, a restart under the same id) reconciles: it claims again what it holds,
//!   lets go of what it no longer holds, and closes connections another live node took.
//! - A node that cannot reach Redis for as long as the others need to declare it dead
//!   gives its devices up (close 4010, they reconnect through the load balancer) and
//!   refuses new ones (HTTP 503) until Redis answers again.
//! - `rebalance.rs`: the plan that moves devices from the fullest nodes, and the pacing.

pub mod jobs;
pub mod ledger;
mod membership;
mod ownership;
mod pubsub;
pub mod rebalance;
pub mod registry;
pub mod seq;
pub mod sync;
pub mod updates;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, watch, Notify};

use crate::config::ClusterConfig;
use crate::events::{EventBus, HubEvent};
use crate::presence::Presence;
use crate::store::{now_ms, DeviceRegistry, StoreError};
pub use membership::{ClusterStatus, NodeStatus};
pub use ownership::{LetGo, Owner};
pub use rebalance::{Move, RebalanceMode, RebalancePlan};
use sync::SyncRedis;

pub(crate) const PRESENCE: &str = "hub:presence";
const NODES: &str = "hub:nodes";
const CONTROL: &str = "hub:control";
const EVENTS: &str = "hub:events";
const WANT_READINGS: &str = "hub:want_readings";

fn node_key(node: &str) -> String {
    format!("hub:node:{node}")
}

fn node_devices(node: &str) -> String {
    format!("hub:node:{node}:devices")
}

/// Why a node turns new devices away (HTTP 503 at the upgrade).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The node cannot reach Redis: it could neither record the device nor its commands.
    Detached,
    /// The node is handing devices to other nodes and holds no more than its share.
    Rebalancing,
}

impl Refusal {
    /// Words for the refusal's body.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Detached => {
                "this hub cannot reach its cluster backplane (Redis); retry, another node will take you"
            }
            Refusal::Rebalancing => {
                "this hub is handing devices to other nodes (rebalancing); retry, another node will take you"
            }
        }
    }
}

/// This node's handle on the backplane.
pub struct Backplane {
    node: String,
    /// Random per process: tells this process's heartbeats from an earlier one's (or from
    /// another process wrongly configured with the same node id).
    incarnation: String,
    client: redis::Client,
    redis: Arc<SyncRedis>,
    manager: ConnectionManager,
    heartbeat: Duration,
    rebalance: rebalance::Settings,
    scripts: ownership::Scripts,
    /// Whether the last heartbeat reached Redis.
    reachable: AtomicBool,
    /// Whether this node gave its devices up because Redis stayed out of reach.
    detached: AtomicBool,
    /// Whether the next successful heartbeat must reconcile presence (set when a claim or
    /// release failed, when a beat failed, and when the node was found absent).
    reconcile_due: AtomicBool,
    shedding: Mutex<Option<rebalance::Shed>>,
    shed_changed: Notify,
    /// Redis's clock minus this host's, in ms, as of the last heartbeat (for fencing).
    clock_offset_ms: AtomicI64,
}

/// A node id: the configured one, or the host name with a random suffix.
fn node_id(configured: &str) -> String {
    let base = if configured.is_empty() {
        let host =
            std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "hub".into());
        format!("{}-{}", host.trim(), random_hex::<3>())
    } else {
        configured.to_string()
    };
    // `|` separates node and connection in presence values.
    base.replace('|', "_")
}

/// Redis's clock minus this host's, from Redis's `TIME` answer (seconds, microseconds) to
/// a request sent at `sent_ms`.
fn clock_offset((secs, micros): (u64, u64), sent_ms: u64) -> i64 {
    (secs * 1000 + micros / 1000) as i64 - sent_ms as i64
}

/// `N` random bytes as hex (zeros if the system has no randomness to give).
fn random_hex<const N: usize>() -> String {
    let mut bytes = [0u8; N];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Backplane {
    /// Connects to Redis.
    ///
    /// # Errors
    /// Redis is unreachable or refuses the connection.
    ///
    /// Cancel safety: safe; nothing is registered until it returns.
    pub async fn connect(config: &ClusterConfig) -> Result<Arc<Backplane>, StoreError> {
        let client = redis::Client::open(config.redis_url.as_str())?;
        let manager_config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(sync::IO_TIMEOUT))
            .set_connection_timeout(Some(sync::IO_TIMEOUT))
            .set_number_of_retries(2);
        let manager = tokio::time::timeout(
            Duration::from_secs(10),
            client.get_connection_manager_with_config(manager_config),
        )
        .await
        .map_err(|_| {
            StoreError::Other(format!(
                "redis at {} did not answer within 10 s",
                config.redis_url
            ))
        })??;
        let mut m = manager.clone();
        let sent = now_ms();
        let time: (u64, u64) = redis::cmd("TIME").query_async(&mut m).await?;
        Ok(Arc::new(Backplane {
            node: node_id(&config.node_id),
            incarnation: random_hex::<6>(),
            redis: Arc::new(SyncRedis::new(client.clone())),
            client,
            manager,
            heartbeat: config.heartbeat,
            rebalance: rebalance::Settings {
                mode: config.rebalance,
                rate: config.rebalance_rate,
            },
            scripts: ownership::Scripts::new(),
            reachable: AtomicBool::new(true),
            detached: AtomicBool::new(false),
            // The first beat reconciles: an earlier process with this node id may have
            // left devices behind.
            reconcile_due: AtomicBool::new(true),
            shedding: Mutex::new(None),
            shed_changed: Notify::new(),
            clock_offset_ms: AtomicI64::new(clock_offset(time, sent)),
        }))
    }

    /// This node's id.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The blocking connection the shared stores use.
    pub fn sync(&self) -> Arc<SyncRedis> {
        self.redis.clone()
    }

    /// How long a node may miss beats before the others declare it dead: three beats
    /// (at least 300 ms).
    pub fn dead_after(&self) -> Duration {
        (self.heartbeat * 3).max(Duration::from_millis(300))
    }

    /// Whether a new device must be turned away, and why: this node cannot reach Redis,
    /// or it is handing devices to other nodes and holds `local_devices`, no fewer than
    /// it means to keep.
    pub fn refusal(&self, local_devices: usize) -> Option<Refusal> {
        if !self.reachable.load(Ordering::Relaxed) || self.detached.load(Ordering::Relaxed) {
            return Some(Refusal::Detached);
        }
        let shedding = self.shedding.lock().ok()?;
        shedding
            .as_ref()
            .filter(|shed| local_devices >= shed.keep)
            .map(|_| Refusal::Rebalancing)
    }

    /// Runs the heartbeat (with the reaper, reconciliation and automatic rebalancing), the
    /// subscriber, the event forwarder and the rebalancing pacer until shutdown.
    pub fn start(
        self: &Arc<Self>,
        presence: Arc<Presence>,
        events: EventBus,
        registry: Arc<dyn DeviceRegistry>,
        forward: mpsc::Receiver<HubEvent>,
        shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let heartbeat = tokio::spawn(me.clone().heartbeat(
                presence.clone(),
                events.clone(),
                registry,
                shutdown.clone(),
            ));
            let subscriber = tokio::spawn(me.clone().subscribe(
                presence.clone(),
                events,
                shutdown.clone(),
            ));
            let forwarder = tokio::spawn(me.clone().forward(forward, shutdown.clone()));
            let pacer = tokio::spawn(me.clone().shed(presence, shutdown.clone()));
            let _ = tokio::join!(heartbeat, subscriber, forwarder, pacer);
            // Leave cleanly: other nodes need not wait for the heartbeat to expire.
            let mut m = me.manager.clone();
            let _: Result<(), _> = redis::pipe()
                .del(node_key(&me.node))
                .query_async(&mut m)
                .await;
        })
    }
}

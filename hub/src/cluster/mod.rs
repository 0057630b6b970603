//! The Redis backplane that lets several hubs serve one fleet: shared presence (which node
//! holds which device, with node heartbeats so a dead node's devices go offline), command
//! routing to the node that holds the device, a shared command ledger and device registry,
//! event fan-out, and cross-node supersede. Any node accepts any device, so a load
//! balancer needs no stickiness.
//!
//! Keys: hash `hub:presence` (device -> `node|conn_id`), set `hub:nodes`, key
//! `hub:node:{node}` (heartbeat, expires after three missed beats), set
//! `hub:node:{node}:devices`; channels `hub:control` (nudge, kick) and `hub:events`.

pub mod ledger;
pub mod registry;
pub mod seq;
pub mod sync;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::config::ClusterConfig;
use crate::events::{EventBus, HubEvent};
use crate::presence::Presence;
use crate::store::{now_ms, DeviceRegistry, StoreError};
use sync::SyncRedis;

const PRESENCE: &str = "hub:presence";
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

const CLAIM: &str = r"
local old = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
return old";

const RELEASE: &str = r"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('SREM', KEYS[2], ARGV[1])
  return 1
end
if not v or string.sub(v, 1, #ARGV[3]) ~= ARGV[3] then redis.call('SREM', KEYS[2], ARGV[1]) end
return 0";

const REAP: &str = r"
local gone = {}
for _, d in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local v = redis.call('HGET', KEYS[1], d)
  if v and string.sub(v, 1, #ARGV[1] + 1) == ARGV[1] .. '|' then
    redis.call('HDEL', KEYS[1], d)
    table.insert(gone, d)
  end
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return gone";

/// Which node holds a device, and on which connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Node id.
    pub node: String,
    /// Connection id on that node.
    pub conn_id: u64,
}

impl Owner {
    fn parse(v: &str) -> Option<Owner> {
        let (node, conn) = v.rsplit_once('|')?;
        Some(Owner {
            node: node.to_string(),
            conn_id: conn.parse().ok()?,
        })
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Control {
    /// New commands for a device held by `node`.
    Nudge { node: String, device: String },
    /// Close a device's connection on `node` (superseded elsewhere).
    Kick {
        node: String,
        device: String,
        conn_id: u64,
        code: u16,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    origin: String,
    event: HubEvent,
}

/// This node's handle on the backplane.
pub struct Backplane {
    node: String,
    client: redis::Client,
    redis: Arc<SyncRedis>,
    manager: ConnectionManager,
    heartbeat: Duration,
    claim: redis::Script,
    release: redis::Script,
    reap: redis::Script,
}

/// A node id: the configured one, or the host name with a random suffix (a restarted
/// node is a new node; its old devices are reaped when its old heartbeat expires).
fn node_id(configured: &str) -> String {
    let base = if configured.is_empty() {
        let host =
            std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "hub".into());
        let mut suffix = [0u8; 3];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut suffix);
        format!(
            "{}-{:02x}{:02x}{:02x}",
            host.trim(),
            suffix[0],
            suffix[1],
            suffix[2]
        )
    } else {
        configured.to_string()
    };
    // `|` separates node and connection in presence values.
    base.replace('|', "_")
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
        Ok(Arc::new(Backplane {
            node: node_id(&config.node_id),
            redis: Arc::new(SyncRedis::new(client.clone())),
            client,
            manager,
            heartbeat: config.heartbeat,
            claim: redis::Script::new(CLAIM),
            release: redis::Script::new(RELEASE),
            reap: redis::Script::new(REAP),
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

    fn me(&self, conn_id: u64) -> String {
        format!("{}|{conn_id}", self.node)
    }

    /// Records that this node holds `device` on `conn_id`; returns the previous holder.
    ///
    /// # Errors
    /// Redis failed.
    ///
    /// Cancel safety: not cancel safe: the claim may be recorded in Redis without the caller knowing the previous owner.
    pub async fn claim(&self, device: &str, conn_id: u64) -> Result<Option<Owner>, StoreError> {
        let mut m = self.manager.clone();
        let old: Option<String> = self
            .claim
            .key(PRESENCE)
            .key(node_devices(&self.node))
            .arg(device)
            .arg(self.me(conn_id))
            .invoke_async(&mut m)
            .await?;
        Ok(old.as_deref().and_then(Owner::parse))
    }

    /// Drops this node's hold on `device` if it is still `conn_id`'s. Returns whether it
    /// was (false: another connection, maybe on another node, took over).
    ///
    /// # Errors
    /// Redis failed.
    ///
    /// Cancel safety: not cancel safe: the release may happen without the caller learning whether the device was still its own.
    pub async fn release(&self, device: &str, conn_id: u64) -> Result<bool, StoreError> {
        let mut m = self.manager.clone();
        let released: i64 = self
            .release
            .key(PRESENCE)
            .key(node_devices(&self.node))
            .arg(device)
            .arg(self.me(conn_id))
            .arg(format!("{}|", self.node))
            .invoke_async(&mut m)
            .await?;
        Ok(released == 1)
    }

    /// The node and connection that hold `device`, if any.
    ///
    /// # Errors
    /// Redis failed.
    ///
    /// Cancel safety: safe; it only reads.
    pub async fn owner(&self, device: &str) -> Result<Option<Owner>, StoreError> {
        let mut m = self.manager.clone();
        let v: Option<String> = redis::cmd("HGET")
            .arg(PRESENCE)
            .arg(device)
            .query_async(&mut m)
            .await?;
        Ok(v.as_deref().and_then(Owner::parse))
    }

    /// Whether `node` is heartbeating (true when Redis cannot tell: assume the worst case
    /// of a live node and kick its connection).
    ///
    /// Cancel safety: safe; it only reads.
    pub async fn node_alive(&self, node: &str) -> bool {
        let mut m = self.manager.clone();
        redis::cmd("EXISTS")
            .arg(node_key(node))
            .query_async(&mut m)
            .await
            .unwrap_or(true)
    }

    async fn publish_control(&self, control: &Control) {
        let mut m = self.manager.clone();
        let payload = serde_json::to_string(control).unwrap_or_default();
        let sent: Result<i64, _> = redis::cmd("PUBLISH")
            .arg(CONTROL)
            .arg(payload)
            .query_async(&mut m)
            .await;
        if let Err(err) = sent {
            tracing::warn!(error = %err, ?control, "cannot publish to the backplane");
        }
    }

    /// Tells the node that holds `device` (if another one) that it has new commands.
    ///
    /// Cancel safety: safe; a lost nudge is repeated by the owner's next delivery check.
    pub async fn nudge(&self, device: &str) {
        let mut m = self.manager.clone();
        let owner: Result<Option<String>, _> = redis::cmd("HGET")
            .arg(PRESENCE)
            .arg(device)
            .query_async(&mut m)
            .await;
        match owner {
            Ok(Some(v)) => {
                if let Some(owner) = Owner::parse(&v).filter(|o| o.node != self.node) {
                    self.publish_control(&Control::Nudge {
                        node: owner.node,
                        device: device.to_string(),
                    })
                    .await;
                }
            }
            Ok(None) => {}
            Err(err) => tracing::warn!(error = %err, %device, "cannot look up the device's node"),
        }
    }

    /// Asks `owner`'s node to close that connection with `code`.
    ///
    /// Cancel safety: safe; a kick not sent leaves the older connection to be superseded when it next talks to Redis.
    pub async fn kick(&self, owner: &Owner, device: &str, code: u16) {
        self.publish_control(&Control::Kick {
            node: owner.node.clone(),
            device: device.to_string(),
            conn_id: owner.conn_id,
            code,
        })
        .await;
    }

    /// Runs the heartbeat, the dead-node reaper, the subscriber and the event forwarder
    /// until shutdown.
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
                events.clone(),
                registry,
                shutdown.clone(),
            ));
            let subscriber = tokio::spawn(me.clone().subscribe(presence, events, shutdown.clone()));
            let forwarder = tokio::spawn(me.clone().forward(forward, shutdown.clone()));
            let _ = tokio::join!(heartbeat, subscriber, forwarder);
            // Leave cleanly: other nodes need not wait for the heartbeat to expire.
            let mut m = me.manager.clone();
            let _: Result<(), _> = redis::pipe()
                .del(node_key(&me.node))
                .query_async(&mut m)
                .await;
        })
    }

    async fn heartbeat(
        self: Arc<Self>,
        events: EventBus,
        registry: Arc<dyn DeviceRegistry>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ttl_ms = (self.heartbeat.as_millis() as u64)
            .saturating_mul(3)
            .max(300);
        loop {
            tokio::select! {
                _ = crate::stopping(&mut shutdown) => return,
                _ = tick.tick() => {}
            }
            let mut m = self.manager.clone();
            let beat: Result<(), _> = redis::pipe()
                .cmd("SET")
                .arg(node_key(&self.node))
                .arg(now_ms())
                .arg("PX")
                .arg(ttl_ms)
                .ignore()
                .sadd(NODES, &self.node)
                .ignore()
                .query_async(&mut m)
                .await;
            if let Err(err) = beat {
                metrics::counter!("hub_backplane_errors_total").increment(1);
                tracing::warn!(error = %err, "backplane heartbeat failed");
                continue;
            }
            if let Err(err) = self.reap_dead(&events, &registry).await {
                tracing::warn!(error = %err, "dead-node reaper failed");
            }
            if let Err(err) = self.share_readings_interest(&events, ttl_ms).await {
                tracing::debug!(error = %err, "cannot exchange readings interest");
            }
        }
    }

    /// Tells the other nodes whether someone here watches readings, and learns whether
    /// someone elsewhere does (sorted set `hub:want_readings`, scored by expiry), so that
    /// readings cross the backplane only while somebody looks at them.
    async fn share_readings_interest(
        &self,
        events: &EventBus,
        ttl_ms: u64,
    ) -> Result<(), StoreError> {
        let mut m = self.manager.clone();
        let now = now_ms();
        let mut pipe = redis::pipe();
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(WANT_READINGS)
            .arg("-inf")
            .arg(now)
            .ignore();
        if events.local_readings_wanted() {
            pipe.zadd(WANT_READINGS, &self.node, now + ttl_ms).ignore();
        } else {
            pipe.zrem(WANT_READINGS, &self.node).ignore();
        }
        pipe.zrange(WANT_READINGS, 0, -1);
        let (watchers,): (Vec<String>,) = pipe.query_async(&mut m).await?;
        events.set_remote_readings(watchers.iter().any(|n| *n != self.node));
        Ok(())
    }

    /// Marks the devices of nodes whose heartbeat expired offline (one reaper per dead node).
    async fn reap_dead(
        &self,
        events: &EventBus,
        registry: &Arc<dyn DeviceRegistry>,
    ) -> Result<(), StoreError> {
        let mut m = self.manager.clone();
        let nodes: Vec<String> = redis::cmd("SMEMBERS")
            .arg(NODES)
            .query_async(&mut m)
            .await?;
        for node in nodes.into_iter().filter(|n| *n != self.node) {
            let alive: bool = redis::cmd("EXISTS")
                .arg(node_key(&node))
                .query_async(&mut m)
                .await?;
            if alive {
                continue;
            }
            let lock: Option<String> = redis::cmd("SET")
                .arg(format!("hub:reap:{node}"))
                .arg(&self.node)
                .arg("NX")
                .arg("PX")
                .arg(30_000)
                .query_async(&mut m)
                .await?;
            if lock.is_none() {
                continue;
            }
            let gone: Vec<String> = self
                .reap
                .key(PRESENCE)
                .key(node_devices(&node))
                .key(NODES)
                .arg(&node)
                .invoke_async(&mut m)
                .await?;
            if !gone.is_empty() {
                tracing::warn!(dead_node = %node, devices = gone.len(), "node stopped heartbeating; its devices are offline");
            }
            let at = now_ms();
            let cause = format!("node_dead:{node}");
            for device in gone {
                let reg = registry.clone();
                let (d, c) = (device.clone(), cause.clone());
                let _ = tokio::task::spawn_blocking(move || {
                    reg.device_disconnected(&d, at, &c, 0, None)
                })
                .await;
                events.publish(HubEvent::Presence {
                    device,
                    online: false,
                    cause: cause.clone(),
                    at_ms: at,
                });
            }
        }
        Ok(())
    }

    async fn subscribe(
        self: Arc<Self>,
        presence: Arc<Presence>,
        events: EventBus,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let connected = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(CONTROL).await?;
                pubsub.subscribe(EVENTS).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            let mut pubsub = tokio::select! {
                _ = crate::stopping(&mut shutdown) => return,
                r = connected => match r {
                    Ok(p) => p,
                    Err(err) => {
                        tracing::warn!(error = %err, "backplane subscription failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                },
            };
            backoff = Duration::from_millis(100);
            let mut stream = pubsub.on_message();
            loop {
                let msg = tokio::select! {
                    _ = crate::stopping(&mut shutdown) => return,
                    m = stream.next() => m,
                };
                let Some(msg) = msg else { break };
                let payload: String = msg.get_payload().unwrap_or_default();
                match msg.get_channel_name() {
                    CONTROL => self.on_control(&presence, &payload),
                    EVENTS => self.on_event(&presence, &events, &payload),
                    _ => {}
                }
            }
            tracing::warn!("backplane subscription dropped; reconnecting");
        }
    }

    fn on_control(&self, presence: &Presence, payload: &str) {
        match serde_json::from_str::<Control>(payload) {
            Ok(Control::Nudge { node, device }) if node == self.node => {
                if let Some(conn) = presence.get(&device) {
                    conn.commands.notify_one();
                }
            }
            Ok(Control::Kick {
                node,
                device,
                conn_id,
                code,
            }) if node == self.node => {
                if let Some(conn) = presence.get(&device).filter(|c| c.conn_id == conn_id) {
                    let reason = if code == schemas::close::SUPERSEDED {
                        "superseded by a newer connection of this device"
                    } else {
                        "closed by the hub"
                    };
                    conn.kick.kick(code, reason);
                }
            }
            Ok(_) => {}
            Err(err) => tracing::debug!(error = %err, "ignoring a malformed control message"),
        }
    }

    fn on_event(&self, presence: &Presence, events: &EventBus, payload: &str) {
        let Ok(envelope) = serde_json::from_str::<Envelope>(payload) else {
            return;
        };
        if envelope.origin == self.node {
            return;
        }
        if let HubEvent::State { device, .. } = &envelope.event {
            // Desired state changed through another node: the connection here sends it.
            if let Some(conn) = presence.get(device) {
                conn.desired.notify_one();
            }
        }
        if let HubEvent::Command { command, .. } = &envelope.event {
            // A command of a device held here finished elsewhere (a sweep on another
            // node): its window has room again.
            if command.state.is_final() {
                if let Some(conn) = presence.get(&command.device) {
                    conn.commands.notify_one();
                }
            }
        }
        events.deliver_remote(envelope.event);
    }

    async fn forward(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<HubEvent>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let event = tokio::select! {
                _ = crate::stopping(&mut shutdown) => return,
                e = rx.recv() => match e { Some(e) => e, None => return },
            };
            let payload = serde_json::to_string(&Envelope {
                origin: self.node.clone(),
                event,
            })
            .unwrap_or_default();
            let mut m = self.manager.clone();
            let sent: Result<i64, _> = redis::cmd("PUBLISH")
                .arg(EVENTS)
                .arg(payload)
                .query_async(&mut m)
                .await;
            if let Err(err) = sent {
                metrics::counter!("hub_backplane_errors_total").increment(1);
                tracing::debug!(error = %err, "cannot forward an event to the backplane");
            }
        }
    }
}

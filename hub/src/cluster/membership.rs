//! Node membership: the heartbeat every node writes (`hub:node:{node}`, JSON, expiring
//! after three missed beats), what a node does after each beat (reconcile when it finds it
//! was absent, reap dead nodes, rebalance automatically), what it does when Redis stays out
//! of reach (give its devices up), and the cluster's status as the operator sees it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use super::rebalance::{self, NodeLoad, RebalanceMode};
use super::{node_key, Backplane, NODES, WANT_READINGS};
use crate::events::EventBus;
use crate::presence::Presence;
use crate::store::{now_ms, DeviceRegistry, StoreError};

/// Every this many beats a node reconciles even when nothing told it to, in case a
/// change was lost in a way it could not notice.
const RECONCILE_EVERY: u64 = 30;

/// What a heartbeat says about its node.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Beat {
    /// Which process wrote it.
    incarnation: String,
    /// Devices connected to the node.
    devices: usize,
    /// Devices the node is still to hand to other nodes.
    #[serde(default)]
    shedding: usize,
    /// The node's beat period (its beat expires after three).
    interval_ms: u64,
}

/// One node as the status shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    /// Node id.
    pub node: String,
    /// Whether its heartbeat is current (a dead node is listed until it is reaped).
    pub alive: bool,
    /// How long ago it last beat, by Redis's clock (None once its beat expired).
    pub heartbeat_age_ms: Option<u64>,
    /// Its beat period.
    pub heartbeat_ms: Option<u64>,
    /// Devices it held at its last beat.
    pub devices: usize,
    /// Devices it is still to hand to other nodes.
    pub shedding: usize,
}

/// The cluster as the operator sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    /// The node that answered.
    pub node: String,
    /// Every listed node, by id.
    pub nodes: Vec<NodeStatus>,
    /// Devices held by live nodes.
    pub devices: usize,
    /// How many devices each live node holds when balanced (rounded up).
    pub share: usize,
    /// `manual` or `auto`.
    pub rebalance: RebalanceMode,
    /// Devices per second a node hands over when rebalancing.
    pub rebalance_rate: u32,
}

impl ClusterStatus {
    /// The live nodes and the devices each holds.
    pub fn loads(&self) -> Vec<NodeLoad> {
        self.nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| NodeLoad {
                node: n.node.clone(),
                devices: n.devices,
            })
            .collect()
    }
}

impl Backplane {
    /// The Redis key lifetime of a beat.
    fn ttl_ms(&self) -> u64 {
        self.dead_after().as_millis() as u64
    }

    /// Writes this node's beat; returns the one it replaced (None if it had expired).
    async fn beat(&self, devices: usize) -> Result<Option<String>, StoreError> {
        let shedding = self
            .shedding
            .lock()
            .map(|s| s.as_ref().map_or(0, |s| s.remaining()))
            .unwrap_or(0);
        let beat = Beat {
            incarnation: self.incarnation.clone(),
            devices,
            shedding,
            interval_ms: self.heartbeat.as_millis() as u64,
        };
        let value = serde_json::to_string(&beat).unwrap_or_default();
        let mut m = self.manager.clone();
        let sent = now_ms();
        let (time, previous): ((u64, u64), Option<String>) = redis::pipe()
            .atomic()
            .cmd("TIME")
            .get(node_key(&self.node))
            .cmd("SET")
            .arg(node_key(&self.node))
            .arg(value)
            .arg("PX")
            .arg(self.ttl_ms())
            .ignore()
            .sadd(NODES, &self.node)
            .ignore()
            .query_async(&mut m)
            .await?;
        self.clock_offset_ms
            .store(super::clock_offset(time, sent), Ordering::Relaxed);
        Ok(previous)
    }

    /// Beats every `cluster.heartbeat` until shutdown. After a good beat: reconcile if this
    /// node was absent, reap dead nodes, rebalance automatically if configured, exchange
    /// readings interest. While beats fail: refuse new devices, and once they have failed
    /// for as long as the others need to declare this node dead, give every device up.
    pub(super) async fn heartbeat(
        self: Arc<Self>,
        presence: Arc<Presence>,
        events: EventBus,
        registry: Arc<dyn DeviceRegistry>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_ok = Instant::now();
        let mut beats: u64 = 0;
        let mut restarted = true;
        let mut quiet_until = Instant::now();
        loop {
            tokio::select! {
                _ = crate::stopping(&mut shutdown) => return,
                _ = tick.tick() => {}
            }
            // A beat that takes two periods is as good as lost: the next would be late too.
            let limit = self.heartbeat * 2;
            let beat = match tokio::time::timeout(limit, self.beat(presence.len())).await {
                Ok(result) => result,
                Err(_) => Err(StoreError::Other(format!(
                    "redis did not answer within {limit:?}"
                ))),
            };
            let previous = match beat {
                Ok(previous) => previous,
                Err(err) => {
                    self.beat_failed(&presence, last_ok, &err);
                    continue;
                }
            };
            last_ok = Instant::now();
            if !self.reachable.swap(true, Ordering::Relaxed) {
                tracing::info!(node = %self.node, "the cluster backplane answers again");
            }
            if self.detached.swap(false, Ordering::Relaxed) {
                metrics::gauge!("hub_cluster_detached").set(0.0);
                tracing::warn!(node = %self.node, "rejoined the cluster; accepting devices again");
            }
            let previous: Option<Beat> = previous.and_then(|v| serde_json::from_str(&v).ok());
            match &previous {
                None => {
                    if !restarted {
                        tracing::warn!(node = %self.node, "this node's heartbeat had expired (a stall, or Redis out of reach); reasserting its devices");
                    }
                    self.reconcile_due.store(true, Ordering::Relaxed);
                }
                Some(p) if p.incarnation != self.incarnation => {
                    if !restarted {
                        tracing::error!(node = %self.node, "another hub beats with this node id: give every hub its own cluster.node_id");
                    }
                    self.reconcile_due.store(true, Ordering::Relaxed);
                }
                Some(_) => {}
            }
            beats += 1;
            if beats % RECONCILE_EVERY == 0 {
                self.reconcile_due.store(true, Ordering::Relaxed);
            }
            if self.reconcile_due.swap(false, Ordering::Relaxed) {
                let cause = if restarted {
                    format!("node_restarted:{}", self.node)
                } else {
                    "connection_ended".to_string()
                };
                match self.reconcile(&presence, &events, &registry, &cause).await {
                    Ok(done) if done != Default::default() => {
                        tracing::info!(node = %self.node, reclaimed = done.reclaimed, released = done.released, superseded = done.lost, "reconciled presence with the backplane");
                    }
                    Ok(_) => {}
                    Err(err) => {
                        self.reconcile_due.store(true, Ordering::Relaxed);
                        tracing::warn!(error = %err, "cannot reconcile presence; retrying next beat");
                    }
                }
            }
            restarted = false;
            match self.reap_dead(&events, &registry).await {
                Ok(loads) => {
                    if loads.len() < 2 && self.shedding_active() {
                        // No other node to take them: keep every device.
                        self.stop_shedding("no other live node");
                    }
                    if self.rebalance.mode == RebalanceMode::Auto
                        && Instant::now() >= quiet_until
                        && self.auto_rebalance(&presence, &loads)
                    {
                        // Let the moved devices settle and every node beat its new count
                        // before judging the balance again.
                        quiet_until = Instant::now()
                            + (self.heartbeat * 5).max(Duration::from_secs(3))
                            + rebalance::duration(self.shed_remaining(), self.rebalance.rate);
                    }
                }
                Err(err) => tracing::warn!(error = %err, "dead-node reaper failed"),
            }
            if let Err(err) = self.share_readings_interest(&events, self.ttl_ms()).await {
                tracing::debug!(error = %err, "cannot exchange readings interest");
            }
        }
    }

    /// A beat failed: refuse new devices now; give every device up once beats have failed
    /// for as long as the others need to declare this node dead. Repeated on every failed
    /// beat, so that a device that slipped in meanwhile goes too.
    fn beat_failed(&self, presence: &Presence, last_ok: Instant, err: &StoreError) {
        metrics::counter!("hub_backplane_errors_total").increment(1);
        self.reconcile_due.store(true, Ordering::Relaxed);
        if self.reachable.swap(false, Ordering::Relaxed) {
            tracing::warn!(error = %err, "backplane heartbeat failed; refusing new devices until Redis answers");
        } else {
            tracing::debug!(error = %err, "backplane heartbeat failed again");
        }
        if last_ok.elapsed() < self.dead_after() {
            return;
        }
        let connections = presence.snapshot();
        if !self.detached.swap(true, Ordering::Relaxed) {
            metrics::gauge!("hub_cluster_detached").set(1.0);
            metrics::counter!("hub_cluster_moves_total").increment(connections.len() as u64);
            tracing::error!(
                node = %self.node,
                devices = connections.len(),
                "no heartbeat reached Redis for {:?}: the other nodes now count this node as dead; \
                 closing every device with 4010 so that they reconnect to a node that can serve them",
                self.dead_after()
            );
        }
        for (_, conn) in connections {
            conn.signals.kick(
                schemas::close::RECONNECT,
                "this hub lost its cluster backplane; reconnect to another node",
            );
        }
    }

    /// Reaps every listed node whose beat has expired; returns the load of the live ones.
    async fn reap_dead(
        &self,
        events: &EventBus,
        registry: &Arc<dyn DeviceRegistry>,
    ) -> Result<Vec<NodeLoad>, StoreError> {
        let nodes = self.read_nodes().await?;
        let mut loads = Vec::with_capacity(nodes.len());
        for (node, beat, _) in nodes {
            match beat {
                Some(beat) => loads.push(NodeLoad {
                    node,
                    devices: beat.devices,
                }),
                None if node != self.node => {
                    self.reap(&node, events, registry).await?;
                }
                None => {}
            }
        }
        Ok(loads)
    }

    /// Every listed node with its beat (None once expired) and the beat's remaining
    /// lifetime in ms.
    async fn read_nodes(&self) -> Result<Vec<(String, Option<Beat>, i64)>, StoreError> {
        let mut m = self.manager.clone();
        let mut nodes: Vec<String> = redis::cmd("SMEMBERS")
            .arg(NODES)
            .query_async(&mut m)
            .await?;
        nodes.sort();
        if nodes.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for node in &nodes {
            pipe.get(node_key(node)).pttl(node_key(node));
        }
        let answers: Vec<redis::Value> = pipe.query_async(&mut m).await?;
        let mut out = Vec::with_capacity(nodes.len());
        for (node, pair) in nodes.into_iter().zip(answers.chunks(2)) {
            let beat = match pair.first() {
                Some(redis::Value::BulkString(bytes)) => serde_json::from_slice::<Beat>(bytes).ok(),
                _ => None,
            };
            let pttl = match pair.get(1) {
                Some(redis::Value::Int(ms)) => *ms,
                _ => -2,
            };
            out.push((node, beat, pttl));
        }
        Ok(out)
    }

    /// The cluster's nodes, their devices and heartbeat ages.
    ///
    /// # Errors
    /// Redis failed.
    ///
    /// Cancel safety: safe; it only reads.
    pub async fn status(&self) -> Result<ClusterStatus, StoreError> {
        let nodes: Vec<NodeStatus> = self
            .read_nodes()
            .await?
            .into_iter()
            .map(|(node, beat, pttl)| match beat {
                Some(beat) => {
                    let lifetime = (beat.interval_ms * 3).max(300);
                    NodeStatus {
                        node,
                        alive: true,
                        heartbeat_age_ms: u64::try_from(pttl)
                            .ok()
                            .map(|left| lifetime.saturating_sub(left)),
                        heartbeat_ms: Some(beat.interval_ms),
                        devices: beat.devices,
                        shedding: beat.shedding,
                    }
                }
                None => NodeStatus {
                    node,
                    alive: false,
                    heartbeat_age_ms: None,
                    heartbeat_ms: None,
                    devices: 0,
                    shedding: 0,
                },
            })
            .collect();
        let mut status = ClusterStatus {
            node: self.node.clone(),
            devices: 0,
            share: 0,
            nodes,
            rebalance: self.rebalance.mode,
            rebalance_rate: self.rebalance.rate,
        };
        let live = status.loads();
        status.devices = live.iter().map(|l| l.devices).sum();
        status.share = rebalance::share(&live);
        Ok(status)
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
}

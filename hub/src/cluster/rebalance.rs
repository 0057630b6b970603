//! Rebalancing: after a failover the survivors hold the whole fleet and a restarted node
//! gets nothing back, since devices stay where they are connected. A rebalance asks the
//! devices a node holds beyond its share to reconnect (close 4010), paced at
//! `cluster.rebalance_rate` per second; while it does, the node turns new devices away
//! (HTTP 503) once it is down to its share, so the load balancer (or the device's retry)
//! takes them to another node. `hub cluster rebalance` starts one (through `hub:control`,
//! to every node above its share); with `cluster.rebalance = "auto"` a node starts its own
//! once it holds more than its share plus a tenth (at least two devices).

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use super::pubsub::Control;
use super::Backplane;
use crate::presence::Presence;
use crate::store::StoreError;

/// How long a node keeps turning new devices away after it asked the last device of a
/// hand-over to move.
const LINGER: Duration = Duration::from_secs(3);

/// Whether nodes rebalance on their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RebalanceMode {
    /// Only when an operator asks (`hub cluster rebalance`).
    Manual,
    /// A node above its share (plus a tenth, at least two devices) sheds the excess.
    Auto,
}

/// The rebalancing settings of a node.
#[derive(Debug, Clone, Copy)]
pub(super) struct Settings {
    pub mode: RebalanceMode,
    /// Devices per second a node asks to move.
    pub rate: u32,
}

/// A live node and the devices it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLoad {
    /// Node id.
    pub node: String,
    /// Devices it holds.
    pub devices: usize,
}

/// Devices one node is asked to hand over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Move {
    /// Node id.
    pub node: String,
    /// It holds this many now.
    pub holds: usize,
    /// It is asked to hand over this many.
    pub devices: usize,
}

/// What a rebalance does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RebalancePlan {
    /// Devices per live node when balanced (rounded up).
    pub share: usize,
    /// The nodes above their share and what each hands over.
    pub moves: Vec<Move>,
    /// Devices per second each node hands over.
    pub rate: u32,
    /// About how long the slowest node takes, in ms.
    pub duration_ms: u64,
    /// Whether the nodes were told to start (false for a dry run or nothing to move).
    pub started: bool,
}

/// Devices per live node when balanced, rounded up (0 without live nodes).
pub fn share(loads: &[NodeLoad]) -> usize {
    let total: usize = loads.iter().map(|l| l.devices).sum();
    total.div_ceil(loads.len().max(1))
}

/// The moves that bring every node down to its share: each node above it hands over the
/// excess. With `slack`, a node moves nothing unless it holds more than its share plus a
/// tenth of it (at least two devices), which keeps automatic rebalancing from chasing the
/// ordinary coming and going of devices.
pub fn plan(loads: &[NodeLoad], slack: bool) -> Vec<Move> {
    let share = share(loads);
    let allowance = if slack { (share / 10).max(2) } else { 0 };
    loads
        .iter()
        .filter(|l| l.devices > share + allowance)
        .map(|l| Move {
            node: l.node.clone(),
            holds: l.devices,
            devices: l.devices - share,
        })
        .collect()
}

/// How long handing over `devices` takes at `rate` per second.
pub fn duration(devices: usize, rate: u32) -> Duration {
    Duration::from_secs_f64(devices as f64 / f64::from(rate.max(1)))
}

/// A hand-over in progress on this node.
#[derive(Debug)]
pub(super) struct Shed {
    /// The node turns new devices away while it holds at least this many.
    pub keep: usize,
    /// Connections still to close (device, connection id), in a random order.
    queue: VecDeque<(Arc<str>, u64)>,
    interval: Duration,
    next_at: Instant,
    /// A hand-over never blocks new devices for longer than this.
    deadline: Instant,
}

impl Shed {
    /// Connections still to close.
    pub fn remaining(&self) -> usize {
        self.queue.len()
    }
}

impl Backplane {
    /// Devices this node is still to hand over.
    pub(super) fn shed_remaining(&self) -> usize {
        self.shedding
            .lock()
            .map(|s| s.as_ref().map_or(0, Shed::remaining))
            .unwrap_or(0)
    }

    /// Starts handing over `count` of this node's devices at `rate` per second.
    pub(super) fn start_shedding(&self, presence: &Presence, count: usize, rate: u32) {
        let mut connections = presence.snapshot();
        let keep = connections.len().saturating_sub(count);
        // A random choice of devices: any order that does not favour some ids will do.
        let order = std::collections::hash_map::RandomState::new();
        connections.sort_by_key(|(device, _)| order.hash_one(device));
        let queue: VecDeque<(Arc<str>, u64)> = connections
            .into_iter()
            .take(count)
            .map(|(device, conn)| (device, conn.conn_id))
            .collect();
        if queue.is_empty() {
            return;
        }
        let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
        let now = Instant::now();
        tracing::info!(node = %self.node, devices = queue.len(), keep, rate, "rebalancing: handing devices to other nodes");
        let shed = Shed {
            keep,
            deadline: now + duration(queue.len(), rate) + Duration::from_secs(30),
            queue,
            interval,
            next_at: now,
        };
        if let Ok(mut slot) = self.shedding.lock() {
            *slot = Some(shed);
        }
        self.shed_changed.notify_one();
    }

    /// Whether a hand-over is under way (closing devices, or turning new ones away until
    /// the last moved ones have settled).
    pub(super) fn shedding_active(&self) -> bool {
        self.shedding.lock().map(|s| s.is_some()).unwrap_or(false)
    }

    /// Ends the current hand-over, if any.
    pub(super) fn stop_shedding(&self, why: &str) {
        if let Ok(mut slot) = self.shedding.lock() {
            if slot.take().is_some() {
                tracing::info!(node = %self.node, why, "rebalancing stopped");
            }
        }
        self.shed_changed.notify_one();
    }

    /// Automatic mode: starts a hand-over when this node holds more than its share plus
    /// the slack. Returns whether it did.
    pub(super) fn auto_rebalance(&self, presence: &Presence, loads: &[NodeLoad]) -> bool {
        if self.shedding_active() || loads.len() < 2 {
            return false;
        }
        let Some(mine) = plan(loads, true).into_iter().find(|m| m.node == self.node) else {
            return false;
        };
        self.start_shedding(presence, mine.devices, self.rebalance.rate);
        true
    }

    /// Closes the connections of the current hand-over one at a time, paced, until the
    /// queue is empty, the node is down to what it keeps, or the deadline passes.
    pub(super) async fn shed(
        self: Arc<Self>,
        presence: Arc<Presence>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let next = self
                .shedding
                .lock()
                .ok()
                .and_then(|s| s.as_ref().map(|s| s.next_at));
            tokio::select! {
                _ = crate::stopping(&mut shutdown) => return,
                _ = self.shed_changed.notified() => continue,
                _ = sleep_until(next) => {}
            }
            let Ok(mut slot) = self.shedding.lock() else {
                return;
            };
            let Some(shed) = slot.as_mut() else { continue };
            let now = Instant::now();
            if now < shed.next_at {
                continue;
            }
            while let Some((device, conn_id)) = shed.queue.pop_front() {
                if presence.len() <= shed.keep {
                    shed.queue.clear();
                    break;
                }
                // A device that left or reconnected on its own is not asked again.
                if let Some(conn) = presence.get(&device).filter(|c| c.conn_id == conn_id) {
                    conn.signals.kick(
                        schemas::close::RECONNECT,
                        "rebalancing: reconnect, another node will take you",
                    );
                    metrics::counter!("hub_cluster_moves_total").increment(1);
                    break;
                }
            }
            if shed.queue.is_empty() {
                // Keep turning new devices away until the last ones asked to move have
                // reconnected elsewhere (they come back within a second).
                shed.deadline = shed.deadline.min(now + LINGER);
                shed.next_at = shed.deadline;
            } else {
                shed.next_at += shed.interval;
            }
            if now >= shed.deadline {
                tracing::info!(node = %self.node, devices = presence.len(), "rebalancing done on this node");
                *slot = None;
            }
        }
    }

    /// Plans a rebalance from the current heartbeats and, unless `dry_run`, tells every
    /// node above its share to hand over its excess at `rate` devices per second (the
    /// configured rate when None).
    ///
    /// # Errors
    /// Redis failed.
    ///
    /// Cancel safety: not cancel safe: some nodes may have been told to start.
    pub async fn rebalance(
        &self,
        rate: Option<u32>,
        dry_run: bool,
    ) -> Result<RebalancePlan, StoreError> {
        let loads = self.status().await?.loads();
        let rate = rate.unwrap_or(self.rebalance.rate).max(1);
        let moves = plan(&loads, false);
        let slowest = moves.iter().map(|m| m.devices).max().unwrap_or(0);
        let started = !dry_run && !moves.is_empty();
        if started {
            for m in &moves {
                self.publish_control(&Control::Shed {
                    node: m.node.clone(),
                    devices: m.devices,
                    rate,
                })
                .await?;
            }
        }
        Ok(RebalancePlan {
            share: share(&loads),
            duration_ms: duration(slowest, rate).as_millis() as u64,
            moves,
            rate,
            started,
        })
    }
}

/// Sleeps until `at`, or forever when there is nothing scheduled.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(counts: &[usize]) -> Vec<NodeLoad> {
        counts
            .iter()
            .enumerate()
            .map(|(i, n)| NodeLoad {
                node: format!("n{i}"),
                devices: *n,
            })
            .collect()
    }

    fn moved(moves: &[Move]) -> Vec<(String, usize)> {
        moves.iter().map(|m| (m.node.clone(), m.devices)).collect()
    }

    #[test]
    fn the_fullest_nodes_hand_over_their_excess() {
        assert_eq!(share(&loads(&[300, 0])), 150);
        assert_eq!(moved(&plan(&loads(&[300, 0]), false)), [("n0".into(), 150)]);
        assert_eq!(share(&loads(&[7, 0, 0])), 3);
        assert_eq!(moved(&plan(&loads(&[7, 0, 0]), false)), [("n0".into(), 4)]);
        assert_eq!(
            moved(&plan(&loads(&[10, 10, 1]), false)),
            [("n0".into(), 3), ("n1".into(), 3)]
        );
        assert!(plan(&loads(&[5, 5]), false).is_empty());
        assert!(plan(&loads(&[]), false).is_empty());
        assert!(plan(&loads(&[0, 0]), false).is_empty());
    }

    #[test]
    fn automatic_rebalancing_leaves_small_imbalances_alone() {
        // Share 10, slack 2: 12 stays, 13 moves down to 10.
        assert!(plan(&loads(&[12, 8]), true).is_empty());
        assert_eq!(moved(&plan(&loads(&[13, 7]), true)), [("n0".into(), 3)]);
        // Share 500, slack 50.
        assert!(plan(&loads(&[550, 450]), true).is_empty());
        assert_eq!(
            moved(&plan(&loads(&[600, 400]), true)),
            [("n0".into(), 100)]
        );
        // One device more than the other is never worth a move.
        assert!(plan(&loads(&[2, 1]), true).is_empty());
        assert!(plan(&loads(&[2, 1]), false).is_empty());
    }

    #[test]
    fn pacing() {
        assert_eq!(duration(20, 10), Duration::from_secs(2));
        assert_eq!(duration(5, 0), Duration::from_secs(5));
    }
}

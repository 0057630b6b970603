//! Who holds which device: claims and releases by connections, the reaper's verdict on a
//! dead node, and reconciliation, by which a node that was absent (stalled, cut off from
//! Redis, restarted under the same id, or Redis lost its data) makes the shared presence
//! match the connections it really has. Every change is one Lua script, so a claim, a
//! release, a reap and a reassertion never interleave.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::{node_devices, node_key, Backplane, NODES, PRESENCE};
use crate::events::{EventBus, HubEvent};
use crate::presence::Presence;
use crate::store::{now_ms, DeviceRegistry, StoreError};

/// Takes a device for a connection: returns the previous holder. Also (re)lists the node,
/// so that a node whose heartbeat lapsed is reaped again if it dies now. Fenced: a claim
/// that reaches Redis after its deadline (held up in a partition, then delivered by TCP
/// once it heals) is refused, so it cannot overwrite a newer claim by another node.
const CLAIM: &str = r"
local t = redis.call('TIME')
if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > tonumber(ARGV[4]) then
  return redis.error_reply('stale claim: it reached redis after its deadline')
end
local old = redis.call('HGET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('SADD', KEYS[3], ARGV[3])
return old";

/// Lets go of a device if this exact connection still holds it; returns 1 if it did.
const RELEASE: &str = r"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('SREM', KEYS[2], ARGV[1])
  return 1
end
if not v or string.sub(v, 1, #ARGV[3]) ~= ARGV[3] then redis.call('SREM', KEYS[2], ARGV[1]) end
return 0";

/// Takes a dead node's devices offline, unless its heartbeat is back (checked inside the
/// script, so a node that beats again is never reaped after the fact). The node's list is
/// deleted, so exactly one reaper gets each device.
const REAP: &str = r"
if redis.call('EXISTS', KEYS[4]) == 1 then return {} end
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

/// Reasserts this node's connections: for each (device, value) pair, 0 if presence
/// already says so; 1 if the device was held by nobody or by a dead node and is claimed
/// again; 2 if an older connection of this node was recorded and is replaced; 3 if a live
/// node holds the device (this node's connection is stale). Fenced like [`CLAIM`].
const REASSERT: &str = r"
local t = redis.call('TIME')
if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) > tonumber(ARGV[2]) then
  return redis.error_reply('stale reassertion: it reached redis after its deadline')
end
local out = {}
for i = 3, #ARGV, 2 do
  local d, want = ARGV[i], ARGV[i + 1]
  local v = redis.call('HGET', KEYS[1], d)
  local code = 0
  if v ~= want then
    if not v then
      code = 1
    elseif string.sub(v, 1, #ARGV[1]) == ARGV[1] then
      code = 2
    else
      local other = string.match(v, '^(.*)|[^|]*$')
      if other and redis.call('EXISTS', 'hub:node:' .. other) == 0 then code = 1 else code = 3 end
    end
    if code ~= 3 then redis.call('HSET', KEYS[1], d, want) end
  end
  if code ~= 3 then redis.call('SADD', KEYS[2], d) end
  table.insert(out, code)
end
return out";

/// Lets go of devices whose recorded value is exactly the one given (connections of this
/// node that ended while Redis could not hear about it); returns those released.
const RELEASE_STALE: &str = r"
local out = {}
for i = 1, #ARGV, 2 do
  local d, v = ARGV[i], ARGV[i + 1]
  if redis.call('HGET', KEYS[1], d) == v then
    redis.call('HDEL', KEYS[1], d)
    table.insert(out, d)
  end
  redis.call('SREM', KEYS[2], d)
end
return out";

/// Devices per reconciliation script call, so that one call never holds Redis long.
const CHUNK: usize = 500;

/// The scripts, loaded once per process.
pub(super) struct Scripts {
    claim: redis::Script,
    release: redis::Script,
    reap: redis::Script,
    reassert: redis::Script,
    release_stale: redis::Script,
}

impl Scripts {
    pub(super) fn new() -> Scripts {
        Scripts {
            claim: redis::Script::new(CLAIM),
            release: redis::Script::new(RELEASE),
            reap: redis::Script::new(REAP),
            reassert: redis::Script::new(REASSERT),
            release_stale: redis::Script::new(RELEASE_STALE),
        }
    }
}

/// Which node holds a device, and on which connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Node id.
    pub node: String,
    /// Connection id on that node.
    pub conn_id: u64,
}

impl Owner {
    pub(super) fn parse(v: &str) -> Option<Owner> {
        let (node, conn) = v.rsplit_once('|')?;
        Some(Owner {
            node: node.to_string(),
            conn_id: conn.parse().ok()?,
        })
    }
}

/// What [`Backplane::let_go`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LetGo {
    /// The device is offline: record it.
    Offline,
    /// Another connection (here or on another node) holds the device: nothing to record.
    Elsewhere,
    /// Redis is out of reach: the device is offline as far as this node knows, but the
    /// shared registry cannot be written now. The next successful heartbeat reconciles:
    /// it releases the device and records it offline, unless another node took it.
    Deferred,
}

/// What a reconciliation changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Reconciled {
    /// Devices claimed again (they were held by nobody or by a dead node).
    pub reclaimed: usize,
    /// Devices let go of (their connection here had ended).
    pub released: usize,
    /// Connections closed because a live node holds their device now.
    pub lost: usize,
}

impl Backplane {
    fn me(&self, conn_id: u64) -> String {
        format!("{}|{conn_id}", self.node)
    }

    fn prefix(&self) -> String {
        format!("{}|", self.node)
    }

    /// The deadline, in Redis's clock (ms), of a claim sent now: as long as the caller
    /// waits for an answer. A claim that arrives later is refused (see [`CLAIM`]).
    fn fence(&self) -> u64 {
        let redis_now = now_ms() as i64 + self.clock_offset_ms.load(Ordering::Relaxed);
        u64::try_from(redis_now).unwrap_or(0) + super::sync::IO_TIMEOUT.as_millis() as u64
    }

    /// Records that this node holds `device` on `conn_id`; returns the previous holder.
    ///
    /// # Errors
    /// Redis failed (then the next heartbeat reconciles).
    ///
    /// Cancel safety: not cancel safe: the claim may be recorded in Redis without the caller knowing the previous owner.
    pub async fn claim(&self, device: &str, conn_id: u64) -> Result<Option<Owner>, StoreError> {
        let mut m = self.manager.clone();
        let old: Result<Option<String>, _> = self
            .scripts
            .claim
            .key(PRESENCE)
            .key(node_devices(&self.node))
            .key(NODES)
            .arg(device)
            .arg(self.me(conn_id))
            .arg(&self.node)
            .arg(self.fence())
            .invoke_async(&mut m)
            .await;
        match old {
            Ok(old) => Ok(old.as_deref().and_then(Owner::parse)),
            Err(err) => {
                self.reconcile_due.store(true, Ordering::Relaxed);
                Err(err.into())
            }
        }
    }

    /// Drops this node's hold on `device` if it is still `conn_id`'s. Returns whether it
    /// was (false: another connection, maybe on another node, took over).
    ///
    /// # Errors
    /// Redis failed (then the next heartbeat reconciles).
    ///
    /// Cancel safety: not cancel safe: the release may happen without the caller learning whether the device was still its own.
    pub async fn release(&self, device: &str, conn_id: u64) -> Result<bool, StoreError> {
        let mut m = self.manager.clone();
        let released: Result<i64, _> = self
            .scripts
            .release
            .key(PRESENCE)
            .key(node_devices(&self.node))
            .arg(device)
            .arg(self.me(conn_id))
            .arg(self.prefix())
            .invoke_async(&mut m)
            .await;
        match released {
            Ok(n) => Ok(n == 1),
            Err(err) => {
                self.reconcile_due.store(true, Ordering::Relaxed);
                Err(err.into())
            }
        }
    }

    /// Takes `device` for the connection `conn_id` that just started here. Returns why
    /// its previous connection ended when another node held it: `superseded` (that node
    /// is alive and is told to close it) or `node_dead:NODE`. A Redis failure is logged
    /// and left to the next heartbeat's reconciliation.
    ///
    /// Cancel safety: not cancel safe (see [`Backplane::claim`]).
    pub async fn hold(&self, device: &str, conn_id: u64) -> Option<String> {
        match self.claim(device, conn_id).await {
            Ok(Some(previous)) if previous.node != self.node => {
                if self.node_alive(&previous.node).await {
                    // The device was held by another node: that connection must go.
                    self.kick(&previous, device, schemas::close::SUPERSEDED)
                        .await;
                    Some("superseded".into())
                } else {
                    Some(format!("node_dead:{}", previous.node))
                }
            }
            Ok(_) => None,
            Err(err) => {
                tracing::warn!(%device, error = %err, "cannot record presence on the backplane; the next heartbeat reconciles");
                None
            }
        }
    }

    /// Lets go of `device` after its connection `conn_id` here ended, and says what is to
    /// be recorded.
    ///
    /// Cancel safety: not cancel safe (see [`Backplane::release`]).
    pub async fn let_go(&self, device: &str, conn_id: u64) -> LetGo {
        if !self.reachable.load(Ordering::Relaxed) {
            // Waiting for Redis to time out would hold up the device's close frame.
            self.reconcile_due.store(true, Ordering::Relaxed);
            return LetGo::Deferred;
        }
        match self.release(device, conn_id).await {
            Ok(true) => LetGo::Offline,
            Ok(false) => LetGo::Elsewhere,
            Err(err) => {
                tracing::warn!(%device, error = %err, "cannot release presence on the backplane; the next heartbeat reconciles");
                LetGo::Deferred
            }
        }
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

    /// Takes the devices of `node` offline if its heartbeat has expired; returns them
    /// (empty when the node is alive again or another reaper got there first).
    pub(super) async fn reap(
        &self,
        node: &str,
        events: &EventBus,
        registry: &Arc<dyn DeviceRegistry>,
    ) -> Result<usize, StoreError> {
        let mut m = self.manager.clone();
        let gone: Vec<String> = self
            .scripts
            .reap
            .key(PRESENCE)
            .key(node_devices(node))
            .key(NODES)
            .key(node_key(node))
            .arg(node)
            .invoke_async(&mut m)
            .await?;
        if gone.is_empty() {
            return Ok(0);
        }
        tracing::warn!(dead_node = %node, devices = gone.len(), "node stopped heartbeating; its devices are offline");
        metrics::counter!("hub_cluster_reaped_total").increment(gone.len() as u64);
        let n = gone.len();
        offline(gone, &format!("node_dead:{node}"), events, registry).await;
        Ok(n)
    }

    /// Makes the shared presence match this node's connections: devices recorded for
    /// this node whose connection here has ended are let go of (offline, `cause`); every
    /// connection here is claimed again unless a live node holds its device, in which case
    /// the connection is closed (superseded). Devices claimed again are announced online
    /// (`node_rejoined`) and fetch their commands, which may have queued meanwhile.
    pub(super) async fn reconcile(
        &self,
        presence: &Presence,
        events: &EventBus,
        registry: &Arc<dyn DeviceRegistry>,
        cause: &str,
    ) -> Result<Reconciled, StoreError> {
        let mut m = self.manager.clone();
        let mut done = Reconciled::default();
        // The recorded list first, then the connections: a connection claims only after it
        // registered here, so everything recorded by a live connection is in the snapshot.
        let recorded: Vec<String> = redis::cmd("SMEMBERS")
            .arg(node_devices(&self.node))
            .query_async(&mut m)
            .await?;
        let local = presence.snapshot();
        let held: HashSet<&str> = local.iter().map(|(d, _)| &**d).collect();
        let ended: Vec<&String> = recorded
            .iter()
            .filter(|d| !held.contains(d.as_str()))
            .collect();
        for chunk in ended.chunks(CHUNK) {
            let values: Vec<Option<String>> = redis::cmd("HMGET")
                .arg(PRESENCE)
                .arg(chunk)
                .query_async(&mut m)
                .await?;
            let prefix = self.prefix();
            let mut release = self.scripts.release_stale.key(PRESENCE);
            release.key(node_devices(&self.node));
            let mut any = false;
            for (device, value) in chunk.iter().zip(values) {
                // A value of another node is not ours to release; the script still takes
                // the device off this node's list.
                let value = value.filter(|v| v.starts_with(&prefix)).unwrap_or_default();
                release.arg(device.as_str()).arg(value);
                any = true;
            }
            if !any {
                continue;
            }
            let released: Vec<String> = release.invoke_async(&mut m).await?;
            done.released += released.len();
            offline(released, cause, events, registry).await;
        }
        let mut rejoined = Vec::new();
        for chunk in local.chunks(CHUNK) {
            let mut reassert = self.scripts.reassert.key(PRESENCE);
            reassert
                .key(node_devices(&self.node))
                .arg(self.prefix())
                .arg(self.fence());
            for (device, conn) in chunk {
                reassert.arg(&**device).arg(self.me(conn.conn_id));
            }
            let codes: Vec<i64> = reassert.invoke_async(&mut m).await?;
            for ((device, conn), code) in chunk.iter().zip(codes) {
                match code {
                    0 => continue,
                    3 => {
                        done.lost += 1;
                        conn.signals.kick(
                            schemas::close::SUPERSEDED,
                            "superseded: another node holds this device now",
                        );
                        continue;
                    }
                    1 => {
                        done.reclaimed += 1;
                        rejoined.push(device.to_string());
                    }
                    _ => {}
                }
                // Commands may have queued while no node was known to hold the device.
                conn.signals.commands_ready();
                // A newer connection of the device may have claimed in between and been
                // overwritten: look again next beat.
                if presence.get(device).map(|c| c.conn_id) != Some(conn.conn_id) {
                    self.reconcile_due.store(true, Ordering::Relaxed);
                }
            }
        }
        if !rejoined.is_empty() {
            let at = now_ms();
            let mut pipe = redis::pipe();
            for device in &rejoined {
                pipe.hset_multiple(
                    super::registry::record_key(device),
                    &[
                        ("online", "1"),
                        ("node", self.node.as_str()),
                        ("last_cause", "node_rejoined"),
                    ],
                )
                .ignore();
            }
            pipe.query_async::<()>(&mut m).await?;
            for device in rejoined {
                events.publish(HubEvent::Presence {
                    device,
                    online: true,
                    cause: "node_rejoined".into(),
                    at_ms: at,
                });
            }
        }
        metrics::counter!("hub_cluster_reasserted_total").increment(done.reclaimed as u64);
        Ok(done)
    }
}

/// Records devices as offline (registry and event bus) with `cause`.
async fn offline(
    devices: Vec<String>,
    cause: &str,
    events: &EventBus,
    registry: &Arc<dyn DeviceRegistry>,
) {
    let at = now_ms();
    for device in devices {
        let reg = registry.clone();
        let (d, c) = (device.clone(), cause.to_string());
        let _ =
            tokio::task::spawn_blocking(move || reg.device_disconnected(&d, at, &c, 0, None)).await;
        events.publish(HubEvent::Presence {
            device,
            online: false,
            cause: cause.to_string(),
            at_ms: at,
        });
    }
}

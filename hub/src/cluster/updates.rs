//! Firmware updates and rollouts in Redis, shared by every node of a cluster: a device's
//! update is offered by whichever node holds its connection, and any node may advance a
//! rollout, one at a time, under a lease that the node renews while it runs; when that
//! node dies another takes the rollout over once the lease lapses and carries on from the
//! stored state (the rollout keeps nothing else).
//!
//! Keys: hash `hub:update:{device}` (the device's one update), set `hub:updates` (devices
//! with an update), set `hub:rollout:{id}:updates` (devices whose update that rollout
//! assigned), `hub:rollout:next` (id counter), hash `hub:rollout:{id}` (spec as JSON,
//! state, reason, times), list `hub:rollout:{id}:targets`, sorted set `hub:rollouts` (every
//! rollout by id), string `hub:rollout:{id}:lease` (the holder, with a TTL). Every change
//! of an update or a rollout's state is one Lua script, so the one-update-per-device rule
//! and the forward-only rule hold however many nodes race. Scripts touch keys they
//! compute, so this needs a single Redis, as the ledger does.

use std::collections::HashMap;
use std::sync::Arc;

use schemas::UpdateState;

use super::jobs::take_lease;
use super::sync::SyncRedis;
use crate::store::updates::{
    RolloutRecord, RolloutSpec, RolloutState, UpdateRecord, UpdateStage, UpdateStore,
};
use crate::store::StoreError;

const DEVICES: &str = "hub:updates";
const NEXT: &str = "hub:rollout:next";
const ALL: &str = "hub:rollouts";
/// Targets pushed per RPUSH, so one huge rollout does not make one huge command.
const TARGET_CHUNK: usize = 1000;

fn update_key(device: &str) -> String {
    format!("hub:update:{device}")
}

fn rollout_key(id: u64) -> String {
    format!("hub:rollout:{id}")
}

/// Replaces the device's update with a new offer, moving it from the old rollout's set
/// to the new one's.
const ASSIGN: &str = r"
local old = redis.call('HGET', KEYS[1], 'rollout')
if old and old ~= '' then redis.call('SREM', 'hub:rollout:' .. old .. ':updates', ARGV[1]) end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'device', ARGV[1], 'version', ARGV[2], 'stage', 'offered',
  'percent', 0, 'reason', '', 'rollout', ARGV[3], 'assigned_at', ARGV[4], 'updated_at', ARGV[4])
redis.call('SADD', KEYS[2], ARGV[1])
if ARGV[3] ~= '' then redis.call('SADD', 'hub:rollout:' .. ARGV[3] .. ':updates', ARGV[1]) end
return 1";

/// Moves an update forward: only for the same version, never from a final stage (listed
/// from ARGV[6] on), and only when the report differs from what is stored. Returns the
/// record when it changed, else nothing.
const REPORT: &str = r"
local cur = redis.call('HMGET', KEYS[1], 'version', 'stage', 'percent')
if not cur[1] or cur[1] ~= ARGV[1] then return {} end
for i = 6, #ARGV do
  if cur[2] == ARGV[i] then return {} end
end
if cur[2] == ARGV[2] and cur[3] == ARGV[3] then return {} end
redis.call('HSET', KEYS[1], 'stage', ARGV[2], 'percent', ARGV[3], 'reason', ARGV[4], 'updated_at', ARGV[5])
return redis.call('HGETALL', KEYS[1])";

/// Deletes the device's update if it is still only offered.
const WITHDRAW: &str = r"
if redis.call('HGET', KEYS[1], 'stage') ~= 'offered' then return 0 end
local r = redis.call('HGET', KEYS[1], 'rollout')
if r and r ~= '' then redis.call('SREM', 'hub:rollout:' .. r .. ':updates', ARGV[1]) end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
return 1";

/// Moves a rollout to ARGV[1] (reason ARGV[2], at ARGV[3]) if its state is one of those
/// from ARGV[4] on.
const SET_STATE: &str = r"
local s = redis.call('HGET', KEYS[1], 'state')
if not s then return 0 end
for i = 4, #ARGV do
  if s == ARGV[i] then
    redis.call('HSET', KEYS[1], 'state', ARGV[1], 'reason', ARGV[2], 'updated_at', ARGV[3])
    return 1
  end
end
return 0";

/// Updates and rollouts on the backplane.
pub struct RedisUpdates {
    redis: Arc<SyncRedis>,
    assign: redis::Script,
    report: redis::Script,
    withdraw: redis::Script,
    set_state: redis::Script,
}

impl RedisUpdates {
    /// The store over the backplane's blocking connection.
    pub fn new(redis: Arc<SyncRedis>) -> RedisUpdates {
        RedisUpdates {
            redis,
            assign: redis::Script::new(ASSIGN),
            report: redis::Script::new(REPORT),
            withdraw: redis::Script::new(WITHDRAW),
            set_state: redis::Script::new(SET_STATE),
        }
    }

    fn load_updates(&self, devices: &[String]) -> Result<Vec<UpdateRecord>, StoreError> {
        if devices.is_empty() {
            return Ok(Vec::new());
        }
        let hashes: Vec<HashMap<String, String>> = self.redis.run(|c| {
            let mut pipe = redis::pipe();
            for device in devices {
                pipe.hgetall(update_key(device));
            }
            pipe.query(c)
        })?;
        let mut out: Vec<UpdateRecord> = hashes.iter().filter_map(update_record).collect();
        out.sort_by(|a, b| a.device.cmp(&b.device));
        Ok(out)
    }
}

fn field<T: std::str::FromStr>(h: &HashMap<String, String>, name: &str) -> Option<T> {
    h.get(name).and_then(|v| v.parse().ok())
}

/// A stored update (`None` for an empty hash: no update).
fn update_record(h: &HashMap<String, String>) -> Option<UpdateRecord> {
    Some(UpdateRecord {
        device: h.get("device")?.clone(),
        version: h.get("version")?.clone(),
        stage: UpdateStage::parse(h.get("stage")?),
        percent: field::<u8>(h, "percent").unwrap_or(0).min(100),
        reason: h.get("reason").cloned().unwrap_or_default(),
        rollout: field(h, "rollout"),
        assigned_at: field(h, "assigned_at").unwrap_or(0),
        updated_at: field(h, "updated_at").unwrap_or(0),
    })
}

fn rollout_record(
    id: u64,
    h: &HashMap<String, String>,
) -> Result<Option<RolloutRecord>, StoreError> {
    let Some(spec) = h.get("spec") else {
        return Ok(None);
    };
    Ok(Some(RolloutRecord {
        id,
        spec: serde_json::from_str(spec)
            .map_err(|e| StoreError::Other(format!("rollout {id}: {e}")))?,
        state: RolloutState::parse(h.get("state").map_or("", String::as_str)),
        reason: h.get("reason").cloned().unwrap_or_default(),
        created_at: field(h, "created_at").unwrap_or(0),
        updated_at: field(h, "updated_at").unwrap_or(0),
    }))
}

impl UpdateStore for RedisUpdates {
    fn assign(
        &self,
        device: &str,
        version: &str,
        rollout: Option<u64>,
        now: u64,
    ) -> Result<UpdateRecord, StoreError> {
        let rollout_arg = rollout.map(|r| r.to_string()).unwrap_or_default();
        self.redis.run(|c| {
            self.assign
                .key(update_key(device))
                .key(DEVICES)
                .arg(device)
                .arg(version)
                .arg(&rollout_arg)
                .arg(now)
                .invoke::<i64>(c)
        })?;
        Ok(UpdateRecord::offered(device, version, rollout, now))
    }

    fn get(&self, device: &str) -> Result<Option<UpdateRecord>, StoreError> {
        let h: HashMap<String, String> = self
            .redis
            .run(|c| redis::cmd("HGETALL").arg(update_key(device)).query(c))?;
        Ok(update_record(&h))
    }

    fn report(
        &self,
        device: &str,
        version: &str,
        state: UpdateState,
        percent: u8,
        reason: &str,
        now: u64,
    ) -> Result<Option<UpdateRecord>, StoreError> {
        let finals: Vec<&str> = UpdateStage::ALL
            .into_iter()
            .filter(|s| s.is_final())
            .map(UpdateStage::as_str)
            .collect();
        let changed: HashMap<String, String> = self.redis.run(|c| {
            let mut call = self.report.key(update_key(device));
            call.arg(version)
                .arg(UpdateStage::Reported(state).as_str())
                .arg(percent)
                .arg(reason)
                .arg(now);
            for name in &finals {
                call.arg(name);
            }
            call.invoke(c)
        })?;
        Ok(update_record(&changed))
    }

    fn list(&self, rollout: Option<u64>) -> Result<Vec<UpdateRecord>, StoreError> {
        let set = match rollout {
            Some(id) => format!("{}:updates", rollout_key(id)),
            None => DEVICES.to_string(),
        };
        let devices: Vec<String> = self
            .redis
            .run(|c| redis::cmd("SMEMBERS").arg(&set).query(c))?;
        self.load_updates(&devices)
    }

    fn withdraw(&self, device: &str) -> Result<bool, StoreError> {
        let done: i64 = self.redis.run(|c| {
            self.withdraw
                .key(update_key(device))
                .key(DEVICES)
                .arg(device)
                .invoke(c)
        })?;
        Ok(done == 1)
    }

    fn create_rollout(
        &self,
        spec: &RolloutSpec,
        targets: &[String],
        now: u64,
    ) -> Result<RolloutRecord, StoreError> {
        let text = serde_json::to_string(spec).map_err(|e| StoreError::Other(e.to_string()))?;
        let id: u64 = self.redis.run(|c| redis::cmd("INCR").arg(NEXT).query(c))?;
        let key = rollout_key(id);
        // The targets and the record together: a node that sees the rollout sees all of
        // its targets.
        self.redis.run(|c| {
            let mut pipe = redis::pipe();
            pipe.atomic();
            let list = format!("{key}:targets");
            for chunk in targets.chunks(TARGET_CHUNK) {
                pipe.rpush(&list, chunk).ignore();
            }
            pipe.hset_multiple(
                &key,
                &[
                    ("spec", text.as_str()),
                    ("state", RolloutState::Running.as_str()),
                    ("reason", ""),
                    ("created_at", &now.to_string()),
                    ("updated_at", &now.to_string()),
                ],
            )
            .ignore();
            pipe.zadd(ALL, id, id).ignore();
            pipe.query::<()>(c)
        })?;
        Ok(RolloutRecord::started(id, spec, now))
    }

    fn rollout(&self, id: u64) -> Result<Option<RolloutRecord>, StoreError> {
        let h: HashMap<String, String> = self
            .redis
            .run(|c| redis::cmd("HGETALL").arg(rollout_key(id)).query(c))?;
        rollout_record(id, &h)
    }

    fn rollouts(&self, limit: usize) -> Result<Vec<RolloutRecord>, StoreError> {
        let ids: Vec<u64> = self.redis.run(|c| {
            redis::cmd("ZREVRANGE")
                .arg(ALL)
                .arg(0)
                .arg(limit.saturating_sub(1))
                .query(c)
        })?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let hashes: Vec<HashMap<String, String>> = self.redis.run(|c| {
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.hgetall(rollout_key(*id));
            }
            pipe.query(c)
        })?;
        let mut out = Vec::with_capacity(ids.len());
        for (id, h) in ids.into_iter().zip(&hashes) {
            if let Some(record) = rollout_record(id, h)? {
                out.push(record);
            }
        }
        Ok(out)
    }

    fn rollout_targets(&self, id: u64) -> Result<Vec<String>, StoreError> {
        self.redis.run(|c| {
            redis::cmd("LRANGE")
                .arg(format!("{}:targets", rollout_key(id)))
                .arg(0)
                .arg(-1)
                .query(c)
        })
    }

    fn set_rollout_state(
        &self,
        id: u64,
        from: &[RolloutState],
        to: RolloutState,
        reason: &str,
        now: u64,
    ) -> Result<bool, StoreError> {
        let moved: i64 = self.redis.run(|c| {
            let mut call = self.set_state.key(rollout_key(id));
            call.arg(to.as_str()).arg(reason).arg(now);
            for state in from {
                call.arg(state.as_str());
            }
            call.invoke(c)
        })?;
        Ok(moved == 1)
    }

    fn lease_rollout(&self, id: u64, holder: &str, ttl_ms: u64) -> Result<bool, StoreError> {
        take_lease(
            &self.redis,
            &format!("{}:lease", rollout_key(id)),
            holder,
            ttl_ms,
        )
    }
}

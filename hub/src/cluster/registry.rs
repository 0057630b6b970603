//! Device records and token revocations in Redis, shared by every node of a cluster.
//!
//! Keys: set `hub:devices` (ids), hash `hub:device:{id}` (the record), hash
//! `hub:device:{id}:state` (reported properties), hash `hub:device:{id}:tags` (tags), hash
//! `hub:revocations` (device -> ms).
//!
//! Whether a device is online, and on which node, is read from the shared presence
//! (`hub:presence`, see `ownership.rs`), the one record every node agrees on, not from
//! the `online` and `node` fields of the record, which only say what happened last.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::sync::SyncRedis;
use crate::store::meta::DeviceRecord;
use crate::store::twin::{DesiredOutcome, Twin, TwinError};
use crate::store::{DeviceRegistry, StoreError};

const DEVICES: &str = "hub:devices";
const REVOCATIONS: &str = "hub:revocations";

fn key(id: &str) -> String {
    format!("hub:device:{id}")
}

/// The key of a device's record (for the backplane, which marks devices it reclaims).
pub(crate) fn record_key(id: &str) -> String {
    key(id)
}

fn state_key(id: &str) -> String {
    format!("hub:device:{id}:state")
}

fn tags_key(id: &str) -> String {
    format!("hub:device:{id}:tags")
}

fn twin_key(id: &str) -> String {
    format!("hub:device:{id}:twin")
}

/// Replaces a twin document if its revision is still the one read (compare and set), and
/// only for a registered device: returns 1 when written, 0 when the revision moved, -1 for
/// an unknown device.
const SET_TWIN: &str = r"
if redis.call('SISMEMBER', KEYS[2], ARGV[3]) == 0 then return -1 end
local cur = redis.call('GET', KEYS[1])
local rev = 0
if cur then rev = cjson.decode(cur).rev or 0 end
if rev ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1";

/// A stored twin and the device's own reported properties (`state` messages).
type TwinAndState = (StoredTwin, HashMap<String, String>);

/// How often a twin update is retried when another writer got in between.
const TWIN_ATTEMPTS: usize = 16;

/// A twin as Redis keeps it: the document and a revision for compare-and-set.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct StoredTwin {
    #[serde(flatten)]
    twin: Twin,
    #[serde(default)]
    rev: u64,
}

/// Raises a numeric hash field to at least a value.
const RAISE_FIELD: &str = r"
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > cur then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1";

/// The Redis device registry.
pub struct RedisRegistry {
    redis: Arc<SyncRedis>,
    raise: redis::Script,
    set_twin: redis::Script,
    node: String,
}

impl RedisRegistry {
    /// A registry in the given Redis, written by node `node`.
    pub fn new(redis: Arc<SyncRedis>, node: &str) -> RedisRegistry {
        RedisRegistry {
            redis,
            raise: redis::Script::new(RAISE_FIELD),
            set_twin: redis::Script::new(SET_TWIN),
            node: node.to_string(),
        }
    }
}

fn record(
    id: &str,
    fields: HashMap<String, String>,
    state: HashMap<String, String>,
    tags: HashMap<String, String>,
    held_by: Option<String>,
) -> Option<DeviceRecord> {
    if fields.is_empty() {
        return None;
    }
    let held_by = held_by
        .as_deref()
        .and_then(super::Owner::parse)
        .map(|o| o.node);
    let num = |k: &str| fields.get(k).and_then(|v| v.parse::<u64>().ok());
    let text = |k: &str| fields.get(k).cloned().unwrap_or_default();
    let state: serde_json::Map<String, serde_json::Value> = state
        .into_iter()
        .map(|(k, v)| (k, serde_json::Value::String(v)))
        .collect();
    Some(DeviceRecord {
        id: id.to_string(),
        firmware: text("firmware"),
        capabilities: text("capabilities"),
        first_seen: num("first_seen").unwrap_or(0),
        last_seen: num("last_seen").unwrap_or(0),
        online: held_by.is_some(),
        connected_at: num("connected_at"),
        disconnected_at: num("disconnected_at"),
        last_cause: text("last_cause"),
        rtt_us: num("rtt_us"),
        remote_addr: text("remote_addr"),
        state: serde_json::Value::Object(state),
        node: held_by.or_else(|| fields.get("node").cloned()),
        tags: tags.into_iter().collect(),
        registered_at: num("registered_at"),
    })
}

impl RedisRegistry {
    /// The stored twin and the legacy reported-state hash, or `None` for an unknown device.
    fn read_twin(&self, id: &str) -> Result<Option<TwinAndState>, StoreError> {
        let (known, doc, state): (bool, Option<String>, HashMap<String, String>) =
            self.redis.run(|c| {
                redis::pipe()
                    .sismember(DEVICES, id)
                    .get(twin_key(id))
                    .hgetall(state_key(id))
                    .query(c)
            })?;
        if !known {
            return Ok(None);
        }
        let stored = doc
            .and_then(|d| serde_json::from_str(&d).ok())
            .unwrap_or_default();
        Ok(Some((stored, state)))
    }

    /// Writes the twin if nobody else did since it was read: 1 written, 0 raced, -1 gone.
    fn write_twin(&self, id: &str, stored: &mut StoredTwin) -> Result<i64, StoreError> {
        let expected = stored.rev;
        stored.rev += 1;
        let doc = serde_json::to_string(stored)
            .map_err(|e| StoreError::Other(format!("cannot encode a twin: {e}")))?;
        self.redis.run(|c| {
            self.set_twin
                .key(twin_key(id))
                .key(DEVICES)
                .arg(expected)
                .arg(&doc)
                .arg(id)
                .invoke::<i64>(c)
        })
    }
}

impl DeviceRegistry for RedisRegistry {
    fn ping(&self) -> Result<(), StoreError> {
        self.redis
            .run(|c| redis::cmd("PING").query::<String>(c))
            .map(|_| ())
    }

    fn device_connected(
        &self,
        id: &str,
        firmware: &str,
        capabilities: &str,
        remote: &str,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        let k = key(id);
        self.redis.run(|c| {
            redis::pipe()
                .atomic()
                .sadd(DEVICES, id)
                .hset_nx(&k, "registered_at", at_ms)
                .hset_nx(&k, "first_seen", at_ms)
                .hset_multiple(
                    &k,
                    &[
                        ("firmware", firmware.to_string()),
                        ("capabilities", capabilities.to_string()),
                        ("last_seen", at_ms.to_string()),
                        ("online", "1".to_string()),
                        ("connected_at", at_ms.to_string()),
                        ("last_cause", "connected".to_string()),
                        ("remote_addr", remote.to_string()),
                        ("node", self.node.clone()),
                    ],
                )
                .query::<()>(c)
        })
    }

    fn device_disconnected(
        &self,
        id: &str,
        at_ms: u64,
        cause: &str,
        last_seen: u64,
        rtt_us: Option<u64>,
    ) -> Result<(), StoreError> {
        let k = key(id);
        self.redis.run(|c| {
            let mut fields = vec![
                ("online", "0".to_string()),
                ("disconnected_at", at_ms.to_string()),
                ("last_cause", cause.to_string()),
            ];
            if let Some(rtt) = rtt_us {
                fields.push(("rtt_us", rtt.to_string()));
            }
            redis::pipe()
                .atomic()
                .hset_multiple(&k, &fields)
                .query::<()>(c)?;
            self.raise
                .key(&k)
                .arg("last_seen")
                .arg(last_seen)
                .invoke::<i64>(c)
                .map(|_| ())
        })
    }

    fn devices_seen(&self, seen: &[(String, u64, Option<u64>)]) -> Result<(), StoreError> {
        self.redis.run(|c| {
            let mut pipe = redis::pipe();
            for (id, last_seen, rtt) in seen {
                pipe.hset(key(id), "last_seen", *last_seen).ignore();
                if let Some(rtt) = rtt {
                    pipe.hset(key(id), "rtt_us", *rtt).ignore();
                }
            }
            pipe.query::<()>(c)
        })
    }

    fn device_state(&self, id: &str, properties: &[(String, String)]) -> Result<(), StoreError> {
        if properties.is_empty() {
            return Ok(());
        }
        let key = state_key(id);
        let keys: Vec<String> = self.redis.run(|c| redis::cmd("HKEYS").arg(&key).query(c))?;
        let new = properties.iter().filter(|(k, _)| !keys.contains(k)).count();
        if keys.len() + new > crate::store::meta::MAX_STATE_KEYS {
            return Err(StoreError::Refused(format!(
                "the device already reports {} state keys; new keys refused",
                keys.len()
            )));
        }
        self.redis
            .run(|c| redis::pipe().hset_multiple(&key, properties).query::<()>(c))
    }

    fn mark_all_offline(&self, _at_ms: u64, _cause: &str) -> Result<usize, StoreError> {
        // In a cluster other nodes hold live devices. The devices of this node's previous
        // run are released by its first heartbeat (same node id) or by the reaper once
        // the old heartbeat has expired (a new id).
        Ok(0)
    }

    fn revoke(&self, device: &str, at_ms: u64) -> Result<(), StoreError> {
        self.redis.run(|c| {
            self.raise
                .key(REVOCATIONS)
                .arg(device)
                .arg(at_ms)
                .invoke::<i64>(c)
                .map(|_| ())
        })
    }

    fn revocations(&self) -> Result<Vec<(String, u64)>, StoreError> {
        let map: HashMap<String, u64> = self
            .redis
            .run(|c| redis::cmd("HGETALL").arg(REVOCATIONS).query(c))?;
        Ok(map.into_iter().collect())
    }

    fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        let mut ids: Vec<String> = self
            .redis
            .run(|c| redis::cmd("SMEMBERS").arg(DEVICES).query(c))?;
        ids.sort();
        let mut out = Vec::with_capacity(ids.len());
        // Fetch in chunks so one call never holds the connection for the whole fleet.
        for chunk in ids.chunks(500) {
            type Row = (
                HashMap<String, String>,
                HashMap<String, String>,
                HashMap<String, String>,
                Option<String>,
            );
            let rows: Vec<Row> = self.redis.run(|c| {
                let mut pipe = redis::pipe();
                for id in chunk {
                    pipe.hgetall(key(id))
                        .hgetall(state_key(id))
                        .hgetall(tags_key(id))
                        .hget(super::PRESENCE, id);
                }
                pipe.query(c)
            })?;
            out.extend(
                chunk
                    .iter()
                    .zip(rows)
                    .filter_map(|(id, (f, s, t, held))| record(id, f, s, t, held)),
            );
        }
        Ok(out)
    }

    fn device(&self, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        type Row = (
            HashMap<String, String>,
            HashMap<String, String>,
            HashMap<String, String>,
            Option<String>,
        );
        let (fields, state, tags, held): Row = self.redis.run(|c| {
            redis::pipe()
                .hgetall(key(id))
                .hgetall(state_key(id))
                .hgetall(tags_key(id))
                .hget(super::PRESENCE, id)
                .query(c)
        })?;
        Ok(record(id, fields, state, tags, held))
    }

    fn prune_history(&self, _before_ms: u64) -> Result<usize, StoreError> {
        // The Redis registry keeps no presence history (the event stream carries it).
        Ok(0)
    }

    fn register(
        &self,
        devices: &[(String, BTreeMap<String, String>)],
        at_ms: u64,
    ) -> Result<Vec<bool>, StoreError> {
        let mut created = Vec::with_capacity(devices.len());
        for chunk in devices.chunks(500) {
            let added: Vec<i64> = self.redis.run(|c| {
                let mut pipe = redis::pipe();
                pipe.atomic();
                for (id, tags) in chunk {
                    pipe.sadd(DEVICES, id);
                    pipe.hset_nx(key(id), "registered_at", at_ms).ignore();
                    pipe.hset_nx(key(id), "last_cause", "registered").ignore();
                    pipe.hset_nx(key(id), "online", "0").ignore();
                    if !tags.is_empty() {
                        let pairs: Vec<(&String, &String)> = tags.iter().collect();
                        pipe.hset_multiple(tags_key(id), &pairs).ignore();
                    }
                }
                pipe.query(c)
            })?;
            created.extend(added.into_iter().map(|n| n == 1));
        }
        Ok(created)
    }

    fn tag(
        &self,
        id: &str,
        set: &BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<Option<BTreeMap<String, String>>, StoreError> {
        let known: bool = self
            .redis
            .run(|c| redis::cmd("SISMEMBER").arg(DEVICES).arg(id).query(c))?;
        if !known {
            return Ok(None);
        }
        let tags: HashMap<String, String> = self.redis.run(|c| {
            let mut pipe = redis::pipe();
            pipe.atomic();
            if !set.is_empty() {
                let pairs: Vec<(&String, &String)> = set.iter().collect();
                pipe.hset_multiple(tags_key(id), &pairs).ignore();
            }
            if !remove.is_empty() {
                pipe.hdel(tags_key(id), remove).ignore();
            }
            pipe.hgetall(tags_key(id));
            let (tags,): (HashMap<String, String>,) = pipe.query(c)?;
            Ok(tags)
        })?;
        Ok(Some(tags.into_iter().collect()))
    }

    fn twin(&self, id: &str) -> Result<Option<Twin>, StoreError> {
        Ok(self.read_twin(id)?.map(|(stored, state)| {
            let mut twin = stored.twin;
            // Properties the device reports on its own (`state` messages) join what it
            // applied.
            for (k, v) in state {
                twin.reported
                    .entry(k)
                    .or_insert(serde_json::Value::String(v));
            }
            twin
        }))
    }

    fn update_desired(
        &self,
        id: &str,
        patch: &serde_json::Map<String, serde_json::Value>,
        expected: Option<u64>,
    ) -> Result<Result<DesiredOutcome, TwinError>, StoreError> {
        for _ in 0..TWIN_ATTEMPTS {
            let Some((mut stored, _)) = self.read_twin(id)? else {
                return Ok(Ok(DesiredOutcome::Unknown));
            };
            if expected.is_some_and(|v| v != stored.twin.desired_version) {
                return Ok(Ok(DesiredOutcome::Stale(stored.twin)));
            }
            let changed = match stored.twin.patch_desired(patch) {
                Ok(changed) => changed,
                Err(e) => return Ok(Err(e)),
            };
            if !changed {
                return Ok(Ok(DesiredOutcome::Done(stored.twin, false)));
            }
            match self.write_twin(id, &mut stored)? {
                1 => return Ok(Ok(DesiredOutcome::Done(stored.twin, true))),
                -1 => return Ok(Ok(DesiredOutcome::Unknown)),
                _ => continue,
            }
        }
        Err(StoreError::Other(format!(
            "desired state of `{id}` kept changing under this update; retry"
        )))
    }

    fn record_applied(
        &self,
        id: &str,
        version: u64,
        applied: &[(String, serde_json::Value)],
        refused: &[(String, String)],
    ) -> Result<(), StoreError> {
        for _ in 0..TWIN_ATTEMPTS {
            let Some((mut stored, _)) = self.read_twin(id)? else {
                return Ok(());
            };
            stored.twin.apply_report(version, applied, refused);
            if self.write_twin(id, &mut stored)? != 0 {
                return Ok(());
            }
        }
        Err(StoreError::Other(format!(
            "reported state of `{id}` kept changing under this update; retry"
        )))
    }

    fn forget(&self, id: &str) -> Result<bool, StoreError> {
        let removed: (i64,) = self.redis.run(|c| {
            redis::pipe()
                .atomic()
                .srem(DEVICES, id)
                .del(&[key(id), state_key(id), tags_key(id), twin_key(id)])
                .ignore()
                .query(c)
        })?;
        Ok(removed.0 == 1)
    }
}

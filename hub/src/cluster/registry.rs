//! Device records and token revocations in Redis, shared by every node of a cluster.
//!
//! Keys: set `hub:devices` (ids), hash `hub:device:{id}` (the record), hash
//! `hub:device:{id}:state` (reported properties), hash `hub:revocations` (device -> ms).
//!
//! Whether a device is online, and on which node, is read from the shared presence
//! (`hub:presence`, see `ownership.rs`), the one record every node agrees on, not from
//! the `online` and `node` fields of the record, which only say what happened last.

use std::collections::HashMap;
use std::sync::Arc;

use super::sync::SyncRedis;
use crate::store::meta::DeviceRecord;
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

/// Raises a numeric hash field to at least a value.
const RAISE_FIELD: &str = r"
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if tonumber(ARGV[2]) > cur then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1";

/// The Redis device registry.
pub struct RedisRegistry {
    redis: Arc<SyncRedis>,
    raise: redis::Script,
    node: String,
}

impl RedisRegistry {
    /// A registry in the given Redis, written by node `node`.
    pub fn new(redis: Arc<SyncRedis>, node: &str) -> RedisRegistry {
        RedisRegistry {
            redis,
            raise: redis::Script::new(RAISE_FIELD),
            node: node.to_string(),
        }
    }
}

fn record(
    id: &str,
    fields: HashMap<String, String>,
    state: HashMap<String, String>,
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
    })
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
                Option<String>,
            );
            let rows: Vec<Row> = self.redis.run(|c| {
                let mut pipe = redis::pipe();
                for id in chunk {
                    pipe.hgetall(key(id))
                        .hgetall(state_key(id))
                        .hget(super::PRESENCE, id);
                }
                pipe.query(c)
            })?;
            out.extend(
                chunk
                    .iter()
                    .zip(rows)
                    .filter_map(|(id, (f, s, held))| record(id, f, s, held)),
            );
        }
        Ok(out)
    }

    fn device(&self, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        let (fields, state, held): (
            HashMap<String, String>,
            HashMap<String, String>,
            Option<String>,
        ) = self.redis.run(|c| {
            redis::pipe()
                .hgetall(key(id))
                .hgetall(state_key(id))
                .hget(super::PRESENCE, id)
                .query(c)
        })?;
        Ok(record(id, fields, state, held))
    }

    fn prune_history(&self, _before_ms: u64) -> Result<usize, StoreError> {
        // The Redis registry keeps no presence history (the event stream carries it).
        Ok(0)
    }
}

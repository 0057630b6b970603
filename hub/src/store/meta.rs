//! Device records, presence history and revocations, in the hub's SQLite database.
//!
//! Calls block (SQLite); async code calls them through `spawn_blocking`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::read_connections::ReadConnections;
use super::twin::{DesiredOutcome, Twin, TwinError};
use super::{DeviceRegistry, StoreError};
use crate::config::{SqliteOptions, Synchronous};

/// Most distinct reported-state keys kept per device; a report that would add more is
/// refused (and the device told), so a device cannot grow its record without bound.
pub const MAX_STATE_KEYS: usize = 64;

/// A device as the store knows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct DeviceRecord {
    /// Device id.
    pub id: String,
    /// Firmware version from its last `Hello`.
    pub firmware: String,
    /// Capabilities from its last `Hello`, comma-separated.
    pub capabilities: String,
    /// First time it connected, ms since the epoch (0: never).
    pub first_seen: u64,
    /// Last time anything arrived from it, ms since the epoch.
    pub last_seen: u64,
    /// Whether the store last recorded it online.
    pub online: bool,
    /// When its current or last connection began.
    pub connected_at: Option<u64>,
    /// When its last connection ended.
    pub disconnected_at: Option<u64>,
    /// Why its last connection ended (or `connected`).
    pub last_cause: String,
    /// Last measured ping round trip, microseconds.
    pub rtt_us: Option<u64>,
    /// Remote address of its current or last connection.
    pub remote_addr: String,
    /// Reported properties, as a JSON object.
    pub state: serde_json::Value,
    /// In a cluster, the node that holds (or last held) the device.
    #[serde(default)]
    pub node: Option<String>,
    /// Operator-set tags (`site=b`), for selecting devices.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// When it was registered (`hub devices add`, a token issued, or its first connection),
    /// ms since the epoch.
    #[serde(default)]
    pub registered_at: Option<u64>,
}

/// One entry of a device's presence history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PresenceChange {
    /// When, ms since the epoch.
    pub at_ms: u64,
    /// Whether the device came online (or went offline).
    pub online: bool,
    /// Why (as in presence events: `connected`, `pong_timeout`, `closed:1000`...).
    pub cause: String,
}

/// Devices whose last_seen one transaction records (see `devices_seen`).
const SEEN_ROWS_PER_TRANSACTION: usize = 64;

/// The least pause after each of `devices_seen`'s transactions. Other writers of the hub
/// database poll for its write lock every 250 µs at first and every 1 ms after 50 ms (see
/// `sqlite::wait_for_lock`), so a pause of 2 ms lets any waiting writer in.
const SEEN_PAUSE: std::time::Duration = std::time::Duration::from_millis(2);

/// The metadata store.
pub struct MetaStore {
    conn: Mutex<Connection>,
    /// A second connection for presence (connected, disconnected, last seen), whose commits
    /// are not synced one by one (`synchronous = NORMAL`): a device connecting would
    /// otherwise wait for an fsync (about 100 connections a second on this disk, so 19,000
    /// devices after a restart would need minutes), and what it records is re-derived
    /// anyway: the hub marks every device offline when it starts, and a device that is
    /// online records itself again when it reconnects. A later synced commit of the other
    /// connection makes these durable too (the WAL is one sequence).
    presence: Mutex<Connection>,
    /// Connections for lookups (a device, the device list, revocations), so that the API
    /// checking a device before a command does not wait behind a write's fsync.
    readers: ReadConnections,
}

/// Read connections of the metadata store.
const META_READERS: usize = 2;

impl MetaStore {
    /// Opens (and if needed creates) the database at `path`.
    ///
    /// # Errors
    /// The database cannot be opened.
    pub fn open(path: &Path, options: impl Into<SqliteOptions>) -> Result<MetaStore, StoreError> {
        let options = options.into();
        let presence = SqliteOptions {
            synchronous: Synchronous::Normal,
            ..options
        };
        let conn = super::sqlite::open(path, options)?;
        Ok(MetaStore {
            conn: Mutex::new(conn),
            presence: Mutex::new(super::sqlite::open(path, presence)?),
            readers: ReadConnections::open(path, options, META_READERS)?,
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        on(&self.conn, f)
    }

    /// Like [`MetaStore::with`], on the presence connection.
    fn with_presence<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        on(&self.presence, f)
    }
}

/// Runs `f` on a locked connection.
fn on<T>(
    conn: &Mutex<Connection>,
    f: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error>,
) -> Result<T, StoreError> {
    let mut conn = conn
        .lock()
        .map_err(|_| StoreError::Other("metadata store lock poisoned".into()))?;
    Ok(f(&mut conn)?)
}

impl DeviceRegistry for MetaStore {
    fn ping(&self) -> Result<(), StoreError> {
        self.with(|c| c.query_row("SELECT 1", [], |_| Ok(())))
    }

    fn device_connected(
        &self,
        id: &str,
        firmware: &str,
        capabilities: &str,
        remote: &str,
        at_ms: u64,
    ) -> Result<(), StoreError> {
        self.with_presence(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO devices (id, firmware, capabilities, first_seen, last_seen, online, connected_at, last_cause, remote_addr, registered_at)
                 VALUES (?1, ?2, ?3, ?4, ?4, 1, ?4, 'connected', ?5, ?4)
                 ON CONFLICT (id) DO UPDATE SET firmware = excluded.firmware, capabilities = excluded.capabilities,
                   first_seen = CASE WHEN first_seen = 0 THEN excluded.first_seen ELSE first_seen END,
                   last_seen = excluded.last_seen, online = 1, connected_at = excluded.connected_at,
                   last_cause = 'connected', remote_addr = excluded.remote_addr",
                params![id, firmware, capabilities, at_ms as i64, remote],
            )?;
            tx.execute(
                "INSERT INTO presence_log (at_ms, device, online, cause) VALUES (?1, ?2, 1, 'connected')",
                params![at_ms as i64, id],
            )?;
            tx.commit()
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
        self.with_presence(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "UPDATE devices SET online = 0, disconnected_at = ?2, last_cause = ?3,
                   last_seen = max(last_seen, ?4), rtt_us = coalesce(?5, rtt_us) WHERE id = ?1",
                params![
                    id,
                    at_ms as i64,
                    cause,
                    last_seen as i64,
                    rtt_us.map(|v| v as i64)
                ],
            )?;
            tx.execute(
                "INSERT INTO presence_log (at_ms, device, online, cause) VALUES (?1, ?2, 0, ?3)",
                params![at_ms as i64, id, cause],
            )?;
            tx.commit()
        })
    }

    fn devices_seen(&self, seen: &[(String, u64, Option<u64>)]) -> Result<(), StoreError> {
        // In short transactions: this runs for every online device every few seconds, and
        // one transaction for all of them would hold the hub database's write lock (which
        // commands and presence records wait for) for as long as 10,000 updates take.
        // SQLite's lock is not fair: a writer that commits and begins again at once keeps
        // it from the others, which poll; so each transaction is followed by a pause at
        // least as long as it took, and a command's write waits for one transaction at
        // most. In the order of the table's key, so a transaction rewrites a few adjacent
        // pages rather than one page per device (the WAL grew by a page per device).
        let mut seen: Vec<&(String, u64, Option<u64>)> = seen.iter().collect();
        seen.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut pause = std::time::Duration::ZERO;
        for part in seen.chunks(SEEN_ROWS_PER_TRANSACTION) {
            std::thread::sleep(pause);
            let started = std::time::Instant::now();
            self.with_presence(|c| {
                let tx = c.transaction()?;
                {
                    let mut stmt = tx.prepare_cached(
                        "UPDATE devices SET last_seen = max(last_seen, ?2), rtt_us = coalesce(?3, rtt_us) WHERE id = ?1",
                    )?;
                    for (id, last_seen, rtt) in part {
                        stmt.execute(params![id, *last_seen as i64, rtt.map(|v| v as i64)])?;
                    }
                }
                tx.commit()
            })?;
            pause = started.elapsed().max(SEEN_PAUSE);
        }
        Ok(())
    }

    fn device_state(&self, id: &str, properties: &[(String, String)]) -> Result<(), StoreError> {
        self.with(|c| {
            // Immediate: a transaction that reads before it writes cannot wait for another
            // writer (SQLite refuses its upgrade at once when that writer committed since
            // its read), and the ingest writer commits to this file all the time.
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let current: Option<String> = tx
                .query_row("SELECT state FROM devices WHERE id = ?1", [id], |r| {
                    r.get(0)
                })
                .optional()?;
            let mut state: serde_json::Map<String, serde_json::Value> = current
                .and_then(|s| serde_json::from_str(&s).ok())
                .unwrap_or_default();
            for (k, v) in properties {
                if !state.contains_key(k) && state.len() >= MAX_STATE_KEYS {
                    return Ok(Err(StoreError::Refused(format!(
                        "the device already reports {MAX_STATE_KEYS} state keys; new key `{k}` refused"
                    ))));
                }
                state.insert(k.clone(), serde_json::Value::String(v.clone()));
            }
            tx.execute(
                "UPDATE devices SET state = ?2 WHERE id = ?1",
                params![id, serde_json::Value::Object(state).to_string()],
            )?;
            tx.commit().map(Ok)
        })?
    }

    fn mark_all_offline(&self, at_ms: u64, cause: &str) -> Result<usize, StoreError> {
        self.with(|c| {
            c.execute(
                "UPDATE devices SET online = 0, disconnected_at = ?1, last_cause = ?2 WHERE online = 1",
                params![at_ms as i64, cause],
            )
        })
    }

    fn revoke(&self, device: &str, at_ms: u64) -> Result<(), StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT INTO revocations (device, revoked_at_ms) VALUES (?1, ?2)
                 ON CONFLICT (device) DO UPDATE SET revoked_at_ms = max(revoked_at_ms, excluded.revoked_at_ms)",
                params![device, at_ms as i64],
            )
            .map(|_| ())
        })
    }

    fn revocations(&self) -> Result<Vec<(String, u64)>, StoreError> {
        self.readers.read(|c| {
            let mut stmt = c.prepare_cached("SELECT device, revoked_at_ms FROM revocations")?;
            let rows = stmt.query_map([], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
            })?;
            rows.collect()
        })
    }

    fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        self.readers.read(|c| {
            let mut stmt = c.prepare_cached(&format!("{DEVICE_COLUMNS} ORDER BY id"))?;
            let rows = stmt.query_map([], device_row)?;
            rows.collect()
        })
    }

    fn device(&self, id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        self.readers.read(|c| {
            c.query_row(&format!("{DEVICE_COLUMNS} WHERE id = ?1"), [id], device_row)
                .optional()
        })
    }

    fn prune_history(&self, before_ms: u64) -> Result<usize, StoreError> {
        self.with(|c| {
            c.execute(
                "DELETE FROM presence_log WHERE at_ms < ?1",
                [before_ms as i64],
            )
        })
    }

    fn presence_history(
        &self,
        id: &str,
        limit: usize,
    ) -> Result<Option<Vec<PresenceChange>>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT at_ms, online, cause FROM presence_log WHERE device = ?1 ORDER BY at_ms DESC, rowid DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(rusqlite::params![id, limit as i64], |r| {
                Ok(PresenceChange {
                    at_ms: r.get::<_, i64>(0)? as u64,
                    online: r.get::<_, i64>(1)? != 0,
                    cause: r.get(2)?,
                })
            })?;
            rows.collect::<Result<Vec<_>, _>>().map(Some)
        })
    }

    fn register(
        &self,
        devices: &[(String, BTreeMap<String, String>)],
        at_ms: u64,
    ) -> Result<Vec<bool>, StoreError> {
        self.with(|c| {
            // Immediate: a transaction that reads before it writes cannot wait for another
            // writer (SQLite refuses its upgrade at once when that writer committed since
            // its read), and the ingest writer commits to this file all the time.
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let mut created = Vec::with_capacity(devices.len());
            {
                let mut get = tx.prepare_cached("SELECT tags FROM devices WHERE id = ?1")?;
                let mut insert = tx.prepare_cached(
                    "INSERT INTO devices (id, first_seen, last_seen, online, last_cause, tags, registered_at)
                     VALUES (?1, 0, 0, 0, 'registered', ?2, ?3)",
                )?;
                let mut update = tx.prepare_cached("UPDATE devices SET tags = ?2 WHERE id = ?1")?;
                for (id, tags) in devices {
                    match get.query_row([id], |r| r.get::<_, String>(0)).optional()? {
                        None => {
                            insert.execute(params![id, tags_json(tags), at_ms as i64])?;
                            created.push(true);
                        }
                        Some(current) => {
                            if !tags.is_empty() {
                                let mut merged = parse_tags(&current);
                                merged.extend(tags.clone());
                                update.execute(params![id, tags_json(&merged)])?;
                            }
                            created.push(false);
                        }
                    }
                }
            }
            tx.commit()?;
            Ok(created)
        })
    }

    fn tag(
        &self,
        id: &str,
        set: &BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<Option<BTreeMap<String, String>>, StoreError> {
        self.with(|c| {
            // Immediate: a transaction that reads before it writes cannot wait for another
            // writer (SQLite refuses its upgrade at once when that writer committed since
            // its read), and the ingest writer commits to this file all the time.
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let Some(current) = tx
                .query_row("SELECT tags FROM devices WHERE id = ?1", [id], |r| {
                    r.get::<_, String>(0)
                })
                .optional()?
            else {
                return Ok(None);
            };
            let mut tags = parse_tags(&current);
            tags.extend(set.clone());
            for key in remove {
                tags.remove(key);
            }
            tx.execute(
                "UPDATE devices SET tags = ?2 WHERE id = ?1",
                params![id, tags_json(&tags)],
            )?;
            tx.commit()?;
            Ok(Some(tags))
        })
    }

    fn twin(&self, id: &str) -> Result<Option<Twin>, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            MetaStore::read_twin(&tx, id)
        })
    }

    fn update_desired(
        &self,
        id: &str,
        patch: &Map<String, Value>,
        expected: Option<u64>,
    ) -> Result<Result<DesiredOutcome, TwinError>, StoreError> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let Some(mut twin) = MetaStore::read_twin(&tx, id)? else {
                return Ok(Ok(DesiredOutcome::Unknown));
            };
            if expected.is_some_and(|v| v != twin.desired_version) {
                return Ok(Ok(DesiredOutcome::Stale(twin)));
            }
            let changed = match twin.patch_desired(patch) {
                Ok(changed) => changed,
                Err(e) => return Ok(Err(e)),
            };
            if changed {
                MetaStore::write_twin(&tx, id, &twin)?;
                tx.commit()?;
            }
            Ok(Ok(DesiredOutcome::Done(twin, changed)))
        })
    }

    fn record_applied(
        &self,
        id: &str,
        version: u64,
        applied: &[(String, Value)],
        refused: &[(String, String)],
    ) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            if let Some(mut twin) = MetaStore::read_twin(&tx, id)? {
                twin.apply_report(version, applied, refused);
                MetaStore::write_twin(&tx, id, &twin)?;
                tx.commit()?;
            }
            Ok(())
        })
    }

    fn forget(&self, id: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let gone = tx.execute("DELETE FROM devices WHERE id = ?1", [id])? > 0;
            tx.execute("DELETE FROM presence_log WHERE device = ?1", [id])?;
            tx.commit()?;
            Ok(gone)
        })
    }
}

impl MetaStore {
    fn read_twin(
        tx: &rusqlite::Transaction<'_>,
        id: &str,
    ) -> Result<Option<Twin>, rusqlite::Error> {
        tx.query_row(
            "SELECT desired, desired_version, state, reported_version, refused FROM devices WHERE id = ?1",
            [id],
            |r| {
                Ok(Twin {
                    desired: json_object(&r.get::<_, String>(0)?),
                    desired_version: r.get::<_, i64>(1)? as u64,
                    reported: json_object(&r.get::<_, String>(2)?),
                    reported_version: r.get::<_, i64>(3)? as u64,
                    refused: json_object(&r.get::<_, String>(4)?),
                })
            },
        )
        .optional()
    }

    fn write_twin(
        tx: &rusqlite::Transaction<'_>,
        id: &str,
        twin: &Twin,
    ) -> Result<(), rusqlite::Error> {
        tx.execute(
            "UPDATE devices SET desired = ?2, desired_version = ?3, state = ?4, reported_version = ?5, refused = ?6 WHERE id = ?1",
            params![
                id,
                Value::Object(twin.desired.clone()).to_string(),
                twin.desired_version as i64,
                Value::Object(twin.reported.clone()).to_string(),
                twin.reported_version as i64,
                Value::Object(twin.refused.clone()).to_string(),
            ],
        )
        .map(|_| ())
    }
}

fn json_object(text: &str) -> Map<String, Value> {
    serde_json::from_str(text).unwrap_or_default()
}

fn tags_json(tags: &BTreeMap<String, String>) -> String {
    serde_json::to_string(tags).unwrap_or_else(|_| "{}".to_string())
}

fn parse_tags(text: &str) -> BTreeMap<String, String> {
    serde_json::from_str(text).unwrap_or_default()
}

const DEVICE_COLUMNS: &str =
    "SELECT id, firmware, capabilities, first_seen, last_seen, online, connected_at,
    disconnected_at, last_cause, rtt_us, remote_addr, state, tags, registered_at FROM devices";

fn device_row(r: &rusqlite::Row<'_>) -> Result<DeviceRecord, rusqlite::Error> {
    let state: String = r.get(11)?;
    Ok(DeviceRecord {
        id: r.get(0)?,
        firmware: r.get(1)?,
        capabilities: r.get(2)?,
        first_seen: r.get::<_, i64>(3)? as u64,
        last_seen: r.get::<_, i64>(4)? as u64,
        online: r.get::<_, i64>(5)? != 0,
        connected_at: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
        disconnected_at: r.get::<_, Option<i64>>(7)?.map(|v| v as u64),
        last_cause: r.get(8)?,
        rtt_us: r.get::<_, Option<i64>>(9)?.map(|v| v as u64),
        remote_addr: r.get(10)?,
        state: serde_json::from_str(&state).unwrap_or(serde_json::Value::Null),
        node: None,
        tags: parse_tags(&r.get::<_, String>(12)?),
        registered_at: r.get::<_, Option<i64>>(13)?.map(|v| v as u64),
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;
    use crate::config::Synchronous;

    /// `hub token issue` on a hub whose devices send: the registration reads, then writes,
    /// while the ingest writer commits to the same file on its own connection. A deferred
    /// transaction is refused at once ("database is locked") when that writer committed in
    /// between; an immediate one waits its turn.
    #[test]
    fn registering_while_another_connection_commits_waits_its_turn() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("hub.db");
        let meta = MetaStore::open(&path, Synchronous::Normal).expect("open");
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let stop = stop.clone();
            let path = path.clone();
            std::thread::spawn(move || {
                let other = MetaStore::open(&path, Synchronous::Normal).expect("open");
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    other
                        .device_connected("writer", "fw", "", "127.0.0.1:1", n)
                        .expect("the other writer commits");
                }
            })
        };
        for i in 0..300 {
            let tags = BTreeMap::from([("site".to_string(), "b".to_string())]);
            meta.register(&[(format!("d{i}"), tags)], i)
                .expect("registered despite the other writer");
            meta.device_state(&format!("d{i}"), &[("k".into(), "1".into())])
                .expect("state despite the other writer");
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().expect("writer");
    }
}

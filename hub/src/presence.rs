//! The presence registry: which devices are connected to this hub, with their live
//! statistics, and the handle that lets the hub supersede or kick a connection.
//!
//! It holds one entry per connected device, so it is bounded by
//! `device.max_connections`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// Live statistics of one connection, updated by its task without locks.
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Last time anything arrived, ms since the epoch.
    pub last_seen_ms: AtomicU64,
    /// Last ping round trip in µs (0 until measured).
    pub rtt_us: AtomicU64,
    /// Readings received on this connection.
    pub readings: AtomicU64,
}

impl ConnStats {
    /// The last measured RTT, if any.
    pub fn rtt(&self) -> Option<u64> {
        match self.rtt_us.load(Ordering::Relaxed) {
            0 => None,
            v => Some(v),
        }
    }
}

/// Asks a connection to close, with a close code and a reason.
#[derive(Debug, Default)]
pub struct Kick {
    reason: Mutex<Option<(u16, &'static str)>>,
    /// Signalled when a reason has been set.
    pub notify: Notify,
}

impl Kick {
    /// Asks the connection to close; the first reason wins.
    pub fn kick(&self, code: u16, reason: &'static str) {
        if let Ok(mut slot) = self.reason.lock() {
            slot.get_or_insert((code, reason));
        }
        self.notify.notify_one();
    }

    /// The reason, once kicked.
    pub fn reason(&self) -> Option<(u16, &'static str)> {
        self.reason.lock().ok().and_then(|r| *r)
    }
}

/// What the registry knows about one connection.
#[derive(Debug, Clone)]
pub struct Connection {
    /// Unique per hub process.
    pub conn_id: u64,
    /// Firmware from `Hello`.
    pub firmware: String,
    /// Remote address.
    pub remote: String,
    /// When the session began, ms since the epoch.
    pub connected_at_ms: u64,
    /// When the token was issued (for revocation), ms since the epoch.
    pub token_issued_ms: u64,
    /// Live statistics.
    pub stats: Arc<ConnStats>,
    /// Closes the connection.
    pub kick: Arc<Kick>,
    /// Signalled when the ledger has new commands for the device.
    pub commands: Arc<Notify>,
    /// Signalled when the device's desired state changed.
    pub desired: Arc<Notify>,
    /// Signalled when the device's firmware update changed.
    pub update: Arc<Notify>,
}

/// The registry.
#[derive(Debug, Default)]
pub struct Presence {
    map: Mutex<HashMap<Arc<str>, Connection>>,
    next_id: AtomicU64,
}

impl Presence {
    /// A fresh connection id.
    pub fn next_conn_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Registers `conn` as the device's current connection. A previous one is kicked with
    /// close code 4000 and returned.
    pub fn register(&self, device: Arc<str>, conn: Connection) -> Option<Connection> {
        let old = self.map.lock().ok()?.insert(device, conn);
        if let Some(old) = &old {
            old.kick.kick(
                schemas::close::SUPERSEDED,
                "superseded by a newer connection of this device",
            );
        }
        old
    }

    /// Removes the device's entry if it is still `conn_id`. Returns whether it was (false
    /// means a newer connection took over).
    pub fn unregister(&self, device: &str, conn_id: u64) -> bool {
        let Ok(mut map) = self.map.lock() else {
            return false;
        };
        if map.get(device).is_some_and(|c| c.conn_id == conn_id) {
            map.remove(device);
            true
        } else {
            false
        }
    }

    /// The device's current connection.
    pub fn get(&self, device: &str) -> Option<Connection> {
        self.map.lock().ok()?.get(device).cloned()
    }

    /// Every connected device.
    pub fn snapshot(&self) -> Vec<(Arc<str>, Connection)> {
        self.map
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    /// How many devices are connected.
    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Whether no device is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

//! The presence registry: which devices are connected to this hub, with their live
//! statistics, and the handle that lets the hub supersede or kick a connection.
//!
//! It holds one entry per connected device, so it is bounded by
//! `device.max_connections`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use schemas::Command;

use crate::doorbell::Doorbell;

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

/// What the rest of the hub asks of one connection (close, look at its commands, its
/// desired state or its firmware offer), and the one wake-up that tells it so.
///
/// One allocation and one waiter per connection for all four: an idle connection waits
/// on a single notification instead of one per kind (see BENCHMARKS.md, connection
/// density).
#[derive(Debug, Default)]
pub struct Signals {
    /// The close code and reason of the first kick.
    reason: OnceLock<(u16, &'static str)>,
    /// The [`Raised`] bits not yet taken by the connection, and its wake-up.
    bell: Doorbell,
    /// Commands created for the device and not yet taken by the connection, oldest first,
    /// at most [`CREATED_INBOX`]; past that the connection is told to read the ledger.
    created: Mutex<Vec<Command>>,
}

/// Commands a connection holds for its device, handed over at their creation, before it
/// takes them. A device gets a command or two at a time; more than this before the
/// connection looks means it is busy, and it reads them from the ledger instead.
pub const CREATED_INBOX: usize = 4;

/// What was raised on a connection's [`Signals`] since it last looked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Raised(u8);

impl Raised {
    const KICK: u8 = 1;
    const COMMANDS: u8 = 2;
    const DESIRED: u8 = 4;
    const OFFER: u8 = 8;
    const CREATED: u8 = 16;

    /// Asked to close ([`Signals::reason`] says with what).
    pub fn kicked(self) -> bool {
        self.0 & Self::KICK != 0
    }

    /// The ledger may have new commands for the device.
    pub fn commands(self) -> bool {
        self.0 & Self::COMMANDS != 0
    }

    /// Commands were handed over ([`Signals::take_created`]).
    pub fn created(self) -> bool {
        self.0 & Self::CREATED != 0
    }

    /// The device's desired state changed.
    pub fn desired(self) -> bool {
        self.0 & Self::DESIRED != 0
    }

    /// The device's firmware offer changed.
    pub fn offer(self) -> bool {
        self.0 & Self::OFFER != 0
    }
}

impl Signals {
    /// Asks the connection to close; the first reason wins.
    pub fn kick(&self, code: u16, reason: &'static str) {
        let _ = self.reason.set((code, reason));
        self.raise(Raised::KICK);
    }

    /// Tells the connection that the ledger may have new commands for its device.
    pub fn commands_ready(&self) {
        self.raise(Raised::COMMANDS);
    }

    /// Hands a command created for the device to the connection, which sends it without
    /// reading the ledger when nothing older waits there. The command must be in the
    /// ledger already. With [`CREATED_INBOX`] commands waiting, the connection is told to
    /// read the ledger instead, which lists this one too.
    pub fn command_created(&self, command: Command) {
        let handed = match self.created.lock() {
            Ok(mut created) if created.len() < CREATED_INBOX => {
                created.push(command);
                true
            }
            _ => false,
        };
        self.raise(if handed {
            Raised::CREATED
        } else {
            Raised::COMMANDS
        });
    }

    /// The commands handed over since the last call, oldest first.
    pub fn take_created(&self) -> Vec<Command> {
        self.created
            .lock()
            .map(|mut created| std::mem::take(&mut *created))
            .unwrap_or_default()
    }

    /// Tells the connection that its device's desired state changed.
    pub fn desired_changed(&self) {
        self.raise(Raised::DESIRED);
    }

    /// Tells the connection that its device's firmware offer changed.
    pub fn offer_changed(&self) {
        self.raise(Raised::OFFER);
    }

    /// The close code and reason, once kicked.
    pub fn reason(&self) -> Option<(u16, &'static str)> {
        self.reason.get().copied()
    }

    fn raise(&self, bit: u8) {
        self.bell.ring(bit);
    }

    /// Waits until something is raised and takes it. Raising several times before this
    /// looks counts once.
    ///
    /// Cancel safety: cancel safe: what it has not returned stays raised for the next
    /// call. Meant for one waiter (the connection).
    pub async fn raised(&self) -> Raised {
        Raised(self.bell.rung().await)
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
    /// Closes the connection, or tells it of new commands, desired state or firmware.
    pub signals: Arc<Signals>,
}

/// The registry.
///
/// Its lock is taken by API calls, connections that start or end, and the ledger's
/// signals, so nothing is done under it but a look-up or an update of the map: entries
/// are shared (`Arc`), and a copy of them all ([`Presence::snapshot`]) costs one counter
/// increment per device.
#[derive(Debug, Default)]
pub struct Presence {
    map: Mutex<HashMap<Arc<str>, Arc<Connection>>>,
    next_id: AtomicU64,
}

impl Presence {
    /// A fresh connection id.
    pub fn next_conn_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Registers `conn` as the device's current connection. A previous one is kicked with
    /// close code 4000 and returned.
    pub fn register(&self, device: Arc<str>, conn: Connection) -> Option<Arc<Connection>> {
        let old = self.map.lock().ok()?.insert(device, Arc::new(conn));
        if let Some(old) = &old {
            old.signals.kick(
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
    pub fn get(&self, device: &str) -> Option<Arc<Connection>> {
        self.map.lock().ok()?.get(device).cloned()
    }

    /// Every connected device.
    pub fn snapshot(&self) -> Vec<(Arc<str>, Arc<Connection>)> {
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

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    #[test]
    fn what_was_raised_is_taken_once_and_the_first_kick_reason_wins() {
        let signals = Signals::default();
        signals.commands_ready();
        signals.commands_ready();
        signals.offer_changed();
        signals.kick(4000, "first");
        signals.kick(1008, "second");
        let raised = signals.raised().now_or_never().expect("raised at once");
        assert!(raised.commands() && raised.offer() && raised.kicked());
        assert!(!raised.desired());
        assert_eq!(signals.reason(), Some((4000, "first")));
        // Taken: the next wait does not end by itself.
        assert!(signals.raised().now_or_never().is_none());
        signals.desired_changed();
        let raised = signals.raised().now_or_never().expect("raised again");
        assert!(raised.desired() && !raised.commands() && !raised.kicked());
    }

    #[test]
    fn handed_over_commands_are_taken_in_order_and_past_the_inbox_become_a_read() {
        let signals = Signals::default();
        let command = |id| Command {
            id,
            name: schemas::message::truncated("led"),
            args: schemas::message::truncated("{}"),
            deadline: 0,
        };
        for id in 1..=CREATED_INBOX as u64 {
            signals.command_created(command(id));
        }
        let raised = signals.raised().now_or_never().expect("raised");
        assert!(raised.created() && !raised.commands());
        signals.command_created(command(9));
        let raised = signals.raised().now_or_never().expect("raised");
        assert!(raised.commands(), "a full inbox asks for a read instead");
        let ids: Vec<u64> = signals.take_created().iter().map(|c| c.id).collect();
        assert_eq!(ids, (1..=CREATED_INBOX as u64).collect::<Vec<_>>());
        assert!(signals.take_created().is_empty());
    }

    #[tokio::test]
    async fn a_raise_wakes_the_waiting_connection() {
        let signals = Arc::new(Signals::default());
        let waiter = tokio::spawn({
            let signals = signals.clone();
            async move { signals.raised().await }
        });
        tokio::task::yield_now().await;
        signals.offer_changed();
        let raised = waiter.await.expect("the waiter ends");
        assert!(raised.offer() && !raised.commands());
    }
}

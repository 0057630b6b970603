//! The command ledger: creates commands, hands them to the connection that holds the
//! device, records acks and results, expires and times them out, and publishes every
//! state change on the event bus. Storage is a [`crate::store::CommandStore`].

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch};

use crate::cluster::Backplane;
use crate::events::{EventBus, HubEvent, Subscription};
use crate::presence::Presence;
use crate::store::ledger::{CancelRefused, CommandRecord};
use crate::store::{now_ms, StoreError};
use crate::store::{CommandStore, NewCommand};

/// How often TTLs and result timeouts are checked.
pub const SWEEP_INTERVAL: Duration = Duration::from_millis(200);

/// Progress marks being written in the background, hub-wide. Past this many, a connection
/// writes its next mark itself and waits for it, so a flood of commands slows down the
/// connections that carry them instead of piling up tasks.
const BACKGROUND_MARKS: usize = 1024;

/// Why a ledger operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A blocking task panicked or was cancelled.
    #[error("internal error: {0}")]
    Internal(String),
}

/// When [`Ledger::create`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Once the command survives a power cut: for a caller that answers "queued" and
    /// leaves, since an answered command must not be lost.
    OnDisk,
    /// Once the command is visible and on its way to the device, for a caller that
    /// answers only with the command's result and so never reports it as queued (the
    /// API's `?wait` to an online device). Its creation reaches the disk a moment later,
    /// in the next shared fsync; a power cut before then can lose the ledger's record of
    /// the command, never its id (which is not handed out again) and never a result the
    /// caller was not given.
    Visible,
}

/// What became of a command [`Ledger::create`] stored.
enum Handed {
    /// The job's command for the device existed already.
    Existing,
    /// Handed to the device's connection on this hub.
    Here,
    /// The device is not connected here.
    NotHere,
}

/// The ledger service; cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    store: Arc<dyn CommandStore>,
    events: EventBus,
    presence: Arc<Presence>,
    cluster: Option<Arc<Backplane>>,
    /// Room for progress marks written in the background ([`BACKGROUND_MARKS`]).
    background_marks: Arc<tokio::sync::Semaphore>,
    /// Held from a command's creation to its hand-over, so that a connection gets its
    /// device's commands in the order of their ids (the SQLite store creates one at a time
    /// anyway).
    creating: Arc<std::sync::Mutex<()>>,
}

/// A progress mark of a command on one connection (see [`ProgressMarks`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The command went out on the wire.
    Sent(u64),
    /// The device acknowledged it.
    Acked(u64),
}

/// The progress marks of one connection's commands, written in the background one after
/// the other, so that the connection goes on reading (the device's ack and result are
/// usually already on their way) while a mark waits for the store. A result does not wait
/// for them: it implies both (the store fills in `sent_at` and `acked_at` it finds empty),
/// and a mark that reaches the store after it changes nothing, since states only move
/// forward; such a mark publishes no event.
#[derive(Debug, Default)]
pub struct ProgressMarks {
    /// The last mark written in the background; each waits for the one before it.
    last: Option<tokio::task::JoinHandle<()>>,
}

impl Ledger {
    /// A ledger over `store`, publishing on `events`, nudging connections in `presence`
    /// (and, in a cluster, on the node that holds the device).
    pub fn new(
        store: Arc<dyn CommandStore>,
        events: EventBus,
        presence: Arc<Presence>,
        cluster: Option<Arc<Backplane>>,
    ) -> Ledger {
        Ledger {
            store,
            events,
            presence,
            cluster,
            background_marks: Arc::new(tokio::sync::Semaphore::new(BACKGROUND_MARKS)),
            creating: Arc::default(),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn CommandStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, LedgerError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| LedgerError::Internal(e.to_string()))?
            .map_err(LedgerError::Store)
    }

    /// Publishes a transition (and, for a final one, tells the device's connection that a
    /// slot in its command window opened). Called on the blocking thread that stored it,
    /// so that waiters hear of it without a wake-up of the storing task first.
    fn publish(&self, record: CommandRecord) {
        metrics::counter!("hub_command_transitions_total", "state" => record.state.as_str())
            .increment(1);
        if record.state.is_final() {
            // A slot in the device's command window opened up.
            if let Some(conn) = self.presence.get(&record.device) {
                conn.signals.commands_ready();
            }
        }
        self.events.publish(HubEvent::Command {
            command: Box::new(record),
            at_ms: now_ms(),
        });
    }

    /// Queues a command and, if the device is connected here, nudges its connection.
    /// With a `job`, returns the command that job already created for the device, if any
    /// (at most one per job and device).
    ///
    /// The device is nudged as soon as the command is visible, so delivery never waits for
    /// the disk. With [`Durability::OnDisk`] this returns once the command also survives a
    /// power cut; with [`Durability::Visible`] it returns at once (for a caller that waits
    /// for the command's result anyway, see [`Durability::Visible`]).
    ///
    /// # Errors
    /// The store failed.
    ///
    /// Cancel safety: not cancel safe. The write, its `queued` event and the signal to a
    /// connection here run to completion on a blocking thread even if this future is
    /// dropped; what is skipped then is a cluster's nudge (the device's next connection
    /// still gets the command) and the wait for the disk.
    #[allow(clippy::too_many_arguments)]
    pub async fn create(
        &self,
        device: &str,
        name: &str,
        args: &str,
        timeout: Duration,
        ttl: Duration,
        job: Option<u64>,
        durability: Durability,
    ) -> Result<CommandRecord, LedgerError> {
        let (d, n, a) = (device.to_string(), name.to_string(), args.to_string());
        let timeout_ms = timeout.as_millis() as u64;
        let ttl_ms = ttl.as_millis() as u64;
        let ledger = self.clone();
        let (record, handed) = self
            .blocking(move |s| {
                let new = NewCommand {
                    job,
                    ..NewCommand::new(&d, &n, &a, timeout_ms, ttl_ms)
                };
                // In a cluster, a command created for the device on another node may still
                // be on its way here as a nudge; a read of the ledger puts the two in order,
                // which a hand-over would not. So a cluster's connections are only signalled.
                let hands_over = ledger.cluster.is_none();
                // Held only where commands are handed over, so a cluster's creations do not
                // queue behind each other's Redis round trips. A poisoned lock only means
                // another creation panicked; the order it keeps is still good.
                let _order = hands_over.then(|| {
                    ledger
                        .creating
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                });
                let record = s.create(&new, now_ms())?;
                if record.attempts > 0 || record.state != crate::store::ledger::CommandState::Queued
                {
                    return Ok((record, Handed::Existing));
                }
                // Published, and handed to the device's connection, here on the blocking
                // thread the moment the command is visible: handing the record back to
                // the caller's task first would put a wake-up (milliseconds at p99 on a
                // busy hub) before every delivery.
                ledger.publish(record.clone());
                let handed = match ledger.presence.get(&record.device) {
                    Some(conn) if hands_over => {
                        conn.signals.command_created(record.to_wire(now_ms()));
                        Handed::Here
                    }
                    Some(conn) => {
                        conn.signals.commands_ready();
                        Handed::Here
                    }
                    None => Handed::NotHere,
                };
                Ok((record, handed))
            })
            .await?;
        match handed {
            // The job's command existed already and is under way.
            Handed::Existing => return Ok(record),
            Handed::Here => {}
            Handed::NotHere => {
                if let Some(cluster) = &self.cluster {
                    cluster.nudge(device).await;
                }
            }
        }
        if durability == Durability::OnDisk {
            self.sync().await?;
        }
        Ok(record)
    }

    /// Returns once every ledger write so far survives a power cut.
    ///
    /// # Errors
    /// The store cannot make them durable.
    ///
    /// Cancel safety: safe; the fsync completes on its blocking thread either way.
    pub async fn sync(&self) -> Result<(), LedgerError> {
        self.blocking(|s| s.sync()).await
    }

    /// One command.
    ///
    /// # Errors
    /// The store failed.
    ///
    /// Cancel safety: safe; it only reads.
    pub async fn get(&self, id: u64) -> Result<Option<CommandRecord>, LedgerError> {
        self.blocking(move |s| s.get(id)).await
    }

    /// A device's recent commands, newest first.
    ///
    /// # Errors
    /// The store failed.
    ///
    /// Cancel safety: safe; it only reads.
    pub async fn list(
        &self,
        device: &str,
        limit: usize,
    ) -> Result<Vec<CommandRecord>, LedgerError> {
        let d = device.to_string();
        self.blocking(move |s| s.list(&d, limit)).await
    }

    /// Open commands to (re-)deliver to a device, with id > `after`, oldest first.
    ///
    /// # Errors
    /// The store failed.
    ///
    /// Cancel safety: safe; it only reads.
    pub async fn deliverable(
        &self,
        device: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<CommandRecord>, LedgerError> {
        let d = device.to_string();
        self.blocking(move |s| s.deliverable(&d, after, limit, now_ms()))
            .await
    }

    /// Records `mark` for `device` after the marks already in `marks`, in the background
    /// when there is room ([`BACKGROUND_MARKS`]), else before returning. A mark that cannot
    /// be stored is logged and dropped: the command is delivered again on the next
    /// connection, as one that was not finished always is.
    ///
    /// Cancel safety: safe; a mark already handed to the background is still written.
    pub async fn mark(&self, marks: &mut ProgressMarks, device: &str, mark: Progress) {
        let before = marks.last.take();
        let (ledger, device) = (self.clone(), device.to_string());
        let write = async move {
            if let Some(before) = before {
                let _ = before.await;
            }
            let written = match mark {
                Progress::Sent(id) => ledger.sent(id).await,
                Progress::Acked(id) => ledger.acked(&device, id).await,
            };
            if let Err(err) = written {
                tracing::warn!(%device, ?mark, error = %err, "cannot record a command's progress");
            }
        };
        match self.background_marks.clone().try_acquire_owned() {
            Ok(room) => {
                marks.last = Some(tokio::spawn(async move {
                    write.await;
                    drop(room);
                }));
            }
            Err(_) => write.await,
        }
    }

    /// Records that a command went out on the wire.
    ///
    /// # Errors
    /// The store failed.
    ///
    /// Cancel safety: safe; the transition is stored and published on a blocking thread
    /// either way.
    pub async fn sent(&self, id: u64) -> Result<(), LedgerError> {
        let ledger = self.clone();
        self.blocking(move |s| {
            if let Some(record) = s.mark_sent(id, now_ms())? {
                ledger.publish(record);
            }
            Ok(())
        })
        .await
    }

    /// Records a device's `CommandAck`.
    ///
    /// # Errors
    /// The store failed.
    ///
    /// Cancel safety: safe; the transition is stored and published on a blocking thread
    /// either way.
    pub async fn acked(&self, device: &str, id: u64) -> Result<(), LedgerError> {
        let (d, ledger) = (device.to_string(), self.clone());
        self.blocking(move |s| {
            if let Some(record) = s.ack(&d, id, now_ms())? {
                ledger.publish(record);
            }
            Ok(())
        })
        .await
    }

    /// Records a device's `CommandResult`, and returns once it survives a power cut (its
    /// event is published before that). Returns false when the command was unknown for
    /// this device or already final (late or duplicate).
    ///
    /// # Errors
    /// The store failed.
    ///
    /// Cancel safety: not cancel safe: the result is stored and published on a blocking
    /// thread either way, but a future dropped before the disk has it returns nothing, and
    /// the device is not told it may forget the command (it reports the result again).
    pub async fn finished(
        &self,
        device: &str,
        id: u64,
        ok: bool,
        code: i32,
        output: &str,
    ) -> Result<bool, LedgerError> {
        let (d, o) = (device.to_string(), output.to_string());
        let ledger = self.clone();
        let recorded = self
            .blocking(move |s| {
                // Waiters learn the result as soon as it is recorded, from this blocking
                // thread (no wake-up of the connection's task first); the device is told
                // it may forget the command (what `true` leads to) only once the result is
                // on disk, so a power cut before then finds the result still on the
                // device, which reports it again when the command is re-delivered.
                let record = s.finish(&d, id, ok, code, &o, now_ms())?;
                Ok(record.map(|record| ledger.publish(record)).is_some())
            })
            .await?;
        if recorded {
            self.sync().await?;
        }
        Ok(recorded)
    }

    /// Cancels an open command.
    ///
    /// # Errors
    /// The store failed (outer), or it cannot be cancelled (inner).
    pub async fn cancel(
        &self,
        id: u64,
    ) -> Result<Result<CommandRecord, CancelRefused>, LedgerError> {
        let result = self.blocking(move |s| s.cancel(id, now_ms())).await?;
        if let Ok(record) = &result {
            self.publish(record.clone());
        }
        Ok(result)
    }

    /// Waits until the command is final or `timeout` passes; returns it as it is then.
    ///
    /// Cancel safety: safe; it only observes.
    ///
    /// # Errors
    /// The store failed.
    pub async fn wait(
        &self,
        id: u64,
        timeout: Duration,
    ) -> Result<Option<CommandRecord>, LedgerError> {
        // Subscribe before reading, so no transition falls between the two.
        let events = self.events.subscribe();
        let current = self.get(id).await?;
        self.wait_from(events, current, timeout).await
    }

    /// Like [`Ledger::wait`], for a command whose record the caller already holds
    /// (`current`, as it was at or after the moment `events` was subscribed): a caller
    /// that subscribes before it creates the command waits without reading it back.
    ///
    /// Cancel safety: safe; it only observes.
    ///
    /// # Errors
    /// The store failed.
    pub async fn wait_from(
        &self,
        mut events: Subscription,
        mut current: Option<CommandRecord>,
        timeout: Duration,
    ) -> Result<Option<CommandRecord>, LedgerError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let id = match &current {
                None => return Ok(None),
                Some(r) if r.state.is_final() => return Ok(current),
                Some(r) => r.id,
            };
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Err(_) => return Ok(current),
                Ok(Ok(HubEvent::Command { command, .. })) if command.id == id => {
                    current = Some(*command)
                }
                Ok(Ok(_)) => {}
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => current = self.get(id).await?,
                Ok(Err(broadcast::error::RecvError::Closed)) => return Ok(current),
            }
        }
    }

    /// Command state changes from now on, for [`Ledger::wait_from`].
    pub fn subscribe(&self) -> Subscription {
        self.events.subscribe()
    }

    /// Expires and times out commands every [`SWEEP_INTERVAL`] until shutdown.
    ///
    /// Cancel safety: not cancel safe: a sweep in progress may close commands without publishing their events. Run it as its own task until shutdown.
    pub async fn sweep(self, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(SWEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = crate::stopping(&mut shutdown) => return,
                _ = tick.tick() => match self.blocking(|s| s.expire_due(now_ms())).await {
                    Ok(changed) => {
                        for record in changed {
                            tracing::info!(id = record.id, device = %record.device, state = record.state.as_str(), reason = ?record.reason, "command closed by the hub");
                            self.publish(record);
                        }
                    }
                    Err(err) => tracing::warn!(error = %err, "command sweep failed"),
                },
            }
        }
    }

    /// Deletes commands that finished before `before_ms`.
    ///
    /// # Errors
    /// The store failed.
    ///
    /// Cancel safety: safe; the deletion completes or not, and nothing else depends on it.
    pub async fn prune(&self, before_ms: u64) -> Result<usize, LedgerError> {
        self.blocking(move |s| s.prune_finished(before_ms)).await
    }

    /// Number of commands per state (for metrics).
    ///
    /// # Errors
    /// The store failed.
    ///
    /// Cancel safety: safe; it only reads.
    pub async fn counts(
        &self,
    ) -> Result<Vec<(crate::store::ledger::CommandState, u64)>, LedgerError> {
        self.blocking(|s| s.counts()).await
    }
}

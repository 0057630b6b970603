//! The ingest pipeline: connection tasks push validated batches into one bounded queue;
//! one writer thread group-commits whatever has queued up (up to `ingest.max_group`
//! batches) in a single transaction, and only then releases the acks.
//!
//! When the queue is full, [`Ingest::submit`] waits, the connection stops reading its
//! socket, and TCP flow control slows the device down: backpressure instead of memory.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Notify};

use crate::store::{Batch, Outcome, StoreError, TelemetryStore};

/// How often a failed commit is retried before its batches are failed.
const COMMIT_ATTEMPTS: u32 = 8;

/// A connection's view of its acknowledgements: the writer raises `acked` and notifies.
/// It is state, not a queue, so a slow connection cannot make it grow.
#[derive(Debug, Default)]
pub struct AckSlot {
    acked: AtomicU64,
    failed: AtomicBool,
    /// Signalled whenever `acked` rises or the slot fails.
    pub notify: Notify,
}

impl AckSlot {
    /// A slot whose watermark starts at `seq` (what was stored before this connection).
    pub fn starting_at(seq: u64) -> AckSlot {
        AckSlot {
            acked: AtomicU64::new(seq),
            ..AckSlot::default()
        }
    }

    /// The highest durably stored sequence number the writer has reported.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }
    /// Whether the store failed a batch of this connection (close it with 1011).
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }
}

enum Op {
    Batch(Batch, Arc<AckSlot>),
    LastSeq(Arc<str>, oneshot::Sender<Result<u64, String>>),
    /// Commit what came before, then stop (at shutdown; later senders get `Stopped`).
    Shutdown,
}

/// Why the pipeline refused work.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The writer has stopped (shutdown).
    #[error("the ingest writer has stopped")]
    Stopped,
    /// The store failed.
    #[error("store failed: {0}")]
    Store(String),
}

/// The writer's health, shared with the hub (readiness, and restart when it dies).
#[derive(Debug, Default)]
struct Health {
    /// The last commit failed for good; cleared by the next good one.
    failing: AtomicBool,
    /// The writer thread has ended (normally at shutdown, or by a panic).
    exited: AtomicBool,
    exit: Notify,
}

/// Marks the writer exited when its thread ends, however it ends (a panic included).
struct ExitGuard(Arc<Health>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.0.exited.store(true, Ordering::Release);
        self.0.exit.notify_waiters();
    }
}

/// The sending side of the pipeline; cheap to clone.
#[derive(Clone)]
pub struct Ingest {
    tx: mpsc::Sender<Op>,
    health: Arc<Health>,
}

impl Ingest {
    /// Starts the writer thread over `store`.
    ///
    /// `capacity` bounds the queue in batches; `max_group` bounds one transaction. The
    /// thread ends after every [`Ingest`] is dropped and the queue is drained.
    ///
    /// # Errors
    /// The thread could not be spawned.
    pub fn start(
        store: Box<dyn TelemetryStore>,
        capacity: usize,
        max_group: usize,
    ) -> std::io::Result<(Ingest, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(capacity);
        let health = Arc::new(Health::default());
        let guard = ExitGuard(health.clone());
        let writer_health = health.clone();
        let handle = std::thread::Builder::new()
            .name("ingest-writer".into())
            .spawn(move || {
                let _guard = guard;
                Writer {
                    store,
                    rx,
                    max_group,
                    health: writer_health,
                }
                .run()
            })?;
        Ok((Ingest { tx, health }, handle))
    }

    /// Queues a batch. Waits while the queue is full (backpressure).
    ///
    /// Cancel safety: if cancelled while waiting, the batch was not queued.
    ///
    /// # Errors
    /// [`IngestError::Stopped`] when the writer has stopped.
    pub async fn submit(&self, batch: Batch, slot: Arc<AckSlot>) -> Result<(), IngestError> {
        self.tx
            .send(Op::Batch(batch, slot))
            .await
            .map_err(|_| IngestError::Stopped)
    }

    /// Asks the writer to commit everything queued so far and stop. Whoever still holds
    /// an [`Ingest`] afterwards (a lingering API request, say) gets
    /// [`IngestError::Stopped`] instead of keeping the writer alive.
    ///
    /// Cancel safety: safe; if cancelled, the request may or may not have been queued.
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Op::Shutdown).await;
    }

    /// Waits for room in the queue and returns a permit to queue one batch without
    /// waiting again. Lets a connection keep serving commands while it waits.
    ///
    /// Cancel safety: safe; dropping the future or the permit gives the room back.
    ///
    /// # Errors
    /// [`IngestError::Stopped`] when the writer has stopped.
    pub async fn reserve(&self) -> Result<IngestPermit<'_>, IngestError> {
        self.tx
            .reserve()
            .await
            .map(IngestPermit)
            .map_err(|_| IngestError::Stopped)
    }

    /// The highest stored sequence number of `device`, answered after every batch queued
    /// before this call has been committed (so a reconnecting device sees the effect of
    /// its previous connection).
    ///
    /// # Errors
    /// The writer stopped or the store failed.
    pub async fn last_seq(&self, device: Arc<str>) -> Result<u64, IngestError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::LastSeq(device, reply))
            .await
            .map_err(|_| IngestError::Stopped)?;
        rx.await
            .map_err(|_| IngestError::Stopped)?
            .map_err(IngestError::Store)
    }

    /// Whether the writer has stopped.
    pub fn is_stopped(&self) -> bool {
        self.tx.is_closed() || self.health.exited.load(Ordering::Acquire)
    }

    /// Whether the store is failing commits right now (disk full, database down).
    pub fn is_failing(&self) -> bool {
        self.health.failing.load(Ordering::Acquire)
    }

    /// Completes when the writer thread has ended.
    ///
    /// Cancel safety: safe; it only observes.
    pub async fn writer_exited(&self) {
        loop {
            let notified = self.health.exit.notified();
            tokio::pin!(notified);
            // Registered before the check, so an exit in between still wakes us.
            notified.as_mut().enable();
            if self.health.exited.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    /// Batches waiting in the queue.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// Batches waiting for one commit, with the slots to notify.
#[derive(Default)]
struct Group {
    batches: Vec<Batch>,
    slots: Vec<Arc<AckSlot>>,
}

/// Room for one batch in the ingest queue.
pub struct IngestPermit<'a>(mpsc::Permit<'a, Op>);

impl IngestPermit<'_> {
    /// Queues the batch.
    pub fn send(self, batch: Batch, slot: Arc<AckSlot>) {
        self.0.send(Op::Batch(batch, slot));
    }
}

struct Writer {
    health: Arc<Health>,
    store: Box<dyn TelemetryStore>,
    rx: mpsc::Receiver<Op>,
    max_group: usize,
}

impl Writer {
    fn run(mut self) {
        let mut group = Group::default();
        while let Some(op) = self.rx.blocking_recv() {
            let mut next = Some(op);
            while let Some(op) = next.take() {
                match op {
                    Op::Batch(batch, slot) => {
                        group.batches.push(batch);
                        group.slots.push(slot);
                    }
                    Op::LastSeq(device, reply) => {
                        // Everything queued before the question is committed first.
                        self.commit(&mut group);
                        let answer = self.store.last_seq(&device).map_err(|e| e.to_string());
                        let _ = reply.send(answer);
                    }
                    Op::Shutdown => {
                        self.commit(&mut group);
                        self.rx.close();
                        // Whatever raced in before the close is committed too.
                        while let Ok(op) = self.rx.try_recv() {
                            if let Op::Batch(batch, slot) = op {
                                group.batches.push(batch);
                                group.slots.push(slot);
                            }
                        }
                        self.commit(&mut group);
                        return;
                    }
                }
                if group.batches.len() < self.max_group {
                    next = self.rx.try_recv().ok();
                }
            }
            self.commit(&mut group);
        }
    }

    fn commit(&mut self, group: &mut Group) {
        if group.batches.is_empty() {
            return;
        }
        let batches = &group.batches;
        let readings: usize = batches.iter().map(|b| b.readings.len()).sum();
        let started = Instant::now();
        let mut attempt = 0;
        let result = loop {
            match self.store.commit(batches) {
                Ok(outcomes) => break Ok(outcomes),
                Err(err) if attempt + 1 < COMMIT_ATTEMPTS => {
                    attempt += 1;
                    metrics::counter!("hub_store_commit_errors_total").increment(1);
                    tracing::warn!(error = %err, attempt, "telemetry commit failed; retrying");
                    std::thread::sleep(Duration::from_millis(100 << attempt.min(4)));
                }
                Err(err) => break Err(err),
            }
        };
        match result {
            Ok(outcomes) => {
                self.health.failing.store(false, Ordering::Release);
                let stored: usize = outcomes
                    .iter()
                    .zip(batches)
                    .filter(|(o, _)| **o == Outcome::Stored)
                    .map(|(_, b)| b.readings.len())
                    .sum();
                metrics::histogram!("hub_store_commit_seconds")
                    .record(started.elapsed().as_secs_f64());
                metrics::counter!("hub_readings_stored_total").increment(stored as u64);
                metrics::counter!("hub_batches_duplicate_total").increment(
                    outcomes
                        .iter()
                        .filter(|o| **o == Outcome::Duplicate)
                        .count() as u64,
                );
                tracing::trace!(batches = batches.len(), readings, stored, "group committed");
                for (batch, slot) in group.batches.drain(..).zip(group.slots.drain(..)) {
                    slot.acked.fetch_max(batch.seq, Ordering::AcqRel);
                    slot.notify.notify_one();
                }
            }
            Err(err) => {
                self.health.failing.store(true, Ordering::Release);
                report_failure(&err);
                group.batches.clear();
                for slot in group.slots.drain(..) {
                    slot.failed.store(true, Ordering::Release);
                    slot.notify.notify_one();
                }
            }
        }
    }
}

fn report_failure(err: &StoreError) {
    metrics::counter!("hub_store_commit_failures_total").increment(1);
    tracing::error!(error = %err, "telemetry commit failed for good; closing the affected connections with 1011 so devices keep their data and retry");
}

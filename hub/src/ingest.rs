//! The ingest pipeline: connection tasks push validated batches into one bounded queue;
//! one writer thread group-commits whatever has queued up (up to `ingest.max_group`
//! batches) in a single transaction, and only then releases the acks.
//!
//! When the queue is full, [`Ingest::submit`] waits, the connection stops reading its
//! socket, and TCP flow control slows the device down: backpressure instead of memory.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Notify};

use crate::doorbell::Doorbell;
use crate::store::{Batch, Outcome, StoreError, TelemetryStore};

/// How often a failed commit is retried before its batches are failed.
const COMMIT_ATTEMPTS: u32 = 8;

/// A connection's view of its acknowledgements: the writer raises `acked` and rings the
/// connection. It is state, not a queue, so a slow connection cannot make it grow.
#[derive(Debug, Default)]
pub struct AckSlot {
    acked: AtomicU64,
    failed: AtomicBool,
    /// Rung whenever `acked` rises or the slot fails.
    bell: Doorbell,
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

    /// Waits until `acked` rose or the slot failed since the last call returned (at once
    /// if that happened before this call).
    ///
    /// Cancel safety: cancel safe (see [`Doorbell::rung`]). Meant for one waiter (the
    /// connection).
    pub async fn changed(&self) {
        self.bell.rung().await;
    }

    /// Tells the connection that `acked` rose or the slot failed.
    fn wake(&self) {
        self.bell.ring(1);
    }
}

enum Op {
    Batch(Batch, Arc<AckSlot>),
    /// Answer the questions waiting in [`Questions`] (sent when one is asked, so that an
    /// idle writer wakes up).
    Wake,
    /// Delete a device's readings, after committing what came before.
    Purge(Arc<str>, oneshot::Sender<Result<u64, StoreError>>),
    /// Commit what came before, then stop (at shutdown; later senders get `Stopped`).
    Shutdown,
}

/// Why a purge did not happen.
#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    /// The writer has stopped (shutdown).
    #[error("the ingest writer has stopped")]
    Stopped,
    /// The store failed or cannot delete.
    #[error(transparent)]
    Store(StoreError),
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
    questions: Arc<Questions>,
    health: Arc<Health>,
}

/// A device's question for its last stored sequence number, and where the answer goes.
type Question = (Arc<str>, oneshot::Sender<Result<u64, String>>);

/// Questions for the writer that must not wait behind the batches queued before them: a
/// connecting device asks once, and in a reconnect storm the queue is full of the batches
/// other devices re-send, so behind them each device would wait for many commits. The
/// writer answers between commits. At most one question per connection in its handshake
/// is waiting, so the list is bounded by the connections.
#[derive(Default)]
struct Questions(Mutex<Vec<Question>>);

impl Questions {
    fn ask(&self, question: Question) {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(question);
    }

    fn take(&self) -> Vec<Question> {
        std::mem::take(
            &mut *self
                .0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }
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
        Ingest::start_with_retry(store, capacity, max_group, Duration::from_millis(100))
    }

    fn start_with_retry(
        store: Box<dyn TelemetryStore>,
        capacity: usize,
        max_group: usize,
        retry_base: Duration,
    ) -> std::io::Result<(Ingest, std::thread::JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(capacity);
        let questions = Arc::new(Questions::default());
        let health = Arc::new(Health::default());
        let guard = ExitGuard(health.clone());
        let writer_health = health.clone();
        let writer_questions = questions.clone();
        let handle = std::thread::Builder::new()
            .name("ingest-writer".into())
            .spawn(move || {
                let _guard = guard;
                Writer {
                    store,
                    rx,
                    questions: writer_questions,
                    max_group,
                    retry_base,
                    health: writer_health,
                }
                .run()
            })?;
        Ok((
            Ingest {
                tx,
                questions,
                health,
            },
            handle,
        ))
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

    /// The highest sequence number the store holds for `device`, answered between two
    /// commits without waiting for the batches queued before the question. A batch still
    /// queued from the device's previous connection is therefore not counted yet: the
    /// device sends it again, and the second copy is a duplicate (its sequence number is at
    /// or below the mark by then). Waiting for it would cost a commit (an fsync) per
    /// connecting device, which capped a reconnect storm at a few hundred per second.
    ///
    /// # Errors
    /// The writer stopped or the store failed.
    ///
    /// Cancel safety: safe; the answer is dropped if nobody waits for it.
    pub async fn last_seq(&self, device: Arc<str>) -> Result<u64, IngestError> {
        let (reply, rx) = oneshot::channel();
        self.questions.ask((device, reply));
        // A full queue means the writer is busy; it answers after its current commit.
        if let Err(mpsc::error::TrySendError::Closed(_)) = self.tx.try_send(Op::Wake) {
            return Err(IngestError::Stopped);
        }
        rx.await
            .map_err(|_| IngestError::Stopped)?
            .map_err(IngestError::Store)
    }

    /// Deletes every stored reading of `device` and forgets its high-water mark, after
    /// committing what was queued before. The device should be disconnected first (a
    /// batch it sends meanwhile is stored after the purge).
    ///
    /// Cancel safety: safe to drop; the purge may still happen.
    ///
    /// # Errors
    /// The writer has stopped, or the store failed or cannot delete.
    pub async fn purge(&self, device: Arc<str>) -> Result<u64, PurgeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Op::Purge(device, reply))
            .await
            .map_err(|_| PurgeError::Stopped)?;
        rx.await
            .map_err(|_| PurgeError::Stopped)?
            .map_err(PurgeError::Store)
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
    questions: Arc<Questions>,
    store: Box<dyn TelemetryStore>,
    rx: mpsc::Receiver<Op>,
    max_group: usize,
    /// The first retry of a failed commit waits twice this, doubling up to 16 times it.
    retry_base: Duration,
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
                    Op::Wake => self.answer_questions(),
                    Op::Purge(device, reply) => {
                        self.commit(&mut group);
                        let _ = reply.send(self.store.purge(&device));
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
            self.answer_questions();
        }
    }

    /// Answers every waiting question from what the store holds now.
    fn answer_questions(&mut self) {
        for (device, reply) in self.questions.take() {
            let _ = reply.send(self.store.last_seq(&device).map_err(|e| e.to_string()));
        }
    }

    fn commit(&mut self, group: &mut Group) {
        // A batch whose connection already lost an earlier batch to a failed commit must
        // not be stored: it would raise the device's high-water mark past the lost batch,
        // and on its next connection the device would drop the lost batch as stored. Its
        // connection is closing with 1011; the device re-sends both.
        if group.slots.iter().any(|slot| slot.failed()) {
            let (batches, slots): (Vec<_>, Vec<_>) = group
                .batches
                .drain(..)
                .zip(group.slots.drain(..))
                .filter(|(_, slot)| !slot.failed())
                .unzip();
            group.batches = batches;
            group.slots = slots;
        }
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
                    std::thread::sleep(self.retry_base * (1 << attempt.min(4)));
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
                    slot.wake();
                }
            }
            Err(err) => {
                self.health.failing.store(true, Ordering::Release);
                report_failure(&err);
                group.batches.clear();
                for slot in group.slots.drain(..) {
                    slot.failed.store(true, Ordering::Release);
                    slot.wake();
                }
            }
        }
    }
}

fn report_failure(err: &StoreError) {
    metrics::counter!("hub_store_commit_failures_total").increment(1);
    tracing::error!(error = %err, "telemetry commit failed for good; closing the affected connections with 1011 so devices keep their data and retry");
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::message::truncated;
    use schemas::Reading;
    use std::collections::HashMap;

    /// A store that fails the commits it is told to and keeps high-water marks like the
    /// real ones.
    struct ScriptedStore {
        fail: std::sync::mpsc::Receiver<bool>,
        hwm: Arc<std::sync::Mutex<HashMap<String, u64>>>,
    }

    impl TelemetryStore for ScriptedStore {
        fn last_seq(&mut self, device: &str) -> Result<u64, StoreError> {
            let hwm = self
                .hwm
                .lock()
                .map_err(|_| StoreError::Refused("poisoned".into()))?;
            Ok(hwm.get(device).copied().unwrap_or(0))
        }

        fn commit(&mut self, batches: &[Batch]) -> Result<Vec<Outcome>, StoreError> {
            if self.fail.recv().unwrap_or(false) {
                return Err(StoreError::Refused("scripted failure".into()));
            }
            let mut hwm = self
                .hwm
                .lock()
                .map_err(|_| StoreError::Refused("poisoned".into()))?;
            Ok(batches
                .iter()
                .map(|b| {
                    let mark = hwm.entry(b.device.to_string()).or_default();
                    if b.seq > *mark {
                        *mark = b.seq;
                        Outcome::Stored
                    } else {
                        Outcome::Duplicate
                    }
                })
                .collect())
        }
    }

    fn batch(seq: u64) -> Batch {
        Batch {
            device: Arc::from("d1"),
            seq,
            readings: vec![Reading {
                metric: truncated("m"),
                ts: 1,
                value: 1.0,
            }],
        }
    }

    /// A connecting device's question does not wait for the batches queued before it
    /// (in a reconnect storm that wait was a commit per device).
    #[tokio::test]
    async fn last_seq_is_answered_between_commits_without_waiting_for_the_queue() {
        let (script, fail) = std::sync::mpsc::channel();
        let hwm = Arc::new(std::sync::Mutex::new(HashMap::new()));
        let store = ScriptedStore { fail, hwm };
        let (ingest, writer) =
            Ingest::start_with_retry(Box::new(store), 16, 1, Duration::from_millis(1))
                .expect("writer");
        let slot = Arc::new(AckSlot::starting_at(0));
        for seq in 1..=8 {
            ingest
                .submit(batch(seq), slot.clone())
                .await
                .expect("submit");
        }
        let question = tokio::spawn({
            let ingest = ingest.clone();
            async move { ingest.last_seq(Arc::from("d1")).await }
        });
        // The question is asked (the task runs up to waiting for its answer) first.
        tokio::task::yield_now().await;
        // One commit is let through; seven batches stay queued behind it.
        script.send(false).expect("script");
        let answer = tokio::time::timeout(Duration::from_secs(10), question)
            .await
            .expect("answered while batches were still queued")
            .expect("task")
            .expect("last seq");
        assert_eq!(answer, 1, "what the store held after the one commit");
        assert_eq!(slot.acked(), 1);
        for _ in 2..=8 {
            script.send(false).expect("script");
        }
        ingest.shutdown().await;
        drop(ingest);
        drop(script);
        let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        assert_eq!(slot.acked(), 8);
    }

    /// Found by the pair harness: after a commit failed for good, a later batch of the same
    /// connection must not be stored, or the device's high-water mark skips the lost one.
    #[tokio::test]
    async fn a_failed_batch_is_not_skipped_over_by_later_ones() {
        let (script, fail) = std::sync::mpsc::channel();
        let hwm = Arc::new(std::sync::Mutex::new(HashMap::new()));
        let store = ScriptedStore {
            fail,
            hwm: hwm.clone(),
        };
        let (ingest, writer) =
            Ingest::start_with_retry(Box::new(store), 16, 1, Duration::from_millis(1))
                .expect("writer");
        let slot = Arc::new(AckSlot::starting_at(0));
        // Batch 1 fails on all its attempts; batch 2 would then succeed.
        for _ in 0..COMMIT_ATTEMPTS {
            script.send(true).expect("script");
        }
        script.send(false).expect("script");
        script.send(false).expect("script");
        ingest.submit(batch(1), slot.clone()).await.expect("submit");
        ingest.submit(batch(2), slot.clone()).await.expect("submit");
        assert_eq!(ingest.last_seq(Arc::from("d1")).await.expect("last seq"), 0);
        assert!(slot.failed());
        assert_eq!(slot.acked(), 0);
        // A new connection's batches are stored again.
        let fresh = Arc::new(AckSlot::starting_at(0));
        ingest
            .submit(batch(1), fresh.clone())
            .await
            .expect("submit");
        // The answer to `last_seq` is what the store holds when it is answered, which
        // may be before this batch's commit; its ack is what says it was stored.
        tokio::time::timeout(Duration::from_secs(10), async {
            while fresh.acked() < 1 && !fresh.failed() {
                fresh.changed().await;
            }
        })
        .await
        .expect("the new connection's batch acked");
        assert_eq!(fresh.acked(), 1);
        assert!(!fresh.failed());
        assert_eq!(ingest.last_seq(Arc::from("d1")).await.expect("last seq"), 1);
        drop(script);
        ingest.shutdown().await;
        drop(ingest);
        let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        assert_eq!(
            hwm.lock().map(|h| h.get("d1").copied()).ok().flatten(),
            Some(1)
        );
    }
}

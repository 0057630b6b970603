//! Jobs: one command over many devices. A job fixes its targets when it is created
//! (the devices its selector picked then), and a runner creates one ledger command per
//! target at the job's rate, stops creating once too many finished commands failed, and
//! ends the job when every command it created is final. Progress is read back from the
//! commands themselves, so there is nothing else to keep in step.
//!
//! Runners are driven by [`Jobs::supervise`]: on a restart it picks up every running job
//! and carries on (the ledger creates at most one command per job and device, so targets
//! done before a crash are not sent twice). In a cluster any node may run a job, one at
//! a time, under a lease in the backplane; another node takes over when the lease lapses.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::events::{EventBus, HubEvent};
use crate::ledger::{Durability, Ledger, LedgerError};
use crate::store::jobs::{JobRecord, JobSpec, JobState, JobStore};
use crate::store::ledger::{CommandRecord, CommandState};
use crate::store::{now_ms, DeviceRegistry, StoreError};

/// How often a runner creates commands and renews its lease.
const TICK: Duration = Duration::from_millis(100);
/// How often a runner reads its commands back to check progress, abort and completion.
const CHECK: Duration = Duration::from_millis(500);
/// How often the supervisor looks for running jobs nobody here runs.
const SCAN: Duration = Duration::from_secs(1);
/// How long a runner's lease lasts without renewal (a cluster node that died hands its
/// jobs over after this).
pub const LEASE: Duration = Duration::from_secs(5);
/// Commands created per tick by a job without a rate.
const UNLIMITED_PER_TICK: usize = 500;
/// Finished commands needed before `abort_on_failure` is judged (or every target, when
/// a job has fewer), so that one early failure does not stop a large job.
pub const ABORT_MIN_FINISHED: u64 = 10;
/// Most devices one job may target.
pub const MAX_TARGETS: usize = 100_000;

/// Per-state numbers of a job's targets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCounts {
    /// Targets without a command yet (the job is still creating them).
    pub pending: u64,
    /// Targets that will get no command: the job was aborted or cancelled first, or the
    /// device was removed from the registry.
    pub skipped: u64,
    /// Commands waiting for their device.
    pub queued: u64,
    /// Commands sent, not acknowledged yet.
    pub sent: u64,
    /// Commands the device acknowledged.
    pub acked: u64,
    /// Commands that succeeded.
    pub succeeded: u64,
    /// Commands that failed on the device or timed out.
    pub failed: u64,
    /// Commands that expired in the queue (the device stayed offline past the TTL).
    pub expired: u64,
    /// Commands cancelled.
    pub cancelled: u64,
}

impl JobCounts {
    /// Counts from a job's commands and targets.
    pub fn of(job: &JobRecord, commands: &[CommandRecord]) -> JobCounts {
        let mut counts = JobCounts::default();
        for command in commands {
            *match command.state {
                CommandState::Queued => &mut counts.queued,
                CommandState::Sent => &mut counts.sent,
                CommandState::Acked => &mut counts.acked,
                CommandState::Succeeded => &mut counts.succeeded,
                CommandState::Failed => &mut counts.failed,
                CommandState::Expired => &mut counts.expired,
                CommandState::Cancelled => &mut counts.cancelled,
            } += 1;
        }
        let rest = job.targets.saturating_sub(commands.len() as u64);
        if job.state == JobState::Running {
            counts.pending = rest;
        } else {
            counts.skipped = rest;
        }
        counts
    }

    /// Commands that reached a final state.
    pub fn finished(&self) -> u64 {
        self.succeeded + self.failed + self.expired + self.cancelled
    }

    /// Commands still open.
    pub fn open(&self) -> u64 {
        self.queued + self.sent + self.acked
    }
}

/// Why the abort rule stops a job, or `None` while it may go on.
pub fn abort_reason(job: &JobRecord, counts: &JobCounts) -> Option<String> {
    let threshold = job.spec.abort_on_failure?;
    let finished = counts.finished();
    if finished == 0 || finished < ABORT_MIN_FINISHED.min(job.targets) {
        return None;
    }
    let share = counts.failed as f64 * 100.0 / finished as f64;
    (share >= threshold).then(|| {
        format!(
            "{} of {finished} finished commands failed ({share:.0}% >= {threshold}%)",
            counts.failed
        )
    })
}

/// Parses a rate of command creation: `20`, `20/s`, `600/min` or `3600/h`, as commands
/// per second (0 means as fast as the hub can).
///
/// # Errors
/// A message that shows the accepted forms.
pub fn parse_rate(text: &str) -> Result<f64, String> {
    let bad =
        || format!("rate `{text}` is not a rate: give one like 20/s, 600/min or 20 (per second)");
    let (number, per) = match text.trim().split_once('/') {
        Some((n, unit)) => (n.trim(), unit.trim()),
        None => (text.trim(), "s"),
    };
    let seconds = match per {
        "s" | "sec" | "second" => 1.0,
        "m" | "min" | "minute" => 60.0,
        "h" | "hour" => 3600.0,
        _ => return Err(bad()),
    };
    let n: f64 = number.parse().map_err(|_| bad())?;
    if !n.is_finite() || n < 0.0 {
        return Err(bad());
    }
    Ok(n / seconds)
}

/// Parses a percentage, `10` or `10%`, more than 0 and at most 100.
///
/// # Errors
/// A message that says what is accepted.
pub fn parse_percent(text: &str) -> Result<f64, String> {
    text.trim()
        .trim_end_matches('%')
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|p| *p > 0.0 && *p <= 100.0)
        .ok_or_else(|| {
            format!("`{text}` is not a percentage above 0 and at most 100 (like 10 or 10%)")
        })
}

/// Why a job could not be cancelled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelJobRefused {
    /// No such job.
    NotFound,
    /// It had already ended in this state.
    AlreadyEnded(JobState),
}

/// The job service; cheap to clone.
#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

struct Inner {
    store: Arc<dyn JobStore>,
    /// Targets removed from the registry since the job started get no command.
    registry: Arc<dyn DeviceRegistry>,
    ledger: Ledger,
    events: EventBus,
    /// Who runs jobs here (the cluster node id, or "hub").
    holder: String,
    /// Jobs with a runner in this process.
    running: Mutex<HashSet<u64>>,
    /// The runtime the service was made on, where runners run: a job started through the
    /// admin API (which has a runtime of its own) runs with the hub, not on the API's
    /// thread.
    runtime: Option<tokio::runtime::Handle>,
}

impl Jobs {
    /// The service over `store`, creating commands through `ledger` for devices still in
    /// `registry` and publishing job progress on `events`; `holder` names this process in
    /// leases.
    pub fn new(
        store: Arc<dyn JobStore>,
        registry: Arc<dyn DeviceRegistry>,
        ledger: Ledger,
        events: EventBus,
        holder: String,
    ) -> Jobs {
        Jobs {
            inner: Arc::new(Inner {
                store,
                registry,
                ledger,
                events,
                holder,
                running: Mutex::new(HashSet::new()),
                runtime: tokio::runtime::Handle::try_current().ok(),
            }),
        }
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn JobStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, LedgerError> {
        let store = self.inner.store.clone();
        tokio::task::spawn_blocking(move || f(store.as_ref()))
            .await
            .map_err(|e| LedgerError::Internal(e.to_string()))?
            .map_err(LedgerError::Store)
    }

    fn publish(&self, job: &JobRecord, counts: &JobCounts) {
        self.inner.events.publish(HubEvent::Job {
            job: Box::new(job.clone()),
            counts: counts.clone(),
            at_ms: now_ms(),
        });
    }

    /// Records a job over `targets` and starts running it here.
    ///
    /// # Errors
    /// The store failed.
    ///
    /// Cancel safety: not cancel safe: the job may be stored without its runner started
    /// here (the supervisor starts it within a second).
    pub async fn start(
        &self,
        spec: JobSpec,
        targets: Vec<String>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<JobRecord, LedgerError> {
        let job = self
            .blocking(move |s| s.create_job(&spec, &targets, now_ms()))
            .await?;
        tracing::info!(job = job.id, command = %job.spec.command, targets = job.targets, select = %job.spec.select, "job created");
        metrics::counter!("hub_jobs_created_total").increment(1);
        self.publish(&job, &JobCounts::of(&job, &[]));
        self.claim(job.id, shutdown).await;
        Ok(job)
    }

    /// A job with its commands.
    ///
    /// # Errors
    /// The store failed.
    ///
    /// Cancel safety: safe; it only reads.
    pub async fn get(
        &self,
        id: u64,
    ) -> Result<Option<(JobRecord, Vec<String>, Vec<CommandRecord>)>, LedgerError> {
        self.blocking(move |s| {
            let Some(job) = s.job(id)? else {
                return Ok(None);
            };
            Ok(Some((job, s.job_targets(id)?, s.job_commands(id)?)))
        })
        .await
    }

    /// The newest jobs with their counts.
    ///
    /// # Errors
    /// The store failed.
    ///
    /// Cancel safety: safe; it only reads.
    pub async fn list(&self, limit: usize) -> Result<Vec<(JobRecord, JobCounts)>, LedgerError> {
        self.blocking(move |s| {
            let mut out = Vec::new();
            for job in s.jobs(limit)? {
                let counts = JobCounts::of(&job, &s.job_commands(job.id)?);
                out.push((job, counts));
            }
            Ok(out)
        })
        .await
    }

    /// Cancels a running job: no new commands, and its open commands are cancelled.
    ///
    /// # Errors
    /// The store failed (outer), or the job cannot be cancelled (inner).
    ///
    /// Cancel safety: not cancel safe: the job may be ended with some of its commands
    /// still open (its runner cancels them when it notices).
    pub async fn cancel(
        &self,
        id: u64,
    ) -> Result<Result<JobRecord, CancelJobRefused>, LedgerError> {
        let ended = self
            .blocking(move |s| {
                let Some(job) = s.job(id)? else {
                    return Ok(Err(CancelJobRefused::NotFound));
                };
                match s.end_job(
                    id,
                    JobState::Cancelled,
                    Some("cancelled by operator"),
                    now_ms(),
                )? {
                    Some(job) => Ok(Ok(job)),
                    None => Ok(Err(CancelJobRefused::AlreadyEnded(
                        s.job(id)?.map_or(job.state, |j| j.state),
                    ))),
                }
            })
            .await?;
        let Ok(job) = ended else {
            return Ok(ended);
        };
        tracing::info!(job = id, "job cancelled by operator");
        let commands = self.cancel_open(id).await?;
        self.publish(&job, &JobCounts::of(&job, &commands));
        Ok(Ok(job))
    }

    /// Cancels the open commands of job `id`; returns its commands as they are then.
    async fn cancel_open(&self, id: u64) -> Result<Vec<CommandRecord>, LedgerError> {
        let commands = self.blocking(move |s| s.job_commands(id)).await?;
        let mut out = Vec::with_capacity(commands.len());
        for command in commands {
            if command.state.is_final() {
                out.push(command);
                continue;
            }
            match self.inner.ledger.cancel(command.id).await? {
                Ok(cancelled) => out.push(cancelled),
                // It finished meanwhile; keep what it was (the count is off by one
                // state at most until the next read).
                Err(_) => out.push(command),
            }
        }
        Ok(out)
    }

    /// Deletes jobs that ended before `before_ms`.
    ///
    /// # Errors
    /// The store failed.
    ///
    /// Cancel safety: safe; the deletion completes or not.
    pub async fn prune(&self, before_ms: u64) -> Result<usize, LedgerError> {
        self.blocking(move |s| s.prune_jobs(before_ms)).await
    }

    /// Per-state job numbers (for metrics), over the newest 1,000 jobs.
    ///
    /// # Errors
    /// The store failed.
    ///
    /// Cancel safety: safe; it only reads.
    pub async fn state_counts(&self) -> Result<HashMap<JobState, u64>, LedgerError> {
        self.blocking(|s| {
            let mut counts = HashMap::new();
            for job in s.jobs(1000)? {
                *counts.entry(job.state).or_insert(0) += 1;
            }
            Ok(counts)
        })
        .await
    }

    /// Starts a runner for job `id` here if nobody here runs it and the lease is ours.
    async fn claim(&self, id: u64, shutdown: watch::Receiver<bool>) {
        {
            let Ok(running) = self.inner.running.lock() else {
                return;
            };
            if running.contains(&id) {
                return;
            }
        }
        let holder = self.inner.holder.clone();
        let ttl = LEASE.as_millis() as u64;
        match self.blocking(move |s| s.lease_job(id, &holder, ttl)).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(err) => {
                tracing::warn!(job = id, error = %err, "cannot take a job's lease");
                return;
            }
        }
        let Ok(mut running) = self.inner.running.lock() else {
            return;
        };
        if running.insert(id) {
            let jobs = self.clone();
            let runner = async move {
                if let Err(err) = jobs.run(id, shutdown).await {
                    tracing::warn!(job = id, error = %err, "job runner stopped; it resumes within a second");
                }
                if let Ok(mut running) = jobs.inner.running.lock() {
                    running.remove(&id);
                }
            };
            match &self.inner.runtime {
                Some(runtime) => drop(runtime.spawn(runner)),
                None => drop(tokio::spawn(runner)),
            }
        }
    }

    /// Starts runners for running jobs nobody runs, every second until shutdown: at start
    /// (jobs of the previous run) and, in a cluster, for jobs whose node went away.
    ///
    /// Cancel safety: safe; runners it started stop at shutdown on their own.
    pub async fn supervise(self, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(SCAN);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = crate::stopping(&mut shutdown) => return,
                _ = tick.tick() => {}
            }
            match self.blocking(|s| s.running_jobs()).await {
                Ok(ids) => {
                    for id in ids {
                        self.claim(id, shutdown.clone()).await;
                    }
                }
                Err(err) => tracing::warn!(error = %err, "cannot list running jobs"),
            }
        }
    }

    /// Runs job `id` until it ends, its lease is lost, or shutdown.
    async fn run(&self, id: u64, mut shutdown: watch::Receiver<bool>) -> Result<(), LedgerError> {
        let Some((mut job, targets, commands)) = self.get(id).await? else {
            return Ok(());
        };
        let mut created: HashSet<String> = commands.iter().map(|c| c.device.clone()).collect();
        let mut next = 0usize;
        let args = job.spec.args.to_string();
        let timeout = Duration::from_millis(job.spec.timeout_ms);
        let ttl = Duration::from_millis(job.spec.ttl_ms);
        let rate = job.spec.rate;
        // One command may go at once; after that the rate refills the allowance.
        let mut allowance = 1.0f64;
        let mut last = Instant::now();
        let mut last_check = Instant::now() - CHECK;
        let mut last_lease = Instant::now();
        let mut published = JobCounts::of(&job, &commands);
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = crate::stopping(&mut shutdown) => return Ok(()),
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            if now.duration_since(last_lease) >= LEASE / 5 {
                let holder = self.inner.holder.clone();
                let ttl_ms = LEASE.as_millis() as u64;
                if !self
                    .blocking(move |s| s.lease_job(id, &holder, ttl_ms))
                    .await?
                {
                    tracing::info!(job = id, "another node runs this job now");
                    return Ok(());
                }
                last_lease = now;
            }
            match self.blocking(move |s| s.job(id)).await? {
                Some(current) if current.state == JobState::Running => job = current,
                Some(current) => {
                    if current.state == JobState::Cancelled {
                        // A command created while the cancel went through is cancelled too.
                        self.cancel_open(id).await?;
                    }
                    return Ok(());
                }
                None => return Ok(()),
            }
            let mut budget = if rate > 0.0 {
                allowance =
                    (allowance + rate * now.duration_since(last).as_secs_f64()).min(rate.max(1.0));
                allowance.floor() as usize
            } else {
                UNLIMITED_PER_TICK
            };
            last = now;
            while budget > 0 && next < targets.len() {
                let device = &targets[next];
                next += 1;
                if created.contains(device) {
                    continue;
                }
                // A device removed since the job started is skipped rather than sent a
                // command that would wait out its TTL for nobody.
                let registry = self.inner.registry.clone();
                let key = device.clone();
                let registered = tokio::task::spawn_blocking(move || registry.device(&key))
                    .await
                    .map_err(|e| LedgerError::Internal(e.to_string()))?
                    .map_err(LedgerError::Store)?
                    .is_some();
                if !registered {
                    tracing::info!(job = id, device = %device, "skipping a device removed since the job started");
                    continue;
                }
                self.inner
                    .ledger
                    .create(
                        device,
                        &job.spec.command,
                        &args,
                        timeout,
                        ttl,
                        Some(id),
                        Durability::OnDisk,
                    )
                    .await?;
                metrics::counter!("hub_job_commands_created_total").increment(1);
                created.insert(device.clone());
                budget -= 1;
                if rate > 0.0 {
                    allowance -= 1.0;
                }
            }
            if now.duration_since(last_check) < CHECK && next < targets.len() {
                continue;
            }
            last_check = now;
            let commands = self.blocking(move |s| s.job_commands(id)).await?;
            let counts = JobCounts::of(&job, &commands);
            let end = if let Some(reason) = abort_reason(&job, &counts) {
                Some((JobState::Aborted, Some(reason)))
            } else if next >= targets.len() && commands.iter().all(|c| c.state.is_final()) {
                Some((JobState::Completed, None))
            } else {
                None
            };
            if let Some((state, reason)) = end {
                let ended = self
                    .blocking(move |s| s.end_job(id, state, reason.as_deref(), now_ms()))
                    .await?;
                if let Some(ended) = ended {
                    tracing::info!(job = id, state = ended.state.as_str(), reason = ?ended.reason, succeeded = counts.succeeded, failed = counts.failed, expired = counts.expired, "job ended");
                    self.publish(&ended, &JobCounts::of(&ended, &commands));
                }
                return Ok(());
            }
            if counts != published {
                self.publish(&job, &counts);
                published = counts;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(targets: u64, abort: Option<f64>) -> JobRecord {
        JobRecord {
            id: 1,
            spec: JobSpec {
                command: "led".into(),
                args: serde_json::json!({}),
                select: "all".into(),
                timeout_ms: 1000,
                ttl_ms: 1000,
                rate: 0.0,
                abort_on_failure: abort,
            },
            state: JobState::Running,
            targets,
            created_at: 0,
            finished_at: None,
            reason: None,
        }
    }

    fn counts(succeeded: u64, failed: u64) -> JobCounts {
        JobCounts {
            succeeded,
            failed,
            ..JobCounts::default()
        }
    }

    #[test]
    fn the_abort_rule_waits_for_enough_finished_commands() {
        let big = job(100, Some(20.0));
        assert_eq!(abort_reason(&big, &counts(0, 5)), None, "5 < 10 finished");
        assert_eq!(abort_reason(&big, &counts(8, 1)), None);
        let reason = abort_reason(&big, &counts(8, 2)).expect("20% of 10 failed");
        assert!(
            reason.starts_with("2 of 10 finished commands failed"),
            "{reason}"
        );
        // A job smaller than the minimum is judged once all of it finished.
        let small = job(3, Some(50.0));
        assert_eq!(abort_reason(&small, &counts(1, 1)), None);
        assert!(abort_reason(&small, &counts(1, 2)).is_some());
        // No rule, no abort.
        assert_eq!(abort_reason(&job(100, None), &counts(0, 100)), None);
    }

    #[test]
    fn rates_and_percentages_parse_in_their_usual_forms() {
        assert_eq!(parse_rate("20"), Ok(20.0));
        assert_eq!(parse_rate("20/s"), Ok(20.0));
        assert_eq!(parse_rate("600/min"), Ok(10.0));
        assert_eq!(parse_rate("3600/h"), Ok(1.0));
        assert_eq!(parse_rate("0"), Ok(0.0));
        for bad in ["fast", "-1", "10/week", "NaN", ""] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_percent("10"), Ok(10.0));
        assert_eq!(parse_percent("12.5%"), Ok(12.5));
        for bad in ["0", "101", "ten", "-5%"] {
            assert!(parse_percent(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn targets_without_commands_are_pending_while_running_and_skipped_after() {
        let mut j = job(5, None);
        let c = JobCounts::of(&j, &[]);
        assert_eq!((c.pending, c.skipped), (5, 0));
        j.state = JobState::Aborted;
        let c = JobCounts::of(&j, &[]);
        assert_eq!((c.pending, c.skipped), (0, 5));
    }
}

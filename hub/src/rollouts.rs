//! Staged rollouts: one firmware version offered to the devices a selector picked, canary
//! devices first, then step by step (`10%,50%,100%` of the targets, cumulative), each step
//! only once every device of the previous ones reached an outcome and the share of failed
//! or rolled-back devices stays within the failure budget; past it the rollout aborts (or,
//! with `on_failure = pause`, pauses) on its own: offers not started are withdrawn, devices
//! already updated keep the version. Resuming a rollout accepts the failures so far: the
//! budget judges only outcomes recorded after it last started or resumed.
//!
//! A rollout fixes its targets (in offering order) when created and keeps nothing else
//! that could drift: its progress is read back from the devices' updates, which carry the
//! rollout's id. [`Updates::supervise`] advances every running rollout a few times a
//! second, so a restarted hub simply goes on (state is in SQLite, or in Redis in a
//! cluster). In a cluster any node may advance a rollout, one at a time, under a lease in
//! the backplane; another node takes over when the lease lapses (its holder died).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::events::HubEvent;
use crate::store::now_ms;
use crate::store::updates::{
    OnFailure, RolloutRecord, RolloutSpec, RolloutState, UpdateRecord, UpdateStage,
};
use crate::updates::{UpdateError, Updates};

/// How often running rollouts are advanced (and their leases renewed).
const TICK: Duration = Duration::from_millis(250);
/// How long a node's lease on a rollout lasts without renewal: a cluster node that died
/// hands its rollouts over after this (as jobs do).
pub const LEASE: Duration = crate::jobs::LEASE;

/// A rollout's devices by where their update stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutCounts {
    /// Targets in all.
    pub targets: usize,
    /// Not offered yet.
    pub pending: usize,
    /// Offered, not reported yet.
    pub offered: usize,
    /// Downloading, installing or rebooting.
    pub in_progress: usize,
    /// Running the new version.
    pub succeeded: usize,
    /// Refused or failed to install.
    pub failed: usize,
    /// Went back to the old version.
    pub rolled_back: usize,
}

impl RolloutCounts {
    /// Devices that reached an outcome.
    pub fn finished(&self) -> usize {
        self.succeeded + self.failed + self.rolled_back
    }
}

/// The cumulative target counts at which the phases end: the canary, then each step, the
/// last one always every target.
pub fn phase_ends(spec: &RolloutSpec, targets: usize) -> Vec<usize> {
    let mut ends: Vec<usize> = Vec::new();
    if spec.canary > 0 {
        ends.push(spec.canary.min(targets));
    }
    for pct in &spec.steps {
        let n = ((pct / 100.0) * targets as f64).ceil() as usize;
        let n = n.min(targets);
        if ends.last().is_none_or(|last| n > *last) {
            ends.push(n);
        }
    }
    if ends.last() != Some(&targets) {
        ends.push(targets);
    }
    ends
}

/// What a running rollout should do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Offer the update to these devices (in order).
    Offer(Vec<String>),
    /// Past the failure budget: stop for good, saying why.
    Abort(String),
    /// Past the failure budget: pause until an operator resumes or aborts, saying why.
    Pause(String),
    /// Every target reached an outcome.
    Complete,
    /// Wait for devices to finish the current phase.
    Wait,
}

/// Decides the next move of a rollout over `targets` whose devices' updates stand at
/// `stages`, where `excused` of the failed or rolled-back devices were accepted by an
/// operator's resume (they count toward neither side of the budget); also returns the
/// counts.
pub fn decide(
    spec: &RolloutSpec,
    targets: &[String],
    stages: &HashMap<String, UpdateStage>,
    excused: usize,
) -> (Decision, RolloutCounts) {
    let mut counts = RolloutCounts {
        targets: targets.len(),
        ..RolloutCounts::default()
    };
    for device in targets {
        match stages.get(device) {
            None => counts.pending += 1,
            Some(UpdateStage::Offered) => counts.offered += 1,
            Some(UpdateStage::Reported(state)) => match state {
                schemas::UpdateState::Succeeded => counts.succeeded += 1,
                schemas::UpdateState::Failed => counts.failed += 1,
                schemas::UpdateState::RolledBack => counts.rolled_back += 1,
                _ => counts.in_progress += 1,
            },
        }
    }
    let bad = (counts.failed + counts.rolled_back).saturating_sub(excused);
    let finished = counts.finished().saturating_sub(excused);
    if bad > 0 && (bad as f64) * 100.0 > spec.max_failures * finished as f64 {
        let excused = if excused > 0 {
            format!(", besides {excused} accepted at a resume")
        } else {
            String::new()
        };
        let why = format!(
            "failure budget exceeded: {bad} of {finished} finished devices failed or rolled back{excused} (budget {}%)",
            spec.max_failures
        );
        let decision = match spec.on_failure {
            OnFailure::Abort => Decision::Abort(why),
            OnFailure::Pause => Decision::Pause(format!(
                "{why}; paused: `hub rollout resume` goes on, `abort` stops"
            )),
        };
        return (decision, counts);
    }
    for end in phase_ends(spec, targets.len()) {
        let phase = &targets[..end];
        let unoffered: Vec<String> = phase
            .iter()
            .filter(|d| !stages.contains_key(*d))
            .cloned()
            .collect();
        if !unoffered.is_empty() {
            return (Decision::Offer(unoffered), counts);
        }
        if phase
            .iter()
            .any(|d| !stages.get(d).is_some_and(|s| s.is_final()))
        {
            return (Decision::Wait, counts);
        }
    }
    (Decision::Complete, counts)
}

/// Whether an update ended badly (failed or rolled back).
fn is_bad(update: &UpdateRecord) -> bool {
    matches!(
        update.stage,
        UpdateStage::Reported(schemas::UpdateState::Failed | schemas::UpdateState::RolledBack)
    )
}

/// A rollout with its counts and, on request, each device's update.
#[derive(Debug, Clone)]
pub struct RolloutView {
    /// The rollout.
    pub record: RolloutRecord,
    /// Its devices by stage.
    pub counts: RolloutCounts,
    /// Targets in order with their update (`None`: not offered yet).
    pub devices: Vec<(String, Option<UpdateRecord>)>,
}

impl Updates {
    fn publish_rollout(&self, record: &RolloutRecord, counts: &RolloutCounts) {
        self.events().publish(HubEvent::Rollout {
            id: record.id,
            version: record.spec.version.clone(),
            state: record.state.as_str().to_string(),
            reason: record.reason.clone(),
            counts: *counts,
            at_ms: now_ms(),
        });
    }

    /// Starts a rollout of `spec.version` over `targets` (in offering order). Blocking.
    ///
    /// # Errors
    /// No such artifact, or the store failed.
    pub fn start_rollout(
        &self,
        spec: &RolloutSpec,
        targets: &[String],
    ) -> Result<RolloutRecord, UpdateError> {
        self.firmware().get(&spec.version)?;
        let record = self.store().create_rollout(spec, targets, now_ms())?;
        metrics::counter!("hub_rollouts_started_total").increment(1);
        self.publish_rollout(
            &record,
            &RolloutCounts {
                targets: targets.len(),
                pending: targets.len(),
                ..RolloutCounts::default()
            },
        );
        Ok(record)
    }

    /// One rollout with its counts and devices. Blocking.
    ///
    /// # Errors
    /// The store failed.
    pub fn rollout(&self, id: u64) -> Result<Option<RolloutView>, UpdateError> {
        let store = self.store();
        let Some(record) = store.rollout(id)? else {
            return Ok(None);
        };
        let targets = store.rollout_targets(id)?;
        let mut updates: HashMap<String, UpdateRecord> = store
            .list(Some(id))?
            .into_iter()
            .map(|u| (u.device.clone(), u))
            .collect();
        let stages = updates.iter().map(|(d, u)| (d.clone(), u.stage)).collect();
        let (_, counts) = decide(&record.spec, &targets, &stages, 0);
        let devices = targets
            .into_iter()
            .map(|d| {
                let u = updates.remove(&d);
                (d, u)
            })
            .collect();
        Ok(Some(RolloutView {
            record,
            counts,
            devices,
        }))
    }

    /// The newest rollouts, at most `limit`. Blocking.
    ///
    /// # Errors
    /// The store failed.
    pub fn rollouts(&self, limit: usize) -> Result<Vec<RolloutRecord>, UpdateError> {
        Ok(self.store().rollouts(limit)?)
    }

    /// Pauses (`to` paused), resumes (running) or aborts a rollout; returns whether its
    /// state changed. Aborting withdraws the offers devices have not started. Blocking.
    ///
    /// # Errors
    /// The store failed.
    pub fn set_rollout(
        &self,
        id: u64,
        to: RolloutState,
        reason: &str,
    ) -> Result<bool, UpdateError> {
        let store = self.store();
        let from: &[RolloutState] = match to {
            RolloutState::Paused => &[RolloutState::Running],
            RolloutState::Running => &[RolloutState::Paused],
            RolloutState::Aborted => &[RolloutState::Running, RolloutState::Paused],
            RolloutState::Completed => &[RolloutState::Running],
        };
        let moved = store.set_rollout_state(id, from, to, reason, now_ms())?;
        if moved {
            if to == RolloutState::Aborted {
                self.withdraw_unstarted(id)?;
            }
            if let Some(view) = self.rollout(id)? {
                self.publish_rollout(&view.record, &view.counts);
            }
        }
        Ok(moved)
    }

    /// Withdraws the offers of rollout `id` that devices have not started. Blocking.
    fn withdraw_unstarted(&self, id: u64) -> Result<(), UpdateError> {
        for update in self.store().list(Some(id))? {
            if update.stage == UpdateStage::Offered {
                self.withdraw(&update.device)?;
            }
        }
        Ok(())
    }

    /// Advances one running rollout: offers the next devices (at most `budget`), aborts
    /// or pauses it past its failure budget, completes it. Blocking.
    fn advance(&self, record: &RolloutRecord, budget: usize) -> Result<usize, UpdateError> {
        let store = self.store();
        let targets = store.rollout_targets(record.id)?;
        let updates = store.list(Some(record.id))?;
        // A running rollout's `updated_at` is when it last started or resumed.
        let excused = updates
            .iter()
            .filter(|u| is_bad(u) && u.updated_at <= record.updated_at)
            .count();
        let stages: HashMap<String, UpdateStage> =
            updates.into_iter().map(|u| (u.device, u.stage)).collect();
        match decide(&record.spec, &targets, &stages, excused).0 {
            Decision::Offer(devices) => {
                let mut offered = 0;
                for device in devices.into_iter().take(budget) {
                    self.assign(&device, &record.spec.version, Some(record.id))?;
                    offered += 1;
                }
                Ok(offered)
            }
            Decision::Abort(reason) => {
                tracing::warn!(rollout = record.id, %reason, "rollout aborted");
                self.set_rollout(record.id, RolloutState::Aborted, &reason)?;
                Ok(0)
            }
            Decision::Pause(reason) => {
                tracing::warn!(rollout = record.id, %reason, "rollout paused");
                // Withdrawn before the event, so that what it counts stays true; the
                // devices are offered again on resume.
                if store.set_rollout_state(
                    record.id,
                    &[RolloutState::Running],
                    RolloutState::Paused,
                    &reason,
                    now_ms(),
                )? {
                    self.withdraw_unstarted(record.id)?;
                    if let Some(view) = self.rollout(record.id)? {
                        self.publish_rollout(&view.record, &view.counts);
                    }
                }
                Ok(0)
            }
            Decision::Complete => {
                tracing::info!(rollout = record.id, "rollout completed");
                self.set_rollout(record.id, RolloutState::Completed, "")?;
                Ok(0)
            }
            Decision::Wait => Ok(0),
        }
    }

    /// Advances every running rollout until `shutdown`, at each one's rate. Runs for the
    /// hub's life; a restart picks up where the stored state says. In a cluster it
    /// advances only the rollouts whose lease it holds (taking those whose lease lapsed).
    ///
    /// Cancel safety: stopping it between ticks loses nothing (the next start re-reads
    /// everything); a tick cut short may have offered some of its devices, which the next
    /// tick sees.
    pub async fn supervise(self: std::sync::Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        // Offers each rollout may still make, refilled at its rate.
        let mut allowance: HashMap<u64, (f64, Instant)> = HashMap::new();
        // Rollouts this process holds the lease of, to log a takeover once.
        let mut held: HashSet<u64> = HashSet::new();
        loop {
            tokio::select! {
                _ = crate::stopping(&mut shutdown) => return,
                () = tokio::time::sleep(TICK) => {}
            }
            let me = self.clone();
            let state = (allowance.clone(), held.clone());
            let ticked = tokio::task::spawn_blocking(move || me.tick(state)).await;
            match ticked {
                Ok(Ok(state)) => (allowance, held) = state,
                Ok(Err(err)) => tracing::warn!(error = %err, "cannot advance rollouts"),
                Err(err) => tracing::warn!(error = %err, "cannot advance rollouts"),
            }
        }
    }

    /// One round of [`Updates::supervise`]: sets the gauges, and advances each running
    /// rollout whose lease this process holds. Blocking.
    #[allow(clippy::type_complexity)]
    fn tick(
        &self,
        (mut budgets, mut held): (HashMap<u64, (f64, Instant)>, HashSet<u64>),
    ) -> Result<(HashMap<u64, (f64, Instant)>, HashSet<u64>), UpdateError> {
        let rollouts = self.rollouts(1000)?;
        let mut counts: HashMap<RolloutState, u64> = HashMap::new();
        for r in &rollouts {
            *counts.entry(r.state).or_default() += 1;
        }
        for state in RolloutState::ALL {
            metrics::gauge!("hub_rollouts", "state" => state.as_str())
                .set(counts.get(&state).copied().unwrap_or(0) as f64);
        }
        for r in &rollouts {
            if r.state != RolloutState::Running {
                held.remove(&r.id);
                budgets.remove(&r.id);
                continue;
            }
            if !self
                .store()
                .lease_rollout(r.id, self.holder(), LEASE.as_millis() as u64)?
            {
                held.remove(&r.id);
                continue;
            }
            if held.insert(r.id) {
                tracing::info!(
                    rollout = r.id,
                    holder = self.holder(),
                    "advancing rollout here"
                );
            }
            let now = Instant::now();
            let (tokens, since) = budgets.entry(r.id).or_insert((1.0, now));
            let budget = if r.spec.rate_per_min > 0.0 {
                let per_sec = r.spec.rate_per_min / 60.0;
                *tokens = (*tokens + per_sec * now.duration_since(*since).as_secs_f64())
                    .min(per_sec.max(1.0));
                *since = now;
                tokens.floor() as usize
            } else {
                usize::MAX
            };
            let offered = self.advance(r, budget)?;
            if r.spec.rate_per_min > 0.0 {
                *tokens -= offered as f64;
            }
        }
        Ok((budgets, held))
    }
}

/// Parses `--steps`: `10%,50%,100%` (or without `%`), rising, each above 0 and at most
/// 100; a last step below 100 is followed by all targets anyway.
///
/// # Errors
/// A message saying what is accepted.
pub fn parse_steps(text: &str) -> Result<Vec<f64>, String> {
    let mut steps = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let pct = crate::jobs::parse_percent(part)?;
        if steps.last().is_some_and(|last| pct <= *last) {
            return Err(format!("steps must rise: `{text}`"));
        }
        steps.push(pct);
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::UpdateState;

    fn spec(canary: usize, steps: &[f64], max_failures: f64) -> RolloutSpec {
        RolloutSpec {
            version: "1.1".into(),
            select: "all".into(),
            canary,
            steps: steps.to_vec(),
            max_failures,
            rate_per_min: 0.0,
            on_failure: OnFailure::Abort,
        }
    }

    fn devices(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("d{i:03}")).collect()
    }

    #[test]
    fn phases_are_the_canary_then_the_steps_then_everyone() {
        assert_eq!(
            phase_ends(&spec(10, &[50.0, 100.0], 0.0), 200),
            [10, 100, 200]
        );
        assert_eq!(phase_ends(&spec(0, &[10.0], 0.0), 5), [1, 5]);
        assert_eq!(phase_ends(&spec(300, &[50.0], 0.0), 200), [200]);
        assert_eq!(parse_steps("10%, 50,100%"), Ok(vec![10.0, 50.0, 100.0]));
        assert!(parse_steps("50,10").is_err());
        assert!(parse_steps("0").is_err());
    }

    #[test]
    fn each_phase_waits_for_the_previous_one_and_the_budget_stops_it() {
        let targets = devices(20);
        let s = spec(2, &[50.0, 100.0], 10.0);
        let mut stages = HashMap::new();
        assert_eq!(
            decide(&s, &targets, &stages, 0).0,
            Decision::Offer(targets[..2].to_vec())
        );
        stages.insert(targets[0].clone(), UpdateStage::Offered);
        stages.insert(
            targets[1].clone(),
            UpdateStage::Reported(UpdateState::Downloading),
        );
        assert_eq!(decide(&s, &targets, &stages, 0).0, Decision::Wait);
        stages.insert(
            targets[0].clone(),
            UpdateStage::Reported(UpdateState::Succeeded),
        );
        stages.insert(
            targets[1].clone(),
            UpdateStage::Reported(UpdateState::Succeeded),
        );
        assert_eq!(
            decide(&s, &targets, &stages, 0).0,
            Decision::Offer(targets[2..10].to_vec())
        );
        for d in &targets[2..10] {
            stages.insert(d.clone(), UpdateStage::Reported(UpdateState::Succeeded));
        }
        assert_eq!(
            decide(&s, &targets, &stages, 0).0,
            Decision::Offer(targets[10..].to_vec())
        );
        // One failure of 11 finished is within 10 %? 1/11 = 9 %: yes.
        stages.insert(
            targets[10].clone(),
            UpdateStage::Reported(UpdateState::Failed),
        );
        assert!(matches!(
            decide(&s, &targets, &stages, 0).0,
            Decision::Offer(_)
        ));
        // Two of 12: 17 %, past the budget.
        stages.insert(
            targets[11].clone(),
            UpdateStage::Reported(UpdateState::RolledBack),
        );
        let (decision, counts) = decide(&s, &targets, &stages, 0);
        assert!(
            matches!(decision, Decision::Abort(ref why) if why.contains("2 of 12")),
            "{decision:?}"
        );
        assert_eq!(
            (counts.failed, counts.rolled_back, counts.succeeded),
            (1, 1, 10)
        );
        for d in &targets {
            stages.insert(d.clone(), UpdateStage::Reported(UpdateState::Succeeded));
        }
        assert_eq!(decide(&s, &targets, &stages, 0).0, Decision::Complete);
    }

    #[test]
    fn a_canary_that_rolls_back_stops_the_rollout_with_no_budget() {
        let targets = devices(200);
        let s = spec(10, &[50.0, 100.0], 0.0);
        let mut stages = HashMap::new();
        for d in &targets[..10] {
            stages.insert(d.clone(), UpdateStage::Offered);
        }
        stages.insert(
            targets[3].clone(),
            UpdateStage::Reported(UpdateState::RolledBack),
        );
        assert!(matches!(
            decide(&s, &targets, &stages, 0).0,
            Decision::Abort(_)
        ));
    }

    #[test]
    fn past_the_budget_a_pausing_rollout_pauses_and_a_resume_accepts_the_failures_so_far() {
        let targets = devices(10);
        let mut s = spec(2, &[100.0], 0.0);
        s.on_failure = OnFailure::Pause;
        let mut stages = HashMap::new();
        stages.insert(
            targets[0].clone(),
            UpdateStage::Reported(UpdateState::Succeeded),
        );
        stages.insert(
            targets[1].clone(),
            UpdateStage::Reported(UpdateState::RolledBack),
        );
        let (decision, counts) = decide(&s, &targets, &stages, 0);
        assert!(
            matches!(decision, Decision::Pause(ref why)
                if why.contains("1 of 2") && why.contains("budget 0%") && why.contains("resume")),
            "{decision:?}"
        );
        assert_eq!((counts.succeeded, counts.rolled_back), (1, 1));
        // The same rollout set to abort aborts.
        s.on_failure = OnFailure::Abort;
        assert!(matches!(
            decide(&s, &targets, &stages, 0).0,
            Decision::Abort(_)
        ));
        s.on_failure = OnFailure::Pause;
        // Resumed: the rollback so far is accepted and the next step is offered.
        assert_eq!(
            decide(&s, &targets, &stages, 1).0,
            Decision::Offer(targets[2..].to_vec())
        );
        // A failure after the resume is judged again, beside the accepted one.
        stages.insert(
            targets[2].clone(),
            UpdateStage::Reported(UpdateState::Failed),
        );
        let (decision, _) = decide(&s, &targets, &stages, 1);
        assert!(
            matches!(decision, Decision::Pause(ref why)
                if why.contains("1 of 2") && why.contains("besides 1 accepted")),
            "{decision:?}"
        );
        // Nothing bad since the resume: the rollout completes.
        for d in &targets[2..] {
            stages.insert(d.clone(), UpdateStage::Reported(UpdateState::Succeeded));
        }
        assert_eq!(decide(&s, &targets, &stages, 1).0, Decision::Complete);
        assert_eq!(OnFailure::parse("pause"), Ok(OnFailure::Pause));
        assert!(OnFailure::parse("stop").is_err());
    }
}

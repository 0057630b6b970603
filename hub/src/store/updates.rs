//! Firmware updates per device: which version a device is to install, and where that
//! stands (offered, downloading with percent, installing, rebooting, and the outcome), and
//! the rollouts that assign them: the records, the [`UpdateStore`] seam, and its SQLite
//! storage in the hub database (a cluster keeps them in Redis, `cluster/updates.rs`). One
//! record per device: a newer assignment replaces the older one.
//!
//! A state changes only forward: once an update reached an outcome (`succeeded`, `failed`,
//! `rolled_back`) later reports for it are ignored, so a device that repeats its outcome
//! on every connection (as it may, having no ack for it) changes nothing and publishes no
//! second event.

use std::path::Path;
use std::sync::Mutex;

use crate::config::SqliteOptions;
use rusqlite::{params, Connection, OptionalExtension};
use schemas::UpdateState;

use super::StoreError;

/// Where a device's update stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateStage {
    /// Assigned; the device has not reported yet.
    Offered,
    /// What the device last reported.
    Reported(UpdateState),
}

impl UpdateStage {
    /// Every stage.
    pub const ALL: [UpdateStage; 7] = [
        UpdateStage::Offered,
        UpdateStage::Reported(UpdateState::Downloading),
        UpdateStage::Reported(UpdateState::Installing),
        UpdateStage::Reported(UpdateState::Rebooting),
        UpdateStage::Reported(UpdateState::Succeeded),
        UpdateStage::Reported(UpdateState::Failed),
        UpdateStage::Reported(UpdateState::RolledBack),
    ];

    /// The stored (and shown) name.
    pub fn as_str(self) -> &'static str {
        match self {
            UpdateStage::Offered => "offered",
            UpdateStage::Reported(state) => state.as_str(),
        }
    }

    /// Parses a stored name (an unknown one reads as `failed`, which offers nothing more).
    pub fn parse(s: &str) -> UpdateStage {
        UpdateStage::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .unwrap_or(UpdateStage::Reported(UpdateState::Failed))
    }

    /// Whether the update is over.
    pub fn is_final(self) -> bool {
        matches!(self, UpdateStage::Reported(state) if state.is_final())
    }
}

/// One device's update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateRecord {
    /// The device.
    pub device: String,
    /// The version it is to install.
    pub version: String,
    /// Where it stands.
    pub stage: UpdateStage,
    /// Download progress the device reported, 0 to 100.
    pub percent: u8,
    /// Why it failed or rolled back (or installer output), as the device said.
    pub reason: String,
    /// The rollout that assigned it, if one did.
    pub rollout: Option<u64>,
    /// When it was assigned, ms since the epoch.
    pub assigned_at: u64,
    /// When it last changed, ms since the epoch.
    pub updated_at: u64,
}

/// Storage of updates and rollouts: SQLite on a single node, Redis in a cluster (where
/// any node may advance a rollout, one at a time, under a lease). Calls may block.
pub trait UpdateStore: Send + Sync {
    /// Assigns `version` to `device` (replacing whatever it had), as offered.
    ///
    /// # Errors
    /// The store failed.
    fn assign(
        &self,
        device: &str,
        version: &str,
        rollout: Option<u64>,
        now: u64,
    ) -> Result<UpdateRecord, StoreError>;
    /// The device's update, if it has one.
    ///
    /// # Errors
    /// The store failed.
    fn get(&self, device: &str) -> Result<Option<UpdateRecord>, StoreError>;
    /// Records, atomically, what the device reported about `version`. Returns the
    /// changed record, or `None` when nothing changed: the device has no update to
    /// `version`, or that update is already over, or the report says what is stored.
    ///
    /// # Errors
    /// The store failed.
    fn report(
        &self,
        device: &str,
        version: &str,
        state: UpdateState,
        percent: u8,
        reason: &str,
        now: u64,
    ) -> Result<Option<UpdateRecord>, StoreError>;
    /// Every update, or those of one rollout, by device.
    ///
    /// # Errors
    /// The store failed.
    fn list(&self, rollout: Option<u64>) -> Result<Vec<UpdateRecord>, StoreError>;
    /// Withdraws `device`'s update if it is still only offered (the device has not
    /// started it). Returns whether it did.
    ///
    /// # Errors
    /// The store failed.
    fn withdraw(&self, device: &str) -> Result<bool, StoreError>;
    /// Creates a rollout over `targets` (in offering order), running.
    ///
    /// # Errors
    /// The store failed.
    fn create_rollout(
        &self,
        spec: &RolloutSpec,
        targets: &[String],
        now: u64,
    ) -> Result<RolloutRecord, StoreError>;
    /// One rollout.
    ///
    /// # Errors
    /// The store failed.
    fn rollout(&self, id: u64) -> Result<Option<RolloutRecord>, StoreError>;
    /// The newest rollouts first, at most `limit`.
    ///
    /// # Errors
    /// The store failed.
    fn rollouts(&self, limit: usize) -> Result<Vec<RolloutRecord>, StoreError>;
    /// A rollout's targets in offering order.
    ///
    /// # Errors
    /// The store failed.
    fn rollout_targets(&self, id: u64) -> Result<Vec<String>, StoreError>;
    /// Moves rollout `id`, atomically, from one of `from` to `to` with `reason`; returns
    /// whether it moved (false: it was not in one of `from`).
    ///
    /// # Errors
    /// The store failed.
    fn set_rollout_state(
        &self,
        id: u64,
        from: &[RolloutState],
        to: RolloutState,
        reason: &str,
        now: u64,
    ) -> Result<bool, StoreError>;
    /// Takes or renews the right to advance rollout `id` for `ttl_ms`; false while
    /// another holder has it. A single node always gets it.
    ///
    /// # Errors
    /// The store failed.
    fn lease_rollout(&self, id: u64, holder: &str, ttl_ms: u64) -> Result<bool, StoreError>;
}

impl UpdateRecord {
    /// A new assignment of `version` to `device` at `now`, not reported on yet.
    pub fn offered(device: &str, version: &str, rollout: Option<u64>, now: u64) -> UpdateRecord {
        UpdateRecord {
            device: device.to_string(),
            version: version.to_string(),
            stage: UpdateStage::Offered,
            percent: 0,
            reason: String::new(),
            rollout,
            assigned_at: now,
            updated_at: now,
        }
    }
}

/// The updates table, on its own connection to the hub database.
pub struct SqliteUpdates {
    conn: Mutex<Connection>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS firmware_updates (
    device TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    stage TEXT NOT NULL,
    percent INTEGER NOT NULL,
    reason TEXT NOT NULL,
    rollout INTEGER,
    assigned_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS firmware_updates_by_rollout ON firmware_updates (rollout) WHERE rollout IS NOT NULL;
CREATE TABLE IF NOT EXISTS rollouts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS rollout_targets (
    rollout INTEGER NOT NULL,
    position INTEGER NOT NULL,
    device TEXT NOT NULL,
    PRIMARY KEY (rollout, position)
);
";

/// What a rollout does, as the operator asked for it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RolloutSpec {
    /// The version offered.
    pub version: String,
    /// The selector that picked the targets, as text (for the record).
    pub select: String,
    /// Devices updated first, alone.
    pub canary: usize,
    /// Cumulative shares of the targets, in percent, the last one 100.
    pub steps: Vec<f64>,
    /// Past this share (percent) of failed or rolled-back devices among those that
    /// finished, the rollout stops (how: `on_failure`).
    pub max_failures: f64,
    /// Offers per minute; 0 means as fast as the hub can.
    pub rate_per_min: f64,
    /// What the rollout does past its failure budget (absent in rollouts stored before
    /// the choice existed: they abort).
    #[serde(default)]
    pub on_failure: OnFailure,
}

/// What a rollout does past its failure budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    /// Stop for good: offers not started are withdrawn.
    #[default]
    Abort,
    /// Pause: offers not started are withdrawn; an operator resumes (accepting the
    /// failures so far) or aborts.
    Pause,
}

impl OnFailure {
    /// The name on the command line and in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::Abort => "abort",
            OnFailure::Pause => "pause",
        }
    }

    /// Parses `abort` or `pause`.
    ///
    /// # Errors
    /// A message saying what is accepted.
    pub fn parse(text: &str) -> Result<OnFailure, String> {
        match text.trim() {
            "abort" => Ok(OnFailure::Abort),
            "pause" => Ok(OnFailure::Pause),
            _ => Err(format!("on-failure `{text}`: give `pause` or `abort`")),
        }
    }
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RolloutState {
    /// Offering, step by step.
    Running,
    /// Paused by an operator (no new offers; devices already offered go on), or past its
    /// failure budget with `on_failure = pause` (offers not started were withdrawn).
    Paused,
    /// Stopped (by an operator, or past its failure budget): offers not started were
    /// withdrawn; updated devices keep the new version.
    Aborted,
    /// Every target finished.
    Completed,
}

impl RolloutState {
    /// Every state.
    pub const ALL: [RolloutState; 4] = [
        RolloutState::Running,
        RolloutState::Paused,
        RolloutState::Aborted,
        RolloutState::Completed,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Aborted => "aborted",
            RolloutState::Completed => "completed",
        }
    }

    /// Parses a stored name (unknown names read as aborted, which does nothing more).
    pub fn parse(s: &str) -> RolloutState {
        RolloutState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .unwrap_or(RolloutState::Aborted)
    }
}

/// A rollout as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutRecord {
    /// Its id.
    pub id: u64,
    /// What it does.
    pub spec: RolloutSpec,
    /// Where it is.
    pub state: RolloutState,
    /// Why it was paused or aborted.
    pub reason: String,
    /// Created, ms since the epoch.
    pub created_at: u64,
    /// Last changed, ms since the epoch.
    pub updated_at: u64,
}

impl RolloutRecord {
    /// Rollout `id` of `spec`, created running at `now`.
    pub fn started(id: u64, spec: &RolloutSpec, now: u64) -> RolloutRecord {
        RolloutRecord {
            id,
            spec: spec.clone(),
            state: RolloutState::Running,
            reason: String::new(),
            created_at: now,
            updated_at: now,
        }
    }
}

fn rollout_row(r: &rusqlite::Row<'_>) -> Result<RolloutRecord, rusqlite::Error> {
    let spec: String = r.get(1)?;
    let state: String = r.get(2)?;
    Ok(RolloutRecord {
        id: r.get::<_, i64>(0)? as u64,
        spec: serde_json::from_str(&spec).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, Box::new(e))
        })?,
        state: RolloutState::parse(&state),
        reason: r.get(3)?,
        created_at: r.get::<_, i64>(4)? as u64,
        updated_at: r.get::<_, i64>(5)? as u64,
    })
}

const ROLLOUT_COLUMNS: &str =
    "SELECT id, spec, state, reason, created_at, updated_at FROM rollouts";

const COLUMNS: &str =
    "SELECT device, version, stage, percent, reason, rollout, assigned_at, updated_at FROM firmware_updates";

fn row(r: &rusqlite::Row<'_>) -> Result<UpdateRecord, rusqlite::Error> {
    let stage: String = r.get(2)?;
    Ok(UpdateRecord {
        device: r.get(0)?,
        version: r.get(1)?,
        stage: UpdateStage::parse(&stage),
        percent: r.get::<_, i64>(3)?.clamp(0, 100) as u8,
        reason: r.get(4)?,
        rollout: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
        assigned_at: r.get::<_, i64>(6)? as u64,
        updated_at: r.get::<_, i64>(7)? as u64,
    })
}

impl SqliteUpdates {
    /// Opens (and creates) the tables in the hub database at `path`.
    ///
    /// # Errors
    /// The database cannot be opened.
    pub fn open(
        path: &Path,
        options: impl Into<SqliteOptions>,
    ) -> Result<SqliteUpdates, StoreError> {
        let conn = super::sqlite::open(path, options)?;
        conn.execute_batch(SCHEMA)?;
        Ok(SqliteUpdates {
            conn: Mutex::new(conn),
        })
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        let mut conn = self
            .conn
            .lock()
            .map_err(|_| StoreError::Other("updates lock poisoned".into()))?;
        Ok(f(&mut conn)?)
    }
}

impl UpdateStore for SqliteUpdates {
    fn assign(
        &self,
        device: &str,
        version: &str,
        rollout: Option<u64>,
        now: u64,
    ) -> Result<UpdateRecord, StoreError> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO firmware_updates
                 (device, version, stage, percent, reason, rollout, assigned_at, updated_at)
                 VALUES (?1, ?2, 'offered', 0, '', ?3, ?4, ?4)",
                params![device, version, rollout.map(|r| r as i64), now as i64],
            )?;
            Ok(())
        })?;
        Ok(UpdateRecord::offered(device, version, rollout, now))
    }

    fn get(&self, device: &str) -> Result<Option<UpdateRecord>, StoreError> {
        self.with(|c| {
            c.query_row(&format!("{COLUMNS} WHERE device = ?1"), [device], row)
                .optional()
        })
    }

    fn report(
        &self,
        device: &str,
        version: &str,
        state: UpdateState,
        percent: u8,
        reason: &str,
        now: u64,
    ) -> Result<Option<UpdateRecord>, StoreError> {
        self.with(|c| {
            // Immediate: a deferred transaction that reads and then writes fails at once
            // ("database is locked") when another connection wrote in between.
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let current = tx
                .query_row(&format!("{COLUMNS} WHERE device = ?1"), [device], row)
                .optional()?;
            let Some(mut record) = current else {
                return Ok(None);
            };
            let stage = UpdateStage::Reported(state);
            if record.version != version
                || record.stage.is_final()
                || (record.stage == stage && record.percent == percent)
            {
                return Ok(None);
            }
            tx.execute(
                "UPDATE firmware_updates SET stage = ?2, percent = ?3, reason = ?4, updated_at = ?5
                 WHERE device = ?1",
                params![
                    device,
                    stage.as_str(),
                    i64::from(percent),
                    reason,
                    now as i64
                ],
            )?;
            tx.commit()?;
            record.stage = stage;
            record.percent = percent;
            record.reason = reason.to_string();
            record.updated_at = now;
            Ok(Some(record))
        })
    }

    fn list(&self, rollout: Option<u64>) -> Result<Vec<UpdateRecord>, StoreError> {
        self.with(|c| {
            let (sql, arg) = match rollout {
                Some(r) => (
                    format!("{COLUMNS} WHERE rollout = ?1 ORDER BY device"),
                    Some(r as i64),
                ),
                None => (format!("{COLUMNS} ORDER BY device"), None),
            };
            let mut stmt = c.prepare(&sql)?;
            let rows = match arg {
                Some(a) => stmt.query_map([a], row)?.collect::<Result<Vec<_>, _>>()?,
                None => stmt.query_map([], row)?.collect::<Result<Vec<_>, _>>()?,
            };
            Ok(rows)
        })
    }

    fn create_rollout(
        &self,
        spec: &RolloutSpec,
        targets: &[String],
        now: u64,
    ) -> Result<RolloutRecord, StoreError> {
        let text = serde_json::to_string(spec).map_err(|e| StoreError::Other(e.to_string()))?;
        let id = self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            tx.execute(
                "INSERT INTO rollouts (spec, state, reason, created_at, updated_at) VALUES (?1, 'running', '', ?2, ?2)",
                params![text, now as i64],
            )?;
            let id = tx.last_insert_rowid();
            {
                let mut insert = tx.prepare(
                    "INSERT INTO rollout_targets (rollout, position, device) VALUES (?1, ?2, ?3)",
                )?;
                for (i, device) in targets.iter().enumerate() {
                    insert.execute(params![id, i as i64, device])?;
                }
            }
            tx.commit()?;
            Ok(id as u64)
        })?;
        Ok(RolloutRecord::started(id, spec, now))
    }

    fn rollout(&self, id: u64) -> Result<Option<RolloutRecord>, StoreError> {
        self.with(|c| {
            c.query_row(
                &format!("{ROLLOUT_COLUMNS} WHERE id = ?1"),
                [id as i64],
                rollout_row,
            )
            .optional()
        })
    }

    fn rollouts(&self, limit: usize) -> Result<Vec<RolloutRecord>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(&format!("{ROLLOUT_COLUMNS} ORDER BY id DESC LIMIT ?1"))?;
            let rows = stmt
                .query_map([limit as i64], rollout_row)?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
    }

    fn rollout_targets(&self, id: u64) -> Result<Vec<String>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT device FROM rollout_targets WHERE rollout = ?1 ORDER BY position",
            )?;
            let rows = stmt
                .query_map([id as i64], |r| r.get(0))?
                .collect::<Result<Vec<String>, _>>()?;
            Ok(rows)
        })
    }

    fn set_rollout_state(
        &self,
        id: u64,
        from: &[RolloutState],
        to: RolloutState,
        reason: &str,
        now: u64,
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            let tx = c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let state: Option<String> = tx
                .query_row(
                    "SELECT state FROM rollouts WHERE id = ?1",
                    [id as i64],
                    |r| r.get(0),
                )
                .optional()?;
            let moved = state.is_some_and(|s| from.contains(&RolloutState::parse(&s)));
            if moved {
                tx.execute(
                    "UPDATE rollouts SET state = ?2, reason = ?3, updated_at = ?4 WHERE id = ?1",
                    params![id as i64, to.as_str(), reason, now as i64],
                )?;
            }
            tx.commit()?;
            Ok(moved)
        })
    }

    fn withdraw(&self, device: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            Ok(c.execute(
                "DELETE FROM firmware_updates WHERE device = ?1 AND stage = 'offered'",
                [device],
            )? > 0)
        })
    }

    fn lease_rollout(&self, _id: u64, _holder: &str, _ttl_ms: u64) -> Result<bool, StoreError> {
        // One hub owns its database (the data-dir lock), so it advances every rollout.
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, SqliteUpdates) {
        let dir = tempfile::tempdir().expect("dir");
        let store = SqliteUpdates::open(
            &dir.path().join("hub.db"),
            crate::config::Synchronous::Normal,
        )
        .expect("open");
        (dir, store)
    }

    #[test]
    fn reports_move_an_update_forward_until_its_outcome() {
        let (_dir, store) = store();
        assert_eq!(store.get("d1").expect("get"), None);
        store.assign("d1", "1.1", Some(7), 10).expect("assign");
        let dl = store
            .report("d1", "1.1", UpdateState::Downloading, 40, "", 11)
            .expect("report")
            .expect("changed");
        assert_eq!((dl.stage.as_str(), dl.percent), ("downloading", 40));
        // The same again changes nothing; another version is not this update.
        assert!(store
            .report("d1", "1.1", UpdateState::Downloading, 40, "", 12)
            .expect("same")
            .is_none());
        assert!(store
            .report("d1", "1.2", UpdateState::Failed, 0, "x", 12)
            .expect("other")
            .is_none());
        let rb = store
            .report(
                "d1",
                "1.1",
                UpdateState::RolledBack,
                100,
                "did not boot",
                13,
            )
            .expect("report")
            .expect("changed");
        assert!(rb.stage.is_final());
        // Final: a repeated or late report is ignored.
        assert!(store
            .report("d1", "1.1", UpdateState::Succeeded, 100, "", 14)
            .expect("late")
            .is_none());
        let stored = store.get("d1").expect("get").expect("some");
        assert_eq!(stored.reason, "did not boot");
        assert_eq!(stored.rollout, Some(7));
        assert_eq!(store.list(Some(7)).expect("list").len(), 1);
        assert!(store.list(Some(8)).expect("list").is_empty());
        // Withdrawing applies only to updates not started.
        assert!(!store.withdraw("d1").expect("withdraw"));
        store.assign("d2", "1.1", None, 20).expect("assign");
        assert!(store.withdraw("d2").expect("withdraw"));
        assert_eq!(store.get("d2").expect("get"), None);
        // A reassignment starts over.
        store.assign("d1", "1.2", None, 30).expect("assign");
        assert_eq!(
            store.get("d1").expect("get").map(|r| r.stage),
            Some(UpdateStage::Offered)
        );
        assert_eq!(
            UpdateStage::parse("rolled_back"),
            UpdateStage::Reported(UpdateState::RolledBack)
        );
    }
}

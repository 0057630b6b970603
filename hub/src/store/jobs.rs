//! Jobs: one command sent to every device a selector picked. The job record, its fixed
//! target list, the [`JobStore`] seam, and its SQLite storage (in the hub database, next
//! to the commands the job creates, so that a job and its commands restart together).
//!
//! A job's commands are ordinary ledger commands that carry the job's id; the ledger
//! creates at most one per job and device, which is what makes a restarted runner safe.

use rusqlite::{params, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::ledger::{row as command_row, CommandRecord, LedgerStore, COLUMNS};
use super::StoreError;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Creating commands, or waiting for the ones it created to finish.
    Running,
    /// Every target has a command and every command finished.
    Completed,
    /// Stopped creating commands because too many of the finished ones failed.
    Aborted,
    /// Cancelled by an operator: no new commands, open ones cancelled.
    Cancelled,
}

impl JobState {
    /// Every state.
    pub const ALL: [JobState; 4] = [
        JobState::Running,
        JobState::Completed,
        JobState::Aborted,
        JobState::Cancelled,
    ];

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Aborted => "aborted",
            JobState::Cancelled => "cancelled",
        }
    }

    /// Parses a stored name (unknown names read as `cancelled`, which does nothing more).
    pub fn parse(s: &str) -> JobState {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .unwrap_or(JobState::Cancelled)
    }
}

/// What a job does, as the operator asked for it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobSpec {
    /// Command name.
    pub command: String,
    /// Command arguments (a JSON document).
    pub args: serde_json::Value,
    /// The selector that picked the targets, as text (for the record).
    pub select: String,
    /// Result timeout of each command, ms.
    pub timeout_ms: u64,
    /// How long each command waits for an offline device, ms.
    pub ttl_ms: u64,
    /// Commands created per second; 0 means as fast as the hub can.
    pub rate: f64,
    /// Stop creating commands once this share (percent) of the finished ones failed.
    pub abort_on_failure: Option<f64>,
}

/// A job as stored.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobRecord {
    /// Job id.
    pub id: u64,
    /// What it does.
    #[serde(flatten)]
    pub spec: JobSpec,
    /// Current state.
    pub state: JobState,
    /// How many devices it targets.
    pub targets: u64,
    /// Created, ms since the epoch.
    pub created_at: u64,
    /// Left `running`, ms since the epoch.
    pub finished_at: Option<u64>,
    /// Why it was aborted or cancelled.
    pub reason: Option<String>,
}

/// Storage of jobs: SQLite on a single node, Redis in a cluster (where any node may run a
/// job, one at a time, under a lease). Calls may block.
pub trait JobStore: Send + Sync {
    /// Records a new running job over `targets` (in the order commands are created).
    ///
    /// # Errors
    /// The store failed.
    fn create_job(
        &self,
        spec: &JobSpec,
        targets: &[String],
        now: u64,
    ) -> Result<JobRecord, StoreError>;
    /// One job.
    ///
    /// # Errors
    /// The store failed.
    fn job(&self, id: u64) -> Result<Option<JobRecord>, StoreError>;
    /// The newest jobs first.
    ///
    /// # Errors
    /// The store failed.
    fn jobs(&self, limit: usize) -> Result<Vec<JobRecord>, StoreError>;
    /// A job's targets, in creation order.
    ///
    /// # Errors
    /// The store failed.
    fn job_targets(&self, id: u64) -> Result<Vec<String>, StoreError>;
    /// The commands a job created so far.
    ///
    /// # Errors
    /// The store failed.
    fn job_commands(&self, id: u64) -> Result<Vec<CommandRecord>, StoreError>;
    /// Moves a running job to `state`; `None` when it was not running (someone else
    /// ended it first).
    ///
    /// # Errors
    /// The store failed.
    fn end_job(
        &self,
        id: u64,
        state: JobState,
        reason: Option<&str>,
        now: u64,
    ) -> Result<Option<JobRecord>, StoreError>;
    /// Ids of running jobs.
    ///
    /// # Errors
    /// The store failed.
    fn running_jobs(&self) -> Result<Vec<u64>, StoreError>;
    /// Takes or renews the right to run job `id` for `ttl_ms`; false while another holder
    /// has it. A single node always gets it.
    ///
    /// # Errors
    /// The store failed.
    fn lease_job(&self, id: u64, holder: &str, ttl_ms: u64) -> Result<bool, StoreError>;
    /// Deletes jobs that ended before `before_ms` (their commands follow the ledger's
    /// own retention); returns how many.
    ///
    /// # Errors
    /// The store failed.
    fn prune_jobs(&self, before_ms: u64) -> Result<usize, StoreError>;
}

/// Tables of jobs in the hub database; created with the ledger's.
pub(super) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    targets INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    finished_at INTEGER,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS jobs_running ON jobs (state) WHERE state = 'running';
CREATE TABLE IF NOT EXISTS job_targets (
    job INTEGER NOT NULL,
    pos INTEGER NOT NULL,
    device TEXT NOT NULL,
    PRIMARY KEY (job, pos)
) WITHOUT ROWID;
";

const JOB_COLUMNS: &str =
    "SELECT id, spec, state, targets, created_at, finished_at, reason FROM jobs";

fn job_row(r: &rusqlite::Row<'_>) -> Result<JobRecord, rusqlite::Error> {
    let spec: String = r.get(1)?;
    let spec = serde_json::from_str(&spec).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, Box::new(e))
    })?;
    Ok(JobRecord {
        id: r.get::<_, i64>(0)? as u64,
        spec,
        state: JobState::parse(&r.get::<_, String>(2)?),
        targets: r.get::<_, i64>(3)? as u64,
        created_at: r.get::<_, i64>(4)? as u64,
        finished_at: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
        reason: r.get(6)?,
    })
}

impl JobStore for LedgerStore {
    fn create_job(
        &self,
        spec: &JobSpec,
        targets: &[String],
        now: u64,
    ) -> Result<JobRecord, StoreError> {
        let spec_text =
            serde_json::to_string(spec).map_err(|e| StoreError::Other(e.to_string()))?;
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO jobs (spec, state, targets, created_at) VALUES (?1, 'running', ?2, ?3)",
                params![spec_text, targets.len() as i64, now as i64],
            )?;
            let id = tx.last_insert_rowid();
            {
                let mut insert = tx
                    .prepare_cached("INSERT INTO job_targets (job, pos, device) VALUES (?1, ?2, ?3)")?;
                for (pos, device) in targets.iter().enumerate() {
                    insert.execute(params![id, pos as i64, device])?;
                }
            }
            let record = tx.query_row(&format!("{JOB_COLUMNS} WHERE id = ?1"), [id], job_row)?;
            tx.commit()?;
            Ok(record)
        })
    }

    fn job(&self, id: u64) -> Result<Option<JobRecord>, StoreError> {
        self.with(|c| {
            c.query_row(
                &format!("{JOB_COLUMNS} WHERE id = ?1"),
                [id as i64],
                job_row,
            )
            .optional()
        })
    }

    fn jobs(&self, limit: usize) -> Result<Vec<JobRecord>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(&format!("{JOB_COLUMNS} ORDER BY id DESC LIMIT ?1"))?;
            let rows = stmt.query_map([limit as i64], job_row)?;
            rows.collect()
        })
    }

    fn job_targets(&self, id: u64) -> Result<Vec<String>, StoreError> {
        self.with(|c| {
            let mut stmt =
                c.prepare_cached("SELECT device FROM job_targets WHERE job = ?1 ORDER BY pos")?;
            let rows = stmt.query_map([id as i64], |r| r.get(0))?;
            rows.collect()
        })
    }

    fn job_commands(&self, id: u64) -> Result<Vec<CommandRecord>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(&format!("{COLUMNS} WHERE job = ?1 ORDER BY id"))?;
            let rows = stmt.query_map([id as i64], command_row)?;
            rows.collect()
        })
    }

    fn end_job(
        &self,
        id: u64,
        state: JobState,
        reason: Option<&str>,
        now: u64,
    ) -> Result<Option<JobRecord>, StoreError> {
        self.with(|c| {
            let changed = c.execute(
                "UPDATE jobs SET state = ?2, finished_at = ?3, reason = ?4 WHERE id = ?1 AND state = 'running'",
                params![id as i64, state.as_str(), now as i64, reason],
            )?;
            if changed == 0 {
                return Ok(None);
            }
            c.query_row(&format!("{JOB_COLUMNS} WHERE id = ?1"), [id as i64], job_row)
                .optional()
        })
    }

    fn running_jobs(&self) -> Result<Vec<u64>, StoreError> {
        self.with(|c| {
            let mut stmt =
                c.prepare_cached("SELECT id FROM jobs WHERE state = 'running' ORDER BY id")?;
            let rows = stmt.query_map([], |r| r.get::<_, i64>(0).map(|v| v as u64))?;
            rows.collect()
        })
    }

    fn lease_job(&self, _id: u64, _holder: &str, _ttl_ms: u64) -> Result<bool, StoreError> {
        // One hub owns its database (the data-dir lock), so it runs every job.
        Ok(true)
    }

    fn prune_jobs(&self, before_ms: u64) -> Result<usize, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.execute(
                "DELETE FROM job_targets WHERE job IN
                   (SELECT id FROM jobs WHERE state != 'running' AND finished_at < ?1)",
                [before_ms as i64],
            )?;
            let n = tx.execute(
                "DELETE FROM jobs WHERE state != 'running' AND finished_at < ?1",
                [before_ms as i64],
            )?;
            tx.commit()?;
            Ok(n)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Synchronous;
    use crate::store::{CommandStore, NewCommand};

    fn spec() -> JobSpec {
        JobSpec {
            command: "led".into(),
            args: serde_json::json!({"on": true}),
            select: "site=b".into(),
            timeout_ms: 1_000,
            ttl_ms: 60_000,
            rate: 10.0,
            abort_on_failure: Some(20.0),
        }
    }

    #[test]
    fn a_job_keeps_its_targets_and_one_command_per_device() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = LedgerStore::open(&dir.path().join("l.db"), Synchronous::Normal).expect("open");
        let targets = vec!["b".to_string(), "a".to_string(), "c".to_string()];
        let job = store.create_job(&spec(), &targets, 100).expect("create");
        assert_eq!(job.state, JobState::Running);
        assert_eq!(job.targets, 3);
        assert_eq!(store.job_targets(job.id).expect("targets"), targets);
        assert_eq!(store.running_jobs().expect("running"), [job.id]);

        let first = store
            .create(
                &NewCommand::new("b", "led", "{}", 1_000, 60_000).for_job(job.id),
                110,
            )
            .expect("command");
        // A runner that restarted asks again: the same command comes back.
        let again = store
            .create(
                &NewCommand::new("b", "led", "{}", 1_000, 60_000).for_job(job.id),
                120,
            )
            .expect("command");
        assert_eq!(first.id, again.id);
        assert_eq!(again.job, Some(job.id));
        // Commands without a job are not limited.
        store
            .create(&NewCommand::new("b", "led", "{}", 1_000, 60_000), 130)
            .expect("command");
        store
            .create(&NewCommand::new("b", "led", "{}", 1_000, 60_000), 130)
            .expect("command");
        let commands = store.job_commands(job.id).expect("commands");
        assert_eq!(commands.len(), 1);
        assert_eq!(commands[0].device, "b");

        let ended = store
            .end_job(job.id, JobState::Cancelled, Some("operator"), 200)
            .expect("end")
            .expect("was running");
        assert_eq!(ended.state, JobState::Cancelled);
        assert_eq!(ended.finished_at, Some(200));
        assert_eq!(
            store
                .end_job(job.id, JobState::Completed, None, 300)
                .expect("end"),
            None,
            "a job ends once"
        );
        assert!(store.running_jobs().expect("running").is_empty());
        assert_eq!(store.jobs(10).expect("list")[0].spec, spec());
        assert_eq!(store.prune_jobs(150).expect("prune"), 0);
        assert_eq!(store.prune_jobs(250).expect("prune"), 1);
        assert!(store.job(job.id).expect("get").is_none());
        assert!(store.job_targets(job.id).expect("targets").is_empty());
    }

    #[test]
    fn a_database_from_before_jobs_gains_the_job_column() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("old.db");
        {
            let conn = rusqlite::Connection::open(&path).expect("open");
            conn.execute_batch(
                "CREATE TABLE commands (id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL,
                 name TEXT NOT NULL, args TEXT NOT NULL, state TEXT NOT NULL, created_at INTEGER NOT NULL,
                 expires_at INTEGER NOT NULL, timeout_ms INTEGER NOT NULL, deadline INTEGER, sent_at INTEGER,
                 acked_at INTEGER, finished_at INTEGER, attempts INTEGER NOT NULL DEFAULT 0, ok INTEGER,
                 code INTEGER, output TEXT, reason TEXT);
                 INSERT INTO commands (device, name, args, state, created_at, expires_at, timeout_ms)
                 VALUES ('d', 'led', '{}', 'queued', 1, 2, 3);",
            )
            .expect("old schema");
        }
        let store = LedgerStore::open(&path, Synchronous::Normal).expect("open");
        let old = store.list("d", 10).expect("list");
        assert_eq!(old.len(), 1);
        assert_eq!(old[0].job, None);
    }
}

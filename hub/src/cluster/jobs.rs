//! Jobs in Redis, shared by every node of a cluster: any node may run a job, one at a
//! time, under a lease that a node renews while it runs the job; when that node dies,
//! another takes the job over once the lease lapses and carries on where it stopped
//! (the ledger creates at most one command per job and device).
//!
//! Keys: `hub:job:next` (id counter), string `hub:job:{id}` (the record as JSON), list
//! `hub:job:{id}:targets`, sorted set `hub:jobs` (every job by id), set
//! `hub:jobs:running`, string `hub:job:{id}:lease` (the holder, with a TTL), and hash
//! `hub:job:{id}:cmds` (device -> command id; written by the ledger).

use super::ledger::RedisLedger;
use super::sync::SyncRedis;
use crate::store::jobs::{JobRecord, JobSpec, JobState, JobStore};
use crate::store::ledger::CommandRecord;
use crate::store::StoreError;

const NEXT: &str = "hub:job:next";
const ALL: &str = "hub:jobs";
const RUNNING: &str = "hub:jobs:running";
/// Targets pushed per RPUSH, so one huge job does not make one huge command.
const TARGET_CHUNK: usize = 1000;

fn job_key(id: u64) -> String {
    format!("hub:job:{id}")
}

/// Replaces a running job's record with the one given (as JSON), atomically, only while
/// it is still running.
const END: &str = r"
local current = redis.call('GET', KEYS[1])
if not current then return 0 end
if cjson.decode(current)['state'] ~= 'running' then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 1";

/// Takes the lease if free, renews it if held by the same holder.
const LEASE: &str = r"
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1";

/// Takes the lease at `key` for `holder` if it is free, or renews it if `holder` has it,
/// for `ttl_ms`; false while another holder has it. Jobs and rollouts run under these.
pub(super) fn take_lease(
    redis: &SyncRedis,
    key: &str,
    holder: &str,
    ttl_ms: u64,
) -> Result<bool, StoreError> {
    let got: i64 = redis.run(|c| {
        redis::Script::new(LEASE)
            .key(key)
            .arg(holder)
            .arg(ttl_ms)
            .invoke(c)
    })?;
    Ok(got == 1)
}

fn decode(text: Option<String>) -> Result<Option<JobRecord>, StoreError> {
    text.map(|t| {
        serde_json::from_str(&t).map_err(|e| StoreError::Other(format!("job record: {e}")))
    })
    .transpose()
}

fn encode(record: &JobRecord) -> Result<String, StoreError> {
    serde_json::to_string(record).map_err(|e| StoreError::Other(e.to_string()))
}

impl JobStore for RedisLedger {
    fn create_job(
        &self,
        spec: &JobSpec,
        targets: &[String],
        now: u64,
    ) -> Result<JobRecord, StoreError> {
        let id: u64 = self.redis.run(|c| redis::cmd("INCR").arg(NEXT).query(c))?;
        let record = JobRecord {
            id,
            spec: spec.clone(),
            state: JobState::Running,
            targets: targets.len() as u64,
            created_at: now,
            finished_at: None,
            reason: None,
        };
        let text = encode(&record)?;
        // The targets first, the record and the running set last and together: a node
        // that sees the job running sees all of its targets.
        self.redis.run(|c| {
            let mut pipe = redis::pipe();
            pipe.atomic();
            let list = format!("{}:targets", job_key(id));
            for chunk in targets.chunks(TARGET_CHUNK) {
                pipe.rpush(&list, chunk).ignore();
            }
            pipe.set(job_key(id), &text).ignore();
            pipe.zadd(ALL, id, id).ignore();
            pipe.sadd(RUNNING, id).ignore();
            pipe.query::<()>(c)
        })?;
        Ok(record)
    }

    fn job(&self, id: u64) -> Result<Option<JobRecord>, StoreError> {
        let text: Option<String> = self
            .redis
            .run(|c| redis::cmd("GET").arg(job_key(id)).query(c))?;
        decode(text)
    }

    fn jobs(&self, limit: usize) -> Result<Vec<JobRecord>, StoreError> {
        let ids: Vec<u64> = self.redis.run(|c| {
            redis::cmd("ZREVRANGE")
                .arg(ALL)
                .arg(0)
                .arg(limit.saturating_sub(1))
                .query(c)
        })?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let texts: Vec<Option<String>> = self.redis.run(|c| {
            let mut pipe = redis::pipe();
            for id in &ids {
                pipe.get(job_key(*id));
            }
            pipe.query(c)
        })?;
        let mut out = Vec::with_capacity(texts.len());
        for text in texts {
            if let Some(record) = decode(text)? {
                out.push(record);
            }
        }
        Ok(out)
    }

    fn job_targets(&self, id: u64) -> Result<Vec<String>, StoreError> {
        self.redis.run(|c| {
            redis::cmd("LRANGE")
                .arg(format!("{}:targets", job_key(id)))
                .arg(0)
                .arg(-1)
                .query(c)
        })
    }

    fn job_commands(&self, id: u64) -> Result<Vec<CommandRecord>, StoreError> {
        let mut ids: Vec<u64> = self.redis.run(|c| {
            redis::cmd("HVALS")
                .arg(format!("{}:cmds", job_key(id)))
                .query(c)
        })?;
        ids.sort_unstable();
        self.load(&ids)
    }

    fn end_job(
        &self,
        id: u64,
        state: JobState,
        reason: Option<&str>,
        now: u64,
    ) -> Result<Option<JobRecord>, StoreError> {
        let Some(mut record) = self.job(id)? else {
            return Ok(None);
        };
        record.state = state;
        record.finished_at = Some(now);
        record.reason = reason.map(str::to_string);
        let text = encode(&record)?;
        let changed: i64 = self.redis.run(|c| {
            redis::Script::new(END)
                .key(job_key(id))
                .key(RUNNING)
                .arg(&text)
                .arg(id)
                .invoke(c)
        })?;
        Ok((changed == 1).then_some(record))
    }

    fn running_jobs(&self) -> Result<Vec<u64>, StoreError> {
        let mut ids: Vec<u64> = self
            .redis
            .run(|c| redis::cmd("SMEMBERS").arg(RUNNING).query(c))?;
        ids.sort_unstable();
        Ok(ids)
    }

    fn lease_job(&self, id: u64, holder: &str, ttl_ms: u64) -> Result<bool, StoreError> {
        take_lease(
            &self.redis,
            &format!("{}:lease", job_key(id)),
            holder,
            ttl_ms,
        )
    }

    fn prune_jobs(&self, before_ms: u64) -> Result<usize, StoreError> {
        // Jobs are few next to commands; keep the newest thousand and drop older ended ones.
        let old: Vec<u64> = self
            .redis
            .run(|c| redis::cmd("ZREVRANGE").arg(ALL).arg(1000).arg(-1).query(c))?;
        let mut pruned = 0;
        for id in old {
            let Some(record) = self.job(id)? else {
                continue;
            };
            if record.state == JobState::Running
                || record.finished_at.is_none_or(|at| at >= before_ms)
            {
                continue;
            }
            let key = job_key(id);
            self.redis.run(|c| {
                redis::pipe()
                    .atomic()
                    .del(&key)
                    .del(format!("{key}:targets"))
                    .del(format!("{key}:cmds"))
                    .zrem(ALL, id)
                    .query::<()>(c)
            })?;
            pruned += 1;
        }
        Ok(pruned)
    }
}

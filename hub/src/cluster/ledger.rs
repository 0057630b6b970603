//! The command ledger in Redis, shared by every node of a cluster: a command for an
//! offline device is delivered by whichever node it reconnects to.
//!
//! Keys: `hub:cmd:next` (id counter), hash `hub:cmd:{id}` (the record), sorted sets
//! `hub:cmds:{device}` (history, newest [`HISTORY_PER_DEVICE`] kept),
//! `hub:cmds:open:{device}` (open commands, by id), `hub:cmds:due` (open commands by the
//! time the hub must act: TTL while queued, result deadline once sent), and hash
//! `hub:cmd:counts` (commands per state), and hash `hub:job:{job}:cmds` (device -> command,
//! for commands a job created; at most one each). Every transition is one Lua script, so it
//! happens once however many nodes race for it. Scripts touch keys they compute, so this
//! needs a single Redis (with replicas if you like), not Redis Cluster.

use std::collections::HashMap;
use std::sync::Arc;

use super::sync::SyncRedis;
use crate::store::ledger::{CancelRefused, CommandOutcome, CommandRecord, CommandState};
use crate::store::{CommandStore, NewCommand, StoreError};

/// Commands kept per device; older finished ones are deleted when new ones arrive.
pub const HISTORY_PER_DEVICE: usize = 1000;
/// Most commands one sweep closes.
const SWEEP_BATCH: usize = 1000;

const NEXT: &str = "hub:cmd:next";
const COUNTS: &str = "hub:cmd:counts";
const DUE: &str = "hub:cmds:due";

fn cmd_key(id: u64) -> String {
    format!("hub:cmd:{id}")
}

const CREATE: &str = r"
local by_job = nil
if ARGV[8] ~= '' then
  by_job = 'hub:job:' .. ARGV[8] .. ':cmds'
  local existing = redis.call('HGET', by_job, ARGV[1])
  if existing then return tonumber(existing) end
end
local id = redis.call('INCR', KEYS[1])
local k = 'hub:cmd:' .. id
local hist = 'hub:cmds:' .. ARGV[1]
redis.call('HSET', k, 'id', id, 'device', ARGV[1], 'name', ARGV[2], 'args', ARGV[3], 'state', 'queued',
  'created_at', ARGV[4], 'expires_at', ARGV[5], 'timeout_ms', ARGV[6], 'attempts', 0)
if by_job then
  redis.call('HSET', k, 'job', ARGV[8])
  redis.call('HSET', by_job, ARGV[1], id)
end
redis.call('ZADD', hist, id, id)
redis.call('ZADD', 'hub:cmds:open:' .. ARGV[1], id, id)
redis.call('ZADD', KEYS[3], ARGV[5], id)
redis.call('HINCRBY', KEYS[2], 'queued', 1)
local keep = tonumber(ARGV[7])
local n = redis.call('ZCARD', hist)
if n > keep then
  for _, old in ipairs(redis.call('ZRANGE', hist, 0, n - keep - 1)) do
    local st = redis.call('HGET', 'hub:cmd:' .. old, 'state')
    if st ~= 'queued' and st ~= 'sent' and st ~= 'acked' then
      redis.call('DEL', 'hub:cmd:' .. old)
      redis.call('ZREM', hist, old)
      if st then redis.call('HINCRBY', KEYS[2], st, -1) end
    end
  end
end
return id";

const MARK_SENT: &str = r"
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return 0 end
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if st ~= 'queued' then return 0 end
local deadline = tonumber(ARGV[1]) + tonumber(redis.call('HGET', KEYS[1], 'timeout_ms'))
redis.call('HSET', KEYS[1], 'state', 'sent', 'sent_at', ARGV[1], 'deadline', deadline)
redis.call('ZADD', KEYS[3], deadline, redis.call('HGET', KEYS[1], 'id'))
redis.call('HINCRBY', KEYS[2], 'queued', -1)
redis.call('HINCRBY', KEYS[2], 'sent', 1)
return 1";

const ACK: &str = r"
local st = redis.call('HGET', KEYS[1], 'state')
if redis.call('HGET', KEYS[1], 'device') ~= ARGV[1] then return 0 end
if st ~= 'queued' and st ~= 'sent' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'acked', 'acked_at', ARGV[2])
if not redis.call('HGET', KEYS[1], 'deadline') then
  local deadline = tonumber(ARGV[2]) + tonumber(redis.call('HGET', KEYS[1], 'timeout_ms'))
  redis.call('HSET', KEYS[1], 'deadline', deadline, 'sent_at', ARGV[2])
  redis.call('ZADD', KEYS[3], deadline, redis.call('HGET', KEYS[1], 'id'))
end
redis.call('HINCRBY', KEYS[2], st, -1)
redis.call('HINCRBY', KEYS[2], 'acked', 1)
return 1";

const FINISH: &str = r"
local st = redis.call('HGET', KEYS[1], 'state')
if redis.call('HGET', KEYS[1], 'device') ~= ARGV[1] then return 0 end
if st ~= 'queued' and st ~= 'sent' and st ~= 'acked' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'finished_at', ARGV[2], 'ok', ARGV[4], 'code', ARGV[5], 'output', ARGV[6])
redis.call('HSETNX', KEYS[1], 'sent_at', ARGV[2])
redis.call('HSETNX', KEYS[1], 'acked_at', ARGV[2])
local id = redis.call('HGET', KEYS[1], 'id')
redis.call('ZREM', KEYS[3], id)
redis.call('ZREM', 'hub:cmds:open:' .. ARGV[1], id)
redis.call('HINCRBY', KEYS[2], st, -1)
redis.call('HINCRBY', KEYS[2], ARGV[3], 1)
return 1";

const CANCEL: &str = r"
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return 'missing' end
if st ~= 'queued' and st ~= 'sent' and st ~= 'acked' then return st end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[1], 'reason', 'cancelled by operator')
local id = redis.call('HGET', KEYS[1], 'id')
redis.call('ZREM', KEYS[3], id)
redis.call('ZREM', 'hub:cmds:open:' .. redis.call('HGET', KEYS[1], 'device'), id)
redis.call('HINCRBY', KEYS[2], st, -1)
redis.call('HINCRBY', KEYS[2], 'cancelled', 1)
return 'ok'";

const EXPIRE: &str = r"
local changed = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])) do
  local k = 'hub:cmd:' .. id
  local st = redis.call('HGET', k, 'state')
  redis.call('ZREM', KEYS[1], id)
  local to = nil
  if st == 'queued' then
    to = 'expired'
    redis.call('HSET', k, 'state', to, 'finished_at', ARGV[1], 'reason', 'not delivered within its TTL (device offline)')
  elseif st == 'sent' or st == 'acked' then
    to = 'failed'
    local secs = tonumber(redis.call('HGET', k, 'timeout_ms')) / 1000
    redis.call('HSET', k, 'state', to, 'finished_at', ARGV[1], 'reason', 'timeout: no result within ' .. secs .. ' s')
  end
  if to then
    redis.call('ZREM', 'hub:cmds:open:' .. redis.call('HGET', k, 'device'), id)
    redis.call('HINCRBY', KEYS[2], st, -1)
    redis.call('HINCRBY', KEYS[2], to, 1)
    table.insert(changed, id)
  end
end
return changed";

/// The Redis command store.
pub struct RedisLedger {
    pub(super) redis: Arc<SyncRedis>,
    create: redis::Script,
    mark_sent: redis::Script,
    ack: redis::Script,
    finish: redis::Script,
    cancel: redis::Script,
    expire: redis::Script,
}

impl RedisLedger {
    /// A ledger in the given Redis.
    pub fn new(redis: Arc<SyncRedis>) -> RedisLedger {
        RedisLedger {
            redis,
            create: redis::Script::new(CREATE),
            mark_sent: redis::Script::new(MARK_SENT),
            ack: redis::Script::new(ACK),
            finish: redis::Script::new(FINISH),
            cancel: redis::Script::new(CANCEL),
            expire: redis::Script::new(EXPIRE),
        }
    }

    pub(super) fn load(&self, ids: &[u64]) -> Result<Vec<CommandRecord>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let maps: Vec<HashMap<String, String>> = self.redis.run(|c| {
            let mut pipe = redis::pipe();
            for id in ids {
                pipe.hgetall(cmd_key(*id));
            }
            pipe.query(c)
        })?;
        Ok(maps.into_iter().filter_map(parse).collect())
    }

    fn changed(&self, id: u64, changed: i64) -> Result<Option<CommandRecord>, StoreError> {
        if changed == 0 {
            return Ok(None);
        }
        Ok(self.load(&[id])?.into_iter().next())
    }
}

fn parse(f: HashMap<String, String>) -> Option<CommandRecord> {
    let num = |k: &str| {
        f.get(k)
            .and_then(|v| v.parse::<f64>().ok())
            .map(|v| v as u64)
    };
    let text = |k: &str| f.get(k).cloned();
    let id = num("id")?;
    let args_text = text("args").unwrap_or_else(|| "{}".into());
    Some(CommandRecord {
        id,
        device: text("device")?,
        name: text("name").unwrap_or_default(),
        args: serde_json::from_str(&args_text).unwrap_or(serde_json::Value::String(args_text)),
        state: CommandState::parse(f.get("state")?),
        created_at: num("created_at").unwrap_or(0),
        expires_at: num("expires_at").unwrap_or(0),
        timeout_ms: num("timeout_ms").unwrap_or(0),
        deadline: num("deadline"),
        sent_at: num("sent_at"),
        acked_at: num("acked_at"),
        finished_at: num("finished_at"),
        attempts: num("attempts").unwrap_or(0) as u32,
        result: f.get("ok").map(|ok| CommandOutcome {
            ok: ok == "1",
            code: f.get("code").and_then(|c| c.parse().ok()).unwrap_or(0),
            output: text("output").unwrap_or_default(),
        }),
        reason: text("reason"),
        job: num("job"),
    })
}

impl CommandStore for RedisLedger {
    fn create(&self, new: &NewCommand<'_>, now: u64) -> Result<CommandRecord, StoreError> {
        let NewCommand {
            device,
            name,
            args,
            timeout_ms,
            ttl_ms,
            job,
        } = *new;
        let job = job.map(|j| j.to_string()).unwrap_or_default();
        let id: u64 = self.redis.run(|c| {
            self.create
                .key(NEXT)
                .key(COUNTS)
                .key(DUE)
                .arg(device)
                .arg(name)
                .arg(args)
                .arg(now)
                .arg(now.saturating_add(ttl_ms))
                .arg(timeout_ms)
                .arg(HISTORY_PER_DEVICE)
                .arg(&job)
                .invoke(c)
        })?;
        self.load(&[id])?
            .into_iter()
            .next()
            .ok_or_else(|| StoreError::Other(format!("command {id} vanished after creation")))
    }

    fn get(&self, id: u64) -> Result<Option<CommandRecord>, StoreError> {
        Ok(self.load(&[id])?.into_iter().next())
    }

    fn list(&self, device: &str, limit: usize) -> Result<Vec<CommandRecord>, StoreError> {
        let ids: Vec<u64> = self.redis.run(|c| {
            redis::cmd("ZREVRANGE")
                .arg(format!("hub:cmds:{device}"))
                .arg(0)
                .arg(limit.saturating_sub(1))
                .query(c)
        })?;
        self.load(&ids)
    }

    fn deliverable(
        &self,
        device: &str,
        after: u64,
        limit: usize,
        now: u64,
    ) -> Result<Vec<CommandRecord>, StoreError> {
        let ids: Vec<u64> = self.redis.run(|c| {
            redis::cmd("ZRANGEBYSCORE")
                .arg(format!("hub:cmds:open:{device}"))
                .arg(format!("({after}"))
                .arg("+inf")
                .arg("LIMIT")
                .arg(0)
                .arg(limit)
                .query(c)
        })?;
        Ok(self
            .load(&ids)?
            .into_iter()
            .filter(|r| {
                !r.state.is_final() && (r.state != CommandState::Queued || r.expires_at > now)
            })
            .collect())
    }

    fn mark_sent(&self, id: u64, now: u64) -> Result<Option<CommandRecord>, StoreError> {
        let changed: i64 = self.redis.run(|c| {
            self.mark_sent
                .key(cmd_key(id))
                .key(COUNTS)
                .key(DUE)
                .arg(now)
                .invoke(c)
        })?;
        self.changed(id, changed)
    }

    fn ack(&self, device: &str, id: u64, now: u64) -> Result<Option<CommandRecord>, StoreError> {
        let changed: i64 = self.redis.run(|c| {
            self.ack
                .key(cmd_key(id))
                .key(COUNTS)
                .key(DUE)
                .arg(device)
                .arg(now)
                .invoke(c)
        })?;
        self.changed(id, changed)
    }

    fn finish(
        &self,
        device: &str,
        id: u64,
        ok: bool,
        code: i32,
        output: &str,
        now: u64,
    ) -> Result<Option<CommandRecord>, StoreError> {
        let state = if ok { "succeeded" } else { "failed" };
        let changed: i64 = self.redis.run(|c| {
            self.finish
                .key(cmd_key(id))
                .key(COUNTS)
                .key(DUE)
                .arg(device)
                .arg(now)
                .arg(state)
                .arg(if ok { 1 } else { 0 })
                .arg(code)
                .arg(output)
                .invoke(c)
        })?;
        self.changed(id, changed)
    }

    fn cancel(
        &self,
        id: u64,
        now: u64,
    ) -> Result<Result<CommandRecord, CancelRefused>, StoreError> {
        let answer: String = self.redis.run(|c| {
            self.cancel
                .key(cmd_key(id))
                .key(COUNTS)
                .key(DUE)
                .arg(now)
                .invoke(c)
        })?;
        match answer.as_str() {
            "ok" => self
                .get(id)?
                .map(Ok)
                .ok_or_else(|| StoreError::Other(format!("command {id} vanished"))),
            "missing" => Ok(Err(CancelRefused::NotFound)),
            state => Ok(Err(CancelRefused::AlreadyFinal(CommandState::parse(state)))),
        }
    }

    fn expire_due(&self, now: u64) -> Result<Vec<CommandRecord>, StoreError> {
        let ids: Vec<u64> = self.redis.run(|c| {
            self.expire
                .key(DUE)
                .key(COUNTS)
                .arg(now)
                .arg(SWEEP_BATCH)
                .invoke(c)
        })?;
        self.load(&ids)
    }

    fn counts(&self) -> Result<Vec<(CommandState, u64)>, StoreError> {
        let map: HashMap<String, i64> = self
            .redis
            .run(|c| redis::cmd("HGETALL").arg(COUNTS).query(c))?;
        Ok(map
            .into_iter()
            .map(|(k, v)| (CommandState::parse(&k), v.max(0) as u64))
            .collect())
    }

    fn prune_finished(&self, _before_ms: u64) -> Result<usize, StoreError> {
        // Bounded per device when commands are created (HISTORY_PER_DEVICE).
        Ok(0)
    }
}

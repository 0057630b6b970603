//! Per-device high-water marks in Redis (hash `hub:seq`), shared by every node, so a
//! device that reconnects to another node learns what is already stored.

use std::sync::Arc;

use super::sync::SyncRedis;
use crate::store::{SeqStore, StoreError};

const KEY: &str = "hub:seq";

/// Raises marks, never lowers them, atomically.
const RAISE: &str = r"
for i = 1, #ARGV, 2 do
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
  if tonumber(ARGV[i + 1]) > cur then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return 1";

/// The Redis mark store.
pub struct RedisSeq {
    redis: Arc<SyncRedis>,
    raise: redis::Script,
}

impl RedisSeq {
    /// Marks in the given Redis.
    pub fn new(redis: Arc<SyncRedis>) -> RedisSeq {
        RedisSeq {
            redis,
            raise: redis::Script::new(RAISE),
        }
    }
}

impl SeqStore for RedisSeq {
    fn get(&mut self, device: &str) -> Result<u64, StoreError> {
        self.redis
            .run(|c| {
                redis::cmd("HGET")
                    .arg(KEY)
                    .arg(device)
                    .query::<Option<u64>>(c)
            })
            .map(|v| v.unwrap_or(0))
    }

    fn raise(&mut self, marks: &[(Arc<str>, u64)]) -> Result<(), StoreError> {
        if marks.is_empty() {
            return Ok(());
        }
        let mut inv = self.raise.key(KEY);
        for (device, seq) in marks {
            inv.arg(&**device).arg(*seq);
        }
        self.redis.run(|c| inv.invoke::<i64>(c)).map(|_| ())
    }
}

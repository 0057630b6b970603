//! A blocking Redis connection shared by the cluster's stores, reconnecting after errors.
//! The stores are called from `spawn_blocking` (like the SQLite ones), so one connection
//! behind a mutex serialises them; each call is one round trip or one script.

use std::sync::Mutex;
use std::time::Duration;

use crate::store::StoreError;

/// How long one Redis call may take. Short: a hung Redis must fail requests quickly
/// (devices get 1011 and retry, the API answers 503) rather than stall them.
pub const IO_TIMEOUT: Duration = Duration::from_secs(2);

/// The shared connection.
pub struct SyncRedis {
    client: redis::Client,
    conn: Mutex<Option<redis::Connection>>,
}

impl SyncRedis {
    /// A lazily connecting handle.
    pub fn new(client: redis::Client) -> SyncRedis {
        SyncRedis {
            client,
            conn: Mutex::new(None),
        }
    }

    /// Runs `f` on the connection, connecting first if needed. After an error the
    /// connection is dropped so the next call starts clean.
    ///
    /// # Errors
    /// Redis is unreachable or the command failed.
    pub fn run<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let mut slot = self
            .conn
            .lock()
            .map_err(|_| StoreError::Other("redis connection lock poisoned".into()))?;
        if slot.is_none() {
            let conn = self.client.get_connection_with_timeout(IO_TIMEOUT)?;
            conn.set_read_timeout(Some(IO_TIMEOUT))?;
            conn.set_write_timeout(Some(IO_TIMEOUT))?;
            *slot = Some(conn);
        }
        let Some(conn) = slot.as_mut() else {
            return Err(StoreError::Other("redis connection missing".into()));
        };
        match f(conn) {
            Ok(v) => Ok(v),
            Err(err) => {
                if err.is_io_error() || err.is_timeout() || err.is_connection_dropped() {
                    *slot = None;
                }
                Err(err.into())
            }
        }
    }
}

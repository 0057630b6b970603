//! Read-only connections of a SQLite store, so that its reads never queue behind its writes.

use std::path::Path;

use rusqlite::Connection;

use super::StoreError;
use crate::config::SqliteOptions;

/// Connections of a store that only read, so that reads never queue behind the store's
/// writes (a write holds its connection while it waits for the database's write lock and
/// for its fsync; in WAL mode a reader needs neither).
pub(crate) struct ReadConnections {
    conns: Vec<std::sync::Mutex<Connection>>,
    /// Which connection a read that finds them all busy waits for.
    next: std::sync::atomic::AtomicUsize,
}

impl ReadConnections {
    /// Opens `n` connections (at least one) to the database at `path`, whose schema the
    /// store's write connection has made.
    ///
    /// # Errors
    /// The database cannot be opened.
    pub(crate) fn open(
        path: &Path,
        options: SqliteOptions,
        n: usize,
    ) -> Result<ReadConnections, rusqlite::Error> {
        let conns = (0..n.max(1))
            .map(|_| super::sqlite::configured(path, options).map(std::sync::Mutex::new))
            .collect::<Result<_, _>>()?;
        Ok(ReadConnections {
            conns,
            next: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Runs `f`, which only reads, on a free connection if there is one, else waits for
    /// one (in turn).
    ///
    /// # Errors
    /// `f` failed, or a connection's lock was poisoned.
    pub(crate) fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, rusqlite::Error>,
    ) -> Result<T, StoreError> {
        let free = self.conns.iter().find_map(|c| c.try_lock().ok());
        let conn = match free {
            Some(conn) => conn,
            None => {
                let i =
                    self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.conns.len();
                self.conns[i]
                    .lock()
                    .map_err(|_| StoreError::Other("read connection lock poisoned".into()))?
            }
        };
        Ok(f(&conn)?)
    }

    /// Holds every connection (tests: a read must then wait).
    #[cfg(test)]
    pub(crate) fn hold_all(&self) -> Vec<std::sync::MutexGuard<'_, Connection>> {
        self.conns.iter().filter_map(|c| c.lock().ok()).collect()
    }
}

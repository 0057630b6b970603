//! Why a log operation failed.

use std::io;
use std::path::{Path, PathBuf};

/// Why a log operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A file operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On which file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The record does not fit in the log's byte cap; nothing was written.
    #[error("the log is full ({used} of {max} bytes used, the record needs {need} more)")]
    Full {
        /// Bytes of segment files in use.
        used: u64,
        /// The cap ([`crate::LogOptions::max_bytes`]).
        max: u64,
        /// Bytes the refused record needed (header included).
        need: u64,
    },
    /// A payload of 4 GiB or more cannot be framed.
    #[error("a record of {len} bytes is too large to frame")]
    TooLarge {
        /// The payload's length.
        len: usize,
    },
    /// The record number is before the head or at or after the end.
    #[error("record {number} is not in the log (it holds {front}..{end})")]
    OutOfRange {
        /// The requested number.
        number: u64,
        /// The head.
        front: u64,
        /// The number the next append gets.
        end: u64,
    },
    /// The record was lost before the log was opened (damage in an older segment, or a
    /// segment file that is gone); its number is kept.
    #[error("record {number} was lost (damaged or deleted segment data)")]
    Missing {
        /// The record number.
        number: u64,
    },
    /// The record was fine when the log was opened but fails its checks now (the disk
    /// corrupted it).
    #[error("record {number} in {} at offset {offset} is corrupt: {why}", path.display())]
    Corrupt {
        /// The record number.
        number: u64,
        /// The segment.
        path: PathBuf,
        /// Where the record starts.
        offset: u64,
        /// Which check failed.
        why: &'static str,
    },
    /// A new head must lie between the current head and the end.
    #[error("cannot move the head to {front}: it must be in {min}..={max}")]
    BadHead {
        /// The refused head.
        front: u64,
        /// The current head.
        min: u64,
        /// The end.
        max: u64,
    },
    /// The log was opened with [`crate::SegmentLog::open_read_only`].
    #[error("the log in {} is open read-only", dir.display())]
    ReadOnly {
        /// The log's directory.
        dir: PathBuf,
    },
}

/// A mapper from an I/O error to [`LogError::Io`] for `op` on `path`.
pub(crate) fn io_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> LogError + 'a {
    move |source| LogError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

//! The log's file names, listing its segments, directory fsync, and writing a head into a
//! log that is not open (for owners that import data from an older layout).

use std::fs::{self, File};
use std::io;
use std::path::Path;

use crate::error::{io_err, LogError};
use crate::head::{self, Entry, Meta};

/// The head file's name.
pub const HEAD_FILE: &str = "head.seglog";
/// Where a new head file is written before it is renamed over [`HEAD_FILE`].
pub(crate) const HEAD_TMP: &str = "head.seglog.tmp";
const SEGMENT_SUFFIX: &str = ".seglog";

/// The file name of the segment whose first record is `base`.
pub fn segment_file_name(base: u64) -> String {
    format!("{base:020}{SEGMENT_SUFFIX}")
}

/// The first record number of a segment file name, or `None` for any other name.
pub(crate) fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// First record numbers of the segments in `dir`, sorted. A missing directory has none.
///
/// # Errors
/// The directory cannot be listed.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<u64>, LogError> {
    numbered_files(dir, parse_segment_file_name).map_err(io_err("list", dir))
}

/// The numbers `parse` reads from the names of the files in `dir`, sorted; names it does
/// not recognise are skipped, and a missing directory has none. Also what an owner of an
/// older on-disk layout lists that layout's files with.
///
/// # Errors
/// The directory cannot be listed.
pub fn numbered_files(dir: &Path, parse: impl Fn(&str) -> Option<u64>) -> io::Result<Vec<u64>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut numbers = Vec::new();
    for entry in entries {
        if let Some(n) = entry?.file_name().to_str().and_then(&parse) {
            numbers.push(n);
        }
    }
    numbers.sort_unstable();
    Ok(numbers)
}

/// Makes the directory's entries (new, renamed files) durable.
///
/// # Errors
/// The fsync failed.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("fsync", dir))
}

/// Writes the head of the log in `dir` (which must not be open) durably, by rename: the
/// head record is `front` and the owner's metadata `meta`. For owners that move data from
/// an older layout into a log: renamed or written segments first, this last.
///
/// # Errors
/// The file cannot be written, synced or renamed.
pub fn install_head(dir: &Path, front: u64, meta: Meta) -> Result<(), LogError> {
    head::write_renamed(dir, &Entry { front, meta }).map(drop)
}

/// Deletes every segment file in `dir` and fsyncs the directory (for an owner discarding
/// a half-finished import before starting it again). The log must not be open.
///
/// # Errors
/// The directory cannot be listed, a file cannot be deleted, or the fsync failed.
pub fn remove_segments(dir: &Path) -> Result<(), LogError> {
    for base in list_segments(dir)? {
        let path = dir.join(segment_file_name(base));
        fs::remove_file(&path).map_err(io_err("remove", &path))?;
    }
    sync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names_round_trip_and_other_names_are_ignored() {
        assert_eq!(segment_file_name(42), "00000000000000000042.seglog");
        assert_eq!(parse_segment_file_name(&segment_file_name(42)), Some(42));
        assert_eq!(
            parse_segment_file_name(&segment_file_name(u64::MAX)),
            Some(u64::MAX)
        );
        for name in [
            "42.seglog",
            "seg-00000000000000000042.log",
            "0000000000000000004x.seglog",
            "+0000000000000000042.seglog",
            HEAD_FILE,
            HEAD_TMP,
            "lock",
        ] {
            assert_eq!(parse_segment_file_name(name), None, "{name}");
        }
    }
}

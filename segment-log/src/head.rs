//! The head file: 32-byte CRC-checked entries (head record number and the owner's
//! metadata), the last valid one wins; committed by rename (durable) or by appending an
//! entry (buffered).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use crate::error::{io_err, LogError};
use crate::files::{sync_dir, HEAD_FILE, HEAD_TMP};

/// Bytes of owner metadata committed with every head.
pub const META_BYTES: usize = 16;

/// Owner metadata committed atomically with the head (the queue keeps its sequence number
/// and its dropped-readings count there).
pub type Meta = [u8; META_BYTES];

/// Bytes of one head entry.
const ENTRY: usize = 32;
const MAGIC: &[u8; 4] = b"SLH1";
/// Buffered commits append to the head file; after this many entries the next commit
/// rewrites it with one.
const COMPACT_AFTER: u64 = 1024;

/// One committed head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The first record the owner still needs.
    pub(crate) front: u64,
    /// The owner's metadata.
    pub(crate) meta: Meta,
}

impl Entry {
    fn encode(&self) -> [u8; ENTRY] {
        let mut e = [0u8; ENTRY];
        e[0..4].copy_from_slice(MAGIC);
        e[4..12].copy_from_slice(&self.front.to_le_bytes());
        e[12..28].copy_from_slice(&self.meta);
        let crc = crc32fast::hash(&e[0..28]);
        e[28..32].copy_from_slice(&crc.to_le_bytes());
        e
    }

    fn decode(e: &[u8]) -> Option<Entry> {
        if e.len() != ENTRY || &e[0..4] != MAGIC {
            return None;
        }
        if u32::from_le_bytes(e[28..32].try_into().ok()?) != crc32fast::hash(&e[0..28]) {
            return None;
        }
        Some(Entry {
            front: u64::from_le_bytes(e[4..12].try_into().ok()?),
            meta: e[12..28].try_into().ok()?,
        })
    }
}

/// What the head file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Found {
    /// No head file.
    Missing,
    /// A head file without a single valid entry.
    Corrupt,
    /// The last valid entry.
    Valid(Entry),
}

/// Reads the head file of the log in `dir`.
///
/// # Errors
/// The file exists but cannot be read.
pub(crate) fn read(dir: &Path) -> Result<Found, LogError> {
    let path = dir.join(HEAD_FILE);
    match fs::read(&path) {
        // A torn entry at the end is shorter than an entry and is skipped by `chunks_exact`.
        Ok(bytes) => Ok(bytes
            .chunks_exact(ENTRY)
            .rev()
            .find_map(Entry::decode)
            .map_or(Found::Corrupt, Found::Valid)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Found::Missing),
        Err(e) => Err(io_err("read", &path)(e)),
    }
}

/// Replaces the head file with one holding `entry` alone: temp file, fsync, rename,
/// fsync of the directory. Returns an append handle to the new file.
///
/// # Errors
/// Any step fails; the old head file is then still in place.
pub(crate) fn write_renamed(dir: &Path, entry: &Entry) -> Result<File, LogError> {
    let tmp = dir.join(HEAD_TMP);
    let path = dir.join(HEAD_FILE);
    {
        let mut f = File::create(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(&entry.encode())
            .map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
    }
    fs::rename(&tmp, &path).map_err(io_err("rename", &tmp))?;
    sync_dir(dir)?;
    OpenOptions::new()
        .append(true)
        .open(&path)
        .map_err(io_err("open", &path))
}

/// The open head file of a writable log and how far it is from durable.
#[derive(Debug, Default)]
pub(crate) struct Writer {
    /// Append handle, once this process has committed a head (the first commit after
    /// opening always rewrites the file, so nothing is ever appended after a torn entry
    /// left by an earlier crash).
    file: Option<File>,
    /// Entries in the file.
    entries: u64,
    /// The head on disk is known to be durable (fsynced by this process).
    durable: bool,
}

impl Writer {
    /// Commits `entry`: by rename when `durable`, at the first commit, and after
    /// [`COMPACT_AFTER`] entries; otherwise by appending it without an fsync.
    ///
    /// # Errors
    /// The entry could not be written. The head on disk is then the previous one (a
    /// partly appended entry fails its CRC) and the next commit rewrites the file.
    pub(crate) fn commit(
        &mut self,
        dir: &Path,
        entry: &Entry,
        durable: bool,
    ) -> Result<(), LogError> {
        let append = match &mut self.file {
            Some(file) if !durable && self.entries < COMPACT_AFTER => file,
            _ => return self.rewrite(dir, entry),
        };
        if let Err(err) = append.write_all(&entry.encode()) {
            self.file = None;
            return Err(io_err("append to", &dir.join(HEAD_FILE))(err));
        }
        self.entries += 1;
        self.durable = false;
        Ok(())
    }

    fn rewrite(&mut self, dir: &Path, entry: &Entry) -> Result<(), LogError> {
        self.file = None;
        self.file = Some(write_renamed(dir, entry)?);
        self.entries = 1;
        self.durable = true;
        Ok(())
    }

    /// Makes the last commit durable. Before this process's first commit the head on disk
    /// is the one recovery read (perhaps written but not yet fsynced before a crash of the
    /// process); it is fsynced as it is.
    ///
    /// # Errors
    /// The fsync failed.
    pub(crate) fn sync(&mut self, dir: &Path) -> Result<(), LogError> {
        self.flush(dir)?;
        self.durable = true;
        Ok(())
    }

    /// As [`Writer::sync`], for callers that cannot record that it happened (the next
    /// [`Writer::sync`] fsyncs again).
    ///
    /// # Errors
    /// The fsync failed.
    pub(crate) fn flush(&self, dir: &Path) -> Result<(), LogError> {
        if self.durable {
            return Ok(());
        }
        let path = dir.join(HEAD_FILE);
        match &self.file {
            Some(file) => file.sync_data().map_err(io_err("fsync", &path)),
            None => match File::open(&path) {
                Ok(file) => file.sync_all().map_err(io_err("fsync", &path)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_err("open", &path)(e)),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_damage_is_detected() {
        let entry = Entry {
            front: 42,
            meta: *b"0123456789abcdef",
        };
        let bytes = entry.encode();
        assert_eq!(Entry::decode(&bytes), Some(entry));
        for i in 0..ENTRY {
            let mut bad = bytes;
            bad[i] ^= 0x10;
            assert_eq!(Entry::decode(&bad), None, "flipped byte {i}");
        }
        assert_eq!(Entry::decode(&bytes[..ENTRY - 1]), None);
    }

    #[test]
    fn the_last_valid_entry_wins_and_a_torn_one_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(read(dir.path()).expect("read"), Found::Missing);
        let mut w = Writer::default();
        let e = |front| Entry {
            front,
            meta: [front as u8; META_BYTES],
        };
        w.commit(dir.path(), &e(1), false).expect("first");
        w.commit(dir.path(), &e(2), false).expect("second");
        w.commit(dir.path(), &e(3), false).expect("third");
        assert_eq!(read(dir.path()).expect("read"), Found::Valid(e(3)));
        // A torn fourth entry.
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(HEAD_FILE))
            .expect("open");
        f.write_all(&e(4).encode()[..20]).expect("torn");
        assert_eq!(read(dir.path()).expect("read"), Found::Valid(e(3)));
        // A corrupted third entry: the second wins.
        let mut bytes = fs::read(dir.path().join(HEAD_FILE)).expect("read");
        bytes[2 * ENTRY + 5] ^= 1;
        fs::write(dir.path().join(HEAD_FILE), &bytes).expect("write");
        assert_eq!(read(dir.path()).expect("read"), Found::Valid(e(2)));
        fs::write(dir.path().join(HEAD_FILE), b"garbage").expect("write");
        assert_eq!(read(dir.path()).expect("read"), Found::Corrupt);
    }

    #[test]
    fn durable_commits_and_compaction_rewrite_the_file_with_one_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(HEAD_FILE);
        let mut w = Writer::default();
        let e = |front| Entry {
            front,
            meta: [0; META_BYTES],
        };
        for front in 0..COMPACT_AFTER {
            w.commit(dir.path(), &e(front), false).expect("commit");
        }
        assert_eq!(
            fs::metadata(&path).expect("meta").len(),
            COMPACT_AFTER * ENTRY as u64
        );
        w.commit(dir.path(), &e(COMPACT_AFTER), false)
            .expect("compacting commit");
        assert_eq!(fs::metadata(&path).expect("meta").len(), ENTRY as u64);
        w.commit(dir.path(), &e(5000), false).expect("append");
        w.commit(dir.path(), &e(5001), true).expect("durable");
        assert_eq!(fs::metadata(&path).expect("meta").len(), ENTRY as u64);
        assert_eq!(read(dir.path()).expect("read"), Found::Valid(e(5001)));
        assert!(!dir.path().join(HEAD_TMP).exists());
    }
}

//! A scratch directory per fuzzing process (in `/dev/shm` when it exists, so that the
//! fsyncs of the code under test cost nothing), and arbitrary damage to the files in it:
//! bytes flipped, files cut, removed, lengthened, or written from scratch under any of the
//! names the queue and the spool use, now or in their older layouts.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arbitrary::Arbitrary;

/// A file name the code under test may look at.
#[derive(Arbitrary, Debug, Clone, Copy)]
pub enum FileName {
    /// `head.seglog`, the segment log's head.
    Head,
    /// `head.seglog.tmp`, a durable head commit in progress.
    HeadTmp,
    /// `<20 digits>.seglog`, a segment whose first record has this number.
    Segment(u8),
    /// `seg-<20 digits>.log`, a segment of the older layouts.
    V1Segment(u8),
    /// `head.log`, the agent's older head.
    V1QueueHead,
    /// `head`, the spool's older head.
    V1SpoolHead,
    /// A name nobody uses.
    Other,
}

impl FileName {
    fn path(self, dir: &Path) -> PathBuf {
        dir.join(match self {
            FileName::Head => "head.seglog".to_string(),
            FileName::HeadTmp => "head.seglog.tmp".to_string(),
            FileName::Segment(n) => format!("{:020}.seglog", n),
            FileName::V1Segment(n) => format!("seg-{:020}.log", n),
            FileName::V1QueueHead => "head.log".to_string(),
            FileName::V1SpoolHead => "head".to_string(),
            FileName::Other => "notes.txt".to_string(),
        })
    }
}

/// One change to the directory. `file` picks among the files present, by sorted name.
#[derive(Arbitrary, Debug)]
pub enum Damage {
    /// XOR one byte.
    Flip { file: u8, at: u32, xor: u8 },
    /// Cut the file to this length (if shorter).
    Truncate { file: u8, to: u32 },
    /// Delete the file.
    Remove { file: u8 },
    /// Append bytes.
    Append { file: u8, bytes: Vec<u8> },
    /// Write a file from scratch.
    Write { name: FileName, bytes: Vec<u8> },
}

/// A fresh, empty directory (the same path every time within one process).
pub fn fresh_dir() -> PathBuf {
    static BASE: OnceLock<tempfile::TempDir> = OnceLock::new();
    let base = BASE.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let builder = tempfile::Builder::new().prefix("hub-fuzz-").tempdir_in(shm);
        builder
            .or_else(|_| tempfile::tempdir())
            .expect("scratch directory")
    });
    let dir = base.path().join("d");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("scratch directory");
    dir
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Applies the damage (at most 16 changes) to the files in `dir`.
pub fn damage(dir: &Path, changes: &[Damage]) {
    for change in changes.iter().take(16) {
        let present = files(dir);
        let pick = |i: u8| present.get(usize::from(i) % present.len().max(1)).cloned();
        match change {
            Damage::Flip { file, at, xor } => {
                if let Some(path) = pick(*file) {
                    if let Ok(mut bytes) = fs::read(&path) {
                        if !bytes.is_empty() {
                            let at = *at as usize % bytes.len();
                            bytes[at] ^= xor;
                            let _ = fs::write(&path, bytes);
                        }
                    }
                }
            }
            Damage::Truncate { file, to } => {
                if let Some(path) = pick(*file) {
                    if let Ok(f) = fs::OpenOptions::new().write(true).open(&path) {
                        if f.metadata().is_ok_and(|m| m.len() > u64::from(*to)) {
                            let _ = f.set_len(u64::from(*to));
                        }
                    }
                }
            }
            Damage::Remove { file } => {
                if let Some(path) = pick(*file) {
                    let _ = fs::remove_file(path);
                }
            }
            Damage::Append { file, bytes } => {
                if let Some(path) = pick(*file) {
                    use std::io::Write;
                    if let Ok(mut f) = fs::OpenOptions::new().append(true).open(&path) {
                        let _ = f.write_all(&bytes[..bytes.len().min(4096)]);
                    }
                }
            }
            Damage::Write { name, bytes } => {
                let _ = fs::write(name.path(dir), &bytes[..bytes.len().min(64 * 1024)]);
            }
        }
    }
}

//! A crash-safe, bounded, segmented append-only log of records on disk, with a committed
//! read position (the *head*). The device agent's store-and-forward queue and the hub's
//! InfluxDB spool are thin layers over it.
//!
//! Records are opaque byte strings numbered consecutively forever (`0, 1, 2, …`). The owner
//! appends at the end, reads any record between the head and the end by number, and
//! commits a new head (the number of the first record it still needs, plus 16 bytes of its
//! own metadata) once it is done with the records before it.
//!
//! # On-disk format (one directory per log)
//!
//! All integers are little-endian. CRC-32 is the IEEE one (zlib, PNG).
//!
//! - **Segments** `<first record number, 20 digits>.seglog`, e.g.
//!   `00000000000000000042.seglog`: append-only files of consecutive records, the first
//!   one numbered as the file name says. A record is a 16-byte header and the payload:
//!
//!   | bytes | field                                                    |
//!   |-------|----------------------------------------------------------|
//!   | 0..4  | payload length `u32`                                     |
//!   | 4..8  | CRC-32 of the record number (8 bytes) and the payload    |
//!   | 8..16 | record number `u64`                                      |
//!   | 16..  | payload                                                  |
//!
//!   The number in each record ties it to its place: a record found at the wrong place
//!   (a stale block, a misnamed file) fails the check like a torn one.
//! - **The head** `head.seglog`: a sequence of 32-byte entries, `"SLH1"`, the head record
//!   number `u64`, the owner's 16 bytes of metadata, and the CRC-32 of those 28 bytes. The
//!   last valid entry wins. A [`Durability::Durable`] commit replaces the file by rename
//!   (write `head.seglog.tmp` with one entry, fsync, rename over `head.seglog`, fsync the
//!   directory); a [`Durability::Buffered`] commit appends an entry without an fsync.
//!   After 1024 appended entries, and at the first commit after opening, the commit is
//!   durable again and the file starts over with one entry.
//!
//! Files of other names in the directory are left alone (the owners keep a lock file
//! there, for instance).
//!
//! # Crash guarantees
//!
//! - **Append**: [`SegmentLog::append`] with [`Durability::Durable`] returns after the
//!   record is written and `fdatasync`ed, and after the directory is fsynced if the record
//!   started a new segment. From then on the record survives a crash of the process, of
//!   the kernel, and a power cut. An append that failed or was interrupted was never
//!   acknowledged: recovery cuts it off, and its number is given to the next record.
//! - **Head**: after a durable commit, the head survives a power cut. A buffered commit
//!   survives a crash of the process; a power cut may take the head back to any earlier
//!   commit (never forward, never to garbage), so the owner sees records again that it
//!   had already committed past. Both owners tolerate that: they re-send, and the receiver
//!   recognises what it already has.
//! - **Deletion**: a segment is deleted only once every record in it is before the head,
//!   and only after that head is durable, so a surviving head never points into a deleted
//!   segment.
//!
//! # Recovery (at [`SegmentLog::open`])
//!
//! Every record of every segment from the head on is read and checked (length, number,
//! CRC). In the last segment, everything from the first bad record on is a torn append
//! and is cut off ([`Recovery::truncated_bytes`]). In an older segment, a bad record is
//! damage to acknowledged data: the rest of the segment is cut off
//! ([`Recovery::corrupt_bytes`]) and the numbers up to the next segment are *missing*
//! ([`SegmentLog::is_missing`]); numbering never shifts. Numbers between segments that no
//! file holds (a deleted file) are missing too. A lost or unreadable head makes the oldest
//! segment the head ([`HeadState`]). Segments wholly before the head (a crash between the
//! commit and the deletion) are deleted.
//!
//! # Bounds
//!
//! Segment files never exceed [`LogOptions::max_bytes`] together: an append that would
//! pass it fails with [`LogError::Full`] and writes nothing. The owner decides what to do:
//! the spool refuses the batch, the queue drops its oldest segment and tries again. A
//! segment is closed once the next record would take it past
//! [`LogOptions::segment_bytes`] (a record larger than that gets a segment of its own).

mod error;
mod files;
mod head;
mod log;
mod record;
#[cfg(test)]
mod recovery_tests;

pub use error::LogError;
pub use files::{install_head, numbered_files, remove_segments, segment_file_name, HEAD_FILE};
pub use head::{Meta, META_BYTES};
pub use log::{Durability, HeadState, LogOptions, Recovery, SegmentLog};
pub use record::RECORD_HEADER_BYTES;

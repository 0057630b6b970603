//! Firmware updates on the device, sans-io over a [`Flash`] region: two firmware slots, a
//! boot record, a download that resumes where it stopped, verification (size, SHA-256,
//! Ed25519 signature against the provisioned key), install to the inactive slot, trial
//! boot, confirmation, and rollback with a report for the hub.
//!
//! Region layout (`capacity` bytes; each slot gets half of what follows the records):
//!
//! ```text
//! 0        boot record, copy 0   (RECORD_SPACE bytes: len u16, crc32 u32, postcard record)
//! 512      boot record, copy 1
//! 1024     slot 0
//! 1024+S   slot 1
//! ```
//!
//! **Power-cut safety.** The active slot is never written while it is active. Everything
//! the device knows about updates is in the boot record, which is written as a whole to
//! the copy holding the *older* generation, so a write torn at any byte leaves the newer
//! copy intact (a torn copy fails its CRC and is ignored). The order of writes makes every
//! prefix of an update a state that boots:
//!
//! 1. chunk bytes go to the inactive slot, then a record with the new stored offset
//!    (a cut before the record re-fetches that chunk);
//! 2. after verification, one record switches the active slot and sets the trial flag
//!    (the commit point: before it the old slot boots, after it the new one on trial);
//! 3. every trial boot first writes a record counting the attempt, so a version that never
//!    gets to confirm (it crashes, or the power goes) is abandoned after
//!    [`MAX_TRIAL_BOOTS`] attempts: the bootloader switches back and records `rolled_back`;
//! 4. confirmation clears the trial flag once the new version is connected and the hub
//!    has acknowledged telemetry from it.
//!
//! The outcome (`succeeded`, `failed`, `rolled_back`) stays in the record and is reported
//! on every connection until the hub's offer shows it took it (the offer no longer names
//! that version).

use heapless::String;
use schemas::firmware::{decode_hex_array, signed_statement, SHA256_LEN, SIGNATURE_LEN};
use schemas::limits::{MAX_CHUNK_BYTES, MAX_FIRMWARE_LEN};
use schemas::message::truncated;
use schemas::{FirmwareChunk, FirmwareOffer, UpdateState};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::crc::crc32;
use crate::flash::Flash;

/// Bytes reserved for one copy of the boot record.
pub const RECORD_SPACE: u32 = 512;
/// Where slot 0 starts.
pub const SLOTS_START: u32 = 2 * RECORD_SPACE;
/// Boots a trial version gets to confirm itself before the bootloader goes back.
pub const MAX_TRIAL_BOOTS: u8 = 2;
/// Longest reason kept for a report.
pub const MAX_REASON_LEN: usize = 96;
/// Most chunk requests the device keeps outstanding (its window).
pub const WINDOW: u8 = 4;

/// What a slot holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotInfo {
    /// The version (empty: nothing).
    pub version: String<MAX_FIRMWARE_LEN>,
    /// Image size.
    pub size: u64,
    /// Image SHA-256.
    pub sha256: [u8; SHA256_LEN],
}

/// A download in progress into the inactive slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Download {
    /// What is being fetched.
    pub version: String<MAX_FIRMWARE_LEN>,
    /// Its size.
    pub size: u64,
    /// Its SHA-256, as offered.
    pub sha256: [u8; SHA256_LEN],
    /// Its signature, as offered (two halves: serde arrays stop at 32).
    pub signature: ([u8; 32], [u8; 32]),
    /// Bytes stored so far, from offset 0.
    pub stored: u64,
}

/// An outcome the hub has not taken yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The version it is about.
    pub version: String<MAX_FIRMWARE_LEN>,
    /// `Succeeded`, `Failed` or `RolledBack`.
    pub state: UpdateState,
    /// Why.
    pub reason: String<MAX_REASON_LEN>,
}

/// The boot record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootRecord {
    /// Rises by one with every write; the valid copy with the higher one is current.
    pub generation: u32,
    /// The slot that boots (0 or 1).
    pub active: u8,
    /// The active slot runs on trial: it has not confirmed itself yet.
    pub trial: bool,
    /// Boots of the trial version so far.
    pub attempts: u8,
    /// What each slot holds.
    pub slots: [SlotInfo; 2],
    /// A download in progress.
    pub download: Option<Download>,
    /// An outcome to report.
    pub report: Option<Report>,
}

/// Why an update operation failed (the storage, not the update: a bad image is a
/// [`Report`], not an error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpdateError<E> {
    /// The flash failed.
    Flash(E),
    /// Neither copy of the boot record is valid: the region was never formatted.
    Blank,
    /// The region is too small for two slots of this image.
    TooSmall,
}

impl<E> From<E> for UpdateError<E> {
    fn from(e: E) -> Self {
        UpdateError::Flash(e)
    }
}

/// What the bootloader decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boot {
    /// The slot to run.
    pub slot: u8,
    /// Its version.
    pub version: String<MAX_FIRMWARE_LEN>,
    /// Whether it runs on trial (it must confirm).
    pub trial: bool,
    /// Whether this boot went back to the old slot.
    pub rolled_back: bool,
}

/// What the client should do after a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkOutcome {
    /// Keep going; report progress when it is `Some(percent)`.
    Progress(Option<u8>),
    /// The image is complete, verified and installed: report `rebooting`, then reboot.
    Reboot,
    /// The image was refused (the report says why).
    Refused,
    /// Not the chunk the download waits for (ignored).
    Ignored,
}

/// The device's update state machine over its update region.
#[derive(Debug)]
pub struct Updater<F: Flash> {
    flash: F,
    record: BootRecord,
    key: Option<[u8; 32]>,
    /// The next offset to ask for on this connection.
    next_request: u64,
    /// Requests outstanding on this connection.
    outstanding: u8,
    /// This boot started the active slot on trial. A version installed during this boot
    /// is on trial too, but it is not running yet, so it cannot confirm itself.
    booted_trial: bool,
}

fn record_offset(copy: u32) -> u32 {
    copy * RECORD_SPACE
}

impl<F: Flash> Updater<F> {
    /// Writes a fresh boot record: slot 0 holds `factory` and boots, confirmed.
    ///
    /// # Errors
    /// The flash failed, or it has no room for two slots of `factory`.
    pub fn format(mut flash: F, factory: SlotInfo) -> Result<F, UpdateError<F::Error>> {
        if slot_capacity(flash.capacity()) < factory.size {
            return Err(UpdateError::TooSmall);
        }
        let record = BootRecord {
            generation: 1,
            active: 0,
            trial: false,
            attempts: 0,
            slots: [factory, SlotInfo::default()],
            download: None,
            report: None,
        };
        write_copy(&mut flash, 1, &record)?;
        // The other copy is made invalid, so a region used before does not bring back
        // an old record with a higher generation.
        flash.write(record_offset(0), &[0xff; 8])?;
        flash.sync()?;
        Ok(flash)
    }

    /// Opens the region, with `key` the public key updates must be signed with (`None`:
    /// every update is refused).
    ///
    /// # Errors
    /// The flash failed, or the region holds no valid record ([`UpdateError::Blank`]).
    pub fn open(mut flash: F, key: Option<[u8; 32]>) -> Result<Self, UpdateError<F::Error>> {
        let a = read_copy(&mut flash, 0)?;
        let b = read_copy(&mut flash, 1)?;
        let record = match (a, b) {
            (Some(a), Some(b)) => {
                if a.generation > b.generation {
                    a
                } else {
                    b
                }
            }
            (Some(r), None) | (None, Some(r)) => r,
            (None, None) => return Err(UpdateError::Blank),
        };
        Ok(Updater {
            flash,
            record,
            key,
            next_request: 0,
            outstanding: 0,
            booted_trial: false,
        })
    }

    /// The boot record as it is now.
    pub fn record(&self) -> &BootRecord {
        &self.record
    }

    /// The flash, for a host that inspects it.
    pub fn flash(&self) -> &F {
        &self.flash
    }

    /// Gives the flash back.
    pub fn into_flash(self) -> F {
        self.flash
    }

    fn commit(&mut self) -> Result<(), UpdateError<F::Error>> {
        self.record.generation = self.record.generation.wrapping_add(1);
        let copy = self.record.generation % 2;
        write_copy(&mut self.flash, copy, &self.record)?;
        self.flash.sync()?;
        Ok(())
    }

    fn slot_base(&self, slot: u8) -> u32 {
        SLOTS_START + u32::from(slot) * slot_capacity(self.flash.capacity()) as u32
    }

    /// The bootloader: decides which slot runs, counting trial boots and going back to the
    /// other slot when the trial version had its [`MAX_TRIAL_BOOTS`] and never confirmed.
    /// Call once per boot, before running anything.
    ///
    /// # Errors
    /// The flash failed.
    pub fn boot(&mut self) -> Result<Boot, UpdateError<F::Error>> {
        let mut rolled_back = false;
        if self.record.trial {
            if self.record.attempts >= MAX_TRIAL_BOOTS {
                let failed = self.record.active;
                let version = self.record.slots[usize::from(failed)].version.clone();
                self.record.active = 1 - failed;
                self.record.trial = false;
                self.record.attempts = 0;
                let mut reason: String<MAX_REASON_LEN> = String::new();
                let _ = core::fmt::write(
                    &mut reason,
                    format_args!(
                        "{version} did not come up after {MAX_TRIAL_BOOTS} boots; back on {}",
                        self.record.slots[usize::from(1 - failed)].version
                    ),
                );
                self.record.report = Some(Report {
                    version,
                    state: UpdateState::RolledBack,
                    reason,
                });
                rolled_back = true;
            } else {
                self.record.attempts += 1;
            }
            self.commit()?;
        }
        let slot = self.record.active;
        self.booted_trial = self.record.trial;
        Ok(Boot {
            slot,
            version: self.record.slots[usize::from(slot)].version.clone(),
            trial: self.record.trial,
            rolled_back,
        })
    }

    /// Whether the running version is on trial (it booted so, and has not confirmed).
    pub fn on_trial(&self) -> bool {
        self.record.trial && self.booted_trial
    }

    /// The running version confirms itself (it is connected and the hub acknowledged its
    /// telemetry): the trial ends and `succeeded` is to be reported. Does nothing when not
    /// on trial.
    ///
    /// # Errors
    /// The flash failed.
    pub fn confirm(&mut self) -> Result<(), UpdateError<F::Error>> {
        if !self.on_trial() {
            return Ok(());
        }
        self.record.trial = false;
        self.record.attempts = 0;
        self.booted_trial = false;
        let version = self.record.slots[usize::from(self.record.active)]
            .version
            .clone();
        self.record.report = Some(Report {
            version,
            state: UpdateState::Succeeded,
            reason: String::new(),
        });
        self.commit()
    }

    /// The outcome waiting to be reported, if any.
    pub fn pending_report(&self) -> Option<&Report> {
        self.record.report.as_ref()
    }

    /// A new connection: no requests are outstanding on it.
    pub fn handle_connected(&mut self) {
        self.outstanding = 0;
        self.next_request = self.record.download.as_ref().map_or(0, |d| d.stored);
    }

    fn refuse(&mut self, version: &str, reason: &str) -> Result<(), UpdateError<F::Error>> {
        self.record.download = None;
        self.record.report = Some(Report {
            version: truncated(version),
            state: UpdateState::Failed,
            reason: truncated(reason),
        });
        self.commit()
    }

    /// The hub's offer arrived. A pending report about another version is dropped (the
    /// hub took it); a new offer starts a download (or resumes the one of the same image),
    /// or is refused with a reason when it cannot be installed. A download that was
    /// complete when the power went is installed now ([`ChunkOutcome::Reboot`]).
    ///
    /// # Errors
    /// The flash failed.
    pub fn handle_offer(
        &mut self,
        offer: &FirmwareOffer,
    ) -> Result<ChunkOutcome, UpdateError<F::Error>> {
        if self
            .record
            .report
            .as_ref()
            .is_some_and(|r| r.version != offer.version)
        {
            self.record.report = None;
            self.commit()?;
        }
        if offer.version.is_empty()
            || self.record.report.is_some()
            || offer.version == self.record.slots[usize::from(self.record.active)].version
        {
            return Ok(ChunkOutcome::Ignored);
        }
        let (Some(sha256), Some(signature)) = (
            decode_hex_array::<SHA256_LEN>(&offer.sha256),
            decode_hex_array::<SIGNATURE_LEN>(&offer.signature),
        ) else {
            self.refuse(&offer.version, "the offer's sha256 or signature is not hex")?;
            return Ok(ChunkOutcome::Refused);
        };
        if offer.size > slot_capacity(self.flash.capacity()) {
            self.refuse(&offer.version, "the image is larger than a slot")?;
            return Ok(ChunkOutcome::Refused);
        }
        let mut halves = ([0u8; 32], [0u8; 32]);
        halves.0.copy_from_slice(&signature[..32]);
        halves.1.copy_from_slice(&signature[32..]);
        let same = self.record.download.as_ref().is_some_and(|d| {
            d.version == offer.version
                && d.size == offer.size
                && d.sha256 == sha256
                && d.signature == halves
        });
        if !same {
            self.record.download = Some(Download {
                version: offer.version.clone(),
                size: offer.size,
                sha256,
                signature: halves,
                stored: 0,
            });
            self.commit()?;
        }
        self.handle_connected();
        if self
            .record
            .download
            .as_ref()
            .is_some_and(|d| d.stored == d.size)
        {
            return self.install();
        }
        Ok(ChunkOutcome::Progress(None))
    }

    /// The next request to send (offset and length, at most `max_len` bytes: what the
    /// device's receive buffer takes in one chunk), while the window has room.
    pub fn next_request(&mut self, max_len: u32) -> Option<(&str, u64, u32)> {
        let download = self.record.download.as_ref()?;
        if self.outstanding >= WINDOW || self.next_request >= download.size {
            return None;
        }
        let offset = self.next_request;
        let max = u64::from(max_len.clamp(1, MAX_CHUNK_BYTES as u32));
        let len = (download.size - offset).min(max) as u32;
        self.next_request += u64::from(len);
        self.outstanding += 1;
        Some((download.version.as_str(), offset, len))
    }

    /// A request could not be queued: it is asked for again later.
    pub fn request_not_sent(&mut self, offset: u64) {
        self.outstanding = self.outstanding.saturating_sub(1);
        self.next_request = self.next_request.min(offset);
    }

    /// A chunk arrived: stored if it is the next one; the image verified and installed once
    /// complete.
    ///
    /// # Errors
    /// The flash failed.
    pub fn handle_chunk(
        &mut self,
        chunk: &FirmwareChunk,
    ) -> Result<ChunkOutcome, UpdateError<F::Error>> {
        self.outstanding = self.outstanding.saturating_sub(1);
        let Some(download) = self.record.download.as_ref() else {
            return Ok(ChunkOutcome::Ignored);
        };
        let data = chunk.data.as_slice();
        if chunk.version != download.version
            || chunk.offset != download.stored
            || data.is_empty()
            || download.stored + data.len() as u64 > download.size
        {
            return Ok(ChunkOutcome::Ignored);
        }
        let before = download.stored * 10 / download.size.max(1);
        let base = self.slot_base(1 - self.record.active);
        self.flash.write(base + chunk.offset as u32, data)?;
        self.flash.sync()?;
        let (stored, size) = {
            let d = self.record.download.as_mut().ok_or(UpdateError::Blank)?;
            d.stored += data.len() as u64;
            (d.stored, d.size)
        };
        self.commit()?;
        if stored < size {
            let after = stored * 10 / size;
            return Ok(ChunkOutcome::Progress(
                (after > before).then(|| (stored * 100 / size) as u8),
            ));
        }
        self.install()
    }

    /// Verifies the complete download (reading it back from flash) and makes it the
    /// active slot, on trial.
    fn install(&mut self) -> Result<ChunkOutcome, UpdateError<F::Error>> {
        let Some(download) = self.record.download.clone() else {
            return Ok(ChunkOutcome::Ignored);
        };
        let inactive = 1 - self.record.active;
        let base = self.slot_base(inactive);
        let mut hasher = Sha256::new();
        let mut buf = [0u8; 256];
        let mut at = 0u64;
        while at < download.size {
            let n = (download.size - at).min(buf.len() as u64) as usize;
            self.flash.read(base + at as u32, &mut buf[..n])?;
            hasher.update(&buf[..n]);
            at += n as u64;
        }
        let sha256: [u8; SHA256_LEN] = hasher.finalize().into();
        if sha256 != download.sha256 {
            self.refuse(
                &download.version,
                "sha256 mismatch: the image is not the one offered",
            )?;
            return Ok(ChunkOutcome::Refused);
        }
        let Some(key) = self.key else {
            self.refuse(
                &download.version,
                "no update key provisioned: updates are refused",
            )?;
            return Ok(ChunkOutcome::Refused);
        };
        let mut signature = [0u8; SIGNATURE_LEN];
        signature[..32].copy_from_slice(&download.signature.0);
        signature[32..].copy_from_slice(&download.signature.1);
        let verified =
            signed_statement(&download.version, download.size, &sha256).is_some_and(|statement| {
                ed25519_compact::PublicKey::new(key)
                    .verify(&statement, &ed25519_compact::Signature::new(signature))
                    .is_ok()
            });
        if !verified {
            self.refuse(
                &download.version,
                "bad signature: not signed with the provisioned update key",
            )?;
            return Ok(ChunkOutcome::Refused);
        }
        self.record.slots[usize::from(inactive)] = SlotInfo {
            version: download.version,
            size: download.size,
            sha256,
        };
        self.record.active = inactive;
        self.record.trial = true;
        self.record.attempts = 0;
        self.record.download = None;
        // What runs now is no longer what the active slot holds.
        self.booted_trial = false;
        self.commit()?;
        Ok(ChunkOutcome::Reboot)
    }

    /// Whether slot `slot`'s bytes match what the record says it holds (its SHA-256).
    ///
    /// # Errors
    /// The flash failed.
    pub fn slot_is_valid(&mut self, slot: u8) -> Result<bool, UpdateError<F::Error>> {
        let info = self.record.slots[usize::from(slot & 1)].clone();
        let base = self.slot_base(slot & 1);
        let mut hasher = Sha256::new();
        let mut buf = [0u8; 256];
        let mut at = 0u64;
        while at < info.size {
            let n = (info.size - at).min(buf.len() as u64) as usize;
            self.flash.read(base + at as u32, &mut buf[..n])?;
            hasher.update(&buf[..n]);
            at += n as u64;
        }
        let sha256: [u8; SHA256_LEN] = hasher.finalize().into();
        Ok(sha256 == info.sha256)
    }

    /// Writes `image` into slot `slot` directly (factory programming, before
    /// [`Updater::format`] names it).
    ///
    /// # Errors
    /// The flash failed, or the image does not fit.
    pub fn program(flash: &mut F, slot: u8, image: &[u8]) -> Result<(), UpdateError<F::Error>> {
        let capacity = slot_capacity(flash.capacity());
        if image.len() as u64 > capacity {
            return Err(UpdateError::TooSmall);
        }
        let base = SLOTS_START + u32::from(slot & 1) * capacity as u32;
        flash.write(base, image)?;
        flash.sync()?;
        Ok(())
    }
}

/// The update storage failed (the flash's own error is the board's to log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageFailed;

/// An [`Updater`] as the client drives it, without its flash type: a board lends it with
/// [`crate::Board::updates`].
pub trait Updates {
    /// See [`Updater::handle_connected`].
    fn handle_connected(&mut self);
    /// See [`Updater::handle_offer`].
    ///
    /// # Errors
    /// The storage failed.
    fn handle_offer(&mut self, offer: &FirmwareOffer) -> Result<ChunkOutcome, StorageFailed>;
    /// See [`Updater::next_request`]: version, offset, length.
    fn next_request(&mut self, max_len: u32) -> Option<(String<MAX_FIRMWARE_LEN>, u64, u32)>;
    /// See [`Updater::request_not_sent`].
    fn request_not_sent(&mut self, offset: u64);
    /// See [`Updater::handle_chunk`].
    ///
    /// # Errors
    /// The storage failed.
    fn handle_chunk(&mut self, chunk: &FirmwareChunk) -> Result<ChunkOutcome, StorageFailed>;
    /// See [`Updater::on_trial`].
    fn on_trial(&self) -> bool;
    /// See [`Updater::confirm`].
    ///
    /// # Errors
    /// The storage failed.
    fn confirm(&mut self) -> Result<(), StorageFailed>;
    /// See [`Updater::pending_report`].
    fn pending_report(&self) -> Option<Report>;
    /// The version being downloaded and how far, in percent.
    fn downloading(&self) -> Option<(String<MAX_FIRMWARE_LEN>, u8)>;
}

impl<F: Flash> Updates for Updater<F> {
    fn handle_connected(&mut self) {
        Updater::handle_connected(self);
    }
    fn handle_offer(&mut self, offer: &FirmwareOffer) -> Result<ChunkOutcome, StorageFailed> {
        Updater::handle_offer(self, offer).map_err(|_| StorageFailed)
    }
    fn next_request(&mut self, max_len: u32) -> Option<(String<MAX_FIRMWARE_LEN>, u64, u32)> {
        Updater::next_request(self, max_len).map(|(v, o, l)| (truncated(v), o, l))
    }
    fn request_not_sent(&mut self, offset: u64) {
        Updater::request_not_sent(self, offset);
    }
    fn handle_chunk(&mut self, chunk: &FirmwareChunk) -> Result<ChunkOutcome, StorageFailed> {
        Updater::handle_chunk(self, chunk).map_err(|_| StorageFailed)
    }
    fn on_trial(&self) -> bool {
        Updater::on_trial(self)
    }
    fn confirm(&mut self) -> Result<(), StorageFailed> {
        Updater::confirm(self).map_err(|_| StorageFailed)
    }
    fn pending_report(&self) -> Option<Report> {
        Updater::pending_report(self).cloned()
    }
    fn downloading(&self) -> Option<(String<MAX_FIRMWARE_LEN>, u8)> {
        self.record
            .download
            .as_ref()
            .map(|d| (d.version.clone(), (d.stored * 100 / d.size.max(1)) as u8))
    }
}

/// The size of one slot in a region of `capacity` bytes.
pub fn slot_capacity(capacity: usize) -> u64 {
    (capacity.saturating_sub(SLOTS_START as usize) / 2) as u64
}

/// The SHA-256 of `image` (for factory programming).
pub fn sha256(image: &[u8]) -> [u8; SHA256_LEN] {
    Sha256::digest(image).into()
}

fn write_copy<F: Flash>(flash: &mut F, copy: u32, record: &BootRecord) -> Result<(), F::Error> {
    let mut buf = [0u8; RECORD_SPACE as usize];
    // A record always fits: its strings and lists are bounded well below the space.
    let len = postcard::to_slice(record, &mut buf[6..])
        .map(|b| b.len())
        .unwrap_or(0);
    let crc = crc32(&buf[6..6 + len]);
    buf[..2].copy_from_slice(&(len as u16).to_le_bytes());
    buf[2..6].copy_from_slice(&crc.to_le_bytes());
    flash.write(record_offset(copy), &buf[..6 + len])
}

fn read_copy<F: Flash>(flash: &mut F, copy: u32) -> Result<Option<BootRecord>, F::Error> {
    let mut buf = [0u8; RECORD_SPACE as usize];
    flash.read(record_offset(copy), &mut buf)?;
    let len = usize::from(u16::from_le_bytes([buf[0], buf[1]]));
    if len == 0 || len > buf.len() - 6 {
        return Ok(None);
    }
    let crc = u32::from_le_bytes([buf[2], buf[3], buf[4], buf[5]]);
    if crc32(&buf[6..6 + len]) != crc {
        return Ok(None);
    }
    Ok(postcard::from_bytes(&buf[6..6 + len]).ok())
}

#[cfg(test)]
mod tests;

//! Tests of the update state machine: slots, boot records, downloads, verification, power cuts.
extern crate std;
use std::vec::Vec;

use super::*;
use crate::flash::RamFlash;
use schemas::message::ChunkData;

/// A flash that keeps only the first `budget` bytes written (a write that crosses the
/// budget is torn there), then fails every access: the power went.
#[derive(Debug)]
struct Torn {
    bytes: Vec<u8>,
    budget: Option<usize>,
    written: usize,
}

impl Torn {
    fn dead(&self) -> bool {
        self.budget.is_some_and(|b| self.written > b)
    }
}

#[derive(Debug, PartialEq)]
struct PowerCut;

impl Flash for Torn {
    type Error = PowerCut;
    fn capacity(&self) -> usize {
        self.bytes.len()
    }
    fn read(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), PowerCut> {
        if self.dead() {
            return Err(PowerCut);
        }
        let at = offset as usize;
        buf.copy_from_slice(&self.bytes[at..at + buf.len()]);
        Ok(())
    }
    fn write(&mut self, offset: u32, data: &[u8]) -> Result<(), PowerCut> {
        if self.dead() {
            return Err(PowerCut);
        }
        let at = offset as usize;
        let keep = match self.budget {
            Some(b) => b.saturating_sub(self.written).min(data.len()),
            None => data.len(),
        };
        self.bytes[at..at + keep].copy_from_slice(&data[..keep]);
        self.written += keep;
        if keep < data.len() {
            // Past the budget: the power is gone from here on.
            self.written = self.budget.unwrap_or(0) + 1;
            return Err(PowerCut);
        }
        Ok(())
    }
}

const CAPACITY: usize = 2 * 16 * 1024 + SLOTS_START as usize;

fn keypair() -> ed25519_compact::KeyPair {
    ed25519_compact::KeyPair::from_seed(ed25519_compact::Seed::new([7; 32]))
}

fn factory() -> Vec<u8> {
    (0..3000u32).map(|i| (i % 13) as u8).collect()
}

fn new_image() -> Vec<u8> {
    (0..9000u32).map(|i| (i % 251) as u8 ^ 0x5a).collect()
}

fn offer_for(image: &[u8], version: &str, key: &ed25519_compact::KeyPair) -> FirmwareOffer {
    let sha = sha256(image);
    let statement = signed_statement(version, image.len() as u64, &sha).expect("fits");
    let sig = key.sk.sign(&statement, None);
    let mut hex = [0u8; 128];
    let sha_hex: String<64> =
        truncated(schemas::firmware::encode_hex(&sha, &mut hex).expect("hex"));
    let mut hex = [0u8; 128];
    let sig_hex: String<128> =
        truncated(schemas::firmware::encode_hex(sig.as_ref(), &mut hex).expect("hex"));
    FirmwareOffer {
        version: truncated(version),
        size: image.len() as u64,
        sha256: sha_hex,
        signature: sig_hex,
    }
}

fn formatted() -> Vec<u8> {
    let mut flash = RamFlash::new(std::vec![0xffu8; CAPACITY]);
    let image = factory();
    Updater::program(&mut flash, 0, &image).expect("program");
    let flash = Updater::format(
        flash,
        SlotInfo {
            version: truncated("1.0"),
            size: image.len() as u64,
            sha256: sha256(&image),
        },
    )
    .expect("format");
    flash.bytes().to_vec()
}

/// Runs the device from `bytes` until it is on a confirmed version with nothing to
/// download: boot, take the offer, fetch, install, reboot, confirm. Returns the flash
/// bytes and the version it ends on, or the bytes at the power cut.
fn run(
    bytes: Vec<u8>,
    budget: Option<usize>,
    offer: &FirmwareOffer,
    image: &[u8],
) -> Result<(Vec<u8>, String<32>), Vec<u8>> {
    let key = keypair();
    let flash = Torn {
        bytes,
        budget,
        written: 0,
    };
    let mut u = match Updater::open(flash, Some(*key.pk)) {
        Ok(u) => u,
        Err(e) => panic!("not bootable: {e:?}"),
    };
    // On a power cut, the flash's bytes as they are.
    macro_rules! cut {
        ($e:expr) => {
            match $e {
                Ok(v) => v,
                Err(_) => return Err(u.into_flash().bytes),
            }
        };
    }
    for _boot in 0..8 {
        let boot = cut!(u.boot());
        if boot.trial {
            cut!(u.confirm());
            continue;
        }
        let reported = u
            .pending_report()
            .is_some_and(|r| r.version == offer.version);
        if boot.version.as_str() == offer.version.as_str() || reported {
            return Ok((u.into_flash().bytes, boot.version));
        }
        let mut rebooted = match cut!(u.handle_offer(offer)) {
            ChunkOutcome::Reboot => true,
            ChunkOutcome::Refused => return Ok((u.into_flash().bytes, boot.version)),
            _ => false,
        };
        while !rebooted {
            let Some((_, offset, len)) = u.next_request(MAX_CHUNK_BYTES as u32) else {
                break;
            };
            let (offset, len) = (offset as usize, len as usize);
            let chunk = FirmwareChunk {
                version: offer.version.clone(),
                offset: offset as u64,
                data: ChunkData::from_slice(&image[offset..offset + len]),
            };
            match cut!(u.handle_chunk(&chunk)) {
                ChunkOutcome::Reboot => rebooted = true,
                ChunkOutcome::Refused => return Ok((u.into_flash().bytes, boot.version)),
                _ => {}
            }
        }
        assert!(rebooted, "the download neither completed nor was refused");
    }
    panic!("no stable state after 8 boots");
}

/// After a cut: the device boots from what is in flash, into a slot whose bytes are
/// what its record says.
fn assert_bootable(bytes: Vec<u8>) -> Vec<u8> {
    let key = keypair();
    let flash = Torn {
        bytes,
        budget: None,
        written: 0,
    };
    let mut u = Updater::open(flash, Some(*key.pk)).expect("a valid boot record survives any cut");
    let record = u.record().clone();
    let boot_slot = record.active;
    assert!(
        u.slot_is_valid(boot_slot).expect("read"),
        "active slot {boot_slot} is not what the record says: {record:?}"
    );
    u.into_flash().bytes
}

#[test]
fn an_update_installs_boots_on_trial_and_confirms() {
    let image = new_image();
    let offer = offer_for(&image, "1.1", &keypair());
    let (bytes, version) = run(formatted(), None, &offer, &image).expect("no cut");
    assert_eq!(version.as_str(), "1.1");
    let mut u = Updater::open(RamFlash::new(bytes), Some(*keypair().pk)).expect("open");
    assert!(!u.record().trial);
    assert_eq!(u.record().active, 1);
    assert!(u.slot_is_valid(1).expect("read"));
    let report = u.pending_report().expect("report");
    assert_eq!(report.state, UpdateState::Succeeded);
    // The hub took it: its offer no longer names 1.1.
    let none = FirmwareOffer {
        version: String::new(),
        size: 0,
        sha256: String::new(),
        signature: String::new(),
    };
    u.handle_offer(&none).expect("offer");
    assert!(u.pending_report().is_none());
}

#[test]
fn a_wrong_hash_or_signature_is_refused_with_a_reason() {
    let image = new_image();
    let mut offer = offer_for(&image, "1.1", &keypair());
    // Signed by another key.
    let other = ed25519_compact::KeyPair::from_seed(ed25519_compact::Seed::new([9; 32]));
    let forged = offer_for(&image, "1.1", &other);
    offer.signature = forged.signature.clone();
    let (bytes, version) = run(formatted(), None, &offer, &image).expect("no cut");
    assert_eq!(version.as_str(), "1.0");
    let u = Updater::open(RamFlash::new(bytes), Some(*keypair().pk)).expect("open");
    let report = u.pending_report().expect("report");
    assert_eq!(report.state, UpdateState::Failed);
    assert!(report.reason.contains("signature"), "{}", report.reason);
    // Bytes that are not the offered image.
    let offer = offer_for(&image, "1.1", &keypair());
    let mut wrong = image.clone();
    wrong[100] ^= 1;
    let (bytes, version) = run(formatted(), None, &offer, &wrong).expect("no cut");
    assert_eq!(version.as_str(), "1.0");
    let u = Updater::open(RamFlash::new(bytes), Some(*keypair().pk)).expect("open");
    assert!(u
        .pending_report()
        .expect("report")
        .reason
        .contains("sha256"));
}

#[test]
fn a_version_that_never_confirms_is_rolled_back_with_a_report() {
    let image = new_image();
    let offer = offer_for(&image, "1.1", &keypair());
    let mut u = Updater::open(RamFlash::new(formatted()), Some(*keypair().pk)).expect("open");
    u.boot().expect("boot");
    u.handle_offer(&offer).expect("offer");
    while let Some((_, offset, len)) = u.next_request(MAX_CHUNK_BYTES as u32) {
        let chunk = FirmwareChunk {
            version: offer.version.clone(),
            offset,
            data: ChunkData::from_slice(
                &image[offset as usize..(offset + u64::from(len)) as usize],
            ),
        };
        u.handle_chunk(&chunk).expect("chunk");
    }
    // Installed, but still running the old version: nothing to confirm yet.
    u.confirm().expect("confirm");
    assert!(u.record().trial && u.pending_report().is_none());
    // The new version crashes before it confirms, every time.
    for _ in 0..MAX_TRIAL_BOOTS {
        let boot = u.boot().expect("boot");
        assert!(boot.trial);
        assert_eq!(boot.version.as_str(), "1.1");
    }
    let boot = u.boot().expect("boot");
    assert!(boot.rolled_back && !boot.trial);
    assert_eq!(boot.version.as_str(), "1.0");
    assert!(u.slot_is_valid(boot.slot).expect("read"));
    let report = u.pending_report().expect("report");
    assert_eq!(report.state, UpdateState::RolledBack);
    assert!(
        report.reason.contains("did not come up"),
        "{}",
        report.reason
    );
    // The same offer again is not installed again: the report waits for the hub.
    u.handle_offer(&offer).expect("offer");
    assert!(u.next_request(MAX_CHUNK_BYTES as u32).is_none());
}

#[test]
fn a_download_resumes_at_the_stored_offset() {
    let image = new_image();
    let offer = offer_for(&image, "1.1", &keypair());
    let mut u = Updater::open(RamFlash::new(formatted()), Some(*keypair().pk)).expect("open");
    u.handle_offer(&offer).expect("offer");
    let (_, offset, len) = u.next_request(MAX_CHUNK_BYTES as u32).expect("request");
    let chunk = FirmwareChunk {
        version: offer.version.clone(),
        offset,
        data: ChunkData::from_slice(&image[..len as usize]),
    };
    u.handle_chunk(&chunk).expect("chunk");
    // A reconnect (and a reset): the same offer resumes after the first chunk.
    let mut u = Updater::open(u.into_flash(), Some(*keypair().pk)).expect("open");
    u.handle_offer(&offer).expect("offer");
    assert_eq!(
        u.next_request(MAX_CHUNK_BYTES as u32).map(|(_, o, _)| o),
        Some(u64::from(len))
    );
}

/// The power goes at every byte of an update (download, install, trial boot,
/// confirmation); each time the device boots a valid slot, and finishing from there
/// ends on exactly one of the two versions.
#[test]
fn a_power_cut_at_any_byte_leaves_a_bootable_device() {
    let image = new_image();
    let offer = offer_for(&image, "1.1", &keypair());
    let start = formatted();
    // How many bytes an uninterrupted update writes.
    let mut probe = Torn {
        bytes: start.clone(),
        budget: Some(usize::MAX),
        written: 0,
    };
    let total = {
        let mut u = Updater::open(
            core::mem::replace(
                &mut probe,
                Torn {
                    bytes: Vec::new(),
                    budget: None,
                    written: 0,
                },
            ),
            Some(*keypair().pk),
        )
        .expect("open");
        u.boot().expect("boot");
        u.handle_offer(&offer).expect("offer");
        while let Some((_, offset, len)) = u.next_request(MAX_CHUNK_BYTES as u32) {
            let chunk = FirmwareChunk {
                version: offer.version.clone(),
                offset,
                data: ChunkData::from_slice(
                    &image[offset as usize..(offset + u64::from(len)) as usize],
                ),
            };
            u.handle_chunk(&chunk).expect("chunk");
        }
        u.boot().expect("trial boot");
        u.confirm().expect("confirm");
        u.into_flash().written
    };
    assert!(total > image.len());
    // Every 7th byte by default (the cut lands on every offset within a write over a
    // run); POWER_CUT_STEP=1 cuts at every single byte.
    let step = std::env::var("POWER_CUT_STEP")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7usize)
        .max(1);
    let mut cuts = 0;
    for budget in (0..total).step_by(step) {
        let torn = match run(start.clone(), Some(budget), &offer, &image) {
            Err(bytes) => bytes,
            Ok(_) => continue,
        };
        cuts += 1;
        let bytes = assert_bootable(torn);
        let (bytes, version) = run(bytes, None, &offer, &image).expect("no second cut");
        assert!(version == "1.1" || version == "1.0", "{version}");
        assert_bootable(bytes);
    }
    assert!(cuts > total / step / 2, "{cuts} cuts of {total} bytes");
    std::eprintln!("{cuts} power cuts over {total} bytes written, every one bootable");
}

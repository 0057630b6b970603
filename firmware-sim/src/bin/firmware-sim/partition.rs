//! The simulated device's firmware partition: `IMAGE.fw` next to the provisioning image,
//! written by `flash --update-key` and used by `run`. It holds the update key and the
//! library's update region (`firmware_sim::update`: boot record copies, two slots).
//!
//! ```text
//! offset 0     magic    8 bytes  "FWSIMFW\n"
//!        8     key      32 bytes the Ed25519 public key updates must be signed with
//!        40    reserved to 4096
//!        4096  the update region (records, slot 0, slot 1), SLOT_BYTES per slot
//! ```
//!
//! Unlike the provisioning image (rewritten whole, atomically, at every sync), the
//! partition is written in place, byte ranges at a time, as a flash chip is: a process
//! killed mid-update leaves exactly the writes it made, which is what the update logic's
//! write order is built for. (A power loss of the host machine is not modelled: the
//! partition is not flushed to the disk.)

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::Context;
use firmware_sim::update::{sha256, SlotInfo, Updater, SLOTS_START};
use firmware_sim::Flash;
use schemas::message::truncated;

const MAGIC: &[u8; 8] = b"FWSIMFW\n";
const HEADER: u64 = 4096;
/// Room per slot.
pub const SLOT_BYTES: usize = 4 << 20;

/// The partition of the image at `image`.
pub fn path_for(image: &Path) -> PathBuf {
    let mut name = image.as_os_str().to_os_string();
    name.push(".fw");
    PathBuf::from(name)
}

/// The update region of a partition file.
#[derive(Debug)]
pub struct PartitionFlash {
    file: File,
}

impl Flash for PartitionFlash {
    type Error = std::io::Error;

    fn capacity(&self) -> usize {
        SLOTS_START as usize + 2 * SLOT_BYTES
    }

    fn read(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), std::io::Error> {
        self.file.read_exact_at(buf, HEADER + u64::from(offset))
    }

    fn write(&mut self, offset: u32, data: &[u8]) -> Result<(), std::io::Error> {
        self.file.write_all_at(data, HEADER + u64::from(offset))
    }

    /// Nothing: what the simulator models is a process killed at any moment (`kill -9`),
    /// after which every write that returned is in the file (the kernel holds it). Syncing
    /// to the disk as well would model a machine losing power, at the cost of two disk
    /// flushes per chunk for every simulated board; the library's write order against a
    /// write torn at any byte is tested in `firmware_sim::update` itself.
    fn sync(&mut self) -> Result<(), std::io::Error> {
        Ok(())
    }
}

/// What the factory programs into slot 0 for `version`: bytes that stand for that
/// firmware (the simulator runs the same code whatever the slot holds).
fn factory_image(version: &str) -> Vec<u8> {
    let seed = version
        .bytes()
        .fold(17u8, |a, b| a.wrapping_mul(31).wrapping_add(b));
    (0..4096u32)
        .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
        .collect()
}

/// Creates the partition at `path`: the key, slot 0 programmed with the factory image of
/// `version`, and a boot record naming it.
///
/// # Errors
/// The file cannot be written.
pub fn create(path: &Path, key: [u8; 32], version: &str) -> anyhow::Result<()> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let mut header = vec![0u8; HEADER as usize];
    header[..8].copy_from_slice(MAGIC);
    header[8..40].copy_from_slice(&key);
    file.write_all_at(&header, 0)?;
    // Sparse: the slots take disk space only as they are written.
    file.set_len(HEADER + (SLOTS_START as usize + 2 * SLOT_BYTES) as u64)?;
    let mut flash = PartitionFlash { file };
    let image = factory_image(version);
    Updater::program(&mut flash, 0, &image)
        .map_err(|e| anyhow::anyhow!("cannot program slot 0: {e:?}"))?;
    Updater::format(
        flash,
        SlotInfo {
            version: truncated(version),
            size: image.len() as u64,
            sha256: sha256(&image),
        },
    )
    .map_err(|e| anyhow::anyhow!("cannot write the boot record: {e:?}"))?;
    Ok(())
}

/// Opens the partition at `path`: its update region and the key.
///
/// # Errors
/// The file cannot be read or is not a partition.
pub fn open(path: &Path) -> anyhow::Result<(PartitionFlash, [u8; 32])> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut header = [0u8; 40];
    file.read_exact_at(&mut header, 0)
        .with_context(|| format!("{}: truncated", path.display()))?;
    if &header[..8] != MAGIC {
        anyhow::bail!("{} is not a firmware partition", path.display());
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(&header[8..40]);
    Ok((PartitionFlash { file }, key))
}

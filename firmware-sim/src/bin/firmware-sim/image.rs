//! The provisioning image: what `firmware-sim flash` writes and `run` boots. It is the
//! simulated device's whole flash: identity and configuration, plus the region the
//! firmware keeps its unacknowledged ring and sequence counter in.
//!
//! ```text
//! offset 0   magic    8 bytes  "FWSIMG\r\n"  (\r\n catches text-mode mangling, as in PNG)
//!        8   version  u16 LE   2 (1: without a client certificate; still read)
//!       10   reserved u16      0
//!       12   length   u32 LE   body length
//!       16   crc32    u32 LE   CRC-32 (IEEE) of the body
//!       20   body     postcard { provisioning, flash region bytes }
//! ```
//!
//! `run` rewrites the file whenever the firmware syncs its flash (after each sample that
//! became a batch, each acknowledgement, each renumbering): to a temporary file in the
//! same directory, fsync, rename over the image, fsync the directory. A crash leaves either
//! the old or the new image, never a torn one.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use firmware_sim::crc::crc32;
use firmware_sim::Flash;
use serde::{Deserialize, Serialize};

/// The file's first bytes.
pub const MAGIC: [u8; 8] = *b"FWSIMG\r\n";
/// The format this build writes; it reads this one and version 1 (the same without a
/// client certificate), which `run` rewrites as this one at its first sync.
pub const VERSION: u16 = 2;
const HEADER_LEN: usize = 20;
/// Largest image accepted (the flash region is limited to 16 MiB).
const MAX_BODY: usize = 32 << 20;

/// Identity and configuration, written by `flash`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provisioning {
    /// Device id (also inside the token; shown in logs).
    pub device_id: String,
    /// `wss://HOST:PORT/v1/device`.
    pub hub_url: String,
    /// Device token.
    pub token: String,
    /// PEM of the CA to trust, if any.
    pub ca_pem: Option<String>,
    /// Sample interval, milliseconds.
    pub interval_ms: u32,
    /// Sensors to report (see `sim::SENSORS`).
    pub sensors: Vec<String>,
    /// Firmware version reported in `Hello`.
    pub firmware: String,
    /// When it was flashed, epoch ms.
    pub flashed_at_ms: u64,
    /// The TLS client certificate the device presents, if any (then the token may be empty).
    pub client_cert: Option<ClientCertPem>,
}

/// A client certificate and its private key, PEM, as `hub devices add ID --cert DIR` writes
/// them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ClientCertPem {
    /// The certificate (chain), the device's first.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

#[derive(Serialize, Deserialize)]
struct Body {
    provisioning: Provisioning,
    flash: Vec<u8>,
}

/// Version 1's provisioning: version 2's without the client certificate.
#[derive(Serialize, Deserialize)]
struct ProvisioningV1 {
    device_id: String,
    hub_url: String,
    token: String,
    ca_pem: Option<String>,
    interval_ms: u32,
    sensors: Vec<String>,
    firmware: String,
    flashed_at_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct BodyV1 {
    provisioning: ProvisioningV1,
    flash: Vec<u8>,
}

impl From<BodyV1> for Body {
    fn from(v1: BodyV1) -> Body {
        let p = v1.provisioning;
        Body {
            provisioning: Provisioning {
                device_id: p.device_id,
                hub_url: p.hub_url,
                token: p.token,
                ca_pem: p.ca_pem,
                interval_ms: p.interval_ms,
                sensors: p.sensors,
                firmware: p.firmware,
                flashed_at_ms: p.flashed_at_ms,
                client_cert: None,
            },
            flash: v1.flash,
        }
    }
}

/// A decoded image.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// Identity and configuration.
    pub provisioning: Provisioning,
    /// The firmware's flash region (ring header, unacknowledged batches).
    pub flash: Vec<u8>,
}

/// Why an image could not be read or written. The messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be read or written.
    #[error("{path}: {1}", path = .0.display())]
    Io(PathBuf, std::io::Error),
    /// The file is empty (a copy or a flash that never happened, a full disk).
    #[error("{path}: the image is empty (0 bytes); re-flash it with `firmware-sim flash --out {path} ...`", path = .0.display())]
    Empty(PathBuf),
    /// Wrong magic.
    #[error("{path}: not a firmware-sim image (bad magic); create one with `firmware-sim flash --out {path} ...`", path = .0.display())]
    NotAnImage(PathBuf),
    /// A version this build does not read.
    #[error("{}: image format version {found} is not supported (this firmware-sim reads versions 1 to {VERSION}); re-flash it with this firmware-sim's `flash`", .path.display())]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u16,
    },
    /// Truncated, checksum mismatch, or a body that does not decode.
    #[error("{}: image is corrupt ({why}); re-flash it with `firmware-sim flash` (readings it held that the hub has not acknowledged are lost)", .path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

impl Image {
    /// The file contents.
    pub fn encode(&self) -> Vec<u8> {
        encode_parts(&self.provisioning, &self.flash)
    }

    /// Decodes file contents; `path` only names the file in errors.
    ///
    /// # Errors
    /// See [`ImageError`].
    pub fn decode(path: &Path, bytes: &[u8]) -> Result<Image, ImageError> {
        let corrupt = |why: String| ImageError::Corrupt {
            path: path.to_path_buf(),
            why,
        };
        if bytes.is_empty() {
            return Err(ImageError::Empty(path.to_path_buf()));
        }
        if !bytes.starts_with(&MAGIC) {
            // The start of the magic and no more: a cut-off image, not a foreign file.
            if MAGIC.starts_with(bytes) {
                return Err(corrupt(format!("truncated header ({} bytes)", bytes.len())));
            }
            return Err(ImageError::NotAnImage(path.to_path_buf()));
        }
        if bytes.len() < HEADER_LEN {
            return Err(corrupt(format!("truncated header ({} bytes)", bytes.len())));
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if !(1..=VERSION).contains(&version) {
            return Err(ImageError::Version {
                path: path.to_path_buf(),
                found: version,
            });
        }
        let le32 = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let len = le32(12) as usize;
        let body = &bytes[HEADER_LEN..];
        if len > MAX_BODY || body.len() != len {
            return Err(corrupt(format!(
                "body is {} bytes, header says {len}",
                body.len()
            )));
        }
        let (stored, computed) = (le32(16), crc32(body));
        if stored != computed {
            return Err(corrupt(format!(
                "checksum mismatch: stored {stored:08x}, computed {computed:08x}"
            )));
        }
        let body: Body = match version {
            1 => postcard::from_bytes::<BodyV1>(body).map(Body::from),
            _ => postcard::from_bytes(body),
        }
        .map_err(|e| corrupt(format!("body does not decode: {e}")))?;
        Ok(Image {
            provisioning: body.provisioning,
            flash: body.flash,
        })
    }

    /// Reads and decodes `path`.
    ///
    /// # Errors
    /// See [`ImageError`].
    pub fn load(path: &Path) -> Result<Image, ImageError> {
        let bytes = std::fs::read(path).map_err(|e| ImageError::Io(path.to_path_buf(), e))?;
        Image::decode(path, &bytes)
    }

    /// Writes `path` atomically (see the module documentation).
    ///
    /// # Errors
    /// The file or its directory could not be written.
    pub fn save(&self, path: &Path) -> Result<(), ImageError> {
        write_atomic(path, &self.encode())
    }
}

fn encode_parts(provisioning: &Provisioning, flash: &[u8]) -> Vec<u8> {
    #[derive(Serialize)]
    struct BodyRef<'a> {
        provisioning: &'a Provisioning,
        flash: &'a [u8],
    }
    // Serializing strings, integers and byte slices into a Vec cannot fail.
    let body = postcard::to_allocvec(&BodyRef {
        provisioning,
        flash,
    })
    .unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Temp file in the same directory, fsync, rename, fsync the directory.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let io = |e| ImageError::Io(path.to_path_buf(), e);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "image".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// The firmware's flash while `run` boots an image: RAM, written back to the image file
/// at every [`Flash::sync`].
#[derive(Debug, Clone)]
pub struct ImageFlash {
    path: Arc<Path>,
    provisioning: Arc<Provisioning>,
    bytes: Vec<u8>,
}

impl ImageFlash {
    /// The flash of `image`, stored back to `path`.
    pub fn new(path: &Path, image: Image) -> ImageFlash {
        ImageFlash {
            path: Arc::from(path),
            provisioning: Arc::new(image.provisioning),
            bytes: image.flash,
        }
    }
}

/// Why the image could not be written back.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the device state back to its image: {0}")]
pub struct SyncError(pub String);

impl Flash for ImageFlash {
    type Error = SyncError;

    fn capacity(&self) -> usize {
        self.bytes.len()
    }

    fn read(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), SyncError> {
        let start = offset as usize;
        let src = self
            .bytes
            .get(start..start + buf.len())
            .ok_or_else(|| SyncError(format!("read outside the flash at {offset}")))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write(&mut self, offset: u32, data: &[u8]) -> Result<(), SyncError> {
        let start = offset as usize;
        let dst = self
            .bytes
            .get_mut(start..start + data.len())
            .ok_or_else(|| SyncError(format!("write outside the flash at {offset}")))?;
        dst.copy_from_slice(data);
        Ok(())
    }

    fn sync(&mut self) -> Result<(), SyncError> {
        let bytes = encode_parts(&self.provisioning, &self.bytes);
        let write = || write_atomic(&self.path, &bytes).map_err(|e| SyncError(e.to_string()));
        // A few milliseconds of file I/O: tell tokio so that other devices keep running.
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(write)
            }
            _ => write(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Image {
        Image {
            provisioning: Provisioning {
                device_id: "sim-00001".into(),
                hub_url: "wss://127.0.0.1:8443/v1/device".into(),
                token: "v1.sim-00001.1.2.abc".into(),
                ca_pem: Some("-----BEGIN CERTIFICATE-----\n...".into()),
                interval_ms: 1000,
                sensors: vec!["temperature".into(), "counter".into()],
                firmware: "firmware-sim 0.1.0".into(),
                flashed_at_ms: 1_764_000_000_000,
                client_cert: Some(ClientCertPem {
                    cert_pem: "-----BEGIN CERTIFICATE-----\n...".into(),
                    key_pem: "-----BEGIN PRIVATE KEY-----\n...".into(),
                }),
            },
            flash: vec![0xAB; 256],
        }
    }

    #[test]
    fn round_trip_and_clear_errors() {
        let path = Path::new("dev.img");
        let image = sample();
        let bytes = image.encode();
        assert_eq!(Image::decode(path, &bytes).expect("decodes"), image);

        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x01;
        let err = Image::decode(path, &flipped)
            .expect_err("corrupt")
            .to_string();
        assert!(
            err.starts_with("dev.img: image is corrupt (checksum mismatch"),
            "{err}"
        );
        assert!(err.contains("re-flash"), "{err}");

        let err = Image::decode(path, &bytes[..bytes.len() - 3])
            .expect_err("truncated")
            .to_string();
        assert!(err.contains("image is corrupt (body is"), "{err}");

        let mut v3 = bytes.clone();
        v3[8] = 3;
        let err = Image::decode(path, &v3).expect_err("version").to_string();
        assert!(
            err.contains("image format version 3 is not supported"),
            "{err}"
        );

        let err = Image::decode(path, b"hello world, not an image")
            .expect_err("magic")
            .to_string();
        assert!(err.contains("not a firmware-sim image"), "{err}");

        let err = Image::decode(path, b"").expect_err("empty").to_string();
        assert_eq!(
            err,
            "dev.img: the image is empty (0 bytes); re-flash it with `firmware-sim flash --out dev.img ...`"
        );
        let err = Image::decode(path, &bytes[..5])
            .expect_err("cut in the magic")
            .to_string();
        assert!(
            err.contains("image is corrupt (truncated header (5 bytes))"),
            "{err}"
        );
    }

    #[test]
    fn a_version_1_image_reads_without_a_client_certificate_and_is_written_as_version_2() {
        let image = sample();
        let p = &image.provisioning;
        let v1 = BodyV1 {
            provisioning: ProvisioningV1 {
                device_id: p.device_id.clone(),
                hub_url: p.hub_url.clone(),
                token: p.token.clone(),
                ca_pem: p.ca_pem.clone(),
                interval_ms: p.interval_ms,
                sensors: p.sensors.clone(),
                firmware: p.firmware.clone(),
                flashed_at_ms: p.flashed_at_ms,
            },
            flash: image.flash.clone(),
        };
        let body = postcard::to_allocvec(&v1).expect("encode");
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&1u16.to_le_bytes());
        bytes.extend_from_slice(&0u16.to_le_bytes());
        bytes.extend_from_slice(&(body.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&crc32(&body).to_le_bytes());
        bytes.extend_from_slice(&body);
        let read = Image::decode(Path::new("v1.img"), &bytes).expect("a version 1 image");
        assert_eq!(read.provisioning.client_cert, None);
        assert_eq!(read.provisioning.token, p.token);
        assert_eq!(read.flash, image.flash);
        assert_eq!(u16::from_le_bytes([read.encode()[8], read.encode()[9]]), 2);
    }

    #[test]
    fn save_is_atomic_and_flash_sync_writes_back() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path();
        let path = dir.join("dev.img");
        sample().save(&path).expect("save");
        let mut flash = ImageFlash::new(&path, Image::load(&path).expect("load"));
        flash.write(0, &[1, 2, 3]).expect("write");
        flash.sync().expect("sync");
        let back = Image::load(&path).expect("load");
        assert_eq!(&back.flash[..4], &[1, 2, 3, 0xAB]);
        // No temporary files are left behind.
        let entries = std::fs::read_dir(dir).expect("ls").count();
        assert_eq!(entries, 1);
    }
}

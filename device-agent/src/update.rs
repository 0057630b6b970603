//! Firmware updates on the agent: the download of an offered image into the data
//! directory, resumable across reconnects and restarts, and its verification against the
//! hub's public key before the install program sees it.
//!
//! The directory holds `offer.json` (the offer being downloaded, and its outcome once
//! there is one) and `image.part` (the bytes received so far, in order). The download
//! resumes at the length of `image.part`, so nothing else needs recording per chunk; an
//! offer of another version or hash replaces both files and starts from zero. A torn write
//! at a power cut can only leave wrong bytes that the SHA-256 check catches, and then the
//! download starts over.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use schemas::firmware::{decode_hex_array, signed_statement, PUBLIC_KEY_LEN, SHA256_LEN};
use schemas::limits::MAX_CHUNK_BYTES;
use schemas::{FirmwareChunk, FirmwareOffer};
use serde::{Deserialize, Serialize};

/// Bytes asked for per request (the protocol's largest chunk).
pub const CHUNK_LEN: u32 = MAX_CHUNK_BYTES as u32;
/// Requests kept outstanding: enough to keep the link busy, few enough that chunks
/// never crowd out telemetry (the session sends requests after telemetry anyway).
pub const WINDOW: u64 = schemas::session::REQUEST_QUEUE as u64;
/// Largest image the agent accepts (it has to fit in the data directory).
pub const MAX_IMAGE: u64 = 1 << 30;

const OFFER_FILE: &str = "offer.json";
const PART_FILE: &str = "image.part";

/// Why the download directory could not be used.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// Reading or writing the download directory failed.
    #[error("firmware download directory {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
}

/// The offer a download belongs to, as stored in `offer.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Stored {
    version: String,
    size: u64,
    sha256: String,
    signature: String,
    /// How the install ended, once it has (`None`: not yet).
    outcome: Option<Outcome>,
}

/// How an install ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// The install program exited 0.
    pub succeeded: bool,
    /// The program's output or why it did not run.
    pub reason: String,
}

/// What to do after an offer or a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Keep downloading: this far, in percent.
    Downloading(u8),
    /// The image is complete and verified at this path: install it.
    Verified(PathBuf),
    /// The image is refused, for this reason (the download was discarded).
    Refused(String),
    /// This update already ended so: report it again.
    Done(Outcome),
    /// Nothing to do (a chunk of another version, or out of order).
    Ignored,
}

/// The download of one offered image. See the module documentation.
#[derive(Debug)]
pub struct Download {
    dir: PathBuf,
    key: [u8; PUBLIC_KEY_LEN],
    current: Option<Stored>,
    /// Bytes of the image in `image.part`.
    written: u64,
    /// The next offset to ask for (requests for `written..next` are outstanding).
    next: u64,
}

impl Download {
    /// Opens the download directory `dir` (creating it), picking up a download in
    /// progress; images are checked against `key`.
    ///
    /// # Errors
    /// The directory cannot be created or read.
    pub fn open(dir: &Path, key: [u8; PUBLIC_KEY_LEN]) -> Result<Download, UpdateError> {
        fs::create_dir_all(dir).map_err(|source| io_error(dir, source))?;
        let offer_path = dir.join(OFFER_FILE);
        // An unreadable record is treated as none: the next offer starts over.
        let current = fs::read(&offer_path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Stored>(&bytes).ok());
        let written = match fs::metadata(dir.join(PART_FILE)) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(source) => return Err(io_error(&dir.join(PART_FILE), source)),
        };
        Ok(Download {
            dir: dir.to_path_buf(),
            key,
            current,
            written,
            next: written,
        })
    }

    /// Bytes of the current image received so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The version being downloaded, if any.
    pub fn version(&self) -> Option<&str> {
        self.current.as_ref().map(|c| c.version.as_str())
    }

    fn part(&self) -> PathBuf {
        self.dir.join(PART_FILE)
    }

    /// Takes an offer (not an empty one): resumes the download of the same image at its
    /// stored offset, or starts over for another one. Outstanding requests of an earlier
    /// connection are forgotten.
    ///
    /// # Errors
    /// The download directory cannot be written.
    pub fn offer(&mut self, offer: &FirmwareOffer) -> Result<Step, UpdateError> {
        let wanted = Stored {
            version: offer.version.to_string(),
            size: offer.size,
            sha256: offer.sha256.to_ascii_lowercase(),
            signature: offer.signature.to_ascii_lowercase(),
            outcome: None,
        };
        if decode_hex_array::<SHA256_LEN>(&wanted.sha256).is_none()
            || decode_hex_array::<64>(&wanted.signature).is_none()
        {
            return Ok(Step::Refused(
                "the offer's sha256 or signature is not hex".to_string(),
            ));
        }
        if wanted.size > MAX_IMAGE {
            return Ok(Step::Refused(format!(
                "the image is {} bytes, more than the agent's limit of {MAX_IMAGE}",
                wanted.size
            )));
        }
        let same = self.current.as_ref().is_some_and(|c| {
            Stored {
                outcome: None,
                ..c.clone()
            } == wanted
        });
        if same {
            if let Some(outcome) = self.current.as_ref().and_then(|c| c.outcome.clone()) {
                return Ok(Step::Done(outcome));
            }
        } else {
            self.discard()?;
            self.store(&wanted)?;
            self.current = Some(wanted);
        }
        if self.written > offer.size {
            self.discard_part()?;
        }
        self.next = self.written;
        if self.written == offer.size {
            return self.verify();
        }
        Ok(Step::Downloading(self.percent()))
    }

    /// The next request to send, `(version, offset, len)`, while the window has room.
    pub fn next_request(&mut self) -> Option<(String, u64, u32)> {
        let c = self.current.as_ref().filter(|c| c.outcome.is_none())?;
        if self.next >= c.size || self.next - self.written >= WINDOW * u64::from(CHUNK_LEN) {
            return None;
        }
        let len = (c.size - self.next).min(u64::from(CHUNK_LEN)) as u32;
        let offset = self.next;
        self.next += u64::from(len);
        Some((c.version.clone(), offset, len))
    }

    /// The request at `offset` could not be sent (the session's queue is full): it is
    /// asked for again later.
    pub fn request_not_sent(&mut self, offset: u64) {
        self.next = self.next.min(offset);
    }

    /// Appends a chunk that continues the image; verifies the image once it is complete.
    ///
    /// # Errors
    /// The download directory cannot be written.
    pub fn chunk(&mut self, chunk: &FirmwareChunk) -> Result<Step, UpdateError> {
        let Some(c) = self.current.as_ref().filter(|c| c.outcome.is_none()) else {
            return Ok(Step::Ignored);
        };
        if c.version != chunk.version.as_str() || chunk.offset < self.written {
            return Ok(Step::Ignored);
        }
        if chunk.offset > self.written {
            // A gap (the hub answers in order, so a request was lost): ask again from
            // the stored end rather than wait for bytes that will not come.
            self.next = self.written;
            return Ok(Step::Ignored);
        }
        let data = chunk.data.as_slice();
        let room = c.size - self.written;
        if data.is_empty() || data.len() as u64 > room {
            self.discard()?;
            return Ok(Step::Refused(
                "the hub sent a chunk past the offered size".to_string(),
            ));
        }
        let part = self.part();
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&part)
            .map_err(|source| io_error(&part, source))?;
        file.write_all(data)
            .map_err(|source| io_error(&part, source))?;
        self.written += data.len() as u64;
        self.next = self.next.max(self.written);
        if self.written == c.size {
            file.sync_all().map_err(|source| io_error(&part, source))?;
            return self.verify();
        }
        Ok(Step::Downloading(self.percent()))
    }

    fn percent(&self) -> u8 {
        match &self.current {
            Some(c) if c.size > 0 => (self.written.saturating_mul(100) / c.size).min(100) as u8,
            _ => 100,
        }
    }

    /// Checks the complete image's size, SHA-256 and signature; discards it when they do
    /// not match.
    fn verify(&mut self) -> Result<Step, UpdateError> {
        let Some(c) = self.current.clone() else {
            return Ok(Step::Ignored);
        };
        let part = self.part();
        let why = match image_sha256(&part) {
            Err(source) => return Err(io_error(&part, source)),
            Ok((size, _)) if size != c.size => {
                Some(format!("size mismatch: {size} bytes, {} offered", c.size))
            }
            Ok((_, sha)) => check(&self.key, &c, &sha).err(),
        };
        match why {
            None => Ok(Step::Verified(part)),
            Some(reason) => {
                self.finish(Outcome {
                    succeeded: false,
                    reason: reason.clone(),
                })?;
                Ok(Step::Refused(reason))
            }
        }
    }

    /// Records how the install ended (an offer of the same image is then answered with
    /// it) and removes the image.
    ///
    /// # Errors
    /// The download directory cannot be written.
    pub fn finish(&mut self, outcome: Outcome) -> Result<(), UpdateError> {
        self.discard_part()?;
        if let Some(mut c) = self.current.take() {
            c.outcome = Some(outcome);
            self.store(&c)?;
            self.current = Some(c);
        }
        Ok(())
    }

    fn store(&self, stored: &Stored) -> Result<(), UpdateError> {
        let path = self.dir.join(OFFER_FILE);
        let tmp = self.dir.join("offer.json.tmp");
        let bytes = serde_json::to_vec(stored).unwrap_or_default();
        let write = || -> io::Result<()> {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            fs::rename(&tmp, &path)?;
            File::open(&self.dir)?.sync_all()
        };
        write().map_err(|source| io_error(&path, source))
    }

    fn discard_part(&mut self) -> Result<(), UpdateError> {
        let part = self.part();
        match fs::remove_file(&part) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(io_error(&part, source)),
        }
        self.written = 0;
        self.next = 0;
        Ok(())
    }

    fn discard(&mut self) -> Result<(), UpdateError> {
        self.discard_part()?;
        self.current = None;
        let path = self.dir.join(OFFER_FILE);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(io_error(&path, source)),
        }
    }
}

/// The size and SHA-256 of the file at `path`, read in pieces.
fn image_sha256(path: &Path) -> io::Result<(u64, [u8; SHA256_LEN])> {
    let mut file = File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        ctx.update(&buf[..n]);
    }
    let mut sha = [0u8; SHA256_LEN];
    sha.copy_from_slice(ctx.finish().as_ref());
    Ok((size, sha))
}

/// Whether `sha` is the offered hash and the offer's signature over the signed statement
/// (`schemas::firmware::signed_statement`, the same bytes every device checks) verifies
/// with `key`; the reason when not.
fn check(key: &[u8; PUBLIC_KEY_LEN], offer: &Stored, sha: &[u8; SHA256_LEN]) -> Result<(), String> {
    if decode_hex_array::<SHA256_LEN>(&offer.sha256) != Some(*sha) {
        return Err("sha256 mismatch: the image is not the one offered".to_string());
    }
    let signature = decode_hex_array::<64>(&offer.signature)
        .ok_or_else(|| "the offer's signature is not hex".to_string())?;
    let statement = signed_statement(&offer.version, offer.size, sha)
        .ok_or_else(|| "the version is too long".to_string())?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
        .verify(&statement, &signature)
        .map_err(|_| "bad signature: not signed by the key this agent trusts".to_string())
}

fn io_error(path: &Path, source: io::Error) -> UpdateError {
    UpdateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::KeyPair;
    use schemas::firmware::{encode_hex, Blob};
    use schemas::message::truncated;

    fn keypair() -> ring::signature::Ed25519KeyPair {
        ring::signature::Ed25519KeyPair::from_seed_unchecked(&[9u8; 32]).expect("seed")
    }

    fn hex(bytes: &[u8]) -> String {
        let mut out = vec![0u8; bytes.len() * 2];
        encode_hex(bytes, &mut out).expect("room").to_string()
    }

    fn offer_for(version: &str, image: &[u8]) -> FirmwareOffer {
        let sha: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, image)
            .as_ref()
            .try_into()
            .expect("32");
        let statement = signed_statement(version, image.len() as u64, &sha).expect("fits");
        let sig = keypair().sign(&statement);
        FirmwareOffer {
            version: truncated(version),
            size: image.len() as u64,
            sha256: truncated(&hex(&sha)),
            signature: truncated(&hex(sig.as_ref())),
        }
    }

    fn key() -> [u8; 32] {
        keypair().public_key().as_ref().try_into().expect("32")
    }

    fn image() -> Vec<u8> {
        (0..20_000u32).map(|i| (i * 31 % 251) as u8).collect()
    }

    /// Answers every request the download has room for, stopping after `limit` chunks.
    fn pull(d: &mut Download, image: &[u8], limit: usize) -> Step {
        let mut last = Step::Ignored;
        for _ in 0..limit {
            let Some((version, offset, len)) = d.next_request() else {
                break;
            };
            let end = (offset as usize + len as usize).min(image.len());
            last = d
                .chunk(&FirmwareChunk {
                    version: truncated(&version),
                    offset,
                    data: Blob::from_slice(&image[offset as usize..end]),
                })
                .expect("chunk");
        }
        last
    }

    #[test]
    fn a_download_resumes_after_a_restart_and_restarts_for_another_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = image();
        let offer = offer_for("1.1", &image);
        let mut d = Download::open(dir.path(), key()).expect("open");
        assert_eq!(d.offer(&offer).expect("offer"), Step::Downloading(0));
        // The window is bounded: no more than WINDOW requests before any answer.
        let mut asked = Vec::new();
        while let Some(r) = d.next_request() {
            asked.push(r.1);
        }
        assert_eq!(asked, [0, 4096, 8192, 12288]);
        // A new connection forgets them; two chunks arrive, then the agent restarts.
        d.offer(&offer).expect("offer");
        assert_eq!(pull(&mut d, &image, 2), Step::Downloading(40));
        drop(d);
        let mut d = Download::open(dir.path(), key()).expect("reopen");
        assert_eq!(d.written(), 8192);
        assert_eq!(d.offer(&offer).expect("offer"), Step::Downloading(40));
        assert_eq!(d.next_request().map(|r| r.1), Some(8192));
        // A chunk out of order is ignored, not written.
        let stray = FirmwareChunk {
            version: truncated("1.1"),
            offset: 12288,
            data: Blob::from_slice(&image[12288..16384]),
        };
        assert_eq!(d.chunk(&stray).expect("chunk"), Step::Ignored);
        assert_eq!(d.written(), 8192);
        // The gap is asked for again without waiting for a reconnect.
        assert_eq!(d.next_request().map(|r| r.1), Some(8192));
        d.offer(&offer).expect("offer");
        let path = match pull(&mut d, &image, 10) {
            Step::Verified(path) => path,
            other => panic!("not verified: {other:?}"),
        };
        assert_eq!(fs::read(&path).expect("image"), image);
        d.finish(Outcome {
            succeeded: true,
            reason: "ok".to_string(),
        })
        .expect("finish");
        // The same offer again (the report was lost) is answered with the outcome.
        let mut d = Download::open(dir.path(), key()).expect("reopen");
        assert!(matches!(d.offer(&offer), Ok(Step::Done(o)) if o.succeeded));
        assert!(d.next_request().is_none());
        // Another version starts from zero.
        let other = offer_for("1.2", &image[..5000]);
        assert_eq!(d.offer(&other).expect("offer"), Step::Downloading(0));
        pull(&mut d, &image[..5000], 1);
        assert_eq!(d.written(), 4096);
        let mut d = Download::open(dir.path(), key()).expect("reopen");
        assert_eq!(d.offer(&offer).expect("offer"), Step::Downloading(0));
        assert_eq!(d.written(), 0);
        assert_eq!(d.version(), Some("1.1"));
    }

    #[test]
    fn a_wrong_signature_or_hash_is_refused_and_discarded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = image();
        let mut d = Download::open(dir.path(), [1u8; 32]).expect("open");
        d.offer(&offer_for("1.1", &image)).expect("offer");
        match pull(&mut d, &image, 10) {
            Step::Refused(why) => assert!(why.contains("bad signature"), "{why}"),
            other => panic!("not refused: {other:?}"),
        }
        assert!(!dir.path().join(PART_FILE).exists());

        let dir = tempfile::tempdir().expect("tempdir");
        let mut d = Download::open(dir.path(), key()).expect("open");
        d.offer(&offer_for("1.1", &image)).expect("offer");
        let mut tampered = image.clone();
        tampered[100] ^= 1;
        match pull(&mut d, &tampered, 10) {
            Step::Refused(why) => assert!(why.contains("sha256 mismatch"), "{why}"),
            other => panic!("not refused: {other:?}"),
        }
        let mut bad = offer_for("1.1", &image);
        bad.sha256 = truncated("zz");
        assert!(matches!(d.offer(&bad), Ok(Step::Refused(_))));
    }
}

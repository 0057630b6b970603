//! Firmware artifacts: images stored with their size, SHA-256 and Ed25519 signature, the
//! firmware signing key, and reading an image back in chunks for a transfer.
//!
//! Layout of the artifact directory (`firmware.dir`, default `DATA_DIR/firmware`):
//!
//! ```text
//! firmware/
//!   1.1/image          the bytes, as added
//!   1.1/manifest.json  version, size, sha256, signature, who signed, for, added_at
//! ```
//!
//! An artifact appears whole or not at all: it is written into a temporary directory next
//! to the others, synced, and renamed into place. Everything about an artifact is in its
//! directory, so hubs of a cluster that share the directory (a network file system) share
//! the artifacts without any database.
//!
//! The signing key (`firmware.signing_key`, default `DATA_DIR/firmware-signing-key`) is an
//! Ed25519 key in PKCS#8, created on first use and kept apart from the token secret: whoever
//! holds it can make devices install anything, so it never has to be where tokens are made.
//! The signature covers [`schemas::firmware::signed_statement`].
//!
//! How fast chunks may leave the hub in all is [`transfer_cap`]'s business.

pub mod transfer_cap;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ring::signature::{Ed25519KeyPair, KeyPair};
use schemas::firmware::{
    is_valid_version, signed_statement, PUBLIC_KEY_LEN, SHA256_LEN, SIGNATURE_LEN,
};
use serde::{Deserialize, Serialize};

use crate::selector::Selector;

/// Largest image the hub stores (and a device may be offered).
pub const MAX_IMAGE_BYTES: u64 = 64 * 1024 * 1024;

/// Why a firmware operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The version is not a valid name.
    #[error(
        "`{0}` is not a firmware version: use 1 to 32 of [A-Za-z0-9._+-], not starting with '.'"
    )]
    BadVersion(String),
    /// An artifact with this version exists already.
    #[error("firmware {0} exists already: versions are immutable (remove it first, or add the image as a new version)")]
    Exists(String),
    /// No artifact with this version.
    #[error("no firmware {0} (see `hub firmware list`)")]
    NotFound(String),
    /// An empty or too large image.
    #[error("an image must be 1 byte to {MAX_IMAGE_BYTES} bytes, this one has {0}")]
    BadSize(u64),
    /// A `--for` selector that does not parse.
    #[error("--for: {0}")]
    BadSelector(String),
    /// A signature that is not 64 bytes (raw or hex).
    #[error("a signature is 64 bytes (raw, or 128 hex digits), this one is not")]
    BadSignature,
    /// The signing key file is not an Ed25519 PKCS#8 key.
    #[error("{0} is not an Ed25519 key in PKCS#8: restore it from a backup (devices provisioned with its public key accept only its signatures)")]
    BadKey(PathBuf),
    /// A stored manifest does not parse.
    #[error("{path} is damaged: {detail}")]
    BadManifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// The system random generator failed.
    #[error("the system random number generator failed")]
    Random,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FirmwareError + '_ {
    move |source| FirmwareError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Who made an artifact's signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignedBy {
    /// This hub's firmware signing key.
    Hub,
    /// A signature given with the image (`--signature`), made elsewhere.
    External,
}

/// What the hub knows about one stored image (its `manifest.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// The version devices report once they run it.
    pub version: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the image, lowercase hex.
    pub sha256: String,
    /// Ed25519 signature over the signed statement, lowercase hex.
    pub signature: String,
    /// Who signed it.
    pub signed_by: SignedBy,
    /// Which devices it is for: a selector (`hw=rev2`); empty for any.
    #[serde(rename = "for")]
    pub for_devices: String,
    /// When it was added, ms since the epoch.
    pub added_at: u64,
}

impl Artifact {
    /// The selector of the devices it is for.
    ///
    /// # Errors
    /// A damaged manifest ([`FirmwareError::BadSelector`]).
    pub fn selector(&self) -> Result<Selector, FirmwareError> {
        self.for_devices
            .parse()
            .map_err(|e: crate::selector::SelectorError| FirmwareError::BadSelector(e.to_string()))
    }

    /// The SHA-256 as bytes.
    pub fn sha256_bytes(&self) -> Option<[u8; SHA256_LEN]> {
        schemas::firmware::decode_hex_array(&self.sha256)
    }

    /// The signature as bytes.
    pub fn signature_bytes(&self) -> Option<[u8; SIGNATURE_LEN]> {
        schemas::firmware::decode_hex_array(&self.signature)
    }
}

/// What `add` is given besides the image.
#[derive(Debug, Clone, Default)]
pub struct NewArtifact {
    /// The version.
    pub version: String,
    /// `KEY=VALUE` terms: the devices it is for (all must match; none: any device).
    pub for_devices: Vec<String>,
    /// A signature made elsewhere; `None` signs with the hub's key.
    pub signature: Option<[u8; SIGNATURE_LEN]>,
}

/// The artifact directory and the signing key.
#[derive(Debug, Clone)]
pub struct FirmwareStore {
    dir: PathBuf,
    key_path: PathBuf,
}

/// Reads a signature given as 64 raw bytes or 128 hex digits (surrounding whitespace
/// allowed).
///
/// # Errors
/// [`FirmwareError::BadSignature`].
pub fn parse_signature(bytes: &[u8]) -> Result<[u8; SIGNATURE_LEN], FirmwareError> {
    if let Ok(raw) = <[u8; SIGNATURE_LEN]>::try_from(bytes) {
        return Ok(raw);
    }
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|text| schemas::firmware::decode_hex_array(text.trim()))
        .ok_or(FirmwareError::BadSignature)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl FirmwareStore {
    /// Artifacts in `dir`, signed with the key at `key_path` (neither is touched yet).
    pub fn new(dir: impl Into<PathBuf>, key_path: impl Into<PathBuf>) -> FirmwareStore {
        FirmwareStore {
            dir: dir.into(),
            key_path: key_path.into(),
        }
    }

    /// The artifact directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The signing key, created (mode 0600) if there is none yet.
    ///
    /// # Errors
    /// The key cannot be read, written or parsed.
    fn signing_key(&self) -> Result<Ed25519KeyPair, FirmwareError> {
        let path = &self.key_path;
        match fs::read(path) {
            Ok(der) => {
                Ed25519KeyPair::from_pkcs8(&der).map_err(|_| FirmwareError::BadKey(path.clone()))
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let rng = ring::rand::SystemRandom::new();
                let doc =
                    Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| FirmwareError::Random)?;
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent).map_err(io_err(parent))?;
                }
                let tmp = path.with_extension("tmp");
                let _ = fs::remove_file(&tmp);
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(io_err(&tmp))?;
                file.write_all(doc.as_ref())
                    .and_then(|()| file.sync_all())
                    .map_err(io_err(&tmp))?;
                // A hard link fails if another hub created the key meanwhile; then that
                // one is the key, and this one is dropped.
                let linked = fs::hard_link(&tmp, path);
                let _ = fs::remove_file(&tmp);
                match linked {
                    Ok(()) => {
                        tracing::info!(key = %path.display(), "created the firmware signing key");
                        Ed25519KeyPair::from_pkcs8(doc.as_ref())
                            .map_err(|_| FirmwareError::BadKey(path.clone()))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => self.signing_key(),
                    Err(e) => Err(io_err(path)(e)),
                }
            }
            Err(err) => Err(io_err(path)(err)),
        }
    }

    /// The signing key's public half, hex (what devices are provisioned with), creating the
    /// key if there is none yet.
    ///
    /// # Errors
    /// The key cannot be read, written or parsed.
    pub fn public_key_hex(&self) -> Result<String, FirmwareError> {
        let key = self.signing_key()?;
        let public: &[u8] = key.public_key().as_ref();
        debug_assert_eq!(public.len(), PUBLIC_KEY_LEN);
        Ok(hex(public))
    }

    fn artifact_dir(&self, version: &str) -> Result<PathBuf, FirmwareError> {
        if !is_valid_version(version) {
            return Err(FirmwareError::BadVersion(
                version.chars().take(40).collect(),
            ));
        }
        Ok(self.dir.join(version))
    }

    /// Stores `image` as `new.version`: hashes it, signs it (unless a signature came with
    /// it) and writes it with its manifest, all at once or not at all.
    ///
    /// # Errors
    /// A bad version, size or selector; the version exists; the key or a file failed.
    pub fn add(
        &self,
        new: &NewArtifact,
        image: &[u8],
        now_ms: u64,
    ) -> Result<Artifact, FirmwareError> {
        let target = self.artifact_dir(&new.version)?;
        let size = image.len() as u64;
        if size == 0 || size > MAX_IMAGE_BYTES {
            return Err(FirmwareError::BadSize(size));
        }
        let mut selector = Selector::all();
        for term in &new.for_devices {
            let (key, value) = crate::selector::parse_tag(term)
                .map_err(|e| FirmwareError::BadSelector(e.to_string()))?;
            selector = selector
                .with_tag(key, value)
                .map_err(|e| FirmwareError::BadSelector(e.to_string()))?;
        }
        if target.exists() {
            return Err(FirmwareError::Exists(new.version.clone()));
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, image);
        let mut sha256 = [0u8; SHA256_LEN];
        sha256.copy_from_slice(digest.as_ref());
        let (signature, signed_by) = match new.signature {
            Some(given) => (given, SignedBy::External),
            None => {
                let statement = signed_statement(&new.version, size, &sha256)
                    .ok_or_else(|| FirmwareError::BadVersion(new.version.clone()))?;
                let mut sig = [0u8; SIGNATURE_LEN];
                sig.copy_from_slice(self.signing_key()?.sign(&statement).as_ref());
                (sig, SignedBy::Hub)
            }
        };
        let artifact = Artifact {
            version: new.version.clone(),
            size,
            sha256: hex(&sha256),
            signature: hex(&signature),
            signed_by,
            for_devices: selector.to_string(),
            added_at: now_ms,
        };
        fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
        let tmp = self
            .dir
            .join(format!(".adding-{}-{}", new.version, std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        let manifest = serde_json::to_vec_pretty(&artifact).unwrap_or_default();
        let written = write_synced(&tmp.join("image"), image)
            .and_then(|()| write_synced(&tmp.join("manifest.json"), &manifest))
            .and_then(|()| sync_dir(&tmp));
        if let Err(err) = written {
            let _ = fs::remove_dir_all(&tmp);
            return Err(err);
        }
        // rename(2) onto an existing non-empty directory fails, so two hubs adding the
        // same version at once cannot both win.
        if let Err(err) = fs::rename(&tmp, &target) {
            let _ = fs::remove_dir_all(&tmp);
            if target.exists() {
                return Err(FirmwareError::Exists(new.version.clone()));
            }
            return Err(io_err(&target)(err));
        }
        sync_dir(&self.dir)?;
        Ok(artifact)
    }

    /// The artifact of `version`.
    ///
    /// # Errors
    /// [`FirmwareError::NotFound`], or a damaged manifest.
    pub fn get(&self, version: &str) -> Result<Artifact, FirmwareError> {
        let path = self.artifact_dir(version)?.join("manifest.json");
        let text = match fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(FirmwareError::NotFound(version.to_string()))
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        serde_json::from_slice(&text).map_err(|e| FirmwareError::BadManifest {
            path,
            detail: e.to_string(),
        })
    }

    /// Every artifact, oldest first.
    ///
    /// # Errors
    /// The directory cannot be read, or a manifest is damaged.
    pub fn list(&self) -> Result<Vec<Artifact>, FirmwareError> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err(&self.dir)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_err(&self.dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str().filter(|n| is_valid_version(n)) else {
                // Temporary directories of an add in progress (or one a crash left).
                continue;
            };
            out.push(self.get(name)?);
        }
        out.sort_by(|a, b| (a.added_at, &a.version).cmp(&(b.added_at, &b.version)));
        Ok(out)
    }

    /// Deletes `version`'s artifact.
    ///
    /// # Errors
    /// [`FirmwareError::NotFound`], or the files cannot be removed.
    pub fn remove(&self, version: &str) -> Result<(), FirmwareError> {
        let dir = self.artifact_dir(version)?;
        if !dir.join("manifest.json").exists() {
            return Err(FirmwareError::NotFound(version.to_string()));
        }
        // Renamed away first, so that no reader sees half of it.
        let trash = self
            .dir
            .join(format!(".removing-{version}-{}", std::process::id()));
        fs::rename(&dir, &trash).map_err(io_err(&dir))?;
        fs::remove_dir_all(&trash).map_err(io_err(&trash))
    }

    /// Reads up to `len` bytes of `version`'s image from `offset` (fewer at the end, none
    /// past it).
    ///
    /// # Errors
    /// [`FirmwareError::NotFound`], or the image cannot be read.
    pub fn read_chunk(
        &self,
        version: &str,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, FirmwareError> {
        let path = self.artifact_dir(version)?.join("image");
        let mut file = match fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(FirmwareError::NotFound(version.to_string()))
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        file.seek(SeekFrom::Start(offset)).map_err(io_err(&path))?;
        let mut out = Vec::with_capacity(len);
        file.take(len as u64)
            .read_to_end(&mut out)
            .map_err(io_err(&path))?;
        Ok(out)
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), FirmwareError> {
    let mut file = fs::File::create(path).map_err(io_err(path))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io_err(path))
}

fn sync_dir(dir: &Path) -> Result<(), FirmwareError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{UnparsedPublicKey, ED25519};

    fn store(dir: &Path) -> FirmwareStore {
        FirmwareStore::new(dir.join("firmware"), dir.join("firmware-signing-key"))
    }

    fn new(version: &str) -> NewArtifact {
        NewArtifact {
            version: version.into(),
            ..NewArtifact::default()
        }
    }

    #[test]
    fn an_added_image_is_signed_and_reads_back() {
        let dir = tempfile::tempdir().expect("dir");
        let store = store(dir.path());
        let image: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let mut spec = new("1.1");
        spec.for_devices = vec!["hw=rev2".into()];
        let a = store.add(&spec, &image, 5).expect("add");
        assert_eq!(a.size, 10_000);
        assert_eq!(a.for_devices, "hw=rev2");
        assert_eq!(a.signed_by, SignedBy::Hub);
        let sha = a.sha256_bytes().expect("hex");
        assert_eq!(
            sha.as_slice(),
            ring::digest::digest(&ring::digest::SHA256, &image).as_ref()
        );
        // The signature verifies with the public key over the statement, and over nothing else.
        let public =
            schemas::firmware::decode_hex_array::<32>(&store.public_key_hex().expect("key"))
                .expect("hex");
        let statement = signed_statement("1.1", 10_000, &sha).expect("fits");
        let key = UnparsedPublicKey::new(&ED25519, public);
        let sig = a.signature_bytes().expect("hex");
        assert!(key.verify(&statement, &sig).is_ok());
        let other = signed_statement("1.2", 10_000, &sha).expect("fits");
        assert!(key.verify(&other, &sig).is_err());

        assert_eq!(store.get("1.1").expect("get"), a);
        assert_eq!(store.list().expect("list"), vec![a.clone()]);
        assert_eq!(
            store.read_chunk("1.1", 9_000, 4096).expect("chunk"),
            image[9_000..]
        );
        assert!(store
            .read_chunk("1.1", 20_000, 10)
            .expect("past")
            .is_empty());
        assert!(matches!(
            store.add(&spec, &image, 6),
            Err(FirmwareError::Exists(_))
        ));

        // The key is private to its owner and stays the same.
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.path().join("firmware-signing-key"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(store.public_key_hex().expect("again"), hex(&public));

        store.remove("1.1").expect("remove");
        assert!(matches!(store.get("1.1"), Err(FirmwareError::NotFound(_))));
        assert!(store.list().expect("list").is_empty());
    }

    #[test]
    fn refusals() {
        let dir = tempfile::tempdir().expect("dir");
        let store = store(dir.path());
        assert!(matches!(
            store.add(&new("../x"), b"x", 0),
            Err(FirmwareError::BadVersion(_))
        ));
        assert!(matches!(
            store.add(&new("1.0"), b"", 0),
            Err(FirmwareError::BadSize(0))
        ));
        let mut spec = new("1.0");
        spec.for_devices = vec!["no-equals".into()];
        assert!(matches!(
            store.add(&spec, b"x", 0),
            Err(FirmwareError::BadSelector(_))
        ));
        assert!(matches!(
            store.remove("9.9"),
            Err(FirmwareError::NotFound(_))
        ));
        // Nothing was left behind, and no key made for nothing.
        assert!(store.list().expect("list").is_empty());
        assert!(!dir.path().join("firmware-signing-key").exists());
    }

    #[test]
    fn an_external_signature_is_kept_as_given() {
        let dir = tempfile::tempdir().expect("dir");
        let store = store(dir.path());
        let sig = [9u8; 64];
        assert_eq!(parse_signature(&sig).expect("raw"), sig);
        let text = format!("{}\n", hex(&sig));
        assert_eq!(parse_signature(text.as_bytes()).expect("hex"), sig);
        assert!(parse_signature(b"abc").is_err());
        let mut spec = new("2.0");
        spec.signature = Some(sig);
        let a = store.add(&spec, b"image", 0).expect("add");
        assert_eq!(a.signed_by, SignedBy::External);
        assert_eq!(a.signature_bytes(), Some(sig));
        assert!(!dir.path().join("firmware-signing-key").exists());
    }
}

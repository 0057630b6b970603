//! The hub's data directory: on first start it is created with a self-signed CA, a server
//! certificate, a token secret and an admin token; later starts reuse them.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use ring::rand::{SecureRandom, SystemRandom};

use crate::token::TokenSecret;

/// Names the generated server certificate always carries.
const DEFAULT_SERVER_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1"];

/// Why the data directory could not be prepared or read.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("cannot generate TLS material: {0}")]
    Certificate(#[from] rcgen::Error),
    /// A secret file does not hold what it should.
    #[error("{0} is corrupt: expected 64 hex digits; delete it to generate a new one (this invalidates every issued token)")]
    CorruptSecret(PathBuf),
    /// Another hub runs with this data directory.
    #[error("another hub (pid {pid}) is running with the data directory {dir}: stop it, or give this one its own --data-dir")]
    Locked {
        /// The directory.
        dir: PathBuf,
        /// The other hub's pid, as it wrote it.
        pid: String,
    },
    /// The system random generator failed.
    #[error("the system random number generator failed")]
    Random,
}

/// The layout of a data directory.
#[derive(Debug, Clone)]
pub struct DataDir {
    root: PathBuf,
}

/// Which secrets [`DataDir::init`] generates (the others come from the configuration).
#[derive(Debug, Clone, Copy)]
pub struct Secrets {
    /// Generate `token-secret` if missing.
    pub token_secret: bool,
    /// Generate `admin-token` if missing.
    pub admin_token: bool,
    /// Generate `tls/ticket-key` if missing.
    pub ticket_key: bool,
}

impl Secrets {
    /// Generate both (the embedded default).
    pub const ALL: Secrets = Secrets {
        token_secret: true,
        admin_token: true,
        ticket_key: true,
    };
}

/// What [`DataDir::init`] created (empty on later starts).
#[derive(Debug, Default)]
pub struct Created {
    /// Files created by this call.
    pub files: Vec<PathBuf>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError + '_ {
    move |source| DataDirError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl DataDir {
    /// A data directory at `root` (nothing is touched yet).
    pub fn new(root: impl Into<PathBuf>) -> DataDir {
        DataDir { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The SQLite hub database: devices, presence, commands, jobs, updates.
    pub fn database(&self) -> PathBuf {
        self.root.join("hub.db")
    }
    /// The SQLite telemetry database: series, readings and high-water marks.
    pub fn telemetry_database(&self) -> PathBuf {
        self.root.join("telemetry.db")
    }
    /// The generated CA certificate (what devices trust).
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("tls/ca.pem")
    }
    /// The generated CA's key (it signs the server certificate and device certificates).
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("tls/ca-key.pem")
    }
    /// The generated server certificate.
    pub fn server_cert(&self) -> PathBuf {
        self.root.join("tls/server.pem")
    }
    /// The generated server key.
    pub fn server_key(&self) -> PathBuf {
        self.root.join("tls/server-key.pem")
    }
    fn server_names_file(&self) -> PathBuf {
        self.root.join("tls/server-names")
    }
    /// The secret TLS session tickets are sealed with.
    pub fn ticket_key(&self) -> PathBuf {
        self.root.join("tls").join("ticket-key")
    }

    /// The token signing secret.
    pub fn token_secret(&self) -> PathBuf {
        self.root.join("token-secret")
    }
    /// The admin API bearer token.
    pub fn admin_token(&self) -> PathBuf {
        self.root.join("admin-token")
    }
    /// Where a running hub writes the URL of its admin API, for the local CLI.
    pub fn admin_url(&self) -> PathBuf {
        self.root.join("admin-url")
    }
    /// Where a running hub writes the URL of its device endpoint.
    pub fn device_url(&self) -> PathBuf {
        self.root.join("device-url")
    }

    /// Creates whatever is missing: the directory (mode 0700), the CA and server
    /// certificate (with `extra_names` as additional SANs), the token secret and the admin
    /// token. Regenerates the server certificate when the names changed.
    ///
    /// # Errors
    /// A file could not be written, or certificate generation failed.
    pub fn init(&self, extra_names: &[String], secrets: Secrets) -> Result<Created, DataDirError> {
        let mut created = Created::default();
        let tls_dir = self.root.join("tls");
        fs::create_dir_all(&tls_dir).map_err(io_err(&tls_dir))?;
        fs::set_permissions(&self.root, fs::Permissions::from_mode(0o700))
            .map_err(io_err(&self.root))?;

        let wanted = [
            (self.token_secret(), 32usize, secrets.token_secret),
            (self.admin_token(), 24, secrets.admin_token),
            (self.ticket_key(), 32, secrets.ticket_key),
        ];
        for (path, bytes, generate) in wanted {
            // A secret the configuration supplies is not written to disk: a second, different
            // copy there would only mislead the CLI.
            if generate && !path.exists() {
                write_private(&path, &random_hex(bytes)?)?;
                created.files.push(path);
            }
        }

        let ca_params = ca_params()?;
        let ca_key = if self.ca_key().exists() {
            let pem = fs::read_to_string(self.ca_key()).map_err(io_err(&self.ca_key()))?;
            KeyPair::from_pem(&pem)?
        } else {
            let key = KeyPair::generate()?;
            let cert = ca_params.self_signed(&key)?;
            write_private(&self.ca_key(), &key.serialize_pem())?;
            write_public(&self.ca_cert(), &cert.pem())?;
            created.files.push(self.ca_cert());
            key
        };

        let mut names: Vec<String> = DEFAULT_SERVER_NAMES.iter().map(|s| s.to_string()).collect();
        for n in extra_names {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
        let wanted = names.join("\n");
        let current = fs::read_to_string(self.server_names_file()).unwrap_or_default();
        if current != wanted || !self.server_cert().exists() || !self.server_key().exists() {
            let issuer = Issuer::new(ca_params, &ca_key);
            let mut params = CertificateParams::new(names)?;
            params.distinguished_name.push(DnType::CommonName, "hub");
            params.key_usages = vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ];
            params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &issuer)?;
            write_private(&self.server_key(), &key.serialize_pem())?;
            write_public(&self.server_cert(), &cert.pem())?;
            write_public(&self.server_names_file(), &wanted)?;
            created.files.push(self.server_cert());
        }
        Ok(created)
    }

    /// Takes the data directory's lock (`hub.lock`, holding the pid), so that a second
    /// hub on the same directory refuses to start instead of corrupting the first one's
    /// view. The kernel releases it when the process ends, even by `kill -9`.
    ///
    /// # Errors
    /// Another hub holds it, or the file cannot be opened.
    pub fn lock(&self) -> Result<fs::File, DataDirError> {
        use rustix::fs::{flock, FlockOperation};
        use std::io::Seek;
        fs::create_dir_all(&self.root).map_err(io_err(&self.root))?;
        let path = self.root.join("hub.lock");
        let mut file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        if let Err(err) = flock(&file, FlockOperation::NonBlockingLockExclusive) {
            if err == rustix::io::Errno::WOULDBLOCK {
                let pid = fs::read_to_string(&path).unwrap_or_default();
                return Err(DataDirError::Locked {
                    dir: self.root.clone(),
                    pid: pid.trim().to_string(),
                });
            }
            return Err(DataDirError::Io {
                path,
                source: err.into(),
            });
        }
        file.set_len(0).map_err(io_err(&path))?;
        file.rewind().map_err(io_err(&path))?;
        writeln!(file, "{}", std::process::id()).map_err(io_err(&path))?;
        Ok(file)
    }

    /// Reads the token secret.
    ///
    /// # Errors
    /// The file is missing (the hub was never started with this data dir) or corrupt.
    pub fn read_token_secret(&self) -> Result<TokenSecret, DataDirError> {
        let path = self.token_secret();
        let text = fs::read_to_string(&path).map_err(io_err(&path))?;
        TokenSecret::from_hex(text.trim()).ok_or(DataDirError::CorruptSecret(path))
    }

    /// Reads the admin token.
    ///
    /// # Errors
    /// The file is missing or unreadable.
    pub fn read_admin_token(&self) -> Result<String, DataDirError> {
        let path = self.admin_token();
        Ok(fs::read_to_string(&path)
            .map_err(io_err(&path))?
            .trim()
            .to_string())
    }
}

/// The CA's parameters. They are rebuilt identically on every start, so that together
/// with the stored CA key they sign server certificates that chain to the stored CA.
fn ca_params() -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "hub local CA");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "hub");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// `bytes` bytes from the system's random generator, as hex.
///
/// # Errors
/// The generator failed.
pub(crate) fn random_hex(bytes: usize) -> Result<String, DataDirError> {
    let mut buf = vec![0u8; bytes];
    SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| DataDirError::Random)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Writes a file readable only by its owner, atomically (temp file + rename).
fn write_private(path: &Path, contents: &str) -> Result<(), DataDirError> {
    write_atomic(path, contents, 0o600)
}

fn write_public(path: &Path, contents: &str) -> Result<(), DataDirError> {
    write_atomic(path, contents, 0o644)
}

fn write_atomic(path: &Path, contents: &str, mode: u32) -> Result<(), DataDirError> {
    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.write_all(contents.as_bytes()).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// Writes a small text file atomically (used for the admin and device URL files).
///
/// # Errors
/// The file could not be written.
pub fn write_text(path: &Path, contents: &str) -> Result<(), DataDirError> {
    write_public(path, contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_idempotent_and_regenerates_on_new_names() {
        let dir = tempfile::tempdir().expect("temp dir");
        // Not there yet, as on a first start: init creates it.
        let data = DataDir::new(dir.path().join("data"));
        let first = data.init(&[], Secrets::ALL).expect("init");
        assert!(first.files.contains(&data.ca_cert()));
        let secret = fs::read_to_string(data.token_secret()).expect("secret");
        let again = data.init(&[], Secrets::ALL).expect("init");
        assert!(again.files.is_empty());
        assert_eq!(
            secret,
            fs::read_to_string(data.token_secret()).expect("secret")
        );
        let renamed = data
            .init(&["hub.example.com".to_string()], Secrets::ALL)
            .expect("init");
        assert_eq!(renamed.files, vec![data.server_cert()]);
        data.read_token_secret().expect("secret parses");
    }
}

//! `hub devices add --cert DIR`: makes the device's ECDSA P-256 key pair here, has the hub
//! sign its public key (`POST /api/v1/devices/{id}/certificate`), and writes `ID.crt`,
//! `ID.key` (mode 0600) and the CA certificate `ca.crt` to DIR. The private key never leaves
//! this machine.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde_json::json;

use super::ops::encode;
use super::{ApiClient, CliError};

/// The files one issue wrote.
#[derive(Debug)]
pub struct Issued {
    /// The device certificate.
    pub cert: PathBuf,
    /// Its private key (0600).
    pub key: PathBuf,
    /// Until when it is valid, ms since the epoch.
    pub not_after_ms: u64,
}

/// Issues a certificate for `id`, valid for `ttl`, into `dir` (created if missing).
///
/// # Errors
/// Key generation, the API, or writing the files failed.
pub fn issue_into(api: &ApiClient, id: &str, dir: &Path, ttl: &str) -> Result<Issued, CliError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CliError::Usage(format!("cannot generate a key for {id}: {e}")))?;
    let v = api.post(
        &format!("/api/v1/devices/{}/certificate", encode(id)),
        &json!({"public_key": key.public_key_pem(), "ttl": ttl}),
    )?;
    let (Some(cert), Some(ca)) = (v["certificate"].as_str(), v["ca"].as_str()) else {
        return Err(CliError::Usage(format!(
            "the hub answered without a certificate: {v}"
        )));
    };
    let files = write_files(dir, id, cert, &key.serialize_pem(), ca)?;
    Ok(Issued {
        cert: files.0,
        key: files.1,
        not_after_ms: v["not_after"].as_u64().unwrap_or(0),
    })
}

/// Writes `DIR/ID.crt`, `DIR/ID.key` (0600, created so from the start: never readable by
/// others, not even for a moment) and `DIR/ca.crt`, each by a temporary file and a rename.
fn write_files(
    dir: &Path,
    id: &str,
    cert: &str,
    key: &str,
    ca: &str,
) -> Result<(PathBuf, PathBuf), CliError> {
    let failed = |path: &Path, e: std::io::Error| {
        CliError::Usage(format!("cannot write {}: {e}", path.display()))
    };
    fs::create_dir_all(dir).map_err(|e| failed(dir, e))?;
    let (cert_path, key_path) = (dir.join(format!("{id}.crt")), dir.join(format!("{id}.key")));
    for (path, text, mode) in [
        (&key_path, key, 0o600),
        (&cert_path, cert, 0o644),
        (&dir.join("ca.crt"), ca, 0o644),
    ] {
        let tmp = path.with_extension("tmp");
        let _ = fs::remove_file(&tmp);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| failed(&tmp, e))?;
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| failed(&tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| failed(path, e))?;
    }
    Ok((cert_path, key_path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_key_is_private_and_the_certificates_are_readable() {
        let dir = tempfile::tempdir().expect("dir");
        let out = dir.path().join("certs");
        let (cert, key) = write_files(&out, "dev-1", "CERT", "KEY", "CA").expect("write");
        let mode = |p: &Path| fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&key), 0o600);
        assert_eq!(mode(&cert), 0o644);
        assert_eq!(fs::read_to_string(out.join("ca.crt")).expect("ca"), "CA");
        // Again: replaced, still private.
        write_files(&out, "dev-1", "CERT2", "KEY2", "CA").expect("again");
        assert_eq!(fs::read_to_string(&key).expect("key"), "KEY2");
        assert_eq!(mode(&key), 0o600);
    }
}

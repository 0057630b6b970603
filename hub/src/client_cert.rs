//! Device client certificates, the second way in besides tokens: the CA that issues and
//! verifies them (the data directory's generated CA, or `tls.device_ca`), issuing one for a
//! device's public key, the rustls verifier of the device listener, and reading the
//! identity of a certificate that verifier accepted.
//!
//! A certificate stands for its device like a token: its subject CN is the device id, its
//! `notBefore` is its issue instant (so a revocation refuses every certificate and every
//! token of the device issued until then, by one rule), and its `notAfter` ends the
//! session as a token's expiry does.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo,
};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use schemas::limits::is_valid_device_id;
use x509_parser::time::ASN1Time;

use crate::token::Claims;

/// The URI subject alternative name a device certificate carries next to its CN, so that
/// tools that look only at SANs see which device it is.
pub fn device_uri(device_id: &str) -> String {
    format!("urn:hub:device:{device_id}")
}

/// Why a certificate could not be issued, loaded or read.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A CA file could not be read or holds no certificate.
    #[error("cannot read the device CA {path}: {detail}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// This hub has the CA's certificate but not its key, so it verifies but cannot issue.
    #[error("this hub has no key for its device CA (tls.device_ca is set without tls.device_ca_key), so it can verify device certificates but not issue them")]
    NoCaKey,
    /// The public key sent for signing is not a PEM SubjectPublicKeyInfo rcgen can sign.
    #[error("the public key is not a PEM public key (SubjectPublicKeyInfo) of a supported type (ECDSA P-256 or P-384, Ed25519, RSA): {0}")]
    PublicKey(String),
    /// Certificate generation or signing failed.
    #[error("cannot make the certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// rustls refused the CA as a trust anchor.
    #[error("the device CA is unusable as a trust anchor: {0}")]
    Verifier(String),
    /// The certificate does not parse.
    #[error("client certificate does not parse: {0}")]
    Parse(String),
    /// The certificate's subject has no CN.
    #[error("client certificate has no subject CN (it must be the device id)")]
    NoCommonName,
    /// The CN is not a valid device id.
    #[error("client certificate CN {0:?} is not a device id (1 to 64 of [A-Za-z0-9_.-])")]
    BadCommonName(String),
    /// The system random generator failed.
    #[error("the system random number generator failed")]
    Random,
}

/// The CA of device certificates: every certificate in its file is trusted, and the first
/// one, with its key, issues.
#[derive(Debug)]
pub struct DeviceCa {
    cert_pem: String,
    trusted: Vec<CertificateDer<'static>>,
    key_pem: Option<String>,
}

impl DeviceCa {
    /// Loads the CA from PEM files: `cert` (one or more certificates; the first is the
    /// issuer) and, to issue, `key` (the first certificate's private key).
    ///
    /// # Errors
    /// A file is unreadable, holds no certificate, or the key does not parse.
    pub fn load(cert: &Path, key: Option<&Path>) -> Result<DeviceCa, CertError> {
        let unreadable = |path: &Path, detail: String| CertError::CaFile {
            path: path.to_path_buf(),
            detail,
        };
        let cert_pem =
            std::fs::read_to_string(cert).map_err(|e| unreadable(cert, e.to_string()))?;
        let trusted: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(cert_pem.as_bytes())
                .collect::<Result<_, _>>()
                .map_err(|e| unreadable(cert, e.to_string()))?;
        if trusted.is_empty() {
            return Err(unreadable(cert, "no certificate in the file".into()));
        }
        let key_pem = match key {
            Some(path) => {
                let pem =
                    std::fs::read_to_string(path).map_err(|e| unreadable(path, e.to_string()))?;
                KeyPair::from_pem(&pem).map_err(|e| unreadable(path, e.to_string()))?;
                Some(pem)
            }
            None => None,
        };
        Ok(DeviceCa {
            cert_pem,
            trusted,
            key_pem,
        })
    }

    /// The CA certificate(s) in PEM, what devices are given next to their own certificate.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a client certificate for `device_id` over `public_key_pem` (a PEM
    /// SubjectPublicKeyInfo), valid from `not_before_s` to `not_after_s` (Unix seconds):
    /// CN and a `urn:hub:device:` URI SAN name the device, the extended key usage is
    /// clientAuth, the serial is random. Returns the certificate in PEM.
    ///
    /// # Errors
    /// No CA key here, a public key rcgen cannot use, or signing failed.
    pub fn issue(
        &self,
        device_id: &str,
        public_key_pem: &str,
        not_before_s: u64,
        not_after_s: u64,
    ) -> Result<String, CertError> {
        let key_pem = self.key_pem.as_deref().ok_or(CertError::NoCaKey)?;
        let ca_key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, ca_key)?;
        let public = SubjectPublicKeyInfo::from_pem(public_key_pem)
            .map_err(|e| CertError::PublicKey(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, device_id);
        params.subject_alt_names = vec![SanType::URI(device_uri(device_id).try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        params.not_before = timestamp(not_before_s)?.to_datetime();
        params.not_after = timestamp(not_after_s)?.to_datetime();
        let mut serial = [0u8; 16];
        SystemRandom::new()
            .fill(&mut serial)
            .map_err(|_| CertError::Random)?;
        // A positive integer: the top bit clear.
        serial[0] &= 0x7f;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        Ok(params.signed_by(&public, &issuer)?.pem())
    }

    /// The device listener's client-certificate verifier: a certificate must chain to this
    /// CA, be within its validity and allow clientAuth; a device that presents none is let
    /// through to the token check.
    ///
    /// # Errors
    /// rustls refused a CA certificate.
    pub fn verifier(&self) -> Result<Arc<dyn ClientCertVerifier>, CertError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in &self.trusted {
            roots
                .add(cert.clone())
                .map_err(|e| CertError::Verifier(e.to_string()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .allow_unauthenticated()
            .build()
            .map_err(|e| CertError::Verifier(e.to_string()))
    }
}

fn timestamp(secs: u64) -> Result<ASN1Time, CertError> {
    ASN1Time::from_timestamp(i64::try_from(secs).unwrap_or(i64::MAX))
        .map_err(|e| CertError::Parse(e.to_string()))
}

/// What a verified client certificate says, in the terms of a token: the CN is the
/// device, `notBefore` the issue instant, `notAfter` the expiry.
///
/// # Errors
/// The certificate does not parse, or its CN is missing or not a device id.
pub fn identity(cert: &CertificateDer<'_>) -> Result<Claims, CertError> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(cert).map_err(|e| CertError::Parse(e.to_string()))?;
    let cn = parsed
        .subject()
        .iter_common_name()
        .next()
        .ok_or(CertError::NoCommonName)?
        .as_str()
        .map_err(|e| CertError::Parse(e.to_string()))?;
    if !is_valid_device_id(cn) {
        return Err(CertError::BadCommonName(cn.chars().take(80).collect()));
    }
    let validity = parsed.validity();
    let seconds = |t: ASN1Time| u64::try_from(t.timestamp()).unwrap_or(0);
    Ok(Claims {
        device_id: cn.to_string(),
        issued_at_ms: seconds(validity.not_before).saturating_mul(1000),
        expires_at_s: seconds(validity.not_after),
    })
}

/// The `notBefore` (Unix seconds) of a certificate issued at `now_ms` for a device last
/// revoked at `revoked_at_ms`. Certificate times have whole seconds, and a revocation
/// refuses every certificate whose `notBefore` is at or before it; so a certificate issued
/// in the same second as a revocation (`hub devices remove` then `add --cert`) starts at the
/// next second instead of being born revoked.
pub fn not_before_s(now_ms: u64, revoked_at_ms: Option<u64>) -> u64 {
    let now_s = now_ms / 1000;
    match revoked_at_ms {
        Some(at) if at / 1000 >= now_s => at / 1000 + 1,
        _ => now_s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::Revocations;

    /// A CA in a temp dir, as the data directory makes it.
    fn ca(dir: &Path, name: &str) -> DeviceCa {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("ca");
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}-key.pem")),
        );
        std::fs::write(&c, cert.pem()).expect("write");
        std::fs::write(&k, key.serialize_pem()).expect("write");
        DeviceCa::load(&c, Some(&k)).expect("load")
    }

    fn der(pem: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(pem.as_bytes()).expect("pem")
    }

    #[test]
    fn an_issued_certificate_names_its_device_and_carries_its_validity() {
        let dir = tempfile::tempdir().expect("dir");
        let ca = ca(dir.path(), "ca");
        let device_key = KeyPair::generate().expect("key");
        let pem = ca
            .issue(
                "kitchen.temp-1",
                &device_key.public_key_pem(),
                1_700_000_000,
                1_800_000_000,
            )
            .expect("issue");
        let claims = identity(&der(&pem)).expect("identity");
        assert_eq!(
            claims,
            Claims {
                device_id: "kitchen.temp-1".into(),
                issued_at_ms: 1_700_000_000_000,
                expires_at_s: 1_800_000_000,
            }
        );
        let issued = der(&pem);
        let (_, parsed) = x509_parser::parse_x509_certificate(issued.as_ref()).expect("x509");
        let eku = parsed
            .extended_key_usage()
            .expect("eku")
            .expect("present")
            .value;
        assert!(eku.client_auth && !eku.server_auth);
        assert!(!parsed.is_ca());
        let san = format!("{:?}", parsed.subject_alternative_name());
        assert!(san.contains("urn:hub:device:kitchen.temp-1"), "{san}");
    }

    #[test]
    fn a_ca_without_its_key_verifies_but_does_not_issue_and_bad_keys_are_named() {
        let dir = tempfile::tempdir().expect("dir");
        let issuing = ca(dir.path(), "ca");
        let verify_only =
            DeviceCa::load(&dir.path().join("ca.pem"), None).expect("load without key");
        assert!(verify_only.verifier().is_ok());
        let key = KeyPair::generate().expect("key");
        assert!(matches!(
            verify_only.issue("d", &key.public_key_pem(), 0, 1),
            Err(CertError::NoCaKey)
        ));
        assert!(matches!(
            issuing.issue("d", "not a key", 0, 1),
            Err(CertError::PublicKey(_))
        ));
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").expect("write");
        assert!(matches!(
            DeviceCa::load(&empty, None),
            Err(CertError::CaFile { .. })
        ));
    }

    #[test]
    fn a_certificate_without_a_device_id_cn_has_no_identity() {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "x");
        let no_cn = params.self_signed(&key).expect("cert");
        assert!(matches!(
            identity(no_cn.der()),
            Err(CertError::NoCommonName)
        ));
        params
            .distinguished_name
            .push(DnType::CommonName, "not a device id");
        let bad = params.self_signed(&key).expect("cert");
        assert!(matches!(
            identity(bad.der()),
            Err(CertError::BadCommonName(_))
        ));
        assert!(matches!(
            identity(&CertificateDer::from(vec![1u8, 2, 3])),
            Err(CertError::Parse(_))
        ));
    }

    #[test]
    fn a_certificate_issued_after_a_revocation_is_not_revoked_by_it() {
        let mut revoked = Revocations::default();
        // Revoked at 12.500 s; a certificate issued in that same second starts at 13 s.
        revoked.insert("d", 12_500);
        for (now_ms, expect_s) in [(12_700, 13), (12_000, 13), (13_000, 13), (20_999, 20)] {
            let nb = not_before_s(now_ms, Some(12_500));
            assert_eq!(nb, expect_s, "issued at {now_ms}");
            let claims = Claims {
                device_id: "d".into(),
                issued_at_ms: nb * 1000,
                expires_at_s: u64::MAX,
            };
            assert!(!revoked.is_revoked(&claims), "issued at {now_ms}");
        }
        // Issued before the revocation: refused by it.
        let nb = not_before_s(11_900, None);
        let before = Claims {
            device_id: "d".into(),
            issued_at_ms: nb * 1000,
            expires_at_s: u64::MAX,
        };
        assert!(revoked.is_revoked(&before));
    }
}

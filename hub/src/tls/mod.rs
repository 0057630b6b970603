//! TLS for the device listener: rustls with the ring provider, TLS 1.2 and 1.3, from the
//! configured certificate and key or the ones generated in the data directory, asking
//! devices for an optional client certificate (`client_cert.rs`), and issuing session
//! tickets that outlive the process (`tickets.rs`).

pub mod tickets;

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::ClientCertVerifier;
use tokio_rustls::TlsAcceptor;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file could not be read or holds no certificate.
    #[error("cannot read certificate chain {path}: {detail}")]
    Certificate {
        /// The file.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// The key file could not be read or holds no private key.
    #[error("cannot read private key {path}: {detail}")]
    Key {
        /// The file.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// The session ticket secret could not be read or is too short.
    #[error("cannot use session ticket key {path}: {detail}")]
    TicketKey {
        /// The file.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// rustls refused the pair (a key that does not match the certificate, say).
    #[error("invalid certificate/key pair: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds the acceptor from PEM files. With `clients`, devices may present a client
/// certificate, which that verifier checks; without, none is asked for. With `tickets`,
/// TLS 1.3 devices get one session ticket per connection and resume with it; without,
/// only sessions still in this process's memory resume.
///
/// # Errors
/// The files are unreadable or do not form a valid certificate/key pair.
pub fn acceptor(
    cert: &Path,
    key: &Path,
    clients: Option<Arc<dyn ClientCertVerifier>>,
    tickets: Option<Arc<tickets::Tickets>>,
) -> Result<TlsAcceptor, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Certificate {
            path: cert.display().to_string(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Certificate {
            path: cert.display().to_string(),
            detail: "no certificate in file".into(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.display().to_string(),
        detail: e.to_string(),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let builder = match clients {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key)?;
    if let Some(tickets) = tickets {
        config.ticketer = tickets;
        // A device needs only the newest ticket: each resumed connection brings another.
        config.send_tls13_tickets = 1;
    }
    Ok(TlsAcceptor::from(Arc::new(config)))
}

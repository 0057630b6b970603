//! Opening the connection to the hub: TCP, TLS (rustls with the ring provider, trusting
//! only the configured CA, presenting the client certificate if one is configured), and
//! the WebSocket upgrade with the bearer token (if one is configured) and the
//! subprotocol; and turning each way that can fail into the session's
//! [`DisconnectCause`], so the session picks the right backoff.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use schemas::limits::MAX_MESSAGE_BYTES;
use schemas::link;
use schemas::session::DisconnectCause;
use schemas::Encoding;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::config::{HubConfig, TokenSource};

/// An open WebSocket to the hub.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why connecting failed.
#[derive(Debug, Clone)]
pub struct ConnectError {
    /// What the session should make of it.
    pub cause: DisconnectCause,
    /// For the log: what happened and, where it helps, what to do.
    pub detail: String,
}

impl ConnectError {
    fn failed(detail: impl Into<String>) -> ConnectError {
        ConnectError {
            cause: DisconnectCause::ConnectFailed,
            detail: detail.into(),
        }
    }

    fn refused(detail: impl Into<String>) -> ConnectError {
        ConnectError {
            cause: DisconnectCause::Refused,
            detail: detail.into(),
        }
    }
}

/// WebSocket limits: the protocol's 16 KiB messages, small buffers.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES))
        .write_buffer_size(0)
        .max_write_buffer_size(4 * MAX_MESSAGE_BYTES)
}

/// Why the TLS client configuration cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// `hub.tls` is on but no CA file is configured.
    #[error("hub.ca_file is not set")]
    NoCaFile,
    /// The CA file cannot be read or is not PEM.
    #[error("{}: {source}", .path.display())]
    Pem {
        /// The CA file.
        path: PathBuf,
        /// What reading it found.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate in the CA file is unusable as a trust anchor.
    #[error("{}: {source}", .path.display())]
    Certificate {
        /// The CA file.
        path: PathBuf,
        /// Why rustls refused it.
        #[source]
        source: rustls::Error,
    },
    /// The CA file holds no certificate.
    #[error("{}: no certificate in it", .path.display())]
    NoCertificate {
        /// The CA file.
        path: PathBuf,
    },
    /// The client certificate or its key cannot be read, or rustls refused the pair.
    #[error("client certificate {}: {detail}", .path.display())]
    ClientCert {
        /// The certificate or key file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// rustls refused its own default protocol versions (a build without them).
    #[error(transparent)]
    Protocols(rustls::Error),
}

/// A rustls client configuration trusting only the CA certificates in `hub.ca_file`, and
/// presenting `hub.cert_file` with `hub.key_file` when they are set.
///
/// # Errors
/// [`TlsConfigError`]: no CA file, or it cannot be read or holds no usable certificate; or
/// the client certificate or key cannot be read or do not belong together.
pub fn tls_config(hub: &HubConfig) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
    let Some(path) = &hub.ca_file else {
        return Err(TlsConfigError::NoCaFile);
    };
    let pem = |source| TlsConfigError::Pem {
        path: path.clone(),
        source,
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).map_err(pem)? {
        roots
            .add(cert.map_err(pem)?)
            .map_err(|source| TlsConfigError::Certificate {
                path: path.clone(),
                source,
            })?;
    }
    if roots.is_empty() {
        return Err(TlsConfigError::NoCertificate { path: path.clone() });
    }
    // ring only: enabling both rustls providers panics at run time (DESIGN.md).
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsConfigError::Protocols)?
        .with_root_certificates(roots);
    let config = match &hub.client_cert {
        None => builder.with_no_client_auth(),
        Some(client) => {
            let failed = |path: &PathBuf, detail: String| TlsConfigError::ClientCert {
                path: path.clone(),
                detail,
            };
            let chain = CertificateDer::pem_file_iter(&client.cert_file)
                .and_then(Iterator::collect::<Result<Vec<_>, _>>)
                .map_err(|e| failed(&client.cert_file, e.to_string()))?;
            let key = PrivateKeyDer::from_pem_file(&client.key_file)
                .map_err(|e| failed(&client.key_file, e.to_string()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| failed(&client.cert_file, e.to_string()))?
        }
    };
    Ok(Arc::new(config))
}

/// The TLS configuration for the next attempt: the one of the last attempt while the CA,
/// certificate and key files hold the same bytes, a new one when they changed (a replaced
/// CA file is picked up without a restart). Keeping it is what lets a reconnect resume
/// the TLS session with the hub's ticket instead of a full handshake, also after the hub
/// restarted: rustls resumes only under the configuration that verified the session.
///
/// # Errors
/// As [`tls_config`].
fn current_tls_config(hub: &HubConfig) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
    type Cached = Option<(Vec<Vec<u8>>, Arc<rustls::ClientConfig>)>;
    static LAST: std::sync::Mutex<Cached> = std::sync::Mutex::new(None);
    let files = [
        hub.ca_file.as_ref(),
        hub.client_cert.as_ref().map(|c| &c.cert_file),
        hub.client_cert.as_ref().map(|c| &c.key_file),
    ];
    // Unreadable files read as empty here; building the configuration says why.
    let inputs: Vec<Vec<u8>> = files
        .iter()
        .map(|f| {
            f.and_then(|path| std::fs::read(path).ok())
                .unwrap_or_default()
        })
        .collect();
    let mut last = LAST
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((seen, config)) = last.as_ref() {
        if *seen == inputs {
            return Ok(config.clone());
        }
    }
    let config = tls_config(hub)?;
    *last = Some((inputs, config.clone()));
    Ok(config)
}

/// Reads the token (the file again at every attempt, so a rotated token is picked up);
/// `None` when the client certificate alone identifies the device.
fn token(hub: &HubConfig) -> Result<Option<String>, ConnectError> {
    let Some(source) = &hub.token else {
        return Ok(None);
    };
    match source {
        TokenSource::Inline(t) => Ok(Some(t.clone())),
        TokenSource::File(path) => match std::fs::read_to_string(path) {
            Ok(t) if !t.trim().is_empty() => Ok(Some(t.trim().to_string())),
            Ok(_) => Err(ConnectError::refused(format!(
                "token file {} is empty",
                path.display()
            ))),
            Err(e) => Err(ConnectError::refused(format!(
                "cannot read token file {}: {e}",
                path.display()
            ))),
        },
    }
}

/// Connects, within `hub.connect_timeout` for the whole handshake.
///
/// # Errors
/// See [`ConnectError`]: HTTP 400/401/403 are [`DisconnectCause::Refused`] (retried
/// slowly), everything else [`DisconnectCause::ConnectFailed`].
pub async fn connect(hub: &HubConfig) -> Result<Ws, ConnectError> {
    match tokio::time::timeout(hub.connect_timeout, connect_inner(hub)).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::failed(format!(
            "no connection to {} within {}",
            hub.url,
            humantime::format_duration(hub.connect_timeout)
        ))),
    }
}

async fn connect_inner(hub: &HubConfig) -> Result<Ws, ConnectError> {
    let token = token(hub)?;
    let mut request = hub
        .url
        .as_str()
        .into_client_request()
        .map_err(|e| ConnectError::failed(format!("bad hub.url: {e}")))?;
    if let Some(token) = token {
        let auth = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            ConnectError::refused("the token has characters that cannot go in an HTTP header")
        })?;
        request.headers_mut().insert("authorization", auth);
    }
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static(hub.encoding.subprotocol()),
    );
    let tcp = TcpStream::connect((hub.host.as_str(), hub.port))
        .await
        .map_err(|e| {
            ConnectError::failed(format!("TCP connect to {}:{}: {e}", hub.host, hub.port))
        })?;
    let _ = tcp.set_nodelay(true);
    let stream = if hub.tls {
        let config = current_tls_config(hub).map_err(|e| ConnectError::failed(e.to_string()))?;
        let name = hub.server_name.as_deref().unwrap_or(&hub.host);
        let server_name = ServerName::try_from(name.to_string()).map_err(|_| {
            ConnectError::failed(format!("{name:?} is not a valid TLS server name"))
        })?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(server_name, tcp)
            .await
            .map_err(|e| {
                ConnectError::failed(format!(
                    "TLS with {}:{}: {e} (the hub's certificate must be signed by hub.ca_file and name {name:?})",
                    hub.host, hub.port
                ))
            })?;
        MaybeTlsStream::Rustls(tls)
    } else {
        MaybeTlsStream::Plain(tcp)
    };
    let (ws, response) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(ws_config()))
            .await
            .map_err(|e| handshake_error(hub, e))?;
    let chosen = response
        .headers()
        .get("sec-websocket-protocol")
        .and_then(|v| v.to_str().ok())
        .and_then(Encoding::from_subprotocol);
    if chosen != Some(hub.encoding) {
        return Err(ConnectError::refused(format!(
            "the hub did not accept subprotocol {}",
            hub.encoding.subprotocol()
        )));
    }
    Ok(ws)
}

fn handshake_error(hub: &HubConfig, err: tokio_tungstenite::tungstenite::Error) -> ConnectError {
    use tokio_tungstenite::tungstenite::Error;
    let Error::Http(response) = &err else {
        return ConnectError::failed(format!("WebSocket handshake with {}: {err}", hub.url));
    };
    let status = response.status().as_u16();
    let body = response
        .body()
        .as_ref()
        .map(|b| String::from_utf8_lossy(b).trim().to_string())
        .unwrap_or_default();
    let body = crate::process::cut(&body, 200).to_string();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(link::parse_retry_after);
    let cause = link::upgrade_refused(status, retry_after);
    let detail = match (status, cause) {
        (401 | 403, _) if hub.token.is_none() => format!(
            "the hub refused the client certificate (HTTP {status}: {body}); issue a new one with `hub devices add {} --cert DIR` and put it in hub.cert_file and hub.key_file",
            hub.device_id
        ),
        (401 | 403, _) => format!(
            "the hub refused the token (HTTP {status}: {body}); issue a new one with `hub token issue {}` and put it in the token file",
            hub.device_id
        ),
        (400, _) => format!(
            "the hub refused the request (HTTP 400: {body}); check hub.url and hub.encoding"
        ),
        (404, _) => format!(
            "the hub has no device endpoint at {} (HTTP 404); check hub.url (it ends in /v1/device)",
            hub.url
        ),
        (_, DisconnectCause::Unavailable { retry_after_ms }) => format!(
            "the hub is at its connection limit or shutting down (HTTP {status}); retrying after {} s",
            retry_after_ms / 1000
        ),
        _ => format!("the hub answered HTTP {status}: {body}"),
    };
    ConnectError { cause, detail }
}

/// How long a close handshake may take before the connection is just dropped.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TokenSource;
    use tokio_tungstenite::tungstenite::http::Response;
    use tokio_tungstenite::tungstenite::Error;

    fn hub() -> HubConfig {
        HubConfig {
            url: "wss://localhost:8443/v1/device".to_string(),
            host: "localhost".to_string(),
            port: 8443,
            tls: true,
            device_id: "pi-1".to_string(),
            token: Some(TokenSource::Inline("t".to_string())),
            client_cert: None,
            ca_file: None,
            server_name: None,
            encoding: Encoding::Postcard,
            connect_timeout: Duration::from_secs(1),
        }
    }

    fn http(status: u16, body: &str) -> Error {
        let mut resp = Response::new(Some(body.as_bytes().to_vec()));
        *resp.status_mut() =
            tokio_tungstenite::tungstenite::http::StatusCode::from_u16(status).expect("status");
        Error::Http(Box::new(resp))
    }

    #[test]
    fn ca_file_problems_are_named_with_the_file() {
        let mut h = hub();
        let err = tls_config(&h).expect_err("no CA file");
        assert!(matches!(err, TlsConfigError::NoCaFile));
        assert_eq!(err.to_string(), "hub.ca_file is not set");
        h.ca_file = Some(PathBuf::from("/nonexistent/ca.pem"));
        let err = tls_config(&h).expect_err("missing");
        assert!(matches!(err, TlsConfigError::Pem { .. }));
        assert!(
            err.to_string().starts_with("/nonexistent/ca.pem: "),
            "{err}"
        );
        h.ca_file = Some(PathBuf::from("/dev/null"));
        let err = tls_config(&h).expect_err("empty");
        assert!(matches!(err, TlsConfigError::NoCertificate { .. }));
        assert_eq!(err.to_string(), "/dev/null: no certificate in it");
    }

    #[test]
    fn refusals_are_slow_and_say_what_to_do() {
        let e = handshake_error(&hub(), http(401, "token expired"));
        assert_eq!(e.cause, DisconnectCause::Refused);
        assert!(e.detail.contains("HTTP 401: token expired"), "{}", e.detail);
        assert!(e.detail.contains("hub token issue pi-1"), "{}", e.detail);
        assert_eq!(
            handshake_error(&hub(), http(403, "")).cause,
            DisconnectCause::Refused
        );
        assert_eq!(
            handshake_error(&hub(), http(400, "supported: hub.v1.postcard")).cause,
            DisconnectCause::Refused
        );
        // Busy or shutting down: wait what the hub asks (5 s without a Retry-After).
        let e = handshake_error(&hub(), http(503, "busy"));
        assert_eq!(
            e.cause,
            DisconnectCause::Unavailable {
                retry_after_ms: 5_000
            }
        );
        // A wrong path: slow retries, and the log says to check hub.url.
        let e = handshake_error(&hub(), http(404, ""));
        assert_eq!(e.cause, DisconnectCause::Refused);
        assert!(e.detail.contains("check hub.url"), "{}", e.detail);
        assert_eq!(
            handshake_error(&hub(), Error::ConnectionClosed).cause,
            DisconnectCause::ConnectFailed
        );
    }

    #[tokio::test]
    async fn an_unreadable_token_file_is_a_refusal_not_a_crash() {
        let mut h = hub();
        h.token = Some(TokenSource::File("/nonexistent/token".into()));
        let e = connect(&h).await.expect_err("no token");
        assert_eq!(e.cause, DisconnectCause::Refused);
        assert!(e.detail.contains("cannot read token file"), "{}", e.detail);
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_failure() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        drop(listener);
        let mut h = hub();
        h.host = "127.0.0.1".to_string();
        h.port = port;
        let e = connect(&h).await.expect_err("refused");
        assert_eq!(e.cause, DisconnectCause::ConnectFailed);
    }
}

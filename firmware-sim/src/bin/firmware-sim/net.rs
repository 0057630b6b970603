//! The host's network for the no_std client: TCP + rustls (ring provider) presented as
//! `embedded_io_async::{Read, Write}`, a [`Connector`] that finds the hub, limits the
//! process-wide connect rate, and a tokio-backed [`Timer`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use firmware_sim::driver::{Connector, Timer};
use firmware_sim::Endpoint;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::image::ClientCertPem;

/// How long TCP connect plus the TLS handshake may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a TLS close_notify may take before the socket is just dropped.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a hub URL read from a file is reused before the file is read again.
const URL_FILE_TTL: Duration = Duration::from_millis(500);

/// A rustls client configuration that trusts only the certificates in `ca_pem` and, with
/// `client`, presents that client certificate (the board's TLS stack holding the
/// certificate and key from its flash).
///
/// # Errors
/// The PEM holds no certificate, or one rustls rejects; the client certificate or key do
/// not parse or do not belong together.
pub fn tls_config(
    ca_pem: &str,
    client: Option<&ClientCertPem>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.context("the CA file is not valid PEM")?;
        roots
            .add(cert)
            .context("the CA file holds a certificate rustls cannot use")?;
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "the CA file holds no certificate (expected PEM, like the hub's tls/ca.pem)"
    );
    // ring only: two providers in one process make rustls panic at run time.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_root_certificates(roots);
    let config = match client {
        None => config.with_no_client_auth(),
        Some(client) => {
            let chain = CertificateDer::pem_slice_iter(client.cert_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .context("the client certificate is not valid PEM")?;
            anyhow::ensure!(
                !chain.is_empty(),
                "the client certificate file holds no certificate"
            );
            let key = PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes())
                .context("the client key is not a PEM private key")?;
            config
                .with_client_auth_cert(chain, key)
                .context("the client certificate and key do not belong together")?
        }
    };
    Ok(Arc::new(config))
}

/// Where the hub is.
#[derive(Debug)]
pub enum HubTarget {
    /// A fixed URL.
    Fixed(String),
    /// A file holding the URL (a local hub's `DATA_DIR/device-url`), read again before
    /// connecting (at most every 500 ms), so that a hub restarted on a new port is found.
    File {
        /// The file.
        path: PathBuf,
        /// The last URL read and when.
        cache: Mutex<Option<(Instant, String)>>,
    },
}

impl HubTarget {
    /// A target that re-reads `path`.
    pub fn file(path: PathBuf) -> HubTarget {
        HubTarget::File {
            path,
            cache: Mutex::new(None),
        }
    }

    /// The URL to connect to now.
    async fn current(&self) -> Result<String, ConnectError> {
        match self {
            HubTarget::Fixed(url) => Ok(url.clone()),
            HubTarget::File { path, cache } => {
                if let Ok(guard) = cache.lock() {
                    if let Some((at, url)) = guard.as_ref() {
                        if at.elapsed() < URL_FILE_TTL {
                            return Ok(url.clone());
                        }
                    }
                }
                let url = tokio::fs::read_to_string(path)
                    .await
                    .map_err(|e| ConnectError::UrlFile(path.clone(), e))?
                    .trim()
                    .to_string();
                if let Ok(mut guard) = cache.lock() {
                    *guard = Some((Instant::now(), url.clone()));
                }
                Ok(url)
            }
        }
    }
}

/// Spreads connection attempts of the whole process: at most one per `interval`.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    next: Mutex<Instant>,
}

impl RateLimiter {
    /// At most `per_second` attempts per second (0: unlimited).
    pub fn new(per_second: u32) -> RateLimiter {
        let interval = if per_second == 0 {
            Duration::ZERO
        } else {
            Duration::from_secs(1) / per_second
        };
        RateLimiter {
            interval,
            next: Mutex::new(Instant::now()),
        }
    }

    /// Waits for this caller's slot. Each caller reserves the next free slot, so waiting
    /// callers are served in order without a queue.
    ///
    /// Cancel safety: dropping the future wastes the reserved slot, nothing else.
    pub async fn acquire(&self) {
        if self.interval.is_zero() {
            return;
        }
        let slot = {
            let now = Instant::now();
            let Ok(mut next) = self.next.lock() else {
                return;
            };
            let slot = (*next).max(now);
            *next = slot + self.interval;
            slot
        };
        tokio::time::sleep_until(slot).await;
    }
}

/// What every device's connector shares.
#[derive(Debug)]
pub struct NetShared {
    /// Where the hub is.
    pub target: HubTarget,
    /// The TLS configuration for wss (None: only ws is possible).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// The process-wide connect rate (shared by every device of the process).
    pub limiter: Arc<RateLimiter>,
    /// Failed connection attempts of every device of the process.
    pub failures: Arc<ConnectFailures>,
    /// Local addresses to connect from, in turn by device (empty: the kernel's choice).
    pub local_addrs: Vec<std::net::IpAddr>,
}

/// Failed connection attempts, counted for the summary and the exit status. A failed TLS
/// handshake is a configuration problem (the wrong CA, a certificate for another name, a
/// CA certificate served as the server's own) that retrying does not fix, so the first
/// one is reported on stderr at once.
#[derive(Debug, Default)]
pub struct ConnectFailures {
    tls: AtomicU64,
    other: AtomicU64,
    first_tls: Mutex<Option<String>>,
}

impl ConnectFailures {
    fn record(&self, err: &ConnectError) {
        let ConnectError::Tls(..) = err else {
            self.other.fetch_add(1, Ordering::Relaxed);
            return;
        };
        self.tls.fetch_add(1, Ordering::Relaxed);
        let Ok(mut first) = self.first_tls.lock() else {
            return;
        };
        if first.is_none() {
            let text = err.to_string();
            eprintln!("firmware-sim: {text} (devices keep retrying)");
            *first = Some(text);
        }
    }

    /// Failed TLS handshakes.
    pub fn tls(&self) -> u64 {
        self.tls.load(Ordering::Relaxed)
    }

    /// Other failed attempts (TCP, timeouts, the hub URL).
    pub fn other(&self) -> u64 {
        self.other.load(Ordering::Relaxed)
    }

    /// The first failed TLS handshake, in words.
    pub fn first_tls(&self) -> Option<String> {
        self.first_tls.lock().ok().and_then(|f| f.clone())
    }
}

/// What to do about a failed TLS handshake, for the ones people run into.
fn tls_hint(err: &std::io::Error) -> &'static str {
    use rustls::CertificateError as C;
    let Some(rustls::Error::InvalidCertificate(cert)) = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return "";
    };
    match cert {
        C::UnknownIssuer => {
            "; the hub's certificate is not signed by the CA this device trusts (--ca, or the CA flashed into the image)"
        }
        C::NotValidForName | C::NotValidForNameContext { .. } => {
            "; the certificate does not list this host name: connect by a name in its subjectAltName"
        }
        C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. } => {
            "; the certificate is outside its validity period (or this host's clock is wrong)"
        }
        // webpki's CaUsedAsEndEntity reaches rustls as an opaque `Other` error.
        C::Other(other) if format!("{other:?}").contains("CaUsedAsEndEntity") => {
            "; the server presents a CA certificate (CA:TRUE) as its own: give the server (nginx's ssl_certificate) a certificate signed by that CA, and the CA to the devices"
        }
        _ => "",
    }
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL file could not be read.
    #[error("cannot read the hub URL from {0}: {1}")]
    UrlFile(PathBuf, std::io::Error),
    /// The URL is invalid.
    #[error("invalid hub URL `{0}`: {1}")]
    Url(String, firmware_sim::EndpointError),
    /// wss without a CA.
    #[error("wss needs a CA certificate (flash the image with --ca, or pass --ca)")]
    NoCa,
    /// TCP or a timeout.
    #[error("connecting to {0}: {1}")]
    Io(String, std::io::Error),
    /// The TLS handshake failed (with a hint when the cause is a common one).
    #[error("TLS handshake with {0} failed: {1}{hint}", hint = tls_hint(.1))]
    Tls(String, std::io::Error),
}

/// The per-device connector: one per device task, sharing [`NetShared`].
#[derive(Debug)]
pub struct HostConnector {
    shared: Arc<NetShared>,
    /// The shared TLS configuration with this device's own session store, so that the
    /// device resumes with the ticket the hub gave it (as a board keeps its own session
    /// in RAM), not with one another device of the same process left behind.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// The local address this device connects from, if one was given.
    local: Option<std::net::IpAddr>,
    host: String,
    path: String,
}

impl HostConnector {
    /// A connector using `shared`, for the device at `index` (which picks its local
    /// address, if several were given).
    pub fn new(shared: Arc<NetShared>, index: usize) -> HostConnector {
        let local = match shared.local_addrs.len() {
            0 => None,
            n => Some(shared.local_addrs[index % n]),
        };
        let tls = shared.tls.as_ref().map(|config| {
            let mut own = rustls::ClientConfig::clone(config);
            // One server; the store keeps its newest tickets (each is used once).
            own.resumption = rustls::client::Resumption::store(Arc::new(
                rustls::client::ClientSessionMemoryCache::new(1),
            ));
            Arc::new(own)
        });
        HostConnector {
            shared,
            tls,
            local,
            host: String::new(),
            path: String::new(),
        }
    }
}

impl Connector for HostConnector {
    type Transport = HostTransport;
    type Error = ConnectError;

    async fn connect(&mut self) -> Result<HostTransport, ConnectError> {
        let opened = self.open().await;
        if let Err(err) = &opened {
            self.shared.failures.record(err);
        }
        opened
    }

    fn host(&self) -> &str {
        &self.host
    }

    fn path(&self) -> &str {
        &self.path
    }

    async fn disconnect(&mut self, mut transport: HostTransport) {
        // close_notify for TLS, FIN for TCP; bounded, a dead peer must not hold us.
        let _ = tokio::time::timeout(SHUTDOWN_TIMEOUT, transport.shutdown()).await;
    }
}

impl HostConnector {
    /// Opens TCP (and TLS for wss) to the hub.
    async fn open(&mut self) -> Result<HostTransport, ConnectError> {
        // The slot first: with thousands of devices the wait can be long, and the URL read
        // after it is the current one (a restarted local hub may have moved).
        self.shared.limiter.acquire().await;
        let url = self.shared.target.current().await?;
        let ep = Endpoint::parse(&url).map_err(|e| ConnectError::Url(url.clone(), e))?;
        self.host = ep.authority.to_string();
        self.path = ep.path.to_string();
        let io_err = |e: std::io::Error| ConnectError::Io(ep.authority.to_string(), e);
        let timed_out = || {
            ConnectError::Io(
                ep.authority.to_string(),
                std::io::ErrorKind::TimedOut.into(),
            )
        };
        let opened = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let tcp = match self.local {
                None => TcpStream::connect((ep.host, ep.port))
                    .await
                    .map_err(io_err)?,
                Some(local) => connect_from(local, ep.host, ep.port)
                    .await
                    .map_err(io_err)?,
            };
            // Small frames must leave at once, not wait for Nagle.
            tcp.set_nodelay(true).map_err(io_err)?;
            if !ep.secure {
                return Ok(HostTransport::Plain(tcp));
            }
            let tls = self.tls.clone().ok_or(ConnectError::NoCa)?;
            // The TLS name must be one of the certificate's SANs (localhost, 127.0.0.1).
            let name = ServerName::try_from(ep.host.to_string())
                .map_err(|_| ConnectError::Url(url.clone(), firmware_sim::EndpointError::Host))?;
            let stream = TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| ConnectError::Tls(ep.authority.to_string(), e))?;
            Ok(HostTransport::Tls(Box::new(stream)))
        })
        .await;
        opened.unwrap_or_else(|_| Err(timed_out()))
    }
}

/// TCP to `host:port` from the local address `local` (port chosen by the kernel).
async fn connect_from(
    local: std::net::IpAddr,
    host: &str,
    port: u16,
) -> std::io::Result<TcpStream> {
    let remote = tokio::net::lookup_host((host, port))
        .await?
        .find(|addr| addr.is_ipv4() == local.is_ipv4())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::AddrNotAvailable,
                format!("{host} has no address of the family of --ifaddr {local}"),
            )
        })?;
    let socket = match local {
        std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket.bind(std::net::SocketAddr::new(local, 0))?;
    socket.connect(remote).await
}

/// An open connection to the hub. The TLS stream is boxed so that an idle device's
/// future stays small.
#[derive(Debug)]
pub enum HostTransport {
    /// ws://
    Plain(TcpStream),
    /// wss://
    Tls(Box<TlsStream<TcpStream>>),
}

impl HostTransport {
    async fn shutdown(&mut self) -> std::io::Result<()> {
        match self {
            HostTransport::Plain(s) => s.shutdown().await,
            HostTransport::Tls(s) => s.shutdown().await,
        }
    }
}

impl embedded_io_async::ErrorType for HostTransport {
    type Error = std::io::Error;
}

impl embedded_io_async::Read for HostTransport {
    /// Cancel-safe: tokio's and tokio-rustls' `read` lose nothing when dropped.
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            HostTransport::Plain(s) => s.read(buf).await,
            HostTransport::Tls(s) => s.read(buf).await,
        }
    }
}

impl embedded_io_async::Write for HostTransport {
    async fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            HostTransport::Plain(s) => s.write(buf).await,
            HostTransport::Tls(s) => s.write(buf).await,
        }
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        match self {
            HostTransport::Plain(s) => s.flush().await,
            HostTransport::Tls(s) => s.flush().await,
        }
    }
}

/// Milliseconds since the process started, on tokio's clock.
#[derive(Debug, Clone, Copy)]
pub struct HostTimer {
    epoch: Instant,
}

impl HostTimer {
    /// A timer whose zero is now.
    pub fn new() -> HostTimer {
        HostTimer {
            epoch: Instant::now(),
        }
    }
}

impl Timer for HostTimer {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    async fn wait_until(&self, at_ms: u64) {
        tokio::time::sleep_until(self.epoch + Duration::from_millis(at_ms)).await;
    }
}

//! A minimal wss device client for tests: it sets the headers PROTOCOL.md asks for and
//! exchanges raw frames, so tests can send anything (including garbage).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use schemas::codec::{decode_json, decode_postcard, encode_json, encode_postcard_vec};
use schemas::message::truncated;
use schemas::{Ack, DeviceMessage, Hello, HubMessage};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

/// The stream type of a test client.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A rustls client configuration trusting only `ca`.
pub fn tls_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    Arc::new(client_config(ca).with_no_client_auth())
}

/// A rustls client configuration trusting only `ca` and presenting the client certificate
/// `cert` with its key `key` (PEM files).
pub fn tls_config_with_cert(ca: &Path, cert: &Path, key: &Path) -> Arc<rustls::ClientConfig> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .expect("read certificate")
        .map(|c| c.expect("certificate"))
        .collect();
    let key = PrivateKeyDer::from_pem_file(key).expect("read key");
    Arc::new(
        client_config(ca)
            .with_client_auth_cert(chain, key)
            .expect("certificate and key"),
    )
}

fn client_config(
    ca: &Path,
) -> rustls::ConfigBuilder<rustls::ClientConfig, rustls::client::WantsClientCert> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("read CA") {
        roots.add(cert.expect("CA cert")).expect("add CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
}

/// Opens a WebSocket to `url` with an optional bearer token and subprotocol header.
///
/// # Errors
/// The handshake failed (an HTTP error status shows up as `Error::Http`).
pub async fn connect(
    url: &str,
    ca: &Path,
    token: Option<&str>,
    subprotocol: Option<&str>,
) -> Result<Ws, Box<tokio_tungstenite::tungstenite::Error>> {
    connect_with(url, tls_config(ca), token, subprotocol).await
}

/// [`connect`] with a TLS configuration of the caller's (a client certificate, say).
///
/// # Errors
/// The handshake failed (an HTTP error status shows up as `Error::Http`).
pub async fn connect_with(
    url: &str,
    tls: Arc<rustls::ClientConfig>,
    token: Option<&str>,
    subprotocol: Option<&str>,
) -> Result<Ws, Box<tokio_tungstenite::tungstenite::Error>> {
    let mut req = url.into_client_request().map_err(Box::new)?;
    if let Some(t) = token {
        req.headers_mut().insert(
            "authorization",
            HeaderValue::from_str(&format!("Bearer {t}")).expect("header"),
        );
    }
    if let Some(p) = subprotocol {
        req.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_str(p).expect("header"),
        );
    }
    let connector = Connector::Rustls(tls);
    let (ws, _resp) =
        tokio_tungstenite::connect_async_tls_with_config(req, None, false, Some(connector))
            .await
            .map_err(Box::new)?;
    Ok(ws)
}

/// The HTTP status of a refused handshake, with its body.
pub fn refusal(err: &tokio_tungstenite::tungstenite::Error) -> Option<(u16, String)> {
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => Some((
            resp.status().as_u16(),
            resp.body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).into_owned())
                .unwrap_or_default(),
        )),
        _ => None,
    }
}

/// A client frame as RFC 6455 5.2 lays it out, masked (as a client must), built by hand
/// so that tests can send what a WebSocket library refuses to: text that is not UTF-8, a
/// close reason that is not UTF-8, fragments. `opcode` is the 4-bit opcode (1 text, 2
/// binary, 0 continuation, 8 close).
pub fn masked_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
    let mut frame = vec![if fin { 0x80 } else { 0 } | (opcode & 0x0f)];
    match payload.len() {
        n @ 0..=125 => frame.push(0x80 | n as u8),
        n @ 126..=0xffff => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&MASK);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    frame
}

/// How long the helpers below wait for the hub.
const WAIT: Duration = Duration::from_secs(10);

/// A `Hello` with this firmware version and no capabilities.
pub fn hello(firmware: &str) -> DeviceMessage {
    DeviceMessage::Hello(Hello {
        firmware: truncated(firmware),
        capabilities: heapless::Vec::new(),
        last_acked_seq: 0,
    })
}

/// Connects `device` to `hub` with a fresh token, says hello (firmware `test-1`), and
/// returns the device and `Welcome::last_seq`.
pub async fn welcomed(hub: &crate::Hub, device: &str, json: bool) -> (Device, u64) {
    let mut d = Device::connect(&hub.device_url, &hub.ca(), &hub.token(device), json).await;
    d.send(&hello("test-1")).await;
    match d.expect(WAIT).await {
        HubMessage::Welcome(w) => (d, w.last_seq),
        other => panic!("expected welcome, got {other:?}"),
    }
}

/// A device speaking one encoding.
pub struct Device {
    /// The socket.
    pub ws: Ws,
    /// Whether it speaks JSON (otherwise postcard).
    pub json: bool,
}

/// What came back from the hub.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Received {
    /// A protocol message.
    Message(HubMessage),
    /// The hub closed the connection with this code and reason.
    Closed(u16, String),
    /// The stream ended without a close frame.
    Ended,
}

impl Device {
    /// Connects with `hub.v1.json` or `hub.v1.postcard`.
    pub async fn connect(url: &str, ca: &Path, token: &str, json: bool) -> Device {
        let proto = if json {
            "hub.v1.json"
        } else {
            "hub.v1.postcard"
        };
        let ws = connect(url, ca, Some(token), Some(proto))
            .await
            .expect("connect");
        Device { ws, json }
    }

    /// Sends a message in this device's encoding.
    pub async fn send(&mut self, msg: &DeviceMessage) {
        let frame = if self.json {
            Message::text(encode_json(msg))
        } else {
            Message::binary(encode_postcard_vec(msg))
        };
        self.ws.send(frame).await.expect("send");
    }

    /// Sends a raw frame.
    pub async fn send_raw(&mut self, frame: Message) {
        self.ws.send(frame).await.expect("send raw");
    }

    /// Writes bytes straight to the stream under the WebSocket, for frames no WebSocket
    /// library would send (see [`masked_frame`]).
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        use tokio::io::AsyncWriteExt;
        let stream = self.ws.get_mut();
        stream.write_all(bytes).await.expect("write raw bytes");
        stream.flush().await.expect("flush raw bytes");
    }

    /// The next protocol message or the close, skipping pings and pongs (pongs are sent
    /// automatically); panics after `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Received {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("timed out waiting for the hub");
            match next {
                Some(Ok(Message::Text(t))) => {
                    return Received::Message(decode_json(t.as_str()).expect("hub json"))
                }
                Some(Ok(Message::Binary(b))) => {
                    return Received::Message(decode_postcard(&b).expect("hub postcard"))
                }
                Some(Ok(Message::Close(frame))) => {
                    let (code, reason) = frame
                        .map(|CloseFrame { code, reason }| (u16::from(code), reason.to_string()))
                        .unwrap_or((1005, String::new()));
                    return Received::Closed(code, reason);
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Received::Ended,
            }
        }
    }

    /// Receives and expects a message.
    pub async fn expect(&mut self, timeout: Duration) -> HubMessage {
        match self.recv(timeout).await {
            Received::Message(m) => m,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// Waits for an `Ack` covering `seq` (skipping smaller acks and commands); returns
    /// its `up_to_seq`.
    pub async fn wait_ack(&mut self, seq: u64) -> u64 {
        loop {
            match self.expect(WAIT).await {
                HubMessage::Ack(Ack { up_to_seq }) if up_to_seq >= seq => return up_to_seq,
                HubMessage::Ack(_) | HubMessage::Command(_) => continue,
                other => panic!("expected ack, got {other:?}"),
            }
        }
    }

    /// Receives and expects a close; returns its code.
    pub async fn expect_close(&mut self, timeout: Duration) -> (u16, String) {
        loop {
            match self.recv(timeout).await {
                Received::Closed(code, reason) => return (code, reason),
                Received::Message(_) => continue,
                Received::Ended => panic!("stream ended without a close frame"),
            }
        }
    }
}

//! The WebSocket link under the firmware client: the HTTP upgrade request and response,
//! frames in and out (embedded-websocket), the rx and tx buffers the driver reads into and
//! writes from, and the control frames (pong, close echo) that need no decision from above.
//!
//! Sans-io and allocation-free like the client. It deals in bytes and frames, not
//! messages: the [`Client`](crate::Client) encodes what it sends, decodes what arrives
//! (with `schemas::link`'s classification), and decides when to upgrade, close or give up.
//! The link never changes its own phase: it is told what to do and reports what it found.
//!
//! | call                       | when                                          | result |
//! |----------------------------|-----------------------------------------------|--------|
//! | [`Link::start_upgrade`]    | the transport is open                         | the request waits in [`Link::pending_tx`] |
//! | [`Link::accept_upgrade`]   | bytes arrived while upgrading                 | [`Upgrade`] |
//! | [`Link::receive`]          | bytes arrived on an open link                 | [`Incoming`]; pings are answered here |
//! | [`Link::send`]             | a message is encoded                          | a binary frame queued |
//! | [`Link::close`]            | the client closes                             | a close frame queued (if the link is open) |
//! | [`Link::drop_input`] / [`Link::drop_output`] | the transport is gone, or nothing more is read | buffered bytes discarded |

use core::fmt::Debug;

use embedded_websocket::{
    Error as WsError, WebSocketClient, WebSocketCloseStatusCode, WebSocketKey, WebSocketOptions,
    WebSocketReceiveMessageType, WebSocketSendMessageType, WebSocketState,
};
use heapless::String;
use rand_core::RngCore;
use schemas::close;
use schemas::codec::SUBPROTOCOL_POSTCARD;
use schemas::link::{self as classify, DataFrame};
use schemas::session::DisconnectCause;

use crate::rng::MaskRng;

/// Smallest transmit buffer: the HTTP upgrade request (built in a 1 KiB buffer by
/// embedded-websocket), or a full command result frame plus a control frame.
pub const MIN_TX_BUFFER: usize = 1280;
/// Smallest receive buffer: the hub's `101` response and any v1 hub message.
pub const MIN_RX_BUFFER: usize = 768;
/// Longest token accepted, so that the upgrade request stays within embedded-websocket's
/// 1 KiB request buffer (hub tokens are about 170 bytes).
pub const MAX_TOKEN_LEN: usize = 384;
/// Longest host name (with port) for the `Host` header.
pub const MAX_HOST_LEN: usize = 253;
/// Longest request path.
pub const MAX_PATH_LEN: usize = 128;
/// WebSocket frame overhead of a client frame: 2-byte header, 2 extended length bytes
/// (payloads of 126..65535 bytes), 4 mask bytes.
pub const FRAME_OVERHEAD: usize = 8;

/// The largest header a client frame can have: 2 bytes, 8 extended length bytes, 4 mask
/// bytes. [`Link::frame_fits`] counts with it, so that the answer holds for any payload.
const MAX_FRAME_OVERHEAD: usize = 14;
/// Room kept free for a pong or close frame (125-byte payload + 6).
const CONTROL_RESERVE: usize = 131;

/// A buffer, token, host or path the link cannot use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.reason())]
pub enum LinkConfigError {
    /// The rx buffer is smaller than [`MIN_RX_BUFFER`].
    RxBuffer,
    /// The tx buffer is smaller than [`MIN_TX_BUFFER`].
    TxBuffer,
    /// The token is longer than [`MAX_TOKEN_LEN`].
    Token,
    /// The host is empty or longer than [`MAX_HOST_LEN`].
    Host,
    /// The path does not start with `/` or is longer than [`MAX_PATH_LEN`].
    Path,
    /// The upgrade request does not fit embedded-websocket's 1 KiB request buffer.
    RequestTooLong,
}

impl LinkConfigError {
    /// The explanation, as a static string (for [`crate::ClientError::Config`]).
    pub fn reason(self) -> &'static str {
        match self {
            LinkConfigError::RxBuffer => "rx buffer is smaller than MIN_RX_BUFFER",
            LinkConfigError::TxBuffer => "tx buffer is smaller than MIN_TX_BUFFER",
            LinkConfigError::Token => "token is longer than 384 bytes",
            LinkConfigError::Host => "host is empty or longer than 253 bytes",
            LinkConfigError::Path => "path does not start with '/' or is longer than 128 bytes",
            LinkConfigError::RequestTooLong => {
                "the upgrade request does not fit 1 KiB (host, path or token too long)"
            }
        }
    }
}

/// A frame that does not fit the transmit buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a {len}-byte frame does not fit the {capacity}-byte transmit buffer")]
pub struct FrameTooLarge {
    /// Frame size.
    pub len: usize,
    /// Buffer size.
    pub capacity: usize,
}

/// What the hub's answer to the upgrade request says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upgrade {
    /// The response is not complete yet: read more.
    Pending,
    /// `101` with the `hub.v1.postcard` subprotocol: frames follow.
    Accepted,
    /// Refused (an HTTP status other than 101, a malformed or oversized response, or a
    /// `101` without our subprotocol, whose hub would expect another encoding). Nothing is
    /// left to write: drop the transport.
    Refused {
        /// What the refusal means for the session (`schemas::link::upgrade_refused`).
        cause: DisconnectCause,
        /// The HTTP status, when the response had one other than 101.
        http_status: Option<u16>,
    },
}

/// What [`Link::receive`] found in the rx buffer.
#[derive(Debug, Clone, Copy)]
pub enum Incoming<'p> {
    /// No complete frame is buffered: read more.
    Nothing,
    /// A data message, its payload in the caller's buffer.
    Data(DataFrame<'p>),
    /// A ping (answered with a pong when there was room; the hub pings again otherwise) or
    /// a pong. A sign of life only.
    Control,
    /// The peer closed: the echo of its close frame is queued; drop the transport once it
    /// is written.
    PeerClosed(DisconnectCause),
    /// The peer answered a close frame this side sent.
    CloseCompleted,
    /// A frame the link cannot take (too big, fragmented, broken framing): the rest of the
    /// input is dropped; close with `code`.
    Refused {
        /// The close code to send.
        code: u16,
        /// Why, for the close frame.
        reason: &'static str,
    },
}

/// The WebSocket end of one device: the embedded-websocket client, its upgrade key, the
/// token for the upgrade request (empty: none is sent, and the device identifies itself by
/// the TLS client certificate its transport presents), and the rx and tx buffers lent by
/// the caller.
pub struct Link<'a> {
    ws: WebSocketClient<MaskRng>,
    /// The key of the upgrade request in flight (the response must echo its hash).
    key: WebSocketKey,
    token: &'a str,
    rx: &'a mut [u8],
    rx_len: usize,
    tx: &'a mut [u8],
    tx_start: usize,
    tx_end: usize,
}

impl Debug for Link<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Link")
            .field("state", &self.ws.state)
            .field("rx_buffered", &self.rx_len)
            .field("tx_pending", &(self.tx_end - self.tx_start))
            .finish_non_exhaustive()
    }
}

impl<'a> Link<'a> {
    /// A link over the lent buffers, not yet upgraded. Its masking generator is seeded
    /// from `rng` (one `u64`), and again at every [`Link::start_upgrade`].
    ///
    /// # Errors
    /// [`LinkConfigError::RxBuffer`] / [`LinkConfigError::TxBuffer`] when a buffer is
    /// smaller than [`MIN_RX_BUFFER`] / [`MIN_TX_BUFFER`], [`LinkConfigError::Token`] when
    /// the token is longer than [`MAX_TOKEN_LEN`].
    pub fn new(
        rx: &'a mut [u8],
        tx: &'a mut [u8],
        token: &'a str,
        rng: &mut impl RngCore,
    ) -> Result<Link<'a>, LinkConfigError> {
        if rx.len() < MIN_RX_BUFFER {
            return Err(LinkConfigError::RxBuffer);
        }
        if tx.len() < MIN_TX_BUFFER {
            return Err(LinkConfigError::TxBuffer);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(LinkConfigError::Token);
        }
        Ok(Link {
            ws: WebSocketClient::new_client(MaskRng::new(rng.next_u64())),
            key: WebSocketKey::new(),
            token,
            rx,
            rx_len: 0,
            tx,
            tx_start: 0,
            tx_end: 0,
        })
    }

    /// Starts a connection on a freshly opened transport: forgets the previous one
    /// (buffers, WebSocket state), reseeds the masking generator from `rng`, and queues the
    /// upgrade request (`GET path`, `Host: host`, the bearer token unless it is empty,
    /// subprotocol `hub.v1.postcard`).
    ///
    /// # Errors
    /// [`LinkConfigError::Host`] / [`LinkConfigError::Path`] when `host` or `path` are
    /// empty, malformed or too long (nothing is changed then);
    /// [`LinkConfigError::RequestTooLong`] when the request does not fit 1 KiB.
    pub fn start_upgrade(
        &mut self,
        rng: &mut impl RngCore,
        host: &str,
        path: &str,
    ) -> Result<(), LinkConfigError> {
        if host.is_empty() || host.len() > MAX_HOST_LEN {
            return Err(LinkConfigError::Host);
        }
        if !path.starts_with('/') || path.len() > MAX_PATH_LEN {
            return Err(LinkConfigError::Path);
        }
        let mut auth: String<{ 22 + MAX_TOKEN_LEN }> = String::new();
        // Cannot fail: the token length was checked in `new`.
        let _ = auth.push_str("Authorization: Bearer ");
        let _ = auth.push_str(self.token);
        let headers = [auth.as_str()];
        let protocols = [SUBPROTOCOL_POSTCARD];
        let options = WebSocketOptions {
            path,
            host,
            origin: "null",
            sub_protocols: Some(&protocols),
            additional_headers: (!self.token.is_empty()).then_some(&headers[..]),
        };
        self.ws = WebSocketClient::new_client(MaskRng::new(rng.next_u64()));
        self.drop_input();
        self.drop_output();
        // The request is at most 1 KiB (embedded-websocket builds it in a 1 KiB string and
        // fails cleanly beyond), and the tx buffer is at least MIN_TX_BUFFER.
        let (len, key) = self
            .ws
            .client_connect(&options, self.tx)
            .map_err(|_| LinkConfigError::RequestTooLong)?;
        self.tx_end = len;
        self.key = key;
        Ok(())
    }

    /// Reads the hub's response to the upgrade request from the rx buffer. Call it after
    /// [`Link::start_upgrade`] whenever bytes arrived, until it is not
    /// [`Upgrade::Pending`]. Frames that follow the response stay buffered for
    /// [`Link::receive`].
    pub fn accept_upgrade(&mut self) -> Upgrade {
        match self.ws.client_accept(&self.key, &self.rx[..self.rx_len]) {
            Ok((used, protocol)) => {
                self.consume_rx(used);
                self.drop_output();
                if protocol.as_deref() == Some(SUBPROTOCOL_POSTCARD) {
                    Upgrade::Accepted
                } else {
                    Upgrade::Refused {
                        cause: DisconnectCause::Refused,
                        http_status: None,
                    }
                }
            }
            Err(WsError::HttpHeaderIncomplete) if self.rx_len < self.rx.len() => Upgrade::Pending,
            Err(err) => {
                let http_status = match err {
                    WsError::HttpResponseCodeInvalid(status) => status,
                    _ => None,
                };
                // embedded-websocket does not hand over the Retry-After header; the
                // shared rule then waits the default (5 s) after a 503.
                let cause = http_status.map_or(DisconnectCause::ConnectFailed, |status| {
                    classify::upgrade_refused(status, None)
                });
                self.drop_input();
                self.drop_output();
                Upgrade::Refused { cause, http_status }
            }
        }
    }

    /// Takes the next complete frame out of the rx buffer, if there is one. A data
    /// frame's payload is unmasked into `payload`, which also bounds the payload size
    /// accepted. Pings are answered (a pong queued) and a peer's close echoed here.
    pub fn receive<'p>(&mut self, payload: &'p mut [u8]) -> Incoming<'p> {
        const TOO_BIG: &str = "frame larger than the device's buffer";
        let (frame_len, payload_len) = match frame_size(&self.rx[..self.rx_len]) {
            FrameSize::Incomplete if self.rx_len < self.rx.len() => return Incoming::Nothing,
            FrameSize::Incomplete => return self.refuse(close::TOO_BIG, TOO_BIG),
            FrameSize::Complete {
                frame_len,
                payload_len,
            } => (frame_len, payload_len),
        };
        if frame_len > self.rx.len() || payload_len > payload.len() {
            return self.refuse(close::TOO_BIG, TOO_BIG);
        }
        if frame_len > self.rx_len {
            return Incoming::Nothing;
        }
        let read = self.ws.read(&self.rx[..frame_len], payload);
        self.consume_rx(frame_len);
        let Ok(read) = read else {
            return self.refuse(close::PROTOCOL_ERROR, "bad websocket frame");
        };
        let payload: &'p [u8] = payload;
        let payload = &payload[..read.len_to];
        match read.message_type {
            WebSocketReceiveMessageType::Binary if !read.end_of_message => {
                self.refuse(close::TOO_BIG, "fragmented messages are not supported")
            }
            WebSocketReceiveMessageType::Binary => Incoming::Data(DataFrame::Binary(payload)),
            // Refused by the decoder whatever it holds: this client speaks postcard only.
            WebSocketReceiveMessageType::Text => Incoming::Data(DataFrame::Text(
                core::str::from_utf8(payload).unwrap_or_default(),
            )),
            WebSocketReceiveMessageType::Ping => {
                self.queue_control(WebSocketSendMessageType::Pong, payload);
                Incoming::Control
            }
            WebSocketReceiveMessageType::Pong => Incoming::Control,
            WebSocketReceiveMessageType::CloseMustReply => {
                let cause = classify::peer_closed(classify::close_code(payload));
                // Echo the close; the client drops the transport once it is written.
                self.queue_control(
                    WebSocketSendMessageType::CloseReply,
                    &payload[..payload.len().min(2)],
                );
                Incoming::PeerClosed(cause)
            }
            WebSocketReceiveMessageType::CloseCompleted => Incoming::CloseCompleted,
        }
    }

    /// Drops the input and reports a frame the link refuses.
    fn refuse(&mut self, code: u16, reason: &'static str) -> Incoming<'static> {
        self.drop_input();
        Incoming::Refused { code, reason }
    }

    /// Whether a data frame with a payload of up to `payload_len` bytes may be queued now
    /// without crowding out a control frame: always when nothing is queued.
    pub fn can_queue(&mut self, payload_len: usize) -> bool {
        self.compact_tx();
        let free = self.tx.len() - self.tx_end;
        self.tx_end == 0 || free >= payload_len + FRAME_OVERHEAD + CONTROL_RESERVE
    }

    /// Whether a frame with a payload of `payload_len` bytes fits the tx buffer at all.
    pub fn frame_fits(&self, payload_len: usize) -> bool {
        payload_len + MAX_FRAME_OVERHEAD <= self.tx.len()
    }

    /// The size of the tx buffer.
    pub fn tx_capacity(&self) -> usize {
        self.tx.len()
    }

    /// Queues `payload` as one binary frame.
    ///
    /// # Errors
    /// [`FrameTooLarge`] when the frame does not fit the free part of the tx buffer
    /// (nothing is queued then).
    pub fn send(&mut self, payload: &[u8]) -> Result<(), FrameTooLarge> {
        self.compact_tx();
        let n = self
            .ws
            .write(
                WebSocketSendMessageType::Binary,
                true,
                payload,
                &mut self.tx[self.tx_end..],
            )
            .map_err(|_| FrameTooLarge {
                len: payload.len() + FRAME_OVERHEAD,
                capacity: self.tx.len(),
            })?;
        self.tx_end += n;
        Ok(())
    }

    /// Queues a close frame with `code` and `reason` (none when empty) if the WebSocket is
    /// open; otherwise (still upgrading, already closing) there is nothing to say.
    pub fn close(&mut self, code: u16, reason: &str) {
        if self.ws.state != WebSocketState::Open {
            return;
        }
        self.compact_tx();
        let reason = if reason.is_empty() {
            None
        } else {
            Some(reason)
        };
        let free = &mut self.tx[self.tx_end..];
        if let Ok(n) = self
            .ws
            .close(WebSocketCloseStatusCode::Custom(code), reason, free)
        {
            self.tx_end += n;
        }
    }

    /// Appends a control frame if there is room; one that does not fit is dropped.
    fn queue_control(&mut self, kind: WebSocketSendMessageType, payload: &[u8]) {
        self.compact_tx();
        let free = &mut self.tx[self.tx_end..];
        if let Ok(n) = self.ws.write(kind, true, payload, free) {
            self.tx_end += n;
        }
    }

    /// The bytes to write next.
    pub fn pending_tx(&self) -> &[u8] {
        &self.tx[self.tx_start..self.tx_end]
    }

    /// `n` bytes of [`Link::pending_tx`] were written.
    pub fn tx_written(&mut self, n: usize) {
        self.tx_start = (self.tx_start + n).min(self.tx_end);
        if self.tx_start == self.tx_end {
            self.drop_output();
        }
    }

    /// Where the driver reads incoming bytes to.
    pub fn rx_space(&mut self) -> &mut [u8] {
        &mut self.rx[self.rx_len..]
    }

    /// `n` bytes were read into [`Link::rx_space`].
    pub fn rx_filled(&mut self, n: usize) {
        self.rx_len = (self.rx_len + n).min(self.rx.len());
    }

    /// Discards the bytes read and not yet taken.
    pub fn drop_input(&mut self) {
        self.rx_len = 0;
    }

    /// Discards the bytes not yet written.
    pub fn drop_output(&mut self) {
        self.tx_start = 0;
        self.tx_end = 0;
    }

    fn compact_tx(&mut self) {
        if self.tx_start > 0 {
            self.tx.copy_within(self.tx_start..self.tx_end, 0);
            self.tx_end -= self.tx_start;
            self.tx_start = 0;
        }
    }

    fn consume_rx(&mut self, used: usize) {
        let used = used.min(self.rx_len);
        self.rx.copy_within(used..self.rx_len, 0);
        self.rx_len -= used;
    }
}

enum FrameSize {
    Incomplete,
    Complete {
        frame_len: usize,
        payload_len: usize,
    },
}

/// Reads just enough of a frame header to know whether the whole frame is buffered;
/// decoding is embedded-websocket's job.
fn frame_size(bytes: &[u8]) -> FrameSize {
    let [_, b1, rest @ ..] = bytes else {
        return FrameSize::Incomplete;
    };
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    let (payload_len, ext) = match b1 & 0x7F {
        126 => match rest {
            [a, b, ..] => (usize::from(u16::from_be_bytes([*a, *b])), 2),
            _ => return FrameSize::Incomplete,
        },
        127 => match rest.get(..8) {
            Some(b) => {
                let mut be = [0u8; 8];
                be.copy_from_slice(b);
                (
                    usize::try_from(u64::from_be_bytes(be)).unwrap_or(usize::MAX),
                    8,
                )
            }
            None => return FrameSize::Incomplete,
        },
        n => (usize::from(n), 0),
    };
    FrameSize::Complete {
        frame_len: (2 + ext + mask as usize).saturating_add(payload_len),
        payload_len,
    }
}

#[cfg(test)]
mod tests {
    use embedded_websocket::{WebSocketServer, WebSocketSubProtocol};

    use super::*;
    use crate::rng::MaskRng;

    /// The hub's answer to the link's pending upgrade request, with `protocol` (if any).
    fn answer(link: &Link<'_>, protocol: Option<&str>) -> (WebSocketServer, [u8; 512], usize) {
        let request = core::str::from_utf8(link.pending_tx()).expect("utf8 request");
        assert!(
            request.starts_with("GET /v1/device HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request.contains("\r\nAuthorization: Bearer tok\r\n"),
            "{request}"
        );
        let key = request
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .expect("key");
        let mut hub = WebSocketServer::new_server();
        let proto = protocol.map(WebSocketSubProtocol::from);
        let mut response = [0u8; 512];
        let n = hub
            .server_accept(&WebSocketKey::from(key), proto.as_ref(), &mut response)
            .expect("accept");
        (hub, response, n)
    }

    fn deliver(link: &mut Link<'_>, bytes: &[u8]) {
        link.rx_space()[..bytes.len()].copy_from_slice(bytes);
        link.rx_filled(bytes.len());
    }

    fn start<'a>(rx: &'a mut [u8], tx: &'a mut [u8]) -> Link<'a> {
        let mut rng = MaskRng::new(5);
        let mut link = Link::new(rx, tx, "tok", &mut rng).expect("link");
        link.start_upgrade(&mut rng, "hub.test", "/v1/device")
            .expect("request");
        link
    }

    #[test]
    fn buffers_token_host_and_path_are_checked() {
        let mut rng = MaskRng::new(1);
        let (mut rx, mut tx) = ([0u8; MIN_RX_BUFFER], [0u8; MIN_TX_BUFFER]);
        let err = Link::new(&mut rx[..100], &mut tx, "tok", &mut rng).expect_err("small rx");
        assert_eq!(err, LinkConfigError::RxBuffer);
        let err = Link::new(&mut rx, &mut tx[..100], "tok", &mut rng).expect_err("small tx");
        assert_eq!(err, LinkConfigError::TxBuffer);
        let long = "t".repeat(MAX_TOKEN_LEN + 1);
        let err = Link::new(&mut rx, &mut tx, &long, &mut rng).expect_err("long token");
        assert_eq!(err, LinkConfigError::Token);
        // No token: no Authorization header (a client certificate stands for the device).
        let mut link = Link::new(&mut rx, &mut tx, "", &mut rng).expect("link");
        link.start_upgrade(&mut rng, "h", "/v1/device")
            .expect("request");
        let request = core::str::from_utf8(link.pending_tx()).expect("utf8 request");
        assert!(!request.contains("Authorization"), "{request}");
        drop(link);
        let mut link = Link::new(&mut rx, &mut tx, "tok", &mut rng).expect("link");
        let err = link.start_upgrade(&mut rng, "", "/").expect_err("no host");
        assert_eq!(err, LinkConfigError::Host);
        let err = link
            .start_upgrade(&mut rng, "h", "v1")
            .expect_err("relative path");
        assert_eq!(err, LinkConfigError::Path);
        assert!(
            link.pending_tx().is_empty(),
            "a refused request queues nothing"
        );
    }

    #[test]
    fn an_upgrade_without_the_postcard_subprotocol_is_refused() {
        let (mut rx, mut tx) = ([0u8; 1024], [0u8; 1536]);
        let mut link = start(&mut rx, &mut tx);
        let (_hub, response, n) = answer(&link, None);
        deliver(&mut link, &response[..n - 1]);
        assert_eq!(link.accept_upgrade(), Upgrade::Pending);
        deliver(&mut link, &response[n - 1..n]);
        assert_eq!(
            link.accept_upgrade(),
            Upgrade::Refused {
                cause: DisconnectCause::Refused,
                http_status: None
            }
        );
        assert!(link.pending_tx().is_empty());
    }

    #[test]
    fn a_busy_hub_is_refused_with_its_status() {
        let (mut rx, mut tx) = ([0u8; 1024], [0u8; 1536]);
        let mut link = start(&mut rx, &mut tx);
        deliver(&mut link, b"HTTP/1.1 429 Too Many Requests\r\n\r\n");
        assert_eq!(
            link.accept_upgrade(),
            Upgrade::Refused {
                cause: DisconnectCause::Unavailable {
                    retry_after_ms: 5_000
                },
                http_status: Some(429)
            }
        );
    }

    #[test]
    fn frames_in_and_out() {
        let (mut rx, mut tx) = ([0u8; 1024], [0u8; 1536]);
        let mut link = start(&mut rx, &mut tx);
        let (mut hub, response, n) = answer(&link, Some(SUBPROTOCOL_POSTCARD));
        // The response and a first frame arrive together; the frame stays buffered.
        let mut frame = [0u8; 64];
        let f = hub
            .write(WebSocketSendMessageType::Text, true, b"{}", &mut frame)
            .expect("frame");
        deliver(&mut link, &response[..n]);
        deliver(&mut link, &frame[..f]);
        assert_eq!(link.accept_upgrade(), Upgrade::Accepted);
        assert!(link.pending_tx().is_empty(), "the request is done with");
        let mut payload = [0u8; 256];
        assert!(matches!(
            link.receive(&mut payload),
            Incoming::Data(DataFrame::Text("{}"))
        ));
        assert!(matches!(link.receive(&mut payload), Incoming::Nothing));

        // A ping is answered with a pong carrying its payload.
        let f = hub
            .write(WebSocketSendMessageType::Ping, true, b"hi", &mut frame)
            .expect("ping");
        deliver(&mut link, &frame[..f]);
        assert!(matches!(link.receive(&mut payload), Incoming::Control));
        let mut got = [0u8; 16];
        let read = hub.read(link.pending_tx(), &mut got).expect("pong");
        assert_eq!(read.message_type, WebSocketReceiveMessageType::Pong);
        assert_eq!(&got[..read.len_to], b"hi");
        let written = link.pending_tx().len();
        link.tx_written(written);

        // A binary message goes out as one masked frame the hub reads back.
        link.send(b"\x01\x02\x03").expect("fits");
        let read = hub.read(link.pending_tx(), &mut got).expect("binary");
        assert_eq!(read.message_type, WebSocketReceiveMessageType::Binary);
        assert_eq!(&got[..read.len_to], b"\x01\x02\x03");
        link.tx_written(1);
        // 8 bytes are still queued: a frame joins them only if a control frame still fits.
        assert!(!link.can_queue(1_400));
        assert!(link.can_queue(1_300));
        let written = link.pending_tx().len();
        link.tx_written(written);
        assert!(
            link.can_queue(1_400),
            "an empty buffer always takes a frame"
        );
        assert_eq!(
            link.send(&[0u8; 1_536]),
            Err(FrameTooLarge {
                len: 1_544,
                capacity: 1_536
            })
        );

        // A fragment is refused with 1009 and the rest of the input dropped.
        let f = hub
            .write(WebSocketSendMessageType::Binary, false, b"part", &mut frame)
            .expect("fragment");
        deliver(&mut link, &frame[..f]);
        deliver(&mut link, &frame[..f]);
        assert!(matches!(
            link.receive(&mut payload),
            Incoming::Refused {
                code: close::TOO_BIG,
                ..
            }
        ));
        assert!(matches!(link.receive(&mut payload), Incoming::Nothing));

        // The hub's close is echoed with its code.
        let mut close_frame = [0u8; 32];
        let f = hub
            .close(
                WebSocketCloseStatusCode::EndpointUnavailable,
                None,
                &mut close_frame,
            )
            .expect("close");
        deliver(&mut link, &close_frame[..f]);
        assert!(matches!(
            link.receive(&mut payload),
            Incoming::PeerClosed(DisconnectCause::Closed(close::GOING_AWAY))
        ));
        let read = hub.read(link.pending_tx(), &mut got).expect("echo");
        assert_eq!(
            read.message_type,
            WebSocketReceiveMessageType::CloseCompleted
        );
        assert_eq!(&got[..2], &close::GOING_AWAY.to_be_bytes());
    }
}

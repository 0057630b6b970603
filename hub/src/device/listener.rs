//! The device listener: TCP accept, TLS (rustls, with an optional client certificate), and
//! the WebSocket upgrade, where the credentials (token, verified certificate, or both for
//! one device) and subprotocol are checked before any WebSocket exists.
//!
//! Between accept and the end of the upgrade a connection holds a handshake slot
//! (`handshakes.rs`): at most `device.max_handshakes` in all and
//! `device.max_handshakes_per_source` from one source address (not applied with
//! `device.plain_ws`, where every peer is the proxy). While every slot is taken the
//! listener accepts nothing, so further connections wait in the kernel's accept queue
//! ([`LISTEN_BACKLOG`]); a connection whose source holds its share is closed at once,
//! before TLS. A connection must send its first byte (the TLS
//! ClientHello) within `device.first_byte_timeout` and finish the upgrade within
//! `device.handshake_timeout`, so connections that open and send nothing free their slots
//! quickly, and one source cannot take them all.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use schemas::limits::MAX_MESSAGE_BYTES;
use schemas::{Encoding, DEVICE_PATH};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use super::connection::{self, Admission};
use super::handshakes::{HandshakeSlots, Refusal, Slot};
use super::{replay, DeviceContext};
use crate::auth::AuthRefusal;
use crate::client_cert::{self, CertError};
use crate::store::now_ms;
use crate::token::{Claims, TokenError};

/// What a device's verified client certificate says, if it presented one.
type PeerCert = Option<Result<Claims, CertError>>;

/// How long shutdown waits for connections to close before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The WebSocket limits every device connection gets.
///
/// The read buffer starts at 1 KiB, which holds what devices usually send (a telemetry
/// frame, a pong) and is what an idle connection keeps; tungstenite grows it to fit a
/// larger frame (up to the 16 KiB message limit), so a big message costs one allocation,
/// not many reads.
pub fn websocket_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES))
        .read_buffer_size(1024)
        .write_buffer_size(0)
        .max_write_buffer_size(4 * MAX_MESSAGE_BYTES)
}

/// How many established connections the kernel queues for the device listener while the
/// hub accepts none (every handshake slot taken). Linux caps it at `net.core.somaxconn`
/// (4096 by default since 5.4); beyond it new connections' SYNs go unanswered and are
/// retried by the device's TCP stack.
pub const LISTEN_BACKLOG: u32 = 4096;

/// Binds the device listener with a [`LISTEN_BACKLOG`]-deep accept queue.
///
/// # Errors
/// The address cannot be bound (in use, not local, no permission).
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    // As std's and tokio's bind do: a restarted hub can take its port back at once.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Accepts device connections until shutdown, then waits (up to a grace period) for every
/// connection task to close its device with 1001.
///
/// Cancel safety: not cancel safe: dropping it aborts every connection task without a close frame. It ends on its own at shutdown.
pub async fn run(listener: TcpListener, tls: Option<TlsAcceptor>, ctx: Arc<DeviceContext>) {
    // Behind a TLS-terminating proxy (plain ws) every peer is a proxy: one source that
    // stands for many devices, so a per-source share would throttle them all.
    let per_source = match ctx.config.plain_ws {
        true => ctx.config.max_handshakes,
        false => ctx.config.max_handshakes_per_source,
    };
    let handshakes = HandshakeSlots::new(ctx.config.max_handshakes, per_source);
    tracing::debug!(sizes = ?inline_sizes(), "bytes each connection holds inline");
    let mut tasks = JoinSet::new();
    let mut shutdown = ctx.shutdown.clone();
    loop {
        tokio::select! {
            _ = crate::stopping(&mut shutdown) => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            // Every slot taken: wait for one instead of accepting (and dropping) more.
            _ = handshakes.room(), if handshakes.is_full() => {}
            accepted = listener.accept(), if !handshakes.is_full() => {
                let (tcp, remote) = match accepted {
                    Ok(pair) => pair,
                    Err(err) => {
                        // Out of file descriptors, usually: back off instead of spinning.
                        tracing::warn!(error = %err, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let slot = match handshakes.try_take(remote.ip()) {
                    Ok(slot) => slot,
                    // Only this loop takes slots, and it accepts only while one is free.
                    Err(Refusal::Full) => continue,
                    Err(Refusal::SourceShare) => {
                        metrics::counter!("hub_handshakes_refused_source_total").increment(1);
                        drop(tcp);
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                tasks.spawn(serve(tcp, remote, tls.clone(), ctx.clone(), slot));
            }
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            remaining = tasks.len(),
            "connections did not close within the grace period; dropping them"
        );
        tasks.abort_all();
    }
}

type Session = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// One accepted connection: the handshake (holding `slot`), then the session.
///
/// The handshake's state (TLS accept, the upgrade, the request head) is boxed: it is
/// large, needed only for the first moments, and a task's future is as big as its largest
/// state, so inline it would stay allocated for the whole life of every connection.
///
/// Cancel safety: not cancel safe, like [`connection::run`].
async fn serve(
    tcp: TcpStream,
    remote: SocketAddr,
    tls: Option<TlsAcceptor>,
    ctx: Arc<DeviceContext>,
    slot: Slot,
) {
    let admitted = Box::pin(tokio::time::timeout(ctx.config.handshake_timeout, async {
        if !first_byte(&tcp, ctx.config.first_byte_timeout).await {
            metrics::counter!("hub_handshakes_idle_total").increment(1);
            tracing::debug!(%remote, "closed a connection that sent nothing");
            return None;
        }
        handshake(tcp, remote, tls, &ctx).await
    }))
    .await;
    drop(slot);
    match admitted {
        Ok(Some(session)) => session.await,
        Ok(None) => {}
        Err(_) => {
            metrics::counter!("hub_handshakes_timed_out_total").increment(1);
            tracing::debug!(%remote, "handshake timed out");
        }
    }
}

/// The stream a TLS device connection runs on.
type DeviceStream = tokio_rustls::server::TlsStream<replay::Replay<TcpStream>>;

/// What one connected device's futures and socket state take inline, by part, in bytes:
/// the connection task, the session future it awaits, and within that the WebSocket (with
/// the TLS connection) and the session state. Heap buffers behind them come on top; see
/// BENCHMARKS.md for the whole breakdown.
pub fn inline_sizes() -> [(&'static str, usize); 4] {
    fn output_size<A, B, C, D, E, F>(_: &impl Fn(A, B, C, D, E) -> F) -> usize {
        std::mem::size_of::<F>()
    }
    fn session_size<A, B, C, D, F>(_: &impl Fn(A, B, C, D) -> F) -> usize {
        std::mem::size_of::<F>()
    }
    [
        ("connection task", output_size(&serve)),
        (
            "session future",
            session_size(&connection::run::<DeviceStream>),
        ),
        (
            "websocket + tls",
            std::mem::size_of::<tokio_tungstenite::WebSocketStream<DeviceStream>>(),
        ),
        (
            "session state",
            std::mem::size_of::<super::session::HubSession>(),
        ),
    ]
}

/// Waits up to `limit` for the connection's first byte without taking it. False when none
/// came in time or the peer closed first.
async fn first_byte(tcp: &TcpStream, limit: Duration) -> bool {
    let mut byte = [0u8; 1];
    matches!(
        tokio::time::timeout(limit, tcp.peek(&mut byte)).await,
        Ok(Ok(n)) if n > 0
    )
}

/// TLS and the upgrade. Returns the session future when the device was admitted.
async fn handshake(
    tcp: TcpStream,
    remote: SocketAddr,
    tls: Option<TlsAcceptor>,
    ctx: &Arc<DeviceContext>,
) -> Option<Session> {
    match tls {
        Some(acceptor) => match acceptor.accept(tcp).await {
            Ok(stream) => {
                let kind = match stream.get_ref().1.handshake_kind() {
                    Some(rustls::HandshakeKind::Resumed) => "resumed",
                    _ => "full",
                };
                metrics::counter!("hub_tls_handshakes_total", "kind" => kind).increment(1);
                // rustls has verified the chain, validity and usage; only the identity is
                // left to read.
                let cert = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .map(client_cert::identity);
                upgrade(stream, remote, cert, ctx).await
            }
            Err(err) => {
                metrics::counter!("hub_tls_failures_total").increment(1);
                tracing::debug!(%remote, error = %err, "TLS handshake failed");
                None
            }
        },
        None => upgrade(tcp, remote, None, ctx).await,
    }
}

// tungstenite's refusal type is an http::Response; its size is not ours to choose.
#[allow(clippy::result_large_err)]
async fn upgrade<S>(
    stream: S,
    remote: SocketAddr,
    mut cert: PeerCert,
    ctx: &Arc<DeviceContext>,
) -> Option<Session>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Look at the request first: a plain HTTP request (a browser, curl, a health check)
    // gets a 426 that says what this port is, instead of an empty reply.
    let stream = match replay::read_head(stream).await {
        replay::Head::Upgrade(stream) => stream,
        replay::Head::Plain(mut stream) => {
            let body = "This is the hub's device endpoint: connect with a WebSocket client to /v1/device \
                        (subprotocol hub.v1.json or hub.v1.postcard, Authorization: Bearer <token>). \
                        See schemas/PROTOCOL.md.\n";
            let answer = format!(
                "HTTP/1.1 426 Upgrade Required\r\nUpgrade: websocket\r\nConnection: close\r\n\
                 Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
            return None;
        }
        replay::Head::TooLarge(mut stream) => {
            let answer = "HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
            return None;
        }
        replay::Head::Gone => return None,
    };
    let mut admission: Option<Admission> = None;
    let callback = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        let (resp, adm) = admit(req, resp, cert.take(), ctx)?;
        admission = Some(adm);
        Ok(resp)
    };
    match tokio_tungstenite::accept_hdr_async_with_config(
        stream,
        callback,
        Some(websocket_config()),
    )
    .await
    {
        Ok(ws) => {
            let admission = admission?;
            let ctx = ctx.clone();
            Some(Box::pin(connection::run(ws, admission, remote, ctx)))
        }
        Err(err) => {
            tracing::debug!(%remote, error = %err, "upgrade refused or failed");
            None
        }
    }
}

/// Checks path, credentials, subprotocol and capacity. Runs inside the upgrade, before any
/// WebSocket exists, so every refusal is a plain HTTP response.
#[allow(clippy::result_large_err)]
fn admit(
    req: &Request,
    mut resp: Response,
    cert: PeerCert,
    ctx: &DeviceContext,
) -> Result<(Response, Admission), ErrorResponse> {
    if req.uri().path() != DEVICE_PATH {
        return Err(reject(
            StatusCode::NOT_FOUND,
            "no such endpoint: devices connect to /v1/device",
        ));
    }
    let token = bearer_token(req).or_else(|| query_token(req));
    let by_cert = cert.is_some();
    let claims = match ctx.auth.admit(token.as_deref(), cert, now_ms()) {
        Ok(claims) => claims,
        Err(refusal) => {
            metrics::counter!("hub_auth_failures_total").increment(1);
            // Which device it claims to be: the certificate's (verified), or the token's
            // readable part (unverified).
            let claimed = match &refusal {
                AuthRefusal::CertificateRevoked(device)
                | AuthRefusal::Mismatch { cert: device, .. } => device.as_str(),
                _ => token
                    .as_deref()
                    .and_then(|t| t.strip_prefix("v1."))
                    .and_then(|t| t.rsplitn(4, '.').nth(3))
                    .filter(|d| schemas::limits::is_valid_device_id(d))
                    .unwrap_or("-"),
            };
            let credential = match (by_cert, token.is_some()) {
                (true, true) => "certificate+token",
                (true, false) => "certificate",
                _ => "token",
            };
            if refusal.status() == 403 {
                tracing::warn!(device = claimed, credential, reason = %refusal, "device refused at the upgrade (HTTP 403)");
                return Err(reject(StatusCode::FORBIDDEN, &refusal.to_string()));
            }
            tracing::warn!(device = claimed, credential, reason = %refusal, "device refused at the upgrade (HTTP 401)");
            let mut r = reject(StatusCode::UNAUTHORIZED, &refusal.to_string());
            let challenge = match refusal {
                AuthRefusal::Token(TokenError::Missing) => "Bearer".to_string(),
                other => format!("Bearer error=\"invalid_token\", error_description=\"{other}\""),
            };
            if let Ok(v) = HeaderValue::from_str(&challenge) {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            return Err(r);
        }
    };
    let offered = req
        .headers()
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(encoding) = Encoding::negotiate(offered) else {
        let supported: Vec<&str> = Encoding::ALL.iter().map(|e| e.subprotocol()).collect();
        let text = if offered.is_empty() {
            format!(
                "missing Sec-WebSocket-Protocol; supported subprotocols: {}",
                supported.join(", ")
            )
        } else {
            format!(
                "unsupported subprotocol `{offered}`; supported subprotocols: {}",
                supported.join(", ")
            )
        };
        return Err(reject(StatusCode::BAD_REQUEST, &text));
    };
    if ctx.presence.len() >= ctx.config.max_connections {
        let mut r = reject(
            StatusCode::SERVICE_UNAVAILABLE,
            "hub at its connection limit; retry later",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
        return Err(r);
    }
    if let Some(refusal) = ctx
        .cluster
        .as_ref()
        .and_then(|c| c.refusal(ctx.presence.len()))
    {
        // The load balancer (proxy_next_upstream http_503) or the device's retry takes
        // the device to another node.
        let mut r = reject(StatusCode::SERVICE_UNAVAILABLE, refusal.message());
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return Err(r);
    }
    if *ctx.shutdown.borrow() {
        let mut r = reject(
            StatusCode::SERVICE_UNAVAILABLE,
            "hub shutting down; retry later",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return Err(r);
    }
    resp.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static(encoding.subprotocol()),
    );
    let forwarded_for = if ctx.config.forwarded_for {
        // The left-most entry is the original client; later ones are proxies.
        req.headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(|v| v.trim().chars().take(64).collect::<String>())
            .filter(|v| !v.is_empty())
    } else {
        None
    };
    Ok((
        resp,
        Admission {
            claims,
            encoding,
            forwarded_for,
        },
    ))
}

fn reject(status: StatusCode, text: &str) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(format!("{text}\n")));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn bearer_token(req: &Request) -> Option<String> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

fn query_token(req: &Request) -> Option<String> {
    req.uri().query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        // Tokens use only [A-Za-z0-9._-], so there is nothing to percent-decode.
        (k == "token").then(|| v.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_connection_does_not_keep_the_handshake_state() {
        let sizes = inline_sizes();
        println!("{sizes:?}");
        let size = |name: &str| {
            sizes
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(0, |(_, bytes)| *bytes)
        };
        // The task holds the boxed handshake, then the boxed session: a few pointers and
        // the arguments, not the TLS accept state (kilobytes) for the life of the device.
        assert!(size("connection task") < 512, "{sizes:?}");
        // The session future holds the WebSocket and the session, and little besides: not
        // a second copy of its arguments, nor the waits of branches that are idle (about
        // 900 bytes are left: the select's futures, the admission, the locals).
        assert!(
            size("session future") < size("websocket + tls") + size("session state") + 1024,
            "{sizes:?}"
        );
    }
}

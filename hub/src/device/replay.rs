//! A stream that first gives back bytes already read from it, then reads on: lets the
//! listener look at the HTTP request head (to answer non-WebSocket requests with 426)
//! before handing the connection to the WebSocket handshake.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// Largest request head the listener reads ahead.
pub const MAX_HEAD: usize = 8 * 1024;

/// `inner`, with `prefix` read again first.
pub struct Replay<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

/// What the start of a connection was.
pub enum Head<S> {
    /// A WebSocket upgrade request (or something tungstenite will judge): go on with it.
    Upgrade(Replay<S>),
    /// A complete HTTP request that asks for no upgrade, and the stream to answer on.
    Plain(S),
    /// More than [`MAX_HEAD`] bytes without a complete head (an oversized header).
    TooLarge(S),
    /// The peer closed without a complete head.
    Gone,
}

/// Reads the request head and sorts the connection.
///
/// Cancel safety: not cancel safe (bytes read are lost); run it under the handshake timeout
/// and drop the connection when that fires.
pub async fn read_head<S: AsyncRead + Unpin>(mut stream: S) -> Head<S> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Head::Gone,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let upgrade = head.lines().any(|l| {
                l.split_once(':')
                    .is_some_and(|(k, v)| k.trim() == "upgrade" && v.contains("websocket"))
            });
            if upgrade {
                return Head::Upgrade(Replay {
                    prefix: buf,
                    pos: 0,
                    inner: stream,
                });
            }
            return Head::Plain(stream);
        }
        if buf.len() > MAX_HEAD {
            return Head::TooLarge(stream);
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Replay<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.pos < self.prefix.len() {
            let n = out.remaining().min(self.prefix.len() - self.pos);
            let start = self.pos;
            out.put_slice(&self.prefix[start..start + n]);
            self.pos += n;
            if self.pos == self.prefix.len() {
                // Done with it: give the memory back for the rest of a long connection.
                self.prefix = Vec::new();
                self.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, out)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replay<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn upgrades_are_replayed_and_plain_requests_told_apart() {
        let req = b"GET /v1/device HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nrest";
        let Head::Upgrade(mut replay) = read_head(&req[..]).await else {
            panic!("upgrade")
        };
        let mut all = Vec::new();
        replay.read_to_end(&mut all).await.expect("read");
        assert_eq!(all, req);
        let plain = b"GET /v1/device HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(matches!(read_head(&plain[..]).await, Head::Plain(_)));
        assert!(matches!(read_head(&b"GET / HT"[..]).await, Head::Gone));
    }
}

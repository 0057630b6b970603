//! The hub's device connection from the first byte after TLS, over an in-memory stream: the
//! request head (`hub::device::replay`, which tells upgrades from plain HTTP and oversized
//! heads), tungstenite's upgrade and framing with the hub's limits
//! (`listener::websocket_config`), the mapping of frames and read errors
//! (`connection::inbound`, `connection::read_error`), and the session, whose effects are
//! answered at once as a healthy store and ledger would. Nothing may panic or loop, and
//! every end must carry a close code in range.
//!
//! Left out: the stores, presence and the listener's admission checks (token, subprotocol,
//! capacity), which need a running hub; tokens have their own target.
#![no_main]

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hub::device::connection::{inbound, read_error};
use hub::device::listener::websocket_config;
use hub::device::replay::{read_head, Head};
use hub::device::session::{Effect, HubSession, ReadError, SessionParams, Transmit};
use libfuzzer_sys::fuzz_target;
use schemas::codec::{encode_json, encode_postcard_vec};
use schemas::{Encoding, HubMessage};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

/// The client's bytes, handed out in chunks of a size the input chooses; writes vanish.
struct Wire {
    data: Vec<u8>,
    pos: usize,
    chunk: usize,
}

impl AsyncRead for Wire {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = (self.data.len() - self.pos)
            .min(self.chunk)
            .min(buf.remaining());
        let start = self.pos;
        buf.put_slice(&self.data[start..start + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Wire {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    })
}

async fn connection(data: &[u8]) {
    let Some((&chunk, data)) = data.split_first() else {
        return;
    };
    let wire = Wire {
        data: data.to_vec(),
        pos: 0,
        chunk: usize::from(chunk).max(1),
    };
    let Head::Upgrade(stream) = read_head(wire).await else {
        return;
    };
    let mut encoding = Encoding::Postcard;
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let offered = req
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if let Some(e) = Encoding::negotiate(offered) {
            encoding = e;
            resp.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static(e.subprotocol()),
            );
        }
        Ok(resp)
    };
    let Ok(mut ws) =
        tokio_tungstenite::accept_hdr_async_with_config(stream, callback, Some(websocket_config()))
            .await
    else {
        return;
    };
    let t0 = Instant::now();
    let params = SessionParams {
        ping_interval: Duration::from_secs(30),
        pong_timeout: Duration::from_secs(15),
        hello_timeout: Duration::from_secs(10),
        max_messages_per_sec: 1000,
        command_window: 32,
        ack_drain: Duration::from_secs(2),
    };
    let mut session = HubSession::new(t0, Arc::from("fuzz"), encoding, params);
    // Every iteration reads a frame or ends; the input is finite, so this bounds the loop.
    for _ in 0..100_000 {
        while let Some(effect) = session.poll_effect() {
            match effect {
                Effect::Start(_) => session.handle_started(t0, 0, Ok(0)),
                Effect::FetchCommands => session.handle_deliverable([]),
                Effect::CommandFinished(r) => session.handle_result_recorded(r.id),
                _ => {}
            }
        }
        while let Some(transmit) = session.poll_transmit() {
            let encoded = |msg: &HubMessage| match encoding {
                Encoding::Postcard => Message::binary(encode_postcard_vec(msg)),
                Encoding::Json => Message::text(encode_json(msg)),
            };
            let frame = match transmit {
                Transmit::Message(msg) => encoded(&msg),
                Transmit::Ack(ack) => encoded(&HubMessage::Ack(ack)),
                Transmit::Ping(p) => Message::Ping(p.to_vec().into()),
            };
            if ws.send(frame).await.is_err() {
                session.handle_write_error(false);
            }
        }
        if let Some(end) = session.end() {
            if let Some(code) = end.code {
                assert!((1000..5000).contains(&code), "close code {code}");
            }
            return;
        }
        if let Some(batch) = session.take_batch() {
            session.handle_stored(batch.seq, false);
            continue;
        }
        assert!(
            session.wants_read(),
            "a session that neither reads nor ends"
        );
        match ws.next().await {
            Some(Ok(msg)) => {
                if let Some(frame) = inbound(&msg) {
                    session.handle_frame(t0, frame);
                }
            }
            Some(Err(err)) => session.handle_read_error(read_error(err)),
            None => session.handle_read_error(ReadError::Io),
        }
    }
    panic!("the connection did not end");
}

fuzz_target!(|data: &[u8]| {
    runtime().block_on(connection(data));
});

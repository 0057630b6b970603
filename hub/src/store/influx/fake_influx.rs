//! A stand-in for InfluxDB in unit tests: a tiny HTTP/1.1 server on a loopback port that
//! records every request and answers as the test says, and the settings pointing at it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::lock;
use crate::config::InfluxConfig;

/// A request the fake server received.
#[derive(Debug, Clone)]
pub(super) struct Request {
    pub(super) method: String,
    pub(super) target: String,
    headers: Vec<(String, String)>,
    pub(super) body: Vec<u8>,
}

impl Request {
    pub(super) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub(super) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

type Responder = dyn Fn(usize, &Request) -> (u16, String) + Send + Sync;

/// A tiny HTTP/1.1 server on a loopback port standing in for InfluxDB: it records every
/// request and answers the n-th with whatever `respond(n, request)` says, closing the
/// connection after each answer.
pub(super) struct FakeInflux {
    port: u16,
    requests: Arc<Mutex<Vec<(Request, u16)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeInflux {
    pub(super) fn start(
        respond: impl Fn(usize, &Request) -> (u16, String) + Send + Sync + 'static,
    ) -> FakeInflux {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let respond: Arc<Responder> = Arc::new(respond);
        let (reqs, halt) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if halt.load(Ordering::Acquire) {
                    break;
                }
                if let Ok(stream) = stream {
                    let _ = serve(stream, &reqs, &*respond);
                }
            }
        });
        FakeInflux {
            port,
            requests,
            stop,
            thread: Some(thread),
        }
    }

    pub(super) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Requests so far, with the status each was answered with.
    pub(super) fn requests(&self) -> Vec<(Request, u16)> {
        lock(&self.requests).clone()
    }
}

impl Drop for FakeInflux {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    stream: TcpStream,
    requests: &Mutex<Vec<(Request, u16)>>,
    respond: &Responder,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Ok(());
    };
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let len = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    reader.read_exact(&mut body)?;
    let request = Request {
        method: method.to_string(),
        target: target.to_string(),
        headers,
        body,
    };
    let n = lock(requests).len();
    let (status, answer) = respond(n, &request);
    lock(requests).push((request, status));
    let kind = if answer.starts_with('{') {
        "application/json; charset=utf-8"
    } else {
        "text/csv; charset=utf-8"
    };
    let mut out = stream;
    write!(
        out,
        "HTTP/1.1 {status} Fake\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
        answer.len()
    )?;
    out.flush()
}

pub(super) fn cfg(url: &str) -> InfluxConfig {
    InfluxConfig {
        url: url.to_string(),
        org: "acme".into(),
        bucket: "fleet".into(),
        token: "s3cret".into(),
        measurement: "telemetry".into(),
        timeout: Duration::from_secs(2),
        spool_max_bytes: 1 << 20,
    }
}

/// A port nothing listens on.
pub(super) fn closed_url() -> String {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    format!("http://127.0.0.1:{port}")
}

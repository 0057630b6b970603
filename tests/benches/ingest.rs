//! Benchmark: sustained durable ingest over wss on loopback, in readings per second.
//!
//! Starts the real (release) `hub` binary on its embedded SQLite store with fsync on every
//! group commit (or, with `BENCH_STORE=victoria-metrics`, on the InfluxDB backend writing
//! to a real VictoriaMetrics), connects many postcard devices from this process (the load
//! generator shares the machine), streams full batches with a window of unacknowledged
//! batches per device, and counts only readings the hub acknowledged, i.e. durably stored.
//!
//! `cargo build --release --bins && cargo bench -p e2e --bench ingest`
//! Environment: BENCH_DEVICES (default 200), BENCH_SECONDS (10), BENCH_WINDOW (8),
//! BENCH_SYNC (full|normal), BENCH_STORE (sqlite|victoria-metrics), BENCH_READINGS (readings
//! per frame, 1 to 64; default 64).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e::client::Device;
use e2e::{Hub, HubOptions};
use schemas::limits::MAX_READINGS;
use schemas::message::truncated;
use schemas::{DeviceMessage, Hello, HubMessage, Reading, Telemetry};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let devices = env_num("BENCH_DEVICES", 200);
    let seconds = env_num("BENCH_SECONDS", 10);
    let window = env_num("BENCH_WINDOW", 8);
    let per_frame =
        (env_num("BENCH_READINGS", MAX_READINGS as u64) as usize).clamp(1, MAX_READINGS);
    let sync = std::env::var("BENCH_SYNC").unwrap_or_else(|_| "full".into());
    let store = std::env::var("BENCH_STORE").unwrap_or_else(|_| "sqlite".into());
    let mut env = vec![
        ("HUB_STORAGE__SYNCHRONOUS".into(), sync.clone()),
        ("HUB_LOG__LEVEL".into(), "warn".into()),
    ];
    let vm = (store == "victoria-metrics").then(e2e::servers::victoria_metrics);
    if let Some(vm) = &vm {
        env.extend([
            ("HUB_STORAGE__BACKEND".to_string(), "influxdb".to_string()),
            (
                "HUB_STORAGE__INFLUXDB__URL".to_string(),
                format!("http://127.0.0.1:{}", vm.port),
            ),
            (
                "HUB_STORAGE__INFLUXDB__ORG".to_string(),
                "bench".to_string(),
            ),
            (
                "HUB_STORAGE__INFLUXDB__BUCKET".to_string(),
                "bench".to_string(),
            ),
        ]);
    }
    let hub = Hub::start(HubOptions {
        env,
        ..HubOptions::default()
    });
    let tokens: Vec<String> = (0..devices)
        .map(|i| hub.token(&format!("bench-{i}")))
        .collect();
    let load = Load {
        ca: hub.ca(),
        tokens,
        seconds,
        window,
        per_frame,
    };
    // The bare sink first, on the hub's certificate: TLS, WebSocket and postcard with an
    // ack for every frame and nothing stored. The hub's figure is read against it.
    let sink = bare_sink::start(&hub.data_dir());
    let sink_rate = load.run(&format!("wss://localhost:{}/v1/device", sink.port()));
    drop(sink);
    println!(
        "ingest: bare sink (tokio-tungstenite + rustls, ack per frame, no store): {sink_rate:.0} readings/s ({devices} devices, {per_frame} readings/batch, window {window})"
    );
    let (rate, acked) = load.run_counted(&hub.device_url);
    println!(
        "ingest: {rate:.0} readings/s durably stored and acked ({devices} devices over wss, {per_frame} readings/batch, window {window}, store {store}, synchronous={sync}, {seconds} s)"
    );
    println!(
        "ingest: the hub reaches {:.2} of the bare sink's rate",
        rate / sink_rate.max(1.0)
    );
    if let Some(vm) = &vm {
        // Cross-check: VictoriaMetrics holds at least every counted reading.
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let base = format!("http://127.0.0.1:{}", vm.port);
        let _ = agent.get(format!("{base}/internal/force_flush")).call();
        let counted = acked as f64;
        let stored = e2e::wait_for(
            Duration::from_secs(60),
            "VictoriaMetrics to hold the acked readings",
            || {
                let mut resp = agent
                    .get(format!("{base}/api/v1/query"))
                    .query("query", "sum(count_over_time(telemetry_value[2h]))")
                    .call()
                    .ok()?;
                let v: serde_json::Value =
                    serde_json::from_str(&resp.body_mut().read_to_string().ok()?).ok()?;
                let n: f64 = v["data"]["result"][0]["value"][1].as_str()?.parse().ok()?;
                (n >= counted).then_some(n)
            },
        );
        println!("ingest: VictoriaMetrics holds {stored} readings (warm-up included)");
        return;
    }
    // Cross-check against the store itself: every counted reading must be there.
    let stored: i64 = hub.all_stored_readings();
    let counted = acked as i64;
    assert!(
        stored >= counted,
        "store holds {stored} readings but {counted} were counted as acked"
    );
    println!("ingest: store holds {stored} readings (warm-up included)");
}

/// The load: one task per token, each streaming full batches with `window` batches
/// unacknowledged, counting readings acknowledged during the measurement.
struct Load {
    ca: std::path::PathBuf,
    tokens: Vec<String>,
    seconds: u64,
    window: u64,
    per_frame: usize,
}

impl Load {
    /// Readings acknowledged per second by the endpoint at `url`.
    fn run(&self, url: &str) -> f64 {
        self.run_counted(url).0
    }

    /// Readings acknowledged per second, and how many were counted.
    fn run_counted(&self, url: &str) -> (f64, u64) {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        // An hour ago, in ms: inside any retention period, and far from the future.
        let base_ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
            - 3_600_000;
        let acked = Arc::new(AtomicU64::new(0));
        let measuring = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (window, per_frame) = (self.window, self.per_frame);
        runtime.block_on(async {
            let mut tasks = Vec::new();
            for token in self.tokens.clone() {
                let (url, ca) = (url.to_string(), self.ca.clone());
                let (acked, measuring, stop) = (acked.clone(), measuring.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    let mut d = Device::connect(&url, &ca, &token, false).await;
                    d.send(&DeviceMessage::Hello(Hello {
                        firmware: truncated("bench"),
                        capabilities: heapless::Vec::new(),
                        last_acked_seq: 0,
                    }))
                    .await;
                    let HubMessage::Welcome(_) = d.expect(Duration::from_secs(30)).await else {
                        panic!("no welcome")
                    };
                    let mut readings = heapless::Vec::<Reading, MAX_READINGS>::new();
                    for i in 0..per_frame {
                        // Distinct series and recent timestamps: a time-series store must keep
                        // every one of them (it would collapse or discard anything else).
                        let _ = readings.push(Reading {
                            metric: truncated(&format!("metric.{i}")),
                            ts: base_ts,
                            value: i as f64,
                        });
                    }
                    let (mut next, mut last_ack) = (1u64, 0u64);
                    while !stop.load(Ordering::Relaxed) {
                        while next - last_ack <= window {
                            for r in readings.iter_mut() {
                                r.ts += 1;
                            }
                            d.send(&DeviceMessage::Telemetry(Telemetry {
                                seq: next,
                                readings: readings.clone(),
                            }))
                            .await;
                            next += 1;
                        }
                        if let HubMessage::Ack(a) = d.expect(Duration::from_secs(30)).await {
                            if measuring.load(Ordering::Relaxed) {
                                acked.fetch_add(
                                    (a.up_to_seq - last_ack) * per_frame as u64,
                                    Ordering::Relaxed,
                                );
                            }
                            last_ack = a.up_to_seq;
                        }
                    }
                }));
            }
            // Warm up, then measure.
            tokio::time::sleep(Duration::from_secs(2)).await;
            measuring.store(true, Ordering::Relaxed);
            let started = Instant::now();
            tokio::time::sleep(Duration::from_secs(self.seconds)).await;
            let total = acked.load(Ordering::Relaxed);
            let elapsed = started.elapsed().as_secs_f64();
            stop.store(true, Ordering::Relaxed);
            for t in tasks {
                t.abort();
            }
            (total as f64 / elapsed, total)
        })
    }
}

/// The baseline: a WebSocket endpoint with the hub's TLS and wire format that acks every
/// batch at once and stores nothing, on its own runtime thread.
mod bare_sink {
    use std::net::SocketAddr;
    use std::path::Path;
    use std::sync::Arc;

    use futures_util::{SinkExt, StreamExt};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use schemas::codec::{decode_postcard, encode_postcard_vec};
    use schemas::limits::{MAX_MESSAGE_BYTES, MAX_READINGS};
    use schemas::{Ack, DeviceMessage, HubMessage, Welcome};
    use tokio::net::TcpListener;
    use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
    use tokio_tungstenite::tungstenite::http::HeaderValue;
    use tokio_tungstenite::tungstenite::Message;

    /// A running sink; dropping it stops its runtime.
    pub struct Sink {
        addr: SocketAddr,
        _runtime: tokio::runtime::Runtime,
    }

    impl Sink {
        /// Its port on loopback.
        pub fn port(&self) -> u16 {
            self.addr.port()
        }
    }

    /// Starts a sink with the server certificate of the hub data directory `data`.
    pub fn start(data: &Path) -> Sink {
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_file_iter(data.join("tls/server.pem"))
                .expect("server certificate")
                .map(|c| c.expect("certificate"))
                .collect();
        let key = PrivateKeyDer::from_pem_file(data.join("tls/server-key.pem")).expect("key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("certificate and key");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let listener = runtime
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        runtime.spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    // tungstenite's refusal type is an http::Response; its size is not ours.
                    #[allow(clippy::result_large_err)]
                    let choose = |_: &Request, mut resp: Response| {
                        resp.headers_mut().insert(
                            "sec-websocket-protocol",
                            HeaderValue::from_static("hub.v1.postcard"),
                        );
                        Ok(resp)
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tls, choose).await else {
                        return;
                    };
                    while let Some(Ok(frame)) = ws.next().await {
                        let Message::Binary(bytes) = frame else {
                            continue;
                        };
                        let answer = match decode_postcard::<DeviceMessage>(&bytes) {
                            Ok(DeviceMessage::Hello(_)) => HubMessage::Welcome(Welcome {
                                server_time: 0,
                                ping_interval_ms: 30_000,
                                pong_timeout_ms: 15_000,
                                last_seq: 0,
                                max_readings: MAX_READINGS as u16,
                                max_message_bytes: MAX_MESSAGE_BYTES as u32,
                            }),
                            Ok(DeviceMessage::Telemetry(t)) => {
                                HubMessage::Ack(Ack { up_to_seq: t.seq })
                            }
                            _ => continue,
                        };
                        if ws
                            .send(Message::binary(encode_postcard_vec(&answer)))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        Sink {
            addr,
            _runtime: runtime,
        }
    }
}

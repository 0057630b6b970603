//! `firmware-sim fleet`: provisions N devices (tokens from the hub's admin API or a file)
//! and runs them in one process — one tokio task per device, each the unchanged no_std
//! client with small fixed buffers and an in-memory flash. Shows progress while
//! connecting, then a live status line, and a summary at the end (`--json` for scripts).

use std::collections::{HashMap, VecDeque};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use firmware_sim::{Event, RamFlash};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use tokio::sync::watch;
use tokio::time::Instant;

mod commands;

use crate::device::{run_device, DeviceReport, DeviceSpec};
use crate::latency::LatencyHistogram;
use crate::net::{tls_config, ConnectFailures, HostTimer, HubTarget, NetShared, RateLimiter};
use crate::run::parse_rate;
use crate::sim::{EventSink, SensorSet};
use crate::{parse_duration, parse_interval, read_ca, read_input, usage, FIRMWARE};

/// Device ids asked for per admin API request.
const TOKEN_BATCH: usize = 1000;

/// Arguments of `fleet`.
#[derive(Args)]
pub struct FleetArgs {
    /// How many devices.
    #[arg(long, value_name = "N")]
    count: usize,
    /// Hub device URL (default with --data-dir: DIR/device-url, re-read before connecting).
    #[arg(long, value_name = "URL")]
    hub: Option<String>,
    /// A local hub's data directory: its device-url, tls/ca.pem, admin-url and admin-token.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// The hub's admin API base URL (e.g. http://127.0.0.1:8444), to issue tokens.
    #[arg(long, value_name = "URL")]
    api: Option<String>,
    /// The admin token for --api.
    #[arg(
        long,
        env = "HUB_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    admin_token: Option<String>,
    /// Tokens from a file instead: one `DEVICE_ID TOKEN` per line.
    #[arg(long, value_name = "FILE")]
    tokens: Option<PathBuf>,
    /// CA certificate (PEM) to trust for wss (default with --data-dir: DIR/tls/ca.pem).
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Device id prefix; ids are PREFIX00001, PREFIX00002, ...
    #[arg(long, default_value = "sim-", value_name = "PREFIX")]
    prefix: String,
    /// Number of the first device.
    #[arg(long, default_value_t = 1, value_name = "N")]
    first: usize,
    /// Lifetime of tokens issued through the admin API.
    #[arg(long, default_value = "30d", value_name = "DURATION")]
    ttl: String,
    /// Sample interval of every device.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    interval: String,
    /// Sensors, comma-separated (see `flash --help`).
    #[arg(
        long,
        default_value = "all",
        value_delimiter = ',',
        value_name = "LIST"
    )]
    sensors: Vec<String>,
    /// Start every device's sampling clock at the same moment, so all of them sample and
    /// send in lockstep (a fleet powered up together after an outage). By default device
    /// N takes its first sample at a fraction of the interval that differs for each
    /// device, spreading the readings evenly over the interval, as a fleet of devices
    /// booted at different times would.
    #[arg(long)]
    aligned: bool,
    /// Most connection attempts per second, reconnects included (0: no limit).
    #[arg(long, default_value = "500/s", value_name = "RATE")]
    connect_rate: String,
    /// Stop after this long (default: until Ctrl-C or SIGTERM).
    #[arg(long, value_name = "DURATION")]
    duration: Option<String>,
    /// On stop, how long devices may take to deliver unacknowledged readings.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    drain_timeout: String,
    /// Local addresses to connect from, comma-separated; devices use them in turn. On one
    /// machine, spreading a large fleet over loopback addresses (127.0.0.1,127.0.0.2,...)
    /// keeps the kernel's search for a free source port cheap: from one address, each
    /// connect scans the ports of every connection already open to the hub, which
    /// dominates the load generator's CPU beyond about 10,000 devices.
    #[arg(long, value_name = "ADDRS", value_delimiter = ',')]
    ifaddr: Vec<std::net::IpAddr>,
    /// Flash per device for unacknowledged readings (bytes, kept in RAM).
    #[arg(long, default_value_t = 4096, value_name = "BYTES")]
    ring_bytes: usize,
    /// Also send commands through the admin API at this rate (a `led` command to the
    /// devices in turn, once all are connected) and measure each round trip: the API call
    /// to the device's result.
    #[arg(long, value_name = "RATE")]
    commands: Option<String>,
    /// Print one JSON summary object on stdout at the end.
    #[arg(long)]
    json: bool,
    /// Include one entry per device in the summary.
    #[arg(long)]
    per_device: bool,
}

/// How long after every device has connected once the fleet counts as at work: the hub is
/// still answering the last connections' first requests (their queued commands, their
/// registration) and storing the readings the start held up for a moment. The command
/// load begins then, and the steady-state ack latency counts batches sent from then on.
const SETTLE: Duration = Duration::from_secs(5);

/// Live counters of the whole fleet, fed by the devices' events.
struct Counters {
    online: AtomicI64,
    ever_online: AtomicU64,
    connects: AtomicU64,
    sessions: AtomicU64,
    batches_recorded: AtomicU64,
    readings_recorded: AtomicU64,
    readings_evicted: AtomicU64,
    batches_sent: AtomicU64,
    batches_acked: AtomicU64,
    readings_acked: AtomicU64,
    commands: AtomicU64,
    hub_errors: AtomicU64,
    /// Commands sent through the admin API (`--commands`), and those that did not succeed.
    commands_issued: AtomicU64,
    commands_failed: AtomicU64,
    /// From the admin API call that creates a command to its final state.
    command_round_trip: LatencyHistogram,
    /// Upgrades the hub answered with 503 (busy: at its limit, shedding, shutting down).
    refused_busy: AtomicU64,
    /// From a connection attempt to the hub's `Welcome`.
    connect_latency: LatencyHistogram,
    /// From handing a batch to the transport to the acknowledgement that covers it.
    ack_latency: LatencyHistogram,
    /// The same, for batches sent from [`SETTLE`] after every device had connected once:
    /// the hub's steady state, without the handshakes of the start nor the backlog of
    /// readings they left behind.
    ack_latency_all_online: LatencyHistogram,
    /// When every device had connected once.
    all_online: std::sync::OnceLock<Instant>,
    /// Devices in the fleet.
    count: usize,
    /// Per device: when its current connection attempt began.
    connecting_since: Vec<Mutex<Option<Instant>>>,
    /// Per device: batches sent on the current connection and not yet acknowledged, with
    /// when they were sent, oldest first.
    in_flight: Vec<Mutex<VecDeque<(u64, Instant)>>>,
}

impl Counters {
    fn new(count: usize) -> Counters {
        let zero = || AtomicU64::new(0);
        Counters {
            online: AtomicI64::new(0),
            ever_online: zero(),
            connects: zero(),
            sessions: zero(),
            batches_recorded: zero(),
            readings_recorded: zero(),
            readings_evicted: zero(),
            batches_sent: zero(),
            batches_acked: zero(),
            readings_acked: zero(),
            commands: zero(),
            hub_errors: zero(),
            commands_issued: zero(),
            commands_failed: zero(),
            command_round_trip: LatencyHistogram::default(),
            refused_busy: zero(),
            connect_latency: LatencyHistogram::default(),
            ack_latency: LatencyHistogram::default(),
            ack_latency_all_online: LatencyHistogram::default(),
            all_online: std::sync::OnceLock::new(),
            count,
            connecting_since: (0..count).map(|_| Mutex::new(None)).collect(),
            in_flight: (0..count).map(|_| Mutex::new(VecDeque::new())).collect(),
        }
    }
}

/// Locks a per-device slot; a panic elsewhere does not make its data wrong.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl EventSink for Counters {
    fn event(&self, index: usize, _device: &str, event: &Event<'_>) {
        let add = |c: &AtomicU64, n: u64| {
            c.fetch_add(n, Ordering::Relaxed);
        };
        match *event {
            Event::Connecting => {
                add(&self.connects, 1);
                if let Some(slot) = self.connecting_since.get(index) {
                    *lock(slot) = Some(Instant::now());
                }
            }
            Event::Welcome { .. } => {
                add(&self.sessions, 1);
                self.online.fetch_add(1, Ordering::Relaxed);
                if let Some(since) = self
                    .connecting_since
                    .get(index)
                    .and_then(|s| lock(s).take())
                {
                    self.connect_latency.record(since.elapsed());
                }
            }
            Event::Disconnected {
                was_ready,
                http_status,
                ..
            } => {
                if was_ready {
                    self.online.fetch_sub(1, Ordering::Relaxed);
                }
                if http_status == Some(503) {
                    add(&self.refused_busy, 1);
                }
                // Batches re-sent on the next connection are timed from their new send.
                if let Some(slot) = self.in_flight.get(index) {
                    lock(slot).clear();
                }
            }
            Event::Recorded {
                readings,
                evicted_readings,
                ..
            } => {
                add(&self.batches_recorded, 1);
                add(&self.readings_recorded, readings as u64);
                add(&self.readings_evicted, u64::from(evicted_readings));
            }
            Event::Sent { seq, .. } => {
                add(&self.batches_sent, 1);
                if let Some(slot) = self.in_flight.get(index) {
                    lock(slot).push_back((seq, Instant::now()));
                }
            }
            Event::Acked {
                batches,
                readings,
                up_to_seq,
            } => {
                add(&self.batches_acked, batches);
                add(&self.readings_acked, readings);
                if let Some(slot) = self.in_flight.get(index) {
                    let mut sent = lock(slot);
                    while let Some(&(seq, at)) = sent.front() {
                        if seq > up_to_seq {
                            break;
                        }
                        self.ack_latency.record(at.elapsed());
                        if self
                            .all_online
                            .get()
                            .is_some_and(|online| at >= *online + SETTLE)
                        {
                            self.ack_latency_all_online.record(at.elapsed());
                        }
                        sent.pop_front();
                    }
                }
            }
            Event::Command { .. } => add(&self.commands, 1),
            Event::HubError { .. } => add(&self.hub_errors, 1),
            Event::Connected | Event::SampleSkipped => {}
        }
    }

    fn first_welcome(&self, _index: usize, _device: &str) {
        if self.ever_online.fetch_add(1, Ordering::Relaxed) + 1 == self.count as u64 {
            let _ = self.all_online.set(Instant::now());
        }
    }
}

impl Counters {
    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    fn status(&self, count: usize, connects_per_s: f64) -> String {
        let sessions = Self::get(&self.sessions);
        let ever = Self::get(&self.ever_online);
        let mut line = format!(
            "online {}/{count} ({connects_per_s:.0} connects/s) · readings recorded {} sent {} batches, acked {} readings · ack {} · commands {} · reconnects {} · 503s {}",
            self.online.load(Ordering::Relaxed).max(0),
            Self::get(&self.readings_recorded),
            Self::get(&self.batches_sent),
            Self::get(&self.readings_acked),
            self.ack_latency.brief(),
            Self::get(&self.commands),
            sessions.saturating_sub(ever),
            Self::get(&self.refused_busy),
        );
        if Self::get(&self.commands_issued) > 0 {
            line.push_str(&format!(
                " · API commands {} ({} failed) round trip {}",
                Self::get(&self.commands_issued),
                Self::get(&self.commands_failed),
                self.command_round_trip.brief()
            ));
        }
        line
    }
}

/// The admin API's answer to `POST /api/v1/tokens`.
#[derive(Deserialize)]
struct TokensResponse {
    tokens: Vec<IssuedToken>,
}

#[derive(Deserialize)]
struct IssuedToken {
    device_id: String,
    token: String,
}

/// A file of the hub's data directory (bad input when it cannot be read).
fn read_trimmed(path: &Path, what: &str) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text.trim().to_string()),
        Err(e) => usage(format!(
            "cannot read {what} {}: {e} (is that a hub data directory, and has the hub started once?)",
            path.display()
        )),
    }
}

/// Tokens for `ids` from a `DEVICE_ID TOKEN` file.
fn tokens_from_file(path: &Path, ids: &[String]) -> anyhow::Result<HashMap<String, String>> {
    let text = read_input(path, "the tokens file")?;
    let mut tokens = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(id), Some(token), None) => {
                tokens.insert(id.to_string(), token.to_string());
            }
            _ => {
                return usage(format!(
                    "{}:{}: expected `DEVICE_ID TOKEN`",
                    path.display(),
                    n + 1
                ))
            }
        }
    }
    let missing: Vec<&String> = ids.iter().filter(|id| !tokens.contains_key(*id)).collect();
    if let Some(first) = missing.first() {
        return usage(format!(
            "{} has no token for {} device(s), the first is {first}",
            path.display(),
            missing.len()
        ));
    }
    Ok(tokens)
}

/// Tokens for `ids` from the hub's admin API, in batches.
fn tokens_from_api(
    api: &str,
    admin_token: &str,
    ids: &[String],
    ttl: &str,
) -> anyhow::Result<HashMap<String, String>> {
    let url = format!("{}/api/v1/tokens", api.trim_end_matches('/'));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let mut tokens = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(TOKEN_BATCH) {
        let body = serde_json::json!({ "device_ids": chunk, "ttl": ttl });
        let mut resp = agent
            .post(&url)
            .header("Authorization", &format!("Bearer {admin_token}"))
            .send_json(&body)
            .with_context(|| format!("cannot reach the hub's admin API at {url} (is the hub running? is --api right?)"))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.body_mut().read_to_string().unwrap_or_default();
            anyhow::bail!(
                "the admin API refused to issue tokens ({status}): {}",
                text.trim()
            );
        }
        let issued: TokensResponse = resp
            .body_mut()
            .read_json()
            .with_context(|| format!("unexpected answer from {url}"))?;
        for t in issued.tokens {
            tokens.insert(t.device_id, t.token);
        }
    }
    if let Some(first) = ids.iter().find(|id| !tokens.contains_key(*id)) {
        anyhow::bail!("the admin API issued no token for {first}");
    }
    Ok(tokens)
}

/// Waits for Ctrl-C, SIGTERM, or `duration`. A second Ctrl-C exits at once.
pub async fn wait_for_stop(duration: Option<Duration>) {
    let timeout = async {
        match duration {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {
            eprintln!("stopping: delivering unacknowledged readings (Ctrl-C again to quit at once)");
            tokio::spawn(async {
                if tokio::signal::ctrl_c().await.is_ok() {
                    std::process::exit(130);
                }
            });
        }
        _ = term => {}
        _ = timeout => {}
    }
}

/// The process's resident and peak memory (bytes), from /proc.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Runs `firmware-sim fleet`.
pub fn fleet(args: FleetArgs) -> anyhow::Result<ExitCode> {
    if args.count == 0 || args.count > 100_000 {
        return usage("--count must be between 1 and 100000");
    }
    let interval_ms = parse_interval(&args.interval)?;
    let drain = parse_duration("--drain-timeout", &args.drain_timeout)?;
    let duration = args
        .duration
        .as_deref()
        .map(|d| parse_duration("--duration", d))
        .transpose()?;
    let rate = parse_rate(&args.connect_rate)?;
    let sensors = SensorSet::parse(&args.sensors).or_else(usage)?;
    if args.ring_bytes < 1024 || args.ring_bytes > 1 << 20 {
        return usage("--ring-bytes must be between 1024 and 1048576");
    }
    let ids: Vec<String> = (0..args.count)
        .map(|i| format!("{}{:05}", args.prefix, args.first + i))
        .collect();
    if let Some(bad) = ids
        .iter()
        .find(|id| !schemas::limits::is_valid_device_id(id))
    {
        return usage(format!("--prefix makes an invalid device id `{bad}`"));
    }

    // Where the hub is, whom to trust, and where tokens come from.
    let target = match (&args.hub, &args.data_dir) {
        (Some(url), _) => {
            if let Err(e) = firmware_sim::Endpoint::parse(url) {
                return usage(format!("--hub `{url}`: {e}"));
            }
            HubTarget::Fixed(url.clone())
        }
        (None, Some(dir)) => {
            let path = dir.join("device-url");
            read_trimmed(&path, "the hub's device URL")?;
            HubTarget::file(path)
        }
        (None, None) => return usage("pass --hub URL or --data-dir DIR"),
    };
    let ca = match (&args.ca, &args.data_dir) {
        (Some(path), _) => Some(read_ca(path)?),
        (None, Some(dir)) => Some(read_ca(&dir.join("tls/ca.pem"))?),
        (None, None) => None,
    };
    let command_rate = match &args.commands {
        Some(rate) => Some(parse_rate(rate)?).filter(|r| *r > 0),
        None => None,
    };
    // The admin API, when tokens or commands need it.
    let api_access = if args.tokens.is_none() || command_rate.is_some() {
        Some(match (&args.api, &args.admin_token, &args.data_dir) {
            (Some(api), Some(t), _) => (api.clone(), t.clone()),
            (api, t, Some(dir)) => (
                match api {
                    Some(a) => a.clone(),
                    None => read_trimmed(&dir.join("admin-url"), "the hub's admin API URL")?,
                },
                match t {
                    Some(t) => t.clone(),
                    None => read_trimmed(&dir.join("admin-token"), "the hub's admin token")?,
                },
            ),
            (Some(_), None, None) => {
                return usage("--api needs --admin-token (or HUB_ADMIN_TOKEN)")
            }
            (None, _, None) if args.tokens.is_some() => {
                return usage("--commands needs --api URL with --admin-token, or --data-dir DIR")
            }
            (None, _, None) => {
                return usage("pass --tokens FILE, --api URL with --admin-token, or --data-dir DIR")
            }
        })
    } else {
        None
    };
    let tokens = match (&args.tokens, &api_access) {
        (Some(file), _) => tokens_from_file(file, &ids)?,
        (None, Some((api, admin))) => {
            eprintln!("issuing {} tokens through {api}", ids.len());
            tokens_from_api(api, admin, &ids, &args.ttl)?
        }
        (None, None) => {
            return usage("pass --tokens FILE, --api URL with --admin-token, or --data-dir DIR")
        }
    };
    let tls = ca.as_deref().map(|ca| tls_config(ca, None)).transpose()?;
    let failures = Arc::new(ConnectFailures::default());
    let net = Arc::new(NetShared {
        target,
        tls,
        limiter: Arc::new(RateLimiter::new(rate)),
        failures: failures.clone(),
        local_addrs: args.ifaddr.clone(),
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let counters = Arc::new(Counters::new(args.count));
        let sink: Arc<dyn EventSink> = counters.clone();
        let timer = HostTimer::new();
        let started = Instant::now();
        let (stop_tx, stop_rx) = watch::channel(false);
        let drain_ms = drain.as_millis().min(u128::from(u32::MAX)) as u32;
        let mut tasks = tokio::task::JoinSet::new();
        for (index, id) in ids.iter().enumerate() {
            let token = tokens.get(id).cloned().unwrap_or_default();
            let spec = DeviceSpec {
                index,
                id: Arc::from(id.as_str()),
                token,
                firmware: FIRMWARE.to_string(),
                interval_ms,
                first_sample_ms: if args.aligned {
                    0
                } else {
                    sample_phase(index, interval_ms)
                },
                sensors,
                // Blank flash: the firmware formats it at boot (sequence 1).
                flash: RamFlash::new(vec![0xFFu8; args.ring_bytes]),
                rx_len: 1024,
                tx_len: 1536,
            };
            tasks.spawn(run_device(
                spec,
                net.clone(),
                timer,
                stop_rx.clone(),
                drain_ms,
                sink.clone(),
            ));
        }
        drop(tokens);
        let command_load = match (command_rate, &api_access) {
            (Some(rate), Some((api, admin))) => Some(tokio::spawn(commands::send_commands(
                api.trim_end_matches('/').to_string(),
                admin.clone(),
                ids.clone(),
                rate,
                counters.clone(),
                stop_rx.clone(),
            ))),
            _ => None,
        };

        let monitor = tokio::spawn(monitor(
            counters.clone(),
            args.count,
            started,
            stop_rx.clone(),
        ));
        wait_for_stop(duration).await;
        let _ = stop_tx.send(true);
        let all_online_after = monitor.await.ok().flatten();
        if let Some(load) = command_load {
            let _ = load.await;
        }
        let (rss_running, _) = memory();

        let mut reports: Vec<DeviceReport> = Vec::with_capacity(args.count);
        let mut errors: Vec<String> = Vec::new();
        let deadline = Instant::now() + drain + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, tasks.join_next()).await {
                Ok(Some(Ok(report))) => {
                    if let Some(e) = &report.error {
                        errors.push(format!("{}: {e}", report.id));
                    }
                    reports.push(report);
                }
                Ok(Some(Err(e))) => errors.push(format!("a device task failed: {e}")),
                Ok(None) => break,
                Err(_) => {
                    errors.push(format!(
                        "{} devices did not stop within the drain timeout",
                        tasks.len()
                    ));
                    tasks.abort_all();
                    break;
                }
            }
        }
        reports.sort_by_key(|r| r.index);
        let (_, rss_peak) = memory();
        let elapsed = started.elapsed().as_secs_f64();
        let sum = |f: fn(&DeviceReport) -> u64| reports.iter().map(f).sum::<u64>();
        let unacked = sum(|r| r.unacked_batches as u64);
        let sessions = sum(|r| r.stats.sessions);
        let ever = Counters::get(&counters.ever_online);
        if let Some(tls) = failures.first_tls() {
            // Retrying does not fix a certificate: a device that never got in because of
            // one is a failure of the run.
            let never = reports.iter().filter(|r| r.stats.sessions == 0).count();
            if never > 0 {
                errors.push(format!(
                    "{never} of {} devices never connected; {tls}",
                    args.count
                ));
            }
        }
        let mut summary = serde_json::json!({
            "devices": args.count,
            "ever_connected": ever,
            "time_to_all_connected_s": all_online_after.map(|d| d.as_secs_f64()),
            "connects_per_s": all_online_after.map(|d| args.count as f64 / d.as_secs_f64().max(1e-3)),
            "connect_latency": counters.connect_latency.summary_ms(),
            "ack_latency": counters.ack_latency.summary_ms(),
            "ack_latency_all_online": counters.ack_latency_all_online.summary_ms(),
            "refused_busy": Counters::get(&counters.refused_busy),
            "commands_issued": Counters::get(&counters.commands_issued),
            "commands_failed": Counters::get(&counters.commands_failed),
            "command_round_trip": counters.command_round_trip.summary_ms(),
            "connect_attempts": sum(|r| r.stats.connects),
            "sessions": sessions,
            "reconnects": sessions.saturating_sub(ever),
            "batches_recorded": sum(|r| r.stats.batches_recorded),
            "readings_recorded": sum(|r| r.stats.readings_recorded),
            "batches_sent": sum(|r| r.stats.batches_sent),
            "batches_acked": sum(|r| r.stats.batches_acked),
            "readings_acked": sum(|r| r.stats.readings_acked),
            "readings_evicted": sum(|r| r.stats.readings_evicted),
            "readings_rejected": sum(|r| r.stats.readings_rejected),
            "unacked_batches": unacked,
            "commands": sum(|r| r.stats.commands),
            "hub_errors": Counters::get(&counters.hub_errors),
            "connect_failures": failures.other() + failures.tls(),
            "tls_failures": failures.tls(),
            "tls_error": failures.first_tls(),
            "reboots": sum(|r| u64::from(r.reboots)),
            "elapsed_s": elapsed,
            "rss_bytes": rss_running,
            "rss_peak_bytes": rss_peak,
            "rss_per_device_bytes": rss_running / args.count as u64,
            "errors": errors,
        });
        if args.per_device {
            summary["per_device"] = reports
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "device": &*r.id,
                        "batches_recorded": r.stats.batches_recorded,
                        "readings_recorded": r.stats.readings_recorded,
                        "batches_acked": r.stats.batches_acked,
                        "readings_acked": r.stats.readings_acked,
                        "readings_evicted": r.stats.readings_evicted,
                        "last_acked_seq": r.last_acked_seq,
                        "unacked_batches": r.unacked_batches,
                        "sessions": r.stats.sessions,
                        "commands": r.stats.commands,
                        "reboots": r.reboots,
                        "error": r.error,
                    })
                })
                .collect();
        }
        if args.json {
            println!("{summary}");
        } else {
            print_summary(&summary);
        }
        Ok::<_, anyhow::Error>(if errors.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        })
    })
}

fn print_summary(s: &serde_json::Value) {
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    println!("fleet summary");
    println!(
        "  devices            {} (ever connected {})",
        n("devices"),
        n("ever_connected")
    );
    match s["time_to_all_connected_s"].as_f64() {
        Some(t) => println!(
            "  all connected in   {t:.1} s ({:.0} devices/s)",
            s["connects_per_s"].as_f64().unwrap_or(0.0)
        ),
        None => println!("  all connected in   never"),
    }
    println!(
        "  connect latency    {}",
        latency_line(&s["connect_latency"])
    );
    println!("  ack latency        {}", latency_line(&s["ack_latency"]));
    println!(
        "    once settled     {}",
        latency_line(&s["ack_latency_all_online"])
    );
    if n("commands_issued") > 0 {
        println!(
            "  API commands       {} ({} did not succeed), round trip {}",
            n("commands_issued"),
            n("commands_failed"),
            latency_line(&s["command_round_trip"])
        );
    }
    if n("refused_busy") > 0 {
        println!("  refused (503)      {}", n("refused_busy"));
    }
    println!(
        "  connect attempts   {} (sessions {}, reconnects {})",
        n("connect_attempts"),
        n("sessions"),
        n("reconnects")
    );
    println!(
        "  readings recorded  {} in {} batches",
        n("readings_recorded"),
        n("batches_recorded")
    );
    println!(
        "  batches sent       {} (re-sends included)",
        n("batches_sent")
    );
    println!(
        "  readings acked     {} in {} batches",
        n("readings_acked"),
        n("batches_acked")
    );
    println!(
        "  readings lost      {} (flash full)",
        n("readings_evicted")
    );
    println!("  unacked batches    {}", n("unacked_batches"));
    if n("connect_failures") > 0 {
        println!(
            "  failed connects    {} ({} TLS handshakes)",
            n("connect_failures"),
            n("tls_failures")
        );
    }
    println!("  commands           {}", n("commands"));
    println!(
        "  elapsed            {:.1} s",
        s["elapsed_s"].as_f64().unwrap_or(0.0)
    );
    println!(
        "  memory             {} MiB resident, {} bytes per device",
        n("rss_bytes") >> 20,
        n("rss_per_device_bytes")
    );
    if let Some(errors) = s["errors"].as_array() {
        for e in errors {
            println!("  error              {}", e.as_str().unwrap_or_default());
        }
    }
}

/// Device `index`'s first sample, in milliseconds after it starts: the fractional part of
/// `index` times the golden ratio, scaled to the interval. Consecutive devices land far
/// apart and any number of them cover the interval evenly (the same device always gets
/// the same phase, so runs are repeatable).
fn sample_phase(index: usize, interval_ms: u32) -> u32 {
    const GOLDEN_FRACTION: u64 = 0x9E37_79B9_7F4A_7C15;
    let fraction = (index as u64).wrapping_mul(GOLDEN_FRACTION);
    ((u128::from(fraction) * u128::from(interval_ms)) >> 64) as u32
}

/// `p50 A ms · p99 B ms · max C ms (N samples)` from a latency summary object.
fn latency_line(l: &serde_json::Value) -> String {
    let ms = |k: &str| {
        l[k].as_f64()
            .map_or("-".to_string(), |v| format!("{v:.1} ms"))
    };
    format!(
        "p50 {} · p99 {} · max {} ({} samples)",
        ms("p50_ms"),
        ms("p99_ms"),
        ms("max_ms"),
        l["count"].as_u64().unwrap_or(0)
    )
}

/// Shows a progress bar until every device has connected once, then a status line. On a
/// terminal it redraws in place; otherwise it prints a status line every 10 s. Returns
/// how long it took until every device had connected, if they did. Ends at the first tick
/// after `stop` turns true.
async fn monitor(
    counters: Arc<Counters>,
    count: usize,
    started: Instant,
    stop: watch::Receiver<bool>,
) -> Option<Duration> {
    let tty = std::io::stderr().is_terminal();
    let bar = ProgressBar::new(count as u64);
    if let Ok(style) = ProgressStyle::with_template(
        "{spinner} connecting [{bar:30}] {pos}/{len} devices ({per_sec}, eta {eta}) {msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    if !tty {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut all_online: Option<Duration> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut last_plain = Instant::now();
    let mut status: Option<ProgressBar> = None;
    // Sessions per second over the last second or so, for the status line.
    let (mut rate_at, mut rate_sessions, mut connects_per_s) = (Instant::now(), 0u64, 0.0);
    loop {
        tick.tick().await;
        let ever = Counters::get(&counters.ever_online);
        if rate_at.elapsed() >= Duration::from_secs(1) {
            let sessions = Counters::get(&counters.sessions);
            connects_per_s = (sessions - rate_sessions) as f64 / rate_at.elapsed().as_secs_f64();
            (rate_at, rate_sessions) = (Instant::now(), sessions);
        }
        if all_online.is_none() {
            bar.set_position(ever);
            if ever as usize >= count {
                all_online = Some(started.elapsed());
                bar.finish_and_clear();
                let line = format!(
                    "all {count} devices connected in {:.1} s",
                    started.elapsed().as_secs_f64()
                );
                eprintln!("{line}");
                let s = ProgressBar::new_spinner();
                if let Ok(style) = ProgressStyle::with_template("{spinner} {msg}") {
                    s.set_style(style);
                }
                if !tty {
                    s.set_draw_target(indicatif::ProgressDrawTarget::hidden());
                }
                status = Some(s);
            }
        }
        let text = counters.status(count, connects_per_s);
        match &status {
            Some(s) => {
                s.set_message(text.clone());
                s.tick();
            }
            None => bar.set_message(format!(
                "· acked {} readings",
                Counters::get(&counters.readings_acked)
            )),
        }
        if !tty && last_plain.elapsed() >= Duration::from_secs(10) {
            last_plain = Instant::now();
            eprintln!("{text}");
        }
        if *stop.borrow() {
            if let Some(s) = status {
                s.finish_and_clear();
            } else {
                bar.finish_and_clear();
            }
            return all_online;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::sample_phase;

    #[test]
    fn sample_phases_cover_the_interval_evenly() {
        // 10,000 devices sampling every 1.4 s: every 100 ms of the interval holds
        // about a fourteenth of them, so no moment of it sees a burst.
        let mut buckets = [0u32; 14];
        for index in 0..10_000 {
            let phase = sample_phase(index, 1_400);
            assert!(phase < 1_400, "{phase}");
            buckets[(phase / 100) as usize] += 1;
        }
        for (i, n) in buckets.iter().enumerate() {
            assert!(
                (700..=730).contains(n),
                "bucket {i}: {n} devices: {buckets:?}"
            );
        }
        assert_eq!(sample_phase(7, 1_400), sample_phase(7, 1_400));
    }
}

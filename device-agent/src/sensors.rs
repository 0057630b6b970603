//! Sensors: each runs as its own task on its own interval and sends its readings to the
//! agent's event loop over a bounded channel.
//!
//! - `system`: CPU, memory, load, uptime, disks, network counters and temperatures via
//!   `sysinfo` (metric names in [`system_metrics`]);
//! - `exec`: runs a program (see [`crate::process`]) and reads a number, or a JSON object
//!   of numbers, from its standard output;
//! - `file`: reads a number from a file such as `/sys/class/thermal/thermal_zone0/temp`,
//!   with an optional scale and offset.
//!
//! When the event loop is busy and the channel (64 samples) is full, a sensor waits
//! before sampling again: a sample not taken is not a reading lost. A sensor that fails
//! logs a warning when it starts failing and when it recovers, not at every interval.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use schemas::message::truncated;
use schemas::Reading;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use crate::config::{ExecSensor, FileSensor, SensorConfig, SensorKind, SystemSensor};
use crate::names::{metric, mount_label, sanitize_component};
use crate::process::{self, SpawnError, Spec};

/// Capacity of the channel from the sensors to the event loop, in samples.
pub const CHANNEL: usize = 64;
/// Most readings one sample may produce (a JSON object from an `exec` sensor, say);
/// further ones are ignored with a warning.
pub const MAX_SAMPLE_READINGS: usize = 512;
/// Most bytes read from an `exec` sensor's stdout or a `file` sensor's file.
const MAX_SENSOR_OUTPUT: usize = 64 * 1024;

/// How long after it starts a system sensor takes its first sample. CPU usage is the share
/// of busy time between two reads of the kernel's counters, which count in ticks of
/// 10 ms: over sysinfo's minimum of 200 ms an idle machine shows 0 % and a lightly loaded
/// one jumps in steps of several percent. A second is long enough for a first reading
/// that means something, and short enough not to leave a new agent silent.
const CPU_FIRST_WINDOW: Duration = Duration::from_secs(1);

/// Why an `exec` sensor's output holds no reading.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// A number, but infinite or NaN.
    #[error("output {output:?} is not a finite number")]
    NotFinite {
        /// The output, trimmed.
        output: String,
    },
    /// It starts with `{` but is not JSON.
    #[error("output is not valid JSON: {source}")]
    Json {
        /// What the JSON parser found.
        #[source]
        source: serde_json::Error,
    },
    /// A JSON object without a number or boolean in it.
    #[error("the JSON object has no numbers")]
    NoNumbers,
    /// Neither a number nor a JSON object.
    #[error("output is neither a number nor a JSON object of numbers: {start:?}")]
    Unreadable {
        /// The output's first 64 bytes, trimmed.
        start: String,
    },
}

/// Why a file holds no number.
#[derive(Debug, thiserror::Error)]
pub enum ReadNumberError {
    /// The file cannot be opened or read.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// Its first word is not a finite number.
    #[error("{} does not start with a number: {start:?}", .path.display())]
    NotANumber {
        /// The file.
        path: PathBuf,
        /// Its first word, at most 64 bytes of it.
        start: String,
    },
}

/// Why a sensor produced no sample this time.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    /// Reading the system failed (the blocking task panicked or was cancelled).
    #[error("system sampling failed: {source}")]
    System {
        /// How the task ended.
        #[source]
        source: tokio::task::JoinError,
    },
    /// An `exec` sensor's program could not be started.
    #[error(transparent)]
    Spawn(#[from] SpawnError),
    /// An `exec` sensor's program failed, was killed or timed out.
    #[error(
        "{} exited with {}{}: {stderr}",
        .program.display(),
        .exit.code(),
        if *.exit == process::Exit::TimedOut { " (timed out)" } else { "" }
    )]
    Exited {
        /// The program.
        program: PathBuf,
        /// How it ended.
        exit: process::Exit,
        /// Its standard error, trimmed, at most 200 bytes of it.
        stderr: String,
    },
    /// An `exec` sensor's program wrote more than the agent reads.
    #[error("output is longer than {limit} bytes")]
    OutputTooLong {
        /// The most bytes read.
        limit: usize,
    },
    /// An `exec` sensor's output holds no reading.
    #[error(transparent)]
    Output(#[from] OutputError),
    /// A `file` sensor's file holds no number.
    #[error(transparent)]
    File(#[from] ReadNumberError),
}

/// The readings of one sensor at one time.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The sensor's name.
    pub sensor: String,
    /// Its readings (valid metric names, finite values).
    pub readings: Vec<Reading>,
}

/// Controls a running sensor (for `report-now` and `set-interval`).
#[derive(Debug)]
pub struct SensorHandle {
    /// The sensor's name.
    pub name: String,
    /// `system`, `exec` or `file`.
    pub kind: &'static str,
    interval: watch::Sender<Duration>,
    trigger: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl SensorHandle {
    /// Takes a sample now, without moving the regular schedule.
    pub fn trigger(&self) {
        self.trigger.notify_one();
    }

    /// Changes the interval from now on (until the agent restarts).
    pub fn set_interval(&self, interval: Duration) {
        self.interval.send_replace(interval);
    }

    /// The current interval.
    pub fn interval(&self) -> Duration {
        *self.interval.borrow()
    }
}

impl Drop for SensorHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts every sensor.
pub fn spawn_all(configs: &[SensorConfig], tx: &mpsc::Sender<Sample>) -> Vec<SensorHandle> {
    configs
        .iter()
        .map(|c| {
            let (interval_tx, interval_rx) = watch::channel(c.interval);
            let trigger = Arc::new(Notify::new());
            let sampler = match &c.kind {
                SensorKind::System(opts) => {
                    Sampler::System(Box::new(SystemState::new(opts.clone())))
                }
                SensorKind::Exec(opts) => Sampler::Exec(opts.clone()),
                SensorKind::File(opts) => Sampler::File(opts.clone()),
            };
            let task = tokio::spawn(run(
                c.name.clone(),
                sampler,
                interval_rx,
                trigger.clone(),
                tx.clone(),
            ));
            SensorHandle {
                name: c.name.clone(),
                kind: c.kind.name(),
                interval: interval_tx,
                trigger,
                task,
            }
        })
        .collect()
}

/// Takes one sample from a sensor (for `device-agent sample`).
///
/// # Errors
/// [`SampleError`]: what the sensor reported.
pub async fn sample_once(config: &SensorConfig) -> Result<Vec<(String, f64)>, SampleError> {
    let mut sampler = match &config.kind {
        SensorKind::System(opts) => Sampler::System(Box::new(SystemState::new(opts.clone()))),
        SensorKind::Exec(opts) => Sampler::Exec(opts.clone()),
        SensorKind::File(opts) => Sampler::File(opts.clone()),
    };
    tokio::time::sleep(sampler.warm_up()).await;
    sampler.sample().await
}

enum Sampler {
    System(Box<SystemState>),
    Exec(ExecSensor),
    File(FileSensor),
}

impl Sampler {
    async fn sample(&mut self) -> Result<Vec<(String, f64)>, SampleError> {
        match self {
            Sampler::System(state) => {
                // sysinfo reads /proc and /sys synchronously: off the async threads.
                let mut owned = std::mem::replace(state, Box::new(SystemState::empty()));
                let (owned, values) = tokio::task::spawn_blocking(move || {
                    let values = owned.sample();
                    (owned, values)
                })
                .await
                .map_err(|source| SampleError::System { source })?;
                *state = owned;
                Ok(values)
            }
            Sampler::Exec(opts) => sample_exec(opts).await,
            Sampler::File(opts) => sample_file(opts).await,
        }
    }

    fn warm_up(&self) -> Duration {
        match self {
            Sampler::System(_) => CPU_FIRST_WINDOW,
            _ => Duration::ZERO,
        }
    }
}

async fn run(
    name: String,
    mut sampler: Sampler,
    mut interval_rx: watch::Receiver<Duration>,
    trigger: Arc<Notify>,
    tx: mpsc::Sender<Sample>,
) {
    let mut interval = *interval_rx.borrow_and_update();
    let mut next = Instant::now() + sampler.warm_up();
    let mut failing = false;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next) => {
                next += interval;
                let now = Instant::now();
                if next < now {
                    // Fell behind (a slow program, a suspended machine): skip, do not burst.
                    next = now + interval;
                }
            }
            () = trigger.notified() => {}
            changed = interval_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                interval = *interval_rx.borrow_and_update();
                next = Instant::now() + interval;
                tracing::info!(sensor = %name, interval = %humantime::format_duration(interval), "sensor interval changed");
                continue;
            }
        }
        let ts = crate::epoch_ms();
        match sampler.sample().await {
            Ok(values) => {
                if failing {
                    tracing::info!(sensor = %name, "sensor recovered");
                    failing = false;
                }
                if values.len() > MAX_SAMPLE_READINGS {
                    tracing::warn!(sensor = %name, count = values.len(), max = MAX_SAMPLE_READINGS, "sample has too many values; extra ones ignored");
                }
                let readings: Vec<Reading> = values
                    .into_iter()
                    .filter(|(_, v)| v.is_finite())
                    .take(MAX_SAMPLE_READINGS)
                    .map(|(m, value)| Reading {
                        metric: truncated(&m),
                        ts,
                        value,
                    })
                    .collect();
                if readings.is_empty() {
                    continue;
                }
                let sample = Sample {
                    sensor: name.clone(),
                    readings,
                };
                if tx.send(sample).await.is_err() {
                    return;
                }
            }
            Err(why) => {
                if failing {
                    tracing::debug!(sensor = %name, "sensor still failing: {why}");
                } else {
                    tracing::warn!(sensor = %name, "sensor failed: {why}");
                    failing = true;
                }
            }
        }
    }
}

/// Parses an `exec` sensor's output: a number (metric `prefix`) or a JSON object of
/// numbers (metrics `prefix.key`, nested objects joined with `.`; booleans are 1 or 0;
/// other values are ignored). Keys are sanitized to metric-name characters.
///
/// # Errors
/// [`OutputError`]: the output is neither.
pub fn parse_exec_output(text: &str, prefix: &str) -> Result<Vec<(String, f64)>, OutputError> {
    let t = text.trim();
    if let Ok(v) = t.parse::<f64>() {
        return if v.is_finite() {
            Ok(vec![(prefix.to_string(), v)])
        } else {
            Err(OutputError::NotFinite {
                output: t.to_string(),
            })
        };
    }
    if t.starts_with('{') {
        let value: serde_json::Value =
            serde_json::from_str(t).map_err(|source| OutputError::Json { source })?;
        let mut out = Vec::new();
        flatten(&value, prefix, 0, &mut out);
        if out.is_empty() {
            return Err(OutputError::NoNumbers);
        }
        return Ok(out);
    }
    Err(OutputError::Unreadable {
        start: process::cut(t, 64).to_string(),
    })
}

fn flatten(value: &serde_json::Value, name: &str, depth: usize, out: &mut Vec<(String, f64)>) {
    use serde_json::Value;
    match value {
        Value::Number(n) => {
            if let Some(v) = n.as_f64().filter(|v| v.is_finite()) {
                out.push((name.to_string(), v));
            }
        }
        Value::Bool(b) => out.push((name.to_string(), if *b { 1.0 } else { 0.0 })),
        Value::Object(map) if depth < 4 => {
            for (k, v) in map {
                if let Some(m) = metric(&[name, &sanitize_component(k)]) {
                    flatten(v, &m, depth + 1, out);
                }
            }
        }
        _ => {}
    }
}

async fn sample_exec(opts: &ExecSensor) -> Result<Vec<(String, f64)>, SampleError> {
    let spec = Spec {
        program: &opts.program,
        args: &opts.args,
        env: &opts.env,
        cwd: None,
        timeout: opts.timeout,
        max_output: MAX_SENSOR_OUTPUT,
    };
    let out = process::run(&spec).await?;
    if !out.exit.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(SampleError::Exited {
            program: opts.program.clone(),
            exit: out.exit,
            stderr: process::cut(err.trim(), 200).to_string(),
        });
    }
    if out.truncated {
        return Err(SampleError::OutputTooLong {
            limit: MAX_SENSOR_OUTPUT,
        });
    }
    Ok(parse_exec_output(
        &String::from_utf8_lossy(&out.stdout),
        &opts.metric,
    )?)
}

/// Reads the first number in a file (at most 64 KiB of it).
///
/// # Errors
/// [`ReadNumberError`]: the file cannot be read or does not start with a number.
pub async fn read_number(path: &Path) -> Result<f64, ReadNumberError> {
    use tokio::io::AsyncReadExt;
    let io = |source| ReadNumberError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = tokio::fs::File::open(path).await.map_err(io)?;
    let mut text = String::new();
    file.take(MAX_SENSOR_OUTPUT as u64)
        .read_to_string(&mut text)
        .await
        .map_err(io)?;
    let first = text.split_whitespace().next().unwrap_or("");
    first
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| ReadNumberError::NotANumber {
            path: path.to_path_buf(),
            start: process::cut(first, 64).to_string(),
        })
}

async fn sample_file(opts: &FileSensor) -> Result<Vec<(String, f64)>, SampleError> {
    let v = read_number(&opts.path).await?;
    Ok(vec![(opts.metric.clone(), v * opts.scale + opts.offset)])
}

/// A file system's space as `df` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DiskSpace {
    /// Size of the file system.
    total: u64,
    /// Free blocks, those reserved for root included.
    free: u64,
    /// What unprivileged users may still write.
    available: u64,
}

impl DiskSpace {
    /// The space of the file system mounted at `mount` (`None` when it cannot be read, as
    /// for a mount point that went away).
    fn of(mount: &Path) -> Option<DiskSpace> {
        let st = rustix::fs::statvfs(mount).ok()?;
        Some(DiskSpace {
            total: st.f_blocks.saturating_mul(st.f_frsize),
            free: st.f_bfree.saturating_mul(st.f_frsize),
            available: st.f_bavail.saturating_mul(st.f_frsize),
        })
    }

    /// Used space as `df` counts it: what is not free, so the blocks reserved for root
    /// count as free, not as used.
    fn used(&self) -> u64 {
        self.total.saturating_sub(self.free)
    }
}

/// sysinfo's state, kept between samples (CPU usage and nothing else needs the previous
/// refresh, but re-listing disks and interfaces every time would be wasteful).
struct SystemState {
    opts: SystemSensor,
    sys: Option<sysinfo::System>,
    disks: Option<sysinfo::Disks>,
    networks: Option<sysinfo::Networks>,
    components: Option<sysinfo::Components>,
}

impl SystemState {
    fn empty() -> SystemState {
        SystemState {
            opts: SystemSensor::default(),
            sys: None,
            disks: None,
            networks: None,
            components: None,
        }
    }

    fn new(opts: SystemSensor) -> SystemState {
        let mut sys = sysinfo::System::new().ok();
        if let Some(s) = sys.as_mut() {
            s.refresh_cpu_usage();
        }
        SystemState {
            sys,
            disks: if opts.disks {
                sysinfo::Disks::new().ok()
            } else {
                None
            },
            networks: if opts.network {
                sysinfo::Networks::new().ok()
            } else {
                None
            },
            components: if opts.temperatures {
                sysinfo::Components::new().ok()
            } else {
                None
            },
            opts,
        }
    }

    fn sample(&mut self) -> Vec<(String, f64)> {
        system_metrics(self)
    }
}

/// Reads the system. Metric names: `cpu.usage_pct`, `cpu.N.usage_pct` (with `per_cpu`),
/// `mem.total_bytes`, `mem.used_bytes`, `mem.available_bytes`, `swap.total_bytes`,
/// `swap.used_bytes`, `load.1`, `load.5`, `load.15`, `uptime_s`,
/// `disk.LABEL.total_bytes`, `disk.LABEL.used_bytes`, `disk.LABEL.available_bytes` (as
/// `df` reports size, used and available; LABEL is `root` for `/`, else the mount path
/// with `/` as `_`), `net.IFACE.rx_bytes`, `net.IFACE.tx_bytes` (counters
/// since boot), `temp.LABEL` (°C).
fn system_metrics(state: &mut SystemState) -> Vec<(String, f64)> {
    let o = &state.opts;
    let mut out: Vec<(String, f64)> = Vec::new();
    if let Some(sys) = state.sys.as_mut() {
        if o.cpu {
            sys.refresh_cpu_usage();
            out.push(("cpu.usage_pct".into(), f64::from(sys.global_cpu_usage())));
            if o.per_cpu {
                for (i, cpu) in sys.cpus().iter().enumerate() {
                    out.push((format!("cpu.{i}.usage_pct"), f64::from(cpu.usage())));
                }
            }
        }
        if o.memory {
            sys.refresh_memory();
            out.push(("mem.total_bytes".into(), sys.total_memory() as f64));
            out.push(("mem.used_bytes".into(), sys.used_memory() as f64));
            out.push(("mem.available_bytes".into(), sys.available_memory() as f64));
            out.push(("swap.total_bytes".into(), sys.total_swap() as f64));
            out.push(("swap.used_bytes".into(), sys.used_swap() as f64));
        }
    }
    if o.load {
        if let Ok(l) = sysinfo::System::load_average() {
            out.push(("load.1".into(), l.one));
            out.push(("load.5".into(), l.five));
            out.push(("load.15".into(), l.fifteen));
        }
    }
    if o.uptime {
        if let Ok(u) = sysinfo::System::uptime() {
            out.push(("uptime_s".into(), u as f64));
        }
    }
    if let Some(disks) = state.disks.as_mut() {
        disks.refresh(true);
        let mut seen = std::collections::BTreeSet::new();
        for d in disks.iter() {
            let mount = d.mount_point().to_string_lossy();
            if !o.mounts.is_empty() && !o.mounts.iter().any(|m| m == mount.as_ref()) {
                continue;
            }
            let total = d.total_space();
            if total == 0 {
                continue;
            }
            let label = mount_label(&mount);
            // Bind mounts of the same file system show up twice; report each label once.
            if !seen.insert(label.clone()) {
                continue;
            }
            // sysinfo has no free space (only the space available to unprivileged users,
            // which leaves out the blocks reserved for root): ask the file system.
            let Some(space) = DiskSpace::of(d.mount_point()) else {
                continue;
            };
            for (name, value) in [
                ("total_bytes", space.total),
                ("used_bytes", space.used()),
                ("available_bytes", space.available),
            ] {
                if let Some(m) = metric(&["disk", &label, name]) {
                    out.push((m, value as f64));
                }
            }
        }
    }
    if let Some(nets) = state.networks.as_mut() {
        nets.refresh(true);
        let mut names: Vec<_> = nets.iter().collect();
        names.sort_by(|a, b| a.0.cmp(b.0));
        for (name, data) in names {
            let name = name.to_string_lossy();
            let wanted = if o.interfaces.is_empty() {
                name != "lo"
            } else {
                o.interfaces.iter().any(|i| i == name.as_ref())
            };
            if !wanted {
                continue;
            }
            let label = sanitize_component(&name);
            if let Some(m) = metric(&["net", &label, "rx_bytes"]) {
                out.push((m, data.total_received() as f64));
            }
            if let Some(m) = metric(&["net", &label, "tx_bytes"]) {
                out.push((m, data.total_transmitted() as f64));
            }
        }
    }
    if let Some(comps) = state.components.as_mut() {
        comps.refresh(true);
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        for c in comps.iter() {
            let Some(t) = c.temperature() else { continue };
            let mut label = sanitize_component(c.label());
            let n = seen.entry(label.clone()).or_insert(0);
            *n += 1;
            if *n > 1 {
                label = format!("{label}_{n}");
            }
            if let Some(m) = metric(&["temp", &label]) {
                out.push((m, f64::from(t)));
            }
        }
    }
    out.retain(|(_, v)| v.is_finite());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_output_parses_numbers_and_json() {
        assert_eq!(
            parse_exec_output(" 42\n", "m").expect("n"),
            [("m".to_string(), 42.0)]
        );
        let v = parse_exec_output(
            r#"{"rpm": 1200, "fan speed": 3.5, "ok": true, "name": "x", "deep": {"a": 1}}"#,
            "fan",
        )
        .expect("json");
        let mut v = v;
        v.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            v,
            [
                ("fan.deep.a".to_string(), 1.0),
                ("fan.fan_speed".to_string(), 3.5),
                ("fan.ok".to_string(), 1.0),
                ("fan.rpm".to_string(), 1200.0),
            ]
        );
        assert!(matches!(
            parse_exec_output("hello", "m"),
            Err(OutputError::Unreadable { start }) if start == "hello"
        ));
        assert!(matches!(
            parse_exec_output("inf", "m"),
            Err(OutputError::NotFinite { .. })
        ));
        assert!(matches!(
            parse_exec_output("{}", "m"),
            Err(OutputError::NoNumbers)
        ));
        assert!(matches!(
            parse_exec_output("{nope", "m"),
            Err(OutputError::Json { .. })
        ));
    }

    /// Failures reach operators as `device-agent sample` output and log lines: their
    /// words must not change with the types behind them.
    #[tokio::test]
    async fn failures_read_as_operators_know_them() {
        let shown = |e: &dyn std::error::Error| e.to_string();
        let err = parse_exec_output(&format!(" {}\n", "x".repeat(100)), "m").expect_err("text");
        assert_eq!(
            shown(&err),
            format!(
                "output is neither a number nor a JSON object of numbers: {:?}",
                "x".repeat(64)
            )
        );
        let err = parse_exec_output("NaN", "m").expect_err("nan");
        assert_eq!(shown(&err), r#"output "NaN" is not a finite number"#);
        let err = parse_exec_output(r#"{"a": "b"}"#, "m").expect_err("no numbers");
        assert_eq!(shown(&err), "the JSON object has no numbers");
        let err = parse_exec_output("{nope", "m").expect_err("json");
        assert!(shown(&err).starts_with("output is not valid JSON: "));
        let err = read_number(Path::new("/nonexistent/x"))
            .await
            .expect_err("missing");
        assert!(
            shown(&err).starts_with("/nonexistent/x: "),
            "{}",
            shown(&err)
        );
        let failing = ExecSensor {
            program: PathBuf::from("/bin/sh"),
            args: vec!["-c".to_string(), "echo ' oops ' >&2; exit 3".to_string()],
            ..ExecSensor::default()
        };
        let err = sample_exec(&failing).await.expect_err("exit 3");
        assert!(matches!(
            err,
            SampleError::Exited {
                exit: process::Exit::Code(3),
                ..
            }
        ));
        assert_eq!(shown(&err), "/bin/sh exited with 3: oops");
        let timed_out = SampleError::Exited {
            program: PathBuf::from("/usr/bin/probe"),
            exit: process::Exit::TimedOut,
            stderr: String::new(),
        };
        assert_eq!(
            shown(&timed_out),
            "/usr/bin/probe exited with 124 (timed out): "
        );
        let missing = ExecSensor {
            program: PathBuf::from("/nonexistent/probe"),
            ..ExecSensor::default()
        };
        let err = sample_exec(&missing).await.expect_err("not found");
        assert!(matches!(err, SampleError::Spawn(_)));
        assert!(
            shown(&err).starts_with("cannot run /nonexistent/probe: "),
            "{}",
            shown(&err)
        );
        assert_eq!(
            shown(&SampleError::OutputTooLong {
                limit: MAX_SENSOR_OUTPUT
            }),
            "output is longer than 65536 bytes"
        );
    }

    #[tokio::test]
    async fn file_numbers_are_read() {
        let dir = tempfile::tempdir().expect("temp dir");
        let p = dir.path().join("temp");
        std::fs::write(&p, "45123\n").expect("write");
        let v = sample_file(&FileSensor {
            path: p.clone(),
            scale: 0.001,
            offset: 0.0,
            metric: "cpu_temp".to_string(),
        })
        .await
        .expect("read");
        assert_eq!(v[0].0, "cpu_temp");
        assert!((v[0].1 - 45.123).abs() < 1e-9);
        std::fs::write(&p, "n/a").expect("write");
        let err = read_number(&p).await.expect_err("not a number");
        assert_eq!(
            err.to_string(),
            format!("{} does not start with a number: \"n/a\"", p.display())
        );
        assert!(matches!(
            read_number(Path::new("/nonexistent/x")).await,
            Err(ReadNumberError::Io { .. })
        ));
    }

    #[test]
    fn system_metrics_have_valid_names() {
        let mut state = SystemState::new(SystemSensor {
            per_cpu: true,
            ..SystemSensor::default()
        });
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        let values = state.sample();
        let names: Vec<&str> = values.iter().map(|(m, _)| m.as_str()).collect();
        for m in &names {
            assert!(
                schemas::limits::is_valid_name(m, schemas::limits::MAX_METRIC_LEN),
                "{m}"
            );
        }
        for expected in [
            "cpu.usage_pct",
            "mem.total_bytes",
            "mem.used_bytes",
            "load.1",
            "uptime_s",
        ] {
            assert!(
                names.contains(&expected),
                "{expected} missing from {names:?}"
            );
        }
        let total = values
            .iter()
            .find(|(m, _)| m == "mem.total_bytes")
            .map(|v| v.1);
        assert!(total.is_some_and(|t| t > 0.0));
    }

    #[test]
    fn used_disk_space_counts_reserved_blocks_as_free_as_df_does() {
        // 100 blocks, 30 free of which 5 are reserved for root: df says 70 used, 25
        // available.
        let space = DiskSpace {
            total: 100,
            free: 30,
            available: 25,
        };
        assert_eq!(space.used(), 70);
        // The real root file system agrees with df (within what a busy machine writes
        // between the two reads).
        let ours = DiskSpace::of(Path::new("/")).expect("statvfs /");
        let df = std::process::Command::new("df")
            .args(["-B1", "--output=size,used,avail", "/"])
            .output()
            .expect("df");
        let text = String::from_utf8_lossy(&df.stdout);
        let numbers: Vec<u64> = text
            .lines()
            .nth(1)
            .expect("df line")
            .split_whitespace()
            .map(|n| n.parse().expect("a number"))
            .collect();
        let (size, used, avail) = (numbers[0], numbers[1], numbers[2]);
        assert_eq!(ours.total, size);
        let slack = 256 << 20;
        assert!(
            ours.used().abs_diff(used) < slack,
            "{ours:?} vs df used {used}"
        );
        assert!(
            ours.available.abs_diff(avail) < slack,
            "{ours:?} vs df avail {avail}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_first_cpu_reading_measures_the_machine() {
        // One core kept busy while the sensor starts: the first reading must show it.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let spinner = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            })
        };
        let (tx, mut rx) = mpsc::channel(8);
        let cfg = SensorConfig {
            name: "system".to_string(),
            interval: Duration::from_secs(3600),
            kind: SensorKind::System(SystemSensor {
                cpu: true,
                memory: false,
                load: false,
                uptime: false,
                disks: false,
                network: false,
                temperatures: false,
                ..SystemSensor::default()
            }),
        };
        let handles = spawn_all(&[cfg], &tx);
        let first = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a first sample")
            .expect("sample");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        spinner.join().expect("spinner");
        drop(handles);
        let cpu = first
            .readings
            .iter()
            .find(|r| r.metric.as_str() == "cpu.usage_pct")
            .expect("cpu.usage_pct")
            .value;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        // One busy core of `cores` is 100/cores percent; other load only adds to it.
        assert!(
            cpu >= 50.0 / cores,
            "first cpu.usage_pct {cpu} with one of {cores} cores busy"
        );
    }

    #[tokio::test]
    async fn triggers_and_interval_changes_reach_the_task() {
        let (tx, mut rx) = mpsc::channel(8);
        let dir = tempfile::tempdir().expect("temp dir");
        let p = dir.path().join("seven");
        std::fs::write(&p, "7").expect("write");
        let cfg = SensorConfig {
            name: "seven".to_string(),
            interval: Duration::from_secs(3600),
            kind: SensorKind::File(FileSensor {
                path: p.clone(),
                scale: 1.0,
                offset: 0.0,
                metric: "seven".to_string(),
            }),
        };
        let handles = spawn_all(&[cfg], &tx);
        // The first sample comes at once, the next one only when triggered.
        let first = rx.recv().await.expect("first");
        assert_eq!(first.readings[0].value, 7.0);
        handles[0].trigger();
        let second = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("triggered");
        assert!(second.is_some());
        handles[0].set_interval(Duration::from_millis(100));
        assert_eq!(handles[0].interval(), Duration::from_millis(100));
        let third = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("faster");
        assert!(third.is_some());
    }
}

//! The agent's configuration: `agent.toml` overridden by `DEVICE_AGENT_*` environment
//! variables (sections joined by `__`: `DEVICE_AGENT_HUB__TOKEN_FILE` sets
//! `hub.token_file`), loaded with the `config` crate and then checked key by key so that
//! one run names every problem at once.
//!
//! Relative paths are relative to the working directory (as for `hub serve`), so the
//! quick-start example works from the repository root; the systemd unit uses absolute
//! paths. `deploy/agent.toml` documents every key.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::time::Duration;

use schemas::limits::{
    is_valid_device_id, is_valid_name, MAX_COMMAND_NAME_LEN, MAX_METRIC_LEN, MAX_OUTPUT_LEN,
};
use schemas::Encoding;
use serde_json::{Map, Value};

use crate::actions::{Action, Charset, Glob, ParamRule, Template, DEFAULT_MAX_LEN};
use crate::commands::BUILTINS;

/// Environment variables with the prefix that are not configuration keys.
const NOT_CONFIG_ENV: &[&str] = &["DEVICE_AGENT_CONFIG"];
/// The prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "DEVICE_AGENT";

/// Where the configuration comes from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// The TOML file, if any.
    pub file: Option<PathBuf>,
    /// Environment variables (all of them; only `DEVICE_AGENT_*` are used).
    pub env: Vec<(String, String)>,
}

/// Why the configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// One line per problem, each naming its key.
    #[error("invalid configuration ({} problem{}):\n  {}", .0.len(), if .0.len() == 1 { "" } else { "s" }, .0.join("\n  "))]
    Invalid(Vec<String>),
}

/// A valid configuration and the warnings found on the way.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The configuration.
    pub config: AgentConfig,
    /// Things that work but are probably not what was meant.
    pub warnings: Vec<String>,
}

/// The whole configuration.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// How to reach the hub.
    pub hub: HubConfig,
    /// Reconnect backoff.
    pub reconnect: ReconnectConfig,
    /// Directory for the queue (one subdirectory per device id).
    pub data_dir: PathBuf,
    /// The store-and-forward queue.
    pub queue: QueueConfig,
    /// Command execution.
    pub commands: CommandsConfig,
    /// Logging.
    pub log: LogConfig,
    /// Sensors, each with its own interval.
    pub sensors: Vec<SensorConfig>,
    /// Configured actions.
    pub actions: Vec<Action>,
}

/// Where the token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// Inline in the configuration (or `DEVICE_AGENT_HUB__TOKEN`).
    Inline(String),
    /// A file holding it, read at every connection attempt (so it can be rotated).
    File(PathBuf),
}

/// `[hub]`.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// The device endpoint, `wss://HOST:PORT/v1/device`.
    pub url: String,
    /// Host part of the URL (brackets removed for IPv6).
    pub host: String,
    /// Port (default 443 for wss, 80 for ws).
    pub port: u16,
    /// Whether the URL is `wss`.
    pub tls: bool,
    /// This device's id (it must match the token's).
    pub device_id: String,
    /// The bearer token.
    pub token: TokenSource,
    /// PEM file of the CA(s) to trust.
    pub ca_file: Option<PathBuf>,
    /// TLS server name to verify, when it differs from the URL's host.
    pub server_name: Option<String>,
    /// Subprotocol / encoding.
    pub encoding: Encoding,
    /// Limit on TCP + TLS + WebSocket handshake.
    pub connect_timeout: Duration,
}

/// `[reconnect]`.
#[derive(Debug, Clone, Copy)]
pub struct ReconnectConfig {
    /// The first retry waits up to this long.
    pub initial: Duration,
    /// No retry waits longer (before jitter).
    pub max: Duration,
    /// After the hub refused the token: wait this long plus up to as much jitter.
    pub refused: Duration,
}

/// `[queue]`.
#[derive(Debug, Clone, Copy)]
pub struct QueueConfig {
    /// Most bytes on disk.
    pub max_bytes: u64,
    /// Most batches.
    pub max_batches: usize,
    /// How often the agent records its own readings (`agent.*`).
    pub report_interval: Duration,
}

/// `[commands]`.
#[derive(Debug, Clone, Copy)]
pub struct CommandsConfig {
    /// Most actions running at once; more wait for a slot (their deadline still counts).
    pub max_concurrent: usize,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// `[log]`.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Filter, as in `RUST_LOG` (`info`, `device_agent=debug`).
    pub level: String,
    /// Format.
    pub format: LogFormat,
}

/// One `[[sensors]]` entry.
#[derive(Debug, Clone)]
pub struct SensorConfig {
    /// Unique name (also the default metric name or prefix).
    pub name: String,
    /// Sampling interval.
    pub interval: Duration,
    /// What it reads.
    pub kind: SensorKind,
}

/// What a sensor reads.
#[derive(Debug, Clone)]
pub enum SensorKind {
    /// System readings via sysinfo.
    System(SystemSensor),
    /// A program's output.
    Exec(ExecSensor),
    /// A number in a file.
    File(FileSensor),
}

impl SensorKind {
    /// `system`, `exec` or `file`.
    pub fn name(&self) -> &'static str {
        match self {
            SensorKind::System(_) => "system",
            SensorKind::Exec(_) => "exec",
            SensorKind::File(_) => "file",
        }
    }
}

/// Options of a `system` sensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemSensor {
    /// `cpu.usage_pct`.
    pub cpu: bool,
    /// `cpu.N.usage_pct` per core too.
    pub per_cpu: bool,
    /// `mem.*` and `swap.*`.
    pub memory: bool,
    /// `load.1`, `load.5`, `load.15`.
    pub load: bool,
    /// `uptime_s`.
    pub uptime: bool,
    /// `disk.LABEL.used_bytes` / `.total_bytes`.
    pub disks: bool,
    /// Only these mount points (empty: all real file systems).
    pub mounts: Vec<String>,
    /// `net.IFACE.rx_bytes` / `.tx_bytes`.
    pub network: bool,
    /// Only these interfaces (empty: all but `lo`).
    pub interfaces: Vec<String>,
    /// `temp.LABEL` (°C) where the kernel exposes them.
    pub temperatures: bool,
}

impl Default for SystemSensor {
    fn default() -> Self {
        SystemSensor {
            cpu: true,
            per_cpu: false,
            memory: true,
            load: true,
            uptime: true,
            disks: true,
            mounts: Vec::new(),
            network: true,
            interfaces: Vec::new(),
            temperatures: true,
        }
    }
}

/// Options of an `exec` sensor.
#[derive(Debug, Clone)]
pub struct ExecSensor {
    /// Absolute path of the program.
    pub program: PathBuf,
    /// Fixed arguments.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Kill it after this long.
    pub timeout: Duration,
    /// Metric name (a single number) or prefix (a JSON object).
    pub metric: String,
}

/// Options of a `file` sensor.
#[derive(Debug, Clone)]
pub struct FileSensor {
    /// The file.
    pub path: PathBuf,
    /// Multiplier applied to the number (0.001 for millidegrees).
    pub scale: f64,
    /// Added after scaling.
    pub offset: f64,
    /// Metric name.
    pub metric: String,
}

impl AgentConfig {
    /// The queue directory of this device.
    pub fn queue_dir(&self) -> PathBuf {
        self.data_dir.join(format!("queue-{}", self.hub.device_id))
    }

    /// A short JSON description without secrets, for `get-config` (fits the protocol's
    /// 1024-byte output, shortening itself when there is a lot configured).
    pub fn summary(&self, intervals: &[(String, Duration)]) -> String {
        let interval_of = |name: &str, default: Duration| {
            intervals
                .iter()
                .find(|(n, _)| n == name)
                .map_or(default, |(_, d)| *d)
        };
        let sensors: Vec<Value> = self
            .sensors
            .iter()
            .map(|s| {
                serde_json::json!({
                    "name": s.name,
                    "kind": s.kind.name(),
                    "interval": humantime::format_duration(interval_of(&s.name, s.interval)).to_string(),
                })
            })
            .collect();
        let actions: Vec<&str> = self.actions.iter().map(|a| a.name.as_str()).collect();
        let full = serde_json::json!({
            "agent": crate::VERSION,
            "device_id": self.hub.device_id,
            "hub": self.hub.url,
            "encoding": self.hub.encoding.subprotocol(),
            "sensors": sensors,
            "actions": actions,
            "queue": {"max_bytes": self.queue.max_bytes, "max_batches": self.queue.max_batches},
        });
        let text = full.to_string();
        if text.len() <= MAX_OUTPUT_LEN {
            return text;
        }
        let short = serde_json::json!({
            "agent": crate::VERSION,
            "device_id": self.hub.device_id,
            "hub": self.hub.url,
            "encoding": self.hub.encoding.subprotocol(),
            "sensors": self.sensors.len(),
            "actions": self.actions.len(),
            "note": "too long for a command result; see the agent's config file",
        });
        short.to_string()
    }
}

/// Loads and validates.
///
/// # Errors
/// [`ConfigError::Invalid`] naming every problem.
pub fn load(sources: &Sources) -> Result<Loaded, ConfigError> {
    let raw = raw_tree(sources)?;
    let mut check = Check::default();
    let config = check.agent(&raw);
    match config {
        Some(config) if check.problems.is_empty() => Ok(Loaded {
            config,
            warnings: check.warnings,
        }),
        _ => Err(ConfigError::Invalid(check.problems)),
    }
}

/// Only the queue directory (`data_dir` and `hub.device_id`), for `device-agent status`:
/// it must work where the rest of the configuration does not resolve, e.g. from a root
/// shell while the token is a credential only the service can read.
///
/// # Errors
/// [`ConfigError::Invalid`] when the file does not parse or the device id is missing.
pub fn queue_dir(sources: &Sources) -> Result<PathBuf, ConfigError> {
    let raw = raw_tree(sources)?;
    let data_dir = raw
        .get("data_dir")
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_DATA_DIR);
    match raw
        .get("hub")
        .and_then(|h| h.get("device_id"))
        .and_then(Value::as_str)
    {
        Some(id) if is_valid_device_id(id) => {
            Ok(PathBuf::from(data_dir).join(format!("queue-{id}")))
        }
        _ => Err(ConfigError::Invalid(vec![
            "hub.device_id: is required (1 to 64 of [A-Za-z0-9_.-])".to_string(),
        ])),
    }
}

/// The default `data_dir` (systemd's `StateDirectory=device-agent`).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/device-agent";

/// The file and environment merged into one tree, unchecked.
fn raw_tree(sources: &Sources) -> Result<Value, ConfigError> {
    let env: config::Map<String, String> = sources
        .env
        .iter()
        .filter(|(k, _)| k.starts_with("DEVICE_AGENT_") && !NOT_CONFIG_ENV.contains(&k.as_str()))
        .cloned()
        .collect();
    let mut builder = config::Config::builder();
    if let Some(file) = &sources.file {
        if !file.exists() {
            return Err(ConfigError::Invalid(vec![format!(
                "{}: no such file",
                file.display()
            )]));
        }
        builder = builder.add_source(
            config::File::from(file.as_path())
                .format(config::FileFormat::Toml)
                .required(true),
        );
    }
    builder = builder.add_source(
        config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator("_")
            .separator("__")
            .source(Some(env)),
    );
    builder
        .build()
        .and_then(|c| c.try_deserialize::<Value>())
        .map_err(|e| ConfigError::Invalid(vec![e.to_string()]))
}

/// Parses a size: an integer (bytes) or a number with `KiB`, `MiB`, `GiB`, `KB`, `MB`,
/// `GB` or `B`.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Collects problems while reading the raw tree.
#[derive(Default)]
struct Check {
    problems: Vec<String>,
    warnings: Vec<String>,
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{prefix}.{key}")
    }
}

/// How a value reads in a message.
fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

impl Check {
    fn problem(&mut self, key: &str, what: impl Display) {
        self.problems.push(format!("{key}: {what}"));
    }

    fn warn(&mut self, key: &str, what: impl Display) {
        self.warnings.push(format!("{key}: {what}"));
    }

    /// The table at `key` (an empty one if absent), with unknown keys reported.
    fn table<'a>(
        &mut self,
        v: Option<&'a Value>,
        key: &str,
        known: &[&str],
    ) -> Option<&'a Map<String, Value>> {
        static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
        let t = match v {
            None => return Some(EMPTY.get_or_init(Map::new)),
            Some(Value::Object(t)) => t,
            Some(other) => {
                self.problem(key, format!("expected a table, got {}", show(other)));
                return None;
            }
        };
        for k in t.keys() {
            if !known.contains(&k.as_str()) {
                self.problem(
                    &join(key, k),
                    format!("unknown key (known here: {})", known.join(", ")),
                );
            }
        }
        Some(t)
    }

    fn string(&mut self, t: &Map<String, Value>, prefix: &str, key: &str) -> Option<String> {
        match t.get(key) {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            Some(Value::Bool(b)) => Some(b.to_string()),
            Some(other) => {
                self.problem(
                    &join(prefix, key),
                    format!("expected a string, got {}", show(other)),
                );
                None
            }
        }
    }

    fn required(&mut self, t: &Map<String, Value>, prefix: &str, key: &str) -> Option<String> {
        let v = self.string(t, prefix, key);
        match v {
            Some(s) if !s.trim().is_empty() => Some(s),
            Some(_) => {
                self.problem(&join(prefix, key), "must not be empty");
                None
            }
            None if !t.contains_key(key) => {
                self.problem(&join(prefix, key), "is required");
                None
            }
            None => None,
        }
    }

    fn duration(
        &mut self,
        t: &Map<String, Value>,
        prefix: &str,
        key: &str,
        default: Duration,
        min: Duration,
        max: Duration,
    ) -> Duration {
        let Some(text) = self.string(t, prefix, key) else {
            return default;
        };
        match humantime::parse_duration(text.trim()) {
            Ok(d) if d < min || d > max => {
                self.problem(
                    &join(prefix, key),
                    format!(
                        "{text:?} is outside {}..={}",
                        humantime::format_duration(min),
                        humantime::format_duration(max)
                    ),
                );
                default
            }
            Ok(d) => d,
            Err(_) => {
                self.problem(
                    &join(prefix, key),
                    format!("expected a duration like \"30s\", \"500ms\" or \"5m\", got {text:?}"),
                );
                default
            }
        }
    }

    fn boolean(&mut self, t: &Map<String, Value>, prefix: &str, key: &str, default: bool) -> bool {
        match t.get(key) {
            None => default,
            Some(Value::Bool(b)) => *b,
            Some(Value::String(s)) if s == "true" || s == "false" => s == "true",
            Some(other) => {
                self.problem(
                    &join(prefix, key),
                    format!("expected true or false, got {}", show(other)),
                );
                default
            }
        }
    }

    fn integer(
        &mut self,
        t: &Map<String, Value>,
        prefix: &str,
        key: &str,
        default: u64,
        min: u64,
        max: u64,
    ) -> u64 {
        let v = match t.get(key) {
            None => return default,
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(s)) => s.trim().parse().ok(),
            Some(_) => None,
        };
        match v {
            Some(n) if (min..=max).contains(&n) => n,
            _ => {
                self.problem(
                    &join(prefix, key),
                    format!(
                        "expected an integer in {min}..={max}, got {}",
                        t.get(key).map(show).unwrap_or_default()
                    ),
                );
                default
            }
        }
    }

    fn signed(&mut self, t: &Map<String, Value>, prefix: &str, key: &str) -> Option<i64> {
        let v = t.get(key)?;
        let n = match v {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        if n.is_none() {
            self.problem(
                &join(prefix, key),
                format!("expected an integer, got {}", show(v)),
            );
        }
        n
    }

    fn float(&mut self, t: &Map<String, Value>, prefix: &str, key: &str, default: f64) -> f64 {
        let v = match t.get(key) {
            None => return default,
            Some(Value::Number(n)) => n.as_f64(),
            Some(Value::String(s)) => s.trim().parse().ok(),
            Some(_) => None,
        };
        match v {
            Some(x) if x.is_finite() => x,
            _ => {
                self.problem(
                    &join(prefix, key),
                    format!(
                        "expected a finite number, got {}",
                        t.get(key).map(show).unwrap_or_default()
                    ),
                );
                default
            }
        }
    }

    fn size(
        &mut self,
        t: &Map<String, Value>,
        prefix: &str,
        key: &str,
        default: u64,
        min: u64,
    ) -> u64 {
        let Some(text) = self.string(t, prefix, key) else {
            return default;
        };
        match parse_size(&text) {
            Some(n) if n >= min => n,
            Some(_) => {
                self.problem(
                    &join(prefix, key),
                    format!("{text:?} is below the minimum of {min} bytes"),
                );
                default
            }
            None => {
                self.problem(
                    &join(prefix, key),
                    format!("expected a size like \"64MiB\", \"512KiB\" or a number of bytes, got {text:?}"),
                );
                default
            }
        }
    }

    fn strings(&mut self, t: &Map<String, Value>, prefix: &str, key: &str) -> Vec<String> {
        match t.get(key) {
            None => Vec::new(),
            Some(Value::Array(items)) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) => out.push(s.clone()),
                        Value::Number(n) => out.push(n.to_string()),
                        other => self.problem(
                            &format!("{}[{i}]", join(prefix, key)),
                            format!("expected a string, got {}", show(other)),
                        ),
                    }
                }
                out
            }
            Some(other) => {
                self.problem(
                    &join(prefix, key),
                    format!("expected a list of strings, got {}", show(other)),
                );
                Vec::new()
            }
        }
    }

    fn env_table(
        &mut self,
        t: &Map<String, Value>,
        prefix: &str,
        key: &str,
    ) -> Vec<(String, String)> {
        let path = join(prefix, key);
        let Some(v) = t.get(key) else {
            return Vec::new();
        };
        let Value::Object(m) = v else {
            self.problem(
                &path,
                format!("expected a table of NAME = \"value\", got {}", show(v)),
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, v) in m {
            let valid_name = !k.is_empty()
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid_name {
                self.problem(
                    &join(&path, k),
                    "environment variable names use [A-Za-z0-9_]",
                );
                continue;
            }
            match v {
                Value::String(s) if !s.contains('\0') => out.push((k.clone(), s.clone())),
                Value::Number(_) | Value::Bool(_) => out.push((k.clone(), v.to_string())),
                other => self.problem(
                    &join(&path, k),
                    format!("expected a string, got {}", show(other)),
                ),
            }
        }
        out
    }

    /// An executable given by absolute path.
    fn program(&mut self, t: &Map<String, Value>, prefix: &str) -> Option<PathBuf> {
        let text = self.required(t, prefix, "program")?;
        let path = PathBuf::from(&text);
        let key = join(prefix, "program");
        if !path.is_absolute() {
            self.problem(
                &key,
                format!("{text:?} must be an absolute path (no PATH lookup, no shell)"),
            );
            return None;
        }
        match std::fs::metadata(&path) {
            Ok(m) if m.is_file() => {
                use std::os::unix::fs::PermissionsExt;
                if m.permissions().mode() & 0o111 == 0 {
                    self.problem(&key, format!("{text} is not executable"));
                }
            }
            Ok(_) => self.problem(&key, format!("{text} is not a file")),
            Err(e) => self.problem(&key, format!("{text}: {e}")),
        }
        Some(path)
    }

    fn agent(&mut self, raw: &Value) -> Option<AgentConfig> {
        let root = self.table(
            Some(raw),
            "",
            &[
                "hub",
                "reconnect",
                "data_dir",
                "queue",
                "commands",
                "log",
                "sensors",
                "actions",
            ],
        )?;
        let hub = self.hub(root.get("hub"));
        let reconnect = self.reconnect(root.get("reconnect"));
        let data_dir = self
            .string(root, "", "data_dir")
            .unwrap_or_else(|| DEFAULT_DATA_DIR.to_string());
        if data_dir.trim().is_empty() {
            self.problem(
                "data_dir",
                "is empty: give the directory for the queue (default /var/lib/device-agent)",
            );
        }
        let data_dir = PathBuf::from(data_dir);
        let queue = self.queue(root.get("queue"));
        let commands = self.commands(root.get("commands"));
        let log = self.log(root.get("log"));
        let sensors = self.sensors(root.get("sensors"));
        let actions = self.actions(root.get("actions"));
        Some(AgentConfig {
            hub: hub?,
            reconnect,
            data_dir,
            queue,
            commands,
            log,
            sensors,
            actions,
        })
    }

    fn hub(&mut self, v: Option<&Value>) -> Option<HubConfig> {
        let p = "hub";
        let t = self.table(
            v,
            p,
            &[
                "url",
                "device_id",
                "token",
                "token_file",
                "ca_file",
                "server_name",
                "encoding",
                "connect_timeout",
            ],
        )?;
        let url = self.required(t, p, "url");
        let parsed = url.as_deref().and_then(|u| self.url(u));
        let device_id = self.required(t, p, "device_id");
        if let Some(id) = &device_id {
            if !is_valid_device_id(id) {
                self.problem(
                    "hub.device_id",
                    format!("{id:?} must be 1 to 64 of [A-Za-z0-9_.-]"),
                );
            }
        }
        let token = self.string(t, p, "token").filter(|s| !s.trim().is_empty());
        let token_file = self
            .string(t, p, "token_file")
            .filter(|s| !s.trim().is_empty());
        let token = match (token, token_file) {
            (Some(_), Some(_)) => {
                self.problem(
                    "hub.token",
                    "set either hub.token or hub.token_file, not both",
                );
                None
            }
            (None, None) => {
                self.problem(
                    "hub.token_file",
                    "a token is required: set hub.token_file (or hub.token / DEVICE_AGENT_HUB__TOKEN); `hub token issue DEVICE_ID` prints one",
                );
                None
            }
            (Some(tok), None) => {
                self.token_text("hub.token", tok.trim(), device_id.as_deref());
                Some(TokenSource::Inline(tok.trim().to_string()))
            }
            (None, Some(file)) => {
                let path = PathBuf::from(file);
                match std::fs::read_to_string(&path) {
                    Ok(text) => {
                        self.token_text("hub.token_file", text.trim(), device_id.as_deref());
                        warn_if_world_readable(self, "hub.token_file", &path);
                    }
                    Err(e) => self.problem("hub.token_file", format!("{}: {e}", path.display())),
                }
                Some(TokenSource::File(path))
            }
        };
        let ca_file = self
            .string(t, p, "ca_file")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        let tls = parsed.as_ref().is_none_or(|(_, _, tls)| *tls);
        match (&ca_file, tls) {
            (Some(path), _) => self.ca(path),
            (None, true) => self.problem(
                "hub.ca_file",
                "is required for wss:// (the hub's CA, e.g. hub-data/tls/ca.pem on the hub host)",
            ),
            (None, false) => {}
        }
        if !tls {
            self.warn("hub.url", "plain ws://: the token and readings travel unencrypted; use it only on a trusted link or in tests");
        }
        let server_name = self.string(t, p, "server_name").filter(|s| !s.is_empty());
        if let Some(name) = &server_name {
            if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                self.problem(
                    "hub.server_name",
                    format!("{name:?} is not a DNS name or IP address"),
                );
            }
        }
        let encoding = match self.string(t, p, "encoding").as_deref() {
            None | Some("postcard") | Some("hub.v1.postcard") => Encoding::Postcard,
            Some("json") | Some("hub.v1.json") => Encoding::Json,
            Some(other) => {
                self.problem(
                    "hub.encoding",
                    format!("expected \"postcard\" or \"json\", got {other:?}"),
                );
                Encoding::Postcard
            }
        };
        let connect_timeout = self.duration(
            t,
            p,
            "connect_timeout",
            Duration::from_secs(15),
            Duration::from_secs(1),
            Duration::from_secs(300),
        );
        let (host, port, tls) = parsed?;
        Some(HubConfig {
            url: url?,
            host,
            port,
            tls,
            device_id: device_id?,
            token: token?,
            ca_file,
            server_name,
            encoding,
            connect_timeout,
        })
    }

    fn url(&mut self, url: &str) -> Option<(String, u16, bool)> {
        use tokio_tungstenite::tungstenite::http::Uri;
        let uri: Uri = match url.parse() {
            Ok(u) => u,
            Err(e) => {
                self.problem("hub.url", format!("{url:?} is not a URL: {e}"));
                return None;
            }
        };
        let tls = match uri.scheme_str() {
            Some("wss") => true,
            Some("ws") => false,
            _ => {
                self.problem(
                    "hub.url",
                    format!("{url:?} must start with wss:// (or ws:// behind a trusted link)"),
                );
                return None;
            }
        };
        let Some(host) = uri.host().filter(|h| !h.is_empty()) else {
            self.problem("hub.url", format!("{url:?} has no host"));
            return None;
        };
        if uri.path().is_empty() || uri.path() == "/" {
            self.warn(
                "hub.url",
                format!(
                    "{url:?} has no path; the hub's device endpoint is {}",
                    schemas::DEVICE_PATH
                ),
            );
        }
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        Some((
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            tls,
        ))
    }

    fn token_text(&mut self, key: &str, token: &str, device_id: Option<&str>) {
        if token.is_empty() {
            self.problem(key, "the token is empty");
            return;
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            self.problem(
                key,
                "the token has characters that cannot go in an HTTP header",
            );
            return;
        }
        // Tokens are opaque to devices, but a hint at the most common mistake (a token
        // issued for another device) saves a round of 401s. Only a warning.
        let mut parts = token.split('.');
        if let (Some("v1"), Some(id), Some(expected)) = (parts.next(), parts.next(), device_id) {
            if id != expected {
                self.warn(key, format!("the token looks issued for device {id:?}, not {expected:?}; the hub identifies the device by its token"));
            }
        }
    }

    fn ca(&mut self, path: &Path) {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        match CertificateDer::pem_file_iter(path) {
            Ok(iter) => {
                let certs: Result<Vec<_>, _> = iter.collect();
                match certs {
                    Ok(c) if !c.is_empty() => {}
                    Ok(_) => self.problem(
                        "hub.ca_file",
                        format!("{}: no certificate in it", path.display()),
                    ),
                    Err(e) => self.problem("hub.ca_file", format!("{}: {e}", path.display())),
                }
            }
            Err(e) => self.problem("hub.ca_file", format!("{}: {e}", path.display())),
        }
    }

    fn reconnect(&mut self, v: Option<&Value>) -> ReconnectConfig {
        let p = "reconnect";
        let defaults = ReconnectConfig {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
            refused: Duration::from_secs(60),
        };
        let Some(t) = self.table(v, p, &["initial", "max", "refused"]) else {
            return defaults;
        };
        let initial = self.duration(
            t,
            p,
            "initial",
            defaults.initial,
            Duration::from_millis(10),
            Duration::from_secs(600),
        );
        let max = self.duration(
            t,
            p,
            "max",
            defaults.max,
            Duration::from_millis(10),
            Duration::from_secs(3600),
        );
        let refused = self.duration(
            t,
            p,
            "refused",
            defaults.refused,
            Duration::from_secs(1),
            Duration::from_secs(86_400),
        );
        if max < initial {
            self.problem("reconnect.max", "must not be below reconnect.initial");
        }
        ReconnectConfig {
            initial,
            max,
            refused,
        }
    }

    fn queue(&mut self, v: Option<&Value>) -> QueueConfig {
        let p = "queue";
        let defaults = QueueConfig {
            max_bytes: 64 << 20,
            max_batches: 100_000,
            report_interval: Duration::from_secs(60),
        };
        let Some(t) = self.table(v, p, &["max_bytes", "max_batches", "report_interval"]) else {
            return defaults;
        };
        QueueConfig {
            max_bytes: self.size(t, p, "max_bytes", defaults.max_bytes, 64 << 10),
            max_batches: self.integer(
                t,
                p,
                "max_batches",
                defaults.max_batches as u64,
                16,
                10_000_000,
            ) as usize,
            report_interval: self.duration(
                t,
                p,
                "report_interval",
                defaults.report_interval,
                Duration::from_secs(1),
                Duration::from_secs(86_400),
            ),
        }
    }

    fn commands(&mut self, v: Option<&Value>) -> CommandsConfig {
        let p = "commands";
        let Some(t) = self.table(v, p, &["max_concurrent"]) else {
            return CommandsConfig { max_concurrent: 4 };
        };
        CommandsConfig {
            max_concurrent: self.integer(t, p, "max_concurrent", 4, 1, 64) as usize,
        }
    }

    fn log(&mut self, v: Option<&Value>) -> LogConfig {
        let p = "log";
        let mut out = LogConfig {
            level: "info".to_string(),
            format: LogFormat::Human,
        };
        let Some(t) = self.table(v, p, &["level", "format"]) else {
            return out;
        };
        if let Some(level) = self.string(t, p, "level") {
            if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
                self.problem("log.level", format!("{level:?} is not a log filter (try \"info\" or \"info,device_agent=debug\")"));
            }
            out.level = level;
        }
        match self.string(t, p, "format").as_deref() {
            None | Some("human") => {}
            Some("json") => out.format = LogFormat::Json,
            Some(other) => self.problem(
                "log.format",
                format!("expected \"human\" or \"json\", got {other:?}"),
            ),
        }
        out
    }

    fn sensors(&mut self, v: Option<&Value>) -> Vec<SensorConfig> {
        let Some(v) = v else {
            // Nothing configured: system readings every 30 s, the useful default.
            return vec![SensorConfig {
                name: "system".to_string(),
                interval: Duration::from_secs(30),
                kind: SensorKind::System(SystemSensor::default()),
            }];
        };
        let Value::Array(items) = v else {
            self.problem("sensors", "expected a list of [[sensors]] tables");
            return Vec::new();
        };
        if items.is_empty() {
            self.warn(
                "sensors",
                "no sensors: the agent reports only its own agent.* readings",
            );
        }
        let mut names = BTreeSet::new();
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let name_hint = item.get("name").and_then(Value::as_str).unwrap_or("?");
            let p = format!("sensors[{i}] ({name_hint})");
            // Checked on the raw name, so a duplicate is reported even when the entry has
            // other problems too.
            if let Some(name) = item.get("name").and_then(Value::as_str) {
                if !names.insert(name.to_string()) {
                    self.problem(&p, format!("sensor name {name:?} is used twice"));
                }
            }
            if let Some(s) = self.sensor(item, &p) {
                out.push(s);
            }
        }
        out
    }

    fn sensor(&mut self, v: &Value, p: &str) -> Option<SensorConfig> {
        const COMMON: &[&str] = &["name", "kind", "interval"];
        const SYSTEM: &[&str] = &[
            "cpu",
            "per_cpu",
            "memory",
            "load",
            "uptime",
            "disks",
            "mounts",
            "network",
            "interfaces",
            "temperatures",
        ];
        const EXEC: &[&str] = &["program", "args", "env", "timeout", "metric"];
        const FILE: &[&str] = &["path", "scale", "offset", "metric"];
        let kind = v.get("kind").and_then(Value::as_str).unwrap_or("");
        let specific: &[&str] = match kind {
            "system" => SYSTEM,
            "exec" => EXEC,
            "file" => FILE,
            other => {
                self.problem(
                    &join(p, "kind"),
                    format!("expected \"system\", \"exec\" or \"file\", got {other:?}"),
                );
                &[]
            }
        };
        let known: Vec<&str> = COMMON.iter().chain(specific).copied().collect();
        let t = self.table(Some(v), p, &known)?;
        let name = self.required(t, p, "name");
        if let Some(n) = &name {
            if !is_valid_name(n, MAX_METRIC_LEN) {
                self.problem(
                    &join(p, "name"),
                    format!("{n:?} must be 1 to 64 of [A-Za-z0-9_.:/-]"),
                );
            }
        }
        let default_interval = match kind {
            "system" => Duration::from_secs(30),
            "exec" => Duration::from_secs(60),
            _ => Duration::from_secs(10),
        };
        let interval = self.duration(
            t,
            p,
            "interval",
            default_interval,
            Duration::from_millis(100),
            Duration::from_secs(86_400),
        );
        let metric = |check: &mut Check, name: &Option<String>| -> String {
            let m = check
                .string(t, p, "metric")
                .or_else(|| name.clone())
                .unwrap_or_default();
            if !m.is_empty() && !is_valid_name(&m, MAX_METRIC_LEN) {
                check.problem(
                    &join(p, "metric"),
                    format!("{m:?} must be 1 to 64 of [A-Za-z0-9_.:/-]"),
                );
            }
            m
        };
        let kind = match kind {
            "system" => {
                let d = SystemSensor::default();
                SensorKind::System(SystemSensor {
                    cpu: self.boolean(t, p, "cpu", d.cpu),
                    per_cpu: self.boolean(t, p, "per_cpu", d.per_cpu),
                    memory: self.boolean(t, p, "memory", d.memory),
                    load: self.boolean(t, p, "load", d.load),
                    uptime: self.boolean(t, p, "uptime", d.uptime),
                    disks: self.boolean(t, p, "disks", d.disks),
                    mounts: self.strings(t, p, "mounts"),
                    network: self.boolean(t, p, "network", d.network),
                    interfaces: self.strings(t, p, "interfaces"),
                    temperatures: self.boolean(t, p, "temperatures", d.temperatures),
                })
            }
            "exec" => {
                let program = self.program(t, p);
                let timeout = self.duration(
                    t,
                    p,
                    "timeout",
                    Duration::from_secs(10),
                    Duration::from_millis(10),
                    Duration::from_secs(3600),
                );
                if timeout > interval {
                    self.warn(
                        &join(p, "timeout"),
                        "is longer than the interval; samples will be skipped while it runs",
                    );
                }
                SensorKind::Exec(ExecSensor {
                    program: program?,
                    args: self.strings(t, p, "args"),
                    env: self.env_table(t, p, "env"),
                    timeout,
                    metric: metric(self, &name),
                })
            }
            "file" => {
                let path = self.required(t, p, "path").map(PathBuf::from);
                if let Some(path) = &path {
                    if !path.is_absolute() {
                        self.problem(&join(p, "path"), "must be an absolute path");
                    } else if let Err(e) = std::fs::metadata(path) {
                        self.warn(
                            &join(p, "path"),
                            format!("{}: {e} (it may appear later)", path.display()),
                        );
                    }
                }
                let scale = self.float(t, p, "scale", 1.0);
                let offset = self.float(t, p, "offset", 0.0);
                SensorKind::File(FileSensor {
                    path: path?,
                    scale,
                    offset,
                    metric: metric(self, &name),
                })
            }
            _ => return None,
        };
        Some(SensorConfig {
            name: name?,
            interval,
            kind,
        })
    }

    fn actions(&mut self, v: Option<&Value>) -> Vec<Action> {
        let Some(v) = v else {
            return Vec::new();
        };
        let Value::Array(items) = v else {
            self.problem("actions", "expected a list of [[actions]] tables");
            return Vec::new();
        };
        let mut names = BTreeSet::new();
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let name_hint = item.get("name").and_then(Value::as_str).unwrap_or("?");
            let p = format!("actions[{i}] ({name_hint})");
            if let Some(name) = item.get("name").and_then(Value::as_str) {
                if !names.insert(name.to_string()) {
                    self.problem(&p, format!("action name {name:?} is used twice"));
                }
            }
            if let Some(a) = self.action(item, &p) {
                out.push(a);
            }
        }
        out
    }

    fn action(&mut self, v: &Value, p: &str) -> Option<Action> {
        let t = self.table(
            Some(v),
            p,
            &[
                "name",
                "program",
                "args",
                "params",
                "timeout",
                "max_output",
                "env",
                "working_dir",
            ],
        )?;
        let name = self.required(t, p, "name");
        if let Some(n) = &name {
            if !is_valid_name(n, MAX_COMMAND_NAME_LEN) {
                self.problem(
                    &join(p, "name"),
                    format!("{n:?} must be 1 to 32 of [A-Za-z0-9_.:/-]"),
                );
            }
            if BUILTINS.contains(&n.as_str()) {
                self.problem(&join(p, "name"), format!("{n:?} is a built-in command"));
            }
        }
        let program = self.program(t, p);
        let mut templates = Vec::new();
        for (i, text) in self.strings(t, p, "args").iter().enumerate() {
            match Template::parse(text) {
                Ok(tpl) => templates.push(tpl),
                Err(e) => self.problem(&format!("{}[{i}]", join(p, "args")), e),
            }
        }
        let params = self.params(t.get("params"), &join(p, "params"));
        let used: BTreeSet<&str> = templates.iter().flat_map(Template::params).collect();
        for u in &used {
            if !params.contains_key(*u) {
                self.problem(
                    &join(p, "args"),
                    format!("uses {{{u}}} but [{}.params.{u}] is not declared", p),
                );
            }
        }
        for declared in params.keys() {
            if !used.contains(declared.as_str()) {
                self.problem(
                    &join(&join(p, "params"), declared),
                    "is declared but no args entry uses it",
                );
            }
        }
        let timeout = self.duration(
            t,
            p,
            "timeout",
            Duration::from_secs(30),
            Duration::from_millis(100),
            Duration::from_secs(3600),
        );
        let max_output = self.integer(
            t,
            p,
            "max_output",
            MAX_OUTPUT_LEN as u64,
            1,
            MAX_OUTPUT_LEN as u64,
        ) as usize;
        let env = self.env_table(t, p, "env");
        let working_dir = self.string(t, p, "working_dir").map(PathBuf::from);
        if let Some(d) = &working_dir {
            if !d.is_absolute() {
                self.problem(&join(p, "working_dir"), "must be an absolute path");
            }
        }
        Some(Action {
            name: name?,
            program: program?,
            args: templates,
            params,
            timeout,
            max_output,
            env,
            working_dir,
        })
    }

    fn params(&mut self, v: Option<&Value>, p: &str) -> BTreeMap<String, ParamRule> {
        let mut out = BTreeMap::new();
        let Some(v) = v else {
            return out;
        };
        let Value::Object(m) = v else {
            self.problem(
                p,
                format!("expected a table of parameters, got {}", show(v)),
            );
            return out;
        };
        for (name, rule) in m {
            let rp = join(p, name);
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                self.problem(&rp, "parameter names use [A-Za-z0-9_-]");
                continue;
            }
            let Some(t) = self.table(
                Some(rule),
                &rp,
                &[
                    "allow",
                    "charset",
                    "min",
                    "max",
                    "any",
                    "max_len",
                    "allow_leading_dash",
                    "default",
                ],
            ) else {
                continue;
            };
            let charset = match self.string(t, &rp, "charset") {
                Some(text) => match Charset::parse(&text) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        self.problem(&join(&rp, "charset"), e);
                        None
                    }
                },
                None => None,
            };
            let r = ParamRule {
                allow: self
                    .strings(t, &rp, "allow")
                    .iter()
                    .map(|s| Glob::parse(s))
                    .collect(),
                charset,
                min: self.signed(t, &rp, "min"),
                max: self.signed(t, &rp, "max"),
                any: self.boolean(t, &rp, "any", false),
                max_len: self.integer(t, &rp, "max_len", DEFAULT_MAX_LEN as u64, 1, 4096) as usize,
                allow_leading_dash: self.boolean(t, &rp, "allow_leading_dash", false),
                default: self.string(t, &rp, "default"),
            };
            if !r.has_rule() {
                self.problem(
                    &rp,
                    "needs a rule: allow = [...], charset = \"...\", min/max, or any = true",
                );
            }
            if let (Some(lo), Some(hi)) = (r.min, r.max) {
                if lo > hi {
                    self.problem(&join(&rp, "min"), "is above max");
                }
            }
            if let Some(d) = &r.default {
                if let Err(why) = r.check(d) {
                    self.problem(&join(&rp, "default"), format!("{d:?} {why}"));
                }
            }
            out.insert(name.clone(), r);
        }
        out
    }
}

fn warn_if_world_readable(check: &mut Check, key: &str, path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(m) = std::fs::metadata(path) {
        if m.permissions().mode() & 0o004 != 0 {
            check.warn(
                key,
                format!("{} is readable by every user; chmod 600 it", path.display()),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    struct Tmp(PathBuf);
    impl Tmp {
        fn new(label: &str) -> Tmp {
            let p =
                std::env::temp_dir().join(format!("agent-config-{label}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).expect("mkdir");
            Tmp(p)
        }
        fn file(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            let mut f = std::fs::File::create(&path).expect("create");
            f.write_all(text.as_bytes()).expect("write");
            path
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBXjCCAQSgAwIBAgIUWZ3n0p8Ei9YmF7oWbY3l7iUuV9swCgYIKoZIzj0EAwIw\nDzENMAsGA1UEAwwEdGVzdDAeFw0yNTAxMDEwMDAwMDBaFw0zNTAxMDEwMDAwMDBa\nMA8xDTALBgNVBAMMBHRlc3QwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAQ5F4iQ\n-----END CERTIFICATE-----\n";

    fn load_text(tmp: &Tmp, text: &str, env: &[(&str, &str)]) -> Result<Loaded, ConfigError> {
        let file = tmp.file("agent.toml", text);
        load(&Sources {
            file: Some(file),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    fn good(tmp: &Tmp) -> String {
        let ca = tmp.file("ca.pem", CA);
        let token = tmp.file("token", "v1.dev-1.1.2.abc\n");
        format!(
            r#"
data_dir = "{dir}"
[hub]
url = "wss://localhost:8443/v1/device"
device_id = "dev-1"
token_file = "{token}"
ca_file = "{ca}"

[[sensors]]
name = "system"
kind = "system"
interval = "15s"

[[sensors]]
name = "cpu_temp"
kind = "file"
path = "/sys/class/thermal/thermal_zone0/temp"
scale = 0.001

[[sensors]]
name = "counter"
kind = "exec"
program = "/bin/echo"
args = ["42"]
interval = "1s"

[[actions]]
name = "say"
program = "/bin/echo"
args = ["-n", "{{text}}"]
[actions.params.text]
any = true
"#,
            dir = tmp.0.display(),
            token = token.display(),
            ca = ca.display()
        )
    }

    #[test]
    fn a_good_config_loads_with_defaults() {
        let tmp = Tmp::new("good");
        let loaded = load_text(&tmp, &good(&tmp), &[]).expect("valid");
        let c = loaded.config;
        assert_eq!(c.hub.host, "localhost");
        assert_eq!(c.hub.port, 8443);
        assert!(c.hub.tls);
        assert_eq!(c.hub.encoding, Encoding::Postcard);
        assert_eq!(c.reconnect.initial, Duration::from_millis(500));
        assert_eq!(c.queue.max_bytes, 64 << 20);
        assert_eq!(c.sensors.len(), 3);
        assert_eq!(c.sensors[0].interval, Duration::from_secs(15));
        assert!(
            matches!(&c.sensors[1].kind, SensorKind::File(f) if f.scale == 0.001 && f.metric == "cpu_temp")
        );
        assert_eq!(c.actions[0].name, "say");
        assert!(c.queue_dir().ends_with("queue-dev-1"));
        assert!(c.summary(&[]).contains("\"device_id\":\"dev-1\""));
        assert!(!c.summary(&[]).contains("v1.dev-1"), "no secrets");
    }

    #[test]
    fn environment_overrides_the_file() {
        let tmp = Tmp::new("env");
        let loaded = load_text(
            &tmp,
            &good(&tmp),
            &[
                ("DEVICE_AGENT_HUB__ENCODING", "json"),
                ("DEVICE_AGENT_QUEUE__MAX_BYTES", "1MiB"),
                ("DEVICE_AGENT_CONFIG", "ignored.toml"),
                ("OTHER", "x"),
            ],
        )
        .expect("valid");
        assert_eq!(loaded.config.hub.encoding, Encoding::Json);
        assert_eq!(loaded.config.queue.max_bytes, 1 << 20);
    }

    #[test]
    fn every_problem_is_named_at_once() {
        let tmp = Tmp::new("bad");
        let text = r#"
surprise = 1
data_dir = ""
[hub]
url = "http://x"
device_id = "bad id"
token = "a"
token_file = "/nonexistent"
encoding = "xml"
connect_timeout = "soon"
[queue]
max_bytes = "lots"
[log]
format = "xml"
[[sensors]]
name = "a"
kind = "exec"
program = "relative/path"
interval = "1ms"
[[sensors]]
name = "a"
kind = "thermometer"
[[actions]]
name = "ping"
program = "/bin/echo"
args = ["{x}", "{y"]
[actions.params.x]
max_len = 10
[actions.params.z]
any = true
"#;
        let Err(ConfigError::Invalid(problems)) = load_text(&tmp, text, &[]) else {
            panic!("should be invalid");
        };
        let all = problems.join("\n");
        for expected in [
            "surprise: unknown key",
            "hub.url: \"http://x\" must start with wss://",
            "hub.device_id: \"bad id\"",
            "hub.token: set either",
            "hub.encoding",
            "hub.connect_timeout",
            "queue.max_bytes",
            "log.format",
            "sensors[0] (a).program: \"relative/path\" must be an absolute path",
            "sensors[0] (a).interval",
            "sensors[1] (a).kind",
            "sensors[1] (a): sensor name \"a\" is used twice",
            "data_dir: is empty",
            "actions[0] (ping).name: \"ping\" is a built-in command",
            "actions[0] (ping).args[1]",
            "actions[0] (ping).params.x: needs a rule",
            "actions[0] (ping).params.z: is declared but no args entry uses it",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
        assert!(problems.len() >= 15, "{all}");
    }

    #[test]
    fn a_missing_token_and_ca_are_explained() {
        let tmp = Tmp::new("missing");
        let text = "[hub]\nurl = \"wss://h/v1/device\"\ndevice_id = \"d\"\n";
        let Err(ConfigError::Invalid(problems)) = load_text(&tmp, text, &[]) else {
            panic!("should be invalid");
        };
        let all = problems.join("\n");
        assert!(all.contains("hub.token_file: a token is required"), "{all}");
        assert!(all.contains("hub.ca_file: is required for wss://"), "{all}");
    }

    #[test]
    fn plain_ws_and_a_mismatched_token_are_warnings() {
        let tmp = Tmp::new("warn");
        let text = "sensors = []\n[hub]\nurl = \"ws://127.0.0.1:9/v1/device\"\ndevice_id = \"d\"\ntoken = \"v1.other.1.2.x\"\n";
        let loaded = load_text(&tmp, text, &[]).expect("valid");
        let all = loaded.warnings.join("\n");
        assert!(all.contains("plain ws://"), "{all}");
        assert!(all.contains("issued for device \"other\""), "{all}");
        assert_eq!(loaded.config.hub.port, 9);
        assert!(!loaded.config.hub.tls);
    }

    #[test]
    fn the_queue_dir_resolves_without_the_rest() {
        let tmp = Tmp::new("qdir");
        let file = tmp.file("agent.toml", "[hub]\ndevice_id = \"pi-9\"\n");
        let sources = Sources {
            file: Some(file),
            env: vec![(
                "DEVICE_AGENT_DATA_DIR".to_string(),
                "/srv/agent".to_string(),
            )],
        };
        assert!(load(&sources).is_err(), "the full config is incomplete");
        assert_eq!(
            queue_dir(&sources).expect("queue dir"),
            PathBuf::from("/srv/agent/queue-pi-9")
        );
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("64MiB"), Some(64 << 20));
        assert_eq!(parse_size("2 GiB"), Some(2 << 30));
        assert_eq!(parse_size("5MB"), Some(5_000_000));
        assert_eq!(parse_size("lots"), None);
        assert_eq!(parse_size("5XB"), None);
    }
}

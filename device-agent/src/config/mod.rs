//! The agent's configuration: `agent.toml` overridden by `DEVICE_AGENT_*` environment
//! variables (sections joined by `__`: `DEVICE_AGENT_HUB__TOKEN_FILE` sets
//! `hub.token_file`), merged with the `config` crate, read into the serde-derived structs
//! below by `config-check` (which names every unknown key and every value that does not fit
//! its type, all in one run: see its documentation for how), then checked for the rules
//! that span keys or look at the host (programs, token and CA files) by [`validate`].
//!
//! Relative paths are relative to the working directory (as for `hub serve`), so the
//! quick-start example works from the repository root; the systemd unit uses absolute
//! paths. `deploy/agent.toml` documents every key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config_check::{count, duration, size, Layers, Problem};
use schemas::limits::{is_valid_device_id, MAX_OUTPUT_LEN};
use schemas::Encoding;
use serde::{Deserialize, Deserializer};
use serde_json::Value;

use crate::actions::Action;

mod validate;

/// Environment variables with the prefix that are not configuration keys.
const NOT_CONFIG_ENV: &[&str] = &["DEVICE_AGENT_CONFIG"];
/// The prefix of configuration environment variables.
pub const ENV_PREFIX: &str = "DEVICE_AGENT";
/// The default `data_dir` (systemd's `StateDirectory=device-agent`).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/device-agent";

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
    /// Every problem, each naming its key.
    #[error("invalid configuration ({} problem{}):\n{}", .0.len(), if .0.len() == 1 { "" } else { "s" }, config_check::lines(.0))]
    Invalid(Vec<Problem>),
}

/// A valid configuration and the warnings found on the way.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The configuration.
    pub config: AgentConfig,
    /// Things that work but are probably not what was meant.
    pub warnings: Vec<Problem>,
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
    /// Applying desired state.
    pub desired: DesiredConfig,
    /// Firmware updates.
    pub update: UpdateConfig,
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

/// A client certificate and its key (`hub.cert_file`, `hub.key_file`), as `hub devices add
/// ID --cert DIR` writes them; read again at every connection attempt, so they can be
/// renewed in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// PEM certificate (chain), the device's first.
    pub cert_file: PathBuf,
    /// PEM private key.
    pub key_file: PathBuf,
}

/// `[hub]`, resolved.
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
    /// This device's id (it must match the token's and the certificate's).
    pub device_id: String,
    /// The bearer token (`None`: the client certificate alone identifies the device).
    pub token: Option<TokenSource>,
    /// The client certificate presented in TLS, a second way in next to the token.
    pub client_cert: Option<ClientCert>,
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
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default)]
pub struct ReconnectConfig {
    /// The first retry waits up to this long (10 ms to 10 min).
    #[serde(deserialize_with = "duration::within::<_, 10, 600_000>")]
    pub initial: Duration,
    /// No retry waits longer, before jitter (10 ms to 1 h; not below `initial`).
    #[serde(deserialize_with = "duration::within::<_, 10, 3_600_000>")]
    pub max: Duration,
    /// After the hub refused the token: wait this long plus up to as much jitter (1 s to
    /// 1 day).
    #[serde(deserialize_with = "duration::within::<_, 1_000, 86_400_000>")]
    pub refused: Duration,
}

impl Default for ReconnectConfig {
    fn default() -> ReconnectConfig {
        ReconnectConfig {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
            refused: Duration::from_secs(60),
        }
    }
}

/// `[queue]`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default)]
pub struct QueueConfig {
    /// Most bytes on disk (at least 64 KiB).
    #[serde(deserialize_with = "size::at_least::<_, 65_536>")]
    pub max_bytes: u64,
    /// Most batches (16 to 10 million).
    #[serde(deserialize_with = "count::within::<_, 16, 10_000_000>")]
    pub max_batches: usize,
    /// How often the agent records its own readings (`agent.*`; 1 s to 1 day).
    #[serde(deserialize_with = "duration::within::<_, 1_000, 86_400_000>")]
    pub report_interval: Duration,
}

impl Default for QueueConfig {
    fn default() -> QueueConfig {
        QueueConfig {
            max_bytes: 64 << 20,
            max_batches: 100_000,
            report_interval: Duration::from_secs(60),
        }
    }
}

/// `[commands]`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(default)]
pub struct CommandsConfig {
    /// Most actions running at once (1 to 64); more wait for a slot (their deadline still
    /// counts).
    #[serde(deserialize_with = "count::within::<_, 1, 64>")]
    pub max_concurrent: usize,
}

impl Default for CommandsConfig {
    fn default() -> CommandsConfig {
        CommandsConfig { max_concurrent: 4 }
    }
}

/// `[desired]`: how desired state the hub sends is applied. `sensors.NAME.interval` keys
/// change a sensor's interval; every other key goes to `program` (run without a shell as
/// `program KEY VALUE`, VALUE being the JSON text), which applies it and exits 0, or
/// refuses it with its output as the reason. Without a program, other keys are refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DesiredConfig {
    /// Absolute path of the program that applies other keys (empty: none).
    pub program: String,
    /// Longest one run of the program may take.
    #[serde(deserialize_with = "duration::within::<_, 100, 600_000>")]
    pub timeout: Duration,
}

impl Default for DesiredConfig {
    fn default() -> DesiredConfig {
        DesiredConfig {
            program: String::new(),
            timeout: Duration::from_secs(30),
        }
    }
}

impl DesiredConfig {
    /// The program, when one is configured.
    pub fn program(&self) -> Option<&Path> {
        Some(Path::new(&self.program)).filter(|p| !p.as_os_str().is_empty())
    }
}

/// `[update]`: firmware updates the hub offers. The agent downloads an image to its data
/// directory, checks its size, SHA-256 and Ed25519 signature against `key` (the hub's
/// `hub firmware key`), then runs `program` without a shell as `program FILE`; exit 0
/// means installed. Without a key the agent does not announce the `firmware` capability;
/// with a key but no program it refuses every offer, saying why.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UpdateConfig {
    /// Absolute path of the install program (empty: none).
    pub program: String,
    /// The hub's public firmware signing key, 64 hex digits (empty: no updates).
    pub key: String,
    /// Longest the install program may take.
    #[serde(deserialize_with = "duration::within::<_, 100, 3_600_000>")]
    pub timeout: Duration,
}

impl Default for UpdateConfig {
    fn default() -> UpdateConfig {
        UpdateConfig {
            program: String::new(),
            key: String::new(),
            timeout: Duration::from_secs(600),
        }
    }
}

impl UpdateConfig {
    /// The install program, when one is configured.
    pub fn program(&self) -> Option<&Path> {
        Some(Path::new(&self.program)).filter(|p| !p.as_os_str().is_empty())
    }

    /// The public key, when one is configured and valid.
    pub fn public_key(&self) -> Option<[u8; schemas::firmware::PUBLIC_KEY_LEN]> {
        schemas::firmware::decode_hex_array(self.key.trim())
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LogConfig {
    /// Filter, as in `RUST_LOG` (`info`, `device_agent=debug`).
    pub level: String,
    /// Format.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            level: "info".to_string(),
            format: LogFormat::Human,
        }
    }
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

/// Options of a `system` sensor (the keys of its table besides `name`, `kind` and
/// `interval`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
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
    /// `disk.LABEL.total_bytes`, `.used_bytes` and `.available_bytes`, as `df` counts them.
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
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ExecSensor {
    /// Absolute path of the program.
    pub program: PathBuf,
    /// Fixed arguments.
    pub args: Vec<String>,
    /// Extra environment.
    #[serde(deserialize_with = "env_table")]
    pub env: Vec<(String, String)>,
    /// Kill it after this long (10 ms to 1 h).
    #[serde(deserialize_with = "duration::within::<_, 10, 3_600_000>")]
    pub timeout: Duration,
    /// Metric name (a single number) or prefix (a JSON object); default: the sensor's name.
    pub metric: String,
}

impl Default for ExecSensor {
    fn default() -> ExecSensor {
        ExecSensor {
            program: PathBuf::new(),
            args: Vec::new(),
            env: Vec::new(),
            timeout: Duration::from_secs(10),
            metric: String::new(),
        }
    }
}

/// Options of a `file` sensor.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct FileSensor {
    /// The file.
    pub path: PathBuf,
    /// Multiplier applied to the number (0.001 for millidegrees).
    pub scale: f64,
    /// Added after scaling.
    pub offset: f64,
    /// Metric name; default: the sensor's name.
    pub metric: String,
}

impl Default for FileSensor {
    fn default() -> FileSensor {
        FileSensor {
            path: PathBuf::new(),
            scale: 1.0,
            offset: 0.0,
            metric: String::new(),
        }
    }
}

/// An `env = { NAME = "value" }` table, in name order (names are checked by [`validate`]).
///
/// # Errors
/// The value is not a table of strings.
pub(crate) fn env_table<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<(String, String)>, D::Error> {
    Ok(BTreeMap::<String, String>::deserialize(d)?
        .into_iter()
        .collect())
}

impl AgentConfig {
    /// The queue directory of this device.
    pub fn queue_dir(&self) -> PathBuf {
        self.data_dir.join(format!("queue-{}", self.hub.device_id))
    }

    /// The directory for firmware downloads: `DATA_DIR/firmware-DEVICE`.
    pub fn firmware_dir(&self) -> PathBuf {
        self.data_dir
            .join(format!("firmware-{}", self.hub.device_id))
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
    let tree = raw_tree(sources)?;
    let (config, findings) = validate::agent(&tree);
    match config {
        Some(config) if findings.problems.is_empty() => Ok(Loaded {
            config,
            warnings: findings.warnings,
        }),
        _ => Err(ConfigError::Invalid(findings.problems)),
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
        _ => Err(ConfigError::Invalid(vec![Problem {
            key: "hub.device_id".to_string(),
            message: "is required (1 to 64 of [A-Za-z0-9_.-])".to_string(),
        }])),
    }
}

/// The file and environment merged into one tree, unchecked.
fn raw_tree(sources: &Sources) -> Result<Value, ConfigError> {
    if let Some(file) = sources.file.as_deref().filter(|f| !f.exists()) {
        return Err(ConfigError::Invalid(vec![Problem {
            key: file.display().to_string(),
            message: "no such file".to_string(),
        }]));
    }
    Layers {
        file: sources.file.as_deref(),
        env_prefix: ENV_PREFIX,
        env: &sources.env,
        env_ignored: NOT_CONFIG_ENV,
        ..Layers::default()
    }
    .merge()
    .map_err(|e| {
        ConfigError::Invalid(vec![Problem {
            key: String::new(),
            message: e.to_string(),
        }])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tempfile::TempDir;

    fn tmp() -> TempDir {
        tempfile::tempdir().expect("temp dir")
    }

    /// Writes `text` to file `name` in `dir`.
    fn write_file(dir: &TempDir, name: &str, text: &str) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    const CA: &str = "-----BEGIN CERTIFICATE-----\nMIIBXjCCAQSgAwIBAgIUWZ3n0p8Ei9YmF7oWbY3l7iUuV9swCgYIKoZIzj0EAwIw\nDzENMAsGA1UEAwwEdGVzdDAeFw0yNTAxMDEwMDAwMDBaFw0zNTAxMDEwMDAwMDBa\nMA8xDTALBgNVBAMMBHRlc3QwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAQ5F4iQ\n-----END CERTIFICATE-----\n";

    fn load_text(tmp: &TempDir, text: &str, env: &[(&str, &str)]) -> Result<Loaded, ConfigError> {
        let file = write_file(tmp, "agent.toml", text);
        load(&Sources {
            file: Some(file),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    fn good(tmp: &TempDir) -> String {
        let ca = write_file(tmp, "ca.pem", CA);
        let token = write_file(tmp, "token", "v1.dev-1.1.2.abc\n");
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
            dir = tmp.path().display(),
            token = token.display(),
            ca = ca.display()
        )
    }

    #[test]
    fn a_good_config_loads_with_defaults() {
        let tmp = tmp();
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
        let tmp = tmp();
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
        let tmp = tmp();
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
        let all = config_check::lines(&problems);
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
        let tmp = tmp();
        let text = "[hub]\nurl = \"wss://h/v1/device\"\ndevice_id = \"d\"\n";
        let Err(ConfigError::Invalid(problems)) = load_text(&tmp, text, &[]) else {
            panic!("should be invalid");
        };
        let all = config_check::lines(&problems);
        assert!(
            all.contains("hub.token_file: a token or a client certificate is required"),
            "{all}"
        );
        assert!(all.contains("hub.ca_file: is required for wss://"), "{all}");
    }

    #[test]
    fn a_client_certificate_stands_in_for_the_token_and_needs_its_key_and_wss() {
        use std::os::unix::fs::PermissionsExt;
        const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg\n-----END PRIVATE KEY-----\n";
        let tmp = tmp();
        let ca = write_file(&tmp, "ca.pem", CA);
        let cert = write_file(&tmp, "d.crt", CA);
        let key = write_file(&tmp, "d.key", KEY);
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let hub = |url: &str, files: &str| {
            format!(
                "sensors = []\n[hub]\nurl = \"{url}\"\ndevice_id = \"d\"\nca_file = \"{}\"\n{files}",
                ca.display()
            )
        };
        let both = format!(
            "cert_file = \"{}\"\nkey_file = \"{}\"\n",
            cert.display(),
            key.display()
        );
        let loaded = load_text(&tmp, &hub("wss://h/v1/device", &both), &[]).expect("valid");
        assert_eq!(loaded.config.hub.token, None);
        assert_eq!(
            loaded.config.hub.client_cert,
            Some(ClientCert {
                cert_file: cert.clone(),
                key_file: key.clone()
            })
        );
        let warnings = config_check::lines(&loaded.warnings);
        assert!(
            warnings.contains("hub.key_file: ") && warnings.contains("chmod 600"),
            "{warnings}"
        );
        for (url, files, expected) in [
            (
                "wss://h/v1/device",
                format!("cert_file = \"{}\"\n", cert.display()),
                "hub.cert_file: hub.cert_file and hub.key_file go together",
            ),
            (
                "ws://h/v1/device",
                both.clone(),
                "hub.cert_file: a client certificate needs TLS",
            ),
            (
                "wss://h/v1/device",
                format!(
                    "cert_file = \"{}\"\nkey_file = \"{}\"\n",
                    key.display(),
                    cert.display()
                ),
                "hub.cert_file: ",
            ),
        ] {
            let Err(ConfigError::Invalid(problems)) = load_text(&tmp, &hub(url, &files), &[])
            else {
                panic!("should be invalid: {files}");
            };
            let all = config_check::lines(&problems);
            assert!(all.contains(expected), "{expected} in {all}");
        }
    }

    #[test]
    fn plain_ws_and_a_mismatched_token_are_warnings() {
        let tmp = tmp();
        let text = "sensors = []\n[hub]\nurl = \"ws://127.0.0.1:9/v1/device\"\ndevice_id = \"d\"\ntoken = \"v1.other.1.2.x\"\n";
        let loaded = load_text(&tmp, text, &[]).expect("valid");
        let all = config_check::lines(&loaded.warnings);
        assert!(all.contains("plain ws://"), "{all}");
        assert!(all.contains("issued for device \"other\""), "{all}");
        assert_eq!(loaded.config.hub.port, 9);
        assert!(!loaded.config.hub.tls);
    }

    #[test]
    fn the_queue_dir_resolves_without_the_rest() {
        let tmp = tmp();
        let file = write_file(&tmp, "agent.toml", "[hub]\ndevice_id = \"pi-9\"\n");
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
    fn bad_keys_in_several_sections_are_all_named_with_their_paths() {
        let tmp = tmp();
        let text = format!(
            "{}\n[queue]\ncolour = \"red\"\nmax_batches = \"many\"\n[hub.extra]\nx = 1\n",
            good(&tmp)
        )
        .replace("interval = \"15s\"", "interval = \"15s\"\nper_core = true")
        .replace("args = [\"42\"]", "args = [\"42\"]\nscale = 2.0")
        .replace("any = true", "any = true\nsometimes = true");
        let Err(ConfigError::Invalid(problems)) =
            load_text(&tmp, &text, &[("DEVICE_AGENT_LOG__COLOUR", "x")])
        else {
            panic!("should be invalid");
        };
        let mut keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "actions[0] (say).params.text.sometimes",
                "hub.extra",
                "log.colour",
                "queue.colour",
                "queue.max_batches",
                "sensors[0] (system).per_core",
                "sensors[2] (counter).scale",
            ],
            "{}",
            config_check::lines(&problems)
        );
        let all = config_check::lines(&problems);
        assert!(
            all.contains("sensors[2] (counter).scale: unknown key (known here: program, args, env, timeout, metric, name, kind, interval)"),
            "{all}"
        );
        assert!(
            all.contains(
                "queue.max_batches: expected a whole number from 16 to 10000000, got \"many\""
            ),
            "{all}"
        );
    }

    #[test]
    fn bad_durations_and_sizes_name_the_key_and_the_syntax() {
        let tmp = tmp();
        let text = good(&tmp)
            .replace("interval = \"1s\"", "interval = \"every second\"")
            .replace(
                "[[actions]]",
                "[queue]\nmax_bytes = \"64 megs\"\nreport_interval = 30\n\n[[actions]]",
            );
        let Err(ConfigError::Invalid(problems)) =
            load_text(&tmp, &text, &[("DEVICE_AGENT_QUEUE__MAX_BYTES", "1KiB")])
        else {
            panic!("should be invalid");
        };
        let all = config_check::lines(&problems);
        for expected in [
            format!(
                "sensors[2] (counter).interval: expected {}, got \"every second\"",
                config_check::duration::SYNTAX
            ),
            "queue.max_bytes: expected a size of at least 64KiB, got \"1KiB\"".to_string(),
            format!(
                "queue.report_interval: expected {}, got \"30\"",
                config_check::duration::SYNTAX
            ),
        ] {
            assert!(all.contains(&expected), "missing {expected:?} in:\n{all}");
        }
        assert_eq!(problems.len(), 3, "{all}");
        let text = good(&tmp).replace(
            "[[actions]]",
            "[queue]\nmax_bytes = \"64 megs\"\n\n[[actions]]",
        );
        let Err(ConfigError::Invalid(problems)) = load_text(&tmp, &text, &[]) else {
            panic!("should be invalid");
        };
        assert_eq!(
            config_check::lines(&problems),
            format!(
                "  queue.max_bytes: expected {}, got \"64 megs\"",
                config_check::size::SYNTAX
            )
        );
    }

    #[test]
    fn the_example_agent_toml_loads() {
        let tmp = tmp();
        let ca = write_file(&tmp, "ca.pem", CA);
        let token = write_file(&tmp, "token", "v1.pi-1.1.2.abc\n");
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent.toml");
        // The example's token and CA paths are relative to a hub's directory; the rest is
        // used as written.
        let loaded = load(&Sources {
            file: Some(file),
            env: vec![
                (
                    "DEVICE_AGENT_HUB__TOKEN_FILE".to_string(),
                    token.display().to_string(),
                ),
                (
                    "DEVICE_AGENT_HUB__CA_FILE".to_string(),
                    ca.display().to_string(),
                ),
            ],
        })
        .expect("deploy/agent.toml is valid");
        let c = loaded.config;
        assert_eq!(c.hub.device_id, "pi-1");
        assert_eq!(c.queue.max_bytes, 64 << 20);
        assert_eq!(c.sensors.len(), 1);
        assert_eq!(c.actions[0].name, "disk-free");
        assert!(c.actions[0].params["path"].has_rule());
    }

    #[test]
    fn update_takes_an_absolute_program_and_a_hex_key() {
        let tmp = tmp();
        let base = good(&tmp);
        let key = "ab".repeat(32);
        let ok = format!("{base}\n[update]\nprogram = \"/bin/true\"\nkey = \"{key}\"\n");
        let c = load_text(&tmp, &ok, &[]).expect("valid").config;
        assert_eq!(c.update.public_key(), Some([0xab; 32]));
        assert_eq!(c.update.program(), Some(Path::new("/bin/true")));
        assert_eq!(c.firmware_dir(), c.data_dir.join("firmware-dev-1"));
        let bad = format!("{base}\n[update]\nprogram = \"install.sh\"\nkey = \"abc\"\n");
        let err = load_text(&tmp, &bad, &[]).expect_err("invalid").to_string();
        assert!(err.contains("update.program"), "{err}");
        assert!(err.contains("update.key"), "{err}");
        // Without a key the agent takes no updates.
        let none = load_text(&tmp, &base, &[]).expect("valid").config;
        assert_eq!(none.update.public_key(), None);
    }
}

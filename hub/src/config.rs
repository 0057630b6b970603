//! The hub's configuration: built-in defaults < `hub.toml` < `HUB_...` environment <
//! command-line flags, loaded with the `config` crate and validated key by key so that an
//! invalid configuration names every bad key at once.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, Environment, File, FileFormat, Value};

/// Environment variables with the `HUB_` prefix that belong to the CLI, not the config.
const CLI_ONLY_ENV: &[&str] = &["HUB_API", "HUB_ADMIN_TOKEN", "HUB_CONFIG"];

/// Every configuration key, its default, and a one-line description (also used by
/// `hub config defaults`).
pub const KEYS: &[(&str, &str, &str)] = &[
    ("data_dir", "hub-data", "directory for the store, TLS material and secrets"),
    ("device.listen", "0.0.0.0:8443", "address of the device (wss) listener"),
    ("device.plain_ws", "false", "serve plain ws instead of wss (only behind a TLS-terminating proxy)"),
    ("device.forwarded_for", "false", "behind a proxy: record the X-Forwarded-For client address as the device's (only if the proxy sets it)"),
    ("device.ping_interval", "30s", "how often the hub pings each device"),
    ("device.pong_timeout", "15s", "how long after a ping the hub waits for any frame before declaring the device offline"),
    ("device.hello_timeout", "10s", "how long after the upgrade a device has to send Hello"),
    ("device.handshake_timeout", "10s", "limit on the TCP + TLS + HTTP upgrade handshake"),
    ("device.write_timeout", "10s", "a device that does not take a frame within this time is disconnected"),
    ("device.max_connections", "100000", "most device connections; further upgrades get HTTP 503"),
    ("device.max_handshakes", "1024", "most handshakes in progress; further TCP connections are dropped at once"),
    ("device.command_queue", "64", "commands waiting per connection before new ones stay queued in the ledger"),
    ("device.max_messages_per_sec", "1000", "messages a device may send per second (bursts of twice that); above it the connection is closed with 1008"),
    ("tls.cert", "", "PEM certificate chain for the device listener (empty: the generated one in the data dir)"),
    ("tls.key", "", "PEM private key for tls.cert"),
    ("tls.server_names", "", "extra DNS names or IPs for the generated server certificate (comma-separated)"),
    ("admin.listen", "127.0.0.1:8444", "address of the admin HTTP API (keep it on loopback or a private network)"),
    ("storage.synchronous", "full", "SQLite durability: full (fsync every group commit) or normal (survives a process crash, not a power cut)"),
    ("storage.sqlite_max_bytes", "0", "largest the SQLite database may grow (0: the disk is the limit); beyond it devices are refused with 1011 and keep their data"),
    ("storage.history_retention", "30d", "how long presence history and finished commands are kept (0s: forever)"),
    ("storage.backend", "sqlite", "telemetry store: sqlite (embedded, in the data dir) or influxdb"),
    ("storage.influxdb.url", "", "InfluxDB 2 base URL, e.g. http://influxdb:8086 (storage.backend = influxdb)"),
    ("storage.influxdb.org", "", "InfluxDB organisation"),
    ("storage.influxdb.bucket", "", "InfluxDB bucket"),
    ("storage.influxdb.token", "", "InfluxDB API token (or set HUB_STORAGE__INFLUXDB__TOKEN)"),
    ("storage.influxdb.measurement", "telemetry", "measurement name the readings are written to"),
    ("storage.influxdb.timeout", "10s", "limit on one InfluxDB request; a slower write goes to the spool"),
    ("storage.influxdb.spool_max_bytes", "1073741824", "disk spool for when InfluxDB is unreachable; when full, devices are refused with 1011 and keep their data"),
    ("auth.token_secret", "", "device token signing secret, 64 hex digits (default: DATA_DIR/token-secret); every node of a cluster needs the same one"),
    ("auth.admin_token", "", "admin API bearer token (default: DATA_DIR/admin-token)"),
    ("cluster.redis_url", "", "Redis backplane URL (redis://host:6379/0); empty runs a single node"),
    ("cluster.node_id", "", "this node's id in the cluster (default: hostname and a random suffix)"),
    ("cluster.heartbeat", "2s", "how often a node proves it is alive; it is dead after three missed beats"),
    ("ingest.queue", "1024", "telemetry batches waiting for the writer; when full, devices are not read from (backpressure)"),
    ("ingest.max_group", "512", "most batches committed in one transaction"),
    ("log.format", "human", "log format: human or json"),
    ("log.level", "info", "log filter, as in RUST_LOG (for example info,hub=debug)"),
];

/// Where telemetry is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageBackend {
    /// The embedded SQLite store in the data directory.
    Sqlite,
    /// InfluxDB 2, with a disk spool in the data directory.
    InfluxDb(InfluxConfig),
}

/// InfluxDB 2 settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfluxConfig {
    /// Base URL.
    pub url: String,
    /// Organisation.
    pub org: String,
    /// Bucket.
    pub bucket: String,
    /// API token.
    pub token: String,
    /// Measurement name.
    pub measurement: String,
    /// Request timeout.
    pub timeout: Duration,
    /// Spool capacity in bytes.
    pub spool_max_bytes: u64,
}

/// Cluster settings (a Redis backplane).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Redis URL.
    pub redis_url: String,
    /// This node's id.
    pub node_id: String,
    /// Heartbeat period.
    pub heartbeat: Duration,
}

/// SQLite durability level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synchronous {
    /// fsync on every commit: an ack survives a power cut.
    Full,
    /// fsync only at checkpoints: an ack survives a process crash, not a power cut.
    Normal,
}

/// How the hub opens its SQLite database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SqliteOptions {
    /// Durability.
    pub synchronous: Synchronous,
    /// Largest the database may grow, in bytes (0: no limit besides the disk). Beyond it,
    /// telemetry commits fail like on a full disk: devices are closed with 1011 and keep
    /// their data, and `/readyz` says so.
    pub max_bytes: u64,
}

impl From<Synchronous> for SqliteOptions {
    fn from(synchronous: Synchronous) -> SqliteOptions {
        SqliteOptions {
            synchronous,
            max_bytes: 0,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Device listener settings.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Plain ws instead of wss.
    pub plain_ws: bool,
    /// Trust X-Forwarded-For for the device's address.
    pub forwarded_for: bool,
    /// Ping period.
    pub ping_interval: Duration,
    /// Silence after a ping that means offline.
    pub pong_timeout: Duration,
    /// Time allowed between upgrade and Hello.
    pub hello_timeout: Duration,
    /// Time allowed for TCP + TLS + upgrade.
    pub handshake_timeout: Duration,
    /// Time allowed for one frame write.
    pub write_timeout: Duration,
    /// Most concurrent device connections.
    pub max_connections: usize,
    /// Most concurrent handshakes.
    pub max_handshakes: usize,
    /// Per-connection command queue.
    pub command_queue: usize,
    /// Messages per second a device may send.
    pub max_messages_per_sec: usize,
}

/// TLS settings.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// Certificate chain; `None` uses the generated one.
    pub cert: Option<PathBuf>,
    /// Private key; `None` uses the generated one.
    pub key: Option<PathBuf>,
    /// Extra SANs for the generated certificate.
    pub server_names: Vec<String>,
}

/// The complete, validated hub configuration.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Device listener.
    pub device: DeviceConfig,
    /// TLS.
    pub tls: TlsConfig,
    /// Admin API listen address.
    pub admin_listen: SocketAddr,
    /// SQLite durability and size limit.
    pub sqlite: SqliteOptions,
    /// Telemetry store.
    pub storage: StorageBackend,
    /// How long presence history and finished commands are kept (zero: forever).
    pub history_retention: Duration,
    /// The Redis backplane, when clustered.
    pub cluster: Option<ClusterConfig>,
    /// Token secret from the configuration (hex), overriding the data dir's.
    pub token_secret: Option<String>,
    /// Admin token from the configuration, overriding the data dir's.
    pub admin_token: Option<String>,
    /// Ingest queue capacity, in batches.
    pub ingest_queue: usize,
    /// Most batches per group commit.
    pub ingest_max_group: usize,
    /// Log format.
    pub log_format: LogFormat,
    /// Log filter directive.
    pub log_level: String,
}

/// One problem with one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyError {
    /// The key, dotted (`device.ping_interval`).
    pub key: String,
    /// What is wrong and what is expected.
    pub problem: String,
}

/// Why the configuration could not be loaded: every problem found, not just the first.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed.
    #[error("cannot load configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// One or more keys are invalid.
    #[error("invalid configuration:\n{}", .0.iter().map(|e| format!("  {}: {}", e.key, e.problem)).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<KeyError>),
}

/// Where configuration comes from, besides the built-in defaults.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// `--config FILE`; when `None`, `./hub.toml` is used if it exists.
    pub file: Option<PathBuf>,
    /// Environment variables (normally `std::env::vars()`).
    pub env: Vec<(String, String)>,
    /// Command-line overrides as (dotted key, value).
    pub overrides: Vec<(String, String)>,
}

impl HubConfig {
    /// Loads and validates the configuration.
    ///
    /// # Errors
    /// [`ConfigError::Load`] when the file is missing or not TOML, [`ConfigError::Invalid`]
    /// listing every bad or unknown key.
    pub fn load(sources: &Sources) -> Result<HubConfig, ConfigError> {
        let mut builder = Config::builder();
        for (key, default, _) in KEYS {
            builder = builder.set_default(*key, *default)?;
        }
        match &sources.file {
            Some(file) => {
                builder = builder.add_source(File::from(file.as_path()).format(FileFormat::Toml))
            }
            None if Path::new("hub.toml").exists() => {
                builder = builder.add_source(File::new("hub.toml", FileFormat::Toml));
            }
            None => {}
        }
        let env: config::Map<String, String> = sources
            .env
            .iter()
            .filter(|(k, _)| k.starts_with("HUB_") && !CLI_ONLY_ENV.contains(&k.as_str()))
            .cloned()
            .collect();
        builder = builder.add_source(
            Environment::with_prefix("HUB")
                .prefix_separator("_")
                .separator("__")
                .source(Some(env)),
        );
        for (key, value) in &sources.overrides {
            builder = builder.set_override(key.as_str(), value.as_str())?;
        }
        let cfg = builder.build()?;
        Validator {
            cfg: &cfg,
            errors: Vec::new(),
        }
        .finish()
    }
}

struct Validator<'a> {
    cfg: &'a Config,
    errors: Vec<KeyError>,
}

impl Validator<'_> {
    fn fail(&mut self, key: &str, problem: impl Into<String>) {
        self.errors.push(KeyError {
            key: key.to_string(),
            problem: problem.into(),
        });
    }

    fn string(&mut self, key: &str) -> String {
        match self.cfg.get_string(key) {
            Ok(s) => s,
            Err(e) => {
                self.fail(key, format!("expected a string ({e})"));
                String::new()
            }
        }
    }

    fn parsed<T: std::str::FromStr>(&mut self, key: &str, expected: &str, fallback: T) -> T {
        let raw = self.string(key);
        match raw.trim().parse() {
            Ok(v) => v,
            Err(_) => {
                self.fail(key, format!("`{raw}` is not {expected}"));
                fallback
            }
        }
    }

    fn duration(&mut self, key: &str, min: Duration) -> Duration {
        let raw = self.string(key);
        match humantime::parse_duration(raw.trim()) {
            Ok(d) if d >= min => d,
            Ok(_) => {
                self.fail(
                    key,
                    format!(
                        "`{raw}` is shorter than the minimum {}",
                        humantime::format_duration(min)
                    ),
                );
                min
            }
            Err(_) => {
                self.fail(
                    key,
                    format!("`{raw}` is not a duration (examples: 500ms, 15s, 2m)"),
                );
                min
            }
        }
    }

    fn count(&mut self, key: &str, min: usize) -> usize {
        let n = self.parsed(key, "a whole number", min);
        if n < min {
            self.fail(key, format!("must be at least {min}"));
        }
        n.max(min)
    }

    fn required(&mut self, key: &str, when: &str) -> String {
        let value = self.string(key).trim().to_string();
        if value.is_empty() {
            self.fail(key, format!("required when {when}"));
        }
        value
    }

    fn path(&mut self, key: &str) -> Option<PathBuf> {
        let raw = self.string(key);
        (!raw.trim().is_empty()).then(|| PathBuf::from(raw.trim()))
    }

    fn list(&mut self, key: &str) -> Vec<String> {
        if let Ok(items) = self.cfg.get_array(key) {
            return items
                .into_iter()
                .filter_map(|v| v.into_string().ok())
                .collect();
        }
        self.string(key)
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    }

    fn unknown_keys(&mut self) {
        let known: BTreeSet<&str> = KEYS.iter().map(|(k, _, _)| *k).collect();
        let mut found = Vec::new();
        if let Ok(table) = self
            .cfg
            .clone()
            .try_deserialize::<config::Map<String, Value>>()
        {
            flatten("", table, &mut found);
        }
        // Sorted, so the same mistakes read the same every time.
        found.sort();
        for key in found {
            if !known.contains(key.as_str()) {
                self.fail(
                    &key,
                    "unknown key (see `hub config defaults` for the valid ones)",
                );
            }
        }
    }

    fn finish(mut self) -> Result<HubConfig, ConfigError> {
        self.unknown_keys();
        let addr_fallback: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 0));
        let data_dir = self
            .path("data_dir")
            .unwrap_or_else(|| PathBuf::from("hub-data"));
        let device = DeviceConfig {
            listen: self.parsed(
                "device.listen",
                "a socket address like 0.0.0.0:8443",
                addr_fallback,
            ),
            plain_ws: self.parsed("device.plain_ws", "true or false", false),
            forwarded_for: self.parsed("device.forwarded_for", "true or false", false),
            ping_interval: self.duration("device.ping_interval", Duration::from_millis(50)),
            pong_timeout: self.duration("device.pong_timeout", Duration::from_millis(50)),
            hello_timeout: self.duration("device.hello_timeout", Duration::from_millis(50)),
            handshake_timeout: self.duration("device.handshake_timeout", Duration::from_millis(50)),
            write_timeout: self.duration("device.write_timeout", Duration::from_millis(50)),
            max_connections: self.count("device.max_connections", 1),
            max_handshakes: self.count("device.max_handshakes", 1),
            command_queue: self.count("device.command_queue", 1),
            max_messages_per_sec: self.count("device.max_messages_per_sec", 1),
        };
        let tls = TlsConfig {
            cert: self.path("tls.cert"),
            key: self.path("tls.key"),
            server_names: self.list("tls.server_names"),
        };
        if tls.cert.is_some() != tls.key.is_some() {
            self.fail("tls.cert", "tls.cert and tls.key must be set together");
        }
        let admin_listen = self.parsed(
            "admin.listen",
            "a socket address like 127.0.0.1:8444",
            addr_fallback,
        );
        let synchronous = match self.string("storage.synchronous").trim() {
            "full" => Synchronous::Full,
            "normal" => Synchronous::Normal,
            other => {
                self.fail(
                    "storage.synchronous",
                    format!("`{other}` is not full or normal"),
                );
                Synchronous::Full
            }
        };
        let sqlite_max_bytes = self.parsed("storage.sqlite_max_bytes", "a number of bytes", 0u64);
        let history_retention = self.duration("storage.history_retention", Duration::ZERO);
        let storage = match self.string("storage.backend").trim() {
            "sqlite" => StorageBackend::Sqlite,
            "influxdb" => {
                let url = self.required("storage.influxdb.url", "storage.backend = \"influxdb\"");
                let org = self.required("storage.influxdb.org", "storage.backend = \"influxdb\"");
                let bucket =
                    self.required("storage.influxdb.bucket", "storage.backend = \"influxdb\"");
                let token = self.string("storage.influxdb.token").trim().to_string();
                if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
                    self.fail(
                        "storage.influxdb.url",
                        format!("`{url}` must start with http:// or https://"),
                    );
                }
                StorageBackend::InfluxDb(InfluxConfig {
                    url: url.trim_end_matches('/').to_string(),
                    org,
                    bucket,
                    token,
                    measurement: self
                        .string("storage.influxdb.measurement")
                        .trim()
                        .to_string(),
                    timeout: self.duration("storage.influxdb.timeout", Duration::from_millis(100)),
                    spool_max_bytes: self.parsed(
                        "storage.influxdb.spool_max_bytes",
                        "a number of bytes",
                        1u64 << 30,
                    ),
                })
            }
            other => {
                self.fail(
                    "storage.backend",
                    format!("`{other}` is not sqlite or influxdb"),
                );
                StorageBackend::Sqlite
            }
        };
        let redis_url = self.string("cluster.redis_url").trim().to_string();
        let heartbeat = self.duration("cluster.heartbeat", Duration::from_millis(100));
        let cluster = if redis_url.is_empty() {
            None
        } else {
            if !(redis_url.starts_with("redis://")
                || redis_url.starts_with("rediss://")
                || redis_url.starts_with("unix://"))
            {
                self.fail(
                    "cluster.redis_url",
                    format!("`{redis_url}` must start with redis://, rediss:// or unix://"),
                );
            }
            if storage == StorageBackend::Sqlite {
                self.fail(
                    "storage.backend",
                    "a cluster (cluster.redis_url) needs a shared telemetry store: set storage.backend = \"influxdb\"",
                );
            }
            let node_id = self.string("cluster.node_id").trim().to_string();
            Some(ClusterConfig {
                redis_url,
                node_id,
                heartbeat,
            })
        };
        let token_secret =
            Some(self.string("auth.token_secret").trim().to_string()).filter(|s| !s.is_empty());
        if token_secret
            .as_deref()
            .is_some_and(|s| crate::token::TokenSecret::from_hex(s).is_none())
        {
            self.fail(
                "auth.token_secret",
                "must be 64 hex digits (32 random bytes), e.g. from `openssl rand -hex 32`",
            );
        }
        let admin_token =
            Some(self.string("auth.admin_token").trim().to_string()).filter(|s| !s.is_empty());
        if admin_token.as_deref().is_some_and(|t| t.len() < 16) {
            self.fail("auth.admin_token", "must be at least 16 characters");
        }
        let ingest_queue = self.count("ingest.queue", 1);
        let ingest_max_group = self.count("ingest.max_group", 1);
        let log_format = match self.string("log.format").trim() {
            "human" => LogFormat::Human,
            "json" => LogFormat::Json,
            other => {
                self.fail("log.format", format!("`{other}` is not human or json"));
                LogFormat::Human
            }
        };
        let log_level = self.string("log.level");
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            self.fail(
                "log.level",
                format!("`{log_level}` is not a log filter (examples: info, hub=debug)"),
            );
        }
        if self.errors.is_empty() {
            Ok(HubConfig {
                data_dir,
                device,
                tls,
                admin_listen,
                sqlite: SqliteOptions {
                    synchronous,
                    max_bytes: sqlite_max_bytes,
                },
                storage,
                history_retention,
                cluster,
                token_secret,
                admin_token,
                ingest_queue,
                ingest_max_group,
                log_format,
                log_level,
            })
        } else {
            Err(ConfigError::Invalid(self.errors))
        }
    }
}

fn flatten(prefix: &str, table: config::Map<String, Value>, out: &mut Vec<String>) {
    for (key, value) in table {
        let full = if prefix.is_empty() {
            key
        } else {
            format!("{prefix}.{key}")
        };
        match value.clone().into_table() {
            Ok(inner) => flatten(&full, inner, out),
            Err(_) => out.push(full),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(env: &[(&str, &str)], overrides: &[(&str, &str)]) -> Result<HubConfig, ConfigError> {
        HubConfig::load(&Sources {
            file: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            overrides: overrides
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        })
    }

    #[test]
    fn defaults_are_valid() {
        let c = load(&[], &[]).expect("defaults");
        assert_eq!(c.device.ping_interval, Duration::from_secs(30));
        assert_eq!(c.device.pong_timeout, Duration::from_secs(15));
        assert_eq!(c.sqlite.synchronous, Synchronous::Full);
    }

    #[test]
    fn env_then_flags_take_precedence() {
        let c = load(
            &[
                ("HUB_DEVICE__PING_INTERVAL", "2s"),
                ("HUB_API", "http://x"),
                ("HUB_LOG__FORMAT", "json"),
            ],
            &[("device.ping_interval", "500ms")],
        )
        .expect("valid");
        assert_eq!(c.device.ping_interval, Duration::from_millis(500));
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn every_bad_key_is_named() {
        let err = load(
            &[
                ("HUB_DEVICE__PING_INTERVAL", "soon"),
                ("HUB_DEVICE__BOGUS", "1"),
            ],
            &[("device.listen", "nowhere"), ("log.format", "xml")],
        )
        .expect_err("invalid");
        let ConfigError::Invalid(errors) = err else {
            panic!("{err}")
        };
        let keys: BTreeSet<_> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "device.bogus",
                "device.listen",
                "device.ping_interval",
                "log.format"
            ]
            .into_iter()
            .collect()
        );
    }
}

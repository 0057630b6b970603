//! The hub's configuration: built-in defaults < `hub.toml` < `HUB_...` environment <
//! command-line flags, merged with the `config` crate and read into serde-derived structs
//! by `config-check`, which names every bad or unknown key at once (see its documentation
//! for how), then checked for the rules that span keys by [`validate`].
//!
//! [`KEYS`] is the one place the keys' defaults live (and the text of `hub config
//! defaults`): the structs below have no serde defaults, so a field missing from `KEYS`
//! or a key missing from the structs fails the tests at the bottom.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config_check::{count, duration, size, Findings, Layers, Read};
use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};

pub use config_check::Problem;

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
    ("device.pong_timeout", "15s", "how long after a ping the hub waits for the pong that answers it before declaring the device offline (other frames do not count)"),
    ("device.hello_timeout", "10s", "how long after the upgrade a device has to send Hello"),
    ("device.handshake_timeout", "10s", "limit on the TCP + TLS + HTTP upgrade handshake"),
    ("device.first_byte_timeout", "2s", "a new TCP connection that sends nothing (no TLS ClientHello) within this time is closed, so idle connections cannot hold handshake slots"),
    ("device.write_timeout", "10s", "a device that does not take a frame within this time is disconnected"),
    ("device.max_connections", "100000", "most device connections; further upgrades get HTTP 503"),
    ("device.max_handshakes", "1024", "most handshakes (TCP + TLS + upgrade) in progress; while all are taken the hub accepts no more, and further connections wait in the kernel's accept queue (up to 4096) until one finishes"),
    ("device.max_handshakes_per_source", "256", "most handshakes in progress from one source address (an IPv6 /64 counts as one); not applied with device.plain_ws, where every connection comes from the proxy"),
    ("device.command_queue", "32", "commands outstanding per connection (1 to 32, what a device de-duplicates) before new ones stay queued in the ledger"),
    ("device.max_messages_per_sec", "1000", "messages a device may send per second (bursts of twice that); above it the connection is closed with 1008"),
    ("tls.cert", "", "PEM certificate chain for the device listener (empty: the generated one in the data dir)"),
    ("tls.key", "", "PEM private key for tls.cert"),
    ("tls.server_names", "", "extra DNS names or IPs for the generated server certificate (comma-separated)"),
    ("tls.device_ca", "", "PEM CA certificate(s) whose device client certificates are accepted; the first one issues them (`hub devices add --cert`) with tls.device_ca_key (empty: the data dir's generated CA); in a cluster, the same on every node"),
    ("tls.device_ca_key", "", "PEM private key of the first tls.device_ca certificate; without it this hub verifies device certificates but does not issue them"),
    ("tls.session_tickets", "true", "give TLS 1.3 devices a session ticket so they reconnect with a resumed handshake (much cheaper for both sides), also after a hub restart; tickets live at most 24 hours"),
    ("tls.ticket_key", "", "secret (32+ bytes, hex or raw) that session tickets are sealed with (empty: DATA_DIR/tls/ticket-key, generated); in a cluster, the same file on every node lets a device resume on any node"),
    ("firmware.dir", "", "where firmware images are stored (empty: DATA_DIR/firmware); in a cluster, a directory every node reads and writes (a network file system), so that any node can send any image"),
    ("firmware.signing_key", "", "the Ed25519 key (PKCS#8) that signs firmware images, created on first use (empty: DATA_DIR/firmware-signing-key); in a cluster, the same file on every node; kept apart from the token secret"),
    ("firmware.max_transfer_rate", "4MiB", "most firmware bytes per second the hub sends to all devices together (0: no limit); chunks wait for it, acks, commands and pings never do. 4 MiB/s (about 34 Mbit/s) takes a 1 MiB image to 1,000 devices in about 4 minutes (250 s), leaves most of a 100 Mbit/s uplink and of a small hub's CPU to telemetry, and in a cluster applies per node"),
    ("admin.listen", "127.0.0.1:8444", "address of the admin HTTP API (keep it on loopback or a private network)"),
    ("storage.synchronous", "full", "SQLite durability: full (fsync every group commit) or normal (survives a process crash, not a power cut)"),
    ("storage.sqlite_max_bytes", "0", "largest each SQLite database file (hub.db, telemetry.db) may grow (0: the disk is the limit); beyond it devices are refused with 1011 and keep their data"),
    ("storage.history_retention", "30d", "how long presence history and finished commands are kept (0s: forever)"),
    ("storage.telemetry_retention", "0s", "how long readings are kept in the SQLite store (0s: forever); older ones are deleted at start and every hour, in the background, a few thousand at a time between the ingest writer's commits"),
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
    ("cluster.rebalance", "manual", "manual: devices move between nodes only on `hub cluster rebalance`; auto: a node holding more than its share (plus a tenth, at least 2) hands the excess over by itself"),
    ("cluster.rebalance_rate", "20", "devices per second a node asks to reconnect elsewhere while rebalancing (close 4010)"),
    ("ingest.queue", "4096", "telemetry batches waiting for the writer (at most about 5.6 KB each: 23 MB when full); when full, devices are not read from (backpressure)"),
    ("ingest.max_group", "4096", "most batches committed in one transaction: larger groups amortize the fsync and the index pages each commit writes (120,000 readings/s at 512, 170,000 at 4096 in the ingest bench), at the price of a longer commit when the hub is saturated"),
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

/// InfluxDB 2 settings (`[storage.influxdb]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
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
    #[serde(deserialize_with = "duration::at_least::<_, 100>")]
    pub timeout: Duration,
    /// Spool capacity in bytes.
    #[serde(deserialize_with = "size::any")]
    pub spool_max_bytes: u64,
}

/// Cluster settings (a Redis backplane, `[cluster]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ClusterConfig {
    /// Redis URL.
    pub redis_url: String,
    /// This node's id.
    pub node_id: String,
    /// Heartbeat period.
    #[serde(deserialize_with = "duration::at_least::<_, 100>")]
    pub heartbeat: Duration,
    /// Whether nodes rebalance on their own.
    pub rebalance: crate::cluster::RebalanceMode,
    /// Devices per second a node hands over while rebalancing (at least 1).
    pub rebalance_rate: u32,
}

/// SQLite durability level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Device listener settings (`[device]`).
#[derive(Debug, Clone, Deserialize)]
pub struct DeviceConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Plain ws instead of wss.
    pub plain_ws: bool,
    /// Trust X-Forwarded-For for the device's address.
    pub forwarded_for: bool,
    /// Ping period.
    #[serde(deserialize_with = "duration::at_least::<_, 50>")]
    pub ping_interval: Duration,
    /// Silence after a ping that means offline.
    #[serde(deserialize_with = "duration::at_least::<_, 50>")]
    pub pong_timeout: Duration,
    /// Time allowed between upgrade and Hello.
    #[serde(deserialize_with = "duration::at_least::<_, 50>")]
    pub hello_timeout: Duration,
    /// Time allowed for TCP + TLS + upgrade.
    #[serde(deserialize_with = "duration::at_least::<_, 50>")]
    pub handshake_timeout: Duration,
    /// Time a new TCP connection may stay silent before its first byte.
    #[serde(deserialize_with = "duration::at_least::<_, 50>")]
    pub first_byte_timeout: Duration,
    /// Time allowed for one frame write.
    #[serde(deserialize_with = "duration::at_least::<_, 50>")]
    pub write_timeout: Duration,
    /// Most concurrent device connections.
    #[serde(deserialize_with = "count::at_least::<_, 1>")]
    pub max_connections: usize,
    /// Most concurrent handshakes.
    #[serde(deserialize_with = "count::at_least::<_, 1>")]
    pub max_handshakes: usize,
    /// Most concurrent handshakes from one source address (one IPv6 /64).
    #[serde(deserialize_with = "count::at_least::<_, 1>")]
    pub max_handshakes_per_source: usize,
    /// Commands outstanding per connection. At most what a device remembers for
    /// de-duplication (`schemas::session::DEDUP_WINDOW`), so a re-delivered command is
    /// always recognised.
    #[serde(deserialize_with = "count::within::<_, 1, 32>")]
    pub command_queue: usize,
    /// Messages per second a device may send.
    #[serde(deserialize_with = "count::at_least::<_, 1>")]
    pub max_messages_per_sec: usize,
}

/// TLS settings (`[tls]`).
#[derive(Debug, Clone, Deserialize)]
pub struct TlsConfig {
    /// Certificate chain; `None` uses the generated one.
    #[serde(deserialize_with = "path_unless_empty")]
    pub cert: Option<PathBuf>,
    /// Private key; `None` uses the generated one.
    #[serde(deserialize_with = "path_unless_empty")]
    pub key: Option<PathBuf>,
    /// Extra SANs for the generated certificate.
    #[serde(deserialize_with = "list_or_commas")]
    pub server_names: Vec<String>,
    /// The CA(s) of device client certificates; `None` uses the generated CA.
    #[serde(default, deserialize_with = "path_unless_empty")]
    pub device_ca: Option<PathBuf>,
    /// The issuing device CA's key.
    #[serde(default, deserialize_with = "path_unless_empty")]
    pub device_ca_key: Option<PathBuf>,
    /// Whether devices get TLS 1.3 session tickets.
    pub session_tickets: bool,
    /// The ticket secret; `None` uses the generated one.
    #[serde(deserialize_with = "path_unless_empty")]
    pub ticket_key: Option<PathBuf>,
}

/// Firmware artifacts (`[firmware]`).
#[derive(Debug, Clone, Deserialize)]
pub struct FirmwareConfig {
    /// The artifact directory; `None` uses `DATA_DIR/firmware`.
    #[serde(deserialize_with = "path_unless_empty")]
    pub dir: Option<PathBuf>,
    /// The signing key; `None` uses `DATA_DIR/firmware-signing-key`.
    #[serde(deserialize_with = "path_unless_empty")]
    pub signing_key: Option<PathBuf>,
    /// The cap on chunk bytes per second over all devices; 0 is none.
    #[serde(deserialize_with = "size::any")]
    pub max_transfer_rate: u64,
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
    /// Firmware artifacts.
    pub firmware: FirmwareConfig,
    /// Admin API listen address.
    pub admin_listen: SocketAddr,
    /// SQLite durability and size limit.
    pub sqlite: SqliteOptions,
    /// Telemetry store.
    pub storage: StorageBackend,
    /// How long presence history and finished commands are kept (zero: forever).
    pub history_retention: Duration,
    /// How long readings are kept in the SQLite store (zero: forever).
    pub telemetry_retention: Duration,
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

/// Why the configuration could not be loaded: every problem found, not just the first.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed.
    #[error("cannot load configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// One or more keys are invalid.
    #[error("invalid configuration:\n{}", config_check::lines(.0))]
    Invalid(Vec<Problem>),
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
        let defaults = defaults();
        let file = match &sources.file {
            Some(file) => Some(file.as_path()),
            None => Some(Path::new("hub.toml")).filter(|p| p.exists()),
        };
        let tree = Layers {
            defaults: &defaults,
            file,
            env_prefix: "HUB",
            env: &sources.env,
            env_ignored: CLI_ONLY_ENV,
            overrides: &sources.overrides,
        }
        .merge()?;
        let default_tree = Layers {
            defaults: &defaults,
            ..Layers::default()
        }
        .merge()?;
        let mut findings = Findings::default();
        let how = Read {
            defaults: Some(&default_tree),
            ..Read::default()
        };
        let config = findings
            .read_with::<HubFile>(&tree, "", how)
            .map(|file| validate(file, &mut findings));
        match config {
            Some(config) if findings.problems.is_empty() => Ok(config),
            _ => Err(ConfigError::Invalid(findings.problems)),
        }
    }
}

/// [`KEYS`] as (key, default) pairs, the lowest layer.
fn defaults() -> Vec<(&'static str, &'static str)> {
    KEYS.iter()
        .map(|(key, default, _)| (*key, *default))
        .collect()
}

/// The file's shape: every key of [`KEYS`], by section.
#[derive(Debug, Deserialize)]
struct HubFile {
    data_dir: String,
    device: DeviceConfig,
    tls: TlsConfig,
    firmware: FirmwareConfig,
    admin: AdminSection,
    storage: StorageSection,
    auth: AuthSection,
    cluster: ClusterConfig,
    ingest: IngestSection,
    log: LogSection,
}

/// `[admin]`.
#[derive(Debug, Deserialize)]
struct AdminSection {
    listen: SocketAddr,
}

/// `[storage]`.
#[derive(Debug, Deserialize)]
struct StorageSection {
    synchronous: Synchronous,
    #[serde(deserialize_with = "size::any")]
    sqlite_max_bytes: u64,
    #[serde(deserialize_with = "duration::any")]
    history_retention: Duration,
    #[serde(deserialize_with = "duration::any")]
    telemetry_retention: Duration,
    backend: Backend,
    influxdb: InfluxConfig,
}

/// `storage.backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Backend {
    Sqlite,
    Influxdb,
}

/// `[auth]`.
#[derive(Debug, Deserialize)]
struct AuthSection {
    token_secret: String,
    admin_token: String,
}

/// `[ingest]`.
#[derive(Debug, Deserialize)]
struct IngestSection {
    #[serde(deserialize_with = "count::at_least::<_, 1>")]
    queue: usize,
    #[serde(deserialize_with = "count::at_least::<_, 1>")]
    max_group: usize,
}

/// `[log]`.
#[derive(Debug, Deserialize)]
struct LogSection {
    format: LogFormat,
    level: String,
}

/// A path, or `None` for an empty string (the key's "not set").
fn path_unless_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    let text = String::deserialize(d)?;
    Ok(Some(text.trim())
        .filter(|t| !t.is_empty())
        .map(PathBuf::from))
}

/// A list of strings: a TOML list, or comma-separated (as an environment variable gives it).
fn list_or_commas<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct ListOrCommas;
    impl<'de> Visitor<'de> for ListOrCommas {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of names or a comma-separated string")
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<Vec<String>, E> {
            Ok(text.split(',').map(String::from).collect())
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element::<String>()? {
                items.push(item);
            }
            Ok(items)
        }
    }
    let items = d.deserialize_any(ListOrCommas)?;
    Ok(items
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect())
}

/// The rules that span keys, and the file's shape turned into [`HubConfig`]. Problems go
/// to `findings`.
fn validate(file: HubFile, findings: &mut Findings) -> HubConfig {
    let data_dir = match file.data_dir.trim() {
        "" => PathBuf::from("hub-data"),
        dir => PathBuf::from(dir),
    };
    if file.tls.cert.is_some() != file.tls.key.is_some() {
        findings.problem("tls.cert", "tls.cert and tls.key must be set together");
    }
    if file.tls.device_ca_key.is_some() && file.tls.device_ca.is_none() {
        findings.problem(
            "tls.device_ca_key",
            "needs tls.device_ca (the certificate of the CA this key belongs to)",
        );
    }
    let storage = match file.storage.backend {
        Backend::Sqlite => StorageBackend::Sqlite,
        Backend::Influxdb => StorageBackend::InfluxDb(influx(file.storage.influxdb, findings)),
    };
    if storage != StorageBackend::Sqlite && !file.storage.telemetry_retention.is_zero() {
        findings.problem(
            "storage.telemetry_retention",
            "applies to storage.backend = \"sqlite\"; InfluxDB keeps readings as long as its bucket's retention says",
        );
    }
    let cluster = cluster(file.cluster, &storage, findings);
    let token_secret = Some(file.auth.token_secret.trim().to_string()).filter(|s| !s.is_empty());
    if token_secret
        .as_deref()
        .is_some_and(|s| crate::token::TokenSecret::from_hex(s).is_none())
    {
        findings.problem(
            "auth.token_secret",
            "must be 64 hex digits (32 random bytes), e.g. from `openssl rand -hex 32`",
        );
    }
    let admin_token = Some(file.auth.admin_token.trim().to_string()).filter(|s| !s.is_empty());
    if admin_token.as_deref().is_some_and(|t| t.len() < 16) {
        findings.problem("auth.admin_token", "must be at least 16 characters");
    }
    if tracing_subscriber::EnvFilter::try_new(&file.log.level).is_err() {
        findings.problem(
            "log.level",
            format!(
                "`{}` is not a log filter (examples: info, hub=debug)",
                file.log.level
            ),
        );
    }
    HubConfig {
        data_dir,
        device: file.device,
        tls: file.tls,
        firmware: file.firmware,
        admin_listen: file.admin.listen,
        sqlite: SqliteOptions {
            synchronous: file.storage.synchronous,
            max_bytes: file.storage.sqlite_max_bytes,
        },
        storage,
        history_retention: file.storage.history_retention,
        telemetry_retention: file.storage.telemetry_retention,
        cluster,
        token_secret,
        admin_token,
        ingest_queue: file.ingest.queue,
        ingest_max_group: file.ingest.max_group,
        log_format: file.log.format,
        log_level: file.log.level,
    }
}

/// `[storage.influxdb]` when it is the backend: url, org and bucket are required.
fn influx(given: InfluxConfig, findings: &mut Findings) -> InfluxConfig {
    let when = "required when storage.backend = \"influxdb\"";
    let mut required = |key: &str, value: &str| {
        let value = value.trim().to_string();
        if value.is_empty() {
            findings.problem(format!("storage.influxdb.{key}"), when);
        }
        value
    };
    let url = required("url", &given.url);
    let org = required("org", &given.org);
    let bucket = required("bucket", &given.bucket);
    if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
        findings.problem(
            "storage.influxdb.url",
            format!("`{url}` must start with http:// or https://"),
        );
    }
    InfluxConfig {
        url: url.trim_end_matches('/').to_string(),
        org,
        bucket,
        token: given.token.trim().to_string(),
        measurement: given.measurement.trim().to_string(),
        ..given
    }
}

/// `[cluster]`: none without a Redis URL; with one, a telemetry store all nodes share.
fn cluster(
    given: ClusterConfig,
    storage: &StorageBackend,
    findings: &mut Findings,
) -> Option<ClusterConfig> {
    let redis_url = given.redis_url.trim().to_string();
    if redis_url.is_empty() {
        return None;
    }
    if !["redis://", "rediss://", "unix://"]
        .iter()
        .any(|scheme| redis_url.starts_with(scheme))
    {
        findings.problem(
            "cluster.redis_url",
            format!("`{redis_url}` must start with redis://, rediss:// or unix://"),
        );
    }
    if *storage == StorageBackend::Sqlite {
        findings.problem(
            "storage.backend",
            "a cluster (cluster.redis_url) needs a shared telemetry store: set storage.backend = \"influxdb\"",
        );
    }
    if given.rebalance_rate == 0 {
        findings.problem(
            "cluster.rebalance_rate",
            "must be at least 1 (devices per second)",
        );
    }
    Some(ClusterConfig {
        redis_url,
        node_id: given.node_id.trim().to_string(),
        heartbeat: given.heartbeat,
        rebalance: given.rebalance,
        rebalance_rate: given.rebalance_rate,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

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

    fn problems(err: ConfigError) -> Vec<Problem> {
        match err {
            ConfigError::Invalid(problems) => problems,
            other => panic!("{other}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        let c = load(&[], &[]).expect("defaults");
        assert_eq!(c.device.ping_interval, Duration::from_secs(30));
        assert_eq!(c.device.pong_timeout, Duration::from_secs(15));
        assert_eq!(c.sqlite.synchronous, Synchronous::Full);
        assert_eq!(c.storage, StorageBackend::Sqlite);
        assert_eq!(c.history_retention, Duration::from_secs(30 * 86_400));
        assert!(
            c.telemetry_retention.is_zero(),
            "readings are kept unless asked"
        );
        assert!(c.tls.cert.is_none() && c.tls.server_names.is_empty());
        assert!(c.cluster.is_none() && c.token_secret.is_none());
    }

    #[test]
    fn env_then_flags_take_precedence() {
        let c = load(
            &[
                ("HUB_DEVICE__PING_INTERVAL", "2s"),
                ("HUB_API", "http://x"),
                ("HUB_LOG__FORMAT", "json"),
                ("HUB_TLS__SERVER_NAMES", "hub.example.com, 10.0.0.5,"),
                ("HUB_STORAGE__SQLITE_MAX_BYTES", "512MiB"),
            ],
            &[("device.ping_interval", "500ms")],
        )
        .expect("valid");
        assert_eq!(c.device.ping_interval, Duration::from_millis(500));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.tls.server_names, ["hub.example.com", "10.0.0.5"]);
        assert_eq!(c.sqlite.max_bytes, 512 << 20);
    }

    #[test]
    fn every_bad_key_is_named() {
        let errors = problems(
            load(
                &[
                    ("HUB_DEVICE__PING_INTERVAL", "soon"),
                    ("HUB_DEVICE__BOGUS", "1"),
                ],
                &[("device.listen", "nowhere"), ("log.format", "xml")],
            )
            .expect_err("invalid"),
        );
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

    #[test]
    fn bad_keys_in_several_sections_and_cross_key_rules_are_all_named() {
        let errors = problems(
            load(
                &[
                    ("HUB_STORAGE__BACKEND", "influxdb"),
                    ("HUB_STORAGE__INFLUXDB__URL", "influx:8086"),
                    ("HUB_STORAGE__INFLUXDB__SPOOL_MAX_BYTES", "a lot"),
                    ("HUB_CLUSTER__HEARTBEAT", "10ms"),
                    ("HUB_INGEST__QUEUE", "0"),
                    ("HUB_INGEST__COLOUR", "red"),
                    ("HUB_AUTH__ADMIN_TOKEN", "short"),
                    ("HUB_TLS__CERT", "/etc/hub/cert.pem"),
                    ("HUB_TLS__DEVICE_CA_KEY", "/etc/hub/device-ca-key.pem"),
                ],
                &[
                    ("admin.listen", "127.0.0.1"),
                    ("storage.synchronous", "off"),
                ],
            )
            .expect_err("invalid"),
        );
        let all = config_check::lines(&errors);
        for expected in [
            "storage.influxdb.url: `influx:8086` must start with http:// or https://",
            "storage.influxdb.org: required when storage.backend = \"influxdb\"",
            "storage.influxdb.bucket: required",
            "storage.influxdb.spool_max_bytes: expected a size like",
            "cluster.heartbeat: expected a duration of at least 100ms, got \"10ms\"",
            "ingest.queue: expected a whole number of at least 1, got 0",
            "ingest.colour: unknown key (known here: queue, max_group)",
            "auth.admin_token: must be at least 16 characters",
            "tls.cert: tls.cert and tls.key must be set together",
            "tls.device_ca_key: needs tls.device_ca",
            "admin.listen: ",
            "storage.synchronous: expected \"full\" or \"normal\", got \"off\"",
        ] {
            assert!(all.contains(expected), "missing {expected:?} in:\n{all}");
        }
        assert_eq!(errors.len(), 12, "{all}");
    }

    #[test]
    fn telemetry_retention_is_read_and_belongs_to_sqlite() {
        let c = load(&[("HUB_STORAGE__TELEMETRY_RETENTION", "90d")], &[]).expect("valid");
        assert_eq!(c.telemetry_retention, Duration::from_secs(90 * 86_400));
        let errors = problems(
            load(
                &[
                    ("HUB_STORAGE__TELEMETRY_RETENTION", "90d"),
                    ("HUB_STORAGE__BACKEND", "influxdb"),
                    ("HUB_STORAGE__INFLUXDB__URL", "http://influx:8086"),
                    ("HUB_STORAGE__INFLUXDB__ORG", "o"),
                    ("HUB_STORAGE__INFLUXDB__BUCKET", "b"),
                ],
                &[],
            )
            .expect_err("not for influxdb"),
        );
        assert_eq!(
            config_check::lines(&errors),
            "  storage.telemetry_retention: applies to storage.backend = \"sqlite\"; InfluxDB keeps readings as long as its bucket's retention says"
        );
        let errors = problems(
            load(&[("HUB_STORAGE__TELEMETRY_RETENTION", "a month")], &[]).expect_err("bad"),
        );
        assert_eq!(errors[0].key, "storage.telemetry_retention");
    }

    #[test]
    fn a_cluster_needs_a_shared_store_and_a_redis_url() {
        let errors = problems(
            load(&[("HUB_CLUSTER__REDIS_URL", "localhost:6379")], &[]).expect_err("invalid"),
        );
        let keys: BTreeSet<_> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            ["cluster.redis_url", "storage.backend"]
                .into_iter()
                .collect()
        );
    }

    #[test]
    fn rebalancing_is_manual_or_auto_at_one_device_per_second_or_more() {
        let cluster = [
            ("HUB_CLUSTER__REDIS_URL", "redis://localhost:6379"),
            ("HUB_STORAGE__BACKEND", "influxdb"),
            ("HUB_STORAGE__INFLUXDB__URL", "http://influx:8086"),
            ("HUB_STORAGE__INFLUXDB__ORG", "o"),
            ("HUB_STORAGE__INFLUXDB__BUCKET", "b"),
            ("HUB_STORAGE__INFLUXDB__TOKEN", "t"),
        ];
        let c = load(&cluster, &[]).expect("valid");
        let given = c.cluster.expect("clustered");
        assert_eq!(given.rebalance, crate::cluster::RebalanceMode::Manual);
        assert_eq!(given.rebalance_rate, 20);
        let mut env = cluster.to_vec();
        env.extend([
            ("HUB_CLUSTER__REBALANCE", "sometimes"),
            ("HUB_CLUSTER__REBALANCE_RATE", "0"),
        ]);
        let errors = problems(load(&env, &[]).expect_err("invalid"));
        let keys: BTreeSet<_> = errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            ["cluster.rebalance", "cluster.rebalance_rate"]
                .into_iter()
                .collect()
        );
    }

    #[test]
    fn every_keys_entry_reads_and_every_struct_field_is_in_keys() {
        let defaults = defaults();
        let tree = Layers {
            defaults: &defaults,
            ..Layers::default()
        }
        .merge()
        .expect("defaults merge");
        // Every KEYS entry is a field of the right type (no unknown key, no bad value),
        // and every field without a serde default has a KEYS entry (none is missing).
        let mut findings = Findings::default();
        let file: Option<HubFile> = findings.read(&tree, "");
        assert!(file.is_some(), "{:?}", findings.problems);
        assert!(findings.problems.is_empty(), "{:?}", findings.problems);
        // And no field has a serde default that would hide a missing KEYS entry: the
        // fields of every section, read from the types, are exactly the KEYS.
        let sections: &[(&str, &[&str])] = &[
            ("device", config_check::fields_of::<DeviceConfig>()),
            ("tls", config_check::fields_of::<TlsConfig>()),
            ("firmware", config_check::fields_of::<FirmwareConfig>()),
            ("admin", config_check::fields_of::<AdminSection>()),
            ("storage", config_check::fields_of::<StorageSection>()),
            (
                "storage.influxdb",
                config_check::fields_of::<InfluxConfig>(),
            ),
            ("auth", config_check::fields_of::<AuthSection>()),
            ("cluster", config_check::fields_of::<ClusterConfig>()),
            ("ingest", config_check::fields_of::<IngestSection>()),
            ("log", config_check::fields_of::<LogSection>()),
        ];
        let tables: BTreeSet<&str> = sections.iter().map(|(name, _)| *name).collect();
        let mut from_types = BTreeSet::new();
        for field in config_check::fields_of::<HubFile>() {
            if !tables.contains(field) {
                from_types.insert(field.to_string());
            }
        }
        for (section, fields) in sections {
            for field in *fields {
                let key = format!("{section}.{field}");
                if !tables.contains(key.as_str()) {
                    from_types.insert(key);
                }
            }
        }
        let from_keys: BTreeSet<String> = KEYS.iter().map(|(k, _, _)| k.to_string()).collect();
        assert_eq!(from_types, from_keys);
    }

    #[test]
    fn server_names_are_a_list_or_comma_separated() {
        let mut findings = Findings::default();
        let given = serde_json::json!({"cert": " ", "key": "", "server_names": ["a", " b ", "", 7], "session_tickets": true, "ticket_key": ""});
        let tls: TlsConfig = findings.read(&given, "tls").expect("valid");
        assert_eq!(tls.server_names, ["a", "b", "7"]);
        assert!(tls.cert.is_none() && tls.key.is_none());
        let given = serde_json::json!({"cert": "c.pem", "key": "k.pem", "server_names": "a,b", "session_tickets": false, "ticket_key": "t"});
        let tls: TlsConfig = findings.read(&given, "tls").expect("valid");
        assert_eq!(tls.server_names, ["a", "b"]);
        assert_eq!(tls.cert, Some(PathBuf::from("c.pem")));
        let given = serde_json::json!({"cert": "", "key": "", "server_names": {"a": 1}, "session_tickets": true, "ticket_key": ""});
        assert!(findings.read::<TlsConfig>(&given, "tls").is_none());
        assert_eq!(
            config_check::lines(&findings.problems),
            "  tls.server_names: expected a list of names or a comma-separated string, got a table"
        );
    }

    #[test]
    fn the_example_hub_toml_loads() {
        let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/hub.toml");
        let c = HubConfig::load(&Sources {
            file: Some(file),
            ..Sources::default()
        })
        .expect("deploy/hub.toml is valid");
        assert_eq!(c.data_dir, PathBuf::from("/var/lib/hub"));
        assert_eq!(c.device.max_connections, 100_000);
    }
}

//! The validation pass: the file's shape read with `config-check` (every unknown key and
//! every value of the wrong type or out of range is named there), then the rules that span
//! keys or look at the host, turning it into an [`AgentConfig`].
//!
//! The rules, by section:
//! - top: `data_dir` is not empty;
//! - `[hub]`: `url` is `wss://` (or `ws://`, with a warning) with a host, and a path (else
//!   a warning); `device_id` is a valid id; exactly one of `token` and `token_file` (or
//!   neither with a client certificate), the token fits an HTTP header (a token issued for
//!   another device is a warning; a token file readable by everyone too); `cert_file` and
//!   `key_file` go together, need `wss://` and hold a certificate and a private key (a key
//!   readable by everyone is a warning); `ca_file` holds a certificate and is required for
//!   `wss://`; `server_name` is a DNS name or IP address;
//! - `[reconnect]`: `max` is not below `initial`;
//! - `[log]`: `level` is a tracing filter;
//! - `[[sensors]]`: names are unique and valid, `kind` is system, exec or file and decides
//!   the other keys; exec: `program` is an absolute path to an executable file, `env`
//!   names are valid, a `timeout` above the interval is a warning; file: `path` is
//!   absolute (a missing file is a warning); `scale` and `offset` are finite; metric names
//!   are valid. No `sensors` key means one system sensor; an empty list is a warning;
//! - `[[actions]]`: names are unique, valid and not a built-in command; `program` as for
//!   exec sensors; every parameter used in `args` is declared and every declared one is
//!   used; each parameter has a rule, `min` is not above `max`, and its `default` passes
//!   its rules; `working_dir` is absolute; `env` names are valid.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config_check::{duration, key, Findings, OtherKeys, Read};
use schemas::limits::{is_valid_device_id, is_valid_name, MAX_COMMAND_NAME_LEN, MAX_METRIC_LEN};
use schemas::Encoding;
use serde::Deserialize;
use serde_json::Value;

use super::{
    AgentConfig, ClientCert, CommandsConfig, DesiredConfig, ExecSensor, FileSensor, HubConfig,
    LogConfig, QueueConfig, ReconnectConfig, SensorConfig, SensorKind, SystemSensor, TokenSource,
    UpdateConfig, DEFAULT_DATA_DIR,
};
use crate::actions::{Action, Template};
use crate::commands::BUILTINS;

/// The whole file. Lists of tables are kept as values and read entry by entry, so each
/// entry is named by its index and name (`sensors[1] (cpu_temp)`), and a sensor's keys
/// can depend on its kind.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct AgentFile {
    hub: HubSection,
    reconnect: ReconnectConfig,
    data_dir: String,
    queue: QueueConfig,
    commands: CommandsConfig,
    desired: DesiredConfig,
    update: UpdateConfig,
    log: LogConfig,
    sensors: Option<Vec<Value>>,
    actions: Vec<Value>,
}

impl Default for AgentFile {
    fn default() -> AgentFile {
        AgentFile {
            hub: HubSection::default(),
            reconnect: ReconnectConfig::default(),
            data_dir: DEFAULT_DATA_DIR.to_string(),
            queue: QueueConfig::default(),
            commands: CommandsConfig::default(),
            desired: DesiredConfig::default(),
            update: UpdateConfig::default(),
            log: LogConfig::default(),
            sensors: None,
            actions: Vec::new(),
        }
    }
}

/// `[hub]` as written (empty strings are keys not given).
#[derive(Debug, Deserialize)]
#[serde(default)]
struct HubSection {
    url: String,
    device_id: String,
    token: String,
    token_file: String,
    cert_file: String,
    key_file: String,
    ca_file: String,
    server_name: String,
    encoding: EncodingName,
    /// 1 s to 5 min.
    #[serde(deserialize_with = "duration::within::<_, 1_000, 300_000>")]
    connect_timeout: Duration,
}

impl Default for HubSection {
    fn default() -> HubSection {
        HubSection {
            url: String::new(),
            device_id: String::new(),
            token: String::new(),
            token_file: String::new(),
            cert_file: String::new(),
            key_file: String::new(),
            ca_file: String::new(),
            server_name: String::new(),
            encoding: EncodingName::Postcard,
            connect_timeout: Duration::from_secs(15),
        }
    }
}

/// `hub.encoding`: the encoding's name or its subprotocol.
#[derive(Debug, Clone, Copy, Deserialize)]
enum EncodingName {
    #[serde(rename = "postcard", alias = "hub.v1.postcard")]
    Postcard,
    #[serde(rename = "json", alias = "hub.v1.json")]
    Json,
}

/// The keys every `[[sensors]]` table has, whatever its kind.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SensorEntry {
    name: String,
    kind: String,
    /// 100 ms to 1 day; the default depends on the kind.
    #[serde(deserialize_with = "duration::optional_within::<_, 100, 86_400_000>")]
    interval: Option<Duration>,
}

/// Reads and checks the merged tree: the configuration, unless a part of it could not be
/// built, and everything found on the way.
pub(super) fn agent(tree: &Value) -> (Option<AgentConfig>, Findings) {
    let mut check = Check::default();
    let config = check
        .findings
        .read::<AgentFile>(tree, "")
        .and_then(|file| check.agent(file));
    (config, check.findings)
}

/// The validation pass, collecting into `findings`.
#[derive(Default)]
struct Check {
    findings: Findings,
}

impl Check {
    fn problem(&mut self, key: &str, message: impl std::fmt::Display) {
        self.findings.problem(key, message);
    }

    fn warn(&mut self, key: &str, message: impl std::fmt::Display) {
        self.findings.warn(key, message);
    }

    fn agent(&mut self, file: AgentFile) -> Option<AgentConfig> {
        let hub = self.hub(file.hub);
        if file.reconnect.max < file.reconnect.initial {
            self.problem("reconnect.max", "must not be below reconnect.initial");
        }
        if file.data_dir.trim().is_empty() {
            self.problem(
                "data_dir",
                format!("is empty: give the directory for the queue (default {DEFAULT_DATA_DIR})"),
            );
        }
        if tracing_subscriber::EnvFilter::try_new(&file.log.level).is_err() {
            self.problem(
                "log.level",
                format!(
                    "{:?} is not a log filter (try \"info\" or \"info,device_agent=debug\")",
                    file.log.level
                ),
            );
        }
        let sensors = self.sensors(file.sensors);
        let actions = self.actions(&file.actions);
        Some(AgentConfig {
            hub: hub?,
            reconnect: file.reconnect,
            data_dir: PathBuf::from(file.data_dir),
            queue: file.queue,
            commands: file.commands,
            desired: self.desired(file.desired),
            update: self.update(file.update),
            log: file.log,
            sensors,
            actions,
        })
    }

    fn desired(&mut self, d: DesiredConfig) -> DesiredConfig {
        self.absolute_program("desired.program", d.program());
        d
    }

    /// A program run without a shell or PATH must be named by an absolute path.
    fn absolute_program(&mut self, key: &str, program: Option<&std::path::Path>) {
        if let Some(program) = program.filter(|p| !p.is_absolute()) {
            self.problem(
                key,
                format!(
                    "{:?} must be an absolute path (it runs without a shell or PATH)",
                    program.display().to_string()
                ),
            );
        }
    }

    fn update(&mut self, u: UpdateConfig) -> UpdateConfig {
        self.absolute_program("update.program", u.program());
        if !u.key.trim().is_empty() && u.public_key().is_none() {
            self.problem(
                "update.key",
                "must be 64 hex digits, as `hub firmware key` prints it".to_string(),
            );
        }
        u
    }

    fn hub(&mut self, h: HubSection) -> Option<HubConfig> {
        let url = self.required("hub.url", &h.url);
        let parsed = url.and_then(|u| self.url(u));
        let device_id = self.required("hub.device_id", &h.device_id);
        if let Some(id) = device_id {
            if !is_valid_device_id(id) {
                self.problem(
                    "hub.device_id",
                    format!("{id:?} must be 1 to 64 of [A-Za-z0-9_.-]"),
                );
            }
        }
        let tls = parsed.as_ref().is_none_or(|(_, _, tls)| *tls);
        let client_cert = self.client_cert(h.cert_file.trim(), h.key_file.trim(), tls);
        let with_cert = matches!(client_cert, Some(Some(_)));
        let token = self.token(h.token.trim(), h.token_file.trim(), device_id, with_cert);
        let ca_file = Some(h.ca_file.as_str())
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
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
        let server_name = Some(h.server_name).filter(|s| !s.is_empty());
        if let Some(name) = &server_name {
            if rustls::pki_types::ServerName::try_from(name.as_str()).is_err() {
                self.problem(
                    "hub.server_name",
                    format!("{name:?} is not a DNS name or IP address"),
                );
            }
        }
        let (host, port, tls) = parsed?;
        Some(HubConfig {
            url: url?.to_string(),
            host,
            port,
            tls,
            device_id: device_id?.to_string(),
            token: token?,
            client_cert: client_cert?,
            ca_file,
            server_name,
            encoding: match h.encoding {
                EncodingName::Postcard => Encoding::Postcard,
                EncodingName::Json => Encoding::Json,
            },
            connect_timeout: h.connect_timeout,
        })
    }

    /// `value`, or a problem when it is empty.
    fn required<'v>(&mut self, key: &str, value: &'v str) -> Option<&'v str> {
        if value.trim().is_empty() {
            self.problem(key, "is required");
            None
        } else {
            Some(value)
        }
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

    /// Exactly one of `hub.token` and `hub.token_file` (both trimmed), or neither when a
    /// client certificate identifies the device. `None` when that is not so; `Some(None)`
    /// for a certificate alone.
    fn token(
        &mut self,
        inline: &str,
        file: &str,
        device_id: Option<&str>,
        with_cert: bool,
    ) -> Option<Option<TokenSource>> {
        match (inline.is_empty(), file.is_empty()) {
            (true, true) if with_cert => Some(None),
            (false, false) => {
                self.problem(
                    "hub.token",
                    "set either hub.token or hub.token_file, not both",
                );
                None
            }
            (true, true) => {
                self.problem(
                    "hub.token_file",
                    "a token or a client certificate is required: set hub.token_file (or hub.token / DEVICE_AGENT_HUB__TOKEN; `hub token issue DEVICE_ID` prints one), or hub.cert_file and hub.key_file (`hub devices add DEVICE_ID --cert DIR` writes them)",
                );
                None
            }
            (false, true) => {
                self.token_text("hub.token", inline, device_id);
                Some(Some(TokenSource::Inline(inline.to_string())))
            }
            (true, false) => {
                let path = PathBuf::from(file);
                match std::fs::read_to_string(&path) {
                    Ok(text) => {
                        self.token_text("hub.token_file", text.trim(), device_id);
                        self.warn_if_world_readable("hub.token_file", &path);
                    }
                    Err(e) => self.problem("hub.token_file", format!("{}: {e}", path.display())),
                }
                Some(Some(TokenSource::File(path)))
            }
        }
    }

    /// `hub.cert_file` and `hub.key_file`, both or neither; they need wss://, the
    /// certificate file must hold a certificate and the key file a private key (readable
    /// by its owner only, else a warning). `None` when that is not so.
    fn client_cert(&mut self, cert: &str, key: &str, tls: bool) -> Option<Option<ClientCert>> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        match (cert.is_empty(), key.is_empty()) {
            (true, true) => return Some(None),
            (false, false) => {}
            (true, false) | (false, true) => {
                self.problem(
                    "hub.cert_file",
                    "hub.cert_file and hub.key_file go together (`hub devices add ID --cert DIR` writes DIR/ID.crt and DIR/ID.key)",
                );
                return None;
            }
        }
        if !tls {
            self.problem(
                "hub.cert_file",
                "a client certificate needs TLS: hub.url must start with wss://",
            );
            return None;
        }
        let (cert, key) = (PathBuf::from(cert), PathBuf::from(key));
        let certs =
            CertificateDer::pem_file_iter(&cert).and_then(Iterator::collect::<Result<Vec<_>, _>>);
        let cert_ok = match certs {
            Ok(c) if !c.is_empty() => true,
            Ok(_) => {
                self.problem(
                    "hub.cert_file",
                    format!("{}: no certificate in it", cert.display()),
                );
                false
            }
            Err(e) => {
                self.problem("hub.cert_file", format!("{}: {e}", cert.display()));
                false
            }
        };
        let key_ok = match PrivateKeyDer::from_pem_file(&key) {
            Ok(_) => {
                self.warn_if_world_readable("hub.key_file", &key);
                true
            }
            Err(e) => {
                self.problem("hub.key_file", format!("{}: {e}", key.display()));
                false
            }
        };
        (cert_ok && key_ok).then_some(Some(ClientCert {
            cert_file: cert,
            key_file: key,
        }))
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

    fn warn_if_world_readable(&mut self, key: &str, path: &Path) {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(path) {
            if m.permissions().mode() & 0o004 != 0 {
                self.warn(
                    key,
                    format!("{} is readable by every user; chmod 600 it", path.display()),
                );
            }
        }
    }

    fn ca(&mut self, path: &Path) {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::CertificateDer;
        let certs =
            CertificateDer::pem_file_iter(path).and_then(Iterator::collect::<Result<Vec<_>, _>>);
        match certs {
            Ok(c) if !c.is_empty() => {}
            Ok(_) => self.problem(
                "hub.ca_file",
                format!("{}: no certificate in it", path.display()),
            ),
            Err(e) => self.problem("hub.ca_file", format!("{}: {e}", path.display())),
        }
    }

    /// An executable given by absolute path (exec sensors and actions).
    fn program(&mut self, key: &str, path: &Path) {
        let text = path.display();
        if path.as_os_str().is_empty() {
            self.problem(key, "is required");
        } else if !path.is_absolute() {
            self.problem(
                key,
                format!(
                    "{:?} must be an absolute path (no PATH lookup, no shell)",
                    text.to_string()
                ),
            );
        } else {
            use std::os::unix::fs::PermissionsExt;
            match std::fs::metadata(path) {
                Ok(m) if m.is_file() => {
                    if m.permissions().mode() & 0o111 == 0 {
                        self.problem(key, format!("{text} is not executable"));
                    }
                }
                Ok(_) => self.problem(key, format!("{text} is not a file")),
                Err(e) => self.problem(key, format!("{text}: {e}")),
            }
        }
    }

    /// `env` tables: names a shell would accept, values without NUL.
    fn env(&mut self, prefix: &str, env: &[(String, String)]) {
        for (name, value) in env {
            let valid_name = !name.is_empty()
                && !name.starts_with(|c: char| c.is_ascii_digit())
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            let at = key(&key(prefix, "env"), name);
            if !valid_name {
                self.problem(&at, "environment variable names use [A-Za-z0-9_]");
            } else if value.contains('\0') {
                self.problem(&at, "contains a NUL character");
            }
        }
    }

    /// A metric name (default: the sensor's name).
    fn metric(&mut self, prefix: &str, metric: String, name: &str) -> String {
        let metric = if metric.is_empty() {
            name.to_string()
        } else {
            metric
        };
        if !metric.is_empty() && !is_valid_name(&metric, MAX_METRIC_LEN) {
            self.problem(
                &key(prefix, "metric"),
                format!("{metric:?} must be 1 to 64 of [A-Za-z0-9_.:/-]"),
            );
        }
        metric
    }

    fn sensors(&mut self, items: Option<Vec<Value>>) -> Vec<SensorConfig> {
        let Some(items) = items else {
            // Nothing configured: system readings every 30 s, the useful default.
            return vec![SensorConfig {
                name: "system".to_string(),
                interval: Duration::from_secs(30),
                kind: SensorKind::System(SystemSensor::default()),
            }];
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
            let p = entry_label("sensors", i, item);
            // Checked on the raw name, so a duplicate is reported even when the entry has
            // other problems too.
            if let Some(name) = item.get("name").and_then(Value::as_str) {
                if !names.insert(name) {
                    self.problem(&p, format!("sensor name {name:?} is used twice"));
                }
            }
            if let Some(s) = self.sensor(item, &p) {
                out.push(s);
            }
        }
        out
    }

    fn sensor(&mut self, item: &Value, p: &str) -> Option<SensorConfig> {
        let common = Read {
            other_keys: OtherKeys::Ignored,
            ..Read::default()
        };
        let entry: SensorEntry = self.findings.read_with(item, p, common)?;
        if entry.name.is_empty() {
            self.problem(&key(p, "name"), "is required");
        } else if !is_valid_name(&entry.name, MAX_METRIC_LEN) {
            self.problem(
                &key(p, "name"),
                format!("{:?} must be 1 to 64 of [A-Za-z0-9_.:/-]", entry.name),
            );
        }
        // The kind's own keys, with the common ones known too.
        let specific = Read {
            other_keys: OtherKeys::SharedWith(config_check::fields_of::<SensorEntry>()),
            ..Read::default()
        };
        let (kind, default_interval) = match entry.kind.as_str() {
            "system" => (
                SensorKind::System(self.findings.read_with(item, p, specific)?),
                Duration::from_secs(30),
            ),
            "exec" => {
                let exec: ExecSensor = self.findings.read_with(item, p, specific)?;
                self.program(&key(p, "program"), &exec.program);
                self.env(p, &exec.env);
                let metric = self.metric(p, exec.metric.clone(), &entry.name);
                (
                    SensorKind::Exec(ExecSensor { metric, ..exec }),
                    Duration::from_secs(60),
                )
            }
            "file" => {
                let file: FileSensor = self.findings.read_with(item, p, specific)?;
                if file.path.as_os_str().is_empty() {
                    self.problem(&key(p, "path"), "is required");
                } else if !file.path.is_absolute() {
                    self.problem(&key(p, "path"), "must be an absolute path");
                } else if let Err(e) = std::fs::metadata(&file.path) {
                    self.warn(
                        &key(p, "path"),
                        format!("{}: {e} (it may appear later)", file.path.display()),
                    );
                }
                for (name, x) in [("scale", file.scale), ("offset", file.offset)] {
                    if !x.is_finite() {
                        self.problem(&key(p, name), format!("expected a finite number, got {x}"));
                    }
                }
                let metric = self.metric(p, file.metric.clone(), &entry.name);
                (
                    SensorKind::File(FileSensor { metric, ..file }),
                    Duration::from_secs(10),
                )
            }
            other => {
                self.problem(
                    &key(p, "kind"),
                    format!("expected \"system\", \"exec\" or \"file\", got {other:?}"),
                );
                return None;
            }
        };
        let interval = entry.interval.unwrap_or(default_interval);
        if let SensorKind::Exec(exec) = &kind {
            if exec.timeout > interval {
                self.warn(
                    &key(p, "timeout"),
                    "is longer than the interval; samples will be skipped while it runs",
                );
            }
        }
        Some(SensorConfig {
            name: entry.name,
            interval,
            kind,
        })
    }

    fn actions(&mut self, items: &[Value]) -> Vec<Action> {
        let mut names = BTreeSet::new();
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let p = entry_label("actions", i, item);
            if let Some(name) = item.get("name").and_then(Value::as_str) {
                if !names.insert(name) {
                    self.problem(&p, format!("action name {name:?} is used twice"));
                }
            }
            if let Some(action) = self.findings.read::<Action>(item, &p) {
                self.action(&action, &p);
                out.push(action);
            }
        }
        out
    }

    fn action(&mut self, a: &Action, p: &str) {
        let name_key = key(p, "name");
        if a.name.is_empty() {
            self.problem(&name_key, "is required");
        } else if !is_valid_name(&a.name, MAX_COMMAND_NAME_LEN) {
            self.problem(
                &name_key,
                format!("{:?} must be 1 to 32 of [A-Za-z0-9_.:/-]", a.name),
            );
        }
        if BUILTINS.contains(&a.name.as_str()) {
            self.problem(&name_key, format!("{:?} is a built-in command", a.name));
        }
        self.program(&key(p, "program"), &a.program);
        let params_key = key(p, "params");
        let used: BTreeSet<&str> = a.args.iter().flat_map(Template::params).collect();
        for u in &used {
            if !a.params.contains_key(*u) {
                self.problem(
                    &key(p, "args"),
                    format!("uses {{{u}}} but [{params_key}.{u}] is not declared"),
                );
            }
        }
        for (name, rule) in &a.params {
            let rp = key(&params_key, name);
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                self.problem(&rp, "parameter names use [A-Za-z0-9_-]");
                continue;
            }
            if !used.contains(name.as_str()) {
                self.problem(&rp, "is declared but no args entry uses it");
            }
            if !rule.has_rule() {
                self.problem(
                    &rp,
                    "needs a rule: allow = [...], charset = \"...\", min/max, or any = true",
                );
            }
            if let (Some(lo), Some(hi)) = (rule.min, rule.max) {
                if lo > hi {
                    self.problem(&key(&rp, "min"), "is above max");
                }
            }
            if let Some(d) = &rule.default {
                if let Err(why) = rule.check(d) {
                    self.problem(&key(&rp, "default"), format!("{d:?} {why}"));
                }
            }
        }
        if let Some(d) = &a.working_dir {
            if !d.is_absolute() {
                self.problem(&key(p, "working_dir"), "must be an absolute path");
            }
        }
        self.env(p, &a.env);
    }
}

/// How problems name an entry of a list of tables: `sensors[1] (cpu_temp)`.
fn entry_label(list: &str, i: usize, item: &Value) -> String {
    let name = item.get("name").and_then(Value::as_str).unwrap_or("?");
    format!("{list}[{i}] ({name})")
}

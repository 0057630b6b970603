//! Starting and stopping the real binaries.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::wait_for;

/// A fresh directory under the system temp dir (`e2e-LABEL-...`), removed on drop unless
/// `E2E_KEEP` is set: then it stays, with the logs and data of the test, for debugging.
#[derive(Debug)]
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    /// Creates a fresh directory.
    pub fn new(label: &str) -> TempDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("e2e-{label}-"))
            .disable_cleanup(std::env::var_os("E2E_KEEP").is_some())
            .tempdir()
            .expect("create temp dir");
        TempDir(dir)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// The directory holding the workspace's built binaries (target/debug).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/<test> -> target/debug
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// The path of a workspace binary, built first if it is missing or stale.
pub fn binary(name: &str) -> PathBuf {
    ensure_built();
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing after `cargo build --workspace --bins`",
        path.display()
    );
    path
}

/// Builds the workspace's binaries once per test process, in the profile and target
/// directory of the running test, so an edit since the last build is what gets tested
/// (cargo does nothing when they are up to date). `E2E_NO_BUILD=1` skips it for callers
/// that built the binaries themselves.
fn ensure_built() {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    BUILT.get_or_init(|| {
        if std::env::var_os("E2E_NO_BUILD").is_some() {
            return;
        }
        let bins = bin_dir();
        let target = bins.parent().expect("target dir");
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        without_test_env(&mut build);
        build
            .args([
                "build",
                "--workspace",
                "--bins",
                "--quiet",
                "--manifest-path",
            ])
            .arg(&manifest)
            .arg("--target-dir")
            .arg(target);
        if bins.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build.status().expect("run cargo build");
        assert!(status.success(), "cargo build --workspace --bins failed");
    });
}

/// Removes the variables cargo set for the running test (`CARGO_PKG_*`,
/// `CARGO_MANIFEST_DIR`, `OUT_DIR`, ...) from `cmd`'s environment. A cargo build that saw
/// them would change the fingerprints of crates that read them, and the binaries would be
/// rebuilt back and forth between the harness's build and the next one.
pub fn without_test_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        if (key.starts_with("CARGO_") && key != "CARGO_HOME" && key != "CARGO_TARGET_DIR")
            || key == "OUT_DIR"
        {
            cmd.env_remove(key.as_ref());
        }
    }
}

/// A child process killed (SIGKILL) and reaped when this is dropped, so a failing test
/// leaves no process behind.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// How to start a hub.
#[derive(Debug, Clone)]
pub struct HubOptions {
    /// Ping interval.
    pub ping_interval: &'static str,
    /// Pong timeout.
    pub pong_timeout: &'static str,
    /// Extra environment.
    pub env: Vec<(String, String)>,
}

impl Default for HubOptions {
    fn default() -> Self {
        HubOptions {
            ping_interval: "30s",
            pong_timeout: "15s",
            env: Vec::new(),
        }
    }
}

/// A running `hub serve` process with its own data directory.
#[derive(Debug)]
pub struct Hub {
    /// The data directory.
    pub dir: TempDir,
    /// The options it was started with.
    pub options: HubOptions,
    child: Option<Child>,
    /// Device URL (wss://127.0.0.1:PORT/v1/device, or ws:// with plain ws).
    pub device_url: String,
    /// The device port to bind (0 on the first start: any free port).
    device_port: u16,
}

impl Hub {
    /// Starts a hub on ephemeral loopback ports and waits until it accepts devices.
    pub fn start(options: HubOptions) -> Hub {
        let dir = TempDir::new("hub");
        let mut hub = Hub {
            dir,
            options,
            child: None,
            device_url: String::new(),
            device_port: 0,
        };
        hub.spawn();
        hub
    }

    /// The data directory path.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn spawn(&mut self) {
        let data = self.data_dir();
        let _ = std::fs::remove_file(data.join("device-url"));
        let _ = std::fs::remove_file(data.join("admin-url"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("hub.log"))
            .expect("log file");
        let mut cmd = Command::new(binary("hub"));
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&data)
            .args([
                "--listen",
                &format!("127.0.0.1:{}", self.device_port),
                "--api-listen",
                "127.0.0.1:0",
            ])
            .env("HUB_DEVICE__PING_INTERVAL", self.options.ping_interval)
            .env("HUB_DEVICE__PONG_TIMEOUT", self.options.pong_timeout)
            .env("HUB_LOG__LEVEL", "info,hub=debug")
            .env_remove("HUB_API")
            .env_remove("HUB_ADMIN_TOKEN")
            .current_dir(self.dir.path())
            .stdout(Stdio::null())
            .stderr(log.try_clone().expect("log"));
        for (k, v) in &self.options.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn hub");
        self.child = Some(child);
        let url_file = data.join("device-url");
        self.device_url = wait_for(Duration::from_secs(20), "the hub to start", || {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!("hub exited during start-up with {status}:\n{}", self.log());
                }
            }
            std::fs::read_to_string(&url_file).ok()
        });
    }

    /// The hub's log so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join("hub.log")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// The admin API base URL.
    pub fn admin_url(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("admin-url"))
            .expect("admin-url")
            .trim()
            .to_string()
    }

    /// The admin token.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("admin-token"))
            .expect("admin-token")
            .trim()
            .to_string()
    }

    /// A sample of `/metrics` by its name with labels as Prometheus prints it
    /// (`hub_tls_handshakes_total{kind="resumed"}`); `None` when the hub has not shown it.
    pub fn metric(&self, sample: &str) -> Option<f64> {
        let (_, body) = self.api("GET", "/metrics", Some(&self.admin_token()), None);
        body.as_str()?.lines().find_map(|l| {
            l.strip_prefix(sample)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }

    /// Calls the admin API; returns (status, body as JSON or a string).
    pub fn api(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> (u16, serde_json::Value) {
        api_call(&self.admin_url(), method, path, token, body)
    }

    /// The hub CLI with `args`, this hub's data dir and its configuration environment
    /// (and none of the caller's HUB_API / HUB_ADMIN_TOKEN).
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(binary("hub"));
        cmd.args(args)
            .arg("--data-dir")
            .arg(self.data_dir())
            .envs(
                self.options
                    .env
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .env_remove("HUB_API")
            .env_remove("HUB_ADMIN_TOKEN")
            .current_dir(self.dir.path());
        cmd
    }

    /// Spawns the hub CLI with this hub's data dir, stdout and stderr piped.
    pub fn cli_child(&self, args: &[&str]) -> Child {
        self.cli_command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn hub cli")
    }

    /// The generated CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.data_dir().join("tls/ca.pem")
    }

    /// Runs the hub binary with `args` (and this hub's data dir); returns (status, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.cli_command(args).output().expect("run hub cli");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Issues a device token through `hub token issue`.
    pub fn token(&self, device: &str) -> String {
        let (code, out, err) = self.cli(&["token", "issue", device]);
        assert_eq!(code, 0, "token issue failed: {err}");
        out.trim().to_string()
    }

    /// The device listener's host:port.
    pub fn device_addr(&self) -> String {
        self.device_url
            .split("://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .unwrap_or_default()
            .to_string()
    }

    /// Kills the hub with SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends a signal and waits for the exit status (with a deadline).
    pub fn signal_and_wait(&mut self, signal: &str, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("hub running");
        signal_pid(child.id(), signal);
        wait_for(timeout, "the hub to exit", || {
            child.try_wait().ok().flatten()
        })
    }

    /// Kills the hub (SIGKILL) and starts it again on the same data directory and the same
    /// device port, so devices reconnect to the URL they know.
    pub fn restart(&mut self) {
        self.kill9();
        self.device_port = self
            .device_addr()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        self.spawn();
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).expect("hub running")
    }

    /// A read-only connection to the hub's database.
    pub fn db(&self) -> rusqlite::Connection {
        self.read_only("hub.db")
    }

    /// A read-only connection to the hub's telemetry database (series, `readings`,
    /// `last_seqs`).
    pub fn telemetry_db(&self) -> rusqlite::Connection {
        self.read_only("telemetry.db")
    }

    fn read_only(&self, file: &str) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open_with_flags(
            self.data_dir().join(file),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .unwrap_or_else(|e| panic!("open {file}: {e}"));
        conn.busy_timeout(Duration::from_secs(5))
            .expect("busy timeout");
        conn
    }

    /// Readings stored for a device.
    pub fn stored_readings(&self, device: &str) -> i64 {
        self.telemetry_db()
            .query_row(
                "SELECT count(*) FROM readings JOIN series ON series.id = readings.series WHERE series.device = ?1",
                [device],
                |r| r.get(0),
            )
            .expect("count readings")
    }

    /// Readings stored for every device, from the counts of the chunks, folded and still
    /// in the reading log (the `readings` view would unpack every chunk to count them).
    pub fn all_stored_readings(&self) -> i64 {
        self.telemetry_db()
            .query_row(
                "SELECT (SELECT coalesce(sum(n), 0) FROM reading_chunks)
                      + (SELECT coalesce(sum(n), 0) FROM reading_log)",
                [],
                |r| r.get(0),
            )
            .expect("count readings")
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Sends a signal (by name: `STOP`, `CONT`, `TERM`, `INT`, `KILL`) to a process.
pub fn signal_pid(pid: u32, signal: &str) {
    use rustix::process::Signal;
    let sig = match signal {
        "STOP" => Signal::STOP,
        "CONT" => Signal::CONT,
        "TERM" => Signal::TERM,
        "INT" => Signal::INT,
        "KILL" => Signal::KILL,
        other => panic!("unsupported signal {other}"),
    };
    let target = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .expect("a real pid");
    rustix::process::kill_process(target, sig)
        .unwrap_or_else(|e| panic!("kill -{signal} {pid} failed: {e}"));
}

/// Calls the admin API at `admin_url` (see [`Hub::api`]); for a call made from another
/// thread than the one holding the `Hub`.
pub fn api_call(
    admin_url: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, serde_json::Value) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("{admin_url}{path}");
    let auth = token.map(|t| format!("Bearer {t}"));
    let resp = match method {
        "GET" | "DELETE" => {
            let mut req = if method == "GET" {
                agent.get(&url)
            } else {
                agent.delete(&url)
            };
            if let Some(a) = &auth {
                req = req.header("Authorization", a);
            }
            req.call()
        }
        _ => {
            let mut req = if method == "PATCH" {
                agent.patch(&url)
            } else {
                agent.post(&url)
            }
            .header("Content-Type", "application/json");
            if let Some(a) = &auth {
                req = req.header("Authorization", a);
            }
            req.send(body.unwrap_or("{}"))
        }
    };
    let mut resp = resp.expect("api request");
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

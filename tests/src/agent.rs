//! A `device-agent` for the end-to-end tests: a running agent in its own directory, its
//! configuration against a test hub, and executable scripts for it to run.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::process::{binary, signal_pid};
use crate::{wait_for, Hub};

/// How long a stopping agent may take to drain and exit.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// A running `device-agent run` with its own directory (config, token, queue, log).
pub struct Agent {
    dir: PathBuf,
    config: PathBuf,
    child: Option<Child>,
}

impl Agent {
    /// Writes `config` as agent.toml in `dir` and starts the agent.
    pub fn start(dir: &Path, config: &str) -> Agent {
        let path = dir.join("agent.toml");
        std::fs::write(&path, config).expect("write agent.toml");
        let mut agent = Agent {
            dir: dir.to_path_buf(),
            config: path,
            child: None,
        };
        agent.spawn();
        agent
    }

    /// Starts the agent process (again, after [`Agent::kill9`]).
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .expect("agent log");
        let child = Command::new(binary("device-agent"))
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env_remove("RUST_LOG")
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn device-agent");
        self.child = Some(child);
    }

    /// What the agent logged so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.join("agent.log")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// `device-agent status --json` (read-only; works while the agent runs or after a crash).
    pub fn status(&self) -> serde_json::Value {
        let out = Command::new(binary("device-agent"))
            .args(["status", "--json", "--config"])
            .arg(&self.config)
            .current_dir(&self.dir)
            .output()
            .expect("device-agent status");
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status json")
    }

    /// Kills the agent with SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and the exit status.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("agent running");
        signal_pid(child.id(), "TERM");
        wait_for(STOP_TIMEOUT, "the agent to stop", || {
            child.try_wait().ok().flatten()
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Writes an executable shell script `name` into `dir`, for the agent to run as a program.
pub fn script(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("script");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    path
}

/// An agent configuration for `device` against `hub`, plus `extra` TOML (sensors,
/// actions). Reconnects are kept fast so the tests do not wait for a 60 s backoff.
pub fn config(hub: &Hub, dir: &Path, device: &str, encoding: &str, extra: &str) -> String {
    let token = dir.join("agent.token");
    std::fs::write(&token, hub.token(device)).expect("token file");
    format!(
        r#"data_dir = "{data}"

[hub]
url = "{url}"
device_id = "{device}"
token_file = "{token}"
ca_file = "{ca}"
encoding = "{encoding}"

[reconnect]
initial = "100ms"
max = "500ms"

[queue]
report_interval = "1h"

[log]
level = "info,device_agent=debug"

{extra}
"#,
        data = dir.join("data").display(),
        url = hub.device_url.trim(),
        token = token.display(),
        ca = hub.ca().display(),
    )
}

//! The operator CLI's side of the admin API: finding the hub, calling it, and turning its
//! answers and failures into output and exit statuses that scripts can trust.

#[macro_use]
pub mod format;
pub mod cluster;
pub mod fleet;
pub mod ops;

use std::io::BufRead;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// Exit statuses of the CLI (documented in `hub --help` and the README).
pub mod exit {
    /// Success (for `hub send`: the command succeeded).
    pub const OK: u8 = 0;
    /// `hub send`: the device reported failure; other commands: the hub answered with an
    /// error it cannot recover from by retrying (its store refused the request).
    pub const FAILED: u8 = 1;
    /// Bad invocation: a bad flag, duration, JSON, or an unknown device.
    pub const USAGE: u8 = 2;
    /// `hub send`: no result within the timeout.
    pub const TIMEOUT: u8 = 3;
    /// `hub send`: queued, the device is offline; it is delivered when it reconnects.
    pub const QUEUED_OFFLINE: u8 = 4;
    /// `hub send`: the command expired in the queue or was cancelled.
    pub const EXPIRED: u8 = 5;
    /// The hub could not be reached (is `hub serve` running?).
    pub const UNREACHABLE: u8 = 69;
    /// The hub answered, but its store is unavailable right now (a database or Redis
    /// outage); retry later.
    pub const STORE_UNAVAILABLE: u8 = 75;
    /// The admin token was refused.
    pub const UNAUTHORIZED: u8 = 77;
}

/// A CLI failure with the exit status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The hub did not answer.
    #[error("cannot reach the hub at {url}: {detail}\nis `hub serve` running there? (set --api/HUB_API or --data-dir)")]
    Unreachable {
        /// The base URL tried.
        url: String,
        /// What failed.
        detail: String,
    },
    /// The API answered with an error.
    #[error("{message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The API's message.
        message: String,
    },
    /// The invocation is wrong.
    #[error("{0}")]
    Usage(String),
    /// A command outcome that is not success (exit status and message).
    #[error("{1}")]
    Outcome(u8, String),
}

impl CliError {
    /// The exit status for this failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Unreachable { .. } => exit::UNREACHABLE,
            CliError::Api { status: 401, .. } => exit::UNAUTHORIZED,
            CliError::Api { status, .. } if (400..500).contains(status) => exit::USAGE,
            // The hub is up but cannot serve it now (its store is down).
            CliError::Api { status: 503, .. } => exit::STORE_UNAVAILABLE,
            CliError::Api { .. } => exit::FAILED,
            CliError::Usage(_) => exit::USAGE,
            CliError::Outcome(code, _) => *code,
        }
    }
}

/// A client of the admin API.
pub struct ApiClient {
    base: String,
    token: String,
    agent: ureq::Agent,
    streaming: ureq::Agent,
}

impl ApiClient {
    /// Finds the hub: `--api`/`HUB_API` and `--token`/`HUB_ADMIN_TOKEN` when given,
    /// otherwise the `admin-url` and `admin-token` files a running hub keeps in its data
    /// directory.
    ///
    /// # Errors
    /// Neither was given and the data directory holds no running hub's files.
    pub fn discover(
        api: Option<&str>,
        token: Option<&str>,
        data_dir: &Path,
    ) -> Result<ApiClient, CliError> {
        let base = match api {
            Some(url) => url.trim_end_matches('/').to_string(),
            None => std::fs::read_to_string(data_dir.join("admin-url")).map(|s| s.trim().to_string()).map_err(|_| {
                CliError::Usage(format!(
                    "no hub found in {}: start `hub serve` there, pass --data-dir DIR, or give --api URL",
                    data_dir.display()
                ))
            })?,
        };
        let token = match token {
            Some(t) => t.to_string(),
            None => std::fs::read_to_string(data_dir.join("admin-token")).map(|s| s.trim().to_string()).map_err(|_| {
                CliError::Usage(format!(
                    "no admin token: pass --token (or HUB_ADMIN_TOKEN), or --data-dir of the hub ({} has none)",
                    data_dir.display()
                ))
            })?,
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(330)))
            .timeout_connect(Some(Duration::from_secs(5)))
            .build()
            .into();
        let streaming: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(5)))
            .build()
            .into();
        Ok(ApiClient {
            base,
            token,
            agent,
            streaming,
        })
    }

    fn unreachable(&self, err: ureq::Error) -> CliError {
        CliError::Unreachable {
            url: self.base.clone(),
            detail: err.to_string(),
        }
    }

    fn finish(&self, mut resp: ureq::http::Response<ureq::Body>) -> Result<Value, CliError> {
        let status = resp.status().as_u16();
        let text = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| self.unreachable(e))?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status >= 400 {
            let message = value["error"]["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| value.to_string());
            return Err(CliError::Api { status, message });
        }
        Ok(value)
    }

    /// `GET path` (path includes the query string).
    ///
    /// # Errors
    /// Unreachable hub, or an API error.
    pub fn get(&self, path: &str) -> Result<Value, CliError> {
        let resp = self
            .agent
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .call()
            .map_err(|e| self.unreachable(e))?;
        self.finish(resp)
    }

    /// `POST path` with a JSON body.
    ///
    /// # Errors
    /// Unreachable hub, or an API error.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, CliError> {
        let resp = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .map_err(|e| self.unreachable(e))?;
        self.finish(resp)
    }

    /// `PATCH path` with a JSON body.
    ///
    /// # Errors
    /// Unreachable hub, or an API error.
    pub fn patch(&self, path: &str, body: &Value) -> Result<Value, CliError> {
        let resp = self
            .agent
            .patch(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Content-Type", "application/json")
            .send(body.to_string())
            .map_err(|e| self.unreachable(e))?;
        self.finish(resp)
    }

    /// `DELETE path`.
    ///
    /// # Errors
    /// Unreachable hub, or an API error.
    pub fn delete(&self, path: &str) -> Result<Value, CliError> {
        let resp = self
            .agent
            .delete(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .call()
            .map_err(|e| self.unreachable(e))?;
        self.finish(resp)
    }

    /// Opens a Server-Sent Events stream and calls `on_event(name, data)` for each event
    /// until the stream ends or `on_event` returns false.
    ///
    /// # Errors
    /// Unreachable hub, or an API error.
    pub fn stream(
        &self,
        path: &str,
        mut on_event: impl FnMut(&str, &str) -> bool,
    ) -> Result<(), CliError> {
        let resp = self
            .streaming
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Accept", "text/event-stream")
            .call()
            .map_err(|e| self.unreachable(e))?;
        if resp.status().as_u16() >= 400 {
            return self.finish(resp).map(|_| ());
        }
        let reader = std::io::BufReader::new(resp.into_body().into_reader());
        let (mut name, mut data) = (String::new(), String::new());
        for line in reader.lines() {
            let line = line.map_err(|e| CliError::Unreachable {
                url: self.base.clone(),
                detail: e.to_string(),
            })?;
            if line.is_empty() {
                if !data.is_empty() && !on_event(&name, &data) {
                    return Ok(());
                }
                name.clear();
                data.clear();
            } else if let Some(v) = line.strip_prefix("event:") {
                name = v.trim().to_string();
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            }
        }
        Ok(())
    }
}

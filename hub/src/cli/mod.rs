//! The operator CLI's side of the admin API: finding the hub, calling it, and turning its
//! answers and failures into output and exit statuses that scripts can trust.

#[macro_use]
pub mod format;
pub mod args;
pub mod certs;
pub mod cluster;
pub mod console;
pub mod firmware;
pub mod fleet;
pub mod jobs;
pub mod ops;
pub mod rollouts;

use std::io::BufRead;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// Exit statuses of the CLI (documented in `hub --help` and the README).
pub mod exit {
    /// Success (for `hub send`: the command succeeded).
    pub const OK: u8 = 0;
    /// `hub send`: the device reported failure; `hub commands cancel`: the command had
    /// already finished; other commands: the hub answered with an error it cannot recover
    /// from by retrying (its store refused the request).
    pub const FAILED: u8 = 1;
    /// Bad invocation: a bad flag, duration, JSON, or an unknown device.
    pub const USAGE: u8 = 2;
    /// `hub send`: no result within the timeout; `hub devices wait`: not online in time.
    pub const TIMEOUT: u8 = 3;
    /// `hub send`: queued, the device is offline; it is delivered when it reconnects.
    pub const QUEUED_OFFLINE: u8 = 4;
    /// `hub send`: the command expired in the queue or was cancelled.
    pub const EXPIRED: u8 = 5;
    /// The hub could not be reached, or no hub runs with the data directory.
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
    /// No hub runs with the data directory (and no `--api` was given).
    #[error("{0}")]
    NotRunning(String),
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
            CliError::Unreachable { .. } | CliError::NotRunning(_) => exit::UNREACHABLE,
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

/// `--api` as a base URL: http or https, a host, nothing after the path.
fn base_url(raw: &str) -> Result<String, CliError> {
    let trimmed = raw.trim().trim_end_matches('/');
    let usable = trimmed.parse::<ureq::http::Uri>().is_ok_and(|uri| {
        matches!(uri.scheme_str(), Some("http" | "https"))
            && uri.authority().is_some_and(|a| !a.host().is_empty())
            && uri.query().is_none()
    });
    if usable {
        Ok(trimmed.to_string())
    } else {
        Err(CliError::Usage(format!(
            "--api `{raw}` is not a base URL of the admin API: give one like http://127.0.0.1:8444"
        )))
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
    /// [`CliError::Usage`] for an `--api` that is not an http(s) URL or a missing token;
    /// [`CliError::NotRunning`] when no URL was given and no hub runs with `data_dir`.
    pub fn discover(
        api: Option<&str>,
        token: Option<&str>,
        data_dir: &Path,
    ) -> Result<ApiClient, CliError> {
        let base = match api {
            Some(url) => base_url(url)?,
            None => match std::fs::read_to_string(data_dir.join("admin-url")) {
                Ok(url) => url.trim().to_string(),
                Err(_) if !data_dir.exists() => {
                    return Err(CliError::NotRunning(format!(
                        "no hub here: the data directory {} does not exist (no hub has run with it). \
                         Start `hub serve` in this directory, pass the --data-dir of a running hub, or \
                         --api URL --token TOKEN for a remote one",
                        data_dir.display()
                    )))
                }
                Err(_) => {
                    return Err(CliError::NotRunning(format!(
                        "no hub is running with the data directory {0} (it has no admin-url): \
                         start `hub serve --data-dir {0}`, or pass --api URL --token TOKEN for a remote hub",
                        data_dir.display()
                    )))
                }
            },
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

    /// The admin API's base URL.
    pub fn base(&self) -> &str {
        &self.base
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

    /// `POST path` with raw bytes (a firmware image) as the body.
    ///
    /// # Errors
    /// Unreachable hub, or an API error.
    pub fn post_bytes(&self, path: &str, body: &[u8]) -> Result<Value, CliError> {
        let resp = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Content-Type", "application/octet-stream")
            .send(body)
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

    /// Opens the Server-Sent Events stream at `path`, resuming after `last_event_id`
    /// when given (sent as `Last-Event-ID`).
    ///
    /// # Errors
    /// Unreachable hub, or an API error.
    pub fn events(&self, path: &str, last_event_id: Option<&str>) -> Result<EventStream, CliError> {
        let mut request = self
            .streaming
            .get(format!("{}{path}", self.base))
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let resp = request.call().map_err(|e| self.unreachable(e))?;
        if resp.status().as_u16() >= 400 {
            return Err(self.finish(resp).err().unwrap_or_else(|| CliError::Api {
                status: 500,
                message: "the event stream was refused".into(),
            }));
        }
        Ok(EventStream {
            base: self.base.clone(),
            lines: std::io::BufReader::new(resp.into_body().into_reader()).lines(),
        })
    }
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// Its `event:` name (empty when none).
    pub name: String,
    /// Its data lines, joined with newlines (empty for an event that only moves the id).
    pub data: String,
    /// Its `id:`, when it had one.
    pub id: Option<String>,
}

/// An open event stream.
pub struct EventStream {
    base: String,
    lines: std::io::Lines<std::io::BufReader<ureq::BodyReader<'static>>>,
}

impl EventStream {
    /// The next event; `None` when the hub ended the stream.
    ///
    /// # Errors
    /// The connection broke ([`CliError::Unreachable`]).
    pub fn next_event(&mut self) -> Result<Option<SseEvent>, CliError> {
        let mut event = SseEvent {
            name: String::new(),
            data: String::new(),
            id: None,
        };
        let mut fields = 0usize;
        for line in self.lines.by_ref() {
            let line = line.map_err(|e| CliError::Unreachable {
                url: self.base.clone(),
                detail: e.to_string(),
            })?;
            if line.is_empty() {
                if fields > 0 {
                    return Ok(Some(event));
                }
                continue;
            }
            if line.starts_with(':') {
                // A comment (the hub's keep-alive).
                continue;
            }
            fields += 1;
            let (field, value) = line.split_once(':').unwrap_or((line.as_str(), ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => event.name = value.to_string(),
                "data" => {
                    if !event.data.is_empty() {
                        event.data.push('\n');
                    }
                    event.data.push_str(value);
                }
                "id" => event.id = Some(value.to_string()),
                _ => {}
            }
        }
        Ok(None)
    }
}

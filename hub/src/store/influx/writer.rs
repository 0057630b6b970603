//! The one path to InfluxDB writes: the `influxdb2` client on a runtime of its own, with
//! a timeout, cancellation at shutdown, one retry of a dropped connection, and the answer
//! classified as accepted, unavailable (spool and retry) or refused (say what to fix).

use std::time::{Duration, Instant};

use influxdb2::api::write::TimestampPrecision;
use influxdb2::RequestError;

use super::{check_url, InfluxError};
use crate::config::InfluxConfig;

/// How InfluxDB took a write.
pub(super) enum Accepted {
    /// Every point.
    All,
    /// Some points were rejected for good (422); InfluxDB's message says which.
    Partial(String),
}

/// The `influxdb2` client on a small current-thread runtime of its own. Behind a mutex
/// in [`super::spooling::Shared`]: holding it is what makes writes one at a time and in
/// order.
pub(super) struct Writer {
    rt: tokio::runtime::Runtime,
    client: influxdb2::Client,
    org: String,
    bucket: String,
    timeout: Duration,
}

impl Writer {
    pub(super) fn new(cfg: &InfluxConfig) -> Result<Writer, InfluxError> {
        check_url(&cfg.url)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| {
                InfluxError::Config(format!("cannot start the InfluxDB client runtime: {e}"))
            })?;
        let (url, org, token) = (cfg.url.clone(), cfg.org.clone(), cfg.token.clone());
        // `Client::new` panics if it cannot parse the URL or build its HTTP client; the URL
        // was checked above, this only keeps a surprise from taking the hub down.
        let client = std::panic::catch_unwind(move || influxdb2::Client::new(url, org, token))
            .map_err(|_| {
                InfluxError::Config(format!("the InfluxDB client rejected url `{}`", cfg.url))
            })?;
        Ok(Writer {
            rt,
            client,
            org: cfg.org.clone(),
            bucket: cfg.bucket.clone(),
            timeout: cfg.timeout,
        })
    }

    /// Writes line protocol (ms precision), waiting at most the configured timeout, or
    /// until `cancel` is notified.
    pub(super) fn write(
        &self,
        body: &[u8],
        cancel: Option<&tokio::sync::Notify>,
    ) -> Result<Accepted, InfluxError> {
        let started = Instant::now();
        let result = self.write_once(body, cancel).or_else(|e| match e {
            // A keep-alive connection that InfluxDB closed while idle fails the first
            // request sent on it; one immediate retry on a fresh connection covers that.
            // Re-sending is safe: writes are idempotent.
            WriteFailure::Transport(_) => self.write_once(body, cancel),
            other => Err(other),
        });
        metrics::histogram!("hub_influx_write_seconds").record(started.elapsed().as_secs_f64());
        let outcome = match result {
            Ok(()) => Ok(Accepted::All),
            Err(WriteFailure::Cancelled) => Err(InfluxError::Cancelled),
            Err(WriteFailure::Timeout) => Err(InfluxError::Unavailable(format!(
                "no answer within {} (storage.influxdb.timeout)",
                humantime::format_duration(self.timeout)
            ))),
            Err(WriteFailure::Transport(why) | WriteFailure::Unreachable(why)) => {
                Err(InfluxError::Unavailable(why))
            }
            Err(WriteFailure::Status(status, text)) => self.classify(status, &text),
        };
        let label = match &outcome {
            Ok(Accepted::All) => "ok",
            Ok(Accepted::Partial(_)) => "partial",
            Err(InfluxError::Unavailable(_)) => "unavailable",
            Err(InfluxError::Cancelled) => "cancelled",
            Err(_) => "refused",
        };
        metrics::counter!("hub_influx_writes_total", "result" => label).increment(1);
        outcome
    }

    fn write_once(
        &self,
        body: &[u8],
        cancel: Option<&tokio::sync::Notify>,
    ) -> Result<(), WriteFailure> {
        let request = self.client.write_line_protocol_with_precision(
            &self.org,
            &self.bucket,
            body.to_vec(),
            TimestampPrecision::Milliseconds,
        );
        let result = self.rt.block_on(async {
            // Created inside the runtime: the timer needs its time driver.
            let timed = tokio::time::timeout(self.timeout, request);
            match cancel {
                Some(cancel) => tokio::select! {
                    r = timed => Some(r),
                    () = cancel.notified() => None,
                },
                None => Some(timed.await),
            }
        });
        match result {
            None => Err(WriteFailure::Cancelled),
            Some(Err(_elapsed)) => Err(WriteFailure::Timeout),
            Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(RequestError::Http { status, text }))) => {
                // The crate treats anything but 204 as an error; any 2xx is success.
                if status.is_success() {
                    Ok(())
                } else {
                    Err(WriteFailure::Status(status.as_u16(), text))
                }
            }
            Some(Ok(Err(RequestError::ReqwestProcessing { source }))) => {
                let why = error_chain(&source);
                if source.is_connect() || source.is_timeout() {
                    Err(WriteFailure::Unreachable(why))
                } else {
                    Err(WriteFailure::Transport(why))
                }
            }
            Some(Ok(Err(other))) => Err(WriteFailure::Unreachable(other.to_string())),
        }
    }

    fn classify(&self, status: u16, text: &str) -> Result<Accepted, InfluxError> {
        let message = influx_message(text);
        let hint = match status {
            200..=299 => return Ok(Accepted::All),
            422 => return Ok(Accepted::Partial(message)),
            429 | 500..=599 => {
                return Err(InfluxError::Unavailable(format!("HTTP {status}: {message}")))
            }
            400 => "InfluxDB could not parse the points: if the bucket has an explicit schema, it must accept the float field `value` with tags `device` and `metric`",
            401 => "Check storage.influxdb.token: it must be a valid API token",
            403 => "The token in storage.influxdb.token needs write permission on the bucket",
            404 => "Check storage.influxdb.org and storage.influxdb.bucket: they must name an existing organisation and bucket",
            413 => "The request is larger than InfluxDB accepts: lower ingest.max_group",
            300..=399 => "Check storage.influxdb.url: InfluxDB redirected the request (http vs https?)",
            _ => "Check the storage.influxdb.* settings",
        };
        Err(InfluxError::Refused {
            status,
            message,
            hint,
        })
    }
}

enum WriteFailure {
    Cancelled,
    Timeout,
    /// Could not connect, or the client's own timeout fired: InfluxDB is not there.
    Unreachable(String),
    /// The connection failed mid-request (worth one immediate retry).
    Transport(String),
    Status(u16, String),
}

/// An error and its sources, e.g. "error sending request: ... : Connection refused".
pub(super) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

/// InfluxDB answers errors as `{"code": "...", "message": "..."}`; returns the message
/// (or the trimmed body), at most 500 characters.
pub(super) fn influx_message(body: &str) -> String {
    let message = serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.get("message")
                .and_then(|m| m.as_str())
                .map(str::to_string)
        })
        .unwrap_or_else(|| body.trim().to_string());
    let mut message: String = message.chars().take(500).collect();
    if message.is_empty() {
        message.push_str("(no message)");
    }
    message
}

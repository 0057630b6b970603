//! `firmware-sim run IMAGE...`: boots each image as a device in one process and logs what
//! the devices do. The images are the devices' flash: every state change is written back.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::Args;
use firmware_sim::{AfterDisconnect, Event, Exit};
use schemas::codec::SUBPROTOCOL_POSTCARD;
use schemas::session::DisconnectCause;
use tokio::sync::watch;

use crate::device::DeviceSpec;
use crate::image::{Image, ImageFlash};
use crate::net::{tls_config, ConnectFailures, HostTimer, HubTarget, NetShared, RateLimiter};
use crate::sim::{EventSink, SensorSet};
use crate::{parse_duration, usage};

/// Arguments of `run`.
#[derive(Args)]
pub struct RunArgs {
    /// Images written by `firmware-sim flash`.
    #[arg(required = true, value_name = "IMAGE")]
    images: Vec<PathBuf>,
    /// Events as JSON lines on stdout (instead of text on stderr).
    #[arg(long)]
    json: bool,
    /// Stop after this long (default: until Ctrl-C or SIGTERM).
    #[arg(long, value_name = "DURATION")]
    duration: Option<String>,
    /// On stop, how long devices may take to deliver unacknowledged readings.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    drain_timeout: String,
    /// Most connection attempts per second for the whole process (e.g. 500/s; 0: no limit).
    #[arg(long, default_value = "100/s", value_name = "RATE")]
    connect_rate: String,
    /// Test switch: firmware VERSION fails to boot (it resets before it can confirm
    /// itself), so the device rolls back to its other slot and reports `rolled_back`.
    #[arg(long, value_name = "VERSION")]
    fail_boot_version: Option<String>,
}

/// Parses `500/s` or `500`.
pub fn parse_rate(text: &str) -> anyhow::Result<u32> {
    let number = text.trim().trim_end_matches("/s");
    match number.parse::<u32>() {
        Ok(n) => Ok(n),
        Err(_) => usage(format!(
            "invalid rate `{text}` (examples: 500/s, 50, 0 for no limit)"
        )),
    }
}

/// Prints events, as text (stderr) or JSON lines (stdout).
struct LogSink {
    json: bool,
    timer: HostTimer,
    out: Mutex<()>,
}

impl LogSink {
    fn emit(&self, device: &str, kind: &str, fields: serde_json::Value, text: String) {
        use firmware_sim::driver::Timer;
        let _guard = self.out.lock();
        if self.json {
            let mut line = serde_json::json!({
                "t_ms": self.timer.now_ms(),
                "device": device,
                "event": kind,
            });
            if let (Some(obj), serde_json::Value::Object(extra)) = (line.as_object_mut(), fields) {
                obj.extend(extra);
            }
            let mut stdout = std::io::stdout().lock();
            // A closed stdout (the reader went away) must not kill the devices.
            let _ = writeln!(stdout, "{line}");
            let _ = stdout.flush();
        } else {
            eprintln!("{device} {text}");
        }
    }
}

/// Why `device` was disconnected, with the HTTP status of a refused upgrade and what to
/// do about it.
fn cause_text(device: &str, cause: DisconnectCause, http_status: Option<u16>) -> String {
    match (cause, http_status) {
        (DisconnectCause::Refused, Some(401)) => format!(
            "refused by the hub (HTTP 401): token rejected; issue a new one with \
             `hub token issue {device}` and re-flash the image with it (with a client \
             certificate: `hub devices add {device} --cert DIR`, flash --cert/--key)"
        ),
        (DisconnectCause::Refused, Some(403)) => {
            "refused by the hub (HTTP 403): forbidden by the hub or a proxy in front of it".into()
        }
        (DisconnectCause::Refused, Some(400)) => format!(
            "refused by the hub (HTTP 400): it does not accept the upgrade request \
             (subprotocol {SUBPROTOCOL_POSTCARD}); is --hub the hub's device URL?"
        ),
        (DisconnectCause::Refused, Some(code)) => format!("refused by the hub (HTTP {code})"),
        (DisconnectCause::Refused, None) => {
            format!("refused: the hub did not agree to subprotocol {SUBPROTOCOL_POSTCARD}")
        }
        (DisconnectCause::Unavailable { .. }, _) => "hub busy (HTTP 503)".into(),
        (DisconnectCause::ConnectFailed, Some(code)) => format!(
            "could not connect: the hub answered HTTP {code} instead of switching to WebSocket"
        ),
        (DisconnectCause::ConnectFailed, None) => "could not connect".into(),
        (DisconnectCause::Closed(code), _) => format!("connection closed with code {code}"),
        (DisconnectCause::Io, _) => "connection lost".into(),
        (DisconnectCause::Local(reason), _) => format!("closed by the device ({reason:?})"),
    }
}

/// The text of a `disconnected` event: the cause, then the retry, or that the device
/// stopped (a shutdown) or resets (a reboot).
fn disconnect_text(
    device: &str,
    cause: DisconnectCause,
    http_status: Option<u16>,
    next: AfterDisconnect,
) -> String {
    let cause = cause_text(device, cause, http_status);
    match next {
        AfterDisconnect::RetryIn(ms) => format!("{cause}; retrying in {ms} ms"),
        AfterDisconnect::Exit(Exit::Stopped) => format!("{cause}; stopped"),
        AfterDisconnect::Exit(Exit::Reboot) => format!("{cause}; rebooting"),
    }
}

impl EventSink for LogSink {
    fn rebooted(&self, _index: usize, device: &str, next_seq: u64, pending: usize) {
        self.emit(
            device,
            "rebooted",
            serde_json::json!({"next_seq": next_seq, "pending": pending}),
            format!("rebooted from flash: next seq {next_seq}, {pending} batches unacknowledged"),
        );
    }

    fn event(&self, _index: usize, device: &str, event: &Event<'_>) {
        use serde_json::json;
        match *event {
            Event::Connecting => self.emit(device, "connecting", json!({}), "connecting".into()),
            Event::Connected => self.emit(device, "connected", json!({}), "connected".into()),
            Event::Welcome {
                hub_last_seq,
                pending,
                next_seq,
            } => self.emit(
                device,
                "welcome",
                json!({"hub_last_seq": hub_last_seq, "pending": pending, "next_seq": next_seq}),
                format!("welcomed: the hub has up to seq {hub_last_seq}; {pending} batches to send from seq {next_seq}"),
            ),
            Event::Recorded {
                seq,
                readings,
                evicted_readings,
            } => self.emit(
                device,
                "recorded",
                json!({"seq": seq, "readings": readings, "evicted_readings": evicted_readings}),
                if evicted_readings > 0 {
                    format!("recorded seq {seq} ({readings} readings); flash full, {evicted_readings} oldest readings lost")
                } else {
                    format!("recorded seq {seq} ({readings} readings)")
                },
            ),
            Event::SampleSkipped => self.emit(
                device,
                "sample_skipped",
                json!({}),
                "sample skipped: no clock yet".into(),
            ),
            Event::Sent { seq, readings } => self.emit(
                device,
                "sent",
                json!({"seq": seq, "readings": readings}),
                format!("sent seq {seq}"),
            ),
            Event::Acked {
                up_to_seq,
                batches,
                readings,
            } => self.emit(
                device,
                "acked",
                json!({"up_to_seq": up_to_seq, "batches": batches, "readings": readings}),
                format!("acked up to seq {up_to_seq}"),
            ),
            Event::Command {
                id,
                name,
                outcome,
                output,
            } => self.emit(
                device,
                "command",
                json!({"id": id, "name": name, "ok": outcome.ok, "code": outcome.code, "output": output}),
                format!(
                    "command {id} {name}: {} ({}) {output}",
                    if outcome.ok { "ok" } else { "failed" },
                    outcome.code
                ),
            ),
            Event::HubError { code, message } => self.emit(
                device,
                "hub_error",
                json!({"code": code, "message": message}),
                format!("hub error {code}: {message}"),
            ),
            Event::Disconnected {
                cause,
                http_status,
                was_ready,
                next,
            } => {
                let (retry_in_ms, exit) = match next {
                    AfterDisconnect::RetryIn(ms) => (Some(ms), None),
                    AfterDisconnect::Exit(Exit::Stopped) => (None, Some("stopped")),
                    AfterDisconnect::Exit(Exit::Reboot) => (None, Some("reboot")),
                };
                self.emit(
                    device,
                    "disconnected",
                    json!({
                        "cause": format!("{cause:?}"),
                        "http_status": http_status,
                        "was_ready": was_ready,
                        "retry_in_ms": retry_in_ms,
                        "exit": exit,
                    }),
                    disconnect_text(device, cause, http_status, next),
                )
            }
        }
    }
}

/// Runs `firmware-sim run`.
pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let drain = parse_duration("--drain-timeout", &args.drain_timeout)?;
    let duration = args
        .duration
        .as_deref()
        .map(|d| parse_duration("--duration", d))
        .transpose()?;
    let rate = parse_rate(&args.connect_rate)?;
    let mut images = Vec::new();
    let mut ids: HashMap<String, PathBuf> = HashMap::new();
    for path in &args.images {
        let image = Image::load(path)?;
        if let Some(other) = ids.insert(image.provisioning.device_id.clone(), path.clone()) {
            return usage(format!(
                "{} and {} are the same device ({}); the hub would let them supersede each other",
                other.display(),
                path.display(),
                image.provisioning.device_id
            ));
        }
        images.push((path.clone(), image));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let timer = HostTimer::new();
        let sink = Arc::new(LogSink {
            json: args.json,
            timer,
            out: Mutex::new(()),
        });
        let limiter = Arc::new(RateLimiter::new(rate));
        let failures = Arc::new(ConnectFailures::default());
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        let mut tls_by_ca = HashMap::new();
        for (index, (path, image)) in images.into_iter().enumerate() {
            let p = image.provisioning.clone();
            let tls = match &p.ca_pem {
                Some(pem) => {
                    let key = (pem.clone(), p.client_cert.clone());
                    if !tls_by_ca.contains_key(&key) {
                        let config = tls_config(pem, p.client_cert.as_ref()).map_err(|e| {
                            crate::UsageError(format!("{}: the CA or client certificate in the image is unusable: {e:#}", path.display()))
                        })?;
                        tls_by_ca.insert(key.clone(), config);
                    }
                    tls_by_ca.get(&key).cloned()
                }
                None => None,
            };
            let net = Arc::new(NetShared {
                target: HubTarget::Fixed(p.hub_url.clone()),
                tls,
                limiter: limiter.clone(),
                failures: failures.clone(),
                local_addrs: Vec::new(),
            });
            let sensors = SensorSet::parse(&p.sensors).map_err(crate::UsageError)?;
            let spec = DeviceSpec {
                index,
                id: Arc::from(p.device_id.as_str()),
                token: p.token.clone(),
                firmware: p.firmware.clone(),
                interval_ms: p.interval_ms,
                first_sample_ms: 0,
                sensors,
                flash: ImageFlash::new(&path, image),
                rx_len: 1024,
                tx_len: 1536,
            };
            let fw = crate::partition::path_for(&path);
            let updates = fw.exists().then(|| crate::device::UpdateSpec {
                partition: fw,
                fail_boot_version: args.fail_boot_version.clone(),
            });
            tasks.spawn(crate::device::run_device_with_updates(
                spec,
                updates,
                net,
                timer,
                stop_rx.clone(),
                drain.as_millis().min(u128::from(u32::MAX)) as u32,
                sink.clone(),
            ));
        }
        crate::fleet::wait_for_stop(duration).await;
        let _ = stop_tx.send(true);
        let mut failed = false;
        let mut never_connected = 0;
        // Devices bound their drain themselves; the extra margin covers a final close.
        let deadline = tokio::time::Instant::now() + drain + std::time::Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, tasks.join_next()).await {
                Ok(Some(Ok(report))) => {
                    let line = serde_json::json!({
                        "device": &*report.id,
                        "readings_recorded": report.stats.readings_recorded,
                        "readings_acked": report.stats.readings_acked,
                        "last_acked_seq": report.last_acked_seq,
                        "unacked_batches": report.unacked_batches,
                        "reboots": report.reboots,
                        "error": report.error,
                    });
                    sink.emit(
                        &report.id,
                        "stopped",
                        line,
                        format!(
                            "stopped: {} readings recorded, {} acknowledged (up to seq {}), {} batches unacknowledged{}",
                            report.stats.readings_recorded,
                            report.stats.readings_acked,
                            report.last_acked_seq,
                            report.unacked_batches,
                            report.error.as_deref().map(|e| format!("; error: {e}")).unwrap_or_default()
                        ),
                    );
                    failed |= report.error.is_some();
                    never_connected += usize::from(report.stats.sessions == 0);
                }
                Ok(Some(Err(e))) => {
                    eprintln!("error: a device task failed: {e}");
                    failed = true;
                }
                Ok(None) => break,
                Err(_) => {
                    eprintln!("error: devices did not stop within the drain timeout; stopping them");
                    tasks.abort_all();
                    failed = true;
                    break;
                }
            }
        }
        if let Some(tls) = failures.first_tls().filter(|_| never_connected > 0) {
            // Retrying does not fix a certificate.
            eprintln!("error: {never_connected} devices never connected; {tls}");
            failed = true;
        }
        Ok::<_, anyhow::Error>(if failed {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use schemas::session::CloseReason;

    #[test]
    fn disconnect_texts_name_the_http_status_and_do_not_promise_a_retry_at_shutdown() {
        let retry = AfterDisconnect::RetryIn(60_123);
        assert_eq!(
            disconnect_text("sim-1", DisconnectCause::Refused, Some(401), retry),
            "refused by the hub (HTTP 401): token rejected; issue a new one with \
             `hub token issue sim-1` and re-flash the image with it (with a client \
             certificate: `hub devices add sim-1 --cert DIR`, flash --cert/--key); retrying in 60123 ms"
        );
        for status in [400, 403] {
            let text = disconnect_text("sim-1", DisconnectCause::Refused, Some(status), retry);
            assert!(
                text.starts_with(&format!("refused by the hub (HTTP {status}): ")),
                "{text}"
            );
        }
        let busy = DisconnectCause::Unavailable {
            retry_after_ms: 5_000,
        };
        assert_eq!(
            disconnect_text("sim-1", busy, Some(503), AfterDisconnect::RetryIn(5_200)),
            "hub busy (HTTP 503); retrying in 5200 ms"
        );
        assert_eq!(
            disconnect_text("sim-1", DisconnectCause::ConnectFailed, Some(404), retry),
            "could not connect: the hub answered HTTP 404 instead of switching to WebSocket; \
             retrying in 60123 ms"
        );
        // Ctrl-C: the device closed with 1000 and stops.
        let stopped = AfterDisconnect::Exit(Exit::Stopped);
        let text = disconnect_text("sim-1", DisconnectCause::Closed(1000), None, stopped);
        assert_eq!(text, "connection closed with code 1000; stopped");
        let text = disconnect_text(
            "sim-1",
            DisconnectCause::Local(CloseReason::HubSilent),
            None,
            AfterDisconnect::Exit(Exit::Reboot),
        );
        assert!(text.ends_with("; rebooting"), "{text}");
        assert!(!text.contains("retrying"), "{text}");
    }
}

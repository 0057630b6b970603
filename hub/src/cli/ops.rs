//! The CLI's client operations: devices, send, commands, query, watch.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::format::{ago, number, number_rounded, one_line, rtt, table, time};
use super::{exit, ApiClient, CliError};

/// A presence cause in words (`token_revoked` is "token revoked"; close codes stay).
fn cause(v: &Value) -> String {
    str_of(v).replace('_', " ")
}

fn str_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// Percent-encodes a query or path value.
pub(crate) fn encode(s: &str) -> String {
    // Query values here are device ids, metric names, durations and times: percent-encode
    // anything outside the unreserved set.
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// `hub devices [--tag K=V]... [--online|--offline|--never-connected] [--json]`
///
/// # Errors
/// API failures.
pub fn devices(api: &ApiClient, select: &str, json_out: bool) -> Result<u8, CliError> {
    let v = if select.is_empty() {
        api.get("/api/v1/devices")?
    } else {
        api.get(&format!("/api/v1/devices?select={}", encode(select)))?
    };
    if json_out {
        emit!(
            "{}",
            serde_json::to_string_pretty(&v["devices"]).unwrap_or_default()
        );
        return Ok(exit::OK);
    }
    let list = v["devices"].as_array().cloned().unwrap_or_default();
    // In a cluster, say which node holds each device.
    let clustered = list.iter().any(|d| d["node"].is_string());
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|d| {
            let online = d["online"].as_bool() == Some(true);
            let never = d["first_seen"].as_u64() == Some(0);
            let mut row = vec![
                str_of(&d["id"]),
                if online {
                    "online".into()
                } else if never {
                    "never connected".into()
                } else {
                    "offline".into()
                },
                str_of(&d["firmware"]),
                d["last_seen"]
                    .as_u64()
                    .map(ago)
                    .unwrap_or_else(|| "-".into()),
                rtt(d["rtt_us"].as_u64()),
            ];
            if clustered {
                row.push(str_of(&d["node"]));
            }
            row.push(if online {
                str_of(&d["remote_addr"])
            } else {
                cause(&d["last_cause"])
            });
            let tags = super::fleet::tag_list(&d["tags"]);
            row.push(if tags.is_empty() {
                "-".into()
            } else {
                tags.join(",")
            });
            row
        })
        .collect();
    let mut header = vec!["DEVICE", "STATE", "FIRMWARE", "LAST SEEN", "RTT"];
    if clustered {
        header.push("NODE");
    }
    header.push("ADDRESS / LAST CAUSE");
    header.push("TAGS");
    table(&header, &rows);
    Ok(exit::OK)
}

/// `hub devices show ID [--json]`
///
/// # Errors
/// API failures (404 for an unknown device).
pub fn device_show(api: &ApiClient, id: &str, json_out: bool) -> Result<u8, CliError> {
    let d = api.get(&format!("/api/v1/devices/{}", encode(id)))?;
    if json_out {
        emit!("{}", serde_json::to_string_pretty(&d).unwrap_or_default());
        return Ok(exit::OK);
    }
    let online = d["online"].as_bool() == Some(true);
    emit!("device:        {}", str_of(&d["id"]));
    emit!(
        "state:         {}",
        if online { "online" } else { "offline" }
    );
    emit!("firmware:      {}", str_of(&d["firmware"]));
    let caps: Vec<String> = d["capabilities"]
        .as_array()
        .map(|a| a.iter().map(str_of).collect())
        .unwrap_or_default();
    emit!(
        "capabilities:  {}",
        if caps.is_empty() {
            "-".to_string()
        } else {
            caps.join(", ")
        }
    );
    emit!(
        "last seen:     {}",
        d["last_seen"]
            .as_u64()
            .map(|t| format!("{} ({})", time(t), ago(t)))
            .unwrap_or_default()
    );
    emit!("ping rtt:      {}", rtt(d["rtt_us"].as_u64()));
    emit!("address:       {}", str_of(&d["remote_addr"]));
    emit!(
        "connected at:  {}",
        d["connected_at"]
            .as_u64()
            .map(time)
            .unwrap_or_else(|| "-".into())
    );
    if !online {
        emit!(
            "disconnected:  {}",
            d["disconnected_at"]
                .as_u64()
                .map(time)
                .unwrap_or_else(|| "-".into())
        );
        emit!("last cause:    {}", cause(&d["last_cause"]));
    }
    emit!(
        "first seen:    {}",
        d["first_seen"].as_u64().map(time).unwrap_or_default()
    );
    emit!("state props:   {}", d["state"]);
    Ok(exit::OK)
}

/// How often `hub devices wait` asks.
const WAIT_POLL: Duration = Duration::from_millis(200);

/// `hub devices wait ID [--timeout DUR] [--json]`: returns once the device is online.
///
/// # Errors
/// API failures; [`CliError::Outcome`] with [`exit::TIMEOUT`] when it is not online in time.
pub fn device_wait(
    api: &ApiClient,
    id: &str,
    timeout: Duration,
    json_out: bool,
) -> Result<u8, CliError> {
    let deadline = Instant::now() + timeout;
    loop {
        let known = match api.get(&format!("/api/v1/devices/{}", encode(id))) {
            Ok(d) if d["online"].as_bool() == Some(true) => {
                if json_out {
                    emit!("{}", serde_json::to_string_pretty(&d).unwrap_or_default());
                } else {
                    emit!(
                        "{id} is online (firmware {}, from {})",
                        str_of(&d["firmware"]),
                        str_of(&d["remote_addr"])
                    );
                }
                return Ok(exit::OK);
            }
            Ok(d) => Some(d),
            // Not connected yet, ever: that is what this waits for.
            Err(CliError::Api { status: 404, .. }) => None,
            Err(other) => return Err(other),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let waited = humantime::format_duration(timeout);
            let message = match known {
                None => format!(
                    "{id} did not connect within {waited}: it has never connected to this hub \
                     (check the device's token, the URL and CA it uses, and its log)"
                ),
                Some(d) => format!(
                    "{id} is still offline after {waited} (last seen {}, last cause: {})",
                    d["last_seen"]
                        .as_u64()
                        .map(ago)
                        .unwrap_or_else(|| "-".into()),
                    cause(&d["last_cause"])
                ),
            };
            return Err(CliError::Outcome(exit::TIMEOUT, message));
        }
        std::thread::sleep(left.min(WAIT_POLL));
    }
}

/// Options of `hub send`.
pub struct Send<'a> {
    /// Target device.
    pub device: &'a str,
    /// Command name.
    pub command: &'a str,
    /// Arguments (JSON).
    pub args: Value,
    /// Result timeout.
    pub timeout: Duration,
    /// Time to wait for an offline device.
    pub ttl: Duration,
    /// Return once queued.
    pub no_wait: bool,
    /// Print the command record as JSON.
    pub json: bool,
}

/// `hub send`: queues a command and (unless `--no-wait`) waits for its outcome.
///
/// # Errors
/// API failures; a non-successful outcome is an [`CliError::Outcome`] with its status.
pub fn send(api: &ApiClient, s: &Send<'_>) -> Result<u8, CliError> {
    let body = json!({
        "name": s.command,
        "args": s.args,
        "timeout": format!("{}ms", s.timeout.as_millis()),
        "ttl": format!("{}ms", s.ttl.as_millis()),
    });
    // The hub fails the command at its timeout; wait a little longer than that. Unless
    // told not to, the create call itself waits for the outcome (the hub answers at once
    // when the device is offline), so a quick command is one round trip.
    let patience = s.timeout + Duration::from_secs(5);
    let deadline = Instant::now() + patience;
    let path = format!("/api/v1/devices/{}/commands", encode(s.device));
    let path = if s.no_wait {
        path
    } else {
        let first_wait = patience.min(Duration::from_secs(60));
        format!("{path}?wait={}ms", first_wait.as_millis())
    };
    let created = api.post(&path, &body)?;
    let id = created["id"].as_u64().ok_or_else(|| CliError::Api {
        status: 500,
        message: "the hub returned no command id".into(),
    })?;
    let online = created["device_online"].as_bool() == Some(true);
    if !online {
        if s.json {
            emit!(
                "{}",
                serde_json::to_string_pretty(&created).unwrap_or_default()
            );
        } else if s.no_wait {
            // Scripts capture the id (`ID=$(hub send ... --no-wait)`) whatever the status.
            emit!("{id}");
        }
        return Err(CliError::Outcome(
            exit::QUEUED_OFFLINE,
            format!(
                "queued: {} is offline; command {id} is delivered when it reconnects (expires in {}). Follow it with `hub commands {}`",
                s.device,
                humantime::format_duration(s.ttl),
                s.device
            ),
        ));
    }
    if s.no_wait {
        if s.json {
            emit!(
                "{}",
                serde_json::to_string_pretty(&created).unwrap_or_default()
            );
        } else {
            emit!("{id}");
        }
        return Ok(exit::OK);
    }
    let mut record = created;
    while !is_final(&record) && Instant::now() < deadline {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(60));
        record = api.get(&format!(
            "/api/v1/commands/{id}?wait={}ms",
            left.as_millis().max(1)
        ))?;
    }
    if s.json {
        emit!(
            "{}",
            serde_json::to_string_pretty(&record).unwrap_or_default()
        );
    }
    let output = record["result"]["output"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let reason = record["reason"].as_str().unwrap_or("").to_string();
    match record["state"].as_str().unwrap_or("") {
        "succeeded" => {
            if !s.json {
                emit!("{output}");
            }
            Ok(exit::OK)
        }
        "failed" if reason.starts_with("timeout") => Err(CliError::Outcome(
            exit::TIMEOUT,
            format!("command {id}: {reason}"),
        )),
        "failed" => {
            if !s.json && !output.is_empty() {
                emit!("{output}");
            }
            let code = record["result"]["code"].as_i64().unwrap_or(0);
            Err(CliError::Outcome(
                exit::FAILED,
                format!("command {id} failed on the device (code {code})"),
            ))
        }
        "expired" | "cancelled" => Err(CliError::Outcome(
            exit::EXPIRED,
            format!(
                "command {id}: {}",
                if reason.is_empty() {
                    record["state"].to_string()
                } else {
                    reason
                }
            ),
        )),
        other => Err(CliError::Outcome(
            exit::TIMEOUT,
            format!(
                "command {id} is still {other} after waiting; check later with `hub commands {}`",
                s.device
            ),
        )),
    }
}

fn is_final(record: &Value) -> bool {
    matches!(
        record["state"].as_str(),
        Some("succeeded" | "failed" | "expired" | "cancelled")
    )
}

/// `hub commands DEVICE_ID [--limit N] [--json]`
///
/// # Errors
/// API failures.
pub fn commands(
    api: &ApiClient,
    device: &str,
    limit: usize,
    json_out: bool,
) -> Result<u8, CliError> {
    if limit == 0 {
        return Err(CliError::Usage("--limit must be at least 1".into()));
    }
    let v = api.get(&format!(
        "/api/v1/devices/{}/commands?limit={limit}",
        encode(device)
    ))?;
    if json_out {
        emit!(
            "{}",
            serde_json::to_string_pretty(&v["commands"]).unwrap_or_default()
        );
        return Ok(exit::OK);
    }
    let rows: Vec<Vec<String>> = v["commands"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    let outcome = one_line(
                        c["result"]["output"]
                            .as_str()
                            .or(c["reason"].as_str())
                            .unwrap_or(""),
                    );
                    vec![
                        str_of(&c["id"]),
                        str_of(&c["state"]),
                        str_of(&c["name"]),
                        c["args"].to_string(),
                        c["created_at"].as_u64().map(time).unwrap_or_default(),
                        outcome,
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(&["ID", "STATE", "NAME", "ARGS", "CREATED", "RESULT"], &rows);
    Ok(exit::OK)
}

/// `hub commands cancel ID`
///
/// # Errors
/// API failures (no such command: exit status 2); [`CliError::Outcome`] with
/// [`exit::FAILED`] when the command had already finished.
pub fn cancel(api: &ApiClient, id: u64) -> Result<u8, CliError> {
    match api.post(&format!("/api/v1/commands/{id}/cancel"), &json!({})) {
        Ok(record) => {
            emit!(
                "cancelled command {id} ({} for {})",
                str_of(&record["name"]),
                str_of(&record["device"])
            );
            Ok(exit::OK)
        }
        Err(CliError::Api {
            status: 409,
            message,
        }) => Err(CliError::Outcome(exit::FAILED, message)),
        Err(other) => Err(other),
    }
}

/// Output format of `hub query`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns.
    Table,
    /// Comma-separated values with a header.
    Csv,
    /// The API's JSON.
    Json,
}

/// `hub query`: the query string is built by the caller from the flags.
///
/// # Errors
/// API failures.
pub fn query(
    api: &ApiClient,
    device: &str,
    params: &[(&str, String)],
    format: Format,
) -> Result<u8, CliError> {
    let qs: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{k}={}", encode(v)))
        .collect();
    let v = api.get(&format!(
        "/api/v1/devices/{}/telemetry?{}",
        encode(device),
        qs.join("&")
    ))?;
    let aggregated = !v["every_ms"].is_null();
    let rows = v["rows"].as_array().cloned().unwrap_or_default();
    match format {
        Format::Json => emit!("{}", serde_json::to_string_pretty(&v).unwrap_or_default()),
        Format::Csv => {
            emit!(
                "{}",
                if aggregated {
                    "window_start,ts_ms,metric,value,count"
                } else {
                    "time,ts_ms,metric,value"
                }
            );
            for r in &rows {
                let ts = r["ts"].as_u64().unwrap_or(0);
                let value = number(r["value"].as_f64().unwrap_or(f64::NAN));
                let metric = str_of(&r["metric"]);
                if aggregated {
                    emit!("{},{ts},{metric},{value},{}", time(ts), r["count"]);
                } else {
                    emit!("{},{ts},{metric},{value}", time(ts));
                }
            }
        }
        Format::Table => {
            let body: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    let mut row = vec![
                        r["ts"].as_u64().map(time).unwrap_or_default(),
                        str_of(&r["metric"]),
                        number_rounded(r["value"].as_f64().unwrap_or(f64::NAN)),
                    ];
                    if aggregated {
                        row.push(str_of(&r["count"]));
                    }
                    row
                })
                .collect();
            if aggregated {
                table(&["WINDOW START", "METRIC", "VALUE", "COUNT"], &body);
            } else {
                table(&["TIME", "METRIC", "VALUE"], &body);
            }
        }
    }
    if v["truncated"].as_bool() == Some(true) {
        eprintln!("note: more rows match; raise --limit or narrow the range");
    }
    Ok(exit::OK)
}

/// Options of `hub watch`.
pub struct Watch<'a> {
    /// Only this device's events.
    pub device: Option<&'a str>,
    /// One JSON object per line.
    pub json: bool,
    /// Readings too.
    pub readings: bool,
    /// How long to keep trying to reconnect after losing the hub.
    pub reconnect: Duration,
}

/// The first and the longest pause between two reconnection attempts of `hub watch`.
const RECONNECT_PAUSE: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(5));

/// `hub watch`: prints events, one per line, until interrupted. When the hub goes away
/// it reconnects (finding the hub again through `connect`, since a restarted hub may
/// listen elsewhere) and resumes after the last event id it saw; after `reconnect`
/// without success it gives up with [`exit::UNREACHABLE`].
///
/// # Errors
/// API failures when it first connects (an unknown device: exit status 2); losing the hub
/// for longer than `reconnect`.
pub fn watch(
    connect: &dyn Fn() -> Result<ApiClient, CliError>,
    w: &Watch<'_>,
) -> Result<u8, CliError> {
    let mut path = String::from("/api/v1/events?");
    if let Some(d) = w.device {
        path.push_str(&format!("device={}&", encode(d)));
    }
    if w.readings {
        path.push_str("readings=true");
    }
    let mut last_id: Option<String> = None;
    // Since when, and why, the hub is lost (None while connected).
    let mut lost: Option<(Instant, String)> = None;
    let mut pause = RECONNECT_PAUSE.0;
    loop {
        let opened = connect().and_then(|api| {
            api.events(&path, last_id.as_deref())
                .map(|stream| (api.base().to_string(), stream))
        });
        let (base, mut stream) = match (opened, &lost) {
            (Ok(opened), _) => opened,
            (Err(err), None) => return Err(err),
            (
                Err(err @ (CliError::Unreachable { .. } | CliError::NotRunning(_))),
                Some((since, why)),
            ) => {
                if since.elapsed() >= w.reconnect {
                    return Err(CliError::Outcome(
                        exit::UNREACHABLE,
                        format!(
                            "hub watch: gave up after {} without the hub ({why}; last try: {err})",
                            humantime::format_duration(w.reconnect)
                        ),
                    ));
                }
                std::thread::sleep(pause.min(w.reconnect.saturating_sub(since.elapsed())));
                pause = (pause * 2).min(RECONNECT_PAUSE.1);
                continue;
            }
            // Refused for good (a changed admin token, say): retrying will not help.
            (Err(err), Some(_)) => return Err(err),
        };
        if lost.take().is_some() {
            eprintln!("hub watch: reconnected to {base}");
            pause = RECONNECT_PAUSE.0;
        }
        let why = loop {
            match stream.next_event() {
                Ok(Some(event)) => {
                    if let Some(id) = event.id {
                        last_id = Some(id);
                    }
                    if event.data.is_empty() {
                        continue;
                    }
                    let line = if w.json {
                        one_line(&event.data)
                    } else {
                        describe(&event.name, &event.data)
                    };
                    if !print_line(&line) {
                        // Nobody reads any more (`hub watch | head -3`).
                        return Ok(exit::OK);
                    }
                }
                Ok(None) => {
                    break "the hub ended the event stream (stopped or restarting?)".to_string()
                }
                Err(err) => break format!("lost the hub's event stream: {err}"),
            }
        };
        if w.reconnect.is_zero() {
            return Err(CliError::Outcome(
                exit::UNREACHABLE,
                format!("hub watch: {why}; not reconnecting (--reconnect 0s)"),
            ));
        }
        eprintln!(
            "hub watch: {why}; reconnecting for up to {}",
            humantime::format_duration(w.reconnect)
        );
        lost = Some((Instant::now(), why));
    }
}

/// Prints one line and flushes it; false when stdout is closed.
fn print_line(line: &str) -> bool {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}").and_then(|_| out.flush()).is_ok()
}

fn describe(name: &str, data: &str) -> String {
    let v: Value = serde_json::from_str(data).unwrap_or(Value::Null);
    match name {
        "presence" => format!(
            "{}  presence  {}  {} ({})",
            v["at_ms"].as_u64().map(time).unwrap_or_default(),
            str_of(&v["device"]),
            if v["online"].as_bool() == Some(true) {
                "online"
            } else {
                "offline"
            },
            cause(&v["cause"])
        ),
        "command" => {
            let c = &v["command"];
            let detail = one_line(
                c["result"]["output"]
                    .as_str()
                    .or(c["reason"].as_str())
                    .unwrap_or(""),
            );
            format!(
                "{}  command   {}  #{} {} -> {}{}",
                v["at_ms"].as_u64().map(time).unwrap_or_default(),
                str_of(&c["device"]),
                str_of(&c["id"]),
                str_of(&c["name"]),
                str_of(&c["state"]),
                if detail.is_empty() {
                    String::new()
                } else {
                    format!(": {detail}")
                }
            )
        }
        "readings" => {
            let n = v["readings"].as_array().map(|a| a.len()).unwrap_or(0);
            let first = v["readings"]
                .get(0)
                .map(|r| format!("{}={}", str_of(&r[0]), r[1 + 1]))
                .unwrap_or_default();
            format!(
                "{}  readings  {}  seq {} ({n} readings: {first}...)",
                time(now()),
                str_of(&v["device"]),
                str_of(&v["seq"])
            )
        }
        "state" => format!(
            "{}  state     {}  desired v{}, applied v{}, {} pending",
            v["at_ms"].as_u64().map(time).unwrap_or_default(),
            str_of(&v["device"]),
            str_of(&v["desired_version"]),
            str_of(&v["reported_version"]),
            str_of(&v["pending"])
        ),
        "job" => {
            let (j, c) = (&v["job"], &v["counts"]);
            let n = |k: &str| c[k].as_u64().unwrap_or(0);
            format!(
                "{}  job       #{} {} ({}) {}: {} succeeded, {} failed, {} open, {} pending",
                v["at_ms"].as_u64().map(time).unwrap_or_default(),
                str_of(&j["id"]),
                one_line(j["command"].as_str().unwrap_or("")),
                one_line(j["select"].as_str().unwrap_or("")),
                str_of(&j["state"]),
                n("succeeded"),
                n("failed"),
                n("queued") + n("sent") + n("acked"),
                n("pending")
            )
        }
        "lagged" => match v["missed"].as_u64() {
            Some(n) => format!("({n} events missed: {})", str_of(&v["why"])),
            None => format!("(events missed: {})", str_of(&v["why"])),
        },
        other => format!("{other}: {}", one_line(data)),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

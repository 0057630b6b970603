//! The CLI's client operations: devices, send, commands, query, watch.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::format::{ago, number, number_rounded, rtt, table, time};
use super::{exit, ApiClient, CliError};

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
                str_of(&d["last_cause"])
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
        emit!("last cause:    {}", str_of(&d["last_cause"]));
    }
    emit!(
        "first seen:    {}",
        d["first_seen"].as_u64().map(time).unwrap_or_default()
    );
    emit!("state props:   {}", d["state"]);
    Ok(exit::OK)
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
    let created = api.post(
        &format!("/api/v1/devices/{}/commands", encode(s.device)),
        &body,
    )?;
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
    // The hub fails the command at its timeout; wait a little longer than that.
    let deadline = Instant::now() + s.timeout + Duration::from_secs(5);
    let mut record = created;
    while Instant::now() < deadline {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(60));
        record = api.get(&format!(
            "/api/v1/commands/{id}?wait={}ms",
            left.as_millis().max(1)
        ))?;
        if is_final(&record) {
            break;
        }
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
                    let outcome = if let Some(out) = c["result"]["output"].as_str() {
                        out.replace('\n', " ")
                    } else {
                        c["reason"].as_str().unwrap_or("").to_string()
                    };
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

/// `hub watch [DEVICE_ID] [--json] [--readings]`: prints events until interrupted.
///
/// # Errors
/// API failures.
pub fn watch(
    api: &ApiClient,
    device: Option<&str>,
    json_out: bool,
    readings: bool,
) -> Result<u8, CliError> {
    let mut path = String::from("/api/v1/events?");
    if let Some(d) = device {
        path.push_str(&format!("device={}&", encode(d)));
    }
    if readings {
        path.push_str("readings=true");
    }
    use std::io::Write;
    api.stream(&path, |name, data| {
        let mut out = std::io::stdout().lock();
        let written = if json_out {
            writeln!(out, "{data}")
        } else {
            writeln!(out, "{}", describe(name, data))
        };
        written.and_then(|_| out.flush()).is_ok()
    })?;
    Ok(exit::OK)
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
            str_of(&v["cause"])
        ),
        "command" => {
            let c = &v["command"];
            let detail = c["result"]["output"]
                .as_str()
                .or(c["reason"].as_str())
                .unwrap_or("");
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
        "lagged" => format!("(fell behind: {} events missed)", str_of(&v["missed"])),
        other => format!("{other}: {data}"),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

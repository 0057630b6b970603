//! The CLI's jobs: `hub send --tag|--all|--devices|--select` creates one, follows it with
//! a progress line and prints a summary; `hub jobs` lists, shows and cancels them.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::format::{ago, one_line, table};
use super::{exit, ApiClient, CliError};

/// How often a followed job is read.
const POLL: Duration = Duration::from_millis(250);
/// How long following a job survives an unreachable hub (a restart, say).
const UNREACHABLE_GRACE: Duration = Duration::from_secs(60);
/// Devices with a failure listed under the summary.
const FAILURES_SHOWN: usize = 10;

/// A job as `hub send` asks for it.
pub struct NewJob<'a> {
    /// Command name.
    pub command: &'a str,
    /// Arguments.
    pub args: Value,
    /// `select` or `devices` for the request body.
    pub targets: (&'static str, Value),
    /// Result timeout of each command.
    pub timeout: Duration,
    /// Queue time of each command.
    pub ttl: Duration,
    /// `--rate`, as given.
    pub rate: Option<&'a str>,
    /// `--abort-on-failure`, as given.
    pub abort_on_failure: Option<&'a str>,
    /// Return once created.
    pub no_wait: bool,
    /// Print JSON.
    pub json: bool,
}

/// Reads a `--devices` file: one id per line, blank lines and `#` comments skipped.
///
/// # Errors
/// The file cannot be read, or lists nothing.
pub fn device_file(path: &Path) -> Result<Vec<String>, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Usage(format!("--devices {}: {e}", path.display())))?;
    let ids: Vec<String> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        // `hub devices add --out` writes `ID TOKEN` lines; take the id.
        .map(|l| l.split_whitespace().next().unwrap_or(l).to_string())
        .collect();
    if ids.is_empty() {
        return Err(CliError::Usage(format!(
            "--devices {} lists no device ids (one per line)",
            path.display()
        )));
    }
    Ok(ids)
}

/// `hub send --tag ... COMMAND`: creates the job and follows it unless `--no-wait`.
///
/// # Errors
/// API failures; outcomes other than success (see `hub send --help`).
pub fn send(
    connect: &dyn Fn() -> Result<ApiClient, CliError>,
    job: &NewJob<'_>,
) -> Result<u8, CliError> {
    let mut body = json!({
        "command": job.command,
        "args": job.args,
        "timeout": format!("{}ms", job.timeout.as_millis()),
        "ttl": format!("{}ms", job.ttl.as_millis()),
    });
    body[job.targets.0] = job.targets.1.clone();
    if let Some(rate) = job.rate {
        body["rate"] = json!(rate);
    }
    if let Some(pct) = job.abort_on_failure {
        body["abort_on_failure"] = json!(pct);
    }
    let created = connect()?.post("/api/v1/jobs", &body)?;
    let id = created["id"].as_u64().ok_or_else(|| CliError::Api {
        status: 500,
        message: "the hub returned no job id".into(),
    })?;
    if job.no_wait {
        if job.json {
            emit!(
                "{}",
                serde_json::to_string_pretty(&created).unwrap_or_default()
            );
        } else {
            emit!("{id}");
        }
        return Ok(exit::OK);
    }
    eprintln!(
        "job {id}: {} to {} devices ({}); it goes on in the hub if interrupted (hub jobs show {id})",
        job.command,
        created["targets"],
        one_line(created["select"].as_str().unwrap_or(""))
    );
    follow(connect, id, job.json)
}

/// Reads job `id` until it settles, drawing a progress line on a terminal; then prints
/// the summary (or JSON) and returns the exit status it implies.
///
/// # Errors
/// API failures; the hub unreachable for longer than a minute.
pub fn follow(
    connect: &dyn Fn() -> Result<ApiClient, CliError>,
    id: u64,
    as_json: bool,
) -> Result<u8, CliError> {
    let progress = std::io::stderr().is_terminal();
    let mut lost: Option<Instant> = None;
    let mut client: Option<ApiClient> = None;
    let view = loop {
        let read = match &client {
            Some(api) => api.get(&format!("/api/v1/jobs/{id}")),
            None => connect().and_then(|api| {
                let v = api.get(&format!("/api/v1/jobs/{id}"));
                client = Some(api);
                v
            }),
        };
        match read {
            Ok(view) => {
                lost = None;
                if progress {
                    eprint!("\r\x1b[2K{}", progress_line(&view));
                    let _ = std::io::stderr().flush();
                }
                if view["settled"] == true {
                    break view;
                }
            }
            Err(err @ (CliError::Unreachable { .. } | CliError::NotRunning(_))) => {
                // A restarted hub may listen elsewhere: find it again.
                client = None;
                let since = *lost.get_or_insert_with(Instant::now);
                if since.elapsed() >= UNREACHABLE_GRACE {
                    return Err(CliError::Outcome(
                        exit::UNREACHABLE,
                        format!("lost the hub for a minute ({err}); job {id} goes on there: hub jobs show {id}"),
                    ));
                }
                if progress {
                    eprint!("\r\x1b[2Kjob {id}: the hub is unreachable; retrying");
                }
            }
            Err(err) => return Err(err),
        }
        std::thread::sleep(POLL);
    };
    if progress {
        eprintln!();
    }
    if as_json {
        emit!(
            "{}",
            serde_json::to_string_pretty(&view).unwrap_or_default()
        );
    } else {
        summary(&view);
    }
    outcome(&view)
}

fn count(view: &Value, state: &str) -> u64 {
    view["counts"][state].as_u64().unwrap_or(0)
}

fn progress_line(view: &Value) -> String {
    let targets = view["targets"].as_u64().unwrap_or(0);
    let created = targets - count(view, "pending") - count(view, "skipped");
    format!(
        "job {}: {created}/{targets} sent · {} succeeded · {} failed · {} in flight · {} waiting for offline devices",
        view["id"],
        count(view, "succeeded"),
        count(view, "failed"),
        count(view, "sent") + count(view, "acked") + count(view, "queued")
            - view["waiting_offline"].as_u64().unwrap_or(0),
        view["waiting_offline"].as_u64().unwrap_or(0),
    )
}

fn summary(view: &Value) {
    emit!(
        "job {}: {} to {} devices ({}): {}{}",
        view["id"],
        one_line(view["command"].as_str().unwrap_or("")),
        view["targets"],
        one_line(view["select"].as_str().unwrap_or("")),
        view["state"].as_str().unwrap_or("?"),
        view["reason"]
            .as_str()
            .map(|r| format!(" ({})", one_line(r)))
            .unwrap_or_default()
    );
    let rows = [
        ("succeeded", count(view, "succeeded"), ""),
        ("failed", count(view, "failed"), ""),
        (
            "queued",
            count(view, "queued"),
            "devices offline: delivered when they connect, until the TTL",
        ),
        ("expired", count(view, "expired"), "offline past the TTL"),
        ("cancelled", count(view, "cancelled"), ""),
        (
            "skipped",
            count(view, "skipped"),
            "never sent: the job ended first, or the device was removed",
        ),
    ];
    for (name, n, note) in rows {
        if n == 0 && matches!(name, "skipped") {
            continue;
        }
        let note = if n > 0 && !note.is_empty() {
            format!("  ({note})")
        } else {
            String::new()
        };
        emit!("  {name:<10} {n:>6}{note}");
    }
    let failed: Vec<&Value> = view["devices"]
        .as_array()
        .map(|d| d.iter().filter(|r| r["state"] == "failed").collect())
        .unwrap_or_default();
    for row in failed.iter().take(FAILURES_SHOWN) {
        let why = row["result"]["output"]
            .as_str()
            .filter(|s| !s.is_empty())
            .or_else(|| row["reason"].as_str())
            .unwrap_or("");
        emit!(
            "  failed: {} {}",
            one_line(row["device"].as_str().unwrap_or("?")),
            one_line(why)
        );
    }
    if failed.len() > FAILURES_SHOWN {
        emit!(
            "  ... and {} more (hub jobs show {} --json)",
            failed.len() - FAILURES_SHOWN,
            view["id"]
        );
    }
}

/// The exit status a settled job implies.
fn outcome(view: &Value) -> Result<u8, CliError> {
    let id = &view["id"];
    if count(view, "failed") > 0 || view["state"] == "aborted" {
        return Err(CliError::Outcome(
            exit::FAILED,
            format!("job {id}: {} failed", count(view, "failed")),
        ));
    }
    if count(view, "expired") + count(view, "cancelled") + count(view, "skipped") > 0 {
        return Err(CliError::Outcome(
            exit::EXPIRED,
            format!("job {id}: some commands expired, were cancelled or never sent"),
        ));
    }
    if count(view, "queued") > 0 {
        return Err(CliError::Outcome(
            exit::QUEUED_OFFLINE,
            format!(
                "job {id}: {} devices are offline; their commands are delivered when they connect (follow with `hub jobs show {id} --wait`)",
                count(view, "queued")
            ),
        ));
    }
    Ok(exit::OK)
}

/// `hub jobs [--limit N] [--json]`
///
/// # Errors
/// API failures.
pub fn list(api: &ApiClient, limit: usize, as_json: bool) -> Result<u8, CliError> {
    let v = api.get(&format!("/api/v1/jobs?limit={limit}"))?;
    let jobs = v["jobs"].as_array().cloned().unwrap_or_default();
    if as_json {
        emit!(
            "{}",
            serde_json::to_string_pretty(&jobs).unwrap_or_default()
        );
        return Ok(exit::OK);
    }
    if jobs.is_empty() {
        eprintln!("no jobs (hub send --tag KEY=VALUE COMMAND makes one)");
        return Ok(exit::OK);
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|j| {
            vec![
                j["id"].to_string(),
                j["state"].as_str().unwrap_or("?").to_string(),
                one_line(j["command"].as_str().unwrap_or("")),
                one_line(j["select"].as_str().unwrap_or("")),
                j["targets"].to_string(),
                count(j, "succeeded").to_string(),
                count(j, "failed").to_string(),
                (count(j, "queued") + count(j, "sent") + count(j, "acked") + count(j, "pending"))
                    .to_string(),
                ago(j["created_at"].as_u64().unwrap_or(0)),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "STATE",
            "COMMAND",
            "DEVICES",
            "TARGETS",
            "SUCCEEDED",
            "FAILED",
            "OPEN",
            "CREATED",
        ],
        &rows,
    );
    Ok(exit::OK)
}

/// `hub jobs show ID [--json]` (without `--wait`).
///
/// # Errors
/// API failures (no such job: exit status 2).
pub fn show(api: &ApiClient, id: u64, as_json: bool) -> Result<u8, CliError> {
    let view = api.get(&format!("/api/v1/jobs/{id}"))?;
    if as_json {
        emit!(
            "{}",
            serde_json::to_string_pretty(&view).unwrap_or_default()
        );
        return Ok(exit::OK);
    }
    summary(&view);
    let rows: Vec<Vec<String>> = view["devices"]
        .as_array()
        .map(|d| {
            d.iter()
                .map(|r| {
                    vec![
                        one_line(r["device"].as_str().unwrap_or("?")),
                        r["state"].as_str().unwrap_or("?").to_string(),
                        if r["online"] == true {
                            "online"
                        } else {
                            "offline"
                        }
                        .to_string(),
                        r["command"].as_u64().map_or("-".into(), |c| c.to_string()),
                        one_line(
                            r["result"]["output"]
                                .as_str()
                                .or_else(|| r["reason"].as_str())
                                .unwrap_or(""),
                        ),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    emit!("");
    table(&["DEVICE", "STATE", "PRESENCE", "COMMAND", "RESULT"], &rows);
    Ok(exit::OK)
}

/// `hub jobs cancel ID`
///
/// # Errors
/// API failures; 1 when the job had already ended, 2 when there is no such job.
pub fn cancel(api: &ApiClient, id: u64) -> Result<u8, CliError> {
    match api.post(&format!("/api/v1/jobs/{id}/cancel"), &json!({})) {
        Ok(view) => {
            eprintln!(
                "job {id} cancelled: {} open commands cancelled, {} never sent",
                count(&view, "cancelled"),
                count(&view, "skipped")
            );
            Ok(exit::OK)
        }
        Err(CliError::Api {
            status: 409,
            message,
        }) => Err(CliError::Outcome(exit::FAILED, message)),
        Err(err) => Err(err),
    }
}

//! Routes for jobs: one command over the devices a selector (or a list) picks, with
//! per-device progress, and cancellation.

use std::collections::{HashMap, HashSet};

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use schemas::limits::is_valid_device_id;
use serde_json::{json, Value};

use super::devices::{command_fields, json_body, selected, CommandFields};
use super::{blocking, ApiError, ApiState};
use crate::jobs::{parse_percent, parse_rate, CancelJobRefused, JobCounts, MAX_TARGETS};
use crate::selector::Selector;
use crate::store::jobs::{JobRecord, JobSpec, JobState};
use crate::store::ledger::{CommandRecord, CommandState};

/// Jobs listed when no `limit` is given.
const DEFAULT_LIST: usize = 20;
/// Most jobs one list returns.
const MAX_LIST: usize = 1000;

const EXAMPLE: &str =
    "{\"command\": \"led\", \"args\": {\"on\": true}, \"select\": \"site=b\", \"rate\": \"20/s\"}";

/// The devices online now: connected here, or (in a cluster) anywhere.
async fn online_devices(state: &ApiState) -> Result<HashSet<String>, ApiError> {
    let mut online: HashSet<String> = state
        .ctx
        .presence
        .snapshot()
        .into_iter()
        .map(|(d, _)| d.to_string())
        .collect();
    if state.ctx.cluster.is_some() {
        let meta = state.ctx.meta.clone();
        let records = blocking(move || meta.devices()).await?;
        online.extend(records.into_iter().filter(|r| r.online).map(|r| r.id));
    }
    Ok(online)
}

/// A job as the API shows it: the record, counts, per-device states (when `devices`),
/// and whether it has settled: nothing is left to happen before offline devices return.
fn view(
    job: &JobRecord,
    targets: &[String],
    commands: &[CommandRecord],
    online: &HashSet<String>,
    devices: bool,
) -> Value {
    let counts = JobCounts::of(job, commands);
    let waiting_offline = commands
        .iter()
        .filter(|c| c.state == CommandState::Queued && !online.contains(&c.device))
        .count() as u64;
    // Nothing left but offline devices coming back; a job whose commands all finished
    // settles once its runner has seen that and ended it.
    let settled = counts.pending == 0
        && counts.sent == 0
        && counts.acked == 0
        && counts.queued == waiting_offline
        && (job.state != JobState::Running || counts.queued > 0);
    let mut value = serde_json::to_value(job).unwrap_or(Value::Null);
    value["counts"] = serde_json::to_value(&counts).unwrap_or(Value::Null);
    value["waiting_offline"] = json!(waiting_offline);
    value["settled"] = json!(settled);
    if devices {
        let by_device: HashMap<&str, &CommandRecord> =
            commands.iter().map(|c| (c.device.as_str(), c)).collect();
        let rows: Vec<Value> = targets
            .iter()
            .map(|device| match by_device.get(device.as_str()) {
                Some(c) => json!({
                    "device": device,
                    "state": c.state.as_str(),
                    "command": c.id,
                    "online": online.contains(device),
                    "result": c.result,
                    "reason": c.reason,
                }),
                None => json!({
                    "device": device,
                    "state": if job.state == JobState::Running { "pending" } else { "skipped" },
                    "command": null,
                    "online": online.contains(device),
                }),
            })
            .collect();
        value["devices"] = Value::Array(rows);
    }
    value
}

/// The targets a request names: `select` (the selector grammar) or `devices` (ids).
async fn targets(state: &ApiState, body: &Value) -> Result<(String, Vec<String>), ApiError> {
    match (body.get("select"), body.get("devices")) {
        (Some(_), Some(_)) => Err(ApiError::bad_request(
            "give either `select` or `devices`, not both",
        )),
        (Some(Value::String(text)), None) => {
            if text.trim().is_empty() {
                return Err(ApiError::bad_request(
                    "an empty `select` would pick every device; say `all` if you mean that",
                ));
            }
            let selector: Selector = text
                .parse()
                .map_err(|e: crate::selector::SelectorError| ApiError::bad_request(e.to_string()))?;
            let ids: Vec<String> = selected(state, &selector)
                .await?
                .into_iter()
                .filter_map(|d| d["id"].as_str().map(str::to_string))
                .collect();
            if ids.is_empty() {
                return Err(ApiError::bad_request(format!(
                    "no device matches `{selector}` (see `hub devices --tag KEY=VALUE`)"
                )));
            }
            Ok((selector.to_string(), ids))
        }
        (None, Some(Value::Array(list))) => {
            let mut seen = HashSet::new();
            let mut ids = Vec::with_capacity(list.len());
            for item in list {
                let id = item.as_str().unwrap_or("");
                if !is_valid_device_id(id) {
                    return Err(ApiError::bad_request(format!(
                        "`devices` holds `{}`, which is not a device id",
                        item.to_string().chars().take(64).collect::<String>()
                    )));
                }
                if seen.insert(id.to_string()) {
                    ids.push(id.to_string());
                }
            }
            if ids.is_empty() {
                return Err(ApiError::bad_request("`devices` is empty"));
            }
            let meta = state.ctx.meta.clone();
            let known: HashSet<String> = blocking(move || meta.devices())
                .await?
                .into_iter()
                .map(|r| r.id)
                .collect();
            let unknown: Vec<&str> = ids
                .iter()
                .filter(|id| !known.contains(*id))
                .map(String::as_str)
                .collect();
            if !unknown.is_empty() {
                return Err(ApiError::not_found(format!(
                    "{} of the devices are not registered ({}{}); register them with `hub devices add`",
                    unknown.len(),
                    unknown.iter().take(5).copied().collect::<Vec<_>>().join(", "),
                    if unknown.len() > 5 { ", ..." } else { "" }
                )));
            }
            Ok((format!("{} listed devices", ids.len()), ids))
        }
        (None, None) => Err(ApiError::bad_request(format!(
            "say which devices: `select` (like \"site=b\" or \"all\") or `devices` (a list of ids); for example {EXAMPLE}"
        ))),
        _ => Err(ApiError::bad_request(
            "`select` must be a string and `devices` a list of ids",
        )),
    }
}

/// `POST /api/v1/jobs` with `{"command", "args"?, "select" | "devices", "timeout"?,
/// "ttl"?, "rate"?, "abort_on_failure"?}`: creates a job and starts it. 201 with the job.
///
/// Cancel safety: if the client goes away mid-request the job may still be created.
pub async fn create(State(state): State<ApiState>, body: Bytes) -> Result<Response, ApiError> {
    let body = json_body(&body, EXAMPLE)?;
    let CommandFields {
        name,
        args_text,
        timeout,
        ttl,
    } = command_fields(&body, "command")?;
    let rate = match body.get("rate") {
        None | Some(Value::Null) => Ok(0.0),
        Some(Value::Number(n)) => parse_rate(&n.to_string()),
        Some(Value::String(s)) => parse_rate(s),
        Some(_) => Err("`rate` must be a number per second or text like \"10/s\"".to_string()),
    }
    .map_err(ApiError::bad_request)?;
    let abort_on_failure = match body.get("abort_on_failure") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(parse_percent(&n.to_string())),
        Some(Value::String(s)) => Some(parse_percent(s)),
        Some(_) => Some(Err(
            "`abort_on_failure` must be a percentage like 10".to_string()
        )),
    }
    .transpose()
    .map_err(ApiError::bad_request)?;
    let (select, targets) = targets(&state, &body).await?;
    if targets.len() > MAX_TARGETS {
        return Err(ApiError::status(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{} devices match; one job targets at most {MAX_TARGETS} (split it by tag)",
                targets.len()
            ),
        ));
    }
    let spec = JobSpec {
        command: name,
        args: serde_json::from_str(&args_text).unwrap_or(Value::Null),
        select,
        timeout_ms: timeout.as_millis() as u64,
        ttl_ms: ttl.as_millis() as u64,
        rate,
        abort_on_failure,
    };
    let job = state
        .jobs
        .start(spec, targets.clone(), state.shutdown.clone())
        .await?;
    let online = online_devices(&state).await?;
    Ok((
        StatusCode::CREATED,
        Json(view(&job, &targets, &[], &online, false)),
    )
        .into_response())
}

/// `GET /api/v1/jobs?limit=N`: the newest jobs with their counts.
///
/// Cancel safety: safe; it only reads.
pub async fn list(
    State(state): State<ApiState>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = match params.get("limit") {
        None => DEFAULT_LIST,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIST).contains(n))
            .ok_or_else(|| ApiError::bad_request(format!("`limit` must be 1 to {MAX_LIST}")))?,
    };
    let jobs = state.jobs.list(limit).await?;
    let rows: Vec<Value> = jobs
        .into_iter()
        .map(|(job, counts)| {
            let mut value = serde_json::to_value(&job).unwrap_or(Value::Null);
            value["counts"] = serde_json::to_value(&counts).unwrap_or(Value::Null);
            value
        })
        .collect();
    Ok(Json(json!({ "jobs": rows })))
}

fn job_id(text: &str) -> Result<u64, ApiError> {
    text.parse()
        .map_err(|_| ApiError::bad_request(format!("`{text}` is not a job id (a number)")))
}

fn no_such_job(id: u64) -> ApiError {
    ApiError::not_found(format!("no job {id} (see `hub jobs`)"))
}

/// `GET /api/v1/jobs/{id}`: the job with per-device states.
///
/// Cancel safety: safe; it only reads.
pub async fn show(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = job_id(&id)?;
    let (job, targets, commands) = state.jobs.get(id).await?.ok_or_else(|| no_such_job(id))?;
    let online = online_devices(&state).await?;
    Ok(Json(view(&job, &targets, &commands, &online, true)))
}

/// `POST /api/v1/jobs/{id}/cancel`: no new commands; open ones are cancelled. 409 when
/// the job had already ended.
///
/// Cancel safety: not cancel safe (see `Jobs::cancel`).
pub async fn cancel(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = job_id(&id)?;
    match state.jobs.cancel(id).await? {
        Ok(_) => {}
        Err(CancelJobRefused::NotFound) => return Err(no_such_job(id)),
        Err(CancelJobRefused::AlreadyEnded(st)) => {
            return Err(ApiError::status(
                StatusCode::CONFLICT,
                format!("job {id} already ended ({})", st.as_str()),
            ))
        }
    }
    let (job, targets, commands) = state.jobs.get(id).await?.ok_or_else(|| no_such_job(id))?;
    let online = online_devices(&state).await?;
    Ok(Json(view(&job, &targets, &commands, &online, true)))
}

//! Routes for rollouts: start one (a version over the devices a selector picks, canary
//! first, then steps), list them, show one with each device's update, pause, resume, abort.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::devices::{json_body, selected};
use super::firmware::update_view;
use super::{off_thread, ApiError, ApiState};
use crate::rollouts::{parse_steps, RolloutView};
use crate::selector::Selector;
use crate::store::updates::{OnFailure, RolloutSpec, RolloutState};

const EXAMPLE: &str = "{\"version\": \"1.1\", \"select\": \"site=b\", \"canary\": 10, \"steps\": \"10%,50%,100%\", \"max_failures\": 5, \"on_failure\": \"pause\", \"rate\": 60}";

fn view(v: &RolloutView, devices: bool) -> Value {
    let r = &v.record;
    let mut out = json!({
        "id": r.id,
        "version": r.spec.version,
        "select": r.spec.select,
        "canary": r.spec.canary,
        "steps": r.spec.steps,
        "max_failures": r.spec.max_failures,
        "on_failure": r.spec.on_failure.as_str(),
        "rate_per_min": r.spec.rate_per_min,
        "state": r.state.as_str(),
        "reason": r.reason,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
        "counts": v.counts,
    });
    if devices {
        out["devices"] = v
            .devices
            .iter()
            .map(|(d, u)| match u {
                Some(u) => update_view(u),
                None => json!({"device": d, "state": "pending"}),
            })
            .collect();
    }
    out
}

fn number(body: &Value, key: &str, default: f64) -> Result<f64, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_f64()
            .filter(|n| n.is_finite() && *n >= 0.0)
            .ok_or_else(|| ApiError::bad_request(format!("`{key}` must be a number, 0 or more"))),
    }
}

/// `POST /api/v1/rollouts` with `{"version", "select", "canary"?, "steps"?, "max_failures"?,
/// "on_failure"? ("abort", the default, or "pause"), "rate"?}`: fixes the targets (the selected devices the image is for, by id) and starts
/// offering; 201 with the rollout.
pub async fn start(
    State(state): State<ApiState>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body = json_body(&body, EXAMPLE)?;
    let version = body
        .get("version")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request(format!("give `version`; example: {EXAMPLE}")))?
        .to_string();
    let select_text = body
        .get("select")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            ApiError::bad_request("give `select`: the devices (`site=b`, or `all` for every one)")
        })?
        .to_string();
    let selector: Selector = select_text
        .parse()
        .map_err(|e: crate::selector::SelectorError| ApiError::bad_request(e.to_string()))?;
    let steps = match body.get("steps") {
        None | Some(Value::Null) => vec![100.0],
        Some(Value::String(s)) => parse_steps(s).map_err(ApiError::bad_request)?,
        Some(_) => {
            return Err(ApiError::bad_request(
                "`steps` is text like \"10%,50%,100%\"",
            ))
        }
    };
    let max_failures = number(&body, "max_failures", 0.0)?;
    if max_failures > 100.0 {
        return Err(ApiError::bad_request(
            "`max_failures` is a percentage, 0 to 100",
        ));
    }
    let on_failure = match body.get("on_failure") {
        None | Some(Value::Null) => OnFailure::Abort,
        Some(Value::String(s)) => OnFailure::parse(s).map_err(ApiError::bad_request)?,
        Some(_) => {
            return Err(ApiError::bad_request(
                "`on_failure` is \"pause\" or \"abort\"",
            ))
        }
    };
    let spec = RolloutSpec {
        version: version.clone(),
        select: select_text,
        canary: number(&body, "canary", 0.0)? as usize,
        steps,
        max_failures,
        rate_per_min: number(&body, "rate", 0.0)?,
        on_failure,
    };
    let store = state.ctx.updates.firmware().clone();
    let v = version.clone();
    let artifact = off_thread(move || store.get(&v)).await?;
    let for_devices = artifact.selector()?;
    let mut targets: Vec<String> = selected(&state, &selector)
        .await?
        .into_iter()
        .filter_map(|d| d["id"].as_str().map(String::from))
        .collect();
    // The image's own `--for` tags narrow the targets further.
    if !artifact.for_devices.is_empty() {
        let allowed: Vec<String> = selected(&state, &for_devices)
            .await?
            .into_iter()
            .filter_map(|d| d["id"].as_str().map(String::from))
            .collect();
        targets.retain(|t| allowed.contains(t));
    }
    targets.sort();
    if targets.is_empty() {
        return Err(ApiError::bad_request(format!(
            "no device matches `{}`{}",
            spec.select,
            if artifact.for_devices.is_empty() {
                String::new()
            } else {
                format!(" and the image's `{}`", artifact.for_devices)
            }
        )));
    }
    let updates = state.ctx.updates.clone();
    let record = off_thread(move || updates.start_rollout(&spec, &targets)).await?;
    let updates = state.ctx.updates.clone();
    let id = record.id;
    let shown = off_thread(move || updates.rollout(id)).await?;
    tracing::info!(rollout = id, version = %version, "rollout started");
    match shown {
        Some(v) => Ok((StatusCode::CREATED, Json(view(&v, false)))),
        None => Err(ApiError::not_found(format!("rollout {id} vanished"))),
    }
}

/// `GET /api/v1/rollouts[?limit=N]`: newest first, with counts.
pub async fn list(
    State(state): State<ApiState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(20)
        .min(1000);
    let updates = state.ctx.updates.clone();
    let views = off_thread(move || {
        let mut out = Vec::new();
        for r in updates.rollouts(limit)? {
            if let Some(v) = updates.rollout(r.id)? {
                out.push(v);
            }
        }
        Ok::<_, crate::updates::UpdateError>(out)
    })
    .await?;
    Ok(Json(Value::Array(
        views.iter().map(|v| view(v, false)).collect(),
    )))
}

/// `GET /api/v1/rollouts/{id}`: the rollout with each target's update.
pub async fn show(
    State(state): State<ApiState>,
    Path(id): Path<u64>,
) -> Result<Json<Value>, ApiError> {
    let updates = state.ctx.updates.clone();
    match off_thread(move || updates.rollout(id)).await? {
        Some(v) => Ok(Json(view(&v, true))),
        None => Err(ApiError::not_found(format!(
            "no rollout {id} (see `hub rollout status`)"
        ))),
    }
}

async fn transition(
    state: ApiState,
    id: u64,
    to: RolloutState,
    reason: &'static str,
) -> Result<Json<Value>, ApiError> {
    let updates = state.ctx.updates.clone();
    let (moved, shown) = off_thread(move || {
        let moved = updates.set_rollout(id, to, reason)?;
        Ok::<_, crate::updates::UpdateError>((moved, updates.rollout(id)?))
    })
    .await?;
    let Some(v) = shown else {
        return Err(ApiError::not_found(format!("no rollout {id}")));
    };
    if !moved {
        return Err(ApiError::status(
            StatusCode::CONFLICT,
            format!(
                "rollout {id} is {}, it cannot become {}",
                v.record.state.as_str(),
                to.as_str()
            ),
        ));
    }
    Ok(Json(view(&v, false)))
}

/// `POST /api/v1/rollouts/{id}/pause`: no new offers; devices offered go on (409 unless running).
pub async fn pause(
    State(state): State<ApiState>,
    Path(id): Path<u64>,
) -> Result<Json<Value>, ApiError> {
    transition(state, id, RolloutState::Paused, "paused by an operator").await
}

/// `POST /api/v1/rollouts/{id}/resume` (409 unless paused).
pub async fn resume(
    State(state): State<ApiState>,
    Path(id): Path<u64>,
) -> Result<Json<Value>, ApiError> {
    transition(state, id, RolloutState::Running, "").await
}

/// `POST /api/v1/rollouts/{id}/abort`: offers not started are withdrawn (409 once ended).
pub async fn abort(
    State(state): State<ApiState>,
    Path(id): Path<u64>,
) -> Result<Json<Value>, ApiError> {
    transition(state, id, RolloutState::Aborted, "aborted by an operator").await
}

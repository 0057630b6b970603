//! Routes for the fleet registry: registering devices before they exist (one or many, with
//! tags, each with its token), tagging them, and removing them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use schemas::limits::is_valid_device_id;
use serde::Deserialize;
use serde_json::{json, Value};

use super::devices::{duration_value, json_body, revoke};
use super::{blocking, ApiError, ApiState};
use crate::selector::{check_tag_key, check_tag_value, MAX_TAGS};
use crate::store::now_ms;

/// Most devices one registration request may carry.
pub const MAX_REGISTER_PER_REQUEST: usize = 100_000;
/// How many of a removed device's newest commands are looked at for cancelling (the window
/// of outstanding commands is at most 32, and queued ones beyond it are rare).
const OPEN_COMMANDS_SCAN: usize = 10_000;
/// Default lifetime of the tokens a registration returns.
const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(365 * 86_400);

/// Reads a `{"KEY": "VALUE"}` object of tags, checking every key and value.
fn tags_value(value: Option<&Value>) -> Result<BTreeMap<String, String>, ApiError> {
    let Some(value) = value.filter(|v| !v.is_null()) else {
        return Ok(BTreeMap::new());
    };
    let Value::Object(map) = value else {
        return Err(ApiError::bad_request(
            "`tags` must be an object like {\"site\": \"b\"}",
        ));
    };
    if map.len() > MAX_TAGS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_TAGS} tags per device"
        )));
    }
    let mut tags = BTreeMap::new();
    for (k, v) in map {
        let v = v.as_str().ok_or_else(|| {
            ApiError::bad_request(format!("tag `{k}`: the value must be a string"))
        })?;
        check_tag_key(k).map_err(|e| ApiError::bad_request(e.to_string()))?;
        check_tag_value(v).map_err(|e| ApiError::bad_request(e.to_string()))?;
        tags.insert(k.clone(), v.to_string());
    }
    Ok(tags)
}

fn device_id(value: Option<&Value>) -> Result<String, ApiError> {
    let id = value.and_then(Value::as_str).unwrap_or_default();
    if is_valid_device_id(id) {
        Ok(id.to_string())
    } else {
        Err(ApiError::bad_request(format!(
            "invalid device id `{}`: use letters, digits, '_', '.', '-' (at most 64)",
            id.chars().take(80).collect::<String>()
        )))
    }
}

/// `POST /api/v1/devices` with `{"id": "d1", "tags": {...}}` or `{"devices": [{"id",
/// "tags"}, ...]}`, and optional `"ttl"` for the tokens (default 365 days). Registers the
/// devices (merging tags into those that exist) and returns a token for each, as `POST
/// /api/v1/tokens` does.
///
/// Cancel safety: if the client goes away mid-request the devices may still be
/// registered; repeating the request is harmless.
pub async fn register(
    State(state): State<ApiState>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body = json_body(
        &body,
        "{\"id\": \"sensor-17\", \"tags\": {\"site\": \"b\"}}",
    )?;
    let ttl = duration_value("ttl", body.get("ttl"), DEFAULT_TOKEN_TTL)?;
    let single = body.get("id").is_some();
    let entries: Vec<&Value> = if single {
        vec![&body]
    } else {
        body.get("devices")
            .and_then(Value::as_array)
            .ok_or_else(|| ApiError::bad_request("give `id` (and `tags`), or `devices`"))?
            .iter()
            .collect()
    };
    if entries.len() > MAX_REGISTER_PER_REQUEST {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_REGISTER_PER_REQUEST} devices per request"
        )));
    }
    let mut devices = Vec::with_capacity(entries.len());
    for entry in entries {
        let id = device_id(entry.get("id"))?;
        let tags = tags_value(entry.get("tags"))?;
        devices.push((id, tags));
    }
    let now = now_ms();
    let meta = state.ctx.meta.clone();
    let to_store = devices.clone();
    let created = blocking(move || meta.register(&to_store, now)).await?;
    let expires_at = now + ttl.as_millis() as u64;
    let results: Vec<Value> = devices
        .iter()
        .zip(created)
        .map(|((id, tags), created)| {
            json!({
                "device_id": id,
                "token": state.ctx.auth.issue(id, now, ttl.as_secs()),
                "expires_at": expires_at,
                "created": created,
                "tags": tags,
            })
        })
        .collect();
    if single {
        return Ok((
            StatusCode::CREATED,
            Json(results.into_iter().next().unwrap_or(Value::Null)),
        ));
    }
    Ok((StatusCode::CREATED, Json(json!({ "devices": results }))))
}

/// `PATCH /api/v1/devices/{id}/tags` with `{"set": {"KEY": "VALUE"}, "remove": ["KEY"]}`.
/// Returns the device's tags afterwards.
///
/// Cancel safety: if the client goes away mid-request the tags may still change.
pub async fn tag(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let body = json_body(&body, "{\"set\": {\"site\": \"b\"}, \"remove\": [\"old\"]}")?;
    let set = tags_value(body.get("set"))?;
    let remove: Vec<String> = match body.get("remove") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(keys)) => keys
            .iter()
            .map(|k| {
                let k = k.as_str().unwrap_or_default();
                check_tag_key(k)
                    .map(|()| k.to_string())
                    .map_err(|e| ApiError::bad_request(e.to_string()))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(ApiError::bad_request("`remove` must be a list of tag keys")),
    };
    let meta = state.ctx.meta.clone();
    let key = id.clone();
    let tags = blocking(move || meta.tag(&key, &set, &remove))
        .await?
        .ok_or_else(|| unknown(&id))?;
    if tags.len() > MAX_TAGS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_TAGS} tags per device"
        )));
    }
    Ok(Json(json!({"device_id": id, "tags": tags})))
}

fn unknown(id: &str) -> ApiError {
    ApiError::not_found(format!(
        "unknown device `{}`: it is not registered (see `hub devices`; `hub devices add` registers one)",
        id.chars().take(64).collect::<String>()
    ))
}

/// Query of `DELETE /api/v1/devices/{id}`.
#[derive(Debug, Deserialize)]
pub struct RemoveParams {
    /// Also delete the device's telemetry.
    #[serde(default)]
    purge: bool,
}

/// `DELETE /api/v1/devices/{id}[?purge=true]`: revokes every token of the device (its live
/// session is closed with 1008), cancels its open commands, and forgets it. Its telemetry
/// stays unless `purge=true`.
///
/// Cancel safety: not cancel safe: if the client goes away midway, the device may be
/// revoked but not yet forgotten; repeating the request finishes the job.
pub async fn remove(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(params): Query<RemoveParams>,
) -> Result<Json<Value>, ApiError> {
    let now = now_ms();
    let meta = state.ctx.meta.clone();
    let key = id.clone();
    if blocking(move || meta.device(&key)).await?.is_none() {
        return Err(unknown(&id));
    }
    // Revocation first: from here on no token of the device opens a session, and the live
    // one (on any node) is closed.
    revoke(&state, &id, now).await?;
    let mut cancelled = 0;
    let open = state
        .ctx
        .ledger
        .list(&id, OPEN_COMMANDS_SCAN)
        .await
        .map_err(|e| ApiError::status(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    for record in open.into_iter().filter(|r| !r.state.is_final()) {
        if let Ok(Ok(_)) = state.ctx.ledger.cancel(record.id).await {
            cancelled += 1;
        }
    }
    let purged = if params.purge {
        Some(
            state
                .ctx
                .ingest
                .purge(Arc::from(id.as_str()))
                .await
                .map_err(|e| match e {
                    crate::ingest::PurgeError::Store(err) => ApiError::from(err),
                    stopped => {
                        ApiError::status(StatusCode::SERVICE_UNAVAILABLE, stopped.to_string())
                    }
                })?,
        )
    } else {
        None
    };
    let meta = state.ctx.meta.clone();
    let key = id.clone();
    blocking(move || meta.forget(&key)).await?;
    Ok(Json(json!({
        "device_id": id,
        "revoked_before": now,
        "commands_cancelled": cancelled,
        "readings_deleted": purged,
    })))
}

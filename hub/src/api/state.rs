//! Routes for desired and reported state (the device twin): read one device's, change one
//! device's with optimistic concurrency (`If-Match`), or change every device a selector
//! picks.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::devices::{json_body, selected};
use super::{blocking, ApiError, ApiState};
use crate::events::HubEvent;
use crate::selector::Selector;
use crate::store::twin::{DesiredOutcome, Twin};

fn twin_json(id: &str, twin: &Twin) -> Value {
    json!({
        "device_id": id,
        "desired": twin.desired,
        "desired_version": twin.desired_version,
        "reported": twin.reported,
        "reported_version": twin.reported_version,
        "delta": twin.delta(),
        "refused": twin.refused,
    })
}

fn with_etag(status: StatusCode, twin: &Twin, body: Value) -> Response {
    let mut response = (status, Json(body)).into_response();
    if let Ok(tag) = HeaderValue::from_str(&format!("\"{}\"", twin.desired_version)) {
        response.headers_mut().insert(header::ETAG, tag);
    }
    response
}

fn unknown(id: &str) -> ApiError {
    ApiError::not_found(format!(
        "unknown device `{}`: it is not registered (see `hub devices`; `hub devices add` registers one)",
        id.chars().take(64).collect::<String>()
    ))
}

/// The `desired` object of a PATCH body.
fn desired_patch(body: &Value) -> Result<Map<String, Value>, ApiError> {
    match body.get("desired") {
        Some(Value::Object(patch)) if !patch.is_empty() => Ok(patch.clone()),
        _ => Err(ApiError::bad_request(
            "send {\"desired\": {\"KEY\": VALUE}} (a JSON value per key; null deletes the key)",
        )),
    }
}

/// `If-Match: "3"` (or `3`, or `W/"3"`): the desired version the caller saw.
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or_default().trim();
    let text = text.trim_start_matches("W/").trim_matches('"');
    text.parse::<u64>().map(Some).map_err(|_| {
        ApiError::bad_request(format!(
            "If-Match `{text}` is not a desired-state version (use the ETag of GET .../state)"
        ))
    })
}

/// Tells the device's connection (here, or through the event fan-out any node) and the
/// event stream that the device's twin changed.
fn announce(state: &ApiState, id: &str, twin: &Twin) {
    if let Some(conn) = state.ctx.presence.get(id) {
        conn.signals.desired_changed();
    }
    state.ctx.events.publish(HubEvent::state(id, twin));
}

/// `GET /api/v1/devices/{id}/state`: desired, reported, the delta and both versions; the
/// `ETag` is the desired version.
///
/// Cancel safety: safe; it only reads.
pub async fn show(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let meta = state.ctx.meta.clone();
    let key = id.clone();
    let twin = blocking(move || meta.twin(&key))
        .await?
        .ok_or_else(|| unknown(&id))?;
    Ok(with_etag(StatusCode::OK, &twin, twin_json(&id, &twin)))
}

/// `PATCH /api/v1/devices/{id}/state` with `{"desired": {"KEY": VALUE}}` (`null` deletes a
/// key) and optionally `If-Match: "VERSION"`: 412 when desired state has moved on since.
/// A connected device gets the new delta at once; an offline one right after its next
/// `welcome`.
///
/// Cancel safety: if the client goes away mid-request the change may still be made.
pub async fn patch(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = json_body(&body, "{\"desired\": {\"interval\": 2}}")?;
    let patch = desired_patch(&body)?;
    let expected = if_match(&headers)?;
    let meta = state.ctx.meta.clone();
    let key = id.clone();
    let outcome = blocking(move || meta.update_desired(&key, &patch, expected))
        .await?
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    match outcome {
        DesiredOutcome::Done(twin, changed) => {
            if changed {
                announce(&state, &id, &twin);
            }
            Ok(with_etag(StatusCode::OK, &twin, twin_json(&id, &twin)))
        }
        DesiredOutcome::Stale(twin) => Err(ApiError::status(
            StatusCode::PRECONDITION_FAILED,
            format!(
                "desired state of `{id}` is at version {}, not {}: read it again and retry",
                twin.desired_version,
                expected.unwrap_or_default()
            ),
        )),
        DesiredOutcome::Unknown => Err(unknown(&id)),
    }
}

/// Query of `PATCH /api/v1/state`.
#[derive(Debug, Deserialize)]
pub struct BulkParams {
    /// Which devices (the selector grammar).
    select: String,
}

/// `PATCH /api/v1/state?select=SELECTOR` with `{"desired": {...}}`: the same change for
/// every device the selector picks. Returns how many devices changed.
///
/// Cancel safety: if the client goes away midway, some devices may have changed;
/// repeating the request is harmless (an unchanged value does not raise a version).
pub async fn patch_selected(
    State(state): State<ApiState>,
    Query(params): Query<BulkParams>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let selector: Selector = params
        .select
        .parse()
        .map_err(|e: crate::selector::SelectorError| ApiError::bad_request(e.to_string()))?;
    if selector.is_all() && params.select.trim() != "all" {
        return Err(ApiError::bad_request(
            "an empty selector would change every device: say `select=all` if that is meant",
        ));
    }
    let body = json_body(&body, "{\"desired\": {\"interval\": 2}}")?;
    let patch = desired_patch(&body)?;
    let devices = selected(&state, &selector).await?;
    let mut changed = 0usize;
    for device in &devices {
        let Some(id) = device["id"].as_str() else {
            continue;
        };
        let meta = state.ctx.meta.clone();
        let (key, p) = (id.to_string(), patch.clone());
        let outcome = blocking(move || meta.update_desired(&key, &p, None))
            .await?
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        if let DesiredOutcome::Done(twin, true) = outcome {
            announce(&state, id, &twin);
            changed += 1;
        }
    }
    Ok(Json(json!({
        "select": selector.to_string(),
        "matched": devices.len(),
        "changed": changed,
    })))
}

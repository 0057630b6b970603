//! Routes for firmware artifacts: add an image (the body is the image itself), list, show,
//! remove, and the public half of the firmware signing key that devices are provisioned
//! with; and for devices' updates: offer an image to a device, and where updates stand.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::{off_thread, ApiError, ApiState};
use crate::firmware::{parse_signature, Artifact, FirmwareError, NewArtifact};
use crate::store::now_ms;
use crate::store::updates::UpdateRecord;

impl From<FirmwareError> for ApiError {
    fn from(err: FirmwareError) -> ApiError {
        match err {
            FirmwareError::NotFound(_) => ApiError::not_found(err.to_string()),
            FirmwareError::Exists(_) => ApiError::status(StatusCode::CONFLICT, err.to_string()),
            FirmwareError::BadVersion(_)
            | FirmwareError::BadSize(_)
            | FirmwareError::BadSelector(_)
            | FirmwareError::BadSignature => ApiError::bad_request(err.to_string()),
            FirmwareError::Io { .. }
            | FirmwareError::BadKey(_)
            | FirmwareError::BadManifest { .. }
            | FirmwareError::Random => {
                tracing::error!(error = %err, "firmware store error in the admin API");
                ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, err.to_string())
            }
        }
    }
}

fn view(a: &Artifact) -> Value {
    serde_json::to_value(a).unwrap_or(Value::Null)
}

/// `POST /api/v1/firmware?version=V[&for=KEY=VALUE,...][&signature=HEX]` with the image as
/// the body: stores, hashes and signs it (with the hub's key unless `signature` is given),
/// and returns the artifact (201).
///
/// Cancel safety: the artifact is renamed into place in one step at the end, so a client
/// that goes away leaves either the whole artifact or none.
pub async fn add(
    State(state): State<ApiState>,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let version = query
        .get("version")
        .cloned()
        .ok_or_else(|| ApiError::bad_request("give ?version=V: the version the image is"))?;
    let for_devices = query
        .get("for")
        .map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let signature = query
        .get("signature")
        .map(|s| parse_signature(s.as_bytes()))
        .transpose()?;
    let new = NewArtifact {
        version,
        for_devices,
        signature,
    };
    let store = state.ctx.updates.firmware().clone();
    let artifact = off_thread(move || store.add(&new, &body, now_ms())).await?;
    tracing::info!(version = %artifact.version, size = artifact.size, sha256 = %artifact.sha256, "firmware added");
    Ok((StatusCode::CREATED, Json(view(&artifact))))
}

/// `GET /api/v1/firmware`: `{"signing_key": HEX, "artifacts": [...]}`, oldest first; the
/// key is created if there is none yet.
pub async fn list(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let store = state.ctx.updates.firmware().clone();
    let (key, artifacts) =
        off_thread(move || Ok::<_, FirmwareError>((store.public_key_hex()?, store.list()?)))
            .await?;
    Ok(Json(json!({
        "signing_key": key,
        "artifacts": artifacts.iter().map(view).collect::<Vec<_>>(),
    })))
}

/// `GET /api/v1/firmware/{version}`
pub async fn show(
    State(state): State<ApiState>,
    Path(version): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let store = state.ctx.updates.firmware().clone();
    let artifact = off_thread(move || store.get(&version)).await?;
    Ok(Json(view(&artifact)))
}

/// `DELETE /api/v1/firmware/{version}`
pub async fn remove(
    State(state): State<ApiState>,
    Path(version): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let store = state.ctx.updates.firmware().clone();
    let name = version.clone();
    off_thread(move || store.remove(&name)).await?;
    tracing::info!(version = %version, "firmware removed");
    Ok(Json(json!({"removed": version})))
}

impl From<crate::updates::UpdateError> for ApiError {
    fn from(err: crate::updates::UpdateError) -> ApiError {
        match err {
            crate::updates::UpdateError::Firmware(e) => ApiError::from(e),
            crate::updates::UpdateError::Store(e) => ApiError::from(e),
        }
    }
}

/// A device's update as the API shows it.
pub(crate) fn update_view(r: &UpdateRecord) -> Value {
    json!({
        "device": r.device,
        "version": r.version,
        "state": r.stage.as_str(),
        "percent": r.percent,
        "reason": r.reason,
        "rollout": r.rollout,
        "assigned_at": r.assigned_at,
        "updated_at": r.updated_at,
    })
}

/// `POST /api/v1/devices/{id}/firmware` with `{"version": "1.1"}`: offers the stored image
/// to the device (now if it is connected, else when it connects), replacing its current
/// update; 201 with the update.
pub async fn offer(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if !schemas::limits::is_valid_device_id(&id) {
        return Err(ApiError::bad_request(format!(
            "invalid device id `{}`",
            id.chars().take(80).collect::<String>()
        )));
    }
    let body = super::devices::json_body(&body, "{\"version\": \"1.1\"}")?;
    let version = body
        .get("version")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("give `version`: a stored firmware version"))?
        .to_string();
    let meta = state.ctx.meta.clone();
    let key = id.clone();
    let known = super::blocking(move || Ok(meta.device(&key)?.is_some())).await?;
    if !known {
        return Err(ApiError::not_found(format!(
            "no device `{id}` (register it with `hub devices add`)"
        )));
    }
    let updates = state.ctx.updates.clone();
    let record = off_thread(move || updates.assign(&id, &version, None)).await?;
    Ok((StatusCode::CREATED, Json(update_view(&record))))
}

/// `GET /api/v1/devices/{id}/firmware`: the device's update (404 when it has none).
pub async fn device_update(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let updates = state.ctx.updates.clone();
    let key = id.clone();
    match off_thread(move || updates.get(&key)).await? {
        Some(record) => Ok(Json(update_view(&record))),
        None => Err(ApiError::not_found(format!(
            "device `{id}` has no firmware update"
        ))),
    }
}

/// `GET /api/v1/updates[?rollout=N]`: every device's update, by device.
pub async fn updates(
    State(state): State<ApiState>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let rollout = query
        .get("rollout")
        .map(|r| {
            r.parse::<u64>()
                .map_err(|_| ApiError::bad_request("rollout must be a rollout id"))
        })
        .transpose()?;
    let updates = state.ctx.updates.clone();
    let records = off_thread(move || updates.list(rollout)).await?;
    Ok(Json(Value::Array(
        records.iter().map(update_view).collect(),
    )))
}

//! Routes for the cluster: its status (nodes, devices per node, heartbeat ages) and
//! rebalancing.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::Value;

use super::{ApiError, ApiState};
use crate::cluster::Backplane;

fn backplane(state: &ApiState) -> Result<&Backplane, ApiError> {
    state.ctx.cluster.as_deref().ok_or_else(|| {
        ApiError::not_found(
            "this hub is not part of a cluster (cluster.redis_url is not set); see deploy/README.md",
        )
    })
}

/// `GET /api/v1/cluster`
///
/// Cancel safety: axum drops the future when the client goes away; safe, it only reads.
pub async fn status(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let status = backplane(&state)?.status().await?;
    Ok(Json(serde_json::to_value(status).unwrap_or(Value::Null)))
}

/// `POST /api/v1/cluster/rebalance` with `{"rate"?: devices per second, "dry_run"?: bool}`.
///
/// Cancel safety: if the client goes away mid-request some nodes may have been told to start.
pub async fn rebalance(
    State(state): State<ApiState>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let body: Value = if body.is_empty() {
        Value::Object(Default::default())
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!(
                "the body is not valid JSON ({e}); send one like {{\"rate\": 20, \"dry_run\": true}}"
            ))
        })?
    };
    let rate = match body.get("rate") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|r| (1..=1_000_000).contains(r))
                .map(|r| r as u32)
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "`rate` must be a whole number of devices per second, at least 1",
                    )
                })?,
        ),
    };
    let dry_run = match body.get("dry_run") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::bad_request("`dry_run` must be true or false")),
    };
    let plan = backplane(&state)?
        .rebalance(rate, dry_run)
        .await
        .map_err(|err| {
            ApiError::status(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("the cluster backplane is unavailable: {err}; retry later"),
            )
        })?;
    Ok(Json(serde_json::to_value(plan).unwrap_or(Value::Null)))
}

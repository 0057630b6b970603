//! The route that issues device client certificates. The operator's CLI makes the device's
//! key pair and sends only the public key; the hub signs it with its device CA
//! (`client_cert.rs`), so the private key never crosses the API.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use schemas::limits::is_valid_device_id;
use serde_json::{json, Value};

use super::devices::{duration_value, json_body};
use super::{blocking, ApiError, ApiState};
use crate::client_cert::{not_before_s, CertError};
use crate::store::now_ms;

/// Default lifetime of an issued certificate, the same as a registration's token.
const DEFAULT_CERT_TTL: Duration = Duration::from_secs(365 * 86_400);

/// `POST /api/v1/devices/{id}/certificate` with `{"public_key": "-----BEGIN PUBLIC KEY-----
/// ...", "ttl": "365d"}`: registers the device if it is not yet (as issuing a token does)
/// and returns `{"device_id", "certificate", "ca", "not_before", "not_after"}` (PEM; times
/// in ms since the epoch). The certificate is valid from its issue instant, or from the
/// second after the device's last revocation when that was this very second, for `ttl`.
///
/// Cancel safety: if the client goes away mid-request the device may be registered and a
/// certificate made that nobody received; repeating the request issues another.
pub async fn issue(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if !is_valid_device_id(&id) {
        return Err(ApiError::bad_request(format!(
            "invalid device id `{}`: use letters, digits, '_', '.', '-' (at most 64)",
            id.chars().take(80).collect::<String>()
        )));
    }
    let body = json_body(
        &body,
        "{\"public_key\": \"-----BEGIN PUBLIC KEY-----\\n...\", \"ttl\": \"365d\"}",
    )?;
    let public_key = body
        .get("public_key")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("give `public_key`: the device's public key in PEM"))?
        .to_string();
    let ttl = duration_value("ttl", body.get("ttl"), DEFAULT_CERT_TTL)?;
    let ca = state.device_ca.clone().ok_or_else(|| {
        ApiError::status(
            StatusCode::CONFLICT,
            "this hub serves plain ws (device.plain_ws): client certificates need TLS at the hub, so it issues none",
        )
    })?;
    let now = now_ms();
    let meta = state.ctx.meta.clone();
    let key = id.clone();
    let revoked_at = blocking(move || {
        meta.register(&[(key.clone(), BTreeMap::new())], now)?;
        Ok(meta
            .revocations()?
            .into_iter()
            .filter(|(device, _)| *device == key)
            .map(|(_, at)| at)
            .max())
    })
    .await?;
    let not_before = not_before_s(now, revoked_at);
    let not_after = not_before.saturating_add(ttl.as_secs());
    let certificate =
        ca.issue(&id, &public_key, not_before, not_after)
            .map_err(|err| match err {
                CertError::PublicKey(_) => ApiError::bad_request(err.to_string()),
                CertError::NoCaKey => ApiError::status(StatusCode::CONFLICT, err.to_string()),
                other => ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
            })?;
    tracing::info!(device = %id, not_after_s = not_after, "issued a device certificate");
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "device_id": id,
            "certificate": certificate,
            "ca": ca.cert_pem(),
            "not_before": not_before.saturating_mul(1000),
            "not_after": not_after.saturating_mul(1000),
        })),
    ))
}

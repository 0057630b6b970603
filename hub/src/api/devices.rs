//! Routes for devices, tokens and commands.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use schemas::limits::{is_valid_device_id, is_valid_name, MAX_ARGS_LEN, MAX_COMMAND_NAME_LEN};
use serde_json::{json, Value};

use super::{blocking, ApiError, ApiState};
use crate::ledger::Durability;
use crate::selector::Selector;
use crate::store::ledger::CancelRefused;
use crate::store::meta::DeviceRecord;
use crate::store::now_ms;

/// Default result timeout of a command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time a command waits for an offline device.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);
/// Longest `?wait=` a request may hold.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// Most tokens issued by one request.
const MAX_TOKENS_PER_REQUEST: usize = 100_000;

/// Parses a JSON object body whatever the Content-Type says (curl users forget it), with
/// an error in the API's shape that shows an example.
pub(crate) fn json_body(bytes: &Bytes, example: &str) -> Result<Value, ApiError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(ApiError::bad_request(format!(
            "the body must be a JSON object like {example}"
        ))),
        Err(e) if bytes.is_empty() => Err(ApiError::bad_request(format!(
            "send a JSON body like {example} ({e})"
        ))),
        Err(e) => Err(ApiError::bad_request(format!(
            "the body is not valid JSON ({e}); send one like {example}"
        ))),
    }
}

/// A stored device record with live presence overlaid, as JSON.
fn live(state: &ApiState, record: DeviceRecord) -> Value {
    device_json(overlay(state, record))
}

/// The name the API gives a presence cause. The session names a revocation
/// `token_revoked`; records written by an older hub say `kicked:1008` (the hub kicks with
/// that code only for a revoked token), and get the same name.
pub(crate) fn cause_name(cause: &str) -> &str {
    match cause {
        "kicked:1008" => "token_revoked",
        other => other,
    }
}

/// Overlays live presence on a stored device record.
fn overlay(state: &ApiState, mut record: DeviceRecord) -> DeviceRecord {
    if let Some(conn) = state.ctx.presence.get(&record.id) {
        record.online = true;
        record.last_seen = record
            .last_seen
            .max(conn.stats.last_seen_ms.load(Ordering::Relaxed));
        record.rtt_us = conn.stats.rtt().or(record.rtt_us);
        record.firmware = conn.firmware.clone();
        record.remote_addr = conn.remote.clone();
        record.connected_at = Some(conn.connected_at_ms);
    } else if state.ctx.cluster.is_none() {
        // On a single node, not connected here means offline; in a cluster the shared
        // registry knows about devices on the other nodes.
        record.online = false;
    }
    record.last_cause = cause_name(&record.last_cause).to_string();
    record
}

/// A device record as the API shows it.
fn device_json(record: DeviceRecord) -> Value {
    let mut value = serde_json::to_value(&record).unwrap_or(Value::Null);
    // Stored comma-joined; an array is what a script expects.
    value["capabilities"] = Value::Array(
        record
            .capabilities
            .split(',')
            .filter(|c| !c.is_empty())
            .map(|c| Value::String(c.to_string()))
            .collect(),
    );
    value
}

/// Parses a duration given as text ("30s", "2m") or a number of seconds.
pub(crate) fn duration_value(
    field: &str,
    value: Option<&Value>,
    default: Duration,
) -> Result<Duration, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|s| *s >= 0.0 && s.is_finite())
            .map(Duration::from_secs_f64)
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "`{field}` must be a non-negative number of seconds"
                ))
            }),
        Some(Value::String(s)) => humantime::parse_duration(s).map_err(|_| {
            ApiError::bad_request(format!(
                "`{field}`: `{s}` is not a duration (examples: 500ms, 30s, 2h)"
            ))
        }),
        Some(_) => Err(ApiError::bad_request(format!(
            "`{field}` must be a duration like \"30s\" or seconds"
        ))),
    }
}

/// The record of a device that has connected at least once.
///
/// # Errors
/// 400 for an id no device can have, 404 for one that never connected.
pub(crate) async fn known_device(state: &ApiState, id: &str) -> Result<DeviceRecord, ApiError> {
    if !is_valid_device_id(id) {
        return Err(ApiError::bad_request(format!(
            "invalid device id `{}`: use letters, digits, '_', '.', '-' (at most 64)",
            id.chars().take(64).collect::<String>()
        )));
    }
    let meta = state.ctx.meta.clone();
    let key = id.to_string();
    blocking(move || meta.device(&key)).await?.ok_or_else(|| {
        ApiError::not_found(format!(
            "unknown device `{}`: it is not registered (see `hub devices`; `hub devices add` registers one)",
            id.chars().take(64).collect::<String>()
        ))
    })
}

/// Most devices one page of `GET /api/v1/devices` holds.
pub const MAX_PAGE: usize = 1_000;

/// `GET /api/v1/devices?select=&q=&sort=&offset=&limit=`: the devices a selector picks,
/// with live presence; `q` keeps those whose id contains it (ignoring case), `sort` orders
/// them by `id` (the default), `last_seen`, `online`, `firmware` or `rtt` (`-` before it
/// for descending), and `offset`/`limit` page them (without `limit`: all of them). `total`
/// is how many matched; `counts` counts presence over every registered device.
///
/// Cancel safety: axum drops the future when the client goes away; safe, it only reads.
pub async fn list(
    State(state): State<ApiState>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let selector: Selector = params
        .get("select")
        .map(|s| s.parse())
        .transpose()
        .map_err(|e: crate::selector::SelectorError| ApiError::bad_request(e.to_string()))?
        .unwrap_or_default();
    let whole = |name: &str| -> Result<Option<usize>, ApiError> {
        params
            .get(name)
            .map(|v| {
                v.parse::<usize>()
                    .map_err(|_| ApiError::bad_request(format!("`{name}` must be a whole number")))
            })
            .transpose()
    };
    let offset = whole("offset")?.unwrap_or(0);
    let limit = whole("limit")?;
    if limit.is_some_and(|l| l > MAX_PAGE) {
        return Err(ApiError::bad_request(format!(
            "`limit` is at most {MAX_PAGE} devices per page"
        )));
    }
    let order = params
        .get("sort")
        .map(|s| DeviceOrder::parse(s))
        .transpose()?
        .unwrap_or(DeviceOrder::Id(false));
    let search = params
        .get("q")
        .map(|q| q.trim().to_lowercase())
        .filter(|q| !q.is_empty());
    let meta = state.ctx.meta.clone();
    let records = blocking(move || meta.devices()).await?;
    let mut counts = PresenceCounts::default();
    let mut matched: Vec<DeviceRecord> = Vec::new();
    for record in records {
        let record = overlay(&state, record);
        counts.add(&record);
        let found = search
            .as_deref()
            .is_none_or(|q| record.id.to_lowercase().contains(q));
        if found && selector.matches(&record, record.online) {
            matched.push(record);
        }
    }
    order.sort(&mut matched);
    let total = matched.len();
    let devices: Vec<Value> = matched
        .into_iter()
        .skip(offset)
        .take(limit.unwrap_or(usize::MAX))
        .map(device_json)
        .collect();
    Ok(Json(json!({
        "devices": devices,
        "select": selector.to_string(),
        "total": total,
        "offset": offset,
        "counts": counts,
    })))
}

/// The devices a selector picks, with live presence, in id order.
///
/// # Errors
/// The store failed.
pub(crate) async fn selected(
    state: &ApiState,
    selector: &Selector,
) -> Result<Vec<Value>, ApiError> {
    let meta = state.ctx.meta.clone();
    let records = blocking(move || meta.devices()).await?;
    Ok(records
        .into_iter()
        .map(|r| overlay(state, r))
        .filter(|r| selector.matches(r, r.online))
        .map(device_json)
        .collect())
}

/// How many registered devices are online, offline after connecting, and never connected.
#[derive(Debug, Default, serde::Serialize)]
struct PresenceCounts {
    online: usize,
    offline: usize,
    never_connected: usize,
}

impl PresenceCounts {
    fn add(&mut self, record: &DeviceRecord) {
        if record.online {
            self.online += 1;
        } else if record.first_seen == 0 {
            self.never_connected += 1;
        } else {
            self.offline += 1;
        }
    }
}

/// The order of a device list (`true`: descending).
#[derive(Debug, Clone, Copy)]
enum DeviceOrder {
    Id(bool),
    LastSeen(bool),
    Online(bool),
    Firmware(bool),
    Rtt(bool),
}

impl DeviceOrder {
    fn parse(text: &str) -> Result<DeviceOrder, ApiError> {
        let (desc, key) = match text.strip_prefix('-') {
            Some(key) => (true, key),
            None => (false, text),
        };
        Ok(match key {
            "id" => DeviceOrder::Id(desc),
            "last_seen" => DeviceOrder::LastSeen(desc),
            "online" => DeviceOrder::Online(desc),
            "firmware" => DeviceOrder::Firmware(desc),
            "rtt" => DeviceOrder::Rtt(desc),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "`sort`: `{}` is not one of id, last_seen, online, firmware, rtt (with - for descending)",
                    text.chars().take(40).collect::<String>()
                )))
            }
        })
    }

    /// Sorts by the key, then by id, so that pages do not overlap.
    fn sort(self, records: &mut [DeviceRecord]) {
        use std::cmp::Ordering as O;
        let (desc, key): (bool, fn(&DeviceRecord, &DeviceRecord) -> O) = match self {
            DeviceOrder::Id(d) => (d, |_, _| O::Equal),
            DeviceOrder::LastSeen(d) => (d, |a, b| a.last_seen.cmp(&b.last_seen)),
            DeviceOrder::Online(d) => (d, |a, b| a.online.cmp(&b.online)),
            DeviceOrder::Firmware(d) => (d, |a, b| a.firmware.cmp(&b.firmware)),
            DeviceOrder::Rtt(d) => (d, |a, b| a.rtt_us.cmp(&b.rtt_us)),
        };
        records.sort_by(|a, b| {
            let o = key(a, b).then_with(|| a.id.cmp(&b.id));
            if desc {
                o.reverse()
            } else {
                o
            }
        });
    }
}

/// `GET /api/v1/devices/{id}`
///
/// Cancel safety: axum drops the future when the client goes away; safe, it only reads.
pub async fn show(
    State(state): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let record = known_device(&state, &id).await?;
    Ok(Json(live(&state, record)))
}

/// `GET /api/v1/devices/{id}/presence?limit=N`: when the device came and went, newest
/// first (default 50 entries). `history` is null when the registry keeps none (a cluster's).
///
/// Cancel safety: axum drops the future when the client goes away; safe, it only reads.
pub async fn presence_history(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = history_limit(&params, 50)?;
    known_device(&state, &id).await?;
    let meta = state.ctx.meta.clone();
    let key = id.clone();
    let history = blocking(move || meta.presence_history(&key, limit)).await?;
    let history = history.map(|changes| {
        changes
            .into_iter()
            .map(|c| json!({"at_ms": c.at_ms, "online": c.online, "cause": cause_name(&c.cause)}))
            .collect::<Vec<_>>()
    });
    Ok(Json(json!({"device_id": id, "history": history})))
}

/// A command as a request describes it, validated.
pub(crate) struct CommandFields {
    /// Command name.
    pub name: String,
    /// Arguments as JSON text (within the protocol's limit).
    pub args_text: String,
    /// Result timeout (more than 0).
    pub timeout: Duration,
    /// Time it waits for an offline device (more than 0).
    pub ttl: Duration,
}

/// Reads and checks a command's name (from field `name_field`), `args`, `timeout` and
/// `ttl` in a request body.
///
/// # Errors
/// 400 for a bad name, duration or a zero one; 413 for arguments over the protocol limit.
pub(crate) fn command_fields(body: &Value, name_field: &str) -> Result<CommandFields, ApiError> {
    let name = body.get(name_field).and_then(Value::as_str).unwrap_or("");
    if !is_valid_name(name, MAX_COMMAND_NAME_LEN) {
        return Err(ApiError::bad_request(format!(
            "`{name_field}` must be 1-{MAX_COMMAND_NAME_LEN} characters of [A-Za-z0-9_.:/-], got `{name}`"
        )));
    }
    let args = body.get("args").cloned().unwrap_or_else(|| json!({}));
    let args_text = args.to_string();
    if args_text.len() > MAX_ARGS_LEN {
        return Err(ApiError::status(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "`args` is {} bytes as JSON; the protocol allows {MAX_ARGS_LEN}",
                args_text.len()
            ),
        ));
    }
    let timeout = duration_value("timeout", body.get("timeout"), DEFAULT_TIMEOUT)?;
    let ttl = duration_value("ttl", body.get("ttl"), DEFAULT_TTL)?;
    for (field, value) in [("timeout", timeout), ("ttl", ttl)] {
        // Zero would close the command before the device could have it.
        if value.is_zero() {
            return Err(ApiError::bad_request(format!(
                "`{field}` must be longer than 0 (examples: 500ms, 30s, 1h)"
            )));
        }
    }
    Ok(CommandFields {
        name: name.to_string(),
        args_text,
        timeout,
        ttl,
    })
}

/// `POST /api/v1/devices/{id}/commands[?wait=30s]` with `{"name", "args"?, "timeout"?,
/// "ttl"?}`. With `wait`, and the device online, the answer comes once the command is
/// final or `wait` has passed (at most 5 min), with the command as it is then: one round
/// trip for a call that wants the device's result (a direct method, in other hubs' words).
///
/// Cancel safety: if the client goes away mid-request the command may still be created (see `Ledger::create`).
pub async fn create_command(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let wait = wait_param(&params)?;
    let body = json_body(&body, "{\"name\": \"reboot\", \"args\": {}}")?;
    let CommandFields {
        name,
        args_text,
        timeout,
        ttl,
    } = command_fields(&body, "name")?;
    // A device connected here is registered, or is being recorded as its first connection
    // with a valid token starts (which registers it), so only a device that is not
    // connected here needs the look-up, a trip to a blocking thread.
    let connected_here = state.ctx.presence.get(&id).is_some();
    if !connected_here {
        known_device(&state, &id).await?;
    }
    // A caller that waits for the result of a command to a device connected here gets
    // only the result, never "queued", so its command goes out before its creation is on
    // disk (see `Durability::Visible`); any other answer waits for the disk.
    let durability = if wait.is_some() && connected_here {
        Durability::Visible
    } else {
        Durability::OnDisk
    };
    // Subscribed before the command exists: its result can come before `create` returns.
    let events = wait.map(|_| state.ctx.ledger.subscribe());
    let record = state
        .ctx
        .ledger
        .create(&id, &name, &args_text, timeout, ttl, None, durability)
        .await?;
    let online = match &state.ctx.cluster {
        _ if state.ctx.presence.get(&id).is_some() => true,
        Some(cluster) => cluster
            .owner(&id)
            .await
            .map(|o| o.is_some())
            .unwrap_or(false),
        None => false,
    };
    let record = match (wait, events) {
        (Some(wait), Some(events)) if online => state
            .ctx
            .ledger
            .wait_from(events, Some(record.clone()), wait)
            .await?
            .unwrap_or(record),
        _ => record,
    };
    if durability == Durability::Visible && !record.state.is_final() {
        // No result within the wait: the answer says the command exists, so it must.
        state.ctx.ledger.sync().await?;
    }
    let mut value = serde_json::to_value(record).unwrap_or(Value::Null);
    value["device_online"] = Value::Bool(online);
    Ok((StatusCode::CREATED, Json(value)).into_response())
}

/// `GET /api/v1/devices/{id}/commands?limit=N`
///
/// Cancel safety: axum drops the future when the client goes away; safe, it only reads.
pub async fn list_commands(
    State(state): State<ApiState>,
    Path(id): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let limit = history_limit(&params, 100)?;
    known_device(&state, &id).await?;
    let commands = state.ctx.ledger.list(&id, limit).await?;
    Ok(Json(json!({ "commands": commands })))
}

/// The `limit` of a history request (`default` without one), within 1 to 10,000.
fn history_limit(params: &HashMap<String, String>, default: usize) -> Result<usize, ApiError> {
    let limit = match params.get("limit") {
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request("`limit` must be a whole number"))?,
        None => default,
    };
    Ok(limit.clamp(1, 10_000))
}

fn command_id(raw: &str) -> Result<u64, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::bad_request(format!("`{raw}` is not a command id (a number)")))
}

/// `GET /api/v1/commands/{id}?wait=DUR`: with `wait`, holds the request until the
/// command is final or the wait is over.
///
/// Cancel safety: safe; a long poll that is dropped only stops waiting.
pub async fn get_command(
    State(state): State<ApiState>,
    Path(raw): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let id = command_id(&raw)?;
    let record = match wait_param(&params)? {
        Some(wait) => state.ctx.ledger.wait(id, wait).await?,
        None => state.ctx.ledger.get(id).await?,
    };
    let record = record.ok_or_else(|| ApiError::not_found(format!("no command {id}")))?;
    Ok(Json(serde_json::to_value(record).unwrap_or(Value::Null)))
}

/// The `wait` query parameter of a long poll: `None` when absent or zero, at most
/// [`MAX_WAIT`].
fn wait_param(params: &HashMap<String, String>) -> Result<Option<Duration>, ApiError> {
    let Some(w) = params.get("wait") else {
        return Ok(None);
    };
    let wait = humantime::parse_duration(w).map_err(|_| {
        ApiError::bad_request(format!("`wait`: `{w}` is not a duration (example: 30s)"))
    })?;
    Ok(Some(wait.min(MAX_WAIT)).filter(|w| !w.is_zero()))
}

/// `POST /api/v1/commands/{id}/cancel`
pub async fn cancel_command(
    State(state): State<ApiState>,
    Path(raw): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let id = command_id(&raw)?;
    match state.ctx.ledger.cancel(id).await? {
        Ok(record) => Ok(Json(serde_json::to_value(record).unwrap_or(Value::Null))),
        Err(CancelRefused::NotFound) => Err(ApiError::not_found(format!("no command {id}"))),
        Err(CancelRefused::AlreadyFinal(st)) => Err(ApiError::status(
            StatusCode::CONFLICT,
            format!(
                "command {id} is already {}; only queued, sent or acked commands can be cancelled",
                st.as_str()
            ),
        )),
    }
}

/// `POST /api/v1/tokens` with `{"device_id": "d1"}` or `{"device_ids": [...]}`, and
/// optional `"ttl"` (default 365 days). Each token comes with its `expires_at`, in ms
/// since the epoch like every time in the API (whole seconds: tokens carry seconds).
///
/// Cancel safety: safe; a token is computed, not stored, and registering the device again is idempotent.
pub async fn issue_tokens(
    State(state): State<ApiState>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let body = json_body(&body, "{\"device_id\": \"sensor-1\", \"ttl\": \"30d\"}")?;
    let ttl = duration_value("ttl", body.get("ttl"), Duration::from_secs(365 * 86_400))?;
    if ttl < Duration::from_secs(1) {
        // Tokens count in whole seconds: a shorter one would be born expired.
        return Err(ApiError::bad_request(
            "`ttl`: a token must live at least 1s (examples: 12h, 30d)",
        ));
    }
    let single = body
        .get("device_id")
        .and_then(Value::as_str)
        .map(|s| vec![s.to_string()]);
    let many = body.get("device_ids").and_then(Value::as_array).map(|a| {
        a.iter()
            .map(|v| v.as_str().unwrap_or("").to_string())
            .collect::<Vec<_>>()
    });
    let ids = single
        .or(many)
        .ok_or_else(|| ApiError::bad_request("give `device_id` or `device_ids`"))?;
    if ids.len() > MAX_TOKENS_PER_REQUEST {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_TOKENS_PER_REQUEST} tokens per request"
        )));
    }
    if let Some(bad) = ids.iter().find(|id| !is_valid_device_id(id)) {
        return Err(ApiError::bad_request(format!(
            "invalid device id `{bad}`: use letters, digits, '_', '.', '-' (at most 64)"
        )));
    }
    let now = now_ms();
    // A token for an id the hub does not know registers it.
    let meta = state.ctx.meta.clone();
    let register: Vec<(String, std::collections::BTreeMap<String, String>)> = ids
        .iter()
        .map(|id| (id.clone(), Default::default()))
        .collect();
    blocking(move || meta.register(&register, now)).await?;
    let expires_at = (now / 1000 + ttl.as_secs()) * 1000;
    let tokens: Vec<Value> = ids
        .iter()
        .map(|id| json!({"device_id": id, "token": state.ctx.auth.issue(id, now, ttl.as_secs()), "expires_at": expires_at}))
        .collect();
    if tokens.len() == 1 && body.get("device_id").is_some() {
        return Ok(Json(tokens.into_iter().next().unwrap_or(Value::Null)));
    }
    Ok(Json(json!({ "tokens": tokens })))
}

/// `POST /api/v1/tokens/revoke` with `{"device_id": "d1"}`: every token of the device
/// issued until now stops working, and its live session is closed with 1008.
///
/// Cancel safety: if the client goes away mid-request the revocation may still take effect; repeating it is harmless.
pub async fn revoke_token(
    State(state): State<ApiState>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let body = json_body(&body, "{\"device_id\": \"sensor-1\"}")?;
    let id = body
        .get("device_id")
        .and_then(Value::as_str)
        .filter(|id| is_valid_device_id(id))
        .ok_or_else(|| {
            ApiError::bad_request("send {\"device_id\": \"...\"} with a valid device id")
        })?
        .to_string();
    let now = now_ms();
    revoke(&state, &id, now).await?;
    Ok(Json(json!({"device_id": id, "revoked_before": now})))
}

/// Revokes every token of `id` issued until `now` and applies it at once: the device's
/// live session, on this node or (through the shared store) any other, is closed with 1008.
///
/// # Errors
/// The store failed.
pub(crate) async fn revoke(state: &ApiState, id: &str, now: u64) -> Result<(), ApiError> {
    let meta = state.ctx.meta.clone();
    let key = id.to_string();
    blocking(move || meta.revoke(&key, now)).await?;
    state
        .ctx
        .auth
        .refresh(&state.ctx.meta, &state.ctx.presence)
        .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, online: bool, last_seen: u64, rtt_us: Option<u64>) -> DeviceRecord {
        DeviceRecord {
            id: id.to_string(),
            online,
            last_seen,
            rtt_us,
            ..DeviceRecord::default()
        }
    }

    fn ids(records: &[DeviceRecord]) -> Vec<&str> {
        records.iter().map(|r| r.id.as_str()).collect()
    }

    #[test]
    fn device_lists_sort_by_the_key_then_by_id_either_way() {
        let mut list = vec![
            record("c", true, 5, Some(900)),
            record("a", false, 5, None),
            record("b", true, 1, Some(100)),
        ];
        let sorted = |order: &str, list: &mut Vec<DeviceRecord>| {
            DeviceOrder::parse(order).expect("order").sort(list);
            ids(list).join("")
        };
        assert_eq!(sorted("id", &mut list), "abc");
        assert_eq!(sorted("-id", &mut list), "cba");
        assert_eq!(sorted("last_seen", &mut list), "bac");
        assert_eq!(sorted("-online", &mut list), "cba");
        assert_eq!(sorted("online", &mut list), "abc");
        assert_eq!(sorted("rtt", &mut list), "abc");
        assert!(DeviceOrder::parse("colour").is_err());
    }

    #[test]
    fn presence_counts_tell_never_connected_from_offline() {
        let mut counts = PresenceCounts::default();
        let mut seen = record("a", false, 5, None);
        seen.first_seen = 3;
        counts.add(&seen);
        counts.add(&record("b", false, 0, None));
        counts.add(&record("c", true, 9, None));
        assert_eq!(
            (counts.online, counts.offline, counts.never_connected),
            (1, 1, 1)
        );
    }
}

//! Routes for telemetry queries and the live event stream (Server-Sent Events).

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use futures_util::Stream;
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use super::{blocking, ApiError, ApiState};
use crate::events::HubEvent;
use crate::store::now_ms;
use crate::store::query::{Aggregate, Query as TelemetryQuery};

/// Rows returned when no `limit` is given.
pub const DEFAULT_LIMIT: usize = 1_000;
/// Most rows one query may return.
pub const MAX_LIMIT: usize = 100_000;

/// Parses a time: ms since the epoch, or RFC 3339 (`2026-11-25T08:00:00Z`).
pub(crate) fn parse_time(field: &str, raw: &str) -> Result<u64, ApiError> {
    if let Ok(ms) = raw.parse::<u64>() {
        return Ok(ms);
    }
    humantime::parse_rfc3339_weak(raw)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .ok_or_else(|| ApiError::bad_request(format!("`{field}`: `{raw}` is neither ms since the epoch nor RFC 3339 (2026-11-25T08:00:00Z)")))
}

fn parse_duration(field: &str, raw: &str) -> Result<Duration, ApiError> {
    humantime::parse_duration(raw).map_err(|_| {
        ApiError::bad_request(format!(
            "`{field}`: `{raw}` is not a duration (examples: 10s, 5m, 1h)"
        ))
    })
}

/// `GET /api/v1/devices/{id}/telemetry?metric=&since=|from=&until=&every=&agg=&limit=`
///
/// Cancel safety: axum drops the future when the client goes away; safe, it only reads.
pub async fn query(
    State(state): State<ApiState>,
    Path(device): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let now = now_ms();
    let (from, until) = match (params.get("since"), params.get("from"), params.get("until")) {
        (Some(_), Some(_), _) => {
            return Err(ApiError::bad_request(
                "give either `since` or `from`/`until`, not both",
            ))
        }
        (Some(since), None, until) => {
            let until = until
                .map(|u| parse_time("until", u))
                .transpose()?
                .unwrap_or(now + 1);
            (
                until.saturating_sub(parse_duration("since", since)?.as_millis() as u64),
                until,
            )
        }
        (None, from, until) => (
            from.map(|f| parse_time("from", f))
                .transpose()?
                .unwrap_or(now.saturating_sub(3_600_000)),
            until
                .map(|u| parse_time("until", u))
                .transpose()?
                .unwrap_or(now + 1),
        ),
    };
    if from >= until {
        return Err(ApiError::bad_request(
            "the range is empty: `from` must be before `until`",
        ));
    }
    let window = match (params.get("every"), params.get("agg")) {
        (None, None) => None,
        (Some(every), agg) => {
            let every = parse_duration("every", every)?.as_millis() as u64;
            if every == 0 {
                return Err(ApiError::bad_request("`every` must be at least 1ms"));
            }
            let agg = match agg {
                Some(a) => Aggregate::parse(a).ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "`agg`: `{a}` is not one of mean, min, max, sum, count, last"
                    ))
                })?,
                None => Aggregate::Mean,
            };
            Some((every, agg))
        }
        (None, Some(_)) => {
            return Err(ApiError::bad_request(
                "`agg` needs `every` (the window length)",
            ))
        }
    };
    let limit = match params.get("limit") {
        Some(l) => l
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request("`limit` must be a whole number"))?,
        None => DEFAULT_LIMIT,
    };
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad_request(format!(
            "`limit` must be between 1 and {MAX_LIMIT}"
        )));
    }
    // A misspelt id should say so, not answer with an empty result.
    super::devices::known_device(&state, &device).await?;
    let q = TelemetryQuery {
        device: device.clone(),
        metric: params.get("metric").cloned(),
        from,
        until,
        window,
        limit,
    };
    let store = state.query.clone();
    let q2 = q.clone();
    let (rows, truncated) = blocking(move || store.query(&q2)).await?;
    Ok(Json(json!({
        "device": device,
        "metric": q.metric,
        "from": from,
        "until": until,
        "every_ms": window.map(|(e, _)| e),
        "agg": window.map(|(_, a)| a),
        "rows": rows,
        "truncated": truncated,
    })))
}

/// `GET /api/v1/events?device=ID&readings=true`: presence and command events (and
/// readings when asked) as Server-Sent Events, until the client goes away. A subscriber
/// that falls behind gets a `lagged` event saying how many events it missed.
///
/// Cancel safety: safe; dropping the stream unsubscribes from the event bus.
pub async fn events(
    State(state): State<ApiState>,
    Query(params): Query<HashMap<String, String>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let device = params.get("device").cloned();
    let readings = params
        .get("readings")
        .is_some_and(|v| v == "true" || v == "1");
    let interest = readings.then(|| state.ctx.events.want_readings());
    let rx = state.ctx.events.subscribe();
    let stop = state.ctx.shutdown.clone();
    let stream = futures_util::stream::unfold(
        (rx, interest, device, readings, stop),
        |(mut rx, interest, device, readings, mut stop)| async move {
            loop {
                // The stream ends when the hub shuts down, so clients see the end at once.
                let received = tokio::select! {
                    _ = crate::stopping(&mut stop) => return None,
                    r = rx.recv() => r,
                };
                let event = match received {
                    Ok(ev) => ev,
                    Err(RecvError::Lagged(n)) => {
                        let ev = Event::default()
                            .event("lagged")
                            .data(json!({"type": "lagged", "missed": n}).to_string());
                        return Some((Ok(ev), (rx, interest, device, readings, stop)));
                    }
                    Err(RecvError::Closed) => return None,
                };
                if device.as_deref().is_some_and(|d| d != event.device()) {
                    continue;
                }
                let name = match &event {
                    HubEvent::Presence { .. } => "presence",
                    HubEvent::Command { .. } => "command",
                    HubEvent::State { .. } => "state",
                    HubEvent::Readings { .. } if readings => "readings",
                    HubEvent::Readings { .. } => continue,
                };
                let data = serde_json::to_string(&event).unwrap_or_default();
                return Some((
                    Ok(Event::default().event(name).data(data)),
                    (rx, interest, device, readings, stop),
                ));
            }
        },
    );
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

//! Routes for telemetry queries and the live event stream (Server-Sent Events).

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use futures_util::{Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::broadcast::error::RecvError;

use super::{blocking, ApiError, ApiState};
use crate::events::{EventId, Gap, HubEvent, Numbered};
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

/// How soon a browser's EventSource reconnects after its stream broke (sent as `retry:`
/// with the stream's first event; browsers wait about 3 s otherwise).
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// The header a reconnecting event-stream client sends with the last id it saw.
const LAST_EVENT_ID: &str = "last-event-id";

/// `GET /api/v1/events?device=ID&readings=true&last_event_id=ID`: presence and command events (and
/// readings when asked) as Server-Sent Events, until the client goes away or the hub
/// shuts down. A subscriber that falls behind gets a `lagged` event saying how many
/// events it missed.
///
/// Presence and command events carry an `id:` line. A client that reconnects with the
/// last one in `Last-Event-ID` gets the events it missed first (as far as the hub still
/// keeps them), and a `lagged` event for the rest; after a restart of the hub that is
/// everything the new run kept, and a `lagged` event whose `missed` is null (unknown).
/// `last_event_id` does the same for a new stream (the header wins when both are given).
/// A new stream starts with an event that has only an `id:` line (the hub's current
/// position), so that even a client that saw no event yet can resume, and a `retry:` line
/// that asks browsers to reconnect after a second.
///
/// # Errors
/// 400 for an invalid device id or `Last-Event-ID`; 404 for a device that never connected.
///
/// Cancel safety: safe; dropping the stream unsubscribes from the event bus.
pub async fn events(
    State(state): State<ApiState>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let device = params.get("device").cloned();
    if let Some(d) = &device {
        // A misspelt id should say so, not wait forever for events that never come.
        super::devices::known_device(&state, d).await?;
    }
    // The header wins: a browser's EventSource sends it, with the newest id, when it
    // reconnects on its own; the query parameter is for a client that opens a new stream
    // (an EventSource cannot set headers).
    let raw_resume = match headers.get(LAST_EVENT_ID) {
        Some(raw) => Some(raw.to_str().unwrap_or("(not text)")),
        None => params.get("last_event_id").map(String::as_str),
    };
    let resume_after = match raw_resume {
        None => None,
        Some(raw) => Some(raw.parse::<EventId>().map_err(|_| {
            ApiError::bad_request(
                "`Last-Event-ID` (or `last_event_id`) must be an id from this stream's `id:` lines",
            )
        })?),
    };
    let filter = Filter {
        device,
        readings: params
            .get("readings")
            .is_some_and(|v| v == "true" || v == "1"),
    };
    let interest = filter.readings.then(|| state.ctx.events.want_readings());
    let bus = &state.ctx.events;
    let mut first: Vec<Event> = Vec::new();
    let subscription = match resume_after {
        None => {
            let (subscription, position) = bus.subscribe_at();
            first.push(
                Event::default()
                    .id(position.to_string())
                    .retry(RECONNECT_AFTER),
            );
            subscription
        }
        Some(after) => {
            let (subscription, resumed) = bus.resume(after);
            match resumed.gap {
                Some(Gap::Missed(n)) => first.push(lagged(Some(n), "the hub no longer keeps them")),
                Some(Gap::OtherRun) => first.push(lagged(
                    None,
                    "the last event id is from before the hub restarted: events until the restart are not known",
                )),
                None => {}
            }
            first.extend(resumed.replay.iter().filter_map(|n| filter.event(n)));
            // The client's position moves to where its subscription starts, even when
            // this stream wants none of the events in between (or none is known).
            first.push(
                Event::default()
                    .id(resumed.position.to_string())
                    .retry(RECONNECT_AFTER),
            );
            subscription
        }
    };
    let stop = state.ctx.shutdown.clone();
    let live = futures_util::stream::unfold(
        (subscription, interest, filter, stop),
        |(mut rx, interest, filter, mut stop)| async move {
            loop {
                // The stream ends when the hub shuts down, so clients see the end at once.
                let received = tokio::select! {
                    _ = crate::stopping(&mut stop) => return None,
                    r = rx.recv_numbered() => r,
                };
                let numbered = match received {
                    Ok(n) => n,
                    Err(RecvError::Lagged(n)) => {
                        let ev = lagged(Some(n), "this client fell behind");
                        return Some((Ok(ev), (rx, interest, filter, stop)));
                    }
                    Err(RecvError::Closed) => return None,
                };
                if let Some(ev) = filter.event(&numbered) {
                    return Some((Ok(ev), (rx, interest, filter, stop)));
                }
            }
        },
    );
    let stream = futures_util::stream::iter(first.into_iter().map(Ok)).chain(live);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// Which events one stream wants.
struct Filter {
    /// Only this device's.
    device: Option<String>,
    /// Readings too.
    readings: bool,
}

impl Filter {
    /// The SSE event for `numbered`, or `None` when this stream does not want it.
    fn event(&self, numbered: &Numbered) -> Option<Event> {
        let event = &numbered.event;
        if self
            .device
            .as_deref()
            .is_some_and(|d| Some(d) != event.device())
        {
            return None;
        }
        let name = match event {
            HubEvent::Presence { .. } => "presence",
            HubEvent::Command { .. } => "command",
            HubEvent::State { .. } => "state",
            HubEvent::Job { .. } => "job",
            HubEvent::Firmware { .. } => "firmware",
            HubEvent::Rollout { .. } => "rollout",
            HubEvent::Readings { .. } if self.readings => "readings",
            HubEvent::Readings { .. } => return None,
        };
        let data = match event {
            HubEvent::Presence {
                device,
                online,
                cause,
                at_ms,
            } => json!({
                "type": "presence",
                "device": device,
                "online": online,
                "cause": super::devices::cause_name(cause),
                "at_ms": at_ms,
            })
            .to_string(),
            other => serde_json::to_string(other).unwrap_or_default(),
        };
        let sse = Event::default().event(name).data(data);
        Some(match numbered.id {
            Some(id) => sse.id(id.to_string()),
            None => sse,
        })
    }
}

/// A `lagged` event: `missed` events are lost to this stream (null: not known how many).
fn lagged(missed: Option<u64>, why: &str) -> Event {
    Event::default()
        .event("lagged")
        .data(json!({"type": "lagged", "missed": missed, "why": why}).to_string())
}

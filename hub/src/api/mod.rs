//! The admin HTTP API (axum): devices, tokens, commands, telemetry queries, the event
//! stream (SSE), health and Prometheus metrics, and the web console (`console.rs`) at `/`.
//! Every route except `/healthz`, `/readyz` and the console's own files and sign-in
//! requires `Authorization: Bearer <admin token>` or a console session cookie
//! ([`require_admin`] is the one place that decides). Errors are JSON:
//! `{"error": {"status": 404, "message": "..."}}`, with a message that says what to do.

mod certs;
mod cluster;
pub mod console;
mod devices;
mod firmware;
mod fleet;
mod jobs;
mod rollouts;
mod state;
mod telemetry;

use std::sync::{Arc, OnceLock};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use subtle::ConstantTimeEq;

use crate::device::DeviceContext;
use crate::ledger::LedgerError;
use crate::store::query::TelemetryQuery;
use crate::store::StoreError;

/// What every handler can reach.
#[derive(Clone)]
pub struct ApiState {
    /// The device side (presence, ledger, events, auth, meta store).
    pub ctx: Arc<DeviceContext>,
    /// Jobs over many devices.
    pub jobs: crate::jobs::Jobs,
    /// Becomes true at shutdown (job runners started by a request stop with it).
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Telemetry reads.
    pub query: Arc<dyn TelemetryQuery>,
    /// The admin bearer token.
    pub admin_token: Arc<str>,
    /// Prometheus rendering.
    pub metrics: PrometheusHandle,
    /// The CA that issues device client certificates (`None` with `device.plain_ws`).
    pub device_ca: Option<Arc<crate::client_cert::DeviceCa>>,
    /// Web console sessions.
    pub console: Arc<console::ConsoleSessions>,
}

/// An API error: a status and a message that says what to do.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    /// 400 with a message.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
    /// 404 with a message.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }
    /// Any status with a message.
    pub fn status(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            serde_json::json!({"error": {"status": self.status.as_u16(), "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> ApiError {
        if let StoreError::Refused(why) = &err {
            tracing::warn!(error = %why, "the store refused a request from the admin API");
            return ApiError::status(
                StatusCode::BAD_GATEWAY,
                format!("the telemetry store refused the request: {why}"),
            );
        }
        tracing::error!(error = %err, "store error in the admin API");
        ApiError::status(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store unavailable: {err}; retry later"),
        )
    }
}

impl From<LedgerError> for ApiError {
    fn from(err: LedgerError) -> ApiError {
        tracing::error!(error = %err, "ledger error in the admin API");
        ApiError::status(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("command ledger unavailable: {err}; retry later"),
        )
    }
}

/// Runs blocking store work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    off_thread(f).await
}

/// Runs blocking work whose errors the API knows off the async threads.
pub(crate) async fn off_thread<T: Send + 'static, E: Into<ApiError> + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| {
            ApiError::status(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("internal error: {e}"),
            )
        })?
        .map_err(Into::into)
}

/// The process-wide Prometheus recorder (installed once; later hubs in the same process,
/// as in tests, share it).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed; then metrics go there.
            let _ = metrics::set_global_recorder(recorder);
            register_metrics();
            handle
        })
        .clone()
}

/// Every metric the hub exports, with its help text. Registering them at start-up makes
/// `/metrics` show each one (at zero) before anything has happened.
const METRICS: &[(&str, &str)] = &[
    ("hub_connections", "device connections open now (gauge)"),
    (
        "hub_devices_online",
        "devices with a session on this hub (gauge)",
    ),
    (
        "hub_frames_in_total",
        "WebSocket frames received from devices",
    ),
    ("hub_frames_out_total", "WebSocket frames sent to devices"),
    ("hub_bytes_in_total", "payload bytes received from devices"),
    ("hub_bytes_out_total", "payload bytes sent to devices"),
    (
        "hub_readings_received_total",
        "readings received (before storage)",
    ),
    (
        "hub_readings_stored_total",
        "readings durably stored; rate() gives readings stored per second",
    ),
    (
        "hub_batches_duplicate_total",
        "re-sent batches recognised as already stored",
    ),
    (
        "hub_store_commit_seconds",
        "latency of one telemetry group commit",
    ),
    (
        "hub_store_commit_errors_total",
        "failed commit attempts (retried)",
    ),
    (
        "hub_store_commit_failures_total",
        "commits that failed for good (connections closed with 1011)",
    ),
    (
        "hub_sqlite_wal_frames",
        "pages in the database's WAL not yet copied into the database file (gauge)",
    ),
    (
        "hub_sqlite_wal_restarts_total",
        "checkpoints that waited for a moment without writers to start the WAL over",
    ),
    (
        "hub_ingest_queue_batches",
        "batches waiting for the writer (gauge)",
    ),
    ("hub_commands", "commands in the ledger by state (gauge)"),
    ("hub_jobs", "jobs by state, of the newest 1,000 (gauge)"),
    ("hub_jobs_created_total", "jobs created here"),
    (
        "hub_job_commands_created_total",
        "commands created by job runners here",
    ),
    (
        "hub_command_transitions_total",
        "command state changes by new state",
    ),
    ("hub_ping_rtt_seconds", "WebSocket ping round trip"),
    (
        "hub_liveness_timeouts_total",
        "devices declared offline for not answering pings",
    ),
    (
        "hub_auth_failures_total",
        "upgrades refused for a bad token",
    ),
    ("hub_tls_failures_total", "failed TLS handshakes"),
    (
        "hub_tls_handshakes_total",
        "completed TLS handshakes, by kind: full, or resumed with a session ticket",
    ),
    (
        "hub_handshakes_timed_out_total",
        "handshakes that exceeded device.handshake_timeout",
    ),
    (
        "hub_spool_bytes",
        "bytes waiting in the InfluxDB disk spool (gauge)",
    ),
    (
        "hub_spool_records",
        "group commits waiting in the InfluxDB disk spool (gauge)",
    ),
    (
        "hub_spool_appends_total",
        "group commits written to the spool because InfluxDB was unavailable",
    ),
    (
        "hub_spool_drained_records_total",
        "spooled group commits InfluxDB has since accepted",
    ),
    (
        "hub_spool_full_total",
        "commits refused because the spool was full (devices closed with 1011)",
    ),
    (
        "hub_influx_writes_total",
        "write requests to InfluxDB, by result (shown once one happened)",
    ),
    ("hub_influx_write_seconds", "latency of one InfluxDB write"),
    (
        "hub_influx_points_dropped_total",
        "readings InfluxDB cannot hold (timestamps after 2262)",
    ),
    (
        "hub_backplane_errors_total",
        "failed Redis backplane operations",
    ),
    (
        "hub_events_forward_dropped_total",
        "events not forwarded to the cluster because the queue was full",
    ),
    (
        "hub_cluster_detached",
        "1 while this node cannot reach Redis and has given its devices up (gauge)",
    ),
    (
        "hub_cluster_moves_total",
        "devices asked to reconnect to another node (close 4010: rebalancing, or the backplane lost)",
    ),
    (
        "hub_cluster_reasserted_total",
        "devices this node claimed again after the cluster had counted them offline (a stall, a partition, a Redis restart)",
    ),
    (
        "hub_cluster_reaped_total",
        "devices of dead nodes this node took offline",
    ),
    (
        "hub_handshakes_refused_source_total",
        "TCP connections dropped because their source address held device.max_handshakes_per_source",
    ),
    (
        "hub_firmware_bytes_sent_total",
        "firmware image bytes sent to devices (chunk payloads)",
    ),
    (
        "hub_firmware_cap_wait_seconds",
        "how long each firmware chunk waited for firmware.max_transfer_rate before it was read and sent",
    ),
    ("hub_rollouts", "rollouts by state, of the newest 1,000 (gauge)"),
    ("hub_rollouts_started_total", "rollouts started here"),
    (
        "hub_firmware_updates_total",
        "firmware update stage changes by new stage (offered, downloading, ..., rolled_back)",
    ),
    (
        "hub_handshakes_idle_total",
        "TCP connections closed because they sent nothing within device.first_byte_timeout",
    ),
];

/// Metrics that carry labels: described, but not shown at zero without them.
const LABELLED: &[&str] = &[
    "hub_sqlite_wal_frames",
    "hub_sqlite_wal_restarts_total",
    "hub_rollouts",
    "hub_firmware_updates_total",
    "hub_influx_writes_total",
    "hub_command_transitions_total",
    "hub_commands",
];

/// Describes every metric and makes it visible at zero.
pub fn register_metrics() {
    for (name, help) in METRICS {
        if LABELLED.contains(name) {
            if name.ends_with("_total") {
                metrics::describe_counter!(*name, *help);
            } else {
                metrics::describe_gauge!(*name, *help);
            }
            continue;
        }
        if name.ends_with("_total") {
            metrics::describe_counter!(*name, *help);
            metrics::counter!(*name).absolute(0);
        } else if name.ends_with("_seconds") {
            metrics::describe_histogram!(*name, *help);
        } else {
            metrics::describe_gauge!(*name, *help);
            metrics::gauge!(*name).set(0.0);
        }
    }
}

/// Builds the API router.
pub fn router(state: ApiState) -> Router {
    let protected =
        Router::new()
            .route("/metrics", get(prometheus))
            .route("/api/v1/devices", get(devices::list).post(fleet::register))
            .route(
                "/api/v1/devices/{id}",
                get(devices::show).delete(fleet::remove),
            )
            .route("/api/v1/devices/{id}/tags", patch(fleet::tag))
            .route("/api/v1/devices/{id}/certificate", post(certs::issue))
            .route(
                "/api/v1/devices/{id}/state",
                get(state::show).patch(state::patch),
            )
            .route("/api/v1/state", patch(state::patch_selected))
            .route(
                "/api/v1/devices/{id}/commands",
                post(devices::create_command).get(devices::list_commands),
            )
            .route("/api/v1/devices/{id}/telemetry", get(telemetry::query))
            .route(
                "/api/v1/devices/{id}/presence",
                get(devices::presence_history),
            )
            .route("/api/v1/commands/{id}", get(devices::get_command))
            .route("/api/v1/jobs", get(jobs::list).post(jobs::create))
            .route("/api/v1/jobs/{id}", get(jobs::show))
            .route("/api/v1/jobs/{id}/cancel", post(jobs::cancel))
            .route(
                "/api/v1/commands/{id}/cancel",
                post(devices::cancel_command),
            )
            .route("/api/v1/tokens", post(devices::issue_tokens))
            .route("/api/v1/tokens/revoke", post(devices::revoke_token))
            .route("/api/v1/events", get(telemetry::events))
            .route(
                "/api/v1/firmware",
                get(firmware::list).post(firmware::add).layer(
                    axum::extract::DefaultBodyLimit::max(crate::firmware::MAX_IMAGE_BYTES as usize),
                ),
            )
            .route(
                "/api/v1/firmware/{version}",
                get(firmware::show).delete(firmware::remove),
            )
            .route(
                "/api/v1/devices/{id}/firmware",
                get(firmware::device_update).post(firmware::offer),
            )
            .route("/api/v1/updates", get(firmware::updates))
            .route(
                "/api/v1/rollouts",
                get(rollouts::list).post(rollouts::start),
            )
            .route("/api/v1/rollouts/{id}", get(rollouts::show))
            .route("/api/v1/rollouts/{id}/pause", post(rollouts::pause))
            .route("/api/v1/rollouts/{id}/resume", post(rollouts::resume))
            .route("/api/v1/rollouts/{id}/abort", post(rollouts::abort))
            .route("/api/v1/cluster", get(cluster::status))
            .route("/api/v1/cluster/rebalance", post(cluster::rebalance))
            .route("/api/v1/console/links", post(console::create_link))
            .route_layer(middleware::from_fn_with_state(state.clone(), require_admin));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/", get(console::index))
        .route("/console/{*file}", get(console::file))
        .route(
            "/console/login",
            get(console::login_link).post(console::login),
        )
        .route("/console/logout", post(console::logout))
        .route("/console/session", get(console::session))
        .merge(protected)
        .fallback(|| async {
            ApiError::not_found(
                "no such route; the API lives under /api/v1 (see README: Admin API)",
            )
        })
        .with_state(state)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::map_response(json_errors))
}

/// Largest request body the API reads.
const MAX_BODY: usize = 1024 * 1024;

/// Gives axum's own refusals (body too large, unreadable body...) the API's JSON error
/// shape, so clients parse one format.
async fn json_errors(resp: Response) -> Response {
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if resp.status().as_u16() < 400 || is_json {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let message = String::from_utf8_lossy(&text).trim().to_string();
    let message = match parts.status {
        StatusCode::PAYLOAD_TOO_LARGE => {
            format!("{message}: request bodies are limited to {MAX_BODY} bytes")
        }
        _ => message,
    };
    ApiError::status(parts.status, message).into_response()
}

/// Lets a request through with the admin bearer token, or with a console session cookie
/// that passes the cross-site checks (`console::ConsoleSessions::check`).
async fn require_admin(
    State(state): State<ApiState>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let ok =
        // Without an early exit, so response time does not reveal how much of a guessed
        // token was right.
        presented.is_some_and(|t| bool::from(t.as_bytes().ct_eq(state.admin_token.as_bytes())));
    if ok {
        return next.run(request).await;
    }
    if presented.is_none() {
        if let Some(session) = console::session_cookie(&headers) {
            return match state.console.check(session, request.method(), &headers) {
                Ok(()) => next.run(request).await,
                Err(why) => console::refusal(why).into_response(),
            };
        }
    }
    let mut resp = ApiError::status(
        StatusCode::UNAUTHORIZED,
        "missing or wrong admin token: send `Authorization: Bearer <token>` with the token from DATA_DIR/admin-token",
    )
    .into_response();
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    resp
}

async fn readyz(State(state): State<ApiState>) -> Response {
    if *state.ctx.shutdown.borrow() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    if state.ctx.ingest.is_stopped() {
        return (StatusCode::SERVICE_UNAVAILABLE, "ingest writer stopped\n").into_response();
    }
    if state.ctx.ingest.is_failing() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "telemetry store failing commits (disk full? database down?); see the log\n",
        )
            .into_response();
    }
    let meta = state.ctx.meta.clone();
    match blocking(move || meta.ping()).await {
        Ok(()) => "ready\n".into_response(),
        Err(_) => (StatusCode::SERVICE_UNAVAILABLE, "store unavailable\n").into_response(),
    }
}

/// How long a `/metrics` scrape waits for the gauges counted in the store.
const STORE_GAUGES_WAIT: std::time::Duration = std::time::Duration::from_millis(250);

async fn prometheus(State(state): State<ApiState>) -> Result<Response, ApiError> {
    metrics::gauge!("hub_devices_online").set(state.ctx.presence.len() as f64);
    metrics::gauge!("hub_ingest_queue_batches").set(state.ctx.ingest.queued() as f64);
    // The command and job gauges are counted in the store. When it is busy (a reconnect
    // storm queues a lookup per device ahead of these) the scrape does not wait: the
    // gauges keep their last values and the rest of the page is current.
    if let Ok(counts) = tokio::time::timeout(STORE_GAUGES_WAIT, state.ctx.ledger.counts()).await {
        let counts = counts?;
        for st in crate::store::ledger::CommandState::ALL {
            let n = counts
                .iter()
                .find(|(s, _)| *s == st)
                .map(|(_, n)| *n)
                .unwrap_or(0);
            metrics::gauge!("hub_commands", "state" => st.as_str()).set(n as f64);
        }
    }
    if let Ok(jobs) = tokio::time::timeout(STORE_GAUGES_WAIT, state.jobs.state_counts()).await {
        let jobs = jobs?;
        for st in crate::store::jobs::JobState::ALL {
            let n = jobs.get(&st).copied().unwrap_or(0);
            metrics::gauge!("hub_jobs", "state" => st.as_str()).set(n as f64);
        }
    }
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response())
}

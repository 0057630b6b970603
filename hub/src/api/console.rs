//! The web console the admin listener serves at `/`: its static files (compiled into the
//! binary), sign-in with the admin token or a one-time link from `hub console`, the session
//! cookie, and the cross-site request checks that a cookie needs and a bearer token does not.
//!
//! A browser signs in once and then calls the same `/api/v1` routes as the CLI, with the
//! cookie instead of `Authorization: Bearer`. Because a browser attaches the cookie to
//! requests that other sites make it send, a request authenticated by the cookie must come
//! from the console itself: an `Origin` header, when present, must be this listener's own;
//! and a state-changing request must carry the session's CSRF token in `X-CSRF-Token`,
//! which only a page of this origin can read (from `GET /console/session`). The cookie is
//! `HttpOnly` (no script reads it), `SameSite=Strict`, and `Secure` on a TLS listener.
//!
//! Sessions live in the hub's memory: a restart signs every browser out.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use super::{ApiError, ApiState};
use crate::store::now_ms;

/// The session cookie's name.
pub const COOKIE: &str = "hub_console";
/// The header a state-changing request made with the cookie carries the CSRF token in.
pub const CSRF_HEADER: &str = "x-csrf-token";
/// How long a console session lasts after sign-in.
pub const SESSION_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// How long a one-time sign-in link from `hub console` stays valid.
pub const LINK_LIFETIME: Duration = Duration::from_secs(10 * 60);
/// Most sessions kept at once; signing in beyond it ends the oldest.
const MAX_SESSIONS: usize = 256;
/// Most unused sign-in links kept at once; making one beyond it drops the oldest.
const MAX_LINKS: usize = 64;

/// The Content-Security-Policy of every console response: scripts, styles, images and
/// connections only from this origin, no inline script or style element, no framing.
pub const CSP: &str =
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// One file of the console.
struct Asset {
    /// Its name under `/console/`.
    name: &'static str,
    /// Its Content-Type.
    content_type: &'static str,
    /// Its bytes.
    body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $type:expr) => {
        Asset {
            name: $name,
            content_type: $type,
            body: include_bytes!(concat!("../../console/", $name)),
        }
    };
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// Every file of the console, compiled in. `index.html` is served at `/`.
const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("console.css", CSS),
    asset!("app.js", JS),
    asset!("api.js", JS),
    asset!("dom.js", JS),
    asset!("overview.js", JS),
    asset!("devices.js", JS),
    asset!("device.js", JS),
    asset!("jobs.js", JS),
    asset!("job.js", JS),
    asset!("rollouts.js", JS),
    asset!("rollout.js", JS),
    asset!("vendor/uPlot.iife.min.js", JS),
    asset!("vendor/uPlot.min.css", CSS),
    asset!("vendor/uPlot.LICENSE", "text/plain; charset=utf-8"),
];

/// The total size of the console's files, uncompressed (for the size check in the tests).
pub fn assets_size() -> usize {
    ASSETS.iter().map(|a| a.body.len()).sum()
}

/// A signed-in browser.
#[derive(Debug, Clone)]
struct Session {
    /// The token a state-changing request must repeat in `X-CSRF-Token`.
    csrf: String,
    /// When it was made, ms since the epoch (the oldest goes first when there are too many).
    created_ms: u64,
    /// When it ends, ms since the epoch.
    expires_ms: u64,
}

/// Console sessions and unused one-time sign-in links, in memory.
#[derive(Debug, Default)]
pub struct ConsoleSessions {
    /// Whether the admin listener speaks TLS (the cookie is then `Secure`).
    secure: bool,
    sessions: Mutex<HashMap<String, Session>>,
    /// One-time sign-in codes and when each expires (ms since the epoch).
    links: Mutex<HashMap<String, u64>>,
}

/// Why a request with the session cookie is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CookieRefusal {
    /// No such session (never was, expired, or signed out).
    #[error(
        "the console session has ended (signed out, expired, or the hub restarted): sign in again"
    )]
    NoSession,
    /// The request came from another site.
    #[error("cross-site request refused: the Origin `{0}` is not this hub's")]
    CrossSite(String),
    /// A state-changing request without the session's CSRF token.
    #[error("missing or wrong X-CSRF-Token: the console sends it with every change")]
    Csrf,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain maps that every holder leaves consistent; a panic elsewhere does not spoil them.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// 32 random bytes as hex.
fn random_token() -> Result<String, ApiError> {
    crate::datadir::random_hex(32).map_err(|e| {
        ApiError::status(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot make a session: {e}"),
        )
    })
}

impl ConsoleSessions {
    /// No sessions yet; `secure` marks the cookie `Secure` (for a TLS admin listener).
    pub fn new(secure: bool) -> ConsoleSessions {
        ConsoleSessions {
            secure,
            ..ConsoleSessions::default()
        }
    }

    /// Starts a session: returns its id (the cookie's value).
    fn start(&self, now: u64) -> Result<String, ApiError> {
        let id = random_token()?;
        let session = Session {
            csrf: random_token()?,
            created_ms: now,
            expires_ms: now + SESSION_LIFETIME.as_millis() as u64,
        };
        let mut sessions = lock(&self.sessions);
        sessions.retain(|_, s| s.expires_ms > now);
        if sessions.len() >= MAX_SESSIONS {
            let oldest = sessions
                .iter()
                .min_by_key(|(_, s)| s.created_ms)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                sessions.remove(&k);
            }
        }
        sessions.insert(id.clone(), session);
        Ok(id)
    }

    /// The live session with this id.
    fn session(&self, id: &str, now: u64) -> Option<Session> {
        lock(&self.sessions)
            .get(id)
            .filter(|s| s.expires_ms > now)
            .cloned()
    }

    /// Ends a session.
    fn end(&self, id: &str) {
        lock(&self.sessions).remove(id);
    }

    /// A new one-time sign-in code, valid for [`LINK_LIFETIME`].
    fn new_link(&self, now: u64) -> Result<(String, u64), ApiError> {
        let code = random_token()?;
        let expires = now + LINK_LIFETIME.as_millis() as u64;
        let mut links = lock(&self.links);
        links.retain(|_, e| *e > now);
        if links.len() >= MAX_LINKS {
            let oldest = links
                .iter()
                .min_by_key(|(_, e)| **e)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                links.remove(&k);
            }
        }
        links.insert(code.clone(), expires);
        Ok((code, expires))
    }

    /// Uses up a sign-in code: whether it was valid.
    fn redeem(&self, code: &str, now: u64) -> bool {
        lock(&self.links).remove(code).is_some_and(|e| e > now)
    }

    /// Checks a request that presents the session cookie `id`: the session must exist, an
    /// `Origin` must be this listener's, and a state-changing method must carry the CSRF
    /// token.
    ///
    /// # Errors
    /// Why the request is refused.
    pub fn check(
        &self,
        id: &str,
        method: &Method,
        headers: &HeaderMap,
    ) -> Result<(), CookieRefusal> {
        let session = self.session(id, now_ms()).ok_or(CookieRefusal::NoSession)?;
        check_origin(headers)?;
        let safe = matches!(*method, Method::GET | Method::HEAD);
        if !safe {
            let presented = headers
                .get(CSRF_HEADER)
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            if !bool::from(presented.ct_eq(session.csrf.as_bytes())) {
                return Err(CookieRefusal::Csrf);
            }
            // Browsers send Origin with every state-changing fetch; one without is not
            // the console.
            if headers.get(header::ORIGIN).is_none() {
                return Err(CookieRefusal::CrossSite("(none)".into()));
            }
        }
        Ok(())
    }

    fn cookie(&self, value: &str, max_age_s: u64) -> HeaderValue {
        let secure = if self.secure { "; Secure" } else { "" };
        let text = format!(
            "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age_s}{secure}"
        );
        HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

/// Refuses a request whose `Origin` (or `Sec-Fetch-Site`) says another site made it.
fn check_origin(headers: &HeaderMap) -> Result<(), CookieRefusal> {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        if site == "cross-site" || site == "same-site" {
            return Err(CookieRefusal::CrossSite(format!("Sec-Fetch-Site: {site}")));
        }
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("(not text)");
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let same = !host.is_empty()
        && origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|rest| rest.eq_ignore_ascii_case(host));
    if same {
        Ok(())
    } else {
        Err(CookieRefusal::CrossSite(origin.chars().take(100).collect()))
    }
}

/// The session cookie's value in a request, if any.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// The headers every console page and file carries.
fn with_security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    resp
}

fn serve_asset(asset: &Asset, headers: &HeaderMap) -> Response {
    // The files change only with the binary; their checksum is a strong validator, and
    // `no-cache` makes the browser ask (cheaply) so that an upgraded hub is seen at once.
    let etag = format!("\"{:08x}\"", crc32fast::hash(asset.body));
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, asset.content_type)], asset.body).into_response()
    };
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        h.insert(header::ETAG, v);
    }
    with_security_headers(resp)
}

/// `GET /`: the console's page (it asks the visitor to sign in when there is no session).
pub async fn index(headers: HeaderMap) -> Response {
    match ASSETS.iter().find(|a| a.name == "index.html") {
        Some(asset) => serve_asset(asset, &headers),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// `GET /console/{*file}`: one of the console's files.
pub async fn file(Path(name): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().find(|a| a.name == name) {
        Some(asset) => serve_asset(asset, &headers),
        None => with_security_headers(
            ApiError::not_found(format!(
                "the console has no file `{}`",
                name.chars().take(80).collect::<String>()
            ))
            .into_response(),
        ),
    }
}

fn signed_in(state: &ApiState, now: u64) -> Result<Response, ApiError> {
    let id = state.console.start(now)?;
    let mut resp = Json(json!({"signed_in": true})).into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        state.console.cookie(&id, SESSION_LIFETIME.as_secs()),
    );
    Ok(resp)
}

/// `POST /console/login` with `{"token": "<admin token>"}`: starts a session (sets the
/// cookie). The request must come from the console's own page.
///
/// # Errors
/// 401 for a wrong token; 403 for a request from another site.
pub async fn login(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    check_origin(&headers).map_err(|e| ApiError::status(StatusCode::FORBIDDEN, e.to_string()))?;
    let body = super::devices::json_body(&body, "{\"token\": \"...\"}")?;
    let token = body
        .get("token")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .trim();
    if !bool::from(token.as_bytes().ct_eq(state.admin_token.as_bytes())) {
        return Err(ApiError::status(
            StatusCode::UNAUTHORIZED,
            "wrong admin token: use the one in DATA_DIR/admin-token, or a link from `hub console`",
        ));
    }
    signed_in(&state, now_ms())
}

/// Query of `GET /console/login`.
#[derive(Debug, Deserialize)]
pub struct LinkParams {
    /// The one-time code from `hub console`.
    code: String,
}

/// `GET /console/login?code=...`: the one-time link `hub console` prints. Starts a session
/// and sends the browser to the console; a used or expired code shows the sign-in form.
pub async fn login_link(
    State(state): State<ApiState>,
    Query(params): Query<LinkParams>,
) -> Response {
    let now = now_ms();
    let mut resp = if state.console.redeem(&params.code, now) {
        match state.console.start(now) {
            Ok(id) => {
                let mut resp = redirect("/");
                resp.headers_mut().insert(
                    header::SET_COOKIE,
                    state.console.cookie(&id, SESSION_LIFETIME.as_secs()),
                );
                resp
            }
            Err(e) => e.into_response(),
        }
    } else {
        redirect("/#link-expired")
    };
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    with_security_headers(resp)
}

fn redirect(to: &'static str) -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, to)]).into_response()
}

/// The session id of a request that presents a live session cookie and passes its checks
/// for `method`.
fn checked_session<'h>(
    state: &ApiState,
    headers: &'h HeaderMap,
    method: &Method,
) -> Result<&'h str, ApiError> {
    let id = session_cookie(headers).ok_or_else(|| refusal(CookieRefusal::NoSession))?;
    state.console.check(id, method, headers).map_err(refusal)?;
    Ok(id)
}

/// `POST /console/logout`: ends the session and clears the cookie. It needs the CSRF
/// token like every change (another site must not sign the operator out either).
///
/// # Errors
/// 401 without a session; 403 without the CSRF token or from another site.
pub async fn logout(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = checked_session(&state, &headers, &Method::POST)?;
    state.console.end(id);
    let mut resp = Json(json!({"signed_in": false})).into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, state.console.cookie("", 0));
    Ok(resp)
}

/// `GET /console/session`: whether this browser is signed in, and the CSRF token its page
/// sends with changes.
///
/// # Errors
/// 401 without a live session; 403 from another site.
pub async fn session(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id = checked_session(&state, &headers, &Method::GET)?;
    let session = state
        .console
        .session(id, now_ms())
        .ok_or_else(|| refusal(CookieRefusal::NoSession))?;
    let mut resp =
        Json(json!({"csrf": session.csrf, "expires_at": session.expires_ms})).into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(resp)
}

/// The API error for a refused cookie request.
pub fn refusal(why: CookieRefusal) -> ApiError {
    let status = match why {
        CookieRefusal::NoSession => StatusCode::UNAUTHORIZED,
        CookieRefusal::CrossSite(_) | CookieRefusal::Csrf => StatusCode::FORBIDDEN,
    };
    ApiError::status(status, why.to_string())
}

/// `POST /api/v1/console/links`: a one-time sign-in code (what `hub console` prints as a
/// link), valid for [`LINK_LIFETIME`].
///
/// # Errors
/// 500 when the system's random generator fails.
pub async fn create_link(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let (code, expires_at) = state.console.new_link(now_ms())?;
    Ok(Json(json!({
        "path": format!("/console/login?code={code}"),
        "expires_at": expires_at,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).expect("header"));
        }
        h
    }

    #[test]
    fn a_cookie_request_must_come_from_this_origin_and_changes_need_the_csrf_token() {
        let sessions = ConsoleSessions::new(false);
        let id = sessions.start(now_ms()).expect("session");
        let csrf = sessions.session(&id, now_ms()).expect("live").csrf;
        let host = ("host", "127.0.0.1:8444");
        let own = ("origin", "http://127.0.0.1:8444");
        assert_eq!(sessions.check(&id, &Method::GET, &headers(&[host])), Ok(()));
        assert_eq!(
            sessions.check(&id, &Method::GET, &headers(&[host, own])),
            Ok(())
        );
        assert!(matches!(
            sessions.check(
                &id,
                &Method::GET,
                &headers(&[host, ("origin", "http://evil.example")])
            ),
            Err(CookieRefusal::CrossSite(_))
        ));
        assert!(matches!(
            sessions.check(
                &id,
                &Method::GET,
                &headers(&[host, ("origin", "http://127.0.0.1:9999")])
            ),
            Err(CookieRefusal::CrossSite(_))
        ));
        assert_eq!(
            sessions.check(&id, &Method::POST, &headers(&[host, own])),
            Err(CookieRefusal::Csrf)
        );
        assert_eq!(
            sessions.check(
                &id,
                &Method::POST,
                &headers(&[host, own, ("x-csrf-token", "nope")])
            ),
            Err(CookieRefusal::Csrf)
        );
        assert_eq!(
            sessions.check(
                &id,
                &Method::POST,
                &headers(&[host, own, ("x-csrf-token", &csrf)])
            ),
            Ok(())
        );
        assert!(matches!(
            sessions.check(
                &id,
                &Method::POST,
                &headers(&[host, ("x-csrf-token", &csrf)])
            ),
            Err(CookieRefusal::CrossSite(_))
        ));
        sessions.end(&id);
        assert_eq!(
            sessions.check(&id, &Method::GET, &headers(&[host])),
            Err(CookieRefusal::NoSession)
        );
    }

    #[test]
    fn a_sign_in_link_works_once() {
        let sessions = ConsoleSessions::new(false);
        let now = now_ms();
        let (code, _) = sessions.new_link(now).expect("link");
        assert!(sessions.redeem(&code, now));
        assert!(!sessions.redeem(&code, now));
        let (late, expires) = sessions.new_link(now).expect("link");
        assert!(!sessions.redeem(&late, expires));
    }

    #[test]
    fn the_cookie_is_http_only_strict_and_secure_on_tls() {
        let plain = ConsoleSessions::new(false).cookie("abc", 60);
        let plain = plain.to_str().expect("text");
        assert!(plain.contains("HttpOnly") && plain.contains("SameSite=Strict"));
        assert!(!plain.contains("Secure"));
        let tls = ConsoleSessions::new(true).cookie("abc", 60);
        assert!(tls.to_str().expect("text").ends_with("; Secure"));
        let h = headers(&[("cookie", "a=b; hub_console=xyz; c=d")]);
        assert_eq!(session_cookie(&h), Some("xyz"));
    }
}

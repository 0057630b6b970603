//! The web console in a real browser (Debian's headless Chromium through chromedriver):
//! signing in with the token and with a `hub console` link, a device appearing online
//! without a reload, its chart growing while it sends, a command from the form and its
//! result, device output shown as text and never run as markup, cross-site and cookie-less
//! requests refused, signing out; the first page of 20,000 devices; the console's size.
//! Screenshots of each page go to the browser's temp dir (kept with `E2E_KEEP=1`).

use std::sync::mpsc;
use std::time::{Duration, Instant};

use e2e::client::{hello, Device};
use e2e::console::{console_link, load_device_list, register_fleet, PAGE};
use e2e::servers::TcpProxy;
use e2e::webdriver::Browser;
use e2e::{wait_for, Hub, HubOptions};
use futures_util::StreamExt;
use schemas::codec::decode_json;
use schemas::message::truncated;
use schemas::{CommandAck, CommandResult, DeviceMessage, HubMessage, Reading, Telemetry};
use tokio_tungstenite::tungstenite::Message;

const T: Duration = Duration::from_secs(30);
/// What a hostile device answers to the `xss` command.
const XSS: &str = "<img src=x onerror=alert(1)>";

/// A device that sends a `temperature` reading every 100 ms and answers every command
/// (`xss` with markup), until the runtime it runs on ends. It reports on `welcomed` once
/// the hub has welcomed it.
async fn device(
    url: String,
    ca: std::path::PathBuf,
    token: String,
    welcomed: mpsc::Sender<Instant>,
) {
    let mut d = Device::connect(&url, &ca, &token, true).await;
    d.send(&hello("console-fw-2.1")).await;
    assert!(matches!(d.expect(T).await, HubMessage::Welcome(_)));
    let _ = welcomed.send(Instant::now());
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                seq += 1;
                let mut readings = heapless::Vec::new();
                let _ = readings.push(Reading {
                    metric: truncated("temperature"),
                    ts: e2e_now_ms(),
                    value: 20.0 + (seq as f64 / 5.0).sin(),
                });
                d.send(&DeviceMessage::Telemetry(Telemetry { seq, readings })).await;
            }
            frame = d.ws.next() => {
                let Some(Ok(Message::Text(text))) = frame else {
                    if matches!(frame, None | Some(Err(_))) { return; }
                    continue;
                };
                if let Ok(HubMessage::Command(c)) = decode_json(text.as_str()) {
                    let output = if c.name.as_str() == "xss" { XSS.to_string() } else { format!("done: {}", c.name) };
                    d.send(&DeviceMessage::CommandAck(CommandAck { id: c.id })).await;
                    d.send(&DeviceMessage::CommandResult(CommandResult {
                        id: c.id,
                        ok: true,
                        code: 0,
                        output: truncated(&output),
                    }))
                    .await;
                }
            }
        }
    }
}

fn e2e_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A request to the hub with only the given headers; its status and body.
fn request(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&str>) -> (u16, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let resp = if method == "GET" {
        let mut req = agent.get(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.call()
    } else {
        let mut req = agent.post(url).header("Content-Type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send(body.unwrap_or("{}"))
    };
    let mut resp = resp.expect("request");
    let status = resp.status().as_u16();
    (status, resp.body_mut().read_to_string().unwrap_or_default())
}

/// Signs in at the form with the admin token, and waits for the overview.
fn sign_in_with_token(browser: &Browser, hub: &Hub) {
    let token = browser.wait_for("#sign-in:not([hidden]) #token", T);
    browser.type_into(&token, &hub.admin_token());
    browser.click(&browser.wait_for("#sign-in-form button", T));
    browser.wait_for("#top:not([hidden])", T);
}

#[test]
fn the_console_signs_in_shows_the_fleet_live_and_runs_commands_safely() {
    let started = Instant::now();
    let hub = Hub::start(HubOptions::default());
    let admin = hub.admin_url();
    let browser = Browser::start();
    let shots = browser.dir.path().to_path_buf();

    // The page and its files: types, caching, a strict CSP.
    let (status, page) = request("GET", &format!("{admin}/"), &[], None);
    assert_eq!(status, 200);
    assert!(page.contains("/console/app.js"), "{page}");
    let resp = ureq::get(&format!("{admin}/console/app.js"))
        .call()
        .expect("app.js");
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    assert!(header("content-type").starts_with("text/javascript"));
    assert!(header("content-security-policy").contains("script-src 'self'"));
    assert!(!header("content-security-policy").contains("unsafe-inline"));
    assert!(!header("etag").is_empty());

    // Without a session the API is refused, and the page asks to sign in.
    let (status, _) = request("GET", &format!("{admin}/api/v1/devices"), &[], None);
    assert_eq!(status, 401);
    let (status, _) = request("POST", &format!("{admin}/api/v1/console/links"), &[], None);
    assert_eq!(status, 401, "only an operator may make sign-in links");
    browser.navigate(&format!("{admin}/"));
    browser.wait_for("#sign-in:not([hidden])", T);
    browser.screenshot(&shots.join("sign-in.png"));
    // A wrong token is refused at the form.
    browser.type_into(&browser.wait_for("#token", T), "not-the-token");
    browser.click(&browser.wait_for("#sign-in-form button", T));
    browser.wait_for_text("#sign-in-error", T, |t| t.contains("wrong admin token"));
    sign_in_with_token(&browser, &hub);
    browser.wait_for_text("#count-never", T, |t| t.parse::<u64>().is_ok());

    // The cookie: HttpOnly, SameSite=Strict; with it the API answers this origin only,
    // and a change needs the CSRF token too.
    let cookies = browser.cookies();
    let cookie = cookies
        .iter()
        .find(|c| c["name"] == "hub_console")
        .unwrap_or_else(|| panic!("no session cookie in {cookies:?}"));
    assert_eq!(cookie["httpOnly"], true, "{cookie}");
    assert_eq!(cookie["sameSite"], "Strict", "{cookie}");
    let cookie_header = format!("hub_console={}", cookie["value"].as_str().expect("value"));
    let own = admin.as_str();
    let devices_url = format!("{admin}/api/v1/devices?limit=1");
    let (status, _) = request(
        "GET",
        &devices_url,
        &[("Cookie", &cookie_header), ("Origin", own)],
        None,
    );
    assert_eq!(status, 200);
    let (status, body) = request(
        "GET",
        &devices_url,
        &[
            ("Cookie", &cookie_header),
            ("Origin", "http://evil.example"),
        ],
        None,
    );
    assert_eq!(status, 403, "{body}");
    let tokens_url = format!("{admin}/api/v1/tokens");
    let issue = Some(r#"{"device_id": "forged"}"#);
    let (status, body) = request(
        "POST",
        &tokens_url,
        &[
            ("Cookie", &cookie_header),
            ("Origin", "http://evil.example"),
        ],
        issue,
    );
    assert_eq!(status, 403, "{body}");
    let (status, body) = request(
        "POST",
        &tokens_url,
        &[("Cookie", &cookie_header), ("Origin", own)],
        issue,
    );
    assert_eq!(status, 403, "a change without the CSRF token: {body}");
    let (_, session) = request(
        "GET",
        &format!("{admin}/console/session"),
        &[("Cookie", &cookie_header)],
        None,
    );
    let csrf = serde_json::from_str::<serde_json::Value>(&session).expect("session json")["csrf"]
        .as_str()
        .expect("csrf")
        .to_string();
    let (status, body) = request(
        "POST",
        &tokens_url,
        &[
            ("Cookie", &cookie_header),
            ("Origin", "http://evil.example"),
            ("X-CSRF-Token", &csrf),
        ],
        issue,
    );
    assert_eq!(
        status, 403,
        "the CSRF token does not excuse another origin: {body}"
    );
    let (status, body) = request(
        "POST",
        &tokens_url,
        &[
            ("Cookie", &cookie_header),
            ("Origin", own),
            ("X-CSRF-Token", &csrf),
        ],
        issue,
    );
    assert_eq!(status, 200, "{body}");
    // Bearer tokens work as before.
    let (status, _) = hub.api("GET", "/api/v1/devices", Some(&hub.admin_token()), None);
    assert_eq!(status, 200);

    // The device list: a registered device shows as never connected, then online as soon
    // as it connects, without a reload.
    let token = hub.token("sensor-1");
    browser.navigate(&format!("{admin}/#/devices"));
    browser.wait_for_text(r#"tr[data-device="sensor-1"] .badge"#, T, |t| {
        t == "never connected"
    });
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let (welcomed_tx, welcomed) = mpsc::channel();
    runtime.spawn(device(hub.device_url.clone(), hub.ca(), token, welcomed_tx));
    let welcomed_at = welcomed.recv_timeout(T).expect("the device was welcomed");
    browser.wait_for_text(
        r#"tr[data-device="sensor-1"] .badge"#,
        Duration::from_secs(2),
        |t| t == "online",
    );
    let shown_after = welcomed_at.elapsed();
    println!("console: sensor-1 shown online {shown_after:?} after its welcome");
    assert!(shown_after < Duration::from_secs(2));
    browser.screenshot(&shots.join("devices.png"));

    // The event stream reconnects by itself and resumes after the last event it saw: a
    // device that comes online while the page is cut off shows online once it is back.
    let admin_port: u16 = admin
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("admin port");
    let proxy = TcpProxy::start(admin_port);
    let token = hub.token("sensor-2");
    browser.navigate(&format!("http://127.0.0.1:{}/#/devices", proxy.port));
    browser.wait_for_text(r#"tr[data-device="sensor-2"] .badge"#, T, |t| {
        t == "never connected"
    });
    browser.wait_for_text("#live", T, |t| t == "live");
    proxy.pause();
    proxy.cut();
    browser.wait_for_text("#live", T, |t| t == "reconnecting");
    let (welcomed_tx, welcomed) = mpsc::channel();
    runtime.spawn(device(hub.device_url.clone(), hub.ca(), token, welcomed_tx));
    welcomed.recv_timeout(T).expect("sensor-2 was welcomed");
    proxy.resume();
    browser.wait_for_text(r#"tr[data-device="sensor-2"] .badge"#, T, |t| t == "online");
    browser.wait_for_text("#live", T, |t| t == "live");
    browser.navigate(&format!("{admin}/#/devices"));

    // Its page: the chart gains points while it sends.
    browser.click(&browser.wait_for(r#"tr[data-device="sensor-1"] a"#, T));
    browser.wait_for_text("#device-presence", T, |t| t == "online");
    browser.wait_for_text("#device-info", T, |t| t.contains("console-fw-2.1"));
    browser.wait_for_text("#presence-history", T, |t| t.contains("online"));
    let points = |b: &Browser| -> u64 {
        b.find("#chart-points")
            .and_then(|e| b.try_text(&e))
            .and_then(|t| t.split_whitespace().next().and_then(|n| n.parse().ok()))
            .unwrap_or(0)
    };
    let first = wait_for(T, "the chart to have points", || {
        Some(points(&browser)).filter(|n| *n > 0)
    });
    wait_for(T, "the chart to gain points", || {
        Some(points(&browser)).filter(|n| *n >= first + 5)
    });
    browser.wait_for("#chart canvas", T);

    // A command from the form, and its result.
    let send = |name: &str| {
        browser.type_into(&browser.wait_for("#command-name", T), name);
        browser.type_into(&browser.wait_for("#command-args", T), r#"{"on": true}"#);
        browser.click(&browser.wait_for("#command-form button", T));
    };
    send("led");
    browser.wait_for_text("#command-output", T, |t| t == "done: led");
    browser.wait_for_text("#command-state", T, |t| t == "succeeded");
    browser.wait_for_text("#command-history", T, |t| t.contains("done: led"));
    browser.screenshot(&shots.join("device-command.png"));
    browser.execute("window.scrollTo(0, 0); return null;", serde_json::json!([]));
    browser.screenshot(&shots.join("device.png"));

    // Markup from a device is text: shown literally, no element made, no script run.
    send("xss");
    browser.wait_for_text("#command-output", T, |t| t == XSS);
    browser.wait_for_text("#command-history", T, |t| t.contains(XSS));
    let made = browser.execute(
        "return document.querySelectorAll('main img').length;",
        serde_json::json!([]),
    );
    assert_eq!(made, 0, "device output became an element");
    assert_eq!(browser.alert_text(), None, "device output ran a script");
    browser.screenshot(&shots.join("device-xss.png"));

    // The overview: counts, connections and the recent events, live.
    browser.click(&browser.wait_for("#nav-overview", T));
    browser.wait_for_text("#count-online", T, |t| t == "2");
    browser.wait_for_text("#connections", T, |t| t == "2");
    browser.wait_for_text("#readings-rate", T, |t| {
        t.parse::<f64>().is_ok_and(|r| r > 0.0)
    });
    browser.wait_for_text("#recent-events", T, |t| {
        t.contains("sensor-1 came online") && t.contains(XSS)
    });
    browser.screenshot(&shots.join("overview.png"));

    // Jobs: one made through the API shows up live with its progress, then its devices.
    let (status, created) = hub.api(
        "POST",
        "/api/v1/jobs",
        Some(&hub.admin_token()),
        Some(r#"{"command": "led", "args": {"on": true}, "devices": ["sensor-1", "sensor-2"]}"#),
    );
    assert_eq!(status, 201, "{created}");
    let job = created["id"].as_u64().expect("job id");
    browser.click(&browser.wait_for("#nav-jobs", T));
    browser.wait_for_text(&format!(r#"tr[data-job="{job}"] .badge"#), T, |t| {
        t == "completed"
    });
    browser.wait_for_text(&format!(r#"tr[data-job="{job}"] .progress"#), T, |t| {
        t.contains("2/2")
    });
    browser.screenshot(&shots.join("jobs.png"));
    browser.click(&browser.wait_for(&format!(r#"tr[data-job="{job}"] a"#), T));
    browser.wait_for_text("#job-facts", T, |t| t.contains("completed"));
    browser.wait_for_text("#job-devices", T, |t| {
        t.contains("sensor-1") && t.contains("sensor-2") && t.matches("succeeded").count() == 2
    });
    browser.screenshot(&shots.join("job.png"));

    // Rollouts: one started through the API shows up with its devices.
    let image = hub.dir.path().join("fw-1.1.bin");
    std::fs::write(&image, vec![7u8; 4096]).expect("image");
    let (code, _, err) = hub.cli(&[
        "firmware",
        "add",
        image.to_str().expect("utf8"),
        "--version",
        "1.1",
    ]);
    assert_eq!(code, 0, "{err}");
    let (status, created) = hub.api(
        "POST",
        "/api/v1/rollouts",
        Some(&hub.admin_token()),
        Some(r#"{"version": "1.1", "select": "all"}"#),
    );
    assert_eq!(status, 201, "{created}");
    let rollout = created["id"].as_u64().expect("rollout id");
    browser.click(&browser.wait_for("#nav-rollouts", T));
    browser.wait_for_text(
        &format!(r#"tr[data-rollout="{rollout}"] td:nth-child(3)"#),
        T,
        |t| t == "1.1",
    );
    browser.screenshot(&shots.join("rollouts.png"));
    browser.click(&browser.wait_for(&format!(r#"tr[data-rollout="{rollout}"] a"#), T));
    browser.wait_for_text("#rollout-facts", T, |t| t.contains("1.1"));
    browser.wait_for_text("#rollout-devices", T, |t| {
        t.contains("sensor-1") && t.contains("sensor-2")
    });
    browser.screenshot(&shots.join("rollout.png"));

    // Signing out ends the session: the page asks to sign in, and the old cookie is refused.
    browser.click(&browser.wait_for("#sign-out", T));
    browser.wait_for("#sign-in:not([hidden])", T);
    let (status, _) = request("GET", &devices_url, &[("Cookie", &cookie_header)], None);
    assert_eq!(status, 401);

    // A `hub console` link signs in once.
    let link = console_link(&hub);
    browser.navigate(&link);
    browser.wait_for("#top:not([hidden])", T);
    browser.wait_for_text("#count-online", T, |t| t == "2");
    browser.click(&browser.wait_for("#sign-out", T));
    browser.wait_for("#sign-in:not([hidden])", T);
    browser.navigate(&link);
    browser.wait_for_text("#sign-in-error", T, |t| t.contains("used or has expired"));
    drop(runtime);
    println!(
        "console: browser test took {:?}; screenshots in {}",
        started.elapsed(),
        shots.display()
    );
}

/// The device list pages on the server: 20,000 devices show as pages of 50, filtered and
/// sorted by the hub. (How fast the first page renders is measured by the console
/// benchmark, `cargo bench -p e2e --bench console`; this prints the figure of a debug
/// build under test load.)
#[test]
fn the_device_list_pages_20000_devices_on_the_server() {
    const FLEET: usize = 20_000;
    let hub = Hub::start(HubOptions::default());
    register_fleet(&hub, FLEET);
    let browser = Browser::start();
    browser.navigate(&console_link(&hub));
    browser.wait_for_text("#count-never", T, |t| t == FLEET.to_string());

    let first_page = load_device_list(&browser, &format!("{}/#/devices", hub.admin_url()), T);
    let summary = browser.wait_for_text("#device-summary", T, |t| !t.is_empty());
    assert_eq!(summary, format!("1–{PAGE} of {FLEET}"));
    browser.screenshot(&browser.dir.path().join("devices-20000.png"));
    // The next page, then a filtered page sorted the other way: site b, last id first.
    browser.click(&browser.wait_for("#page-next", T));
    browser.wait_for_text("#device-summary", T, |t| {
        t == format!("{}–{} of {FLEET}", PAGE + 1, 2 * PAGE)
    });
    browser.wait_for_text("#device-rows tr td a", T, |t| {
        t == format!("meter-{PAGE:05}")
    });
    let filtered = load_device_list(
        &browser,
        &format!("{}/#/devices?tags=site%3Db&sort=-id", hub.admin_url()),
        T,
    );
    browser.wait_for_text("#device-summary", T, |t| {
        t == format!("1–{PAGE} of {}", FLEET / 2)
    });
    browser.wait_for_text("#device-rows tr td a", T, |t| {
        t == format!("meter-{:05}", FLEET - 1)
    });
    println!(
        "console: first page of {FLEET} devices on screen in {} ms, a filtered and sorted one in {} ms (debug build)",
        first_page.as_millis(),
        filtered.as_millis()
    );
}

/// The console's files: well under 200 KB gzipped, and its own modules never turn text into
/// markup (ARCHITECTURE.md: everything from devices goes in as text nodes).
#[test]
fn the_console_is_small_and_never_parses_markup() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../hub/console");
    let mut files = Vec::new();
    let mut stack = vec![dir];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("console dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    assert!(files.len() >= 8, "{files:?}");
    let mut raw = 0;
    let mut gzipped = 0;
    for file in &files {
        raw += std::fs::metadata(file).expect("size").len();
        let out = std::process::Command::new("gzip")
            .args(["-9", "-c"])
            .arg(file)
            .output()
            .expect("gzip");
        assert!(out.status.success());
        gzipped += out.stdout.len() as u64;
    }
    println!(
        "console: {} files, {raw} bytes, {gzipped} bytes gzipped",
        files.len()
    );
    assert!(gzipped < 100 * 1024, "{gzipped} bytes gzipped");
    for file in files.iter().filter(|f| {
        f.extension().is_some_and(|e| e == "js") && !f.to_string_lossy().contains("vendor")
    }) {
        let code = std::fs::read_to_string(file).expect("module");
        for sink in [
            "innerHTML",
            "outerHTML",
            "insertAdjacentHTML",
            "document.write",
            "eval(",
        ] {
            assert!(!code.contains(sink), "{} uses {sink}", file.display());
        }
    }
}

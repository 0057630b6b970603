//! The web console's steps that the browser tests and the console benchmark share:
//! signing in with a `hub console` link, registering a large fleet, and loading the device
//! list until its first page is on screen.

use std::time::{Duration, Instant};

use crate::webdriver::Browser;
use crate::{wait_for, Hub};

/// Devices on one page of the console's device list (`PAGE` in `hub/console/devices.js`).
pub const PAGE: usize = 50;

/// The one-time sign-in link `hub console` prints.
pub fn console_link(hub: &Hub) -> String {
    let (code, out, err) = hub.cli(&["console"]);
    assert_eq!(code, 0, "{err}");
    out.split_whitespace()
        .find(|w| w.contains("/console/login?code="))
        .unwrap_or_else(|| panic!("no link in {out}"))
        .to_string()
}

/// Registers `count` devices `meter-00000`... in one request, tagged `site=a` and `site=b`
/// in turn.
pub fn register_fleet(hub: &Hub, count: usize) {
    let devices: Vec<serde_json::Value> = (0..count)
        .map(|i| {
            let site = if i % 2 == 0 { "a" } else { "b" };
            serde_json::json!({"id": format!("meter-{i:05}"), "tags": {"site": site}})
        })
        .collect();
    let body = serde_json::json!({ "devices": devices }).to_string();
    let (status, v) = hub.api(
        "POST",
        "/api/v1/devices",
        Some(&hub.admin_token()),
        Some(&body),
    );
    assert_eq!(status, 201, "{v}");
}

/// Opens the device list at `url` (a fresh page load, in a browser that is signed in) and
/// returns how long it took until its first page of rows was on screen.
pub fn load_device_list(browser: &Browser, url: &str, timeout: Duration) -> Duration {
    let start = Instant::now();
    browser.navigate("about:blank");
    browser.navigate(url);
    wait_for(timeout, "the first page of devices", || {
        (browser.find_all("#device-rows tr").len() == PAGE).then_some(())
    });
    start.elapsed()
}

//! A small W3C WebDriver client over HTTP (ureq) for the console's browser tests: it
//! starts Debian's `chromedriver` on an ephemeral port, opens headless `chromium` with a
//! fresh profile, and offers the few commands the tests use (navigate, find, click, type,
//! read text, run a script, cookies, alerts, screenshots). Both packages are installed
//! when missing, as the other servers are.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::process::TempDir;
use crate::servers::{ensure_installed, free_port};
use crate::wait_for;

/// The W3C name of the key a web element's id is under in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A WebDriver error answer: its `error` code and message.
#[derive(Debug, Clone)]
pub struct WebDriverError {
    /// The W3C error code (`no such element`, `no such alert`...).
    pub error: String,
    /// What the driver said.
    pub message: String,
}

/// A headless Chromium driven through chromedriver; both end on drop.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    agent: ureq::Agent,
    /// The browser profile and chromedriver's log.
    pub dir: TempDir,
}

/// An element found on the page.
#[derive(Debug, Clone)]
pub struct Element(String);

impl Browser {
    /// Starts chromedriver and a headless Chromium window of 1280×900.
    pub fn start() -> Browser {
        let chromium = ensure_installed("chromium", "chromium");
        let chromedriver = ensure_installed("chromedriver", "chromium-driver");
        let dir = TempDir::new("browser");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("chromedriver.log")).expect("log");
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start chromedriver");
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let base = format!("http://127.0.0.1:{port}");
        let mut browser = Browser {
            driver,
            base,
            session: String::new(),
            agent,
            dir,
        };
        wait_for(Duration::from_secs(20), "chromedriver to answer", || {
            browser
                .call("GET", "/status", None)
                .ok()
                .filter(|v| v["ready"] == true)
        });
        let profile = browser.dir.path().join("profile");
        // The flags that keep Chromium off the network it cannot reach here (updates,
        // sync, metrics), without a sandbox (tests may run as root) or a GPU.
        let args = [
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--window-size=1280,900".into(),
            format!("--user-data-dir={}", profile.display()),
        ];
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
            "unhandledPromptBehavior": "ignore",
        }}});
        let answer = browser
            .call("POST", "/session", Some(caps))
            .unwrap_or_else(|e| panic!("cannot start chromium: {e:?}"));
        browser.session = answer["sessionId"]
            .as_str()
            .expect("session id")
            .to_string();
        browser
    }

    /// Sends one WebDriver command; the answer's `value`.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, WebDriverError> {
        let url = format!("{}{path}", self.base);
        let resp = match method {
            "GET" => self.agent.get(&url).call(),
            "DELETE" => self.agent.delete(&url).call(),
            _ => self
                .agent
                .post(&url)
                .header("Content-Type", "application/json")
                .send(body.unwrap_or_else(|| json!({})).to_string()),
        };
        let mut resp = resp.map_err(|e| WebDriverError {
            error: "transport".into(),
            message: e.to_string(),
        })?;
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let value = value.get("value").cloned().unwrap_or(Value::Null);
        match value.get("error").and_then(Value::as_str) {
            Some(error) => Err(WebDriverError {
                error: error.to_string(),
                message: value["message"].as_str().unwrap_or_default().to_string(),
            }),
            None => Ok(value),
        }
    }

    fn session_call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, WebDriverError> {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    fn must(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        self.session_call(method, path, body)
            .unwrap_or_else(|e| panic!("webdriver {method} {path}: {e:?}"))
    }

    /// Opens a URL and waits for its load event.
    pub fn navigate(&self, url: &str) {
        self.must("POST", "/url", Some(json!({"url": url})));
    }

    /// The current URL.
    pub fn url(&self) -> String {
        self.must("GET", "/url", None)
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// The elements that match a CSS selector now.
    pub fn find_all(&self, css: &str) -> Vec<Element> {
        self.session_call(
            "POST",
            "/elements",
            Some(json!({"using": "css selector", "value": css})),
        )
        .unwrap_or_else(|e| panic!("webdriver find `{css}`: {e:?}"))
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|e| e[ELEMENT].as_str().map(|id| Element(id.to_string())))
        .collect()
    }

    /// The first element matching a CSS selector now, if any.
    pub fn find(&self, css: &str) -> Option<Element> {
        self.find_all(css).into_iter().next()
    }

    /// Waits for an element matching a CSS selector.
    pub fn wait_for(&self, css: &str, timeout: Duration) -> Element {
        wait_for(timeout, &format!("an element `{css}`"), || self.find(css))
    }

    /// Waits until the first element matching `css` has text for which `check` holds;
    /// returns that text.
    pub fn wait_for_text(
        &self,
        css: &str,
        timeout: Duration,
        check: impl Fn(&str) -> bool,
    ) -> String {
        wait_for(timeout, &format!("the text of `{css}`"), || {
            let text = self.find(css).and_then(|e| self.try_text(&e))?;
            check(&text).then_some(text)
        })
    }

    /// An element's rendered text (`None` when it went away meanwhile).
    pub fn try_text(&self, el: &Element) -> Option<String> {
        self.session_call("GET", &format!("/element/{}/text", el.0), None)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
    }

    /// An element's rendered text.
    pub fn text(&self, el: &Element) -> String {
        self.try_text(el).expect("element text")
    }

    /// Clicks an element.
    pub fn click(&self, el: &Element) {
        self.must("POST", &format!("/element/{}/click", el.0), Some(json!({})));
    }

    /// Clears an input and types text into it.
    pub fn type_into(&self, el: &Element, text: &str) {
        self.must("POST", &format!("/element/{}/clear", el.0), Some(json!({})));
        self.must(
            "POST",
            &format!("/element/{}/value", el.0),
            Some(json!({"text": text})),
        );
    }

    /// Runs a script in the page (WebDriver's scripts are not subject to the page's CSP)
    /// and returns its result.
    pub fn execute(&self, script: &str, args: Value) -> Value {
        self.must(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
    }

    /// The browser's cookies for the current page.
    pub fn cookies(&self) -> Vec<Value> {
        self.must("GET", "/cookie", None)
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The text of an open alert, confirm or prompt dialog, if one is open.
    pub fn alert_text(&self) -> Option<String> {
        match self.session_call("GET", "/alert/text", None) {
            Ok(v) => Some(v.as_str().unwrap_or_default().to_string()),
            Err(e) if e.error == "no such alert" => None,
            Err(e) => panic!("webdriver alert: {e:?}"),
        }
    }

    /// Saves a PNG screenshot of the window.
    pub fn screenshot(&self, path: &Path) {
        let b64 = self.must("GET", "/screenshot", None);
        let bytes = base64_decode(b64.as_str().expect("screenshot base64"));
        std::fs::write(path, bytes).expect("write screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", &format!("/session/{}", self.session), None);
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Decodes standard base64 (what WebDriver screenshots are), ignoring anything else.
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let digits: Vec<u32> = text.bytes().filter_map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let mut n = 0u32;
        for (i, d) in chunk.iter().enumerate() {
            n |= d << (18 - 6 * i);
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len().saturating_sub(1)]);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_decodes_with_and_without_padding() {
        assert_eq!(super::base64_decode("aGVsbG8="), b"hello");
        assert_eq!(super::base64_decode("aGk="), b"hi");
        assert_eq!(super::base64_decode("YWJj"), b"abc");
    }
}

//! Headless Chromium for the console test, driven over W3C WebDriver by
//! Debian's `chromedriver` (packages `chromium` and `chromium-driver`, which
//! `scripts/test` installs when missing).
//!
//! The client is these few calls over reqwest, which the tests already
//! build, rather than the `fantoccini` crate or Playwright: fantoccini
//! brings hyper's client stack a second time and the `webdriver` crate
//! (with ICU segmentation) for the types of a dozen JSON requests, minutes
//! of build on the two cores we share; Playwright needs Node, an npm
//! install and a second test runner beside cargo's.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{eventually, free_port, PATIENCE};

/// The key under which WebDriver names an element.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A headless Chromium of one test, closed with it.
pub struct Browser {
    http: reqwest::Client,
    session: String,
    _profile: tempfile::TempDir,
    _driver: Driver,
}

impl Browser {
    /// Starts chromedriver on a free port and a headless Chromium behind
    /// it. Fails the test, never skips it, when either is missing.
    pub async fn start() -> Browser {
        let port = free_port();
        let log = std::env::var_os("TEST_LOG").is_some();
        // A process group of its own, so that Drop ends chromedriver and
        // every Chromium process it started in one signal.
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(if log { Stdio::inherit() } else { Stdio::null() })
            .stderr(if log { Stdio::inherit() } else { Stdio::null() })
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting chromedriver (Debian's chromium-driver; scripts/test installs it): {e}")
            });
        let driver = Driver(driver);
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let (client, status) = (&http, &format!("{base}/status"));
        eventually("answer from chromedriver", || async move {
            client.get(status).send().await.ok()
        })
        .await;
        let profile = tempfile::tempdir().expect("browser profile dir");
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium(),
                "args": [
                    "--headless=new",
                    // Chromium's sandbox will not start as root, which CI is.
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--no-first-run",
                    "--disable-component-update",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        }}});
        let answer = call(
            &http,
            "POST",
            &format!("{base}/session"),
            Some(capabilities),
        )
        .await;
        let session = answer["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session from chromedriver: {answer}"));
        Browser {
            http,
            session: format!("{base}/session/{session}"),
            _profile: profile,
            _driver: driver,
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        call(&self.http, method, &format!("{}{path}", self.session), body).await
    }

    pub async fn goto(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url }))).await;
    }

    /// The first element matching `css`, waiting for it to appear.
    pub async fn find(&self, css: &str) -> Element<'_> {
        let (http, url) = (&self.http, &format!("{}/element", self.session));
        let id = eventually(&format!("element {css:?}"), || async move {
            let query = json!({"using": "css selector", "value": css});
            let answer = call_raw(http, "POST", url, Some(query)).await.ok()?;
            answer[ELEMENT].as_str().map(str::to_owned)
        })
        .await;
        Element { browser: self, id }
    }

    /// Runs `script` (a function body; `arguments` are `args`) in the page
    /// and returns what it returns.
    pub async fn run(&self, script: &str, args: Value) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    /// The visible text of the first element matching `css`, or "" when
    /// there is none.
    pub async fn text(&self, css: &str) -> String {
        let text = self
            .run(
                "const e = document.querySelector(arguments[0]); return e ? e.innerText : '';",
                json!([css]),
            )
            .await;
        text.as_str().unwrap_or_default().to_owned()
    }

    /// Waits until the text of `css` contains `wanted`; returns that text.
    pub async fn wait_text(&self, css: &str, wanted: &str) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let last = self.text(css).await;
            if last.contains(wanted) {
                return last;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{css} never showed {wanted:?} within {PATIENCE:?}; it shows:\n{last}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// chromedriver and the Chromium it runs, killed together when dropped. A
/// WebDriver request to close the session cannot be made from `drop` on the
/// test's single-threaded runtime, which would have to serve it.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .status();
        let _ = self.0.wait();
    }
}

/// An element of the page.
pub struct Element<'a> {
    browser: &'a Browser,
    id: String,
}

impl Element<'_> {
    /// `POST /element/{id}/{action}` with `body`.
    async fn act(&self, action: &str, body: Value) {
        let path = format!("/element/{}/{action}", self.id);
        self.browser.call("POST", &path, Some(body)).await;
    }

    pub async fn click(&self) {
        self.act("click", json!({})).await;
    }

    /// Types `text` into the element, key by key, as a user would.
    pub async fn type_text(&self, text: &str) {
        self.act("value", json!({ "text": text })).await;
    }

    pub async fn clear(&self) {
        self.act("clear", json!({})).await;
    }

    pub async fn enabled(&self) -> bool {
        let path = format!("/element/{}/enabled", self.id);
        let enabled = self.browser.call("GET", &path, None).await;
        enabled.as_bool().expect("enabled is a bool")
    }
}

/// Debian's Chromium: `chromium` on the PATH.
fn chromium() -> String {
    let found = Command::new("sh")
        .args(["-c", "command -v chromium"])
        .output()
        .expect("running sh");
    let path = String::from_utf8_lossy(&found.stdout).trim().to_owned();
    assert!(
        !path.is_empty(),
        "chromium is not installed (Debian's chromium; scripts/test installs it)"
    );
    path
}

/// A WebDriver call that must succeed: its `value`.
async fn call(http: &reqwest::Client, method: &str, url: &str, body: Option<Value>) -> Value {
    match call_raw(http, method, url, body).await {
        Ok(value) => value,
        Err(e) => panic!("webdriver {method} {url}: {e}"),
    }
}

/// A WebDriver call: its `value`, or the error it answered.
async fn call_raw(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    let request = match method {
        "GET" => http.get(url),
        "POST" => http.post(url).json(&body.unwrap_or(json!({}))),
        "DELETE" => http.delete(url),
        other => panic!("no such method {other}"),
    };
    let response = request.send().await.map_err(|e| e.to_string())?;
    let status = response.status();
    let answer: Value = response.json().await.map_err(|e| e.to_string())?;
    if status.is_success() {
        Ok(answer["value"].clone())
    } else {
        Err(format!("{status}: {}", answer["value"]))
    }
}

//! Headless Chromium driven over the DevTools protocol (a WebSocket and JSON), for the console
//! tests: open pages, type into fields, click, read the page, take screenshots.
//!
//! Chromium is Debian's (`scripts/setup.sh` installs it). It runs with a fresh profile in a
//! temporary directory, with background networking off and every host name but `localhost`
//! unresolvable, so the only traffic is to the servers the test started on loopback. It is
//! killed (by its own pid) when the `Browser` is dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    ws: Socket,
    next_id: u64,
    /// Dialogs (`alert()` and the like) that pages opened.
    pub dialogs: Vec<String>,
}

/// The Chromium binary: `$CHROMIUM`, else the first of the usual names on the PATH.
fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return p.into();
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        let found = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        });
        if let Some(p) = found {
            return p;
        }
    }
    panic!("no Chromium found: run ./scripts/setup.sh (it installs Debian's chromium)");
}

impl Browser {
    /// Starts Chromium with a window `width` CSS pixels wide.
    pub async fn start(width: u32) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new(chromium())
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--remote-debugging-port=0",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-default-apps",
                "--disable-extensions",
                "--disable-domain-reliability",
                "--disable-client-side-phishing-detection",
                "--disable-features=Translate,OptimizationHints,MediaRouter,InterestFeedContentSuggestions",
                "--metrics-recording-only",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
                "--hide-scrollbars",
                "--force-color-profile=srgb",
                "--lang=en-US",
            ])
            .arg(format!("--window-size={width},900"))
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium starts");
        // Chromium writes the port it chose (and the browser's path) into the profile.
        let port_file = profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(30);
        let port: u16 = loop {
            // two lines (the port, the browser's path) once it is written in full
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                let lines: Vec<&str> = text.lines().collect();
                if lines.len() >= 2 {
                    if let Ok(p) = lines[0].trim().parse() {
                        break p;
                    }
                }
            }
            assert!(Instant::now() < deadline, "chromium did not start in 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let targets: Value = reqwest::get(format!("http://127.0.0.1:{port}/json/list"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let page = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .expect("chromium has a page")["webSocketDebuggerUrl"]
            .as_str()
            .unwrap()
            .to_string();
        let (ws, _) = tokio_tungstenite::connect_async(page).await.unwrap();
        let mut b = Browser {
            child,
            _profile: profile,
            ws,
            next_id: 0,
            dialogs: Vec::new(),
        };
        b.call("Page.enable", json!({})).await;
        b.set_width(width).await;
        b
    }

    /// Sends a DevTools command and returns its result; events that arrive meanwhile are
    /// noted (dialogs) or dropped.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        match self.try_call(method, params).await {
            Ok(v) => v,
            Err(e) => panic!("{method} failed: {e}"),
        }
    }

    /// As [`Browser::call`], with DevTools' error returned (a page navigating away mid-call).
    pub async fn try_call(&mut self, method: &str, params: Value) -> Result<Value, Value> {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws.send(Message::text(msg)).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let next = tokio::time::timeout(left, self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("chromium did not answer {method} in 30 s"));
            let text = match next {
                Some(Ok(Message::Text(text))) => text,
                Some(Ok(_)) => continue,
                other => panic!("the DevTools connection ended during {method}: {other:?}"),
            };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["method"] == "Page.javascriptDialogOpening" {
                self.dialogs
                    .push(v["params"]["message"].as_str().unwrap_or("").to_string());
                // answer it, or the page stays blocked (sent without waiting for its reply)
                self.next_id += 1;
                let close = json!({"id": self.next_id, "method": "Page.handleJavaScriptDialog",
                    "params": {"accept": true}});
                self.ws
                    .send(Message::text(close.to_string()))
                    .await
                    .unwrap();
                continue;
            }
            if v["id"] == id {
                if let Some(e) = v.get("error") {
                    return Err(e.clone());
                }
                return Ok(v["result"].clone());
            }
        }
    }

    pub async fn set_width(&mut self, width: u32) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": width < 600}),
        )
        .await;
    }

    /// Evaluates `js` in the page and returns its value (promises are awaited).
    pub async fn eval(&mut self, js: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": js, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        if let Some(e) = r.get("exceptionDetails") {
            panic!("script failed: {js}\n{e}");
        }
        r["result"]["value"].clone()
    }

    pub async fn text(&mut self, selector: &str) -> String {
        let js = format!(
            "(() => {{ const e = document.querySelector({}); return e ? e.textContent : null; }})()",
            json!(selector)
        );
        match self.eval(&js).await {
            Value::String(s) => s,
            _ => panic!("no {selector} on {}", self.url().await),
        }
    }

    pub async fn exists(&mut self, selector: &str) -> bool {
        self.eval(&format!(
            "document.querySelector({}) !== null",
            json!(selector)
        ))
        .await
            == json!(true)
    }

    pub async fn url(&mut self) -> String {
        self.eval("location.href")
            .await
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// Waits until `condition` (JavaScript) is true in the page; panics after 15 s.
    pub async fn wait_for(&mut self, condition: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            // while a page is replaced, evaluation may fail: that is "not yet"
            let ok = self
                .try_call(
                    "Runtime.evaluate",
                    json!({"expression": format!("!!({condition})"), "returnByValue": true}),
                )
                .await;
            if ok.is_ok_and(|ok| ok["result"]["value"] == json!(true)) {
                return;
            }
            if Instant::now() > deadline {
                let url = self.url().await;
                let body = self
                    .eval("document.body ? document.body.innerText : ''")
                    .await;
                panic!("timed out waiting for {condition} on {url}:\n{body}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Marks the current document, runs `action`, and waits for a new document to load.
    async fn expect_navigation(&mut self, action: &str) {
        self.eval(&format!("window.__tgOld = true; {action}; true"))
            .await;
        self.wait_for("!window.__tgOld && document.readyState === 'complete'")
            .await;
    }

    pub async fn goto(&mut self, url: &str) {
        self.eval("window.__tgOld = true").await;
        self.call("Page.navigate", json!({"url": url})).await;
        self.wait_for("!window.__tgOld && document.readyState === 'complete'")
            .await;
    }

    /// Focuses the field and types `text` into it (after clearing it), as a keyboard would.
    pub async fn type_into(&mut self, selector: &str, text: &str) {
        let found = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({}); if (!e) return false; \
                 e.focus(); e.select && e.select(); e.value = ''; return true; }})()",
                json!(selector)
            ))
            .await;
        assert_eq!(found, json!(true), "no field {selector}");
        self.call("Input.insertText", json!({"text": text})).await;
    }

    /// Clicks the element and waits for the page it leads to.
    pub async fn click_and_wait(&mut self, selector: &str) {
        let js = format!(
            "(() => {{ const e = document.querySelector({}); if (!e) throw new Error('no ' + {}); \
             e.click(); }})()",
            json!(selector),
            json!(selector)
        );
        self.expect_navigation(&js).await;
    }

    /// Clicks without waiting for a navigation (a `<summary>`, a copy button).
    pub async fn click(&mut self, selector: &str) {
        let js = format!(
            "(() => {{ const e = document.querySelector({}); if (!e) throw new Error('no ' + {}); \
             e.click(); return true; }})()",
            json!(selector),
            json!(selector)
        );
        self.eval(&js).await;
    }

    /// The browser's cookies, as DevTools reports them (with their HttpOnly and SameSite).
    pub async fn cookies(&mut self) -> Vec<Value> {
        let r = self.call("Network.getAllCookies", json!({})).await;
        r["cookies"].as_array().cloned().unwrap_or_default()
    }

    /// Saves the whole page as `target/screenshots/<name>.png` and returns the path.
    pub async fn screenshot(&mut self, name: &str) -> PathBuf {
        let metrics = self.call("Page.getLayoutMetrics", json!({})).await;
        let size = &metrics["cssContentSize"];
        let (w, h) = (
            size["width"].as_f64().unwrap_or(1440.0),
            size["height"].as_f64().unwrap_or(900.0).min(6000.0),
        );
        let shot = self
            .call(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true,
                       "clip": {"x": 0, "y": 0, "width": w, "height": h, "scale": 1}}),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

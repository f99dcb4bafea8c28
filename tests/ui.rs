//! The status page (`/ui`) in a real headless Chromium driven over the DevTools protocol:
//! it shows a route's weight, follows a weight change made through the API without a
//! reload, asks for a token when it has none, says so when the token is refused, and says
//! so when the admin API goes away. A screenshot lands in `target/test-output/ui.png`.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::*;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const WAIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------
// Chromium over the DevTools protocol
// ---------------------------------------------------------------------------------------

/// Where Debian's `chromium` package (or another Chromium) lives, if anywhere.
fn chromium_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
        .find(|p| p.is_file())
}

/// The browser, or `None` (with a notice) outside CI when it is not installed. CI installs
/// it (`.ci/run`), so there a missing browser fails the test rather than skipping it.
fn chromium_or_skip() -> Option<PathBuf> {
    let found = chromium_path();
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "chromium is not installed; CI needs it for the status page tests \
             (`apt-get install -y chromium`, as .ci/run does)"
        );
        eprintln!("SKIPPED: chromium not found on PATH (apt-get install -y chromium)");
    }
    found
}

/// A headless Chromium with a profile of its own, killed when dropped.
struct Browser {
    child: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn launch(binary: &Path) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-breakpad",
                "--disable-crash-reporter",
                "--disable-dev-shm-usage",
                "--window-size=1280,900",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        let mut browser = Browser {
            child,
            port: 0,
            _profile: profile,
        };
        // Chromium writes the port it chose here once the DevTools server listens.
        let file = browser._profile.path().join("DevToolsActivePort");
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(port) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|t| t.lines().next()?.trim().parse().ok())
            {
                browser.port = port;
                return browser;
            }
            if let Ok(Some(status)) = browser.child.try_wait() {
                panic!("chromium exited before listening: {status}");
            }
            assert!(Instant::now() < deadline, "chromium never wrote {file:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A fresh tab (its own sessionStorage) and a DevTools session on it.
    async fn new_tab(&self) -> Tab {
        let (status, _, body) = request(
            &client(),
            "PUT",
            &format!("http://127.0.0.1:{}/json/new?about:blank", self.port),
            &[],
        )
        .await;
        assert_eq!(status, 200, "/json/new: {body}");
        let target: Value = serde_json::from_str(&body).unwrap();
        let url = target["webSocketDebuggerUrl"].as_str().unwrap();
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("DevTools websocket");
        let mut tab = Tab { ws, next_id: 0 };
        tab.call("Page.enable", json!({})).await;
        tab.call("Runtime.enable", json!({})).await;
        tab
    }
}

impl Drop for Browser {
    /// SIGTERM first: Chromium then ends its renderer and helper processes itself, where a
    /// SIGKILL would leave them orphaned.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One page's DevTools session.
struct Tab {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

impl Tab {
    /// Sends one command and returns its result; events in between are dropped.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let text = json!({ "id": id, "method": method, "params": params }).to_string();
        self.ws.send(Message::text(text)).await.unwrap();
        let answer = tokio::time::timeout(WAIT, async {
            while let Some(message) = self.ws.next().await {
                let Message::Text(text) = message.expect("DevTools message") else {
                    continue;
                };
                let v: Value = serde_json::from_str(text.as_str()).unwrap();
                if v["id"] == id {
                    return v;
                }
            }
            panic!("DevTools closed the connection during {method}");
        })
        .await
        .unwrap_or_else(|_| panic!("no DevTools answer to {method}"));
        assert!(answer.get("error").is_none(), "{method}: {answer}");
        answer["result"].clone()
    }

    async fn navigate(&mut self, url: &str) {
        let result = self.call("Page.navigate", json!({ "url": url })).await;
        assert!(
            result.get("errorText").is_none(),
            "navigate {url}: {result}"
        );
    }

    /// The value of a JavaScript expression in the page.
    async fn eval(&mut self, expression: &str) -> Value {
        self.try_eval(expression)
            .await
            .unwrap_or_else(|e| panic!("{expression}: {e}"))
    }

    /// The value, or the exception it threw (e.g. while the page is still loading).
    async fn try_eval(&mut self, expression: &str) -> Result<Value, Value> {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({ "expression": expression, "returnByValue": true }),
            )
            .await;
        match result.get("exceptionDetails") {
            Some(e) => Err(e.clone()),
            None => Ok(result["result"]["value"].clone()),
        }
    }

    /// Polls `expression` until it equals `want`, failing with the last value and the
    /// page's visible text. Until the navigation commits it may throw; that is "not yet".
    async fn wait_for(&mut self, expression: &str, want: Value) {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.try_eval(expression).await;
            if got.as_ref() == Ok(&want) {
                return;
            }
            if Instant::now() >= deadline {
                let text = self.eval("document.body.innerText").await;
                panic!(
                    "timed out: `{expression}` is {got:?}, want {want}; the page reads:\n{text}"
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn screenshot(&mut self, path: &Path) -> usize {
        let result = self
            .call(
                "Page.captureScreenshot",
                json!({ "format": "png", "captureBeyondViewport": true }),
            )
            .await;
        let png = decode_base64(result["data"].as_str().expect("screenshot data"));
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, &png).unwrap();
        png.len()
    }
}

fn decode_base64(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let digits: Vec<u8> = text.bytes().filter(|&c| c != b'=').map(value).collect();
    digits
        .chunks(4)
        .flat_map(|chunk| {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, d)| n | u32::from(*d) << (18 - 6 * i));
            let bytes = n.to_be_bytes();
            bytes[1..chunk.len()].to_vec()
        })
        .collect()
}

/// `target/test-output/NAME`, the folder test artefacts are kept in.
fn output_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-output")
        .join(name)
}

// ---------------------------------------------------------------------------------------
// Page queries
// ---------------------------------------------------------------------------------------

fn field(route: &str, field: &str) -> String {
    format!(
        "(document.querySelector('[data-route=\"{route}\"] [data-field=\"{field}\"]') || {{}}).textContent"
    )
}

const STATUS: &str = "document.getElementById('status').dataset.state";
const LOGIN_SHOWN: &str = "!document.getElementById('login').hidden";
const MESSAGE: &str = "document.getElementById('message').hidden ? '' : document.getElementById('message').textContent";

/// Route `users` at 10 %, with rollback limits (never reached) so it keeps health figures.
fn users_proxy(legacy: &Backend, target: &Backend) -> Switchyard {
    let mut config = two_sided_config(legacy, target, "{ percentage: { weight: 10 } }", None);
    config.push_str("    rollback: { max_error_rate: 0.5, window: 30s, min_requests: 100000 }\n");
    Switchyard::start(&config)
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_served_without_a_token_and_allows_nothing_external() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = users_proxy(&legacy, &target);
    let (status, headers, body) = get(&proxy.admin_url("/ui"), &[]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    let policy = headers["content-security-policy"].to_str().unwrap();
    assert!(policy.starts_with("default-src 'none'"), "{policy}");
    assert!(policy.contains("connect-src 'self'"), "{policy}");
    assert!(!policy.contains("unsafe-inline"), "{policy}");
    assert!(body.contains("<title>switchyard"), "{body}");
    // The data is not: `/v1` still wants the token.
    let (status, _, _) = get(&proxy.admin_url("/v1/routes"), &[]).await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_a_weight_and_follows_a_change_made_through_the_api() {
    let Some(binary) = chromium_or_skip() else {
        return;
    };
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = users_proxy(&legacy, &target);
    // Some traffic, so the health columns have figures.
    for _ in 0..20 {
        get(&proxy.url("/api/users/1"), &[]).await;
    }
    let browser = Browser::launch(&binary).await;
    let mut tab = browser.new_tab().await;

    tab.navigate(&format!("http://{}/ui#token={TOKEN}", proxy.admin))
        .await;
    tab.wait_for(&field("users", "weight"), json!("10")).await;
    tab.wait_for(STATUS, json!("ok")).await;
    assert_eq!(tab.eval(&field("users", "split")).await, "percentage");
    assert_eq!(tab.eval(&field("users", "state")).await, "active");
    // The health figures of the 20 requests made before.
    let requests = format!(
        "Number({}) + Number({})",
        field("users", "legacy-requests"),
        field("users", "target-requests")
    );
    tab.wait_for(&requests, json!(20)).await;
    // The token left the address bar once it was taken.
    assert_eq!(tab.eval("location.hash").await, "");

    let (status, _, body) = put_json(&proxy, "/v1/routes/users/weight", r#"{"weight": 35}"#).await;
    assert_eq!(status, 200, "{body}");
    let before = tab.eval("performance.timeOrigin").await;
    tab.wait_for(&field("users", "weight"), json!("35")).await;
    assert_eq!(tab.eval(&field("users", "weight-runtime")).await, "35");
    assert_eq!(tab.eval(&field("users", "weight-file")).await, "10");
    assert_eq!(
        tab.eval("performance.timeOrigin").await,
        before,
        "the page must update without a reload"
    );
    // Sections whose endpoint is not there yet (or not configured) say so instead of failing.
    for section in ["rollouts", "sync", "consistency"] {
        let text = tab
            .eval(&format!("document.getElementById('{section}').textContent"))
            .await;
        assert!(
            text.as_str().is_some_and(|t| !t.is_empty()),
            "{section}: {text}"
        );
    }

    let path = output_path("ui.png");
    let size = tab.screenshot(&path).await;
    println!("status page screenshot: {}", path.display());
    assert!(size > 10_000, "a {size}-byte screenshot is too small");
    assert!(std::fs::metadata(&path).unwrap().len() > 10_000);

    // The admin API goes away: the page says so and keeps the last figures.
    drop(proxy);
    tab.wait_for(STATUS, json!("unreachable")).await;
    let message = tab.eval(MESSAGE).await;
    assert!(
        message.as_str().unwrap().contains("unreachable"),
        "{message}"
    );
    assert_eq!(tab.eval(&field("users", "weight")).await, "35");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_asks_for_a_token_and_reports_a_refused_one() {
    let Some(binary) = chromium_or_skip() else {
        return;
    };
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = users_proxy(&legacy, &target);
    let browser = Browser::launch(&binary).await;

    // No token: the form, and no data.
    let mut tab = browser.new_tab().await;
    tab.navigate(&format!("http://{}/ui", proxy.admin)).await;
    tab.wait_for(LOGIN_SHOWN, json!(true)).await;
    tab.wait_for(STATUS, json!("no-token")).await;
    assert_eq!(
        tab.eval("document.getElementById('data').hidden").await,
        true
    );

    // The token typed into the form once: the page goes live.
    tab.eval(&format!(
        "document.getElementById('token').value = '{TOKEN}'; \
         document.getElementById('login').requestSubmit(); true"
    ))
    .await;
    tab.wait_for(&field("users", "weight"), json!("10")).await;
    assert_eq!(tab.eval(LOGIN_SHOWN).await, false);

    // A wrong token (in a fresh tab): the 401 message and the form again.
    let mut wrong = browser.new_tab().await;
    wrong
        .navigate(&format!("http://{}/ui#token=not-the-token", proxy.admin))
        .await;
    wrong.wait_for(STATUS, json!("unauthorized")).await;
    assert_eq!(wrong.eval(LOGIN_SHOWN).await, true);
    let message = wrong.eval(MESSAGE).await;
    assert!(message.as_str().unwrap().contains("401"), "{message}");
    assert_eq!(
        wrong
            .eval("sessionStorage.getItem('switchyard.token')")
            .await,
        Value::Null,
        "a refused token is forgotten"
    );
}

/// Answers shaped like the rollout, sync and consistency endpoints' (which may not exist in
/// this build), served to the page by a `fetch` stand-in; `/v1/routes` stays real.
const STUB: &str = r#"
(() => {
  const answers = {
    "/v1/rollouts/users": { route: "users", state: "progressing", step: 2, steps: [5, 25, 50, 100],
      weight: 25, bake_left_seconds: 42.5,
      gates: [ { name: "max_error_rate", figure: 0.002, limit: 0.01, passing: true },
               { name: "max_sync_lag", figure: 0.8, limit: 0.5, passing: false } ],
      history: [ { at: "2030-01-01T00:00:00Z", event: "step", weight: 5 },
                 { at: "2030-01-01T00:02:00Z", event: "step", weight: 25 } ] },
    "/v1/sync": { pairs: [ { name: "users", phase: "stream", lag_p95_seconds: 0.12,
      changes_per_second: 48.5, stale: false } ] },
    "/v1/consistency": [ { name: "users", ratio: 0.9995, lower_bound: 0.998, sampled: 12000,
      mismatched: 6, stale: true } ],
  };
  const real = window.fetch.bind(window);
  window.fetch = (path, options) => {
    const body = answers[String(path)];
    if (body === undefined) return real(path, options);
    return Promise.resolve(new Response(JSON.stringify(body),
      { status: 200, headers: { "content-type": "application/json" } }));
  };
})();
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_renders_rollout_gates_sync_and_consistency_figures() {
    let Some(binary) = chromium_or_skip() else {
        return;
    };
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = users_proxy(&legacy, &target);
    let browser = Browser::launch(&binary).await;
    let mut tab = browser.new_tab().await;
    tab.call(
        "Page.addScriptToEvaluateOnNewDocument",
        json!({ "source": STUB }),
    )
    .await;
    tab.navigate(&format!("http://{}/ui#token={TOKEN}", proxy.admin))
        .await;

    let rollout = |field: &str| {
        format!(
            "(document.querySelector('[data-rollout=\"users\"] [data-field=\"{field}\"]') || {{}}).textContent"
        )
    };
    let gate = |name: &str, field: &str| {
        format!(
            "(document.querySelector('[data-gate=\"{name}\"] [data-field=\"{field}\"]') || {{}}).textContent"
        )
    };
    let pair = |section: &str, field: &str| {
        format!(
            "(document.querySelector('#{section} [data-pair=\"users\"] [data-field=\"{field}\"]') || {{}}).textContent"
        )
    };
    tab.wait_for(&rollout("state"), json!("progressing")).await;
    assert_eq!(tab.eval(&rollout("step")).await, "2");
    assert_eq!(tab.eval(&rollout("bake_left_seconds")).await, "42.5 s");
    assert_eq!(tab.eval(&gate("max_error_rate", "passing")).await, "pass");
    assert_eq!(tab.eval(&gate("max_sync_lag", "passing")).await, "fail");
    assert_eq!(tab.eval(&gate("max_sync_lag", "figure")).await, "0.8");
    assert_eq!(tab.eval(&pair("sync", "phase")).await, "stream");
    assert_eq!(tab.eval(&pair("sync", "lag_p95_seconds")).await, "0.12 s");
    assert_eq!(tab.eval(&pair("sync", "changes_per_second")).await, "48.5");
    assert_eq!(tab.eval(&pair("consistency", "ratio")).await, "0.9995");
    assert_eq!(tab.eval(&pair("consistency", "lower_bound")).await, "0.998");
    assert_eq!(tab.eval(&pair("consistency", "mismatched")).await, "6");
    assert_eq!(tab.eval(&pair("consistency", "stale")).await, "yes");
    // The real route is still there beside the stand-ins.
    assert_eq!(tab.eval(&field("users", "weight")).await, "10");

    let path = output_path("ui-rollout.png");
    let size = tab.screenshot(&path).await;
    println!("status page screenshot with a rollout: {}", path.display());
    assert!(size > 10_000, "a {size}-byte screenshot is too small");
}

//! Test harness: real backends and real `switchyard` processes on ephemeral loopback ports,
//! and waiting for conditions with a deadline (never for a fixed time).
#![allow(dead_code)]

pub mod db;
pub mod pki;
pub mod prometheus;

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

pub type BoxBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

/// Polls `condition` until it holds or `timeout` passes, then panics with `what`.
pub async fn eventually<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A real HTTP/1.1 backend on 127.0.0.1:0.
///
/// Paths it understands:
/// * `/__sleep/MS` answers after MS milliseconds;
/// * `/__download/BYTES` streams BYTES bytes of `x` in 64 KiB frames;
/// * `/__upload` reads the whole body and answers with its length;
/// * `/__status/CODE` answers with that status;
/// * anything else answers 200 with a JSON echo:
///   `{"backend": NAME, "method", "path", "query", "headers": {name: value}}`
///   and header `x-backend: NAME`.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    requests: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicU64::new(0));
        let name_owned: Arc<str> = Arc::from(name);
        let counter = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let name = name_owned.clone();
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| {
                        counter.fetch_add(1, Ordering::Relaxed);
                        answer(name.clone(), req)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Backend {
            name: name.to_string(),
            addr,
            requests,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests this backend has received.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(name: Arc<str>, req: Request<Incoming>) -> Result<Response<BoxBody>, Infallible> {
    let path = req.uri().path().to_string();
    if let Some(ms) = path.strip_prefix("/__sleep/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        return Ok(text(StatusCode::OK, &name));
    }
    if let Some(code) = path.strip_prefix("/__status/") {
        let status = StatusCode::from_u16(code.parse().unwrap_or(500)).unwrap();
        return Ok(text(status, &name));
    }
    if let Some(n) = path.strip_prefix("/__download/") {
        let total: u64 = n.parse().unwrap_or(0);
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let frames = futures_util::stream::unfold(0u64, move |sent| {
            let chunk = chunk.clone();
            async move {
                if sent >= total {
                    return None;
                }
                let len = (total - sent).min(chunk.len() as u64);
                Some((
                    Ok::<_, std::io::Error>(Frame::data(chunk.slice(..len as usize))),
                    sent + len,
                ))
            }
        });
        let mut response = Response::new(BodyExt::boxed(StreamBody::new(frames)));
        response
            .headers_mut()
            .insert("x-backend", name.parse().unwrap());
        return Ok(response);
    }
    if path == "/__upload" {
        let mut body = req.into_body();
        let mut total = 0u64;
        while let Some(frame) = body.frame().await {
            match frame {
                Ok(f) => total += f.data_ref().map_or(0, |d| d.len() as u64),
                Err(_) => return Ok(text(StatusCode::BAD_REQUEST, "body error")),
            }
        }
        return Ok(text(StatusCode::OK, &total.to_string()));
    }
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                serde_json::Value::from(v.to_str().unwrap_or("")),
            )
        })
        .collect();
    let echo = serde_json::json!({
        "backend": &*name,
        "method": req.method().as_str(),
        "path": path,
        "query": req.uri().query(),
        "headers": headers,
    });
    let mut response = text(StatusCode::OK, &echo.to_string());
    response
        .headers_mut()
        .insert("x-backend", name.parse().unwrap());
    Ok(response)
}

fn text(status: StatusCode, body: &str) -> Response<BoxBody> {
    let mut response = Response::new(
        Full::new(Bytes::from(body.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response
}

/// A `switchyard serve` process. Killed on drop.
pub struct Switchyard {
    child: Child,
    pub http: SocketAddr,
    pub admin: SocketAddr,
    /// The HTTPS listener, when the config has `listen.https`.
    pub https: Option<SocketAddr>,
    pub config_path: PathBuf,
    _dir: Option<tempfile::TempDir>,
}

/// A config file in a fresh temporary directory. `listen` and `admin` are added when the
/// text has none, both on `127.0.0.1:0`, and a state store of its own (see `with_listeners`).
pub fn write_config(yaml: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.yaml");
    std::fs::write(&path, with_listeners(yaml)).unwrap();
    (dir, path)
}

/// The admin token every test proxy is started with.
pub const TOKEN: &str = "test-token";

/// Also gives the config its own SQLite state store unless it names one: the default path
/// is relative to the working directory, which every test shares.
pub fn with_listeners(yaml: &str) -> String {
    let mut text = String::new();
    if !yaml.contains("state:") {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        // A fresh directory per test process: a name made of the pid alone was reused by a
        // later process with the same pid, which then read an old run's runtime weights.
        static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
        let dir = DIR.get_or_init(|| {
            tempfile::Builder::new()
                .prefix("switchyard-tests-")
                .tempdir()
                .unwrap()
                .keep()
        });
        let db = dir.join(format!("state-{}.db", NEXT.fetch_add(1, Ordering::Relaxed)));
        text.push_str(&format!(
            "state: {{ url: \"sqlite://{}\" }}\n",
            db.display()
        ));
    }
    if !yaml.contains("listen:") {
        text.push_str("listen: { http: \"127.0.0.1:0\" }\nadmin: { listen: \"127.0.0.1:0\" }\n");
    }
    text.push_str(yaml);
    text
}

impl Switchyard {
    /// Writes `yaml` to a temporary file and serves it.
    pub fn start(yaml: &str) -> Switchyard {
        let (dir, path) = write_config(yaml);
        let mut s = Switchyard::start_file(&path);
        s._dir = Some(dir);
        s
    }

    /// Serves an existing config file; waits until the process says where it listens.
    pub fn start_file(path: &Path) -> Switchyard {
        Self::start_with(path, &[])
    }

    pub fn start_with(path: &Path, extra_args: &[&str]) -> Switchyard {
        Self::start_env(path, extra_args, &[])
    }

    /// Like `start_with`, with extra environment variables (e.g. SWITCHYARD_FAILPOINT).
    pub fn start_env(path: &Path, extra_args: &[&str], envs: &[(&str, &str)]) -> Switchyard {
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args([
                "--log-format",
                "json",
                "--log-level",
                "warn",
                "serve",
                "--config",
            ])
            .arg(path)
            .args(extra_args)
            .env("SWITCHYARD_ADMIN_TOKEN", TOKEN)
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start switchyard");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        // Blocks until the listening line arrives; the process exits (EOF) if it failed.
        BufReader::new(stdout).read_line(&mut line).unwrap();
        assert!(
            !line.is_empty(),
            "switchyard exited before listening: {:?}",
            child.wait()
        );
        let v: serde_json::Value = serde_json::from_str(&line).expect("listening line is JSON");
        Switchyard {
            http: v["http"].as_str().unwrap().parse().unwrap(),
            admin: v["admin"].as_str().unwrap().parse().unwrap(),
            https: v["https"].as_str().map(|a| a.parse().unwrap()),
            child,
            config_path: path.to_path_buf(),
            _dir: None,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    /// Waits until `switchyard_config_reloads_total{result}` reaches `at_least`.
    pub async fn wait_reloads(&self, result: &str, at_least: f64) {
        let sample = format!("switchyard_config_reloads_total{{result=\"{result}\"}}");
        eventually(
            Duration::from_secs(5),
            &format!("{at_least} {result} reloads"),
            || async { self.metric(&sample).await.unwrap_or(0.0) >= at_least },
        )
        .await;
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Resident set size in KiB, from /proc.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Waits for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "switchyard did not exit within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub async fn metrics(&self) -> String {
        let (status, _, body) = get(&self.admin_url("/metrics"), &[]).await;
        assert_eq!(status, StatusCode::OK);
        body
    }

    /// The value of one metric sample, e.g. `switchyard_config_reloads_total{result="success"}`.
    pub async fn metric(&self, sample: &str) -> Option<f64> {
        let text = self.metrics().await;
        text.lines().find_map(|l| {
            l.strip_prefix(sample)
                .and_then(|rest| rest.trim().parse().ok())
        })
    }
}

impl Drop for Switchyard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client() -> Client<HttpConnector, BoxBody> {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A GET with extra headers; returns status, headers and the body as text.
pub async fn get(url: &str, headers: &[(&str, &str)]) -> (StatusCode, HeaderMap, String) {
    request(&client(), "GET", url, headers).await
}

pub async fn request(
    client: &Client<HttpConnector, BoxBody>,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, String) {
    let mut builder = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let req = builder
        .body(
            Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap();
    let response = client.request(req).await.expect("request");
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.expect("body").to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

/// Which backend answered, from the `x-backend` header.
pub fn backend_of(headers: &HeaderMap) -> Option<&str> {
    headers.get("x-backend").and_then(|v| v.to_str().ok())
}

/// Sends raw bytes on a fresh TCP connection and returns everything read until the
/// server closes or `timeout` passes.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(timeout, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Two backends named `legacy` and `target` and a config with one route `users` on
/// `/api/users` splitting between them with `split` and optional `sticky` YAML.
pub fn two_sided_config(
    legacy: &Backend,
    target: &Backend,
    split: &str,
    sticky: Option<&str>,
) -> String {
    let sticky = sticky
        .map(|s| format!("    sticky: {s}\n"))
        .unwrap_or_default();
    users_route(&legacy.url(), &target.url(), split, &sticky)
}

/// Backends `legacy` and `target` at these URLs and one route `users` on `/api/users`
/// with `split`, followed by `route_extra`: more keys of the route, each line indented
/// by four spaces and ending in a newline.
pub fn users_route(legacy: &str, target: &str, split: &str, route_extra: &str) -> String {
    format!(
        "backends:\n  legacy: {{ endpoints: [\"{legacy}\"] }}\n  target: {{ endpoints: [\"{target}\"] }}\n\
default_backend: legacy\n\
routes:\n  - name: users\n    match: {{ path_prefix: /api/users }}\n    legacy: legacy\n    target: target\n    split: {split}\n{route_extra}"
    )
}

/// A JSON request to the admin API with the test token: status and body.
pub async fn admin_call(
    proxy: &Switchyard,
    method: &str,
    path: &str,
    body: &str,
) -> (StatusCode, String) {
    let req = Request::builder()
        .method(method)
        .uri(proxy.admin_url(path))
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(body.to_string()))
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap();
    let response = client().request(req).await.expect("admin request");
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// `PUT` with a JSON body to the admin API: status, headers (empty) and body.
pub async fn put_json(
    proxy: &Switchyard,
    path: &str,
    body: &str,
) -> (StatusCode, HeaderMap, String) {
    let (status, text) = admin_call(proxy, "PUT", path, body).await;
    (status, HeaderMap::new(), text)
}

/// A config the file watcher cannot see change: the proxy is given `link`, a symlink in one
/// directory to `real` in another, and the watcher observes the link's directory, so writes
/// to `real` reach the proxy only through SIGHUP.
pub struct HupOnlyConfig {
    pub real: PathBuf,
    pub link: PathBuf,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl HupOnlyConfig {
    pub fn new(text: &str) -> HupOnlyConfig {
        let watched = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir().unwrap();
        let real = elsewhere.path().join("real.yaml");
        let link = watched.path().join("switchyard.yaml");
        std::fs::write(&real, text).unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();
        HupOnlyConfig {
            real,
            link,
            _dirs: (watched, elsewhere),
        }
    }
}

/// A backend whose answers a test switches while it runs: `set_status(500)` makes every
/// answer a 500 (with `x-backend: NAME`), `set_status(200)` heals it. Every request body it
/// receives is kept, so it also serves as a webhook receiver (or a webhook gate).
pub struct Switchable {
    pub addr: SocketAddr,
    status: Arc<std::sync::atomic::AtomicU16>,
    bodies: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Switchable {
    pub async fn start(name: &'static str) -> Switchable {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(std::sync::atomic::AtomicU16::new(200));
        let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (st, seen) = (status.clone(), bodies.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (st, seen) = (st.clone(), seen.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let (st, seen) = (st.clone(), seen.clone());
                        async move {
                            // A body the client broke off arrives here broken too.
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|c| c.to_bytes())
                                .unwrap_or_default();
                            if !body.is_empty() {
                                seen.lock()
                                    .unwrap()
                                    .push(String::from_utf8_lossy(&body).into_owned());
                            }
                            let code = StatusCode::from_u16(st.load(Ordering::Relaxed)).unwrap();
                            let mut r = text(code, name);
                            r.headers_mut().insert("x-backend", name.parse().unwrap());
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Switchable {
            addr,
            status,
            bodies,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_status(&self, code: u16) {
        self.status.store(code, Ordering::Relaxed);
    }

    /// Every non-empty request body received so far, parsed as JSON where it is.
    pub fn bodies(&self) -> Vec<serde_json::Value> {
        self.bodies
            .lock()
            .unwrap()
            .iter()
            .filter_map(|b| serde_json::from_str(b).ok())
            .collect()
    }
}

impl Drop for Switchable {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs `switchyard ctl --admin … --token … ARGS` and returns its exit code and stdout.
pub fn ctl(proxy: &Switchyard, args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["ctl", "--admin", &proxy.admin_url(""), "--token", TOKEN])
        .args(args)
        .output()
        .expect("run switchyard ctl");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `GET /v1/rollouts/{route}`, which must answer 200.
pub async fn rollout_view(proxy: &Switchyard, route: &str) -> serde_json::Value {
    let (status, body) = admin_call(proxy, "GET", &format!("/v1/rollouts/{route}"), "").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Polls a route's rollout view until `f` holds; panics with the last view after `within`.
pub async fn wait_rollout(
    proxy: &Switchyard,
    route: &str,
    within: Duration,
    what: &str,
    f: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let view = rollout_view(proxy, route).await;
        if f(&view) {
            return view;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {view:#}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `switchyard sync install --config PATH`, which must succeed.
pub fn sync_install(path: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["sync", "install", "--config"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

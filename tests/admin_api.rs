//! The admin API and the control plane behind it, end to end against real `switchyard`
//! processes and real state stores (SQLite files and PostgreSQL databases): bearer auth,
//! ETags and If-Match, refusals (422/400) and their audit trail, a weight in force on the
//! very next request under load, blue-green switch / rollback / reset, feature flags,
//! runtime state surviving a restart and a config reload, two replicas converging through
//! one Postgres store, a store outage that leaves routing alone, who-did-what in the audit
//! log, the refusal to expose an admin API without a token, and the OpenAPI document
//! agreeing with the router.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::{AssertSqlSafe, Connection, PgConnection, SqliteConnection};
use support::*;

const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Admin client
// ---------------------------------------------------------------------------------------

/// One admin API answer.
#[derive(Debug)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Reply {
    #[track_caller]
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    /// Asserts the status and hands the reply on.
    #[track_caller]
    fn expect(self, status: u16) -> Reply {
        assert_eq!(self.status, status, "unexpected answer: {}", self.body);
        self
    }

    /// Asserts an error answer: the status, `{"error": {"code", "message"}}` and the code.
    #[track_caller]
    fn expect_error(self, status: u16, code: &str) -> Reply {
        let reply = self.expect(status);
        let v = reply.json();
        assert_eq!(v["error"]["code"], code, "{}", reply.body);
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "an error needs a message: {}",
            reply.body
        );
        reply
    }

    #[track_caller]
    fn etag(&self) -> String {
        self.headers
            .get("etag")
            .unwrap_or_else(|| panic!("no ETag header: {:?}", self.headers))
            .to_str()
            .unwrap()
            .to_string()
    }

    fn content_type(&self) -> &str {
        self.headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

/// Calls the admin listener of one proxy as one token (or none).
struct Admin {
    addr: SocketAddr,
    token: Option<String>,
}

impl Admin {
    fn new(proxy: &Switchyard) -> Admin {
        Admin::with_token(proxy, Some(TOKEN))
    }

    fn with_token(proxy: &Switchyard, token: Option<&str>) -> Admin {
        Admin {
            addr: proxy.admin,
            token: token.map(str::to_string),
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        if_match: Option<&str>,
    ) -> Reply {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("http://{}{}", self.addr, path));
        if let Some(token) = &self.token {
            builder = builder.header("authorization", format!("Bearer {token}"));
        }
        if let Some(tag) = if_match {
            builder = builder.header("if-match", tag);
        }
        let body: BoxBody = match body {
            Some(text) => {
                builder = builder.header("content-type", "application/json");
                Full::new(Bytes::from(text.to_string()))
                    .map_err(|never| match never {})
                    .boxed()
            }
            None => Empty::new().map_err(|never| match never {}).boxed(),
        };
        let response = client()
            .request(builder.body(body).unwrap())
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let (parts, body) = response.into_parts();
        let bytes = body.collect().await.expect("admin body").to_bytes();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    async fn get(&self, path: &str) -> Reply {
        self.call("GET", path, None, None).await
    }

    async fn route(&self, name: &str) -> Value {
        self.get(&format!("/v1/routes/{name}"))
            .await
            .expect(200)
            .json()
    }

    async fn flag(&self, name: &str) -> Value {
        self.get(&format!("/v1/flags/{name}"))
            .await
            .expect(200)
            .json()
    }

    async fn set_weight(&self, route: &str, weight: Value) -> Reply {
        self.call(
            "PUT",
            &format!("/v1/routes/{route}/weight"),
            Some(&json!({ "weight": weight }).to_string()),
            None,
        )
        .await
    }

    async fn switch(&self, route: &str, active: &str) -> Reply {
        self.call(
            "POST",
            &format!("/v1/routes/{route}/switch"),
            Some(&json!({ "active": active }).to_string()),
            None,
        )
        .await
    }

    async fn rollback(&self, route: &str, body: Option<&str>) -> Reply {
        self.call("POST", &format!("/v1/routes/{route}/rollback"), body, None)
            .await
    }

    async fn reset(&self, route: &str) -> Reply {
        self.call("POST", &format!("/v1/routes/{route}/reset"), None, None)
            .await
    }

    async fn set_flag(&self, flag: &str, percentage: Value) -> Reply {
        self.call(
            "PUT",
            &format!("/v1/flags/{flag}"),
            Some(&json!({ "percentage": percentage }).to_string()),
            None,
        )
        .await
    }

    /// The audit log, newest first.
    async fn audit(&self) -> Vec<Value> {
        let v = self.get("/v1/audit").await.expect(200).json();
        v["entries"].as_array().expect("entries").clone()
    }
}

// ---------------------------------------------------------------------------------------
// Configs, proxies, load
// ---------------------------------------------------------------------------------------

/// Backends `legacy` and `target`, flag `new-search` at 0 %, and three routes:
/// `users` (percentage, weight `users_weight`) on `/api/users`, `orders` (blue_green,
/// active legacy) on `/api/orders`, `search` (feature_flag new-search) on `/search`.
fn routes_yaml(legacy: &Backend, target: &Backend, users_weight: &str) -> String {
    [
        "backends:".to_string(),
        format!("  legacy: {{ endpoints: [\"{}\"] }}", legacy.url()),
        format!("  target: {{ endpoints: [\"{}\"] }}", target.url()),
        "default_backend: legacy".to_string(),
        "flags:".to_string(),
        "  new-search: { percentage: 0 }".to_string(),
        "routes:".to_string(),
        format!(
            "  - {{ name: users, match: {{ path_prefix: /api/users }}, legacy: legacy, target: target, split: {{ percentage: {{ weight: {users_weight} }} }} }}"
        ),
        "  - { name: orders, match: { path_prefix: /api/orders }, legacy: legacy, target: target, split: { blue_green: { active: legacy } } }".to_string(),
        "  - { name: search, match: { path_prefix: /search }, legacy: legacy, target: target, split: { feature_flag: { flag: new-search } } }".to_string(),
        String::new(),
    ]
    .join("\n")
}

fn state_line(url: &str) -> String {
    format!("state: {{ url: \"{url}\" }}\n")
}

fn sqlite_url(db: &Path) -> String {
    format!("sqlite://{}", db.display())
}

/// Which backend answers a fresh GET on `path`.
async fn answered_by(proxy: &Switchyard, path: &str) -> String {
    let (status, headers, body) = get(&proxy.url(path), &[]).await;
    assert_eq!(status, 200, "GET {path} through the proxy: {body}");
    backend_of(&headers).unwrap_or("-").to_string()
}

/// `n` fresh requests on `path` all answered by `backend`.
async fn all_answered_by(proxy: &Switchyard, path: &str, backend: &str, n: usize) {
    for i in 0..n {
        assert_eq!(
            answered_by(proxy, path).await,
            backend,
            "request {i} of {n} on {path}"
        );
    }
}

/// One proxied request as a load task saw it.
#[derive(Debug, Clone)]
struct Record {
    sent: Instant,
    received: Instant,
    backend: String,
}

/// Client tasks, each on ONE keep-alive connection to the proxy, sending GETs back to back
/// and recording when each was sent and answered and by whom.
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<(Vec<Record>, Vec<String>)>>,
}

impl Load {
    fn start(proxy: SocketAddr, path: &str, tasks: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let tasks = (0..tasks)
            .map(|_| {
                tokio::spawn(load_task(
                    proxy,
                    path.to_string(),
                    stop.clone(),
                    done.clone(),
                ))
            })
            .collect();
        Load { stop, done, tasks }
    }

    /// Waits until the tasks together have completed `n` more requests from now.
    async fn progress(&self, n: u64) {
        let from = self.done.load(Ordering::Relaxed);
        eventually(WAIT, "the load to make progress", || async {
            self.done.load(Ordering::Relaxed) >= from + n
        })
        .await;
    }

    /// Every record and every failure (non-200, connection or body error).
    async fn finish(self) -> (Vec<Record>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut records = Vec::new();
        let mut failures = Vec::new();
        for t in self.tasks {
            let (r, f) = t.await.expect("load task");
            records.extend(r);
            failures.extend(f);
        }
        (records, failures)
    }
}

async fn load_task(
    proxy: SocketAddr,
    path: String,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> (Vec<Record>, Vec<String>) {
    let mut records = Vec::new();
    let mut failures = Vec::new();
    let stream = match tokio::net::TcpStream::connect(proxy).await {
        Ok(s) => s,
        Err(e) => {
            failures.push(format!("connect: {e}"));
            return (records, failures);
        }
    };
    let (mut sender, connection) = match hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(
        TokioIo::new(stream),
    )
    .await
    {
        Ok(pair) => pair,
        Err(e) => {
            failures.push(format!("handshake: {e}"));
            return (records, failures);
        }
    };
    tokio::spawn(connection);
    while !stop.load(Ordering::Relaxed) {
        if let Err(e) = sender.ready().await {
            failures.push(format!("connection no longer usable: {e}"));
            break;
        }
        let req = Request::get(path.as_str())
            .header("host", proxy.to_string())
            .body(Empty::new())
            .unwrap();
        let sent = Instant::now();
        let response = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("request: {e}"));
                break;
            }
        };
        let status = response.status();
        let backend = backend_of(response.headers()).unwrap_or("-").to_string();
        if let Err(e) = response.into_body().collect().await {
            failures.push(format!("body: {e}"));
            break;
        }
        let received = Instant::now();
        if status != 200 {
            failures.push(format!("status {status} from {backend}"));
            continue;
        }
        done.fetch_add(1, Ordering::Relaxed);
        records.push(Record {
            sent,
            received,
            backend,
        });
    }
    (records, failures)
}

#[track_caller]
fn assert_no_failures(failures: &[String]) {
    assert!(
        failures.is_empty(),
        "{} failed requests under load, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

/// The records matching `pick` that were not answered by `backend`.
fn answered_otherwise<'a>(
    records: &'a [Record],
    pick: impl Fn(&Record) -> bool,
    backend: &str,
) -> (usize, Vec<&'a Record>) {
    let picked: Vec<&Record> = records.iter().filter(|r| pick(r)).collect();
    let wrong = picked
        .iter()
        .copied()
        .filter(|r| r.backend != backend)
        .collect();
    (picked.len(), wrong)
}

// ---------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------

fn pg_base() -> String {
    std::env::var("SWITCHYARD_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string())
        .trim_end_matches('/')
        .to_string()
}

async fn pg_maintenance(base: &str) -> Result<PgConnection, sqlx::Error> {
    PgConnection::connect(&format!("{base}/postgres")).await
}

/// A database of its own for one test, dropped (WITH (FORCE)) when the test ends, also
/// when it fails.
struct PgDb {
    base: String,
    name: String,
}

impl PgDb {
    async fn create() -> PgDb {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let base = pg_base();
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let name = format!(
            "sy_test_{}_{}_{}",
            std::process::id(),
            nanos,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut conn = pg_maintenance(&base).await.unwrap_or_else(|e| {
            panic!("cannot reach PostgreSQL at {base} (set SWITCHYARD_TEST_PG): {e}")
        });
        sqlx::query(AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .unwrap();
        let _ = conn.close().await;
        PgDb { base, name }
    }

    fn url(&self) -> String {
        format!("{}/{}", self.base, self.name)
    }

    /// Terminates every server process connected to this database; returns how many.
    async fn terminate_connections(&self) -> usize {
        let mut conn = pg_maintenance(&self.base).await.unwrap();
        let terminated: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
        )
        .bind(&self.name)
        .fetch_all(&mut conn)
        .await
        .unwrap();
        let _ = conn.close().await;
        terminated.into_iter().filter(|t| *t).count()
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let base = self.base.clone();
        let name = self.name.clone();
        // A fresh runtime on a thread of its own: this may run inside the test's runtime.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut conn = pg_maintenance(&base).await?;
                sqlx::query(AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await?;
                conn.close().await
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}: {dropped:?}", self.name);
        }
    }
}

// ---------------------------------------------------------------------------------------
// 1. Auth
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_needs_the_token_and_health_endpoints_do_not() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&routes_yaml(&legacy, &target, "0"));

    for (what, admin) in [
        ("no header", Admin::with_token(&proxy, None)),
        (
            "wrong token",
            Admin::with_token(&proxy, Some("not-the-token")),
        ),
        (
            "token with a suffix",
            Admin::with_token(&proxy, Some(&format!("{TOKEN}x"))),
        ),
    ] {
        for path in ["/v1/routes", "/v1/routes/users", "/v1/audit", "/v1/nope"] {
            let reply = admin.get(path).await.expect_error(401, "unauthorized");
            assert!(
                reply.content_type().starts_with("application/json"),
                "{what} {path}: {}",
                reply.content_type()
            );
        }
        // A change without the token changes nothing.
        admin
            .set_weight("users", json!(100))
            .await
            .expect_error(401, "unauthorized");
    }
    // Another scheme with the right token is not a bearer token.
    let (status, _, body) = get(
        &proxy.admin_url("/v1/routes"),
        &[("authorization", &format!("Basic {TOKEN}"))],
    )
    .await;
    assert_eq!(status, 401, "{body}");

    let admin = Admin::new(&proxy);
    let routes = admin.get("/v1/routes").await.expect(200).json();
    let names: Vec<&str> = routes["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["users", "orders", "search"]);
    assert_eq!(admin.route("users").await["weight"]["in_force"], 0.0);

    // Unknown /v1 path with the token: a JSON 404.
    let reply = admin.get("/v1/nope").await.expect_error(404, "not_found");
    assert!(reply.content_type().starts_with("application/json"));

    // No token needed for the operational endpoints.
    let anonymous = Admin::with_token(&proxy, None);
    let health = anonymous.get("/healthz").await.expect(200).json();
    assert_eq!(health, json!({ "status": "ok" }));
    let ready = anonymous.get("/readyz").await.expect(200).json();
    assert_eq!(
        (&ready["ready"], &ready["state_store"]),
        (&json!(true), &json!("ok"))
    );
    let metrics = anonymous.get("/metrics").await.expect(200);
    assert!(metrics.body.contains("switchyard_"), "{}", metrics.body);

    // The refused change above did not happen.
    all_answered_by(&proxy, "/api/users/1", "legacy", 10).await;
}

// ---------------------------------------------------------------------------------------
// 2. ETag / If-Match
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_if_match_is_refused_with_412_and_changes_nothing() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&routes_yaml(&legacy, &target, "10"));
    let admin = Admin::new(&proxy);

    let first = admin.get("/v1/routes/users").await.expect(200);
    let etag0 = first.etag();
    assert_eq!(
        first.json()["etag"],
        etag0.as_str(),
        "header and body agree"
    );
    assert!(
        etag0.starts_with('"') && etag0.ends_with('"'),
        "a strong ETag is quoted: {etag0}"
    );
    // Reading again without a change gives the same tag.
    assert_eq!(admin.get("/v1/routes/users").await.etag(), etag0);

    let put = admin
        .call(
            "PUT",
            "/v1/routes/users/weight",
            Some(r#"{"weight": 40}"#),
            Some(&etag0),
        )
        .await
        .expect(200);
    let etag1 = put.etag();
    assert_ne!(etag1, etag0, "a change gives a new ETag");
    assert_eq!(put.json()["etag"], etag1.as_str());
    assert_eq!(put.json()["weight"]["in_force"], 40.0);
    assert_eq!(admin.get("/v1/routes/users").await.etag(), etag1);

    // The old tag is stale now.
    admin
        .call(
            "PUT",
            "/v1/routes/users/weight",
            Some(r#"{"weight": 75}"#),
            Some(&etag0),
        )
        .await
        .expect_error(412, "precondition_failed");
    let now = admin.get("/v1/routes/users").await.expect(200);
    assert_eq!(
        now.json()["weight"]["in_force"],
        40.0,
        "the stale PUT changed the weight"
    );
    assert_eq!(now.etag(), etag1);

    // Other changes honour If-Match too.
    admin
        .call("POST", "/v1/routes/users/rollback", None, Some(&etag0))
        .await
        .expect_error(412, "precondition_failed");
    assert_eq!(admin.route("users").await["state"], "active");
    let orders = admin.get("/v1/routes/orders").await.expect(200).etag();
    admin
        .call(
            "POST",
            "/v1/routes/orders/switch",
            Some(r#"{"active": "target"}"#),
            Some(&etag1),
        )
        .await
        .expect_error(412, "precondition_failed");
    admin
        .call(
            "POST",
            "/v1/routes/orders/switch",
            Some(r#"{"active": "target"}"#),
            Some(&orders),
        )
        .await
        .expect(200);
    let flag = admin.get("/v1/flags/new-search").await.expect(200).etag();
    admin
        .call(
            "PUT",
            "/v1/flags/new-search",
            Some(r#"{"percentage": 30}"#),
            Some(&etag1),
        )
        .await
        .expect_error(412, "precondition_failed");
    assert_eq!(
        admin.flag("new-search").await["percentage"]["in_force"],
        0.0
    );
    admin
        .call(
            "PUT",
            "/v1/flags/new-search",
            Some(r#"{"percentage": 30}"#),
            Some(&flag),
        )
        .await
        .expect(200);
    assert_eq!(
        admin.flag("new-search").await["percentage"]["in_force"],
        30.0
    );
}

// ---------------------------------------------------------------------------------------
// 3. Refusals
// ---------------------------------------------------------------------------------------

/// State-store rows an operator change would leave, read straight from the SQLite file.
async fn sqlite_counts(db: &Path) -> (i64, i64, i64) {
    let mut conn = SqliteConnection::connect(&format!("{}?mode=ro", sqlite_url(db)))
        .await
        .unwrap();
    let mut count = async |sql: &'static str| -> i64 {
        sqlx::query_scalar(sql).fetch_one(&mut conn).await.unwrap()
    };
    let routes = count("SELECT COUNT(*) FROM route_overrides").await;
    let flags = count("SELECT COUNT(*) FROM flag_overrides").await;
    let version = count("SELECT version FROM state_version WHERE id = 1").await;
    let _ = conn.close().await;
    (routes, flags, version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_changes_are_refused_audited_and_change_nothing() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let yaml = state_line(&sqlite_url(&db)) + &routes_yaml(&legacy, &target, "0");
    let proxy = Switchyard::start(&yaml);
    let admin = Admin::new(&proxy);

    let before: Vec<Reply> = futures_util::future::join_all(
        [
            "/v1/routes/users",
            "/v1/routes/orders",
            "/v1/flags/new-search",
        ]
        .map(|p| admin.get(p)),
    )
    .await;
    let etags: Vec<String> = before.iter().map(Reply::etag).collect();

    // (method, path, body, status, code, audited as (action, target, has a `before`))
    type Case = (
        &'static str,
        &'static str,
        Option<&'static str>,
        u16,
        &'static str,
        Option<(&'static str, &'static str, bool)>,
    );
    let cases: [Case; 16] = [
        (
            "PUT",
            "/v1/routes/users/weight",
            Some(r#"{"weight": 101}"#),
            422,
            "invalid",
            Some(("set_weight", "users", true)),
        ),
        (
            "PUT",
            "/v1/routes/users/weight",
            Some(r#"{"weight": -1}"#),
            422,
            "invalid",
            Some(("set_weight", "users", true)),
        ),
        (
            "PUT",
            "/v1/routes/users/weight",
            Some(r#"{"weight": 12.345}"#),
            422,
            "invalid",
            Some(("set_weight", "users", true)),
        ),
        (
            "PUT",
            "/v1/routes/orders/weight",
            Some(r#"{"weight": 50}"#),
            422,
            "invalid",
            Some(("set_weight", "orders", true)),
        ),
        (
            "POST",
            "/v1/routes/users/switch",
            Some(r#"{"active": "target"}"#),
            422,
            "invalid",
            Some(("switch", "users", true)),
        ),
        (
            "PUT",
            "/v1/routes/nosuch/weight",
            Some(r#"{"weight": 10}"#),
            404,
            "not_found",
            Some(("set_weight", "nosuch", false)),
        ),
        (
            "POST",
            "/v1/routes/nosuch/switch",
            Some(r#"{"active": "target"}"#),
            404,
            "not_found",
            Some(("switch", "nosuch", false)),
        ),
        (
            "POST",
            "/v1/routes/nosuch/rollback",
            None,
            404,
            "not_found",
            Some(("rollback", "nosuch", false)),
        ),
        (
            "POST",
            "/v1/routes/nosuch/reset",
            None,
            404,
            "not_found",
            Some(("reset", "nosuch", false)),
        ),
        (
            "PUT",
            "/v1/flags/nosuch",
            Some(r#"{"percentage": 10}"#),
            404,
            "not_found",
            Some(("set_flag", "nosuch", false)),
        ),
        (
            "PUT",
            "/v1/flags/new-search",
            Some(r#"{"percentage": 100.5}"#),
            422,
            "invalid",
            Some(("set_flag", "new-search", true)),
        ),
        // Malformed JSON never reaches the control plane.
        (
            "PUT",
            "/v1/routes/users/weight",
            Some(r#"{"weight": "#),
            400,
            "bad_request",
            None,
        ),
        (
            "POST",
            "/v1/routes/orders/switch",
            Some("{active: target}"),
            400,
            "bad_request",
            None,
        ),
        (
            "POST",
            "/v1/routes/users/rollback",
            Some("not json"),
            400,
            "bad_request",
            None,
        ),
        (
            "PUT",
            "/v1/flags/new-search",
            Some("{"),
            400,
            "bad_request",
            None,
        ),
        // Reads of unknown names are 404, and are not changes.
        ("GET", "/v1/routes/nosuch", None, 404, "not_found", None),
    ];
    let mut expected_audit = Vec::new();
    for (method, path, body, status, code, audited) in cases {
        let reply = admin.call(method, path, body, None).await;
        assert_eq!(
            (
                reply.status.as_u16(),
                reply.json()["error"]["code"].as_str()
            ),
            (status, Some(code)),
            "{method} {path} {body:?}: {}",
            reply.body
        );
        expected_audit.extend(audited);
    }
    admin
        .get("/v1/flags/nosuch")
        .await
        .expect_error(404, "not_found");

    // Every audited refusal, in order (the log is newest first), and nothing applied.
    let mut entries = admin.audit().await;
    entries.reverse();
    let seen: Vec<(&str, &str, bool)> = entries
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap(),
                e["target"].as_str().unwrap(),
                !e["before"].is_null(),
            )
        })
        .collect();
    assert_eq!(seen, expected_audit, "audit log: {entries:#?}");
    for e in &entries {
        assert_eq!(e["outcome"], "refused", "{e}");
        assert_eq!(e["actor"], "env", "{e}");
        assert!(e["after"].is_null(), "a refusal has no after: {e}");
        assert!(
            e["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "a refusal says why: {e}"
        );
    }
    // The `before` of a refusal is the route as it was: every field it records equals the
    // view read before (which may carry more, e.g. live figures), and it has no ETag.
    let users_before = before[0].json();
    let recorded = entries[0]["before"].as_object().expect("a before");
    for key in ["name", "split", "weight", "state", "rollback"] {
        assert!(
            recorded.contains_key(key),
            "`before` lacks {key}: {recorded:?}"
        );
    }
    assert!(!recorded.contains_key("etag"));
    for (key, value) in recorded {
        assert_eq!(&users_before[key], value, "`before.{key}` of the refusal");
    }

    // Nothing changed: views, the store, routing.
    for (path, etag) in [
        "/v1/routes/users",
        "/v1/routes/orders",
        "/v1/flags/new-search",
    ]
    .iter()
    .zip(&etags)
    {
        assert_eq!(
            &admin.get(path).await.expect(200).etag(),
            etag,
            "{path} changed"
        );
    }
    assert_eq!(
        sqlite_counts(&db).await,
        (0, 0, 0),
        "(route overrides, flag overrides, version) in the store after refusals only"
    );
    all_answered_by(&proxy, "/api/users/1", "legacy", 10).await;
    all_answered_by(&proxy, "/api/orders/1", "legacy", 5).await;
    all_answered_by(&proxy, "/search?q=x", "legacy", 5).await;
}

/// Regression: a switch to an unknown side was once refused by the HTTP handler before
/// `ControlPlane::change`, so unlike every other refused change it left no audit record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_to_an_unknown_side_is_refused_and_audited() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&routes_yaml(&legacy, &target, "0"));
    let admin = Admin::new(&proxy);
    let etag = admin.get("/v1/routes/orders").await.etag();

    admin
        .switch("orders", "sideways")
        .await
        .expect_error(422, "invalid");

    assert_eq!(admin.get("/v1/routes/orders").await.etag(), etag);
    all_answered_by(&proxy, "/api/orders/1", "legacy", 5).await;
    let entries = admin.audit().await;
    assert!(
        entries.iter().any(|e| e["action"] == "switch"
            && e["target"] == "orders"
            && e["outcome"] == "refused"),
        "the refused switch to `sideways` is not in the audit log: {entries:#?}"
    );
}

// ---------------------------------------------------------------------------------------
// 4. A weight is in force on the next request
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_is_in_force_for_every_request_sent_after_the_put_returned() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&routes_yaml(&legacy, &target, "0"));
    let admin = Admin::new(&proxy);

    let load = Load::start(proxy.http, "/api/users/1", 4);
    load.progress(200).await;

    let up_sent = Instant::now();
    admin.set_weight("users", json!(100)).await.expect(200);
    let up_done = Instant::now();
    load.progress(300).await;

    let down_sent = Instant::now();
    admin.set_weight("users", json!(0)).await.expect(200);
    let down_done = Instant::now();
    load.progress(300).await;

    let (records, failures) = load.finish().await;
    assert_no_failures(&failures);

    let (n, wrong) = answered_otherwise(&records, |r| r.received < up_sent, "legacy");
    assert!(n >= 100, "only {n} requests before the first PUT");
    assert!(
        wrong.is_empty(),
        "target answered at weight 0: {:?}",
        &wrong[..wrong.len().min(3)]
    );

    let (n, wrong) = answered_otherwise(
        &records,
        |r| r.sent > up_done && r.received < down_sent,
        "target",
    );
    assert!(n >= 100, "only {n} requests between the PUTs");
    assert!(
        wrong.is_empty(),
        "{} of {n} requests sent after `PUT weight 100` returned went to legacy; first sent {:?} after the PUT returned",
        wrong.len(),
        wrong.first().map(|r| r.sent - up_done)
    );

    let (n, wrong) = answered_otherwise(&records, |r| r.sent > down_done, "legacy");
    assert!(n >= 100, "only {n} requests after the second PUT");
    assert!(
        wrong.is_empty(),
        "{} of {n} requests sent after `PUT weight 0` returned went to target; first sent {:?} after the PUT returned",
        wrong.len(),
        wrong.first().map(|r| r.sent - down_done)
    );
}

/// Regression: the store sync once read the store outside the state lock and applied what
/// it read afterwards, so a change committed in between was overwritten in memory by older
/// overrides (most visibly right after start: a `PUT weight 100` returned 200 and requests
/// went on to legacy for ~1 s). The read now happens under the lock changes commit under.
///
/// The race is timing-dependent: this test starts up to 20 proxies, changes the weight at
/// once and watches the next 300 ms of requests; on a correct build every round passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_right_after_start_stays_in_force() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    for round in 0..20 {
        let proxy = Switchyard::start(&routes_yaml(&legacy, &target, "0"));
        Admin::new(&proxy)
            .set_weight("users", json!(100))
            .await
            .expect(200);
        let returned = Instant::now();
        let mut requests = 0;
        // An observation window, not a wait: every request in it must go to target.
        while returned.elapsed() < Duration::from_millis(300) {
            let backend = answered_by(&proxy, "/api/users/1").await;
            requests += 1;
            assert_eq!(
                backend,
                "target",
                "round {round}: request {requests}, {:?} after `PUT weight 100` returned, \
                 went to legacy (the store sync adopted overrides read before the change)",
                returned.elapsed()
            );
        }
        assert!(requests >= 10, "only {requests} requests in 300 ms");
    }
}

// ---------------------------------------------------------------------------------------
// 5. Switch, rollback, reset
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_rollback_and_reset_through_the_api() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&routes_yaml(&legacy, &target, "0"));
    let admin = Admin::new(&proxy);

    // Blue-green: switch flips the side.
    all_answered_by(&proxy, "/api/orders/1", "legacy", 5).await;
    let view = admin.switch("orders", "target").await.expect(200).json();
    assert_eq!(
        view["active"],
        json!({ "in_force": "target", "file": "legacy", "runtime": "target", "source": "runtime" })
    );
    assert!(view["weight"].is_null());
    all_answered_by(&proxy, "/api/orders/1", "target", 20).await;
    admin.switch("orders", "legacy").await.expect(200);
    all_answered_by(&proxy, "/api/orders/1", "legacy", 20).await;
    admin.switch("orders", "target").await.expect(200);
    all_answered_by(&proxy, "/api/orders/1", "target", 5).await;

    // Rollback sends everything to legacy, even at weight 100.
    admin.set_weight("users", json!(100)).await.expect(200);
    all_answered_by(&proxy, "/api/users/1", "target", 20).await;
    let view = admin
        .rollback("users", Some(r#"{"reason": "latency"}"#))
        .await
        .expect(200)
        .json();
    assert_eq!(view["state"], "rolled_back");
    assert_eq!(view["rollback"]["by"], "env");
    assert_eq!(view["rollback"]["reason"], "latency");
    assert!(
        view["rollback"]["at"]
            .as_str()
            .is_some_and(|a| a.ends_with('Z'))
    );
    assert_eq!(
        view["weight"],
        json!({ "in_force": 0.0, "file": 0.0, "runtime": 100.0, "source": "rollback" }),
        "nothing reaches the target while rolled back; the weight set is kept"
    );
    all_answered_by(&proxy, "/api/users/1", "legacy", 50).await;
    assert_eq!(admin.route("users").await["state"], "rolled_back");

    // A rollback with no body at all, on the blue-green route.
    let view = admin.rollback("orders", None).await.expect(200).json();
    assert_eq!(view["state"], "rolled_back");
    assert_eq!(view["rollback"]["reason"], "manual");
    all_answered_by(&proxy, "/api/orders/1", "legacy", 20).await;

    // A later weight clears the rollback (and a switch does on blue-green).
    let view = admin
        .set_weight("users", json!(100))
        .await
        .expect(200)
        .json();
    assert_eq!(view["state"], "active");
    assert!(view["rollback"].is_null());
    all_answered_by(&proxy, "/api/users/1", "target", 20).await;
    let view = admin.switch("orders", "target").await.expect(200).json();
    assert_eq!(view["state"], "active");
    all_answered_by(&proxy, "/api/orders/1", "target", 20).await;

    // Reset: back to the file's values.
    let view = admin.reset("users").await.expect(200).json();
    assert_eq!(
        view["weight"],
        json!({ "in_force": 0.0, "file": 0.0, "runtime": null, "source": "file" })
    );
    assert_eq!(view["state"], "active");
    all_answered_by(&proxy, "/api/users/1", "legacy", 20).await;
    let view = admin.reset("orders").await.expect(200).json();
    assert_eq!(
        view["active"],
        json!({ "in_force": "legacy", "file": "legacy", "runtime": null, "source": "file" })
    );
    all_answered_by(&proxy, "/api/orders/1", "legacy", 20).await;

    // Reset also drops a rollback.
    admin.rollback("users", None).await.expect(200);
    let view = admin.reset("users").await.expect(200).json();
    assert_eq!(view["state"], "active");
    assert!(view["rollback"].is_null());
}

// ---------------------------------------------------------------------------------------
// 6. Flags
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flag_percentage_set_through_the_api_moves_a_feature_flag_route() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&routes_yaml(&legacy, &target, "0"));
    let admin = Admin::new(&proxy);

    assert_eq!(admin.route("search").await["flag"], "new-search");
    all_answered_by(&proxy, "/search?q=a", "legacy", 20).await;

    let put = admin.set_flag("new-search", json!(100)).await.expect(200);
    assert_eq!(put.etag(), put.json()["etag"].as_str().unwrap());
    all_answered_by(&proxy, "/search?q=a", "target", 50).await;

    let flags = admin.get("/v1/flags").await.expect(200).json();
    let list = flags["flags"].as_array().expect("flags");
    assert_eq!(list.len(), 1, "{flags}");
    let flag = &list[0];
    assert_eq!(flag["name"], "new-search");
    assert_eq!(
        flag["percentage"],
        json!({ "in_force": 100.0, "file": 0.0, "runtime": 100.0, "source": "runtime" })
    );
    assert_eq!(flag["rules"], 0);
    assert!(flag["sticky"].is_null());
    let one = admin.get("/v1/flags/new-search").await.expect(200);
    assert_eq!(one.json(), *flag);
    assert_eq!(one.etag(), flag["etag"].as_str().unwrap());

    // The other routes are untouched by a flag.
    all_answered_by(&proxy, "/api/users/1", "legacy", 10).await;

    admin.set_flag("new-search", json!(0)).await.expect(200);
    all_answered_by(&proxy, "/search?q=a", "legacy", 50).await;
    let flag = admin.flag("new-search").await;
    assert_eq!(flag["percentage"]["in_force"], 0.0);
    assert_eq!(flag["percentage"]["source"], "runtime");

    // Unknown flags: 404 for a change as for a read.
    admin
        .set_flag("nosuch", json!(10))
        .await
        .expect_error(404, "not_found");
    admin
        .get("/v1/flags/nosuch")
        .await
        .expect_error(404, "not_found");
}

// ---------------------------------------------------------------------------------------
// 7. Restart and reload with SQLite
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runtime_state_survives_a_restart_and_a_reload_of_the_file() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let path = dir.path().join("switchyard.yaml");
    let config = |weight: &str| {
        with_listeners(&(state_line(&sqlite_url(&db)) + &routes_yaml(&legacy, &target, weight)))
    };
    std::fs::write(&path, config("0")).unwrap();

    let first = Switchyard::start_file(&path);
    let view = Admin::new(&first)
        .set_weight("users", json!(100))
        .await
        .expect(200)
        .json();
    assert_eq!(view["weight"]["in_force"], 100.0);
    // (Routing right after this PUT is `a_change_right_after_start_stays_in_force`'s.)
    drop(first); // SIGKILL: nothing is written on the way out.

    let proxy = Switchyard::start_file(&path);
    let admin = Admin::new(&proxy);
    // In force from the first request on: the store is read before the listener opens.
    all_answered_by(&proxy, "/api/users/1", "target", 30).await;
    assert_eq!(
        admin.route("users").await["weight"],
        json!({ "in_force": 100.0, "file": 0.0, "runtime": 100.0, "source": "runtime" })
    );

    // A new file weight, picked up on SIGHUP: the runtime override stays on top.
    std::fs::write(&path, config("50")).unwrap();
    proxy.signal("HUP");
    eventually(WAIT, "the reload to show file weight 50", || async {
        admin.route("users").await["weight"]["file"] == 50.0
    })
    .await;
    assert!(
        proxy
            .metric("switchyard_config_reloads_total{result=\"success\"}")
            .await
            .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(
        admin.route("users").await["weight"],
        json!({ "in_force": 100.0, "file": 50.0, "runtime": 100.0, "source": "runtime" })
    );
    all_answered_by(&proxy, "/api/users/1", "target", 50).await;

    // Until reset: then the file's (new) value is in force.
    let view = admin.reset("users").await.expect(200).json();
    assert_eq!(
        view["weight"],
        json!({ "in_force": 50.0, "file": 50.0, "runtime": null, "source": "file" })
    );
}

// ---------------------------------------------------------------------------------------
// 8. Two replicas on one Postgres store
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_postgres_store_converge_within_a_second() {
    let pg = PgDb::create().await;
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let yaml = state_line(&pg.url()) + &routes_yaml(&legacy, &target, "0");
    let a = Switchyard::start(&yaml);
    let b = Switchyard::start(&yaml);
    let (admin_a, admin_b) = (Admin::new(&a), Admin::new(&b));
    for proxy in [&a, &b] {
        let ready = Admin::with_token(proxy, None)
            .get("/readyz")
            .await
            .expect(200);
        assert_eq!(ready.json()["state_store"], "ok");
    }
    all_answered_by(&b, "/api/users/1", "legacy", 10).await;

    admin_a.set_weight("users", json!(100)).await.expect(200);
    let put_returned = Instant::now();
    eventually(
        Duration::from_secs(1),
        "replica B to show weight 100 in force and route to target",
        || async {
            let view = admin_b.route("users").await;
            view["weight"]["in_force"] == 100.0 && answered_by(&b, "/api/users/1").await == "target"
        },
    )
    .await;
    let took = put_returned.elapsed();
    assert!(took <= Duration::from_secs(1), "converged after {took:?}");
    assert_eq!(admin_b.route("users").await["weight"]["source"], "runtime");
    all_answered_by(&b, "/api/users/1", "target", 20).await;

    // And the other way round, with a rollback.
    admin_b.rollback("users", None).await.expect(200);
    let returned = Instant::now();
    eventually(
        Duration::from_secs(1),
        "replica A to show the rollback and route to legacy",
        || async {
            admin_a.route("users").await["state"] == "rolled_back"
                && answered_by(&a, "/api/users/1").await == "legacy"
        },
    )
    .await;
    assert!(returned.elapsed() <= Duration::from_secs(1));
    all_answered_by(&a, "/api/users/1", "legacy", 20).await;

    // One audit log, seen alike by both.
    let (log_a, log_b) = (admin_a.audit().await, admin_b.audit().await);
    assert_eq!(log_a, log_b);
    let actions: Vec<&str> = log_a
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["rollback", "set_weight"]);
}

// ---------------------------------------------------------------------------------------
// 9. State store outages
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_postgres_connections_do_not_stop_routing_and_the_store_comes_back() {
    let pg = PgDb::create().await;
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&(state_line(&pg.url()) + &routes_yaml(&legacy, &target, "100")));
    let admin = Admin::new(&proxy);
    let anonymous = Admin::with_token(&proxy, None);
    let ready = anonymous.get("/readyz").await.expect(200).json();
    assert_eq!(ready["state_store"], "ok");

    let load = Load::start(proxy.http, "/api/users/1", 2);
    load.progress(50).await;
    let killed_at = Instant::now();
    let killed = pg.terminate_connections().await;
    assert!(killed >= 1, "no connection of the proxy's to terminate");
    for _ in 0..5 {
        load.progress(40).await;
        anonymous.get("/readyz").await.expect(200);
    }
    let (records, failures) = load.finish().await;
    assert_no_failures(&failures);
    let (n, wrong) = answered_otherwise(&records, |r| r.sent > killed_at, "target");
    assert!(n >= 150, "only {n} requests after the kill");
    assert!(
        wrong.is_empty(),
        "{} of {n} requests after the kill left the file's split of weight 100",
        wrong.len()
    );

    // The store comes back: a change is taken again (503 meanwhile at most) and in force.
    eventually(
        WAIT,
        "a PUT weight to be taken after the reconnect",
        || async {
            let reply = admin.set_weight("users", json!(0)).await;
            match reply.status.as_u16() {
                200 => true,
                503 => {
                    assert_eq!(reply.json()["error"]["code"], "state_store_unavailable");
                    false
                }
                other => panic!(
                    "PUT weight after the connections were killed: {other} {}",
                    reply.body
                ),
            }
        },
    )
    .await;
    // The kill slows the first store sync; its read must not be adopted over this PUT
    // (see `a_change_right_after_start_stays_in_force`).
    all_answered_by(&proxy, "/api/users/1", "legacy", 20).await;
    eventually(WAIT, "/readyz to report the store ok", || async {
        anonymous.get("/readyz").await.expect(200).json()["state_store"] == "ok"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_is_down_leaves_routing_alone_and_refuses_changes_with_503() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let dead = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let url = format!("postgres://postgres@{dead}/switchyard");
    let proxy = Switchyard::start(&(state_line(&url) + &routes_yaml(&legacy, &target, "100")));
    let admin = Admin::new(&proxy);
    let anonymous = Admin::with_token(&proxy, None);

    // The file's split serves.
    all_answered_by(&proxy, "/api/users/1", "target", 20).await;
    all_answered_by(&proxy, "/api/orders/1", "legacy", 5).await;
    let ready = anonymous.get("/readyz").await.expect(200).json();
    assert_eq!(
        (&ready["ready"], &ready["state_store"]),
        (&json!(true), &json!("unavailable"))
    );

    admin
        .set_weight("users", json!(0))
        .await
        .expect_error(503, "state_store_unavailable");
    admin
        .set_flag("new-search", json!(50))
        .await
        .expect_error(503, "state_store_unavailable");
    admin
        .rollback("users", None)
        .await
        .expect_error(503, "state_store_unavailable");
    // Reads are served from memory.
    let view = admin.route("users").await;
    assert_eq!(view["weight"]["in_force"], 100.0);
    assert_eq!(view["state"], "active");

    // Still routing by the file and still ready while the sync keeps retrying.
    all_answered_by(&proxy, "/api/users/1", "target", 20).await;
    let ready = anonymous.get("/readyz").await.expect(200).json();
    assert_eq!(ready["state_store"], "unavailable");
}

// ---------------------------------------------------------------------------------------
// 10. Audit
// ---------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_log_names_who_changed_what_newest_first() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let yaml = "listen: { http: \"127.0.0.1:0\" }\nadmin: { listen: \"127.0.0.1:0\", tokens_file: tokens.yaml }\n"
        .to_string()
        + &routes_yaml(&legacy, &target, "0");
    let (dir, path) = write_config(&yaml);
    let digest = Sha256::digest(b"ci-token");
    std::fs::write(
        dir.path().join("tokens.yaml"),
        format!("ci: sha256:{}\n", hex::encode(digest)),
    )
    .unwrap();
    let proxy = Switchyard::start_file(&path);
    let env = Admin::new(&proxy);
    let ci = Admin::with_token(&proxy, Some("ci-token"));
    Admin::with_token(&proxy, Some("ci-token2"))
        .get("/v1/routes")
        .await
        .expect_error(401, "unauthorized");
    Admin::with_token(&proxy, Some(&hex::encode(digest)))
        .get("/v1/routes")
        .await
        .expect_error(401, "unauthorized");

    env.set_weight("users", json!(10)).await.expect(200);
    ci.set_weight("users", json!(25.5)).await.expect(200);
    ci.switch("orders", "target").await.expect(200);
    env.rollback("users", Some(r#"{"reason": "errors"}"#))
        .await
        .expect(200);
    ci.set_flag("new-search", json!(50)).await.expect(200);
    ci.set_weight("users", json!(101))
        .await
        .expect_error(422, "invalid");
    env.reset("users").await.expect(200);

    let entries = ci.audit().await;
    assert_eq!(entries.len(), 7, "{entries:#?}");
    let ids: Vec<i64> = entries.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(
        ids.windows(2).all(|w| w[0] > w[1]),
        "not newest first: {ids:?}"
    );
    let ats: Vec<&str> = entries.iter().map(|e| e["at"].as_str().unwrap()).collect();
    assert!(
        ats.windows(2).all(|w| w[0] >= w[1]),
        "times not newest first: {ats:?}"
    );

    let summary: Vec<(&str, &str, &str, &str)> = entries
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap(),
                e["action"].as_str().unwrap(),
                e["target"].as_str().unwrap(),
                e["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("env", "reset", "users", "applied"),
            ("ci", "set_weight", "users", "refused"),
            ("ci", "set_flag", "new-search", "applied"),
            ("env", "rollback", "users", "applied"),
            ("ci", "switch", "orders", "applied"),
            ("ci", "set_weight", "users", "applied"),
            ("env", "set_weight", "users", "applied"),
        ]
    );
    let weights = |e: &Value| {
        (
            e["before"]["weight"]["in_force"].clone(),
            e["after"]["weight"]["in_force"].clone(),
        )
    };
    // `before` must be the stored state: a stale store read adopted over the first PUT
    // once made it 0 (see `a_change_right_after_start_stays_in_force`).
    assert_eq!(weights(&entries[6]), (json!(0.0), json!(10.0)));
    assert_eq!(weights(&entries[5]), (json!(10.0), json!(25.5)));
    assert_eq!(entries[5]["before"]["weight"]["source"], "runtime");
    assert_eq!(
        (
            entries[4]["before"]["active"]["in_force"].clone(),
            entries[4]["after"]["active"]["in_force"].clone()
        ),
        (json!("legacy"), json!("target"))
    );
    assert_eq!(
        (
            entries[3]["before"]["state"].clone(),
            entries[3]["after"]["state"].clone()
        ),
        (json!("active"), json!("rolled_back"))
    );
    assert_eq!(entries[3]["after"]["rollback"]["reason"], "errors");
    assert_eq!(entries[3]["after"]["rollback"]["by"], "env");
    assert_eq!(
        (
            entries[2]["before"]["percentage"]["in_force"].clone(),
            entries[2]["after"]["percentage"]["in_force"].clone()
        ),
        (json!(0.0), json!(50.0))
    );
    // While rolled back nothing reaches the target: in force 0, the runtime weight kept.
    assert_eq!(weights(&entries[1]).0, json!(0.0));
    assert_eq!(entries[1]["before"]["weight"]["runtime"], 25.5);
    assert_eq!(entries[1]["before"]["weight"]["source"], "rollback");
    assert!(entries[1]["after"].is_null());
    assert_eq!(weights(&entries[0]), (json!(0.0), json!(0.0)));
    assert_eq!(entries[0]["before"]["weight"]["runtime"], 25.5);
    assert_eq!(entries[0]["before"]["state"], "rolled_back");
    assert_eq!(entries[0]["after"]["weight"]["source"], "file");
    for e in &entries {
        assert!(
            e["before"].get("etag").is_none(),
            "audit keeps no ETags: {e}"
        );
        if e["outcome"] == "applied" {
            assert!(e["detail"].is_null(), "{e}");
        }
    }

    // `limit` gives the newest N.
    let limited = env.get("/v1/audit?limit=2").await.expect(200).json();
    assert_eq!(limited["entries"].as_array().unwrap(), &entries[..2]);
}

// ---------------------------------------------------------------------------------------
// 11. No token, no public admin API
// ---------------------------------------------------------------------------------------

/// Runs `switchyard serve` without an admin token in the environment (or with `token`)
/// and waits for it to exit; returns its status, stdout and stderr.
fn serve_expecting_exit(
    path: &Path,
    token: Option<&str>,
) -> (std::process::ExitStatus, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    command
        .args([
            "--log-format",
            "json",
            "--log-level",
            "warn",
            "serve",
            "--config",
        ])
        .arg(path)
        .env_remove("SWITCHYARD_ADMIN_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(token) = token {
        command.env("SWITCHYARD_ADMIN_TOKEN", token);
    }
    let mut child = command.spawn().expect("start switchyard");
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let output = child.wait_with_output().unwrap();
            panic!(
                "switchyard kept running with a non-loopback admin and no token; stdout: {}",
                String::from_utf8_lossy(&output.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = child.wait_with_output().unwrap();
    (
        status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_loopback_admin_without_a_token_refuses_to_start() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let yaml = "listen: { http: \"127.0.0.1:0\" }\nadmin: { listen: \"0.0.0.0:0\" }\n".to_string()
        + &routes_yaml(&legacy, &target, "0");
    let (_dir, path) = write_config(&yaml);

    for token in [None, Some("")] {
        let (status, stdout, stderr) = serve_expecting_exit(&path, token);
        assert!(!status.success(), "exited {status} with token {token:?}");
        assert!(
            !stdout.contains("listening"),
            "it said it was listening: {stdout}"
        );
        assert!(
            stderr.contains("token") && stderr.contains("SWITCHYARD_ADMIN_TOKEN"),
            "the refusal should say a token is needed: {stderr}"
        );
    }

    // The same config with a token starts: the refusal above was about the token.
    let proxy = Switchyard::start_file(&path);
    assert!(proxy.admin.ip().is_unspecified(), "{}", proxy.admin);
    all_answered_by(&proxy, "/api/users/1", "legacy", 3).await;
}

// ---------------------------------------------------------------------------------------
// 12. OpenAPI document
// ---------------------------------------------------------------------------------------

/// Every endpoint the admin router serves, as (method, path template).
const SERVED: &[(&str, &str)] = &[
    ("get", "/v1/routes"),
    ("get", "/v1/routes/{name}"),
    ("put", "/v1/routes/{name}/weight"),
    ("post", "/v1/routes/{name}/switch"),
    ("post", "/v1/routes/{name}/rollback"),
    ("post", "/v1/routes/{name}/reset"),
    ("get", "/v1/flags"),
    ("get", "/v1/flags/{name}"),
    ("put", "/v1/flags/{name}"),
    ("get", "/v1/audit"),
    ("get", "/v1/openapi.json"),
    ("get", "/v1/rollouts/{route}"),
    ("post", "/v1/rollouts/{route}/start"),
    ("post", "/v1/rollouts/{route}/pause"),
    ("post", "/v1/rollouts/{route}/resume"),
    ("post", "/v1/rollouts/{route}/promote"),
    ("post", "/v1/rollouts/{route}/abort"),
    ("get", "/v1/sync"),
    ("get", "/v1/consistency"),
    ("get", "/v1/jobs"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
];

/// A concrete path and a plausible body for one documented operation.
fn concrete(method: &str, template: &str) -> (String, Option<&'static str>) {
    let name = if template.starts_with("/v1/flags/") {
        "new-search"
    } else if template.ends_with("/switch") {
        "orders"
    } else {
        "users"
    };
    let path = template.replace("{name}", name).replace("{route}", "users");
    let body = match (method, template.rsplit('/').next().unwrap_or("")) {
        ("put", "weight") => Some(r#"{"weight": 20}"#),
        ("post", "switch") => Some(r#"{"active": "target"}"#),
        ("post", "rollback") => Some(r#"{"reason": "openapi"}"#),
        ("put", _) if template.starts_with("/v1/flags/") => Some(r#"{"percentage": 20}"#),
        ("post", _) => Some("{}"),
        _ => None,
    };
    (path, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_and_the_router_agree() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&routes_yaml(&legacy, &target, "0"));
    let admin = Admin::new(&proxy);

    // The document is generated from the code and needs no token (contract §10).
    let reply = Admin::with_token(&proxy, None)
        .get("/v1/openapi.json")
        .await
        .expect(200);
    assert!(reply.content_type().starts_with("application/json"));
    let doc = reply.json();
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1"))
    );
    let paths = doc["paths"].as_object().expect("paths");

    const METHODS: [&str; 8] = [
        "get", "put", "post", "delete", "patch", "head", "options", "trace",
    ];
    let mut documented = Vec::new();
    for (template, item) in paths {
        for (method, _) in item.as_object().expect("path item") {
            if METHODS.contains(&method.as_str()) {
                documented.push((method.clone(), template.clone()));
            }
        }
    }
    assert!(!documented.is_empty());

    // Everything documented is served: not the router's fallback, not 405, not a 5xx.
    for (method, template) in &documented {
        let (path, body) = concrete(method, template);
        let reply = admin.call(&method.to_uppercase(), &path, body, None).await;
        let fallback = reply.status == 404
            && reply.json()["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("no such endpoint"));
        assert!(
            !fallback && reply.status != 405 && !reply.status.is_server_error(),
            "documented {method} {template} ({path}) is not served: {} {}",
            reply.status,
            reply.body
        );
    }
    // The fallback looks like that indeed (so the check above can fail).
    let fallback = admin.get("/v1/routes/users/nope").await.expect(404).json();
    assert!(
        fallback["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("no such endpoint"))
    );

    // Everything served is documented.
    for (method, template) in SERVED {
        assert!(
            documented.iter().any(|(m, t)| m == method && t == template),
            "{method} {template} is served but not in /v1/openapi.json"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_background_job_is_listed_with_its_state_in_jobs_and_readyz() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&routes_yaml(&legacy, &target, "0"));
    let admin = Admin::new(&proxy);
    let jobs = admin.get("/v1/jobs").await.expect(200).json();
    let names: Vec<(&str, &str, bool)> = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| {
            (
                j["name"].as_str().unwrap(),
                j["state"].as_str().unwrap(),
                j["ready"].as_bool().unwrap(),
            )
        })
        .collect();
    for (name, state) in [
        ("config_reload", "watched"),
        ("prober", "running"),
        ("rollback_monitor", "running"),
        ("rollout_controller", "running"),
        ("samplers", "watched"),
        ("store_sync", "running"),
        ("sync_workers", "watched"),
    ] {
        assert!(names.contains(&(name, state, true)), "{name}: {jobs:#}");
    }
    assert!(
        jobs["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|j| j["restarts"] == 0)
    );
    let (status, _, body) = get(&proxy.admin_url("/readyz"), &[]).await;
    assert_eq!(status, 200);
    let ready: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["jobs"], jobs["jobs"], "{ready:#}");
}

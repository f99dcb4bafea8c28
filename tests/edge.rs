//! The edge holds: a client's fault is the client's (never a backend error, never counted
//! against a route's health), every Host and path means one thing, and protocol corners
//! are answered the way Envoy answers them by default. Real sockets, real backends.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn route_view(proxy: &Switchyard) -> serde_json::Value {
    let (status, body) = admin_call(proxy, "GET", "/v1/routes/users", "").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Writes `bytes`, then reads until the proxy closes or `wait` passes; `close_write` also
/// shuts the client's sending side after writing (a client that hangs up mid-body).
async fn exchange(
    addr: std::net::SocketAddr,
    bytes: &[u8],
    close_write: bool,
    wait: Duration,
) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    if close_write {
        stream.shutdown().await.unwrap();
    }
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Failing input 1: twenty-five malformed, short and stalled bodies of each kind do not
/// roll back a healthy route at weight 100; a real target failure afterwards still does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_body_faults_never_roll_back_a_route() {
    let legacy = Backend::start("legacy").await;
    let target = Switchable::start("target").await;
    let config = format!(
        "timeouts: {{ request: 1s }}\n\
backends:\n  legacy: {{ endpoints: [\"{}\"] }}\n  target: {{ endpoints: [\"{}\"] }}\n\
default_backend: legacy\n\
routes:\n  - name: users\n    match: {{ path_prefix: /api/users }}\n    legacy: legacy\n    target: target\n\
\x20   split: {{ percentage: {{ weight: 100 }} }}\n\
\x20   rollback: {{ max_error_rate: 0.05, window: 10s, min_requests: 20 }}\n",
        legacy.url(),
        target.url()
    );
    let proxy = Switchyard::start(&config);
    let addr = proxy.http;

    let bad_chunk = b"POST /api/users HTTP/1.1\r\nHost: shop.example.test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
    let short = b"POST /api/users HTTP/1.1\r\nHost: shop.example.test\r\nContent-Length: 100\r\n\r\n0123456789";
    let stalled =
        b"POST /api/users HTTP/1.1\r\nHost: shop.example.test\r\nContent-Length: 100\r\n\r\n";

    let mut tasks = Vec::new();
    for _ in 0..25 {
        tasks.push(tokio::spawn(exchange(
            addr,
            bad_chunk,
            false,
            Duration::from_secs(5),
        )));
        tasks.push(tokio::spawn(exchange(
            addr,
            short,
            true,
            Duration::from_secs(5),
        )));
        tasks.push(tokio::spawn(exchange(
            addr,
            stalled,
            false,
            Duration::from_secs(5),
        )));
    }
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    for (i, answer) in answers.iter().enumerate() {
        let status = answer.split(' ').nth(1).unwrap_or("");
        // A client that hung up may get no answer at all; one that gets an answer gets
        // its own error, never a gateway one.
        assert!(
            status.is_empty() || status == "400" || status == "408",
            "case {} answered {answer:?}",
            i % 3
        );
        assert!(!answer.contains("upstream_"), "{answer}");
    }
    let bad_chunk_answers = answers.iter().step_by(3);
    assert!(
        bad_chunk_answers
            .clone()
            .all(|a| a.starts_with("HTTP/1.1 400")),
        "a bad chunk size is a 400: {:?}",
        bad_chunk_answers.collect::<Vec<_>>()
    );
    assert!(
        answers
            .iter()
            .skip(2)
            .step_by(3)
            .all(|a| a.starts_with("HTTP/1.1 408")),
        "a body that never arrives is a 408"
    );

    let view = route_view(&proxy).await;
    assert_ne!(view["state"], "rolled_back", "{view:#}");
    // Nothing was counted against the target: its window saw no request at all.
    assert_eq!(view["health"]["target"]["errors"], 0, "{view:#}");
    assert_eq!(view["health"]["target"]["timeouts"], 0, "{view:#}");

    // A real target failure still counts.
    target.set_status(503);
    let http = client();
    for _ in 0..30 {
        let (status, _, _) = request(&http, "POST", &proxy.url("/api/users"), &[]).await;
        assert!(status == 503 || status == 200, "{status}");
    }
    eventually(
        Duration::from_secs(5),
        "rollback on real target errors",
        || async { route_view(&proxy).await["state"] == "rolled_back" },
    )
    .await;
}

/// Failing input 5: a 200 KB file nesting `[[[…]]]` 100,000 deep, hot-reloaded, is refused
/// at once and traffic never stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nesting_bomb_reload_is_refused_while_traffic_flows() {
    let legacy = Backend::start("legacy").await;
    let config = format!(
        "backends:\n  legacy: {{ endpoints: [\"{}\"] }}\ndefault_backend: legacy\n",
        legacy.url()
    );
    let proxy = Switchyard::start(&config);
    let http = client();
    let (status, _, _) = request(&http, "GET", &proxy.url("/x"), &[]).await;
    assert_eq!(status, 200);

    let good = std::fs::read_to_string(&proxy.config_path).unwrap();
    let bomb = format!(
        "{good}routes: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    std::fs::write(&proxy.config_path, bomb).unwrap();
    proxy.signal("HUP");
    let started = std::time::Instant::now();
    eventually(Duration::from_secs(5), "the reload is refused", || async {
        proxy
            .metric("switchyard_config_reloads_total{result=\"failure\"}")
            .await
            .unwrap_or(0.0)
            >= 1.0
    })
    .await;
    // Requests sent while it was refused were answered promptly.
    for _ in 0..20 {
        let sent = std::time::Instant::now();
        let (status, _, _) = request(&http, "GET", &proxy.url("/x"), &[]).await;
        assert_eq!(status, 200);
        assert!(sent.elapsed() < Duration::from_secs(1));
    }
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Three backends that echo what they receive: `legacy` (the default), `users` behind
/// `/api/users` and `/ops` (canary on a query rule), `shop` behind `host: shop.example.test`.
struct Edge {
    _backends: [Backend; 3],
    proxy: Switchyard,
}

impl Edge {
    async fn start(extra: &str) -> Edge {
        let legacy = Backend::start("legacy").await;
        let users = Backend::start("users").await;
        let shop = Backend::start("shop").await;
        let config = format!(
            "{extra}backends:\n  legacy: {{ endpoints: [\"{}\"] }}\n  users: {{ endpoints: [\"{}\"] }}\n  shop: {{ endpoints: [\"{}\"] }}\n\
default_backend: legacy\n\
routes:\n\
\x20 - {{ name: users, match: {{ path_prefix: /api/users }}, legacy: legacy, target: users, split: {{ percentage: {{ weight: 100 }} }} }}\n\
\x20 - {{ name: shop, match: {{ host: shop.example.test }}, legacy: legacy, target: shop, split: {{ percentage: {{ weight: 100 }} }} }}\n\
\x20 - name: ops\n    match: {{ path_prefix: /ops }}\n    legacy: legacy\n    target: users\n\
\x20   split: {{ canary: {{ rules: [ {{ query: {{ name: user, value: ops@example.test }} }} ], weight: 0 }} }}\n",
            legacy.url(),
            users.url(),
            shop.url()
        );
        let proxy = Switchyard::start(&config);
        Edge {
            _backends: [legacy, users, shop],
            proxy,
        }
    }

    /// Sends one raw HTTP/1.1 request (the text gets `\r\n` line ends and the empty line)
    /// and returns the status and, when a backend answered, its echo.
    async fn send(&self, head: &str) -> (u16, Option<serde_json::Value>) {
        let raw = format!("{}\r\n\r\n", head.replace('\n', "\r\n"));
        let answer = raw_exchange(self.proxy.http, raw.as_bytes(), Duration::from_secs(5)).await;
        let status = answer
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {answer:?}"));
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        // The proxy's own answers are JSON too; an echo names its backend.
        let echo = serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .filter(|v| v.get("backend").is_some());
        (status, echo)
    }
}

/// Failing input 3: the authority routed on is the one the backend receives; missing,
/// duplicate and invalid Hosts are the client's error; a trailing dot is the same name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_authority_is_routed_on_and_forwarded() {
    let edge = Edge::start("").await;
    let (status, echo) = edge
        .send("GET http://shop.example.test/x HTTP/1.1\nHost: a\nConnection: close")
        .await;
    let echo = echo.unwrap();
    assert_eq!((status, &echo["backend"]), (200, &"shop".into()));
    assert_eq!(echo["headers"]["host"], "shop.example.test");

    let (status, echo) = edge
        .send("GET /x HTTP/1.1\nHost: shop.example.test\nConnection: close, Host")
        .await;
    let echo = echo.unwrap();
    assert_eq!((status, &echo["backend"]), (200, &"shop".into()));
    assert_eq!(echo["headers"]["host"], "shop.example.test", "{echo}");

    let (status, echo) = edge
        .send("GET /x HTTP/1.1\nHost: SHOP.example.test.\nConnection: close")
        .await;
    assert_eq!((status, &echo.unwrap()["backend"]), (200, &"shop".into()));

    for head in [
        "GET /x HTTP/1.1\nConnection: close",
        "GET /x HTTP/1.1\nHost: shop.example.test\nHost: other.test\nConnection: close",
        "GET /x HTTP/1.1\nHost: shop example\nConnection: close",
        "GET /x HTTP/1.1\nHost: user@shop.example.test\nConnection: close",
        "GET /x HTTP/1.1\nHost: shop.example.test:8o\nConnection: close",
    ] {
        let (status, echo) = edge.send(head).await;
        assert_eq!(status, 400, "{head:?}");
        assert!(echo.is_none(), "{head:?} reached a backend");
    }
}

/// Failing input 3, HTTP/2: `:authority` and `host` that disagree are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_authority_and_host_must_agree() {
    let edge = Edge::start("").await;
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let send = |host: Option<&'static str>| {
        let mut builder = http::Request::builder()
            .uri(format!("http://{}/x", edge.proxy.http).replace("127.0.0.1", "localhost"));
        if let Some(h) = host {
            builder = builder.header("host", h);
        }
        h2.request(builder.body(http_body_util::Empty::new()).unwrap())
    };
    let agreed = send(None).await.unwrap();
    assert_eq!(agreed.status(), 200);
    let disagreeing = send(Some("shop.example.test")).await.unwrap();
    assert_eq!(disagreeing.status(), 400);
}

/// Failing input 4: paths are normalised before matching and forwarded normalised;
/// encoded slashes are refused; query rules compare decoded values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_mean_one_thing() {
    let edge = Edge::start("").await;
    for (path, backend, forwarded) in [
        ("/api/./users/7", "users", "/api/users/7"),
        ("/api//users/7", "users", "/api/users/7"),
        ("/api/x/../users/7", "users", "/api/users/7"),
        ("/%61pi/users/7?a=%2F", "users", "/api/users/7"),
        ("/api/users/../../admin", "legacy", "/admin"),
    ] {
        let (status, echo) = edge
            .send(&format!("GET {path} HTTP/1.1\nHost: h\nConnection: close"))
            .await;
        let echo = echo.unwrap_or_else(|| panic!("{path}: {status}"));
        assert_eq!(status, 200, "{path}");
        assert_eq!(echo["backend"], backend, "{path}");
        assert_eq!(echo["path"], forwarded, "{path}");
    }
    let (_, echo) = edge
        .send("GET /%61pi/users/7?a=%2F HTTP/1.1\nHost: h\nConnection: close")
        .await;
    assert_eq!(
        echo.unwrap()["query"],
        "a=%2F",
        "the query is forwarded as received"
    );

    for path in ["/api%2Fusers/7", "/api/users%5c7", "/api/%zz"] {
        let (status, echo) = edge
            .send(&format!("GET {path} HTTP/1.1\nHost: h\nConnection: close"))
            .await;
        assert_eq!(status, 400, "{path}");
        assert!(echo.is_none());
    }

    let (_, echo) = edge
        .send("GET /ops?user=ops%40example.test HTTP/1.1\nHost: h\nConnection: close")
        .await;
    assert_eq!(echo.unwrap()["backend"], "users");
    let (_, echo) = edge
        .send("GET /ops?user=someone HTTP/1.1\nHost: h\nConnection: close")
        .await;
    assert_eq!(echo.unwrap()["backend"], "legacy");
}

/// `listen.escaped_slashes: keep` forwards encoded slashes, which never split a segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaped_slashes_may_be_kept() {
    let edge = Edge::start("listen: { http: \"127.0.0.1:0\", escaped_slashes: keep }\nadmin: { listen: \"127.0.0.1:0\" }\n").await;
    let (status, echo) = edge
        .send("GET /api%2fusers/7 HTTP/1.1\nHost: h\nConnection: close")
        .await;
    let echo = echo.unwrap();
    assert_eq!((status, &echo["backend"]), (200, &"legacy".into()));
    assert_eq!(echo["path"], "/api%2Fusers/7");
}

/// Failing input 7: what cannot be carried is refused as Envoy refuses it by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_corners_are_refused() {
    let edge = Edge::start("").await;
    let cases = [
        (
            "CONNECT shop.example.test:443 HTTP/1.1\nHost: shop.example.test:443",
            405,
        ),
        ("GET * HTTP/1.1\nHost: h\nConnection: close", 400),
        (
            "POST /api/users HTTP/1.1\nHost: h\nTransfer-Encoding: gzip, chunked\nConnection: close\n\n0",
            501,
        ),
    ];
    for (head, want) in cases {
        let (status, echo) = edge.send(head).await;
        assert_eq!(status, want, "{head:?}");
        assert!(echo.is_none(), "{head:?} reached a backend");
    }
    // An h2c upgrade is not a tunnel: the request is served, its Upgrade dropped.
    let (status, echo) = edge
        .send("GET /api/users HTTP/1.1\nHost: h\nConnection: Upgrade, HTTP2-Settings\nUpgrade: h2c\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\n")
        .await;
    let echo = echo.unwrap();
    assert_eq!(status, 200);
    assert!(echo["headers"].get("upgrade").is_none(), "{echo}");
    assert!(echo["headers"].get("http2-settings").is_none(), "{echo}");
}

/// A backend whose connections each serve one request, keep-alive, and then close the
/// moment the next request arrives, as an idle timer firing just then does.
struct ClosingBackend {
    addr: std::net::SocketAddr,
    connections: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl ClosingBackend {
    async fn start() -> ClosingBackend {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let count = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 4096];
                    // The first request: its head, and a body if it announces one.
                    loop {
                        let Ok(n) = stream.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        seen.extend_from_slice(&buf[..n]);
                        let text = String::from_utf8_lossy(&seen).to_ascii_lowercase();
                        if let Some(end) = text.find("\r\n\r\n") {
                            let length = text
                                .lines()
                                .find_map(|l| l.strip_prefix("content-length:"))
                                .and_then(|v| v.trim().parse::<usize>().ok())
                                .unwrap_or(0);
                            if seen.len() >= end + 4 + length {
                                break;
                            }
                        }
                    }
                    let _ = stream
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-backend: closing\r\n\r\nok",
                        )
                        .await;
                    // The next request's first bytes: close without a word.
                    let _ = stream.read(&mut buf).await;
                });
            }
        });
        ClosingBackend {
            addr,
            connections,
            task,
        }
    }
}

impl Drop for ClosingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Failing input 2: an idempotent request that meets a pooled connection closing under it
/// is sent once more on a new one; a POST is not (and its 502 names no backend).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_pooled_connection_is_retried_for_idempotent_requests_only() {
    let backend = ClosingBackend::start().await;
    let proxy = Switchyard::start(&format!(
        "backends:\n  legacy: {{ endpoints: [\"http://{}\"] }}\ndefault_backend: legacy\n",
        backend.addr
    ));
    let http = client();
    for i in 0..5 {
        let (status, _, body) = request(&http, "GET", &proxy.url("/x"), &[]).await;
        assert_eq!((status.as_u16(), body.as_str()), (200, "ok"), "GET {i}");
    }
    // Each GET after the first met a closing connection and was sent again on a new one.
    let connections = backend
        .connections
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(connections >= 5, "{connections} connections");

    // A POST on the connection the last GET left in the pool is not replayed.
    let (status, headers, body) = request(&http, "POST", &proxy.url("/x"), &[]).await;
    assert_eq!(status, 502, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["code"], "upstream_failed");
    assert_eq!(
        error["error"]["request_id"],
        headers["x-request-id"].to_str().unwrap()
    );
    // Clients learn the cause, not the backend's name, address or the OS error.
    for secret in [
        "legacy",
        "127.0.0.1",
        &backend.addr.port().to_string(),
        "os error",
        "closed",
    ] {
        assert!(!body.contains(secret), "{secret:?} in {body}");
    }
}

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

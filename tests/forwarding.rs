//! Forwarding, end to end: headers the backend sees (X-Forwarded-*, X-Request-Id, hop-by-hop
//! removal, Host), the proxy's own JSON error answers (502, 504, 400 on request smuggling,
//! 431 on oversized heads), WebSocket upgrades and h2c prior knowledge passed through to
//! HTTP/1.1 backends, and the request metrics that traffic leaves behind.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

use support::*;

/// Everything goes to `legacy` (weight 0), with `extra` YAML (timeouts, limits) in front.
fn legacy_only(extra: &str, legacy: &Backend, target: &Backend) -> String {
    format!(
        "{extra}{}",
        two_sided_config(legacy, target, "{ percentage: { weight: 0 } }", None)
    )
}

/// A config whose only backend, `legacy`, has the given endpoints; route `users` on
/// `/api/users` always picks it.
fn single_backend_config(extra: &str, endpoints: &[String]) -> String {
    let list = endpoints
        .iter()
        .map(|e| format!("\"{e}\""))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "{extra}backends:\n  legacy: {{ endpoints: [{list}] }}\n\
default_backend: legacy\n\
routes:\n  - name: users\n    match: {{ path_prefix: /api/users }}\n    legacy: legacy\n    target: legacy\n    split: {{ percentage: {{ weight: 0 }} }}\n"
    )
}

/// An address nothing listens on: bound, noted, released.
fn refused_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// The headers map of the backend's JSON echo.
fn echoed_headers(body: &str) -> serde_json::Map<String, serde_json::Value> {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("echo is not JSON ({e}): {body}"));
    v["headers"]
        .as_object()
        .unwrap_or_else(|| panic!("echo without headers: {body}"))
        .clone()
}

fn header<'a>(headers: &'a serde_json::Map<String, serde_json::Value>, name: &str) -> &'a str {
    headers
        .get(name)
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("backend did not see `{name}`: {headers:?}"))
}

/// Checks the proxy's own error body and returns its `error.code`.
fn error_code(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body)
        .unwrap_or_else(|e| panic!("error body is not JSON ({e}): {body:?}"));
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "error body without a message: {body}"
    );
    v["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("error body without a code: {body}"))
        .to_string()
}

/// Status codes of every response in a raw HTTP/1.1 byte stream, in order.
fn statuses(raw: &str) -> Vec<u16> {
    raw.match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| raw.get(i + 9..i + 12)?.parse().ok())
        .collect()
}

/// The body of the last response in a raw exchange (the text after its head).
fn last_body(raw: &str) -> &str {
    let start = raw.rfind("HTTP/1.1 ").expect("a response");
    let head_end = raw[start..].find("\r\n\r\n").expect("a complete head");
    &raw[start + head_end + 4..]
}

fn head_of_last(raw: &str) -> String {
    let start = raw.rfind("HTTP/1.1 ").expect("a response");
    let head_end = raw[start..].find("\r\n\r\n").expect("a complete head");
    raw[start..start + head_end].to_ascii_lowercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_sees_forwarding_headers_and_no_hop_by_hop_ones() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&legacy_only("", &legacy, &target));
    let url = proxy.url("/api/users/1?x=1");

    // A plain request: X-Forwarded-For is the client, a request id is minted.
    let (status, headers, body) = get(&url, &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(backend_of(&headers), Some("legacy"));
    let seen = echoed_headers(&body);
    assert_eq!(header(&seen, "x-forwarded-for"), "127.0.0.1");
    assert_eq!(header(&seen, "x-forwarded-proto"), "http");
    let minted = header(&seen, "x-request-id").to_string();
    let uuid = uuid::Uuid::parse_str(&minted)
        .unwrap_or_else(|e| panic!("generated x-request-id {minted:?} is not a UUID: {e}"));
    assert_eq!(uuid.get_version_num(), 4, "{minted}");
    assert_eq!(
        minted,
        uuid.hyphenated().to_string(),
        "not in canonical form"
    );
    // The host the client asked for is the one the backend sees.
    assert_eq!(header(&seen, "host"), proxy.http.to_string());

    // A second request gets its own id.
    let (_, _, body) = get(&url, &[]).await;
    let again = header(&echoed_headers(&body), "x-request-id").to_string();
    assert!(uuid::Uuid::parse_str(&again).is_ok(), "{again}");
    assert_ne!(again, minted, "two requests got the same generated id");

    // Incoming forwarding headers, an id and hop-by-hop headers.
    let (status, _, body) = get(
        &url,
        &[
            ("host", "shop.example.test"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-request-id", "req-abc-123"),
            ("connection", "keep-alive, x-hop"),
            ("keep-alive", "timeout=5"),
            // `te: trailers` alone is forwarded (gRPC needs it; tests/upstream.rs).
            ("te", "gzip"),
            ("proxy-authorization", "Basic c2VjcmV0"),
            ("x-hop", "only for the next hop"),
            ("x-ordinary", "kept"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let seen = echoed_headers(&body);
    assert_eq!(header(&seen, "x-forwarded-for"), "1.2.3.4, 127.0.0.1");
    assert_eq!(header(&seen, "x-forwarded-proto"), "http");
    assert_eq!(header(&seen, "x-request-id"), "req-abc-123");
    assert_eq!(header(&seen, "host"), "shop.example.test");
    assert_eq!(header(&seen, "x-ordinary"), "kept");
    for gone in [
        "connection",
        "keep-alive",
        "te",
        "proxy-authorization",
        "x-hop",
    ] {
        assert!(
            !seen.contains_key(gone),
            "hop-by-hop header `{gone}` reached the backend: {seen:?}"
        );
    }
    assert_eq!(legacy.requests(), 3);
    assert_eq!(target.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_backend_is_a_json_502() {
    let dead = refused_addr();
    let proxy = Switchyard::start(&single_backend_config("", &[format!("http://{dead}")]));

    let (status, headers, body) = get(&proxy.url("/api/users/1"), &[]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    assert_eq!(error_code(&body), "upstream_connect_failed", "{body}");
    // The body's request id is the one the response header carries.
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let id = v["error"]["request_id"].as_str().expect("a request_id");
    assert_eq!(
        headers.get("x-request-id").and_then(|v| v.to_str().ok()),
        Some(id)
    );
    assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_backend_is_a_json_504_after_the_request_timeout() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&legacy_only(
        "timeouts: { request: 300ms }\n",
        &legacy,
        &target,
    ));
    // Warm up so the measured request doesn't include process or pool start-up.
    let (status, _, _) = get(&proxy.url("/api/users/1"), &[]).await;
    assert_eq!(status, StatusCode::OK);

    let started = Instant::now();
    let (status, headers, body) = get(&proxy.url("/__sleep/3000"), &[]).await;
    let took = started.elapsed();
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    assert_eq!(error_code(&body), "upstream_timeout", "{body}");
    assert!(
        took >= Duration::from_millis(300),
        "answered after {took:?}"
    );
    assert!(
        took < Duration::from_millis(2000),
        "answered after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_smuggling_framing_is_refused_and_never_forwarded() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&legacy_only("", &legacy, &target));
    let wait = Duration::from_secs(10);

    let cases: [(&str, &[u8]); 3] = [
        (
            "te_and_content_length",
            b"POST /api/users/1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\
              Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ),
        (
            "te_and_content_length",
            b"POST /api/users/1 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\
              Content-Length: 5\r\n\r\n0\r\n\r\n",
        ),
        (
            "duplicate_content_length",
            b"POST /api/users/1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\
              Content-Length: 5\r\n\r\nhello",
        ),
    ];
    for (code, bytes) in cases {
        let raw = raw_exchange(proxy.http, bytes, wait).await;
        assert_eq!(statuses(&raw), [400], "{raw}");
        let head = head_of_last(&raw);
        assert!(head.contains("content-type: application/json"), "{raw}");
        assert!(head.contains("connection: close"), "{raw}");
        assert_eq!(error_code(last_body(&raw)), code, "{raw}");
    }
    assert_eq!(legacy.requests(), 0, "a smuggling request was forwarded");
    assert_eq!(target.requests(), 0, "a smuggling request was forwarded");

    // A clean request, then a smuggling one on the same keep-alive connection.
    let raw = raw_exchange(
        proxy.http,
        b"POST /api/users/1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
          POST /api/users/2 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\
          Content-Length: 5\r\n\r\n0\r\n\r\n",
        wait,
    )
    .await;
    assert_eq!(statuses(&raw), [200, 400], "{raw}");
    assert_eq!(error_code(last_body(&raw)), "te_and_content_length");
    assert_eq!(legacy.requests(), 1, "{raw}");
    assert_eq!(target.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_head_is_a_json_431() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&legacy_only(
        "limits: { max_header_bytes: 4096 }\n",
        &legacy,
        &target,
    ));
    let wait = Duration::from_secs(10);

    // Just under the limit still goes through.
    let mut fits = b"GET /api/users/1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX-Pad: ".to_vec();
    fits.resize(fits.len() + 3000, b'p');
    fits.extend_from_slice(b"\r\n\r\n");
    let raw = raw_exchange(proxy.http, &fits, wait).await;
    assert_eq!(statuses(&raw), [200], "{raw}");
    assert_eq!(legacy.requests(), 1);

    let mut big = b"GET /api/users/1 HTTP/1.1\r\nHost: a\r\nX-Big: ".to_vec();
    big.resize(big.len() + 10 * 1024, b'b');
    big.extend_from_slice(b"\r\n\r\n");
    let raw = raw_exchange(proxy.http, &big, wait).await;
    assert_eq!(statuses(&raw), [431], "{raw}");
    assert!(
        head_of_last(&raw).contains("content-type: application/json"),
        "{raw}"
    );
    assert_eq!(error_code(last_body(&raw)), "head_too_large", "{raw}");
    assert_eq!(legacy.requests(), 1, "the oversized request was forwarded");

    // Past hyper's own read buffer (max(2 × max_header_bytes, 64 KiB)) hyper gives up on the
    // head before the proxy sees a request: it writes a bare 431 (no JSON body) and closes,
    // and the client may instead see the connection reset because its unread bytes are
    // discarded. Either way nothing is forwarded and nothing but a 431 comes back.
    let mut huge = b"GET /api/users/1 HTTP/1.1\r\nHost: a\r\nX-Huge: ".to_vec();
    huge.resize(huge.len() + 100 * 1024, b'h');
    huge.extend_from_slice(b"\r\n\r\n");
    let raw = lenient_exchange(proxy.http, &huge, wait).await;
    assert!(
        raw.is_empty() || statuses(&raw) == [431],
        "past hyper's buffer: {raw}"
    );
    assert_eq!(legacy.requests(), 1, "the huge request was forwarded");
}

/// Like `raw_exchange`, but a reset or a failed write (the server may close while we
/// still send) ends the exchange instead of failing it.
async fn lenient_exchange(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(timeout, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// A WebSocket echo server on 127.0.0.1:0; echoes text and binary messages.
async fn websocket_echo_backend() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    if message.is_close() {
                        return;
                    }
                    if (message.is_text() || message.is_binary()) && ws.send(message).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_is_tunnelled_both_ways() {
    let (backend, server) = websocket_echo_backend().await;
    let proxy = Switchyard::start(&single_backend_config("", &[format!("http://{backend}")]));

    let (mut ws, response) =
        tokio_tungstenite::connect_async(format!("ws://{}/api/users/ws", proxy.http))
            .await
            .expect("websocket handshake through the proxy");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);

    let big: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    let messages = [
        Message::text("hello through the proxy"),
        Message::binary(vec![0u8, 1, 2, 0xff, 0xfe]),
        Message::text("second"),
        Message::binary(big),
    ];
    for message in messages {
        ws.send(message.clone()).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("echo within 10s")
            .expect("connection open")
            .expect("a message");
        assert_eq!(echoed, message);
    }
    ws.close(None).await.unwrap();
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_reaches_an_http1_backend() {
    // A backend that records the raw head it receives, so the test sees the version and
    // headers on the wire.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let backend = listener.local_addr().unwrap();
    let (head_tx, mut head_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let server = tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let head_tx = head_tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = head_tx.send(String::from_utf8_lossy(&head).into_owned());
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Backend: raw\r\n\r\nhello",
                    )
                    .await;
                // Keep the connection until the proxy closes it.
                let _ = stream.read(&mut buf).await;
            });
        }
    });
    let proxy = Switchyard::start(&single_backend_config("", &[format!("http://{backend}")]));

    let tcp = TcpStream::connect(proxy.http).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .expect("h2c handshake");
    tokio::spawn(connection);
    let req = Request::builder()
        .uri(format!("http://{}/api/users/1?h2=yes", proxy.http))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(req).await.expect("h2 request");
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response
            .headers()
            .get("x-backend")
            .and_then(|v| v.to_str().ok()),
        Some("raw")
    );
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"hello");

    let head = tokio::time::timeout(Duration::from_secs(5), head_rx.recv())
        .await
        .expect("the backend got a request")
        .unwrap();
    assert!(
        head.starts_with("GET /api/users/1?h2=yes HTTP/1.1\r\n"),
        "backend saw: {head}"
    );
    let host = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("host")
                .then(|| value.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no host header: {head}"));
    assert_eq!(host, proxy.http.to_string());
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_metrics_count_codes_and_durations() {
    let good = Backend::start("legacy").await;
    let dead = refused_addr();
    // Round robin over one live and one refused endpoint: every other request is a 502.
    let proxy = Switchyard::start(&single_backend_config(
        "",
        &[good.url(), format!("http://{dead}")],
    ));
    let ok_sample = r#"switchyard_requests_total{route="users",side="legacy",code="200"}"#;
    let bad_sample = r#"switchyard_requests_total{route="users",side="legacy",code="502"}"#;
    let duration_sample =
        r#"switchyard_request_duration_seconds_count{route="users",side="legacy"}"#;

    let client = client();
    let mut tally = [0u32; 2];
    for i in 0..6 {
        let (status, _, body) =
            request(&client, "GET", &proxy.url(&format!("/api/users/{i}")), &[]).await;
        match status {
            StatusCode::OK => tally[0] += 1,
            StatusCode::BAD_GATEWAY => {
                assert_eq!(error_code(&body), "upstream_connect_failed");
                tally[1] += 1;
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(tally, [3, 3], "round robin over two endpoints");
    assert_eq!(good.requests(), 3);
    assert_eq!(proxy.metric(ok_sample).await, Some(3.0));
    assert_eq!(proxy.metric(bad_sample).await, Some(3.0));
    assert_eq!(proxy.metric(duration_sample).await, Some(6.0));

    // More traffic: the counters and the histogram move with it.
    for i in 0..4 {
        request(&client, "GET", &proxy.url(&format!("/api/users/{i}")), &[]).await;
    }
    assert_eq!(proxy.metric(ok_sample).await, Some(5.0));
    assert_eq!(proxy.metric(bad_sample).await, Some(5.0));
    assert_eq!(proxy.metric(duration_sample).await, Some(10.0));
    // Requests outside every route are counted under `_default`, not under `users`.
    let (status, _, _) = request(&client, "GET", &proxy.url("/elsewhere"), &[]).await;
    assert!(status == StatusCode::OK || status == StatusCode::BAD_GATEWAY);
    assert_eq!(proxy.metric(duration_sample).await, Some(10.0));
    let default_count =
        r#"switchyard_request_duration_seconds_count{route="_default",side="legacy"}"#;
    assert_eq!(proxy.metric(default_count).await, Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_head_is_cut_off_after_header_read() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&legacy_only(
        "timeouts: { header_read: 300ms }\n",
        &legacy,
        &target,
    ));
    let started = Instant::now();
    let mut stream = TcpStream::connect(proxy.http).await.unwrap();
    // A head that never ends: no blank line.
    stream
        .write_all(b"GET /api/users/1 HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    let elapsed = started.elapsed();
    assert!(read.is_ok(), "the proxy kept the connection open for 5 s");
    assert!(
        elapsed >= Duration::from_millis(300),
        "closed after {elapsed:?}, before the header_read timeout"
    );
    assert_eq!(legacy.requests(), 0, "an unfinished head was forwarded");

    // The same proxy still serves a client that sends its head promptly.
    let (status, _, _) = get(&proxy.url("/api/users/1"), &[]).await;
    assert_eq!(status, StatusCode::OK);
}

/// WebSocket tunnels hold their client connection's slot: with `max_connections: 2`, two
/// open tunnels keep a third client waiting until one of them closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_tunnels_count_against_max_connections() {
    let (backend, server) = websocket_echo_backend().await;
    let proxy = Switchyard::start(&single_backend_config(
        "limits: { max_connections: 2 }\n",
        &[format!("http://{backend}")],
    ));
    let url = format!("ws://{}/api/users/ws", proxy.http);
    let (mut first, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    let (mut second, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    for ws in [&mut first, &mut second] {
        ws.send(Message::text("up")).await.unwrap();
        assert!(ws.next().await.unwrap().is_ok());
    }
    // The third client is not served while both tunnels are open.
    let third = tokio::spawn({
        let url = proxy.url("/api/users/plain");
        async move { get(&url, &[]).await.0 }
    });
    let waited = tokio::time::timeout(Duration::from_millis(500), async {
        while !third.is_finished() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        waited.is_err(),
        "a third connection was served past max_connections"
    );
    first.close(None).await.unwrap();
    drop(first);
    // Answered (by the proxy: the echo server speaks only WebSocket) once a slot is free.
    let status = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("served once a tunnel closed")
        .unwrap();
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    drop(second);
    server.abort();
}

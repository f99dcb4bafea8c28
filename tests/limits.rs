//! Client-side limits end to end: a head trickled byte by byte is cut after `header_read`,
//! idle keep-alive connections (HTTP/1.1 and h2c) close after `timeouts.keepalive` (not
//! after `header_read`), a body announced over `limits.max_body_bytes` gets a JSON 413
//! without reaching the backend and one that outgrows it mid-stream is cut, and
//! `limits.max_connections` holds new connections back until one closes.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);

fn only_legacy(extra: &str, legacy: &Backend) -> String {
    format!(
        "{extra}backends:\n  legacy: {{ endpoints: [\"{}\"] }}\ndefault_backend: legacy\n",
        legacy.url()
    )
}

/// Reads until the server closes; returns what it sent and when it closed.
async fn read_until_closed(stream: &mut TcpStream) -> (String, Instant) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(WAIT, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the server kept the connection open for {WAIT:?}"),
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), Instant::now())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_trickled_byte_by_byte_is_cut_after_header_read() {
    let legacy = Backend::start("legacy").await;
    let proxy = Switchyard::start(&only_legacy(
        "timeouts: { header_read: 1s, keepalive: 30s }\n",
        &legacy,
    ));
    let stream = TcpStream::connect(proxy.http).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let started = Instant::now();
    // Slowloris: one byte every 50 ms, a head that would take far longer than header_read.
    let trickle = tokio::spawn(async move {
        let head = b"GET /api/users/1 HTTP/1.1\r\nHost: x\r\nX-Slow: ".iter();
        for &byte in head.chain(std::iter::repeat(&b'a')).take(2000) {
            if write.write_all(&[byte]).await.is_err() {
                return Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the proxy accepted a 100 s trickle");
    });
    let mut out = Vec::new();
    let closed = tokio::time::timeout(WAIT, read.read_to_end(&mut out)).await;
    let elapsed = started.elapsed();
    assert!(closed.is_ok(), "the connection stayed open for {WAIT:?}");
    assert!(
        elapsed >= Duration::from_secs(1),
        "cut after {elapsed:?}, before header_read, although bytes kept coming"
    );
    assert!(
        elapsed < Duration::from_secs(4),
        "cut only after {elapsed:?}"
    );
    // The writer notices too (a reset, or a broken pipe), well before its 100 s are up.
    let writer_stopped = tokio::time::timeout(WAIT, trickle).await;
    assert!(writer_stopped.is_ok(), "writes kept succeeding");
    assert_eq!(legacy.requests(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http1_connection_closes_after_keepalive_not_header_read() {
    let legacy = Backend::start("legacy").await;
    let proxy = Switchyard::start(&only_legacy(
        "timeouts: { header_read: 300ms, keepalive: 1500ms }\n",
        &legacy,
    ));
    let mut stream = TcpStream::connect(proxy.http).await.unwrap();
    // The server's idle clock starts after it answered, so after this.
    let sent = Instant::now();
    stream
        .write_all(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // Wait for the answer, then keep the connection idle.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"path\":\"/one\"") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before answering");
        seen.extend_from_slice(&buf[..n]);
    }
    let (rest, closed) = read_until_closed(&mut stream).await;
    let idle = closed - sent;
    assert_eq!(rest, "", "nothing more is sent on an idle connection");
    assert!(
        idle >= Duration::from_millis(1500),
        "closed after {idle:?} idle: header_read, not keepalive, decided"
    );
    assert!(idle < Duration::from_secs(5), "closed only after {idle:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_h2c_connection_is_closed_after_keepalive() {
    let legacy = Backend::start("legacy").await;
    let proxy = Switchyard::start(&only_legacy("timeouts: { keepalive: 700ms }\n", &legacy));
    let tcp = TcpStream::connect(proxy.http).await.unwrap();
    let (mut h2, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    let connection = tokio::spawn(connection);
    let sent = Instant::now();
    let response = h2
        .send_request(
            Request::get(proxy.url("/h2"))
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    response.into_body().collect().await.unwrap();
    // The server's GOAWAY and close end the client's connection task.
    let ended = tokio::time::timeout(WAIT, connection).await;
    let idle = sent.elapsed();
    assert!(ended.is_ok(), "the idle h2 connection stayed open");
    assert!(idle >= Duration::from_millis(700), "closed after {idle:?}");
    assert!(idle < Duration::from_secs(5), "closed only after {idle:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_announced_over_the_limit_gets_413_and_never_reaches_the_backend() {
    let legacy = Backend::start("legacy").await;
    let proxy = Switchyard::start(&only_legacy("limits: { max_body_bytes: 1000 }\n", &legacy));

    let response = raw_exchange(
        proxy.http,
        b"POST /__upload HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n\r\n",
        WAIT,
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 413 "), "{response}");
    assert!(
        response.contains("content-type: application/json"),
        "{response}"
    );
    let body = &response[response.find("\r\n\r\n").unwrap() + 4..];
    let json: serde_json::Value = serde_json::from_str(body).expect(body);
    assert_eq!(json["error"]["code"], "body_too_large");

    // Over h2c as well.
    let tcp = TcpStream::connect(proxy.http).await.unwrap();
    let (mut h2, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(connection);
    let response = h2
        .send_request(
            Request::post(proxy.url("/__upload"))
                .header("content-length", "2000")
                .body(Full::new(Bytes::from(vec![b'x'; 2000])))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(legacy.requests(), 0, "a refused body was forwarded");

    // At the limit exactly, it passes.
    let response = h2
        .send_request(
            Request::post(proxy.url("/__upload"))
                .header("content-length", "1000")
                .body(Full::new(Bytes::from(vec![b'x'; 1000])))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "1000");
}

/// A chunked upload of `frames` frames of 600 bytes.
async fn chunked_upload(proxy: &Switchyard, frames: usize) -> (StatusCode, String) {
    let chunks = futures_util::stream::iter(
        (0..frames).map(|_| Ok::<_, std::io::Error>(Frame::data(Bytes::from(vec![b'x'; 600])))),
    );
    let req = Request::post(proxy.url("/__upload"))
        .body(BodyExt::boxed(StreamBody::new(chunks)))
        .unwrap();
    let response = client().request(req).await.expect("a response");
    let status = response.status();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_outgrowing_the_limit_is_cut() {
    let legacy = Backend::start("legacy").await;
    let proxy = Switchyard::start(&only_legacy("limits: { max_body_bytes: 1000 }\n", &legacy));

    let (status, body) = chunked_upload(&proxy, 1).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "600"));

    // 1800 bytes: the upstream request is aborted once the second frame passes 1000.
    let (status, body) = chunked_upload(&proxy, 3).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"]["code"], "body_too_large");
    // The backend got the start of it but never the whole body (it would answer "1800").
    assert_eq!(legacy.requests(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_max_connections_new_connections_wait_until_one_closes() {
    let legacy = Backend::start("legacy").await;
    let proxy = Switchyard::start(&only_legacy("limits: { max_connections: 2 }\n", &legacy));
    let request = b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n";

    async fn answered(stream: &mut TcpStream) -> bool {
        let mut buf = [0u8; 4096];
        matches!(stream.read(&mut buf).await, Ok(n) if n > 0 && buf.starts_with(b"HTTP/1.1 200"))
    }
    let mut first = TcpStream::connect(proxy.http).await.unwrap();
    first.write_all(request).await.unwrap();
    assert!(answered(&mut first).await);
    let mut second = TcpStream::connect(proxy.http).await.unwrap();
    second.write_all(request).await.unwrap();
    assert!(answered(&mut second).await);

    // The kernel completes the handshake (backlog), but switchyard does not accept it.
    let mut third = TcpStream::connect(proxy.http).await.unwrap();
    third.write_all(request).await.unwrap();
    let mut buf = [0u8; 1];
    // Proving a negative needs some time; half a second is many round trips on loopback.
    let early = tokio::time::timeout(Duration::from_millis(500), third.peek(&mut buf)).await;
    assert!(
        early.is_err(),
        "a third connection was served over max_connections: 2"
    );
    assert_eq!(legacy.requests(), 2);

    drop(first);
    let served = tokio::time::timeout(WAIT, answered(&mut third)).await;
    assert_eq!(
        served.ok(),
        Some(true),
        "the waiting connection was served once one closed"
    );
    assert_eq!(legacy.requests(), 3);
}

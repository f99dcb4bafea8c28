//! The access log (contract §10): one line per request with the fields an incident needs,
//! written off the request path; a writer that falls behind loses lines, counted, and never
//! slows a request.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::*;

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// Waits for the line of the request with `request_id`.
async fn line_of(path: &Path, request_id: &str) -> Value {
    let mut found = None;
    eventually(
        Duration::from_secs(10),
        &format!("a line for {request_id}"),
        || {
            found = lines(path)
                .into_iter()
                .find(|l| l["request_id"] == request_id);
            std::future::ready(found.is_some())
        },
    )
    .await;
    found.unwrap()
}

/// The same field set on every line, whatever happened to the request.
const FIELDS: [&str; 19] = [
    "time",
    "request_id",
    "client",
    "method",
    "host",
    "path",
    "protocol",
    "status",
    "route",
    "side",
    "bucket",
    "flag",
    "weight",
    "upstream",
    "bytes_in",
    "bytes_out",
    "ttfb_ms",
    "duration_ms",
    "replayed",
];

fn assert_fields(line: &Value) {
    let object = line.as_object().unwrap();
    for field in FIELDS {
        assert!(object.contains_key(field), "no `{field}` in {line}");
    }
    assert_eq!(object.len(), FIELDS.len(), "{line}");
    assert!(humantime::parse_rfc3339(line["time"].as_str().unwrap()).is_ok());
    let ttfb = line["ttfb_ms"].as_f64().unwrap();
    let total = line["duration_ms"].as_f64().unwrap();
    assert!(0.0 < ttfb && ttfb <= total, "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_failed_over_unrouted_and_refused_requests_each_get_a_line() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let proxy = Switchyard::start(&format!(
        "access_log: {{ path: \"{}\" }}\n\
backends:\n  legacy: {{ endpoints: [\"{}\"] }}\n  target: {{ endpoints: [\"{}\"] }}\n\
default_backend: legacy\n\
routes:\n  - name: users\n    match: {{ path_prefix: /api/users }}\n    legacy: legacy\n    target: target\n    split: {{ percentage: {{ weight: 50 }} }}\n    sticky: {{ key: \"header:x-user\" }}\n  - name: orders\n    match: {{ path_prefix: /__status/500 }}\n    legacy: legacy\n    target: target\n    split: {{ percentage: {{ weight: 100 }} }}\n    failover: {{ methods: [GET], budget: 1, on_5xx: true }}\n",
        log.display(),
        legacy.url(),
        target.url()
    ));

    // A split request: the bucket is the documented hash of the route and the key, and the
    // side follows from it.
    let (status, headers, body) = get(
        &proxy.url("/api/users/7?token=secret"),
        &[("x-user", "alice"), ("x-request-id", "split-1")],
    )
    .await;
    assert_eq!(status, 200);
    let line = line_of(&log, "split-1").await;
    assert_fields(&line);
    let bucket = xxhash_rust::xxh3::xxh3_64(b"users:alice") % 10_000;
    let side = if bucket < 5000 { "target" } else { "legacy" };
    assert_eq!(line["bucket"], bucket, "{line}");
    assert_eq!(line["side"], side, "{line}");
    assert_eq!(backend_of(&headers), Some(side));
    assert_eq!(line["route"], "users");
    assert_eq!(line["weight"], 50.0);
    assert_eq!(line["path"], "/api/users/7", "the query stays out: {line}");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["status"], 200);
    assert_eq!(line["client"], "127.0.0.1");
    assert_eq!(line["bytes_out"], body.len() as u64);
    assert_eq!(line["replayed"], false);
    let answered = if side == "target" { &target } else { &legacy };
    assert_eq!(line["upstream"], answered.addr.to_string());

    // A request replayed on legacy after the target's 500; the id the upstream saw (minted
    // by the proxy) is the line's.
    let (status, _, _) = get(&proxy.url("/__status/500"), &[]).await;
    assert_eq!(status, 500, "legacy answers the same path with 500 too");
    let replayed = {
        let mut found = None;
        eventually(Duration::from_secs(10), "the failover line", || {
            found = lines(&log)
                .into_iter()
                .find(|l| l["path"] == "/__status/500");
            std::future::ready(found.is_some())
        })
        .await;
        found.unwrap()
    };
    assert_fields(&replayed);
    assert_eq!(replayed["replayed"], true, "{replayed}");
    assert_eq!(replayed["side"], "legacy");
    assert_eq!(replayed["route"], "orders");
    assert_eq!(replayed["upstream"], legacy.addr.to_string());
    assert!(uuid::Uuid::parse_str(replayed["request_id"].as_str().unwrap()).is_ok());

    let (_, _, echo) = get(&proxy.url("/nowhere"), &[("x-request-id", "")]).await;
    let echo: Value = serde_json::from_str(&echo).unwrap();
    let seen = echo["headers"]["x-request-id"]
        .as_str()
        .unwrap()
        .to_string();
    let unrouted = line_of(&log, &seen).await;
    assert_fields(&unrouted);
    assert_eq!(unrouted["route"], "_default");
    assert_eq!(unrouted["side"], "legacy");
    assert_eq!(unrouted["bucket"], Value::Null);

    // No route: the default backend answers 404.
    let (status, _, _) = get(&proxy.url("/__status/404"), &[("x-request-id", "nf-3")]).await;
    assert_eq!(status, 404);
    let not_found = line_of(&log, "nf-3").await;
    assert_fields(&not_found);
    assert_eq!(not_found["status"], 404);
    assert_eq!(not_found["route"], "_default");
    assert_eq!(not_found["upstream"], legacy.addr.to_string());

    // Refused by the head guard before any routing: Transfer-Encoding with Content-Length.
    let answer = raw_exchange(
        proxy.http,
        b"POST /api/users HTTP/1.1\r\nHost: a\r\nX-Request-Id: refused-1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let refused = line_of(&log, "refused-1").await;
    assert_fields(&refused);
    assert_eq!(refused["status"], 400);
    assert_eq!(refused["route"], Value::Null);
    assert_eq!(refused["side"], Value::Null);
    assert_eq!(refused["upstream"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_route_sample_and_text_format() {
    let legacy = Backend::start("legacy").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let proxy = Switchyard::start(&format!(
        "access_log: {{ path: \"{}\", format: text, sample: 1 }}\n\
backends:\n  legacy: {{ endpoints: [\"{}\"] }}\ndefault_backend: legacy\n\
routes:\n  - name: quiet\n    match: {{ path_prefix: /quiet }}\n    legacy: legacy\n    target: legacy\n    split: {{ percentage: {{ weight: 0 }} }}\n    access_log: {{ sample: 0 }}\n",
        log.display(),
        legacy.url()
    ));
    for _ in 0..20 {
        get(&proxy.url("/quiet/x"), &[]).await;
    }
    get(&proxy.url("/loud"), &[("x-request-id", "loud-1")]).await;
    eventually(Duration::from_secs(10), "the loud line", || {
        std::future::ready(
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("request_id=loud-1"),
        )
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    let line = text.lines().next().unwrap();
    assert!(
        line.contains(" 127.0.0.1 \"GET 127.0.0.1:")
            && line.contains(" /loud HTTP/1.1\" 200 ")
            && line.contains(" route=_default side=legacy "),
        "{line}"
    );
}

/// Median of request latencies, each measured by the client.
async fn median_latency(proxy: &Switchyard, n: usize) -> Duration {
    let client = client();
    let mut samples = vec![];
    for _ in 0..n {
        let started = Instant::now();
        let (status, _, _) = request(&client, "GET", &proxy.url("/x"), &[]).await;
        assert_eq!(status, 200);
        samples.push(started.elapsed());
    }
    samples.sort();
    samples[n / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_writer_drops_and_counts_lines_without_slowing_requests() {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;

    let legacy = Backend::start("legacy").await;
    let dir = tempfile::tempdir().unwrap();
    // A FIFO nobody reads from yet: once its buffer is full the writer blocks on it.
    let fifo = dir.path().join("access.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .unwrap();
    let backends = format!(
        "backends:\n  legacy: {{ endpoints: [\"{}\"] }}\ndefault_backend: legacy\n",
        legacy.url()
    );
    let quiet = Switchyard::start(&backends);
    let proxy = Switchyard::start(&format!(
        "access_log: {{ path: \"{}\", queue: 8 }}\n{backends}",
        fifo.display()
    ));

    let sent = 600;
    let baseline = median_latency(&quiet, sent).await;
    let blocked = median_latency(&proxy, sent).await;
    let dropped = proxy
        .metric("switchyard_access_log_dropped_lines_total")
        .await
        .unwrap();
    assert!(dropped > 0.0, "the pipe holds far fewer than {sent} lines");
    assert!(
        blocked <= baseline * 2 + Duration::from_millis(1),
        "requests slowed by a stuck access log: median {blocked:?} against {baseline:?} without one"
    );

    // Every request is either a line that reaches the reader or a counted drop.
    let mut read = Vec::new();
    let mut buf = [0u8; 65536];
    eventually(Duration::from_secs(10), "every queued line written", || {
        if let Ok(n) = reader.read(&mut buf) {
            read.extend_from_slice(&buf[..n]);
        }
        let lines = read.iter().filter(|&&b| b == b'\n').count() as f64;
        std::future::ready(lines + dropped == sent as f64)
    })
    .await;
}

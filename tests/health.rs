//! Health, rollback and failover end to end: a target that starts failing, slows down or
//! dies is rolled back within a second while failover hides its errors from GET clients;
//! POSTs are not replayed, budgets are enforced, and recovery does not undo a rollback.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use support::*;

/// A backend whose behaviour the test changes while it runs: `fail` answers 500, `delay_ms`
/// delays every answer.
struct Controlled {
    addr: SocketAddr,
    fail: Arc<AtomicU64>,
    delay_ms: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Controlled {
    async fn start(name: &'static str) -> Controlled {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let fail = Arc::new(AtomicU64::new(0));
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (f, d) = (fail.clone(), delay_ms.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (f, d) = (f.clone(), d.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |_req| {
                        let (f, d) = (f.clone(), d.clone());
                        async move {
                            let delay = d.load(Ordering::Relaxed);
                            if delay > 0 {
                                tokio::time::sleep(Duration::from_millis(delay)).await;
                            }
                            let status = if f.load(Ordering::Relaxed) == 1 {
                                StatusCode::INTERNAL_SERVER_ERROR
                            } else {
                                StatusCode::OK
                            };
                            let mut r = Response::new(Full::new(Bytes::from(name)));
                            *r.status_mut() = status;
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
        Controlled {
            addr,
            fail,
            delay_ms,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Controlled {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A backend in its own process, so "the target dies" can be a real kill.
struct ProcessBackend {
    child: Child,
    addr: SocketAddr,
}

impl ProcessBackend {
    fn start() -> ProcessBackend {
        let script = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = b"target"
        self.send_response(200)
        self.send_header("x-backend", "target")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
print(s.server_address[1], flush=True)
s.serve_forever()
"#;
        let mut child = Command::new("python3")
            .args(["-c", script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let port: u16 = line.trim().parse().expect("port");
        ProcessBackend {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for ProcessBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn config(
    legacy: &str,
    target: &str,
    target_extra: &str,
    route_extra: &str,
    weight: f64,
) -> String {
    format!(
        "backends:\n  legacy: {{ endpoints: [\"{legacy}\"] }}\n  target: {{ endpoints: [\"{target}\"]{target_extra} }}\n\
default_backend: legacy\n\
routes:\n  - name: users\n    match: {{ path_prefix: /api/users }}\n    legacy: legacy\n    target: target\n    split: {{ percentage: {{ weight: {weight} }} }}\n{route_extra}"
    )
}

#[derive(Debug, Clone)]
struct Sample {
    sent: Instant,
    status: Option<u16>,
    backend: Option<String>,
}

/// Sends `method` requests at about `rate` per second until `stop` is set.
fn load(
    proxy: &Switchyard,
    method: &'static str,
    rate: u64,
    stop: Arc<AtomicU64>,
) -> tokio::task::JoinHandle<Vec<Sample>> {
    let url = proxy.url("/api/users/1");
    tokio::spawn(async move {
        let client = client();
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
        let mut inflight = Vec::new();
        while stop.load(Ordering::Relaxed) == 0 {
            tick.tick().await;
            let (client, url) = (client.clone(), url.clone());
            inflight.push(tokio::spawn(async move {
                let sent = Instant::now();
                let req = http::Request::builder()
                    .method(method)
                    .uri(&url)
                    .body(
                        http_body_util::Empty::<Bytes>::new()
                            .map_err(|never| match never {})
                            .boxed(),
                    )
                    .unwrap();
                match client.request(req).await {
                    Ok(r) => Sample {
                        sent,
                        status: Some(r.status().as_u16()),
                        backend: backend_of(r.headers()).map(str::to_string),
                    },
                    Err(_) => Sample {
                        sent,
                        status: None,
                        backend: None,
                    },
                }
            }));
        }
        let mut out = Vec::new();
        for t in inflight {
            out.push(t.await.unwrap());
        }
        out
    })
}

async fn route_view(proxy: &Switchyard) -> serde_json::Value {
    let (status, _, body) = get(
        &proxy.admin_url("/v1/routes/users"),
        &[("authorization", &format!("Bearer {TOKEN}"))],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    serde_json::from_str(&body).unwrap()
}

async fn wait_rolled_back(proxy: &Switchyard, within: Duration) -> (Instant, serde_json::Value) {
    let deadline = Instant::now() + within;
    loop {
        let view = route_view(proxy).await;
        if view["state"] == "rolled_back" {
            return (Instant::now(), view);
        }
        assert!(
            Instant::now() < deadline,
            "route not rolled back within {within:?}: {view}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_target_is_rolled_back_within_a_second_and_clients_see_no_5xx() {
    let legacy = Backend::start("legacy").await;
    let target = Controlled::start("target").await;
    let proxy = Switchyard::start(&config(
        &legacy.url(),
        &target.url(),
        "",
        "    rollback: { max_error_rate: 0.05, window: 10s, min_requests: 20 }\n    failover: { methods: [GET], budget: 0.5, on_5xx: true }\n",
        50.0,
    ));
    let stop = Arc::new(AtomicU64::new(0));
    let load_task = load(&proxy, "GET", 100, stop.clone());
    // Healthy traffic first, so both sides have a history.
    eventually(Duration::from_secs(10), "target serves traffic", || async {
        route_view(&proxy).await["health"]["target"]["requests"]
            .as_u64()
            .unwrap_or(0)
            >= 50
    })
    .await;

    let fault = Instant::now();
    target.fail.store(1, Ordering::Relaxed);
    let (rolled_back_at, view) = wait_rolled_back(&proxy, Duration::from_secs(5)).await;
    let took = rolled_back_at - fault;
    eprintln!("rollback observed {took:?} after the target started failing");
    assert!(took < Duration::from_secs(1), "rollback took {took:?}");
    assert!(
        view["rollback"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("error_rate"),
        "{view}"
    );
    assert_eq!(view["rollback"]["by"], "health");

    // Everything after the rollback goes to legacy; let some of it run.
    let after = Instant::now();
    eventually(
        Duration::from_secs(5),
        "traffic after the rollback",
        || async { after.elapsed() > Duration::from_millis(300) },
    )
    .await;
    stop.store(1, Ordering::Relaxed);
    let samples = load_task.await.unwrap();
    let failed: Vec<&Sample> = samples.iter().filter(|s| s.status != Some(200)).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        samples.len(),
        &failed[..failed.len().min(5)]
    );
    let late_target = samples
        .iter()
        .filter(|s| s.sent > rolled_back_at && s.backend.as_deref() == Some("target"))
        .count();
    assert_eq!(
        late_target, 0,
        "requests sent after the rollback reached target"
    );
    assert!(
        proxy
            .metric("switchyard_failovers_total{route=\"users\"}")
            .await
            .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(
        proxy
            .metric("switchyard_rollbacks_total{route=\"users\",reason=\"error_rate\"}")
            .await,
        Some(1.0)
    );
    // The audit log records the rollback with its figures.
    let (_, _, audit) = get(
        &proxy.admin_url("/v1/audit"),
        &[("authorization", &format!("Bearer {TOKEN}"))],
    )
    .await;
    assert!(audit.contains("\"actor\":\"health\""), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_three_times_slower_is_rolled_back_on_latency() {
    let legacy = Controlled::start("legacy").await;
    let target = Controlled::start("target").await;
    legacy.delay_ms.store(20, Ordering::Relaxed);
    target.delay_ms.store(20, Ordering::Relaxed);
    let proxy = Switchyard::start(&config(
        &legacy.url(),
        &target.url(),
        "",
        "    rollback: { max_latency_ratio: 1.5, window: 3s, min_requests: 20 }\n",
        50.0,
    ));
    let stop = Arc::new(AtomicU64::new(0));
    let load_task = load(&proxy, "GET", 100, stop.clone());
    eventually(
        Duration::from_secs(10),
        "both sides have traffic",
        || async {
            let v = route_view(&proxy).await;
            v["health"]["target"]["requests"].as_u64().unwrap_or(0) >= 40
                && v["health"]["legacy"]["requests"].as_u64().unwrap_or(0) >= 40
        },
    )
    .await;
    assert_eq!(
        route_view(&proxy).await["state"],
        "active",
        "equal latencies must not roll back"
    );
    target.delay_ms.store(60, Ordering::Relaxed);
    let (_, view) = wait_rolled_back(&proxy, Duration::from_secs(5)).await;
    stop.store(1, Ordering::Relaxed);
    load_task.await.unwrap();
    assert!(
        view["rollback"]["reason"]
            .as_str()
            .unwrap()
            .starts_with("latency"),
        "{view}"
    );
    assert_eq!(
        proxy
            .metric("switchyard_rollbacks_total{route=\"users\",reason=\"latency\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_target_is_rolled_back_and_get_clients_see_no_error() {
    let legacy = Backend::start("legacy").await;
    let mut target = ProcessBackend::start();
    let proxy = Switchyard::start(&config(
        &legacy.url(),
        &format!("http://{}", target.addr),
        ", health: { path: /healthz, interval: 100ms, timeout: 200ms, unhealthy_threshold: 2 }",
        "    rollback: { max_error_rate: 0.05, window: 10s, min_requests: 20 }\n    failover: { methods: [GET], budget: 0.5 }\n",
        50.0,
    ));
    let stop = Arc::new(AtomicU64::new(0));
    let load_task = load(&proxy, "GET", 100, stop.clone());
    eventually(Duration::from_secs(10), "target serves traffic", || async {
        route_view(&proxy).await["health"]["target"]["requests"]
            .as_u64()
            .unwrap_or(0)
            >= 30
    })
    .await;
    let killed = Instant::now();
    target.kill();
    let (at, view) = wait_rolled_back(&proxy, Duration::from_secs(5)).await;
    eprintln!(
        "rollback observed {:?} after the target was killed ({})",
        at - killed,
        view["rollback"]["reason"]
    );
    assert!(
        at - killed < Duration::from_secs(1),
        "rollback took {:?}",
        at - killed
    );
    let after = Instant::now();
    eventually(
        Duration::from_secs(5),
        "traffic after the rollback",
        || async { after.elapsed() > Duration::from_millis(200) },
    )
    .await;
    stop.store(1, Ordering::Relaxed);
    let samples = load_task.await.unwrap();
    let failed = samples.iter().filter(|s| s.status != Some(200)).count();
    assert_eq!(
        failed,
        0,
        "{failed} of {} GETs failed while the target died",
        samples.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_are_not_replayed_and_an_exhausted_budget_stops_replays() {
    let legacy = Backend::start("legacy").await;
    let target = Controlled::start("target").await;
    target.fail.store(1, Ordering::Relaxed);
    // No rollback limits: the target keeps failing for the whole test.
    let proxy = Switchyard::start(&config(
        &legacy.url(),
        &target.url(),
        "",
        "    failover: { methods: [GET], budget: 0.2, on_5xx: true }\n",
        100.0,
    ));
    let c = client();
    let (status, headers, _) = request(&c, "POST", &proxy.url("/api/users/1"), &[]).await;
    assert_eq!(
        status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "a POST must not be replayed"
    );
    assert_eq!(backend_of(&headers), Some("target"));
    assert_eq!(
        proxy
            .metric("switchyard_failovers_total{route=\"users\"}")
            .await,
        Some(0.0)
    );

    // Every GET fails on target; the budget lets about a fifth of them be replayed.
    let mut replayed = 0;
    let mut failed = 0;
    for _ in 0..100 {
        let (status, headers, _) = request(&c, "GET", &proxy.url("/api/users/1"), &[]).await;
        match (status.as_u16(), backend_of(&headers)) {
            (200, Some("legacy")) => replayed += 1,
            (500, Some("target")) => failed += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert!(
        (15..=25).contains(&replayed),
        "{replayed} of 100 replayed with budget 0.2"
    );
    assert_eq!(replayed + failed, 100);
    assert_eq!(
        proxy
            .metric("switchyard_failovers_total{route=\"users\"}")
            .await,
        Some(f64::from(replayed))
    );
    assert_eq!(
        proxy
            .metric("switchyard_failover_budget_exhausted_total{route=\"users\"}")
            .await,
        Some(f64::from(failed))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovered_target_does_not_bring_the_route_back_by_itself() {
    let legacy = Backend::start("legacy").await;
    let target = Controlled::start("target").await;
    target.fail.store(1, Ordering::Relaxed);
    let proxy = Switchyard::start(&config(
        &legacy.url(),
        &target.url(),
        "",
        "    rollback: { max_error_rate: 0.05, window: 2s, min_requests: 5 }\n",
        100.0,
    ));
    let c = client();
    for _ in 0..10 {
        request(&c, "GET", &proxy.url("/api/users/1"), &[]).await;
    }
    wait_rolled_back(&proxy, Duration::from_secs(3)).await;
    target.fail.store(0, Ordering::Relaxed);
    // Two full windows of healthy conditions: nothing may undo the rollback.
    let recovered = Instant::now();
    let mut seen = 0;
    while recovered.elapsed() < Duration::from_secs(4) {
        let (status, headers, _) = request(&c, "GET", &proxy.url("/api/users/1"), &[]).await;
        assert_eq!(
            (status.as_u16(), backend_of(&headers)),
            (200, Some("legacy"))
        );
        seen += 1;
    }
    assert!(seen > 10);
    assert_eq!(route_view(&proxy).await["state"], "rolled_back");
    // An operator brings it back.
    let (status, _, body) =
        support::put_json(&proxy, "/v1/routes/users/weight", r#"{"weight": 100}"#).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (_, headers, _) = get(&proxy.url("/api/users/1"), &[]).await;
    assert_eq!(backend_of(&headers), Some("target"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_under_the_limit_or_below_min_requests_do_not_roll_back() {
    let legacy = Backend::start("legacy").await;
    let target = Controlled::start("target").await;
    target.fail.store(1, Ordering::Relaxed);
    let proxy = Switchyard::start(&config(
        &legacy.url(),
        &target.url(),
        "",
        "    rollback: { max_error_rate: 0.05, window: 10s, min_requests: 20 }\n",
        100.0,
    ));
    let c = client();
    // Below min_requests: 15 failures in a row.
    for _ in 0..15 {
        request(&c, "GET", &proxy.url("/api/users/1"), &[]).await;
    }
    // The monitor evaluates every 100 ms; give it several rounds with the figures visible.
    let seen = Instant::now();
    eventually(
        Duration::from_secs(3),
        "the window shows the failures for half a second",
        || async {
            let v = route_view(&proxy).await;
            assert_eq!(v["state"], "active", "rolled back below min_requests: {v}");
            v["health"]["target"]["errors"] == 15 && seen.elapsed() > Duration::from_millis(500)
        },
    )
    .await;

    // Under the limit: 2% errors over 200 requests, on a fresh proxy whose window does not
    // hold the failures above.
    drop(proxy);
    let proxy = Switchyard::start(&config(
        &legacy.url(),
        &target.url(),
        "",
        "    rollback: { max_error_rate: 0.05, window: 10s, min_requests: 20 }\n",
        100.0,
    ));
    for i in 0..200 {
        target.fail.store(u64::from(i % 50 == 0), Ordering::Relaxed);
        request(&c, "GET", &proxy.url("/api/users/2"), &[]).await;
    }
    let v = route_view(&proxy).await;
    assert_eq!(v["health"]["target"]["requests"], 200, "{v}");
    assert_eq!(v["health"]["target"]["errors"], 4, "{v}");
    let checked = Instant::now();
    eventually(
        Duration::from_secs(3),
        "no rollback for half a second",
        || async {
            assert_eq!(route_view(&proxy).await["state"], "active");
            checked.elapsed() > Duration::from_millis(500)
        },
    )
    .await;
}

/// Records every POST body it receives, for webhook tests.
async fn webhook_receiver() -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = bodies.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        seen.lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&body).into_owned());
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, bodies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_is_announced_to_the_routes_webhooks() {
    let legacy = Backend::start("legacy").await;
    let target = Controlled::start("target").await;
    target.fail.store(1, Ordering::Relaxed);
    let (hook, bodies) = webhook_receiver().await;
    let proxy = Switchyard::start(&config(
        &legacy.url(),
        &target.url(),
        "",
        &format!(
            "    rollback: {{ max_error_rate: 0.05, window: 5s, min_requests: 5 }}\n    rollout:\n      steps: [10, 100]\n      webhooks: [ {{ url: \"http://{hook}/gate\", on: [rollback] }} ]\n"
        ),
        100.0,
    ));
    let c = client();
    for _ in 0..10 {
        request(&c, "GET", &proxy.url("/api/users/1"), &[]).await;
    }
    wait_rolled_back(&proxy, Duration::from_secs(3)).await;
    eventually(
        Duration::from_secs(5),
        "the webhook receives the rollback",
        || async { !bodies.lock().unwrap().is_empty() },
    )
    .await;
    let body: serde_json::Value = serde_json::from_str(&bodies.lock().unwrap()[0]).unwrap();
    assert_eq!(body["event"], "rollback");
    assert_eq!(body["route"], "users");
    assert_eq!(body["reason"], "error_rate");
    assert!(
        body["figures"]["target"]["requests"].as_u64().unwrap() >= 5,
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_bodies_are_replayed_intact_and_large_ones_are_not_replayed() {
    // Legacy records the bodies it receives, so the replayed copy can be checked byte for byte.
    let (legacy, received) = webhook_receiver().await;
    let target = Controlled::start("target").await;
    target.fail.store(1, Ordering::Relaxed);
    let proxy = Switchyard::start(&config(
        &format!("http://{legacy}"),
        &target.url(),
        "",
        "    failover: { methods: [PUT], budget: 1.0, on_5xx: true, max_replay_bytes: 1024 }\n",
        100.0,
    ));
    let c = client();
    let send = |body: Vec<u8>| {
        let c = c.clone();
        let url = proxy.url("/api/users/1");
        async move {
            let req = http::Request::builder()
                .method("PUT")
                .uri(url)
                .body(
                    Full::new(Bytes::from(body))
                        .map_err(|never| match never {})
                        .boxed(),
                )
                .unwrap();
            let r = c.request(req).await.unwrap();
            (r.status(), backend_of(r.headers()).map(str::to_string))
        }
    };
    // 1000 bytes: kept, replayed on legacy after the target's 500.
    let small: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let (status, backend) = send(small.clone()).await;
    assert_eq!(
        (status, backend),
        (StatusCode::OK, None),
        "answered by legacy (which sets no x-backend)"
    );
    assert_eq!(
        received.lock().unwrap().as_slice(),
        [String::from_utf8(small).unwrap()]
    );
    // 5000 bytes: over max_replay_bytes, streamed once; the target's 500 comes through.
    let (status, backend) = send(vec![b'z'; 5000]).await;
    assert_eq!(
        (status, backend.as_deref()),
        (StatusCode::INTERNAL_SERVER_ERROR, Some("target"))
    );
    assert_eq!(
        received.lock().unwrap().len(),
        1,
        "the large body reached legacy"
    );
    assert_eq!(
        proxy
            .metric("switchyard_failovers_total{route=\"users\"}")
            .await,
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_failing_its_probe_leaves_the_balancer_until_it_recovers() {
    let a = Controlled::start("a").await;
    let b = Controlled::start("b").await;
    let proxy = Switchyard::start(&format!(
        "backends:\n  monolith: {{ endpoints: [\"{}\", \"{}\"], health: {{ path: /healthz, interval: 100ms, timeout: 200ms, healthy_threshold: 2, unhealthy_threshold: 2 }} }}\ndefault_backend: monolith\n",
        a.url(),
        b.url()
    ));
    let c = client();
    let sides = |n: usize| {
        let c = c.clone();
        let url = proxy.url("/anything");
        async move {
            let mut seen = std::collections::HashMap::<String, usize>::new();
            for _ in 0..n {
                let (_, headers, _) = request(&c, "GET", &url, &[]).await;
                *seen
                    .entry(backend_of(&headers).unwrap_or("?").to_string())
                    .or_default() += 1;
            }
            seen
        }
    };
    let both = sides(20).await;
    assert_eq!(
        (both.get("a"), both.get("b")),
        (Some(&10), Some(&10)),
        "{both:?}"
    );
    a.fail.store(1, Ordering::Relaxed);
    eventually(Duration::from_secs(5), "a leaves the balancer", || async {
        !sides(10).await.contains_key("a")
    })
    .await;
    a.fail.store(0, Ordering::Relaxed);
    eventually(Duration::from_secs(5), "a comes back", || async {
        sides(10).await.contains_key("a")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_before_an_operator_clears_a_rollback_do_not_roll_it_back_again() {
    let legacy = Backend::start("legacy").await;
    let target = Controlled::start("target").await;
    target.fail.store(1, Ordering::Relaxed);
    let proxy = Switchyard::start(&config(
        &legacy.url(),
        &target.url(),
        "",
        "    rollback: { max_error_rate: 0.05, window: 10s, min_requests: 5 }\n",
        100.0,
    ));
    let c = client();
    for _ in 0..10 {
        request(&c, "GET", &proxy.url("/api/users/1"), &[]).await;
    }
    wait_rolled_back(&proxy, Duration::from_secs(3)).await;
    // Fixed, and brought back well within the 10 s window that still holds the failures.
    target.fail.store(0, Ordering::Relaxed);
    let (status, _, body) =
        support::put_json(&proxy, "/v1/routes/users/weight", r#"{"weight": 100}"#).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let cleared = Instant::now();
    eventually(
        Duration::from_secs(5),
        "healthy traffic for a second without a new rollback",
        || async {
            let (status, headers, _) = request(&c, "GET", &proxy.url("/api/users/1"), &[]).await;
            assert_eq!(
                (status.as_u16(), backend_of(&headers)),
                (200, Some("target"))
            );
            assert_eq!(
                route_view(&proxy).await["state"],
                "active",
                "rolled back again on old failures"
            );
            cleared.elapsed() > Duration::from_secs(1)
        },
    )
    .await;
}

//! Hot reload and drain, end to end: under constant keep-alive load a valid config (written in
//! place, renamed over the file, or picked up on SIGHUP) changes the split without one failed
//! request; an invalid one is refused, counted, and the old split keeps serving; SIGTERM lets
//! an in-flight request finish, turns readiness off, stops the listener and exits 0.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use support::*;

const SUCCESS: &str = "switchyard_config_reloads_total{result=\"success\"}";
const FAILURE: &str = "switchyard_config_reloads_total{result=\"failure\"}";
const WAIT: Duration = Duration::from_secs(10);

fn percentage(weight: &str) -> String {
    format!("{{ percentage: {{ weight: {weight} }} }}")
}

/// What one load task saw.
#[derive(Debug, Default)]
struct Seen {
    ok: u64,
    by_backend: HashMap<String, u64>,
    /// Anything but a 200 from a backend: statuses, connection and body errors.
    failures: Vec<String>,
    /// Requests answered by legacy after this task had already been answered by target.
    legacy_after_target: u64,
}

/// Client tasks, each on ONE keep-alive connection to the proxy, sending GETs back to back
/// until stopped. A connection the proxy closes or breaks shows up as a failure, so "no
/// failures" also means "no connection was dropped".
struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Seen>>,
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

    /// Requests answered so far, by all tasks.
    fn done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }

    /// Waits until the tasks together have completed `n` more requests from now.
    async fn progress(&self, n: u64) {
        let from = self.done();
        eventually(WAIT, "the load to make progress", || async {
            self.done() >= from + n
        })
        .await;
    }

    async fn finish(self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Seen::default();
        for t in self.tasks {
            let seen = t.await.expect("load task");
            total.ok += seen.ok;
            total.failures.extend(seen.failures);
            total.legacy_after_target += seen.legacy_after_target;
            for (k, v) in seen.by_backend {
                *total.by_backend.entry(k).or_default() += v;
            }
        }
        total
    }
}

async fn load_task(
    proxy: SocketAddr,
    path: String,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
) -> Seen {
    let mut seen = Seen::default();
    let stream = match tokio::net::TcpStream::connect(proxy).await {
        Ok(s) => s,
        Err(e) => {
            seen.failures.push(format!("connect: {e}"));
            return seen;
        }
    };
    let (mut sender, connection) = match hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(
        TokioIo::new(stream),
    )
    .await
    {
        Ok(pair) => pair,
        Err(e) => {
            seen.failures.push(format!("handshake: {e}"));
            return seen;
        }
    };
    tokio::spawn(connection);
    let mut target_seen = false;
    while !stop.load(Ordering::Relaxed) {
        if let Err(e) = sender.ready().await {
            seen.failures
                .push(format!("connection no longer usable: {e}"));
            break;
        }
        let req = Request::get(path.as_str())
            .header("host", proxy.to_string())
            .body(Empty::new())
            .unwrap();
        let response = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                seen.failures.push(format!("request: {e}"));
                break;
            }
        };
        let status = response.status();
        let backend = backend_of(response.headers()).unwrap_or("-").to_string();
        if let Err(e) = response.into_body().collect().await {
            seen.failures.push(format!("body: {e}"));
            break;
        }
        if status != 200 {
            seen.failures
                .push(format!("status {status} from {backend}"));
            continue;
        }
        seen.ok += 1;
        done.fetch_add(1, Ordering::Relaxed);
        match backend.as_str() {
            "target" => target_seen = true,
            "legacy" if target_seen => seen.legacy_after_target += 1,
            _ => {}
        }
        *seen.by_backend.entry(backend).or_default() += 1;
    }
    seen
}

/// Which backend answers a fresh GET on `/api/users/1`.
async fn answered_by(proxy: &Switchyard) -> String {
    let (status, headers, body) = get(&proxy.url("/api/users/1"), &[]).await;
    assert_eq!(status, 200, "{body}");
    backend_of(&headers).unwrap_or("-").to_string()
}

/// `n` fresh requests all answered by `backend`.
async fn all_answered_by(proxy: &Switchyard, backend: &str, n: usize) {
    for i in 0..n {
        assert_eq!(answered_by(proxy).await, backend, "request {i} of {n}");
    }
}

async fn metric(proxy: &Switchyard, sample: &str) -> f64 {
    proxy
        .metric(sample)
        .await
        .unwrap_or_else(|| panic!("no sample {sample}"))
}

fn assert_clean(seen: &Seen) {
    assert!(
        seen.failures.is_empty(),
        "{} failed requests under load, e.g. {:?}",
        seen.failures.len(),
        &seen.failures[..seen.failures.len().min(5)]
    );
}

/// Replaces `path` the way editors and config management do: a temporary file in the same
/// directory, renamed over the original.
fn replace_by_rename(path: &Path, text: &str) {
    let tmp = path.with_file_name(".switchyard.yaml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewriting_the_file_moves_traffic_without_a_failed_request() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&two_sided_config(&legacy, &target, &percentage("0"), None));
    all_answered_by(&proxy, "legacy", 10).await;

    let load = Load::start(proxy.http, "/api/users/1", 4);
    load.progress(200).await;
    std::fs::write(
        &proxy.config_path,
        with_listeners(&two_sided_config(
            &legacy,
            &target,
            &percentage("100"),
            None,
        )),
    )
    .unwrap();
    eventually(WAIT, "target to answer after the reload", || async {
        answered_by(&proxy).await == "target"
    })
    .await;
    // Keep the load running across and well past the swap.
    load.progress(200).await;
    let seen = load.finish().await;

    assert_clean(&seen);
    assert!(
        seen.by_backend.get("legacy").copied().unwrap_or(0) > 0
            && seen.by_backend.get("target").copied().unwrap_or(0) > 0,
        "the load did not span the reload: {:?}",
        seen.by_backend
    );
    assert_eq!(
        seen.legacy_after_target, 0,
        "a connection went back to the old split after seeing the new one"
    );
    all_answered_by(&proxy, "target", 20).await;
    assert!(metric(&proxy, SUCCESS).await >= 1.0);
    assert_eq!(metric(&proxy, FAILURE).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_change_the_watcher_cannot_see() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let config = HupOnlyConfig::new(&with_listeners(&two_sided_config(
        &legacy,
        &target,
        &percentage("0"),
        None,
    )));
    let real = config.real.as_path();
    let proxy = Switchyard::start_file(&config.link);
    all_answered_by(&proxy, "legacy", 10).await;
    let before = metric(&proxy, SUCCESS).await;

    let load = Load::start(proxy.http, "/api/users/1", 4);
    load.progress(200).await;
    std::fs::write(
        real,
        with_listeners(&two_sided_config(
            &legacy,
            &target,
            &percentage("100"),
            None,
        )),
    )
    .unwrap();
    proxy.signal("HUP");
    eventually(WAIT, "target to answer after SIGHUP", || async {
        answered_by(&proxy).await == "target"
    })
    .await;
    load.progress(200).await;
    let seen = load.finish().await;

    assert_clean(&seen);
    assert!(
        seen.by_backend.get("legacy").copied().unwrap_or(0) > 0
            && seen.by_backend.get("target").copied().unwrap_or(0) > 0,
        "the load did not span the reload: {:?}",
        seen.by_backend
    );
    assert_eq!(seen.legacy_after_target, 0);
    all_answered_by(&proxy, "target", 20).await;
    assert_eq!(metric(&proxy, SUCCESS).await, before + 1.0);
    assert_eq!(metric(&proxy, FAILURE).await, 0.0);

    // SIGHUP reloads even an unchanged file, and says so in the counter.
    proxy.signal("HUP");
    eventually(WAIT, "a second SIGHUP to count a reload", || async {
        metric(&proxy, SUCCESS).await == before + 2.0
    })
    .await;
    all_answered_by(&proxy, "target", 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_files_are_refused_and_the_old_split_keeps_serving() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    // Everything to target, so that a refused file wrongly applied (or its fallback weight
    // of 0) would show up as legacy answers.
    let proxy = Switchyard::start(&two_sided_config(
        &legacy,
        &target,
        &percentage("100"),
        None,
    ));
    all_answered_by(&proxy, "target", 10).await;
    assert_eq!(metric(&proxy, FAILURE).await, 0.0);

    let load = Load::start(proxy.http, "/api/users/1", 4);
    load.progress(200).await;

    // A weight out of range.
    std::fs::write(
        &proxy.config_path,
        with_listeners(&two_sided_config(
            &legacy,
            &target,
            &percentage("150"),
            None,
        )),
    )
    .unwrap();
    eventually(WAIT, "the out-of-range weight to be refused", || async {
        metric(&proxy, FAILURE).await == 1.0
    })
    .await;
    load.progress(200).await;
    all_answered_by(&proxy, "target", 20).await;

    // An unknown key next to a valid weight of 0.
    let unknown_key = with_listeners(&two_sided_config(&legacy, &target, &percentage("0"), None))
        .replace(
            "    legacy: legacy\n",
            "    legacy: legacy\n    colour: red\n",
        );
    assert!(unknown_key.contains("colour: red"));
    std::fs::write(&proxy.config_path, unknown_key).unwrap();
    eventually(WAIT, "the unknown key to be refused", || async {
        metric(&proxy, FAILURE).await == 2.0
    })
    .await;
    load.progress(200).await;
    all_answered_by(&proxy, "target", 20).await;
    assert_eq!(metric(&proxy, SUCCESS).await, 0.0);

    // A later valid file is applied.
    std::fs::write(
        &proxy.config_path,
        with_listeners(&two_sided_config(&legacy, &target, &percentage("0"), None)),
    )
    .unwrap();
    eventually(WAIT, "legacy to answer after the valid file", || async {
        answered_by(&proxy).await == "legacy"
    })
    .await;
    load.progress(200).await;
    let seen = load.finish().await;

    assert_clean(&seen);
    // Until the valid file, every answer came from target: refusals changed nothing.
    assert!(
        seen.by_backend.get("target").copied().unwrap_or(0) >= 400,
        "{:?}",
        seen.by_backend
    );
    all_answered_by(&proxy, "legacy", 20).await;
    assert_eq!(metric(&proxy, SUCCESS).await, 1.0);
    assert_eq!(metric(&proxy, FAILURE).await, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_renamed_over_the_config_is_picked_up() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&two_sided_config(&legacy, &target, &percentage("0"), None));
    all_answered_by(&proxy, "legacy", 10).await;

    let load = Load::start(proxy.http, "/api/users/1", 4);
    load.progress(200).await;
    replace_by_rename(
        &proxy.config_path,
        &with_listeners(&two_sided_config(
            &legacy,
            &target,
            &percentage("100"),
            None,
        )),
    );
    eventually(WAIT, "target to answer after the rename", || async {
        answered_by(&proxy).await == "target"
    })
    .await;
    load.progress(200).await;
    let seen = load.finish().await;

    assert_clean(&seen);
    assert_eq!(seen.legacy_after_target, 0);
    all_answered_by(&proxy, "target", 20).await;
    assert_eq!(metric(&proxy, SUCCESS).await, 1.0);
    assert_eq!(metric(&proxy, FAILURE).await, 0.0);

    // And again: the watch survives the file it watched being replaced.
    replace_by_rename(
        &proxy.config_path,
        &with_listeners(&two_sided_config(&legacy, &target, &percentage("0"), None)),
    );
    eventually(WAIT, "legacy to answer after the second rename", || async {
        answered_by(&proxy).await == "legacy"
    })
    .await;
    assert_eq!(metric(&proxy, SUCCESS).await, 2.0);
}

/// Readiness as the admin answers it: `Some(status)`, or `None` when the admin is gone.
async fn readyz(proxy: &Switchyard) -> Option<u16> {
    let req = Request::get(proxy.admin_url("/readyz"))
        .body(
            Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap();
    let response = client().request(req).await.ok()?;
    Some(response.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_zero() {
    let legacy = Backend::start("legacy").await;
    let mut proxy = Switchyard::start(&format!(
        "drain_delay: 0s\nshutdown_timeout: 10s\n\
backends:\n  legacy: {{ endpoints: [\"{}\"] }}\ndefault_backend: legacy\n",
        legacy.url()
    ));
    assert_eq!(readyz(&proxy).await, Some(200), "ready before SIGTERM");
    assert_eq!(answered_by(&proxy).await, "legacy");

    let before = legacy.requests();
    let slow_url = proxy.url("/__sleep/1500");
    let slow = tokio::spawn(async move {
        let started = Instant::now();
        let (status, _, body) = get(&slow_url, &[]).await;
        (status, body, started.elapsed())
    });
    // The slow request has reached the backend, so it is in flight through the proxy.
    eventually(WAIT, "the slow request to reach the backend", || async {
        legacy.requests() > before
    })
    .await;

    let term_sent = Instant::now();
    proxy.signal("TERM");
    eventually(
        WAIT,
        "readiness to turn off (503) or the admin to close",
        || async { matches!(readyz(&proxy).await, Some(503) | None) },
    )
    .await;
    let http = proxy.http;
    eventually(WAIT, "new connections to be refused", || async {
        tokio::net::TcpStream::connect(http).await.is_err()
    })
    .await;
    assert!(
        !slow.is_finished(),
        "the listener stopped only after the slow request ended ({:?} after SIGTERM)",
        term_sent.elapsed()
    );

    let (status, body, took) = slow.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "legacy");
    assert!(took >= Duration::from_millis(1500), "{took:?}");

    let left = Duration::from_secs(10).saturating_sub(term_sent.elapsed());
    let exit = proxy.wait_exit(left);
    assert_eq!(exit.code(), Some(0), "{exit:?}");
}

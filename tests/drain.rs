//! SIGTERM under constant load (HTTP/1.1 keep-alive and h2c clients sending back to back):
//! `/readyz` turns 503 at once while the listener keeps accepting and serving for
//! `drain_delay`; then connections are closed gracefully (`Connection: close`, GOAWAY); no
//! request the proxy accepted fails, none fails before the drain delay is over, and the
//! process exits 0 within `drain_delay + shutdown_timeout`.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use support::*;
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);
const DRAIN_DELAY: Duration = Duration::from_secs(2);
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug)]
#[allow(dead_code)] // the texts are read through Debug, in failure messages
enum Kind {
    /// 200 with its whole body; whether the response said `Connection: close`.
    Ok { close: bool },
    /// Answered, but not with a 200, or the body broke off: a failed accepted request.
    Failed(String),
    /// No response at all: the connection was refused, closed or reset before the request
    /// was taken. Allowed only once the listener has stopped.
    NotAccepted(String),
}

#[derive(Debug)]
struct Outcome {
    at: Instant,
    kind: Kind,
}

#[derive(Clone)]
struct Log(Arc<Mutex<Vec<Outcome>>>);

impl Log {
    fn push(&self, kind: Kind) {
        self.0.lock().unwrap().push(Outcome {
            at: Instant::now(),
            kind,
        });
    }
}

/// Sends GETs back to back over one connection at a time, reconnecting when one closes,
/// until `stop` is set or a connection is refused after SIGTERM.
async fn load(proxy: SocketAddr, h2: bool, log: Log, stop: Arc<AtomicBool>, term: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let tcp = match TcpStream::connect(proxy).await {
            Ok(tcp) => tcp,
            Err(e) => {
                log.push(Kind::NotAccepted(format!("connect: {e}")));
                if term.load(Ordering::Relaxed) {
                    return;
                }
                continue;
            }
        };
        if h2 {
            h2_connection(tcp, proxy, &log, &stop).await;
        } else {
            h1_connection(tcp, &log, &stop).await;
        }
    }
}

async fn h1_connection(tcp: TcpStream, log: &Log, stop: &AtomicBool) {
    let Ok((mut sender, connection)) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp)).await
    else {
        return log.push(Kind::NotAccepted("handshake".into()));
    };
    tokio::spawn(connection);
    while !stop.load(Ordering::Relaxed) {
        if sender.ready().await.is_err() {
            // Closed by the server between requests: nothing was sent on it.
            return;
        }
        let req = Request::get("/__sleep/20")
            .header("host", "drain.test")
            .body(Empty::new())
            .unwrap();
        let response = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => return log.push(Kind::NotAccepted(format!("h1 request: {e}"))),
        };
        let close = response
            .headers()
            .get("connection")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        log.push(
            finish(response)
                .await
                .map_or_else(Kind::Failed, |()| Kind::Ok { close }),
        );
        if close {
            return;
        }
    }
}

async fn h2_connection(tcp: TcpStream, proxy: SocketAddr, log: &Log, stop: &AtomicBool) {
    let Ok((mut sender, connection)) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
        TokioExecutor::new(),
        TokioIo::new(tcp),
    )
    .await
    else {
        return log.push(Kind::NotAccepted("h2 handshake".into()));
    };
    tokio::spawn(connection);
    while !stop.load(Ordering::Relaxed) {
        if sender.ready().await.is_err() {
            // GOAWAY received: the client opens no new stream on it.
            return;
        }
        let req = Request::get(format!("http://{proxy}/__sleep/20"))
            .body(Empty::new())
            .unwrap();
        let response = match sender.send_request(req).await {
            Ok(r) => r,
            // A stream the server refused after GOAWAY, or one sent as the connection closed.
            Err(e) => return log.push(Kind::NotAccepted(format!("h2 request: {e}"))),
        };
        log.push(
            finish(response)
                .await
                .map_or_else(Kind::Failed, |()| Kind::Ok { close: false }),
        );
    }
}

async fn finish(response: http::Response<hyper::body::Incoming>) -> Result<(), String> {
    let status = response.status();
    match response.into_body().collect().await.map(|b| b.to_bytes()) {
        Ok(body) if status == 200 && body == "legacy" => Ok(()),
        Ok(body) => Err(format!("status {status}: {body:?}")),
        Err(e) => Err(format!("status {status}, body broke off: {e}")),
    }
}

async fn readyz(proxy: &Switchyard) -> Option<u16> {
    let req = Request::get(proxy.admin_url("/readyz"))
        .body(
            Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed(),
        )
        .unwrap();
    Some(client().request(req).await.ok()?.status().as_u16())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_fails_no_accepted_request() {
    let legacy = Backend::start("legacy").await;
    let mut proxy = Switchyard::start(&format!(
        "drain_delay: {}ms\nshutdown_timeout: {}ms\n\
backends:\n  legacy: {{ endpoints: [\"{}\"] }}\ndefault_backend: legacy\n",
        DRAIN_DELAY.as_millis(),
        SHUTDOWN_TIMEOUT.as_millis(),
        legacy.url()
    ));
    assert_eq!(readyz(&proxy).await, Some(200));

    let log = Log(Arc::new(Mutex::new(Vec::new())));
    let stop = Arc::new(AtomicBool::new(false));
    let term = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..8)
        .map(|i| {
            tokio::spawn(load(
                proxy.http,
                i % 4 == 3,
                log.clone(),
                stop.clone(),
                term.clone(),
            ))
        })
        .collect();
    let count_ok = |log: &Log| {
        log.0
            .lock()
            .unwrap()
            .iter()
            .filter(|o| matches!(o.kind, Kind::Ok { .. }))
            .count()
    };
    eventually(WAIT, "the load to be running", || async {
        count_ok(&log) >= 100
    })
    .await;

    term.store(true, Ordering::Relaxed);
    let term_sent = Instant::now();
    proxy.signal("TERM");
    eventually(WAIT, "readiness to turn 503", || async {
        readyz(&proxy).await == Some(503)
    })
    .await;
    let not_ready = Instant::now();
    assert!(
        not_ready - term_sent < DRAIN_DELAY,
        "/readyz turned 503 only after {:?}",
        not_ready - term_sent
    );
    // Still accepting: a new connection during the drain delay is served.
    let (status, _, body) = get(&proxy.url("/__sleep/1"), &[]).await;
    assert!(
        term_sent.elapsed() < DRAIN_DELAY,
        "the probe came too late to prove anything"
    );
    assert_eq!((status.as_u16(), body.as_str()), (200, "legacy"));

    // The load runs into the stopped listener and ends by itself.
    for task in tasks {
        tokio::time::timeout(WAIT + SHUTDOWN_TIMEOUT, task)
            .await
            .expect("a load task did not end after the listener stopped")
            .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let left = (DRAIN_DELAY + SHUTDOWN_TIMEOUT).saturating_sub(term_sent.elapsed());
    let exit = tokio::task::block_in_place(|| proxy.wait_exit(left));
    assert_eq!(exit.code(), Some(0), "{exit:?}");

    let ok = count_ok(&log);
    let outcomes = log.0.lock().unwrap();
    eprintln!(
        "{} outcomes: {ok} ok, {} with Connection: close, {} not accepted",
        outcomes.len(),
        outcomes
            .iter()
            .filter(|o| matches!(o.kind, Kind::Ok { close: true }))
            .count(),
        outcomes
            .iter()
            .filter(|o| matches!(o.kind, Kind::NotAccepted(_)))
            .count(),
    );
    let failed: Vec<_> = outcomes
        .iter()
        .filter(|o| matches!(o.kind, Kind::Failed(_)))
        .collect();
    assert!(failed.is_empty(), "accepted requests failed: {failed:?}");
    let early: Vec<_> = outcomes
        .iter()
        .filter(|o| {
            matches!(o.kind, Kind::NotAccepted(_))
                && o.at.saturating_duration_since(term_sent) < DRAIN_DELAY
        })
        .collect();
    assert!(
        early.is_empty(),
        "requests refused before drain_delay was over: {early:?}"
    );
    assert_eq!(
        legacy.requests() as usize,
        ok + 1,
        "every request that reached the backend (the load's and the probe's) was answered to its client"
    );
    let served_while_draining = outcomes
        .iter()
        .filter(|o| matches!(o.kind, Kind::Ok { .. }) && o.at > not_ready)
        .count();
    assert!(
        served_while_draining > 10,
        "only {served_while_draining} requests were served after /readyz turned 503"
    );
    assert!(
        outcomes
            .iter()
            .any(|o| matches!(o.kind, Kind::Ok { close: true })),
        "no in-flight HTTP/1.1 request was answered with Connection: close"
    );
}

//! The demo's load generator: virtual users, each with its own `session_id` cookie (the route's
//! sticky key) and its own row, reading and writing through the proxy. It counts per side (from
//! the apps' `x-served-by` header), errors and latencies, and remembers every write the proxy
//! acknowledged, for the lost-writes check. It never talks to the apps or databases directly.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// Which service answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Legacy,
    Target,
    /// No `x-served-by`: the proxy answered itself (502, 503, 504).
    Proxy,
}

/// Counts of one side over some period.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub requests: u64,
    pub errors: u64,
    pub latencies: Vec<Duration>,
}

impl Tally {
    pub fn p99(&self) -> Option<Duration> {
        percentile(&self.latencies, 0.99)
    }

    pub fn absorb(&mut self, other: &Tally) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.latencies.extend_from_slice(&other.latencies);
    }
}

pub fn percentile(values: &[Duration], q: f64) -> Option<Duration> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    Some(v[i])
}

/// What happened since the last [`Load::take`].
#[derive(Debug, Clone, Default)]
pub struct Period {
    pub sides: HashMap<Side, Tally>,
}

impl Period {
    pub fn side(&self, side: Side) -> Tally {
        self.sides.get(&side).cloned().unwrap_or_default()
    }

    pub fn all(&self) -> Tally {
        let mut t = Tally::default();
        for s in self.sides.values() {
            t.absorb(s);
        }
        t
    }

    pub fn absorb(&mut self, other: &Period) {
        for (side, t) in &other.sides {
            self.sides.entry(*side).or_default().absorb(t);
        }
    }
}

/// One key's writes, as its virtual user saw them. Values carry a sequence number, so a
/// database value can be told "the last acknowledged or later" from "older".
#[derive(Debug, Clone, Default)]
pub struct KeyWrites {
    /// Highest sequence number the proxy answered 2xx for.
    pub acked: Option<u64>,
    /// Highest sequence number sent at all (an unanswered write may still have landed).
    pub sent: u64,
}

pub fn write_value(id: i64, seq: u64) -> String {
    format!("user {id} v{seq}")
}

/// The sequence number inside a value `write_value` made; 0 for the seeded rows.
pub fn seq_of(value: &str) -> u64 {
    value
        .rsplit_once(" v")
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(0)
}

pub struct Load {
    stop: Arc<AtomicBool>,
    period: Arc<Mutex<Period>>,
    workers: Vec<tokio::task::JoinHandle<HashMap<i64, KeyWrites>>>,
}

/// Virtual users per worker task; each worker owns its users' rows, so the writes to one key
/// are sequential and "the last acknowledged value" is well defined.
const WORKERS: i64 = 8;

impl Load {
    /// `users` virtual users (rows 1..=users) at about `rate` requests per second in all.
    pub fn start(proxy: SocketAddr, users: i64, rate: u32) -> Load {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let stop = Arc::new(AtomicBool::new(false));
        let period = Arc::new(Mutex::new(Period::default()));
        let interval = Duration::from_secs_f64(WORKERS as f64 / f64::from(rate.max(1)));
        let workers = (0..WORKERS)
            .map(|w| {
                let ids: Vec<i64> = (1..=users).filter(|id| id % WORKERS == w).collect();
                let client = client.clone();
                let stop = stop.clone();
                let period = period.clone();
                tokio::spawn(async move {
                    worker(client, proxy, ids, interval, stop, period, w as u64).await
                })
            })
            .collect();
        Load {
            stop,
            period,
            workers,
        }
    }

    /// The tallies since the last call.
    pub fn take(&self) -> Period {
        std::mem::take(&mut *self.period.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Stops every virtual user after its request in flight and returns what each key saw.
    pub async fn stop(self) -> (Period, HashMap<i64, KeyWrites>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut keys = HashMap::new();
        for w in self.workers {
            if let Ok(k) = w.await {
                keys.extend(k);
            }
        }
        let rest = std::mem::take(&mut *self.period.lock().unwrap_or_else(|e| e.into_inner()));
        (rest, keys)
    }
}

async fn worker(
    client: Client<HttpConnector, Full<Bytes>>,
    proxy: SocketAddr,
    ids: Vec<i64>,
    interval: Duration,
    stop: Arc<AtomicBool>,
    period: Arc<Mutex<Period>>,
    seed: u64,
) -> HashMap<i64, KeyWrites> {
    let mut keys: HashMap<i64, KeyWrites> = HashMap::new();
    if ids.is_empty() {
        return keys;
    }
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A cheap deterministic mix of reads and writes (one write in four), different per worker.
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let id = ids[n % ids.len()];
        n += 1;
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let write = state.is_multiple_of(4);
        let entry = keys.entry(id).or_default();
        let (method, body, seq) = if write {
            entry.sent += 1;
            let seq = entry.sent;
            let body = serde_json::json!({ "name": write_value(id, seq), "email": format!("user{id}@example.com") });
            (Method::PUT, Bytes::from(body.to_string()), Some(seq))
        } else {
            (Method::GET, Bytes::new(), None)
        };
        let request = Request::builder()
            .method(method)
            .uri(format!("http://{proxy}/api/users/{id}"))
            .header("cookie", format!("session_id=u{id}"))
            .header("content-type", "application/json")
            .body(Full::new(body));
        let Ok(request) = request else { continue };
        let started = Instant::now();
        let outcome = tokio::time::timeout(Duration::from_secs(5), client.request(request)).await;
        let (side, ok) = match outcome {
            Ok(Ok(response)) => {
                let side = match response
                    .headers()
                    .get("x-served-by")
                    .and_then(|v| v.to_str().ok())
                {
                    Some("legacy") => Side::Legacy,
                    Some("v2") => Side::Target,
                    _ => Side::Proxy,
                };
                let status = response.status();
                // The body is read so the connection can be reused.
                let _ = response.into_body().collect().await;
                (side, status.is_success())
            }
            _ => (Side::Proxy, false),
        };
        let latency = started.elapsed();
        if ok && let Some(seq) = seq {
            entry.acked = Some(seq);
        }
        let mut p = period.lock().unwrap_or_else(|e| e.into_inner());
        let t = p.sides.entry(side).or_default();
        t.requests += 1;
        if !ok {
            t.errors += 1;
        }
        t.latencies.push(latency);
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_carry_their_sequence() {
        assert_eq!(seq_of(&write_value(7, 42)), 42);
        assert_eq!(seq_of("user 7"), 0);
    }

    #[test]
    fn p99_of_a_hundred() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&[], 0.99), None);
    }
}

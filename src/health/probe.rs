//! Active health: each endpoint of a backend with a `health` probe is asked for its probe
//! path every `interval`; `unhealthy_threshold` failures in a row take it out of the
//! balancer, `healthy_threshold` successes bring it back. Endpoints come from the current
//! snapshot on every round, so a reload's new endpoints are probed without a restart.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{Either, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinSet;

use crate::config::UpstreamProtocol;
use crate::lifecycle::Shutdown;
use crate::snapshot::SnapshotHandle;

const TICK: Duration = Duration::from_millis(100);

#[derive(Default)]
struct ProbeState {
    next_due: Option<Instant>,
    in_flight: bool,
    successes: u32,
    failures: u32,
}

pub struct ActiveProber {
    snapshots: SnapshotHandle,
    client: Client<HttpConnector, Empty<Bytes>>,
}

struct ProbeResult {
    key: (String, String),
    ok: bool,
    detail: String,
}

impl ActiveProber {
    pub fn new(snapshots: SnapshotHandle) -> ActiveProber {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(1)));
        ActiveProber {
            snapshots,
            // Probes use their own pool so they measure fresh connections, not the proxy's
            // warm ones, and never take a slot from traffic.
            client: Client::builder(TokioExecutor::new())
                .pool_max_idle_per_host(1)
                .build(connector),
        }
    }

    pub fn start(self, mut shutdown: Shutdown) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut states: HashMap<(String, String), ProbeState> = HashMap::new();
            let mut running: JoinSet<ProbeResult> = JoinSet::new();
            let mut tick = tokio::time::interval(TICK);
            loop {
                tokio::select! {
                    _ = tick.tick() => self.launch_due(&mut states, &mut running),
                    Some(Ok(result)) = running.join_next() => self.settle(&mut states, result),
                    _ = shutdown.wait() => return,
                }
            }
        })
    }

    fn launch_due(
        &self,
        states: &mut HashMap<(String, String), ProbeState>,
        running: &mut JoinSet<ProbeResult>,
    ) {
        let snapshot = self.snapshots.load();
        let now = Instant::now();
        for backend in &snapshot.backends {
            let Some(probe) = &backend.probe else {
                continue;
            };
            for endpoint in &backend.endpoints {
                let key = (backend.name.to_string(), endpoint.to_string());
                let state = states.entry(key.clone()).or_default();
                if state.in_flight || state.next_due.is_some_and(|due| due > now) {
                    continue;
                }
                state.in_flight = true;
                // Validation bounds the interval; an unrepresentable one must still not panic.
                state.next_due = now.checked_add(probe.interval).or(Some(now));
                let uri = format!("{endpoint}{}", probe.path);
                let client = self.client.clone();
                // TLS and HTTP/2 endpoints are probed through the backend's own client: the
                // probe's plain HTTP/1.1 pool can speak to neither.
                let upstream = (endpoint.scheme == http::uri::Scheme::HTTPS
                    || backend.client.protocol == UpstreamProtocol::H2)
                    .then(|| backend.client.clone());
                let timeout = probe.timeout;
                running.spawn(async move {
                    let (ok, detail) = match uri.parse::<http::Uri>() {
                        Err(e) => (false, e.to_string()),
                        Ok(uri) => match tokio::time::timeout(timeout, async {
                            match upstream {
                                Some(upstream) => {
                                    let mut request =
                                        http::Request::new(Either::Right(Full::default()));
                                    *request.uri_mut() = uri;
                                    upstream.client.request(request).await
                                }
                                None => client.get(uri).await,
                            }
                        })
                        .await
                        {
                            Ok(Ok(response)) => (
                                response.status().is_success(),
                                format!("status {}", response.status()),
                            ),
                            Ok(Err(e)) => (false, e.to_string()),
                            Err(_) => (false, format!("no answer within {timeout:?}")),
                        },
                    };
                    ProbeResult { key, ok, detail }
                });
            }
        }
    }

    fn settle(&self, states: &mut HashMap<(String, String), ProbeState>, result: ProbeResult) {
        let snapshot = self.snapshots.load();
        let Some(state) = states.get_mut(&result.key) else {
            return;
        };
        state.in_flight = false;
        let Some(backend) = snapshot.backends.iter().find(|b| *b.name == *result.key.0) else {
            return;
        };
        let Some(probe) = &backend.probe else { return };
        let Some(i) = backend
            .endpoints
            .iter()
            .position(|e| e.to_string() == result.key.1)
        else {
            return;
        };
        if result.ok {
            state.successes += 1;
            state.failures = 0;
        } else {
            state.failures += 1;
            state.successes = 0;
        }
        let health = &backend.endpoint_health[i];
        if health.is_up() && state.failures >= probe.unhealthy_threshold {
            health.set_up(false);
            tracing::warn!(backend = %backend.name, endpoint = %result.key.1, detail = %result.detail, "endpoint failed its health probe: out of the balancer");
        } else if !health.is_up() && state.successes >= probe.healthy_threshold {
            health.set_up(true);
            tracing::info!(backend = %backend.name, endpoint = %result.key.1, "endpoint passes its health probe again");
        }
    }
}

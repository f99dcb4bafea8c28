//! `RoutingSnapshot`, the one immutable value the data plane routes from, and `Publisher`,
//! the one path through which a new snapshot reaches it.
//!
//! A request calls `SnapshotHandle::load` once and decides everything from that value; a
//! change (config reload, and later the admin API and the rollout controller) builds a whole
//! new snapshot outside the request path and swaps it in with a single store.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use arc_swap::{ArcSwap, Guard};

use crate::config::{Config, Endpoint, HealthProbe, RoutePolicy, Timeouts};
use crate::dataplane::route::{BackendId, Route, RouteId, RouteTable};
use crate::dataplane::split::{Flag, RequestFacts};
use crate::dataplane::upstream::{UpstreamClient, UpstreamClients};
use crate::health::{EndpointHealth, HealthRegistry, RouteHealth};
use crate::telemetry::Metrics;
use crate::telemetry::metrics::{EndpointState, RouteLabels, RouteStats};

/// The metric label for requests that no route matched.
pub const DEFAULT_ROUTE: &str = "_default";

#[derive(Debug)]
pub struct Backend {
    pub name: Arc<str>,
    pub endpoints: Vec<Endpoint>,
    /// Same order as `endpoints`; shared with the prober through the registry.
    pub endpoint_health: Vec<Arc<EndpointHealth>>,
    pub probe: Option<HealthProbe>,
    /// The pooled client for this backend's protocol and TLS settings, shared with every
    /// backend (and later snapshot) that has the same settings.
    pub client: Arc<UpstreamClient>,
    next: AtomicUsize,
}

impl Backend {
    /// Round robin over the endpoints that pass their probe. When none does, all are used:
    /// a probe that is wrong about every endpoint must not take a whole backend offline
    /// (Envoy calls this panic routing). The counter lives in the snapshot, so a reload
    /// restarts the rotation, which is harmless.
    pub fn pick(&self) -> &Endpoint {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let up = self.endpoint_health.iter().filter(|h| h.is_up()).count();
        if up == 0 {
            return &self.endpoints[turn % self.endpoints.len()];
        }
        // The turn-th healthy endpoint, so a down endpoint's share is spread evenly instead
        // of landing on its neighbour.
        let nth = turn % up;
        self.endpoint_health
            .iter()
            .enumerate()
            .filter(|(_, h)| h.is_up())
            .nth(nth)
            .map_or(&self.endpoints[0], |(i, _)| &self.endpoints[i])
    }

    /// True when the backend is probed and every endpoint fails its probe.
    pub fn all_down(&self) -> bool {
        self.probe.is_some() && self.endpoint_health.iter().all(|h| !h.is_up())
    }
}

#[cfg(test)]
mod backend_tests {
    use super::*;

    #[test]
    fn a_down_endpoint_s_share_is_spread_evenly() {
        let endpoint = |port: u16| Endpoint {
            scheme: http::uri::Scheme::HTTP,
            authority: format!("127.0.0.1:{port}").parse().unwrap(),
        };
        let health: Vec<Arc<EndpointHealth>> = (0..3)
            .map(|_| Arc::new(EndpointHealth::default()))
            .collect();
        health[0].set_up(false);
        let backend = Backend {
            name: "b".into(),
            endpoints: vec![endpoint(1), endpoint(2), endpoint(3)],
            endpoint_health: health,
            probe: None,
            client: crate::dataplane::upstream::UpstreamClients::new(
                &crate::config::Timeouts::default(),
            )
            .client_for(&crate::config::BackendSpec {
                name: "b".into(),
                endpoints: vec![],
                health: None,
                protocol: Default::default(),
                tls: Default::default(),
            }),
            next: AtomicUsize::new(0),
        };
        let mut counts = [0usize; 4];
        for _ in 0..300 {
            counts[usize::from(backend.pick().authority.port_u16().unwrap())] += 1;
        }
        assert_eq!(counts, [0, 0, 150, 150]);
    }
}

#[derive(Debug)]
pub struct RoutingSnapshot {
    /// Increases by one with every publish; logged so a change can be traced to a request.
    pub version: u64,
    pub routes: Vec<Route>,
    pub table: RouteTable,
    pub backends: Vec<Backend>,
    pub default_backend: BackendId,
    pub flags: Vec<Flag>,
    /// Only `request` is read per request; the others are fixed when listeners start.
    pub timeouts: Timeouts,
    /// Same order as `routes`.
    pub stats: Vec<RouteStats>,
    /// Same order as `routes`.
    pub health: Vec<Arc<RouteHealth>>,
    /// Same order as `routes`.
    pub policies: Vec<RoutePolicy>,
    pub default_stats: RouteStats,
    /// Share of requests no route matched that the access log records.
    pub access_log_sample: f64,
}

impl RoutingSnapshot {
    pub fn build(
        version: u64,
        config: &Config,
        metrics: &Metrics,
        health: &HealthRegistry,
        upstreams: &UpstreamClients,
    ) -> RoutingSnapshot {
        let backends = config
            .backends
            .iter()
            .map(|b| Backend {
                name: Arc::from(b.name.as_str()),
                endpoint_health: b
                    .endpoints
                    .iter()
                    .map(|e| health.endpoint(&b.name, &e.to_string()))
                    .collect(),
                endpoints: b.endpoints.clone(),
                probe: b.health.clone(),
                client: upstreams.client_for(b),
                next: AtomicUsize::new(0),
            })
            .collect();
        let routes = config.routes.clone();
        RoutingSnapshot {
            version,
            table: RouteTable::build(&routes),
            stats: routes
                .iter()
                .map(|r| metrics.route_stats(&r.name))
                .collect(),
            health: routes.iter().map(|r| health.route(&r.name)).collect(),
            policies: config.policies.clone(),
            default_stats: metrics.route_stats(&Arc::from(DEFAULT_ROUTE)),
            access_log_sample: config.access_log.as_ref().map_or(0.0, |a| a.sample),
            routes,
            backends,
            default_backend: config.default_backend,
            flags: config.flags.clone(),
            timeouts: config.timeouts,
        }
    }

    pub fn find_route(&self, req: &RequestFacts<'_>) -> Option<RouteId> {
        self.table.find(&self.routes, req)
    }

    /// Every backend endpoint with its probe verdict, for `switchyard_endpoint_up`.
    pub fn endpoint_states(&self) -> Vec<EndpointState> {
        self.backends
            .iter()
            .flat_map(|b| {
                b.endpoints
                    .iter()
                    .zip(&b.endpoint_health)
                    .map(|(e, h)| EndpointState {
                        backend: b.name.clone(),
                        // Host and port only: user info in an authority is a secret.
                        endpoint: match e.authority.port_u16() {
                            Some(port) => format!("{}:{port}", e.authority.host()),
                            None => e.authority.host().to_string(),
                        },
                        up: h.is_up(),
                    })
            })
            .collect()
    }

    pub fn route(&self, id: RouteId) -> &Route {
        &self.routes[id.0 as usize]
    }

    pub fn backend(&self, id: BackendId) -> &Backend {
        &self.backends[id.0 as usize]
    }
}

/// Read side: cheap to clone, handed to every connection.
#[derive(Clone)]
pub struct SnapshotHandle {
    current: Arc<ArcSwap<RoutingSnapshot>>,
}

impl SnapshotHandle {
    pub fn load(&self) -> Guard<Arc<RoutingSnapshot>> {
        self.current.load()
    }
}

/// Write side: the only place that stores a snapshot.
pub struct Publisher {
    current: Arc<ArcSwap<RoutingSnapshot>>,
    metrics: Arc<Metrics>,
    health: Arc<HealthRegistry>,
    upstreams: UpstreamClients,
    version: AtomicU64,
    /// Serialises publishers so versions and gauges move in the order snapshots do.
    publishing: std::sync::Mutex<()>,
}

impl Publisher {
    pub fn new(config: &Config, metrics: Arc<Metrics>, health: Arc<HealthRegistry>) -> Publisher {
        let upstreams = UpstreamClients::new(&config.timeouts);
        let first = RoutingSnapshot::build(1, config, &metrics, &health, &upstreams);
        update_weight_gauges(&metrics, None, &first);
        Publisher {
            current: Arc::new(ArcSwap::from_pointee(first)),
            metrics,
            health,
            upstreams,
            version: AtomicU64::new(1),
            publishing: std::sync::Mutex::new(()),
        }
    }

    pub fn handle(&self) -> SnapshotHandle {
        SnapshotHandle {
            current: self.current.clone(),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn health(&self) -> &Arc<HealthRegistry> {
        &self.health
    }

    /// Builds a snapshot from a validated config and swaps it in. Returns its version.
    pub fn publish(&self, config: &Config) -> u64 {
        let _guard = self
            .publishing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let version = self.version.fetch_add(1, Ordering::Relaxed) + 1;
        let next = RoutingSnapshot::build(
            version,
            config,
            &self.metrics,
            &self.health,
            &self.upstreams,
        );
        let previous = self.current.swap(Arc::new(next));
        update_weight_gauges(&self.metrics, Some(&previous), &self.current.load());
        version
    }
}

fn update_weight_gauges(
    metrics: &Metrics,
    previous: Option<&RoutingSnapshot>,
    next: &RoutingSnapshot,
) {
    if let Some(previous) = previous {
        for route in &previous.routes {
            if !next.routes.iter().any(|r| r.name == route.name) {
                metrics.route_weight.remove(&RouteLabels {
                    route: route.name.clone(),
                });
            }
        }
    }
    for route in &next.routes {
        metrics
            .route_weight
            .get_or_create(&RouteLabels {
                route: route.name.clone(),
            })
            .set(if route.rolled_back {
                0.0
            } else {
                route.split.effective_weight(&next.flags).percent()
            });
    }
}

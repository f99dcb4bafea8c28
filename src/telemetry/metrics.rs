//! The Prometheus registry and every metric switchyard exports (contract §7).
//!
//! The request path never looks a metric up by label: each snapshot carries `RouteStats`,
//! handles resolved when the snapshot was built, so recording is a few atomic adds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use std::fmt::Write as _;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{
    EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

use crate::dataplane::split::Side;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SideLabel {
    Legacy,
    Target,
}

impl EncodeLabelValue for SideLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            SideLabel::Legacy => "legacy",
            SideLabel::Target => "target",
        })
    }
}

impl From<Side> for SideLabel {
    fn from(side: Side) -> Self {
        match side {
            Side::Legacy => SideLabel::Legacy,
            Side::Target => SideLabel::Target,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: Arc<str>,
    pub side: SideLabel,
    pub code: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RouteSideLabels {
    pub route: Arc<str>,
    pub side: SideLabel,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: Arc<str>,
}

/// A rollout gate of a route: `max_error_rate`, `max_sync_lag:PAIR`, `webhook:URL`, …
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct GateLabels {
    pub route: Arc<str>,
    pub gate: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RollbackLabels {
    pub route: Arc<str>,
    pub reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SyncLabels {
    pub sync: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SyncBackfillLabels {
    pub sync: String,
    /// `copied` or `total`.
    pub rows: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SyncDirectionLabels {
    pub sync: String,
    pub direction: &'static str,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReloadResult {
    Success,
    Failure,
}

impl EncodeLabelValue for ReloadResult {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(match self {
            ReloadResult::Success => "success",
            ReloadResult::Failure => "failure",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: ReloadResult,
}

/// Upper bounds in seconds, from 0.5 ms to 30 s: proxy overhead lives at the bottom,
/// backend timeouts at the top.
const LATENCY_BOUNDS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
    30.0,
];

/// A histogram recorded with atomics only. prometheus-client's own histogram takes a mutex
/// per observation, and every request of a route would contend on it.
#[derive(Debug, Clone, Default)]
pub struct LatencyHistogram {
    inner: Arc<LatencyInner>,
}

#[derive(Debug, Default)]
struct LatencyInner {
    /// Non-cumulative; the last slot is +Inf.
    buckets: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl LatencyHistogram {
    pub fn observe(&self, elapsed: Duration) {
        let secs = elapsed.as_secs_f64();
        let slot = LATENCY_BOUNDS
            .iter()
            .position(|&bound| secs <= bound)
            .unwrap_or(LATENCY_BOUNDS.len());
        let inner = &*self.inner;
        inner.buckets[slot].fetch_add(1, Ordering::Relaxed);
        inner.count.fetch_add(1, Ordering::Relaxed);
        inner.sum_nanos.fetch_add(
            elapsed.as_nanos().min(u128::from(u64::MAX)) as u64,
            Ordering::Relaxed,
        );
    }

    pub fn count(&self) -> u64 {
        self.inner.count.load(Ordering::Relaxed)
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let mut cumulative = 0;
        let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(&self.inner.buckets)
            .map(|(bound, n)| {
                cumulative += n.load(Ordering::Relaxed);
                (bound, cumulative)
            })
            .collect();
        let sum = self.inner.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, cumulative, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<RouteSideLabels, LatencyHistogram>,
    pub route_weight: Family<RouteLabels, Gauge<f64, AtomicU64>>,
    pub config_reloads: Family<ReloadLabels, Counter>,
    pub tls_reloads: Family<ReloadLabels, Counter>,
    pub rollbacks: Family<RollbackLabels, Counter>,
    pub failovers: Family<RouteLabels, Counter>,
    pub failover_budget_exhausted: Family<RouteLabels, Counter>,
    pub sync_lag: Family<SyncLabels, Gauge<f64, AtomicU64>>,
    pub sync_changes: Family<SyncDirectionLabels, Counter>,
    pub consistency_ratio: Family<SyncLabels, Gauge<f64, AtomicU64>>,
    pub sync_backfill: Family<SyncBackfillLabels, Gauge>,
    pub rollout_step: Family<RouteLabels, Gauge>,
    pub rollout_gate: Family<GateLabels, Gauge<f64, AtomicU64>>,
    pub rollout_gate_passing: Family<GateLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("switchyard");
        let requests = Family::<RequestLabels, Counter>::default();
        let duration = Family::<RouteSideLabels, LatencyHistogram>::default();
        let route_weight = Family::<RouteLabels, Gauge<f64, AtomicU64>>::default();
        let config_reloads = Family::<ReloadLabels, Counter>::default();
        let tls_reloads = Family::<ReloadLabels, Counter>::default();
        let rollbacks = Family::<RollbackLabels, Counter>::default();
        let failovers = Family::<RouteLabels, Counter>::default();
        let failover_budget_exhausted = Family::<RouteLabels, Counter>::default();
        let sync_lag = Family::<SyncLabels, Gauge<f64, AtomicU64>>::default();
        let sync_changes = Family::<SyncDirectionLabels, Counter>::default();
        let consistency_ratio = Family::<SyncLabels, Gauge<f64, AtomicU64>>::default();
        let sync_backfill = Family::<SyncBackfillLabels, Gauge>::default();
        registry.register(
            "sync_backfill_rows",
            "Backfill progress of a sync pair: rows copied and rows to copy",
            sync_backfill.clone(),
        );
        registry.register(
            "sync_lag_seconds",
            "Time from a change's commit on one side to its commit on the other",
            sync_lag.clone(),
        );
        registry.register(
            "sync_changes",
            "Changes applied by the sync worker, by pair and direction",
            sync_changes.clone(),
        );
        registry.register(
            "consistency_ratio",
            "Sampled share of rows equal on both sides (lower 95% confidence bound)",
            consistency_ratio.clone(),
        );
        let rollout_step = Family::<RouteLabels, Gauge>::default();
        let rollout_gate = Family::<GateLabels, Gauge<f64, AtomicU64>>::default();
        let rollout_gate_passing = Family::<GateLabels, Gauge>::default();
        registry.register(
            "rollout_step",
            "Step of the route's rollout, counted from 1 (0: no rollout has started)",
            rollout_step.clone(),
        );
        registry.register(
            "rollout_gate",
            "Latest figure of each rollout gate (error rate, latency ratio, sync lag in seconds, consistency, webhook status)",
            rollout_gate.clone(),
        );
        registry.register(
            "rollout_gate_passing",
            "1 while the rollout gate holds, 0 while it holds the step back",
            rollout_gate_passing.clone(),
        );
        registry.register(
            "rollbacks",
            "Routes rolled back to legacy, by reason (error_rate, latency, target_down, manual)",
            rollbacks.clone(),
        );
        registry.register(
            "failovers",
            "Requests that failed on target and were replayed on legacy",
            failovers.clone(),
        );
        registry.register(
            "failover_budget_exhausted",
            "Failed target requests not replayed because the route's retry budget was spent",
            failover_budget_exhausted.clone(),
        );
        registry.register(
            "requests",
            "Requests answered, by route, side and status code",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from receiving a request to sending its response head",
            duration.clone(),
        );
        registry.register(
            "route_weight",
            "Share of the route's traffic, in percent, that goes to target",
            route_weight.clone(),
        );
        registry.register(
            "config_reloads",
            "Configuration reloads, by result",
            config_reloads.clone(),
        );
        registry.register(
            "tls_reloads",
            "Certificate reloads of the HTTPS listener, by result",
            tls_reloads.clone(),
        );
        for result in [ReloadResult::Success, ReloadResult::Failure] {
            // Present from the start, so an alert on failures has a series to watch.
            let _ = config_reloads.get_or_create(&ReloadLabels { result });
            let _ = tls_reloads.get_or_create(&ReloadLabels { result });
        }
        Metrics {
            registry,
            requests,
            duration,
            route_weight,
            config_reloads,
            tls_reloads,
            rollbacks,
            failovers,
            failover_budget_exhausted,
            sync_lag,
            sync_changes,
            consistency_ratio,
            sync_backfill,
            rollout_step,
            rollout_gate,
            rollout_gate_passing,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    pub fn reload(&self, result: ReloadResult) {
        self.config_reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
    }

    pub fn tls_reload(&self, result: ReloadResult) {
        self.tls_reloads
            .get_or_create(&ReloadLabels { result })
            .inc();
    }

    pub fn route_stats(&self, route: &Arc<str>) -> RouteStats {
        let labels = RouteLabels {
            route: route.clone(),
        };
        RouteStats {
            legacy: self.side_stats(route, Side::Legacy),
            target: self.side_stats(route, Side::Target),
            failovers: self.failovers.get_or_create_owned(&labels),
            budget_exhausted: self.failover_budget_exhausted.get_or_create_owned(&labels),
        }
    }

    /// Drops every series labelled with `route`, once a published snapshot no longer has
    /// it, so routes removed by reloads do not keep their series (and memory) for ever.
    /// Codes are not tracked per route, so every status code is tried: ~1,800 removals,
    /// off the request path.
    pub fn forget_route(&self, route: &Arc<str>) {
        let labels = RouteLabels {
            route: route.clone(),
        };
        self.route_weight.remove(&labels);
        self.failovers.remove(&labels);
        self.failover_budget_exhausted.remove(&labels);
        self.rollout_step.remove(&labels);
        for side in [Side::Legacy, Side::Target] {
            self.duration.remove(&RouteSideLabels {
                route: route.clone(),
                side: side.into(),
            });
            for code in 100..=999 {
                self.requests.remove(&RequestLabels {
                    route: route.clone(),
                    side: side.into(),
                    code,
                });
            }
        }
    }

    fn side_stats(&self, route: &Arc<str>, side: Side) -> SideStats {
        SideStats {
            route: route.clone(),
            side: side.into(),
            duration: self.duration.get_or_create_owned(&RouteSideLabels {
                route: route.clone(),
                side: side.into(),
            }),
            requests: self.requests.clone(),
            common: Default::default(),
        }
    }
}

/// Status codes common enough to get a pre-resolved counter slot.
const COMMON_CODES: [u16; 24] = [
    200, 201, 202, 204, 206, 301, 302, 304, 307, 308, 400, 401, 403, 404, 405, 409, 412, 413, 422,
    429, 500, 502, 503, 504,
];

/// A route's metric handles, resolved when a snapshot is built.
#[derive(Debug)]
pub struct RouteStats {
    pub legacy: SideStats,
    pub target: SideStats,
    pub failovers: Counter,
    pub budget_exhausted: Counter,
}

impl RouteStats {
    pub fn side(&self, side: Side) -> &SideStats {
        match side {
            Side::Legacy => &self.legacy,
            Side::Target => &self.target,
        }
    }
}

#[derive(Debug)]
pub struct SideStats {
    route: Arc<str>,
    side: SideLabel,
    duration: LatencyHistogram,
    requests: Family<RequestLabels, Counter>,
    common: [OnceLock<Counter>; COMMON_CODES.len()],
}

impl SideStats {
    pub fn record(&self, code: u16, elapsed: Duration) {
        self.duration.observe(elapsed);
        let labels = || RequestLabels {
            route: self.route.clone(),
            side: self.side,
            code,
        };
        match COMMON_CODES.iter().position(|&c| c == code) {
            Some(slot) => self.common[slot]
                .get_or_init(|| self.requests.get_or_create_owned(&labels()))
                .inc(),
            None => self.requests.get_or_create(&labels()).inc(),
        };
    }
}

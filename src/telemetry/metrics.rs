//! The Prometheus registry and every metric switchyard exports (contract §7).
//!
//! The request path never looks a metric up by label: each snapshot carries `RouteStats`,
//! handles resolved when the snapshot was built, so recording is a few atomic adds.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use std::fmt::Write as _;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
    MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
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

/// A rollout gate of a route: `max_error_rate`, `max_sync_lag:PAIR`, `webhook:N`, …
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

    /// Each bucket's own count (not cumulative: the encoder accumulates) with its upper
    /// bound, and their total. The total is the `_count` sample, so `le="+Inf"` equals
    /// `_count` by construction even while observations race with a scrape.
    fn per_bucket(&self) -> (Vec<(f64, u64)>, u64) {
        let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(&self.inner.buckets)
            .map(|(bound, n)| (bound, n.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        (buckets, count)
    }
}

impl TypedMetric for LatencyHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for LatencyHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (buckets, count) = self.per_bucket();
        let sum = self.inner.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

pub struct Metrics {
    /// Root registry: the `process_*` families (standard names, no prefix) and, below it,
    /// everything under `switchyard_`.
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
    pub sync_backfill_copied: Family<SyncLabels, Gauge>,
    pub sync_backfill_source: Family<SyncLabels, Gauge>,
    pub rollout_step: Family<RouteLabels, Gauge>,
    pub rollout_phase: Family<PhaseLabels, Gauge>,
    gate_ratio: Family<GateLabels, Gauge<f64, AtomicU64>>,
    gate_seconds: Family<GateLabels, Gauge<f64, AtomicU64>>,
    gate_http_status: Family<GateLabels, Gauge>,
    gate_value: Family<GateLabels, Gauge<f64, AtomicU64>>,
    pub rollout_gate_passing: Family<GateLabels, Gauge>,
    pub access_log_dropped: Counter,
    endpoints: EndpointUp,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The rollout phases of contract §5, each a series of `switchyard_rollout_phase`.
pub const ROLLOUT_PHASES: [&str; 6] = [
    "idle",
    "progressing",
    "paused",
    "promoted",
    "rolled_back",
    "aborted",
];

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PhaseLabels {
    pub route: Arc<str>,
    pub phase: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// One gate of a rollout as the controller evaluated it: its name (`max_error_rate`,
/// `max_sync_lag:PAIR`, `webhook:URL`, …), its latest figure, and whether it passes.
#[derive(Debug, Clone, Copy)]
pub struct GateFigure<'a> {
    pub name: &'a str,
    pub figure: Option<f64>,
    pub pass: bool,
}

/// The unit of a gate's figure, which picks the family it is exported in: one family
/// never mixes units (Prometheus naming practice, "a metric should have one unit").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GateUnit {
    /// Error rate, latency ratio, consistency: dimensionless.
    Ratio,
    Seconds,
    HttpStatus,
    /// The result of a user's own query (`prometheus:` gates): its unit is the query's.
    Value,
}

impl GateUnit {
    fn of(name: &str) -> GateUnit {
        let kind = name.split_once(':').map_or(name, |(kind, _)| kind);
        match kind {
            "max_sync_lag" | "max_p99" | "max_p95" => GateUnit::Seconds,
            "webhook" => GateUnit::HttpStatus,
            "prometheus" => GateUnit::Value,
            _ => GateUnit::Ratio,
        }
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut root = Registry::default();
        root.register_collector(Box::new(super::process::ProcessCollector));
        let endpoints = EndpointUp::default();
        let registry = root.sub_registry_with_prefix("switchyard");
        registry.register_collector(Box::new(endpoints.clone()));
        let build_info = Family::<BuildLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register(
            "build_info",
            "Always 1; the version of the running switchyard is its label",
            build_info,
        );
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
        let sync_backfill_copied = Family::<SyncLabels, Gauge>::default();
        let sync_backfill_source = Family::<SyncLabels, Gauge>::default();
        registry.register(
            "sync_backfill_copied_rows",
            "Rows the sync pair's backfill has copied so far",
            sync_backfill_copied.clone(),
        );
        registry.register(
            "sync_backfill_source_rows",
            "Rows the sync pair's backfill has to copy (the source table's size when it began)",
            sync_backfill_source.clone(),
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
        let rollout_phase = Family::<PhaseLabels, Gauge>::default();
        let gate_ratio = Family::<GateLabels, Gauge<f64, AtomicU64>>::default();
        let gate_seconds = Family::<GateLabels, Gauge<f64, AtomicU64>>::default();
        let gate_http_status = Family::<GateLabels, Gauge>::default();
        let gate_value = Family::<GateLabels, Gauge<f64, AtomicU64>>::default();
        let rollout_gate_passing = Family::<GateLabels, Gauge>::default();
        registry.register(
            "rollout_step",
            "Step of the route's rollout, counted from 1 (0: no rollout has started)",
            rollout_step.clone(),
        );
        registry.register(
            "rollout_phase",
            "1 for the phase the route's rollout is in, 0 for the others",
            rollout_phase.clone(),
        );
        registry.register(
            "rollout_gate_ratio",
            "Latest figure of a dimensionless rollout gate: error rate, latency ratio, consistency",
            gate_ratio.clone(),
        );
        registry.register(
            "rollout_gate_seconds",
            "Latest figure of a rollout gate measured in seconds: sync lag, p99, p95",
            gate_seconds.clone(),
        );
        registry.register(
            "rollout_gate_http_status",
            "HTTP status a webhook gate last answered (gate `webhook:N`, N its place in the list, from 1)",
            gate_http_status.clone(),
        );
        registry.register(
            "rollout_gate_query_value",
            "Latest result of a Prometheus query gate, in the query's own unit",
            gate_value.clone(),
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
        let access_log_dropped = Counter::default();
        registry.register(
            "access_log_dropped_lines",
            "Access log lines dropped because the writer's queue was full",
            access_log_dropped.clone(),
        );
        for result in [ReloadResult::Success, ReloadResult::Failure] {
            // Present from the start, so an alert on failures has a series to watch.
            let _ = config_reloads.get_or_create(&ReloadLabels { result });
            let _ = tls_reloads.get_or_create(&ReloadLabels { result });
        }
        Metrics {
            registry: root,
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
            sync_backfill_copied,
            sync_backfill_source,
            rollout_step,
            rollout_phase,
            gate_ratio,
            gate_seconds,
            gate_http_status,
            gate_value,
            rollout_gate_passing,
            access_log_dropped,
            endpoints,
        }
    }

    /// Exports a route's rollout: its step (from 1; 0 when idle), its phase (one of
    /// [`ROLLOUT_PHASES`]) and every gate's figure in the family of the figure's unit.
    /// A webhook gate is labelled by its place among the route's webhooks (`webhook:1`),
    /// never by its URL, which may carry a secret.
    pub fn export_rollout<'a>(
        &self,
        route: &Arc<str>,
        step: i64,
        phase: &str,
        gates: impl IntoIterator<Item = GateFigure<'a>>,
    ) {
        self.rollout_step
            .get_or_create(&RouteLabels {
                route: route.clone(),
            })
            .set(step);
        for name in ROLLOUT_PHASES {
            self.rollout_phase
                .get_or_create(&PhaseLabels {
                    route: route.clone(),
                    phase: name,
                })
                .set(i64::from(name == phase));
        }
        let mut webhooks = 0;
        for gate in gates {
            let unit = GateUnit::of(gate.name);
            let labels = GateLabels {
                route: route.clone(),
                gate: if unit == GateUnit::HttpStatus {
                    webhooks += 1;
                    format!("webhook:{webhooks}")
                } else {
                    gate.name.to_string()
                },
            };
            if let Some(figure) = gate.figure {
                match unit {
                    GateUnit::Ratio => self.gate_ratio.get_or_create(&labels).set(figure),
                    GateUnit::Seconds => self.gate_seconds.get_or_create(&labels).set(figure),
                    GateUnit::Value => self.gate_value.get_or_create(&labels).set(figure),
                    GateUnit::HttpStatus => {
                        self.gate_http_status
                            .get_or_create(&labels)
                            .set(figure as i64);
                        0.0
                    }
                };
            }
            self.rollout_gate_passing
                .get_or_create(&labels)
                .set(i64::from(gate.pass));
        }
    }

    /// Backfill progress of a sync pair, in rows.
    pub fn sync_backfill(&self, sync: &str, copied: u64, source: u64) {
        let labels = SyncLabels {
            sync: sync.to_string(),
        };
        let as_gauge = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.sync_backfill_copied
            .get_or_create(&labels)
            .set(as_gauge(copied));
        self.sync_backfill_source
            .get_or_create(&labels)
            .set(as_gauge(source));
    }

    /// Where `switchyard_endpoint_up` reads from at each scrape: every backend endpoint
    /// with whether active probes hold it up. Set once, when the data plane starts.
    pub fn watch_endpoints(&self, source: impl Fn() -> Vec<EndpointState> + Send + Sync + 'static) {
        let _ = self.endpoints.source.set(Box::new(source));
    }

    /// OpenMetrics 1.0 text of every family.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// The exposition a scraper asked for with its `Accept` header: OpenMetrics when it
    /// lists `application/openmetrics-text` (Prometheus does), else the classic text format
    /// 0.0.4 that every other tool (`promtool check metrics`, curl, older agents) reads.
    /// Returns the content type and the body.
    pub fn exposition(&self, accept: Option<&str>) -> (&'static str, String) {
        let text = self.encode();
        if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
            (OPENMETRICS_TYPE, text)
        } else {
            (CLASSIC_TYPE, classic_text(&text))
        }
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

/// One backend endpoint as `switchyard_endpoint_up` shows it. `endpoint` is the
/// authority (`host:port`) only: a label never carries a URL's path, query or user info.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointState {
    pub backend: Arc<str>,
    pub endpoint: String,
    pub up: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct EndpointLabels {
    backend: Arc<str>,
    endpoint: String,
}

type EndpointSource = Box<dyn Fn() -> Vec<EndpointState> + Send + Sync>;

/// `switchyard_endpoint_up`, read from the current snapshot at each scrape, so a backend
/// removed by a reload disappears with it and a probe's verdict needs no second copy.
#[derive(Clone, Default)]
struct EndpointUp {
    source: Arc<OnceLock<EndpointSource>>,
}

impl std::fmt::Debug for EndpointUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointUp").finish_non_exhaustive()
    }
}

impl Collector for EndpointUp {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(source) = self.source.get() else {
            return Ok(());
        };
        let endpoints = source();
        let mut family = encoder.encode_descriptor(
            "endpoint_up",
            "1 while active health probes hold the backend endpoint fit for traffic, else 0",
            None,
            MetricType::Gauge,
        )?;
        for state in &endpoints {
            let labels = EndpointLabels {
                backend: state.backend.clone(),
                endpoint: state.endpoint.clone(),
            };
            ConstGauge::new(i64::from(state.up)).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

pub const OPENMETRICS_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const CLASSIC_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics text rewritten in the classic format: a counter family is named by its
/// `_total` sample there (OpenMetrics names the family without it), and the classic format
/// has no `# UNIT` lines and no `# EOF`. Samples are the same in both.
fn classic_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" counter"))
        {
            counters.insert(name);
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|prefix| Some((prefix, line.strip_prefix(prefix)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(prefix);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Sample lines of one series, as `(le, value)`, read back from the encoded text.
    fn buckets_of(text: &str) -> Vec<(String, u64)> {
        text.lines()
            .filter(|l| l.starts_with("switchyard_request_duration_seconds_bucket{"))
            .filter(|l| l.contains("side=\"legacy\""))
            .map(|l| {
                let le = l.split("le=\"").nth(1).unwrap().split('"').next().unwrap();
                let n = l.rsplit(' ').next().unwrap().parse().unwrap();
                (le.to_string(), n)
            })
            .collect()
    }

    #[test]
    fn buckets_are_cumulative_once_and_inf_equals_count() {
        let metrics = Metrics::new();
        let stats = metrics.route_stats(&Arc::from("r"));
        // 3 in (0.0025, 0.005], 2 in (0.25, 0.5], 1 beyond the last bound.
        for ms in [3, 4, 5, 300, 400, 60_000] {
            stats.legacy.record(200, Duration::from_millis(ms));
        }
        let text = metrics.exposition(None).1;
        let buckets = buckets_of(&text);
        let at = |le: &str| buckets.iter().find(|(l, _)| l == le).unwrap().1;
        assert_eq!(at("0.0025"), 0);
        assert_eq!(at("0.005"), 3);
        assert_eq!(at("0.25"), 3);
        assert_eq!(at("0.5"), 5);
        assert_eq!(at("30.0"), 5);
        assert_eq!(at("+Inf"), 6);
        assert!(
            text.contains(
                "switchyard_request_duration_seconds_count{route=\"r\",side=\"legacy\"} 6"
            )
        );
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1));
    }

    #[test]
    fn classic_text_names_counters_by_their_total_sample() {
        let metrics = Metrics::new();
        metrics.reload(ReloadResult::Success);
        let (content_type, text) = metrics.exposition(Some("text/plain"));
        assert_eq!(content_type, CLASSIC_TYPE);
        assert!(text.contains("# TYPE switchyard_config_reloads_total counter\n"));
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
        let (content_type, text) = metrics.exposition(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
        ));
        assert_eq!(content_type, OPENMETRICS_TYPE);
        assert!(text.contains("# TYPE switchyard_config_reloads counter\n"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn gate_figures_land_in_the_family_of_their_unit_and_webhooks_lose_their_url() {
        let metrics = Metrics::new();
        let route: Arc<str> = Arc::from("users");
        let gates = [
            ("max_error_rate", 0.02),
            ("max_sync_lag:users", 1.5),
            ("webhook:https://u:p@ci.example/gate?token=t", 503.0),
        ];
        metrics.export_rollout(
            &route,
            2,
            "paused",
            gates.iter().map(|&(name, figure)| GateFigure {
                name,
                figure: Some(figure),
                pass: false,
            }),
        );
        let text = metrics.exposition(None).1;
        for line in [
            "switchyard_rollout_gate_ratio{route=\"users\",gate=\"max_error_rate\"} 0.02",
            "switchyard_rollout_gate_seconds{route=\"users\",gate=\"max_sync_lag:users\"} 1.5",
            "switchyard_rollout_gate_http_status{route=\"users\",gate=\"webhook:1\"} 503",
            "switchyard_rollout_phase{route=\"users\",phase=\"paused\"} 1",
            "switchyard_rollout_phase{route=\"users\",phase=\"idle\"} 0",
            "switchyard_rollout_step{route=\"users\"} 2",
        ] {
            assert!(text.contains(line), "no {line} in\n{text}");
        }
        assert!(!text.contains("ci.example"));
    }
}

//! Raw configuration: the YAML file exactly as written, before any meaning is checked.
//!
//! Every struct denies unknown keys so a typo is an error, not a silently ignored setting.
//! Nothing here may reach the data plane; `validate` turns it into checked types.

use std::collections::BTreeMap;

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: RawListen,
    #[serde(default)]
    pub admin: Option<RawAdmin>,
    #[serde(default)]
    pub state: Option<RawState>,
    #[serde(default)]
    pub timeouts: Option<RawTimeouts>,
    #[serde(default)]
    pub limits: Option<RawLimits>,
    #[serde(default)]
    pub drain_delay: Option<String>,
    #[serde(default)]
    pub shutdown_timeout: Option<String>,
    pub backends: BTreeMap<String, RawBackend>,
    pub default_backend: String,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub flags: BTreeMap<String, RawFlag>,
    #[serde(default)]
    pub sync: Vec<RawSync>,
    #[serde(default)]
    pub consistency: Vec<RawConsistency>,
    #[serde(default)]
    pub access_log: Option<RawAccessLog>,
    #[serde(default)]
    pub tracing: Option<RawTracing>,
}

/// `access_log:` at the top level.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccessLog {
    #[serde(default)]
    pub format: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub sample: Option<f64>,
    /// Lines waiting for the writer; more are dropped and counted.
    #[serde(default)]
    pub queue: Option<u64>,
}

/// `access_log:` of a route: its own share of requests logged.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteAccessLog {
    pub sample: f64,
}

/// `tracing:` at the top level.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    pub otlp_endpoint: String,
    #[serde(default)]
    pub sample_ratio: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    pub http: String,
    #[serde(default)]
    pub https: Option<RawHttps>,
    /// `reject` (default) or `keep`: what to do with `%2F`/`%5C` in request paths.
    #[serde(default)]
    pub escaped_slashes: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttps {
    pub addr: String,
    /// The default certificate: clients without SNI or with a name no certificate has.
    pub cert: String,
    pub key: String,
    /// More certificates, chosen by SNI from their SAN DNS names.
    #[serde(default)]
    pub certificates: Vec<RawCertificate>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: String,
    /// YAML map of token name → `sha256:HEX` of the token.
    #[serde(default)]
    pub tokens_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawState {
    pub url: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    #[serde(default)]
    pub connect: Option<String>,
    #[serde(default)]
    pub header_read: Option<String>,
    #[serde(default)]
    pub request: Option<String>,
    #[serde(default)]
    pub idle: Option<String>,
    #[serde(default)]
    pub keepalive: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    #[serde(default)]
    pub max_header_bytes: Option<u64>,
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    #[serde(default)]
    pub max_connections: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub health: Option<RawHealth>,
    /// `http1` (default) or `h2`.
    #[serde(default)]
    pub protocol: Option<String>,
    #[serde(default)]
    pub tls: Option<RawUpstreamTls>,
}

/// How `https://` endpoints are verified and what switchyard presents to them. There is
/// deliberately no way to turn verification off.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstreamTls {
    #[serde(default)]
    pub ca: Option<String>,
    #[serde(default)]
    pub server_name: Option<String>,
    #[serde(default)]
    pub client_cert: Option<String>,
    #[serde(default)]
    pub client_key: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealth {
    pub path: String,
    #[serde(default)]
    pub interval: Option<String>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub healthy_threshold: Option<u32>,
    #[serde(default)]
    pub unhealthy_threshold: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    #[serde(rename = "match", default)]
    pub matcher: RawRouteMatch,
    pub legacy: String,
    pub target: String,
    pub split: RawSplit,
    #[serde(default)]
    pub sticky: Option<RawSticky>,
    #[serde(default)]
    pub rollback: Option<RawRollback>,
    #[serde(default)]
    pub failover: Option<RawFailover>,
    #[serde(default)]
    pub rollout: Option<RawRollout>,
    #[serde(default)]
    pub access_log: Option<RawRouteAccessLog>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteMatch {
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub path_prefix: Option<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub headers: Vec<RawValueMatch>,
}

/// `name` plus exactly one of `value`, `in`, `present`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawValueMatch {
    pub name: String,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default, rename = "in")]
    pub any_of: Option<Vec<String>>,
    #[serde(default)]
    pub present: Option<bool>,
}

/// Every key is optional so that "exactly one" can be checked with a position;
/// serde's enums would report only "unknown variant".
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSplit {
    #[serde(default)]
    pub percentage: Option<RawPercentage>,
    #[serde(default)]
    pub canary: Option<RawCanary>,
    #[serde(default)]
    pub blue_green: Option<RawBlueGreen>,
    #[serde(default)]
    pub feature_flag: Option<RawFeatureFlag>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPercentage {
    pub weight: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCanary {
    #[serde(default)]
    pub rules: Vec<RawRule>,
    #[serde(default)]
    pub weight: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBlueGreen {
    pub active: String,
    #[serde(default)]
    pub preview: Option<RawRule>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFeatureFlag {
    pub flag: String,
}

/// A rule holds when every condition written in it holds.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRule {
    #[serde(default)]
    pub header: Option<RawValueMatch>,
    #[serde(default)]
    pub cookie: Option<RawValueMatch>,
    #[serde(default)]
    pub query: Option<RawValueMatch>,
    #[serde(default)]
    pub client_ip: Option<RawCidrs>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawCidrs {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSticky {
    pub key: String,
    /// Cookie name for the `generated` key.
    #[serde(default)]
    pub cookie: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRollback {
    #[serde(default)]
    pub max_error_rate: Option<f64>,
    #[serde(default)]
    pub max_latency_ratio: Option<f64>,
    #[serde(default)]
    pub window: Option<String>,
    #[serde(default)]
    pub min_requests: Option<u64>,
    #[serde(default)]
    pub min_consistency: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFailover {
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub budget: Option<f64>,
    /// Also replay when the target answers 5xx (before any byte reached the client).
    #[serde(default)]
    pub on_5xx: Option<bool>,
    /// Request bodies up to this size are kept for a replay; larger ones are not replayed.
    #[serde(default)]
    pub max_replay_bytes: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRollout {
    pub steps: Vec<RawStep>,
    #[serde(default)]
    pub bake: Option<String>,
    #[serde(default)]
    pub gates: Option<RawGates>,
    #[serde(default)]
    pub webhooks: Vec<RawWebhook>,
}

/// A rollout step: a weight, or a weight with a bake of its own.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawStep {
    Weight(f64),
    WithBake(RawStepWithBake),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStepWithBake {
    pub weight: f64,
    pub bake: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGates {
    #[serde(default)]
    pub max_error_rate: Option<f64>,
    #[serde(default)]
    pub max_latency_ratio: Option<f64>,
    #[serde(default)]
    pub max_sync_lag: Option<String>,
    #[serde(default)]
    pub min_consistency: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    pub url: String,
    #[serde(default)]
    pub on: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFlag {
    #[serde(default)]
    pub rules: Vec<RawRule>,
    #[serde(default)]
    pub percentage: f64,
    #[serde(default)]
    pub sticky: Option<RawSticky>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSync {
    pub name: String,
    pub source: RawSyncEnd,
    pub target: RawSyncEnd,
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    #[serde(default)]
    pub direction: Option<String>,
    #[serde(default)]
    pub conflict: Option<serde_yaml::Value>,
    /// Routes whose rollouts this pair gates; default: the route named like the pair.
    #[serde(default)]
    pub routes: Option<Vec<String>>,
    #[serde(default)]
    pub accept_looser_collation: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSyncEnd {
    pub url: String,
    pub table: String,
    pub key: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConsistency {
    pub sync: String,
    #[serde(default)]
    pub sample_rate: Option<String>,
    #[serde(default)]
    pub window: Option<String>,
}

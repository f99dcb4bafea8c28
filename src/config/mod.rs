//! Configuration: reading the YAML file, checking it, and the validated types the rest of
//! switchyard is built from.
//!
//! The file goes raw (`raw`, serde, unknown keys refused) → validated (`validate`, every
//! problem collected with its file, line and column). Nothing unvalidated leaves this module.

pub mod files;
pub mod position;
pub mod raw;
pub mod reload;
mod syntax;
mod unknown;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::dataplane::route::{BackendId, Route};
use crate::dataplane::split::{Flag, Weight};

pub use position::Position;

/// One problem in a configuration file, printed the way compilers print them so editors
/// and CI logs can jump to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub position: Position,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.position.line,
            self.position.col,
            self.message
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", render(.0))]
    Invalid(Vec<Diagnostic>),
}

fn render(problems: &[Diagnostic]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

impl ConfigError {
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            ConfigError::Invalid(d) => d,
            ConfigError::Read { .. } => &[],
        }
    }
}

/// Reads and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = read_config(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path).map_err(ConfigError::Invalid)
}

/// The config file's text: a regular file of at most `MAX_CONFIG_BYTES`.
pub fn read_config(path: &Path) -> std::io::Result<String> {
    files::read_bounded_text(path, validate::MAX_CONFIG_BYTES as u64)
}

/// Validates configuration text; `file` only names it in diagnostics.
pub fn parse(text: &str, file: &Path) -> Result<Config, Vec<Diagnostic>> {
    validate::validate(text, file, &|name| std::env::var(name).ok())
}

/// Validates with an explicit environment, so tests need not touch the process's.
pub fn parse_with_env(
    text: &str,
    file: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, Vec<Diagnostic>> {
    validate::validate(text, file, env)
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    /// The TLS listener, when `listen.https` is set.
    pub https: Option<HttpsListen>,
    /// `listen.escaped_slashes`: encoded `/` and `\` in paths are refused unless `keep`.
    pub escaped_slashes: crate::dataplane::admission::EscapedSlashes,
    pub admin_listen: SocketAddr,
    /// Resolved against the config file's directory.
    pub admin_tokens_file: Option<PathBuf>,
    pub state_url: String,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub drain_delay: Duration,
    pub shutdown_timeout: Duration,
    pub backends: Vec<BackendSpec>,
    pub default_backend: BackendId,
    pub routes: Vec<Route>,
    /// Same order as `routes`.
    pub policies: Vec<RoutePolicy>,
    pub flags: Vec<Flag>,
    pub sync: Vec<SyncSpec>,
    pub consistency: Vec<ConsistencySpec>,
    /// `access_log:`; `None` writes no access log.
    pub access_log: Option<AccessLogSpec>,
    /// `tracing:`; `None` exports no spans.
    pub tracing: Option<TracingSpec>,
}

/// Where and how the access log is written (contract §10). Fixed when `serve` starts; a
/// reload changes only the shares sampled.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogSpec {
    pub format: AccessLogFormat,
    pub path: AccessLogPath,
    /// Share of requests logged on routes without their own `access_log.sample`, 0..=1.
    pub sample: f64,
    /// Lines that may wait for the writer before new ones are dropped.
    pub queue: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogPath {
    Stdout,
    /// Resolved against the config file's directory; opened for appending.
    File(PathBuf),
}

/// Where spans go and which share of traces is sampled (contract §10).
#[derive(Debug, Clone, PartialEq)]
pub struct TracingSpec {
    /// OTLP/HTTP endpoint, e.g. `http://collector:4318`; spans are posted to `/v1/traces`.
    pub otlp_endpoint: String,
    pub sample_ratio: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Establishing a TCP connection to an endpoint.
    pub connect: Duration,
    /// A client sending its request head.
    pub header_read: Duration,
    /// From forwarding a request to receiving the response head.
    pub request: Duration,
    /// An idle pooled upstream connection is closed after this.
    pub idle: Duration,
    /// A client connection with no request in flight is closed after this.
    pub keepalive: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(2),
            header_read: Duration::from_secs(10),
            request: Duration::from_secs(30),
            idle: Duration::from_secs(60),
            // Above the 60 s idle timeout of common cloud load balancers, so the balancer,
            // not switchyard, closes an idle connection it might be about to reuse.
            keepalive: Duration::from_secs(75),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request head (request line and headers) accepted, in bytes.
    pub max_header_bytes: usize,
    /// Largest request body accepted, in bytes; larger ones get 413 or are cut.
    pub max_body_bytes: u64,
    /// Client connections open at once, over both listeners; at the limit switchyard
    /// stops accepting until one closes.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_header_bytes: 32 * 1024,
            // 1 GiB: large uploads pass through by default (they are streamed, never
            // buffered); the limit is a guard against runaway clients, set it lower per site.
            max_body_bytes: 1024 * 1024 * 1024,
            max_connections: 10_000,
        }
    }
}

/// `listen.https`: where TLS is terminated and with which certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsListen {
    pub addr: SocketAddr,
    /// Never empty; the first is the default for clients without SNI or an unknown name.
    /// Paths are resolved against the config file's directory.
    pub certificates: Vec<CertificateFiles>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    pub health: Option<HealthProbe>,
    pub protocol: UpstreamProtocol,
    /// Applies to the `https://` endpoints; the default verifies against the system roots.
    pub tls: UpstreamTls,
}

/// What a backend speaks: HTTP/1.1, or HTTP/2 only (ALPN `h2` over TLS, prior knowledge
/// over `http://`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    H2,
}

/// `backends.NAME.tls`; paths are resolved against the config file's directory.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct UpstreamTls {
    /// PEM certificates that replace the system roots for this backend.
    pub ca: Option<PathBuf>,
    /// Sent as SNI and verified against the certificate instead of the endpoint's host.
    pub server_name: Option<String>,
    /// Presented when the backend asks for a client certificate.
    pub client_cert: Option<CertificateFiles>,
}

/// An upstream address: scheme and authority, already parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.scheme, self.authority)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthProbe {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that bring a down endpoint back.
    pub healthy_threshold: u32,
    /// Consecutive failures that take an endpoint out of the balancer.
    pub unhealthy_threshold: u32,
}

/// Per-route settings that later stages (rollback, failover, rollouts) act on.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RoutePolicy {
    pub rollback: Option<RollbackSpec>,
    pub failover: Option<FailoverSpec>,
    pub rollout: Option<RolloutSpec>,
    /// Share of the route's requests in the access log: its own `access_log.sample`, else
    /// the top-level one, else 0.
    pub access_sample: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RollbackSpec {
    pub max_error_rate: Option<f64>,
    pub max_latency_ratio: Option<f64>,
    pub window: Duration,
    pub min_requests: u64,
    pub min_consistency: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FailoverSpec {
    pub methods: Vec<http::Method>,
    /// Replays allowed, as a share of the route's requests in its window.
    pub budget: f64,
    pub on_5xx: bool,
    pub max_replay_bytes: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RolloutSpec {
    pub steps: Vec<Weight>,
    pub bake: Duration,
    /// A step's own bake (`{ weight: 25, bake: 5m }`), by step index; `None`: `bake`.
    pub step_bakes: Vec<Option<Duration>>,
    pub gates: Gates,
    pub webhooks: Vec<Webhook>,
}

impl RolloutSpec {
    /// How long step `index` bakes.
    pub fn bake_at(&self, index: usize) -> Duration {
        self.step_bakes
            .get(index)
            .copied()
            .flatten()
            .unwrap_or(self.bake)
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Gates {
    pub max_error_rate: Option<f64>,
    pub max_latency_ratio: Option<f64>,
    pub max_sync_lag: Option<Duration>,
    pub min_consistency: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Webhook {
    pub url: String,
    pub on: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncSpec {
    pub name: String,
    pub source: SyncEnd,
    pub target: SyncEnd,
    pub columns: Vec<(String, String)>,
    pub bidirectional: bool,
    pub conflict: Conflict,
    /// Routes whose rollout gates read this pair's lag and consistency.
    pub routes: Vec<String>,
    /// Runs the pair although a key or unique column compares more loosely on the target
    /// than on the source (rows the source keeps apart may then collide on the target).
    pub accept_looser_collation: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncEnd {
    pub url: String,
    pub table: String,
    pub key: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conflict {
    SourceWins,
    TargetWins,
    LastWriteWins { column: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConsistencySpec {
    pub sync: String,
    /// Keys sampled per second.
    pub sample_rate: f64,
    pub window: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "listen: { http: 127.0.0.1:8080 }\nbackends:\n  a: { endpoints: [ \"http://127.0.0.1:9001\" ] }\n  b: { endpoints: [ \"http://127.0.0.1:9002\" ] }\ndefault_backend: a\nroutes:\n  - name: users\n    match: { path_prefix: /api/users }\n    legacy: a\n    target: b\n    split: { percentage: { weight: 0 } }\n";

    #[test]
    fn a_step_may_bake_for_its_own_time() {
        let text = format!(
            "{BASE}    rollout:\n      steps: [1, {{ weight: 25, bake: 10m }}, 100]\n      bake: 30s\n"
        );
        let config = parse(&text, Path::new("t.yaml")).unwrap();
        let spec = config.policies[0].rollout.as_ref().unwrap();
        assert_eq!(spec.steps.len(), 3);
        assert_eq!(spec.bake_at(0), Duration::from_secs(30));
        assert_eq!(spec.bake_at(1), Duration::from_secs(600));
        assert_eq!(spec.bake_at(2), Duration::from_secs(30));
        // Past the last step (blue-green walks have their own count): the rollout's bake.
        assert_eq!(spec.bake_at(7), Duration::from_secs(30));
    }

    #[test]
    fn a_step_bake_is_checked_like_any_duration() {
        let text = format!("{BASE}    rollout:\n      steps: [1, {{ weight: 25, bake: soon }}]\n");
        let problems = parse(&text, Path::new("t.yaml")).unwrap_err();
        assert!(
            problems
                .iter()
                .any(|d| d.to_string().contains("t.yaml:13:")),
            "{problems:?}"
        );
    }
}

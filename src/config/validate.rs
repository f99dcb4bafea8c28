//! Raw configuration → validated `Config`, collecting every problem with its position.
//!
//! Serde stops at the first structural error (bad YAML, unknown key, wrong type); past that
//! point every semantic problem in the file is reported at once, each located through the
//! `PositionIndex` built from the same text.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use http::header::HeaderName;
use ipnet::IpNet;

use super::position::{Position, PositionIndex, too_deep};
use super::raw::*;
use super::*;
use crate::dataplane::admission::EscapedSlashes;
use crate::dataplane::route::{BackendId, HostMatch, Route, RouteMatcher};
use crate::dataplane::split::{
    Condition, DEFAULT_GENERATED_COOKIE, Flag, FlagId, Rule, Side, Split, StickyKey, ValueMatch,
    Weight,
};

struct Checker<'a> {
    file: &'a Path,
    index: PositionIndex,
    problems: Vec<Diagnostic>,
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl Checker<'_> {
    fn error(&mut self, path: &str, message: impl Into<String>) {
        let position = self.index.locate(path);
        self.problems.push(Diagnostic {
            file: self.file.to_path_buf(),
            position,
            message: message.into(),
        });
    }

    /// A duration of at most [`MAX_DURATION`]; see [`Checker::duration_within`].
    fn duration(&mut self, path: &str, text: Option<&str>, default: Duration) -> Duration {
        self.duration_within(path, text, default, MAX_DURATION)
    }

    /// A positive duration no longer than `max`, so that every deadline the proxy computes
    /// from it (`Instant + d`) stays representable and every wait ends.
    fn duration_within(
        &mut self,
        path: &str,
        text: Option<&str>,
        default: Duration,
        max: Duration,
    ) -> Duration {
        let Some(text) = text else { return default };
        match humantime::parse_duration(text.trim()) {
            Ok(d) if d > max => {
                self.error(
                    path,
                    format!(
                        "`{text}` is too long: it must be at most {}",
                        humantime::format_duration(max)
                    ),
                );
                default
            }
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.error(path, format!("`{text}` must be longer than zero"));
                default
            }
            Err(_) => {
                self.error(
                    path,
                    format!("`{text}` is not a duration; write e.g. `250ms`, `30s` or `5m`"),
                );
                default
            }
        }
    }

    fn weight(&mut self, path: &str, percent: f64) -> Weight {
        Weight::from_percent(percent).unwrap_or_else(|e| {
            self.error(path, e.to_string());
            Weight::ZERO
        })
    }

    fn ratio(&mut self, path: &str, value: Option<f64>, min: f64, max: f64) -> Option<f64> {
        let v = value?;
        if !(v.is_finite() && v >= min && v <= max) {
            self.error(
                path,
                format!("{v} is out of range: it must be between {min} and {max}"),
            );
        }
        Some(v)
    }

    fn socket_addr(&mut self, path: &str, text: &str) -> Option<SocketAddr> {
        text.parse()
            .map_err(|_| {
                self.error(
                    path,
                    format!("`{text}` is not an address; write e.g. `0.0.0.0:8080` or `[::]:8080`"),
                );
            })
            .ok()
    }

    /// `${VAR}` expansion, for secrets such as database URLs.
    fn expand(&mut self, path: &str, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                self.error(path, "`${` without a closing `}`");
                return text.to_string();
            };
            let name = &after[..end];
            match (self.env)(name) {
                Some(value) => out.push_str(&value),
                None => self.error(path, format!("environment variable `{name}` is not set")),
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        out
    }
}

/// The longest duration any setting accepts (rollout bakes, windows).
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);
/// The longest timeout, probe interval or drain step: an hour is already far past any
/// sensible value, and keeps each of them an operational mistake rather than a hang.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// Names beginning with `_` are reserved for the proxy's own metric labels (`_default`).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('_')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

const NAME_RULE: &str = "use letters, digits, `-`, `_` and `.`, not starting with `_`";

pub(super) fn validate(
    text: &str,
    file: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Config, Vec<Diagnostic>> {
    if let Some(problem) = refuse_unbounded(text, file) {
        return Err(vec![problem]);
    }
    let index = PositionIndex::build(text);
    if !index.duplicate_keys().is_empty() {
        return Err(index
            .duplicate_keys()
            .iter()
            .map(|d| Diagnostic {
                file: file.to_path_buf(),
                position: d.again,
                message: format!(
                    "`{}` is written twice; the first is at line {}, column {}",
                    d.path, d.first.line, d.first.col
                ),
            })
            .collect());
    }
    // The tree first: a syntax error is reported alone, in plain words where a rule fits.
    let tree: serde_yaml::Value = match serde_yaml::from_str(text) {
        Ok(tree) => tree,
        Err(e) => return Err(vec![syntax_diagnostic(text, &e, file)]),
    };
    let unknown = super::unknown::unknown_keys::<RawConfig>(&tree);
    if !unknown.is_empty() {
        let mut found: Vec<Diagnostic> = unknown
            .into_iter()
            .map(|k| Diagnostic {
                file: file.to_path_buf(),
                position: index.key(&k.path).unwrap_or_else(|| index.locate(&k.path)),
                message: k.message,
            })
            .collect();
        found.sort_by_key(|d| (d.position.line, d.position.col));
        return Err(found);
    }
    let raw: RawConfig = match serde_yaml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => return Err(vec![serde_diagnostic(&e, file)]),
    };
    let mut c = Checker {
        file,
        index,
        problems: Vec::new(),
        env,
    };
    let config = build(&mut c, raw);
    if c.problems.is_empty() {
        Ok(config)
    } else {
        c.problems
            .sort_by_key(|d| (d.position.line, d.position.col));
        Err(c.problems)
    }
}

fn syntax_diagnostic(text: &str, e: &serde_yaml::Error, file: &Path) -> Diagnostic {
    let d = serde_diagnostic(e, file);
    match super::syntax::explain(text, d.position, &d.message) {
        Some((position, message)) => Diagnostic {
            file: file.to_path_buf(),
            position,
            message,
        },
        None => d,
    }
}

/// The largest config file read, in bytes: 20,000 routes fit in a few MiB.
pub(crate) const MAX_CONFIG_BYTES: usize = 16 * 1024 * 1024;
/// The deepest nesting of mappings and sequences a config may have; switchyard's own
/// schema needs fewer than 10 levels.
const MAX_NESTING: usize = 64;

/// Size and depth are checked before anything whose cost grows with them runs.
fn refuse_unbounded(text: &str, file: &Path) -> Option<Diagnostic> {
    if text.len() > MAX_CONFIG_BYTES {
        return Some(Diagnostic {
            file: file.to_path_buf(),
            position: Position { line: 1, col: 1 },
            message: format!(
                "the file is {} bytes; a config may be at most {MAX_CONFIG_BYTES}",
                text.len()
            ),
        });
    }
    too_deep(text, MAX_NESTING).map(|position| Diagnostic {
        file: file.to_path_buf(),
        position,
        message: format!("nested more than {MAX_NESTING} levels deep; a config needs far fewer"),
    })
}

fn serde_diagnostic(e: &serde_yaml::Error, file: &Path) -> Diagnostic {
    let position = e
        .location()
        .map_or(Position { line: 1, col: 1 }, |l| Position {
            line: l.line(),
            col: l.column(),
        });
    let mut message = e.to_string();
    // The location is already in front; drop the library's copy when it merely ends the
    // message, but keep it when more follows (it then names where a construct began).
    if let Some(at) = message.rfind(" at line ")
        && message[at + 9..]
            .split(" column ")
            .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    {
        message.truncate(at);
    }
    Diagnostic {
        file: file.to_path_buf(),
        position,
        message,
    }
}

fn build(c: &mut Checker<'_>, raw: RawConfig) -> Config {
    let listen = c
        .socket_addr("listen.http", &raw.listen.http)
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080)));
    let https = raw.listen.https.as_ref().and_then(|h| https(c, h, listen));
    let escaped_slashes = match raw.listen.escaped_slashes.as_deref() {
        None | Some("reject") => EscapedSlashes::Reject,
        Some("keep") => EscapedSlashes::Keep,
        Some(other) => {
            c.error(
                "listen.escaped_slashes",
                format!("`{other}` is not a choice; write `reject` or `keep`"),
            );
            EscapedSlashes::Reject
        }
    };
    let admin_listen = match &raw.admin {
        Some(a) => c.socket_addr("admin.listen", &a.listen),
        None => None,
    }
    .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9901)));
    let admin_tokens_file = raw
        .admin
        .as_ref()
        .and_then(|a| a.tokens_file.as_deref())
        .map(|f| c.file.parent().unwrap_or(Path::new(".")).join(f));
    // `serve` reads it at start; `check` must refuse what `serve` would.
    if let Some(path) = &admin_tokens_file {
        let read = super::files::read_bounded_text(path, super::files::MAX_SMALL_FILE_BYTES)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))
            .and_then(|text| super::files::parse_tokens(&text));
        if let Err(problem) = read {
            c.error("admin.tokens_file", problem);
        }
    }
    let state_url = match &raw.state {
        Some(s) => c.expand("state.url", &s.url),
        None => "sqlite://switchyard-state.db".to_string(),
    };
    if !(state_url.starts_with("sqlite:")
        || state_url.starts_with("postgres://")
        || state_url.starts_with("postgresql://"))
    {
        c.error(
            "state.url",
            format!("`{state_url}` is not a state store; use `sqlite://FILE` or `postgres://…`"),
        );
    }

    let defaults = Timeouts::default();
    let t = raw.timeouts.as_ref();
    let timeouts = Timeouts {
        connect: c.duration_within(
            "timeouts.connect",
            t.and_then(|t| t.connect.as_deref()),
            defaults.connect,
            MAX_TIMEOUT,
        ),
        header_read: c.duration_within(
            "timeouts.header_read",
            t.and_then(|t| t.header_read.as_deref()),
            defaults.header_read,
            MAX_TIMEOUT,
        ),
        request: c.duration_within(
            "timeouts.request",
            t.and_then(|t| t.request.as_deref()),
            defaults.request,
            MAX_TIMEOUT,
        ),
        idle: c.duration_within(
            "timeouts.idle",
            t.and_then(|t| t.idle.as_deref()),
            defaults.idle,
            MAX_TIMEOUT,
        ),
        keepalive: c.duration_within(
            "timeouts.keepalive",
            t.and_then(|t| t.keepalive.as_deref()),
            defaults.keepalive,
            MAX_TIMEOUT,
        ),
    };
    let mut limits = Limits::default();
    if let Some(max) = raw.limits.as_ref().and_then(|l| l.max_header_bytes) {
        if !(1024..=1024 * 1024).contains(&max) {
            c.error(
                "limits.max_header_bytes",
                format!("{max} is out of range: it must be between 1024 and 1048576"),
            );
        } else {
            limits.max_header_bytes = max as usize;
        }
    }
    if let Some(max) = raw.limits.as_ref().and_then(|l| l.max_body_bytes) {
        if max == 0 {
            c.error(
                "limits.max_body_bytes",
                "0 would refuse every request body; it must be at least 1",
            );
        } else {
            limits.max_body_bytes = max;
        }
    }
    if let Some(max) = raw.limits.as_ref().and_then(|l| l.max_connections) {
        // The semaphore that enforces it holds at most usize::MAX >> 3 permits.
        if !(1..=1 << 24).contains(&max) {
            c.error(
                "limits.max_connections",
                format!("{max} is out of range: it must be between 1 and 16777216"),
            );
        } else {
            limits.max_connections = max as usize;
        }
    }
    let drain_delay = match raw.drain_delay.as_deref() {
        Some("0") | Some("0s") => Duration::ZERO,
        other => c.duration_within("drain_delay", other, Duration::ZERO, MAX_TIMEOUT),
    };
    let shutdown_timeout = c.duration_within(
        "shutdown_timeout",
        raw.shutdown_timeout.as_deref(),
        Duration::from_secs(30),
        MAX_TIMEOUT,
    );

    let (backends, backend_ids) = backends(c, &raw);
    let default_backend = match backend_ids.get(raw.default_backend.as_str()) {
        Some(&id) => id,
        None => {
            c.error(
                "default_backend",
                undefined_backend(&raw.default_backend, &backend_ids),
            );
            BackendId(0)
        }
    };

    let mut flag_ids = HashMap::new();
    let mut flags = Vec::new();
    for (name, rf) in &raw.flags {
        let path = format!("flags.{name}");
        if !valid_name(name) {
            c.error(
                &path,
                format!("flag name `{name}` is not valid: {NAME_RULE}"),
            );
        }
        flag_ids.insert(name.clone(), FlagId(flags.len() as u32));
        let rules = rf
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| rule(c, &format!("{path}.rules[{i}]"), r))
            .collect();
        let weight = c.weight(&format!("{path}.percentage"), rf.percentage);
        let sticky = rf
            .sticky
            .as_ref()
            .and_then(|s| sticky(c, &format!("{path}.sticky"), s));
        flags.push(Flag {
            name: name.clone(),
            rules,
            weight,
            sticky,
        });
    }

    let mut routes = Vec::new();
    let access_log = raw.access_log.as_ref().map(|a| access_log(c, a));
    let default_sample = access_log.as_ref().map_or(0.0, |a| a.sample);
    let mut policies = Vec::new();
    let mut seen_routes: HashMap<&str, Position> = HashMap::new();
    for (i, rr) in raw.routes.iter().enumerate() {
        let path = format!("routes[{i}]");
        let name_path = format!("{path}.name");
        if !valid_name(&rr.name) {
            c.error(
                &name_path,
                format!("route name `{}` is not valid: {NAME_RULE}", rr.name),
            );
        }
        let here = c.index.locate(&name_path);
        if let Some(first) = seen_routes.insert(&rr.name, here) {
            c.error(
                &name_path,
                format!(
                    "route name `{}` is already used at line {}, column {}",
                    rr.name, first.line, first.col
                ),
            );
        }
        let legacy = backend_ref(c, &format!("{path}.legacy"), &rr.legacy, &backend_ids);
        let target = backend_ref(c, &format!("{path}.target"), &rr.target, &backend_ids);
        let matcher = route_match(c, &format!("{path}.match"), &rr.matcher);
        let split = split(c, &format!("{path}.split"), &rr.split, &flag_ids);
        let sticky = rr
            .sticky
            .as_ref()
            .and_then(|s| sticky(c, &format!("{path}.sticky"), s));
        routes.push(Route {
            name: Arc::from(rr.name.as_str()),
            matcher,
            legacy,
            target,
            split,
            sticky,
            rolled_back: false,
        });
        policies.push(policy(c, &path, rr, default_sample));
    }
    // Two routes with an identical match would make the second unreachable.
    for (i, a) in routes.iter().enumerate() {
        if let Some(j) = routes[..i].iter().position(|b| b.matcher == a.matcher) {
            c.error(
                &format!("routes[{i}].match"),
                format!("route `{}` matches exactly what route `{}` matches, so it could never be chosen", a.name, routes[j].name),
            );
        }
    }

    let (sync, consistency) = sync_and_consistency(c, &raw);

    Config {
        access_log,
        tracing: raw.tracing.as_ref().map(|t| tracing_spec(c, t)),
        listen,
        https,
        escaped_slashes,
        admin_listen,
        admin_tokens_file,
        state_url,
        timeouts,
        limits,
        drain_delay,
        shutdown_timeout,
        backends,
        default_backend,
        routes,
        policies,
        flags,
        sync,
        consistency,
    }
}

/// `listen.https`: the address, and every certificate loaded now, so `check` catches a
/// missing file, a bad PEM or a key that does not match its certificate.
fn https(c: &mut Checker<'_>, raw: &RawHttps, http: SocketAddr) -> Option<HttpsListen> {
    let addr = c.socket_addr("listen.https.addr", &raw.addr);
    if let Some(addr) = addr
        && addr == http
        && addr.port() != 0
    {
        c.error(
            "listen.https.addr",
            format!("{addr} is also `listen.http`; the two listeners need different ports"),
        );
    }
    let dir = c.file.parent().unwrap_or(Path::new(".")).to_path_buf();
    let pairs = std::iter::once(("listen.https".to_string(), &raw.cert, &raw.key)).chain(
        raw.certificates
            .iter()
            .enumerate()
            .map(|(i, p)| (format!("listen.https.certificates[{i}]"), &p.cert, &p.key)),
    );
    let mut certificates = Vec::new();
    for (i, (path, cert, key)) in pairs.enumerate() {
        let files = CertificateFiles {
            cert: dir.join(cert),
            key: dir.join(key),
        };
        match crate::dataplane::tls::load_certificate(&files) {
            // Only SNI can select an extra certificate, and SNI carries DNS names.
            Ok(loaded) if i > 0 && loaded.names.is_empty() => c.error(
                &format!("{path}.cert"),
                format!(
                    "{} has no DNS name in its subjectAltName, so no client can select it by SNI",
                    files.cert.display()
                ),
            ),
            Ok(_) => {}
            Err(e) => {
                let at = if e.is_about_key() { "key" } else { "cert" };
                c.error(&format!("{path}.{at}"), e.to_string());
            }
        }
        certificates.push(files);
    }
    Some(HttpsListen {
        addr: addr?,
        certificates,
    })
}

fn undefined_backend(name: &str, ids: &HashMap<&str, BackendId>) -> String {
    let mut known: Vec<&str> = ids.keys().copied().collect();
    known.sort_unstable();
    format!(
        "backend `{name}` is not defined; defined backends: {}",
        known.join(", ")
    )
}

fn backend_ref(
    c: &mut Checker<'_>,
    path: &str,
    name: &str,
    ids: &HashMap<&str, BackendId>,
) -> BackendId {
    match ids.get(name) {
        Some(&id) => id,
        None => {
            c.error(path, undefined_backend(name, ids));
            BackendId(0)
        }
    }
}

fn backends<'r>(
    c: &mut Checker<'_>,
    raw: &'r RawConfig,
) -> (Vec<BackendSpec>, HashMap<&'r str, BackendId>) {
    let mut specs = Vec::new();
    let mut ids = HashMap::new();
    if raw.backends.is_empty() {
        c.error("backends", "at least one backend is needed");
    }
    for (name, rb) in &raw.backends {
        let path = format!("backends.{name}");
        if !valid_name(name) {
            c.error(
                &path,
                format!("backend name `{name}` is not valid: {NAME_RULE}"),
            );
        }
        if rb.endpoints.is_empty() {
            c.error(
                &format!("{path}.endpoints"),
                "a backend needs at least one endpoint",
            );
        }
        let endpoints: Vec<Endpoint> = rb
            .endpoints
            .iter()
            .enumerate()
            .filter_map(|(i, e)| endpoint(c, &format!("{path}.endpoints[{i}]"), e))
            .collect();
        let health = rb.health.as_ref().map(|h| {
            if !h.path.starts_with('/') {
                c.error(
                    &format!("{path}.health.path"),
                    format!("`{}` must start with `/`", h.path),
                );
            }
            let threshold = |c: &mut Checker<'_>, key: &str, v: Option<u32>, default: u32| match v {
                Some(0) => {
                    c.error(
                        &format!("{path}.health.{key}"),
                        "a threshold must be at least 1",
                    );
                    default
                }
                Some(n) => n,
                None => default,
            };
            HealthProbe {
                path: h.path.clone(),
                interval: c.duration_within(
                    &format!("{path}.health.interval"),
                    h.interval.as_deref(),
                    Duration::from_secs(2),
                    MAX_TIMEOUT,
                ),
                timeout: c.duration_within(
                    &format!("{path}.health.timeout"),
                    h.timeout.as_deref(),
                    Duration::from_secs(1),
                    MAX_TIMEOUT,
                ),
                healthy_threshold: threshold(c, "healthy_threshold", h.healthy_threshold, 2),
                unhealthy_threshold: threshold(c, "unhealthy_threshold", h.unhealthy_threshold, 3),
            }
        });
        let protocol = match rb.protocol.as_deref() {
            None | Some("http1") => UpstreamProtocol::Http1,
            Some("h2") => UpstreamProtocol::H2,
            Some(other) => {
                c.error(
                    &format!("{path}.protocol"),
                    format!("`{other}` is not an upstream protocol; use `http1` or `h2`"),
                );
                UpstreamProtocol::Http1
            }
        };
        let tls = match &rb.tls {
            Some(raw) => {
                if !endpoints.is_empty()
                    && !endpoints
                        .iter()
                        .any(|e| e.scheme == http::uri::Scheme::HTTPS)
                {
                    c.error(
                        &format!("{path}.tls"),
                        "`tls` applies to `https://` endpoints, and this backend has none",
                    );
                }
                upstream_tls(c, &format!("{path}.tls"), raw)
            }
            None => UpstreamTls::default(),
        };
        ids.insert(name.as_str(), BackendId(specs.len() as u32));
        specs.push(BackendSpec {
            name: name.clone(),
            endpoints,
            health,
            protocol,
            tls,
        });
    }
    (specs, ids)
}

/// `backends.NAME.tls`: every file is read and parsed now, so `check` reports a missing
/// CA, a bad PEM or a client key that is not its certificate's at the right line.
fn upstream_tls(c: &mut Checker<'_>, path: &str, raw: &RawUpstreamTls) -> UpstreamTls {
    let dir = c.file.parent().unwrap_or(Path::new(".")).to_path_buf();
    let ca = raw.ca.as_ref().map(|f| dir.join(f));
    if let Some(file) = &ca
        && let Err(e) = crate::dataplane::upstream::load_roots(file)
    {
        c.error(&format!("{path}.ca"), e.to_string());
    }
    if let Some(name) = &raw.server_name
        && rustls_pki_types::ServerName::try_from(name.as_str()).is_err()
    {
        c.error(
            &format!("{path}.server_name"),
            format!("`{name}` is not a DNS name or IP address"),
        );
    }
    let client_cert = match (&raw.client_cert, &raw.client_key) {
        (Some(cert), Some(key)) => {
            let files = CertificateFiles {
                cert: dir.join(cert),
                key: dir.join(key),
            };
            if let Err(e) = crate::dataplane::tls::load_certificate(&files) {
                let at = if e.is_about_key() {
                    "client_key"
                } else {
                    "client_cert"
                };
                c.error(&format!("{path}.{at}"), e.to_string());
            }
            Some(files)
        }
        (Some(_), None) => {
            c.error(
                &format!("{path}.client_cert"),
                "`client_cert` needs `client_key` (its private key) too",
            );
            None
        }
        (None, Some(_)) => {
            c.error(
                &format!("{path}.client_key"),
                "`client_key` needs `client_cert` (its certificate) too",
            );
            None
        }
        (None, None) => None,
    };
    UpstreamTls {
        ca,
        server_name: raw.server_name.clone(),
        client_cert,
    }
}

fn endpoint(c: &mut Checker<'_>, path: &str, text: &str) -> Option<Endpoint> {
    let uri: http::Uri = match text.parse() {
        Ok(u) => u,
        Err(_) => {
            c.error(
                path,
                format!("`{text}` is not a URL; write e.g. `http://10.0.0.5:8080`"),
            );
            return None;
        }
    };
    let (Some(scheme), Some(authority)) = (uri.scheme(), uri.authority()) else {
        c.error(
            path,
            format!("`{text}` needs a scheme and a host, e.g. `http://10.0.0.5:8080`"),
        );
        return None;
    };
    if scheme != &http::uri::Scheme::HTTP && scheme != &http::uri::Scheme::HTTPS {
        c.error(
            path,
            format!("`{text}`: an endpoint is `http://` or `https://`"),
        );
        return None;
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        c.error(
            path,
            format!(
                "`{text}`: an endpoint is scheme, host and port only; the request's path is kept"
            ),
        );
        return None;
    }
    // Credentials in a URL end up in logs and error text; a backend that needs them gets
    // a header (RFC 3986 §3.2.1 deprecates `user:password@`).
    if authority.as_str().contains('@') {
        c.error(
            path,
            format!("`{text}`: an endpoint must not carry credentials (`user@`)"),
        );
        return None;
    }
    // `http` parses `:99999` and then reports no port at all, which would connect to 80.
    let after_host = authority
        .as_str()
        .rsplit_once(']')
        .map_or(authority.as_str(), |(_, rest)| rest);
    if after_host.contains(':') && authority.port_u16().is_none_or(|p| p == 0) {
        c.error(
            path,
            format!("`{text}`: the port must be a number from 1 to 65535"),
        );
        return None;
    }
    Some(Endpoint {
        scheme: scheme.clone(),
        authority: authority.clone(),
    })
}

fn route_match(c: &mut Checker<'_>, path: &str, raw: &RawRouteMatch) -> RouteMatcher {
    let host = raw.host.as_ref().map(|h| {
        let lower = h.trim().to_ascii_lowercase();
        if lower.is_empty() || lower.contains(['/', ':', ' ']) {
            c.error(&format!("{path}.host"), format!("`{h}` is not a host name; write e.g. `api.example.com` or `*.example.com` (no port)"));
        }
        match lower.strip_prefix('*') {
            Some(suffix) if suffix.starts_with('.') => HostMatch::Suffix(suffix.to_string()),
            Some(_) => {
                c.error(&format!("{path}.host"), format!("`{h}`: a wildcard host must look like `*.example.com`"));
                HostMatch::Exact(lower)
            }
            None => HostMatch::Exact(lower),
        }
    });
    let path_prefix = match &raw.path_prefix {
        Some(p)
            if p.split('/').filter(|s| !s.is_empty()).count()
                > crate::dataplane::route::MAX_PREFIX_SEGMENTS =>
        {
            c.error(
                &format!("{path}.path_prefix"),
                format!(
                    "the prefix has more than {} segments",
                    crate::dataplane::route::MAX_PREFIX_SEGMENTS
                ),
            );
            "/".to_string()
        }
        Some(p) if p.starts_with('/') => {
            // Requests are matched on their normalised path; a prefix must be normal too.
            match crate::dataplane::admission::normalize_path(p, EscapedSlashes::Keep) {
                Ok(normal) if normal == p.as_str() => {}
                Ok(normal) => c.error(
                    &format!("{path}.path_prefix"),
                    format!("requests are matched on their normalised path, so `{p}` never matches; write `{normal}`"),
                ),
                Err(refusal) => c.error(
                    &format!("{path}.path_prefix"),
                    format!("`{p}`: {}", refusal.message),
                ),
            }
            p.clone()
        }
        Some(p) => {
            c.error(
                &format!("{path}.path_prefix"),
                format!("`{p}` must start with `/`"),
            );
            "/".to_string()
        }
        None => "/".to_string(),
    };
    let methods = raw
        .methods
        .iter()
        .enumerate()
        .filter_map(|(i, m)| method(c, &format!("{path}.methods[{i}]"), m))
        .collect();
    let headers = raw
        .headers
        .iter()
        .enumerate()
        .filter_map(|(i, h)| {
            let p = format!("{path}.headers[{i}]");
            let name = header_name(c, &p, &h.name)?;
            let want = value_match(c, &p, h);
            carriable(c, &p, &want, "a header", b"");
            Some((name, want))
        })
        .collect();
    RouteMatcher {
        host,
        path_prefix,
        methods,
        headers,
    }
}

fn method(c: &mut Checker<'_>, path: &str, text: &str) -> Option<Method> {
    let upper = text.to_ascii_uppercase();
    if upper != text {
        c.error(
            path,
            format!("method `{text}` must be upper case: `{upper}`"),
        );
        return None;
    }
    Method::from_bytes(text.as_bytes())
        .map_err(|_| c.error(path, format!("`{text}` is not an HTTP method")))
        .ok()
}

fn header_name(c: &mut Checker<'_>, path: &str, name: &str) -> Option<HeaderName> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| {
            c.error(
                &format!("{path}.name"),
                format!("`{name}` is not a valid header name"),
            )
        })
        .ok()
}

fn value_match(c: &mut Checker<'_>, path: &str, raw: &RawValueMatch) -> ValueMatch {
    match (&raw.value, &raw.any_of, raw.present) {
        (Some(v), None, None) => ValueMatch::Exact(v.clone()),
        (None, Some(list), None) if !list.is_empty() => ValueMatch::AnyOf(list.clone()),
        (None, Some(_), None) => {
            c.error(&format!("{path}.in"), "`in` needs at least one value");
            ValueMatch::Present
        }
        (None, None, Some(true)) => ValueMatch::Present,
        (None, None, Some(false)) => {
            c.error(
                &format!("{path}.present"),
                "`present: false` is not supported; a rule matches what is there",
            );
            ValueMatch::Present
        }
        (None, None, None) => {
            c.error(
                path,
                format!(
                    "`{}` needs one of `value`, `in` or `present: true`",
                    raw.name
                ),
            );
            ValueMatch::Present
        }
        _ => {
            c.error(
                path,
                format!(
                    "`{}` has more than one of `value`, `in` and `present`; keep one",
                    raw.name
                ),
            );
            ValueMatch::Present
        }
    }
}

/// Refuses a rule value no request could carry, so it could never match: header values
/// lose surrounding whitespace and hold no control characters (RFC 9110 §5.5); cookie
/// values also hold no `;`, `,` or `"` (RFC 6265 §4.1.1). Query values are compared
/// decoded, so any text can be carried there.
fn carriable(c: &mut Checker<'_>, path: &str, want: &ValueMatch, what: &str, also: &[u8]) {
    let values: &[String] = match want {
        ValueMatch::Exact(v) => std::slice::from_ref(v),
        ValueMatch::AnyOf(vs) => vs,
        ValueMatch::Present => &[],
    };
    for v in values {
        let bytes = v.as_bytes();
        let bad = bytes.first().is_some_and(|b| b" \t".contains(b))
            || bytes.last().is_some_and(|b| b" \t".contains(b))
            || bytes
                .iter()
                .any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f || also.contains(&b));
        if bad {
            c.error(
                path,
                format!(
                    "no request can carry `{}` in {what}, so this rule would never match",
                    v.escape_debug()
                ),
            );
        }
    }
}

fn rule(c: &mut Checker<'_>, path: &str, raw: &RawRule) -> Rule {
    let mut conditions = Vec::new();
    if let Some(h) = &raw.header
        && let Some(name) = header_name(c, &format!("{path}.header"), &h.name)
    {
        let want = value_match(c, &format!("{path}.header"), h);
        carriable(c, &format!("{path}.header"), &want, "a header", b"");
        conditions.push(Condition::Header(name, want));
    }
    if let Some(k) = &raw.cookie {
        let want = value_match(c, &format!("{path}.cookie"), k);
        carriable(c, &format!("{path}.cookie"), &want, "a cookie", b";,\"");
        conditions.push(Condition::Cookie(k.name.clone(), want));
    }
    if let Some(q) = &raw.query {
        conditions.push(Condition::Query(
            q.name.clone(),
            value_match(c, &format!("{path}.query"), q),
        ));
    }
    if let Some(cidrs) = &raw.client_ip {
        let list: Vec<&String> = match cidrs {
            RawCidrs::One(s) => vec![s],
            RawCidrs::Many(v) => v.iter().collect(),
        };
        let nets = list
            .into_iter()
            .filter_map(|s| {
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map_err(|_| {
                        c.error(
                            &format!("{path}.client_ip"),
                            format!("`{s}` is not an address or CIDR, e.g. `10.0.0.0/8`"),
                        )
                    })
                    .ok()
            })
            .collect();
        conditions.push(Condition::ClientIp(nets));
    }
    if raw.header.is_none()
        && raw.cookie.is_none()
        && raw.query.is_none()
        && raw.client_ip.is_none()
    {
        c.error(
            path,
            "a rule needs at least one of `header`, `cookie`, `query`, `client_ip`",
        );
    }
    Rule { conditions }
}

fn split(
    c: &mut Checker<'_>,
    path: &str,
    raw: &RawSplit,
    flags: &HashMap<String, FlagId>,
) -> Split {
    let given: Vec<&str> = [
        raw.percentage.as_ref().map(|_| "percentage"),
        raw.canary.as_ref().map(|_| "canary"),
        raw.blue_green.as_ref().map(|_| "blue_green"),
        raw.feature_flag.as_ref().map(|_| "feature_flag"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if given.len() != 1 {
        let msg = if given.is_empty() {
            "a split needs exactly one of `percentage`, `canary`, `blue_green`, `feature_flag`"
                .to_string()
        } else {
            format!(
                "a route has exactly one split, but this one has {}",
                given.join(" and ")
            )
        };
        c.error(path, msg);
    }
    if let Some(p) = &raw.percentage {
        return Split::Percentage {
            weight: c.weight(&format!("{path}.percentage.weight"), p.weight),
        };
    }
    if let Some(k) = &raw.canary {
        let rules = k
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| rule(c, &format!("{path}.canary.rules[{i}]"), r))
            .collect();
        return Split::Canary {
            rules,
            weight: c.weight(&format!("{path}.canary.weight"), k.weight),
        };
    }
    if let Some(bg) = &raw.blue_green {
        let active = match bg.active.as_str() {
            "legacy" => Side::Legacy,
            "target" => Side::Target,
            other => {
                c.error(
                    &format!("{path}.blue_green.active"),
                    format!("`{other}` is not a side; use `legacy` or `target`"),
                );
                Side::Legacy
            }
        };
        let preview = bg
            .preview
            .as_ref()
            .map(|r| rule(c, &format!("{path}.blue_green.preview"), r));
        return Split::BlueGreen { active, preview };
    }
    if let Some(ff) = &raw.feature_flag {
        return match flags.get(&ff.flag) {
            Some(&flag) => Split::FeatureFlag { flag },
            None => {
                let mut known: Vec<&str> = flags.keys().map(String::as_str).collect();
                known.sort_unstable();
                c.error(
                    &format!("{path}.feature_flag.flag"),
                    format!(
                        "flag `{}` is not defined under `flags`; defined flags: {}",
                        ff.flag,
                        if known.is_empty() {
                            "(none)".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
                Split::Percentage {
                    weight: Weight::ZERO,
                }
            }
        };
    }
    Split::Percentage {
        weight: Weight::ZERO,
    }
}

fn sticky(c: &mut Checker<'_>, path: &str, raw: &RawSticky) -> Option<StickyKey> {
    let key = raw.key.trim();
    let parsed = if let Some(name) = key.strip_prefix("cookie:") {
        (!name.is_empty()).then(|| StickyKey::Cookie(name.to_string()))
    } else if let Some(name) = key.strip_prefix("header:") {
        HeaderName::from_bytes(name.as_bytes())
            .ok()
            .map(StickyKey::Header)
    } else if key == "client_ip" {
        Some(StickyKey::ClientIp)
    } else if key == "generated" {
        Some(StickyKey::Generated {
            cookie: raw
                .cookie
                .clone()
                .unwrap_or_else(|| DEFAULT_GENERATED_COOKIE.to_string()),
        })
    } else {
        None
    };
    if parsed.is_none() {
        c.error(&format!("{path}.key"), format!("`{key}` is not a sticky key; use `cookie:NAME`, `header:NAME`, `client_ip` or `generated`"));
    }
    if raw.cookie.is_some() && key != "generated" {
        c.error(
            &format!("{path}.cookie"),
            "`cookie` names the cookie of the `generated` key and is only allowed with it",
        );
    }
    if let Some(cookie) = &raw.cookie
        && (cookie.is_empty()
            || !cookie
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)))
    {
        c.error(
            &format!("{path}.cookie"),
            format!("`{cookie}` is not a valid cookie name"),
        );
    }
    parsed
}

fn policy(c: &mut Checker<'_>, path: &str, rr: &RawRoute, default_sample: f64) -> RoutePolicy {
    let rollback = rr.rollback.as_ref().map(|r| {
        let p = format!("{path}.rollback");
        RollbackSpec {
            max_error_rate: c.ratio(&format!("{p}.max_error_rate"), r.max_error_rate, 0.0, 1.0),
            max_latency_ratio: c.ratio(
                &format!("{p}.max_latency_ratio"),
                r.max_latency_ratio,
                1.0,
                1000.0,
            ),
            window: {
                let w = c.duration(
                    &format!("{p}.window"),
                    r.window.as_deref(),
                    Duration::from_secs(10),
                );
                if w > crate::health::MAX_WINDOW {
                    c.error(
                        &format!("{p}.window"),
                        format!(
                            "the window must be at most {}s",
                            crate::health::MAX_WINDOW.as_secs()
                        ),
                    );
                }
                w.min(crate::health::MAX_WINDOW)
            },
            min_requests: r.min_requests.unwrap_or(20),
            min_consistency: c.ratio(&format!("{p}.min_consistency"), r.min_consistency, 0.0, 1.0),
        }
    });
    let failover = rr.failover.as_ref().map(|f| {
        let p = format!("{path}.failover");
        let methods = f
            .methods
            .iter()
            .enumerate()
            .filter_map(|(i, m)| method(c, &format!("{p}.methods[{i}]"), m))
            .collect();
        FailoverSpec {
            methods,
            budget: c
                .ratio(&format!("{p}.budget"), f.budget, 0.0, 1.0)
                .unwrap_or(0.2),
            // In a migration legacy's answer is the known good one (contract §10).
            on_5xx: f.on_5xx.unwrap_or(true),
            max_replay_bytes: f.max_replay_bytes.unwrap_or(64 * 1024),
        }
    });
    let rollout = rr.rollout.as_ref().map(|r| {
        let p = format!("{path}.rollout");
        let steps: Vec<Weight> = r
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| match s {
                RawStep::Weight(w) => c.weight(&format!("{p}.steps[{i}]"), *w),
                RawStep::WithBake(s) => c.weight(&format!("{p}.steps[{i}].weight"), s.weight),
            })
            .collect();
        let step_bakes: Vec<Option<Duration>> = r
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| match s {
                RawStep::Weight(_) => None,
                RawStep::WithBake(s) => Some(c.duration(
                    &format!("{p}.steps[{i}].bake"),
                    Some(&s.bake),
                    Duration::from_secs(120),
                )),
            })
            .collect();
        if steps.is_empty() {
            c.error(&format!("{p}.steps"), "a rollout needs at least one step");
        }
        if steps.windows(2).any(|w| w[0] >= w[1]) {
            c.error(&format!("{p}.steps"), "rollout steps must rise strictly, e.g. [1, 5, 25, 50, 100]");
        }
        let g = r.gates.as_ref();
        let gates = Gates {
            max_error_rate: c.ratio(&format!("{p}.gates.max_error_rate"), g.and_then(|g| g.max_error_rate), 0.0, 1.0),
            max_latency_ratio: c.ratio(&format!("{p}.gates.max_latency_ratio"), g.and_then(|g| g.max_latency_ratio), 1.0, 1000.0),
            max_sync_lag: g.and_then(|g| g.max_sync_lag.as_deref()).map(|d| c.duration(&format!("{p}.gates.max_sync_lag"), Some(d), Duration::from_millis(500))),
            min_consistency: c.ratio(&format!("{p}.gates.min_consistency"), g.and_then(|g| g.min_consistency), 0.0, 1.0),
        };
        let webhooks = r
            .webhooks
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let wp = format!("{p}.webhooks[{i}]");
                if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                    c.error(&format!("{wp}.url"), format!("`{}` is not an http(s) URL", w.url));
                }
                for (j, ev) in w.on.iter().enumerate() {
                    // `gate` makes the webhook a gate: asked at every step, 2xx lets it proceed.
                    if !["step", "rollback", "promoted", "paused", "aborted", "gate"].contains(&ev.as_str()) {
                        c.error(&format!("{wp}.on[{j}]"), format!("`{ev}` is not an event; use step, rollback, promoted, paused, aborted or gate"));
                    }
                }
                Webhook { url: w.url.clone(), on: w.on.clone() }
            })
            .collect();
        RolloutSpec {
            steps,
            bake: c.duration(&format!("{p}.bake"), r.bake.as_deref(), Duration::from_secs(120)),
            step_bakes,
            gates,
            webhooks,
        }
    });
    RoutePolicy {
        rollback,
        failover,
        rollout,
        access_sample: rr.access_log.as_ref().map_or(default_sample, |a| {
            c.ratio(
                &format!("{path}.access_log.sample"),
                Some(a.sample),
                0.0,
                1.0,
            )
            .unwrap_or(0.0)
        }),
    }
}

/// `access_log:` at the top level. Default: JSON on stdout, every request.
fn access_log(c: &mut Checker<'_>, raw: &RawAccessLog) -> AccessLogSpec {
    let format = match raw.format.as_deref() {
        None | Some("json") => AccessLogFormat::Json,
        Some("text") => AccessLogFormat::Text,
        Some(other) => {
            c.error(
                "access_log.format",
                format!("`{other}` is not an access log format; write `json` or `text`"),
            );
            AccessLogFormat::Json
        }
    };
    let path = match raw.path.as_deref() {
        None | Some("stdout") => AccessLogPath::Stdout,
        Some("") => {
            c.error("access_log.path", "write `stdout` or a file path");
            AccessLogPath::Stdout
        }
        Some(file) => {
            let path = c.file.parent().unwrap_or(Path::new(".")).join(file);
            if !path
                .parent()
                .is_some_and(|d| d.as_os_str().is_empty() || d.is_dir())
            {
                c.error(
                    "access_log.path",
                    format!("the directory of `{file}` does not exist"),
                );
            }
            AccessLogPath::File(path)
        }
    };
    let sample = c
        .ratio("access_log.sample", raw.sample, 0.0, 1.0)
        .unwrap_or(1.0);
    let queue = match raw.queue {
        None => DEFAULT_ACCESS_LOG_QUEUE,
        Some(n @ 1..=1_048_576) => n as usize,
        Some(n) => {
            c.error(
                "access_log.queue",
                format!("{n} is out of range: it must be between 1 and 1048576 lines"),
            );
            DEFAULT_ACCESS_LOG_QUEUE
        }
    };
    AccessLogSpec {
        format,
        path,
        sample,
        queue,
    }
}

/// Lines the access log holds for a writer that fell behind: about 4 MB of JSON lines.
const DEFAULT_ACCESS_LOG_QUEUE: usize = 8192;

/// `tracing:`: an `http://` or `https://` OTLP endpoint and a ratio (default 1).
fn tracing_spec(c: &mut Checker<'_>, raw: &RawTracing) -> TracingSpec {
    let endpoint = c.expand("tracing.otlp_endpoint", &raw.otlp_endpoint);
    if endpoint.parse::<http::Uri>().ok().is_none_or(|u| {
        !matches!(u.scheme_str(), Some("http" | "https")) || u.authority().is_none()
    }) {
        c.error(
            "tracing.otlp_endpoint",
            format!(
                "`{endpoint}` is not an OTLP/HTTP endpoint; write e.g. `http://collector:4318`"
            ),
        );
    }
    TracingSpec {
        otlp_endpoint: endpoint.trim_end_matches('/').to_string(),
        sample_ratio: c
            .ratio("tracing.sample_ratio", raw.sample_ratio, 0.0, 1.0)
            .unwrap_or(1.0),
    }
}

fn sync_and_consistency(
    c: &mut Checker<'_>,
    raw: &RawConfig,
) -> (Vec<SyncSpec>, Vec<ConsistencySpec>) {
    let route_names: Vec<&str> = raw.routes.iter().map(|r| r.name.as_str()).collect();
    let mut names: HashMap<&str, usize> = HashMap::new();
    let mut sync = Vec::new();
    for (i, s) in raw.sync.iter().enumerate() {
        let p = format!("sync[{i}]");
        if let Some(first) = names.insert(&s.name, i) {
            c.error(
                &format!("{p}.name"),
                format!("sync name `{}` is already used by sync[{first}]", s.name),
            );
        }
        let end = |c: &mut Checker<'_>, side: &str, e: &RawSyncEnd| {
            let ep = format!("{p}.{side}");
            if e.key.is_empty() {
                c.error(&format!("{ep}.key"), "a key needs at least one column");
            }
            SyncEnd {
                url: c.expand(&format!("{ep}.url"), &e.url),
                table: e.table.clone(),
                key: e.key.clone(),
            }
        };
        let source = end(c, "source", &s.source);
        let target = end(c, "target", &s.target);
        let bidirectional = match s.direction.as_deref() {
            None | Some("one_way") => false,
            Some("bidirectional") => true,
            Some(other) => {
                c.error(
                    &format!("{p}.direction"),
                    format!("`{other}` is not a direction; use `one_way` or `bidirectional`"),
                );
                false
            }
        };
        let routes = match &s.routes {
            None => route_names
                .iter()
                .filter(|r| **r == s.name)
                .map(|r| r.to_string())
                .collect(),
            Some(list) => {
                for r in list {
                    if !route_names.contains(&r.as_str()) {
                        c.error(
                            &format!("{p}.routes"),
                            format!("route `{r}` is not defined under `routes`"),
                        );
                    }
                }
                list.clone()
            }
        };
        let conflict = match &s.conflict {
            None => Conflict::SourceWins,
            Some(serde_yaml::Value::String(v)) if v == "source_wins" => Conflict::SourceWins,
            Some(serde_yaml::Value::String(v)) if v == "target_wins" => Conflict::TargetWins,
            Some(serde_yaml::Value::Mapping(m)) if m.len() == 1 => {
                let column = m
                    .get("last_write_wins")
                    .and_then(|v| v.get("column"))
                    .and_then(|v| v.as_str());
                match column {
                    Some(col) => Conflict::LastWriteWins {
                        column: col.to_string(),
                    },
                    None => {
                        c.error(
                            &format!("{p}.conflict"),
                            "write `last_write_wins: { column: updated_at }`",
                        );
                        Conflict::SourceWins
                    }
                }
            }
            Some(_) => {
                c.error(
                    &format!("{p}.conflict"),
                    "use `source_wins`, `target_wins` or `last_write_wins: { column: NAME }`",
                );
                Conflict::SourceWins
            }
        };
        sync.push(SyncSpec {
            name: s.name.clone(),
            source,
            target,
            columns: s
                .columns
                .iter()
                .map(|(a, b)| (a.clone(), b.clone()))
                .collect(),
            bidirectional,
            conflict,
            routes,
            accept_looser_collation: s.accept_looser_collation,
        });
    }
    let mut consistency = Vec::new();
    for (i, k) in raw.consistency.iter().enumerate() {
        let p = format!("consistency[{i}]");
        if !names.contains_key(k.sync.as_str()) {
            c.error(
                &format!("{p}.sync"),
                format!("sync `{}` is not defined under `sync`", k.sync),
            );
        }
        let sample_rate = match k.sample_rate.as_deref() {
            None => 100.0,
            Some(text) => parse_rate(text).unwrap_or_else(|| {
                c.error(
                    &format!("{p}.sample_rate"),
                    format!("`{text}` is not a rate; write e.g. `200/s` or `600/m`"),
                );
                100.0
            }),
        };
        consistency.push(ConsistencySpec {
            sync: k.sync.clone(),
            sample_rate,
            window: c.duration(
                &format!("{p}.window"),
                k.window.as_deref(),
                Duration::from_secs(300),
            ),
        });
    }
    (sync, consistency)
}

fn parse_rate(text: &str) -> Option<f64> {
    let (n, unit) = text.trim().split_once('/')?;
    let n: f64 = n
        .trim()
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n > 0.0)?;
    match unit.trim() {
        "s" => Some(n),
        "m" => Some(n / 60.0),
        _ => None,
    }
}

//! Entry points for the fuzz targets in `fuzz/` and the property tests that run the same
//! code on stable Rust: each takes arbitrary bytes, must never panic, and must finish in
//! time linear in its input. They call exactly what `check` and the proxy call.
//!
//! Not part of the product's API; kept in the library so both harnesses share it.

use std::net::IpAddr;
use std::path::Path;
use std::sync::LazyLock;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri, Version};

use crate::dataplane::admission::{self, EscapedSlashes};
use crate::dataplane::decision::Decision;
use crate::dataplane::head_guard;
use crate::dataplane::route::path_has_prefix;
use crate::dataplane::split::RequestFacts;
use crate::snapshot::RoutingSnapshot;

/// Any bytes as a config file: refused with diagnostics or accepted, never a panic.
pub fn config_loader(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = crate::config::parse_with_env(&text, Path::new("fuzz.yaml"), &|_| None);
}

/// Any bytes as a client's byte stream, cut into reads at `0xFF` bytes; also checks that
/// cutting the same stream into single bytes reaches the same verdict.
pub fn head_guard(data: &[u8]) {
    let reads: Vec<&[u8]> = data.split(|&b| b == 0xFF).collect();
    let whole: Vec<u8> = reads.concat();
    let verdict = head_guard::scan(&reads, 1024);
    let bytes: Vec<&[u8]> = whole.chunks(1).collect();
    assert_eq!(
        verdict,
        head_guard::scan(&bytes, 1024),
        "a verdict must not depend on how the stream was cut into reads"
    );
}

/// The routing used by [`route_and_split`]: host and path routes of several depths, rules
/// on headers, cookies and queries, and every split kind.
const ROUTES: &str = r#"
listen: { http: "127.0.0.1:0" }
backends:
  legacy: { endpoints: ["http://127.0.0.1:9001"] }
  target: { endpoints: ["http://127.0.0.1:9002"] }
default_backend: legacy
routes:
  - { name: root, match: { path_prefix: / , host: "*.example.test" }, legacy: legacy, target: target, split: { percentage: { weight: 50 } }, sticky: { key: client_ip } }
  - { name: shop, match: { host: shop.example.test }, legacy: legacy, target: target, split: { percentage: { weight: 10 } }, sticky: { key: "cookie:sid" } }
  - { name: users, match: { path_prefix: /api/users }, legacy: legacy, target: target, split: { percentage: { weight: 25.5 } }, sticky: { key: "header:x-user" } }
  - { name: deep, match: { path_prefix: /a/b/c/d/e/f/g/h }, legacy: legacy, target: target, split: { percentage: { weight: 100 } } }
  - name: canary
    match: { path_prefix: /api, methods: [GET, POST] }
    legacy: legacy
    target: target
    split: { canary: { rules: [ { header: { name: x-canary, value: "1" } }, { query: { name: user, value: ops@example.test } }, { cookie: { name: beta, in: [a, b] } } ], weight: 5 } }
    sticky: { key: generated }
  - name: flagged
    match: { path_prefix: /flag }
    legacy: legacy
    target: target
    split: { feature_flag: { flag: f } }
  - name: switch
    match: { path_prefix: /bg }
    legacy: legacy
    target: target
    split: { blue_green: { active: legacy, preview: { header: { name: x-preview, value: "1" } } } }
flags:
  f: { rules: [ { client_ip: 10.0.0.0/8 } ], percentage: 33 }
"#;

static SNAPSHOT: LazyLock<RoutingSnapshot> = LazyLock::new(|| {
    let config = crate::config::parse(ROUTES, Path::new("fuzz.yaml")).expect("valid fuzz config");
    RoutingSnapshot::build(
        1,
        &config,
        &crate::telemetry::metrics::Metrics::new(),
        &crate::health::HealthRegistry::default(),
        &crate::dataplane::upstream::UpstreamClients::new(&config.timeouts),
    )
});

/// Any request facts, taken from `data` split at `0xFF`: method, target, client address
/// byte, then header name/value pairs. Admission, route match and split must not panic,
/// and a matched route's prefix must hold for the normalised path routed on.
pub fn route_and_split(data: &[u8]) {
    let mut fields = data.split(|&b| b == 0xFF);
    let method = Method::from_bytes(fields.next().unwrap_or_default()).unwrap_or(Method::GET);
    let Ok(uri) = Uri::try_from(fields.next().unwrap_or_default()) else {
        return;
    };
    let ip = IpAddr::from([
        10,
        0,
        0,
        fields.next().and_then(|f| f.first().copied()).unwrap_or(1),
    ]);
    let mut headers = HeaderMap::new();
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }
    let Ok(admitted) = admission::admit(
        &method,
        &uri,
        Version::HTTP_11,
        &headers,
        EscapedSlashes::Reject,
    ) else {
        return;
    };
    let path = admitted.path.as_deref().unwrap_or(uri.path());
    // Admission leaves a path that normalises to itself.
    assert_eq!(
        admission::normalize_path(path, EscapedSlashes::Reject)
            .ok()
            .as_deref(),
        Some(path)
    );
    let facts = RequestFacts {
        method: &method,
        host: admitted.host.as_deref(),
        path,
        query: uri.query(),
        headers: &headers,
        client_ip: ip,
    };
    let decision = Decision::make(&SNAPSHOT, &facts);
    if let Some(i) = decision.route {
        let route = &SNAPSHOT.routes[i];
        assert!(path_has_prefix(path, &route.matcher.path_prefix));
    }
}

//! Route match plus split decision with 100 routes: the work the request path does per
//! request before forwarding (`Decision::make` on a loaded snapshot). Target: ≤ 200 ns.

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use switchyard::dataplane::decision::Decision;
use switchyard::dataplane::split::RequestFacts;
use switchyard::snapshot::RoutingSnapshot;
use switchyard::telemetry::Metrics;

/// 100 routes the way a migration grows them: services under `/api/…`, a few by host, a
/// few limited to methods, every kind of split, sticky keys on.
fn config_yaml() -> String {
    let mut y = String::from(
        "listen: { http: 127.0.0.1:0 }\nbackends:\n  monolith: { endpoints: [\"http://127.0.0.1:9001\"] }\n  new: { endpoints: [\"http://127.0.0.1:9002\"] }\ndefault_backend: monolith\nflags:\n  f: { percentage: 30, sticky: { key: \"cookie:session_id\" } }\nroutes:\n",
    );
    for i in 0..100 {
        let (matcher, split) = match i % 5 {
            0 => (format!("{{ path_prefix: /api/svc{i}/items }}"), "{ percentage: { weight: 20 } }".to_string()),
            1 => (format!("{{ path_prefix: /api/svc{i}, methods: [GET, POST] }}"), "{ canary: { rules: [ { header: { name: x-canary, value: \"1\" } } ], weight: 20 } }".to_string()),
            2 => (format!("{{ host: svc{i}.example.com, path_prefix: /api }}"), "{ blue_green: { active: legacy, preview: { header: { name: x-preview, value: \"1\" } } } }".to_string()),
            3 => (format!("{{ path_prefix: /api/svc{i}/v2 }}"), "{ feature_flag: { flag: f } }".to_string()),
            _ => (format!("{{ path_prefix: /api/svc{i} }}"), "{ percentage: { weight: 20 } }".to_string()),
        };
        y.push_str(&format!(
            "  - name: r{i}\n    match: {matcher}\n    legacy: monolith\n    target: new\n    split: {split}\n    sticky: {{ key: \"cookie:session_id\" }}\n"
        ));
    }
    y
}

fn bench(c: &mut Criterion) {
    let config = switchyard::config::parse(&config_yaml(), Path::new("bench.yaml"))
        .expect("valid bench config");
    let metrics = Metrics::new();
    let snapshot = RoutingSnapshot::build(
        1,
        &config,
        &metrics,
        &switchyard::health::HealthRegistry::default(),
        &switchyard::dataplane::upstream::UpstreamClients::new(&config.timeouts),
    );
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("www.example.com"));
    headers.insert("user-agent", HeaderValue::from_static("bench/1.0"));
    headers.insert("accept", HeaderValue::from_static("*/*"));
    headers.insert(
        "cookie",
        HeaderValue::from_static(
            "theme=dark; session_id=5f2c9a1e-77b0-4c1d-9d0e-3a4b5c6d7e8f; lang=en",
        ),
    );

    let mut group = c.benchmark_group("route_and_split_100_routes");
    // The last route in matching order among the path routes: the worst case of the scan.
    for (label, path) in [
        ("late_route", "/api/svc99/orders/42"),
        ("early_route", "/api/svc0/items/42"),
        ("no_route", "/static/app.js"),
    ] {
        group.bench_function(label, |b| {
            b.iter(|| {
                let facts = RequestFacts {
                    method: &Method::GET,
                    host: Some("www.example.com"),
                    path: black_box(path),
                    query: None,
                    headers: &headers,
                    client_ip: [10, 0, 0, 1].into(),
                };
                black_box(Decision::make(black_box(&snapshot), &facts))
            })
        });
    }
    // The parts, so a regression can be traced to one of them.
    group.bench_function("bucket_only", |b| {
        b.iter(|| {
            black_box(switchyard::dataplane::split::Bucket::of(
                black_box("r99"),
                black_box(b"5f2c9a1e-77b0-4c1d-9d0e-3a4b5c6d7e8f"),
            ))
        })
    });
    group.bench_function("cookie_only", |b| {
        b.iter(|| {
            black_box(switchyard::dataplane::split::cookie_value(
                black_box(&headers),
                black_box("session_id"),
            ))
        })
    });
    group.bench_function("find_only", |b| {
        b.iter(|| {
            let facts = RequestFacts {
                method: &Method::GET,
                host: Some("www.example.com"),
                path: black_box("/api/svc99/orders/42"),
                query: None,
                headers: &headers,
                client_ip: [10, 0, 0, 1].into(),
            };
            black_box(snapshot.find_route(&facts))
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

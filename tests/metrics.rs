//! Metrics as the ecosystem's own tools read them: a real Prometheus server scrapes
//! switchyard under a load of known latencies, and `promtool check metrics` reads a scrape
//! taken after a run that touches every family.

mod support;

use std::time::{Duration, Instant};

use support::db::{Kind, TestDb};
use support::prometheus::{self, Prometheus};
use support::*;

/// Bucket bounds of `switchyard_request_duration_seconds`, as its `le` labels read.
fn bucket_bounds(scrape: &str) -> Vec<f64> {
    let mut bounds: Vec<f64> = scrape
        .lines()
        .filter(|l| l.starts_with("switchyard_request_duration_seconds_bucket{"))
        .filter_map(|l| l.split("le=\"").nth(1)?.split('"').next()?.parse().ok())
        .filter(|b: &f64| b.is_finite())
        .collect();
    bounds.sort_by(f64::total_cmp);
    bounds.dedup();
    bounds
}

/// Nearest-rank quantile of the latencies the client measured itself.
fn nearest_rank(samples: &mut [f64], q: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    let rank = ((q * samples.len() as f64).ceil() as usize).max(1);
    samples[rank - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_sees_the_latencies_and_the_requests_the_test_sent() {
    let Some(server) = prometheus::binary_or_skip("prometheus") else {
        return;
    };
    let legacy = Backend::start("legacy").await;
    let proxy = Switchyard::start(&format!(
        "backends:\n  legacy: {{ endpoints: [\"{}\"] }}\ndefault_backend: legacy\n\
routes:\n  - name: timed\n    match: {{ path_prefix: /__sleep }}\n    legacy: legacy\n    target: legacy\n    split: {{ percentage: {{ weight: 0 }} }}\n",
        legacy.url()
    ));
    let prom = Prometheus::start(&server, proxy.admin, Duration::from_millis(500));
    prom.ready().await;

    // One request first, so the counter's series exists in Prometheus before the load and
    // `increase` sees the whole load as an increase.
    let (status, _, _) = get(&proxy.url("/__sleep/1"), &[]).await;
    assert_eq!(status, 200);
    let sent_before = 1.0;
    let counted = r#"sum(switchyard_requests_total{route="timed",side="legacy",code="200"})"#;
    eventually(Duration::from_secs(30), "first scrape", || async {
        prom.scalar(counted).await == Some(sent_before)
    })
    .await;
    let load_started = Instant::now();

    // 196 fast requests and 4 slow ones: the true p99 is a slow one, far inside its bucket.
    let mut paths = vec!["/__sleep/20"; 196];
    paths.extend(["/__sleep/300"; 4]);
    let mut latencies = vec![];
    let client = client();
    for batch in paths.chunks(20) {
        let mut tasks = vec![];
        for path in batch {
            let url = proxy.url(path);
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let started = Instant::now();
                let (status, _, _) = request(&client, "GET", &url, &[]).await;
                assert_eq!(status, 200);
                started.elapsed().as_secs_f64()
            }));
        }
        for t in tasks {
            latencies.push(t.await.unwrap());
        }
    }
    let sent = paths.len() as f64;
    // The first request also counts in the histogram; the client measured it too.
    latencies.push(0.001);
    let true_p99 = nearest_rank(&mut latencies, 0.99);

    eventually(Duration::from_secs(30), "the load scraped", || async {
        prom.scalar(counted).await == Some(sent_before + sent)
    })
    .await;

    // p99 as a user computes it lands in the bucket that holds the true p99.
    let bounds = bucket_bounds(&proxy.metrics().await);
    let upper = *bounds.iter().find(|&&b| true_p99 <= b).unwrap();
    let lower = bounds
        .iter()
        .rev()
        .find(|&&b| b < true_p99)
        .copied()
        .unwrap_or(0.0);
    let p99 = prom
        .scalar(r#"histogram_quantile(0.99, sum by (le) (switchyard_request_duration_seconds_bucket{route="timed"}))"#)
        .await
        .expect("a p99");
    assert!(
        lower <= p99 && p99 <= upper,
        "Prometheus p99 {p99}s is outside ({lower}, {upper}], the bucket of the true p99 {true_p99}s"
    );
    // `+Inf` and `_count` agree, as Prometheus reads them.
    let inf = prom
        .scalar(r#"sum(switchyard_request_duration_seconds_bucket{route="timed",le="+Inf"})"#)
        .await;
    let count = prom
        .scalar(r#"sum(switchyard_request_duration_seconds_count{route="timed"})"#)
        .await;
    assert_eq!(inf, Some(sent_before + sent));
    assert_eq!(count, Some(sent_before + sent));

    // The rate a user graphs, times its window, is the load sent. Prometheus extrapolates a
    // range to its bounds by at most one scrape interval on each side, so the figure may
    // exceed the load by that share and no more.
    let window = load_started.elapsed().as_secs() + 5;
    let rate = prom
        .scalar(&format!(
            r#"sum(rate(switchyard_requests_total{{route="timed"}}[{window}s]))"#
        ))
        .await
        .expect("a rate");
    let increase = rate * window as f64;
    let slack = sent * (window as f64 / (window as f64 - 1.0) - 1.0) + 0.5;
    assert!(
        (increase - sent).abs() <= slack,
        "rate × window = {increase}, but the test sent {sent} (allowed ±{slack})"
    );
}

const USERS: &str = "CREATE TABLE users (id BIGINT PRIMARY KEY, name VARCHAR(100))";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_a_scrape_that_touches_every_family() {
    let Some(promtool) = prometheus::binary_or_skip("promtool") else {
        return;
    };
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let src = TestDb::new(Kind::Pg).await;
    let dst = TestDb::new(Kind::Pg).await;
    src.exec(USERS).await;
    dst.exec(USERS).await;
    src.exec("INSERT INTO users SELECT g, 'user ' || g FROM generate_series(1, 50) g")
        .await;
    let (_dir, path) = write_config(&format!(
        "backends:\n  legacy: {{ endpoints: [\"{}\"] }}\n  target: {{ endpoints: [\"{}\"], health: {{ path: /healthz, interval: 100ms }} }}\n\
default_backend: legacy\n\
routes:\n  - name: users\n    match: {{ path_prefix: /__status }}\n    legacy: legacy\n    target: target\n    split: {{ percentage: {{ weight: 100 }} }}\n    failover: {{ methods: [GET], budget: 1, on_5xx: true }}\n    rollout:\n      steps: [50, 100]\n      bake: 1h\n      gates: {{ max_error_rate: 0.5, max_sync_lag: 10s, min_consistency: 0.5 }}\n      webhooks: [ {{ url: \"http://user:secret@127.0.0.1:1/gate?token=secret\", on: [step] }} ]\n\
sync:\n  - name: users\n    routes: [users]\n    source: {{ url: \"{}\", table: users, key: [id] }}\n    target: {{ url: \"{}\", table: users, key: [id] }}\n\
consistency:\n  - {{ sync: users, sample_rate: 500/s, window: 1m }}\n",
        legacy.url(),
        target.url(),
        src.url(),
        dst.url()
    ));
    sync_install(&path);
    let proxy = Switchyard::start_file(&path);
    eventually(Duration::from_secs(30), "backfill done", || async {
        dst.count("users").await == 50
    })
    .await;
    // A change streamed after the backfill.
    src.exec("INSERT INTO users VALUES (51, 'late')").await;
    eventually(Duration::from_secs(30), "change streamed", || async {
        dst.count("users").await == 51
    })
    .await;
    // Requests on the route and on the default backend; a target 500 fails over.
    for path in ["/__status/200", "/__status/500", "/elsewhere"] {
        let _ = get(&proxy.url(path), &[]).await;
    }
    let (status, body) = admin_call(&proxy, "POST", "/v1/rollouts/users/start", "").await;
    assert_eq!(status, 200, "{body}");
    // A reload with a broken file counts a failure.
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, "routes: [").unwrap();
    // The file watcher sees the change; no SIGHUP, so the count is not doubled.
    eventually(Duration::from_secs(10), "failed reload counted", || async {
        proxy
            .metric(r#"switchyard_config_reloads_total{result="failure"}"#)
            .await
            .is_some_and(|n| n >= 1.0)
    })
    .await;
    std::fs::write(&path, text).unwrap();

    let families = [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "switchyard_build_info{",
        "switchyard_requests_total{",
        "switchyard_request_duration_seconds_bucket{",
        "switchyard_route_weight{",
        "switchyard_failovers_total{route=\"users\"} 1",
        "switchyard_rollout_step{route=\"users\"} 1",
        "switchyard_rollout_phase{route=\"users\",phase=\"progressing\"} 1",
        "switchyard_rollout_phase{route=\"users\",phase=\"idle\"} 0",
        "switchyard_rollout_gate_ratio{",
        "switchyard_rollout_gate_seconds{",
        "switchyard_rollout_gate_passing{",
        "switchyard_endpoint_up{backend=\"target\",endpoint=\"",
        "switchyard_sync_lag_seconds{",
        "switchyard_sync_changes_total{",
        "switchyard_sync_backfill_copied_rows{sync=\"users\"} 50",
        "switchyard_sync_backfill_source_rows{sync=\"users\"} 50",
        "switchyard_consistency_ratio{",
        "switchyard_config_reloads_total{result=\"failure\"}",
        "switchyard_tls_reloads_total{",
        "switchyard_access_log_dropped_lines_total",
    ];
    let deadline = Instant::now() + Duration::from_secs(30);
    let scrape = loop {
        let scrape = proxy.metrics().await;
        let missing: Vec<_> = families.iter().filter(|f| !scrape.contains(*f)).collect();
        if missing.is_empty() {
            break scrape;
        }
        assert!(
            Instant::now() < deadline,
            "missing {missing:?} in\n{scrape}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    if let Err(report) = prometheus::check_metrics(&promtool, &scrape) {
        panic!("promtool check metrics:\n{report}\non\n{scrape}");
    }
    // No label value carries a URL or its secrets.
    for line in scrape.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            !line.contains("secret") && !line.contains("://"),
            "a label value leaks a URL: {line}"
        );
    }
}

//! Rule-driven splits and route matching, end to end: canary rules (header, cookie, query,
//! client IP, conditions combined), blue-green with preview and switching by file change and
//! by SIGHUP, feature flags (rules, percentage, the flag's own sticky bucket), and which route
//! a request belongs to (host, longest prefix by whole segments, methods, headers, default
//! backend) with round robin over a backend's endpoints.

mod support;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use support::*;
use xxhash_rust::xxh3::xxh3_64;

/// The README's bucket formula, computed independently of the crate.
fn bucket(name: &str, key: &str) -> u64 {
    xxh3_64(format!("{name}:{key}").as_bytes()) % 10_000
}

/// A client whose connections leave from `ip` (any 127.0.0.0/8 address works on loopback).
fn client_from(ip: IpAddr) -> Client<HttpConnector, BoxBody> {
    let mut connector = HttpConnector::new();
    connector.set_local_address(Some(ip));
    Client::builder(TokioExecutor::new()).build(connector)
}

/// Which backend answered a GET of `path` with `headers`.
async fn side(proxy: &Switchyard, path: &str, headers: &[(&str, &str)]) -> String {
    side_via(&client(), proxy, "GET", path, headers).await
}

async fn side_via(
    client: &Client<HttpConnector, BoxBody>,
    proxy: &Switchyard,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> String {
    let (status, h, body) = request(client, method, &proxy.url(path), headers).await;
    assert_eq!(status, 200, "{method} {path} {headers:?}: {body}");
    backend_of(&h)
        .unwrap_or_else(|| panic!("{method} {path}: no x-backend"))
        .to_string()
}

/// Asserts that `n` requests of `path` with `headers` all reach `want`.
async fn all_reach(proxy: &Switchyard, n: usize, path: &str, headers: &[(&str, &str)], want: &str) {
    let client = client();
    for i in 0..n {
        let got = side_via(&client, proxy, "GET", path, headers).await;
        assert_eq!(got, want, "request {i} of {path} with {headers:?}");
    }
}

fn two_backends(legacy: &Backend, target: &Backend) -> String {
    format!(
        "backends:\n  legacy: {{ endpoints: [\"{}\"] }}\n  target: {{ endpoints: [\"{}\"] }}\ndefault_backend: legacy\n",
        legacy.url(),
        target.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_rules_send_only_matching_requests_to_target() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&format!(
        r#"{}routes:
  - name: orders
    match: {{ path_prefix: /api/orders }}
    legacy: legacy
    target: target
    split:
      canary:
        rules:
          - header: {{ name: x-canary, value: "1" }}
          - cookie: {{ name: beta, in: [yes, "1"] }}
          - query: {{ name: preview, present: true }}
          - client_ip: [ 10.0.0.0/8 ]
          - {{ header: {{ name: x-tier, value: gold }}, query: {{ name: region, value: eu }} }}
        weight: 0
  - name: loopback
    match: {{ path_prefix: /api/loopback }}
    legacy: legacy
    target: target
    split:
      canary: {{ rules: [ {{ client_ip: 127.0.0.0/8 }} ], weight: 0 }}
  - name: one-address
    match: {{ path_prefix: /api/one }}
    legacy: legacy
    target: target
    split:
      canary: {{ rules: [ {{ client_ip: 127.0.0.2 }} ], weight: 0 }}
"#,
        two_backends(&legacy, &target)
    ));

    // Nothing matches (the 10.0.0.0/8 rule does not take loopback): weight 0 means legacy.
    all_reach(&proxy, 50, "/api/orders/1", &[], "legacy").await;

    let to_target: &[(&str, &[(&str, &str)])] = &[
        ("/api/orders/1", &[("x-canary", "1")]),
        ("/api/orders/1", &[("cookie", "beta=yes")]),
        ("/api/orders/1", &[("cookie", "theme=dark; beta=1")]),
        ("/api/orders/1?preview", &[]),
        ("/api/orders/1?x=2&preview=0", &[]),
        ("/api/orders/1?region=eu", &[("x-tier", "gold")]),
    ];
    for (path, headers) in to_target {
        all_reach(&proxy, 5, path, headers, "target").await;
    }
    let to_legacy: &[(&str, &[(&str, &str)])] = &[
        ("/api/orders/1", &[("x-canary", "0")]),
        ("/api/orders/1", &[("x-canary", "11")]),
        ("/api/orders/1", &[("cookie", "beta=no")]),
        ("/api/orders/1", &[("cookie", "notbeta=yes")]),
        ("/api/orders/1?previewx=1", &[]),
        ("/api/orders/1?x=preview", &[]),
        // A rule with two conditions needs both.
        ("/api/orders/1", &[("x-tier", "gold")]),
        ("/api/orders/1?region=eu", &[]),
        ("/api/orders/1?region=eu", &[("x-tier", "silver")]),
        ("/api/orders/1?region=us", &[("x-tier", "gold")]),
    ];
    for (path, headers) in to_legacy {
        all_reach(&proxy, 5, path, headers, "legacy").await;
    }

    // 127.0.0.0/8 takes every loopback client.
    all_reach(&proxy, 20, "/api/loopback", &[], "target").await;

    // A single address matches only that address.
    for (from, want) in [
        ("127.0.0.2", "target"),
        ("127.0.0.1", "legacy"),
        ("127.0.0.3", "legacy"),
    ] {
        let client = client_from(from.parse().unwrap());
        for _ in 0..5 {
            assert_eq!(
                side_via(&client, &proxy, "GET", "/api/one", &[]).await,
                want,
                "from {from}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_rules_override_the_sticky_weight() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&format!(
        r#"{}routes:
  - name: orders
    match: {{ path_prefix: /api/orders }}
    legacy: legacy
    target: target
    split:
      canary: {{ rules: [ {{ header: {{ name: x-canary, value: "1" }} }} ], weight: 50 }}
    sticky: {{ key: "header:x-user-id" }}
"#,
        two_backends(&legacy, &target)
    ));
    let users: Vec<String> = (0..100).map(|i| format!("user-{i}")).collect();
    let (on_legacy, on_target): (Vec<&String>, Vec<&String>) =
        users.iter().partition(|u| bucket("orders", u) >= 5000);
    assert!(!on_legacy.is_empty() && !on_target.is_empty());
    for user in on_legacy {
        assert_eq!(
            side(&proxy, "/api/orders", &[("x-user-id", user)]).await,
            "legacy",
            "{user} without the canary header"
        );
        assert_eq!(
            side(
                &proxy,
                "/api/orders",
                &[("x-user-id", user), ("x-canary", "1")]
            )
            .await,
            "target",
            "{user} with the canary header"
        );
    }
    for user in on_target {
        assert_eq!(
            side(&proxy, "/api/orders", &[("x-user-id", user)]).await,
            "target",
            "{user} by weight"
        );
    }
}

fn blue_green_config(legacy: &Backend, target: &Backend, active: &str) -> String {
    with_listeners(&format!(
        r#"{}routes:
  - name: checkout
    match: {{ path_prefix: /checkout }}
    legacy: legacy
    target: target
    split:
      blue_green: {{ active: {active}, preview: {{ header: {{ name: x-preview, value: "1" }} }} }}
"#,
        two_backends(legacy, target)
    ))
}

/// Everyone reaches `active`; the preview header reaches `inactive`.
async fn blue_green_serves(proxy: &Switchyard, active: &str, inactive: &str) {
    all_reach(proxy, 30, "/checkout/cart", &[], active).await;
    all_reach(proxy, 5, "/checkout/cart", &[("x-preview", "1")], inactive).await;
    all_reach(proxy, 5, "/checkout/cart", &[("x-preview", "0")], active).await;
}

async fn wait_for_side(proxy: &Switchyard, path: &str, want: &str, why: &str) {
    eventually(Duration::from_secs(10), why, || async move {
        side(proxy, path, &[]).await == want
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_switches_everyone_when_the_file_changes() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&blue_green_config(&legacy, &target, "legacy"));
    blue_green_serves(&proxy, "legacy", "target").await;

    std::fs::write(
        &proxy.config_path,
        blue_green_config(&legacy, &target, "target"),
    )
    .unwrap();
    wait_for_side(
        &proxy,
        "/checkout/cart",
        "target",
        "active: target after the file changed",
    )
    .await;
    blue_green_serves(&proxy, "target", "legacy").await;

    std::fs::write(
        &proxy.config_path,
        blue_green_config(&legacy, &target, "legacy"),
    )
    .unwrap();
    wait_for_side(
        &proxy,
        "/checkout/cart",
        "legacy",
        "active: legacy after the file changed back",
    )
    .await;
    blue_green_serves(&proxy, "legacy", "target").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blue_green_switches_everyone_on_sighup() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let config = HupOnlyConfig::new(&blue_green_config(&legacy, &target, "legacy"));
    let real = config.real.as_path();
    let proxy = Switchyard::start_file(&config.link);
    blue_green_serves(&proxy, "legacy", "target").await;

    for (active, inactive) in [("target", "legacy"), ("legacy", "target")] {
        let before = successful_reloads(&proxy).await;
        write_then_hup(&proxy, real, &blue_green_config(&legacy, &target, active));
        wait_for_side(
            &proxy,
            "/checkout/cart",
            active,
            &format!("active: {active} after SIGHUP"),
        )
        .await;
        blue_green_serves(&proxy, active, inactive).await;
        let proxy = &proxy;
        eventually(
            Duration::from_secs(5),
            "one successful reload per SIGHUP",
            || async move { successful_reloads(proxy).await == before + 1.0 },
        )
        .await;
    }
}

async fn successful_reloads(proxy: &Switchyard) -> f64 {
    proxy
        .metric("switchyard_config_reloads_total{result=\"success\"}")
        .await
        .unwrap_or(0.0)
}

fn write_then_hup(proxy: &Switchyard, file: &Path, text: &str) {
    std::fs::write(file, text).unwrap();
    proxy.signal("HUP");
}

fn flag_config(legacy: &Backend, target: &Backend, flag: &str, route_sticky: &str) -> String {
    format!(
        r#"{}routes:
  - name: users
    match: {{ path_prefix: /api/users }}
    legacy: legacy
    target: target
    split: {{ feature_flag: {{ flag: new-api }} }}
{route_sticky}flags:
  new-api:
{flag}"#,
        two_backends(legacy, target)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feature_flag_rules_force_it_on_then_percentage_decides() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let rules = "    rules: [ { header: { name: x-tenant, in: [acme, globex] } } ]\n";

    let proxy = Switchyard::start(&flag_config(
        &legacy,
        &target,
        &format!("{rules}    percentage: 0\n"),
        "",
    ));
    all_reach(&proxy, 5, "/api/users/1", &[("x-tenant", "acme")], "target").await;
    all_reach(
        &proxy,
        5,
        "/api/users/1",
        &[("x-tenant", "globex")],
        "target",
    )
    .await;
    all_reach(
        &proxy,
        5,
        "/api/users/1",
        &[("x-tenant", "initech")],
        "legacy",
    )
    .await;
    all_reach(&proxy, 50, "/api/users/1", &[], "legacy").await;
    drop(proxy);

    let proxy = Switchyard::start(&flag_config(
        &legacy,
        &target,
        &format!("{rules}    percentage: 100\n"),
        "",
    ));
    all_reach(&proxy, 50, "/api/users/1", &[], "target").await;
    all_reach(
        &proxy,
        5,
        "/api/users/1",
        &[("x-tenant", "initech")],
        "target",
    )
    .await;
    all_reach(&proxy, 5, "/api/users/1", &[("x-tenant", "acme")], "target").await;
}

/// Each user's side at flag percentage 30 is the flag's bucket, not the route's.
async fn flag_buckets_decide(proxy: &Switchyard, extra: &[(&str, &str)]) {
    let users: Vec<String> = (0..300).map(|i| format!("user-{i}")).collect();
    let flag_side = |u: &str| {
        if bucket("new-api", u) < 3000 {
            "target"
        } else {
            "legacy"
        }
    };
    let route_side = |u: &str| {
        if bucket("users", u) < 3000 {
            "target"
        } else {
            "legacy"
        }
    };
    let on_target = users.iter().filter(|u| flag_side(u) == "target").count();
    assert!(
        (50..=250).contains(&on_target),
        "users do not spread: {on_target}"
    );
    // Only users on whom the two names disagree tell the flag's bucket from the route's.
    let telling = users
        .iter()
        .filter(|u| flag_side(u) != route_side(u))
        .count();
    assert!(telling >= 30, "only {telling} users tell the names apart");

    let client = client();
    let mut wrong = Vec::new();
    for user in &users {
        let mut headers = vec![("x-user-id", user.as_str())];
        headers.extend_from_slice(extra);
        let got = side_via(&client, proxy, "GET", "/api/users/1", &headers).await;
        if got != flag_side(user) {
            wrong.push(format!(
                "{user}: got {got}, flag bucket {} says {}, route bucket {}",
                bucket("new-api", user),
                flag_side(user),
                bucket("users", user)
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} users off the flag's bucket, e.g. {:?}",
        wrong.len(),
        users.len(),
        &wrong[..wrong.len().min(10)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feature_flag_sticky_key_hashes_the_flag_name() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    // The flag's key wins over the route's: every request carries the same session cookie,
    // which would put everyone on one side if the route's key were used.
    let proxy = Switchyard::start(&flag_config(
        &legacy,
        &target,
        "    percentage: 30\n    sticky: { key: \"header:x-user-id\" }\n",
        "    sticky: { key: \"cookie:session_id\" }\n",
    ));
    flag_buckets_decide(&proxy, &[("cookie", "session_id=everyone-the-same")]).await;
    drop(proxy);

    // Without a key of its own the flag uses the route's key, still under the flag's name.
    let proxy = Switchyard::start(&flag_config(
        &legacy,
        &target,
        "    percentage: 30\n",
        "    sticky: { key: \"header:x-user-id\" }\n",
    ));
    flag_buckets_decide(&proxy, &[]).await;
}

/// Method, path, extra headers, and the backend that must answer.
type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_go_to_the_most_specific_route() {
    let names = [
        "default", "api", "users", "admin", "orders", "writes", "reports", "internal", "shop",
        "wild",
    ];
    let mut backends = Vec::new();
    for name in names {
        backends.push(Backend::start(name).await);
    }
    let pool_a = Backend::start("pool-a").await;
    let pool_b = Backend::start("pool-b").await;
    let mut yaml = String::from("backends:\n");
    for b in &backends {
        yaml.push_str(&format!(
            "  {}: {{ endpoints: [\"{}\"] }}\n",
            b.name,
            b.url()
        ));
    }
    yaml.push_str(&format!(
        "  pool: {{ endpoints: [\"{}\", \"{}\"] }}\n",
        pool_a.url(),
        pool_b.url()
    ));
    yaml.push_str("default_backend: default\nroutes:\n");
    // Less specific routes come first in the file, so file order cannot be what wins.
    for (name, matcher) in [
        ("api", "{ path_prefix: /api }"),
        ("users", "{ path_prefix: /api/users }"),
        ("admin", "{ path_prefix: /api/users/admin }"),
        ("orders", "{ path_prefix: /api/orders }"),
        (
            "writes",
            "{ path_prefix: /api/orders, methods: [POST, PUT] }",
        ),
        ("reports", "{ path_prefix: /api/reports }"),
        (
            "internal",
            "{ path_prefix: /api/reports, headers: [ { name: x-internal, in: [yes, \"true\"] } ] }",
        ),
        ("wild", "{ host: \"*.example.com\", path_prefix: /api }"),
        ("shop", "{ host: shop.example.com, path_prefix: / }"),
        ("pool", "{ path_prefix: /pool }"),
    ] {
        yaml.push_str(&format!(
            "  - name: {name}\n    match: {matcher}\n    legacy: {name}\n    target: {name}\n    split: {{ percentage: {{ weight: 0 }} }}\n"
        ));
    }
    let proxy = Switchyard::start(&yaml);
    let client = client();

    let cases: &[Case] = &[
        // Longest prefix, whole segments.
        ("GET", "/api", &[], "api"),
        ("GET", "/api/", &[], "api"),
        ("GET", "/api/things/1", &[], "api"),
        ("GET", "/api/users", &[], "users"),
        ("GET", "/api/users/7", &[], "users"),
        ("GET", "/api/users?page=2", &[], "users"),
        ("GET", "/api/usersettings", &[], "api"),
        ("GET", "/api/users/admin", &[], "admin"),
        ("GET", "/api/users/admin/roles", &[], "admin"),
        ("GET", "/api/users/administrators", &[], "users"),
        // Methods.
        ("GET", "/api/orders/1", &[], "orders"),
        ("POST", "/api/orders", &[], "writes"),
        ("PUT", "/api/orders/1", &[], "writes"),
        ("DELETE", "/api/orders/1", &[], "orders"),
        // Header conditions.
        ("GET", "/api/reports/q1", &[], "reports"),
        (
            "GET",
            "/api/reports/q1",
            &[("x-internal", "yes")],
            "internal",
        ),
        (
            "GET",
            "/api/reports/q1",
            &[("x-internal", "true")],
            "internal",
        ),
        ("GET", "/api/reports/q1", &[("x-internal", "no")], "reports"),
        // Hosts: exact over wildcard over none, case and port ignored.
        (
            "GET",
            "/api/users/7",
            &[("host", "shop.example.com")],
            "shop",
        ),
        ("GET", "/anything", &[("host", "shop.example.com")], "shop"),
        ("GET", "/", &[("host", "Shop.Example.COM:8080")], "shop"),
        ("GET", "/api/users/7", &[("host", "a.example.com")], "wild"),
        ("GET", "/api", &[("host", "a.b.example.com")], "wild"),
        ("GET", "/api/x", &[("host", "A.EXAMPLE.com:443")], "wild"),
        ("GET", "/other", &[("host", "a.example.com")], "default"),
        ("GET", "/api/users/7", &[("host", "example.com")], "users"),
        (
            "GET",
            "/api/users/7",
            &[("host", "notexample.com")],
            "users",
        ),
        (
            "GET",
            "/api/users/7",
            &[("host", "shop.example.com.evil")],
            "users",
        ),
        // No route: the default backend.
        ("GET", "/", &[], "default"),
        ("GET", "/other", &[], "default"),
        ("GET", "/apix", &[], "default"),
        ("GET", "/pooling", &[], "default"),
        ("POST", "/other/api", &[], "default"),
    ];
    for (method, path, headers, want) in cases {
        let got = side_via(&client, &proxy, method, path, headers).await;
        assert_eq!(&got, want, "{method} {path} {headers:?}");
    }

    // A backend with two endpoints: round robin.
    let mut seen: HashMap<String, usize> = HashMap::new();
    for _ in 0..100 {
        *seen
            .entry(side_via(&client, &proxy, "GET", "/pool/x", &[]).await)
            .or_default() += 1;
    }
    let a = seen.get("pool-a").copied().unwrap_or(0);
    let b = seen.get("pool-b").copied().unwrap_or(0);
    assert_eq!(a + b, 100, "{seen:?}");
    assert!((40..=60).contains(&a), "round robin uneven: {seen:?}");
    assert_eq!(
        (pool_a.requests(), pool_b.requests()),
        (a as u64, b as u64),
        "the endpoints themselves received the requests"
    );
}

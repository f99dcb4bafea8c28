//! Sticky buckets, end to end: the side a key gets is the README's formula
//! (`xxh3_64(NAME ":" KEY) % 10000 < weight × 100`), the same from every process and after a
//! restart, monotonic when a weight is ramped by reload, and per key kind (`cookie:`,
//! `header:`, `client_ip`, `generated`); requests without a key are split at random.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
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

/// The side the formula gives for `key` at a weight of `basis_points` (percent × 100).
fn expected_side(name: &str, key: &str, basis_points: u64) -> &'static str {
    if bucket(name, key) < basis_points {
        "target"
    } else {
        "legacy"
    }
}

/// A weight in the config's notation (percent with two decimals) from basis points.
fn weight_text(basis_points: u64) -> String {
    format!("{}.{:02}", basis_points / 100, basis_points % 100)
}

fn count(sides: &[impl AsRef<str>], side: &str) -> usize {
    sides.iter().filter(|s| s.as_ref() == side).count()
}

/// A client whose connections leave from `ip` (any 127.0.0.0/8 address works on loopback).
fn client_from(ip: IpAddr) -> Client<HttpConnector, BoxBody> {
    let mut connector = HttpConnector::new();
    connector.set_local_address(Some(ip));
    Client::builder(TokioExecutor::new()).build(connector)
}

/// For each key, which backend answered a request carrying header `header: value(key)`.
async fn side_of_each(
    proxy: &Switchyard,
    keys: &[String],
    header: &str,
    value: impl Fn(&str) -> String,
) -> Vec<String> {
    let client = client();
    let url = proxy.url("/api/users/1");
    let mut sides = Vec::with_capacity(keys.len());
    for key in keys {
        let v = value(key);
        let (status, headers, _) = request(&client, "GET", &url, &[(header, &v)]).await;
        assert_eq!(status, 200, "key {key}");
        sides.push(backend_of(&headers).expect("x-backend").to_string());
    }
    sides
}

/// Panics listing the keys whose observed side differs from the expected one.
fn assert_same_sides(what: &str, keys: &[String], got: &[String], want: &[impl AsRef<str>]) {
    assert_eq!(got.len(), want.len());
    let wrong: Vec<String> = keys
        .iter()
        .zip(got.iter().zip(want))
        .filter(|(_, (g, w))| g.as_str() != w.as_ref())
        .map(|(k, (g, w))| format!("{k}: got {g}, expected {}", w.as_ref()))
        .collect();
    assert!(
        wrong.is_empty(),
        "{what}: {} of {} keys differ, e.g. {:?}",
        wrong.len(),
        keys.len(),
        &wrong[..wrong.len().min(10)]
    );
}

fn sticky_config(legacy: &Backend, target: &Backend, basis_points: u64, sticky: &str) -> String {
    two_sided_config(
        legacy,
        target,
        &format!(
            "{{ percentage: {{ weight: {} }} }}",
            weight_text(basis_points)
        ),
        Some(sticky),
    )
}

/// Same side per key from two processes, from a restarted one, and equal to the formula.
async fn same_side_everywhere(sticky: &str, header: &str, value: fn(&str) -> String) {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let basis_points = 3750;
    let (_dir, path) = write_config(&sticky_config(&legacy, &target, basis_points, sticky));

    let keys: Vec<String> = (0..300).map(|i| format!("user-{i}")).collect();
    let expected: Vec<&str> = keys
        .iter()
        .map(|k| expected_side("users", k, basis_points))
        .collect();
    // "Same side twice" proves nothing unless the keys really spread over both sides.
    assert!(
        count(&expected, "target") >= 60 && count(&expected, "legacy") >= 60,
        "the keys do not spread over both sides: {} to target",
        count(&expected, "target")
    );

    let a = Switchyard::start_file(&path);
    let b = Switchyard::start_file(&path);
    let from_a = side_of_each(&a, &keys, header, value).await;
    let from_b = side_of_each(&b, &keys, header, value).await;
    drop(a);
    let restarted = Switchyard::start_file(&path);
    let from_restarted = side_of_each(&restarted, &keys, header, value).await;

    assert_same_sides(
        &format!("{sticky}: process A vs formula"),
        &keys,
        &from_a,
        &expected,
    );
    assert_same_sides(
        &format!("{sticky}: process B vs A"),
        &keys,
        &from_b,
        &from_a,
    );
    assert_same_sides(
        &format!("{sticky}: restarted process vs A"),
        &keys,
        &from_restarted,
        &from_a,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_key_gets_the_same_side_from_every_process_and_after_restart() {
    same_side_everywhere("{ key: \"cookie:session_id\" }", "cookie", |k| {
        format!("theme=dark; session_id={k}")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_key_gets_the_same_side_from_every_process_and_after_restart() {
    same_side_everywhere("{ key: \"header:x-user-id\" }", "x-user-id", str::to_string).await;
}

/// Rewrites the config with a new weight, sends SIGHUP and waits until the gauge shows it.
async fn reweigh(
    proxy: &Switchyard,
    legacy: &Backend,
    target: &Backend,
    basis_points: u64,
    sticky: &str,
) {
    std::fs::write(
        &proxy.config_path,
        with_listeners(&sticky_config(legacy, target, basis_points, sticky)),
    )
    .unwrap();
    proxy.signal("HUP");
    let want = basis_points as f64 / 100.0;
    eventually(
        Duration::from_secs(10),
        &format!("switchyard_route_weight{{route=\"users\"}} to show {want}"),
        || async move {
            proxy
                .metric("switchyard_route_weight{route=\"users\"}")
                .await
                == Some(want)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ramping_the_weight_only_adds_keys_to_target_and_lowering_only_removes_them() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let sticky = "{ key: \"cookie:session_id\" }";
    let proxy = Switchyard::start(&sticky_config(&legacy, &target, 2000, sticky));
    assert_eq!(
        proxy
            .metric("switchyard_route_weight{route=\"users\"}")
            .await,
        Some(20.0)
    );
    let keys: Vec<String> = (0..1000).map(|i| format!("ramp-{i}")).collect();
    let cookie = |k: &str| format!("session_id={k}");
    let on_target = |sides: &[String]| -> BTreeSet<String> {
        keys.iter()
            .zip(sides)
            .filter(|(_, s)| s.as_str() == "target")
            .map(|(k, _)| k.clone())
            .collect()
    };

    let at_20 = side_of_each(&proxy, &keys, "cookie", cookie).await;
    let formula_20: Vec<&str> = keys
        .iter()
        .map(|k| expected_side("users", k, 2000))
        .collect();
    assert_same_sides("weight 20 vs formula", &keys, &at_20, &formula_20);
    let target_20 = on_target(&at_20);

    reweigh(&proxy, &legacy, &target, 5000, sticky).await;
    let at_50 = side_of_each(&proxy, &keys, "cookie", cookie).await;
    let formula_50: Vec<&str> = keys
        .iter()
        .map(|k| expected_side("users", k, 5000))
        .collect();
    assert_same_sides("weight 50 vs formula", &keys, &at_50, &formula_50);
    let target_50 = on_target(&at_50);
    let left: Vec<&String> = target_20.difference(&target_50).collect();
    assert!(
        left.is_empty(),
        "raising 20→50 moved keys off target: {left:?}"
    );
    assert!(
        target_50.len() >= target_20.len() + 200,
        "target share did not grow enough: {} keys at 20, {} at 50",
        target_20.len(),
        target_50.len()
    );

    reweigh(&proxy, &legacy, &target, 2000, sticky).await;
    let back_at_20 = side_of_each(&proxy, &keys, "cookie", cookie).await;
    let moved_to_target: Vec<&String> = keys
        .iter()
        .zip(at_50.iter().zip(&back_at_20))
        .filter(|(_, (at50, now))| at50.as_str() == "legacy" && now.as_str() != "legacy")
        .map(|(k, _)| k)
        .collect();
    assert!(
        moved_to_target.is_empty(),
        "lowering 50→20 moved legacy keys to target: {moved_to_target:?}"
    );
    assert_eq!(
        on_target(&back_at_20),
        target_20,
        "back at weight 20, target holds exactly the keys it held at 20 before"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ip_key_is_the_textual_address() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let sticky = "{ key: client_ip }";
    let b = bucket("users", "127.0.0.1");

    // Weights just above and at the bucket of "127.0.0.1" pin the bucket exactly: one
    // basis point more admits it, the bucket itself does not.
    for (basis_points, side) in [(b + 1, "target"), (b, "legacy")] {
        let proxy = Switchyard::start(&sticky_config(&legacy, &target, basis_points, sticky));
        for i in 0..20 {
            // A fresh connection (new source port) and other would-be keys every time.
            let user = format!("user-{i}");
            let cookie = format!("session_id={user}");
            let (status, headers, _) = request(
                &client(),
                "GET",
                &proxy.url("/api/users/1"),
                &[("x-user-id", &user), ("cookie", &cookie)],
            )
            .await;
            assert_eq!(status, 200);
            assert_eq!(
                backend_of(&headers),
                Some(side),
                "bucket of 127.0.0.1 is {b}; weight {} must send it to {side}",
                weight_text(basis_points)
            );
        }
    }

    // Other loopback addresses get their own buckets, by the same formula.
    let proxy = Switchyard::start(&sticky_config(&legacy, &target, 5000, sticky));
    let addrs: Vec<String> = (2..62).map(|i| format!("127.0.0.{i}")).collect();
    let expected: Vec<&str> = addrs
        .iter()
        .map(|a| expected_side("users", a, 5000))
        .collect();
    assert!(
        count(&expected, "target") > 0 && count(&expected, "legacy") > 0,
        "the addresses do not spread over both sides"
    );
    let mut seen = Vec::new();
    for addr in &addrs {
        let client = client_from(addr.parse().unwrap());
        let mut sides = BTreeSet::new();
        for _ in 0..3 {
            let (status, headers, _) =
                request(&client, "GET", &proxy.url("/api/users/1"), &[]).await;
            assert_eq!(status, 200);
            sides.insert(backend_of(&headers).unwrap().to_string());
        }
        assert_eq!(sides.len(), 1, "{addr} got both sides: {sides:?}");
        seen.push(sides.into_iter().next().unwrap());
    }
    assert_same_sides("client_ip vs formula", &addrs, &seen, &expected);
}

/// The value of `name` in a `Set-Cookie` header, with the header itself.
fn set_cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<(String, &'a str)> {
    headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| {
            let rest = v.strip_prefix(name)?.strip_prefix('=')?;
            let value = rest.split(';').next().unwrap_or("").trim();
            Some((value.to_string(), v))
        })
}

/// Mints `ids` ids through first visits (no cookie), then checks each id keeps its side.
async fn generated_ids_stick(proxy: &Switchyard, cookie_name: &str, ids: usize) {
    let url = proxy.url("/api/users/1");
    let mut minted: HashMap<String, String> = HashMap::new();
    for _ in 0..ids {
        let (status, headers, _) = get(&url, &[]).await;
        assert_eq!(status, 200);
        let (id, header) = set_cookie(&headers, cookie_name).unwrap_or_else(|| {
            panic!(
                "first visit without a cookie must set `{cookie_name}`: {:?}",
                headers.get_all("set-cookie").iter().collect::<Vec<_>>()
            )
        });
        assert!(!id.is_empty(), "empty id in {header}");
        assert!(header.contains("Path=/"), "cookie without Path=/: {header}");
        let side = backend_of(&headers).unwrap().to_string();
        // The minted id is the key of this very request already.
        assert_eq!(
            side,
            expected_side("users", &id, 5000),
            "first response for minted id {id}"
        );
        assert!(
            minted.insert(id.clone(), side).is_none(),
            "id {id} minted twice"
        );
    }
    let sides: Vec<&String> = minted.values().collect();
    assert!(
        count(&sides, "target") > 0 && count(&sides, "legacy") > 0,
        "minted ids did not spread over both sides: {minted:?}"
    );

    let client = client();
    for (id, side) in &minted {
        let cookie = format!("{cookie_name}={id}");
        for _ in 0..20 {
            let (status, headers, _) = request(&client, "GET", &url, &[("cookie", &cookie)]).await;
            assert_eq!(status, 200);
            assert_eq!(backend_of(&headers), Some(side.as_str()), "id {id}");
            assert!(
                headers.get("set-cookie").is_none(),
                "a request carrying its id got a new cookie: {:?}",
                headers.get("set-cookie")
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_key_sets_a_cookie_and_sticks_to_it() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&sticky_config(&legacy, &target, 5000, "{ key: generated }"));
    generated_ids_stick(&proxy, "switchyard_id", 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_key_uses_the_configured_cookie_name() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&sticky_config(
        &legacy,
        &target,
        5000,
        "{ key: generated, cookie: my_id }",
    ));
    generated_ids_stick(&proxy, "my_id", 30).await;

    // The default name is not the key here: carrying only it still gets a `my_id` minted.
    let (status, headers, _) = get(
        &proxy.url("/api/users/1"),
        &[("cookie", "switchyard_id=0123456789abcdef")],
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        set_cookie(&headers, "my_id").is_some(),
        "no my_id minted for a request with only switchyard_id"
    );
    assert!(set_cookie(&headers, "switchyard_id").is_none());
}

/// Sends `n` requests with `headers` (none of which carries the key); returns the sides.
async fn keyless_sides(proxy: &Switchyard, n: usize, headers: &[(&str, &str)]) -> Vec<String> {
    let client = client();
    let mut sides = Vec::with_capacity(n);
    for _ in 0..n {
        let (status, h, _) = request(&client, "GET", &proxy.url("/api/users/1"), headers).await;
        assert_eq!(status, 200);
        sides.push(backend_of(&h).unwrap().to_string());
    }
    sides
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_the_key_are_split_at_random() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    for (sticky, cases) in [
        (
            "{ key: \"cookie:session_id\" }",
            vec![vec![], vec![("cookie", "theme=dark; other=1")]],
        ),
        (
            "{ key: \"header:x-user-id\" }",
            vec![vec![], vec![("x-other-id", "alice")]],
        ),
    ] {
        let proxy = Switchyard::start(&sticky_config(&legacy, &target, 5000, sticky));
        for headers in cases {
            let n = 200;
            let sides = keyless_sides(&proxy, n, &headers).await;
            let to_target = count(&sides, "target");
            assert!(
                (50..=150).contains(&to_target),
                "{sticky} with {headers:?}: {to_target} of {n} keyless requests went to target"
            );
        }
    }
}

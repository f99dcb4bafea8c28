//! Split shares, end to end: real backends, a real switchyard process, thousands of requests.

mod support;

use std::collections::HashMap;

use support::*;

/// Sends `n` keyless requests over `connections` parallel connections; returns how many
/// each backend answered.
async fn shares(proxy: &Switchyard, n: usize, connections: usize) -> HashMap<String, usize> {
    let url = proxy.url("/api/users/1");
    let mut tasks = Vec::new();
    for c in 0..connections {
        let url = url.clone();
        let per = n / connections + usize::from(c < n % connections);
        tasks.push(tokio::spawn(async move {
            let client = client();
            let mut seen: HashMap<String, usize> = HashMap::new();
            for _ in 0..per {
                let (status, headers, _) = request(&client, "GET", &url, &[]).await;
                assert_eq!(status, 200);
                *seen
                    .entry(backend_of(&headers).unwrap().to_string())
                    .or_default() += 1;
            }
            seen
        }));
    }
    let mut total = HashMap::new();
    for t in tasks {
        for (k, v) in t.await.unwrap() {
            *total.entry(k).or_default() += v;
        }
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn percentage_shares_are_within_two_points_of_the_weight() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    for weight in [1.0, 20.0, 50.0, 99.0] {
        let proxy = Switchyard::start(&two_sided_config(
            &legacy,
            &target,
            &format!("{{ percentage: {{ weight: {weight} }} }}"),
            None,
        ));
        let n = 5_000;
        let seen = shares(&proxy, n, 8).await;
        let to_target = *seen.get("target").unwrap_or(&0) as f64 / n as f64 * 100.0;
        assert_eq!(seen.values().sum::<usize>(), n);
        assert!(
            (to_target - weight).abs() <= 2.0,
            "weight {weight}: {to_target:.2}% went to target ({seen:?})"
        );
    }
}

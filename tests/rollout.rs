//! Rollouts end to end (issue 7): a real `switchyard serve`, real backends and webhook
//! receivers on ephemeral ports, `switchyard ctl rollout` as a process, and waits on
//! conditions with deadlines.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use switchyard::dataplane::split::Bucket;

use support::*;

/// Long enough for several hundred requests per step at the test's load.
const BAKE_MS: u64 = 2500;

fn config(legacy: &str, target: &str, rollout: &str, extra: &str) -> String {
    format!(
        "backends:\n  legacy: {{ endpoints: [\"{legacy}\"] }}\n  target: {{ endpoints: [\"{target}\"] }}\n\
default_backend: legacy\n\
routes:\n  - name: users\n    match: {{ path_prefix: /api/users }}\n    legacy: legacy\n    target: target\n    split: {{ percentage: {{ weight: 0 }} }}\n    sticky: {{ key: \"header:x-user-id\" }}\n{extra}    rollout:\n{rollout}  - name: plain\n    match: {{ path_prefix: /plain }}\n    legacy: legacy\n    target: target\n    split: {{ percentage: {{ weight: 0 }} }}\n"
    )
}

/// `ctl`'s key-value output with its column padding collapsed.
fn squash(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

async fn rollout(proxy: &Switchyard) -> Value {
    rollout_view(proxy, "users").await
}

async fn command(proxy: &Switchyard, verb: &str, body: &str) -> Value {
    let (status, text) =
        admin_call(proxy, "POST", &format!("/v1/rollouts/users/{verb}"), body).await;
    assert_eq!(status, 200, "{verb}: {text}");
    serde_json::from_str(&text).unwrap()
}

async fn wait_state(
    proxy: &Switchyard,
    within: Duration,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Value {
    wait_rollout(proxy, "users", within, what, f).await
}

/// `ctl rollout wait` in a thread of its own, so the test can act while it waits.
fn spawn_wait(proxy: &Switchyard, timeout: &str) -> std::thread::JoinHandle<(i32, String, String)> {
    let admin = proxy.admin_url("");
    let timeout = timeout.to_string();
    std::thread::spawn(move || {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args([
                "ctl", "--admin", &admin, "--token", TOKEN, "--output", "json",
            ])
            .args(["rollout", "wait", "users", "--timeout", &timeout])
            .output()
            .unwrap();
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    })
}

/// 1000 user ids, the j-th one in sticky bucket [10j, 10j + 10) of route `users`. Sent in
/// bit-reversed order (a van der Corput walk over the buckets), every run of a few hundred
/// requests covers the buckets evenly, small ranges included, so a step's observed share
/// measures the router, not the luck of the draw.
fn stratified_users() -> Vec<String> {
    let mut users: Vec<Option<String>> = vec![None; 1000];
    let mut missing = users.len();
    let mut n = 0u64;
    while missing > 0 {
        let id = format!("user-{n}");
        let j = (Bucket::of("users", id.as_bytes()).value() / 10) as usize;
        if users[j].is_none() {
            users[j] = Some(id);
            missing -= 1;
        }
        n += 1;
    }
    users.into_iter().map(Option::unwrap).collect()
}

struct Sample {
    sent: Instant,
    user: usize,
    target: bool,
}

/// Sends about `rate` requests per second, each with the next stratified user id.
fn load(
    proxy: &Switchyard,
    rate: u64,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Sample>> {
    let url = proxy.url("/api/users/1");
    let users = stratified_users();
    tokio::spawn(async move {
        let client = client();
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
        let mut inflight = Vec::new();
        let mut k = 0u32;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let j = loop {
                let j = ((k % 1024).reverse_bits() >> 22) as usize;
                k += 1;
                if j < 1000 {
                    break j;
                }
            };
            let (client, url, id) = (client.clone(), url.clone(), users[j].clone());
            inflight.push(tokio::spawn(async move {
                let sent = Instant::now();
                let (_, headers, _) = request(&client, "GET", &url, &[("x-user-id", &id)]).await;
                Sample {
                    sent,
                    user: j,
                    target: backend_of(&headers) == Some("target"),
                }
            }));
        }
        let mut out = Vec::new();
        for t in inflight {
            out.push(t.await.unwrap());
        }
        out
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_walk_under_load_promotes_with_each_step_share_within_two_points() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&config(
        &legacy.url(),
        &target.url(),
        &format!(
            "      steps: [1, 5, 25, 50, 100]\n      bake: {BAKE_MS}ms\n      gates: {{ max_error_rate: 0.05, max_latency_ratio: 50 }}\n"
        ),
        "",
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let samples = load(&proxy, 300, stop.clone());

    // Watches the rollout: when each step came into force (as the API saw it).
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (admin, watching) = (proxy.admin_url(""), watching.clone());
        tokio::spawn(async move {
            let c = client();
            let mut seen: Vec<(Instant, f64, String)> = Vec::new();
            while watching.load(Ordering::Relaxed) {
                let (_, _, body) = request(
                    &c,
                    "GET",
                    &format!("{admin}/v1/rollouts/users"),
                    &[("authorization", &format!("Bearer {TOKEN}"))],
                )
                .await;
                let v: Value = serde_json::from_str(&body).unwrap();
                let w = v["weight"].as_f64().unwrap();
                let state = v["state"].as_str().unwrap().to_string();
                if seen
                    .last()
                    .is_none_or(|(_, lw, ls)| *lw != w || *ls != state)
                {
                    seen.push((Instant::now(), w, state));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            seen
        })
    };

    let (code, out, err) = ctl(&proxy, &["rollout", "start", "users"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("progressing"), "{out}");
    let (code, out, err) = spawn_wait(&proxy, "60s").join().unwrap();
    assert_eq!(code, 0, "wait exits 0 once promoted: {out}{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.last().unwrap()["state"], "promoted", "{out}");
    // Keep the load running a little at 100% before stopping it.
    let promoted_at = Instant::now();
    eventually(Duration::from_secs(5), "load at 100%", || async {
        promoted_at.elapsed() > Duration::from_millis(500)
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    watching.store(false, Ordering::Relaxed);
    let mut samples = samples.await.unwrap();
    let mut seen = watcher.await.unwrap();
    samples.sort_by_key(|s| s.sent);

    seen.retain(|(_, _, state)| state != "idle");
    let weights: Vec<f64> = seen.iter().map(|(_, w, _)| *w).collect();
    let mut steps = weights.clone();
    steps.dedup();
    assert_eq!(steps, [1.0, 5.0, 25.0, 50.0, 100.0], "{seen:?}");

    // Each step's share, over the requests sent well inside the time it was in force.
    let margin = Duration::from_millis(100);
    for (i, (from, weight, _)) in seen.iter().enumerate() {
        if i + 1 < seen.len() && seen[i + 1].1 == *weight {
            continue; // promoted at 100: same weight, next entry
        }
        let until = seen.get(i + 1).map_or(Instant::now(), |(t, _, _)| *t);
        let start = seen
            .iter()
            .rev()
            .skip(seen.len() - i - 1)
            .take_while(|(_, w, _)| w == weight)
            .last()
            .map_or(*from, |(t, _, _)| *t);
        let inside: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.sent > start + margin && s.sent + margin < until)
            .collect();
        assert!(
            inside.len() >= 150,
            "too few samples at {weight}%: {}",
            inside.len()
        );
        let share = 100.0 * inside.iter().filter(|s| s.target).count() as f64 / inside.len() as f64;
        println!(
            "step {weight}%: observed {share:.2}% of {} requests",
            inside.len()
        );
        assert!(
            (share - weight).abs() <= 2.0,
            "step {weight}%: observed {share:.2}% of {} requests",
            inside.len()
        );
    }

    // Sticky users never went back to legacy once they had reached target.
    let mut reached: HashMap<usize, Instant> = HashMap::new();
    for s in &samples {
        if s.target {
            reached.entry(s.user).or_insert(s.sent);
        } else if let Some(at) = reached.get(&s.user) {
            panic!(
                "user {} went back to legacy after reaching target at {at:?}",
                s.user
            );
        }
    }
    assert!(
        reached.len() > 500,
        "users reached target: {}",
        reached.len()
    );

    // Every transition is in the audit log under the controller's name.
    let (_, audit) = admin_call(&proxy, "GET", "/v1/audit?limit=50", "").await;
    let audit: Value = serde_json::from_str(&audit).unwrap();
    let actions: Vec<(&str, &str)> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["actor"].as_str().unwrap(), e["action"].as_str().unwrap()))
        .collect();
    assert_eq!(
        actions
            .iter()
            .filter(|a| **a == ("rollout", "rollout_step"))
            .count(),
        4,
        "{actions:?}"
    );
    assert!(
        actions.contains(&("rollout", "rollout_promote")),
        "{actions:?}"
    );
    assert!(actions.contains(&("env", "rollout_start")), "{actions:?}");
    let metrics = proxy.metrics().await;
    assert!(
        metrics.contains("switchyard_rollout_step{route=\"users\"} 5"),
        "{metrics}"
    );
    assert!(
        metrics.contains("switchyard_rollout_gate_ratio{route=\"users\",gate=\"max_error_rate\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_failing_mid_rollout_is_rolled_back_within_a_second_and_announced() {
    let legacy = Backend::start("legacy").await;
    let target = Switchable::start("target").await;
    let hook = Switchable::start("hook").await;
    let proxy = Switchyard::start(&config(
        &legacy.url(),
        &target.url(),
        &format!(
            "      steps: [10, 50, 100]\n      bake: 1s\n      webhooks: [ {{ url: \"{}/events\", on: [step, rollback, promoted] }} ]\n",
            hook.url()
        ),
        "    rollback: { max_error_rate: 0.05, window: 2s, min_requests: 5 }\n",
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let samples = load(&proxy, 150, stop.clone());
    command(&proxy, "start", "").await;
    wait_state(&proxy, Duration::from_secs(10), "step 2 (50%)", |v| {
        v["step"] == 2
    })
    .await;
    let waiting = spawn_wait(&proxy, "30s");

    let failed_at = Instant::now();
    target.set_status(500);
    eventually(
        Duration::from_secs(1),
        "the route rolled back within 1 s",
        || async {
            let (_, body) = admin_call(&proxy, "GET", "/v1/routes/users", "").await;
            serde_json::from_str::<Value>(&body).unwrap()["state"] == "rolled_back"
        },
    )
    .await;
    println!(
        "rolled back {:?} after the target began failing",
        failed_at.elapsed()
    );
    let (code, out, err) = waiting.join().unwrap();
    assert_eq!(code, 3, "wait exits 3 on a rollback: {out}{err}");
    let view = rollout(&proxy).await;
    assert_eq!(view["state"], "rolled_back");
    assert!(
        view["reason"].as_str().unwrap().contains("error_rate"),
        "{view}"
    );
    stop.store(true, Ordering::Relaxed);
    drop(samples);

    eventually(
        Duration::from_secs(5),
        "the webhook receives the rollback",
        || async { hook.bodies().iter().any(|b| b["event"] == "rollback") },
    )
    .await;
    let bodies = hook.bodies();
    let rb = bodies.iter().find(|b| b["event"] == "rollback").unwrap();
    assert_eq!(rb["route"], "users");
    assert_eq!(rb["reason"], "error_rate");
    assert_eq!(rb["step"], 2, "steps count from 1: {rb}");
    assert_eq!(rb["weight"], 50.0, "{rb}");
    assert!(
        bodies
            .iter()
            .any(|b| b["event"] == "step" && b["weight"] == 50.0),
        "{bodies:?}"
    );
    // Everything goes to legacy now.
    for _ in 0..10 {
        let (_, headers, _) = get(&proxy.url("/api/users/1"), &[("x-user-id", "u1")]).await;
        assert_eq!(backend_of(&headers), Some("legacy"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_gate_answering_500_holds_the_step_and_200_lets_it_go() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let gate = Switchable::start("gate").await;
    gate.set_status(500);
    let proxy = Switchyard::start(&config(
        &legacy.url(),
        &target.url(),
        &format!(
            "      steps: [10, 50]\n      bake: 300ms\n      webhooks: [ {{ url: \"{}/gate\", on: [gate] }} ]\n",
            gate.url()
        ),
        "",
    ));
    command(&proxy, "start", "").await;
    let view = wait_state(
        &proxy,
        Duration::from_secs(5),
        "the webhook gate failing",
        |v| {
            v["gates"]
                .as_array()
                .is_some_and(|g| g.iter().any(|g| g["figure"] == 500.0 && g["pass"] == false))
        },
    )
    .await;
    let g = &view["gates"][0];
    assert!(
        g["name"].as_str().unwrap().starts_with("webhook:"),
        "{view}"
    );
    assert!(g["reason"].as_str().unwrap().contains("500"), "{view}");
    // Held over several bakes: still the first step.
    let held_since = Instant::now();
    while held_since.elapsed() < Duration::from_millis(1500) {
        let v = rollout(&proxy).await;
        assert_eq!(
            (v["state"].as_str(), v["step"].as_u64()),
            (Some("progressing"), Some(1)),
            "{v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The gate was asked with the step's figures.
    let asked = gate.bodies();
    assert!(
        asked
            .iter()
            .any(|b| b["event"] == "gate" && b["route"] == "users" && b["weight"] == 10.0),
        "{asked:?}"
    );
    gate.set_status(200);
    wait_state(
        &proxy,
        Duration::from_secs(10),
        "promoted once the gate passes",
        |v| v["state"] == "promoted",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_mid_bake_resumes_the_same_step_with_the_bake_left() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let (_dir, path) = write_config(&config(
        &legacy.url(),
        &target.url(),
        "      steps: [10, 50, 100]\n      bake: 4s\n",
        "",
    ));
    let proxy = Switchyard::start_file(&path);
    command(&proxy, "start", "").await;
    command(&proxy, "promote", "").await;
    let before = wait_state(
        &proxy,
        Duration::from_secs(10),
        "1.5 s baked at step 2",
        |v| v["step"] == 2 && v["baked_s"].as_f64().unwrap() >= 1.5,
    )
    .await;
    drop(proxy); // SIGKILL: no chance to save anything more

    let proxy = Switchyard::start_file(&path);
    let after = rollout(&proxy).await;
    assert_eq!(after["state"], "progressing", "{after}");
    assert_eq!(after["step"], 2, "same step after the restart: {after}");
    let baked = after["baked_s"].as_f64().unwrap();
    assert!(
        baked >= 1.0 && baked <= before["baked_s"].as_f64().unwrap(),
        "bake resumed from the saved time: {after}"
    );
    let (_, headers, _) = get(&proxy.url("/api/users/1"), &[]).await;
    assert!(backend_of(&headers).is_some());
    // It goes on from there (once the dead process's lease has expired).
    wait_state(
        &proxy,
        Duration::from_secs(15),
        "step 3 after the restart",
        |v| v["step"] == 3,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_abort_and_promote_full_through_ctl() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&config(
        &legacy.url(),
        &target.url(),
        "      steps: [10, 50, 100]\n      bake: 10m\n",
        "",
    ));
    // Errors: unknown route 404, a route without a rollout 422, a transition not allowed 409.
    let (status, body) = admin_call(&proxy, "GET", "/v1/rollouts/nope", "").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = admin_call(&proxy, "POST", "/v1/rollouts/nope/start", "").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = admin_call(&proxy, "POST", "/v1/rollouts/plain/start", "").await;
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("\"no_rollout\""), "{body}");
    let (status, body) = admin_call(&proxy, "POST", "/v1/rollouts/users/pause", "").await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("\"invalid_transition\""), "{body}");
    assert_eq!(rollout(&proxy).await["state"], "idle");

    let (code, _, err) = ctl(&proxy, &["rollout", "start", "users"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = ctl(&proxy, &["rollout", "pause", "users"]);
    assert_eq!(code, 0);
    assert!(out.contains("paused"), "{out}");
    let (code, out, err) = spawn_wait(&proxy, "10s").join().unwrap();
    assert_eq!(code, 2, "wait exits 2 when paused: {out}{err}");

    let (code, _, _) = ctl(&proxy, &["rollout", "resume", "users"]);
    assert_eq!(code, 0);
    let (code, out, _) = ctl(&proxy, &["rollout", "promote", "users"]);
    assert_eq!(code, 0);
    assert!(squash(&out).contains("weight: 50%"), "{out}");
    let (code, out, _) = ctl(&proxy, &["rollout", "status", "users"]);
    assert_eq!(code, 0);
    assert!(squash(&out).contains("step: 2 of 3"), "{out}");
    // wait times out while the rollout bakes for minutes.
    let (code, out, err) = spawn_wait(&proxy, "300ms").join().unwrap();
    assert_eq!(code, 4, "{out}{err}");

    let (code, _, _) = ctl(&proxy, &["rollout", "abort", "users"]);
    assert_eq!(code, 0);
    let (code, out, err) = spawn_wait(&proxy, "10s").join().unwrap();
    assert_eq!(code, 3, "wait exits 3 when aborted: {out}{err}");
    for i in 0..20 {
        let (_, headers, _) = get(
            &proxy.url("/api/users/1"),
            &[("x-user-id", &format!("u{i}"))],
        )
        .await;
        assert_eq!(
            backend_of(&headers),
            Some("legacy"),
            "aborted: everything on legacy"
        );
    }
    let (code, _, err) = ctl(&proxy, &["rollout", "pause", "users"]);
    assert_eq!(code, 1);
    assert!(err.contains("invalid_transition"), "{err}");

    let (code, _, _) = ctl(&proxy, &["rollout", "start", "users"]);
    assert_eq!(code, 0);
    let (code, out, err) = ctl(&proxy, &["rollout", "promote", "--full", "users"]);
    assert_eq!(code, 0, "{err}");
    let text = squash(&out);
    assert!(
        text.contains("state: promoted") && text.contains("weight: 100%"),
        "{out}"
    );
    for i in 0..20 {
        let (_, headers, _) = get(
            &proxy.url("/api/users/1"),
            &[("x-user-id", &format!("u{i}"))],
        )
        .await;
        assert_eq!(
            backend_of(&headers),
            Some("target"),
            "promoted: everything on target"
        );
    }
    let (code, out, err) = spawn_wait(&proxy, "10s").join().unwrap();
    assert_eq!(code, 0, "{out}{err}");
    let history = rollout(&proxy).await["history"].clone();
    let events: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        [
            "start", "pause", "resume", "step", "abort", "start", "promote"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blue_green_route_bakes_on_preview_then_switches() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let yaml = format!(
        "backends:\n  legacy: {{ endpoints: [\"{}\"] }}\n  target: {{ endpoints: [\"{}\"] }}\n\
default_backend: legacy\n\
routes:\n  - name: users\n    match: {{ path_prefix: /api/users }}\n    legacy: legacy\n    target: target\n    split: {{ blue_green: {{ active: legacy, preview: {{ header: {{ name: x-preview, value: \"1\" }} }} }} }}\n    rollout:\n      steps: [100]\n      bake: 500ms\n      gates: {{ max_error_rate: 0.01 }}\n",
        legacy.url(),
        target.url()
    );
    let proxy = Switchyard::start(&yaml);
    command(&proxy, "start", "").await;
    let (_, headers, _) = get(&proxy.url("/api/users/1"), &[]).await;
    assert_eq!(
        backend_of(&headers),
        Some("legacy"),
        "previewing: legacy stays active"
    );
    let (_, headers, _) = get(&proxy.url("/api/users/1"), &[("x-preview", "1")]).await;
    assert_eq!(
        backend_of(&headers),
        Some("target"),
        "preview traffic reaches target"
    );
    let view = wait_state(&proxy, Duration::from_secs(10), "promoted", |v| {
        v["state"] == "promoted"
    })
    .await;
    assert_eq!(view["weight"], 100.0);
    let (_, headers, _) = get(&proxy.url("/api/users/1"), &[]).await;
    assert_eq!(backend_of(&headers), Some("target"), "switched");
    let (_, body) = admin_call(&proxy, "GET", "/v1/routes/users", "").await;
    let route: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(route["active"]["in_force"], "target", "{route}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_shared_postgres_store_one_replica_leads_and_another_takes_over() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let store = support::db::TestDb::new(support::db::Kind::Pg).await;
    let text = format!(
        "state: {{ url: \"{}\" }}\n{}",
        store.url(),
        config(
            &legacy.url(),
            &target.url(),
            "      steps: [10, 50, 100]\n      bake: 1500ms\n",
            "",
        )
    );
    let (_dir, path) = write_config(&text);
    let first = Switchyard::start_file(&path);
    let second = Switchyard::start_file(&path);
    command(&first, "start", "").await;
    // Exactly one leads; the other follows the same rollout from the store.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (leader, follower) = loop {
        let (a, b) = (rollout(&first).await, rollout(&second).await);
        if a["leader"] != b["leader"] && a["state"] == "progressing" && b["state"] == "progressing"
        {
            break if a["leader"] == true {
                (first, second)
            } else {
                (second, first)
            };
        }
        assert!(Instant::now() < deadline, "no single leader: {a} {b}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    wait_state(
        &follower,
        Duration::from_secs(10),
        "the follower sees step 2",
        |v| v["step"] == 2,
    )
    .await;
    drop(leader); // SIGKILL: the lease is not released
    wait_state(
        &follower,
        Duration::from_secs(20),
        "the survivor promotes",
        |v| v["state"] == "promoted" && v["leader"] == true,
    )
    .await;
    let (_, headers, _) = get(&follower.url("/api/users/1"), &[]).await;
    assert_eq!(backend_of(&headers), Some("target"));
}

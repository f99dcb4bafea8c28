//! One truth for a route's state (contract §10): after a health rollback, a manual rollback
//! and a rollback after promotion, the route view, the rollout view, `ctl` (JSON and table)
//! and the metrics all say in force 0 and `rolled_back` with the reason, and number steps
//! alike from 1. A manual weight during a progressing rollout is refused with 409
//! `rollout_in_progress` and audited. A real `switchyard serve`, real backends, `ctl` as a
//! process.

mod support;

use std::time::Duration;

use serde_json::Value;

use support::*;

fn config(legacy: &str, target: &str) -> String {
    users_route(
        legacy,
        target,
        "{ percentage: { weight: 0 } }",
        "    rollback: { max_error_rate: 0.05, window: 2s, min_requests: 5 }\n    rollout:\n      steps: [10, 50, 100]\n      bake: 300ms\n",
    )
}

async fn json_of(proxy: &Switchyard, path: &str) -> Value {
    let (status, body) = admin_call(proxy, "GET", path, "").await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Sends traffic to the route until it is rolled back (the target answers 500).
async fn fail_until_rolled_back(proxy: &Switchyard) {
    let url = proxy.url("/api/users/1");
    eventually(
        Duration::from_secs(5),
        "the route rolled back by health",
        || {
            let url = url.clone();
            async move {
                for _ in 0..10 {
                    get(&url, &[]).await;
                }
                json_of(proxy, "/v1/routes/users").await["state"] == "rolled_back"
            }
        },
    )
    .await;
}

/// Every reader agrees: the route is rolled back with `reason` in its reason, nothing is in
/// force on the target, and the step is `step` (1-based) in the API, `ctl` JSON and table,
/// and the metric.
async fn all_say_rolled_back(proxy: &Switchyard, reason: &str, step: u64) {
    let route = json_of(proxy, "/v1/routes/users").await;
    assert_eq!(route["state"], "rolled_back", "{route:#}");
    assert_eq!(route["weight"]["in_force"], 0.0, "{route:#}");
    assert_eq!(route["weight"]["source"], "rollback", "{route:#}");
    assert!(
        route["rollback"]["reason"]
            .as_str()
            .unwrap()
            .contains(reason),
        "{route:#}"
    );
    assert_eq!(route["rollout"]["state"], "rolled_back", "{route:#}");
    assert_eq!(route["rollout"]["step"], step, "{route:#}");
    assert!(
        route["rollout"]["reason"]
            .as_str()
            .unwrap()
            .contains(reason),
        "{route:#}"
    );

    let rollout = rollout_view(proxy, "users").await;
    assert_eq!(rollout["state"], "rolled_back", "{rollout:#}");
    assert_eq!(rollout["step"], step, "{rollout:#}");
    assert_eq!(rollout["weight"], 0.0, "{rollout:#}");
    assert!(
        rollout["reason"].as_str().unwrap().contains(reason),
        "{rollout:#}"
    );

    let (code, out, err) = ctl(proxy, &["-o", "json", "rollout", "status", "users"]);
    assert_eq!(code, 0, "{err}");
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (&shown["state"], &shown["step"]),
        (&rollout["state"], &rollout["step"])
    );
    let (code, out, err) = ctl(proxy, &["rollout", "status", "users"]);
    assert_eq!(code, 0, "{err}");
    let table = out.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(table.contains("state: rolled_back"), "{out}");
    assert!(table.contains(&format!("step: {step} of 3")), "{out}");
    let (code, out, err) = ctl(proxy, &["route", "users"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("rolled_back"), "{out}");

    // The metrics, read from the exposition text.
    eventually(
        Duration::from_secs(3),
        "the metrics say step and weight 0",
        || async {
            proxy
                .metric("switchyard_rollout_step{route=\"users\"}")
                .await
                == Some(step as f64)
                && proxy
                    .metric("switchyard_route_weight{route=\"users\"}")
                    .await
                    == Some(0.0)
                && proxy
                    .metric("switchyard_rollout_phase{route=\"users\",phase=\"rolled_back\"}")
                    .await
                    == Some(1.0)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_reader_agrees_after_a_rollback_after_promotion_a_health_rollback_and_a_manual_one() {
    let legacy = Backend::start("legacy").await;
    let target = Switchable::start("target").await;
    let proxy = Switchyard::start(&config(&legacy.url(), &target.url()));

    // Promoted, then the target breaks: the promoted rollout ends rolled back.
    let (code, _, err) = ctl(&proxy, &["rollout", "start", "users"]);
    assert_eq!(code, 0, "{err}");
    let promoted = wait_rollout(&proxy, "users", Duration::from_secs(15), "promoted", |v| {
        v["state"] == "promoted"
    })
    .await;
    assert_eq!(promoted["step"], 3, "the last of three steps: {promoted:#}");
    let history: Vec<u64> = promoted["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["step"].as_u64().unwrap())
        .collect();
    // Each step once, then the promotion at the last.
    assert_eq!(history, [1, 2, 3, 3], "{promoted:#}");
    target.set_status(500);
    fail_until_rolled_back(&proxy).await;
    all_say_rolled_back(&proxy, "error_rate", 3).await;
    // The controller records it on the rollout too, with the mark's reason.
    let recorded = wait_rollout(
        &proxy,
        "users",
        Duration::from_secs(5),
        "rolled_back recorded in the history",
        |v| v["history"].as_array().unwrap().last().unwrap()["event"] == "rolled_back",
    )
    .await;
    assert!(
        recorded["history"].as_array().unwrap().last().unwrap()["detail"]
            .as_str()
            .unwrap()
            .contains("error_rate")
    );
    // Both spellings of a pipeline's wait: global flags before or after the subcommand.
    for args in [
        &["-o", "json", "rollout", "wait", "users", "--timeout", "5s"][..],
        &["rollout", "wait", "users", "--timeout", "5s", "-o", "json"][..],
        &[
            "rollout",
            "wait",
            "users",
            "--output",
            "json",
            "--timeout",
            "5s",
        ][..],
    ] {
        let (code, out, err) = ctl(&proxy, args);
        assert_eq!(code, 3, "{args:?}: rolled back is exit 3: {out}{err}");
        let line: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
        assert_eq!(
            (line["state"].as_str(), line["step"].as_u64()),
            (Some("rolled_back"), Some(3))
        );
    }

    // A health rollback mid-rollout: at step 1 (weight 10) the target breaks.
    target.set_status(200);
    let (code, _, err) = ctl(&proxy, &["rollout", "start", "users"]);
    assert_eq!(code, 0, "{err}");
    target.set_status(500);
    fail_until_rolled_back(&proxy).await;
    let step = rollout_view(&proxy, "users").await["step"]
        .as_u64()
        .unwrap();
    assert!((1..=3).contains(&step));
    all_say_rolled_back(&proxy, "error_rate", step).await;

    // A manual rollback mid-rollout, before the controller could notice.
    target.set_status(200);
    let (code, _, err) = ctl(&proxy, &["rollout", "start", "users"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = ctl(&proxy, &["rollback", "users", "--reason", "pager says so"]);
    assert_eq!(code, 0, "{err}");
    let step = rollout_view(&proxy, "users").await["step"]
        .as_u64()
        .unwrap();
    all_say_rolled_back(&proxy, "pager says so", step).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_weight_during_a_progressing_rollout_is_refused_naming_pause_and_abort() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let yaml = config(&legacy.url(), &target.url()).replace("bake: 300ms", "bake: 1h");
    let proxy = Switchyard::start(&yaml);
    let (code, _, err) = ctl(&proxy, &["rollout", "start", "users"]);
    assert_eq!(code, 0, "{err}");

    for (method, path, body) in [
        ("PUT", "/v1/routes/users/weight", r#"{"weight": 80}"#),
        ("POST", "/v1/routes/users/reset", ""),
    ] {
        let (status, text) = admin_call(&proxy, method, path, body).await;
        assert_eq!(status, 409, "{path}: {text}");
        let error: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(error["error"]["code"], "rollout_in_progress");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("rollout pause users") && message.contains("rollout abort users"),
            "{message}"
        );
    }
    // Nothing changed: the step's weight is in force.
    let route = json_of(&proxy, "/v1/routes/users").await;
    assert_eq!(route["weight"]["in_force"], 10.0, "{route:#}");
    assert_eq!(route["rollout"]["step"], 1);

    // The refusal is in the audit log, with its reason.
    let audit = json_of(&proxy, "/v1/audit").await;
    let refused = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "set_weight")
        .expect("the refused weight is audited");
    assert_eq!(refused["outcome"], "refused", "{refused:#}");
    assert!(
        refused["detail"].as_str().unwrap().contains("progressing"),
        "{refused:#}"
    );
    assert_eq!(refused["before"]["rollout"]["step"], 1, "{refused:#}");

    // The documented way out: pause, then the weight is taken; resume puts the step back.
    let (code, _, err) = ctl(&proxy, &["rollout", "pause", "users"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = ctl(&proxy, &["-o", "json", "weight", "users", "80"]);
    assert_eq!(code, 0, "{err}");
    let view: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(view["weight"]["in_force"], 80.0);
    let (code, _, err) = ctl(&proxy, &["rollout", "resume", "users"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        json_of(&proxy, "/v1/routes/users").await["weight"]["in_force"],
        10.0
    );
}

/// Store stalled: a PostgreSQL session holds an exclusive lock on the state tables. A target
/// failure is still rolled back within 1 s (the rollback never waits on the store), the
/// rollback is recorded once the store answers, and an operator's change made after it is
/// applied after it and never overwritten by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_store_delays_neither_the_rollback_nor_loses_a_newer_operator_change() {
    use sqlx::{Connection, Executor};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    let store = support::db::TestDb::new(support::db::Kind::Pg).await;
    let legacy = Backend::start("legacy").await;
    let target = Switchable::start("target").await;
    let yaml = format!(
        "state: {{ url: \"{}\" }}\n{}",
        store.url(),
        config(&legacy.url(), &target.url())
    );
    let proxy = Arc::new(Switchyard::start(&yaml));
    let (status, _, body) = put_json(&proxy, "/v1/routes/users/weight", r#"{"weight": 100}"#).await;
    assert_eq!(status, 200, "{body}");

    let mut locker = sqlx::PgConnection::connect(&store.url()).await.unwrap();
    locker.execute("BEGIN").await.unwrap();
    locker
        .execute(
            "LOCK TABLE route_overrides, audit, state_version, rollouts IN ACCESS EXCLUSIVE MODE",
        )
        .await
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (url, stop) = (proxy.url("/api/users/1"), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                get(&url, &[]).await;
            }
        })
    };
    let failed_at = Instant::now();
    target.set_status(500);
    eventually(
        Duration::from_secs(1),
        "rolled back within 1 s with the store stalled",
        || async {
            let (_, headers, _) = get(&proxy.url("/api/users/1"), &[]).await;
            backend_of(&headers) == Some("legacy")
                && json_of(&proxy, "/v1/routes/users").await["state"] == "rolled_back"
        },
    )
    .await;
    println!(
        "rolled back {:?} after the target began failing",
        failed_at.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();

    // The store is stalled: this replica's store work waits on the lock. The rollback's
    // record is queued behind it (this replica's writes are taken in order), not lost.
    eventually(
        Duration::from_secs(5),
        "this replica's store work waits on the lock",
        || async {
            store
                .scalar_i64(
                    "SELECT COUNT(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation \
                     WHERE NOT l.granted AND c.relname IN \
                     ('route_overrides', 'audit', 'state_version', 'rollouts')",
                )
                .await
                >= 1
        },
    )
    .await;
    // An operator decides after the rollback: back to 30%. It waits for the store too.
    let operator = {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            admin_call(
                &proxy,
                "PUT",
                "/v1/routes/users/weight",
                r#"{"weight": 30}"#,
            )
            .await
        })
    };
    let route = json_of(&proxy, "/v1/routes/users").await;
    assert_eq!(route["state"], "rolled_back", "{route:#}");
    assert_eq!(route["weight"]["in_force"], 0.0, "{route:#}");
    assert!(
        !operator.is_finished(),
        "a change is not taken without the store"
    );

    locker.execute("COMMIT").await.unwrap();
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), operator)
        .await
        .expect("the operator's change completes once the store answers")
        .unwrap();
    assert_eq!(status, 200, "{body}");

    // Recorded once, in order: the rollback, then the operator's newer change.
    let audit = json_of(&proxy, "/v1/audit").await;
    let entries: Vec<(String, String, String)> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap().to_string(),
                e["action"].as_str().unwrap().to_string(),
                e["outcome"].as_str().unwrap().to_string(),
            )
        })
        .take(2)
        .collect();
    assert_eq!(
        entries,
        [
            ("env".into(), "set_weight".into(), "applied".into()),
            ("health".into(), "rollback".into(), "applied".into()),
        ],
        "{audit:#}"
    );
    // The store holds the operator's change, checked with the test's own SQL.
    assert_eq!(
        store
            .rows(
                "SELECT CAST(weight_bp AS TEXT), CAST(rolled_back AS TEXT) FROM route_overrides \
                 WHERE route = 'users'"
            )
            .await,
        [[Some("3000".to_string()), Some("0".to_string())]]
    );
    // And so does this replica.
    target.set_status(200);
    eventually(
        Duration::from_secs(5),
        "the operator's 30% in force",
        || async {
            let v = json_of(&proxy, "/v1/routes/users").await;
            v["state"] == "active" && v["weight"]["in_force"] == 30.0
        },
    )
    .await;
}

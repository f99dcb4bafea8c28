//! Rollout gates fed by the sync worker and the consistency sampler (issue 7 with 5 and 6):
//! real PostgreSQL pairs, a real `switchyard serve`, real backends.

mod support;

use std::time::Duration;

use serde_json::Value;
use support::db::{Kind, TestDb};
use support::*;

const USERS: &str =
    "CREATE TABLE users (id BIGINT PRIMARY KEY, name VARCHAR(100), score INT, note TEXT)";

fn config(
    legacy: &str,
    target: &str,
    src: &TestDb,
    dst: &TestDb,
    rollback: &str,
    gates: &str,
) -> String {
    format!(
        "backends:\n  legacy: {{ endpoints: [\"{legacy}\"] }}\n  target: {{ endpoints: [\"{target}\"] }}\n\
default_backend: legacy\n\
routes:\n  - name: users\n    match: {{ path_prefix: /api/users }}\n    legacy: legacy\n    target: target\n    split: {{ percentage: {{ weight: 0 }} }}\n{rollback}    rollout:\n      steps: [20, 100]\n      bake: 1s\n      gates: {{ {gates} }}\n\
sync:\n  - name: users\n    source: {{ url: \"{}\", table: users, key: [id] }}\n    target: {{ url: \"{}\", table: users, key: [id] }}\n\
consistency:\n  - {{ sync: users, sample_rate: 500/s, window: 1m }}\n",
        src.url(),
        dst.url()
    )
}

async fn wait_for(
    proxy: &Switchyard,
    within: Duration,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Value {
    wait_rollout(proxy, "users", within, what, f).await
}

fn gate<'a>(view: &'a Value, name: &str) -> &'a Value {
    view["gates"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["name"] == name))
        .unwrap_or_else(|| panic!("no gate {name} in {view:#}"))
}

fn install(path: &std::path::Path) {
    sync_install(path);
}

async fn pair() -> (TestDb, TestDb) {
    let src = TestDb::new(Kind::Pg).await;
    let dst = TestDb::new(Kind::Pg).await;
    src.exec(USERS).await;
    dst.exec(USERS).await;
    src.exec(
        "INSERT INTO users SELECT g, 'user ' || g, g % 100, 'n' FROM generate_series(1, 400) g",
    )
    .await;
    (src, dst)
}

/// Everything one test runs on: backends, a backfilled PostgreSQL pair, a serving proxy.
struct Setup {
    _legacy: Backend,
    _target: Backend,
    src: TestDb,
    dst: TestDb,
    _dir: tempfile::TempDir,
    proxy: Switchyard,
}

async fn setup(rollback: &str, gates: &str) -> Setup {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let (src, dst) = pair().await;
    let (dir, path) = write_config(&config(
        &legacy.url(),
        &target.url(),
        &src,
        &dst,
        rollback,
        gates,
    ));
    install(&path);
    let proxy = Switchyard::start_file(&path);
    eventually(Duration::from_secs(20), "backfill done", || async {
        dst.count("users").await == 400
    })
    .await;
    Setup {
        _legacy: legacy,
        _target: target,
        src,
        dst,
        _dir: dir,
        proxy,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_lag_above_the_gate_holds_the_step_until_it_recovers() {
    let t = setup("", "max_sync_lag: 300ms").await;
    let (src, dst, proxy) = (&t.src, &t.dst, &t.proxy);
    // The worker cannot apply while the target table is locked: its lag grows.
    let mut lock = dst.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *lock)
        .await
        .unwrap();
    src.exec("UPDATE users SET score = score + 1 WHERE id = 7")
        .await;
    let (status, body) = admin_call(proxy, "POST", "/v1/rollouts/users/start", "").await;
    assert_eq!(status, 200, "{body}");
    let held = wait_for(
        proxy,
        Duration::from_secs(10),
        "the lag gate to hold",
        |v| {
            v["gates"].as_array().is_some_and(|g| {
                g.iter().any(|g| {
                    g["name"] == "max_sync_lag:users"
                        && g["pass"] == false
                        && g["figure"].as_f64().is_some_and(|f| f > 0.3)
                })
            })
        },
    )
    .await;
    let g = gate(&held, "max_sync_lag:users");
    assert!(g["figure"].as_f64().unwrap() > 0.3, "{g}");
    // The waiting change was written just before the start: a lag past 2.5 s means the
    // step has been held for more than two bakes.
    let view = wait_for(proxy, Duration::from_secs(15), "a lag past 2.5 s", |v| {
        v["gates"].as_array().is_some_and(|g| {
            g.iter().any(|g| {
                g["name"] == "max_sync_lag:users" && g["figure"].as_f64().is_some_and(|f| f > 2.5)
            })
        })
    })
    .await;
    assert_eq!(
        view["step"], 1,
        "advanced while the lag gate failed: {view:#}"
    );
    assert_eq!(view["state"], "progressing");
    let released = std::time::SystemTime::now();
    lock.rollback().await.unwrap();
    let done = wait_for(
        proxy,
        Duration::from_secs(15),
        "promotion after the lag recovered",
        |v| v["state"] == "promoted",
    )
    .await;
    // The first step change came only once the lag could recover: the gate held until then,
    // however long the lock lasted.
    let first_step = done["history"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["event"] == "step")
        .unwrap_or_else(|| panic!("no step in the history: {done:#}"));
    let at = humantime::parse_rfc3339(first_step["at"].as_str().unwrap()).unwrap();
    assert!(
        at >= released,
        "stepped while the lag gate failed: {done:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_mismatch_holds_then_rolls_back_for_data_integrity() {
    let t = setup(
        "    rollback: { min_consistency: 0.8, window: 10s }
",
        "min_consistency: 0.995",
    )
    .await;
    let (dst, proxy) = (&t.dst, &t.proxy);
    // 3% of the rows differ on the target: below the gate, above the rollback limit.
    for id in (1..=400).step_by(33) {
        dst.exec(&format!(
            "UPDATE users SET name = 'tampered' WHERE id = {id}"
        ))
        .await;
    }
    let (status, body) = admin_call(proxy, "POST", "/v1/rollouts/users/start", "").await;
    assert_eq!(status, 200, "{body}");
    // Waits on a started rollout: `wait` on an idle one is a usage error.
    let waiter = {
        let admin = proxy.admin_url("");
        std::thread::spawn(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
                .args([
                    "ctl",
                    "--admin",
                    &admin,
                    "--token",
                    TOKEN,
                    "rollout",
                    "wait",
                    "users",
                    "--timeout",
                    "60s",
                ])
                .output()
                .unwrap()
        })
    };
    let held = wait_for(
        proxy,
        Duration::from_secs(20),
        "the consistency gate to hold",
        |v| {
            v["gates"].as_array().is_some_and(|g| {
                g.iter().any(|g| {
                    g["name"] == "min_consistency:users"
                        && g["pass"] == false
                        && g["figure"].as_f64().is_some_and(|f| f > 0.5)
                })
            })
        },
    )
    .await;
    assert_eq!(held["step"], 1);
    // Now a quarter of the rows: below rollback.min_consistency.
    for id in (2..=400).step_by(4) {
        dst.exec(&format!(
            "UPDATE users SET note = 'tampered' WHERE id = {id}"
        ))
        .await;
    }
    let done = wait_for(
        proxy,
        Duration::from_secs(30),
        "a data_integrity rollback",
        |v| v["state"] == "rolled_back",
    )
    .await;
    let (_, route) = admin_call(proxy, "GET", "/v1/routes/users", "").await;
    assert!(route.contains("data_integrity"), "{route} {done:#}");
    let out = waiter.join().unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

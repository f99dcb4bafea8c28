//! The sync worker end to end: real PostgreSQL, MariaDB and SQLite, a real `switchyard serve`
//! process, tables compared independently of the worker's own normalisation.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::db::{Kind, TestDb};
use support::{Switchyard, admin_call, eventually, write_config};

const TABLE_PG: &str =
    "CREATE TABLE users (id BIGINT PRIMARY KEY, name VARCHAR(100), score INT, note TEXT)";

fn create_users(kind: Kind) -> &'static str {
    match kind {
        Kind::My => {
            "CREATE TABLE users (id BIGINT PRIMARY KEY, name VARCHAR(100), score INT, note TEXT) ENGINE=InnoDB"
        }
        _ => TABLE_PG,
    }
}

/// The rows of `users` as text, read with each engine's own casts.
async fn dump(db: &TestDb) -> Vec<Vec<Option<String>>> {
    let sql = match db.kind {
        Kind::Pg => "SELECT id::text, name, score::text, note FROM users ORDER BY users.id",
        Kind::My => {
            "SELECT CAST(id AS CHAR), name, CAST(score AS CHAR), note FROM users ORDER BY users.id"
        }
        Kind::Lite => {
            "SELECT CAST(id AS TEXT), name, CAST(score AS TEXT), note FROM users ORDER BY users.id"
        }
    };
    db.rows(sql).await
}

async fn fill(db: &TestDb, from: i64, to: i64) {
    let mut i = from;
    while i <= to {
        let end = (i + 999).min(to);
        let values: Vec<String> = (i..=end)
            .map(|n| format!("({n}, 'user {n}', {}, 'note {n}')", n % 100))
            .collect();
        db.exec(&format!(
            "INSERT INTO users (id, name, score, note) VALUES {}",
            values.join(", ")
        ))
        .await;
        i = end + 1;
    }
}

/// A burst of mixed single-row writes from several concurrent sessions.
async fn burst(db: &TestDb, base: i64, n: i64) {
    let mut tasks = Vec::new();
    for w in 0..4 {
        let pool = db.pool.clone();
        tasks.push(tokio::spawn(async move {
            for j in 0..n / 4 {
                let i = base + w * (n / 4) + j;
                let sql = match j % 5 {
                    0 | 1 => format!(
                        "INSERT INTO users (id, name, score, note) VALUES ({i}, 'new ü {i}', 1, '')"
                    ),
                    2 => format!(
                        "UPDATE users SET score = score + 1, note = NULL WHERE id = {}",
                        i % 3000 + 1
                    ),
                    3 => format!("DELETE FROM users WHERE id = {}", (i * 7) % 3000 + 1),
                    _ => format!(
                        "UPDATE users SET id = id + 5000000 WHERE id = {}",
                        (i * 13) % 3000 + 1
                    ),
                };
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .execute(&pool)
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Two fresh PostgreSQL databases, each with an empty `users` table.
async fn pg_pair() -> (TestDb, TestDb) {
    let src = TestDb::new(Kind::Pg).await;
    let dst = TestDb::new(Kind::Pg).await;
    src.exec(TABLE_PG).await;
    dst.exec(TABLE_PG).await;
    (src, dst)
}

fn pair_yaml(name: &str, src: &TestDb, dst: &TestDb, extra: &str) -> String {
    format!(
        "backends:\n  m: {{ endpoints: [\"http://127.0.0.1:9\"] }}\ndefault_backend: m\nsync:\n  - name: {name}\n    source: {{ url: \"{}\", table: users, key: [id] }}\n    target: {{ url: \"{}\", table: users, key: [id] }}\n{extra}",
        src.url(),
        dst.url()
    )
}

fn sync_cli(path: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .arg("sync")
        .args(args)
        .arg("--config")
        .arg(path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn install(path: &Path) {
    let (ok, out, err) = sync_cli(path, &["install"]);
    assert!(ok, "sync install failed: {out}{err}");
}

async fn wait_equal(src: &TestDb, dst: &TestDb, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let (a, b) = (dump(src).await, dump(dst).await);
        if a == b {
            return;
        }
        if std::time::Instant::now() > deadline {
            if let Some(i) = (0..a.len().min(b.len())).find(|&i| a[i] != b[i]) {
                eprintln!("first difference at row {i}: {:?} vs {:?}", a[i], b[i]);
            }
            let diff: Vec<_> = a.iter().filter(|r| !b.contains(r)).take(5).collect();
            let extra: Vec<_> = b.iter().filter(|r| !a.contains(r)).take(5).collect();
            panic!(
                "tables differ after {timeout:?}: {} vs {} rows; only in source {diff:?}; only in target {extra:?}",
                a.len(),
                b.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn sync_status(proxy: &Switchyard) -> serde_json::Value {
    let (status, body) = admin_call(proxy, "GET", "/v1/sync", "").await;
    assert!(status.is_success(), "{status} {body}");
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["sync"][0].clone()
}

async fn backfill_then_burst(src_kind: Kind, dst_kind: Kind) {
    let src = TestDb::new(src_kind).await;
    let dst = TestDb::new(dst_kind).await;
    src.exec(create_users(src_kind)).await;
    dst.exec(create_users(dst_kind)).await;
    fill(&src, 1, 3000).await;
    let (_dir, path) = write_config(&pair_yaml("users", &src, &dst, ""));
    install(&path);
    let proxy = Switchyard::start_file(&path);
    burst(&src, 10_000, 2000).await;
    wait_equal(&src, &dst, Duration::from_secs(30)).await;
    let s = sync_status(&proxy).await;
    assert_eq!(s["phase"], "stream", "{s}");
    assert_eq!(s["backfill_rows_copied"], s["backfill_rows_total"], "{s}");
    assert!(s["changes_applied"].as_u64().unwrap() > 0, "{s}");
    let metrics = proxy.metrics().await;
    assert!(metrics.contains("switchyard_sync_lag_seconds{sync=\"users\"}"));
    assert!(
        metrics.contains(
            "switchyard_sync_changes_total{sync=\"users\",direction=\"source_to_target\"}"
        )
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_to_pg_backfill_and_burst_end_equal() {
    backfill_then_burst(Kind::Pg, Kind::Pg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_to_pg_backfill_and_burst_end_equal() {
    backfill_then_burst(Kind::My, Kind::Pg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_to_sqlite_backfill_and_burst_end_equal() {
    backfill_then_burst(Kind::Lite, Kind::Lite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_during_backfill_are_kept_and_never_overwritten() {
    let (src, dst) = pg_pair().await;
    fill(&src, 1, 60_000).await;
    let (_dir, path) = write_config(&pair_yaml("users", &src, &dst, ""));
    install(&path);
    let proxy = Switchyard::start_file(&path);
    // Each write raises a row's score above anything the backfill could have read, so an
    // older backfill copy landing after it would show as a lower score.
    let mut writes = 0;
    loop {
        let s = sync_status(&proxy).await;
        let done = s["phase"] == "stream";
        for k in 0..20 {
            let id = (writes * 2971 + k * 101) % 60_000 + 1;
            src.exec(&format!(
                "UPDATE users SET score = 1000 + {writes}, note = 'during backfill' WHERE id = {id}"
            ))
            .await;
        }
        writes += 1;
        if done {
            break;
        }
    }
    assert!(
        writes > 3,
        "the backfill finished before the writes started"
    );
    wait_equal(&src, &dst, Duration::from_secs(30)).await;
    let touched = dst
        .scalar_i64("SELECT COUNT(*) FROM users WHERE note = 'during backfill'")
        .await;
    assert!(touched > 0);
}

/// Changes made while no worker runs, then a worker that aborts at `failpoint`, then a clean
/// restart: the tables end equal and every captured change was applied exactly once.
async fn crash_at(failpoint: &str) {
    let (src, dst) = pg_pair().await;
    fill(&src, 1, 3000).await;
    let (_dir, path) = write_config(&pair_yaml("users", &src, &dst, ""));
    install(&path);
    {
        let proxy = Switchyard::start_file(&path);
        wait_equal(&src, &dst, Duration::from_secs(30)).await;
        let _ = proxy;
    }
    // 12,000 single-row updates: 12,000 captured changes, three batches of 5,000.
    for round in 0..4 {
        src.exec(&format!(
            "UPDATE users SET score = score + {round} + 1 WHERE id <= 3000"
        ))
        .await;
    }
    let captured = src.count("switchyard_chg_users").await;
    assert_eq!(captured, 12_000);
    let applied_before = dst
        .scalar_i64("SELECT applied FROM switchyard_sync_state WHERE name = 'users'")
        .await;
    let mut crashing = Switchyard::start_env(&path, &[], &[("SWITCHYARD_FAILPOINT", failpoint)]);
    let status = crashing.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "the failpoint {failpoint} did not fire");
    let _proxy = Switchyard::start_file(&path);
    wait_equal(&src, &dst, Duration::from_secs(30)).await;
    eventually(Duration::from_secs(10), "change table drained", || async {
        src.count("switchyard_chg_users").await == 0
    })
    .await;
    let applied = dst
        .scalar_i64("SELECT applied FROM switchyard_sync_state WHERE name = 'users'")
        .await;
    assert_eq!(
        applied - applied_before,
        captured,
        "changes applied more or less than once after a crash at {failpoint}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_the_target_commit_loses_nothing() {
    crash_at("before_target_commit:2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_the_target_commit_applies_nothing_twice() {
    crash_at("after_target_commit:2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_in_the_middle_of_a_backfill_chunk_resumes() {
    let (src, dst) = pg_pair().await;
    fill(&src, 1, 23_000).await;
    let (_dir, path) = write_config(&pair_yaml("users", &src, &dst, ""));
    install(&path);
    // The third apply is the third backfill chunk: rows written, checkpoint not yet.
    let mut crashing =
        Switchyard::start_env(&path, &[], &[("SWITCHYARD_FAILPOINT", "mid_apply:3")]);
    assert!(!crashing.wait_exit(Duration::from_secs(30)).success());
    let copied = dst
        .scalar_i64("SELECT backfill_copied FROM switchyard_sync_state WHERE name = 'users'")
        .await;
    assert_eq!(copied, 10_000, "two chunks were committed before the crash");
    assert_eq!(
        dst.count("users").await,
        10_000,
        "the third chunk rolled back"
    );
    let proxy = Switchyard::start_file(&path);
    wait_equal(&src, &dst, Duration::from_secs(30)).await;
    eventually(Duration::from_secs(10), "backfill complete", || async {
        let s = sync_status(&proxy).await;
        s["phase"] == "stream" && s["backfill_rows_copied"] == 23_000
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_that_commits_late_is_not_skipped() {
    let (src, dst) = pg_pair().await;
    let (_dir, path) = write_config(&pair_yaml("users", &src, &dst, ""));
    install(&path);
    let _proxy = Switchyard::start_file(&path);
    let mut early = src.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO users (id, name, score, note) VALUES (1, 'early', 1, 'x')")
        .execute(&mut *early)
        .await
        .unwrap();
    // A later change takes a higher sequence number and commits first.
    src.exec("INSERT INTO users (id, name, score, note) VALUES (2, 'late', 2, 'y')")
        .await;
    eventually(
        Duration::from_secs(10),
        "the later change applied",
        || async { dst.count("users").await == 1 },
    )
    .await;
    early.commit().await.unwrap();
    wait_equal(&src, &dst, Duration::from_secs(10)).await;
    assert_eq!(dst.count("users").await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bidirectional_writes_arrive_once_without_echo() {
    let src = TestDb::new(Kind::Pg).await;
    let dst = TestDb::new(Kind::My).await;
    src.exec(TABLE_PG).await;
    dst.exec(create_users(Kind::My)).await;
    let (_dir, path) = write_config(&pair_yaml(
        "users",
        &src,
        &dst,
        "    direction: bidirectional\n    conflict: source_wins\n",
    ));
    install(&path);
    let _proxy = Switchyard::start_file(&path);
    src.exec("INSERT INTO users (id, name, score, note) VALUES (1, 'from legacy', 1, 'a')")
        .await;
    dst.exec("INSERT INTO users (id, name, score, note) VALUES (2, 'from service', 2, 'b')")
        .await;
    wait_equal(&src, &dst, Duration::from_secs(10)).await;
    eventually(
        Duration::from_secs(10),
        "both change tables drained",
        || async {
            src.count("switchyard_chg_users").await == 0
                && dst.count("switchyard_chg_users").await == 0
        },
    )
    .await;
    // Exactly one change each way: an echo would show as a second applied change.
    let forward = dst
        .scalar_i64("SELECT applied FROM switchyard_sync_state WHERE name = 'users'")
        .await;
    let reverse = src
        .scalar_i64("SELECT applied FROM switchyard_sync_state WHERE name = 'users:reverse'")
        .await;
    assert_eq!((forward, reverse), (1, 1));
    dst.exec("UPDATE users SET score = 20 WHERE id = 2").await;
    wait_equal(&src, &dst, Duration::from_secs(10)).await;
    let reverse = src
        .scalar_i64("SELECT applied FROM switchyard_sync_state WHERE name = 'users:reverse'")
        .await;
    assert_eq!(reverse, 2);
    let forward = dst
        .scalar_i64("SELECT applied FROM switchyard_sync_state WHERE name = 'users'")
        .await;
    assert_eq!(forward, 1, "the applied update echoed back");
}

/// Both sides change one key while no worker runs; the rule decides, and the conflict is
/// logged on the side where it was decided.
async fn conflict_case(rule: &str, expect_name: &str) {
    let src = TestDb::new(Kind::Pg).await;
    let dst = TestDb::new(Kind::Pg).await;
    let table = "CREATE TABLE users (id BIGINT PRIMARY KEY, name VARCHAR(100), score INT, note TEXT, updated_at TIMESTAMP(6))";
    src.exec(table).await;
    dst.exec(table).await;
    src.exec("INSERT INTO users VALUES (1, 'original', 0, '', '2024-01-01 00:00:00')")
        .await;
    let (_dir, path) = write_config(&pair_yaml(
        "users",
        &src,
        &dst,
        &format!("    direction: bidirectional\n    conflict: {rule}\n"),
    ));
    install(&path);
    {
        let _proxy = Switchyard::start_file(&path);
        wait_equal(&src, &dst, Duration::from_secs(10)).await;
    }
    src.exec(
        "UPDATE users SET name = 'legacy edit', updated_at = '2024-01-01 00:00:02' WHERE id = 1",
    )
    .await;
    dst.exec(
        "UPDATE users SET name = 'service edit', updated_at = '2024-01-01 00:00:05' WHERE id = 1",
    )
    .await;
    let _proxy = Switchyard::start_file(&path);
    wait_equal(&src, &dst, Duration::from_secs(10)).await;
    let name = &src.rows("SELECT name FROM users WHERE id = 1").await[0][0];
    assert_eq!(name.as_deref(), Some(expect_name), "rule {rule}");
    let logged =
        dst.count("switchyard_sync_conflicts").await + src.count("switchyard_sync_conflicts").await;
    assert_eq!(logged, 1, "one conflict logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_resolve_by_source_wins() {
    conflict_case("source_wins", "legacy edit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_resolve_by_target_wins() {
    conflict_case("target_wins", "service edit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_resolve_by_last_write_wins() {
    conflict_case(
        "{ last_write_wins: { column: updated_at } }",
        "service edit",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_to_pg_types_arrive_intact() {
    let src = TestDb::new(Kind::My).await;
    let dst = TestDb::new(Kind::Pg).await;
    src.exec(
        "CREATE TABLE users (id INT PRIMARY KEY, active TINYINT(1), seen DATETIME(6), \
         balance DECIMAL(12,3), bio TEXT, nick VARCHAR(20)) ENGINE=InnoDB CHARACTER SET utf8mb4",
    )
    .await;
    dst.exec(
        "CREATE TABLE users (id INT PRIMARY KEY, active BOOLEAN, seen TIMESTAMP(6), \
         balance NUMERIC(12,3), bio TEXT, nickname VARCHAR(20))",
    )
    .await;
    src.exec(
        "INSERT INTO users VALUES \
         (1, 1, '2024-02-29 23:59:59.123456', 12345.678, 'Zoë – naïve café 東京 🚀', ''), \
         (2, 0, '1999-12-31 00:00:00.000001', -0.001, NULL, NULL), \
         (3, NULL, NULL, NULL, '', 'x')",
    )
    .await;
    // `nick` is renamed `nickname` by the new service.
    let (_dir, path) = write_config(&pair_yaml(
        "users",
        &src,
        &dst,
        "    columns: { nick: nickname }\n",
    ));
    install(&path);
    let _proxy = Switchyard::start_file(&path);
    src.exec("INSERT INTO users VALUES (4, 1, '2030-01-01 12:00:00.5', 0.5, 'ß', 'emptybio')")
        .await;
    src.exec("UPDATE users SET bio = '' WHERE id = 2").await;
    let expected = vec![
        vec![
            Some("1"),
            Some("true"),
            Some("2024-02-29 23:59:59.123456"),
            Some("12345.678"),
            Some("Zoë – naïve café 東京 🚀"),
            Some(""),
        ],
        vec![
            Some("2"),
            Some("false"),
            Some("1999-12-31 00:00:00.000001"),
            Some("-0.001"),
            Some(""),
            None,
        ],
        vec![Some("3"), None, None, None, Some(""), Some("x")],
        vec![
            Some("4"),
            Some("true"),
            Some("2030-01-01 12:00:00.5"),
            Some("0.500"),
            Some("ß"),
            Some("emptybio"),
        ],
    ];
    let expected: Vec<Vec<Option<String>>> = expected
        .into_iter()
        .map(|r| r.into_iter().map(|v| v.map(str::to_string)).collect())
        .collect();
    eventually(Duration::from_secs(15), "typed rows in PostgreSQL", || async {
        let got = dst.rows(
            "SELECT id::text, active::text, seen::text, balance::text, bio, nickname FROM users ORDER BY users.id",
        )
        .await;
        if got != expected {
            eprintln!("got {got:?}");
        }
        dst.rows(
            "SELECT id::text, active::text, seen::text, balance::text, bio, nickname FROM users ORDER BY users.id",
        )
        .await
            == expected
    })
    .await;
    let got = dst
        .rows("SELECT active::text FROM users WHERE id = 1")
        .await;
    assert_eq!(got[0][0].as_deref(), Some("true"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_database_down_and_back_loses_nothing() {
    let (src, dst) = pg_pair().await;
    fill(&src, 1, 1000).await;
    let (_dir, path) = write_config(&pair_yaml("users", &src, &dst, ""));
    install(&path);
    let proxy = Switchyard::start_file(&path);
    burst(&src, 10_000, 400).await;
    src.pg_stop().await;
    eventually(
        Duration::from_secs(15),
        "the worker reports the outage",
        || async {
            let s = sync_status(&proxy).await;
            !s["last_error"].is_null()
        },
    )
    .await;
    // The proxy keeps serving meanwhile.
    let (status, _) = admin_call(&proxy, "GET", "/v1/routes", "").await;
    assert!(status.is_success());
    src.pg_start().await;
    burst(&src, 20_000, 400).await;
    wait_equal(&src, &dst, Duration::from_secs(30)).await;
    eventually(Duration::from_secs(15), "the error clears", || async {
        sync_status(&proxy).await["last_error"].is_null()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_holds_the_lease_and_another_takes_over() {
    let (src, dst) = pg_pair().await;
    let (_dir, path) = write_config(&pair_yaml("users", &src, &dst, ""));
    install(&path);
    let first = Switchyard::start_file(&path);
    let second = Switchyard::start_file(&path);
    eventually(
        Duration::from_secs(10),
        "one leader, one standby",
        || async {
            let a = sync_status(&first).await;
            let b = sync_status(&second).await;
            let phases = [a["phase"].as_str().unwrap(), b["phase"].as_str().unwrap()];
            a["leader"].as_bool().unwrap() != b["leader"].as_bool().unwrap()
                && phases.contains(&"standby")
        },
    )
    .await;
    let (leader, standby) = if sync_status(&first).await["leader"] == true {
        (first, second)
    } else {
        (second, first)
    };
    assert_eq!(sync_status(&standby).await["phase"], "standby");
    leader.signal("KILL");
    let killed = std::time::Instant::now();
    src.exec("INSERT INTO users VALUES (1, 'after failover', 1, '')")
        .await;
    wait_equal(&src, &dst, Duration::from_secs(15)).await;
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "takeover took {:?}",
        killed.elapsed()
    );
    assert_eq!(sync_status(&standby).await["leader"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_checks_first_and_dry_run_changes_nothing() {
    let src = TestDb::new(Kind::Lite).await;
    let dst = TestDb::new(Kind::Lite).await;
    src.exec("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT, score INT, note TEXT)")
        .await;
    // No primary key, no `score`, and `note` holds bytes.
    dst.exec("CREATE TABLE users (id INTEGER, name TEXT, note BLOB)")
        .await;
    let (_dir, path) = write_config(&pair_yaml(
        "users",
        &src,
        &dst,
        "    columns: { score: points }\n",
    ));
    let (ok, out, err) = sync_cli(&path, &["install"]);
    assert!(!ok, "{out}");
    assert!(
        err.contains("target table `users` has no primary key"),
        "{err}"
    );
    assert!(
        err.contains("mapped column `points` does not exist in target table"),
        "{err}"
    );
    assert!(err.contains("column `note` is text"), "{err}");

    let (_dir2, path2) = write_config(&pair_yaml("users", &src, &dst, "").replace(
        "table: users, key: [id] }\n    target: { url: \"sqlite",
        "table: nope, key: [id] }\n    target: { url: \"sqlite",
    ));
    let (ok, _, err) = sync_cli(&path2, &["install"]);
    assert!(!ok);
    assert!(err.contains("source table `nope` does not exist"), "{err}");

    dst.exec("DROP TABLE users").await;
    dst.exec("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT, score INT, note TEXT)")
        .await;
    let (_dir3, path3) = write_config(&pair_yaml("users", &src, &dst, ""));
    let (ok, out, err) = sync_cli(&path3, &["install", "--dry-run"]);
    assert!(ok, "{err}");
    assert!(out.contains("CREATE TRIGGER switchyard_users_ins"), "{out}");
    let triggers = src
        .scalar_i64("SELECT COUNT(*) FROM sqlite_master WHERE type = 'trigger'")
        .await;
    assert_eq!(triggers, 0, "--dry-run created triggers");
    install(&path3);
    let triggers = src
        .scalar_i64("SELECT COUNT(*) FROM sqlite_master WHERE type = 'trigger'")
        .await;
    assert_eq!(triggers, 3);
    let (ok, _, err) = sync_cli(&path3, &["uninstall"]);
    assert!(ok, "{err}");
    let triggers = src
        .scalar_i64("SELECT COUNT(*) FROM sqlite_master WHERE type = 'trigger'")
        .await;
    assert_eq!(triggers, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_names_the_privileges_a_user_lacks() {
    let (src, dst) = pg_pair().await;
    let role = format!("{}_ro", dst.name());
    dst.admin(&format!("CREATE ROLE \"{role}\" LOGIN")).await;
    dst.exec(&format!("GRANT SELECT ON users TO \"{role}\""))
        .await;
    let yaml = pair_yaml("users", &src, &dst, "").replace(&dst.url(), &dst.url_as(&role));
    let (_dir, path) = write_config(&yaml);
    let (ok, out, err) = sync_cli(&path, &["install"]);
    dst.exec(&format!("REVOKE ALL ON users FROM \"{role}\""))
        .await;
    dst.admin(&format!("DROP ROLE \"{role}\"")).await;
    assert!(!ok, "{out}");
    assert!(
        err.contains("the target user lacks INSERT, UPDATE, DELETE, TRIGGER on `users`"),
        "{err}"
    );
}

// ---- Unique constraints on the receiving side -------------------------------------------------

const ACCT: &str =
    "CREATE TABLE acct (id integer PRIMARY KEY, email varchar(100) NOT NULL UNIQUE, name text)";
const ACCT2: &str = "CREATE TABLE acct2 (a integer NOT NULL, b integer NOT NULL, code varchar(20) NOT NULL, \
     note text, PRIMARY KEY (a, b), UNIQUE (code))";

/// `acct` and `acct2` rows as text, ordered by key, read with the engine's own casts.
async fn dump_acct(db: &TestDb) -> (Vec<Vec<Option<String>>>, Vec<Vec<Option<String>>>) {
    let (one, two) = match db.kind {
        Kind::My => (
            "SELECT CAST(id AS CHAR), email, name FROM acct ORDER BY acct.id",
            "SELECT CAST(a AS CHAR), CAST(b AS CHAR), code, note FROM acct2 ORDER BY acct2.a, acct2.b",
        ),
        _ => (
            "SELECT CAST(id AS TEXT), email, name FROM acct ORDER BY acct.id",
            "SELECT CAST(a AS TEXT), CAST(b AS TEXT), code, note FROM acct2 ORDER BY acct2.a, acct2.b",
        ),
    };
    (db.rows(one).await, db.rows(two).await)
}

async fn wait_acct_equal(src: &TestDb, dst: &TestDb, step: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (a, b) = (dump_acct(src).await, dump_acct(dst).await);
        if a == b {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "after {step}: source {a:?} but target {b:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs each SQL text as one transaction on the source.
async fn txn(db: &TestDb, stmts: &[&str]) {
    let mut tx = db.pool.begin().await.unwrap();
    for s in stmts {
        sqlx::query(sqlx::AssertSqlSafe(s.to_string()))
            .execute(&mut *tx)
            .await
            .unwrap_or_else(|e| panic!("{s}: {e}"));
    }
    tx.commit().await.unwrap();
}

async fn unique_columns_stay_equal(dst_kind: Kind) {
    let src = TestDb::new(Kind::Pg).await;
    let dst = TestDb::new(dst_kind).await;
    for db in [&src, &dst] {
        db.exec(ACCT).await;
        db.exec(ACCT2).await;
    }
    src.exec("INSERT INTO acct VALUES (1,'a@example.test','A'), (2,'b@example.test','B'), (3,'c@example.test','C')")
        .await;
    src.exec("INSERT INTO acct2 VALUES (1,1,'x','one'), (1,2,'y','two'), (2,1,'z','three')")
        .await;
    // MariaDB's default collation ignores case; these values differ in more than case.
    let extra = if dst_kind == Kind::My {
        "    accept_looser_collation: true\n"
    } else {
        ""
    };
    let yaml = format!(
        "backends:\n  m: {{ endpoints: [\"http://127.0.0.1:9\"] }}\ndefault_backend: m\nsync:\n\
         \x20 - name: acct\n    source: {{ url: \"{s}\", table: acct, key: [id] }}\n    target: {{ url: \"{t}\", table: acct, key: [id] }}\n{extra}\
         \x20 - name: acct2\n    source: {{ url: \"{s}\", table: acct2, key: [a, b] }}\n    target: {{ url: \"{t}\", table: acct2, key: [a, b] }}\n{extra}",
        s = src.url(),
        t = dst.url()
    );
    let (_dir, path) = write_config(&yaml);
    install(&path);
    let proxy = Switchyard::start_file(&path);
    wait_acct_equal(&src, &dst, "the backfill").await;

    // The reported case: a key change on a row with a unique value.
    src.exec("UPDATE acct SET id = 10 WHERE id = 1").await;
    wait_acct_equal(&src, &dst, "UPDATE acct SET id = 10 WHERE id = 1").await;
    // Two rows swap their unique values inside one transaction.
    txn(
        &src,
        &[
            "UPDATE acct SET email = 'tmp@example.test' WHERE id = 2",
            "UPDATE acct SET email = 'b@example.test' WHERE id = 3",
            "UPDATE acct SET email = 'c@example.test' WHERE id = 2",
        ],
    )
    .await;
    wait_acct_equal(&src, &dst, "a swap in one transaction").await;
    // A row deleted and another inserted with its unique value, in one transaction.
    txn(
        &src,
        &[
            "DELETE FROM acct WHERE id = 10",
            "INSERT INTO acct VALUES (11, 'a@example.test', 'A again')",
        ],
    )
    .await;
    wait_acct_equal(&src, &dst, "delete and insert reusing a value").await;
    // A key changed back and forth, in one transaction and in two.
    txn(
        &src,
        &[
            "UPDATE acct SET id = 20 WHERE id = 11",
            "UPDATE acct SET id = 11 WHERE id = 20",
        ],
    )
    .await;
    src.exec("UPDATE acct SET id = 30 WHERE id = 3").await;
    src.exec("UPDATE acct SET id = 3 WHERE id = 30").await;
    wait_acct_equal(&src, &dst, "a key back and forth").await;
    // Three rows rotate their values, and a key and a value move together.
    txn(
        &src,
        &[
            "UPDATE acct SET email = 't1' WHERE id = 2",
            "UPDATE acct SET email = 'c@example.test' WHERE id = 11",
            "UPDATE acct SET email = 'a@example.test' WHERE id = 3",
            "UPDATE acct SET email = 'b@example.test' WHERE id = 2",
            "UPDATE acct SET id = 12 WHERE id = 11",
        ],
    )
    .await;
    wait_acct_equal(&src, &dst, "a rotation of three values").await;
    // Composite keys: a key part changes, codes swap, a code is reused.
    txn(
        &src,
        &[
            "UPDATE acct2 SET b = 9 WHERE a = 1 AND b = 1",
            "UPDATE acct2 SET code = 'q' WHERE a = 1 AND b = 2",
            "UPDATE acct2 SET code = 'y' WHERE a = 2 AND b = 1",
            "UPDATE acct2 SET code = 'z' WHERE a = 1 AND b = 2",
            "DELETE FROM acct2 WHERE a = 1 AND b = 9",
            "INSERT INTO acct2 VALUES (3, 3, 'x', 'reused')",
        ],
    )
    .await;
    wait_acct_equal(&src, &dst, "composite key changes").await;

    // A row the target cannot hold (its value is taken by a row only the target has): reported
    // with its key and the constraint, while every other change keeps flowing.
    dst.exec("INSERT INTO acct VALUES (99, 'only-target@example.test', 'intruder')")
        .await;
    src.exec("INSERT INTO acct VALUES (40, 'only-target@example.test', 'blocked')")
        .await;
    src.exec("INSERT INTO acct VALUES (41, 'free@example.test', 'flows')")
        .await;
    eventually(
        Duration::from_secs(20),
        "the refused row is reported",
        || async {
            let (status, body) = admin_call(&proxy, "GET", "/v1/sync", "").await;
            assert!(status.is_success());
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            let acct = v["sync"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["name"] == "acct")
                .cloned()
                .unwrap();
            let err = acct["last_error"].as_str().unwrap_or_default().to_string();
            let landed = dst
                .scalar_i64("SELECT COUNT(*) FROM acct WHERE id = 41")
                .await
                == 1;
            landed && err.contains("key [40]") && err.to_lowercase().contains("email")
        },
    )
    .await;
    dst.exec("DELETE FROM acct WHERE id = 99").await;
    wait_acct_equal(&src, &dst, "the intruder left the target").await;
    eventually(Duration::from_secs(10), "the error clears", || async {
        let (_, body) = admin_call(&proxy, "GET", "/v1/sync", "").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["sync"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["last_error"].is_null())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_columns_pg_to_pg() {
    unique_columns_stay_equal(Kind::Pg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unique_columns_pg_to_mariadb() {
    unique_columns_stay_equal(Kind::My).await;
}

// ---- Collations ------------------------------------------------------------------------------

fn keyed_yaml(src: &TestDb, dst: &TestDb, key: &str, extra: &str) -> String {
    format!(
        "backends:\n  m: {{ endpoints: [\"http://127.0.0.1:9\"] }}\ndefault_backend: m\nsync:\n  - name: users\n    source: {{ url: \"{}\", table: users, key: [{key}] }}\n    target: {{ url: \"{}\", table: users, key: [{key}] }}\n{extra}",
        src.url(),
        dst.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_refuses_a_target_key_that_compares_more_loosely_and_the_worker_counts_what_the_target_holds()
 {
    let src = TestDb::new(Kind::Pg).await;
    let dst = TestDb::new(Kind::My).await;
    src.exec("CREATE TABLE users (k text PRIMARY KEY, email text UNIQUE, v text)")
        .await;
    src.exec("INSERT INTO users VALUES ('a', 'x1', '1'), ('A', 'x2', '2'), ('b', 'x3', '3'), ('B', 'x4', '4')")
        .await;
    let path_for = |extra: &str| write_config(&keyed_yaml(&src, &dst, "k", extra));
    // Case-insensitive (the MariaDB default), pad-space, and exact keys.
    for (ddl, refused) in [
        (
            "CREATE TABLE users (k varchar(50) PRIMARY KEY, email varchar(50) COLLATE utf8mb4_nopad_bin UNIQUE, v text)",
            Some("ignores case"),
        ),
        (
            "CREATE TABLE users (k varchar(50) COLLATE utf8mb4_bin PRIMARY KEY, email varchar(50) COLLATE utf8mb4_nopad_bin UNIQUE, v text)",
            Some("ignores trailing spaces"),
        ),
        (
            "CREATE TABLE users (k varchar(50) COLLATE utf8mb4_nopad_bin PRIMARY KEY, email varchar(50) UNIQUE, v text)",
            Some("unique index `email`"),
        ),
        (
            "CREATE TABLE users (k varchar(50) COLLATE utf8mb4_nopad_bin PRIMARY KEY, email varchar(50) CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin UNIQUE, v text)",
            None,
        ),
    ] {
        dst.exec("DROP TABLE IF EXISTS users").await;
        dst.exec(ddl).await;
        let (_dir, path) = path_for("");
        let (ok, out, err) = sync_cli(&path, &["install", "--dry-run"]);
        match refused {
            Some(why) => {
                assert!(!ok, "{ddl}: install accepted it: {out}");
                assert!(err.contains(why), "{ddl}: {err}");
                assert!(err.contains("accept_looser_collation"), "{err}");
            }
            None => assert!(ok, "{ddl}: {out}{err}"),
        }
    }
    // Accepted explicitly: the rows that collide are never counted as copied.
    dst.exec("DROP TABLE users").await;
    dst.exec("CREATE TABLE users (k varchar(50) PRIMARY KEY, email varchar(50), v text)")
        .await;
    let (_dir, path) = path_for("    accept_looser_collation: true\n");
    install(&path);
    let proxy = Switchyard::start_file(&path);
    eventually(Duration::from_secs(20), "the backfill ends", || async {
        sync_status(&proxy).await["phase"] == "stream"
    })
    .await;
    let held = dst.count("users").await;
    assert_eq!(held, 2, "the target merges a/A and b/B");
    eventually(
        Duration::from_secs(10),
        "the refusal is reported",
        || async {
            let s = sync_status(&proxy).await;
            s["backfill_rows_copied"] == held
                && s["backfill_rows_total"] == 4
                && s["last_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("refused by the target"))
        },
    )
    .await;
}

//! The consistency sampler and the full check end to end, on real PostgreSQL, MariaDB and
//! SQLite: equal pairs reported equal, injected differences found exactly, in-flight changes
//! never counted, repair through the sync worker.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::db::{Kind, TestDb};
use support::{Switchyard, admin_call, eventually, write_config};

fn pair_yaml(src: &TestDb, dst: &TestDb, key: &str, extra: &str, rate: &str) -> String {
    format!(
        "backends:\n  m: {{ endpoints: [\"http://127.0.0.1:9\"] }}\ndefault_backend: m\nsync:\n  - name: users\n    source: {{ url: \"{}\", table: users, key: [{key}] }}\n    target: {{ url: \"{}\", table: users, key: [{key}] }}\n{extra}consistency:\n  - {{ sync: users, sample_rate: {rate}, window: 5m }}\n",
        src.url(),
        dst.url()
    )
}

struct CheckRun {
    code: i32,
    report: serde_json::Value,
    stderr: String,
}

fn check(path: &Path, repair: bool) -> CheckRun {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.args([
        "consistency",
        "check",
        "--sync",
        "users",
        "--output",
        "json",
        "--config",
    ])
    .arg(path);
    if repair {
        cmd.arg("--repair");
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    CheckRun {
        code: out.status.code().unwrap_or(-1),
        report: serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

async fn sampled(proxy: &Switchyard) -> serde_json::Value {
    let (status, body) = admin_call(proxy, "GET", "/v1/consistency", "").await;
    assert!(status.is_success(), "{status} {body}");
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["consistency"][0].clone()
}

async fn sampler_agrees(proxy: &Switchyard, at_least: u64) -> serde_json::Value {
    eventually(Duration::from_secs(40), "enough samples", || async {
        sampled(proxy).await["sampled"].as_u64().unwrap_or(0) >= at_least
    })
    .await;
    let s = sampled(proxy).await;
    assert_eq!(s["mismatched"], 0, "{s}");
    assert_eq!(s["ratio"], 1.0, "{s}");
    assert_eq!(s["stale"], false, "{s}");
    s
}

/// Tricky values written directly on both sides, in each engine's own types.
async fn tricky_pair(src_kind: Kind, dst_kind: Kind) {
    let src = TestDb::new(src_kind).await;
    let dst = TestDb::new(dst_kind).await;
    for db in [&src, &dst] {
        let ddl = match db.kind {
            Kind::Pg => {
                "CREATE TABLE users (id INT PRIMARY KEY, active BOOLEAN, seen TIMESTAMP(6), at_tz TIMESTAMPTZ, balance NUMERIC(12,3), ratio DOUBLE PRECISION, bio TEXT, nick VARCHAR(20))"
            }
            Kind::My => {
                "CREATE TABLE users (id INT PRIMARY KEY, active TINYINT(1), seen DATETIME(6), at_tz TIMESTAMP(6) NULL, balance DECIMAL(12,3), ratio DOUBLE, bio TEXT, nick VARCHAR(20)) ENGINE=InnoDB CHARACTER SET utf8mb4"
            }
            Kind::Lite => {
                "CREATE TABLE users (id INTEGER PRIMARY KEY, active BOOLEAN, seen DATETIME, at_tz TIMESTAMP, balance DECIMAL(12,3), ratio REAL, bio TEXT, nick VARCHAR(20))"
            }
        };
        db.exec(ddl).await;
        let (t, f) = match db.kind {
            Kind::Pg => ("true", "false"),
            _ => ("1", "0"),
        };
        // The same instants, each written the way its engine takes them.
        let tz = |utc: &str| match db.kind {
            Kind::Pg => format!("'{utc}+00'"),
            Kind::Lite => format!("'{}'", utc.replace(' ', "T")),
            Kind::My => format!("'{utc}'"),
        };
        if db.kind == Kind::My {
            db.exec("SET time_zone = '+00:00'").await;
        }
        db.exec(&format!(
            "INSERT INTO users VALUES \
             (1, {t}, '2024-02-29 23:59:59.123456', {}, 12345.678, 0.1, 'Zoë – naïve café 東京 🚀', ''), \
             (2, {f}, '1999-12-31 00:00:00.000001', {}, -0.001, 1e20, NULL, NULL), \
             (3, NULL, NULL, NULL, NULL, NULL, '', 'x'), \
             (4, {t}, '2030-01-01 12:00:00', {}, 0.5, -2.5, 'ß', 'Tab\tQuote''s')",
            tz("2024-06-01 08:00:00.5"),
            tz("1970-01-01 00:00:01"),
            tz("2030-01-01 12:00:00"),
        ))
        .await;
    }
    let (_dir, path) = write_config(&pair_yaml(&src, &dst, "id", "", "200/s"));
    let run = check(&path, false);
    assert_eq!(run.code, 0, "{} {}", run.report, run.stderr);
    assert_eq!(run.report["rows_compared"], 4);
    let proxy = Switchyard::start_file(&path);
    sampler_agrees(&proxy, 40).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tricky_types_equal_pg_vs_pg() {
    tricky_pair(Kind::Pg, Kind::Pg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tricky_types_equal_mysql_vs_pg() {
    tricky_pair(Kind::My, Kind::Pg).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tricky_types_equal_sqlite_vs_sqlite() {
    tricky_pair(Kind::Lite, Kind::Lite).await;
}

const USERS: &str =
    "CREATE TABLE users (id BIGINT PRIMARY KEY, name VARCHAR(100), score INT, note TEXT)";

async fn fill(db: &TestDb, n: i64) {
    db.exec(&format!(
        "INSERT INTO users SELECT g, 'user ' || g, g % 100, 'note ' || g FROM generate_series(1, {n}) g"
    ))
    .await;
}

async fn inject_three(dst: &TestDb, changed: i64, missing: i64, extra: i64) {
    dst.exec(&format!("UPDATE users SET score = -1 WHERE id = {changed}"))
        .await;
    dst.exec(&format!("DELETE FROM users WHERE id = {missing}"))
        .await;
    dst.exec(&format!(
        "INSERT INTO users VALUES ({extra}, 'ghost', 0, NULL)"
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_check_finds_exactly_three_differences_in_100k_rows() {
    let src = TestDb::new(Kind::Pg).await;
    let dst = TestDb::new(Kind::Pg).await;
    src.exec(USERS).await;
    dst.exec(USERS).await;
    fill(&src, 100_000).await;
    fill(&dst, 100_000).await;
    inject_three(&dst, 31_337, 77_777, 100_500).await;
    let (_dir, path) = write_config(&pair_yaml(&src, &dst, "id", "", "10/s"));
    let run = check(&path, false);
    assert_eq!(run.code, 3, "{} {}", run.report, run.stderr);
    let r = &run.report;
    assert_eq!(
        r["missing_in_target"],
        serde_json::json!([["77777"]]),
        "{r}"
    );
    assert_eq!(r["extra_in_target"], serde_json::json!([["100500"]]), "{r}");
    assert_eq!(
        r["different"],
        serde_json::json!([{ "key": ["31337"], "columns": ["score"] }]),
        "{r}"
    );
    assert!(r["rows_compared"].as_u64().unwrap() >= 99_999, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sampler_drops_below_one_once_it_samples_differences() {
    let src = TestDb::new(Kind::Pg).await;
    let dst = TestDb::new(Kind::Pg).await;
    src.exec(USERS).await;
    dst.exec(USERS).await;
    fill(&src, 200).await;
    fill(&dst, 200).await;
    let (_dir, path) = write_config(&pair_yaml(&src, &dst, "id", "", "400/s"));
    let proxy = Switchyard::start_file(&path);
    sampler_agrees(&proxy, 100).await;
    inject_three(&dst, 10, 20, 300).await;
    // Each kind of difference is found: changed, missing on the target, extra on the target.
    eventually(
        Duration::from_secs(40),
        "all three differences sampled",
        || async {
            let s = sampled(&proxy).await;
            let kinds: Vec<String> = s["mismatches"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["kind"].as_str().unwrap().to_string())
                .collect();
            s["ratio"].as_f64().unwrap() < 1.0
                && ["different", "missing_in_target", "missing_in_source"]
                    .iter()
                    .all(|k| kinds.iter().any(|x| x == k))
        },
    )
    .await;
    let metrics = proxy.metrics().await;
    assert!(metrics.contains("switchyard_consistency_ratio{sync=\"users\"}"));
}

fn install(path: &Path) {
    support::sync_install(path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_worker_streams_in_flight_keys_are_never_mismatches() {
    let src = TestDb::new(Kind::Pg).await;
    let dst = TestDb::new(Kind::Pg).await;
    src.exec(USERS).await;
    dst.exec(USERS).await;
    fill(&src, 500).await;
    let (_dir, path) = write_config(&pair_yaml(&src, &dst, "id", "", "300/s"));
    install(&path);
    let proxy = Switchyard::start_file(&path);
    eventually(Duration::from_secs(20), "backfill done", || async {
        dst.count("users").await == 500
    })
    .await;
    // About 1,000 changes a second for 30 s (four sessions, 250/s each), on the keys the
    // sampler draws.
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let pool = src.pool.clone();
            tokio::spawn(async move {
                let start = std::time::Instant::now();
                let mut i: i64 = 0;
                let mut tick = tokio::time::interval(Duration::from_millis(4));
                while start.elapsed() < Duration::from_secs(30) {
                    tick.tick().await;
                    i += 1;
                    let id = (i * 37 + w * 101) % 500 + 1;
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "UPDATE users SET score = score + 1, note = 'w{w}-{i}' WHERE id = {id}"
                    )))
                    .execute(&pool)
                    .await
                    .unwrap();
                }
                i
            })
        })
        .collect();
    let mut written = 0;
    for w in writers {
        written += w.await.unwrap();
    }
    assert!(written >= 20_000, "only {written} changes written");
    let s = sampled(&proxy).await;
    assert_eq!(
        s["mismatched"], 0,
        "in-flight keys counted as mismatches: {s}"
    );
    assert!(s["sampled"].as_u64().unwrap() > 1000, "{s}");
    // A real difference, made behind the worker's back, is found.
    for id in 1..=25 {
        dst.exec(&format!(
            "UPDATE users SET name = 'tampered' WHERE id = {id}"
        ))
        .await;
    }
    eventually(Duration::from_secs(30), "a real mismatch found", || async {
        sampled(&proxy).await["mismatched"].as_u64().unwrap_or(0) > 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_keys_compare_without_collation_surprises_mysql_vs_pg() {
    let src = TestDb::new(Kind::My).await;
    let dst = TestDb::new(Kind::Pg).await;
    src.exec("CREATE TABLE users (code VARCHAR(40) PRIMARY KEY, name TEXT) ENGINE=InnoDB CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci").await;
    dst.exec("CREATE TABLE users (code VARCHAR(40) PRIMARY KEY, name TEXT)")
        .await;
    let keys = [
        "alpha-1", "Alpha_2", "ALPHA3", "beta_x", "Beta-y", "gamma", "Gamma-", "_delta", "-eps",
        "zeta_Z",
    ];
    for db in [&src, &dst] {
        let values: Vec<String> = keys
            .iter()
            .map(|k| format!("('{k}', 'name of {k}')"))
            .collect();
        db.exec(&format!("INSERT INTO users VALUES {}", values.join(", ")))
            .await;
        let more: Vec<String> = (0..3000).map(|i| format!("('k-{i}_X', 'n{i}')")).collect();
        db.exec(&format!("INSERT INTO users VALUES {}", more.join(", ")))
            .await;
    }
    let (_dir, path) = write_config(&pair_yaml(&src, &dst, "code", "", "200/s"));
    let run = check(&path, false);
    assert_eq!(run.code, 0, "{} {}", run.report, run.stderr);
    assert_eq!(run.report["rows_compared"], 3010);
    dst.exec("UPDATE users SET name = 'changed' WHERE code = 'Beta-y'")
        .await;
    let run = check(&path, false);
    assert_eq!(run.code, 3);
    assert_eq!(
        run.report["different"],
        serde_json::json!([{ "key": ["Beta-y"], "columns": ["name"] }])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repair_requeues_differences_through_the_worker() {
    let src = TestDb::new(Kind::Pg).await;
    let dst = TestDb::new(Kind::Pg).await;
    src.exec(USERS).await;
    dst.exec(USERS).await;
    fill(&src, 5000).await;
    let (_dir, path) = write_config(&pair_yaml(&src, &dst, "id", "", "50/s"));
    install(&path);
    let _proxy = Switchyard::start_file(&path);
    eventually(Duration::from_secs(20), "backfill done", || async {
        dst.count("users").await == 5000
    })
    .await;
    inject_three(&dst, 1234, 2345, 9999).await;
    let run = check(&path, false);
    assert_eq!(run.code, 3);
    let run = check(&path, true);
    assert_eq!(run.code, 3);
    assert_eq!(run.report["requeued"], 3, "{}", run.report);
    eventually(Duration::from_secs(20), "repaired", || async {
        check(&path, false).code == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_is_down_makes_the_figures_stale() {
    let src = TestDb::new(Kind::Pg).await;
    let dst = TestDb::new(Kind::Pg).await;
    src.exec(USERS).await;
    dst.exec(USERS).await;
    fill(&src, 100).await;
    fill(&dst, 100).await;
    let (_dir, path) = write_config(&pair_yaml(&src, &dst, "id", "", "200/s"));
    let proxy = Switchyard::start_file(&path);
    sampler_agrees(&proxy, 20).await;
    dst.pg_stop().await;
    eventually(
        Duration::from_secs(20),
        "stale figures with the error",
        || async {
            let s = sampled(&proxy).await;
            s["stale"] == true
                && !s["last_error"].is_null()
                && s["age_seconds"].as_f64().unwrap() > 5.0
        },
    )
    .await;
    dst.pg_start().await;
    eventually(Duration::from_secs(20), "fresh again", || async {
        let s = sampled(&proxy).await;
        s["stale"] == false && s["last_error"].is_null()
    })
    .await;
}

/// Keys of the rows the check lists as different, as numbers.
fn different_keys(run: &CheckRun) -> Vec<i64> {
    let mut keys: Vec<i64> = run.report["different"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["key"][0].as_str().unwrap().parse().unwrap())
        .collect();
    keys.sort();
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separators_inside_values_cannot_hide_a_difference_and_every_differing_row_is_listed() {
    let src = TestDb::new(Kind::Pg).await;
    let dst = TestDb::new(Kind::Pg).await;
    for db in [&src, &dst] {
        db.exec("CREATE TABLE users (id integer PRIMARY KEY, a text, b text)")
            .await;
        db.exec("INSERT INTO users SELECT g, 'a' || g, 'b' || g FROM generate_series(2, 3000) g")
            .await;
    }
    // The reported rows: the same characters, split differently between the columns.
    src.exec("INSERT INTO users VALUES (1, 'x' || chr(31), 'y')")
        .await;
    dst.exec("INSERT INTO users VALUES (1, 'x', chr(31) || 'y')")
        .await;
    let (_dir, path) = write_config(&pair_yaml(&src, &dst, "id", "", "10/s"));
    let run = check(&path, false);
    assert_eq!(run.code, 3, "{} {}", run.report, run.stderr);
    assert_eq!(different_keys(&run), vec![1], "{}", run.report);
    // Many differences inside one range: every one of them is listed.
    dst.exec("UPDATE users SET b = NULL WHERE id % 97 = 0")
        .await;
    dst.exec("UPDATE users SET a = a || chr(30) WHERE id % 89 = 0")
        .await;
    let mut expected: Vec<i64> = (1..=3000).filter(|k| k % 97 == 0 || k % 89 == 0).collect();
    expected.insert(0, 1);
    expected.dedup();
    let run = check(&path, false);
    assert_eq!(run.code, 3, "{}", run.report);
    assert_eq!(different_keys(&run), expected, "{}", run.report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_floats_are_equal_across_engines_and_different_ones_differ() {
    let src = TestDb::new(Kind::My).await;
    let dst = TestDb::new(Kind::Pg).await;
    src.exec(
        "CREATE TABLE users (id int PRIMARY KEY, v double, r float, d decimal(10,4)) ENGINE=InnoDB",
    )
    .await;
    dst.exec(
        "CREATE TABLE users (id int PRIMARY KEY, v double precision, r real, d numeric(10,4))",
    )
    .await;
    src.exec(
        "INSERT INTO users VALUES (1, 1700000000.123456, 0.1, 1.5), (2, 0.1, 3.4e38, -0.0001), \
         (3, 1e20, -2.5, 0), (4, -2.5e-300, 1e-30, 123456.7891), (5, NULL, NULL, NULL), \
         (6, 0.30000000000000004, 16777216, 10)",
    )
    .await;
    let (_dir, path) = write_config(&pair_yaml(&src, &dst, "id", "", "200/s"));
    install(&path);
    let proxy = Switchyard::start_file(&path);
    eventually(Duration::from_secs(20), "the copy", || async {
        dst.count("users").await == 6
    })
    .await;
    // The copy is exact: the test's own reading of the doubles' digits agrees.
    let copied = dst.rows("SELECT v::text FROM users WHERE id = 1").await;
    assert_eq!(copied[0][0].as_deref(), Some("1700000000.123456"));
    let run = check(&path, false);
    assert_eq!(run.code, 0, "{} {}", run.report, run.stderr);
    let s = sampler_agrees(&proxy, 100).await;
    assert_eq!(s["mismatched"], 0, "{s}");
    // The next double up, one unit in the last place away, and a decimal digit off.
    dst.exec("UPDATE users SET v = 1700000000.1234562 WHERE id = 1")
        .await;
    dst.exec("UPDATE users SET d = 123456.7892 WHERE id = 4")
        .await;
    let run = check(&path, false);
    assert_eq!(run.code, 3, "{}", run.report);
    assert_eq!(different_keys(&run), vec![1, 4], "{}", run.report);
    eventually(
        Duration::from_secs(30),
        "the sampler sees row 1 differ",
        || async {
            let s = sampled(&proxy).await;
            s["mismatches"]
                .as_array()
                .unwrap()
                .iter()
                .any(|m| m["key"][0] == "1" && m["columns"][0] == "v")
        },
    )
    .await;
}

/// Lower end of the 95% Wilson score interval, written out here from its textbook formula.
fn wilson(matched: f64, n: f64) -> f64 {
    let z = 1.96_f64;
    let p = matched / n;
    (p + z * z / (2.0 * n) - z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt())
        / (1.0 + z * z / n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sampler_estimates_the_share_of_differing_rows_whatever_the_gaps() {
    let src = TestDb::new(Kind::Pg).await;
    let dst = TestDb::new(Kind::Pg).await;
    // Keys 1–3001 and one key after a gap; three rows differ, one of them the key after the gap.
    for db in [&src, &dst] {
        db.exec(USERS).await;
        db.exec("INSERT INTO users (id, name, score, note) SELECT g, 'user ' || g, g % 100, 'n' FROM generate_series(1, 3001) g")
            .await;
        db.exec("INSERT INTO users (id, name, score, note) VALUES (5000, 'after the gap', 0, 'n')")
            .await;
    }
    dst.exec("UPDATE users SET score = -1 WHERE id IN (5000, 1500, 3001)")
        .await;
    let rows = src.count("users").await as f64;
    let injected = dst
        .scalar_i64("SELECT COUNT(*) FROM users WHERE score = -1")
        .await as f64
        / rows;
    let (_dir, path) = write_config(&pair_yaml(&src, &dst, "id", "", "2000/s"));
    let proxy = Switchyard::start_file(&path);
    eventually(Duration::from_secs(60), "enough samples", || async {
        sampled(&proxy).await["sampled"].as_u64().unwrap_or(0) >= 12_000
    })
    .await;
    let s = sampled(&proxy).await;
    let n = s["sampled"].as_f64().unwrap();
    let matched = s["matched"].as_f64().unwrap();
    let share = 1.0 - s["ratio"].as_f64().unwrap();
    // Five standard errors of a binomial share, plus the draws still waiting for a recheck.
    let tolerance =
        5.0 * (injected * (1.0 - injected) / n).sqrt() + 2.0 * 500.0 / n * injected + 1.0 / n;
    assert!(
        (share - injected).abs() <= tolerance,
        "sampled share {share} vs injected {injected} (±{tolerance}) in {s}"
    );
    let lower = s["lower_bound"].as_f64().unwrap();
    assert!(
        (lower - wilson(matched, n)).abs() < 1e-9,
        "{lower} vs {}",
        wilson(matched, n)
    );
}

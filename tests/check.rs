//! `switchyard check`: the shipped configs pass; every kind of problem exits 2 with one
//! `FILE:LINE:COL: message` line pointing at exactly where the problem is written; several
//! semantic problems are all reported, in line order; a missing file and a YAML syntax error
//! exit 2 with the file named and a position.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

/// A valid config touching every section `check` validates. Tests below break one line of
/// it at a time; the line numbers in their expectations refer to this text.
const BASE: &str = r#"listen: { http: "127.0.0.1:8080" }
admin: { listen: "127.0.0.1:9901" }
state: { url: "sqlite://state.db" }
timeouts: { connect: 2s, request: 30s }
drain_delay: 0s
shutdown_timeout: 10s
backends:
  legacy: { endpoints: ["http://127.0.0.1:9001"] }
  target:
    endpoints: ["http://127.0.0.1:9002"]
    health: { path: /healthz, interval: 2s }
default_backend: legacy
routes:
  - name: users
    match: { path_prefix: /api/users }
    legacy: legacy
    target: target
    split: { percentage: { weight: 20 } }
    sticky: { key: "cookie:session" }
  - name: orders
    match: { path_prefix: /api/orders }
    legacy: legacy
    target: target
    split:
      canary:
        rules: [ { header: { name: x-canary, value: "1" } } ]
        weight: 5
  - name: search
    match: { path_prefix: /search }
    legacy: legacy
    target: target
    split: { feature_flag: { flag: new-search } }
flags:
  new-search:
    percentage: 10
    sticky: { key: "header:x-user-id" }
sync:
  - name: users
    source: { url: "postgres://legacy/app", table: users, key: [id] }
    target: { url: "postgres://target/app", table: users, key: [id] }
consistency:
  - sync: users
    window: 5m
"#;

/// What one `check` run printed.
struct Outcome {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// One reported problem, parsed from `FILE:LINE:COL: message`.
#[derive(Debug)]
struct Problem {
    line: usize,
    col: usize,
    message: String,
}

fn run_check(path: &Path, env: &[(&str, Option<&str>)]) -> Outcome {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.args(["--log-format", "json", "check", "--config"])
        .arg(path);
    for (name, value) in env {
        match value {
            Some(v) => cmd.env(name, v),
            None => cmd.env_remove(name),
        };
    }
    let out = cmd.output().expect("run switchyard check");
    Outcome {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Writes `text` to a fresh file and checks it.
fn check_text(text: &str, env: &[(&str, Option<&str>)]) -> (tempfile::TempDir, PathBuf, Outcome) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.yaml");
    std::fs::write(&path, text).unwrap();
    let outcome = run_check(&path, env);
    (dir, path, outcome)
}

/// Parses every stdout line as `FILE:LINE:COL: message`, insisting on the file's name.
fn problems(path: &Path, outcome: &Outcome) -> Vec<Problem> {
    let prefix = format!("{}:", path.display());
    outcome
        .stdout
        .lines()
        .map(|l| {
            let rest = l.strip_prefix(&prefix).unwrap_or_else(|| {
                panic!(
                    "line does not start with `{prefix}`: {l:?}\n{}",
                    outcome.stdout
                )
            });
            let mut parts = rest.splitn(3, ':');
            let line = parts.next().and_then(|s| s.parse().ok());
            let col = parts.next().and_then(|s| s.parse().ok());
            let message = parts.next().and_then(|s| s.strip_prefix(' '));
            match (line, col, message) {
                (Some(line), Some(col), Some(message)) if !message.is_empty() => Problem {
                    line,
                    col,
                    message: message.to_string(),
                },
                _ => panic!("not `FILE:LINE:COL: message`: {l:?}"),
            }
        })
        .collect()
}

/// `BASE` with each `(old, new)` replaced once; each `old` must be present.
fn base_with(edits: &[(&str, &str)]) -> String {
    let mut text = BASE.to_string();
    for (old, new) in edits {
        assert!(text.contains(old), "BASE has no `{old}`");
        text = text.replacen(old, new, 1);
    }
    text
}

/// The text at 1-based `line` and `col` (columns count characters), to make sure an
/// expected position names what the test means.
fn text_at(text: &str, line: usize, col: usize) -> String {
    let l = text.lines().nth(line - 1).unwrap_or("");
    l.chars().skip(col - 1).collect()
}

/// Checks `text` and expects exactly one problem, at `line:col` where `token` is written,
/// with a message containing each of `words`.
fn expect_one(text: &str, line: usize, col: usize, token: &str, words: &[&str]) {
    expect_one_env(text, &[], line, col, token, words);
}

fn expect_one_env(
    text: &str,
    env: &[(&str, Option<&str>)],
    line: usize,
    col: usize,
    token: &str,
    words: &[&str],
) {
    assert!(
        text_at(text, line, col).starts_with(token),
        "test bug: {line}:{col} holds {:?}, not `{token}`",
        text_at(text, line, col)
    );
    let (_dir, path, out) = check_text(text, env);
    assert_eq!(
        out.code,
        Some(2),
        "exit code; stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    let found = problems(&path, &out);
    assert_eq!(found.len(), 1, "expected one problem, got:\n{}", out.stdout);
    let p = &found[0];
    assert_eq!(
        (p.line, p.col),
        (line, col),
        "position of `{token}`: {}",
        out.stdout
    );
    for w in words {
        assert!(p.message.contains(w), "message {:?} lacks {w:?}", p.message);
    }
}

#[test]
fn base_config_of_these_tests_is_valid() {
    let (_dir, path, out) = check_text(BASE, &[]);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    assert_eq!(
        out.stdout.trim(),
        format!("{}: ok (2 backends, 3 routes, 1 flags)", path.display())
    );
}

#[test]
fn every_shipped_config_passes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no files in {}", dir.display());
    for file in &files {
        let out = run_check(file, &[]);
        assert_eq!(
            out.code,
            Some(0),
            "{}:\n{}{}",
            file.display(),
            out.stdout,
            out.stderr
        );
        assert!(
            out.stdout.starts_with(&format!("{}: ok", file.display())),
            "{}",
            out.stdout
        );
    }
}

#[test]
fn unknown_top_level_key() {
    let text = base_with(&[("drain_delay: 0s\n", "drain_delay: 0s\nretries: 3\n")]);
    expect_one(&text, 6, 1, "retries", &["unknown field `retries`"]);
}

#[test]
fn unknown_key_in_a_route() {
    let text = base_with(&[(
        "    target: target\n    split: { percentage",
        "    target: target\n    colour: red\n    split: { percentage",
    )]);
    expect_one(
        &text,
        18,
        5,
        "colour",
        &["routes[0]", "unknown field `colour`"],
    );
}

#[test]
fn unknown_key_deep_in_a_flow_mapping() {
    let text = base_with(&[("{ weight: 20 }", "{ weight: 20, share: 1 }")]);
    expect_one(
        &text,
        18,
        40,
        "share",
        &["routes[0].split.percentage", "unknown field `share`"],
    );
}

#[test]
fn unknown_key_in_a_backend_health_probe() {
    let text = base_with(&[("interval: 2s", "intervall: 2s")]);
    expect_one(
        &text,
        11,
        31,
        "intervall",
        &["backends.target.health", "unknown field `intervall`"],
    );
}

#[test]
fn unknown_key_in_a_flag_sticky() {
    let text = base_with(&[(
        "{ key: \"header:x-user-id\" }",
        "{ key: \"header:x-user-id\", salt: x }",
    )]);
    expect_one(
        &text,
        36,
        40,
        "salt",
        &["flags.new-search.sticky", "unknown field `salt`"],
    );
}

#[test]
fn undefined_default_backend() {
    let text = base_with(&[("default_backend: legacy", "default_backend: monolith")]);
    expect_one(
        &text,
        12,
        18,
        "monolith",
        &["backend `monolith` is not defined", "legacy, target"],
    );
}

#[test]
fn undefined_legacy_backend() {
    let text = base_with(&[("    legacy: legacy\n", "    legacy: monolith\n")]);
    expect_one(
        &text,
        16,
        13,
        "monolith",
        &["backend `monolith` is not defined"],
    );
}

#[test]
fn undefined_target_backend() {
    // The second route's target, to be sure the position follows the route index.
    let text = base_with(&[(
        "    target: target\n    split:\n",
        "    target: users-v3\n    split:\n",
    )]);
    expect_one(
        &text,
        23,
        13,
        "users-v3",
        &["backend `users-v3` is not defined"],
    );
}

#[test]
fn percentage_weight_over_100() {
    let text = base_with(&[("weight: 20 }", "weight: 120 }")]);
    expect_one(&text, 18, 36, "120", &["120", "out of range"]);
}

#[test]
fn canary_weight_below_0() {
    let text = base_with(&[("        weight: 5", "        weight: -1")]);
    expect_one(&text, 27, 17, "-1", &["-1", "out of range"]);
}

#[test]
fn flag_percentage_over_100() {
    let text = base_with(&[("percentage: 10", "percentage: 101")]);
    expect_one(&text, 35, 17, "101", &["101", "out of range"]);
}

#[test]
fn weight_with_three_decimals() {
    let text = base_with(&[("weight: 20 }", "weight: 12.345 }")]);
    expect_one(
        &text,
        18,
        36,
        "12.345",
        &["12.345", "more than two decimals"],
    );
    // Two decimals are fine.
    let (_dir, _path, out) = check_text(&base_with(&[("weight: 20 }", "weight: 12.34 }")]), &[]);
    assert_eq!(out.code, Some(0), "{}", out.stdout);
}

#[test]
fn duplicate_route_names() {
    let text = base_with(&[("  - name: orders", "  - name: users")]);
    expect_one(
        &text,
        20,
        11,
        "users",
        &["route name `users` is already used at line 14, column 11"],
    );
}

#[test]
fn two_splits_on_one_route() {
    let text = base_with(&[(
        "split: { percentage: { weight: 20 } }",
        "split: { percentage: { weight: 20 }, blue_green: { active: legacy } }",
    )]);
    expect_one(
        &text,
        18,
        12,
        "{ percentage",
        &["exactly one split", "percentage and blue_green"],
    );
}

#[test]
fn undefined_flag() {
    let text = base_with(&[("flag: new-search }", "flag: old-search }")]);
    expect_one(
        &text,
        32,
        36,
        "old-search",
        &["flag `old-search` is not defined", "new-search"],
    );
}

#[test]
fn bad_sticky_key() {
    let text = base_with(&[("\"cookie:session\"", "\"session\"")]);
    expect_one(
        &text,
        19,
        20,
        "\"session\"",
        &["`session` is not a sticky key"],
    );
}

#[test]
fn bad_duration() {
    let text = base_with(&[("request: 30s", "request: 30 parsecs")]);
    expect_one(
        &text,
        4,
        35,
        "30 parsecs",
        &["`30 parsecs` is not a duration"],
    );
    let text = base_with(&[("window: 5m", "window: forever")]);
    expect_one(&text, 43, 13, "forever", &["`forever` is not a duration"]);
}

#[test]
fn bad_endpoint_url() {
    let text = base_with(&[("[\"http://127.0.0.1:9001\"]", "[\"127.0.0.1:9001\"]")]);
    expect_one(
        &text,
        8,
        25,
        "\"127.0.0.1:9001\"",
        &["`127.0.0.1:9001` needs a scheme"],
    );
    // Block style, second endpoint of the list.
    let text = base_with(&[(
        "[\"http://127.0.0.1:9002\"]",
        "[\"http://127.0.0.1:9002\", \"http://10.0.0.5:80/api\"]",
    )]);
    expect_one(
        &text,
        10,
        42,
        "\"http://10.0.0.5:80/api\"",
        &["`http://10.0.0.5:80/api`", "scheme, host and port only"],
    );
}

#[test]
fn bad_listen_address() {
    let text = base_with(&[("\"127.0.0.1:8080\"", "\"127.0.0.1:80800\"")]);
    expect_one(
        &text,
        1,
        17,
        "\"127.0.0.1:80800\"",
        &["`127.0.0.1:80800` is not an address"],
    );
    let text = base_with(&[("\"127.0.0.1:9901\"", "\"localhost:9901\"")]);
    expect_one(
        &text,
        2,
        18,
        "\"localhost:9901\"",
        &["`localhost:9901` is not an address"],
    );
}

#[test]
fn duplicate_sync_names() {
    let text = base_with(&[(
        "consistency:\n",
        "  - name: users\n    source: { url: \"postgres://a/b\", table: t, key: [id] }\n    target: { url: \"postgres://c/d\", table: t, key: [id] }\nconsistency:\n",
    )]);
    expect_one(
        &text,
        41,
        11,
        "users",
        &["sync name `users` is already used by sync[0]"],
    );
}

#[test]
fn consistency_names_an_unknown_sync() {
    let text = base_with(&[("  - sync: users", "  - sync: orders")]);
    expect_one(
        &text,
        42,
        11,
        "orders",
        &["sync `orders` is not defined under `sync`"],
    );
}

#[test]
fn unset_environment_variable_in_state_url() {
    const VAR: &str = "SWITCHYARD_CHECK_TEST_STATE_PASSWORD";
    let text = base_with(&[(
        "\"sqlite://state.db\"",
        "\"postgres://app:${SWITCHYARD_CHECK_TEST_STATE_PASSWORD}@db/state\"",
    )]);
    expect_one_env(
        &text,
        &[(VAR, None)],
        3,
        15,
        "\"postgres://app:${",
        &["environment variable `SWITCHYARD_CHECK_TEST_STATE_PASSWORD` is not set"],
    );
    // The same file passes once the variable is there.
    let (_dir, _path, out) = check_text(&text, &[(VAR, Some("s3cret"))]);
    assert_eq!(out.code, Some(0), "{}", out.stdout);
}

#[test]
fn several_semantic_problems_are_all_reported_in_line_order() {
    let text = base_with(&[
        ("\"127.0.0.1:8080\"", "\"127.0.0.1:80800\""),
        ("request: 30s", "request: soon"),
        ("default_backend: legacy", "default_backend: monolith"),
        ("weight: 20 }", "weight: 120 }"),
        ("\"cookie:session\"", "\"session\""),
        ("  - name: orders", "  - name: users"),
        ("flag: new-search }", "flag: old-search }"),
        ("percentage: 10", "percentage: 101"),
        ("  - sync: users", "  - sync: orders"),
    ]);
    let (_dir, path, out) = check_text(&text, &[]);
    assert_eq!(out.code, Some(2), "{}", out.stdout);
    let found = problems(&path, &out);
    let expected: [(usize, usize, &str); 9] = [
        (1, 17, "`127.0.0.1:80800` is not an address"),
        (4, 35, "`soon` is not a duration"),
        (12, 18, "backend `monolith` is not defined"),
        (18, 36, "weight 120 is out of range"),
        (19, 20, "`session` is not a sticky key"),
        (20, 11, "route name `users` is already used"),
        (32, 36, "flag `old-search` is not defined"),
        (35, 17, "weight 101 is out of range"),
        (42, 11, "sync `orders` is not defined"),
    ];
    assert_eq!(
        found.len(),
        expected.len(),
        "one line per problem:\n{}",
        out.stdout
    );
    for (p, (line, col, words)) in found.iter().zip(expected) {
        assert_eq!((p.line, p.col), (line, col), "{}", out.stdout);
        assert!(
            p.message.contains(words),
            "{p:?} lacks {words:?}\n{}",
            out.stdout
        );
    }
}

#[test]
fn missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-config.yaml");
    let out = run_check(&path, &[]);
    assert_eq!(out.code, Some(2), "{}{}", out.stdout, out.stderr);
    let found = problems(&path, &out);
    assert_eq!(found.len(), 1, "{}", out.stdout);
    assert!(
        found[0].message.contains("cannot read")
            && found[0].message.contains(&path.display().to_string()),
        "{:?}",
        found[0]
    );
}

#[test]
fn yaml_syntax_error_has_a_position() {
    // `bad` is indented one space less than the keys of its mapping.
    let text = base_with(&[(
        "    health: { path: /healthz, interval: 2s }\n",
        "    health: { path: /healthz, interval: 2s }\n   bad: indentation\n",
    )]);
    assert_eq!(text_at(&text, 12, 4), "bad: indentation");
    let (_dir, path, out) = check_text(&text, &[]);
    assert_eq!(out.code, Some(2), "{}", out.stdout);
    let found = problems(&path, &out);
    assert_eq!(found.len(), 1, "{}", out.stdout);
    assert_eq!((found[0].line, found[0].col), (12, 4), "{}", out.stdout);
    // In plain words: which levels it falls between and the key each would make it part of.
    assert_eq!(
        found[0].message,
        "`bad` at column 4 lines up with no key above it: indent it to column 5 to make it a key \
         of `target` like `health` on line 11, or to column 3 to make it a key of `backends` like \
         `target`"
    );

    // A tab where indentation is expected.
    let text = base_with(&[("  legacy: {", "\tlegacy: {")]);
    let (_dir, path, out) = check_text(&text, &[]);
    assert_eq!(out.code, Some(2), "{}", out.stdout);
    let found = problems(&path, &out);
    assert_eq!(found.len(), 1, "{}", out.stdout);
    assert_eq!((found[0].line, found[0].col), (8, 1), "{}", out.stdout);
    assert!(
        found[0]
            .message
            .contains("tabs are not allowed for indentation"),
        "{:?}",
        found[0]
    );

    // A key indented too far under a key that already has a value.
    let text = base_with(&[(
        "    health: { path: /healthz, interval: 2s }\n",
        "    health: { path: /healthz, interval: 2s }\n      bad: indentation\n",
    )]);
    let (_dir, path, out) = check_text(&text, &[]);
    let found = problems(&path, &out);
    assert_eq!(found.len(), 1, "{}", out.stdout);
    assert_eq!((found[0].line, found[0].col), (12, 7), "{}", out.stdout);
    assert!(
        found[0]
            .message
            .contains("`bad` is indented more than `health` on line 11, which already has a value")
            && found[0].message.contains("a key of `target`"),
        "{:?}",
        found[0]
    );
}

#[test]
fn every_unknown_key_in_one_run_with_the_nearest_match() {
    let text = base_with(&[
        ("drain_delay: 0s\n", "drain_delay: 0s\nroutse: []\n"),
        ("interval: 2s", "intervall: 2s"),
        ("{ weight: 20 }", "{ weigth: 20 }"),
        ("    window: 5m", "    windw: 5m"),
    ]);
    let (_dir, path, out) = check_text(&text, &[]);
    assert_eq!(out.code, Some(2), "{}", out.stdout);
    let found = problems(&path, &out);
    let summary: Vec<(usize, usize, &str)> = found
        .iter()
        .map(|p| (p.line, p.col, p.message.as_str()))
        .collect();
    assert_eq!(found.len(), 4, "{summary:#?}");
    // In line order, each at its key, naming the nearest accepted key and the accepted ones.
    assert_eq!((found[0].line, found[0].col), (6, 1), "{summary:#?}");
    assert!(
        found[0].message.contains("did you mean `routes`?"),
        "{summary:#?}"
    );
    assert_eq!((found[1].line, found[1].col), (12, 31), "{summary:#?}");
    assert!(
        found[1].message.contains("did you mean `interval`?")
            && found[1].message.contains("`path`"),
        "{summary:#?}"
    );
    assert!(
        found[2].message.contains("did you mean `weight`?"),
        "{summary:#?}"
    );
    assert!(
        found[3].message.contains("did you mean `window`?"),
        "{summary:#?}"
    );
}

// YAML maps keep the last of two equal keys silently; the position index reports them.

#[test]
fn duplicate_backend_names() {
    let text = base_with(&[(
        "  target:\n",
        "  legacy: { endpoints: [\"http://127.0.0.1:9003\"] }\n  target:\n",
    )]);
    expect_one(
        &text,
        9,
        3,
        "legacy:",
        &["backends.legacy", "written twice"],
    );
}

#[test]
fn duplicate_flag_names() {
    let text = base_with(&[("sync:\n", "  new-search: { percentage: 90 }\nsync:\n")]);
    expect_one(
        &text,
        37,
        3,
        "new-search:",
        &["flags.new-search", "written twice"],
    );
}

#[test]
fn duplicate_key_points_at_the_repeat() {
    let text = base_with(&[("drain_delay: 0s\n", "drain_delay: 0s\ndrain_delay: 5s\n")]);
    expect_one(
        &text,
        6,
        1,
        "drain_delay",
        &["`drain_delay` is written twice", "line 5"],
    );
}

// Values `check` used to accept that then crashed or stalled the proxy: each is refused
// here, with its position.

#[test]
fn an_absurd_keepalive_is_refused() {
    let text = base_with(&[(
        "timeouts: { connect: 2s, request: 30s }",
        "timeouts: { connect: 2s, request: 30s, keepalive: 300000000000y }",
    )]);
    expect_one(&text, 4, 51, "300000000000y", &["too long", "1h"]);
}

#[test]
fn an_absurd_header_read_is_refused() {
    let text = base_with(&[(
        "timeouts: { connect: 2s, request: 30s }",
        "timeouts: { connect: 2s, request: 30s, header_read: 100000y }",
    )]);
    expect_one(&text, 4, 53, "100000y", &["too long", "1h"]);
}

#[test]
fn an_absurd_probe_interval_is_refused() {
    let text = base_with(&[("interval: 2s", "interval: 1000000000y")]);
    expect_one(&text, 11, 41, "1000000000y", &["too long"]);
}

#[test]
fn an_absurd_drain_delay_is_refused() {
    let text = base_with(&[("drain_delay: 0s", "drain_delay: 9999999y")]);
    expect_one(&text, 5, 14, "9999999y", &["too long"]);
}

#[test]
fn an_endpoint_port_out_of_range_is_refused() {
    let text = base_with(&[("http://127.0.0.1:9001", "http://127.0.0.1:99999")]);
    expect_one(&text, 8, 25, "\"http://127.0.0.1:99999", &["port", "65535"]);
}

#[test]
fn an_endpoint_with_credentials_is_refused() {
    let text = base_with(&[("http://127.0.0.1:9001", "http://ops:hunter2@127.0.0.1:9001")]);
    expect_one(&text, 8, 25, "\"http://ops:hunter2@", &["credentials"]);
}

#[test]
fn a_path_prefix_of_twelve_thousand_segments_is_refused() {
    let prefix = "/a".repeat(12_000);
    let text = base_with(&[("path_prefix: /search", &format!("path_prefix: {prefix}"))]);
    expect_one(&text, 29, 27, "/a/a/a", &["segments"]);
}

#[test]
fn a_nesting_bomb_is_refused_fast() {
    let bomb = format!("x: {}{}", "[".repeat(100_000), "]".repeat(100_000));
    let text = base_with(&[("drain_delay: 0s\n", &format!("drain_delay: 0s\n{bomb}\n"))]);
    let started = std::time::Instant::now();
    let (_dir, path, out) = check_text(&text, &[]);
    let took = started.elapsed();
    assert_eq!(out.code, Some(2), "{}{}", out.stdout, out.stderr);
    let found = problems(&path, &out);
    assert_eq!(found.len(), 1, "{}", out.stdout);
    assert!(
        found[0].message.contains("nested more than"),
        "{}",
        out.stdout
    );
    assert_eq!(found[0].line, 6, "{}", out.stdout);
    assert!(
        took < std::time::Duration::from_secs(2),
        "check took {took:?}"
    );
}

#[test]
fn a_certificate_that_is_a_device_is_refused() {
    let text = base_with(&[(
        "listen: { http: \"127.0.0.1:8080\" }",
        "listen: { http: \"127.0.0.1:8080\", https: { addr: \"127.0.0.1:8443\", cert: /dev/zero, key: /dev/zero } }",
    )]);
    let (_dir, path, out) = check_text(&text, &[]);
    assert_eq!(out.code, Some(2), "{}{}", out.stdout, out.stderr);
    let found = problems(&path, &out);
    assert!(
        found
            .iter()
            .any(|p| p.line == 1 && p.message.contains("not a regular file")),
        "{}",
        out.stdout
    );
}

#[test]
fn check_reads_the_admin_tokens_file() {
    let missing = base_with(&[(
        "admin: { listen: \"127.0.0.1:9901\" }",
        "admin: { listen: \"127.0.0.1:9901\", tokens_file: no-such-tokens.yaml }",
    )]);
    expect_one(&missing, 2, 49, "no-such-tokens.yaml", &["cannot read"]);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.yaml");
    std::fs::write(dir.path().join("tokens.yaml"), "ops: not-a-hash\n").unwrap();
    std::fs::write(
        &path,
        base_with(&[(
            "admin: { listen: \"127.0.0.1:9901\" }",
            "admin: { listen: \"127.0.0.1:9901\", tokens_file: tokens.yaml }",
        )]),
    )
    .unwrap();
    let out = run_check(&path, &[]);
    assert_eq!(out.code, Some(2), "{}{}", out.stdout, out.stderr);
    let found = problems(&path, &out);
    assert_eq!(found.len(), 1, "{}", out.stdout);
    assert!(found[0].message.contains("sha256:"), "{}", out.stdout);
}

#[test]
fn a_path_prefix_no_normalised_path_can_have_is_refused() {
    let text = base_with(&[("path_prefix: /api/users", "path_prefix: /api//users")]);
    expect_one(
        &text,
        15,
        27,
        "/api//users",
        &["normalised", "`/api/users`"],
    );
}

#[test]
fn a_rule_value_no_request_can_carry_is_refused() {
    let text = base_with(&[("value: \"1\"", "value: \" 1\"")]);
    expect_one(&text, 26, 28, "{ name: x-canary", &["no request can carry"]);
}

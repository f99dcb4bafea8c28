//! `switchyard ctl` end to end: the real binary against a real `serve` process, every
//! subcommand in table and JSON output, and the exit codes scripts rely on.

mod support;

use std::process::{Command, Output};

use support::*;

struct Ctl {
    admin: String,
}

impl Ctl {
    fn run(&self, token: Option<&str>, args: &[&str]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
        cmd.arg("ctl").arg("--admin").arg(&self.admin).args(args);
        cmd.env_remove("SWITCHYARD_ADMIN_TOKEN")
            .env_remove("SWITCHYARD_ADMIN_URL");
        if let Some(t) = token {
            cmd.env("SWITCHYARD_ADMIN_TOKEN", t);
        }
        cmd.output().unwrap()
    }

    /// Runs with the test token, asserts exit 0, returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(Some(TOKEN), args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "ctl {args:?}: stderr {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.ok(&all)).expect("ctl --output json prints JSON")
    }
}

fn config(legacy: &Backend, target: &Backend) -> String {
    format!(
        "backends:\n  legacy: {{ endpoints: [\"{}\"] }}\n  target: {{ endpoints: [\"{}\"] }}\n\
default_backend: legacy\n\
flags:\n  new-search: {{ percentage: 10 }}\n\
routes:\n\
  - {{ name: users, match: {{ path_prefix: /api/users }}, legacy: legacy, target: target, split: {{ percentage: {{ weight: 10 }} }} }}\n\
  - {{ name: checkout, match: {{ path_prefix: /checkout }}, legacy: legacy, target: target, split: {{ blue_green: {{ active: legacy }} }} }}\n\
  - {{ name: search, match: {{ path_prefix: /search }}, legacy: legacy, target: target, split: {{ feature_flag: {{ flag: new-search }} }} }}\n",
        legacy.url(),
        target.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subcommand_round_trips_in_tables_and_json() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&config(&legacy, &target));
    let ctl = Ctl {
        admin: format!("http://{}", proxy.admin),
    };

    // routes: a table naming every route, and JSON that is the API's.
    let table = ctl.ok(&["routes"]);
    for name in ["users", "checkout", "search"] {
        assert!(table.contains(name), "routes table lacks {name}:\n{table}");
    }
    let routes = ctl.json(&["routes"]);
    assert_eq!(routes["routes"].as_array().unwrap().len(), 3);

    // route NAME
    let shown = ctl.json(&["route", "users"]);
    assert_eq!(shown["weight"]["in_force"], 10.0);
    assert!(ctl.ok(&["route", "users"]).contains("etag"));

    // weight, with and without a fresh ETag; a stale one is refused with exit 1.
    let etag = shown["etag"].as_str().unwrap().to_string();
    let after = ctl.json(&["weight", "users", "100", "--if-match", &etag]);
    assert_eq!(after["weight"]["in_force"], 100.0);
    assert_eq!(after["weight"]["source"], "runtime");
    let stale = ctl.run(Some(TOKEN), &["weight", "users", "50", "--if-match", &etag]);
    assert_eq!(stale.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&stale.stderr).contains("precondition_failed"));
    let (_, headers, _) = get(&proxy.url("/api/users/1"), &[]).await;
    assert_eq!(
        backend_of(&headers),
        Some("target"),
        "weight 100 set by ctl is in force"
    );

    // switch
    let switched = ctl.json(&["switch", "checkout", "target"]);
    assert_eq!(switched["active"]["in_force"], "target");
    let (_, headers, _) = get(&proxy.url("/checkout"), &[]).await;
    assert_eq!(backend_of(&headers), Some("target"));
    assert!(ctl.ok(&["switch", "checkout", "legacy"]).contains("legacy"));

    // rollback, then reset back to the file.
    let rolled = ctl.json(&["rollback", "users", "--reason", "ctl test"]);
    assert_eq!(rolled["state"], "rolled_back");
    assert_eq!(rolled["rollback"]["reason"], "ctl test");
    let (_, headers, _) = get(&proxy.url("/api/users/1"), &[]).await;
    assert_eq!(
        backend_of(&headers),
        Some("legacy"),
        "rolled back route sends to legacy"
    );
    let reset = ctl.json(&["reset", "users"]);
    assert_eq!(reset["state"], "active");
    assert_eq!(reset["weight"]["source"], "file");
    assert_eq!(reset["weight"]["in_force"], 10.0);

    // flags and flag
    assert!(ctl.ok(&["flags"]).contains("new-search"));
    assert_eq!(
        ctl.json(&["flag", "new-search"])["percentage"]["in_force"],
        10.0
    );
    let flag = ctl.json(&["flag", "new-search", "--percentage", "100"]);
    assert_eq!(flag["percentage"]["in_force"], 100.0);
    let (_, headers, _) = get(&proxy.url("/search?q=x"), &[]).await;
    assert_eq!(backend_of(&headers), Some("target"));

    // audit lists what ctl did, with the actor.
    let audit = ctl.json(&["audit", "--limit", "50"]);
    let actions: Vec<&str> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for action in ["set_weight", "switch", "rollback", "reset", "set_flag"] {
        assert!(
            actions.contains(&action),
            "audit lacks {action}: {actions:?}"
        );
    }
    assert!(audit["entries"][0]["actor"] == "env");
    let table = ctl.ok(&["audit"]);
    assert!(
        table.contains("set_flag") && table.contains("env"),
        "{table}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_exit_1_with_the_apis_message() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&config(&legacy, &target));
    let ctl = Ctl {
        admin: format!("http://{}", proxy.admin),
    };

    let cases: [(Option<&str>, &[&str], &str); 6] = [
        (None, &["routes"], "unauthorized"),
        (Some("wrong"), &["routes"], "unauthorized"),
        (Some(TOKEN), &["route", "nope"], "not_found"),
        (Some(TOKEN), &["weight", "nope", "5"], "not_found"),
        (Some(TOKEN), &["weight", "users", "101"], "invalid"),
        (Some(TOKEN), &["weight", "checkout", "5"], "invalid"),
    ];
    for (token, args, code) in cases {
        let out = ctl.run(token, args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "ctl {args:?}: {stderr}");
        assert!(
            stderr.contains(code),
            "ctl {args:?}: expected {code} in {stderr}"
        );
    }
    // A negative weight reaches the API and its explanation comes back.
    let out = ctl.run(Some(TOKEN), &["weight", "users", "-1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("between 0 and 100"));

    // Nothing listening: exit 1, not a hang or a panic.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let out = Ctl {
        admin: format!("http://{dead_addr}"),
    }
    .run(Some(TOKEN), &["routes"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unreachable"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_shows_live_health_figures_when_the_route_has_limits() {
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&format!(
        "{}    rollback: {{ max_error_rate: 0.5, window: 10s, min_requests: 20 }}\n",
        two_sided_config(&legacy, &target, "{ percentage: { weight: 100 } }", None)
    ));
    for _ in 0..7 {
        get(&proxy.url("/api/users/1"), &[]).await;
    }
    let ctl = Ctl {
        admin: format!("http://{}", proxy.admin),
    };
    let shown = ctl.ok(&["route", "users"]);
    assert!(
        shown.contains("health.target") && shown.contains("7 requests, 0.0% errors"),
        "{shown}"
    );
}

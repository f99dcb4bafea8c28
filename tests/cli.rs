//! The command line as a new user meets it: every command, flag and argument in `--help` has a
//! description, `--output` takes the same values everywhere, and a command that needs a sync
//! pair's name does without it when the config has only one pair; a database that cannot be
//! reached is named once, with the cause in words.

mod support;

use std::process::Command;

fn switchyard(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .output()
        .expect("run switchyard")
}

/// The `-h` text of a command path, and the names of its subcommands.
fn help(path: &[String]) -> (String, Vec<String>) {
    let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
    args.push("-h");
    let out = switchyard(&args);
    assert!(out.status.success(), "{args:?}: {out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut subcommands = Vec::new();
    let mut in_commands = false;
    for line in text.lines() {
        if line.ends_with(':') && !line.starts_with(' ') {
            in_commands = line == "Commands:";
            continue;
        }
        if in_commands
            && let Some(name) = line.split_whitespace().next()
            && name != "help"
        {
            subcommands.push(name.to_string());
        }
    }
    (text, subcommands)
}

#[test]
fn every_flag_and_argument_has_a_description() {
    let mut queue: Vec<Vec<String>> = vec![vec![]];
    let mut seen = 0;
    let mut missing = Vec::new();
    while let Some(path) = queue.pop() {
        let (text, subcommands) = help(&path);
        seen += 1;
        let mut section = "";
        for line in text.lines() {
            if line.ends_with(':') && !line.starts_with(' ') {
                section = line;
                continue;
            }
            if !matches!(section, "Options:" | "Arguments:" | "Commands:") {
                continue;
            }
            let entry = line.trim_start();
            // An entry line: the flag or name, then at least two spaces, then its description.
            if (entry.starts_with('-') || entry.starts_with('<') || entry.starts_with('['))
                && line.len() - entry.len() <= 6
            {
                let described = entry
                    .split_once("  ")
                    .is_some_and(|(_, rest)| !rest.trim().is_empty());
                if !described {
                    missing.push(format!("switchyard {}: {}", path.join(" "), entry));
                }
            }
        }
        for sub in subcommands {
            let mut next = path.clone();
            next.push(sub);
            queue.push(next);
        }
    }
    assert!(seen > 20, "only {seen} commands found");
    assert!(missing.is_empty(), "undescribed:\n{}", missing.join("\n"));
}

#[test]
fn output_takes_the_same_values_everywhere() {
    for path in [
        vec!["ctl", "--output", "yaml", "routes"],
        vec!["consistency", "check", "--config", "x.yaml"],
    ] {
        let mut args = path.clone();
        if !args.contains(&"yaml") {
            args.extend(["--output", "yaml"]);
        }
        let out = switchyard(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("[possible values: table, json]"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn consistency_check_names_the_only_pair_itself() {
    let dir = tempfile::tempdir().unwrap();
    let pair = |name: &str| {
        format!(
            "  - name: {name}\n    source: {{ url: \"sqlite://{d}/a.db\", table: t, key: [id] }}\n    \
             target: {{ url: \"sqlite://{d}/b.db\", table: t, key: [id] }}\n",
            d = dir.path().display()
        )
    };
    let base = "listen: { http: \"127.0.0.1:0\" }\nbackends: { legacy: { endpoints: [\"http://127.0.0.1:9\"] } }\n\
                default_backend: legacy\nsync:\n";
    let one = dir.path().join("one.yaml");
    std::fs::write(&one, format!("{base}{}", pair("users"))).unwrap();
    let two = dir.path().join("two.yaml");
    std::fs::write(&two, format!("{base}{}{}", pair("users"), pair("orders"))).unwrap();

    // Two pairs: the name is needed, and the error lists them.
    let out = switchyard(&["consistency", "check", "--config", two.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("has 2 sync pairs; name one with --sync (users, orders)"),
        "{err}"
    );

    // One pair: it is the one compared (here its tables do not exist, which is what it says).
    let out = switchyard(&["consistency", "check", "--config", one.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("--sync"), "{err}");
    assert!(!err.contains("unknown sync"), "{err}");
    assert_ne!(out.status.code(), Some(2), "{err}");
}

/// `sync install` against PostgreSQL URLs that fail in the usual ways: one line each, the cause
/// in words, no repeated chain, no server source line, nothing logged from server notices.
#[test]
fn database_errors_say_the_cause_once() {
    let base = support::db::pg_base();
    let (scheme, rest) = base.split_once("://").unwrap();
    let host = rest.rsplit('@').next().unwrap();
    let unique = format!("sy_missing_{}", std::process::id());
    // A port nothing listens on: bound, then released.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cases = [
        (
            format!("{base}/{unique}"),
            format!("database \"{unique}\" does not exist (create it, or fix the URL)"),
        ),
        (
            format!("{scheme}://{unique}@{host}/postgres"),
            format!(
                "role \"{unique}\" does not exist (create the role, or fix the user in the URL)"
            ),
        ),
        (
            format!("{scheme}://postgres@{closed}/postgres"),
            "connection refused (is the server running at that host and port?)".to_string(),
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (url, words) in cases {
        let config = dir.path().join("c.yaml");
        std::fs::write(
            &config,
            format!(
                "listen: {{ http: \"127.0.0.1:0\" }}\n\
                 backends: {{ legacy: {{ endpoints: [\"http://127.0.0.1:9\"] }} }}\n\
                 default_backend: legacy\nsync:\n  - name: users\n    \
                 source: {{ url: \"{url}\", table: t, key: [id] }}\n    \
                 target: {{ url: \"{url}\", table: t, key: [id] }}\n"
            ),
        )
        .unwrap();
        let out = switchyard(&["sync", "install", "--config", config.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{url}: {err}");
        assert_eq!(err.lines().count(), 1, "{url}: {err}");
        assert!(err.ends_with(&format!("{words}\n")), "{url}: {err}");
        assert_eq!(
            err.matches("does not exist").count(),
            words.matches("does not exist").count(),
            "{err}"
        );
        assert!(!err.contains(" at line "), "{url}: {err}");
        assert!(!err.contains("pool timed out"), "{url}: {err}");
    }
}

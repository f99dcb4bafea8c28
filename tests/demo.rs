//! `switchyard demo` end to end: the real binary, no TTY, ephemeral ports, its own temp files.
//! Waits on the demo's own output and exit with deadlines, never for a fixed time.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn demo(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    c.arg("demo").args(args);
    c
}

/// Waits for the child to exit, killing it (and failing) after `timeout`.
fn wait_exit(child: &mut Child, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the demo did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Spawns the demo with its stdout read line by line on a thread.
fn spawn(args: &[&str]) -> (Child, mpsc::Receiver<String>) {
    let mut child = demo(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start switchyard demo");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            println!("demo| {line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Reads lines until one satisfies `pred`; returns every line read so far.
fn read_until(
    rx: &mpsc::Receiver<String>,
    timeout: Duration,
    mut pred: impl FnMut(&str) -> bool,
    seen: &mut Vec<String>,
) -> bool {
    let deadline = Instant::now() + timeout;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                let hit = pred(&line);
                seen.push(line);
                if hit {
                    return true;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => return false,
            Err(mpsc::RecvTimeoutError::Disconnected) => return false,
        }
    }
    false
}

fn summary_value<'a>(out: &'a str, label: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.trim_start().strip_prefix(label))
        .unwrap_or_else(|| panic!("no `{label}` line in the summary:\n{out}"))
        .trim()
}

#[test]
fn a_duration_too_short_for_the_walk_is_refused_up_front() {
    let started = Instant::now();
    let out = demo(&["--duration", "10s"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--duration 10s is too short") && err.contains("try --duration 30s"),
        "{err}"
    );
    // Refused before anything starts: no files, no servers, no waiting.
    assert!(String::from_utf8_lossy(&out.stdout).is_empty());
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn demo_rolls_out_rolls_back_and_loses_no_write() {
    let (mut child, rx) = spawn(&["--duration", "30s"]);
    let status = wait_exit(&mut child, Duration::from_secs(180));
    let out: Vec<String> = rx.try_iter().collect();
    let out = out.join("\n");
    assert!(status.success(), "demo exited {status}:\n{out}");
    // Every step, then promotion, then the rollback with its reason.
    for step in [
        "step 2/4: weight 25%",
        "step 3/4: weight 50%",
        "step 4/4: weight 100%",
    ] {
        assert!(out.contains(step), "no `{step}` in:\n{out}");
    }
    assert!(
        out.contains("rollout promoted: users at 100%"),
        "no promotion in:\n{out}"
    );
    // The status page link carries the token, so it opens signed in.
    assert!(
        out.lines()
            .any(|l| l.starts_with("status page: http://") && l.contains("/ui#token=")),
        "{out}"
    );
    // After promotion the demo says what comes next, and the live line counts down to it.
    assert!(out.contains("then the demo injects a fault"), "{out}");
    assert!(out.contains("fault in "), "{out}");
    assert!(!out.contains("bake left s"), "{out}");
    // The line's consistency figure is the one the gate judges: where the gate holds on
    // `consistency X < limit`, the same line shows `consistency ≥ Y` with Y that bound, read a
    // moment apart (two API calls), never the raw ratio of 1.0 beside a holding gate.
    for line in out
        .lines()
        .filter(|l| l.contains("holding: min_consistency"))
    {
        let gate: f64 = line
            .split("consistency ")
            .last()
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no gate figure in {line}"));
        let shown: f64 = line
            .split("| consistency ≥ ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no consistency figure in {line}"));
        assert!(shown < 1.0 && (shown - gate).abs() < 0.005, "{line}");
    }
    assert!(out.contains("fault injected"), "{out}");
    let rollback = out
        .lines()
        .find(|l| l.contains("rollback: reason "))
        .unwrap_or_else(|| panic!("no rollback line in:\n{out}"));
    assert!(rollback.contains("reason error_rate"), "{rollback}");
    let took: f64 = rollback
        .split(" after ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no time in {rollback}"));
    assert!(took < 1.0, "rollback took {took} s: {rollback}");
    assert!(
        summary_value(&out, "rollout:").starts_with("reached 100%"),
        "{out}"
    );
    assert!(
        summary_value(&out, "lost writes:").starts_with("0 "),
        "{out}"
    );
    assert!(
        summary_value(&out, "sync settled:").starts_with("yes"),
        "{out}"
    );
    // `≥ BOUND (N sampled)`: with every sample matching, the 95 % Wilson lower bound is
    // N / (N + 1.96²); anything lower means a sample differed.
    let consistency = summary_value(&out, "consistency before fault:");
    let (bound, sampled) = consistency
        .strip_prefix("≥ ")
        .and_then(|s| s.split_once(" ("))
        .and_then(|(b, rest)| {
            Some((
                b.parse::<f64>().ok()?,
                rest.split(' ').next()?.parse::<f64>().ok()?,
            ))
        })
        .unwrap_or_else(|| panic!("{consistency}\n{out}"));
    let all_matched = sampled / (sampled + 1.96 * 1.96);
    assert!(
        sampled > 0.0 && (bound - all_matched).abs() < 0.00015,
        "{consistency}: expected ≥ {all_matched:.4} for {sampled} matching samples\n{out}"
    );
    assert!(out.contains("result: ok"), "{out}");
}

#[test]
fn keep_running_serves_ctl_until_sigterm() {
    let (mut child, rx) = spawn(&["--duration", "20s", "--no-fault", "--keep-running"]);
    let mut seen = Vec::new();
    let up = read_until(
        &rx,
        Duration::from_secs(150),
        |l| l.starts_with("keeping everything up"),
        &mut seen,
    );
    if !up {
        let _ = child.kill();
        panic!("the demo never kept running:\n{}", seen.join("\n"));
    }
    assert!(
        seen.iter().any(|l| l == "result: ok"),
        "{}",
        seen.join("\n")
    );
    let mut address = None;
    read_until(
        &rx,
        Duration::from_secs(10),
        |l| {
            // `admin: http://127.0.0.1:PORT token: TOKEN`
            let parsed = l
                .strip_prefix("admin: ")
                .and_then(|rest| rest.split_once(" token: "))
                .map(|(a, t)| (a.to_string(), t.to_string()));
            let hit = parsed.is_some();
            address = address.take().or(parsed);
            hit
        },
        &mut seen,
    );
    let Some((admin, token)) = address else {
        let _ = child.kill();
        panic!("no admin line:\n{}", seen.join("\n"));
    };
    let ctl = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["ctl", "--admin", &admin, "--token", &token, "routes"])
        .output()
        .unwrap();
    let ctl_out = String::from_utf8_lossy(&ctl.stdout).into_owned();
    let ok = ctl.status.success() && ctl_out.contains("users");
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert!(
        ok,
        "ctl routes failed: {}\n{ctl_out}{}",
        ctl.status,
        String::from_utf8_lossy(&ctl.stderr)
    );
    assert!(status.success(), "demo exited {status} after SIGTERM");
}

#[test]
fn printed_config_passes_check() {
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["--print-config"][..],
        &["--print-config", "--port", "20000"][..],
    ] {
        let out = demo(args).output().unwrap();
        assert!(out.status.success());
        let yaml = String::from_utf8(out.stdout).unwrap();
        assert!(yaml.contains("direction: bidirectional"), "{yaml}");
        let path = dir.path().join("demo.yaml");
        std::fs::write(&path, &yaml).unwrap();
        let check = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "check refused the printed config:\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
    }
}

/// Four consecutive free loopback ports, found by binding them (never a fixed number).
fn free_port_run() -> u16 {
    for _ in 0..200 {
        let base: u16 = 20_000 + (rand::random::<u16>() % 30_000);
        let held: Vec<_> = (0..4)
            .map_while(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).ok())
            .collect();
        if held.len() == 4 {
            return base;
        }
    }
    panic!("no run of four free ports found");
}

#[test]
fn a_port_base_puts_every_listener_on_known_ports() {
    let base = free_port_run();
    let base_text = base.to_string();
    let (mut child, rx) = spawn(&["--duration", "30s", "--no-fault", "--port", &base_text]);
    let mut seen = Vec::new();
    let found = read_until(
        &rx,
        Duration::from_secs(60),
        |l| l.starts_with("admin:"),
        &mut seen,
    );
    // SIGTERM: the demo stops and removes its temporary folder.
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    wait_exit(&mut child, Duration::from_secs(30));
    assert!(found, "{seen:#?}");
    let text = seen.join("\n");
    assert!(
        text.contains(&format!("proxy: http://127.0.0.1:{base}")),
        "{text}"
    );
    assert!(
        text.contains(&format!("admin: http://127.0.0.1:{} ", base + 1)),
        "{text}"
    );
    assert!(
        text.contains(&format!("legacy app: http://127.0.0.1:{} ", base + 2)),
        "{text}"
    );
    assert!(
        text.contains(&format!("users-v2 app: http://127.0.0.1:{} ", base + 3)),
        "{text}"
    );
}

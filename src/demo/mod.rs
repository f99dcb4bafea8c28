//! `switchyard demo`, the quick start (contract §9): in one process and with nothing
//! installed, two SQLite-backed "users" services, the sync worker between their files, the
//! proxy and admin API (the `serve` machinery itself), and a load generator; then a rollout
//! driven through the admin API, a fault rolled back, and a summary. It drives switchyard only
//! from outside (HTTP), as a user would; it never reaches into the running state.

pub mod apps;
pub mod config;
pub mod load;
pub mod view;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use http::Method;
use serde_json::Value;
use sqlx::Row;
use sqlx::sqlite::SqlitePool;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::lifecycle::shutdown_pair;
use load::{KeyWrites, Load, Period, Side};
use view::{Status, View};

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// How long the load runs; the rollout and the fault must fit in it.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Skip the fault after promotion.
    #[arg(long)]
    pub no_fault: bool,
    /// Keep everything up after the summary, for `switchyard ctl` and curl; stop with Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
    /// Base port: proxy = BASE, admin = BASE+1, the apps BASE+2 and BASE+3; 0 = ephemeral.
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// Keep the temporary folder (databases, config, state) at the end.
    #[arg(long)]
    pub keep_files: bool,
    /// Print the configuration the demo runs on and exit.
    #[arg(long)]
    pub print_config: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("database: {0}")]
    Db(String),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Sync(#[from] crate::sync::SyncError),
    #[error(transparent)]
    Serve(#[from] crate::serve::ServeError),
    #[error("admin API: {0}")]
    Admin(String),
    #[error("{0}")]
    Timeout(String),
    #[error(
        "--duration {} is too short for the walk: four steps of at least 2 s of bake, the time at \
         100 % and the fault take {} at least; try --duration 30s or more",
        humantime::format_duration(*.0),
        humantime::format_duration(MIN_DURATION)
    )]
    TooShort(Duration),
}

/// Rows in the users table; each is one virtual user's.
const USERS: i64 = 400;
/// Requests per second the load generator aims at, over all virtual users.
const RATE: u32 = 200;
/// Time at 100% before the fault, so the full weight shows in the figures.
const HOLD_AT_FULL: Duration = Duration::from_secs(2);
/// Time kept for the fault, the rollback and the tail at the end of `--duration`.
const TAIL_AFTER_FAULT: Duration = Duration::from_secs(6);
/// A rollback slower than this is a failure of the demo.
const ROLLBACK_DEADLINE: Duration = Duration::from_secs(10);
/// Time after the rollback, to show traffic back on legacy.
const MIN_TAIL: Duration = Duration::from_secs(2);

/// The shortest `--duration` the walk fits in: four bakes of at least 2 s each (one may
/// restart), the time at full weight, and the fault with its tail.
pub const MIN_DURATION: Duration = Duration::from_secs(20);

/// The live rates are counted over this much of the recent past.
const RATE_WINDOW: Duration = Duration::from_secs(1);

/// `true` when the run showed what it should: promoted, rolled back (unless `--no-fault`),
/// no lost writes.
pub async fn run(args: DemoArgs) -> Result<bool, DemoError> {
    if args.print_config {
        print!("{}", config::yaml(&printed_layout(&args)));
        return Ok(true);
    }
    if args.duration < MIN_DURATION {
        return Err(DemoError::TooShort(args.duration));
    }
    let mut terms =
        signal(SignalKind::terminate()).map_err(|e| DemoError::Io("signal handler".into(), e))?;
    let mut interrupts =
        signal(SignalKind::interrupt()).map_err(|e| DemoError::Io("signal handler".into(), e))?;
    let dir = temp_dir()?;
    println!("switchyard demo: files in {}", dir.display());
    let result = run_in(&args, &dir, &mut terms, &mut interrupts).await;
    if args.keep_files {
        println!("files kept in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn printed_layout(args: &DemoArgs) -> config::Layout {
    let base = if args.port == 0 { 8080 } else { args.port };
    let at = |offset: u16| SocketAddr::from(([127, 0, 0, 1], base.saturating_add(offset)));
    config::Layout {
        proxy: at(0),
        admin: at(1),
        legacy_app: at(2),
        v2_app: at(3),
        legacy_db: "sqlite://legacy.db".into(),
        v2_db: "sqlite://v2.db".into(),
        state_db: "sqlite://switchyard-state.db".into(),
        bake: config::bake_for(args.duration),
    }
}

fn temp_dir() -> Result<PathBuf, DemoError> {
    let dir = std::env::temp_dir().join(format!(
        "switchyard-demo-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).map_err(|e| DemoError::Io(dir.display().to_string(), e))?;
    Ok(dir)
}

fn port(base: u16, offset: u16) -> SocketAddr {
    let p = if base == 0 {
        0
    } else {
        base.saturating_add(offset)
    };
    SocketAddr::from(([127, 0, 0, 1], p))
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, DemoError> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| DemoError::Io(format!("listening on {addr}"), e))
}

async fn run_in(
    args: &DemoArgs,
    dir: &std::path::Path,
    terms: &mut tokio::signal::unix::Signal,
    interrupts: &mut tokio::signal::unix::Signal,
) -> Result<bool, DemoError> {
    let sqlite = |name: &str| format!("sqlite://{}", dir.join(name).display());
    let (legacy_db, v2_db) = (sqlite("legacy.db"), sqlite("v2.db"));
    let legacy_pool = apps::open(&legacy_db).await?;
    let v2_pool = apps::open(&v2_db).await?;
    apps::prepare(&legacy_pool, &v2_pool, USERS).await?;

    let (stop_apps, apps_shutdown) = shutdown_pair();
    let legacy = apps::start(
        "legacy",
        bind(port(args.port, 2)).await?,
        legacy_pool.clone(),
        apps_shutdown.clone(),
    )?;
    let v2 = apps::start(
        "v2",
        bind(port(args.port, 3)).await?,
        v2_pool.clone(),
        apps_shutdown,
    )?;
    let layout = config::Layout {
        proxy: port(args.port, 0),
        admin: port(args.port, 1),
        legacy_app: legacy.addr,
        v2_app: v2.addr,
        legacy_db,
        v2_db,
        state_db: sqlite("switchyard-state.db"),
        bake: config::bake_for(args.duration),
    };
    let config_path = dir.join("switchyard.yaml");
    std::fs::write(&config_path, config::yaml(&layout))
        .map_err(|e| DemoError::Io(config_path.display().to_string(), e))?;
    // The normal loader validates it, exactly as `switchyard check` would.
    let parsed = crate::config::load(&config_path)?;
    crate::sync::install_command(&parsed, None, false, false).await?;

    let token = format!("{:032x}", rand::random::<u128>());
    let running = crate::serve::start(&config_path, Some(&token)).await?;
    let admin = Admin::new(running.admin, &token)?;
    println!(
        "legacy app: http://{}  (legacy.db)   users-v2 app: http://{}  (v2.db)",
        legacy.addr, v2.addr
    );
    println!("proxy: http://{}", running.http);
    println!("admin: http://{} token: {token}", running.admin);
    // The fragment never reaches the server; the page reads the token from it.
    println!("status page: http://{}/ui#token={token}", running.admin);

    let driven = tokio::select! {
        r = drive(args, &admin, running.http, &legacy, &v2, &legacy_pool, &v2_pool) => r,
        _ = terms.recv() => Err(DemoError::Timeout("stopped by SIGTERM".into())),
        _ = interrupts.recv() => Err(DemoError::Timeout("stopped by Ctrl-C".into())),
    };
    let ok = match driven {
        Ok(ok) => ok,
        Err(e) => {
            println!("demo stopped: {e}");
            false
        }
    };
    if args.keep_running {
        println!("keeping everything up; stop with Ctrl-C");
        println!(
            "try: switchyard ctl --admin http://{} --token {token} routes",
            running.admin
        );
        println!(
            "     curl -b session_id=u7 http://{}/api/users/7",
            running.http
        );
        println!("admin: http://{} token: {token}", running.admin);
        tokio::select! {
            _ = terms.recv() => {}
            _ = interrupts.recv() => {}
        }
    }
    running.drain().await;
    stop_apps.trigger();
    legacy_pool.close().await;
    v2_pool.close().await;
    Ok(ok)
}

/// A small client of the admin API, over the one outbound client.
struct Admin {
    client: crate::outbound::Outbound,
    base: String,
    token: String,
}

impl Admin {
    fn new(addr: SocketAddr, token: &str) -> Result<Admin, DemoError> {
        Ok(Admin {
            client: crate::outbound::Outbound::new(None, Duration::from_secs(5))
                .map_err(|e| DemoError::Admin(e.to_string()))?,
            base: format!("http://{addr}"),
            token: token.to_string(),
        })
    }

    async fn call(&self, method: Method, path: &str) -> Result<Value, DemoError> {
        let fail = |e: reqwest::Error| {
            DemoError::Admin(format!("{path}: {}", crate::outbound::error_chain(&e)))
        };
        let response = self
            .client
            .client()
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(fail)?;
        let status = response.status();
        let body = response.bytes().await.map_err(fail)?;
        if !status.is_success() {
            return Err(DemoError::Admin(format!(
                "{path}: {status} {}",
                String::from_utf8_lossy(&body)
            )));
        }
        serde_json::from_slice(&body).map_err(|e| DemoError::Admin(format!("{path}: {e}")))
    }

    async fn get(&self, path: &str) -> Result<Value, DemoError> {
        self.call(Method::GET, path).await
    }

    async fn post(&self, path: &str) -> Result<Value, DemoError> {
        self.call(Method::POST, path).await
    }

    /// The pair's entry in `GET /v1/sync` or `GET /v1/consistency`.
    async fn pair(&self, path: &str, list: &str) -> Option<Value> {
        let v = self.get(path).await.ok()?;
        v[list]
            .as_array()?
            .iter()
            .find(|e| e["name"] == "users" || e["sync"] == "users")
            .cloned()
    }
}

/// One phase of the run, for the summary table.
struct Phase {
    label: String,
    started: Instant,
    ended: Option<Instant>,
    tally: Period,
    lag_p95: Option<f64>,
}

impl Phase {
    fn new(label: impl Into<String>) -> Phase {
        Phase {
            label: label.into(),
            started: Instant::now(),
            ended: None,
            tally: Period::default(),
            lag_p95: None,
        }
    }

    fn row(&self) -> view::Row {
        let end = self.ended.unwrap_or_else(Instant::now);
        view::Row {
            label: self.label.clone(),
            seconds: end.duration_since(self.started).as_secs_f64(),
            legacy: self.tally.side(Side::Legacy).requests,
            target: self.tally.side(Side::Target).requests,
            errors: self.tally.all().errors,
            p99: self.tally.all().p99(),
            lag_p95: self.lag_p95,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Stage {
    Rollout,
    AtFull {
        until: Instant,
    },
    Fault {
        onset: Instant,
        onset_at: SystemTime,
    },
    Tail {
        until: Instant,
    },
}

/// What the run showed, for the summary.
#[derive(Default)]
struct Findings {
    promoted: Option<Duration>,
    rollout_failed: Option<String>,
    rollback: Option<(String, Duration)>,
    consistency_before_fault: Option<(f64, u64)>,
}

async fn wait_for_stream(admin: &Admin, view: &mut View) -> Result<(), DemoError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = admin.pair("/v1/sync", "sync").await
            && s["phase"] == "stream"
        {
            view.event(&format!(
                "sync `users`: backfill done ({} rows legacy → v2), streaming both ways",
                s["backfill_rows_copied"]
            ));
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(DemoError::Timeout(
                "the sync worker did not finish its backfill within 60 s".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn drive(
    args: &DemoArgs,
    admin: &Admin,
    proxy: SocketAddr,
    legacy: &apps::App,
    v2: &apps::App,
    legacy_pool: &SqlitePool,
    v2_pool: &SqlitePool,
) -> Result<bool, DemoError> {
    let mut view = View::new();
    wait_for_stream(admin, &mut view).await?;
    let load = Load::start(proxy, USERS, RATE);
    let started = Instant::now();
    let deadline = started + args.duration;
    let rollout = admin.post("/v1/rollouts/users/start").await?;
    let steps = rollout["steps"].as_array().map_or(0, Vec::len);
    let shown: Vec<String> = rollout["steps"]
        .as_array()
        .map(|s| s.iter().map(|w| format!("{}%", pct(w))).collect())
        .unwrap_or_default();
    view.event(&format!(
        "rollout started: users {}, bake {}s per step, gates {}",
        shown.join(" → "),
        pct(&rollout["bake_s"]),
        config::GATES
    ));
    let mut findings = Findings::default();
    let mut phases: Vec<Phase> = vec![Phase::new(format!("step 1: {}%", pct(&rollout["weight"])))];
    let mut stage = Stage::Rollout;
    // Steps are numbered from 1, as the API reads them.
    let mut step = 1usize;
    // The last second's requests, so the rates follow a rollback within one refresh.
    let mut recent: std::collections::VecDeque<(Instant, Period)> = Default::default();
    let mut consistency = None;
    let mut lag = None;
    loop {
        let period = load.take();
        if let Some(p) = phases.last_mut() {
            p.tally.absorb(&period);
        }
        let now = Instant::now();
        recent.push_back((now, period));
        while recent
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            recent.pop_front();
        }
        let r = admin.get("/v1/rollouts/users").await?;
        if let Some(s) = admin.pair("/v1/sync", "sync").await {
            lag = s["lag_p50_seconds"].as_f64();
            if let (Some(p95), Some(phase)) = (s["lag_p95_seconds"].as_f64(), phases.last_mut()) {
                phase.lag_p95 = Some(phase.lag_p95.map_or(p95, |l: f64| l.max(p95)));
            }
        }
        consistency = match admin.pair("/v1/consistency", "consistency").await {
            // The lower confidence bound: the figure the `min_consistency` gate reads.
            Some(c) if c["stale"] != true => c["lower_bound"]
                .as_f64()
                .map(|lower| (lower, c["sampled"].as_u64().unwrap_or(0))),
            _ => consistency.filter(|_| false),
        };
        let route = admin.get("/v1/routes/users").await?;
        let rolled_back = route["state"] == "rolled_back";
        let rollout_state = r["state"].as_str().unwrap_or("?").to_string();
        let state = if rolled_back {
            "rolled back".to_string()
        } else {
            rollout_state.clone()
        };
        let now_step = r["step"].as_u64().unwrap_or(0) as usize;
        let holding: Vec<String> = r["gates"]
            .as_array()
            .map(|g| {
                g.iter()
                    .filter(|g| g["pass"] == false)
                    .map(|g| {
                        format!(
                            "{} ({})",
                            g["name"].as_str().unwrap_or("?"),
                            g["reason"].as_str().unwrap_or("")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let elapsed = started.elapsed();
        match stage {
            Stage::Rollout => {
                if now_step != step && rollout_state == "progressing" {
                    step = now_step;
                    close_and_restart(&mut phases, &mut recent);
                    phases.push(Phase::new(format!("step {}: {}%", step, pct(&r["weight"]))));
                    view.event(&format!(
                        "[{:5.1}s] step {}/{steps}: weight {}% (every gate held for the bake)",
                        elapsed.as_secs_f64(),
                        step,
                        pct(&r["weight"])
                    ));
                }
                if rollout_state == "promoted" {
                    findings.promoted = Some(elapsed);
                    close_and_restart(&mut phases, &mut recent);
                    phases.push(Phase::new("promoted: 100%"));
                    // The fault comes late enough to leave the sampler time at full weight,
                    // and early enough to leave a tail that shows traffic back on legacy.
                    let until = (Instant::now() + HOLD_AT_FULL)
                        .max(deadline.checked_sub(TAIL_AFTER_FAULT).unwrap_or(deadline));
                    let next = if args.no_fault {
                        "users-v2 keeps all of the traffic until the end (--no-fault)".to_string()
                    } else {
                        format!(
                            "users-v2 serves everyone for {:.0} s, then the demo injects a fault \
                             into it (it will answer 500) to show the rollback",
                            until.duration_since(Instant::now()).as_secs_f64()
                        )
                    };
                    view.event(&format!(
                        "[{:5.1}s] rollout promoted: users at 100% on users-v2; {next}",
                        elapsed.as_secs_f64()
                    ));
                    stage = Stage::AtFull { until };
                } else if rollout_state != "progressing" {
                    let why = format!(
                        "rollout ended {rollout_state} ({})",
                        r["reason"].as_str().unwrap_or("no reason")
                    );
                    view.event(&format!("[{:5.1}s] {why}", elapsed.as_secs_f64()));
                    findings.rollout_failed = Some(why);
                    break;
                } else if Instant::now() > deadline {
                    let why = format!(
                        "the rollout did not reach 100% within --duration {} (at step {}/{steps})",
                        humantime::format_duration(args.duration),
                        step
                    );
                    view.event(&why);
                    findings.rollout_failed = Some(why);
                    break;
                }
            }
            Stage::AtFull { until } => {
                if consistency.is_some() {
                    findings.consistency_before_fault = consistency;
                }
                if Instant::now() >= until {
                    if args.no_fault {
                        stage = Stage::Tail {
                            until: deadline.max(Instant::now() + MIN_TAIL),
                        };
                    } else {
                        findings.consistency_before_fault = consistency;
                        v2.fault.store(true, Ordering::SeqCst);
                        let onset = Instant::now();
                        close_and_restart(&mut phases, &mut recent);
                        phases.push(Phase::new("fault → rollback"));
                        view.event(&format!(
                            "[{:5.1}s] fault injected: users-v2 now answers 500",
                            elapsed.as_secs_f64()
                        ));
                        stage = Stage::Fault {
                            onset,
                            onset_at: SystemTime::now(),
                        };
                    }
                }
            }
            Stage::Fault { onset, onset_at } => {
                if rolled_back {
                    let seen = onset.elapsed();
                    // The mark's own time is more precise than our polling, when it parses.
                    let took = route["rollback"]["at"]
                        .as_str()
                        .and_then(|at| humantime::parse_rfc3339_weak(at).ok())
                        .and_then(|at| at.duration_since(onset_at).ok())
                        .filter(|d| *d <= seen)
                        .unwrap_or(seen);
                    // The mark reads `REASON: detail`.
                    let mark = route["rollback"]["reason"].as_str().unwrap_or("?");
                    let (reason, detail) = mark.split_once(": ").unwrap_or((mark, ""));
                    let reason = reason.to_string();
                    close_and_restart(&mut phases, &mut recent);
                    phases.push(Phase::new("rolled back: 0%"));
                    view.event(&format!(
                        "[{:5.1}s] rollback: reason {reason} after {:.3} s from the fault's onset ({detail})",
                        elapsed.as_secs_f64(),
                        took.as_secs_f64(),
                    ));
                    findings.rollback = Some((reason, took));
                    stage = Stage::Tail {
                        until: deadline.max(Instant::now() + MIN_TAIL),
                    };
                } else if onset.elapsed() > ROLLBACK_DEADLINE {
                    view.event("no rollback within 10 s of the fault");
                    break;
                }
            }
            Stage::Tail { until } => {
                if Instant::now() >= until {
                    break;
                }
            }
        }
        let rates = {
            let mut window = Period::default();
            for (_, p) in &recent {
                window.absorb(p);
            }
            let secs = recent
                .front()
                .map_or(0.0, |(t, _)| now.duration_since(*t).as_secs_f64())
                .max(0.2);
            let all = window.all();
            (
                window.side(Side::Legacy).requests as f64 / secs,
                window.side(Side::Target).requests as f64 / secs,
                if all.requests == 0 {
                    0.0
                } else {
                    all.errors as f64 / all.requests as f64
                },
                all.p99(),
            )
        };
        view.status(&Status {
            elapsed,
            state,
            step: now_step,
            steps,
            weight: if rolled_back {
                0.0
            } else {
                r["weight"].as_f64().unwrap_or(0.0)
            },
            next: match stage {
                Stage::Rollout => format!(
                    "bake left {:.1} s",
                    r["bake_left_s"].as_f64().unwrap_or(0.0)
                ),
                Stage::AtFull { until } if !args.no_fault => format!(
                    "fault in {:.1} s",
                    until
                        .saturating_duration_since(Instant::now())
                        .as_secs_f64()
                ),
                Stage::Fault { .. } => "fault injected, waiting for the rollback".into(),
                _ => "–".into(),
            },
            legacy_rps: rates.0,
            target_rps: rates.1,
            error_rate: rates.2,
            p99: rates.3,
            sync_lag: lag,
            consistency,
            // Gates only matter while a step bakes.
            holding: if rollout_state == "progressing" {
                holding
            } else {
                Vec::new()
            },
        });
        let pause = if matches!(stage, Stage::Fault { .. }) {
            Duration::from_millis(20)
        } else {
            Duration::from_millis(200)
        };
        tokio::time::sleep(pause).await;
    }
    let (rest, keys) = load.stop().await;
    if let Some(p) = phases.last_mut() {
        p.tally.absorb(&rest);
    }
    close(&mut phases);
    view.finish();
    v2.fault.store(false, Ordering::SeqCst);
    view.event("load stopped; waiting for the sync worker to settle both databases…");
    let settled = settle(legacy_pool, v2_pool, Duration::from_secs(30)).await;
    let lost = lost_writes(&keys, legacy_pool, v2_pool).await?;
    let acked = keys.values().filter(|k| k.acked.is_some()).count();
    let rows: Vec<view::Row> = phases.iter().map(Phase::row).collect();
    println!();
    println!("summary");
    print!("{}", view::table(&rows));
    let total: u64 = rows.iter().map(|r| r.legacy + r.target).sum();
    println!(
        "  served by the apps:        legacy {} · users-v2 {} ({} through the proxy)",
        legacy.served.load(Ordering::Relaxed),
        v2.served.load(Ordering::Relaxed),
        total
    );
    match findings.promoted {
        Some(t) => println!(
            "  rollout:                   reached 100% in {:.1} s",
            t.as_secs_f64()
        ),
        None => println!(
            "  rollout:                   did not reach 100% ({})",
            findings.rollout_failed.as_deref().unwrap_or("stopped")
        ),
    }
    println!(
        "  consistency before fault:  {}",
        view::consistency_text(findings.consistency_before_fault)
    );
    match (&findings.rollback, args.no_fault) {
        (_, true) => println!("  rollback:                  – (--no-fault)"),
        (Some((reason, took)), false) => println!(
            "  rollback:                  reason {reason}, {:.3} s after the fault's onset",
            took.as_secs_f64()
        ),
        (None, false) => println!("  rollback:                  none"),
    }
    println!(
        "  sync settled:              {}",
        if settled {
            "yes, both databases hold the same rows"
        } else {
            "NO: the databases still differ"
        }
    );
    println!(
        "  lost writes:               {} ({} keys written; each must hold its last acknowledged value in both databases)",
        lost.len(),
        acked
    );
    for (id, why) in lost.iter().take(5) {
        println!("    key {id}: {why}");
    }
    let ok = findings.promoted.is_some()
        && (args.no_fault || findings.rollback.is_some())
        && lost.is_empty()
        && settled;
    println!("result: {}", if ok { "ok" } else { "FAILED" });
    Ok(ok)
}

/// A number as people write it: `25`, `2.5`.
fn pct(w: &Value) -> String {
    w.as_f64().map_or_else(|| w.to_string(), |w| format!("{w}"))
}

fn close_and_restart(
    phases: &mut [Phase],
    recent: &mut std::collections::VecDeque<(Instant, Period)>,
) {
    close(phases);
    // The rates start over with the phase: the line after a step or a rollback shows only
    // what the new weight served.
    recent.clear();
}

fn close(phases: &mut [Phase]) {
    if let Some(p) = phases.last_mut()
        && p.ended.is_none()
    {
        p.ended = Some(Instant::now());
    }
}

type Rows = Vec<(i64, String, String, String)>;

async fn dump(pool: &SqlitePool) -> Result<Rows, DemoError> {
    let rows = sqlx::query("SELECT id, name, email, updated_at FROM users ORDER BY id")
        .fetch_all(pool)
        .await
        .map_err(|e| DemoError::Db(e.to_string()))?;
    Ok(rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect())
}

/// Waits until both files hold the same rows (the sync worker caught up both ways).
async fn settle(a: &SqlitePool, b: &SqlitePool, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if let (Ok(x), Ok(y)) = (dump(a).await, dump(b).await)
            && x == y
        {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A write is lost when a database does not hold its value or a later one of the same key.
/// While traffic is split, either database may have taken a write first; the sync worker must
/// carry it to the other, so both "own" every acknowledged write at the end.
async fn lost_writes(
    keys: &HashMap<i64, KeyWrites>,
    legacy: &SqlitePool,
    v2: &SqlitePool,
) -> Result<Vec<(i64, String)>, DemoError> {
    let (a, b) = (dump(legacy).await?, dump(v2).await?);
    let index =
        |rows: &Rows| -> HashMap<i64, String> { rows.iter().map(|r| (r.0, r.1.clone())).collect() };
    let (a, b) = (index(&a), index(&b));
    let mut lost = Vec::new();
    let mut ids: Vec<&i64> = keys.keys().collect();
    ids.sort();
    for id in ids {
        let k = &keys[id];
        let Some(acked) = k.acked else { continue };
        for (db, rows) in [("legacy.db", &a), ("v2.db", &b)] {
            match rows.get(id) {
                None => lost.push((*id, format!("missing in {db}"))),
                Some(v) if load::seq_of(v) < acked || load::seq_of(v) > k.sent => lost.push((
                    *id,
                    format!("{db} holds `{v}`, the last acknowledged write was v{acked}"),
                )),
                Some(_) => {}
            }
        }
    }
    Ok(lost)
}

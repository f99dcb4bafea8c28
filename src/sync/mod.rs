//! The embedded sync worker: keeps a legacy table and its replacement in step while traffic is
//! split (change capture by triggers per engine, backfill, apply with checkpoints, conflicts,
//! leases). It never touches routing; it publishes its figures into `telemetry::Feeds`, and
//! the rollout gates read them there. Phases are written down in LIFECYCLE.md.

pub mod apply;
pub mod canon;
pub mod capture;
pub mod engine;
pub mod plan;
pub mod worker;
pub mod write;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::config::{Config, SyncSpec};
use crate::lifecycle::Shutdown;
use crate::telemetry::{Feeds, Metrics};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{0}")]
    Url(String),
    #[error("cannot connect to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("{what}: {source}")]
    Query { what: String, source: sqlx::Error },
    #[error("sync `{sync}` cannot run:\n  - {}", problems.join("\n  - "))]
    Preflight { sync: String, problems: Vec<String> },
    #[error(
        "sync `{0}`: the change-capture objects are not installed; run `switchyard sync install --config FILE`"
    )]
    NotInstalled(String),
    #[error("sync `{0}`: another process took over the lease")]
    LostLease(String),
    #[error("no sync named `{0}` in the config")]
    UnknownSync(String),
}

/// Starts one worker per configured pair.
pub fn start_all(
    config: &Config,
    feeds: &Feeds,
    metrics: &Arc<Metrics>,
    shutdown: &Shutdown,
) -> Vec<tokio::task::JoinHandle<()>> {
    config
        .sync
        .iter()
        .map(|spec| {
            worker::SyncWorker::new(spec.clone(), feeds.clone(), metrics.clone())
                .start(shutdown.clone())
        })
        .collect()
}

pub fn find<'a>(config: &'a Config, name: &str) -> Result<&'a SyncSpec, SyncError> {
    config
        .sync
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| SyncError::UnknownSync(name.to_string()))
}

/// Crash injection for the crash-window tests: `SWITCHYARD_FAILPOINT=NAME[:N]` aborts the
/// process the Nth time (default first) execution passes the point called NAME.
pub fn failpoint(name: &str) {
    static SPEC: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);
    let spec = SPEC.get_or_init(|| {
        let v = std::env::var("SWITCHYARD_FAILPOINT").ok()?;
        let (n, count) = match v.split_once(':') {
            Some((n, c)) => (n.to_string(), c.parse().unwrap_or(1)),
            None => (v, 1),
        };
        Some((n, count))
    });
    if let Some((n, count)) = spec
        && n == name
        && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *count
    {
        eprintln!("failpoint {name} reached: aborting");
        std::process::abort();
    }
}

/// `switchyard sync install|uninstall`: resolves each pair (or the one named), runs the
/// preflight checks, then prints (`dry_run`) or runs the DDL.
pub async fn install_command(
    config: &Config,
    only: Option<&str>,
    uninstall: bool,
    dry_run: bool,
) -> Result<(), SyncError> {
    let specs: Vec<&SyncSpec> = match only {
        Some(name) => vec![find(config, name)?],
        None => config.sync.iter().collect(),
    };
    for spec in specs {
        let plan = plan::resolve(spec, engine::Session::Applier).await?;
        let ddl = if uninstall {
            capture::uninstall_ddl(&plan)
        } else {
            capture::install_ddl(&plan)
        };
        if dry_run {
            println!("-- sync `{}`", spec.name);
            for side in &ddl {
                println!("-- {} ({})", side.label, side.url);
                for stmt in &side.statements {
                    println!("{stmt};");
                }
            }
        } else {
            capture::execute(&plan, &ddl).await?;
            println!(
                "sync `{}`: {} ({} statements)",
                spec.name,
                if uninstall {
                    "uninstalled"
                } else {
                    "installed"
                },
                ddl.iter().map(|d| d.statements.len()).sum::<usize>()
            );
        }
    }
    Ok(())
}

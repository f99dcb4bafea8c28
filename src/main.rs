//! The `switchyard` command line: parses arguments, sets up logging and the runtime, and
//! hands over to the library. `anyhow` lives here and nowhere else.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use switchyard::telemetry::logging::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Traffic router for strangler-fig migrations"
)]
struct Cli {
    /// Log format; default: text on a terminal, json otherwise.
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    /// Log level or filter, e.g. `info` or `switchyard=debug`; default `info` (`off` for
    /// `demo`, which reports what happens in its own view).
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy, the admin API and the background workers named in the config.
    Serve {
        /// The config file (YAML; see config/switchyard.yaml).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Worker threads, at least 1; default: one per core the process may use.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
        concurrency: Option<u16>,
    },
    /// Validate a config file: exit 0, or exit 2 with `FILE:LINE:COL: message` per problem.
    Check {
        /// The config file (YAML; see config/switchyard.yaml).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Client of the admin API: read and change routes and flags, read the audit log.
    Ctl(switchyard::ctl::CtlArgs),
    /// Compare the two sides of a sync pair.
    Consistency {
        #[command(subcommand)]
        action: ConsistencyAction,
    },
    /// The quick start: a whole migration, live, with nothing installed.
    Demo(switchyard::demo::DemoArgs),
    /// Install or remove the change-capture objects the sync worker needs.
    Sync {
        #[command(subcommand)]
        action: SyncAction,
    },
}

#[derive(Subcommand)]
enum ConsistencyAction {
    /// One full comparison (checksum bisection): exit 0 when consistent, 3 when not, 1 on error.
    Check {
        /// The config file (YAML; see config/switchyard.yaml).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// The sync pair to compare (its `name`); may be left out when the config has one.
        #[arg(long, value_name = "NAME")]
        sync: Option<String>,
        /// Re-queue every differing key through the sync worker's apply path.
        #[arg(long)]
        repair: bool,
        /// `table` for people, `json` for scripts (`text` is accepted for `table`).
        #[arg(
            short,
            long,
            value_enum,
            default_value = "table",
            value_name = "FORMAT"
        )]
        output: switchyard::ctl::Output,
    },
}

#[derive(Subcommand)]
enum SyncAction {
    /// Create change tables, triggers and bookkeeping tables on both sides (idempotent).
    Install {
        /// The config file (YAML; see config/switchyard.yaml).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Only this pair (its `name`); default: every pair in the config.
        #[arg(long, value_name = "NAME")]
        sync: Option<String>,
        /// Print the DDL and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove the triggers, capture functions and change tables (the conflict log stays).
    Uninstall {
        /// The config file (YAML; see config/switchyard.yaml).
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Only this pair (its `name`); default: every pair in the config.
        #[arg(long, value_name = "NAME")]
        sync: Option<String>,
        /// Print the DDL and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Demo(_) => "off",
        _ => "info",
    };
    // PostgreSQL's notices ("relation … already exists, skipping" on a repeated `sync
    // install`) are the server talking to a DBA, not events of switchyard's: hidden unless asked.
    let default_filter = format!("{default_level},sqlx::postgres::notice=warn");
    logging::init(
        cli.log_format,
        cli.log_level.as_deref().unwrap_or(&default_filter),
    );
    match cli.command {
        Command::Demo(args) => demo(args),
        Command::Check { config } => check(&config),
        Command::Ctl(args) => ctl(args),
        Command::Consistency {
            action:
                ConsistencyAction::Check {
                    config,
                    sync,
                    repair,
                    output,
                },
        } => match consistency_check(
            &config,
            sync.as_deref(),
            repair,
            output == switchyard::ctl::Output::Json,
        ) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(3),
            Err(e) => {
                eprintln!("switchyard consistency: {}", one_message(&e));
                ExitCode::FAILURE
            }
        },
        Command::Sync { action } => match sync(action) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("switchyard sync: {}", one_message(&e));
                ExitCode::FAILURE
            }
        },
        Command::Serve {
            config,
            concurrency,
        } => match serve(config, concurrency) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("switchyard: {}", one_message(&e));
                ExitCode::FAILURE
            }
        },
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match switchyard::config::load(path) {
        Ok(config) => {
            println!(
                "{}: ok ({} backends, {} routes, {} flags)",
                path.display(),
                config.backends.len(),
                config.routes.len(),
                config.flags.len()
            );
            ExitCode::SUCCESS
        }
        Err(switchyard::config::ConfigError::Invalid(problems)) => {
            for p in &problems {
                println!("{p}");
            }
            ExitCode::from(2)
        }
        Err(e) => {
            println!("{}:1:1: {e}", path.display());
            ExitCode::from(2)
        }
    }
}

fn ctl(args: switchyard::ctl::CtlArgs) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => {
            ExitCode::from(u8::try_from(runtime.block_on(switchyard::ctl::run(args))).unwrap_or(1))
        }
        Err(e) => {
            eprintln!("switchyard ctl: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each cause once: library errors often repeat their
/// source in their own text, which `{:#}` would print again for every level of the chain.
fn one_message(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn consistency_check(
    config: &std::path::Path,
    sync: Option<&str>,
    repair: bool,
    json: bool,
) -> anyhow::Result<bool> {
    let parsed = switchyard::config::load(config)
        .with_context(|| format!("reading {}", config.display()))?;
    let names: Vec<&str> = parsed.sync.iter().map(|s| s.name.as_str()).collect();
    let sync = match (sync, names.as_slice()) {
        (Some(name), _) => name,
        (None, [only]) => only,
        (None, []) => anyhow::bail!("{} has no `sync:` pairs", config.display()),
        (None, many) => anyhow::bail!(
            "{} has {} sync pairs; name one with --sync ({})",
            config.display(),
            many.len(),
            many.join(", ")
        ),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    Ok(runtime.block_on(switchyard::consistency::check_command(
        &parsed, sync, repair, json,
    ))?)
}

fn demo(args: switchyard::demo::DemoArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("switchyard demo: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(switchyard::demo::run(args)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("switchyard demo: {e}");
            ExitCode::FAILURE
        }
    }
}

fn sync(action: SyncAction) -> anyhow::Result<()> {
    let (config, only, uninstall, dry_run) = match action {
        SyncAction::Install {
            config,
            sync,
            dry_run,
        } => (config, sync, false, dry_run),
        SyncAction::Uninstall {
            config,
            sync,
            dry_run,
        } => (config, sync, true, dry_run),
    };
    let parsed = switchyard::config::load(&config)
        .with_context(|| format!("reading {}", config.display()))?;
    anyhow::ensure!(
        !parsed.sync.is_empty(),
        "{} has no `sync:` pairs",
        config.display()
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(switchyard::sync::install_command(
        &parsed,
        only.as_deref(),
        uninstall,
        dry_run,
    ))?;
    if !dry_run && !uninstall {
        println!(
            "next: `switchyard serve --config {}` runs the sync worker: it copies the existing \
             rows (backfill), then streams every change; follow it at GET /v1/sync on the admin \
             API, and compare the two sides with `switchyard consistency check --config {}`",
            config.display(),
            config.display()
        );
    }
    Ok(())
}

fn serve(config: PathBuf, concurrency: Option<u16>) -> anyhow::Result<()> {
    let threads = concurrency.map_or_else(
        || std::thread::available_parallelism().map_or(1, |n| n.get()),
        usize::from,
    );
    // One thread needs no work stealing; the single-threaded scheduler is cheaper per request.
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
    .context("cannot start the runtime")?;
    runtime
        .block_on(switchyard::serve::run(&config))
        .with_context(|| format!("serving {}", config.display()))
}

//! `switchyard serve`: wires config, snapshot, data plane, admin listener and reload
//! together, and runs the SIGTERM drain sequence (contract §8).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::task::JoinHandle;

use crate::config::reload::{ConfigReloader, ReloadError};
use crate::config::{self, ConfigError};
use crate::control::admin;
use crate::control::auth::{AuthError, Tokens};
use crate::control::plane::ControlPlane;
use crate::dataplane::listener::{self, ConnectionLimit, ListenerSettings};
use crate::dataplane::proxy::Proxy;
use crate::dataplane::tls::{TlsError, TlsTerminator};
use crate::lifecycle::{Readiness, ShutdownTrigger, shutdown_pair};
use crate::snapshot::Publisher;
use crate::telemetry::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Reload(#[from] ReloadError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot install a signal handler: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(
        "admin.listen {0} is not a loopback address, so the admin API needs a token: set SWITCHYARD_ADMIN_TOKEN or admin.tokens_file"
    )]
    AdminWithoutToken(SocketAddr),
    #[error(transparent)]
    AccessLog(#[from] crate::telemetry::access_log::AccessLogError),
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { what, addr, source })
}

const STORE_STARTUP_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs until SIGTERM or SIGINT, then drains.
pub async fn run(config_path: &Path) -> Result<(), ServeError> {
    let env_token = std::env::var("SWITCHYARD_ADMIN_TOKEN").ok();
    let mut terms = signal(SignalKind::terminate()).map_err(ServeError::Signal)?;
    let mut interrupts = signal(SignalKind::interrupt()).map_err(ServeError::Signal)?;
    let running = start(config_path, env_token.as_deref()).await?;
    // One machine-readable line on stdout, so scripts and tests that asked for port 0 can
    // find the ports without parsing logs.
    let mut listening = serde_json::json!({ "event": "listening", "http": running.http.to_string(), "admin": running.admin.to_string() });
    if let Some(addr) = running.https {
        listening["https"] = serde_json::Value::from(addr.to_string());
    }
    println!("{listening}");

    tokio::select! {
        _ = terms.recv() => tracing::info!("SIGTERM: draining"),
        _ = interrupts.recv() => tracing::info!("SIGINT: draining"),
    }
    running.drain().await;
    Ok(())
}

/// A started `serve`: its bound addresses, and the tasks [`Running::drain`] stops in order.
pub struct Running {
    pub http: SocketAddr,
    pub admin: SocketAddr,
    pub https: Option<SocketAddr>,
    drain_delay: std::time::Duration,
    readiness: Readiness,
    stop_proxy: ShutdownTrigger,
    stop_rest: ShutdownTrigger,
    proxy_tasks: Vec<Joined>,
    rest_tasks: Vec<Joined>,
}

/// A task's end, whatever it returns: draining only waits for it.
type Joined = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

fn joined<T: Send + 'static>(task: JoinHandle<T>) -> Joined {
    Box::pin(async move {
        let _ = task.await;
    })
}

impl Running {
    /// The drain sequence of contract §8: readiness off, `drain_delay`, listeners drain,
    /// then the admin listener and background jobs stop.
    pub async fn drain(self) {
        // Readiness goes first so load balancers stop sending before the listener closes.
        self.readiness.set(false);
        if !self.drain_delay.is_zero() {
            tokio::time::sleep(self.drain_delay).await;
        }
        self.stop_proxy.trigger();
        // Both listeners drain at once, each within shutdown_timeout.
        for task in self.proxy_tasks {
            task.await;
        }
        self.stop_rest.trigger();
        for task in self.rest_tasks {
            task.await;
        }
        tracing::info!("switchyard stopped");
    }
}

/// Binds and starts everything `serve` runs (without signal handling); `env_token` is the
/// admin token `run` takes from `SWITCHYARD_ADMIN_TOKEN`. The demo starts it in-process.
pub async fn start(config_path: &Path, env_token: Option<&str>) -> Result<Running, ServeError> {
    let config = config::load(config_path)?;
    let tokens = Arc::new(Tokens::load(
        env_token,
        config.admin_tokens_file.as_deref(),
    )?);
    if tokens.is_empty() && !config.admin_listen.ip().is_loopback() {
        return Err(ServeError::AdminWithoutToken(config.admin_listen));
    }
    if tokens.is_empty() {
        tracing::warn!("no admin token configured: every /v1 call will be refused with 401");
    }
    let metrics = Arc::new(Metrics::new());
    let publisher = Arc::new(Publisher::new(
        &config,
        metrics.clone(),
        Arc::new(crate::health::HealthRegistry::default()),
    ));
    let control = Arc::new(ControlPlane::new(publisher.clone(), config.clone()));
    // Runtime state should be in force before the first request; a store that does not
    // answer soon is left to the background sync, and the file's config serves meanwhile.
    match tokio::time::timeout(STORE_STARTUP_WAIT, control.connect_store()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "state store unavailable at start; serving the file's config")
        }
        Err(_) => tracing::warn!(
            "state store did not answer within {STORE_STARTUP_WAIT:?}; serving the file's config"
        ),
    }
    let readiness = Readiness::default();

    let proxy_listener = bind("proxy", config.listen).await?;
    let admin_listener = bind("admin", config.admin_listen).await?;
    let proxy_addr = proxy_listener.local_addr().map_err(ServeError::Signal)?;
    let admin_addr = admin_listener.local_addr().map_err(ServeError::Signal)?;
    // Certificates are loaded before anything serves, so a broken one stops the start.
    let https = match &config.https {
        Some(spec) => {
            let terminator = TlsTerminator::load(spec)?;
            let listener = bind("https", spec.addr).await?;
            let addr = listener.local_addr().map_err(ServeError::Signal)?;
            Some((listener, addr, terminator))
        }
        None => None,
    };

    let (stop_proxy, proxy_shutdown) = shutdown_pair();
    let (stop_rest, rest_shutdown) = shutdown_pair();

    let reloader = ConfigReloader::new(
        config_path,
        publisher.clone(),
        control.clone(),
        config.clone(),
    )
    .start(rest_shutdown.clone())?;
    // Every background loop runs under the one supervisor: restarted with backoff when it
    // ends before shutdown, and shown with its last error in `/v1/jobs` and `/readyz`.
    let jobs = control.jobs().clone();
    let reloader = jobs.watch("config_reload", rest_shutdown.clone(), vec![reloader]);
    let store_sync = jobs.supervise("store_sync", rest_shutdown.clone(), {
        let control = control.clone();
        move |shutdown| tokio::spawn(control.clone().run_store_sync(shutdown))
    });
    let monitor = jobs.supervise("rollback_monitor", rest_shutdown.clone(), {
        let (handle, control) = (publisher.handle(), control.clone());
        move |shutdown| {
            crate::health::monitor::RollbackMonitor::new(handle.clone(), control.clone())
                .start(shutdown)
        }
    });
    let prober = jobs.supervise("prober", rest_shutdown.clone(), {
        let handle = publisher.handle();
        move |shutdown| crate::health::probe::ActiveProber::new(handle.clone()).start(shutdown)
    });
    let sync_workers = jobs.watch(
        "sync_workers",
        rest_shutdown.clone(),
        crate::sync::start_all(&config, control.feeds(), &metrics, &rest_shutdown),
    );
    let samplers = jobs.watch(
        "samplers",
        rest_shutdown.clone(),
        crate::consistency::start_all(&config, control.feeds(), &metrics, &rest_shutdown),
    );
    let rollouts = jobs.supervise("rollout_controller", rest_shutdown.clone(), {
        let (control, handle, metrics) = (control.clone(), publisher.handle(), metrics.clone());
        move |shutdown| {
            crate::control::rollout::controller::RolloutController::new(
                control.clone(),
                handle.clone(),
                metrics.clone(),
            )
            .start(shutdown)
        }
    });
    let endpoints = publisher.handle();
    metrics.watch_endpoints(move || endpoints.load().endpoint_states());
    let mut proxy = Proxy::new(publisher.handle(), &config.limits, config.escaped_slashes);
    if let Some(spec) = &config.access_log {
        let log = crate::telemetry::access_log::AccessLog::start(
            spec,
            metrics.access_log_dropped.clone(),
        )?;
        proxy = proxy.with_access_log(log);
    }
    if let Some(spec) = &config.tracing {
        proxy = proxy.with_tracer(crate::telemetry::traces::Tracer::start(spec));
    }
    let proxy = Arc::new(proxy);
    let settings = ListenerSettings {
        header_read_timeout: config.timeouts.header_read,
        keepalive_timeout: config.timeouts.keepalive,
        max_header_bytes: config.limits.max_header_bytes,
        shutdown_timeout: config.shutdown_timeout,
    };
    let limit = ConnectionLimit::new(config.limits.max_connections);
    let mut https_addr = None;
    let mut cert_reloader = None;
    let https_task = match https {
        Some((https_listener, addr, terminator)) => {
            https_addr = Some(addr);
            cert_reloader = Some(
                terminator
                    .reloader(metrics.clone())
                    .start(rest_shutdown.clone())?,
            );
            Some(tokio::spawn(listener::serve(
                "https",
                https_listener,
                Arc::new(proxy.for_https()),
                Some(terminator.acceptor()),
                settings,
                limit.clone(),
                proxy_shutdown.clone(),
            )))
        }
        None => None,
    };
    let proxy_task = tokio::spawn(listener::serve(
        "http",
        proxy_listener,
        proxy,
        None,
        settings,
        limit,
        proxy_shutdown,
    ));
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        admin::router(metrics.clone(), readiness.clone(), control.clone(), tokens),
        rest_shutdown,
    ));

    readiness.set(true);
    tracing::info!(%proxy_addr, https_addr = https_addr.map(tracing::field::display), %admin_addr, routes = config.routes.len(), "switchyard is serving");
    let mut proxy_tasks = vec![joined(proxy_task)];
    proxy_tasks.extend(https_task.map(joined));
    // The order is the drain order: admin first, then the jobs.
    let mut rest_tasks = vec![joined(admin_task), joined(reloader)];
    rest_tasks.extend(cert_reloader.map(joined));
    rest_tasks.extend([joined(store_sync), joined(monitor), joined(prober)]);
    rest_tasks.extend([joined(samplers), joined(sync_workers), joined(rollouts)]);
    Ok(Running {
        http: proxy_addr,
        admin: admin_addr,
        https: https_addr,
        drain_delay: config.drain_delay,
        readiness,
        stop_proxy,
        stop_rest,
        proxy_tasks,
        rest_tasks,
    })
}

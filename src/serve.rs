//! `switchyard serve`: wires config, snapshot, data plane, admin listener and reload
//! together, and runs the SIGTERM drain sequence (contract §8).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::reload::{ConfigReloader, ReloadError};
use crate::config::{self, ConfigError};
use crate::control::admin;
use crate::dataplane::listener::{self, ListenerSettings};
use crate::dataplane::proxy::Proxy;
use crate::lifecycle::{Readiness, shutdown_pair};
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
    #[error("cannot install a signal handler: {0}")]
    Signal(std::io::Error),
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, ServeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServeError::Bind { what, addr, source })
}

/// Runs until SIGTERM or SIGINT, then drains.
pub async fn run(config_path: &Path) -> Result<(), ServeError> {
    let config = config::load(config_path)?;
    let metrics = Arc::new(Metrics::new());
    let publisher = Arc::new(Publisher::new(&config, metrics.clone()));
    let readiness = Readiness::default();

    let proxy_listener = bind("proxy", config.listen).await?;
    let admin_listener = bind("admin", config.admin_listen).await?;
    let proxy_addr = proxy_listener.local_addr().map_err(ServeError::Signal)?;
    let admin_addr = admin_listener.local_addr().map_err(ServeError::Signal)?;

    let mut terms = signal(SignalKind::terminate()).map_err(ServeError::Signal)?;
    let mut interrupts = signal(SignalKind::interrupt()).map_err(ServeError::Signal)?;

    let (stop_proxy, proxy_shutdown) = shutdown_pair();
    let (stop_rest, rest_shutdown) = shutdown_pair();

    let reloader = ConfigReloader::new(config_path, publisher.clone(), config.clone())
        .start(rest_shutdown.clone())?;
    let proxy = Arc::new(Proxy::new(
        publisher.handle(),
        &config.timeouts,
        &config.limits,
    ));
    let settings = ListenerSettings {
        header_read_timeout: config.timeouts.header_read,
        max_header_bytes: config.limits.max_header_bytes,
        shutdown_timeout: config.shutdown_timeout,
    };
    let proxy_task = tokio::spawn(listener::serve(
        proxy_listener,
        proxy,
        settings,
        proxy_shutdown,
    ));
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        admin::router(metrics.clone(), readiness.clone()),
        rest_shutdown,
    ));

    readiness.set(true);
    tracing::info!(%proxy_addr, %admin_addr, routes = config.routes.len(), "switchyard is serving");
    // One machine-readable line on stdout, so scripts and tests that asked for port 0 can
    // find the ports without parsing logs.
    println!(
        "{}",
        serde_json::json!({ "event": "listening", "http": proxy_addr.to_string(), "admin": admin_addr.to_string() })
    );

    tokio::select! {
        _ = terms.recv() => tracing::info!("SIGTERM: draining"),
        _ = interrupts.recv() => tracing::info!("SIGINT: draining"),
    }
    // Readiness goes first so load balancers stop sending before the listener closes.
    readiness.set(false);
    if !config.drain_delay.is_zero() {
        tokio::time::sleep(config.drain_delay).await;
    }
    stop_proxy.trigger();
    let _ = proxy_task.await;
    stop_rest.trigger();
    let _ = admin_task.await;
    let _ = reloader.await;
    tracing::info!("switchyard stopped");
    Ok(())
}

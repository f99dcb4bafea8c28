//! The client-facing listener: accepts connections, serves HTTP/1.1 and h2c on the same
//! port, and drains in-flight requests on shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};

use super::head_guard::GuardedIo;
use super::proxy::Proxy;
use crate::lifecycle::Shutdown;

#[derive(Debug, Clone, Copy)]
pub struct ListenerSettings {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    /// How long in-flight requests may take to finish once shutdown starts.
    pub shutdown_timeout: Duration,
}

/// Serves until `shutdown` fires, then stops accepting and waits for open connections to
/// finish their requests (at most `shutdown_timeout`).
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    settings: ListenerSettings,
    mut shutdown: Shutdown,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        // Above our own head limit, so the head guard answers an oversized head with a JSON
        // 431 before hyper would cut the connection with a bare one.
        .max_buf_size((settings.max_header_bytes * 2).max(64 * 1024));
    builder
        .http2()
        .timer(TokioTimer::new())
        // Like HTTP/1: hyper's own limit sits above ours so the proxy answers with JSON.
        .max_header_list_size(((settings.max_header_bytes * 2).max(64 * 1024)) as u32);
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();

    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => serve_connection(&builder, &graceful, stream, peer, &proxy, settings),
                Err(e) => {
                    // Usually EMFILE: back off briefly instead of spinning on the error.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.wait() => break,
        }
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all client connections closed"),
        _ = tokio::time::sleep(settings.shutdown_timeout) => {
            tracing::warn!(timeout = ?settings.shutdown_timeout, "shutdown timeout reached with connections still open");
        }
    }
}

fn serve_connection(
    builder: &Arc<auto::Builder<TokioExecutor>>,
    graceful: &GracefulShutdown,
    stream: TcpStream,
    peer: SocketAddr,
    proxy: &Arc<Proxy>,
    settings: ListenerSettings,
) {
    let _ = stream.set_nodelay(true);
    let (io, verdicts) = GuardedIo::new(stream, settings.max_header_bytes);
    let proxy = proxy.clone();
    let service = service_fn(move |req| {
        let proxy = proxy.clone();
        let verdicts = verdicts.clone();
        async move { Ok::<_, Infallible>(proxy.handle(req, peer, &verdicts).await) }
    });
    let connection = builder
        .serve_connection_with_upgrades(TokioIo::new(io), service)
        .into_owned();
    let connection = graceful.watch(connection);
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(%peer, error = %e, "client connection ended with an error");
        }
    });
}

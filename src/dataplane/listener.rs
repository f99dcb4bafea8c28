//! The client-facing listeners: accept connections (plain, or TLS terminated here), serve
//! HTTP/1.1 and HTTP/2 through one hyper-util builder, enforce the connection limit, the
//! header-read and keep-alive timeouts, and drain in-flight requests on shutdown.
//!
//! The accept loop never waits on a client: the TLS handshake and everything after it run
//! in the connection's own task.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http_body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;

use super::head_guard::{GuardedIo, HeadVerdicts};
use super::proxy::Proxy;
use super::tls::ALPN_H2;
use crate::lifecycle::Shutdown;

#[derive(Debug, Clone, Copy)]
pub struct ListenerSettings {
    /// A client's request head, and the TLS handshake, must arrive within this.
    pub header_read_timeout: Duration,
    /// A client connection with no request in flight and no head arriving is closed after
    /// this.
    pub keepalive_timeout: Duration,
    pub max_header_bytes: usize,
    /// How long in-flight requests may take to finish once shutdown starts.
    pub shutdown_timeout: Duration,
}

/// Client connections open at once, shared by every listener of the process. At the limit
/// a listener stops calling `accept`, so new connections wait in the kernel's backlog
/// (and past it, the kernel refuses them) until one closes: nothing is accepted only to be
/// dropped.
#[derive(Clone)]
pub struct ConnectionLimit(Arc<Semaphore>);

impl ConnectionLimit {
    pub fn new(max_connections: usize) -> ConnectionLimit {
        ConnectionLimit(Arc::new(Semaphore::new(max_connections)))
    }

    async fn acquire(&self, listener: &'static str) -> OwnedSemaphorePermit {
        if let Ok(permit) = self.0.clone().try_acquire_owned() {
            return permit;
        }
        tracing::warn!(
            listener,
            "limits.max_connections reached: not accepting until a connection closes"
        );
        self.0
            .clone()
            .acquire_owned()
            .await
            .expect("the connection semaphore is never closed")
    }
}

/// What every connection of one listener shares.
struct Shared {
    proxy: Arc<Proxy>,
    tls: Option<TlsAcceptor>,
    /// Serves HTTP/1.1, h2c with prior knowledge, and upgrades.
    auto: auto::Builder<TokioExecutor>,
    /// For TLS connections that negotiated `h2` by ALPN: nothing else may be spoken there.
    h2_only: auto::Builder<TokioExecutor>,
    settings: ListenerSettings,
}

/// Serves until `shutdown` fires, then stops accepting and waits for open connections to
/// finish their requests (at most `shutdown_timeout`). `name` only labels logs.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    proxy: Arc<Proxy>,
    tls: Option<TlsAcceptor>,
    settings: ListenerSettings,
    limit: ConnectionLimit,
    mut shutdown: Shutdown,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The head guard and the connection's watchdog time head reads instead: hyper's timer
        // also runs while an idle keep-alive connection waits for its next request (and
        // defaults to 30 s when unset), which would override `keepalive_timeout`.
        .header_read_timeout(None)
        // Above our own head limit, so the head guard answers an oversized head with a JSON
        // 431 before hyper would cut the connection with a bare one.
        .max_buf_size((settings.max_header_bytes * 2).max(64 * 1024));
    builder
        .http2()
        .timer(TokioTimer::new())
        // Like HTTP/1: hyper's own limit sits above ours so the proxy answers with JSON.
        .max_header_list_size(((settings.max_header_bytes * 2).max(64 * 1024)) as u32);
    let shared = Arc::new(Shared {
        proxy,
        tls,
        h2_only: builder.clone().http2_only(),
        auto: builder,
        settings,
    });
    // Every connection task holds a sender; when the last one is gone, `recv` returns None.
    let (open, mut all_closed) = mpsc::channel::<Infallible>(1);

    loop {
        let permit = tokio::select! {
            permit = limit.acquire(name) => permit,
            _ = shutdown.wait() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Usually EMFILE: back off briefly instead of spinning on the error.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.wait() => break,
        };
        let guard = ConnectionGuard {
            _permit: permit,
            _open: open.clone(),
        };
        tokio::spawn(connection(
            stream,
            peer,
            shared.clone(),
            shutdown.clone(),
            guard,
        ));
    }
    drop(listener);
    drop(open);
    tokio::select! {
        _ = all_closed.recv() => tracing::info!(listener = name, "all client connections closed"),
        _ = tokio::time::sleep(settings.shutdown_timeout) => {
            tracing::warn!(listener = name, timeout = ?settings.shutdown_timeout, "shutdown timeout reached with connections still open");
        }
    }
}

/// Held by a connection's task for its whole life: the slot under `max_connections`, and
/// the token the drain waits for.
struct ConnectionGuard {
    _permit: OwnedSemaphorePermit,
    _open: mpsc::Sender<Infallible>,
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut shutdown: Shutdown,
    _guard: ConnectionGuard,
) {
    let _ = stream.set_nodelay(true);
    let Some(acceptor) = shared.tls.clone() else {
        return serve_http(stream, false, peer, &shared, shutdown).await;
    };
    // A client that never finishes its handshake is a slowloris one layer down.
    let handshake =
        tokio::time::timeout(shared.settings.header_read_timeout, acceptor.accept(stream));
    let stream = tokio::select! {
        done = handshake => match done {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        },
        // No request has been accepted on it yet, so there is nothing to drain.
        _ = shutdown.wait() => return,
    };
    let h2 = stream.get_ref().1.alpn_protocol() == Some(ALPN_H2);
    serve_http(stream, h2, peer, &shared, shutdown).await
}

async fn serve_http<I>(io: I, h2: bool, peer: SocketAddr, shared: &Shared, shutdown: Shutdown)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (io, verdicts) = GuardedIo::new(io, shared.settings.max_header_bytes);
    let activity = Arc::new(Activity::new());
    let watchdog = Watchdog {
        activity: activity.clone(),
        verdicts: verdicts.clone(),
        keepalive: shared.settings.keepalive_timeout,
        header_read: shared.settings.header_read_timeout,
    };
    let proxy = shared.proxy.clone();
    let service = service_fn(move |req| {
        let proxy = proxy.clone();
        let verdicts = verdicts.clone();
        // Taken before the future runs so a request the client abandons mid-way still ends.
        let in_flight = activity.begin();
        async move {
            let response = proxy.handle(req, peer, &verdicts).await;
            Ok::<_, Infallible>(response.map(|body| TrackedBody {
                inner: body,
                _in_flight: in_flight,
            }))
        }
    });
    let io = TokioIo::new(io);
    if h2 {
        let connection = pin!(shared.h2_only.serve_connection(io, service));
        supervise(
            connection,
            |c| c.graceful_shutdown(),
            watchdog,
            shutdown,
            peer,
        )
        .await;
    } else {
        let connection = pin!(shared.auto.serve_connection_with_upgrades(io, service));
        supervise(
            connection,
            |c| c.graceful_shutdown(),
            watchdog,
            shutdown,
            peer,
        )
        .await;
    }
}

/// Drives one connection to its end. On shutdown, or when it has been idle for
/// `keepalive`, it is closed gracefully: HTTP/1 finishes the request in flight and answers
/// it with `Connection: close`, HTTP/2 sends GOAWAY. A head that takes longer than
/// `header_read` is cut at once.
async fn supervise<C, E>(
    mut connection: Pin<&mut C>,
    graceful: impl Fn(Pin<&mut C>),
    watchdog: Watchdog,
    mut shutdown: Shutdown,
    peer: SocketAddr,
) where
    C: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let mut closing = false;
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "client connection ended with an error");
                }
                return;
            }
            _ = shutdown.wait(), if !closing => {
                graceful(connection.as_mut());
                closing = true;
            }
            expiry = watchdog.expired(), if !closing => match expiry {
                Expiry::Idle => {
                    tracing::debug!(%peer, "closing an idle client connection");
                    graceful(connection.as_mut());
                    closing = true;
                }
                Expiry::HeadTimeout => {
                    // Dropping the connection closes the socket; a client this slow gets no
                    // answer, as with hyper's own timeout.
                    tracing::debug!(%peer, "request head not received within header_read");
                    return;
                }
            },
        }
    }
}

/// Requests in flight on one connection and when the last one ended.
struct Activity {
    epoch: Instant,
    in_flight: AtomicU32,
    /// Microseconds after `epoch` at which the connection last became idle.
    quiet_since_us: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            epoch: Instant::now(),
            in_flight: AtomicU32::new(0),
            quiet_since_us: AtomicU64::new(0),
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Acquire)
    }

    fn quiet_since(&self) -> Instant {
        later(
            self.epoch,
            Duration::from_micros(self.quiet_since_us.load(Ordering::Acquire)),
        )
    }
}

/// One request, from the moment hyper hands it over until its response body has been
/// sent (or dropped).
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let us = self.0.epoch.elapsed().as_micros().min(u128::from(u64::MAX)) as u64;
        // Stored before the decrement, so a watchdog that sees zero in flight also sees
        // the end of the last request.
        self.0.quiet_since_us.fetch_max(us, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in flight until it is dropped.
struct TrackedBody<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `at + d`, or a day past `at` when that is not representable: validation bounds every
/// configured duration, and the arithmetic must not panic even if one slipped through.
fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d)
        .or_else(|| at.checked_add(Duration::from_secs(86_400)))
        .unwrap_or(at)
}

enum Expiry {
    /// No request in flight and no head arriving for `keepalive`.
    Idle,
    /// A head began to arrive `header_read` ago (counted from the end of the last request
    /// when it arrived while one was still in flight) and is not complete.
    HeadTimeout,
}

struct Watchdog {
    activity: Arc<Activity>,
    verdicts: HeadVerdicts,
    keepalive: Duration,
    header_read: Duration,
}

impl Watchdog {
    /// Resolves when the connection should be closed; cancel-safe.
    async fn expired(&self) -> Expiry {
        loop {
            let now = Instant::now();
            let wake = if self.activity.in_flight() > 0 {
                // Requests are timed by `timeouts.request`, not here; look again later.
                later(now, self.keepalive.min(self.header_read))
            } else {
                let quiet_since = self.activity.quiet_since();
                match self.verdicts.head_pending_since() {
                    Some(head) => {
                        // A pipelined head may have arrived while the previous request ran.
                        let deadline = later(head.max(quiet_since), self.header_read);
                        if now >= deadline {
                            return Expiry::HeadTimeout;
                        }
                        deadline
                    }
                    None => {
                        let deadline = later(quiet_since, self.keepalive);
                        if now >= deadline {
                            return Expiry::Idle;
                        }
                        deadline
                    }
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(wake.into()) => {}
                // The idle deadline may be far off; a head starting brings the shorter one.
                _ = self.verdicts.head_started() => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_never_overflow() {
        let now = Instant::now();
        assert_eq!(
            later(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        assert_eq!(later(now, Duration::MAX), now + Duration::from_secs(86_400));
    }
}

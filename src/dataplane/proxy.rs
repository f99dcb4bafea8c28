//! The request flow: one snapshot load, route match, split decision, forwarding through the
//! pooled upstream client, and streaming the answer back.
//!
//! Bodies are never buffered: the client's request body is handed to the upstream request
//! and the upstream response body to the client's response, frame by frame.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rand::RngExt;

use super::admission::{self, EscapedSlashes};
use super::client_body::{BodyState, BodyWatch, ClientBody};
use super::decision::Decision;
use super::head_guard::HeadVerdicts;
use super::listener::ConnectionSlot;
use super::rescue::ProxyError;
use super::split::{RequestFacts, Side};
use crate::config::{Endpoint, Limits, UpstreamProtocol};
use crate::health::Outcome;
use crate::snapshot::{RoutingSnapshot, SnapshotHandle};
use crate::telemetry::access_log::{AccessLog, LoggedBody, RequestStart, Served};
use crate::telemetry::traces::{TraceScope, Tracer};

pub type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Towards a backend: the client's body streamed (cut at `limits.max_body_bytes`), or a
/// kept copy for a replay.
pub type UpstreamBody = Either<ClientBody, Full<Bytes>>;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Headers that describe one hop, never the message (RFC 9110 §7.6.1), plus the
/// non-standard ones proxies still see.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    // Only meaningful with `Upgrade: h2c` (RFC 7540 §3.2.1), which is never passed on.
    HeaderName::from_static("http2-settings"),
];

/// Everything a connection needs to proxy requests; shared by all connections. The pooled
/// upstream clients live in the snapshot's backends (see `upstream`).
#[derive(Clone)]
pub struct Proxy {
    snapshots: SnapshotHandle,
    /// `http` or `https`, for `X-Forwarded-Proto`.
    scheme: HeaderValue,
    /// Fixed at start like the listener's buffers it must agree with.
    max_header_bytes: usize,
    max_body_bytes: usize,
    /// `None`: no access log, and nothing is spent on one.
    access_log: Option<AccessLog>,
    escaped_slashes: EscapedSlashes,
    /// `None`: no tracing, and nothing is spent on it.
    tracer: Option<Tracer>,
}

impl Proxy {
    pub fn new(
        snapshots: SnapshotHandle,
        limits: &Limits,
        escaped_slashes: EscapedSlashes,
    ) -> Proxy {
        Proxy {
            snapshots,
            scheme: HeaderValue::from_static("http"),
            max_header_bytes: limits.max_header_bytes,
            max_body_bytes: usize::try_from(limits.max_body_bytes).unwrap_or(usize::MAX),
            access_log: None,
            escaped_slashes,
            tracer: None,
        }
    }

    /// The same proxy recording spans.
    pub fn with_tracer(self, tracer: Tracer) -> Proxy {
        Proxy {
            tracer: Some(tracer),
            ..self
        }
    }

    /// Whether the access log or tracing wants to know how requests were served.
    fn observed(&self) -> bool {
        self.access_log.is_some() || self.tracer.is_some()
    }

    /// The same proxy writing an access log line per request.
    pub fn with_access_log(self, access_log: AccessLog) -> Proxy {
        Proxy {
            access_log: Some(access_log),
            ..self
        }
    }

    /// Serves one request; with an access log, its line is queued when the response body
    /// ends. The request id is settled here so that the line, the upstream and the
    /// client all see the same one.
    pub async fn handle(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        verdicts: &HeadVerdicts,
    ) -> Response<LoggedBody<ProxyBody>> {
        if !self.observed() {
            return self.serve(req, peer, verdicts).await.map(Either::Left);
        }
        let trace = self.tracer.as_ref().and_then(|t| t.begin(req.headers()));
        if let Some(scope) = trace {
            req.extensions_mut().insert(scope);
        }
        let start = self.access_log.as_ref().map(|_| {
            let request_id = match req.headers().get(&X_REQUEST_ID) {
                Some(id) if !id.is_empty() => id.clone(),
                _ => {
                    let id = new_request_id();
                    req.headers_mut().insert(X_REQUEST_ID.clone(), id.clone());
                    id
                }
            };
            RequestStart::of(&req, peer, &request_id)
        });
        let traced = trace.map(|scope| (scope, req.method().clone(), req.uri().path().to_string()));
        let response = self.serve(req, peer, verdicts).await;
        if let (Some(tracer), Some((scope, method, path))) = (&self.tracer, traced) {
            tracer.finish_server(
                &scope,
                method.as_str(),
                &path,
                response.status().as_u16(),
                response.extensions().get::<Served>(),
            );
        }
        match (&self.access_log, start) {
            (Some(log), Some(start)) => log.finish(start, response),
            _ => response.map(Either::Left),
        }
    }

    /// What the access log records of how a request was served.
    fn served(
        &self,
        snapshot: &RoutingSnapshot,
        decision: &Decision,
        side: Side,
        upstream: Option<String>,
    ) -> Served {
        let route = decision.route.map(|i| &snapshot.routes[i]);
        Served {
            route: route.map_or_else(
                || Arc::from(crate::snapshot::DEFAULT_ROUTE),
                |r| r.name.clone(),
            ),
            side: side.as_str(),
            bucket: decision.bucket.map(|b| b.value()),
            flag: route.and_then(|r| match &r.split {
                super::split::Split::FeatureFlag { flag } => {
                    Some(Arc::from(snapshot.flags[flag.0 as usize].name.as_str()))
                }
                _ => None,
            }),
            weight: route.map(|r| {
                if r.rolled_back {
                    0.0
                } else {
                    r.split.effective_weight(&snapshot.flags).percent()
                }
            }),
            upstream,
            replayed: decision.side == Side::Target && side == Side::Legacy,
            sample: decision.route.map_or(snapshot.access_log_sample, |i| {
                snapshot.policies[i].access_sample
            }),
        }
    }

    /// The same proxy for the HTTPS listener: one snapshot handle (and so the same upstream
    /// pools), `X-Forwarded-Proto: https`.
    pub fn for_https(&self) -> Proxy {
        Proxy {
            scheme: HeaderValue::from_static("https"),
            ..self.clone()
        }
    }

    async fn serve(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        verdicts: &HeadVerdicts,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let snapshot = self.snapshots.load();

        if let Some(violation) = verdicts.check_next() {
            let error = ProxyError::BadRequest {
                code: violation.code(),
                message: violation.message(),
                status: StatusCode::from_u16(violation.status()).unwrap_or(StatusCode::BAD_REQUEST),
            };
            return error.into_response(None).map(Either::Right);
        }

        // HTTP/1 heads are measured by the head guard as they arrive; HTTP/2 ones only here.
        if req.version() == Version::HTTP_2
            && header_list_size(req.headers()) > self.max_header_bytes
        {
            let error = ProxyError::BadRequest {
                code: "head_too_large",
                message: "the request's headers are larger than limits.max_header_bytes",
                status: StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            };
            return error.into_response(None).map(Either::Right);
        }

        // A body announced too large is refused before anything is forwarded; one that
        // grows too large mid-stream is cut by `Limited` below.
        if content_length(req.headers()).is_some_and(|n| n > self.max_body_bytes as u64) {
            let error = ProxyError::BadRequest {
                code: "body_too_large",
                message: "the request body is larger than limits.max_body_bytes",
                status: StatusCode::PAYLOAD_TOO_LARGE,
            };
            return error.into_response(None).map(Either::Right);
        }

        // One authority and one normal path, or the client's error (see `admission`).
        let admitted = match admission::admit(
            req.method(),
            req.uri(),
            req.version(),
            req.headers(),
            self.escaped_slashes,
        ) {
            Ok(admitted) => admitted,
            Err(refusal) => {
                let error = ProxyError::BadRequest {
                    code: refusal.code,
                    message: refusal.message,
                    status: StatusCode::from_u16(refusal.status).unwrap_or(StatusCode::BAD_REQUEST),
                };
                return error.into_response(None).map(Either::Right);
            }
        };

        let request_id = match req.headers().get(&X_REQUEST_ID) {
            Some(id) if !id.is_empty() => id.clone(),
            _ => new_request_id(),
        };
        let client_ip = peer.ip().to_canonical();
        let decision = {
            let facts = RequestFacts {
                method: req.method(),
                host: admitted.host.as_deref(),
                path: admitted.path.as_deref().unwrap_or(req.uri().path()),
                query: req.uri().query(),
                headers: req.headers(),
                client_ip,
            };
            Decision::make(&snapshot, &facts)
        };
        let upgrade = wants_upgrade(req.headers());
        let client_upgrade = upgrade.is_some().then(|| {
            let slot = req.extensions().get::<ConnectionSlot>().cloned();
            (hyper::upgrade::on(&mut req), slot)
        });
        // Failover needs a second chance at the request: only for the target, only for the
        // configured methods, never for an upgrade (the client's stream is not replayable).
        let failover = decision
            .route
            .and_then(|i| snapshot.policies[i].failover.as_ref())
            .filter(|f| {
                decision.side == Side::Target
                    && upgrade.is_none()
                    && f.methods.contains(req.method())
            });
        let (mut parts, body) = req.into_parts();
        if let Some(path) = &admitted.path {
            parts.uri = normalized_target(path, parts.uri.query());
        }
        self.prepare_head(
            &mut parts,
            admitted.authority,
            client_ip,
            &request_id,
            upgrade,
        );
        let (body, watch) = ClientBody::new(body, self.max_body_bytes);
        let (body, replay) = match failover {
            None => (Either::Left(body), None),
            Some(f) => match keep_for_replay(
                &parts.headers,
                body,
                f.max_replay_bytes,
                snapshot.timeouts.request,
            )
            .await
            {
                Ok(kept) => kept,
                Err(e) => {
                    return self.answer_error(
                        e,
                        &snapshot,
                        &decision,
                        decision.side,
                        started,
                        &request_id,
                    );
                }
            },
        };
        let replay_parts = replay.as_ref().map(|_| clone_head(&parts));

        let first = self
            .attempt(&snapshot, decision.backend, parts, body, &watch)
            .await;
        let failed_on_target = match &first {
            // The client's own faults are not the target's, and replaying them is pointless.
            Err(e) => outcome_of_error(e).is_some(),
            Ok(r) => failover.is_some_and(|f| f.on_5xx) && r.status().is_server_error(),
        };
        let (replay_parts, replay) = match (replay_parts, replay) {
            (Some(p), Some(b)) if failed_on_target => (p, b),
            _ => {
                return self.finish(
                    first,
                    &snapshot,
                    &decision,
                    decision.side,
                    started,
                    &request_id,
                    client_upgrade,
                );
            }
        };

        // The target failed before the client saw a byte: record it, then try legacy if the
        // route's retry budget allows, so a sick target cannot double the monolith's load.
        let i = decision.route.expect("failover is only set for a route");
        let health = &snapshot.health[i];
        let budget = failover.map_or(0.0, |f| f.budget);
        let window = snapshot.policies[i]
            .rollback
            .as_ref()
            .map_or(DEFAULT_BUDGET_WINDOW, |r| r.window);
        let now = Instant::now();
        // Replays are counted on the target's window; each also added a legacy attempt, so
        // the route's client requests are the attempts minus the replays.
        let (legacy_attempts, _) = health.legacy.requests_and_replays(now, window);
        let (target_attempts, replays) = health.target.requests_and_replays(now, window);
        let client_requests = (legacy_attempts + target_attempts).saturating_sub(replays) + 1;
        let within_budget = (replays as f64) < budget * client_requests as f64;
        if !within_budget {
            snapshot.stats[i].budget_exhausted.inc();
            return self.finish(
                first,
                &snapshot,
                &decision,
                Side::Target,
                started,
                &request_id,
                None,
            );
        }
        self.record(
            &snapshot,
            &decision,
            Side::Target,
            outcome_of(&first),
            started,
        );
        health.target.record_replay(now);
        snapshot.stats[i].failovers.inc();
        if let Err(e) = &first {
            tracing::info!(request_id = request_id.to_str().unwrap_or(""), error = %e, "replaying a failed target request on legacy");
        }
        let legacy = snapshot
            .route(crate::dataplane::route::RouteId(i as u32))
            .legacy;
        // Legacy's figures measure legacy: its clock starts at the replay, not at the
        // client's request, which includes the target's failed attempt.
        let replay_started = Instant::now();
        let second = self
            .attempt(
                &snapshot,
                legacy,
                replay_parts,
                Either::Right(Full::new(replay)),
                &BodyWatch::default(),
            )
            .await;
        self.finish(
            second,
            &snapshot,
            &decision,
            Side::Legacy,
            replay_started,
            &request_id,
            None,
        )
    }

    /// One try at a backend. An idempotent request without a body that fails because a
    /// pooled connection closed under it before any response byte is sent once more, on
    /// another connection (RFC 9112 §9.3.1, as nginx and Go's client do); others are not.
    async fn attempt(
        &self,
        snapshot: &RoutingSnapshot,
        backend: crate::dataplane::route::BackendId,
        parts: http::request::Parts,
        body: UpstreamBody,
        watch: &BodyWatch,
    ) -> Result<Response<Incoming>, ProxyError> {
        use http_body::Body as _;
        let again =
            (parts.method.is_idempotent() && body.is_end_stream()).then(|| clone_head(&parts));
        match self.send(snapshot, backend, parts, body, watch).await {
            Err(Failure { stale: true, error }) if let Some(head) = again => {
                tracing::debug!(error = %error, "connection closed before the response; sending once more");
                let empty = Either::Right(Full::new(Bytes::new()));
                self.send(snapshot, backend, head, empty, watch)
                    .await
                    .map_err(|f| f.error)
            }
            result => result.map_err(|f| f.error),
        }
    }

    /// Picks an endpoint, sends, waits for the response head. A failure the client's body
    /// caused (`watch`) is the client's error, not the backend's.
    async fn send(
        &self,
        snapshot: &RoutingSnapshot,
        backend: crate::dataplane::route::BackendId,
        mut parts: http::request::Parts,
        body: UpstreamBody,
        watch: &BodyWatch,
    ) -> Result<Response<Incoming>, Failure> {
        let backend = snapshot.backend(backend);
        let endpoint = backend.pick();
        let path_and_query = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        parts.uri = Uri::builder()
            .scheme(endpoint.scheme.clone())
            .authority(endpoint.authority.clone())
            .path_and_query(path_and_query)
            .build()
            .map_err(|_| {
                Failure::from(ProxyError::BadRequest {
                    code: "bad_request_target",
                    message: "the request target cannot be forwarded",
                    status: StatusCode::BAD_REQUEST,
                })
            })?;
        if backend.client.protocol == UpstreamProtocol::H2 {
            parts.version = Version::HTTP_2;
        }
        let span = match (&self.tracer, parts.extensions.get::<TraceScope>()) {
            (Some(tracer), Some(scope)) => {
                Some((tracer, tracer.start_client(scope, &mut parts.headers)))
            }
            _ => None,
        };
        let method = span.as_ref().map(|_| parts.method.clone());
        let request = Request::from_parts(parts, body);
        let sent = backend.client.client.request(request);
        let result = self
            .answered(snapshot, backend, endpoint, sent, watch)
            .await;
        if let (Some((tracer, span)), Some(method)) = (span, method) {
            let error = result.as_ref().err().map(|f| f.error.to_string());
            tracer.finish_client(
                span,
                method.as_str(),
                &backend.name,
                endpoint.authority.as_str(),
                match &result {
                    Ok(r) => Ok(r.status().as_u16()),
                    Err(_) => Err(error.as_deref().unwrap_or("")),
                },
            );
        }
        result
    }

    /// Waits for the upstream's response head within `timeouts.request`.
    async fn answered(
        &self,
        snapshot: &RoutingSnapshot,
        backend: &crate::snapshot::Backend,
        endpoint: &Endpoint,
        sent: hyper_util::client::legacy::ResponseFuture,
        watch: &BodyWatch,
    ) -> Result<Response<Incoming>, Failure> {
        match tokio::time::timeout(snapshot.timeouts.request, sent).await {
            Ok(Ok(mut response)) => {
                if self.observed() {
                    response.extensions_mut().insert(endpoint.authority.clone());
                }
                Ok(response)
            }
            Ok(Err(e)) => Err(match client_body_fault(watch, false) {
                Some(fault) => fault.into(),
                None => Failure {
                    stale: closed_before_response(&e),
                    error: classify(e, &backend.name, endpoint),
                },
            }),
            Err(_) if let Some(fault) = client_body_fault(watch, true) => Err(fault.into()),
            Err(_) => Err(ProxyError::Timeout {
                backend: backend.name.to_string(),
                endpoint: endpoint.to_string(),
                timeout_ms: snapshot.timeouts.request.as_millis(),
            }
            .into()),
        }
    }

    fn record(
        &self,
        snapshot: &RoutingSnapshot,
        decision: &Decision,
        side: Side,
        outcome: Outcome,
        started: Instant,
    ) {
        let elapsed = started.elapsed();
        let code = match outcome {
            Outcome::Status(code) => code,
            Outcome::Timeout => 504,
            Outcome::ConnectError | Outcome::Failed => 502,
        };
        match decision.route {
            Some(i) => {
                snapshot.stats[i].side(side).record(code, elapsed);
                // Windows have readers only where a route sets rollback limits, failover or
                // a rollout (whose gates read them).
                let policy = &snapshot.policies[i];
                if policy.rollback.is_some()
                    || policy.failover.is_some()
                    || policy.rollout.is_some()
                {
                    snapshot.health[i]
                        .side(side)
                        .record(outcome, started + elapsed, elapsed);
                }
            }
            None => snapshot
                .default_stats
                .side(Side::Legacy)
                .record(code, elapsed),
        }
    }

    /// Records the final attempt and turns it into the client's response.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        result: Result<Response<Incoming>, ProxyError>,
        snapshot: &RoutingSnapshot,
        decision: &Decision,
        side: Side,
        started: Instant,
        request_id: &HeaderValue,
        client_upgrade: Option<(hyper::upgrade::OnUpgrade, Option<ConnectionSlot>)>,
    ) -> Response<ProxyBody> {
        let mut response = match result {
            Ok(response) => response,
            Err(e) => return self.answer_error(e, snapshot, decision, side, started, request_id),
        };
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some((client_upgrade, slot)) = client_upgrade {
                let upstream_upgrade = hyper::upgrade::on(&mut response);
                tokio::spawn(tunnel(
                    client_upgrade,
                    upstream_upgrade,
                    request_id.clone(),
                    slot,
                ));
            }
        } else {
            strip_hop_by_hop(response.headers_mut());
        }
        if let Some(cookie) = &decision.set_cookie {
            response
                .headers_mut()
                .append(header::SET_COOKIE, self.secure_over_https(cookie));
        }
        // The client keeps its own version: an HTTP/1.0 backend's status line must not end
        // an HTTP/1.1 client's keep-alive (hyper answers a 1.0 client in 1.0 by itself).
        *response.version_mut() = Version::HTTP_11;
        self.record(
            snapshot,
            decision,
            side,
            Outcome::Status(response.status().as_u16()),
            started,
        );
        if self.observed() {
            let upstream = response
                .extensions()
                .get::<http::uri::Authority>()
                .map(|a| a.to_string());
            let served = self.served(snapshot, decision, side, upstream);
            response.extensions_mut().insert(served);
        }
        response.map(Either::Left)
    }

    /// A generated cookie minted over HTTPS is `Secure`: it must never travel in clear.
    fn secure_over_https(&self, cookie: &HeaderValue) -> HeaderValue {
        if self.scheme != "https" {
            return cookie.clone();
        }
        let mut bytes = cookie.as_bytes().to_vec();
        bytes.extend_from_slice(b"; Secure");
        HeaderValue::from_bytes(&bytes).unwrap_or_else(|_| cookie.clone())
    }

    fn answer_error(
        &self,
        error: ProxyError,
        snapshot: &RoutingSnapshot,
        decision: &Decision,
        side: Side,
        started: Instant,
        request_id: &HeaderValue,
    ) -> Response<ProxyBody> {
        if !matches!(error, ProxyError::BadRequest { .. }) {
            tracing::warn!(request_id = request_id.to_str().unwrap_or(""), error = %error, "upstream request failed");
        }
        let outcome = outcome_of_error(&error);
        let served = self
            .observed()
            .then(|| self.served(snapshot, decision, side, error.endpoint_authority()));
        let mut response = error.into_response(Some(request_id));
        if let Some(served) = served {
            response.extensions_mut().insert(served);
        }
        match outcome {
            // The client's own fault says nothing about the backend's health.
            None => match decision.route {
                Some(i) => snapshot.stats[i]
                    .side(side)
                    .record(response.status().as_u16(), started.elapsed()),
                None => snapshot
                    .default_stats
                    .side(Side::Legacy)
                    .record(response.status().as_u16(), started.elapsed()),
            },
            Some(outcome) => self.record(snapshot, decision, side, outcome, started),
        }
        response.map(Either::Right)
    }

    /// Turns the client's head into the upstream one: forwarding headers, hop-by-hop
    /// headers gone except `TE: trailers` (end to end in meaning, and required by gRPC),
    /// HTTP/1.1 towards the backend (`attempt` makes it HTTP/2 for an h2 backend).
    fn prepare_head(
        &self,
        parts: &mut http::request::Parts,
        authority: Option<HeaderValue>,
        client_ip: IpAddr,
        request_id: &HeaderValue,
        upgrade: Option<HeaderValue>,
    ) {
        let trailers = accepts_trailers(&parts.headers);
        strip_hop_by_hop(&mut parts.headers);
        join_cookies(&mut parts.headers);
        // The authority routed on is the one the backend receives, whatever the client's
        // Host said (absolute form, `:authority`) and whatever its Connection header named.
        if let Some(authority) = authority {
            parts.headers.insert(header::HOST, authority);
        }
        if trailers {
            parts
                .headers
                .insert(header::TE, HeaderValue::from_static("trailers"));
        }
        if let Some(protocol) = upgrade {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            parts.headers.insert(header::UPGRADE, protocol);
        }
        append_forwarded_for(&mut parts.headers, client_ip);
        parts
            .headers
            .insert(X_FORWARDED_PROTO.clone(), self.scheme.clone());
        parts
            .headers
            .insert(X_REQUEST_ID.clone(), request_id.clone());
        parts.version = Version::HTTP_11;
    }
}

/// A failed send, and whether the connection closed before any response byte arrived
/// (so the request may be sent again when it is idempotent).
struct Failure {
    error: ProxyError,
    stale: bool,
}

impl From<ProxyError> for Failure {
    fn from(error: ProxyError) -> Failure {
        Failure {
            error,
            stale: false,
        }
    }
}

/// The connection was closed or reset under the request before a response head arrived:
/// what a backend's idle timer firing just as a pooled connection is reused looks like.
fn closed_before_response(error: &hyper_util::client::legacy::Error) -> bool {
    if error.is_connect() {
        return false;
    }
    let mut source = std::error::Error::source(error);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>()
            && (h.is_incomplete_message() || h.is_canceled())
        {
            return true;
        }
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
            )
        {
            return true;
        }
        source = s.source();
    }
    false
}

/// Failover budgets are counted over the rollback window, or this when a route has none.
const DEFAULT_BUDGET_WINDOW: Duration = Duration::from_secs(10);

/// What a failover may replay: the head without extensions (those belong to the client's
/// connection) and the body that was kept.
fn clone_head(parts: &http::request::Parts) -> http::request::Parts {
    let (mut head, ()) = Request::new(()).into_parts();
    head.method = parts.method.clone();
    head.uri = parts.uri.clone();
    head.version = parts.version;
    head.headers = parts.headers.clone();
    // The trace is the request's, not the connection's: a replay is a span of it too.
    if let Some(scope) = parts.extensions.get::<TraceScope>() {
        head.extensions.insert(*scope);
    }
    head
}

/// Reads a small body into memory so it can be sent twice. A body that is larger than
/// `max` (or of unknown length) streams as usual and is simply not replayable.
async fn keep_for_replay(
    headers: &HeaderMap,
    body: ClientBody,
    max: u64,
    timeout: Duration,
) -> Result<(UpstreamBody, Option<Bytes>), ProxyError> {
    use http_body::Body as _;
    if body.is_end_stream() {
        return Ok((Either::Right(Full::new(Bytes::new())), Some(Bytes::new())));
    }
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match length {
        Some(n) if n <= max => {
            let collected = tokio::time::timeout(timeout, http_body_util::BodyExt::collect(body))
                .await
                .map_err(|_| ProxyError::BadRequest {
                    code: "body_timeout",
                    message: "the request body did not arrive within timeouts.request",
                    status: StatusCode::REQUEST_TIMEOUT,
                })?
                .map_err(|_| ProxyError::BadRequest {
                    code: "body_read_failed",
                    message: "the request body could not be read",
                    status: StatusCode::BAD_REQUEST,
                })?;
            let bytes = collected.to_bytes();
            Ok((Either::Right(Full::new(bytes.clone())), Some(bytes)))
        }
        _ => Ok((Either::Left(body), None)),
    }
}

/// The client's error when its body made the upstream request fail: malformed or cut short
/// (400, RFC 9110 §15.5.1), too large (413), or still awaited when the request timed out
/// (408, §15.5.9). `None` when the body was not the cause.
fn client_body_fault(watch: &BodyWatch, timed_out: bool) -> Option<ProxyError> {
    let (code, message, status) = match watch.state() {
        BodyState::Malformed => (
            "body_malformed",
            "the request body is malformed or ended before its declared length",
            StatusCode::BAD_REQUEST,
        ),
        BodyState::TooLarge => (
            "body_too_large",
            "the request body is larger than limits.max_body_bytes",
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        BodyState::AwaitingClient if timed_out => (
            "body_timeout",
            "the request body did not arrive within timeouts.request",
            StatusCode::REQUEST_TIMEOUT,
        ),
        _ => return None,
    };
    Some(ProxyError::BadRequest {
        code,
        message,
        status,
    })
}

fn outcome_of(result: &Result<Response<Incoming>, ProxyError>) -> Outcome {
    match result {
        Ok(r) => Outcome::Status(r.status().as_u16()),
        Err(e) => outcome_of_error(e).unwrap_or(Outcome::Failed),
    }
}

/// How an error counts against a backend's health; `None` for the client's own faults.
fn outcome_of_error(error: &ProxyError) -> Option<Outcome> {
    match error {
        ProxyError::Connect { .. } => Some(Outcome::ConnectError),
        ProxyError::Timeout { .. } => Some(Outcome::Timeout),
        ProxyError::Upstream { .. } => Some(Outcome::Failed),
        ProxyError::BadRequest { .. } => None,
    }
}

fn new_request_id() -> HeaderValue {
    let id = uuid::Builder::from_random_bytes(rand::rng().random()).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    HeaderValue::from_str(id.hyphenated().encode_lower(&mut buf))
        .expect("a UUID is a valid header value")
}

/// The origin-form target for a normalised path, with the query as received.
fn normalized_target(path: &str, query: Option<&str>) -> Uri {
    let text = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    // Normalisation only removes and decodes to unreserved characters, so the result
    // parses wherever the received target did.
    Uri::try_from(text).unwrap_or_else(|_| Uri::from_static("/"))
}

/// The protocol to upgrade to, when the client asks for an upgrade (WebSocket).
fn wants_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    // `h2c` would turn the connection to the backend into HTTP/2 behind the proxy's back
    // (h2c smuggling); like Envoy, the upgrade is dropped and the request served as is.
    headers
        .get(header::UPGRADE)
        .filter(|p| asks && !p.as_bytes().eq_ignore_ascii_case(b"h2c"))
        .cloned()
}

/// Whether the client's `TE` lists `trailers`; its other codings are for one hop only.
fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            t.split(';')
                .next()
                .is_some_and(|c| c.trim().eq_ignore_ascii_case("trailers"))
        })
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Headers the Connection header names are hop-by-hop too; collect them before the
    // Connection header itself goes.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// HTTP/2 splits `cookie` into one field per pair; an HTTP/1.1 backend expects one line,
/// joined with `; ` (RFC 9113 §8.2.3, RFC 6265 §5.4).
fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    let (Some(first), Some(_)) = (values.next(), values.next()) else {
        return;
    };
    let mut joined = first.as_bytes().to_vec();
    for value in headers.get_all(header::COOKIE).iter().skip(1) {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(value.as_bytes());
    }
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

fn append_forwarded_for(headers: &mut HeaderMap, client_ip: IpAddr) {
    // A client or an earlier proxy may have sent several lines; all of them are the chain.
    let mut chain = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect::<Vec<_>>()
        .join(", ");
    if !chain.is_empty() {
        chain.push_str(", ");
    }
    chain.push_str(&client_ip.to_string());
    if let Ok(value) = HeaderValue::from_str(&chain) {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
}

/// The declared body length; `None` when absent or unparsable (hyper refuses the latter).
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The size HTTP/2 accounts for a header list (RFC 9113 §6.5.2): name, value and 32 bytes
/// of overhead per field.
fn header_list_size(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum()
}

fn classify(
    error: hyper_util::client::legacy::Error,
    backend: &str,
    endpoint: &Endpoint,
) -> ProxyError {
    let detail = {
        let mut text = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        text
    };
    if error.is_connect() {
        ProxyError::Connect {
            backend: backend.to_string(),
            endpoint: endpoint.to_string(),
            detail,
        }
    } else {
        ProxyError::Upstream {
            backend: backend.to_string(),
            endpoint: endpoint.to_string(),
            detail,
        }
    }
}

/// Copies bytes both ways once both sides have switched protocols, holding the client
/// connection's `slot` until both are done.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    request_id: HeaderValue,
    _slot: Option<ConnectionSlot>,
) {
    let request_id = request_id.to_str().unwrap_or("");
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(request_id, error = %e, "upgrade did not complete");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(request_id, error = %e, "upgraded connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_removed() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-kept"));
    }

    #[test]
    fn cookie_fields_are_joined_into_one() {
        let mut headers = HeaderMap::new();
        headers.append(header::COOKIE, HeaderValue::from_static("a=1"));
        headers.append(header::COOKIE, HeaderValue::from_static("b=2"));
        headers.append(header::COOKIE, HeaderValue::from_static("c=3"));
        join_cookies(&mut headers);
        let all: Vec<_> = headers.get_all(header::COOKIE).iter().collect();
        assert_eq!(all, ["a=1; b=2; c=3"]);
        join_cookies(&mut headers);
        assert_eq!(headers[header::COOKIE], "a=1; b=2; c=3");
    }

    #[test]
    fn only_trailers_survives_from_te() {
        let mut headers = HeaderMap::new();
        headers.insert(header::TE, HeaderValue::from_static("gzip;q=0.5, Trailers"));
        assert!(accepts_trailers(&headers));
        headers.insert(header::TE, HeaderValue::from_static("gzip, deflate"));
        assert!(!accepts_trailers(&headers));
        headers.remove(header::TE);
        assert!(!accepts_trailers(&headers));
    }

    #[test]
    fn forwarded_for_is_appended() {
        let mut headers = HeaderMap::new();
        append_forwarded_for(&mut headers, "10.0.0.1".parse().unwrap());
        assert_eq!(headers[&X_FORWARDED_FOR], "10.0.0.1");
        append_forwarded_for(&mut headers, "10.0.0.2".parse().unwrap());
        assert_eq!(headers[&X_FORWARDED_FOR], "10.0.0.1, 10.0.0.2");
        headers.append(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.3"));
        append_forwarded_for(&mut headers, "10.0.0.4".parse().unwrap());
        assert_eq!(
            headers[&X_FORWARDED_FOR],
            "10.0.0.1, 10.0.0.2, 10.0.0.3, 10.0.0.4"
        );
        assert_eq!(headers.get_all(&X_FORWARDED_FOR).iter().count(), 1);
    }

    #[test]
    fn request_ids_are_uuids() {
        let id = new_request_id();
        assert!(uuid::Uuid::parse_str(id.to_str().unwrap()).is_ok());
    }
}

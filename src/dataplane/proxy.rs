//! The request flow: one snapshot load, route match, split decision, forwarding through the
//! pooled upstream client, and streaming the answer back.
//!
//! Bodies are never buffered: the client's request body is handed to the upstream request
//! and the upstream response body to the client's response, frame by frame.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{Either, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rand::RngExt;

use super::decision::Decision;
use super::head_guard::HeadVerdicts;
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
pub type UpstreamBody = Either<Limited<Incoming>, Full<Bytes>>;

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Headers that describe one hop, never the message (RFC 9110 §7.6.1), plus the
/// non-standard ones proxies still see.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
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
    /// `None`: no tracing, and nothing is spent on it.
    tracer: Option<Tracer>,
}

impl Proxy {
    pub fn new(snapshots: SnapshotHandle, limits: &Limits) -> Proxy {
        Proxy {
            snapshots,
            scheme: HeaderValue::from_static("http"),
            max_header_bytes: limits.max_header_bytes,
            max_body_bytes: usize::try_from(limits.max_body_bytes).unwrap_or(usize::MAX),
            access_log: None,
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

        let request_id = match req.headers().get(&X_REQUEST_ID) {
            Some(id) if !id.is_empty() => id.clone(),
            _ => new_request_id(),
        };
        let client_ip = peer.ip().to_canonical();
        let host = request_host(&req);
        let decision = {
            let facts = RequestFacts {
                method: req.method(),
                host: host.as_deref(),
                path: req.uri().path(),
                query: req.uri().query(),
                headers: req.headers(),
                client_ip,
            };
            Decision::make(&snapshot, &facts)
        };
        let upgrade = wants_upgrade(req.headers());
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
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
        self.prepare_head(&mut parts, client_ip, &request_id, upgrade);
        let (body, replay) = match failover {
            None => (Either::Left(Limited::new(body, self.max_body_bytes)), None),
            Some(f) => match keep_for_replay(
                &parts.headers,
                body,
                f.max_replay_bytes,
                self.max_body_bytes,
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

        let first = self.attempt(&snapshot, decision.backend, parts, body).await;
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

    /// One try at a backend: pick an endpoint, send, wait for the response head.
    async fn attempt(
        &self,
        snapshot: &RoutingSnapshot,
        backend: crate::dataplane::route::BackendId,
        mut parts: http::request::Parts,
        body: UpstreamBody,
    ) -> Result<Response<Incoming>, ProxyError> {
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
            .map_err(|_| ProxyError::BadRequest {
                code: "bad_request_target",
                message: "the request target cannot be forwarded",
                status: StatusCode::BAD_REQUEST,
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
        let result = self.answered(snapshot, backend, endpoint, sent).await;
        if let (Some((tracer, span)), Some(method)) = (span, method) {
            let error = result.as_ref().err().map(ToString::to_string);
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
    ) -> Result<Response<Incoming>, ProxyError> {
        match tokio::time::timeout(snapshot.timeouts.request, sent).await {
            Ok(Ok(mut response)) => {
                if self.observed() {
                    response.extensions_mut().insert(endpoint.authority.clone());
                }
                Ok(response)
            }
            Ok(Err(e)) => Err(classify(e, &backend.name, endpoint)),
            Err(_) => Err(ProxyError::Timeout {
                backend: backend.name.to_string(),
                endpoint: endpoint.to_string(),
                timeout_ms: snapshot.timeouts.request.as_millis(),
            }),
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
        client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    ) -> Response<ProxyBody> {
        let mut response = match result {
            Ok(response) => response,
            Err(e) => return self.answer_error(e, snapshot, decision, side, started, request_id),
        };
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let upstream_upgrade = hyper::upgrade::on(&mut response);
                tokio::spawn(tunnel(client_upgrade, upstream_upgrade, request_id.clone()));
            }
        } else {
            strip_hop_by_hop(response.headers_mut());
        }
        if let Some(cookie) = &decision.set_cookie {
            response
                .headers_mut()
                .append(header::SET_COOKIE, cookie.clone());
        }
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
        client_ip: IpAddr,
        request_id: &HeaderValue,
        upgrade: Option<HeaderValue>,
    ) {
        // An HTTP/2 request carries its host in the URI; HTTP/1.1 upstreams need it as Host.
        if !parts.headers.contains_key(header::HOST)
            && let Some(authority) = parts.uri.authority()
            && let Ok(value) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(header::HOST, value);
        }
        let trailers = accepts_trailers(&parts.headers);
        strip_hop_by_hop(&mut parts.headers);
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
    body: Incoming,
    max: u64,
    max_body: usize,
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
        _ => Ok((Either::Left(Limited::new(body, max_body)), None)),
    }
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

/// Lower-case host without port, from the URI (HTTP/2, absolute form) or `Host`.
fn request_host(req: &Request<Incoming>) -> Option<Cow<'_, str>> {
    let raw = match req.uri().host() {
        Some(h) => h,
        None => {
            let value = req.headers().get(header::HOST)?.to_str().ok()?;
            strip_port(value)
        }
    };
    if raw.bytes().any(|b| b.is_ascii_uppercase()) {
        Some(Cow::Owned(raw.to_ascii_lowercase()))
    } else {
        Some(Cow::Borrowed(raw))
    }
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        return host
            .split_once(']')
            .map_or(host, |(h, _)| &host[..h.len() + 1]);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// The protocol to upgrade to, when the client asks for an upgrade (WebSocket).
fn wants_upgrade(headers: &HeaderMap) -> Option<HeaderValue> {
    let asks = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    if asks {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    }
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
    // The client's body outgrew the limit mid-stream: the upstream request was aborted,
    // and it is the client's fault, not the backend's.
    let mut source = std::error::Error::source(&error);
    while let Some(s) = source {
        if s.is::<LengthLimitError>() {
            return ProxyError::BadRequest {
                code: "body_too_large",
                message: "the request body is larger than limits.max_body_bytes",
                status: StatusCode::PAYLOAD_TOO_LARGE,
            };
        }
        source = s.source();
    }
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

/// Copies bytes both ways once both sides have switched protocols.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    request_id: HeaderValue,
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
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:8080"), "[::1]");
    }

    #[test]
    fn request_ids_are_uuids() {
        let id = new_request_id();
        assert!(uuid::Uuid::parse_str(id.to_str().unwrap()).is_ok());
    }
}

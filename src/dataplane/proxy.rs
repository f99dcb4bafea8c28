//! The request flow: one snapshot load, route match, split decision, forwarding through the
//! pooled upstream client, and streaming the answer back.
//!
//! Bodies are never buffered: the client's request body is handed to the upstream request
//! and the upstream response body to the client's response, frame by frame.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rand::RngExt;

use super::decision::Decision;
use super::head_guard::HeadVerdicts;
use super::rescue::ProxyError;
use super::split::{RequestFacts, Side};
use crate::config::{Endpoint, Limits, Timeouts};
use crate::snapshot::SnapshotHandle;

pub type ProxyBody = Either<Incoming, Full<Bytes>>;

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

/// Everything a connection needs to proxy requests; shared by all connections.
pub struct Proxy {
    snapshots: SnapshotHandle,
    client: Client<HttpConnector, Incoming>,
    /// `http` or `https`, for `X-Forwarded-Proto`.
    scheme: HeaderValue,
    /// Fixed at start like the listener's buffers it must agree with.
    max_header_bytes: usize,
}

impl Proxy {
    /// The upstream pool is built once and outlives snapshots, so a reload keeps every
    /// warm upstream connection.
    pub fn new(snapshots: SnapshotHandle, timeouts: &Timeouts, limits: &Limits) -> Proxy {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeouts.connect));
        connector.set_nodelay(true);
        connector.set_keepalive(Some(Duration::from_secs(60)));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(timeouts.idle)
            .build(connector);
        Proxy {
            snapshots,
            client,
            scheme: HeaderValue::from_static("http"),
            max_header_bytes: limits.max_header_bytes,
        }
    }

    pub async fn handle(
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
        let backend = snapshot.backend(decision.backend);
        let endpoint = backend.pick();
        let stats = match decision.route {
            Some(i) => snapshot.stats[i].side(decision.side),
            None => snapshot.default_stats.side(Side::Legacy),
        };

        let upgrade = wants_upgrade(req.headers());
        let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
        let upstream_req =
            match self.upstream_request(req, endpoint, client_ip, &request_id, upgrade) {
                Ok(r) => r,
                Err(e) => {
                    let response = e.into_response(Some(&request_id));
                    stats.record(response.status().as_u16(), started.elapsed());
                    return response.map(Either::Right);
                }
            };

        let outcome =
            tokio::time::timeout(snapshot.timeouts.request, self.client.request(upstream_req))
                .await;
        let mut response = match outcome {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                let error = classify(e, &backend.name, endpoint);
                tracing::warn!(request_id = request_id.to_str().unwrap_or(""), backend = %backend.name, %endpoint, error = %error, "upstream request failed");
                let response = error.into_response(Some(&request_id));
                stats.record(response.status().as_u16(), started.elapsed());
                return response.map(Either::Right);
            }
            Err(_) => {
                let error = ProxyError::Timeout {
                    backend: backend.name.to_string(),
                    endpoint: endpoint.to_string(),
                    timeout_ms: snapshot.timeouts.request.as_millis(),
                };
                tracing::warn!(request_id = request_id.to_str().unwrap_or(""), backend = %backend.name, %endpoint, "upstream request timed out");
                let response = error.into_response(Some(&request_id));
                stats.record(response.status().as_u16(), started.elapsed());
                return response.map(Either::Right);
            }
        };

        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client_upgrade) = client_upgrade {
                let upstream_upgrade = hyper::upgrade::on(&mut response);
                tokio::spawn(tunnel(client_upgrade, upstream_upgrade));
            }
        } else {
            strip_hop_by_hop(response.headers_mut());
        }
        if let Some(cookie) = decision.set_cookie {
            response.headers_mut().append(header::SET_COOKIE, cookie);
        }
        stats.record(response.status().as_u16(), started.elapsed());
        response.map(Either::Left)
    }

    fn upstream_request(
        &self,
        req: Request<Incoming>,
        endpoint: &Endpoint,
        client_ip: IpAddr,
        request_id: &HeaderValue,
        upgrade: Option<HeaderValue>,
    ) -> Result<Request<Incoming>, ProxyError> {
        let (mut parts, body) = req.into_parts();
        // An HTTP/2 request carries its host in the URI; HTTP/1.1 upstreams need it as Host.
        if !parts.headers.contains_key(header::HOST)
            && let Some(authority) = parts.uri.authority()
            && let Ok(value) = HeaderValue::from_str(authority.as_str())
        {
            parts.headers.insert(header::HOST, value);
        }
        strip_hop_by_hop(&mut parts.headers);
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
        parts.version = Version::HTTP_11;
        Ok(Request::from_parts(parts, body))
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

/// Copies bytes both ways once both sides have switched protocols.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade did not complete");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "upgraded connection ended with an error");
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

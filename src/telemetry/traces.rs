//! Distributed tracing: W3C Trace Context (`traceparent`, `tracestate`) continued or
//! started, a server span per request and a client span per upstream attempt, exported as
//! OTLP/HTTP protobuf (the `opentelemetry-proto` messages) to `tracing.otlp_endpoint`.
//!
//! Sampling is parent-based: an incoming `traceparent` decides (its `sampled` flag), else
//! `tracing.sample_ratio`. Finished spans go through a bounded queue to one exporter task
//! that batches them; a full queue drops spans, never blocks a request. Without a
//! `tracing` section the data plane holds no tracer and spends nothing on traces.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span, status,
};
use prost::Message as _;
use rand::RngExt;
use tokio::sync::mpsc;

use super::access_log::Served;
use crate::config::TracingSpec;

pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Spans waiting for the exporter; more are dropped.
const QUEUE: usize = 16_384;
/// Spans per export request, and the longest a finished span waits to be sent.
const BATCH: usize = 512;
const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// A `traceparent` header (W3C Trace Context §3.2): version `00`, 16-byte trace id,
/// 8-byte parent id, flags. Ids of all zeros are invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub sampled: bool,
}

impl TraceParent {
    /// `None` for anything §3.2 says to ignore (then a new trace starts). A version other
    /// than `00` (and not `ff`) is read by its first four fields, as §3.2.4 allows.
    pub fn parse(value: &[u8]) -> Option<TraceParent> {
        let text = std::str::from_utf8(value).ok()?.trim();
        let mut fields = text.split('-');
        let version = fields.next()?;
        let trace = fields.next()?;
        let parent = fields.next()?;
        let flags = fields.next()?;
        let lower_hex = |s: &str| {
            s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        if version.len() != 2 || !lower_hex(version) || version == "ff" {
            return None;
        }
        if version == "00" && (fields.next().is_some() || text.len() != 55) {
            return None;
        }
        if trace.len() != 32 || parent.len() != 16 || flags.len() != 2 {
            return None;
        }
        if !(lower_hex(trace) && lower_hex(parent) && lower_hex(flags)) {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut parent_id = [0u8; 8];
        hex::decode_to_slice(trace, &mut trace_id).ok()?;
        hex::decode_to_slice(parent, &mut parent_id).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return None;
        }
        Some(TraceParent {
            trace_id,
            parent_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The header value naming `span_id` as the parent of whatever comes next.
    pub fn header(trace_id: &[u8; 16], span_id: &[u8; 8], sampled: bool) -> HeaderValue {
        let mut text = String::with_capacity(55);
        let _ = write!(
            text,
            "00-{}-{}-{}",
            hex::encode(trace_id),
            hex::encode(span_id),
            if sampled { "01" } else { "00" }
        );
        HeaderValue::from_str(&text).expect("hex is a valid header value")
    }
}

/// The trace a request belongs to, carried in its extensions from the server span to each
/// upstream attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceScope {
    pub trace_id: [u8; 16],
    /// The server span: the parent of every client span of the request.
    pub span_id: [u8; 8],
    /// The caller's span, when the request came with a `traceparent`.
    pub remote_parent: Option<[u8; 8]>,
    pub started: SystemTime,
}

fn random_id<const N: usize>() -> [u8; N] {
    loop {
        let id: [u8; N] = rand::rng().random();
        if id != [0; N] {
            return id;
        }
    }
}

/// The data plane's handle on tracing: decides sampling and queues finished spans.
#[derive(Debug, Clone)]
pub struct Tracer {
    ratio: f64,
    queue: mpsc::Sender<Span>,
}

/// One attribute of a span.
pub enum Attr<'a> {
    Str(&'a str),
    Int(i64),
    Double(f64),
    Bool(bool),
}

fn key_value(key: &str, value: Attr<'_>) -> KeyValue {
    let value = match value {
        Attr::Str(s) => any_value::Value::StringValue(s.to_string()),
        Attr::Int(i) => any_value::Value::IntValue(i),
        Attr::Double(d) => any_value::Value::DoubleValue(d),
        Attr::Bool(b) => any_value::Value::BoolValue(b),
    };
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

impl Tracer {
    /// Starts the exporter task on the current runtime.
    pub fn start(spec: &TracingSpec) -> Tracer {
        let (queue, spans) = mpsc::channel(QUEUE);
        let url = format!("{}/v1/traces", spec.otlp_endpoint);
        tokio::spawn(export(spans, url));
        Tracer {
            ratio: spec.sample_ratio,
            queue,
        }
    }

    /// Continues the caller's trace or starts one. `None` when the trace is not sampled:
    /// the request's own `traceparent` then travels on untouched.
    pub fn begin(&self, headers: &HeaderMap) -> Option<TraceScope> {
        let incoming = headers
            .get(&TRACEPARENT)
            .and_then(|v| TraceParent::parse(v.as_bytes()));
        let sampled = match incoming {
            Some(parent) => parent.sampled,
            None => self.ratio >= 1.0 || (self.ratio > 0.0 && rand::random::<f64>() < self.ratio),
        };
        sampled.then(|| TraceScope {
            trace_id: incoming.map_or_else(random_id, |p| p.trace_id),
            span_id: random_id(),
            remote_parent: incoming.map(|p| p.parent_id),
            started: SystemTime::now(),
        })
    }

    /// Starts a client span for one upstream attempt of the request in `scope`, and names
    /// it in `headers` as the upstream's parent.
    pub fn start_client(&self, scope: &TraceScope, headers: &mut HeaderMap) -> ClientSpan {
        let span_id = random_id();
        headers.insert(
            TRACEPARENT.clone(),
            TraceParent::header(&scope.trace_id, &span_id, true),
        );
        ClientSpan {
            scope: *scope,
            span_id,
            started: SystemTime::now(),
        }
    }

    /// Ends an attempt's span: `status` of the upstream's answer, or the error that ended it.
    pub fn finish_client(
        &self,
        span: ClientSpan,
        method: &str,
        backend: &str,
        endpoint: &str,
        outcome: Result<u16, &str>,
    ) {
        let mut attributes = [
            ("http.request.method", Attr::Str(method)),
            ("switchyard.backend", Attr::Str(backend)),
            ("server.address", Attr::Str(endpoint)),
            (
                "http.response.status_code",
                Attr::Int(outcome.map_or(0, i64::from)),
            ),
        ]
        .into_iter()
        .filter(|(_, v)| !matches!(v, Attr::Int(0)));
        self.finish(
            &span.scope,
            span.span_id,
            Some(span.scope.span_id),
            SpanKind::Client,
            method.to_string(),
            span.started,
            outcome.err(),
            &mut attributes,
        );
    }

    /// Ends the request's server span, with how it was served when it got that far.
    pub fn finish_server(
        &self,
        scope: &TraceScope,
        method: &str,
        path: &str,
        status: u16,
        served: Option<&Served>,
    ) {
        let mut attributes: Vec<(&str, Attr<'_>)> = vec![
            ("http.request.method", Attr::Str(method)),
            ("url.path", Attr::Str(path)),
            ("http.response.status_code", Attr::Int(i64::from(status))),
        ];
        if let Some(s) = served {
            attributes.push(("switchyard.route", Attr::Str(&s.route)));
            attributes.push(("switchyard.side", Attr::Str(s.side)));
            attributes.push(("switchyard.replayed", Attr::Bool(s.replayed)));
            if let Some(bucket) = s.bucket {
                attributes.push(("switchyard.bucket", Attr::Int(i64::from(bucket))));
            }
            if let Some(weight) = s.weight {
                attributes.push(("switchyard.weight", Attr::Double(weight)));
            }
            if let Some(flag) = &s.flag {
                attributes.push(("switchyard.flag", Attr::Str(flag)));
            }
        }
        let name = match served {
            Some(s) => format!("{method} {}", s.route),
            None => method.to_string(),
        };
        self.finish(
            scope,
            scope.span_id,
            scope.remote_parent,
            SpanKind::Server,
            name,
            scope.started,
            (status >= 500).then_some("the request failed"),
            &mut attributes.into_iter(),
        );
    }

    /// Queues a finished span; `parent` is `None` for a root span.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        scope: &TraceScope,
        span_id: [u8; 8],
        parent: Option<[u8; 8]>,
        kind: span::SpanKind,
        name: String,
        started: SystemTime,
        error: Option<&str>,
        attributes: &mut dyn Iterator<Item = (&str, Attr<'_>)>,
    ) {
        let span = Span {
            trace_id: scope.trace_id.to_vec(),
            span_id: span_id.to_vec(),
            parent_span_id: parent.map(|p| p.to_vec()).unwrap_or_default(),
            flags: 1,
            name,
            kind: kind as i32,
            start_time_unix_nano: unix_nanos(started),
            end_time_unix_nano: unix_nanos(SystemTime::now()),
            attributes: attributes.map(|(k, v)| key_value(k, v)).collect(),
            status: error.map(|message| Status {
                message: message.to_string(),
                code: status::StatusCode::Error as i32,
            }),
            ..Default::default()
        };
        // A full queue loses the span: tracing must never hold a request up.
        let _ = self.queue.try_send(span);
    }
}

/// The exporter: batches spans and posts them as `ExportTraceServiceRequest` protobuf
/// (OTLP/HTTP, `application/x-protobuf`). A collector that is down loses those batches,
/// logged once per failure streak.
async fn export(mut spans: mpsc::Receiver<Span>, url: String) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let uri: http::Uri = match url.parse() {
        Ok(u) => u,
        Err(e) => {
            tracing::error!(%url, error = %e, "tracing.otlp_endpoint is not a URI; no spans are exported");
            return;
        }
    };
    let mut failing = false;
    while let Some(first) = spans.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, spans.recv()).await {
                Ok(Some(span)) => batch.push(span),
                _ => break,
            }
        }
        let body = ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![
                        key_value("service.name", Attr::Str("switchyard")),
                        key_value("service.version", Attr::Str(env!("CARGO_PKG_VERSION"))),
                    ],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: "switchyard".into(),
                        version: env!("CARGO_PKG_VERSION").into(),
                        ..Default::default()
                    }),
                    spans: batch,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
        .encode_to_vec();
        let request = http::Request::post(uri.clone())
            .header(http::header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(Bytes::from(body)))
            .expect("a valid request");
        let outcome =
            match tokio::time::timeout(Duration::from_secs(10), client.request(request)).await {
                Ok(Ok(r)) if r.status().is_success() => Ok(()),
                Ok(Ok(r)) => Err(format!("the collector answered {}", r.status())),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("the collector did not answer within 10s".into()),
            };
        match outcome {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(%url, error = %e, "spans could not be exported; retrying with the next batch");
            }
            Err(_) => {}
        }
    }
}

use span::SpanKind;

/// An upstream attempt's span, from its start to [`Tracer::finish_client`].
#[derive(Debug)]
pub struct ClientSpan {
    scope: TraceScope,
    span_id: [u8; 8],
    started: SystemTime,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_follows_the_w3c_grammar() {
        let ok =
            TraceParent::parse(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").unwrap();
        assert_eq!(hex::encode(ok.trace_id), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(hex::encode(ok.parent_id), "b7ad6b7169203331");
        assert!(ok.sampled);
        assert_eq!(
            TraceParent::header(&ok.trace_id, &ok.parent_id, true),
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        );
        for bad in [
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            "00-0af7651916cd43dd8448eb211c8031-b7ad6b7169203331-01",
            "",
        ] {
            assert_eq!(TraceParent::parse(bad.as_bytes()), None, "{bad}");
        }
        // A later version is read by its first four fields.
        let future = TraceParent::parse(
            b"01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00-what-ever",
        )
        .unwrap();
        assert!(!future.sampled);
    }
}

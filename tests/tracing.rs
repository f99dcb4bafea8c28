//! Distributed tracing (contract §10): a request's `traceparent` is continued, the upstream
//! sees a child of switchyard's client span, and the spans arrive as real OTLP/HTTP protobuf
//! at a receiver with their parent links and attributes.

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use serde_json::Value;
use support::*;
use tokio::net::TcpListener;

/// An OTLP/HTTP receiver: decodes every `POST /v1/traces` body and keeps its spans.
struct Receiver {
    addr: std::net::SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let kept = spans.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let kept = kept.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let kept = kept.clone();
                        async move {
                            assert_eq!(req.uri().path(), "/v1/traces");
                            assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let export = ExportTraceServiceRequest::decode(body).unwrap();
                            for rs in export.resource_spans {
                                for ss in rs.scope_spans {
                                    kept.lock().unwrap().extend(ss.spans);
                                }
                            }
                            Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Receiver { addr, spans }
    }

    fn spans(&self, trace_id: &[u8]) -> Vec<Span> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }
}

/// Waits until `n` spans of the trace arrived, and returns them.
async fn exported(receiver: &Receiver, trace_id: &[u8], n: usize) -> Vec<Span> {
    eventually(
        Duration::from_secs(10),
        &format!("{n} spans exported"),
        || std::future::ready(receiver.spans(trace_id).len() >= n),
    )
    .await;
    receiver.spans(trace_id)
}

fn attributes(span: &Span) -> HashMap<String, Any> {
    span.attributes
        .iter()
        .filter_map(|kv| Some((kv.key.clone(), kv.value.clone()?.value?)))
        .collect()
}

fn string(v: &str) -> Any {
    Any::StringValue(v.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incoming_trace_is_continued_to_the_upstream_and_exported_over_otlp() {
    let receiver = Receiver::start().await;
    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let proxy = Switchyard::start(&format!(
        "tracing: {{ otlp_endpoint: \"http://{}\", sample_ratio: 0 }}\n\
backends:\n  legacy: {{ endpoints: [\"{}\"] }}\n  target: {{ endpoints: [\"{}\"] }}\n\
default_backend: legacy\n\
routes:\n  - name: users\n    match: {{ path_prefix: / }}\n    legacy: legacy\n    target: target\n    split: {{ percentage: {{ weight: 100 }} }}\n    failover: {{ methods: [GET], budget: 1, on_5xx: true }}\n",
        receiver.addr,
        legacy.url(),
        target.url()
    ));

    // The caller's trace, sampled: switchyard continues it even though its own ratio is 0.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    let (status, _, body) = get(
        &proxy.url("/api/users/1"),
        &[
            ("traceparent", &format!("00-{trace}-{caller}-01")),
            ("tracestate", "vendor=opaque"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    let echo: Value = serde_json::from_str(&body).unwrap();
    let upstream_parent = echo["headers"]["traceparent"].as_str().unwrap().to_string();
    let fields: Vec<&str> = upstream_parent.split('-').collect();
    assert_eq!(fields[0], "00");
    assert_eq!(
        fields[1], trace,
        "the upstream continues the caller's trace"
    );
    assert_ne!(
        fields[2], caller,
        "the upstream's parent is switchyard's span"
    );
    assert_eq!(fields[3], "01");
    assert_eq!(echo["headers"]["tracestate"], "vendor=opaque");

    let trace_id = hex::decode(trace).unwrap();
    let spans = exported(&receiver, &trace_id, 2).await;
    assert_eq!(spans.len(), 2, "{spans:#?}");
    let server = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .unwrap();
    let client = spans
        .iter()
        .find(|s| s.kind == SpanKind::Client as i32)
        .unwrap();
    assert_eq!(server.parent_span_id, hex::decode(caller).unwrap());
    assert_eq!(client.parent_span_id, server.span_id);
    assert_eq!(hex::encode(&client.span_id), fields[2]);
    assert!(server.start_time_unix_nano <= client.start_time_unix_nano);
    assert!(client.end_time_unix_nano <= server.end_time_unix_nano);
    let a = attributes(server);
    assert_eq!(a["switchyard.route"], string("users"));
    assert_eq!(a["switchyard.side"], string("target"));
    assert!(matches!(a["switchyard.bucket"], Any::IntValue(b) if (0..10_000).contains(&b)));
    assert_eq!(a["switchyard.weight"], Any::DoubleValue(100.0));
    assert_eq!(a["http.response.status_code"], Any::IntValue(200));
    let a = attributes(client);
    assert_eq!(a["switchyard.backend"], string("target"));
    assert_eq!(a["server.address"], string(&target.addr.to_string()));

    // A failover: the first attempt and its replay are each a client span of one server span.
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let (status, _, _) = get(
        &proxy.url("/__status/500"),
        &[("traceparent", &format!("00-{trace}-b7ad6b7169203331-01"))],
    )
    .await;
    assert_eq!(status, 500);
    let trace_id = hex::decode(trace).unwrap();
    let spans = exported(&receiver, &trace_id, 3).await;
    let server = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .unwrap();
    let clients: Vec<_> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Client as i32)
        .collect();
    assert_eq!(clients.len(), 2, "{spans:#?}");
    assert!(clients.iter().all(|c| c.parent_span_id == server.span_id));
    let backends: Vec<Any> = clients
        .iter()
        .map(|c| attributes(c)["switchyard.backend"].clone())
        .collect();
    assert!(backends.contains(&string("target")) && backends.contains(&string("legacy")));
    assert_eq!(
        attributes(server)["switchyard.replayed"],
        Any::BoolValue(true)
    );

    // Without a traceparent and with ratio 0: no span, and the upstream gets none.
    let (_, _, body) = get(&proxy.url("/api/users/2"), &[]).await;
    let echo: Value = serde_json::from_str(&body).unwrap();
    assert!(echo["headers"].get("traceparent").is_none(), "{echo}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_a_trace_starts_one_by_ratio() {
    let receiver = Receiver::start().await;
    let legacy = Backend::start("legacy").await;
    let proxy = Switchyard::start(&format!(
        "tracing: {{ otlp_endpoint: \"http://{}\" }}\n\
backends:\n  legacy: {{ endpoints: [\"{}\"] }}\ndefault_backend: legacy\n",
        receiver.addr,
        legacy.url()
    ));
    let (_, _, body) = get(&proxy.url("/x"), &[]).await;
    let echo: Value = serde_json::from_str(&body).unwrap();
    let parent = echo["headers"]["traceparent"]
        .as_str()
        .expect("a new trace");
    let trace_id = hex::decode(parent.split('-').nth(1).unwrap()).unwrap();
    let spans = exported(&receiver, &trace_id, 2).await;
    let server = spans
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .unwrap();
    assert!(server.parent_span_id.is_empty(), "a root span");
    assert_eq!(attributes(server)["switchyard.route"], string("_default"));
}

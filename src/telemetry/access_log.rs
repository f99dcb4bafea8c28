//! The access log: one line per request, written off the request path.
//!
//! The request path fills an [`AccessLine`] and hands it to a bounded queue with
//! `try_send`; a dedicated writer thread formats and writes the lines, batching writes
//! while the queue has more. When the queue is full the line is dropped and counted in
//! `switchyard_access_log_dropped_lines_total`: a slow disk never slows a request.
//! It owns the line's shape (JSON fields, text layout); it decides nothing about traffic.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Version, header};
use http_body::{Body, Frame};
use http_body_util::combinators::MapFrame;
use http_body_util::{BodyExt, Either};

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::config::{AccessLogFormat, AccessLogPath, AccessLogSpec};

#[derive(Debug, thiserror::Error)]
pub enum AccessLogError {
    #[error("cannot open the access log {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
}

/// One request as the access log records it. Optional fields are `null` in JSON and `-` in
/// text when the request never got that far (no route matched, refused before routing).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AccessLine {
    /// When the request arrived, RFC 3339 UTC with milliseconds.
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    pub request_id: Option<String>,
    /// The client's address (the connection's peer).
    pub client: IpAddr,
    pub method: String,
    pub host: Option<String>,
    /// The path without its query, which may carry secrets.
    pub path: String,
    pub protocol: &'static str,
    pub status: u16,
    /// Route name; `_default` when no route matched; `null` when refused before routing.
    pub route: Option<Arc<str>>,
    /// `legacy` or `target`: the side that answered.
    pub side: Option<&'static str>,
    /// The sticky bucket, 0..10000, when the route's split used one.
    pub bucket: Option<u16>,
    /// The feature flag that split the request, for a `feature_flag` split.
    pub flag: Option<Arc<str>>,
    /// The route's target share in force, in percent (the rollout step's weight).
    pub weight: Option<f64>,
    /// `host:port` of the endpoint of the last attempt.
    pub upstream: Option<String>,
    /// The request body's declared length; `null` when streamed without `Content-Length`.
    pub bytes_in: Option<u64>,
    /// Response body bytes sent to the client.
    pub bytes_out: u64,
    /// From the request's arrival to the upstream response head (or the error answer).
    pub ttfb_ms: f64,
    /// From the request's arrival to the response body's end.
    pub duration_ms: f64,
    /// Whether the request failed on target and was replayed on legacy.
    pub replayed: bool,
}

fn rfc3339<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*time))
}

/// Milliseconds with microsecond precision, as logged.
pub fn millis(d: Duration) -> f64 {
    (d.as_micros() as f64) / 1000.0
}

impl AccessLine {
    /// A placeholder left behind when a pending line is taken to be queued.
    const EMPTY: AccessLine = AccessLine {
        time: SystemTime::UNIX_EPOCH,
        request_id: None,
        client: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
        method: String::new(),
        host: None,
        path: String::new(),
        protocol: "",
        status: 0,
        route: None,
        side: None,
        bucket: None,
        flag: None,
        weight: None,
        upstream: None,
        bytes_in: None,
        bytes_out: 0,
        ttfb_ms: 0.0,
        duration_ms: 0.0,
        replayed: false,
    };

    /// The documented text layout, one line:
    /// `TIME CLIENT "METHOD HOST PATH PROTOCOL" STATUS BYTES_OUT DURATION_MS key=value…`
    /// with `-` for a missing value.
    pub fn write_text(&self, out: &mut Vec<u8>) {
        fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
            v.as_ref()
                .map_or_else(|| "-".to_string(), |v| v.to_string())
        }
        let _ = writeln!(
            out,
            "{} {} \"{} {} {} {}\" {} {} {:.3} request_id={} route={} side={} bucket={} flag={} weight={} upstream={} bytes_in={} ttfb_ms={:.3} replayed={}",
            humantime::format_rfc3339_millis(self.time),
            self.client,
            self.method,
            self.host.as_deref().unwrap_or("-"),
            self.path.escape_debug(),
            self.protocol,
            self.status,
            self.bytes_out,
            self.duration_ms,
            opt(&self.request_id),
            opt(&self.route),
            opt(&self.side),
            opt(&self.bucket),
            opt(&self.flag),
            opt(&self.weight),
            opt(&self.upstream),
            opt(&self.bytes_in),
            self.ttfb_ms,
            self.replayed,
        );
    }

    pub fn write_json(&self, out: &mut Vec<u8>) {
        // Serializing plain fields into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, self);
        out.push(b'\n');
    }
}

/// The request path's handle: cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct AccessLog {
    queue: mpsc::Sender<AccessLine>,
    dropped: Counter,
    /// For requests refused before routing: the top-level `access_log.sample`.
    sample: f64,
}

impl AccessLog {
    /// Opens the destination now (so a bad path stops `serve` with a clear error) and
    /// starts the writer thread, which ends when the last handle is dropped.
    pub fn start(spec: &AccessLogSpec, dropped: Counter) -> Result<AccessLog, AccessLogError> {
        let sink: Box<dyn Write + Send> = match &spec.path {
            AccessLogPath::Stdout => Box::new(std::io::stdout()),
            AccessLogPath::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| AccessLogError::Open {
                        path: path.display().to_string(),
                        source,
                    })?,
            ),
        };
        let (queue, lines) = mpsc::channel(spec.queue);
        let format = spec.format;
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(lines, sink, format))
            .map_err(|source| AccessLogError::Open {
                path: "(writer thread)".into(),
                source,
            })?;
        Ok(AccessLog {
            queue,
            dropped,
            sample: spec.sample,
        })
    }

    /// Queues a line; drops and counts it when the writer is behind.
    pub fn record(&self, line: AccessLine) {
        if self.queue.try_send(line).is_err() {
            self.dropped.inc();
        }
    }
}

/// How the data plane served a request, attached to the response it returns (an
/// extension, only while the access log is on) for [`AccessLog::finish`] to read.
#[derive(Debug, Clone, PartialEq)]
pub struct Served {
    pub route: Arc<str>,
    pub side: &'static str,
    pub bucket: Option<u16>,
    pub flag: Option<Arc<str>>,
    pub weight: Option<f64>,
    pub upstream: Option<String>,
    pub replayed: bool,
    /// The route's `access_log.sample`.
    pub sample: f64,
}

/// What is known of a request when it arrives, kept until its response is known.
#[derive(Debug)]
pub struct RequestStart {
    started: Instant,
    line: AccessLine,
}

impl RequestStart {
    /// Reads the request's head. `request_id` is the id the request will be forwarded with.
    pub fn of<B>(req: &Request<B>, peer: SocketAddr, request_id: &HeaderValue) -> RequestStart {
        let headers = req.headers();
        let host = req
            .uri()
            .host()
            .or_else(|| headers.get(header::HOST)?.to_str().ok());
        RequestStart {
            started: Instant::now(),
            line: AccessLine {
                time: SystemTime::now(),
                request_id: request_id.to_str().ok().map(str::to_string),
                client: peer.ip().to_canonical(),
                method: req.method().as_str().to_string(),
                host: host.map(str::to_string),
                path: req.uri().path().to_string(),
                protocol: protocol(req.version()),
                bytes_in: headers
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.trim().parse().ok()),
                ..AccessLine::EMPTY
            },
        }
    }
}

fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "HTTP/1.1",
    }
}

impl AccessLog {
    /// Decides by the route's sample whether this request is logged and, if so, wraps
    /// the response body so the line is queued when the body ends (or the client leaves).
    pub fn finish<B>(
        &self,
        start: RequestStart,
        mut response: Response<B>,
    ) -> Response<LoggedBody<B>>
    where
        B: Body<Data = Bytes>,
    {
        let served = response.extensions_mut().remove::<Served>();
        let sample = served.as_ref().map_or(self.sample, |s| s.sample);
        let logged = sample >= 1.0 || (sample > 0.0 && rand::random::<f64>() < sample);
        if !logged {
            return response.map(Either::Left);
        }
        let RequestStart { started, mut line } = start;
        line.status = response.status().as_u16();
        line.ttfb_ms = millis(started.elapsed());
        if let Some(s) = served {
            line.route = Some(s.route);
            line.side = Some(s.side);
            line.bucket = s.bucket;
            line.flag = s.flag;
            line.weight = s.weight;
            line.upstream = s.upstream;
            line.replayed = s.replayed;
        }
        let pending = Box::new(Pending {
            line,
            started,
            log: self.clone(),
        });
        response.map(|inner| counted(inner, pending))
    }
}

/// A line waiting for its response body to end: queued when dropped, which hyper does
/// once the body is sent or the client is gone.
struct Pending {
    line: AccessLine,
    started: Instant,
    log: AccessLog,
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut line = std::mem::replace(&mut self.line, AccessLine::EMPTY);
        line.duration_ms = millis(self.started.elapsed());
        self.log.record(line);
    }
}

/// Counts the response body's bytes into the line it owns.
type FrameCounter = Box<dyn FnMut(Frame<Bytes>) -> Frame<Bytes> + Send>;

/// A response body as the access log sees it: passed through untouched when not logged,
/// else counted frame by frame with the line queued when the body is dropped.
pub type LoggedBody<B> = Either<B, MapFrame<B, FrameCounter>>;

fn counted<B>(inner: B, mut pending: Box<Pending>) -> LoggedBody<B>
where
    B: Body<Data = Bytes>,
{
    let count: FrameCounter = Box::new(move |frame: Frame<Bytes>| {
        if let Some(data) = frame.data_ref() {
            pending.line.bytes_out += data.len() as u64;
        }
        frame
    });
    Either::Right(inner.map_frame(count))
}

/// The writer thread: blocks for a line, then takes every line already queued before one
/// write, so a busy proxy makes few system calls.
fn write_lines(
    mut lines: mpsc::Receiver<AccessLine>,
    mut sink: Box<dyn Write + Send>,
    format: AccessLogFormat,
) {
    let mut buffer = Vec::with_capacity(64 * 1024);
    while let Some(first) = lines.blocking_recv() {
        let mut next = Some(first);
        while let Some(line) = next {
            match format {
                AccessLogFormat::Json => line.write_json(&mut buffer),
                AccessLogFormat::Text => line.write_text(&mut buffer),
            }
            next = if buffer.len() < 256 * 1024 {
                lines.try_recv().ok()
            } else {
                None
            };
        }
        if let Err(e) = sink.write_all(&buffer).and_then(|()| sink.flush()) {
            tracing::warn!(error = %e, lines_lost = true, "cannot write the access log");
        }
        buffer.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line() -> AccessLine {
        AccessLine {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            request_id: Some("r-1".into()),
            client: "10.0.0.1".parse().unwrap(),
            method: "GET".into(),
            host: Some("shop.example".into()),
            path: "/api/users/7".into(),
            protocol: "HTTP/1.1",
            status: 200,
            route: Some(Arc::from("users")),
            side: Some("target"),
            bucket: Some(421),
            flag: None,
            weight: Some(25.0),
            upstream: Some("127.0.0.1:9002".into()),
            bytes_in: None,
            bytes_out: 512,
            ttfb_ms: 1.25,
            duration_ms: 2.5,
            replayed: false,
        }
    }

    #[test]
    fn json_lines_hold_json_values() {
        let mut out = vec![];
        line().write_json(&mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["status"], 200);
        assert_eq!(v["bucket"], 421);
        assert_eq!(v["flag"], serde_json::Value::Null);
        assert_eq!(v["bytes_in"], serde_json::Value::Null);
        assert_eq!(v["side"], "target");
        assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 1);
    }

    #[test]
    fn text_lines_follow_the_documented_layout() {
        let mut out = vec![];
        line().write_text(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.starts_with(
                "2023-11-14T22:13:20.123Z 10.0.0.1 \"GET shop.example /api/users/7 HTTP/1.1\" 200 512 2.500 request_id=r-1 route=users side=target bucket=421 flag=- weight=25"
            ),
            "{text}"
        );
        assert!(text.ends_with("replayed=false\n"), "{text}");
    }
}

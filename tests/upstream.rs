//! Towards backends: `https://` endpoints verified against a configured CA (and refused when
//! the certificate cannot be verified), an SNI override, a client certificate for a backend
//! that requires one, HTTP/2 to a backend with `protocol: h2` (prior knowledge over
//! `http://`, ALPN over TLS), and a gRPC-style exchange whose trailers arrive intact.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::server::WebPkiClientVerifier;
use support::pki::{Issued, TestCa};
use support::*;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TestCa {
    /// A server config with `issued`'s certificate; client certificates from this CA
    /// required when `require_client` is set.
    fn server(
        &self,
        issued: &Issued,
        require_client: bool,
        alpn: &[&[u8]],
    ) -> Arc<rustls::ServerConfig> {
        use rustls_pki_types::pem::PemObject;
        let chain = rustls_pki_types::CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key =
            rustls_pki_types::PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if require_client {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()), provider())
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder.with_single_cert(chain, key).unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

/// What a test backend saw: the protocol version and `te` of each request.
#[derive(Default)]
struct Seen {
    connections: std::sync::atomic::AtomicUsize,
    versions: Mutex<Vec<Version>>,
    te: Mutex<Vec<Option<String>>>,
}

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// A backend on 127.0.0.1:0: TLS when `tls` is set, HTTP/2 only when `h2` is set (prior
/// knowledge, or after ALPN), HTTP/1.1 otherwise.
///
/// `/grpc` reads the request body and answers a gRPC-style stream: two DATA frames, then
/// trailers `grpc-status: 0`, `grpc-message: ok`. Anything else answers `hello from
/// upstream`.
async fn start_backend(
    tls: Option<Arc<rustls::ServerConfig>>,
    h2: bool,
) -> (SocketAddr, Arc<Seen>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let acceptor = tls.map(TlsAcceptor::from);
    let state = seen.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            state
                .connections
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let acceptor = acceptor.clone();
            let state = state.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| answer(state.clone(), req));
                match acceptor {
                    Some(acceptor) => {
                        // A refused handshake (no client certificate) ends here.
                        let Ok(tls) = acceptor.accept(stream).await else {
                            return;
                        };
                        serve(TokioIo::new(tls), h2, service).await;
                    }
                    None => serve(TokioIo::new(stream), h2, service).await,
                }
            });
        }
    });
    (addr, seen, task)
}

async fn serve<I, S>(io: I, h2: bool, service: S)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<
            Request<Incoming>,
            Response = Response<Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + Send
        + 'static,
{
    if h2 {
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, service)
            .await;
    } else {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .await;
    }
}

async fn answer(seen: Arc<Seen>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    seen.versions.lock().unwrap().push(req.version());
    seen.te.lock().unwrap().push(
        req.headers()
            .get("te")
            .map(|v| v.to_str().unwrap().to_string()),
    );
    if req.uri().path() != "/grpc" {
        return Ok(Response::new(
            Full::new(Bytes::from_static(b"hello from upstream")).boxed(),
        ));
    }
    let request = req.into_body().collect().await.unwrap().to_bytes();
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    trailers.insert("grpc-message", HeaderValue::from_static("ok"));
    let frames = vec![
        Ok::<_, Infallible>(Frame::data(request)),
        Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))),
        Ok(Frame::trailers(trailers)),
    ];
    let mut response = Response::new(StreamBody::new(futures_util::stream::iter(frames)).boxed());
    response
        .headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    Ok(response)
}

/// Writes `files` (name, contents) beside a config and starts switchyard with it.
fn proxy_with(yaml: &str, files: &[(&str, &str)]) -> (tempfile::TempDir, Switchyard) {
    let (dir, path) = write_config(yaml);
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let proxy = Switchyard::start_file(&path);
    (dir, proxy)
}

fn one_backend(endpoint: &str, extra: &str) -> String {
    format!("backends:\n  up:\n    endpoints: [\"{endpoint}\"]\n{extra}default_backend: up\n",)
}

fn error_code(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).expect("an error body is JSON");
    v["error"]["code"].as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn https_backend_is_verified_against_the_configured_ca() {
    let ca = TestCa::new();
    let leaf = ca.issue(&["127.0.0.1"], false);
    let (addr, seen, _task) = start_backend(Some(ca.server(&leaf, false, &[])), false).await;
    let (_dir, proxy) = proxy_with(
        &one_backend(&format!("https://{addr}"), "    tls: { ca: ca.pem }\n"),
        &[("ca.pem", &ca.pem())],
    );
    let (status, _, body) = get(&proxy.url("/hello"), &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, "hello from upstream");
    assert_eq!(*seen.versions.lock().unwrap(), [Version::HTTP_11]);
}

#[tokio::test]
async fn https_backend_with_an_unknown_issuer_is_refused() {
    let ca = TestCa::new();
    let leaf = ca.issue(&["127.0.0.1"], false);
    let (addr, seen, _task) = start_backend(Some(ca.server(&leaf, false, &[])), false).await;
    // No `tls.ca`: the system roots do not know the test CA.
    let (_dir, proxy) = proxy_with(&one_backend(&format!("https://{addr}"), ""), &[]);
    let (status, _, body) = get(&proxy.url("/hello"), &[]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(error_code(&body), "upstream_connect_failed");
    // The certificate problem goes to the log; the client learns the cause code only.
    assert!(
        !body.to_ascii_lowercase().contains("certificate"),
        "the error tells a stranger about the backend: {body}"
    );
    assert!(seen.versions.lock().unwrap().is_empty());
}

#[tokio::test]
async fn server_name_overrides_the_endpoint_host_for_sni_and_verification() {
    let ca = TestCa::new();
    let leaf = ca.issue(&["backend.internal"], false);
    let (addr, _seen, _task) = start_backend(Some(ca.server(&leaf, false, &[])), false).await;
    let endpoint = format!("https://{addr}");
    let (_dir, proxy) = proxy_with(
        &one_backend(
            &endpoint,
            "    tls: { ca: ca.pem, server_name: backend.internal }\n",
        ),
        &[("ca.pem", &ca.pem())],
    );
    let (status, _, body) = get(&proxy.url("/hello"), &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    // Without the override the certificate does not name 127.0.0.1.
    let (_dir2, plain) = proxy_with(
        &one_backend(&endpoint, "    tls: { ca: ca.pem }\n"),
        &[("ca.pem", &ca.pem())],
    );
    let (status, _, body) = get(&plain.url("/hello"), &[]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(error_code(&body), "upstream_connect_failed");
}

#[tokio::test]
async fn client_certificate_is_presented_to_a_backend_that_requires_one() {
    let ca = TestCa::new();
    let leaf = ca.issue(&["127.0.0.1"], false);
    let client = ca.issue(&["switchyard.test"], true);
    let (addr, seen, _task) = start_backend(Some(ca.server(&leaf, true, &[])), false).await;
    let endpoint = format!("https://{addr}");
    let (_dir, proxy) = proxy_with(
        &one_backend(
            &endpoint,
            "    tls: { ca: ca.pem, client_cert: client.crt, client_key: client.key }\n",
        ),
        &[
            ("ca.pem", &ca.pem()),
            ("client.crt", &client.cert_pem),
            ("client.key", &client.key_pem),
        ],
    );
    let (status, _, body) = get(&proxy.url("/hello"), &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(seen.versions.lock().unwrap().len(), 1);

    let (_dir2, anonymous) = proxy_with(
        &one_backend(&endpoint, "    tls: { ca: ca.pem }\n"),
        &[("ca.pem", &ca.pem())],
    );
    let (status, _, body) = get(&anonymous.url("/hello"), &[]).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(
        seen.versions.lock().unwrap().len(),
        1,
        "no request reached the backend"
    );
}

#[tokio::test]
async fn h2_backend_is_spoken_to_in_http2_with_prior_knowledge() {
    let (addr, seen, _task) = start_backend(None, true).await;
    let (_dir, proxy) = proxy_with(
        &one_backend(&format!("http://{addr}"), "    protocol: h2\n"),
        &[],
    );
    for _ in 0..3 {
        let (status, _, body) = get(&proxy.url("/hello"), &[]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body, "hello from upstream");
    }
    assert_eq!(*seen.versions.lock().unwrap(), [Version::HTTP_2; 3]);
}

#[tokio::test]
async fn h2_over_tls_is_negotiated_by_alpn() {
    let ca = TestCa::new();
    let leaf = ca.issue(&["127.0.0.1"], false);
    let (addr, seen, _task) = start_backend(Some(ca.server(&leaf, false, &[b"h2"])), true).await;
    let (_dir, proxy) = proxy_with(
        &one_backend(
            &format!("https://{addr}"),
            "    protocol: h2\n    tls: { ca: ca.pem }\n",
        ),
        &[("ca.pem", &ca.pem())],
    );
    let (status, _, body) = get(&proxy.url("/hello"), &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(*seen.versions.lock().unwrap(), [Version::HTTP_2]);
}

#[tokio::test]
async fn health_probes_reach_tls_and_h2_endpoints_through_the_backend_client() {
    let ca = TestCa::new();
    let leaf = ca.issue(&["127.0.0.1"], false);
    let (addr, seen, _task) = start_backend(Some(ca.server(&leaf, false, &[b"h2"])), true).await;
    let (_dir, _proxy) = proxy_with(
        &one_backend(
            &format!("https://{addr}"),
            "    protocol: h2
    tls: { ca: ca.pem }
    health: { path: /healthz, interval: 100ms }
",
        ),
        &[("ca.pem", &ca.pem())],
    );
    eventually(
        std::time::Duration::from_secs(10),
        "two probes arrive over TLS in HTTP/2",
        || async { seen.versions.lock().unwrap().len() >= 2 },
    )
    .await;
    assert!(
        seen.versions
            .lock()
            .unwrap()
            .iter()
            .all(|v| *v == Version::HTTP_2)
    );
}

#[tokio::test]
async fn a_reload_with_unchanged_settings_keeps_the_warm_upstream_connection() {
    let (addr, seen, _task) = start_backend(None, true).await;
    let yaml = one_backend(&format!("http://{addr}"), "    protocol: h2\n");
    let (_dir, proxy) = proxy_with(&yaml, &[]);
    let (status, _, _) = get(&proxy.url("/hello"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    // Same backend settings, one more backend: a new snapshot, the same client.
    std::fs::write(
        &proxy.config_path,
        with_listeners(&format!(
            "{yaml}  other:\n    endpoints: [\"http://127.0.0.1:9\"]\n"
        ))
        .replace("default_backend: up\n", "")
            + "default_backend: up\n",
    )
    .unwrap();
    proxy.signal("HUP");
    eventually(
        std::time::Duration::from_secs(10),
        "the reload is applied",
        || async {
            proxy
                .metric("switchyard_config_reloads_total{result=\"success\"}")
                .await
                .unwrap_or(0.0)
                >= 1.0
        },
    )
    .await;
    let (status, _, _) = get(&proxy.url("/hello"), &[]).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        seen.connections.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "both requests used one HTTP/2 connection"
    );
}

#[tokio::test]
async fn grpc_exchange_keeps_te_and_trailers() {
    let (addr, seen, _task) = start_backend(None, true).await;
    let (_dir, proxy) = proxy_with(
        &one_backend(&format!("http://{addr}"), "    protocol: h2\n"),
        &[],
    );
    let stream = TcpStream::connect(proxy.http).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let message = Bytes::from_static(b"\0\0\0\0\x05hello");
    let request = Request::post(format!("http://{}/grpc", proxy.http))
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(Full::new(message.clone()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "application/grpc");
    let mut body = response.into_body();
    let mut data = Vec::new();
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("the response streams without error");
        if let Some(d) = frame.data_ref() {
            data.extend_from_slice(d);
        } else if let Some(t) = frame.trailers_ref() {
            trailers = Some(t.clone());
        }
    }
    let mut expected = message.to_vec();
    expected.extend_from_slice(b"\0\0\0\0\x02hi");
    assert_eq!(data, expected);
    let trailers = trailers.expect("trailers arrive");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "ok");
    assert_eq!(*seen.versions.lock().unwrap(), [Version::HTTP_2]);
    assert_eq!(
        *seen.te.lock().unwrap(),
        [Some("trailers".to_string())],
        "`te: trailers` reaches the backend"
    );
}

#[tokio::test]
async fn te_other_than_trailers_is_not_forwarded() {
    let (addr, seen, _task) = start_backend(None, false).await;
    let (_dir, proxy) = proxy_with(&one_backend(&format!("http://{addr}"), ""), &[]);
    let (status, _, _) = get(
        &proxy.url("/hello"),
        &[("te", "gzip"), ("connection", "te")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = get(
        &proxy.url("/hello"),
        &[("te", "gzip, trailers"), ("connection", "te")],
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        *seen.te.lock().unwrap(),
        [None, Some("trailers".to_string())]
    );
}

fn check(dir: &Path, yaml: &str) -> Vec<String> {
    let path = dir.join("switchyard.yaml");
    let text = with_listeners(yaml);
    std::fs::write(&path, &text).unwrap();
    match switchyard::config::parse(&text, &path) {
        Ok(_) => Vec::new(),
        Err(problems) => problems.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn check_reports_upstream_tls_problems_where_they_are_written() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = "backends:\n  up:\n    endpoints: [\"https://10.0.0.5:443\"]\n    tls: { ca: missing.pem }\ndefault_backend: up\n";
    let problems = check(dir.path(), yaml);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains(":7:16: cannot read CA file"),
        "{problems:?}"
    );

    std::fs::write(dir.path().join("notpem.crt"), "hello").unwrap();
    let yaml = "backends:\n  up:\n    endpoints: [\"https://10.0.0.5:443\"]\n    protocol: h3\n    tls:\n      client_cert: notpem.crt\n      client_key: notpem.crt\ndefault_backend: up\n";
    let problems = check(dir.path(), yaml);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].contains("`h3` is not an upstream protocol"));
    assert!(problems[1].contains(":9:20: ") && problems[1].contains("no PEM certificate"));

    let yaml = "backends:\n  up:\n    endpoints: [\"https://10.0.0.5:443\"]\n    tls: { insecure_skip_verify: true }\ndefault_backend: up\n";
    let problems = check(dir.path(), yaml);
    assert!(problems[0].contains("insecure_skip_verify"), "{problems:?}");

    let yaml = "backends:\n  up:\n    endpoints: [\"http://10.0.0.5:80\"]\n    tls: { server_name: a.example }\ndefault_backend: up\n";
    let problems = check(dir.path(), yaml);
    assert!(
        problems[0].contains("applies to `https://` endpoints"),
        "{problems:?}"
    );
}

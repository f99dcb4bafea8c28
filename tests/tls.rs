//! TLS termination end to end: each SNI name gets its own certificate (and a client without
//! SNI the default one), ALPN negotiates h2 and http/1.1 and both are proxied with
//! `X-Forwarded-Proto: https`, a certificate replaced on disk reaches new connections
//! without a restart, a broken replacement is counted and the old certificate keeps
//! serving, a stalled handshake is cut after `header_read`, and `check` points at a broken
//! certificate.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, ServerName};
use support::pki::{Issued, TestCa};
use support::*;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const WAIT: Duration = Duration::from_secs(10);
const TLS_SUCCESS: &str = "switchyard_tls_reloads_total{result=\"success\"}";
const TLS_FAILURE: &str = "switchyard_tls_reloads_total{result=\"failure\"}";

/// The test client trusts the CA's root and offers `alpn`.
impl TestCa {
    fn client(&self, alpn: &[&[u8]]) -> TlsConnector {
        let roots = self.roots();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsConnector::from(Arc::new(config))
    }
}

/// Writes `name.crt` and `name.key` the way a deploy tool would: each to a temporary file,
/// renamed over the old one.
fn install(dir: &Path, name: &str, issued: &Issued) {
    for (ext, text) in [("key", &issued.key_pem), ("crt", &issued.cert_pem)] {
        let tmp = dir.join(format!(".{name}.{ext}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(format!("{name}.{ext}"))).unwrap();
    }
}

/// Replaces one file atomically.
fn replace(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// A proxy with an HTTPS listener: `default.crt` (SANs `default.test` and 127.0.0.1) is the
/// default, `api.crt` (`api.example.com`) and `wild.crt` (`*.apps.example.com`) are chosen by
/// SNI. Also returns the temporary directory holding config and certificates.
struct Fixture {
    ca: TestCa,
    proxy: Switchyard,
    backend: Backend,
    dir: tempfile::TempDir,
    default: Issued,
    api: Issued,
}

async fn fixture(extra: &str) -> Fixture {
    let ca = TestCa::new();
    let backend = Backend::start("legacy").await;
    let (dir, path) = write_config(&format!(
        "listen:\n  http: \"127.0.0.1:0\"\n  https:\n    addr: \"127.0.0.1:0\"\n    cert: default.crt\n    key: default.key\n    certificates:\n      - {{ cert: api.crt, key: api.key }}\n      - {{ cert: wild.crt, key: wild.key }}\n\
admin: {{ listen: \"127.0.0.1:0\" }}\n{extra}\
backends:\n  legacy: {{ endpoints: [\"{}\"] }}\ndefault_backend: legacy\n",
        backend.url()
    ));
    let default = ca.issue(&["default.test", "127.0.0.1"], false);
    let api = ca.issue(&["api.example.com"], false);
    install(dir.path(), "default", &default);
    install(dir.path(), "api", &api);
    install(
        dir.path(),
        "wild",
        &ca.issue(&["*.apps.example.com"], false),
    );
    let proxy = Switchyard::start_file(&path);
    assert!(
        proxy.https.is_some(),
        "the listening line names the https address"
    );
    Fixture {
        ca,
        proxy,
        backend,
        dir,
        default,
        api,
    }
}

impl Fixture {
    fn https(&self) -> SocketAddr {
        self.proxy.https.unwrap()
    }

    /// A TLS connection sending `sni` (none for an IP address), offering `alpn`.
    async fn connect(&self, sni: &str, alpn: &[&[u8]]) -> TlsStream<TcpStream> {
        let tcp = TcpStream::connect(self.https()).await.unwrap();
        let name = ServerName::try_from(sni.to_string()).unwrap();
        self.ca
            .client(alpn)
            .connect(name, tcp)
            .await
            .unwrap_or_else(|e| panic!("TLS handshake for {sni}: {e}"))
    }

    /// The leaf certificate a fresh connection for `sni` is served.
    async fn served(&self, sni: &str) -> CertificateDer<'static> {
        let tls = self.connect(sni, &[b"http/1.1"]).await;
        tls.get_ref().1.peer_certificates().unwrap()[0].clone()
    }
}

fn dns_names(der: &CertificateDer<'_>) -> Vec<String> {
    webpki::EndEntityCert::try_from(der)
        .unwrap()
        .valid_dns_names()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sni_name_gets_its_own_certificate() {
    let f = fixture("").await;
    let api = f.served("api.example.com").await;
    assert_eq!(dns_names(&api), ["api.example.com"]);
    assert_eq!(api, f.api.der);

    let wild = f.served("shop.apps.example.com").await;
    assert_eq!(dns_names(&wild), ["*.apps.example.com"]);

    // No SNI (an IP address) and a name no certificate has: the default certificate.
    let no_sni = f.served("127.0.0.1").await;
    assert_eq!(no_sni, f.default.der);
    assert_eq!(dns_names(&no_sni), ["default.test"]);
    let tcp = TcpStream::connect(f.https()).await.unwrap();
    let unknown =
        f.ca.client(&[])
            .connect(ServerName::try_from("unknown.example.org").unwrap(), tcp)
            .await;
    assert!(
        unknown.is_err(),
        "an unknown name gets the default certificate, which the client rejects for that name"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_negotiates_h2_and_http1_and_both_are_proxied_as_https() {
    let f = fixture("").await;

    let tls = f.connect("api.example.com", &[b"h2", b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut h2, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    tokio::spawn(connection);
    let response = h2
        .send_request(
            Request::get("https://api.example.com/over/h2")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    let echo = body_json(response).await;
    assert_eq!(echo["path"], "/over/h2");
    assert_eq!(echo["headers"]["x-forwarded-proto"], "https");
    assert_eq!(echo["headers"]["host"], "api.example.com");

    let tls = f.connect("api.example.com", &[b"http/1.1"]).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut h1, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("http/1.1 handshake");
    tokio::spawn(connection);
    let response = h1
        .send_request(
            Request::get("/over/http1")
                .header("host", "api.example.com")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.version(), Version::HTTP_11);
    assert_eq!(response.status(), StatusCode::OK);
    let echo = body_json(response).await;
    assert_eq!(echo["path"], "/over/http1");
    assert_eq!(echo["headers"]["x-forwarded-proto"], "https");

    // The plain listener still says http.
    let (_, _, body) = get(&f.proxy.url("/plain"), &[]).await;
    let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["headers"]["x-forwarded-proto"], "http");
    assert_eq!(f.backend.requests(), 3);
}

async fn body_json(response: http::Response<hyper::body::Incoming>) -> serde_json::Value {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_replaced_on_disk_reaches_new_connections_without_a_restart() {
    let f = fixture("").await;
    // A connection made before the change keeps working afterwards.
    let before = f.connect("api.example.com", &[b"http/1.1"]).await;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(before))
        .await
        .unwrap();
    tokio::spawn(connection);
    assert_eq!(f.served("api.example.com").await, f.api.der);

    let renewed = f.ca.issue(&["api.example.com", "api2.example.com"], false);
    install(f.dir.path(), "api", &renewed);
    eventually(
        WAIT,
        "new connections to get the renewed certificate",
        || async { f.served("api.example.com").await == renewed.der },
    )
    .await;
    // Its new name is routed to it by SNI too.
    assert_eq!(f.served("api2.example.com").await, renewed.der);
    assert_eq!(
        f.served("127.0.0.1").await,
        f.default.der,
        "others untouched"
    );
    assert!(f.proxy.metric(TLS_SUCCESS).await.unwrap() >= 1.0);

    let response = sender
        .send_request(
            Request::get("/still-here")
                .header("host", "api.example.com")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .expect("a connection from before the reload still serves");
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_replacement_is_counted_and_the_old_certificate_keeps_serving() {
    let f = fixture("").await;
    assert_eq!(f.proxy.metric(TLS_FAILURE).await, Some(0.0));

    // Each step below changes one file atomically, so each is exactly one reload.
    // A key that belongs to another certificate.
    let other = f.ca.issue(&["api.example.com"], false);
    replace(f.dir.path(), "api.key", &other.key_pem);
    eventually(WAIT, "the mismatched key to be counted", || async {
        f.proxy.metric(TLS_FAILURE).await == Some(1.0)
    })
    .await;
    assert_eq!(f.served("api.example.com").await, f.api.der);

    // A truncated certificate, as a failed copy leaves it.
    let half = &other.cert_pem[..other.cert_pem.len() / 2];
    replace(f.dir.path(), "api.crt", half);
    eventually(WAIT, "the broken certificate to be counted", || async {
        f.proxy.metric(TLS_FAILURE).await == Some(2.0)
    })
    .await;
    assert_eq!(f.served("api.example.com").await, f.api.der);
    assert_eq!(
        f.served("127.0.0.1").await,
        f.default.der,
        "others untouched"
    );
    assert_eq!(f.proxy.metric(TLS_SUCCESS).await, Some(0.0));

    // Fixing the files is picked up.
    install(f.dir.path(), "api", &other);
    eventually(WAIT, "the repaired pair to be served", || async {
        f.served("api.example.com").await == other.der
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_handshake_is_cut_after_header_read() {
    let f = fixture("timeouts: { header_read: 500ms }\n").await;
    let started = Instant::now();
    let mut tcp = TcpStream::connect(f.https()).await.unwrap();
    // Not a byte of ClientHello.
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(WAIT, tcp.read(&mut buf)).await;
    let elapsed = started.elapsed();
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the connection was not closed: {read:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(500),
        "closed after {elapsed:?}, before header_read"
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "closed only after {elapsed:?}"
    );
    // The accept loop was never blocked by it.
    assert_eq!(f.served("api.example.com").await, f.api.der);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_points_at_a_broken_certificate() {
    let ca = TestCa::new();
    let (dir, path) = write_config(
        "listen:\n  http: \"127.0.0.1:0\"\n  https:\n    addr: \"127.0.0.1:0\"\n    cert: good.crt\n    key: good.key\n    certificates:\n      - { cert: bad.crt, key: good.key }\n\
backends:\n  legacy: { endpoints: [\"http://127.0.0.1:9\"] }\ndefault_backend: legacy\n",
    );
    install(dir.path(), "good", &ca.issue(&["good.test"], false));
    std::fs::write(dir.path().join("bad.crt"), "not a certificate").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    // The harness puts one `state:` line in front of the text, so the entry is on line 9;
    // column 17 is the `bad.crt` value.
    let expected = format!("{}:9:17: ", path.display());
    assert!(
        stdout.starts_with(&expected) && stdout.contains("bad.crt holds no PEM certificate"),
        "{stdout}"
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");

    // Fixed, it passes.
    std::fs::copy(dir.path().join("good.crt"), dir.path().join("bad.crt")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A `generated` sticky cookie minted for a request that came over HTTPS is `Secure`; over
/// plain HTTP it cannot be (the browser would drop it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_cookie_is_secure_over_https() {
    use tokio::io::AsyncWriteExt;
    let f = fixture(
        "routes:\n  - { name: r, match: { path_prefix: /s }, legacy: legacy, target: legacy, split: { percentage: { weight: 50 } }, sticky: { key: generated } }\n",
    )
    .await;
    let mut tls = f.connect("default.test", &[b"http/1.1"]).await;
    tls.write_all(b"GET /s HTTP/1.1\r\nHost: default.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut out)).await;
    let answer = String::from_utf8_lossy(&out).to_ascii_lowercase();
    let cookie = answer
        .lines()
        .find(|l| l.starts_with("set-cookie: switchyard_id="))
        .unwrap_or_else(|| panic!("no cookie in {answer}"));
    assert!(cookie.ends_with("; secure"), "{cookie}");

    let (_, headers, _) = get(&f.proxy.url("/s"), &[]).await;
    let plain = headers["set-cookie"].to_str().unwrap();
    assert!(!plain.to_ascii_lowercase().contains("secure"), "{plain}");
}

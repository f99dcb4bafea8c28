//! Clients towards backends: one pooled hyper client per distinct upstream setting
//! (protocol, TLS roots, SNI override, client certificate), shared by every backend that
//! uses that setting and kept across reloads while a snapshot still holds it.
//!
//! `https://` endpoints are verified against the system roots, or against `tls.ca` when set
//! (which then replaces them). Verification cannot be turned off. `protocol: h2` speaks
//! HTTP/2 only: ALPN `h2` over TLS, prior knowledge (h2c) over `http://`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use sha2::{Digest, Sha256};

use super::proxy::UpstreamBody;
use super::tls::{PROVIDER, TlsError, load_certificate};
use crate::config::files::{MAX_SMALL_FILE_BYTES, read_bounded};
use crate::config::{BackendSpec, Timeouts, UpstreamProtocol, UpstreamTls};

pub type UpstreamConnector = HttpsConnector<HttpConnector>;

/// A pooled client and the protocol it speaks.
pub struct UpstreamClient {
    pub protocol: UpstreamProtocol,
    pub client: Client<UpstreamConnector, UpstreamBody>,
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient")
            .field("protocol", &self.protocol)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamTlsError {
    #[error("cannot read CA file {path}: {source}")]
    ReadCa {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)")]
    NoCa { path: PathBuf },
    #[error("{path} is not a valid PEM CA certificate: {detail}")]
    BadCa { path: PathBuf, detail: String },
    #[error(transparent)]
    ClientCert(#[from] TlsError),
}

/// The certificates of a `tls.ca` file, each checked to be a usable trust anchor.
pub fn load_roots(path: &Path) -> Result<RootCertStore, UpstreamTlsError> {
    let pem =
        read_bounded(path, MAX_SMALL_FILE_BYTES).map_err(|source| UpstreamTlsError::ReadCa {
            path: path.to_path_buf(),
            source,
        })?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| UpstreamTlsError::BadCa {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(UpstreamTlsError::NoCa {
            path: path.to_path_buf(),
        });
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| UpstreamTlsError::BadCa {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// The operating system's trust store, read once, on first use by an `https://` backend
/// without `tls.ca`.
static SYSTEM_ROOTS: LazyLock<Arc<RootCertStore>> = LazyLock::new(|| {
    let found = rustls_native_certs::load_native_certs();
    for error in &found.errors {
        tracing::warn!(error = %error, "cannot read a system CA certificate");
    }
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(found.certs);
    if roots.is_empty() {
        tracing::warn!(
            "no system CA certificates found: https:// endpoints without `tls.ca` will fail verification"
        );
    }
    Arc::new(roots)
});

/// Everything that makes two clients different. File contents are part of it (as a
/// digest), so a reload after a CA or client certificate was replaced builds a new client.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ClientKey {
    protocol: UpstreamProtocol,
    https: bool,
    tls: UpstreamTls,
    files: [u8; 32],
}

/// The clients in use, by setting. Held weakly: a client lives as long as a snapshot uses
/// it, so a reload with unchanged settings keeps its warm connections.
pub struct UpstreamClients {
    connect: Duration,
    idle: Duration,
    clients: Mutex<HashMap<ClientKey, Weak<UpstreamClient>>>,
}

impl UpstreamClients {
    /// `timeouts.connect` and `timeouts.idle` are fixed here, at start.
    pub fn new(timeouts: &Timeouts) -> UpstreamClients {
        UpstreamClients {
            connect: timeouts.connect,
            idle: timeouts.idle,
            clients: Mutex::new(HashMap::new()),
        }
    }

    pub fn client_for(&self, spec: &BackendSpec) -> Arc<UpstreamClient> {
        let https = spec
            .endpoints
            .iter()
            .any(|e| e.scheme == http::uri::Scheme::HTTPS);
        let key = ClientKey {
            protocol: spec.protocol,
            https,
            tls: spec.tls.clone(),
            files: digest_files(&spec.tls),
        };
        let mut clients = self
            .clients
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        clients.retain(|_, client| client.strong_count() > 0);
        if let Some(client) = clients.get(&key).and_then(Weak::upgrade) {
            return client;
        }
        let client = Arc::new(self.build(&spec.name, &key));
        clients.insert(key, Arc::downgrade(&client));
        client
    }

    fn build(&self, backend: &str, key: &ClientKey) -> UpstreamClient {
        let config = if key.https {
            tls_config(&key.tls).unwrap_or_else(|e| {
                // Validation read these files moments ago; if they broke since, fail closed:
                // no root is trusted, so every TLS connection of this backend fails.
                tracing::error!(backend, error = %e, "cannot set up upstream TLS; its https:// endpoints will fail");
                unverifiable()
            })
        } else {
            unverifiable()
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(self.connect));
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(60)));
        let builder = HttpsConnectorBuilder::new()
            .with_tls_config(config)
            .https_or_http();
        let builder = match key
            .tls
            .server_name
            .as_deref()
            .and_then(|n| ServerName::try_from(n.to_string()).ok())
        {
            Some(name) => builder.with_server_name_resolver(FixedServerNameResolver::new(name)),
            None => builder,
        };
        let connector = match key.protocol {
            UpstreamProtocol::Http1 => builder.enable_http1().wrap_connector(http),
            UpstreamProtocol::H2 => builder.enable_http2().wrap_connector(http),
        };
        let mut client = Client::builder(TokioExecutor::new());
        client
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(self.idle);
        if key.protocol == UpstreamProtocol::H2 {
            client.http2_only(true).timer(TokioTimer::new());
        }
        UpstreamClient {
            protocol: key.protocol,
            client: client.build(connector),
        }
    }
}

fn digest_files(tls: &UpstreamTls) -> [u8; 32] {
    let mut digest = Sha256::new();
    let files = tls.ca.iter().chain(
        tls.client_cert
            .iter()
            .flat_map(|pair| [&pair.cert, &pair.key]),
    );
    for file in files {
        let bytes = read_bounded(file, MAX_SMALL_FILE_BYTES).unwrap_or_default();
        digest.update((bytes.len() as u64).to_le_bytes());
        digest.update(&bytes);
    }
    digest.finalize().into()
}

fn tls_config(tls: &UpstreamTls) -> Result<ClientConfig, UpstreamTlsError> {
    let roots = match &tls.ca {
        Some(path) => Arc::new(load_roots(path)?),
        None => SYSTEM_ROOTS.clone(),
    };
    let builder = ClientConfig::builder_with_provider(PROVIDER.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| UpstreamTlsError::ClientCert(TlsError::Setup(e)))?
        .with_root_certificates(roots);
    Ok(match &tls.client_cert {
        Some(files) => {
            let loaded = load_certificate(files)?;
            builder.with_client_cert_resolver(Arc::new(FixedClientCert(loaded.key)))
        }
        None => builder.with_no_client_auth(),
    })
}

/// Trusts nothing: for clients that never make a TLS connection, and for failing closed.
fn unverifiable() -> ClientConfig {
    ClientConfig::builder_with_provider(PROVIDER.clone())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions")
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth()
}

/// Presents the one configured certificate whenever a backend asks for one.
#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for FixedClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

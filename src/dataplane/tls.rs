//! TLS termination for the HTTPS listener: certificates read from PEM files, one chosen per
//! handshake by SNI, ALPN `h2` and `http/1.1`, and a background job that reloads the files
//! when they change.
//!
//! A broken new file is refused, logged and counted; the last good certificate of that pair
//! keeps serving. This module knows nothing about HTTP: the listener hands the decrypted
//! stream to the same hyper builder as a plain connection. Only the ring provider is used.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use notify::{RecursiveMode, Watcher};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

use crate::config::files::{MAX_SMALL_FILE_BYTES, read_bounded};
use crate::config::{CertificateFiles, HttpsListen};
use crate::lifecycle::Shutdown;
use crate::telemetry::Metrics;
use crate::telemetry::metrics::ReloadResult;

/// ALPN protocol ids, in the server's order of preference.
pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate file {path}: {source}")]
    ReadCert {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read key file {path}: {source}")]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate (`-----BEGIN CERTIFICATE-----`)")]
    NoCertificate { path: PathBuf },
    #[error("{path} is not a valid PEM certificate chain: {detail}")]
    BadCertificate { path: PathBuf, detail: String },
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC)")]
    NoKey { path: PathBuf },
    #[error("{path} holds a private key that cannot be used: {detail}")]
    BadKey { path: PathBuf, detail: String },
    #[error("the key in {key} does not belong to the certificate in {cert}")]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("cannot watch {path}: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
    #[error("cannot install the SIGHUP handler for certificate reload: {0}")]
    Signal(std::io::Error),
    #[error("cannot set up TLS: {0}")]
    Setup(rustls::Error),
}

impl TlsError {
    /// Whether the problem is in the key file rather than the certificate file, so config
    /// diagnostics can point at the right key.
    pub fn is_about_key(&self) -> bool {
        matches!(
            self,
            TlsError::ReadKey { .. }
                | TlsError::NoKey { .. }
                | TlsError::BadKey { .. }
                | TlsError::Mismatch { .. }
        )
    }
}

/// The one crypto provider: ring, chosen explicitly so no other provider is ever linked in
/// or picked up as a process default.
pub(crate) static PROVIDER: LazyLock<Arc<CryptoProvider>> =
    LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));

/// A certificate chain with its signing key, and the DNS names SNI can choose it by.
#[derive(Debug, Clone)]
pub struct LoadedCertificate {
    pub key: Arc<CertifiedKey>,
    /// Lower-case SAN DNS names, wildcards as `*.example.com`.
    pub names: Vec<String>,
}

/// Reads and checks one certificate/key pair: PEM parses, the key is usable, and it belongs
/// to the first certificate of the chain.
pub fn load_certificate(files: &CertificateFiles) -> Result<LoadedCertificate, TlsError> {
    let (cert, key) = read_pair(files)?;
    parse_pair(files, &cert, &key)
}

fn read_pair(files: &CertificateFiles) -> Result<(Vec<u8>, Vec<u8>), TlsError> {
    let cert =
        read_bounded(&files.cert, MAX_SMALL_FILE_BYTES).map_err(|source| TlsError::ReadCert {
            path: files.cert.clone(),
            source,
        })?;
    let key =
        read_bounded(&files.key, MAX_SMALL_FILE_BYTES).map_err(|source| TlsError::ReadKey {
            path: files.key.clone(),
            source,
        })?;
    Ok((cert, key))
}

fn parse_pair(
    files: &CertificateFiles,
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<LoadedCertificate, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate {
            path: files.cert.clone(),
            detail: e.to_string(),
        })?;
    let Some(leaf) = chain.first() else {
        return Err(TlsError::NoCertificate {
            path: files.cert.clone(),
        });
    };
    let names = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| TlsError::BadCertificate {
            path: files.cert.clone(),
            detail: e.to_string(),
        })?
        .valid_dns_names()
        .map(str::to_ascii_lowercase)
        .collect();
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => TlsError::NoKey {
            path: files.key.clone(),
        },
        other => TlsError::BadKey {
            path: files.key.clone(),
            detail: other.to_string(),
        },
    })?;
    let certified = CertifiedKey::from_der(chain, key, &PROVIDER).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => TlsError::Mismatch {
            cert: files.cert.clone(),
            key: files.key.clone(),
        },
        other => TlsError::BadKey {
            path: files.key.clone(),
            detail: other.to_string(),
        },
    })?;
    Ok(LoadedCertificate {
        key: Arc::new(certified),
        names,
    })
}

/// The certificates in force, indexed for the handshake: built whole and swapped whole.
#[derive(Debug)]
struct CertSet {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.example.com` is stored under `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl CertSet {
    /// `loaded[0]` is the default. A name several certificates carry goes to the first
    /// of them, in the order of the config file.
    fn build(loaded: &[LoadedCertificate]) -> CertSet {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for cert in loaded {
            for name in &cert.names {
                let table = match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_string()),
                    None => exact.entry(name.clone()),
                };
                table.or_insert_with(|| cert.key.clone());
            }
        }
        CertSet {
            default: loaded[0].key.clone(),
            exact,
            wildcard,
        }
    }

    /// Exact name, then a wildcard one label up (`*.example.com` covers `a.example.com`,
    /// not `example.com` nor `a.b.example.com`, as RFC 6125 has it), then the default.
    fn resolve(&self, server_name: Option<&str>) -> &Arc<CertifiedKey> {
        let Some(name) = server_name else {
            return &self.default;
        };
        // rustls hands SNI over lower-cased.
        if let Some(key) = self.exact.get(name) {
            return key;
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .unwrap_or(&self.default)
    }
}

/// rustls asks this for a certificate during each handshake; the reloader stores into it.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<CertSet>,
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .load()
                .resolve(client_hello.server_name())
                .clone(),
        )
    }
}

/// The HTTPS listener's TLS side: the acceptor for connections and the reloader that keeps
/// its certificates current.
pub struct TlsTerminator {
    acceptor: TlsAcceptor,
    resolver: Arc<CertResolver>,
    files: Vec<CertificateFiles>,
    loaded: Vec<LoadedCertificate>,
}

impl TlsTerminator {
    /// Loads every certificate of `listen.https`; any that fails stops the start.
    pub fn load(spec: &HttpsListen) -> Result<TlsTerminator, TlsError> {
        let loaded = spec
            .certificates
            .iter()
            .map(load_certificate)
            .collect::<Result<Vec<_>, _>>()?;
        let resolver = Arc::new(CertResolver {
            current: ArcSwap::from_pointee(CertSet::build(&loaded)),
        });
        let mut config = ServerConfig::builder_with_provider(PROVIDER.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Setup)?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()];
        Ok(TlsTerminator {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            resolver,
            files: spec.certificates.clone(),
            loaded,
        })
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// The background job that reloads the certificate files; see `CertReloader::start`.
    pub fn reloader(&self, metrics: Arc<Metrics>) -> CertReloader {
        CertReloader {
            files: self.files.clone(),
            resolver: self.resolver.clone(),
            metrics,
            // What was loaded at start is the last good state.
            loaded: self.loaded.clone(),
            attempted: self.files.iter().map(|f| read_pair(f).ok()).collect(),
        }
    }
}

/// Events this close together are one change: a pair is usually written as two files, and
/// a Kubernetes Secret volume swaps a symlink in several steps.
const SETTLE: Duration = Duration::from_millis(100);

/// Reloads certificates when their files change or on SIGHUP.
pub struct CertReloader {
    files: Vec<CertificateFiles>,
    resolver: Arc<CertResolver>,
    metrics: Arc<Metrics>,
    /// Last good certificate of each pair, in config order.
    loaded: Vec<LoadedCertificate>,
    /// File contents last tried per pair, so an unrelated event in the same directory
    /// neither reloads an unchanged pair nor counts a broken one twice.
    attempted: Vec<Option<(Vec<u8>, Vec<u8>)>>,
}

impl CertReloader {
    /// Starts watching the directories of every certificate and key file (not the files:
    /// editors replace by rename and a Secret volume swaps a `..data` symlink, both of which
    /// would end a watch on the file itself). The task ends when `shutdown` fires.
    pub fn start(
        mut self,
        mut shutdown: Shutdown,
    ) -> Result<tokio::task::JoinHandle<()>, TlsError> {
        let mut hangups = signal(SignalKind::hangup()).map_err(TlsError::Signal)?;
        let (tx, mut changes) = mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok_and(|e| !e.kind.is_access()) {
                    let _ = tx.send(());
                }
            })
            .map_err(|source| TlsError::Watch {
                path: PathBuf::new(),
                source,
            })?;
        let mut dirs: Vec<&Path> = self
            .files
            .iter()
            .flat_map(|f| [&f.cert, &f.key])
            .map(|p| {
                p.parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."))
            })
            .collect();
        dirs.sort_unstable();
        dirs.dedup();
        for dir in dirs {
            watcher
                .watch(dir, RecursiveMode::NonRecursive)
                .map_err(|source| TlsError::Watch {
                    path: dir.to_path_buf(),
                    source,
                })?;
        }
        Ok(tokio::spawn(async move {
            // Moved in so the watch lives exactly as long as the task.
            let _watcher = watcher;
            loop {
                tokio::select! {
                    _ = hangups.recv() => {}
                    Some(()) = changes.recv() => {
                        tokio::time::sleep(SETTLE).await;
                        while changes.try_recv().is_ok() {}
                    }
                    _ = shutdown.wait() => return,
                }
                self.reload();
            }
        }))
    }

    /// Re-reads every pair; each that changed and loads replaces its predecessor, each that
    /// fails keeps its last good certificate. One reload counts once, as a failure if any
    /// pair failed.
    fn reload(&mut self) {
        let mut changed = false;
        let mut failed = false;
        for (i, files) in self.files.iter().enumerate() {
            let pair = match read_pair(files) {
                Ok(pair) => pair,
                Err(e) => {
                    // A file missing for a moment mid-rename is not worth an alert yet; its
                    // reappearance is another event.
                    tracing::warn!(error = %e, "certificate reload skipped a pair it cannot read; the last good certificate keeps serving");
                    continue;
                }
            };
            if self.attempted[i].as_ref() == Some(&pair) {
                continue;
            }
            let result = parse_pair(files, &pair.0, &pair.1);
            self.attempted[i] = Some(pair);
            match result {
                Ok(cert) => {
                    tracing::info!(cert = %files.cert.display(), names = ?cert.names, "certificate reloaded");
                    self.loaded[i] = cert;
                    changed = true;
                }
                Err(e) => {
                    tracing::error!(error = %e, "certificate reload refused; the last good certificate keeps serving");
                    failed = true;
                }
            }
        }
        if changed {
            self.resolver
                .current
                .store(Arc::new(CertSet::build(&self.loaded)));
        }
        if failed {
            self.metrics.tls_reload(ReloadResult::Failure);
        } else if changed {
            self.metrics.tls_reload(ReloadResult::Success);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let cert = rcgen::generate_simple_self_signed(names).unwrap();
        (cert.cert.pem(), cert.signing_key.serialize_pem())
    }

    fn write_pair(dir: &Path, stem: &str, pem: &(String, String)) -> CertificateFiles {
        let files = CertificateFiles {
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        };
        std::fs::write(&files.cert, &pem.0).unwrap();
        std::fs::write(&files.key, &pem.1).unwrap();
        files
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_default() {
        let dir = tempfile::tempdir().unwrap();
        let default = load_certificate(&write_pair(
            dir.path(),
            "default",
            &self_signed(&["default.test"]),
        ))
        .unwrap();
        let api = load_certificate(&write_pair(
            dir.path(),
            "api",
            &self_signed(&["API.example.com"]),
        ))
        .unwrap();
        let wild = load_certificate(&write_pair(
            dir.path(),
            "wild",
            &self_signed(&["*.example.com"]),
        ))
        .unwrap();
        assert_eq!(api.names, ["api.example.com"], "names are lower-cased");
        let set = CertSet::build(&[default.clone(), api.clone(), wild.clone()]);
        let is = |a: &Arc<CertifiedKey>, b: &LoadedCertificate| Arc::ptr_eq(a, &b.key);
        assert!(is(set.resolve(Some("api.example.com")), &api));
        assert!(is(set.resolve(Some("www.example.com")), &wild));
        assert!(is(set.resolve(Some("a.b.example.com")), &default));
        assert!(is(set.resolve(Some("example.com")), &default));
        assert!(is(set.resolve(Some("other.test")), &default));
        assert!(is(set.resolve(None), &default));
    }

    #[test]
    fn broken_files_are_reported_against_the_right_file() {
        let dir = tempfile::tempdir().unwrap();
        let good = write_pair(dir.path(), "good", &self_signed(&["a.test"]));
        let other = write_pair(dir.path(), "other", &self_signed(&["b.test"]));

        let mismatched = CertificateFiles {
            cert: good.cert.clone(),
            key: other.key.clone(),
        };
        let e = load_certificate(&mismatched).unwrap_err();
        assert!(matches!(e, TlsError::Mismatch { .. }), "{e}");
        assert!(e.is_about_key());

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not pem at all").unwrap();
        let e = load_certificate(&CertificateFiles {
            cert: garbage.clone(),
            key: good.key.clone(),
        })
        .unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
        assert!(!e.is_about_key());
        let e = load_certificate(&CertificateFiles {
            cert: good.cert.clone(),
            key: garbage,
        })
        .unwrap_err();
        assert!(matches!(e, TlsError::NoKey { .. }), "{e}");

        let e = load_certificate(&CertificateFiles {
            cert: dir.path().join("missing.crt"),
            key: good.key.clone(),
        })
        .unwrap_err();
        assert!(matches!(e, TlsError::ReadCert { .. }), "{e}");
    }

    #[test]
    fn a_broken_replacement_keeps_the_last_good_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_pair(dir.path(), "site", &self_signed(&["old.test"]));
        let spec = HttpsListen {
            addr: "127.0.0.1:0".parse().unwrap(),
            certificates: vec![files.clone()],
        };
        let terminator = TlsTerminator::load(&spec).unwrap();
        let metrics = Arc::new(Metrics::new());
        let mut reloader = terminator.reloader(metrics.clone());
        let current = || reloader_default_names(&terminator);

        // Unchanged files: nothing happens, nothing is counted.
        reloader.reload();
        assert_eq!(current(), ["old.test"]);
        assert!(
            !metrics
                .encode()
                .contains("tls_reloads_total{result=\"success\"} 1")
        );

        std::fs::write(&files.cert, "-----BEGIN CERTIFICATE-----\nbroken\n").unwrap();
        reloader.reload();
        assert_eq!(current(), ["old.test"], "the old certificate keeps serving");
        assert!(
            metrics
                .encode()
                .contains("switchyard_tls_reloads_total{result=\"failure\"} 1")
        );
        // The same broken content seen again is not a second failure.
        reloader.reload();
        assert!(
            metrics
                .encode()
                .contains("switchyard_tls_reloads_total{result=\"failure\"} 1")
        );

        write_pair(dir.path(), "site", &self_signed(&["new.test"]));
        reloader.reload();
        assert_eq!(current(), ["new.test"]);
        assert!(
            metrics
                .encode()
                .contains("switchyard_tls_reloads_total{result=\"success\"} 1")
        );
    }

    /// The SAN names of the certificate a client without SNI gets.
    fn reloader_default_names(terminator: &TlsTerminator) -> Vec<String> {
        let set = terminator.resolver.current.load();
        let leaf = set.default.end_entity_cert().unwrap();
        webpki::EndEntityCert::try_from(leaf)
            .unwrap()
            .valid_dns_names()
            .map(str::to_string)
            .collect()
    }
}

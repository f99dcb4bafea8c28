//! The one outbound client speaks https: a webhook receiver and a webhook gate behind TLS
//! (certificates from a throwaway CA, trusted by `switchyard serve` through `SSL_CERT_FILE`)
//! get their calls and let a rollout through, and `switchyard ctl --admin https://…` works
//! with `--cacert`, and refuses a certificate it was not told to trust.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use support::pki::{Issued, TestCa};
use support::*;
use tokio::net::{TcpListener, TcpStream};

/// Terminates TLS with `cert` on an ephemeral loopback port and relays the plaintext to
/// `upstream`, as a TLS ingress in front of a plain service does.
async fn tls_front(
    upstream: SocketAddr,
    cert: &Issued,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use rustls_pki_types::pem::PemObject;
    let certs = rustls_pki_types::CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let Ok(mut plain) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_webhooks_gates_and_admin_urls_work_with_a_trusted_ca() {
    let ca = TestCa::new();
    let cert = ca.issue(&["127.0.0.1"], false);
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();

    let legacy = Backend::start("legacy").await;
    let target = Backend::start("target").await;
    let hook = Switchable::start("hook").await;
    let gate = Switchable::start("gate").await;
    let (hook_tls, _h) = tls_front(hook.addr, &cert).await;
    let (gate_tls, _g) = tls_front(gate.addr, &cert).await;
    let yaml = users_route(
        &legacy.url(),
        &target.url(),
        "{ percentage: { weight: 0 } }",
        &format!(
            "    rollout:\n      steps: [50, 100]\n      bake: 300ms\n      webhooks:\n\
             \x20       - {{ url: \"https://{hook_tls}/events\", on: [step, promoted] }}\n\
             \x20       - {{ url: \"https://{gate_tls}/gate\", on: [gate] }}\n"
        ),
    );
    let (_config_dir, path) = write_config(&yaml);
    let ca_env = ca_file.display().to_string();
    let proxy = Switchyard::start_env(&path, &[], &[("SSL_CERT_FILE", &ca_env)]);

    // The gate answers 200 over TLS, so the rollout goes through; without an answer it
    // would hold forever.
    let (status, body) = admin_call(&proxy, "POST", "/v1/rollouts/users/start", "").await;
    assert_eq!(status, 200, "{body}");
    wait_rollout(&proxy, "users", Duration::from_secs(15), "promoted", |v| {
        v["state"] == "promoted"
    })
    .await;
    let asked = gate.bodies();
    assert!(
        asked
            .iter()
            .any(|b| b["event"] == "gate" && b["route"] == "users"),
        "{asked:?}"
    );
    eventually(
        Duration::from_secs(5),
        "the https webhook receives step and promoted",
        || async {
            let got = hook.bodies();
            got.iter().any(|b| b["event"] == "step") && got.iter().any(|b| b["event"] == "promoted")
        },
    )
    .await;

    // ctl against an https admin URL: trusted with --cacert, refused without it.
    let (admin_tls, _a) = tls_front(proxy.admin, &cert).await;
    let admin = format!("https://{admin_tls}");
    let run = |extra: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args(["ctl", "--admin", &admin, "--token", TOKEN])
            .args(extra)
            .env_remove("SSL_CERT_FILE")
            .env_remove("SWITCHYARD_ADMIN_CA")
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let ca_arg = ca_file.display().to_string();
    let (code, out, err) = run(&[
        "rollout", "status", "users", "-o", "json", "--cacert", &ca_arg,
    ]);
    assert_eq!(code, Some(0), "{err}");
    let view: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(view["state"], "promoted");
    let (code, _, err) = run(&["routes"]);
    assert_eq!(code, Some(1), "an unknown issuer is refused");
    assert!(
        err.contains("unreachable") && err.to_lowercase().contains("certificate"),
        "{err}"
    );
}

//! The one HTTP client for switchyard's own outbound calls: webhooks, webhook gates, `ctl`
//! and the demo's admin calls. reqwest over rustls (ring), trusting the system's roots
//! (`rustls-native-certs`, which honours `SSL_CERT_FILE` and `SSL_CERT_DIR`) plus, when
//! given, one extra CA file. Timeouts and the retry schedule live here and nowhere else.
//!
//! Not for proxied traffic or health probes: those use the backend's own pooled client
//! (`dataplane::upstream`), whose TLS settings come from the backend's config.

use std::path::Path;
use std::sync::LazyLock;
use std::time::Duration;

/// How long one outbound call may take, connect included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Delays before each attempt of a call that is retried (webhook announcements).
pub const RETRY_SCHEDULE: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(500),
    Duration::from_secs(2),
];

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error(transparent)]
    Ca(#[from] crate::dataplane::upstream::UpstreamTlsError),
    #[error("cannot build the HTTP client: {0}")]
    Build(String),
}

/// A configured client. Cheap to clone (reqwest's client is a handle to a shared pool).
#[derive(Clone, Debug)]
pub struct Outbound {
    client: reqwest::Client,
}

static SHARED: LazyLock<Outbound> = LazyLock::new(|| {
    Outbound::new(None, CALL_TIMEOUT).unwrap_or_else(|e| {
        tracing::error!(error = %e, "outbound HTTP client without TLS roots");
        Outbound {
            client: reqwest::Client::new(),
        }
    })
});

impl Outbound {
    /// A client trusting the system roots and, if `ca` is given, the certificates in that
    /// PEM file too. `timeout` bounds each call (connect, send, and reading the answer).
    pub fn new(ca: Option<&Path>, timeout: Duration) -> Result<Outbound, OutboundError> {
        let mut roots = rustls::RootCertStore::empty();
        let found = rustls_native_certs::load_native_certs();
        for error in &found.errors {
            tracing::debug!(error = %error, "cannot read a system CA certificate");
        }
        roots.add_parsable_certificates(found.certs);
        if let Some(path) = ca {
            roots
                .roots
                .extend(crate::dataplane::upstream::load_roots(path)?.roots);
        }
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| OutboundError::Build(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("switchyard/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| OutboundError::Build(e.to_string()))?;
        Ok(Outbound { client })
    }

    /// The process-wide client with system roots, for webhooks.
    pub fn shared() -> &'static Outbound {
        &SHARED
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// POSTs `body` as JSON once and returns the status code, or why there was none
    /// (unusable URL, refused, TLS failure, timeout), with the error's causes.
    pub async fn post_json(
        &self,
        url: &str,
        body: &serde_json::Value,
        timeout: Duration,
    ) -> Result<u16, String> {
        let sent = self
            .client
            .post(url)
            .timeout(timeout)
            .json(body)
            .send()
            .await;
        match sent {
            Ok(response) => Ok(response.status().as_u16()),
            Err(e) if e.is_timeout() => Err(format!("no answer within {}s", timeout.as_secs_f64())),
            Err(e) => Err(error_chain(&e)),
        }
    }

    /// POSTs `body` on `RETRY_SCHEDULE` until one answer is 2xx. `Err` holds the last
    /// failure when every attempt failed.
    pub async fn post_json_retrying(
        &self,
        url: &str,
        body: &serde_json::Value,
    ) -> Result<u16, String> {
        let mut last = String::new();
        for delay in RETRY_SCHEDULE {
            tokio::time::sleep(delay).await;
            match self.post_json(url, body, CALL_TIMEOUT).await {
                Ok(code) if (200..300).contains(&code) => return Ok(code),
                Ok(code) => last = format!("answered {code}"),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

/// An error with its causes, `outer: inner: …`: reqwest's own text alone ("error sending
/// request") does not say whether DNS, TCP or TLS failed.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

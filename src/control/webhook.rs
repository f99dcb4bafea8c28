//! Webhooks: POSTs announcing rollout events (`rollback`, later `step`, `promoted`, …) to
//! the URLs a route names, with retries. Fire and forget: a slow or dead receiver never
//! holds up a rollback.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::config::Webhook;

const ATTEMPTS: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(500),
    Duration::from_secs(2),
];
const TIMEOUT: Duration = Duration::from_secs(5);

/// Sends `payload` to every webhook subscribed to `event`, each in its own task.
pub fn announce(webhooks: &[Webhook], event: &'static str, payload: serde_json::Value) {
    for hook in webhooks.iter().filter(|w| w.on.iter().any(|e| e == event)) {
        let url = hook.url.clone();
        let body = Bytes::from(payload.to_string());
        tokio::spawn(async move {
            let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
            for (attempt, delay) in ATTEMPTS.iter().enumerate() {
                tokio::time::sleep(*delay).await;
                let request = match http::Request::post(&url)
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(body.clone()))
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(%url, error = %e, "webhook URL is unusable");
                        return;
                    }
                };
                match tokio::time::timeout(TIMEOUT, client.request(request)).await {
                    Ok(Ok(r)) if r.status().is_success() => return,
                    Ok(Ok(r)) => {
                        tracing::warn!(%url, event, attempt, status = %r.status(), "webhook refused")
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(%url, event, attempt, error = %e, "webhook failed")
                    }
                    Err(_) => tracing::warn!(%url, event, attempt, "webhook timed out"),
                }
            }
            tracing::error!(%url, event, "webhook gave up after {} attempts", ATTEMPTS.len());
        });
    }
}

/// Asks a webhook gate once: POSTs `payload` and returns the status code, or why there was
/// none (refused, timed out). The caller decides what a code means.
pub async fn ask(url: &str, payload: &serde_json::Value, timeout: Duration) -> Result<u16, String> {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let request = http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(payload.to_string())))
        .map_err(|e| format!("unusable URL: {e}"))?;
    match tokio::time::timeout(timeout, client.request(request)).await {
        Ok(Ok(r)) => Ok(r.status().as_u16()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {}s", timeout.as_secs_f64())),
    }
}

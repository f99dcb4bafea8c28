//! Webhooks: POSTs announcing rollout events (`rollback`, `step`, `promoted`, …) to the URLs
//! a route names, and the one-shot asks of webhook gates. Fire and forget: a slow or dead
//! receiver never holds up a rollback. http:// and https:// alike, through the one
//! outbound client (`crate::outbound`), which owns timeouts, retries and trusted roots.

use std::time::Duration;

use crate::config::Webhook;
use crate::outbound::Outbound;

/// Sends `payload` to every webhook subscribed to `event`, each in its own task, retried
/// on `outbound::RETRY_SCHEDULE` until it answers 2xx.
pub fn announce(webhooks: &[Webhook], event: &'static str, payload: serde_json::Value) {
    for hook in webhooks.iter().filter(|w| w.on.iter().any(|e| e == event)) {
        let url = hook.url.clone();
        let payload = payload.clone();
        tokio::spawn(async move {
            if let Err(e) = Outbound::shared().post_json_retrying(&url, &payload).await {
                tracing::error!(%url, event, error = %e, "webhook gave up");
            }
        });
    }
}

/// Asks a webhook gate once: POSTs `payload` and returns the status code, or why there was
/// none (refused, TLS failure, timed out). The caller decides what a code means.
pub async fn ask(url: &str, payload: &serde_json::Value, timeout: Duration) -> Result<u16, String> {
    Outbound::shared().post_json(url, payload, timeout).await
}

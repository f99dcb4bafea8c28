//! The admin listener: Prometheus metrics, liveness and readiness, which need no token
//! (contract §6), the status page `/ui` (its data comes from `/v1`), merged with the
//! authenticated `/v1` API.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use super::auth::Tokens;
use super::plane::ControlPlane;
use crate::lifecycle::{Readiness, Shutdown};
use crate::telemetry::Metrics;

#[derive(Clone)]
struct AdminState {
    metrics: Arc<Metrics>,
    readiness: Readiness,
    control: Arc<ControlPlane>,
}

pub fn router(
    metrics: Arc<Metrics>,
    readiness: Readiness,
    control: Arc<ControlPlane>,
    tokens: Arc<Tokens>,
) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/ui", get(super::ui::page))
        .with_state(AdminState {
            metrics,
            readiness,
            control: control.clone(),
        })
        .merge(super::api::router(control, tokens))
}

pub async fn serve(
    listener: TcpListener,
    router: Router,
    mut shutdown: Shutdown,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.wait().await })
        .await
}

async fn metrics_text(State(state): State<AdminState>, headers: header::HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (content_type, body) = state.metrics.exposition(accept);
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn healthz() -> Response {
    (
        StatusCode::OK,
        axum::Json(serde_json::json!({ "status": "ok" })),
    )
        .into_response()
}

/// A store outage does not make the proxy unready: it keeps routing on its last snapshot;
/// the detail says so, and writes answer 503 meanwhile.
async fn readyz(State(state): State<AdminState>) -> Response {
    let ready = state.readiness.is_ready();
    let body = serde_json::json!({
        "ready": ready,
        "state_store": if state.control.store_ok() { "ok" } else { "unavailable" },
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

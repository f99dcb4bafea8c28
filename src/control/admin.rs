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
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

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

/// The operations of the admin listener outside `/v1`, each registered with its
/// `#[utoipa::path]` so the document lists them too.
fn operations() -> (Router<AdminState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::new()
        .routes(routes!(metrics_text))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .split_for_parts()
}

/// The OpenAPI document of everything the admin listener answers (but the status page).
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    let mut doc = super::api::openapi_document();
    doc.merge(operations().1);
    doc
}

pub fn router(
    metrics: Arc<Metrics>,
    readiness: Readiness,
    control: Arc<ControlPlane>,
    tokens: Arc<Tokens>,
) -> Router {
    operations()
        .0
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

/// Prometheus metrics (contract §7): OpenMetrics text, or the classic text format when
/// `Accept` asks for it. Needs no token.
#[utoipa::path(get, path = "/metrics", tag = "meta", security(()),
    responses((status = 200, description = "OpenMetrics or Prometheus text", content_type = "text/plain", body = String)))]
async fn metrics_text(State(state): State<AdminState>, headers: header::HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (content_type, body) = state.metrics.exposition(accept);
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// Liveness. Needs no token.
#[utoipa::path(get, path = "/healthz", tag = "meta", security(()),
    responses((status = 200, description = "`{\"status\": \"ok\"}`", body = Object)))]
async fn healthz() -> Response {
    (
        StatusCode::OK,
        axum::Json(serde_json::json!({ "status": "ok" })),
    )
        .into_response()
}

/// Readiness: false while loading or draining. Needs no token.
#[utoipa::path(get, path = "/readyz", tag = "meta", security(()),
    responses((status = 200, description = "ready; `state_store` says whether the store answers", body = Object),
        (status = 503, description = "not ready (loading or draining)", body = Object)))]
///
/// A store outage does not make the proxy unready: it keeps routing on its last snapshot;
/// the detail says so, and writes answer 503 meanwhile.
async fn readyz(State(state): State<AdminState>) -> Response {
    let ready = state.readiness.is_ready();
    // A job that is restarting does not make the proxy unready either (it routes on its
    // last snapshot); the detail names it and its last error.
    let body = serde_json::json!({
        "ready": ready,
        "state_store": if state.control.store_ok() { "ok" } else { "unavailable" },
        "jobs": state.control.jobs().jobs(),
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

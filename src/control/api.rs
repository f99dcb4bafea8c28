//! The `/v1` admin API (contract §6): bearer auth, JSON bodies, ETags, and errors that are
//! responses with a stable `{"error": {"code", "message"}}` body.

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Deserialize;
use serde_json::json;

use super::auth::Tokens;
use super::plane::{Change, Changed, ControlError, ControlPlane, RolloutAction};
use super::rollout::{Command, RolloutError};

const OPENAPI: &str = include_str!("openapi.json");

#[derive(Clone)]
struct ApiState {
    control: Arc<ControlPlane>,
    tokens: Arc<Tokens>,
}

/// The authenticated caller's token name, for the audit log.
#[derive(Clone)]
struct Actor(String);

pub fn router(control: Arc<ControlPlane>, tokens: Arc<Tokens>) -> Router {
    let state = ApiState { control, tokens };
    Router::new()
        .route("/v1/routes", get(list_routes))
        .route("/v1/routes/{name}", get(get_route))
        .route("/v1/routes/{name}/weight", put(set_weight))
        .route("/v1/routes/{name}/switch", post(switch))
        .route("/v1/routes/{name}/rollback", post(rollback))
        .route("/v1/routes/{name}/reset", post(reset))
        .route("/v1/flags", get(list_flags))
        .route("/v1/flags/{name}", get(get_flag).put(set_flag))
        .route("/v1/audit", get(audit))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/rollouts/{route}", get(get_rollout))
        .route("/v1/rollouts/{route}/start", post(rollout_start))
        .route("/v1/rollouts/{route}/pause", post(rollout_pause))
        .route("/v1/rollouts/{route}/resume", post(rollout_resume))
        .route("/v1/rollouts/{route}/promote", post(rollout_promote))
        .route("/v1/rollouts/{route}/abort", post(rollout_abort))
        .route("/v1/sync", get(sync_status))
        .route("/v1/consistency", get(consistency_status))
        .fallback(no_such_endpoint)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

/// 404 for a route or flag name that does not exist.
fn not_found(kind: &str, name: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("{kind} `{name}` does not exist"),
    )
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> ApiError {
        let (status, code) = match &e {
            // The path names the route or flag: a name that does not exist is 404, for
            // reads and writes alike (contract §10).
            ControlError::UnknownRoute(_) | ControlError::UnknownFlag(_) => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            ControlError::RolloutInProgress { .. } => (StatusCode::CONFLICT, "rollout_in_progress"),
            ControlError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
            ControlError::Stale { .. } => (StatusCode::PRECONDITION_FAILED, "precondition_failed"),
            ControlError::StoreUnavailable(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "state_store_unavailable")
            }
            ControlError::Conflict => (StatusCode::CONFLICT, "conflict"),
            ControlError::Rollout(r) => match r {
                RolloutError::NotAllowed { .. } => (StatusCode::CONFLICT, "invalid_transition"),
                RolloutError::NoRollout(_) => (StatusCode::UNPROCESSABLE_ENTITY, "no_rollout"),
                RolloutError::UnsupportedSplit { .. } => {
                    (StatusCode::UNPROCESSABLE_ENTITY, "invalid")
                }
                RolloutError::UnknownPhase(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            },
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text())
    }
}

async fn authenticate(State(state): State<ApiState>, mut req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        // The scheme is case-insensitive (RFC 9110 §11.1): `bearer` is `Bearer`.
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    let Some(name) = presented.and_then(|t| state.tokens.authenticate(t)) else {
        let mut response = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid `Authorization: Bearer TOKEN` header is required",
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    };
    req.extensions_mut().insert(Actor(name.to_string()));
    next.run(req).await
}

fn with_etag<T: serde::Serialize>(etag: &str, view: &T) -> Response {
    let etag = HeaderValue::from_str(etag).ok();
    let mut response = axum::Json(view).into_response();
    if let Some(etag) = etag {
        response.headers_mut().insert(header::ETAG, etag);
    }
    response
}

fn changed(view: Changed) -> Result<Response, ApiError> {
    Ok(with_etag(view.etag(), &view))
}

fn if_match(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok())
}

async fn list_routes(State(s): State<ApiState>) -> Response {
    axum::Json(json!({ "routes": s.control.routes().await })).into_response()
}

async fn get_route(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    s.control
        .route(&name)
        .await
        .map(|v| with_etag(&v.etag, &v))
        .ok_or_else(|| not_found("route", &name))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightBody {
    weight: f64,
}

async fn set_weight(
    State(s): State<ApiState>,
    axum::Extension(Actor(actor)): axum::Extension<Actor>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<axum::Json<WeightBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let axum::Json(body) = body?;
    let change = Change::SetWeight {
        route: name,
        percent: body.weight,
    };
    changed(s.control.change(&actor, change, if_match(&headers)).await?)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SwitchBody {
    active: String,
}

async fn switch(
    State(s): State<ApiState>,
    axum::Extension(Actor(actor)): axum::Extension<Actor>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<axum::Json<SwitchBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let axum::Json(body) = body?;
    let change = Change::Switch {
        route: name,
        active: body.active,
    };
    changed(s.control.change(&actor, change, if_match(&headers)).await?)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    #[serde(default)]
    reason: Option<String>,
}

async fn rollback(
    State(s): State<ApiState>,
    axum::Extension(Actor(actor)): axum::Extension<Actor>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    // The body is optional: `curl -X POST` with nothing is the common case in an incident.
    let body: RollbackBody = if body.iter().all(u8::is_ascii_whitespace) {
        RollbackBody::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))?
    };
    let change = Change::Rollback {
        route: name,
        reason: body.reason.unwrap_or_else(|| "manual".to_string()),
    };
    changed(s.control.change(&actor, change, if_match(&headers)).await?)
}

async fn reset(
    State(s): State<ApiState>,
    axum::Extension(Actor(actor)): axum::Extension<Actor>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let change = Change::Reset { route: name };
    changed(s.control.change(&actor, change, if_match(&headers)).await?)
}

async fn list_flags(State(s): State<ApiState>) -> Response {
    axum::Json(json!({ "flags": s.control.flags().await })).into_response()
}

async fn get_flag(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    s.control
        .flag(&name)
        .await
        .map(|v| with_etag(&v.etag, &v))
        .ok_or_else(|| not_found("flag", &name))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FlagBody {
    percentage: f64,
}

async fn set_flag(
    State(s): State<ApiState>,
    axum::Extension(Actor(actor)): axum::Extension<Actor>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<axum::Json<FlagBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let axum::Json(body) = body?;
    let change = Change::SetFlag {
        flag: name,
        percent: body.percentage,
    };
    changed(s.control.change(&actor, change, if_match(&headers)).await?)
}

#[derive(Deserialize)]
struct AuditQuery {
    #[serde(default)]
    limit: Option<u32>,
}

async fn audit(
    State(s): State<ApiState>,
    Query(q): Query<AuditQuery>,
) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let entries = s.control.audit(limit).await?;
    Ok(axum::Json(json!({ "entries": entries })).into_response())
}

/// Every sync pair with its figures; `stale` when its worker stopped reporting.
async fn sync_status(State(s): State<ApiState>) -> Response {
    axum::Json(json!({ "sync": s.control.feeds().sync_reports() })).into_response()
}

/// Every sampled pair with its figures; `stale` when its sampler stopped reporting.
async fn consistency_status(State(s): State<ApiState>) -> Response {
    axum::Json(json!({ "consistency": s.control.feeds().consistency_reports() })).into_response()
}

/// Reading a route that does not exist is 404 (as for `GET /v1/routes/{name}`); a route
/// without a `rollout:` block is 422 `no_rollout`.
async fn get_rollout(
    State(s): State<ApiState>,
    Path(route): Path<String>,
) -> Result<Response, ApiError> {
    match s.control.rollout_view(&route).await {
        Ok(view) => Ok(axum::Json(view).into_response()),
        Err(ControlError::UnknownRoute(_)) => Err(not_found("route", &route)),
        Err(e) => Err(e.into()),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PromoteBody {
    #[serde(default)]
    full: bool,
}

/// The body is optional for every rollout command: pipelines `curl -X POST` them.
fn optional_body<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct EmptyBody {}

async fn rollout_command(
    s: &ApiState,
    actor: &str,
    route: String,
    command: Command,
) -> Result<Response, ApiError> {
    let change = Change::Rollout {
        route: route.clone(),
        action: RolloutAction::Command(command),
    };
    match s.control.change(actor, change, None).await {
        Ok(_) => {}
        // A route that does not exist is 404 here, as for reads: the path names it.
        Err(ControlError::UnknownRoute(_)) => return Err(not_found("route", &route)),
        Err(e) => return Err(e.into()),
    }
    Ok(axum::Json(s.control.rollout_view(&route).await?).into_response())
}

async fn rollout_start(
    State(s): State<ApiState>,
    axum::Extension(Actor(actor)): axum::Extension<Actor>,
    Path(route): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    optional_body::<EmptyBody>(&body)?;
    rollout_command(&s, &actor, route, Command::Start).await
}

async fn rollout_pause(
    State(s): State<ApiState>,
    axum::Extension(Actor(actor)): axum::Extension<Actor>,
    Path(route): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    optional_body::<EmptyBody>(&body)?;
    rollout_command(&s, &actor, route, Command::Pause).await
}

async fn rollout_resume(
    State(s): State<ApiState>,
    axum::Extension(Actor(actor)): axum::Extension<Actor>,
    Path(route): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    optional_body::<EmptyBody>(&body)?;
    rollout_command(&s, &actor, route, Command::Resume).await
}

async fn rollout_promote(
    State(s): State<ApiState>,
    axum::Extension(Actor(actor)): axum::Extension<Actor>,
    Path(route): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body: PromoteBody = optional_body(&body)?;
    rollout_command(&s, &actor, route, Command::Promote { full: body.full }).await
}

async fn rollout_abort(
    State(s): State<ApiState>,
    axum::Extension(Actor(actor)): axum::Extension<Actor>,
    Path(route): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    optional_body::<EmptyBody>(&body)?;
    rollout_command(&s, &actor, route, Command::Abort).await
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn no_such_endpoint() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; see /v1/openapi.json",
    )
}

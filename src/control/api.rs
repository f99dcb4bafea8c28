//! The `/v1` admin API (contract §6): bearer auth, JSON bodies, ETags, and errors that are
//! responses with a stable `{"error": {"code", "message"}}` body.
//!
//! Every operation is registered through `utoipa_axum::routes!`, which adds the handler to
//! the router and its `#[utoipa::path]` to the OpenAPI document in one step: an endpoint
//! cannot exist in one and not the other. The request and response types are the shared
//! ones of `control::model`. The document is served at `/v1/openapi.json` without a token.

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::Tokens;
use super::jobs::JobList;
use super::model::{
    AuditList, ConsistencyList, EmptyBody, ErrorBody, FlagBody, FlagList, FlagView, PromoteBody,
    RollbackBody, RolloutView, RouteList, RouteView, SwitchBody, SyncList, WeightBody,
};
use super::plane::{Change, Changed, ControlError, ControlPlane, RolloutAction};
use super::rollout::{Command, RolloutError};

#[derive(Clone)]
struct ApiState {
    control: Arc<ControlPlane>,
    tokens: Arc<Tokens>,
}

/// The authenticated caller's token name, for the audit log.
#[derive(Clone)]
struct Actor(String);

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "switchyard admin API",
        version = "1",
        description = "Routes, flags, rollouts, sync and consistency figures, audit log (contract §6). Every operation but this document needs `Authorization: Bearer TOKEN`."
    ),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
    }
}

/// Every operation of the API with its handler, and the document describing them.
fn operations() -> (Router<ApiState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(list_routes))
        .routes(routes!(get_route))
        .routes(routes!(set_weight))
        .routes(routes!(switch))
        .routes(routes!(rollback))
        .routes(routes!(reset))
        .routes(routes!(list_flags))
        .routes(routes!(get_flag, set_flag))
        .routes(routes!(audit))
        .routes(routes!(get_rollout))
        .routes(routes!(rollout_start))
        .routes(routes!(rollout_pause))
        .routes(routes!(rollout_resume))
        .routes(routes!(rollout_promote))
        .routes(routes!(rollout_abort))
        .routes(routes!(sync_status))
        .routes(routes!(consistency_status))
        .routes(routes!(list_jobs))
        .routes(routes!(openapi))
        .split_for_parts()
}

/// The generated OpenAPI document (3.1) of the `/v1` API (`admin::openapi_document` adds
/// the listener's other operations).
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    operations().1
}

pub fn router(control: Arc<ControlPlane>, tokens: Arc<Tokens>) -> Router {
    let state = ApiState { control, tokens };
    let (operations, _) = operations();
    operations
        .fallback(no_such_endpoint)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

/// The errors any authenticated operation may answer.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum ReadErrors {
    /// `unauthorized`: no or a wrong bearer token.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// `not_found`: no route or flag of that name.
    #[response(status = 404)]
    NotFound(ErrorBody),
}

/// The errors of a change to a route or flag.
#[derive(utoipa::IntoResponses)]
#[allow(dead_code)]
enum ChangeErrors {
    /// `bad_request`: the body is not the JSON described.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// `unauthorized`: no or a wrong bearer token.
    #[response(status = 401)]
    Unauthorized(ErrorBody),
    /// `not_found`: no route or flag of that name.
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// `conflict` (another replica wrote at the same moment; retry), `rollout_in_progress`
    /// (the route's rollout is progressing: pause or abort it first), `invalid_transition`.
    #[response(status = 409)]
    Conflict(ErrorBody),
    /// `precondition_failed`: `If-Match` names an ETag the resource no longer has.
    #[response(status = 412)]
    Stale(ErrorBody),
    /// `invalid`, `no_rollout`: the change is not possible as asked; audited as refused.
    #[response(status = 422)]
    Invalid(ErrorBody),
    /// `state_store_unavailable`: nothing was changed.
    #[response(status = 503)]
    StoreDown(ErrorBody),
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

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.body_text())
    }
}

async fn authenticate(State(state): State<ApiState>, mut req: Request, next: Next) -> Response {
    // The API's description is public: clients and generators fetch it before any token.
    if req.uri().path() == "/v1/openapi.json" {
        return next.run(req).await;
    }
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

/// Every route with its split, weight, state and health figures.
#[utoipa::path(get, path = "/v1/routes", tag = "routes",
    responses((status = 200, body = RouteList), ReadErrors))]
async fn list_routes(State(s): State<ApiState>) -> Response {
    axum::Json(RouteList {
        routes: s.control.routes().await,
    })
    .into_response()
}

/// One route; the `ETag` header tags its settings for `If-Match`.
#[utoipa::path(get, path = "/v1/routes/{name}", tag = "routes",
    params(("name" = String, Path, description = "route name")),
    responses((status = 200, body = RouteView), ReadErrors))]
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

/// Sets the target's share of a percentage or canary route; clears a rollback.
#[utoipa::path(put, path = "/v1/routes/{name}/weight", tag = "routes",
    params(("name" = String, Path, description = "route name"),
        ("If-Match" = Option<String>, Header, description = "the route's ETag")),
    request_body = WeightBody,
    responses((status = 200, body = RouteView), ChangeErrors))]
async fn set_weight(
    State(s): State<ApiState>,
    axum::Extension(Actor(actor)): axum::Extension<Actor>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<axum::Json<serde_json::Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let body: WeightBody = object(body?.0)?;
    let change = Change::SetWeight {
        route: name,
        percent: body.weight,
    };
    changed(s.control.change(&actor, change, if_match(&headers)).await?)
}

/// Switches a blue-green route to one side; clears a rollback.
#[utoipa::path(post, path = "/v1/routes/{name}/switch", tag = "routes",
    params(("name" = String, Path, description = "route name"),
        ("If-Match" = Option<String>, Header, description = "the route's ETag")),
    request_body = SwitchBody,
    responses((status = 200, body = RouteView), ChangeErrors))]
async fn switch(
    State(s): State<ApiState>,
    axum::Extension(Actor(actor)): axum::Extension<Actor>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<axum::Json<serde_json::Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let body: SwitchBody = object(body?.0)?;
    let change = Change::Switch {
        route: name,
        active: body.active,
    };
    changed(s.control.change(&actor, change, if_match(&headers)).await?)
}

/// Rolls the route back now: everything to legacy until a weight, switch or reset.
#[utoipa::path(post, path = "/v1/routes/{name}/rollback", tag = "routes",
    params(("name" = String, Path, description = "route name"),
        ("If-Match" = Option<String>, Header, description = "the route's ETag")),
    request_body = Option<RollbackBody>,
    responses((status = 200, body = RouteView), ChangeErrors))]
async fn rollback(
    State(s): State<ApiState>,
    axum::Extension(Actor(actor)): axum::Extension<Actor>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    // The body is optional: `curl -X POST` with nothing is the common case in an incident.
    let body: RollbackBody = optional_body(&body)?;
    let change = Change::Rollback {
        route: name,
        reason: body.reason.unwrap_or_else(|| "manual".to_string()),
    };
    changed(s.control.change(&actor, change, if_match(&headers)).await?)
}

/// Drops every runtime override of the route: back to the config file's values.
#[utoipa::path(post, path = "/v1/routes/{name}/reset", tag = "routes",
    params(("name" = String, Path, description = "route name"),
        ("If-Match" = Option<String>, Header, description = "the route's ETag")),
    responses((status = 200, body = RouteView), ChangeErrors))]
async fn reset(
    State(s): State<ApiState>,
    axum::Extension(Actor(actor)): axum::Extension<Actor>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let change = Change::Reset { route: name };
    changed(s.control.change(&actor, change, if_match(&headers)).await?)
}

/// Every feature flag.
#[utoipa::path(get, path = "/v1/flags", tag = "flags",
    responses((status = 200, body = FlagList), ReadErrors))]
async fn list_flags(State(s): State<ApiState>) -> Response {
    axum::Json(FlagList {
        flags: s.control.flags().await,
    })
    .into_response()
}

/// One flag; the `ETag` header tags it for `If-Match`.
#[utoipa::path(get, path = "/v1/flags/{name}", tag = "flags",
    params(("name" = String, Path, description = "flag name")),
    responses((status = 200, body = FlagView), ReadErrors))]
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

/// Sets a flag's percentage.
#[utoipa::path(put, path = "/v1/flags/{name}", tag = "flags",
    params(("name" = String, Path, description = "flag name"),
        ("If-Match" = Option<String>, Header, description = "the flag's ETag")),
    request_body = FlagBody,
    responses((status = 200, body = FlagView), ChangeErrors))]
async fn set_flag(
    State(s): State<ApiState>,
    axum::Extension(Actor(actor)): axum::Extension<Actor>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<axum::Json<serde_json::Value>, JsonRejection>,
) -> Result<Response, ApiError> {
    let body: FlagBody = object(body?.0)?;
    let change = Change::SetFlag {
        flag: name,
        percent: body.percentage,
    };
    changed(s.control.change(&actor, change, if_match(&headers)).await?)
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct AuditQuery {
    /// How many entries, newest first (default 100).
    #[serde(default)]
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<u32>,
}

/// Every change and refusal: who, when, what, before and after; newest first.
#[utoipa::path(get, path = "/v1/audit", tag = "audit", params(AuditQuery),
    responses((status = 200, body = AuditList),
        (status = 400, description = "`bad_request`: `limit` is not a number in 1..10000", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 503, description = "`state_store_unavailable`", body = ErrorBody)))]
async fn audit(
    State(s): State<ApiState>,
    query: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("`limit` is {limit}; use 1..10000"),
        ));
    }
    let entries = s.control.audit(limit).await?;
    Ok(axum::Json(AuditList { entries }).into_response())
}

/// Every sync pair with its figures; `stale` when its worker stopped reporting.
#[utoipa::path(get, path = "/v1/sync", tag = "data",
    responses((status = 200, body = SyncList),
        (status = 401, description = "`unauthorized`", body = ErrorBody)))]
async fn sync_status(State(s): State<ApiState>) -> Response {
    axum::Json(json!({ "sync": s.control.feeds().sync_reports() })).into_response()
}

/// Every sampled pair with its figures; `stale` when its sampler stopped reporting.
#[utoipa::path(get, path = "/v1/consistency", tag = "data",
    responses((status = 200, body = ConsistencyList),
        (status = 401, description = "`unauthorized`", body = ErrorBody)))]
async fn consistency_status(State(s): State<ApiState>) -> Response {
    axum::Json(json!({ "consistency": s.control.feeds().consistency_reports() })).into_response()
}

/// Every background job under the supervisor: state, restarts, last error.
#[utoipa::path(get, path = "/v1/jobs", tag = "meta",
    responses((status = 200, body = JobList),
        (status = 401, description = "`unauthorized`", body = ErrorBody)))]
async fn list_jobs(State(s): State<ApiState>) -> Response {
    axum::Json(JobList {
        jobs: s.control.jobs().jobs(),
    })
    .into_response()
}

/// A route's rollout: state, step (from 1), weight, gates, bake time left, history.
/// 422 `no_rollout` for a route without a `rollout:` block.
#[utoipa::path(get, path = "/v1/rollouts/{route}", tag = "rollouts",
    params(("route" = String, Path, description = "route name")),
    responses((status = 200, body = RolloutView), ChangeErrors))]
async fn get_rollout(
    State(s): State<ApiState>,
    Path(route): Path<String>,
) -> Result<Response, ApiError> {
    Ok(axum::Json(s.control.rollout_view(&route).await?).into_response())
}

/// A JSON body as the type it must be. Only an object is one: serde would also read a
/// struct from an array, which no client means.
fn object<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T, ApiError> {
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", m);
    if !value.is_object() {
        return Err(bad(format!(
            "the body must be a JSON object, not `{value}`"
        )));
    }
    serde_json::from_value(value).map_err(|e| bad(e.to_string()))
}

/// The body is optional for every rollout command and a rollback: pipelines `curl -X POST`
/// them. No body, only whitespace, and JSON `null` all mean the defaults.
fn optional_body<T: serde::de::DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) || body.trim_ascii() == b"null" {
        return Ok(T::default());
    }
    let value = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", e.to_string()))?;
    object(value)
}

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
    s.control.change(actor, change, None).await?;
    Ok(axum::Json(s.control.rollout_view(&route).await?).into_response())
}

/// Starts at step 1 (also after a promotion, rollback or abort).
#[utoipa::path(post, path = "/v1/rollouts/{route}/start", tag = "rollouts",
    params(("route" = String, Path, description = "route name")),
    request_body = Option<EmptyBody>,
    responses((status = 200, body = RolloutView), ChangeErrors))]
async fn rollout_start(
    State(s): State<ApiState>,
    axum::Extension(Actor(actor)): axum::Extension<Actor>,
    Path(route): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    optional_body::<EmptyBody>(&body)?;
    rollout_command(&s, &actor, route, Command::Start).await
}

/// Holds the current step; its bake so far is kept.
#[utoipa::path(post, path = "/v1/rollouts/{route}/pause", tag = "rollouts",
    params(("route" = String, Path, description = "route name")),
    request_body = Option<EmptyBody>,
    responses((status = 200, body = RolloutView), ChangeErrors))]
async fn rollout_pause(
    State(s): State<ApiState>,
    axum::Extension(Actor(actor)): axum::Extension<Actor>,
    Path(route): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    optional_body::<EmptyBody>(&body)?;
    rollout_command(&s, &actor, route, Command::Pause).await
}

/// Continues a paused rollout (its step's weight is put back).
#[utoipa::path(post, path = "/v1/rollouts/{route}/resume", tag = "rollouts",
    params(("route" = String, Path, description = "route name")),
    request_body = Option<EmptyBody>,
    responses((status = 200, body = RolloutView), ChangeErrors))]
async fn rollout_resume(
    State(s): State<ApiState>,
    axum::Extension(Actor(actor)): axum::Extension<Actor>,
    Path(route): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    optional_body::<EmptyBody>(&body)?;
    rollout_command(&s, &actor, route, Command::Resume).await
}

/// The next step now; `{"full": true}`: straight to promoted.
#[utoipa::path(post, path = "/v1/rollouts/{route}/promote", tag = "rollouts",
    params(("route" = String, Path, description = "route name")),
    request_body = Option<PromoteBody>,
    responses((status = 200, body = RolloutView), ChangeErrors))]
async fn rollout_promote(
    State(s): State<ApiState>,
    axum::Extension(Actor(actor)): axum::Extension<Actor>,
    Path(route): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let body: PromoteBody = optional_body(&body)?;
    rollout_command(&s, &actor, route, Command::Promote { full: body.full }).await
}

/// Sends everything to legacy and ends the rollout.
#[utoipa::path(post, path = "/v1/rollouts/{route}/abort", tag = "rollouts",
    params(("route" = String, Path, description = "route name")),
    request_body = Option<EmptyBody>,
    responses((status = 200, body = RolloutView), ChangeErrors))]
async fn rollout_abort(
    State(s): State<ApiState>,
    axum::Extension(Actor(actor)): axum::Extension<Actor>,
    Path(route): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    optional_body::<EmptyBody>(&body)?;
    rollout_command(&s, &actor, route, Command::Abort).await
}

/// This document. Needs no token.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "meta", security(()),
    responses((status = 200, description = "the OpenAPI 3.1 document of this API", content_type = "application/json", body = Object)))]
async fn openapi() -> Response {
    static DOCUMENT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        super::admin::openapi_document()
            .to_pretty_json()
            .unwrap_or_else(|e| json!({ "error": e.to_string() }).to_string())
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT.as_str(),
    )
        .into_response()
}

async fn no_such_endpoint() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; see /v1/openapi.json",
    )
}

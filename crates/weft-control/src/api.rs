//! The REST API of DESIGN.md §6 under `/api/v1`, the dashboard at `/` and `/metrics`.

use crate::mesh::{ChangeError, Mesh};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde_json::json;
use std::sync::Arc;
use weft_api::ResourceKey;
use weft_api::error::{FieldError, Invalid};

#[derive(Clone)]
pub struct Api {
    pub mesh: Arc<Mesh>,
    pub registry: Arc<Registry>,
}

/// An error answer: `{error, field, errors}` with the status that fits.
pub struct ApiError(StatusCode, String, Vec<FieldError>);

pub fn router(api: Api) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status))
        .route("/api/v1/proxies", get(proxies))
        .route("/api/v1/resources", get(list_resources).post(apply))
        .route("/api/v1/resources/{kind}/{namespace}/{name}", delete(remove))
        .route("/api/v1/revisions", get(revisions))
        .route("/api/v1/rollback", post(rollback))
        .fallback(not_found)
        .with_state(api)
}

async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

async fn metrics(State(api): State<Api>) -> Response {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &api.registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    ([(header::CONTENT_TYPE, weft_core::admin::OPENMETRICS_CONTENT_TYPE)], out).into_response()
}

async fn status(State(api): State<Api>) -> Json<serde_json::Value> {
    Json(json!(api.mesh.status()))
}

async fn proxies(State(api): State<Api>) -> Json<serde_json::Value> {
    Json(json!(api.mesh.proxies()))
}

async fn list_resources(State(api): State<Api>) -> Json<serde_json::Value> {
    Json(json!({ "revision": api.mesh.revision(), "resources": api.mesh.resources() }))
}

/// Body: YAML or JSON, one or more TrafficPolicy / SecurityPolicy documents. The optional
/// `x-weft-source` header names the file, for error messages.
async fn apply(State(api): State<Api>, headers: HeaderMap, body: String) -> Result<Json<serde_json::Value>, ApiError> {
    let source = headers
        .get("x-weft-source")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("request body")
        .to_string();
    let resources = weft_api::resource::parse_resources(&body, &source)?;
    let applied = api.mesh.apply(resources, &source)?;
    Ok(Json(json!(applied)))
}

async fn remove(
    State(api): State<Api>,
    Path((kind, namespace, name)): Path<(String, String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !matches!(kind.as_str(), "TrafficPolicy" | "SecurityPolicy") {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("unknown kind {kind:?}"),
            vec![FieldError::new("kind", &kind, "one of TrafficPolicy, SecurityPolicy")],
        ));
    }
    let applied = api.mesh.delete(&ResourceKey { kind, namespace, name })?;
    Ok(Json(json!(applied)))
}

async fn revisions(State(api): State<Api>) -> Result<Json<serde_json::Value>, ApiError> {
    let history = api
        .mesh
        .history()
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), vec![]))?;
    let rows: Vec<_> = history
        .iter()
        .map(|r| json!({"revision": r.revision, "timeMs": r.time_ms, "summary": r.summary, "changes": r.changes, "resources": r.resources.len()}))
        .collect();
    Ok(Json(json!(rows)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    revision: u64,
}

async fn rollback(State(api): State<Api>, body: String) -> Result<Json<serde_json::Value>, ApiError> {
    let req: RollbackBody = serde_json::from_str(&body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("invalid rollback body: {e}"),
            vec![FieldError::new("revision", "", e.to_string())],
        )
    })?;
    let applied = api.mesh.rollback(req.revision)?;
    Ok(Json(json!(applied)))
}

async fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "no such endpoint; see DESIGN.md §6".into(), vec![])
}

// === impl ApiError ===

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        ApiError(StatusCode::BAD_REQUEST, e.to_string(), e.errors)
    }
}

impl From<ChangeError> for ApiError {
    fn from(e: ChangeError) -> Self {
        match e {
            ChangeError::Invalid(i) => i.into(),
            ChangeError::NotFound(what) => ApiError(StatusCode::NOT_FOUND, format!("{what} not found"), vec![]),
            ChangeError::Store(s) => ApiError(StatusCode::INTERNAL_SERVER_ERROR, s.to_string(), vec![]),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let field = self.2.first().map(|e| e.field.clone()).unwrap_or_default();
        (self.0, Json(json!({ "error": self.1, "field": field, "errors": self.2 }))).into_response()
    }
}

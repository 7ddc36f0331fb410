//! The REST API of DESIGN.md §6 under `/api/v1`, the dashboard at `/` and `/metrics`.
//!
//! Every change is an intent: `POST /resources`, `DELETE /resources/...` and `POST /rollback`
//! queue one (one 100% stage, no bake) and wait briefly for it to finish; `POST /intents`
//! queues a staged one and answers at once.
//!
//! On etcd, a change asked of a follower is forwarded to the leader, whose answer is the answer
//! ([`forward_to_leader`]).

use crate::auth::{Actor, AuditedByLeader, Auth, FORWARDED_BY, FORWARDED_FOR, FORWARDED_SIG, Role};
use crate::intents::{ChangeError, Submitted};
use crate::mesh::Mesh;
use crate::plan::Kind;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::MethodFilter;
use axum::{Extension, Json, Router};
use prometheus_client::registry::Registry;
use serde::Deserialize;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamExt;
use weft_api::ResourceKey;
use weft_api::error::{FieldError, Invalid};
use weft_api::resource::Object;

/// How long a plain change (`weft apply`) is waited for before the API answers 202.
const APPLY_WAIT: Duration = Duration::from_secs(10);

/// How long a follower waits for the leader's answer to a forwarded change: the leader's own
/// wait for a plain change, and some.
const FORWARD_WAIT: Duration = Duration::from_secs(15);

#[derive(Clone)]
pub(crate) struct Api {
    pub(crate) mesh: Arc<Mesh>,
    pub(crate) registry: Arc<Registry>,
    pub(crate) history: crate::history::History,
    /// API tokens, dashboard sessions and the access rules every route is checked against; it
    /// also knows whether the API and the gRPC speak TLS (not `--insecure-plaintext`).
    pub(crate) auth: Arc<Auth>,
}

/// An error answer: `{error, field, errors}` with the status that fits.
pub(crate) struct ApiError(StatusCode, String, Vec<FieldError>);

type Answer = Result<(StatusCode, Json<serde_json::Value>), ApiError>;

/// The router under construction, and every (method, path) it serves: the list the access
/// table is checked against.
struct Routes {
    router: Router<Api>,
    registered: Vec<(Method, &'static str)>,
}

impl Routes {
    fn on<H, T>(mut self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: axum::handler::Handler<T, Api>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone()).expect("a method axum routes");
        self.router = self.router.route(path, axum::routing::on(filter, handler));
        self.registered.push((method, path));
        self
    }
}

fn routes() -> Routes {
    use Method as M;
    Routes {
        router: Router::new(),
        registered: Vec::new(),
    }
    .on(M::GET, "/", dashboard)
    .on(M::GET, "/live", live)
    .on(M::GET, "/ready", live)
    .on(M::POST, "/api/v1/session", sign_in)
    .on(M::DELETE, "/api/v1/session", sign_out)
    .on(M::GET, "/metrics", metrics)
    .on(M::GET, "/api/v1/whoami", whoami)
    .on(M::GET, "/api/v1/status", status)
    .on(M::GET, "/api/v1/proxies", proxies)
    .on(M::GET, "/api/v1/resources", list_resources)
    .on(M::POST, "/api/v1/resources", apply)
    .on(M::DELETE, "/api/v1/resources/{kind}/{namespace}/{name}", remove)
    .on(M::GET, "/api/v1/revisions", revisions)
    .on(M::GET, "/api/v1/revisions/{revision}/diff", revision_diff)
    .on(M::GET, "/api/v1/graph", graph)
    .on(M::POST, "/api/v1/rollback", rollback)
    .on(M::GET, "/api/v1/intents", list_intents)
    .on(M::POST, "/api/v1/intents", submit_intent)
    .on(M::GET, "/api/v1/intents/{id}", show_intent)
    .on(M::POST, "/api/v1/intents/{id}/approve", approve)
    .on(M::POST, "/api/v1/intents/{id}/abort", abort)
    .on(M::POST, "/api/v1/intents/{id}/mode", set_mode)
    .on(M::GET, "/api/v1/history", history)
    .on(M::GET, "/api/v1/top", top)
    .on(M::GET, "/api/v1/tap/{service}", tap)
    .on(M::POST, "/api/v1/bypass/{service}", bypass)
    .on(M::POST, "/api/v1/freeze", freeze)
    .on(M::GET, "/api/v1/ledger", ledger)
    .on(M::GET, "/api/v1/audit", audit)
    .on(M::GET, "/api/v1/tokens", list_tokens)
    .on(M::POST, "/api/v1/tokens", create_token)
    .on(M::POST, "/api/v1/tokens/{id}/revoke", revoke_token)
    .on(M::GET, "/api/v1/admin/tokens", list_api_tokens)
    .on(M::POST, "/api/v1/admin/tokens", create_api_token)
    .on(M::DELETE, "/api/v1/admin/tokens/{name}", revoke_api_token)
    .on(M::GET, "/api/v1/ca", ca_info)
    .on(M::POST, "/api/v1/ca/rotate", rotate_root)
    .on(M::GET, "/api/v1/events", events)
}

/// Every (method, path) the API serves, as the router was built: what tests check the access
/// table against.
pub fn registered_routes() -> Vec<(Method, &'static str)> {
    routes().registered
}

pub(crate) fn router(api: Api) -> Router {
    routes()
        .router
        .route_layer(axum::middleware::from_fn_with_state(api.clone(), forward_to_leader))
        // Added later, so run earlier: a follower forwards only what the caller may do.
        .route_layer(axum::middleware::from_fn_with_state(api.auth.clone(), crate::auth::authorize))
        // Last added, so first to run: forwarding headers no replica signed are gone before
        // anything reads them.
        .route_layer(axum::middleware::from_fn_with_state(api.auth.clone(), crate::auth::trust_forwarded))
        .fallback(not_found)
        .with_state(api)
}

/// A change asked of a follower goes to the leader, which alone changes the mesh; the leader's
/// answer (status, headers, body) is the answer, and the leader checks the credential and audits
/// the call as if it had been asked directly. Served here instead: reads, signing in and out
/// (dashboard sessions are each replica's own), a change already forwarded, and every change
/// while no leader's API is known (refused then with 503 saying why).
async fn forward_to_leader(State(api): State<Api>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let here = matches!(*req.method(), Method::GET | Method::HEAD)
        || req.uri().path() == "/api/v1/session"
        || req.headers().contains_key(FORWARDED_BY)
        || api.mesh.leading();
    let leader = if here { None } else { api.mesh.leader_api.lock().clone() };
    let Some(leader) = leader else {
        return next.run(req).await;
    };
    let tokens = req.uri().path().contains("/tokens");
    let answer = forward(&api.mesh, &api.auth, &leader, req)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    // Read your writes: what the leader changed for a caller of this replica is what this
    // replica shows (a token made here works here) as soon as the caller has the answer, not
    // only once the store's watch brings it.
    if answer.status().is_success() {
        let (auth, mesh) = (api.auth.clone(), api.mesh.clone());
        let reread = tokio::task::spawn_blocking(move || {
            if tokens {
                auth.reload().map_err(|e| e.to_string())
            } else {
                mesh.reload().map_err(|e| e.to_string())
            }
        });
        if let Ok(Err(error)) = reread.await {
            tracing::warn!(%error, "cannot read the store again after a forwarded change; the watch will");
        }
    }
    answer
}

/// Sends `req` to the leader's API at `leader` over one new connection (TLS trusting the mesh
/// CA, which signed the leader's serving certificate); streams the body both ways.
async fn forward(mesh: &Mesh, auth: &Auth, leader: &str, req: axum::extract::Request) -> Result<Response, ApiError> {
    let refused = |why: String| {
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("this replica is a follower and forwards changes to the leader at {leader}, which did not answer: {why}"),
            vec![],
        )
    };
    let mut connector = if leader.starts_with("https://") {
        let verifier = weft_core::tls::roots_verifier(&mesh.ca.bundle_pem(), "the mesh CA").map_err(|e| refused(e.to_string()))?;
        let config = weft_core::tls::client_config(verifier, None, &[b"http/1.1"]).map_err(|e| refused(e.to_string()))?;
        weft_core::tls::Connector::tls(Arc::new(config))
    } else {
        weft_core::tls::Connector::plaintext()
    };
    let (mut parts, body) = req.into_parts();
    let caller = parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0.to_string());
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let target: http::Uri = format!("{leader}{path}").parse().map_err(|e| refused(format!("{e}")))?;
    let authority = target.authority().map(|a| a.to_string()).unwrap_or_default();
    parts.uri = path.parse().map_err(|e| refused(format!("{e}")))?;
    parts.headers.remove(header::CONNECTION);
    parts
        .headers
        .insert(header::HOST, authority.parse().map_err(|e| refused(format!("{e}")))?);
    parts
        .headers
        .insert(FORWARDED_BY, mesh.replica.parse().map_err(|e| refused(format!("{e}")))?);
    // Signed as sent: the address only when it makes a header value.
    let caller = caller.filter(|c| http::HeaderValue::from_str(c).is_ok());
    if let Some(value) = caller.as_deref().and_then(|c| c.parse().ok()) {
        parts.headers.insert(FORWARDED_FOR, value);
    }
    let sig = auth.sign_forwarded(&mesh.replica, caller.as_deref().unwrap_or_default(), &parts.method, &path);
    parts
        .headers
        .insert(FORWARDED_SIG, sig.parse().map_err(|e| refused(format!("{e}")))?);
    let exchange = async move {
        let conn = tower_service::Service::call(&mut connector, target)
            .await
            .map_err(|e| refused(e.to_string()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(conn)
            .await
            .map_err(|e| refused(e.to_string()))?;
        tokio::spawn(connection);
        let answer = sender
            .send_request(axum::extract::Request::from_parts(parts, body))
            .await
            .map_err(|e| refused(e.to_string()))?;
        // The leader audited the call; the follower's audit leaves it at that.
        let mut answer = answer.map(axum::body::Body::new);
        answer.extensions_mut().insert(AuditedByLeader);
        Ok(answer)
    };
    tokio::time::timeout(FORWARD_WAIT, exchange)
        .await
        .unwrap_or_else(|_| Err(refused(format!("no answer within {FORWARD_WAIT:?}"))))
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({"live": true}))
}

/// Who the credential belongs to, and its role (the dashboard enables controls from it).
async fn whoami(Extension(actor): Extension<Actor>) -> Json<serde_json::Value> {
    Json(json!({"name": actor.name, "role": actor.role, "session": actor.session}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignIn {
    token: String,
}

/// The dashboard signs in with a token once; the answer sets an HttpOnly, SameSite=Strict
/// session cookie (Secure over TLS). The token itself is never stored in the browser.
async fn sign_in(State(api): State<Api>, body: String) -> Result<Response, Response> {
    let req: SignIn = json_body(&body, "session").map_err(IntoResponse::into_response)?;
    let (id, actor, ttl) = api.auth.open_session(req.token.trim()).map_err(IntoResponse::into_response)?;
    let cookie = crate::auth::session_cookie_header(Some((&id, ttl)), api.auth.tls);
    Ok((
        [(header::SET_COOKIE, cookie)],
        Json(json!({"name": actor.name, "role": actor.role, "expiresInSeconds": ttl.as_secs()})),
    )
        .into_response())
}

async fn sign_out(State(api): State<Api>, headers: HeaderMap) -> Response {
    if let Some(id) = crate::auth::session_cookie(&headers) {
        api.auth.close_session(id);
    }
    let cookie = crate::auth::session_cookie_header(None, api.auth.tls);
    ([(header::SET_COOKIE, cookie)], Json(json!({"signedOut": true}))).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewApiToken {
    name: String,
    role: Role,
    #[serde(default)]
    ttl: Option<weft_api::Duration>,
}

/// Creates an API token; the answer carries the secret, shown this once.
async fn create_api_token(State(api): State<Api>, body: String) -> Answer {
    let req: NewApiToken = json_body(&body, "API token")?;
    let (record, secret) = api
        .auth
        .create(&req.name, req.role, req.ttl.map(|t| t.as_std()))
        .map_err(token_error)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({"name": record.name, "role": record.role, "expiresMs": record.expires_ms, "token": secret})),
    ))
}

async fn list_api_tokens(State(api): State<Api>) -> Json<serde_json::Value> {
    let rows: Vec<_> = api
        .auth
        .list()
        .iter()
        .map(|t| json!({"name": t.name, "role": t.role, "createdMs": t.created_ms, "expiresMs": t.expires_ms}))
        .collect();
    Json(json!(rows))
}

async fn revoke_api_token(State(api): State<Api>, Path(name): Path<String>) -> Answer {
    api.auth.revoke(&name).map_err(token_error)?;
    Ok((StatusCode::OK, Json(json!({"name": name, "revoked": true}))))
}

fn token_error(e: crate::auth::TokenError) -> ApiError {
    use crate::auth::TokenError as E;
    match e {
        E::Name(ref n) => ApiError(
            StatusCode::BAD_REQUEST,
            e.to_string(),
            vec![FieldError::new("name", n, "1-63 of a-z, 0-9, '-', '_', '.'")],
        ),
        E::Exists(_) => ApiError(StatusCode::CONFLICT, e.to_string(), vec![]),
        E::NotFound(_) => ApiError(StatusCode::NOT_FOUND, e.to_string(), vec![]),
        E::Store(_) | E::Random => ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), vec![]),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    /// Only calls made within this long, e.g. `1h`.
    #[serde(default)]
    since: Option<weft_api::Duration>,
}

/// Every mutating call: who (token name and role), from where, what, and the outcome.
async fn audit(State(api): State<Api>, axum::extract::RawQuery(query): axum::extract::RawQuery) -> Answer {
    let q: AuditQuery = match query.as_deref().filter(|q| !q.is_empty()) {
        None => AuditQuery { since: None },
        Some(q) => {
            let map: serde_json::Map<String, serde_json::Value> = q
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), json!(v)))
                .collect();
            json_body(&serde_json::Value::Object(map).to_string(), "audit query")?
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let from = q.since.map(|d| now.saturating_sub(d.as_std().as_millis() as u64)).unwrap_or(0);
    let rows: Vec<_> = api
        .mesh
        .ledger(100_000)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), vec![]))?
        .into_iter()
        .filter(|e| e["kind"] == "audit" && e["timeMs"].as_u64().unwrap_or(0) >= from)
        .collect();
    Ok((StatusCode::OK, Json(json!(rows))))
}

async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

async fn metrics(State(api): State<Api>) -> Response {
    api.mesh.count_intents();
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, &api.registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    ([(header::CONTENT_TYPE, weft_core::admin::OPENMETRICS_CONTENT_TYPE)], out).into_response()
}

async fn status(State(api): State<Api>) -> Json<serde_json::Value> {
    let mut status = json!(api.mesh.status());
    status["controlPlane"]["tls"] = json!(api.auth.tls);
    Json(status)
}

async fn proxies(State(api): State<Api>) -> Json<serde_json::Value> {
    Json(json!(api.mesh.proxies()))
}

async fn list_resources(State(api): State<Api>) -> Json<serde_json::Value> {
    Json(json!({ "revision": api.mesh.revision(), "resources": api.mesh.resources() }))
}

fn source_of(headers: &HeaderMap) -> String {
    headers
        .get("x-weft-source")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("request body")
        .to_string()
}

/// Body: YAML or JSON, one or more TrafficPolicy / SecurityPolicy documents. The optional
/// `x-weft-source` header names the file, for error messages.
async fn apply(State(api): State<Api>, headers: HeaderMap, body: String) -> Answer {
    let source = source_of(&headers);
    let resources = match weft_api::resource::parse_resources(&body, &source) {
        Ok(resources) => resources,
        Err(mut invalid) => {
            // Every problem at once: what the mesh would also refuse in the documents that
            // read, beside what their own checks found.
            if let Ok((read, _)) = weft_api::resource::parse_resources_leniently(&body, &source) {
                invalid.errors.extend(api.mesh.live_problems(&read));
            }
            return Err(invalid.into());
        }
    };
    let submitted = api.mesh.submit_change(format!("apply {source}"), resources, Vec::new(), &source)?;
    settle(&api.mesh, submitted).await
}

async fn remove(State(api): State<Api>, Path((kind, namespace, name)): Path<(String, String, String)>) -> Answer {
    let key = ResourceKey { kind, namespace, name };
    if Kind::of_key(&key).is_none() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("unknown kind {:?}", key.kind),
            vec![FieldError::new("kind", &key.kind, "one of TrafficPolicy, SecurityPolicy")],
        ));
    }
    let submitted = api.mesh.submit_change(
        format!("delete {key}"),
        Vec::new(),
        vec![key.clone()],
        &format!("weft delete {key}"),
    )?;
    settle(&api.mesh, submitted).await
}

/// Waits for a plain change's intent; 200 when promoted, 409 when it failed or was rolled back,
/// 202 while still running, and 202 at once when it is queued behind another intent or the
/// freeze (`blockedBy` says which: that may last until an operator acts).
async fn settle(mesh: &Mesh, submitted: Submitted) -> Answer {
    let (id, changes) = match submitted {
        Submitted::Unchanged(applied) => return Ok((StatusCode::OK, Json(json!(applied)))),
        Submitted::Queued { id, changes } => (id, changes),
    };
    let (intent, blocker) = mesh
        .wait_settled(&id, APPLY_WAIT)
        .await
        .ok_or_else(|| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("intent {id} vanished"), vec![]))?;
    let reason = intent.decisions.last().map(|d| d.reason.clone()).unwrap_or_default();
    let body = json!({"revision": intent.revision, "changes": changes, "intent": id, "phase": intent.phase.as_str(), "reason": reason, "blockedBy": blocker});
    match intent.phase {
        crate::rollout::Phase::Promoted => Ok((StatusCode::OK, Json(body))),
        p if p.is_terminal() => Err(ApiError(
            StatusCode::CONFLICT,
            format!("intent {id} {}: {reason}", p.as_str()),
            vec![],
        )),
        _ => Ok((StatusCode::ACCEPTED, Json(body))),
    }
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

/// What revision `revision` changed against the one before it: each changed resource as
/// pretty JSON before and after (null where it did not exist), for the dashboard's diff view.
async fn revision_diff(State(api): State<Api>, Path(revision): Path<u64>) -> Result<Json<serde_json::Value>, ApiError> {
    let history = api
        .mesh
        .history()
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), vec![]))?;
    let Some(this) = history.iter().find(|r| r.revision == revision) else {
        return Err(ApiError(StatusCode::NOT_FOUND, format!("revision {revision} not found"), vec![]));
    };
    let previous = history.iter().filter(|r| r.revision < revision).max_by_key(|r| r.revision);
    let text = |set: Option<&Vec<weft_api::resource::Resource>>, key: &weft_api::resource::ResourceKey| {
        set.and_then(|rs| rs.iter().find(|r| r.key() == *key))
            .map(|r| serde_json::to_string_pretty(r).expect("resources serialize"))
    };
    let changes: Vec<_> = this
        .changes
        .iter()
        .filter(|c| c.op != "unchanged")
        .map(|c| {
            json!({
                "op": c.op,
                "key": c.key.to_string(),
                "before": text(previous.map(|p| &p.resources), &c.key),
                "after": text(Some(&this.resources), &c.key),
            })
        })
        .collect();
    Ok(Json(json!({
        "revision": revision,
        "previous": previous.map(|p| p.revision),
        "timeMs": this.time_ms,
        "summary": this.summary,
        "changes": changes,
    })))
}

async fn graph(State(api): State<Api>) -> Json<serde_json::Value> {
    Json(json!(api.mesh.graph()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    revision: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Toggle {
    enabled: bool,
    #[serde(default)]
    namespace: Option<String>,
}

fn json_body<T: serde::de::DeserializeOwned>(body: &str, what: &str) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_str(body).map_err(|e| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("invalid {what} body: {e}"),
            vec![FieldError::new("", "", e.to_string())],
        )
    })?;
    weft_api::resource::from_value(&value).map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("invalid {what} body: {e}"), vec![e]))
}

async fn rollback(State(api): State<Api>, body: String) -> Answer {
    let req: RollbackBody = json_body(&body, "rollback")?;
    let submitted = api.mesh.submit_rollback(req.revision)?;
    settle(&api.mesh, submitted).await
}

async fn list_intents(State(api): State<Api>) -> Json<serde_json::Value> {
    let rows: Vec<_> = api
        .mesh
        .intent_list()
        .iter()
        .map(|i| {
            json!({
                "id": i.id, "title": i.title, "target": i.target, "scope": i.scope, "phase": i.phase.as_str(),
                "mode": i.mode, "stage": i.stage + 1, "stages": i.stages, "candidate": i.candidate, "revision": i.revision,
                "lastDecision": i.decisions.last().map(|d| d.reason.clone()),
            })
        })
        .collect();
    Json(json!(rows))
}

/// Body: one Intent document (YAML or JSON).
async fn submit_intent(State(api): State<Api>, headers: HeaderMap, body: String) -> Answer {
    let source = source_of(&headers);
    let objects = weft_api::resource::parse_objects(&body, &source)?;
    let [Object::Intent(doc)] = <[Object; 1]>::try_from(objects).map_err(|objs| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("{source}: expected exactly one Intent, got {} documents", objs.len()),
            vec![FieldError::new("kind", "", "one Intent per submission")],
        )
    })?
    else {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("{source}: expected an Intent; apply policies with `weft apply`"),
            vec![FieldError::new("kind", "", "must be Intent")],
        ));
    };
    let record = api.mesh.submit_intent(doc, &source)?;
    Ok((StatusCode::CREATED, Json(record.view())))
}

async fn show_intent(State(api): State<Api>, Path(id): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    let blocker = api.mesh.blocker(&id);
    let stage_proxies = api.mesh.stage_proxies(&id);
    api.mesh
        .intent(&id)
        .map(|i| {
            let mut view = i.view();
            view["blockedBy"] = json!(blocker);
            view["stageProxies"] = json!(stage_proxies);
            Json(view)
        })
        .ok_or_else(|| ApiError(StatusCode::NOT_FOUND, format!("intent {id} not found"), vec![]))
}

async fn approve(
    State(api): State<Api>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(api.mesh.approve(&id, &actor.name)?.view()))
}

async fn abort(
    State(api): State<Api>,
    Extension(actor): Extension<Actor>,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(api.mesh.abort(&id, &actor.name)?.view()))
}

async fn bypass(
    State(api): State<Api>,
    Extension(actor): Extension<Actor>,
    Path(service): Path<String>,
    body: String,
) -> Result<Json<serde_json::Value>, ApiError> {
    let t: Toggle = json_body(&body, "bypass")?;
    let namespace = t.namespace.unwrap_or_else(|| "default".into());
    // A name no service can have is refused, not stored (a durable bypass of "Bad Name!" was).
    let mut errors = Vec::new();
    weft_api::resource::check_name("service", &service, &mut errors);
    weft_api::resource::check_name("namespace", &namespace, &mut errors);
    if !errors.is_empty() {
        return Err(Invalid::new("bypass", errors).into());
    }
    api.mesh
        .set_bypass(&namespace, &service, t.enabled, &actor.name)
        .map_err(store_error)?;
    Ok(Json(json!({"service": service, "namespace": namespace, "bypass": t.enabled})))
}

/// Per destination service and route, as callers saw it over the last 10 s (`weft top`).
async fn top(State(api): State<Api>) -> Json<serde_json::Value> {
    Json(json!({"routes": api.mesh.routes()}))
}

/// The last minutes of rps, error rate and p99 per service (the dashboard's charts).
async fn history(State(api): State<Api>) -> Json<serde_json::Value> {
    Json(json!(api.history.snapshot()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModeBody {
    mode: weft_api::resource::RolloutMode,
}

/// Body `{mode: auto|manual}`: switches an open intent's rollout mode (the dashboard's Auto).
async fn set_mode(State(api): State<Api>, Extension(actor): Extension<Actor>, Path(id): Path<String>, body: String) -> Answer {
    let m: ModeBody = json_body(&body, "mode")?;
    let record = api.mesh.set_mode(&id, m.mode, &actor.name)?;
    Ok((
        StatusCode::OK,
        Json(json!({"id": record.id, "mode": record.mode, "phase": record.phase.as_str()})),
    ))
}

async fn freeze(State(api): State<Api>, Extension(actor): Extension<Actor>, body: String) -> Result<Json<serde_json::Value>, ApiError> {
    let t: Toggle = json_body(&body, "freeze")?;
    api.mesh.freeze(t.enabled, &actor.name).map_err(store_error)?;
    Ok(Json(json!({"frozen": t.enabled})))
}

async fn ledger(State(api): State<Api>) -> Result<Json<serde_json::Value>, ApiError> {
    let rows = api
        .mesh
        .ledger(500)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), vec![]))?;
    Ok(Json(json!(rows)))
}

/// Live request metadata for `service` (never bodies), as server-sent events (admin role).
async fn tap(State(api): State<Api>, Path(service): Path<String>) -> Result<Response, ApiError> {
    let handle = api.mesh.taps.open(&service);
    let stream = TapStream(handle).map(|e| {
        let data = json!({
            "time": e.time_ms, "direction": e.direction, "proxy": e.proxy, "source": e.source,
            "destination": e.destination, "service": e.service, "route": e.route, "method": e.method,
            "authority": e.authority, "path": e.path, "status": e.status, "reason": e.reason,
            "durationMs": e.duration_ms, "upstream": e.upstream,
        });
        Ok::<_, std::convert::Infallible>(Event::default().data(data.to_string()))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()).into_response())
}

/// The events of an open tap; the tap closes when the client goes away and this drops.
struct TapStream(crate::taps::TapHandle);

impl tokio_stream::Stream for TapStream {
    type Item = weft_api::proto::TapEvent;
    fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        self.0.rx.poll_recv(cx)
    }
}

/// Server-sent events: one `data:` JSON object per change (intents, decisions, bypass, freeze).
async fn events(State(api): State<Api>) -> Sse<impl tokio_stream::Stream<Item = Result<Event, std::convert::Infallible>>> {
    let stream = tokio_stream::wrappers::BroadcastStream::new(api.mesh.subscribe_events())
        .filter_map(|msg| msg.ok().map(|data| Ok(Event::default().data(data))));
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Default lifetime of a join token: long enough to start a proxy, short enough that a leaked
/// one is soon worthless (a proxy renews with its certificate, not its token).
const TOKEN_TTL: Duration = Duration::from_secs(3600);

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TokenRequest {
    /// `NAMESPACE/NAME`.
    workload: String,
    /// Defaults to the workload's name.
    #[serde(default)]
    service_account: Option<String>,
    /// Token lifetime, e.g. `1h` (default).
    #[serde(default)]
    ttl: Option<weft_api::Duration>,
    /// Certificates it may be redeemed for; unlimited until it expires when absent.
    #[serde(default)]
    uses: Option<u32>,
}

fn token_view(t: &crate::store::TokenRecord) -> serde_json::Value {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let state = match t.usable() {
        Err(crate::store::TokenRefusal::Revoked(_)) => "revoked",
        Err(_) => "used-up",
        Ok(()) if t.expires_at <= now => "expired",
        Ok(()) => "active",
    };
    json!({
        "id": t.id, "workload": t.workload, "serviceAccount": t.service_account, "createdAt": t.created_at,
        "expiresAt": t.expires_at, "usesAllowed": t.uses_allowed, "uses": t.uses, "revoked": t.revoked, "state": state,
    })
}

/// 503 when the store cannot take a write now (etcd without quorum, a deposed leader): the
/// caller may retry; 409 when another replica wrote first; 500 otherwise.
fn store_error(e: crate::store::StoreError) -> ApiError {
    use crate::store::StoreError;
    let status = match e {
        StoreError::Unavailable(_) | StoreError::Fenced(_) | StoreError::NotLeader(_) => StatusCode::SERVICE_UNAVAILABLE,
        StoreError::Conflict(_) => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError(status, e.to_string(), vec![])
}

/// A join token for one workload. The token is in this answer only: never logged, never
/// stored (the store keeps its id, workload, expiry and use count).
async fn create_token(State(api): State<Api>, body: String) -> Result<Json<serde_json::Value>, ApiError> {
    let req: TokenRequest = json_body(&body, "token")?;
    let Some((ns, name)) = req.workload.split_once('/').filter(|(n, w)| !n.is_empty() && !w.is_empty()) else {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("invalid workload {:?}: expected NAMESPACE/NAME", req.workload),
            vec![FieldError::new("workload", &req.workload, "expected NAMESPACE/NAME")],
        ));
    };
    let sa = req.service_account.unwrap_or_else(|| name.to_string());
    let ttl = req.ttl.map(|t| t.as_std()).unwrap_or(TOKEN_TTL);
    if ttl.is_zero() {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "ttl must be greater than zero".into(),
            vec![FieldError::new("ttl", "0s", "must be greater than zero")],
        ));
    }
    if req.uses == Some(0) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "uses must be at least 1 (omit it for no limit)".into(),
            vec![FieldError::new("uses", 0, "must be at least 1")],
        ));
    }
    let (token, record) = api.mesh.create_token(ns, name, &sa, ttl, req.uses).map_err(store_error)?;
    Ok(Json(json!({
        "token": token, "id": record.id, "workload": record.workload, "identity": api.mesh.ca.identity(ns, &sa),
        "expiresInSeconds": ttl.as_secs(), "expiresAt": record.expires_at, "usesAllowed": record.uses_allowed,
    })))
}

/// Every join token on record (ids, workloads, expiry, uses; never the secret).
async fn list_tokens(State(api): State<Api>) -> Result<Json<serde_json::Value>, ApiError> {
    let rows: Vec<_> = api.mesh.tokens().map_err(store_error)?.iter().map(token_view).collect();
    Ok(Json(json!(rows)))
}

/// Refuses token `id` for registration and certificates from now on.
async fn revoke_token(State(api): State<Api>, Path(id): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    match api.mesh.revoke_token(&id).map_err(store_error)? {
        Some(record) => Ok(Json(token_view(&record))),
        None => Err(ApiError(StatusCode::NOT_FOUND, format!("token {id} not found"), vec![])),
    }
}

async fn ca_info(State(api): State<Api>) -> Json<serde_json::Value> {
    Json(json!(api.mesh.ca.view()))
}

/// Starts a root rotation with an overlap bundle; it completes by itself.
async fn rotate_root(State(api): State<Api>) -> Result<Json<serde_json::Value>, ApiError> {
    api.mesh.rotate_root().map_err(|e| match e {
        crate::ca::CaError::Busy(why) => ApiError(StatusCode::CONFLICT, why, vec![]),
        crate::ca::CaError::Store(e) => store_error(e),
        other => ApiError(StatusCode::INTERNAL_SERVER_ERROR, other.to_string(), vec![]),
    })?;
    Ok(Json(json!(api.mesh.ca.view())))
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
            ChangeError::Conflict(why) => ApiError(StatusCode::CONFLICT, why, vec![]),
            ChangeError::Store(s) => store_error(s),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let field = self.2.first().map(|e| e.field.clone()).unwrap_or_default();
        (self.0, Json(json!({ "error": self.1, "field": field, "errors": self.2 }))).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_has_an_access_rule_and_every_rule_a_route() {
        let registered = registered_routes();
        for (method, path) in &registered {
            assert!(
                crate::auth::access_of(method.as_str(), path).is_some(),
                "{method} {path} is routed but has no row in auth::ACCESS"
            );
        }
        for (method, path, _) in crate::auth::ACCESS {
            assert!(
                registered.iter().any(|(m, p)| m.as_str() == *method && p == path),
                "auth::ACCESS names {method} {path}, which no route serves"
            );
        }
    }
}

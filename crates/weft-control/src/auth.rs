//! Who may call the REST API: API tokens with roles, dashboard sessions, the one table that
//! names the role every route needs, and the audit record of every mutating call.
//!
//! Tokens are random secrets shown once; the store keeps only their SHA-256. Every comparison
//! of a secret is constant-time, and no secret is ever logged or echoed.

use crate::clock::Clock;
use crate::store::{Store, StoreError};
use axum::body::Body;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The name of the admin token written to `admin.token` at first start.
pub(crate) const BOOTSTRAP_TOKEN: &str = "bootstrap-admin";
/// The dashboard's session cookie.
pub(crate) const SESSION_COOKIE: &str = "weft_session";
/// How long a dashboard session lasts at most (less when its token expires sooner).
const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// How much of a mutating call's body the audit record keeps.
const AUDIT_BODY: usize = 2048;

/// What a caller may do; each role includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Every read: status, proxies, resources, revisions, history, intents, ledger, top,
    /// events, the dashboard's data.
    Viewer,
    /// Viewer, plus intent submit/approve/abort/mode, freeze and bypass.
    Operator,
    /// Operator, plus apply/delete/rollback, join and API tokens, CA rotation and tap.
    Admin,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        })
    }
}

/// What a route needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone: liveness, readiness, the dashboard's static page, signing in and out.
    Open,
    /// `viewer`, or anyone when the control plane runs with `--metrics-open`.
    Metrics,
    Role(Role),
}

/// The role every route needs: one row per method and path, as the router names them. A route
/// without a row is refused to everyone (and fails `every_route_has_an_access_rule`).
pub const ACCESS: &[(&str, &str, Access)] = &[
    ("GET", "/", Access::Open),
    ("GET", "/live", Access::Open),
    ("GET", "/ready", Access::Open),
    ("POST", "/api/v1/session", Access::Open),
    ("DELETE", "/api/v1/session", Access::Open),
    ("GET", "/metrics", Access::Metrics),
    ("GET", "/api/v1/whoami", Access::Role(Role::Viewer)),
    ("GET", "/api/v1/status", Access::Role(Role::Viewer)),
    ("GET", "/api/v1/proxies", Access::Role(Role::Viewer)),
    ("GET", "/api/v1/resources", Access::Role(Role::Viewer)),
    ("GET", "/api/v1/revisions", Access::Role(Role::Viewer)),
    ("GET", "/api/v1/revisions/{revision}/diff", Access::Role(Role::Viewer)),
    ("GET", "/api/v1/graph", Access::Role(Role::Viewer)),
    ("GET", "/api/v1/intents", Access::Role(Role::Viewer)),
    ("GET", "/api/v1/intents/{id}", Access::Role(Role::Viewer)),
    ("GET", "/api/v1/history", Access::Role(Role::Viewer)),
    ("GET", "/api/v1/top", Access::Role(Role::Viewer)),
    ("GET", "/api/v1/ledger", Access::Role(Role::Viewer)),
    ("GET", "/api/v1/audit", Access::Role(Role::Viewer)),
    ("GET", "/api/v1/ca", Access::Role(Role::Viewer)),
    ("GET", "/api/v1/events", Access::Role(Role::Viewer)),
    ("POST", "/api/v1/intents", Access::Role(Role::Operator)),
    ("POST", "/api/v1/intents/{id}/approve", Access::Role(Role::Operator)),
    ("POST", "/api/v1/intents/{id}/abort", Access::Role(Role::Operator)),
    ("POST", "/api/v1/intents/{id}/mode", Access::Role(Role::Operator)),
    ("POST", "/api/v1/bypass/{service}", Access::Role(Role::Operator)),
    ("POST", "/api/v1/freeze", Access::Role(Role::Operator)),
    ("POST", "/api/v1/resources", Access::Role(Role::Admin)),
    ("DELETE", "/api/v1/resources/{kind}/{namespace}/{name}", Access::Role(Role::Admin)),
    ("POST", "/api/v1/rollback", Access::Role(Role::Admin)),
    ("GET", "/api/v1/tokens", Access::Role(Role::Admin)),
    ("POST", "/api/v1/tokens", Access::Role(Role::Admin)),
    ("POST", "/api/v1/tokens/{id}/revoke", Access::Role(Role::Admin)),
    ("GET", "/api/v1/admin/tokens", Access::Role(Role::Admin)),
    ("POST", "/api/v1/admin/tokens", Access::Role(Role::Admin)),
    ("DELETE", "/api/v1/admin/tokens/{name}", Access::Role(Role::Admin)),
    ("POST", "/api/v1/ca/rotate", Access::Role(Role::Admin)),
    ("GET", "/api/v1/tap/{service}", Access::Role(Role::Admin)),
];

/// The access rule of a route, by method and path pattern.
pub(crate) fn access_of(method: &str, path: &str) -> Option<Access> {
    ACCESS.iter().find(|(m, p, _)| *m == method && *p == path).map(|(_, _, a)| *a)
}

/// An API token as stored: never the secret, only its hash.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ApiToken {
    pub(crate) name: String,
    pub(crate) role: Role,
    /// Hex SHA-256 of the secret.
    pub(crate) hash: String,
    pub(crate) created_ms: u64,
    /// Unix time in ms after which the token is refused; none for no expiry.
    pub(crate) expires_ms: Option<u64>,
}

/// Who made a call: attached to every authorized request.
#[derive(Clone, Debug)]
pub(crate) struct Actor {
    pub(crate) name: String,
    pub(crate) role: Role,
    /// Whether the credential came from the dashboard's session cookie.
    pub(crate) session: bool,
}

#[derive(Clone, Debug)]
struct Session {
    token: String,
    expires_ms: u64,
}

/// Why a credential was not accepted: 401 with a hint, or 403 naming the role needed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Denied {
    #[error("no credential")]
    Missing,
    #[error("the token is not valid (unknown or revoked)")]
    Unknown,
    #[error("token {0} has expired")]
    Expired(String),
    #[error("the dashboard session has ended; sign in again")]
    SessionEnded,
    #[error("this needs the {needed} role; token {name} has the {has} role")]
    Role { needed: Role, name: String, has: Role },
    #[error("cross-origin request refused: origin {0:?} is not this dashboard")]
    CrossOrigin(String),
    #[error("route {0} has no access rule; refused to everyone")]
    NoRule(String),
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("invalid token name {0:?}: use 1-63 of a-z, 0-9, '-', '_', '.'")]
    Name(String),
    #[error("a token named {0} exists; revoke it first")]
    Exists(String),
    #[error("no token named {0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("no randomness for a token")]
    Random,
}

/// The key replicas sign forwarded changes with, made once by whichever replica comes first.
fn forwarding_key(store: &Store) -> Result<aws_lc_rs::hmac::Key, TokenError> {
    use base64::Engine;
    let secret = match store.secret("forwarding_key")? {
        Some(k) => k,
        None => store.create_secret("forwarding_key", &random_secret("")?)?,
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(secret.trim())
        .map_err(|e| TokenError::Store(StoreError::Db(format!("the stored forwarding key is not base64: {e}"))))?;
    Ok(aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &bytes))
}

/// The API tokens and dashboard sessions of this control plane.
pub(crate) struct Auth {
    store: Arc<Store>,
    /// Signs the forwarding headers a follower adds for the leader ([`FORWARDED_SIG`]): the
    /// replicas share it through the store; nobody else has it.
    forwarding: aws_lc_rs::hmac::Key,
    tokens: RwLock<Vec<ApiToken>>,
    sessions: RwLock<HashMap<String, Session>>,
    /// `/metrics` without a credential (`--metrics-open`).
    pub(crate) metrics_open: bool,
    /// Whether the API is served over TLS: session cookies are then `Secure`.
    pub(crate) tls: bool,
    /// What token and session expiry are checked against.
    clock: Clock,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn sha256_hex(secret: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, secret.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn random_secret(prefix: &str) -> Result<String, TokenError> {
    use base64::Engine;
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| TokenError::Random)?;
    Ok(format!(
        "{prefix}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

fn valid_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'))
}

// === impl Auth ===

impl Auth {
    /// Loads the stored tokens. On the first start (no bootstrap token recorded yet) the admin
    /// token in `admin_file` is registered, written there first (mode 0600) when missing.
    pub(crate) fn open(store: Arc<Store>, admin_file: &std::path::Path, metrics_open: bool, tls: bool) -> Result<Self, TokenError> {
        let tokens = stored_tokens(&store)?;
        let forwarding = forwarding_key(&store)?;
        let auth = Self {
            store,
            forwarding,
            tokens: RwLock::new(tokens),
            sessions: RwLock::new(HashMap::new()),
            metrics_open,
            tls,
            clock: Clock::default(),
        };
        if auth.store.secret("bootstrap_token_registered")?.is_none() {
            let secret = match std::fs::read_to_string(admin_file) {
                Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
                _ => {
                    let secret = random_secret("weft_")?;
                    write_private(admin_file, &secret)
                        .map_err(|e| TokenError::Store(StoreError::Db(format!("cannot write {}: {e}", admin_file.display()))))?;
                    secret
                }
            };
            auth.insert(ApiToken {
                name: BOOTSTRAP_TOKEN.into(),
                role: Role::Admin,
                hash: sha256_hex(&secret),
                created_ms: auth.clock.unix_ms(),
                expires_ms: None,
            })?;
            auth.store.put_secret("bootstrap_token_registered", "1")?;
        }
        Ok(auth)
    }

    /// Reads the tokens again: another replica on the same store created or revoked one.
    pub(crate) fn reload(&self) -> Result<(), TokenError> {
        let tokens = stored_tokens(&self.store)?;
        *self.tokens.write() = tokens;
        Ok(())
    }

    fn insert(&self, token: ApiToken) -> Result<(), TokenError> {
        let json = serde_json::to_string(&token).expect("a token serializes");
        self.store.put_api_token(&token.name, &json)?;
        let mut tokens = self.tokens.write();
        tokens.retain(|t| t.name != token.name);
        tokens.push(token);
        Ok(())
    }

    /// The same tokens and sessions, expiring by `clock`.
    #[cfg(test)]
    pub(crate) fn with_clock(self, clock: Clock) -> Self {
        Self { clock, ..self }
    }

    /// Creates a token; returns its record and the secret, which is never shown again.
    pub(crate) fn create(&self, name: &str, role: Role, ttl: Option<Duration>) -> Result<(ApiToken, String), TokenError> {
        if !valid_name(name) {
            return Err(TokenError::Name(name.into()));
        }
        let secret = random_secret("weft_")?;
        let created = self.clock.unix_ms();
        let token = ApiToken {
            name: name.into(),
            role,
            hash: sha256_hex(&secret),
            created_ms: created,
            expires_ms: ttl.map(|t| created + t.as_millis() as u64),
        };
        // Checked and added under one lock: two creates of one name cannot both succeed.
        let mut tokens = self.tokens.write();
        if tokens.iter().any(|t| t.name == name) {
            return Err(TokenError::Exists(name.into()));
        }
        self.store
            .put_api_token(name, &serde_json::to_string(&token).expect("a token serializes"))?;
        tokens.push(token.clone());
        Ok((token, secret))
    }

    /// Every token, without secrets.
    pub(crate) fn list(&self) -> Vec<ApiToken> {
        let mut tokens = self.tokens.read().clone();
        tokens.sort_by(|a, b| a.name.cmp(&b.name));
        tokens
    }

    /// Revokes a token at once, with every dashboard session signed in with it.
    pub(crate) fn revoke(&self, name: &str) -> Result<(), TokenError> {
        if !self.tokens.read().iter().any(|t| t.name == name) {
            return Err(TokenError::NotFound(name.into()));
        }
        self.store.delete_api_token(name)?;
        self.tokens.write().retain(|t| t.name != name);
        self.sessions.write().retain(|_, s| s.token != name);
        Ok(())
    }

    /// The token a secret belongs to. Compares the secret's hash with every token's, in
    /// constant time each.
    pub(crate) fn verify(&self, secret: &str) -> Result<Actor, Denied> {
        let hash = sha256_hex(secret);
        let tokens = self.tokens.read();
        let mut found = None;
        for t in tokens.iter() {
            if constant_time_eq(t.hash.as_bytes(), hash.as_bytes()) {
                found = Some(t);
            }
        }
        let t = found.ok_or(Denied::Unknown)?;
        if t.expires_ms.is_some_and(|e| e <= self.clock.unix_ms()) {
            return Err(Denied::Expired(t.name.clone()));
        }
        Ok(Actor {
            name: t.name.clone(),
            role: t.role,
            session: false,
        })
    }

    /// Signs the dashboard in with a token: a session id for the cookie, and its lifetime.
    pub(crate) fn open_session(&self, secret: &str) -> Result<(String, Actor, Duration), Denied> {
        let actor = self.verify(secret)?;
        let now = self.clock.unix_ms();
        let token_left = self
            .tokens
            .read()
            .iter()
            .find(|t| t.name == actor.name)
            .and_then(|t| t.expires_ms)
            .map(|e| e.saturating_sub(now))
            .unwrap_or(u64::MAX);
        let ttl_ms = token_left.min(SESSION_TTL.as_millis() as u64);
        let id = random_secret("").map_err(|_| Denied::Unknown)?;
        let mut sessions = self.sessions.write();
        sessions.retain(|_, s| s.expires_ms > now);
        sessions.insert(
            id.clone(),
            Session {
                token: actor.name.clone(),
                expires_ms: now + ttl_ms,
            },
        );
        Ok((id, actor, Duration::from_millis(ttl_ms)))
    }

    pub(crate) fn close_session(&self, id: &str) {
        self.sessions.write().remove(id);
    }

    fn session(&self, id: &str) -> Result<Actor, Denied> {
        let sessions = self.sessions.read();
        let mut found = None;
        for (k, s) in sessions.iter() {
            if constant_time_eq(k.as_bytes(), id.as_bytes()) {
                found = Some(s);
            }
        }
        let s = found.ok_or(Denied::SessionEnded)?;
        if s.expires_ms <= self.clock.unix_ms() {
            return Err(Denied::SessionEnded);
        }
        let tokens = self.tokens.read();
        let t = tokens.iter().find(|t| t.name == s.token).ok_or(Denied::SessionEnded)?;
        if t.expires_ms.is_some_and(|e| e <= self.clock.unix_ms()) {
            return Err(Denied::Expired(t.name.clone()));
        }
        Ok(Actor {
            name: t.name.clone(),
            role: t.role,
            session: true,
        })
    }

    /// The [`FORWARDED_SIG`] value for a change this replica forwards: when it was signed and
    /// an HMAC over that time, both forwarding headers, the method and the path.
    pub(crate) fn sign_forwarded(&self, by: &str, caller: &str, method: &Method, path: &str) -> String {
        let at = self.clock.unix_ms() / 1000;
        let tag = aws_lc_rs::hmac::sign(&self.forwarding, forwarded_text(at, by, caller, method, path).as_bytes());
        let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        format!("{at}.{hex}")
    }

    /// Whether a request's forwarding headers were set by a replica (signed with the shared key,
    /// within [`FORWARD_SKEW`] of now). Anyone else's are stripped ([`trust_forwarded`]).
    fn forwarded_by_replica(&self, headers: &HeaderMap, method: &Method, path: &str) -> bool {
        let text = |h: &str| headers.get(h).and_then(|v| v.to_str().ok());
        let (Some(by), Some(sig)) = (text(FORWARDED_BY), text(FORWARDED_SIG)) else {
            return false;
        };
        let caller = text(FORWARDED_FOR).unwrap_or_default();
        let Some((at, hex)) = sig.split_once('.') else {
            return false;
        };
        let Ok(at) = at.parse::<u64>() else {
            return false;
        };
        if (self.clock.unix_ms() / 1000).abs_diff(at) > FORWARD_SKEW.as_secs() || hex.len() % 2 != 0 {
            return false;
        }
        let Some(tag) = (0..hex.len())
            .step_by(2)
            .map(|i| hex.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
            .collect::<Option<Vec<u8>>>()
        else {
            return false;
        };
        aws_lc_rs::hmac::verify(&self.forwarding, forwarded_text(at, by, caller, method, path).as_bytes(), &tag).is_ok()
    }

    /// The caller of a request: a bearer token, or else the dashboard's session cookie.
    pub(crate) fn caller(&self, headers: &HeaderMap) -> Result<Actor, Denied> {
        if let Some(v) = headers.get(header::AUTHORIZATION) {
            let secret = v
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::trim)
                .ok_or(Denied::Unknown)?;
            return self.verify(secret);
        }
        match session_cookie(headers) {
            Some(id) => self.session(id),
            None => Err(Denied::Missing),
        }
    }
}

/// The session id in a request's cookies, if any.
pub(crate) fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v)
}

fn stored_tokens(store: &Store) -> Result<Vec<ApiToken>, TokenError> {
    Ok(store
        .api_tokens()?
        .iter()
        .filter_map(|json| serde_json::from_str::<ApiToken>(json).ok())
        .collect())
}

fn write_private(path: &std::path::Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(secret.as_bytes())
}

const HINT: &str = "send `Authorization: Bearer TOKEN`. The first admin token is admin.token in the control plane's \
data directory; an admin creates others with `weft admin token create --name NAME --role viewer|operator|admin`; \
`weft login --server URL --token-file FILE` stores one for the CLI, and the dashboard asks for one";

// === impl Denied ===

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        let body = match &self {
            Denied::Role { needed, .. } => json!({"error": self.to_string(), "role": needed}),
            Denied::CrossOrigin(_) | Denied::NoRule(_) => json!({"error": self.to_string()}),
            _ => json!({"error": self.to_string(), "hint": HINT}),
        };
        let status = match self {
            Denied::Role { .. } | Denied::CrossOrigin(_) | Denied::NoRule(_) => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        };
        let mut resp = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer realm=\"weft\""));
        }
        resp
    }
}

/// The authorization middleware of every route: finds the route's rule, checks the caller's
/// credential and role, refuses cross-site writes made with the dashboard's cookie, and records
/// every mutating call in the audit ledger.
pub(crate) async fn authorize(State(auth): State<Arc<Auth>>, req: Request, next: Next) -> Response {
    let auth = &*auth;
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_default();
    let method = req.method().clone();
    let Some(access) = access_of(method.as_str(), &route) else {
        tracing::error!(%method, %route, "route without an access rule refused");
        return Denied::NoRule(format!("{method} {route}")).into_response();
    };
    let needed = match access {
        Access::Open => return next.run(req).await,
        Access::Metrics if auth.metrics_open => return next.run(req).await,
        Access::Metrics => Role::Viewer,
        Access::Role(r) => r,
    };
    let actor = match auth.caller(req.headers()) {
        Ok(a) => a,
        Err(denied) => return denied.into_response(),
    };
    let mutating = !matches!(method, Method::GET | Method::HEAD);
    let source = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_default();
    let path = req.uri().path().to_string();
    let refused = if actor.role < needed {
        Some(Denied::Role {
            needed,
            name: actor.name.clone(),
            has: actor.role,
        })
    } else if actor.session && mutating {
        same_origin(&req, auth.tls).err()
    } else {
        None
    };
    if let Some(denied) = refused {
        // A refused attempt to change something is in the trail too, with who tried.
        if mutating {
            let why = denied.to_string();
            audit(
                auth,
                &actor,
                &source,
                &method,
                &path,
                403,
                "",
                json!({ "error": why }),
                [None, None],
            );
        }
        return denied.into_response();
    }
    if !mutating {
        let mut req = req;
        req.extensions_mut().insert(actor);
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    let forwarded = [FORWARDED_BY, FORWARDED_FOR].map(|h| parts.headers.get(h).and_then(|v| v.to_str().ok()).map(str::to_string));
    let bytes = match axum::body::to_bytes(body, 4 << 20).await {
        Ok(b) => b,
        Err(_) => {
            return (
                StatusCode::PAYLOAD_TOO_LARGE,
                axum::Json(json!({"error": "request body over 4 MiB"})),
            )
                .into_response();
        }
    };
    let change = String::from_utf8_lossy(&bytes[..bytes.len().min(AUDIT_BODY)]).into_owned();
    parts.extensions.insert(actor.clone());
    let resp = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    if resp.extensions().get::<AuditedByLeader>().is_some() {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let out = axum::body::to_bytes(body, 16 << 20).await.unwrap_or_default();
    let reply: serde_json::Value = serde_json::from_slice(&out).unwrap_or_default();
    // Only fields that name what changed; replies that carry secrets (tokens) keep them out.
    let outcome: serde_json::Map<String, serde_json::Value> = ["revision", "intent", "id", "phase", "name", "error"]
        .iter()
        .filter_map(|k| reply.get(*k).map(|v| (k.to_string(), v.clone())))
        .collect();
    let status = parts.status.as_u16();
    audit(
        auth,
        &actor,
        &source,
        &method,
        &path,
        status,
        &change,
        serde_json::Value::Object(outcome),
        forwarded,
    );
    Response::from_parts(parts, Body::from(out))
}

/// Marks a change a follower forwarded, with the follower's name: the leader handles it itself
/// (a forwarded change is never forwarded again) and its audit record names the follower.
pub(crate) const FORWARDED_BY: &str = "x-weft-forwarded-by";
/// The address a follower was called from, as it tells the leader: the leader's audit record
/// keeps it as `forwardedFor` beside `source`, the connection's own address (the follower's).
pub(crate) const FORWARDED_FOR: &str = "x-weft-forwarded-for";

/// The signature of the forwarding headers (see [`Auth::sign_forwarded`]): without a valid
/// one, `x-weft-forwarded-*` headers are a caller's own and are stripped before anything reads
/// them, so nobody outside the replicas can skip a follower's forwarding or put a made-up
/// follower or caller address into the audit ledger.
pub(crate) const FORWARDED_SIG: &str = "x-weft-forwarded-sig";
/// How far a forwarding signature's time may be from the leader's clock.
const FORWARD_SKEW: Duration = Duration::from_secs(60);

fn forwarded_text(at: u64, by: &str, caller: &str, method: &Method, path: &str) -> String {
    format!("weft-forwarded/1\n{at}\n{by}\n{caller}\n{method}\n{path}")
}

/// Strips forwarding headers that no replica signed; runs before authorization and forwarding.
pub(crate) async fn trust_forwarded(State(auth): State<Arc<Auth>>, mut req: Request, next: Next) -> Response {
    let claims = [FORWARDED_BY, FORWARDED_FOR, FORWARDED_SIG]
        .iter()
        .any(|h| req.headers().contains_key(*h));
    if claims {
        let path = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
        if !auth.forwarded_by_replica(req.headers(), req.method(), &path) {
            tracing::warn!(path, "stripped forwarding headers no replica signed");
            for h in [FORWARDED_BY, FORWARDED_FOR, FORWARDED_SIG] {
                req.headers_mut().remove(h);
            }
        }
    }
    next.run(req).await
}

/// On the answer of a change a follower forwarded and the leader answered: the leader audited
/// it, so the follower does not (one record per change). A change the follower could not
/// forward is audited where it was refused.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AuditedByLeader;

/// Appends one audit record to the ledger.
#[allow(clippy::too_many_arguments)]
/// `forwarded`: the follower that forwarded the call and the address it was called from, as
/// that follower tells.
fn audit(
    auth: &Auth,
    actor: &Actor,
    source: &str,
    method: &Method,
    path: &str,
    status: u16,
    change: &str,
    outcome: serde_json::Value,
    forwarded: [Option<String>; 2],
) {
    let mut entry = json!({
        "timeMs": now_ms(), "kind": "audit", "actor": actor.name, "role": actor.role, "source": source,
        "via": if actor.session { "dashboard" } else { "token" },
        "method": method.as_str(), "path": path, "status": status,
        "change": change, "outcome": outcome,
    });
    for (key, value) in ["forwardedBy", "forwardedFor"].into_iter().zip(forwarded) {
        if let Some(value) = value {
            entry[key] = json!(value);
        }
    }
    if let Err(error) = auth.store.append_ledger(&entry.to_string()) {
        tracing::error!(%error, "cannot write the audit record");
    }
    tracing::info!(actor = %actor.name, role = %actor.role, %source, %method, %path, status, "audited call");
}

/// A write made with the dashboard's cookie must come from the dashboard's own origin: the
/// scheme it is served on and the authority the request names (`Host` in HTTP/1.1,
/// `:authority` in HTTP/2).
fn same_origin(req: &Request, tls: bool) -> Result<(), Denied> {
    let headers = req.headers();
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()).unwrap_or("");
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(header::HOST).and_then(|v| v.to_str().ok()))
        .unwrap_or("");
    let expected = format!("{}://{host}", if tls { "https" } else { "http" });
    if host.is_empty() || origin != expected {
        return Err(Denied::CrossOrigin(origin.to_string()));
    }
    Ok(())
}

/// The `Set-Cookie` value for a session (or its removal with `None`).
pub(crate) fn session_cookie_header(id: Option<(&str, Duration)>, tls: bool) -> String {
    let secure = if tls { "; Secure" } else { "" };
    match id {
        Some((id, ttl)) => format!(
            "{SESSION_COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
            ttl.as_secs()
        ),
        None => format!("{SESSION_COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> (Auth, std::path::PathBuf) {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let dir = std::env::temp_dir().join(format!("weft-auth-{}-{nanos}", std::process::id()));
        let store = Arc::new(Store::open(&dir).unwrap());
        let a = Auth::open(store, &dir.join("admin.token"), false, false).unwrap();
        (a, dir)
    }

    #[test]
    fn tokens_are_stored_as_hashes_verified_and_revoked() {
        let (auth, dir) = auth();
        let admin = std::fs::read_to_string(dir.join("admin.token")).unwrap();
        assert_eq!(auth.verify(&admin).unwrap().role, Role::Admin);
        let (record, secret) = auth.create("ci", Role::Viewer, None).unwrap();
        assert_ne!(record.hash, secret);
        assert!(!record.hash.contains(&secret));
        assert_eq!(auth.verify(&secret).unwrap().name, "ci");
        assert!(matches!(auth.verify("weft_nope"), Err(Denied::Unknown)));
        assert!(matches!(auth.create("ci", Role::Admin, None), Err(TokenError::Exists(_))));
        assert!(matches!(auth.create("Bad Name", Role::Admin, None), Err(TokenError::Name(_))));
        let (id, _, _) = auth.open_session(&secret).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, format!("a=b; {SESSION_COOKIE}={id}").parse().unwrap());
        assert_eq!(auth.caller(&headers).unwrap().name, "ci");
        auth.revoke("ci").unwrap();
        assert!(matches!(auth.verify(&secret), Err(Denied::Unknown)));
        assert!(auth.caller(&headers).is_err(), "sessions end with their token");
        let (_, short) = auth.create("short", Role::Viewer, Some(Duration::ZERO)).unwrap();
        assert!(matches!(auth.verify(&short), Err(Denied::Expired(_))));
        // A restart keeps the tokens (as hashes) and does not mint another bootstrap token.
        drop(auth);
        let store = Arc::new(Store::open(&dir).unwrap());
        let again = Auth::open(store, &dir.join("admin.token"), false, false).unwrap();
        assert_eq!(
            again.list().iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            ["bootstrap-admin", "short"]
        );
        assert_eq!(again.verify(&admin).unwrap().name, BOOTSTRAP_TOKEN);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn tokens_and_sessions_expire_when_their_time_has_passed_on_the_clock() {
        let (auth, dir) = auth();
        let clock = Clock::manual();
        let auth = auth.with_clock(clock.clone());
        let session_cookie = |id: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::COOKIE, format!("{SESSION_COOKIE}={id}").parse().unwrap());
            headers
        };
        let (_, ops) = auth.create("ops", Role::Operator, Some(Duration::from_secs(2 * 3600))).unwrap();
        let (ops_session, _, ttl) = auth.open_session(&ops).unwrap();
        assert_eq!(ttl, Duration::from_secs(2 * 3600), "a session lasts no longer than its token");
        let (_, ci) = auth.create("ci", Role::Viewer, None).unwrap();
        let (ci_session, _, ttl) = auth.open_session(&ci).unwrap();
        assert_eq!(ttl, SESSION_TTL);
        clock.advance(Duration::from_secs(2 * 3600 - 1));
        assert_eq!(auth.verify(&ops).unwrap().name, "ops");
        assert_eq!(auth.caller(&session_cookie(&ops_session)).unwrap().name, "ops");
        clock.advance(Duration::from_secs(1));
        assert!(matches!(auth.verify(&ops), Err(Denied::Expired(_))));
        assert!(
            auth.caller(&session_cookie(&ops_session)).is_err(),
            "the session ends with its token"
        );
        assert_eq!(auth.caller(&session_cookie(&ci_session)).unwrap().name, "ci");
        clock.advance(SESSION_TTL);
        assert!(auth.caller(&session_cookie(&ci_session)).is_err(), "a session ends after its TTL");
        assert_eq!(auth.verify(&ci).unwrap().name, "ci", "a token without a TTL does not expire");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
    }
}

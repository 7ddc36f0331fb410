//! `weft demo-app`: a small HTTP service for the demo mesh. Every request (any path but
//! `/chaos` and `/healthz`) calls each `--call` service through the sidecar's outbound listener,
//! passing the tenant, user and order headers on, and answers with what it served and what its
//! calls returned. `POST /chaos {errorRate, latencyMs}` makes it fail or slow down on purpose.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use weft_core::{Body, full};

/// Headers the demo passes from each request to the calls it makes: the demo's own keys,
/// trace context (W3C and b3), and the mesh's retry marker, so a call chain is one trace and
/// does not multiply retries.
const PROPAGATED: [&str; 11] = [
    "x-tenant",
    "x-user",
    "x-order",
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-sampled",
    "x-b3-parentspanid",
    "weft-retried",
];

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    pub name: String,
    #[arg(long, default_value = "v1")]
    pub version: String,
    #[arg(long)]
    pub listen: SocketAddr,
    /// Services to call for every request: through the sidecar's outbound listener with
    /// `--proxy`, else at http://SERVICE/ as an unmodified app would (under `weft run
    /// --intercept`, where the name resolves and the call is redirected to the sidecar).
    #[arg(long)]
    pub call: Vec<String>,
    /// The sidecar's outbound listener.
    #[arg(long)]
    pub proxy: Option<SocketAddr>,
}

/// Failure the app injects into its own answers.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Chaos {
    /// Percentage of requests answered 500.
    #[serde(default)]
    pub error_rate: f64,
    /// Delay added to every request, milliseconds.
    #[serde(default)]
    pub latency_ms: u64,
}

struct App {
    name: String,
    version: String,
    calls: Vec<String>,
    proxy: Option<SocketAddr>,
    chaos: parking_lot::Mutex<Chaos>,
    client: Client<HttpConnector, Full<Bytes>>,
}

#[derive(Serialize, Deserialize)]
struct CallResult {
    service: String,
    status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let shutdown = weft_core::Shutdown::new();
    weft_core::shutdown::install(&shutdown);
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    tracing::info!(name = %args.name, version = %args.version, listen = %listener.local_addr()?, calls = ?args.call, "demo app listening");
    let app = Arc::new(App {
        name: args.name,
        version: args.version,
        calls: args.call,
        proxy: args.proxy,
        chaos: Default::default(),
        client: Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build_http(),
    });
    weft_core::serve::serve(listener, Default::default(), shutdown, move |req| handle(app.clone(), req)).await;
    Ok(ExitCode::SUCCESS)
}

async fn handle(app: Arc<App>, req: Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => reply(StatusCode::OK, json!({"service": app.name, "version": app.version})),
        (&Method::POST, "/chaos") => set_chaos(&app, req).await,
        (&Method::GET, "/chaos") => reply(StatusCode::OK, json!(*app.chaos.lock())),
        _ => serve(app, req).await,
    }
}

async fn set_chaos(app: &App, req: Request<Incoming>) -> Response<Body> {
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return reply(StatusCode::BAD_REQUEST, json!({"error": format!("reading body: {e}")})),
    };
    let chaos: Chaos = match serde_json::from_slice(&body) {
        Ok(c) => c,
        Err(e) => {
            return reply(
                StatusCode::BAD_REQUEST,
                json!({"error": format!("invalid chaos body: {e}"), "field": ""}),
            );
        }
    };
    if !(0.0..=100.0).contains(&chaos.error_rate) {
        return reply(
            StatusCode::BAD_REQUEST,
            json!({"error": format!("errorRate {} must be between 0 and 100", chaos.error_rate), "field": "errorRate"}),
        );
    }
    *app.chaos.lock() = chaos;
    tracing::info!(error_rate = chaos.error_rate, latency_ms = chaos.latency_ms, "chaos set");
    reply(StatusCode::OK, json!(chaos))
}

async fn serve(app: Arc<App>, req: Request<Incoming>) -> Response<Body> {
    let chaos = *app.chaos.lock();
    if chaos.latency_ms > 0 {
        tokio::time::sleep(Duration::from_millis(chaos.latency_ms)).await;
    }
    if chaos.error_rate > 0.0 && rand::random_range(0.0..100.0) < chaos.error_rate {
        return reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"service": app.name, "version": app.version, "error": "chaos"}),
        );
    }
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    let headers: Arc<Vec<(&'static str, String)>> = Arc::new(
        PROPAGATED
            .iter()
            .filter_map(|h| req.headers().get(*h).and_then(|v| v.to_str().ok()).map(|v| (*h, v.to_string())))
            .collect(),
    );
    let mut pending = tokio::task::JoinSet::new();
    for (i, svc) in app.calls.iter().enumerate() {
        let (app, svc, path, headers) = (app.clone(), svc.clone(), path.clone(), headers.clone());
        pending.spawn(async move { (i, call(&app, &svc, &path, &headers).await) });
    }
    let mut calls: Vec<(usize, CallResult)> = pending.join_all().await;
    calls.sort_by_key(|(i, _)| *i);
    let calls: Vec<CallResult> = calls.into_iter().map(|(_, c)| c).collect();
    let failed = calls.iter().any(|c| c.status >= 400);
    let status = if failed { StatusCode::BAD_GATEWAY } else { StatusCode::OK };
    reply(
        status,
        json!({"service": app.name, "version": app.version, "path": path, "calls": calls}),
    )
}

async fn call(app: &App, service: &str, path: &str, headers: &[(&str, String)]) -> CallResult {
    let uri = match app.proxy {
        Some(proxy) => format!("http://{proxy}{path}"),
        None => format!("http://{service}{path}"),
    };
    let mut req = Request::builder().method(Method::GET).uri(uri).header(header::HOST, service);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let req = req.body(Full::new(Bytes::new())).expect("valid request");
    match tokio::time::timeout(Duration::from_secs(10), app.client.request(req)).await {
        Ok(Ok(resp)) => {
            let status = resp.status().as_u16();
            let reason = resp.headers().get("x-weft-error").and_then(|v| v.to_str().ok()).map(str::to_string);
            let _ = resp.into_body().collect().await;
            CallResult {
                service: service.to_string(),
                status,
                reason,
            }
        }
        Ok(Err(e)) => CallResult {
            service: service.to_string(),
            status: 599,
            reason: Some(format!("unreachable: {e}")),
        },
        Err(_) => CallResult {
            service: service.to_string(),
            status: 599,
            reason: Some("no answer within 10s".into()),
        },
    }
}

fn reply(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(full(body.to_string()))
        .expect("valid response")
}

//! The inbound listener: mesh -> app. Hands each request to the app in the HTTP version its
//! original client spoke (HTTP/1.1 through the pooled client, HTTP/2 and gRPC over one
//! multiplexed connection).

use crate::forward::{ORIG_PROTO, reason_of, reply, retarget, strip_hop_by_hop};
use crate::outbound::finish;
use crate::state::Proxy;
use crate::telemetry::Finished;
use http::{HeaderValue, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use std::sync::Arc;
use std::time::Instant;
use weft_api::proto::Direction;
use weft_core::Body;

pub async fn handle(proxy: Arc<Proxy>, req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let version = req.version();
    let revision = proxy.revision();
    let resp = to_app(&proxy, req).await;
    let status = resp.status().as_u16();
    proxy.telemetry.record(Finished {
        direction: Direction::Inbound,
        service: "",
        route: "",
        revision,
        status,
        reason: reason_of(&resp),
        elapsed: start.elapsed(),
    });
    finish(resp, version)
}

async fn to_app(proxy: &Proxy, req: Request<Incoming>) -> Response<Body> {
    let (mut parts, body) = req.into_parts();
    let app_h2 = match parts.headers.remove(ORIG_PROTO) {
        Some(v) => v.as_bytes() == b"HTTP/2",
        None => parts.version == Version::HTTP_2,
    };
    strip_hop_by_hop(&mut parts.headers);
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_else(|| proxy.app.to_string());
    let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
    let body = body.boxed_unsync();
    if app_h2 {
        parts.version = Version::HTTP_2;
        if let Err(resp) = retarget(&mut parts, &authority, &pq) {
            return resp;
        }
        let mut sender = match proxy.pools.h2(proxy.app).await {
            Ok(s) => s,
            Err(e) => return reply(StatusCode::SERVICE_UNAVAILABLE, "app-unavailable", e),
        };
        match sender.send_request(Request::from_parts(parts, body)).await {
            Ok(resp) => resp.map(|b| b.boxed_unsync()),
            Err(e) => {
                proxy.pools.evict(proxy.app);
                reply(StatusCode::BAD_GATEWAY, "app-reset", e)
            }
        }
    } else {
        parts.version = Version::HTTP_11;
        if let Err(resp) = retarget(&mut parts, &proxy.app.to_string(), &pq) {
            return resp;
        }
        if let Ok(host) = HeaderValue::from_str(&authority) {
            parts.headers.insert(http::header::HOST, host);
        }
        match proxy.pools.h1.request(Request::from_parts(parts, body)).await {
            Ok(resp) => resp.map(|b| b.boxed_unsync()),
            Err(e) if e.is_connect() => reply(StatusCode::SERVICE_UNAVAILABLE, "app-unavailable", e),
            Err(e) => reply(StatusCode::BAD_GATEWAY, "app-reset", e),
        }
    }
}

//! The outbound listener: app -> mesh. Finds the destination service from the request target
//! (absolute-form URI, `:authority`, or `Host`), routes by the caller-side policy, and forwards
//! over HTTP/2 to a healthy endpoint's inbound listener.

use crate::forward::{ORIG_PROTO, reason_of, reply, retarget, strip_hop_by_hop, strip_mesh_headers};
use crate::route::{self, Decision};
use crate::state::Proxy;
use crate::telemetry::Finished;
use http::{HeaderValue, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use weft_api::mesh::{Endpoint, ServiceConfig};
use weft_api::proto::Direction;
use weft_api::resource::MtlsMode;
use weft_core::Body;

/// The identity of the endpoint that answered (a response extension, for telemetry).
#[derive(Clone, Debug)]
struct PeerIdentity(String, SocketAddr);

/// Most distinct endpoints tried for one request when connecting fails (nothing was sent yet,
/// so trying another is always safe).
const CONNECT_ATTEMPTS: usize = 3;

pub async fn handle(proxy: Arc<Proxy>, req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let version = req.version();
    let revision = proxy.revision();
    let captured = proxy.telemetry.access.capture(&req);
    let (service, route, resp) = route_request(&proxy, req).await;
    let upstream = resp.extensions().get::<PeerIdentity>();
    let done = Finished {
        direction: Direction::Outbound,
        service: &service,
        route: &route,
        mtls: false,
        peer: upstream.map(|p| p.0.as_str()).unwrap_or(""),
        revision,
        status: resp.status().as_u16(),
        reason: reason_of(&resp),
        elapsed: start.elapsed(),
    };
    proxy.telemetry.record(&done);
    if captured.is_some() {
        proxy.log_access(captured, &done, &upstream.map(|p| p.1.to_string()).unwrap_or_default());
    }
    finish(resp, version)
}

/// Routes and forwards one request; returns the destination service and route, and the answer.
async fn route_request(proxy: &Proxy, req: Request<Incoming>) -> (String, String, Response<Body>) {
    let Some(authority) = target_authority(&req) else {
        return (
            String::new(),
            String::new(),
            reply(
                StatusCode::BAD_REQUEST,
                "no-destination",
                "the request names no service (absolute URI, :authority or Host)",
            ),
        );
    };
    let name = service_name(&authority).to_string();
    let Some(service) = proxy.service(&name).await else {
        return (
            name.clone(),
            String::new(),
            reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "unknown-service",
                format!("no service named {name:?} is known to this proxy"),
            ),
        );
    };
    let (mut parts, body) = req.into_parts();
    // Bypass (the kill switch): no L7 policy at all, plain balancing over every endpoint.
    let policy = if proxy.bypassed() { None } else { service.policy.as_ref() };
    let decision = route::decide(policy, &parts, rand::random_range(0..100));
    strip_hop_by_hop(&mut parts.headers);
    strip_mesh_headers(&mut parts.headers);
    parts.headers.remove(http::header::HOST);
    let proto = if parts.version == Version::HTTP_2 { "HTTP/2" } else { "HTTP/1.1" };
    parts.headers.insert(ORIG_PROTO, HeaderValue::from_static(proto));
    let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
    if let Err(resp) = retarget(&mut parts, &authority, &pq) {
        return (name, decision.route, resp);
    }
    parts.version = Version::HTTP_2;
    let req = Request::from_parts(parts, body.boxed_unsync());
    let fut = send(proxy, &service, &decision, req);
    let resp = match decision.timeout {
        Some(t) => match tokio::time::timeout(t, fut).await {
            Ok(r) => r,
            Err(_) => reply(
                StatusCode::GATEWAY_TIMEOUT,
                "request-timeout",
                format!("no response within {t:?} (route {})", decision.route),
            ),
        },
        None => fut.await,
    };
    (name, decision.route, resp)
}

async fn send(proxy: &Proxy, service: &ServiceConfig, decision: &Decision, req: Request<Body>) -> Response<Body> {
    let candidates = candidates(service, decision, &proxy.workload.cluster);
    if candidates.is_empty() {
        let which = decision.subset.as_ref().map(|s| format!(" in subset {s}")).unwrap_or_default();
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "no-healthy-endpoints",
            format!("service {}{which} has no endpoints", service.name),
        );
    }
    // mTLS to every endpoint that has an identity, unless the destination turned it off. Without
    // a certificate of our own we fail closed rather than fall back to plaintext.
    let use_mtls = service.mtls != Some(MtlsMode::Off);
    let own = proxy.identity.tls();
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut last_error = String::new();
    while tried.len() < CONNECT_ATTEMPTS.min(candidates.len()) {
        let fresh: Vec<&Endpoint> = candidates.iter().copied().filter(|e| !tried.contains(&e.address)).collect();
        let endpoint = fresh[rand::random_range(0..fresh.len())];
        let addr = endpoint.address;
        tried.push(addr);
        let tls = if use_mtls && !endpoint.identity.is_empty() {
            let Some(own) = &own else {
                return reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no-client-identity",
                    "this proxy has no workload certificate yet; mTLS is required",
                );
            };
            match own.client_for(&endpoint.identity) {
                Ok(config) => Some((endpoint.identity.as_str(), config)),
                Err(e) => return reply(StatusCode::SERVICE_UNAVAILABLE, "no-client-identity", e),
            }
        } else {
            None
        };
        let endpoint_tls = tls.is_some();
        let mut sender = match proxy.pools.h2(addr, tls).await {
            Ok(s) => s,
            Err(e) => {
                last_error = e.to_string();
                tracing::debug!(service = %service.name, endpoint = %addr, error = %last_error, "endpoint unreachable");
                continue;
            }
        };
        return match sender.send_request(req).await {
            Ok(resp) => {
                let mut resp = resp.map(|b| b.boxed_unsync());
                let peer = if endpoint_tls {
                    endpoint.identity.clone()
                } else {
                    "plaintext".to_string()
                };
                resp.extensions_mut().insert(PeerIdentity(peer, addr));
                resp
            }
            Err(error) => {
                proxy.pools.evict(addr);
                reply(
                    StatusCode::BAD_GATEWAY,
                    "upstream-reset",
                    format!("endpoint {addr} of {}: {error}", service.name),
                )
            }
        };
    }
    reply(
        StatusCode::SERVICE_UNAVAILABLE,
        "upstream-connect-failed",
        format!("{} endpoint(s) of {} tried: {last_error}", tried.len(), service.name),
    )
}

/// Endpoints a request may go to: those of its subset, in the caller's cluster when any is,
/// else in the first cluster of the failover order that has one, else anywhere.
fn candidates<'a>(service: &'a ServiceConfig, decision: &Decision, own_cluster: &str) -> Vec<&'a Endpoint> {
    let in_subset: Vec<&Endpoint> = service
        .endpoints
        .iter()
        .filter(|e| decision.subset.as_deref().is_none_or(|s| e.subset() == Some(s)))
        .collect();
    let local: Vec<_> = in_subset.iter().copied().filter(|e| e.cluster == own_cluster).collect();
    if !local.is_empty() {
        return local;
    }
    for cluster in &decision.failover {
        let there: Vec<_> = in_subset.iter().copied().filter(|e| &e.cluster == cluster).collect();
        if !there.is_empty() {
            return there;
        }
    }
    in_subset
}

/// The authority the app addressed: absolute-form URI or `:authority`, else `Host`.
fn target_authority<B>(req: &Request<B>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str().to_ascii_lowercase());
    }
    let host = req.headers().get(http::header::HOST)?.to_str().ok()?;
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

/// `orders-api:8080` -> `orders-api`; `orders-api.default.svc` -> `orders-api`.
fn service_name(authority: &str) -> &str {
    let host = authority.rsplit_once(':').map(|(h, _)| h).unwrap_or(authority);
    host.split('.').next().unwrap_or(host)
}

/// Strips hop-by-hop headers from the answer and speaks the client's HTTP version.
pub fn finish(mut resp: Response<Body>, version: Version) -> Response<Body> {
    strip_hop_by_hop(resp.headers_mut());
    *resp.version_mut() = version;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names_from_authorities() {
        assert_eq!(service_name("orders-api"), "orders-api");
        assert_eq!(service_name("orders-api:8080"), "orders-api");
        assert_eq!(service_name("orders-api.default.svc:80"), "orders-api");
    }

    #[test]
    fn locality_then_failover_then_anywhere() {
        let svc: ServiceConfig = serde_saphyr::from_str(
            "name: inventory-svc\nendpoints:\n  - {address: '127.0.0.1:1', cluster: cluster-c, labels: {version: v1}}\n  - {address: '127.0.0.1:2', cluster: cluster-b, labels: {version: v1}}\n",
        )
        .unwrap();
        let d = Decision::default();
        let addrs = |v: Vec<&Endpoint>| v.iter().map(|e| e.address.to_string()).collect::<Vec<_>>();
        assert_eq!(addrs(candidates(&svc, &d, "cluster-b")), ["127.0.0.1:2"]);
        let d = Decision {
            failover: vec!["cluster-c".into()],
            ..Default::default()
        };
        assert_eq!(addrs(candidates(&svc, &d, "cluster-a")), ["127.0.0.1:1"]);
        assert_eq!(candidates(&svc, &Decision::default(), "cluster-a").len(), 2);
        let d = Decision {
            subset: Some("v2".into()),
            ..Default::default()
        };
        assert!(candidates(&svc, &d, "cluster-a").is_empty());
    }
}

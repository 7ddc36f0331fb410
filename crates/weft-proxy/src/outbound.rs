//! The outbound listener: app -> mesh. Top to bottom: finds the destination service from the
//! request target (absolute-form URI, `:authority`, or `Host`; discovery), routes by the
//! caller-side policy, hands the request to [`crate::call`] (rate limit, faults, admission,
//! endpoint pick, tries, retries, mirror; an Upgrade too), then observes how it ended (metrics,
//! tap, span, access log) and answers in the client's HTTP version.

use crate::call::{self, Outcome};
use crate::discovery::Missing;
use crate::forward::{APP_PORT_HEADER, AppPort, RETRIED, finish, retarget, strip_hop_by_hop, strip_mesh_headers};
use crate::reason::Reason;
use crate::route::{self, CompiledRoute};
use crate::state::Proxy;
use crate::telemetry::{Finished, access_entry};
use http::{HeaderValue, Version};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use std::sync::Arc;
use std::time::Instant;
use weft_api::proto::Direction;
use weft_core::Body;

fn unnamed() -> Arc<str> {
    static EMPTY: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| Arc::from("")).clone()
}

pub(crate) async fn handle(proxy: Arc<Proxy>, mut req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let span = proxy
        .telemetry
        .tracer
        .start(req.headers_mut(), weft_api::otlp::span::SpanKind::Client)
        .map(|s| (s, req.method().clone()));
    let version = req.version();
    let grpc = crate::forward::is_grpc(req.headers());
    let revision = proxy.discovery.revision();
    let captured = proxy.telemetry.access.capture(&req);
    let tapped = proxy.taps.tapping().then(|| {
        let authority = target_authority(&req).unwrap_or_default();
        (req.method().to_string(), crate::access::logged_path(req.uri().path()).0, authority)
    });
    let request_bytes = captured.as_ref().map(|_| Arc::new(std::sync::atomic::AtomicU64::new(0)));
    let req = crate::downstream::watched(req, request_bytes.as_ref());
    let (service, route, outcome) = route_request(&proxy, req, grpc).await;
    let Outcome {
        resp,
        upstream,
        retries,
        waited,
    } = outcome;
    let upstream = upstream.as_ref();
    let done = Finished {
        direction: Direction::Outbound,
        service: Some(&service),
        route: Some(&route),
        mtls: false,
        peer: upstream.map(|p| &p.0),
        revision,
        status: resp.status().as_u16(),
        reason: Reason::label_of(&resp),
        elapsed: start.elapsed(),
        waited,
    };
    proxy.telemetry.record(&done);
    if let Some((method, path, authority)) = tapped {
        let own = proxy.identity.tls().map(|t| t.identity.clone()).unwrap_or_default();
        let event = weft_api::proto::TapEvent {
            direction: "outbound".into(),
            source: own,
            destination: upstream.map(|p| p.0.to_string()).unwrap_or_default(),
            route: route.to_string(),
            method,
            authority,
            path,
            status: done.status.into(),
            reason: done.reason.into(),
            duration_ms: done.elapsed.as_secs_f64() * 1000.0,
            upstream: upstream.map(|p| p.1.to_string()).unwrap_or_default(),
            ..Default::default()
        };
        proxy.taps.tap(&service, event);
    }
    if let Some((span, method)) = span {
        use crate::spans::Attr;
        let attributes = vec![
            ("http.request.method", Attr::Str(method.to_string())),
            ("http.response.status_code", Attr::Int(done.status.into())),
            ("weft.direction", Attr::Str("outbound".into())),
            ("weft.service", Attr::Str(service.to_string())),
            ("weft.route", Attr::Str(route.to_string())),
            ("weft.reason", Attr::Str(done.reason.into())),
            ("weft.peer", Attr::Str(upstream.map(|p| p.0.to_string()).unwrap_or_default())),
            ("server.address", Attr::Str(upstream.map(|p| p.1.to_string()).unwrap_or_default())),
            ("weft.retries", Attr::Int(retries.into())),
        ];
        let name = format!("{method} {service}");
        proxy.telemetry.tracer.finish(span, name, attributes, done.status >= 500);
    }
    let resp = match (captured, request_bytes) {
        (Some(c), Some(count)) => {
            let own = proxy.identity.current_id().unwrap_or_default();
            let upstream = upstream.map(|p| p.1.to_string()).unwrap_or_default();
            let entry = access_entry(c, &done, own, proxy.local.workload.service(), upstream, retries);
            resp.map(|b| crate::access::Logged::wrap(b, entry, count, start, proxy.telemetry.access.clone()))
        }
        _ => resp,
    };
    finish(resp, version, grpc)
}

/// Routes and forwards one request; returns the destination service and route, and how it
/// ended.
async fn route_request(proxy: &Arc<Proxy>, mut req: Request<Body>, grpc: bool) -> (Arc<str>, Arc<str>, Outcome) {
    if req.method() == http::Method::CONNECT {
        return (unnamed(), unnamed(), crate::upgrade::connect_refused().into());
    }
    let Some(authority) = target_authority(&req) else {
        return (
            unnamed(),
            unnamed(),
            Outcome::refused(
                StatusCode::BAD_REQUEST,
                Reason::NoDestination,
                "the request names no service (absolute URI, :authority or Host)",
            ),
        );
    };
    // A host that names no known service is reported without a service label: the metric's
    // labels stay the mesh's own names, never whatever hosts apps send.
    let service = match proxy.discovery.resolve(&authority, &proxy.identity) {
        Ok(service) => service,
        Err(refused) => {
            return (
                unnamed(),
                unnamed(),
                Outcome::refused(StatusCode::NOT_FOUND, Reason::UnknownService, refused),
            );
        }
    };
    let rt = match proxy.discovery.service(&service).await {
        Ok(rt) => rt,
        Err(Missing::Unknown) => {
            let why = format!(
                "host {authority:?} names service {service}, which the mesh does not know (no workload serves it, no policy names it); a mesh host is {}",
                crate::host::FORMS
            );
            return (
                unnamed(),
                unnamed(),
                Outcome::refused(StatusCode::NOT_FOUND, Reason::UnknownService, why),
            );
        }
        Err(Missing::NoAnswer) => {
            let why = format!("the control plane has not said whether service {service} exists");
            return (
                unnamed(),
                unnamed(),
                Outcome::refused(StatusCode::SERVICE_UNAVAILABLE, Reason::DiscoveryTimeout, why),
            );
        }
    };
    // The path is made canonical once, before routing: the route is chosen on the form the
    // callee's authorization will match and its app will get, and that form is forwarded
    // (`/api/../admin` is `/admin` to every one of them, never `/api` to the router).
    let uri = match crate::authz::canonical_uri(req.uri()) {
        Ok(uri) => uri,
        Err(why) => {
            let detail = format!("the path {:?} has no canonical form: {why}", req.uri().path());
            return (
                rt.name.clone(),
                unnamed(),
                Outcome::refused(StatusCode::BAD_REQUEST, Reason::BadPath, detail),
            );
        }
    };
    *req.uri_mut() = uri;
    let upgrade = crate::upgrade::requested(&req).map(|protocol| (protocol, hyper::upgrade::on(&mut req)));
    let (mut parts, body) = req.into_parts();
    // Bypass (the kill switch): the policy's routes are set aside (no matching, timeouts,
    // faults, mirrors or route retries: the default route, plain balancing over every
    // endpoint); its rate limit, pool limits and outlier detection still apply.
    let routes: &[CompiledRoute] = if proxy.discovery.bypassed() { &[] } else { &rt.routes };
    let route = route::decide(routes, &rt.default_route, &parts);
    // A request another hop already retried is not retried again here (so call chains do not
    // multiply retries); the marker travels on with it.
    let retried_before = parts.headers.contains_key(RETRIED);
    strip_hop_by_hop(&mut parts.headers);
    // Only the mesh's own names go here. Identity headers from the app (`x-forwarded-client-cert`,
    // `x-spiffe-id`, `l5d-*`) pass on: the guarantee that no app sees a forged one lives at the
    // receiving end, in the callee's inbound (`trust::identity_headers`), which strips them
    // from every caller, sidecar or not, whatever was done here, and sets the one true header.
    // An upstream outside the mesh gets the caller's request as it was.
    strip_mesh_headers(&mut parts.headers);
    // An intercepted connection to another port of the service's app: the callee's sidecar is
    // told which (`inbound::app_target`).
    if let Some(AppPort(port)) = parts.extensions.get::<AppPort>().copied() {
        parts.headers.insert(APP_PORT_HEADER, port.into());
    }
    parts.headers.remove(http::header::HOST);
    if retried_before {
        parts.headers.insert(RETRIED, HeaderValue::from_static("1"));
    }
    let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
    if let Err(resp) = retarget(&mut parts, &authority, &pq) {
        return (rt.name.clone(), route.name.clone(), resp.into());
    }
    let outcome = match upgrade {
        Some((protocol, client)) => {
            crate::upgrade::prepare(&mut parts.headers, protocol, &authority);
            let (outcome, upstream) = call::upgrade(proxy, &rt, route, parts).await;
            if let Some(upstream) = upstream {
                crate::upgrade::splice(client, upstream);
            }
            outcome
        }
        None => {
            parts.version = Version::HTTP_2;
            call::forward(proxy, &rt, route, grpc, retried_before, parts, body).await
        }
    };
    (rt.name.clone(), route.name.clone(), outcome)
}

/// The authority the app addressed: absolute-form URI or `:authority`, else `Host`.
fn target_authority<B>(req: &Request<B>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str().to_ascii_lowercase());
    }
    let host = req.headers().get(http::header::HOST)?.to_str().ok()?;
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

//! The outbound listener: app -> mesh. Finds the destination service from the request target
//! (absolute-form URI, `:authority`, or `Host`), routes by the caller-side policy, and forwards
//! over HTTP/2 to an endpoint's inbound listener, with the route's timeouts, retries, faults,
//! mirroring, rate limit and pool limits.

use crate::balance::{Outcome, ServiceRuntime};
use crate::discovery::Missing;
use crate::downstream::{BodyState, ClientBody, ClientFault};
use crate::forward::{RETRIED, finish, reason_of, reply, retarget, strip_hop_by_hop, strip_mesh_headers};
use crate::idle::IdleTimeout;
use crate::pool::{ConnectError, Opts};
use crate::replay::{self, Replay};
use crate::route::{self, CompiledRoute};
use crate::state::Proxy;
use crate::telemetry::{Finished, access_entry};
use http::request::Parts;
use http::{HeaderValue, Method, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_api::proto::Direction;
use weft_core::Body;

/// The identity of the endpoint that answered (a response extension, for telemetry).
#[derive(Clone, Debug)]
struct PeerIdentity(Arc<str>, SocketAddr);

/// The peer label of a plaintext hop.
fn plaintext() -> Arc<str> {
    static PLAINTEXT: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    PLAINTEXT.get_or_init(|| Arc::from("plaintext")).clone()
}

fn unnamed() -> Arc<str> {
    static EMPTY: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(|| Arc::from("")).clone()
}

/// How many retries a request took (a response extension, for the access log).
#[derive(Clone, Copy, Debug)]
struct Retries(u32);

/// A mirrored copy gets this long before it is abandoned.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn handle(proxy: Arc<Proxy>, mut req: Request<Incoming>) -> Response<Body> {
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
        (req.method().to_string(), req.uri().path().to_string(), authority)
    });
    let request_bytes = captured.as_ref().map(|_| Arc::new(std::sync::atomic::AtomicU64::new(0)));
    let req = crate::downstream::watched(req, request_bytes.as_ref());
    let (service, route, resp) = route_request(&proxy, req, grpc).await;
    let upstream = resp.extensions().get::<PeerIdentity>();
    let retries = resp.extensions().get::<Retries>().map(|r| r.0).unwrap_or(0);
    let done = Finished {
        direction: Direction::Outbound,
        service: Some(&service),
        route: Some(&route),
        mtls: false,
        peer: upstream.map(|p| &p.0),
        revision,
        status: resp.status().as_u16(),
        reason: reason_of(&resp),
        elapsed: start.elapsed(),
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

/// Routes and forwards one request; returns the destination service and route, and the answer.
async fn route_request(proxy: &Arc<Proxy>, mut req: Request<Body>, grpc: bool) -> (Arc<str>, Arc<str>, Response<Body>) {
    let Some(authority) = target_authority(&req) else {
        return (
            unnamed(),
            unnamed(),
            reply(
                StatusCode::BAD_REQUEST,
                "no-destination",
                "the request names no service (absolute URI, :authority or Host)",
            ),
        );
    };
    // A host that names no known service is reported without a service label: the metric's
    // labels stay the mesh's own names, never whatever hosts apps send.
    let service = match proxy.discovery.resolve(&authority, &proxy.identity) {
        Ok(service) => service,
        Err(refused) => return (unnamed(), unnamed(), reply(StatusCode::NOT_FOUND, "unknown-service", refused)),
    };
    let rt = match proxy.discovery.service(&service).await {
        Ok(rt) => rt,
        Err(Missing::Unknown) => {
            let why = format!(
                "host {authority:?} names service {service}, which the mesh does not know (no workload serves it, no policy names it); a mesh host is {}",
                crate::host::FORMS
            );
            return (unnamed(), unnamed(), reply(StatusCode::NOT_FOUND, "unknown-service", why));
        }
        Err(Missing::NoAnswer) => {
            let why = format!("the control plane has not said whether service {service} exists");
            return (
                unnamed(),
                unnamed(),
                reply(StatusCode::SERVICE_UNAVAILABLE, "discovery-timeout", why),
            );
        }
    };
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
    // receiving end, in the callee's inbound (`inbound::identity_headers`), which strips them
    // from every caller, sidecar or not, whatever was done here, and sets the one true header.
    // An upstream outside the mesh gets the caller's request as it was.
    strip_mesh_headers(&mut parts.headers);
    parts.headers.remove(http::header::HOST);
    if retried_before {
        parts.headers.insert(RETRIED, HeaderValue::from_static("1"));
    }
    let pq = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/").to_string();
    if let Err(resp) = retarget(&mut parts, &authority, &pq) {
        return (rt.name.clone(), route.name.clone(), resp);
    }
    if let Some((protocol, client)) = upgrade {
        let subset = route.subset(rand::random_range(0..100));
        let resp = crate::upgrade::outbound(proxy, &rt, subset, parts, protocol, client, &authority).await;
        return (rt.name.clone(), route.name.clone(), resp);
    }
    parts.version = Version::HTTP_2;
    let client = parts.extensions.get::<Arc<BodyState>>().cloned().unwrap_or_default();
    let in_flight = std::sync::atomic::AtomicUsize::new(NO_TRY);
    let call = Call {
        proxy,
        rt: &rt,
        route,
        grpc,
        retried_before,
        client: &client,
        in_flight: &in_flight,
    };
    let fut = call.run(parts, body);
    let resp = match route.timeout {
        Some(t) => match tokio::time::timeout(t, fut).await {
            Ok(r) => r,
            // Still waiting for the client's body: the client was too slow, not the service.
            Err(_) if client.timed_out() => {
                ClientFault::Timeout.reply(format!("the request body did not arrive within {t:?} (route {})", route.name))
            }
            Err(_) => {
                // An endpoint that never answered failed this request, like one past its
                // per-try timeout: without this, one that hangs is never ejected.
                let hung = in_flight.load(std::sync::atomic::Ordering::Relaxed);
                if hung != NO_TRY {
                    observe(proxy, &rt, hung, false, None);
                }
                reply(
                    StatusCode::GATEWAY_TIMEOUT,
                    "request-timeout",
                    format!("no response within {t:?} (route {}, retries included)", route.name),
                )
            }
        },
        None => fut.await,
    };
    (rt.name.clone(), route.name.clone(), resp)
}

/// One request on its way to a service.
struct Call<'a> {
    proxy: &'a Arc<Proxy>,
    rt: &'a Arc<ServiceRuntime>,
    route: &'a CompiledRoute,
    grpc: bool,
    retried_before: bool,
    /// How the client's request body is going.
    client: &'a Arc<BodyState>,
    /// The endpoint a try is waiting on for response headers ([`NO_TRY`] if none), so a
    /// request timeout that cuts the wait counts against it.
    in_flight: &'a std::sync::atomic::AtomicUsize,
}

/// Why a try failed, when it did not produce a response to hand back.
// The request moves back to the caller in `NotSent`; boxing it would allocate on every connect
// failure to save stack space on a path that is cold.
#[allow(clippy::large_enum_variant)]
enum TryFailure {
    /// Nothing reached the endpoint; the request comes back for another try.
    NotSent(Request<Body>, &'static str, String),
    /// The stream was reset after the request was sent.
    Reset(String),
    PerTryTimeout(Duration),
    /// Nothing moved on the stream for the idle timeout.
    Idle(Duration),
}

/// Waits for `fut` unless the stream idles: `None` once `activity` (ms) is `idle` old.
async fn wait_active<F: std::future::Future>(fut: F, activity: &std::sync::atomic::AtomicU64, idle: Duration) -> Option<F::Output> {
    let mut fut = std::pin::pin!(fut);
    loop {
        let last = activity.load(std::sync::atomic::Ordering::Relaxed);
        let left = Duration::from_millis((last + idle.as_millis() as u64).saturating_sub(crate::clock::mono_ms()));
        if left.is_zero() {
            return None;
        }
        match tokio::time::timeout(left, &mut fut).await {
            Ok(out) => return Some(out),
            Err(_) => continue, // re-check: the request may have sent a frame meanwhile
        }
    }
}

impl Call<'_> {
    async fn run(self, parts: Parts, body: Body) -> Response<Body> {
        let Call { rt, route, .. } = self;
        let svc = rt.config.name.as_str();
        if let Some(limiter) = &rt.limiter
            && !limiter.allow()
        {
            let l = &limiter.limit;
            return reply(
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                format!(
                    "{svc} allows {} requests/s (burst {}) from this caller",
                    l.requests_per_second, l.burst
                ),
            );
        }
        if let Some(fault) = &route.fault {
            if let Some(abort) = &fault.abort
                && rand::random_range(0.0..100.0) < abort.percent
            {
                let status = StatusCode::from_u16(abort.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                return reply(status, "fault-abort", format!("fault injected by route {}", route.name));
            }
            if let Some(delay) = &fault.delay
                && rand::random_range(0.0..100.0) < delay.percent
            {
                tokio::time::sleep(delay.duration.as_std()).await;
            }
        }
        let Some(_pending) = rt.shared.admit(rt.pool.max_pending_requests) else {
            return reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "pool-full",
                format!(
                    "{svc} already has {} requests in flight from this proxy (connectionPool.maxPendingRequests)",
                    rt.pool.max_pending_requests
                ),
            );
        };
        rt.shared.budget.request();
        let subset = route.subset(rand::random_range(0..100));
        let mirror = route
            .mirror
            .as_ref()
            .filter(|m| rand::random_range(0.0..100.0) < m.percent)
            .map(|m| m.subset.clone());
        let retry = &route.retry;
        let method_ok = idempotent(&parts.method) || retry.non_idempotent || (self.grpc && !retry.on.grpc_codes.is_empty());
        let after_send = retry.retries > 0 && retry.after_send() && method_ok && !self.retried_before;
        // Keep the head and record the body only when a second copy may be needed.
        let keep = after_send || mirror.is_some();
        let (body, replay) = if keep {
            let (b, r) = replay::record(body);
            (b, Some(r))
        } else {
            (body, None)
        };
        let head = keep.then(|| clone_head(&parts));
        let mut next = Some(Request::from_parts(parts, body));
        let candidates = rt.candidates(subset);
        let mut tried: Vec<usize> = Vec::new();
        let mut retries = 0u32;
        loop {
            let Some(i) = rt.pick(&candidates, &tried).or_else(|| rt.pick(&candidates, &[])) else {
                let which = subset.map(|s| format!(" in subset {s}")).unwrap_or_default();
                return reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no-healthy-endpoints",
                    format!(
                        "service {svc}{which} has no endpoint to send to ({} known, {} ejected)",
                        rt.config.endpoints.len(),
                        rt.ejected()
                    ),
                );
            };
            tried.push(i);
            let req = match next.take() {
                Some(r) => r,
                None => match (&head, replay.as_ref().and_then(Replay::body)) {
                    (Some(h), Some(b)) => {
                        let mut r = Request::from_parts(clone_head(h), b);
                        r.headers_mut().insert(RETRIED, HeaderValue::from_static("1"));
                        r
                    }
                    _ => unreachable!("a retry after sending is only taken with a replayable body"),
                },
            };
            let started = Instant::now();
            let failure = match self.try_once(i, req).await {
                Ok(mut resp) => {
                    if resp.extensions().get::<PeerIdentity>().is_none() {
                        return resp; // this proxy's own refusal (no identity, pool full)
                    }
                    let status = resp.status().as_u16();
                    let grpc_status = resp
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok());
                    let failed = status >= 500 || grpc_status.is_some_and(|c: u32| c == 14);
                    if failed || http_body::Body::is_end_stream(resp.body()) {
                        self.observe(i, !failed, Some(started.elapsed()));
                    } else {
                        // Its latency counts now; whether it succeeded, once its body has
                        // ended whole (`EndpointBody`).
                        self.proxy.telemetry.attempt(&rt.name, true);
                        rt.observe_latency(i, started.elapsed());
                    }
                    // The destination's sidecar says its app reset or could not be reached.
                    let peer_said = reason_of(&resp);
                    let wants = after_send
                        && (retry.retry_status(status, grpc_status)
                            || (peer_said == "app-reset" && retry.on.reset)
                            || (peer_said == "app-unavailable" && retry.on.connect_failure));
                    let replayable = replay.as_ref().is_some_and(Replay::available);
                    if wants && retries < retry.retries && replayable && self.take_retry() {
                        retries += 1;
                        tokio::time::sleep(crate::backoff::retry(retries)).await;
                        continue;
                    }
                    if let (Some(subset), Some(h), Some(r)) = (mirror.as_deref(), &head, &replay) {
                        self.mirror(subset, h, r);
                    }
                    resp.extensions_mut().insert(Retries(retries));
                    let idle = route.idle_timeout;
                    return resp.map(|b| EndpointBody::wrap(IdleTimeout::wrap(b, idle), &self, i));
                }
                Err(f) => f,
            };
            let (retryable, reason, detail) = match failure {
                TryFailure::NotSent(req, reason, detail) => {
                    next = Some(req);
                    let on = &retry.on;
                    let allowed = if reason == "refused-stream" {
                        on.refused_stream
                    } else {
                        on.connect_failure
                    };
                    (allowed && retry.retries > 0, reason, detail)
                }
                TryFailure::Reset(detail) => (after_send && retry.on.reset, "upstream-reset", detail),
                TryFailure::PerTryTimeout(t) => (after_send, "per-try-timeout", format!("no response within {t:?}")),
                TryFailure::Idle(t) => (after_send, "stream-idle-timeout", format!("nothing moved for {t:?}")),
            };
            let replayable = next.is_some() || replay.as_ref().is_some_and(Replay::available);
            if retryable && replayable && retries < retry.retries {
                if self.take_retry() {
                    retries += 1;
                    tokio::time::sleep(crate::backoff::retry(retries)).await;
                    continue;
                }
                return reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "retry-budget-exhausted",
                    format!(
                        "{reason} on {} of {svc} ({detail}); the retry budget is spent",
                        rt.endpoints[i].address
                    ),
                );
            }
            let status = match reason {
                "upstream-connect-timeout" | "per-try-timeout" | "stream-idle-timeout" => StatusCode::GATEWAY_TIMEOUT,
                "upstream-reset" => StatusCode::BAD_GATEWAY,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            let mut resp = reply(
                status,
                reason,
                format!("endpoint {} of {svc}: {detail} ({} tries)", rt.endpoints[i].address, retries + 1),
            );
            resp.extensions_mut().insert(Retries(retries));
            return resp;
        }
    }

    /// Takes a retry from the destination's budget, counting the outcome.
    fn take_retry(&self) -> bool {
        let retry = &self.route.retry;
        let granted = self.rt.shared.budget.try_retry(retry.budget_ratio, retry.budget_min_per_second);
        let outcome = if granted { "retried" } else { "budget-exhausted" };
        self.proxy.telemetry.retry(&self.rt.name, outcome);
        granted
    }

    fn observe(&self, i: usize, success: bool, latency: Option<Duration>) {
        observe(self.proxy, self.rt, i, success, latency);
    }

    /// One try at endpoint `i`.
    async fn try_once(&self, i: usize, req: Request<Body>) -> Result<Response<Body>, TryFailure> {
        let (proxy, rt) = (self.proxy, self.rt);
        let endpoint = &rt.config.endpoints[i];
        let addr = endpoint.address;
        let tls = match proxy.identity.endpoint_tls(&rt.config, i) {
            Ok(config) => config.map(|c| (endpoint.identity.as_str(), c)),
            Err(why) => return Ok(reply(StatusCode::SERVICE_UNAVAILABLE, "no-client-identity", why)),
        };
        let peer = if tls.is_some() { rt.identities[i].clone() } else { plaintext() };
        let opts = Opts {
            connect_timeout: rt.pool.connect_timeout.map(|t| t.as_std()).unwrap_or(crate::pool::CONNECT_TIMEOUT),
            idle_timeout: rt.pool.idle_timeout.map(|t| t.as_std()).unwrap_or(crate::pool::IDLE_TIMEOUT),
            limit: Some((&rt.shared.connections, rt.pool.max_connections)),
        };
        let mut sender = match proxy.pools.h2(addr, tls, opts).await {
            Ok(s) => s,
            Err(e @ ConnectError::PoolFull { .. }) => {
                return Ok(reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "pool-full",
                    format!("{}: {e}", rt.config.name),
                ));
            }
            Err(e) => {
                tracing::debug!(service = %rt.config.name, endpoint = %addr, error = %e, "endpoint unreachable");
                self.observe(i, false, None);
                return Err(TryFailure::NotSent(req, e.reason(), e.to_string()));
            }
        };
        let _in_flight = rt.endpoints[i].start();
        self.in_flight.store(i, std::sync::atomic::Ordering::Relaxed);
        // The request body is idle-limited, and stamps its activity so the wait for the
        // response headers counts from its last frame.
        let idle = self.route.idle_timeout;
        let activity = Arc::new(std::sync::atomic::AtomicU64::new(crate::clock::mono_ms()));
        // Wrapped again so a body that idles out here counts as the client's too.
        let req = req.map(|b| ClientBody::wrap(IdleTimeout::tracking(b, idle, Some(activity.clone())), self.client.clone()));
        let sent = sender.try_send_request(req);
        let per_try = self.route.retry.per_try_timeout;
        let waited = wait_active(sent, &activity, idle);
        let waited = match per_try {
            Some(t) => tokio::time::timeout(t, waited).await,
            None => Ok(waited.await),
        };
        self.in_flight.store(NO_TRY, std::sync::atomic::Ordering::Relaxed);
        let result = match waited {
            Ok(Some(r)) => r,
            Ok(None) => {
                if self.client.timed_out() {
                    return Ok(ClientFault::Timeout.reply(format!("the request body stopped for {idle:?} (idle timeout)")));
                }
                self.observe(i, false, None);
                return Err(TryFailure::Idle(idle));
            }
            Err(_) => {
                self.observe(i, false, None);
                return Err(TryFailure::PerTryTimeout(per_try.unwrap_or_default()));
            }
        };
        match result {
            Ok(resp) => {
                let mut resp = resp.map(weft_core::boxed);
                resp.extensions_mut().insert(PeerIdentity(peer, addr));
                Ok(resp)
            }
            Err(e) if self.client.fault().is_some() => {
                // The stream failed because the client's body did: nothing to hold against
                // the endpoint or its connection.
                let fault = self.client.fault().expect("checked");
                Ok(fault.reply(format!("the request body failed: {}", error_chain(e.error()))))
            }
            Err(mut e) => {
                proxy.pools.evict(addr);
                self.observe(i, false, None);
                let detail = format!("{}", e.error());
                let refused = error_chain(e.error()).contains("refused");
                match e.take_message() {
                    Some(req) => Err(TryFailure::NotSent(
                        req,
                        if refused { "refused-stream" } else { "upstream-connect-failed" },
                        detail,
                    )),
                    None => Err(TryFailure::Reset(detail)),
                }
            }
        }
    }

    /// Sends a copy to `subset` in the background; its answer is dropped, and it never holds
    /// up or fails the primary request.
    fn mirror(&self, subset: &str, head: &Parts, replay: &Replay) {
        let (proxy, rt) = (self.proxy, self.rt);
        let svc = rt.name.clone();
        let Some(body) = replay.body() else {
            proxy.telemetry.mirror(&svc, "not-replayable");
            return;
        };
        let Ok(permit) = proxy.mirrors.clone().try_acquire_owned() else {
            proxy.telemetry.mirror(&svc, "dropped");
            return;
        };
        let candidates = rt.candidates(Some(subset));
        let Some(i) = rt.pick(&candidates, &[]) else {
            proxy.telemetry.mirror(&svc, "failed");
            return;
        };
        let endpoint = rt.config.endpoints[i].clone();
        let Ok(tls) = proxy.identity.endpoint_tls(&rt.config, i) else {
            proxy.telemetry.mirror(&svc, "failed");
            return;
        };
        let mut req = Request::from_parts(clone_head(head), body);
        req.headers_mut().insert(RETRIED, HeaderValue::from_static("1"));
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let send = async {
                let tls = tls.map(|c| (endpoint.identity.as_str(), c));
                let mut sender = proxy.pools.h2(endpoint.address, tls, Opts::default()).await.ok()?;
                let resp = sender.send_request(req).await.ok()?;
                // Read the answer to the end so the stream closes cleanly, then drop it.
                resp.into_body().collect().await.ok()
            };
            let outcome = match tokio::time::timeout(MIRROR_TIMEOUT, send).await {
                Ok(Some(_)) => "sent",
                _ => "failed",
            };
            proxy.telemetry.mirror(&svc, outcome);
        });
    }
}

/// Counts a try at endpoint `i` (outlier detection and the attempts metric).
fn observe(proxy: &Proxy, rt: &ServiceRuntime, i: usize, success: bool, latency: Option<Duration>) {
    let outcome = if success { Outcome::Success } else { Outcome::Failure };
    proxy.telemetry.attempt(&rt.name, success);
    if rt.observe(i, outcome, latency) {
        proxy.telemetry.ejection(&rt.name);
    }
}

/// No try in flight (see `Call::in_flight`).
const NO_TRY: usize = usize::MAX;

/// An endpoint's response body, whose end decides whether the endpoint succeeded: one that
/// breaks off after the headers (the endpoint died, reset the stream or stalled past the idle
/// timeout) counts against the endpoint like a failure before them, unless the client's own
/// body broke first; one that ends whole counts as a success.
struct EndpointBody {
    inner: Body,
    /// Taken on the first error.
    endpoint: Option<(Arc<Proxy>, Arc<ServiceRuntime>, usize)>,
    client: Arc<BodyState>,
}

impl EndpointBody {
    fn wrap(inner: Body, call: &Call<'_>, i: usize) -> Body {
        if http_body::Body::is_end_stream(&inner) {
            return inner;
        }
        let endpoint = Some((call.proxy.clone(), call.rt.clone(), i));
        let client = call.client.clone();
        http_body_util::BodyExt::boxed_unsync(EndpointBody { inner, endpoint, client })
    }
}

impl http_body::Body for EndpointBody {
    type Data = bytes::Bytes;
    type Error = weft_core::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        use std::task::Poll;
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Err(error))) if self.client.fault().is_none() => {
                if let Some((proxy, rt, i)) = self.endpoint.take() {
                    tracing::info!(service = %rt.name, endpoint = %rt.endpoints[i].address, %error, "response body broke off");
                    proxy.telemetry.body_failure(&rt.name);
                    if rt.observe(i, Outcome::Failure, None) {
                        proxy.telemetry.ejection(&rt.name);
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some((_, rt, i)) = self.endpoint.take() {
                    rt.observe(i, Outcome::Success, None);
                }
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// A copy of a request head, for a retry or a mirror.
fn clone_head(p: &Parts) -> Parts {
    let mut b = Request::builder().method(p.method.clone()).uri(p.uri.clone()).version(p.version);
    if let Some(h) = b.headers_mut() {
        *h = p.headers.clone();
    }
    b.body(()).expect("a valid head stays valid").into_parts().0
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The authority the app addressed: absolute-form URI or `:authority`, else `Host`.
fn target_authority<B>(req: &Request<B>) -> Option<String> {
    if let Some(a) = req.uri().authority() {
        return Some(a.as_str().to_ascii_lowercase());
    }
    let host = req.headers().get(http::header::HOST)?.to_str().ok()?;
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

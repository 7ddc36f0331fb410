//! One request on its way to a destination service, in phases: limit (the service's rate
//! limit), fault (the route's injected aborts and delays), admit (pending requests), pick
//! (an endpoint by the balancer, skipping those tried), try (one endpoint), classify (what
//! the answer or failure says about the endpoint: outlier detection and the attempts metric),
//! retry (within the route's policy and the service's retry budget, after a backoff), then
//! mirror. HTTP requests go over the pooled HTTP/2 connection to the endpoint; an HTTP/1.1
//! Upgrade or opaque TCP goes through the same phases on a connection of its own per try.

use crate::balance::{Outcome as EndpointOutcome, ServiceRuntime};
use crate::downstream::{BodyState, ClientBody, ClientFault};
use crate::forward::{RETRIED, reply};
use crate::idle::IdleTimeout;
use crate::pool::{ConnectError, Opts};
use crate::reason::Reason;
use crate::replay::{self, Replay};
use crate::route::CompiledRoute;
use crate::state::Proxy;
use http::request::Parts;
use http::{HeaderValue, Method};
use http_body_util::BodyExt;
use hyper::upgrade::OnUpgrade;
use hyper::{Request, Response, StatusCode};
use parking_lot::Mutex;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_core::Body;

/// A mirrored copy gets this long before it is abandoned.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(5);

/// The identity and address of the endpoint that answered.
#[derive(Clone, Debug)]
pub(crate) struct PeerIdentity(pub(crate) Arc<str>, pub(crate) SocketAddr);

/// How a request ended: the answer for the client, the endpoint that gave it (`None` when this
/// proxy answered itself), and the retries it took.
pub(crate) struct Outcome {
    pub(crate) resp: Response<Body>,
    pub(crate) upstream: Option<PeerIdentity>,
    pub(crate) retries: u32,
    /// Time spent waiting on endpoints for a response head, every try included ([`crate::cost`]).
    pub(crate) waited: Duration,
}

impl Outcome {
    /// This proxy's own answer, before any endpoint was tried.
    pub(crate) fn refused(status: StatusCode, reason: Reason, detail: impl std::fmt::Display) -> Self {
        reply(status, reason, detail).into()
    }
}

impl From<Response<Body>> for Outcome {
    fn from(resp: Response<Body>) -> Self {
        Outcome {
            resp,
            upstream: None,
            retries: 0,
            waited: Duration::ZERO,
        }
    }
}

/// The peer label of a plaintext hop.
fn plaintext() -> Arc<str> {
    static PLAINTEXT: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    PLAINTEXT.get_or_init(|| Arc::from("plaintext")).clone()
}

/// Forwards an HTTP request (its head already pointed at the service) to an endpoint of `rt`,
/// within `route`'s request timeout.
pub(crate) async fn forward(
    proxy: &Arc<Proxy>,
    rt: &Arc<ServiceRuntime>,
    route: &CompiledRoute,
    grpc: bool,
    retried_before: bool,
    parts: Parts,
    body: Body,
) -> Outcome {
    let client = parts.extensions.get::<Arc<BodyState>>().cloned().unwrap_or_default();
    let in_flight = std::sync::atomic::AtomicUsize::new(NO_TRY);
    let call = Call {
        proxy,
        rt,
        route,
        grpc,
        retried_before,
        client: &client,
        in_flight: &in_flight,
        upgrade: false,
        upgraded: Mutex::new(None),
    };
    let fut = call.run(parts, body);
    match route.timeout {
        Some(t) => match tokio::time::timeout(t, fut).await {
            Ok(r) => r,
            // Still waiting for the client's body: the client was too slow, not the service.
            Err(_) if client.timed_out() => ClientFault::Timeout
                .reply(format!("the request body did not arrive within {t:?} (route {})", route.name))
                .into(),
            Err(_) => {
                // An endpoint that never answered failed this request, like one past its
                // per-try timeout: without this, one that hangs is never ejected.
                let hung = in_flight.load(std::sync::atomic::Ordering::Relaxed);
                if hung != NO_TRY {
                    observe(proxy, rt, hung, false, None);
                }
                Outcome::refused(
                    StatusCode::GATEWAY_TIMEOUT,
                    Reason::RequestTimeout,
                    format!("no response within {t:?} (route {}, retries included)", route.name),
                )
            }
        },
        None => fut.await,
    }
}

/// Sends an Upgrade request (its head ready: [`crate::upgrade::prepare`]) to an endpoint of
/// `rt`. On 101 also returns the endpoint's side of the upgraded stream, to be joined with the
/// client's.
pub(crate) async fn upgrade(
    proxy: &Arc<Proxy>,
    rt: &Arc<ServiceRuntime>,
    route: &CompiledRoute,
    parts: Parts,
) -> (Outcome, Option<OnUpgrade>) {
    let client = Arc::new(BodyState::default());
    let in_flight = std::sync::atomic::AtomicUsize::new(NO_TRY);
    let call = Call {
        proxy,
        rt,
        route,
        grpc: false,
        retried_before: false,
        client: &client,
        in_flight: &in_flight,
        upgrade: true,
        upgraded: Mutex::new(None),
    };
    let outcome = call.run(parts, weft_core::empty()).await;
    let upstream = call
        .upgraded
        .lock()
        .take()
        .filter(|_| outcome.resp.status() == StatusCode::SWITCHING_PROTOCOLS);
    (outcome, upstream)
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
    /// An HTTP/1.1 Upgrade (or opaque TCP): each try opens a connection of its own and sends
    /// the Upgrade on it; nothing is retried once sent, nothing is mirrored.
    upgrade: bool,
    /// The endpoint's side of the upgraded stream, once one answered 101.
    upgraded: Mutex<Option<OnUpgrade>>,
}

/// What one try got back.
enum Tried {
    /// The endpoint answered (whatever the status).
    Answered(Response<Body>, PeerIdentity),
    /// This proxy refused before the endpoint could answer (no identity, pool full, the
    /// client's body failed): handed back as it is, never retried.
    Refused(Response<Body>),
}

/// Why a try failed, when it did not produce a response to hand back.
// The request moves back to the caller in `NotSent`; boxing it would allocate on every connect
// failure to save stack space on a path that is cold.
#[allow(clippy::large_enum_variant)]
enum TryFailure {
    /// Nothing reached the endpoint; the request comes back for another try.
    NotSent(Request<Body>, Reason, String),
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
    async fn run(&self, parts: Parts, body: Body) -> Outcome {
        let (rt, route) = (self.rt, self.route);
        let svc = rt.config.name.as_str();
        if let Some(limiter) = &rt.limiter
            && !limiter.allow()
        {
            let l = &limiter.limit;
            return Outcome::refused(
                StatusCode::TOO_MANY_REQUESTS,
                Reason::RateLimited,
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
                return Outcome::refused(status, Reason::FaultAbort, format!("fault injected by route {}", route.name));
            }
            if let Some(delay) = &fault.delay
                && rand::random_range(0.0..100.0) < delay.percent
            {
                tokio::time::sleep(delay.duration.as_std()).await;
            }
        }
        let Some(_pending) = rt.shared.admit(rt.pool.max_pending_requests) else {
            return Outcome::refused(
                StatusCode::SERVICE_UNAVAILABLE,
                Reason::PoolFull,
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
            .filter(|m| !self.upgrade && rand::random_range(0.0..100.0) < m.percent)
            .map(|m| m.subset.clone());
        let retry = &route.retry;
        let method_ok = idempotent(&parts.method) || retry.non_idempotent || (self.grpc && !retry.on.grpc_codes.is_empty());
        let after_send = !self.upgrade && retry.retries > 0 && retry.after_send() && method_ok && !self.retried_before;
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
        let mut waited = Duration::ZERO;
        loop {
            let Some(i) = rt.pick(&candidates, &tried).or_else(|| rt.pick(&candidates, &[])) else {
                let which = subset.map(|s| format!(" in subset {s}")).unwrap_or_default();
                return Outcome::refused(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Reason::NoHealthyEndpoints,
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
            let tried = self.try_once(i, req).await;
            let took = started.elapsed();
            waited += took;
            let failure = match tried {
                Ok(Tried::Refused(resp)) => return resp.into(),
                Ok(Tried::Answered(resp, peer)) => {
                    let status = resp.status().as_u16();
                    let grpc_status = resp
                        .headers()
                        .get(&crate::forward::GRPC_STATUS)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok());
                    let failed = status >= 500 || grpc_status.is_some_and(|c: u32| c == 14);
                    if failed || http_body::Body::is_end_stream(resp.body()) {
                        self.observe(i, !failed, Some(took));
                    } else {
                        // Its latency counts now; whether it succeeded, once its body has
                        // ended whole (`EndpointBody`).
                        self.proxy.telemetry.attempt(&rt.name, true);
                        rt.observe_latency(i, took);
                    }
                    // The destination's sidecar says its app reset or could not be reached.
                    let peer_said = Reason::of(&resp);
                    let wants = after_send
                        && (retry.retry_status(status, grpc_status)
                            || (peer_said == Some(Reason::AppReset) && retry.on.reset)
                            || (peer_said == Some(Reason::AppUnavailable) && retry.on.connect_failure));
                    let replayable = replay.as_ref().is_some_and(Replay::available);
                    if wants && retries < retry.retries && replayable && self.take_retry() {
                        retries += 1;
                        tokio::time::sleep(crate::backoff::retry(retries)).await;
                        continue;
                    }
                    if let (Some(subset), Some(h), Some(r)) = (mirror.as_deref(), &head, &replay) {
                        self.mirror(subset, h, r);
                    }
                    let upstream = Some(peer);
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                        // No body to watch: the streams are joined next.
                        return Outcome {
                            resp,
                            upstream,
                            retries,
                            waited,
                        };
                    }
                    let idle = route.idle_timeout;
                    let resp = resp.map(|b| EndpointBody::wrap(IdleTimeout::wrap(b, idle), self, i));
                    return Outcome {
                        resp,
                        upstream,
                        retries,
                        waited,
                    };
                }
                Err(f) => f,
            };
            let (retryable, reason, detail) = match failure {
                TryFailure::NotSent(req, reason, detail) => {
                    next = Some(req);
                    let on = &retry.on;
                    let allowed = if reason == Reason::RefusedStream {
                        on.refused_stream
                    } else {
                        on.connect_failure
                    };
                    (allowed && retry.retries > 0, reason, detail)
                }
                TryFailure::Reset(detail) => (after_send && retry.on.reset, Reason::UpstreamReset, detail),
                TryFailure::PerTryTimeout(t) => (after_send, Reason::PerTryTimeout, format!("no response within {t:?}")),
                TryFailure::Idle(t) => (after_send, Reason::StreamIdleTimeout, format!("nothing moved for {t:?}")),
            };
            let replayable = next.is_some() || replay.as_ref().is_some_and(Replay::available);
            if retryable && replayable && retries < retry.retries {
                if self.take_retry() {
                    retries += 1;
                    tokio::time::sleep(crate::backoff::retry(retries)).await;
                    continue;
                }
                return Outcome::refused(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Reason::RetryBudgetExhausted,
                    format!(
                        "{reason} on {} of {svc} ({detail}); the retry budget is spent",
                        rt.endpoints[i].address
                    ),
                );
            }
            let status = match reason {
                Reason::UpstreamConnectTimeout | Reason::PerTryTimeout | Reason::StreamIdleTimeout => StatusCode::GATEWAY_TIMEOUT,
                Reason::UpstreamReset => StatusCode::BAD_GATEWAY,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            let resp = reply(
                status,
                reason,
                format!("endpoint {} of {svc}: {detail} ({} tries)", rt.endpoints[i].address, retries + 1),
            );
            return Outcome {
                resp,
                upstream: None,
                retries,
                waited,
            };
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
    async fn try_once(&self, i: usize, req: Request<Body>) -> Result<Tried, TryFailure> {
        if self.upgrade {
            return self.try_upgrade(i, req).await;
        }
        let (proxy, rt) = (self.proxy, self.rt);
        let endpoint = &rt.config.endpoints[i];
        let addr = endpoint.address;
        let tls = match proxy.identity.endpoint_tls(&rt.config, i) {
            Ok(config) => config.map(|c| (endpoint.identity.as_str(), c)),
            Err(why) => {
                return Ok(Tried::Refused(reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Reason::NoClientIdentity,
                    why,
                )));
            }
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
                return Ok(Tried::Refused(reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Reason::PoolFull,
                    format!("{}: {e}", rt.config.name),
                )));
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
                    return Ok(Tried::Refused(
                        ClientFault::Timeout.reply(format!("the request body stopped for {idle:?} (idle timeout)")),
                    ));
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
            Ok(resp) => Ok(Tried::Answered(resp.map(weft_core::boxed), PeerIdentity(peer, addr))),
            Err(e) if self.client.fault().is_some() => {
                // The stream failed because the client's body did: nothing to hold against
                // the endpoint or its connection.
                let fault = self.client.fault().expect("checked");
                tracing::debug!(error = %error_chain(e.error()), "the forwarded stream failed with the client's body");
                Ok(Tried::Refused(fault.reply(fault.describe())))
            }
            Err(mut e) => {
                // The connection is shared by every request to this endpoint: forget it only
                // when it is broken, not because one of its streams failed.
                if sender.is_closed() {
                    proxy.pools.evict(addr);
                }
                self.observe(i, false, None);
                let detail = format!("{}", e.error());
                let refused = error_chain(e.error()).contains("refused");
                match e.take_message() {
                    Some(req) => Err(TryFailure::NotSent(
                        req,
                        if refused {
                            Reason::RefusedStream
                        } else {
                            Reason::UpstreamConnectFailed
                        },
                        detail,
                    )),
                    None => Err(TryFailure::Reset(detail)),
                }
            }
        }
    }

    /// One try of an upgrade at endpoint `i`: a connection of its own, the Upgrade sent on it.
    async fn try_upgrade(&self, i: usize, req: Request<Body>) -> Result<Tried, TryFailure> {
        let (proxy, rt) = (self.proxy, self.rt);
        let addr = rt.config.endpoints[i].address;
        let tls = match proxy.identity.endpoint_tls(&rt.config, i) {
            Ok(config) => config,
            Err(why) => {
                return Ok(Tried::Refused(reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Reason::NoClientIdentity,
                    why,
                )));
            }
        };
        let peer = if tls.is_some() { rt.identities[i].clone() } else { plaintext() };
        let timeout = rt.pool.connect_timeout.map(|t| t.as_std()).unwrap_or(crate::pool::CONNECT_TIMEOUT);
        let io = match crate::pool::connect(addr, tls, timeout).await {
            Ok(io) => io,
            Err(e) => {
                tracing::debug!(service = %rt.config.name, endpoint = %addr, error = %e, "endpoint unreachable");
                self.observe(i, false, None);
                return Err(TryFailure::NotSent(req, e.reason(), e.to_string()));
            }
        };
        let _in_flight = rt.endpoints[i].start();
        match crate::upgrade::send_upgrade(io, req).await {
            Ok((resp, upstream)) => {
                *self.upgraded.lock() = upstream;
                Ok(Tried::Answered(resp, PeerIdentity(peer, addr)))
            }
            Err(e) => {
                self.observe(i, false, None);
                Err(TryFailure::Reset(e))
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
    let outcome = if success {
        EndpointOutcome::Success
    } else {
        EndpointOutcome::Failure
    };
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
                    if rt.observe(i, EndpointOutcome::Failure, None) {
                        proxy.telemetry.ejection(&rt.name);
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some((_, rt, i)) = self.endpoint.take() {
                    rt.observe(i, EndpointOutcome::Success, None);
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

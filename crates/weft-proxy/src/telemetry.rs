//! What the proxy measures: Prometheus metrics on the admin listener, and per-interval summaries
//! for the control plane (requests, errors and a latency histogram by direction and service).

use crate::reason::Reason;
use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use weft_api::proto::{Direction, TrafficStats};
use weft_api::telemetry::{LATENCY_SLOTS, slot_of};

pub(crate) struct Telemetry {
    pub(crate) registry: Arc<Registry>,
    pub(crate) access: Arc<crate::access::AccessLog>,
    pub(crate) tracer: crate::spans::Tracer,
    own_service: Arc<str>,
    plaintext: Arc<str>,
    empty: Arc<str>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<LatencyLabels, Histogram>,
    connections: Family<ConnectionLabels, Counter>,
    authz: Family<AuthzLabels, Counter>,
    /// Outbound tries by destination and result: what the upstream actually answered, next to
    /// `requests` (what the app got after retries).
    attempts: Family<ServiceOutcome, Counter>,
    retries: Family<ServiceOutcome, Counter>,
    /// Responses an endpoint broke off after their headers, by destination.
    body_failures: Family<ServiceOutcome, Counter>,
    ejections: Family<ServiceOutcome, Counter>,
    mirrors: Family<ServiceOutcome, Counter>,
    tcp: Family<ServiceOutcome, Counter>,
    tcp_bytes: Family<ServiceOutcome, Counter>,
    /// Seconds until the workload certificate expires (negative once expired, 0 without one).
    pub(crate) cert_expires_in: prometheus_client::metrics::gauge::Gauge,
    /// The interval's summaries. Read lock-free on every request; the map is copied and
    /// swapped only when a new key appears or the control stream takes the interval.
    interval: arc_swap::ArcSwap<Fast<WindowKey, Arc<Window>>>,
    /// What each kind of finished request updates (its `requests` counter, its latency
    /// histogram and its summary window), found once and then reached by one lookup: the two
    /// Prometheus families hash their labels with SipHash under a lock on every lookup.
    /// Written under `interval_writer` too, so an entry never outlives its window.
    handles: arc_swap::ArcSwap<Fast<HandleKey, Arc<Handles>>>,
    interval_writer: Mutex<()>,
    /// Time requests spend inside the proxy ([`crate::cost`]).
    pub(crate) self_time: Arc<crate::cost::SelfTime>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    direction: &'static str,
    service: Arc<str>,
    /// The other side's SPIFFE ID: the caller (inbound) or the endpoint (outbound); `plaintext`
    /// when the hop was not mTLS, empty when the proxy answered itself.
    peer: Arc<str>,
    route: Arc<str>,
    status: u16,
    /// `2xx`, `4xx`, `5xx`, ...: what dashboards and alerts group by; `client` for a request
    /// the client itself broke (a `client-*` reason), whatever its status.
    class: &'static str,
    reason: &'static str,
}

/// Where spans go, if anywhere.
pub(crate) struct Tracing {
    pub(crate) endpoint: Option<String>,
    pub(crate) sample: f64,
    pub(crate) resource: Vec<(&'static str, String)>,
}

/// One finished request, as the listeners report it.
#[derive(Clone, Copy)]
pub(crate) struct Finished<'a> {
    pub(crate) direction: Direction,
    /// Destination service for outbound; `None` for inbound (the proxy's own service).
    pub(crate) service: Option<&'a Arc<str>>,
    /// The policy route taken (outbound); `None` otherwise.
    pub(crate) route: Option<&'a Arc<str>>,
    /// Inbound: the request arrived over mTLS.
    pub(crate) mtls: bool,
    /// The other side's identity (see `RequestLabels::peer`); `None` for plaintext.
    pub(crate) peer: Option<&'a Arc<str>>,
    /// Config revision in force when the request started.
    pub(crate) revision: u64,
    pub(crate) status: u16,
    /// `x-weft-error` reason when the proxy answered itself.
    pub(crate) reason: &'static str,
    pub(crate) elapsed: Duration,
    /// Of `elapsed`, the time spent waiting on the upstream (zero: it reached none).
    pub(crate) waited: Duration,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceOutcome {
    service: Arc<str>,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthzLabels {
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    transport: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    direction: &'static str,
    service: Arc<str>,
}

/// Direction, destination service, route, revision.
type WindowKey = (Direction, Arc<str>, Arc<str>, u64);

/// The maps on the request path hash with foldhash: their keys are the proxy's own labels,
/// not attacker-chosen strings, so SipHash's flooding resistance buys nothing there.
type Fast<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Everything [`Telemetry::record`] reads of a request to choose what to update.
#[derive(Clone, PartialEq, Eq, Hash)]
struct HandleKey {
    direction: Direction,
    service: Arc<str>,
    peer: Arc<str>,
    route: Arc<str>,
    status: u16,
    reason: &'static str,
    revision: u64,
}

/// The metrics one kind of request updates. `window` is `None` for requests the client broke,
/// which stay out of the judged summaries.
struct Handles {
    requests: Counter,
    latency: Histogram,
    window: Option<Arc<Window>>,
}

struct Window {
    requests: AtomicU64,
    errors: AtomicU64,
    mtls: AtomicU64,
    /// One counter per log-scaled latency slot (weft_api::telemetry).
    slots: Box<[AtomicU64]>,
}

// === impl Window ===

impl Window {
    fn new() -> Self {
        Self {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            mtls: AtomicU64::new(0),
            slots: (0..LATENCY_SLOTS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

// === impl Telemetry ===

/// The access line of a request whose response headers are ready; it is written when the
/// response body ends (see [`crate::access::Logged`]). `own` is this proxy's SPIFFE ID (empty
/// without one), `own_service` this workload's service, `upstream` the endpoint (outbound) or
/// app (inbound) that answered.
pub(crate) fn access_entry(
    c: crate::access::Captured,
    done: &Finished<'_>,
    own: String,
    own_service: &str,
    upstream: String,
    retries: u32,
) -> crate::access::Entry {
    let inbound = done.direction == Direction::Inbound;
    let (direction, source, destination, service) = if inbound {
        let peer = done.peer.map(|p| p.to_string()).unwrap_or_else(|| "plaintext".into());
        ("inbound", peer, own, own_service.to_string())
    } else {
        let peer = done.peer.map(|p| p.to_string()).unwrap_or_default();
        ("outbound", own, peer, done.service.map(|s| s.to_string()).unwrap_or_default())
    };
    crate::access::Entry {
        time_ms: 0,
        direction,
        trace_id: c.trace,
        source,
        destination,
        service,
        route: done.route.map(|r| r.to_string()).unwrap_or_default(),
        method: c.method,
        path: c.path,
        raw_path: c.raw_path,
        upstream,
        status: done.status,
        reason: done.reason,
        duration_ms: done.elapsed.as_secs_f64() * 1000.0,
        total_ms: 0.0,
        request_bytes: 0,
        response_bytes: 0,
        retries,
    }
}

impl Telemetry {
    pub(crate) fn new(own_service: &str, access_log: bool, access_log_sample: f64, tracing: Tracing) -> Self {
        let mut registry = Registry::with_prefix("weft_proxy");
        let access = Arc::new(crate::access::AccessLog::new(access_log, access_log_sample, &mut registry));
        let tracer = crate::spans::Tracer::new(tracing.endpoint, tracing.sample, tracing.resource, &mut registry);
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests finished, by direction, service (destination for outbound, own for inbound), status and proxy reason",
            requests.clone(),
        );
        let latency = Family::<LatencyLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(weft_api::telemetry::LATENCY_BOUNDS_MS.iter().map(|ms| ms / 1000.0))
        });
        registry.register(
            "request_duration_seconds",
            "Time to response headers, by direction and service",
            latency.clone(),
        );
        let connections = Family::<ConnectionLabels, Counter>::default();
        registry.register(
            "inbound_connections",
            "Inbound connections by transport (mtls, plaintext) and outcome (accepted, refused-strict, handshake-failed, ...)",
            connections.clone(),
        );
        let cert_expires_in = prometheus_client::metrics::gauge::Gauge::default();
        registry.register(
            "certificate_expires_in_seconds",
            "Seconds until the workload certificate expires",
            cert_expires_in.clone(),
        );
        let authz = Family::<AuthzLabels, Counter>::default();
        registry.register(
            "authz_decisions",
            "Inbound authorization decisions (allow, deny, audit-deny, refused-path)",
            authz.clone(),
        );
        let family = |registry: &mut Registry, name: &str, help: &str| {
            let f = Family::<ServiceOutcome, Counter>::default();
            registry.register(name, help, f.clone());
            f
        };
        let attempts = family(
            &mut registry,
            "upstream_attempts",
            "Outbound tries by destination and outcome (success, failure): the actual success rate, before retries",
        );
        let retries = family(
            &mut registry,
            "retries",
            "Outbound retries by destination and outcome (retried, budget-exhausted)",
        );
        let body_failures = family(
            &mut registry,
            "upstream_body_failures",
            "Outbound responses whose body the endpoint broke off after the headers (closed, reset or stalled), by destination; each also counts against the endpoint in outlier detection",
        );
        let ejections = family(
            &mut registry,
            "outlier_ejections",
            "Endpoints ejected by outlier detection, by destination",
        );
        let mirrors = family(
            &mut registry,
            "mirrored_requests",
            "Mirrored copies by destination and outcome (sent, failed, dropped, not-replayable)",
        );
        let tcp = family(
            &mut registry,
            "tcp_connections",
            "Opaque TCP connections by destination and outcome (closed, or why refused)",
        );
        let tcp_bytes = family(
            &mut registry,
            "tcp_bytes",
            "Opaque TCP bytes by destination and direction (sent, received)",
        );
        let self_time = Arc::new(crate::cost::SelfTime::new());
        registry.register_collector(Box::new(crate::cost::CostMetrics(self_time.clone())));
        Self {
            self_time,
            tracer,
            tcp,
            tcp_bytes,
            attempts,
            retries,
            body_failures,
            ejections,
            mirrors,
            registry: Arc::new(registry),
            access,
            own_service: Arc::from(own_service),
            plaintext: Arc::from("plaintext"),
            empty: Arc::from(""),
            requests,
            latency,
            connections,
            authz,
            cert_expires_in,
            interval: Default::default(),
            handles: Default::default(),
            interval_writer: Mutex::new(()),
        }
    }

    /// Records one finished request: one lookup of its [`Handles`] (built on its kind's first
    /// request, [`Telemetry::new_handles`]), then counters only; nothing is allocated or hashed
    /// with SipHash once a kind has been seen.
    pub(crate) fn record(&self, done: &Finished<'_>) {
        let inbound = done.direction == Direction::Inbound;
        let key = HandleKey {
            direction: done.direction,
            service: done.service.unwrap_or(&self.own_service).clone(),
            peer: done.peer.unwrap_or(if inbound { &self.plaintext } else { &self.empty }).clone(),
            route: done.route.unwrap_or(&self.empty).clone(),
            status: done.status,
            reason: done.reason,
            revision: done.revision,
        };
        let handles = match self.handles.load().get(&key) {
            Some(h) => h.clone(),
            None => self.new_handles(key, done.service.is_none()),
        };
        handles.requests.inc();
        let secs = done.elapsed.as_secs_f64();
        handles.latency.observe(secs);
        // A request the client broke says nothing about the service: it stays out of the
        // summaries the control plane judges (requests, errors, latency), and its window is none.
        let Some(w) = &handles.window else { return };
        self.self_time.record(done.direction, done.elapsed, done.waited);
        w.requests.fetch_add(1, Relaxed);
        if done.mtls {
            w.mtls.fetch_add(1, Relaxed);
        }
        // A plaintext request strict mTLS refused is answered 403, but its caller was cut off
        // by the mesh, as at accept ([`Telemetry::refused_plaintext`]): the judge must see it.
        if done.status >= 500 || done.reason == Reason::MtlsRequired.as_str() {
            w.errors.fetch_add(1, Relaxed);
        }
        w.slots[slot_of(secs * 1000.0)].fetch_add(1, Relaxed);
    }

    /// The cold path of [`Telemetry::record`]: a kind of request not seen since its window was
    /// last dropped. `own` says the service is this proxy's own (inbound), which the summaries
    /// key by the empty name.
    fn new_handles(&self, key: HandleKey, own: bool) -> Arc<Handles> {
        let client_fault = crate::downstream::ClientFault::is_reason(key.reason);
        let direction = match key.direction {
            Direction::Inbound => "inbound",
            _ => "outbound",
        };
        let requests = self
            .requests
            .get_or_create(&RequestLabels {
                direction,
                service: key.service.clone(),
                peer: key.peer.clone(),
                route: key.route.clone(),
                status: key.status,
                class: match key.status {
                    _ if client_fault => "client",
                    100..=199 => "1xx",
                    200..=299 => "2xx",
                    300..=399 => "3xx",
                    400..=499 => "4xx",
                    _ => "5xx",
                },
                reason: key.reason,
            })
            .clone();
        let latency = self
            .latency
            .get_or_create(&LatencyLabels {
                direction,
                service: key.service.clone(),
            })
            .clone();
        let summary_service = if own { self.empty.clone() } else { key.service.clone() };
        let window_key = (key.direction, summary_service, key.route.clone(), key.revision);
        let _writer = self.interval_writer.lock();
        let window = (!client_fault).then(|| self.window_locked(window_key));
        let current = self.handles.load_full();
        if let Some(h) = current.get(&key) {
            return h.clone();
        }
        let handles = Arc::new(Handles { requests, latency, window });
        let mut next = Fast::clone(&current);
        next.insert(key, handles.clone());
        self.handles.store(Arc::new(next));
        handles
    }

    /// Counts a plaintext connection that strict mTLS refused as one failed inbound request in
    /// the summary the control plane judges: its caller wanted at least one answer and got
    /// none, and an intent that made mTLS strict must see the callers it cut off. It has no
    /// latency (nothing was answered).
    pub(crate) fn refused_plaintext(&self, revision: u64) {
        let key = (Direction::Inbound, self.empty.clone(), self.empty.clone(), revision);
        let w = match self.interval.load().get(&key) {
            Some(w) => w.clone(),
            None => self.window_locked_by_key(key),
        };
        w.requests.fetch_add(1, Relaxed);
        w.errors.fetch_add(1, Relaxed);
    }

    /// [`Telemetry::window_locked`], taking the writer's lock.
    fn window_locked_by_key(&self, key: WindowKey) -> Arc<Window> {
        let _writer = self.interval_writer.lock();
        self.window_locked(key)
    }

    /// The summary window of `key`, added if it is new (the cold path: a new destination, route
    /// or revision). The caller holds `interval_writer`.
    fn window_locked(&self, key: WindowKey) -> Arc<Window> {
        let current = self.interval.load_full();
        if let Some(w) = current.get(&key) {
            return w.clone();
        }
        let mut next = Fast::clone(&current);
        let w = Arc::new(Window::new());
        next.insert(key, w.clone());
        self.interval.store(Arc::new(next));
        w
    }

    /// Counts one try at an upstream endpoint.
    pub(crate) fn attempt(&self, service: &Arc<str>, success: bool) {
        self.count(&self.attempts, service, if success { "success" } else { "failure" });
    }

    /// Counts a retry taken (`retried`) or refused by the budget (`budget-exhausted`).
    pub(crate) fn retry(&self, service: &Arc<str>, outcome: &'static str) {
        self.count(&self.retries, service, outcome);
    }

    /// Counts a response body an endpoint broke off.
    pub(crate) fn body_failure(&self, service: &Arc<str>) {
        self.count(&self.body_failures, service, "failed");
    }

    pub(crate) fn ejection(&self, service: &Arc<str>) {
        self.count(&self.ejections, service, "ejected");
    }

    pub(crate) fn mirror(&self, service: &Arc<str>, outcome: &'static str) {
        self.count(&self.mirrors, service, outcome);
    }

    pub(crate) fn tcp(&self, service: &Arc<str>, outcome: &'static str) {
        self.count(&self.tcp, service, outcome);
    }

    pub(crate) fn tcp_bytes(&self, service: &Arc<str>, sent: u64, received: u64) {
        for (outcome, n) in [("sent", sent), ("received", received)] {
            self.tcp_bytes
                .get_or_create(&ServiceOutcome {
                    service: service.clone(),
                    outcome,
                })
                .inc_by(n);
        }
    }

    fn count(&self, family: &Family<ServiceOutcome, Counter>, service: &Arc<str>, outcome: &'static str) {
        family
            .get_or_create(&ServiceOutcome {
                service: service.clone(),
                outcome,
            })
            .inc();
    }

    /// Counts one authorization decision.
    pub(crate) fn authz(&self, decision: &'static str) {
        self.authz.get_or_create(&AuthzLabels { decision }).inc();
    }

    /// Counts one inbound connection.
    pub(crate) fn connection(&self, transport: &'static str, outcome: &'static str) {
        self.connections.get_or_create(&ConnectionLabels { transport, outcome }).inc();
    }

    /// Takes the interval's summaries, leaving an empty interval.
    /// Windows idle for a whole interval are dropped.
    pub(crate) fn take_interval(&self) -> Vec<TrafficStats> {
        let _writer = self.interval_writer.lock();
        let current = self.interval.load_full();
        let mut out = Vec::new();
        let mut idle = Vec::new();
        for ((direction, service, route, revision), w) in current.iter() {
            let requests = w.requests.swap(0, Relaxed);
            if requests == 0 {
                idle.push((*direction, service.clone(), route.clone(), *revision));
                continue;
            }
            let (mut latency_slots, mut latency_counts) = (Vec::new(), Vec::new());
            for (i, slot) in w.slots.iter().enumerate() {
                let n = slot.swap(0, Relaxed);
                if n > 0 {
                    latency_slots.push(i as u32);
                    latency_counts.push(n);
                }
            }
            out.push(TrafficStats {
                direction: *direction as i32,
                service: service.to_string(),
                route: route.to_string(),
                revision: *revision,
                requests,
                errors: w.errors.swap(0, Relaxed),
                mtls: w.mtls.swap(0, Relaxed),
                latency_slots,
                latency_counts,
            });
        }
        if !idle.is_empty() {
            let mut next = Fast::clone(&current);
            let mut dropped = Vec::new();
            for k in idle {
                dropped.extend(next.remove(&k));
            }
            self.interval.store(Arc::new(next));
            // The handles that led to a dropped window go with it (the next such request
            // makes a new window, which the next report reads), and so do those of requests
            // the client broke (no window), so old revisions' kinds do not pile up.
            let dropped: std::collections::HashSet<*const Window> = dropped.iter().map(Arc::as_ptr).collect();
            let mut handles = Fast::clone(&self.handles.load());
            handles.retain(|_, h| h.window.as_ref().is_some_and(|w| !dropped.contains(&Arc::as_ptr(w))));
            self.handles.store(Arc::new(handles));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `orders`'s telemetry, with no access log and no tracing.
    fn orders_telemetry() -> Telemetry {
        let tracing = Tracing {
            endpoint: None,
            sample: 0.0,
            resource: Vec::new(),
        };
        Telemetry::new("orders", false, 100.0, tracing)
    }

    /// An outbound request to `service` on `route`, at revision 1, 5 ms of which 4 upstream.
    fn to_pay<'a>(service: &'a Arc<str>, route: &'a Arc<str>, mtls: bool, status: u16, reason: &'static str) -> Finished<'a> {
        Finished {
            direction: Direction::Outbound,
            service: Some(service),
            route: Some(route),
            mtls,
            peer: None,
            revision: 1,
            status,
            reason,
            elapsed: Duration::from_millis(5),
            waited: Duration::from_millis(4),
        }
    }

    #[test]
    fn requests_the_client_broke_stay_out_of_the_judged_summaries() {
        let t = orders_telemetry();
        let (service, route) = (Arc::from("pay"), Arc::from("default"));
        let finished = |status, reason| to_pay(&service, &route, false, status, reason);
        t.record(&finished(200, ""));
        t.record(&finished(503, "no-healthy-endpoints"));
        t.record(&finished(400, "client-bad-request"));
        t.record(&finished(499, "client-reset"));
        let stats = t.take_interval();
        assert_eq!(stats.len(), 1);
        assert_eq!((stats[0].requests, stats[0].errors), (2, 1), "only the service's own outcomes");
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &t.registry).unwrap();
        let client = text.lines().filter(|l| l.contains("class=\"client\"")).count();
        assert_eq!(client, 2, "{text}");
    }

    /// The handles [`Telemetry::record`] keeps must follow the windows: a window dropped after
    /// an idle interval takes its handles with it, and the next such request counts in a new
    /// window that the next report reads (a kept handle would count into the dropped one).
    #[test]
    fn a_kind_of_request_counts_again_after_its_idle_window_was_dropped() {
        let t = orders_telemetry();
        let (service, route) = (Arc::from("pay"), Arc::from("default"));
        let finished = to_pay(&service, &route, true, 502, "");
        for _ in 0..3 {
            t.record(&finished);
        }
        let first = t.take_interval();
        assert_eq!((first[0].requests, first[0].errors, first[0].mtls), (3, 3, 3));
        assert!(t.take_interval().is_empty(), "an idle interval reports nothing");
        assert!(t.handles.load().is_empty() && t.interval.load().is_empty(), "both dropped");
        t.record(&finished);
        let again = t.take_interval();
        assert_eq!(again.len(), 1, "{again:?}");
        assert_eq!((again[0].requests, again[0].errors), (1, 1));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &t.registry).unwrap();
        let line = text
            .lines()
            .find(|l| l.starts_with("weft_proxy_requests_total{"))
            .expect("the counter");
        assert!(line.ends_with(" 4"), "the Prometheus counter kept counting: {line}");
    }

    /// What lets an intent that makes mTLS strict see the callers it cut off: each refused
    /// plaintext connection is a failed inbound request in the same summary as the served ones.
    #[test]
    fn plaintext_refused_under_strict_is_a_failed_inbound_request() {
        let t = orders_telemetry();
        let served = |mtls, status, reason| Finished {
            direction: Direction::Inbound,
            service: None,
            route: None,
            mtls,
            peer: None,
            revision: 3,
            status,
            reason,
            elapsed: Duration::from_millis(5),
            waited: Duration::from_millis(4),
        };
        t.record(&served(true, 200, ""));
        // A request on a plaintext connection opened before the switch: answered 403, failed.
        t.record(&served(false, 403, "mtls-required"));
        // Any other 403 is the app's or authorization's answer, not a failure.
        t.record(&served(true, 403, ""));
        t.refused_plaintext(3);
        t.refused_plaintext(3);
        let stats = t.take_interval();
        assert_eq!(stats.len(), 1, "{stats:?}");
        let s = &stats[0];
        assert_eq!((s.requests, s.errors, s.mtls, s.revision), (5, 3, 2, 3));
        assert_eq!(s.latency_counts, [3], "a refused connection has no latency");
    }
}

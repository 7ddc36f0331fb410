//! What the proxy measures: Prometheus metrics on the admin listener, and per-interval summaries
//! for the control plane (requests, errors and a latency histogram by direction and service).

use parking_lot::Mutex;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use weft_api::proto::{Direction, TrafficStats};
use weft_api::telemetry::{BUCKETS, bucket_of};

pub struct Telemetry {
    pub registry: Arc<Registry>,
    pub access: crate::access::AccessLog,
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
    ejections: Family<ServiceOutcome, Counter>,
    mirrors: Family<ServiceOutcome, Counter>,
    tcp: Family<ServiceOutcome, Counter>,
    tcp_bytes: Family<ServiceOutcome, Counter>,
    /// Seconds until the workload certificate expires (negative once expired, 0 without one).
    pub cert_expires_in: prometheus_client::metrics::gauge::Gauge,
    interval: Mutex<HashMap<WindowKey, Window>>,
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
    reason: &'static str,
}

/// One finished request, as the listeners report it.
#[derive(Clone, Copy)]
pub struct Finished<'a> {
    pub direction: Direction,
    /// Destination service for outbound; `None` for inbound (the proxy's own service).
    pub service: Option<&'a Arc<str>>,
    /// The policy route taken (outbound); `None` otherwise.
    pub route: Option<&'a Arc<str>>,
    /// Inbound: the request arrived over mTLS.
    pub mtls: bool,
    /// The other side's identity (see `RequestLabels::peer`); `None` for plaintext.
    pub peer: Option<&'a Arc<str>>,
    /// Config revision in force when the request started.
    pub revision: u64,
    pub status: u16,
    /// `x-weft-error` reason when the proxy answered itself.
    pub reason: &'static str,
    pub elapsed: Duration,
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

#[derive(Default)]
struct Window {
    requests: u64,
    errors: u64,
    mtls: u64,
    buckets: [u64; BUCKETS],
}

// === impl Telemetry ===

impl Telemetry {
    pub fn new(own_service: &str, access_log: bool, access_log_sample: f64) -> Self {
        let mut registry = Registry::with_prefix("weft_proxy");
        let access = crate::access::AccessLog::new(access_log, access_log_sample, &mut registry);
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
        Self {
            tcp,
            tcp_bytes,
            attempts,
            retries,
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
            interval: Mutex::new(HashMap::new()),
        }
    }

    /// Records one finished request. Labels are shared strings (`Arc<str>`) handed over by
    /// the caller, so recording allocates nothing once a series exists.
    pub fn record(&self, done: &Finished<'_>) {
        let dir = match done.direction {
            Direction::Inbound => "inbound",
            _ => "outbound",
        };
        let svc = done.service.unwrap_or(&self.own_service);
        let route = done.route.unwrap_or(&self.empty);
        let peer = done.peer.unwrap_or(if done.direction == Direction::Inbound {
            &self.plaintext
        } else {
            &self.empty
        });
        self.requests
            .get_or_create(&RequestLabels {
                direction: dir,
                service: svc.clone(),
                peer: peer.clone(),
                route: route.clone(),
                status: done.status,
                reason: done.reason,
            })
            .inc();
        let secs = done.elapsed.as_secs_f64();
        self.latency
            .get_or_create(&LatencyLabels {
                direction: dir,
                service: svc.clone(),
            })
            .observe(secs);
        // The control plane's summary keys inbound requests by the empty service name.
        let summary_service = done.service.unwrap_or(&self.empty);
        let mut interval = self.interval.lock();
        let w = interval
            .entry((done.direction, summary_service.clone(), route.clone(), done.revision))
            .or_default();
        w.requests += 1;
        w.mtls += u64::from(done.mtls);
        if done.status >= 500 {
            w.errors += 1;
        }
        w.buckets[bucket_of(secs * 1000.0)] += 1;
    }

    /// Counts one try at an upstream endpoint.
    pub fn attempt(&self, service: &Arc<str>, success: bool) {
        self.count(&self.attempts, service, if success { "success" } else { "failure" });
    }

    /// Counts a retry taken (`retried`) or refused by the budget (`budget-exhausted`).
    pub fn retry(&self, service: &Arc<str>, outcome: &'static str) {
        self.count(&self.retries, service, outcome);
    }

    pub fn ejection(&self, service: &Arc<str>) {
        self.count(&self.ejections, service, "ejected");
    }

    pub fn mirror(&self, service: &Arc<str>, outcome: &'static str) {
        self.count(&self.mirrors, service, outcome);
    }

    pub fn tcp(&self, service: &Arc<str>, outcome: &'static str) {
        self.count(&self.tcp, service, outcome);
    }

    pub fn tcp_bytes(&self, service: &Arc<str>, sent: u64, received: u64) {
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
    pub fn authz(&self, decision: &'static str) {
        self.authz.get_or_create(&AuthzLabels { decision }).inc();
    }

    /// Counts one inbound connection.
    pub fn connection(&self, transport: &'static str, outcome: &'static str) {
        self.connections.get_or_create(&ConnectionLabels { transport, outcome }).inc();
    }

    /// Takes the interval's summaries, leaving an empty interval.
    pub fn take_interval(&self) -> Vec<TrafficStats> {
        let taken = std::mem::take(&mut *self.interval.lock());
        taken
            .into_iter()
            .map(|((direction, service, route, revision), w)| TrafficStats {
                direction: direction as i32,
                service: service.to_string(),
                route: route.to_string(),
                revision,
                requests: w.requests,
                errors: w.errors,
                mtls: w.mtls,
                latency_buckets: w.buckets.to_vec(),
            })
            .collect()
    }
}

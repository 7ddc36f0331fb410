//! The proxy's shared state: its identity, the config it runs on (swapped atomically), the
//! services it has asked the control plane for, and its clients and metrics.

use crate::Bound;
use crate::balance::{RateLimiter, ServiceRuntime};
use crate::config::{ProxyConfig, Source, Workload};
use crate::host::{ServiceRef, UnknownService};
use crate::pool::Pools;
use crate::telemetry::Telemetry;
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use std::collections::BTreeSet;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use weft_api::mesh::MeshConfig;

/// How long a request for a service the proxy has not seen yet waits for the control plane.
const DISCOVERY_WAIT: Duration = Duration::from_secs(2);
/// Most tap events one proxy sends per second; more are dropped.
const TAP_EVENTS_PER_SECOND: f64 = 200.0;
/// Most services one proxy will ask the control plane for.
const MAX_SUBSCRIPTIONS: usize = 10_000;

pub struct Proxy {
    pub workload: Workload,
    pub app: SocketAddr,
    pub app_protocol: crate::config::AppProtocol,
    /// Header names the inbound proxy removes besides the identity headers it always removes:
    /// configured at start, lowercase, each once.
    pub strip_headers: Vec<http::HeaderName>,
    pub bound: Bound,
    pub advertise: SocketAddr,
    /// How it reaches the control plane (control mode).
    pub control: Option<crate::control::Link>,
    config: ArcSwap<MeshConfig>,
    /// Per destination service: its config and, once a request has needed it, its runtime
    /// (compiled routes, endpoint state, budgets), rebuilt on swap only where it was built.
    destinations: ArcSwap<HashMap<ServiceRef, Arc<Destination>>>,
    /// This service's inbound rate limit, if its policy sets one.
    pub inbound_limiter: ArcSwap<Option<Arc<RateLimiter>>>,
    /// Bumped on every applied config; requests waiting for a service watch it.
    applied: watch::Sender<u64>,
    pub ready: Arc<AtomicBool>,
    subscriptions: Mutex<BTreeSet<String>>,
    subscribe_tx: Option<mpsc::UnboundedSender<String>>,
    pub last_nack: Mutex<Option<String>>,
    pub telemetry: Telemetry,
    pub pools: Pools,
    /// Permits for mirrored copies in flight.
    pub mirrors: Arc<tokio::sync::Semaphore>,
    /// Open `weft tap`s (from the control plane); empty almost always.
    pub taps: ArcSwap<Vec<weft_api::proto::Tap>>,
    tap_tx: mpsc::Sender<weft_api::proto::TapEvent>,
    /// Taken by the control stream, which sends the events on.
    pub tap_rx: Mutex<Option<mpsc::Receiver<weft_api::proto::TapEvent>>>,
    /// At most this many tap events per second leave the proxy.
    tap_limit: RateLimiter,
    /// Shared with the control link, which presents it as the client certificate.
    pub identity: Arc<crate::identity::Identity>,
    /// Join token (control mode); the proxy is ready only once it holds a certificate.
    pub token: Option<String>,
    config_ready: AtomicBool,
}

/// Why [`Proxy::service`] has no service to route to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missing {
    /// The control plane (or the static file) knows no such service.
    Unknown,
    /// The control plane has not said within [`DISCOVERY_WAIT`] (or this proxy already asks it
    /// for as many services as it may).
    NoAnswer,
}

// === impl Proxy ===

impl Proxy {
    /// Builds the proxy; in control mode also returns the receiver of new subscriptions, which
    /// the control stream drains.
    pub fn new(cfg: ProxyConfig, bound: Bound) -> Result<(Self, Option<mpsc::UnboundedReceiver<String>>), crate::control::LinkError> {
        let identity = Arc::new(crate::identity::Identity::default());
        let (config, control, token, channel) = match cfg.source {
            Source::Static(mesh) => (mesh, None, None, None),
            Source::Control { url, token } => {
                let link = crate::control::Link::new(&url, token.as_deref(), identity.clone())?;
                let (tx, rx) = mpsc::unbounded_channel();
                (MeshConfig::default(), Some(link), token, Some((tx, rx)))
            }
        };
        let static_mode = control.is_none();
        let ready = Arc::new(AtomicBool::new(static_mode));
        let (subscribe_tx, rx) = match channel {
            Some((tx, rx)) => (Some(tx), Some(rx)),
            None => (None, None),
        };
        let initial = destinations(&config, &HashMap::new(), &cfg.workload.cluster);
        let (tap_tx, tap_rx) = mpsc::channel(1024);
        let app_connect_timeout = cfg.app_connect_timeout;
        let mut strip_headers = cfg.strip_headers;
        strip_headers.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        strip_headers.dedup();
        let proxy = Proxy {
            telemetry: Telemetry::new(
                cfg.workload.service(),
                cfg.access_log,
                cfg.access_log_sample,
                crate::telemetry::Tracing {
                    endpoint: cfg.otlp_endpoint.clone(),
                    sample: cfg.trace_sample,
                    resource: vec![
                        ("service.name", cfg.workload.service().to_string()),
                        ("weft.workload", format!("{}/{}", cfg.workload.namespace, cfg.workload.name)),
                        ("weft.cluster", cfg.workload.cluster.clone()),
                    ],
                },
            ),
            advertise: cfg.advertise.unwrap_or(bound.inbound),
            workload: cfg.workload,
            app: cfg.app,
            app_protocol: cfg.app_protocol,
            strip_headers,
            bound,
            control,
            destinations: ArcSwap::from_pointee(initial),
            inbound_limiter: ArcSwap::from_pointee(config.inbound_rate_limit.clone().map(|l| Arc::new(RateLimiter::new(l)))),
            config: ArcSwap::from_pointee(config),
            applied: watch::channel(0).0,
            ready,
            subscriptions: Mutex::new(BTreeSet::new()),
            subscribe_tx,
            last_nack: Mutex::new(None),
            pools: Pools::new(app_connect_timeout),
            mirrors: Arc::new(tokio::sync::Semaphore::new(crate::outbound::MIRROR_CONCURRENCY)),
            taps: ArcSwap::from_pointee(Vec::new()),
            tap_tx,
            tap_rx: Mutex::new(Some(tap_rx)),
            tap_limit: RateLimiter::new(weft_api::resource::RateLimit {
                requests_per_second: TAP_EVENTS_PER_SECOND,
                burst: TAP_EVENTS_PER_SECOND as u32,
                at: Default::default(),
            }),
            identity,
            config_ready: AtomicBool::new(static_mode),
            token,
        };
        Ok((proxy, rx))
    }

    pub fn config(&self) -> Arc<MeshConfig> {
        self.config.load_full()
    }

    /// Revision of the config in force (no reference count taken).
    pub fn revision(&self) -> u64 {
        self.config.load().revision
    }

    /// Whether this workload's sidecar is bypassed (forwards without L7 policy).
    pub fn bypassed(&self) -> bool {
        self.config.load().bypass
    }

    /// Swaps in a new config; in-flight requests keep the one they started with.
    pub fn apply(&self, config: MeshConfig) {
        self.identity.follow(&config.trust_bundle, config.ca_generation);
        if let Some(link) = &self.control {
            link.trust(&config.trust_bundle);
        }
        let previous = self.destinations.load_full();
        let next = destinations(&config, &previous, &self.workload.cluster);
        self.destinations.store(Arc::new(next));
        let limiter = self.inbound_limiter.load_full();
        if limiter.as_ref().as_ref().map(|l| &l.limit) != config.inbound_rate_limit.as_ref() {
            let next = config.inbound_rate_limit.clone().map(|l| Arc::new(RateLimiter::new(l)));
            self.inbound_limiter.store(Arc::new(next));
        }
        self.config.store(Arc::new(config));
        self.config_ready.store(true, Ordering::Release);
        self.refresh_ready();
        self.applied.send_modify(|n| *n += 1);
    }

    /// Ready once it has a config and, when it has a join token, a workload certificate.
    pub fn refresh_ready(&self) {
        let ready = self.config_ready.load(Ordering::Acquire) && (self.token.is_none() || self.identity.tls().is_some());
        self.ready.store(ready, Ordering::Release);
    }

    pub fn subscriptions(&self) -> Vec<String> {
        self.subscriptions.lock().iter().cloned().collect()
    }

    /// The mesh service `authority` names ([`crate::host`]): a bare name is in this workload's
    /// namespace, and the fully qualified form ends in the trust domain of this proxy's own
    /// SPIFFE ID (the default one until it holds a certificate).
    pub fn resolve(&self, authority: &str) -> Result<ServiceRef, UnknownService> {
        let tls = self.identity.tls();
        let trust_domain = tls
            .as_ref()
            .and_then(|t| t.identity.strip_prefix("spiffe://")?.split_once('/'))
            .map(|(domain, _)| domain)
            .unwrap_or(crate::host::DEFAULT_TRUST_DOMAIN);
        crate::host::resolve(authority, &self.workload.namespace, trust_domain)
    }

    /// The runtime of `service`, asking the control plane for it (and waiting a little) the
    /// first time it is needed.
    pub async fn service(&self, service: &ServiceRef) -> Result<Arc<ServiceRuntime>, Missing> {
        if let Some(found) = self.known(service) {
            return found;
        }
        let Some(tx) = self.subscribe_tx.as_ref() else {
            return Err(Missing::Unknown); // a static file lists every service there is
        };
        let mut changed = self.applied.subscribe();
        changed.borrow_and_update();
        {
            let key = service.key();
            let mut subs = self.subscriptions.lock();
            if subs.len() >= MAX_SUBSCRIPTIONS && !subs.contains(&key) {
                return Err(Missing::NoAnswer);
            }
            if subs.insert(key.clone()) {
                let _ = tx.send(key);
            }
        }
        let wait = async {
            loop {
                if let Some(found) = self.known(service) {
                    return found;
                }
                if changed.changed().await.is_err() {
                    return Err(Missing::NoAnswer);
                }
            }
        };
        tokio::time::timeout(DISCOVERY_WAIT, wait).await.unwrap_or(Err(Missing::NoAnswer))
    }

    /// What the config in force says of `service`, if anything.
    fn known(&self, service: &ServiceRef) -> Option<Result<Arc<ServiceRuntime>, Missing>> {
        let d = self.destinations.load().get(service)?.clone();
        Some(if d.config.unknown {
            Err(Missing::Unknown)
        } else {
            Ok(d.runtime(&self.workload.cluster))
        })
    }

    /// The access line of a request whose response headers are ready; it is written when the
    /// response body ends (see [`crate::access::Logged`]). `upstream` is the endpoint
    /// (outbound) or app (inbound) that answered.
    pub fn access_entry(
        &self,
        c: crate::access::Captured,
        done: &crate::telemetry::Finished<'_>,
        upstream: String,
        retries: u32,
    ) -> crate::access::Entry {
        let own = self.identity.tls().map(|t| t.identity.clone()).unwrap_or_default();
        let inbound = done.direction == weft_api::proto::Direction::Inbound;
        let (direction, source, destination, service) = if inbound {
            let peer = done.peer.map(|p| p.to_string()).unwrap_or_else(|| "plaintext".into());
            ("inbound", peer, own, self.workload.service().to_string())
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

    /// The client TLS config for endpoint `i` of `rt`: mTLS to every endpoint that has an
    /// identity, unless the destination turned mTLS off (`None`: plaintext). Without a
    /// certificate of our own this fails closed, never falling back to plaintext; the error is
    /// the reply to make.
    pub fn endpoint_tls(
        &self,
        rt: &crate::balance::ServiceRuntime,
        i: usize,
    ) -> Result<Option<Arc<rustls::ClientConfig>>, http::Response<weft_core::Body>> {
        use http::StatusCode;
        let endpoint = &rt.config.endpoints[i];
        if rt.config.mtls == Some(weft_api::resource::MtlsMode::Off) || endpoint.identity.is_empty() {
            return Ok(None);
        }
        let Some(own) = self.identity.tls() else {
            return Err(crate::forward::reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "no-client-identity",
                "this proxy has no workload certificate yet; mTLS is required",
            ));
        };
        own.client_for(&endpoint.identity)
            .map(Some)
            .map_err(|e| crate::forward::reply(StatusCode::SERVICE_UNAVAILABLE, "no-client-identity", e))
    }

    /// Whether any tap is open (one atomic load; the request path checks it first).
    pub fn tapping(&self) -> bool {
        !self.taps.load().is_empty()
    }

    /// Sends a request's metadata to the taps on `service` (destination for outbound, this
    /// workload's service for inbound), if any.
    pub fn tap(&self, service: &str, mut event: weft_api::proto::TapEvent) {
        let taps = self.taps.load();
        event.taps = taps.iter().filter(|t| t.service == service).map(|t| t.id).collect();
        if event.taps.is_empty() || !self.tap_limit.allow() {
            return;
        }
        event.proxy = format!("{}/{}", self.workload.namespace, self.workload.name);
        event.service = service.to_string();
        event.time_ms = crate::access::now_ms();
        let _ = self.tap_tx.try_send(event);
    }

    pub fn admin(self: &Arc<Self>) -> weft_core::admin::Admin {
        let me = self.clone();
        weft_core::admin::Admin {
            registry: self.telemetry.registry.clone(),
            ready: self.ready.clone(),
            config_dump: Some(Box::new(move || me.config_dump())),
        }
    }

    /// The whole running config as JSON (never secrets).
    pub fn config_dump(&self) -> String {
        let dump = serde_json::json!({
            "workload": self.workload,
            "service": self.workload.service(),
            "listeners": {
                "inbound": self.bound.inbound,
                "outbound": self.bound.outbound,
                "admin": self.bound.admin,
                "app": self.app,
                "appProtocol": self.app_protocol,
                "advertise": self.advertise,
            },
            "control": self.control.as_ref().map(|l| serde_json::json!({
                "url": l.url, "current": l.current_url(), "tls": l.tls(), "pinnedCa": l.pinned(), "trustsBundle": l.trusts_bundle(),
            })),
            "trustHeaders": {
                "stripped": crate::forward::IDENTITY_HEADERS,
                "stripHeaders": self.strip_headers.iter().map(|h| h.as_str()).collect::<Vec<_>>(),
                "identityHeader": crate::forward::CLIENT_CERT,
            },
            "identity": self.identity.tls().map(|t| serde_json::json!({"spiffeId": t.identity, "serial": t.serial, "notAfter": t.not_after})),
            "subscriptions": self.subscriptions(),
            "lastNack": *self.last_nack.lock(),
            "config": *self.config(),
        });
        serde_json::to_string_pretty(&dump).expect("config serializes")
    }
}

/// A destination service as the proxy holds it: the config always, the runtime from the first
/// request that needs it on. A sidecar with a thousand services in its config that calls a few
/// dozen pays for a few dozen runtimes.
struct Destination {
    config: Arc<weft_api::mesh::ServiceConfig>,
    runtime: OnceLock<Arc<ServiceRuntime>>,
}

impl Destination {
    fn runtime(&self, own_cluster: &str) -> Arc<ServiceRuntime> {
        self.runtime
            .get_or_init(|| Arc::new(ServiceRuntime::build(self.config.clone(), None, own_cluster)))
            .clone()
    }
}

/// Every service of `config`. Those whose runtime `previous` had built are rebuilt now,
/// carrying over their endpoint state, budgets and limiters; the rest wait for a request.
fn destinations(
    config: &MeshConfig,
    previous: &HashMap<ServiceRef, Arc<Destination>>,
    own_cluster: &str,
) -> HashMap<ServiceRef, Arc<Destination>> {
    config
        .services
        .values()
        .map(|svc| {
            let key = ServiceRef {
                namespace: svc.namespace.clone(),
                name: svc.name.clone(),
            };
            let runtime = OnceLock::new();
            if let Some(before) = previous.get(&key).and_then(|d| d.runtime.get()) {
                let rt = ServiceRuntime::build(svc.clone(), Some(before), own_cluster);
                let _ = runtime.set(Arc::new(rt));
            }
            let destination = Destination {
                config: svc.clone(),
                runtime,
            };
            (key, Arc::new(destination))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_api::mesh::{Endpoint, ServiceConfig};

    fn mesh(services: &[&str]) -> MeshConfig {
        let services = services
            .iter()
            .map(|name| {
                let endpoint = Endpoint {
                    address: "127.0.0.1:9000".parse().unwrap(),
                    cluster: "a".into(),
                    labels: Default::default(),
                    workload: String::new(),
                    identity: String::new(),
                };
                let svc = ServiceConfig {
                    name: name.to_string(),
                    namespace: "default".into(),
                    endpoints: vec![endpoint],
                    policy: None,
                    policy_name: String::new(),
                    mtls: None,
                    unknown: false,
                };
                (svc.key(), Arc::new(svc))
            })
            .collect();
        MeshConfig {
            services,
            ..Default::default()
        }
    }

    fn at(name: &str) -> ServiceRef {
        ServiceRef {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    #[test]
    fn runtimes_are_built_on_first_use_and_carried_over_only_where_built() {
        let first = destinations(&mesh(&["orders", "payments"]), &HashMap::new(), "a");
        assert!(first.values().all(|d| d.runtime.get().is_none()), "nothing built before a request");
        let orders = first[&at("orders")].runtime("a");
        assert!(Arc::ptr_eq(&orders, &first[&at("orders")].runtime("a")), "built once");
        let second = destinations(&mesh(&["orders", "payments", "users"]), &first, "a");
        let carried = second[&at("orders")].runtime.get().expect("a used service is rebuilt at once");
        assert!(
            Arc::ptr_eq(&carried.endpoints[0], &orders.endpoints[0]),
            "its endpoint state carries over"
        );
        assert!(second[&at("payments")].runtime.get().is_none() && second[&at("users")].runtime.get().is_none());
    }
}

//! Discovery: the config the proxy runs on (swapped atomically), the services it has asked the
//! control plane for, this workload's inbound rate limit, and readiness. Each destination
//! service's runtime is built on the first request that needs it.

use crate::balance::{RateLimiter, ServiceRuntime};
use crate::host::{ServiceRef, UnknownService};
use crate::identity::Identity;
use arc_swap::ArcSwap;
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use weft_api::mesh::MeshConfig;

/// How long a request for a service the proxy has not seen yet waits for the control plane.
const DISCOVERY_WAIT: Duration = Duration::from_secs(2);
/// Most services one proxy will ask the control plane for.
const MAX_SUBSCRIPTIONS: usize = 10_000;

pub(crate) struct Discovery {
    /// This workload's namespace (a bare host names a service in it) and cluster (locality).
    namespace: String,
    cluster: String,
    config: ArcSwap<MeshConfig>,
    /// Per destination service: its config and, once a request has needed it, its runtime
    /// (compiled routes, endpoint state, budgets), rebuilt on swap only where it was built.
    destinations: ArcSwap<HashMap<ServiceRef, Arc<Destination>>>,
    /// This service's inbound rate limit, if its policy sets one.
    pub(crate) inbound_limiter: ArcSwap<Option<Arc<RateLimiter>>>,
    /// Bumped on every applied config; requests waiting for a service watch it.
    applied: watch::Sender<u64>,
    subscriptions: Mutex<BTreeSet<String>>,
    /// Control mode: where new subscriptions go (the control stream drains it).
    subscribe_tx: Option<mpsc::UnboundedSender<String>>,
    pub(crate) last_nack: Mutex<Option<String>>,
    pub(crate) ready: Readiness,
}

/// Ready once the proxy has a config and, when it has a join token, a workload certificate.
pub(crate) struct Readiness {
    /// What `/ready` reads.
    pub(crate) ready: Arc<AtomicBool>,
    config: AtomicBool,
    needs_cert: bool,
    cert: AtomicBool,
}

impl Readiness {
    /// The workload certificate is installed.
    pub(crate) fn certified(&self) {
        self.cert.store(true, Ordering::Release);
        self.refresh();
    }

    fn refresh(&self) {
        let ready = self.config.load(Ordering::Acquire) && (!self.needs_cert || self.cert.load(Ordering::Acquire));
        self.ready.store(ready, Ordering::Release);
    }
}

/// Why [`Discovery::service`] has no service to route to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Missing {
    /// The control plane (or the static file) knows no such service.
    Unknown,
    /// The control plane has not said within [`DISCOVERY_WAIT`] (or this proxy already asks it
    /// for as many services as it may).
    NoAnswer,
}

// === impl Discovery ===

impl Discovery {
    /// From a static file (`subscribe` is `None`: the file lists every service there is), or
    /// empty until the control plane's first config, sending each new subscription to
    /// `subscribe`. `needs_cert`: ready only once a workload certificate is installed too.
    pub(crate) fn new(
        config: MeshConfig,
        subscribe: Option<mpsc::UnboundedSender<String>>,
        needs_cert: bool,
        namespace: String,
        cluster: String,
    ) -> Self {
        let static_mode = subscribe.is_none();
        let initial = destinations(&config, &HashMap::new(), &cluster);
        Discovery {
            namespace,
            destinations: ArcSwap::from_pointee(initial),
            inbound_limiter: ArcSwap::from_pointee(config.inbound_rate_limit.clone().map(|l| Arc::new(RateLimiter::new(l)))),
            config: ArcSwap::from_pointee(config),
            cluster,
            applied: watch::channel(0).0,
            subscriptions: Mutex::new(BTreeSet::new()),
            subscribe_tx: subscribe,
            last_nack: Mutex::new(None),
            ready: Readiness {
                ready: Arc::new(AtomicBool::new(static_mode)),
                config: AtomicBool::new(static_mode),
                needs_cert,
                cert: AtomicBool::new(false),
            },
        }
    }

    pub(crate) fn config(&self) -> Arc<MeshConfig> {
        self.config.load_full()
    }

    /// Revision of the config in force (no reference count taken).
    pub(crate) fn revision(&self) -> u64 {
        self.config.load().revision
    }

    /// Whether this workload's sidecar is bypassed (the kill switch): its callers set the
    /// policy's routes aside and this inbound skips authorization; rate limits, pool limits,
    /// outlier detection, the default route's connect retries and mTLS still apply.
    pub(crate) fn bypassed(&self) -> bool {
        self.config.load().bypass
    }

    /// Swaps in a new config; in-flight requests keep the one they started with.
    pub(crate) fn apply(&self, config: MeshConfig) {
        let previous = self.destinations.load_full();
        let next = destinations(&config, &previous, &self.cluster);
        self.destinations.store(Arc::new(next));
        let limiter = self.inbound_limiter.load_full();
        if limiter.as_ref().as_ref().map(|l| &l.limit) != config.inbound_rate_limit.as_ref() {
            let next = config.inbound_rate_limit.clone().map(|l| Arc::new(RateLimiter::new(l)));
            self.inbound_limiter.store(Arc::new(next));
        }
        self.config.store(Arc::new(config));
        self.ready.config.store(true, Ordering::Release);
        self.ready.refresh();
        self.applied.send_modify(|n| *n += 1);
    }

    pub(crate) fn subscriptions(&self) -> Vec<String> {
        self.subscriptions.lock().iter().cloned().collect()
    }

    /// The mesh service `authority` names ([`crate::host`]): a bare name is in this workload's
    /// namespace, and the fully qualified form ends in the trust domain of this proxy's own
    /// SPIFFE ID (the default one until it holds a certificate).
    pub(crate) fn resolve(&self, authority: &str, identity: &Identity) -> Result<ServiceRef, UnknownService> {
        let tls = identity.tls();
        let trust_domain = tls
            .as_ref()
            .and_then(|t| t.identity.strip_prefix("spiffe://")?.split_once('/'))
            .map(|(domain, _)| domain)
            .unwrap_or(crate::host::DEFAULT_TRUST_DOMAIN);
        crate::host::resolve(authority, &self.namespace, trust_domain)
    }

    /// The runtime of `service`, asking the control plane for it (and waiting a little) the
    /// first time it is needed.
    pub(crate) async fn service(&self, service: &ServiceRef) -> Result<Arc<ServiceRuntime>, Missing> {
        if let Some(found) = self.known(service) {
            return found;
        }
        self.ask(service.key(), || self.known(service)).await?
    }

    /// The service whose virtual IP `ip` is. When no service in force has it, the control
    /// plane is asked by address: an app may dial an address this sidecar never handed out
    /// (hard-coded, cached from before a restart, resolved on another host).
    pub(crate) async fn service_at(&self, ip: Ipv4Addr) -> Option<ServiceRef> {
        if let Some(found) = self.holding(ip) {
            return Some(found);
        }
        self.ask(ip.to_string(), || self.holding(ip)).await.ok()
    }

    /// Subscribes to `key` (once) and waits a little until `found` finds the answer in force.
    async fn ask<T>(&self, key: String, found: impl Fn() -> Option<T>) -> Result<T, Missing> {
        let Some(tx) = self.subscribe_tx.as_ref() else {
            return Err(Missing::Unknown); // a static file lists every service there is
        };
        let mut changed = self.applied.subscribe();
        changed.borrow_and_update();
        {
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
                if let Some(found) = found() {
                    return Ok(found);
                }
                if changed.changed().await.is_err() {
                    return Err(Missing::NoAnswer);
                }
            }
        };
        tokio::time::timeout(DISCOVERY_WAIT, wait).await.unwrap_or(Err(Missing::NoAnswer))
    }

    /// The service in force whose virtual IP `ip` is.
    fn holding(&self, ip: Ipv4Addr) -> Option<ServiceRef> {
        let config = self.config();
        let s = config.services.values().find(|s| s.virtual_ip == Some(ip))?;
        Some(ServiceRef {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
        })
    }

    /// What the config in force says of `service`, if anything.
    fn known(&self, service: &ServiceRef) -> Option<Result<Arc<ServiceRuntime>, Missing>> {
        let d = self.destinations.load().get(service)?.clone();
        Some(if d.config.unknown {
            Err(Missing::Unknown)
        } else {
            Ok(d.runtime(&self.cluster))
        })
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
                    virtual_ip: None,
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

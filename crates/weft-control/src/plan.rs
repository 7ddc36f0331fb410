//! What each proxy is sent, computed from an immutable [`Snapshot`] of the mesh: the stable
//! resources, the overlays of running intents and whom they treat, the bypassed services and
//! the connected proxies. A snapshot is made once per change generation and shared by every
//! stream, so planning takes no lock that the registry, the signals or the intent loop hold.

use crate::registry::{ProxyRecord, Registry};
use parking_lot::Mutex;
use prost::Message;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use weft_api::ResourceKey;
use weft_api::mesh::{Endpoint, ServiceConfig};
use weft_api::proto;
use weft_api::resource::{MtlsMode, RateLimitAt, Resource, TrafficPolicySpec};

/// One resource an intent sets (`Some`) or removes (`None`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct OverlayEntry {
    pub(crate) key: ResourceKey,
    pub(crate) service: String,
    pub(crate) resource: Option<Resource>,
}

/// A running intent's change, as the proxies it treats run it.
pub(crate) struct Overlay {
    pub(crate) candidate: u64,
    pub(crate) entries: Vec<OverlayEntry>,
}

/// The mesh at one change generation.
pub(crate) struct Snapshot {
    pub(crate) generation: u64,
    /// The stable revision and its resources.
    pub(crate) stable: u64,
    pub(crate) resources: Arc<BTreeMap<ResourceKey, Resource>>,
    /// Running intents' overlays by intent number.
    pub(crate) overlays: BTreeMap<u64, Overlay>,
    /// The intents treating each connection, in order.
    pub(crate) treats: HashMap<u64, Vec<u64>>,
    /// Bypassed services, as (namespace, service).
    pub(crate) bypass: BTreeSet<(String, String)>,
    pub(crate) proxies: BTreeMap<u64, ProxyRecord>,
    /// Every (namespace, service) a workload has registered for since the process started
    /// ([`crate::registry::Registry::seen`]).
    pub(crate) seen: BTreeSet<(String, String)>,
    /// Each service's config as pushed, by (namespace, service, intents overlaid): a change that
    /// reaches a thousand callers builds it once, not a thousand times.
    services: Mutex<HashMap<ServiceKey, Arc<BuiltService>>>,
}

/// A built service's cache key: namespace, service, and the intents overlaid.
type ServiceKey = (String, String, Vec<u64>);

/// A service's config as pushed, shared by every proxy that calls it.
pub(crate) struct BuiltService {
    pub(crate) service: proto::Service,
    /// Hash of its encoding.
    fingerprint: u64,
}

/// What one proxy should run, before it is made into a message.
pub(crate) struct PlannedConfig {
    /// Changes whenever anything in the message would (the version aside).
    pub(crate) fingerprint: u64,
    pub(crate) services: Vec<Arc<BuiltService>>,
    /// Everything but the services.
    rest: proto::ProxyConfig,
    /// The intents whose candidate it carries.
    pub(crate) included: BTreeSet<u64>,
}

/// The trust the CA hands every proxy with its config.
pub(crate) struct Trust {
    pub(crate) bundle_pem: String,
    pub(crate) generation: u64,
}

impl PlannedConfig {
    /// The message, numbered `version`.
    pub(crate) fn message(&self, version: u64) -> proto::ProxyConfig {
        proto::ProxyConfig {
            version,
            services: self.services.iter().map(|s| s.service.clone()).collect(),
            ..self.rest.clone()
        }
    }
}

// === impl Snapshot ===

impl Snapshot {
    /// `registry`'s connected proxies and the services it has seen are copied in.
    pub(crate) fn new(
        generation: u64,
        stable: u64,
        resources: Arc<BTreeMap<ResourceKey, Resource>>,
        overlays: BTreeMap<u64, Overlay>,
        treats: HashMap<u64, Vec<u64>>,
        bypass: BTreeSet<(String, String)>,
        registry: &Registry,
    ) -> Self {
        Self {
            generation,
            stable,
            resources,
            overlays,
            treats,
            bypass,
            proxies: registry.proxies.clone(),
            seen: registry.seen.clone(),
            services: Mutex::new(HashMap::new()),
        }
    }

    /// An empty mesh that no generation matches, so the first plan makes a real one.
    pub(crate) fn none() -> Self {
        Self::new(
            u64::MAX,
            0,
            Arc::default(),
            BTreeMap::new(),
            HashMap::new(),
            BTreeSet::new(),
            &Registry::default(),
        )
    }

    /// The config proxy `conn` needs: the stable resources, with the overlay of every intent
    /// that treats it on top. The stream compares its fingerprint with the last one it sent
    /// and builds the message only when it differs.
    pub(crate) fn plan(&self, conn: u64, trust: Trust) -> Option<PlannedConfig> {
        let p = self.proxies.get(&conn)?;
        let mut resources = std::borrow::Cow::Borrowed(&*self.resources);
        let mut revision = self.stable;
        let mut included = BTreeSet::new();
        for seq in self.treats.get(&conn).into_iter().flatten() {
            let overlay = &self.overlays[seq];
            let r = resources.to_mut();
            for entry in &overlay.entries {
                match &entry.resource {
                    Some(res) => r.insert(entry.key.clone(), res.clone()),
                    None => r.remove(&entry.key),
                };
            }
            revision = revision.max(overlay.candidate);
            included.insert(*seq);
        }
        let overlays: Vec<u64> = included.iter().copied().collect();
        let services: Vec<Arc<BuiltService>> = p
            .subscriptions
            .iter()
            .filter_map(|key| key.split_once('/'))
            .map(|(namespace, name)| self.service(namespace, name, &overlays, &resources))
            .collect();
        let security = resources.values().find_map(|r| match r {
            Resource::SecurityPolicy(d)
                if d.metadata.namespace == p.namespace
                    && d.spec.selector.service == p.service
                    && d.spec.selector.labels.iter().all(|(k, v)| p.labels.get(k) == Some(v)) =>
            {
                Some((
                    serde_json::to_string(&d.spec).expect("policy serializes"),
                    format!("{}/{}", d.metadata.namespace, d.metadata.name),
                ))
            }
            _ => None,
        });
        let (security, security_name) = security.unzip();
        let rest = proto::ProxyConfig {
            version: 0,
            revision,
            proxy_id: p.id.clone(),
            services: Vec::new(),
            bypass: self.bypassed(&p.namespace, &p.service),
            security_policy_json: security.unwrap_or_default(),
            security_policy_name: security_name.unwrap_or_default(),
            trust_bundle_pem: trust.bundle_pem,
            ca_generation: trust.generation,
            inbound_rate_limit_json: traffic_policy(&resources, &p.namespace, &p.service)
                .and_then(|(_, spec)| spec.rate_limit.as_ref())
                .filter(|r| r.at == RateLimitAt::Inbound)
                .map(|r| serde_json::to_string(r).expect("rate limit serializes"))
                .unwrap_or_default(),
        };
        let mut hasher = std::hash::DefaultHasher::new();
        rest.encode_to_vec().hash(&mut hasher);
        services.iter().for_each(|s| s.fingerprint.hash(&mut hasher));
        Some(PlannedConfig {
            fingerprint: hasher.finish(),
            services,
            rest,
            included,
        })
    }

    fn bypassed(&self, namespace: &str, service: &str) -> bool {
        self.bypass.contains(&(namespace.to_string(), service.to_string()))
    }

    /// Service `name` in `namespace` (the destination's, not the caller's: its endpoints,
    /// policy, bypass and mTLS are looked up there), built once per snapshot for each set of
    /// overlays. The cache's lock is not held while building: two streams may build the same
    /// service at once, and both results are equal.
    fn service(&self, namespace: &str, name: &str, overlays: &[u64], resources: &BTreeMap<ResourceKey, Resource>) -> Arc<BuiltService> {
        let key = (namespace.to_string(), name.to_string(), overlays.to_vec());
        if let Some(cached) = self.services.lock().get(&key) {
            return cached.clone();
        }
        let mut endpoints: Vec<Endpoint> = self
            .proxies
            .values()
            .filter(|q| q.namespace == namespace && q.service == name)
            .map(|q| Endpoint {
                address: q.inbound,
                cluster: q.cluster.clone(),
                labels: q.labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
                workload: q.workload_id().to_string(),
                identity: q.identity.clone(),
            })
            .collect();
        endpoints.sort_by_key(|e| e.address);
        let policy = if self.bypassed(namespace, name) {
            None
        } else {
            traffic_policy(resources, namespace, name)
        };
        let unknown = endpoints.is_empty()
            && !self.seen.contains(&(namespace.to_string(), name.to_string()))
            && !named_by_policy(resources, namespace, name);
        let svc = ServiceConfig {
            name: name.to_string(),
            namespace: namespace.to_string(),
            endpoints,
            policy_name: policy.map(|(k, _)| k.name.clone()).unwrap_or_default(),
            policy: policy.map(|(_, spec)| spec.clone()),
            mtls: mtls_mode(resources, namespace, name),
            unknown,
            virtual_ip: (!unknown).then(|| weft_api::mesh::virtual_ip(namespace, name)),
        };
        let service = proto::Service::from(&svc);
        let fingerprint = fingerprint(&service.encode_to_vec());
        let built = Arc::new(BuiltService { service, fingerprint });
        self.services.lock().insert(key, built.clone());
        built
    }
}

fn fingerprint(bytes: &[u8]) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

/// Whether a policy in `namespace` names `service` (which makes it known before any instance
/// registers).
fn named_by_policy(resources: &BTreeMap<ResourceKey, Resource>, namespace: &str, service: &str) -> bool {
    resources
        .values()
        .any(|r| r.metadata().namespace == namespace && r.service() == service)
}

/// The mTLS mode a service's SecurityPolicy sets for all of its workloads (one without a label
/// selector); `None` is the default, permissive.
pub(crate) fn mtls_mode(resources: &BTreeMap<ResourceKey, Resource>, namespace: &str, service: &str) -> Option<MtlsMode> {
    resources.values().find_map(|r| match r {
        Resource::SecurityPolicy(d)
            if d.metadata.namespace == namespace && d.spec.selector.service == service && d.spec.selector.labels.is_empty() =>
        {
            d.spec.mtls
        }
        _ => None,
    })
}

/// The TrafficPolicy governing `service` in `resources`.
pub(crate) fn traffic_policy<'a>(
    resources: &'a BTreeMap<ResourceKey, Resource>,
    namespace: &str,
    service: &str,
) -> Option<(&'a ResourceKey, &'a TrafficPolicySpec)> {
    resources.iter().find_map(|(k, r)| match r {
        Resource::TrafficPolicy(d) if d.metadata.namespace == namespace && d.spec.service == service => Some((k, &d.spec)),
        _ => None,
    })
}

/// The kinds of resource, compared as themselves rather than as their names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    TrafficPolicy,
    SecurityPolicy,
}

impl Kind {
    pub(crate) fn of(resource: &Resource) -> Self {
        match resource {
            Resource::TrafficPolicy(_) => Kind::TrafficPolicy,
            Resource::SecurityPolicy(_) => Kind::SecurityPolicy,
        }
    }

    /// The kind a key names (none: a kind this control plane does not know).
    pub(crate) fn of_key(key: &ResourceKey) -> Option<Self> {
        match key.kind.as_str() {
            "TrafficPolicy" => Some(Kind::TrafficPolicy),
            "SecurityPolicy" => Some(Kind::SecurityPolicy),
            _ => None,
        }
    }
}

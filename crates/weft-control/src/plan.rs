//! What each proxy is sent, computed from an immutable [`Snapshot`] of the mesh: the stable
//! resources, the overlays of running intents and whom they treat, the bypassed services and
//! the connected proxies. A snapshot is made once per change generation and shared by every
//! stream, so planning takes no lock that the registry, the signals or the intent loop hold.

use crate::registry::{EndpointSet, ProxyRecord, Registry};
use crate::vip::Vips;
use parking_lot::Mutex;
use prost::Message;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::ops::Bound;
use std::sync::Arc;
use weft_api::ResourceKey;
use weft_api::mesh::ServiceConfig;
use weft_api::proto::{self, control_message};
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
    /// Every (namespace, service) a workload has registered for since the process started
    /// ([`crate::registry::Registry::seen`]).
    pub(crate) seen: BTreeSet<(String, String)>,
    /// Each service's endpoints as the registry keeps them (shared, not copied).
    endpoints: HashMap<(String, String), Arc<EndpointSet>>,
    /// Each service's config as pushed, by (namespace, service, intents overlaid): a change that
    /// reaches a thousand callers builds it once, not a thousand times.
    services: Mutex<HashMap<ServiceKey, Arc<BuiltService>>>,
    /// Each endpoint change sent from a whole version held (or none): built once and shared by
    /// every stream that held the same one.
    changes: Mutex<Changes>,
    /// Services' virtual IPs, allocated the first time a plan needs one.
    vips: Arc<Vips>,
}

/// Most endpoints of one service a push carries. A proxy that needs more (its first config of
/// a large service, or all of them again after a reconnect) is sent the rest over the next
/// pushes, applying each as it comes: a partial list for a moment, never an empty one. The
/// bound is for the control plane's memory: a stream's encoder keeps a buffer as large as the
/// largest message it ever sent, for as long as the stream lives (tonic grows it and never
/// shrinks it), so at 10,000 proxies one 130 KB whole config cost 130 KB per proxy.
const ENDPOINTS_PER_PUSH: usize = 64;

/// Each endpoint change built, by (service, from version, sent up to, to version), with what
/// the stream holds once it is sent.
type Changes = HashMap<(String, u64, Option<EndpointKey>, u64), (Arc<proto::EndpointChange>, SentEndpoints)>;

/// An endpoint's place in its service's set (the set's order).
type EndpointKey = (SocketAddr, u64);

/// A built service's cache key: namespace, service, and the intents overlaid.
type ServiceKey = (String, String, Vec<u64>);

/// A service's config as pushed, shared by every proxy that calls it: its policy part (what a
/// change to a policy sends) apart from its endpoints (what a join or a leave changes).
pub(crate) struct BuiltService {
    /// `NAMESPACE/NAME`.
    key: String,
    /// Everything but the endpoints.
    policy: proto::Service,
    /// Hash of the policy part's encoding.
    fingerprint: u64,
    pub(crate) endpoints: Arc<EndpointSet>,
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
    /// The snapshot it was planned from (its caches build the deltas).
    snapshot: Arc<Snapshot>,
}

/// What a stream last sent its proxy: enough to send only what changed next time.
pub(crate) struct Sent {
    version: u64,
    /// Hash of the proxy's own part (everything but the services and the revision).
    own: u64,
    /// Per service: the hash of its policy part and the endpoints sent.
    services: HashMap<String, (u64, SentEndpoints)>,
}

/// The endpoints of one service a proxy holds: a version's whole set, or its first part while
/// the rest is on its way ([`ENDPOINTS_PER_PUSH`]).
#[derive(Clone)]
struct SentEndpoints {
    set: Arc<EndpointSet>,
    /// The set was sent up to this endpoint, in its order; none: all of it.
    upto: Option<EndpointKey>,
}

impl Sent {
    /// Whether some service's endpoints were sent only in part: the stream sends the rest next.
    pub(crate) fn partial(&self) -> bool {
        self.services.values().any(|(_, e)| e.upto.is_some())
    }
}

/// The encoded bytes of one push, by what they carry.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct PushSize {
    /// A whole config (all of it counts here).
    pub(crate) full: usize,
    /// Delta: the proxy's own part.
    pub(crate) own: usize,
    /// Delta: services' policy parts and removals.
    pub(crate) policy: usize,
    /// Delta: endpoint changes.
    pub(crate) endpoints: usize,
    /// The whole message.
    pub(crate) total: usize,
}

/// The trust the CA hands every proxy with its config.
pub(crate) struct Trust {
    pub(crate) bundle_pem: String,
    pub(crate) generation: u64,
}

impl PlannedConfig {
    /// The whole config, numbered `version`, every endpoint included.
    #[cfg(test)]
    pub(crate) fn message(&self, version: u64) -> proto::ProxyConfig {
        proto::ProxyConfig {
            version,
            services: self.services.iter().map(|s| s.whole()).collect(),
            ..self.rest.clone()
        }
    }

    /// The push numbered `version`: the whole config when nothing was sent on the stream yet
    /// (or the proxy asked for it), else what changed since `sent`; either with at most
    /// [`ENDPOINTS_PER_PUSH`] endpoints of each service. Returns it with what the stream has
    /// sent once it is out, and its size.
    pub(crate) fn push(&self, sent: Option<&Sent>, version: u64) -> (control_message::Msg, Sent, PushSize) {
        let mut next = Sent {
            version,
            own: own_fingerprint(&self.rest),
            services: HashMap::new(),
        };
        let Some(sent) = sent else {
            let mut whole = proto::ProxyConfig {
                version,
                ..self.rest.clone()
            };
            for s in &self.services {
                let (first, held) = self.snapshot.endpoint_change(&s.key, None, &s.endpoints);
                whole.services.push(proto::Service {
                    endpoints: first.added.clone(),
                    endpoint_version: s.endpoints.version,
                    ..s.policy.clone()
                });
                next.services.insert(s.key.clone(), (s.fingerprint, held));
            }
            let full = whole.encoded_len();
            let size = PushSize {
                full,
                total: full,
                ..PushSize::default()
            };
            return (control_message::Msg::Config(whole), next, size);
        };
        let delta = self.delta(sent, &mut next);
        let policy =
            delta.services.iter().map(|s| s.encoded_len()).sum::<usize>() + delta.removed_services.iter().map(String::len).sum::<usize>();
        let size = PushSize {
            own: delta.own.as_ref().map_or(0, |o| o.encoded_len()),
            policy,
            endpoints: delta.endpoints.iter().map(|e| e.encoded_len()).sum(),
            total: delta.encoded_len(),
            full: 0,
        };
        (control_message::Msg::Delta(delta), next, size)
    }

    /// What changed since `sent`, recording in `next` what the proxy holds once it is applied.
    fn delta(&self, sent: &Sent, next: &mut Sent) -> proto::ConfigDelta {
        let mut delta = proto::ConfigDelta {
            version: next.version,
            base_version: sent.version,
            revision: self.rest.revision,
            own: (next.own != sent.own).then(|| self.rest.clone()),
            ..Default::default()
        };
        for s in &self.services {
            let before = sent.services.get(&s.key);
            if before.is_none_or(|(fingerprint, _)| *fingerprint != s.fingerprint) {
                delta.services.push(s.policy.clone());
            }
            let held = before.map(|(_, endpoints)| endpoints);
            let current = held.filter(|h| h.upto.is_none() && h.set.version == s.endpoints.version);
            let after = match current {
                Some(h) => h.clone(),
                None => {
                    let (change, after) = self.snapshot.endpoint_change(&s.key, held, &s.endpoints);
                    delta.endpoints.push((*change).clone());
                    after
                }
            };
            next.services.insert(s.key.clone(), (s.fingerprint, after));
        }
        delta.removed_services = sent.services.keys().filter(|k| !next.services.contains_key(*k)).cloned().collect();
        delta
    }
}

/// The proxy's own part without its revision (every policy change moves the revision; it
/// travels in the delta's header).
fn own_fingerprint(rest: &proto::ProxyConfig) -> u64 {
    fingerprint(
        &proto::ProxyConfig {
            revision: 0,
            ..rest.clone()
        }
        .encode_to_vec(),
    )
}

// === impl BuiltService ===

impl BuiltService {
    /// The service with all its endpoints.
    #[cfg(test)]
    fn whole(&self) -> proto::Service {
        proto::Service {
            endpoints: self.endpoints.endpoints.values().map(|e| (**e).clone()).collect(),
            endpoint_version: self.endpoints.version,
            ..self.policy.clone()
        }
    }
}

// === impl Snapshot ===

impl Snapshot {
    /// `registry`'s services (those seen and their endpoints) are shared in, not its proxies:
    /// a stream plans from its own proxy's record.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        generation: u64,
        stable: u64,
        resources: Arc<BTreeMap<ResourceKey, Resource>>,
        overlays: BTreeMap<u64, Overlay>,
        treats: HashMap<u64, Vec<u64>>,
        bypass: BTreeSet<(String, String)>,
        registry: &Registry,
        vips: Arc<Vips>,
    ) -> Self {
        Self {
            generation,
            stable,
            resources,
            overlays,
            treats,
            bypass,
            seen: registry.seen.clone(),
            endpoints: registry.endpoints.clone(),
            services: Mutex::new(HashMap::new()),
            changes: Mutex::new(HashMap::new()),
            vips,
        }
    }

    /// An empty mesh that no generation matches, so the first plan makes a real one.
    pub(crate) fn none(vips: Arc<Vips>) -> Self {
        Self::new(
            u64::MAX,
            0,
            Arc::default(),
            BTreeMap::new(),
            HashMap::new(),
            BTreeSet::new(),
            &Registry::default(),
            vips,
        )
    }

    /// The config proxy `p` (connection `conn`) needs: the stable resources, with the overlay of
    /// every intent that treats it on top. The stream compares its fingerprint with the last one
    /// it sent and builds the message only when it differs.
    pub(crate) fn plan(self: &Arc<Self>, conn: u64, p: &ProxyRecord, trust: Trust) -> PlannedConfig {
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
        for s in &services {
            s.fingerprint.hash(&mut hasher);
            s.endpoints.version.hash(&mut hasher);
        }
        PlannedConfig {
            fingerprint: hasher.finish(),
            services,
            rest,
            included,
            snapshot: self.clone(),
        }
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
        let endpoints = self
            .endpoints
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
            .unwrap_or_default();
        let policy = if self.bypassed(namespace, name) {
            None
        } else {
            traffic_policy(resources, namespace, name)
        };
        let unknown = endpoints.endpoints.is_empty()
            && !self.seen.contains(&(namespace.to_string(), name.to_string()))
            && !named_by_policy(resources, namespace, name);
        let svc = ServiceConfig {
            name: name.to_string(),
            namespace: namespace.to_string(),
            endpoints: Vec::new(),
            policy_name: policy.map(|(k, _)| k.name.clone()).unwrap_or_default(),
            policy: policy.map(|(_, spec)| spec.clone()),
            mtls: mtls_mode(resources, namespace, name),
            unknown,
            virtual_ip: if unknown { None } else { self.vips.virtual_ip(namespace, name) },
        };
        let policy = proto::Service::from(&svc);
        let built = Arc::new(BuiltService {
            key: format!("{namespace}/{name}"),
            fingerprint: fingerprint(&policy.encode_to_vec()),
            policy,
            endpoints,
        });
        self.services.lock().insert(key, built.clone());
        built
    }

    /// The change from the endpoints a proxy holds of service `key` (`held`; none: it holds
    /// none, and is sent a new list) to `now`, with what the proxy holds once it applied it:
    /// the joins and leaves among the endpoints it holds, then at most [`ENDPOINTS_PER_PUSH`]
    /// of those it was never sent. What a proxy holds is always a version's set up to one
    /// endpoint in the set's order, so every stream in the same state shares one change, built
    /// once per snapshot: a fleet being sent a large service part by part costs one build per
    /// part, not one per proxy (each of which walked and copied the whole set).
    fn endpoint_change(
        &self,
        key: &str,
        held: Option<&SentEndpoints>,
        now: &Arc<EndpointSet>,
    ) -> (Arc<proto::EndpointChange>, SentEndpoints) {
        let from = held.map_or(0, |h| h.set.version);
        let upto = held.and_then(|h| h.upto);
        let cache_key = (key.to_string(), from, upto, now.version);
        if let Some(cached) = self.changes.lock().get(&cache_key) {
            return cached.clone();
        }
        let mut change = proto::EndpointChange {
            service: key.to_string(),
            since: from,
            endpoint_version: now.version,
            replace: held.is_none(),
            ..Default::default()
        };
        if let Some(h) = held.filter(|h| h.set.version != now.version) {
            change.removed = below(&h.set, upto)
                .filter(|(k, _)| !now.endpoints.contains_key(*k))
                .map(|((_, conn), _)| *conn)
                .collect();
            change.added = below(now, upto)
                .filter(|(k, _)| !h.set.endpoints.contains_key(*k))
                .map(|(_, e)| (**e).clone())
                .collect();
        }
        // Where the endpoints never sent begin (none: every one was sent).
        let unsent = match (held, upto) {
            (None, _) => Some(Bound::Unbounded),
            (Some(_), Some(u)) => Some(Bound::Excluded(u)),
            (Some(_), None) => None,
        };
        let mut next_upto = None;
        if let Some(start) = unsent {
            let mut rest = now.endpoints.range((start, Bound::Unbounded));
            for (k, e) in rest.by_ref().take(ENDPOINTS_PER_PUSH) {
                change.added.push((**e).clone());
                next_upto = Some(*k);
            }
            if rest.next().is_none() {
                next_upto = None;
            }
        }
        let after = SentEndpoints {
            set: now.clone(),
            upto: next_upto,
        };
        let built = (Arc::new(change), after);
        self.changes.lock().insert(cache_key, built.clone());
        built
    }
}

/// `set`'s endpoints up to `upto` in its order (none: all of them).
fn below(set: &EndpointSet, upto: Option<EndpointKey>) -> std::collections::btree_map::Range<'_, EndpointKey, Arc<proto::Endpoint>> {
    match upto {
        Some(u) => set.endpoints.range(..=u),
        None => set.endpoints.range(..),
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

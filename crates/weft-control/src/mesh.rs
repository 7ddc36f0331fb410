//! The live mesh as the control plane sees it: the stored resources at the current revision,
//! the proxies connected right now, and the traffic they report. Every change bumps a watch that
//! each proxy's stream waits on, so a new revision, a new endpoint or a departed proxy reaches
//! every proxy that needs it at once; each stream then sends only what its proxy needs.

use crate::metrics::ControlMetrics;
use crate::store::{ChangeEntry, Revision, Store, StoreError};
use parking_lot::Mutex;
use prost::Message;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use weft_api::ResourceKey;
use weft_api::error::{FieldError, Invalid};
use weft_api::mesh::{Endpoint, SERVICE_LABEL, SUBSET_LABEL, ServiceConfig};
use weft_api::proto;
use weft_api::resource::{RateLimitAt, Resource};
use weft_api::telemetry::{LATENCY_SLOTS, add_sparse, quantile_ms};

/// Window over which `status` computes rates.
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// How long per-proxy samples are kept for judging intents (baselines look this far back).
const SAMPLE_WINDOW: Duration = Duration::from_secs(120);
/// After a (re)start the registry is incomplete until every live proxy has reconnected; proxies
/// retry with a backoff capped at 5 s, so after this long every live one is back.
pub const WARMUP: Duration = Duration::from_secs(6);

pub struct Mesh {
    pub(crate) store: std::sync::Arc<Store>,
    pub ca: crate::ca::Ca,
    pub(crate) state: Mutex<State>,
    changed: watch::Sender<u64>,
    pub metrics: ControlMetrics,
    started: Instant,
    /// Wakes the intent loop (submissions, ACKs, NACKs, operator actions).
    pub(crate) wake: tokio::sync::Notify,
    /// Server-sent events for the dashboard: one JSON object per change.
    pub events: tokio::sync::broadcast::Sender<String>,
    /// Open `weft tap` streams.
    pub taps: std::sync::Arc<crate::taps::Taps>,
}

pub(crate) struct State {
    /// The revision every untreated proxy runs, and its resources.
    pub(crate) stable: u64,
    pub(crate) resources: BTreeMap<ResourceKey, Resource>,
    pub(crate) proxies: BTreeMap<u64, ProxyRecord>,
    next_conn: u64,
    traffic: HashMap<(String, String), VecDeque<Sample>>,
    /// Per proxy, direction and peer service: what intents are judged on.
    pub(crate) samples: HashMap<(String, i32, String), VecDeque<Sample>>,
    telemetry_signals: u64,
    pub(crate) intents: BTreeMap<u64, crate::intents::IntentRecord>,
    pub(crate) frozen: bool,
    /// Bypassed services, as (namespace, service).
    pub(crate) bypass: BTreeSet<(String, String)>,
    /// Every (namespace, service) a workload has registered for since this process started:
    /// a service whose instances are all gone is still known (its callers get
    /// `no-healthy-endpoints`, not `unknown-service`).
    seen: BTreeSet<(String, String)>,
    pub(crate) last_decision: Option<String>,
    /// Each service's config as pushed, by (namespace, service, intents overlaid), for the
    /// change generation it was built in: a change that reaches a thousand callers builds it
    /// once, not a thousand times under the lock.
    service_cache: HashMap<(String, String, Vec<u64>), Arc<BuiltService>>,
    service_cache_generation: u64,
}

/// A connected proxy.
#[derive(Clone, Debug)]
pub struct ProxyRecord {
    pub id: String,
    pub namespace: String,
    pub name: String,
    /// `namespace/name`, built once: the intent loop looks proxies up by it on every step.
    workload: String,
    pub cluster: String,
    pub labels: BTreeMap<String, String>,
    pub service: String,
    pub inbound: SocketAddr,
    /// The services it routes to, as `NAMESPACE/NAME` ([`subscription`]).
    pub subscriptions: BTreeSet<String>,
    pub applied_revision: u64,
    pub last_nack: Option<String>,
    pub connected_since_ms: u64,
    pushed: Option<(u64, Instant)>,
    /// Registered with a config already (it reconnected rather than started).
    resumed: bool,
    /// The SPIFFE ID it was admitted with (its token's, or its certificate's).
    pub identity: String,
    /// Expiry of its workload certificate (unix seconds), as it last reported.
    pub cert_not_after: u64,
    /// Intents whose candidate each pushed version carried, until it is ACKed or NACKed.
    pending: BTreeMap<u64, (BTreeSet<u64>, u64)>,
    /// The trust-bundle epoch of the last config it ACKed.
    pub(crate) bundle_epoch: u64,
    /// Generation of the root behind the certificate it reports using (none reported yet).
    pub(crate) cert_generation: Option<u64>,
    /// Intents whose candidate this proxy runs (from its last ACK).
    pub(crate) applied_intents: BTreeSet<u64>,
    /// Intents whose candidate this proxy refused, with the reason.
    pub(crate) refused: BTreeMap<u64, String>,
}

#[derive(Clone)]
pub(crate) struct Sample {
    pub(crate) at: Instant,
    pub(crate) revision: u64,
    /// Outbound: the route the requests took.
    pub(crate) route: String,
    /// Inbound: how many of the requests came over mTLS.
    pub(crate) mtls: u64,
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    /// Sparse latency histogram: non-empty slots and their counts (weft_api::telemetry).
    pub(crate) latency_slots: Vec<u32>,
    pub(crate) latency_counts: Vec<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error(transparent)]
    Invalid(#[from] Invalid),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The outcome of an accepted change.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Applied {
    pub revision: u64,
    pub changes: Vec<ChangeEntry>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyView {
    pub id: String,
    pub workload: String,
    pub service: String,
    pub cluster: String,
    pub labels: BTreeMap<String, String>,
    pub address: String,
    pub applied_revision: u64,
    pub last_nack: Option<String>,
    pub connected_since: u64,
    pub cert_expiry: Option<u64>,
    pub identity: String,
    pub subscriptions: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusView {
    pub revision: u64,
    #[serde(rename = "loop")]
    pub loop_: LoopView,
    pub telemetry_signals: u64,
    pub services: Vec<ServiceView>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LoopView {
    pub phase: &'static str,
    pub intent: Option<String>,
    pub mode: &'static str,
    pub last_decision: Option<String>,
    pub frozen: bool,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceView {
    pub name: String,
    pub namespace: String,
    pub cluster: String,
    pub rps: f64,
    pub errors: u64,
    pub error_rate: f64,
    pub p99_ms: Option<f64>,
    pub policy_revision: u64,
    pub mtls: &'static str,
    /// Percentage of inbound requests that arrived over mTLS.
    pub mtls_share: Option<f64>,
    pub bypass: bool,
    pub proxies: ProxyCount,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyCount {
    pub total: usize,
    pub in_sync: usize,
}

/// A service's config as pushed, built once per change generation and shared by every proxy
/// that calls it.
pub struct BuiltService {
    pub service: proto::Service,
    /// Hash of its encoding.
    fingerprint: u64,
}

/// What one proxy should run, before it is made into a message.
pub struct PlannedConfig {
    /// Changes whenever anything in the message would (the version aside).
    pub fingerprint: u64,
    pub services: Vec<Arc<BuiltService>>,
    /// Everything but the services.
    pub rest: proto::ProxyConfig,
    /// The intents whose candidate it carries.
    pub included: BTreeSet<u64>,
}

impl PlannedConfig {
    /// The message, numbered `version`.
    pub fn message(&self, version: u64) -> proto::ProxyConfig {
        proto::ProxyConfig {
            version,
            services: self.services.iter().map(|s| s.service.clone()).collect(),
            ..self.rest.clone()
        }
    }
}

fn fingerprint(bytes: &[u8]) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

// === impl Mesh ===

impl Mesh {
    /// Loads the newest revision from `store`.
    pub fn new(store: std::sync::Arc<Store>, ca: crate::ca::Ca, metrics: ControlMetrics) -> Result<Self, StoreError> {
        let stable = match store.stable()? {
            Some(rev) => store.get(rev)?,
            None => store.latest()?,
        };
        let (revision, resources) = match stable {
            Some(r) => (r.revision, r.resources.into_iter().map(|res| (res.key(), res)).collect()),
            None => (0, BTreeMap::new()),
        };
        metrics.revision.set(revision as i64);
        let intents = crate::intents::recover(&store, revision)?;
        Ok(Self {
            taps: Default::default(),
            store,
            ca,
            state: Mutex::new(State {
                stable: revision,
                resources,
                proxies: BTreeMap::new(),
                next_conn: 1,
                traffic: HashMap::new(),
                samples: HashMap::new(),
                telemetry_signals: 0,
                intents,
                frozen: false,
                bypass: BTreeSet::new(),
                seen: BTreeSet::new(),
                last_decision: None,
                service_cache: HashMap::new(),
                service_cache_generation: u64::MAX,
            }),
            changed: watch::channel(0).0,
            metrics,
            started: Instant::now(),
            wake: tokio::sync::Notify::new(),
            events: tokio::sync::broadcast::channel(256).0,
        })
    }

    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub(crate) fn bump(&self) {
        self.changed.send_modify(|g| *g += 1);
    }

    /// Sends one event to every `/api/v1/events` listener.
    pub(crate) fn emit(&self, event: serde_json::Value) {
        let _ = self.events.send(event.to_string());
    }

    /// The stable revision.
    pub fn revision(&self) -> u64 {
        self.state.lock().stable
    }

    pub fn resources(&self) -> Vec<Resource> {
        self.state.lock().resources.values().cloned().collect()
    }

    pub fn history(&self) -> Result<Vec<Revision>, StoreError> {
        self.store.history()
    }

    /// Adds a proxy that opened a stream and proved it is its workload ([`crate::admission`]),
    /// with the identity it was admitted with; returns its connection number and id.
    pub fn register(&self, reg: &proto::Register, identity: String) -> Result<(u64, String), String> {
        let inbound: SocketAddr = reg
            .inbound_addr
            .parse()
            .map_err(|_| format!("register: inbound_addr {:?} is not a socket address", reg.inbound_addr))?;
        let labels: BTreeMap<String, String> = reg.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let service = labels.get(SERVICE_LABEL).cloned().unwrap_or_else(|| reg.name.clone());
        let mut state = self.state.lock();
        let conn = state.next_conn;
        state.next_conn += 1;
        let id = format!("{}/{}#{conn}", reg.namespace, reg.name);
        state.seen.insert((reg.namespace.clone(), service.clone()));
        let subscriptions = reg.services.iter().filter_map(|s| subscription(&reg.namespace, s)).collect();
        state.proxies.insert(
            conn,
            ProxyRecord {
                id: id.clone(),
                namespace: reg.namespace.clone(),
                name: reg.name.clone(),
                workload: format!("{}/{}", reg.namespace, reg.name),
                cluster: reg.cluster.clone(),
                labels,
                service,
                inbound,
                subscriptions,
                applied_revision: reg.applied_revision,
                last_nack: None,
                connected_since_ms: now_ms(),
                pushed: None,
                resumed: reg.applied_revision > 0 || !reg.services.is_empty(),
                identity,
                cert_not_after: 0,
                bundle_epoch: 0,
                cert_generation: None,
                pending: BTreeMap::new(),
                applied_intents: BTreeSet::new(),
                refused: BTreeMap::new(),
            },
        );
        self.metrics.proxies.set(state.proxies.len() as i64);
        drop(state);
        tracing::info!(proxy = %id, %inbound, "proxy connected");
        self.bump();
        Ok((conn, id))
    }

    pub fn unregister(&self, conn: u64) {
        let mut state = self.state.lock();
        if let Some(p) = state.proxies.remove(&conn) {
            tracing::info!(proxy = %p.id, "proxy disconnected");
        }
        self.metrics.proxies.set(state.proxies.len() as i64);
        drop(state);
        self.bump();
    }

    pub fn subscribe(&self, conn: u64, services: Vec<String>) {
        if let Some(p) = self.state.lock().proxies.get_mut(&conn) {
            let keys: Vec<String> = services.iter().filter_map(|s| subscription(&p.namespace, s)).collect();
            p.subscriptions.extend(keys);
        }
    }

    /// The config proxy `conn` needs now: the stable resources, with the overlay of every
    /// intent that treats this proxy on top. Cheap to make under the lock (services are shared
    /// with every other proxy that needs them in this generation); the stream compares its
    /// fingerprint with the last one it sent and builds the message only when it differs.
    pub fn config_for(&self, conn: u64) -> Option<PlannedConfig> {
        let generation = *self.changed.borrow();
        let mut guard = self.state.lock();
        if !guard.proxies.contains_key(&conn) {
            return None;
        }
        if guard.service_cache_generation != generation {
            guard.service_cache.clear();
            guard.service_cache_generation = generation;
        }
        let mut cache = std::mem::take(&mut guard.service_cache);
        let state = &*guard;
        let p = &state.proxies[&conn];
        let mut resources = std::borrow::Cow::Borrowed(&state.resources);
        let mut revision = state.stable;
        let mut included = BTreeSet::new();
        for (seq, intent) in &state.intents {
            if intent.treats(p) {
                let r = resources.to_mut();
                for entry in &intent.overlay {
                    match &entry.resource {
                        Some(res) => r.insert(entry.key.clone(), res.clone()),
                        None => r.remove(&entry.key),
                    };
                }
                revision = revision.max(intent.candidate.unwrap_or(0));
                included.insert(*seq);
            }
        }
        let bypassed = |namespace: &str, service: &str| state.bypass.contains(&(namespace.to_string(), service.to_string()));
        let overlays: Vec<u64> = included.iter().copied().collect();
        let services = p
            .subscriptions
            .iter()
            .filter_map(|key| key.split_once('/'))
            .map(|(namespace, name)| {
                let key = (namespace.to_string(), name.to_string(), overlays.clone());
                if let Some(cached) = cache.get(&key) {
                    return cached.clone();
                }
                let mut endpoints: Vec<Endpoint> = state
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
                let policy = if bypassed(namespace, name) {
                    None
                } else {
                    traffic_policy(&resources, namespace, name)
                };
                let unknown = endpoints.is_empty()
                    && !state.seen.contains(&(key.0.clone(), key.1.clone()))
                    && !named_by_policy(&resources, namespace, name);
                let svc = ServiceConfig {
                    name: name.to_string(),
                    namespace: namespace.to_string(),
                    endpoints,
                    policy_name: policy.map(|(k, _)| k.name.clone()).unwrap_or_default(),
                    policy: policy.map(|(_, spec)| spec.clone()),
                    mtls: mtls_mode(&resources, namespace, name),
                    unknown,
                    virtual_ip: (!unknown).then(|| weft_api::mesh::virtual_ip(namespace, name)),
                };
                let service = proto::Service::from(&svc);
                let fingerprint = fingerprint(&service.encode_to_vec());
                let built = Arc::new(BuiltService { service, fingerprint });
                cache.insert(key, built.clone());
                built
            })
            .collect::<Vec<_>>();
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
            bypass: bypassed(&p.namespace, &p.service),
            security_policy_json: security.unwrap_or_default(),
            security_policy_name: security_name.unwrap_or_default(),
            trust_bundle_pem: self.ca.bundle_pem(),
            ca_generation: self.ca.generation(),
            inbound_rate_limit_json: traffic_policy(&resources, &p.namespace, &p.service)
                .and_then(|(_, spec)| spec.rate_limit.as_ref())
                .filter(|r| r.at == RateLimitAt::Inbound)
                .map(|r| serde_json::to_string(r).expect("rate limit serializes"))
                .unwrap_or_default(),
        };
        guard.service_cache = cache;
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

    /// Starts a root rotation (see [`crate::ca::Rotation`]).
    pub fn rotate_root(&self) -> Result<(), crate::ca::CaError> {
        self.ca.rotate(&self.store)?;
        self.emit(serde_json::json!({"type": "ca", "rotation": "distributing"}));
        self.bump();
        Ok(())
    }

    /// Advances a root rotation: the new root signs once every proxy trusts it; the old root is
    /// dropped once every workload holds a leaf of the new one.
    pub fn rotation_step(&self) {
        use crate::ca::Rotation;
        let rotation = self.ca.rotation();
        if rotation == Rotation::Idle {
            return;
        }
        let ready = {
            let state = self.state.lock();
            match rotation {
                Rotation::Distributing => state.proxies.values().all(|p| p.bundle_epoch >= self.ca.bundle_epoch()),
                // What proxies report they use, not what was issued: a proxy may install its
                // new certificate a little after the CA signed it.
                Rotation::Reissuing => {
                    let generation = self.ca.generation();
                    state.proxies.values().all(|p| p.cert_generation.is_some_and(|g| g >= generation))
                }
                Rotation::Idle => false,
            }
        };
        if !ready {
            return;
        }
        let result = match rotation {
            Rotation::Distributing => self.ca.switch_signer(&self.store),
            _ => self.ca.finish_rotation(&self.store),
        };
        match result {
            Ok(()) => {
                self.emit(serde_json::json!({"type": "ca", "rotation": format!("{:?}", self.ca.rotation()).to_lowercase()}));
                self.bump();
            }
            Err(error) => tracing::error!(%error, "root rotation step failed"),
        }
    }

    /// While warming up, a proxy that resumed with a working config is not sent one that would
    /// leave any of its services without endpoints: those endpoints are most likely proxies
    /// that have not reconnected yet. Returns when to look again.
    pub fn hold(&self, conn: u64, cfg: &PlannedConfig) -> Option<Instant> {
        let until = self.started + WARMUP;
        if Instant::now() >= until || !cfg.services.iter().any(|s| s.service.endpoints.is_empty()) {
            return None;
        }
        self.state.lock().proxies.get(&conn).is_some_and(|p| p.resumed).then_some(until)
    }

    pub fn pushed(&self, conn: u64, version: u64, included: BTreeSet<u64>, bundle_epoch: u64) {
        self.metrics.pushes.inc();
        if let Some(p) = self.state.lock().proxies.get_mut(&conn) {
            p.pushed = Some((version, Instant::now()));
            p.pending.insert(version, (included, bundle_epoch));
            while p.pending.len() > 16 {
                p.pending.pop_first();
            }
        }
    }

    pub fn ack(&self, conn: u64, version: u64, revision: u64) {
        self.metrics.acks.inc();
        let mut state = self.state.lock();
        if let Some(p) = state.proxies.get_mut(&conn) {
            p.applied_revision = revision;
            p.last_nack = None;
            if let Some((included, epoch)) = p.pending.remove(&version) {
                p.applied_intents = included;
                p.bundle_epoch = epoch;
            }
            p.pending.retain(|v, _| *v > version);
            if let Some((v, at)) = p.pushed
                && v == version
            {
                self.metrics.push_to_ack.observe(at.elapsed().as_secs_f64());
                p.pushed = None;
            }
        }
        drop(state);
        self.wake.notify_one();
    }

    pub fn nack(&self, conn: u64, version: u64, revision: u64, reason: String) {
        self.metrics.nacks.inc();
        if let Some(p) = self.state.lock().proxies.get_mut(&conn) {
            tracing::warn!(proxy = %p.id, version, revision, %reason, "proxy refused config");
            if let Some((included, _)) = p.pending.remove(&version) {
                for seq in included.difference(&p.applied_intents) {
                    p.refused.insert(*seq, reason.clone());
                }
            }
            p.last_nack = Some(reason);
        }
        self.wake.notify_one();
    }

    pub fn telemetry(&self, conn: u64, report: proto::TelemetryReport) {
        self.metrics.telemetry_reports.inc();
        let mut state = self.state.lock();
        state.telemetry_signals += 1;
        let Some(p) = state.proxies.get_mut(&conn) else { return };
        if let Err(e) = check_report(&report) {
            tracing::warn!(proxy = %p.id, field = %e.field, value = %e.value, reason = %e.message, "telemetry report refused");
            return;
        }
        p.cert_not_after = report.cert_not_after_unix;
        p.cert_generation = (report.cert_not_after_unix > 0).then_some(report.cert_generation);
        let service_key = (p.namespace.clone(), p.service.clone());
        let workload = p.workload_id().to_string();
        let now = Instant::now();
        for s in report.stats {
            let sample = Sample {
                at: now,
                revision: s.revision,
                route: s.route,
                mtls: s.mtls,
                requests: s.requests,
                errors: s.errors,
                latency_slots: s.latency_slots,
                latency_counts: s.latency_counts,
            };
            if s.direction == proto::Direction::Inbound as i32 {
                push_window(
                    state.traffic.entry(service_key.clone()).or_default(),
                    sample.clone(),
                    now,
                    RATE_WINDOW * 3,
                );
            }
            let key = (workload.clone(), s.direction, s.service);
            push_window(state.samples.entry(key).or_default(), sample, now, SAMPLE_WINDOW);
        }
        drop(state);
        self.wake.notify_one();
    }

    pub fn proxies(&self) -> Vec<ProxyView> {
        self.state
            .lock()
            .proxies
            .values()
            .map(|p| ProxyView {
                id: p.id.clone(),
                workload: format!("{}/{}", p.namespace, p.name),
                service: p.service.clone(),
                cluster: p.cluster.clone(),
                labels: p.labels.clone(),
                address: p.inbound.to_string(),
                applied_revision: p.applied_revision,
                last_nack: p.last_nack.clone(),
                connected_since: p.connected_since_ms,
                cert_expiry: (p.cert_not_after > 0).then_some(p.cert_not_after),
                identity: p.identity.clone(),
                subscriptions: p.subscriptions.iter().cloned().collect(),
            })
            .collect()
    }

    pub fn status(&self) -> StatusView {
        let state = self.state.lock();
        let mut services: BTreeMap<(String, String), Vec<&ProxyRecord>> = BTreeMap::new();
        for p in state.proxies.values() {
            services.entry((p.namespace.clone(), p.service.clone())).or_default().push(p);
        }
        for r in state.resources.values() {
            services
                .entry((r.metadata().namespace.clone(), r.service().to_string()))
                .or_default();
        }
        let now = Instant::now();
        let views = services
            .into_iter()
            .map(|((namespace, name), proxies)| {
                let mut requests = 0;
                let mut errors = 0;
                let mut mtls_requests = 0;
                let mut buckets = vec![0u64; LATENCY_SLOTS];
                if let Some(samples) = state.traffic.get(&(namespace.clone(), name.clone())) {
                    for s in samples.iter().filter(|s| now.duration_since(s.at) <= RATE_WINDOW) {
                        requests = s.requests.saturating_add(requests);
                        errors = s.errors.saturating_add(errors);
                        mtls_requests = s.mtls.saturating_add(mtls_requests);
                        add_sparse(&mut buckets, &s.latency_slots, &s.latency_counts);
                    }
                }
                let clusters: BTreeSet<&str> = proxies.iter().map(|p| p.cluster.as_str()).collect();
                ServiceView {
                    cluster: clusters.into_iter().collect::<Vec<_>>().join(","),
                    rps: round2(requests as f64 / RATE_WINDOW.as_secs_f64()),
                    errors,
                    error_rate: if requests == 0 {
                        0.0
                    } else {
                        round2(100.0 * errors as f64 / requests as f64)
                    },
                    p99_ms: quantile_ms(&buckets, 0.99).map(round2),
                    policy_revision: proxies.iter().map(|p| p.applied_revision).min().unwrap_or(0),
                    mtls: match mtls_mode(&state.resources, &namespace, &name) {
                        Some(weft_api::resource::MtlsMode::Strict) => "strict",
                        Some(weft_api::resource::MtlsMode::Off) => "off",
                        _ => "permissive",
                    },
                    mtls_share: if requests == 0 {
                        None
                    } else {
                        Some(round2(100.0 * mtls_requests as f64 / requests as f64))
                    },
                    bypass: state.bypass.contains(&(namespace.clone(), name.clone())),
                    proxies: ProxyCount {
                        total: proxies.len(),
                        in_sync: proxies.iter().filter(|p| p.applied_revision == state.assigned_revision(p)).count(),
                    },
                    name,
                    namespace,
                }
            })
            .collect();
        StatusView {
            revision: state.stable,
            loop_: state.loop_view(),
            telemetry_signals: state.telemetry_signals,
            services: views,
        }
    }
}

/// One destination route as its callers saw it over the last [`RATE_WINDOW`] (`weft top`).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteView {
    pub service: String,
    pub route: String,
    pub rps: f64,
    /// Percentage of requests answered below 500.
    pub success_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl Mesh {
    /// Every destination service and route the callers reported over the last window.
    pub fn routes(&self) -> Vec<RouteView> {
        let state = self.state.lock();
        let now = Instant::now();
        let mut by: BTreeMap<(String, String), (u64, u64, Vec<u64>)> = BTreeMap::new();
        for ((_, direction, service), samples) in &state.samples {
            if *direction != proto::Direction::Outbound as i32 {
                continue;
            }
            for s in samples.iter().filter(|s| now.duration_since(s.at) <= RATE_WINDOW) {
                let e = by
                    .entry((service.clone(), s.route.clone()))
                    .or_insert_with(|| (0, 0, vec![0; LATENCY_SLOTS]));
                e.0 = e.0.saturating_add(s.requests);
                e.1 = e.1.saturating_add(s.errors);
                add_sparse(&mut e.2, &s.latency_slots, &s.latency_counts);
            }
        }
        by.into_iter()
            .map(|((service, route), (requests, errors, buckets))| RouteView {
                service,
                route,
                rps: round2(requests as f64 / RATE_WINDOW.as_secs_f64()),
                success_rate: (requests > 0).then(|| round2(100.0 * (requests - errors) as f64 / requests as f64)),
                p50_ms: quantile_ms(&buckets, 0.5).map(round2),
                p99_ms: quantile_ms(&buckets, 0.99).map(round2),
            })
            .collect()
    }
}

/// Refuses a report whose counts contradict each other (they would become negative success
/// counts and rates downstream), naming the first such field and its value. Totals are still
/// added with saturation: a proxy may report any number.
fn check_report(report: &proto::TelemetryReport) -> Result<(), FieldError> {
    for (i, s) in report.stats.iter().enumerate() {
        let above = |field: &str, value: u64| {
            FieldError::new(
                format!("stats[{i}].{field}"),
                value,
                format!("more than its {} requests", s.requests),
            )
        };
        if s.errors > s.requests {
            return Err(above("errors", s.errors));
        }
        if s.mtls > s.requests {
            return Err(above("mtls", s.mtls));
        }
        if s.latency_slots.len() != s.latency_counts.len() {
            return Err(FieldError::new(
                format!("stats[{i}].latencyCounts"),
                s.latency_counts.len(),
                format!("must pair with the {} latency slots", s.latency_slots.len()),
            ));
        }
    }
    Ok(())
}

/// The mTLS mode a service's SecurityPolicy sets for all of its workloads (one without a label
/// selector); `None` is the default, permissive.
pub(crate) fn mtls_mode(
    resources: &BTreeMap<ResourceKey, Resource>,
    namespace: &str,
    service: &str,
) -> Option<weft_api::resource::MtlsMode> {
    resources.values().find_map(|r| match r {
        Resource::SecurityPolicy(d)
            if d.metadata.namespace == namespace && d.spec.selector.service == service && d.spec.selector.labels.is_empty() =>
        {
            d.spec.mtls
        }
        _ => None,
    })
}

fn push_window(samples: &mut VecDeque<Sample>, sample: Sample, now: Instant, keep: Duration) {
    samples.push_back(sample);
    while samples.front().is_some_and(|x| now.duration_since(x.at) > keep) {
        samples.pop_front();
    }
}

/// The TrafficPolicy governing `service` in `resources`.
fn traffic_policy<'a>(
    resources: &'a BTreeMap<ResourceKey, Resource>,
    namespace: &str,
    service: &str,
) -> Option<(&'a ResourceKey, &'a weft_api::resource::TrafficPolicySpec)> {
    resources.iter().find_map(|(k, r)| match r {
        Resource::TrafficPolicy(d) if d.metadata.namespace == namespace && d.spec.service == service => Some((k, &d.spec)),
        _ => None,
    })
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

// === impl ProxyRecord ===

impl ProxyRecord {
    /// `namespace/name`: the proxy's identity across reconnects.
    pub fn workload_id(&self) -> &str {
        &self.workload
    }

    /// Whether it routes to `service` in `namespace`.
    pub fn subscribes_to(&self, namespace: &str, service: &str) -> bool {
        self.subscriptions.contains(&format!("{namespace}/{service}"))
    }
}

/// A service a proxy asks for, as `NAMESPACE/NAME`: what it sends, or a bare `NAME` (an older
/// proxy's) in its own namespace. Anything malformed is dropped.
fn subscription(own_namespace: &str, asked: &str) -> Option<String> {
    if asked.len() > 253 {
        return None;
    }
    let (namespace, name) = asked.split_once('/').unwrap_or((own_namespace, asked));
    let valid = |s: &str| !s.is_empty() && !s.contains('/');
    (valid(namespace) && valid(name)).then(|| format!("{namespace}/{name}"))
}

/// Whether a policy in `namespace` names `service` (which makes it known before any instance
/// registers).
fn named_by_policy(resources: &BTreeMap<ResourceKey, Resource>, namespace: &str, service: &str) -> bool {
    resources
        .values()
        .any(|r| r.metadata().namespace == namespace && r.service() == service)
}

// === impl State ===

impl State {
    /// Checks that need the live mesh: subsets must exist, one TrafficPolicy per service.
    pub(crate) fn check(&self, res: &Resource, next: &BTreeMap<ResourceKey, Resource>) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let ns = &res.metadata().namespace;
        let service = res.service();
        let known: BTreeSet<&str> = self
            .proxies
            .values()
            .filter(|p| &p.namespace == ns && p.service == service)
            .filter_map(|p| p.labels.get(SUBSET_LABEL).map(String::as_str))
            .collect();
        for (field, subset) in res.subsets() {
            if !known.contains(subset.as_str()) {
                let have = if known.is_empty() {
                    "none".to_string()
                } else {
                    known.iter().copied().collect::<Vec<_>>().join(", ")
                };
                errors.push(FieldError::new(
                    field,
                    &subset,
                    format!("no workload of service {service} has label {SUBSET_LABEL}={subset} (known subsets: {have})"),
                ));
            }
        }
        if let Resource::TrafficPolicy(_) = res {
            let key = res.key();
            for (k, other) in next {
                if *k != key && other.kind() == "TrafficPolicy" && &other.metadata().namespace == ns && other.service() == service {
                    errors.push(FieldError::new(
                        "spec.service",
                        service,
                        format!("already governed by {k}; one TrafficPolicy per service"),
                    ));
                }
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscriptions_are_namespaced_and_malformed_ones_dropped() {
        assert_eq!(subscription("shop", "evil/httpbe").as_deref(), Some("evil/httpbe"));
        assert_eq!(
            subscription("shop", "httpbe").as_deref(),
            Some("shop/httpbe"),
            "an older proxy's bare name"
        );
        for bad in ["", "/httpbe", "evil/", "a/b/c", &"x".repeat(254)] {
            assert_eq!(subscription("shop", bad), None, "{bad:?}");
        }
    }
}

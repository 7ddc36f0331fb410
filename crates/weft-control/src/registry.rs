//! The proxies connected right now: who each one is, what it subscribes to, and what it has
//! ACKed or NACKed of what it was sent. It owns those records; everything above reads them.
//! It also keeps each service's endpoints, updated as proxies join and leave, so that planning
//! never walks the whole fleet.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use prost::Message;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_api::mesh::SERVICE_LABEL;
use weft_api::proto;

/// A connected proxy.
#[derive(Clone, Debug)]
pub(crate) struct ProxyRecord {
    pub(crate) id: String,
    pub(crate) namespace: String,
    /// `namespace/name`, built once: the intent loop looks proxies up by it on every step.
    workload: String,
    pub(crate) cluster: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) service: String,
    pub(crate) inbound: SocketAddr,
    /// The services it routes to, as `NAMESPACE/NAME` ([`subscription`]).
    pub(crate) subscriptions: BTreeSet<String>,
    pub(crate) applied_revision: u64,
    pub(crate) last_nack: Option<String>,
    pub(crate) connected_since_ms: u64,
    pushed: Option<(u64, Instant)>,
    /// Registered with a config already (it reconnected rather than started).
    pub(crate) resumed: bool,
    /// The SPIFFE ID it was admitted with (its token's, or its certificate's).
    pub(crate) identity: String,
    /// Expiry of its workload certificate (unix seconds), as it last reported.
    pub(crate) cert_not_after: u64,
    /// The build version it reported (empty from a proxy too old to report one).
    pub(crate) version: String,
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

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ProxyView {
    id: String,
    pub(crate) workload: String,
    service: String,
    cluster: String,
    labels: BTreeMap<String, String>,
    address: String,
    applied_revision: u64,
    last_nack: Option<String>,
    connected_since: u64,
    cert_expiry: Option<u64>,
    identity: String,
    subscriptions: Vec<String>,
    version: String,
    /// What its sidecar costs (filled by the mesh from the signals; `None` before a report).
    pub(crate) cost: Option<crate::cost::CostView>,
}

/// What a replica publishes of each proxy connected to it, so that every replica knows every
/// proxy ([`crate::peers`]): endpoints for planning, and for the leader the stages it may treat
/// and what each proxy ACKed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct PeerProxy {
    id: String,
    namespace: String,
    workload: String,
    cluster: String,
    labels: BTreeMap<String, String>,
    service: String,
    inbound: SocketAddr,
    subscriptions: BTreeSet<String>,
    applied_revision: u64,
    identity: String,
    cert_not_after: u64,
    bundle_epoch: u64,
    cert_generation: Option<u64>,
    applied_intents: BTreeSet<u64>,
    refused: BTreeMap<u64, String>,
    connected_since_ms: u64,
    /// Absent in what a replica older than this field published.
    #[serde(default)]
    version: String,
}

/// Connection numbers from here on are proxies connected to other replicas.
const PEER_CONNS: u64 = 1 << 48;

/// The connected proxies by connection number.
#[derive(Debug)]
pub(crate) struct Registry {
    pub(crate) proxies: BTreeMap<u64, ProxyRecord>,
    /// The connection numbers given to each other replica's proxies.
    peers: BTreeMap<String, Vec<u64>>,
    next_peer_conn: u64,
    /// Every (namespace, service) a workload has registered for since this process started:
    /// a service whose instances are all gone is still known (its callers get
    /// `no-healthy-endpoints`, not `unknown-service`).
    pub(crate) seen: BTreeSet<(String, String)>,
    /// Each (namespace, service)'s endpoints: its connected instances.
    pub(crate) endpoints: HashMap<(String, String), Arc<EndpointSet>>,
    /// The last endpoint version handed out (one counter for every service).
    endpoint_version: u64,
    next_conn: u64,
}

/// A service's endpoints at one version, by address and connection (two registrations of one
/// workload may share an address while the old stream ends). Never changed in place: a join or
/// a leave makes a new set (copying the map of shared endpoints), so snapshots and streams hold
/// the one they planned from and tell versions apart without comparing lists.
#[derive(Debug, Default)]
pub(crate) struct EndpointSet {
    pub(crate) version: u64,
    pub(crate) endpoints: BTreeMap<(SocketAddr, u64), Arc<proto::Endpoint>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            proxies: BTreeMap::new(),
            seen: BTreeSet::new(),
            endpoints: HashMap::new(),
            endpoint_version: 0,
            next_conn: 1,
            peers: BTreeMap::new(),
            next_peer_conn: PEER_CONNS,
        }
    }
}

// === impl Registry ===

impl Registry {
    /// Adds a proxy that proved it is its workload, with the identity it was admitted with;
    /// returns its connection number and id.
    pub(crate) fn register(&mut self, reg: &proto::Register, identity: String, now_ms: u64) -> Result<(u64, String), String> {
        let inbound: SocketAddr = reg
            .inbound_addr
            .parse()
            .map_err(|_| format!("register: inbound_addr {:?} is not a socket address", reg.inbound_addr))?;
        // Other proxies dial this address, most of them on other hosts: a wildcard names none.
        if inbound.ip().is_unspecified() || inbound.port() == 0 {
            return Err(format!(
                "register: inbound_addr {:?} is a wildcard address or port 0, which no other proxy can dial (start the proxy with --advertise HOST_IP:PORT)",
                reg.inbound_addr
            ));
        }
        let labels: BTreeMap<String, String> = reg.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let service = labels.get(SERVICE_LABEL).cloned().unwrap_or_else(|| reg.name.clone());
        let conn = self.next_conn;
        self.next_conn += 1;
        let id = format!("{}/{}#{conn}", reg.namespace, reg.name);
        self.seen.insert((reg.namespace.clone(), service.clone()));
        let subscriptions = reg.services.iter().filter_map(|s| subscription(&reg.namespace, s)).collect();
        self.proxies.insert(
            conn,
            ProxyRecord {
                id: id.clone(),
                namespace: reg.namespace.clone(),
                workload: format!("{}/{}", reg.namespace, reg.name),
                cluster: reg.cluster.clone(),
                labels,
                service,
                inbound,
                subscriptions,
                applied_revision: reg.applied_revision,
                last_nack: None,
                connected_since_ms: now_ms,
                pushed: None,
                resumed: reg.applied_revision > 0 || !reg.services.is_empty(),
                identity,
                cert_not_after: 0,
                version: reg.version.clone(),
                bundle_epoch: 0,
                cert_generation: None,
                pending: BTreeMap::new(),
                applied_intents: BTreeSet::new(),
                refused: BTreeMap::new(),
            },
        );
        self.change_endpoints(conn, true);
        Ok((conn, id))
    }

    /// Removes a proxy whose stream ended, and its endpoint.
    pub(crate) fn remove(&mut self, conn: u64) -> Option<ProxyRecord> {
        self.change_endpoints(conn, false);
        self.proxies.remove(&conn)
    }

    /// Adds (`joined`) or removes `conn`'s endpoint in a new set of its service's endpoints.
    fn change_endpoints(&mut self, conn: u64, joined: bool) {
        let Some(p) = self.proxies.get(&conn) else { return };
        let key = (p.namespace.clone(), p.service.clone());
        let mut endpoints = self.endpoints.get(&key).map(|set| set.endpoints.clone()).unwrap_or_default();
        if joined {
            endpoints.insert((p.inbound, conn), Arc::new(p.endpoint(conn)));
        } else {
            endpoints.remove(&(p.inbound, conn));
        }
        self.endpoint_version += 1;
        let version = self.endpoint_version;
        self.endpoints.insert(key, Arc::new(EndpointSet { version, endpoints }));
    }

    pub(crate) fn subscribe(&mut self, conn: u64, services: Vec<String>) {
        if let Some(p) = self.proxies.get_mut(&conn) {
            let keys: Vec<String> = services.iter().filter_map(|s| subscription(&p.namespace, s)).collect();
            p.subscriptions.extend(keys);
        }
    }

    /// Notes that `version` (carrying the candidates of `included`) went out to `conn`.
    pub(crate) fn pushed(&mut self, conn: u64, version: u64, included: BTreeSet<u64>, bundle_epoch: u64, now: Instant) {
        if let Some(p) = self.proxies.get_mut(&conn) {
            p.pushed = Some((version, now));
            p.pending.insert(version, (included, bundle_epoch));
            while p.pending.len() > 16 {
                p.pending.pop_first();
            }
        }
    }

    /// Records an ACK; returns how long the ACKed push took, when it was the last one sent.
    pub(crate) fn ack(&mut self, conn: u64, version: u64, revision: u64, now: Instant) -> Option<Duration> {
        let p = self.proxies.get_mut(&conn)?;
        p.applied_revision = revision;
        p.last_nack = None;
        if let Some((included, epoch)) = p.pending.remove(&version) {
            p.applied_intents = included;
            p.bundle_epoch = epoch;
        }
        p.pending.retain(|v, _| *v > version);
        match p.pushed {
            Some((v, at)) if v == version => {
                p.pushed = None;
                Some(now.duration_since(at))
            }
            _ => None,
        }
    }

    /// Records a NACK: every intent the refused version carried, and this proxy did not already
    /// run, is refused with `reason`.
    pub(crate) fn nack(&mut self, conn: u64, version: u64, revision: u64, reason: String) {
        if let Some(p) = self.proxies.get_mut(&conn) {
            tracing::warn!(proxy = %p.id, version, revision, %reason, "proxy refused config");
            if let Some((included, _)) = p.pending.remove(&version) {
                for seq in included.difference(&p.applied_intents) {
                    p.refused.insert(*seq, reason.clone());
                }
            }
            p.last_nack = Some(reason);
        }
    }

    /// The certificate `conn` reports using.
    pub(crate) fn certificate(&mut self, conn: u64, not_after: u64, generation: u64) {
        if let Some(p) = self.proxies.get_mut(&conn) {
            p.cert_not_after = not_after;
            p.cert_generation = (not_after > 0).then_some(generation);
        }
    }

    /// The proxies connected to this replica, as published to the others.
    pub(crate) fn local(&self) -> Vec<PeerProxy> {
        self.proxies
            .range(..PEER_CONNS)
            .map(|(_, p)| PeerProxy {
                id: p.id.clone(),
                namespace: p.namespace.clone(),
                workload: p.workload.clone(),
                cluster: p.cluster.clone(),
                labels: p.labels.clone(),
                service: p.service.clone(),
                inbound: p.inbound,
                subscriptions: p.subscriptions.clone(),
                applied_revision: p.applied_revision,
                identity: p.identity.clone(),
                cert_not_after: p.cert_not_after,
                bundle_epoch: p.bundle_epoch,
                cert_generation: p.cert_generation,
                applied_intents: p.applied_intents.clone(),
                refused: p.refused.clone(),
                connected_since_ms: p.connected_since_ms,
                version: p.version.clone(),
            })
            .collect()
    }

    /// Replaces what is known of the proxies connected to replica `peer` (none: it is gone).
    /// Returns whether anything other proxies are planned from changed (who is where, what it
    /// calls), rather than only what the peer's proxies ACKed. A peer's proxy keeps its
    /// connection number (its endpoint's key) from one report to the next, and its endpoint
    /// changes in the service's endpoint set only when the endpoint itself does.
    pub(crate) fn set_peer(&mut self, peer: &str, proxies: Vec<PeerProxy>) -> bool {
        let planned = |p: &ProxyRecord| {
            (
                p.id.clone(),
                p.cluster.clone(),
                p.labels.clone(),
                p.inbound,
                p.subscriptions.clone(),
                p.identity.clone(),
            )
        };
        let mut before = Vec::new();
        let mut held: HashMap<String, (u64, proto::Endpoint)> = HashMap::new();
        for conn in self.peers.remove(peer).unwrap_or_default() {
            if let Some(p) = self.proxies.get(&conn) {
                before.push(planned(p));
                held.insert(p.id.clone(), (conn, p.endpoint(conn)));
            }
        }
        let incoming: BTreeSet<String> = proxies.iter().map(|p| p.id.clone()).collect();
        for (id, (conn, _)) in &held {
            if !incoming.contains(id) {
                self.change_endpoints(*conn, false);
                self.proxies.remove(conn);
            }
        }
        let mut conns = Vec::with_capacity(proxies.len());
        for p in proxies {
            let conn = match held.get(&p.id) {
                Some((conn, _)) => *conn,
                None => {
                    let conn = self.next_peer_conn;
                    self.next_peer_conn += 1;
                    conn
                }
            };
            let record = ProxyRecord {
                id: p.id,
                namespace: p.namespace,
                workload: p.workload,
                cluster: p.cluster,
                labels: p.labels,
                service: p.service,
                inbound: p.inbound,
                subscriptions: p.subscriptions,
                applied_revision: p.applied_revision,
                last_nack: None,
                connected_since_ms: p.connected_since_ms,
                pushed: None,
                resumed: true,
                identity: p.identity,
                cert_not_after: p.cert_not_after,
                version: p.version,
                pending: BTreeMap::new(),
                bundle_epoch: p.bundle_epoch,
                cert_generation: p.cert_generation,
                applied_intents: p.applied_intents,
                refused: p.refused,
            };
            self.seen.insert((record.namespace.clone(), record.service.clone()));
            let same_endpoint = held.get(&record.id).is_some_and(|(_, was)| *was == record.endpoint(conn));
            if !same_endpoint && held.contains_key(&record.id) {
                self.change_endpoints(conn, false);
            }
            self.proxies.insert(conn, record);
            if !same_endpoint {
                self.change_endpoints(conn, true);
            }
            conns.push(conn);
        }
        let after: Vec<_> = conns.iter().filter_map(|c| self.proxies.get(c)).map(planned).collect();
        if !conns.is_empty() {
            self.peers.insert(peer.to_string(), conns);
        }
        before != after
    }

    pub(crate) fn views(&self) -> Vec<ProxyView> {
        self.proxies
            .values()
            .map(|p| ProxyView {
                id: p.id.clone(),
                workload: p.workload.clone(),
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
                version: p.version.clone(),
                cost: None,
            })
            .collect()
    }
}

// === impl ProxyRecord ===

impl ProxyRecord {
    /// `namespace/name`: the proxy's identity across reconnects.
    pub(crate) fn workload_id(&self) -> &str {
        &self.workload
    }

    /// This proxy as an endpoint of its service, keyed by its connection number.
    fn endpoint(&self, conn: u64) -> proto::Endpoint {
        proto::Endpoint {
            address: self.inbound.to_string(),
            cluster: self.cluster.clone(),
            labels: self.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            workload: self.workload.clone(),
            identity: self.identity.clone(),
            key: conn,
        }
    }

    /// Whether it routes to `service` in `namespace`.
    pub(crate) fn subscribes_to(&self, namespace: &str, service: &str) -> bool {
        // Without building the key: the intent loop asks this of every proxy on every pass.
        self.subscriptions.iter().any(|s| s.split_once('/') == Some((namespace, service)))
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

/// One proxy's telemetry report, forwarded by the replica it reached.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ForwardedReport {
    pub(crate) workload: String,
    pub(crate) namespace: String,
    pub(crate) service: String,
    /// Its `TelemetryReport.stats`, protobuf-encoded as a `TelemetryReport`, base64.
    stats: String,
}

impl ForwardedReport {
    pub(crate) fn new(workload: String, namespace: String, service: String, stats: Vec<proto::TrafficStats>) -> Self {
        let report = proto::TelemetryReport {
            stats,
            ..Default::default()
        };
        Self {
            workload,
            namespace,
            service,
            stats: STANDARD.encode(report.encode_to_vec()),
        }
    }

    pub(crate) fn stats(&self) -> Vec<proto::TrafficStats> {
        STANDARD
            .decode(&self.stats)
            .ok()
            .and_then(|b| proto::TelemetryReport::decode(b.as_slice()).ok())
            .map(|r| r.stats)
            .unwrap_or_default()
    }
}

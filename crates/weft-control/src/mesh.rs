//! The live mesh as the control plane sees it, as one facade over parts that each own their
//! data: the store, the CA, the registry of connected proxies, the signals they report, and
//! the intent machine with the stable resources. Every change bumps a watch that each proxy's
//! stream waits on; each stream then plans its proxy's config from the snapshot of that change
//! ([`crate::plan`]), outside every lock here.
//!
//! Locks, always taken in this order and never across disk I/O on the push path:
//! `snapshot` -> `machine` -> `registry` -> `signals` (`fold` is taken alone). The push path (register, ACK, NACK,
//! telemetry, planning) takes only `registry`, `signals` and `snapshot`.

use crate::ca::{Ca, CaError, Rotation};
use crate::clock::Clock;
use crate::cost::CostView;
use crate::intents::{BYPASS_STATE, Blocker, ChangeError, Event, FREEZE_STATE, IntentRecord, LoopView, Machine, Step, Submitted};
use crate::metrics::{ControlMetrics, OutcomeLabel, PhaseLabel};
use crate::plan::{Overlay, PlannedConfig, Snapshot, Trust, mtls_mode};
use crate::registry::ForwardedReport;
use crate::registry::{PeerProxy, ProxyView, Registry};
use crate::rollout::Phase;
use crate::signals::{RATE_WINDOW, Reporter, RouteView, Signals, check_report, round2};
use crate::store::{Revision, Store, StoreError};
use crate::taps::Taps;
use crate::vip::Vips;
use parking_lot::{Mutex, MutexGuard};
use serde::Serialize;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Notify, broadcast, watch};
use weft_api::ResourceKey;
use weft_api::proto;
use weft_api::resource::{Document, IntentSpec, MtlsMode, Resource, RolloutMode};
use weft_api::telemetry::quantile_ms;
use weft_core::Shutdown;

/// After a (re)start the registry is incomplete until every live proxy has reconnected; proxies
/// retry with a backoff capped at 5 s, so after this long every live one is back.
const WARMUP: Duration = Duration::from_secs(6);
/// Timer resolution of the intent loop and of root rotation.
const TICK: Duration = Duration::from_millis(200);
/// The least time a new root is trusted before it signs, proxies or none: each replica's
/// ca.pem names it well within that (store watch, then the file), so a client that read the
/// file just before the root joined it still finds its certificate's root in what it read
/// (with no proxy to wait for, the new root used to sign a few milliseconds after joining, and
/// a client between its read and its handshake then saw UnknownIssuer).
const ROOT_OVERLAP: Duration = Duration::from_secs(1);
/// The least time between two passes of the intent loop.
const STEP_INTERVAL: Duration = Duration::from_millis(20);
/// Proxies joining, leaving and subscribing fold into one change generation per this much time
/// per connected proxy (capped at [`FOLD_MAX`]): every generation wakes every stream to plan
/// again, so a storm of 10,000 joins must cost the streams one pass per fold, not one per join.
const FOLD_PER_PROXY: Duration = Duration::from_micros(25);
const FOLD_MAX: Duration = Duration::from_millis(250);
/// Below this a fold saves less than it delays (fewer than 40 proxies): bump at once.
const FOLD_MIN: Duration = Duration::from_millis(1);

pub(crate) struct Mesh {
    /// This replica's name (`--replica`).
    pub(crate) replica: String,
    /// Where other replicas reach this one's API (`None` when bound to a wildcard address).
    pub(crate) api_url: Option<String>,
    /// The leader's API, as its election record says: where a follower forwards changes.
    pub(crate) leader_api: Mutex<Option<String>>,
    /// Whether this replica leads, and who does.
    role: Mutex<Role>,
    pub(crate) store: Arc<Store>,
    /// Services' virtual IPs ([`crate::vip`]), shared by every snapshot.
    vips: Arc<Vips>,
    pub(crate) ca: Ca,
    pub(crate) metrics: ControlMetrics,
    /// Open `weft tap` streams.
    pub(crate) taps: Arc<Taps>,
    clock: Clock,
    started: Instant,
    machine: Mutex<Machine>,
    registry: Mutex<Registry>,
    signals: Mutex<Signals>,
    /// The mesh at the newest change generation that some stream has planned from.
    snapshot: Mutex<Arc<Snapshot>>,
    /// Telemetry reports a follower has yet to forward to the leader ([`crate::peers`]).
    outbox: Mutex<Vec<ForwardedReport>>,
    /// The build version each other live replica published ([`crate::peers`]).
    peer_versions: Mutex<BTreeMap<String, String>>,
    /// Serializes the operator switches (freeze, bypass) from their store write to the machine.
    switches: Mutex<()>,
    /// Held from the moment a change to an intent is decided until its record is written, so
    /// records reach the store in the order they were decided, without the machine's lock.
    writes: Mutex<()>,
    changed: watch::Sender<u64>,
    /// Membership changes waiting to be published as one generation ([`Mesh::bump_membership`]).
    fold: Mutex<Fold>,
    /// Wakes [`run_folds`] when a fold is pending.
    fold_due: Notify,
    /// Wakes the intent loop (submissions, ACKs, NACKs, operator actions).
    wake: Notify,
    /// Another replica created or revoked an API token: the API reads them again.
    pub(crate) tokens_changed: Notify,
    /// Server-sent events for the dashboard: one JSON object per change.
    events: broadcast::Sender<String>,
}

/// When membership changes were last published, and whether one waits.
struct Fold {
    last: Option<Instant>,
    pending: bool,
}

/// Only the leader changes the mesh; on the embedded store the one replica always leads.
#[derive(Clone, Debug)]
struct Role {
    leading: bool,
    /// The leader's replica name, once known.
    leader: Option<String>,
    /// A leader on etcd acts only until then unless its lease is renewed meanwhile: a leader
    /// whose election loop is starved stops acting by itself before its lease can lapse.
    until: Option<Instant>,
}

impl Role {
    fn acting(&self) -> bool {
        self.leading && self.until.is_none_or(|until| Instant::now() < until)
    }
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ControlPlaneView {
    replica: String,
    /// The leader's replica name (`null` while none is elected).
    leader: Option<String>,
    role: &'static str,
    store: String,
    version: String,
    /// Every live replica's version by name, this one's included, for `weft check`.
    replicas: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct StatusView {
    control_plane: ControlPlaneView,
    revision: u64,
    #[serde(rename = "loop")]
    loop_: LoopView,
    telemetry_signals: u64,
    pub(crate) services: Vec<ServiceView>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ServiceView {
    pub(crate) name: String,
    pub(crate) namespace: String,
    cluster: String,
    pub(crate) rps: f64,
    pub(crate) errors: u64,
    pub(crate) error_rate: f64,
    pub(crate) p99_ms: Option<f64>,
    /// What the service's sidecars cost together (none reported yet: `None`).
    sidecars: Option<CostView>,
    policy_revision: u64,
    mtls: &'static str,
    /// Percentage of inbound requests that arrived over mTLS.
    mtls_share: Option<f64>,
    bypass: bool,
    proxies: ProxyCount,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ProxyCount {
    total: usize,
    in_sync: usize,
}

// === impl Mesh ===

impl Mesh {
    /// Loads the newest revision and the intents from `store`.
    pub(crate) fn new(store: Arc<Store>, ca: Ca, metrics: ControlMetrics) -> Result<Self, StoreError> {
        Self::with_clock(store, ca, metrics, Clock::default())
    }

    pub(crate) fn with_clock(store: Arc<Store>, ca: Ca, metrics: ControlMetrics, clock: Clock) -> Result<Self, StoreError> {
        // A replica on a shared store changes nothing until it is elected ([`crate::leader`]).
        let leading = matches!(*store, Store::Redb(_));
        let machine = if leading {
            Machine::recover(&store, clock.unix_ms())?
        } else {
            Machine::load(&store)?
        };
        metrics.revision.set(machine.stable as i64);
        let vips = Arc::new(Vips::load(store.clone())?);
        Ok(Self {
            replica: "local".into(),
            api_url: None,
            leader_api: Mutex::new(None),
            role: Mutex::new(Role {
                leading,
                leader: leading.then(|| "local".to_string()),
                until: None,
            }),
            taps: Default::default(),
            store,
            ca,
            metrics,
            started: clock.now(),
            clock,
            machine: Mutex::new(machine),
            registry: Mutex::default(),
            peer_versions: Mutex::default(),
            signals: Mutex::default(),
            snapshot: Mutex::new(Arc::new(Snapshot::none(vips.clone()))),
            vips,
            outbox: Mutex::default(),
            switches: Mutex::new(()),
            writes: Mutex::new(()),
            changed: watch::channel(0).0,
            fold: Mutex::new(Fold {
                last: None,
                pending: false,
            }),
            fold_due: Notify::new(),
            wake: Notify::new(),
            tokens_changed: Notify::new(),
            events: broadcast::channel(256).0,
        })
    }

    pub(crate) fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g += 1);
    }

    /// A proxy joined, left or subscribed: published at once unless membership was published
    /// within the fold interval, else folded with every other such change until the interval
    /// ends ([`run_folds`], or the first plan after it).
    fn bump_membership(&self) {
        let interval = self.fold_interval();
        let mut fold = self.fold.lock();
        if fold.pending {
            return;
        }
        if interval >= FOLD_MIN && fold.last.is_some_and(|last| last.elapsed() < interval) {
            fold.pending = true;
            drop(fold);
            self.fold_due.notify_one();
            return;
        }
        fold.last = Some(Instant::now());
        drop(fold);
        self.bump();
    }

    /// Publishes a pending fold whose interval has ended; returns when the pending one is due.
    fn publish_fold(&self) -> Option<Instant> {
        let mut fold = self.fold.lock();
        if !fold.pending {
            return None;
        }
        let due = fold.last.map_or_else(Instant::now, |last| last + self.fold_interval());
        if Instant::now() < due {
            return Some(due);
        }
        (fold.pending, fold.last) = (false, Some(Instant::now()));
        drop(fold);
        self.metrics.membership_folds.inc();
        self.bump();
        None
    }

    fn fold_interval(&self) -> Duration {
        let proxies = self.metrics.proxies.get().max(0) as u32;
        FOLD_PER_PROXY.saturating_mul(proxies).min(FOLD_MAX)
    }

    /// Sends one event to every `/api/v1/events` listener.
    fn emit(&self, event: serde_json::Value) {
        let _ = self.events.send(event.to_string());
    }

    pub(crate) fn subscribe_events(&self) -> broadcast::Receiver<String> {
        self.events.subscribe()
    }

    /// The stable revision.
    pub(crate) fn revision(&self) -> u64 {
        self.machine.lock().stable
    }

    pub(crate) fn resources(&self) -> Vec<Resource> {
        let resources = self.machine.lock().resources.clone();
        resources.values().cloned().collect()
    }

    pub(crate) fn history(&self) -> Result<Vec<Revision>, StoreError> {
        self.store.history()
    }

    // --- the push path: registry, signals, plans ---

    /// Adds a proxy that opened a stream and proved it is its workload ([`crate::admission`]),
    /// with the identity it was admitted with; returns its connection number and id.
    pub(crate) fn register(&self, reg: &proto::Register, identity: String) -> Result<(u64, String), String> {
        let reg = proto::Register {
            services: self.by_name(reg.services.clone()),
            ..reg.clone()
        };
        let mut registry = self.registry.lock();
        let (conn, id) = registry.register(&reg, identity, self.clock.unix_ms())?;
        self.metrics.proxies.set(registry.proxies.len() as i64);
        drop(registry);
        tracing::info!(proxy = %id, inbound = %reg.inbound_addr, "proxy connected");
        self.bump_membership();
        Ok((conn, id))
    }

    pub(crate) fn unregister(&self, conn: u64) {
        let mut registry = self.registry.lock();
        if let Some(p) = registry.remove(conn) {
            tracing::info!(proxy = %p.id, "proxy disconnected");
        }
        self.metrics.proxies.set(registry.proxies.len() as i64);
        drop(registry);
        self.bump_membership();
    }

    /// New subscriptions change what the proxy is sent (and which intents treat it), so they
    /// are a change like any other.
    pub(crate) fn subscribe(&self, conn: u64, services: Vec<String>) {
        let services = self.by_name(services);
        self.registry.lock().subscribe(conn, services);
        self.bump_membership();
    }

    /// Subscriptions as `NAMESPACE/NAME`: a proxy asks by virtual IP for an address its app
    /// dialled without resolving it there; one no service holds is dropped.
    fn by_name(&self, services: Vec<String>) -> Vec<String> {
        services
            .into_iter()
            .filter_map(|s| match s.parse::<std::net::Ipv4Addr>() {
                Ok(ip) => self.vips.service_at(ip),
                Err(_) => Some(s),
            })
            .collect()
    }

    /// The config proxy `conn` needs now, planned from the snapshot of the current change
    /// generation (made here by the first stream that asks for it).
    pub(crate) fn config_for(&self, conn: u64) -> Option<PlannedConfig> {
        let snapshot = self.snapshot();
        let proxy = self.registry.lock().proxies.get(&conn)?.clone();
        let trust = Trust {
            bundle_pem: self.ca.bundle_pem(),
            generation: self.ca.generation(),
        };
        Some(snapshot.plan(conn, &proxy, trust))
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.publish_fold();
        let generation = *self.changed.borrow();
        let mut current = self.snapshot.lock();
        if current.generation != generation {
            *current = Arc::new(self.take_snapshot(generation));
        }
        current.clone()
    }

    /// Copies what planning reads, under the machine's and the registry's locks (no planning,
    /// no I/O there). Only running intents walk the proxies; otherwise the work is per service,
    /// not per proxy.
    fn take_snapshot(&self, generation: u64) -> Snapshot {
        let machine = self.machine.lock();
        let registry = self.registry.lock();
        let mut overlays = BTreeMap::new();
        let mut treats: HashMap<u64, Vec<u64>> = HashMap::new();
        for (seq, intent) in machine.records.iter().filter(|(_, i)| i.running()) {
            let mut treats_any = false;
            for (conn, p) in &registry.proxies {
                if intent.treats(p) {
                    treats.entry(*conn).or_default().push(*seq);
                    treats_any = true;
                }
            }
            if treats_any {
                let overlay = Overlay {
                    candidate: intent.candidate.unwrap_or(0),
                    entries: intent.overlay.clone(),
                };
                overlays.insert(*seq, overlay);
            }
        }
        Snapshot::new(
            generation,
            machine.stable,
            machine.resources.clone(),
            overlays,
            treats,
            machine.bypass.clone(),
            &registry,
            self.vips.clone(),
        )
    }

    /// While warming up, a proxy that resumed with a working config is not sent one that would
    /// leave any of its services without endpoints: those endpoints are most likely proxies
    /// that have not reconnected yet. Returns when to look again.
    pub(crate) fn hold(&self, conn: u64, cfg: &PlannedConfig) -> Option<Instant> {
        let until = self.started + WARMUP;
        if self.clock.now() >= until || !cfg.services.iter().any(|s| s.endpoints.endpoints.is_empty()) {
            return None;
        }
        self.registry.lock().proxies.get(&conn).is_some_and(|p| p.resumed).then_some(until)
    }

    pub(crate) fn pushed(&self, conn: u64, version: u64, included: BTreeSet<u64>, bundle_epoch: u64) {
        self.metrics.pushes.inc();
        self.registry.lock().pushed(conn, version, included, bundle_epoch, self.clock.now());
    }

    pub(crate) fn ack(&self, conn: u64, version: u64, revision: u64) {
        self.metrics.acks.inc();
        let took = self.registry.lock().ack(conn, version, revision, self.clock.now());
        if let Some(took) = took {
            self.metrics.push_to_ack.observe(took.as_secs_f64());
        }
        self.wake.notify_one();
    }

    pub(crate) fn nack(&self, conn: u64, version: u64, revision: u64, reason: String) {
        self.metrics.nacks.inc();
        self.registry.lock().nack(conn, version, revision, reason);
        self.wake.notify_one();
    }

    pub(crate) fn telemetry(&self, conn: u64, report: proto::TelemetryReport) {
        self.metrics.telemetry_reports.inc();
        let checked = check_report(&report);
        let from = {
            let mut registry = self.registry.lock();
            if let Err(e) = checked {
                // Counted as a report, but nothing of it is believed, not even its certificate.
                let proxy = registry.proxies.get(&conn).map(|p| p.id.clone()).unwrap_or_default();
                tracing::warn!(%proxy, field = %e.field, value = %e.value, reason = %e.message, "telemetry report refused");
                drop(registry);
                self.signals.lock().record(None, Vec::new(), self.clock.now());
                return;
            }
            registry.certificate(conn, report.cert_not_after_unix, report.cert_generation);
            registry.proxies.get(&conn).map(|p| Reporter {
                workload: p.workload_id().to_string(),
                namespace: p.namespace.clone(),
                service: p.service.clone(),
            })
        };
        let reporting = from.is_some();
        // A follower forwards what its proxies report to the leader, which judges on it.
        if let Some(f) = from.as_ref().filter(|_| matches!(*self.store, Store::Etcd(_)) && !self.leading()) {
            let forwarded = ForwardedReport::new(f.workload.clone(), f.namespace.clone(), f.service.clone(), report.stats.clone());
            self.outbox.lock().push(forwarded);
        }
        let (mut signals, now) = (self.signals.lock(), self.clock.now());
        if let (Some(f), Some(cost)) = (from.as_ref(), report.cost.as_ref()) {
            signals.costs.record(&f.workload, cost, &report.stats, now);
        }
        signals.record(from, report.stats, now);
        drop(signals);
        if reporting {
            self.wake.notify_one();
        }
    }

    pub(crate) fn proxies(&self) -> Vec<ProxyView> {
        let mut views = self.registry.lock().views();
        let (signals, now) = (self.signals.lock(), self.clock.now());
        for v in &mut views {
            v.cost = signals.costs.view([v.workload.as_str()], RATE_WINDOW, now);
        }
        views
    }

    /// Who calls whom over the last window ([`crate::graph`]).
    pub(crate) fn graph(&self) -> Vec<crate::graph::EdgeView> {
        let service_of: HashMap<String, String> = self
            .registry
            .lock()
            .proxies
            .values()
            .map(|p| (p.workload_id().to_string(), p.service.clone()))
            .collect();
        crate::graph::edges(&self.signals.lock(), &service_of, self.clock.now())
    }

    pub(crate) fn routes(&self) -> Vec<RouteView> {
        self.signals.lock().routes(self.clock.now())
    }

    pub(crate) fn status(&self) -> StatusView {
        let machine = self.machine.lock();
        let registry = self.registry.lock();
        let signals = self.signals.lock();
        let mut services: BTreeMap<(String, String), Vec<_>> = BTreeMap::new();
        for p in registry.proxies.values() {
            services.entry((p.namespace.clone(), p.service.clone())).or_default().push(p);
        }
        for r in machine.resources.values() {
            services
                .entry((r.metadata().namespace.clone(), r.service().to_string()))
                .or_default();
        }
        let now = self.clock.now();
        let views = services
            .into_iter()
            .map(|((namespace, name), proxies)| {
                let traffic = signals.traffic(&namespace, &name, now);
                let (requests, errors) = (traffic.requests, traffic.errors);
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
                    p99_ms: quantile_ms(&traffic.buckets, 0.99).map(round2),
                    sidecars: signals.costs.view(proxies.iter().map(|p| p.workload_id()), RATE_WINDOW, now),
                    policy_revision: proxies.iter().map(|p| p.applied_revision).min().unwrap_or(0),
                    mtls: match mtls_mode(&machine.resources, &namespace, &name) {
                        Some(MtlsMode::Strict) => "strict",
                        Some(MtlsMode::Off) => "off",
                        _ => "permissive",
                    },
                    mtls_share: if requests == 0 {
                        None
                    } else {
                        Some(round2(100.0 * traffic.mtls as f64 / requests as f64))
                    },
                    bypass: machine.bypass.contains(&(namespace.clone(), name.clone())),
                    proxies: ProxyCount {
                        total: proxies.len(),
                        in_sync: proxies
                            .iter()
                            .filter(|p| p.applied_revision == machine.assigned_revision(p))
                            .count(),
                    },
                    name,
                    namespace,
                }
            })
            .collect();
        StatusView {
            control_plane: self.control_plane(),
            revision: machine.stable,
            loop_: machine.loop_view(),
            telemetry_signals: signals.reports,
            services: views,
        }
    }

    // --- leadership ---

    pub(crate) fn control_plane(&self) -> ControlPlaneView {
        let role = self.role.lock().clone();
        let version = weft_core::version::version();
        let mut replicas = self.peer_versions.lock().clone();
        replicas.insert(self.replica.clone(), version.clone());
        ControlPlaneView {
            replica: self.replica.clone(),
            role: if role.acting() { "leader" } else { "follower" },
            leader: role.leader,
            store: self.store.describe(),
            version,
            replicas,
        }
    }

    /// Names this replica (`--replica`); on the embedded store it is also the leader.
    pub(crate) fn set_replica(&mut self, name: String) {
        let role = self.role.get_mut();
        if role.leading {
            role.leader = Some(name.clone());
        }
        self.replica = name;
    }

    /// Where other replicas reach this one's API: `scheme://addr`, unless `addr` is a wildcard.
    pub(crate) fn set_api_addr(&mut self, addr: std::net::SocketAddr, tls: bool) {
        let scheme = if tls { "https" } else { "http" };
        self.api_url = (!addr.ip().is_unspecified()).then(|| format!("{scheme}://{addr}"));
    }

    pub(crate) fn leading(&self) -> bool {
        self.role.lock().acting()
    }

    /// Refuses a change on a follower, naming the leader.
    fn require_leader(&self) -> Result<(), StoreError> {
        let role = self.role.lock();
        if role.acting() {
            return Ok(());
        }
        Err(StoreError::NotLeader(match &role.leader {
            Some(leader) => format!("send it to the leader, replica {leader}"),
            None => "no leader is elected right now (is etcd reachable with quorum?); try again shortly".into(),
        }))
    }

    /// Elected: takes the machine over from the store as [`Machine::recover`] does (a rollout
    /// the old leader left mid-way is rolled back, its proxies return to stable), then runs
    /// the intent loop and rotation. The fence is set first, so these writes are fenced too.
    pub(crate) fn lead(&self, until: Instant) -> Result<(), StoreError> {
        let machine = Machine::recover(&self.store, self.clock.unix_ms())?;
        self.metrics.revision.set(machine.stable as i64);
        *self.machine.lock() = machine;
        *self.role.lock() = Role {
            leading: true,
            leader: Some(self.replica.clone()),
            until: Some(until),
        };
        self.bump();
        self.wake.notify_one();
        Ok(())
    }

    /// Not (or no longer) leading: `leader` leads, if anyone does. Stops acting at once.
    pub(crate) fn follow(&self, leader: Option<String>) {
        *self.role.lock() = Role {
            leading: false,
            leader,
            until: None,
        };
        // A follower judges nothing: its samples need not reach back to any baseline (the
        // machine's passes, which set this, run only while leading).
        self.signals.lock().keep_from(None);
    }

    /// The leader's lease was renewed: it acts until `until`.
    pub(crate) fn renewed(&self, until: Instant) {
        self.role.lock().until = Some(until);
    }

    /// A follower catching up with the store after it changed (the watch says so): the
    /// machine as stored, then every proxy is replanned.
    pub(crate) fn reload(&self) -> Result<(), StoreError> {
        if self.leading() {
            return Ok(());
        }
        match self.ca.reload(&self.store) {
            Ok(true) => tracing::info!("followed the leader's root rotation"),
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "cannot follow the leader's root rotation"),
        }
        let machine = Machine::load(&self.store)?;
        {
            let mut current = self.machine.lock();
            // Elected meanwhile: the machine is this replica's own now.
            if self.leading() {
                return Ok(());
            }
            self.metrics.revision.set(machine.stable as i64);
            *current = machine;
        }
        self.bump();
        Ok(())
    }

    // --- the other replicas ---

    /// The proxies connected to this replica, to publish to the others.
    pub(crate) fn local_proxies(&self) -> Vec<PeerProxy> {
        self.registry.lock().local()
    }

    /// What replica `peer` published of its proxies: every stream replans when a proxy came,
    /// went or calls something new; an ACK only wakes the intent loop (a replan of every stream
    /// per ACK published would be a storm with many proxies).
    pub(crate) fn set_peer(&self, peer: &str, proxies: Vec<PeerProxy>) {
        if self.registry.lock().set_peer(peer, proxies) {
            self.bump();
        }
        self.wake.notify_one();
    }

    /// The version replica `peer` published (none: it is gone).
    pub(crate) fn set_peer_version(&self, peer: &str, version: Option<String>) {
        let mut versions = self.peer_versions.lock();
        match version {
            Some(version) => versions.insert(peer.to_string(), version),
            None => versions.remove(peer),
        };
    }

    /// Telemetry reports received since the last call, for the leader (a follower's own).
    pub(crate) fn take_outbox(&self) -> Vec<ForwardedReport> {
        std::mem::take(&mut *self.outbox.lock())
    }

    /// Reports another replica forwarded: filed as if their proxies were connected here.
    pub(crate) fn peer_telemetry(&self, reports: Vec<ForwardedReport>) {
        let now = self.clock.now();
        let mut signals = self.signals.lock();
        for r in reports {
            let stats = r.stats();
            let from = Reporter {
                workload: r.workload,
                namespace: r.namespace,
                service: r.service,
            };
            signals.record(Some(from), stats, now);
        }
        drop(signals);
        self.wake.notify_one();
    }

    // --- the intent machine ---

    /// Runs `f` as one pass of the machine, then acts on what it decided once the machine's
    /// lock is released.
    fn with_machine<T>(&self, f: impl FnOnce(&mut Step<'_>) -> T) -> T {
        let mut machine = self.machine.lock();
        let registry = self.registry.lock();
        let mut signals = self.signals.lock();
        let mut step = machine.pass(&registry.proxies, &signals, self.clock.now(), self.clock.unix_ms());
        let out = f(&mut step);
        let events = std::mem::take(&mut step.events);
        signals.keep_from(machine.oldest_evidence());
        drop(signals);
        drop(registry);
        self.settle(machine, events);
        out
    }

    /// Releases the machine and acts on `events`: records are written under `writes`, taken
    /// before the machine is released, so they reach the store in the order decided.
    fn settle(&self, machine: MutexGuard<'_, Machine>, events: Vec<Event>) {
        let writes = self.writes.lock();
        drop(machine);
        for event in events {
            match event {
                Event::Emit(value) => self.emit(value),
                Event::Changed => self.bump(),
                Event::Wake => self.wake.notify_one(),
                Event::Decided(outcome) => {
                    self.metrics.decisions.get_or_create(&OutcomeLabel { outcome }).inc();
                }
                Event::Stable(revision) => {
                    self.metrics.revision.set(revision as i64);
                }
                Event::Persist(seq, json) => {
                    if let Err(error) = self.store.put_intent(seq, &json) {
                        tracing::error!(seq, %error, "cannot persist intent");
                    }
                }
            }
        }
        drop(writes);
    }

    /// Advances every unfinished intent as far as it can go now. The store is written before
    /// the pass (candidate numbers for intents that can start) and after it (promoted
    /// revisions), never while the registry or the machine is locked.
    fn step(&self) {
        let startable = self.machine.lock().startable();
        let mut reserved = Vec::with_capacity(startable);
        for _ in 0..startable {
            match self.store.reserve() {
                Ok(c) => reserved.push(c),
                Err(error) => {
                    tracing::error!(%error, "cannot reserve a revision; intent stays queued");
                    break;
                }
            }
        }
        // The earliest intent starts with the lowest number.
        reserved.reverse();
        let commits = self.with_machine(|step| {
            step.reserved = reserved;
            step.step();
            std::mem::take(&mut step.commits)
        });
        for commit in commits {
            let stored = self
                .store
                .commit_at(commit.candidate, commit.summary.clone(), commit.changes.clone(), &commit.next);
            self.with_machine(|step| step.committed(commit, stored));
        }
    }

    pub(crate) fn submit_intent(&self, doc: Document<IntentSpec>, source: &str) -> Result<IntentRecord, ChangeError> {
        self.require_leader()?;
        self.with_machine(|step| step.submit_intent(doc, source))
    }

    pub(crate) fn submit_change(
        &self,
        title: String,
        apply: Vec<Resource>,
        delete: Vec<ResourceKey>,
        source: &str,
    ) -> Result<Submitted, ChangeError> {
        self.require_leader()?;
        self.with_machine(|step| step.submit_change(title, apply, delete, source))
    }

    /// What only the live mesh can find wrong (a subset no workload has, a second TrafficPolicy
    /// for a service) in resources that already failed their own checks, each at its document's
    /// prefix: so a refusal names every problem at once, not one kind of them.
    pub(crate) fn live_problems(&self, apply: &[(String, Resource)]) -> Vec<weft_api::error::FieldError> {
        self.with_machine(|step| step.live_problems(apply))
    }

    /// A rollback to revision `rev`: an intent whose change restores that revision's resources.
    pub(crate) fn submit_rollback(&self, rev: u64) -> Result<Submitted, ChangeError> {
        self.require_leader()?;
        let Some(old) = self.store.get(rev)? else {
            let error = weft_api::error::FieldError::new("revision", rev, "no such revision");
            return Err(weft_api::error::Invalid::one("rollback", error).into());
        };
        let target: BTreeMap<ResourceKey, Resource> = old.resources.into_iter().map(|r| (r.key(), r)).collect();
        let title = format!("rollback to revision {rev}");
        let source = format!("weft rollback {rev}");
        self.with_machine(|step| {
            let delete: Vec<ResourceKey> = step.m.resources.keys().filter(|k| !target.contains_key(k)).cloned().collect();
            step.submit_change(title, target.into_values().collect(), delete, &source)
        })
    }

    pub(crate) fn intent(&self, id: &str) -> Option<IntentRecord> {
        self.machine.lock().records.values().find(|i| i.id == id).cloned()
    }

    pub(crate) fn intent_list(&self) -> Vec<IntentRecord> {
        self.machine.lock().records.values().cloned().collect()
    }

    /// How many workloads each of intent `id`'s namespace stages names, now (see
    /// [`crate::intents::Machine::stage_proxies`]).
    pub(crate) fn stage_proxies(&self, id: &str) -> Vec<Option<usize>> {
        let machine = self.machine.lock();
        let registry = self.registry.lock();
        let seq = machine.seq_of(id).ok();
        seq.map(|seq| machine.stage_proxies(seq, &registry.proxies)).unwrap_or_default()
    }

    /// What keeps intent `id` queued, if it is queued behind something.
    pub(crate) fn blocker(&self, id: &str) -> Option<Blocker> {
        let machine = self.machine.lock();
        let seq = machine.seq_of(id).ok()?;
        machine.blocker_of(seq)
    }

    /// Sets the intents-by-phase gauges (before a scrape).
    pub(crate) fn count_intents(&self) {
        let machine = self.machine.lock();
        for phase in [
            Phase::Queued,
            Phase::AwaitingApproval,
            Phase::Distribution,
            Phase::Enforcement,
            Phase::Observation,
            Phase::Promoted,
            Phase::RolledBack,
            Phase::Failed,
        ] {
            let n = machine.records.values().filter(|i| i.phase == phase).count();
            self.metrics
                .intents
                .get_or_create(&PhaseLabel { phase: phase.as_str() })
                .set(n as i64);
        }
    }

    /// Lets a manual intent start its next stage (the dashboard's "step").
    pub(crate) fn approve(&self, id: &str, actor: &str) -> Result<IntentRecord, ChangeError> {
        self.require_leader()?;
        let view = self.with_machine(|step| step.approve(id))?;
        self.operator_ledger(actor, "approve", id);
        Ok(view)
    }

    /// Switches an open intent between auto and manual.
    pub(crate) fn set_mode(&self, id: &str, mode: RolloutMode, actor: &str) -> Result<IntentRecord, ChangeError> {
        self.require_leader()?;
        let view = self.with_machine(|step| step.set_mode(id, mode))?;
        let label = if mode == RolloutMode::Auto { "auto" } else { "manual" };
        self.operator_ledger(actor, &format!("mode {label}"), id);
        Ok(view)
    }

    /// Rolls an intent back (or cancels it while queued).
    pub(crate) fn abort(&self, id: &str, actor: &str) -> Result<IntentRecord, ChangeError> {
        self.require_leader()?;
        let view = self.with_machine(|step| step.abort(id))?;
        self.operator_ledger(actor, "abort", id);
        Ok(view)
    }

    /// Freeze: every rollout in progress is rolled back and none starts until it is lifted.
    /// Stored first (it outlives a restart): when the store refuses, nothing changes.
    pub(crate) fn freeze(&self, on: bool, actor: &str) -> Result<(), StoreError> {
        self.require_leader()?;
        let _switch = self.switches.lock();
        self.store.put_state(FREEZE_STATE, if on { "true" } else { "false" })?;
        self.with_machine(|step| step.freeze(on));
        self.operator_ledger(actor, if on { "freeze on" } else { "freeze off" }, "mesh");
        Ok(())
    }

    /// The kill switch (what it turns off: [`Step::set_bypass`]). Stored first, like the freeze.
    pub(crate) fn set_bypass(&self, namespace: &str, service: &str, on: bool, actor: &str) -> Result<(), StoreError> {
        self.require_leader()?;
        let _switch = self.switches.lock();
        let mut bypass = self.machine.lock().bypass.clone();
        let key = (namespace.to_string(), service.to_string());
        if on {
            bypass.insert(key);
        } else {
            bypass.remove(&key);
        }
        self.store
            .put_state(BYPASS_STATE, &serde_json::to_string(&bypass).expect("serializes"))?;
        self.with_machine(|step| step.set_bypass(namespace, service, on));
        self.operator_ledger(
            actor,
            if on { "bypass on" } else { "bypass off" },
            &format!("{namespace}/{service}"),
        );
        Ok(())
    }

    /// Records an operator's action; `actor` is the name of the API token that asked for it.
    fn operator_ledger(&self, actor: &str, action: &str, subject: &str) {
        let entry = json!({"timeMs": self.clock.unix_ms(), "actor": actor, "action": action, "subject": subject});
        if let Err(error) = self.store.append_ledger(&entry.to_string()) {
            tracing::error!(%error, "cannot write the ledger");
        }
        tracing::info!(actor, action, subject, "operator action");
    }

    pub(crate) fn ledger(&self, limit: usize) -> Result<Vec<serde_json::Value>, StoreError> {
        Ok(self
            .store
            .ledger(limit)?
            .iter()
            .filter_map(|s| serde_json::from_str(s).ok())
            .collect())
    }

    /// Waits until intent `id` has finished or is known to wait behind something (which may
    /// take hours: an intent awaiting approval), up to `within`.
    pub(crate) async fn wait_settled(&self, id: &str, within: Duration) -> Option<(IntentRecord, Option<Blocker>)> {
        let deadline = Instant::now() + within;
        loop {
            let intent = self.intent(id)?;
            let blocker = self.blocker(id);
            if intent.phase.is_terminal() || blocker.is_some() || Instant::now() >= deadline {
                return Some((intent, blocker));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    // --- the CA ---

    /// Starts a root rotation (see [`crate::ca::Rotation`]).
    pub(crate) fn rotate_root(&self) -> Result<(), CaError> {
        self.require_leader()?;
        self.ca.rotate(&self.store)?;
        self.emit(json!({"type": "ca", "rotation": "distributing"}));
        self.bump();
        Ok(())
    }

    /// Advances a root rotation: the new root signs once every proxy trusts it; the old root is
    /// dropped once every workload holds a leaf of the new one.
    fn rotation_step(&self) {
        let rotation = self.ca.rotation();
        if rotation == Rotation::Idle {
            return;
        }
        let ready = {
            let registry = self.registry.lock();
            match rotation {
                Rotation::Distributing => {
                    self.ca.bundle_age() >= ROOT_OVERLAP && registry.proxies.values().all(|p| p.bundle_epoch >= self.ca.bundle_epoch())
                }
                // What proxies report they use, not what was issued: a proxy may install its
                // new certificate a little after the CA signed it.
                Rotation::Reissuing => {
                    let generation = self.ca.generation();
                    registry
                        .proxies
                        .values()
                        .all(|p| p.cert_generation.is_some_and(|g| g >= generation))
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
                self.emit(json!({"type": "ca", "rotation": format!("{:?}", self.ca.rotation()).to_lowercase()}));
                self.bump();
            }
            Err(error) => tracing::error!(%error, "root rotation step failed"),
        }
    }
}

/// Runs the intent loop until shutdown: a step on every wake-up and on a short tick for timers.
pub(crate) async fn run_intents(mesh: Arc<Mesh>, shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = mesh.wake.notified() => {}
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.cancelled() => return,
        }
        if mesh.leading() {
            mesh.step();
        }
        // A pass reads every proxy: the ACKs of a fleet arriving together make a pass per
        // interval, not one each (a wake-up meanwhile is kept for the next pass).
        tokio::select! {
            _ = tokio::time::sleep(STEP_INTERVAL) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Publishes folded membership changes when their interval ends, until shutdown.
pub(crate) async fn run_folds(mesh: Arc<Mesh>, shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = mesh.fold_due.notified() => {}
            _ = shutdown.cancelled() => return,
        }
        while let Some(due) = mesh.publish_fold() {
            tokio::select! {
                _ = tokio::time::sleep_until(due.into()) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// Runs root rotation until shutdown: its own task, so a slow rotation step (it writes the
/// store) never holds up the intent loop, and the loop never drives the CA.
pub(crate) async fn run_rotation(mesh: Arc<Mesh>, shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.cancelled() => return,
        }
        if mesh.leading() {
            mesh.rotation_step();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intents::Submitted;

    fn mesh(clock: Clock) -> (Mesh, std::path::PathBuf) {
        let mut b = [0u8; 4];
        aws_lc_rs::rand::fill(&mut b).unwrap();
        let dir = std::env::temp_dir().join(format!("weft-mesh-{}-{}", std::process::id(), u32::from_le_bytes(b)));
        let store = Store::open(&dir).unwrap();
        let ca = Ca::open(&store, "weft.local", Duration::from_secs(3600), None).unwrap();
        let metrics = ControlMetrics::register(&mut prometheus_client::registry::Registry::default());
        (Mesh::with_clock(Arc::new(store), ca, metrics, clock).unwrap(), dir)
    }

    /// A proxy of `name` (its own service) calling `calls`; returns its connection.
    fn register(mesh: &Mesh, name: &str, port: u16, calls: &[&str]) -> u64 {
        let reg = proto::Register {
            namespace: "default".into(),
            name: name.into(),
            inbound_addr: format!("127.0.0.1:{port}"),
            services: calls.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        mesh.register(&reg, format!("spiffe://weft.local/ns/default/sa/{name}")).unwrap().0
    }

    /// Queues a plain change of the `orders` TrafficPolicy; returns the intent's id.
    fn change_orders(mesh: &Mesh) -> String {
        let yaml = "apiVersion: weft/v1\nkind: TrafficPolicy\nmetadata: {name: orders}\nspec: {service: orders, routes: [{timeout: 1s}]}\n";
        let policy = weft_api::resource::parse_resources(yaml, "test").unwrap();
        match mesh.submit_change("orders timeout".into(), policy, Vec::new(), "test").unwrap() {
            Submitted::Queued { id, .. } => id,
            other => panic!("expected a queued intent, got {other:?}"),
        }
    }

    fn phase(mesh: &Mesh, id: &str) -> Phase {
        mesh.intent(id).unwrap().phase
    }

    #[test]
    fn a_stage_nobody_acks_fails_when_the_enforcement_timeout_passes_on_the_clock() {
        let clock = Clock::manual();
        let (mesh, dir) = mesh(clock.clone());
        let web = register(&mesh, "web", 4001, &["orders"]);
        register(&mesh, "orders", 4002, &[]);
        let id = change_orders(&mesh);
        mesh.step();
        assert_eq!(phase(&mesh, &id), Phase::Enforcement);
        assert_eq!(mesh.config_for(web).unwrap().included.len(), 1, "web is sent the candidate");
        clock.advance(Duration::from_secs(15));
        mesh.step();
        assert_eq!(phase(&mesh, &id), Phase::Enforcement, "15 s is the limit, not past it");
        clock.advance(Duration::from_millis(1));
        mesh.step();
        let intent = mesh.intent(&id).unwrap();
        assert_eq!(intent.phase, Phase::Failed);
        let reason = &intent.decisions.last().unwrap().reason;
        assert!(reason.contains("no ACK within 15s from default/web#1"), "{reason}");
        assert_eq!(mesh.config_for(web).unwrap().included.len(), 0, "web is back on stable");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_acked_change_is_promoted_and_every_proxy_is_planned_from_the_new_stable() {
        let (mesh, dir) = mesh(Clock::manual());
        let web = register(&mesh, "web", 4001, &["orders"]);
        let orders = register(&mesh, "orders", 4002, &[]);
        let before = mesh.revision();
        let id = change_orders(&mesh);
        mesh.step();
        let planned = mesh.config_for(web).unwrap();
        let candidate = planned.message(1).revision;
        assert!(candidate > before, "the candidate {candidate} is a new revision (stable {before})");
        mesh.pushed(web, 1, planned.included, 0);
        mesh.ack(web, 1, candidate);
        mesh.step();
        assert_eq!(phase(&mesh, &id), Phase::Promoted);
        assert_eq!(mesh.revision(), candidate);
        let web_config = mesh.config_for(web).unwrap().message(2);
        assert_eq!(web_config.revision, candidate);
        assert!(
            web_config.services[0].traffic_policy_json.contains("\"timeout\""),
            "{:?}",
            web_config.services[0]
        );
        assert_eq!(mesh.config_for(orders).unwrap().message(1).revision, candidate);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn report(requests: u64, errors: u64) -> proto::proxy_message::Msg {
        proto::proxy_message::Msg::Telemetry(proto::TelemetryReport {
            interval_ms: 1000,
            stats: vec![proto::TrafficStats {
                direction: proto::Direction::Outbound as i32,
                service: "payments".into(),
                requests,
                errors,
                route: "default".into(),
                latency_slots: vec![100, 200],
                latency_counts: vec![requests / 2, requests - requests / 2],
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    /// Found by the `proxy_message` fuzz target: a report with more errors than requests
    /// reached `weft top`'s view, whose success count (requests - errors) underflowed: a panic
    /// in a debug build, a success rate of about 1.8e19 % in a release build.
    #[test]
    fn a_telemetry_report_with_more_errors_than_requests_is_refused_and_changes_nothing() {
        use crate::distribution::{Follow, receive};
        let (mesh, dir) = mesh(Clock::manual());
        let orders = register(&mesh, "orders", 4001, &["payments"]);
        assert_eq!(receive(&mesh, orders, report(10, 11)).ok(), Some(Follow::Nothing));
        assert!(mesh.routes().is_empty(), "a contradictory report was recorded: {:?}", mesh.routes());
        assert_eq!(mesh.signals.lock().reports, 1, "a refused report still counts as received");

        receive(&mesh, orders, report(10, 1)).expect("a report is received");
        let routes = serde_json::to_value(mesh.routes()).unwrap();
        assert_eq!(routes.as_array().unwrap().len(), 1, "{routes}");
        assert_eq!(routes[0]["successRate"], 90.0);

        // Totals past u64::MAX saturate rather than wrap.
        receive(&mesh, orders, report(u64::MAX, 0)).expect("a report is received");
        receive(&mesh, orders, report(u64::MAX, 0)).expect("a report is received");
        let routes = serde_json::to_value(mesh.routes()).unwrap();
        assert_eq!(routes[0]["successRate"], 100.0, "{routes}");
        assert!(routes[0]["p99Ms"].as_f64().is_some_and(f64::is_finite), "{routes}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

//! The intent loop: every change is an intent that goes queued -> distribution -> enforcement
//! -> observation -> promoted | rolled-back | failed. A running intent's change is an *overlay*
//! on the stable resources; the proxies its current stage treats get stable + overlay, every
//! other proxy stays on stable (last-known-good). `step` advances every intent; it runs on every
//! ACK, NACK, telemetry report and operator action, and on a short tick for timers.
//!
//! The machine owns the intents and the stable resources. It reads the registry and the signals
//! and tells its caller what happened as [`Event`]s (persist this record, replan, tell the
//! dashboard) rather than reaching back into the mesh.

use crate::cost::CostChange;
use crate::plan::{Kind, OverlayEntry};
use crate::registry::ProxyRecord;
use crate::rollout::{self, Drift, Evidence, Phase, Split, Verdict};
use crate::signals::{Sample, Signals};
use crate::staging;
use crate::store::{ChangeEntry, Revision, Store, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_api::ResourceKey;
use weft_api::error::{FieldError, Invalid};
use weft_api::mesh::SUBSET_LABEL;
use weft_api::proto::Direction;
use weft_api::resource::{Document, IntentSpec, MtlsMode, OnInconclusive, Resource, RolloutMode, Slo, Stage};

/// How long the treated proxies of a stage have to ACK before the intent fails.
const ENFORCEMENT_TIMEOUT: Duration = Duration::from_secs(15);
/// How far before an intent started its baseline looks.
const BASELINE_WINDOW: Duration = Duration::from_secs(60);
/// How far back a baseline may reach to gather [`BASELINE_WINDOW`] of reports when some in it
/// ran another intent's change that was rolled back (the signals keep samples back to it while
/// the intent runs: [`Machine::oldest_evidence`]).
const BASELINE_LOOKBACK: Duration = Duration::from_secs(100);
/// A stage without enough evidence after this many bakes (and the warm-up; never before
/// [`rollout::MIN_EVIDENCE_SPAN`], or a short bake would give up before latency can be judged)
/// is inconclusive and follows the SLO's `onInconclusive`.
const EVIDENCE_PATIENCE: u32 = 3;
/// A stage whose evidence suggests harm not yet shown ([`Verdict::Suspect`]: errors, latency
/// on too few reports, callers moving away) keeps watching for this many bakes (never less
/// than twice [`rollout::MIN_EVIDENCE_SPAN`]) before it is inconclusive: the tests that roll
/// back are always valid, so more looks add no false rollbacks (the traffic-shift test's
/// variance comes from the window before, so it is so only approximately), and the demo's +3%
/// errors at stage 1 show at 99% only after about half a minute of its traffic. A stage still
/// suspected then follows `onInconclusive`: under `rollback` that rolls back a stage that
/// would have passed at its bake before, on evidence that is suggestive only.
const SUSPICION_PATIENCE: u32 = 6;
/// Evidence of a stage starts one telemetry report after its proxies ACKed: the report that
/// spans the swap also holds whatever the swap itself cost (config pushes, ACKs and route
/// compilation competing for the CPU), which is warm-up, not the change. Treated and untreated
/// proxies skip the same span, so they stay comparable.
const WARM_UP: Duration = Duration::from_secs(2);
/// Most proxies a stage's ledger entry names.
const LEDGER_NAMES: usize = 20;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IntentRecord {
    pub id: String,
    pub seq: u64,
    pub title: String,
    pub target: String,
    pub namespace: String,
    pub scope: Option<String>,
    /// Where it came from: a file, `weft apply`, `weft rollback`, the API.
    pub source: String,
    pub mode: RolloutMode,
    pub stages: Vec<Stage>,
    pub bake_ms: u64,
    pub slo: Slo,
    pub apply: Vec<Resource>,
    pub delete: Vec<ResourceKey>,
    /// Services the change touches; intents on disjoint services run at once.
    pub services: BTreeSet<String>,
    pub phase: Phase,
    /// Index into `stages` of the current (or last) stage.
    pub stage: usize,
    /// Revision number of the candidate (reserved when the intent starts).
    pub candidate: Option<u64>,
    /// Revision committed when the intent was promoted.
    pub revision: Option<u64>,
    pub overlay: Vec<OverlayEntry>,
    /// Names of the routes a scoped change added; its treated evidence is those routes alone.
    #[serde(default)]
    pub routes: Vec<String>,
    /// Workloads (`ns/name`) the current stage treats.
    pub treated: BTreeSet<String>,
    /// The last stage (100%): every enforcing proxy, including ones that join later.
    pub treat_all: bool,
    /// An approval waiting to be used (manual mode).
    pub approved: bool,
    /// Held after an inconclusive stage (`onInconclusive: hold`): an approval promotes that
    /// stage instead of starting it again.
    #[serde(default)]
    pub held: bool,
    pub decisions: Vec<DecisionRecord>,
    pub ledger: Vec<LedgerEntry>,
    pub submitted_ms: u64,
    pub started_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    #[serde(skip)]
    timing: Timing,
    /// Promoted, with its revision being stored: no step or operator touches it meanwhile.
    #[serde(skip)]
    committing: bool,
}

/// What keeps a queued intent from starting.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase", tag = "by")]
pub enum Blocker {
    /// The earliest unfinished intent on one of its services; it starts once that one is
    /// finished (promoted, rolled back or failed).
    #[serde(rename_all = "camelCase")]
    Intent {
        id: String,
        phase: Phase,
        mode: RolloutMode,
        /// The services both touch.
        services: Vec<String>,
    },
    /// `weft freeze on`: nothing starts until it is off.
    Freeze,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DecisionRecord {
    pub time_ms: u64,
    /// 1-based stage number.
    pub stage: usize,
    /// The stage's percentage; none for a namespace stage.
    pub share: Option<f64>,
    /// The namespaces a namespace stage treats.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    pub outcome: String,
    pub reason: String,
    /// Whether the change moved sidecar CPU per request or added latency on the treated
    /// proxies (before vs during); absent without cost reports from them, and in records
    /// older than this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<CostChange>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LedgerEntry {
    pub time_ms: u64,
    /// A proxy id, or `operator` / `control-plane`.
    pub actor: String,
    pub event: String,
    pub detail: String,
}

#[derive(Clone, Debug, Default)]
struct Timing {
    started: Option<Instant>,
    stage_started: Option<Instant>,
    observe_started: Option<Instant>,
    /// The stage before this one: its evidence window and the workloads it treated. Its
    /// untreated proxies' traffic is the latest without the change, a reference for a stage
    /// with no untreated proxy beside it (see `rollout::judge`'s `recent`).
    previous: Option<(Instant, Instant, BTreeSet<String>)>,
}

/// What a submission of resources (`weft apply`, `delete`, `rollback`) became.
#[derive(Clone, Debug)]
pub(crate) enum Submitted {
    /// Nothing to change.
    Unchanged(Applied),
    Queued {
        id: String,
        changes: Vec<ChangeEntry>,
    },
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ChangeError {
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
pub(crate) struct Applied {
    pub(crate) revision: u64,
    pub(crate) changes: Vec<ChangeEntry>,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct LoopView {
    phase: &'static str,
    intent: Option<String>,
    mode: &'static str,
    last_decision: Option<String>,
    frozen: bool,
}

/// What the machine did that others must act on, in order.
#[derive(Debug)]
pub(crate) enum Event {
    /// One JSON object for the dashboard's `/api/v1/events`.
    Emit(serde_json::Value),
    /// What some proxy should run changed: every stream plans again.
    Changed,
    /// The loop should step again at once.
    Wake,
    /// A decision with this outcome was made (the decisions metric).
    Decided(&'static str),
    /// A new stable revision.
    Stable(u64),
    /// Intent `seq`'s record changed: store this JSON.
    Persist(u64, String),
}

/// The store's names for the operator switches that outlive a restart.
pub(crate) const FREEZE_STATE: &str = "freeze";
pub(crate) const BYPASS_STATE: &str = "bypass";

/// The intents and the stable resources they change.
pub(crate) struct Machine {
    /// The revision every untreated proxy runs, and its resources.
    pub(crate) stable: u64,
    pub(crate) resources: Arc<BTreeMap<ResourceKey, Resource>>,
    pub(crate) records: BTreeMap<u64, IntentRecord>,
    pub(crate) frozen: bool,
    /// Bypassed services, as (namespace, service).
    pub(crate) bypass: BTreeSet<(String, String)>,
    last_decision: Option<String>,
}

/// One pass of the machine: what it reads, and the events it produces.
pub(crate) struct Step<'a> {
    pub(crate) m: &'a mut Machine,
    proxies: &'a BTreeMap<u64, ProxyRecord>,
    signals: &'a Signals,
    now: Instant,
    now_ms: u64,
    /// Revision numbers reserved for intents that start in this pass.
    pub(crate) reserved: Vec<u64>,
    pub(crate) events: Vec<Event>,
    /// Promotions whose revision the caller stores once the machine is released.
    pub(crate) commits: Vec<Commit>,
}

/// A promoted candidate to store as the new stable revision.
pub(crate) struct Commit {
    seq: u64,
    pub(crate) candidate: u64,
    pub(crate) summary: String,
    pub(crate) changes: Vec<ChangeEntry>,
    pub(crate) next: BTreeMap<ResourceKey, Resource>,
    why: String,
}

// === impl IntentRecord ===

impl IntentRecord {
    pub(crate) fn running(&self) -> bool {
        !self.phase.is_terminal() && self.phase != Phase::Queued
    }

    /// Whether `p` runs this intent's candidate now.
    pub(crate) fn treats(&self, p: &ProxyRecord) -> bool {
        self.running() && !self.overlay.is_empty() && (self.treated.contains(p.workload_id()) || (self.treat_all && self.enforced_by(p)))
    }

    /// Whether `p` enforces this change: a caller of a service whose TrafficPolicy changes, or an
    /// instance of a service whose SecurityPolicy changes.
    fn enforced_by(&self, p: &ProxyRecord) -> bool {
        let own = p.namespace == self.namespace;
        self.overlay.iter().any(|e| match (Kind::of_key(&e.key), &e.resource) {
            // Callers in any namespace enforce the policy of a service they route to.
            (Some(Kind::TrafficPolicy), _) => p.subscribes_to(&self.namespace, &e.service),
            (_, Some(Resource::SecurityPolicy(d))) => {
                own && p.service == e.service && d.spec.selector.labels.iter().all(|(k, v)| p.labels.get(k) == Some(v))
            }
            _ => own && p.service == e.service,
        })
    }

    fn is_security(&self) -> bool {
        self.overlay.iter().all(|e| Kind::of_key(&e.key) == Some(Kind::SecurityPolicy))
    }

    /// The current (or last) stage.
    fn current(&self) -> Stage {
        self.stages.get(self.stage).cloned().unwrap_or(Stage::Percent(100.0))
    }

    /// A decision on the current stage, which it names.
    fn decision(&self, time_ms: u64, outcome: &str, reason: String, cost: Option<CostChange>) -> DecisionRecord {
        let stage = self.current();
        DecisionRecord {
            time_ms,
            stage: self.stage + 1,
            share: stage.percent(),
            namespaces: stage.namespaces().to_vec(),
            outcome: outcome.into(),
            reason,
            cost,
        }
    }

    fn log(&mut self, time_ms: u64, actor: &str, event: &str, detail: impl Into<String>) {
        self.ledger.push(LedgerEntry {
            time_ms,
            actor: actor.to_string(),
            event: event.to_string(),
            detail: detail.into(),
        });
    }

    /// The JSON the API shows.
    pub(crate) fn view(&self) -> serde_json::Value {
        json!(self)
    }
}

// === impl Machine ===

impl Machine {
    /// Loads the stable revision and the intents of an earlier run. An intent that was
    /// mid-rollout is rolled back: its candidate lived only in the proxies this control plane no
    /// longer tracks, and every proxy now gets the stable revision, so the fleet is never left
    /// on an unknown mix.
    pub(crate) fn recover(store: &Store, now_ms: u64) -> Result<Self, StoreError> {
        Self::read(store, Some(now_ms))
    }

    /// The machine as the leader left it in the store, changing nothing: how a follower
    /// replica follows (it plans its proxies from the leader's intents and stages).
    pub(crate) fn load(store: &Store) -> Result<Self, StoreError> {
        Self::read(store, None)
    }

    /// Reads the machine from `store`; `recover_at` (unix ms) also rolls back and re-queues
    /// intents as [`Machine::recover`] says, writing them back.
    fn read(store: &Store, recover_at: Option<u64>) -> Result<Self, StoreError> {
        let stable = match store.stable()? {
            Some(rev) => store.get(rev)?,
            None => store.latest()?,
        };
        let (stable, resources) = match stable {
            Some(r) => (r.revision, r.resources.into_iter().map(|res| (res.key(), res)).collect()),
            None => (0, BTreeMap::new()),
        };
        let mut records = BTreeMap::new();
        for (seq, json) in store.intents()? {
            let mut intent: IntentRecord = match serde_json::from_str(&json) {
                Ok(i) => i,
                Err(error) => {
                    tracing::error!(seq, %error, "unreadable intent record; skipped");
                    continue;
                }
            };
            let Some(now_ms) = recover_at else {
                records.insert(seq, intent);
                continue;
            };
            let untouched = intent.phase == Phase::Queued || (intent.phase == Phase::AwaitingApproval && intent.stage == 0 && !intent.held);
            if untouched && intent.phase != Phase::Queued {
                intent.phase = Phase::Queued;
                intent.overlay.clear();
                intent.candidate = None;
                store.put_intent(seq, &serde_json::to_string(&intent).expect("serializes"))?;
            } else if !intent.phase.is_terminal() && !untouched {
                let reason = format!("control plane restarted mid-rollout: every proxy returned to revision {stable}");
                intent.decisions.push(intent.decision(now_ms, "rolled-back", reason, None));
                intent.phase = Phase::RolledBack;
                intent.treated.clear();
                intent.treat_all = false;
                intent.finished_ms = Some(now_ms);
                store.put_intent(seq, &serde_json::to_string(&intent).expect("serializes"))?;
            }
            records.insert(seq, intent);
        }
        let frozen = store.state(FREEZE_STATE)?.as_deref() == Some("true");
        let bypass = match store.state(BYPASS_STATE)? {
            Some(json) => serde_json::from_str(&json).map_err(|e| StoreError::Db(format!("the stored bypass list is unreadable: {e}")))?,
            None => BTreeSet::new(),
        };
        Ok(Self {
            stable,
            resources: Arc::new(resources),
            records,
            frozen,
            bypass,
            last_decision: None,
        })
    }

    pub(crate) fn seq_of(&self, id: &str) -> Result<u64, ChangeError> {
        self.records
            .iter()
            .find(|(_, i)| i.id == id)
            .map(|(s, _)| *s)
            .ok_or_else(|| ChangeError::NotFound(format!("intent {id}")))
    }

    /// The oldest report an intent started and not ended may still read: its baseline's reach
    /// before it started ([`BASELINE_LOOKBACK`]). The signals keep samples back to it. An
    /// intent waiting for a person between stages (manual mode, or a held stage) counts: its
    /// next stage reads the same baseline.
    pub(crate) fn oldest_evidence(&self) -> Option<Instant> {
        self.records
            .values()
            .filter(|r| !r.phase.is_terminal())
            .filter_map(|r| r.timing.started)
            .min()
            .map(|started| started.checked_sub(BASELINE_LOOKBACK).unwrap_or(started))
    }

    /// One pass over the machine with the registry's proxies (and the signals, which only
    /// judging reads).
    pub(crate) fn pass<'a>(
        &'a mut self,
        proxies: &'a BTreeMap<u64, ProxyRecord>,
        signals: &'a Signals,
        now: Instant,
        now_ms: u64,
    ) -> Step<'a> {
        Step {
            m: self,
            proxies,
            signals,
            now,
            now_ms,
            reserved: Vec::new(),
            events: Vec::new(),
            commits: Vec::new(),
        }
    }

    /// How many queued intents could start now: the revision numbers to reserve before the
    /// next pass, so the pass itself writes nothing to the store.
    pub(crate) fn startable(&self) -> usize {
        self.records
            .iter()
            .filter(|(seq, i)| i.phase == Phase::Queued && self.blocker_of(**seq).is_none())
            .count()
    }

    /// The revision `p` should be running: stable, or the candidate of an intent treating it.
    pub(crate) fn assigned_revision(&self, p: &ProxyRecord) -> u64 {
        self.records
            .values()
            .filter(|i| i.treats(p))
            .filter_map(|i| i.candidate)
            .fold(self.stable, u64::max)
    }

    /// Every other intent's candidate revision that ended without being promoted (rolled back,
    /// aborted, failed): reports made under one show a change that never became how the
    /// service runs (see [`evidence`]). A running intent's is not among them: intents that run
    /// together touch disjoint services, and its proxies' traffic to this one is as it runs.
    fn unpromoted_candidates(&self, seq: u64) -> BTreeSet<u64> {
        self.records
            .iter()
            .filter(|(s, i)| **s != seq && matches!(i.phase, Phase::RolledBack | Phase::Failed))
            .filter_map(|(_, i)| i.candidate)
            .collect()
    }

    pub(crate) fn loop_view(&self) -> LoopView {
        let current = self.records.values().find(|i| i.running());
        LoopView {
            phase: current.map(|i| i.phase.as_str()).unwrap_or("idle"),
            intent: current.map(|i| i.id.clone()),
            mode: match current.map(|i| i.mode) {
                Some(RolloutMode::Manual) => "manual",
                _ => "auto",
            },
            last_decision: self.last_decision.clone(),
            frozen: self.frozen,
        }
    }

    /// What keeps queued intent `seq` from starting now: an earlier unfinished intent on one
    /// of its services (intents on disjoint services run at once), else the freeze.
    pub(crate) fn blocker_of(&self, seq: u64) -> Option<Blocker> {
        let intent = self.records.get(&seq).filter(|i| i.phase == Phase::Queued)?;
        let earlier = self
            .records
            .range(..seq)
            .map(|(_, o)| o)
            .find(|o| !o.phase.is_terminal() && !o.services.is_disjoint(&intent.services));
        match earlier {
            Some(o) => Some(Blocker::Intent {
                id: o.id.clone(),
                phase: o.phase,
                mode: o.mode,
                services: o.services.intersection(&intent.services).cloned().collect(),
            }),
            None => self.frozen.then_some(Blocker::Freeze),
        }
    }

    /// How many workloads each namespace stage of intent `seq` names (`None` for a percent
    /// stage): the connected proxies in its namespaces that enforce the change, as the stage
    /// would treat them now. What the intent page shows beside the namespace.
    pub(crate) fn stage_proxies(&self, seq: u64, proxies: &BTreeMap<u64, ProxyRecord>) -> Vec<Option<usize>> {
        let Some(intent) = self.records.get(&seq) else {
            return Vec::new();
        };
        let probe = with_overlay(&self.resources, intent);
        intent
            .stages
            .iter()
            .map(|stage| {
                let namespaces = stage.namespaces();
                (!namespaces.is_empty()).then(|| {
                    proxies
                        .values()
                        .filter(|p| namespaces.contains(&p.namespace) && probe.enforced_by(p))
                        .map(ProxyRecord::workload_id)
                        .collect::<BTreeSet<_>>()
                        .len()
                })
            })
            .collect()
    }
}

/// `intent` with its overlay: its own once it started, else the one it would start with now
/// (a queued intent's overlay is built when it starts), so the proxies it concerns can be told.
fn with_overlay<'a>(resources: &BTreeMap<ResourceKey, Resource>, intent: &'a IntentRecord) -> Cow<'a, IntentRecord> {
    if !intent.overlay.is_empty() {
        return Cow::Borrowed(intent);
    }
    let mut probe = intent.clone();
    probe.overlay = overlay_of(resources, intent).0;
    Cow::Owned(probe)
}

// === impl Step: submissions and operator controls ===

impl Step<'_> {
    fn emit(&mut self, event: serde_json::Value) {
        self.events.push(Event::Emit(event));
    }

    fn bump(&mut self) {
        self.events.push(Event::Changed);
    }

    fn wake(&mut self) {
        self.events.push(Event::Wake);
    }

    fn decided(&mut self, outcome: &'static str) {
        self.events.push(Event::Decided(outcome));
    }

    fn persist(&mut self, seq: u64) {
        if let Some(i) = self.m.records.get(&seq) {
            let json = serde_json::to_string(i).expect("intent serializes");
            self.events.push(Event::Persist(seq, json));
        }
    }

    /// Queues an intent written by a user. Validated whole, like a resource; nothing is queued
    /// when anything is wrong.
    pub(crate) fn submit_intent(&mut self, doc: Document<IntentSpec>, source: &str) -> Result<IntentRecord, ChangeError> {
        let spec = &doc.spec;
        let apply = spec.resources().map_err(|errors| Invalid::new(source, errors))?;
        if !doc.metadata.name.is_empty() && self.m.records.values().any(|i| i.id == doc.metadata.name) {
            return Err(ChangeError::Conflict(format!("intent {} already exists", doc.metadata.name)));
        }
        self.validate_change(&apply, &spec.change.delete, source, "spec.change.apply")?;
        let record = self.new_record(
            doc.metadata.name.clone(),
            spec.title.clone(),
            spec.target.clone(),
            doc.metadata.namespace.clone(),
            spec.scope.clone(),
            source,
            (
                spec.rollout.mode,
                spec.rollout.stages.clone(),
                spec.rollout.bake.as_std(),
                spec.slo.clone(),
            ),
            apply,
            spec.change.delete.clone(),
        );
        self.check_namespace_stages(&record, source)?;
        Ok(self.enqueue(record))
    }

    /// Refuses a namespace stage naming a namespace where no connected proxy enforces the
    /// change: most likely a typo, and a stage there would treat nobody. Checked when the
    /// intent is submitted, while the person who wrote it is there to hear about it; a
    /// namespace that empties later makes its stage inconclusive rather than promoted.
    fn check_namespace_stages(&self, record: &IntentRecord, source: &str) -> Result<(), ChangeError> {
        let probe = with_overlay(&self.m.resources, record);
        let concerned: BTreeSet<&str> = self
            .proxies
            .values()
            .filter(|p| probe.enforced_by(p))
            .map(|p| p.namespace.as_str())
            .collect();
        let have = match concerned.is_empty() {
            true => "none".to_string(),
            false => concerned.iter().copied().collect::<Vec<_>>().join(", "),
        };
        let mut errors = Vec::new();
        for (i, stage) in record.stages.iter().enumerate() {
            for (j, namespace) in stage.namespaces().iter().enumerate() {
                if !concerned.contains(namespace.as_str()) {
                    errors.push(FieldError::new(
                        format!("spec.rollout.stages[{i}].namespaces[{j}]"),
                        namespace,
                        format!("no connected proxy in this namespace enforces the change (namespaces with one: {have})"),
                    ));
                }
            }
        }
        match errors.is_empty() {
            true => Ok(()),
            false => Err(Invalid::new(source, errors).into()),
        }
    }

    /// Queues a plain change (`weft apply`, `delete`, `rollback`): one 100% stage, no bake.
    pub(crate) fn submit_change(
        &mut self,
        title: String,
        apply: Vec<Resource>,
        delete: Vec<ResourceKey>,
        source: &str,
    ) -> Result<Submitted, ChangeError> {
        self.validate_change(&apply, &delete, source, "")?;
        let resources = self.m.resources.clone();
        let mut changes = Vec::new();
        for r in &apply {
            let op = match resources.get(&r.key()) {
                None => "created",
                Some(old) if old == r => "unchanged",
                Some(_) => "configured",
            };
            changes.push(ChangeEntry {
                op: op.into(),
                key: r.key(),
            });
        }
        for k in &delete {
            if !resources.contains_key(k) {
                return Err(ChangeError::NotFound(k.to_string()));
            }
            changes.push(ChangeEntry {
                op: "deleted".into(),
                key: k.clone(),
            });
        }
        if changes.iter().all(|c| c.op == "unchanged") {
            return Ok(Submitted::Unchanged(Applied {
                revision: self.m.stable,
                changes,
            }));
        }
        let apply: Vec<Resource> = apply.into_iter().filter(|r| resources.get(&r.key()) != Some(r)).collect();
        let target = apply
            .first()
            .map(|r| r.service().to_string())
            .or_else(|| delete.first().and_then(|k| resources.get(k)).map(|r| r.service().to_string()))
            .unwrap_or_default();
        let namespace = apply
            .first()
            .map(|r| r.metadata().namespace.clone())
            .or_else(|| delete.first().map(|k| k.namespace.clone()))
            .unwrap_or_else(|| "default".into());
        let record = self.new_record(
            String::new(),
            title,
            target,
            namespace,
            None,
            source,
            (RolloutMode::Auto, vec![Stage::Percent(100.0)], Duration::ZERO, Slo::default()),
            apply,
            delete,
        );
        let id = self.enqueue(record).id;
        Ok(Submitted::Queued { id, changes })
    }

    /// The live mesh's checks of `apply` (see [`crate::mesh::Mesh::live_problems`]).
    pub(crate) fn live_problems(&self, apply: &[(String, Resource)]) -> Vec<FieldError> {
        let mut next = (*self.m.resources).clone();
        for (_, r) in apply {
            next.insert(r.key(), r.clone());
        }
        apply
            .iter()
            .flat_map(|(at, r)| {
                check(self.proxies, r, &next).into_iter().map(move |e| FieldError {
                    field: format!("{at}{}", e.field),
                    ..e
                })
            })
            .collect()
    }

    /// Checks a change against the live mesh as it would be after the change.
    fn validate_change(&self, apply: &[Resource], delete: &[ResourceKey], source: &str, prefix: &str) -> Result<(), ChangeError> {
        let mut next = (*self.m.resources).clone();
        for k in delete {
            next.remove(k);
        }
        for r in apply {
            next.insert(r.key(), r.clone());
        }
        let mut errors = Vec::new();
        for (i, r) in apply.iter().enumerate() {
            let at = match (prefix.is_empty(), apply.len() > 1) {
                (true, false) => String::new(),
                (true, true) => format!("[{i}]."),
                (false, _) => format!("{prefix}[{i}]."),
            };
            for e in check(self.proxies, r, &next) {
                errors.push(FieldError {
                    field: format!("{at}{}", e.field),
                    ..e
                });
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Invalid::new(source, errors).into())
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn new_record(
        &self,
        id: String,
        title: String,
        target: String,
        namespace: String,
        scope: Option<String>,
        source: &str,
        (mode, stages, bake, slo): (RolloutMode, Vec<Stage>, Duration, Slo),
        apply: Vec<Resource>,
        delete: Vec<ResourceKey>,
    ) -> IntentRecord {
        let seq = self.m.records.keys().next_back().copied().unwrap_or(0) + 1;
        let mut services: BTreeSet<String> = apply.iter().map(|r| r.service().to_string()).collect();
        services.extend(
            delete
                .iter()
                .filter_map(|k| self.m.resources.get(k))
                .map(|r| r.service().to_string()),
        );
        if !target.is_empty() {
            services.insert(target.clone());
        }
        IntentRecord {
            id: if id.is_empty() { format!("MESH-{seq}") } else { id },
            seq,
            title,
            target,
            namespace,
            scope,
            source: source.to_string(),
            mode,
            stages,
            bake_ms: bake.as_millis() as u64,
            slo,
            apply,
            delete,
            services,
            phase: Phase::Queued,
            stage: 0,
            candidate: None,
            revision: None,
            overlay: Vec::new(),
            routes: Vec::new(),
            treated: BTreeSet::new(),
            treat_all: false,
            approved: false,
            held: false,
            decisions: Vec::new(),
            ledger: Vec::new(),
            submitted_ms: self.now_ms,
            started_ms: None,
            finished_ms: None,
            timing: Timing::default(),
            committing: false,
        }
    }

    fn enqueue(&mut self, mut record: IntentRecord) -> IntentRecord {
        record.log(
            self.now_ms,
            "operator",
            "submitted",
            format!("{} from {}", record.title, record.source),
        );
        let seq = record.seq;
        self.m.records.insert(seq, record.clone());
        self.persist(seq);
        tracing::info!(intent = %record.id, title = %record.title, target = %record.target, "intent queued");
        self.emit(json!({"type": "intent", "id": record.id, "phase": "queued"}));
        self.wake();
        record
    }

    /// Lets a manual intent start its next stage (the dashboard's "step").
    pub(crate) fn approve(&mut self, id: &str) -> Result<IntentRecord, ChangeError> {
        let seq = self.m.seq_of(id)?;
        let frozen = self.m.frozen;
        let now_ms = self.now_ms;
        let intent = self.m.records.get_mut(&seq).expect("found");
        if intent.phase.is_terminal() {
            return Err(ChangeError::Conflict(format!(
                "intent {id} is {}; nothing to approve",
                intent.phase.as_str()
            )));
        }
        if frozen {
            return Err(ChangeError::Conflict("the mesh is frozen: `weft freeze off` first".into()));
        }
        intent.approved = true;
        intent.log(now_ms, "operator", "approved", format!("stage {}", intent.stage + 1));
        let view = intent.clone();
        self.persist(seq);
        self.wake();
        Ok(view)
    }

    /// Switches an open intent between auto and manual; switching an intent that waits for
    /// approval to auto lets it go on at once.
    pub(crate) fn set_mode(&mut self, id: &str, mode: RolloutMode) -> Result<IntentRecord, ChangeError> {
        let seq = self.m.seq_of(id)?;
        let now_ms = self.now_ms;
        let intent = self.m.records.get_mut(&seq).expect("found");
        if intent.phase.is_terminal() {
            return Err(ChangeError::Conflict(format!("intent {id} is {}", intent.phase.as_str())));
        }
        intent.mode = mode;
        if mode == RolloutMode::Auto {
            intent.approved = true;
        }
        let label = if mode == RolloutMode::Auto { "auto" } else { "manual" };
        intent.log(now_ms, "operator", "mode", label);
        let view = intent.clone();
        self.persist(seq);
        self.emit(json!({"type": "intent", "id": id, "mode": label}));
        self.wake();
        Ok(view)
    }

    /// Rolls an intent back (or cancels it while queued).
    pub(crate) fn abort(&mut self, id: &str) -> Result<IntentRecord, ChangeError> {
        let seq = self.m.seq_of(id)?;
        if self.m.records[&seq].phase.is_terminal() {
            return Err(ChangeError::Conflict(format!(
                "intent {id} is already {}",
                self.m.records[&seq].phase.as_str()
            )));
        }
        if self.m.records[&seq].committing {
            return Err(ChangeError::Conflict(format!("intent {id} is being promoted")));
        }
        self.end(seq, Phase::RolledBack, "aborted by operator".into());
        Ok(self.m.records[&seq].clone())
    }

    /// Freeze: every rollout in progress is rolled back to last-known-good and none starts
    /// until the freeze is lifted.
    pub(crate) fn freeze(&mut self, on: bool) {
        self.m.frozen = on;
        if on {
            let running: Vec<u64> = self.m.records.iter().filter(|(_, i)| i.running()).map(|(s, _)| *s).collect();
            for seq in running {
                let intent = &self.m.records[&seq];
                let untouched = intent.phase == Phase::AwaitingApproval && intent.treated.is_empty() && intent.stage == 0;
                // One being promoted is past rolling back: its revision is being stored.
                if untouched || intent.committing {
                    continue;
                }
                let stage = intent.stage + 1;
                self.end(seq, Phase::RolledBack, format!("mesh frozen: rolled back at stage {stage}"));
            }
        }
        self.emit(json!({"type": "freeze", "enabled": on}));
        self.wake();
    }

    /// The kill switch: `service`'s callers forward to it without its TrafficPolicy's routes,
    /// and its own sidecars without routes or authorization. Its inbound rate limit is still
    /// sent (the plan leaves it in place under a bypass).
    pub(crate) fn set_bypass(&mut self, namespace: &str, service: &str, on: bool) {
        let key = (namespace.to_string(), service.to_string());
        if on {
            self.m.bypass.insert(key);
        } else {
            self.m.bypass.remove(&key);
        }
        self.emit(json!({"type": "bypass", "service": service, "enabled": on}));
        self.bump();
    }
}

/// Checks that need the live mesh: subsets must exist, one TrafficPolicy per service.
fn check(proxies: &BTreeMap<u64, ProxyRecord>, res: &Resource, next: &BTreeMap<ResourceKey, Resource>) -> Vec<FieldError> {
    let mut errors = Vec::new();
    let ns = &res.metadata().namespace;
    let service = res.service();
    let known: BTreeSet<&str> = proxies
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
    if Kind::of(res) == Kind::TrafficPolicy {
        let key = res.key();
        for (k, other) in next {
            if *k != key && Kind::of(other) == Kind::TrafficPolicy && &other.metadata().namespace == ns && other.service() == service {
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

// === impl Step: the state machine ===

impl Step<'_> {
    /// Advances every unfinished intent as far as it can go now.
    pub(crate) fn step(&mut self) {
        let now = self.now;
        let open: Vec<u64> = self
            .m
            .records
            .iter()
            .filter(|(_, i)| !i.phase.is_terminal())
            .map(|(s, _)| *s)
            .collect();
        for seq in open {
            self.advance(seq, now);
        }
    }

    fn advance(&mut self, seq: u64, now: Instant) {
        if self.m.records[&seq].committing {
            return;
        }
        let phase = self.m.records[&seq].phase;
        match phase {
            Phase::Queued => {
                if self.m.blocker_of(seq).is_none() {
                    self.start(seq, now);
                }
            }
            Phase::AwaitingApproval => {
                let intent = self.m.records.get_mut(&seq).expect("open");
                if intent.approved {
                    intent.approved = false;
                    if std::mem::take(&mut intent.held) {
                        self.promote_stage(seq, "inconclusive stage approved by an operator".into());
                    } else {
                        self.begin_stage(seq, now);
                    }
                }
            }
            Phase::Distribution | Phase::Enforcement => self.enforce(seq, now),
            Phase::Observation => self.observe(seq, now),
            Phase::Promoted | Phase::RolledBack | Phase::Failed => {}
        }
    }

    /// Builds the overlay (narrowed by the scope), reserves the candidate revision, and starts
    /// the first stage (or waits for approval).
    fn start(&mut self, seq: u64, now: Instant) {
        // Numbers are reserved before the pass, outside every lock (see `Machine::startable`).
        let Some(candidate) = self.reserved.pop() else { return };
        let (overlay, routes) = overlay_of(&self.m.resources, &self.m.records[&seq]);
        let intent = self.m.records.get_mut(&seq).expect("open");
        intent.overlay = overlay;
        intent.routes = routes;
        intent.candidate = Some(candidate);
        intent.started_ms = Some(self.now_ms);
        intent.stage = 0;
        intent.log(self.now_ms, "control-plane", "started", format!("candidate revision {candidate}"));
        if intent.mode == RolloutMode::Manual && !intent.approved {
            self.set_phase(seq, Phase::AwaitingApproval);
        } else {
            self.m.records.get_mut(&seq).expect("open").approved = false;
            self.begin_stage(seq, now);
        }
    }

    /// Pushes the candidate to the current stage's share of the enforcing proxies.
    fn begin_stage(&mut self, seq: u64, now: Instant) {
        self.set_phase(seq, Phase::Distribution);
        let intent = &self.m.records[&seq];
        let rates = recent_requests(self.signals, intent, now);
        let enforcers: Vec<staging::Enforcer> = self
            .proxies
            .values()
            .filter(|p| intent.enforced_by(p))
            .map(|p| staging::Enforcer {
                namespace: p.namespace.clone(),
                candidate: rollout::Candidate {
                    id: p.workload_id().to_string(),
                    cluster: p.cluster.clone(),
                    requests: rates.get(p.workload_id()).copied(),
                },
            })
            .collect();
        // A workload with instances in two clusters counts once.
        let workloads = |pick: fn(&staging::Enforcer) -> bool| {
            enforcers
                .iter()
                .filter(|e| pick(e))
                .map(|e| e.candidate.id.as_str())
                .collect::<BTreeSet<_>>()
                .len()
        };
        let count = workloads(|_| true);
        let unknown = workloads(|e| e.candidate.requests.is_none());
        let stage = intent.current();
        let choice = staging::choose(&stage, enforcers, &intent.treated);
        let treated = choice.treated;
        // The ledger names this stage's proxies in rollout order (the first 20 of a large one).
        let order = choice.added.iter().chain(treated.iter().filter(|id| !choice.added.contains(*id)));
        let mut listed = order.take(LEDGER_NAMES).map(String::as_str).collect::<Vec<_>>().join(", ");
        if treated.len() > LEDGER_NAMES {
            listed.push_str(&format!(" and {} more", treated.len() - LEDGER_NAMES));
        }
        if listed.is_empty() {
            listed.push_str("none");
        }
        let traffic = format!(
            "{:.1}% of the requests to {} over the last {}s{}",
            choice.traffic_share,
            intent.services.iter().cloned().collect::<Vec<_>>().join(", "),
            BASELINE_WINDOW.as_secs(),
            match unknown {
                0 => String::new(),
                1 => ", counting the proxy with no traffic data as the median".into(),
                n => format!(", counting the {n} proxies with no traffic data as the median"),
            }
        );
        let candidate = intent.candidate.unwrap_or(0);
        let intent = self.m.records.get_mut(&seq).expect("open");
        intent.treat_all = stage.percent().is_some_and(|p| p >= 100.0);
        if let Some(observed) = intent.timing.observe_started {
            intent.timing.previous = Some((observed + WARM_UP, now, intent.treated.clone()));
        }
        intent.timing.stage_started = Some(now);
        // The baseline is what the enforcing proxies did before the change first reached any.
        intent.timing.started.get_or_insert(now);
        intent.log(
            self.now_ms,
            "control-plane",
            "distribution",
            format!(
                "stage {} ({stage}): candidate revision {candidate} to {} of {count} enforcing proxies ({traffic}): {listed}",
                intent.stage + 1,
                treated.len(),
            ),
        );
        intent.treated = treated;
        self.set_phase(seq, Phase::Enforcement);
        self.bump();
    }

    /// Waits for every treated proxy to ACK the candidate; a NACK fails the intent.
    fn enforce(&mut self, seq: u64, now: Instant) {
        let intent = &self.m.records[&seq];
        let treated: Vec<&ProxyRecord> = self.proxies.values().filter(|p| intent.treats(p)).collect();
        if let Some((p, why)) = treated.iter().find_map(|p| p.refused.get(&seq).map(|w| (p, w))) {
            let reason = format!("{} refused candidate revision {}: {why}", p.id, intent.candidate.unwrap_or(0));
            let (id, detail) = (p.id.clone(), why.clone());
            let now_ms = self.now_ms;
            self.m.records.get_mut(&seq).expect("open").log(now_ms, &id, "nacked", detail);
            self.end(seq, Phase::Failed, reason);
            return;
        }
        // Runs on every ACK: counts, and names proxies only when the stage ends.
        let waiting = |p: &ProxyRecord| !p.applied_intents.contains(&seq);
        let started = intent.timing.stage_started.unwrap_or(now);
        if !treated.iter().any(|p| waiting(p)) {
            let acked: Vec<String> = treated.iter().map(|p| p.id.clone()).collect();
            let intent = self.m.records.get_mut(&seq).expect("open");
            for id in &acked {
                intent.log(
                    self.now_ms,
                    id,
                    "acked",
                    format!("candidate revision {}", intent.candidate.unwrap_or(0)),
                );
            }
            intent.timing.observe_started = Some(now);
            self.set_phase(seq, Phase::Observation);
            self.observe(seq, now);
        } else if now.duration_since(started) > ENFORCEMENT_TIMEOUT {
            self.end(
                seq,
                Phase::Failed,
                format!(
                    "no ACK within {ENFORCEMENT_TIMEOUT:?} from {}",
                    treated
                        .iter()
                        .filter(|p| waiting(p))
                        .map(|p| p.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        }
    }

    /// Judges the stage on the mesh's own telemetry; promotes, rolls back, or keeps watching.
    fn observe(&mut self, seq: u64, now: Instant) {
        let intent = &self.m.records[&seq];
        let bake = Duration::from_millis(intent.bake_ms);
        let enforcing = self.proxies.values().any(|p| intent.treats(p));
        let stage = intent.current();
        // A namespace stage is about those namespaces: without one of their proxies it has
        // shown nothing, and promoting it would widen the change on no evidence at all.
        if !stage.namespaces().is_empty()
            && !self
                .proxies
                .values()
                .any(|p| intent.treats(p) && stage.namespaces().contains(&p.namespace))
        {
            let why = format!("no proxy in {stage} that this change concerns is connected");
            return self.inconclusive(seq, why);
        }
        if !enforcing {
            return self.promote_stage(seq, "no proxy enforces this change yet".into());
        }
        if bake.is_zero() {
            return self.promote_stage(seq, "applied (no bake)".into());
        }
        let Judged {
            treated,
            baseline,
            untreated,
            recent,
            drift,
            mut split,
        } = evidence(self.proxies, self.signals, intent, &self.m.unpromoted_candidates(seq));
        let since = now.duration_since(intent.timing.observe_started.unwrap_or(now));
        split.window = since.saturating_sub(WARM_UP);
        let number = intent.stage + 1;
        let verdict = match rollout::judge(&intent.slo, &treated, &baseline, &untreated, &recent, &drift) {
            Verdict::Fail(why) => Verdict::Fail(why),
            verdict => match rollout::traffic_moved(&intent.slo, &split) {
                Some(why) => Verdict::Fail(why),
                // Callers moving away from the treated proxies, suggested but not shown: watched
                // as long as errors that suggest harm.
                None => match (verdict, rollout::traffic_seems_moved(&intent.slo, &split)) {
                    (Verdict::Pass(_) | Verdict::Wait(_), Some(why)) => Verdict::Suspect(why),
                    (verdict, _) => verdict,
                },
            },
        };
        match verdict {
            Verdict::Fail(why) => {
                let why = format!("{why}{}", plaintext_refusals(self.proxies, self.signals, intent));
                self.end(seq, Phase::RolledBack, format!("{why}: rolled back at stage {number} ({stage})"))
            }
            Verdict::Pass(why) if since >= bake => self.promote_stage(seq, why),
            Verdict::Wait(why) if since >= (bake * EVIDENCE_PATIENCE).max(rollout::MIN_EVIDENCE_SPAN) + WARM_UP => {
                let moved = rollout::split_words(&split).unwrap_or_default();
                self.inconclusive(seq, format!("inconclusive after {}s: {why}{moved}", since.as_secs()))
            }
            Verdict::Suspect(why) if since >= (bake * SUSPICION_PATIENCE).max(rollout::MIN_EVIDENCE_SPAN * 2) + WARM_UP => {
                let moved = rollout::split_words(&split).unwrap_or_default();
                self.inconclusive(seq, format!("inconclusive after {}s: {why}{moved}", since.as_secs()))
            }
            _ => {}
        }
    }

    /// A stage that could not be judged does what its SLO's `onInconclusive` says.
    fn inconclusive(&mut self, seq: u64, why: String) {
        let intent = &self.m.records[&seq];
        let (number, stage) = (intent.stage + 1, intent.current());
        match intent.slo.on_inconclusive {
            OnInconclusive::Rollback => self.end(
                seq,
                Phase::RolledBack,
                format!("{why}: rolled back at stage {number} ({stage}) as onInconclusive says"),
            ),
            OnInconclusive::Promote => self.promote_stage(seq, format!("{why}: promoted as onInconclusive says")),
            OnInconclusive::Hold => self.hold_inconclusive(seq, why),
        }
    }

    /// An inconclusive stage under `onInconclusive: hold`: the treated proxies keep the
    /// candidate and the intent waits in `awaiting-approval` for a person (approve promotes
    /// the stage, abort rolls it back).
    fn hold_inconclusive(&mut self, seq: u64, why: String) {
        let cost = self.sidecar_cost(seq);
        let intent = self.m.records.get_mut(&seq).expect("open");
        let (number, stage) = (intent.stage + 1, intent.current());
        let reason = format!("{why}: held at stage {number} ({stage}) for an operator to approve or abort");
        intent
            .decisions
            .push(intent.decision(self.now_ms, "inconclusive", reason.clone(), cost));
        intent.held = true;
        intent.log(self.now_ms, "control-plane", "inconclusive", reason.clone());
        let decision = format!("{}: inconclusive: {reason}", intent.id);
        tracing::warn!(intent = %intent.id, %reason, "intent held: inconclusive");
        self.decided("inconclusive");
        self.m.last_decision = Some(decision.clone());
        self.emit(json!({"type": "decision", "id": self.m.records[&seq].id, "decision": decision}));
        self.set_phase(seq, Phase::AwaitingApproval);
    }

    fn promote_stage(&mut self, seq: u64, why: String) {
        let cost = self.sidecar_cost(seq);
        let intent = self.m.records.get_mut(&seq).expect("open");
        let (number, stage) = (intent.stage + 1, intent.current());
        if intent.stage + 1 < intent.stages.len() {
            intent.decisions.push(intent.decision(self.now_ms, "promoted", why.clone(), cost));
            intent.stage += 1;
            let decision = format!("{}: stage {number} ({stage}) passed: {why}", intent.id);
            self.decided("stage-passed");
            self.m.last_decision = Some(decision.clone());
            self.emit(json!({"type": "decision", "id": self.m.records[&seq].id, "decision": decision}));
            if self.m.records[&seq].mode == RolloutMode::Manual {
                self.set_phase(seq, Phase::AwaitingApproval);
            } else {
                self.begin_stage(seq, self.now);
            }
            return;
        }
        // Last stage passed: the candidate becomes stable.
        let mut next = (*self.m.resources).clone();
        let mut changes = Vec::new();
        for e in &intent.overlay {
            let op = match (&e.resource, next.get(&e.key)) {
                (None, _) => "deleted",
                (Some(_), None) => "created",
                (Some(r), Some(old)) if r == old => "unchanged",
                (Some(_), Some(_)) => "configured",
            };
            changes.push(ChangeEntry {
                op: op.into(),
                key: e.key.clone(),
            });
            match &e.resource {
                Some(r) => next.insert(e.key.clone(), r.clone()),
                None => next.remove(&e.key),
            };
        }
        let commit = Commit {
            seq,
            candidate: intent.candidate.unwrap_or(0),
            summary: format!("{}: {}", intent.id, intent.title),
            changes,
            next,
            why,
        };
        // Stored by the caller once the machine is released; `committed` finishes the promotion.
        intent.committing = true;
        self.commits.push(commit);
    }

    /// Finishes a promotion with what the store made of its commit.
    pub(crate) fn committed(&mut self, commit: Commit, stored: Result<Revision, StoreError>) {
        let seq = commit.seq;
        self.m.records.get_mut(&seq).expect("open").committing = false;
        let committed = match stored {
            Ok(r) => r,
            Err(error) => {
                let reason = format!("cannot store the promoted revision: {error}");
                return self.end(seq, Phase::Failed, reason);
            }
        };
        self.m.stable = committed.revision;
        self.m.resources = Arc::new(commit.next);
        self.events.push(Event::Stable(committed.revision));
        let intent = self.m.records.get_mut(&seq).expect("open");
        intent.revision = Some(committed.revision);
        let reason = format!("{}: promoted as revision {}", commit.why, committed.revision);
        tracing::info!(intent = %intent.id, revision = committed.revision, "intent promoted");
        self.end(seq, Phase::Promoted, reason);
    }

    /// What the change did to the cost of the sidecars it treated: before the intent started vs
    /// since its stage's observation began ([`crate::cost`]).
    fn sidecar_cost(&self, seq: u64) -> Option<CostChange> {
        let intent = &self.m.records[&seq];
        let (started, observing) = (intent.timing.started?, intent.timing.observe_started?);
        let treated: Vec<&str> = self
            .proxies
            .values()
            .filter(|p| intent.treated.contains(p.workload_id()) || (intent.treat_all && intent.enforced_by(p)))
            .map(|p| p.workload_id())
            .collect();
        let before = started.checked_sub(BASELINE_WINDOW).unwrap_or(started)..started;
        crate::cost::change(&self.signals.costs, &treated, before, observing + WARM_UP.., self.now)
    }

    /// Ends an intent: its treated proxies return to stable (unless it was promoted, when stable
    /// now holds its change).
    fn end(&mut self, seq: u64, phase: Phase, reason: String) {
        let cost = self.sidecar_cost(seq);
        let intent = self.m.records.get_mut(&seq).expect("open");
        intent
            .decisions
            .push(intent.decision(self.now_ms, phase.as_str(), reason.clone(), cost));
        intent.treated.clear();
        intent.treat_all = false;
        intent.finished_ms = Some(self.now_ms);
        let decision = format!("{}: {}: {reason}", intent.id, phase.as_str());
        if phase != Phase::Promoted {
            tracing::warn!(intent = %intent.id, %reason, "intent {}", phase.as_str());
        }
        let id = intent.id.clone();
        self.decided(phase.as_str());
        self.m.last_decision = Some(decision.clone());
        self.emit(json!({"type": "decision", "id": id, "decision": decision}));
        self.set_phase(seq, phase);
        self.bump();
    }

    fn set_phase(&mut self, seq: u64, phase: Phase) {
        let intent = self.m.records.get_mut(&seq).expect("open");
        intent.phase = phase;
        let id = intent.id.clone();
        self.persist(seq);
        self.emit(json!({"type": "intent", "id": id, "phase": phase.as_str()}));
        self.wake();
    }
}

/// The intent's resources, narrowed by its scope. A scoped TrafficPolicy keeps the service's
/// stable routes after its own, so only requests in scope see the change.
fn overlay_of(resources: &BTreeMap<ResourceKey, Resource>, intent: &IntentRecord) -> (Vec<OverlayEntry>, Vec<String>) {
    let mut out = Vec::new();
    let mut routes = Vec::new();
    for r in &intent.apply {
        let mut r = r.clone();
        let mut key = r.key();
        if let Some(scope) = &intent.scope {
            rollout::narrow(&mut r, scope);
            if let Resource::TrafficPolicy(d) = &mut r {
                for (i, route) in d.spec.routes.iter_mut().enumerate() {
                    if route.name.is_empty() {
                        route.name = format!("{}-{}", intent.id.to_ascii_lowercase(), i + 1);
                    }
                    routes.push(route.name.clone());
                }
            }
            if let Resource::TrafficPolicy(d) = &mut r
                && let Some((stable_key, Resource::TrafficPolicy(old))) = resources.iter().find(|(_, o)| {
                    Kind::of(o) == Kind::TrafficPolicy && o.service() == d.spec.service && o.metadata().namespace == d.metadata.namespace
                })
            {
                d.spec.routes.extend(old.spec.routes.iter().cloned());
                d.metadata.name = stable_key.name.clone();
                key = stable_key.clone();
            }
        }
        out.push(OverlayEntry {
            service: r.service().to_string(),
            key,
            resource: Some(r),
        });
    }
    for k in &intent.delete {
        let service = resources.get(k).map(|r| r.service().to_string()).unwrap_or_default();
        out.push(OverlayEntry {
            key: k.clone(),
            service,
            resource: None,
        });
    }
    (out, routes)
}

/// What a stage is judged on (see [`evidence`]).
struct Judged {
    treated: Evidence,
    baseline: Evidence,
    untreated: Evidence,
    recent: Evidence,
    drift: Drift,
    split: Split,
}

/// Evidence for the intent's current stage: treated proxies since observation began (on the
/// candidate, and for a scoped change only on its own routes), the same proxies before the
/// intent, untreated enforcing proxies since, the proxies the stage before left untreated over
/// its evidence window (the latest traffic without the change), and the drift: the treated
/// proxies' requests to services the change does not touch, before the intent and since (a
/// TrafficPolicy's callers; a SecurityPolicy is judged on inbound traffic, which has no other
/// service to tell apart); and how the judged traffic split between treated and untreated
/// proxies before and since.
///
/// The minute before (the baseline and the other traffic's drift) leaves out reports made under
/// `foreign` revisions: other intents' candidates that were never promoted. A bad change rolled
/// back just before is not how the service ran (the demo's second +3% change was promoted at
/// 100%: 4.0% errors against a 1.3% baseline, the first one's 100% stage inside its minute).
fn evidence(proxies: &BTreeMap<u64, ProxyRecord>, signals: &Signals, intent: &IntentRecord, foreign: &BTreeSet<u64>) -> Judged {
    let (direction, services) = judged_traffic(intent);
    let enforcing: BTreeMap<String, bool> = proxies
        .values()
        .filter(|p| intent.enforced_by(p))
        .map(|p| (p.workload_id().to_string(), intent.treats(p)))
        .collect();
    let candidate = intent.candidate.unwrap_or(u64::MAX);
    let started = intent.timing.started;
    let observing = intent.timing.observe_started;
    // The split by report interval counts every request (who got traffic, whatever it ran).
    let in_minute_before = |s: &Sample| started.is_some_and(|st| s.at < st && st.duration_since(s.at) <= BASELINE_WINDOW);
    // Where a report falls in the baseline's window, which reaches back up to BASELINE_LOOKBACK
    // (see `reach`), from one origin for every stream.
    let baseline_at = |s: &Sample| started.map_or(Duration::ZERO, |st| BASELINE_LOOKBACK.saturating_sub(st.duration_since(s.at)));
    let after_observe = |s: &Sample| observing.is_some_and(|o| s.at >= o + WARM_UP);
    // Where a report falls in its window, for the split by report interval.
    let before_at = |s: &Sample| started.map_or(Duration::ZERO, |st| BASELINE_WINDOW.saturating_sub(st.duration_since(s.at)));
    let since_at = |s: &Sample| observing.map_or(Duration::ZERO, |o| s.at.duration_since(o + WARM_UP));
    let (mut treated, mut baseline, mut untreated) = (Evidence::default(), Evidence::default(), Evidence::default());
    let mut recent = Evidence::default();
    let mut drift = Drift::default();
    // The stage before: its window, and whether a workload was left untreated in it.
    let previous = intent.timing.previous.as_ref();
    let in_previous = |s: &Sample| previous.is_some_and(|(from, to, _)| s.at >= *from && s.at < *to);
    let previous_at = |s: &Sample| previous.map_or(Duration::ZERO, |(from, _, _)| s.at.duration_since(*from));
    // Treated proxies not heard from since the warm-up.
    let silent = enforcing
        .iter()
        .filter(|(workload, treated)| {
            **treated && observing.is_none_or(|o| signals.reported.get(workload.as_str()).is_none_or(|at| *at < o + WARM_UP))
        })
        .count();
    let mut split = Split {
        silent,
        ..Split::default()
    };
    for ((workload, dir, service), samples) in &signals.samples {
        let Some(&is_treated) = enforcing.get(workload) else { continue };
        let judged = services.contains(service);
        if *dir != direction || !judged && !is_treated {
            continue;
        }
        // Each report at its time in its window: a comparison across time needs to know how
        // the level moves between stretches of it (rollout's period variance).
        let add = |e: &mut Evidence, at: Duration, s: &Sample| e.add_at(at, s.requests, s.errors, &s.latency_slots, &s.latency_counts);
        let untreated_before = previous.is_some_and(|(_, _, earlier)| !earlier.contains(workload.as_str()));
        // A minute of this stream's own reports: each one left out (`foreign`) moves the
        // window's start back by a report interval, up to BASELINE_LOOKBACK, so that a change
        // rolled back just before does not leave the baseline too short to measure how the
        // service moves (the demo then allowed half the requests +40 ms as the service's own
        // movement, against 44 s of baseline).
        let reach = started.map_or(BASELINE_WINDOW, |st| {
            let mut reach = BASELINE_WINDOW;
            for s in samples.iter().rev().filter(|s| s.at < st) {
                if st.duration_since(s.at) > reach {
                    break;
                }
                if foreign.contains(&s.revision) {
                    reach = (reach + rollout::REPORT_INTERVAL).min(BASELINE_LOOKBACK);
                }
            }
            reach
        });
        let before_start =
            |s: &Sample| started.is_some_and(|st| s.at < st && st.duration_since(s.at) <= reach) && !foreign.contains(&s.revision);
        for s in samples {
            if judged && untreated_before && in_previous(s) && s.revision < candidate {
                add(&mut recent, previous_at(s), s);
            }
            if !judged {
                // A treated proxy's other traffic: the drift of the machine under it.
                if before_start(s) {
                    add(&mut drift.before, baseline_at(s), s);
                } else if after_observe(s) {
                    add(&mut drift.since, since_at(s), s);
                }
            } else if is_treated {
                let in_scope = intent.routes.is_empty() || intent.routes.contains(&s.route);
                if after_observe(s) && s.revision >= candidate && in_scope {
                    add(&mut treated, since_at(s), s);
                }
                if after_observe(s) {
                    split.add(true, since_at(s), true, s.requests);
                }
                if before_start(s) {
                    add(&mut baseline, baseline_at(s), s);
                }
                if in_minute_before(s) {
                    split.add(false, before_at(s), true, s.requests);
                }
            } else if after_observe(s) {
                add(&mut untreated, since_at(s), s);
                split.add(true, since_at(s), false, s.requests);
            } else if in_minute_before(s) {
                split.add(false, before_at(s), false, s.requests);
            }
        }
    }
    Judged {
        treated,
        baseline,
        untreated,
        recent,
        drift,
        split,
    }
}

/// For a change that makes mTLS strict, what its rollback reason adds: how many of the treated
/// instances' requests since the stage's evidence began came in plaintext (a caller without a
/// sidecar), which strict mTLS refuses. Empty for any other change, or when none did.
fn plaintext_refusals(proxies: &BTreeMap<u64, ProxyRecord>, signals: &Signals, intent: &IntentRecord) -> String {
    let strict = intent.overlay.iter().any(|e| match &e.resource {
        Some(Resource::SecurityPolicy(d)) => d.spec.mtls == Some(MtlsMode::Strict),
        _ => false,
    });
    let Some(observing) = intent.timing.observe_started.filter(|_| strict) else {
        return String::new();
    };
    let treated: BTreeSet<&str> = proxies.values().filter(|p| intent.treats(p)).map(|p| p.workload_id()).collect();
    let candidate = intent.candidate.unwrap_or(u64::MAX);
    let plaintext: u64 = signals
        .samples
        .iter()
        .filter(|((workload, dir, _), _)| *dir == Direction::Inbound as i32 && treated.contains(workload.as_str()))
        .flat_map(|(_, samples)| samples.iter())
        .filter(|s| s.revision >= candidate && s.at >= observing + WARM_UP)
        .map(|s| s.requests.saturating_sub(s.mtls))
        .sum();
    match plaintext {
        0 => String::new(),
        n => format!(
            "; {} of the treated instances' requests came in plaintext (callers without a sidecar) and strict mTLS refused them",
            rollout::count(n)
        ),
    }
}

/// The traffic a change is judged on: inbound for a SecurityPolicy (the instances enforce it),
/// otherwise the callers' outbound requests to the services it changes.
fn judged_traffic(intent: &IntentRecord) -> (i32, BTreeSet<String>) {
    if intent.is_security() {
        (Direction::Inbound as i32, [String::new()].into())
    } else {
        (
            Direction::Outbound as i32,
            intent.overlay.iter().map(|e| e.service.clone()).collect(),
        )
    }
}

/// Requests each workload sent on the judged traffic over the last [`BASELINE_WINDOW`]; a
/// workload with no report there is absent (no data, not zero).
fn recent_requests(signals: &Signals, intent: &IntentRecord, now: Instant) -> BTreeMap<String, u64> {
    let (direction, services) = judged_traffic(intent);
    let mut out: BTreeMap<String, u64> = BTreeMap::new();
    for ((workload, dir, service), samples) in &signals.samples {
        if *dir != direction || !services.contains(service) {
            continue;
        }
        for s in samples.iter().filter(|s| now.saturating_duration_since(s.at) <= BASELINE_WINDOW) {
            let n = out.entry(workload.clone()).or_default();
            *n = n.saturating_add(s.requests);
        }
    }
    out
}

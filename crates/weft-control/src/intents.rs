//! The intent loop: every change is an intent that goes queued -> distribution -> enforcement
//! -> observation -> promoted | rolled-back | failed. A running intent's change is an *overlay*
//! on the stable resources; the proxies its current stage treats get stable + overlay, every
//! other proxy stays on stable (last-known-good). `step` advances every intent; it runs on every
//! ACK, NACK, telemetry report and operator action, and on a short tick for timers.

use crate::mesh::{Applied, ChangeError, LoopView, Mesh, ProxyRecord, State};
use crate::rollout::{self, Evidence, Phase, Verdict};
use crate::store::{ChangeEntry, Store, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use weft_api::ResourceKey;
use weft_api::error::{FieldError, Invalid};
use weft_api::proto::Direction;
use weft_api::resource::{Document, IntentSpec, OnInconclusive, Resource, RolloutMode, Slo};
use weft_core::Shutdown;

/// How long the treated proxies of a stage have to ACK before the intent fails.
const ENFORCEMENT_TIMEOUT: Duration = Duration::from_secs(15);
/// How far before an intent started its baseline looks.
const BASELINE_WINDOW: Duration = Duration::from_secs(60);
/// A stage without enough evidence after this many bakes (and the warm-up) is inconclusive and follows the
/// SLO's `onInconclusive`.
const EVIDENCE_PATIENCE: u32 = 3;
/// Evidence of a stage starts one telemetry report after its proxies ACKed: the report that
/// spans the swap also holds whatever the swap itself cost (config pushes, ACKs and route
/// compilation competing for the CPU), which is warm-up, not the change. Treated and untreated
/// proxies skip the same span, so they stay comparable.
const WARM_UP: Duration = Duration::from_secs(2);
/// Timer resolution of the loop.
const TICK: Duration = Duration::from_millis(200);
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
    pub stages: Vec<f64>,
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
    clock: Clock,
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

/// One resource the intent sets (`Some`) or removes (`None`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OverlayEntry {
    pub key: ResourceKey,
    pub service: String,
    pub resource: Option<Resource>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DecisionRecord {
    pub time_ms: u64,
    /// 1-based stage number.
    pub stage: usize,
    pub share: f64,
    pub outcome: String,
    pub reason: String,
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
struct Clock {
    started: Option<Instant>,
    stage_started: Option<Instant>,
    observe_started: Option<Instant>,
}

/// What a submission of resources (`weft apply`, `delete`, `rollback`) became.
#[derive(Clone, Debug)]
pub enum Submitted {
    /// Nothing to change.
    Unchanged(Applied),
    Queued {
        id: String,
        changes: Vec<ChangeEntry>,
    },
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

// === impl IntentRecord ===

impl IntentRecord {
    fn running(&self) -> bool {
        !self.phase.is_terminal() && self.phase != Phase::Queued
    }

    /// Whether `p` runs this intent's candidate now.
    pub fn treats(&self, p: &ProxyRecord) -> bool {
        self.running() && !self.overlay.is_empty() && (self.treated.contains(p.workload_id()) || (self.treat_all && self.enforced_by(p)))
    }

    /// Whether `p` enforces this change: a caller of a service whose TrafficPolicy changes, or an
    /// instance of a service whose SecurityPolicy changes.
    pub fn enforced_by(&self, p: &ProxyRecord) -> bool {
        let own = p.namespace == self.namespace;
        self.overlay.iter().any(|e| match (e.key.kind.as_str(), &e.resource) {
            // Callers in any namespace enforce the policy of a service they route to.
            ("TrafficPolicy", _) => p.subscribes_to(&self.namespace, &e.service),
            (_, Some(Resource::SecurityPolicy(d))) => {
                own && p.service == e.service && d.spec.selector.labels.iter().all(|(k, v)| p.labels.get(k) == Some(v))
            }
            _ => own && p.service == e.service,
        })
    }

    fn is_security(&self) -> bool {
        self.overlay.iter().all(|e| e.key.kind == "SecurityPolicy")
    }

    fn share(&self) -> f64 {
        self.stages.get(self.stage).copied().unwrap_or(100.0)
    }

    fn log(&mut self, actor: &str, event: &str, detail: impl Into<String>) {
        self.ledger.push(LedgerEntry {
            time_ms: now_ms(),
            actor: actor.to_string(),
            event: event.to_string(),
            detail: detail.into(),
        });
    }

    /// The JSON the API shows.
    pub fn view(&self) -> serde_json::Value {
        json!(self)
    }
}

/// Loads the intents of an earlier run. An intent that was mid-rollout is rolled back: its
/// candidate lived only in the proxies this control plane no longer tracks, and every proxy
/// now gets the stable revision, so the fleet is never left on an unknown mix.
pub fn recover(store: &Store, stable: u64) -> Result<BTreeMap<u64, IntentRecord>, StoreError> {
    let mut out = BTreeMap::new();
    for (seq, json) in store.intents()? {
        let mut intent: IntentRecord = match serde_json::from_str(&json) {
            Ok(i) => i,
            Err(error) => {
                tracing::error!(seq, %error, "unreadable intent record; skipped");
                continue;
            }
        };
        let untouched = intent.phase == Phase::Queued || (intent.phase == Phase::AwaitingApproval && intent.stage == 0 && !intent.held);
        if untouched && intent.phase != Phase::Queued {
            intent.phase = Phase::Queued;
            intent.overlay.clear();
            intent.candidate = None;
            store.put_intent(seq, &serde_json::to_string(&intent).expect("serializes"))?;
        } else if !intent.phase.is_terminal() && !untouched {
            let reason = format!("control plane restarted mid-rollout: every proxy returned to revision {stable}");
            intent.decisions.push(DecisionRecord {
                time_ms: now_ms(),
                stage: intent.stage + 1,
                share: intent.share(),
                outcome: "rolled-back".into(),
                reason,
            });
            intent.phase = Phase::RolledBack;
            intent.treated.clear();
            intent.treat_all = false;
            intent.finished_ms = Some(now_ms());
            store.put_intent(seq, &serde_json::to_string(&intent).expect("serializes"))?;
        }
        out.insert(seq, intent);
    }
    Ok(out)
}

/// Runs the loop until shutdown.
pub async fn run(mesh: Arc<Mesh>, shutdown: Shutdown) {
    loop {
        tokio::select! {
            _ = mesh.wake.notified() => {}
            _ = tokio::time::sleep(TICK) => {}
            _ = shutdown.cancelled() => return,
        }
        mesh.step();
        mesh.rotation_step();
    }
}

// === impl Mesh: submissions and operator controls ===

impl Mesh {
    /// Queues an intent written by a user. Validated whole, like a resource; nothing is queued
    /// when anything is wrong.
    pub fn submit_intent(&self, doc: Document<IntentSpec>, source: &str) -> Result<IntentRecord, ChangeError> {
        let spec = &doc.spec;
        let apply = spec.resources().map_err(|errors| Invalid::new(source, errors))?;
        let mut state = self.state.lock();
        if !doc.metadata.name.is_empty() && state.intents.values().any(|i| i.id == doc.metadata.name) {
            return Err(ChangeError::Conflict(format!("intent {} already exists", doc.metadata.name)));
        }
        self.validate_change(&state, &apply, &spec.change.delete, source, "spec.change.apply")?;
        let record = self.new_record(
            &state,
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
        Ok(self.enqueue(&mut state, record))
    }

    /// Queues a plain change (`weft apply`, `delete`, `rollback`): one 100% stage, no bake.
    pub fn submit_change(
        &self,
        title: String,
        apply: Vec<Resource>,
        delete: Vec<ResourceKey>,
        source: &str,
    ) -> Result<Submitted, ChangeError> {
        let mut state = self.state.lock();
        self.validate_change(&state, &apply, &delete, source, "")?;
        let mut changes = Vec::new();
        for r in &apply {
            let op = match state.resources.get(&r.key()) {
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
            if !state.resources.contains_key(k) {
                return Err(ChangeError::NotFound(k.to_string()));
            }
            changes.push(ChangeEntry {
                op: "deleted".into(),
                key: k.clone(),
            });
        }
        if changes.iter().all(|c| c.op == "unchanged") {
            return Ok(Submitted::Unchanged(Applied {
                revision: state.stable,
                changes,
            }));
        }
        let apply: Vec<Resource> = apply.into_iter().filter(|r| state.resources.get(&r.key()) != Some(r)).collect();
        let target = apply
            .first()
            .map(|r| r.service().to_string())
            .or_else(|| delete.first().and_then(|k| state.resources.get(k)).map(|r| r.service().to_string()))
            .unwrap_or_default();
        let namespace = apply
            .first()
            .map(|r| r.metadata().namespace.clone())
            .or_else(|| delete.first().map(|k| k.namespace.clone()))
            .unwrap_or_else(|| "default".into());
        let record = self.new_record(
            &state,
            String::new(),
            title,
            target,
            namespace,
            None,
            source,
            (RolloutMode::Auto, vec![100.0], Duration::ZERO, Slo::default()),
            apply,
            delete,
        );
        let id = self.enqueue(&mut state, record).id;
        Ok(Submitted::Queued { id, changes })
    }

    /// A rollback to revision `rev`: an intent whose change restores that revision's resources.
    pub fn submit_rollback(&self, rev: u64) -> Result<Submitted, ChangeError> {
        let Some(old) = self.store.get(rev)? else {
            return Err(Invalid::one("rollback", FieldError::new("revision", rev, "no such revision")).into());
        };
        let target: BTreeMap<ResourceKey, Resource> = old.resources.into_iter().map(|r| (r.key(), r)).collect();
        let delete: Vec<ResourceKey> = self
            .state
            .lock()
            .resources
            .keys()
            .filter(|k| !target.contains_key(k))
            .cloned()
            .collect();
        self.submit_change(
            format!("rollback to revision {rev}"),
            target.into_values().collect(),
            delete,
            &format!("weft rollback {rev}"),
        )
    }

    /// Checks a change against the live mesh as it would be after the change.
    fn validate_change(
        &self,
        state: &State,
        apply: &[Resource],
        delete: &[ResourceKey],
        source: &str,
        prefix: &str,
    ) -> Result<(), ChangeError> {
        let mut next = state.resources.clone();
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
            for e in state.check(r, &next) {
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
        state: &State,
        id: String,
        title: String,
        target: String,
        namespace: String,
        scope: Option<String>,
        source: &str,
        (mode, stages, bake, slo): (RolloutMode, Vec<f64>, Duration, Slo),
        apply: Vec<Resource>,
        delete: Vec<ResourceKey>,
    ) -> IntentRecord {
        let seq = state.intents.keys().next_back().copied().unwrap_or(0) + 1;
        let mut services: BTreeSet<String> = apply.iter().map(|r| r.service().to_string()).collect();
        services.extend(
            delete
                .iter()
                .filter_map(|k| state.resources.get(k))
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
            submitted_ms: now_ms(),
            started_ms: None,
            finished_ms: None,
            clock: Clock::default(),
        }
    }

    fn enqueue(&self, state: &mut State, mut record: IntentRecord) -> IntentRecord {
        record.log("operator", "submitted", format!("{} from {}", record.title, record.source));
        let seq = record.seq;
        state.intents.insert(seq, record.clone());
        self.persist(state, seq);
        tracing::info!(intent = %record.id, title = %record.title, target = %record.target, "intent queued");
        self.emit(json!({"type": "intent", "id": record.id, "phase": "queued"}));
        self.wake.notify_one();
        record
    }

    fn persist(&self, state: &State, seq: u64) {
        if let Some(i) = state.intents.get(&seq)
            && let Err(error) = self.store.put_intent(seq, &serde_json::to_string(i).expect("intent serializes"))
        {
            tracing::error!(intent = %i.id, %error, "cannot persist intent");
        }
    }

    fn seq_of(state: &State, id: &str) -> Result<u64, ChangeError> {
        state
            .intents
            .iter()
            .find(|(_, i)| i.id == id)
            .map(|(s, _)| *s)
            .ok_or_else(|| ChangeError::NotFound(format!("intent {id}")))
    }

    pub fn intent(&self, id: &str) -> Option<IntentRecord> {
        self.state.lock().intents.values().find(|i| i.id == id).cloned()
    }

    /// Sets the intents-by-phase gauges (before a scrape).
    pub fn count_intents(&self) {
        use crate::rollout::Phase;
        let state = self.state.lock();
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
            let n = state.intents.values().filter(|i| i.phase == phase).count();
            self.metrics
                .intents
                .get_or_create(&crate::metrics::PhaseLabel { phase: phase.as_str() })
                .set(n as i64);
        }
    }

    pub fn intent_list(&self) -> Vec<IntentRecord> {
        self.state.lock().intents.values().cloned().collect()
    }

    /// Lets a manual intent start its next stage (the dashboard's "step").
    pub fn approve(&self, id: &str, actor: &str) -> Result<IntentRecord, ChangeError> {
        let mut state = self.state.lock();
        let seq = Self::seq_of(&state, id)?;
        let frozen = state.frozen;
        let intent = state.intents.get_mut(&seq).expect("found");
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
        intent.log("operator", "approved", format!("stage {}", intent.stage + 1));
        let view = intent.clone();
        self.persist(&state, seq);
        drop(state);
        self.operator_ledger(actor, "approve", id);
        self.wake.notify_one();
        Ok(view)
    }

    /// Switches an open intent between auto and manual; switching an intent that waits for
    /// approval to auto lets it go on at once.
    pub fn set_mode(&self, id: &str, mode: RolloutMode, actor: &str) -> Result<IntentRecord, ChangeError> {
        let mut state = self.state.lock();
        let seq = Self::seq_of(&state, id)?;
        let intent = state.intents.get_mut(&seq).expect("found");
        if intent.phase.is_terminal() {
            return Err(ChangeError::Conflict(format!("intent {id} is {}", intent.phase.as_str())));
        }
        intent.mode = mode;
        if mode == RolloutMode::Auto {
            intent.approved = true;
        }
        let label = if mode == RolloutMode::Auto { "auto" } else { "manual" };
        intent.log("operator", "mode", label);
        let view = intent.clone();
        self.persist(&state, seq);
        drop(state);
        self.operator_ledger(actor, &format!("mode {label}"), id);
        self.emit(json!({"type": "intent", "id": id, "mode": label}));
        self.wake.notify_one();
        Ok(view)
    }

    /// Rolls an intent back (or cancels it while queued).
    pub fn abort(&self, id: &str, actor: &str) -> Result<IntentRecord, ChangeError> {
        let mut state = self.state.lock();
        let seq = Self::seq_of(&state, id)?;
        if state.intents[&seq].phase.is_terminal() {
            return Err(ChangeError::Conflict(format!(
                "intent {id} is already {}",
                state.intents[&seq].phase.as_str()
            )));
        }
        self.end(&mut state, seq, Phase::RolledBack, "aborted by operator".into());
        let view = state.intents[&seq].clone();
        drop(state);
        self.operator_ledger(actor, "abort", id);
        Ok(view)
    }

    /// Freeze: every rollout in progress is rolled back to last-known-good and none starts
    /// until the freeze is lifted.
    pub fn freeze(&self, on: bool, actor: &str) {
        let mut state = self.state.lock();
        state.frozen = on;
        if on {
            let running: Vec<u64> = state.intents.iter().filter(|(_, i)| i.running()).map(|(s, _)| *s).collect();
            for seq in running {
                let untouched = state.intents[&seq].phase == Phase::AwaitingApproval
                    && state.intents[&seq].treated.is_empty()
                    && state.intents[&seq].stage == 0;
                if untouched {
                    continue;
                }
                let stage = state.intents[&seq].stage + 1;
                self.end(
                    &mut state,
                    seq,
                    Phase::RolledBack,
                    format!("mesh frozen: rolled back at stage {stage}"),
                );
            }
        }
        drop(state);
        self.operator_ledger(actor, if on { "freeze on" } else { "freeze off" }, "mesh");
        self.emit(json!({"type": "freeze", "enabled": on}));
        self.wake.notify_one();
    }

    /// The kill switch: `service`'s sidecars and its callers forward without its L7 policy.
    pub fn set_bypass(&self, namespace: &str, service: &str, on: bool, actor: &str) {
        let mut state = self.state.lock();
        let key = (namespace.to_string(), service.to_string());
        if on {
            state.bypass.insert(key);
        } else {
            state.bypass.remove(&key);
        }
        drop(state);
        self.operator_ledger(
            actor,
            if on { "bypass on" } else { "bypass off" },
            &format!("{namespace}/{service}"),
        );
        self.emit(json!({"type": "bypass", "service": service, "enabled": on}));
        self.bump();
    }

    /// Records an operator's action; `actor` is the name of the API token that asked for it.
    fn operator_ledger(&self, actor: &str, action: &str, subject: &str) {
        let entry = json!({"timeMs": now_ms(), "actor": actor, "action": action, "subject": subject});
        if let Err(error) = self.store.append_ledger(&entry.to_string()) {
            tracing::error!(%error, "cannot write the ledger");
        }
        tracing::info!(actor, action, subject, "operator action");
    }

    pub fn ledger(&self, limit: usize) -> Result<Vec<serde_json::Value>, StoreError> {
        Ok(self
            .store
            .ledger(limit)?
            .iter()
            .filter_map(|s| serde_json::from_str(s).ok())
            .collect())
    }

    /// Waits until intent `id` has finished or is known to wait behind something (which may
    /// take hours: an intent awaiting approval), up to `within`.
    pub async fn wait_settled(&self, id: &str, within: Duration) -> Option<(IntentRecord, Option<Blocker>)> {
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

    /// What keeps intent `id` queued, if it is queued behind something.
    pub fn blocker(&self, id: &str) -> Option<Blocker> {
        let state = self.state.lock();
        let seq = Self::seq_of(&state, id).ok()?;
        blocker_of(&state, seq)
    }
}

/// What keeps queued intent `seq` from starting now: an earlier unfinished intent on one of its
/// services (intents on disjoint services run at once), else the freeze.
fn blocker_of(state: &State, seq: u64) -> Option<Blocker> {
    let intent = state.intents.get(&seq).filter(|i| i.phase == Phase::Queued)?;
    let earlier = state
        .intents
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
        None => state.frozen.then_some(Blocker::Freeze),
    }
}

// === impl Mesh: the state machine ===

impl Mesh {
    /// Advances every unfinished intent as far as it can go now.
    pub fn step(&self) {
        let now = Instant::now();
        let mut state = self.state.lock();
        let open: Vec<u64> = state
            .intents
            .iter()
            .filter(|(_, i)| !i.phase.is_terminal())
            .map(|(s, _)| *s)
            .collect();
        for seq in open {
            self.advance(&mut state, seq, now);
        }
    }

    fn advance(&self, state: &mut State, seq: u64, now: Instant) {
        let phase = state.intents[&seq].phase;
        match phase {
            Phase::Queued => {
                if blocker_of(state, seq).is_none() {
                    self.start(state, seq, now);
                }
            }
            Phase::AwaitingApproval => {
                let intent = state.intents.get_mut(&seq).expect("open");
                if intent.approved {
                    intent.approved = false;
                    if std::mem::take(&mut intent.held) {
                        self.promote_stage(state, seq, "inconclusive stage approved by an operator".into());
                    } else {
                        self.begin_stage(state, seq, now);
                    }
                }
            }
            Phase::Distribution | Phase::Enforcement => self.enforce(state, seq, now),
            Phase::Observation => self.observe(state, seq, now),
            Phase::Promoted | Phase::RolledBack | Phase::Failed => {}
        }
    }

    /// Builds the overlay (narrowed by the scope), reserves the candidate revision, and starts
    /// the first stage (or waits for approval).
    fn start(&self, state: &mut State, seq: u64, now: Instant) {
        let candidate = match self.store.reserve() {
            Ok(c) => c,
            Err(error) => {
                tracing::error!(%error, "cannot reserve a revision; intent stays queued");
                return;
            }
        };
        let (overlay, routes) = overlay_of(state, &state.intents[&seq]);
        let intent = state.intents.get_mut(&seq).expect("open");
        intent.overlay = overlay;
        intent.routes = routes;
        intent.candidate = Some(candidate);
        intent.started_ms = Some(now_ms());
        intent.stage = 0;
        intent.log("control-plane", "started", format!("candidate revision {candidate}"));
        if intent.mode == RolloutMode::Manual && !intent.approved {
            self.set_phase(state, seq, Phase::AwaitingApproval);
        } else {
            state.intents.get_mut(&seq).expect("open").approved = false;
            self.begin_stage(state, seq, now);
        }
    }

    /// Pushes the candidate to the current stage's share of the enforcing proxies.
    fn begin_stage(&self, state: &mut State, seq: u64, now: Instant) {
        self.set_phase(state, seq, Phase::Distribution);
        let intent = &state.intents[&seq];
        let enforcers = rollout::spread(
            state
                .proxies
                .values()
                .filter(|p| intent.enforced_by(p))
                .map(|p| (p.workload_id().to_string(), p.cluster.clone()))
                .collect(),
        );
        let share = intent.share();
        let count = rollout::stage_count(share, enforcers.len());
        let mut treated = intent.treated.clone();
        treated.extend(enforcers[..count].iter().cloned());
        // The ledger names this stage's proxies in rollout order (the first 20 of a large one).
        let order = enforcers[..count]
            .iter()
            .chain(intent.treated.iter().filter(|id| !enforcers[..count].contains(*id)));
        let mut listed = order.take(LEDGER_NAMES).map(String::as_str).collect::<Vec<_>>().join(", ");
        if treated.len() > LEDGER_NAMES {
            listed.push_str(&format!(" and {} more", treated.len() - LEDGER_NAMES));
        }
        let candidate = intent.candidate.unwrap_or(0);
        let intent = state.intents.get_mut(&seq).expect("open");
        intent.treat_all = share >= 100.0;
        intent.clock.stage_started = Some(now);
        // The baseline is what the enforcing proxies did before the change first reached any.
        intent.clock.started.get_or_insert(now);
        intent.log(
            "control-plane",
            "distribution",
            format!(
                "stage {} ({share}%): candidate revision {candidate} to {} of {} enforcing proxies: {listed}",
                intent.stage + 1,
                treated.len(),
                enforcers.len(),
            ),
        );
        intent.treated = treated;
        self.set_phase(state, seq, Phase::Enforcement);
        self.bump();
    }

    /// Waits for every treated proxy to ACK the candidate; a NACK fails the intent.
    fn enforce(&self, state: &mut State, seq: u64, now: Instant) {
        let intent = &state.intents[&seq];
        let treated: Vec<&ProxyRecord> = state.proxies.values().filter(|p| intent.treats(p)).collect();
        if let Some((p, why)) = treated.iter().find_map(|p| p.refused.get(&seq).map(|w| (p, w))) {
            let reason = format!("{} refused candidate revision {}: {why}", p.id, intent.candidate.unwrap_or(0));
            let (id, detail) = (p.id.clone(), why.clone());
            state.intents.get_mut(&seq).expect("open").log(&id, "nacked", detail);
            self.end(state, seq, Phase::Failed, reason);
            return;
        }
        // Runs on every ACK: counts, and names proxies only when the stage ends.
        let waiting = |p: &ProxyRecord| !p.applied_intents.contains(&seq);
        let started = intent.clock.stage_started.unwrap_or(now);
        if !treated.iter().any(|p| waiting(p)) {
            let acked: Vec<String> = treated.iter().map(|p| p.id.clone()).collect();
            let intent = state.intents.get_mut(&seq).expect("open");
            for id in &acked {
                intent.log(id, "acked", format!("candidate revision {}", intent.candidate.unwrap_or(0)));
            }
            intent.clock.observe_started = Some(now);
            self.set_phase(state, seq, Phase::Observation);
            self.observe(state, seq, now);
        } else if now.duration_since(started) > ENFORCEMENT_TIMEOUT {
            self.end(
                state,
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
    fn observe(&self, state: &mut State, seq: u64, now: Instant) {
        let intent = &state.intents[&seq];
        let bake = Duration::from_millis(intent.bake_ms);
        let enforcing = state.proxies.values().any(|p| intent.treats(p));
        if !enforcing {
            return self.promote_stage(state, seq, "no proxy enforces this change yet".into());
        }
        if bake.is_zero() {
            return self.promote_stage(state, seq, "applied (no bake)".into());
        }
        let (treated, baseline, untreated) = state.evidence(intent);
        let since = now.duration_since(intent.clock.observe_started.unwrap_or(now));
        let stage = intent.stage + 1;
        let share = intent.share();
        match rollout::judge(&intent.slo, &treated, &baseline, &untreated) {
            Verdict::Fail(why) => self.end(
                state,
                seq,
                Phase::RolledBack,
                format!("{why}: rolled back at stage {stage} ({share}%)"),
            ),
            Verdict::Pass(why) if since >= bake => self.promote_stage(state, seq, why),
            Verdict::Wait(why) if since >= bake * EVIDENCE_PATIENCE + WARM_UP => {
                let why = format!("inconclusive after {}s: {why}", since.as_secs());
                match intent.slo.on_inconclusive {
                    OnInconclusive::Rollback => self.end(
                        state,
                        seq,
                        Phase::RolledBack,
                        format!("{why}: rolled back at stage {stage} ({share}%) as onInconclusive says"),
                    ),
                    OnInconclusive::Promote => self.promote_stage(state, seq, format!("{why}: promoted as onInconclusive says")),
                    OnInconclusive::Hold => self.hold_inconclusive(state, seq, why),
                }
            }
            _ => {}
        }
    }

    /// An inconclusive stage under `onInconclusive: hold`: the treated proxies keep the
    /// candidate and the intent waits in `awaiting-approval` for a person (approve promotes
    /// the stage, abort rolls it back).
    fn hold_inconclusive(&self, state: &mut State, seq: u64, why: String) {
        let intent = state.intents.get_mut(&seq).expect("open");
        let (stage, share) = (intent.stage + 1, intent.share());
        let reason = format!("{why}: held at stage {stage} ({share}%) for an operator to approve or abort");
        intent.decisions.push(DecisionRecord {
            time_ms: now_ms(),
            stage,
            share,
            outcome: "inconclusive".into(),
            reason: reason.clone(),
        });
        intent.held = true;
        intent.log("control-plane", "inconclusive", reason.clone());
        let decision = format!("{}: inconclusive: {reason}", intent.id);
        tracing::warn!(intent = %intent.id, %reason, "intent held: inconclusive");
        self.metrics
            .decisions
            .get_or_create(&crate::metrics::OutcomeLabel { outcome: "inconclusive" })
            .inc();
        state.last_decision = Some(decision.clone());
        self.emit(json!({"type": "decision", "id": state.intents[&seq].id, "decision": decision}));
        self.set_phase(state, seq, Phase::AwaitingApproval);
    }

    fn promote_stage(&self, state: &mut State, seq: u64, why: String) {
        let intent = state.intents.get_mut(&seq).expect("open");
        let (stage, share) = (intent.stage + 1, intent.share());
        if intent.stage + 1 < intent.stages.len() {
            intent.decisions.push(DecisionRecord {
                time_ms: now_ms(),
                stage,
                share,
                outcome: "promoted".into(),
                reason: why.clone(),
            });
            intent.stage += 1;
            let decision = format!("{}: stage {stage} ({share}%) passed: {why}", intent.id);
            self.metrics
                .decisions
                .get_or_create(&crate::metrics::OutcomeLabel { outcome: "stage-passed" })
                .inc();
            state.last_decision = Some(decision.clone());
            self.emit(json!({"type": "decision", "id": state.intents[&seq].id, "decision": decision}));
            if state.intents[&seq].mode == RolloutMode::Manual {
                self.set_phase(state, seq, Phase::AwaitingApproval);
            } else {
                self.begin_stage(state, seq, Instant::now());
            }
            return;
        }
        // Last stage passed: the candidate becomes stable.
        let mut next = state.resources.clone();
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
        let summary = format!("{}: {}", intent.id, intent.title);
        let committed = match self.store.commit_at(intent.candidate.unwrap_or(0), summary, changes, &next) {
            Ok(r) => r,
            Err(error) => {
                let reason = format!("cannot store the promoted revision: {error}");
                return self.end(state, seq, Phase::Failed, reason);
            }
        };
        state.stable = committed.revision;
        state.resources = next;
        self.metrics.revision.set(committed.revision as i64);
        let intent = state.intents.get_mut(&seq).expect("open");
        intent.revision = Some(committed.revision);
        let reason = format!("{why}: promoted as revision {}", committed.revision);
        tracing::info!(intent = %intent.id, revision = committed.revision, "intent promoted");
        self.end(state, seq, Phase::Promoted, reason);
    }

    /// Ends an intent: its treated proxies return to stable (unless it was promoted, when stable
    /// now holds its change).
    fn end(&self, state: &mut State, seq: u64, phase: Phase, reason: String) {
        let intent = state.intents.get_mut(&seq).expect("open");
        let (stage, share) = (intent.stage + 1, intent.share());
        intent.decisions.push(DecisionRecord {
            time_ms: now_ms(),
            stage,
            share,
            outcome: phase.as_str().into(),
            reason: reason.clone(),
        });
        intent.treated.clear();
        intent.treat_all = false;
        intent.finished_ms = Some(now_ms());
        let decision = format!("{}: {}: {reason}", intent.id, phase.as_str());
        self.metrics
            .decisions
            .get_or_create(&crate::metrics::OutcomeLabel { outcome: phase.as_str() })
            .inc();
        if phase != Phase::Promoted {
            tracing::warn!(intent = %intent.id, %reason, "intent {}", phase.as_str());
        }
        state.last_decision = Some(decision.clone());
        self.emit(json!({"type": "decision", "id": intent.id, "decision": decision}));
        self.set_phase(state, seq, phase);
        self.bump();
    }

    fn set_phase(&self, state: &mut State, seq: u64, phase: Phase) {
        let intent = state.intents.get_mut(&seq).expect("open");
        intent.phase = phase;
        let id = intent.id.clone();
        self.persist(state, seq);
        self.emit(json!({"type": "intent", "id": id, "phase": phase.as_str()}));
        self.wake.notify_one();
    }
}

/// The intent's resources, narrowed by its scope. A scoped TrafficPolicy keeps the service's
/// stable routes after its own, so only requests in scope see the change.
fn overlay_of(state: &State, intent: &IntentRecord) -> (Vec<OverlayEntry>, Vec<String>) {
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
                && let Some((stable_key, Resource::TrafficPolicy(old))) = state.resources.iter().find(|(_, o)| {
                    o.kind() == "TrafficPolicy" && o.service() == d.spec.service && o.metadata().namespace == d.metadata.namespace
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
        let service = state.resources.get(k).map(|r| r.service().to_string()).unwrap_or_default();
        out.push(OverlayEntry {
            key: k.clone(),
            service,
            resource: None,
        });
    }
    (out, routes)
}

// === impl State: views for the loop ===

impl State {
    /// The revision `p` should be running: stable, or the candidate of an intent treating it.
    pub(crate) fn assigned_revision(&self, p: &ProxyRecord) -> u64 {
        self.intents
            .values()
            .filter(|i| i.treats(p))
            .filter_map(|i| i.candidate)
            .fold(self.stable, u64::max)
    }

    pub(crate) fn loop_view(&self) -> LoopView {
        let current = self.intents.values().find(|i| i.running());
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

    /// Evidence for the intent's current stage: treated proxies since observation began (on the
    /// candidate, and for a scoped change only on its own routes), the same proxies before the
    /// intent, and untreated enforcing proxies since.
    fn evidence(&self, intent: &IntentRecord) -> (Evidence, Evidence, Evidence) {
        let (direction, services): (i32, BTreeSet<String>) = if intent.is_security() {
            (Direction::Inbound as i32, [String::new()].into())
        } else {
            (
                Direction::Outbound as i32,
                intent.overlay.iter().map(|e| e.service.clone()).collect(),
            )
        };
        let enforcing: BTreeMap<String, bool> = self
            .proxies
            .values()
            .filter(|p| intent.enforced_by(p))
            .map(|p| (p.workload_id().to_string(), intent.treats(p)))
            .collect();
        let candidate = intent.candidate.unwrap_or(u64::MAX);
        let started = intent.clock.started;
        let observing = intent.clock.observe_started;
        let (mut treated, mut baseline, mut untreated) = (Evidence::default(), Evidence::default(), Evidence::default());
        for ((workload, dir, service), samples) in &self.samples {
            if *dir != direction || !services.contains(service) {
                continue;
            }
            let Some(is_treated) = enforcing.get(workload) else { continue };
            for s in samples {
                let after_observe = observing.is_some_and(|o| s.at >= o + WARM_UP);
                if *is_treated {
                    let in_scope = intent.routes.is_empty() || intent.routes.contains(&s.route);
                    if after_observe && s.revision >= candidate && in_scope {
                        treated.add(s.requests, s.errors, &s.latency_slots, &s.latency_counts);
                    }
                    if let Some(st) = started
                        && s.at < st
                        && st.duration_since(s.at) <= BASELINE_WINDOW
                    {
                        baseline.add(s.requests, s.errors, &s.latency_slots, &s.latency_counts);
                    }
                } else if after_observe {
                    untreated.add(s.requests, s.errors, &s.latency_slots, &s.latency_counts);
                }
            }
        }
        (treated, baseline, untreated)
    }
}

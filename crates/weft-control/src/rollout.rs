//! The pure parts of the intent loop: which proxies a stage treats, how a scope narrows a
//! change, and the judgement of a stage against its SLO. The state machine that drives intents
//! through these lives in [`crate::intents`].

use crate::stats::{
    clustered_auc, conditional_binomial_tail, mann_whitney, mixture_p_value, mixture_radius, normal_quantile, pooled_gap_variance,
    proportion_gap, restricted_variance,
};
use serde::{Deserialize, Serialize};
use std::time::Duration;
use weft_api::resource::{Resource, RouteMatch, Slo, StringMatch};
use weft_api::telemetry::{LATENCY_SLOTS, add_sparse, quantile_ms, slot_of, slot_value_ms};

/// Mixing variance of the always-valid rank test, on the scale of the probability that a
/// treated request is slower than a reference one (0.5 when neither is): tuned for effects
/// around 0.1, the shift a +50% latency change makes on a typical service.
const LATENCY_TAU2: f64 = 0.01;
/// Mixing scale of the error test, as a multiple of the smallest change that matters: the
/// test is most sensitive to effects around it (checked with the judge harness).
const ERROR_TAU_PER_DELTA: f64 = 4.0;
/// Smallest mixing scale of the error tests (0.5 pp).
const ERROR_TAU_FLOOR: f64 = 0.005;
/// The level at which a second reference must corroborate a harm the first one shows (an
/// always-valid p-value at most this). A change that does nothing is already held to the
/// stage's confidence by the first reference alone (both must show harm, so the false-alarm
/// rate is at most the first's); the second only has to rule out a difference that was there
/// before the change, which needs far less evidence than the change itself. Requiring full
/// confidence against the baseline too made the judge wait for a small, fixed baseline to
/// prove what the untreated proxies had already shown (the judge harness: +1 pp of errors took
/// 5,046 treated requests, +0.5 pp more than 30,000).
const CORROBORATION: f64 = 0.1;
/// Mixing variance of the traffic-share test, on the log scale of the treated proxies'
/// requests per untreated request: tuned for falls of a factor of e or more (a caller that
/// balances by latency moves most of its traffic once an instance is clearly slower).
const SHARE_TAU2: f64 = 1.0;
/// The smallest fall of the treated proxies' requests per untreated request that counts as
/// harm: to a tenth of what it was before. A caller balancing by latency over equal instances
/// moves its traffic between them by itself (the demo's checkout v1 and v2 each carried 30-70%
/// of orders-api's requests from minute to minute, a ratio that moves by up to a factor of 5;
/// an end-to-end run saw 97% on one instance before any change), while the demo's starved bad
/// stages fell by factors of 30 to 170.
const SHARE_FALL: f64 = 0.1;

/// Lifecycle of an intent (DESIGN.md §4); `awaiting-approval` is manual mode's pause.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Queued,
    AwaitingApproval,
    Distribution,
    Enforcement,
    Observation,
    Promoted,
    RolledBack,
    Failed,
}

/// Requests observed over some window.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Evidence {
    pub requests: u64,
    pub errors: u64,
    /// Dense latency histogram over weft_api::telemetry's slots (empty until the first add).
    pub latency: Vec<u64>,
    /// The same latencies by report (one proxy's two seconds), as sparse `(slot, count)`:
    /// requests of one report are not independent, and the rank test's variance says so.
    pub reports: Vec<Vec<(u32, u64)>>,
    /// When each of `reports` was taken, in milliseconds from any origin shared by the
    /// evidence (all zero when unknown): a comparison across time needs to know how much the
    /// same requests vary from one stretch of time to the next (see [`period_variance`]).
    pub times: Vec<u64>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Enough evidence and no harm shown at the SLO's confidence; the reason gives the numbers.
    Pass(String),
    /// Harm beyond the SLO's smallest change that matters, at its confidence.
    Fail(String),
    /// Not enough evidence yet (inconclusive if it stays so).
    Wait(String),
    /// Harm suggested (errors above the increase that matters and unlikely by chance at one
    /// look, latency slower than matters on too few reports, callers moving away from the
    /// treated proxies) but not yet shown at the SLO's confidence: the stage keeps watching longer than for
    /// [`Verdict::Wait`], since the always-valid tests may look for as long as it takes, and is
    /// inconclusive only if it stays so.
    Suspect(String),
}

// === impl Phase ===

impl Phase {
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Promoted | Phase::RolledBack | Phase::Failed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::AwaitingApproval => "awaiting-approval",
            Phase::Distribution => "distribution",
            Phase::Enforcement => "enforcement",
            Phase::Observation => "observation",
            Phase::Promoted => "promoted",
            Phase::RolledBack => "rolled-back",
            Phase::Failed => "failed",
        }
    }
}

// === impl Evidence ===

impl Evidence {
    /// Adds a report: counts and its sparse latency histogram (slots and their counts).
    pub fn add(&mut self, requests: u64, errors: u64, slots: &[u32], counts: &[u64]) {
        self.add_at(Duration::ZERO, requests, errors, slots, counts);
    }

    /// [`Evidence::add`] for a report taken `at` (from the evidence's origin).
    pub fn add_at(&mut self, at: Duration, requests: u64, errors: u64, slots: &[u32], counts: &[u64]) {
        self.requests = self.requests.saturating_add(requests);
        self.errors = self.errors.saturating_add(errors);
        add_sparse(self.histogram(), slots, counts);
        let report: Vec<(u32, u64)> = slots
            .iter()
            .zip(counts)
            .filter(|(_, c)| **c > 0)
            .map(|(s, c)| ((*s as usize).min(LATENCY_SLOTS - 1) as u32, *c))
            .collect();
        if !report.is_empty() {
            self.reports.push(report);
            self.times.push(at.as_millis() as u64);
        }
    }

    /// Adds one request as a report of its own.
    pub fn record(&mut self, error: bool, latency_ms: f64) {
        let slot = slot_of(latency_ms) as u32;
        self.add(1, error as u64, &[slot], &[1]);
    }

    /// The latencies by report, as `(milliseconds, count)`, every value multiplied by `scale`.
    fn report_points(&self, scale: f64) -> Vec<Vec<(f64, u64)>> {
        self.reports
            .iter()
            .map(|r| r.iter().map(|(s, c)| (slot_value_ms(*s as usize) * scale, *c)).collect())
            .collect()
    }

    fn histogram(&mut self) -> &mut Vec<u64> {
        if self.latency.is_empty() {
            self.latency = vec![0; LATENCY_SLOTS];
        }
        &mut self.latency
    }

    /// The latency histogram as `(milliseconds, count)` of its non-empty slots, every value
    /// multiplied by `scale`.
    fn points(&self, scale: f64) -> Vec<(f64, u64)> {
        dense_points(&self.latency, scale)
    }

    /// Error rate in percent.
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            100.0 * self.errors as f64 / self.requests as f64
        }
    }

    pub fn quantile(&self, q: f64) -> Option<f64> {
        quantile_ms(&self.latency, q)
    }
}

/// Orders candidates (workload id, cluster) so that any prefix is spread across clusters:
/// clusters in name order, workloads in id order within each, taken round-robin.
pub fn spread(mut candidates: Vec<(String, String)>) -> Vec<String> {
    candidates.sort_by(|a, b| (&a.1, &a.0).cmp(&(&b.1, &b.0)));
    candidates.dedup();
    let mut by_cluster: Vec<(String, std::collections::VecDeque<String>)> = Vec::new();
    for (id, cluster) in candidates {
        match by_cluster.last_mut() {
            Some((c, ids)) if *c == cluster => ids.push_back(id),
            _ => by_cluster.push((cluster, [id].into())),
        }
    }
    let mut out = Vec::new();
    while by_cluster.iter().any(|(_, ids)| !ids.is_empty()) {
        for (_, ids) in by_cluster.iter_mut() {
            if let Some(id) = ids.pop_front() {
                out.push(id);
            }
        }
    }
    out
}

/// A proxy a stage may treat: its workload, cluster, and the requests it sent to the changed
/// service recently (`None`: no traffic data for it yet).
#[derive(Clone, Debug)]
pub struct Candidate {
    pub id: String,
    pub cluster: String,
    pub requests: Option<u64>,
}

/// The proxies a stage treats: the ones it adds (in rollout order) and the share of the
/// service's traffic, in percent, that every treated proxy together carries.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    pub added: Vec<String>,
    pub traffic_share: f64,
}

/// Traffic is weighed in this many units, so that choosing is a subset sum over small integers.
const SHARE_UNITS: u64 = 10_000;

/// Chooses the proxies a stage of `share` percent treats, by their share of the traffic rather
/// than their number: a quiet caller alone is no stage at all. The rule, exactly:
///
/// - each candidate weighs its recent requests; one with no traffic data weighs the median of
///   those with data; when no candidate has any traffic, each weighs the same. Weights are
///   rounded to [`SHARE_UNITS`] of their total;
/// - the proxies an earlier stage treated (`kept`) stay treated;
/// - among the sets that contain `kept` and whose weight is at least `share` percent of the
///   total, the stage takes one of the least weight (so it treats at least its share and as
///   little more as the proxies allow);
/// - among those, the first in [`spread`]'s order (clusters round-robin), taking a proxy
///   whenever the rest can still complete the set, and never one of no weight.
///
/// With equal traffic this is the first `ceil(share% of n)` proxies in spread order, as before.
pub fn choose(candidates: Vec<Candidate>, kept: &std::collections::BTreeSet<String>, share: f64) -> Choice {
    let requests: std::collections::HashMap<String, Option<u64>> = candidates.iter().map(|c| (c.id.clone(), c.requests)).collect();
    let mut order = spread(candidates.into_iter().map(|c| (c.id, c.cluster)).collect());
    // A workload with instances in two clusters is one candidate, at its first place.
    let mut seen = std::collections::HashSet::new();
    order.retain(|id| seen.insert(id.clone()));
    let weights = weights(&order.iter().map(|id| requests[id]).collect::<Vec<_>>());
    let total: u64 = weights.iter().sum();
    let target = ((share / 100.0 * total as f64) - 1e-9).ceil().max(0.0) as u64;
    let kept_weight: u64 = order
        .iter()
        .zip(&weights)
        .filter(|(id, _)| kept.contains(*id))
        .map(|(_, w)| w)
        .sum();
    let free: Vec<(&String, u64)> = order
        .iter()
        .zip(weights.iter().copied())
        .filter(|(id, _)| !kept.contains(*id))
        .collect();
    let need = target.saturating_sub(kept_weight);
    let added = least_reaching(&free.iter().map(|f| f.1).collect::<Vec<_>>(), need)
        .into_iter()
        .map(|i| free[i].0.clone())
        .collect::<Vec<_>>();
    let added_weight: u64 = free.iter().filter(|(id, _)| added.contains(id)).map(|f| f.1).sum();
    let traffic_share = if total == 0 {
        0.0
    } else {
        100.0 * (kept_weight + added_weight) as f64 / total as f64
    };
    Choice { added, traffic_share }
}

/// Integer weights from request counts (see [`choose`]): the median stands in for a missing
/// count, equal weights for no traffic at all, and the total is scaled to [`SHARE_UNITS`].
fn weights(requests: &[Option<u64>]) -> Vec<u64> {
    let mut known: Vec<u64> = requests.iter().flatten().copied().collect();
    known.sort_unstable();
    let median = known.get(known.len() / 2).copied().unwrap_or(0);
    let raw: Vec<u64> = requests.iter().map(|r| r.unwrap_or(median)).collect();
    let sum: u64 = raw.iter().sum();
    if sum == 0 {
        return vec![1; requests.len()];
    }
    raw.iter()
        .map(|r| ((*r as f64 / sum as f64) * SHARE_UNITS as f64).round() as u64)
        .collect()
}

/// The indices of a subset of `weights` with the least sum at or above `need`, the earliest
/// items preferred (a subset-sum table over the suffixes: `reach[i][s]` says items `i..` can
/// sum to exactly `s`). Weights are at most [`SHARE_UNITS`] in total, so the table is small.
fn least_reaching(weights: &[u64], need: u64) -> Vec<usize> {
    if need == 0 {
        return Vec::new();
    }
    let total: u64 = weights.iter().sum();
    let size = total as usize + 1;
    let mut reach = vec![vec![false; size]; weights.len() + 1];
    reach[weights.len()][0] = true;
    for i in (0..weights.len()).rev() {
        let w = weights[i] as usize;
        for s in 0..size {
            reach[i][s] = reach[i + 1][s] || (s >= w && reach[i + 1][s - w]);
        }
    }
    let Some(mut left) = (need as usize..size).find(|s| reach[0][*s]) else {
        return (0..weights.len()).collect();
    };
    let mut taken = Vec::new();
    for (i, w) in weights.iter().map(|w| *w as usize).enumerate() {
        if w > 0 && left >= w && reach[i + 1][left - w] {
            taken.push(i);
            left -= w;
        }
    }
    taken
}

/// Narrows a resource to `scope` (`key:value`): a TrafficPolicy's routes match the header
/// `x-key: value`; a SecurityPolicy's selector requires the label `key=value`.
pub fn narrow(resource: &mut Resource, scope: &str) {
    let Some((key, value)) = scope.split_once(':') else { return };
    match resource {
        Resource::TrafficPolicy(d) => {
            for route in &mut d.spec.routes {
                route
                    .match_
                    .get_or_insert_with(RouteMatch::default)
                    .headers
                    .insert(format!("x-{key}"), StringMatch::Exact(value.to_string()));
            }
        }
        Resource::SecurityPolicy(d) => {
            d.spec.selector.labels.insert(key.to_string(), value.to_string());
        }
    }
}

/// What the treated proxies sent to services the change does not touch, before the intent and
/// since the stage's evidence began: how much the machine under them drifted meanwhile.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Drift {
    pub before: Evidence,
    pub since: Evidence,
}

/// How the judged traffic split between the treated proxies and the untreated enforcing ones,
/// as `(treated, untreated)` requests per report interval ([`REPORT_INTERVAL`], in time
/// order): in the window before the intent (the window the stage was chosen by) and since the
/// stage's evidence began. The treated side counts all of the treated proxies' requests to the
/// changed services, in scope or not, as the untreated side does. Counts by interval, not only
/// totals: a balancer's choices are correlated over seconds, and the test takes its variance
/// from how much the split moves between intervals (see [`traffic_moved`]).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Split {
    pub before: Vec<(u64, u64)>,
    pub since: Vec<(u64, u64)>,
    /// How long the `since` counts cover (from the end of the stage's warm-up).
    pub window: Duration,
    /// Treated proxies with no report at all since the warm-up: until each has reported, no
    /// treated request may just be a report not in yet.
    pub silent: usize,
}

// === impl Split ===

impl Split {
    /// Counts `requests` of one report into interval `at` (a multiple of [`REPORT_INTERVAL`]
    /// from its window's start) of `before` or `since`, on the treated side or not.
    pub fn add(&mut self, since: bool, at: Duration, treated: bool, requests: u64) {
        let buckets = if since { &mut self.since } else { &mut self.before };
        let i = (at.as_millis() / REPORT_INTERVAL.as_millis()) as usize;
        if buckets.len() <= i {
            buckets.resize(i + 1, (0, 0));
        }
        let side = if treated { &mut buckets[i].0 } else { &mut buckets[i].1 };
        *side = side.saturating_add(requests);
    }

    fn totals(buckets: &[(u64, u64)]) -> (u64, u64) {
        buckets
            .iter()
            .fold((0u64, 0u64), |(t, u), b| (t.saturating_add(b.0), u.saturating_add(b.1)))
    }
}

/// One reference the treated proxies are compared with; against the baseline with no
/// concurrent reference, net of the drift the same proxies' other traffic shows.
struct Reference<'a> {
    name: String,
    evidence: &'a Evidence,
    drift: Option<Shift>,
    /// Whether it gathers more as the stage goes on (the untreated proxies), or was fixed when
    /// the intent began (the baseline).
    grows: bool,
    /// The stage before's untreated proxies: there to tell the machine's drift from the change,
    /// so a slowdown it does not show is no harm however few requests it holds (see [`shown`]).
    recent: bool,
}

/// One reference's test of harm: its always-valid p-value, the effect it estimates, and the
/// variance and mixing variance it judges that effect with (so that [`shown`] can ask whether
/// another reference's effect would show against it).
struct Test {
    p: f64,
    effect: f64,
    variance: f64,
    tau2: f64,
    /// Whether, as a later reference, it must corroborate: never "too small to tell".
    required: bool,
}

// === impl Test ===

impl Test {
    /// A latency test that shows nothing (no evidence to rank, or not to be judged).
    fn silent(required: bool) -> Self {
        Test {
            p: 1.0,
            effect: 0.0,
            variance: f64::INFINITY,
            tau2: LATENCY_TAU2,
            required,
        }
    }
}

/// How much a reference's level moves by itself between stretches of time as long as the
/// judged window (see [`period_variance`]).
enum Movement {
    /// Its reports carry no times (all at one instant): not known, not allowed for.
    Unknown,
    /// The variance of the logarithm of the window's typical ratio to it, from time alone.
    Measured(f64),
    /// Its reports span this many milliseconds: fewer than [`MIN_PERIODS`] stretches.
    TooShort(u64),
}

/// The drift of a [`Drift`]: other traffic's latency factor (the typical ratio since / before)
/// and the variance of its logarithm, its error-rate difference with that difference's
/// variance, and its error counts `(errors, requests)` before and since. `factor` and `gap` are
/// what the judge nets out, never below 1 and 0 (see [`shift_of`]); `seen` is what the other
/// traffic showed, `(factor, gap)`.
struct Shift {
    factor: f64,
    log_variance: f64,
    gap: f64,
    seen: (f64, f64),
    variance: f64,
    before: (u64, u64),
    since: (u64, u64),
}

/// Judges treated proxies with the SLO's stated error rates against two references: the
/// untreated proxies over the same time (same load, same machine weather) and the treated
/// proxies' own baseline from before the intent (same proxies). Each reference with traffic
/// counts, and a harm must show against *every* one that counts (the first at `confidence`,
/// the baseline after it at [`CORROBORATION`], unless it is too small to tell: see [`shown`]): a
/// difference between proxies that was there before the change shows against the untreated
/// proxies but not against the baseline, a drift over time against the baseline but not
/// against the untreated proxies; a change shows against both. A stage is rolled back when,
/// at `confidence`:
///
/// - errors: the treated error rate is higher (an always-valid test of the difference of
///   proportions, with the variance both sides would share if they did not differ) and the increase is larger than `maxErrorRateIncrease`;
/// - latency: treated requests are slower (an always-valid Mann-Whitney rank test, its variance
///   taken between telemetry reports so that a slow two seconds of one proxy counts once) and by more
///   than `maxP99Increase` percent (treated requests are more often slower than the
///   reference's slowed by that much than faster);
/// - without any reference: the treated error rate is above `maxErrorRate`.
///
/// Untreated traffic under a quarter of the treated (callers balancing most requests onto the
/// treated proxies) does not lead when the baseline can: with other traffic of the same
/// proxies to net the machine's drift out and a baseline long enough to show how the service
/// moves, the baseline leads as at 100% and the untreated proxies corroborate.
///
/// Without untreated proxies beside the treated ones (a 100% stage), `recent` is a third
/// reference: what the stage before left untreated, over that stage's evidence window (the
/// latest traffic without the change, seconds old rather than the minute before the intent).
/// A slowdown must then show against it too: a machine that got slower during the stage before
/// (CI: harmless changes were typically +27% against the minute before at 100%, after stage
/// 1's untreated proxies had already run as slow) is not the change. Comparisons across time
/// (the baseline, `recent`) also allow for the service's own level moving between stretches of
/// time: a slowdown must exceed `maxP99Increase` by as much as the level moves by itself at the
/// stated confidence (see [`period_variance`]).
///
/// With no untreated traffic (a 100% stage) the baseline is the only reference, and a
/// comparison across time alone cannot tell the change from the machine's weather (the demo
/// rolled back a harmless change on +27% against the minute before). So when `drift` has
/// `minRequests` on both sides, the baseline comparison is a difference in differences: the
/// error gap minus other traffic's gap (a score test: the variance at the four rates fitted
/// under "no harm"), and latency against the baseline scaled by other traffic's typical
/// slowdown, the uncertainty of that factor carried into the rank test's variance (delta
/// method). Treated and other traffic come from the same proxies in the same reports, so a
/// shared busy moment cancels too. Errors that the baseline alone shows but the difference in
/// differences cannot yet tell from the drift keep the stage waiting rather than passing
/// (see [`unexplained_errors`]).
///
/// Each test is always valid (see [`crate::stats`]) so the judge may look after every report;
/// errors and latency share the false-alarm budget, and requiring every reference only lowers
/// it: a change that does nothing is rolled back with probability at most `100 - confidence`
/// percent. Nothing is decided before `minRequests` treated requests; after that, with no harm
/// shown, the stage passes (the loop still waits for the bake) and the reason bounds what the
/// evidence still allows.
pub fn judge(slo: &Slo, treated: &Evidence, baseline: &Evidence, untreated: &Evidence, recent: &Evidence, drift: &Drift) -> Verdict {
    let beside = untreated.requests > 0;
    let enough = |e: &Evidence| e.requests >= slo.min_requests.max(1);
    // Untreated traffic far smaller than the treated (callers balancing most requests onto
    // the treated proxies) leads only when the baseline cannot: the baseline then leads as at
    // 100%, net of the drift of the same proxies' other traffic, and the untreated proxies
    // corroborate. The demo held half the requests +40 ms at stage 1 on p50 42.1 ms against
    // 1.69 ms: 540 treated requests, 62 untreated in three reports, a rank test that needs
    // four. Only with that other traffic to net the machine's drift out: without it, a machine
    // 27% slower since the stage began rolled back 18% of harmless stages in the harness (a
    // small untreated side is too few to veto). The price: a rise of the judged service alone
    // (an incident there, seen by every caller but not in the proxies' other traffic) shows
    // against the baseline, and an untreated side that small cannot veto it either.
    let baseline_leads = beside
        && untreated.requests.saturating_mul(UNTREATED_TO_LEAD) < treated.requests
        && enough(&drift.before)
        && enough(&drift.since)
        && matches!(period_variance(treated, baseline), Movement::Measured(_));
    let concurrent = beside && !baseline_leads;
    let shift = (!concurrent && enough(&drift.before) && enough(&drift.since)).then(|| shift_of(drift));
    let mut references: Vec<Reference> = Vec::new();
    let untreated_reference = Reference {
        name: "untreated".into(),
        evidence: untreated,
        drift: None,
        grows: true,
        recent: false,
    };
    let mut untreated_reference = beside.then_some(untreated_reference);
    if concurrent {
        references.extend(untreated_reference.take());
    }
    if baseline.requests > 0 {
        let name = match &shift {
            Some(d) => format!(
                "baseline (net of the same proxies' other traffic: {:+.0}% latency{}, {} errors{})",
                100.0 * (d.seen.0 - 1.0),
                if d.seen.0 < 1.0 { " (faster: not netted)" } else { "" },
                points(d.seen.1),
                if d.seen.1 < 0.0 { " (fewer: not netted)" } else { "" },
            ),
            None => "baseline".into(),
        };
        references.push(Reference {
            name,
            evidence: baseline,
            drift: shift,
            grows: false,
            recent: false,
        });
    }
    references.extend(untreated_reference);
    // Only with enough to rank at all: with fewer reports its latency variance is unknown, and
    // as a required corroborator it would pass every slowdown.
    if !beside && enough(recent) && recent.reports.len() >= MIN_REPORTS {
        references.push(Reference {
            name: "untreated in the stage before".into(),
            evidence: recent,
            drift: None,
            grows: false,
            recent: true,
        });
    }
    let summary = summarize(treated, references.first());
    if treated.requests < slo.min_requests {
        return Verdict::Wait(format!(
            "{} of {} requests observed ({summary})",
            count(treated.requests),
            count(slo.min_requests)
        ));
    }
    let alpha = (1.0 - slo.confidence / 100.0).clamp(1e-9, 0.5);
    let alpha_each = alpha / 2.0;
    let delta = slo.max_error_rate_increase / 100.0;
    let tau2 = (ERROR_TAU_PER_DELTA * delta).max(ERROR_TAU_FLOOR).powi(2);
    let slower = 1.0 + slo.max_p99_increase / 100.0;
    let at = trim(slo.confidence);

    if references.is_empty() {
        // Nothing to compare with: only the absolute ceiling can be judged.
        let ceiling = slo.max_error_rate / 100.0;
        // The null's variance: a rate exactly at the ceiling.
        let rate = treated.errors as f64 / treated.requests.max(1) as f64;
        let variance = ceiling * (1.0 - ceiling) / treated.requests as f64;
        let tau2 = (ERROR_TAU_PER_DELTA * ceiling).max(ERROR_TAU_FLOOR).powi(2);
        let p = mixture_p_value(rate - ceiling, variance, tau2);
        if p <= alpha {
            return Verdict::Fail(format!(
                "error rate {} above the {}% maximum ({} requests, {} confident, no reference traffic)",
                percent(treated.error_rate()),
                trim(slo.max_error_rate),
                count(treated.requests),
                confidence(p),
            ));
        }
        return Verdict::Pass(format!("no harm shown at {at}% confidence: {summary}"));
    }

    // Errors, against each reference: (the test of "higher", p that it exceeds delta, gap, upper bound).
    let errors: Vec<(Test, f64, f64, f64)> = references
        .iter()
        .map(|r| {
            let e = r.evidence;
            let (mut gap, mut variance) = proportion_gap(treated.errors, treated.requests, e.errors, e.requests);
            let mut null = pooled_gap_variance(treated.errors, treated.requests, e.errors, e.requests);
            if let Some(d) = &r.drift {
                // Under drift "no harm" is a treated gap equal to the other traffic's, not equal
                // rates. Pooling (equal rates) rolled back 5% of harmless changes in the harness
                // when every rate rose by 1 pp; the treated side's own rate (7.1% of 154 against
                // 0.8%) hid real harm in the demo; the treated rate the point estimates imply
                // rolled back 1.6%, its variance too small whenever the other traffic's gap came
                // out low by chance. The score test fits that gap too.
                gap -= d.gap;
                variance += d.variance;
                null = drifted_null(treated, e, d);
            }
            let p = if gap > delta { mixture_p_value(gap, null, tau2) } else { 1.0 };
            let upper = gap + mixture_radius(variance, tau2, alpha);
            let test = Test {
                p,
                effect: gap,
                variance: null,
                tau2,
                required: false,
            };
            (test, mixture_p_value(gap - delta, variance, tau2), gap, upper)
        })
        .collect();
    let tests: Vec<&Test> = errors.iter().map(|e| &e.0).collect();
    if let Some(unheard) = shown(&tests, alpha_each) {
        let Reference {
            name, evidence: reference, ..
        } = &references[0];
        let (p, beyond) = (errors[0].0.p, errors[0].1);
        return Verdict::Fail(format!(
            "error rate {} vs {} {name}{} ({}, {} vs {} requests, {} confident it is higher{}{})",
            percent(treated.error_rate()),
            percent(reference.error_rate()),
            also(&references, |r| percent(r.error_rate())),
            points(errors[0].2),
            count(treated.requests),
            count(reference.requests),
            confidence(p),
            beyond_words(beyond, &format!("+{} pp", trim(slo.max_error_rate_increase))),
            too_few(&references, &unheard),
        ));
    }

    // Latency, against each reference: (p that it is slower, p that it exceeds the slowdown).
    let t = treated.points(1.0);
    let by_report = treated.report_points(1.0);
    // A baseline too short to show how the service's speed moves by itself cannot tell that
    // from the change when nothing else runs beside the stage: latency is judged against it
    // allowing a wide movement ([`UNMEASURED_MOVEMENT_SD`]), and the reason says so (a young
    // mesh's 100% stage; CI rolled back a harmless change on +73% against 5 s of baseline while
    // other work doubled every latency).
    let mut too_short = None;
    let moving_z = normal_quantile(1.0 - alpha_each);
    // The stage before's untreated proxies as a later reference only veto (their silence is no
    // harm), so a short span leaves them judged as they are; first, they are judged like it.
    let latency: Vec<(Test, f64)> = references
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let movement = if r.grows {
                Movement::Unknown
            } else {
                period_variance(treated, r.evidence)
            };
            let moving = match movement {
                // Only the first reference's threshold widens: a later one corroborates, and a
                // wider threshold there would veto what the first shows (the demo passed half
                // the requests +40 ms at stage 1, p50 42.1 ms against 5.07 ms untreated).
                Movement::Measured(v) if i == 0 => (moving_z * v.sqrt()).exp(),
                Movement::Measured(_) => 1.0,
                // Too short to measure: allowed for at a movement assumed wide. Left unjudged
                // instead, the demo passed half the requests +40 ms at a stage whose callers
                // had sent every request to the treated proxies (p50 42.1 ms against 2.22 ms:
                // the minute before had a gap where an aborted change ran).
                Movement::TooShort(spans) if !concurrent && i == 0 => {
                    too_short = Some((r.name.as_str(), spans));
                    (moving_z * UNMEASURED_MOVEMENT_SD).exp()
                }
                Movement::TooShort(_) if !concurrent && !r.recent => return (Test::silent(false), 1.0),
                Movement::TooShort(_) | Movement::Unknown => 1.0,
            };
            slower_p(&by_report, r, slower, moving)
        })
        .collect();
    let tests: Vec<&Test> = latency.iter().map(|l| &l.0).collect();
    if let Some(unheard) = shown(&tests, alpha_each) {
        let Reference {
            name,
            evidence: reference,
            drift,
            ..
        } = &references[0];
        let scale = drift.as_ref().map_or(1.0, |d| d.factor);
        let (p, beyond) = (latency[0].0.p, latency[0].1);
        return Verdict::Fail(format!(
            "latency p50 {} p99 {} vs {} {} {name}{} (typically {:+.0}%, {} vs {} requests, {} confident it is slower{}{})",
            ms(treated.quantile(0.5)),
            ms(treated.quantile(0.99)),
            ms(reference.quantile(0.5)),
            ms(reference.quantile(0.99)),
            also(&references, |r| format!("{} {}", ms(r.quantile(0.5)), ms(r.quantile(0.99)))),
            100.0 * (typical_ratio(&t, reference) / scale - 1.0),
            count(treated.requests),
            count(reference.requests),
            confidence(p),
            beyond_words(beyond, &format!("+{}%", trim(slo.max_p99_increase))),
            too_few(&references, &unheard),
        ));
    }

    if let Some(why) = unexplained_errors(treated, &references, delta, tau2, alpha_each) {
        return Verdict::Suspect(why);
    }
    // An error rate above every reference's by more than the increase that matters, not yet
    // shown at the confidence: the stage keeps watching (held for a person if it stays so)
    // rather than passing on numbers that say it harms. The demo promoted +3% errors at 100%
    // on 6.2% of 160 requests against 1.5% of 668 in the minute before: the always-valid
    // test needs more than a ten-second stage gives it there, and one more bake does.
    // Only with some evidence that it is higher at all (at the corroboration level): one
    // error in 150 requests against none is a gap of 0.67 pp, beyond a 0.5 pp SLO, and noise.
    // That evidence is the always-valid test's or, at this one look, the exact one's: the demo
    // passed stage 1 of +3% errors on 5 of 160 treated requests failing against none of 160
    // (always-valid p 0.3; all five on the treated side by chance one time in 32), and a stage
    // that passes is never judged at that blast radius again.
    // Not the exact test against a baseline netted of drift: it counts raw rates, and a rise
    // of the whole machine's errors would suggest harm there.
    if treated.errors > 0 && errors.iter().all(|e| e.2 > delta) {
        let reference = references[0].evidence;
        let exact = match references[0].drift {
            Some(_) => 1.0,
            None => conditional_binomial_tail(treated.errors, treated.requests, reference.errors, reference.requests),
        };
        let p = exact.min(errors[0].0.p);
        if p <= CORROBORATION {
            return Verdict::Suspect(format!(
                "error rate {} vs {} {} ({}, {} vs {} requests): above the +{} pp that matters, not yet shown at {at}% confidence (p {} that it is higher at all, at this look)",
                percent(treated.error_rate()),
                percent(reference.error_rate()),
                references[0].name,
                points(errors[0].2),
                count(treated.requests),
                count(reference.requests),
                trim(slo.max_error_rate_increase),
                p_words(p),
            ));
        }
    }
    // Latency's variance is taken between reports, and with fewer than four on a side it is
    // unknown: the rank test cannot show anything, so "no harm shown" would say nothing.
    // Found end to end: a stage whose treated caller slowed 35-fold (p50 57.7 ms against 1.62 ms
    // untreated, 74 requests in three reports) passed at the end of its bake.
    // Only when the estimate is beyond the slowdown that matters: a harmless stage with a short
    // bake (1 s: three reports by the time it is held) still passes.
    // A baseline fixed with fewer reports never gets more (a mesh younger than the window):
    // waiting for it would hold every stage to its end, so latency is left unjudged against it
    // and the reason says so.
    let reports = (treated.reports.len(), references[0].evidence.reports.len());
    let first = &references[0];
    let scale = first.drift.as_ref().map_or(1.0, |d| d.factor);
    let looks_slower = typical_ratio(&t, first.evidence) / scale > slower;
    let unjudged = looks_slower && !first.grows && reports.1 < MIN_REPORTS;
    // Slower than the slowdown that matters by the estimate is harm suggested: watched as long
    // as errors that suggest it. The demo held half the requests +40 ms at stage 1 after three
    // bakes, p50 42.1 ms against 1.50 ms: its callers sent the treated one 160 requests in three
    // bursts, each one report, while P2C's estimate of it decayed.
    if looks_slower && !unjudged && (reports.0 < MIN_REPORTS || reports.1 < MIN_REPORTS) {
        return Verdict::Suspect(format!(
            "{summary}; latency not judged before {MIN_REPORTS} reports on each side ({} treated, {} {})",
            reports.0, reports.1, references[0].name
        ));
    }
    let mut bounds: Vec<String> = references
        .iter()
        .zip(&errors)
        .map(|(r, e)| format!("errors vs {} at most {}", r.name, points(e.3)))
        .collect();
    if unjudged {
        bounds.push(format!(
            "latency not judged: the {} holds {} of the {MIN_REPORTS} reports it needs",
            first.name, reports.1
        ));
    }
    if let Some((name, spans)) = too_short {
        bounds.push(format!(
            "latency judged allowing the service's speed to move by itself up to {:.1}x: the {name}'s {} s are too short to show how it moves",
            (moving_z * UNMEASURED_MOVEMENT_SD).exp(),
            spans.div_ceil(1000)
        ));
    }
    Verdict::Pass(format!("no harm shown at {at}% confidence: {summary}; {}", bounds.join(", ")))
}

/// How far (the standard deviation of its logarithm) a service's level is assumed to move by
/// itself when the first reference across time is too short to measure it (a mesh younger
/// than a minute): at 99% a slowdown must exceed `maxP99Increase` by 2.2 times. CI's young
/// mesh saw harmless changes typically +67% and +73% slower while other work doubled every
/// latency; a bad change the demo rolled out was 19 times slower.
const UNMEASURED_MOVEMENT_SD: f64 = 0.3;

/// Untreated traffic leads the comparison only when it is at least one request for every this
/// many treated ones (and the baseline is long enough to lead instead: see [`judge`]). With a
/// quarter as many, the comparison's variance `1/n + 1/m` is five times the treated side's
/// alone; the baseline, a minute of the same proxies, is usually larger than the stage.
const UNTREATED_TO_LEAD: u64 = 4;

/// Reports a side of the latency test needs before its variance, taken between reports, is
/// known (see [`clustered_auc`]).
const MIN_REPORTS: usize = 4;

/// The shortest evidence span that can hold [`MIN_REPORTS`] reports on each side (one interval
/// spare: proxies do not report in step): a stage is not called inconclusive before it.
pub(crate) const MIN_EVIDENCE_SPAN: Duration = Duration::from_secs(REPORT_INTERVAL.as_secs() * (MIN_REPORTS as u64 + 1));

/// How often proxies report their traffic (weft-proxy's `REPORT_INTERVAL`).
pub(crate) const REPORT_INTERVAL: Duration = Duration::from_secs(2);

/// Whether traffic moved away from the treated proxies after the swap, as harm: a caller that
/// balances by latency (P2C over peak-EWMA) sends less to an instance a bad change slowed, and
/// the treated proxies then gather too few requests to judge (the demo's bad stage 1: 4 to 23
/// treated requests against 550-600 untreated, held as inconclusive or promoted). The test is
/// on the treated proxies' requests per untreated request, since against before (the log of
/// that ratio, always valid, at the confidence the other tests get for each metric): harm when
/// it fell to under [`SHARE_FALL`] of what it was. `None` without untreated traffic on both
/// sides (a 100% stage), before `minRequests` since, or with fewer than [`MIN_REPORTS`]
/// intervals of traffic before (a young mesh: how far the split swings by itself is unknown,
/// so even no treated request at all is left to the other tests and to a person). No treated
/// request at all since counts as one, and [`none_moved`]'s exact test runs beside it.
///
/// The variance is taken between report intervals, not requests. A balancer's choices are not
/// independent: P2C over two instances sends nearly everything to the one that looks faster
/// until its latency estimate decays, so the split swings by itself for seconds at a time (the
/// demo rolled back a harmless change on 11 of 120 treated requests against 78.8% before;
/// counted as independent requests that was 99.7% sure). Each window's variance is the spread
/// of its intervals' contributions to the logarithm (a clustered variance, like latency's
/// [`clustered_auc`], widened for few intervals), never below the binomial one; and the window
/// since the swap, too short to show its own spread, is held to the spread the window before
/// showed per interval, over its own intervals: under "no harm" both windows come from the
/// same balancer. See [`split_variance`].
pub fn traffic_moved(slo: &Slo, split: &Split) -> Option<String> {
    let ((tb, ub), (ts, us)) = (Split::totals(&split.before), Split::totals(&split.since));
    if tb == 0 || ub == 0 || us == 0 || ts.saturating_add(us) < slo.min_requests.max(1) {
        return None;
    }
    // How far the split swings by itself is measured on the window before; with fewer than
    // MIN_REPORTS intervals of traffic there it is unknown, and the binomial variance alone
    // takes one swing for the change: a young mesh's first demo intent was rolled back, harmless,
    // on 1 of 87 treated requests since against 263 of 264 before (P2C had kept a whole
    // 5-second minute-before on one instance).
    interval_variance(&split.before)?;
    // Proxies report every REPORT_INTERVAL and not in step: none treated just after the
    // warm-up, or while a treated proxy has not reported since (one reconnecting), may be a
    // report not in yet (see [`none_moved`]).
    if ts == 0 && (split.window < 2 * REPORT_INTERVAL || split.silent > 0) {
        return None;
    }
    // The test's evidence grows as the treated count falls, so what it shows at one treated
    // request holds at none: a zero counts as one. (Half a request standing in for the zero
    // gave a variance of 2 against 0.67 at one request: no request at all was weaker evidence
    // than one, and the end-to-end stage waited there until it was held.) While there are
    // none, the exact test of [`none_moved`] runs too. A stage's treated count only grows, so
    // its looks run first with none and then with some: the metric's budget (half the
    // stage's) is split once for the whole stage, three quarters to this test whatever the
    // count, a quarter to the exact one.
    let (_, p) = share_fall(split);
    let alpha = (1.0 - slo.confidence / 100.0).clamp(1e-9, 0.5) * 3.0 / 8.0;
    if p <= alpha {
        return Some(moved_words(split, p));
    }
    if ts == 0 {
        return none_moved(slo, split);
    }
    None
}

/// How far the treated proxies' requests per untreated request fell since the swap beyond
/// [`SHARE_FALL`] (the logarithm; positive: under a tenth of before), and the always-valid p
/// that it did. A zero treated count since counts as one (see [`traffic_moved`]).
fn share_fall(split: &Split) -> (f64, f64) {
    let ((tb, ub), (ts, us)) = (Split::totals(&split.before), Split::totals(&split.since));
    let counted = ts.max(1);
    // Half a request on every side keeps the logarithm finite when a side has none.
    let ln = |x: u64| (x as f64 + 0.5).ln();
    let beyond = (ln(tb) - ln(ub)) - (ln(counted) - ln(us)) + SHARE_FALL.ln();
    (beyond, mixture_p_value(beyond, split_variance(split, counted), SHARE_TAU2))
}

/// Traffic that seems to have moved away from the treated proxies, under a tenth of its share
/// before, with some evidence (p at most [`CORROBORATION`]) but not yet shown at the stage's
/// confidence: the stage keeps watching longer ([`Verdict::Suspect`]) rather than passing or
/// being called inconclusive. A caller balancing by latency probes a slowed instance in bursts
/// as its estimate decays, so a few bursts say little about how far the split moved, and more
/// of them settle it: the demo held half the requests +40 ms at stage 1 on 8 treated requests
/// of 1,500 since the swap against 77.4% before, which the same test rolled back in another
/// run on 4 of 1,400. `None` where [`traffic_moved`] would not judge, or shows the move. The
/// shares themselves are [`split_words`]'s, which an inconclusive stage's reason ends with.
pub fn traffic_seems_moved(slo: &Slo, split: &Split) -> Option<String> {
    let ((tb, ub), (ts, us)) = (Split::totals(&split.before), Split::totals(&split.since));
    if tb == 0
        || ub == 0
        || us == 0
        || ts.saturating_add(us) < slo.min_requests.max(1)
        || interval_variance(&split.before).is_none()
        || traffic_moved(slo, split).is_some()
    {
        return None;
    }
    let (beyond, p) = share_fall(split);
    (beyond > 0.0 && p <= CORROBORATION).then(|| {
        format!(
            "callers seem to be moving away from the treated proxies (p {} that their share fell under a tenth of before; not yet shown at {}% confidence)",
            p_words(p),
            trim(slo.confidence),
        )
    })
}

/// For a stage held as inconclusive beside untreated traffic: how the requests split between
/// the treated and the untreated proxies since the swap and in the minute before, so that the
/// person deciding sees whether callers moved away from the treated ones. `None` without
/// untreated traffic on both sides.
pub fn split_words(split: &Split) -> Option<String> {
    let ((_, ub), (_, us)) = (Split::totals(&split.before), Split::totals(&split.since));
    if ub == 0 || us == 0 {
        return None;
    }
    Some(format!(
        "; the treated proxies took {}, not shown to have fallen to under a tenth",
        shares(split)
    ))
}

/// `48.2% of the requests since the swap (288 of 598) against 50.4% before (604 of 1,198)`:
/// the treated proxies' share of the judged requests since the swap and before it.
fn shares(split: &Split) -> String {
    let ((tb, ub), (ts, us)) = (Split::totals(&split.before), Split::totals(&split.since));
    let share = |t: u64, u: u64| percent(100.0 * t as f64 / (t as f64 + u as f64));
    format!(
        "{} of the requests since the swap ({} of {}) against {} before ({} of {})",
        share(ts, us),
        count(ts),
        count(ts.saturating_add(us)),
        share(tb, ub),
        count(tb),
        count(tb.saturating_add(ub)),
    )
}

/// The variance of the fall [`traffic_moved`] tests: the window before's, plus the window
/// since's, each taken between report intervals (see [`interval_variance`]) and at least the
/// binomial variance of its counts; the window since at least the spread per interval the
/// window before showed, over its own intervals (a window of three intervals just after a swap
/// cannot show how far the balancer swings; a minute before can). `ts` is the treated count
/// since as the test counts it (a zero as one).
fn split_variance(split: &Split, ts: u64) -> f64 {
    let ((tb, ub), (_, us)) = (Split::totals(&split.before), Split::totals(&split.since));
    let binomial = |t: u64, u: u64| 1.0 / (t as f64 + 0.5) + 1.0 / (u as f64 + 0.5);
    let before = interval_variance(&split.before);
    let intervals = split.since.iter().filter(|b| b.0.saturating_add(b.1) > 0).count().max(1);
    let swing = before.map_or(0.0, |(v, k)| v * k as f64 / intervals as f64);
    let own = interval_variance(&split.since).map_or(0.0, |s| s.0);
    before.map_or(0.0, |b| b.0).max(binomial(tb, ub)) + binomial(ts, us).max(own).max(swing)
}

/// How much a window's split moves between report intervals: the clustered variance of the
/// logarithm of its treated per untreated requests (each interval's `t / T - u / U` is its
/// share of that logarithm's error; their squares summed, times `k / (k - 1)`), widened by
/// `nu / (nu - 2)` with `nu = k - 1` as [`clustered_auc`] does, with `k` the intervals that saw
/// traffic. `None` with fewer than [`MIN_REPORTS`] such intervals: a spread is then unknown.
/// With independent requests it comes out near the binomial `1 / T + 1 / U`.
fn interval_variance(buckets: &[(u64, u64)]) -> Option<(f64, usize)> {
    let (t, u) = Split::totals(buckets);
    let (t, u) = (t as f64 + 0.5, u as f64 + 0.5);
    let used: Vec<&(u64, u64)> = buckets.iter().filter(|b| b.0.saturating_add(b.1) > 0).collect();
    let k = used.len();
    if k < MIN_REPORTS {
        return None;
    }
    let sum: f64 = used.iter().map(|b| (b.0 as f64 / t - b.1 as f64 / u).powi(2)).sum();
    let (k_, nu) = (k as f64, (k - 1) as f64);
    Some((sum * k_ / (k_ - 1.0) * nu / (nu - 2.0), k))
}

/// The reason [`traffic_moved`] gives, at the p-value `p`.
fn moved_words(split: &Split, p: f64) -> String {
    let ((tb, ub), (ts, us)) = (Split::totals(&split.before), Split::totals(&split.since));
    let per_untreated = (ts as f64 / us as f64) / (tb as f64 / ub as f64);
    format!(
        "traffic moved away from the treated proxies: {}, {:+.0}% per untreated request, {} confident it fell to under a tenth (callers balancing away from a slower instance)",
        shares(split),
        100.0 * (per_untreated - 1.0),
        confidence(p),
    )
}

/// [`traffic_moved`]'s second test when not one request since the swap went to the treated
/// proxies, exact where the log test is an approximation, and stronger than it when the split
/// before barely moved. Where the balancer swings whole intervals it counts for little: about
/// one request per interval (28 s of none after a minute at 75% swinging stood at 48%).
///
/// The confidence: had the treated proxies' odds (their requests per untreated request) not
/// fallen under a tenth of the odds before, each request since would have gone to them with
/// probability at least `p0`, the share a tenth of those odds gives. The odds before are
/// themselves counted, so `p0` takes their lower always-valid bound at half this test's
/// budget (their variance taken between intervals; the test has a quarter of the metric's
/// budget, the log test the rest). Then none of `n` independent requests
/// reaching them happens with probability at most `(1 - p0)^n`, and that event can only end as
/// requests come (once none of the first `n` went there, none of the first `m < n` did), so
/// looking after every report costs nothing: the false-alarm rate is at most half the budget
/// for the bound plus `(1 - p0)^n`, which must be under the other half. Requests are not
/// independent (a balancer keeps its choice for a while), so `n` counts as `n / d`, `d` the
/// design effect the window before shows: its variance between intervals over the binomial
/// variance of its counts (Kish's: correlated requests carry the information of fewer
/// independent ones).
///
/// Proxies report every [`REPORT_INTERVAL`] and not in step: just after the warm-up, the
/// untreated proxies' reports may be in and the treated ones' not yet. [`traffic_moved`]
/// calls it only once the counts cover two report intervals and every treated proxy has
/// reported since.
fn none_moved(slo: &Slo, split: &Split) -> Option<String> {
    let ((tb, ub), (_, us)) = (Split::totals(&split.before), Split::totals(&split.since));
    let alpha = (1.0 - slo.confidence / 100.0).clamp(1e-9, 0.5) / 16.0;
    let (tb_, ub_) = (tb as f64 + 0.5, ub as f64 + 0.5);
    let binomial = 1.0 / tb_ + 1.0 / ub_;
    let variance = interval_variance(&split.before).map_or(binomial, |v| v.0.max(binomial));
    let lower = (tb_ / ub_).ln() - mixture_radius(variance, SHARE_TAU2, alpha);
    let odds = SHARE_FALL * lower.exp();
    let p0 = odds / (1.0 + odds);
    let effective = us as f64 / (variance / binomial);
    let p = (effective * (1.0 - p0).ln()).exp();
    (p <= alpha).then(|| moved_words(split, p + alpha))
}

/// A rise in errors against the baseline that the stage would roll back with no drift
/// reference, and that exceeds the other traffic's rise by more than the smallest change that
/// matters, but not yet at the stage's confidence: neither harm shown nor explained by the
/// drift, so the stage keeps watching (and is held for a person if that stays so). A rise the
/// other traffic's matches (a drift of the whole machine) still passes. Errors are rare: a stage's
/// other traffic is about as large as its treated traffic, and with few errors on both sides no
/// test can separate a change from a drift (4 errors in 160 treated requests against none in
/// 160 other ones: were both rates equal, all four would fall on the treated side one time in
/// 16). Promoting that was the demo's +3% fault promoted; the extra evidence of a longer stage
/// decides it. Latency needs no such wait: every request tells its speed, and its difference in
/// differences is as sure as the baseline comparison.
fn unexplained_errors(treated: &Evidence, references: &[Reference], delta: f64, tau2: f64, alpha: f64) -> Option<String> {
    let r = references.iter().find(|r| r.drift.is_some())?;
    let d = r.drift.as_ref()?;
    let e = r.evidence;
    let (gap, _) = proportion_gap(treated.errors, treated.requests, e.errors, e.requests);
    let p = mixture_p_value(
        gap,
        pooled_gap_variance(treated.errors, treated.requests, e.errors, e.requests),
        tau2,
    );
    (gap > delta && p <= alpha && gap - d.gap > delta).then(|| {
        format!(
            "error rate {} vs {} baseline ({}, {} vs {} requests, {} confident it is higher), but the same proxies' other traffic moved {} ({} errors in {} requests since, {} in {} before): not yet enough to tell the change from a drift",
            percent(treated.error_rate()),
            percent(e.error_rate()),
            points(gap),
            count(treated.requests),
            count(e.requests),
            confidence(p),
            points(d.gap),
            count(d.since.0),
            count(d.since.1),
            count(d.before.0),
            count(d.before.1),
        )
    })
}

/// Whether treated requests are slower than the reference's (against the baseline with a
/// drift: than the baseline's scaled by the drift's factor): the test that they are slower at
/// all, its p-value counted only when the estimate exceeds `slower` times `moving` (across
/// time, how far the service's own level moves at the stated confidence: see [`judge`]), and
/// the p-value that they exceed `slower`.
fn slower_p(by_report: &[Vec<(f64, u64)>], r: &Reference, slower: f64, moving: f64) -> (Test, f64) {
    let none = Test::silent(r.recent);
    let (scale, extra) = match &r.drift {
        // The factor's own uncertainty, through the slope of the rank statistic in ln(scale).
        // A speed-up is not netted (see [`shift_of`]): the comparison is then with the baseline
        // as measured, which owes nothing to the factor's uncertainty (carrying it anyway hid
        // half the requests +40 ms in the demo: the fast half sits on the baseline, where the
        // slope is steepest).
        Some(d) if d.seen.0 >= 1.0 => (d.factor, auc_slope(by_report, r.evidence, d.factor).powi(2) * d.log_variance),
        _ => (1.0, 0.0),
    };
    let plain = clustered_auc(by_report, &r.evidence.report_points(scale));
    let shifted = clustered_auc(by_report, &r.evidence.report_points(scale * slower));
    let beyond = clustered_auc(by_report, &r.evidence.report_points(scale * slower * moving));
    let (Some((auc, variance)), Some((shifted_auc, shifted_variance)), Some((beyond_auc, _))) = (plain, shifted, beyond) else {
        return (none, 1.0);
    };
    if !extra.is_finite() {
        return (none, 1.0);
    }
    let p = if beyond_auc > 0.5 {
        mixture_p_value(auc - 0.5, variance + extra, LATENCY_TAU2)
    } else {
        1.0
    };
    let test = Test {
        p,
        effect: auc - 0.5,
        variance: variance + extra,
        tau2: LATENCY_TAU2,
        required: r.recent,
    };
    (test, mixture_p_value(shifted_auc - 0.5, shifted_variance + extra, LATENCY_TAU2))
}

/// The variance of the treated-minus-baseline error gap net of `drift` if the change did
/// nothing: all four rates (treated, baseline, other traffic since and before) fitted together
/// under "the treated gap equals the other traffic's gap" (the score test's variance, see
/// [`restricted_variance`]).
fn drifted_null(treated: &Evidence, baseline: &Evidence, drift: &Shift) -> f64 {
    restricted_variance(&[
        (treated.errors, treated.requests, 1.0),
        (baseline.errors, baseline.requests, -1.0),
        (drift.since.0, drift.since.1, -1.0),
        (drift.before.0, drift.before.1, 1.0),
    ])
}

/// The drift in other traffic, as the judge subtracts it: a slowdown or a rise in errors, never
/// a speed-up or a fall. The other traffic goes to other services, whose drift is the machine's
/// only roughly (the harness: the service 35% slower while the other traffic was 20% gave 1.1%
/// false rollbacks), so the reference is trusted only in the direction it exists for: to
/// explain away a slowdown the machine caused. Netting out a speed-up manufactures one: the
/// demo rolled back a harmless change at 100% on "+27%" when its own requests were 11% faster
/// than the minute before and the other traffic 30% faster (1.27 = 0.89 / 0.70). A change
/// must then show harm against the baseline as measured too, as a harm must show against every
/// reference; for latency that comparison is the baseline as measured, without the factor's
/// uncertainty (see [`slower_p`]); for errors the drift's variance is still carried. The
/// price: while everything else gets faster, a slowdown of the service is judged against its
/// own minute before only, not against the speed-up it missed.
fn shift_of(d: &Drift) -> Shift {
    let factor = typical_ratio(&d.since.points(1.0), &d.before);
    let since = d.since.report_points(1.0);
    let slope = auc_slope(&since, &d.before, factor);
    let log_variance = match clustered_auc(&since, &d.before.report_points(factor)) {
        Some((_, v)) if slope != 0.0 => v / slope.powi(2),
        _ => f64::INFINITY,
    };
    let (b, s) = (&d.before, &d.since);
    let (gap, variance) = proportion_gap(s.errors, s.requests, b.errors, b.requests);
    Shift {
        factor: factor.max(1.0),
        log_variance,
        gap: gap.max(0.0),
        seen: (factor, gap),
        variance,
        before: (b.errors, b.requests),
        since: (s.errors, s.requests),
    }
}

/// How fast the probability that an `x` request is slower than a reference one times `s`
/// falls as `ln s` grows, at `s = scale` (a central difference over +-5%, a few latency slots).
fn auc_slope(x: &[Vec<(f64, u64)>], reference: &Evidence, scale: f64) -> f64 {
    const H: f64 = 0.05;
    let at = |s: f64| clustered_auc(x, &reference.report_points(s)).map_or(0.5, |a| a.0);
    (at(scale / H.exp()) - at(scale * H.exp())) / (2.0 * H)
}

/// Whether harm shows: the first reference's p-value is at most `alpha`, and every later one
/// corroborates at [`CORROBORATION`] or is too small to tell. `Some` with the indices of the
/// later references that were too small (the reason names them), `None` when no harm shows.
///
/// A later reference is too small to tell when even an effect as large as the first one shows
/// would not corroborate against it: its silence then says nothing about a difference that
/// predates the change, and letting it veto passed what the first showed beyond doubt (the
/// end-to-end tests: 3.4% errors of 4,976 against none of 4,816 untreated, passed because 200
/// baseline requests could not corroborate). A change that does nothing is still rolled back
/// at most as often as the first test alone allows; a difference that predates the change is
/// rolled back with it when the treated proxies' baseline was too small to show it. A latency
/// test against the stage before's untreated proxies is `required`: it is there to tell a
/// machine that slowed since the intent began from the change, and taking its silence as
/// "too small" rolled back 41% of the judge harness's harmless changes after such a slowdown.
fn shown(tests: &[&Test], alpha: f64) -> Option<Vec<usize>> {
    let (first, later) = tests.split_first()?;
    if first.p > alpha {
        return None;
    }
    let mut unheard = Vec::new();
    for (i, t) in later.iter().enumerate() {
        if t.p > CORROBORATION {
            if t.required || mixture_p_value(first.effect, t.variance, t.tau2) <= CORROBORATION {
                return None;
            }
            unheard.push(i + 1);
        }
    }
    Some(unheard)
}

/// `; 200 baseline requests too few to tell it from a difference that predates the change`,
/// for the references [`shown`] found too small to tell.
fn too_few(references: &[Reference], unheard: &[usize]) -> String {
    unheard
        .iter()
        .map(|i| {
            let r = &references[*i];
            format!(
                "; {} {} requests too few to tell it from a difference that predates the change",
                count(r.evidence.requests),
                r.name
            )
        })
        .collect()
}

/// ` and 0.5% baseline`: the second reference's numbers, when there is one.
fn also(references: &[Reference], show: impl Fn(&Evidence) -> String) -> String {
    references
        .get(1)
        .map(|r| format!(" and {} {}", show(r.evidence), r.name))
        .unwrap_or_default()
}

/// `, 99.2% that it exceeds the +0.5 pp that matters` when the evidence says so at all.
fn beyond_words(p: f64, threshold: &str) -> String {
    if p <= 0.5 {
        format!(", {} that it exceeds the {threshold} that matters", confidence(p))
    } else {
        format!(", by more than the {threshold} that matters")
    }
}

/// A dense latency histogram as `(milliseconds, count)` of its non-empty slots, every value
/// multiplied by `scale`.
fn dense_points(histogram: &[u64], scale: f64) -> Vec<(f64, u64)> {
    histogram
        .iter()
        .enumerate()
        .filter(|(_, c)| **c > 0)
        .map(|(i, c)| (slot_value_ms(i) * scale, *c))
        .collect()
}

/// Stretches of time a reference must hold before [`period_variance`] can tell how much its
/// level moves between them.
const MIN_PERIODS: usize = 5;

/// How uncertain the level of `window` against `reference` is from time alone, as the
/// variance of the logarithm of [`typical_ratio`], were the window just another stretch of the
/// reference's traffic: the reference cut into stretches as long as the window spans (by its
/// reports' times), each stretch's typical ratio to the rest of the reference, and the spread
/// of their logarithms, widened for few stretches as [`clustered_auc`]'s is. A window longer
/// than a [`MIN_PERIODS`]th of the reference is measured in stretches of that length and the
/// variance scaled down by how many it spans, as if its stretches moved independently: a level
/// that holds longer than that cannot be told from the change with a reference this short. The
/// reference's own level is uncertain too: its `k` stretches average it, which adds a `k`th
/// (the stretch-against-rest spread already holds `k / (k - 1)` of both).
///
/// A comparison across time is as uncertain as the service's own level is from one stretch
/// to the next. Requests counted a report at a time do not show that: a neighbour busy for
/// half a minute slows every report of it alike, and the clustered variance takes the whole
/// window as one sample of the weather. The suite's harmless changes were rolled back at 100%
/// on a 1 ms service typically 27% slower than the minute before, on a CI machine where other
/// tests started beside it. The judge widens the slowdown that matters by this movement at its
/// confidence (`maxP99Increase` times `exp(z * sd)`), on the log scale of the typical ratio:
/// carried into the rank test's variance instead (through its slope), it hid half the demo's
/// requests +40 ms at 100% (p50 42 ms against 5.5 ms, promoted), since a rank statistic is
/// bounded and the mixture test pays dearly for a wide variance. Unknown when
/// either side's reports carry no times (all at one instant), too short when the reference has
/// fewer than [`MIN_PERIODS`] stretches with at least half the typical stretch's requests.
fn period_variance(window: &Evidence, reference: &Evidence) -> Movement {
    let (Some(lo), Some(hi)) = (window.times.iter().min(), window.times.iter().max()) else {
        return Movement::Unknown;
    };
    let (Some(&first), Some(&last)) = (reference.times.iter().min(), reference.times.iter().max()) else {
        return Movement::Unknown;
    };
    if first == last {
        return Movement::Unknown;
    }
    let step = REPORT_INTERVAL.as_millis() as u64;
    let longest = ((last - first) / MIN_PERIODS as u64).max(step);
    let whole = ((hi - lo) / step + 1) * step;
    let span = whole.min(longest);
    let mut periods = vec![vec![0u64; LATENCY_SLOTS]; ((last - first) / span + 1) as usize];
    for (report, at) in reference.reports.iter().zip(&reference.times) {
        let period = &mut periods[((at - first) / span) as usize];
        for &(slot, count) in report {
            period[slot as usize] += count;
        }
    }
    let sizes: Vec<u64> = periods.iter().map(|p| p.iter().sum()).collect();
    let mut sorted = sizes.clone();
    sorted.sort_unstable();
    let typical = sorted[sorted.len() / 2];
    // Each stretch's log ratio with the share of its spread that sampling alone gives a
    // shift estimate of its size: (1/n + 1/rest) / (12 J^2), J the integral of the squared
    // density of log latency (the baseline's histogram over its slots' log widths). A quiet
    // service's stretches hold few requests, and their sampling is not the level moving (the
    // demo's 10 requests a second: counted as movement it passed half the requests +40 ms).
    let total = reference.requests.max(1) as f64;
    let density: f64 = (1..LATENCY_SLOTS - 1)
        .filter(|i| reference.latency[*i] > 0)
        .map(|i| {
            let share = reference.latency[i] as f64 / total;
            let width = (slot_value_ms(i + 1) / slot_value_ms(i)).ln();
            share * share / width
        })
        .sum();
    let stretches: Vec<(f64, f64)> = periods
        .iter()
        .zip(&sizes)
        .filter(|(_, n)| **n > 0 && 2 * **n >= typical)
        .map(|(period, n)| {
            let rest = Evidence {
                latency: reference.latency.iter().zip(period).map(|(all, p)| all - p).collect(),
                ..Evidence::default()
            };
            let n = *n as f64;
            let sampling = (1.0 / n + 1.0 / (total - n).max(1.0)) / (12.0 * density * density).max(f64::MIN_POSITIVE);
            (typical_ratio(&dense_points(period, 1.0), &rest).ln(), sampling)
        })
        .collect();
    if stretches.len() < MIN_PERIODS {
        return Movement::TooShort(last - first + step);
    }
    let k = stretches.len() as f64;
    let mean = stretches.iter().map(|s| s.0).sum::<f64>() / k;
    let sampling = stretches.iter().map(|s| s.1).sum::<f64>() / k;
    let nu = k - 1.0;
    let raw = stretches.iter().map(|s| (s.0 - mean).powi(2)).sum::<f64>() / nu;
    let spread = (raw - sampling).max(0.0) * nu / (nu - 2.0);
    Movement::Measured(spread * (span as f64 / whole as f64 + 1.0 / k) * (k - 1.0) / k)
}

/// The factor by which treated requests are typically slower than the reference's: the scale
/// `s` at which a treated request is as often slower as faster than a reference one times `s`
/// (a Hodges-Lehmann-style estimate), found by bisection on a log scale.
fn typical_ratio(treated: &[(f64, u64)], reference: &Evidence) -> f64 {
    let (mut lo, mut hi) = (0.01f64.ln(), 100f64.ln());
    for _ in 0..40 {
        let mid = 0.5 * (lo + hi);
        let auc = mann_whitney(treated, &reference.points(mid.exp())).map_or(0.5, |t| t.auc);
        if auc > 0.5 { lo = mid } else { hi = mid }
    }
    (0.5 * (lo + hi)).exp()
}

/// The numbers of a stage in a line: treated against the first reference.
fn summarize(treated: &Evidence, reference: Option<&Reference>) -> String {
    let mut out = format!(
        "error rate {}, p50 {} p99 {}",
        percent(treated.error_rate()),
        ms(treated.quantile(0.5)),
        ms(treated.quantile(0.99))
    );
    if let Some(Reference { name, evidence: r, .. }) = reference {
        out.push_str(&format!(
            " vs {name} {}, p50 {} p99 {} ({} vs {} requests)",
            percent(r.error_rate()),
            ms(r.quantile(0.5)),
            ms(r.quantile(0.99)),
            count(treated.requests),
            count(r.requests)
        ));
    } else {
        out.push_str(&format!(" ({} requests, no reference)", count(treated.requests)));
    }
    out
}

/// `3,980`.
pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// How confident a p-value makes the judge, never rounded up: `99.9%`, `99.97%`, `over 99.99%`.
pub fn confidence(p: f64) -> String {
    let c = 100.0 * (1.0 - p);
    if c >= 99.99 {
        "over 99.99%".into()
    } else if c >= 99.9 {
        format!("{:.2}%", (c * 100.0).floor() / 100.0)
    } else {
        format!("{:.1}%", (c * 10.0).floor() / 10.0)
    }
}

/// A p-value to two significant figures at most: `0.031`, `0.0042`, `0.12`.
fn p_words(p: f64) -> String {
    let places = |p: f64| (1.0 - p.max(1e-9).log10().floor()).max(1.0) as usize;
    let scale = 10f64.powi(places(p) as i32);
    let rounded = (p * scale).round() / scale;
    let places = places(rounded);
    format!("{rounded:.places$}")
}

fn percent(v: f64) -> String {
    format!("{v:.1}%")
}

/// A difference of proportions in percentage points, signed.
fn points(d: f64) -> String {
    format!("{:+.1} pp", d * 100.0)
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v < 10.0 => format!("{v:.2} ms"),
        Some(v) => format!("{v:.1} ms"),
        None => "-".into(),
    }
}

/// A setting as written: `0.5`, `20`.
fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// `requests` with `errors` among them, the latencies spread evenly over [0.5x, 1.5x] of
    /// `latency_ms` (a service is never one value).
    /// The judge with no drift reference.
    fn judged(slo: &Slo, treated: &Evidence, baseline: &Evidence, untreated: &Evidence) -> Verdict {
        judge(slo, treated, baseline, untreated, &Evidence::default(), &Drift::default())
    }

    fn evidence(requests: u64, errors: u64, latency_ms: f64) -> Evidence {
        let mut e = Evidence::default();
        for i in 0..requests {
            let spread = 0.5 + (i % 100) as f64 / 99.0;
            e.record(i < errors, latency_ms * spread);
        }
        e
    }

    fn candidate(id: &str, cluster: &str, requests: Option<u64>) -> Candidate {
        Candidate {
            id: id.into(),
            cluster: cluster.into(),
            requests,
        }
    }

    #[test]
    fn equal_traffic_stages_spread_across_clusters_and_cover_at_least_one() {
        let c = |id: &str, cl: &str| (id.to_string(), cl.to_string());
        let order = spread(vec![c("a1", "a"), c("a2", "a"), c("a3", "a"), c("b1", "b"), c("c1", "c")]);
        assert_eq!(order, ["a1", "b1", "c1", "a2", "a3"]);
        let equal = |n: usize, share: f64| {
            let all = (0..n).map(|i| candidate(&format!("p{i}"), ["a", "b"][i % 2], Some(50))).collect();
            choose(all, &BTreeSet::new(), share).added.len()
        };
        assert_eq!(
            (equal(10, 10.0), equal(2, 10.0), equal(5, 50.0), equal(7, 100.0), equal(0, 50.0)),
            (1, 1, 3, 7, 0)
        );
        // No traffic data anywhere: by count, in spread order.
        let quiet = vec![candidate("a1", "a", None), candidate("a2", "a", None), candidate("b1", "b", None)];
        assert_eq!(choose(quiet, &BTreeSet::new(), 50.0).added, ["a1", "b1"]);
    }

    #[test]
    fn a_stage_treats_its_share_of_the_traffic_not_of_the_proxies() {
        // Two callers at 9:1: a 50% stage is the busy one, not the first in cluster order.
        let two = vec![candidate("quiet", "a", Some(100)), candidate("busy", "b", Some(900))];
        let choice = choose(two, &BTreeSet::new(), 50.0);
        assert_eq!(
            choice,
            Choice {
                added: vec!["busy".into()],
                traffic_share: 90.0
            }
        );
        // 6:3:1: count would take two proxies; 60% alone is the least weight at or above 50%.
        let three = vec![
            candidate("a", "x", Some(300)),
            candidate("b", "x", Some(100)),
            candidate("c", "y", Some(600)),
        ];
        assert_eq!(choose(three.clone(), &BTreeSet::new(), 50.0).added, ["c"]);
        // A later stage keeps the earlier one's proxies and adds the least that reaches its share.
        let kept: BTreeSet<String> = ["b".to_string()].into();
        let later = choose(three, &kept, 50.0);
        assert_eq!((later.added, later.traffic_share), (vec!["c".to_string()], 70.0));
        // No data counts as the median of those with data (here 100 of 100, 100, 1000).
        let unknown = vec![
            candidate("new", "a", None),
            candidate("x", "a", Some(100)),
            candidate("y", "a", Some(100)),
            candidate("z", "b", Some(1000)),
        ];
        let choice = choose(unknown, &BTreeSet::new(), 5.0);
        assert_eq!(
            (choice.added, (choice.traffic_share * 10.0).round()),
            (vec!["new".to_string()], 77.0)
        );
    }

    /// Against every subset, in the rule's own units (weights rounded to 1/10,000 of the
    /// total): the treated weight reaches the stage's share and no subset that keeps the
    /// earlier stage's proxies reaches it with less.
    #[test]
    fn the_chosen_share_is_at_least_the_stage_and_minimal() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..2000 {
            let n = 1 + next(7) as usize;
            let all: Vec<Candidate> = (0..n)
                .map(|i| candidate(&format!("p{i}"), ["a", "b", "c"][next(3) as usize], Some(next(1000))))
                .collect();
            let kept: BTreeSet<String> = all.iter().filter(|_| next(4) == 0).map(|c| c.id.clone()).collect();
            let share = [5.0, 10.0, 25.0, 33.0, 50.0, 75.0, 99.0][next(7) as usize];
            let units = weights(&all.iter().map(|c| c.requests).collect::<Vec<_>>());
            let total: u64 = units.iter().sum();
            let weight = |pick: &dyn Fn(usize) -> bool| (0..n).filter(|i| pick(*i)).map(|i| units[i]).sum::<u64>();
            let is_kept = |i: usize| kept.contains(&all[i].id);
            let choice = choose(all.clone(), &kept, share);
            let got = weight(&|i| is_kept(i) || choice.added.contains(&all[i].id));
            let case = format!("{all:?} kept {kept:?} share {share} chose {choice:?}");
            assert!(got as f64 >= share / 100.0 * total as f64 - 1e-6, "{case}");
            assert!((100.0 * got as f64 / total as f64 - choice.traffic_share).abs() < 1e-9, "{case}");
            assert!(choice.added.iter().all(|id| !kept.contains(id)), "{case}");
            for mask in 0u32..1 << n {
                let other = weight(&|i| is_kept(i) || mask & (1 << i) != 0);
                assert!(
                    (other as f64) < share / 100.0 * total as f64 - 1e-6 || other >= got,
                    "{other} of {total} also reaches the share with less than {got}: {case}"
                );
            }
            // In requests rather than units, the share is off by at most the rounding.
            let requests: u64 = all.iter().map(|c| c.requests.unwrap()).sum();
            if requests > 0 {
                let picked: u64 = (0..n)
                    .filter(|i| is_kept(*i) || choice.added.contains(&all[*i].id))
                    .map(|i| all[i].requests.unwrap())
                    .sum();
                assert!(100.0 * picked as f64 / requests as f64 >= share - 0.005 * n as f64, "{case}");
            }
        }
    }

    #[test]
    fn judge_waits_for_evidence_then_compares() {
        let slo = Slo {
            min_requests: 100,
            ..Default::default()
        };
        let healthy = evidence(4000, 16, 4.0);
        let Verdict::Wait(why) = judged(&slo, &evidence(50, 50, 4.0), &healthy, &healthy) else {
            panic!()
        };
        assert!(why.starts_with("50 of 100 requests observed (error rate 100.0%"), "{why}");
        // +5.6 pp over 1,000 requests: far beyond +0.5 pp.
        let Verdict::Fail(why) = judged(&slo, &evidence(1000, 60, 4.0), &healthy, &Evidence::default()) else {
            panic!()
        };
        assert!(
            why == "error rate 6.0% vs 0.4% baseline (+5.6 pp, 1,000 vs 4,000 requests, over 99.99% confident it is higher, over 99.99% that it exceeds the +0.5 pp that matters)",
            "{why}"
        );
        let Verdict::Pass(why) = judged(&slo, &evidence(1000, 4, 4.0), &healthy, &healthy) else {
            panic!()
        };
        assert!(why.starts_with("no harm shown at 99% confidence: error rate 0.4%"), "{why}");
        // Twice as slow, every request.
        let Verdict::Fail(why) = judged(&slo, &evidence(300, 0, 8.0), &healthy, &healthy) else {
            panic!()
        };
        assert!(why.starts_with("latency p50 8."), "{why}");
        assert!(why.contains("that it exceeds the +20% that matters"), "{why}");
        // 10% slower is under the 20% that matters: not a rollback.
        assert!(matches!(
            judged(&slo, &evidence(2000, 8, 4.4), &healthy, &healthy),
            Verdict::Pass(_)
        ));
        // Without any reference, the absolute maximum still applies.
        assert!(matches!(
            judged(&slo, &evidence(1000, 100, 4.0), &Evidence::default(), &Evidence::default()),
            Verdict::Fail(_)
        ));
        // A pre-existing error rate is not blamed on the change.
        let noisy = evidence(4000, 200, 4.0);
        assert!(matches!(judged(&slo, &evidence(1000, 50, 4.0), &noisy, &noisy), Verdict::Pass(_)));
    }

    /// The issue's false rollback: ~20 treated requests whose slowest was 10-20 ms, against a
    /// baseline of thousands at ~5 ms. The old judge read that maximum as a p99 of 20.0 ms.
    /// Seen in the demo mesh (`bench/demo-judge`): +3% errors on orders-api, 5 errors in 157
    /// treated requests against none in 1,194 before, was promoted: the test took the treated
    /// side's own rate for the variance, five times the variance of "no difference".
    #[test]
    fn a_few_errors_among_few_treated_requests_against_none_before_fail() {
        let slo = issue_slo();
        let Verdict::Fail(why) = judged(&slo, &evidence(157, 5, 2.0), &evidence(1194, 0, 2.0), &Evidence::default()) else {
            panic!("not rolled back")
        };
        assert!(
            why.starts_with("error rate 3.2% vs 0.0% baseline (+3.2 pp, 157 vs 1,194 requests"),
            "{why}"
        );
        // With no reference at all, only the ceiling judges: 8 of 200 is above 1% but not
        // above 20%.
        let ceiling = |max| Slo {
            max_error_rate: max,
            ..slo.clone()
        };
        let none = Evidence::default();
        let verdict = judged(&ceiling(20.0), &evidence(200, 8, 2.0), &none, &none);
        assert!(matches!(verdict, Verdict::Pass(_)), "{verdict:?}");
        let Verdict::Fail(why) = judged(&ceiling(1.0), &evidence(200, 8, 2.0), &none, &none) else {
            panic!("4% passed a 1% ceiling")
        };
        assert!(why.starts_with("error rate 4.0% above the 1% maximum (200 requests"), "{why}");
        // One error in 157 is within what no difference produces.
        let verdict = judged(&slo, &evidence(157, 1, 2.0), &evidence(1194, 0, 2.0), &Evidence::default());
        assert!(matches!(verdict, Verdict::Pass(_)), "{verdict:?}");
    }

    #[test]
    fn one_slow_request_among_twenty_is_not_a_regression() {
        let slo = Slo {
            min_requests: 20,
            max_error_rate: 5.0,
            max_error_rate_increase: 1.0,
            ..Default::default()
        };
        let baseline = evidence(4000, 0, 4.8);
        let mut treated = evidence(21, 0, 4.8);
        treated.record(false, 14.0);
        let verdict = judged(&slo, &treated, &baseline, &baseline);
        assert!(matches!(verdict, Verdict::Pass(_)), "{verdict:?}");
    }

    #[test]
    fn half_the_requests_40ms_slower_fails_at_stated_confidence() {
        let slo = Slo {
            min_requests: 20,
            ..Default::default()
        };
        let reference = evidence(2000, 0, 4.0);
        let mut treated = Evidence::default();
        for i in 0..60 {
            treated.record(false, if i % 2 == 0 { 44.0 } else { 4.0 });
        }
        let Verdict::Fail(why) = judged(&slo, &treated, &Evidence::default(), &reference) else {
            panic!()
        };
        assert!(
            why.starts_with("latency p50 4.00 ms p99 43.8 ms vs 4.00 ms 5.93 ms untreated (typically +"),
            "{why}"
        );
        assert!(
            why.ends_with("60 vs 2,000 requests, over 99.99% confident it is slower, 99.7% that it exceeds the +20% that matters)"),
            "{why}"
        );
    }

    /// Seen in the end-to-end tests: the treated callers were 40% slower than the untreated
    /// ones before the change too (separate processes on a busy machine). Harm must show
    /// against both references, so a difference that was there before is not the change's.
    #[test]
    fn a_difference_between_proxies_that_predates_the_change_is_not_harm() {
        let slo = Slo::default();
        let before = evidence(3000, 0, 5.6);
        let peers = evidence(3000, 0, 4.0);
        let verdict = judged(&slo, &evidence(1000, 0, 5.6), &before, &peers);
        assert!(matches!(verdict, Verdict::Pass(_)), "{verdict:?}");
        // The same proxies, now also slower than they were: harm against both.
        let Verdict::Fail(why) = judged(&slo, &evidence(1000, 0, 11.2), &before, &peers) else {
            panic!()
        };
        assert!(why.contains("untreated and 5."), "{why}");
        // Drift over time shows against the baseline only: not harm either.
        let verdict = judged(&slo, &evidence(1000, 0, 8.0), &peers, &evidence(3000, 0, 8.0));
        assert!(matches!(verdict, Verdict::Pass(_)), "{verdict:?}");
    }

    /// Found in the end-to-end tests at load 25: +3% errors passed stage 1 with the untreated
    /// comparison beyond doubt (3.4% of 4,976 against none of 4,816) because the treated
    /// proxies' own baseline, 200 requests, could not corroborate it at 90% (an increase as
    /// large as the one shown is what 200 requests without an error allow; since the test is
    /// one-sided, 200 corroborate it, so the test uses 100). A reference too
    /// small to tell must not veto: the stage is rolled back, and the reason says so. A
    /// baseline large enough to tell still vetoes a difference that predates the change.
    #[test]
    fn a_baseline_too_small_to_tell_does_not_veto_harm_the_untreated_proxies_show() {
        let slo = Slo {
            max_error_rate: 20.0,
            ..Slo::default()
        };
        let untreated = evidence(4816, 0, 4.0);
        let Verdict::Fail(why) = judged(&slo, &evidence(4976, 169, 4.0), &evidence(100, 0, 4.0), &untreated) else {
            panic!(
                "3.4% against none passed: {:?}",
                judged(&slo, &evidence(4976, 169, 4.0), &evidence(100, 0, 4.0), &untreated)
            )
        };
        assert!(
            why.starts_with(
                "error rate 3.4% vs 0.0% untreated and 0.0% baseline (+3.4 pp, 4,976 vs 4,816 requests, over 99.99% confident it is higher"
            ) && why.ends_with("; 100 baseline requests too few to tell it from a difference that predates the change)"),
            "{why}"
        );
        // The same treated proxies already at 3.4% over 3,000 requests before: not the change's.
        let verdict = judged(&slo, &evidence(4976, 169, 4.0), &evidence(3000, 102, 4.0), &untreated);
        assert!(matches!(verdict, Verdict::Pass(_)), "{verdict:?}");
        // Latency: twice as slow as the untreated proxies. Every request tells its speed, so
        // ten baseline requests as slow already show the difference predates the change; three
        // tell nothing.
        let fast = evidence(3000, 0, 4.0);
        let slow_before = |n: u64| {
            let mut e = Evidence::default();
            for i in 0..n {
                e.record(false, 8.0 * (0.5 + i as f64 / (n - 1) as f64));
            }
            e
        };
        let Verdict::Fail(why) = judged(&slo, &evidence(1000, 0, 8.0), &slow_before(3), &fast) else {
            panic!("twice as slow passed against a baseline of 3")
        };
        assert!(
            why.starts_with("latency p50 ")
                && why.ends_with("; 3 baseline requests too few to tell it from a difference that predates the change)"),
            "{why}"
        );
        let verdict = judged(&slo, &evidence(1000, 0, 8.0), &slow_before(10), &fast);
        assert!(matches!(verdict, Verdict::Pass(_)), "{verdict:?}");
    }

    /// Evidence of reports of 40 requests each (spread from 0.6 to 1.4 times their level), one
    /// every two seconds, at the levels given.
    fn timed(levels: &[f64]) -> Evidence {
        let reports: Vec<Vec<f64>> = levels.iter().map(|l| vec![*l]).collect();
        timed_mixed(&reports)
    }

    /// [`timed`] with every report's 40 requests shared equally among its levels.
    fn timed_mixed(reports: &[Vec<f64>]) -> Evidence {
        let mut e = Evidence::default();
        for (i, levels) in reports.iter().enumerate() {
            let each = 40 / levels.len();
            let mut slots: Vec<u32> = levels
                .iter()
                .flat_map(|level| (0..each).map(move |j| slot_of(level * (0.6 + 0.8 * j as f64 / (each - 1) as f64)) as u32))
                .collect();
            slots.sort_unstable();
            let mut sparse: Vec<(u32, u64)> = Vec::new();
            for s in slots {
                match sparse.last_mut() {
                    Some(last) if last.0 == s => last.1 += 1,
                    _ => sparse.push((s, 1)),
                }
            }
            let (slots, counts): (Vec<u32>, Vec<u64>) = sparse.into_iter().unzip();
            e.add_at(Duration::from_secs(2 * i as u64), (each * levels.len()) as u64, 0, &slots, &counts);
        }
        e
    }

    /// A service whose own speed moves between 1 ms and 1.5 ms every ten seconds, and no other
    /// traffic to net a drift out (a caller of one service, at 100%): a harmless stage that
    /// happens to fall in a slow stretch is typically 20-odd percent slower than the minute
    /// before, which the rank test alone, counting reports as the only clusters, took for harm
    /// at 99%. Against the level's own movement between stretches of the minute before it is
    /// not; three times slower still is.
    #[test]
    fn a_comparison_across_time_allows_for_the_level_moving_by_itself() {
        let slo = issue_slo();
        let levels: Vec<f64> = (0..30).map(|i| if (i / 5) % 2 == 0 { 1.0 } else { 1.5 }).collect();
        let baseline = timed(&levels);
        let none = Evidence::default();
        let harmless = timed(&[1.5; 4]);
        let untimed = |e: &Evidence| Evidence {
            times: Vec::new(),
            ..e.clone()
        };
        let Verdict::Fail(why) = judged(&slo, &untimed(&harmless), &untimed(&baseline), &none) else {
            panic!("without times, the slow stretch reads as harm")
        };
        assert!(why.contains("typically +2"), "{why}");
        let verdict = judged(&slo, &harmless, &baseline, &none);
        assert!(matches!(verdict, Verdict::Pass(_)), "{verdict:?}");
        let Verdict::Fail(why) = judged(&slo, &timed(&[4.5; 4]), &baseline, &none) else {
            panic!("three times slower than the slow stretches is harm")
        };
        assert!(why.starts_with("latency p50 4."), "{why}");
        // A steady service's stretches differ by sampling alone: +50% is harm with times too.
        let steady = timed(&[1.0; 30]);
        let Verdict::Fail(why) = judged(&slo, &timed(&[1.5; 4]), &steady, &none) else {
            panic!("+50% against a steady minute is harm")
        };
        assert!(why.contains("typically +4"), "{why}");
        let measured = |m: Movement| match m {
            Movement::Measured(v) => v,
            _ => panic!("30 reports over a minute are enough to measure"),
        };
        assert!(measured(period_variance(&harmless, &steady)) < measured(period_variance(&harmless, &baseline)) / 10.0);
        // Five seconds of baseline cannot show how the level moves: at 100% latency is
        // judged against it allowing a wide movement (and the reason says so).
        let young = timed(&[1.0; 3]);
        let verdict = judged(&slo, &timed(&[2.0; 4]), &young, &none);
        let Verdict::Pass(why) = verdict else { panic!("{verdict:?}") };
        assert!(
            why.ends_with("latency judged allowing the service's speed to move by itself up to 2.2x: the baseline's 6 s are too short to show how it moves"),
            "{why}"
        );
        let Verdict::Fail(why) = judged(&slo, &timed(&[6.0; 4]), &timed(&[1.0; 4]), &none) else {
            panic!("six times slower than a short baseline is harm")
        };
        assert!(why.starts_with("latency p50 "), "{why}");
        // With untreated proxies beside the stage, the short baseline only corroborates.
        let verdict = judged(&slo, &timed(&[2.0; 4]), &young, &timed(&[1.0; 4]));
        assert!(matches!(verdict, Verdict::Fail(_)), "{verdict:?}");
    }

    /// CI's false rollback: at 100% a harmless change's requests were typically 27% slower than
    /// the minute before the intent, but the machine had slowed before the stage began (stage
    /// 1's untreated proxies ran as slow). Against the untreated proxies of the stage before it
    /// is no harm; a change that slows the service beyond both still is.
    #[test]
    fn at_100_percent_the_stage_before_s_untreated_proxies_are_a_reference() {
        let slo = issue_slo();
        let none = Evidence::default();
        let quiet = Drift::default();
        let baseline = timed(&[1.0; 30]);
        let recent = timed(&[1.3; 5]);
        let harmless = timed(&[1.35; 5]);
        let Verdict::Fail(why) = judge(&slo, &harmless, &baseline, &none, &none, &quiet) else {
            panic!("against the minute before alone, the slower machine reads as harm")
        };
        assert!(why.contains("baseline (typically +3"), "{why}");
        let verdict = judge(&slo, &harmless, &baseline, &none, &recent, &quiet);
        let Verdict::Pass(why) = verdict else {
            panic!("the stage before ran as slow: {verdict:?}")
        };
        assert!(why.contains("errors vs untreated in the stage before at most"), "{why}");
        let Verdict::Fail(why) = judge(&slo, &timed(&[2.0; 5]), &baseline, &none, &recent, &quiet) else {
            panic!("+50% beyond the stage before is harm")
        };
        assert!(why.contains("and 1.28 ms 1.83 ms untreated in the stage before"), "{why}");
        // With no baseline (a mesh younger than the intent's minute) the stage before is the
        // first reference, and 8 s of it cannot show how the service moves: latency is judged
        // allowing a wide movement, and the reason says so.
        let verdict = judge(&slo, &timed(&[1.7; 4]), &none, &none, &timed(&[1.0; 4]), &quiet);
        let Verdict::Pass(why) = verdict else { panic!("{verdict:?}") };
        assert!(
            why.ends_with("latency judged allowing the service's speed to move by itself up to 2.2x: the untreated in the stage before's 8 s are too short to show how it moves"),
            "{why}"
        );
        // With untreated proxies beside the treated ones the stage before is not consulted.
        let verdict = judge(&slo, &harmless, &baseline, &timed(&[1.35; 5]), &timed(&[9.0; 5]), &quiet);
        let Verdict::Pass(why) = verdict else { panic!("{verdict:?}") };
        assert!(!why.contains("stage before"), "{why}");
    }

    /// The demo held half the requests +40 ms at stage 1: callers had put 540 of orders' 602
    /// requests on the treated proxies, and the 62 untreated ones came in three reports, which
    /// the rank test cannot use. Untreated traffic that small does not lead: the baseline
    /// does, and the untreated proxies only corroborate. A harmless stage still passes, and
    /// untreated traffic of a fair size still leads.
    #[test]
    fn untreated_traffic_far_smaller_than_the_treated_leaves_the_baseline_to_lead() {
        let slo = issue_slo();
        let none = Evidence::default();
        // The same proxies' other traffic, steady: what lets the baseline lead.
        let steady = Drift {
            before: timed(&[3.0; 30]),
            since: timed(&[3.0; 14]),
        };
        let baseline = timed(&[1.7; 30]);
        let small = timed(&[1.7; 2]);
        // Every report half at 1.7 ms and half at 41.7 ms.
        let slow = timed_mixed(&vec![vec![1.7, 41.7]; 14]);
        let verdict = judge(&slo, &slow, &baseline, &small, &none, &steady);
        let Verdict::Fail(why) = verdict else {
            panic!("+40 ms on half the requests against a small untreated side: {verdict:?}")
        };
        assert!(why.starts_with("latency p50 "), "{why}");
        assert!(
            why.contains(" baseline (net of the same proxies' other traffic: ") && why.contains(" untreated (typically +"),
            "{why}"
        );
        let verdict = judge(&slo, &timed(&[1.7; 14]), &baseline, &small, &none, &steady);
        let Verdict::Pass(why) = verdict else { panic!("{verdict:?}") };
        assert!(
            why.contains("errors vs baseline (net") && why.contains("errors vs untreated at most"),
            "{why}"
        );
        let (baseline_at, untreated_at) = (why.find("vs baseline").expect("named"), why.find("vs untreated").expect("named"));
        assert!(baseline_at < untreated_at, "the baseline leads: {why}");
        // Without other traffic to net the machine's drift out, the untreated proxies lead
        // however few (they wait for their fourth report).
        let verdict = judge(&slo, &slow, &baseline, &small, &none, &Drift::default());
        assert!(
            matches!(verdict, Verdict::Suspect(ref why) if why.contains("(14 treated, 2 untreated)")),
            "{verdict:?}"
        );
        // A quarter as many untreated requests as treated ones: they lead.
        let verdict = judge(&slo, &timed(&[1.7; 14]), &baseline, &timed(&[1.7; 4]), &none, &steady);
        let Verdict::Pass(why) = verdict else { panic!("{verdict:?}") };
        let (untreated_at, baseline_at) = (why.find("vs untreated").expect("named"), why.find("vs baseline").expect("named"));
        assert!(untreated_at < baseline_at, "the untreated proxies lead: {why}");
    }

    /// The demo promoted +3% errors at 100% on 6.2% of 160 requests against 1.5% of 668 before:
    /// not shown at 99% on so few, but far above the +1 pp that matters. The stage keeps
    /// watching (held for a person if it stays so); a rate within the increase still passes.
    #[test]
    fn errors_above_the_increase_that_matters_keep_the_stage_watching() {
        let slo = issue_slo();
        let none = Evidence::default();
        let verdict = judged(&slo, &evidence(160, 10, 2.0), &evidence(668, 10, 2.0), &none);
        let Verdict::Suspect(why) = verdict else {
            panic!("6.2% against 1.5% passed: {verdict:?}")
        };
        assert!(
            why.ends_with("error rate 6.2% vs 1.5% baseline (+4.8 pp, 160 vs 668 requests): above the +1 pp that matters, not yet shown at 99% confidence (p 0.0020 that it is higher at all, at this look)"),
            "{why}"
        );
        // The demo's stage 1 of +3% errors: 5 of 160 treated requests failing against none of
        // 160 untreated. The always-valid test's p is far above 0.1; the exact test's is 1/32.
        let untreated = evidence(160, 0, 2.0);
        let verdict = judged(&slo, &evidence(160, 5, 2.0), &evidence(1000, 0, 2.0), &untreated);
        let Verdict::Suspect(why) = verdict else {
            panic!("5 of 160 failing against none passed: {verdict:?}")
        };
        assert!(
            why.contains("(+3.1 pp, 160 vs 160 requests)") && why.contains("(p 0.031 that"),
            "{why}"
        );
        // Three times the time at the same rates is shown (15 of 480 against none of 480).
        let verdict = judged(&slo, &evidence(480, 15, 2.0), &evidence(1000, 0, 2.0), &evidence(480, 0, 2.0));
        assert!(matches!(verdict, Verdict::Fail(_)), "{verdict:?}");
        // Two of 160 against none of 160 is a gap beyond +1 pp and chance one time in four: passes.
        let verdict = judged(&slo, &evidence(160, 2, 2.0), &evidence(1000, 0, 2.0), &untreated);
        assert!(matches!(verdict, Verdict::Pass(_)), "{verdict:?}");
        let Verdict::Fail(why) = judged(&slo, &evidence(480, 30, 2.0), &evidence(668, 10, 2.0), &none) else {
            panic!("three times the evidence shows it")
        };
        assert!(why.starts_with("error rate 6.2% vs 1.5% baseline"), "{why}");
        let verdict = judged(&slo, &evidence(160, 3, 2.0), &evidence(668, 10, 2.0), &none);
        assert!(
            matches!(verdict, Verdict::Pass(_)),
            "1.9% against 1.5% is within +1 pp: {verdict:?}"
        );
    }

    /// Evidence of `reports` telemetry reports of `each` requests, all taking `ms`.
    fn by_reports(reports: u64, each: u64, ms: f64) -> Evidence {
        let mut e = Evidence::default();
        for _ in 0..reports {
            e.add(each, 0, &[slot_of(ms) as u32], &[each]);
        }
        e
    }

    /// Seen end to end: a treated caller slowed 35-fold by a change (every orders call +50 ms)
    /// sent 74 requests in three reports during its bake, and the stage passed: with fewer than
    /// four reports on a side, latency's variance between reports is unknown and the rank test
    /// shows nothing. It waits for a fourth report, then rolls back.
    #[test]
    fn latency_is_not_passed_on_fewer_than_four_reports() {
        let slo = issue_slo();
        let untreated = evidence(185, 0, 1.6);
        let verdict = judged(&slo, &by_reports(3, 25, 57.7), &evidence(1000, 0, 1.6), &untreated);
        let Verdict::Suspect(why) = verdict else {
            panic!("35 times slower passed on three reports: {verdict:?}")
        };
        assert!(
            why.ends_with("latency not judged before 4 reports on each side (3 treated, 185 untreated)"),
            "{why}"
        );
        let verdict = judged(&slo, &by_reports(4, 25, 57.7), &evidence(1000, 0, 1.6), &untreated);
        assert!(
            matches!(verdict, Verdict::Fail(ref why) if why.starts_with("latency p50 ")),
            "{verdict:?}"
        );
    }

    /// Found end to end: on a mesh younger than the window, a 100% stage's baseline held one
    /// report, and the four-report rule held a harmless onboarding to the end of its bake. A
    /// fixed baseline never gains reports, so latency goes unjudged against it, and says so.
    #[test]
    fn a_baseline_that_cannot_gain_reports_does_not_hold_the_stage() {
        let slo = Slo {
            max_p99_increase: 20.0,
            min_requests: 20,
            ..Slo::default()
        };
        let verdict = judged(&slo, &by_reports(5, 25, 3.0), &by_reports(1, 40, 1.6), &Evidence::default());
        let Verdict::Pass(why) = verdict else {
            panic!("held on a baseline that cannot grow: {verdict:?}")
        };
        assert!(
            why.ends_with("latency not judged: the baseline holds 1 of the 4 reports it needs"),
            "{why}"
        );
        // Against untreated proxies, which do gain reports, it still waits.
        let verdict = judged(&slo, &by_reports(5, 25, 3.0), &by_reports(1, 40, 1.6), &by_reports(2, 40, 1.6));
        assert!(
            matches!(verdict, Verdict::Suspect(ref why) if why.contains("(5 treated, 2 untreated)")),
            "{verdict:?}"
        );
    }

    #[test]
    fn at_100_percent_the_machine_s_drift_is_not_the_change() {
        // The whole machine 27% slower and erring 2 pp more during the stage: the target service
        // and the same proxies' other traffic (a different service, half the latency) alike.
        let slo = Slo::default();
        let baseline = evidence(3000, 12, 4.0);
        let drift = Drift {
            before: evidence(3000, 12, 2.0),
            since: evidence(2000, 48, 2.0 * 1.27),
        };
        let harmless = evidence(2000, 48, 4.0 * 1.27);
        let none = Evidence::default();
        let Verdict::Fail(why) = judged(&slo, &harmless, &baseline, &none) else {
            panic!("against the baseline alone, drift looks like harm")
        };
        assert!(why.contains("vs 0.4% baseline"), "{why}");
        let Verdict::Pass(why) = judge(&slo, &harmless, &baseline, &none, &Evidence::default(), &drift) else {
            panic!("net of drift, a harmless change passes")
        };
        assert!(
            why.contains("net of the same proxies' other traffic: +27% latency, +2.0 pp errors"),
            "{why}"
        );
        // A real change on top of the drift still fails, and says by how much beyond it.
        let slow = evidence(2000, 48, 4.0 * 1.27 * 1.5);
        let Verdict::Fail(why) = judge(&slo, &slow, &baseline, &none, &Evidence::default(), &drift) else {
            panic!("+50% beyond the drift is harm")
        };
        let typical: f64 = why
            .split("typically +")
            .nth(1)
            .and_then(|t| t.split('%').next())
            .unwrap()
            .parse()
            .unwrap();
        assert!((45.0..=55.0).contains(&typical) && why.contains("confident it is slower"), "{why}");
        let failing = evidence(2000, 148, 4.0 * 1.27);
        let Verdict::Fail(why) = judge(&slo, &failing, &baseline, &none, &Evidence::default(), &drift) else {
            panic!("+5 pp errors beyond the drift is harm")
        };
        assert!(why.contains("(+5.0 pp,"), "{why}");
        // Found in the demo (run 4, promoted): 11 errors in 154 treated requests against 9 in
        // 1,091 before, none in the other traffic. With 150 other requests since, a 7% drift
        // is not yet excluded (11 errors on the treated side and none on the other is what
        // equal rates give one time in 2,000, short of an always-valid 99%): not a pass, the
        // stage keeps watching; with twice the evidence it is rolled back.
        let quiet = |since: u64| Drift {
            before: evidence(1000, 0, 2.0),
            since: evidence(since, 0, 2.0),
        };
        let run4 = |n: u64, errors: u64| {
            judge(
                &slo,
                &evidence(n, errors, 4.0),
                &evidence(1091, 9, 4.0),
                &none,
                &Evidence::default(),
                &quiet(n),
            )
        };
        let verdict = run4(154, 11);
        assert!(matches!(verdict, Verdict::Suspect(_)), "{verdict:?}");
        let Verdict::Fail(why) = run4(308, 22) else {
            panic!("+6.3 pp of errors net of no drift is harm: {:?}", run4(308, 22))
        };
        assert!(why.contains("error rate 7.1% vs 0.8% baseline (net of"), "{why}");
        // Demo run 5's +3% fault, with the issue's SLO: 4 errors in 160 treated requests against
        // none in 1,193 before, and the same proxies' other traffic (profile-svc, called once per
        // checkout like orders-api) none in 160 since and 1,193 before. No test can roll that
        // back at 99% (all four errors on the treated side happen one time in 16 if the rates
        // are equal), but it must not pass: the stage keeps watching (held for a person after
        // three bakes), and with four times the evidence at the same rates it is rolled back.
        let issue = issue_slo();
        let run5 = |n: u64, errors: u64| {
            let d = Drift {
                before: evidence(1193, 0, 2.0),
                since: evidence(n, 0, 2.0),
            };
            judge(
                &issue,
                &evidence(n, errors, 4.0),
                &evidence(1193, 0, 4.0),
                &none,
                &Evidence::default(),
                &d,
            )
        };
        let Verdict::Suspect(why) = run5(160, 4) else {
            panic!("4 errors in 160 against none passed: {:?}", run5(160, 4))
        };
        assert!(
            why.starts_with("error rate 2.5% vs 0.0% baseline (+2.5 pp, 160 vs 1,193 requests, ")
                && why.ends_with("other traffic moved +0.0 pp (0 errors in 160 requests since, 0 in 1,193 before): not yet enough to tell the change from a drift"),
            "{why}"
        );
        let verdict = run5(480, 12);
        assert!(matches!(verdict, Verdict::Suspect(_)), "{verdict:?}");
        let Verdict::Fail(why) = run5(640, 16) else {
            panic!("16 errors in 640 against none is harm: {:?}", run5(640, 16))
        };
        assert!(why.starts_with("error rate 2.5% vs 0.0% baseline (net of"), "{why}");
        // No errors beyond the drift's: a pass, as before.
        assert!(matches!(run5(160, 0), Verdict::Pass(_)), "{:?}", run5(160, 0));
        // With untreated traffic the concurrent reference already cancels the drift: unused.
        let peers = evidence(2000, 48, 4.0 * 1.27);
        let Verdict::Pass(why) = judge(&slo, &harmless, &baseline, &peers, &Evidence::default(), &drift) else {
            panic!()
        };
        assert!(!why.contains("net of"), "{why}");
    }

    /// The demo's bad stage 1 (run 3): the treated caller chosen at 55% of the traffic, then
    /// 23 of 598 requests while the gateway balanced away from it. A harmless stage's share
    /// wanders, and a closed-loop caller slowed within the SLO sends somewhat less: neither is
    /// a fall to a tenth.
    #[test]
    fn traffic_moving_away_from_the_treated_proxies_is_harm() {
        let slo = Slo {
            min_requests: 20,
            ..Slo::default()
        };
        // A steady split: the totals spread evenly over a minute before and 10 s since.
        let split = |before: (u64, u64), since: (u64, u64)| Split {
            before: steady(before, 30),
            since: steady(since, 5),
            window: Duration::from_secs(10),
            silent: 0,
        };
        let why = traffic_moved(&slo, &split((1234, 1002), (23, 575))).expect("starved");
        assert_eq!(
            why,
            "traffic moved away from the treated proxies: 3.8% of the requests since the swap (23 of 598) against 55.2% before (1,234 of 2,236), -97% per untreated request, over 99.99% confident it fell to under a tenth (callers balancing away from a slower instance)"
        );
        assert!(traffic_moved(&slo, &split((1234, 1002), (4, 596))).is_some());
        // Harmless: the same share, or a share that wandered from 55% to 45%, or from 70% to
        // 30% (the demo's checkout instances, minute to minute).
        assert_eq!(traffic_moved(&slo, &split((1234, 1002), (300, 300))), None);
        assert_eq!(traffic_moved(&slo, &split((1234, 1002), (270, 330))), None);
        assert_eq!(traffic_moved(&slo, &split((1400, 600), (900, 2100))), None);
        // Two of four closed-loop callers 50% slower: a third fewer requests, not half.
        assert_eq!(traffic_moved(&slo, &split((3000, 3000), (2000, 3000))), None);
        // A window before too short to show how the split swings (three intervals): no verdict.
        let young = Split {
            before: steady((263, 1), 3),
            since: steady((1, 86), 2),
            window: Duration::from_secs(4),
            silent: 0,
        };
        assert!(
            share_fall(&young).1 < 0.00375,
            "the log test alone would roll it back: {:?}",
            share_fall(&young)
        );
        assert_eq!(traffic_moved(&slo, &young), None);
        assert_eq!(traffic_seems_moved(&slo, &young), None);
        // Few requests since: no verdict before minRequests; a 100% stage has no untreated side.
        assert_eq!(traffic_moved(&slo, &split((1234, 1002), (0, 19))), None);
        assert_eq!(traffic_moved(&slo, &split((2236, 0), (598, 0))), None);
        // Beyond a tenth, but the evidence is thin: 1 of 20 against 55% is not yet shown.
        assert_eq!(traffic_moved(&slo, &split((1234, 1002), (1, 19))), None);
        // Suggested, though: the stage watches on rather than passing (the demo's half +40 ms
        // held on 8 treated of 1,500, its probes bursting into few intervals). What is shown
        // or plainly not a fall is not suspected.
        let thin = traffic_seems_moved(&slo, &split((1234, 1002), (2, 300))).expect("suggested");
        assert_eq!(traffic_moved(&slo, &split((1234, 1002), (2, 300))), None);
        assert!(
            thin.starts_with("callers seem to be moving away from the treated proxies (p 0.0070 that"),
            "{thin}"
        );
        assert_eq!(traffic_seems_moved(&slo, &split((1234, 1002), (23, 575))), None, "shown");
        assert_eq!(traffic_seems_moved(&slo, &split((1234, 1002), (270, 330))), None);
        assert_eq!(
            traffic_seems_moved(&slo, &split((1234, 1002), (100, 500))),
            None,
            "a sixth, not a tenth"
        );
    }

    /// The end-to-end test's stall: every request went to the untreated instance after the
    /// swap. Half a request standing in for the zero kept the log test's variance above 2, and
    /// 0 of 300 against 90% before was not yet enough for it (99.5% took 0 of about 2,000).
    /// Counted as one request it is (the exact test alone said 99.7%).
    #[test]
    fn no_treated_request_at_all_is_judged_exactly() {
        let slo = Slo {
            min_requests: 20,
            ..Slo::default()
        };
        let split = |before: (u64, u64), since: (u64, u64), window: u64| Split {
            before: steady(before, 30),
            since: steady(since, (window as usize / 2).max(1)),
            window: Duration::from_secs(window),
            silent: 0,
        };
        let why = traffic_moved(&slo, &split((900, 100), (0, 300), 10)).expect("0 of 300 against 90%");
        assert_eq!(
            why,
            "traffic moved away from the treated proxies: 0.0% of the requests since the swap (0 of 300) against 90.0% before (900 of 1,000), -100% per untreated request, over 99.99% confident it fell to under a tenth (callers balancing away from a slower instance)"
        );
        // Against 55% before, a tenth of the odds is a share of 9%: none of 40 happens one time
        // in 50 at that share, none of 100 one time in 10,000.
        assert_eq!(traffic_moved(&slo, &split((1234, 1002), (0, 40), 10)), None);
        assert!(traffic_moved(&slo, &split((1234, 1002), (0, 100), 10)).is_some());
        // Within two report intervals a treated proxy may just not have reported yet.
        assert_eq!(traffic_moved(&slo, &split((1234, 1002), (0, 100), 3)), None);
        assert!(traffic_moved(&slo, &split((1234, 1002), (0, 100), 4)).is_some());
        // Nor while a treated proxy has not reported since the warm-up (one reconnecting).
        let silent = Split {
            silent: 1,
            ..split((900, 100), (0, 300), 10)
        };
        assert_eq!(traffic_moved(&slo, &silent), None);
    }

    /// CI's hold (session 28): web's P2C put 75% of checkout's calls on the instance about to
    /// be treated, swinging whole intervals between the two; after the swap the treated one got
    /// no request at all for 28 s (its latency estimate decays for about 40 s). The exact test
    /// counts such correlated requests as about one per interval, too few to be sure of a fall
    /// (it stood at 48%), and the log test's half request left it short too: held, then given
    /// up. Counted as one request it is a fall; a moment of none after the same minute is not.
    #[test]
    fn no_treated_request_after_a_swinging_minute_is_judged_as_one() {
        let slo = issue_slo();
        let before: Vec<(u64, u64)> = [
            vec![(0, 0); 11],
            vec![(192, 1), (200, 0), (199, 1), (200, 0), (200, 0), (199, 1), (200, 0), (199, 1)],
            vec![(43, 151), (136, 70), (196, 4), (94, 100), (2, 198), (1, 199), (171, 35)],
            vec![(199, 1), (199, 1), (198, 2), (25, 169)],
        ]
        .concat();
        assert_eq!(Split::totals(&before), (2853, 934));
        let since = |intervals: usize| Split {
            before: before.clone(),
            since: vec![(0, 200); intervals],
            window: Duration::from_secs(2 * intervals as u64),
            silent: 0,
        };
        // Up to 8 s of none is within the minute's swings (it held 0.5-1% treated for 4 s).
        for n in 1..=4 {
            assert_eq!(traffic_moved(&slo, &since(n)), None, "{n} intervals");
        }
        assert!(traffic_moved(&slo, &since(7)).is_some());
        let why = traffic_moved(&slo, &since(14)).expect("none of 2,800 against 75% before");
        assert!(
            why.contains("0.0% of the requests since the swap (0 of 2,800) against 75.3% before (2,853 of 3,787)"),
            "{why}"
        );
        assert!(why.contains("confident it fell to under a tenth"), "{why}");
    }

    /// The SLO of the issue's demo intents (#13): 5% errors at most, +1 pp and +20% p99 the
    /// smallest changes that matter, 20 requests before a verdict.
    fn issue_slo() -> Slo {
        Slo {
            max_error_rate: 5.0,
            max_error_rate_increase: 1.0,
            max_p99_increase: 20.0,
            min_requests: 20,
            ..Slo::default()
        }
    }

    /// `(treated, untreated)` totals spread as evenly as counts allow over `intervals`.
    fn steady(total: (u64, u64), intervals: usize) -> Vec<(u64, u64)> {
        let k = intervals as u64;
        (0..k)
            .map(|i| {
                let part = |n: u64| n * (i + 1) / k - n * i / k;
                (part(total.0), part(total.1))
            })
            .collect()
    }

    /// The demo's false rollback (run 6, HARMLESS-4, a timeout raised): 11 of 120 requests to
    /// the treated caller in the three report intervals since the swap, against 78.8% (921 of
    /// 1,169) the minute before. Counted as independent requests that was 99.7% sure to be a
    /// fall to under a tenth; but mobile-gateway balances checkout v1 and v2 by P2C over
    /// peak-EWMA, which keeps nearly all of its traffic on one instance for seconds at a time
    /// (v1 and v2 each carried 30-70% minute to minute, one run 97%). The minute before, as
    /// such a balancer splits it: stretches of 10 s at 58-97%. Against it, the same three
    /// intervals are a swing, not harm; against a minute that never moved they still are harm,
    /// and a stage the caller keeps avoiding is rolled back once the evidence outlasts the swings.
    #[test]
    fn a_balancer_s_own_swing_is_not_traffic_moving_away() {
        let slo = issue_slo();
        let stretch = |n: usize, b: (u64, u64)| vec![b; n];
        let swinging: Vec<(u64, u64)> = [
            stretch(4, (38, 1)),
            stretch(1, (37, 1)),
            stretch(5, (24, 15)),
            stretch(5, (37, 2)),
            stretch(5, (23, 16)),
            stretch(5, (36, 3)),
            stretch(3, (26, 13)),
            stretch(2, (27, 12)),
        ]
        .concat();
        assert_eq!(Split::totals(&swinging), (921, 248));
        let since = vec![(2, 38), (4, 36), (5, 35)];
        let harmless = Split {
            before: swinging.clone(),
            since: since.clone(),
            window: Duration::from_secs(6),
            silent: 0,
        };
        assert_eq!(traffic_moved(&slo, &harmless), None, "variance {}", split_variance(&harmless, 11));
        // The same three intervals after a minute that held 78.8% throughout: harm.
        let steady_before = Split {
            before: steady((921, 248), 30),
            ..harmless.clone()
        };
        let why = traffic_moved(&slo, &steady_before).expect("a fall from a split that never moved");
        assert!(
            why.contains("9.2% of the requests since the swap (11 of 120) against 78.8% before (921 of 1,169)"),
            "{why}"
        );
        // A bad stage the caller avoids as BAD-2's was (4 of 282, 1.4%), after the same
        // swinging minute: beyond what the swings explain in the same three intervals.
        let avoided = Split {
            since: vec![(1, 94), (2, 94), (1, 94)],
            ..harmless
        };
        let why = traffic_moved(&slo, &avoided).expect("a fall to 1.4% after the swinging minute");
        assert!(why.contains("(4 of 286) against 78.8% before"), "{why}");
    }

    /// The demo's other false rollback (run 6, HARMLESS-3, at 100%): "+27% net of the same
    /// proxies' other traffic", which had got 30% faster while orders-api had not (its requests
    /// were typically 11% faster than the minute before: 0.89 / 0.70 = 1.27). A drift may
    /// explain a slowdown away, never manufacture one.
    #[test]
    fn a_drift_that_sped_other_traffic_up_does_not_make_the_service_slower() {
        let slo = issue_slo();
        // The other traffic (profile-svc, called once per checkout as orders-api is) as many
        // requests as orders-api's, before and since.
        let faster = Drift {
            before: evidence(1011, 0, 2.0),
            since: evidence(134, 0, 2.0 * 0.70),
        };
        let baseline = evidence(1011, 0, 2.06);
        let none = Evidence::default();
        let verdict = judge(
            &slo,
            &evidence(134, 0, 2.06 * 0.89),
            &baseline,
            &none,
            &Evidence::default(),
            &faster,
        );
        let Verdict::Pass(why) = verdict else {
            panic!("11% faster than the baseline rolled back: {verdict:?}")
        };
        assert!(
            why.contains("% latency (faster: not netted), +0.0 pp errors)") && why.contains("(134 vs 1,011 requests)"),
            "{why}"
        );
        // A real slowdown of the service still shows against the baseline as measured.
        let verdict = judge(&slo, &evidence(134, 0, 2.06 * 1.6), &baseline, &none, &Evidence::default(), &faster);
        assert!(
            matches!(verdict, Verdict::Fail(ref why) if why.starts_with("latency p50 ")),
            "{verdict:?}"
        );
        // The demo's BAD-2 at 100% after this change (promoted while the factor's uncertainty
        // was still carried): half the requests +40 ms, 155 against 508, the other traffic 18%
        // faster.
        let mut half = Evidence::default();
        for i in 0..155 {
            half.record(false, 1.9 * (0.5 + (i % 100) as f64 / 99.0) + if i % 2 == 0 { 40.0 } else { 0.0 });
        }
        let sped = Drift {
            before: evidence(508, 0, 2.0),
            since: evidence(155, 0, 2.0 * 0.82),
        };
        let verdict = judge(&slo, &half, &evidence(508, 0, 1.9), &none, &Evidence::default(), &sped);
        assert!(
            matches!(verdict, Verdict::Fail(ref why) if why.starts_with("latency p50 ")),
            "{verdict:?}"
        );
        // Fewer errors elsewhere are not counted against the change either: 1 error in 134
        // against none before passes when the other traffic went from 2% to none.
        let fewer = Drift {
            before: evidence(1011, 20, 2.0),
            since: evidence(134, 0, 2.0),
        };
        let verdict = judge(&slo, &evidence(134, 1, 2.06), &baseline, &none, &Evidence::default(), &fewer);
        assert!(
            matches!(verdict, Verdict::Pass(ref why) if why.contains("-2.0 pp errors (fewer: not netted)")),
            "{verdict:?}"
        );
    }

    #[test]
    fn numbers_read_as_a_person_writes_them() {
        assert_eq!(count(3980), "3,980");
        assert_eq!(count(412), "412");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(confidence(0.001), "99.90%");
        assert_eq!(confidence(0.0003), "99.97%");
        assert_eq!(confidence(0.011), "98.9%");
        assert_eq!(confidence(1e-7), "over 99.99%");
        assert_eq!(trim(0.5), "0.5");
        assert_eq!(trim(20.0), "20");
    }

    #[test]
    fn scope_narrows_routes_and_selectors() {
        let mut r = weft_api::resource::parse_resources(
            "apiVersion: weft/v1\nkind: TrafficPolicy\nmetadata: {name: t}\nspec: {service: a, routes: [{timeout: 1s}]}\n",
            "t",
        )
        .unwrap()
        .remove(0);
        narrow(&mut r, "tenant:acme");
        let Resource::TrafficPolicy(d) = &r else { panic!() };
        assert_eq!(
            d.spec.routes[0].match_.as_ref().unwrap().headers["x-tenant"],
            StringMatch::from("acme")
        );
    }
}

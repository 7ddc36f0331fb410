//! Per-destination state the data plane keeps between requests: endpoint latency and load for
//! P2C over peak-EWMA, outlier ejection, the retry budget, the rate limiter and the pool limits.
//!
//! A [`ServiceRuntime`] is rebuilt on every config swap from the new [`ServiceConfig`], reusing
//! the state of endpoints and budgets that carry over, so a swap neither forgets an ejection nor
//! refills a budget. Every per-request update is an atomic; nothing here locks.

use crate::route::{self, CompiledRoute};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};
use weft_api::mesh::ServiceConfig;
use weft_api::resource::{ConnectionPool, LoadBalancer, OutlierDetection, RateLimit, RateLimitAt};

/// Peak-EWMA decay time: a latency spike fades over about this long.
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// Latency assumed for an endpoint before its first answer.
const EWMA_INITIAL: Duration = Duration::from_millis(1);
/// Outlier detection when the policy has none.
pub(crate) const DEFAULT_OUTLIER: (u32, Duration, f64) = (5, Duration::from_secs(10), 50.0);
/// Longest ejection, however often an endpoint fails its probes.
const MAX_EJECTION: Duration = Duration::from_secs(300);
/// The retry budget's window.
const BUDGET_SLOTS: usize = 10;

/// One destination service, as the data plane runs it.
pub(crate) struct ServiceRuntime {
    pub(crate) config: Arc<ServiceConfig>,
    /// The service's name, shared with every metric series that carries it.
    pub(crate) name: Arc<str>,
    /// Each endpoint's SPIFFE ID (parallel to `config.endpoints`), shared likewise.
    pub(crate) identities: Vec<Arc<str>>,
    pub(crate) routes: Vec<CompiledRoute>,
    pub(crate) default_route: CompiledRoute,
    /// Parallel to `config.endpoints`.
    pub(crate) endpoints: Vec<Arc<EndpointState>>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) limiter: Option<Arc<RateLimiter>>,
    pub(crate) lb: LoadBalancer,
    pub(crate) pool: ConnectionPool,
    pub(crate) outlier: (u32, Duration, f64),
    /// Per subset (`None`: every endpoint), endpoint indexes grouped by locality priority.
    localities: Vec<(Option<String>, Vec<Vec<usize>>)>,
}

/// Endpoint indexes of `subset`, grouped: `own_cluster`, each cluster of `failover`, the rest.
fn locality_groups(config: &ServiceConfig, subset: Option<&str>, own_cluster: &str) -> Vec<Vec<usize>> {
    let all: Vec<usize> = (0..config.endpoints.len())
        .filter(|i| subset.is_none_or(|s| config.endpoints[*i].subset() == Some(s)))
        .collect();
    let failover = config.policy.as_ref().map(|p| p.failover.as_slice()).unwrap_or(&[]);
    let mut groups: Vec<Vec<usize>> = Vec::with_capacity(failover.len() + 2);
    let mut placed = vec![false; config.endpoints.len()];
    for cluster in std::iter::once(own_cluster).chain(failover.iter().map(String::as_str)) {
        let group: Vec<usize> = all
            .iter()
            .copied()
            .filter(|i| !placed[*i] && config.endpoints[*i].cluster == cluster)
            .collect();
        for i in &group {
            placed[*i] = true;
        }
        if !group.is_empty() {
            groups.push(group);
        }
    }
    let rest: Vec<usize> = all.into_iter().filter(|i| !placed[*i]).collect();
    if !rest.is_empty() {
        groups.push(rest);
    }
    groups
}

/// State of one endpoint, kept across config swaps while the endpoint stays.
pub(crate) struct EndpointState {
    pub(crate) address: SocketAddr,
    ewma_ns: AtomicU64,
    ewma_at_ms: AtomicU64,
    in_flight: AtomicU32,
    consecutive_failures: AtomicU32,
    ejected_until_ms: AtomicU64,
    ejections: AtomicU32,
}

/// State of one destination kept across config swaps: the retry budget, requests in flight
/// and the round-robin cursor.
pub(crate) struct Shared {
    pub(crate) budget: RetryBudget,
    pub(crate) in_flight: AtomicU32,
    pub(crate) connections: Arc<AtomicU32>,
    rr: AtomicUsize,
}

/// Retries allowed over a sliding window of ten one-second slots: at most `ratio` of the
/// requests in the window plus `min_per_second` for each second of the window that saw
/// requests, so neither a new nor an idle destination gets a burst of retries.
pub(crate) struct RetryBudget {
    slots: [Slot; BUDGET_SLOTS],
}

#[derive(Default)]
struct Slot {
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

/// A token bucket as one atomic (GCRA): the theoretical arrival time of the next request.
pub(crate) struct RateLimiter {
    pub(crate) limit: RateLimit,
    interval_ns: u64,
    tolerance_ns: u64,
    tat_ns: AtomicU64,
    start: Instant,
}

/// Candidates for one request in the order to try them: groups by locality priority.
pub(crate) struct Candidates<'a> {
    groups: &'a [Vec<usize>],
}

/// An endpoint's answer, for outlier detection and latency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    /// Connecting failed, the stream was reset, a per-try timeout fired, or the upstream
    /// answered 5xx.
    Failure,
}

// === impl ServiceRuntime ===

impl ServiceRuntime {
    pub(crate) fn build(config: Arc<ServiceConfig>, previous: Option<&ServiceRuntime>, own_cluster: &str) -> Self {
        let policy = config.policy.as_ref();
        let endpoints = config
            .endpoints
            .iter()
            .map(|e| {
                previous
                    .and_then(|p| p.endpoints.iter().find(|s| s.address == e.address))
                    .cloned()
                    .unwrap_or_else(|| Arc::new(EndpointState::new(e.address)))
            })
            .collect();
        let limit = policy.and_then(|p| p.rate_limit.clone()).filter(|r| r.at == RateLimitAt::Outbound);
        let limiter = limit.map(|l| match previous.and_then(|p| p.limiter.as_ref()) {
            Some(prev) if prev.limit == l => prev.clone(),
            _ => Arc::new(RateLimiter::new(l)),
        });
        let outlier = policy
            .and_then(|p| p.outlier_detection.as_ref())
            .map(|o: &OutlierDetection| (o.consecutive_failures, o.ejection.as_std(), o.max_ejected_percent))
            .unwrap_or(DEFAULT_OUTLIER);
        let mut subsets: Vec<Option<String>> = vec![None];
        for e in &config.endpoints {
            let s = e.subset().map(str::to_string);
            if s.is_some() && !subsets.contains(&s) {
                subsets.push(s);
            }
        }
        let localities = subsets
            .into_iter()
            .map(|s| {
                let groups = locality_groups(&config, s.as_deref(), own_cluster);
                (s, groups)
            })
            .collect();
        ServiceRuntime {
            localities,
            name: Arc::from(config.name.as_str()),
            identities: config.endpoints.iter().map(|e| Arc::from(e.identity.as_str())).collect(),
            routes: route::compile(policy),
            default_route: CompiledRoute::default_route(),
            endpoints,
            shared: previous.map(|p| p.shared.clone()).unwrap_or_default(),
            limiter,
            lb: policy.and_then(|p| p.load_balancer).unwrap_or_default(),
            pool: policy.and_then(|p| p.connection_pool.clone()).unwrap_or_default(),
            outlier,
            config,
        }
    }

    /// Endpoints a request for `subset` may go to, grouped by priority: the caller's cluster,
    /// then each cluster of `failover` in order, then the rest. Computed once per config swap;
    /// ejection is applied when picking.
    pub(crate) fn candidates(&self, subset: Option<&str>) -> Candidates<'_> {
        let groups = self
            .localities
            .iter()
            .find(|(s, _)| s.as_deref() == subset)
            .map(|(_, g)| g.as_slice())
            .unwrap_or(&[]);
        Candidates { groups }
    }

    /// Picks an endpoint from the first group with one neither ejected nor `tried` (a group
    /// whose endpoints are all ejected is skipped, which moves traffic to the next cluster and
    /// back once one returns): P2C over peak-EWMA (two at random, the lower latency x load
    /// wins) or round-robin. Allocates nothing.
    pub(crate) fn pick(&self, candidates: &Candidates<'_>, tried: &[usize]) -> Option<usize> {
        let now = crate::clock::mono_ms();
        let usable = |i: &&usize| !tried.contains(*i) && !self.endpoints[**i].ejected(now);
        let group = candidates.groups.iter().find(|g| g.iter().any(|i| usable(&i)))?;
        let n = group.iter().filter(usable).count();
        let nth = |k: usize| *group.iter().filter(usable).nth(k).expect("k < n");
        if n == 1 {
            return Some(nth(0));
        }
        match self.lb {
            LoadBalancer::RoundRobin => Some(nth(self.shared.rr.fetch_add(1, Relaxed) % n)),
            LoadBalancer::P2cEwma => {
                let a = rand::random_range(0..n);
                let mut b = rand::random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (a, b) = (nth(a), nth(b));
                Some(if self.endpoints[a].cost(now) <= self.endpoints[b].cost(now) {
                    a
                } else {
                    b
                })
            }
        }
    }

    /// Records an endpoint's answer; ejects it after `consecutiveFailures` in a row, unless
    /// that would eject more than `maxEjectedPercent` of the service. Returns whether it was
    /// ejected now.
    pub(crate) fn observe(&self, i: usize, outcome: Outcome, latency: Option<Duration>) -> bool {
        let e = &self.endpoints[i];
        if let Some(l) = latency {
            e.observe_latency(l);
        }
        if outcome == Outcome::Success {
            e.consecutive_failures.store(0, Relaxed);
            if e.ejected_until_ms.load(Relaxed) != 0 {
                // Probed back successfully: forget the ejection history.
                e.ejected_until_ms.store(0, Relaxed);
                e.ejections.store(0, Relaxed);
            }
            return false;
        }
        let (threshold, base, max_percent) = self.outlier;
        let failures = e.consecutive_failures.fetch_add(1, Relaxed) + 1;
        let now = crate::clock::mono_ms();
        if failures < threshold || e.ejected(now) {
            return false;
        }
        let total = self.endpoints.len();
        let ejected = self.endpoints.iter().filter(|x| x.ejected(now)).count();
        if ((ejected + 1) as f64) > max_percent / 100.0 * total as f64 {
            return false;
        }
        let n = e.ejections.fetch_add(1, Relaxed);
        let duration = base.saturating_mul(1 << n.min(16)).min(MAX_EJECTION.max(base));
        e.ejected_until_ms.store(now + duration.as_millis() as u64, Relaxed);
        // On return it is on probation: one more failure ejects it again, for twice as long.
        e.consecutive_failures.store(threshold.saturating_sub(1), Relaxed);
        tracing::info!(service = %self.config.name, endpoint = %e.address, ejection = ?duration, "endpoint ejected after {failures} consecutive failures");
        true
    }

    /// Records how long endpoint `i` took to answer, before its outcome is known.
    pub(crate) fn observe_latency(&self, i: usize, latency: Duration) {
        self.endpoints[i].observe_latency(latency);
    }

    /// How many endpoints are ejected now.
    pub(crate) fn ejected(&self) -> usize {
        let now = crate::clock::mono_ms();
        self.endpoints.iter().filter(|e| e.ejected(now)).count()
    }
}

// === impl EndpointState ===

impl EndpointState {
    fn new(address: SocketAddr) -> Self {
        EndpointState {
            address,
            ewma_ns: AtomicU64::new((EWMA_INITIAL.as_nanos() as f64).to_bits()),
            ewma_at_ms: AtomicU64::new(crate::clock::mono_ms()),
            in_flight: AtomicU32::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
        }
    }

    fn ejected(&self, now: u64) -> bool {
        self.ejected_until_ms.load(Relaxed) > now
    }

    /// Latency x (requests in flight + 1), the P2C cost.
    fn cost(&self, now: u64) -> f64 {
        self.decayed(now) * (self.in_flight.load(Relaxed) + 1) as f64
    }

    fn decayed(&self, now: u64) -> f64 {
        let ewma = f64::from_bits(self.ewma_ns.load(Relaxed));
        let age = now.saturating_sub(self.ewma_at_ms.load(Relaxed)) as f64;
        ewma * (-age / EWMA_DECAY.as_millis() as f64).exp()
    }

    /// Peak EWMA: a slower answer takes effect at once, a faster one is averaged in.
    fn observe_latency(&self, latency: Duration) {
        let now = crate::clock::mono_ms();
        let sample = latency.as_nanos() as f64;
        let current = f64::from_bits(self.ewma_ns.load(Relaxed));
        let age = now.saturating_sub(self.ewma_at_ms.load(Relaxed)) as f64;
        let next = if sample > current {
            sample
        } else {
            let w = (-age / EWMA_DECAY.as_millis() as f64).exp();
            current * w + sample * (1.0 - w)
        };
        self.ewma_ns.store(next.to_bits(), Relaxed);
        self.ewma_at_ms.store(now, Relaxed);
    }

    /// Counts a request in flight until the guard drops.
    pub(crate) fn start(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Relaxed);
        InFlight(self.clone())
    }
}

/// A request in flight to an endpoint.
pub(crate) struct InFlight(Arc<EndpointState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

// === impl Shared ===

impl Default for Shared {
    fn default() -> Self {
        Shared {
            budget: RetryBudget::new(),
            in_flight: AtomicU32::new(0),
            connections: Arc::new(AtomicU32::new(0)),
            rr: AtomicUsize::new(0),
        }
    }
}

/// A request counted against `maxPendingRequests` until dropped.
pub(crate) struct Pending(Arc<Shared>);

impl Shared {
    /// Admits a request unless `max` are already in flight.
    pub(crate) fn admit(self: &Arc<Self>, max: u32) -> Option<Pending> {
        let before = self.in_flight.fetch_add(1, Relaxed);
        if before >= max {
            self.in_flight.fetch_sub(1, Relaxed);
            return None;
        }
        Some(Pending(self.clone()))
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

// === impl RetryBudget ===

impl RetryBudget {
    fn new() -> Self {
        RetryBudget { slots: Default::default() }
    }

    fn slot(&self, second: u64) -> &Slot {
        let slot = &self.slots[second as usize % BUDGET_SLOTS];
        let seen = slot.second.load(Relaxed);
        if seen != second && slot.second.compare_exchange(seen, second, Relaxed, Relaxed).is_ok() {
            slot.requests.store(0, Relaxed);
            slot.retries.store(0, Relaxed);
        }
        slot
    }

    /// Counts one request (first tries only).
    pub(crate) fn request(&self) {
        self.slot(crate::clock::mono_ms() / 1000).requests.fetch_add(1, Relaxed);
    }

    /// Takes one retry from the budget, if it has one.
    pub(crate) fn try_retry(&self, ratio: f64, min_per_second: u32) -> bool {
        let now = crate::clock::mono_ms();
        let second = now / 1000;
        let (mut requests, mut retries, mut active) = (0, 0, 0u64);
        for s in &self.slots {
            let at = s.second.load(Relaxed);
            if at + (BUDGET_SLOTS as u64) > second && at <= second {
                let r = s.requests.load(Relaxed);
                requests += r;
                retries += s.retries.load(Relaxed);
                active += u64::from(r > 0);
            }
        }
        // The reserve accrues only for seconds that saw requests, so an idle destination does
        // not bank a burst of retries.
        let allowed = ratio * requests as f64 + (min_per_second as u64 * active) as f64;
        if (retries as f64) < allowed.floor() {
            self.slot(second).retries.fetch_add(1, Relaxed);
            true
        } else {
            false
        }
    }
}

// === impl RateLimiter ===

impl RateLimiter {
    pub(crate) fn new(limit: RateLimit) -> Self {
        let interval_ns = (1e9 / limit.requests_per_second) as u64;
        RateLimiter {
            interval_ns,
            tolerance_ns: interval_ns.saturating_mul(limit.burst as u64),
            tat_ns: AtomicU64::new(0),
            start: Instant::now(),
            limit,
        }
    }

    /// Takes a token; `false` when the bucket is empty.
    pub(crate) fn allow(&self) -> bool {
        let now = self.start.elapsed().as_nanos() as u64;
        let mut tat = self.tat_ns.load(Relaxed);
        loop {
            let next = tat.max(now) + self.interval_ns;
            if next - now > self.tolerance_ns {
                return false;
            }
            match self.tat_ns.compare_exchange_weak(tat, next, Relaxed, Relaxed) {
                Ok(_) => return true,
                Err(seen) => tat = seen,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime_in(yaml: &str, own_cluster: &str) -> ServiceRuntime {
        let svc: ServiceConfig = serde_saphyr::from_str(yaml).unwrap();
        ServiceRuntime::build(Arc::new(svc), None, own_cluster)
    }

    fn runtime(yaml: &str) -> ServiceRuntime {
        runtime_in(yaml, "a")
    }

    const FOUR: &str = "name: inv\nendpoints:\n  - {address: '127.0.0.1:1', cluster: a, labels: {version: v1}}\n  - {address: '127.0.0.1:2', cluster: a, labels: {version: v1}}\n  - {address: '127.0.0.1:3', cluster: b, labels: {version: v1}}\n  - {address: '127.0.0.1:4', cluster: c, labels: {version: v2}}\n";

    #[test]
    fn locality_groups_then_failover_then_the_rest() {
        let mut yaml = FOUR.to_string();
        yaml.push_str("policy: {service: inv, failover: [c, b]}\n");
        let rt = runtime(&yaml);
        assert_eq!(rt.candidates(None).groups, vec![vec![0, 1], vec![3], vec![2]]);
        assert_eq!(runtime_in(&yaml, "x").candidates(Some("v1")).groups, vec![vec![2], vec![0, 1]]);
        assert!(rt.candidates(Some("v3")).groups.is_empty());
        let c = rt.candidates(None);
        let first = rt.pick(&c, &[]).unwrap();
        assert!(first < 2);
        assert_eq!(
            rt.pick(&c, &[0, 1]),
            Some(3),
            "a tried local cluster falls over to the failover order"
        );
    }

    #[test]
    fn ejection_respects_max_percent_and_grows_on_failed_probes() {
        let mut yaml = FOUR.to_string();
        yaml.push_str("policy: {service: inv, outlierDetection: {consecutiveFailures: 3, ejection: 1s, maxEjectedPercent: 50}}\n");
        let rt = runtime(&yaml);
        assert!(!rt.observe(0, Outcome::Failure, None) && !rt.observe(0, Outcome::Failure, None));
        assert!(rt.observe(0, Outcome::Failure, None), "third failure ejects");
        let c = rt.candidates(None);
        assert!((0..50).all(|_| rt.pick(&c, &[]) == Some(1)), "the ejected endpoint is skipped");
        for _ in 0..3 {
            rt.observe(1, Outcome::Failure, None);
        }
        assert_eq!(rt.ejected(), 2);
        for _ in 0..5 {
            rt.observe(2, Outcome::Failure, None);
        }
        assert_eq!(rt.ejected(), 2, "never more than 50% of 4");
        // A success resets the count without ejecting.
        rt.observe(3, Outcome::Failure, None);
        rt.observe(3, Outcome::Success, None);
        rt.observe(3, Outcome::Failure, None);
        assert_eq!(rt.endpoints[3].consecutive_failures.load(Relaxed), 1);
        // Growing backoff: the second ejection lasts twice as long.
        let e = &rt.endpoints[0];
        e.ejected_until_ms.store(1, Relaxed);
        let before = crate::clock::mono_ms();
        rt.endpoints[1].ejected_until_ms.store(1, Relaxed);
        assert!(rt.observe(0, Outcome::Failure, None), "one failure on probation ejects again");
        let until = e.ejected_until_ms.load(Relaxed);
        assert!(until >= before + 2000 && until < before + 2500, "{}", until - before);
    }

    #[test]
    fn p2c_prefers_the_faster_endpoint() {
        let rt = runtime("name: s\nendpoints:\n  - {address: '127.0.0.1:1'}\n  - {address: '127.0.0.1:2'}\n  - {address: '127.0.0.1:3'}\n");
        rt.observe(0, Outcome::Success, Some(Duration::from_millis(50)));
        rt.observe(1, Outcome::Success, Some(Duration::from_millis(1)));
        rt.observe(2, Outcome::Success, Some(Duration::from_millis(50)));
        let c = rt.candidates(None);
        let picks: Vec<usize> = (0..3000).map(|_| rt.pick(&c, &[]).unwrap()).collect();
        let fast = picks.iter().filter(|i| **i == 1).count();
        // Endpoint 1 wins every pair it is drawn into: 2 of the 3 pairs.
        assert!((1800..=2200).contains(&fast), "{fast}");
    }

    #[test]
    fn budget_allows_ratio_plus_reserve() {
        let b = RetryBudget::new();
        for _ in 0..100 {
            b.request();
        }
        let granted = (0..100).filter(|_| b.try_retry(0.2, 10)).count();
        assert_eq!(granted, 30, "20% of 100 plus 10 for the first second");
    }

    #[test]
    fn rate_limiter_allows_burst_then_rate() {
        let l = RateLimiter::new(RateLimit {
            requests_per_second: 10.0,
            burst: 5,
            at: RateLimitAt::Outbound,
        });
        let first = (0..20).filter(|_| l.allow()).count();
        assert_eq!(first, 5);
        std::thread::sleep(Duration::from_millis(220));
        let later = (0..20).filter(|_| l.allow()).count();
        assert!((2..=3).contains(&later), "{later}");
    }
}

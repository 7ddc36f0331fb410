//! The pure parts of the intent loop: which proxies a stage treats, how a scope narrows a
//! change, and the judgement of a stage against its SLO. The state machine that drives intents
//! through these lives in [`crate::mesh`].

use serde::{Deserialize, Serialize};
use weft_api::resource::{Resource, RouteMatch, Slo, StringMatch};
use weft_api::telemetry::{BUCKETS, quantile_ms};

/// Latency increases smaller than this are noise, whatever the percentage.
const P99_NOISE_MS: f64 = 2.0;
/// A reference (baseline or untreated) needs this many requests to be compared against.
const MIN_REFERENCE_REQUESTS: u64 = 20;

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
    pub buckets: [u64; BUCKETS],
}

#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Within the SLO; the reason gives the numbers.
    Pass(String),
    /// Outside the SLO.
    Fail(String),
    /// Not enough evidence yet.
    Wait(String),
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
    pub fn add(&mut self, requests: u64, errors: u64, buckets: &[u64]) {
        self.requests += requests;
        self.errors += errors;
        for (b, c) in self.buckets.iter_mut().zip(buckets) {
            *b += c;
        }
    }

    /// Error rate in percent.
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            100.0 * self.errors as f64 / self.requests as f64
        }
    }

    pub fn p99(&self) -> Option<f64> {
        quantile_ms(&self.buckets, 0.99)
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

/// How many of `n` proxies a stage of `share` percent treats: at least one, all at 100.
pub fn stage_count(share: f64, n: usize) -> usize {
    if n == 0 {
        return 0;
    }
    ((share / 100.0 * n as f64).ceil() as usize).clamp(1, n)
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

/// Judges treated proxies against their own baseline (before the intent) and against the
/// untreated proxies over the same time.
pub fn judge(slo: &Slo, treated: &Evidence, baseline: &Evidence, untreated: &Evidence) -> Verdict {
    if treated.requests < slo.min_requests {
        return Verdict::Wait(format!("{} of {} requests observed", treated.requests, slo.min_requests));
    }
    let rate = treated.error_rate();
    let references = [("baseline", baseline), ("untreated", untreated)];
    for (name, reference) in references.iter().filter(|(_, r)| r.requests >= MIN_REFERENCE_REQUESTS) {
        let base = reference.error_rate();
        if rate - base > slo.max_error_rate_increase {
            return Verdict::Fail(format!(
                "error rate {rate:.1}% vs {name} {base:.1}% (> +{} pp, {} requests)",
                slo.max_error_rate_increase, treated.requests
            ));
        }
    }
    let reference_rate = references
        .iter()
        .filter(|(_, r)| r.requests >= MIN_REFERENCE_REQUESTS)
        .map(|(_, r)| r.error_rate())
        .fold(None, |m: Option<f64>, r| Some(m.map_or(r, |m| m.min(r))));
    if rate > slo.max_error_rate && reference_rate.is_none_or(|r| rate > r) {
        return Verdict::Fail(format!(
            "error rate {rate:.1}% > max {}% ({} requests)",
            slo.max_error_rate, treated.requests
        ));
    }
    let p99 = treated.p99();
    for (name, reference) in references.iter().filter(|(_, r)| r.requests >= MIN_REFERENCE_REQUESTS) {
        if let (Some(t), Some(b)) = (p99, reference.p99())
            && t - b > P99_NOISE_MS
            && t > b * (1.0 + slo.max_p99_increase / 100.0)
        {
            return Verdict::Fail(format!("p99 {t:.1} ms vs {name} {b:.1} ms (> +{}%)", slo.max_p99_increase));
        }
    }
    let base = if baseline.requests >= MIN_REFERENCE_REQUESTS {
        format!(" vs baseline {:.1}%", baseline.error_rate())
    } else {
        String::new()
    };
    let latency = p99.map(|t| format!(", p99 {t:.1} ms")).unwrap_or_default();
    Verdict::Pass(format!("error rate {rate:.1}%{base}{latency} ({} requests)", treated.requests))
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_api::telemetry::bucket_of;

    fn evidence(requests: u64, errors: u64, latency_ms: f64) -> Evidence {
        let mut e = Evidence::default();
        let mut b = [0u64; BUCKETS];
        b[bucket_of(latency_ms)] = requests;
        e.add(requests, errors, &b);
        e
    }

    #[test]
    fn stages_spread_across_clusters_and_cover_at_least_one() {
        let c = |id: &str, cl: &str| (id.to_string(), cl.to_string());
        let order = spread(vec![c("a1", "a"), c("a2", "a"), c("a3", "a"), c("b1", "b"), c("c1", "c")]);
        assert_eq!(order, ["a1", "b1", "c1", "a2", "a3"]);
        assert_eq!(stage_count(10.0, 10), 1);
        assert_eq!(stage_count(10.0, 2), 1);
        assert_eq!(stage_count(50.0, 5), 3);
        assert_eq!(stage_count(100.0, 7), 7);
        assert_eq!(stage_count(50.0, 0), 0);
    }

    #[test]
    fn judge_waits_for_evidence_then_compares() {
        let slo = Slo {
            min_requests: 100,
            ..Default::default()
        };
        let healthy = evidence(1000, 4, 4.0);
        assert!(matches!(judge(&slo, &evidence(50, 50, 4.0), &healthy, &healthy), Verdict::Wait(_)));
        let Verdict::Fail(why) = judge(&slo, &evidence(200, 12, 4.0), &healthy, &Evidence::default()) else {
            panic!()
        };
        assert!(why.contains("error rate 6.0% vs baseline 0.4%"), "{why}");
        assert!(matches!(judge(&slo, &evidence(200, 1, 4.0), &healthy, &healthy), Verdict::Pass(_)));
        let Verdict::Fail(why) = judge(&slo, &evidence(200, 0, 150.0), &healthy, &healthy) else {
            panic!()
        };
        assert!(why.starts_with("p99"), "{why}");
        // Without any reference, the absolute maximum still applies.
        assert!(matches!(
            judge(&slo, &evidence(200, 10, 4.0), &Evidence::default(), &Evidence::default()),
            Verdict::Fail(_)
        ));
        // A pre-existing error rate is not blamed on the change.
        let noisy = evidence(1000, 50, 4.0);
        assert!(matches!(judge(&slo, &evidence(200, 10, 4.0), &noisy, &noisy), Verdict::Pass(_)));
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

//! The traffic the proxies report, kept in time windows: per service for `status` and `weft
//! top`, and per proxy, direction and peer service as the evidence the judge reads.

use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};
use weft_api::error::FieldError;
use weft_api::proto;
use weft_api::telemetry::{LATENCY_SLOTS, add_sparse, quantile_ms};

/// Window over which `status` and `routes` compute rates.
pub(crate) const RATE_WINDOW: Duration = Duration::from_secs(10);
/// How long per-proxy samples are kept for judging intents (baselines look this far back).
const SAMPLE_WINDOW: Duration = Duration::from_secs(120);
/// The longest per-proxy samples are kept for an intent still being judged (see
/// [`Signals::keep_from`]): an intent's stages and watching rarely take this long, and memory
/// stays bounded when one does.
const LONGEST_SAMPLE_WINDOW: Duration = Duration::from_secs(600);

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

/// A proxy's workload and service, which its report is filed under.
pub(crate) struct Reporter {
    pub(crate) workload: String,
    pub(crate) namespace: String,
    pub(crate) service: String,
}

#[derive(Default)]
pub(crate) struct Signals {
    /// Inbound traffic per (namespace, service).
    traffic: HashMap<(String, String), VecDeque<Sample>>,
    /// Per workload, direction and peer service: what intents are judged on.
    pub(crate) samples: HashMap<(String, i32, String), VecDeque<Sample>>,
    /// Reports received, from any proxy.
    pub(crate) reports: u64,
    /// When each workload's proxy last reported (with traffic or none).
    pub(crate) reported: HashMap<String, Instant>,
    /// What each workload's sidecar costs.
    pub(crate) costs: crate::cost::Costs,
    /// When the maps above last dropped the workloads that stopped reporting.
    pruned: Option<Instant>,
    /// The oldest report an intent being judged may still read (its baseline, from before it
    /// started): per-proxy samples are kept back to it, up to [`LONGEST_SAMPLE_WINDOW`].
    keep_from: Option<Instant>,
}

/// A service's inbound traffic over the last [`RATE_WINDOW`].
#[derive(Default)]
pub(crate) struct Traffic {
    pub(crate) requests: u64,
    pub(crate) errors: u64,
    pub(crate) mtls: u64,
    pub(crate) buckets: Vec<u64>,
}

/// One destination route as its callers saw it over the last [`RATE_WINDOW`] (`weft top`).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RouteView {
    service: String,
    route: String,
    rps: f64,
    /// Percentage of requests answered below 500.
    success_rate: Option<f64>,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
}

// === impl Signals ===

impl Signals {
    /// Files one report from `from` (none: a proxy that has gone; the report still counts).
    pub(crate) fn record(&mut self, from: Option<Reporter>, stats: Vec<proto::TrafficStats>, now: Instant) {
        self.reports += 1;
        let Some(from) = from else { return };
        match self.reported.get_mut(&from.workload) {
            Some(at) => *at = now,
            None => {
                self.reported.insert(from.workload.clone(), now);
            }
        }
        let service_key = (from.namespace, from.service);
        let keep = self.sample_window(now);
        for s in stats {
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
                    self.traffic.entry(service_key.clone()).or_default(),
                    sample.clone(),
                    now,
                    RATE_WINDOW * 3,
                );
            }
            let key = (from.workload.clone(), s.direction, s.service);
            push_window(self.samples.entry(key).or_default(), sample, now, keep);
        }
        // A workload that left (or a peer no longer called) stops reporting, and its window
        // would stay as it was for good: dropped once all of it is too old to be read,
        // checked once per window rather than on every report.
        if self.pruned.is_none_or(|at| now.duration_since(at) > SAMPLE_WINDOW) {
            self.prune(now);
        }
    }

    /// Drops every window whose newest sample is older than it keeps, and the last-report
    /// time of workloads silent for longer than [`SAMPLE_WINDOW`].
    fn prune(&mut self, now: Instant) {
        let fresh = |samples: &VecDeque<Sample>, keep: Duration| samples.back().is_some_and(|s| now.duration_since(s.at) <= keep);
        self.traffic.retain(|_, samples| fresh(samples, RATE_WINDOW * 3));
        let keep = self.sample_window(now);
        self.samples.retain(|_, samples| fresh(samples, keep));
        self.reported.retain(|_, at| now.duration_since(*at) <= SAMPLE_WINDOW);
        self.pruned = Some(now);
    }

    /// Keeps per-proxy samples back to `from` (the oldest report an intent being judged may
    /// read; none: only the usual [`SAMPLE_WINDOW`]). Without it an intent that ran longer than
    /// a minute read a baseline eroding under it, the minute before it started falling out of
    /// a window counted from now.
    pub(crate) fn keep_from(&mut self, from: Option<Instant>) {
        self.keep_from = from;
    }

    /// How far back per-proxy samples are kept at `now`.
    fn sample_window(&self, now: Instant) -> Duration {
        let wanted = self.keep_from.map_or(Duration::ZERO, |from| now.saturating_duration_since(from));
        wanted.clamp(SAMPLE_WINDOW, LONGEST_SAMPLE_WINDOW)
    }

    /// `namespace/service`'s inbound traffic over the last window.
    pub(crate) fn traffic(&self, namespace: &str, service: &str, now: Instant) -> Traffic {
        let mut t = Traffic {
            buckets: vec![0; LATENCY_SLOTS],
            ..Traffic::default()
        };
        if let Some(samples) = self.traffic.get(&(namespace.to_string(), service.to_string())) {
            for s in samples.iter().filter(|s| now.duration_since(s.at) <= RATE_WINDOW) {
                t.requests = t.requests.saturating_add(s.requests);
                t.errors = t.errors.saturating_add(s.errors);
                t.mtls = t.mtls.saturating_add(s.mtls);
                add_sparse(&mut t.buckets, &s.latency_slots, &s.latency_counts);
            }
        }
        t
    }

    /// Every destination service and route the callers reported over the last window.
    pub(crate) fn routes(&self, now: Instant) -> Vec<RouteView> {
        let mut by: BTreeMap<(String, String), (u64, u64, Vec<u64>)> = BTreeMap::new();
        for ((_, direction, service), samples) in &self.samples {
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
pub(crate) fn check_report(report: &proto::TelemetryReport) -> Result<(), FieldError> {
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
    report.cost.as_ref().map_or(Ok(()), crate::cost::check)
}

fn push_window(samples: &mut VecDeque<Sample>, sample: Sample, now: Instant, keep: Duration) {
    samples.push_back(sample);
    while samples.front().is_some_and(|x| now.duration_since(x.at) > keep) {
        samples.pop_front();
    }
}

pub(crate) fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reporter(workload: &str) -> Option<Reporter> {
        Some(Reporter {
            workload: workload.to_string(),
            namespace: "default".to_string(),
            service: "orders".to_string(),
        })
    }

    fn stats(direction: proto::Direction, service: &str) -> proto::TrafficStats {
        proto::TrafficStats {
            direction: direction as i32,
            service: service.to_string(),
            requests: 10,
            ..Default::default()
        }
    }

    /// Workloads come and go (a rolled deployment's pods): the windows of those that stopped
    /// reporting are dropped once too old to be read, and live ones keep theirs.
    #[test]
    fn windows_of_workloads_that_stopped_reporting_are_dropped() {
        let mut signals = Signals::default();
        let t0 = Instant::now();
        for i in 0..100 {
            let both = vec![
                stats(proto::Direction::Inbound, "orders"),
                stats(proto::Direction::Outbound, "payments"),
            ];
            signals.record(reporter(&format!("default/orders-{i}")), both, t0);
        }
        assert_eq!(
            (signals.samples.len(), signals.reported.len(), signals.traffic.len()),
            (200, 100, 1)
        );
        // Only orders-0 goes on reporting, every 2 s, for four minutes.
        for tick in 1..=120u64 {
            let now = t0 + Duration::from_secs(2 * tick);
            signals.record(
                reporter("default/orders-0"),
                vec![stats(proto::Direction::Outbound, "payments")],
                now,
            );
        }
        assert_eq!(signals.samples.len(), 1, "only orders-0's window to payments is left");
        assert_eq!(signals.reported.len(), 1);
        assert!(signals.traffic.is_empty(), "no inbound report for four minutes");
        let kept = &signals.samples[&(
            "default/orders-0".to_string(),
            proto::Direction::Outbound as i32,
            "payments".to_string(),
        )];
        assert_eq!(kept.len(), 61, "the last 120 s of 2 s reports");
        assert_eq!(signals.reports, 220);
    }

    /// An intent being judged reads reports from before it started: they are kept back to
    /// where its baseline reaches for as long as it runs (up to ten minutes), and the usual
    /// two minutes once it has ended.
    #[test]
    fn samples_are_kept_back_to_the_oldest_baseline_being_read() {
        let mut signals = Signals::default();
        let t0 = Instant::now();
        let key = (
            "default/orders-0".to_string(),
            proto::Direction::Outbound as i32,
            "payments".to_string(),
        );
        let report = |signals: &mut Signals, tick: u64| {
            signals.record(
                reporter("default/orders-0"),
                vec![stats(proto::Direction::Outbound, "payments")],
                t0 + Duration::from_secs(2 * tick),
            )
        };
        for tick in 0..=100 {
            report(&mut signals, tick);
        }
        // An intent started at 200 s whose baseline reaches back 100 s.
        signals.keep_from(Some(t0 + Duration::from_secs(100)));
        for tick in 101..=200 {
            report(&mut signals, tick);
        }
        let oldest = signals.samples[&key].front().expect("kept").at;
        assert_eq!(oldest, t0 + Duration::from_secs(100), "at 400 s, back to 100 s");
        assert_eq!(signals.samples[&key].len(), 151);
        // Ten minutes at most, however long the intent runs.
        for tick in 201..=400 {
            report(&mut signals, tick);
        }
        assert_eq!(signals.samples[&key].front().expect("kept").at, t0 + Duration::from_secs(200));
        // Ended: two minutes again.
        signals.keep_from(None);
        report(&mut signals, 401);
        assert_eq!(signals.samples[&key].len(), 61);
    }
}

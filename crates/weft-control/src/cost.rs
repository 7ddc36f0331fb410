//! What the sidecars cost, as each proxy reports it with its telemetry: CPU, resident and
//! private memory, and the time requests spend inside the proxy (its "self time", defined in
//! the proxy's `cost` module: time to the response head minus waiting on the upstream).
//!
//! Kept per workload in a time window (in [`crate::signals::Signals`]), read three ways: per
//! proxy and per service over the recent past (`weft proxies`, `weft status`, the dashboard),
//! and before vs during an intent on its treated proxies only, for the decision record
//! ([`change`]).

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::ops::{Range, RangeFrom};
use std::time::{Duration, Instant};
use weft_api::error::FieldError;
use weft_api::proto;
use weft_api::telemetry::{LATENCY_SLOTS, add_sparse, quantile_ms};

/// How long samples are kept: an intent's baseline looks this far back.
const KEEP: Duration = Duration::from_secs(120);
/// A change in CPU per request or in self-time p99 smaller than this fraction is noise.
const MATERIAL: f64 = 0.2;
/// And a self-time p99 rise below this is too small to matter on any path (milliseconds).
const MATERIAL_MS: f64 = 0.05;

/// One report's cost part.
struct Sample {
    at: Instant,
    /// Cumulative CPU of the proxy process (microseconds).
    cpu_micros: u64,
    resident_bytes: u64,
    private_bytes: u64,
    /// Requests the proxy finished over the report's interval, both directions.
    requests: u64,
    inbound_slots: Vec<u32>,
    inbound_counts: Vec<u64>,
    outbound_slots: Vec<u32>,
    outbound_counts: Vec<u64>,
}

/// Every reporting workload's recent cost samples.
#[derive(Default)]
pub(crate) struct Costs {
    samples: HashMap<String, VecDeque<Sample>>,
    /// When workloads that stopped reporting were last dropped.
    pruned: Option<Instant>,
}

/// The cost of one proxy, or the sum over a service's proxies, over a recent window.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct CostView {
    /// Proxies whose reports this sums.
    proxies: usize,
    /// CPU used, as a percentage of one core (`None` until two reports span some time).
    cpu_percent: Option<f64>,
    /// CPU per request handled (inbound and outbound), microseconds.
    cpu_us_per_request: Option<f64>,
    resident_bytes: u64,
    private_bytes: u64,
    inbound_p50_ms: Option<f64>,
    inbound_p99_ms: Option<f64>,
    outbound_p50_ms: Option<f64>,
    outbound_p99_ms: Option<f64>,
    /// The same figures under DESIGN.md §8's contract names: the proxies' cumulative CPU
    /// (seconds, as last reported), resident bytes, and self time as the latency they add.
    cpu_seconds: f64,
    rss_bytes: u64,
    added_latency_ms: AddedLatency,
}

/// Self time by direction, as DESIGN.md §8 names it (`addedLatencyMs`).
#[derive(Clone, Copy, Debug, Serialize)]
struct AddedLatency {
    outbound: Quantiles,
    inbound: Quantiles,
}

/// A median and a p99 in milliseconds (`None` without requests).
#[derive(Clone, Copy, Debug, Serialize)]
struct Quantiles {
    p50: Option<f64>,
    p99: Option<f64>,
}

/// A figure before an intent started and while its stage was observed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BeforeDuring {
    pub before: Option<f64>,
    pub during: Option<f64>,
}

/// What a change did to the sidecars it treated: CPU per request and self-time p99 before the
/// intent started vs during the stage, on the treated proxies only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CostChange {
    /// Treated proxies with cost reports.
    pub proxies: usize,
    pub cpu_us_per_request: BeforeDuring,
    pub inbound_p99_ms: BeforeDuring,
    pub outbound_p99_ms: BeforeDuring,
    /// CPU per request moved (up or down) by more than 20%.
    pub cpu_moved: bool,
    /// Self-time p99 rose by more than 20% and 0.05 ms in either direction.
    pub latency_added: bool,
    /// The same in one line, for `weft intents show` and the dashboard.
    pub summary: String,
}

/// Sums over some proxies and some time.
#[derive(Default)]
struct Totals {
    proxies: usize,
    cpu_micros: u64,
    /// Cumulative CPU of each proxy at its last sample, summed.
    cpu_total_micros: u64,
    /// CPU per second of each proxy over the time its samples span, summed (`None`: no proxy
    /// has two samples yet).
    cpu_rate: Option<f64>,
    requests: u64,
    resident_bytes: u64,
    private_bytes: u64,
    inbound: Vec<u64>,
    outbound: Vec<u64>,
}

// === impl Costs ===

impl Costs {
    /// Files `workload`'s report: its cost part and the requests its stats count.
    pub(crate) fn record(&mut self, workload: &str, cost: &proto::ProxyCost, stats: &[proto::TrafficStats], now: Instant) {
        let sample = Sample {
            at: now,
            cpu_micros: cost.cpu_micros,
            resident_bytes: cost.resident_bytes,
            private_bytes: cost.private_bytes,
            requests: stats.iter().fold(0u64, |n, s| n.saturating_add(s.requests)),
            inbound_slots: cost.inbound_slots.clone(),
            inbound_counts: cost.inbound_counts.clone(),
            outbound_slots: cost.outbound_slots.clone(),
            outbound_counts: cost.outbound_counts.clone(),
        };
        let samples = self.samples.entry(workload.to_string()).or_default();
        samples.push_back(sample);
        while samples.front().is_some_and(|s| now.duration_since(s.at) > KEEP) {
            samples.pop_front();
        }
        // A workload that left stops reporting: its samples go once they are all too old,
        // checked once per KEEP rather than on every report.
        if self.pruned.is_none_or(|at| now.duration_since(at) > KEEP) {
            self.samples
                .retain(|_, s| s.back().is_some_and(|last| now.duration_since(last.at) <= KEEP));
            self.pruned = Some(now);
        }
    }

    /// The cost of `workloads` (one proxy, or a service's) over the `window` before `now`;
    /// `None` when none of them reported any.
    pub(crate) fn view<'a>(&self, workloads: impl IntoIterator<Item = &'a str>, window: Duration, now: Instant) -> Option<CostView> {
        let from = now.checked_sub(window).unwrap_or(now);
        let t = self.totals(workloads, from.., now);
        let quantiles = |hist: &[u64]| Quantiles {
            p50: p(hist, 0.5),
            p99: p(hist, 0.99),
        };
        (t.proxies > 0).then(|| CostView {
            proxies: t.proxies,
            cpu_percent: t.cpu_rate.map(|rate| hundredths(100.0 * rate)),
            cpu_us_per_request: t.per_request(),
            resident_bytes: t.resident_bytes,
            private_bytes: t.private_bytes,
            inbound_p50_ms: p(&t.inbound, 0.5),
            inbound_p99_ms: p(&t.inbound, 0.99),
            outbound_p50_ms: p(&t.outbound, 0.5),
            outbound_p99_ms: p(&t.outbound, 0.99),
            cpu_seconds: t.cpu_total_micros as f64 / 1e6,
            rss_bytes: t.resident_bytes,
            added_latency_ms: AddedLatency {
                outbound: quantiles(&t.outbound),
                inbound: quantiles(&t.inbound),
            },
        })
    }

    /// Sums the samples of `workloads` taken within `when` (and before `now`). CPU is the
    /// difference between consecutive samples, the first one in `when` counting from the one
    /// before it; a proxy that restarted (its CPU went down) counts from zero.
    fn totals<'a, R>(&self, workloads: impl IntoIterator<Item = &'a str>, when: R, now: Instant) -> Totals
    where
        R: std::ops::RangeBounds<Instant>,
    {
        let mut t = Totals {
            inbound: vec![0; LATENCY_SLOTS],
            outbound: vec![0; LATENCY_SLOTS],
            ..Totals::default()
        };
        for w in workloads {
            let Some(samples) = self.samples.get(w) else { continue };
            let mut counted = false;
            let (mut cpu, mut span) = (0u64, Duration::ZERO);
            let mut previous: Option<&Sample> = None;
            for s in samples.iter().filter(|s| s.at <= now) {
                let inside = when.contains(&s.at);
                if let (true, Some(prev)) = (inside, previous) {
                    cpu = cpu.saturating_add(s.cpu_micros.checked_sub(prev.cpu_micros).unwrap_or(s.cpu_micros));
                    span += s.at.duration_since(prev.at);
                    t.requests = t.requests.saturating_add(s.requests);
                }
                if inside {
                    add_sparse(&mut t.inbound, &s.inbound_slots, &s.inbound_counts);
                    add_sparse(&mut t.outbound, &s.outbound_slots, &s.outbound_counts);
                    counted = true;
                }
                previous = Some(s);
            }
            t.cpu_micros = t.cpu_micros.saturating_add(cpu);
            if !span.is_zero() {
                t.cpu_rate = Some(t.cpu_rate.unwrap_or(0.0) + cpu as f64 / 1e6 / span.as_secs_f64());
            }
            if counted {
                let last = previous.expect("a counted sample");
                t.proxies += 1;
                t.resident_bytes = t.resident_bytes.saturating_add(last.resident_bytes);
                t.private_bytes = t.private_bytes.saturating_add(last.private_bytes);
                t.cpu_total_micros = t.cpu_total_micros.saturating_add(last.cpu_micros);
            }
        }
        t
    }
}

// === impl Totals ===

impl Totals {
    fn per_request(&self) -> Option<f64> {
        (self.requests > 0).then(|| hundredths(self.cpu_micros as f64 / self.requests as f64))
    }
}

fn hundredths(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// The `q` quantile in milliseconds, to the microsecond (self time is often below 0.1 ms).
fn p(hist: &[u64], q: f64) -> Option<f64> {
    quantile_ms(hist, q).map(|ms| (ms * 1000.0).round() / 1000.0)
}

/// What an intent did to the cost of its treated proxies: `before` the intent started vs
/// `during` its observation. `None` when no treated proxy reported cost during it; a
/// figure without reports before it reads `-` (and moves nothing).
pub(crate) fn change(
    costs: &Costs,
    treated: &[&str],
    before: Range<Instant>,
    during: RangeFrom<Instant>,
    now: Instant,
) -> Option<CostChange> {
    let b = costs.totals(treated.iter().copied(), before, now);
    let d = costs.totals(treated.iter().copied(), during, now);
    if d.proxies == 0 {
        return None;
    }
    let cpu = BeforeDuring {
        before: b.per_request(),
        during: d.per_request(),
    };
    let inbound = BeforeDuring {
        before: p(&b.inbound, 0.99),
        during: p(&d.inbound, 0.99),
    };
    let outbound = BeforeDuring {
        before: p(&b.outbound, 0.99),
        during: p(&d.outbound, 0.99),
    };
    let cpu_moved = matches!((cpu.before, cpu.during), (Some(x), Some(y)) if x > 0.0 && ((y - x) / x).abs() > MATERIAL);
    let added = |v: BeforeDuring| matches!((v.before, v.during), (Some(x), Some(y)) if y - x > MATERIAL_MS && y > x * (1.0 + MATERIAL));
    let latency_added = added(inbound) || added(outbound);
    let summary = format!(
        "sidecar cost on {} treated {}: CPU {} µs/request ({}); self-time p99 inbound {} ms, outbound {} ms ({})",
        d.proxies,
        if d.proxies == 1 { "proxy" } else { "proxies" },
        arrow(cpu),
        if cpu_moved { "moved" } else { "unchanged" },
        arrow(inbound),
        arrow(outbound),
        if latency_added { "latency added" } else { "no latency added" },
    );
    Some(CostChange {
        proxies: d.proxies,
        cpu_us_per_request: cpu,
        inbound_p99_ms: inbound,
        outbound_p99_ms: outbound,
        cpu_moved,
        latency_added,
        summary,
    })
}

/// `12.5 → 14` (before → during), `-` for a figure without data.
fn arrow(v: BeforeDuring) -> String {
    let show = |x: Option<f64>| x.map(|x| format!("{x}")).unwrap_or_else(|| "-".into());
    format!("{} → {}", show(v.before), show(v.during))
}

/// Refuses a cost part whose histograms do not pair slots with counts, naming the field.
pub(crate) fn check(cost: &proto::ProxyCost) -> Result<(), FieldError> {
    for (field, slots, counts) in [
        ("cost.inboundCounts", &cost.inbound_slots, &cost.inbound_counts),
        ("cost.outboundCounts", &cost.outbound_slots, &cost.outbound_counts),
    ] {
        if slots.len() != counts.len() {
            return Err(FieldError::new(
                field,
                counts.len(),
                format!("must pair with the {} slots", slots.len()),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_api::telemetry::slot_of;

    fn report(cpu_micros: u64, self_ms: f64, requests: u64) -> (proto::ProxyCost, Vec<proto::TrafficStats>) {
        let cost = proto::ProxyCost {
            cpu_micros,
            resident_bytes: 20 << 20,
            private_bytes: 15 << 20,
            outbound_slots: vec![slot_of(self_ms) as u32],
            outbound_counts: vec![requests],
            ..Default::default()
        };
        let stats = vec![proto::TrafficStats {
            requests,
            ..Default::default()
        }];
        (cost, stats)
    }

    #[test]
    fn rates_per_second_and_per_request_from_cumulative_cpu() {
        let t0 = Instant::now();
        let mut costs = Costs::default();
        for i in 0..5u64 {
            // 100 requests per 2 s interval, 50 ms of CPU each interval: 2.5% of a core, 500 µs/request.
            let (cost, stats) = report(1_000_000 + 50_000 * i, 0.2, 100);
            costs.record("default/orders", &cost, &stats, t0 + Duration::from_secs(2 * i));
        }
        let v = costs
            .view(["default/orders"], Duration::from_secs(10), t0 + Duration::from_secs(8))
            .unwrap();
        assert_eq!((v.cpu_percent, v.cpu_us_per_request), (Some(2.5), Some(500.0)), "{v:?}");
        // A service's figure is the sum over its proxies: a second one at twice the rate.
        let mut two = Costs::default();
        for i in 0..5u64 {
            let (cost, stats) = report(50_000 * i, 0.2, 100);
            two.record("default/orders-a", &cost, &stats, t0 + Duration::from_secs(2 * i));
            let (cost, stats) = report(100_000 * i, 0.2, 100);
            two.record("default/orders-b", &cost, &stats, t0 + Duration::from_secs(2 * i));
        }
        let both = two.view(
            ["default/orders-a", "default/orders-b"],
            Duration::from_secs(10),
            t0 + Duration::from_secs(8),
        );
        let both = both.unwrap();
        assert_eq!(
            (both.proxies, both.cpu_percent, both.cpu_us_per_request),
            (2, Some(7.5), Some(750.0)),
            "{both:?}"
        );
        assert!((v.outbound_p99_ms.unwrap() - 0.2).abs() < 0.005, "{v:?}");
        assert_eq!(v.resident_bytes, 20 << 20);
        // DESIGN.md §8's names for the same figures: CPU as last reported, cumulative.
        let contract = serde_json::to_value(&v).unwrap();
        assert_eq!(contract["cpuSeconds"], 1.2, "{contract}");
        assert_eq!(contract["rssBytes"], 20 << 20, "{contract}");
        assert_eq!(
            contract["addedLatencyMs"]["outbound"]["p99"], contract["outboundP99Ms"],
            "{contract}"
        );
        assert!(contract["addedLatencyMs"]["inbound"]["p50"].is_null(), "{contract}");
        assert!(costs.view(["default/payments"], Duration::from_secs(10), t0).is_none());
        // A workload gone for longer than the samples are kept is forgotten.
        let (cost, stats) = report(0, 0.2, 1);
        costs.record("default/web", &cost, &stats, t0 + KEEP * 3);
        assert_eq!(costs.samples.len(), 1, "only web is left");
    }

    #[test]
    fn change_compares_treated_proxies_before_and_during() {
        let t0 = Instant::now();
        let mut costs = Costs::default();
        let mut cpu = 0;
        for i in 0..20u64 {
            // From 20 s on, the change doubles CPU per request and self time.
            let (per, ms) = if i < 10 { (100, 0.1) } else { (200, 0.3) };
            cpu += per * 100;
            let (cost, stats) = report(cpu, ms, 100);
            costs.record("default/orders", &cost, &stats, t0 + Duration::from_secs(2 * i));
        }
        let now = t0 + Duration::from_secs(40);
        let start = t0 + Duration::from_secs(19);
        let c = change(&costs, &["default/orders"], t0..start, start + Duration::from_secs(2).., now).unwrap();
        assert_eq!(
            c.cpu_us_per_request,
            BeforeDuring {
                before: Some(100.0),
                during: Some(200.0)
            }
        );
        assert!(c.cpu_moved && c.latency_added, "{c:?}");
        assert!(c.summary.contains("CPU 100 → 200 µs/request (moved)"), "{}", c.summary);
        let same = change(&costs, &["default/orders"], t0..start, t0.., t0 + Duration::from_secs(10)).unwrap();
        assert!(!same.cpu_moved && !same.latency_added, "{same:?}");
        assert!(change(&costs, &["default/payments"], t0..start, start.., now).is_none());
    }
}

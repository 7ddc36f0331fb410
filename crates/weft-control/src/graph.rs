//! Who calls whom: the service graph the dashboard draws, from what the callers' sidecars
//! reported of their outbound requests over the last [`RATE_WINDOW`], one edge per caller
//! service and destination.

use crate::signals::{RATE_WINDOW, Signals, round2};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::time::Instant;
use weft_api::proto::Direction;
use weft_api::telemetry::{LATENCY_SLOTS, add_sparse, quantile_ms};

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct EdgeView {
    /// The calling service (the caller's workload when it is in no service).
    from: String,
    /// The destination service, as the callers name it.
    to: String,
    rps: f64,
    /// Percentage of requests answered 5xx or not at all.
    error_rate: Option<f64>,
    p99_ms: Option<f64>,
}

/// The edges over the last window; `service_of` maps a workload (`namespace/name`) to its
/// service. A caller that sent nothing in the window has no edge.
pub(crate) fn edges(signals: &Signals, service_of: &HashMap<String, String>, now: Instant) -> Vec<EdgeView> {
    let mut by: BTreeMap<(String, String), (u64, u64, Vec<u64>)> = BTreeMap::new();
    for ((workload, direction, to), samples) in &signals.samples {
        if *direction != Direction::Outbound as i32 {
            continue;
        }
        let from = service_of.get(workload).filter(|s| !s.is_empty()).unwrap_or(workload);
        for s in samples.iter().filter(|s| now.duration_since(s.at) <= RATE_WINDOW) {
            let e = by
                .entry((from.clone(), to.clone()))
                .or_insert_with(|| (0, 0, vec![0; LATENCY_SLOTS]));
            e.0 = e.0.saturating_add(s.requests);
            e.1 = e.1.saturating_add(s.errors);
            add_sparse(&mut e.2, &s.latency_slots, &s.latency_counts);
        }
    }
    by.into_iter()
        .filter(|(_, (requests, _, _))| *requests > 0)
        .map(|((from, to), (requests, errors, buckets))| EdgeView {
            from,
            to,
            rps: round2(requests as f64 / RATE_WINDOW.as_secs_f64()),
            error_rate: Some(round2(100.0 * errors as f64 / requests as f64)),
            p99_ms: quantile_ms(&buckets, 0.99).map(round2),
        })
        .collect()
}

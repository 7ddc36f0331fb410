//! The last minutes of each service's golden signals, for the dashboard's charts: sampled from
//! the status view every [`STEP`], kept for [`WINDOW`].

use crate::mesh::Mesh;
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

pub(crate) const STEP: Duration = Duration::from_secs(2);
pub(crate) const WINDOW: Duration = Duration::from_secs(300);

#[derive(Clone, Copy, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Point {
    /// Unix milliseconds.
    pub(crate) t: u64,
    pub(crate) rps: f64,
    pub(crate) error_rate: f64,
    pub(crate) p99_ms: Option<f64>,
}

#[derive(Clone, Default)]
pub(crate) struct History {
    series: Arc<Mutex<BTreeMap<String, VecDeque<Point>>>>,
}

impl History {
    /// Takes one sample of every service now.
    pub(crate) fn sample(&self, mesh: &Mesh) {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let keep = (WINDOW.as_secs() / STEP.as_secs()) as usize;
        let status = mesh.status();
        let mut series = self.series.lock();
        // A service gone from the mesh leaves the charts with it.
        series.retain(|name, _| status.services.iter().any(|s| &s.name == name));
        for s in &status.services {
            let points = series.entry(s.name.clone()).or_default();
            points.push_back(Point {
                t,
                rps: s.rps,
                error_rate: s.error_rate,
                p99_ms: s.p99_ms,
            });
            while points.len() > keep {
                points.pop_front();
            }
        }
    }

    pub(crate) fn snapshot(&self) -> BTreeMap<String, Vec<Point>> {
        self.series
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.iter().copied().collect()))
            .collect()
    }

    /// Samples until `shutdown`.
    pub(crate) async fn run(self, mesh: Arc<Mesh>, shutdown: weft_core::Shutdown) {
        let mut tick = tokio::time::interval(STEP);
        loop {
            tokio::select! {
                _ = tick.tick() => self.sample(&mesh),
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

//! Steady request load through one sidecar, counting what succeeded and what failed and why.

use crate::http::Client;
use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadStats {
    pub ok: u64,
    pub failed: u64,
    /// Failures by status and `x-weft-error` reason.
    pub reasons: BTreeMap<String, u64>,
}

/// Sends a GET to `service` through `outbound` every `every` until stopped.
pub struct Load {
    stats: Arc<Mutex<LoadStats>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl LoadStats {
    pub fn total(&self) -> u64 {
        self.ok + self.failed
    }

    /// What happened between `earlier` and `self`.
    pub fn since(&self, earlier: &LoadStats) -> LoadStats {
        let mut reasons = self.reasons.clone();
        for (k, v) in &earlier.reasons {
            *reasons.entry(k.clone()).or_default() -= v;
        }
        reasons.retain(|_, v| *v > 0);
        LoadStats {
            ok: self.ok - earlier.ok,
            failed: self.failed - earlier.failed,
            reasons,
        }
    }
}

impl Load {
    pub fn start(outbound: SocketAddr, service: &str, headers: &[(&str, &str)], every: Duration) -> Self {
        let stats = Arc::new(Mutex::new(LoadStats::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (stats.clone(), stop.clone());
        let service = service.to_string();
        let headers: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let task = tokio::spawn(async move {
            let client = Client::new();
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !st.load(Ordering::Relaxed) {
                tick.tick().await;
                let mut b = Request::get(format!("http://{outbound}/load")).header("host", service.as_str());
                for (k, v) in &headers {
                    b = b.header(k.as_str(), v.as_str());
                }
                let outcome = client.send(b.body(Full::new(Bytes::new())).expect("valid request")).await;
                let mut stats = s.lock();
                match outcome {
                    Ok(r) if r.status == 200 => stats.ok += 1,
                    Ok(r) => {
                        stats.failed += 1;
                        *stats
                            .reasons
                            .entry(format!("{} {}", r.status, r.header("x-weft-error").unwrap_or_default()))
                            .or_default() += 1;
                    }
                    Err(e) => {
                        stats.failed += 1;
                        *stats.reasons.entry(format!("client error: {e}")).or_default() += 1;
                    }
                }
            }
        });
        Self { stats, stop, task }
    }

    pub fn stats(&self) -> LoadStats {
        self.stats.lock().clone()
    }

    pub async fn stop(self) -> LoadStats {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.stats.lock().clone()
    }
}

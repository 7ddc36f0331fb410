//! The end-to-end harness: start the real `weft` binary as a control plane and as proxies on
//! loopback ports picked at run time, real HTTP and gRPC servers as apps, and clients that speak
//! HTTP/1.1, HTTP/2 and gRPC. Polling with deadlines, never fixed sleeps.
//!
//! The tests themselves live in `crates/weft/tests` (so cargo builds the binary they run) and
//! pass `env!("CARGO_BIN_EXE_weft")` in.

pub mod apps;
pub mod browser;
pub mod etcd;
pub mod fleet;
pub mod http;
pub mod layers;
pub mod load;
pub mod loadgen;
pub mod netns;
pub mod otlp;
pub mod pki;
pub mod process;
pub mod prometheus;
pub mod scripted;

/// Generated code for `proto/echo.proto` (checked in; see tests/codegen.rs).
#[allow(clippy::all, missing_docs)]
pub mod echo_proto {
    include!("gen/weft.test.rs");
}

pub use process::{Control, Process, ProxyHandle, descendants, free_addr};

use std::time::{Duration, Instant};

/// Polls `check` every 20 ms until it returns `Some`, or fails naming `what` after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {within:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of one sample of a Prometheus metric in `text` (a `/metrics` page), summed over
/// the series whose labels contain all of `labels` (`key="value"` strings).
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

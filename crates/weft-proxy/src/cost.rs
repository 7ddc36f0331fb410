//! What the proxy itself costs: the CPU and memory of its process, read when a report is sent
//! or the metrics are scraped, and the time each request spends inside it.
//!
//! Time inside the proxy ("self time") is the whole time from the request's arrival to its
//! response head being ready, minus the time spent waiting on the upstream (the endpoint for
//! outbound, the local app for inbound) for that head, every try included. Waiting on the
//! upstream starts when the request is handed to the connection pool, so a new connection's
//! handshake counts as upstream time. Requests the proxy answered itself (refused, no endpoint)
//! never reached an upstream and are not counted: their time is an answer, not an overhead.
//! Streaming the response body through is not counted either.
//!
//! Recording is two atomic additions into fixed slots (no lock, no allocation); the report's
//! interval histogram is the difference from the last report, taken on the cold path.

use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use weft_api::proto::{Direction, ProxyCost};
use weft_api::telemetry::{LATENCY_SLOTS, slot_of, slot_value_ms};

/// Upper bounds (seconds) of the self-time histogram on the admin listener: finer than the
/// request histogram's, since a proxy adds tens to hundreds of microseconds.
const SELF_TIME_BOUNDS_S: [f64; 10] = [25e-6, 50e-6, 100e-6, 200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 50e-3];

/// Self time of every request that reached an upstream, by direction, since the proxy started.
#[derive(Debug)]
pub(crate) struct SelfTime {
    inbound: Slots,
    outbound: Slots,
}

#[derive(Debug)]
struct Slots {
    /// One counter per log-scaled slot (weft_api::telemetry), cumulative.
    counts: Box<[AtomicU64]>,
    nanos: AtomicU64,
    /// The counts as of the last report: the next report sends what came since.
    reported: Mutex<Vec<u64>>,
}

/// The process's CPU and memory, as the kernel counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Usage {
    pub(crate) cpu: Duration,
    pub(crate) resident_bytes: u64,
    pub(crate) private_bytes: u64,
}

/// Encodes the cost metrics on each scrape.
#[derive(Debug)]
pub(crate) struct CostMetrics(pub(crate) Arc<SelfTime>);

// === impl SelfTime ===

impl SelfTime {
    pub(crate) fn new() -> Self {
        Self {
            inbound: Slots::new(),
            outbound: Slots::new(),
        }
    }

    /// Counts one request: `elapsed` to its response head, `waited` of it on the upstream
    /// (zero: it never reached one, and is not counted).
    pub(crate) fn record(&self, direction: Direction, elapsed: Duration, waited: Duration) {
        if waited.is_zero() {
            return;
        }
        let own = elapsed.saturating_sub(waited);
        let slots = self.of(direction);
        slots.counts[slot_of(own.as_secs_f64() * 1000.0)].fetch_add(1, Relaxed);
        slots.nanos.fetch_add(own.as_nanos() as u64, Relaxed);
    }

    fn of(&self, direction: Direction) -> &Slots {
        match direction {
            Direction::Inbound => &self.inbound,
            _ => &self.outbound,
        }
    }

    /// The report's cost part: the process's usage now, and the self time since the last one.
    pub(crate) fn take_report(&self) -> ProxyCost {
        let usage = Usage::now();
        let (inbound_slots, inbound_counts) = self.inbound.take_interval();
        let (outbound_slots, outbound_counts) = self.outbound.take_interval();
        ProxyCost {
            cpu_micros: usage.cpu.as_micros() as u64,
            resident_bytes: usage.resident_bytes,
            private_bytes: usage.private_bytes,
            inbound_slots,
            inbound_counts,
            outbound_slots,
            outbound_counts,
        }
    }
}

// === impl Slots ===

impl Slots {
    fn new() -> Self {
        Self {
            counts: (0..LATENCY_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            nanos: AtomicU64::new(0),
            reported: Mutex::new(vec![0; LATENCY_SLOTS]),
        }
    }

    /// The non-empty slots since the last call, and their counts (sparse, ascending).
    fn take_interval(&self) -> (Vec<u32>, Vec<u64>) {
        let mut reported = self.reported.lock();
        let (mut slots, mut counts) = (Vec::new(), Vec::new());
        for (i, (now, was)) in self.counts.iter().zip(reported.iter_mut()).enumerate() {
            let now = now.load(Relaxed);
            if now > *was {
                slots.push(i as u32);
                counts.push(now - *was);
            }
            *was = now;
        }
        (slots, counts)
    }

    /// Per-bucket counts over [`SELF_TIME_BOUNDS_S`] (and +Inf), the total count and the sum
    /// in seconds, since the proxy started.
    fn histogram(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let mut buckets: Vec<(f64, u64)> = SELF_TIME_BOUNDS_S.iter().chain([&f64::INFINITY]).map(|b| (*b, 0)).collect();
        let mut total = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            let n = c.load(Relaxed);
            if n == 0 {
                continue;
            }
            let secs = slot_value_ms(i) / 1000.0;
            let bucket = buckets.iter_mut().find(|(bound, _)| secs <= *bound).expect("+Inf holds all");
            bucket.1 += n;
            total += n;
        }
        (buckets, total, self.nanos.load(Relaxed) as f64 / 1e9)
    }
}

// === impl Usage ===

impl Usage {
    /// This process's usage now; what the kernel does not say (not Linux) reads as zero.
    pub(crate) fn now() -> Self {
        let cpu = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
            .map(|r| timeval(r.user_time()) + timeval(r.system_time()))
            .unwrap_or_default();
        let (resident_bytes, private_bytes) = std::fs::read_to_string("/proc/self/smaps_rollup")
            .map(|text| memory(&text))
            .unwrap_or_default();
        Usage {
            cpu,
            resident_bytes,
            private_bytes,
        }
    }
}

fn timeval(t: nix::sys::time::TimeVal) -> Duration {
    Duration::from_secs(t.tv_sec().max(0) as u64) + Duration::from_micros(t.tv_usec().max(0) as u64)
}

/// Resident and private bytes from `/proc/self/smaps_rollup` (`Rss`, `Private_Clean` and
/// `Private_Dirty`, in kB).
fn memory(smaps_rollup: &str) -> (u64, u64) {
    let kb = |field: &str| -> u64 {
        smaps_rollup
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
            * 1024
    };
    (kb("Rss:"), kb("Private_Clean:") + kb("Private_Dirty:"))
}

// === impl CostMetrics ===

impl Collector for CostMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let usage = Usage::now();
        let cpu = ConstCounter::new(usage.cpu.as_secs_f64());
        cpu.encode(encoder.encode_descriptor(
            "cpu_seconds",
            "CPU time (user + system) the proxy process has used",
            None,
            cpu.metric_type(),
        )?)?;
        for (name, help, bytes) in [
            (
                "resident_memory_bytes",
                "Resident memory of the proxy process",
                usage.resident_bytes,
            ),
            (
                "private_memory_bytes",
                "Resident memory private to the proxy process (shared with no other): what the sidecar adds",
                usage.private_bytes,
            ),
        ] {
            let gauge = ConstGauge::new(i64::try_from(bytes).unwrap_or(i64::MAX));
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        let mut family = encoder.encode_descriptor(
            "self_time_seconds",
            "Time requests spent inside the proxy (to the response head, minus waiting on the upstream), by direction",
            None,
            MetricType::Histogram,
        )?;
        for (direction, slots) in [("inbound", &self.0.inbound), ("outbound", &self.0.outbound)] {
            let (buckets, count, sum) = slots.histogram();
            let labels = [("direction", direction)];
            family
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_time_is_the_whole_minus_the_upstream_and_reported_once() {
        let t = SelfTime::new();
        t.record(Direction::Outbound, Duration::from_micros(1300), Duration::from_micros(1000));
        t.record(Direction::Outbound, Duration::from_micros(800), Duration::ZERO);
        t.record(Direction::Inbound, Duration::from_micros(150), Duration::from_micros(100));
        let report = t.take_report();
        assert_eq!(report.outbound_counts, vec![1], "the request that never left is not counted");
        let ms = slot_value_ms(report.outbound_slots[0] as usize);
        assert!((ms - 0.3).abs() < 0.3 * 0.02, "{ms} ms");
        assert_eq!(report.inbound_counts, vec![1]);
        let again = t.take_report();
        assert!(again.outbound_slots.is_empty() && again.inbound_slots.is_empty());
        let (buckets, count, sum) = t.outbound.histogram();
        assert_eq!((count, buckets.iter().map(|b| b.1).sum::<u64>()), (1, 1));
        assert!((sum - 300e-6).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn memory_reads_resident_and_private_kilobytes() {
        let text = "55a0-7ffd ---p 00000000 00:00 0 [rollup]\nRss:                9000 kB\nPss:  7000 kB\nShared_Clean: 2000 kB\nPrivate_Clean:       1000 kB\nPrivate_Dirty:       6000 kB\n";
        assert_eq!(memory(text), (9000 * 1024, 7000 * 1024));
        let usage = Usage::now();
        assert!(
            usage.cpu > Duration::ZERO && usage.resident_bytes > 0 && usage.private_bytes > 0,
            "{usage:?}"
        );
    }
}

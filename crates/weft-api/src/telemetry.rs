//! Latency histogram layout shared by the proxies that record it and the control plane that
//! aggregates it.

/// Upper bounds (inclusive, milliseconds) of the latency buckets; one more bucket holds the rest.
pub const LATENCY_BOUNDS_MS: [f64; 16] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 200.0, 300.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
];

/// Number of buckets in a report: every bound plus `+Inf`.
pub const BUCKETS: usize = LATENCY_BOUNDS_MS.len() + 1;

/// Index of the bucket a latency falls into.
pub fn bucket_of(ms: f64) -> usize {
    LATENCY_BOUNDS_MS.iter().position(|b| ms <= *b).unwrap_or(LATENCY_BOUNDS_MS.len())
}

/// The `q` quantile (0..1) of a bucketed histogram, interpolated linearly inside its bucket.
/// Returns `None` when the histogram is empty.
pub fn quantile_ms(buckets: &[u64], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0);
    let mut seen = 0u64;
    for (i, count) in buckets.iter().enumerate() {
        if *count == 0 {
            continue;
        }
        if (seen + count) as f64 >= rank {
            let lower = if i == 0 { 0.0 } else { LATENCY_BOUNDS_MS[i - 1] };
            let upper = LATENCY_BOUNDS_MS.get(i).copied().unwrap_or(lower * 2.0);
            let within = (rank - seen as f64) / *count as f64;
            return Some(lower + (upper - lower) * within);
        }
        seen += count;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_and_quantiles() {
        assert_eq!(bucket_of(0.3), 0);
        assert_eq!(bucket_of(1.0), 0);
        assert_eq!(bucket_of(1.5), 1);
        assert_eq!(bucket_of(99_999.0), LATENCY_BOUNDS_MS.len());
        let mut b = vec![0u64; BUCKETS];
        b[bucket_of(4.0)] = 99; // (2, 5]
        b[bucket_of(150.0)] = 1; // (100, 200]
        let p50 = quantile_ms(&b, 0.5).unwrap();
        assert!((2.0..=5.0).contains(&p50), "p50 {p50}");
        let p99 = quantile_ms(&b, 0.99).unwrap();
        assert!((2.0..=5.0).contains(&p99), "p99 {p99}");
        let p100 = quantile_ms(&b, 1.0).unwrap();
        assert!((100.0..=200.0).contains(&p100), "max {p100}");
        assert_eq!(quantile_ms(&[0; BUCKETS], 0.99), None);
    }
}

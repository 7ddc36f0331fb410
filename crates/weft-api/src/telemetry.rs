//! Latency histogram layout shared by the proxies that record it and the control plane that
//! aggregates and judges it.
//!
//! Latencies are counted in log-scaled slots: slot 0 holds everything up to 1 µs, slot `i`
//! holds `(G^(i-1), G^i]` µs with `G` = [`LATENCY_GROWTH`], and the last slot everything above
//! ~60 s. A slot's representative value is its geometric middle, so any latency read back from
//! a histogram is within [`LATENCY_RELATIVE_ERROR`] of the true one, over the whole range. On
//! the wire only non-empty slots travel (index and count), so a report is at most
//! [`LATENCY_SLOTS`] pairs however many requests it counts.

/// Ratio between consecutive slot bounds.
pub const LATENCY_GROWTH: f64 = 1.04;
/// Largest relative error of a value read back from a slot: `sqrt(G) - 1` (0.0198), rounded up.
pub const LATENCY_RELATIVE_ERROR: f64 = 0.02;
/// Number of slots: 1 µs .. 1.04^458 µs (about 64 s), plus the slot for anything longer.
pub const LATENCY_SLOTS: usize = 460;

/// Upper bounds (inclusive, milliseconds) of the Prometheus histogram the proxies export on
/// their admin listener (coarse on purpose: it is a label set per bucket).
pub const LATENCY_BOUNDS_MS: [f64; 16] = [
    1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 200.0, 300.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0,
];

/// The slot a latency in milliseconds falls into.
pub fn slot_of(ms: f64) -> usize {
    let us = ms * 1000.0;
    if us.is_nan() || us <= 1.0 {
        return 0;
    }
    let i = (us.ln() / LATENCY_GROWTH.ln()).ceil();
    (i as usize).clamp(1, LATENCY_SLOTS - 1)
}

/// The value (milliseconds) a slot stands for: its geometric middle (0.5 µs for slot 0).
pub fn slot_value_ms(slot: usize) -> f64 {
    if slot == 0 {
        return 0.0005;
    }
    LATENCY_GROWTH.powf(slot as f64 - 0.5) / 1000.0
}

/// The `q` quantile (0..1) of a dense slot histogram (`counts[i]` for slot `i`), in
/// milliseconds. Returns `None` when the histogram is empty.
pub fn quantile_ms(counts: &[u64], q: f64) -> Option<f64> {
    // Saturating: the counts come from proxies, and a sum past u64::MAX is no quantile.
    let total = counts.iter().fold(0u64, |sum, c| sum.saturating_add(*c));
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    let mut seen = 0u64;
    for (i, count) in counts.iter().enumerate() {
        seen = seen.saturating_add(*count);
        if seen >= rank {
            return Some(slot_value_ms(i));
        }
    }
    None
}

/// Adds sparse `(slot, count)` pairs to a dense histogram; pairs naming a slot out of range
/// are counted in the last slot, and a slot's count saturates at `u64::MAX`.
pub fn add_sparse(dense: &mut [u64], slots: &[u32], counts: &[u64]) {
    let Some(last) = dense.len().checked_sub(1) else { return };
    for (s, c) in slots.iter().zip(counts) {
        let slot = &mut dense[(*s as usize).min(last)];
        *slot = slot.saturating_add(*c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cover_1us_to_60s_within_two_percent() {
        assert_eq!(slot_of(0.0), 0);
        assert_eq!(slot_of(0.001), 0);
        assert!(slot_of(60_000.0) < LATENCY_SLOTS - 1, "60 s has its own slot");
        assert_eq!(slot_of(1e9), LATENCY_SLOTS - 1);
        let mut ms = 0.0011;
        while ms < 60_000.0 {
            let back = slot_value_ms(slot_of(ms));
            assert!(
                (back / ms - 1.0).abs() <= LATENCY_RELATIVE_ERROR + 1e-9,
                "{ms} ms read back as {back}"
            );
            ms *= 1.013;
        }
    }

    #[test]
    fn quantiles_see_a_millisecond_on_two() {
        let mut two = vec![0u64; LATENCY_SLOTS];
        let mut three = vec![0u64; LATENCY_SLOTS];
        two[slot_of(2.0)] = 100;
        three[slot_of(3.0)] = 100;
        let (a, b) = (quantile_ms(&two, 0.5).unwrap(), quantile_ms(&three, 0.5).unwrap());
        assert!((a - 2.0).abs() < 0.04 && (b - 3.0).abs() < 0.06, "{a} {b}");
        let mut mixed = vec![0u64; LATENCY_SLOTS];
        mixed[slot_of(4.0)] = 99;
        mixed[slot_of(150.0)] = 1;
        assert!((quantile_ms(&mixed, 0.99).unwrap() - 4.0).abs() < 0.08);
        assert!((quantile_ms(&mixed, 1.0).unwrap() - 150.0).abs() < 3.0);
        assert_eq!(quantile_ms(&[0; LATENCY_SLOTS], 0.99), None);
        let mut dense = vec![0u64; LATENCY_SLOTS];
        add_sparse(&mut dense, &[3, 9999], &[2, 5]);
        assert_eq!((dense[3], dense[LATENCY_SLOTS - 1]), (2, 5));
    }
}

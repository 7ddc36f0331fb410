//! How long to wait before trying again: the control stream and certificate renewal after a
//! failure (reconnect), and a request before its next retry.

use std::time::Duration;

const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// First retry backoff; doubles per retry up to [`RETRY_MAX`].
const RETRY_BASE: Duration = Duration::from_millis(25);
const RETRY_MAX: Duration = Duration::from_millis(250);

/// Exponential backoff with equal jitter after `failures` failures in a row: a uniform delay
/// between half of `min(MAX, MIN * 2^n)` and all of it, so a crowd of proxies spreads out
/// while none retries at once.
pub(crate) fn reconnect(failures: u32) -> Duration {
    let cap = RECONNECT_MIN.saturating_mul(1u32 << failures.min(16)).min(RECONNECT_MAX);
    let ms = cap.as_millis() as u64;
    Duration::from_millis(rand::random_range(ms / 2..=ms.max(1)))
}

/// Exponential backoff with full jitter before retry `n` (1-based): a uniform delay up to
/// `min(MAX, BASE * 2^(n-1))`.
pub(crate) fn retry(n: u32) -> Duration {
    let ceiling = RETRY_BASE.saturating_mul(1 << n.saturating_sub(1).min(8)).min(RETRY_MAX);
    Duration::from_micros(rand::random_range(0..=ceiling.as_micros() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_backoff_is_capped_and_jittered() {
        for n in 0..40 {
            let d = reconnect(n);
            assert!(d <= RECONNECT_MAX, "{d:?}");
        }
        let samples: std::collections::BTreeSet<_> = (0..50).map(|_| reconnect(10).as_millis()).collect();
        assert!(samples.len() > 5, "jitter spreads retries: {samples:?}");
        assert!(
            samples.iter().all(|ms| *ms >= RECONNECT_MAX.as_millis() / 2),
            "equal jitter: {samples:?}"
        );
        assert!(reconnect(0) <= RECONNECT_MIN);
    }

    #[test]
    fn retry_backoff_doubles_up_to_its_ceiling() {
        assert!((0..50).all(|_| retry(1) <= RETRY_BASE));
        assert!((0..50).all(|_| retry(30) <= RETRY_MAX));
    }
}

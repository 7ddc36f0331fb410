//! The proxy's one notion of time. The request path reads [`mono_ms`] (cheap, monotonic);
//! records people read carry [`unix_ms`]; certificate renewal, whose subject is time, reads a
//! [`Clock`], which a test can make manual and advance instead of sleeping.

use parking_lot::Mutex;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the process first asked (never 0, so 0 can mean "never").
pub(crate) fn mono_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// Wall time as unix milliseconds.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A handle to the wall clock time-driven logic reads; clones share it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Clock {
    /// `None` reads the real clock; `Some` is a manual clock's time past the moment it was made.
    manual: Option<Arc<Manual>>,
}

#[derive(Debug)]
struct Manual {
    unix: SystemTime,
    advanced: Mutex<Duration>,
    moved: tokio::sync::Notify,
}

impl Clock {
    /// A clock that stands still until [`Clock::advance`] moves it.
    #[cfg(test)]
    pub(crate) fn manual() -> Self {
        Self {
            manual: Some(Arc::new(Manual {
                unix: SystemTime::now(),
                advanced: Mutex::new(Duration::ZERO),
                moved: tokio::sync::Notify::new(),
            })),
        }
    }

    /// Moves a manual clock forward (a real clock cannot be moved).
    #[cfg(test)]
    pub(crate) fn advance(&self, by: Duration) {
        let manual = self.manual.as_ref().expect("only a manual clock advances");
        *manual.advanced.lock() += by;
        manual.moved.notify_waiters();
    }

    /// Wall time as unix seconds.
    pub(crate) fn unix_secs(&self) -> u64 {
        let now = match &self.manual {
            None => SystemTime::now(),
            Some(m) => m.unix + *m.advanced.lock(),
        };
        now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
    }

    /// Waits until `d` has passed on this clock, counted from this call: real time, or a
    /// manual clock advanced that far.
    pub(crate) fn sleep(&self, d: Duration) -> impl std::future::Future<Output = ()> + Send + 'static {
        let manual = self.manual.clone();
        let until = manual.as_ref().map(|m| *m.advanced.lock() + d);
        async move {
            let (Some(m), Some(until)) = (manual, until) else {
                return tokio::time::sleep(d).await;
            };
            loop {
                let moved = m.moved.notified();
                if *m.advanced.lock() >= until {
                    return;
                }
                moved.await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_clock_moves_only_when_advanced() {
        let clock = Clock::manual();
        let t0 = clock.unix_secs();
        let waiter = tokio::spawn(clock.sleep(Duration::from_secs(30)));
        tokio::task::yield_now().await;
        clock.advance(Duration::from_secs(20));
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "20 s of 30 have passed");
        clock.advance(Duration::from_secs(10));
        waiter.await.expect("woken once 30 s have passed");
        assert_eq!(clock.unix_secs() - t0, 30);
    }
}

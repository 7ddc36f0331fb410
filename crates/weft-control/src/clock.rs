//! The control plane's one notion of time: bake windows, enforcement timeouts, telemetry
//! windows and the warm-up after a restart all read it, so a test whose subject is time
//! advances a manual clock instead of sleeping.

use parking_lot::Mutex;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A handle to the time source; clones share it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Clock {
    /// `None` reads the real clocks; `Some` is a manual clock's offset from the moment it was made.
    manual: Option<Arc<Manual>>,
}

#[derive(Debug)]
struct Manual {
    instant: Instant,
    unix: SystemTime,
    advanced: Mutex<Duration>,
}

impl Clock {
    /// A clock that stands still until [`Clock::advance`] moves it.
    #[cfg(test)]
    pub(crate) fn manual() -> Self {
        Self {
            manual: Some(Arc::new(Manual {
                instant: Instant::now(),
                unix: SystemTime::now(),
                advanced: Mutex::new(Duration::ZERO),
            })),
        }
    }

    /// Moves a manual clock forward (a real clock cannot be moved).
    #[cfg(test)]
    pub(crate) fn advance(&self, by: Duration) {
        let manual = self.manual.as_ref().expect("only a manual clock advances");
        *manual.advanced.lock() += by;
    }

    pub(crate) fn now(&self) -> Instant {
        match &self.manual {
            None => Instant::now(),
            Some(m) => m.instant + *m.advanced.lock(),
        }
    }

    /// Wall time as unix milliseconds (for records people read).
    pub(crate) fn unix_ms(&self) -> u64 {
        let now = match &self.manual {
            None => SystemTime::now(),
            Some(m) => m.unix + *m.advanced.lock(),
        };
        now.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_only_when_advanced() {
        let clock = Clock::manual();
        let (t0, ms0) = (clock.now(), clock.unix_ms());
        assert_eq!(clock.now(), t0);
        clock.advance(Duration::from_secs(90));
        assert_eq!(clock.now() - t0, Duration::from_secs(90));
        assert_eq!(clock.unix_ms() - ms0, 90_000);
    }
}

//! The clock the services read, as a seam: [`SystemClock`] in production, [`ManualClock`] where
//! a test decides when time passes (idleness, commit intervals, retention) instead of waiting
//! for it.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Monotonic time for intervals and wall-clock time for what is stamped or compared with event
/// times.
pub trait Clock: Send + Sync {
    /// Now, for intervals and deadlines.
    fn now(&self) -> Instant;
    /// Now as microseconds since the Unix epoch.
    fn unix_us(&self) -> i64;
    /// Now as whole seconds since the Unix epoch.
    fn unix_s(&self) -> i64 {
        self.unix_us().div_euclid(1_000_000)
    }
}

/// The operating system's clocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn unix_us(&self) -> i64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
    }
}

/// A clock that moves only when told to: both readings advance together by [`ManualClock::advance`].
#[derive(Debug)]
pub struct ManualClock {
    start: Instant,
    start_unix_us: i64,
    elapsed: Mutex<Duration>,
}

impl ManualClock {
    /// A clock whose wall-clock reading starts at `unix_us`.
    pub fn starting_at(unix_us: i64) -> Self {
        Self { start: Instant::now(), start_unix_us: unix_us, elapsed: Mutex::new(Duration::ZERO) }
    }

    /// Moves both readings forward by `by`.
    pub fn advance(&self, by: Duration) {
        *self.elapsed.lock().unwrap_or_else(|p| p.into_inner()) += by;
    }

    fn elapsed(&self) -> Duration {
        *self.elapsed.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        self.start + self.elapsed()
    }

    fn unix_us(&self) -> i64 {
        self.start_unix_us.saturating_add(self.elapsed().as_micros() as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manual_clock_moves_both_readings_together_and_only_when_told() {
        let clock = ManualClock::starting_at(1_700_000_000_250_000);
        let (t0, u0) = (clock.now(), clock.unix_us());
        assert_eq!((clock.now(), clock.unix_us()), (t0, u0));
        clock.advance(Duration::from_millis(1_500));
        assert_eq!(clock.now() - t0, Duration::from_millis(1_500));
        assert_eq!(clock.unix_us() - u0, 1_500_000);
        assert_eq!(clock.unix_s(), 1_700_000_001);
    }

    #[test]
    fn the_system_clock_reads_the_epoch_in_whole_seconds_too() {
        let clock = SystemClock;
        let (s, us) = (clock.unix_s(), clock.unix_us());
        assert!(us / 1_000_000 - s <= 1);
        assert!(s > 1_700_000_000);
    }
}

//! Waiting between attempts: the clamped, jittered exponential [`Backoff`] every retry loop of the agent and of
//! the service client uses. No timer of its own: callers sleep for the delays it gives.

use backon::BackoffBuilder;
use std::time::Duration;

/// Jittered exponential backoff between `min` and `max`. backon's jitter adds up to 100% of the delay, which
/// can overshoot the maximum, so every delay is clamped to `max`.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    inner: backon::ExponentialBackoff,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            inner: Self::build(min, max),
        }
    }

    fn build(min: Duration, max: Duration) -> backon::ExponentialBackoff {
        backon::ExponentialBuilder::new()
            .with_jitter()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .without_max_times()
            .build()
    }

    /// The next delay to wait, never above the maximum.
    pub fn next_delay(&mut self) -> Duration {
        self.inner.next().unwrap_or(self.max).min(self.max)
    }

    /// Start over from the minimum delay (after a success).
    pub fn reset(&mut self) {
        self.inner = Self::build(self.min, self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_clamped_and_resets() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let mut b = Backoff::new(min, max);
        let delays: Vec<_> = (0..20).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d >= min && *d <= max), "{delays:?}");
        assert_eq!(delays[19], max);
        b.reset();
        assert!(b.next_delay() <= min * 2);
    }
}

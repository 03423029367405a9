//! Waiting between attempts: the clamped, jittered exponential [`Backoff`] every retry loop of the agent uses,
//! and [`until_stopped`], the one loop that retries an operation until it succeeds or the agent stops it.

use backon::BackoffBuilder;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

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

/// An error a retry loop logs. A condition that was already reported once where it arose (a full disk, by the
/// store) is logged at debug level on each retry; anything else is worth an error line every time.
pub(crate) trait Retryable: std::fmt::Display {
    fn reported_where_it_arose(&self) -> bool;
}

/// Runs `attempt` until it succeeds, waiting `backoff` between failures (reset after a success), and logs each
/// failure with `what` (what failed and what is kept meanwhile). `None` if `stop` is cancelled while waiting:
/// the caller gives up on the operation, so `stop` must be the token after which giving up is safe.
pub(crate) async fn until_stopped<T, E: Retryable, F: Future<Output = Result<T, E>>>(
    what: &str,
    backoff: &mut Backoff,
    stop: &CancellationToken,
    mut attempt: impl FnMut() -> F,
) -> Option<T> {
    loop {
        match attempt().await {
            Ok(value) => {
                backoff.reset();
                return Some(value);
            }
            Err(e) => {
                if e.reported_where_it_arose() {
                    tracing::debug!(error = %e, "{what}; retrying");
                } else {
                    tracing::error!(error = %e, "{what}; retrying");
                }
                tokio::select! {
                    _ = stop.cancelled() => return None,
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn backoff_is_clamped_and_resets() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(2));
        let mut b = Backoff::new(min, max);
        let delays: Vec<_> = (0..20).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d >= min && *d <= max), "{delays:?}");
        assert_eq!(delays[19], max);
        b.reset();
        assert!(b.next_delay() <= min * 2);
    }

    struct Flaky(&'static str);

    impl std::fmt::Display for Flaky {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl Retryable for Flaky {
        fn reported_where_it_arose(&self) -> bool {
            false
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_success_or_stop() {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(40));
        let stop = CancellationToken::new();
        let mut tries = 0;
        let got = until_stopped("flaky", &mut backoff, &stop, || {
            tries += 1;
            let n = tries;
            async move { if n < 4 { Err(Flaky("not yet")) } else { Ok(n) } }
        })
        .await;
        assert_eq!(got, Some(4));
        stop.cancel();
        let never: Option<()> = until_stopped("broken", &mut backoff, &stop, || async {
            Err(Flaky("never"))
        })
        .await;
        assert_eq!(never, None);
    }
}

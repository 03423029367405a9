//! Retrying: [`until_stopped`], the one loop that retries an operation until it succeeds or the agent stops it,
//! waiting the clamped, jittered exponential [`Backoff`] of the contract crate between attempts; its form
//! [`until_stopped_with`] hands the operation its input by value and takes it back from each failure, so that
//! a retried commit copies nothing.

pub use endpoint_wire::Backoff;
use tokio_util::sync::CancellationToken;

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
    until_stopped_with(what, backoff, stop, (), |()| {
        let tried = attempt();
        async move { tried.await.map_err(|e| (e, Some(()))) }
    })
    .await
}

/// [`until_stopped`] for an operation that takes `input` by value and gives it back when it fails, so that
/// trying again needs no copy. Also `None` if a failure did not give the input back (nothing left to try with).
pub(crate) async fn until_stopped_with<I, T, E: Retryable, F>(
    what: &str,
    backoff: &mut Backoff,
    stop: &CancellationToken,
    mut input: I,
    mut attempt: impl FnMut(I) -> F,
) -> Option<T>
where
    F: Future<Output = Result<T, (E, Option<I>)>>,
{
    loop {
        match attempt(input).await {
            Ok(value) => {
                backoff.reset();
                return Some(value);
            }
            Err((e, back)) => {
                let Some(back) = back else {
                    tracing::error!(error = %e, "{what}; given up: nothing came back to retry with");
                    return None;
                };
                input = back;
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
    use std::time::Duration;

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

    #[tokio::test(start_paused = true)]
    async fn the_input_given_back_is_retried_and_a_lost_one_ends_the_retries() {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(40));
        let stop = CancellationToken::new();
        let mut seen = Vec::new();
        let got = until_stopped_with("flaky", &mut backoff, &stop, vec![1, 2], |v: Vec<i32>| {
            seen.push(v.clone());
            let n = seen.len();
            async move {
                if n < 3 {
                    Err((Flaky("not yet"), Some(v)))
                } else {
                    Ok(v.len())
                }
            }
        })
        .await;
        assert_eq!(got, Some(2));
        assert_eq!(
            seen,
            vec![vec![1, 2]; 3],
            "each retry gets the same input back"
        );
        let lost: Option<()> = until_stopped_with("lost", &mut backoff, &stop, 7, |_| async {
            Err((Flaky("gone"), None))
        })
        .await;
        assert_eq!(lost, None, "nothing to retry with: given up at once");
    }
}

//! The built-in functions every endpoint offers: `echo` (returns the payload; instant, so it also runs on
//! arrival) and `sleep` (the payload is a number of milliseconds). In-process, no child.

use super::{Outcome, finished};
use endpoint_wire::Status;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub(super) fn echo(payload: &[u8]) -> Outcome {
    finished(Status::Ok, None, payload.to_vec())
}

/// Sleeps the payload's milliseconds, at most `timeout` (the built-ins' timeout, or the task's if shorter).
pub(super) async fn sleep(payload: &[u8], timeout: Duration, kill: &CancellationToken) -> Outcome {
    let text = String::from_utf8_lossy(payload);
    let text = text.trim();
    if text.is_empty() {
        return finished(
            Status::Rejected,
            None,
            "sleep needs a payload: the number of milliseconds to sleep",
        );
    }
    let Ok(ms) = text.parse::<u64>() else {
        return finished(
            Status::Rejected,
            None,
            format!("sleep payload {text:?} is not a whole number of milliseconds"),
        );
    };
    let want = Duration::from_millis(ms);
    let limit = timeout.min(want);
    tokio::select! {
        _ = kill.cancelled() => Outcome::Interrupted,
        _ = tokio::time::sleep(limit) => if limit < want {
            finished(Status::Timeout, None, format!("timed out after {} ms", limit.as_millis()))
        } else {
            finished(Status::Ok, None, Vec::new())
        },
    }
}

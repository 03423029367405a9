//! Results the writer committed, handed to the publisher directly: the writer puts each committed result here
//! (moved, not copied) right after its commit and wakes the publisher, which sends them without reading them back
//! from the database on a blocking thread. The database stays the truth: a result is here only once it is on
//! disk, and the publisher still marks it published only on the broker's confirm. What does not fit (more than
//! [`HANDOFF_BYTES`] or [`PUBLISH_WINDOW`] results waiting: a publisher that is behind, blocked or not
//! connected) is left out, and the publisher is told to read the database instead, as it does at every start.

use crate::limits::{HANDOFF_BYTES, PUBLISH_WINDOW};
use crate::task::TaskResult;
use endpoint_wire::ServiceName;
use std::collections::VecDeque;
use std::sync::Mutex;
use tokio::sync::Notify;

/// A committed result: its row id (for the "published" mark), the result, and the service it goes to.
#[derive(Debug)]
pub struct Committed {
    pub id: i64,
    pub result: TaskResult,
    pub service: Option<ServiceName>,
}

#[derive(Default)]
struct Waiting {
    results: VecDeque<Committed>,
    bytes: usize,
    /// Some committed result was left out: the publisher must read the database to find it.
    overflowed: bool,
}

/// The queue between the writer and the publisher, with the publisher's wake-up.
#[derive(Default)]
pub struct Handoff {
    waiting: Mutex<Waiting>,
    notify: Notify,
}

impl Handoff {
    /// The writer, after a commit: adds what fits and wakes the publisher (one permit).
    pub(super) fn push(&self, committed: Vec<Committed>) {
        if committed.is_empty() {
            return;
        }
        {
            let mut w = self
                .waiting
                .lock()
                .expect("the hand-off's lock is never poisoned");
            for c in committed {
                let bytes = c.result.body.len();
                // Once something was left out the rest is too: the database read that follows finds it all.
                if w.overflowed
                    || w.results.len() >= PUBLISH_WINDOW
                    || (w.bytes + bytes > HANDOFF_BYTES && !w.results.is_empty())
                {
                    w.overflowed = true;
                    continue;
                }
                w.bytes += bytes;
                w.results.push_back(c);
            }
        }
        crate::stages::results_stored();
        self.notify.notify_one();
    }

    /// The publisher: up to `max` waiting results, oldest first, and whether the database must be read because
    /// something was left out (the flag is cleared: the caller reads).
    pub fn take(&self, max: usize) -> (Vec<Committed>, bool) {
        let mut w = self
            .waiting
            .lock()
            .expect("the hand-off's lock is never poisoned");
        let n = max.min(w.results.len());
        let taken: Vec<Committed> = w.results.drain(..n).collect();
        w.bytes -= taken.iter().map(|c| c.result.body.len()).sum::<usize>();
        let overflowed = std::mem::take(&mut w.overflowed);
        (taken, overflowed)
    }

    /// Drops everything waiting: a publisher that starts reads every pending result from the database anyway.
    pub fn clear(&self) {
        *self
            .waiting
            .lock()
            .expect("the hand-off's lock is never poisoned") = Waiting::default();
    }

    /// Wakes after the next [`Handoff::push`] (or at once if one happened since the last wake-up).
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.notify.notified()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use endpoint_wire::Status;

    fn committed(id: i64, bytes: usize) -> Committed {
        Committed {
            id,
            result: TaskResult {
                task_id: format!("t{id}"),
                status: Status::Ok,
                exit_code: Some(0),
                attempts: 1,
                duration_ms: 0,
                body: vec![0; bytes],
            },
            service: None,
        }
    }

    #[test]
    fn what_does_not_fit_is_left_for_a_database_read() {
        let h = Handoff::default();
        h.push(vec![committed(1, 10), committed(2, 10)]);
        let (got, overflowed) = h.take(1);
        assert_eq!(got.iter().map(|c| c.id).collect::<Vec<_>>(), vec![1]);
        assert!(!overflowed);
        // One over the byte budget: left out, and everything after it too, until the publisher takes.
        h.push(vec![committed(3, HANDOFF_BYTES), committed(4, 10)]);
        let (got, overflowed) = h.take(10);
        assert_eq!(got.iter().map(|c| c.id).collect::<Vec<_>>(), vec![2]);
        assert!(
            overflowed,
            "the publisher must be told to read the database"
        );
        let (rest, again) = h.take(10);
        assert!(rest.is_empty() && !again, "nothing waits once taken");
        // A single result larger than the budget is still handed over when nothing else waits.
        h.push(vec![committed(5, HANDOFF_BYTES + 1)]);
        let (got, overflowed) = h.take(10);
        assert_eq!((got.len(), overflowed), (1, false));
    }
}

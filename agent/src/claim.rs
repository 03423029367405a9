//! The claim policy, in one place: which queued tasks one executor slot takes in one commit. The store runs
//! the queries and asks this module what to take; the slots tell it how long each function's runs take.
//!
//! - **Batches of short tasks only.** Tasks of functions whose runs are known to be short (a commit, an fsync,
//!   costs about as much as such a task) are claimed up to [`MAX_CLAIM`] at a time and at most
//!   [`MAX_CLAIM_BYTES`] of payload; a task of any other function (slow, or not seen yet) is claimed alone, so
//!   it never holds queued tasks back from an idle slot. Not scaled by the depth of the queue on disk: it is
//!   shallow at steady state (the backlog waits in the broker).
//! - **Quarantine.** Tasks that were running when the agent died are suspects: each runs alone, with nothing
//!   beside it, so a poison task crashes the agent by itself and the tasks that happened to share its crash are
//!   not charged for it again.

use crate::limits::{MAX_CLAIM, MAX_CLAIM_BYTES, SHORT_TASK};
use std::collections::HashMap;
use std::time::Duration;

/// How many tasks one claim takes: up to `max`, oldest first. With `only`, a claim of several holds only tasks of
/// those functions (the ones known to be short): a task of another function is claimed alone, and the claim
/// stops in front of one. A number is "up to that many of any function".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    pub max: usize,
    pub only: Option<Vec<String>>,
}

impl Want {
    fn batchable(&self, function: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|f| f == function))
    }
}

impl From<usize> for Want {
    fn from(max: usize) -> Want {
        Want { max, only: None }
    }
}

/// What the slots learned about how long each function's runs take, shared by all of them.
#[derive(Debug, Default)]
pub(crate) struct RunTimes(std::sync::Mutex<HashMap<String, Duration>>);

impl RunTimes {
    /// Folds one run of `function` into its moving average.
    pub(crate) fn ran(&self, function: &str, took: Duration) {
        let mut times = self.0.lock().expect("run times are never poisoned");
        match times.get_mut(function) {
            Some(mean) => *mean = (*mean * 3 + took) / 4,
            None => {
                times.insert(function.to_owned(), took);
            }
        }
    }

    /// What the next claim takes.
    pub(crate) fn want(&self) -> Want {
        want(&self.0.lock().expect("run times are never poisoned"))
    }
}

fn want(run_times: &HashMap<String, Duration>) -> Want {
    let mut short: Vec<String> = run_times
        .iter()
        .filter(|(_, mean)| **mean < SHORT_TASK)
        .map(|(f, _)| f.clone())
        .collect();
    if short.is_empty() {
        return 1.into();
    }
    short.sort();
    Want {
        max: MAX_CLAIM,
        only: Some(short),
    }
}

/// Whether a claim takes the queued task it is offered, and whether it looks at the next one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Take {
    /// Take it, and offer the next.
    AndMore,
    /// Take it, and stop.
    AndStop,
    /// Leave it (and everything after it).
    Stop,
}

/// One claim choosing among the queued tasks, offered oldest first (at most `want.max` of them).
pub(crate) struct Selection<'w> {
    want: &'w Want,
    taken: usize,
    bytes: usize,
}

impl<'w> Selection<'w> {
    pub(crate) fn new(want: &'w Want) -> Self {
        Selection {
            want,
            taken: 0,
            bytes: 0,
        }
    }

    /// Offers the next queued task, of `function` with `payload_bytes` of payload.
    pub(crate) fn offer(&mut self, function: &str, payload_bytes: usize) -> Take {
        if self.taken >= self.want.max {
            return Take::Stop;
        }
        let batchable = self.want.batchable(function);
        if self.taken > 0 && !batchable {
            return Take::Stop;
        }
        self.taken += 1;
        self.bytes += payload_bytes.max(1);
        if !batchable || self.taken >= self.want.max || self.bytes >= MAX_CLAIM_BYTES {
            Take::AndStop
        } else {
            Take::AndMore
        }
    }
}

/// The oldest suspect still around, as the store found it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Suspect {
    /// One is running now.
    Running,
    /// One is queued (its queue position).
    Queued(i64),
}

/// What quarantine allows a claim to take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Quarantine {
    /// No suspect: claim as [`Selection`] decides.
    Off,
    /// Claim nothing now: a suspect runs, or must wait until nothing else runs.
    Wait,
    /// Claim this suspect (its queue position), alone.
    Alone(i64),
}

/// Quarantine's rule: a suspect runs alone and nothing runs beside it. `busy` says whether any task runs now;
/// it is asked only when a suspect waits.
pub(crate) fn quarantine(suspect: Option<Suspect>, busy: impl FnOnce() -> bool) -> Quarantine {
    match suspect {
        None => Quarantine::Off,
        Some(Suspect::Running) => Quarantine::Wait,
        Some(Suspect::Queued(_)) if busy() => Quarantine::Wait,
        Some(Suspect::Queued(seq)) => Quarantine::Alone(seq),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_batch_only_short_functions() {
        let check = |times: &[(&str, u64)], expected: Want| {
            let times = times
                .iter()
                .map(|(f, us)| (f.to_string(), Duration::from_micros(*us)))
                .collect();
            assert_eq!(want(&times), expected, "{times:?}");
        };
        check(&[], 1.into());
        check(&[("sleep", 5_000)], 1.into());
        let short = |fs: &[&str]| Want {
            max: MAX_CLAIM,
            only: Some(fs.iter().map(|f| f.to_string()).collect()),
        };
        check(&[("echo", 20), ("sleep", 5_000)], short(&["echo"]));
        check(&[("wc", 300), ("echo", 20)], short(&["echo", "wc"]));
    }

    /// How many of `queued` (function, payload bytes) one claim with `want` takes.
    fn taken(want: &Want, queued: &[(&str, usize)]) -> usize {
        let mut selection = Selection::new(want);
        let mut n = 0;
        for (function, bytes) in queued {
            match selection.offer(function, *bytes) {
                Take::AndMore => n += 1,
                Take::AndStop => return n + 1,
                Take::Stop => return n,
            }
        }
        n
    }

    #[test]
    fn selection() {
        let only_echo = Want {
            max: 10,
            only: Some(vec!["echo".into()]),
        };
        let q = [("echo", 1), ("echo", 1), ("sleep", 1), ("echo", 1)];
        assert_eq!(taken(&only_echo, &q), 2, "stops in front of a slow one");
        assert_eq!(taken(&only_echo, &q[2..]), 1, "a slow one alone");
        assert_eq!(taken(&3.into(), &q), 3, "a number takes any function");
        assert_eq!(taken(&0.into(), &q), 0);
        let big = MAX_CLAIM_BYTES * 3 / 5;
        assert_eq!(
            taken(&10.into(), &[("echo", big); 3]),
            2,
            "bounded in bytes"
        );
        assert_eq!(
            taken(&10.into(), &[("echo", MAX_CLAIM_BYTES * 2)]),
            1,
            "at least one"
        );
    }

    #[test]
    fn quarantine_rule() {
        assert_eq!(quarantine(None, || true), Quarantine::Off);
        assert_eq!(
            quarantine(Some(Suspect::Running), || false),
            Quarantine::Wait
        );
        assert_eq!(
            quarantine(Some(Suspect::Queued(7)), || true),
            Quarantine::Wait
        );
        assert_eq!(
            quarantine(Some(Suspect::Queued(7)), || false),
            Quarantine::Alone(7)
        );
    }
}

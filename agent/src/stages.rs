//! Per-stage latency histograms of the task path, for finding where the agent's tail comes from (issue 15): an
//! opt-in cargo feature, `stage-timing`, off in normal builds (then every call here is an empty inline function).
//! With it, the subscriber, the publisher and the store's callers record how long each stage took, and at a
//! clean stop the agent logs p50/p90/p99/max per stage and, if `ENDPOINT_AGENT_STAGES_FILE` is set, appends them
//! to that file as one JSON line (`cargo bench -p benches -- --agent-bin` with such a build reads them).
//! Stages: `intake_commit` (a batch's first delivery arriving to its commit returning: writer queue and fsync),
//! `ack` (that commit to the ack written), `stored_to_publish` (the oldest result committed since the last
//! publish to the publisher sending: the hand-off), `publish_to_confirm` (a result sent to its confirm),
//! `writer_batch` (one writer transaction, statements and commit with its fsync, on the writer thread) and
//! `checkpoint` (one checkpoint on the checkpointer thread: off the task path, recorded to show its cost).

use std::time::{Duration, Instant};

/// A stage of the task path (`StoredToPublish` is recorded by `publishing`, compiled only with the feature).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(feature = "stage-timing"), allow(dead_code))]
pub(crate) enum Stage {
    IntakeCommit,
    Ack,
    StoredToPublish,
    PublishToConfirm,
    WriterBatch,
    Checkpoint,
}

#[cfg(feature = "stage-timing")]
mod imp {
    use super::{Duration, Instant, Stage};
    use hdrhistogram::Histogram;
    use std::sync::Mutex;

    const STAGES: [(Stage, &str); 6] = [
        (Stage::IntakeCommit, "intake_commit"),
        (Stage::Ack, "ack"),
        (Stage::StoredToPublish, "stored_to_publish"),
        (Stage::PublishToConfirm, "publish_to_confirm"),
        (Stage::WriterBatch, "writer_batch"),
        (Stage::Checkpoint, "checkpoint"),
    ];

    static HISTS: Mutex<Option<Vec<Histogram<u64>>>> = Mutex::new(None);
    static STORED: Mutex<Option<Instant>> = Mutex::new(None);

    pub(crate) fn record(stage: Stage, took: Duration) {
        let mut h = HISTS.lock().expect("stage histograms");
        let hists = h.get_or_insert_with(|| {
            STAGES
                .iter()
                .map(|_| Histogram::new_with_bounds(1, 600_000_000, 3).expect("histogram bounds"))
                .collect()
        });
        let i = STAGES.iter().position(|(s, _)| *s == stage).unwrap_or(0);
        let _ = hists[i].record((took.as_micros() as u64).clamp(1, 600_000_000));
    }

    pub(crate) fn results_stored() {
        STORED
            .lock()
            .expect("stored time")
            .get_or_insert_with(Instant::now);
    }

    pub(crate) fn publishing() {
        if let Some(at) = STORED.lock().expect("stored time").take() {
            record(Stage::StoredToPublish, at.elapsed());
        }
    }

    pub(crate) fn report() {
        let h = HISTS.lock().expect("stage histograms");
        let Some(hists) = h.as_ref() else { return };
        let mut line = serde_json::Map::new();
        for ((_, name), hist) in STAGES.iter().zip(hists) {
            let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
            let stage = serde_json::json!({"count": hist.len(), "p50_ms": ms(0.5), "p90_ms": ms(0.9),
                "p99_ms": ms(0.99), "max_ms": hist.max() as f64 / 1000.0});
            tracing::info!(stage = name, %stage, "stage timing");
            line.insert((*name).to_owned(), stage);
        }
        if let Some(path) = std::env::var_os("ENDPOINT_AGENT_STAGES_FILE") {
            use std::io::Write;
            let text = serde_json::Value::Object(line).to_string();
            let written = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut f| writeln!(f, "{text}"));
            if let Err(e) = written {
                tracing::warn!(error = %e, "cannot append the stage timings");
            }
        }
    }
}

/// Records that `stage` took `took`.
#[cfg(feature = "stage-timing")]
pub(crate) fn record(stage: Stage, took: Duration) {
    imp::record(stage, took);
}
/// Records that `stage` took `took` (no-op without `stage-timing`).
#[cfg(not(feature = "stage-timing"))]
#[inline(always)]
pub(crate) fn record(_stage: Stage, _took: Duration) {}

/// Records the time since `since` for `stage`.
pub(crate) fn since(stage: Stage, since: Instant) {
    record(stage, since.elapsed());
}

/// Results were committed: the start of `stored_to_publish`, unless an earlier one is still unpublished.
#[cfg(feature = "stage-timing")]
pub(crate) fn results_stored() {
    imp::results_stored();
}
/// Results were committed (no-op without `stage-timing`).
#[cfg(not(feature = "stage-timing"))]
#[inline(always)]
pub(crate) fn results_stored() {}

/// The publisher is sending results: the end of `stored_to_publish`.
#[cfg(feature = "stage-timing")]
pub(crate) fn publishing() {
    imp::publishing();
}
/// The publisher is sending results (no-op without `stage-timing`).
#[cfg(not(feature = "stage-timing"))]
#[inline(always)]
pub(crate) fn publishing() {}

/// Logs (and appends to `ENDPOINT_AGENT_STAGES_FILE`) the percentiles of every stage.
#[cfg(feature = "stage-timing")]
pub(crate) fn report() {
    imp::report();
}
/// Nothing to report without `stage-timing`.
#[cfg(not(feature = "stage-timing"))]
#[inline(always)]
pub(crate) fn report() {}

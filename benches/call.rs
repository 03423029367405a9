//! The service library's calls as a measured mode: `service_setup::Client::call` against the real agent, either
//! `callers` concurrent callers each calling again as soon as its call returns (blast), or open-loop calls at a
//! rate (paced: each call starts at its scheduled time on a task of its own, never waiting for earlier ones).
//! Latency is a call's whole life, scheduled start to result in hand, recorded in the run's [`RunState`].

use crate::broker::{RunState, task_id};
use anyhow::{Context, Result};
use endpoint_wire::EndpointId;
use service_setup::{Client, SubmitOptions};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long one call may wait for its result before the run fails.
const CALL_TIMEOUT: Duration = Duration::from_secs(300);

async fn one_call(
    client: &Client,
    state: &RunState,
    ep: &EndpointId,
    payload: &[u8],
    seq: usize,
) -> Result<()> {
    let options = SubmitOptions {
        task_id: Some(task_id(state.run, seq)),
        timeout: None,
    };
    let mut call = client
        .start_call(ep, endpoint_agent::config::BUILTIN_ECHO, payload, options)
        .await
        .context("while starting a call")?;
    let result = call
        .wait(CALL_TIMEOUT)
        .await
        .context("while waiting for a call's result")?;
    if result.status != "ok" {
        anyhow::bail!("call {seq} ended {}", result.status);
    }
    state.receive(seq, Instant::now());
    Ok(())
}

/// `callers` concurrent callers take the run's tasks one by one until all are called.
pub async fn blast(
    client: &Client,
    state: &Arc<RunState>,
    ep: &EndpointId,
    payload: &[u8],
    callers: usize,
) -> Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..callers.max(1) {
        let (client, state, ep, payload, next) = (
            client.clone(),
            state.clone(),
            ep.clone(),
            payload.to_vec(),
            next.clone(),
        );
        set.spawn(async move {
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= state.total {
                    return Ok::<(), anyhow::Error>(());
                }
                state.mark_sent(seq, Instant::now());
                one_call(&client, &state, &ep, &payload, seq).await?;
            }
        });
    }
    while let Some(done) = set.join_next().await {
        done.context("a caller panicked")??;
    }
    Ok(())
}

/// Calls at `rate` per second, open loop: latency counts from each call's scheduled time.
pub async fn paced(
    client: &Client,
    state: &Arc<RunState>,
    ep: &EndpointId,
    payload: &[u8],
    rate: f64,
) -> Result<()> {
    let start = Instant::now();
    let mut next = 0usize;
    let mut set = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while next < state.total {
        tick.tick().await;
        let due = ((start.elapsed().as_secs_f64() * rate) as usize + 1).min(state.total);
        for seq in next..due {
            state.mark_sent(seq, start + Duration::from_secs_f64(seq as f64 / rate));
            let (client, state, ep, payload) =
                (client.clone(), state.clone(), ep.clone(), payload.to_vec());
            set.spawn(async move { one_call(&client, &state, &ep, &payload, seq).await });
        }
        next = next.max(due);
        while let Some(done) = set.try_join_next() {
            done.context("a call panicked")??;
        }
    }
    while let Some(done) = set.join_next().await {
        done.context("a call panicked")??;
    }
    Ok(())
}

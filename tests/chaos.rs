//! The chaos run: thousands of tasks through a real agent behind the fault proxy while connection cuts,
//! blackholes, SIGKILLs (restart on the same data dir) and a broker restart strike at random times drawn from a
//! printed seed; every task id is counted and the run prints one line of figures. Lost must be 0.
//!
//! In the suite it runs at a size that fits CI. The full size (20,000 tasks, 20 cuts, 3 blackholes,
//! 3 SIGKILLs, 1 broker restart) runs with
//! `CHAOS_FULL=1 cargo test -p tests --release chaos -- --nocapture`; `CHAOS_SEED=N` repeats a run.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use test_support::proxy::{Mode, Proxy};
use test_support::*;

struct Size {
    tasks: usize,
    cuts: usize,
    blackholes: usize,
    kills: usize,
    restarts: usize,
    /// Faults and submissions are spread over this window.
    window: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Submit(usize),
    Cut,
    Blackhole,
    Kill,
    BrokerRestart,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_loses_nothing() {
    let full = std::env::var("CHAOS_FULL").is_ok_and(|v| v == "1");
    let size = if full {
        Size {
            tasks: 20_000,
            cuts: 20,
            blackholes: 3,
            kills: 3,
            restarts: 1,
            window: Duration::from_secs(150),
        }
    } else {
        Size {
            tasks: 2_000,
            cuts: 4,
            blackholes: 1,
            kills: 1,
            restarts: 1,
            window: Duration::from_secs(20),
        }
    };
    let seed = std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(endpoint_wire::now_ms);
    eprintln!("chaos: seed {seed} (repeat with CHAOS_SEED={seed})");
    let mut rng = Rng::new(seed);

    // The plan: task chunks spread over the first 70% of the window, faults at uniform random times.
    let chunk = 500;
    let chunks = size.tasks.div_ceil(chunk);
    let window_ms = size.window.as_millis() as u64;
    let mut plan: Vec<(u64, Event)> = (0..chunks)
        .map(|i| {
            let at = window_ms * 7 / 10 * i as u64 / chunks as u64;
            (at + rng.range(0, 300), Event::Submit(i))
        })
        .collect();
    for (n, event) in [
        (size.cuts, Event::Cut),
        (size.blackholes, Event::Blackhole),
        (size.kills, Event::Kill),
        (size.restarts, Event::BrokerRestart),
    ] {
        for _ in 0..n {
            plan.push((rng.range(window_ms / 20, window_ms * 19 / 20), event));
        }
    }
    plan.sort();
    let tasks: Vec<service_setup::TaskSpec> = (0..size.tasks)
        .map(|i| {
            if rng.range(0, 10) == 0 {
                let ms = rng.range(5, 50).to_string();
                task("sleep", ms.as_bytes())
            } else {
                echo(&format!("chaos {i}"))
            }
        })
        .collect();

    let ep = unique_endpoint("chaos");
    let dir = TempDir::new("chaos");
    let data = dir.0.join("data");
    let mut service = Service::provision_exclusive(&ep, 1).await;
    let proxy = Proxy::start(broker_addr()).await;
    let mut opts = AgentOptions::new(&ep, &data);
    opts.broker_url = url_via(&proxy.addr);
    let mut agent = Agent::start(&opts);

    let started = Instant::now();
    let mut ids: Vec<String> = Vec::with_capacity(size.tasks);
    let (mut cuts, mut blackholes, mut kills, mut restarts) = (0, 0, 0, 0);
    for (at, event) in plan {
        let due = started + Duration::from_millis(at);
        while Instant::now() < due {
            service
                .poll(due.saturating_duration_since(Instant::now()))
                .await;
        }
        match event {
            Event::Submit(i) => {
                let part = tasks[i * chunk..((i + 1) * chunk).min(tasks.len())].to_vec();
                ids.extend(service.submit(part).await);
            }
            Event::Cut => {
                proxy.cut();
                cuts += 1;
            }
            Event::Blackhole => {
                // Silent until the agent notices (its heartbeats go unanswered), then the path returns.
                proxy.set_mode(Mode::Blackhole);
                let holed = Instant::now();
                while holed.elapsed() < Duration::from_secs(10)
                    && !local_status(&data)["link"]
                        .as_str()
                        .is_some_and(|l| l.starts_with("disconnected"))
                {
                    service.poll(Duration::from_millis(200)).await;
                }
                proxy.set_mode(Mode::Pass);
                blackholes += 1;
            }
            Event::Kill => {
                agent.kill9();
                agent = Agent::start(&opts);
                kills += 1;
            }
            Event::BrokerRestart => {
                service.restart_broker(Duration::from_secs(2)).await;
                restarts += 1;
            }
        }
    }
    let limit = if full {
        Duration::from_secs(900)
    } else {
        Duration::from_secs(240)
    };
    service.await_results(&ids, limit, &[&agent]).await;
    let wall = started.elapsed();

    let submitted: BTreeSet<&String> = ids.iter().collect();
    let answered = submitted
        .iter()
        .filter(|id| service.received.contains_key(**id))
        .count();
    let lost = submitted.len() - answered;
    let unknown = service
        .received
        .keys()
        .filter(|id| !submitted.contains(id))
        .count();
    let duplicates = service.duplicates();
    let faults = cuts + blackholes + kills + restarts;
    println!(
        "chaos: seed={seed} tasks submitted={} results received={} lost={lost} duplicates={duplicates} \
         (of which redelivered to the service={}) faults injected={faults} (cuts={cuts} blackholes={blackholes} \
         sigkills={kills} broker restarts={restarts}) wall time={:.1}s",
        submitted.len(),
        answered + duplicates,
        service.redelivered_to_service,
        wall.as_secs_f64()
    );
    assert_eq!(submitted.len(), size.tasks, "task ids are unique");
    assert_eq!(lost, 0);
    assert_eq!(unknown, 0, "results for task ids never submitted");
    for id in &ids {
        assert_eq!(service.result(id).status, "ok", "{id}");
    }
    service.assert_duplicates_identical();
    assert_eq!(
        (cuts, blackholes, kills, restarts),
        (size.cuts, size.blackholes, size.kills, size.restarts)
    );
    // The last fault may have been a SIGKILL a moment ago: a SIGTERM before the new process has its handlers
    // would kill it outright. It holds the data dir's lock (`online`) only once they are installed.
    wait_status(&data, Duration::from_secs(60), |s| s["online"] == true).await;
    assert_eq!(agent.terminate(Duration::from_secs(60)), Some(0));
    let local = local_status(&data);
    assert_eq!(
        local["results_pending"], 0,
        "results left unpublished after a clean stop: {local}"
    );
}

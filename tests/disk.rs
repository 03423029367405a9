//! Disk trouble loses nothing: a data dir on a tiny tmpfs filled by a ballast file (the database cannot grow)
//! and a corrupt or truncated database at start. The agent must stop acking while it cannot commit (the work
//! stays in the broker), keep what it has, say so, recover when space returns, and refuse a damaged database
//! with an error naming the file instead of replacing it.

use std::time::{Duration, Instant};
use test_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_stops_acking_and_recovers() {
    let ep = unique_endpoint("diskfull");
    let dir = TempDir::new("diskfull");
    let data = dir.0.join("data");
    let fs = TinyFs::mount(&data, 128 * 1024);
    let mut service = Service::provision(&ep, 1).await;
    let mut opts = AgentOptions::new(&ep, &data);
    opts.workers = 2;
    opts.config.push_str("prefetch = 10\n");
    let agent = Agent::start(&opts);
    let warmup = service
        .submit((0..20).map(|i| echo(&format!("warm{i}"))).collect())
        .await;
    service
        .await_results(&warmup, Duration::from_secs(60), &[&agent])
        .await;

    // Two tasks running when the disk fills: their results must be kept (in memory) until space returns.
    let running = service
        .submit(vec![task("sleep", b"2000"), task("sleep", b"2000")])
        .await;
    wait_running(&data, 2).await;
    let ballast = fs.fill();
    assert!(ballast > 0, "the ballast did not fill the tmpfs");
    // A commit that fits in the space the WAL file already has still succeeds (durably: SQLite reuses the file
    // from its start after a checkpoint), so each task here is larger than the whole WAL file: its commit needs
    // the file to grow, which the full disk refuses.
    let wal = std::fs::metadata(data.join(format!("{}-wal", endpoint_agent::store::DB_FILE)))
        .map(|m| m.len() as usize)
        .unwrap_or(0);
    let big_len = (wal + 64 * 1024).max(16 * 1024);
    assert!(
        big_len < 1000 * 1024,
        "the WAL file ({wal} bytes) is too large for a task body to outgrow it"
    );
    let big = "x".repeat(big_len);
    let later = service
        .submit((0..60).map(|i| echo(&format!("{i}{big}"))).collect())
        .await;

    // The service sees the condition in the heartbeat; the deliveries beyond the prefetch stay ready in the
    // broker (nothing is acked that is not on disk).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut state = None;
    while Instant::now() < deadline {
        state = service.heartbeat_state().await;
        if state.as_deref() == Some("disk_full") {
            break;
        }
        service.poll(Duration::from_millis(300)).await;
    }
    assert_eq!(
        state.as_deref(),
        Some("disk_full"),
        "the heartbeat does not report the full disk\n{}",
        log_tail(&[&agent], 40)
    );
    let broker = service_setup::endpoint_status(&service.conn, &ep)
        .await
        .expect("endpoint status");
    assert!(
        broker.queue_depth >= Some(60 - 10),
        "deliveries were taken from the broker while nothing could be committed: {:?} ready",
        broker.queue_depth
    );
    service.poll(Duration::from_millis(500)).await;
    assert_eq!(
        service.missing(&later),
        later.len(),
        "a task was answered while it could not have been stored"
    );
    let local = local_status(&data);
    assert!(
        local["disk_full"].is_null() || local["disk_full"].is_string(),
        "status has no readable disk_full field: {local}"
    );

    fs.free();
    let all: Vec<String> = running.iter().chain(&later).cloned().collect();
    service
        .await_results(&all, Duration::from_secs(120), &[&agent])
        .await;
    for id in warmup.iter().chain(&all) {
        assert_eq!(service.result(id).status, "ok", "{id}");
    }
    assert_eq!(
        service.result(&later[59]).body.len(),
        big.len() + 2,
        "payload kept whole"
    );
    service.assert_duplicates_identical();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut local = local_status(&data);
    while Instant::now() < deadline && !local["disk_full"].is_null() {
        tokio::time::sleep(Duration::from_millis(300)).await;
        local = local_status(&data);
    }
    assert!(
        local["disk_full"].is_null(),
        "status still reports a full disk: {local}"
    );
    assert_eq!(agent.terminate(Duration::from_secs(60)), Some(0));
    drop(fs);
}

/// Starts an agent on `data` whose database was damaged and checks the refusal: exit code 1 at once, an error
/// that names the database file, and the file left byte for byte as it was.
fn assert_refused(opts: &AgentOptions, what: &str) {
    let db = opts.data_dir.join(endpoint_agent::store::DB_FILE);
    let before = std::fs::read(&db).expect("damaged database");
    let mut agent = Agent::start(opts);
    let code = agent.wait_exit(Duration::from_secs(60));
    let log = agent.log_text();
    assert_eq!(
        code,
        Some(1),
        "{what}: the agent did not refuse to start:\n{log}"
    );
    assert!(
        log.contains(&db.display().to_string()),
        "{what}: the error does not name {}:\n{log}",
        db.display()
    );
    assert!(
        std::fs::read(&db).expect("database still there") == before,
        "{what}: the agent changed or replaced the damaged database"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_database_is_refused_at_start() {
    let ep = unique_endpoint("corrupt");
    let dir = TempDir::new("corrupt");
    let mut service = Service::provision(&ep, 1).await;

    // Garbage where the database should be.
    let garbage = AgentOptions::new(&ep, &dir.0.join("garbage"));
    std::fs::create_dir_all(&garbage.data_dir).expect("data dir");
    let junk: Vec<u8> = (0..16_384u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(garbage.data_dir.join(endpoint_agent::store::DB_FILE), junk).expect("junk");
    assert_refused(&garbage, "a garbage database");

    // A real database, cut in half (as a full disk or a bad copy could leave it).
    let opts = AgentOptions::new(&ep, &dir.0.join("truncated"));
    let agent = Agent::start(&opts);
    let payload = "y".repeat(2048);
    let ids = service
        .submit((0..300).map(|i| echo(&format!("{i}{payload}"))).collect())
        .await;
    service
        .await_results(&ids, Duration::from_secs(60), &[&agent])
        .await;
    assert_eq!(agent.terminate(Duration::from_secs(60)), Some(0));
    let db = opts.data_dir.join(endpoint_agent::store::DB_FILE);
    let len = std::fs::metadata(&db).expect("database").len();
    assert!(len > 64 * 1024, "the database is too small to cut: {len}");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .expect("open database");
    file.set_len(len / 2 / 4096 * 4096).expect("truncate");
    drop(file);
    assert_refused(&opts, "a truncated database");
}

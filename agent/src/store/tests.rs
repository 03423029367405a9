//! The store's unit tests: the life of tasks and results through the handle, crash recovery and quarantine,
//! batch claims, parked claims, damaged files, and the read-only paths.

use super::*;
use crate::limits::MAX_CLAIM_BYTES;
use crate::task::NewTask;
use endpoint_wire::Status;
use rusqlite::Connection;
use std::time::Duration;

fn task(id: &str) -> Intake {
    Intake::Task(NewTask {
        headers: None,
        task_id: id.into(),
        function: "echo".into(),
        payload: id.as_bytes().to_vec(),
        timeout_ms: None,
        reply_to: None,
    })
}

/// A task run on arrival (`echo`, attempt 1) with its result.
fn ran(id: &str, body: &[u8], reply_to: Option<endpoint_wire::ServiceName>) -> Intake {
    Intake::Ran {
        function: "echo".into(),
        result: TaskResult {
            task_id: id.into(),
            status: Status::Ok,
            exit_code: None,
            attempts: 1,
            duration_ms: 0,
            body: body.to_vec(),
        },
        reply_to,
    }
}

fn ok(c: &ClaimedTask) -> TaskResult {
    TaskResult {
        task_id: c.task_id.clone(),
        status: Status::Ok,
        exit_code: Some(0),
        attempts: c.attempts,
        duration_ms: 1,
        body: c.payload.clone(),
    }
}

/// The one-task-at-a-time use of `finish_and_claim`.
async fn fc(store: &Store, r: Option<TaskResult>, claim: bool) -> Option<ClaimedTask> {
    let mut got = store
        .finish_and_claim(r.into_iter().collect(), usize::from(claim))
        .await
        .unwrap();
    assert!(got.len() <= 1);
    got.pop()
}

fn counts(store: &Store) -> Counts {
    *store.counts().borrow()
}

#[tokio::test]
async fn task_life_cycle_and_dedup() {
    let dir = tempdir("life");
    let (store, rec) = Store::open(&dir, 3).unwrap();
    assert_eq!(rec, Recovery::default());
    let out = store
        .ingest(vec![task("a"), task("b"), task("a")])
        .await
        .unwrap();
    assert_eq!((out.queued, out.duplicates), (2, 1));
    let bad = Intake::Rejected {
        task_id: "c".into(),
        function: "nope".into(),
        reason: "unknown".into(),
        reply_to: None,
    };
    assert_eq!(store.ingest(vec![bad]).await.unwrap().rejected, 1);
    assert_eq!(
        counts(&store),
        Counts {
            handed_back: 0,
            queued: 2,
            running: 0,
            done: 1,
            results_pending: 1
        }
    );

    let a = fc(&store, None, true).await.unwrap();
    assert_eq!((a.task_id.as_str(), a.attempts), ("a", 1));
    let b = fc(&store, Some(ok(&a)), true).await.unwrap();
    assert_eq!(b.task_id, "b");
    assert_eq!(fc(&store, Some(ok(&b)), true).await, None);
    // A finished task's second result is ignored, and a redelivery is not queued again.
    assert_eq!(fc(&store, Some(ok(&b)), false).await, None);
    assert_eq!(store.ingest(vec![task("b")]).await.unwrap().duplicates, 1);
    assert_eq!(
        counts(&store),
        Counts {
            handed_back: 0,
            queued: 0,
            running: 0,
            done: 3,
            results_pending: 3
        }
    );

    let pending = Reader::open(&dir).unwrap().pending_results(0, 10).unwrap();
    let ids: Vec<_> = pending.iter().map(|(_, r, _)| r.task_id.as_str()).collect();
    assert_eq!(ids, ["c", "a", "b"]);
    assert_eq!(pending[0].1.status, Status::Rejected);
    store
        .mark_published(vec![pending[0].0, pending[1].0])
        .await
        .unwrap();
    assert_eq!(counts(&store).results_pending, 1);
    assert_eq!(store.prune(endpoint_wire::now_ms() + 1).await.unwrap(), 2);
    assert_eq!(counts(&store).done, 1);
    assert_eq!(
        Reader::open(&dir)
            .unwrap()
            .pending_results(0, 10)
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn a_task_run_on_arrival_is_stored_done_with_its_result() {
    let dir = tempdir("ran");
    let (store, _) = Store::open(&dir, 3).unwrap();
    let out = store
        .ingest(vec![
            task("q"),
            ran("r", b"first", None),
            ran("r", b"second", None),
            ran("q", b"x", None),
        ])
        .await
        .unwrap();
    assert_eq!((out.queued, out.ran, out.duplicates), (1, 1, 2));
    // A redelivery of a task stored with its result is a duplicate too.
    let out = store.ingest(vec![task("r")]).await.unwrap();
    assert_eq!((out.queued, out.duplicates), (0, 1));
    assert_eq!(
        counts(&store),
        Counts {
            handed_back: 0,
            queued: 1,
            running: 0,
            done: 1,
            results_pending: 1
        }
    );
    let pending = Reader::open(&dir).unwrap().pending_results(0, 10).unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(
        (pending[0].1.task_id.as_str(), pending[0].1.body.as_slice()),
        ("r", b"first".as_slice())
    );
    // The task that was queued before its id came again with a result is still queued, unchanged.
    let q = fc(&store, None, true).await.unwrap();
    assert_eq!(
        (q.task_id.as_str(), q.payload.as_slice()),
        ("q", b"q".as_slice())
    );
}

#[tokio::test]
async fn crash_recovery_requeues_then_gives_up() {
    let dir = tempdir("crash");
    for round in 1..=4u32 {
        let (store, rec) = Store::open(&dir, 3).unwrap();
        if round == 1 {
            store.ingest(vec![task("poison")]).await.unwrap();
        } else if round <= 3 {
            assert_eq!(rec.requeued, 1, "round {round}");
        } else {
            assert_eq!(rec.given_up, 1);
            let pending = Reader::open(&dir).unwrap().pending_results(0, 10).unwrap();
            assert_eq!(pending[0].1.status, Status::Failed);
            assert_eq!(pending[0].1.attempts, 3);
            return;
        }
        // Claim and "crash" (drop the store without finishing).
        let t = fc(&store, None, true).await.unwrap();
        assert_eq!(t.attempts, round);
    }
    unreachable!("round 4 returns");
}

#[tokio::test]
async fn tasks_that_shared_a_crash_run_alone() {
    let dir = tempdir("quarantine");
    {
        let (store, _) = Store::open(&dir, 3).unwrap();
        store.ingest(vec![task("s1"), task("s2")]).await.unwrap();
        fc(&store, None, true).await.unwrap();
        fc(&store, None, true).await.unwrap();
        store.ingest(vec![task("fresh")]).await.unwrap();
    } // crash with s1 and s2 running
    let (store, rec) = Store::open(&dir, 3).unwrap();
    assert_eq!(rec.requeued, 2);
    let s1 = fc(&store, None, true).await.unwrap();
    assert_eq!((s1.task_id.as_str(), s1.attempts), ("s1", 2));
    // Nothing runs beside a suspect, not even the fresh task.
    assert_eq!(fc(&store, None, true).await, None);
    let s2 = fc(&store, Some(ok(&s1)), true).await.unwrap();
    assert_eq!(s2.task_id, "s2");
    assert_eq!(fc(&store, None, true).await, None);
    let fresh = fc(&store, Some(ok(&s2)), true).await.unwrap();
    assert_eq!(fresh.task_id, "fresh");
    // Quarantine is over: ordinary tasks run side by side again.
    store.ingest(vec![task("a"), task("b")]).await.unwrap();
    assert!(fc(&store, None, true).await.is_some());
    assert!(fc(&store, None, true).await.is_some());
}

#[tokio::test]
async fn requeue_does_not_count_an_attempt() {
    let dir = tempdir("requeue");
    let (store, _) = Store::open(&dir, 3).unwrap();
    store.ingest(vec![task("t")]).await.unwrap();
    let t = fc(&store, None, true).await.unwrap();
    store.requeue(vec![t.task_id]).await.unwrap();
    let again = fc(&store, None, true).await.unwrap();
    assert_eq!(again.attempts, 1);
}

#[tokio::test]
async fn claims_and_stores_several_per_commit() {
    let dir = tempdir("batch");
    let (store, _) = Store::open(&dir, 3).unwrap();
    let ids = ["a", "b", "c", "d", "e"];
    store
        .ingest(ids.iter().map(|i| task(i)).collect())
        .await
        .unwrap();
    let first = store.finish_and_claim(vec![], 3).await.unwrap();
    let got: Vec<_> = first
        .iter()
        .map(|t| (t.task_id.as_str(), t.attempts))
        .collect();
    assert_eq!(got, [("a", 1), ("b", 1), ("c", 1)]);
    assert_eq!((counts(&store).queued, counts(&store).running), (2, 3));
    let results = first.iter().map(ok).collect();
    let rest = store.finish_and_claim(results, 10).await.unwrap();
    assert_eq!(rest.len(), 2);
    assert_eq!(
        counts(&store),
        Counts {
            handed_back: 0,
            queued: 0,
            running: 2,
            done: 3,
            results_pending: 3
        }
    );
    // Paging past a row id.
    let page = Reader::open(&dir).unwrap().pending_results(0, 2).unwrap();
    assert_eq!(page.len(), 2);
    let next = Reader::open(&dir)
        .unwrap()
        .pending_results(page[1].0, 10)
        .unwrap();
    let ids: Vec<_> = next.iter().map(|(_, r, _)| r.task_id.as_str()).collect();
    assert_eq!(ids, ["c"]);
}

#[tokio::test]
async fn a_claim_of_several_holds_only_batchable_functions() {
    let dir = tempdir("only");
    let (store, _) = Store::open(&dir, 3).unwrap();
    let of = |id: &str, function: &str| {
        Intake::Task(NewTask {
            headers: None,
            task_id: id.into(),
            function: function.into(),
            payload: Vec::new(),
            timeout_ms: None,
            reply_to: None,
        })
    };
    let tasks = [
        ("a", "echo"),
        ("b", "echo"),
        ("c", "sleep"),
        ("d", "sleep"),
        ("e", "echo"),
    ];
    store
        .ingest(tasks.iter().map(|(i, f)| of(i, f)).collect())
        .await
        .unwrap();
    let want = || Want {
        max: 10,
        only: Some(vec!["echo".to_owned()]),
    };
    let ids = |v: Vec<ClaimedTask>| v.into_iter().map(|t| t.task_id).collect::<Vec<_>>();
    assert_eq!(
        ids(store.finish_and_claim(vec![], want()).await.unwrap()),
        ["a", "b"]
    );
    assert_eq!(
        ids(store.finish_and_claim(vec![], want()).await.unwrap()),
        ["c"]
    );
    assert_eq!(ids(store.wait_and_claim(want()).await.unwrap()), ["d"]);
    assert_eq!(
        ids(store.finish_and_claim(vec![], want()).await.unwrap()),
        ["e"]
    );
}

#[tokio::test]
async fn a_claim_holds_a_bounded_number_of_payload_bytes() {
    let dir = tempdir("bytes");
    let (store, _) = Store::open(&dir, 3).unwrap();
    let big = |id: &str| {
        Intake::Task(NewTask {
            headers: None,
            task_id: id.into(),
            function: "echo".into(),
            payload: vec![0; MAX_CLAIM_BYTES * 3 / 5],
            timeout_ms: None,
            reply_to: None,
        })
    };
    store
        .ingest(vec![big("x"), big("y"), big("z")])
        .await
        .unwrap();
    assert_eq!(store.finish_and_claim(vec![], 10).await.unwrap().len(), 2);
    assert_eq!(store.finish_and_claim(vec![], 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn suspects_are_claimed_alone_even_in_batches() {
    let dir = tempdir("batch-quarantine");
    {
        let (store, _) = Store::open(&dir, 3).unwrap();
        store
            .ingest(vec![task("s1"), task("s2"), task("s3")])
            .await
            .unwrap();
        assert_eq!(store.finish_and_claim(vec![], 3).await.unwrap().len(), 3);
    } // crash with a claimed batch: every task in it is a suspect
    let (store, rec) = Store::open(&dir, 3).unwrap();
    assert_eq!(rec.requeued, 3);
    store.ingest(vec![task("fresh")]).await.unwrap();
    let mut order = Vec::new();
    let mut last: Vec<TaskResult> = Vec::new();
    loop {
        let got = store.finish_and_claim(last, 10).await.unwrap();
        assert!(got.len() <= 1, "suspects run alone: {got:?}");
        assert_eq!(store.finish_and_claim(vec![], 10).await.unwrap(), vec![]);
        let Some(t) = got.into_iter().next() else {
            break;
        };
        order.push(t.task_id.clone());
        last = vec![ok(&t)];
        if t.task_id == "fresh" {
            break;
        }
    }
    assert_eq!(order, ["s1", "s2", "s3", "fresh"]);
}

#[tokio::test]
async fn a_waiting_claim_is_served_by_the_ingest_commit() {
    let dir = tempdir("park");
    let (store, _) = Store::open(&dir, 3).unwrap();
    let waiter = tokio::spawn({
        let store = store.clone();
        async move { store.wait_and_claim(2).await }
    });
    // A claim dropped before tasks arrive takes nothing.
    let dropped = tokio::time::timeout(Duration::from_millis(50), store.wait_and_claim(5)).await;
    assert!(dropped.is_err());
    store
        .ingest(vec![task("a"), task("b"), task("c")])
        .await
        .unwrap();
    let got = waiter.await.unwrap().unwrap();
    let ids: Vec<_> = got.iter().map(|t| t.task_id.as_str()).collect();
    assert_eq!(ids, ["a", "b"]);
    assert_eq!((counts(&store).queued, counts(&store).running), (1, 2));
    // Nothing waits when a task is there already.
    assert_eq!(store.wait_and_claim(5).await.unwrap().len(), 1);
    // A claim answered but never taken goes back to the queue without counting an attempt.
    store.ingest(vec![task("d")]).await.unwrap();
    let unread = store.wait_and_claim(1);
    store
        .set_meta(MetaKey::Reconnects, "1".into())
        .await
        .unwrap(); // the writer has answered `unread` by now
    drop(unread);
    store
        .set_meta(MetaKey::Reconnects, "2".into())
        .await
        .unwrap(); // and has requeued what it held
    assert_eq!((counts(&store).queued, counts(&store).running), (1, 3));
    let d = store.finish_and_claim(vec![], 1).await.unwrap();
    assert_eq!((d[0].task_id.as_str(), d[0].attempts), ("d", 1));
}

#[tokio::test]
async fn requeue_takes_back_a_batch() {
    let dir = tempdir("requeue-batch");
    let (store, _) = Store::open(&dir, 3).unwrap();
    store.ingest(vec![task("a"), task("b")]).await.unwrap();
    let got = store.finish_and_claim(vec![], 2).await.unwrap();
    store
        .requeue(got.into_iter().map(|t| t.task_id).collect())
        .await
        .unwrap();
    assert_eq!((counts(&store).queued, counts(&store).running), (2, 0));
    let again = store.finish_and_claim(vec![], 2).await.unwrap();
    assert!(again.iter().all(|t| t.attempts == 1));
}

#[tokio::test]
async fn status_reads_alongside_the_writer() {
    let dir = tempdir("status");
    let (store, _) = Store::open(&dir, 3).unwrap();
    store.ingest(vec![task("x"), task("y")]).await.unwrap();
    store
        .set_meta(MetaKey::Link, "connected".into())
        .await
        .unwrap();
    let (c, meta) = read_status(&dir).unwrap();
    assert_eq!(c.queued, 2);
    assert_eq!(meta, vec![("link".to_owned(), "connected".to_owned())]);
}

#[test]
fn garbage_file_is_a_clear_open_error() {
    let dir = tempdir("garbage");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(DB_FILE), vec![0x42u8; 8192]).unwrap();
    let err = Store::open(&dir, 3).err().expect("garbage must not open");
    assert!(matches!(err, StoreError::Damaged(..)), "{err}");
    assert!(err.to_string().contains(DB_FILE));
}

#[tokio::test]
async fn truncated_database_is_refused_and_left_alone() {
    let dir = tempdir("truncated");
    let path = dir.join(DB_FILE);
    let wal = dir.join(format!("{DB_FILE}-wal"));
    let (store, _) = Store::open(&dir, 3).unwrap();
    let many: Vec<Intake> = (0..3000).map(|i| task(&format!("task-{i:05}"))).collect();
    store.ingest(many).await.unwrap();
    // Most pages in the database file, the latest ones in the WAL (it starts over from empty).
    super::schema::checkpoint(&path).unwrap();
    store
        .ingest(vec![task("late-1"), task("late-2")])
        .await
        .unwrap();
    // A crash leaves the database with a WAL of committed pages beside it: copy both as they are now.
    let (bytes, wal_bytes) = (std::fs::read(&path).unwrap(), std::fs::read(&wal).unwrap());
    drop(store);
    std::thread::sleep(std::time::Duration::from_millis(200));
    let check = |with_wal: bool, with_shm: bool| {
        let _ = std::fs::remove_file(&wal);
        let _ = std::fs::remove_file(dir.join(format!("{DB_FILE}-shm")));
        let cut = &bytes[..bytes.len() / 2];
        std::fs::write(&path, cut).unwrap();
        if with_wal {
            std::fs::write(&wal, &wal_bytes).unwrap();
        }
        if with_shm {
            // A reader builds the WAL index (the -shm file) and leaves it behind, as a crash does.
            let c = Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
                .unwrap();
            let _ = c.query_row("SELECT COUNT(*) FROM sqlite_master", [], |r| {
                r.get::<_, i64>(0)
            });
        }
        let err = Store::open(&dir, 3).err().unwrap_or_else(|| {
            panic!(
                "wal {with_wal} shm {with_shm}: a truncated database ({} of {} bytes) must not open",
                cut.len(),
                bytes.len()
            )
        });
        assert!(
            matches!(err, StoreError::Damaged(..)),
            "wal {with_wal} shm {with_shm}: {err}"
        );
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
        assert!(
            std::fs::read(&path).unwrap() == cut,
            "wal {with_wal} shm {with_shm}: the file was changed"
        );
    };
    check(false, false);
    check(true, false);
    check(true, true);
}

#[tokio::test]
async fn checkpoint_leaves_the_database_file_complete() {
    let dir = tempdir("checkpoint");
    let (store, _) = Store::open(&dir, 3).unwrap();
    store.ingest(vec![task("a"), task("b")]).await.unwrap();
    store.checkpoint().await.unwrap();
    // The database file alone, without its WAL, holds both tasks.
    let copy = tempdir("checkpoint-copy");
    std::fs::create_dir_all(&copy).unwrap();
    std::fs::copy(dir.join(DB_FILE), copy.join(DB_FILE)).unwrap();
    let (counts, _) = read_status(&copy).unwrap();
    assert_eq!(counts.queued, 2);
}

fn tempdir(name: &str) -> crate::testing::TestDir {
    crate::testing::TestDir::new(&format!("store-{name}"))
}

#[tokio::test]
async fn results_remember_the_service_their_task_named() {
    let dir = tempdir("reply-to");
    let (store, _) = Store::open(&dir, 3).unwrap();
    let svc = || Some(endpoint_wire::ServiceName::new("svc-1").unwrap());
    let mut queued = NewTask {
        headers: None,
        task_id: "queued".into(),
        function: "echo".into(),
        payload: Vec::new(),
        timeout_ms: None,
        reply_to: svc(),
    };
    let ran = ran("ran", b"", svc());
    let rejected = Intake::Rejected {
        task_id: "rejected".into(),
        function: "nope".into(),
        reason: "unknown".into(),
        reply_to: svc(),
    };
    store
        .ingest(vec![Intake::Task(queued.clone()), ran, rejected])
        .await
        .unwrap();
    queued.task_id = "shared".into();
    queued.reply_to = None;
    store.ingest(vec![Intake::Task(queued)]).await.unwrap();
    let claimed = store.finish_and_claim(vec![], 10).await.unwrap();
    store
        .finish_and_claim(claimed.iter().map(ok).collect(), 0)
        .await
        .unwrap();
    let pending = Reader::open(&dir).unwrap().pending_results(0, 10).unwrap();
    let routes: Vec<_> = pending
        .iter()
        .map(|(_, r, s)| (r.task_id.as_str(), s.as_ref().map(|s| s.as_str())))
        .collect();
    assert_eq!(
        routes,
        [
            ("ran", Some("svc-1")),
            ("rejected", Some("svc-1")),
            ("queued", Some("svc-1")),
            ("shared", None)
        ]
    );
}

#[tokio::test]
async fn checkpoints_run_beside_the_writer() {
    let dir = tempdir("checkpointer");
    let (store, _) = Store::open(&dir, 3).unwrap();
    let before = std::fs::metadata(dir.join(DB_FILE)).unwrap().len();
    // 2 MiB of payload: far below the writer's own checkpoint (the backstop), so only the checkpointer thread
    // copies it from the WAL into the database file.
    let big: Vec<Intake> = (0..8)
        .map(|i| {
            let mut t = task(&format!("big-{i}"));
            if let Intake::Task(t) = &mut t {
                t.payload = vec![7; 256 * 1024];
            }
            t
        })
        .collect();
    store.ingest(big).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let len = std::fs::metadata(dir.join(DB_FILE)).unwrap().len();
        if len >= before + 2 * 1024 * 1024 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the database file stayed at {len} bytes: nothing checkpointed the WAL"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn committed_results_are_handed_to_the_publisher_as_stored() {
    let dir = tempdir("handoff");
    let (store, _) = Store::open(&dir, 3).unwrap();
    let handoff = store.handoff();
    let service = endpoint_wire::ServiceName::new("svc".to_owned()).unwrap();
    let ran = ran("ran", b"echoed", Some(service.clone()));
    let rejected = Intake::Rejected {
        task_id: "bad".into(),
        function: "nope".into(),
        reason: "unknown function".into(),
        reply_to: None,
    };
    store
        .ingest(vec![task("queued"), ran, rejected, task("ran")])
        .await
        .unwrap();
    let claimed = fc(&store, None, true).await.unwrap();
    assert!(fc(&store, Some(ok(&claimed)), false).await.is_none());
    let (got, overflowed) = handoff.take(100);
    assert!(!overflowed);
    // The same rows, ids and services a read of the database finds, in commit order; the duplicate is not there.
    let pending = Reader::open(&dir).unwrap().pending_results(0, 100).unwrap();
    let as_read: Vec<_> = pending
        .into_iter()
        .map(|(id, r, s)| (id, r.task_id, r.body, s))
        .collect();
    let handed: Vec<_> = got
        .into_iter()
        .map(|c| (c.id, c.result.task_id, c.result.body, c.service))
        .collect();
    assert_eq!(handed, as_read);
    assert_eq!(
        handed
            .iter()
            .map(|(_, id, _, s)| (id.as_str(), s.clone()))
            .collect::<Vec<_>>(),
        vec![("ran", Some(service)), ("bad", None), ("queued", None)]
    );
}

#[tokio::test]
async fn a_commit_that_fails_gives_its_items_back() {
    let dir = tempdir("give-back");
    let (store, _) = Store::open(&dir, 3).unwrap();
    // Another connection holds the write lock past the writer's busy timeout: the commit fails.
    let blocker = Connection::open(dir.join(DB_FILE)).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let items = vec![task("a"), task("b")];
    let failed = store.try_ingest(items.clone()).await.unwrap_err();
    assert_eq!(failed.items, Some(items.clone()), "{}", failed.error);
    let results = vec![TaskResult {
        task_id: "a".into(),
        status: Status::Ok,
        exit_code: None,
        attempts: 1,
        duration_ms: 0,
        body: vec![1; 1000],
    }];
    let failed = store
        .try_finish_and_claim(results.clone(), 1)
        .await
        .unwrap_err();
    assert_eq!(failed.items, Some(results));
    blocker.execute_batch("ROLLBACK").unwrap();
    // What came back commits once the lock is gone.
    let out = store.try_ingest(items).await.unwrap();
    assert_eq!(out.queued, 2);
}

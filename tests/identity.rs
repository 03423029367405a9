//! One broker identity per endpoint: `service-setup provision --credentials` makes a user per endpoint through
//! the management API and writes its agent's URL (0600); agents log in with `--broker-url-file`. With A's
//! URL, everything beyond A's own work is refused by the broker, A keeps serving, and a result A forges for B
//! is never shown as B's. A's user may hand A's own tasks back (the `handback` exchange, its key only), and a
//! standby whose user predates standby heartbeats stays connected.

use lapin::BasicProperties;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::protocol::AMQPSoftError;
use lapin::types::{AMQPValue, FieldTable};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use test_support::*;

const WAIT: Duration = Duration::from_secs(60);

fn service_setup(args: &[&str]) -> std::process::Output {
    Command::new(service_setup_binary())
        .args(["--broker-url", &url()])
        .args(args)
        .env_remove("AMQP_URL")
        .output()
        .expect("run service-setup")
}

fn provision_with_credentials(ep: &endpoint_wire::EndpointId, file: &Path) {
    let out = service_setup(&[
        "provision",
        "--endpoint-id",
        ep.as_str(),
        "--heartbeat",
        "2",
        "--credentials",
        &file.display().to_string(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("endpoint-{ep}")));
    let mode = std::fs::metadata(file)
        .expect("credentials file")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the credentials file is private");
}

fn agent_with_url_file(ep: &endpoint_wire::EndpointId, data: &Path, file: &Path) -> AgentOptions {
    let mut opts = AgentOptions::new(ep, data);
    opts.no_url_env = true;
    opts.args = vec!["--broker-url-file".into(), file.display().to_string()];
    opts
}

/// What the broker answered an attempt: `Ok`, or the soft error code that closed the channel (`None`: some
/// other failure).
fn outcome<T>(r: Result<T, lapin::Error>) -> Result<(), Option<AMQPSoftError>> {
    match r {
        Ok(_) => Ok(()),
        Err(e) => Err(endpoint_wire::soft_error(&e)),
    }
}

async fn publish(
    conn: &lapin::Connection,
    exchange: &str,
    key: &str,
    props: BasicProperties,
) -> Result<(), Option<AMQPSoftError>> {
    let attempt = async {
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        channel
            .basic_publish(
                exchange.into(),
                key.into(),
                BasicPublishOptions::default(),
                b"x",
                props,
            )
            .await?
            .await?;
        // A refusal closes the channel; make sure it had time to arrive.
        channel.basic_qos(1, Default::default()).await
    };
    outcome(attempt.await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_endpoint_is_confined_to_its_own_work() {
    let a = unique_endpoint("ida");
    let b = unique_endpoint("idb");
    let dir = TempDir::new("identity");
    let mut service_a = Service::provision(&a, 2).await;
    let mut service_b = Service::provision(&b, 2).await;
    let (file_a, file_b) = (dir.0.join("a.url"), dir.0.join("b.url"));
    provision_with_credentials(&a, &file_a);
    provision_with_credentials(&b, &file_b);
    let url_a = std::fs::read_to_string(&file_a)
        .expect("a.url")
        .trim()
        .to_owned();
    assert!(
        url_a.starts_with(&format!("amqp://endpoint-{a}:")),
        "{url_a}"
    );
    let agent_a = Agent::start(&agent_with_url_file(&a, &dir.0.join("data-a"), &file_a));
    let agent_b = Agent::start(&agent_with_url_file(&b, &dir.0.join("data-b"), &file_b));
    let ids_a = service_a
        .submit(vec![echo("for a"), task("sleep", b"5")])
        .await;
    let ids_b = service_b.submit(vec![echo("for b")]).await;
    service_a.await_results(&ids_a, WAIT, &[&agent_a]).await;
    service_b.await_results(&ids_b, WAIT, &[&agent_b]).await;
    service_a.assert_all_ok(&ids_a);
    service_b.assert_all_ok(&ids_b);
    // Results carry the endpoint's user (the broker checked it).
    assert_eq!(
        service_a.result(&ids_a[0]).user_id.as_deref(),
        Some(format!("endpoint-{a}").as_str())
    );

    // Everything beyond A's own work, tried with A's URL.
    let broker_a = endpoint_wire::BrokerUrl::new(url_a.as_str()).expect("a's url");
    let conn = endpoint_wire::amqp::connect(&broker_a, "test attacker a")
        .await
        .expect("A's user logs in");
    let refused = Err(Some(AMQPSoftError::ACCESSREFUSED));
    let channel = || async { conn.create_channel().await.expect("channel") };
    let consume = channel()
        .await
        .basic_consume(
            b.tasks_queue().as_str().into(),
            "evil".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_eq!(outcome(consume), refused, "consume B's tasks");
    assert_eq!(
        publish(
            &conn,
            "results",
            &b.results_routing_key(),
            BasicProperties::default()
        )
        .await,
        refused,
        "publish with B's results routing key"
    );
    let as_b = BasicProperties::default().with_user_id(format!("endpoint-{b}").as_str().into());
    assert_eq!(
        publish(&conn, "results", &a.results_routing_key(), as_b).await,
        Err(Some(AMQPSoftError::PRECONDITIONFAILED)),
        "publish with B's user_id"
    );
    assert_eq!(
        publish(&conn, "", &a.tasks_queue(), BasicProperties::default()).await,
        refused,
        "publish through the default exchange"
    );
    assert_eq!(
        publish(
            &conn,
            "handback",
            &b.tasks_queue(),
            BasicProperties::default()
        )
        .await,
        refused,
        "hand tasks back into B's queue"
    );
    assert_eq!(
        publish(&conn, "tasks", &b.tasks_queue(), BasicProperties::default()).await,
        refused,
        "publish tasks for B"
    );
    assert_eq!(
        publish(
            &conn,
            "heartbeats",
            &b.heartbeat_routing_key(),
            BasicProperties::default()
        )
        .await,
        refused,
        "write B's heartbeat"
    );
    for queue in [b.registration_queue(), "results".to_owned()] {
        let got = channel()
            .await
            .basic_get(queue.as_str().into(), BasicGetOptions::default())
            .await;
        assert_eq!(outcome(got), refused, "read {queue}");
    }
    for queue in ["results".to_owned(), b.tasks_queue()] {
        let purged = channel()
            .await
            .queue_purge(queue.as_str().into(), QueuePurgeOptions::default())
            .await;
        assert_eq!(outcome(purged), refused, "purge {queue}");
    }
    let declared = channel()
        .await
        .queue_declare(
            format!("evil-{}", std::process::id()).as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    assert_eq!(outcome(declared), refused, "declare a queue");
    for queue in [a.tasks_queue(), b.tasks_queue(), "results".to_owned()] {
        let deleted = channel()
            .await
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        assert_eq!(outcome(deleted), refused, "delete {queue}");
    }

    // Each endpoint answers one task for a service of this test (a queue of its own, so the reader below sees
    // this test's results only).
    let svc = format!("idsvc-{}-{}", std::process::id(), a.as_str().len());
    let via_service = |ep: &endpoint_wire::EndpointId, payload: &str| {
        let out = service_setup(&[
            "submit",
            "--endpoint-id",
            ep.as_str(),
            "--function",
            "echo",
            "--payload",
            payload,
            "--service",
            &svc,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let svc_a = via_service(&a, "a for the service");
    let svc_b = via_service(&b, "b for the service");

    // A forges a result for B in its headers; it may only use its own routing keys.
    let mut headers = FieldTable::default();
    headers.insert(
        "endpoint_id".into(),
        AMQPValue::LongString(b.as_str().into()),
    );
    headers.insert("status".into(), AMQPValue::LongString("ok".into()));
    let forged = BasicProperties::default()
        .with_message_id("forged-by-a".into())
        .with_user_id(format!("endpoint-{a}").as_str().into())
        .with_headers(headers);
    let a_for_svc = format!("{}.{svc}", a.results_routing_key());
    assert_eq!(publish(&conn, "results", &a_for_svc, forged).await, Ok(()));
    let _ = conn.close(200, "done".into()).await;

    // A's agent keeps serving A.
    let more = service_a.submit(vec![echo("still a")]).await;
    service_a.await_results(&more, WAIT, &[&agent_a]).await;
    assert_eq!(service_a.result(&more[0]).status, "ok");

    // The service's queue: B's reader never shows the forgery, A's drops it as forged.
    let read = |ep: &endpoint_wire::EndpointId| {
        let out = service_setup(&[
            "results",
            "--service",
            &svc,
            "--endpoint-id",
            ep.as_str(),
            "--idle-ms",
            "5000",
            "--max",
            "1",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let for_b = read(&b);
    assert!(
        for_b.contains(&svc_b),
        "B's genuine result is shown: {for_b}"
    );
    assert!(!for_b.contains("forged-by-a"), "{for_b}");
    let for_a = read(&a);
    assert!(for_a.contains(&svc_a), "{for_a}");
    assert!(!for_a.contains("forged-by-a"), "{for_a}");

    agent_a.terminate(Duration::from_secs(30));
    agent_b.terminate(Duration::from_secs(30));
    // Deprovisioning removes the endpoint's user: its URL no longer logs in.
    for ep in [&a, &b] {
        let out = service_setup(&["deprovision", "--endpoint-id", ep.as_str(), "--force"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout)
                .contains(&format!("deleted broker user endpoint-{ep}"))
        );
    }
    assert!(
        endpoint_wire::amqp::connect(&broker_a, "test after deprovision")
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_without_the_standby_heartbeat_permission_stays_connected() {
    let ep = unique_endpoint("idold");
    let dir = TempDir::new("idold");
    let mut service = Service::provision(&ep, 1).await;
    let file = dir.0.join("ep.url");
    provision_with_credentials(&ep, &file);
    // As an endpoint user made before standby beats had their own key.
    let user = format!("endpoint-{ep}");
    let old_key = format!("^{ep}\\.heartbeat$").replace('-', "\\-");
    test_support::broker::rabbitmqctl(&[
        "set_topic_permissions",
        "-p",
        &vhost_name(),
        &user,
        "heartbeats",
        &old_key,
        "^$",
    ])
    .expect("set the old topic permissions");
    let active = Agent::start(&agent_with_url_file(&ep, &dir.0.join("a"), &file));
    wait_status(&dir.0.join("a"), WAIT, |s| {
        s["link"]
            .as_str()
            .is_some_and(|l| l.starts_with("connected"))
    })
    .await;
    let standby = Agent::start(&agent_with_url_file(&ep, &dir.0.join("b"), &file));
    // Several heartbeat intervals (2 s) as a standby: the refused key is said once, the session stays up.
    let deadline = std::time::Instant::now() + WAIT;
    while !standby
        .log_text()
        .contains("the broker refuses standby heartbeats")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            standby.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(6)).await;
    let s = local_status(&dir.0.join("b"));
    assert_eq!(s["reconnects"], 0, "{s}\n{}", standby.log_text());
    // The active agent serves as before.
    let ids = service.submit(vec![task("echo", b"still here")]).await;
    service.await_results(&ids, WAIT, &[&active]).await;
    service.assert_all_ok(&ids);
    drop(standby);
    drop(active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_user_hands_its_own_tasks_back() {
    let ep = unique_endpoint("idhb");
    let dir = TempDir::new("idhb");
    let mut service = Service::provision(&ep, 1).await;
    let file = dir.0.join("ep.url");
    provision_with_credentials(&ep, &file);
    let data = dir.0.join("data");
    let mut opts = agent_with_url_file(&ep, &data, &file);
    opts.workers = 1;
    let agent = Agent::start(&opts);
    let mut ids = service.submit(vec![task("sleep", b"5000")]).await;
    wait_running(&data, 1).await;
    ids.extend(
        service
            .submit((0..5).map(|_| task("sleep", b"1")).collect())
            .await,
    );
    wait_status(&data, WAIT, |s| s["tasks_queued"] == 5).await;
    agent.kill9();
    // With the endpoint's own URL file, as an operator on that host would run it.
    let out = Command::new(agent_binary())
        .args(["handback", "--endpoint-id", ep.as_str(), "--data-dir"])
        .arg(&data)
        .arg("--broker-url-file")
        .arg(&file)
        .env_remove("AMQP_URL")
        .output()
        .expect("run endpoint-agent handback");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("handed back 6 task(s)"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let agent = Agent::start(&agent_with_url_file(&ep, &dir.0.join("other"), &file));
    service.await_results(&ids, WAIT, &[&agent]).await;
    service.assert_all_ok(&ids);
}

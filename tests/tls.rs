//! TLS that fails closed, through a TLS-terminating proxy with a test PKI made here: an `amqps://` round trip
//! (agent and `service-setup`) with every agent connection encrypted; a wrong CA, an expired certificate, a
//! certificate for another name and a plaintext server each stop the start with an error naming the cause;
//! client certificates; and after a start that once succeeded, a TLS failure is retried, not fatal.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use test_support::tls::{Presents, TestPki, TlsProxy};
use test_support::*;

const WAIT: Duration = Duration::from_secs(60);

/// This run's URL through `hostport` with `amqps://`.
fn amqps_via(hostport: &str) -> String {
    url_via(hostport).replacen("amqp://", "amqps://", 1)
}

fn tls_agent(
    ep: &endpoint_wire::EndpointId,
    data: &Path,
    url: String,
    args: &[&Path],
) -> AgentOptions {
    let mut opts = AgentOptions::new(ep, data);
    opts.broker_url = url;
    let mut flags = Vec::new();
    for pair in args.chunks(2) {
        flags.push(pair[0].display().to_string());
        if let Some(value) = pair.get(1) {
            flags.push(value.display().to_string());
        }
    }
    opts.args = flags;
    opts
}

/// Starts an agent that must fail at start; returns its log.
fn refused_at_start(opts: &AgentOptions) -> String {
    let mut agent = Agent::start(opts);
    let code = agent.wait_exit(Duration::from_secs(40));
    let log = agent.log_text();
    assert_eq!(code, Some(1), "the agent must exit 1 at start:\n{log}");
    log
}

fn service_setup(args: &[&str]) -> std::process::Output {
    Command::new(service_setup_binary())
        .args(args)
        .env_remove("AMQP_URL")
        .output()
        .expect("run service-setup")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_round_trip_with_every_agent_connection_encrypted() {
    let ep = unique_endpoint("tls");
    let dir = TempDir::new("tls");
    let pki = TestPki::generate(&dir.0.join("pki"), "tls-client");
    let proxy = TlsProxy::start(broker_addr(), &pki, false).await;
    let mut service = Service::provision(&ep, 2).await;
    let url = amqps_via(&proxy.addr);
    let ca = pki.ca.display().to_string();
    let opts = tls_agent(
        &ep,
        &dir.0.join("data"),
        url.clone(),
        &[Path::new("--tls-ca"), &pki.ca],
    );
    let agent = Agent::start(&opts);
    let ids = service
        .submit(vec![echo("over tls"), task("sleep", b"10")])
        .await;
    service.await_results(&ids, WAIT, &[&agent]).await;
    service.assert_all_ok(&ids);

    // Every connection the broker holds for this agent came through the TLS proxy.
    let ports = agent_connection_ports(&ep).await;
    assert!(
        ports.len() >= 2,
        "the subscriber and the publisher: {ports:?}"
    );
    let through_tls = proxy.upstream_ports();
    for port in &ports {
        assert!(
            through_tls.contains(port),
            "agent connection from port {port} did not come through TLS ({through_tls:?})"
        );
    }

    // The service side over amqps too.
    let out = service_setup(&[
        "--broker-url",
        &url,
        "--tls-ca",
        &ca,
        "submit",
        "--endpoint-id",
        ep.as_str(),
        "--function",
        "echo",
        "--payload",
        "from the cli",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli_id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    service
        .await_results(std::slice::from_ref(&cli_id), WAIT, &[&agent])
        .await;
    assert_eq!(service.result(&cli_id).body, b"from the cli");
    let out = service_setup(&[
        "--broker-url",
        &url,
        "--tls-ca",
        &ca,
        "status",
        "--endpoint-id",
        ep.as_str(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("running"));
    let out = service_setup(&["--broker-url", &url, "status", "--endpoint-id", ep.as_str()]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "no trusted CA: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-ca"));
    assert!(proxy.handshakes() >= 4);
    agent.terminate(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_problems_and_plaintext_servers_stop_the_start() {
    let ep = unique_endpoint("tlsbad");
    let dir = TempDir::new("tlsbad");
    let pki = TestPki::generate(&dir.0.join("pki"), "tls-client");
    let proxy = TlsProxy::start(broker_addr(), &pki, false).await;
    let _service = Service::provision(&ep, 2).await;
    let url = amqps_via(&proxy.addr);
    let data = |n: &str| dir.0.join(n);
    let ca = [Path::new("--tls-ca"), pki.ca.as_path()];

    let log = refused_at_start(&tls_agent(
        &ep,
        &data("other-ca"),
        url.clone(),
        &[Path::new("--tls-ca"), &pki.other_ca],
    ));
    assert!(log.contains("not signed by a trusted CA"), "{log}");
    let log = refused_at_start(&tls_agent(&ep, &data("no-ca"), url.clone(), &[]));
    assert!(log.contains("not signed by a trusted CA"), "{log}");
    let log = refused_at_start(&tls_agent(
        &ep,
        &data("plain"),
        amqps_via(&broker_addr()),
        &ca,
    ));
    assert!(log.contains("did not answer in TLS"), "{log}");
    proxy.present(Presents::Expired);
    let log = refused_at_start(&tls_agent(&ep, &data("expired"), url.clone(), &ca));
    assert!(log.contains("expired"), "{log}");
    proxy.present(Presents::WrongName);
    let log = refused_at_start(&tls_agent(&ep, &data("name"), url.clone(), &ca));
    assert!(log.contains("does not name the host"), "{log}");
    proxy.present(Presents::Good);
    assert!(proxy.refused() >= 4, "the proxy saw the refused handshakes");
    // Nothing was answered in plaintext: the broker never saw this agent.
    assert!(agent_connection_ports(&ep).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_are_presented_when_required() {
    let ep = unique_endpoint("mtls");
    let dir = TempDir::new("mtls");
    let pki = TestPki::generate(&dir.0.join("pki"), "mtls-client");
    let proxy = TlsProxy::start(broker_addr(), &pki, true).await;
    let mut service = Service::provision(&ep, 2).await;
    let url = amqps_via(&proxy.addr);
    let log = refused_at_start(&tls_agent(
        &ep,
        &dir.0.join("no-cert"),
        url.clone(),
        &[Path::new("--tls-ca"), &pki.ca],
    ));
    assert!(log.contains("TLS"), "{log}");
    let opts = tls_agent(
        &ep,
        &dir.0.join("data"),
        url,
        &[
            Path::new("--tls-ca"),
            &pki.ca,
            Path::new("--tls-cert"),
            &pki.client_cert,
            Path::new("--tls-key"),
            &pki.client_key,
        ],
    );
    let agent = Agent::start(&opts);
    let ids = service
        .submit(vec![echo("with a client certificate")])
        .await;
    service.await_results(&ids, WAIT, &[&agent]).await;
    service.assert_all_ok(&ids);
    agent.terminate(Duration::from_secs(30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_good_start_tls_failures_are_retried() {
    let ep = unique_endpoint("tlsretry");
    let dir = TempDir::new("tlsretry");
    let pki = TestPki::generate(&dir.0.join("pki"), "tls-client");
    let proxy = TlsProxy::start(broker_addr(), &pki, false).await;
    let mut service = Service::provision(&ep, 1).await;
    let opts = tls_agent(
        &ep,
        &dir.0.join("data"),
        amqps_via(&proxy.addr),
        &[Path::new("--tls-ca"), &pki.ca],
    );
    let mut agent = Agent::start(&opts);
    let first = service.submit(vec![echo("before")]).await;
    service.await_results(&first, WAIT, &[&agent]).await;
    // The broker's certificate changes to one the agent does not trust, and the link drops.
    proxy.present(Presents::OtherCa);
    let refused_before = proxy.refused();
    proxy.cut();
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.refused() < refused_before + 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        proxy.refused() >= refused_before + 2,
        "the agent keeps trying"
    );
    assert!(
        agent.child.try_wait().expect("child status").is_none(),
        "{}",
        agent.log_text()
    );
    let during = service.submit(vec![echo("during")]).await;
    proxy.present(Presents::Good);
    service.await_results(&during, WAIT, &[&agent]).await;
    assert_eq!(service.result(&during[0]).status, "ok");
    agent.terminate(Duration::from_secs(30));
}

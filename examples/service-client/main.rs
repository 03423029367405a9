//! A service embedding `service_setup::Client`: it calls `echo` on an endpoint and prints the verdict, submits a
//! batch without waiting, then reads those results as they come. Run it against a provisioned endpoint with its
//! agent running:
//!
//! ```sh
//! service-setup provision --endpoint-id demo
//! endpoint-agent start --endpoint-id demo &
//! cargo run -p service-setup --example service-client -- demo
//! ```
//!
//! `AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`) says where the broker is.

use service_setup::{
    BrokerUrl, CallError, Client, ClientOptions, EndpointId, ServiceName, TaskSpec,
};
use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let endpoint = EndpointId::new(std::env::args().nth(1).unwrap_or_else(|| "demo".into()))?;
    let url = BrokerUrl::new(
        std::env::var("AMQP_URL").unwrap_or_else(|_| service_setup::DEFAULT_BROKER_URL.into()),
    )?;
    // One name per service instance: its results queue is `service.example-<pid>.results`.
    let service = ServiceName::new(format!("example-{}", std::process::id()))?;
    let mut options = ClientOptions::new(service);
    // An example leaves nothing behind for long: its queue goes an hour after it stops.
    options.queue_expires = Some(Duration::from_secs(3600));
    let client = Client::connect(&[url], options).await?;

    // A call: the result, or a verdict on why there is none yet.
    match client
        .call(
            &endpoint,
            "echo",
            b"hello".to_vec(),
            Duration::from_secs(10),
        )
        .await
    {
        Ok(result) => println!(
            "call: {} {:?}",
            result.status,
            String::from_utf8_lossy(&result.body)
        ),
        Err(CallError::EndpointNotRunning { endpoint, .. }) => {
            println!(
                "call: no agent serves {endpoint}: start `endpoint-agent start --endpoint-id {endpoint}`"
            )
        }
        Err(CallError::NoResultYet { queue_depth, .. }) => {
            println!("call: the agent runs but has not answered yet ({queue_depth:?} queued)")
        }
        Err(e) => return Err(e.into()),
    }

    // Many tasks at once, pipelined; their results come back on this service's queue.
    let ids = client
        .submit_many(
            &endpoint,
            (0..10)
                .map(|i| TaskSpec::new("echo", format!("task {i}")))
                .collect(),
        )
        .await?;
    let mut left: std::collections::BTreeSet<String> = ids.into_iter().collect();
    while !left.is_empty() {
        let Ok(Some(result)) =
            tokio::time::timeout(Duration::from_secs(30), client.next_result()).await
        else {
            println!("{} results did not come within 30 s", left.len());
            break;
        };
        if left.remove(&result.task_id) {
            println!(
                "result {}: {}",
                result.task_id,
                String::from_utf8_lossy(&result.body)
            );
        }
    }
    client.close().await;
    Ok(())
}

//! service-setup: the service side of endpoint-agent. It provisions and deprovisions an endpoint's topology on
//! the broker, submits tasks with publisher confirms, reads results, and reports whether an endpoint's agent is
//! alive. Names, payloads, connections and error classification come from the contract crate (`endpoint_wire`):
//! this crate must not redefine them, and must not depend on the agent (a service embeds it without SQLite).
//! The binary (`main.rs`) is a thin CLI over these functions and owns all printing; nothing in the library
//! writes to stdout.

#![warn(missing_docs)]

mod amqp;
mod base64;
mod client;
mod error;
pub mod management;
mod results;
mod status;
mod submit;
mod time;
mod topology;

pub use client::{
    Call, CallError, Client, ClientOptions, DEFAULT_PREFETCH, SubmitOptions, TaskResult,
    declare_service_queue, delete_service_queue_if_empty,
};
pub use endpoint_wire::{AgentState, EndpointId, Heartbeat, QueueType, Registration, ServiceName};
pub use endpoint_wire::{
    BrokerError, BrokerUrl, DEFAULT_BROKER_URL, Tls, TlsFiles, parse_broker_urls, random_order,
};
pub use error::SetupError;
pub use results::{RESULTS_WINDOW, ResultRecord, ResultsQuery, read_results};
pub use status::{EndpointStatus, Liveness, Watched, endpoint_status, watch_status};
pub use submit::{Submitter, TaskSpec, new_task_id};
pub use time::rfc3339_utc;
pub use topology::{
    Deprovisioned, deprovision, endpoint_user_of, provision, provision_as, provision_typed,
};

use std::time::Duration;

/// How long [`connect`] waits for the broker before giving up: a blackholed host would otherwise hang forever.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a connection to the first of `urls` that accepts, trying them in random order (so that many services
/// given a cluster's nodes spread over them); returns it with the URL it went to, else the last node's error.
pub async fn connect_any(urls: &[BrokerUrl]) -> Result<(lapin::Connection, BrokerUrl), SetupError> {
    let mut last = None;
    for url in random_order(urls) {
        match connect(&url).await {
            Ok(conn) => return Ok((conn, url)),
            Err(e) => {
                if urls.len() > 1 {
                    tracing::warn!(node = %url.node(), error = %e, "cannot connect to this broker node; trying the next");
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| {
        SetupError::InvalidArgument("no broker URL given: pass at least one".into())
    }))
}

/// Opens a connection named `service-setup` to `url`, giving up after [`CONNECT_TIMEOUT`].
pub async fn connect(url: &BrokerUrl) -> Result<lapin::Connection, SetupError> {
    let name = format!("service-setup pid {}", std::process::id());
    match tokio::time::timeout(CONNECT_TIMEOUT, endpoint_wire::amqp::connect(url, &name)).await {
        Ok(conn) => Ok(conn?),
        Err(_) => Err(SetupError::ConnectTimeout {
            url: url.to_string(),
            secs: CONNECT_TIMEOUT.as_secs(),
        }),
    }
}

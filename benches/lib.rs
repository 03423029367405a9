//! Support for the round-trip benchmark (`benches/roundtrip.rs`): the bench's own broker vhost and service side
//! (`broker`), the raw-broker ceiling client (`raw`), the real `endpoint-agent` as a measured child process
//! (`agent`), a TCP forwarder that opens the agent's path to the broker on cue (`forward`), and statistics,
//! tables, JSON and the SVG chart (`report`). It measures; it never asserts performance and never tunes the
//! agent. Names of queues, exchanges and headers come from `endpoint_agent::wire`, never spelled here.

pub mod agent;
pub mod broker;
pub mod call;
pub mod forward;
pub mod raw;
pub mod report;

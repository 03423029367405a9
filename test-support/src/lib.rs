//! Test support shared by the end-to-end scenarios (`tests/`) and the benchmark (`benches/`): the broker under
//! test and a vhost per process (`broker`), the `endpoint-agent` binary (`build`), a TCP proxy for cutting
//! and blackholing connections (`proxy`), a test PKI and a TLS-terminating proxy (`tls`), host facts (`host`: the user, cgroups, the umask), and the scenario
//! harness (agents as child processes, the service side, broker restarts, alarms, forced closes, a full disk;
//! re-exported at the root). Talks to a real RabbitMQ; never mocks it.

pub mod broker;
pub mod build;
pub mod cluster;
mod host;
pub mod proxy;
mod scenario;
pub mod tls;

pub use host::*;
pub use scenario::*;

//! End-to-end scenarios: the real `endpoint-agent` binary against the real RabbitMQ, one file per scenario.
//! Every scenario counts task ids and results; none asserts on timing or log text.

mod bad_input;
mod broker_faults;
mod chaos;
mod cluster;
mod disk;
mod faults;
mod http;
mod identity;
mod isolation;
mod lifecycle;
mod operations;
mod pool;
mod queue_types;
mod raw_reader;
mod roundtrip;
mod service_client;
mod tls;

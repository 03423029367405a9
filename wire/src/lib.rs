//! The wire contract of endpoint-agent, shared by the agent and the service side (`service-setup`, and any
//! service that embeds its library): the names of exchanges, queues and headers, endpoint ids, the versioned
//! payloads, broker URLs with their redaction, the classification of broker errors, and the AMQP helpers both
//! sides use to look at a queue without consuming it. Documented in `docs/protocol.md`.
//!
//! No SQLite and no runtime: depending on this crate costs a service lapin and nothing of the agent.

pub mod amqp;
mod backoff;
mod error;
mod names;
mod payloads;
pub mod registration;
mod time;
pub mod tls;
mod url;

pub use backoff::Backoff;
pub use error::{BrokerError, soft_error};
pub use names::*;
pub use payloads::*;
pub use time::{now_ms, now_rfc3339, rfc3339_utc};
pub use tls::{Tls, TlsError, TlsFiles};
pub use url::{BrokerUrl, DEFAULT_BROKER_URL, UrlParts, parse_broker_urls, random_order};

//! A minimal AMQP 0-9-1 client of our own, for the messages lapin cannot read. lapin (through amq-protocol)
//! parses every short string as UTF-8 and knows a fixed set of field-table types; a delivery whose
//! `message_id`, `type` or a header key is not UTF-8, or whose headers hold an unknown type byte, is a parse
//! error that kills the whole connection, and the broker hands the same message back at every reconnect. This
//! client reads such a message byte by byte and leniently (`basic.get`), so the subscriber can answer or drop
//! it, and it publishes arbitrary property bytes, so tests can produce such messages. The subscriber consumes
//! with it: it reads the socket only as fast as the agent takes deliveries and drops an oversized body as it
//! arrives, so hostile input cannot fill the agent's memory. It speaks only what that needs: PLAIN or
//! EXTERNAL login, TLS for `amqps://`, heartbeats, one channel, `basic.qos` / `consume` / `get` / `ack` /
//! `nack`, and confirmed `basic.publish`.
//!
//! `codec` holds the protocol's bytes (named constants, frames, tables, content headers), `transport` the
//! stream (TCP or TLS) and a cancel-safe frame reader, `client` the connection. No lapin here: it must not
//! share the parser it works around.

mod client;
mod codec;
mod transport;

pub use client::{RawConnection, RawError};
pub use codec::{
    FIELD_BYTES, FIELD_LONG_STRING, FIELD_SIGNED_32, FIELD_SIGNED_64, FIELD_VOID, FieldValue,
    RawMessage, RawProperties, parse_table, table_entry,
};

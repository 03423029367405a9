//! The broker session: everything that speaks to the broker through lapin. `link` supervises it (registers,
//! connects, restarts with backoff), `subscriber` takes tasks into the store, `publisher` sends results out of
//! it, `heartbeat` tells the service the agent is alive. Only this module (and the contract crate) imports
//! lapin, and only `crate::run` imports this module.

mod handback;
mod heartbeat;
mod link;
mod publisher;
mod subscriber;

pub(crate) use handback::hand_back;
pub use handback::{Handback, HandbackError};
pub(crate) use link::Link;
pub use publisher::result_properties;

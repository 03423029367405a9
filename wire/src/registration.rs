//! Reading an endpoint's [`Registration`] the way the agent does on every (re)connect: peeked, never consumed,
//! the newest valid message wins, and a registration of another protocol version or another endpoint is
//! refused with the command that fixes it.

use crate::amqp::peek_all;
use crate::error::BrokerError;
use crate::names::EndpointId;
use crate::payloads::{PROTOCOL_VERSION, Registration};
use lapin::Connection;
use std::time::Duration;

/// Why the agent cannot read its registration.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    #[error(
        "endpoint {0} is not provisioned (no queue {1}): run `service-setup provision --endpoint-id {0}`"
    )]
    NotProvisioned(EndpointId, String),
    #[error(
        "endpoint {0} has no registration message in {1}: run `service-setup provision --endpoint-id {0}` again"
    )]
    Missing(EndpointId, String),
    #[error(
        "registration of endpoint {0} is not valid ({1}): run `service-setup provision --endpoint-id {0}` again"
    )]
    Invalid(EndpointId, String),
    #[error(
        "registration of endpoint {0} speaks protocol version {1}, this agent speaks {PROTOCOL_VERSION}: upgrade the agent or re-provision with a matching service-setup"
    )]
    Version(EndpointId, u32),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl RegistrationError {
    /// The broker had a problem (retry); anything else needs an operator.
    pub fn is_transient(&self) -> bool {
        matches!(self, RegistrationError::Broker(e) if e.is_transient())
    }
}

/// Reads the service's registration for `ep` without consuming it, using the newest valid message. Another
/// reader may hold the single message unacked for a moment, so an empty queue is retried briefly.
pub async fn fetch_registration(
    conn: &Connection,
    ep: &EndpointId,
) -> Result<Registration, RegistrationError> {
    let queue = ep.registration_queue();
    for attempt in 0..10 {
        let Some(bodies) = peek_all(conn, &queue).await? else {
            return Err(RegistrationError::NotProvisioned(ep.clone(), queue));
        };
        if !bodies.is_empty() {
            return newest_registration(ep, &bodies);
        }
        if attempt < 9 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Err(RegistrationError::Missing(ep.clone(), queue))
}

/// The most recently provisioned valid registration among `bodies`, else the first one's error.
fn newest_registration(
    ep: &EndpointId,
    bodies: &[Vec<u8>],
) -> Result<Registration, RegistrationError> {
    let mut parsed: Vec<_> = bodies.iter().map(|b| parse_registration(ep, b)).collect();
    parsed.sort_by_key(|r| std::cmp::Reverse(r.as_ref().map_or(0, |r| r.provisioned_at_ms)));
    let first_ok = parsed.iter().position(Result::is_ok);
    parsed.swap_remove(first_ok.unwrap_or(0))
}

fn parse_registration(ep: &EndpointId, body: &[u8]) -> Result<Registration, RegistrationError> {
    // The version first: a registration of another version may not have this version's fields.
    #[derive(serde::Deserialize)]
    struct Versioned {
        protocol_version: u32,
    }
    let invalid = |e: serde_json::Error| RegistrationError::Invalid(ep.clone(), e.to_string());
    let versioned: Versioned = serde_json::from_slice(body).map_err(invalid)?;
    if versioned.protocol_version != PROTOCOL_VERSION {
        return Err(RegistrationError::Version(
            ep.clone(),
            versioned.protocol_version,
        ));
    }
    let reg: Registration = serde_json::from_slice(body).map_err(invalid)?;
    if &reg.endpoint_id != ep {
        return Err(RegistrationError::Invalid(
            ep.clone(),
            format!("it names endpoint {}", reg.endpoint_id),
        ));
    }
    if reg.heartbeat_secs == 0 {
        return Err(RegistrationError::Invalid(
            ep.clone(),
            "heartbeat_secs is 0".into(),
        ));
    }
    Ok(reg)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn newest_valid_registration_wins() {
        let ep = EndpointId::new("ep").unwrap();
        let old = serde_json::to_vec(&Registration::new(ep.clone(), 5, 100)).unwrap();
        let new = serde_json::to_vec(&Registration::new(ep.clone(), 9, 200)).unwrap();
        let got = newest_registration(&ep, &[old.clone(), new.clone()]).unwrap();
        assert_eq!(got.heartbeat_secs, 9);
        let got = newest_registration(&ep, &[new, old.clone()]).unwrap();
        assert_eq!(got.heartbeat_secs, 9);
        let got = newest_registration(&ep, &[b"junk".to_vec(), old]).unwrap();
        assert_eq!(got.heartbeat_secs, 5);
        assert!(newest_registration(&ep, &[b"junk".to_vec()]).is_err());
    }

    #[test]
    fn registration_checks() {
        let ep = EndpointId::new("ep").unwrap();
        let good = serde_json::to_vec(&Registration::new(ep.clone(), 5, 1)).unwrap();
        assert!(parse_registration(&ep, &good).is_ok());
        let other = EndpointId::new("other").unwrap();
        assert!(matches!(
            parse_registration(&other, &good),
            Err(RegistrationError::Invalid(..))
        ));
        assert!(matches!(
            parse_registration(&ep, b"{"),
            Err(RegistrationError::Invalid(..))
        ));
        let mut other_version = Registration::new(ep.clone(), 5, 1);
        other_version.protocol_version = PROTOCOL_VERSION + 1;
        let other_version = serde_json::to_vec(&other_version).unwrap();
        assert!(matches!(
            parse_registration(&ep, &other_version),
            Err(RegistrationError::Version(..))
        ));
        // A version-1 registration (heartbeats through the default exchange) is refused with the fix.
        let v1 = br#"{"protocol_version":1,"endpoint_id":"ep","heartbeat_secs":5,"tasks_exchange":"tasks","tasks_queue":"ep.tasks","results_exchange":"results","results_routing_key":"ep.results","heartbeat_queue":"ep.heartbeat","provisioned_at_ms":1}"#;
        let err = parse_registration(&ep, v1).unwrap_err();
        assert!(err.to_string().contains("re-provision"), "{err}");
    }
}

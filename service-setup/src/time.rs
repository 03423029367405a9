//! Wall-clock formatting for humans: short ages, and RFC 3339 UTC timestamps (defined once, in
//! the `endpoint-wire` contract crate, and re-exported here). Pure functions with no clock access.

pub use endpoint_wire::rfc3339_utc;

/// An age in whole seconds for messages such as "last heartbeat 3s ago".
pub(crate) fn secs(ms: u64) -> u64 {
    ms / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_seconds() {
        assert_eq!(secs(0), 0);
        assert_eq!(secs(2_999), 2);
        assert_eq!(secs(3_000), 3);
    }
}

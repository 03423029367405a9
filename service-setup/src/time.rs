//! Wall-clock formatting for humans: RFC 3339 UTC timestamps from epoch milliseconds and short ages. Pure
//! functions with no clock access (callers pass `now`), so output is testable; no time zone other than UTC.

/// `2024-03-01T12:34:56.789Z` for `ms` milliseconds since the Unix epoch.
pub fn rfc3339_utc(ms: u64) -> String {
    let secs = ms / 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Year, month (1-12) and day (1-31) of the `days`-th day after 1970-01-01, by Howard Hinnant's
/// `civil_from_days` (proleptic Gregorian calendar, eras of 400 years).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097; // day of era, 0..=146096
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // year of era, 0..=399
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // day of year starting March 1st, 0..=365
    let mp = (5 * doy + 2) / 153; // month starting March, 0..=11
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// An age in whole seconds for messages such as "last heartbeat 3s ago".
pub(crate) fn secs(ms: u64) -> u64 {
    ms / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(ms: u64, expected: &str) {
        assert_eq!(rfc3339_utc(ms), expected, "{ms}");
    }

    #[test]
    fn formats_known_instants() {
        check(0, "1970-01-01T00:00:00.000Z");
        check(999, "1970-01-01T00:00:00.999Z");
        check(86_399_999, "1970-01-01T23:59:59.999Z");
        check(951_782_400_000, "2000-02-29T00:00:00.000Z");
        check(951_868_800_000, "2000-03-01T00:00:00.000Z");
        check(1_709_210_096_789, "2024-02-29T12:34:56.789Z");
        check(1_735_689_599_000, "2024-12-31T23:59:59.000Z");
        check(1_735_689_600_000, "2025-01-01T00:00:00.000Z");
        check(4_102_444_800_000, "2100-01-01T00:00:00.000Z");
        check(4_107_456_000_000, "2100-02-28T00:00:00.000Z");
        check(4_107_542_400_000, "2100-03-01T00:00:00.000Z");
    }

    #[test]
    fn whole_seconds() {
        assert_eq!(secs(0), 0);
        assert_eq!(secs(2_999), 2);
        assert_eq!(secs(3_000), 3);
    }
}

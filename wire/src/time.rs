//! Wall-clock time as the contract carries it: milliseconds since the Unix epoch, shown to people as RFC 3339
//! UTC. No dependency on a date library: one well-known conversion.

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `2024-03-01T12:34:56.789Z` for `ms` milliseconds since the Unix epoch: how humans see wire times.
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

/// Now as RFC 3339 UTC, for states shown to people ("connected since T").
pub fn now_rfc3339() -> String {
    rfc3339_utc(now_ms())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn formats_known_instants() {
        let check = |ms: u64, expected: &str| {
            assert_eq!(rfc3339_utc(ms), expected, "{ms}");
        };

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
}

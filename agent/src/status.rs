//! `endpoint-agent status`: what an endpoint's data directory holds (queued, running, done, pending results),
//! whether an agent is using it, and the broker link state that agent last recorded. Reads only; safe while
//! an agent runs.

use crate::store::{self, Counts, StoreError};
use crate::{LOCK_FILE, lock_data_dir};
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct LocalStatus {
    pub data_dir: String,
    /// `running (pid N)` or `offline`.
    pub agent: String,
    pub online: bool,
    pub tasks_queued: u64,
    pub tasks_running: u64,
    pub tasks_done: u64,
    pub results_pending: u64,
    /// The broker link as last recorded: `connected since T`, `disconnected since T: why`, `stopped at T`.
    pub link: Option<String>,
}

/// Reads the status of the data directory `dir`.
pub fn local_status(dir: &Path) -> Result<LocalStatus, StoreError> {
    if !dir.join(store::DB_FILE).exists() {
        return Err(StoreError::Missing(dir.join(store::DB_FILE)));
    }
    let agent = match lock_data_dir(dir) {
        Ok(_released_at_once) => None,
        Err(_) => Some(
            std::fs::read_to_string(dir.join(LOCK_FILE))
                .unwrap_or_default()
                .trim()
                .to_owned(),
        ),
    };
    let (counts, meta): (Counts, _) = store::read_status(dir)?;
    let link = meta.into_iter().find(|(k, _)| k == "link").map(|(_, v)| v);
    Ok(LocalStatus {
        data_dir: dir.display().to_string(),
        online: agent.is_some(),
        agent: agent.map_or("offline".to_owned(), |pid| format!("running (pid {pid})")),
        tasks_queued: counts.queued,
        tasks_running: counts.running,
        tasks_done: counts.done,
        results_pending: counts.results_pending,
        link,
    })
}

impl LocalStatus {
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "data dir:        {}\nagent:           {}\ntasks queued:    {}\ntasks running:   {}\ntasks done:      {}\nresults pending: {}\n",
            self.data_dir,
            self.agent,
            self.tasks_queued,
            self.tasks_running,
            self.tasks_done,
            self.results_pending
        );
        if let Some(link) = &self.link {
            s.push_str(&format!("broker link:     {link}\n"));
        }
        s
    }
}

/// Milliseconds since the epoch as RFC 3339 UTC (`2026-11-22T09:30:00.123Z`).
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_339_800_123), "2026-11-22T09:30:00.123Z");
    }
}

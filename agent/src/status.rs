//! `endpoint-agent status`: what an endpoint's data directory holds (queued, running, done, pending results),
//! whether an agent is using it, and the broker link state that agent last recorded. Reads only; safe while
//! an agent runs.

use crate::data_dir::lock_holder;
use crate::meta::MetaKey;
use crate::store::{self, StoreError};
use crate::task::Counts;
use endpoint_wire::WorkerCounts;
use serde::Serialize;
use std::collections::BTreeMap;
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
    /// Tasks this disk handed back to the broker (`endpoint-agent handback`, `handback_on_stop`), kept until
    /// the result retention passes.
    pub tasks_handed_back: u64,
    /// The broker link as last recorded: `connected since T`, `disconnected since T: why`, `stopped at T`.
    pub link: Option<String>,
    /// The broker node (its URL, password redacted) the agent is connected to, or was last.
    pub node: Option<String>,
    /// How often the agent has reconnected to the broker since it started.
    pub reconnects: u64,
    /// `since <time>: <reason>` while the broker blocks the agent's publishing (a resource alarm).
    pub publishing_blocked: Option<String>,
    /// `since <time>: <error>` while the database cannot grow, if the agent could record it (the disk being
    /// full, it may not); the heartbeat's `disk_full` state tells the service in any case.
    pub disk_full: Option<String>,
    /// `since <time>` while the running agent is quiet (consumes nothing new).
    pub quiet: Option<String>,
    /// Pool workers per function, as the running agent last recorded them.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub workers: BTreeMap<String, WorkerCounts>,
}

/// Reads the status of the data directory `dir`.
pub fn local_status(dir: &Path) -> Result<LocalStatus, StoreError> {
    if !dir.join(store::DB_FILE).exists() {
        return Err(StoreError::Missing(dir.join(store::DB_FILE)));
    }
    let agent = lock_holder(dir);
    let (counts, meta): (Counts, _) = store::read_status(dir)?;
    let get = |key: MetaKey| {
        meta.iter()
            .find(|(k, _)| k == key.as_str())
            .map(|(_, v)| v.clone())
    };
    let link = get(MetaKey::Link);
    let node = get(MetaKey::Node);
    let reconnects = get(MetaKey::Reconnects)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // Conditions are only meaningful while an agent runs; an empty value means "not in effect".
    let online = agent.is_some();
    let condition = |key: MetaKey| get(key).filter(|v| !v.is_empty() && online);
    let publishing_blocked = condition(MetaKey::PublishingBlocked);
    let disk_full = condition(MetaKey::DiskFull);
    let quiet = condition(MetaKey::Quiet);
    let workers = condition(MetaKey::Workers)
        .and_then(|w| serde_json::from_str(&w).ok())
        .unwrap_or_default();
    Ok(LocalStatus {
        data_dir: dir.display().to_string(),
        online: agent.is_some(),
        agent: agent.map_or("offline".to_owned(), |pid| format!("running (pid {pid})")),
        tasks_queued: counts.queued,
        tasks_running: counts.running,
        tasks_done: counts.done,
        results_pending: counts.results_pending,
        tasks_handed_back: counts.handed_back,
        link,
        node,
        reconnects,
        publishing_blocked,
        disk_full,
        quiet,
        workers,
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
        if self.tasks_handed_back > 0 {
            s.push_str(&format!("handed back:     {}\n", self.tasks_handed_back));
        }
        if let Some(link) = &self.link {
            s.push_str(&format!("broker link:     {link}\n"));
            if let Some(node) = &self.node {
                s.push_str(&format!("broker node:     {node}\n"));
            }
            s.push_str(&format!("reconnects:      {}\n", self.reconnects));
        }
        if let Some(b) = &self.publishing_blocked {
            s.push_str(&format!("publishing:      blocked by the broker {b}\n"));
        }
        if let Some(q) = &self.quiet {
            s.push_str(&format!(
                "quiet:           {q}: consuming nothing new, finishing what is on disk\n"
            ));
        }
        if let Some(d) = &self.disk_full {
            s.push_str(&format!("disk:            full {d}\n"));
        }
        for (function, w) in &self.workers {
            s.push_str(&format!(
                "workers {function}: {} idle, {} busy, {} starting, {} failing ({} external)\n",
                w.idle, w.busy, w.starting, w.failing, w.external
            ));
        }
        s
    }
}

//! The facts the agent records in its database for `endpoint-agent status` (the broker link, reconnects, the
//! conditions in effect), named by a type instead of strings. The stored names are part of the on-disk format.

/// A key of the `meta` table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetaKey {
    /// The broker link as last recorded: `connected since T`, `disconnected since T: why`, `standby since T`.
    Link,
    /// Sessions opened since the agent started, minus one.
    Reconnects,
    /// `since T: reason` while the broker blocks publishing; empty when not in effect.
    PublishingBlocked,
    /// `since T: error` while the database cannot grow; empty when not in effect.
    DiskFull,
    /// The pool workers per function, as JSON (`{"fn": {"idle": 2, "busy": 0, ...}}`).
    Workers,
    /// `since T` while the agent is quiet (consumes nothing new); empty when not in effect.
    Quiet,
    /// The broker node (its URL, password redacted) the agent is connected to, or was last.
    Node,
}

impl MetaKey {
    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            MetaKey::Link => "link",
            MetaKey::Reconnects => "reconnects",
            MetaKey::PublishingBlocked => "publishing_blocked",
            MetaKey::DiskFull => "disk_full",
            MetaKey::Workers => "workers",
            MetaKey::Quiet => "quiet",
            MetaKey::Node => "node",
        }
    }
}

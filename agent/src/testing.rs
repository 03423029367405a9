//! Helpers for the unit tests of every module (compiled only for tests): scratch directories that clean up,
//! and a validated `Config` made from a config file's text.

use crate::config::{BrokerSource, Config, Overrides};
use endpoint_wire::{BrokerUrl, EndpointId, TlsFiles};
use std::path::{Path, PathBuf};

/// Unit tests' scratch directories, removed when dropped.
pub(crate) struct TestDir(PathBuf);

impl TestDir {
    /// A directory path (not created) under the system temp dir, unique by the process id and a counter.
    pub(crate) fn new(name: &str) -> TestDir {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ea-unit-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TestDir(dir)
    }
}

impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The config of endpoint `ep` with `toml` as its config file (functions, limits), loaded and validated as the
/// agent does it.
pub(crate) fn config(toml: &str) -> Config {
    let dir = TestDir::new("config");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let path = dir.join("agent.toml");
    std::fs::write(&path, toml).expect("config file");
    let o = Overrides {
        endpoint_id: EndpointId::new("ep").expect("a valid id"),
        broker: BrokerSource::Url(vec![BrokerUrl::new("amqp://h/%2f").expect("a valid url")]),
        tls: TlsFiles::default(),
        data_dir: Some(std::env::temp_dir()),
        workers: None,
        prefetch: None,
        broker_order: None,
    };
    Config::load(o, Some(&path)).expect("a valid config")
}

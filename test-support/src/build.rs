//! The binaries the scenarios and the bench run as child processes (`endpoint-agent`, `service-setup`): built with cargo (a no-op
//! when it is fresh) in the profile asked for, and found in the workspace's target directory.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Which build of the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Profile {
    Debug,
    Release,
}

impl Profile {
    /// The profile the running test binary was built with (its path is `target/<profile>/deps/...`), so a
    /// `cargo test --release` runs the release agent.
    pub fn of_current_exe() -> Profile {
        let exe = std::env::current_exe().unwrap_or_default();
        let release = exe
            .parent()
            .and_then(Path::parent)
            .and_then(Path::file_name)
            .is_some_and(|n| n == "release");
        if release {
            Profile::Release
        } else {
            Profile::Debug
        }
    }

    fn dir(self) -> &'static str {
        match self {
            Profile::Debug => "debug",
            Profile::Release => "release",
        }
    }
}

/// Builds `endpoint-agent` with cargo in `profile` and returns the binary's path.
pub fn agent_binary(profile: Profile) -> Result<PathBuf> {
    binary("endpoint-agent", "endpoint-agent", profile)
}

/// Builds binary `bin` of workspace package `package` with cargo in `profile` and returns its path.
pub fn binary(package: &str, bin: &str, profile: Profile) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut cmd = Command::new(&cargo);
    // Not the calling test's CARGO_MANIFEST_DIR: build scripts (ring's) track it, so inheriting it would
    // rebuild the agent's dependencies at every test run and again at the next plain build.
    cmd.env_remove("CARGO_MANIFEST_DIR")
        .args(["build", "--quiet", "-p", package, "--bin", bin])
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"));
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    let status = cmd
        .status()
        .with_context(|| format!("while running {cargo} build -p {package}"))?;
    if !status.success() {
        bail!("cargo build -p {package} ({}) failed", profile.dir());
    }
    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => workspace.join("target"),
    };
    let bin = target.join(profile.dir()).join(bin);
    if !bin.exists() {
        bail!("{} was not built", bin.display());
    }
    Ok(bin)
}

//! Where a command's task runs: a fresh working directory under the data directory (removed after the task)
//! and, where cgroup v2 is writable, a cgroup of its own that a timeout or a stop kills whole, so a child that
//! left the process group (`setsid`) dies with its task. Where cgroups are not writable the agent says so once
//! at start and falls back to killing the process group. Prepared once at start, shared by the slots.

use crate::sys::User;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Folder of the data directory holding the tasks' working directories.
pub const WORK_DIR: &str = "work";

/// How long a killed cgroup may take to empty before it is left for the agent's stop to remove.
const CGROUP_EMPTY_WAIT: Duration = Duration::from_secs(2);

/// The places tasks run in.
#[derive(Debug)]
pub(crate) struct Sandbox {
    work_root: PathBuf,
    /// The agent's own cgroup for its tasks (`<cgroup2 mount><own cgroup>/endpoint-agent-<pid>-<n>`), if
    /// writable.
    cgroups: Option<PathBuf>,
    next: AtomicU64,
}

impl Sandbox {
    /// Prepares `<data_dir>/work` (emptied of what a crashed run left) and probes cgroup v2, logging once
    /// which way tasks are killed.
    pub(crate) fn prepare(data_dir: &Path) -> std::io::Result<Sandbox> {
        let work_root = data_dir.join(WORK_DIR);
        if work_root.exists() {
            std::fs::remove_dir_all(&work_root)?;
        }
        std::fs::create_dir_all(&work_root)?;
        set_mode(&work_root, 0o700)?;
        let cgroups = match cgroup_root() {
            Ok(root) => {
                tracing::info!(cgroup = %root.display(), "each command task runs in a cgroup of its own: a timeout or a stop kills all it started, even children that left its process group");
                Some(root)
            }
            Err(why) => {
                tracing::warn!(
                    reason = %why,
                    "cgroup v2 is not writable here: a timeout or a stop kills a command task's process group; a child that leaves it (setsid) can outlive its task"
                );
                None
            }
        };
        Ok(Sandbox {
            work_root,
            cgroups,
            next: AtomicU64::new(0),
        })
    }

    /// A fresh working directory (mode 0700, owned by `run_as` when given), removed when dropped.
    pub(crate) fn task_dir(&self, run_as: Option<&User>) -> std::io::Result<TaskDir> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.work_root.join(n.to_string());
        std::fs::create_dir(&path)?;
        set_mode(&path, 0o700)?;
        if let Some(user) = run_as {
            std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid))?;
        }
        Ok(TaskDir(path))
    }

    /// A cgroup of its own for one task, if cgroups are in use.
    pub(crate) fn task_cgroup(&self) -> std::io::Result<Option<TaskCgroup>> {
        let Some(root) = &self.cgroups else {
            return Ok(None);
        };
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = root.join(format!("task-{n}"));
        std::fs::create_dir(&path)?;
        Ok(Some(TaskCgroup(path)))
    }
}

impl Drop for Sandbox {
    /// Kills and removes the agent's cgroup folder (once no task runs: the slots hold the sandbox).
    fn drop(&mut self) {
        if let Some(root) = &self.cgroups {
            remove_cgroup_tree(root);
        }
    }
}

/// A task's working directory; removed (in the background) when dropped.
#[derive(Debug)]
pub(crate) struct TaskDir(PathBuf);

impl TaskDir {
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TaskDir {
    fn drop(&mut self) {
        let path = std::mem::take(&mut self.0);
        let remove = move || {
            if let Err(e) = std::fs::remove_dir_all(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(error = %e, dir = %path.display(), "cannot remove a task's working directory");
            }
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(remove);
            }
            Err(_) => remove(),
        }
    }
}

/// A task's cgroup.
#[derive(Debug)]
pub(crate) struct TaskCgroup(PathBuf);

impl TaskCgroup {
    /// The file the child writes itself into.
    pub(crate) fn procs(&self) -> PathBuf {
        self.0.join("cgroup.procs")
    }

    /// SIGKILLs every process in the cgroup (`cgroup.kill`).
    pub(crate) fn kill(&self) {
        if let Err(e) = std::fs::write(self.0.join("cgroup.kill"), "1") {
            tracing::warn!(error = %e, cgroup = %self.0.display(), "cannot kill a task's cgroup");
        }
    }

    /// Kills what is left and removes the cgroup once it is empty, in the background: the task's result does
    /// not wait for the kernel to reap its processes.
    pub(crate) fn finish(self) {
        self.kill();
        let path = self.0.clone();
        let remove = move || {
            let deadline = std::time::Instant::now() + CGROUP_EMPTY_WAIT;
            while populated(&path) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            // Not empty yet: left for the sandbox's drop at the agent's stop.
            let _ = std::fs::remove_dir(&path);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn_blocking(remove);
            }
            Err(_) => remove(),
        }
    }
}

/// Whether processes are still in the cgroup at `path` (`cgroup.events`: `populated 1`).
fn populated(path: &Path) -> bool {
    std::fs::read_to_string(path.join("cgroup.events"))
        .map(|events| events.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

/// Kills and removes a cgroup and every cgroup below it, deepest first.
fn remove_cgroup_tree(root: &Path) {
    if let Ok(entries) = std::fs::read_dir(root) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    let _ = std::fs::write(root.join("cgroup.kill"), "1");
    let deadline = std::time::Instant::now() + CGROUP_EMPTY_WAIT;
    while populated(root) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = std::fs::remove_dir(root);
}

/// Creates `endpoint-agent-<pid>-<n>` under the agent's own cgroup v2 (removing those of agents that are gone), or
/// says why it cannot.
fn cgroup_root() -> Result<PathBuf, String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?;
    let mount = cgroup2_mount(&mountinfo).ok_or("no cgroup2 file system is mounted")?;
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?;
    let own = own_cgroup(&own).ok_or("this process is in no cgroup v2")?;
    let parent = mount.join(own.trim_start_matches('/'));
    if !parent.join("cgroup.kill").exists() && own != "/" {
        return Err(format!(
            "{} has no cgroup.kill (Linux 5.14 or later has it)",
            parent.display()
        ));
    }
    if let Ok(entries) = std::fs::read_dir(&parent) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix("endpoint-agent-")
                .and_then(|rest| rest.split('-').next());
            if let Some(pid) = pid
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    // One per sandbox (a process normally has one; unit tests make many).
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let root = parent.join(format!("endpoint-agent-{}-{seq}", std::process::id()));
    std::fs::create_dir_all(&root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
    if !root.join("cgroup.kill").exists() {
        let _ = std::fs::remove_dir(&root);
        return Err("cgroup.kill is missing (Linux 5.14 or later has it)".into());
    }
    Ok(root)
}

/// Mount point of the cgroup2 file system, from `/proc/self/mountinfo`.
fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        let mount_point = left.split_whitespace().nth(4)?;
        (fstype == "cgroup2").then(|| PathBuf::from(mount_point))
    })
}

/// This process's cgroup v2 path, from `/proc/self/cgroup` (the `0::<path>` line).
fn own_cgroup(cgroup: &str) -> Option<&str> {
    cgroup.lines().find_map(|l| l.strip_prefix("0::"))
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_and_own_cgroup() {
        let hybrid = "30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount("30 25 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro\n"),
            None
        );
        assert_eq!(
            own_cgroup("1:cpu:/\n0::/system.slice/x.service\n"),
            Some("/system.slice/x.service")
        );
        assert_eq!(own_cgroup("1:cpu:/\n"), None);
    }

    #[tokio::test]
    async fn task_dirs_are_private_and_removed() {
        use std::os::unix::fs::PermissionsExt;
        let data = crate::testing::TestDir::new("sandbox");
        std::fs::create_dir_all(data.join(WORK_DIR).join("left-over")).unwrap();
        let sandbox = Sandbox::prepare(&data).unwrap();
        assert!(!data.join(WORK_DIR).join("left-over").exists());
        let dir = sandbox.task_dir(None).unwrap();
        let path = dir.path().to_owned();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        std::fs::write(path.join("scratch"), "x").unwrap();
        drop(dir);
        for _ in 0..100 {
            if !path.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            !path.exists(),
            "the working directory is removed after the task"
        );
    }
}

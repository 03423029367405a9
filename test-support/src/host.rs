//! Facts about the host the scenarios run on, and the few process-wide settings they change: the effective
//! user, whether cgroup v2 is writable (as the agent would find it), whether a process is alive, the umask.

use std::path::PathBuf;

/// The effective user id of the test process.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    unsafe {
        libc::geteuid()
    }
}

/// Sets the process's umask (the agent processes started afterwards inherit it).
pub fn set_umask(mask: u32) {
    // SAFETY: umask takes a plain integer and cannot fail.
    #[allow(unsafe_code)]
    unsafe {
        libc::umask(mask as libc::mode_t);
    }
}

/// Whether process `pid` exists and is not a zombie.
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // `pid (comm) S ...`: the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Whether a cgroup can be created under this process's cgroup v2, as the agent does; else why not.
pub fn cgroup2_writable() -> Result<(), String> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    let mount = mountinfo
        .lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let mount_point = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount_point))
        })
        .ok_or("no cgroup2 file system is mounted")?;
    let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("this process is in no cgroup v2")?;
    let probe = mount
        .join(own.trim_start_matches('/'))
        .join(format!("ea-test-probe-{}", std::process::id()));
    std::fs::create_dir(&probe).map_err(|e| format!("cannot create {}: {e}", probe.display()))?;
    let has_kill = probe.join("cgroup.kill").exists();
    let _ = std::fs::remove_dir(&probe);
    if has_kill {
        Ok(())
    } else {
        Err("cgroup.kill is missing (Linux 5.14 or later has it)".into())
    }
}

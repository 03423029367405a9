//! The operating-system calls the agent needs that the standard library does not offer, behind safe
//! functions: who the agent runs as, looking up a user, and what a command's child process does between
//! `fork` and `exec` (leave the agent's cgroup for its own, resource limits, drop to another user, die with
//! the agent, no new privileges); killing a process group; and systemd's notifications. The only module with `unsafe`: each block
//! says why it is sound.

#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::path::PathBuf;

/// The effective user id of the agent.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// A local user a task may run as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// Looks up `name` in the user database (`/etc/passwd`, NSS).
pub fn lookup_user(name: &str) -> Result<User, String> {
    let c_name =
        CString::new(name).map_err(|_| format!("user name {name:?} contains a NUL byte"))?;
    let mut buf = vec![0u8; 16 * 1024];
    // SAFETY: an all-zero passwd is a valid value of this plain C struct (null pointers, zero ids); getpwnam_r
    // fills it with pointers into `buf`, which outlives every read of them below.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: the name is a NUL-terminated C string, `pwd` and `found`
    // are live locals, and `buf` is writable for `buf.len()` bytes.
    let rc = unsafe {
        libc::getpwnam_r(
            c_name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr().cast(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 {
        return Err(format!(
            "cannot look up user {name:?}: {}",
            std::io::Error::from_raw_os_error(rc)
        ));
    }
    if found.is_null() {
        return Err(format!("there is no user {name:?} on this host"));
    }
    let home = if pwd.pw_dir.is_null() {
        PathBuf::from("/")
    } else {
        // SAFETY: getpwnam_r succeeded, so pw_dir points to a NUL-terminated string inside `buf`.
        let dir = unsafe { CStr::from_ptr(pwd.pw_dir) };
        PathBuf::from(dir.to_string_lossy().into_owned())
    };
    Ok(User {
        name: name.to_owned(),
        uid: pwd.pw_uid,
        gid: pwd.pw_gid,
        home,
    })
}

/// A resource limit of a task's process (`setrlimit`, soft and hard alike).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// Address space, bytes (`RLIMIT_AS`).
    MemoryBytes(u64),
    /// Open file descriptors (`RLIMIT_NOFILE`).
    OpenFiles(u64),
    /// Processes of the user the task runs as (`RLIMIT_NPROC`; root is exempt).
    Processes(u64),
    /// CPU time, seconds (`RLIMIT_CPU`; SIGXCPU, then SIGKILL).
    CpuSecs(u64),
}

/// What a command's child does between `fork` and `exec`, in this order: join its own cgroup, apply resource
/// limits, drop to another user, ask to be killed when the agent dies, forbid gaining privileges.
#[derive(Clone, Debug, Default)]
pub struct ChildSetup {
    /// `cgroup.procs` of the cgroup the child moves itself into.
    pub cgroup_procs: Option<PathBuf>,
    pub limits: Vec<Limit>,
    /// (uid, gid) to run as; supplementary groups are reduced to `gid`.
    pub run_as: Option<(u32, u32)>,
    /// `PR_SET_NO_NEW_PRIVS`: set-user-id programs and file capabilities grant nothing.
    pub no_new_privileges: bool,
}

impl ChildSetup {
    /// Registers the setup on `cmd`, to run in the forked child before `exec`.
    pub fn install(self, cmd: &mut tokio::process::Command) -> std::io::Result<()> {
        // Everything the child needs is prepared here, in the parent: between fork and exec only
        // async-signal-safe calls on ready data are allowed (no allocation).
        let procs = self
            .cgroup_procs
            .map(|p| CString::new(p.into_os_string().into_encoded_bytes()))
            .transpose()
            .map_err(|_| std::io::Error::other("cgroup path contains a NUL byte"))?;
        let limits: Vec<(libc::__rlimit_resource_t, libc::rlim_t)> = self
            .limits
            .iter()
            .map(|l| match *l {
                Limit::MemoryBytes(n) => (libc::RLIMIT_AS, n),
                Limit::OpenFiles(n) => (libc::RLIMIT_NOFILE, n),
                Limit::Processes(n) => (libc::RLIMIT_NPROC, n),
                Limit::CpuSecs(n) => (libc::RLIMIT_CPU, n),
            })
            .collect();
        let run_as = self.run_as;
        let no_new_privileges = self.no_new_privileges;
        let child = move || -> std::io::Result<()> {
            let check = |rc: libc::c_int| {
                if rc == -1 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            // SAFETY (for every call below): open, write, close, setrlimit, setgroups, setgid, setuid and
            // prctl are async-signal-safe, take plain integers or pointers to data prepared before the fork
            // (alive for the whole closure), and touch no memory of the parent.
            unsafe {
                if let Some(procs) = &procs {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    check(fd)?;
                    // "0" moves the writing process: this child.
                    let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                    if written != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (resource, value) in &limits {
                    let limit = libc::rlimit {
                        rlim_cur: *value,
                        rlim_max: *value,
                    };
                    check(libc::setrlimit(*resource, &limit))?;
                }
                if let Some((uid, gid)) = run_as {
                    check(libc::setgroups(1, &gid))?;
                    check(libc::setgid(gid))?;
                    check(libc::setuid(uid))?;
                }
                // After the user change, which clears it.
                check(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL))?;
                if no_new_privileges {
                    check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0))?;
                }
            }
            Ok(())
        };
        // SAFETY: the closure only makes async-signal-safe calls (see above) and allocates nothing.
        unsafe {
            cmd.pre_exec(child);
        }
        Ok(())
    }
}

/// The signal number of SIGTSTP.
pub const SIGTSTP: i32 = libc::SIGTSTP;

/// Sends SIGTSTP to process `pid` (an agent asked to quiet). An error says why it could not be sent.
pub fn send_quiet(pid: u32) -> std::io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(std::io::Error::other)?;
    // SAFETY: kill takes plain integers.
    if unsafe { libc::kill(pid, libc::SIGTSTP) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// SIGTERMs the process group `pgid` (a pool worker being replaced may finish what it does). Gone is fine.
pub fn terminate_group(pgid: Option<u32>) {
    if let Some(pgid) = pgid.and_then(|p| libc::pid_t::try_from(p).ok()) {
        // SAFETY: killpg takes plain integers; ESRCH (already gone) is expected and ignored.
        unsafe {
            libc::killpg(pgid, libc::SIGTERM);
        }
    }
}

/// SIGKILLs the process group `pgid` (a command's child leads its own). Already gone is fine.
pub fn kill_group(pgid: Option<u32>) {
    if let Some(pgid) = pgid.and_then(|p| libc::pid_t::try_from(p).ok()) {
        // SAFETY: killpg takes plain integers; ESRCH (already gone) is expected and ignored.
        unsafe {
            libc::killpg(pgid, libc::SIGKILL);
        }
    }
}

/// Tells systemd (a `Type=notify` unit) about the agent: `READY=1`, `STOPPING=1`, `WATCHDOG=1`, `STATUS=...`
/// lines. A no-op unless systemd set `NOTIFY_SOCKET` (a path, or `@name` for an abstract socket); a failure is
/// only logged at debug level, since the notification is advisory.
pub fn sd_notify(state: &str) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::UnixDatagram;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sent = UnixDatagram::unbound().and_then(|sock| match path.as_bytes().strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            sock.send_to_addr(state.as_bytes(), &addr)
        }
        None => sock.send_to(state.as_bytes(), &path),
    });
    if let Err(e) = sent {
        tracing::debug!(error = %e, state, "cannot notify systemd");
    }
}

/// How often systemd's watchdog wants a `WATCHDOG=1` (half its `WATCHDOG_USEC`, for this process), if it is on.
pub fn watchdog_every() -> Option<std::time::Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| std::time::Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_up_users() {
        let root = lookup_user("root").unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        let err = lookup_user("no-such-user-ea").unwrap_err();
        assert!(err.contains("no user"), "{err}");
    }
}

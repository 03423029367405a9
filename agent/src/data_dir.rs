//! The data directory: one agent at a time (the lock file a running agent holds, with its pid in it for the
//! error another agent shows, and the read-only look at it that `endpoint-agent status` takes), and its
//! protection: the directory is 0700 and every file in it 0600 whatever the umask (it holds every payload and
//! result), tightened at start where an older agent or an operator left them looser; the lock file is never
//! opened through a symbolic link.

use std::fs::File;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// File in the data directory that one running agent holds locked.
pub const LOCK_FILE: &str = "agent.lock";

/// Why the data directory could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "another endpoint-agent (pid {pid}) is using data directory {dir}: stop it, or give this one its own --data-dir"
    )]
    Held { dir: PathBuf, pid: String },
    #[error("cannot lock data directory {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error(
        "{0} is a symbolic link: the agent does not follow one there (it could redirect its writes); remove it and start again"
    )]
    Symlink(PathBuf),
}

/// Holds the data directory for this process; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct DirLock(#[allow(dead_code)] File);

/// Mode of the data directory and of every folder in it.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file in the data directory.
pub const FILE_MODE: u32 = 0o600;

/// Takes the data directory's lock, or says which process holds it; creates the directory (0700) if needed and
/// tightens the permissions of what is in it.
pub fn lock_data_dir(dir: &Path) -> Result<DirLock, LockError> {
    let io = |e| LockError::Io(dir.to_owned(), e);
    let existed = dir.exists();
    std::fs::create_dir_all(dir).map_err(io)?;
    if !existed {
        // Made just now with the umask's bits: private from the start, nothing to report.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE)).map_err(io)?;
    }
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                LockError::Symlink(path.clone())
            } else {
                io(e)
            }
        })?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let pid = std::fs::read_to_string(&path)
                .unwrap_or_default()
                .trim()
                .to_owned();
            return Err(LockError::Held {
                dir: dir.to_owned(),
                pid,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(LockError::Io(dir.to_owned(), e)),
    }
    use std::io::Write;
    let _ = file.set_len(0);
    let _ = (&file).write_all(std::process::id().to_string().as_bytes());
    tighten(dir).map_err(io)?;
    Ok(DirLock(file))
}

/// Sets the data directory to 0700 and every file and folder in it (not following links) to 0600 / 0700,
/// logging each change: an older agent, a copy or an operator may have left them readable by others.
fn tighten(dir: &Path) -> std::io::Result<()> {
    set_mode(dir, DIR_MODE)?;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let mode = if kind.is_dir() {
            DIR_MODE
        } else if kind.is_file() {
            FILE_MODE
        } else {
            continue; // links and the like: not ours to change
        };
        set_mode(&entry.path(), mode)?;
    }
    Ok(())
}

/// Sets `path`'s permission bits to `mode`, logging when they were different.
fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    let was = std::fs::symlink_metadata(path)?.permissions().mode() & 0o7777;
    if was != mode {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        tracing::info!(
            path = %path.display(),
            was = format!("{was:04o}"),
            now = format!("{mode:04o}"),
            "tightened permissions in the data directory (it holds every payload and result)"
        );
    }
    Ok(())
}

/// The pid recorded by the agent holding `dir`'s lock, or `None` if no agent holds it. Writes nothing.
pub fn lock_holder(dir: &Path) -> Option<String> {
    let path = dir.join(LOCK_FILE);
    let file = File::open(&path).ok()?;
    match file.try_lock_shared() {
        Ok(()) => None,
        Err(_) => Some(
            std::fs::read_to_string(&path)
                .unwrap_or_default()
                .trim()
                .to_owned(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time() {
        let dir = crate::testing::TestDir::new("lock");
        assert_eq!(lock_holder(&dir), None);
        let held = lock_data_dir(&dir).unwrap();
        assert_eq!(lock_holder(&dir), Some(std::process::id().to_string()));
        let second = lock_data_dir(&dir).unwrap_err();
        assert!(matches!(second, LockError::Held { .. }), "{second}");
        drop(held);
        assert_eq!(lock_holder(&dir), None);
    }

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path)
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn the_directory_and_its_files_are_private() {
        let dir = crate::testing::TestDir::new("modes");
        std::fs::create_dir_all(dir.join("work")).unwrap();
        std::fs::write(dir.join("agent.db"), "").unwrap();
        for (p, m) in [
            (&dir.to_path_buf(), 0o755),
            (&dir.join("agent.db"), 0o644),
            (&dir.join("work"), 0o755),
        ] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
        }
        let _held = lock_data_dir(&dir).unwrap();
        assert_eq!(mode(&dir), DIR_MODE);
        assert_eq!(mode(&dir.join("agent.db")), FILE_MODE);
        assert_eq!(mode(&dir.join(LOCK_FILE)), FILE_MODE);
        assert_eq!(mode(&dir.join("work")), DIR_MODE);
    }

    #[test]
    fn a_symlinked_lock_file_stops_the_start() {
        let dir = crate::testing::TestDir::new("symlink");
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("elsewhere");
        std::fs::write(&target, "keep me").unwrap();
        std::os::unix::fs::symlink(&target, dir.join(LOCK_FILE)).unwrap();
        let err = lock_data_dir(&dir).unwrap_err();
        assert!(matches!(err, LockError::Symlink(_)), "{err}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
    }
}

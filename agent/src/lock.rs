//! One agent per data directory: the lock file that a running agent holds (with its pid in it, for the error
//! another agent shows), and the read-only look at it that `endpoint-agent status` takes.

use std::fs::File;
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
}

/// Holds the data directory for this process; released when dropped (or when the process dies).
#[derive(Debug)]
pub struct DirLock(#[allow(dead_code)] File);

/// Takes the data directory's lock, or says which process holds it.
pub fn lock_data_dir(dir: &Path) -> Result<DirLock, LockError> {
    std::fs::create_dir_all(dir).map_err(|e| LockError::Io(dir.to_owned(), e))?;
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| LockError::Io(dir.to_owned(), e))?;
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
    Ok(DirLock(file))
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
}

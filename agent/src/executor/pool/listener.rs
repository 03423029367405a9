//! Where workers connect: the socket external workers use (`<data_dir>/workers.sock`, mode 0600, so only the
//! agent's user and root can reach it), and the hello every worker, external or the agent's own, must say
//! before it gets a task: the protocol version and the functions it serves, all of them pool functions of
//! this agent (and, for the agent's own, the one it was started for).

use super::protocol::{FromWorker, PROTOCOL_VERSION, Read, ToWorker, read_frame};
use super::supervisor::Process;
use super::{Handle, Lease, Pools};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};

/// How long a connected worker may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest hello accepted.
const MAX_HELLO: usize = 64 * 1024;

/// Binds a listening socket at `path` (a stale one from a dead agent is replaced), readable by its owner only.
pub(super) fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if std::fs::symlink_metadata(path).is_ok() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Accepts external workers until the pools stop.
pub(super) async fn accept_external(pools: Arc<Pools>, listener: UnixListener) {
    loop {
        let accepted = tokio::select! {
            _ = pools.stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                let pools = pools.clone();
                tokio::spawn(async move {
                    match handshake(&pools, stream, None, None).await {
                        Ok(lease) => {
                            tracing::info!(worker = %lease.handle.name, functions = ?lease.handle.functions, "an external worker connected");
                            pools.release(lease);
                        }
                        Err(e) => tracing::warn!(error = %e, "refused a worker"),
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept a worker connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The pid, name and functions of a hello this agent accepts, or why it refuses it.
fn check_hello(
    pools: &Pools,
    content: &[u8],
    expected: Option<&str>,
) -> Result<(u32, String, Vec<String>), String> {
    let (version, pid, name, functions) = match FromWorker::decode(content) {
        Ok(FromWorker::Hello {
            version,
            pid,
            name,
            functions,
        }) => (version, pid, name, functions),
        Ok(_) => return Err("the first frame must be a hello".into()),
        Err(e) => return Err(format!("a malformed hello: {e}")),
    };
    if version != PROTOCOL_VERSION {
        return Err(format!(
            "worker protocol version {version}: this agent speaks {PROTOCOL_VERSION}"
        ));
    }
    if functions.is_empty() {
        return Err("the hello names no function".into());
    }
    if let Some(unknown) = functions.iter().find(|f| !pools.specs.contains_key(*f)) {
        let served: Vec<&String> = pools.specs.keys().collect();
        return Err(format!(
            "{unknown:?} is not a pool function of this endpoint (its pool functions: {served:?})"
        ));
    }
    if let Some(f) = expected
        && !functions.iter().any(|g| g == f)
    {
        return Err(format!(
            "this worker was started for {f:?} but serves {functions:?}"
        ));
    }
    Ok((pid, name, functions))
}

/// Reads a worker's hello and answers it: a welcome and the worker, ready for a task, or a refusal (sent, then
/// the error). `expected`: the function the agent started this worker for.
pub(super) async fn handshake(
    pools: &Pools,
    mut stream: UnixStream,
    expected: Option<&str>,
    process: Option<Arc<Process>>,
) -> Result<Lease, String> {
    let hello = tokio::time::timeout(HELLO_TIMEOUT, read_frame(&mut stream, MAX_HELLO))
        .await
        .map_err(|_| format!("no hello within {HELLO_TIMEOUT:?}"))?
        .map_err(|e| format!("cannot read its hello: {e}"))?;
    let content = match hello {
        Read::Frame(c) => c,
        Read::TooLarge(n) => return Err(format!("its hello is {n} bytes")),
        Read::Closed => return Err("it closed the connection before its hello".into()),
    };
    let refusal = match check_hello(pools, &content, expected) {
        Ok(hello) => Ok(hello),
        Err(reason) => {
            let _ = stream
                .write_all(
                    &ToWorker::Refuse {
                        reason: reason.clone(),
                    }
                    .encode(),
                )
                .await;
            Err(reason)
        }
    };
    let (pid, name, functions) = refusal?;
    stream
        .write_all(
            &ToWorker::Welcome {
                version: PROTOCOL_VERSION,
            }
            .encode(),
        )
        .await
        .map_err(|e| format!("cannot welcome it: {e}"))?;
    let name = if name.is_empty() {
        format!("pid {pid}")
    } else {
        name
    };
    Ok(Lease {
        handle: Arc::new(Handle {
            name,
            functions,
            process,
            tasks: AtomicU64::new(0),
            retired: AtomicBool::new(false),
        }),
        stream,
    })
}

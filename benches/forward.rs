//! A TCP forwarder the bench opens on cue, for the replay measurement: before `open` nothing listens on the
//! reserved port, so an agent pointed at it gets "connection refused" and keeps retrying; after `open` every
//! connection is forwarded to the broker byte for byte. It never inspects or delays traffic.

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream};

/// A free local port, reserved by binding and releasing it (nothing listens on it afterwards).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("while reserving a local port")?;
    Ok(l.local_addr()
        .context("while reading the reserved port")?
        .port())
}

/// The open path; dropping it stops accepting and aborts forwarded connections.
pub struct Forwarder {
    accept: tokio::task::JoinHandle<()>,
}

impl Forwarder {
    /// Starts forwarding `127.0.0.1:port` to `upstream` (host:port).
    pub async fn open(port: u16, upstream: String) -> Result<Forwarder> {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| format!("while listening on 127.0.0.1:{port}"))?;
        let accept = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                conns.spawn(async move {
                    let Ok(mut server) = TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                });
            }
        });
        Ok(Forwarder { accept })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        // The JoinSet inside the accept task aborts its connections when the task is dropped.
        self.accept.abort();
    }
}

//! A TCP proxy between an agent and the broker, for fault injection. Modes: `Pass` forwards bytes; `Cut`
//! drops every open connection and every new one until the mode changes (a network outage; `cut()` is a
//! one-off: it drops the open ones and new ones go through); `Blackhole` keeps sockets open but forwards
//! nothing, so only AMQP heartbeats can notice. Counts the connections it accepted. Runs on the test's tokio
//! runtime.

use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Pass,
    Cut,
    Blackhole,
}

pub struct Proxy {
    pub addr: String,
    mode: watch::Sender<Mode>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
    accepted: Arc<std::sync::atomic::AtomicU64>,
}

impl Proxy {
    pub async fn start(upstream: String) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr").to_string();
        let (mode, mode_rx) = watch::channel(Mode::Pass);
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accepted: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        let accept = tokio::spawn({
            let conns = conns.clone();
            let accepted = accepted.clone();
            let mode_now = mode_rx.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if *mode_now.borrow() == Mode::Cut {
                        drop(client);
                        continue;
                    }
                    let upstream = upstream.clone();
                    let mode = mode_rx.clone();
                    let handle = tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(&upstream).await else {
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        tokio::join!(pump(cr, sw, mode.clone()), pump(sr, cw, mode));
                    });
                    conns.lock().expect("proxy lock").push(handle);
                }
            }
        });
        Proxy {
            addr,
            mode,
            conns,
            accept,
            accepted,
        }
    }

    /// Resets every connection open now (they are dropped: the agent sees a closed socket).
    pub fn cut(&self) {
        for h in self.conns.lock().expect("proxy lock").drain(..) {
            h.abort();
        }
    }

    /// `Cut` also drops the connections open now.
    pub fn set_mode(&self, mode: Mode) {
        self.mode.send_replace(mode);
        if mode == Mode::Cut {
            self.cut();
        }
    }

    /// Connections accepted so far (including those dropped in `Cut` mode): each one the agent opened.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // In blackhole mode read nothing, so nothing moves either way until the mode changes back.
        loop {
            match *mode.borrow_and_update() {
                Mode::Blackhole => {}
                Mode::Cut => return,
                Mode::Pass => break,
            }
            if mode.changed().await.is_err() {
                return;
            }
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            r = mode.changed() => { if r.is_err() { return } continue }
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

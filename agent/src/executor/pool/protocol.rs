//! The worker protocol's bytes (docs/worker-protocol.md): length-prefixed binary frames over a Unix stream
//! socket, no base64, no JSON. Every frame is a 4-byte big-endian length of what follows, then a 1-byte message
//! type, then the message's fields: short strings as a 2-byte big-endian length and UTF-8, integers
//! big-endian, and the payload (or output, or error text) as the rest of the frame. Pure: encoding and
//! decoding only, plus reading one frame from a stream with a size limit.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Version of the worker protocol, sent in `hello` and `welcome`.
pub const PROTOCOL_VERSION: u16 = 1;

/// Message types.
pub const HELLO: u8 = 1;
pub const WELCOME: u8 = 2;
pub const REFUSE: u8 = 3;
pub const TASK: u8 = 4;
pub const RESULT_OK: u8 = 5;
pub const RESULT_ERROR: u8 = 6;

/// What a worker sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FromWorker {
    /// The first frame: the protocol version it speaks, its process id, a name for logs, and the functions
    /// it serves.
    Hello {
        version: u16,
        pid: u32,
        name: String,
        functions: Vec<String>,
    },
    /// The task ran: its output.
    Ok { task_id: String, output: Vec<u8> },
    /// The task failed: why (a traceback's tail, for the reference worker).
    Error { task_id: String, message: String },
}

/// What the agent sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToWorker {
    /// The hello was accepted.
    Welcome { version: u16 },
    /// The hello was refused (then the agent closes the connection).
    Refuse { reason: String },
    /// Run this task and answer it with `Ok` or `Error`.
    Task {
        task_id: String,
        attempt: u32,
        function: String,
        timeout_ms: u64,
        payload: Vec<u8>,
    },
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(usize::from(u16::MAX))];
    out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// A whole frame (length prefix included) for `kind` with `body`.
fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.extend_from_slice(&((body.len() + 1) as u32).to_be_bytes());
    out.push(kind);
    out.extend_from_slice(body);
    out
}

impl ToWorker {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let kind = match self {
            ToWorker::Welcome { version } => {
                body.extend_from_slice(&version.to_be_bytes());
                WELCOME
            }
            ToWorker::Refuse { reason } => {
                put_str(&mut body, reason);
                REFUSE
            }
            ToWorker::Task {
                task_id,
                attempt,
                function,
                timeout_ms,
                payload,
            } => {
                body.reserve(payload.len() + task_id.len() + function.len() + 16);
                put_str(&mut body, task_id);
                body.extend_from_slice(&attempt.to_be_bytes());
                put_str(&mut body, function);
                body.extend_from_slice(&timeout_ms.to_be_bytes());
                body.extend_from_slice(payload);
                TASK
            }
        };
        frame(kind, &body)
    }
}

impl FromWorker {
    /// A worker's frame (the agent never sends one: for tests).
    #[cfg(test)]
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let kind = match self {
            FromWorker::Hello {
                version,
                pid,
                name,
                functions,
            } => {
                body.extend_from_slice(&version.to_be_bytes());
                body.extend_from_slice(&pid.to_be_bytes());
                put_str(&mut body, name);
                body.extend_from_slice(&(functions.len() as u16).to_be_bytes());
                for f in functions {
                    put_str(&mut body, f);
                }
                HELLO
            }
            FromWorker::Ok { task_id, output } => {
                put_str(&mut body, task_id);
                body.extend_from_slice(output);
                RESULT_OK
            }
            FromWorker::Error { task_id, message } => {
                put_str(&mut body, task_id);
                body.extend_from_slice(message.as_bytes());
                RESULT_ERROR
            }
        };
        frame(kind, &body)
    }

    /// Decodes a frame's content (the bytes after the length prefix).
    pub fn decode(content: &[u8]) -> Result<FromWorker, String> {
        let (&kind, mut rest) = content.split_first().ok_or("an empty frame")?;
        Ok(match kind {
            HELLO => {
                let version = u16_of(&mut rest)?;
                let pid = u32::from_be_bytes(take(&mut rest, 4)?.try_into().map_err(|_| "pid")?);
                let name = str_of(&mut rest)?;
                let n = u16_of(&mut rest)?;
                let functions = (0..n)
                    .map(|_| str_of(&mut rest))
                    .collect::<Result<_, _>>()?;
                FromWorker::Hello {
                    version,
                    pid,
                    name,
                    functions,
                }
            }
            RESULT_OK => FromWorker::Ok {
                task_id: str_of(&mut rest)?,
                output: rest.to_vec(),
            },
            RESULT_ERROR => FromWorker::Error {
                task_id: str_of(&mut rest)?,
                message: String::from_utf8_lossy(rest).into_owned(),
            },
            other => return Err(format!("unknown message type {other}")),
        })
    }
}

fn take<'a>(b: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    if b.len() < n {
        return Err("a truncated frame".into());
    }
    let (head, tail) = b.split_at(n);
    *b = tail;
    Ok(head)
}

fn u16_of(b: &mut &[u8]) -> Result<u16, String> {
    Ok(u16::from_be_bytes(
        take(b, 2)?.try_into().map_err(|_| "u16")?,
    ))
}

fn str_of(b: &mut &[u8]) -> Result<String, String> {
    let n = usize::from(u16_of(b)?);
    String::from_utf8(take(b, n)?.to_vec()).map_err(|_| "a string that is not UTF-8".into())
}

/// What reading a frame found.
#[derive(Debug)]
pub enum Read {
    /// A frame's content (type and fields).
    Frame(Vec<u8>),
    /// A frame larger than `max`: its bytes were read and dropped.
    TooLarge(usize),
    /// The peer closed the connection between frames.
    Closed,
}

/// Reads one frame of at most `max` content bytes; a larger one is read and dropped (the stream stays in step).
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> std::io::Result<Read> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(Read::Closed),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        let mut left = len as u64;
        const CHUNK: usize = 64 * 1024;
        let mut sink = vec![0u8; CHUNK];
        while left > 0 {
            let n = r.read(&mut sink[..left.min(CHUNK as u64) as usize]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            left -= n as u64;
        }
        return Ok(Read::TooLarge(len));
    }
    let mut content = vec![0u8; len];
    r.read_exact(&mut content).await?;
    Ok(Read::Frame(content))
}

/// Decodes an agent frame (what a worker does: for tests).
#[cfg(test)]
pub fn decode_to_worker(content: &[u8]) -> Result<ToWorker, String> {
    let (&kind, mut rest) = content.split_first().ok_or("an empty frame")?;
    Ok(match kind {
        WELCOME => ToWorker::Welcome {
            version: u16_of(&mut rest)?,
        },
        REFUSE => ToWorker::Refuse {
            reason: str_of(&mut rest)?,
        },
        TASK => {
            let task_id = str_of(&mut rest)?;
            let attempt =
                u32::from_be_bytes(take(&mut rest, 4)?.try_into().map_err(|_| "attempt")?);
            let function = str_of(&mut rest)?;
            let timeout_ms =
                u64::from_be_bytes(take(&mut rest, 8)?.try_into().map_err(|_| "timeout")?);
            ToWorker::Task {
                task_id,
                attempt,
                function,
                timeout_ms,
                payload: rest.to_vec(),
            }
        }
        other => return Err(format!("unknown message type {other}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(frame: &[u8]) -> &[u8] {
        let len = u32::from_be_bytes(frame[..4].try_into().unwrap()) as usize;
        assert_eq!(len, frame.len() - 4);
        &frame[4..]
    }

    #[test]
    fn messages_round_trip_byte_for_byte() {
        for m in [
            FromWorker::Hello {
                version: 1,
                pid: 42,
                name: "w".into(),
                functions: vec!["a".into(), "b".into()],
            },
            FromWorker::Ok {
                task_id: "t".into(),
                output: vec![0, 0xff, 0xfe],
            },
            FromWorker::Ok {
                task_id: "t".into(),
                output: Vec::new(),
            },
            FromWorker::Error {
                task_id: "t".into(),
                message: "Traceback".into(),
            },
        ] {
            assert_eq!(FromWorker::decode(content(&m.encode())).unwrap(), m);
        }
        for m in [
            ToWorker::Welcome { version: 1 },
            ToWorker::Refuse {
                reason: "no".into(),
            },
            ToWorker::Task {
                task_id: "t".into(),
                attempt: 2,
                function: "f".into(),
                timeout_ms: 600_000,
                payload: vec![0xff; 1 << 20],
            },
        ] {
            assert_eq!(decode_to_worker(content(&m.encode())).unwrap(), m);
        }
        assert!(FromWorker::decode(&[HELLO, 0]).is_err());
        assert!(FromWorker::decode(&[99]).is_err());
    }

    #[tokio::test]
    async fn frames_over_the_limit_are_skipped() {
        let big = FromWorker::Ok {
            task_id: "t".into(),
            output: vec![7; 100_000],
        }
        .encode();
        let small = FromWorker::Error {
            task_id: "u".into(),
            message: "x".into(),
        }
        .encode();
        let bytes = [big, small].concat();
        let mut r = bytes.as_slice();
        assert!(matches!(
            read_frame(&mut r, 1000).await.unwrap(),
            Read::TooLarge(_)
        ));
        let Read::Frame(c) = read_frame(&mut r, 1000).await.unwrap() else {
            panic!("the next frame")
        };
        assert!(matches!(
            FromWorker::decode(&c).unwrap(),
            FromWorker::Error { .. }
        ));
        assert!(matches!(
            read_frame(&mut r, 1000).await.unwrap(),
            Read::Closed
        ));
    }
}

//! A minimal AMQP 0-9-1 client of our own, for the messages lapin cannot read. lapin (through amq-protocol)
//! parses every short string as UTF-8 and knows a fixed set of field-table types; a delivery whose
//! `message_id`, `type` or a header key is not UTF-8, or whose headers hold an unknown type byte, is a parse
//! error that kills the whole connection, and the broker hands the same message back at every reconnect. This
//! client reads such a message byte by byte and leniently (`basic.get`), so the subscriber can answer or drop
//! it, and it publishes arbitrary property bytes, so tests can produce such messages. It speaks only what
//! that needs: PLAIN login, one channel, `basic.get` / `ack` / `nack`, and confirmed `basic.publish`. No lapin
//! here: it must not share the parser it works around. No TLS (the agent's lapin build has none either).

use crate::connection::BrokerUrl;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// How long any one exchange with the broker may take.
const IO_TIMEOUT: Duration = Duration::from_secs(15);
const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
const CHANNEL: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
    #[error("no answer from the broker within {IO_TIMEOUT:?} {0}")]
    Timeout(&'static str),
    #[error("the broker closed the {0} ({1} {2})")]
    Closed(&'static str, u16, String),
    #[error("unexpected AMQP frame {0}")]
    Protocol(String),
}

/// The properties of a message as raw bytes, so that any byte string can be sent (tests) or read (agent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawProperties {
    pub message_id: Option<Vec<u8>>,
    /// The AMQP `type` property: the function name.
    pub kind: Option<Vec<u8>>,
    /// The encoded field-table entries of the headers, without the table's 4-byte length prefix.
    pub headers: Option<Vec<u8>>,
    pub delivery_mode: Option<u8>,
}

/// One message fetched with `basic.get`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawMessage {
    pub delivery_tag: u64,
    pub redelivered: bool,
    pub properties: RawProperties,
    pub body: Vec<u8>,
}

/// A header value, as far as the agent cares: integers and strings (for `x-timeout-ms`), everything else by its
/// type byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldValue {
    Int(i128),
    Bytes(Vec<u8>),
    Other(char),
}

/// One field-table entry: `key` (short string), `field_type`, and `value` already encoded for that type.
pub fn table_entry(key: &[u8], field_type: u8, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(key.len() + value.len() + 2);
    short_str(&mut out, key);
    out.push(field_type);
    out.extend_from_slice(value);
    out
}

/// Reads the entries of a field table (without its length prefix). Fails on a type byte AMQP 0-9-1 (as
/// RabbitMQ speaks it) does not define, or on a truncated table.
pub fn parse_table(mut t: &[u8]) -> Result<Vec<(Vec<u8>, FieldValue)>, String> {
    let mut out = Vec::new();
    while !t.is_empty() {
        let key = take_short(&mut t).ok_or("truncated header key")?.to_vec();
        let value = parse_value(&mut t)?;
        out.push((key, value));
    }
    Ok(out)
}

fn parse_value(t: &mut &[u8]) -> Result<FieldValue, String> {
    let kind = *take(t, 1)
        .ok_or("truncated header value")?
        .first()
        .unwrap_or(&0);
    let int = |b: &[u8], signed: bool| {
        let mut v: i128 = 0;
        for byte in b {
            v = (v << 8) | i128::from(*byte);
        }
        if signed && b.first().is_some_and(|f| f & 0x80 != 0) {
            v -= 1i128 << (8 * b.len());
        }
        FieldValue::Int(v)
    };
    Ok(match kind {
        b't' | b'B' => int(fixed(t, 1)?, false),
        b'b' => int(fixed(t, 1)?, true),
        b's' => int(fixed(t, 2)?, true),
        b'u' => int(fixed(t, 2)?, false),
        b'I' => int(fixed(t, 4)?, true),
        b'i' => int(fixed(t, 4)?, false),
        b'l' => int(fixed(t, 8)?, true),
        b'T' => int(fixed(t, 8)?, false),
        b'f' => fixed(t, 4).map(|_| FieldValue::Other('f'))?,
        b'd' => fixed(t, 8).map(|_| FieldValue::Other('d'))?,
        b'D' => fixed(t, 5).map(|_| FieldValue::Other('D'))?,
        b'V' => FieldValue::Other('V'),
        b'S' | b'x' => FieldValue::Bytes(take_long(t).ok_or("truncated header value")?.to_vec()),
        b'A' | b'F' => {
            let inner = take_long(t).ok_or("truncated header value")?;
            if kind == b'F' {
                parse_table(inner)?;
            } else {
                let mut a = inner;
                while !a.is_empty() {
                    parse_value(&mut a)?;
                }
            }
            FieldValue::Other(char::from(kind))
        }
        other => {
            return Err(format!(
                "unknown header field type {:?} (byte 0x{other:02x})",
                char::from(other)
            ));
        }
    })
}

fn fixed<'a>(t: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
    take(t, n).ok_or_else(|| "truncated header value".to_owned())
}

fn take<'a>(t: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if t.len() < n {
        return None;
    }
    let (head, rest) = t.split_at(n);
    *t = rest;
    Some(head)
}

fn take_short<'a>(t: &mut &'a [u8]) -> Option<&'a [u8]> {
    let n = usize::from(*take(t, 1)?.first()?);
    take(t, n)
}

fn take_long<'a>(t: &mut &'a [u8]) -> Option<&'a [u8]> {
    let n = u32::from_be_bytes(take(t, 4)?.try_into().ok()?);
    take(t, usize::try_from(n).ok()?)
}

fn take_u16(t: &mut &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(take(t, 2)?.try_into().ok()?))
}

fn take_u32(t: &mut &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(take(t, 4)?.try_into().ok()?))
}

fn take_u64(t: &mut &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(take(t, 8)?.try_into().ok()?))
}

fn short_str(out: &mut Vec<u8>, s: &[u8]) {
    // Short strings hold at most 255 bytes; longer input is cut (only tests send arbitrary bytes).
    let s = &s[..s.len().min(255)];
    out.push(s.len() as u8);
    out.extend_from_slice(s);
}

fn long_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

fn method(class: u16, id: u16, args: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(args.len() + 4);
    out.extend_from_slice(&class.to_be_bytes());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(args);
    out
}

/// A frame as read: type, channel, payload.
struct Frame {
    kind: u8,
    channel: u16,
    payload: Vec<u8>,
}

impl Frame {
    /// (class, method, arguments) of a method frame.
    fn method(&self) -> Option<(u16, u16, &[u8])> {
        if self.kind != FRAME_METHOD || self.payload.len() < 4 {
            return None;
        }
        let p = &self.payload;
        Some((
            u16::from_be_bytes([p[0], p[1]]),
            u16::from_be_bytes([p[2], p[3]]),
            &p[4..],
        ))
    }
}

/// One connection with one channel open.
pub struct RawConnection {
    stream: BufReader<TcpStream>,
    frame_max: usize,
    confirming: bool,
}

impl RawConnection {
    /// Connects, logs in with PLAIN and opens channel 1 on the URL's vhost. The AMQP heartbeat is off: these
    /// connections live for a few round trips.
    pub async fn open(url: &BrokerUrl, name: &str) -> Result<RawConnection, RawError> {
        let parts = url.parts();
        let tcp = tokio::time::timeout(
            IO_TIMEOUT,
            TcpStream::connect((parts.host.as_str(), parts.port)),
        )
        .await
        .map_err(|_| RawError::Timeout("while connecting"))?
        .map_err(|e| RawError::Io("while connecting", e))?;
        let _ = tcp.set_nodelay(true);
        let mut conn = RawConnection {
            stream: BufReader::new(tcp),
            frame_max: 131_072,
            confirming: false,
        };
        conn.write_raw(b"AMQP\x00\x00\x09\x01").await?;
        conn.expect(0, (10, 10), "connection.start").await?;
        let mut client = Vec::new();
        for (k, v) in [
            ("product", "endpoint-agent raw reader"),
            ("connection_name", name),
        ] {
            client.extend(table_entry(k.as_bytes(), b'S', &{
                let mut s = Vec::new();
                long_str(&mut s, v.as_bytes());
                s
            }));
        }
        let mut args = Vec::new();
        long_str(&mut args, &client);
        short_str(&mut args, b"PLAIN");
        let response = format!("\0{}\0{}", parts.user, parts.password);
        long_str(&mut args, response.as_bytes());
        short_str(&mut args, b"en_US");
        conn.send_method(0, 10, 11, &args).await?;
        let tune = conn.expect(0, (10, 30), "connection.tune").await?;
        let mut t = tune.as_slice();
        let channel_max = take_u16(&mut t).unwrap_or(0);
        let frame_max = take_u32(&mut t).unwrap_or(0);
        if frame_max >= 4096 {
            conn.frame_max = frame_max as usize;
        }
        let mut args = Vec::new();
        args.extend_from_slice(&channel_max.to_be_bytes());
        args.extend_from_slice(&(conn.frame_max as u32).to_be_bytes());
        args.extend_from_slice(&0u16.to_be_bytes());
        conn.send_method(0, 10, 31, &args).await?;
        let mut args = Vec::new();
        short_str(&mut args, parts.vhost.as_bytes());
        short_str(&mut args, b"");
        args.push(0);
        conn.send_method(0, 10, 40, &args).await?;
        conn.expect(0, (10, 41), "connection.open-ok").await?;
        conn.send_method(CHANNEL, 20, 10, &[0]).await?;
        conn.expect(CHANNEL, (20, 11), "channel.open-ok").await?;
        Ok(conn)
    }

    /// Publishes `body` with `props` and waits for the broker's confirm (the channel is put in confirm mode on
    /// the first publish).
    pub async fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        props: &RawProperties,
        body: &[u8],
    ) -> Result<(), RawError> {
        if !self.confirming {
            self.send_method(CHANNEL, 85, 10, &[0]).await?;
            self.expect(CHANNEL, (85, 11), "confirm.select-ok").await?;
            self.confirming = true;
        }
        let mut args = vec![0, 0];
        short_str(&mut args, exchange.as_bytes());
        short_str(&mut args, routing_key.as_bytes());
        args.push(0);
        self.send_method(CHANNEL, 60, 40, &args).await?;
        let mut header = Vec::new();
        header.extend_from_slice(&60u16.to_be_bytes());
        header.extend_from_slice(&0u16.to_be_bytes());
        header.extend_from_slice(&(body.len() as u64).to_be_bytes());
        let mut flags = 0u16;
        let mut list = Vec::new();
        if let Some(h) = &props.headers {
            flags |= 1 << 13;
            long_str(&mut list, h);
        }
        if let Some(m) = props.delivery_mode {
            flags |= 1 << 12;
            list.push(m);
        }
        if let Some(id) = &props.message_id {
            flags |= 1 << 7;
            short_str(&mut list, id);
        }
        if let Some(kind) = &props.kind {
            flags |= 1 << 5;
            short_str(&mut list, kind);
        }
        header.extend_from_slice(&flags.to_be_bytes());
        header.extend_from_slice(&list);
        self.write_frame(FRAME_HEADER, CHANNEL, &header).await?;
        for chunk in body.chunks(self.frame_max - 8) {
            self.write_frame(FRAME_BODY, CHANNEL, chunk).await?;
        }
        loop {
            let frame = self.read_frame().await?;
            match frame.method() {
                Some((60, 80, _)) => return Ok(()),
                Some((60, 120, _)) => {
                    return Err(RawError::Protocol(
                        "basic.nack: the broker refused the message".into(),
                    ));
                }
                _ => self.other_frame(&frame).await?,
            }
        }
    }

    /// Fetches the next message of `queue` (unacked), or `None` when the queue is empty.
    pub async fn get(&mut self, queue: &str) -> Result<Option<RawMessage>, RawError> {
        let mut args = vec![0, 0];
        short_str(&mut args, queue.as_bytes());
        args.push(0);
        self.send_method(CHANNEL, 60, 70, &args).await?;
        let (delivery_tag, redelivered) = loop {
            let frame = self.read_frame().await?;
            match frame.method() {
                Some((60, 71, a)) => {
                    let mut a = a;
                    let tag = take_u64(&mut a).ok_or_else(|| bad("basic.get-ok"))?;
                    let redelivered = take(&mut a, 1).is_some_and(|b| b[0] & 1 == 1);
                    break (tag, redelivered);
                }
                Some((60, 72, _)) => return Ok(None),
                _ => self.other_frame(&frame).await?,
            }
        };
        let header = self.read_frame().await?;
        if header.kind != FRAME_HEADER {
            return Err(bad("content header"));
        }
        let (size, properties) = parse_content_header(&header.payload)?;
        let mut body = Vec::with_capacity(usize::try_from(size).unwrap_or(0).min(1 << 24));
        while (body.len() as u64) < size {
            let frame = self.read_frame().await?;
            if frame.kind != FRAME_BODY {
                return Err(bad("content body"));
            }
            body.extend_from_slice(&frame.payload);
        }
        Ok(Some(RawMessage {
            delivery_tag,
            redelivered,
            properties,
            body,
        }))
    }

    pub async fn ack(&mut self, delivery_tag: u64) -> Result<(), RawError> {
        let mut args = delivery_tag.to_be_bytes().to_vec();
        args.push(0);
        self.send_method(CHANNEL, 60, 80, &args).await
    }

    /// Hands a fetched message back to the queue.
    pub async fn requeue(&mut self, delivery_tag: u64) -> Result<(), RawError> {
        let mut args = delivery_tag.to_be_bytes().to_vec();
        args.push(0b10);
        self.send_method(CHANNEL, 60, 120, &args).await
    }

    /// Closes the connection politely (unacked messages go back to the queue); errors are of no interest here.
    pub async fn close(mut self) {
        let mut args = 200u16.to_be_bytes().to_vec();
        short_str(&mut args, b"done");
        args.extend_from_slice(&[0, 0, 0, 0]);
        if self.send_method(0, 10, 50, &args).await.is_ok() {
            for _ in 0..16 {
                match self.read_frame().await {
                    Ok(f) if f.method() == Some((10, 51, &[][..])) => break,
                    Ok(_) => continue,
                    Err(_) => break,
                }
            }
        }
    }

    async fn expect(
        &mut self,
        channel: u16,
        want: (u16, u16),
        what: &'static str,
    ) -> Result<Vec<u8>, RawError> {
        loop {
            let frame = self.read_frame().await?;
            if let Some((c, m, args)) = frame.method()
                && frame.channel == channel
                && (c, m) == want
            {
                return Ok(args.to_vec());
            }
            self.other_frame(&frame).await.map_err(|e| match e {
                RawError::Protocol(f) => {
                    RawError::Protocol(format!("{f} while waiting for {what}"))
                }
                e => e,
            })?;
        }
    }

    /// Deals with a frame nobody waited for: heartbeats and (un)blocked notices are ignored, a close is
    /// answered and reported, anything else is a protocol error.
    async fn other_frame(&mut self, frame: &Frame) -> Result<(), RawError> {
        if frame.kind == FRAME_HEARTBEAT {
            return Ok(());
        }
        match frame.method() {
            Some((10, 60 | 61, _)) => Ok(()),
            Some((class @ (10 | 20), 50 | 40, args)) => {
                let mut a = args;
                let code = take_u16(&mut a).unwrap_or(0);
                let text = take_short(&mut a)
                    .map(|t| String::from_utf8_lossy(t).into_owned())
                    .unwrap_or_default();
                let (what, ok_method) = if class == 10 {
                    ("connection", 51)
                } else {
                    ("channel", 41)
                };
                let _ = self.send_method(frame.channel, class, ok_method, &[]).await;
                Err(RawError::Closed(what, code, text))
            }
            Some((c, m, _)) => Err(RawError::Protocol(format!("method {c}.{m}"))),
            None => Err(RawError::Protocol(format!("of type {}", frame.kind))),
        }
    }

    async fn send_method(
        &mut self,
        channel: u16,
        class: u16,
        id: u16,
        args: &[u8],
    ) -> Result<(), RawError> {
        self.write_frame(FRAME_METHOD, channel, &method(class, id, args))
            .await
    }

    async fn write_frame(
        &mut self,
        kind: u8,
        channel: u16,
        payload: &[u8],
    ) -> Result<(), RawError> {
        let mut frame = Vec::with_capacity(payload.len() + 8);
        frame.push(kind);
        frame.extend_from_slice(&channel.to_be_bytes());
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        frame.push(FRAME_END);
        self.write_raw(&frame).await
    }

    async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), RawError> {
        tokio::time::timeout(IO_TIMEOUT, self.stream.get_mut().write_all(bytes))
            .await
            .map_err(|_| RawError::Timeout("while sending"))?
            .map_err(|e| RawError::Io("while sending", e))
    }

    async fn read_frame(&mut self) -> Result<Frame, RawError> {
        let read = async {
            let mut head = [0u8; 7];
            self.stream.read_exact(&mut head).await?;
            let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
            if size > self.frame_max.max(131_072) {
                return Err(std::io::Error::other(format!(
                    "frame of {size} bytes is over frame_max"
                )));
            }
            let mut payload = vec![0u8; size + 1];
            self.stream.read_exact(&mut payload).await?;
            if payload.pop() != Some(FRAME_END) {
                return Err(std::io::Error::other("frame does not end with 0xCE"));
            }
            Ok(Frame {
                kind: head[0],
                channel: u16::from_be_bytes([head[1], head[2]]),
                payload,
            })
        };
        tokio::time::timeout(IO_TIMEOUT, read)
            .await
            .map_err(|_| RawError::Timeout("while reading"))?
            .map_err(|e| RawError::Io("while reading", e))
    }
}

fn bad(what: &str) -> RawError {
    RawError::Protocol(format!("{what} is malformed"))
}

/// Body size and properties from a content header frame's payload. Property values are kept as bytes; only
/// the ones the agent reads are returned.
fn parse_content_header(p: &[u8]) -> Result<(u64, RawProperties), RawError> {
    let mut t = p;
    take(&mut t, 4).ok_or_else(|| bad("content header"))?;
    let size = take_u64(&mut t).ok_or_else(|| bad("content header"))?;
    let flags = take_u16(&mut t).ok_or_else(|| bad("content header"))?;
    let mut props = RawProperties::default();
    let short = |t: &mut &[u8]| {
        take_short(t)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| bad("a property"))
    };
    for bit in (2..=15).rev() {
        if flags & (1 << bit) == 0 {
            continue;
        }
        match bit {
            13 => {
                props.headers = Some(
                    take_long(&mut t)
                        .ok_or_else(|| bad("the headers"))?
                        .to_vec(),
                )
            }
            12 => props.delivery_mode = take(&mut t, 1).map(|b| b[0]),
            11 => {
                take(&mut t, 1).ok_or_else(|| bad("priority"))?;
            }
            7 => props.message_id = Some(short(&mut t)?),
            6 => {
                take(&mut t, 8).ok_or_else(|| bad("timestamp"))?;
            }
            5 => props.kind = Some(short(&mut t)?),
            _ => {
                short(&mut t)?;
            }
        }
    }
    Ok((size, props))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(entries: &[u8], expected: Result<Vec<(&[u8], FieldValue)>, &str>) {
        let got = parse_table(entries);
        match (got, expected) {
            (Ok(got), Ok(want)) => {
                let want: Vec<(Vec<u8>, FieldValue)> =
                    want.into_iter().map(|(k, v)| (k.to_vec(), v)).collect();
                assert_eq!(got, want);
            }
            (Err(got), Err(want)) => assert!(got.contains(want), "{got:?} lacks {want:?}"),
            (got, want) => panic!("got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn tables() {
        let mut long = Vec::new();
        long_str(&mut long, b"250");
        check(
            &table_entry(b"x-timeout-ms", b'l', &250i64.to_be_bytes()),
            Ok(vec![(b"x-timeout-ms", FieldValue::Int(250))]),
        );
        check(
            &table_entry(b"n", b's', &(-2i16).to_be_bytes()),
            Ok(vec![(b"n", FieldValue::Int(-2))]),
        );
        check(
            &table_entry(b"n", b'i', &u32::MAX.to_be_bytes()),
            Ok(vec![(b"n", FieldValue::Int(i128::from(u32::MAX)))]),
        );
        check(
            &table_entry(b"s", b'S', &long),
            Ok(vec![(b"s", FieldValue::Bytes(b"250".to_vec()))]),
        );
        let two = [
            table_entry(b"\xff\xfe", b'V', &[]),
            table_entry(b"d", b'd', &1.5f64.to_be_bytes()),
        ]
        .concat();
        check(
            &two,
            Ok(vec![
                (b"\xff\xfe", FieldValue::Other('V')),
                (b"d", FieldValue::Other('d')),
            ]),
        );
        let nested = table_entry(
            b"t",
            b'F',
            &[
                &4u32.to_be_bytes()[..],
                &table_entry(b"v", b'V', &[])[..1],
                &[],
            ]
            .concat(),
        );
        check(&nested, Err("truncated"));
        check(
            &table_entry(b"k", b'U', &[1, 2]),
            Err("unknown header field type 'U'"),
        );
        check(&table_entry(b"k", b'l', &[1, 2]), Err("truncated"));
    }

    #[test]
    fn content_headers() {
        let mut p = vec![0, 60, 0, 0];
        p.extend_from_slice(&5u64.to_be_bytes());
        let flags: u16 = (1 << 15) | (1 << 13) | (1 << 12) | (1 << 7) | (1 << 6) | (1 << 5);
        p.extend_from_slice(&flags.to_be_bytes());
        short_str(&mut p, b"text/plain");
        long_str(&mut p, &table_entry(b"k", b'V', &[]));
        p.push(2);
        short_str(&mut p, b"id\xff");
        p.extend_from_slice(&7u64.to_be_bytes());
        short_str(&mut p, b"echo");
        let (size, props) = parse_content_header(&p).unwrap();
        assert_eq!(size, 5);
        assert_eq!(props.message_id.as_deref(), Some(&b"id\xff"[..]));
        assert_eq!(props.kind.as_deref(), Some(&b"echo"[..]));
        assert_eq!(props.delivery_mode, Some(2));
        assert_eq!(props.headers, Some(table_entry(b"k", b'V', &[])));
        assert!(parse_content_header(&p[..p.len() - 2]).is_err());
    }
}

#[cfg(test)]
mod broker_tests {
    //! Against the real RabbitMQ (AMQP_URL, default the local one): what lapin cannot read goes through here.
    use super::*;
    use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
    use lapin::types::FieldTable;

    fn url() -> BrokerUrl {
        let url = std::env::var("AMQP_URL")
            .unwrap_or_else(|_| crate::connection::DEFAULT_BROKER_URL.to_owned());
        BrokerUrl::new(url).expect("AMQP_URL is a valid AMQP URL")
    }

    #[tokio::test]
    async fn publishes_and_gets_bytes_lapin_cannot_parse() {
        let queue = format!("raw-test-{}-{}", std::process::id(), crate::wire::now_ms());
        let conn = crate::connection::connect(&url(), "raw test")
            .await
            .unwrap_or_else(|e| {
                panic!("{e}: these tests need RabbitMQ (`rabbitmq-server -detached`) or AMQP_URL")
            });
        let channel = conn.create_channel().await.expect("channel");
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("declare");
        let mut raw = RawConnection::open(&url(), "raw test")
            .await
            .expect("raw connect");
        let props = RawProperties {
            message_id: Some(b"id-\xff\xfe".to_vec()),
            kind: Some(b"ech\xc3".to_vec()),
            headers: Some(table_entry(b"k\xff", b'l', &5i64.to_be_bytes())),
            delivery_mode: Some(2),
        };
        let body = vec![7u8; 300_000];
        raw.publish("", &queue, &props, &body)
            .await
            .expect("publish");
        let got = raw.get(&queue).await.expect("get").expect("a message");
        assert_eq!(
            (got.properties, got.body.len(), got.redelivered),
            (props, body.len(), false)
        );
        raw.requeue(got.delivery_tag).await.expect("requeue");
        let again = raw
            .get(&queue)
            .await
            .expect("get")
            .expect("the message again");
        assert!(again.redelivered);
        raw.ack(again.delivery_tag).await.expect("ack");
        assert_eq!(raw.get(&queue).await.expect("get"), None);
        raw.close().await;
        let _ = channel
            .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}

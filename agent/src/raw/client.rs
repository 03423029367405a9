//! One raw AMQP connection with one channel: open (PLAIN login), confirmed publish, `basic.get`, ack, requeue,
//! close. Every exchange with the broker has a timeout; frames nobody waits for (heartbeats, blocked notices)
//! are skipped, a close from the broker is answered and reported.

use super::codec::*;
use crate::limits::RAW_IO_TIMEOUT;
use endpoint_wire::BrokerUrl;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The one channel a raw connection opens.
const CHANNEL: u16 = 1;
/// Channel 0 carries the connection's own methods.
const CONNECTION_CHANNEL: u16 = 0;

#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
    #[error("no answer from the broker within {RAW_IO_TIMEOUT:?} {0}")]
    Timeout(&'static str),
    #[error("the broker closed the {0} ({1} {2})")]
    Closed(&'static str, u16, String),
    #[error("unexpected AMQP frame {0}")]
    Protocol(String),
}

/// One connection with one channel open.
pub struct RawConnection {
    stream: BufReader<TcpStream>,
    frame_max: usize,
    confirming: bool,
}

fn long_string_value(v: &str) -> Vec<u8> {
    let mut s = Vec::new();
    long_str(&mut s, v.as_bytes());
    s
}

impl RawConnection {
    /// Connects, logs in with PLAIN and opens channel 1 on the URL's vhost. The AMQP heartbeat is off: these
    /// connections live for a few round trips.
    pub async fn open(url: &BrokerUrl, name: &str) -> Result<RawConnection, RawError> {
        let parts = url.parts();
        let tcp = tokio::time::timeout(
            RAW_IO_TIMEOUT,
            TcpStream::connect((parts.host.as_str(), parts.port)),
        )
        .await
        .map_err(|_| RawError::Timeout("while connecting"))?
        .map_err(|e| RawError::Io("while connecting", e))?;
        let _ = tcp.set_nodelay(true);
        let mut conn = RawConnection {
            stream: BufReader::new(tcp),
            frame_max: DEFAULT_FRAME_MAX,
            confirming: false,
        };
        conn.write_raw(PROTOCOL_HEADER).await?;
        conn.expect(CONNECTION_CHANNEL, CONNECTION_START, "connection.start")
            .await?;
        let mut client = Vec::new();
        for (k, v) in [
            ("product", "endpoint-agent raw reader"),
            ("connection_name", name),
        ] {
            client.extend(table_entry(
                k.as_bytes(),
                FIELD_LONG_STRING,
                &long_string_value(v),
            ));
        }
        let mut args = Vec::new();
        long_str(&mut args, &client);
        short_str(&mut args, b"PLAIN");
        let response = format!("\0{}\0{}", parts.user, parts.password);
        long_str(&mut args, response.as_bytes());
        short_str(&mut args, b"en_US");
        conn.send_method(CONNECTION_CHANNEL, CONNECTION_START_OK, &args)
            .await?;
        let tune = conn
            .expect(CONNECTION_CHANNEL, CONNECTION_TUNE, "connection.tune")
            .await?;
        let mut t = tune.as_slice();
        let channel_max = take_u16(&mut t).unwrap_or(0);
        let frame_max = take_u32(&mut t).unwrap_or(0) as usize;
        if frame_max >= MIN_FRAME_MAX {
            conn.frame_max = frame_max;
        }
        let mut args = Vec::new();
        args.extend_from_slice(&channel_max.to_be_bytes());
        args.extend_from_slice(&(conn.frame_max as u32).to_be_bytes());
        args.extend_from_slice(&0u16.to_be_bytes()); // heartbeat: off
        conn.send_method(CONNECTION_CHANNEL, CONNECTION_TUNE_OK, &args)
            .await?;
        let mut args = Vec::new();
        short_str(&mut args, parts.vhost.as_bytes());
        short_str(&mut args, b""); // reserved
        args.push(NO_BITS); // reserved
        conn.send_method(CONNECTION_CHANNEL, CONNECTION_OPEN, &args)
            .await?;
        conn.expect(CONNECTION_CHANNEL, CONNECTION_OPEN_OK, "connection.open-ok")
            .await?;
        conn.send_method(CHANNEL, CHANNEL_OPEN, &[NO_BITS]).await?;
        conn.expect(CHANNEL, CHANNEL_OPEN_OK, "channel.open-ok")
            .await?;
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
            self.send_method(CHANNEL, CONFIRM_SELECT, &[NO_BITS])
                .await?;
            self.expect(CHANNEL, CONFIRM_SELECT_OK, "confirm.select-ok")
                .await?;
            self.confirming = true;
        }
        let mut args = vec![0, 0]; // reserved ticket
        short_str(&mut args, exchange.as_bytes());
        short_str(&mut args, routing_key.as_bytes());
        args.push(NO_BITS);
        self.send_method(CHANNEL, BASIC_PUBLISH, &args).await?;
        let header = encode_content_header(body.len(), props);
        self.write_frame(FRAME_HEADER, CHANNEL, &header).await?;
        for chunk in body.chunks(self.frame_max - FRAME_OVERHEAD) {
            self.write_frame(FRAME_BODY, CHANNEL, chunk).await?;
        }
        loop {
            let frame = self.read_frame().await?;
            if frame.is(BASIC_ACK) {
                return Ok(());
            }
            if frame.is(BASIC_NACK) {
                return Err(RawError::Protocol(
                    "basic.nack: the broker refused the message".into(),
                ));
            }
            self.other_frame(&frame).await?;
        }
    }

    /// Fetches the next message of `queue` (unacked), or `None` when the queue is empty.
    pub async fn get(&mut self, queue: &str) -> Result<Option<RawMessage>, RawError> {
        let mut args = vec![0, 0]; // reserved ticket
        short_str(&mut args, queue.as_bytes());
        args.push(NO_BITS);
        self.send_method(CHANNEL, BASIC_GET, &args).await?;
        let (delivery_tag, redelivered) = loop {
            let frame = self.read_frame().await?;
            match frame.method() {
                Some((BASIC_GET_OK, mut a)) => {
                    let tag = take_u64(&mut a).ok_or_else(|| bad("basic.get-ok"))?;
                    let redelivered =
                        take(&mut a, 1).is_some_and(|b| b[0] & GET_OK_REDELIVERED != 0);
                    break (tag, redelivered);
                }
                Some((BASIC_GET_EMPTY, _)) => return Ok(None),
                _ => self.other_frame(&frame).await?,
            }
        };
        let header = self.read_frame().await?;
        if header.kind != FRAME_HEADER {
            return Err(bad("content header"));
        }
        let (size, properties) =
            parse_content_header(&header.payload).map_err(RawError::Protocol)?;
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
        args.push(NO_BITS);
        self.send_method(CHANNEL, BASIC_ACK, &args).await
    }

    /// Hands a fetched message back to the queue.
    pub async fn requeue(&mut self, delivery_tag: u64) -> Result<(), RawError> {
        let mut args = delivery_tag.to_be_bytes().to_vec();
        args.push(NACK_REQUEUE);
        self.send_method(CHANNEL, BASIC_NACK, &args).await
    }

    /// Closes the connection politely (unacked messages go back to the queue); errors are of no interest here.
    pub async fn close(mut self) {
        let mut args = REPLY_SUCCESS.to_be_bytes().to_vec();
        short_str(&mut args, b"done");
        args.extend_from_slice(&[0, 0, 0, 0]); // no failing class or method
        if self
            .send_method(CONNECTION_CHANNEL, CONNECTION_CLOSE, &args)
            .await
            .is_ok()
        {
            // Read until the broker's close-ok, a bounded number of frames (deliveries may still be in flight).
            for _ in 0..16 {
                match self.read_frame().await {
                    Ok(f) if f.is(CONNECTION_CLOSE_OK) => break,
                    Ok(_) => continue,
                    Err(_) => break,
                }
            }
        }
    }

    async fn expect(
        &mut self,
        channel: u16,
        want: Method,
        what: &'static str,
    ) -> Result<Vec<u8>, RawError> {
        loop {
            let frame = self.read_frame().await?;
            if let Some((got, args)) = frame.method()
                && frame.channel == channel
                && got == want
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
            Some((CONNECTION_BLOCKED | CONNECTION_UNBLOCKED, _)) => Ok(()),
            Some((closed @ (CONNECTION_CLOSE | CHANNEL_CLOSE), args)) => {
                let mut a = args;
                let code = take_u16(&mut a).unwrap_or(0);
                let text = take_short(&mut a)
                    .map(|t| String::from_utf8_lossy(t).into_owned())
                    .unwrap_or_default();
                let (what, ok) = if closed == CONNECTION_CLOSE {
                    ("connection", CONNECTION_CLOSE_OK)
                } else {
                    ("channel", CHANNEL_CLOSE_OK)
                };
                let _ = self.send_method(frame.channel, ok, &[]).await;
                Err(RawError::Closed(what, code, text))
            }
            Some((m, _)) => Err(RawError::Protocol(format!("method {}.{}", m.class, m.id))),
            None => Err(RawError::Protocol(format!("of type {}", frame.kind))),
        }
    }

    async fn send_method(
        &mut self,
        channel: u16,
        method: Method,
        args: &[u8],
    ) -> Result<(), RawError> {
        self.write_frame(FRAME_METHOD, channel, &method_payload(method, args))
            .await
    }

    async fn write_frame(
        &mut self,
        kind: u8,
        channel: u16,
        payload: &[u8],
    ) -> Result<(), RawError> {
        self.write_raw(&encode_frame(kind, channel, payload)).await
    }

    async fn write_raw(&mut self, bytes: &[u8]) -> Result<(), RawError> {
        tokio::time::timeout(RAW_IO_TIMEOUT, self.stream.get_mut().write_all(bytes))
            .await
            .map_err(|_| RawError::Timeout("while sending"))?
            .map_err(|e| RawError::Io("while sending", e))
    }

    async fn read_frame(&mut self) -> Result<Frame, RawError> {
        let read = async {
            let mut head = [0u8; 7];
            self.stream.read_exact(&mut head).await?;
            let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
            if size > self.frame_max.max(DEFAULT_FRAME_MAX) {
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
        tokio::time::timeout(RAW_IO_TIMEOUT, read)
            .await
            .map_err(|_| RawError::Timeout("while reading"))?
            .map_err(|e| RawError::Io("while reading", e))
    }
}

fn bad(what: &str) -> RawError {
    RawError::Protocol(malformed(what))
}

//! One raw AMQP connection with one channel: open (PLAIN or EXTERNAL login, TLS for `amqps://`), confirmed
//! publish, `basic.get`, ack, requeue, close; and the streaming consumer the subscriber takes tasks with
//! (`consume`, `next_delivery`, `ack_up_to`). Every exchange with the broker has a timeout; frames nobody waits
//! for (heartbeats, blocked notices) are skipped, a close from the broker is answered and reported. With a
//! heartbeat interval, a task sends heartbeats while the connection lives and a silent broker is noticed.
//!
//! Memory stays bounded by what the caller holds: the socket is read only when a frame is asked for (the rest
//! waits in the kernel and the broker), and a delivery's body beyond the caller's limit is read and dropped
//! frame by frame, never buffered.

use super::codec::*;
use super::transport::{FrameReader, Stream};
use crate::limits::RAW_IO_TIMEOUT;
use endpoint_wire::BrokerUrl;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::Mutex;

/// The one channel a raw connection opens.
const CHANNEL: u16 = 1;
/// Channel 0 carries the connection's own methods.
const CONNECTION_CHANNEL: u16 = 0;
/// Frames a polite close reads at most while waiting for the broker's close-ok (deliveries may still come).
const CLOSE_FRAMES: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
    #[error("no answer from the broker within {RAW_IO_TIMEOUT:?} {0}")]
    Timeout(&'static str),
    #[error("no frame from the broker for {0:?} (two heartbeat intervals): the link is dead")]
    Silent(Duration),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("the broker closed the {0} ({1} {2})")]
    Closed(&'static str, u16, String),
    #[error("the broker cancelled the consumer (the queue was deleted?)")]
    Cancelled,
    #[error("unexpected AMQP frame {0}")]
    Protocol(String),
    /// A `mandatory` message no queue took (`reply-code reply-text`).
    #[error("the broker returned the message as unroutable ({0})")]
    Returned(String),
}

impl RawError {
    /// Another consumer holds the queue exclusively: `basic.consume` refused with 403 or 405 (the channel is
    /// closed; the connection lives on and can try again).
    pub fn is_exclusive_conflict(&self) -> bool {
        matches!(self, RawError::Closed("channel", 403 | 405, _))
    }

    /// A failure no retry can fix: the TLS handshake refused (certificate, plaintext server).
    pub fn is_tls(&self) -> bool {
        matches!(self, RawError::Tls(_))
    }
}

/// A delivery being put together from its frames.
struct Partial {
    delivery_tag: u64,
    redelivered: bool,
    header: Option<(u64, RawProperties)>,
    body: Vec<u8>,
    received: u64,
}

/// One connection with one channel open.
pub struct RawConnection {
    reader: FrameReader<ReadHalf<Stream>>,
    writer: Arc<Mutex<WriteHalf<Stream>>>,
    frame_max: usize,
    confirming: bool,
    channel_open: bool,
    /// Two heartbeat intervals: how long the broker may stay silent while a delivery is awaited.
    silence: Option<Duration>,
    heartbeats: Option<tokio::task::JoinHandle<()>>,
    partial: Option<Partial>,
}

impl Drop for RawConnection {
    fn drop(&mut self) {
        if let Some(h) = self.heartbeats.take() {
            h.abort();
        }
    }
}

fn long_string_value(v: &str) -> Vec<u8> {
    let mut s = Vec::new();
    long_str(&mut s, v.as_bytes());
    s
}

fn bad(what: &str) -> RawError {
    RawError::Protocol(malformed(what))
}

impl RawConnection {
    /// Connects, logs in (PLAIN, or EXTERNAL when the URL says `auth_mechanism=external`) and opens channel 1
    /// on the URL's vhost. `heartbeat_secs` 0: no AMQP heartbeat (connections that live for a few round trips);
    /// else heartbeats are sent every half interval and [`RawConnection::next_delivery`] fails after two
    /// silent ones.
    pub async fn open(
        url: &BrokerUrl,
        name: &str,
        heartbeat_secs: u16,
    ) -> Result<RawConnection, RawError> {
        let parts = url.parts();
        let stream = Stream::connect(url).await?;
        let (read, write) = tokio::io::split(stream);
        let mut conn = RawConnection {
            reader: FrameReader::new(read),
            writer: Arc::new(Mutex::new(write)),
            frame_max: DEFAULT_FRAME_MAX,
            confirming: false,
            channel_open: false,
            silence: None,
            heartbeats: None,
            partial: None,
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
        // Without `consumer_cancel_notify` the broker never tells a consumer that its queue went away (deleted,
        // or a classic queue whose node stopped): the consumer would wait for deliveries forever.
        let capabilities = table_entry(b"consumer_cancel_notify", FIELD_BOOLEAN, &[1]);
        let mut table = Vec::new();
        long_str(&mut table, &capabilities);
        client.extend(table_entry(b"capabilities", FIELD_TABLE, &table));
        let mut args = Vec::new();
        long_str(&mut args, &client);
        if parts.external {
            short_str(&mut args, b"EXTERNAL");
            long_str(&mut args, b"");
        } else {
            short_str(&mut args, b"PLAIN");
            let response = format!("\0{}\0{}", parts.user, parts.password);
            long_str(&mut args, response.as_bytes());
        }
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
            conn.reader.frame_max = frame_max;
        }
        let mut args = Vec::new();
        args.extend_from_slice(&channel_max.to_be_bytes());
        args.extend_from_slice(&(conn.frame_max as u32).to_be_bytes());
        args.extend_from_slice(&heartbeat_secs.to_be_bytes());
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
        conn.open_channel().await?;
        if heartbeat_secs > 0 {
            let interval = Duration::from_secs(u64::from(heartbeat_secs));
            conn.silence = Some(interval * 2);
            conn.heartbeats = Some(tokio::spawn(send_heartbeats(
                conn.writer.clone(),
                interval / 2,
            )));
        }
        Ok(conn)
    }

    async fn open_channel(&mut self) -> Result<(), RawError> {
        self.send_method(CHANNEL, CHANNEL_OPEN, &[NO_BITS]).await?;
        self.expect(CHANNEL, CHANNEL_OPEN_OK, "channel.open-ok")
            .await?;
        self.channel_open = true;
        self.confirming = false;
        Ok(())
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
        self.publish_with(exchange, routing_key, props, body, false)
            .await
    }

    /// [`RawConnection::publish`] with the `mandatory` flag: a message no queue takes comes back
    /// ([`RawError::Returned`]) instead of being dropped by the broker.
    pub async fn publish_mandatory(
        &mut self,
        exchange: &str,
        routing_key: &str,
        props: &RawProperties,
        body: &[u8],
    ) -> Result<(), RawError> {
        self.publish_with(exchange, routing_key, props, body, true)
            .await
    }

    async fn publish_with(
        &mut self,
        exchange: &str,
        routing_key: &str,
        props: &RawProperties,
        body: &[u8],
        mandatory: bool,
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
        args.push(if mandatory { 1 } else { NO_BITS });
        self.send_method(CHANNEL, BASIC_PUBLISH, &args).await?;
        let header = encode_content_header(body.len(), props);
        self.write_frame(FRAME_HEADER, CHANNEL, &header).await?;
        for chunk in body.chunks(self.frame_max - FRAME_OVERHEAD) {
            self.write_frame(FRAME_BODY, CHANNEL, chunk).await?;
        }
        // A returned message (basic.return, its header and body) comes before the confirm.
        let mut returned: Option<String> = None;
        loop {
            let frame = self.read_frame().await?;
            if frame.is(BASIC_ACK) {
                return match returned {
                    None => Ok(()),
                    Some(why) => Err(RawError::Returned(why)),
                };
            }
            if let Some((BASIC_RETURN, args)) = frame.method() {
                let mut a = args;
                let code = take_u16(&mut a).unwrap_or(0);
                let text = take_short(&mut a)
                    .map(|t| String::from_utf8_lossy(t).into_owned())
                    .unwrap_or_default();
                returned = Some(format!("{code} {text}"));
                self.skip_content().await?;
                continue;
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
            body_size: size,
            body,
        }))
    }

    /// Reads and drops the header and body frames of a returned message.
    async fn skip_content(&mut self) -> Result<(), RawError> {
        let header = self.read_frame().await?;
        if header.kind != FRAME_HEADER {
            return Err(RawError::Protocol(
                "content header of a returned message".into(),
            ));
        }
        let (size, _) = parse_content_header(&header.payload).map_err(RawError::Protocol)?;
        let mut read = 0u64;
        while read < size {
            let frame = self.read_frame().await?;
            if frame.kind != FRAME_BODY {
                return Err(RawError::Protocol(
                    "content body of a returned message".into(),
                ));
            }
            read += frame.payload.len() as u64;
        }
        Ok(())
    }

    pub async fn ack(&mut self, delivery_tag: u64) -> Result<(), RawError> {
        let mut args = delivery_tag.to_be_bytes().to_vec();
        args.push(NO_BITS);
        self.send_method(CHANNEL, BASIC_ACK, &args).await
    }

    /// Acks every delivery up to and including `delivery_tag` (`multiple`).
    pub async fn ack_up_to(&mut self, delivery_tag: u64) -> Result<(), RawError> {
        let mut args = delivery_tag.to_be_bytes().to_vec();
        args.push(ACK_MULTIPLE);
        self.send_method(CHANNEL, BASIC_ACK, &args).await
    }

    /// Hands a fetched message back to the queue.
    pub async fn requeue(&mut self, delivery_tag: u64) -> Result<(), RawError> {
        let mut args = delivery_tag.to_be_bytes().to_vec();
        args.push(NACK_REQUEUE);
        self.send_method(CHANNEL, BASIC_NACK, &args).await
    }

    /// Starts consuming `queue` with `prefetch` deliveries in flight; `exclusive`: no other consumer at the
    /// same time. A refusal because another consumer holds the queue is [`RawError::is_exclusive_conflict`]:
    /// the channel is reopened at the next call.
    pub async fn consume(
        &mut self,
        queue: &str,
        tag: &str,
        prefetch: u16,
        exclusive: bool,
    ) -> Result<(), RawError> {
        if !self.channel_open {
            self.open_channel().await?;
        }
        let mut args = 0u32.to_be_bytes().to_vec(); // prefetch-size: no limit in bytes (RabbitMQ has none)
        args.extend_from_slice(&prefetch.to_be_bytes());
        args.push(NO_BITS); // per consumer
        self.send_method(CHANNEL, BASIC_QOS, &args).await?;
        self.expect_on_channel(BASIC_QOS_OK, "basic.qos-ok").await?;
        let mut args = vec![0, 0]; // reserved ticket
        short_str(&mut args, queue.as_bytes());
        short_str(&mut args, tag.as_bytes());
        args.push(if exclusive {
            CONSUME_EXCLUSIVE
        } else {
            NO_BITS
        });
        long_str(&mut args, b""); // no arguments
        self.send_method(CHANNEL, BASIC_CONSUME, &args).await?;
        self.expect_on_channel(BASIC_CONSUME_OK, "basic.consume-ok")
            .await?;
        self.partial = None;
        Ok(())
    }

    /// The next delivery of the consumer. A body larger than `max_body` bytes is read and dropped as it
    /// arrives (the message keeps its declared `body_size`, with an empty body). Cancel-safe: dropping the
    /// future keeps what was read for the next call, so it can be polled once to take only what has arrived.
    pub async fn next_delivery(&mut self, max_body: usize) -> Result<RawMessage, RawError> {
        loop {
            let frame = match self.silence {
                Some(limit) => tokio::time::timeout(limit, self.reader.next())
                    .await
                    .map_err(|_| RawError::Silent(limit))?,
                None => self.reader.next().await,
            }
            .map_err(|e| RawError::Io("while receiving", e))?;
            match frame.kind {
                FRAME_HEARTBEAT => continue,
                FRAME_METHOD => match frame.method() {
                    Some((BASIC_DELIVER, mut a)) => {
                        take_short(&mut a).ok_or_else(|| bad("basic.deliver"))?; // consumer tag
                        let delivery_tag = take_u64(&mut a).ok_or_else(|| bad("basic.deliver"))?;
                        let redelivered =
                            take(&mut a, 1).is_some_and(|b| b[0] & DELIVER_REDELIVERED != 0);
                        self.partial = Some(Partial {
                            delivery_tag,
                            redelivered,
                            header: None,
                            body: Vec::new(),
                            received: 0,
                        });
                    }
                    Some((BASIC_CANCEL, _)) => return Err(RawError::Cancelled),
                    _ => self.other_frame(&frame).await?,
                },
                FRAME_HEADER => {
                    let Some(p) = &mut self.partial else {
                        return Err(bad("a content header without a delivery"));
                    };
                    let (size, props) =
                        parse_content_header(&frame.payload).map_err(RawError::Protocol)?;
                    if size <= max_body as u64 {
                        p.body.reserve_exact(size as usize);
                    }
                    p.header = Some((size, props));
                }
                FRAME_BODY => {
                    let Some(p) = &mut self.partial else {
                        return Err(bad("a content body without a delivery"));
                    };
                    let Some((size, _)) = &p.header else {
                        return Err(bad("a content body before its header"));
                    };
                    p.received += frame.payload.len() as u64;
                    if *size <= max_body as u64 {
                        p.body.extend_from_slice(&frame.payload);
                    }
                }
                other => return Err(RawError::Protocol(format!("of type {other}"))),
            }
            if let Some(p) = &self.partial
                && let Some((size, _)) = &p.header
                && p.received >= *size
            {
                let p = self.partial.take().expect("checked above");
                let (body_size, properties) = p.header.expect("checked above");
                return Ok(RawMessage {
                    delivery_tag: p.delivery_tag,
                    redelivered: p.redelivered,
                    properties,
                    body_size,
                    body: p.body,
                });
            }
        }
    }

    /// Closes the connection politely (unacked messages go back to the queue); errors are of no interest here.
    pub async fn close(mut self) {
        if let Some(h) = self.heartbeats.take() {
            h.abort();
        }
        let mut args = REPLY_SUCCESS.to_be_bytes().to_vec();
        short_str(&mut args, b"done");
        args.extend_from_slice(&[0, 0, 0, 0]); // no failing class or method
        if self
            .send_method(CONNECTION_CHANNEL, CONNECTION_CLOSE, &args)
            .await
            .is_ok()
        {
            // Read until the broker's close-ok; deliveries in flight may come first.
            let wait = async {
                for _ in 0..CLOSE_FRAMES {
                    match self.reader.next().await {
                        Ok(f) if f.is(CONNECTION_CLOSE_OK) => break,
                        Ok(_) => continue,
                        Err(_) => break,
                    }
                }
            };
            let _ = tokio::time::timeout(RAW_IO_TIMEOUT, wait).await;
        }
    }

    /// Waits for `want` on the channel; the broker closing the channel instead is reported (and the channel
    /// marked closed, to be reopened).
    async fn expect_on_channel(
        &mut self,
        want: Method,
        what: &'static str,
    ) -> Result<Vec<u8>, RawError> {
        let r = self.expect(CHANNEL, want, what).await;
        if let Err(RawError::Closed("channel", ..)) = &r {
            self.channel_open = false;
        }
        r
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
                    self.channel_open = false;
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
        write_all(&self.writer, bytes).await
    }

    async fn read_frame(&mut self) -> Result<Frame, RawError> {
        tokio::time::timeout(RAW_IO_TIMEOUT, self.reader.next())
            .await
            .map_err(|_| RawError::Timeout("while reading"))?
            .map_err(|e| RawError::Io("while reading", e))
    }
}

async fn write_all(writer: &Mutex<WriteHalf<Stream>>, bytes: &[u8]) -> Result<(), RawError> {
    let write = async {
        let mut w = writer.lock().await;
        w.write_all(bytes).await?;
        w.flush().await
    };
    tokio::time::timeout(RAW_IO_TIMEOUT, write)
        .await
        .map_err(|_| RawError::Timeout("while sending"))?
        .map_err(|e| RawError::Io("while sending", e))
}

/// Sends a heartbeat frame every `every` until aborted (with the connection) or a write fails.
async fn send_heartbeats(writer: Arc<Mutex<WriteHalf<Stream>>>, every: Duration) {
    let beat = encode_frame(FRAME_HEARTBEAT, CONNECTION_CHANNEL, &[]);
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if write_all(&writer, &beat).await.is_err() {
            return;
        }
    }
}

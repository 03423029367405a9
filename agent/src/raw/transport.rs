//! The byte stream under a raw connection, and frames read from it: TCP, or TLS over TCP for `amqps://` (the
//! server's certificate and host name always verified, with the same CA and client certificate lapin uses),
//! and a frame reader that keeps a partly read frame across calls, so waiting for a frame can be abandoned
//! (cancel-safe) and a frame can be taken only if it has already arrived.

use super::client::RawError;
use super::codec::{DEFAULT_FRAME_MAX, FRAME_END, FRAME_OVERHEAD, Frame};
use crate::limits::RAW_IO_TIMEOUT;
use endpoint_wire::{BrokerUrl, tls};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A plain or TLS connection to the broker.
pub(super) enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    /// Connects to the URL's host and port; for `amqps://` completes the TLS handshake (verified).
    pub(super) async fn connect(url: &BrokerUrl) -> Result<Stream, RawError> {
        let parts = url.parts();
        let tcp = tokio::time::timeout(
            RAW_IO_TIMEOUT,
            TcpStream::connect((parts.host.as_str(), parts.port)),
        )
        .await
        .map_err(|_| RawError::Timeout("while connecting"))?
        .map_err(|e| RawError::Io("while connecting", e))?;
        let _ = tcp.set_nodelay(true);
        if !parts.tls {
            return Ok(Stream::Plain(tcp));
        }
        let config = url
            .tls()
            .client_config()
            .map_err(|e| RawError::Tls(e.to_string()))?;
        let name = rustls_pki_types::ServerName::try_from(parts.host.clone()).map_err(|e| {
            RawError::Tls(format!("{:?} is not a valid host name: {e}", parts.host))
        })?;
        let handshake = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
        match tokio::time::timeout(RAW_IO_TIMEOUT, handshake).await {
            Err(_) => Err(RawError::Timeout("in the TLS handshake")),
            Ok(Ok(stream)) => Ok(Stream::Tls(Box::new(stream))),
            Ok(Err(e)) => match tls::explain(&e) {
                Some(reason) => Err(RawError::Tls(reason)),
                None => Err(RawError::Io("in the TLS handshake", e)),
            },
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// How much the reader asks the stream for at a time.
const READ_CHUNK: usize = 64 * 1024;

/// Reads frames from `inner`, keeping what arrived of the next one across calls.
pub(super) struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// Start of the unread bytes in `buf`.
    start: usize,
    /// Largest frame accepted (the negotiated `frame_max`, at least RabbitMQ's default).
    pub frame_max: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub(super) fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: Vec::with_capacity(READ_CHUNK),
            start: 0,
            frame_max: DEFAULT_FRAME_MAX,
        }
    }

    /// The next frame. Cancel-safe: dropping the future loses nothing, the bytes read so far stay here.
    pub(super) async fn next(&mut self) -> io::Result<Frame> {
        loop {
            if let Some(frame) = self.parse()? {
                return Ok(frame);
            }
            if self.start > 0 && self.start >= self.buf.len() / 2 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            self.buf.reserve(READ_CHUNK);
            // `read_buf` is cancel-safe: what it read is in `buf`, or nothing was read.
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
        }
    }

    /// A whole frame from the bytes already read, if there is one.
    fn parse(&mut self) -> io::Result<Option<Frame>> {
        let avail = &self.buf[self.start..];
        if avail.len() < 7 {
            return Ok(None);
        }
        let size = u32::from_be_bytes([avail[3], avail[4], avail[5], avail[6]]) as usize;
        if size > self.frame_max.max(DEFAULT_FRAME_MAX) {
            return Err(io::Error::other(format!(
                "frame of {size} bytes is over frame_max"
            )));
        }
        let total = size + FRAME_OVERHEAD;
        if avail.len() < total {
            return Ok(None);
        }
        if avail[total - 1] != FRAME_END {
            return Err(io::Error::other("frame does not end with 0xCE"));
        }
        let frame = Frame {
            kind: avail[0],
            channel: u16::from_be_bytes([avail[1], avail[2]]),
            payload: avail[7..7 + size].to_vec(),
        };
        self.start += total;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Ok(Some(frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raw::codec::{BASIC_ACK, FRAME_METHOD, encode_frame, method_payload};

    #[tokio::test]
    async fn frames_split_anywhere_are_put_together() {
        let mut bytes = Vec::new();
        for tag in 0u8..3 {
            bytes.extend(encode_frame(
                FRAME_METHOD,
                1,
                &method_payload(BASIC_ACK, &[tag; 9]),
            ));
        }
        // Delivered one byte at a time: every partial frame waits for the rest.
        let (mut tx, rx) = tokio::io::duplex(1);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            tx.write_all(&bytes).await.unwrap();
        });
        let mut reader = FrameReader::new(rx);
        for tag in 0u8..3 {
            let frame = reader.next().await.unwrap();
            assert_eq!(frame.method(), Some((BASIC_ACK, &[tag; 9][..])));
        }
        writer.await.unwrap();
        assert_eq!(
            reader.next().await.unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}

//! The bytes of AMQP 0-9-1 as the raw reader speaks them: frame types, class and method ids, property flags
//! and method argument bits by name, frames, short and long strings, field tables (read leniently: keys as
//! bytes, values the agent needs decoded, every other type skipped by its size) and content headers. Pure:
//! no I/O, so every rule is unit-tested.

// --- Frames ---

pub(super) const FRAME_METHOD: u8 = 1;
pub(super) const FRAME_HEADER: u8 = 2;
pub(super) const FRAME_BODY: u8 = 3;
pub(super) const FRAME_HEARTBEAT: u8 = 8;
pub(super) const FRAME_END: u8 = 0xCE;
/// Type (1), channel (2) and size (4) before a frame's payload, and the end byte after it.
pub(super) const FRAME_OVERHEAD: usize = 8;
/// The protocol header a client opens with: AMQP 0-9-1.
pub(super) const PROTOCOL_HEADER: &[u8] = b"AMQP\x00\x00\x09\x01";
/// RabbitMQ's default `frame_max`: the largest frame read before `connection.tune` says otherwise.
pub(super) const DEFAULT_FRAME_MAX: usize = 131_072;
/// The smallest `frame_max` AMQP allows (`frame-min-size`); a smaller one from the broker is ignored.
pub(super) const MIN_FRAME_MAX: usize = 4096;

// --- Classes and methods ---

/// A method by class and method id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Method {
    pub class: u16,
    pub id: u16,
}

const fn m(class: u16, id: u16) -> Method {
    Method { class, id }
}

pub(super) const CLASS_CONNECTION: u16 = 10;
pub(super) const CLASS_CHANNEL: u16 = 20;
pub(super) const CLASS_BASIC: u16 = 60;
pub(super) const CLASS_CONFIRM: u16 = 85;

pub(super) const CONNECTION_START: Method = m(CLASS_CONNECTION, 10);
pub(super) const CONNECTION_START_OK: Method = m(CLASS_CONNECTION, 11);
pub(super) const CONNECTION_TUNE: Method = m(CLASS_CONNECTION, 30);
pub(super) const CONNECTION_TUNE_OK: Method = m(CLASS_CONNECTION, 31);
pub(super) const CONNECTION_OPEN: Method = m(CLASS_CONNECTION, 40);
pub(super) const CONNECTION_OPEN_OK: Method = m(CLASS_CONNECTION, 41);
pub(super) const CONNECTION_CLOSE: Method = m(CLASS_CONNECTION, 50);
pub(super) const CONNECTION_CLOSE_OK: Method = m(CLASS_CONNECTION, 51);
pub(super) const CONNECTION_BLOCKED: Method = m(CLASS_CONNECTION, 60);
pub(super) const CONNECTION_UNBLOCKED: Method = m(CLASS_CONNECTION, 61);
pub(super) const CHANNEL_OPEN: Method = m(CLASS_CHANNEL, 10);
pub(super) const CHANNEL_OPEN_OK: Method = m(CLASS_CHANNEL, 11);
pub(super) const CHANNEL_CLOSE: Method = m(CLASS_CHANNEL, 40);
pub(super) const CHANNEL_CLOSE_OK: Method = m(CLASS_CHANNEL, 41);
pub(super) const BASIC_QOS: Method = m(CLASS_BASIC, 10);
pub(super) const BASIC_QOS_OK: Method = m(CLASS_BASIC, 11);
pub(super) const BASIC_CONSUME: Method = m(CLASS_BASIC, 20);
pub(super) const BASIC_CONSUME_OK: Method = m(CLASS_BASIC, 21);
pub(super) const BASIC_CANCEL: Method = m(CLASS_BASIC, 30);
pub(super) const BASIC_PUBLISH: Method = m(CLASS_BASIC, 40);
pub(super) const BASIC_RETURN: Method = m(CLASS_BASIC, 50);
pub(super) const BASIC_DELIVER: Method = m(CLASS_BASIC, 60);
pub(super) const BASIC_GET: Method = m(CLASS_BASIC, 70);
pub(super) const BASIC_GET_OK: Method = m(CLASS_BASIC, 71);
pub(super) const BASIC_GET_EMPTY: Method = m(CLASS_BASIC, 72);
pub(super) const BASIC_ACK: Method = m(CLASS_BASIC, 80);
pub(super) const BASIC_NACK: Method = m(CLASS_BASIC, 120);
pub(super) const CONFIRM_SELECT: Method = m(CLASS_CONFIRM, 10);
pub(super) const CONFIRM_SELECT_OK: Method = m(CLASS_CONFIRM, 11);

/// `reply-code` of a clean `connection.close`.
pub(super) const REPLY_SUCCESS: u16 = 200;

// --- Bits of method arguments ---

/// `basic.get-ok`'s `redelivered` bit.
pub(super) const GET_OK_REDELIVERED: u8 = 1;
/// `basic.deliver`'s `redelivered` bit.
pub(super) const DELIVER_REDELIVERED: u8 = 1;
/// `basic.ack`'s `multiple` bit: every delivery up to the tag.
pub(super) const ACK_MULTIPLE: u8 = 1;
/// `basic.consume`'s `exclusive` bit (after `no-local` and `no-ack`).
pub(super) const CONSUME_EXCLUSIVE: u8 = 0b100;
/// `basic.nack`'s `requeue` bit (`multiple` is bit 0, not used here).
pub(super) const NACK_REQUEUE: u8 = 0b10;
/// No bits set: `basic.get` with `no-ack` off, `basic.ack` without `multiple`, `basic.publish` neither
/// mandatory nor immediate, `confirm.select` waiting for its reply, `channel.open`'s reserved field.
pub(super) const NO_BITS: u8 = 0;

// --- Basic properties: flag bits of the content header, in wire order ---

pub(super) const PROP_CONTENT_TYPE: u16 = 1 << 15;
pub(super) const PROP_CONTENT_ENCODING: u16 = 1 << 14;
pub(super) const PROP_HEADERS: u16 = 1 << 13;
pub(super) const PROP_DELIVERY_MODE: u16 = 1 << 12;
pub(super) const PROP_PRIORITY: u16 = 1 << 11;
pub(super) const PROP_CORRELATION_ID: u16 = 1 << 10;
pub(super) const PROP_REPLY_TO: u16 = 1 << 9;
pub(super) const PROP_EXPIRATION: u16 = 1 << 8;
pub(super) const PROP_MESSAGE_ID: u16 = 1 << 7;
pub(super) const PROP_TIMESTAMP: u16 = 1 << 6;
pub(super) const PROP_TYPE: u16 = 1 << 5;
pub(super) const PROP_USER_ID: u16 = 1 << 4;
pub(super) const PROP_APP_ID: u16 = 1 << 3;
pub(super) const PROP_CLUSTER_ID: u16 = 1 << 2;
/// Every property, most significant first, as they follow each other in a content header.
const PROPERTIES: [u16; 14] = [
    PROP_CONTENT_TYPE,
    PROP_CONTENT_ENCODING,
    PROP_HEADERS,
    PROP_DELIVERY_MODE,
    PROP_PRIORITY,
    PROP_CORRELATION_ID,
    PROP_REPLY_TO,
    PROP_EXPIRATION,
    PROP_MESSAGE_ID,
    PROP_TIMESTAMP,
    PROP_TYPE,
    PROP_USER_ID,
    PROP_APP_ID,
    PROP_CLUSTER_ID,
];

// --- Field-table value types (RabbitMQ's dialect of AMQP 0-9-1) ---

pub const FIELD_LONG_STRING: u8 = b'S';
pub const FIELD_BYTES: u8 = b'x';
pub const FIELD_SIGNED_32: u8 = b'I';
pub const FIELD_SIGNED_64: u8 = b'l';
pub const FIELD_VOID: u8 = b'V';
pub const FIELD_BOOLEAN: u8 = b't';
pub const FIELD_TABLE: u8 = b'F';

/// The properties of a message as raw bytes, so that any byte string can be sent (tests) or read (agent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawProperties {
    pub message_id: Option<Vec<u8>>,
    /// The AMQP `reply_to` property: the service whose queue gets the result.
    pub reply_to: Option<Vec<u8>>,
    /// The AMQP `type` property: the function name.
    pub kind: Option<Vec<u8>>,
    /// The encoded field-table entries of the headers, without the table's 4-byte length prefix.
    pub headers: Option<Vec<u8>>,
    pub delivery_mode: Option<u8>,
}

/// One message, fetched with `basic.get` or delivered to the consumer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawMessage {
    pub delivery_tag: u64,
    pub redelivered: bool,
    pub properties: RawProperties,
    /// The body's size as the broker declared it.
    pub body_size: u64,
    /// The body; empty when it was larger than the consumer's limit (read and dropped, never held).
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
    // Type bytes: t boolean, B/b unsigned/signed 8-bit, u/s 16-bit, i/I 32-bit, l 64-bit signed, T timestamp,
    // f float, d double, D decimal, V void, S long string, x byte array, A array, F table.
    Ok(match kind {
        b't' => fixed(t, 1).map(|_| FieldValue::Other('t'))?,
        b'B' => int(fixed(t, 1)?, false),
        b'b' => int(fixed(t, 1)?, true),
        b's' => int(fixed(t, 2)?, true),
        b'u' => int(fixed(t, 2)?, false),
        FIELD_SIGNED_32 => int(fixed(t, 4)?, true),
        b'i' => int(fixed(t, 4)?, false),
        FIELD_SIGNED_64 => int(fixed(t, 8)?, true),
        b'T' => int(fixed(t, 8)?, false),
        b'f' => fixed(t, 4).map(|_| FieldValue::Other('f'))?,
        b'd' => fixed(t, 8).map(|_| FieldValue::Other('d'))?,
        b'D' => fixed(t, 5).map(|_| FieldValue::Other('D'))?,
        FIELD_VOID => FieldValue::Other('V'),
        FIELD_LONG_STRING | FIELD_BYTES => {
            FieldValue::Bytes(take_long(t).ok_or("truncated header value")?.to_vec())
        }
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

pub(super) fn take<'a>(t: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if t.len() < n {
        return None;
    }
    let (head, rest) = t.split_at(n);
    *t = rest;
    Some(head)
}

pub(super) fn take_short<'a>(t: &mut &'a [u8]) -> Option<&'a [u8]> {
    let n = usize::from(*take(t, 1)?.first()?);
    take(t, n)
}

fn take_long<'a>(t: &mut &'a [u8]) -> Option<&'a [u8]> {
    let n = u32::from_be_bytes(take(t, 4)?.try_into().ok()?);
    take(t, usize::try_from(n).ok()?)
}

pub(super) fn take_u16(t: &mut &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(take(t, 2)?.try_into().ok()?))
}

pub(super) fn take_u32(t: &mut &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(take(t, 4)?.try_into().ok()?))
}

pub(super) fn take_u64(t: &mut &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(take(t, 8)?.try_into().ok()?))
}

pub(super) fn short_str(out: &mut Vec<u8>, s: &[u8]) {
    // Short strings hold at most 255 bytes; longer input is cut (only tests send arbitrary bytes).
    let s = &s[..s.len().min(255)];
    out.push(s.len() as u8);
    out.extend_from_slice(s);
}

pub(super) fn long_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// The payload of a method frame: class, method id, arguments.
pub(super) fn method_payload(method: Method, args: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(args.len() + 4);
    out.extend_from_slice(&method.class.to_be_bytes());
    out.extend_from_slice(&method.id.to_be_bytes());
    out.extend_from_slice(args);
    out
}

/// A whole frame on the wire: type, channel, size, payload, end byte.
pub(super) fn encode_frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + FRAME_OVERHEAD);
    frame.push(kind);
    frame.extend_from_slice(&channel.to_be_bytes());
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    frame.push(FRAME_END);
    frame
}

/// A frame as read: type, channel, payload.
#[derive(Debug)]
pub(super) struct Frame {
    pub kind: u8,
    pub channel: u16,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The method and arguments of a method frame.
    pub(super) fn method(&self) -> Option<(Method, &[u8])> {
        if self.kind != FRAME_METHOD || self.payload.len() < 4 {
            return None;
        }
        let p = &self.payload;
        Some((
            m(
                u16::from_be_bytes([p[0], p[1]]),
                u16::from_be_bytes([p[2], p[3]]),
            ),
            &p[4..],
        ))
    }

    /// Whether this is a method frame of `method`.
    pub(super) fn is(&self, method: Method) -> bool {
        self.method().is_some_and(|(got, _)| got == method)
    }
}

/// The payload of a content header frame for a message of `body_len` bytes with `props`: the properties the raw
/// client sends (any bytes, so tests can send what lapin cannot read).
pub(super) fn encode_content_header(body_len: usize, props: &RawProperties) -> Vec<u8> {
    let mut header = Vec::new();
    header.extend_from_slice(&CLASS_BASIC.to_be_bytes());
    header.extend_from_slice(&0u16.to_be_bytes()); // weight, always 0
    header.extend_from_slice(&(body_len as u64).to_be_bytes());
    let mut flags = 0u16;
    let mut list = Vec::new();
    // In wire order: headers, delivery mode, reply-to, message id, type.
    if let Some(h) = &props.headers {
        flags |= PROP_HEADERS;
        long_str(&mut list, h);
    }
    if let Some(mode) = props.delivery_mode {
        flags |= PROP_DELIVERY_MODE;
        list.push(mode);
    }
    if let Some(to) = &props.reply_to {
        flags |= PROP_REPLY_TO;
        short_str(&mut list, to);
    }
    if let Some(id) = &props.message_id {
        flags |= PROP_MESSAGE_ID;
        short_str(&mut list, id);
    }
    if let Some(kind) = &props.kind {
        flags |= PROP_TYPE;
        short_str(&mut list, kind);
    }
    header.extend_from_slice(&flags.to_be_bytes());
    header.extend_from_slice(&list);
    header
}

pub(super) fn malformed(what: &str) -> String {
    format!("{what} is malformed")
}

/// Body size and properties from a content header frame's payload. Property values are kept as bytes; only
/// the ones the agent reads are returned, the others are skipped by their size.
pub(super) fn parse_content_header(p: &[u8]) -> Result<(u64, RawProperties), String> {
    let mut t = p;
    take(&mut t, 4).ok_or_else(|| malformed("content header"))?; // class and weight
    let size = take_u64(&mut t).ok_or_else(|| malformed("content header"))?;
    let flags = take_u16(&mut t).ok_or_else(|| malformed("content header"))?;
    let mut props = RawProperties::default();
    let short = |t: &mut &[u8]| {
        take_short(t)
            .map(<[u8]>::to_vec)
            .ok_or_else(|| malformed("a property"))
    };
    for prop in PROPERTIES.into_iter().filter(|p| flags & p != 0) {
        match prop {
            PROP_HEADERS => {
                props.headers = Some(
                    take_long(&mut t)
                        .ok_or_else(|| malformed("the headers"))?
                        .to_vec(),
                )
            }
            PROP_DELIVERY_MODE => props.delivery_mode = take(&mut t, 1).map(|b| b[0]),
            PROP_PRIORITY => {
                take(&mut t, 1).ok_or_else(|| malformed("priority"))?;
            }
            PROP_MESSAGE_ID => props.message_id = Some(short(&mut t)?),
            PROP_REPLY_TO => props.reply_to = Some(short(&mut t)?),
            PROP_TIMESTAMP => {
                take(&mut t, 8).ok_or_else(|| malformed("timestamp"))?;
            }
            PROP_TYPE => props.kind = Some(short(&mut t)?),
            // content type, content encoding, correlation id, expiration, user id, app id, cluster id
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
        // A boolean is not a number, even though it is one byte.
        check(
            &table_entry(b"b", b't', &[1]),
            Ok(vec![(b"b", FieldValue::Other('t'))]),
        );
    }

    #[test]
    fn content_headers() {
        let mut p = vec![0, CLASS_BASIC as u8, 0, 0];
        p.extend_from_slice(&5u64.to_be_bytes());
        let flags: u16 = PROP_CONTENT_TYPE
            | PROP_HEADERS
            | PROP_DELIVERY_MODE
            | PROP_MESSAGE_ID
            | PROP_TIMESTAMP
            | PROP_TYPE;
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

    #[test]
    fn content_headers_round_trip() {
        let props = RawProperties {
            message_id: Some(b"id-\xff".to_vec()),
            kind: Some(b"echo".to_vec()),
            headers: Some(table_entry(b"k", FIELD_SIGNED_64, &5i64.to_be_bytes())),
            delivery_mode: Some(2),
            reply_to: Some(b"svc-1".to_vec()),
        };
        let (size, back) = parse_content_header(&encode_content_header(300_000, &props)).unwrap();
        assert_eq!((size, back), (300_000, props));
    }

    #[test]
    fn frames() {
        let frame = encode_frame(FRAME_METHOD, 1, &method_payload(BASIC_ACK, &[9]));
        assert_eq!(frame.len(), 5 + FRAME_OVERHEAD);
        assert_eq!(
            (frame[0], frame[frame.len() - 1]),
            (FRAME_METHOD, FRAME_END)
        );
        let read = Frame {
            kind: frame[0],
            channel: u16::from_be_bytes([frame[1], frame[2]]),
            payload: frame[7..frame.len() - 1].to_vec(),
        };
        assert!(read.is(BASIC_ACK) && !read.is(BASIC_NACK));
        assert_eq!(read.method(), Some((BASIC_ACK, &[9u8][..])));
    }
}

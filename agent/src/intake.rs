//! What a delivery becomes: a task to queue, a `rejected` result (bad input with a task id), or nothing (no
//! task id to answer to: logged and acked). Pure decisions on the fields of a delivery as our own AMQP client
//! read them (bytes, any of which may be malformed); no broker here, so every rule is unit-tested.
//! Also where a first delivery of an instant function is handed to `executor::run_on_arrival`.

use crate::config::Config;
use crate::executor;
use crate::raw::{FieldValue, RawMessage, parse_table};
use crate::task::{Intake, NewTask};
use endpoint_wire::{HEADER_TIMEOUT_MS, MAX_HEADER_BYTES, ServiceName};

/// A whole number written as text (an `x-timeout-ms` header sent as a string).
pub(crate) fn parse_ms(text: &[u8]) -> Option<i128> {
    std::str::from_utf8(text).ok()?.trim().parse().ok()
}

/// The `x-timeout-ms` value `n` read from the header value `shown`, if it is a positive integer.
pub(crate) fn positive_ms(n: Option<i128>, shown: &dyn std::fmt::Debug) -> Result<u64, String> {
    match n {
        Some(n) if n > 0 => Ok(u64::try_from(n).unwrap_or(u64::MAX)),
        _ => Err(format!(
            "header {HEADER_TIMEOUT_MS} must be a positive integer number of milliseconds, got {shown:?}"
        )),
    }
}

fn utf8(b: &Option<Vec<u8>>) -> Result<Option<&str>, std::str::Utf8Error> {
    b.as_deref().map(std::str::from_utf8).transpose()
}

/// What a delivery becomes, read by our own AMQP client (`crate::raw`) as bytes: any property may be
/// malformed. A task id that is not UTF-8 cannot be answered (results carry it as a UTF-8 short string), so
/// such a message is dropped and logged like one without an id; a bad function name or header gets a
/// `rejected` result. The payload moves into the task without a copy.
pub(crate) fn classify_raw(config: &Config, m: RawMessage) -> Option<Intake> {
    let RawMessage {
        delivery_tag,
        properties: p,
        body,
        body_size,
        ..
    } = m;
    let Ok(message_id) = utf8(&p.message_id) else {
        tracing::warn!(
            delivery_tag,
            message_id = ?String::from_utf8_lossy(p.message_id.as_deref().unwrap_or_default()),
            function = ?p.kind.as_deref().map(String::from_utf8_lossy),
            bytes = body_size,
            "dropped a task whose message_id is not valid UTF-8 (no task id to answer to): send task ids as UTF-8"
        );
        return None;
    };
    let Some(task_id) = message_id.filter(|id| !id.is_empty()) else {
        tracing::warn!(
            delivery_tag,
            function = ?p.kind.as_deref().map(String::from_utf8_lossy),
            bytes = body_size,
            "dropped a task without message_id (no task id to answer to): set message_id on every task"
        );
        return None;
    };
    let reject = |reason: String| {
        Some(Intake::Rejected {
            task_id: task_id.to_owned(),
            function: String::from_utf8_lossy(p.kind.as_deref().unwrap_or_default()).into_owned(),
            reason,
            reply_to: None,
        })
    };
    // A service that cannot be named in a routing key gets nothing back there: the rejection goes to the
    // shared queue, where someone reading results sees why.
    let reply_to = match p.reply_to.as_deref().map(std::str::from_utf8).transpose() {
        // Some clients send an empty reply-to for "none".
        Ok(None | Some("")) => None,
        Ok(Some(name)) => match ServiceName::new(name) {
            Ok(s) => Some(s),
            Err(e) => {
                return reject(format!(
                    "the `reply_to` property names no service this agent can answer: {e}"
                ));
            }
        },
        Err(_) => {
            let shown = String::from_utf8_lossy(p.reply_to.as_deref().unwrap_or_default());
            return reject(format!(
                "the `reply_to` property (the service to answer) is not valid UTF-8: {shown:?}"
            ));
        }
    };
    let Ok(function) = utf8(&p.kind) else {
        let shown = String::from_utf8_lossy(p.kind.as_deref().unwrap_or_default()).into_owned();
        return reject(format!(
            "the `type` property (the function name) is not valid UTF-8: {shown:?}"
        ));
    };
    let headers = match p.headers.as_deref().map(parse_table).transpose() {
        Ok(h) => h.unwrap_or_default(),
        Err(e) => return reject(format!("task headers cannot be read: {e}")),
    };
    if let Some((key, _)) = headers
        .iter()
        .find(|(k, _)| std::str::from_utf8(k).is_err())
    {
        let shown = String::from_utf8_lossy(key).into_owned();
        return reject(format!("header name {shown:?} is not valid UTF-8"));
    }
    let timeout = headers
        .iter()
        .find(|(k, _)| k.as_slice() == HEADER_TIMEOUT_MS.as_bytes())
        .map(|(_, v)| {
            let n = match v {
                FieldValue::Int(n) => Some(*n),
                FieldValue::Bytes(b) => parse_ms(b),
                FieldValue::Other(_) => None,
            };
            positive_ms(n, v)
        });
    let fields = Fields {
        message_id: Some(task_id),
        function,
        timeout,
        header_bytes: p.headers.as_ref().map_or(0, Vec::len),
        body_size,
        reply_to,
        headers: p.headers.clone(),
    };
    classify(config, fields, body)
}

/// A first delivery of a task whose function runs on arrival comes with its result (see
/// [`executor::run_on_arrival`]); a redelivered one may be what stopped the agent last time, so it is queued
/// and runs from the disk queue with its attempt counted.
pub(crate) fn on_arrival(config: &Config, intake: Intake, redelivered: bool) -> Intake {
    match intake {
        Intake::Task(t) if !redelivered => executor::run_on_arrival(config, t),
        other => other,
    }
}

/// The fields of a delivery that decide what it becomes.
pub(crate) struct Fields<'a> {
    pub message_id: Option<&'a str>,
    pub function: Option<&'a str>,
    /// The `x-timeout-ms` header, if there is one: its value, or why it is not usable.
    pub timeout: Option<Result<u64, String>>,
    /// Encoded size of the header table.
    pub header_bytes: usize,
    /// The body's size as the broker declared it (the body itself may have been dropped for its size).
    pub body_size: u64,
    /// The service whose queue gets the result, from `reply_to` (already checked).
    pub reply_to: Option<ServiceName>,
    /// The encoded header entries as they arrived, kept with the task (for a hand-back).
    pub headers: Option<Vec<u8>>,
}

/// Decides what a delivery becomes. `None`: no task id, so nothing can be answered (logged and acked).
pub(crate) fn classify(config: &Config, fields: Fields<'_>, body: Vec<u8>) -> Option<Intake> {
    let Fields {
        message_id,
        function,
        timeout,
        header_bytes,
        body_size,
        reply_to,
        headers,
    } = fields;
    let task_id = message_id.filter(|id| !id.is_empty())?.to_owned();
    let reject = |function: &str, reason: String| {
        Some(Intake::Rejected {
            task_id: task_id.clone(),
            function: function.to_owned(),
            reason,
            reply_to: reply_to.clone(),
        })
    };
    let Some(function) = function.filter(|f| !f.is_empty()) else {
        return reject(
            "",
            "task has no `type` property: set it to the name of the function to run".into(),
        );
    };
    if !config.offers(function) {
        let table = config.functions.current();
        let offered: Vec<&str> = table.keys().map(String::as_str).collect();
        return reject(
            function,
            format!(
                "unknown function {function:?}: this endpoint offers {}",
                offered.join(", ")
            ),
        );
    }
    if body_size > config.max_body_bytes as u64 {
        return reject(
            function,
            format!(
                "task body is {body_size} bytes, over this endpoint's max_body_bytes of {}",
                config.max_body_bytes
            ),
        );
    }
    if header_bytes > MAX_HEADER_BYTES {
        return reject(
            function,
            format!(
                "task headers are {header_bytes} bytes, over the limit of {MAX_HEADER_BYTES}: put data in the body, not in headers"
            ),
        );
    }
    let timeout_ms = match timeout.transpose() {
        Ok(t) => t,
        Err(reason) => return reject(function, reason),
    };
    Some(Intake::Task(NewTask {
        task_id,
        function: function.to_owned(),
        payload: body,
        timeout_ms,
        reply_to,
        headers,
    }))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::raw::RawProperties;

    /// An endpoint with the built-in functions only and a 10-byte body limit.
    pub(crate) fn config() -> Config {
        let mut c = crate::testing::config("");
        c.max_body_bytes = 10;
        c
    }

    #[test]
    fn only_first_deliveries_of_instant_functions_run_on_arrival() {
        let c = config();
        let task = |f: &str| {
            Intake::Task(NewTask {
                headers: None,
                task_id: "t".into(),
                function: f.into(),
                payload: b"hi".to_vec(),
                timeout_ms: None,
                reply_to: None,
            })
        };
        match on_arrival(&c, task("echo"), false) {
            Intake::Ran {
                function,
                result,
                reply_to,
            } => {
                assert_eq!((function.as_str(), reply_to), ("echo", None));
                assert_eq!(
                    (result.task_id.as_str(), result.status, result.attempts),
                    ("t", endpoint_wire::Status::Ok, 1)
                );
                assert_eq!(result.body, b"hi");
            }
            other => panic!("echo on first delivery should run on arrival: {other:?}"),
        }
        // Redelivered: maybe it stopped the agent last time; it goes to the disk queue.
        assert_eq!(on_arrival(&c, task("echo"), true), task("echo"));
        // Not instant: queued for a slot.
        assert_eq!(on_arrival(&c, task("sleep"), false), task("sleep"));
        let rejected = Intake::Rejected {
            task_id: "t".into(),
            function: "echo".into(),
            reason: "bad".into(),
            reply_to: None,
        };
        assert_eq!(on_arrival(&c, rejected.clone(), false), rejected);
    }

    fn check(
        id: Option<&str>,
        f: Option<&str>,
        t: Option<Result<u64, String>>,
        body: &str,
        want: Option<&str>,
    ) {
        let fields = Fields {
            headers: None,
            message_id: id,
            function: f,
            timeout: t,
            header_bytes: 0,
            body_size: body.len() as u64,
            reply_to: None,
        };
        let got = classify(&config(), fields, body.as_bytes().to_vec());
        match (got, want) {
            (None, None) => {}
            (Some(Intake::Task(t)), Some("task")) => assert_eq!(t.payload, body.as_bytes()),
            (Some(Intake::Rejected { reason, .. }), Some(w)) => {
                assert!(reason.contains(w), "{reason:?} lacks {w:?}")
            }
            (got, want) => panic!("got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn classification() {
        check(Some("t"), Some("echo"), None, "hi", Some("task"));
        check(None, Some("echo"), None, "hi", None);
        check(Some(""), Some("echo"), None, "hi", None);
        check(Some("t"), None, None, "hi", Some("no `type`"));
        check(
            Some("t"),
            Some("nope"),
            None,
            "hi",
            Some("offers echo, sleep"),
        );
        check(
            Some("t"),
            Some("echo"),
            None,
            "01234567890",
            Some("max_body_bytes of 10"),
        );
        check(
            Some("t"),
            Some("echo"),
            Some(Err("bad header".into())),
            "x",
            Some("bad header"),
        );
        check(Some("t"), Some("echo"), Some(Ok(5)), "x", Some("task"));
    }

    fn check_raw(props: RawProperties, want: Option<&str>) {
        let m = RawMessage {
            delivery_tag: 1,
            redelivered: true,
            properties: props,
            body_size: 2,
            body: b"hi".to_vec(),
        };
        let got = classify_raw(&config(), m);
        match (got, want) {
            (None, None) => {}
            (Some(Intake::Task(t)), Some(w)) if w.starts_with("task") => {
                assert_eq!(format!("task {:?}", t.timeout_ms), w)
            }
            (Some(Intake::Rejected { reason, .. }), Some(w)) => {
                assert!(reason.contains(w), "{reason:?} lacks {w:?}")
            }
            (got, want) => panic!("got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn raw_classification() {
        use crate::raw::{FIELD_BYTES, FIELD_SIGNED_32, FIELD_VOID, table_entry};
        let good = || RawProperties {
            message_id: Some(b"t1".to_vec()),
            kind: Some(b"echo".to_vec()),
            headers: None,
            delivery_mode: Some(2),
            reply_to: None,
        };
        check_raw(good(), Some("task None"));
        // reply_to names the service; one that cannot be a routing key word is rejected (to the shared queue).
        let to = |name: &[u8]| RawProperties {
            reply_to: Some(name.to_vec()),
            ..good()
        };
        let m = |props| RawMessage {
            delivery_tag: 1,
            redelivered: false,
            properties: props,
            body_size: 0,
            body: Vec::new(),
        };
        match classify_raw(&config(), m(to(b"svc-1"))) {
            Some(Intake::Task(t)) => assert_eq!(t.reply_to.unwrap().as_str(), "svc-1"),
            other => panic!("{other:?}"),
        }
        match classify_raw(&config(), m(to(b""))) {
            Some(Intake::Task(t)) => assert_eq!(t.reply_to, None),
            other => panic!("{other:?}"),
        }
        for bad in [&b"a.b"[..], b"a*", b"\xff"] {
            match classify_raw(&config(), m(to(bad))) {
                Some(Intake::Rejected {
                    reason, reply_to, ..
                }) => {
                    assert!(reason.contains("reply_to"), "{reason}");
                    assert_eq!(reply_to, None);
                }
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        let timeout = table_entry(
            HEADER_TIMEOUT_MS.as_bytes(),
            FIELD_SIGNED_32,
            &250i32.to_be_bytes(),
        );
        check_raw(
            RawProperties {
                headers: Some(timeout),
                ..good()
            },
            Some("task Some(250)"),
        );
        check_raw(
            RawProperties {
                message_id: Some(b"id\xff".to_vec()),
                ..good()
            },
            None,
        );
        check_raw(
            RawProperties {
                message_id: None,
                ..good()
            },
            None,
        );
        check_raw(
            RawProperties {
                kind: Some(b"ec\xffho".to_vec()),
                ..good()
            },
            Some("`type` property (the function name) is not valid UTF-8"),
        );
        check_raw(
            RawProperties {
                headers: Some(table_entry(b"k\xfe", FIELD_VOID, &[])),
                ..good()
            },
            Some("header name \"k\u{fffd}\" is not valid UTF-8"),
        );
        check_raw(
            RawProperties {
                headers: Some(table_entry(b"k", b'U', &[0, 1])),
                ..good()
            },
            Some("unknown header field type 'U'"),
        );
        let mut big = Vec::new();
        for i in 0..200 {
            big.extend(table_entry(
                format!("h{i}").as_bytes(),
                FIELD_BYTES,
                &[&100u32.to_be_bytes()[..], &[7; 100]].concat(),
            ));
        }
        check_raw(
            RawProperties {
                headers: Some(big),
                ..good()
            },
            Some("over the limit of 16384"),
        );
        let header =
            |value: &[u8], kind: u8| Some(table_entry(HEADER_TIMEOUT_MS.as_bytes(), kind, value));
        let text = |s: &str| [&(s.len() as u32).to_be_bytes()[..], s.as_bytes()].concat();
        check_raw(
            RawProperties {
                headers: header(&text("42"), crate::raw::FIELD_LONG_STRING),
                ..good()
            },
            Some("task Some(42)"),
        );
        for bad in [&(-1i32).to_be_bytes()[..], &0i32.to_be_bytes()[..]] {
            check_raw(
                RawProperties {
                    headers: header(bad, FIELD_SIGNED_32),
                    ..good()
                },
                Some("must be a positive integer"),
            );
        }
        check_raw(
            RawProperties {
                headers: header(&text("soon"), crate::raw::FIELD_LONG_STRING),
                ..good()
            },
            Some("must be a positive integer"),
        );
        // A body the client dropped for its size: rejected by its declared size.
        let dropped = RawMessage {
            delivery_tag: 1,
            redelivered: false,
            properties: good(),
            body_size: 8 << 20,
            body: Vec::new(),
        };
        match classify_raw(&config(), dropped) {
            Some(Intake::Rejected { reason, .. }) => {
                assert!(reason.contains("8388608 bytes"), "{reason}")
            }
            other => panic!("an oversized body must be rejected: {other:?}"),
        }
    }
}

//! Wire protocol v1 (`keel.v1`): JSON text frames with a `type` field.
//! The full description with examples is in `docs/protocol.md`.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::value::RawValue;

/// The WebSocket subprotocol.
pub const SUBPROTOCOL: &str = "keel.v1";

/// Close codes the relay uses.
pub mod close {
    /// The relay is shutting down (RFC 6455 "going away").
    pub const GOING_AWAY: u16 = 1001;
    /// Repeated bad input, or no hello in time (RFC 6455 "policy violation").
    pub const POLICY: u16 = 1008;
    /// The connection fell too far behind; resume from the log (RFC 6455 "try again later").
    pub const SLOW_CONSUMER: u16 = 1013;
    /// The relay failed internally.
    pub const INTERNAL: u16 = 1011;
    /// Another connection resumed this session.
    pub const REPLACED: u16 = 4001;
    /// No frame for longer than the idle timeout.
    pub const IDLE: u16 = 4002;
}

/// A frame from a client.
#[derive(Debug)]
pub enum ClientFrame {
    /// Opens (no token) or resumes (token) a session.
    Hello {
        /// `<session id>.<secret>` as given in an earlier `welcome`.
        token: Option<String>,
        /// Last offset the client has seen, per channel: delivery restarts after it.
        resume: Option<BTreeMap<String, u64>>,
    },
    /// Starts delivery of `channel` from offset `from` (default: after the
    /// session's stored cursor, or only new messages).
    Subscribe {
        /// The channel.
        channel: String,
        /// The first offset wanted.
        from: Option<u64>,
    },
    /// Stops delivery of `channel`.
    Unsubscribe {
        /// The channel.
        channel: String,
    },
    /// Appends `payload` to `channel`; answered with `published` once durable.
    Publish {
        /// The channel.
        channel: String,
        /// The publisher's message id; publishing it again returns the same offset.
        id: String,
        /// Any JSON value, stored and delivered as sent.
        payload: Box<RawValue>,
    },
    /// Sends `body` to `to` at the upstream; answered with `sent` once in the outbox.
    Send {
        /// Idempotency key.
        id: String,
        /// Recipient at the upstream.
        to: String,
        /// Any JSON value.
        body: Box<RawValue>,
    },
    /// Records that the client has everything in `channel` up to `offset`.
    Ack {
        /// The channel.
        channel: String,
        /// The offset.
        offset: u64,
    },
    /// Answered with `pong`.
    Ping,
    /// Starts the allowed command `command` as this session's supervised
    /// child (only when the relay enables exec sessions).
    Exec {
        /// The command's name in the relay's allow-list.
        command: String,
    },
}

impl ClientFrame {
    /// The frame's `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientFrame::Hello { .. } => "hello",
            ClientFrame::Subscribe { .. } => "subscribe",
            ClientFrame::Unsubscribe { .. } => "unsubscribe",
            ClientFrame::Publish { .. } => "publish",
            ClientFrame::Send { .. } => "send",
            ClientFrame::Ack { .. } => "ack",
            ClientFrame::Ping => "ping",
            ClientFrame::Exec { .. } => "exec",
        }
    }
}

/// The stable error codes of `error` frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Not JSON, or not a JSON object.
    BadJson,
    /// A `type` the relay does not know.
    UnknownType,
    /// Well-formed JSON but a missing or wrong field, or an invalid channel name.
    BadRequest,
    /// Frame or payload over the limit.
    TooLarge,
    /// Missing, unknown or wrong token.
    Unauthorized,
    /// Not this session's to read or write (another session's private channel).
    Forbidden,
    /// Over the per-connection publish rate.
    RateLimited,
    /// Not allowed now (e.g. anything before `hello`, a second `hello`).
    InvalidState,
    /// Over a count limit (subscriptions per session).
    LimitExceeded,
    /// The relay cannot store right now (disk full, database failing); retry.
    Unavailable,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::InvalidState => "invalid_state",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::Unavailable => "unavailable",
        }
    }
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// The stable code.
    pub code: ErrorCode,
    /// A human-readable explanation.
    pub message: String,
    /// The frame's `id`, when one could be read.
    pub reference: Option<String>,
}

const KNOWN: [&str; 8] = [
    "exec",
    "hello",
    "subscribe",
    "unsubscribe",
    "publish",
    "send",
    "ack",
    "ping",
];

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    id: Option<std::borrow::Cow<'a, str>>,
}

/// Decodes one text frame. Never panics, whatever the input.
///
/// Frames longer than `max_frame` bytes are `too_large` before any parsing.
pub fn decode(text: &str, max_frame: usize) -> Result<ClientFrame, DecodeError> {
    if text.len() > max_frame {
        return Err(DecodeError {
            code: ErrorCode::TooLarge,
            message: format!(
                "frame of {} bytes is over the {max_frame}-byte limit",
                text.len()
            ),
            reference: None,
        });
    }
    let envelope: Envelope<'_> = serde_json::from_str(text).map_err(|e| DecodeError {
        code: ErrorCode::BadJson,
        message: format!("not a JSON object: {e}"),
        reference: None,
    })?;
    let reference = envelope.id.as_deref().map(str::to_owned);
    let Some(kind) = envelope.kind else {
        return Err(DecodeError {
            code: ErrorCode::BadRequest,
            message: "missing \"type\"".to_owned(),
            reference,
        });
    };
    if !KNOWN.contains(&kind.as_ref()) {
        return Err(DecodeError {
            code: ErrorCode::UnknownType,
            message: format!("unknown type {:?}", truncate(&kind, 64)),
            reference,
        });
    }
    let bad = |e: serde_json::Error| DecodeError {
        code: ErrorCode::BadRequest,
        message: format!("invalid {kind}: {e}"),
        reference: reference.clone(),
    };
    // One struct per type: serde's internally tagged enums buffer their
    // content, which loses a RawValue payload.
    Ok(match kind.as_ref() {
        "hello" => {
            let f: wire::Hello = serde_json::from_str(text).map_err(bad)?;
            ClientFrame::Hello {
                token: f.token,
                resume: f.resume,
            }
        }
        "subscribe" => {
            let f: wire::Subscribe = serde_json::from_str(text).map_err(bad)?;
            ClientFrame::Subscribe {
                channel: f.channel,
                from: f.from,
            }
        }
        "unsubscribe" => {
            let f: wire::Unsubscribe = serde_json::from_str(text).map_err(bad)?;
            ClientFrame::Unsubscribe { channel: f.channel }
        }
        "publish" => {
            let f: wire::Publish = serde_json::from_str(text).map_err(bad)?;
            ClientFrame::Publish {
                channel: f.channel,
                id: f.id,
                payload: f.payload,
            }
        }
        "send" => {
            let f: wire::Send = serde_json::from_str(text).map_err(bad)?;
            ClientFrame::Send {
                id: f.id,
                to: f.to,
                body: f.body,
            }
        }
        "ack" => {
            let f: wire::Ack = serde_json::from_str(text).map_err(bad)?;
            ClientFrame::Ack {
                channel: f.channel,
                offset: f.offset,
            }
        }
        "exec" => {
            let f: wire::Exec = serde_json::from_str(text).map_err(bad)?;
            ClientFrame::Exec { command: f.command }
        }
        _ => {
            let _: wire::Ping = serde_json::from_str(text).map_err(bad)?;
            ClientFrame::Ping
        }
    })
}

/// The frames as they are parsed, one struct per type.
mod wire {
    use std::collections::BTreeMap;

    use serde::Deserialize;
    use serde::de::IgnoredAny;
    use serde_json::value::RawValue;

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Hello {
        #[serde(rename = "type")]
        _kind: IgnoredAny,
        #[serde(default)]
        pub(super) token: Option<String>,
        #[serde(default)]
        pub(super) resume: Option<BTreeMap<String, u64>>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Subscribe {
        #[serde(rename = "type")]
        _kind: IgnoredAny,
        pub(super) channel: String,
        #[serde(default)]
        pub(super) from: Option<u64>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Unsubscribe {
        #[serde(rename = "type")]
        _kind: IgnoredAny,
        pub(super) channel: String,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Publish {
        #[serde(rename = "type")]
        _kind: IgnoredAny,
        pub(super) channel: String,
        pub(super) id: String,
        pub(super) payload: Box<RawValue>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Send {
        #[serde(rename = "type")]
        _kind: IgnoredAny,
        pub(super) id: String,
        pub(super) to: String,
        pub(super) body: Box<RawValue>,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Ack {
        #[serde(rename = "type")]
        _kind: IgnoredAny,
        pub(super) channel: String,
        pub(super) offset: u64,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Exec {
        #[serde(rename = "type")]
        _kind: IgnoredAny,
        pub(super) command: String,
    }

    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    pub(super) struct Ping {
        #[serde(rename = "type")]
        _kind: IgnoredAny,
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Whether `name` is a valid channel name: 1 to 200 bytes of ASCII letters,
/// digits and `:_.-`.
pub fn valid_channel(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'.' | b'-'))
}

/// Whether `id` is a valid message or send id: 1 to 200 bytes, no control characters.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 200 && !id.chars().any(char::is_control)
}

/// A JSON string literal for `s`.
pub(crate) fn json_str(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// `{"type":"deliver","channel":..,"offset":..,"id":..,"payload":..}`, built
/// once per message and shared by every subscriber. A stored payload that is
/// not valid JSON (written by something other than the relay) is delivered as
/// a JSON string of its text.
pub fn deliver_frame(channel: &str, offset: u64, id: &str, payload: &[u8]) -> String {
    let payload_json = match std::str::from_utf8(payload) {
        Ok(text) if serde_json::from_str::<&RawValue>(text).is_ok() => text.to_owned(),
        _ => json_str(&String::from_utf8_lossy(payload)),
    };
    format!(
        r#"{{"type":"deliver","channel":{},"offset":{offset},"id":{},"payload":{payload_json}}}"#,
        json_str(channel),
        json_str(id),
    )
}

/// `{"type":"error","code":..,"message":..,"ref":..}`.
pub fn error_frame(code: ErrorCode, message: &str, reference: Option<&str>) -> String {
    let mut v = serde_json::json!({"type": "error", "code": code.as_str(), "message": message});
    if let Some(r) = reference {
        v["ref"] = r.into();
    }
    v.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_type() {
        let f = decode(
            r#"{"type":"publish","channel":"c","id":"1","payload":{"a":[1,2]}}"#,
            1 << 20,
        )
        .unwrap();
        match f {
            ClientFrame::Publish {
                channel,
                id,
                payload,
            } => {
                assert_eq!((channel.as_str(), id.as_str()), ("c", "1"));
                assert_eq!(payload.get(), r#"{"a":[1,2]}"#);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode(r#"{"type":"ping"}"#, 100),
            Ok(ClientFrame::Ping)
        ));
        assert!(matches!(
            decode(r#"{"type":"hello","resume":{"a":3}}"#, 100),
            Ok(ClientFrame::Hello {
                token: None,
                resume: Some(_)
            })
        ));
    }

    #[test]
    fn classifies_bad_input() {
        let code = |t: &str| decode(t, 1000).unwrap_err().code;
        assert_eq!(code("not json"), ErrorCode::BadJson);
        assert_eq!(code("[1,2]"), ErrorCode::BadJson);
        assert_eq!(
            code(r#"{"type":"teleport","id":"x"}"#),
            ErrorCode::UnknownType
        );
        assert_eq!(code(r#"{"id":"x"}"#), ErrorCode::BadRequest);
        assert_eq!(
            code(r#"{"type":"publish","id":"x"}"#),
            ErrorCode::BadRequest
        );
        assert_eq!(code(r#"{"type":"ping","extra":1}"#), ErrorCode::BadRequest);
        assert_eq!(code(&"x".repeat(1001)), ErrorCode::TooLarge);
        let e = decode(r#"{"type":"publish","id":"m-7"}"#, 1000).unwrap_err();
        assert_eq!(e.reference.as_deref(), Some("m-7"));
    }

    #[test]
    fn deliver_frames_are_valid_json() {
        let f = deliver_frame("room:1", 7, "m\"1", br#"{"x":1}"#);
        let v: serde_json::Value = serde_json::from_str(&f).unwrap();
        assert_eq!(v["payload"]["x"], 1);
        assert_eq!(v["id"], "m\"1");
        let f = deliver_frame("c", 1, "i", b"\xffnot json");
        let v: serde_json::Value = serde_json::from_str(&f).unwrap();
        assert!(v["payload"].is_string());
    }

    #[test]
    fn channel_names() {
        assert!(valid_channel("session:abc-1.x_y"));
        assert!(!valid_channel(""));
        assert!(!valid_channel("a b"));
        assert!(!valid_channel(&"a".repeat(201)));
    }

    proptest::proptest! {
        #[test]
        fn decoder_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let text = String::from_utf8_lossy(&bytes);
            let _ = decode(&text, 256);
        }

        #[test]
        fn decoder_never_panics_on_near_frames(kind in "[a-z_]{0,12}", body in "[ -~]{0,64}") {
            let text = format!(r#"{{"type":"{kind}",{body}}}"#);
            let _ = decode(&text, 1 << 16);
        }
    }
}

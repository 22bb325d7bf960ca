//! Wire protocol v1 (`keel.v1`): JSON text frames with a `type` field.
//! The full description with examples is in `docs/protocol.md`.

use std::borrow::Cow;
use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::value::RawValue;

/// The WebSocket subprotocol.
pub const SUBPROTOCOL: &str = "keel.v1";

/// Close codes the relay uses.
pub mod close {
    /// The relay is shutting down (RFC 6455 "going away").
    pub const GOING_AWAY: u16 = 1001;
    /// A text frame that is not UTF-8 (RFC 6455 "invalid frame payload data").
    pub const INVALID_DATA: u16 = 1007;
    /// Repeated bad input, or no hello in time (RFC 6455 "policy violation").
    pub const POLICY: u16 = 1008;
    /// A message far over the size limit (RFC 6455 "message too big").
    pub const TOO_BIG: u16 = 1009;
    /// The connection fell too far behind; resume from the log (RFC 6455 "try again later").
    pub const SLOW_CONSUMER: u16 = 1013;
    /// The relay failed internally.
    pub const INTERNAL: u16 = 1011;
    /// Another connection resumed this session.
    pub const REPLACED: u16 = 4001;
    /// No frame for longer than the idle timeout.
    pub const IDLE: u16 = 4002;
    /// The connection JWT expired: reconnect with a fresh one.
    pub const EXPIRED: u16 = 4003;
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
        /// The connection JWT (`auth.mode = "jwt"`).
        auth: Option<String>,
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
    /// What an error about this frame names in `ref`: its `id` (publish,
    /// send), else its channel, else the command of an `exec`.
    pub fn reference(&self) -> Option<&str> {
        match self {
            ClientFrame::Publish { id, .. } | ClientFrame::Send { id, .. } => Some(id),
            ClientFrame::Subscribe { channel, .. }
            | ClientFrame::Unsubscribe { channel }
            | ClientFrame::Ack { channel, .. } => Some(channel),
            ClientFrame::Exec { command } => Some(command),
            ClientFrame::Hello { .. } | ClientFrame::Ping => None,
        }
    }

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
    /// Every code, in the order docs/protocol.md lists them.
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::BadJson,
        ErrorCode::UnknownType,
        ErrorCode::BadRequest,
        ErrorCode::TooLarge,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::RateLimited,
        ErrorCode::InvalidState,
        ErrorCode::LimitExceeded,
        ErrorCode::Unavailable,
    ];

    /// Every code as it appears on the wire, in [`ErrorCode::ALL`]'s order.
    pub const NAMES: [&'static str; 10] = {
        let mut names = [""; 10];
        let mut i = 0;
        while i < names.len() {
            names[i] = ErrorCode::ALL[i].as_str();
            i += 1;
        }
        names
    };

    /// The code as it appears on the wire.
    pub const fn as_str(self) -> &'static str {
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

/// The largest offset on the wire: offsets are stored as SQLite integers.
pub const MAX_OFFSET: u64 = i64::MAX as u64;

/// What the first pass over a frame finds: that it is a JSON object, its
/// `type`, and what to name in `ref` (the `id`, else the `channel`). Every
/// other field is skipped without being built, so a large payload costs no
/// allocation here, and a field of the wrong type is left for the second,
/// typed pass to report as `bad_request`.
/// Its strings borrow from the frame unless they hold escapes: a
/// well-formed frame costs no allocation in this pass.
#[derive(Default)]
struct Envelope<'de> {
    kind: Option<Result<Cow<'de, str>, ()>>,
    id: Option<Option<Cow<'de, str>>>,
    channel: Option<Option<Cow<'de, str>>>,
    duplicate: Option<&'static str>,
}

impl<'de> Deserialize<'de> for Envelope<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Envelope<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Envelope<'de>, A::Error> {
                let mut env = Envelope::default();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    let (slot, name) = match key.as_ref() {
                        "type" => {
                            let v = map.next_value::<MaybeString>()?.0;
                            if env.kind.replace(v.ok_or(())).is_some() {
                                env.duplicate.get_or_insert("type");
                            }
                            continue;
                        }
                        "id" => (&mut env.id, "id"),
                        "channel" => (&mut env.channel, "channel"),
                        _ => {
                            map.next_value::<serde::de::IgnoredAny>()?;
                            continue;
                        }
                    };
                    let v = map.next_value::<MaybeString>()?.0;
                    if slot.replace(v).is_some() {
                        env.duplicate.get_or_insert(name);
                    }
                }
                Ok(env)
            }
        }
        d.deserialize_map(V)
    }
}

/// A JSON value kept only when it is a string (borrowed from the frame
/// when it holds no escapes).
struct MaybeString<'de>(Option<Cow<'de, str>>);

impl<'de> Deserialize<'de> for MaybeString<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = MaybeString<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }

            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<MaybeString<'de>, E> {
                Ok(MaybeString(Some(Cow::Borrowed(v))))
            }

            fn visit_str<E>(self, v: &str) -> Result<MaybeString<'de>, E> {
                Ok(MaybeString(Some(Cow::Owned(v.to_owned()))))
            }

            fn visit_bool<E>(self, _: bool) -> Result<MaybeString<'de>, E> {
                Ok(MaybeString(None))
            }

            fn visit_i64<E>(self, _: i64) -> Result<MaybeString<'de>, E> {
                Ok(MaybeString(None))
            }

            fn visit_u64<E>(self, _: u64) -> Result<MaybeString<'de>, E> {
                Ok(MaybeString(None))
            }

            fn visit_f64<E>(self, _: f64) -> Result<MaybeString<'de>, E> {
                Ok(MaybeString(None))
            }

            fn visit_unit<E>(self) -> Result<MaybeString<'de>, E> {
                Ok(MaybeString(None))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<MaybeString<'de>, A::Error> {
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
                Ok(MaybeString(None))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<MaybeString<'de>, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(MaybeString(None))
            }
        }
        d.deserialize_any(V)
    }
}

/// Decodes one text frame. Never panics, whatever the input.
///
/// Frames longer than `max_frame` bytes are `too_large` before any parsing.
/// Text that is not a JSON object is `bad_json`; an object with a missing,
/// repeated or wrong field is `bad_request` (`unknown_type` for a `type`
/// string the relay does not know); fields the relay does not know are
/// ignored.
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
    let envelope: Envelope = serde_json::from_str(text).map_err(|e| DecodeError {
        code: ErrorCode::BadJson,
        message: format!("not a JSON object: {e}"),
        reference: None,
    })?;
    // `ref` names the frame's id (publish, send) or else its channel.
    let reference = match (envelope.id, envelope.channel) {
        (Some(Some(id)), _) => Some(id),
        (_, Some(Some(channel))) => Some(channel),
        _ => None,
    };
    let request = |message: String| DecodeError {
        code: ErrorCode::BadRequest,
        message,
        reference: reference.as_deref().map(str::to_owned),
    };
    if let Some(field) = envelope.duplicate {
        return Err(request(format!("\"{field}\" appears more than once")));
    }
    let kind = match envelope.kind {
        None => return Err(request("missing \"type\"".to_owned())),
        Some(Err(())) => return Err(request("\"type\" must be a string".to_owned())),
        Some(Ok(kind)) => kind,
    };
    if !KNOWN.contains(&kind.as_ref()) {
        return Err(DecodeError {
            code: ErrorCode::UnknownType,
            message: format!("unknown type {:?}", truncate(&kind, 64)),
            reference: reference.map(Cow::into_owned),
        });
    }
    let bad = |e: serde_json::Error| request(format!("invalid {kind}: {e}"));
    // One struct per type: serde's internally tagged enums buffer their
    // content, which loses a RawValue payload.
    Ok(match kind.as_ref() {
        "hello" => {
            let f: wire::Hello = serde_json::from_str(text).map_err(bad)?;
            if let Some((channel, _)) = f.resume.iter().flatten().find(|(_, o)| **o > MAX_OFFSET) {
                return Err(DecodeError {
                    code: ErrorCode::BadRequest,
                    message: format!("resume offset of {channel:?} is over {MAX_OFFSET}"),
                    reference: Some(channel.clone()),
                });
            }
            ClientFrame::Hello {
                token: f.token,
                resume: f.resume,
                auth: f.auth,
            }
        }
        "subscribe" => {
            let f: wire::Subscribe = serde_json::from_str(text).map_err(bad)?;
            if f.from.is_some_and(|o| o > MAX_OFFSET) {
                return Err(request(format!("\"from\" is over {MAX_OFFSET}")));
            }
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
            if f.offset > MAX_OFFSET {
                return Err(request(format!("\"offset\" is over {MAX_OFFSET}")));
            }
            ClientFrame::Ack {
                channel: f.channel,
                offset: f.offset,
            }
        }
        "exec" => {
            let f: wire::Exec = serde_json::from_str(text).map_err(bad)?;
            ClientFrame::Exec { command: f.command }
        }
        _ => ClientFrame::Ping,
    })
}

/// The frames as they are parsed, one struct per type. Unknown fields are
/// ignored (tolerant reader); a field given twice is an error.
mod wire {
    use std::collections::BTreeMap;

    use serde::Deserialize;
    use serde::de::IgnoredAny;
    use serde_json::value::RawValue;

    #[derive(Deserialize)]
    pub(super) struct Hello {
        #[serde(rename = "type")]
        _kind: IgnoredAny,
        #[serde(default)]
        pub(super) token: Option<String>,
        #[serde(default)]
        pub(super) resume: Option<BTreeMap<String, u64>>,
        #[serde(default)]
        pub(super) auth: Option<String>,
    }

    #[derive(Deserialize)]
    pub(super) struct Subscribe {
        #[serde(rename = "type")]
        _kind: IgnoredAny,
        pub(super) channel: String,
        #[serde(default)]
        pub(super) from: Option<u64>,
    }

    #[derive(Deserialize)]
    pub(super) struct Unsubscribe {
        #[serde(rename = "type")]
        _kind: IgnoredAny,
        pub(super) channel: String,
    }

    #[derive(Deserialize)]
    pub(super) struct Publish {
        #[serde(rename = "type")]
        _kind: IgnoredAny,
        pub(super) channel: String,
        pub(super) id: String,
        pub(super) payload: Box<RawValue>,
    }

    #[derive(Deserialize)]
    pub(super) struct Send {
        #[serde(rename = "type")]
        _kind: IgnoredAny,
        pub(super) id: String,
        pub(super) to: String,
        pub(super) body: Box<RawValue>,
    }

    #[derive(Deserialize)]
    pub(super) struct Ack {
        #[serde(rename = "type")]
        _kind: IgnoredAny,
        pub(super) channel: String,
        pub(super) offset: u64,
    }

    #[derive(Deserialize)]
    pub(super) struct Exec {
        #[serde(rename = "type")]
        _kind: IgnoredAny,
        pub(super) command: String,
    }
}

/// How deeply arrays and objects nest in the JSON text `raw` (0 for a
/// scalar), counted without building anything; stops counting past `limit`.
pub fn nesting_depth(raw: &str, limit: usize) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for b in raw.bytes() {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > deepest {
                    deepest = depth;
                    if deepest > limit {
                        return deepest;
                    }
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

/// Whether arrays and objects nest deeper than `limit` in `raw`. Nesting
/// that deep takes more than `limit` opening brackets, so most payloads are
/// told apart by a count the compiler vectorizes (a 1 MiB payload in tens
/// of microseconds), without the byte-by-byte walk of [`nesting_depth`].
pub fn nests_deeper_than(raw: &str, limit: usize) -> bool {
    // A string, number or literal nests nothing (a 1 MiB string is common
    // enough to skip the count below).
    if !raw.trim_start().starts_with(['[', '{']) {
        return false;
    }
    let opening = raw
        .as_bytes()
        .iter()
        .filter(|&&b| b == b'[' || b == b'{')
        .count();
    opening > limit && nesting_depth(raw, limit) > limit
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

/// A JSON string literal for `s` (serialised straight from `s`: no copy
/// into a `Value` first; a string always serialises).
pub(crate) fn json_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| String::from("\"\""))
}

/// Appends `s` as a JSON string, as [`json_str`] writes it, without an
/// allocation when it needs no escape (serde_json escapes only `"`, `\\`
/// and control characters).
pub(crate) fn push_json_str(out: &mut String, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        out.push_str(&json_str(s));
    }
}

/// `{"type":"published","id":..,"channel":..,"offset":..}`: one allocation.
pub(crate) fn published_frame(id: &str, channel: &str, offset: u64) -> String {
    use std::fmt::Write;
    let mut f = String::with_capacity(id.len() + channel.len() + 64);
    f.push_str(r#"{"type":"published","id":"#);
    push_json_str(&mut f, id);
    f.push_str(r#","channel":"#);
    push_json_str(&mut f, channel);
    let _ = write!(f, r#","offset":{offset}}}"#);
    f
}

/// `{"type":"deliver","channel":..,"offset":..,"id":..,"payload":..}`, built
/// once per message and shared by every subscriber. A stored payload that is
/// not valid JSON (written by something other than the relay) is delivered as
/// a JSON string of its text.
pub fn deliver_frame(channel: &str, offset: u64, id: &str, payload: &[u8]) -> String {
    match std::str::from_utf8(payload) {
        Ok(text) if serde_json::from_str::<&RawValue>(text).is_ok() => {
            deliver_frame_json(channel, offset, id, text)
        }
        _ => deliver_frame_json(
            channel,
            offset,
            id,
            &json_str(&String::from_utf8_lossy(payload)),
        ),
    }
}

/// [`deliver_frame`] for a payload known to be valid JSON (one this
/// process decoded from a frame): not parsed again, copied once.
pub(crate) fn deliver_frame_json(channel: &str, offset: u64, id: &str, payload: &str) -> String {
    use std::fmt::Write;
    let mut f = String::with_capacity(payload.len() + channel.len() + id.len() + 72);
    f.push_str(r#"{"type":"deliver","channel":"#);
    push_json_str(&mut f, channel);
    let _ = write!(f, r#","offset":{offset}"#);
    f.push_str(r#","id":"#);
    push_json_str(&mut f, id);
    f.push_str(r#","payload":"#);
    f.push_str(payload);
    f.push('}');
    f
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

    /// The allocation-free path writes exactly what serde_json writes.
    #[test]
    fn strings_are_written_as_serde_json_writes_them() {
        for s in [
            "",
            "plain",
            "with \"quotes\"",
            "back\\slash",
            "tab\there",
            "nul\u{0}",
            "\u{1f}",
            "\u{7f}",
            "é and \u{2028} and 😀",
            "/slash/",
        ] {
            let mut out = String::from("x");
            push_json_str(&mut out, s);
            assert_eq!(
                out,
                format!("x{}", serde_json::to_string(s).unwrap()),
                "{s:?}"
            );
        }
        let f = published_frame("a\"b", "ch", 7);
        let v: serde_json::Value = serde_json::from_str(&f).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type": "published", "id": "a\"b", "channel": "ch", "offset": 7})
        );
    }

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
                resume: Some(_),
                auth: None,
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
        assert!(decode(r#"{"type":"ping","extra":{"deep":[1]}}"#, 1000).is_ok());
        for wrong_field in [
            r#"{"type":5}"#,
            r#"{"type":"publish","channel":"c","id":5,"payload":1}"#,
            r#"{"type":"publish","channel":"c","id":{},"payload":1}"#,
            r#"{"type":"publish","channel":"c","id":[],"payload":1}"#,
            r#"{"type":"ping","type":"ping"}"#,
            r#"{"type":"publish","id":"a","id":"b","channel":"c","payload":1}"#,
            r#"{"type":"subscribe","channel":"c","from":-1}"#,
            r#"{"type":"subscribe","channel":"c","from":1.5}"#,
            r#"{"type":"subscribe","channel":"c","from":"1"}"#,
            r#"{"type":"subscribe","channel":"c","from":18446744073709551616}"#,
            r#"{"type":"subscribe","channel":"c","from":9223372036854775808}"#,
            r#"{"type":"ack","channel":"c","offset":18446744073709551615}"#,
            r#"{"type":"hello","resume":{"c":18446744073709551615}}"#,
        ] {
            assert_eq!(code(wrong_field), ErrorCode::BadRequest, "{wrong_field}");
        }
        let e = decode(r#"{"type":"subscribe","channel":"room","from":-1}"#, 1000).unwrap_err();
        assert_eq!(e.reference.as_deref(), Some("room"));
        let e = decode(
            r#"{"type":"hello","resume":{"a":1,"b":18446744073709551615}}"#,
            1000,
        )
        .unwrap_err();
        assert_eq!(e.reference.as_deref(), Some("b"));
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
        assert_eq!(
            deliver_frame_json("room:1", 7, "m\"1", r#"{"x":1}"#),
            deliver_frame("room:1", 7, "m\"1", br#"{"x":1}"#)
        );
    }

    #[test]
    fn nesting_depth_counts_outside_strings() {
        assert_eq!(nesting_depth("1", 64), 0);
        assert!(!nests_deeper_than(&"[".repeat(64), 64));
        assert!(nests_deeper_than(&"[".repeat(65), 64));
        assert!(!nests_deeper_than(&format!("\"{}\"", "[".repeat(100)), 64));
        assert!(nests_deeper_than(&format!("  {}", "[".repeat(65)), 64));
        assert_eq!(nesting_depth(r#"{"a":[1,{"b":2}]}"#, 64), 3);
        assert_eq!(nesting_depth(r#""[[[{{{\"[""#, 64), 0);
        assert_eq!(nesting_depth(r#"["\\",[]]"#, 64), 2);
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(
            nesting_depth(&deep, 64),
            65,
            "stops counting past the limit"
        );
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

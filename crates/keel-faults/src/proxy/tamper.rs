//! The ground truth of frame toxics: one record per message tampered with.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::Stream;

/// What a frame toxic did to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TamperAction {
    /// Not forwarded (`ws_drop`; `ws_early_close`: a message from the
    /// server after the proxy answered the client's close).
    Drop,
    /// Forwarded twice (`ws_duplicate`).
    Duplicate,
    /// Held, then forwarded after a later message (`ws_reorder`).
    Reorder,
    /// A field replaced (`ws_corrupt`).
    Corrupt,
    /// Forwarded late (`ws_delay`).
    Delay,
    /// The client's close answered by the proxy at once and passed on to
    /// the server late (`ws_early_close`).
    EarlyClose,
}

/// One message tampered with by a frame toxic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tampering {
    /// Position in the proxy's record, from 0; it keeps counting across
    /// [`Proxy::clear_tamperings`](super::Proxy::clear_tamperings) and past
    /// the cap, so a gap shows records that were not kept.
    pub seq: u64,
    /// Milliseconds since the proxy started.
    pub at_ms: u64,
    /// The toxic's name.
    pub toxic: String,
    /// What it did.
    pub action: TamperAction,
    /// False only for a reorder whose message was released without being
    /// overtaken (it reached the receiver in its place), and for an early
    /// close whose connection ended before the client's close was passed on
    /// (the server never got it).
    pub effective: bool,
    /// The proxy's id of the connection (0 for the first one accepted).
    pub connection: u64,
    /// The direction of the message.
    pub stream: Stream,
    /// The message's top-level scalar fields (strings cut to 200 characters);
    /// empty if it is not a JSON object. For an early close,
    /// `{"code": <the client's status code, or null>}`.
    pub fields: Map<String, Value>,
    /// What happened, e.g. `overtaken by {...}`, `payload replaced by ...`,
    /// `delayed 200 ms`, `answered the client's close at once; passed it on
    /// 500 ms later`.
    pub detail: String,
}

/// Records kept per proxy; later ones are counted, not kept.
pub(super) const MAX_RECORDS: usize = 100_000;

/// The records of one proxy.
#[derive(Debug, Default)]
pub(super) struct TamperLog {
    pub(super) records: Vec<Tampering>,
    pub(super) next_seq: u64,
    pub(super) dropped: u64,
}

impl TamperLog {
    /// Appends `t`, giving it the next sequence number.
    pub(super) fn push(&mut self, mut t: Tampering) {
        t.seq = self.next_seq;
        self.next_seq += 1;
        if self.records.len() < MAX_RECORDS {
            self.records.push(t);
        } else {
            self.dropped += 1;
        }
    }
}

/// Longest string kept in [`Tampering::fields`] and in details, in characters.
const MAX_STRING: usize = 200;

/// `s` cut to [`MAX_STRING`] characters.
pub(super) fn truncate(s: &str) -> String {
    match s.char_indices().nth(MAX_STRING) {
        Some((i, _)) => s[..i].to_owned(),
        None => s.to_owned(),
    }
}

/// The top-level scalar fields of a JSON object, strings truncated.
pub(super) fn scalar_fields(object: Option<&Map<String, Value>>) -> Map<String, Value> {
    let Some(object) = object else {
        return Map::new();
    };
    object
        .iter()
        .filter_map(|(k, v)| match v {
            Value::String(s) => Some((k.clone(), Value::String(truncate(s)))),
            Value::Number(_) | Value::Bool(_) | Value::Null => Some((k.clone(), v.clone())),
            Value::Array(_) | Value::Object(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn fields_keep_scalars_and_cut_long_strings() {
        let long = "é".repeat(300);
        let object = json!({"type": "deliver", "offset": 3, "ok": true, "none": null,
            "payload": {"a": 1}, "list": [1], "id": long});
        let fields = scalar_fields(object.as_object());
        assert_eq!(
            Value::Object(fields),
            json!({"type": "deliver", "offset": 3, "ok": true, "none": null, "id": "é".repeat(200)})
        );
        assert!(scalar_fields(None).is_empty());
    }

    #[test]
    fn log_caps_and_counts() {
        let mut log = TamperLog::default();
        let t = Tampering {
            seq: 0,
            at_ms: 0,
            toxic: "t".into(),
            action: TamperAction::Drop,
            effective: true,
            connection: 0,
            stream: Stream::Downstream,
            fields: Map::new(),
            detail: String::new(),
        };
        for _ in 0..MAX_RECORDS + 5 {
            log.push(t.clone());
        }
        assert_eq!((log.records.len(), log.dropped), (MAX_RECORDS, 5));
        assert_eq!(log.records[7].seq, 7);
        assert_eq!(log.next_seq, MAX_RECORDS as u64 + 5);
    }
}

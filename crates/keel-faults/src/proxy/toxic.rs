//! Toxics: what the chaos proxy does to the bytes of a link, modelled on
//! Toxiproxy's, and to the WebSocket messages of a link (the `ws_*` ones).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Which direction a toxic acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    /// Client to server.
    Upstream,
    /// Server to client.
    Downstream,
}

/// A toxic's type and attributes. Times are in milliseconds unless named
/// otherwise, rates in KiB/s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "attributes", rename_all = "snake_case")]
pub enum ToxicKind {
    /// Delays every chunk by `latency` ± `jitter` ms.
    Latency {
        /// Base delay, ms.
        latency: u64,
        /// Uniform jitter either side, ms.
        #[serde(default)]
        jitter: u64,
    },
    /// Limits throughput to `rate` KiB/s.
    Bandwidth {
        /// KiB per second.
        rate: u64,
    },
    /// Blackholes the stream: data is held, not delivered. With `timeout` > 0
    /// the connection is closed that many ms after the toxic applies; with 0 it
    /// stays open and the data flows again when the toxic is removed.
    Timeout {
        /// ms until close; 0 never closes.
        #[serde(default)]
        timeout: u64,
    },
    /// Resets the connection (TCP RST, so the peer sees ECONNRESET) `timeout`
    /// ms after the toxic applies.
    ResetPeer {
        /// ms until the reset.
        #[serde(default)]
        timeout: u64,
    },
    /// Delays the close of the stream by `delay` ms after the source closed.
    SlowClose {
        /// ms.
        delay: u64,
    },
    /// Splits writes into slices of `average_size` ± `size_variation` bytes,
    /// `delay` µs apart.
    Slicer {
        /// Mean slice size, bytes.
        average_size: usize,
        /// Uniform variation either side, bytes.
        #[serde(default)]
        size_variation: usize,
        /// Pause between slices, µs.
        #[serde(default)]
        delay: u64,
    },
    /// Closes the connection once `bytes` bytes have passed on this stream.
    LimitData {
        /// Bytes allowed through.
        bytes: u64,
    },
    /// WebSocket proxies only: the chosen messages are not forwarded.
    WsDrop {
        /// Which messages, how often, how many.
        #[serde(flatten)]
        filter: FrameFilter,
    },
    /// WebSocket proxies only: the chosen messages are forwarded twice, back
    /// to back.
    WsDuplicate {
        /// Which messages, how often, how many.
        #[serde(flatten)]
        filter: FrameFilter,
    },
    /// WebSocket proxies only: a chosen message is held and forwarded right
    /// after the next matching message (the next one with the same values of
    /// the `same` fields, if any). If none comes within `max_hold` ms, or a
    /// close frame or the end of the stream comes first, it is released
    /// without being overtaken (recorded as not effective).
    WsReorder {
        /// Which messages, how often, how many.
        #[serde(flatten)]
        filter: FrameFilter,
        /// Top-level fields the overtaking message must share with the held
        /// one (e.g. `["channel"]`); empty: any matching message overtakes.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        same: Vec<String>,
        /// ms a message is held at most. Default 1000.
        #[serde(default = "max_hold")]
        max_hold: u64,
    },
    /// WebSocket proxies only: the top-level `field` of a chosen JSON message
    /// is replaced by `value` and the frame re-encoded. A message without that
    /// field is left alone.
    WsCorrupt {
        /// Which messages, how often, how many.
        #[serde(flatten)]
        filter: FrameFilter,
        /// The field replaced. Default `"payload"`.
        #[serde(default = "payload")]
        field: String,
        /// What replaces it. Default the string `"corrupted by keel-chaos-proxy"`.
        #[serde(default = "corrupted")]
        value: Value,
    },
    /// WebSocket proxies only: a chosen message, and so everything behind it
    /// on its stream (order kept), waits `delay` ms before being forwarded,
    /// counted from when everything before it was due: the receiver sees a
    /// gap of at least `delay` ms before each delayed message.
    WsDelay {
        /// Which messages, how often, how many.
        #[serde(flatten)]
        filter: FrameFilter,
        /// ms.
        delay: u64,
    },
    /// WebSocket proxies only, `upstream` only: behaves like an intermediary
    /// that terminates WebSocket (a reverse proxy, load balancer or TLS
    /// terminator) at close time. When the client's close frame is chosen,
    /// the proxy answers it at once with a close frame of its own (the
    /// client's status code echoed, 1000 if it sent none) and closes its
    /// connection to the client, as if it were the server; it passes the
    /// client's close on to the server `delay` ms later, and everything
    /// behind it on the stream waits (order kept). From its answer on,
    /// nothing more from the server reaches the client: the server's own
    /// close answer is not forwarded, and a data message the server sends
    /// meanwhile is not either (recorded as a drop). Only
    /// `every` and `limit` of the filter apply: close frames are not JSON,
    /// so `match` must be empty. At most one close per connection.
    WsEarlyClose {
        /// How often, how many (`match` must be empty).
        #[serde(flatten)]
        filter: FrameFilter,
        /// ms between the proxy's answer and the client's close reaching
        /// the server. Default 500.
        #[serde(default = "early_close_delay")]
        delay: u64,
    },
}

impl ToxicKind {
    /// The filter of a frame (`ws_*`) toxic; `None` for a byte-level one.
    pub fn frame_filter(&self) -> Option<&FrameFilter> {
        match self {
            ToxicKind::WsDrop { filter }
            | ToxicKind::WsDuplicate { filter }
            | ToxicKind::WsReorder { filter, .. }
            | ToxicKind::WsCorrupt { filter, .. }
            | ToxicKind::WsDelay { filter, .. }
            | ToxicKind::WsEarlyClose { filter, .. } => Some(filter),
            _ => None,
        }
    }

    /// The toxic's `type` as written in JSON, e.g. `"ws_drop"`.
    pub fn type_name(&self) -> &'static str {
        match self {
            ToxicKind::Latency { .. } => "latency",
            ToxicKind::Bandwidth { .. } => "bandwidth",
            ToxicKind::Timeout { .. } => "timeout",
            ToxicKind::ResetPeer { .. } => "reset_peer",
            ToxicKind::SlowClose { .. } => "slow_close",
            ToxicKind::Slicer { .. } => "slicer",
            ToxicKind::LimitData { .. } => "limit_data",
            ToxicKind::WsDrop { .. } => "ws_drop",
            ToxicKind::WsDuplicate { .. } => "ws_duplicate",
            ToxicKind::WsReorder { .. } => "ws_reorder",
            ToxicKind::WsCorrupt { .. } => "ws_corrupt",
            ToxicKind::WsDelay { .. } => "ws_delay",
            ToxicKind::WsEarlyClose { .. } => "ws_early_close",
        }
    }
}

/// Which WebSocket text messages a frame toxic acts on, how often and how
/// many times: the attributes every `ws_*` toxic shares.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FrameFilter {
    /// JSON `match`: a message matches if it is a JSON object whose top-level
    /// fields equal each of these. Empty (the default) matches every text
    /// message, JSON or not.
    #[serde(rename = "match", default, skip_serializing_if = "Map::is_empty")]
    pub matching: Map<String, Value>,
    /// One matching message in `every` is tampered with (each with
    /// probability 1/`every`, from a seeded RNG). At least 1; default 1.
    #[serde(default = "one")]
    pub every: u64,
    /// At most this many tamperings by the toxic in the proxy's life, across
    /// connections (the count restarts when the toxic is replaced or removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
}

impl Default for FrameFilter {
    /// Every text message, no limit.
    fn default() -> Self {
        FrameFilter {
            matching: Map::new(),
            every: 1,
            limit: None,
        }
    }
}

impl FrameFilter {
    /// Whether a message whose JSON object is `object` (`None`: not a JSON
    /// object) matches.
    pub(crate) fn matches(&self, object: Option<&Map<String, Value>>) -> bool {
        self.matching.is_empty()
            || object.is_some_and(|o| self.matching.iter().all(|(k, v)| o.get(k) == Some(v)))
    }
}

fn one() -> u64 {
    1
}

fn max_hold() -> u64 {
    1000
}

fn early_close_delay() -> u64 {
    500
}

fn payload() -> String {
    "payload".to_owned()
}

fn corrupted() -> Value {
    Value::String("corrupted by keel-chaos-proxy".to_owned())
}

fn downstream() -> Stream {
    Stream::Downstream
}

fn always() -> f64 {
    1.0
}

/// A named toxic on one stream of a proxy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Toxic {
    /// Unique within its proxy (may be left out when updating by name).
    #[serde(default)]
    pub name: String,
    /// Type and attributes.
    #[serde(flatten)]
    pub kind: ToxicKind,
    /// Direction. Default downstream.
    #[serde(default = "downstream")]
    pub stream: Stream,
    /// Probability that the toxic applies to a given connection, decided once
    /// per connection from the proxy's seeded RNG. 0 is a true no-op. Default 1.
    #[serde(default = "always")]
    pub toxicity: f64,
}

impl Toxic {
    /// A toxic with toxicity 1.
    pub fn new(name: &str, stream: Stream, kind: ToxicKind) -> Toxic {
        Toxic {
            name: name.to_owned(),
            kind,
            stream,
            toxicity: 1.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[track_caller]
    fn check(json: Value, expected: Toxic) {
        let parsed: Toxic = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(parsed, expected);
        let back: Toxic = serde_json::from_value(serde_json::to_value(&parsed).unwrap()).unwrap();
        assert_eq!(back, expected, "round trip");
    }

    #[test]
    fn frame_toxics_in_json() {
        check(
            json!({"name": "d", "type": "ws_drop", "attributes": {}}),
            Toxic::new(
                "d",
                Stream::Downstream,
                ToxicKind::WsDrop {
                    filter: FrameFilter::default(),
                },
            ),
        );
        let mut matching = Map::new();
        matching.insert("type".into(), json!("deliver"));
        check(
            json!({"name": "r", "type": "ws_reorder", "stream": "upstream", "toxicity": 0.5,
                "attributes": {"match": {"type": "deliver"}, "every": 5, "limit": 3,
                    "same": ["channel"], "max_hold": 200}}),
            Toxic {
                toxicity: 0.5,
                ..Toxic::new(
                    "r",
                    Stream::Upstream,
                    ToxicKind::WsReorder {
                        filter: FrameFilter {
                            matching,
                            every: 5,
                            limit: Some(3),
                        },
                        same: vec!["channel".into()],
                        max_hold: 200,
                    },
                )
            },
        );
        check(
            json!({"name": "c", "type": "ws_corrupt", "attributes": {}}),
            Toxic::new(
                "c",
                Stream::Downstream,
                ToxicKind::WsCorrupt {
                    filter: FrameFilter::default(),
                    field: "payload".into(),
                    value: json!("corrupted by keel-chaos-proxy"),
                },
            ),
        );
        check(
            json!({"name": "w", "type": "ws_delay", "attributes": {"delay": 200, "every": 2}}),
            Toxic::new(
                "w",
                Stream::Downstream,
                ToxicKind::WsDelay {
                    filter: FrameFilter {
                        every: 2,
                        ..FrameFilter::default()
                    },
                    delay: 200,
                },
            ),
        );
        check(
            json!({"name": "e", "type": "ws_early_close", "stream": "upstream",
                "attributes": {"limit": 1}}),
            Toxic::new(
                "e",
                Stream::Upstream,
                ToxicKind::WsEarlyClose {
                    filter: filter_with_limit(1),
                    delay: 500,
                },
            ),
        );
        let early = ToxicKind::WsEarlyClose {
            filter: FrameFilter::default(),
            delay: 250,
        };
        assert_eq!(early.type_name(), "ws_early_close");
        assert_eq!(
            serde_json::to_value(Toxic::new("e", Stream::Upstream, early)).unwrap(),
            json!({"name": "e", "type": "ws_early_close", "attributes": {"every": 1, "delay": 250},
                "stream": "upstream", "toxicity": 1.0})
        );
        let dup = ToxicKind::WsDuplicate {
            filter: FrameFilter::default(),
        };
        assert_eq!(
            serde_json::to_value(Toxic::new("u", Stream::Downstream, dup)).unwrap(),
            json!({"name": "u", "type": "ws_duplicate", "attributes": {"every": 1},
                "stream": "downstream", "toxicity": 1.0})
        );
    }

    fn filter_with_limit(limit: u64) -> FrameFilter {
        FrameFilter {
            limit: Some(limit),
            ..FrameFilter::default()
        }
    }

    #[test]
    fn match_filter() {
        let filter: FrameFilter =
            serde_json::from_value(json!({"match": {"type": "deliver", "channel": "c"}})).unwrap();
        let object = |v: Value| v.as_object().cloned();
        assert!(
            filter
                .matches(object(json!({"type": "deliver", "channel": "c", "offset": 1})).as_ref())
        );
        assert!(!filter.matches(object(json!({"type": "ack", "channel": "c"})).as_ref()));
        assert!(!filter.matches(object(json!({"type": "deliver"})).as_ref()));
        assert!(
            !filter.matches(None),
            "not JSON: only an empty match matches"
        );
        assert!(FrameFilter::default().matches(None));
    }
}

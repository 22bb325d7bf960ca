//! Cluster mode's bus between relay nodes, on NATS core (docs/cluster.md).
//!
//! After a commit, a node publishes the committed batch of a channel on
//! `keel.ch.<channel>`: offsets and the deliver frames, as its own hub got
//! them. Every node listens to `keel.ch.>` and hands batches of channels it
//! has subscribers for to its hub, whose writers deliver in offset order and
//! read any gap from the store. NATS is a hint and PostgreSQL the truth: a
//! batch the bus loses costs latency (the catch-up loop reads it), never
//! data.
//!
//! A node also answers takeovers on `keel.node.<id>.takeover`: another node
//! resumed one of its sessions, so it closes its connection (4001).

use std::sync::Arc;
use std::time::Duration;

use crate::upgrade::Utf8Bytes;
use async_nats::{HeaderMap, HeaderValue};
use futures::StreamExt;

/// Header naming the node that published a batch (a node skips its own).
const NODE: &str = "Keel-Node";
/// Header naming the batch's channel.
const CHANNEL: &str = "Keel-Channel";

/// How long a publish may wait for room in the client's buffer while NATS
/// is away, before the batch is left to the catch-up loop.
const PUBLISH_WAIT: Duration = Duration::from_millis(50);

/// The subject of `channel`'s batches. Channel names are letters, digits
/// and `: _ . -`; a name with an empty subject token (`a..b`, a leading or
/// trailing `.`) goes under `keel.ch._` hex-encoded.
pub(crate) fn subject(channel: &str) -> String {
    if channel.split('.').any(str::is_empty) {
        let hex: String = channel.bytes().map(|b| format!("{b:02x}")).collect();
        format!("keel.ch._.{hex}")
    } else {
        format!("keel.ch.{channel}")
    }
}

fn takeover_subject(node: &str) -> String {
    format!("keel.node.{node}.takeover")
}

/// Encodes a batch: for each message its offset (8 bytes, big-endian), the
/// frame's length (4 bytes) and the frame.
pub(crate) fn encode(batch: &[(u64, Utf8Bytes)]) -> Vec<u8> {
    let size: usize = batch.iter().map(|(_, f)| 12 + f.len()).sum();
    let mut out = Vec::with_capacity(size);
    for (offset, frame) in batch {
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
        out.extend_from_slice(frame.as_str().as_bytes());
    }
    out
}

/// Decodes [`encode`]'s output; `None` for anything malformed (a batch
/// from the bus is checked like any other input).
pub(crate) fn decode(mut bytes: &[u8]) -> Option<Vec<(u64, Utf8Bytes)>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let offset = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let len = u32::from_be_bytes(bytes.get(8..12)?.try_into().ok()?) as usize;
        let frame = std::str::from_utf8(bytes.get(12..12 + len)?).ok()?;
        out.push((offset, Utf8Bytes::from(frame.to_owned())));
        bytes = &bytes[12 + len..];
    }
    Some(out)
}

/// What a takeover request asks: close the connection holding a session.
pub(crate) type Kick = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// This node's connection to the bus.
pub(crate) struct Bus {
    client: async_nats::Client,
    node: String,
    max_payload: usize,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").field("node", &self.node).finish()
    }
}

impl Bus {
    /// Connects to the NATS server at `url` (within 5 s: an unreachable
    /// server is an error at start, with the URL tried).
    pub(crate) async fn connect(url: &str, node: &str) -> Result<Bus, String> {
        let client = async_nats::ConnectOptions::new()
            .name(format!("keel-relay {node}"))
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(Duration::from_secs(2)))
            .max_reconnects(None)
            // Bounded in messages (async-nats counts, not bytes): batches
            // past these are dropped or wait, and the catch-up loop reads
            // what was dropped from the store. 1,024 received batches of at
            // most max_payload each.
            .subscription_capacity(1_024)
            .client_capacity(256)
            .connect(url)
            .await
            .map_err(|e| {
                format!(
                    "NATS is not reachable at {url} ({e}); start nats-server or fix cluster.nats_url"
                )
            })?;
        let max_payload = client.server_info().max_payload.max(1024);
        Ok(Bus {
            client,
            node: node.to_owned(),
            max_payload,
        })
    }

    /// Whether the connection to NATS is up now.
    pub(crate) fn reachable(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Publishes a committed batch of `channel` for the other nodes. Never
    /// waits long: when NATS is away, the other nodes' catch-up reads it.
    pub(crate) async fn publish(&self, channel: &str, batch: &[(u64, Utf8Bytes)]) {
        // Split to fit the server's message size; a single message too big
        // for it is left to the other nodes' catch-up.
        let mut start = 0;
        while start < batch.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < batch.len()
                && (end == start || bytes + 12 + batch[end].1.len() < self.max_payload - 512)
            {
                bytes += 12 + batch[end].1.len();
                end += 1;
            }
            if bytes + 512 < self.max_payload {
                let mut headers = HeaderMap::new();
                headers.insert(NODE, HeaderValue::from(self.node.as_str()));
                headers.insert(CHANNEL, HeaderValue::from(channel));
                let body = encode(&batch[start..end]);
                let sent = tokio::time::timeout(
                    PUBLISH_WAIT,
                    self.client
                        .publish_with_headers(subject(channel), headers, body.into()),
                )
                .await;
                if !matches!(sent, Ok(Ok(()))) {
                    metrics::counter!("keel_bus_publish_failures_total").increment(1);
                }
            }
            start = end;
        }
    }

    /// Listens to every channel's batches and hands those of other nodes to
    /// `deliver(channel, batch)`, until the subscription ends.
    pub(crate) async fn listen(
        self: Arc<Self>,
        deliver: impl Fn(&str, Vec<(u64, Utf8Bytes)>) + Send + 'static,
    ) {
        let mut sub = match self.client.subscribe("keel.ch.>").await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot subscribe to the bus");
                return;
            }
        };
        let received = metrics::counter!("keel_bus_batches_total", "direction" => "in");
        while let Some(msg) = sub.next().await {
            let Some(headers) = &msg.headers else {
                continue;
            };
            if headers.get(NODE).map(|v| v.as_str()) == Some(self.node.as_str()) {
                continue;
            }
            let Some(channel) = headers.get(CHANNEL).map(|v| v.as_str().to_owned()) else {
                continue;
            };
            match decode(&msg.payload) {
                Some(batch) if !batch.is_empty() && crate::protocol::valid_channel(&channel) => {
                    received.increment(1);
                    deliver(&channel, batch);
                }
                _ => metrics::counter!("keel_bus_garbage_total").increment(1),
            }
        }
    }

    /// Answers takeover requests for this node: `kick(session)` closes the
    /// connection holding it; the reply says it was asked.
    pub(crate) async fn answer_takeovers(self: Arc<Self>, kick: Kick) {
        let mut sub = match self.client.subscribe(takeover_subject(&self.node)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot subscribe to takeovers");
                return;
            }
        };
        while let Some(msg) = sub.next().await {
            let session = String::from_utf8_lossy(&msg.payload).into_owned();
            let held = kick(&session);
            if let Some(reply) = msg.reply {
                let answer = if held { "closed" } else { "not held" };
                let _ = self.client.publish(reply, answer.into()).await;
            }
        }
    }

    /// Asks `node` to close its connection of `session`; true when it
    /// answered within `within` (it closed it, or did not hold it).
    pub(crate) async fn take_over(&self, node: &str, session: &str, within: Duration) -> bool {
        let asked = self
            .client
            .request(takeover_subject(node), session.to_owned().into());
        matches!(tokio::time::timeout(within, asked).await, Ok(Ok(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip_and_garbage_is_refused() {
        let batch = vec![
            (7u64, Utf8Bytes::from("{\"a\":1}")),
            (8, Utf8Bytes::from("")),
            (9, Utf8Bytes::from("é")),
        ];
        let back = decode(&encode(&batch)).unwrap();
        assert_eq!(back, batch);
        let bytes = encode(&batch);
        assert!(decode(&bytes[..bytes.len() - 1]).is_none(), "cut short");
        assert!(
            decode(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0xff]).is_none(),
            "not UTF-8"
        );
        assert_eq!(decode(&[]).unwrap(), vec![]);
    }

    #[test]
    fn every_channel_name_has_a_valid_subject() {
        assert_eq!(subject("room:1"), "keel.ch.room:1");
        assert_eq!(subject("a.b"), "keel.ch.a.b");
        assert_eq!(subject("a..b"), "keel.ch._.612e2e62");
        assert_eq!(subject(".a"), "keel.ch._.2e61");
    }
}

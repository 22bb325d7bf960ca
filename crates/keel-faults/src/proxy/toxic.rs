//! Toxics: what the chaos proxy does to the bytes of a link, modelled on Toxiproxy's.

use serde::{Deserialize, Serialize};

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

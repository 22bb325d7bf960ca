//! The history of a run, in Jepsen's model: every operation a client
//! invoked with its outcome (ok, fail, or info when the outcome is unknown),
//! every delivery a subscriber saw, what each subscriber must see, session
//! states observed against those expected, and fault intervals. Checkers
//! (`check`) are pure functions of it.
//!
//! Records are compact (ids and channels are numbers) because a soak run
//! holds millions of them; `history.jsonl` spells them out.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

/// Microseconds since the run's clock started.
pub type Micros = u64;

/// A channel name, interned by the [`Recorder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ChannelId(pub u32);

/// A message id. Ids the harness makes (`h<client>-<seq>`, see
/// [`MsgId::harness`]) are numbers; any other id a subscriber sees is
/// interned by the recorder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct MsgId(pub u64);

const FOREIGN: u64 = 1 << 63;

impl MsgId {
    /// The id of publisher `client`'s `seq`-th message.
    pub fn harness(client: u32, seq: u64) -> MsgId {
        MsgId((u64::from(client) << 40) | (seq & ((1 << 40) - 1)))
    }

    /// Its text on the wire.
    pub fn wire(self, recorder_names: &Names) -> String {
        if self.0 & FOREIGN != 0 {
            recorder_names
                .ids
                .get((self.0 & !FOREIGN) as usize)
                .cloned()
                .unwrap_or_else(|| format!("foreign-{}", self.0 & !FOREIGN))
        } else {
            format!("h{}-{}", self.0 >> 40, self.0 & ((1 << 40) - 1))
        }
    }

    fn parse_harness(text: &str) -> Option<MsgId> {
        let (client, seq) = text.strip_prefix('h')?.split_once('-')?;
        let (client, seq): (u32, u64) = (client.parse().ok()?, seq.parse().ok()?);
        (client < (1 << 23) && seq < (1 << 40)).then(|| MsgId::harness(client, seq))
    }
}

/// FNV-1a, 64 bits: a digest for byte-exact payload checks (and seeds).
pub fn fnv64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A payload's fingerprint: FNV-1a (64 bits) of its JSON text exactly as
/// it went on the wire, and its length in bytes. The relay stores and
/// delivers a payload's bytes verbatim, so a delivery's digest equals its
/// publish's unless something between the publisher and the subscriber
/// changed the payload (the `corrupted` check).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Digest {
    /// FNV-1a 64 of the payload's bytes (hexadecimal in JSON: readers
    /// whose numbers are doubles would round it).
    #[serde(serialize_with = "hex")]
    pub fnv: u64,
    /// The payload's length in bytes.
    pub len: u32,
}

impl Digest {
    /// The digest of a payload's JSON text.
    pub fn of(text: &str) -> Digest {
        Digest {
            fnv: fnv64(text.as_bytes()),
            len: u32::try_from(text.len()).unwrap_or(u32::MAX),
        }
    }

    /// The digest of a payload an SDK handed over parsed: its compact
    /// serialization, which is what the SDK put on the wire for a payload
    /// it was given as a value (so both ends hash the same text).
    pub fn of_value(value: &serde_json::Value) -> Digest {
        Digest::of(&value.to_string())
    }
}

fn hex<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:016x}"))
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}/{}B", self.fnv, self.len)
    }
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Outcome {
    /// Acknowledged: for a publish, at this offset.
    Ok {
        /// The offset the relay acknowledged (0 for operations without one).
        offset: u64,
    },
    /// Refused with this error code: it did not happen.
    Fail {
        /// The relay's error code, or a harness reason.
        code: String,
    },
    /// The outcome is unknown (the link died before the answer).
    Info,
}

/// One publish: invoked, then ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Publish {
    /// The publishing client.
    pub client: u32,
    /// Which of its connections (it counts reconnects).
    pub conn: u32,
    /// The channel.
    pub channel: ChannelId,
    /// The message id.
    pub id: MsgId,
    /// When it was sent (for open-model load: when it was meant to be sent).
    pub invoke: Micros,
    /// When its outcome was known.
    pub done: Micros,
    /// The outcome.
    pub outcome: Outcome,
    /// The payload it carried.
    pub digest: Digest,
}

/// One delivery a subscriber saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Delivery {
    /// The subscriber.
    pub sub: u32,
    /// Which of its connections.
    pub conn: u32,
    /// The channel.
    pub channel: ChannelId,
    /// The offset.
    pub offset: u64,
    /// The message id.
    pub id: MsgId,
    /// When it arrived.
    pub at: Micros,
    /// The payload as it arrived.
    pub digest: Digest,
}

/// Subscriber `sub` must see every acknowledged message of `channel` from
/// offset `from` on, exactly once and in order (it stayed live, or resumed,
/// until the end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Expectation {
    /// The subscriber.
    pub sub: u32,
    /// The channel.
    pub channel: ChannelId,
    /// The first offset it must see.
    pub from: u64,
}

/// A session state the scenario expected, beside the one observed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StateCheck {
    /// The client holding the session.
    pub client: u32,
    /// The session id.
    pub session: String,
    /// What docs/protocol.md says it must be once the relay has seen
    /// everything the client did.
    pub expected: String,
    /// What the relay said (in `welcome.state`).
    pub observed: String,
    /// When it was observed.
    pub at: Micros,
    /// What the client did to the session's previous connection that the
    /// relay may not have seen yet.
    pub after: After,
}

/// What came before a session state was observed, as far as the client
/// knows. The system is asynchronous: a client's close reaches the relay
/// some time after the client sent it, and through an intermediary (a
/// reverse proxy, a load balancer, a TLS terminator) that may answer the
/// close handshake itself, the client cannot tell when.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum After {
    /// Nothing the relay may not have seen: `expected` is the only state
    /// allowed (a new session; after a kill of the relay, CRASHED).
    Settled,
    /// The client closed its previous connection itself at `at`. With
    /// `seen`, the relay handled that close before this hello: the relay
    /// itself answered the close handshake on a direct connection and the
    /// client resumed at least 100 ms later (the relay answers as it
    /// detaches): only `expected` is allowed. Without, the resume may
    /// also find the session ACTIVE (its old connection taken over), unless
    /// `expected` is CRASHED (a kill ends every connection).
    ClientClose {
        /// When the client sent its close.
        at: Micros,
        /// Whether the relay is known to have handled it.
        seen: bool,
    },
}

impl StateCheck {
    /// The states the checker accepts (see [`After`]).
    pub fn allowed(&self) -> Vec<&str> {
        let mut allowed = vec![self.expected.as_str()];
        if let After::ClientClose { seen: false, .. } = self.after
            && self.expected != "CRASHED"
            && self.expected != "ACTIVE"
        {
            allowed.push("ACTIVE");
        }
        allowed
    }

    /// Whether the observed state is one the checker accepts.
    pub fn holds(&self) -> bool {
        self.allowed().contains(&self.observed.as_str())
    }
}

/// Any other operation (hello, subscribe, send, a command), for the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Op {
    /// The client.
    pub client: u32,
    /// What it was.
    pub kind: String,
    /// When it was invoked.
    pub invoke: Micros,
    /// When it ended.
    pub done: Micros,
    /// How.
    pub outcome: Outcome,
    /// Free text (the channel, the session, ...).
    pub detail: String,
}

/// A fault the scenario applied, from `start` to `end`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fault {
    /// The fault's kind (`kill9`, `partition`, `slow_reader`, ...).
    pub kind: String,
    /// What it hit.
    pub target: String,
    /// When it began.
    pub start: Micros,
    /// When it was healed (equal to `start` for instant faults).
    pub end: Micros,
}

/// Names for interned channels and foreign ids.
#[derive(Debug, Default, Clone)]
pub struct Names {
    /// Channel names by [`ChannelId`].
    pub channels: Vec<String>,
    ids: Vec<String>,
    channel_index: HashMap<String, ChannelId>,
    id_index: HashMap<String, MsgId>,
}

impl Names {
    /// A channel's name.
    pub fn channel(&self, c: ChannelId) -> &str {
        self.channels.get(c.0 as usize).map_or("?", String::as_str)
    }
}

/// Everything recorded in one scenario run.
#[derive(Debug, Default, Clone)]
pub struct History {
    /// Publishes, in the order they were recorded.
    pub publishes: Vec<Publish>,
    /// Deliveries, in the order they were recorded (per subscriber, the
    /// order they arrived).
    pub deliveries: Vec<Delivery>,
    /// What subscribers must see.
    pub expectations: Vec<Expectation>,
    /// Session states observed against those expected.
    pub states: Vec<StateCheck>,
    /// Other operations.
    pub ops: Vec<Op>,
    /// Faults applied.
    pub faults: Vec<Fault>,
    /// Subscribers that gave up on their link.
    pub abandoned: Vec<Abandon>,
    /// Interned names.
    pub names: Names,
}

/// A subscriber gave up on its link (it failed and could not be resumed,
/// or the client stopped on an error): from then on it is not held to the
/// messages it expected. A client that resumes never records this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Abandon {
    /// The subscriber.
    pub sub: u32,
    /// When.
    pub at: Micros,
    /// Why.
    pub why: String,
}

/// Records a history from many tasks. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Recorder {
    inner: Arc<Mutex<History>>,
    counts: Arc<Counts>,
    epoch: Instant,
}

/// Live counters, for progress displays (the history itself is only read
/// at the end).
#[derive(Debug, Default)]
struct Counts {
    acked: AtomicU64,
    failed: AtomicU64,
    delivered: AtomicU64,
    suspicious: AtomicU64,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder::new()
    }
}

impl Recorder {
    /// A recorder whose clock starts now.
    pub fn new() -> Recorder {
        Recorder {
            inner: Arc::default(),
            counts: Arc::default(),
            epoch: Instant::now(),
        }
    }

    /// Microseconds since the recorder started.
    pub fn now(&self) -> Micros {
        self.epoch.elapsed().as_micros() as Micros
    }

    /// `at` as microseconds of this recorder's clock.
    pub fn micros(&self, at: Instant) -> Micros {
        at.saturating_duration_since(self.epoch).as_micros() as Micros
    }

    /// When the clock started.
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, History> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The id of channel `name`, interning it.
    pub fn channel(&self, name: &str) -> ChannelId {
        let mut h = self.lock();
        if let Some(c) = h.names.channel_index.get(name) {
            return *c;
        }
        let c = ChannelId(h.names.channels.len() as u32);
        h.names.channels.push(name.to_owned());
        h.names.channel_index.insert(name.to_owned(), c);
        c
    }

    /// The [`MsgId`] of `text`: a harness id is decoded, anything else interned.
    pub fn id(&self, text: &str) -> MsgId {
        if let Some(id) = MsgId::parse_harness(text) {
            return id;
        }
        let mut h = self.lock();
        if let Some(id) = h.names.id_index.get(text) {
            return *id;
        }
        let id = MsgId(FOREIGN | h.names.ids.len() as u64);
        h.names.ids.push(text.to_owned());
        h.names.id_index.insert(text.to_owned(), id);
        id
    }

    /// Records a publish.
    pub fn publish(&self, p: Publish) {
        let counter = match p.outcome {
            Outcome::Ok { .. } => &self.counts.acked,
            _ => &self.counts.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.lock().publishes.push(p);
    }

    /// Records deliveries (a subscriber's buffer, in arrival order).
    pub fn deliveries(&self, d: &mut Vec<Delivery>) {
        self.counts
            .delivered
            .fetch_add(d.len() as u64, Ordering::Relaxed);
        self.lock().deliveries.append(d);
    }

    /// Counts something a client saw that the checker will judge (an
    /// offset at or below one already seen), for the live display.
    pub fn suspicious(&self) {
        self.counts.suspicious.fetch_add(1, Ordering::Relaxed);
    }

    /// Records what a subscriber must see.
    pub fn expect(&self, e: Expectation) {
        self.lock().expectations.push(e);
    }

    /// Records that subscriber `sub` gave up on its link.
    pub fn abandon(&self, sub: u32, why: &str) {
        let at = self.now();
        self.lock().abandoned.push(Abandon {
            sub,
            at,
            why: why.to_owned(),
        });
    }

    /// Records an observed session state against the expected one.
    pub fn state(&self, s: StateCheck) {
        self.lock().states.push(s);
    }

    /// Records another operation.
    pub fn op(&self, op: Op) {
        let counter = match op.outcome {
            Outcome::Ok { .. } => &self.counts.acked,
            _ => &self.counts.failed,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        self.lock().ops.push(op);
    }

    /// Records a fault interval.
    pub fn fault(&self, kind: &str, target: &str, start: Micros, end: Micros) {
        self.lock().faults.push(Fault {
            kind: kind.to_owned(),
            target: target.to_owned(),
            start,
            end,
        });
    }

    /// Counts so far: operations (publishes and others) acknowledged,
    /// refused or unknown, deliveries recorded, and suspicious deliveries
    /// seen by clients.
    pub fn counts(&self) -> (u64, u64, u64, u64) {
        let c = &self.counts;
        (
            c.acked.load(Ordering::Relaxed),
            c.failed.load(Ordering::Relaxed),
            c.delivered.load(Ordering::Relaxed),
            c.suspicious.load(Ordering::Relaxed),
        )
    }

    /// A copy of the history so far.
    pub fn snapshot(&self) -> History {
        self.lock().clone()
    }

    /// Takes the history, leaving an empty one.
    pub fn take(&self) -> History {
        std::mem::take(&mut *self.lock())
    }
}

/// One line of `history.jsonl`.
#[derive(Serialize)]
struct Line<'a> {
    t: Micros,
    #[serde(rename = "type")]
    kind: &'a str,
    f: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    process: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    conn: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    digest: Option<Digest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

impl History {
    /// Writes the history as JSON lines in time order: `invoke` and
    /// `ok`/`fail`/`info` lines per operation, a `deliver` line per delivery,
    /// `fault` lines; at most `max_lines` (a soak run has millions); returns
    /// how many lines were written and how many there were.
    pub fn write_jsonl(&self, path: &Path, max_lines: usize) -> std::io::Result<(usize, usize)> {
        let names = &self.names;
        let mut lines: Vec<(Micros, Line<'_>)> = Vec::new();
        let total = self.publishes.len() * 2
            + self.deliveries.len()
            + self.ops.len() * 2
            + self.faults.len()
            + self.states.len()
            + self.abandoned.len();
        let outcome_line = |o: &Outcome| match o {
            Outcome::Ok { .. } => ("ok", None),
            Outcome::Fail { code } => ("fail", Some(code.clone())),
            Outcome::Info => ("info", None),
        };
        for p in &self.publishes {
            let channel = Some(names.channel(p.channel));
            lines.push((
                p.invoke,
                Line {
                    t: p.invoke,
                    kind: "invoke",
                    f: "publish",
                    process: Some(p.client),
                    conn: Some(p.conn),
                    channel,
                    id: Some(p.id.wire(names)),
                    offset: None,
                    digest: Some(p.digest),
                    detail: None,
                },
            ));
            let (kind, detail) = outcome_line(&p.outcome);
            lines.push((
                p.done,
                Line {
                    t: p.done,
                    kind,
                    f: "publish",
                    process: Some(p.client),
                    conn: Some(p.conn),
                    channel,
                    id: Some(p.id.wire(names)),
                    offset: match p.outcome {
                        Outcome::Ok { offset } => Some(offset),
                        _ => None,
                    },
                    digest: None,
                    detail,
                },
            ));
        }
        for d in &self.deliveries {
            lines.push((
                d.at,
                Line {
                    t: d.at,
                    kind: "deliver",
                    f: "deliver",
                    process: Some(d.sub),
                    conn: Some(d.conn),
                    channel: Some(names.channel(d.channel)),
                    id: Some(d.id.wire(names)),
                    offset: Some(d.offset),
                    digest: Some(d.digest),
                    detail: None,
                },
            ));
        }
        for o in &self.ops {
            for (t, kind, detail) in [
                (o.invoke, "invoke", Some(o.detail.clone())),
                (
                    o.done,
                    outcome_line(&o.outcome).0,
                    outcome_line(&o.outcome).1,
                ),
            ] {
                lines.push((
                    t,
                    Line {
                        t,
                        kind,
                        f: &o.kind,
                        process: Some(o.client),
                        conn: None,
                        channel: None,
                        id: None,
                        offset: None,
                        digest: None,
                        detail,
                    },
                ));
            }
        }
        for s in &self.states {
            lines.push((
                s.at,
                Line {
                    t: s.at,
                    kind: if s.holds() { "ok" } else { "fail" },
                    f: "session_state",
                    process: Some(s.client),
                    conn: None,
                    channel: None,
                    id: Some(s.session.clone()),
                    offset: None,
                    digest: None,
                    detail: Some(format!(
                        "expected {} observed {}",
                        s.allowed().join(" or "),
                        s.observed
                    )),
                },
            ));
        }
        for a in &self.abandoned {
            lines.push((
                a.at,
                Line {
                    t: a.at,
                    kind: "abandon",
                    f: "subscriber",
                    process: Some(a.sub),
                    conn: None,
                    channel: None,
                    id: None,
                    offset: None,
                    digest: None,
                    detail: Some(a.why.clone()),
                },
            ));
        }
        for f in &self.faults {
            lines.push((
                f.start,
                Line {
                    t: f.start,
                    kind: "fault",
                    f: &f.kind,
                    process: None,
                    conn: None,
                    channel: None,
                    id: None,
                    offset: None,
                    digest: None,
                    detail: Some(format!("{} until t={} us", f.target, f.end)),
                },
            ));
        }
        lines.sort_by_key(|(t, _)| *t);
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        let written = lines.len().min(max_lines);
        for (_, line) in lines.iter().take(max_lines) {
            serde_json::to_writer(&mut out, line)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
        // On disk before the next scenario starts: hundreds of MB of dirty
        // pages written back later would stall that scenario's fsyncs.
        out.get_ref().sync_all()?;
        Ok((written, total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn harness_ids_round_trip_and_others_are_interned() {
        let r = Recorder::new();
        let id = MsgId::harness(17, 123_456);
        let names = Names::default();
        assert_eq!(id.wire(&names), "h17-123456");
        assert_eq!(r.id("h17-123456"), id);
        let a = r.id("crash-notice-1");
        assert_eq!(r.id("crash-notice-1"), a);
        assert_ne!(a, r.id("crash-notice-2"));
        assert_eq!(a.wire(&r.snapshot().names), "crash-notice-1");
        assert_eq!(r.channel("room"), r.channel("room"));
        assert_ne!(r.channel("room"), r.channel("other"));
    }
}

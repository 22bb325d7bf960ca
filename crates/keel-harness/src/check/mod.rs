//! The invariant checker: one pure function of a [`History`] per invariant,
//! each returning a count and minimal witnesses (the first offending
//! messages, each with its own small timeline, as Elle does), composed by
//! [`check`].
//!
//! - `lost`: acknowledged, at or after a subscriber's expected start, never
//!   delivered to that subscriber (it stayed live or resumed to the end).
//! - `duplicated`: one offset delivered to one subscriber more than once.
//! - `corrupted`: delivered with a payload whose digest differs from the
//!   one its publisher recorded.
//! - `reordered`: on one connection, a channel's new offset arriving after
//!   a higher one (a repeat of an offset already seen is a duplicate, not
//!   an order).
//! - `send_order`: one publisher connection's acknowledged offsets in a
//!   channel not increasing in the order it sent them.
//! - `unexpected`: delivered but never published (or at another offset than
//!   the one acknowledged).
//! - `session_state`: a session not in a state the protocol allows.
//!
//! Every kind is a violation; lost, duplicated and corrupted messages are
//! the hard ones (they break the relay's promise outright).
//!
//! What the checker assumes (docs/protocol.md, "What the harness checks"):
//! - A publish whose outcome is unknown (`info`) or refused may or may not
//!   be in the log: delivering it is not unexpected and not delivering it
//!   is not a loss. Only an acknowledged publish must be delivered.
//! - A subscriber records an expectation (channel, first offset) when it
//!   subscribes, and records that it gave up if its link fails for good
//!   (it could not resume): only those that stayed or resumed to the end
//!   are held to every acknowledged message. The relay's log retention is
//!   longer than any run.
//! - An offset counts as delivered only with the message acknowledged
//!   there: another message at that offset is `unexpected`, and the
//!   acknowledged one is `lost`.
//! - The relay delivers a payload's bytes as they were published; an SDK
//!   that parses payloads hashes their compact serialization on both ends.
//! - The system is asynchronous: a resume after the client's own close may
//!   find the session ACTIVE (taken over) as well as DETACHED, unless the
//!   history shows the relay answered that close itself (see
//!   [`crate::history::After`]); after a kill it must be CRASHED.
//!
//! Witnesses carry the message they are about ([`Subject`]), so that they
//! can be matched one for one against ground truth recorded outside the
//! relay, such as a tampering proxy's log.

mod corrupted;
mod duplicated;
mod lost;
mod reordered;
mod send_order;
mod session_state;
mod unexpected;

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::history::{ChannelId, History, Micros, MsgId, Outcome, Publish};

/// How many witnesses each check keeps.
const WITNESSES: usize = 5;

/// The checks, by name, in report order.
pub const CHECKS: [&str; 7] = [
    "lost",
    "duplicated",
    "corrupted",
    "reordered",
    "send_order",
    "unexpected",
    "session_state",
];

/// The message a witness is about, in the wire's terms.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Subject {
    /// The channel.
    pub channel: String,
    /// The offset.
    pub offset: u64,
    /// The message id.
    pub id: String,
    /// The subscriber that saw or missed it (none for a publisher's
    /// witness).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscriber: Option<u32>,
}

/// One violation, with enough context to look it up in `history.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Witness {
    /// One line: what is wrong.
    pub summary: String,
    /// Its own events, in time order (`t=<us> ...`).
    pub timeline: Vec<String>,
    /// The message it is about (none for a session state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Subject>,
}

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    /// Its name (see [`CHECKS`]).
    pub name: String,
    /// Violations found.
    pub count: u64,
    /// Whether a violation breaks the relay's core promise (acknowledged
    /// loss, duplicates, corruption).
    pub hard: bool,
    /// The first few violations.
    pub witnesses: Vec<Witness>,
}

/// Counts over the history, for the report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Publishes acknowledged.
    pub acked: u64,
    /// Publishes refused.
    pub failed: u64,
    /// Publishes with an unknown outcome.
    pub info: u64,
    /// Deliveries seen.
    pub delivered: u64,
    /// Deliveries a subscriber was expected to see.
    pub expected_deliveries: u64,
    /// Deliveries whose payload was compared with its publish's.
    #[serde(default)]
    pub payloads_checked: u64,
    /// Subscribers that gave up on their link (not held to what they
    /// missed after that).
    #[serde(default)]
    pub subscribers_abandoned: u64,
}

/// Every check over one history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// One result per check, in [`CHECKS`] order.
    pub checks: Vec<CheckResult>,
    /// Counts.
    pub stats: Stats,
}

impl Verdict {
    /// Violations of every kind.
    pub fn violations(&self) -> u64 {
        self.checks.iter().map(|c| c.count).sum()
    }

    /// Whether anything was violated.
    pub fn violated(&self) -> bool {
        self.violations() > 0
    }

    /// The count of one check.
    pub fn count(&self, name: &str) -> u64 {
        self.get(name).map_or(0, |c| c.count)
    }

    /// One check's result.
    pub fn get(&self, name: &str) -> Option<&CheckResult> {
        self.checks.iter().find(|c| c.name == name)
    }
}

/// What every check reads, derived once from the history.
struct Index<'h> {
    h: &'h History,
    /// (channel, offset) -> (id, publish index): acknowledged.
    acked: HashMap<(ChannelId, u64), (MsgId, usize)>,
    /// (channel, id) of publishes with an unknown or failed outcome.
    maybe: HashSet<(ChannelId, MsgId)>,
    /// (channel, id) -> publish indexes, for timelines and payloads.
    by_id: HashMap<(ChannelId, MsgId), Vec<usize>>,
    /// Acknowledged offsets per channel, sorted.
    offsets: BTreeMap<ChannelId, Vec<u64>>,
    /// Channels the harness published to (others, such as private
    /// channels' notices, are not the checker's business).
    published: HashSet<ChannelId>,
    /// Delivery indexes per subscriber, in arrival order.
    per_sub: BTreeMap<u32, Vec<usize>>,
    /// (subscriber, channel) -> offset -> (first delivery, times seen,
    /// whether one of them was the message acknowledged there).
    seen: HashMap<(u32, ChannelId), HashMap<u64, Seen>>,
    /// Subscribers that gave up on their link (see
    /// [`crate::history::Abandon`]): not held to what they missed.
    abandoned: HashSet<u32>,
}

impl<'h> Index<'h> {
    fn of(h: &'h History) -> Index<'h> {
        let mut ix = Index {
            h,
            acked: HashMap::new(),
            maybe: HashSet::new(),
            by_id: HashMap::new(),
            offsets: BTreeMap::new(),
            published: HashSet::new(),
            per_sub: BTreeMap::new(),
            seen: HashMap::new(),
            abandoned: h.abandoned.iter().map(|a| a.sub).collect(),
        };
        for (i, p) in h.publishes.iter().enumerate() {
            ix.published.insert(p.channel);
            ix.by_id.entry((p.channel, p.id)).or_default().push(i);
            match p.outcome {
                Outcome::Ok { offset } => {
                    ix.acked.entry((p.channel, offset)).or_insert((p.id, i));
                }
                Outcome::Info | Outcome::Fail { .. } => {
                    ix.maybe.insert((p.channel, p.id));
                }
            }
        }
        for (channel, offset) in ix.acked.keys() {
            ix.offsets.entry(*channel).or_default().push(*offset);
        }
        for v in ix.offsets.values_mut() {
            v.sort_unstable();
            v.dedup();
        }
        for (i, d) in h.deliveries.iter().enumerate() {
            ix.per_sub.entry(d.sub).or_default().push(i);
        }
        for idxs in ix.per_sub.values() {
            for &i in idxs {
                let d = &h.deliveries[i];
                let right = ix
                    .acked
                    .get(&(d.channel, d.offset))
                    .is_none_or(|(id, _)| *id == d.id);
                let seen = ix
                    .seen
                    .entry((d.sub, d.channel))
                    .or_default()
                    .entry(d.offset)
                    .or_insert(Seen {
                        first: i,
                        times: 0,
                        right: false,
                    });
                seen.times += 1;
                seen.right |= right;
            }
        }
        ix
    }

    /// The subject of delivery `i`.
    fn delivered(&self, i: usize) -> Subject {
        let d = &self.h.deliveries[i];
        Subject {
            channel: self.h.names.channel(d.channel).to_owned(),
            offset: d.offset,
            id: d.id.wire(&self.h.names),
            subscriber: Some(d.sub),
        }
    }

    /// Delivery `i` as a timeline line.
    fn delivery_line(&self, i: usize) -> String {
        let d = &self.h.deliveries[i];
        format!(
            "t={} subscriber {} conn {} deliver {} offset {} of {} payload {}",
            d.at,
            d.sub,
            d.conn,
            d.id.wire(&self.h.names),
            d.offset,
            self.h.names.channel(d.channel),
            d.digest
        )
    }

    /// Publish `i` as timeline lines (invoke, outcome).
    fn publish_lines(&self, i: usize) -> Vec<String> {
        let p = &self.h.publishes[i];
        let names = &self.h.names;
        let end = match &p.outcome {
            Outcome::Ok { offset } => format!("ok offset {offset}"),
            Outcome::Fail { code } => format!("fail {code}"),
            Outcome::Info => "info (outcome unknown)".to_owned(),
        };
        vec![
            format!(
                "t={} client {} conn {} invoke publish {} to {} payload {}",
                p.invoke,
                p.client,
                p.conn,
                p.id.wire(names),
                names.channel(p.channel),
                p.digest
            ),
            format!("t={} client {} {end}", p.done, p.client),
        ]
    }

    /// Whether a delivery is of a message published there: acknowledged
    /// at that offset with that id, or an id whose outcome is unknown.
    fn is_published(&self, channel: ChannelId, offset: u64, id: MsgId) -> bool {
        match self.acked.get(&(channel, offset)) {
            Some((acked, _)) => *acked == id,
            None => self.maybe.contains(&(channel, id)),
        }
    }
}

/// One offset as one subscriber saw it.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// Its first delivery.
    first: usize,
    /// How many times it came.
    times: u32,
    /// Whether one of them was the message acknowledged at that offset (a
    /// different message there does not deliver the acknowledged one).
    right: bool,
}

/// Violations of one kind, as a check finds them.
#[derive(Default)]
struct Found {
    count: u64,
    witnesses: Vec<Witness>,
}

impl Found {
    fn add(&mut self, witness: impl FnOnce() -> Witness) {
        self.count += 1;
        if self.witnesses.len() < WITNESSES {
            self.witnesses.push(witness());
        }
    }

    fn result(self, name: &str, hard: bool) -> CheckResult {
        CheckResult {
            name: name.to_owned(),
            count: self.count,
            hard,
            witnesses: self.witnesses,
        }
    }
}

/// Runs every check.
pub fn check(h: &History) -> Verdict {
    let ix = Index::of(h);
    let (lost, expected_deliveries) = lost::check(&ix);
    let (corrupted, payloads_checked) = corrupted::check(&ix);
    let count = |f: fn(&Outcome) -> bool| h.publishes.iter().filter(|p| f(&p.outcome)).count();
    let stats = Stats {
        acked: count(|o| matches!(o, Outcome::Ok { .. })) as u64,
        failed: count(|o| matches!(o, Outcome::Fail { .. })) as u64,
        info: count(|o| matches!(o, Outcome::Info)) as u64,
        delivered: h.deliveries.len() as u64,
        expected_deliveries,
        payloads_checked,
        subscribers_abandoned: ix.abandoned.len() as u64,
    };
    Verdict {
        checks: vec![
            lost.result("lost", true),
            duplicated::check(&ix).result("duplicated", true),
            corrupted.result("corrupted", true),
            reordered::check(&ix).result("reordered", false),
            send_order::check(&ix).result("send_order", false),
            unexpected::check(&ix).result("unexpected", false),
            session_state::check(h).result("session_state", false),
        ],
        stats,
    }
}

fn offset_of(p: &Publish) -> u64 {
    match p.outcome {
        Outcome::Ok { offset } => offset,
        _ => 0,
    }
}

/// The first time in `h` at or after which nothing more happened.
pub fn last_event(h: &History) -> Micros {
    let p = h.publishes.iter().map(|p| p.done).max().unwrap_or(0);
    let d = h.deliveries.iter().map(|d| d.at).max().unwrap_or(0);
    p.max(d)
}

#[cfg(test)]
mod tests;

//! The invariant checker: pure functions of a [`History`], each returning a
//! count and minimal witnesses (the first offending messages, each with its
//! own small timeline, as Elle does).
//!
//! - `lost`: acknowledged, at or after a subscriber's expected start, never
//!   delivered to that subscriber (it stayed live or resumed to the end).
//! - `duplicated`: one offset delivered to one subscriber more than once.
//! - `reordered`: on one connection, a channel's offsets not increasing.
//! - `send_order`: one publisher connection's acknowledged offsets in a
//!   channel not increasing in the order it sent them.
//! - `unexpected`: delivered but never published (or at another offset than
//!   the one acknowledged).
//! - `session_state`: a session not in the state the protocol says.
//!
//! Every kind is a violation; acknowledged loss and duplicates are the hard
//! ones (they break the relay's promise outright). A publish whose outcome
//! is unknown (`info`) may or may not be in the log: delivering it is not
//! unexpected and not delivering it is not a loss.

use std::collections::{BTreeMap, HashMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::history::{ChannelId, History, Micros, MsgId, Outcome};

/// How many witnesses each check keeps.
const WITNESSES: usize = 5;

/// The checks, by name, in report order.
pub const CHECKS: [&str; 6] = [
    "lost",
    "duplicated",
    "reordered",
    "send_order",
    "unexpected",
    "session_state",
];

/// One violation, with enough context to look it up in `history.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Witness {
    /// One line: what is wrong.
    pub summary: String,
    /// Its own events, in time order (`t=<us> ...`).
    pub timeline: Vec<String>,
}

/// The result of one check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckResult {
    /// Its name (see [`CHECKS`]).
    pub name: String,
    /// Violations found.
    pub count: u64,
    /// Whether a violation breaks the relay's core promise (acknowledged
    /// loss, duplicates).
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
        self.checks
            .iter()
            .find(|c| c.name == name)
            .map_or(0, |c| c.count)
    }
}

/// What was acknowledged or may have been stored, per channel and offset.
struct Log {
    /// (channel, offset) -> (id, publish index): acknowledged.
    acked: HashMap<(ChannelId, u64), (MsgId, usize)>,
    /// (channel, id) of publishes with an unknown or failed outcome.
    maybe: HashSet<(ChannelId, MsgId)>,
    /// (channel, id) -> publish indexes, for timelines.
    by_id: HashMap<(ChannelId, MsgId), Vec<usize>>,
    /// Acknowledged offsets per channel, sorted.
    offsets: BTreeMap<ChannelId, Vec<u64>>,
}

fn log_of(h: &History) -> Log {
    let mut log = Log {
        acked: HashMap::new(),
        maybe: HashSet::new(),
        by_id: HashMap::new(),
        offsets: BTreeMap::new(),
    };
    for (i, p) in h.publishes.iter().enumerate() {
        log.by_id.entry((p.channel, p.id)).or_default().push(i);
        match p.outcome {
            Outcome::Ok { offset } => {
                log.acked.entry((p.channel, offset)).or_insert((p.id, i));
            }
            Outcome::Info | Outcome::Fail { .. } => {
                log.maybe.insert((p.channel, p.id));
            }
        }
    }
    for (channel, offset) in log.acked.keys() {
        log.offsets.entry(*channel).or_default().push(*offset);
    }
    for v in log.offsets.values_mut() {
        v.sort_unstable();
        v.dedup();
    }
    log
}

/// Runs every check.
pub fn check(h: &History) -> Verdict {
    let log = log_of(h);
    let names = &h.names;
    let publish_line = |i: usize| {
        let p = &h.publishes[i];
        let end = match &p.outcome {
            Outcome::Ok { offset } => format!("ok offset {offset}"),
            Outcome::Fail { code } => format!("fail {code}"),
            Outcome::Info => "info (outcome unknown)".to_owned(),
        };
        vec![
            format!(
                "t={} client {} conn {} invoke publish {} to {}",
                p.invoke,
                p.client,
                p.conn,
                p.id.wire(names),
                names.channel(p.channel)
            ),
            format!("t={} client {} {end}", p.done, p.client),
        ]
    };

    // Deliveries per subscriber, in arrival order.
    let mut per_sub: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, d) in h.deliveries.iter().enumerate() {
        per_sub.entry(d.sub).or_default().push(i);
    }

    // Duplicates and order.
    let mut duplicated = Found::default();
    let mut reordered = Found::default();
    // (subscriber, channel) -> offset -> (first delivery, times seen).
    let mut seen: HashMap<(u32, ChannelId), HashMap<u64, (usize, u32)>> = HashMap::new();
    for (sub, idxs) in &per_sub {
        let mut last: HashMap<(u32, ChannelId), (u64, usize)> = HashMap::new();
        for &i in idxs {
            let d = &h.deliveries[i];
            let times = seen
                .entry((*sub, d.channel))
                .or_default()
                .entry(d.offset)
                .or_insert((i, 0));
            times.1 += 1;
            if times.1 == 2 {
                let first = times.0;
                duplicated.add(|| Witness {
                    summary: format!(
                        "subscriber {sub} got offset {} of {} ({}) more than once",
                        d.offset,
                        names.channel(d.channel),
                        d.id.wire(names)
                    ),
                    timeline: vec![delivery_line(h, first), delivery_line(h, i)],
                });
            } else if times.1 > 2 {
                duplicated.count += 1;
            }
            if let Some((prev, j)) = last.insert((d.conn, d.channel), (d.offset, i))
                && d.offset <= prev
            {
                reordered.add(|| Witness {
                    summary: format!(
                        "subscriber {sub} connection {} got offset {} of {} after offset {prev}",
                        d.conn,
                        d.offset,
                        names.channel(d.channel)
                    ),
                    timeline: vec![delivery_line(h, j), delivery_line(h, i)],
                });
            }
        }
    }

    // Unexpected deliveries.
    let mut unexpected = Found::default();
    let published: HashSet<ChannelId> = h.publishes.iter().map(|p| p.channel).collect();
    for (i, d) in h.deliveries.iter().enumerate() {
        let fine = match log.acked.get(&(d.channel, d.offset)) {
            Some((id, _)) => *id == d.id,
            None => log.maybe.contains(&(d.channel, d.id)),
        };
        // Channels nobody published to through the harness (private
        // channels' notices) are not the checker's business.
        if !fine && published.contains(&d.channel) {
            unexpected.add(|| {
                let mut timeline = vec![delivery_line(h, i)];
                if let Some((id, p)) = log.acked.get(&(d.channel, d.offset)) {
                    timeline.push(format!("acknowledged at that offset: {}", id.wire(names)));
                    timeline.extend(publish_line(*p));
                }
                for p in log.by_id.get(&(d.channel, d.id)).into_iter().flatten() {
                    timeline.extend(publish_line(*p));
                }
                Witness {
                    summary: format!(
                        "subscriber {} got {} at offset {} of {}, which was never published there",
                        d.sub,
                        d.id.wire(names),
                        d.offset,
                        names.channel(d.channel)
                    ),
                    timeline,
                }
            });
        }
    }

    // Lost: expected, acknowledged, not delivered.
    let mut lost = Found::default();
    let mut expected_deliveries = 0u64;
    let mut expectations: Vec<_> = h.expectations.clone();
    expectations.sort_by_key(|e| (e.sub, e.channel, e.from));
    expectations.dedup_by_key(|e| (e.sub, e.channel));
    for e in &expectations {
        let got = seen.get(&(e.sub, e.channel));
        for &offset in log
            .offsets
            .get(&e.channel)
            .map(|v| &v[v.partition_point(|o| *o < e.from)..])
            .unwrap_or(&[])
        {
            expected_deliveries += 1;
            if got.is_some_and(|g| g.contains_key(&offset)) {
                continue;
            }
            lost.add(|| {
                let (id, p) = log.acked[&(e.channel, offset)];
                let mut timeline = publish_line(p);
                let around: Vec<String> = per_sub
                    .get(&e.sub)
                    .into_iter()
                    .flatten()
                    .filter(|&&j| h.deliveries[j].channel == e.channel)
                    .filter(|&&j| h.deliveries[j].offset.abs_diff(offset) <= 2)
                    .map(|&j| delivery_line(h, j))
                    .collect();
                timeline.extend(around);
                Witness {
                    summary: format!(
                        "{} (offset {offset} of {}) was acknowledged and never delivered to subscriber {}",
                        id.wire(names),
                        names.channel(e.channel),
                        e.sub
                    ),
                    timeline,
                }
            });
        }
    }

    // Send order: per publisher connection and channel, acknowledged new
    // offsets in invoke order.
    let mut send_order = Found::default();
    let mut by_conn: BTreeMap<(u32, u32, ChannelId), Vec<usize>> = BTreeMap::new();
    let mut first_ack: HashMap<(ChannelId, MsgId), u64> = HashMap::new();
    for (i, p) in h.publishes.iter().enumerate() {
        if let Outcome::Ok { offset } = p.outcome {
            first_ack.entry((p.channel, p.id)).or_insert(offset);
            by_conn
                .entry((p.client, p.conn, p.channel))
                .or_default()
                .push(i);
        }
    }
    for idxs in by_conn.values_mut() {
        idxs.sort_by_key(|&i| (h.publishes[i].invoke, i));
        let mut prev: Option<usize> = None;
        let mut ids = HashSet::new();
        for &i in idxs.iter() {
            let p = &h.publishes[i];
            // A re-sent id answers with its original offset: not an order.
            if !ids.insert(p.id) || first_ack.get(&(p.channel, p.id)) != Some(&offset_of(p)) {
                continue;
            }
            if let Some(j) = prev
                && offset_of(p) <= offset_of(&h.publishes[j])
            {
                send_order.add(|| {
                    let mut timeline = publish_line(j);
                    timeline.extend(publish_line(i));
                    Witness {
                        summary: format!(
                            "client {} connection {} sent {} before {} to {} but got offset {} after {}",
                            p.client,
                            p.conn,
                            h.publishes[j].id.wire(names),
                            p.id.wire(names),
                            names.channel(p.channel),
                            offset_of(&h.publishes[j]),
                            offset_of(p)
                        ),
                        timeline,
                    }
                });
            }
            prev = Some(i);
        }
    }

    // Session states.
    let mut session_state = Found::default();
    for s in &h.states {
        if s.expected != s.observed {
            session_state.add(|| Witness {
                summary: format!(
                    "session {} of client {} was {} where the protocol says {}",
                    s.session, s.client, s.observed, s.expected
                ),
                timeline: vec![format!("t={} welcome state {}", s.at, s.observed)],
            });
        }
    }

    let stats = Stats {
        acked: h
            .publishes
            .iter()
            .filter(|p| matches!(p.outcome, Outcome::Ok { .. }))
            .count() as u64,
        failed: h
            .publishes
            .iter()
            .filter(|p| matches!(p.outcome, Outcome::Fail { .. }))
            .count() as u64,
        info: h
            .publishes
            .iter()
            .filter(|p| matches!(p.outcome, Outcome::Info))
            .count() as u64,
        delivered: h.deliveries.len() as u64,
        expected_deliveries,
    };
    let result = |name: &str, hard, f: Found| CheckResult {
        name: name.to_owned(),
        count: f.count,
        hard,
        witnesses: f.witnesses,
    };
    Verdict {
        checks: vec![
            result("lost", true, lost),
            result("duplicated", true, duplicated),
            result("reordered", false, reordered),
            result("send_order", false, send_order),
            result("unexpected", false, unexpected),
            result("session_state", false, session_state),
        ],
        stats,
    }
}

fn offset_of(p: &crate::history::Publish) -> u64 {
    match p.outcome {
        Outcome::Ok { offset } => offset,
        _ => 0,
    }
}

fn delivery_line(h: &History, i: usize) -> String {
    let d = &h.deliveries[i];
    format!(
        "t={} subscriber {} conn {} deliver {} offset {} of {}",
        d.at,
        d.sub,
        d.conn,
        d.id.wire(&h.names),
        d.offset,
        h.names.channel(d.channel)
    )
}

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
}

/// The first time in `h` at or after which nothing more happened.
pub fn last_event(h: &History) -> Micros {
    let p = h.publishes.iter().map(|p| p.done).max().unwrap_or(0);
    let d = h.deliveries.iter().map(|d| d.at).max().unwrap_or(0);
    p.max(d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::{Delivery, Expectation, Publish, Recorder, StateCheck};

    /// Three publishes to one channel, acknowledged 1..=3, one subscriber
    /// expected from 1; `mutate` plants a bug in the deliveries.
    fn history(mutate: impl FnOnce(&mut Vec<Delivery>)) -> History {
        let r = Recorder::new();
        let c = r.channel("room");
        for seq in 1..=3u64 {
            r.publish(Publish {
                client: 1,
                conn: 1,
                channel: c,
                id: MsgId::harness(1, seq),
                invoke: seq * 10,
                done: seq * 10 + 5,
                outcome: Outcome::Ok { offset: seq },
            });
        }
        r.expect(Expectation {
            sub: 7,
            channel: c,
            from: 1,
        });
        let mut ds: Vec<Delivery> = (1..=3u64)
            .map(|o| Delivery {
                sub: 7,
                conn: 1,
                channel: c,
                offset: o,
                id: MsgId::harness(1, o),
                at: 100 + o,
            })
            .collect();
        mutate(&mut ds);
        r.deliveries(&mut ds);
        r.take()
    }

    #[track_caller]
    fn only(v: &Verdict, name: &str, n: u64) {
        for c in &v.checks {
            let want = if c.name == name { n } else { 0 };
            assert_eq!(c.count, want, "{}: {:?}", c.name, c.witnesses);
        }
    }

    #[test]
    fn a_clean_history_passes() {
        let v = check(&history(|_| {}));
        assert!(!v.violated(), "{v:?}");
        assert_eq!(v.stats.expected_deliveries, 3);
    }

    #[test]
    fn each_planted_bug_is_caught_with_a_witness() {
        let v = check(&history(|d| {
            d.remove(1);
        }));
        only(&v, "lost", 1);
        assert!(v.checks[0].witnesses[0].summary.contains("offset 2"));

        let v = check(&history(|d| {
            let again = d[1];
            d.insert(2, again);
        }));
        // The copy is a duplicate and, on the same connection, out of order.
        assert_eq!(v.count("duplicated"), 1);
        assert_eq!(v.count("reordered"), 1);

        let v = check(&history(|d| d.swap(0, 1)));
        only(&v, "reordered", 1);

        let v = check(&history(|d| d[2].id = MsgId::harness(9, 9)));
        only(&v, "unexpected", 1);
    }

    #[test]
    fn send_order_is_per_connection_and_ignores_resent_ids() {
        let r = Recorder::new();
        let c = r.channel("room");
        let p = |seq: u64, invoke: u64, offset: u64| {
            r.publish(Publish {
                client: 1,
                conn: 1,
                channel: c,
                id: MsgId::harness(1, seq),
                invoke,
                done: invoke + 1,
                outcome: Outcome::Ok { offset },
            })
        };
        p(1, 10, 1);
        p(2, 20, 3);
        p(3, 30, 2);
        p(1, 40, 1); // re-sent: its original offset, not a violation
        let v = check(&r.take());
        only(&v, "send_order", 1);
    }

    #[test]
    fn unknown_outcomes_are_neither_lost_nor_unexpected() {
        let r = Recorder::new();
        let c = r.channel("room");
        r.publish(Publish {
            client: 1,
            conn: 1,
            channel: c,
            id: MsgId::harness(1, 1),
            invoke: 1,
            done: 2,
            outcome: Outcome::Info,
        });
        r.expect(Expectation {
            sub: 2,
            channel: c,
            from: 1,
        });
        r.deliveries(&mut vec![Delivery {
            sub: 2,
            conn: 1,
            channel: c,
            offset: 1,
            id: MsgId::harness(1, 1),
            at: 3,
        }]);
        assert!(!check(&r.take()).violated());
    }

    #[test]
    fn session_states_are_compared() {
        let r = Recorder::new();
        r.state(StateCheck {
            client: 1,
            session: "s".into(),
            expected: "DETACHED".into(),
            observed: "CRASHED".into(),
            at: 5,
        });
        only(&check(&r.take()), "session_state", 1);
    }
}

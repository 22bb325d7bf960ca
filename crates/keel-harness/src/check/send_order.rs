//! `send_order`: per publisher connection and channel, acknowledged new
//! offsets must increase in the order the publishes were sent.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::{Found, Index, Subject, Witness, offset_of};
use crate::history::{ChannelId, MsgId, Outcome};

pub(super) fn check(ix: &Index<'_>) -> Found {
    let h = ix.h;
    let names = &h.names;
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
                    let mut timeline = ix.publish_lines(j);
                    timeline.extend(ix.publish_lines(i));
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
                        subject: Some(Subject {
                            channel: names.channel(p.channel).to_owned(),
                            offset: offset_of(p),
                            id: p.id.wire(names),
                            subscriber: None,
                        }),
                    }
                });
            }
            prev = Some(i);
        }
    }
    send_order
}

//! `reordered`: on one connection, a channel's offset arriving after a
//! higher one. A repeat of an offset the subscriber already had is judged
//! by `duplicated` alone: one planted duplicate is one violation.

use std::collections::{HashMap, HashSet};

use super::{Found, Index, Witness};

pub(super) fn check(ix: &Index<'_>) -> Found {
    let h = ix.h;
    let names = &h.names;
    let mut reordered = Found::default();
    for (sub, idxs) in &ix.per_sub {
        // (connection, channel) -> (highest offset, its delivery).
        let mut high: HashMap<(u32, u32), (u64, usize)> = HashMap::new();
        let mut had: HashSet<(u32, u64)> = HashSet::new();
        for &i in idxs {
            let d = &h.deliveries[i];
            // A message never published there is `unexpected`; judging its
            // offset too would make one bogus frame every later one's
            // witness.
            if !ix.published.contains(&d.channel)
                || !ix.is_published(d.channel, d.offset, d.id)
                || !had.insert((d.channel.0, d.offset))
            {
                continue;
            }
            match high.get_mut(&(d.conn, d.channel.0)) {
                Some((top, j)) if d.offset < *top => {
                    let (top, j) = (*top, *j);
                    reordered.add(|| Witness {
                        summary: format!(
                            "subscriber {sub} connection {} got offset {} of {} after offset {top}",
                            d.conn,
                            d.offset,
                            names.channel(d.channel)
                        ),
                        timeline: vec![ix.delivery_line(j), ix.delivery_line(i)],
                        subject: Some(ix.delivered(i)),
                    });
                }
                Some(top) => *top = (d.offset, i),
                None => {
                    high.insert((d.conn, d.channel.0), (d.offset, i));
                }
            }
        }
    }
    reordered
}

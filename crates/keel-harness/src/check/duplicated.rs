//! `duplicated`: one offset of a channel delivered to one subscriber more
//! than once (on one connection or across its resumes).

use super::{Found, Index, Witness};

pub(super) fn check(ix: &Index<'_>) -> Found {
    let h = ix.h;
    let names = &h.names;
    let mut duplicated = Found::default();
    // Walked in arrival order per subscriber, so the witness is the second
    // copy as it arrived.
    for (sub, idxs) in &ix.per_sub {
        let mut times: std::collections::HashMap<(u32, u64), usize> =
            std::collections::HashMap::new();
        for &i in idxs {
            let d = &h.deliveries[i];
            let n = times.entry((d.channel.0, d.offset)).or_insert(0);
            *n += 1;
            if *n < 2 {
                continue;
            }
            let first = ix.seen[&(*sub, d.channel)][&d.offset].first;
            duplicated.add(|| Witness {
                summary: format!(
                    "subscriber {sub} got offset {} of {} ({}) more than once",
                    d.offset,
                    names.channel(d.channel),
                    d.id.wire(names)
                ),
                timeline: vec![ix.delivery_line(first), ix.delivery_line(i)],
                subject: Some(ix.delivered(i)),
            });
        }
    }
    duplicated
}

//! `corrupted`: a delivery of a published message whose payload differs
//! from the one its publisher sent (digest and length compared).

use super::{Found, Index, Witness};

/// Corrupted deliveries, and how many payloads were compared.
pub(super) fn check(ix: &Index<'_>) -> (Found, u64) {
    let h = ix.h;
    let names = &h.names;
    let mut corrupted = Found::default();
    let mut checked = 0u64;
    for (i, d) in h.deliveries.iter().enumerate() {
        // A message that was never published there is `unexpected`; its
        // payload has nothing to be compared with.
        if !ix.published.contains(&d.channel) || !ix.is_published(d.channel, d.offset, d.id) {
            continue;
        }
        let Some(sent) = ix.by_id.get(&(d.channel, d.id)) else {
            continue;
        };
        checked += 1;
        // A re-sent id carries the same payload; any of its publishes
        // matching is a match.
        if sent.iter().any(|&p| h.publishes[p].digest == d.digest) {
            continue;
        }
        let published = h.publishes[sent[0]].digest;
        corrupted.add(|| {
            let mut timeline = ix.publish_lines(sent[0]);
            timeline.push(ix.delivery_line(i));
            Witness {
                summary: format!(
                    "subscriber {} connection {} got {} at offset {} of {} with payload {}; it was published as {}",
                    d.sub,
                    d.conn,
                    d.id.wire(names),
                    d.offset,
                    names.channel(d.channel),
                    d.digest,
                    published
                ),
                timeline,
                subject: Some(ix.delivered(i)),
            }
        });
    }
    (corrupted, checked)
}

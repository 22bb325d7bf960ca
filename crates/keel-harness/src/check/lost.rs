//! `lost`: an acknowledged message, at or after a subscriber's expected
//! start, that the subscriber never received.

use super::{Found, Index, Subject, Witness};

/// Lost messages, and how many deliveries were expected in all.
pub(super) fn check(ix: &Index<'_>) -> (Found, u64) {
    let h = ix.h;
    let names = &h.names;
    let mut lost = Found::default();
    let mut expected_deliveries = 0u64;
    let mut expectations = h.expectations.clone();
    expectations.sort_by_key(|e| (e.sub, e.channel, e.from));
    expectations.dedup_by_key(|e| (e.sub, e.channel));
    for e in expectations
        .iter()
        .filter(|e| !ix.abandoned.contains(&e.sub))
    {
        let got = ix.seen.get(&(e.sub, e.channel));
        let wanted = ix
            .offsets
            .get(&e.channel)
            .map(|v| &v[v.partition_point(|o| *o < e.from)..])
            .unwrap_or(&[]);
        for &offset in wanted {
            expected_deliveries += 1;
            if got.and_then(|g| g.get(&offset)).is_some_and(|s| s.right) {
                continue;
            }
            lost.add(|| {
                let (id, p) = ix.acked[&(e.channel, offset)];
                let mut timeline = ix.publish_lines(p);
                timeline.extend(
                    ix.per_sub
                        .get(&e.sub)
                        .into_iter()
                        .flatten()
                        .filter(|&&j| h.deliveries[j].channel == e.channel)
                        .filter(|&&j| h.deliveries[j].offset.abs_diff(offset) <= 2)
                        .map(|&j| ix.delivery_line(j)),
                );
                Witness {
                    summary: format!(
                        "{} (offset {offset} of {}) was acknowledged and never delivered to subscriber {}",
                        id.wire(names),
                        names.channel(e.channel),
                        e.sub
                    ),
                    timeline,
                    subject: Some(Subject {
                        channel: names.channel(e.channel).to_owned(),
                        offset,
                        id: id.wire(names),
                        subscriber: Some(e.sub),
                    }),
                }
            });
        }
    }
    (lost, expected_deliveries)
}

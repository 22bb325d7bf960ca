//! `unexpected`: a delivery of a message never published there (another id
//! at an acknowledged offset, or an id nobody published).

use super::{Found, Index, Witness};

pub(super) fn check(ix: &Index<'_>) -> Found {
    let h = ix.h;
    let names = &h.names;
    let mut unexpected = Found::default();
    for (i, d) in h.deliveries.iter().enumerate() {
        if !ix.published.contains(&d.channel) || ix.is_published(d.channel, d.offset, d.id) {
            continue;
        }
        unexpected.add(|| {
            let mut timeline = vec![ix.delivery_line(i)];
            if let Some((id, p)) = ix.acked.get(&(d.channel, d.offset)) {
                timeline.push(format!("acknowledged at that offset: {}", id.wire(names)));
                timeline.extend(ix.publish_lines(*p));
            }
            for p in ix.by_id.get(&(d.channel, d.id)).into_iter().flatten() {
                timeline.extend(ix.publish_lines(*p));
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
                subject: Some(ix.delivered(i)),
            }
        });
    }
    unexpected
}

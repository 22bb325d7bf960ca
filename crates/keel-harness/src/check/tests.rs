use super::*;
use crate::history::{After, Delivery, Digest, Expectation, Publish, Recorder, StateCheck};

fn payload(seq: u64) -> Digest {
    Digest::of(&format!(r#"{{"seq":{seq}}}"#))
}

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
            digest: payload(seq),
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
            digest: payload(o),
        })
        .collect();
    mutate(&mut ds);
    r.deliveries(&mut ds);
    r.take()
}

/// Exactly `n` violations of `name`, none of any other kind.
#[track_caller]
fn only(v: &Verdict, name: &str, n: u64) {
    for c in &v.checks {
        let want = if c.name == name { n } else { 0 };
        assert_eq!(c.count, want, "{}: {:?}", c.name, c.witnesses);
    }
}

/// The one witness of `name`, about offset `offset` of `room`.
#[track_caller]
fn witness_about(v: &Verdict, name: &str, offset: u64) -> Witness {
    let w = v.get(name).unwrap().witnesses[0].clone();
    let s = w.subject.clone().expect("a subject");
    assert_eq!(
        (s.channel.as_str(), s.offset, s.id.as_str(), s.subscriber),
        ("room", offset, format!("h1-{offset}").as_str(), Some(7)),
        "{w:?}"
    );
    w
}

#[test]
fn a_clean_history_passes() {
    let v = check(&history(|_| {}));
    assert!(!v.violated(), "{v:?}");
    assert_eq!(v.stats.expected_deliveries, 3);
    assert_eq!(v.stats.payloads_checked, 3);
    assert_eq!(v.checks.len(), CHECKS.len());
    for (c, name) in v.checks.iter().zip(CHECKS) {
        assert_eq!(c.name, name);
    }
}

#[test]
fn a_lost_message_is_one_lost_witness() {
    let v = check(&history(|d| {
        d.remove(1);
    }));
    only(&v, "lost", 1);
    let w = witness_about(&v, "lost", 2);
    assert!(w.summary.contains("offset 2"), "{w:?}");
}

#[test]
fn a_duplicate_is_one_duplicated_witness_and_nothing_else() {
    // The copy right behind the original, as a proxy duplicating a frame
    // delivers it: not also an order violation.
    let v = check(&history(|d| {
        let again = d[1];
        d.insert(2, again);
    }));
    only(&v, "duplicated", 1);
    witness_about(&v, "duplicated", 2);
    // A copy after later offsets, on a new connection (a resume), too.
    let v = check(&history(|d| {
        let again = Delivery { conn: 2, ..d[0] };
        d.push(again);
    }));
    only(&v, "duplicated", 1);
}

#[test]
fn a_swap_is_one_reordered_witness_about_the_late_message() {
    let v = check(&history(|d| d.swap(0, 1)));
    only(&v, "reordered", 1);
    witness_about(&v, "reordered", 1);
    // Order is per connection: a resume replaying older offsets on a new
    // connection is not out of order.
    let v = check(&history(|d| {
        d[2].conn = 2;
        d.swap(1, 2);
    }));
    assert!(!v.violated(), "{v:?}");
}

#[test]
fn a_changed_payload_is_one_corrupted_witness_with_both_digests() {
    let v = check(&history(|d| d[2].digest = Digest::of(r#"{"seq":"x"}"#)));
    only(&v, "corrupted", 1);
    let w = witness_about(&v, "corrupted", 3);
    assert!(w.summary.contains(&payload(3).to_string()), "{w:?}");
    assert!(
        w.summary
            .contains(&Digest::of(r#"{"seq":"x"}"#).to_string()),
        "{w:?}"
    );
    assert!(v.get("corrupted").unwrap().hard);
    // The same length is no disguise.
    let v = check(&history(|d| d[0].digest = Digest::of(r#"{"seq":9}"#)));
    only(&v, "corrupted", 1);
}

#[test]
fn another_message_at_an_acknowledged_offset_is_unexpected_and_the_acknowledged_one_lost() {
    let v = check(&history(|d| d[2].id = MsgId::harness(9, 9)));
    assert_eq!(
        (
            v.count("unexpected"),
            v.count("lost"),
            v.count("corrupted"),
            v.violations()
        ),
        (1, 1, 0, 2),
        "{v:?}"
    );
    witness_about(&v, "lost", 3);
}

#[test]
fn a_bogus_offset_is_one_unexpected_witness_not_a_cascade_of_reorders() {
    let v = check(&history(|d| {
        let bogus = Delivery {
            offset: 99,
            id: MsgId::harness(9, 9),
            ..d[0]
        };
        d.insert(1, bogus);
    }));
    only(&v, "unexpected", 1);
}

#[test]
fn a_subscriber_that_gave_up_is_not_held_to_what_it_missed() {
    let mut h = history(|d| {
        d.truncate(1);
    });
    assert_eq!(check(&h).count("lost"), 2);
    h.abandoned.push(crate::history::Abandon {
        sub: 7,
        at: 102,
        why: "lost its link".into(),
    });
    let v = check(&h);
    assert!(!v.violated(), "{v:?}");
    assert_eq!(v.stats.subscribers_abandoned, 1);
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
            digest: payload(seq),
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
fn unknown_outcomes_are_neither_lost_nor_unexpected_but_their_payload_counts() {
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
        digest: payload(1),
    });
    r.expect(Expectation {
        sub: 2,
        channel: c,
        from: 1,
    });
    let d = Delivery {
        sub: 2,
        conn: 1,
        channel: c,
        offset: 1,
        id: MsgId::harness(1, 1),
        at: 3,
        digest: payload(1),
    };
    r.deliveries(&mut vec![d]);
    let h = r.take();
    assert!(!check(&h).violated());
    let mut bad = h.clone();
    bad.deliveries[0].digest = payload(2);
    only(&check(&bad), "corrupted", 1);
}

fn state(expected: &str, observed: &str, after: After) -> History {
    let r = Recorder::new();
    r.state(StateCheck {
        client: 1,
        session: "s".into(),
        expected: expected.into(),
        observed: observed.into(),
        at: 5,
        after,
    });
    r.take()
}

#[test]
fn session_states_are_judged_as_an_asynchronous_system_has_them() {
    let unseen = After::ClientClose { at: 1, seen: false };
    let seen = After::ClientClose { at: 1, seen: true };
    // A settled state is exact.
    only(
        &check(&state("DETACHED", "CRASHED", After::Settled)),
        "session_state",
        1,
    );
    only(
        &check(&state("DETACHED", "ACTIVE", After::Settled)),
        "session_state",
        1,
    );
    // After the client's own close, not known to have reached the relay:
    // DETACHED, or ACTIVE (taken over).
    assert!(!check(&state("DETACHED", "DETACHED", unseen)).violated());
    assert!(!check(&state("DETACHED", "ACTIVE", unseen)).violated());
    only(
        &check(&state("DETACHED", "CRASHED", unseen)),
        "session_state",
        1,
    );
    // The relay answered the close itself: DETACHED only.
    only(
        &check(&state("DETACHED", "ACTIVE", seen)),
        "session_state",
        1,
    );
    // After a kill: CRASHED only, whatever the client did before.
    only(
        &check(&state("CRASHED", "ACTIVE", unseen)),
        "session_state",
        1,
    );
    only(
        &check(&state("CRASHED", "DETACHED", unseen)),
        "session_state",
        1,
    );
    let v = check(&state("DETACHED", "CRASHED", unseen));
    let w = &v.get("session_state").unwrap().witnesses[0];
    assert!(w.summary.contains("DETACHED or ACTIVE"), "{w:?}");
    assert!(w.subject.is_none());
}

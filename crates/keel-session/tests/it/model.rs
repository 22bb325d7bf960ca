//! Model-based test: random operation sequences against an in-memory reference,
//! including clean reopens and unclean drops of the store.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use keel_session::{
    NewSend, NewSession, OutboxError, OutboxId, OutboxState, Retention, Retry, SessionError,
    SessionId, SessionState,
};
use proptest::prelude::*;

use crate::support::{self, TestStore};

#[derive(Debug, Clone)]
enum Op {
    Create,
    Transition(usize, SessionState),
    Activity(usize),
    Append(u8, u8),
    Retain(u8),
    Enqueue(u8),
    Claim(u8, u16, u8),
    Complete(usize, u8),
    Fail(usize, u8, Option<u16>),
    Redrive(usize),
    Advance(u16),
    Reopen,
    DropAndReopen,
}

fn state() -> impl Strategy<Value = SessionState> {
    prop::sample::select(SessionState::ALL.to_vec())
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::Create),
        4 => (0..8usize, state()).prop_map(|(i, s)| Op::Transition(i, s)),
        2 => (0..8usize).prop_map(Op::Activity),
        4 => (0..3u8, 0..12u8).prop_map(|(c, m)| Op::Append(c, m)),
        1 => (0..4u8).prop_map(Op::Retain),
        3 => (0..10u8).prop_map(Op::Enqueue),
        3 => (0..3u8, 1..3000u16, 1..4u8).prop_map(|(w, l, n)| Op::Claim(w, l, n)),
        3 => (0..10usize, 0..3u8).prop_map(|(i, w)| Op::Complete(i, w)),
        2 => (0..10usize, 0..3u8, prop::option::of(0..2000u16)).prop_map(|(i, w, r)| Op::Fail(i, w, r)),
        1 => (0..10usize).prop_map(Op::Redrive),
        2 => (0..2500u16).prop_map(Op::Advance),
        1 => Just(Op::Reopen),
        1 => Just(Op::DropAndReopen),
    ]
}

#[derive(Debug, Clone)]
struct ModelItem {
    id: OutboxId,
    key: String,
    state: OutboxState,
    claimed_by: Option<String>,
    claim_until: i64,
    attempts: u32,
    next_attempt_at: i64,
}

#[derive(Default)]
struct Model {
    now: i64,
    sessions: Vec<(SessionId, SessionState, u32)>,
    activity: BTreeMap<SessionId, VecDeque<String>>,
    /// channel -> (next offset, offset -> msg id)
    channels: BTreeMap<String, (u64, BTreeMap<u64, String>)>,
    outbox: Vec<ModelItem>,
}

async fn run(ops: Vec<Op>) {
    let mut t: TestStore = support::open().await;
    let mut m = Model {
        now: support::T0,
        ..Default::default()
    };
    let mut created = 0usize;
    for op in ops {
        apply(&mut t, &mut m, op, &mut created).await;
    }
    compare(&t, &m).await;
}

async fn apply(t: &mut TestStore, m: &mut Model, op: Op, created: &mut usize) {
    match op {
        Op::Create => {
            let id = SessionId(format!("s{created}"));
            *created += 1;
            let s = t
                .store
                .create_session(NewSession {
                    id: Some(id.clone()),
                    ..Default::default()
                })
                .await
                .unwrap();
            assert_eq!(s.state, SessionState::Created);
            m.sessions.push((id, SessionState::Created, 0));
        }
        Op::Transition(i, to) => {
            let Some((id, from, crashes)) = m.sessions.get_mut(i) else {
                return;
            };
            let got = t.store.transition(id, to).await;
            if from.can_transition_to(to) {
                let s = got.unwrap();
                *from = to;
                if to == SessionState::Crashed {
                    *crashes += 1;
                }
                assert_eq!((s.state, s.crash_count), (*from, *crashes));
            } else {
                assert_eq!(
                    got,
                    Err(SessionError::InvalidTransition { from: *from, to })
                );
            }
        }
        Op::Activity(i) => {
            let Some((id, _, _)) = m.sessions.get(i) else {
                return;
            };
            let detail = format!("d{}", m.now);
            t.store.record_activity(id, "k", &detail).await.unwrap();
            let log = m.activity.entry(id.clone()).or_default();
            log.push_back(detail);
            if log.len() > 10 {
                log.pop_front();
            }
        }
        Op::Append(c, msg) => {
            let channel = format!("c{c}");
            let msg_id = format!("m{msg}");
            let got = t
                .store
                .append(&channel, &msg_id, msg_id.as_bytes())
                .await
                .unwrap();
            let (next, log) = m.channels.entry(channel).or_insert((1, BTreeMap::new()));
            match log.iter().find(|(_, id)| **id == msg_id) {
                Some((offset, _)) => {
                    assert!(got.duplicate);
                    assert_eq!(got.offset, *offset);
                }
                None => {
                    assert!(!got.duplicate);
                    assert_eq!(got.offset, *next);
                    log.insert(*next, msg_id);
                    *next += 1;
                }
            }
        }
        Op::Retain(keep) => {
            let removed = t
                .store
                .apply_retention(Retention {
                    max_count: Some(u64::from(keep)),
                    max_age: None,
                })
                .await
                .unwrap();
            let mut expected = 0;
            for (next, log) in m.channels.values_mut() {
                let cutoff = next.saturating_sub(1 + u64::from(keep));
                let before = log.len();
                log.retain(|off, _| *off > cutoff);
                expected += (before - log.len()) as u64;
            }
            assert_eq!(removed, expected);
        }
        Op::Enqueue(k) => {
            let key = format!("k{k}");
            let got = t
                .store
                .enqueue(NewSend {
                    session_id: None,
                    idem_key: key.clone(),
                    payload: vec![k],
                    ..Default::default()
                })
                .await
                .unwrap();
            match m.outbox.iter().find(|i| i.key == key) {
                Some(item) => assert_eq!((got.id, got.duplicate), (item.id, true)),
                None => {
                    assert!(!got.duplicate);
                    m.outbox.push(ModelItem {
                        id: got.id,
                        key,
                        state: OutboxState::Pending,
                        claimed_by: None,
                        claim_until: 0,
                        attempts: 0,
                        next_attempt_at: m.now,
                    });
                }
            }
        }
        Op::Claim(w, lease, n) => {
            let worker = format!("w{w}");
            let got = t
                .store
                .claim(
                    &worker,
                    Duration::from_millis(u64::from(lease)),
                    usize::from(n),
                )
                .await
                .unwrap();
            let now = m.now;
            let due: Vec<usize> = m
                .outbox
                .iter()
                .enumerate()
                .filter(|(_, i)| {
                    (i.state == OutboxState::Pending && i.next_attempt_at <= now)
                        || (i.state == OutboxState::Claimed && i.claim_until <= now)
                })
                .map(|(idx, _)| idx)
                .take(usize::from(n))
                .collect();
            let got_ids: Vec<_> = got.iter().map(|i| i.id).collect();
            let want_ids: Vec<_> = due.iter().map(|&idx| m.outbox[idx].id).collect();
            assert_eq!(got_ids, want_ids);
            for idx in due {
                let item = &mut m.outbox[idx];
                item.state = OutboxState::Claimed;
                item.claimed_by = Some(worker.clone());
                item.claim_until = now + i64::from(lease);
            }
        }
        Op::Complete(i, w) => {
            let Some(item) = m.outbox.get_mut(i) else {
                return;
            };
            let worker = format!("w{w}");
            let got = t.store.complete(item.id, &worker).await;
            if item.state == OutboxState::Claimed && item.claimed_by.as_deref() == Some(&worker) {
                assert_eq!(got.unwrap().state, OutboxState::Sent);
                item.state = OutboxState::Sent;
                item.claimed_by = None;
            } else {
                assert_eq!(
                    got,
                    Err(OutboxError::NotClaimed {
                        id: item.id,
                        worker
                    })
                );
            }
        }
        Op::Fail(i, w, retry) => {
            let Some(item) = m.outbox.get_mut(i) else {
                return;
            };
            let worker = format!("w{w}");
            let policy = match retry {
                Some(ms) => Retry::After(Duration::from_millis(u64::from(ms))),
                None => Retry::Never,
            };
            let got = t.store.fail(item.id, &worker, "boom", policy).await;
            if item.state == OutboxState::Claimed && item.claimed_by.as_deref() == Some(&worker) {
                item.attempts += 1;
                item.claimed_by = None;
                match retry {
                    Some(ms) => {
                        item.state = OutboxState::Pending;
                        item.next_attempt_at = m.now + i64::from(ms);
                    }
                    None => item.state = OutboxState::Dead,
                }
                let got = got.unwrap();
                assert_eq!((got.state, got.attempts), (item.state, item.attempts));
            } else {
                assert_eq!(
                    got,
                    Err(OutboxError::NotClaimed {
                        id: item.id,
                        worker
                    })
                );
            }
        }
        Op::Redrive(i) => {
            let Some(item) = m.outbox.get_mut(i) else {
                return;
            };
            let got = t.store.redrive(item.id).await;
            if item.state == OutboxState::Dead {
                got.unwrap();
                item.state = OutboxState::Pending;
                item.attempts = 0;
                item.next_attempt_at = m.now;
            } else {
                assert!(
                    matches!(got, Err(OutboxError::WrongState { .. })),
                    "{got:?}"
                );
            }
        }
        Op::Advance(ms) => {
            t.clock.advance(Duration::from_millis(u64::from(ms)));
            m.now += i64::from(ms);
        }
        Op::Reopen => {
            t.reopen().await;
            assert!(t.store.startup().previous_clean_shutdown);
            compare(t, m).await;
        }
        Op::DropAndReopen => {
            // A restart after a crash: the new store opens before the old handle
            // is gone, as it would beside a dying process, and must find the
            // unclean-shutdown mark and every acknowledged write.
            let fresh = keel_session::Store::open(&t.path(), t.config())
                .await
                .unwrap();
            assert!(!fresh.startup().previous_clean_shutdown);
            drop(std::mem::replace(&mut t.store, fresh));
            compare(t, m).await;
        }
    }
}

async fn compare(t: &TestStore, m: &Model) {
    let stored = t.store.sessions(None).await.unwrap();
    assert_eq!(stored.len(), m.sessions.len());
    for (id, state, crashes) in &m.sessions {
        let s = t.store.session(id).await.unwrap();
        assert_eq!((s.state, s.crash_count), (*state, *crashes), "{id}");
        let log: Vec<_> = t
            .store
            .activity(id)
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.detail)
            .collect();
        let want: Vec<_> = m
            .activity
            .get(id)
            .map(|l| l.iter().cloned().collect())
            .unwrap_or_default();
        assert_eq!(log, want, "activity of {id}");
    }
    for (channel, (next, log)) in &m.channels {
        let got: Vec<_> = t
            .store
            .read_channel(channel, 0, 1000)
            .await
            .unwrap()
            .into_iter()
            .map(|msg| (msg.offset, msg.msg_id))
            .collect();
        let want: Vec<_> = log.iter().map(|(o, id)| (*o, id.clone())).collect();
        assert_eq!(got, want, "log of {channel}");
        assert_eq!(t.store.channel_bounds(channel).await.unwrap().next, *next);
    }
    for item in &m.outbox {
        let got = t.store.outbox_item(item.id).await.unwrap();
        assert_eq!(
            (got.state, got.attempts, got.claimed_by.clone()),
            (item.state, item.attempts, item.claimed_by.clone()),
            "outbox item {}",
            item.id
        );
        if got.state == OutboxState::Pending {
            assert_eq!(got.next_attempt_at, item.next_attempt_at);
        }
    }
    assert!(t.store.integrity_check().await.unwrap().is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn store_matches_model(ops in prop::collection::vec(op(), 1..60)) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run(ops));
    }
}

//! Sinks that record what they sent and when, and a quota checker.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_ratelimit::{Quota, SendOutcome, Sink};
use tokio::time::Instant;

pub(crate) fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).expect("non-zero")
}

/// One send the sink saw; `key` ends in `!` when the answer was not `Sent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sent {
    pub(crate) key: String,
    pub(crate) msg: u32,
    pub(crate) at: Instant,
}

/// Answers waiting to be given, each for one key or for any key.
type Script = VecDeque<(Option<String>, SendOutcome)>;

/// Records every call; answers from a script (per call, in order), `Sent` once
/// the script runs out.
#[derive(Clone, Default)]
pub(crate) struct Recorder {
    pub(crate) calls: Arc<Mutex<Vec<Sent>>>,
    script: Arc<Mutex<Script>>,
    gate: Option<Arc<tokio::sync::Semaphore>>,
}

impl Recorder {
    /// A recorder whose sends block until `gate` has permits.
    pub(crate) fn gated(gate: Arc<tokio::sync::Semaphore>) -> Self {
        Recorder {
            gate: Some(gate),
            ..Recorder::default()
        }
    }

    /// The next call for `key` (any key if `None`) answers `outcome`.
    pub(crate) fn then(&self, key: Option<&str>, outcome: SendOutcome) {
        self.script
            .lock()
            .unwrap()
            .push_back((key.map(str::to_owned), outcome));
    }

    pub(crate) fn calls(&self) -> Vec<Sent> {
        self.calls.lock().unwrap().clone()
    }
}

impl Sink<String, u32> for Recorder {
    async fn send(&self, key: &String, msg: &u32) -> SendOutcome {
        if let Some(gate) = &self.gate {
            gate.acquire().await.expect("gate open").forget();
        }
        let outcome = {
            let mut script = self.script.lock().unwrap();
            let pos = script
                .iter()
                .position(|(k, _)| k.as_deref().is_none_or(|k| k == key));
            pos.and_then(|p| script.remove(p)).map(|(_, o)| o)
        };
        let outcome = outcome.unwrap_or(SendOutcome::Sent);
        if outcome == SendOutcome::Sent {
            self.calls.lock().unwrap().push(Sent {
                key: key.clone(),
                msg: *msg,
                at: Instant::now(),
            });
        } else {
            self.calls.lock().unwrap().push(Sent {
                key: format!("{key}!"),
                msg: *msg,
                at: Instant::now(),
            });
        }
        outcome
    }
}

/// Checks that `instants` (sorted) conform to `quota` as a token bucket:
/// in every window, at most `burst + elapsed / interval` sends.
#[track_caller]
pub(crate) fn check_quota(instants: &[Instant], quota: Quota, what: &str) {
    let t = quota.replenish_interval().as_nanos();
    let burst = u128::from(quota.burst_size().get());
    for j in 0..instants.len() {
        for i in 0..j {
            let elapsed = instants[j].duration_since(instants[i]).as_nanos();
            let count = (j - i + 1) as u128;
            assert!(
                count <= burst + elapsed / t,
                "{what}: {count} sends within {:?} exceed {quota:?} (sends {i}..={j})",
                Duration::from_nanos(elapsed as u64)
            );
        }
    }
}

/// Lets the queue run until nothing is due before `by` has passed.
pub(crate) async fn run_for(by: Duration) {
    tokio::time::sleep(by).await;
}

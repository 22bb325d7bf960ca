//! `session_state`: a session observed in a state the protocol does not
//! allow at that point (see [`crate::history::After`] for what an
//! asynchronous system allows after the client's own close).

use super::{Found, Witness};
use crate::history::{After, History};

pub(super) fn check(h: &History) -> Found {
    let mut session_state = Found::default();
    for s in &h.states {
        if s.holds() {
            continue;
        }
        session_state.add(|| {
            let mut timeline = Vec::new();
            if let After::ClientClose { at, seen } = s.after {
                timeline.push(format!(
                    "t={at} client {} closed its connection ({})",
                    s.client,
                    if seen {
                        "the relay answered the close itself"
                    } else {
                        "not known to have reached the relay"
                    }
                ));
            }
            timeline.push(format!("t={} welcome state {}", s.at, s.observed));
            Witness {
                summary: format!(
                    "session {} of client {} was {} where the protocol says {}",
                    s.session,
                    s.client,
                    s.observed,
                    s.allowed().join(" or ")
                ),
                timeline,
                subject: None,
            }
        });
    }
    session_state
}

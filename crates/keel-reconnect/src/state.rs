//! The connection state machine, published through a `watch` channel.

use std::fmt;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

/// Where the logical connection is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Opening TCP and the WebSocket handshake.
    Connecting,
    /// Running the resume hook on a fresh link.
    Resuming,
    /// Up: buffered messages flow.
    Connected,
    /// The link is gone.
    Disconnected {
        /// Why.
        reason: String,
    },
    /// Waiting before the next attempt.
    Backoff {
        /// Attempts since the link was last stable (1 for the first retry).
        attempt: u32,
        /// The delay chosen.
        delay: Duration,
        /// When the next attempt starts.
        until: Instant,
    },
    /// Terminal: closed by the user or by a fatal close from the server.
    Closed {
        /// Why.
        reason: String,
    },
}

impl State {
    fn kind(&self) -> Kind {
        match self {
            State::Connecting => Kind::Connecting,
            State::Resuming => Kind::Resuming,
            State::Connected => Kind::Connected,
            State::Disconnected { .. } => Kind::Disconnected,
            State::Backoff { .. } => Kind::Backoff,
            State::Closed { .. } => Kind::Closed,
        }
    }

    /// Whether the table allows moving from `self` to `to`.
    ///
    /// ```text
    /// Connecting   -> Resuming | Disconnected | Closed
    /// Resuming     -> Connected | Disconnected | Closed
    /// Connected    -> Disconnected | Closed
    /// Disconnected -> Backoff | Closed
    /// Backoff      -> Connecting | Closed
    /// Closed       -> (nothing)
    /// ```
    pub fn can_transition_to(&self, to: &State) -> bool {
        use Kind::*;
        matches!(
            (self.kind(), to.kind()),
            (Connecting, Resuming | Disconnected | Closed)
                | (Resuming, Connected | Disconnected | Closed)
                | (Connected, Disconnected | Closed)
                | (Disconnected, Backoff | Closed)
                | (Backoff, Connecting | Closed)
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Connecting,
    Resuming,
    Connected,
    Disconnected,
    Backoff,
    Closed,
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.kind())
    }
}

/// A transition the table does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid connection state transition from {from} to {to}")]
pub struct InvalidTransition {
    /// The state it was in.
    pub from: State,
    /// The state asked for.
    pub to: State,
}

/// Holds the state and checks every change against the table.
#[derive(Debug)]
pub struct StateCell {
    tx: watch::Sender<State>,
    /// Created on the first `log()` call: a broadcast channel allocates all
    /// its slots up front, which idle clients should not pay for.
    log: std::sync::OnceLock<tokio::sync::broadcast::Sender<State>>,
}

impl StateCell {
    /// A cell starting in `Connecting`.
    pub fn new() -> Self {
        StateCell {
            tx: watch::Sender::new(State::Connecting),
            log: std::sync::OnceLock::new(),
        }
    }

    /// Moves to `to` if the table allows it.
    pub fn set(&self, to: State) -> Result<(), InvalidTransition> {
        let mut result = Ok(());
        self.tx.send_if_modified(|current| {
            if current.can_transition_to(&to) {
                *current = to.clone();
                if let Some(log) = self.log.get() {
                    let _ = log.send(to.clone());
                }
                true
            } else {
                result = Err(InvalidTransition {
                    from: current.clone(),
                    to: to.clone(),
                });
                false
            }
        });
        result
    }

    /// The state now.
    pub fn get(&self) -> State {
        self.tx.borrow().clone()
    }

    /// A receiver of the current state (it may skip states that change fast).
    pub fn watch(&self) -> watch::Receiver<State> {
        self.tx.subscribe()
    }

    /// A receiver of every transition from now on, in order (up to 256 behind).
    pub fn log(&self) -> tokio::sync::broadcast::Receiver<State> {
        self.log
            .get_or_init(|| tokio::sync::broadcast::Sender::new(256))
            .subscribe()
    }
}

impl Default for StateCell {
    fn default() -> Self {
        Self::new()
    }
}

//! The service's health state machine, driven by inputs and persisted on every change.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use keel_session::{SessionStore, Store, StoreError, UnixMillis};
use tokio::sync::{Mutex, watch};

/// The service's health.
///
/// ```text
/// STARTING -> OPERATIONAL <-> DEGRADED
///      \           \             /
///       `-----------`-> DRAINING -> STOPPED
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HealthState {
    /// Recovering and opening; not serving yet.
    Starting,
    /// Serving with every input healthy.
    Operational,
    /// Serving, but an input is unhealthy (upstream unreachable, disk low or
    /// full, database failing, or an explicit [`Health::degrade`]).
    Degraded,
    /// Shutting down: intake stopped, in-flight work finishing.
    Draining,
    /// Stopped.
    Stopped,
}

impl HealthState {
    /// The name used in the health log and on `/healthz`.
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Starting => "STARTING",
            HealthState::Operational => "OPERATIONAL",
            HealthState::Degraded => "DEGRADED",
            HealthState::Draining => "DRAINING",
            HealthState::Stopped => "STOPPED",
        }
    }

    /// Whether the machine allows `self -> to`.
    pub fn can_transition_to(self, to: HealthState) -> bool {
        use HealthState::*;
        matches!(
            (self, to),
            (Starting, Operational | Degraded | Draining | Stopped)
                | (Operational, Degraded | Draining)
                | (Degraded, Operational | Draining)
                | (Draining, Stopped)
        )
    }

    /// Whether the service takes new work in this state.
    pub fn is_serving(self) -> bool {
        matches!(self, HealthState::Operational | HealthState::Degraded)
    }
}

impl std::str::FromStr for HealthState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "STARTING" => HealthState::Starting,
            "OPERATIONAL" => HealthState::Operational,
            "DEGRADED" => HealthState::Degraded,
            "DRAINING" => HealthState::Draining,
            "STOPPED" => HealthState::Stopped,
            other => return Err(format!("unknown health state {other:?}")),
        })
    }
}

impl fmt::Display for HealthState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Free space on the disk holding the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiskStatus {
    /// Enough space.
    #[default]
    Ok,
    /// Below the configured low-water mark.
    Low,
    /// Writes fail for lack of space.
    Full,
}

/// What health is computed from while the service is serving.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inputs {
    /// The upstream messaging API answers.
    pub upstream_reachable: bool,
    /// Space on the data disk.
    pub disk: DiskStatus,
    /// The last database operation did not fail with a storage error.
    pub database_ok: bool,
    /// Set by [`Health::degrade`], cleared by [`Health::restore`].
    pub forced: Option<String>,
}

impl Default for Inputs {
    fn default() -> Self {
        Inputs {
            upstream_reachable: true,
            disk: DiskStatus::Ok,
            database_ok: true,
            forced: None,
        }
    }
}

impl Inputs {
    /// What is wrong, or `None` when every input is healthy.
    pub fn problems(&self) -> Option<String> {
        let mut out = Vec::new();
        if !self.upstream_reachable {
            out.push("upstream unreachable".to_owned());
        }
        match self.disk {
            DiskStatus::Ok => {}
            DiskStatus::Low => out.push("disk space low".to_owned()),
            DiskStatus::Full => out.push("disk full".to_owned()),
        }
        if !self.database_ok {
            out.push("database failing".to_owned());
        }
        if let Some(reason) = &self.forced {
            out.push(reason.clone());
        }
        (!out.is_empty()).then(|| out.join("; "))
    }
}

/// One change of health state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// Unique and increasing within this process, persisted or not.
    pub seq: u64,
    /// The health log's id for it, once persisted: unique across runs.
    pub id: Option<i64>,
    /// When it happened.
    pub at: UnixMillis,
    /// The state before.
    pub from: HealthState,
    /// The state after.
    pub to: HealthState,
    /// Why.
    pub reason: String,
}

/// Why a health request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HealthError {
    /// The state machine does not allow it; nothing changed.
    #[error("health cannot go from {from} to {to}")]
    Invalid {
        /// The current state.
        from: HealthState,
        /// The requested state.
        to: HealthState,
    },
}

/// How many transitions are kept in memory when the database cannot take them.
const MAX_PENDING: usize = 1024;

struct Machine {
    state: HealthState,
    inputs: Inputs,
    seq: u64,
    /// Transitions not yet in the health log (the database refused them),
    /// oldest first; written before any newer transition.
    pending: VecDeque<Transition>,
    dropped: u64,
}

struct Shared<S> {
    store: S,
    machine: Mutex<Machine>,
    tx: watch::Sender<HealthState>,
}

/// The health state machine. Clones share one machine.
///
/// Requests from any number of tasks are serialised: each holds the machine
/// while its transition is written to the store's health log, so the log is
/// the exact sequence of states. If the store cannot write (a full disk is
/// the usual reason) the transition still happens and is written, in order,
/// as soon as a write succeeds again; see [`Health::flush`].
#[derive(Clone)]
pub struct Health<S: SessionStore = Store> {
    shared: Arc<Shared<S>>,
}

impl<S: SessionStore> fmt::Debug for Health<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Health")
            .field("state", &self.state())
            .finish_non_exhaustive()
    }
}

impl<S: SessionStore> Health<S> {
    /// Starts the machine in STARTING and records the entry in the health log,
    /// coming from the last state the log holds (or STOPPED for a new log),
    /// so the log reads as one chain across restarts.
    pub async fn start(store: S, reason: &str) -> Health<S> {
        let last = store
            .health_transitions(1)
            .await
            .ok()
            .and_then(|t| t.into_iter().next())
            .map(|t| t.to)
            .unwrap_or_else(|| "STOPPED".to_owned());
        let (tx, _) = watch::channel(HealthState::Starting);
        let health = Health {
            shared: Arc::new(Shared {
                store,
                machine: Mutex::new(Machine {
                    state: HealthState::Starting,
                    inputs: Inputs::default(),
                    seq: 0,
                    pending: VecDeque::new(),
                    dropped: 0,
                }),
                tx,
            }),
        };
        let mut m = health.shared.machine.lock().await;
        let at = health.shared.store.now();
        m.seq += 1;
        let entry = Transition {
            seq: m.seq,
            id: None,
            at,
            from: last.parse().unwrap_or(HealthState::Stopped),
            to: HealthState::Starting,
            reason: reason.to_owned(),
        };
        let recorded = health
            .shared
            .store
            .record_health_transition(&last, "STARTING", reason)
            .await;
        if recorded.is_err() {
            push_pending(&mut m, entry);
        }
        drop(m);
        health
    }

    /// The current state.
    pub fn state(&self) -> HealthState {
        *self.shared.tx.borrow()
    }

    /// A receiver that sees every later state change.
    pub fn watch(&self) -> watch::Receiver<HealthState> {
        self.shared.tx.subscribe()
    }

    /// The current inputs.
    pub async fn inputs(&self) -> Inputs {
        self.shared.machine.lock().await.inputs.clone()
    }

    /// Transitions that happened but are not in the health log yet, and how
    /// many were dropped because more than 1,024 piled up.
    pub async fn unpersisted(&self) -> (Vec<Transition>, u64) {
        let m = self.shared.machine.lock().await;
        (m.pending.iter().cloned().collect(), m.dropped)
    }

    /// Startup is done: OPERATIONAL, or DEGRADED if an input is unhealthy.
    pub async fn ready(&self, reason: &str) -> Result<Option<Transition>, HealthError> {
        self.update(|m| {
            if m.state != HealthState::Starting {
                return Err(HealthError::Invalid {
                    from: m.state,
                    to: HealthState::Operational,
                });
            }
            Ok(Some(match m.inputs.problems() {
                None => (HealthState::Operational, reason.to_owned()),
                Some(p) => (HealthState::Degraded, format!("{reason}; {p}")),
            }))
        })
        .await
    }

    /// Records whether the upstream answers.
    pub async fn set_upstream_reachable(&self, reachable: bool) -> Option<Transition> {
        self.set_input(|i| i.upstream_reachable = reachable).await
    }

    /// Records the disk's free-space status.
    pub async fn set_disk(&self, disk: DiskStatus) -> Option<Transition> {
        self.set_input(|i| i.disk = disk).await
    }

    /// Records whether the database works.
    pub async fn set_database_ok(&self, ok: bool) -> Option<Transition> {
        self.set_input(|i| i.database_ok = ok).await
    }

    /// Feeds a failed store operation in: a full disk marks the disk full,
    /// corruption and I/O errors mark the database failing, anything else
    /// (a closed store, a constraint) changes nothing.
    pub async fn observe_store_error(&self, err: &StoreError) -> Option<Transition> {
        match err {
            StoreError::DiskFull { .. } => self.set_disk(DiskStatus::Full).await,
            StoreError::Corrupt { .. } | StoreError::Io { .. } => self.set_database_ok(false).await,
            _ => None,
        }
    }

    /// Forces DEGRADED for `reason` until [`Health::restore`].
    pub async fn degrade(&self, reason: &str) -> Option<Transition> {
        let reason = reason.to_owned();
        self.set_input(move |i| i.forced = Some(reason.clone()))
            .await
    }

    /// Clears [`Health::degrade`]; OPERATIONAL again if every other input is healthy.
    pub async fn restore(&self) -> Option<Transition> {
        self.set_input(|i| i.forced = None).await
    }

    /// Shutdown has begun: DRAINING.
    pub async fn drain(&self, reason: &str) -> Result<Option<Transition>, HealthError> {
        self.request(HealthState::Draining, reason).await
    }

    /// Shutdown is done: STOPPED.
    pub async fn stop(&self, reason: &str) -> Result<Option<Transition>, HealthError> {
        self.request(HealthState::Stopped, reason).await
    }

    /// Moves to `to` if the machine allows it. Asking for the current state
    /// changes nothing and returns `Ok(None)`. OPERATIONAL is refused while an
    /// input is unhealthy (use [`Health::restore`] for a forced degradation).
    pub async fn request(
        &self,
        to: HealthState,
        reason: &str,
    ) -> Result<Option<Transition>, HealthError> {
        self.update(|m| {
            if m.state == to {
                Ok(None)
            } else if to == HealthState::Operational && m.inputs.problems().is_some() {
                Err(HealthError::Invalid { from: m.state, to })
            } else if m.state.can_transition_to(to) {
                Ok(Some((to, reason.to_owned())))
            } else {
                Err(HealthError::Invalid { from: m.state, to })
            }
        })
        .await
    }

    /// Writes transitions the store refused earlier. Returns how many are
    /// still waiting. Every request calls this first.
    pub async fn flush(&self) -> usize {
        let mut m = self.shared.machine.lock().await;
        self.flush_locked(&mut m).await;
        m.pending.len()
    }

    async fn set_input(&self, change: impl Fn(&mut Inputs)) -> Option<Transition> {
        self.update(|m| {
            change(&mut m.inputs);
            if !m.state.is_serving() {
                return Ok(None);
            }
            Ok(match m.inputs.problems() {
                None if m.state == HealthState::Degraded => {
                    Some((HealthState::Operational, "all inputs healthy".to_owned()))
                }
                Some(p) if m.state == HealthState::Operational => Some((HealthState::Degraded, p)),
                _ => None,
            })
        })
        .await
        .ok()
        .flatten()
    }

    async fn update(
        &self,
        decide: impl FnOnce(&mut Machine) -> Result<Option<(HealthState, String)>, HealthError>,
    ) -> Result<Option<Transition>, HealthError> {
        let mut m = self.shared.machine.lock().await;
        self.flush_locked(&mut m).await;
        let Some((to, reason)) = decide(&mut m)? else {
            return Ok(None);
        };
        let from = m.state;
        m.seq += 1;
        let mut t = Transition {
            seq: m.seq,
            id: None,
            at: self.shared.store.now(),
            from,
            to,
            reason,
        };
        if m.pending.is_empty() {
            match self
                .shared
                .store
                .record_health_transition(from.as_str(), to.as_str(), &t.reason)
                .await
            {
                Ok(recorded) => {
                    t.id = Some(recorded.id);
                    t.at = recorded.at;
                }
                Err(e) => {
                    tracing::warn!(target: "keel_recovery", error = %e, "health transition kept in memory until the store accepts writes");
                    push_pending(&mut m, t.clone());
                }
            }
        } else {
            push_pending(&mut m, t.clone());
        }
        m.state = to;
        tracing::info!(target: "keel_recovery", from = %from, to = %to, reason = %t.reason, "health");
        self.shared.tx.send_replace(to);
        Ok(Some(t))
    }

    async fn flush_locked(&self, m: &mut Machine) {
        while let Some(t) = m.pending.front() {
            let reason = format!("{} (recorded late: happened at {})", t.reason, t.at);
            match self
                .shared
                .store
                .record_health_transition(t.from.as_str(), t.to.as_str(), &reason)
                .await
            {
                Ok(_) => {
                    m.pending.pop_front();
                }
                Err(_) => return,
            }
        }
    }
}

fn push_pending(m: &mut Machine, t: Transition) {
    if m.pending.len() == MAX_PENDING {
        m.pending.pop_front();
        m.dropped += 1;
    }
    m.pending.push_back(t);
}

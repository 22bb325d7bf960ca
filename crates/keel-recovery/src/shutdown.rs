//! Graceful shutdown: stop intake, drain, flush, record a clean shutdown.

use std::future::Future;
use std::time::{Duration, Instant};

use keel_session::{SessionStore, StoreError};
use tokio::sync::watch;

use crate::health::Health;
use crate::supervise::Supervisor;

/// The switch that tells intake to stop. Clones of its [`ShutdownToken`]s see it.
#[derive(Debug)]
pub struct Shutdown {
    tx: watch::Sender<bool>,
}

impl Default for Shutdown {
    fn default() -> Self {
        Shutdown {
            tx: watch::channel(false).0,
        }
    }
}

impl Shutdown {
    /// A switch that has not been thrown.
    pub fn new() -> Self {
        Self::default()
    }

    /// A token for a task that must stop taking work.
    pub fn token(&self) -> ShutdownToken {
        ShutdownToken {
            rx: self.tx.subscribe(),
        }
    }

    /// Throws the switch.
    pub fn trigger(&self) {
        self.tx.send_replace(true);
    }

    /// Whether the switch was thrown.
    pub fn is_triggered(&self) -> bool {
        *self.tx.borrow()
    }
}

/// Seen by intake loops: stop accepting once this says so.
#[derive(Debug, Clone)]
pub struct ShutdownToken {
    rx: watch::Receiver<bool>,
}

impl ShutdownToken {
    /// Whether shutdown has begun.
    pub fn is_stopping(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once shutdown has begun (at once if it already has).
    pub async fn stopped(&mut self) {
        let _ = self.rx.wait_for(|s| *s).await;
    }
}

/// SIGTERM and SIGINT, caught from the moment [`Signals::catch`] returns:
/// one that arrives before anyone waits is kept for [`Signals::recv`]
/// instead of ending the process with the default action. A service
/// catches them before it says it is up, so that a supervisor stopping it
/// right after gets a clean shutdown.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Starts catching SIGTERM and SIGINT (inside a tokio runtime).
    pub fn catch() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next one and returns its name.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

/// Waits for SIGTERM or SIGINT and returns its name (caught from the first
/// poll on: see [`Signals`] to catch them earlier).
pub async fn wait_for_signal() -> std::io::Result<&'static str> {
    Ok(Signals::catch()?.recv().await)
}

/// What [`graceful_shutdown`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// The drain future finished within its time limit.
    pub drained: bool,
    /// How long draining took (or the limit, if it ran out).
    pub drain_time: Duration,
    /// `clean_shutdown` was recorded: true exactly when `drained`.
    pub clean: bool,
    /// The whole shutdown.
    pub total: Duration,
}

/// Shuts a service down in order: health DRAINING, intake stopped
/// (`intake.trigger()`), `drain` awaited for at most `drain_limit`,
/// supervised children terminated, health STOPPED, then the store closed
/// (queued writes finished, WAL checkpointed).
///
/// `clean_shutdown` is recorded only if `drain` finished: a shutdown that
/// gave up on in-flight work leaves the flag false so the next start runs
/// crash recovery rather than trusting half-finished state.
pub async fn graceful_shutdown<S: SessionStore>(
    reason: &str,
    health: &Health<S>,
    intake: &Shutdown,
    drain: impl Future<Output = ()>,
    drain_limit: Duration,
    supervisor: Option<&Supervisor>,
    store: &S,
) -> Result<ShutdownReport, StoreError> {
    let started = Instant::now();
    let _ = health.drain(reason).await;
    intake.trigger();
    let drained = tokio::time::timeout(drain_limit, drain).await.is_ok();
    let drain_time = started.elapsed();
    if let Some(supervisor) = supervisor {
        supervisor.shutdown().await;
    }
    let _ = health
        .stop(if drained {
            "shutdown complete"
        } else {
            "shutdown gave up draining; the next start will run crash recovery"
        })
        .await;
    health.flush().await;
    if drained {
        store.close().await?;
    } else {
        store.close_unclean().await?;
    }
    Ok(ShutdownReport {
        drained,
        drain_time,
        clean: drained,
        total: started.elapsed(),
    })
}

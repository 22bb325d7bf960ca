//! Crash recovery on the database: what a service does after `kill -9`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_session::{CrashNotice, SessionId, SessionStore, StoreError};

use crate::integrity::Quarantine;
use crate::supervise::ReapedGroup;

/// The `meta` key holding the run (see `StartupInfo::run`) that last ran recovery.
const RECOVERED_BY: &str = "recovery.run";

/// What startup recovery found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The database did not exist and was created (nothing to recover).
    pub new_database: bool,
    /// Whether the previous run shut down cleanly (then there is nothing to recover).
    pub previous_clean_shutdown: bool,
    /// Recovery had already run for this store instance; nothing was done again.
    pub already_recovered: bool,
    /// Sessions that were ACTIVE (connected at the crash) and are now CRASHED.
    pub crashed: Vec<SessionId>,
    /// Sessions whose stored state was unknown, with that value; now CRASHED.
    pub unknown_states: Vec<(SessionId, String)>,
    /// Crash notices appended to private channels.
    pub notices: u64,
    /// Expired outbox claims returned to PENDING.
    pub released_claims: u64,
    /// Process groups left by the previous run that were still alive and were killed.
    pub reaped_groups: Vec<ReapedGroup>,
    /// The damaged database that was moved aside, if any.
    pub quarantine: Option<Quarantine>,
    /// How long recovery took.
    pub duration: Duration,
    /// How long each step took, in order (for finding where startup time goes).
    pub steps: Vec<(&'static str, Duration)>,
}

impl RecoveryReport {
    /// Whether recovery changed anything.
    pub fn changed_anything(&self) -> bool {
        !self.crashed.is_empty()
            || !self.unknown_states.is_empty()
            || self.notices > 0
            || self.released_claims > 0
            || !self.reaped_groups.is_empty()
            || self.quarantine.is_some()
    }

    /// One line for logs and the health log.
    pub fn summary(&self) -> String {
        if self.new_database && !self.changed_anything() {
            return "new database".to_owned();
        }
        if self.previous_clean_shutdown && !self.changed_anything() {
            return "previous run shut down cleanly".to_owned();
        }
        let mut parts = vec![format!(
            "recovered after an unclean shutdown: {} sessions crashed ({} with unknown state), \
             {} notices, {} claims released, {} orphan process groups killed",
            self.crashed.len() + self.unknown_states.len(),
            self.unknown_states.len(),
            self.notices,
            self.released_claims,
            self.reaped_groups.len()
        )];
        if self.quarantine.is_some() {
            parts.push("the damaged database was quarantined".to_owned());
        }
        if self.already_recovered {
            parts.push("already recovered by this instance".to_owned());
        }
        format!("{} in {:.1?}", parts.join("; "), self.duration)
    }
}

/// The payload of the notice a crashed session finds in its private channel:
/// `{"type":"session_crashed","session_id":..,"previous_state":..,
/// "crash_count":..,"recovered_at":..,"reason":..}`.
pub fn crash_notice(reason: &str) -> CrashNotice {
    // Formatted by hand: tens of thousands are built inside one transaction,
    // and a serde_json::Value per notice cost more than the append itself.
    let reason = json_string(reason);
    Arc::new(move |c| {
        format!(
            r#"{{"type":"session_crashed","session_id":{},"previous_state":{},"crash_count":{},"recovered_at":{},"reason":{}}}"#,
            json_string(c.id.as_str()),
            json_string(&c.previous_state),
            c.crash_count,
            c.recovered_at,
            reason
        )
        .into_bytes()
    })
}

fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// Recovers the database after an unclean shutdown; does nothing after a clean one.
///
/// In one transaction, ACTIVE sessions (connected at the crash; DETACHED ones
/// were not and stay DETACHED) and sessions with an
/// unknown state become CRASHED (`recovered_at`, `crash_count + 1`) and each
/// gets a notice in its private channel ([`crash_notice`]); then expired
/// outbox claims return to PENDING. Unknown states are logged at error level
/// and do not stop startup.
///
/// Idempotent: a second call on the same store instance does nothing and
/// says so ([`RecoveryReport::already_recovered`]); a call after another
/// unclean restart finds nothing left to mark.
pub async fn recover<S: SessionStore>(store: &S) -> Result<RecoveryReport, StoreError> {
    let started = Instant::now();
    let startup = store.startup();
    let mut report = RecoveryReport {
        new_database: startup.created,
        previous_clean_shutdown: startup.previous_clean_shutdown,
        ..Default::default()
    };
    if startup.previous_clean_shutdown || startup.created {
        report.duration = started.elapsed();
        return Ok(report);
    }
    if store.meta(RECOVERED_BY).await?.as_deref() == Some(startup.run.to_string().as_str()) {
        report.already_recovered = true;
        report.duration = started.elapsed();
        return Ok(report);
    }
    let step = Instant::now();
    let marked = store
        .mark_crashed_and_notify(crash_notice(
            "the service restarted after an unclean shutdown",
        ))
        .await?;
    report
        .steps
        .push(("mark crashed and notify", step.elapsed()));
    for (id, state) in &marked.unknown {
        tracing::error!(
            target: "keel_recovery",
            session = %id,
            state = %state,
            "session had an unknown stored state; marked CRASHED"
        );
    }
    report.crashed = marked.crashed;
    report.unknown_states = marked.unknown;
    report.notices = marked.notified;
    report.released_claims = store.release_expired_claims().await?;
    store
        .set_meta(RECOVERED_BY, &startup.run.to_string())
        .await?;
    report.duration = started.elapsed();
    Ok(report)
}

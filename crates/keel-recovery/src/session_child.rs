//! Tying a supervised child to a session: its death crashes and notifies the session.

use keel_session::{Offset, SessionError, SessionId, SessionState, SessionStore};
use tokio::sync::watch;

use crate::supervise::{Exit, ExitCause, wait_exit};

/// What happened to a session when its child ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChildEnded {
    /// How the child ended.
    pub exit: Exit,
    /// The session was moved to CRASHED.
    pub crashed: bool,
    /// The notice's offset in the session's private channel.
    pub notice: Option<Offset>,
}

/// Waits for a session's child to end, then tells the session.
///
/// A child the supervisor terminated on purpose changes nothing. A child that
/// exited 0 gets a `child_exited` notice in the session's private channel. Any
/// other end (a non-zero code, a signal from outside, a timeout) moves the
/// session to CRASHED (`crash_count + 1`) and appends the notice
/// `{"type":"child_exited","session_id":..,"code":..,"signal":..,"cause":..,
/// "crash_count":..}` with message id `child-exit-<crash_count>`.
pub async fn crash_session_on_exit<S: SessionStore>(
    store: &S,
    session: &SessionId,
    exit: watch::Receiver<Option<Exit>>,
) -> Result<ChildEnded, SessionError> {
    let exit = wait_exit(exit).await;
    if exit.cause == ExitCause::Terminated {
        return Ok(ChildEnded {
            exit,
            crashed: false,
            notice: None,
        });
    }
    let crashed = !exit.success();
    let (crash_count, msg_id) = if crashed {
        let s = store.transition(session, SessionState::Crashed).await?;
        (s.crash_count, format!("child-exit-{}", s.crash_count))
    } else {
        let s = store.session(session).await?;
        (s.crash_count, format!("child-done-{}", store.now()))
    };
    let cause = match exit.cause {
        ExitCause::Exited => "exited",
        ExitCause::TimedOut => "timed_out",
        ExitCause::Terminated => "terminated",
    };
    let payload = serde_json::json!({
        "type": "child_exited",
        "session_id": session.as_str(),
        "code": exit.code,
        "signal": exit.signal,
        "cause": cause,
        "crash_count": crash_count,
    });
    let appended = store
        .append_scoped(
            keel_session::SYSTEM_SCOPE,
            &session.private_channel(),
            &msg_id,
            payload.to_string().as_bytes(),
        )
        .await?;
    Ok(ChildEnded {
        exit,
        crashed,
        notice: Some(appended.offset),
    })
}

//! Supervised exec sessions: a session may run one child from the config's
//! allow-list. What the session's owner publishes to its private channel goes
//! to the child's stdin, one JSON payload per line; the child's output lines
//! are published to the same channel; its death marks the session CRASHED and
//! notifies it (keel-recovery's `crash_session_on_exit`).
//!
//! A child gets a cleared environment with only `exec.pass_env` from the
//! relay's, each stdin record is its payload re-serialised on one line (no
//! payload can inject a second record), at most `exec.max_children` run at
//! once, and a child whose session has had no connection for
//! `exec.detach_grace_ms` is terminated.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_recovery::{CommandSpec, Stream, Supervisor, crash_session_on_exit};
use keel_session::SessionId;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, mpsc};

use crate::channels::Channels;
use crate::config::Exec;
use crate::protocol::json_str;

/// A running child: where to write its stdin, how to end it, and whether
/// its session has a connection (`attached` counts binds, so that a
/// detach timer knows whether the session came back meanwhile).
struct Running {
    stdin: mpsc::Sender<Vec<u8>>,
    stop: Arc<Notify>,
    attached: u64,
    detached: bool,
}

/// Running children by session.
#[derive(Default)]
pub(crate) struct Execs {
    running: Mutex<HashMap<SessionId, Running>>,
}

impl Execs {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<SessionId, Running>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stdin of `session`'s child, if it has one running.
    pub(crate) fn stdin(&self, session: &SessionId) -> Option<mpsc::Sender<Vec<u8>>> {
        self.map().get(session).map(|r| r.stdin.clone())
    }

    /// Registers `session`'s new child, unless it runs one or `max` run.
    fn insert(
        &self,
        session: &SessionId,
        stdin: mpsc::Sender<Vec<u8>>,
        stop: Arc<Notify>,
        max: usize,
    ) -> Result<(), ExecRefused> {
        let mut map = self.map();
        if map.get(session).is_some_and(|r| !r.stdin.is_closed()) {
            return Err(ExecRefused::AlreadyRunning);
        }
        if map.len() >= max && !map.contains_key(session) {
            return Err(ExecRefused::TooMany(max));
        }
        map.insert(
            session.clone(),
            Running {
                stdin,
                stop,
                attached: 0,
                detached: false,
            },
        );
        Ok(())
    }

    fn remove(&self, session: &SessionId) {
        self.map().remove(session);
    }

    /// `session` has a connection again: its child stays.
    pub(crate) fn attached(&self, session: &SessionId) {
        if let Some(r) = self.map().get_mut(session) {
            r.attached += 1;
            r.detached = false;
        }
    }

    /// `session` lost its connection: unless it is back within `grace`, its
    /// child is terminated.
    pub(crate) fn detached(self: &Arc<Self>, session: &SessionId, grace: Duration) {
        let seen = {
            let mut map = self.map();
            let Some(r) = map.get_mut(session) else {
                return;
            };
            r.detached = true;
            r.attached
        };
        let (execs, session) = (self.clone(), session.clone());
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            let map = execs.map();
            if let Some(r) = map.get(&session)
                && r.detached
                && r.attached == seen
            {
                r.stop.notify_one();
            }
        });
    }
}

/// Why an exec request was refused.
pub(crate) enum ExecRefused {
    Disabled,
    NotAllowed,
    AlreadyRunning,
    /// As many children as allowed run already.
    TooMany(usize),
    Failed(String),
}

/// What starting an exec session uses.
pub(crate) struct ExecCtx<'a> {
    pub(crate) config: &'a Exec,
    pub(crate) execs: &'a Arc<Execs>,
    pub(crate) supervisor: &'a Supervisor,
    pub(crate) channels: &'a Channels,
}

/// Starts the allowed command `name` for `session`.
pub(crate) async fn start(
    ctx: &ExecCtx<'_>,
    session: &SessionId,
    name: &str,
) -> Result<u32, ExecRefused> {
    let exec = ctx.config;
    if !exec.enabled {
        return Err(ExecRefused::Disabled);
    }
    let Some(allowed) = exec.allow.iter().find(|c| c.name == name) else {
        return Err(ExecRefused::NotAllowed);
    };
    let (stdin_tx, mut stdin_rx) = mpsc::channel::<Vec<u8>>(256);
    let stop = Arc::new(Notify::new());
    ctx.execs
        .insert(session, stdin_tx, stop.clone(), exec.max_children)?;
    let mut spec = CommandSpec::new(
        allowed.program.as_str(),
        allowed.args.iter().map(String::as_str),
    );
    spec.timeout = allowed.timeout_ms.map(Duration::from_millis);
    spec.clear_env = true;
    spec.env = exec
        .pass_env
        .iter()
        .filter_map(|k| Some((k.into(), std::env::var_os(k)?)))
        .collect();
    let mut child = match ctx.supervisor.spawn(spec).await {
        Ok(c) => c,
        Err(e) => {
            ctx.execs.remove(session);
            return Err(ExecRefused::Failed(e.to_string()));
        }
    };
    let pid = child.pid();
    let channel = session.private_channel();
    ctx.channels
        .publish_internal(
            &channel,
            &format!("exec-started-{pid}-{}", child.start_time()),
            format!(
                r#"{{"type":"exec_started","command":{},"pid":{pid}}}"#,
                json_str(name)
            )
            .as_bytes(),
        )
        .await;

    // stdin: what the owner publishes to its private channel.
    if let Some(mut stdin) = child.take_stdin() {
        tokio::spawn(async move {
            while let Some(payload) = stdin_rx.recv().await {
                let Some(mut line) = one_line(&payload) else {
                    continue;
                };
                line.push(b'\n');
                if stdin.write_all(&line).await.is_err() || stdin.flush().await.is_err() {
                    return;
                }
            }
        });
    }
    // Death: CRASHED and a notice, delivered live too.
    let exit = child.exit_watch();
    {
        let (channels, execs, session) = (ctx.channels.clone(), ctx.execs.clone(), session.clone());
        tokio::spawn(async move {
            let ended = crash_session_on_exit(&channels.store, &session, exit).await;
            execs.remove(&session);
            if let Ok(ended) = ended
                && let Some(offset) = ended.notice
            {
                channels.announce(&session.private_channel(), offset).await;
            }
        });
    }
    // Output lines: published to the private channel.
    {
        let channels = ctx.channels.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            let tag = child.start_time();
            let mut stopping = false;
            loop {
                let line = tokio::select! {
                    line = child.next_line() => line,
                    _ = stop.notified(), if !stopping => {
                        // Its session is gone: TERM, then KILL; its last
                        // lines and its exit still come through.
                        stopping = true;
                        let _ = child.terminate().await;
                        continue;
                    }
                };
                let Some(line) = line else { break };
                n += 1;
                let stream = match line.stream {
                    Stream::Stdout => "stdout",
                    Stream::Stderr => "stderr",
                };
                let payload = format!(
                    r#"{{"type":"exec_output","stream":"{stream}","line":{},"truncated":{}}}"#,
                    json_str(&line.text),
                    line.truncated
                );
                channels
                    .publish_internal(
                        &channel,
                        &format!("exec-{pid}-{tag}-{n}"),
                        payload.as_bytes(),
                    )
                    .await;
            }
            // Keep the handle until output ends: dropping it terminates the child.
            let _ = child.wait().await;
        });
    }
    Ok(pid)
}

/// A payload as one stdin record: its JSON re-serialised compactly, so a
/// newline inside it is escaped and one payload is always one line.
fn one_line(payload: &[u8]) -> Option<Vec<u8>> {
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    serde_json::to_vec(&value).ok()
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn a_payload_is_one_line() {
        let pretty = b"{\n  \"a\": \"x\\ny\",\n  \"b\": [1,\n 2]\n}";
        let line = one_line(pretty).unwrap();
        assert_eq!(line, br#"{"a":"x\ny","b":[1,2]}"#.to_vec());
        assert!(!line.contains(&b'\n'));
    }
}

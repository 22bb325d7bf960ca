//! Supervised exec sessions: a session may run one child from the config's
//! allow-list. What the session's owner publishes to its private channel goes
//! to the child's stdin, one JSON payload per line; the child's output lines
//! are published to the same channel; its death marks the session CRASHED and
//! notifies it (keel-recovery's `crash_session_on_exit`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_recovery::{CommandSpec, Stream, Supervisor, crash_session_on_exit};
use keel_session::SessionId;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::channels::Channels;
use crate::config::Exec;
use crate::protocol::json_str;

/// Running children by session: where to write their stdin.
#[derive(Default)]
pub(crate) struct Execs {
    stdin: Mutex<HashMap<SessionId, mpsc::Sender<Vec<u8>>>>,
}

impl Execs {
    /// The stdin of `session`'s child, if it has one running.
    pub(crate) fn stdin(&self, session: &SessionId) -> Option<mpsc::Sender<Vec<u8>>> {
        self.stdin
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(session)
            .cloned()
    }

    fn insert(&self, session: &SessionId, tx: mpsc::Sender<Vec<u8>>) -> bool {
        let mut map = self.stdin.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(session).is_some_and(|t| !t.is_closed()) {
            return false;
        }
        map.insert(session.clone(), tx);
        true
    }

    fn remove(&self, session: &SessionId) {
        self.stdin
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(session);
    }
}

/// Why an exec request was refused.
pub(crate) enum ExecRefused {
    Disabled,
    NotAllowed,
    AlreadyRunning,
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
    if !ctx.execs.insert(session, stdin_tx) {
        return Err(ExecRefused::AlreadyRunning);
    }
    let mut spec = CommandSpec::new(
        allowed.program.as_str(),
        allowed.args.iter().map(String::as_str),
    );
    spec.timeout = allowed.timeout_ms.map(Duration::from_millis);
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
            while let Some(mut line) = stdin_rx.recv().await {
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
            while let Some(line) = child.next_line().await {
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

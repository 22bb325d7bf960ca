//! Supervised child processes: own process group, line streams, timeouts,
//! group-wide termination, and no orphans even after `kill -9` of the supervisor.

use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::{ChildStdin, Command};
use tokio::sync::{mpsc, oneshot, watch};

use crate::procfs;

/// How a [`Supervisor`] runs children.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// A program that sets the parent-death signal and then execs the real
    /// command (see [`exec_helper_main`]): the `keel-exec` binary of this
    /// crate, or a multicall binary with [`SupervisorConfig::exec_helper_args`].
    /// Without it, a child outlives a `kill -9` of the supervisor until the
    /// next start's [`reap_orphans`].
    pub exec_helper: Option<PathBuf>,
    /// Arguments put before the helper's own (for a multicall binary, e.g.
    /// `["__exec"]`).
    pub exec_helper_args: Vec<OsString>,
    /// A directory recording each live process group, for [`reap_orphans`].
    pub registry: Option<PathBuf>,
    /// How long a terminated group gets between SIGTERM and SIGKILL. Default 2 s.
    pub grace: Duration,
    /// Longer output lines are cut here and marked [`Line::truncated`]. Default 64 KiB.
    pub max_line: usize,
    /// Lines buffered before the child is made to wait for its reader. Default 1,024.
    pub line_buffer: usize,
}

impl Default for SupervisorConfig {
    fn default() -> Self {
        SupervisorConfig {
            exec_helper: None,
            exec_helper_args: Vec::new(),
            registry: None,
            grace: Duration::from_secs(2),
            max_line: 64 * 1024,
            line_buffer: 1024,
        }
    }
}

/// A command to supervise.
#[derive(Debug, Clone, Default)]
pub struct CommandSpec {
    /// The program (looked up in `PATH` if it has no slash).
    pub program: OsString,
    /// Its arguments.
    pub args: Vec<OsString>,
    /// Extra environment variables.
    pub env: Vec<(OsString, OsString)>,
    /// Start from an empty environment (then only [`CommandSpec::env`]):
    /// the child inherits none of the supervisor's variables.
    pub clear_env: bool,
    /// Its working directory (default: the supervisor's).
    pub cwd: Option<PathBuf>,
    /// Terminate the group (TERM, then KILL after the grace period) if it
    /// runs longer than this.
    pub timeout: Option<Duration>,
}

impl CommandSpec {
    /// `program` with `args`.
    pub fn new<S: Into<OsString>>(program: S, args: impl IntoIterator<Item = S>) -> Self {
        CommandSpec {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }

    /// Sets [`CommandSpec::timeout`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// One line of a child's output, without its line ending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Where it came from.
    pub stream: Stream,
    /// The text (invalid UTF-8 replaced).
    pub text: String,
    /// The line was longer than [`SupervisorConfig::max_line`] and was cut.
    pub truncated: bool,
}

/// Why a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCause {
    /// It exited, or something outside the supervisor killed it.
    Exited,
    /// Its [`CommandSpec::timeout`] passed and the supervisor terminated it.
    TimedOut,
    /// The supervisor terminated it ([`Child::terminate`], [`Child::kill`],
    /// [`Supervisor::shutdown`], or its handle was dropped).
    Terminated,
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// The exit code, if it exited.
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// Why.
    pub cause: ExitCause,
    /// How long it ran.
    pub ran: Duration,
}

impl Exit {
    /// Exited with code 0 on its own.
    pub fn success(&self) -> bool {
        self.cause == ExitCause::Exited && self.code == Some(0)
    }
}

/// Why a child could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The program could not be started.
    #[error("cannot start {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The supervisor's spawner thread is gone.
    #[error("the supervisor is shut down")]
    Closed,
}

enum Control {
    Terminate,
    Kill,
}

struct Live {
    /// Weak, so that dropping the [`Child`] closes the channel.
    control: mpsc::WeakUnboundedSender<Control>,
    exit: watch::Receiver<Option<Exit>>,
}

struct SpawnJob {
    command: Command,
    runtime: tokio::runtime::Handle,
    reply: oneshot::Sender<std::io::Result<tokio::process::Child>>,
}

struct Inner {
    config: SupervisorConfig,
    spawner: Mutex<std::sync::mpsc::Sender<SpawnJob>>,
    live: Mutex<HashMap<u32, Live>>,
}

/// Runs child processes so that none outlives the service.
///
/// Each child is the leader of its own process group, so TERM and KILL reach
/// everything it started. Children are forked from one long-lived thread:
/// Linux sends the parent-death signal when the forking *thread* exits, so a
/// short-lived runtime thread must never be the parent.
#[derive(Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("config", &self.inner.config)
            .field("live", &self.live_groups())
            .finish()
    }
}

impl Supervisor {
    /// Starts the spawner thread. Creates the registry directory if configured.
    pub fn new(config: SupervisorConfig) -> std::io::Result<Supervisor> {
        if let Some(dir) = &config.registry {
            std::fs::create_dir_all(dir)?;
        }
        let (tx, rx) = std::sync::mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("keel-spawner".into())
            .spawn(move || {
                // Lives as long as the process: a child's parent-death signal
                // fires when this thread exits.
                while let Ok(job) = rx.recv() {
                    let _entered = job.runtime.enter();
                    let mut command = job.command;
                    let _ = job.reply.send(command.spawn());
                }
                loop {
                    std::thread::park();
                }
            })?;
        Ok(Supervisor {
            inner: Arc::new(Inner {
                config,
                spawner: Mutex::new(tx),
                live: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// The process groups of the children still running.
    pub fn live_groups(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .inner
            .live
            .lock()
            .map(|l| l.keys().copied().collect())
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    /// Starts `spec` in a new process group with piped stdin, stdout and stderr.
    pub async fn spawn(&self, spec: CommandSpec) -> Result<Child, SpawnError> {
        let cfg = &self.inner.config;
        let mut command = match &cfg.exec_helper {
            Some(helper) => {
                let mut c = Command::new(helper);
                c.args(&cfg.exec_helper_args)
                    .arg(std::process::id().to_string())
                    .arg(&spec.program);
                c
            }
            None => Command::new(&spec.program),
        };
        if spec.clear_env {
            command.env_clear();
        }
        command
            .args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        if let Some(cwd) = &spec.cwd {
            command.current_dir(cwd);
        }
        let (reply, rx) = oneshot::channel();
        self.inner
            .spawner
            .lock()
            .map_err(|_| SpawnError::Closed)?
            .send(SpawnJob {
                command,
                runtime: tokio::runtime::Handle::current(),
                reply,
            })
            .map_err(|_| SpawnError::Closed)?;
        let mut child = rx
            .await
            .map_err(|_| SpawnError::Closed)?
            .map_err(|source| SpawnError::Spawn {
                program: spec.program.to_string_lossy().into_owned(),
                source,
            })?;
        let started = Instant::now();
        let pid = child.id().unwrap_or(0);
        let start_time = procfs::start_time(pid).unwrap_or(0);
        // The record is written and fsynced (twice) on a blocking thread,
        // never on a runtime worker.
        let record = match cfg.registry.clone() {
            Some(dir) => {
                let program = spec.program.clone();
                tokio::task::spawn_blocking(move || register(&dir, pid, start_time, &program).ok())
                    .await
                    .ok()
                    .flatten()
            }
            None => None,
        };

        let (line_tx, lines) = mpsc::channel(cfg.line_buffer.max(1));
        if let Some(out) = child.stdout.take() {
            tokio::spawn(read_lines(
                out,
                Stream::Stdout,
                line_tx.clone(),
                cfg.max_line,
            ));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(read_lines(err, Stream::Stderr, line_tx, cfg.max_line));
        }
        let stdin = child.stdin.take();
        let (control, control_rx) = mpsc::unbounded_channel();
        let (exit_tx, exit) = watch::channel(None);
        if let Ok(mut live) = self.inner.live.lock() {
            live.insert(
                pid,
                Live {
                    control: control.downgrade(),
                    exit: exit.clone(),
                },
            );
        }
        tokio::spawn(monitor(Monitor {
            child,
            pgid: pid,
            timeout: spec.timeout,
            grace: cfg.grace,
            control: control_rx,
            exit: exit_tx,
            record,
            started,
            supervisor: Arc::downgrade(&self.inner),
        }));
        Ok(Child {
            pid,
            start_time,
            stdin,
            lines,
            exit,
            control,
        })
    }

    /// Terminates every live child's group (TERM, then KILL after the grace
    /// period) and waits until all have exited.
    pub async fn shutdown(&self) {
        let live: Vec<(
            mpsc::UnboundedSender<Control>,
            watch::Receiver<Option<Exit>>,
        )> = self
            .inner
            .live
            .lock()
            .map(|l| {
                l.values()
                    .filter_map(|c| Some((c.control.upgrade()?, c.exit.clone())))
                    .collect()
            })
            .unwrap_or_default();
        for (control, _) in &live {
            let _ = control.send(Control::Terminate);
        }
        for (_, mut exit) in live {
            let _ = exit.wait_for(Option::is_some).await;
        }
    }
}

/// A running (or finished) supervised child.
///
/// Dropping the handle terminates the child's group, as
/// [`Child::terminate`] does.
#[derive(Debug)]
pub struct Child {
    pid: u32,
    start_time: u64,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<Line>,
    exit: watch::Receiver<Option<Exit>>,
    control: mpsc::UnboundedSender<Control>,
}

impl Child {
    /// The child's pid, which is also its process group id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its start time in clock ticks after boot (see [`procfs::ProcStat`]).
    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// Its standard input, until taken.
    pub fn stdin(&mut self) -> Option<&mut ChildStdin> {
        self.stdin.as_mut()
    }

    /// Takes its standard input (to write from another task, or to close it).
    pub fn take_stdin(&mut self) -> Option<ChildStdin> {
        self.stdin.take()
    }

    /// Writes `line` and a newline to its standard input and flushes.
    pub async fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "stdin closed"))?;
        stdin.write_all(line.as_bytes()).await?;
        stdin.write_all(b"\n").await?;
        stdin.flush().await
    }

    /// The next line from stdout or stderr; `None` once both are closed.
    pub async fn next_line(&mut self) -> Option<Line> {
        self.lines.recv().await
    }

    /// A receiver that holds the exit once the child has ended; it can be
    /// awaited from another task while this handle reads lines.
    pub fn exit_watch(&self) -> watch::Receiver<Option<Exit>> {
        self.exit.clone()
    }

    /// The exit, if the child has ended.
    pub fn try_exit(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Waits for the child to end. Detection is immediate (SIGCHLD), not polled.
    pub async fn wait(&self) -> Exit {
        wait_exit(self.exit.clone()).await
    }

    /// Terminates the group (TERM, then KILL after the grace period) and
    /// waits for the exit.
    pub async fn terminate(&self) -> Exit {
        let _ = self.control.send(Control::Terminate);
        self.wait().await
    }

    /// SIGKILLs the group and waits for the exit.
    pub async fn kill(&self) -> Exit {
        let _ = self.control.send(Control::Kill);
        self.wait().await
    }
}

/// Waits until `exit` holds the child's exit.
pub async fn wait_exit(mut exit: watch::Receiver<Option<Exit>>) -> Exit {
    if let Ok(e) = exit.wait_for(Option::is_some).await
        && let Some(e) = *e
    {
        return e;
    }
    // The monitor always sends before it ends; reaching here means the
    // runtime is shutting down under us.
    Exit {
        code: None,
        signal: None,
        cause: ExitCause::Terminated,
        ran: Duration::ZERO,
    }
}

struct Monitor {
    child: tokio::process::Child,
    pgid: u32,
    timeout: Option<Duration>,
    grace: Duration,
    control: mpsc::UnboundedReceiver<Control>,
    exit: watch::Sender<Option<Exit>>,
    record: Option<PathBuf>,
    started: Instant,
    supervisor: Weak<Inner>,
}

async fn monitor(mut m: Monitor) {
    let deadline = m
        .timeout
        .map(|t| tokio::time::Instant::from_std(m.started + t));
    let mut cause = ExitCause::Exited;
    let status = loop {
        tokio::select! {
            status = m.child.wait() => break status,
            _ = sleep_until(deadline), if deadline.is_some() && cause == ExitCause::Exited => {
                cause = ExitCause::TimedOut;
                break terminate_group(&mut m.child, m.pgid, m.grace).await;
            }
            control = m.control.recv() => match control {
                Some(Control::Kill) => {
                    cause = ExitCause::Terminated;
                    signal_group(m.pgid, Signal::SIGKILL);
                }
                Some(Control::Terminate) | None => {
                    cause = ExitCause::Terminated;
                    break terminate_group(&mut m.child, m.pgid, m.grace).await;
                }
            },
        }
    };
    // The leader is gone; whatever it left in its group goes with it.
    signal_group(m.pgid, Signal::SIGKILL);
    if let Some(record) = m.record.take() {
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_file(record)).await;
    }
    if let Some(sup) = m.supervisor.upgrade()
        && let Ok(mut live) = sup.live.lock()
    {
        live.remove(&m.pgid);
    }
    let status = status.ok();
    use std::os::unix::process::ExitStatusExt;
    let _ = m.exit.send(Some(Exit {
        code: status.and_then(|s| s.code()),
        signal: status.and_then(|s| s.signal()),
        cause,
        ran: m.started.elapsed(),
    }));
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

async fn terminate_group(
    child: &mut tokio::process::Child,
    pgid: u32,
    grace: Duration,
) -> std::io::Result<std::process::ExitStatus> {
    signal_group(pgid, Signal::SIGTERM);
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            signal_group(pgid, Signal::SIGKILL);
            child.wait().await
        }
    }
}

fn signal_group(pgid: u32, signal: Signal) {
    if pgid > 1 {
        let _ = killpg(Pid::from_raw(pgid as i32), signal);
    }
}

async fn read_lines<R: AsyncRead + Unpin>(
    reader: R,
    stream: Stream,
    tx: mpsc::Sender<Line>,
    max: usize,
) {
    let mut reader = BufReader::new(reader);
    let mut buf: Vec<u8> = Vec::new();
    let mut truncated = false;
    let mut listening = true;
    while let Ok(available) = reader.fill_buf().await {
        let eof = available.is_empty();
        let (take, newline) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        let content = &available[..take - usize::from(newline)];
        let room = max.saturating_sub(buf.len());
        if content.len() > room {
            truncated = true;
        }
        buf.extend_from_slice(&content[..content.len().min(room)]);
        reader.consume(take);
        if newline || (eof && !buf.is_empty()) {
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            let line = Line {
                stream,
                text: String::from_utf8_lossy(&buf).into_owned(),
                truncated,
            };
            buf.clear();
            truncated = false;
            // A reader that went away must not stall the child: keep draining.
            if listening && tx.send(line).await.is_err() {
                listening = false;
            }
        }
        if eof {
            break;
        }
    }
}

fn register(
    dir: &Path,
    pgid: u32,
    start_time: u64,
    program: &std::ffi::OsStr,
) -> std::io::Result<PathBuf> {
    let path = dir.join(format!("{pgid}-{start_time}.pgroup"));
    let body = serde_json::json!({
        "pgid": pgid,
        "start_time": start_time,
        "supervisor_pid": std::process::id(),
        "program": program.to_string_lossy(),
    });
    let tmp = dir.join(format!(".{pgid}-{start_time}.tmp"));
    std::fs::write(&tmp, body.to_string())?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(path)
}

/// A process group from a previous run that was still alive and was killed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReapedGroup {
    /// The group id.
    pub pgid: u32,
    /// The program its leader ran.
    pub program: String,
    /// How many living members were found.
    pub members: usize,
}

/// Kills the process groups that a previous run recorded in `registry` and
/// that are still alive, and clears the registry.
///
/// A group counts as the previous run's when its leader is alive with the
/// recorded start time, or when the leader is gone and members remain that
/// started no earlier than it. A leader pid that now belongs to a process with
/// another start time means the pid was reused: the kernel never reuses a pid
/// while a group of that id exists, so the old group is gone and nothing is
/// killed.
pub fn reap_orphans(registry: &Path) -> std::io::Result<Vec<ReapedGroup>> {
    let mut reaped = Vec::new();
    let entries = match std::fs::read_dir(registry) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(reaped),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        let Some((pgid, start_time)) = name
            .strip_suffix(".pgroup")
            .and_then(|s| s.split_once('-'))
            .and_then(|(p, t)| Some((p.parse::<u32>().ok()?, t.parse::<u64>().ok()?)))
        else {
            continue;
        };
        let program = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["program"].as_str().map(str::to_owned))
            .unwrap_or_default();
        let ours = match procfs::stat(pgid) {
            Some(leader) if leader.state != 'Z' => leader.start_time == start_time,
            _ => true,
        };
        let members: Vec<_> = if ours {
            procfs::group_members(pgid)
                .into_iter()
                .filter(|m| m.start_time >= start_time)
                .collect()
        } else {
            Vec::new()
        };
        if !members.is_empty() {
            signal_group(pgid, Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(2);
            while !procfs::group_members(pgid).is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            tracing::warn!(target: "keel_recovery", pgid, program = %program, members = members.len(), "killed a process group left by the previous run");
            reaped.push(ReapedGroup {
                pgid,
                program,
                members: members.len(),
            });
        }
        std::fs::remove_file(&path)?;
    }
    Ok(reaped)
}

/// The body of an exec helper: `HELPER PARENT_PID PROGRAM [ARGS...]`.
///
/// Asks the kernel to SIGKILL this process when its parent dies, checks the
/// parent is still `PARENT_PID` (it may have died before the request), then
/// replaces itself with `PROGRAM`. The pid, process group and pipes carry
/// over, and so does the parent-death signal. Returns only on failure, with
/// the exit code to use: 125 for bad arguments or a dead parent, 127 when
/// `PROGRAM` cannot be run.
pub fn exec_helper_main(args: impl IntoIterator<Item = OsString>) -> i32 {
    let mut args = args.into_iter();
    let parent: Option<i32> = args
        .next()
        .and_then(|p| p.to_str().and_then(|p| p.parse().ok()));
    let Some(parent) = parent else {
        eprintln!("keel-exec: usage: keel-exec PARENT_PID PROGRAM [ARGS...]");
        return 125;
    };
    let argv: Vec<CString> = args
        .filter_map(|a| CString::new(a.as_bytes()).ok())
        .collect();
    let Some(program) = argv.first() else {
        eprintln!("keel-exec: no program given");
        return 125;
    };
    if let Err(e) = nix::sys::prctl::set_pdeathsig(Signal::SIGKILL) {
        eprintln!("keel-exec: cannot set the parent-death signal: {e}");
        return 125;
    }
    if nix::unistd::getppid().as_raw() != parent {
        // The supervisor died before the signal was armed.
        return 125;
    }
    let err = nix::unistd::execvp(program, &argv).err();
    eprintln!(
        "keel-exec: cannot run {}: {}",
        program.to_string_lossy(),
        err.map_or_else(|| "unknown error".to_owned(), |e| e.to_string())
    );
    127
}

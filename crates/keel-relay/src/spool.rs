//! A spool directory of job files, each handled exactly once.
//!
//! `DIR/<name>.job.json` is claimed by renaming it to `<name>.claimed`
//! (atomic: only one taker), handled, answered with `<name>.result.json`
//! (written to a temporary file and renamed), then the claim is removed.
//! Claims found at startup were left by a crash and are re-queued; handling is
//! idempotent by job id (publish: message id `spool-<job id>`; send: the job id
//! is the idempotency key), so re-running a job changes nothing. A job file
//! that cannot be parsed is moved to `DIR/failed/` with a `.reason.txt`.
//!
//! Whoever can write to the spool is not trusted with more than a job: a
//! job file is opened without following symlinks and without blocking
//! (`O_NOFOLLOW | O_NONBLOCK`) and must be a regular file no larger than
//! `limits.max_frame_bytes`, its payload within `limits.max_payload_bytes`;
//! the relay's own files (result temporaries, reasons) are created afresh
//! (`O_EXCL`, after removing whatever had the name), so a planted symlink
//! is never written through; all file I/O runs on blocking threads, never
//! on the runtime's workers. A spool directory other users may write to is
//! warned about at start.
//!
//! Jobs:
//! ```text
//! {"job_id":"j1","type":"publish","channel":"room:1","payload":{...}}
//! {"job_id":"j2","type":"send","to":"alice","body":{...}}
//! ```

use keel_session::SessionStore;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use keel_session::NewSend;

use crate::channels::BackgroundCtx;
use crate::protocol::{self, json_str};

const JOB: &str = ".job.json";
const CLAIMED: &str = ".claimed";
const RESULT: &str = ".result.json";
/// Jobs handled at once.
const CONCURRENCY: usize = 16;

enum Job {
    Publish {
        job_id: Option<String>,
        channel: String,
        payload: String,
    },
    Send {
        job_id: Option<String>,
        to: String,
        body: String,
    },
}

/// Parses a job file (an object with a `type`; see the module docs).
fn parse_job(bytes: &[u8]) -> Result<Job, String> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("not a valid job: {e}"))?;
    let field = |name: &str| -> Result<String, String> {
        v.get(name)
            .and_then(|f| f.as_str())
            .map(str::to_owned)
            .ok_or_else(|| format!("not a valid job: missing string field {name:?}"))
    };
    let job_id = v.get("job_id").and_then(|j| j.as_str()).map(str::to_owned);
    let raw = |name: &str| -> Result<String, String> {
        v.get(name)
            .map(|p| p.to_string())
            .ok_or_else(|| format!("not a valid job: missing field {name:?}"))
    };
    match v.get("type").and_then(|t| t.as_str()) {
        Some("publish") => Ok(Job::Publish {
            job_id,
            channel: field("channel")?,
            payload: raw("payload")?,
        }),
        Some("send") => Ok(Job::Send {
            job_id,
            to: field("to")?,
            body: raw("body")?,
        }),
        other => Err(format!("not a valid job: unknown type {other:?}")),
    }
}

/// Re-queues claims a crashed run left behind: `*.claimed` back to `*.job.json`.
/// Returns how many.
pub fn requeue_stale(dir: &Path) -> std::io::Result<usize> {
    let mut n = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(stem) = name.strip_suffix(CLAIMED) {
            std::fs::rename(&path, dir.join(format!("{stem}{JOB}")))?;
            n += 1;
        }
    }
    Ok(n)
}

/// Runs `f` on a blocking thread (file I/O never runs on the runtime's
/// workers: a slow disk or a device file must not stall connections).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(f).await {
        Ok(t) => t,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

/// Runs until shutdown begins.
pub(crate) async fn run(ctx: Arc<BackgroundCtx>, dir: PathBuf) {
    let setup = dir.clone();
    let prepared = blocking(move || {
        std::fs::create_dir_all(setup.join("failed"))?;
        let loose = {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(&setup)?.permissions().mode() & 0o002 != 0
        };
        Ok::<_, std::io::Error>((loose, requeue_stale(&setup)))
    })
    .await;
    match prepared {
        Err(e) => {
            tracing::error!(dir = %dir.display(), error = %e, "cannot use the spool directory");
            return;
        }
        Ok((loose, requeued)) => {
            if loose {
                tracing::warn!(dir = %dir.display(), "the spool directory is writable by every user: anyone on this machine can submit jobs");
            }
            match requeued {
                Ok(0) => {}
                Ok(n) => tracing::warn!(n, "re-queued spool claims left by an earlier run"),
                Err(e) => tracing::error!(error = %e, "cannot re-queue stale spool claims"),
            }
        }
    }
    let mut stop = ctx.intake.clone();
    let wake = Arc::new(tokio::sync::Notify::new());
    let watching = watch(&dir, wake.clone());
    let dir = Arc::new(dir);
    while !stop.is_stopping() {
        let listing = dir.clone();
        let jobs = blocking(move || list_jobs(&listing))
            .await
            .unwrap_or_default();
        let found = jobs.len();
        // Up to CONCURRENCY jobs at a time: each result is fsynced, and
        // one after another those syncs would add up across a burst.
        let mut running = tokio::task::JoinSet::new();
        for stem in jobs {
            if stop.is_stopping() {
                break;
            }
            if running.len() >= CONCURRENCY {
                let _ = running.join_next().await;
            }
            let (ctx, dir) = (ctx.clone(), dir.clone());
            running.spawn(async move { handle(&ctx, &dir, &stem).await });
        }
        while running.join_next().await.is_some() {}
        if found == 0 {
            // Event-driven: inotify wakes the loop as a job arrives; the
            // timer is a fallback (and the only clock without inotify).
            let fallback = if watching.is_some() {
                IDLE_POLL
            } else {
                Duration::from_millis(50)
            };
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(fallback) => {}
                _ = stop.stopped() => {}
            }
        }
    }
    if let Some(w) = watching {
        w.store(true, std::sync::atomic::Ordering::Release);
    }
}

/// How often the spool is listed without an inotify event.
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Watches `dir` with inotify on a thread of its own (files renamed in or
/// written there wake `wake`); returns the flag that stops it, or `None`
/// when inotify is unavailable (the loop then polls every 50 ms).
fn watch(dir: &Path, wake: Arc<tokio::sync::Notify>) -> Option<Arc<std::sync::atomic::AtomicBool>> {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
    use std::os::fd::AsFd;
    let inotify = match Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC) {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(error = %e, "inotify unavailable: the spool is polled every 50 ms");
            return None;
        }
    };
    if let Err(e) = inotify.add_watch(
        dir,
        AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CLOSE_WRITE,
    ) {
        tracing::warn!(error = %e, "cannot watch the spool directory: it is polled every 50 ms");
        return None;
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let spawned = std::thread::Builder::new()
        .name("keel-spool-watch".into())
        .spawn(move || {
            while !stopped.load(std::sync::atomic::Ordering::Acquire) {
                let mut fds = [nix::poll::PollFd::new(
                    inotify.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                match nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(500u16)) {
                    Ok(0) => continue,
                    Ok(_) => {
                        // Drain; what changed does not matter, only that something did.
                        while let Ok(events) = inotify.read_events() {
                            if events.is_empty() {
                                break;
                            }
                        }
                        wake.notify_one();
                    }
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(_) => return,
                }
            }
        });
    spawned.ok().map(|_| stop)
}

fn list_jobs(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut stems: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix(JOB).map(str::to_owned)
        })
        .collect();
    stems.sort();
    Ok(stems)
}

/// Reads a claimed job file: a regular file (not followed through a
/// symlink, not a FIFO or device, opened without blocking) of at most `cap`
/// bytes.
fn read_job(path: &Path, cap: usize) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(open_flags::NOFOLLOW | open_flags::NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot open (symlinks are not followed): {e}"))?;
    let meta = file.metadata().map_err(|e| format!("cannot stat: {e}"))?;
    if !meta.file_type().is_file() {
        return Err("not a regular file".to_owned());
    }
    if meta.len() > cap as u64 {
        return Err(format!(
            "too large: {} bytes, the limit is {cap}",
            meta.len()
        ));
    }
    let mut text = Vec::with_capacity(meta.len() as usize);
    file.take(cap as u64 + 1)
        .read_to_end(&mut text)
        .map_err(|e| format!("cannot read: {e}"))?;
    if text.len() > cap {
        return Err(format!("too large: over {cap} bytes"));
    }
    Ok(text)
}

/// Open flags, from nix (which the relay uses already).
mod open_flags {
    use nix::fcntl::OFlag;
    pub(super) const NOFOLLOW: i32 = OFlag::O_NOFOLLOW.bits();
    pub(super) const NONBLOCK: i32 = OFlag::O_NONBLOCK.bits();
}

/// Writes `bytes` to a new file at `path`: whatever had the name (a
/// planted symlink, a leftover) is removed first, and the file is created
/// exclusively, so nothing is ever written through a link.
fn write_new(path: &Path, bytes: &[u8], sync: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(open_flags::NOFOLLOW)
        .mode(0o644)
        .open(path)?;
    file.write_all(bytes)?;
    if sync {
        file.sync_all()?;
    }
    Ok(())
}

async fn handle(ctx: &BackgroundCtx, dir: &Path, stem: &str) {
    let job_path = dir.join(format!("{stem}{JOB}"));
    let claimed = dir.join(format!("{stem}{CLAIMED}"));
    let started = std::time::Instant::now();
    let cap = ctx.config.limits.max_frame_bytes;
    // The claim: whoever renames first owns the job.
    let (from, to) = (job_path.clone(), claimed.clone());
    let read = blocking(move || {
        std::fs::rename(&from, &to).ok()?;
        Some(read_job(&to, cap))
    })
    .await;
    let text = match read {
        None => return,
        Some(Ok(t)) => t,
        Some(Err(e)) => return fail(dir, stem, &claimed, &e).await,
    };
    let job = match parse_job(&text) {
        Ok(j) => j,
        Err(e) => return fail(dir, stem, &claimed, &e).await,
    };
    let max_payload = ctx.config.limits.max_payload_bytes;
    let payload_len = match &job {
        Job::Publish { payload, .. } => payload.len(),
        Job::Send { body, .. } => body.len(),
    };
    if payload_len > max_payload {
        let reason = format!("payload of {payload_len} bytes over the limit of {max_payload}");
        return fail(dir, stem, &claimed, &reason).await;
    }
    let result = match job {
        Job::Publish {
            job_id,
            channel,
            payload,
        } => {
            let job_id = job_id.unwrap_or_else(|| stem.to_owned());
            if !protocol::valid_channel(&channel) {
                return fail(dir, stem, &claimed, "invalid channel name").await;
            }
            let msg_id = format!("spool-{job_id}");
            match ctx
                .channels
                .store
                .append_scoped("spool", &channel, &msg_id, payload.as_bytes())
                .await
            {
                Ok(a) => {
                    if !a.duplicate {
                        let frame = protocol::deliver_frame(
                            &channel,
                            a.offset,
                            &msg_id,
                            payload.as_bytes(),
                        );
                        ctx.channels
                            .fan_out(
                                &channel,
                                std::sync::Arc::from(vec![(
                                    a.offset,
                                    crate::upgrade::Utf8Bytes::from(frame),
                                )]),
                            )
                            .await;
                    }
                    format!(
                        r#"{{"job_id":{},"status":"ok","channel":{},"offset":{},"duplicate":{}}}"#,
                        json_str(&job_id),
                        json_str(&channel),
                        a.offset,
                        a.duplicate
                    )
                }
                Err(e) => {
                    // Not handled: put it back for the next pass.
                    ctx.channels.health.observe_store_error(&e).await;
                    blocking(move || std::fs::rename(&claimed, &job_path))
                        .await
                        .ok();
                    return;
                }
            }
        }
        Job::Send { job_id, to, body } => {
            let job_id = job_id.unwrap_or_else(|| stem.to_owned());
            let payload = format!(r#"{{"to":{},"body":{}}}"#, json_str(&to), body);
            match ctx
                .channels
                .store
                .enqueue(NewSend {
                    session_id: None,
                    scope: "spool".to_owned(),
                    idem_key: job_id.clone(),
                    payload: payload.into_bytes(),
                })
                .await
            {
                Ok(e) => {
                    ctx.outbox_ready.notify_one();
                    format!(
                        r#"{{"job_id":{},"status":"queued","outbox_id":{},"duplicate":{}}}"#,
                        json_str(&job_id),
                        e.id,
                        e.duplicate
                    )
                }
                Err(e) => {
                    if let keel_session::OutboxError::Store(se) = &e {
                        ctx.channels.health.observe_store_error(se).await;
                    }
                    blocking(move || std::fs::rename(&claimed, &job_path))
                        .await
                        .ok();
                    return;
                }
            }
        }
    };
    let tmp = dir.join(format!(".{stem}.result.tmp"));
    let done = dir.join(format!("{stem}{RESULT}"));
    // The result is as durable as the store: with `durability = "full"`
    // it is fsynced before the claim goes (power-loss safe); by default,
    // like the store's WAL, it is safe against a process crash (the page
    // cache survives it) and costs no fsync, whose latency on a busy disk
    // (p95 17 ms, spikes of 300 ms here) would be every job's latency.
    let full = ctx.config.durability == "full";
    let claim = claimed.clone();
    let written = blocking(move || {
        write_new(&tmp, result.as_bytes(), full)?;
        std::fs::rename(&tmp, &done)?;
        let _ = std::fs::remove_file(&claim);
        Ok::<_, std::io::Error>(())
    })
    .await;
    match written {
        Ok(()) => {
            metrics::counter!("keel_spool_jobs_total", "status" => "ok").increment(1);
            metrics::histogram!("keel_spool_job_seconds").record(started.elapsed().as_secs_f64());
        }
        Err(e) => {
            tracing::error!(job = stem, error = %e, "cannot write the job result; the claim stays for the next start");
        }
    }
}

async fn fail(dir: &Path, stem: &str, claimed: &Path, reason: &str) {
    let failed = dir.join("failed");
    let (claimed, stem_owned, text) = (claimed.to_path_buf(), stem.to_owned(), reason.to_owned());
    blocking(move || {
        // A rename replaces a link at the destination, never its target.
        let _ = std::fs::rename(&claimed, failed.join(format!("{stem_owned}{JOB}")));
        let _ = write_new(
            &failed.join(format!("{stem_owned}.reason.txt")),
            text.as_bytes(),
            false,
        );
    })
    .await;
    metrics::counter!("keel_spool_jobs_total", "status" => "failed").increment(1);
    tracing::warn!(job = stem, reason, "spool job moved to failed/");
}

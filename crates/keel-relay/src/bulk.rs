//! Bulk work off the runtime's workers. Decoding a frame of a megabyte, or
//! formatting a replay page of one, takes a millisecond or more of CPU:
//! done on a runtime worker, every task queued behind it waits that long,
//! and a few hundred connections sending such frames at once delay a light
//! client's small publish by hundreds of milliseconds (abuse_memory's first
//! second). Work on at least [`BULK_BYTES`] goes to a few threads of its
//! own instead: the workers stay free for small frames, and the kernel
//! shares the CPUs between them and the bulk threads (a worker waking for a
//! small frame preempts a bulk thread that has run a while).
//!
//! Jobs are admitted by a semaphore, a few per thread, held until the job
//! is done: what waits for a bulk thread is bounded (each job holds the
//! bytes it was given), and a caller that stops waiting does not free its
//! place before its job has run.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, OnceLock, mpsc};

use tokio::sync::{Semaphore, oneshot};

/// Work on fewer bytes than this runs where it is asked for.
pub(crate) const BULK_BYTES: usize = 64 * 1024;

/// Jobs admitted per bulk thread (running or queued).
const PER_THREAD: usize = 2;

type Job = Box<dyn FnOnce() + Send>;

struct Pool {
    jobs: mpsc::Sender<Job>,
    admit: Arc<Semaphore>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism()
            .map_or(2, usize::from)
            .clamp(1, 4);
        let (jobs, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("keel-bulk-{i}"))
                .spawn(move || {
                    lower_priority();
                    loop {
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        let Ok(job) = job else { return };
                        // A panicking job drops its answer: its caller
                        // panics in turn, as it would have inline.
                        let _ = std::panic::catch_unwind(AssertUnwindSafe(job));
                    }
                });
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start a bulk thread");
            }
        }
        Pool {
            jobs,
            admit: Arc::new(Semaphore::new(threads * PER_THREAD)),
        }
    })
}

/// How much lower bulk threads' CPU priority is than the relay's: 10 steps
/// of nice (about a tenth of the CPU share of a relay thread when both
/// want it).
const NICE: i32 = 10;

/// Lowers the calling thread's CPU priority by [`NICE`] (on Linux, nice
/// is a thread's own), so that when the CPUs are short the kernel runs the
/// runtime's workers, the store's writer and light work first. Failing
/// only leaves the thread as it was.
fn lower_priority() {
    let me = Some(rustix::thread::gettid());
    let lowered = rustix::process::getpriority_process(me)
        .and_then(|now| rustix::process::setpriority_process(me, (now + NICE).min(19)));
    if let Err(e) = lowered {
        tracing::debug!(error = %e, "a bulk thread keeps its priority");
    }
}

/// Runs `f`, which works on `bytes` bytes: inline when they are fewer than
/// [`BULK_BYTES`], else on a bulk thread once admitted.
pub(crate) async fn run<T, F>(bytes: usize, f: F) -> T
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    if bytes < BULK_BYTES {
        return f();
    }
    let pool = pool();
    let Ok(permit) = pool.admit.clone().acquire_owned().await else {
        return f();
    };
    let (tx, rx) = oneshot::channel();
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
        drop(permit);
    });
    if let Err(mpsc::SendError(job)) = pool.jobs.send(job) {
        // No bulk thread could start: run here.
        job();
    }
    match rx.await {
        Ok(out) => out,
        Err(_) => panic!("a bulk job panicked"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn small_work_runs_inline_and_large_work_on_a_bulk_thread() {
        let here = std::thread::current().id();
        let small = run(10, || std::thread::current().id()).await;
        assert_eq!(small, here);
        let name = run(BULK_BYTES, || {
            std::thread::current().name().map(str::to_owned)
        })
        .await;
        assert!(
            name.as_deref().is_some_and(|n| n.starts_with("keel-bulk-")),
            "{name:?}"
        );
    }

    /// Bulk threads run at a lower CPU priority than the rest of the
    /// relay (nice 10 on Linux).
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn bulk_threads_run_at_a_lower_priority() {
        let here = rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap();
        let bulk = run(BULK_BYTES, || {
            rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap()
        })
        .await;
        assert_eq!(bulk, (here + NICE).min(19), "caller at {here}");
    }

    /// Jobs beyond the admitted number wait for a place; every one runs
    /// and answers its own caller.
    #[tokio::test]
    async fn every_admitted_job_answers_its_caller() {
        let jobs = (0..64u64).map(|i| run(BULK_BYTES, move || i * 2));
        let out = futures::future::join_all(jobs).await;
        assert_eq!(out, (0..64).map(|i| i * 2).collect::<Vec<_>>());
    }

    /// A panicking job does not take its thread's later jobs with it.
    #[tokio::test]
    async fn a_panicking_job_is_its_callers_panic_only() {
        let caller = tokio::spawn(run(BULK_BYTES, || -> u8 { panic!("planted") }));
        assert!(caller.await.unwrap_err().is_panic());
        for _ in 0..8 {
            assert_eq!(run(BULK_BYTES, || 7).await, 7);
        }
    }
}

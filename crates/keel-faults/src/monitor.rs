//! Resource monitor: RSS, peak RSS, open fds and CPU time of a process, from /proc.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

/// One reading of a process's resources.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Time since the monitor started.
    pub elapsed: Duration,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// Peak resident set size so far (the kernel's `VmHWM`), bytes.
    pub peak_rss_bytes: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// User plus system CPU time consumed so far.
    pub cpu_time: Duration,
}

/// Why a process could not be sampled.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// /proc could not be read (the process is gone, or this is not Linux).
    #[error("cannot read /proc/{pid}: {source}")]
    Proc {
        /// The process.
        pid: u32,
        /// The I/O error.
        source: std::io::Error,
    },
    /// /proc had an unexpected format.
    #[error("unexpected format in /proc/{pid}/{file}")]
    Format {
        /// The process.
        pid: u32,
        /// The file.
        file: &'static str,
    },
}

/// Reads one sample of `pid` (`std::process::id()` for this process).
pub fn sample(pid: u32, elapsed: Duration) -> Result<Sample, MonitorError> {
    let read = |file: &'static str| {
        std::fs::read_to_string(format!("/proc/{pid}/{file}"))
            .map_err(|source| MonitorError::Proc { pid, source })
    };
    let status = read("status")?;
    let kb = |field: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(field))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let rss_bytes = kb("VmRSS:").ok_or(MonitorError::Format {
        pid,
        file: "status",
    })? * 1024;
    let peak_rss_bytes = kb("VmHWM:").unwrap_or(0) * 1024;
    let stat = read("stat")?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or(MonitorError::Format { pid, file: "stat" })?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    // utime and stime are fields 14 and 15 of stat; index 11 and 12 after ")".
    let (utime, stime) = ticks(11)
        .zip(ticks(12))
        .ok_or(MonitorError::Format { pid, file: "stat" })?;
    let hz = clock_ticks_per_second();
    let cpu_time = Duration::from_nanos((utime + stime) * 1_000_000_000 / hz);
    let open_fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map_err(|source| MonitorError::Proc { pid, source })?
        .count() as u64;
    Ok(Sample {
        elapsed,
        rss_bytes,
        peak_rss_bytes,
        open_fds,
        cpu_time,
    })
}

fn clock_ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|v| u64::try_from(v).ok())
        .filter(|v| *v > 0)
        .unwrap_or(100)
}

/// What a monitor saw.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Every sample, in order.
    pub samples: Vec<Sample>,
    /// The largest RSS sampled, bytes.
    pub peak_rss_bytes: u64,
    /// The kernel's peak RSS at the last sample, bytes.
    pub kernel_peak_rss_bytes: u64,
    /// The most open fds sampled.
    pub peak_open_fds: u64,
    /// The least-squares slope of RSS over time, bytes per second: a steady
    /// positive slope over a soak run points to a leak.
    pub rss_slope_bytes_per_sec: f64,
}

impl Report {
    fn from_samples(samples: Vec<Sample>) -> Report {
        let peak_rss_bytes = samples.iter().map(|s| s.rss_bytes).max().unwrap_or(0);
        let kernel_peak_rss_bytes = samples.last().map_or(0, |s| s.peak_rss_bytes);
        let peak_open_fds = samples.iter().map(|s| s.open_fds).max().unwrap_or(0);
        let rss_slope_bytes_per_sec = slope(&samples);
        Report {
            samples,
            peak_rss_bytes,
            kernel_peak_rss_bytes,
            peak_open_fds,
            rss_slope_bytes_per_sec,
        }
    }
}

fn slope(samples: &[Sample]) -> f64 {
    let n = samples.len() as f64;
    if samples.len() < 2 {
        return 0.0;
    }
    let xs: Vec<f64> = samples.iter().map(|s| s.elapsed.as_secs_f64()).collect();
    let ys: Vec<f64> = samples.iter().map(|s| s.rss_bytes as f64).collect();
    let mx = xs.iter().sum::<f64>() / n;
    let my = ys.iter().sum::<f64>() / n;
    let cov: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let var: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    if var == 0.0 { 0.0 } else { cov / var }
}

/// Samples a process on an interval in a background task until stopped.
#[derive(Debug)]
pub struct ResourceMonitor {
    samples: Arc<Mutex<Vec<Sample>>>,
    task: JoinHandle<()>,
}

impl ResourceMonitor {
    /// Starts sampling `pid` every `interval` (a first sample is taken at once).
    /// Sampling stops by itself when the process is gone.
    pub fn start(pid: u32, interval: Duration) -> ResourceMonitor {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let sink = samples.clone();
        let task = tokio::spawn(async move {
            let started = Instant::now();
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                match sample(pid, started.elapsed()) {
                    Ok(s) => sink.lock().unwrap_or_else(|p| p.into_inner()).push(s),
                    Err(_) => return,
                }
            }
        });
        ResourceMonitor { samples, task }
    }

    /// Starts sampling this process.
    pub fn this_process(interval: Duration) -> ResourceMonitor {
        Self::start(std::process::id(), interval)
    }

    /// The samples so far.
    pub fn snapshot(&self) -> Report {
        Report::from_samples(
            self.samples
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }

    /// Stops sampling and reports.
    pub fn stop(self) -> Report {
        self.task.abort();
        self.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_this_process() {
        let s = sample(std::process::id(), Duration::ZERO).unwrap();
        assert!(s.rss_bytes > 1024 * 1024, "{s:?}");
        assert!(s.peak_rss_bytes >= s.rss_bytes);
        assert!(s.open_fds >= 3);
    }

    #[test]
    fn slope_of_a_line() {
        let samples: Vec<Sample> = (0..10)
            .map(|i| Sample {
                elapsed: Duration::from_secs(i),
                rss_bytes: 1_000 + 500 * i,
                peak_rss_bytes: 0,
                open_fds: 0,
                cpu_time: Duration::ZERO,
            })
            .collect();
        assert!((slope(&samples) - 500.0).abs() < 1e-6);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sees_memory_and_fds_grow() {
        let monitor = ResourceMonitor::this_process(Duration::from_millis(20));
        tokio::time::sleep(Duration::from_millis(60)).await;
        // Touch 64 MiB and open 50 files while it samples.
        let block = vec![1u8; 64 << 20];
        let files: Vec<_> = (0..50).map(|_| tempfile_handle()).collect();
        tokio::time::sleep(Duration::from_millis(120)).await;
        let report = monitor.stop();
        let low_rss = report.samples.iter().map(|s| s.rss_bytes).min().unwrap();
        let low_fds = report.samples.iter().map(|s| s.open_fds).min().unwrap();
        assert!(report.peak_rss_bytes >= low_rss + (60 << 20), "{report:?}");
        assert!(report.peak_open_fds >= low_fds + 50, "{report:?}");
        assert!(report.rss_slope_bytes_per_sec > 0.0);
        assert!(std::hint::black_box(&block).len() == 64 << 20 && files.len() == 50);
    }

    fn tempfile_handle() -> std::fs::File {
        std::fs::File::open("/proc/self/status").unwrap()
    }
}

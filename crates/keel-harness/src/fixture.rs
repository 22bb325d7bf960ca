//! What a scenario runs against: a real `keel-relay` process on 127.0.0.1
//! with a temporary data directory (or a relay the user started, with
//! `--target`), and its resources sampled over time.
//!
//! Teardown always runs: every child is registered when spawned and killed
//! when its fixture is dropped (a panic unwinds through the drop), and
//! [`kill_all`] kills whatever is still registered (the runner calls it on
//! Ctrl-C). Temporary directories are removed with their fixture.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use keel_faults::Sample;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::Error;

/// How to start a relay process: a program and the arguments before
/// `serve` (none for the `keel-relay` binary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayBinary {
    /// The program.
    pub program: PathBuf,
    /// Arguments before the relay's own.
    pub prefix: Vec<OsString>,
}

impl RelayBinary {
    /// The `keel-relay` binary at `path`.
    pub fn at(path: &Path) -> RelayBinary {
        RelayBinary {
            program: path.to_path_buf(),
            prefix: Vec::new(),
        }
    }
}

/// What scenarios run against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Relay processes the harness starts, kills and restarts itself.
    Spawn(RelayBinary),
    /// A relay someone else runs: only scenarios that need no control of
    /// the process apply; its resource figures come from its `/metrics`.
    Url(Remote),
}

/// A relay someone else runs, as the harness reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    /// Its WebSocket URL (`ws://HOST:PORT/ws`), perhaps through a proxy.
    pub url: String,
    /// Its Prometheus text (`http://HOST:PORT/metrics`), where the
    /// process's memory, file descriptors and CPU time are read.
    pub metrics: String,
}

impl Remote {
    /// `url`, its metrics at the same host and port (`/metrics`).
    pub fn new(url: &str) -> Remote {
        let host = url
            .split_once("://")
            .map_or(url, |(_, rest)| rest)
            .split('/')
            .next()
            .unwrap_or_default();
        Remote {
            url: url.to_owned(),
            metrics: format!("http://{host}/metrics"),
        }
    }

    /// `url`, its metrics at `metrics` (`--metrics-url`).
    pub fn with_metrics(url: &str, metrics: &str) -> Remote {
        Remote {
            url: url.to_owned(),
            metrics: metrics.to_owned(),
        }
    }
}

/// Options of one relay process.
#[derive(Debug, Clone, Default)]
pub struct RelayOptions {
    /// TOML over the harness's base configuration: its keys replace the
    /// base's, and keys before its first table header are `[limits]` keys.
    pub config: String,
    /// `--upstream` URL.
    pub upstream: Option<String>,
    /// `--spool` directory.
    pub spool: Option<PathBuf>,
    /// Extra environment (e.g. `KEEL_FAILPOINTS`).
    pub env: Vec<(String, String)>,
    /// The data directory, instead of one in the relay's temporary
    /// directory (e.g. on a size-limited tmpfs).
    pub data: Option<PathBuf>,
}

/// The base configuration: per-client rate and count limits raised so that
/// load tests measure the relay's capacity, not its defenses against one
/// abusive client (tested on their own); its byte budgets and deadlines stay
/// at their defaults.
pub const BASE_CONFIG: &str = "[limits]
max_connections_per_ip = 20000
publish_rate = 1000000
publish_burst = 1000000
publish_bytes_rate = 4000000000
publish_bytes_burst = 4000000000
session_rate = 1000000
session_burst = 1000000
handshake_timeout_ms = 120000
idle_timeout_ms = 600000
";

/// The base configuration with a scenario's over it: its keys replace the
/// base's (a scenario may lower a limit the base raises); keys before its
/// first table header are `[limits]` keys.
fn merged_config(base: &str, extra: &str) -> Result<String, Error> {
    fn merge(into: &mut toml::Table, from: toml::Table) {
        for (k, v) in from {
            match (into.get_mut(&k), v) {
                (Some(toml::Value::Table(a)), toml::Value::Table(b)) => merge(a, b),
                (_, v) => {
                    into.insert(k, v);
                }
            }
        }
    }
    let parse = |what: &str, text: &str| {
        text.parse::<toml::Table>()
            .map_err(|e| Error::Relay(format!("{what} configuration: {e}")))
    };
    let mut config = parse("base", base)?;
    merge(
        &mut config,
        parse("scenario", &format!("[limits]\n{extra}"))?,
    );
    toml::to_string(&config).map_err(|e| Error::Relay(format!("configuration: {e}")))
}

fn registry() -> &'static Mutex<BTreeSet<u32>> {
    static PIDS: OnceLock<Mutex<BTreeSet<u32>>> = OnceLock::new();
    PIDS.get_or_init(Mutex::default)
}

fn register(pid: u32) {
    registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(pid);
}

fn unregister(pid: u32) {
    registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&pid);
}

/// SIGKILLs every child process the harness started that is still running
/// (and SIGCONTs it first, in case a scenario had stopped it). Returns how
/// many there were.
pub fn kill_all() -> usize {
    let pids: Vec<u32> = std::mem::take(&mut *registry().lock().unwrap_or_else(|p| p.into_inner()))
        .into_iter()
        .collect();
    for pid in &pids {
        let _ = keel_faults::process::resume(*pid);
        let _ = keel_faults::process::kill9(*pid);
    }
    pids.len()
}

/// Resource samples of the relay process(es) of a scenario, in run time.
#[derive(Debug, Clone, Default)]
pub struct Resources(Arc<Mutex<Vec<(f64, Sample)>>>);

impl Resources {
    /// Every sample so far: (seconds since the run started, sample).
    pub fn samples(&self) -> Vec<(f64, Sample)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A `keel-relay serve` process with its own temporary data directory.
#[derive(Debug)]
pub struct RelayProcess {
    child: Option<Child>,
    addr: SocketAddr,
    dir: tempfile::TempDir,
    binary: RelayBinary,
    options: RelayOptions,
    log: PathBuf,
    resources: Resources,
    epoch: tokio::time::Instant,
    sampler: Option<tokio::task::JoinHandle<()>>,
}

impl RelayProcess {
    /// Starts a relay on 127.0.0.1 (a free port), its stderr and stdout in
    /// `log`; `epoch` is the run's clock for resource samples.
    pub async fn start(
        binary: &RelayBinary,
        options: RelayOptions,
        log: &Path,
        resources: &Resources,
        epoch: tokio::time::Instant,
    ) -> Result<RelayProcess, Error> {
        let dir = tempfile::Builder::new()
            .prefix("keel-harness-")
            .tempdir()
            .map_err(|e| Error::io("create a temporary data directory", e))?;
        let mut relay = RelayProcess {
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            dir,
            binary: binary.clone(),
            options,
            log: log.to_path_buf(),
            resources: resources.clone(),
            epoch,
            sampler: None,
        };
        relay.spawn().await?;
        Ok(relay)
    }

    async fn spawn(&mut self) -> Result<(), Error> {
        let config = self.dir.path().join("relay.toml");
        std::fs::write(&config, merged_config(BASE_CONFIG, &self.options.config)?)
            .map_err(|e| Error::io("write the relay configuration", e))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| Error::io(&format!("open {}", self.log.display()), e))?;
        // Through the relay's own exec helper, which arms the parent-death
        // signal and then becomes the relay: a relay dies with the harness
        // even if the harness is SIGKILLed and no teardown code runs.
        let mut cmd = Command::new(&self.binary.program);
        cmd.args(&self.binary.prefix)
            .arg("__exec")
            .arg(std::process::id().to_string())
            .arg(&self.binary.program)
            .args(&self.binary.prefix)
            .arg("serve")
            .arg("--data")
            .arg(self.data_dir())
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--config")
            .arg(&config)
            .env(
                "RUST_LOG",
                std::env::var("KEEL_RELAY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true);
        if let Some(u) = &self.options.upstream {
            cmd.arg("--upstream").arg(u);
        }
        if let Some(s) = &self.options.spool {
            cmd.arg("--spool").arg(s);
        }
        for (k, v) in &self.options.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().map_err(|e| {
            Error::Relay(format!(
                "cannot start {}: {e}; build it with `cargo build --release -p keel-relay`",
                self.binary.program.display()
            ))
        })?;
        let pid = child.id().unwrap_or(0);
        register(pid);
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| Error::Relay("no stdout".into()))?;
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .map_err(|_| Error::Timeout("relay start (60 s)".into()))?
            .map_err(|e| Error::io("read the relay's stdout", e))?;
        let Some(line) = first else {
            let _ = child.wait().await;
            unregister(pid);
            return Err(Error::Relay(format!(
                "the relay exited before listening; see {}",
                self.log.display()
            )));
        };
        let addr: SocketAddr = line
            .strip_prefix("keel-relay listening on ")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| Error::Relay(format!("unexpected first line from the relay: {line}")))?;
        self.addr = addr;
        // Keep its stdout flowing into the log.
        let log_path = self.log.clone();
        tokio::spawn(async move {
            let Ok(mut f) = tokio::fs::OpenOptions::new()
                .append(true)
                .open(&log_path)
                .await
            else {
                return;
            };
            while let Ok(Some(l)) = lines.next_line().await {
                let _ = f.write_all(format!("{l}\n").as_bytes()).await;
            }
        });
        self.child = Some(child);
        let (sink, epoch) = (self.resources.clone(), self.epoch);
        if let Some(old) = self.sampler.take() {
            old.abort();
        }
        self.sampler = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let t = epoch.elapsed();
                match keel_faults::sample(pid, t) {
                    Ok(s) => sink
                        .0
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((t.as_secs_f64(), s)),
                    Err(_) => return,
                }
            }
        }));
        Ok(())
    }

    /// `ws://127.0.0.1:PORT/ws`.
    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its pid (0 once killed).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().and_then(Child::id).unwrap_or(0)
    }

    /// Its data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.options
            .data
            .clone()
            .unwrap_or_else(|| self.dir.path().join("data"))
    }

    /// SIGKILL, and wait for it to be gone.
    pub async fn kill9(&mut self) -> Result<(), Error> {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().unwrap_or(0);
            let _ = keel_faults::process::resume(pid);
            let _ = child.start_kill();
            let _ = child.wait().await;
            unregister(pid);
        }
        Ok(())
    }

    /// Starts it again on the same data directory and address.
    pub async fn restart(&mut self) -> Result<(), Error> {
        self.kill9().await?;
        self.spawn().await
    }

    /// SIGTERM, then wait (up to 30 s) for a clean exit.
    pub async fn terminate(&mut self) -> Result<Option<i32>, Error> {
        let Some(mut child) = self.child.take() else {
            return Ok(None);
        };
        let pid = child.id().unwrap_or(0);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await;
        unregister(pid);
        match status {
            Ok(Ok(s)) => Ok(s.code()),
            _ => {
                let _ = child.start_kill();
                Err(Error::Timeout("relay shutdown (30 s)".into()))
            }
        }
    }

    /// `GET /metrics`.
    pub async fn metrics(&self) -> Result<String, Error> {
        http_get(self.addr, "/metrics").await
    }

    /// One unlabelled metric's value (or the sum over its labels).
    pub async fn metric(&self, name: &str) -> Result<f64, Error> {
        Ok(metric_value(&self.metrics().await?, name))
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if let Some(s) = self.sampler.take() {
            s.abort();
        }
        if let Some(mut child) = self.child.take() {
            let pid = child.id().unwrap_or(0);
            let _ = keel_faults::process::resume(pid);
            let _ = child.start_kill();
            unregister(pid);
        }
    }
}

/// The relay a scenario measures: one it started, or the `--target` relay,
/// whose figures it reads from that relay's `/metrics`.
#[derive(Debug)]
pub enum Relay {
    /// A process this harness started.
    Spawned(Box<RelayProcess>),
    /// A relay someone else runs.
    Remote(RemoteRelay),
}

impl Relay {
    /// Its WebSocket URL.
    pub fn url(&self) -> String {
        match self {
            Relay::Spawned(r) => r.url(),
            Relay::Remote(r) => r.remote.url.clone(),
        }
    }

    /// Its Prometheus text.
    pub async fn metrics(&self) -> Result<String, Error> {
        match self {
            Relay::Spawned(r) => r.metrics().await,
            Relay::Remote(r) => r.metrics().await,
        }
    }

    /// One metric's value (summed over its labels).
    pub async fn metric(&self, name: &str) -> Result<f64, Error> {
        Ok(metric_value(&self.metrics().await?, name))
    }

    /// Its resident memory now, MiB (from /proc for a process this harness
    /// started, else `process_resident_memory_bytes`). A figure that cannot
    /// be read is an error, never a zero.
    pub async fn rss_mib(&self) -> Result<f64, Error> {
        let bytes = match self {
            Relay::Spawned(r) => {
                keel_faults::sample(r.pid(), Duration::ZERO)
                    .map_err(|e| Error::Relay(format!("relay memory: {e}")))?
                    .rss_bytes as f64
            }
            Relay::Remote(r) => {
                let text = r.metrics().await?;
                if !text.contains("process_resident_memory_bytes") {
                    return Err(Error::Relay(format!(
                        "{} has no process_resident_memory_bytes now",
                        r.remote.metrics
                    )));
                }
                metric_value(&text, "process_resident_memory_bytes")
            }
        };
        Ok(bytes / (1024.0 * 1024.0))
    }
}

/// The `--target` relay: its `/metrics` sampled every 250 ms into the
/// scenario's resources (memory, file descriptors, CPU time), for as long
/// as this lives.
#[derive(Debug)]
pub struct RemoteRelay {
    remote: Remote,
    addr: SocketAddr,
    host: String,
    path: String,
    sampler: tokio::task::JoinHandle<()>,
}

impl RemoteRelay {
    /// Starts sampling `remote`'s metrics into `resources` (`epoch`: the
    /// run's clock). Fails if they cannot be read, or lack the process's
    /// resident memory: a figure judged from nothing would be a lie.
    pub async fn start(
        remote: &Remote,
        resources: &Resources,
        epoch: tokio::time::Instant,
    ) -> Result<RemoteRelay, Error> {
        let rest = remote.metrics.strip_prefix("http://").ok_or_else(|| {
            Error::Usage(format!(
                "--metrics-url {}: only http:// URLs are supported",
                remote.metrics
            ))
        })?;
        let (host, path) = rest.split_once('/').unwrap_or((rest, "metrics"));
        let addr = tokio::net::lookup_host(host)
            .await
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| Error::Usage(format!("--metrics-url {}: no address", remote.metrics)))?;
        let path = format!("/{path}");
        let host = host.to_owned();
        let text = http_get_host(addr, &host, &path).await?;
        if !text.contains("process_resident_memory_bytes") {
            return Err(Error::NotApplicable(format!(
                "{} has no process_resident_memory_bytes: this scenario judges the relay's memory; point --metrics-url at the relay's /metrics",
                remote.metrics
            )));
        }
        let (sink, p, h) = (resources.clone(), path.clone(), host.clone());
        let sampler = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let t = epoch.elapsed();
                // A scrape that fails is a gap in the chart, not a zero.
                let Ok(text) = http_get_host(addr, &h, &p).await else {
                    continue;
                };
                let rss = metric_value(&text, "process_resident_memory_bytes") as u64;
                let sample = Sample {
                    elapsed: t,
                    rss_bytes: rss,
                    // The peak between scrapes is not published: the
                    // largest sampled stands for it.
                    peak_rss_bytes: rss,
                    open_fds: metric_value(&text, "process_open_fds") as u64,
                    cpu_time: Duration::from_secs_f64(
                        metric_value(&text, "process_cpu_seconds_total").max(0.0),
                    ),
                };
                sink.0
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((t.as_secs_f64(), sample));
            }
        });
        Ok(RemoteRelay {
            remote: remote.clone(),
            addr,
            host,
            path,
            sampler,
        })
    }

    /// Its Prometheus text.
    pub async fn metrics(&self) -> Result<String, Error> {
        http_get_host(self.addr, &self.host, &self.path).await
    }
}

impl Drop for RemoteRelay {
    fn drop(&mut self) {
        self.sampler.abort();
    }
}

/// The value of `name` in Prometheus text (summed over labels).
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A minimal HTTP/1.1 GET to `addr`; returns the body of a 2xx answer.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<String, Error> {
    http_get_host(addr, &addr.to_string(), path).await
}

/// [`http_get`] naming `host` in the `Host` header (a server behind a
/// reverse proxy may route by it). The body may be chunked; a status other
/// than 2xx is an error. At most 64 MiB and 10 s.
pub async fn http_get_host(addr: SocketAddr, host: &str, path: &str) -> Result<String, Error> {
    use tokio::io::AsyncReadExt;
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
        let mut out = Vec::new();
        s.take(64 << 20).read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(out)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), io)
        .await
        .map_err(|_| Error::Timeout(format!("GET {path}")))?
        .map_err(|e| Error::io(&format!("GET {path}"), e))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| Error::Client(format!("GET {path}: no HTTP answer")))?;
    let status = head.split(' ').nth(1).unwrap_or("");
    if !status.starts_with('2') {
        return Err(Error::Client(format!(
            "GET {path}: HTTP {status} from {host}"
        )));
    }
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    Ok(if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    })
}

/// A chunked body's content (extensions and trailers ignored).
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = size.split(';').next().unwrap_or("").trim();
        let Ok(n) = usize::from_str_radix(size, 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(
            dechunk("5\r\nhello\r\n7;x=1\r\n, world\r\n0\r\n\r\n"),
            "hello, world"
        );
    }

    #[test]
    fn a_remote_relays_metrics_default_to_its_host_and_port() {
        let r = Remote::new("ws://127.0.0.5:7700/ws");
        assert_eq!(r.metrics, "http://127.0.0.5:7700/metrics");
        assert_eq!(
            Remote::with_metrics("ws://h:1/ws", "http://m:2/x").metrics,
            "http://m:2/x"
        );
    }

    #[test]
    fn metric_values_sum_over_labels() {
        let text = "# HELP x\nkeel_errors_total{code=\"a\"} 2\nkeel_errors_total{code=\"b\"} 3\nkeel_errors_totalx 9\nkeel_connections 7\n";
        assert_eq!(metric_value(text, "keel_errors_total"), 5.0);
        assert_eq!(metric_value(text, "keel_connections"), 7.0);
        assert_eq!(metric_value(text, "missing"), 0.0);
    }

    #[test]
    fn scenario_configuration_overrides_the_base() {
        let merged = merged_config(
            BASE_CONFIG,
            "session_rate = 20\n[sending]\nanswer_timeout_ms = 1000\n",
        )
        .unwrap();
        let t: toml::Table = merged.parse().unwrap();
        assert_eq!(t["limits"]["session_rate"].as_integer(), Some(20));
        assert_eq!(t["limits"]["publish_rate"].as_integer(), Some(1_000_000));
        assert_eq!(t["sending"]["answer_timeout_ms"].as_integer(), Some(1000));
        assert!(merged_config(BASE_CONFIG, "[limits\n").is_err());
    }
}

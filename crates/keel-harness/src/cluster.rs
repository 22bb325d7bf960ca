//! What cluster scenarios run against (docs/cluster.md): N relay processes on one
//! machine, on a fresh PostgreSQL database and a NATS server.
//!
//! The engines come from `KEEL_PG_URL` and `KEEL_NATS_URL` (defaults: the
//! standard local ports). A scenario that restarts PostgreSQL gets its own
//! instance instead ([`OwnPostgres`]: `initdb` and `pg_ctl` in a temporary
//! directory, as the `postgres` OS user when run as root), so that nothing
//! else on the machine sees the restart. When an engine cannot be reached,
//! [`check_engines`] says exactly what to start.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use keel_session_pg::testing::{TestDatabase, nats_check, nats_url};
use tokio::process::Command;

use crate::Error;
use crate::fixture::{RelayOptions, RelayProcess};
use crate::scenario::Ctx;

/// The PostgreSQL server cluster scenarios use: `KEEL_PG_URL`, or the
/// standard local port.
pub fn pg_url() -> String {
    keel_session_pg::testing::admin_url()
}

/// Checks that PostgreSQL and NATS answer; the error names each missing
/// one and how to start it.
pub async fn check_engines() -> Result<(), String> {
    let mut missing = Vec::new();
    match TestDatabase::create_at(&pg_url()).await {
        Ok(db) => drop(db),
        Err(why) => missing.push(why),
    }
    if let Err(why) = nats_check(&nats_url()).await {
        missing.push(why);
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the cluster suite needs PostgreSQL and NATS:\n  {}",
            missing.join("\n  ")
        ))
    }
}

/// Cluster timings for scenarios: failures are noticed within about a
/// second.
pub const CLUSTER_TIMINGS: &str = "heartbeat_ms = 250\nlease_ms = 3000\ncatch_up_ms = 250\n";

/// N relay nodes on one fresh database.
pub struct Cluster {
    /// The nodes, `node-0` first.
    pub nodes: Vec<RelayProcess>,
    /// The database (dropped with the cluster, after the nodes).
    pub db: TestDatabase,
    /// The PostgreSQL instance of its own, if the scenario asked for one.
    pub own_pg: Option<OwnPostgres>,
    /// The NATS server of its own, if the scenario asked for one.
    pub own_nats: Option<OwnNats>,
    /// The proxy between one node and NATS (the node's index and the
    /// proxy), if the scenario asked for one.
    pub nats_proxy: Option<(usize, keel_faults::Proxy)>,
}

/// What a cluster runs on besides its nodes.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// The upstream (mock messaging API) every node is configured with.
    pub upstream: Option<String>,
    /// A PostgreSQL instance of its own (to stop and start).
    pub own_pg: bool,
    /// A NATS server of its own (to stop and start).
    pub own_nats: bool,
    /// This node reaches NATS through a fault proxy (to partition it).
    pub nats_proxy_for: Option<usize>,
}

impl Cluster {
    /// Every node's URL, node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RelayProcess::url).collect()
    }

    /// A client's URLs: its home node first, then the others in turn (the
    /// SDK fails over along them).
    pub fn urls_from(&self, home: usize) -> Vec<String> {
        let urls = self.urls();
        (0..urls.len())
            .map(|k| urls[(home + k) % urls.len()].clone())
            .collect()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Nodes first (they hold connections to the database).
        self.nodes.clear();
    }
}

impl Ctx {
    /// Starts `n` relay nodes on a fresh database, each with `extra`
    /// configuration, on the engines `options` asks for.
    pub async fn cluster(
        &self,
        n: usize,
        options: ClusterOptions,
        extra: &str,
    ) -> Result<Cluster, Error> {
        let own = if options.own_pg {
            Some(OwnPostgres::start(&self.dir).await?)
        } else {
            None
        };
        let own_nats = if options.own_nats {
            Some(OwnNats::start().await?)
        } else {
            None
        };
        let admin = own.as_ref().map_or_else(pg_url, OwnPostgres::url);
        let db = TestDatabase::create_at(&admin)
            .await
            .map_err(Error::Relay)?;
        let shared_nats = own_nats.as_ref().map_or_else(nats_url, OwnNats::url);
        let nats_proxy = match options.nats_proxy_for {
            Some(node) => Some((node, nats_proxy(&shared_nats).await?)),
            None => None,
        };
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let nats = match &nats_proxy {
                Some((node, proxy)) if *node == i => format!("nats://{}", proxy.listen_addr()),
                _ => shared_nats.clone(),
            };
            let config = format!(
                "{extra}\n[store]\nbackend = \"postgres\"\nurl = \"{}\"\npool_size = 16\n\
                 [cluster]\nnats_url = \"{nats}\"\nnode_id = \"node-{i}\"\n{CLUSTER_TIMINGS}",
                db.url
            );
            nodes.push(
                self.relay(RelayOptions {
                    config,
                    upstream: options.upstream.clone(),
                    ..RelayOptions::default()
                })
                .await?,
            );
        }
        Ok(Cluster {
            nodes,
            db,
            own_pg: own,
            own_nats,
            nats_proxy,
        })
    }
}

/// A fault proxy in front of the NATS server at `url`.
async fn nats_proxy(url: &str) -> Result<keel_faults::Proxy, Error> {
    let hostport = url.split("://").nth(1).unwrap_or(url).trim_end_matches('/');
    let upstream = tokio::net::lookup_host(hostport)
        .await
        .map_err(|e| Error::io(&format!("resolve NATS at {url}"), e))?
        .next()
        .ok_or_else(|| Error::Relay(format!("NATS at {url} has no address")))?;
    keel_faults::Proxy::start(keel_faults::ProxyConfig {
        name: "nats".into(),
        listen: "127.0.0.1:0".parse().expect("an address"),
        upstream,
        seed: 0,
        protocol: keel_faults::Protocol::Tcp,
    })
    .await
    .map_err(|e| Error::Relay(format!("cannot start the NATS proxy: {e}")))
}

/// A NATS server of the harness's own (`nats-server`, core NATS: the bus
/// needs no JetStream) on a port it keeps across restarts.
pub struct OwnNats {
    child: Option<tokio::process::Child>,
    port: u16,
}

impl OwnNats {
    /// Starts it on a free port.
    pub async fn start() -> Result<OwnNats, Error> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| Error::io("find a free port", e))?
            .port();
        let mut nats = OwnNats { child: None, port };
        nats.start_server().await?;
        Ok(nats)
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) and waits until it greets, at most 10 s.
    pub async fn start_server(&mut self) -> Result<(), Error> {
        let child = Command::new(nats_server_bin())
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                Error::io(
                    "start nats-server (install it, or set KEEL_NATS_SERVER to its path)",
                    e,
                )
            })?;
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while nats_check(&self.url()).await.is_err() {
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Relay(format!(
                    "nats-server did not start on port {} within 10 s",
                    self.port
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Kills the server (SIGKILL: every client sees its connection end).
    pub async fn stop_server(&mut self) -> Result<(), Error> {
        if let Some(mut child) = self.child.take() {
            child
                .kill()
                .await
                .map_err(|e| Error::io("kill nats-server", e))?;
        }
        Ok(())
    }
}

/// `KEEL_NATS_SERVER`, or `nats-server` on the PATH or in the usual places.
fn nats_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("KEEL_NATS_SERVER") {
        return PathBuf::from(p);
    }
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/usr/local/bin", "/usr/bin"])
        .map(|d| Path::new(d).join("nats-server"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("nats-server"))
}

/// A PostgreSQL server of the harness's own, in a temporary directory, on a
/// free port: scenarios stop and start it without touching the machine's.
pub struct OwnPostgres {
    dir: tempfile::TempDir,
    port: u16,
    bin: PathBuf,
    as_postgres: bool,
}

impl OwnPostgres {
    /// `initdb` (trust authentication, no fsync: a test server) and start.
    pub async fn start(scratch: &Path) -> Result<OwnPostgres, Error> {
        let _ = scratch;
        let dir = tempfile::Builder::new()
            .prefix("keel-pg-")
            .tempdir_in("/tmp")
            .map_err(|e| Error::io("create a directory for PostgreSQL", e))?;
        let as_postgres = nix::unistd::geteuid().is_root();
        if as_postgres {
            // initdb refuses to run as root: the server's files are the
            // postgres user's.
            let status = Command::new("chown")
                .arg("postgres:postgres")
                .arg(dir.path())
                .status()
                .await
                .map_err(|e| Error::io("chown the PostgreSQL directory", e))?;
            if !status.success() {
                return Err(Error::Relay(
                    "cannot chown the PostgreSQL directory to postgres".into(),
                ));
            }
        }
        let bin = pg_bin().await?;
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0")
                .map_err(|e| Error::io("find a free port", e))?;
            l.local_addr()
                .map_err(|e| Error::io("find a free port", e))?
                .port()
        };
        let pg = OwnPostgres {
            dir,
            port,
            bin,
            as_postgres,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                &pg.data(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "--no-instructions",
            ],
        )
        .await?;
        pg.start_server().await?;
        Ok(pg)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// The admin URL (user `postgres`, database `postgres`).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    async fn run(&self, tool: &str, args: &[&str]) -> Result<(), Error> {
        let program = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.arg("-u").arg("postgres").arg("--").arg(&program);
            c
        } else {
            Command::new(&program)
        };
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| Error::io(&format!("run {}", program.display()), e))?;
        if !out.status.success() {
            return Err(Error::Relay(format!(
                "{tool} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(())
    }

    /// Starts the server and waits until it accepts connections.
    pub async fn start_server(&self) -> Result<(), Error> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=300",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-l",
                &log,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )
        .await
    }

    /// Stops the server: `fast` ends every session at once (what a
    /// restart does to its clients).
    pub async fn stop_server(&self) -> Result<(), Error> {
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "fast", "-w", "-t", "60", "stop"],
        )
        .await
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let program = self.bin.join("pg_ctl");
        let data = self.data();
        let mut cmd = if self.as_postgres {
            let mut c = std::process::Command::new("runuser");
            c.arg("-u").arg("postgres").arg("--").arg(&program);
            c
        } else {
            std::process::Command::new(&program)
        };
        let _ = cmd
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Where PostgreSQL's server programs are: `pg_config --bindir`, or
/// Debian's `/usr/lib/postgresql/<version>/bin`.
async fn pg_bin() -> Result<PathBuf, Error> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output().await
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("pg_ctl").exists() && dir.join("initdb").exists() {
            return Ok(dir);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(|e| Some(e.ok()?.path().join("bin"))).collect())
        .unwrap_or_default();
    found.sort();
    found
        .into_iter()
        .rev()
        .find(|d| d.join("pg_ctl").exists())
        .ok_or_else(|| {
            Error::Relay(
                "PostgreSQL's server programs (initdb, pg_ctl) are not installed: \
                 apt-get install postgresql"
                    .into(),
            )
        })
}

//! The relay's configuration: a TOML file, every option with a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything `keel-relay serve` can be told. Command-line flags override the
/// file. See `docs/relay-config.md` for a commented example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where to listen. Default `127.0.0.1:7700`; port 0 picks one.
    pub listen: SocketAddr,
    /// The data directory (database, lock, supervisor registry). Default `keel-data`.
    pub data: PathBuf,
    /// The upstream messaging API's WebSocket URL (`ws://` or `wss://`).
    /// Default: none (sends stay queued).
    pub upstream: Option<String>,
    /// PEM file of certificate authorities trusted for a `wss://` upstream,
    /// in place of the compiled-in Mozilla roots (webpki-roots). Default: none.
    pub upstream_ca_file: Option<PathBuf>,
    /// A spool directory of `*.job.json` files to process. Default: none.
    pub spool: Option<PathBuf>,
    /// `normal` (default; durable against process crashes) or `full` (also
    /// against power loss, slower).
    pub durability: String,
    /// How long the store's writer waits for more writes when a batch runs
    /// dry, so that a burst of publishes commits (and fans out) together.
    /// Default 0 µs (commit at once).
    pub batch_delay_us: u64,
    /// Client-facing limits.
    pub limits: Limits,
    /// Upstream sending.
    pub sending: Sending,
    /// Supervised exec sessions.
    pub exec: Exec,
    /// What the message logs and idle sessions may keep on disk.
    pub retention: RetentionConfig,
    /// Free space on the data directory's disk, watched.
    pub disk: DiskConfig,
    /// Who may connect and what they may do.
    pub auth: Auth,
    /// TLS for the relay's own listener.
    pub tls: Tls,
    /// How long shutdown waits for in-flight work. Default 10,000 ms.
    pub shutdown_grace_ms: u64,
    /// Where sessions, logs and the outbox live: the data directory's
    /// SQLite file (the default) or PostgreSQL.
    pub store: StoreBackend,
    /// Cluster mode: several nodes on one PostgreSQL store and a NATS bus.
    pub cluster: Cluster,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            data: PathBuf::from("keel-data"),
            upstream: None,
            spool: None,
            durability: "normal".to_owned(),
            batch_delay_us: 0,
            limits: Limits::default(),
            sending: Sending::default(),
            exec: Exec::default(),
            retention: RetentionConfig::default(),
            disk: DiskConfig::default(),
            auth: Auth::default(),
            tls: Tls::default(),
            upstream_ca_file: None,
            shutdown_grace_ms: 10_000,
            store: StoreBackend::default(),
            cluster: Cluster::default(),
        }
    }
}

/// Client-facing limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest `publish` payload or `send` body. Default 1 MiB.
    pub max_payload_bytes: usize,
    /// Largest text frame answered with an error frame; anything over four
    /// times this closes the connection (1009). Default 1 MiB + 64 KiB.
    pub max_frame_bytes: usize,
    /// Subscriptions one session may hold. Default 256.
    pub max_subscriptions: usize,
    /// Open connections per client address (IPv6: per /64), counted from
    /// TCP accept. Default 1,024.
    pub max_connections_per_ip: usize,
    /// Open connections in all, counted from TCP accept; over it a
    /// connection gets HTTP 503 and is closed. 0 (the default) means the
    /// open-file limit minus 512 (the database, logs, children's pipes).
    pub max_connections: usize,
    /// Time from TCP accept to `hello` (the HTTP upgrade included). Default
    /// 10,000 ms.
    pub handshake_timeout_ms: u64,
    /// Time to read one HTTP request's headers (slowloris). Default 5,000 ms.
    pub header_timeout_ms: u64,
    /// Largest HTTP request head. Default 16 KiB.
    pub max_header_bytes: usize,
    /// A write to a client that makes no progress for this long closes the
    /// connection and frees all it held. Default 10,000 ms.
    pub write_deadline_ms: u64,
    /// Time a WebSocket frame may take to arrive, from its first byte to its
    /// last; past it the connection is dropped (a client that starts frames
    /// and stops holds the bytes read so far). Default 30,000 ms (a 1 MiB
    /// frame at 35 KB/s).
    pub frame_timeout_ms: u64,
    /// Bytes of publish payloads one connection may have accepted and not
    /// yet answered; past it the relay stops reading that socket until
    /// answers go out (TCP backpressure). Default 2 MiB.
    pub max_inbound_bytes: usize,
    /// Bytes queued for writing to one connection; past it the connection
    /// is a slow consumer, closed with 1013 (it resumes from the log).
    /// Default 16 MiB.
    pub max_outbound_bytes: usize,
    /// The kernel's send buffer of each client socket (`SO_SNDBUF`; Linux
    /// accounts twice this, its own overhead included). The kernel holds
    /// what a client has not read yet here, outside the relay's byte
    /// budgets: left to its autotuning it grows to `net.ipv4.tcp_wmem`'s
    /// maximum (4 MiB by default) for every subscriber that stops reading.
    /// 0 leaves it to the kernel. Linux caps it at `net.core.wmem_max`
    /// without an error (the relay warns once when it does). Default
    /// 212,992 bytes (208 KiB, the largest a stock kernel's `wmem_max`
    /// allows; on a 20 ms round trip about 20 MB/s to one subscriber).
    pub socket_send_buffer_bytes: usize,
    /// Payload bytes held by the whole relay (publishes in flight and frames
    /// queued for writing); past it reads pause, fairly, for everyone, and
    /// subscribers that cannot queue are closed with 1013. Default 512 MiB.
    pub global_buffer_bytes: usize,
    /// Bytes of the log read per page when replaying to a connection.
    /// Default 1 MiB (at least one message per page).
    pub replay_page_bytes: usize,
    /// Bytes of the newest delivery frames kept, over every channel, for
    /// replays: a connection resuming what it missed (a
    /// slow consumer back after 1013, a reconnect) writes the frames the
    /// others were sent instead of reading its own copy from the store.
    /// At least twice `max_outbound_bytes` is useful (a slow consumer is
    /// that far behind when it is closed). 0 keeps none; cluster mode
    /// keeps none. Default: a sixteenth of `global_buffer_bytes` (32 MiB
    /// at its default), so that a relay given less memory keeps less.
    pub replay_cache_bytes: Option<usize>,
    /// `send`s per second per session. Default 20.
    pub send_rate: u32,
    /// `send`s at once per session. Default 100.
    pub send_burst: u32,
    /// Sends of one session waiting for the upstream (its outbox quota).
    /// Default 1,000.
    pub max_pending_sends: u64,
    /// New sessions per second per client address. Default 20.
    pub session_rate: u32,
    /// New sessions at once per client address. Default 200.
    pub session_burst: u32,
    /// A connection that sends nothing (not even `ping`) for this long is
    /// closed (4002). Default 120,000 ms.
    pub idle_timeout_ms: u64,
    /// Items (frames, delivery batches) queued for one connection, a bound
    /// behind `max_outbound_bytes`; past it, 1013 as well. Default 4,096.
    pub outbound_queue: usize,
    /// Publishes per second per connection. Default 2,000.
    pub publish_rate: u32,
    /// Publishes allowed at once per connection. Default 4,000.
    pub publish_burst: u32,
    /// Payload bytes per second one connection may publish: a token bucket
    /// in bytes. Past it the relay stops reading the connection until the
    /// bucket refills, so the publisher feels TCP backpressure (never an
    /// error), and one connection cannot take the disk's bandwidth from
    /// the others. Default 1 MiB/s.
    pub publish_bytes_rate: u32,
    /// Payload bytes a connection may publish at once (the bucket's size);
    /// at least `max_payload_bytes`, and at most what the rate refills in
    /// 60 s (no publish waits longer). Default: `max_payload_bytes` (one
    /// maximum-size payload).
    pub publish_bytes_burst: Option<u32>,
    /// Publishes in flight per connection (pipelining). Default 256.
    pub max_in_flight: usize,
    /// Error frames before a connection is closed for abuse (1008). Default 50.
    pub max_errors: u32,
    /// How deeply arrays and objects may nest in a `publish` payload or a
    /// `send` body. Default 64: deeper JSON is refused (`bad_request`)
    /// because common parsers (serde_json's default of 128, Python's
    /// recursion limit) cannot read it, and one such message would make a
    /// channel unreadable for every subscriber.
    pub max_payload_depth: usize,
}

impl Limits {
    /// The replay cache's bound: `replay_cache_bytes`, or a sixteenth of
    /// `global_buffer_bytes`.
    pub fn replay_cache(&self) -> usize {
        self.replay_cache_bytes
            .unwrap_or(self.global_buffer_bytes / 16)
    }

    /// The publish byte bucket's size: `publish_bytes_burst`, or one
    /// maximum-size payload.
    pub fn bytes_burst(&self) -> u32 {
        self.publish_bytes_burst
            .unwrap_or(u32::try_from(self.max_payload_bytes).unwrap_or(u32::MAX))
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: 1024 * 1024,
            max_frame_bytes: 1024 * 1024 + 64 * 1024,
            max_subscriptions: 256,
            max_connections_per_ip: 1024,
            max_connections: 0,
            handshake_timeout_ms: 10_000,
            header_timeout_ms: 5_000,
            max_header_bytes: 16 * 1024,
            write_deadline_ms: 10_000,
            frame_timeout_ms: 30_000,
            max_inbound_bytes: 2 << 20,
            max_outbound_bytes: 16 << 20,
            socket_send_buffer_bytes: 212_992,
            global_buffer_bytes: 512 << 20,
            replay_page_bytes: 1 << 20,
            replay_cache_bytes: None,
            send_rate: 20,
            send_burst: 100,
            max_pending_sends: 1_000,
            session_rate: 20,
            session_burst: 200,
            idle_timeout_ms: 120_000,
            outbound_queue: 4096,
            publish_rate: 2000,
            publish_burst: 4000,
            publish_bytes_rate: 1 << 20,
            publish_bytes_burst: None,
            max_in_flight: 256,
            max_errors: 50,
            max_payload_depth: 64,
        }
    }
}

impl Limits {
    /// [`Limits::handshake_timeout_ms`] as a duration.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// [`Limits::idle_timeout_ms`] as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    /// [`Limits::write_deadline_ms`] as a duration.
    pub fn write_deadline(&self) -> Duration {
        Duration::from_millis(self.write_deadline_ms.max(1))
    }

    /// [`Limits::max_connections`], with 0 resolved against the open-file
    /// limit.
    pub fn connection_cap(&self) -> usize {
        if self.max_connections > 0 {
            return self.max_connections;
        }
        let files = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(1024);
        (files.min(1 << 20) as usize).saturating_sub(512).max(64)
    }
}

/// What the message logs and idle sessions may keep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetentionConfig {
    /// Messages kept per channel, the newest. Default 100,000.
    pub max_messages: u64,
    /// Messages older than this are removed. Default 604,800 s (7 days).
    pub max_age_s: u64,
    /// How often retention runs. Default 60 s.
    pub interval_s: u64,
    /// Sessions without a connection for this long are closed and purged
    /// with their subscriptions and private channel. Default 604,800 s.
    pub session_ttl_s: u64,
    /// Rules for channels whose names start with a prefix (the longest
    /// matching prefix wins); unset fields fall back to the defaults above.
    pub rule: Vec<RetentionRule>,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            max_messages: 100_000,
            max_age_s: 7 * 24 * 3600,
            interval_s: 60,
            session_ttl_s: 7 * 24 * 3600,
            rule: Vec::new(),
        }
    }
}

/// Free space on the data directory's disk: below `low_bytes` the relay is
/// DEGRADED ("disk space low"), below `full_bytes` DEGRADED ("disk full");
/// OPERATIONAL again once space returns. A write that fails for want of
/// space marks the disk full at once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiskConfig {
    /// Default 64 MiB.
    pub low_bytes: u64,
    /// Default 1 MiB.
    pub full_bytes: u64,
    /// How often free space is checked. Default 1,000 ms.
    pub check_interval_ms: u64,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig {
            low_bytes: 64 << 20,
            full_bytes: 1 << 20,
            check_interval_ms: 1_000,
        }
    }
}

/// `[store]`: the store of record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreBackend {
    /// `"sqlite"` (the default: `keel.db` in the data directory) or
    /// `"postgres"` (keel-session-pg; needs `url`).
    pub backend: String,
    /// The PostgreSQL URL, e.g. `postgres://keel@127.0.0.1:5432/keel`; the
    /// database must exist (the schema is created and migrated at start).
    pub url: Option<String>,
    /// PostgreSQL connections this node keeps. Default 16.
    pub pool_size: usize,
}

impl Default for StoreBackend {
    fn default() -> Self {
        StoreBackend {
            backend: "sqlite".to_owned(),
            url: None,
            pool_size: 16,
        }
    }
}

/// `[cluster]`: this node among several (docs/cluster.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Cluster {
    /// The NATS server carrying committed messages between nodes, e.g.
    /// `nats://127.0.0.1:4222`. Default: none (one node).
    pub nats_url: Option<String>,
    /// This node's id, unique among the nodes: it names the node's
    /// sessions, its lease and its meta. Default `node-1`.
    pub node_id: String,
    /// A node whose lease is this old is dead: a survivor recovers its
    /// sessions. Default 5,000 ms.
    pub lease_ms: u64,
    /// How often a node renews its lease and looks for dead ones. Default
    /// 1,000 ms.
    pub heartbeat_ms: u64,
    /// How often a node compares the channels its clients listen to with
    /// the store's heads, delivering what the bus did not bring. Default
    /// 1,000 ms.
    pub catch_up_ms: u64,
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster {
            nats_url: None,
            node_id: "node-1".to_owned(),
            lease_ms: 5_000,
            heartbeat_ms: 1_000,
            catch_up_ms: 1_000,
        }
    }
}

/// Retention for channels whose names start with `prefix`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionRule {
    /// E.g. `"chat:"`.
    pub prefix: String,
    /// Messages kept per channel.
    pub max_messages: Option<u64>,
    /// Seconds a message is kept.
    pub max_age_s: Option<u64>,
}

impl RetentionConfig {
    /// The policy for `channel`: the longest matching rule over the defaults.
    pub fn policy(&self, channel: &str) -> keel_session::Retention {
        let rule = self
            .rule
            .iter()
            .filter(|r| channel.starts_with(&r.prefix))
            .max_by_key(|r| r.prefix.len());
        keel_session::Retention {
            max_count: Some(
                rule.and_then(|r| r.max_messages)
                    .unwrap_or(self.max_messages),
            ),
            max_age: Some(Duration::from_secs(
                rule.and_then(|r| r.max_age_s).unwrap_or(self.max_age_s),
            )),
        }
    }
}

/// Upstream sending.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Sending {
    /// Sends per second in all. Default 30.
    pub global_rate: u32,
    /// Sends per minute in all, for an upstream that counts per minute
    /// (e.g. 30/min): when set, replaces `global_rate`. Default none.
    pub global_rate_per_minute: Option<u32>,
    /// Sends allowed at once in all. Default: the rate (`global_rate`, or
    /// `global_rate_per_minute`).
    pub global_burst: Option<u32>,
    /// Sends per second per recipient. Default 1 (burst 3).
    pub per_recipient_rate: u32,
    /// Per-recipient burst. Default 3.
    pub per_recipient_burst: u32,
    /// Attempts before a send is DEAD. Default 10. Counted: no answer on a
    /// live link, garbage, error answers; not counted: 429s, and tries
    /// while the upstream link is down or dropped before the answer (the
    /// send waits for the next link).
    pub max_attempts: u32,
    /// First retry delay; doubles up to `backoff_cap_ms`. Default 1,000 ms.
    pub backoff_base_ms: u64,
    /// Longest retry delay. Default 60,000 ms.
    pub backoff_cap_ms: u64,
    /// How long one attempt waits for the upstream's answer. Default 10,000 ms.
    pub answer_timeout_ms: u64,
    /// How long after its first try a send may keep failing (tries while
    /// the link is down included, which `max_attempts` does not count)
    /// before it is DEAD. 0 (the default) never gives up: sends wait out an
    /// upstream outage however long. Set it to report sends DEAD rather
    /// than wait past that.
    pub give_up_after_ms: u64,
    /// Outbox claim lease. Default 60,000 ms.
    pub lease_ms: u64,
}

impl Default for Sending {
    fn default() -> Self {
        Sending {
            global_rate: 30,
            global_rate_per_minute: None,
            global_burst: None,
            per_recipient_rate: 1,
            per_recipient_burst: 3,
            max_attempts: 10,
            backoff_base_ms: 1000,
            backoff_cap_ms: 60_000,
            answer_timeout_ms: 10_000,
            give_up_after_ms: 0,
            lease_ms: 60_000,
        }
    }
}

/// Who may connect and what they may do (docs/security.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Auth {
    /// `open` (default: anyone who can connect; allowed only when the relay
    /// listens on a loopback address, unless `insecure_open`) or `jwt`
    /// (`hello` must carry a JWT in `auth`).
    pub mode: String,
    /// Serve `open` on a non-loopback address anyway (`--insecure-open`).
    /// Default false.
    pub insecure_open: bool,
    /// `HS256` (default; `jwt_secret_file`), `RS256` or `EdDSA`
    /// (`jwt_public_key_file`, PEM).
    pub jwt_algorithm: String,
    /// File holding the HS256 secret (its bytes, a trailing newline removed;
    /// at least 32 bytes).
    pub jwt_secret_file: Option<PathBuf>,
    /// PEM public key for RS256 or EdDSA.
    pub jwt_public_key_file: Option<PathBuf>,
    /// Required `iss`, when set.
    pub jwt_issuer: Option<String>,
    /// Required `aud`, when set.
    pub jwt_audience: Option<String>,
    /// Clock skew allowed on `exp` and `nbf`. Default 5 s.
    pub jwt_leeway_s: u64,
    /// Browser origins allowed to open a WebSocket (e.g.
    /// `https://app.example`; `*` allows any). A request that carries an
    /// `Origin` header not listed is refused with 403 before the upgrade;
    /// clients that send no `Origin` (non-browser clients) are unaffected.
    /// Default: none.
    pub allowed_origins: Vec<String>,
    /// Whether clients may publish to channels no `publish_rule` covers.
    /// Default true.
    pub client_publish: bool,
    /// Channels whose names start with `prefix` may be published to only by
    /// holders of one of `roles` (a JWT's `roles` claim); the longest
    /// matching prefix wins; empty `roles`: no client may publish there.
    pub publish_rule: Vec<PublishRule>,
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            mode: "open".to_owned(),
            insecure_open: false,
            jwt_algorithm: "HS256".to_owned(),
            jwt_secret_file: None,
            jwt_public_key_file: None,
            jwt_issuer: None,
            jwt_audience: None,
            jwt_leeway_s: 5,
            allowed_origins: Vec::new(),
            client_publish: true,
            publish_rule: Vec::new(),
        }
    }
}

/// Who may publish to channels under `prefix`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRule {
    /// E.g. `"news:"`.
    pub prefix: String,
    /// Roles allowed to publish there; empty: none.
    #[serde(default)]
    pub roles: Vec<String>,
}

/// TLS for the relay's listener: both files, or neither (plain `ws://`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain (`--tls-cert`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key (`--tls-key`).
    pub key_file: Option<PathBuf>,
}

/// Supervised exec sessions: off unless `enabled` and the command is allowed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Exec {
    /// Default false.
    pub enabled: bool,
    /// Commands a session may start, by name.
    pub allow: Vec<ExecCommand>,
    /// The only environment variables a child gets from the relay's (its
    /// environment is cleared first). Default `["PATH", "LANG"]`.
    pub pass_env: Vec<String>,
    /// Children running at once, in all (one per session at most); past
    /// it, `exec` is refused with `limit_exceeded`. Default 64.
    pub max_children: usize,
    /// How long a child outlives its session's connection (a client that
    /// resumes within it keeps its child); then it is terminated (TERM,
    /// then KILL). Default 10,000 ms.
    pub detach_grace_ms: u64,
}

impl Default for Exec {
    fn default() -> Self {
        Exec {
            enabled: false,
            allow: Vec::new(),
            pass_env: vec!["PATH".to_owned(), "LANG".to_owned()],
            max_children: 64,
            detach_grace_ms: 10_000,
        }
    }
}

/// One allowed command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecCommand {
    /// The name a client asks for.
    pub name: String,
    /// The program.
    pub program: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Terminate it after this long. Default: never.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The error, with line and column.
        source: Box<toml::de::Error>,
    },
    /// A value is out of range.
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads a TOML file; missing options keep their defaults.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            source: Box::new(e),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks ranges that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if !matches!(self.durability.as_str(), "normal" | "full") {
            return bad("durability must be \"normal\" or \"full\"");
        }
        if self.limits.max_frame_bytes < self.limits.max_payload_bytes {
            return bad("limits.max_frame_bytes must be at least limits.max_payload_bytes");
        }
        if self.limits.outbound_queue == 0 || self.limits.max_in_flight == 0 {
            return bad("limits.outbound_queue and limits.max_in_flight must be positive");
        }
        for (key, rate) in [
            ("limits.publish_rate", self.limits.publish_rate),
            ("limits.publish_bytes_rate", self.limits.publish_bytes_rate),
            ("sending.global_rate", self.sending.global_rate),
        ] {
            if rate == 0 {
                return bad(&format!("{key} must be positive"));
            }
        }
        if self
            .limits
            .publish_bytes_burst
            .is_some_and(|b| (b as usize) < self.limits.max_payload_bytes)
        {
            return bad(
                "limits.publish_bytes_burst must be at least limits.max_payload_bytes (a payload larger than the bucket could never be published)",
            );
        }
        if self.limits.bytes_burst() as u64 > u64::from(self.limits.publish_bytes_rate) * 60 {
            return bad(
                "limits.publish_bytes_burst (or max_payload_bytes, its default) is more than 60 s of limits.publish_bytes_rate: a publish could wait longer than that",
            );
        }
        if self.sending.per_recipient_rate == 0 || self.sending.max_attempts == 0 {
            return bad("sending.per_recipient_rate and sending.max_attempts must be positive");
        }
        let l = &self.limits;
        if l.max_inbound_bytes < l.max_payload_bytes || l.max_outbound_bytes < l.max_frame_bytes {
            return bad(
                "limits.max_inbound_bytes must hold a payload and limits.max_outbound_bytes a frame",
            );
        }
        if l.socket_send_buffer_bytes > i32::MAX as usize / 2 {
            return bad("limits.socket_send_buffer_bytes must be under 1 GiB");
        }
        if l.global_buffer_bytes / 2 < l.max_outbound_bytes.max(l.max_inbound_bytes) {
            return bad(
                "limits.global_buffer_bytes must be at least twice the per-connection budgets (it is split in halves: inbound, outbound)",
            );
        }
        match self.auth.mode.as_str() {
            "open" => {
                if !self.listen.ip().is_loopback() && !self.auth.insecure_open {
                    return Err(ConfigError::Invalid(format!(
                        "refusing to serve {} without authentication: anyone who can reach it could read and write every channel. \
                         Set [auth] mode = \"jwt\" with jwt_secret_file (HS256) or jwt_public_key_file (RS256, EdDSA), \
                         listen on a loopback address (127.0.0.1), or pass --insecure-open (auth.insecure_open = true)",
                        self.listen
                    )));
                }
            }
            "jwt" => {
                let a = &self.auth;
                match (
                    a.jwt_algorithm.as_str(),
                    &a.jwt_secret_file,
                    &a.jwt_public_key_file,
                ) {
                    ("HS256", Some(_), None) | ("RS256" | "EdDSA", None, Some(_)) => {}
                    ("HS256", _, _) => {
                        return bad(
                            "auth.jwt_algorithm HS256 needs auth.jwt_secret_file (and no jwt_public_key_file)",
                        );
                    }
                    ("RS256" | "EdDSA", _, _) => {
                        return bad(
                            "auth.jwt_algorithm RS256 and EdDSA need auth.jwt_public_key_file (and no jwt_secret_file)",
                        );
                    }
                    _ => {
                        return bad("auth.jwt_algorithm must be \"HS256\", \"RS256\" or \"EdDSA\"");
                    }
                }
            }
            _ => return bad("auth.mode must be \"open\" or \"jwt\""),
        }
        if self.tls.cert_file.is_some() != self.tls.key_file.is_some() {
            return bad("tls.cert_file and tls.key_file go together (--tls-cert, --tls-key)");
        }
        if self.disk.check_interval_ms == 0 || self.disk.full_bytes > self.disk.low_bytes {
            return bad(
                "disk.check_interval_ms must be positive and disk.full_bytes at most disk.low_bytes",
            );
        }
        match (self.store.backend.as_str(), &self.store.url) {
            ("sqlite", None) => {}
            ("sqlite", Some(_)) => {
                return bad(
                    "store.url is for store.backend = \"postgres\" (sqlite keeps keel.db in the data directory)",
                );
            }
            ("postgres", Some(url)) if !url.is_empty() => {}
            ("postgres", _) => {
                return bad(
                    "store.backend = \"postgres\" needs store.url, e.g. postgres://keel@127.0.0.1:5432/keel",
                );
            }
            _ => return bad("store.backend must be \"sqlite\" or \"postgres\""),
        }
        if self.store.pool_size < 2 {
            return bad("store.pool_size must be at least 2");
        }
        let c = &self.cluster;
        if c.nats_url.is_some() && self.store.backend != "postgres" {
            return bad(
                "cluster.nats_url needs store.backend = \"postgres\": the nodes of a cluster share one store",
            );
        }
        let id_ok = !c.node_id.is_empty()
            && c.node_id.len() <= 64
            && c.node_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !id_ok {
            return bad("cluster.node_id must be 1 to 64 letters, digits, '-' or '_'");
        }
        if c.heartbeat_ms == 0 || c.catch_up_ms == 0 || c.lease_ms < 2 * c.heartbeat_ms {
            return bad(
                "cluster.heartbeat_ms and cluster.catch_up_ms must be positive and cluster.lease_ms at least twice cluster.heartbeat_ms",
            );
        }
        if self.retention.interval_s == 0 || l.send_rate == 0 || l.session_rate == 0 {
            return bad(
                "retention.interval_s, limits.send_rate and limits.session_rate must be positive",
            );
        }
        Ok(())
    }

    /// The store configuration this implies.
    pub fn store_config(&self) -> keel_session::Config {
        keel_session::Config {
            durability: if self.durability == "full" {
                keel_session::Durability::Full
            } else {
                keel_session::Durability::Normal
            },
            max_batch_delay: Duration::from_micros(self.batch_delay_us),
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_all_defaults_and_unknown_keys_are_errors() {
        let c: Config = toml::from_str("").unwrap();
        assert_eq!(c, Config::default());
        let c: Config = toml::from_str("[limits]\nmax_subscriptions = 3\n").unwrap();
        assert_eq!(c.limits.max_subscriptions, 3);
        assert_eq!(c.limits.outbound_queue, 4096);
        assert!(toml::from_str::<Config>("[limits]\nmax_subscription = 3\n").is_err());
        let c: Config = toml::from_str("durability = \"fast\"").unwrap();
        assert!(c.validate().is_err());
    }

    #[test]
    fn store_and_cluster_sections_are_checked_at_start() {
        let ok = |t: &str| toml::from_str::<Config>(t).unwrap().validate();
        assert!(ok("").is_ok());
        assert!(ok("[store]\nbackend = \"postgres\"\nurl = \"postgres://u@h/db\"\n").is_ok());
        let err = |t: &str| ok(t).unwrap_err().to_string();
        assert!(err("[store]\nbackend = \"postgres\"\n").contains("needs store.url"));
        assert!(err("[store]\nbackend = \"mysql\"\n").contains("must be"));
        assert!(err("[store]\nurl = \"postgres://u@h/db\"\n").contains("store.url is for"));
        assert!(
            err("[cluster]\nnats_url = \"nats://127.0.0.1:4222\"\n").contains("share one store")
        );
        assert!(err("[cluster]\nnode_id = \"a b\"\n").contains("node_id"));
        assert!(err("[cluster]\nlease_ms = 1000\n").contains("lease_ms"));
    }

    #[test]
    fn retention_rules_take_the_longest_prefix() {
        let c: Config = toml::from_str(
            "[retention]\nmax_messages = 10\n[[retention.rule]]\nprefix = \"chat:\"\nmax_messages = 5\n[[retention.rule]]\nprefix = \"chat:vip:\"\nmax_age_s = 60\n",
        )
        .unwrap();
        assert_eq!(c.retention.policy("room").max_count, Some(10));
        assert_eq!(c.retention.policy("chat:1").max_count, Some(5));
        let vip = c.retention.policy("chat:vip:1");
        assert_eq!(
            vip.max_count,
            Some(10),
            "unset fields fall back to the defaults"
        );
        assert_eq!(vip.max_age, Some(Duration::from_secs(60)));
    }
}

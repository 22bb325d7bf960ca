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
    /// The upstream messaging API's WebSocket URL. Default: none (sends stay queued).
    pub upstream: Option<String>,
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
    /// How long shutdown waits for in-flight work. Default 10,000 ms.
    pub shutdown_grace_ms: u64,
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
            shutdown_grace_ms: 10_000,
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
    /// Open connections per client IP. Default 1,024.
    pub max_connections_per_ip: usize,
    /// Time from the WebSocket opening to `hello`. Default 10,000 ms.
    pub handshake_timeout_ms: u64,
    /// A connection that sends nothing (not even `ping`) for this long is
    /// closed (4002). Default 120,000 ms.
    pub idle_timeout_ms: u64,
    /// Frames queued for one connection before it counts as a slow consumer
    /// and is closed (1013). Default 4,096.
    pub outbound_queue: usize,
    /// Publishes per second per connection. Default 2,000.
    pub publish_rate: u32,
    /// Publishes allowed at once per connection. Default 4,000.
    pub publish_burst: u32,
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

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload_bytes: 1024 * 1024,
            max_frame_bytes: 1024 * 1024 + 64 * 1024,
            max_subscriptions: 256,
            max_connections_per_ip: 1024,
            handshake_timeout_ms: 10_000,
            idle_timeout_ms: 120_000,
            outbound_queue: 4096,
            publish_rate: 2000,
            publish_burst: 4000,
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
    /// Attempts before a send is DEAD. Default 10.
    pub max_attempts: u32,
    /// First retry delay; doubles up to `backoff_cap_ms`. Default 1,000 ms.
    pub backoff_base_ms: u64,
    /// Longest retry delay. Default 60,000 ms.
    pub backoff_cap_ms: u64,
    /// How long one attempt waits for the upstream's answer. Default 10,000 ms.
    pub answer_timeout_ms: u64,
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
            lease_ms: 60_000,
        }
    }
}

/// Supervised exec sessions: off unless `enabled` and the command is allowed.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Exec {
    /// Default false.
    pub enabled: bool,
    /// Commands a session may start, by name.
    pub allow: Vec<ExecCommand>,
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
        if self.limits.publish_rate == 0 || self.sending.global_rate == 0 {
            return bad("rates must be positive");
        }
        if self.sending.per_recipient_rate == 0 || self.sending.max_attempts == 0 {
            return bad("sending.per_recipient_rate and sending.max_attempts must be positive");
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
}

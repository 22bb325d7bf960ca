//! keel's load and chaos harness: it runs scenarios against a real
//! `keel-relay` process, records a Jepsen-style history of what clients did
//! and saw, checks the relay's invariants from that history, judges
//! thresholds from the seeds beside keel's own targets, and writes reports.
//!
//! Layers, each a module with one job: [`scenario`] (catalogue, seeds,
//! plans, thresholds) → [`fixture`] (relay processes, teardown) → [`load`]
//! (open-model generator), [`client`] (raw keel.v1 clients) and `workload`
//! (SDK clients recording into the history) →
//! [`history`] → [`check`] → [`report`]. [`run`] strings them together for
//! `cargo xtask load`; `tests/load` runs the same scenarios small.
//!
//! # Example
//!
//! The checker is a pure function of a history; here it catches a
//! duplicated delivery:
//!
//! ```
//! use keel_harness::check::check;
//! use keel_harness::history::{Delivery, Digest, Expectation, MsgId, Outcome, Publish, Recorder};
//!
//! let r = Recorder::new();
//! let room = r.channel("room");
//! let id = MsgId::harness(1, 1);
//! let digest = Digest::of(r#"{"text":"hi"}"#);
//! r.publish(Publish { client: 1, conn: 1, channel: room, id, invoke: 10, done: 20, outcome: Outcome::Ok { offset: 1 }, digest });
//! r.expect(Expectation { sub: 2, channel: room, from: 1 });
//! let d = Delivery { sub: 2, conn: 1, channel: room, offset: 1, id, at: 30, digest };
//! // The same offset again, and a copy whose payload changed on the way.
//! let changed = Digest::of(r#"{"text":"hI"}"#);
//! r.deliveries(&mut vec![d, Delivery { conn: 2, at: 40, ..d }, Delivery { sub: 3, digest: changed, ..d }]);
//!
//! let verdict = check(&r.take());
//! assert_eq!(verdict.count("duplicated"), 1);
//! assert_eq!(verdict.count("corrupted"), 1);
//! assert_eq!(verdict.count("lost"), 0);
//! println!("{}", verdict.get("corrupted").unwrap().witnesses[0].summary);
//! ```

pub mod chart;
pub mod check;
pub mod client;
pub mod cluster;
pub mod fixture;
pub mod history;
pub mod load;
pub mod report;
pub mod results;
pub mod run;
pub mod scenario;
mod scenarios;
pub mod shrink;
pub mod threshold;
mod workload;

pub use crate::run::{RunOptions, RunSummary, run};
pub use crate::scenario::{Scale, Scenario, Suite};
pub use crate::scenarios::catalogue;

/// Why the harness could not do what it was asked (as opposed to a
/// scenario's verdict, which is in its report).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or socket operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// The relay could not be started or misbehaved as a process.
    #[error("relay: {0}")]
    Relay(String),
    /// A client could not connect or talk.
    #[error("client: {0}")]
    Client(String),
    /// Something took longer than its bound.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A threshold names a metric the scenario did not produce.
    #[error("unknown metric: {0}")]
    UnknownMetric(String),
    /// The scenario cannot run against this target.
    #[error("not applicable: {0}")]
    NotApplicable(String),
    /// The command line asked for something that does not exist.
    #[error("{0}")]
    Usage(String),
    /// The run was interrupted (Ctrl-C).
    #[error("interrupted")]
    Interrupted,
}

impl Error {
    /// An I/O error with what was being done.
    pub fn io(context: &str, source: std::io::Error) -> Error {
        Error::Io {
            context: context.to_owned(),
            source,
        }
    }
}

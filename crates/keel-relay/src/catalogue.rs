//! Every metric the relay exports on `/metrics`: name, type, labels and
//! the HELP text Prometheus shows. The recorder is given each description
//! at start and every metric is put at zero, so a dashboard sees them all
//! before their first event. docs/protocol.md's table lists the same
//! names and types; a test compares the two both ways, and another the
//! Grafana dashboard's expressions (contrib/grafana/keel-relay.json).

/// A metric's Prometheus type as `/metrics` writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (`_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Quantiles over a sliding window, with `_sum` and `_count`.
    Summary,
}

impl Kind {
    /// As in a `# TYPE` line.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Summary => "summary",
        }
    }
}

/// One exported metric.
#[derive(Debug, Clone, Copy)]
pub struct Metric {
    /// Its name.
    pub name: &'static str,
    /// Its type.
    pub kind: Kind,
    /// Its label and the label's values, when it has one.
    pub label: Option<(&'static str, &'static [&'static str])>,
    /// The HELP line.
    pub help: &'static str,
}

const fn m(name: &'static str, kind: Kind, help: &'static str) -> Metric {
    Metric {
        name,
        kind,
        label: None,
        help,
    }
}

const fn l(
    name: &'static str,
    kind: Kind,
    label: &'static str,
    values: &'static [&'static str],
    help: &'static str,
) -> Metric {
    Metric {
        name,
        kind,
        label: Some((label, values)),
        help,
    }
}

use Kind::{Counter, Gauge, Summary};

/// The metrics of the relay itself (the process's own, `process_*`, are
/// rendered from /proc at each scrape: [`PROCESS`]).
pub const METRICS: &[Metric] = &[
    m("keel_connections", Gauge, "WebSocket connections running."),
    m(
        "keel_connections_refused_total",
        Counter,
        "Connections refused at accept (max_connections or per-address caps).",
    ),
    m("keel_frames_in_total", Counter, "Frames read from clients."),
    m(
        "keel_frames_out_total",
        Counter,
        "Frames written to clients.",
    ),
    m(
        "keel_published_total",
        Counter,
        "Publishes committed and acknowledged.",
    ),
    m(
        "keel_publish_commit_seconds",
        Summary,
        "Time from a publish's arrival to its commit, in seconds.",
    ),
    l(
        "keel_errors_total",
        Counter,
        "code",
        &crate::protocol::ErrorCode::NAMES,
        "Error frames sent, by code.",
    ),
    m(
        "keel_slow_consumers_total",
        Counter,
        "Connections ended as slow consumers (with a 1013 close frame when the socket took it within 2 s).",
    ),
    m(
        "keel_sessions_opened_total",
        Counter,
        "Sessions opened by a hello (created or resumed).",
    ),
    m(
        "keel_gap_replays_total",
        Counter,
        "Deliveries read back from the store because an earlier offset had not reached the hub yet.",
    ),
    m(
        "keel_start_replays_total",
        Counter,
        "Subscriptions that started with a replay from the store.",
    ),
    m(
        "keel_replay_cache_hits_total",
        Counter,
        "Deliveries replayed from the replay cache's shared frames instead of the store.",
    ),
    m(
        "keel_replay_cache_bytes",
        Gauge,
        "Bytes the replay cache holds: its frames and their entries (limits.replay_cache_bytes).",
    ),
    m(
        "keel_sends_queued_total",
        Counter,
        "Sends to the upstream accepted into the outbox.",
    ),
    l(
        "keel_upstream_sends_total",
        Counter,
        "status",
        &["SENT", "DEAD"],
        "Sends to the upstream finished, by final status.",
    ),
    m(
        "keel_upstream_inbound_total",
        Counter,
        "Messages received from the upstream.",
    ),
    m(
        "keel_upstream_garbage_total",
        Counter,
        "Upstream frames that are not a JSON text frame (dropped).",
    ),
    m(
        "keel_upstream_unknown_answers_total",
        Counter,
        "Upstream answers naming no send in flight.",
    ),
    m(
        "keel_upstream_unroutable_total",
        Counter,
        "Upstream messages for no known session (dropped).",
    ),
    m(
        "keel_upstream_suspect_sends_total",
        Counter,
        "Sends taken back to be tried alone after three upstream links died with them unanswered first.",
    ),
    m(
        "keel_upstream_links_lost_alone_total",
        Counter,
        "Tries alone that ended with the upstream link lost and only that send unanswered.",
    ),
    l(
        "keel_spool_jobs_total",
        Counter,
        "status",
        &["ok", "failed"],
        "Spool files processed, by result.",
    ),
    m(
        "keel_spool_job_seconds",
        Summary,
        "Time to process one spool file, in seconds.",
    ),
    l(
        "keel_health",
        Gauge,
        "state",
        &["STARTING", "OPERATIONAL", "DEGRADED", "DRAINING", "STOPPED"],
        "1 for the relay's health state, 0 for the others.",
    ),
    l(
        "keel_outbox",
        Gauge,
        "state",
        &["pending", "claimed", "sent", "dead"],
        "Outbox sends by state.",
    ),
    m(
        "keel_channels_subscribed",
        Gauge,
        "Channels with a live subscriber.",
    ),
    m(
        "keel_subscriptions",
        Gauge,
        "Live subscriptions (connection x channel).",
    ),
    l(
        "keel_limit_hits_total",
        Counter,
        "limit",
        &crate::limits::LIMITS,
        "Times each limit refused or closed something, by limit.",
    ),
    l(
        "keel_buffered_bytes",
        Gauge,
        "direction",
        &["inbound", "outbound", "global"],
        "Bytes held in connection buffers, by direction; global: the relay-wide budget in use.",
    ),
    m(
        "keel_store_batches",
        Gauge,
        "Write batches the store's writer committed since start.",
    ),
    m(
        "keel_store_writes",
        Gauge,
        "Writes the store's writer committed since start.",
    ),
    m(
        "keel_store_failed_batches",
        Gauge,
        "Write batches that failed since start.",
    ),
    l(
        "keel_store_checkpoints",
        Gauge,
        "kind",
        &["passive", "restart"],
        "WAL checkpoints since start, by kind.",
    ),
    m(
        "keel_store_admission_waits",
        Gauge,
        "Times the writer held large writes while its WAL was behind its checkpoints.",
    ),
    m(
        "keel_store_wal_behind_bytes",
        Gauge,
        "Bytes committed since the checkpoint last caught up.",
    ),
    m(
        "keel_store_wal_bytes",
        Gauge,
        "Bytes of frames the WAL holds since it last restarted from its beginning.",
    ),
    l(
        "keel_evictions_total",
        Counter,
        "kind",
        &["retention", "session_ttl"],
        "Retention's removals: messages (retention) and sessions purged (session_ttl).",
    ),
    l(
        "keel_auth_refused_total",
        Counter,
        "why",
        &crate::auth::REFUSALS,
        "Refusals by the auth layer: jwt, origin, owner, publish.",
    ),
    l(
        "keel_bus_batches_total",
        Counter,
        "direction",
        &["in"],
        "Cluster mode: batches received from other nodes over NATS.",
    ),
    m(
        "keel_bus_publish_failures_total",
        Counter,
        "Cluster mode: batches not handed to NATS within 50 ms (other nodes' catch-up reads them).",
    ),
    m(
        "keel_bus_garbage_total",
        Counter,
        "Cluster mode: bus messages that could not be decoded.",
    ),
    m(
        "keel_catch_up_messages_total",
        Counter,
        "Cluster mode: messages the catch-up read from the store because the bus did not bring them.",
    ),
    l(
        "keel_takeovers_total",
        Counter,
        "answer",
        &["closed", "none"],
        "Cluster mode: sessions taken from another node: it closed its connection, or did not answer.",
    ),
    m(
        "keel_nodes_recovered_total",
        Counter,
        "Cluster mode: dead nodes whose sessions this node recovered.",
    ),
    m(
        "keel_node_lease_lost_total",
        Counter,
        "Cluster mode: times this node found its lease lapsed.",
    ),
    m(
        "keel_stray_sessions_closed_total",
        Counter,
        "Cluster mode: connections closed here because the store says their session is no longer active on this node.",
    ),
    m(
        "keel_upstream_leader",
        Gauge,
        "Cluster mode: 1 on the node that sends upstream.",
    ),
];

/// The process's own figures, read from /proc at each scrape.
pub const PROCESS: &[Metric] = &[
    m(
        "process_resident_memory_bytes",
        Gauge,
        "Resident memory size in bytes.",
    ),
    m(
        "process_open_fds",
        Gauge,
        "Number of open file descriptors.",
    ),
    m(
        "process_max_fds",
        Gauge,
        "Maximum number of open file descriptors (the soft limit).",
    ),
    m(
        "process_cpu_seconds_total",
        Counter,
        "Total user and system CPU time spent in seconds.",
    ),
];

/// Gives the recorder every description and puts every metric at zero
/// (each label value of a labelled one).
pub(crate) fn register() {
    for metric in METRICS {
        let name = metric.name;
        match metric.kind {
            Counter => metrics::describe_counter!(name, metric.help),
            Gauge => metrics::describe_gauge!(name, metric.help),
            Summary => metrics::describe_histogram!(name, metric.help),
        }
        let series: Vec<Vec<(&str, &str)>> = match metric.label {
            None => vec![vec![]],
            Some((label, values)) => values.iter().map(|v| vec![(label, *v)]).collect(),
        };
        for labels in series {
            let labels: Vec<metrics::Label> = labels
                .into_iter()
                .map(|(k, v)| metrics::Label::new(k, v))
                .collect();
            match metric.kind {
                Counter => metrics::counter!(name, labels).increment(0),
                // Gauges keep their value: only created here.
                Gauge => metrics::gauge!(name, labels).increment(0.0),
                Summary => {
                    let _ = metrics::histogram!(name, labels);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_prometheus_shaped() {
        let mut seen = std::collections::HashSet::new();
        for m in PROCESS.iter().chain(METRICS) {
            assert!(seen.insert(m.name), "{} twice", m.name);
            assert!(
                m.name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit()),
                "{}",
                m.name
            );
            assert_eq!(
                m.kind == Counter,
                m.name.ends_with("_total"),
                "{}: counters and only counters end in _total",
                m.name
            );
            assert!(!m.help.is_empty() && !m.help.contains('\n'), "{}", m.name);
        }
    }
}

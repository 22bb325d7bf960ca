//! The store's time in cluster mode: PostgreSQL's clock, not the node's.
//!
//! Nodes write times that other nodes judge (a session's last sight,
//! which any node's purge reads; an outbox lease another node may take
//! over), so one node's wall clock an hour ahead would purge the sessions
//! other nodes hold. The store reads the server's time through this
//! node's clocks: the offset between the server's clock and this node's
//! wall clock is measured when the store opens and again on every lease
//! heartbeat (the server's time in the answer, against the midpoint of the
//! round trip), and a [`SteadyClock`] over "this node's wall clock plus the
//! offset" makes up any change of it (a step of either clock) at 1% of real
//! time, never backwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use keel_store::{Clock, SteadyClock, SystemClock, UnixMillis};

/// PostgreSQL's time in milliseconds since the epoch, as SQL.
pub(crate) const SERVER_NOW: &str = "(extract(epoch from clock_timestamp()) * 1000)::bigint";

/// The server's time, read through this node's clocks.
pub struct ServerClock {
    offset_us: Arc<AtomicI64>,
    steady: SteadyClock,
}

impl std::fmt::Debug for ServerClock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerClock")
            .field("offset_ms", &self.offset_millis())
            .finish()
    }
}

impl ServerClock {
    /// A clock at `offset_us` from this node's wall clock.
    pub(crate) fn at_offset(offset_us: i64) -> Self {
        let offset = Arc::new(AtomicI64::new(offset_us));
        let read = offset.clone();
        ServerClock {
            offset_us: offset,
            steady: SteadyClock::with_wall(SteadyClock::DEFAULT_SLEW_PPM, move || {
                SystemClock::now_micros().saturating_add(read.load(Ordering::Relaxed))
            }),
        }
    }

    /// The offset from a reading of the server's clock (`server_ms`) taken
    /// between this node's wall-clock readings `sent_us` and `received_us`.
    pub(crate) fn offset_of(server_ms: i64, sent_us: i64, received_us: i64) -> i64 {
        let midpoint = sent_us + (received_us - sent_us) / 2;
        server_ms.saturating_mul(1_000).saturating_sub(midpoint)
    }

    /// Takes a new measurement of the offset (see [`ServerClock::offset_of`]).
    pub(crate) fn observe(&self, server_ms: i64, sent_us: i64, received_us: i64) {
        self.offset_us.store(
            Self::offset_of(server_ms, sent_us, received_us),
            Ordering::Relaxed,
        );
    }

    /// How far the server's clock is ahead of this node's wall clock, as
    /// last measured (milliseconds; negative: behind).
    pub fn offset_millis(&self) -> i64 {
        self.offset_us.load(Ordering::Relaxed) / 1_000
    }
}

impl Clock for ServerClock {
    fn now_millis(&self) -> UnixMillis {
        self.steady.now_millis()
    }
}

/// Reads the server's clock on `client`: the offset from this node's.
pub(crate) async fn measure(
    client: &impl tokio_postgres::GenericClient,
) -> Result<i64, tokio_postgres::Error> {
    let sent = SystemClock::now_micros();
    let row = client
        .query_one(&format!("SELECT {SERVER_NOW}"), &[])
        .await?;
    let received = SystemClock::now_micros();
    Ok(ServerClock::offset_of(row.get(0), sent, received))
}

#[cfg(test)]
mod tests {
    use super::ServerClock;

    #[test]
    fn the_offset_is_taken_at_the_round_trips_midpoint() {
        // Sent at 10 s, answered at 10.2 s by a server that read 3,610.1 s.
        assert_eq!(
            ServerClock::offset_of(3_610_100, 10_000_000, 10_200_000),
            3_600_000_000
        );
        assert_eq!(
            ServerClock::offset_of(9_900, 10_000_000, 10_000_000),
            -100_000
        );
    }
}

//! What several nodes on one store need beyond the store API: node leases,
//! recovery of a dead node's sessions by a survivor (exactly once), session
//! ownership across nodes, channel heads for catching up, and the lock that
//! elects one upstream sender.
//!
//! Lease times are the database server's clock, not the nodes': nodes whose
//! clocks disagree still agree on who is late.

use std::time::Duration;

use keel_store::{
    CrashMarked, CrashNotice, CrashedSession, Offset, Session, SessionError, SessionId,
    SessionState, StoreError, SystemClock, UnixMillis,
};

use crate::PgStore;
use crate::clock::SERVER_NOW;
use crate::error::pg;
use crate::ops::{append_notices, crash_sessions};

/// One node's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLease {
    /// The node's id.
    pub id: String,
    /// When its lease row was created (server time).
    pub started_at: UnixMillis,
    /// When it last renewed it (server time).
    pub heartbeat_at: UnixMillis,
}

/// What a heartbeat found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// The lease was this node's and is renewed.
    Renewed,
    /// There was no lease: this node's first heartbeat, or a survivor
    /// declared this node dead and recovered its sessions. A new lease is
    /// taken either way.
    Taken,
}

/// A dead node a survivor recovered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadNode {
    /// The node.
    pub id: String,
    /// Its sessions that were ACTIVE, now CRASHED.
    pub crashed: CrashMarked,
    /// The crash notices written, as (channel, offset), for fan-out.
    pub notices: Vec<(String, Offset)>,
}

/// What [`PgStore::hold_session`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// It was ACTIVE on this node already.
    Already,
    /// It was ACTIVE on another node (named): it is this node's now.
    TakenFrom(Option<String>),
    /// It moved to ACTIVE here from the state it was in.
    Activated(SessionState),
}

/// This node holds the named lock until it drops this, or until its
/// connection to the server ends (the server then frees the lock).
pub struct LeaderLock {
    client: tokio_postgres::Client,
    driver: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for LeaderLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaderLock").finish_non_exhaustive()
    }
}

impl LeaderLock {
    /// Whether the lock is still held: its connection answers within
    /// `within`. A false answer is final: drop it and try again later.
    pub async fn held(&self, within: Duration) -> bool {
        !self.driver.is_finished()
            && tokio::time::timeout(within, self.client.simple_query("SELECT 1"))
                .await
                .is_ok_and(|r| r.is_ok())
    }
}

impl Drop for LeaderLock {
    fn drop(&mut self) {
        // Closing the connection frees the lock on the server.
        self.driver.abort();
    }
}

impl PgStore {
    /// Renews this node's lease (creating it when there is none), on a
    /// connection of its own, so that a busy pool never delays it.
    pub async fn heartbeat(&self) -> Result<Lease, StoreError> {
        let mut slot = self.lease_slot().lock().await;
        if slot.as_ref().is_none_or(tokio_postgres::Client::is_closed) {
            *slot = Some(self.own_connection("lease").await?.0);
        }
        let conn = slot.as_ref().ok_or(StoreError::Closed)?;
        let sent = SystemClock::now_micros();
        let result = Self::renew(conn, self.node_id()).await;
        match &result {
            Ok((_, server_ms)) => {
                // The server's time in the answer: the store's clock
                // follows it (a step of this node's clock, or of the
                // server's, is made up at the clock's slew).
                if let Some(clock) = self.server_clock() {
                    clock.observe(*server_ms, sent, SystemClock::now_micros());
                }
            }
            Err(_) => *slot = None,
        }
        result.map(|(lease, _)| lease)
    }

    /// Renews (or takes) `node`'s lease; the lease and the server's time
    /// it was written at.
    async fn renew(conn: &tokio_postgres::Client, node: &str) -> Result<(Lease, i64), StoreError> {
        let renewed = conn
            .query_opt(
                &format!(
                    "UPDATE keel_nodes SET heartbeat_at = {SERVER_NOW} WHERE id = $1 \
                     RETURNING heartbeat_at"
                ),
                &[&node],
            )
            .await
            .map_err(pg)?;
        if let Some(row) = renewed {
            return Ok((Lease::Renewed, row.get(0)));
        }
        let row = conn
            .query_one(
                &format!(
                    "INSERT INTO keel_nodes (id, started_at, heartbeat_at)
                     VALUES ($1, {SERVER_NOW}, {SERVER_NOW})
                     ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at
                     RETURNING heartbeat_at"
                ),
                &[&node],
            )
            .await
            .map_err(pg)?;
        Ok((Lease::Taken, row.get(0)))
    }

    /// Gives up this node's lease (a clean stop: nothing to recover).
    pub async fn leave(&self) -> Result<(), StoreError> {
        let conn = self.conn().await?;
        conn.execute("DELETE FROM keel_nodes WHERE id = $1", &[&self.node_id()])
            .await
            .map_err(pg)?;
        Ok(())
    }

    /// Every node's lease, by id.
    pub async fn nodes(&self) -> Result<Vec<NodeLease>, StoreError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "SELECT id, started_at, heartbeat_at FROM keel_nodes ORDER BY id",
                &[],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| NodeLease {
                id: r.get(0),
                started_at: r.get(1),
                heartbeat_at: r.get(2),
            })
            .collect())
    }

    /// The server's clock now, in Unix milliseconds (lease times are in it).
    pub async fn server_now(&self) -> Result<UnixMillis, StoreError> {
        let conn = self.conn().await?;
        let row = conn
            .query_one(&format!("SELECT {SERVER_NOW}"), &[])
            .await
            .map_err(pg)?;
        Ok(row.get(0))
    }

    /// Recovers every other node whose lease is older than `lease`: in one
    /// transaction per node, its lease row is deleted and its ACTIVE
    /// sessions become CRASHED with a crash notice each. Two survivors
    /// racing for one dead node: the second finds no row and does nothing,
    /// so each dead node is recovered exactly once.
    pub async fn recover_dead_nodes(
        &self,
        lease: Duration,
        notice: CrashNotice,
    ) -> Result<Vec<DeadNode>, StoreError> {
        let lease_ms = i64::try_from(lease.as_millis()).unwrap_or(i64::MAX);
        let candidates: Vec<String> = {
            let conn = self.conn().await?;
            conn.query(
                &format!(
                    "SELECT id FROM keel_nodes WHERE id <> $1 AND heartbeat_at < {SERVER_NOW} - $2"
                ),
                &[&self.node_id(), &lease_ms],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|r| r.get(0))
            .collect()
        };
        let mut out = Vec::new();
        for dead in candidates {
            let mut conn = self.conn().await?;
            let tx = conn.transaction().await.map_err(pg)?;
            let claimed = tx
                .execute(
                    &format!(
                        "DELETE FROM keel_nodes WHERE id = $1 AND heartbeat_at < {SERVER_NOW} - $2"
                    ),
                    &[&dead, &lease_ms],
                )
                .await
                .map_err(pg)?;
            if claimed == 0 {
                continue; // renewed meanwhile, or another survivor took it
            }
            let now = self.now_millis();
            let crashed = crash_sessions(&tx, now, &dead, false, None).await?;
            let marked: Vec<CrashedSession> =
                self.crashed_rows(&tx, &crashed.crashed, now, &dead).await?;
            let notices = append_notices(&tx, now, &marked, &notice).await?;
            tx.commit().await.map_err(pg)?;
            out.push(DeadNode {
                id: dead,
                crashed: CrashMarked {
                    notified: notices.len() as u64,
                    ..crashed
                },
                notices,
            });
        }
        Ok(out)
    }

    async fn crashed_rows(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        ids: &[SessionId],
        now: UnixMillis,
        node: &str,
    ) -> Result<Vec<CrashedSession>, StoreError> {
        let ids: Vec<&str> = ids.iter().map(SessionId::as_str).collect();
        let rows = tx
            .query(
                "SELECT id, crash_count FROM sessions WHERE id = ANY($1) ORDER BY id",
                &[&ids],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| CrashedSession {
                id: SessionId(r.get(0)),
                previous_state: format!("ACTIVE on {node}"),
                crash_count: r.get::<_, i32>(1) as u32,
                recovered_at: now,
            })
            .collect())
    }

    /// The node holding `id` when it is ACTIVE (`None` when it is not
    /// ACTIVE, or ACTIVE with no node).
    pub async fn session_holder(&self, id: &SessionId) -> Result<Option<String>, StoreError> {
        let conn = self.conn().await?;
        let row = conn
            .query_opt(
                "SELECT node FROM sessions WHERE id = $1 AND state = 'ACTIVE'",
                &[&id.as_str()],
            )
            .await
            .map_err(pg)?;
        Ok(row.and_then(|r| r.get(0)))
    }

    /// `id` was ACTIVE on `node`, which did not answer a takeover (it is
    /// dead or cut off): marks it CRASHED with a crash notice, if it is
    /// still ACTIVE there. Returns the notice's (channel, offset) when this
    /// call crashed it; `None` when something else already moved it.
    pub async fn crash_held_session(
        &self,
        id: &SessionId,
        node: &str,
        notice: CrashNotice,
    ) -> Result<Option<(Session, (String, Offset))>, StoreError> {
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(pg)?;
        let now = self.now_millis();
        let row = tx
            .query_opt(
                "UPDATE sessions SET state = 'CRASHED', recovered_at = $3, updated_at = $3,
                 crash_count = crash_count + 1
                 WHERE id = $1 AND state = 'ACTIVE' AND node = $2 RETURNING crash_count",
                &[&id.as_str(), &node, &now],
            )
            .await
            .map_err(pg)?;
        let Some(row) = row else {
            return Ok(None);
        };
        let marked = CrashedSession {
            id: id.clone(),
            previous_state: format!("ACTIVE on {node}"),
            crash_count: row.get::<_, i32>(0) as u32,
            recovered_at: now,
        };
        let notices = append_notices(&tx, now, std::slice::from_ref(&marked), &notice).await?;
        tx.commit().await.map_err(pg)?;
        // Back to the pool before the next read takes one: a caller must
        // never hold two (many takeovers at once would wait on each other
        // until the pool's timeout).
        drop(conn);
        let session = keel_store::SessionStore::session(self, id)
            .await
            .map_err(|e| match e {
                SessionError::Store(e) => e,
                other => crate::error::backend("client", other.to_string()),
            })?;
        Ok(notices.into_iter().next().map(|n| (session, n)))
    }

    /// Makes `id` ACTIVE on this node: from a resumable state, or taken
    /// from another node when it is ACTIVE there (that node must close its
    /// connection; its [`PgStore::release_session`] then changes nothing).
    pub async fn hold_session(&self, id: &SessionId) -> Result<Held, SessionError> {
        self.check_open()?;
        let mut conn = self.conn().await?;
        let tx = conn.transaction().await.map_err(pg)?;
        let now = self.now_millis();
        let Some(row) = tx
            .query_opt(
                "SELECT state, node FROM sessions WHERE id = $1 FOR UPDATE",
                &[&id.as_str()],
            )
            .await
            .map_err(pg)?
        else {
            return Err(SessionError::NotFound(id.clone()));
        };
        let (raw, node): (String, Option<String>) = (row.get(0), row.get(1));
        let state: SessionState = raw.parse().map_err(|_| SessionError::UnknownState {
            id: id.clone(),
            state: raw.clone(),
        })?;
        let me = self.node_id();
        let held = match state {
            SessionState::Active if node.as_deref() == Some(me) => return Ok(Held::Already),
            SessionState::Active => Held::TakenFrom(node),
            s if s.can_transition_to(SessionState::Active) => Held::Activated(s),
            s => {
                return Err(SessionError::InvalidTransition {
                    from: s,
                    to: SessionState::Active,
                });
            }
        };
        tx.execute(
            "UPDATE sessions SET state = 'ACTIVE', node = $2, last_seen_at = $3, updated_at = $3
             WHERE id = $1",
            &[&id.as_str(), &me, &now],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        Ok(held)
    }

    /// Moves `id` from ACTIVE to DETACHED if this node holds it; returns
    /// whether it did (false when another node took it over, or it was not
    /// ACTIVE).
    pub async fn release_session(&self, id: &SessionId) -> Result<bool, SessionError> {
        self.check_open()?;
        let conn = self.conn().await?;
        let now = self.now_millis();
        let n = conn
            .execute(
                "UPDATE sessions SET state = 'DETACHED', updated_at = $3
                 WHERE id = $1 AND state = 'ACTIVE' AND node = $2",
                &[&id.as_str(), &self.node_id(), &now],
            )
            .await
            .map_err(pg)?;
        Ok(n == 1)
    }

    /// Of `ids` (sessions this node has connections for), those the store
    /// does not have ACTIVE on this node: taken over by another node, or
    /// crashed by a survivor that found this node's lease lapsed.
    /// Each with whether another node holds it ACTIVE now (else it was
    /// crashed, detached or deleted).
    pub async fn strays(&self, ids: &[String]) -> Result<Vec<(String, bool)>, StoreError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "SELECT id, state = 'ACTIVE' FROM sessions WHERE id = ANY($1)
                 AND NOT (state = 'ACTIVE' AND node IS NOT DISTINCT FROM $2)",
                &[&ids, &self.node_id()],
            )
            .await
            .map_err(pg)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// The next offset of each of `channels` that has one (one query).
    pub async fn heads(&self, channels: &[String]) -> Result<Vec<(String, Offset)>, StoreError> {
        let conn = self.conn().await?;
        let rows = conn
            .query(
                "SELECT name, next_offset FROM channels WHERE name = ANY($1)",
                &[&channels],
            )
            .await
            .map_err(pg)?;
        Ok(rows
            .iter()
            .map(|r| (r.get(0), r.get::<_, i64>(1) as Offset))
            .collect())
    }

    /// Tries to take the cluster-wide lock `key` (a PostgreSQL session
    /// advisory lock on a connection of its own): `Some` when this node
    /// holds it now, `None` when another node does.
    pub async fn try_lock(&self, key: i64) -> Result<Option<LeaderLock>, StoreError> {
        let (client, driver) = self.own_connection("lock").await?;
        let lock = LeaderLock { client, driver };
        let row = lock
            .client
            .query_one("SELECT pg_try_advisory_lock($1)", &[&key])
            .await
            .map_err(pg)?;
        Ok(row.get::<_, bool>(0).then_some(lock))
    }
}

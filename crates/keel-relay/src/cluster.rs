//! Cluster mode (docs/cluster.md): this node among several on one PostgreSQL
//! store and a NATS bus. The loops here keep the node's lease, recover dead
//! nodes' sessions, keep one connection per session across nodes, deliver
//! what the bus did not bring, and elect the one node that sends upstream.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::upgrade::Utf8Bytes;
use keel_session::{SessionId, SessionState, SessionStore};
use keel_session_pg::{Lease, PgStore};
use tokio::task::JoinHandle;

use crate::channels::{BackgroundCtx, Channels};
use crate::conn::ConnCtx;
use crate::protocol;

/// The advisory lock whose holder drains the outbox to the upstream.
const UPSTREAM_LOCK: i64 = 0x6b65_656c_7570;

/// How long a takeover waits for the holding node's answer.
const TAKEOVER_WAIT: Duration = Duration::from_millis(1_500);

/// Channels compared with the store's heads per query.
const HEADS_CHUNK: usize = 1_000;

/// Messages read per channel per catch-up round.
const CATCH_UP_ROWS: usize = 256;

/// The store when this relay is a cluster node (PostgreSQL and a bus).
pub(crate) fn node_store(channels: &Channels) -> Option<&PgStore> {
    channels.bus.as_ref()?;
    crate::store::RelayStoreExt::postgres(&channels.store)
}

/// Before a resume binds its session here: if another node holds it, asks
/// that node to close its connection. A holder that does not answer (dead,
/// or cut off from the bus) has the session marked CRASHED, with a crash
/// notice, exactly once. Returns the state the session is resumed from
/// when that changed it.
///
/// A store error is returned, not ignored: resuming anyway would move the
/// session without the crash its dead holder owes it.
pub(crate) async fn take_over(
    channels: &Channels,
    session: &SessionId,
) -> Result<Option<SessionState>, keel_session::StoreError> {
    let (Some(pg), Some(bus)) = (node_store(channels), channels.bus.as_ref()) else {
        return Ok(None);
    };
    let Some(holder) = pg.session_holder(session).await? else {
        return Ok(None);
    };
    if holder == pg.node_id() {
        return Ok(None);
    }
    if bus
        .take_over(&holder, session.as_str(), TAKEOVER_WAIT)
        .await
    {
        metrics::counter!("keel_takeovers_total", "answer" => "closed").increment(1);
        return Ok(None);
    }
    metrics::counter!("keel_takeovers_total", "answer" => "none").increment(1);
    let notice = keel_recovery::crash_notice(&format!(
        "node {holder} did not answer a takeover of this session"
    ));
    match pg.crash_held_session(session, &holder, notice).await? {
        Some((_, (channel, offset))) => {
            channels.announce(&channel, offset).await;
            Ok(Some(SessionState::Crashed))
        }
        // Something else moved it first (the holder's own release, a
        // survivor's recovery): nothing is owed.
        None => Ok(None),
    }
}

/// Starts the cluster loops; they end when `ctx.intake` stops.
pub(crate) fn start(
    ctx: Arc<BackgroundCtx>,
    conns: Arc<ConnCtx>,
    upstream: Option<(String, Option<Arc<rustls::ClientConfig>>)>,
) -> Vec<JoinHandle<()>> {
    let Some(bus) = ctx.channels.bus.clone() else {
        return Vec::new();
    };
    let mut tasks = Vec::new();
    let hub = ctx.channels.hub.clone();
    tasks.push(tokio::spawn(bus.clone().listen(move |channel, batch| {
        hub.publish_batch(channel, Arc::from(batch));
    })));
    let kicker = conns.clone();
    tasks.push(tokio::spawn(bus.answer_takeovers(Arc::new(
        move |session| kicker.sessions.kick(&SessionId::from(session)),
    ))));
    tasks.push(tokio::spawn(lease_loop(ctx.clone(), conns)));
    tasks.push(tokio::spawn(catch_up_loop(ctx.clone())));
    if let Some((url, tls)) = upstream {
        tasks.push(tokio::spawn(lead_upstream(ctx, url, tls)));
    }
    tasks
}

/// How this node's own lease is doing, as its heartbeat task sees it.
#[derive(Default)]
struct LeaseHealth {
    /// Since when every heartbeat has succeeded on time.
    since: std::sync::Mutex<Option<tokio::time::Instant>>,
}

impl LeaseHealth {
    /// Whether this node has kept its own lease fresh for a whole lease: only
    /// then does it judge others' (after a store outage every lease looks
    /// old; each node must renew before any is called dead).
    fn fit(&self, lease: Duration) -> bool {
        self.since
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|s| s.elapsed() >= lease)
    }

    fn set(&self, since: Option<tokio::time::Instant>) {
        *self.since.lock().unwrap_or_else(|p| p.into_inner()) = since;
    }
}

/// Renews this node's lease every `heartbeat_ms`, in a task of its own on a
/// connection of its own: nothing else the node does can delay it.
async fn heartbeat_loop(ctx: Arc<BackgroundCtx>, pg: PgStore, health: Arc<LeaseHealth>) {
    let mut stop = ctx.intake.clone();
    let c = &ctx.config.cluster;
    let every = Duration::from_millis(c.heartbeat_ms);
    let lease = Duration::from_millis(c.lease_ms);
    let mut first = true;
    let mut last_ok: Option<tokio::time::Instant> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.stopped() => return,
        }
        // Bounded: a renewal stuck on a dead connection must count as a
        // failure, or this node would keep judging others while its own
        // lease lapses.
        let renewed = match tokio::time::timeout(lease / 2, pg.heartbeat()).await {
            Ok(r) => r,
            Err(_) => {
                pg.drop_lease_connection().await;
                Err(keel_session::StoreError::Unavailable {
                    detail: format!("lease renewal took over {:?}", lease / 2),
                })
            }
        };
        match renewed {
            Ok(Lease::Taken) if !first => {
                // A survivor declared this node dead and recovered its
                // sessions: the ownership check closes them.
                tracing::warn!(
                    node = pg.node_id(),
                    "this node's lease had lapsed; its sessions were recovered elsewhere"
                );
                metrics::counter!("keel_node_lease_lost_total").increment(1);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew this node's lease");
                ctx.channels.health.observe_store_error(&e).await;
                health.set(None);
                last_ok = None;
                continue;
            }
        }
        first = false;
        // A renewal that came late (the machine stalled, or the store
        // answered slowly) restarts the wait.
        let now = tokio::time::Instant::now();
        if last_ok.is_none_or(|t| now - t > lease / 2) {
            health.set(Some(now));
        }
        last_ok = Some(now);
    }
}

/// Recovers dead nodes and closes connections whose session the store no
/// longer gives this node, every `heartbeat_ms`, while this node's own
/// lease is fit.
async fn lease_loop(ctx: Arc<BackgroundCtx>, conns: Arc<ConnCtx>) {
    let mut stop = ctx.intake.clone();
    let Some(pg) = node_store(&ctx.channels).cloned() else {
        return;
    };
    let c = &ctx.config.cluster;
    let every = Duration::from_millis(c.heartbeat_ms);
    let lease = Duration::from_millis(c.lease_ms);
    let health = Arc::new(LeaseHealth::default());
    let beat = tokio::spawn(heartbeat_loop(ctx.clone(), pg.clone(), health.clone()));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.stopped() => {
                let _ = beat.await;
                return;
            }
        }
        if !health.fit(lease) {
            continue;
        }
        let notice = keel_recovery::crash_notice("the relay node holding this session died");
        match pg.recover_dead_nodes(lease, notice).await {
            Ok(dead) => {
                for node in dead {
                    tracing::warn!(
                        node = node.id,
                        crashed = node.crashed.crashed.len(),
                        "recovered a dead node's sessions"
                    );
                    metrics::counter!("keel_nodes_recovered_total").increment(1);
                    for (channel, offset) in node.notices {
                        ctx.channels.announce(&channel, offset).await;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot look for dead nodes"),
        }
        // Sessions held here for a whole round that the store says are not
        // ACTIVE here any more (taken over, or crashed by a survivor).
        let held = conns.sessions.settled(every);
        for chunk in held.chunks(HEADS_CHUNK) {
            if let Ok(strays) = pg.strays(chunk).await {
                for (id, elsewhere) in strays {
                    metrics::counter!("keel_stray_sessions_closed_total").increment(1);
                    // Held by another node: replaced (4001). Crashed by a
                    // survivor: the client must resume (1001).
                    if elsewhere {
                        conns.sessions.kick(&SessionId(id));
                    } else {
                        conns.sessions.kick_lapsed(&SessionId(id));
                    }
                }
            }
        }
    }
}

/// Compares the channels this node's clients listen to with the store's
/// heads and hands the hub what the bus did not bring, so a lost bus
/// message is delivered within one round.
async fn catch_up_loop(ctx: Arc<BackgroundCtx>) {
    let mut stop = ctx.intake.clone();
    let Some(pg) = node_store(&ctx.channels).cloned() else {
        return;
    };
    let every = Duration::from_millis(ctx.config.cluster.catch_up_ms);
    let page_bytes = ctx.config.limits.replay_page_bytes;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.stopped() => return,
        }
        let heads = ctx.channels.hub.heads();
        for chunk in heads.chunks(HEADS_CHUNK) {
            let names: Vec<String> = chunk.iter().map(|(n, _)| n.to_string()).collect();
            let Ok(stored) = pg.heads(&names).await else {
                break;
            };
            let stored: HashMap<String, u64> = stored.into_iter().collect();
            for (name, last) in chunk {
                let Some(&next) = stored.get(name.as_ref()) else {
                    continue;
                };
                if next <= last + 1 {
                    continue;
                }
                let Ok(msgs) = ctx
                    .channels
                    .store
                    .read_channel_bounded(name, last + 1, CATCH_UP_ROWS, page_bytes)
                    .await
                else {
                    continue;
                };
                if msgs.is_empty() {
                    continue;
                }
                metrics::counter!("keel_catch_up_messages_total").increment(msgs.len() as u64);
                let batch: Vec<(u64, Utf8Bytes)> = msgs
                    .iter()
                    .map(|m| {
                        let frame = protocol::deliver_frame(name, m.offset, &m.msg_id, &m.payload);
                        (m.offset, Utf8Bytes::from(frame))
                    })
                    .collect();
                ctx.channels.hub.publish_batch(name, Arc::from(batch));
            }
        }
    }
}

/// Sends upstream while this node holds the upstream lock: one sender in
/// the cluster, so global rate limits stay exact. When the holder dies its
/// connection ends, the server frees the lock, and another node takes it
/// and continues from the outbox (claims are leased).
async fn lead_upstream(
    ctx: Arc<BackgroundCtx>,
    url: String,
    tls: Option<Arc<rustls::ClientConfig>>,
) {
    let mut stop = ctx.intake.clone();
    let Some(pg) = node_store(&ctx.channels).cloned() else {
        return;
    };
    let every = Duration::from_millis(ctx.config.cluster.heartbeat_ms);
    loop {
        if let Ok(Some(lock)) = pg.try_lock(UPSTREAM_LOCK).await {
            tracing::info!(node = pg.node_id(), "this node sends upstream");
            metrics::gauge!("keel_upstream_leader").set(1.0);
            let sender = tokio::spawn(crate::upstream::run(ctx.clone(), url.clone(), tls.clone()));
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = stop.stopped() => {
                        let _ = sender.await;
                        return;
                    }
                }
                if sender.is_finished() || !lock.held(every).await {
                    break;
                }
            }
            sender.abort();
            metrics::gauge!("keel_upstream_leader").set(0.0);
            tracing::warn!(
                node = pg.node_id(),
                "lost the upstream lock; another node sends"
            );
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.stopped() => return,
        }
    }
}

//! Keeping the disk bounded: every `retention.interval_s`, each channel's
//! log is cut to its policy (count and age, per channel prefix), and
//! sessions without a connection for `retention.session_ttl_s` are purged
//! with their subscriptions and private channel. Both run in small
//! transactions, so the writer is never held long.

use keel_session::SessionStore;
use std::sync::Arc;
use std::time::Duration;

use crate::channels::BackgroundCtx;

/// Channels looked at per read.
const PAGE: usize = 512;
/// Messages removed per transaction at most.
const CHUNK: u64 = 10_000;
/// Sessions purged per transaction at most.
const SESSIONS: usize = 500;

pub(crate) async fn run(ctx: Arc<BackgroundCtx>) {
    let every = Duration::from_secs(ctx.config.retention.interval_s.max(1));
    let mut stop = ctx.intake.clone();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.stopped() => return,
        }
        let removed = pass(&ctx).await;
        let purged = purge(&ctx).await;
        if removed > 0 || purged > 0 {
            tracing::info!(removed, purged, "retention");
        }
        if stop.is_stopping() {
            return;
        }
    }
}

/// One pass over every channel; returns how many messages went.
async fn pass(ctx: &BackgroundCtx) -> u64 {
    let store = &ctx.channels.store;
    let mut after: Option<String> = None;
    let mut removed = 0;
    loop {
        let page = match store.channels_after(after.as_deref(), PAGE).await {
            Ok(p) => p,
            Err(e) => {
                ctx.channels.health.observe_store_error(&e).await;
                return removed;
            }
        };
        let candidates = page
            .iter()
            .map(|c| (c.clone(), ctx.config.retention.policy(c)))
            .collect();
        let due = match store.retention_due(candidates).await {
            Ok(d) => d,
            Err(e) => {
                ctx.channels.health.observe_store_error(&e).await;
                return removed;
            }
        };
        for channel in &due {
            let policy = ctx.config.retention.policy(channel);
            loop {
                match store.apply_retention_to(channel, policy, CHUNK).await {
                    Ok(n) => {
                        if n > 0 {
                            // Replays must not hand out what is cut: the
                            // cache drops what is before the log's first
                            // offset now (all of it if that is unknown).
                            let first = match store.channel_bounds(channel).await {
                                Ok(b) => b.first.unwrap_or(b.next),
                                Err(_) => u64::MAX,
                            };
                            ctx.channels.hub.tail.forget(channel, first);
                        }
                        removed += n;
                        metrics::counter!("keel_evictions_total", "kind" => "retention")
                            .increment(n);
                        if n < CHUNK {
                            break;
                        }
                    }
                    Err(e) => {
                        ctx.channels.health.observe_store_error(&e).await;
                        return removed;
                    }
                }
            }
            if ctx.intake.is_stopping() {
                return removed;
            }
        }
        match page.last() {
            Some(last) if page.len() == PAGE => after = Some(last.clone()),
            _ => return removed,
        }
    }
}

/// Purges sessions idle past their TTL; returns how many.
async fn purge(ctx: &BackgroundCtx) -> u64 {
    let ttl = Duration::from_secs(ctx.config.retention.session_ttl_s);
    let mut purged = 0;
    loop {
        match ctx.channels.store.purge_idle_sessions(ttl, SESSIONS).await {
            Ok(ids) => {
                for id in &ids {
                    // Their private channels went with them.
                    ctx.channels
                        .hub
                        .tail
                        .forget(&id.private_channel(), u64::MAX);
                }
                purged += ids.len() as u64;
                metrics::counter!("keel_evictions_total", "kind" => "session_ttl")
                    .increment(ids.len() as u64);
                if ids.len() < SESSIONS {
                    return purged;
                }
            }
            Err(e) => {
                ctx.channels.health.observe_store_error(&e).await;
                return purged;
            }
        }
    }
}

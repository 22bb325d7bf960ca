//! Where channels live: the store's logs and the hub's live fan-out, and the
//! relay's own publishing (upstream messages, send results, exec output,
//! spool jobs) through one path.

use std::sync::Arc;

use crate::upgrade::Utf8Bytes;
use keel_recovery::{Health, ShutdownToken};
use keel_session::{Offset, SessionStore};

use crate::store::RelayStore;

use crate::config::Config;
use crate::hub::Hub;
use crate::protocol;

/// The store, the hub and the health machine the store's errors feed.
#[derive(Clone)]
pub(crate) struct Channels {
    pub(crate) store: RelayStore,
    pub(crate) hub: Arc<Hub>,
    pub(crate) health: Health<RelayStore>,
    /// Cluster mode's bus to the other nodes.
    pub(crate) bus: Option<Arc<crate::bus::Bus>>,
}

impl Channels {
    /// Appends a relay-made message and fans it out; returns its offset.
    /// Idempotent by `msg_id` (a repeat appends and delivers nothing).
    pub(crate) async fn publish_internal(
        &self,
        channel: &str,
        msg_id: &str,
        payload: &[u8],
    ) -> Option<Offset> {
        // The relay's own messages have their own id scope: no client's id
        // can answer for them.
        match self
            .store
            .append_scoped(keel_session::SYSTEM_SCOPE, channel, msg_id, payload)
            .await
        {
            Ok(a) => {
                if !a.duplicate {
                    let frame = protocol::deliver_frame(channel, a.offset, msg_id, payload);
                    self.fan_out(channel, Arc::from(vec![(a.offset, Utf8Bytes::from(frame))]))
                        .await;
                }
                Some(a.offset)
            }
            Err(e) => {
                self.health.observe_store_error(&e).await;
                None
            }
        }
    }

    /// Hands committed messages of `channel`, in offset order, to this
    /// node's subscribers and (in cluster mode) to the other nodes.
    pub(crate) async fn fan_out(&self, channel: &str, batch: Arc<[(u64, Utf8Bytes)]>) {
        self.hub.publish_batch(channel, batch.clone());
        if let Some(bus) = &self.bus {
            bus.publish(channel, &batch).await;
        }
    }

    /// Fans out the message at `offset` that someone else appended (crash
    /// notices written inside another transaction).
    pub(crate) async fn announce(&self, channel: &str, offset: Offset) {
        if let Ok(msgs) = self.store.read_channel(channel, offset, 1).await
            && let Some(m) = msgs.first()
        {
            let frame = protocol::deliver_frame(channel, m.offset, &m.msg_id, &m.payload);
            self.fan_out(channel, Arc::from(vec![(m.offset, Utf8Bytes::from(frame))]))
                .await;
        }
    }
}

/// What the background loops (the upstream sender, the spool, retention)
/// use: the configuration, the channels, the outbox's wake-up and the
/// shutdown signal.
pub(crate) struct BackgroundCtx {
    pub(crate) config: Config,
    pub(crate) channels: Channels,
    pub(crate) outbox_ready: Arc<tokio::sync::Notify>,
    pub(crate) intake: ShutdownToken,
}

//! Workload pieces scenarios share: SDK clients (`keel_relay::client`)
//! whose publishes and deliveries go into the history with their payloads'
//! digests, so that the checker judges them like a raw client's.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::FutureExt;
use keel_relay::client::{Client, ClientConfig, Event};
use serde_json::{Value, json};

use crate::Error;
use crate::history::{ChannelId, Delivery, Digest, Expectation, MsgId, Outcome, Publish, Recorder};
use crate::load::Latency;
use crate::scenario::Measured;

/// Publishes `payload` to `channel` as message `h<who>-<seq>` through the
/// SDK (which re-sends it, same id, until it is answered), waiting at most
/// `limit`, and records the publish. Returns its offset, or why not.
pub(crate) async fn sdk_publish(
    client: &Client,
    r: &Recorder,
    (who, conn): (u32, u32),
    channel: &str,
    seq: u64,
    payload: &Value,
    limit: Duration,
) -> Result<u64, String> {
    let invoke = r.now();
    let answer = tokio::time::timeout(
        limit,
        client.publish(channel, &format!("h{who}-{seq}"), payload),
    )
    .await;
    let (outcome, result) = match answer {
        Ok(Ok(offset)) => (Outcome::Ok { offset }, Ok(offset)),
        Ok(Err(e)) => (
            Outcome::Fail {
                code: e.to_string(),
            },
            Err(e.to_string()),
        ),
        Err(_) => (Outcome::Info, Err(format!("no answer within {limit:?}"))),
    };
    r.publish(Publish {
        client: who,
        conn,
        channel: r.channel(channel),
        id: MsgId::harness(who, seq),
        invoke,
        done: r.now(),
        outcome,
        digest: Digest::of_value(payload),
    });
    result
}

/// A delivery the SDK handed over, as the history records it (its payload
/// hashed as the SDK's publish side hashes it: see [`Digest::of_value`]).
pub(crate) fn sdk_delivery(
    r: &Recorder,
    (sub, conn): (u32, u32),
    channel: ChannelId,
    offset: u64,
    id: &str,
    payload: &Value,
) -> Delivery {
    Delivery {
        sub,
        conn,
        channel,
        offset,
        id: r.id(id),
        at: r.now(),
        digest: Digest::of_value(payload),
    }
}

/// A well-behaved client: publishes to its own channel every 20 ms and
/// receives each message back; counts, and times each publish. Its
/// publishes and deliveries go into the history.
pub(crate) struct Calm {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<Result<CalmSeen, Error>>,
}

/// What the calm client saw.
struct CalmSeen {
    acked: u64,
    errors: u64,
    delivered: u64,
    latency: Latency,
}

/// The calm client's number in the history, as publisher and subscriber.
const CALM: u32 = 900_000;

impl Drop for Calm {
    /// A scenario that ends early (an error, its budget) takes its calm
    /// client down with it.
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Calm {
    pub(crate) async fn start(
        url: &str,
        epoch: tokio::time::Instant,
        r: &Recorder,
    ) -> Result<Calm, Error> {
        let mut client = Client::connect(ClientConfig::new(url))
            .await
            .map_err(|e| Error::Client(format!("calm client: {e}")))?;
        client
            .subscribe("calm", Some(1))
            .await
            .map_err(|e| Error::Client(format!("calm subscribe: {e}")))?;
        let calm = r.channel("calm");
        r.expect(Expectation {
            sub: CALM,
            channel: calm,
            from: 1,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (stop, r) = (stop.clone(), r.clone());
            async move {
                let mut seen = CalmSeen {
                    acked: 0,
                    errors: 0,
                    delivered: 0,
                    latency: Latency::default(),
                };
                let mut batch = Vec::new();
                // The SDK hands each offset over once.
                let mut take = |e: Event, seen: &mut CalmSeen| {
                    if let Event::Deliver {
                        channel,
                        offset,
                        id,
                        payload,
                    } = e
                        && channel == "calm"
                    {
                        seen.delivered += 1;
                        batch.push(sdk_delivery(&r, (CALM, 1), calm, offset, &id, &payload));
                        // Into the history as it goes (a scenario cut short
                        // still shows what arrived), one lock per 64.
                        if batch.len() >= 64 {
                            r.deliveries(&mut batch);
                        }
                    }
                };
                let mut n = 0u64;
                while !stop.load(Ordering::Acquire) {
                    n += 1;
                    let sent = tokio::time::Instant::now();
                    let answer = sdk_publish(
                        &client,
                        &r,
                        (CALM, 1),
                        "calm",
                        n,
                        &json!(n),
                        Duration::from_secs(10),
                    )
                    .await;
                    match answer {
                        Ok(_) => {
                            seen.acked += 1;
                            seen.latency.record(
                                sent.duration_since(epoch),
                                sent.elapsed().as_micros() as u64,
                            );
                        }
                        Err(_) => seen.errors += 1,
                    }
                    while let Some(Some(e)) = client.next_event().now_or_never() {
                        take(e, &mut seen);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // The last ones arrive.
                let until = tokio::time::Instant::now() + Duration::from_secs(5);
                while seen.delivered < seen.acked && tokio::time::Instant::now() < until {
                    if let Ok(Some(e)) =
                        tokio::time::timeout(Duration::from_millis(100), client.next_event()).await
                    {
                        take(e, &mut seen);
                    }
                }
                client.close().await;
                r.deliveries(&mut batch);
                Ok(seen)
            }
        });
        Ok(Calm { stop, task })
    }

    pub(crate) async fn finish(mut self, m: &mut Measured) -> Result<(), Error> {
        self.stop.store(true, Ordering::Release);
        let seen = (&mut self.task)
            .await
            .map_err(|e| Error::Client(format!("calm task: {e}")))??;
        m.set("calm_errors", seen.errors as f64)
            .set(
                "calm_delivered_ratio",
                seen.delivered as f64 / seen.acked.max(1) as f64,
            )
            .set("calm_p99_ms", seen.latency.ms(0.99));
        m.note(format!(
            "the calm client: {} publishes acknowledged, {} failed, {} delivered back; publish p50 {:.1} ms, p99 {:.1} ms",
            seen.acked,
            seen.errors,
            seen.delivered,
            seen.latency.ms(0.5),
            seen.latency.ms(0.99)
        ));
        m.latency = Some(seen.latency);
        Ok(())
    }
}

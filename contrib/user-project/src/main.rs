//! `keel-user-project WS_URL`: 20 publishes paced at 10/s by keel-ratelimit
//! through keel-client; a second client must receive each, in order.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use keel_client::{Client, ClientConfig, Event, new_message_id};
use keel_ratelimit::{Config, Delivery, Quota, SendOutcome, SendQueue, Sink};

/// Publishes to the channel named by the key.
struct Relay(Arc<Client>);

impl Sink<String, serde_json::Value> for Relay {
    async fn send(&self, channel: &String, payload: &serde_json::Value) -> SendOutcome {
        match self.0.publish(channel, &new_message_id(), payload).await {
            Ok(_) => SendOutcome::Sent,
            Err(e) => SendOutcome::Failed {
                retryable: true,
                error: e.to_string(),
            },
        }
    }
}

#[tokio::main]
async fn main() {
    let url = std::env::args()
        .nth(1)
        .expect("usage: keel-user-project WS_URL");
    let mut reader = Client::connect(ClientConfig::new(&url))
        .await
        .expect("connect");
    reader.subscribe("paced", Some(1)).await.expect("subscribe");
    let writer = Arc::new(
        Client::connect(ClientConfig::new(&url))
            .await
            .expect("connect"),
    );
    let config = Config {
        global: vec![Quota::per_second(NonZeroU32::new(10).unwrap())],
        ..Config::default()
    };
    let (queue, _dead) = SendQueue::new(Relay(writer), config);
    let mut receipts = Vec::new();
    for i in 0..20 {
        let receipt = queue
            .submit("paced".to_owned(), serde_json::json!({ "i": i }))
            .await
            .expect("queued");
        receipts.push(receipt);
    }
    for r in receipts {
        assert!(
            matches!(r.await, Delivery::Sent { .. }),
            "every publish sent"
        );
    }
    let mut seen = Vec::new();
    while seen.len() < 20 {
        match tokio::time::timeout(Duration::from_secs(10), reader.next_event()).await {
            Ok(Some(Event::Deliver { payload, .. })) => seen.push(payload["i"].as_u64().unwrap()),
            Ok(Some(_)) => {}
            other => panic!("no delivery within 10 s: {other:?} after {seen:?}"),
        }
    }
    assert_eq!(seen, (0..20).collect::<Vec<u64>>(), "every one, in order");
    println!("keel-user-project: 20 paced publishes delivered in order");
}

//! 1,000 clients lose the server at once: their reconnects spread out.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_reconnect::{Backoff, Config, ReconnectingClient, State};
use tokio::time::Instant;

use crate::support::{Acks, ServerMode, proxy_to, server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thundering_herd_spread() {
    let (addr, _seen) = server(ServerMode::default()).await;
    let proxy = proxy_to(addr).await;
    let window = Duration::from_millis(1_000);
    let attempts: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let mut clients = Vec::new();
    for i in 0..1_000u64 {
        let config = Config {
            backoff: Backoff {
                base: window,
                cap: window,
                jitter: true,
                seed: i,
                ..Backoff::default()
            },
            ..Config::default()
        };
        let (client, _in) =
            ReconnectingClient::start(format!("ws://{}/", proxy.listen_addr()), Acks, config);
        clients.push(client);
    }
    for c in &clients {
        let mut s = c.state();
        tokio::time::timeout(
            Duration::from_secs(20),
            s.wait_for(|s| *s == State::Connected),
        )
        .await
        .unwrap()
        .unwrap();
    }
    // Record when each client starts its next attempt.
    for c in &clients {
        let mut log = c.transitions();
        let attempts = attempts.clone();
        tokio::spawn(async move {
            while let Ok(s) = log.recv().await {
                if s == State::Connecting {
                    attempts.lock().unwrap().push(Instant::now());
                    return;
                }
            }
        });
    }
    let cut_at = Instant::now();
    assert_eq!(proxy.cut(), 1_000);
    tokio::time::sleep(window + Duration::from_millis(500)).await;

    let mut offsets: Vec<Duration> = attempts
        .lock()
        .unwrap()
        .iter()
        .map(|t| *t - cut_at)
        .collect();
    offsets.sort();
    assert_eq!(
        offsets.len(),
        1_000,
        "every client tried again within the window"
    );
    // Spread: buckets of 100 ms, none with more than a quarter of the herd
    // (all at once would put 100% in one). Noticing the cut takes the clients
    // a little while, so the window is counted generously.
    let mut buckets = [0usize; 20];
    for o in &offsets {
        buckets[(o.as_millis() as usize / 100).min(19)] += 1;
    }
    assert!(
        buckets.iter().all(|&b| b < 250),
        "attempts bunched: {buckets:?}"
    );
    let span = *offsets.last().unwrap() - offsets[0];
    assert!(
        span > Duration::from_millis(800),
        "attempts spread over only {span:?}: {buckets:?}"
    );
}

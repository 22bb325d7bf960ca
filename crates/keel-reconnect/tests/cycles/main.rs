//! 100 disconnect cycles in a process of their own, so that its task and
//! memory counts are this test's alone.

#[path = "../it/support.rs"]
#[allow(dead_code)]
mod support;

use std::time::Duration;

use futures::future::join_all;
use keel_reconnect::{Config, ReconnectingClient, State};

use crate::support::{
    Acks, ServerMode, fast, next_matching, proxy_to, seq, server, url, wait_connected,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multiple_disconnect_cycles() {
    let (addr, seen) = server(ServerMode::default()).await;
    let proxy = proxy_to(addr).await;
    let mut config = fast(Config::default());
    config.backoff.base = Duration::from_millis(5);
    config.backoff.cap = Duration::from_millis(20);
    let (client, _in) = ReconnectingClient::start(url(proxy.listen_addr()), Acks, config);
    let mut state = client.state();
    wait_connected(&mut state).await;
    let tasks_before = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    let rss_before = keel_faults::sample(std::process::id(), Duration::ZERO)
        .unwrap()
        .rss_bytes;

    let mut handles = Vec::new();
    let mut next = 0u64;
    for cycle in 0..100 {
        for _ in 0..5 {
            let (m, k) = seq(next);
            handles.push(client.send(m, k).await.unwrap());
            next += 1;
        }
        if cycle % 2 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut log = client.transitions();
        proxy.cut();
        next_matching(
            &mut log,
            |s| matches!(s, State::Disconnected { .. }),
            Duration::from_secs(5),
        )
        .await;
        next_matching(&mut log, |s| *s == State::Connected, Duration::from_secs(5)).await;
    }
    for h in join_all(handles.into_iter().map(|h| h.acked())).await {
        assert_eq!(h, Ok(()));
    }
    let seqs = seen.lock().unwrap().seqs();
    // At least once on the wire (an ack lost in a cut means one resend); the
    // first arrival of each message is in order and none is missing.
    let mut first = Vec::new();
    let mut have = std::collections::HashSet::new();
    for s in seqs {
        if have.insert(s) {
            first.push(s);
        }
    }
    assert_eq!(
        first,
        (0..500).collect::<Vec<_>>(),
        "no message lost, order kept"
    );
    assert!(client.counters().drops >= 100);
    assert_eq!(
        client.buffered(),
        (0, 0),
        "every message acknowledged and released"
    );

    tokio::time::sleep(Duration::from_millis(200)).await;
    let tasks_after = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    assert!(
        tasks_after <= tasks_before + 2,
        "tasks grew from {tasks_before} to {tasks_after}"
    );
    let rss_after = keel_faults::sample(std::process::id(), Duration::ZERO)
        .unwrap()
        .rss_bytes;
    assert!(
        rss_after < rss_before + (32 << 20),
        "RSS grew from {rss_before} to {rss_after}"
    );
}

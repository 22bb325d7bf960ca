//! Reconnecting for real: cuts, blackholes, stalls, closes, resume order.

use std::time::Duration;

use keel_faults::{Stream, Toxic, ToxicKind};
use keel_reconnect::{Config, ReconnectingClient, State};
use tokio::time::Instant;

use crate::support::{
    Acks, Rig, ServerMode, connected_rig, fast, next_matching, proxy_to, seq, server, url,
    wait_connected, wait_for, wait_until,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_drop_and_reconnect() {
    let Rig { proxy, client, .. } = connected_rig(fast(Config::default())).await;
    let mut log = client.transitions();

    // The link is cut and the server stays unreachable for four attempts.
    proxy.set_enabled(false);
    let mut backoffs = Vec::new();
    let mut kinds = Vec::new();
    while backoffs.len() < 4 {
        let s = tokio::time::timeout(Duration::from_secs(3), log.recv())
            .await
            .unwrap()
            .unwrap();
        if let State::Backoff { attempt, delay, .. } = &s {
            backoffs.push((*attempt, *delay));
        }
        kinds.push(s.to_string());
    }
    assert_eq!(&kinds[..3], ["Disconnected", "Backoff", "Connecting"]);
    let ms = Duration::from_millis;
    assert_eq!(
        backoffs,
        [(1, ms(50)), (2, ms(100)), (3, ms(200)), (4, ms(400))],
        "1, 2, 4, 8 x base, no jitter"
    );

    proxy.set_enabled(true);
    let mut rest = Vec::new();
    loop {
        let s = tokio::time::timeout(Duration::from_secs(3), log.recv())
            .await
            .unwrap()
            .unwrap();
        rest.push(s.to_string());
        if s == State::Connected {
            break;
        }
    }
    assert_eq!(
        &rest[rest.len() - 3..],
        ["Connecting", "Resuming", "Connected"]
    );
    let c = client.counters();
    assert!(c.connects >= 2 && c.drops >= 1, "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_buffer_during_disconnect() {
    let Rig {
        seen,
        proxy,
        client,
        mut state,
    } = connected_rig(fast(Config::default())).await;

    // 50 messages are written into a link that no longer delivers.
    proxy
        .add_toxic(Toxic::new(
            "hole",
            Stream::Upstream,
            ToxicKind::Timeout { timeout: 0 },
        ))
        .unwrap();
    let mut handles = Vec::new();
    for n in 0..50 {
        let (m, k) = seq(n);
        handles.push(client.send(m, k).await.unwrap());
    }
    for h in handles.iter_mut() {
        h.written().await.unwrap();
    }
    // Disconnect; 10 more are sent while down; then the network returns.
    proxy.set_enabled(false);
    wait_for(
        &mut state,
        |s| matches!(s, State::Backoff { .. }),
        Duration::from_secs(2),
    )
    .await;
    for n in 50..60 {
        let (m, k) = seq(n);
        handles.push(client.send(m, k).await.unwrap());
    }
    assert_eq!(
        client.buffered().0,
        60,
        "nothing acknowledged, nothing lost"
    );
    proxy.reset();
    for h in handles {
        tokio::time::timeout(Duration::from_secs(5), h.acked())
            .await
            .unwrap()
            .unwrap();
    }
    let seqs = seen.lock().unwrap().seqs();
    assert_eq!(
        seqs,
        (0..60).collect::<Vec<_>>(),
        "all 60 once each, in order"
    );
    assert!(client.counters().resends >= 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_detected() {
    let mut config = fast(Config::default());
    config.ping_interval = Duration::from_millis(100);
    config.liveness_timeout = Duration::from_millis(400);
    let Rig {
        proxy,
        client,
        mut state,
        ..
    } = connected_rig(config).await;

    // Both directions blackholed, nothing closed: a half-open link.
    let mut log = client.transitions();
    let started = Instant::now();
    proxy
        .add_toxic(Toxic::new(
            "up",
            Stream::Upstream,
            ToxicKind::Timeout { timeout: 0 },
        ))
        .unwrap();
    proxy
        .add_toxic(Toxic::new(
            "down",
            Stream::Downstream,
            ToxicKind::Timeout { timeout: 0 },
        ))
        .unwrap();
    let s = next_matching(
        &mut log,
        |s| matches!(s, State::Disconnected { .. }),
        Duration::from_secs(2),
    )
    .await;
    let took = started.elapsed();
    assert!(
        matches!(&s, State::Disconnected { reason } if reason.contains("half-open")),
        "{s:?}"
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(1_200),
        "declared dead after {took:?}"
    );

    proxy.reset();
    wait_for(
        &mut state,
        |s| *s == State::Connected,
        Duration::from_secs(3),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_write_detected() {
    let (addr, _seen) = server(ServerMode {
        deaf: true,
        ..ServerMode::default()
    })
    .await;
    let mut config = fast(Config::default());
    config.write_timeout = Duration::from_millis(300);
    config.liveness_timeout = Duration::from_secs(30);
    config.buffer.max_bytes = 64 << 20;
    // A deaf server never welcomes: skip the handshake with the plain protocol.
    let (client, _in) = ReconnectingClient::start(url(addr), keel_reconnect::Plain, config);
    let mut state = client.state();
    wait_connected(&mut state).await;
    let mut log = client.transitions();
    for _ in 0..40 {
        client
            .send(keel_reconnect::Message::binary(vec![0u8; 1 << 20]), None)
            .await
            .unwrap();
    }
    let s = next_matching(
        &mut log,
        |s| matches!(s, State::Disconnected { .. }),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        matches!(&s, State::Disconnected { reason } if reason.contains("stalled")),
        "{s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fatal_close_stops() {
    let (addr, seen) = server(ServerMode {
        close_with: Some(1008),
        ..ServerMode::default()
    })
    .await;
    let (client, _in) =
        ReconnectingClient::start(url(addr), keel_reconnect::Plain, fast(Config::default()));
    let mut state = client.state();
    let s = wait_for(
        &mut state,
        |s| matches!(s, State::Closed { .. }),
        Duration::from_secs(2),
    )
    .await;
    assert!(
        matches!(&s, State::Closed { reason } if reason.contains("1008")),
        "{s:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        seen.lock().unwrap().connections,
        1,
        "no reconnect after a fatal close"
    );
    assert!(
        client
            .send(keel_reconnect::Message::text("late"), None)
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_before_flush() {
    let (addr, seen) = server(ServerMode {
        welcome_delay: Duration::from_millis(200),
        ..ServerMode::default()
    })
    .await;
    let proxy = proxy_to(addr).await;
    proxy.set_enabled(false);
    let (client, _in) =
        ReconnectingClient::start(url(proxy.listen_addr()), Acks, fast(Config::default()));
    // Messages buffered before any link exists.
    let mut handles = Vec::new();
    for n in 0..5 {
        let (m, k) = seq(n);
        handles.push(client.send(m, k).await.unwrap());
    }
    proxy.set_enabled(true);
    for h in handles {
        tokio::time::timeout(Duration::from_secs(5), h.acked())
            .await
            .unwrap()
            .unwrap();
    }
    let seen = seen.lock().unwrap();
    assert_eq!(seen.frames[0].1, "hello", "the resume handshake goes first");
    let welcome = seen.welcomes[0];
    for (at, frame) in &seen.frames[1..] {
        assert!(
            *at >= welcome,
            "{frame} arrived before the resume completed"
        );
    }
    assert_eq!(seen.seqs(), [0, 1, 2, 3, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_now_skips_the_wait() {
    let (addr, _seen) = server(ServerMode::default()).await;
    let mut config = fast(Config::default());
    config.backoff.base = Duration::from_secs(30);
    config.backoff.cap = Duration::from_secs(30);
    let proxy = proxy_to(addr).await;
    let (client, _in) = ReconnectingClient::start(url(proxy.listen_addr()), Acks, config);
    let mut state = client.state();
    wait_connected(&mut state).await;
    proxy.cut();
    wait_for(
        &mut state,
        |s| matches!(s, State::Backoff { .. }),
        Duration::from_secs(2),
    )
    .await;
    client.reconnect_now();
    wait_connected(&mut state).await;
    wait_until(Duration::from_secs(1), || client.counters().connects == 2).await;
}

/// A message the peer drops the link over is re-sent first on every link
/// and every link dies with it: `lost_links` counts them (only links it
/// was written on), so that its sender can take it back; then the rest
/// goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_lost_with_a_message_outstanding_are_counted() {
    let (addr, seen) = server(ServerMode {
        drop_on_seq: Some(7),
        ..ServerMode::default()
    })
    .await;
    let (client, _frames) =
        keel_reconnect::ReconnectingClient::start(url(addr), Acks, fast(Config::default()));
    let mut state = client.state();
    wait_connected(&mut state).await;
    let (m, k) = seq(7);
    let _poison = client.send(m, k).await.unwrap();
    let (m, k) = seq(8);
    let fine = client.send(m, k).await.unwrap();
    wait_until(Duration::from_secs(10), || {
        client.lost_links("7").is_some_and(|l| l.first >= 3)
    })
    .await;
    assert!(client.counters().drops >= 3);
    let behind = client.lost_links("8").expect("8 is buffered");
    assert_eq!(behind.first, 0, "8 was behind 7 on every link");
    assert!(client.lost_links("99").is_none(), "no such message");
    assert_eq!(client.withdraw("7"), 1);
    tokio::time::timeout(Duration::from_secs(5), fine.acked())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(client.lost_links("8"), None, "acknowledged: gone");
    assert_eq!(seen.lock().unwrap().seqs(), [8], "7 never answered, 8 once");

    // Alone on the link: counted as alone.
    let (m, k) = seq(7);
    let _poison = client.send(m, k).await.unwrap();
    wait_until(Duration::from_secs(10), || {
        client.lost_links("7").is_some_and(|l| l.alone >= 2)
    })
    .await;
}

//! Sends through the outbox to a mock upstream that rate-limits and goes down.

use std::collections::HashSet;
use std::time::Duration;

use keel_faults::{MockUpstream, UpstreamConfig, UpstreamMode};
use keel_relay::client::{Client, Event};
use serde_json::json;

use crate::support::*;

/// Waits until the client has seen `n` `send_result` notices; returns their statuses by id.
async fn results(client: &mut Client, n: usize, limit: Duration) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while out.len() < n {
        let Ok(Some(e)) = tokio::time::timeout_at(deadline, client.next_event()).await else {
            break;
        };
        if let Event::Deliver { payload, .. } = e
            && payload["type"] == "send_result"
        {
            out.push((
                payload["id"].as_str().unwrap().to_owned(),
                payload["status"].as_str().unwrap().to_owned(),
            ));
        }
    }
    out
}

fn sending_config(global_rate: u32) -> String {
    format!(
        "[sending]\nglobal_rate = {global_rate}\nper_recipient_rate = 50\nper_recipient_burst = 50\nbackoff_base_ms = 200\nbackoff_cap_ms = 2000\nanswer_timeout_ms = 2000\nmax_attempts = 1000\n"
    )
}

/// A mock upstream allowing `rate`/s (burst `burst`) and a relay sending to it
/// at up to `relay_rate`/s.
async fn relay_with_upstream(
    rate: f64,
    burst: f64,
    relay_rate: u32,
) -> (MockUpstream, tempfile::TempDir, RelayProcess) {
    relay_on(
        UpstreamConfig {
            global_rate: rate,
            global_burst: burst,
            // A send the relay dispatched before a 429 reached it may wait a
            // while on a loaded machine before it is written: not early.
            in_flight_grace: Duration::from_millis(200),
            ..Default::default()
        },
        sending_config(relay_rate),
    )
    .await
}

/// A relay whose `[sending]` section is `config`, on a mock upstream that
/// allows 1,000 sends/s: the tests of its link's failures.
async fn relay_with_fast_upstream(config: &str) -> (MockUpstream, tempfile::TempDir, RelayProcess) {
    let up = UpstreamConfig {
        global_rate: 1000.0,
        global_burst: 1000.0,
        ..Default::default()
    };
    relay_on(up, config.to_owned()).await
}

/// A mock upstream started with `up` and a relay with `config` sending to it.
async fn relay_on(
    up: UpstreamConfig,
    config: String,
) -> (MockUpstream, tempfile::TempDir, RelayProcess) {
    let up = MockUpstream::start(up).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(
        &dir.path().join("data"),
        Opts {
            upstream: Some(up.url()),
            config: Some(config),
            ..Default::default()
        },
    )
    .await;
    (up, dir, relay)
}

#[tokio::test]
async fn upstream_429_storm_exactly_once() {
    // The relay believes it may send 200/s: the upstream answers 429 hard.
    let (up, _dir, relay) = relay_with_upstream(10.0, 5.0, 200).await;
    let mut c = client(&relay.url()).await;
    let n = 40;
    let ids: Vec<String> = (0..n).map(|i| format!("s-{i:03}")).collect();
    for (i, id) in ids.iter().enumerate() {
        c.send(id, &format!("user-{}", i % 4), &json!({"n": i}))
            .await
            .unwrap();
    }
    let done = results(&mut c, n, Duration::from_secs(60)).await;
    assert_eq!(done.len(), n, "every send finished: {done:?}");
    assert!(done.iter().all(|(_, s)| s == "SENT"), "{done:?}");

    let accepted: Vec<String> = up.accepted().into_iter().map(|a| send_key(&a.id)).collect();
    let unique: HashSet<&String> = accepted.iter().collect();
    assert_eq!(unique.len(), accepted.len(), "each accepted once");
    assert_eq!(unique, ids.iter().collect::<HashSet<_>>(), "all of them");
    assert!(up.rate_limited() > 0, "the upstream did limit");
    assert!(
        up.early_sends().is_empty(),
        "nothing sent before its retry_after: {:?}",
        up.early_sends()
    );
    println!(
        "429 answers: {}, duplicates re-sent: {}",
        up.rate_limited(),
        up.duplicates().len()
    );
}

#[tokio::test]
async fn upstream_outage_then_sync() {
    let outage = Duration::from_secs(
        std::env::var("KEEL_OUTAGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(30),
    );
    let (up, _dir, relay) = relay_with_upstream(1000.0, 1000.0, 1000).await;
    let mut c = client(&relay.url()).await;
    for i in 0..20 {
        c.send(&format!("a-{i:02}"), "bob", &json!(i))
            .await
            .unwrap();
    }
    assert_eq!(results(&mut c, 20, Duration::from_secs(30)).await.len(), 20);

    // Down for the outage, with sends arriving all along.
    up.set_mode(UpstreamMode::Down);
    let health = format!("http://{}/healthz", relay.addr);
    let started = tokio::time::Instant::now();
    let mut sent_during = 0;
    let mut saw_degraded = false;
    while started.elapsed() < outage {
        c.send(&format!("b-{sent_during:03}"), "bob", &json!(sent_during))
            .await
            .unwrap();
        sent_during += 1;
        if !saw_degraded {
            saw_degraded = http_get(&health).await.contains("DEGRADED");
        }
        tokio::time::sleep(outage / 30).await;
    }
    assert!(saw_degraded, "health showed the upstream outage");
    assert_eq!(up.accepted().len(), 20, "nothing accepted while down");
    up.set_mode(UpstreamMode::Normal);

    let done = results(&mut c, sent_during, Duration::from_secs(60)).await;
    assert_eq!(
        done.len(),
        sent_during,
        "all sent after the upstream returned"
    );
    let accepted: Vec<String> = up.accepted().into_iter().map(|a| send_key(&a.id)).collect();
    assert_eq!(accepted.len(), 20 + sent_during, "nothing lost");
    assert_eq!(
        accepted.iter().collect::<HashSet<_>>().len(),
        accepted.len(),
        "no id accepted twice"
    );
    assert!(
        up.duplicates().is_empty(),
        "no duplicate sends: {:?}",
        up.duplicates()
    );
    assert!(http_get(&health).await.contains("OPERATIONAL"));
}

#[tokio::test]
async fn upstream_messages_reach_the_private_channel() {
    let (up, _dir, relay) = relay_with_upstream(1000.0, 1000.0, 1000).await;
    let mut c = client(&relay.url()).await;
    let me = c.session_id().unwrap();
    let private = format!("session:{me}");
    // Wait until the relay's upstream link is up, then push one for us and
    // one for a session that does not exist.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while up.push("carol", &me, json!({"text": "hi"})) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "relay never connected upstream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    up.push("carol", "nobody", json!("lost"));
    let got = loop {
        let e = tokio::time::timeout_at(deadline, c.next_event())
            .await
            .unwrap()
            .unwrap();
        if let Event::Deliver {
            channel, payload, ..
        } = e
            && channel == private
            && payload["type"] == "upstream_message"
        {
            break payload;
        }
    };
    assert_eq!(got["from"], "carol");
    assert_eq!(got["body"]["text"], "hi");
    assert!(got["id"].as_str().unwrap().starts_with("m-"));
}

/// The client's send id in the id the upstream sees: `session:<id>/<key>`.
fn send_key(upstream_id: &str) -> String {
    let (scope, key) = upstream_id
        .split_once('/')
        .expect("upstream ids are <scope>/<key>");
    let session = scope.strip_prefix("session:").expect("a session's scope");
    assert_eq!(session.len(), 32, "a session id: {upstream_id}");
    key.to_owned()
}

/// An upstream that stalls on a live link (answers nothing, never closes):
/// each unanswered send times out, the link is redialled and the send is
/// written again, so once it answers every send ends SENT — without the
/// redial the sends waited on the old link until they went DEAD.
#[tokio::test]
async fn a_stalled_upstream_link_is_redialled() {
    let (up, _dir, relay) = relay_with_fast_upstream("[sending]\nper_recipient_rate = 100\nper_recipient_burst = 100\nanswer_timeout_ms = 300\nbackoff_base_ms = 50\nbackoff_cap_ms = 200\nmax_attempts = 20\n").await;
    let mut c = client(&relay.url()).await;
    up.set_mode(UpstreamMode::Stall);
    for i in 0..5 {
        c.send(&format!("stalled-{i}"), "bob", &json!(i))
            .await
            .unwrap();
    }
    // Several answer timeouts on the stalled link.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let connections = up.connections();
    up.set_mode(UpstreamMode::Normal);
    let done = results(&mut c, 5, Duration::from_secs(20)).await;
    assert_eq!(done.len(), 5);
    assert!(
        done.iter().all(|(_, s)| s == "SENT"),
        "every send SENT after the stall: {done:?}"
    );
    assert!(connections > 1, "the stalled link was redialled");
    assert_eq!(up.accepted().len(), 5);
}

/// Tries while the upstream link is down are not attempts: with two
/// attempts allowed, sends queued through a 3 s outage (about ten answer
/// timeouts) still end SENT, each accepted once, once the upstream is back.
/// Counted as attempts, they went DEAD during the outage (seen as a red
/// `concurrent_transitions`: a flapping upstream used up sends' attempts).
#[tokio::test]
async fn tries_while_the_upstream_is_down_use_no_attempts() {
    let (up, _dir, relay) = relay_with_fast_upstream("[sending]\nper_recipient_rate = 100\nper_recipient_burst = 100\nanswer_timeout_ms = 300\nbackoff_base_ms = 50\nbackoff_cap_ms = 100\nmax_attempts = 2\n").await;
    let mut c = client(&relay.url()).await;
    up.set_mode(UpstreamMode::Down);
    for i in 0..3 {
        c.send(&format!("waiting-{i}"), &format!("r{i}"), &json!(i))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    up.set_mode(UpstreamMode::Normal);
    let done = results(&mut c, 3, Duration::from_secs(20)).await;
    assert_eq!(done.len(), 3);
    assert!(
        done.iter().all(|(_, s)| s == "SENT"),
        "every send SENT after the outage: {done:?}"
    );
    assert_eq!(up.accepted().len(), 3);
}

/// A send whose frame makes the upstream drop the link (a poison frame):
/// the client re-sends it first on every new link, so every link dies and
/// nothing else gets through, and no try of it is an attempt (none gets an
/// answer on a live link). After three lost links it is taken back and
/// tried alone: then a lost link is its attempt, it ends DEAD, and the
/// sends to other recipients are all SENT. Once it is DEAD the frame is
/// no longer written, so the link stays up. (Without the isolation
/// nothing at all was SENT within 20 s.)
#[tokio::test]
async fn a_send_the_upstream_drops_the_link_over_ends_dead() {
    let (up, _dir, relay) = relay_with_fast_upstream("[sending]\nper_recipient_rate = 100\nper_recipient_burst = 100\nanswer_timeout_ms = 300\nbackoff_base_ms = 50\nbackoff_cap_ms = 100\nmax_attempts = 2\n").await;
    up.set_poison_recipient(Some("mallory"));
    let mut c = client(&relay.url()).await;
    c.send("poison", "mallory", &json!("x")).await.unwrap();
    for i in 0..5 {
        c.send(&format!("fine-{i}"), &format!("r{i}"), &json!(i))
            .await
            .unwrap();
    }
    let mut done = results(&mut c, 6, Duration::from_secs(20)).await;
    done.sort();
    let expected: Vec<(String, String)> = (0..5)
        .map(|i| (format!("fine-{i}"), "SENT".to_owned()))
        .chain([("poison".to_owned(), "DEAD".to_owned())])
        .collect();
    assert_eq!(done, expected);
    assert!(
        up.poisoned() >= 2,
        "the poison frame was tried more than once: {}",
        up.poisoned()
    );
    assert!(metric(&relay, "keel_upstream_suspect_sends_total").await >= 1.0);
    assert_eq!(
        metric(&relay, "keel_upstream_links_lost_alone_total").await,
        2.0,
        "its two attempts, each a link lost with it alone"
    );
    let accepted: Vec<String> = up.accepted().into_iter().map(|a| a.to).collect();
    assert_eq!(accepted.len(), 5, "{accepted:?}");
    assert!(!accepted.contains(&"mallory".to_owned()));
    // DEAD: not written again on any later link.
    let poisoned = up.poisoned();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(up.poisoned(), poisoned, "the DEAD frame was written again");
}

/// A send that went DEAD is withdrawn from the upstream client's buffer:
/// the frame of its last attempt is not written on a later link (the
/// session was told DEAD; the upstream must not get it after that).
#[tokio::test]
async fn a_dead_send_is_not_sent_later() {
    let (up, _dir, relay) = relay_with_fast_upstream("[sending]\nper_recipient_rate = 100\nper_recipient_burst = 100\nanswer_timeout_ms = 300\nmax_attempts = 1\n").await;
    let mut c = client(&relay.url()).await;
    up.set_mode(UpstreamMode::Stall);
    c.send("doomed", "bob", &json!(1)).await.unwrap();
    let done = results(&mut c, 1, Duration::from_secs(10)).await;
    assert_eq!(done, [("doomed".to_owned(), "DEAD".to_owned())]);
    // A new link: whatever is still buffered is written on it.
    let before = up.connections();
    up.set_mode(UpstreamMode::Down);
    tokio::time::sleep(Duration::from_millis(300)).await;
    up.set_mode(UpstreamMode::Normal);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(up.connections() > before, "the upstream link came back");
    assert!(
        up.accepted().is_empty(),
        "a DEAD send reached the upstream: {:?}",
        up.accepted()
    );
}

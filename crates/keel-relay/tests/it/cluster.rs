//! Cluster mode with real engines: relay nodes as processes on one
//! PostgreSQL database (fresh per test, dropped after) and the NATS server.
//! Ignored unless asked for (`cargo test -- --include-ignored`, as CI
//! does); asked for, a missing engine fails them.

use std::time::Duration;

use keel_relay::client::{Client, ClientConfig, Event};
use keel_session_pg::testing::{TestDatabase, nats_available, nats_url};
use tokio_postgres::NoTls;

use crate::support::{Opts, RelayProcess, collect, send_result};

fn node_config(db: &TestDatabase, node: &str) -> String {
    format!(
        "[store]\nbackend = \"postgres\"\nurl = \"{}\"\npool_size = 4\n\
         [cluster]\nnats_url = \"{}\"\nnode_id = \"{node}\"\n\
         heartbeat_ms = 200\nlease_ms = 1000\ncatch_up_ms = 200\n",
        db.url,
        nats_url()
    )
}

async fn node(dir: &std::path::Path, db: &TestDatabase, id: &str) -> RelayProcess {
    RelayProcess::start(
        &dir.join(id),
        Opts {
            config: Some(node_config(db, id)),
            ..Opts::default()
        },
    )
    .await
}

async fn engines() -> Option<TestDatabase> {
    if !nats_available().await {
        return None;
    }
    TestDatabase::create().await
}

/// (state, crash_count, node) of a session, read from the database.
async fn stored(db: &TestDatabase, id: &str) -> (String, i32, Option<String>) {
    let (client, conn) = tokio_postgres::connect(&db.url, NoTls).await.unwrap();
    tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT state, crash_count, node FROM sessions WHERE id = $1",
            &[&id],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

async fn welcome_state(client: &mut Client) -> String {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), client.next_event()).await {
            Ok(Some(Event::Welcome { state, .. })) => return state,
            Ok(Some(_)) => continue,
            other => panic!("no welcome: {other:?}"),
        }
    }
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A publish on one node reaches a subscriber on another, in order, each
/// message once; the subscriber's node reads gaps from the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL and NATS on 127.0.0.1: cargo test -- --include-ignored"]
async fn a_publish_on_one_node_reaches_a_subscriber_on_another() {
    let Some(db) = engines().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        node(dir.path(), &db, "a").await,
        node(dir.path(), &db, "b").await,
    );
    let mut reader = Client::connect(ClientConfig::new(&b.url())).await.unwrap();
    reader.subscribe("room", Some(1)).await.unwrap();
    let writer = Client::connect(ClientConfig::new(&a.url())).await.unwrap();
    for i in 0..50 {
        let offset = writer
            .publish("room", &format!("m{i}"), &serde_json::json!({ "i": i }))
            .await
            .unwrap();
        assert_eq!(offset, i + 1);
    }
    let got = collect(&mut reader, "room", 50, Duration::from_secs(15)).await;
    let offsets: Vec<u64> = got.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, (1..=50).collect::<Vec<_>>());
}

/// Resuming a session on another node closes its connection on the first
/// (4001) and moves it; killing a node with a connected session gets that
/// session CRASHED once, with one notice, by the survivor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL and NATS on 127.0.0.1: cargo test -- --include-ignored"]
async fn sessions_move_between_nodes_and_a_dead_nodes_sessions_crash_once() {
    let Some(db) = engines().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        node(dir.path(), &db, "a").await,
        node(dir.path(), &db, "b").await,
    );

    let mut first = Client::connect(ClientConfig::new(&a.url())).await.unwrap();
    assert_eq!(welcome_state(&mut first).await, "CREATED");
    let (id, token) = (first.session_id().unwrap(), first.token().unwrap());
    assert_eq!(
        stored(&db, &id).await,
        ("ACTIVE".into(), 0, Some("a".into()))
    );
    let mut moved = Client::connect(ClientConfig {
        token: Some(token),
        ..ClientConfig::new(&b.url())
    })
    .await
    .unwrap();
    assert_eq!(welcome_state(&mut moved).await, "ACTIVE");
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(10), first.next_event()).await {
            Ok(Some(Event::Disconnected { reason })) => break reason,
            Ok(Some(_)) => continue,
            other => panic!("node a did not close the old connection: {other:?}"),
        }
    };
    assert!(closed.contains("4001"), "closed as replaced: {closed}");
    first.close().await;
    assert_eq!(
        stored(&db, &id).await,
        ("ACTIVE".into(), 0, Some("b".into()))
    );

    // A session connected to a when it is killed.
    let victim = Client::connect(ClientConfig::new(&a.url())).await.unwrap();
    let victim_id = victim.session_id().unwrap();
    a.kill9().await;
    wait_for("b recovers a's session", async || {
        stored(&db, &victim_id).await.0 == "CRASHED"
    })
    .await;
    // Leases keep being checked: still crashed once.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(stored(&db, &victim_id).await.1, 1);
    assert_eq!(
        stored(&db, &id).await,
        ("ACTIVE".into(), 0, Some("b".into()))
    );
    drop(victim);
    // One notice in its private channel.
    let (client, conn) = tokio_postgres::connect(&db.url, NoTls).await.unwrap();
    tokio::spawn(conn);
    let notices: Vec<String> = client
        .query(
            "SELECT msg_id FROM messages WHERE channel = $1",
            &[&format!("session:{victim_id}")],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(notices, vec!["crash-notice-1".to_string()]);
    let _ = b.terminate().await;
}

/// `doctor --postgres` lists a DEAD send of the shared store and exits 1;
/// `redrive --postgres` re-queues it; the doctor is then healthy (exit 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL and NATS on 127.0.0.1: cargo test -- --include-ignored"]
async fn redrive_requeues_dead_sends_in_postgres() {
    use keel_faults::{MockUpstream, UpstreamConfig, UpstreamMode};
    let Some(db) = engines().await else {
        return;
    };
    let up = MockUpstream::start(UpstreamConfig::default())
        .await
        .unwrap();
    up.set_mode(UpstreamMode::Garbage);
    let dir = tempfile::tempdir().unwrap();
    let a = RelayProcess::start(
        &dir.path().join("a"),
        Opts {
            upstream: Some(up.url()),
            config: Some(format!(
                "{}[sending]\nmax_attempts = 1\nanswer_timeout_ms = 300\n",
                node_config(&db, "a")
            )),
            ..Opts::default()
        },
    )
    .await;
    let mut c = Client::connect(ClientConfig::new(&a.url())).await.unwrap();
    c.send("doomed-pg", "bob", &serde_json::json!("hello"))
        .await
        .unwrap();
    assert_eq!(send_result(&mut c).await, "DEAD");
    c.close().await;
    a.terminate().await;

    let (code, text) = crate::doctor::run_code(&["doctor", "--postgres", &db.url]);
    assert_eq!(code, 1, "{text}");
    assert!(
        text.contains("key=doomed-pg") && text.contains("dead 1"),
        "{text}"
    );
    let (code, text) = crate::doctor::run_code(&["redrive", "--postgres", &db.url]);
    assert_eq!(code, 0, "{text}");
    assert!(text.contains("re-queued 1 DEAD sends"), "{text}");
    let (code, text) = crate::doctor::run_code(&["doctor", "--postgres", &db.url]);
    assert!(
        text.contains("pending 1") && text.contains("dead 0"),
        "{text}"
    );
    assert_eq!(code, 0, "{text}");
}

//! wss:// with a certificate authority made in the test: trusted when the
//! caller trusts it, refused otherwise, never downgraded to plaintext.

#[cfg(feature = "tls")]
use std::sync::Arc;
use std::time::Duration;

#[cfg(feature = "tls")]
use keel_faults::tls::{TestCa, TlsFront};
use keel_reconnect::{Config, ReconnectingClient, State};

use crate::support::*;

/// Collects the reasons of the first `Disconnected` transitions within `within`;
/// panics if the client ever reaches `Connected`.
async fn never_connects(client: &ReconnectingClient, within: Duration) -> Vec<String> {
    let mut log = client.transitions();
    let mut reasons = Vec::new();
    let _ = tokio::time::timeout(within, async {
        while let Ok(s) = log.recv().await {
            match s {
                State::Connected => panic!("connected, but must not"),
                State::Disconnected { reason } => reasons.push(reason),
                _ => {}
            }
        }
    })
    .await;
    reasons
}

#[cfg(feature = "tls")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_upstream_with_test_ca() {
    let (plain, seen) = server(ServerMode::default()).await;
    let ca = TestCa::new(&["localhost", "127.0.0.1"]);
    let front = TlsFront::start(plain, ca.server_config()).await.unwrap();
    let wss = format!("wss://localhost:{}/", front.addr().port());

    // Trusting the test CA: connected over TLS, frames acknowledged.
    let mut trusting = fast(Config::default());
    trusting.tls = Some(Arc::new(ca.client_config()));
    let (client, _frames) = ReconnectingClient::start(wss.clone(), Acks, trusting);
    wait_connected(&mut client.state()).await;
    let (msg, key) = seq(1);
    client.send(msg, key).await.unwrap();
    wait_until(Duration::from_secs(5), || {
        seen.lock().unwrap().seqs() == [1]
    })
    .await;
    client.close().await;
    let tls_connections = seen.lock().unwrap().connections;
    assert_eq!(tls_connections, 1);

    // Default roots (Mozilla's) do not include the test CA: refused, with
    // the certificate named in the reason.
    let (untrusting, _frames) =
        ReconnectingClient::start(wss.clone(), Acks, fast(Config::default()));
    let reasons = never_connects(&untrusting, Duration::from_millis(1500)).await;
    assert!(
        reasons
            .iter()
            .any(|r| r.to_lowercase().contains("certificate")),
        "{reasons:?}"
    );

    // wss:// to a plain server: the TLS handshake fails, nothing goes in
    // plaintext (the server never sees a WebSocket handshake).
    let mut trusting = fast(Config::default());
    trusting.tls = Some(Arc::new(ca.client_config()));
    let (downgrade, _frames) =
        ReconnectingClient::start(format!("wss://127.0.0.1:{}/", plain.port()), Acks, trusting);
    let reasons = never_connects(&downgrade, Duration::from_millis(1500)).await;
    assert!(!reasons.is_empty());
    // ws:// to the TLS port: no TLS, no connection.
    let (plain_to_tls, _frames) = ReconnectingClient::start(
        format!("ws://127.0.0.1:{}/", front.addr().port()),
        Acks,
        fast(Config::default()),
    );
    never_connects(&plain_to_tls, Duration::from_millis(1500)).await;
    assert_eq!(
        seen.lock().unwrap().connections,
        tls_connections,
        "no WebSocket reached the server except over trusted TLS"
    );
}

/// Built without the `tls` feature, a wss:// URL is refused before any
/// byte is sent (`cargo test -p keel-reconnect --no-default-features`).
#[cfg(not(feature = "tls"))]
#[tokio::test]
async fn wss_refused_without_tls_feature() {
    let (plain, seen) = server(ServerMode::default()).await;
    let (client, _frames) = ReconnectingClient::start(
        format!("wss://127.0.0.1:{}/", plain.port()),
        Acks,
        fast(Config::default()),
    );
    let reasons = never_connects(&client, Duration::from_millis(500)).await;
    assert!(
        reasons.iter().any(|r| r.contains("`tls` feature")),
        "{reasons:?}"
    );
    assert_eq!(seen.lock().unwrap().connections, 0);
}

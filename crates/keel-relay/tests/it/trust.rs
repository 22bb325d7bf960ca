//! Trust boundaries: what a local user or a client may not reach.

use std::os::unix::fs::PermissionsExt;

use nix::sys::stat::{Mode, umask};
use serde_json::json;

use crate::support::*;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// A relay started under a permissive umask keeps its data directory
/// (0700), database, WAL, shared-memory file and lock (0600) to its owner:
/// the database holds private channels and exec output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_dir_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let old = umask(Mode::empty());
    let relay = RelayProcess::start(&data, Opts::default()).await;
    umask(old);
    let c = client(&relay.url()).await;
    c.publish("room", "m1", &json!("private")).await.unwrap();
    assert_eq!(mode(&data), 0o700, "data directory");
    for name in ["keel.db", "keel.db-wal", "keel.db-shm", "keel.lock"] {
        assert_eq!(mode(&data.join(name)), 0o600, "{name}");
    }
}

const SECRET: &str = "keel test secret: 32 bytes or more, never reused";

/// A config for `auth.mode = "jwt"` (HS256), written beside `dir`.
fn jwt_config(dir: &std::path::Path, extra: &str) -> String {
    let secret = dir.join("jwt.secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    format!(
        "[auth]\nmode = \"jwt\"\njwt_secret_file = {:?}\n{extra}",
        secret.display().to_string()
    )
}

fn jwt(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn in_secs(s: i64) -> i64 {
    jsonwebtoken::get_current_timestamp() as i64 + s
}

/// `serve` until it prints its address or exits; returns the exit code
/// (None: it started, and was stopped) and what it wrote to stderr.
async fn try_serve(args: &[&str]) -> (Option<i32>, String) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_keel-relay"))
        .arg("serve")
        .args(args)
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(std::time::Duration::from_secs(30), out.next_line())
        .await
        .expect("started or exited within 30 s")
        .unwrap();
    let code = match first {
        Some(line) => {
            assert!(line.starts_with("keel-relay listening on "), "{line}");
            child.kill().await.unwrap();
            None
        }
        None => child.wait().await.unwrap().code(),
    };
    let mut err = String::new();
    use tokio::io::AsyncReadExt;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .await
        .unwrap();
    (code, err)
}

/// `open` mode is for loopback: a relay told to listen on every address
/// without authentication refuses to start and says what to configure;
/// `--insecure-open` or `jwt` mode lets it start. (It binds 0.0.0.0 for a
/// moment; no traffic leaves loopback.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_jwt_required_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let (code, err) = try_serve(&["--data", data, "--listen", "0.0.0.0:0"]).await;
    assert_eq!(code, Some(1), "{err}");
    for hint in [
        "without authentication",
        "mode = \"jwt\"",
        "--insecure-open",
    ] {
        assert!(err.contains(hint), "{hint:?} in {err}");
    }
    let (code, err) =
        try_serve(&["--data", data, "--listen", "0.0.0.0:0", "--insecure-open"]).await;
    assert_eq!(code, None, "{err}");
    let config = dir.path().join("jwt.toml");
    std::fs::write(&config, jwt_config(dir.path(), "")).unwrap();
    let config = config.to_str().unwrap();
    let (code, err) =
        try_serve(&["--data", data, "--listen", "0.0.0.0:0", "--config", config]).await;
    assert_eq!(code, None, "{err}");
    // A key file that cannot be used is an error at start, not later.
    std::fs::write(dir.path().join("jwt.secret"), "short").unwrap();
    let (code, err) = try_serve(&["--data", data, "--config", config]).await;
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("at least 32 bytes"), "{err}");
}

/// In `jwt` mode: no JWT, an expired one or a forged one is `unauthorized`;
/// the `channels` claim bounds reads and publishes; publish rules need
/// their roles; a session is its subject's alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_channel_claims_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let config = jwt_config(
        dir.path(),
        "[[auth.publish_rule]]\nprefix = \"news:\"\nroles = [\"editor\"]\n",
    );
    let relay = RelayProcess::start(
        &dir.path().join("data"),
        Opts {
            config: Some(config),
            ..Default::default()
        },
    )
    .await;
    let mut ws = RawWs::connect(&relay.url()).await;
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "alice", "exp": in_secs(60)}),
        &jsonwebtoken::EncodingKey::from_secret(b"not the relay's secret, but as long"),
    )
    .unwrap();
    for hello in [
        json!({"type": "hello"}),
        json!({"type": "hello", "auth": jwt(json!({"sub": "alice", "exp": in_secs(-60)}))}),
        json!({"type": "hello", "auth": forged}),
        json!({"type": "hello", "auth": jwt(json!({"sub": "alice"}))}),
    ] {
        ws.send(hello.clone()).await;
        let answer = ws.next_answer().await;
        assert_eq!(answer["code"], "unauthorized", "{hello}: {answer}");
    }
    // The connection may try again: alice reads room:* and lobby, and
    // publishes to room:1 only.
    let alice = jwt(json!({
        "sub": "alice", "exp": in_secs(600),
        "channels": {"read": ["room:*", "lobby"], "publish": ["room:1"]}
    }));
    ws.send(json!({"type": "hello", "auth": alice})).await;
    let welcome = ws.next_answer().await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    let alice_token = welcome["token"].as_str().unwrap().to_owned();
    ws.send(json!({"type": "subscribe", "channel": "room:7"}))
        .await;
    ws.send(json!({"type": "subscribe", "channel": "secret"}))
        .await;
    let refused = ws.next_answer().await;
    assert_eq!(
        (&refused["code"], &refused["ref"]),
        (&json!("forbidden"), &json!("secret")),
        "{refused}"
    );
    for (channel, want) in [
        ("room:1", "published"),
        ("room:2", "forbidden"),
        ("news:1", "forbidden"),
    ] {
        ws.send(json!({"type": "publish", "channel": channel, "id": channel, "payload": 1}))
            .await;
        let a = ws.next_answer().await;
        let got = if a["type"] == "published" {
            "published"
        } else {
            a["code"].as_str().unwrap()
        };
        assert_eq!(got, want, "{channel}: {a}");
    }
    drop(ws);

    // An editor may publish under news:, through the SDK.
    let mut config = keel_relay::client::ClientConfig::new(&relay.url());
    config.auth = Some(jwt(
        json!({"sub": "bob", "exp": in_secs(600), "roles": ["editor"]}),
    ));
    let bob = keel_relay::client::Client::connect(config).await.unwrap();
    assert!(
        bob.publish("news:1", "n1", &json!("headline"))
            .await
            .is_ok()
    );

    // alice's session token with bob's JWT: not his session.
    let mut ws = RawWs::connect(&relay.url()).await;
    let bob_jwt = jwt(json!({"sub": "bob", "exp": in_secs(600)}));
    ws.send(json!({"type": "hello", "token": alice_token, "auth": bob_jwt}))
        .await;
    let a = ws.next_answer().await;
    assert_eq!(a["code"], "forbidden", "{a}");
    // A narrower JWT: the stored subscription it does not cover is
    // refused after the welcome and not delivered.
    let narrow = jwt(json!({"sub": "alice", "exp": in_secs(600), "channels": {"read": ["lobby"]}}));
    ws.send(json!({"type": "hello", "token": alice_token, "auth": narrow}))
        .await;
    let a = ws.next_answer().await;
    assert_eq!(
        (&a["type"], &a["state"]),
        (&json!("welcome"), &json!("DETACHED")),
        "{a}"
    );
    assert!(a["catch_up"].get("room:7").is_none(), "{a}");
    let refused = ws.next_answer().await;
    assert_eq!(
        (&refused["code"], &refused["ref"]),
        (&json!("forbidden"), &json!("room:7")),
        "{refused}"
    );
    let metrics = http_get(&format!("http://{}/metrics", relay.addr)).await;
    for why in ["jwt", "owner", "publish"] {
        let line = format!("keel_auth_refused_total{{why=\"{why}\"}} ");
        let n: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{line} in /metrics"));
        assert!(n > 0, "{line}");
    }
}

/// A WebSocket handshake whose `Origin` is not allowed gets 403 before the
/// upgrade; requests without `Origin` (non-browser clients) and listed
/// origins are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_refused() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(
        &dir.path().join("data"),
        Opts {
            config: Some("[auth]\nallowed_origins = [\"https://app.example\"]\n".into()),
            ..Default::default()
        },
    )
    .await;
    let handshake = |origin: Option<&'static str>| {
        let mut req = relay.url().into_client_request().unwrap();
        if let Some(o) = origin {
            req.headers_mut().insert("origin", o.parse().unwrap());
        }
        async move {
            match tokio_tungstenite::connect_async(req).await {
                Ok(_) => 101,
                Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
                Err(e) => panic!("{e}"),
            }
        }
    };
    assert_eq!(handshake(Some("https://evil.example")).await, 403);
    assert_eq!(handshake(Some("null")).await, 403);
    assert_eq!(handshake(Some("https://app.example")).await, 101);
    assert_eq!(handshake(Some("HTTPS://APP.EXAMPLE")).await, 101);
    assert_eq!(handshake(None).await, 101);
    // Default: no origin is allowed.
    let dir2 = tempfile::tempdir().unwrap();
    let plain = RelayProcess::start(&dir2.path().join("data"), Opts::default()).await;
    let mut req = plain.url().into_client_request().unwrap();
    req.headers_mut()
        .insert("origin", "http://localhost:8080".parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        other => panic!("expected 403, got {:?}", other.map(|_| ())),
    }
}

/// One session's ids never answer another's: the same send id from two
/// sessions is two sends (each to its own recipient), the same publish id
/// on one channel from two sessions is two messages; a session's own
/// retry is still a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_scoped_per_session() {
    use keel_faults::{MockUpstream, UpstreamConfig};
    let up = MockUpstream::start(UpstreamConfig::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(
        &dir.path().join("data"),
        Opts {
            upstream: Some(up.url()),
            ..Default::default()
        },
    )
    .await;
    let a = client(&relay.url()).await;
    let b = client(&relay.url()).await;
    let pa = a.publish("room", "p1", &json!("from a")).await.unwrap();
    let pb = b.publish("room", "p1", &json!("from b")).await.unwrap();
    assert_ne!(pa, pb, "b's publish is its own message");
    assert_eq!(a.publish("room", "p1", &json!("again")).await.unwrap(), pa);
    let log = relay_log(&relay, "room").await;
    assert_eq!(log, [json!("from a"), json!("from b")]);

    a.send("order-42", "alice", &json!("a's order"))
        .await
        .unwrap();
    b.send("order-42", "bob", &json!("b's order"))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while up.accepted().len() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut got: Vec<(String, serde_json::Value)> =
        up.accepted().into_iter().map(|x| (x.to, x.body)).collect();
    got.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        got,
        [
            ("alice".to_owned(), json!("a's order")),
            ("bob".to_owned(), json!("b's order"))
        ]
    );
}

/// The payloads of `channel`, read from the start by a new session.
async fn relay_log(relay: &RelayProcess, channel: &str) -> Vec<serde_json::Value> {
    let mut ws = RawWs::connect(&relay.url()).await;
    ws.send(json!({"type": "hello"})).await;
    assert_eq!(ws.next_answer().await["type"], "welcome");
    ws.send(json!({"type": "subscribe", "channel": channel, "from": 1}))
        .await;
    let mut out = Vec::new();
    while let Ok(Ok(f)) =
        tokio::time::timeout(std::time::Duration::from_millis(500), ws.next()).await
    {
        if f["type"] == "deliver" && f["channel"] == channel {
            out.push(f["payload"].clone());
        }
    }
    out
}

/// The relay terminates TLS itself: an SDK client that trusts the test CA
/// works over wss://; one that does not, and plain ws://, get nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_tls_listener() {
    use keel_faults::tls::TestCa;
    use keel_relay::client::{Client, ClientConfig};
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(&["localhost", "127.0.0.1"]);
    let files = ca.write(dir.path()).unwrap();
    let relay = RelayProcess::start(
        &dir.path().join("data"),
        Opts {
            args: vec![
                "--tls-cert".into(),
                files.cert.display().to_string(),
                "--tls-key".into(),
                files.key.display().to_string(),
            ],
            ..Default::default()
        },
    )
    .await;
    let wss = format!("wss://localhost:{}/ws", relay.addr.port());
    let mut config = ClientConfig::new(&wss);
    config.reconnect.tls = Some(std::sync::Arc::new(ca.client_config()));
    let c = Client::connect(config).await.unwrap();
    let offset = c.publish("room", "m1", &json!("over TLS")).await.unwrap();
    assert_eq!(offset, 1);

    let mut untrusting = ClientConfig::new(&wss);
    untrusting.connect_timeout = std::time::Duration::from_secs(1);
    assert!(Client::connect(untrusting).await.is_err());
    let mut plain = ClientConfig::new(&relay.url());
    plain.connect_timeout = std::time::Duration::from_secs(1);
    assert!(Client::connect(plain).await.is_err());
    // /healthz is served over TLS too, and not in plaintext.
    assert!(
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            http_get(&format!("http://{}/healthz", relay.addr))
        )
        .await
        .map_or(true, |r| !r.contains("200 OK"))
    );
}

/// A `wss://` upstream behind a certificate the relay trusts through
/// `upstream_ca_file`: sends reach it over TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_upstream_with_test_ca() {
    use keel_faults::tls::{TestCa, TlsFront};
    use keel_faults::{MockUpstream, UpstreamConfig};
    let up = MockUpstream::start(UpstreamConfig::default())
        .await
        .unwrap();
    let ca = TestCa::new(&["localhost"]);
    let front = TlsFront::start(up.addr(), ca.server_config())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let files = ca.write(dir.path()).unwrap();
    let relay = RelayProcess::start(
        &dir.path().join("data"),
        Opts {
            upstream: Some(format!("wss://localhost:{}/", front.addr().port())),
            config: Some(format!(
                "upstream_ca_file = {:?}\n",
                files.ca.display().to_string()
            )),
            ..Default::default()
        },
    )
    .await;
    let c = client(&relay.url()).await;
    c.send("s1", "alice", &json!("over TLS")).await.unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while up.accepted().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let got: Vec<_> = up.accepted().into_iter().map(|a| (a.to, a.body)).collect();
    assert_eq!(got, [("alice".to_owned(), json!("over TLS"))]);
}

/// A connection does not outlive its JWT: at `exp` the relay closes it
/// with 4003, and the session resumes with a fresh JWT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_expiry_closes_connection() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(
        &dir.path().join("data"),
        Opts {
            config: Some(jwt_config(dir.path(), "jwt_leeway_s = 0\n")),
            ..Default::default()
        },
    )
    .await;
    let mut ws = RawWs::connect(&relay.url()).await;
    ws.send(json!({"type": "hello", "auth": jwt(json!({"sub": "carol", "exp": in_secs(2)}))}))
        .await;
    let welcome = ws.next_answer().await;
    let token = welcome["token"].as_str().unwrap().to_owned();
    // Nothing else comes (`next` gives up after 10 s without a frame).
    assert_eq!(ws.close_code().await, Some(4003));
    let mut ws = RawWs::connect(&relay.url()).await;
    ws.send(json!({"type": "hello", "token": token, "auth": jwt(json!({"sub": "carol", "exp": in_secs(600)}))}))
        .await;
    assert_eq!(ws.next_answer().await["type"], "welcome");
}

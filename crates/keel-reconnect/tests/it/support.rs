//! A WebSocket test server that acks `{"seq":n}` frames, and the matching protocol.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use keel_faults::{Proxy, ProxyConfig};
use keel_reconnect::{Config, Inbound, Link, Message, Protocol, State};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::time::Instant;

/// How the server behaves.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ServerMode {
    /// Close every connection with this code after the handshake.
    pub(crate) close_with: Option<u16>,
    /// Delay the welcome by this long.
    pub(crate) welcome_delay: Duration,
    /// Never read after the handshake.
    pub(crate) deaf: bool,
    /// Drop the connection (no ack, no close frame) on this seq.
    pub(crate) drop_on_seq: Option<u64>,
}

/// What the server saw.
#[derive(Debug, Default)]
pub(crate) struct Seen {
    /// Every data frame, in arrival order: "hello" or the seq.
    pub(crate) frames: Vec<(Instant, String)>,
    /// When each welcome was sent.
    pub(crate) welcomes: Vec<Instant>,
    pub(crate) connections: u64,
}

impl Seen {
    pub(crate) fn seqs(&self) -> Vec<u64> {
        self.frames
            .iter()
            .filter_map(|(_, f)| f.parse().ok())
            .collect()
    }
}

pub(crate) async fn server(mode: ServerMode) -> (SocketAddr, Arc<Mutex<Seen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let seen = record.clone();
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                seen.lock().unwrap().connections += 1;
                if let Some(code) = mode.close_with {
                    let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
                        code: code.into(),
                        reason: "test".into(),
                    };
                    let _ = ws.send(Message::Close(Some(frame))).await;
                    return;
                }
                if mode.deaf {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    return;
                }
                while let Some(Ok(frame)) = ws.next().await {
                    let Message::Text(text) = frame else { continue };
                    let v: Value = serde_json::from_str(text.as_str()).unwrap();
                    if v.get("hello").is_some() {
                        seen.lock()
                            .unwrap()
                            .frames
                            .push((Instant::now(), "hello".into()));
                        tokio::time::sleep(mode.welcome_delay).await;
                        seen.lock().unwrap().welcomes.push(Instant::now());
                        if ws
                            .send(Message::text(json!({"welcome": true}).to_string()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    } else if let Some(seq) = v["seq"].as_u64() {
                        if mode.drop_on_seq == Some(seq) {
                            return;
                        }
                        seen.lock()
                            .unwrap()
                            .frames
                            .push((Instant::now(), seq.to_string()));
                        if ws
                            .send(Message::text(json!({"ack": seq}).to_string()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// `hello` / `welcome` on every link; `{"ack": n}` acknowledges key `n`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Acks;

impl Protocol for Acks {
    async fn resume(&self, link: &mut Link<'_>) -> Result<(), String> {
        link.send(Message::text(json!({"hello": true}).to_string()))
            .await?;
        loop {
            let frame = link.recv().await.ok_or("closed during resume")?;
            let v: Value = serde_json::from_str(frame.to_text().unwrap_or("")).unwrap_or_default();
            if v.get("welcome").is_some() {
                return Ok(());
            }
        }
    }

    fn inbound(&self, frame: &Message) -> Inbound {
        let v: Value = serde_json::from_str(frame.to_text().unwrap_or("")).unwrap_or_default();
        match v["ack"].as_u64() {
            Some(n) => Inbound {
                acks: vec![n.to_string()],
                deliver: false,
            },
            None => Inbound {
                acks: Vec::new(),
                deliver: true,
            },
        }
    }
}

pub(crate) fn seq(n: u64) -> (Message, Option<String>) {
    (
        Message::text(json!({"seq": n}).to_string()),
        Some(n.to_string()),
    )
}

pub(crate) async fn proxy_to(upstream: SocketAddr) -> Proxy {
    Proxy::start(ProxyConfig {
        name: "ws".into(),
        listen: "127.0.0.1:0".parse().unwrap(),
        upstream,
        seed: 3,
        protocol: keel_faults::Protocol::Tcp,
    })
    .await
    .unwrap()
}

pub(crate) fn fast(config: Config) -> Config {
    let mut c = config;
    c.backoff.base = Duration::from_millis(50);
    c.backoff.cap = Duration::from_millis(400);
    c.backoff.jitter = false;
    c.close_timeout = Duration::from_millis(100);
    c.connect_timeout = Duration::from_millis(500);
    c.handshake_timeout = Duration::from_millis(500);
    c.resume_timeout = Duration::from_millis(1_000);
    c
}

/// `ws://ADDR/`.
pub(crate) fn url(addr: SocketAddr) -> String {
    format!("ws://{addr}/")
}

/// Waits (up to 2 s) until the watched state is `Connected`.
pub(crate) async fn wait_connected(state: &mut tokio::sync::watch::Receiver<State>) {
    wait_for(state, |s| *s == State::Connected, Duration::from_secs(2)).await;
}

pub(crate) async fn wait_for(
    rx: &mut tokio::sync::watch::Receiver<State>,
    want: impl Fn(&State) -> bool,
    within: Duration,
) -> State {
    let reached = tokio::time::timeout(within, async {
        rx.wait_for(|s| want(s)).await.map(|s| s.clone())
    })
    .await;
    match reached {
        Ok(Ok(s)) => s,
        _ => panic!("state not reached in {within:?}; last {:?}", *rx.borrow()),
    }
}

pub(crate) async fn wait_until(within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "condition not met in {within:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits for the next logged transition matching `want`.
pub(crate) async fn next_matching(
    log: &mut tokio::sync::broadcast::Receiver<State>,
    want: impl Fn(&State) -> bool,
    within: Duration,
) -> State {
    tokio::time::timeout(within, async {
        loop {
            let s = log.recv().await.expect("transition log");
            if want(&s) {
                return s;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no matching transition in {within:?}"))
}

/// A server behind a proxy, and a client connected to it through the proxy.
pub(crate) struct Rig {
    pub(crate) seen: Arc<Mutex<Seen>>,
    pub(crate) proxy: Proxy,
    pub(crate) client: keel_reconnect::ReconnectingClient,
    pub(crate) state: tokio::sync::watch::Receiver<State>,
}

pub(crate) async fn connected_rig(config: Config) -> Rig {
    let (addr, seen) = server(ServerMode::default()).await;
    let proxy = proxy_to(addr).await;
    let (client, _frames) =
        keel_reconnect::ReconnectingClient::start(url(proxy.listen_addr()), Acks, config);
    let mut state = client.state();
    wait_connected(&mut state).await;
    Rig {
        seen,
        proxy,
        client,
        state,
    }
}

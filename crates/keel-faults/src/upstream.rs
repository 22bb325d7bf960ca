//! A mock upstream messaging API over WebSocket (docs/protocol.md, "Sending to the upstream"), with a real rate
//! limit, switchable failure modes, inbound pushes, and a record of everything
//! it accepted.
//!
//! Protocol (JSON text frames):
//!
//! ```text
//! client -> upstream  {"type":"send","id":"<idempotency key>","to":"<recipient>","body":<any>}
//! upstream -> client  {"type":"ok","id":"..."}
//!                     {"type":"rate_limited","id":"...","retry_after_ms":1500,"scope":"global"|"recipient"}
//!                     {"type":"error","id":"...","code":"bad_request","message":"..."}
//!                     {"type":"message","id":"m-1","from":"...","to":"...","body":<any>}   (pushed inbound)
//! ```
//!
//! A send whose id was accepted before is answered `ok` again (the id is an
//! idempotency key) and recorded as a duplicate.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// How the upstream behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamMode {
    /// Answers every send.
    Normal,
    /// Refuses connections (not listening) and drops the open ones.
    Down,
    /// Answers every frame with invalid frames (non-JSON text and binary junk).
    Garbage,
    /// Accepts connections and frames, never answers.
    Stall,
    /// Answers `ok` for an id that was never sent (the send's id with a
    /// suffix) and accepts nothing.
    WrongIds,
    /// Answers with the first half of the answer's JSON text (a frame cut
    /// short) and accepts nothing.
    HalfFrames,
    /// Answers after the given delay.
    Slow(Duration),
}

/// Options of a mock upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    /// Where to listen; port 0 picks one.
    pub listen: SocketAddr,
    /// Sends per second allowed in all.
    pub global_rate: f64,
    /// Sends allowed at once in all.
    pub global_burst: f64,
    /// Sends per second allowed per recipient, if limited.
    pub recipient_rate: Option<f64>,
    /// Sends allowed at once per recipient.
    pub recipient_burst: f64,
    /// How long after a scope's 429 a client is assumed to know of it: sends
    /// of other ids in that scope that arrive sooner were already on their
    /// way and are not early. Default 20 ms.
    pub in_flight_grace: Duration,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            global_rate: 30.0,
            global_burst: 30.0,
            recipient_rate: None,
            recipient_burst: 1.0,
            in_flight_grace: Duration::from_millis(20),
        }
    }
}

/// One message the upstream accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// Its idempotency key.
    pub id: String,
    /// Recipient.
    pub to: String,
    /// Body.
    pub body: Value,
    /// When it was accepted.
    pub at: Instant,
}

/// A send that arrived before a Retry-After it should have honoured (see
/// [`MockUpstream::early_sends`]).
#[derive(Debug, Clone, PartialEq)]
pub struct EarlySend {
    /// Its idempotency key.
    pub id: String,
    /// How early it was.
    pub early_by: Duration,
}

#[derive(Debug)]
struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    fn new(rate: f64, burst: f64) -> Self {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            at: Instant::now(),
        }
    }

    /// Takes a token, or says how long until one is there.
    fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }
}

#[derive(Debug)]
struct Books {
    global: TokenBucket,
    recipients: HashMap<String, TokenBucket>,
    /// The latest 429 per scope: when it was given, and the instant it named.
    global_not_before: Option<(Instant, Instant)>,
    recipient_not_before: HashMap<String, (Instant, Instant)>,
    /// The instant named by the latest 429 given to each id.
    id_not_before: HashMap<String, Instant>,
    accepted: Vec<Accepted>,
    accepted_ids: HashSet<String>,
    duplicates: Vec<String>,
    early: Vec<EarlySend>,
    rate_limited: u64,
}

struct Shared {
    config: UpstreamConfig,
    mode: watch::Sender<UpstreamMode>,
    books: Mutex<Books>,
    clients: Mutex<HashMap<u64, mpsc::UnboundedSender<Message>>>,
    /// Sends to this recipient make the upstream drop the connection.
    poison: Mutex<Option<String>>,
    poisoned: AtomicU64,
    next_client: AtomicU64,
    next_push: AtomicU64,
    connections: AtomicU64,
}

/// A running mock upstream. Dropping it stops it.
pub struct MockUpstream {
    shared: Arc<Shared>,
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for MockUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockUpstream")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// 4 KiB tungstenite buffers (shared/baselines.md: the 128 KiB default costs
/// ~135 KiB per connection).
pub(crate) fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(4096)
}

impl MockUpstream {
    /// Starts listening.
    pub async fn start(config: UpstreamConfig) -> std::io::Result<MockUpstream> {
        let listener = crate::proxy::bind(config.listen)?;
        let addr = listener.local_addr()?;
        let books = Books {
            global: TokenBucket::new(config.global_rate, config.global_burst),
            recipients: HashMap::new(),
            global_not_before: None,
            recipient_not_before: HashMap::new(),
            id_not_before: HashMap::new(),
            accepted: Vec::new(),
            accepted_ids: HashSet::new(),
            duplicates: Vec::new(),
            early: Vec::new(),
            rate_limited: 0,
        };
        let shared = Arc::new(Shared {
            config,
            mode: watch::Sender::new(UpstreamMode::Normal),
            books: Mutex::new(books),
            clients: Mutex::new(HashMap::new()),
            poison: Mutex::new(None),
            poisoned: AtomicU64::new(0),
            next_client: AtomicU64::new(0),
            next_push: AtomicU64::new(0),
            connections: AtomicU64::new(0),
        });
        let task = tokio::spawn(accept_loop(shared.clone(), listener, addr));
        Ok(MockUpstream { shared, addr, task })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ws://ADDR/`.
    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    /// Switches behaviour at run time.
    pub fn set_mode(&self, mode: UpstreamMode) {
        self.shared.mode.send_replace(mode);
        if mode == UpstreamMode::Down {
            self.shared
                .clients
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
        }
    }

    /// A send to `to` (a frame the real API chokes on) makes the upstream
    /// drop that connection without an answer; `None` ends it. Other sends
    /// are answered as the mode says.
    pub fn set_poison_recipient(&self, to: Option<&str>) {
        *self.shared.poison.lock().unwrap_or_else(|p| p.into_inner()) = to.map(str::to_owned);
    }

    /// Connections dropped over a poisoned send.
    pub fn poisoned(&self) -> u64 {
        self.shared.poisoned.load(Ordering::Relaxed)
    }

    /// The current mode.
    pub fn mode(&self) -> UpstreamMode {
        *self.shared.mode.borrow()
    }

    /// Pushes an inbound message, with a fresh id (`m-1`, `m-2`, ...), to every
    /// connected client; returns how many.
    pub fn push(&self, from: &str, to: &str, body: Value) -> usize {
        let id = format!(
            "m-{}",
            self.shared.next_push.fetch_add(1, Ordering::Relaxed) + 1
        );
        let frame =
            json!({"type": "message", "id": id, "from": from, "to": to, "body": body}).to_string();
        let clients = self
            .shared
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        clients
            .values()
            .filter(|c| c.send(Message::text(frame.clone())).is_ok())
            .count()
    }

    /// Every accepted message, in order (duplicates not repeated).
    pub fn accepted(&self) -> Vec<Accepted> {
        self.books().accepted.clone()
    }

    /// Ids sent again after they had been accepted.
    pub fn duplicates(&self) -> Vec<String> {
        self.books().duplicates.clone()
    }

    /// Sends that came too early: an id sent again before the time its own 429
    /// named, or any send in a rate-limited scope (global or its recipient)
    /// that arrived at least [`UpstreamConfig::in_flight_grace`] after that
    /// scope's 429 and before the time it named. (Sends that arrive sooner were
    /// on the wire before the client could know.)
    pub fn early_sends(&self) -> Vec<EarlySend> {
        self.books().early.clone()
    }

    /// Rate-limit answers given.
    pub fn rate_limited(&self) -> u64 {
        self.books().rate_limited
    }

    /// WebSocket connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.shared.books.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
        self.shared
            .clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

async fn accept_loop(shared: Arc<Shared>, listener: TcpListener, addr: SocketAddr) {
    let mut listener = Some(listener);
    let mut mode = shared.mode.subscribe();
    loop {
        if *mode.borrow_and_update() == UpstreamMode::Down {
            listener = None;
            let _ = mode.changed().await;
            continue;
        }
        let current = match listener.take() {
            Some(l) => l,
            None => match crate::proxy::bind(addr) {
                Ok(l) => l,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        tokio::select! {
            accepted = current.accept() => {
                listener = Some(current);
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(serve(shared.clone(), stream));
                }
            }
            _ = mode.changed() => listener = Some(current),
        }
    }
}

async fn serve(shared: Arc<Shared>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(ws) = tokio_tungstenite::accept_async_with_config(stream, Some(ws_config())).await
    else {
        return;
    };
    shared.connections.fetch_add(1, Ordering::Relaxed);
    let id = shared.next_client.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    shared
        .clients
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, tx.clone());
    let (mut write, mut read) = ws.split();
    let mut mode = shared.mode.subscribe();
    loop {
        tokio::select! {
            frame = read.next() => {
                let Some(Ok(frame)) = frame else { break };
                if is_poison(&shared, &frame) {
                    shared.poisoned.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                let current = *mode.borrow();
                match current {
                    UpstreamMode::Down => break,
                    UpstreamMode::Stall => continue,
                    UpstreamMode::Garbage => {
                        let _ = tx.send(Message::text("{not json"));
                        let _ = tx.send(Message::binary(vec![0xde, 0xad, 0xbe, 0xef]));
                        continue;
                    }
                    UpstreamMode::WrongIds | UpstreamMode::HalfFrames => {
                        if let Message::Text(text) = &frame {
                            let _ = tx.send(Message::text(broken_answer(current, text.as_str())));
                        }
                        continue;
                    }
                    UpstreamMode::Slow(delay) => tokio::time::sleep(delay).await,
                    UpstreamMode::Normal => {}
                }
                if let Message::Text(text) = frame {
                    let _ = tx.send(Message::text(answer(&shared, text.as_str()).to_string()));
                }
            }
            out = rx.recv() => {
                let Some(out) = out else { break };
                if write.send(out).await.is_err() {
                    break;
                }
            }
            _ = mode.changed() => {
                if *mode.borrow() == UpstreamMode::Down {
                    break;
                }
            }
        }
    }
    shared
        .clients
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&id);
}

fn is_poison(shared: &Shared, frame: &Message) -> bool {
    let poison = shared.poison.lock().unwrap_or_else(|p| p.into_inner());
    let (Some(poison), Message::Text(text)) = (poison.as_deref(), frame) else {
        return false;
    };
    serde_json::from_str::<Send>(text.as_str()).is_ok_and(|s| s.to == poison)
}

#[derive(Deserialize)]
struct Send {
    #[serde(rename = "type")]
    kind: String,
    id: String,
    to: String,
    #[serde(default)]
    body: Value,
}

fn answer(shared: &Shared, text: &str) -> Value {
    let send: Send = match serde_json::from_str(text) {
        Ok(s) => s,
        Err(e) => {
            return json!({"type": "error", "code": "bad_request", "message": e.to_string()});
        }
    };
    if send.kind != "send" {
        return json!({"type": "error", "id": send.id, "code": "unknown_type", "message": send.kind});
    }
    let now = Instant::now();
    let mut books = shared.books.lock().unwrap_or_else(|p| p.into_inner());
    // Early, whatever happens next: a send of an id before the time its own
    // 429 named, or any send in a scope before the time that scope's 429
    // named, once the client has had `in_flight_grace` to learn of it (sends
    // already on the wire when the 429 went out cannot have known).
    let scope_not_before = [
        books.global_not_before,
        books.recipient_not_before.get(&send.to).copied(),
    ]
    .into_iter()
    .flatten()
    .filter(|(given, _)| now.saturating_duration_since(*given) >= shared.config.in_flight_grace)
    .map(|(_, nb)| nb);
    let not_before = scope_not_before
        .chain(books.id_not_before.get(&send.id).copied())
        .max();
    if let Some(nb) = not_before.filter(|nb| *nb > now) {
        let early_by = nb - now;
        books.early.push(EarlySend {
            id: send.id.clone(),
            early_by,
        });
    }
    if books.accepted_ids.contains(&send.id) {
        books.duplicates.push(send.id.clone());
        return json!({"type": "ok", "id": send.id});
    }
    if let Some(rate) = shared.config.recipient_rate {
        let burst = shared.config.recipient_burst;
        let bucket = books
            .recipients
            .entry(send.to.clone())
            .or_insert_with(|| TokenBucket::new(rate, burst));
        if let Err(wait) = bucket.take(now) {
            books.rate_limited += 1;
            books
                .recipient_not_before
                .insert(send.to.clone(), (now, now + wait));
            books.id_not_before.insert(send.id.clone(), now + wait);
            return rate_limited(&send.id, wait, "recipient");
        }
    }
    if let Err(wait) = books.global.take(now) {
        books.rate_limited += 1;
        books.global_not_before = Some((now, now + wait));
        books.id_not_before.insert(send.id.clone(), now + wait);
        return rate_limited(&send.id, wait, "global");
    }
    books.accepted_ids.insert(send.id.clone());
    books.accepted.push(Accepted {
        id: send.id.clone(),
        to: send.to,
        body: send.body,
        at: now,
    });
    json!({"type": "ok", "id": send.id})
}

/// What a broken upstream answers to a send, accepting nothing.
fn broken_answer(mode: UpstreamMode, text: &str) -> String {
    let id = serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v.get("id").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_default();
    let ok = json!({"type": "ok", "id": format!("{id}#not-sent")}).to_string();
    match mode {
        UpstreamMode::HalfFrames => {
            let whole = json!({"type": "ok", "id": id}).to_string();
            let mut cut = whole.len() / 2;
            while !whole.is_char_boundary(cut) {
                cut -= 1;
            }
            whole[..cut].to_owned()
        }
        _ => ok,
    }
}

fn rate_limited(id: &str, wait: Duration, scope: &str) -> Value {
    // Rounded up: a client that waits exactly this long is never early.
    let ms = wait.as_micros().div_ceil(1000) as u64;
    json!({"type": "rate_limited", "id": id, "retry_after_ms": ms, "scope": scope})
}

#![doc = include_str!("../README.md")]

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_reconnect::{CloseAction, Inbound, Link, Message, Protocol, ReconnectingClient, State};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

/// How to reach the relay.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// `ws://HOST:PORT/ws`, or `wss://` for a relay that serves TLS
    /// (trusted roots: `reconnect.tls`, by default Mozilla's).
    pub url: String,
    /// A connection JWT, for a relay with `auth.mode = "jwt"`; sent in
    /// every `hello` (replace it with [`Client::set_auth`] before it expires).
    pub auth: Option<String>,
    /// A token from an earlier session, to resume it; `None` opens a new one.
    pub token: Option<String>,
    /// Last offsets seen per channel (from an earlier run), to resume from.
    pub offsets: BTreeMap<String, u64>,
    /// Reconnection settings.
    pub reconnect: keel_reconnect::Config,
    /// How long `connect` waits for the first `welcome`. Default 10 s.
    pub connect_timeout: Duration,
    /// More relays of the same cluster (docs/cluster.md): each reconnect attempt
    /// goes to the next URL of `url` and these, in turn, so a client whose
    /// node died resumes its session on another. Default none.
    pub fallback_urls: Vec<String>,
}

impl ClientConfig {
    /// Defaults for `url`: a new session, reconnecting from 50 ms to 2 s.
    pub fn new(url: &str) -> Self {
        ClientConfig {
            url: url.to_owned(),
            auth: None,
            token: None,
            offsets: BTreeMap::new(),
            reconnect: keel_reconnect::Config {
                backoff: keel_reconnect::Backoff {
                    base: Duration::from_millis(50),
                    cap: Duration::from_secs(2),
                    ..Default::default()
                },
                ..Default::default()
            },
            connect_timeout: Duration::from_secs(10),
            fallback_urls: Vec::new(),
        }
    }
}

/// What the client hands to the application.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A link was (re)established and the session opened or resumed.
    Welcome {
        /// The session.
        session_id: String,
        /// Its state before this link (`CREATED` for a new session, `CRASHED`
        /// after the relay recovered from a crash, ...).
        state: String,
        /// Next offset per channel at the time of the welcome.
        catch_up: BTreeMap<String, u64>,
    },
    /// A message, each offset of a channel at most once, in order.
    Deliver {
        /// The channel.
        channel: String,
        /// Its offset.
        offset: u64,
        /// The publisher's id.
        id: String,
        /// The payload.
        payload: Value,
    },
    /// The relay's log no longer holds what the client asked for (its
    /// retention removed it): delivery of `channel` goes on from `first`.
    /// The client resumes from there after a reconnect, too.
    Truncated {
        /// The channel.
        channel: String,
        /// The offset asked for.
        from: u64,
        /// The oldest offset the log still holds (delivery goes on there).
        first: u64,
    },
    /// An error the relay sent that no pending call was waiting for.
    Error {
        /// The stable code.
        code: String,
        /// The message.
        message: String,
    },
    /// The link closed; the client is reconnecting unless the close was final.
    Disconnected {
        /// Why, as keel-reconnect saw it.
        reason: String,
    },
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The relay answered with an error frame.
    #[error("relay error {code}: {message}")]
    Relay {
        /// The stable code.
        code: String,
        /// The message.
        message: String,
    },
    /// No welcome within the connect timeout.
    #[error("no welcome from the relay within {0:?}")]
    ConnectTimeout(Duration),
    /// The client is closed.
    #[error("client closed: {0}")]
    Closed(String),
}

/// Answers a pending call waits for, by frame id.
type Waiters = HashMap<String, oneshot::Sender<Result<Value, ClientError>>>;

#[derive(Default)]
struct Inner {
    auth: Option<String>,
    token: Option<String>,
    session_id: Option<String>,
    offsets: BTreeMap<String, u64>,
    waiters: Waiters,
    duplicates: u64,
}

struct KeelProtocol {
    inner: Arc<Mutex<Inner>>,
    events: mpsc::UnboundedSender<Event>,
}

impl KeelProtocol {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Protocol for KeelProtocol {
    async fn resume(&self, link: &mut Link<'_>) -> Result<(), String> {
        let hello = {
            let inner = self.lock();
            let mut hello = serde_json::json!({"type": "hello"});
            if let Some(t) = &inner.token {
                hello["token"] = t.clone().into();
            }
            if let Some(jwt) = &inner.auth {
                hello["auth"] = jwt.clone().into();
            }
            if !inner.offsets.is_empty() {
                hello["resume"] = serde_json::to_value(&inner.offsets).unwrap_or_default();
            }
            hello.to_string()
        };
        link.send(Message::text(hello)).await?;
        while let Some(msg) = link.recv().await {
            let Message::Text(text) = msg else { continue };
            let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
                continue;
            };
            match v["type"].as_str() {
                Some("welcome") => {
                    let session_id = v["session_id"].as_str().unwrap_or_default().to_owned();
                    {
                        let mut inner = self.lock();
                        inner.session_id = Some(session_id.clone());
                        if let Some(t) = v["token"].as_str() {
                            inner.token = Some(t.to_owned());
                        }
                    }
                    let catch_up =
                        serde_json::from_value(v["catch_up"].clone()).unwrap_or_default();
                    let _ = self.events.send(Event::Welcome {
                        session_id,
                        state: v["state"].as_str().unwrap_or_default().to_owned(),
                        catch_up,
                    });
                    return Ok(());
                }
                Some("error") => {
                    return Err(format!(
                        "hello refused: {} {}",
                        v["code"].as_str().unwrap_or(""),
                        v["message"].as_str().unwrap_or("")
                    ));
                }
                _ => continue,
            }
        }
        Err("link closed before welcome".to_owned())
    }

    fn inbound(&self, frame: &Message) -> Inbound {
        #[derive(serde::Deserialize)]
        struct Head {
            #[serde(rename = "type")]
            kind: String,
            #[serde(default)]
            id: Option<String>,
            #[serde(rename = "ref", default)]
            reference: Option<String>,
        }
        let acks = match frame {
            Message::Text(t) => match serde_json::from_str::<Head>(t.as_str()) {
                Ok(h) if h.kind == "published" || h.kind == "sent" => h.id.into_iter().collect(),
                Ok(h) if h.kind == "error" => h.reference.into_iter().collect(),
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        Inbound {
            acks,
            deliver: true,
        }
    }

    fn close_action(&self, code: u16) -> CloseAction {
        match code {
            // Slow consumer: resume from the log soon.
            1013 => CloseAction::RetryAfter(Duration::from_millis(100)),
            // Idle timeout or shutdown: just come back. An expired JWT:
            // come back with the one `set_auth` gave since.
            1001 | 4002 | 4003 => CloseAction::Retry,
            other => keel_reconnect::classify_close(other),
        }
    }
}

/// A connection to a relay that survives disconnects.
pub struct Client {
    rc: ReconnectingClient,
    inner: Arc<Mutex<Inner>>,
    events: mpsc::UnboundedReceiver<Event>,
    router: tokio::task::JoinHandle<()>,
    watcher: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("session_id", &self.session_id())
            .finish_non_exhaustive()
    }
}

/// The relays a client tries, one per attempt, in turn.
struct Failover {
    urls: Vec<String>,
    next: std::sync::atomic::AtomicUsize,
}

impl keel_reconnect::Target for Failover {
    async fn request(
        &self,
    ) -> Result<tokio_tungstenite::tungstenite::handshake::client::Request, String> {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let url = &self.urls[i % self.urls.len()];
        keel_reconnect::Target::request(url).await
    }
}

impl Client {
    /// Connects and waits for the first `welcome`.
    pub async fn connect(config: ClientConfig) -> Result<Client, ClientError> {
        let inner = Arc::new(Mutex::new(Inner {
            token: config.token.clone(),
            auth: config.auth.clone(),
            offsets: config.offsets.clone(),
            ..Default::default()
        }));
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let mut urls = vec![config.url.clone()];
        urls.extend(config.fallback_urls.iter().cloned());
        let (rc, mut frames) = ReconnectingClient::start(
            Failover {
                urls,
                next: std::sync::atomic::AtomicUsize::new(0),
            },
            KeelProtocol {
                inner: inner.clone(),
                events: events_tx.clone(),
            },
            config.reconnect.clone(),
        );
        // The first welcome comes through the resume hook.
        let first = tokio::time::timeout(config.connect_timeout, events.recv()).await;
        let welcome = match first {
            Ok(Some(e @ Event::Welcome { .. })) => e,
            Ok(_) => return Err(ClientError::Closed("no welcome".to_owned())),
            Err(_) => return Err(ClientError::ConnectTimeout(config.connect_timeout)),
        };
        let router = {
            let (inner, events_tx) = (inner.clone(), events_tx.clone());
            tokio::spawn(async move {
                while let Some(frame) = frames.recv().await {
                    if let Message::Text(text) = frame {
                        route(&inner, &events_tx, text.as_str());
                    }
                }
            })
        };
        let watcher = {
            // The transition log, not the state watch: a Disconnected quickly
            // followed by Backoff must not be missed.
            let mut log = rc.transitions();
            tokio::spawn(async move {
                loop {
                    let reason = match log.recv().await {
                        Ok(State::Disconnected { reason } | State::Closed { reason }) => reason,
                        Ok(_) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    };
                    if events_tx.send(Event::Disconnected { reason }).is_err() {
                        return;
                    }
                }
            })
        };
        // Put the welcome back in front for the application.
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(welcome);
        let client = Client {
            rc,
            inner,
            events: merge(rx, events),
            router,
            watcher,
        };
        Ok(client)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The session id, once welcomed.
    pub fn session_id(&self) -> Option<String> {
        self.lock().session_id.clone()
    }

    /// The token to resume this session later (keep it secret).
    pub fn token(&self) -> Option<String> {
        self.lock().token.clone()
    }

    /// The last offset seen per channel.
    pub fn offsets(&self) -> BTreeMap<String, u64> {
        self.lock().offsets.clone()
    }

    /// Deliveries dropped because their offset had been seen: the relay's
    /// resume should make this 0.
    pub fn duplicates_dropped(&self) -> u64 {
        self.lock().duplicates
    }

    /// Replaces the connection JWT sent by the next `hello` (each
    /// reconnect), e.g. before the current one expires.
    pub fn set_auth(&self, jwt: Option<String>) {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).auth = jwt;
    }

    /// The underlying reconnecting client (state, counters).
    pub fn link(&self) -> &ReconnectingClient {
        &self.rc
    }

    async fn write(&self, frame: Value, ack: Option<String>) -> Result<(), ClientError> {
        self.rc
            .send(Message::text(frame.to_string()), ack)
            .await
            .map(|_| ())
            .map_err(|e| ClientError::Closed(e.to_string()))
    }

    /// Subscribes to `channel` from offset `from` (default: new messages, or
    /// after the session's stored cursor).
    pub async fn subscribe(&self, channel: &str, from: Option<u64>) -> Result<(), ClientError> {
        let mut frame = serde_json::json!({"type": "subscribe", "channel": channel});
        if let Some(f) = from {
            frame["from"] = f.into();
            // Resuming must restart here too, not after an older offset.
            self.lock()
                .offsets
                .entry(channel.to_owned())
                .or_insert(f.saturating_sub(1));
        }
        self.write(frame, None).await
    }

    /// Unsubscribes.
    pub async fn unsubscribe(&self, channel: &str) -> Result<(), ClientError> {
        self.lock().offsets.remove(channel);
        self.write(
            serde_json::json!({"type": "unsubscribe", "channel": channel}),
            None,
        )
        .await
    }

    /// Records that everything in `channel` up to `offset` is processed.
    pub async fn ack(&self, channel: &str, offset: u64) -> Result<(), ClientError> {
        self.write(
            serde_json::json!({"type": "ack", "channel": channel, "offset": offset}),
            None,
        )
        .await
    }

    async fn call(&self, id: &str, frame: Value) -> Result<Value, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.lock().waiters.insert(id.to_owned(), tx);
        self.write(frame, Some(id.to_owned())).await?;
        rx.await
            .map_err(|_| ClientError::Closed("client dropped".to_owned()))?
    }

    /// Publishes `payload` to `channel` with message id `id` and waits until
    /// it is durable; returns its offset. Unanswered publishes are re-sent
    /// after a reconnect, and `rate_limited` or `unavailable` answers are
    /// retried with backoff: publishing is idempotent by `id`.
    pub async fn publish<P: Serialize>(
        &self,
        channel: &str,
        id: &str,
        payload: &P,
    ) -> Result<u64, ClientError> {
        let payload = serde_json::to_value(payload)
            .map_err(|e| ClientError::Closed(format!("payload does not serialize: {e}")))?;
        let frame = serde_json::json!({"type": "publish", "channel": channel, "id": id, "payload": payload});
        let mut delay = Duration::from_millis(20);
        loop {
            match self.call(id, frame.clone()).await {
                Ok(v) => return Ok(v["offset"].as_u64().unwrap_or(0)),
                Err(ClientError::Relay { code, .. })
                    if code == "rate_limited" || code == "unavailable" =>
                {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Queues `body` for `to` at the upstream (idempotency key `id`) and
    /// waits until the relay has it durably in its outbox.
    pub async fn send<B: Serialize>(
        &self,
        id: &str,
        to: &str,
        body: &B,
    ) -> Result<(), ClientError> {
        let body = serde_json::to_value(body)
            .map_err(|e| ClientError::Closed(format!("body does not serialize: {e}")))?;
        self.call(
            id,
            serde_json::json!({"type": "send", "id": id, "to": to, "body": body}),
        )
        .await
        .map(|_| ())
    }

    /// Asks the relay to start the allowed command `command` as this
    /// session's child (exec sessions must be enabled on the relay). Its
    /// `exec_started`, `exec_output` and `child_exited` notices arrive in the
    /// session's private channel; publish there to write to its stdin.
    pub async fn exec(&self, command: &str) -> Result<(), ClientError> {
        self.write(
            serde_json::json!({"type": "exec", "command": command}),
            None,
        )
        .await
    }

    /// The next event; `None` once the client is closed.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Closes the link and stops.
    pub async fn close(self) {
        self.router.abort();
        self.watcher.abort();
        self.rc.close().await;
    }
}

/// Routes one frame: deliveries are de-duplicated by offset; answers go to
/// their waiters.
fn route(inner: &Mutex<Inner>, events: &mpsc::UnboundedSender<Event>, text: &str) {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return;
    };
    let mut inner = inner.lock().unwrap_or_else(|p| p.into_inner());
    match v["type"].as_str() {
        Some("deliver") => {
            let channel = v["channel"].as_str().unwrap_or_default().to_owned();
            let offset = v["offset"].as_u64().unwrap_or(0);
            let seen = inner.offsets.entry(channel.clone()).or_insert(0);
            if offset <= *seen {
                inner.duplicates += 1;
                return; // seen already
            }
            *seen = offset;
            let _ = events.send(Event::Deliver {
                channel,
                offset,
                id: v["id"].as_str().unwrap_or_default().to_owned(),
                payload: v["payload"].clone(),
            });
        }
        Some("truncated") => {
            let channel = v["channel"].as_str().unwrap_or_default().to_owned();
            let (from, first) = (
                v["from"].as_u64().unwrap_or(0),
                v["first"].as_u64().unwrap_or(0),
            );
            let seen = inner.offsets.entry(channel.clone()).or_insert(0);
            *seen = (*seen).max(first.saturating_sub(1));
            let _ = events.send(Event::Truncated {
                channel,
                from,
                first,
            });
        }
        Some("published") | Some("sent") => {
            if let Some(tx) = v["id"].as_str().and_then(|id| inner.waiters.remove(id)) {
                let _ = tx.send(Ok(v));
            }
        }
        Some("error") => {
            let code = v["code"].as_str().unwrap_or_default().to_owned();
            let message = v["message"].as_str().unwrap_or_default().to_owned();
            match v["ref"].as_str().and_then(|r| inner.waiters.remove(r)) {
                Some(tx) => {
                    let _ = tx.send(Err(ClientError::Relay { code, message }));
                }
                None => {
                    let _ = events.send(Event::Error { code, message });
                }
            }
        }
        _ => {}
    }
}

/// Events from `first`, then from `rest`.
fn merge(
    mut first: mpsc::UnboundedReceiver<Event>,
    mut rest: mpsc::UnboundedReceiver<Event>,
) -> mpsc::UnboundedReceiver<Event> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(e) = first.try_recv() {
            if tx.send(e).is_err() {
                return;
            }
        }
        while let Some(e) = rest.recv().await {
            if tx.send(e).is_err() {
                return;
            }
        }
    });
    rx
}

/// A time-ordered message id: milliseconds since the epoch, a per-process
/// counter and random bits, as 32 hex digits. Ids made later sort later, which
/// keeps the relay's uniqueness index appending at its end (see keel-session's
/// figures for random ids).
pub fn new_message_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed) & 0xff_ffff;
    let r: u32 = rand::random();
    format!(
        "{millis:012x}{n:06x}{:014x}",
        u64::from(r) << 24 | u64::from(rand::random::<u8>())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_sort_by_time() {
        let a = new_message_id();
        std::thread::sleep(Duration::from_millis(2));
        let b = new_message_id();
        assert_eq!(a.len(), 32);
        assert!(a < b, "{a} < {b}");
    }
}

//! The reconnecting client and its connection task.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::stream::SplitSink;
use futures::{FutureExt, SinkExt, StreamExt};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::Instrument;

use crate::backoff::Backoff;
use crate::buffer::{Buffer, BufferConfig, SendError, SendHandle};
use crate::frames::{Frames, Queue};
use crate::state::{State, StateCell};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What a close code from the server means for reconnecting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseAction {
    /// Give up: the client goes to `Closed`.
    Fatal,
    /// Reconnect with the usual backoff.
    Retry,
    /// Reconnect, but not before this long.
    RetryAfter(Duration),
}

/// The default classification: protocol, data and policy errors and the
/// 4000–4099 application range are fatal; 1012 (restart) and 1013 (try again
/// later) wait at least 5 s; everything else retries.
pub fn classify_close(code: u16) -> CloseAction {
    match code {
        1002 | 1003 | 1007 | 1008 | 1009 | 1010 | 4000..=4099 => CloseAction::Fatal,
        1012 | 1013 => CloseAction::RetryAfter(Duration::from_secs(5)),
        _ => CloseAction::Retry,
    }
}

/// A fresh link handed to [`Protocol::resume`].
pub struct Link<'a> {
    ws: &'a mut Ws,
}

impl Link<'_> {
    /// Sends one frame.
    pub async fn send(&mut self, msg: Message) -> Result<(), String> {
        self.ws.send(msg).await.map_err(|e| e.to_string())
    }

    /// The next data frame (pings are answered, not returned); `None` when closed.
    pub async fn recv(&mut self) -> Option<Message> {
        loop {
            match self.ws.next().await? {
                Ok(Message::Text(t)) => return Some(Message::Text(t)),
                Ok(Message::Binary(b)) => return Some(Message::Binary(b)),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }
}

/// What an inbound frame means to the protocol.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inbound {
    /// Ack keys this frame acknowledges.
    pub acks: Vec<String>,
    /// Whether to hand the frame to the user (false for pure protocol frames).
    pub deliver: bool,
}

/// The application protocol on top of the link: the resume handshake, acks,
/// and how to read close codes.
pub trait Protocol: Send + Sync + 'static {
    /// Runs on every new link before anything buffered is (re)sent, for
    /// example keel's `hello { resume }`. An error drops the link.
    fn resume(&self, link: &mut Link<'_>) -> impl Future<Output = Result<(), String>> + Send;

    /// Reads an inbound data frame. Default: no acks, deliver it.
    fn inbound(&self, _frame: &Message) -> Inbound {
        Inbound {
            acks: Vec::new(),
            deliver: true,
        }
    }

    /// Classifies a close code from the server. Default [`classify_close`].
    fn close_action(&self, code: u16) -> CloseAction {
        classify_close(code)
    }
}

/// No handshake, no acks: every message is done once written.
#[derive(Debug, Clone, Copy, Default)]
pub struct Plain;

impl Protocol for Plain {
    async fn resume(&self, _link: &mut Link<'_>) -> Result<(), String> {
        Ok(())
    }
}

/// Where to connect: asked on every attempt, so URLs and credentials can change.
pub trait Target: Send + Sync + 'static {
    /// The request for the next attempt.
    fn request(&self) -> impl Future<Output = Result<Request, String>> + Send;
}

impl Target for String {
    async fn request(&self) -> Result<Request, String> {
        self.as_str()
            .into_client_request()
            .map_err(|e| e.to_string())
    }
}

/// Options. Every field has a default.
#[derive(Debug, Clone)]
pub struct Config {
    /// Reconnect backoff.
    pub backoff: Backoff,
    /// Outbound buffer bounds.
    pub buffer: BufferConfig,
    /// Ping period. Default 15 s.
    pub ping_interval: Duration,
    /// A link with no inbound frame for this long is dead (half-open). Default 40 s.
    pub liveness_timeout: Duration,
    /// A write that takes longer is stalled: the link is dead. Default 10 s.
    pub write_timeout: Duration,
    /// TCP connect timeout. Default 10 s.
    pub connect_timeout: Duration,
    /// WebSocket handshake timeout. Default 10 s.
    pub handshake_timeout: Duration,
    /// Resume hook timeout. Default 10 s.
    pub resume_timeout: Duration,
    /// Longest wait for a clean close of a link being dropped. Default 1 s.
    pub close_timeout: Duration,
    /// tungstenite read/write buffer size. Default 4 KiB (shared/baselines.md).
    pub ws_buffer: usize,
    /// Inbound frames queued for the user before reading pauses. Default 1,024.
    pub inbound_queue: usize,
    /// TLS settings for `wss://` URLs (e.g. a private certificate
    /// authority). Default `None`: Mozilla's roots (webpki-roots), TLS 1.2
    /// and 1.3, the ring provider. `ws://` URLs never use TLS and `wss://`
    /// URLs never go without it.
    #[cfg(feature = "tls")]
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            backoff: Backoff::default(),
            buffer: BufferConfig::default(),
            ping_interval: Duration::from_secs(15),
            liveness_timeout: Duration::from_secs(40),
            write_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(10),
            resume_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(1),
            ws_buffer: 4096,
            inbound_queue: 1024,
            #[cfg(feature = "tls")]
            tls: None,
        }
    }
}

/// Counters of a client.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// Links established (resume completed).
    pub connects: u64,
    /// Links lost.
    pub drops: u64,
    /// Messages written again on a later link.
    pub resends: u64,
}

#[derive(Default)]
struct Stats {
    connects: AtomicU64,
    drops: AtomicU64,
    resends: AtomicU64,
}

struct Shared {
    state: StateCell,
    buffer: Buffer,
    /// Control frames for the current link; a plain queue, not a channel, so
    /// that an idle client does not hold a channel block.
    control: std::sync::Mutex<std::collections::VecDeque<Message>>,
    reconnect: Notify,
    close: Notify,
    stats: Stats,
}

/// One logical WebSocket connection kept alive across drops.
pub struct ReconnectingClient {
    shared: Arc<Shared>,
    inbound: Arc<Queue>,
    task: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ReconnectingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReconnectingClient")
            .field("state", &self.shared.state.get())
            .finish_non_exhaustive()
    }
}

impl ReconnectingClient {
    /// Starts connecting to `target`; returns the client and its inbound frames.
    pub fn start<T: Target, P: Protocol>(
        target: T,
        protocol: P,
        config: Config,
    ) -> (ReconnectingClient, Frames) {
        let inbound = Arc::new(Queue::new(config.inbound_queue));
        let shared = Arc::new(Shared {
            state: StateCell::new(),
            buffer: Buffer::new(config.buffer),
            control: std::sync::Mutex::new(std::collections::VecDeque::new()),
            reconnect: Notify::new(),
            close: Notify::new(),
            stats: Stats::default(),
        });
        let task = tokio::spawn(run(
            shared.clone(),
            target,
            protocol,
            config,
            inbound.clone(),
        ));
        (
            ReconnectingClient {
                shared,
                inbound: inbound.clone(),
                task: Some(task),
            },
            Frames { queue: inbound },
        )
    }

    /// Buffers a data message. With an `ack_key`, it stays buffered (and is
    /// re-sent after a reconnect) until the protocol hook reports that key
    /// acknowledged; without one, it is done once written.
    pub async fn send(
        &self,
        msg: Message,
        ack_key: Option<String>,
    ) -> Result<SendHandle, SendError> {
        self.shared.buffer.push(msg, ack_key).await
    }

    /// Sends a control frame on the current link, ahead of buffered data; it
    /// is not kept across reconnects.
    pub fn send_control(&self, msg: Message) {
        self.shared
            .control
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(msg);
        self.shared.buffer.ready.notify_one();
    }

    /// Watches the connection state.
    pub fn state(&self) -> tokio::sync::watch::Receiver<State> {
        self.shared.state.watch()
    }

    /// Every transition from now on, in order.
    pub fn transitions(&self) -> tokio::sync::broadcast::Receiver<State> {
        self.shared.state.log()
    }

    /// Takes back the buffered message with ack key `key`, written or not:
    /// it is never written again (a later link does not re-send it); its
    /// [`crate::SendHandle`] fails with [`crate::SendError::Withdrawn`]. For a sender that
    /// gave up on a message and must not have it delivered after saying so.
    /// Returns how many messages had that key.
    pub fn withdraw(&self, key: &str) -> usize {
        self.shared.buffer.withdraw(key)
    }

    /// The links that ended (other than by [`Self::reconnect_now`]) with the
    /// buffered message of ack key `key` unacknowledged on them: as the
    /// oldest such message (the first the peer read) and as the only one.
    /// `None`: no such message buffered. A message that is first on every
    /// link that dies is one the peer may be dropping the link over: its
    /// sender can take it back ([`Self::withdraw`]) and try it alone.
    pub fn lost_links(&self, key: &str) -> Option<crate::LostLinks> {
        self.shared.buffer.lost_links(key)
    }

    /// Drops the current link (or skips the current backoff) and reconnects now.
    pub fn reconnect_now(&self) {
        self.shared.reconnect.notify_one();
    }

    /// Messages and bytes buffered (written but unacknowledged included).
    pub fn buffered(&self) -> (usize, usize) {
        self.shared.buffer.len()
    }

    /// Counters so far.
    pub fn counters(&self) -> Counters {
        let s = &self.shared.stats;
        Counters {
            connects: s.connects.load(Ordering::Relaxed),
            drops: s.drops.load(Ordering::Relaxed),
            resends: s.resends.load(Ordering::Relaxed),
        }
    }

    /// Closes the link (a close frame, bounded in time) and stops for good.
    /// Buffered messages fail with [`SendError::Closed`].
    pub async fn close(mut self) {
        self.shared.close.notify_one();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for ReconnectingClient {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        self.shared.buffer.close("client dropped");
        self.inbound.close();
    }
}

/// Why a link ended.
enum Ended {
    /// Reconnect, with at least this delay.
    Retry(String, Option<Duration>),
    /// Stop for good.
    Stop(String),
}

async fn run<T: Target, P: Protocol>(
    shared: Arc<Shared>,
    target: T,
    protocol: P,
    config: Config,
    inbound: Arc<Queue>,
) {
    run_link(&shared, target, protocol, config, &inbound).await;
    inbound.close();
}

async fn run_link<T: Target, P: Protocol>(
    shared: &Arc<Shared>,
    target: T,
    protocol: P,
    config: Config,
    inbound: &Queue,
) {
    let mut rng = SmallRng::seed_from_u64(config.backoff.seed);
    let mut attempt: u32 = 0;
    let mut generation: u64 = 0;
    let state = &shared.state;
    loop {
        generation += 1;
        let span = tracing::debug_span!("link", generation, attempt);
        let outcome = async {
            // Boxed: the connect future (TCP, handshake, resume) is large and
            // only alive while connecting; idle clients should not carry it.
            let link = Box::pin(connect(&target, &protocol, &config, state)).await;
            match link {
                Err(reason) => (Ended::Retry(reason, None), None),
                Ok(mut ws) => {
                    shared.stats.connects.fetch_add(1, Ordering::Relaxed);
                    let up_since = Instant::now();
                    let ended =
                        session(shared, &protocol, &config, &mut ws, generation, inbound).await;
                    let _ = timeout(config.close_timeout, ws.close(None)).await;
                    (ended, Some(up_since.elapsed()))
                }
            }
        }
        .instrument(span)
        .await;
        let (ended, up_for) = outcome;
        if up_for.is_some() {
            if !matches!(&ended, Ended::Retry(reason, _) if reason == RECONNECT_REQUESTED) {
                shared.buffer.link_ended(generation);
            }
            shared.stats.drops.fetch_add(1, Ordering::Relaxed);
        }
        let (reason, at_least) = match ended {
            Ended::Stop(reason) => {
                let _ = state.set(State::Closed {
                    reason: reason.clone(),
                });
                shared.buffer.close(&reason);
                return;
            }
            Ended::Retry(reason, at_least) => (reason, at_least),
        };
        tracing::info!(%reason, "link lost");
        let _ = state.set(State::Disconnected { reason });
        if up_for.is_some_and(|d| d >= config.backoff.stable_after) {
            attempt = 0;
        }
        attempt += 1;
        let delay = config
            .backoff
            .delay(attempt, &mut rng)
            .max(at_least.unwrap_or_default());
        let until = Instant::now() + delay;
        let _ = state.set(State::Backoff {
            attempt,
            delay,
            until,
        });
        tokio::select! {
            _ = tokio::time::sleep_until(until) => {}
            _ = shared.reconnect.notified() => {}
            _ = shared.close.notified() => {
                let _ = state.set(State::Closed { reason: "closed by the user".into() });
                shared.buffer.close("closed by the user");
                return;
            }
        }
        let _ = state.set(State::Connecting);
    }
}

/// Why a link ended at the user's request ([`ReconnectingClient::reconnect_now`]).
const RECONNECT_REQUESTED: &str = "reconnect requested";

/// TCP, WebSocket handshake and resume hook, each with its own timeout.
async fn connect<T: Target, P: Protocol>(
    target: &T,
    protocol: &P,
    config: &Config,
    state: &StateCell,
) -> Result<Ws, String> {
    let request = target.request().await?;
    let secure = match request.uri().scheme_str() {
        Some("wss") => true,
        Some("ws") => false,
        other => {
            return Err(format!(
                "unsupported URL scheme {other:?}: use ws:// or wss://"
            ));
        }
    };
    #[cfg(not(feature = "tls"))]
    if secure {
        return Err(
            "wss:// needs keel-reconnect's `tls` feature, which this build lacks: refusing to connect without TLS"
                .to_owned(),
        );
    }
    let host = request
        .uri()
        .host()
        .ok_or_else(|| "URL without a host".to_owned())?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = request
        .uri()
        .port_u16()
        .unwrap_or(if secure { 443 } else { 80 });
    let tcp = timeout(
        config.connect_timeout,
        TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| "connect timed out".to_owned())?
    .map_err(|e| format!("connect failed: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(config.ws_buffer)
        .write_buffer_size(config.ws_buffer);
    #[cfg(feature = "tls")]
    let handshake = {
        use tokio_tungstenite::Connector;
        let connector = if secure {
            Connector::Rustls(config.tls.clone().unwrap_or_else(default_tls))
        } else {
            Connector::Plain
        };
        tokio_tungstenite::client_async_tls_with_config(
            request,
            tcp,
            Some(ws_config),
            Some(connector),
        )
    };
    #[cfg(not(feature = "tls"))]
    let handshake = tokio_tungstenite::client_async_with_config(
        request,
        MaybeTlsStream::Plain(tcp),
        Some(ws_config),
    );
    let (mut ws, _) = timeout(config.handshake_timeout, handshake)
        .await
        .map_err(|_| "handshake timed out".to_owned())?
        .map_err(|e| format!("handshake failed: {e}"))?;
    let _ = state.set(State::Resuming);
    timeout(
        config.resume_timeout,
        protocol.resume(&mut Link { ws: &mut ws }),
    )
    .await
    .map_err(|_| "resume timed out".to_owned())?
    .map_err(|e| format!("resume failed: {e}"))?;
    Ok(ws)
}

/// The default TLS settings: Mozilla's roots, made once per process.
#[cfg(feature = "tls")]
fn default_tls() -> Arc<rustls::ClientConfig> {
    static DEFAULT: std::sync::OnceLock<Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    DEFAULT
        .get_or_init(|| {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            Arc::new(tls_config(roots))
        })
        .clone()
}

/// TLS settings that trust `roots`, on the ring provider (TLS 1.2 and 1.3).
#[cfg(feature = "tls")]
pub fn tls_config(roots: rustls::RootCertStore) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// Runs a live link until it ends.
async fn session<P: Protocol>(
    shared: &Shared,
    protocol: &P,
    config: &Config,
    ws: &mut Ws,
    generation: u64,
    inbound: &Queue,
) -> Ended {
    let _ = shared.state.set(State::Connected);
    let (mut sink, mut stream) = ws.split();
    let mut last_inbound = Instant::now();
    let mut ping =
        tokio::time::interval_at(Instant::now() + config.ping_interval, config.ping_interval);
    loop {
        // Control frames first, then buffered data, each write bounded in time;
        // inbound frames are taken between writes so acks keep flowing.
        loop {
            let frame = shared
                .control
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop_front();
            let Some(frame) = frame else { break };
            if let Err(e) = Box::pin(write(&mut sink, frame, config.write_timeout)).await {
                return Ended::Retry(e, None);
            }
        }
        let batch = shared.buffer.next_unsent(generation, 64);
        if !batch.is_empty() {
            // Feed the batch and flush once: per-connection write batching.
            let seqs: Vec<u64> = batch.iter().map(|(seq, _, _)| *seq).collect();
            let resends = batch.iter().filter(|(_, _, resend)| *resend).count();
            let written = Box::pin(timeout(config.write_timeout, async {
                for (_, msg, _) in batch {
                    sink.feed(msg).await?;
                }
                sink.flush().await
            }))
            .await;
            match written {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Ended::Retry(format!("write failed: {e}"), None),
                Err(_) => {
                    return Ended::Retry(
                        format!(
                            "write stalled for {:?}: the link is dead",
                            config.write_timeout
                        ),
                        None,
                    );
                }
            }
            shared
                .stats
                .resends
                .fetch_add(resends as u64, Ordering::Relaxed);
            shared.buffer.mark_written(&seqs, generation);
            while let Some(frame) = stream.next().now_or_never() {
                last_inbound = Instant::now();
                if let Some(ended) = Box::pin(handle(shared, protocol, frame, inbound)).await {
                    return ended;
                }
            }
            continue;
        }
        let dead_at = last_inbound + config.liveness_timeout;
        tokio::select! {
            frame = stream.next() => {
                last_inbound = Instant::now();
                if let Some(ended) = Box::pin(handle(shared, protocol, frame, inbound)).await {
                    return ended;
                }
            }
            _ = shared.buffer.ready.notified() => {}
            _ = ping.tick() => {
                if let Err(e) = Box::pin(write(&mut sink, Message::Ping(Default::default()), config.write_timeout)).await {
                    return Ended::Retry(e, None);
                }
            }
            _ = tokio::time::sleep_until(dead_at) => {
                return Ended::Retry(
                    format!("no frame for {:?}: the link is dead (half-open)", config.liveness_timeout),
                    None,
                );
            }
            _ = shared.reconnect.notified() => return Ended::Retry(RECONNECT_REQUESTED.into(), None),
            _ = shared.close.notified() => {
                let _ = timeout(config.close_timeout, sink.send(Message::Close(None))).await;
                return Ended::Stop("closed by the user".into());
            }
        }
    }
}

async fn write(
    sink: &mut SplitSink<&mut Ws, Message>,
    msg: Message,
    limit: Duration,
) -> Result<(), String> {
    match timeout(limit, sink.send(msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("write failed: {e}")),
        Err(_) => Err(format!("write stalled for {limit:?}: the link is dead")),
    }
}

/// Handles one inbound item; returns how the link ends, if it does.
async fn handle<P: Protocol>(
    shared: &Shared,
    protocol: &P,
    frame: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    inbound: &Queue,
) -> Option<Ended> {
    let frame = match frame {
        None => return Some(Ended::Retry("closed by the peer".into(), None)),
        Some(Err(e)) => return Some(Ended::Retry(format!("read failed: {e}"), None)),
        Some(Ok(frame)) => frame,
    };
    match &frame {
        Message::Close(close) => {
            let (code, reason) = close
                .as_ref()
                .map(|c| (u16::from(c.code), c.reason.to_string()))
                .unwrap_or((u16::from(CloseCode::Status), String::new()));
            let why = format!("server closed with {code} {reason}");
            return Some(match protocol.close_action(code) {
                CloseAction::Fatal => Ended::Stop(why),
                CloseAction::Retry => Ended::Retry(why, None),
                CloseAction::RetryAfter(d) => Ended::Retry(why, Some(d)),
            });
        }
        Message::Text(_) | Message::Binary(_) => {
            let read = protocol.inbound(&frame);
            for key in &read.acks {
                shared.buffer.ack(key);
            }
            if read.deliver {
                inbound.push(frame).await;
            }
        }
        _ => {}
    }
    None
}

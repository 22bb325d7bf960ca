//! keel.v1 clients on raw tokio-tungstenite, for measuring: unlike the SDK
//! they hide nothing (no dedupe, no retries) and record every operation and
//! every delivery into the history as it happened.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::Error;
use crate::history::{
    ChannelId, Delivery, Digest, Expectation, Micros, MsgId, Outcome, Publish, Recorder,
};

/// A client WebSocket.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long any single wait of a client may take before it gives up.
pub const WAIT: Duration = Duration::from_secs(30);

/// Connects to `url` (`ws://HOST:PORT/PATH`), from `source` if given and
/// the relay is on loopback too (spread many connections over 127.0.0.x so
/// that ephemeral ports last), with the 4 KiB buffers that keep 10,000
/// connections cheap.
pub async fn connect(url: &str, source: Option<IpAddr>) -> Result<Ws, Error> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| {
            Error::Client(format!(
                "{url}: only ws:// URLs are supported (wss:// is not built into the harness yet: reach a TLS-terminated deployment through its plain inside address)"
            ))
        })?;
    let host = rest.split('/').next().unwrap_or(rest);
    let addr: SocketAddr = tokio::net::lookup_host(host)
        .await
        .map_err(|e| Error::Client(format!("{url}: {e}")))?
        .next()
        .ok_or_else(|| Error::Client(format!("{url}: no address")))?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| Error::Client(format!("socket: {e}")))?;
    // Loopback sources spread connections to a loopback relay over more
    // ephemeral ports; a relay elsewhere (`--target`) is reached from the
    // address the kernel picks.
    if let Some(ip) = source.filter(|ip| ip.is_loopback() == addr.ip().is_loopback()) {
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(|e| Error::Client(format!("bind {ip}: {e}")))?;
    }
    let stream = tokio::time::timeout(WAIT, socket.connect(addr))
        .await
        .map_err(|_| Error::Timeout(format!("connect to {addr}")))?
        .map_err(|e| Error::Client(format!("connect to {addr}: {e}")))?;
    let _ = stream.set_nodelay(true);
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(4096)
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    let (ws, _) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::client_async_with_config(
            url,
            MaybeTlsStream::Plain(stream),
            Some(config),
        ),
    )
    .await
    .map_err(|_| Error::Timeout(format!("WebSocket handshake with {url}")))?
    .map_err(|e| Error::Client(format!("WebSocket handshake with {url}: {e}")))?;
    Ok(ws)
}

/// The source address for connection `i`: 127.0.0.1 through 127.0.0.8 in
/// turn (loopback only), so that 19,000 connections find ephemeral ports.
pub fn source_ip(i: usize) -> Option<IpAddr> {
    Some(IpAddr::from([127, 0, 0, 1 + (i % 8) as u8]))
}

/// A relay frame, as much of it as clients read.
#[derive(Deserialize, Debug)]
pub struct Frame<'a> {
    /// `welcome`, `deliver`, `published`, `error`, ...
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    /// Channel of a deliver or published.
    #[serde(borrow, default)]
    pub channel: Option<Cow<'a, str>>,
    /// Offset of a deliver or published.
    #[serde(default)]
    pub offset: Option<u64>,
    /// Message id.
    #[serde(borrow, default)]
    pub id: Option<Cow<'a, str>>,
    /// Payload of a deliver, unparsed.
    #[serde(borrow, default)]
    pub payload: Option<&'a RawValue>,
    /// Error code.
    #[serde(borrow, default)]
    pub code: Option<Cow<'a, str>>,
    /// Error ref.
    #[serde(rename = "ref", borrow, default)]
    pub reference: Option<Cow<'a, str>>,
    /// Welcome: the session.
    #[serde(borrow, default)]
    pub session_id: Option<Cow<'a, str>>,
    /// Welcome: a new session's token.
    #[serde(borrow, default)]
    pub token: Option<Cow<'a, str>>,
    /// Welcome: the session's state before this connection.
    #[serde(borrow, default)]
    pub state: Option<Cow<'a, str>>,
}

/// Parses a relay frame.
pub fn parse(text: &str) -> Result<Frame<'_>, Error> {
    serde_json::from_str(text)
        .map_err(|e| Error::Client(format!("bad frame from relay: {e}: {}", short(text))))
}

fn short(s: &str) -> &str {
    match s.char_indices().nth(120) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// What `welcome` said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// The session id.
    pub session_id: String,
    /// The token (new sessions only).
    pub token: Option<String>,
    /// The state before this connection.
    pub state: String,
}

/// Reads the next text frame; `Ok(None)` when the connection ended (with
/// its close code, if any, in the error).
pub async fn next_text<S>(ws: &mut S) -> Result<Option<String>, Option<u16>>
where
    S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => return Ok(Some(t.as_str().to_owned())),
            Some(Ok(Message::Close(frame))) => return Err(frame.map(|f| u16::from(f.code))),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Err(None),
        }
    }
}

/// Sends `hello` and waits for `welcome` (frames before it are errors).
pub async fn hello(
    ws: &mut Ws,
    token: Option<&str>,
    resume: &BTreeMap<String, u64>,
) -> Result<Welcome, Error> {
    let mut frame = serde_json::json!({"type": "hello"});
    if let Some(t) = token {
        frame["token"] = t.into();
    }
    if !resume.is_empty() {
        frame["resume"] = serde_json::to_value(resume).unwrap_or_default();
    }
    ws.send(Message::text(frame.to_string()))
        .await
        .map_err(|e| Error::Client(format!("send hello: {e}")))?;
    let answer = tokio::time::timeout(WAIT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => return Ok(t.as_str().to_owned()),
                Some(Ok(Message::Close(c))) => {
                    return Err(Error::Client(format!("closed before welcome: {c:?}")));
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(Error::Client(format!("before welcome: {e}"))),
                None => return Err(Error::Client("closed before welcome".into())),
            }
        }
    })
    .await
    .map_err(|_| Error::Timeout("welcome".into()))??;
    let f = parse(&answer)?;
    if f.kind != "welcome" {
        return Err(Error::Client(format!(
            "hello answered with {}",
            short(&answer)
        )));
    }
    Ok(Welcome {
        session_id: f.session_id.unwrap_or_default().into_owned(),
        token: f.token.map(Cow::into_owned),
        state: f.state.unwrap_or_default().into_owned(),
    })
}

/// Connects and opens a new session.
pub async fn open_session(url: &str, source: Option<IpAddr>) -> Result<(Ws, Welcome), Error> {
    let mut ws = connect(url, source).await?;
    let w = hello(&mut ws, None, &BTreeMap::new()).await?;
    Ok((ws, w))
}

/// A JSON text frame.
pub fn text(v: &serde_json::Value) -> Message {
    Message::text(v.to_string())
}

// --------------------------------------------------------------- reader

/// A `deliver` frame as the history records it. A frame missing its
/// channel, offset or id is recorded all the same (an empty channel, offset
/// 0, an empty id: never published, so `unexpected` where it can be
/// judged) and counted as suspicious: a client never drops what it read.
pub fn delivery_of(f: &Frame<'_>, sub: u32, conn: u32, recorder: &Recorder) -> Delivery {
    if f.channel.is_none() || f.offset.is_none() || f.id.is_none() {
        recorder.suspicious();
    }
    Delivery {
        sub,
        conn,
        channel: recorder.channel(f.channel.as_deref().unwrap_or("")),
        offset: f.offset.unwrap_or(0),
        id: recorder.id(f.id.as_deref().unwrap_or("")),
        at: recorder.now(),
        // A deliver frame without a payload is recorded as an empty one:
        // nobody published that.
        digest: Digest::of(f.payload.map_or("", |p| p.get())),
    }
}

/// One raw session connection read step by step, recording every delivery
/// it reads into the history (repeats included: the checker judges them)
/// and counting what it waits for by offset: only offsets of the channels
/// it expects, from the offset it expects them.
#[derive(Debug)]
pub struct Reader {
    /// Its number in the history.
    pub sub: u32,
    /// Which of its connections this is.
    pub conn: u32,
    /// The connection.
    pub ws: Ws,
    recorder: Recorder,
    buffer: Vec<Delivery>,
    /// Per expected channel: the first offset expected and those had.
    expected: HashMap<ChannelId, (u64, Offsets)>,
}

/// What one frame was, to a [`Reader`].
enum Read {
    /// A delivery of an expected offset not had before.
    Expected(String, u64),
    /// Any other delivery: a repeat, another channel's, one before the
    /// first offset expected.
    Other(String, u64),
    /// `pong`.
    Pong,
    /// Anything else.
    Frame,
}

impl Reader {
    /// A reader of `ws` recording as subscriber `sub`, connection `conn`.
    pub fn new(sub: u32, conn: u32, ws: Ws, recorder: &Recorder) -> Reader {
        Reader {
            sub,
            conn,
            ws,
            recorder: recorder.clone(),
            buffer: Vec::new(),
            expected: HashMap::new(),
        }
    }

    /// Says (and records) that this reader must see every acknowledged
    /// message of `channel` from offset `from` on.
    pub fn expect(&mut self, channel: &str, from: u64) {
        let cid = self.recorder.channel(channel);
        self.recorder.expect(Expectation {
            sub: self.sub,
            channel: cid,
            from,
        });
        self.expected.insert(cid, (from, Offsets::default()));
    }

    /// Sends a frame.
    pub async fn send(&mut self, v: serde_json::Value) -> Result<(), Error> {
        let sent = self.ws.send(text(&v)).await;
        sent.map_err(|e| self.gave_up(format!("send: {e}")))
    }

    /// The link failed: the reader stops being held to what it expected.
    fn gave_up(&mut self, why: String) -> Error {
        self.flush();
        self.recorder.abandon(self.sub, &why);
        Error::Client(why)
    }

    /// Handles one text frame; an `error` frame fails.
    fn on_text(&mut self, t: &str) -> Result<Read, Error> {
        let f = parse(t)?;
        match f.kind.as_ref() {
            "deliver" => {
                let d = delivery_of(&f, self.sub, self.conn, &self.recorder);
                self.buffer.push(d);
                let channel = f.channel.unwrap_or_default().into_owned();
                let expected = self
                    .expected
                    .get_mut(&d.channel)
                    .is_some_and(|(from, had)| d.offset >= *from && had.insert(d.offset));
                Ok(if expected {
                    Read::Expected(channel, d.offset)
                } else {
                    Read::Other(channel, d.offset)
                })
            }
            "pong" => Ok(Read::Pong),
            "error" => Err(self.gave_up(format!("relay refused: {t}"))),
            _ => Ok(Read::Frame),
        }
    }

    /// The next frame, within `deadline`: `Ok(None)` when the deadline
    /// passed; a closed link fails.
    async fn next(&mut self, deadline: Instant) -> Result<Option<Read>, Error> {
        loop {
            let Ok(msg) = tokio::time::timeout_at(deadline, self.ws.next()).await else {
                return Ok(None);
            };
            match msg {
                Some(Ok(Message::Text(t))) => return self.on_text(t.as_str()).map(Some),
                Some(Ok(_)) => continue,
                _ => return Err(self.gave_up(format!("subscriber {} lost its link", self.sub))),
            }
        }
    }

    fn flush(&mut self) {
        self.recorder.deliveries(&mut self.buffer);
    }

    /// Reads until `n` expected offsets not had before arrived (or `limit`
    /// passed); returns every delivery read, as (channel, offset) in
    /// arrival order, and how many of them were expected and new. A repeat,
    /// another channel's message or one before the expected offset is
    /// recorded and returned, never counted towards `n`.
    pub async fn deliveries(
        &mut self,
        n: usize,
        limit: Duration,
    ) -> Result<(Vec<(String, u64)>, usize), Error> {
        let mut got = Vec::new();
        let mut new = 0;
        let deadline = Instant::now() + limit;
        let result = async {
            while new < n {
                match self.next(deadline).await? {
                    None => break,
                    Some(Read::Expected(channel, offset)) => {
                        new += 1;
                        got.push((channel, offset));
                    }
                    Some(Read::Other(channel, offset)) => got.push((channel, offset)),
                    Some(_) => {}
                }
            }
            Ok(())
        }
        .await;
        self.flush();
        result.map(|()| (got, new))
    }

    /// Reads until `pong` (deliveries on the way are recorded).
    pub async fn until_pong(&mut self) -> Result<(), Error> {
        let deadline = Instant::now() + WAIT;
        let result = async {
            loop {
                match self.next(deadline).await? {
                    None => return Err(Error::Timeout("pong".into())),
                    Some(Read::Pong) => return Ok(()),
                    Some(_) => {}
                }
            }
        }
        .await;
        self.flush();
        result
    }

    /// Closes the connection: sends a close frame and reads (recording
    /// deliveries) until the peer's close frame comes back, for at most
    /// `limit`. Returns when the close was sent and whether it was
    /// answered. An answer proves the relay handled the close only on a
    /// direct connection: an intermediary may answer for it.
    pub async fn close(mut self, limit: Duration) -> (Micros, bool) {
        let at = self.recorder.now();
        if self.ws.close(None).await.is_err() {
            self.flush();
            return (at, false);
        }
        let deadline = Instant::now() + limit;
        let answered = loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    let _ = self.on_text(t.as_str());
                }
                Ok(Some(Ok(Message::Close(_)))) => break true,
                Ok(Some(Ok(_))) => {}
                // The end of the stream without the peer's close frame
                // (tungstenite hands that frame over first when it comes).
                Ok(Some(Err(_)) | None) | Err(_) => break false,
            }
        };
        self.flush();
        (at, answered)
    }
}

// ------------------------------------------------------------ publisher

/// The answer to one publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// `published` at this offset.
    Published(u64),
    /// `error` with this code.
    Refused(String),
    /// The connection ended first.
    Lost,
}

type Pending = Arc<Mutex<HashMap<String, (oneshot::Sender<Answer>, Micros)>>>;

/// One pipelining publisher connection: `publish` sends at once and waits
/// for the answer; any number may be in flight. Every publish is recorded.
#[derive(Debug)]
pub struct Publisher {
    client: u32,
    conn: u32,
    tx: mpsc::UnboundedSender<Message>,
    pending: Pending,
    recorder: Recorder,
    seq: AtomicU64,
    closed: Arc<AtomicBool>,
}

impl Publisher {
    /// Opens a session on `url` for publisher `client` (its ids are `h<client>-<seq>`).
    pub async fn open(
        url: &str,
        client: u32,
        source: Option<IpAddr>,
        recorder: &Recorder,
    ) -> Result<Publisher, Error> {
        let (ws, _) = open_session(url, source).await?;
        let (mut sink, mut stream) = ws.split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
        let pending: Pending = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        tokio::spawn(async move {
            while let Some(m) = rx.recv().await {
                if sink.feed(m).await.is_err() {
                    return;
                }
                while let Ok(m) = rx.try_recv() {
                    if sink.feed(m).await.is_err() {
                        return;
                    }
                }
                if sink.flush().await.is_err() {
                    return;
                }
            }
            let _ = sink.close().await;
        });
        let (reader_pending, reader_closed) = (pending.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok(Some(t)) = next_text(&mut stream).await {
                let Ok(f) = parse(&t) else { continue };
                let (key, answer) = match f.kind.as_ref() {
                    "published" => (f.id, Answer::Published(f.offset.unwrap_or(0))),
                    "error" => (
                        f.reference,
                        Answer::Refused(f.code.unwrap_or_default().into_owned()),
                    ),
                    _ => continue,
                };
                let Some(key) = key else { continue };
                let waiter = reader_pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(key.as_ref());
                if let Some((w, _)) = waiter {
                    let _ = w.send(answer);
                }
            }
            reader_closed.store(true, Ordering::Release);
            // Everything still waiting has an unknown outcome.
            let left: Vec<_> = reader_pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .drain()
                .collect();
            for (_, (w, _)) in left {
                let _ = w.send(Answer::Lost);
            }
        });
        Ok(Publisher {
            client,
            conn: 1,
            tx,
            pending,
            recorder: recorder.clone(),
            seq: AtomicU64::new(0),
            closed,
        })
    }

    /// The next id of this publisher.
    pub fn next_id(&self) -> (MsgId, String) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        (
            MsgId::harness(self.client, seq),
            format!("h{}-{seq}", self.client),
        )
    }

    /// Publishes `payload` (JSON text) to `channel`, recorded as invoked at
    /// `intended` (open-model load passes the intended send time); returns
    /// the answer.
    pub async fn publish(
        &self,
        channel: ChannelId,
        name: &str,
        payload: &str,
        intended: Option<Instant>,
    ) -> Answer {
        let (id, wire) = self.next_id();
        self.publish_id(channel, name, id, &wire, payload, intended)
            .await
    }

    /// [`Publisher::publish`] with a given id (to re-send one).
    pub async fn publish_id(
        &self,
        channel: ChannelId,
        name: &str,
        id: MsgId,
        wire: &str,
        payload: &str,
        intended: Option<Instant>,
    ) -> Answer {
        let invoke = intended.map_or_else(
            || self.recorder.now(),
            |t| self.recorder.micros(t.into_std()),
        );
        let (tx, rx) = oneshot::channel();
        let answer = if self.closed.load(Ordering::Acquire) {
            Answer::Lost
        } else {
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(wire.to_owned(), (tx, invoke));
            let frame = format!(
                r#"{{"type":"publish","channel":{},"id":{},"payload":{payload}}}"#,
                serde_json::Value::from(name),
                serde_json::Value::from(wire)
            );
            if self.tx.send(Message::text(frame)).is_err() {
                Answer::Lost
            } else {
                tokio::time::timeout(WAIT, rx)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or(Answer::Lost)
            }
        };
        let outcome = match &answer {
            Answer::Published(offset) => Outcome::Ok { offset: *offset },
            Answer::Refused(code) => Outcome::Fail { code: code.clone() },
            Answer::Lost => Outcome::Info,
        };
        self.recorder.publish(Publish {
            client: self.client,
            conn: self.conn,
            channel,
            id,
            invoke,
            done: self.recorder.now(),
            outcome,
            digest: Digest::of(payload),
        });
        answer
    }

    /// Sends a raw frame on this connection.
    pub fn send_raw(&self, text: String) -> bool {
        self.tx.send(Message::text(text)).is_ok()
    }
}

// ----------------------------------------------------------- subscriber

/// What a subscriber does with each delivered payload besides recording
/// its digest (which every delivery carries into the history).
#[derive(Debug, Clone)]
pub enum PayloadCheck {
    /// Nothing more.
    None,
    /// Reads `"t"` (microseconds of the run clock when it was meant to be
    /// sent) and records publish-to-deliver latency into the sink.
    Latency(crate::load::LatencySink),
}

/// How a subscriber behaves.
#[derive(Debug, Clone)]
pub struct SubscriberSpec {
    /// Its number in the history.
    pub sub: u32,
    /// The relay; or (a cluster) several URLs separated by spaces, the
    /// first its home, the others where it goes in turn when one refuses.
    pub url: String,
    /// Where it connects from.
    pub source: Option<IpAddr>,
    /// Channels and the first offset wanted (at least 1); the subscriber
    /// must see every acknowledged message from there on.
    pub channels: Vec<(String, u64)>,
    /// Sleep this long after each delivery (a slow reader).
    pub read_delay: Option<Duration>,
    /// Reconnect and resume after the relay closes the connection.
    pub resume: bool,
    /// What to do with payloads.
    pub payloads: PayloadCheck,
    /// Stop once this many distinct offsets were delivered in all (None:
    /// until told). Counted by offset, never by frame: a duplicate does
    /// not stand in for a message still to come.
    pub stop_after: Option<u64>,
}

/// What a subscriber saw besides its deliveries (which are in the history).
#[derive(Debug, Default)]
pub struct SubscriberReport {
    /// Connections it made (1 + reconnects).
    pub connections: u32,
    /// Close codes the relay sent it.
    pub closes: Vec<Option<u16>>,
    /// Distinct offsets delivered of the channels it asked for, from the
    /// offsets it asked for (a repeat is not counted again).
    pub delivered: u64,
    /// Why it stopped early, if it did.
    pub error: Option<String>,
}

/// The offsets of one channel a client has had, as disjoint runs (first,
/// last): millions of in-order deliveries cost one entry, and so does
/// everything after a gap. Clients count what they still wait for by
/// offset with it, never by frame.
#[derive(Debug, Clone, Default)]
pub struct Offsets {
    runs: std::collections::BTreeMap<u64, u64>,
}

impl Offsets {
    /// Adds `offset`; false if it was there already.
    pub fn insert(&mut self, offset: u64) -> bool {
        if self.contains(offset) {
            return false;
        }
        // Joins the run ending just before it and the one starting just
        // after it, if any.
        let before = self
            .runs
            .range(..offset)
            .next_back()
            .filter(|(_, last)| **last + 1 == offset)
            .map(|(first, _)| *first);
        let after = offset
            .checked_add(1)
            .and_then(|next| self.runs.remove(&next).map(|last| (next, last)));
        let last = after.map_or(offset, |(_, last)| last);
        match before {
            Some(first) => {
                self.runs.insert(first, last);
            }
            None => {
                self.runs.insert(offset, last);
            }
        }
        true
    }

    /// Whether `offset` is there.
    pub fn contains(&self, offset: u64) -> bool {
        self.runs
            .range(..=offset)
            .next_back()
            .is_some_and(|(_, last)| *last >= offset)
    }

    /// How many offsets are there.
    pub fn len(&self) -> u64 {
        self.runs.iter().map(|(first, last)| last - first + 1).sum()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }
}

/// A running subscriber's live count of distinct offsets delivered.
#[derive(Debug, Clone, Default)]
pub struct Progress(Arc<AtomicU64>);

impl Progress {
    /// Distinct offsets delivered so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Waits until the subscribers' distinct deliveries reach `want` in all,
/// for at most `limit`, and no longer than `quiet` without any progress
/// (a message that never comes is the checker's to report, not a reason
/// to wait out the whole limit); returns how many arrived.
pub async fn settle(progress: &[Progress], want: u64, limit: Duration, quiet: Duration) -> u64 {
    let deadline = Instant::now() + limit;
    let total = || progress.iter().map(Progress::get).sum::<u64>();
    let (mut last, mut since) = (total(), Instant::now());
    loop {
        let now_total = total();
        if now_total >= want {
            return now_total;
        }
        if now_total != last {
            (last, since) = (now_total, Instant::now());
        }
        let now = Instant::now();
        if now >= deadline || now.duration_since(since) >= quiet {
            return now_total;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts a subscriber; it runs until `stop_after` distinct deliveries or
/// until `stop` turns true (either way it then reads what is still coming
/// for `drain`, so that a repeat right behind the last message is seen), or
/// until its link fails for good (then it records that it gave up: it is
/// not held to what it did not read). It records an expectation per
/// channel.
pub fn spawn_subscriber(
    spec: SubscriberSpec,
    recorder: Recorder,
    stop: watch::Receiver<bool>,
    drain: Duration,
) -> (Progress, tokio::task::JoinHandle<SubscriberReport>) {
    let progress = Progress::default();
    let counter = progress.0.clone();
    let task = tokio::spawn(async move {
        let mut report = SubscriberReport::default();
        if let Err(e) = subscribe_loop(&spec, &recorder, stop, drain, &counter, &mut report).await {
            // It stopped on its own: not held to what it did not read.
            recorder.abandon(spec.sub, &e.to_string());
            report.error = Some(e.to_string());
        }
        report
    });
    (progress, task)
}

async fn subscribe_loop(
    spec: &SubscriberSpec,
    recorder: &Recorder,
    mut stop: watch::Receiver<bool>,
    drain: Duration,
    counter: &AtomicU64,
    report: &mut SubscriberReport,
) -> Result<(), Error> {
    let ids: Vec<(String, ChannelId)> = spec
        .channels
        .iter()
        .map(|(c, _)| (c.clone(), recorder.channel(c)))
        .collect();
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    // Offsets delivered per channel it asked for (by index in `ids`), for
    // counting by offset.
    let mut had: Vec<Offsets> = vec![Offsets::default(); ids.len()];
    let mut token: Option<String> = None;
    let mut buffer: Vec<Delivery> = Vec::with_capacity(1024);
    let mut latencies: Vec<(Duration, u64)> = Vec::new();
    let mut flushed = std::time::Instant::now();
    let epoch = recorder.epoch();
    let urls: Vec<&str> = spec.url.split(' ').filter(|u| !u.is_empty()).collect();
    // The URL tried next (a cluster node that refuses: the next one).
    let mut at = 0usize;
    let result = loop {
        report.connections += 1;
        let conn = report.connections;
        let url = urls
            .get(at % urls.len().max(1))
            .copied()
            .unwrap_or(&spec.url);
        let mut ws = match connect(url, spec.source).await {
            Ok(ws) => ws,
            Err(e) if conn > 1 && !*stop.borrow() => {
                // The relay may be restarting (or, a cluster node, dead:
                // the next one): try again for a while.
                if conn > 200 {
                    break Err(e);
                }
                at += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => break Err(e),
        };
        let welcome = match hello(&mut ws, token.as_deref(), &last).await {
            Ok(w) => w,
            // A link that dies again during the resume is retried too.
            Err(e) if conn > 1 && conn <= 200 && !*stop.borrow() => {
                let _ = e;
                at += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(e) => break Err(e),
        };
        if token.is_none() {
            token = welcome.token.clone();
            // First connection: subscribe, and say what must arrive.
            for ((name, from), (_, cid)) in spec.channels.iter().zip(&ids) {
                let f = serde_json::json!({"type": "subscribe", "channel": name, "from": (*from).max(1)});
                ws.send(text(&f))
                    .await
                    .map_err(|e| Error::Client(format!("subscribe: {e}")))?;
                recorder.expect(Expectation {
                    sub: spec.sub,
                    channel: *cid,
                    from: (*from).max(1),
                });
            }
        }
        let (_sink, mut stream) = ws.split();
        let mut draining: Option<Instant> = None;
        let ended = loop {
            let frame = if let Some(until) = draining {
                match tokio::time::timeout_at(until, next_text(&mut stream)).await {
                    Ok(f) => f,
                    Err(_) => break None,
                }
            } else {
                tokio::select! {
                    f = next_text(&mut stream) => f,
                    _ = stop.wait_for(|s| *s) => {
                        draining = Some(Instant::now() + drain);
                        continue;
                    }
                }
            };
            let t = match frame {
                Ok(Some(t)) => t,
                Ok(None) => break Some(None),
                Err(code) => break Some(code),
            };
            let Ok(f) = parse(&t) else {
                recorder.suspicious();
                continue;
            };
            if f.kind != "deliver" {
                continue;
            }
            let at = std::time::Instant::now();
            let d = delivery_of(&f, spec.sub, conn, recorder);
            buffer.push(d);
            // Flushed in batches (one lock per batch), and at least twice a
            // second so that the live display is current.
            if buffer.len() >= 1024 || at.duration_since(flushed) >= Duration::from_millis(500) {
                recorder.deliveries(&mut buffer);
                flushed = at;
            }
            let channel = f.channel.as_deref().unwrap_or("");
            let seen = last.entry(channel.to_owned()).or_insert(0);
            if d.offset <= *seen {
                recorder.suspicious();
            }
            *seen = (*seen).max(d.offset);
            // Only what it expects counts: its channels, from the offset
            // asked for, each offset once.
            if let Some(k) = ids.iter().position(|(_, c)| *c == d.channel)
                && d.offset >= spec.channels[k].1.max(1)
                && had[k].insert(d.offset)
            {
                report.delivered += 1;
                counter.fetch_add(1, Ordering::Relaxed);
            }
            if let (PayloadCheck::Latency(sink), Some(p)) = (&spec.payloads, f.payload)
                && let Some(t) = payload_time(p.get())
            {
                let now = at.saturating_duration_since(epoch).as_micros() as u64;
                latencies.push((Duration::from_micros(t), now.saturating_sub(t)));
                if latencies.len() >= 512 {
                    sink.record_all(&mut latencies);
                }
            }
            // Enough: read on for `drain` still, so that a repeat or a
            // stray right behind the last one is seen (and judged) too.
            if draining.is_none() && spec.stop_after.is_some_and(|n| report.delivered >= n) {
                draining = Some(Instant::now() + drain);
            }
            if let Some(d) = spec.read_delay {
                tokio::time::sleep(d).await;
            }
        };
        match ended {
            // Done: enough deliveries, or drained after stop.
            None => break Ok(()),
            Some(code) => {
                report.closes.push(code);
                if *stop.borrow() {
                    break Ok(());
                }
                if !spec.resume {
                    break Err(Error::Client(format!("closed ({code:?}) and not resuming")));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    recorder.deliveries(&mut buffer);
    if let PayloadCheck::Latency(sink) = &spec.payloads {
        sink.record_all(&mut latencies);
    }
    result
}

/// The `"t"` field of a payload object, without parsing the rest.
fn payload_time(payload: &str) -> Option<u64> {
    #[derive(Deserialize)]
    struct T {
        t: Option<u64>,
    }
    serde_json::from_str::<T>(payload).ok()?.t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_count_each_offset_once_in_any_order() {
        let mut o = Offsets::default();
        assert!(o.is_empty());
        for x in [5, 6, 8, 7, 4, 10, 6, 5, 2, 3, 9, 9] {
            o.insert(x);
        }
        assert_eq!(o.len(), 9);
        assert!((2..=10).all(|x| o.contains(x)));
        assert!(!o.contains(1) && !o.contains(11));
        assert_eq!(o.runs.len(), 1);
        assert!(!o.insert(7));
        assert!(o.insert(1));
        assert_eq!(o.len(), 10);
        // After a gap, everything that follows is one run more, not one
        // entry per offset.
        let mut gap = Offsets::default();
        for x in (1..=1000).filter(|x| *x != 3) {
            gap.insert(x);
        }
        assert_eq!((gap.len(), gap.runs.len()), (999, 2));
        assert!(!gap.contains(3));
        assert!(gap.insert(3));
        assert_eq!((gap.len(), gap.runs.len()), (1000, 1));
        assert!(gap.insert(u64::MAX) && gap.contains(u64::MAX));
    }
}

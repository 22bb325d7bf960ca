//! One proxied connection: two pumps and the timers of close/reset toxics.
//! On a WebSocket proxy each pump reads through a [`WsLayer`] and applies the
//! byte toxics to the bytes it hands out; the upstream layer hands the
//! downstream one the proxy's answer to a client's close (`ws_early_close`)
//! through the link.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::ws::{CloseAnswer, Cx, Handshake, WsLayer};
use super::{Protocol, Shared, Stream, Toxic, ToxicKind};

/// How a link is being ended from outside its pumps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Close both sockets (FIN).
    Close,
    /// Reset both sockets (RST).
    Reset,
}

struct Link<'a> {
    shared: &'a Shared,
    id: u64,
    /// Whether each toxic (by name) applies to this link, decided once.
    applies: Mutex<HashMap<String, bool>>,
    end: watch::Sender<Option<End>>,
    /// What the pumps learnt of the WebSocket handshake.
    handshake: watch::Sender<Handshake>,
    /// The proxy's answer to the client's close, from the upstream pump to
    /// the downstream one: set at most once, 4 bytes.
    answer: watch::Sender<Option<CloseAnswer>>,
}

impl Link<'_> {
    /// The toxics of `stream` that apply to this link now.
    fn active(&self, stream: Option<Stream>) -> Vec<Toxic> {
        let toxics = self.shared.toxics.borrow().clone();
        toxics
            .iter()
            .filter(|t| stream.is_none_or(|s| t.stream == s))
            .filter(|t| self.decide(t))
            .cloned()
            .collect()
    }

    fn decide(&self, toxic: &Toxic) -> bool {
        if toxic.toxicity <= 0.0 {
            return false;
        }
        if toxic.toxicity >= 1.0 {
            return true;
        }
        let mut applies = self.applies.lock().unwrap_or_else(|p| p.into_inner());
        *applies.entry(toxic.name.clone()).or_insert_with(|| {
            let mut h = DefaultHasher::new();
            (self.shared.seed, self.id, &toxic.name).hash(&mut h);
            StdRng::seed_from_u64(h.finish()).random_bool(toxic.toxicity)
        })
    }

    /// Whether data on `stream` must be held now (blackhole or partition).
    fn held(&self, stream: Stream) -> Option<Option<Instant>> {
        if let Some(p) = *self.shared.partition.borrow()
            && p.until > Instant::now()
        {
            return Some(Some(p.until));
        }
        self.active(Some(stream))
            .iter()
            .any(|t| matches!(t.kind, ToxicKind::Timeout { .. }))
            .then_some(None)
    }

    /// The frame toxics of `stream` that apply to this link now.
    fn frame_toxics(&self, stream: Stream) -> Vec<Toxic> {
        let mut toxics = self.active(Some(stream));
        toxics.retain(|t| t.kind.frame_filter().is_some());
        toxics
    }

    fn cx<'b>(&'b self, toxics: &'b [Toxic]) -> Cx<'b> {
        Cx {
            shared: self.shared,
            toxics,
            handshake: &self.handshake,
            answer: &self.answer,
        }
    }

    fn rng(&self, stream: Stream) -> StdRng {
        let mut h = DefaultHasher::new();
        (self.shared.seed, self.id, stream).hash(&mut h);
        StdRng::seed_from_u64(h.finish())
    }
}

/// Runs a connection until both directions end, it is cut, or a toxic ends it.
pub(crate) async fn run(shared: &Arc<Shared>, id: u64, client: TcpStream, stop: Arc<Notify>) {
    let link = Link {
        shared,
        id,
        applies: Mutex::new(HashMap::new()),
        end: watch::Sender::new(None),
        handshake: watch::Sender::new(Handshake::Pending),
        answer: watch::Sender::new(None),
    };
    // A partition that hangs new connections holds this one before it reaches
    // the upstream.
    let mut partition = shared.partition.subscribe();
    loop {
        let until = match *partition.borrow_and_update() {
            Some(p) if p.until > Instant::now() => p.until,
            _ => break,
        };
        tokio::select! {
            _ = tokio::time::sleep_until(until) => {}
            _ = partition.changed() => {}
            _ = stop.notified() => return,
        }
    }
    let server = match TcpStream::connect(shared.upstream).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(proxy = %shared.name, error = %e, "upstream refused; dropping the client");
            reset(&client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();

    let up = pump(&link, Stream::Upstream, client_read, server_write);
    let down = pump(&link, Stream::Downstream, server_read, client_write);
    tokio::select! {
        _ = async { tokio::join!(up, down) } => {}
        _ = async {
            tokio::select! {
                _ = stop.notified() => { link.end.send_replace(Some(End::Close)); }
                _ = close_timers(&link) => {}
            }
            // Let the pumps see the end and drop their sockets.
            std::future::pending::<()>().await
        } => {}
    }
}

/// Ends the link when a `timeout` (with a close time) or `reset_peer` toxic
/// has applied for its time.
async fn close_timers(link: &Link<'_>) {
    let mut toxics = link.shared.toxics.subscribe();
    let mut since: HashMap<String, Instant> = HashMap::new();
    loop {
        let now = Instant::now();
        let active = link.active(None);
        since.retain(|name, _| active.iter().any(|t| &t.name == name));
        let mut next: Option<(Instant, End)> = None;
        for t in &active {
            let (after, end) = match t.kind {
                ToxicKind::Timeout { timeout } if timeout > 0 => (timeout, End::Close),
                ToxicKind::ResetPeer { timeout } => (timeout, End::Reset),
                _ => continue,
            };
            let start = *since.entry(t.name.clone()).or_insert(now);
            let at = start + Duration::from_millis(after);
            if next.is_none_or(|(n, _)| at < n) {
                next = Some((at, end));
            }
        }
        let sleep = async {
            match next {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sleep => {
                if let Some((_, end)) = next {
                    link.end.send_replace(Some(end));
                    return;
                }
            }
            changed = toxics.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
    }
}

fn reset(stream: &TcpStream) {
    // SO_LINGER 0 makes close send RST. Tokio deprecates set_linger because
    // a non-zero linger blocks the thread on drop; zero does not block.
    #[allow(deprecated)]
    let _ = stream.set_linger(Some(Duration::ZERO));
}

/// Forwards one direction, applying the toxics of that stream chunk by chunk.
async fn pump(link: &Link<'_>, stream: Stream, mut from: OwnedReadHalf, mut to: OwnedWriteHalf) {
    if forward(link, stream, &mut from, &mut to).await == Some(End::Reset) {
        reset(from.as_ref());
        reset(to.as_ref());
        // Dropping a write half sends FIN, which would reach the peer before
        // the RST; forgetting it leaves the close to the read half.
        to.forget();
    }
}

/// The pump's loop; returns how the link was ended from outside, if it was.
async fn forward(
    link: &Link<'_>,
    stream: Stream,
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
) -> Option<End> {
    let mut ws =
        (link.shared.protocol == Protocol::WebSocket).then(|| WsLayer::new(stream, link.id));
    let how = forward_through(link, stream, from, to, &mut ws).await;
    if let Some(ws) = &mut ws {
        // Messages still held by a reorder never reach the other side.
        let toxics = link.frame_toxics(stream);
        ws.abandon(&link.cx(&toxics));
    }
    how
}

/// What a pump got to forward next.
enum Got {
    /// The first n bytes of the read buffer.
    Read(usize),
    /// Bytes from the WebSocket layer, due since the instant.
    Layer(Vec<u8>, Instant),
    /// The source closed.
    Eof,
}

/// [`forward`] with the WebSocket layer, if any; `ws` becomes `None` when
/// the link turns out not to be WebSocket.
async fn forward_through(
    link: &Link<'_>,
    stream: Stream,
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    ws: &mut Option<WsLayer>,
) -> Option<End> {
    let mut end = link.end.subscribe();
    let mut toxics = link.shared.toxics.subscribe();
    let mut partition = link.shared.partition.subscribe();
    let mut rng = link.rng(stream);
    let mut buf = vec![0u8; 128 * 1024];
    let mut passed: u64 = 0;
    let mut closed_early = false;
    let pipe =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC).ok();
    if let Some((_, pipe_in)) = &pipe {
        // A larger pipe moves more per wake-up; the default is 64 KiB.
        let _ = nix::fcntl::fcntl(pipe_in, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
    }
    loop {
        if ws.as_ref().is_some_and(WsLayer::is_raw) {
            *ws = None;
        }
        // While nothing is to be done to the bytes, move them socket to pipe
        // to socket in the kernel (splice), without copying them through here.
        if let (Some(pipe), None) = (&pipe, &ws) {
            match splice_while_clean(link, stream, from, to, pipe, &mut end).await {
                Spliced::Dirty => {}
                Spliced::Eof => {
                    let _ = to.shutdown().await;
                    return None;
                }
                Spliced::Failed => return None,
                Spliced::Ended(how) => return how,
            }
        }
        let got = match ws.as_mut() {
            None => tokio::select! {
                r = from.read(&mut buf) => match r.unwrap_or(0) {
                    0 => Got::Eof,
                    n => Got::Read(n),
                },
                _ = end.changed() => {
                    return *end.borrow();
                }
            },
            Some(layer) => {
                match next_from_layer(link, stream, layer, from, &mut buf, &mut end).await {
                    Ok(got) => got,
                    Err(how) => return how,
                }
            }
        };
        let (chunk, read_at): (&[u8], Instant) = match &got {
            Got::Read(n) => (&buf[..*n], Instant::now()),
            Got::Layer(bytes, at) => (bytes, *at),
            Got::Eof => (&[], Instant::now()),
        };
        let n = chunk.len();
        if matches!(got, Got::Eof) {
            // The source closed: pass the close on, late if a slow_close says so.
            let delay: u64 = link
                .active(Some(stream))
                .iter()
                .filter_map(|t| match t.kind {
                    ToxicKind::SlowClose { delay } => Some(delay),
                    _ => None,
                })
                .max()
                .unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(delay)).await;
            let _ = to.shutdown().await;
            return None;
        }
        if n == 0 {
            // The WebSocket layer found the link is not WebSocket and had
            // nothing left to hand out.
            continue;
        }

        // Blackholes and partitions hold the data until they are lifted.
        while let Some(until) = link.held(stream) {
            let sleep = async {
                match until {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = sleep => {}
                _ = toxics.changed() => {}
                _ = partition.changed() => {}
                _ = end.changed() => {
                    return *end.borrow();
                }
            }
        }

        let active = link.active(Some(stream));
        let mut delay = Duration::ZERO;
        let mut limit: Option<u64> = None;
        let mut slicer = None;
        let mut rate: Option<u64> = None;
        for t in &active {
            match t.kind {
                ToxicKind::Latency { latency, jitter } => {
                    let j = if jitter > 0 {
                        rng.random_range(0..=2 * jitter)
                    } else {
                        jitter
                    };
                    delay += Duration::from_millis((latency + j).saturating_sub(jitter));
                }
                ToxicKind::LimitData { bytes } => {
                    limit = Some(limit.map_or(bytes, |l| l.min(bytes)))
                }
                ToxicKind::Slicer {
                    average_size,
                    size_variation,
                    delay,
                } => {
                    slicer = Some((average_size, size_variation, delay));
                }
                ToxicKind::Bandwidth { rate: r } => rate = Some(rate.map_or(r, |x| x.min(r))),
                _ => {}
            }
        }
        if !delay.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep_until(read_at + delay) => {}
                _ = end.changed() => {
                    return *end.borrow();
                }
            }
        }
        let allowed = limit.map_or(n, |l| (l.saturating_sub(passed)).min(n as u64) as usize);
        let chunk = &chunk[..allowed];
        let written = match (slicer, rate) {
            (Some((avg, var, gap)), _) => write_sliced(to, chunk, avg, var, gap, &mut rng).await,
            (None, Some(kib)) => write_paced(to, chunk, kib).await,
            (None, None) => to.write_all(chunk).await,
        };
        if written.is_err() {
            return None;
        }
        passed += allowed as u64;
        link.shared.count(stream, allowed);
        if ws.as_ref().is_some_and(WsLayer::answered_close) && !closed_early {
            // The proxy answered the client's close and the answer is out:
            // like a terminating intermediary, it closes its connection to
            // the client first (RFC 6455 7.1.1), and goes on reading the
            // server so that the server's answer meets no reset.
            let _ = to.shutdown().await;
            closed_early = true;
        }
        if limit.is_some_and(|l| passed >= l) {
            // Enough bytes went through: close the whole connection.
            link.end.send_replace(Some(End::Close));
            return None;
        }
    }
}

/// The next bytes the WebSocket layer hands out, reading the source and
/// waiting for its timers as needed; `Err` if the link was ended from outside.
async fn next_from_layer(
    link: &Link<'_>,
    stream: Stream,
    layer: &mut WsLayer,
    from: &mut OwnedReadHalf,
    buf: &mut [u8],
    end: &mut watch::Receiver<Option<End>>,
) -> Result<Got, Option<End>> {
    let mut toxics = link.shared.toxics.subscribe();
    let mut handshake = link.handshake.subscribe();
    let mut answer = link.answer.subscribe();
    loop {
        handshake.borrow_and_update();
        answer.borrow_and_update();
        toxics.borrow_and_update();
        let now = Instant::now();
        let frame_toxics = link.frame_toxics(stream);
        layer.advance(&link.cx(&frame_toxics), now);
        if let Some((bytes, at)) = layer.take_ready(now) {
            return Ok(Got::Layer(bytes, at));
        }
        if layer.is_done() {
            return Ok(Got::Eof);
        }
        if layer.is_raw() {
            return Ok(Got::Layer(Vec::new(), now));
        }
        let wake = layer.wake_at();
        let read = layer.wants_input();
        let sleep = async {
            match wake {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = from.read(buf), if read => {
                let n = r.unwrap_or(0);
                let frame_toxics = link.frame_toxics(stream);
                let cx = link.cx(&frame_toxics);
                if n == 0 {
                    layer.finish(&cx, Instant::now());
                } else {
                    layer.push(&cx, &buf[..n], Instant::now());
                }
            }
            _ = sleep => {}
            _ = toxics.changed() => {}
            _ = handshake.changed() => {}
            _ = answer.changed() => {}
            _ = end.changed() => return Err(*end.borrow()),
        }
    }
}

enum Spliced {
    /// A toxic or a partition is in force: use the copying path.
    Dirty,
    /// The source closed.
    Eof,
    /// A socket failed.
    Failed,
    /// The link was ended from outside.
    Ended(Option<End>),
}

fn clean(link: &Link<'_>) -> bool {
    link.shared.toxics.borrow().is_empty() && link.shared.partition.borrow().is_none()
}

/// Forwards with splice(2) for as long as no toxic or partition is in force.
async fn splice_while_clean(
    link: &Link<'_>,
    stream: Stream,
    from: &OwnedReadHalf,
    to: &OwnedWriteHalf,
    pipe: &(std::os::fd::OwnedFd, std::os::fd::OwnedFd),
    end: &mut watch::Receiver<Option<End>>,
) -> Spliced {
    use nix::fcntl::{SpliceFFlags, splice};
    use tokio::io::Interest;
    let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
    let (pipe_out, pipe_in) = pipe;
    let (src, dst) = (from.as_ref(), to.as_ref());
    let mut toxics = link.shared.toxics.subscribe();
    let mut partition = link.shared.partition.subscribe();
    loop {
        if !clean(link) {
            return Spliced::Dirty;
        }
        tokio::select! {
            ready = src.readable() => {
                if ready.is_err() {
                    return Spliced::Failed;
                }
            }
            _ = toxics.changed() => continue,
            _ = partition.changed() => continue,
            _ = end.changed() => return Spliced::Ended(*end.borrow()),
        }
        // A toxic added while we waited must see these bytes.
        if !clean(link) {
            return Spliced::Dirty;
        }
        let moved = src.try_io(Interest::READABLE, || {
            splice(src, None, pipe_in, None, 1 << 20, flags).map_err(std::io::Error::from)
        });
        let n = match moved {
            Ok(0) => return Spliced::Eof,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return Spliced::Failed,
        };
        let mut left = n;
        while left > 0 {
            if dst.writable().await.is_err() {
                return Spliced::Failed;
            }
            let sent = dst.try_io(Interest::WRITABLE, || {
                splice(pipe_out, None, dst, None, left, flags).map_err(std::io::Error::from)
            });
            match sent {
                Ok(m) => left -= m,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return Spliced::Failed,
            }
        }
        link.shared.count(stream, n);
    }
}

/// Writes at `kib` KiB/s: a tenth of a second's worth at a time, each slice
/// after the time the previous one took at that rate.
async fn write_paced(to: &mut OwnedWriteHalf, mut chunk: &[u8], kib: u64) -> std::io::Result<()> {
    let per_second = (kib * 1024) as f64;
    let slice = ((per_second / 10.0) as usize).max(1);
    while !chunk.is_empty() {
        let n = slice.min(chunk.len());
        tokio::time::sleep(Duration::from_secs_f64(n as f64 / per_second)).await;
        to.write_all(&chunk[..n]).await?;
        chunk = &chunk[n..];
    }
    Ok(())
}

async fn write_sliced(
    to: &mut OwnedWriteHalf,
    mut chunk: &[u8],
    average: usize,
    variation: usize,
    gap_us: u64,
    rng: &mut StdRng,
) -> std::io::Result<()> {
    while !chunk.is_empty() {
        let lo = average.saturating_sub(variation).max(1);
        let size = rng.random_range(lo..=average + variation).min(chunk.len());
        to.write_all(&chunk[..size]).await?;
        to.flush().await?;
        chunk = &chunk[size..];
        if !chunk.is_empty() && gap_us > 0 {
            tokio::time::sleep(Duration::from_micros(gap_us)).await;
        }
    }
    Ok(())
}

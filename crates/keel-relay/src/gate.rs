//! Socket reads charged to the relay's inbound byte budget before they
//! happen. Every WebSocket connection's TCP stream is wrapped in a
//! [`Gated`] stream: once the connection is open, each read from the
//! kernel first takes room in the budget (in [`CHUNK`]-byte steps), and the
//! bytes stay charged until the frame they belong to has been handled. A
//! frame being read, or read and waiting for its publish to get room, is
//! therefore inside the budget however many connections send one at once;
//! when the budget is spent, reads pause for everyone, first come first
//! served, and TCP pushes back on the clients.
//!
//! Light connections do not queue behind heavy ones: a connection with at
//! most [`LIGHT`] bytes charged (a client sending small frames) that finds
//! the budget spent takes room from the budget's reserve instead, and
//! waits for whichever frees first. The reserve is an eighth of the
//! inbound budget, so it takes thousands of connections, each in the
//! middle of a large frame, to spend it.
//!
//! A frame must arrive within the frame timeout of its first byte: a
//! connection that starts frames and stops sending would otherwise hold
//! its charge until the idle timeout, and a few hundred of them the whole
//! budget. Past it, the read fails (`TimedOut`) and the connection ends.
//!
//! What is not charged: the HTTP request before the upgrade (bounded by
//! `max_header_bytes`) and, after a frame is handled, the start of the next
//! one if the same kernel read brought it in (at most one read buffer, 4
//! KiB, per connection).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Duration, Instant, Sleep};

use crate::limits::Budget;

/// Room taken from the budget at a time. Small, so that a client that
/// trickles a frame holds only about what it sent.
pub(crate) const CHUNK: usize = 8 * 1024;

/// Bytes charged at most for a connection to count as light.
pub(crate) const LIGHT: usize = 2 * CHUNK;

/// Room from the budget; `true` when it came from the reserve.
type Acquire = Pin<Box<dyn Future<Output = Option<(OwnedSemaphorePermit, bool)>> + Send>>;

#[derive(Default)]
struct State {
    active: bool,
    /// Bytes charged: read since the last release, plus unused room.
    charge: Option<OwnedSemaphorePermit>,
    /// The part of the charge taken from the reserve.
    light: Option<OwnedSemaphorePermit>,
    /// Of the charge (both parts), bytes read.
    used: usize,
    /// Waiting for room.
    waiting: Option<Acquire>,
    /// When the first byte of the frame being read was read.
    started: Option<Instant>,
}

impl State {
    /// Bytes charged, both parts.
    fn charged(&self) -> usize {
        let n = |p: &Option<OwnedSemaphorePermit>| p.as_ref().map_or(0, |p| p.num_permits());
        n(&self.charge) + n(&self.light)
    }
}

/// One connection's account with the inbound budget.
pub(crate) struct ReadGate {
    budget: Budget,
    frame_timeout: Duration,
    state: Mutex<State>,
}

/// Room a publish keeps until it is answered: taken from its frame's
/// charge (the budget's part, the reserve's, or both) and, for what the
/// charge did not cover, from the budget.
/// A publish takes at most three parts (its frame's charge, the reserve's
/// part of it, what the budget adds): they are held inline, without an
/// allocation per publish.
#[derive(Default)]
pub(crate) struct Room([Option<OwnedSemaphorePermit>; 3], Vec<OwnedSemaphorePermit>);

impl Room {
    /// Bytes it holds.
    pub(crate) fn bytes(&self) -> usize {
        self.0
            .iter()
            .flatten()
            .chain(&self.1)
            .map(|p| p.num_permits())
            .sum()
    }

    pub(crate) fn add(&mut self, p: OwnedSemaphorePermit) {
        match self.0.iter_mut().find(|slot| slot.is_none()) {
            Some(slot) => *slot = Some(p),
            None => self.1.push(p),
        }
    }
}

impl ReadGate {
    pub(crate) fn new(budget: Budget, frame_timeout: Duration) -> Arc<ReadGate> {
        Arc::new(ReadGate {
            budget,
            frame_timeout,
            state: Mutex::default(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads are charged from now on.
    pub(crate) fn activate(&self) {
        self.state().active = true;
    }

    /// Bytes charged now (read and not released, plus unused room).
    #[cfg(test)]
    pub(crate) fn charged(&self) -> usize {
        self.state().charged()
    }

    /// The frame that was read is handled: what it was charged goes back.
    pub(crate) fn release(&self) {
        let mut s = self.state();
        s.charge = None;
        s.light = None;
        s.used = 0;
        s.started = None;
    }

    /// The connection's reads are over: everything charged, and any wait
    /// for room, goes back at once (not when the socket is dropped).
    pub(crate) fn close(&self) {
        let mut s = self.state();
        *s = State::default();
    }

    /// Moves up to `n` bytes of the charge to the caller (a publish that
    /// holds its payload until it is answered); the room returned may hold
    /// less when the frame's start was read uncharged.
    pub(crate) fn take(&self, n: usize) -> Room {
        let mut guard = self.state();
        let s = &mut *guard;
        let mut room = Room::default();
        let mut want = n.max(1);
        for part in [&mut s.charge, &mut s.light] {
            let Some(p) = part.as_mut() else { continue };
            let k = want.min(p.num_permits());
            if k == 0 {
                continue;
            }
            if let Some(t) = p.split(k) {
                room.add(t);
                want -= k;
            }
        }
        let taken = room.bytes();
        s.used = s.used.saturating_sub(taken);
        room
    }

    /// When the frame being read must be complete.
    fn frame_deadline(&self) -> Option<Instant> {
        let s = self.state();
        if !s.active {
            return None;
        }
        s.started.map(|t| t + self.frame_timeout)
    }

    /// Room to read now, in bytes: 0 means it is waiting for the budget
    /// (the waker is registered).
    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<usize> {
        let mut s = self.state();
        if !s.active {
            return Poll::Ready(usize::MAX);
        }
        loop {
            let room = s.charged() - s.used;
            if room > 0 {
                return Poll::Ready(room);
            }
            let light = s.charged() + CHUNK <= LIGHT;
            let more = match s.waiting.as_mut() {
                Some(w) => ready!(w.as_mut().poll(cx)),
                None => match self.budget.try_acquire(CHUNK) {
                    Some(p) => Some((p, false)),
                    None => match light.then(|| self.budget.try_reserve(CHUNK)).flatten() {
                        Some(p) => Some((p, true)),
                        None => {
                            crate::limits::hit("global_bytes");
                            let budget = self.budget.clone();
                            s.waiting = Some(if light {
                                Box::pin(async move { budget.acquire_light(CHUNK).await })
                            } else {
                                Box::pin(
                                    async move { budget.acquire(CHUNK).await.map(|p| (p, false)) },
                                )
                            });
                            continue;
                        }
                    },
                },
            };
            s.waiting = None;
            let Some((more, reserved)) = more else {
                // The budget is closed: read uncharged rather than hang.
                return Poll::Ready(usize::MAX);
            };
            let part = if reserved {
                &mut s.light
            } else {
                &mut s.charge
            };
            match part.as_mut() {
                Some(c) => c.merge(more),
                None => *part = Some(more),
            }
        }
    }

    /// Whether the next read must first take room (it then waits for the
    /// socket to hold data: an idle connection holds no room).
    fn needs_room(&self) -> bool {
        let s = self.state();
        s.active && s.waiting.is_none() && s.charged() <= s.used
    }

    /// A read found no data: room taken for nothing read goes back, so an
    /// idle connection holds none.
    fn idle(&self) {
        let mut s = self.state();
        if s.used == 0 {
            s.charge = None;
            s.light = None;
        }
    }

    fn used(&self, n: usize) {
        let mut s = self.state();
        if s.active && (s.charge.is_some() || s.light.is_some()) {
            s.used += n;
            if n > 0 && s.started.is_none() {
                s.started = Some(Instant::now());
            }
        }
    }
}

/// A TCP stream whose reads are charged through its [`ReadGate`].
pub(crate) struct Gated {
    inner: TcpStream,
    gate: Arc<ReadGate>,
    /// Armed at the frame deadline while a started frame waits for data.
    timer: Option<Pin<Box<Sleep>>>,
    /// Bytes read since the connection's task last gave its worker back.
    since_yield: usize,
}

/// Bytes a connection reads before its task yields to the others on its
/// runtime worker. The WebSocket layer reads a large frame 4 KiB at a
/// time, and the runtime lets a task read up to 128 times before it must
/// yield: half a megabyte and half a millisecond, during which a light
/// connection woken on the same worker waits, behind every other
/// connection in the middle of a large frame.
pub(crate) const YIELD_BYTES: usize = 64 * 1024;

impl Gated {
    pub(crate) fn new(inner: TcpStream, gate: Arc<ReadGate>) -> Gated {
        Gated {
            inner,
            gate,
            timer: None,
            since_yield: 0,
        }
    }

    /// The socket has no data: fails once a started frame is past its
    /// deadline, else makes sure the task wakes then.
    fn starved(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.since_yield = 0;
        self.gate.idle();
        let Some(deadline) = self.gate.frame_deadline() else {
            self.timer = None;
            return Poll::Pending;
        };
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        if timer.as_mut().poll(cx).is_ready() {
            crate::limits::hit("frame_timeout");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "a frame was not complete within the frame timeout",
            )));
        }
        Poll::Pending
    }
}

impl AsyncRead for Gated {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.since_yield >= YIELD_BYTES {
            self.since_yield = 0;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if self.gate.needs_room() && self.inner.poll_read_ready(cx)?.is_pending() {
            return self.starved(cx);
        }
        let room = ready!(self.gate.poll_room(cx));
        if room >= buf.remaining() {
            let before = buf.filled().len();
            if Pin::new(&mut self.inner).poll_read(cx, buf)?.is_pending() {
                return self.starved(cx);
            }
            let n = buf.filled().len() - before;
            self.gate.used(n);
            self.since_yield += n;
            return Poll::Ready(Ok(()));
        }
        // Read no more than the room charged (through a small copy: the
        // caller's buffer is larger than one chunk only rarely).
        let mut tmp = [0u8; CHUNK];
        let k = room.min(CHUNK);
        let mut part = ReadBuf::new(&mut tmp[..k]);
        if Pin::new(&mut self.inner)
            .poll_read(cx, &mut part)?
            .is_pending()
        {
            return self.starved(cx);
        }
        let n = part.filled().len();
        buf.put_slice(part.filled());
        self.gate.used(n);
        self.since_yield += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Gated {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair(gate: Arc<ReadGate>) -> (TcpStream, Gated) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, Gated::new(server, gate))
    }

    #[tokio::test]
    async fn reads_pause_when_the_budget_is_spent_and_resume_on_release() {
        let budget = Budget::new(CHUNK * 2);
        let a = ReadGate::new(budget.clone(), Duration::from_secs(60));
        a.activate();
        let (mut client, mut a_io) = pair(a.clone()).await;
        // An idle connection holds nothing.
        let idle = tokio::time::timeout(Duration::from_millis(50), a_io.read(&mut [0u8; 16])).await;
        assert!(idle.is_err());
        assert_eq!(budget.held(), 0, "no data, no charge");
        client.write_all(&vec![7u8; CHUNK * 3]).await.unwrap();
        let mut buf = vec![0u8; CHUNK * 3];
        // Two chunks of room: two chunks read, then it waits.
        let mut got = 0;
        while got < CHUNK * 2 {
            got += a_io.read(&mut buf[got..]).await.unwrap();
        }
        assert_eq!(got, CHUNK * 2);
        assert_eq!(a.charged(), CHUNK * 2);
        assert_eq!(budget.held(), CHUNK * 2);
        let more =
            tokio::time::timeout(Duration::from_millis(50), a_io.read(&mut buf[got..])).await;
        assert!(more.is_err(), "a read past the budget waits");
        // A publish keeps one chunk; the rest goes back, straight to the
        // read that waits for it, and reading resumes.
        let kept = a.take(CHUNK);
        assert_eq!(kept.bytes(), CHUNK, "the charge covers it");
        a.release();
        assert_eq!(
            budget.held(),
            2 * CHUNK,
            "the kept chunk and the waiting read's"
        );
        let n = a_io.read(&mut buf[got..]).await.unwrap();
        assert!(n > 0 && n <= CHUNK);
        drop(kept);
        a.release();
        assert_eq!(budget.held(), 0);
    }

    /// A connection reading a large frame gives its worker back after
    /// [`YIELD_BYTES`]: the read is pending, the task is woken at once to
    /// go on, and it goes on where it stopped.
    #[tokio::test]
    async fn a_large_read_yields_its_worker_every_64_kib() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        struct Count(AtomicUsize);
        impl futures::task::ArcWake for Count {
            fn wake_by_ref(me: &Arc<Self>) {
                me.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let budget = Budget::new(1 << 20);
        let gate = ReadGate::new(budget, Duration::from_secs(60));
        gate.activate();
        let (mut client, mut io) = pair(gate.clone()).await;
        let sent = 3 * YIELD_BYTES;
        client.write_all(&vec![7u8; sent]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let wakes = Arc::new(Count(AtomicUsize::new(0)));
        let waker = futures::task::waker(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut chunk = [0u8; 4096];
        let (mut got, mut yields, mut waits) = (0, Vec::new(), 0);
        while got < sent && waits < 100 {
            let mut buf = ReadBuf::new(&mut chunk);
            let before = wakes.0.load(Ordering::SeqCst);
            match Pin::new(&mut io).poll_read(&mut cx, &mut buf) {
                Poll::Ready(r) => {
                    r.unwrap();
                    got += buf.filled().len();
                }
                // Woken before it returned: a yield, not a wait for data.
                Poll::Pending if wakes.0.load(Ordering::SeqCst) > before => yields.push(got),
                Poll::Pending => {
                    waits += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        assert_eq!(got, sent, "every byte read, across the yields");
        assert_eq!(
            yields,
            vec![YIELD_BYTES, 2 * YIELD_BYTES],
            "pending once every {YIELD_BYTES} bytes, and woken at once"
        );
        gate.release();
    }

    /// A connection sending a small frame reads at once from the reserve
    /// while a heavy one waits for the spent budget; the heavy one never
    /// takes the reserve past its first chunks.
    #[tokio::test]
    async fn light_connections_do_not_queue_behind_heavy_ones() {
        let budget = Budget::with_reserve(4 * CHUNK, 2 * CHUNK);
        let heavy = ReadGate::new(budget.clone(), Duration::from_secs(60));
        heavy.activate();
        let (mut heavy_client, mut heavy_io) = pair(heavy.clone()).await;
        heavy_client.write_all(&vec![7u8; CHUNK * 5]).await.unwrap();
        let mut buf = vec![0u8; CHUNK * 5];
        let mut got = 0;
        while got < CHUNK * 2 {
            got += heavy_io.read(&mut buf[got..]).await.unwrap();
        }
        let more =
            tokio::time::timeout(Duration::from_millis(50), heavy_io.read(&mut buf[got..])).await;
        assert!(more.is_err(), "the heavy reader waits for the budget");
        assert_eq!(
            heavy.charged(),
            2 * CHUNK,
            "from the budget, not the reserve"
        );

        let light = ReadGate::new(budget.clone(), Duration::from_secs(60));
        light.activate();
        let (mut light_client, mut light_io) = pair(light.clone()).await;
        light_client.write_all(&[1u8; 100]).await.unwrap();
        let mut small = [0u8; 100];
        let n = tokio::time::timeout(Duration::from_secs(5), light_io.read(&mut small))
            .await
            .expect("a light reader does not wait behind the heavy one")
            .unwrap();
        assert_eq!(n, 100);
        assert_eq!(budget.held(), 3 * CHUNK);
        // Its publish keeps its payload's share; the rest goes back.
        let kept = light.take(100);
        assert_eq!(kept.bytes(), 100, "the reserve's chunk covers it");
        light.release();
        assert_eq!(budget.held(), 2 * CHUNK + 100);
        drop(kept);
        heavy.release();
        assert_eq!(
            budget.held(),
            CHUNK,
            "only the heavy reader's waiting read's"
        );
    }

    /// A frame that stops arriving fails the read at the frame timeout,
    /// and closing the gate gives its charge back at once; a connection
    /// idle between frames is never timed out.
    #[tokio::test]
    async fn a_stalled_frame_times_out_and_close_frees_its_charge() {
        let budget = Budget::new(4 * CHUNK);
        let gate = ReadGate::new(budget.clone(), Duration::from_millis(200));
        gate.activate();
        let (mut client, mut io) = pair(gate.clone()).await;
        let mut buf = vec![0u8; CHUNK];
        let idle = tokio::time::timeout(Duration::from_millis(400), io.read(&mut buf)).await;
        assert!(idle.is_err(), "no frame started: no timeout");
        client.write_all(&[1u8; 100]).await.unwrap();
        assert_eq!(io.read(&mut buf).await.unwrap(), 100);
        let stalled = tokio::time::timeout(Duration::from_secs(5), io.read(&mut buf))
            .await
            .expect("the frame timeout ends the read");
        assert_eq!(
            stalled.unwrap_err().kind(),
            io::ErrorKind::TimedOut,
            "the stalled frame fails"
        );
        assert_eq!(budget.held(), CHUNK);
        gate.close();
        assert_eq!(budget.held(), 0, "closed: nothing charged");
    }

    /// A publish keeps what its frame was charged, from both parts, and
    /// says how much that covers.
    #[tokio::test]
    async fn take_moves_room_from_both_parts() {
        let budget = Budget::with_reserve(4 * CHUNK, 2 * CHUNK);
        let gate = ReadGate::new(budget.clone(), Duration::from_secs(60));
        gate.activate();
        {
            let mut s = gate.state();
            s.charge = budget.try_acquire(CHUNK);
            s.light = budget.try_reserve(CHUNK);
            s.used = 2 * CHUNK;
        }
        let room = gate.take(CHUNK + 100);
        assert_eq!(room.bytes(), CHUNK + 100);
        let short = gate.take(2 * CHUNK);
        assert_eq!(short.bytes(), CHUNK - 100, "only what was left");
        gate.release();
        assert_eq!(budget.held(), 2 * CHUNK);
        drop((room, short));
        assert_eq!(budget.held(), 0);
    }

    #[tokio::test]
    async fn inactive_gate_reads_uncharged() {
        let budget = Budget::new(CHUNK);
        let gate = ReadGate::new(budget.clone(), Duration::from_secs(60));
        let (mut client, mut io) = pair(gate.clone()).await;
        client.write_all(&[1u8; 3 * CHUNK]).await.unwrap();
        let mut buf = vec![0u8; 3 * CHUNK];
        io.read_exact(&mut buf).await.unwrap();
        assert_eq!(budget.held(), 0);
        assert_eq!(gate.charged(), 0);
    }
}

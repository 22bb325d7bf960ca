//! The WebSocket layer of one pump: reads the HTTP/1.1 handshake, then RFC
//! 6455 frames, applies frame toxics to whole text messages, and says which
//! bytes to forward and when. It does no I/O (the pump in `link.rs` drives
//! it), so it is tested here with tokio's paused time.
//!
//! Bytes no frame toxic acts on are forwarded as they came. Only unfragmented
//! or reassembled text messages without RSV bits, up to [`MAX_MESSAGE`], are
//! inspected, and only while a frame toxic is in force on the stream;
//! everything else passes untouched, streamed as it arrives.
//!
//! A `ws_early_close` acts on the client's close frame instead: the upstream
//! layer holds it and hands the downstream layer, through the link's
//! [`CloseAnswer`] slot, a close frame to send the client at once; from then
//! on the downstream layer forwards nothing more from the server.

use std::collections::{HashMap, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value};
use tokio::sync::watch;
use tokio::time::Instant;

use super::frame::{self, Header};
use super::tamper::{TamperAction, Tampering, scalar_fields, truncate};
use super::{FrameCount, Shared, Stream, Toxic, ToxicKind};

/// What a link's pumps learnt of its handshake, shared between the two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Handshake {
    /// Not known yet.
    Pending,
    /// The server answered 101: frames follow in both directions.
    Upgraded,
    /// Not a WebSocket connection: raw bytes for the rest of its life.
    Raw,
}

/// The longest HTTP header block read before giving up on the handshake.
pub(super) const MAX_HEADER_BLOCK: usize = 64 * 1024;

/// The largest message (one frame, or a reassembled fragmented message)
/// inspected; larger ones pass untouched.
pub(super) const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// The proxy's own answer to the client's close (`ws_early_close`), passed
/// from the upstream layer to the downstream one: at most one per link, a
/// 4-byte frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct CloseAnswer {
    /// The close frame for the client: unmasked, the client's status code.
    pub(super) frame: Vec<u8>,
    /// The toxic's name.
    pub(super) toxic: String,
}

/// What the layer needs from its proxy and link on each step.
pub(super) struct Cx<'a> {
    /// The proxy: seed, tampering record, limits, counters.
    pub(super) shared: &'a Shared,
    /// The frame toxics in force on this stream for this link, in order.
    pub(super) toxics: &'a [Toxic],
    /// The link's handshake state.
    pub(super) handshake: &'a watch::Sender<Handshake>,
    /// The proxy's answer to the client's close, once there is one.
    pub(super) answer: &'a watch::Sender<Option<CloseAnswer>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Upstream: reading the client's request.
    Request,
    /// Upstream: the request went through; waiting for the server's answer.
    AwaitResponse,
    /// Downstream: reading the server's response.
    Response,
    /// Frames in both directions.
    Frames,
    /// Not WebSocket: bytes pass as they come.
    Raw,
}

/// Bytes to forward, not before `ready_at`.
struct Out {
    bytes: Vec<u8>,
    ready_at: Instant,
}

/// A fragmented text message being reassembled.
struct Assembly {
    /// The original frames, as they came.
    raw: Vec<u8>,
    /// The unmasked payload so far.
    payload: Vec<u8>,
    /// The first frame's mask key, reused if the message is rewritten.
    mask: Option<[u8; 4]>,
    /// Frames so far.
    frames: u64,
}

/// A message held by a `ws_reorder` toxic.
struct Hold {
    toxic: String,
    bytes: Vec<u8>,
    ready_at: Instant,
    fields: Map<String, Value>,
    /// The values of the toxic's `same` fields.
    key: Vec<Option<Value>>,
    deadline: Instant,
    max_hold: u64,
}

/// Upstream: where the layer is with `ws_early_close`.
enum EarlyClose {
    /// No close chosen yet.
    Idle,
    /// The client's close was answered; it waits in `out` until `due`.
    Held {
        toxic: String,
        code: Option<u16>,
        read_at: Instant,
        due: Instant,
    },
    /// Passed on or lost: one early close per link at most.
    Done,
}

/// Downstream: where the layer is with the proxy's answer to the client's
/// close.
enum Answer {
    /// None asked for.
    None,
    /// To be sent at the next frame boundary.
    Pending(CloseAnswer),
    /// Sent: nothing more from the server goes to the client.
    Sent { toxic: String },
}

/// What a data message from the server after the proxy's answer is
/// recorded as.
const AFTER_ANSWER: &str = "not forwarded: the proxy had answered the client's close";

/// One direction of a WebSocket link.
pub(super) struct WsLayer {
    stream: Stream,
    conn: u64,
    phase: Phase,
    /// Bytes read and not yet forwarded or collected. Bounded by a header
    /// block, or one frame of at most `max_message` bytes, plus one read.
    input: Vec<u8>,
    /// How much of `input` was searched for the end of the header block.
    scanned: usize,
    /// Payload bytes of the current frame still to pass untouched.
    through: u64,
    assembly: Option<Assembly>,
    /// At most one per `ws_reorder` toxic.
    holds: Vec<Hold>,
    /// Drained before anything more is read.
    out: VecDeque<Out>,
    /// One RNG per toxic, so that a toxic's choices depend on its own
    /// matching messages only.
    rngs: HashMap<String, StdRng>,
    eof: bool,
    max_message: usize,
    /// Upstream: the client's close, if a `ws_early_close` holds it.
    early: EarlyClose,
    /// Downstream: the proxy's answer to the client's close.
    answer: Answer,
}

impl WsLayer {
    /// The layer of `stream` of connection `conn`.
    pub(super) fn new(stream: Stream, conn: u64) -> WsLayer {
        WsLayer {
            stream,
            conn,
            phase: match stream {
                Stream::Upstream => Phase::Request,
                Stream::Downstream => Phase::Response,
            },
            input: Vec::new(),
            scanned: 0,
            through: 0,
            assembly: None,
            holds: Vec::new(),
            out: VecDeque::new(),
            rngs: HashMap::new(),
            eof: false,
            max_message: MAX_MESSAGE,
            early: EarlyClose::Idle,
            answer: Answer::None,
        }
    }

    /// The link turned out not to be WebSocket and everything read was
    /// handed out: the pump can forward bytes itself from now on.
    pub(super) fn is_raw(&self) -> bool {
        self.phase == Phase::Raw && self.out.is_empty() && self.input.is_empty()
    }

    /// Whether the pump should read more now.
    pub(super) fn wants_input(&self) -> bool {
        self.out.is_empty() && !self.eof && self.phase != Phase::AwaitResponse
    }

    /// The source ended and everything was handed out.
    pub(super) fn is_done(&self) -> bool {
        self.eof && self.out.is_empty()
    }

    /// Downstream: the proxy's answer to the client's close was handed out,
    /// and nothing more will be.
    pub(super) fn answered_close(&self) -> bool {
        matches!(self.answer, Answer::Sent { .. }) && self.out.is_empty()
    }

    /// When something is due: the head of the output, or a hold's deadline.
    pub(super) fn wake_at(&self) -> Option<Instant> {
        let head = self.out.front().map(|o| o.ready_at);
        let hold = self.holds.iter().map(|h| h.deadline).min();
        match (head, hold) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The bytes due at `now`, with the time they became due.
    pub(super) fn take_ready(&mut self, now: Instant) -> Option<(Vec<u8>, Instant)> {
        if self.out.front()?.ready_at > now {
            return None;
        }
        let Out {
            mut bytes,
            ready_at,
        } = self.out.pop_front()?;
        while self.out.front().is_some_and(|o| o.ready_at <= now) {
            if let Some(next) = self.out.pop_front() {
                bytes.extend_from_slice(&next.bytes);
            }
        }
        Some((bytes, ready_at))
    }

    /// Takes bytes read from the source.
    pub(super) fn push(&mut self, cx: &Cx<'_>, bytes: &[u8], now: Instant) {
        self.input.extend_from_slice(bytes);
        self.advance(cx, now);
    }

    /// The source closed: releases holds and hands out whatever is left.
    pub(super) fn finish(&mut self, cx: &Cx<'_>, now: Instant) {
        self.eof = true;
        match self.phase {
            Phase::Frames => {
                self.release_all(cx, "at the end of the stream");
                if self.through == 0 {
                    self.answer_client(cx, now);
                }
                if matches!(self.answer, Answer::Sent { .. }) {
                    // Nothing more from the server reaches the client; what
                    // is left is at most a partial frame.
                    self.input.clear();
                    return;
                }
                if let Some(asm) = self.assembly.take() {
                    self.emit(asm.raw, now);
                }
                let rest = std::mem::take(&mut self.input);
                self.emit(rest, now);
            }
            Phase::Raw => {
                let rest = std::mem::take(&mut self.input);
                self.emit(rest, now);
            }
            Phase::Request | Phase::AwaitResponse | Phase::Response => self.go_raw(cx, now),
        }
    }

    /// The link ended before the source did: held messages, and a held
    /// close, are lost.
    pub(super) fn abandon(&mut self, cx: &Cx<'_>) {
        if let EarlyClose::Held { toxic, code, .. } =
            std::mem::replace(&mut self.early, EarlyClose::Done)
        {
            self.record(
                cx,
                &toxic,
                TamperAction::EarlyClose,
                false,
                code_field(code),
                "answered the client's close at once; never passed it on: the connection ended while it was held".into(),
            );
        }
        // What the other side never got was, in effect, dropped.
        for h in std::mem::take(&mut self.holds) {
            self.record(
                cx,
                &h.toxic,
                TamperAction::Drop,
                true,
                h.fields,
                "never forwarded: a reorder held it when the connection ended".into(),
            );
        }
    }

    /// Moves on with what is known now: the handshake, toxics removed, holds
    /// past their time, bytes waiting in `input`.
    pub(super) fn advance(&mut self, cx: &Cx<'_>, now: Instant) {
        self.release_orphans(cx);
        self.expire(cx, now);
        self.pass_on_early_close(cx, now);
        if self.stream == Stream::Downstream
            && matches!(self.answer, Answer::None)
            && let Some(answer) = cx.answer.borrow().clone()
        {
            self.answer = Answer::Pending(answer);
        }
        loop {
            match self.phase {
                Phase::Request => {
                    if !self.request(cx, now) {
                        return;
                    }
                }
                Phase::Response => {
                    if !self.response(cx, now) {
                        return;
                    }
                }
                Phase::AwaitResponse => {
                    let decided = *cx.handshake.borrow();
                    match decided {
                        Handshake::Pending => return,
                        Handshake::Upgraded => self.phase = Phase::Frames,
                        Handshake::Raw => self.go_raw(cx, now),
                    }
                }
                Phase::Frames => return self.frames(cx, now),
                Phase::Raw => {
                    let rest = std::mem::take(&mut self.input);
                    return self.emit(rest, now);
                }
            }
        }
    }

    /// Reads the request; true if the phase changed.
    fn request(&mut self, cx: &Cx<'_>, now: Instant) -> bool {
        let decided = *cx.handshake.borrow();
        if decided == Handshake::Raw || !frame::may_start_with(&self.input, b"GET ") {
            self.go_raw(cx, now);
            return true;
        }
        let Some(end) = self.header_end() else {
            return self.give_up_on_long_header(cx, now);
        };
        if !frame::is_upgrade_request(&self.input[..end]) {
            self.go_raw(cx, now);
            return true;
        }
        let header: Vec<u8> = self.input.drain(..end).collect();
        self.emit(header, now);
        self.phase = Phase::AwaitResponse;
        true
    }

    /// Reads the response; true if the phase changed.
    fn response(&mut self, cx: &Cx<'_>, now: Instant) -> bool {
        let decided = *cx.handshake.borrow();
        if decided == Handshake::Raw || !frame::may_start_with(&self.input, b"HTTP/") {
            self.go_raw(cx, now);
            return true;
        }
        let Some(end) = self.header_end() else {
            return self.give_up_on_long_header(cx, now);
        };
        if frame::status(&self.input[..end]) != Some(101) {
            self.go_raw(cx, now);
            return true;
        }
        cx.handshake.send_if_modified(|h| {
            let pending = *h == Handshake::Pending;
            if pending {
                *h = Handshake::Upgraded;
            }
            pending
        });
        if *cx.handshake.borrow() == Handshake::Raw {
            self.go_raw(cx, now);
            return true;
        }
        let header: Vec<u8> = self.input.drain(..end).collect();
        self.emit(header, now);
        self.phase = Phase::Frames;
        true
    }

    fn header_end(&mut self) -> Option<usize> {
        let end = frame::header_end(&self.input, self.scanned.saturating_sub(3));
        self.scanned = if end.is_some() { 0 } else { self.input.len() };
        end
    }

    fn give_up_on_long_header(&mut self, cx: &Cx<'_>, now: Instant) -> bool {
        if self.input.len() > MAX_HEADER_BLOCK {
            self.go_raw(cx, now);
            return true;
        }
        false
    }

    /// Not WebSocket: everything read so far goes out as it is, and the
    /// other direction learns it too.
    fn go_raw(&mut self, cx: &Cx<'_>, now: Instant) {
        cx.handshake.send_if_modified(|h| {
            let pending = *h == Handshake::Pending;
            if pending {
                *h = Handshake::Raw;
            }
            pending
        });
        self.phase = Phase::Raw;
        let rest = std::mem::take(&mut self.input);
        self.emit(rest, now);
    }

    /// Parses as many frames as `input` holds.
    fn frames(&mut self, cx: &Cx<'_>, now: Instant) {
        loop {
            if self.through > 0 {
                let n = self.through.min(self.input.len() as u64) as usize;
                if n == 0 {
                    return;
                }
                let bytes: Vec<u8> = self.input.drain(..n).collect();
                self.through -= n as u64;
                if !matches!(self.answer, Answer::Sent { .. }) {
                    self.emit(bytes, now);
                }
                continue;
            }
            self.answer_client(cx, now);
            let Some(h) = Header::parse(&self.input) else {
                return;
            };
            if let Answer::Sent { toxic } = &self.answer {
                let toxic = toxic.clone();
                if !self.swallow(cx, h, &toxic) {
                    return;
                }
                continue;
            }
            if h.is_control() {
                if h.len > 125 {
                    // Not a valid control frame: none of our business.
                    self.pass_through(cx, h, false, now);
                    continue;
                }
                let Some(bytes) = self.take_frame(&h) else {
                    return;
                };
                cx.shared.count_frames(FrameCount::Seen, 1);
                let mut ready_at = now;
                if h.opcode == frame::CLOSE {
                    self.release_all(cx, "before a close frame");
                    ready_at = self.close_early(cx, &h, &bytes, now);
                }
                // Control frames inside a fragmented message being
                // reassembled go out at once, ahead of it.
                self.emit(bytes, ready_at);
                continue;
            }
            if h.opcode == frame::CONTINUATION {
                let Some(collected) = self.assembly.as_ref().map(|a| a.payload.len()) else {
                    // A continuation of a message passed untouched.
                    self.pass_through(cx, h, false, now);
                    continue;
                };
                if h.len > (self.max_message - collected) as u64 {
                    // Too large to reassemble: the message passes untouched.
                    if let Some(asm) = self.assembly.take() {
                        cx.shared.count_frames(FrameCount::Opaque, asm.frames);
                        self.emit(asm.raw, now);
                    }
                    self.pass_through(cx, h, true, now);
                    continue;
                }
                let Some(bytes) = self.take_frame(&h) else {
                    return;
                };
                cx.shared.count_frames(FrameCount::Seen, 1);
                if let Some(asm) = self.assembly.as_mut() {
                    asm.payload.extend_from_slice(&unmasked(&h, &bytes));
                    asm.raw.extend_from_slice(&bytes);
                    asm.frames += 1;
                }
                if h.fin
                    && let Some(asm) = self.assembly.take()
                {
                    self.inspect(cx, asm, now);
                }
                continue;
            }
            // A data frame starting a message. One still being reassembled
            // is a protocol error of the sender's: it passes untouched.
            if let Some(asm) = self.assembly.take() {
                self.emit(asm.raw, now);
            }
            let inspectable =
                h.opcode == frame::TEXT && h.rsv == 0 && h.len <= self.max_message as u64;
            if !inspectable || !cx.toxics.iter().any(on_messages) {
                self.pass_through(cx, h, !inspectable, now);
                continue;
            }
            let Some(bytes) = self.take_frame(&h) else {
                return;
            };
            cx.shared.count_frames(FrameCount::Seen, 1);
            let asm = Assembly {
                payload: unmasked(&h, &bytes),
                raw: bytes,
                mask: h.mask,
                frames: 1,
            };
            if h.fin {
                self.inspect(cx, asm, now);
            } else {
                self.assembly = Some(asm);
            }
        }
    }

    /// The whole frame, if it has all been read.
    fn take_frame(&mut self, h: &Header) -> Option<Vec<u8>> {
        let total = h.total()?;
        (self.input.len() >= total).then(|| self.input.drain(..total).collect())
    }

    /// Forwards the header now and the payload as it comes.
    fn pass_through(&mut self, cx: &Cx<'_>, h: Header, opaque: bool, now: Instant) {
        cx.shared.count_frames(FrameCount::Seen, 1);
        if opaque {
            cx.shared.count_frames(FrameCount::Opaque, 1);
        }
        let header: Vec<u8> = self.input.drain(..h.header_len).collect();
        self.emit(header, now);
        self.through = h.len;
    }

    /// Applies the frame toxics to a complete text message.
    fn inspect(&mut self, cx: &Cx<'_>, asm: Assembly, now: Instant) {
        cx.shared.count_frames(FrameCount::Inspected, asm.frames);
        let object = json_object(&asm.payload);
        let object = object.as_ref();
        let fields = scalar_fields(object);
        let mut rewritten: Option<Map<String, Value>> = None;
        let mut copies = 1usize;
        let mut delay = 0u64;
        for t in cx.toxics {
            let Some(filter) = t.kind.frame_filter() else {
                continue;
            };
            if !on_messages(t)
                || matches!(t.kind, ToxicKind::WsReorder { .. })
                || !filter.matches(object)
            {
                continue;
            }
            if let ToxicKind::WsCorrupt { field, .. } = &t.kind
                && !object.is_some_and(|o| o.contains_key(field))
            {
                continue;
            }
            if !self.chosen(cx, t) {
                continue;
            }
            let (action, detail) = match &t.kind {
                ToxicKind::WsDrop { .. } => {
                    self.record(
                        cx,
                        &t.name,
                        TamperAction::Drop,
                        true,
                        fields,
                        "dropped".into(),
                    );
                    return;
                }
                ToxicKind::WsDuplicate { .. } => {
                    copies += 1;
                    (TamperAction::Duplicate, "forwarded twice".to_owned())
                }
                ToxicKind::WsCorrupt { field, value, .. } => {
                    let o = rewritten.get_or_insert_with(|| object.cloned().unwrap_or_default());
                    o.insert(field.clone(), value.clone());
                    let detail = format!("{field} replaced by {}", truncate(&value.to_string()));
                    (TamperAction::Corrupt, detail)
                }
                ToxicKind::WsDelay { delay: ms, .. } => {
                    delay += ms;
                    (TamperAction::Delay, format!("delayed {ms} ms"))
                }
                _ => continue,
            };
            self.record(cx, &t.name, action, true, fields.clone(), detail);
        }

        // Reorders: this message overtakes the messages it releases; a
        // message that overtakes is not held itself.
        let mut released = Vec::new();
        for t in cx.toxics {
            let ToxicKind::WsReorder { filter, same, .. } = &t.kind else {
                continue;
            };
            if !filter.matches(object) {
                continue;
            }
            let key = same_key(object, same);
            if let Some(i) = self
                .holds
                .iter()
                .position(|h| h.toxic == t.name && h.key == key)
            {
                released.push(self.holds.remove(i));
            }
        }
        let mut hold = None;
        if released.is_empty() {
            for t in cx.toxics {
                let ToxicKind::WsReorder {
                    filter,
                    same,
                    max_hold,
                } = &t.kind
                else {
                    continue;
                };
                if filter.matches(object)
                    && !self.holds.iter().any(|h| h.toxic == t.name)
                    && self.chosen(cx, t)
                {
                    hold = Some((t.name.clone(), same_key(object, same), *max_hold));
                    break;
                }
            }
        }

        let frame = match rewritten {
            Some(o) => {
                let text = serde_json::to_vec(&o).unwrap_or_default();
                frame::encode(frame::TEXT, &text, asm.mask)
            }
            None => asm.raw,
        };
        let bytes = frame.repeat(copies);
        // A delay starts when everything before the message is due, so that
        // the receiver sees a gap before each delayed message however the
        // bytes were read.
        let ready_at = if delay > 0 {
            let behind = self.out.back().map_or(now, |o| o.ready_at.max(now));
            behind + Duration::from_millis(delay)
        } else {
            now
        };
        if let Some((toxic, key, max_hold)) = hold {
            self.holds.push(Hold {
                toxic,
                bytes,
                ready_at,
                fields,
                key,
                deadline: now + Duration::from_millis(max_hold),
                max_hold,
            });
            return;
        }
        self.emit(bytes, ready_at);
        let overtaker = Value::Object(fields).to_string();
        for h in released {
            self.record(
                cx,
                &h.toxic,
                TamperAction::Reorder,
                true,
                h.fields,
                format!("overtaken by {overtaker}"),
            );
            self.emit(h.bytes, h.ready_at);
        }
    }

    /// Upstream: if a `ws_early_close` chooses this close frame of the
    /// client's, asks the downstream layer to answer it and returns when it
    /// may go on to the server; `now` otherwise.
    fn close_early(&mut self, cx: &Cx<'_>, h: &Header, bytes: &[u8], now: Instant) -> Instant {
        if self.stream != Stream::Upstream || !matches!(self.early, EarlyClose::Idle) {
            return now;
        }
        for t in cx.toxics {
            let ToxicKind::WsEarlyClose { delay, .. } = t.kind else {
                continue;
            };
            if !self.chosen(cx, t) {
                continue;
            }
            let payload = unmasked(h, bytes);
            let code = payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]]));
            // As the server would answer: the client's code echoed, and
            // 1000 (normal closure) where it gave none, never 1005.
            let frame = frame::encode(frame::CLOSE, &code.unwrap_or(1000).to_be_bytes(), None);
            cx.answer.send_replace(Some(CloseAnswer {
                frame,
                toxic: t.name.clone(),
            }));
            let behind = self.out.back().map_or(now, |o| o.ready_at);
            let due = behind.max(now + Duration::from_millis(delay));
            self.early = EarlyClose::Held {
                toxic: t.name.clone(),
                code,
                read_at: now,
                due,
            };
            return due;
        }
        now
    }

    /// Upstream: records the held close once it is due, just before the
    /// pump hands it on.
    fn pass_on_early_close(&mut self, cx: &Cx<'_>, now: Instant) {
        if !matches!(&self.early, EarlyClose::Held { due, .. } if *due <= now) {
            return;
        }
        if let EarlyClose::Held {
            toxic,
            code,
            read_at,
            due,
        } = std::mem::replace(&mut self.early, EarlyClose::Done)
        {
            let ms = (due - read_at).as_millis();
            self.record(
                cx,
                &toxic,
                TamperAction::EarlyClose,
                true,
                code_field(code),
                format!("answered the client's close at once; passed it on {ms} ms later"),
            );
        }
    }

    /// Downstream, at a frame boundary: sends the client the proxy's answer
    /// to its close, behind everything already due to it. Held messages go
    /// first; a message still being reassembled never goes.
    fn answer_client(&mut self, cx: &Cx<'_>, now: Instant) {
        if !matches!(self.answer, Answer::Pending(_)) {
            return;
        }
        let Answer::Pending(answer) = std::mem::replace(&mut self.answer, Answer::None) else {
            return;
        };
        self.release_all(cx, "before a close frame");
        if self.assembly.take().is_some() {
            self.record(
                cx,
                &answer.toxic,
                TamperAction::Drop,
                true,
                Map::new(),
                AFTER_ANSWER.into(),
            );
        }
        self.emit(answer.frame, now);
        self.answer = Answer::Sent {
            toxic: answer.toxic,
        };
    }

    /// Downstream, after the answer: the frame at the head of `input` is not
    /// forwarded (the client already had a close), and a data message it
    /// starts is recorded as dropped. False until enough is read to judge it.
    fn swallow(&mut self, cx: &Cx<'_>, h: Header, toxic: &str) -> bool {
        let starts_message = !h.is_control() && h.opcode != frame::CONTINUATION;
        // Whole frames are read for their fields; others are skipped as
        // they come, so that nothing is buffered beyond the usual bounds.
        let whole = if h.is_control() {
            h.len <= 125
        } else {
            h.opcode == frame::TEXT && h.fin && h.rsv == 0 && h.len <= self.max_message as u64
        };
        let mut fields = Map::new();
        if whole {
            let Some(bytes) = self.take_frame(&h) else {
                return false;
            };
            if starts_message {
                fields = scalar_fields(json_object(&unmasked(&h, &bytes)).as_ref());
            }
        } else {
            self.input.drain(..h.header_len);
            self.through = h.len;
        }
        cx.shared.count_frames(FrameCount::Seen, 1);
        if starts_message {
            self.record(
                cx,
                toxic,
                TamperAction::Drop,
                true,
                fields,
                AFTER_ANSWER.into(),
            );
        }
        true
    }

    /// Whether toxic `t` tampers with this matching message: one in
    /// `every`, from its seeded RNG, within its limit.
    fn chosen(&mut self, cx: &Cx<'_>, t: &Toxic) -> bool {
        let Some(filter) = t.kind.frame_filter() else {
            return false;
        };
        if filter.every > 1 {
            let rng = self.rngs.entry(t.name.clone()).or_insert_with(|| {
                let mut h = DefaultHasher::new();
                (cx.shared.seed, self.conn, self.stream, &t.name).hash(&mut h);
                StdRng::seed_from_u64(h.finish())
            });
            if rng.random_range(0..filter.every) != 0 {
                return false;
            }
        }
        cx.shared.take_budget(&t.name, filter.limit)
    }

    /// Releases the holds past their deadline.
    fn expire(&mut self, cx: &Cx<'_>, now: Instant) {
        while let Some(i) = self.holds.iter().position(|h| h.deadline <= now) {
            let h = self.holds.remove(i);
            let why = format!("after max_hold {} ms", h.max_hold);
            self.release(cx, h, &why);
        }
    }

    /// Releases the holds of toxics no longer in force.
    fn release_orphans(&mut self, cx: &Cx<'_>) {
        while let Some(i) = self.holds.iter().position(|h| {
            !cx.toxics
                .iter()
                .any(|t| t.name == h.toxic && matches!(t.kind, ToxicKind::WsReorder { .. }))
        }) {
            let h = self.holds.remove(i);
            self.release(cx, h, "when the toxic was removed");
        }
    }

    fn release_all(&mut self, cx: &Cx<'_>, why: &str) {
        for h in std::mem::take(&mut self.holds) {
            self.release(cx, h, why);
        }
    }

    /// Forwards a held message that nothing overtook.
    fn release(&mut self, cx: &Cx<'_>, h: Hold, why: &str) {
        self.record(
            cx,
            &h.toxic,
            TamperAction::Reorder,
            false,
            h.fields,
            format!("released {why} without being overtaken"),
        );
        self.emit(h.bytes, h.ready_at);
    }

    fn record(
        &self,
        cx: &Cx<'_>,
        toxic: &str,
        action: TamperAction,
        effective: bool,
        fields: Map<String, Value>,
        detail: String,
    ) {
        cx.shared.record(Tampering {
            seq: 0,
            at_ms: 0,
            toxic: toxic.to_owned(),
            action,
            effective,
            connection: self.conn,
            stream: self.stream,
            fields,
            detail,
        });
    }

    /// Queues bytes behind everything queued before them.
    fn emit(&mut self, bytes: Vec<u8>, ready_at: Instant) {
        if bytes.is_empty() {
            return;
        }
        match self.out.back_mut() {
            // Bytes behind a later tail wait for it anyway: one write.
            Some(tail) if tail.ready_at >= ready_at => tail.bytes.extend_from_slice(&bytes),
            _ => self.out.push_back(Out { bytes, ready_at }),
        }
    }
}

fn unmasked(h: &Header, frame: &[u8]) -> Vec<u8> {
    let mut payload = frame[h.header_len..].to_vec();
    if let Some(key) = h.mask {
        frame::apply_mask(&mut payload, key);
    }
    payload
}

/// The JSON object a text payload holds, if it is one.
fn json_object(payload: &[u8]) -> Option<Map<String, Value>> {
    std::str::from_utf8(payload)
        .ok()
        .and_then(|s| serde_json::from_str::<Value>(s).ok())
        .and_then(|v| match v {
            Value::Object(o) => Some(o),
            _ => None,
        })
}

/// Whether frame toxic `t` acts on text messages (all but
/// `ws_early_close`, which acts on the client's close frame).
fn on_messages(t: &Toxic) -> bool {
    !matches!(t.kind, ToxicKind::WsEarlyClose { .. })
}

/// The fields of an early close record.
fn code_field(code: Option<u16>) -> Map<String, Value> {
    let mut fields = Map::new();
    fields.insert("code".into(), code.map_or(Value::Null, Value::from));
    fields
}

fn same_key(object: Option<&Map<String, Value>>, same: &[String]) -> Vec<Option<Value>> {
    same.iter()
        .map(|f| object.and_then(|o| o.get(f)).cloned())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use serde_json::json;

    use super::*;
    use crate::proxy::{FrameFilter, Protocol, ProxyConfig};

    const RESPONSE: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n";
    const REQUEST: &[u8] =
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n";

    /// A layer with its proxy, toxics and handshake.
    struct Rig {
        shared: Shared,
        toxics: Vec<Toxic>,
        handshake: watch::Sender<Handshake>,
        answer: watch::Sender<Option<CloseAnswer>>,
        layer: WsLayer,
    }

    impl Rig {
        /// A layer of `stream` past the handshake, its output drained.
        fn new(stream: Stream, toxics: Vec<Toxic>) -> Rig {
            let mut rig = Rig::raw(stream, toxics, 7);
            match stream {
                Stream::Downstream => rig.push(RESPONSE),
                Stream::Upstream => {
                    rig.push(REQUEST);
                    rig.handshake.send_replace(Handshake::Upgraded);
                    rig.advance();
                }
            }
            assert_eq!(rig.layer.phase, Phase::Frames);
            rig.out();
            rig
        }

        /// A fresh layer of `stream`, before any handshake.
        fn raw(stream: Stream, toxics: Vec<Toxic>, seed: u64) -> Rig {
            Rig {
                shared: Shared::new(ProxyConfig {
                    name: "t".into(),
                    listen: "127.0.0.1:0".parse().unwrap(),
                    upstream: "127.0.0.1:1".parse().unwrap(),
                    seed,
                    protocol: Protocol::WebSocket,
                }),
                toxics,
                handshake: watch::Sender::new(Handshake::Pending),
                answer: watch::Sender::new(None),
                layer: WsLayer::new(stream, 0),
            }
        }

        fn cx(&self) -> Cx<'_> {
            Cx {
                shared: &self.shared,
                toxics: &self.toxics,
                handshake: &self.handshake,
                answer: &self.answer,
            }
        }

        /// The layer and its context, borrowed apart.
        fn split(&mut self) -> (&mut WsLayer, Cx<'_>) {
            let Rig {
                shared,
                toxics,
                handshake,
                answer,
                layer,
            } = self;
            let cx = Cx {
                shared,
                toxics,
                handshake,
                answer,
            };
            (layer, cx)
        }

        fn push(&mut self, bytes: &[u8]) {
            let (layer, cx) = self.split();
            layer.push(&cx, bytes, Instant::now());
        }

        fn advance(&mut self) {
            self.push(&[]);
        }

        fn finish(&mut self) {
            let (layer, cx) = self.split();
            layer.finish(&cx, Instant::now());
        }

        /// Everything due now.
        fn out(&mut self) -> Vec<u8> {
            self.advance();
            let mut all = Vec::new();
            while let Some((bytes, _)) = self.layer.take_ready(Instant::now()) {
                all.extend_from_slice(&bytes);
            }
            all
        }

        /// Everything due now, as (opcode, unmasked payload, mask) frames.
        fn frames(&mut self) -> Vec<Parsed> {
            parse(&self.out())
        }

        fn records(&self) -> Vec<Tampering> {
            self.shared.tamperings.lock().unwrap().records.clone()
        }
    }

    /// Opcode, unmasked payload, mask key.
    type Parsed = (u8, Vec<u8>, Option<[u8; 4]>);

    fn parse(mut bytes: &[u8]) -> Vec<Parsed> {
        let mut frames = Vec::new();
        while let Some(h) = Header::parse(bytes) {
            let total = h.total().unwrap();
            frames.push((h.opcode, unmasked(&h, &bytes[..total]), h.mask));
            bytes = &bytes[total..];
        }
        assert!(bytes.is_empty(), "a partial frame left");
        frames
    }

    fn msg(k: u64, channel: &str) -> Vec<u8> {
        json!({"type": "deliver", "channel": channel, "offset": k, "id": format!("m-{k}"),
            "payload": {"n": k}})
        .to_string()
        .into_bytes()
    }

    fn offsets(frames: &[Parsed]) -> Vec<u64> {
        frames
            .iter()
            .filter(|f| f.0 == frame::TEXT)
            .map(|f| {
                serde_json::from_slice::<Value>(&f.1).unwrap()["offset"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    }

    fn toxic(name: &str, stream: Stream, kind: ToxicKind) -> Toxic {
        Toxic::new(name, stream, kind)
    }

    fn filter(every: u64, limit: Option<u64>) -> FrameFilter {
        FrameFilter {
            every,
            limit,
            ..FrameFilter::default()
        }
    }

    /// A conversation of every kind of frame: text, binary, masked,
    /// fragmented with a ping inside, pong, RSV1, close.
    fn conversation(mask: Option<[u8; 4]>) -> Vec<u8> {
        let mut c = Vec::new();
        c.extend(frame::encode(frame::TEXT, &msg(0, "c"), mask));
        c.extend(frame::encode(0x2, &[0, 1, 2, 255], mask));
        // Fragmented text: "hel" + ping + "lo".
        let mut first = frame::encode(frame::TEXT, b"hel", mask);
        first[0] &= 0x7f;
        c.extend(first);
        c.extend(frame::encode(0x9, b"ping", mask));
        c.extend(frame::encode(frame::CONTINUATION, b"lo", mask));
        c.extend(frame::encode(0xA, b"pong", mask));
        let mut deflated = frame::encode(frame::TEXT, b"\x01\x02", mask);
        deflated[0] |= 0x40;
        c.extend(deflated);
        c.extend(frame::encode(frame::TEXT, &vec![b'x'; 70_000], mask));
        c.extend(frame::encode(frame::CLOSE, &[3, 232], mask));
        c
    }

    #[test]
    fn without_toxics_bytes_pass_as_they_came() {
        for (stream, mask) in [
            (Stream::Downstream, None),
            (Stream::Upstream, Some([9, 8, 7, 6])),
        ] {
            let mut rig = Rig::new(stream, Vec::new());
            let input = conversation(mask);
            let mut output = Vec::new();
            // In uneven pieces, down to single bytes.
            for (i, piece) in input.chunks(1 + (input.len() / 97)).enumerate() {
                if i % 3 == 0 {
                    for b in piece {
                        rig.push(std::slice::from_ref(b));
                    }
                } else {
                    rig.push(piece);
                }
                output.extend(rig.out());
            }
            assert!(output == input, "{stream:?}: bytes differ");
            assert_eq!(
                rig.shared.frames[FrameCount::Seen as usize].load(Ordering::Relaxed),
                9
            );
        }
    }

    #[test]
    fn untouched_messages_keep_their_bytes_with_toxics_in_force() {
        // A toxic that matches nothing: every frame is read whole, none changes.
        let mut matching = Map::new();
        matching.insert("type".into(), json!("nothing"));
        let drop = toxic(
            "d",
            Stream::Upstream,
            ToxicKind::WsDrop {
                filter: FrameFilter {
                    matching,
                    ..FrameFilter::default()
                },
            },
        );
        let mut rig = Rig::new(Stream::Upstream, vec![drop]);
        let mask = Some([1, 2, 3, 4]);
        let mut input = Vec::new();
        for k in 0..5 {
            input.extend(frame::encode(frame::TEXT, &msg(k, "c"), mask));
        }
        input.extend(frame::encode(frame::TEXT, b"not json", mask));
        for b in &input {
            rig.push(std::slice::from_ref(b));
        }
        assert!(rig.out() == input);
        assert!(rig.records().is_empty());
        assert_eq!(
            rig.shared.frames[FrameCount::Inspected as usize].load(Ordering::Relaxed),
            6
        );
    }

    #[test]
    fn not_websocket_goes_raw() {
        // A response other than 101.
        let mut rig = Rig::raw(Stream::Downstream, Vec::new(), 1);
        let answer = b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\nno";
        rig.push(answer);
        assert_eq!(rig.out(), answer);
        assert!(rig.layer.is_raw());
        assert_eq!(*rig.handshake.borrow(), Handshake::Raw);

        // A request that is not an upgrade, or not HTTP at all.
        for request in [&b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], b"SSH-2.0-x\r\n"] {
            let mut rig = Rig::raw(Stream::Upstream, Vec::new(), 1);
            rig.push(request);
            assert_eq!(rig.out(), request);
            assert!(rig.layer.is_raw());
        }

        // A header block past the bound.
        let mut rig = Rig::raw(Stream::Downstream, Vec::new(), 1);
        rig.push(b"HTTP/1.1 101 Switching Protocols\r\n");
        let filler = format!("x-filler: {}\r\n", "a".repeat(1000));
        let mut sent = b"HTTP/1.1 101 Switching Protocols\r\n".to_vec();
        while rig.layer.phase != Phase::Raw {
            rig.push(filler.as_bytes());
            sent.extend_from_slice(filler.as_bytes());
            assert!(sent.len() < MAX_HEADER_BLOCK + 2_000);
        }
        assert!(sent.len() > MAX_HEADER_BLOCK);
        assert!(rig.out() == sent);
        assert!(rig.layer.is_raw());
    }

    #[test]
    fn the_request_side_waits_for_the_response() {
        let mut rig = Rig::raw(Stream::Upstream, Vec::new(), 1);
        let first = frame::encode(frame::TEXT, b"early", Some([1, 1, 1, 1]));
        let mut bytes = REQUEST.to_vec();
        bytes.extend_from_slice(&first);
        rig.push(&bytes);
        assert_eq!(rig.out(), REQUEST, "the request goes on at once");
        assert!(!rig.layer.wants_input());
        rig.handshake.send_replace(Handshake::Upgraded);
        assert_eq!(rig.out(), first);
        assert!(rig.layer.wants_input());
        assert_eq!(rig.layer.phase, Phase::Frames);

        // The response said no: the rest is raw.
        let mut rig = Rig::raw(Stream::Upstream, Vec::new(), 1);
        rig.push(&bytes);
        rig.out();
        rig.handshake.send_replace(Handshake::Raw);
        assert_eq!(rig.out(), first);
        assert!(rig.layer.is_raw());
    }

    #[test]
    fn drop_duplicate_and_corrupt_masked_frames() {
        let toxics = vec![
            toxic(
                "drop",
                Stream::Upstream,
                ToxicKind::WsDrop {
                    filter: FrameFilter {
                        matching: json!({"offset": 1}).as_object().cloned().unwrap(),
                        ..FrameFilter::default()
                    },
                },
            ),
            toxic(
                "dup",
                Stream::Upstream,
                ToxicKind::WsDuplicate {
                    filter: FrameFilter {
                        matching: json!({"offset": 2}).as_object().cloned().unwrap(),
                        ..FrameFilter::default()
                    },
                },
            ),
            toxic(
                "bad",
                Stream::Upstream,
                ToxicKind::WsCorrupt {
                    filter: FrameFilter {
                        matching: json!({"offset": 3}).as_object().cloned().unwrap(),
                        ..FrameFilter::default()
                    },
                    field: "payload".into(),
                    value: json!(null),
                },
            ),
        ];
        let mut rig = Rig::new(Stream::Upstream, toxics);
        let key = [0xa1, 0xb2, 0xc3, 0xd4];
        for k in 0..5 {
            rig.push(&frame::encode(frame::TEXT, &msg(k, "c"), Some(key)));
        }
        let frames = rig.frames();
        assert_eq!(offsets(&frames), [0, 2, 2, 3, 4]);
        assert!(
            frames.iter().all(|f| f.2 == Some(key)),
            "re-masked with the same key"
        );
        let corrupted: Value = serde_json::from_slice(&frames[3].1).unwrap();
        assert_eq!(corrupted["payload"], Value::Null);
        assert_eq!(corrupted["id"], "m-3");
        let records = rig.records();
        let summary: Vec<_> = records
            .iter()
            .map(|r| {
                (
                    r.seq,
                    r.toxic.as_str(),
                    r.action,
                    r.effective,
                    r.fields["offset"].as_u64(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                (0, "drop", TamperAction::Drop, true, Some(1)),
                (1, "dup", TamperAction::Duplicate, true, Some(2)),
                (2, "bad", TamperAction::Corrupt, true, Some(3)),
            ]
        );
        assert_eq!(records[2].detail, "payload replaced by null");
        assert_eq!(records[0].stream, Stream::Upstream);
        assert!(records[0].fields.get("payload").is_none(), "scalars only");
    }

    #[test]
    fn corrupt_leaves_messages_without_the_field() {
        let corrupt = toxic(
            "bad",
            Stream::Downstream,
            ToxicKind::WsCorrupt {
                filter: FrameFilter::default(),
                field: "body".into(),
                value: json!(1),
            },
        );
        let mut rig = Rig::new(Stream::Downstream, vec![corrupt]);
        let input = frame::encode(frame::TEXT, &msg(0, "c"), None);
        rig.push(&input);
        assert_eq!(rig.out(), input);
        assert!(rig.records().is_empty());
    }

    #[test]
    fn fragmented_messages_are_reassembled_and_rewritten_as_one_frame() {
        let corrupt = toxic(
            "bad",
            Stream::Upstream,
            ToxicKind::WsCorrupt {
                filter: FrameFilter::default(),
                field: "payload".into(),
                value: json!("x"),
            },
        );
        let mut rig = Rig::new(Stream::Upstream, vec![corrupt]);
        let text = msg(7, "c");
        let (a, b) = text.split_at(10);
        let mut first = frame::encode(frame::TEXT, a, Some([1, 2, 3, 4]));
        first[0] &= 0x7f;
        rig.push(&first);
        rig.push(&frame::encode(0x9, b"hi", Some([5, 6, 7, 8])));
        assert_eq!(
            rig.frames(),
            [(0x9, b"hi".to_vec(), Some([5, 6, 7, 8]))],
            "ping at once"
        );
        rig.push(&frame::encode(frame::CONTINUATION, b, Some([9, 9, 9, 9])));
        let frames = rig.frames();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].2, Some([1, 2, 3, 4]), "the first fragment's key");
        let v: Value = serde_json::from_slice(&frames[0].1).unwrap();
        assert_eq!(
            (v["offset"].as_u64(), &v["payload"]),
            (Some(7), &json!("x"))
        );
        assert_eq!(rig.records().len(), 1);
    }

    #[test]
    fn large_and_opaque_messages_pass_untouched() {
        let drop = toxic(
            "d",
            Stream::Downstream,
            ToxicKind::WsDrop {
                filter: FrameFilter::default(),
            },
        );
        let mut rig = Rig::new(Stream::Downstream, vec![drop]);
        rig.layer.max_message = 100;
        let mut input = frame::encode(frame::TEXT, &[b'a'; 101], None);
        // A fragmented message whose reassembly would pass the bound.
        let mut first = frame::encode(frame::TEXT, &[b'b'; 60], None);
        first[0] &= 0x7f;
        input.extend(first);
        input.extend(frame::encode(frame::CONTINUATION, &[b'b'; 60], None));
        input.extend(frame::encode(0x2, b"binary", None));
        let mut deflated = frame::encode(frame::TEXT, b"z", None);
        deflated[0] |= 0x40;
        input.extend(deflated);
        rig.push(&input);
        assert!(rig.out() == input);
        assert!(rig.records().is_empty());
        assert_eq!(
            rig.shared.frames[FrameCount::Opaque as usize].load(Ordering::Relaxed),
            5
        );
        // The next small text message is dropped again.
        rig.push(&frame::encode(frame::TEXT, b"small", None));
        assert_eq!(rig.out(), Vec::<u8>::new());
        assert_eq!(rig.records().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn reorder_overtaken_by_the_next_message_with_the_same_fields() {
        let reorder = toxic(
            "r",
            Stream::Downstream,
            ToxicKind::WsReorder {
                filter: filter(1, Some(1)),
                same: vec!["channel".into()],
                max_hold: 1000,
            },
        );
        let mut rig = Rig::new(Stream::Downstream, vec![reorder]);
        rig.push(&frame::encode(frame::TEXT, &msg(0, "a"), None));
        rig.push(&frame::encode(frame::TEXT, &msg(1, "b"), None));
        rig.push(&frame::encode(frame::TEXT, &msg(2, "a"), None));
        rig.push(&frame::encode(frame::TEXT, &msg(3, "a"), None));
        assert_eq!(offsets(&rig.frames()), [1, 2, 0, 3]);
        let records = rig.records();
        assert_eq!(records.len(), 1);
        assert_eq!(
            (records[0].action, records[0].effective),
            (TamperAction::Reorder, true)
        );
        assert_eq!(records[0].fields["offset"], 0);
        assert!(
            records[0].detail.starts_with("overtaken by {"),
            "{}",
            records[0].detail
        );
        assert!(
            records[0].detail.contains("\"offset\":2"),
            "{}",
            records[0].detail
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reorder_released_after_max_hold() {
        let reorder = toxic(
            "r",
            Stream::Downstream,
            ToxicKind::WsReorder {
                filter: filter(1, Some(1)),
                same: Vec::new(),
                max_hold: 300,
            },
        );
        let mut rig = Rig::new(Stream::Downstream, vec![reorder]);
        rig.push(&frame::encode(frame::TEXT, &msg(0, "a"), None));
        assert!(rig.out().is_empty());
        let started = Instant::now();
        assert_eq!(
            rig.layer.wake_at(),
            Some(started + Duration::from_millis(300))
        );
        tokio::time::advance(Duration::from_millis(299)).await;
        assert!(rig.out().is_empty());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(offsets(&rig.frames()), [0]);
        rig.push(&frame::encode(frame::TEXT, &msg(1, "a"), None));
        assert_eq!(offsets(&rig.frames()), [1], "limit 1: not held");
        let records = rig.records();
        assert_eq!(records.len(), 1);
        assert!(!records[0].effective);
        assert_eq!(records[0].at_ms, 300);
        assert_eq!(
            records[0].detail,
            "released after max_hold 300 ms without being overtaken"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reorder_released_before_a_close_at_the_end_or_lost() {
        let reorder = || {
            vec![toxic(
                "r",
                Stream::Downstream,
                ToxicKind::WsReorder {
                    filter: FrameFilter::default(),
                    same: Vec::new(),
                    max_hold: 1000,
                },
            )]
        };
        let mut rig = Rig::new(Stream::Downstream, reorder());
        rig.push(&frame::encode(frame::TEXT, &msg(0, "a"), None));
        rig.push(&frame::encode(frame::CLOSE, &[3, 232], None));
        let frames = rig.frames();
        assert_eq!(
            frames.iter().map(|f| f.0).collect::<Vec<_>>(),
            [frame::TEXT, frame::CLOSE]
        );
        assert!(rig.records()[0].detail.contains("before a close frame"));

        let mut rig = Rig::new(Stream::Downstream, reorder());
        rig.push(&frame::encode(frame::TEXT, &msg(0, "a"), None));
        rig.finish();
        assert_eq!(offsets(&rig.frames()), [0]);
        assert!(rig.layer.is_done());
        assert!(rig.records()[0].detail.contains("at the end of the stream"));

        let mut rig = Rig::new(Stream::Downstream, reorder());
        rig.push(&frame::encode(frame::TEXT, &msg(0, "a"), None));
        rig.toxics.clear();
        assert_eq!(offsets(&rig.frames()), [0], "released when the toxic goes");
        assert!(rig.records()[0].detail.contains("the toxic was removed"));

        let mut rig = Rig::new(Stream::Downstream, reorder());
        rig.push(&frame::encode(frame::TEXT, &msg(0, "a"), None));
        let mut layer = std::mem::replace(&mut rig.layer, WsLayer::new(Stream::Downstream, 0));
        layer.abandon(&rig.cx());
        let records = rig.records();
        assert_eq!(
            (records.len(), records[0].effective, records[0].action),
            (1, true, TamperAction::Drop)
        );
        assert!(records[0].detail.starts_with("never forwarded"));
    }

    #[tokio::test(start_paused = true)]
    async fn delay_holds_everything_behind_it() {
        let delay = toxic(
            "slow",
            Stream::Downstream,
            ToxicKind::WsDelay {
                filter: filter(1, Some(1)),
                delay: 200,
            },
        );
        let mut rig = Rig::new(Stream::Downstream, vec![delay]);
        rig.push(&frame::encode(frame::TEXT, &msg(0, "a"), None));
        assert!(!rig.layer.wants_input(), "nothing more is read meanwhile");
        tokio::time::advance(Duration::from_millis(150)).await;
        assert!(rig.out().is_empty());
        tokio::time::advance(Duration::from_millis(50)).await;
        let (bytes, due) = rig.layer.take_ready(Instant::now()).unwrap();
        assert_eq!(offsets(&parse(&bytes)), [0]);
        assert_eq!(due, Instant::now());
        rig.push(&frame::encode(frame::TEXT, &msg(1, "a"), None));
        rig.push(&frame::encode(0x9, b"", None));
        assert_eq!(offsets(&rig.frames()), [1], "limit 1");
        assert_eq!(rig.records()[0].detail, "delayed 200 ms");
    }

    #[tokio::test(start_paused = true)]
    async fn delays_read_together_add_up() {
        let delay = toxic(
            "slow",
            Stream::Downstream,
            ToxicKind::WsDelay {
                filter: filter(1, None),
                delay: 100,
            },
        );
        let mut rig = Rig::new(Stream::Downstream, vec![delay]);
        let mut bytes = Vec::new();
        for k in 0..3 {
            bytes.extend(frame::encode(frame::TEXT, &msg(k, "a"), None));
        }
        rig.push(&bytes);
        let start = Instant::now();
        let mut due = Vec::new();
        while !rig.layer.out.is_empty() {
            let at = rig.layer.wake_at().unwrap();
            tokio::time::advance(at - Instant::now()).await;
            let (bytes, _) = rig.layer.take_ready(Instant::now()).unwrap();
            due.push((offsets(&parse(&bytes)), (at - start).as_millis()));
        }
        assert_eq!(due, [(vec![0], 100), (vec![1], 200), (vec![2], 300)]);
    }

    #[test]
    fn every_and_limit_are_seeded() {
        let plan = |seed: u64| {
            let drop = toxic(
                "d",
                Stream::Downstream,
                ToxicKind::WsDrop {
                    filter: filter(4, Some(5)),
                },
            );
            let mut rig = Rig::raw(Stream::Downstream, vec![drop], seed);
            rig.push(RESPONSE);
            assert_eq!(rig.out(), RESPONSE);
            for k in 0..200 {
                rig.push(&frame::encode(frame::TEXT, &msg(k, "c"), None));
            }
            let received = offsets(&rig.frames());
            let dropped: Vec<u64> = rig
                .records()
                .iter()
                .map(|r| r.fields["offset"].as_u64().unwrap())
                .collect();
            assert_eq!(dropped.len(), 5);
            let expected: Vec<u64> = (0..200).filter(|k| !dropped.contains(k)).collect();
            assert_eq!(received, expected);
            dropped
        };
        let a = plan(11);
        assert_eq!(a, plan(11), "same seed, same messages");
        assert_ne!(a, plan(12));
    }

    fn early_close(filter: FrameFilter, delay: u64) -> Toxic {
        toxic(
            "early",
            Stream::Upstream,
            ToxicKind::WsEarlyClose { filter, delay },
        )
    }

    /// A client's close frame with `code`, masked.
    fn client_close(code: Option<u16>) -> Vec<u8> {
        let payload = code.map_or(Vec::new(), |c| {
            let mut p = c.to_be_bytes().to_vec();
            p.extend_from_slice(b"bye");
            p
        });
        frame::encode(frame::CLOSE, &payload, Some([4, 3, 2, 1]))
    }

    #[tokio::test(start_paused = true)]
    async fn early_close_answers_at_once_and_holds_the_close() {
        let mut rig = Rig::new(Stream::Upstream, vec![early_close(filter(1, None), 500)]);
        // Messages are not its business: they pass as they came.
        let text = frame::encode(frame::TEXT, &msg(0, "c"), Some([1, 2, 3, 4]));
        rig.push(&text);
        assert_eq!(rig.out(), text);
        assert_eq!(
            rig.shared.frames[FrameCount::Inspected as usize].load(Ordering::Relaxed),
            0
        );

        let close = client_close(Some(1001));
        rig.push(&close);
        assert_eq!(
            *rig.answer.borrow(),
            Some(CloseAnswer {
                frame: frame::encode(frame::CLOSE, &1001u16.to_be_bytes(), None),
                toxic: "early".into(),
            }),
            "the client's code echoed, unmasked, no reason"
        );
        assert!(rig.out().is_empty());
        assert!(!rig.layer.wants_input(), "nothing more is read meanwhile");
        assert_eq!(
            rig.layer.wake_at(),
            Some(Instant::now() + Duration::from_millis(500))
        );
        tokio::time::advance(Duration::from_millis(499)).await;
        assert!(rig.out().is_empty());
        assert!(rig.records().is_empty(), "recorded when passed on");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(rig.out(), close, "the client's own frame, intact");
        let records = rig.records();
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert_eq!(
            (r.toxic.as_str(), r.action, r.effective, r.stream),
            ("early", TamperAction::EarlyClose, true, Stream::Upstream)
        );
        assert_eq!(Value::Object(r.fields.clone()), json!({"code": 1001}));
        assert_eq!(
            r.detail,
            "answered the client's close at once; passed it on 500 ms later"
        );
        assert_eq!(r.at_ms, 500);

        // One per link: a second close goes on at once.
        rig.push(&close);
        assert_eq!(rig.out(), close);
        assert_eq!(rig.records().len(), 1);
        rig.finish();
        assert!(rig.layer.is_done());
    }

    #[tokio::test(start_paused = true)]
    async fn early_close_without_a_code_is_answered_with_1000() {
        let mut rig = Rig::new(Stream::Upstream, vec![early_close(filter(1, None), 100)]);
        let close = client_close(None);
        rig.push(&close);
        let answer = rig.answer.borrow().clone().unwrap();
        assert_eq!(parse(&answer.frame), [(frame::CLOSE, vec![3, 232], None)]);
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(rig.out(), close);
        assert_eq!(rig.records()[0].fields["code"], Value::Null);
        assert!(
            rig.records()[0]
                .detail
                .ends_with("passed it on 100 ms later")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn early_close_waits_behind_a_delayed_message_and_can_be_lost() {
        let toxics = vec![
            toxic(
                "slow",
                Stream::Upstream,
                ToxicKind::WsDelay {
                    filter: filter(1, None),
                    delay: 800,
                },
            ),
            early_close(filter(1, None), 500),
        ];
        let mut rig = Rig::new(Stream::Upstream, toxics);
        rig.push(&frame::encode(
            frame::TEXT,
            &msg(0, "c"),
            Some([1, 2, 3, 4]),
        ));
        rig.push(&client_close(Some(1000)));
        assert!(
            rig.answer.borrow().is_some(),
            "answered at once all the same"
        );
        tokio::time::advance(Duration::from_millis(800)).await;
        let frames = rig.frames();
        let opcodes: Vec<u8> = frames.iter().map(|f| f.0).collect();
        assert_eq!(opcodes, [frame::TEXT, frame::CLOSE], "order kept");
        let early = rig.records().pop().unwrap();
        assert_eq!(early.action, TamperAction::EarlyClose);
        assert!(early.detail.ends_with("passed it on 800 ms later"));

        // The link ends while the close is held: the server never gets it.
        let mut rig = Rig::new(Stream::Upstream, vec![early_close(filter(1, None), 500)]);
        rig.push(&client_close(Some(4000)));
        let (layer, cx) = rig.split();
        layer.abandon(&cx);
        let records = rig.records();
        assert_eq!(records.len(), 1);
        assert_eq!(
            (records[0].action, records[0].effective),
            (TamperAction::EarlyClose, false)
        );
        assert_eq!(records[0].fields["code"], 4000);
        assert!(
            records[0].detail.contains("never passed it on"),
            "{}",
            records[0].detail
        );
    }

    #[test]
    fn early_close_every_and_limit_are_seeded() {
        let plan = |seed: u64, limit: Option<u64>| {
            let mut rig = Rig::raw(
                Stream::Upstream,
                vec![early_close(filter(3, limit), 500)],
                seed,
            );
            rig.handshake.send_replace(Handshake::Upgraded);
            let mut chosen = Vec::new();
            for conn in 0..40 {
                rig.layer = WsLayer::new(Stream::Upstream, conn);
                rig.answer.send_replace(None);
                rig.push(REQUEST);
                assert_eq!(rig.out(), REQUEST);
                rig.push(&client_close(Some(1000)));
                if rig.answer.borrow().is_some() {
                    chosen.push(conn);
                }
            }
            chosen
        };
        let all = plan(7, None);
        assert!((5..=25).contains(&all.len()), "about one in 3: {all:?}");
        assert_eq!(all, plan(7, None), "same seed, same connections");
        assert_ne!(all, plan(8, None));
        assert_eq!(plan(7, Some(4)), all[..4], "at most limit");
    }

    #[test]
    fn after_the_answer_nothing_from_the_server_reaches_the_client() {
        let mut rig = Rig::new(Stream::Downstream, Vec::new());
        let before = frame::encode(frame::TEXT, &msg(0, "c"), None);
        rig.push(&before);
        assert_eq!(rig.out(), before);
        // A large binary frame is on its way when the answer is asked for:
        // the answer waits for its end.
        let big = frame::encode(0x2, &[7u8; 1000], None);
        rig.push(&big[..300]);
        assert_eq!(rig.out(), big[..300]);
        let answer = frame::encode(frame::CLOSE, &1001u16.to_be_bytes(), None);
        rig.answer.send_replace(Some(CloseAnswer {
            frame: answer.clone(),
            toxic: "early".into(),
        }));
        assert!(rig.out().is_empty());
        assert!(!rig.layer.answered_close());
        let mut rest = big[300..].to_vec();
        rest.extend(frame::encode(frame::TEXT, &msg(1, "c"), None));
        rest.extend(frame::encode(0x9, b"ping", None));
        rest.extend(frame::encode(0x2, &[1u8; 200], None));
        rest.extend(frame::encode(frame::CLOSE, &1001u16.to_be_bytes(), None));
        rig.push(&rest);
        let mut expected = big[300..].to_vec();
        expected.extend_from_slice(&answer);
        assert!(rig.out() == expected);
        assert!(rig.layer.answered_close());
        let records = rig.records();
        let summary: Vec<_> = records
            .iter()
            .map(|r| {
                (
                    r.toxic.as_str(),
                    r.action,
                    r.stream,
                    r.fields.get("offset").and_then(Value::as_u64),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("early", TamperAction::Drop, Stream::Downstream, Some(1)),
                ("early", TamperAction::Drop, Stream::Downstream, None),
            ],
            "the text and the binary message; not the ping or the close"
        );
        assert_eq!(
            records[0].detail,
            "not forwarded: the proxy had answered the client's close"
        );
        rig.push(&frame::encode(frame::TEXT, b"late", None));
        rig.finish();
        assert!(rig.out().is_empty());
        assert!(rig.layer.is_done());
    }

    #[test]
    fn the_answer_goes_before_a_message_being_reassembled() {
        let reorder = toxic(
            "r",
            Stream::Downstream,
            ToxicKind::WsReorder {
                filter: FrameFilter::default(),
                same: Vec::new(),
                max_hold: 1000,
            },
        );
        let mut rig = Rig::new(Stream::Downstream, vec![reorder]);
        let held = frame::encode(frame::TEXT, &msg(0, "c"), None);
        rig.push(&held);
        assert!(rig.out().is_empty(), "held by the reorder");
        let mut first = frame::encode(frame::TEXT, b"{\"a\":", None);
        first[0] &= 0x7f;
        rig.push(&first);
        rig.answer.send_replace(Some(CloseAnswer {
            frame: frame::encode(frame::CLOSE, &1000u16.to_be_bytes(), None),
            toxic: "early".into(),
        }));
        rig.push(&frame::encode(frame::CONTINUATION, b"1}", None));
        let frames = rig.frames();
        assert_eq!(
            frames.iter().map(|f| f.0).collect::<Vec<_>>(),
            [frame::TEXT, frame::CLOSE],
            "the held message is released before the answer"
        );
        let records = rig.records();
        let actions: Vec<_> = records.iter().map(|r| (r.action, r.effective)).collect();
        assert_eq!(
            actions,
            [(TamperAction::Reorder, false), (TamperAction::Drop, true)]
        );
    }
}

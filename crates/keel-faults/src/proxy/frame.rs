//! RFC 6455 frame headers and the HTTP/1.1 handshake, as far as the proxy
//! needs to read and rewrite them.

/// Opcode of a continuation frame.
pub(super) const CONTINUATION: u8 = 0x0;
/// Opcode of a text frame.
pub(super) const TEXT: u8 = 0x1;
/// Opcode of a close frame.
pub(super) const CLOSE: u8 = 0x8;

/// The largest header: 2 bytes, a 64-bit length, a mask key.
pub(super) const MAX_HEADER: usize = 14;

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Header {
    /// Last frame of its message.
    pub(super) fin: bool,
    /// The three RSV bits (0x40 is RSV1, set by permessage-deflate).
    pub(super) rsv: u8,
    /// The opcode, 0..=15.
    pub(super) opcode: u8,
    /// The mask key of a masked frame (every client-to-server frame).
    pub(super) mask: Option<[u8; 4]>,
    /// Payload length.
    pub(super) len: u64,
    /// Header length in bytes, 2..=14.
    pub(super) header_len: usize,
}

impl Header {
    /// Parses the header at the start of `buf`; `None` until all of it is there.
    pub(super) fn parse(buf: &[u8]) -> Option<Header> {
        let (&b0, rest) = buf.split_first()?;
        let &b1 = rest.first()?;
        let (len, mut at) = match b1 & 0x7f {
            126 => (
                u64::from(u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?)),
                4,
            ),
            127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
            n => (u64::from(n), 2),
        };
        let mask = if b1 & 0x80 != 0 {
            let key: [u8; 4] = buf.get(at..at + 4)?.try_into().ok()?;
            at += 4;
            Some(key)
        } else {
            None
        };
        Some(Header {
            fin: b0 & 0x80 != 0,
            rsv: b0 & 0x70,
            opcode: b0 & 0x0f,
            mask,
            len,
            header_len: at,
        })
    }

    /// Control frames (close, ping, pong, reserved 0xB-0xF).
    pub(super) fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }

    /// Header plus payload, if it fits in memory.
    pub(super) fn total(&self) -> Option<usize> {
        usize::try_from(self.len).ok()?.checked_add(self.header_len)
    }
}

/// XORs `data` with `key` (masking and unmasking are the same operation).
pub(super) fn apply_mask(data: &mut [u8], key: [u8; 4]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// One unfragmented frame (FIN set, RSV clear), masked with `mask` if given.
pub(super) fn encode(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + MAX_HEADER);
    out.push(0x80 | (opcode & 0x0f));
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => out.push(mask_bit | n as u8),
        n @ 126..=0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let start = out.len() + mask.map_or(0, |_| 4);
    if let Some(key) = mask {
        out.extend_from_slice(&key);
    }
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut out[start..], key);
    }
    out
}

/// Where the header block ends (just past "\r\n\r\n"), searching from `from`.
pub(super) fn header_end(buf: &[u8], from: usize) -> Option<usize> {
    let from = from.min(buf.len());
    buf[from..]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| from + i + 4)
}

/// Whether `prefix` can still begin with `start` (it is a prefix of it, or
/// the other way round).
pub(super) fn may_start_with(prefix: &[u8], start: &[u8]) -> bool {
    let n = prefix.len().min(start.len());
    prefix[..n] == start[..n]
}

/// Whether a request header block asks for a WebSocket upgrade.
pub(super) fn is_upgrade_request(header: &[u8]) -> bool {
    let text = String::from_utf8_lossy(header);
    text.lines().skip(1).any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("upgrade")
                && value.to_ascii_lowercase().contains("websocket")
        })
    })
}

/// The status code of a response header block.
pub(super) fn status(header: &[u8]) -> Option<u16> {
    let line = header.split(|&b| b == b'\r').next()?;
    let mut parts = line.split(|&b| b == b' ');
    let version = parts.next()?;
    if !version.starts_with(b"HTTP/") {
        return None;
    }
    std::str::from_utf8(parts.next()?).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check(payload_len: usize, mask: Option<[u8; 4]>, header_len: usize) {
        let payload: Vec<u8> = (0..payload_len).map(|i| (i % 251) as u8).collect();
        let frame = encode(TEXT, &payload, mask);
        let h = Header::parse(&frame).unwrap();
        assert_eq!(
            (h.fin, h.rsv, h.opcode, h.mask, h.len, h.header_len),
            (true, 0, TEXT, mask, payload_len as u64, header_len)
        );
        assert_eq!(h.total(), Some(frame.len()));
        let mut body = frame[h.header_len..].to_vec();
        if let Some(key) = mask {
            if payload_len > 0 {
                assert_ne!(body, payload, "masked on the wire");
            }
            apply_mask(&mut body, key);
        }
        assert_eq!(body, payload);
        // Any strict prefix of the header is incomplete.
        for cut in 0..h.header_len {
            assert_eq!(Header::parse(&frame[..cut]), None);
        }
    }

    #[test]
    fn lengths_and_masks_round_trip() {
        for mask in [None, Some([1, 2, 3, 4])] {
            let m = if mask.is_some() { 4 } else { 0 };
            check(0, mask, 2 + m);
            check(125, mask, 2 + m);
            check(126, mask, 4 + m);
            check(65_535, mask, 4 + m);
            check(65_536, mask, 10 + m);
        }
    }

    #[test]
    fn flags_and_opcodes() {
        // FIN=0, RSV1, binary; ping with FIN.
        let h = Header::parse(&[0x42, 0x00]).unwrap();
        assert_eq!(
            (h.fin, h.rsv, h.opcode, h.is_control()),
            (false, 0x40, 2, false)
        );
        let h = Header::parse(&[0x89, 0x00]).unwrap();
        assert_eq!((h.fin, h.opcode, h.is_control()), (true, 9, true));
        // A 64-bit length too large for memory still parses.
        let mut huge = vec![0x82, 127];
        huge.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(Header::parse(&huge).unwrap().len, u64::MAX);
    }

    #[test]
    fn handshake_helpers() {
        let req = b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUPGRADE:  WebSocket\r\n\r\nrest";
        let end = header_end(req, 0).unwrap();
        assert_eq!(&req[end..], b"rest");
        assert!(is_upgrade_request(&req[..end]));
        assert!(!is_upgrade_request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert_eq!(
            status(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"),
            Some(101)
        );
        assert_eq!(status(b"HTTP/1.1 404 Not Found\r\n\r\n"), Some(404));
        assert_eq!(status(b"SSH-2.0\r\n\r\n"), None);
        assert!(may_start_with(b"GE", b"GET "));
        assert!(may_start_with(b"GET /x", b"GET "));
        assert!(!may_start_with(b"POST", b"GET "));
        assert_eq!(header_end(b"a\r\n\r", 0), None);
    }
}

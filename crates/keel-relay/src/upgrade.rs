//! The WebSocket upgrade, done here rather than by axum's `WebSocketUpgrade`,
//! so that the relay holds tungstenite's stream itself and can send a large
//! message as fragments ([`Fragments`]): tungstenite copies every frame it
//! writes into the connection's write buffer, a `Vec` that keeps the
//! capacity of the largest frame it ever held. A 1 MB delivery to 100
//! subscribers left 100 MB of such buffers; in 64 KiB fragments each buffer
//! stays near 64 KiB, and the fragments are slices of the one shared frame.
//!
//! The checks are axum's for HTTP/1.1 (RFC 6455 section 4.2.1): GET,
//! `Connection: upgrade`, `Upgrade: websocket`, `Sec-WebSocket-Version: 13`,
//! a `Sec-WebSocket-Key`, and a connection hyper can upgrade.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

pub(crate) use tokio_tungstenite::tungstenite::protocol::CloseFrame;
pub(crate) use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

/// A server connection after the upgrade.
pub(crate) type WebSocket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Text messages longer than this go out as fragments of this size.
pub(crate) const FRAGMENT_BYTES: usize = 64 * 1024;

/// A valid upgrade request, ready to answer.
pub(crate) struct Upgrade {
    key: HeaderValue,
    on_upgrade: hyper::upgrade::OnUpgrade,
    offered: Vec<HeaderValue>,
}

/// Why a request is not a WebSocket upgrade.
pub(crate) struct NotUpgrade(StatusCode, &'static str);

impl IntoResponse for NotUpgrade {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

impl<S: Send + Sync> FromRequestParts<S> for Upgrade {
    type Rejection = NotUpgrade;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        if parts.method != Method::GET {
            return Err(NotUpgrade(
                StatusCode::METHOD_NOT_ALLOWED,
                "Request method must be `GET`",
            ));
        }
        if !header_has_token(&parts.headers, header::CONNECTION, "upgrade") {
            return Err(NotUpgrade(
                StatusCode::UPGRADE_REQUIRED,
                "Connection header did not include 'upgrade'",
            ));
        }
        if !header_has_token(&parts.headers, header::UPGRADE, "websocket") {
            return Err(NotUpgrade(
                StatusCode::UPGRADE_REQUIRED,
                "`Upgrade` header did not include 'websocket'",
            ));
        }
        if parts
            .headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .is_none_or(|v| v.as_bytes() != b"13")
        {
            return Err(NotUpgrade(
                StatusCode::BAD_REQUEST,
                "`Sec-WebSocket-Version` header did not include '13'",
            ));
        }
        let Some(key) = parts.headers.get(header::SEC_WEBSOCKET_KEY).cloned() else {
            return Err(NotUpgrade(
                StatusCode::BAD_REQUEST,
                "`Sec-WebSocket-Key` header missing",
            ));
        };
        let Some(on_upgrade) = parts.extensions.remove::<hyper::upgrade::OnUpgrade>() else {
            return Err(NotUpgrade(
                StatusCode::UPGRADE_REQUIRED,
                "WebSocket request couldn't be upgraded since no upgrade state was present",
            ));
        };
        let offered = parts
            .headers
            .get_all(header::SEC_WEBSOCKET_PROTOCOL)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .filter_map(|p| HeaderValue::from_bytes(p.trim_ascii()).ok())
            .collect();
        Ok(Upgrade {
            key,
            on_upgrade,
            offered,
        })
    }
}

impl Upgrade {
    /// Answers 101, choosing `protocol` if the client offered it, and runs
    /// `serve` on the connection once hyper hands it over.
    pub(crate) fn on_upgrade<F, Fut>(
        self,
        protocol: &'static str,
        config: WebSocketConfig,
        serve: F,
    ) -> Response
    where
        F: FnOnce(WebSocket) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let chosen = self
            .offered
            .iter()
            .any(|p| p.as_bytes() == protocol.as_bytes());
        let on_upgrade = self.on_upgrade;
        tokio::spawn(async move {
            let Ok(upgraded) = on_upgrade.await else {
                return;
            };
            let socket = WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                Role::Server,
                Some(config),
            )
            .await;
            serve(socket).await;
        });
        let accept =
            tokio_tungstenite::tungstenite::handshake::derive_accept_key(self.key.as_bytes());
        let mut response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, HeaderValue::from_static("upgrade"))
            .header(header::UPGRADE, HeaderValue::from_static("websocket"))
            .header(header::SEC_WEBSOCKET_ACCEPT, accept)
            .body(axum::body::Body::empty())
            .unwrap_or_default();
        if chosen {
            response.headers_mut().insert(
                header::SEC_WEBSOCKET_PROTOCOL,
                HeaderValue::from_static(protocol),
            );
        }
        response
    }
}

/// The messages that carry `text`: itself when it is short, else fragments
/// of [`FRAGMENT_BYTES`] (a text frame, continuation frames, the last one
/// final), each a slice of the same bytes. A fragment may end inside a
/// UTF-8 sequence: RFC 6455 checks the whole message, and so do clients.
pub(crate) fn fragments(text: Utf8Bytes) -> Fragments {
    Fragments {
        bytes: Bytes::from(text),
        at: 0,
        done: false,
    }
}

/// See [`fragments`].
pub(crate) struct Fragments {
    bytes: Bytes,
    at: usize,
    done: bool,
}

impl Iterator for Fragments {
    type Item = Message;

    fn next(&mut self) -> Option<Message> {
        if self.done {
            return None;
        }
        let end = (self.at + FRAGMENT_BYTES).min(self.bytes.len());
        let opcode = if self.at == 0 {
            OpCode::Data(Data::Text)
        } else {
            OpCode::Data(Data::Continue)
        };
        self.done = end == self.bytes.len();
        let frame = Frame::message(self.bytes.slice(self.at..end), opcode, self.done);
        self.at = end;
        Some(Message::Frame(frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payloads(text: &str) -> Vec<(OpCode, bool, usize)> {
        fragments(Utf8Bytes::from(text.to_owned()))
            .map(|m| match m {
                Message::Frame(f) => (f.header().opcode, f.header().is_final, f.payload().len()),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn short_text_is_one_final_frame_and_long_text_is_fragments() {
        let text = OpCode::Data(Data::Text);
        let cont = OpCode::Data(Data::Continue);
        assert_eq!(payloads("hello"), [(text, true, 5)]);
        assert_eq!(payloads(""), [(text, true, 0)]);
        let exact = "a".repeat(FRAGMENT_BYTES);
        assert_eq!(payloads(&exact), [(text, true, FRAGMENT_BYTES)]);
        let long = "a".repeat(2 * FRAGMENT_BYTES + 10);
        assert_eq!(
            payloads(&long),
            [
                (text, false, FRAGMENT_BYTES),
                (cont, false, FRAGMENT_BYTES),
                (cont, true, 10)
            ]
        );
    }
}

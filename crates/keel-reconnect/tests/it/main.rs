//! keel-reconnect integration tests: a real WebSocket server on 127.0.0.1,
//! broken for real through the keel-faults chaos proxy.

mod behaviour;
mod herd;
mod support;
mod tls;
mod units;

//! keel-relay as a real process on 127.0.0.1, with real clients.

mod protocol;
mod resilience;
mod support;

//! keel-session integration tests: real SQLite files in temp directories.

mod conformance;
mod durability;
mod health;
mod messages;
mod model;
mod outbox;
mod sessions;
mod support;

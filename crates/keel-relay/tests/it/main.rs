//! keel-relay as a real process on 127.0.0.1, with real clients.

mod abuse;
mod backup;
mod bad_input;
mod cluster;
mod config;
mod conformance;
mod doctor;
mod exec;
mod logs;
mod protocol;
mod resilience;
mod spool;
mod support;
mod trust;
mod upstream;

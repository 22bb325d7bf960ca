//! Cross-crate load scenarios at small scale (`cargo test -p keel-tests --test load`).
//!
//! Empty until `keel-harness` provides the scenarios; per-crate load tests
//! (for example keel-session's `concurrent_sessions_10k`) live in each crate.

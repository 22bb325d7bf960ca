//! Cross-crate chaos scenarios at small scale (`cargo test -p keel-tests --test chaos`).
//!
//! Empty until `keel-harness` provides the scenarios; per-crate fault tests
//! (for example keel-session's SIGKILL crash test) live in each crate.

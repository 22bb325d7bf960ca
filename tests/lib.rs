//! keel's cross-crate load and chaos tests at small scale.
//!
//! `tests/load` runs every scenario of `cargo xtask load` at small scale
//! against a real relay process (this package's `keel-relay-test` binary:
//! keel-relay with its failpoints compiled in but unarmed), the checker's
//! self-test (each planted bug caught), plan determinism, and the HTML
//! report in a real browser. `tests/chaos` is empty until the chaos suite
//! lands.

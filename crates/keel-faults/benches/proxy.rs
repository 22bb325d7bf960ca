//! Proxy benchmark: written next.
fn main() {}

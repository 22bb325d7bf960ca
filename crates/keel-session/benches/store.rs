//! Benchmarks: written in the next commit.
fn main() {}

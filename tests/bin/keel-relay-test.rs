//! The relay for keel-tests: `keel-relay` itself (`keel_relay::cli::run`),
//! built with the `failpoints` feature so that the checker's self-test can
//! plant bugs (`KEEL_FAILPOINTS`). Without that variable it is the relay.

fn main() -> anyhow::Result<()> {
    keel_relay::cli::run(std::env::args_os())
}

//! `keel-relay`: serve, doctor, redrive (see `keel_relay::cli`).

fn main() -> anyhow::Result<()> {
    keel_relay::cli::run(std::env::args_os())
}

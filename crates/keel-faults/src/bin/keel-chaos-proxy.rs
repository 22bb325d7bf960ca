//! `keel-chaos-proxy`: a Toxiproxy-style chaos proxy with an HTTP JSON API.
//!
//! ```text
//! keel-chaos-proxy --api 127.0.0.1:8474 [--config proxies.json] [--allow-remote]
//! ```
//!
//! `--config` takes a JSON array of
//! `{"name","listen","upstream","seed"?,"protocol"?: "tcp"|"websocket"}`.
//! The API is described in the crate README and in `keel_faults::api`.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;
use keel_faults::ProxyConfig;
use keel_faults::api::{Proxies, router};

/// A chaos proxy controlled over HTTP.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Where the HTTP API listens (loopback by default).
    #[arg(long, default_value = "127.0.0.1:8474")]
    api: SocketAddr,
    /// JSON file with proxies to create at start.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Let the API and proxies listen on, and proxies forward to,
    /// non-loopback addresses (a chaos proxy is a test tool: by default it
    /// exposes nothing beyond this machine).
    #[arg(long)]
    allow_remote: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    if !args.allow_remote && !args.api.ip().is_loopback() {
        anyhow::bail!(
            "--api {} is not a loopback address; pass --allow-remote to expose the API",
            args.api
        );
    }
    let proxies = if args.allow_remote {
        Proxies::allowing_remote()
    } else {
        Proxies::new()
    };
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let configs: Vec<ProxyConfig> = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a JSON array of proxies", path.display()))?;
        for config in configs {
            let name = config.name.clone();
            let view = proxies
                .create(config)
                .await
                .with_context(|| format!("cannot create proxy {name}"))?;
            println!("proxy {} {} -> {}", view.name, view.listen, view.upstream);
        }
    }
    let listener = tokio::net::TcpListener::bind(args.api)
        .await
        .with_context(|| format!("cannot listen on {}; is another proxy running?", args.api))?;
    println!("api http://{}", listener.local_addr()?);
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    axum::serve(listener, router(proxies))
        .with_graceful_shutdown(shutdown)
        .await
        .context("api server failed")?;
    Ok(())
}

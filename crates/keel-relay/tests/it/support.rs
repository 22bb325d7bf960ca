//! A relay process, clients, and waiting helpers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use keel_relay::client::{Client, ClientConfig, Event};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A `keel-relay serve` process.
pub(crate) struct RelayProcess {
    pub(crate) child: Child,
    pub(crate) addr: SocketAddr,
    stdout: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

/// Options for a relay process.
#[derive(Default, Clone)]
pub(crate) struct Opts {
    pub(crate) listen: Option<SocketAddr>,
    pub(crate) upstream: Option<String>,
    pub(crate) spool: Option<PathBuf>,
    pub(crate) config: Option<String>,
    /// Extra environment variables for the relay process.
    pub(crate) env: Vec<(&'static str, &'static str)>,
    /// Extra `serve` arguments.
    pub(crate) args: Vec<String>,
}

impl RelayProcess {
    pub(crate) async fn start(data: &Path, opts: Opts) -> RelayProcess {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_keel-relay"));
        cmd.arg("serve")
            .arg("--data")
            .arg(data)
            .arg("--listen")
            .arg(
                opts.listen
                    .unwrap_or_else(|| "127.0.0.1:0".parse().unwrap())
                    .to_string(),
            )
            .env("RUST_LOG", "warn")
            .envs(opts.env.iter().copied())
            .args(&opts.args)
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        if let Some(u) = &opts.upstream {
            cmd.arg("--upstream").arg(u);
        }
        if let Some(s) = &opts.spool {
            cmd.arg("--spool").arg(s);
        }
        if let Some(text) = &opts.config {
            let path = data.with_extension("toml");
            std::fs::write(&path, text).unwrap();
            cmd.arg("--config").arg(path);
        }
        let mut child = cmd.spawn().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), stdout.next_line())
            .await
            .expect("relay started within 30 s")
            .unwrap()
            .expect("relay printed its address");
        let addr = line
            .strip_prefix("keel-relay listening on ")
            .unwrap_or_else(|| panic!("unexpected first line: {line}"))
            .parse()
            .unwrap();
        RelayProcess {
            child,
            addr,
            stdout,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub(crate) fn pid(&self) -> i32 {
        self.child.id().unwrap() as i32
    }

    pub(crate) async fn kill9(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        self.child.wait().await.unwrap();
    }

    /// SIGTERM; returns the exit code and the last line printed.
    pub(crate) async fn terminate(mut self) -> (Option<i32>, String) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("relay stopped within 30 s")
            .unwrap();
        let mut last = String::new();
        while let Ok(Some(line)) = self.stdout.next_line().await {
            last = line;
        }
        (status.code(), last)
    }
}

/// A free port on 127.0.0.1 (for a relay that must come back on the same address).
pub(crate) fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

pub(crate) async fn client(url: &str) -> Client {
    Client::connect(ClientConfig::new(url)).await.unwrap()
}

/// Collects deliveries of `channel` until `n` arrived (or `limit` passed).
pub(crate) async fn collect(
    client: &mut Client,
    channel: &str,
    n: usize,
    limit: Duration,
) -> Vec<(u64, String)> {
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    while got.len() < n {
        let Ok(Some(event)) = tokio::time::timeout_at(deadline, client.next_event()).await else {
            break;
        };
        if let Event::Deliver {
            channel: c,
            offset,
            id,
            ..
        } = event
            && c == channel
        {
            got.push((offset, id));
        }
    }
    got
}

/// Asserts offsets are `1..=n`, in order, each once.
pub(crate) fn assert_complete_in_order(got: &[(u64, String)], n: u64) {
    let offsets: Vec<u64> = got.iter().map(|(o, _)| *o).collect();
    assert_offsets(&offsets, n);
}

/// Asserts `offsets` is exactly `1..=n`; on failure names the first difference.
pub(crate) fn assert_offsets(offsets: &[u64], n: u64) {
    if let Some(i) = (0..offsets.len().max(n as usize))
        .find(|&i| offsets.get(i).copied() != Some(i as u64 + 1) || i as u64 >= n)
    {
        panic!(
            "expected offsets 1..={n} once each, in order; got {} offsets, first difference at index {i}: {:?} (around: {:?})",
            offsets.len(),
            offsets.get(i),
            &offsets[i.saturating_sub(3)..(i + 3).min(offsets.len())]
        );
    }
}

/// A raw WebSocket client for frames the SDK would never send.
pub(crate) struct RawWs {
    ws: tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
}

impl RawWs {
    pub(crate) async fn connect(url: &str) -> RawWs {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        RawWs { ws }
    }

    /// The WebSocket itself, for tests that split it.
    pub(crate) fn into_inner(
        self,
    ) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>
    {
        self.ws
    }

    pub(crate) async fn send_text(&mut self, text: String) {
        use futures::SinkExt;
        self.ws
            .send(tokio_tungstenite::tungstenite::Message::text(text))
            .await
            .unwrap();
    }

    pub(crate) async fn send(&mut self, v: serde_json::Value) {
        self.send_text(v.to_string()).await;
    }

    /// Writes every frame, then flushes once: they leave in one TCP write
    /// (as far as the socket buffer allows), as a pipelining client sends them.
    pub(crate) async fn send_all(&mut self, frames: impl IntoIterator<Item = serde_json::Value>) {
        use futures::SinkExt;
        for f in frames {
            self.ws
                .feed(tokio_tungstenite::tungstenite::Message::text(f.to_string()))
                .await
                .unwrap();
        }
        self.ws.flush().await.unwrap();
    }

    /// Sends a raw frame the SDK could never send (bad UTF-8, fragments).
    pub(crate) async fn send_frame(
        &mut self,
        frame: tokio_tungstenite::tungstenite::protocol::frame::Frame,
    ) {
        use futures::SinkExt;
        // The relay may close before a large frame is fully written.
        let _ = self
            .ws
            .send(tokio_tungstenite::tungstenite::Message::Frame(frame))
            .await;
    }

    /// Reads until the relay closes; returns its close code.
    pub(crate) async fn close_code(&mut self) -> Option<u16> {
        loop {
            match self.next().await {
                Ok(_) => continue,
                Err(code) => return code,
            }
        }
    }

    /// The next frame that is not a `deliver`.
    pub(crate) async fn next_answer(&mut self) -> serde_json::Value {
        loop {
            let f = self.next_json().await;
            if f["type"] != "deliver" {
                return f;
            }
        }
    }

    /// The next text frame as JSON; panics on close or after 10 s.
    pub(crate) async fn next_json(&mut self) -> serde_json::Value {
        match self.next().await {
            Ok(v) => v,
            Err(close) => panic!("closed: {close:?}"),
        }
    }

    /// The next text frame, or the close code.
    pub(crate) async fn next(&mut self) -> Result<serde_json::Value, Option<u16>> {
        use futures::StreamExt;
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), self.ws.next())
                .await
                .expect("a frame within 10 s");
            match msg {
                Some(Ok(Message::Text(t))) => return Ok(serde_json::from_str(t.as_str()).unwrap()),
                Some(Ok(Message::Close(frame))) => return Err(frame.map(|f| u16::from(f.code))),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Err(None),
            }
        }
    }
}

/// The sum of a metric's series on the relay's `/metrics`.
pub(crate) async fn metric(relay: &RelayProcess, name: &str) -> f64 {
    let text = http_get(&format!("http://{}/metrics", relay.addr)).await;
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A minimal HTTP/1.1 GET over a raw socket; returns the whole response.
pub(crate) async fn http_get(url: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    s.write_all(
        format!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

/// The status of the next `send_result` the client receives (within 20 s).
pub(crate) async fn send_result(client: &mut Client) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let e = tokio::time::timeout_at(deadline, client.next_event())
            .await
            .expect("a send_result within 20 s")
            .expect("the connection open");
        if let Event::Deliver { payload, .. } = e
            && payload["type"] == "send_result"
        {
            return payload["status"].as_str().unwrap_or_default().to_owned();
        }
    }
}

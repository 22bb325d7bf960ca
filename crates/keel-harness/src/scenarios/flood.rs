//! Abuse from many connections beside a well-behaved client (seed 003's
//! abuse tests, seed 002's resource exhaustion): `slowloris` trickles
//! request heads and WebSocket frames byte by byte, `session_flood` opens
//! sessions from one address as fast as it can. The relay must close or
//! refuse the abusers by its limits while the calm client goes on.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{body, params, setup};
use crate::Error;
use crate::fixture::RelayOptions;
use crate::scenario::{Action, Ctx, Measured, Plan, PlanInput, Scenario, SeedRef, Suite};
use crate::threshold::{Bound, Threshold};
use crate::workload::Calm;

/// A TCP connection to `addr` from `source`.
async fn tcp_from(
    source: Option<IpAddr>,
    addr: SocketAddr,
) -> std::io::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(addr).await
}

/// Whether the peer closed (EOF or reset) within `limit`.
async fn closed_within(stream: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 256];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

const SLOWLORIS: &str = "slowloris";

pub(crate) const SLOWLORIS_SCENARIO: Scenario = Scenario {
    name: SLOWLORIS,
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "002/003",
        test: "resource exhaustion: connections held open by slow clients",
        threshold: "no crash; graceful degradation",
    },
    what: "many connections trickle a request head (or, upgraded, a WebSocket frame) one byte every 200 ms, beside a calm client publishing and receiving every 20 ms",
    target: "every trickler closed by the relay within its header or frame timeout plus 2 s, the relay's connections back to the calm client's alone, the calm client without an error or a loss",
    needs_process: Some("starts the relay with the limits it abuses, and counts its sockets"),
    thresholds: |plan| {
        vec![
            Threshold::exact("tricklers", plan.num("connections")),
            Threshold::all("closed_in_time_ratio"),
            Threshold::zero("left_open"),
            Threshold::zero("calm_errors"),
            Threshold::all("calm_delivered_ratio"),
        ]
    },
    plan: |input: &PlanInput| {
        let mut plan = input.plan(
            SLOWLORIS,
            &params(&[
                ("connections", input.scale.pick(100, 4_000) as f64),
                ("header_timeout_ms", 1_000.0),
                ("frame_timeout_ms", 2_000.0),
                ("trickle_ms", 200.0),
            ]),
        );
        plan.actions.push(Action {
            at_ms: 500,
            duration_ms: 0,
            kind: "slowloris".into(),
            target: "relay".into(),
            params: json!({"half_heads_half_frames": true}),
        });
        plan
    },
    run: body!(run_slowloris),
    budget: Duration::from_secs(180),
};

const UPGRADE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// One trickler: a request head byte by byte (`frame` false), or an
/// upgrade and then a masked text frame byte by byte. True when the relay
/// closed it within its timeout plus 2 s.
async fn trickle(
    source: Option<IpAddr>,
    addr: SocketAddr,
    frame: bool,
    every: Duration,
    timeout: Duration,
) -> Result<bool, Error> {
    let mut s = tcp_from(source, addr)
        .await
        .map_err(|e| setup("trickler connect", e))?;
    if frame {
        s.write_all(UPGRADE)
            .await
            .map_err(|e| setup("upgrade", e))?;
        let mut head = Vec::new();
        let mut buf = [0u8; 512];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.map_err(|e| setup("upgrade", e))?;
            if n == 0 {
                return Err(setup("upgrade", "closed before 101"));
            }
            head.extend_from_slice(&buf[..n]);
        }
        if !head.starts_with(b"HTTP/1.1 101") {
            return Err(setup(
                "upgrade",
                String::from_utf8_lossy(&head).into_owned(),
            ));
        }
    }
    // A frame that claims 1,000 bytes (masked text), or a head that never ends.
    let bytes: Vec<u8> = if frame {
        let mut f = vec![0x81, 0xFE, 0x03, 0xE8, 1, 2, 3, 4];
        f.extend(std::iter::repeat_n(b'x', 1000));
        f
    } else {
        let mut h = b"GET /ws HTTP/1.1\r\nHost: relay\r\nX-Slow: ".to_vec();
        h.extend(std::iter::repeat_n(b'a', 1000));
        h
    };
    let started = tokio::time::Instant::now();
    let limit = timeout + Duration::from_secs(2);
    for b in bytes {
        if s.write_all(&[b]).await.is_err() {
            return Ok(started.elapsed() <= limit);
        }
        // A close shows up as a read of 0 while trickling.
        let mut probe = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(every, s.read(&mut probe)).await {
            return Ok(started.elapsed() <= limit);
        }
        if started.elapsed() > limit {
            return Ok(false);
        }
    }
    Ok(closed_within(&mut s, limit.saturating_sub(started.elapsed())).await)
}

async fn run_slowloris(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    let (header, frame) = (
        plan.num("header_timeout_ms") as u64,
        plan.num("frame_timeout_ms") as u64,
    );
    let relay = ctx
        .relay(RelayOptions {
            config: format!("header_timeout_ms = {header}\nframe_timeout_ms = {frame}\n"),
            ..Default::default()
        })
        .await?;
    let epoch = tokio::time::Instant::from_std(ctx.recorder.epoch());
    let calm = Calm::start(&relay.url(), epoch, &ctx.recorder).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ctx.phase("tricklers");
    let t0 = ctx.recorder.now();
    let every = Duration::from_millis(plan.num("trickle_ms") as u64);
    let n = plan.count("connections");
    let permits = Arc::new(tokio::sync::Semaphore::new(500));
    let mut tasks = Vec::new();
    for i in 0..n {
        let (addr, permits) = (relay.addr(), permits.clone());
        let is_frame = i % 2 == 1;
        let timeout = Duration::from_millis(if is_frame { frame } else { header });
        tasks.push(tokio::spawn(async move {
            // At most 500 trickle at a time (each holds its place until
            // the relay closes it).
            let _p = permits.acquire_owned().await;
            trickle(
                crate::client::source_ip(i + 1),
                addr,
                is_frame,
                every,
                timeout,
            )
            .await
        }));
    }
    let mut closed = 0usize;
    let mut errors = Vec::new();
    for t in tasks {
        match t.await.map_err(|e| setup("trickler", e))? {
            Ok(true) => closed += 1,
            Ok(false) => {}
            Err(e) => errors.push(e.to_string()),
        }
    }
    ctx.recorder
        .fault("slowloris", "relay", t0, ctx.recorder.now());
    if let Some(e) = errors.first() {
        return Err(setup(
            "a trickler failed",
            format!("{e} ({} in all)", errors.len()),
        ));
    }
    // Their places free again: only the calm client's connection left.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let left = loop {
        let text = crate::fixture::http_get(relay.addr(), "/healthz")
            .await
            .unwrap_or_default();
        let body = match (text.find('{'), text.rfind('}')) {
            (Some(a), Some(b)) if a < b => &text[a..=b],
            _ => "{}",
        };
        let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        // Beyond the calm client's and this request's.
        let left = (v["tcp_connections"].as_f64().unwrap_or(f64::MAX) - 2.0).max(0.0);
        if left == 0.0 || tokio::time::Instant::now() >= deadline {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut m = Measured::default();
    m.set("tricklers", n as f64)
        .set("closed_in_time_ratio", closed as f64 / n.max(1) as f64)
        .set("left_open", left);
    m.note(format!(
        "{n} tricklers ({} request heads, {} WebSocket frames): {closed} closed by the relay within their timeout plus 2 s; {} connections beyond the calm client's left afterwards",
        n.div_ceil(2),
        n / 2,
        left
    ));
    calm.finish(&mut m).await?;
    Ok(m)
}

const FLOOD: &str = "session_flood";

pub(crate) const SESSION_FLOOD: Scenario = Scenario {
    name: FLOOD,
    suite: Suite::Chaos,
    seed: SeedRef {
        seed: "002/003",
        test: "resource exhaustion: session creation flood",
        threshold: "no crash; graceful degradation",
    },
    what: "for the flood's time, one address opens new sessions (hello without a token) as fast as 50 connections at a time allow, with the relay's default per-address session limits (20/s, burst 200), beside a calm client on another address",
    target: "sessions created no faster than the limit allows (burst plus rate times duration), the rest refused `rate_limited`; the calm client without an error or a loss",
    needs_process: Some(
        "starts the relay with its default per-address session limits, which it floods",
    ),
    thresholds: |_| {
        vec![
            Threshold::new(
                "created_over_allowance",
                "x",
                Some(Bound::Le(1.0)),
                Bound::Le(1.0),
            ),
            Threshold::new(
                "refused_rate_limited",
                "",
                Some(Bound::Ge(1.0)),
                Bound::Ge(1.0),
            ),
            Threshold::zero("other_failures"),
            Threshold::zero("calm_errors"),
            Threshold::all("calm_delivered_ratio"),
        ]
    },
    plan: |input: &PlanInput| {
        let mut plan = input.plan(
            FLOOD,
            &params(&[
                ("flood_ms", input.scale.pick(3_000, 10_000) as f64),
                ("max_attempts", input.scale.pick(20_000, 100_000) as f64),
                ("session_rate", 20.0),
                ("session_burst", 200.0),
            ]),
        );
        plan.actions.push(Action {
            at_ms: 500,
            duration_ms: input.scale.pick(3_000, 10_000) as u64,
            kind: "session_flood".into(),
            target: "relay, from 127.0.0.9".into(),
            params: json!({}),
        });
        plan
    },
    run: body!(run_flood),
    budget: Duration::from_secs(180),
};

async fn run_flood(ctx: &Ctx, plan: &Plan) -> Result<Measured, Error> {
    let (rate, burst) = (plan.num("session_rate"), plan.num("session_burst"));
    let relay = ctx
        .relay(RelayOptions {
            config: format!("session_rate = {rate}\nsession_burst = {burst}\n"),
            ..Default::default()
        })
        .await?;
    let epoch = tokio::time::Instant::from_std(ctx.recorder.epoch());
    let calm = Calm::start(&relay.url(), epoch, &ctx.recorder).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    ctx.phase("flooding");
    let t0 = ctx.recorder.now();
    let started = tokio::time::Instant::now();
    let (created, limited, other) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let flooder = Some(IpAddr::from([127, 0, 0, 9]));
    // 50 attempts in flight at any time, until the flood's time is up.
    let flood = Duration::from_millis(plan.num("flood_ms") as u64);
    let attempts = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let url = relay.url();
        let (created, limited, other, attempts) = (
            created.clone(),
            limited.clone(),
            other.clone(),
            attempts.clone(),
        );
        let cap = plan.num("max_attempts") as u64;
        tasks.push(tokio::spawn(async move {
            while started.elapsed() < flood && attempts.fetch_add(1, Ordering::Relaxed) < cap {
                match crate::client::open_session(&url, flooder).await {
                    Ok(_) => created.fetch_add(1, Ordering::Relaxed),
                    Err(e) if e.to_string().contains("rate_limited") => {
                        limited.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(_) => other.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| setup("flood task", e))?;
    }
    let took = started.elapsed().as_secs_f64();
    ctx.recorder
        .fault("session_flood", "relay", t0, ctx.recorder.now());
    let created = created.load(Ordering::Relaxed);
    // What the limit allows in that time (one more for the edge).
    let allowance = burst + rate * took + 1.0;
    let mut m = Measured::default();
    m.set("created", created as f64)
        .set("created_over_allowance", created as f64 / allowance)
        .set(
            "refused_rate_limited",
            limited.load(Ordering::Relaxed) as f64,
        )
        .set("other_failures", other.load(Ordering::Relaxed) as f64);
    m.note(format!(
        "{} attempts in {took:.2} s from one address: {created} sessions created (the limit allows {allowance:.0}), {} refused rate_limited, {} failed otherwise",
        attempts.load(Ordering::Relaxed).min(plan.num("max_attempts") as u64),
        limited.load(Ordering::Relaxed),
        other.load(Ordering::Relaxed)
    ));
    calm.finish(&mut m).await?;
    Ok(m)
}

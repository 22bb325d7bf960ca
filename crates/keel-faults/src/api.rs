//! The chaos proxy's HTTP JSON API, modelled on Toxiproxy's, served by the
//! `keel-chaos-proxy` binary (or embedded with [`router`]).
//!
//! | method | path | body | |
//! |---|---|---|---|
//! | GET | /proxies | | every proxy |
//! | POST | /proxies | `{"name","listen","upstream","seed"?,"protocol"?: "tcp"\|"websocket"}` | create (201) |
//! | GET | /proxies/{name} | | one proxy |
//! | POST | /proxies/{name} | `{"enabled": bool}` | enable or disable |
//! | DELETE | /proxies/{name} | | delete (204) |
//! | GET | /proxies/{name}/toxics | | its toxics |
//! | POST | /proxies/{name}/toxics | a toxic | add (201) |
//! | POST | /proxies/{name}/toxics/{toxic} | a toxic | replace |
//! | DELETE | /proxies/{name}/toxics/{toxic} | | remove (204) |
//! | POST | /proxies/{name}/cut | | drop live connections |
//! | POST | /proxies/{name}/partition | `{"duration_ms", "mode": "hang"\|"refuse"}` | partition |
//! | GET | /proxies/{name}/tamperings | | `{"tamperings": [Tampering], "dropped": n}` |
//! | DELETE | /proxies/{name}/tamperings | | empty the record (204) |
//! | POST | /reset | | every proxy: no toxics, no partition, enabled |
//!
//! Errors are `{"error": "...", "code": "not_found"|"exists"|"invalid"|"bind"|"remote"|"host"}`.
//!
//! Frame (`ws_*`) toxics are refused (`invalid`, 400) on a proxy not created
//! with `"protocol": "websocket"`. A tampering is
//! `{"seq","at_ms","toxic","action": "drop"|"duplicate"|"reorder"|"corrupt"|"delay"|"early_close",
//! "effective","connection","stream","fields": {...},"detail"}`
//! ([`Tampering`](crate::Tampering)).
//!
//! It is a test tool, loopback only by default: a proxy's listen and
//! upstream addresses must be loopback ones (`remote`, 403) unless the set
//! was made with [`Proxies::allowing_remote`] (`--allow-remote`), and every
//! request must name the API by an IP address or `localhost` in its `Host`
//! header (`host`, 403), so that a web page cannot reach it through a DNS
//! name rebound to 127.0.0.1.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::Mutex;

use crate::proxy::{
    PartitionMode, Protocol, Proxy, ProxyConfig, ProxyError, ProxyStats, Tampering, Toxic,
};

/// The proxies an API server manages.
#[derive(Debug, Default)]
pub struct Proxies {
    proxies: Mutex<BTreeMap<String, Proxy>>,
    allow_remote: bool,
}

impl Proxies {
    /// An empty set whose proxies listen on and forward to loopback
    /// addresses only.
    pub fn new() -> Arc<Proxies> {
        Arc::new(Proxies::default())
    }

    /// An empty set whose proxies may listen on and forward to any address.
    pub fn allowing_remote() -> Arc<Proxies> {
        Arc::new(Proxies {
            allow_remote: true,
            ..Proxies::default()
        })
    }

    /// Creates a proxy (also used to load a config file at start).
    pub async fn create(&self, config: ProxyConfig) -> Result<ProxyView, ApiError> {
        if !self.allow_remote {
            for addr in [config.listen, config.upstream] {
                if !addr.ip().is_loopback() {
                    return Err(ApiError::Remote(addr));
                }
            }
        }
        let mut proxies = self.proxies.lock().await;
        if proxies.contains_key(&config.name) {
            return Err(ApiError::Exists(config.name));
        }
        let proxy = Proxy::start(config.clone())
            .await
            .map_err(ApiError::Proxy)?;
        let view = ProxyView::of(&proxy);
        proxies.insert(config.name, proxy);
        Ok(view)
    }
}

/// A proxy as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ProxyView {
    /// Name.
    pub name: String,
    /// Listening address.
    pub listen: SocketAddr,
    /// Upstream address.
    pub upstream: SocketAddr,
    /// What it forwards.
    #[serde(default)]
    pub protocol: Protocol,
    /// Enabled or not.
    pub enabled: bool,
    /// Toxics in force.
    pub toxics: Vec<Toxic>,
    /// Milliseconds left of a partition, if one is in force.
    pub partition_ms_left: Option<u64>,
    /// Counters.
    pub stats: StatsView,
}

/// Counters as the API shows them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StatsView {
    /// Connections accepted.
    pub accepted: u64,
    /// Connections open.
    pub open: u64,
    /// Bytes client to server.
    pub bytes_upstream: u64,
    /// Bytes server to client.
    pub bytes_downstream: u64,
    /// WebSocket frames parsed.
    #[serde(default)]
    pub frames_seen: u64,
    /// WebSocket frames of text messages checked against frame toxics.
    #[serde(default)]
    pub frames_inspected: u64,
    /// WebSocket data frames never inspected (binary, compressed, too large).
    #[serde(default)]
    pub frames_opaque: u64,
}

/// The body of `GET /proxies/{name}/tamperings`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TamperingsView {
    /// The records kept, in order.
    pub tamperings: Vec<Tampering>,
    /// Records not kept because the record was full.
    pub dropped: u64,
}

impl ProxyView {
    fn of(p: &Proxy) -> ProxyView {
        let ProxyStats {
            accepted,
            open,
            bytes_upstream,
            bytes_downstream,
            frames_seen,
            frames_inspected,
            frames_opaque,
        } = p.stats();
        ProxyView {
            name: p.name().to_owned(),
            listen: p.listen_addr(),
            upstream: p.upstream_addr(),
            protocol: p.protocol(),
            enabled: p.enabled(),
            toxics: p.toxics(),
            partition_ms_left: p.partitioned().map(|part| {
                part.until
                    .saturating_duration_since(tokio::time::Instant::now())
                    .as_millis() as u64
            }),
            stats: StatsView {
                accepted,
                open,
                bytes_upstream,
                bytes_downstream,
                frames_seen,
                frames_inspected,
                frames_opaque,
            },
        }
    }
}

/// An API error, with a stable code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No proxy or toxic by that name.
    #[error("{0} not found")]
    NotFound(String),
    /// A proxy by that name exists.
    #[error("proxy {0:?} already exists")]
    Exists(String),
    /// The proxy refused the change.
    #[error(transparent)]
    Proxy(ProxyError),
    /// A non-loopback address without `--allow-remote`.
    #[error("{0} is not a loopback address; start the proxy with --allow-remote to use it")]
    Remote(SocketAddr),
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = match &self {
            ApiError::NotFound(_) | ApiError::Proxy(ProxyError::ToxicNotFound(_)) => {
                (StatusCode::NOT_FOUND, "not_found")
            }
            ApiError::Exists(_) | ApiError::Proxy(ProxyError::ToxicExists(_)) => {
                (StatusCode::CONFLICT, "exists")
            }
            ApiError::Proxy(ProxyError::InvalidToxic(_)) => (StatusCode::BAD_REQUEST, "invalid"),
            ApiError::Proxy(ProxyError::Bind { .. }) => (StatusCode::CONFLICT, "bind"),
            ApiError::Remote(_) => (StatusCode::FORBIDDEN, "remote"),
        };
        (
            status,
            Json(json!({"error": self.to_string(), "code": code})),
        )
            .into_response()
    }
}

type Shared = State<Arc<Proxies>>;

/// The API's routes over `proxies`.
pub fn router(proxies: Arc<Proxies>) -> Router {
    Router::new()
        .route("/proxies", get(list).post(create))
        .route("/proxies/{name}", get(show).post(update).delete(delete))
        .route("/proxies/{name}/toxics", get(toxics).post(add_toxic))
        .route(
            "/proxies/{name}/toxics/{toxic}",
            get(show_toxic).post(update_toxic).delete(remove_toxic),
        )
        .route("/proxies/{name}/cut", post(cut))
        .route("/proxies/{name}/partition", post(partition))
        .route(
            "/proxies/{name}/tamperings",
            get(tamperings).delete(clear_tamperings),
        )
        .route("/reset", post(reset))
        .layer(axum::middleware::from_fn(check_host))
        .with_state(proxies)
}

/// Whether a `Host` header names the server by an IP address or as
/// `localhost` (with or without a port), not by a DNS name that could be
/// rebound to this machine.
pub fn host_is_direct(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => {
            return v6
                .split(']')
                .next()
                .is_some_and(|a| a.parse::<std::net::Ipv6Addr>().is_ok());
        }
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::Ipv4Addr>().is_ok()
}

async fn check_host(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let host = request
        .headers()
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    if !host_is_direct(host) {
        return (
            StatusCode::FORBIDDEN,
            Json(json!({"error": format!("Host {host:?} is not an IP address or localhost"), "code": "host"})),
        )
            .into_response();
    }
    next.run(request).await
}

async fn list(State(p): Shared) -> Json<BTreeMap<String, ProxyView>> {
    let proxies = p.proxies.lock().await;
    Json(
        proxies
            .iter()
            .map(|(n, p)| (n.clone(), ProxyView::of(p)))
            .collect(),
    )
}

async fn create(
    State(p): Shared,
    Json(config): Json<ProxyConfig>,
) -> Result<(StatusCode, Json<ProxyView>), ApiError> {
    Ok((StatusCode::CREATED, Json(p.create(config).await?)))
}

async fn with<T>(
    p: &Proxies,
    name: &str,
    f: impl FnOnce(&Proxy) -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    let proxies = p.proxies.lock().await;
    let proxy = proxies
        .get(name)
        .ok_or_else(|| ApiError::NotFound(format!("proxy {name:?}")))?;
    f(proxy)
}

async fn show(State(p): Shared, Path(name): Path<String>) -> Result<Json<ProxyView>, ApiError> {
    with(&p, &name, |proxy| Ok(Json(ProxyView::of(proxy)))).await
}

#[derive(Deserialize)]
struct Update {
    enabled: bool,
}

async fn update(
    State(p): Shared,
    Path(name): Path<String>,
    Json(u): Json<Update>,
) -> Result<Json<ProxyView>, ApiError> {
    with(&p, &name, |proxy| {
        proxy.set_enabled(u.enabled);
        Ok(Json(ProxyView::of(proxy)))
    })
    .await
}

async fn delete(State(p): Shared, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    let removed = p.proxies.lock().await.remove(&name);
    match removed {
        Some(_) => Ok(StatusCode::NO_CONTENT),
        None => Err(ApiError::NotFound(format!("proxy {name:?}"))),
    }
}

async fn toxics(State(p): Shared, Path(name): Path<String>) -> Result<Json<Vec<Toxic>>, ApiError> {
    with(&p, &name, |proxy| Ok(Json(proxy.toxics()))).await
}

async fn add_toxic(
    State(p): Shared,
    Path(name): Path<String>,
    Json(t): Json<Toxic>,
) -> Result<(StatusCode, Json<Toxic>), ApiError> {
    with(&p, &name, |proxy| {
        proxy.add_toxic(t.clone()).map_err(ApiError::Proxy)?;
        Ok((StatusCode::CREATED, Json(t)))
    })
    .await
}

async fn show_toxic(
    State(p): Shared,
    Path((name, toxic)): Path<(String, String)>,
) -> Result<Json<Toxic>, ApiError> {
    with(&p, &name, |proxy| {
        proxy
            .toxics()
            .into_iter()
            .find(|t| t.name == toxic)
            .map(Json)
            .ok_or_else(|| ApiError::NotFound(format!("toxic {toxic:?}")))
    })
    .await
}

async fn update_toxic(
    State(p): Shared,
    Path((name, toxic)): Path<(String, String)>,
    Json(mut t): Json<Toxic>,
) -> Result<Json<Toxic>, ApiError> {
    t.name = toxic;
    with(&p, &name, |proxy| {
        proxy.update_toxic(t.clone()).map_err(ApiError::Proxy)?;
        Ok(Json(t))
    })
    .await
}

async fn remove_toxic(
    State(p): Shared,
    Path((name, toxic)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    with(&p, &name, |proxy| {
        proxy.remove_toxic(&toxic).map_err(ApiError::Proxy)?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

async fn cut(
    State(p): Shared,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    with(&p, &name, |proxy| Ok(Json(json!({"cut": proxy.cut()})))).await
}

#[derive(Deserialize)]
struct PartitionRequest {
    duration_ms: u64,
    #[serde(default = "hang")]
    mode: PartitionMode,
}

fn hang() -> PartitionMode {
    PartitionMode::Hang
}

async fn partition(
    State(p): Shared,
    Path(name): Path<String>,
    Json(req): Json<PartitionRequest>,
) -> Result<Json<ProxyView>, ApiError> {
    with(&p, &name, |proxy| {
        proxy.partition(Duration::from_millis(req.duration_ms), req.mode);
        Ok(Json(ProxyView::of(proxy)))
    })
    .await
}

async fn tamperings(
    State(p): Shared,
    Path(name): Path<String>,
) -> Result<Json<TamperingsView>, ApiError> {
    with(&p, &name, |proxy| {
        Ok(Json(TamperingsView {
            tamperings: proxy.tamperings(),
            dropped: proxy.tamperings_dropped(),
        }))
    })
    .await
}

async fn clear_tamperings(
    State(p): Shared,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    with(&p, &name, |proxy| {
        proxy.clear_tamperings();
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

async fn reset(State(p): Shared) -> StatusCode {
    for proxy in p.proxies.lock().await.values() {
        proxy.reset();
    }
    StatusCode::NO_CONTENT
}

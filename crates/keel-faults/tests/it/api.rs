//! The HTTP JSON API, over a real socket.

use std::net::SocketAddr;
use std::time::Duration;

use keel_faults::api::{Proxies, router};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{echo_server, round_trip};

async fn api() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router(Proxies::new())).await.unwrap() });
    addr
}

/// One HTTP/1.1 request; returns the status and the JSON body (Null if empty).
async fn call(api: SocketAddr, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    call_as(api, &api.to_string(), method, path, body).await
}

/// [`call`] with this `Host` header.
async fn call_as(
    api: SocketAddr,
    host: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.0\r\nhost: {host}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut s = TcpStream::connect(api).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).await.unwrap();
    let status: u16 = response[9..12].parse().unwrap();
    let json = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim())
        .filter(|b| !b.is_empty())
        .map(|b| serde_json::from_str(b).unwrap_or_else(|e| panic!("{e}: {response:?}")))
        .unwrap_or(Value::Null);
    (status, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manage_proxies_and_toxics_over_http() {
    let api = api().await;
    let echo = echo_server().await;
    let (status, created) = call(
        api,
        "POST",
        "/proxies",
        Some(json!({"name": "db", "listen": "127.0.0.1:0", "upstream": echo.to_string()})),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let listen: SocketAddr = created["listen"].as_str().unwrap().parse().unwrap();
    let (status, dup) = call(
        api,
        "POST",
        "/proxies",
        Some(json!({"name": "db", "listen": "127.0.0.1:0", "upstream": echo.to_string()})),
    )
    .await;
    assert_eq!((status, dup["code"].as_str()), (409, Some("exists")));

    let lag = json!({"name": "lag", "type": "latency", "stream": "downstream", "toxicity": 1.0, "attributes": {"latency": 120, "jitter": 0}});
    assert_eq!(
        call(api, "POST", "/proxies/db/toxics", Some(lag.clone()))
            .await
            .0,
        201
    );
    let (status, toxics) = call(api, "GET", "/proxies/db/toxics", None).await;
    assert_eq!((status, toxics), (200, json!([lag])));

    let mut c = TcpStream::connect(listen).await.unwrap();
    let start = std::time::Instant::now();
    round_trip(&mut c, b"hi", Duration::from_secs(2))
        .await
        .unwrap();
    assert!(start.elapsed() >= Duration::from_millis(110));

    let faster = json!({"type": "latency", "stream": "downstream", "attributes": {"latency": 0}});
    let (status, updated) = call(api, "POST", "/proxies/db/toxics/lag", Some(faster)).await;
    assert_eq!((status, updated["name"].as_str()), (200, Some("lag")));
    let start = std::time::Instant::now();
    round_trip(&mut c, b"hi", Duration::from_secs(2))
        .await
        .unwrap();
    assert!(start.elapsed() < Duration::from_millis(100));

    let bad = json!({"name": "bw", "type": "bandwidth", "attributes": {"rate": 0}});
    let (status, err) = call(api, "POST", "/proxies/db/toxics", Some(bad)).await;
    assert_eq!((status, err["code"].as_str()), (400, Some("invalid")));
    assert_eq!(
        call(api, "DELETE", "/proxies/db/toxics/lag", None).await.0,
        204
    );
    assert_eq!(
        call(api, "DELETE", "/proxies/db/toxics/lag", None).await.0,
        404
    );

    let (status, cut) = call(api, "POST", "/proxies/db/cut", None).await;
    assert_eq!((status, cut["cut"].as_u64()), (200, Some(1)));
    let (status, view) = call(
        api,
        "POST",
        "/proxies/db/partition",
        Some(json!({"duration_ms": 5000, "mode": "hang"})),
    )
    .await;
    assert_eq!(status, 200);
    assert!(view["partition_ms_left"].as_u64().unwrap() > 4000);
    assert_eq!(call(api, "POST", "/reset", None).await.0, 204);
    let (_, view) = call(api, "GET", "/proxies/db", None).await;
    assert_eq!(view["partition_ms_left"], Value::Null);
    assert_eq!(
        call(api, "POST", "/proxies/db", Some(json!({"enabled": false})))
            .await
            .1["enabled"],
        false
    );
    let (status, all) = call(api, "GET", "/proxies", None).await;
    assert_eq!((status, all.as_object().unwrap().len()), (200, 1));
    assert_eq!(call(api, "DELETE", "/proxies/db", None).await.0, 204);
    assert_eq!(call(api, "GET", "/proxies/db", None).await.0, 404);
}

/// A chaos proxy exposes nothing beyond loopback unless told to, and its
/// API answers only requests that name it by address (no DNS rebinding).
#[tokio::test]
async fn proxy_refuses_remote_listen() {
    let api = api().await;
    let echo = echo_server().await;
    for (listen, upstream) in [
        ("0.0.0.0:0".to_owned(), echo.to_string()),
        ("127.0.0.1:0".to_owned(), "10.1.2.3:80".to_owned()),
    ] {
        let (status, body) = call(
            api,
            "POST",
            "/proxies",
            Some(json!({"name": "p", "listen": listen, "upstream": upstream})),
        )
        .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (403, Some("remote")),
            "{body}"
        );
    }
    let (status, list) = call(api, "GET", "/proxies", None).await;
    assert_eq!((status, list), (200, json!({})), "nothing was created");
    for host in ["evil.example", "evil.example:8474", "x"] {
        let (status, body) = call_as(api, host, "GET", "/proxies", None).await;
        assert_eq!(
            (status, body["code"].as_str()),
            (403, Some("host")),
            "{host}"
        );
    }
    for host in ["localhost:8474", "127.0.0.1", "[::1]:8474"] {
        assert_eq!(
            call_as(api, host, "GET", "/proxies", None).await.0,
            200,
            "{host}"
        );
    }
    // Allowed explicitly, a proxy may listen on every address.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let open = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, router(Proxies::allowing_remote()))
            .await
            .unwrap()
    });
    let (status, body) = call(
        open,
        "POST",
        "/proxies",
        Some(json!({"name": "p", "listen": "0.0.0.0:0", "upstream": echo.to_string()})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
}

/// Frame toxics and their record over HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_proxy_and_tamperings_over_http() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let api = api().await;
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = server.local_addr().unwrap();
    let (status, view) = call(
        api,
        "POST",
        "/proxies",
        Some(
            json!({"name": "ws", "listen": "127.0.0.1:0", "upstream": upstream.to_string(),
            "seed": 5, "protocol": "websocket"}),
        ),
    )
    .await;
    assert_eq!(
        (status, &view["protocol"]),
        (201, &json!("websocket")),
        "{view}"
    );
    let listen: SocketAddr = view["listen"].as_str().unwrap().parse().unwrap();

    let drop = json!({"name": "drop", "type": "ws_drop", "stream": "downstream",
        "attributes": {"match": {"type": "deliver"}, "every": 1, "limit": 2}});
    let (status, added) = call(api, "POST", "/proxies/ws/toxics", Some(drop)).await;
    assert_eq!(status, 201, "{added}");
    assert_eq!(added["attributes"]["limit"], 2);

    // A WebSocket server sending four messages, through the proxy.
    tokio::spawn(async move {
        let (tcp, _) = server.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        for k in 0..4 {
            let m = json!({"type": "deliver", "channel": "c", "offset": k, "id": format!("m-{k}")});
            ws.send(Message::text(m.to_string())).await.unwrap();
        }
        ws.close(None).await.unwrap();
        while let Some(Ok(_)) = ws.next().await {}
    });
    let (mut client, _) = tokio_tungstenite::connect_async(format!("ws://{listen}/"))
        .await
        .unwrap();
    let mut offsets = Vec::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(5), client.next()).await {
        if let Message::Text(t) = m {
            offsets.push(serde_json::from_str::<Value>(t.as_str()).unwrap()["offset"].clone());
        }
    }
    assert_eq!(offsets, [json!(2), json!(3)]);

    let (status, record) = call(api, "GET", "/proxies/ws/tamperings", None).await;
    assert_eq!(status, 200);
    assert_eq!(record["dropped"], 0);
    let first = &record["tamperings"][0];
    assert_eq!(
        (
            &first["seq"],
            &first["toxic"],
            &first["action"],
            &first["effective"],
            &first["connection"],
            &first["stream"],
            &first["fields"],
            &first["detail"],
        ),
        (
            &json!(0),
            &json!("drop"),
            &json!("drop"),
            &json!(true),
            &json!(0),
            &json!("downstream"),
            &json!({"type": "deliver", "channel": "c", "offset": 0, "id": "m-0"}),
            &json!("dropped"),
        )
    );
    assert!(first["at_ms"].is_u64());
    assert_eq!(record["tamperings"][1]["fields"]["offset"], 1);
    assert_eq!(record["tamperings"].as_array().unwrap().len(), 2);
    let (_, view) = call(api, "GET", "/proxies/ws", None).await;
    assert!(
        view["stats"]["frames_inspected"].as_u64().unwrap() >= 4,
        "{view}"
    );

    assert_eq!(
        call(api, "DELETE", "/proxies/ws/tamperings", None).await.0,
        204
    );
    let (_, record) = call(api, "GET", "/proxies/ws/tamperings", None).await;
    assert_eq!(record, json!({"tamperings": [], "dropped": 0}));
    assert_eq!(
        call(api, "GET", "/proxies/nope/tamperings", None).await.0,
        404
    );

    // A frame toxic on a TCP proxy is refused.
    let (status, _) = call(
        api,
        "POST",
        "/proxies",
        Some(json!({"name": "tcp", "listen": "127.0.0.1:0", "upstream": upstream.to_string()})),
    )
    .await;
    assert_eq!(status, 201);
    let (status, err) = call(
        api,
        "POST",
        "/proxies/tcp/toxics",
        Some(json!({"name": "d", "type": "ws_drop", "attributes": {}})),
    )
    .await;
    assert_eq!((status, err["code"].as_str()), (400, Some("invalid")));
    assert!(
        err["error"]
            .as_str()
            .unwrap()
            .contains(r#""protocol":"websocket""#),
        "{err}"
    );
}

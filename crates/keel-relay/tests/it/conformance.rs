//! docs/protocol.md, rule by rule: send order, crash marking, acks, offsets,
//! close codes, `ref`s, field errors, tolerant reading, nesting, metrics.

use std::time::Duration;

use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::support::*;

async fn hello(url: &str) -> (RawWs, String) {
    let mut ws = RawWs::connect(url).await;
    ws.send(json!({"type": "hello"})).await;
    let welcome = ws.next_json().await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    (ws, welcome["token"].as_str().unwrap().to_owned())
}

#[track_caller]
fn check_error(frame: &Value, code: &str, reference: Option<&str>) {
    assert_eq!(frame["type"], "error", "{frame}");
    assert_eq!(frame["code"], code, "{frame}");
    assert_eq!(frame["ref"].as_str(), reference, "{frame}");
}

async fn still_up(ws: &mut RawWs) {
    ws.send(json!({"type": "ping"})).await;
    assert_eq!(ws.next_answer().await["type"], "pong");
}

/// Publishes written in one TCP write get offsets in send order, and their
/// answers come back in send order, re-sent duplicates included.
#[tokio::test]
async fn offsets_and_answers_follow_send_order() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("data"), Opts::default()).await;
    let (mut ws, _) = hello(&relay.url()).await;
    for round in 0..4 {
        let channel = format!("order-{round}");
        // Round 0: 256 new ids. Later rounds: 256 frames where every fourth
        // re-sends an id of the previous block (a duplicate) between new ones.
        let mut sent: Vec<String> = Vec::new();
        let mut frames = Vec::new();
        for i in 0..256 {
            let id = if round > 0 && i % 4 == 3 {
                format!("{channel}-dup-{}", i / 4)
            } else {
                format!("{channel}-{i:03}")
            };
            frames.push(
                json!({"type": "publish", "channel": channel, "id": id, "payload": {"i": i}}),
            );
            sent.push(id);
        }
        if round > 0 {
            // The ids re-sent later exist first (offsets 1..=64).
            let first: Vec<Value> = (0..64)
                .map(|k| json!({"type": "publish", "channel": channel, "id": format!("{channel}-dup-{k}"), "payload": k}))
                .collect();
            ws.send_all(first).await;
            for k in 0..64 {
                let a = ws.next_answer().await;
                assert_eq!(a["offset"], k + 1, "{a}");
            }
        }
        ws.send_all(frames).await;
        let base = if round > 0 { 64 } else { 0 };
        let mut next_new = base + 1;
        for (i, id) in sent.iter().enumerate() {
            let a = ws.next_answer().await;
            assert_eq!(a["type"], "published", "{a}");
            assert_eq!(
                a["id"].as_str(),
                Some(id.as_str()),
                "round {round}: answer {i} is not for the frame sent {i}th"
            );
            let offset = a["offset"].as_u64().unwrap();
            if id.contains("-dup-") {
                let k: u64 = id.rsplit('-').next().unwrap().parse().unwrap();
                assert_eq!(offset, k + 1, "a duplicate gets its original offset");
            } else {
                assert_eq!(
                    offset, next_new,
                    "round {round}: frame {i} ({id}) got offset {offset}, expected {next_new}"
                );
                next_new += 1;
            }
        }
    }
}

/// Only a session connected at the crash becomes CRASHED; one that had
/// closed cleanly stays DETACHED and gets no notice.
#[tokio::test]
async fn only_connected_sessions_crash() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let relay = RelayProcess::start(&data, Opts::default()).await;
    let (gone, gone_token) = hello(&relay.url()).await;
    drop(gone);
    let (mut live, live_token) = hello(&relay.url()).await;
    still_up(&mut live).await;
    // The closed one is DETACHED before the kill: a resume says so.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut probe = RawWs::connect(&relay.url()).await;
        probe
            .send(json!({"type": "hello", "token": gone_token}))
            .await;
        let w = probe.next_json().await;
        drop(probe);
        if w["state"] == "DETACHED" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{w}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The probe's own close must land before the kill, too.
    tokio::time::sleep(Duration::from_millis(300)).await;
    relay.kill9().await;
    drop(live);

    let relay = RelayProcess::start(&data, Opts::default()).await;
    for (token, state) in [(&gone_token, "DETACHED"), (&live_token, "CRASHED")] {
        let mut ws = RawWs::connect(&relay.url()).await;
        ws.send(json!({"type": "hello", "token": token})).await;
        let w = ws.next_json().await;
        assert_eq!(w["state"], state, "{w}");
        let private = format!("session:{}", w["session_id"].as_str().unwrap());
        let next = w["catch_up"][&private].as_u64().unwrap();
        if state == "DETACHED" {
            assert_eq!(
                next, 1,
                "no notice for a session that was not connected: {w}"
            );
        } else {
            let d = ws.next_json().await;
            assert_eq!(d["type"], "deliver", "{d}");
            assert_eq!(d["payload"]["type"], "session_crashed");
            assert_eq!(d["payload"]["previous_state"], "ACTIVE");
        }
    }
}

/// An ack can only confirm what exists.
#[tokio::test]
async fn ack_beyond_the_head_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("data"), Opts::default()).await;
    let (mut ws, token) = hello(&relay.url()).await;
    ws.send(json!({"type": "subscribe", "channel": "feed", "from": 1}))
        .await;
    for i in 1..=3 {
        ws.send(json!({"type": "publish", "channel": "feed", "id": format!("f{i}"), "payload": i}))
            .await;
        assert_eq!(ws.next_answer().await["type"], "published");
    }
    ws.send(json!({"type": "ack", "channel": "feed", "offset": 10}))
        .await;
    check_error(&ws.next_answer().await, "bad_request", Some("feed"));
    ws.send(json!({"type": "ack", "channel": "feed", "offset": 3}))
        .await;
    still_up(&mut ws).await;
    drop(ws);
    let (mut other, _) = hello(&relay.url()).await;
    for i in 4..=5 {
        other
            .send(
                json!({"type": "publish", "channel": "feed", "id": format!("f{i}"), "payload": i}),
            )
            .await;
        assert_eq!(other.next_answer().await["type"], "published");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut again = RawWs::connect(&relay.url()).await;
    again.send(json!({"type": "hello", "token": token})).await;
    assert_eq!(again.next_json().await["type"], "welcome");
    let mut offsets = Vec::new();
    while offsets.len() < 2 {
        let f = again.next_json().await;
        if f["channel"] == "feed" {
            offsets.push(f["offset"].as_u64().unwrap());
        }
    }
    assert_eq!(
        offsets,
        [4, 5],
        "nothing published after the ack is skipped"
    );
}

/// Offsets near u64::MAX never wrap: `bad_request`, and the connection stays.
#[tokio::test]
async fn offsets_past_the_maximum_are_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("data"), Opts::default()).await;
    let max = u64::MAX;
    let mut ws = RawWs::connect(&relay.url()).await;
    ws.send_text(format!(r#"{{"type":"hello","resume":{{"room":{max}}}}}"#))
        .await;
    check_error(&ws.next_json().await, "bad_request", Some("room"));
    ws.send(json!({"type": "hello"})).await;
    assert_eq!(ws.next_json().await["type"], "welcome");
    for text in [
        format!(r#"{{"type":"subscribe","channel":"room","from":{max}}}"#),
        r#"{"type":"subscribe","channel":"room","from":9223372036854775808}"#.to_owned(),
        format!(r#"{{"type":"ack","channel":"room","offset":{max}}}"#),
    ] {
        ws.send_text(text.clone()).await;
        check_error(&ws.next_answer().await, "bad_request", Some("room"));
    }
    // The largest valid offset is accepted (and delivers nothing).
    ws.send(json!({"type": "subscribe", "channel": "room", "from": i64::MAX}))
        .await;
    still_up(&mut ws).await;
}

/// Invalid UTF-8 closes with 1007; a message over four times the frame
/// limit, whole or in fragments, with 1009.
#[tokio::test]
async fn close_codes_for_bad_text_and_huge_messages() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(
        &dir.path().join("data"),
        Opts {
            config: Some("[limits]\nmax_frame_bytes = 1000\nmax_payload_bytes = 900\n".into()),
            ..Default::default()
        },
    )
    .await;
    let text = |bytes: Vec<u8>, fin: bool| Frame::message(bytes, OpCode::Data(Data::Text), fin);

    let mut ws = RawWs::connect(&relay.url()).await;
    ws.send_frame(text(b"{\"type\":\"ping\"\xff}".to_vec(), true))
        .await;
    assert_eq!(ws.close_code().await, Some(1007));

    // Over the frame limit but under four times it: an error frame.
    let (mut ws, _) = hello(&relay.url()).await;
    ws.send_text(format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(2000)))
        .await;
    check_error(&ws.next_json().await, "too_large", None);
    // Whole, over four times it.
    ws.send_frame(text(vec![b' '; 5000], true)).await;
    assert_eq!(ws.close_code().await, Some(1009));

    // Fragmented: each fragment small, the message over four times it.
    let mut ws = RawWs::connect(&relay.url()).await;
    ws.send_frame(text(vec![b' '; 1500], false)).await;
    for _ in 0..3 {
        ws.send_frame(Frame::message(
            vec![b' '; 1500],
            OpCode::Data(Data::Continue),
            false,
        ))
        .await;
    }
    assert_eq!(ws.close_code().await, Some(1009));
}

/// `ref` names the frame's id, else its channel: before hello too, and for
/// a subscribe whose `from` is not an offset.
#[tokio::test]
async fn errors_carry_ref_wherever_the_doc_promises() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("data"), Opts::default()).await;
    let mut ws = RawWs::connect(&relay.url()).await;
    ws.send(json!({"type": "publish", "channel": "c", "id": "early-1", "payload": 1}))
        .await;
    check_error(&ws.next_json().await, "invalid_state", Some("early-1"));
    ws.send(json!({"type": "subscribe", "channel": "early-room"}))
        .await;
    check_error(&ws.next_json().await, "invalid_state", Some("early-room"));
    ws.send(json!({"type": "send", "id": "early-send", "to": "x", "body": 1}))
        .await;
    check_error(&ws.next_json().await, "invalid_state", Some("early-send"));
    ws.send(json!({"type": "hello"})).await;
    assert_eq!(ws.next_json().await["type"], "welcome");
    for from in [
        json!(-1),
        json!(1.5),
        json!("1"),
        json!(18446744073709551615u64),
    ] {
        ws.send(json!({"type": "subscribe", "channel": "room", "from": from}))
            .await;
        check_error(&ws.next_answer().await, "bad_request", Some("room"));
    }
    ws.send_text(r#"{"type":"subscribe","channel":"room","from":18446744073709551616}"#.into())
        .await;
    check_error(&ws.next_answer().await, "bad_request", Some("room"));
    still_up(&mut ws).await;
}

/// `bad_json` only for text that is not a JSON object; a wrong, missing or
/// repeated field is `bad_request`, whatever the field; unknown fields are
/// ignored.
#[tokio::test]
async fn one_rule_for_field_errors_and_unknown_fields_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("data"), Opts::default()).await;
    let (mut ws, _) = hello(&relay.url()).await;
    for (text, code) in [
        ("not json", "bad_json"),
        ("[1,2]", "bad_json"),
        ("\"hello\"", "bad_json"),
        (r#"{"type":5}"#, "bad_request"),
        (r#"{"type":null}"#, "bad_request"),
        (
            r#"{"type":"publish","channel":"c","id":7,"payload":1}"#,
            "bad_request",
        ),
        (
            r#"{"type":"publish","channel":"c","id":{"a":1},"payload":1}"#,
            "bad_request",
        ),
        (
            r#"{"type":"publish","channel":"c","id":[1],"payload":1}"#,
            "bad_request",
        ),
        (
            r#"{"type":"publish","channel":5,"id":"x","payload":1}"#,
            "bad_request",
        ),
        (r#"{"type":"ping","type":"ping"}"#, "bad_request"),
        (
            r#"{"type":"publish","channel":"c","id":"a","id":"b","payload":1}"#,
            "bad_request",
        ),
        (r#"{"type":"teleport"}"#, "unknown_type"),
    ] {
        ws.send_text(text.to_owned()).await;
        let e = ws.next_answer().await;
        assert_eq!(
            (e["type"].as_str(), e["code"].as_str()),
            (Some("error"), Some(code)),
            "{text} -> {e}"
        );
    }
    ws.send(json!({"type": "ping", "extra": 1, "more": {"nested": [1, 2]}}))
        .await;
    assert_eq!(ws.next_answer().await["type"], "pong");
    ws.send(json!({"type": "publish", "channel": "c", "id": "x-1", "payload": 1, "trace": "abc"}))
        .await;
    let a = ws.next_answer().await;
    assert_eq!(
        (a["type"].as_str(), a["offset"].as_u64()),
        (Some("published"), Some(1)),
        "{a}"
    );
}

/// A payload nested past the limit is refused; one at the limit passes and
/// can be read by serde_json's default parser.
#[tokio::test]
async fn payload_nesting_depth_is_limited() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("data"), Opts::default()).await;
    let (mut ws, _) = hello(&relay.url()).await;
    let nested = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
    ws.send_text(format!(
        r#"{{"type":"publish","channel":"deep","id":"d-1","payload":{}}}"#,
        nested(100_000)
    ))
    .await;
    check_error(&ws.next_answer().await, "bad_request", Some("d-1"));
    ws.send_text(format!(
        r#"{{"type":"send","id":"s-1","to":"bob","body":{}}}"#,
        nested(65)
    ))
    .await;
    check_error(&ws.next_answer().await, "bad_request", Some("s-1"));
    ws.send_text(format!(
        r#"{{"type":"publish","channel":"deep","id":"d-2","payload":{}}}"#,
        nested(64)
    ))
    .await;
    assert_eq!(ws.next_answer().await["type"], "published");
    ws.send(json!({"type": "subscribe", "channel": "deep", "from": 1}))
        .await;
    let d = ws.next_json().await;
    assert_eq!(
        (d["type"].as_str(), d["id"].as_str()),
        (Some("deliver"), Some("d-2")),
        "{d}"
    );
}

/// A resume naming another session's private channel gets `forbidden`
/// (ref = channel) after the welcome; the rest of the hello stands.
#[tokio::test]
async fn resume_of_a_foreign_private_channel_is_forbidden() {
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("data"), Opts::default()).await;
    let mut other = RawWs::connect(&relay.url()).await;
    other.send(json!({"type": "hello"})).await;
    let foreign = format!(
        "session:{}",
        other.next_json().await["session_id"].as_str().unwrap()
    );
    let publisher = client(&relay.url()).await;
    publisher
        .publish("news", "n-1", &json!("hi"))
        .await
        .unwrap();

    let mut ws = RawWs::connect(&relay.url()).await;
    ws.send(json!({"type": "hello", "resume": {foreign.clone(): 0, "news": 0, "bad name!": 0}}))
        .await;
    let w = ws.next_json().await;
    assert_eq!(w["type"], "welcome", "{w}");
    assert!(w["catch_up"].get(&foreign).is_none(), "{w}");
    let mut errors = Vec::new();
    let mut delivered = Vec::new();
    while errors.len() < 2 || delivered.is_empty() {
        let f = ws.next_json().await;
        match f["type"].as_str() {
            Some("error") => errors.push((f["code"].clone(), f["ref"].clone())),
            Some("deliver") => delivered.push(f["channel"].clone()),
            _ => panic!("{f}"),
        }
    }
    errors.sort_by_key(|e| e.1.to_string());
    assert_eq!(
        errors,
        [
            (json!("bad_request"), json!("bad name!")),
            (json!("forbidden"), json!(foreign)),
        ]
    );
    assert_eq!(delivered, [json!("news")], "the rest of the hello stands");
}

/// `(name, type)` of every metric in docs/protocol.md's metrics table.
fn documented_metrics() -> std::collections::BTreeMap<String, String> {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/protocol.md"
    ))
    .unwrap();
    let table = doc
        .split("| metric | type | labels | meaning |")
        .nth(1)
        .expect("docs/protocol.md has the metrics table");
    table
        .lines()
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|row| {
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            (cells[1].trim_matches('`').to_owned(), cells[2].to_owned())
        })
        .collect()
}

/// `(name, type)` of every metric a `/metrics` text declares, and the
/// names that come without a HELP line.
fn served_metrics(text: &str) -> (std::collections::BTreeMap<String, String>, Vec<String>) {
    let mut types = std::collections::BTreeMap::new();
    let mut helped = std::collections::BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split(' ');
        match (words.next(), words.next(), words.next(), words.next()) {
            (Some("#"), Some("TYPE"), Some(name), Some(kind)) => {
                types.insert(name.to_owned(), kind.to_owned());
            }
            (Some("#"), Some("HELP"), Some(name), Some(help)) if !help.is_empty() => {
                helped.insert(name.to_owned());
            }
            _ => {}
        }
    }
    let unhelped = types
        .keys()
        .filter(|n| !helped.contains(*n))
        .cloned()
        .collect();
    (types, unhelped)
}

/// docs/protocol.md's metrics table and a fresh relay's `/metrics` name
/// the same metrics with the same types, both ways; every metric served
/// has its HELP and TYPE lines and at least one series from the start.
#[tokio::test]
async fn the_metrics_table_is_what_metrics_serves() {
    let documented = documented_metrics();
    assert!(documented.len() >= 40, "{documented:?}");
    let dir = tempfile::tempdir().unwrap();
    let relay = RelayProcess::start(&dir.path().join("data"), Opts::default()).await;
    let text = http_get(&format!("http://{}/metrics", relay.addr)).await;
    let (served, unhelped) = served_metrics(&text);
    assert!(unhelped.is_empty(), "no HELP line: {unhelped:?}");
    let only_docs: Vec<_> = documented
        .iter()
        .filter(|(n, t)| served.get(*n) != Some(t))
        .collect();
    let only_served: Vec<_> = served
        .iter()
        .filter(|(n, t)| documented.get(*n) != Some(t))
        .collect();
    assert!(
        only_docs.is_empty() && only_served.is_empty(),
        "documented but not served (or another type): {only_docs:?}\n\
         served but not documented (or another type): {only_served:?}"
    );
    for name in served.keys() {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))),
            "{name} has no series on a fresh relay"
        );
    }
    for code in ["bad_json", "unavailable", "rate_limited"] {
        assert!(
            text.contains(&format!("keel_errors_total{{code=\"{code}\"}} 0")),
            "{code}"
        );
    }
    relay.terminate().await;

    // The planted check: a metric served but missing from the table, and a
    // type changed, are both caught by the comparison above.
    let mut doc_less = documented.clone();
    doc_less.remove("keel_published_total");
    doc_less.insert("keel_connections".into(), "counter".into());
    let caught = served
        .iter()
        .filter(|(n, t)| doc_less.get(*n) != Some(t))
        .count();
    assert_eq!(caught, 2);
}

/// Every expression of the Grafana dashboard names only metrics the relay
/// exports (a summary's `_sum` and `_count` included), and names one.
#[test]
fn the_grafana_dashboard_uses_exported_names() {
    let documented = documented_metrics();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../contrib/grafana/keel-relay.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let exported = |name: &str| {
        documented.contains_key(name)
            || ["_sum", "_count"].iter().any(|s| {
                name.strip_suffix(s)
                    .is_some_and(|base| documented.get(base).is_some_and(|t| t == "summary"))
            })
    };
    let mut exprs = Vec::new();
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    if k == "expr" || (k == "query" && v.as_str().is_some_and(|q| q.contains('(')))
                    {
                        out.push(v.as_str().unwrap().to_owned());
                    } else {
                        walk(v, out);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    walk(&dashboard, &mut exprs);
    assert!(exprs.len() >= 10, "{exprs:?}");
    for expr in &exprs {
        let names: Vec<&str> = expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("keel_") || w.starts_with("process_"))
            .collect();
        assert!(!names.is_empty(), "names no metric: {expr}");
        for name in names {
            assert!(exported(name), "{name} is not exported: {expr}");
        }
    }
    assert!(
        !exported("keel_published"),
        "the planted check: a wrong name"
    );
}

//! End-to-end: `chatsim serve` on an ephemeral loopback port, driven by real WebSocket
//! clients, as a third-party client would use it.

mod common;

use common::{ct, Client, ServerProc};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn two_users_chat_and_receipts_flow_back() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = ServerProc::start(dir.path(), &[]);
    let (mut alice, _) = Client::login(&srv, "alice", "phone").await;
    let (mut bob, _) = Client::login(&srv, "bob", "phone").await;

    alice.say("bob", "c1", &ct("hi bob")).await;
    let ack = alice.recv_type("message_ack").await;
    assert_eq!(ack["client_message_id"], "c1");
    assert_eq!(ack["payload"]["seq"], 1);
    assert_eq!(ack["payload"]["conversation_id"], "dm:alice:bob");
    let id = ack["payload"]["message_id"].clone();

    let got = bob.recv_type("message").await;
    assert_eq!(got["payload"]["sender_id"], "alice");
    assert_eq!(got["payload"]["content"], ct("hi bob"));
    assert_eq!(got["payload"]["message_id"], id);

    bob.send(json!({"type":"delivery_ack","message_id":id}))
        .await;
    let d = alice.recv_type("delivery_ack").await;
    assert_eq!(d["payload"]["status"], "delivered");
    bob.send(json!({"type":"read_receipt","message_ids":[id]}))
        .await;
    let r = alice.recv_type("read_receipt").await;
    assert_eq!(r["payload"]["status"], "read");
    assert_eq!(r["payload"]["by"], "bob");

    bob.say("alice", "b1", &ct("hey")).await;
    assert_eq!(
        bob.recv_type("message_ack").await["payload"]["seq"],
        2,
        "same conversation, next seq"
    );
    srv.stop();
}

#[tokio::test]
async fn retry_with_same_client_message_id_is_deduplicated() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = ServerProc::start(dir.path(), &[]);
    let (mut alice, _) = Client::login(&srv, "alice", "phone").await;
    alice.say("bob", "elevator-1", &ct("on my way")).await;
    let ack = alice.recv_type("message_ack").await;
    alice.say("bob", "elevator-1", &ct("on my way")).await;
    let dup = alice.recv_type("error").await;
    assert_eq!(dup["payload"]["code"], 409);
    assert_eq!(dup["payload"]["message_id"], ack["payload"]["message_id"]);
    assert_eq!(dup["payload"]["seq"], ack["payload"]["seq"]);
    let (mut bob, hello) = Client::login(&srv, "bob", "phone").await;
    assert_eq!(
        hello["payload"]["unread_count"], 1,
        "one copy stored, not two"
    );
    bob.send(json!({"type":"sync","payload":{"conversation_id":"dm:alice:bob","after_seq":0}}))
        .await;
    let page = bob.recv_type("sync_page").await;
    assert_eq!(
        page["payload"]["messages"]
            .as_array()
            .expect("messages")
            .len(),
        1
    );
    srv.stop();
}

#[tokio::test]
async fn offline_user_syncs_backlog_in_order_after_reconnect() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = ServerProc::start(dir.path(), &[]);
    let (mut bob, _) = Client::login(&srv, "bob", "phone").await;
    drop(bob); // bob goes offline (registered device, nothing pending)
    let (mut alice, _) = Client::login(&srv, "alice", "phone").await;
    for i in 0..30 {
        alice
            .say("bob", &format!("m{i}"), &ct(&format!("msg {i}")))
            .await;
        alice.recv_type("message_ack").await;
    }
    let (b, hello) = Client::login(&srv, "bob", "phone").await;
    bob = b;
    assert_eq!(hello["payload"]["unread_count"], 30);
    let mut seqs = Vec::new();
    let mut cursor = serde_json::Value::Null;
    for _ in 0..10 {
        bob.send(json!({"type":"sync","payload":{"cursor":cursor,"limit":7}}))
            .await;
        let page = bob.recv_type("sync_page").await;
        for m in page["payload"]["messages"].as_array().expect("messages") {
            seqs.push(m["seq"].as_u64().expect("seq"));
            bob.send(json!({"type":"delivery_ack","message_id":m["message_id"]}))
                .await;
        }
        if page["payload"]["has_more"] == false {
            break;
        }
        cursor = page["payload"]["next_cursor"].clone();
    }
    assert_eq!(
        seqs,
        (1..=30).collect::<Vec<u64>>(),
        "every message, in seq order"
    );
    srv.stop();
}

#[tokio::test]
async fn group_of_256_members_fans_out_to_every_member() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = ServerProc::start(dir.path(), &[]);
    let mut members = Vec::new();
    for i in 0..256 {
        members.push(Client::login(&srv, &format!("u{i}"), "phone").await.0);
    }
    let names: Vec<String> = (1..256).map(|i| format!("u{i}")).collect();
    members[0]
        .send(json!({"type":"group_create","payload":{"name":"stadium","members":names}}))
        .await;
    let created = members[0].recv_type("group_created").await;
    let gid = created["payload"]["group_id"]
        .as_str()
        .expect("gid")
        .to_string();
    assert_eq!(
        created["payload"]["members"].as_array().expect("m").len(),
        256
    );
    members[0]
        .send(json!({"type":"group_message","client_message_id":"g1",
        "payload":{"group_id":gid,"content":ct("kickoff")}}))
        .await;
    assert_eq!(
        members[0].recv_type("message_ack").await["payload"]["seq"],
        1
    );
    for (i, m) in members.iter_mut().enumerate().skip(1) {
        let f = m.recv_type("group_message").await;
        assert_eq!(f["payload"]["content"], ct("kickoff"), "member {i}");
        assert_eq!(f["payload"]["sender_id"], "u0");
    }
    // A 257th member is refused: the cap holds.
    members[0]
        .send(json!({"type":"group_add","payload":{"group_id":gid,"user_ids":["late"]}}))
        .await;
    assert_eq!(members[0].recv_type("error").await["payload"]["code"], 413);
    srv.stop();
}

#[tokio::test]
async fn bad_and_oversized_frames_get_error_frames_not_a_crash() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = ServerProc::start(dir.path(), &[]);
    let (mut c, _) = Client::login(&srv, "alice", "phone").await;
    for bad in [
        "{not json",
        r#"{"type":"teleport"}"#,
        r#"{"type":"message","client_message_id":5,"payload":{}}"#,
        r#"{"type":"delivery_ack","message_id":"dm:x:y#abc"}"#,
        "[]",
    ] {
        c.send_raw(Message::text(bad)).await;
        let e = c.recv_type("error").await;
        assert_eq!(e["payload"]["code"], 400, "{bad} -> {e}");
    }
    c.send_raw(Message::binary(vec![1, 2, 3])).await;
    assert_eq!(c.recv_type("error").await["payload"]["code"], 400);
    c.send_raw(Message::text("x".repeat(100 * 1024))).await;
    assert_eq!(c.recv_type("error").await["payload"]["code"], 413);
    c.say("bob", "big", &"A".repeat(20 * 1024)).await;
    let e = c.recv_type("error").await;
    assert_eq!(e["payload"]["code"], 413);
    assert_eq!(e["payload"]["client_message_id"], "big");
    // Still serving after all that.
    c.send(json!({"type":"heartbeat"})).await;
    c.recv_type("heartbeat_ack").await;
    // Past the transport limit the socket is closed with 1009 (message too big).
    c.send_raw(Message::text("y".repeat(2 * 1024 * 1024))).await;
    assert_eq!(c.closed().await, Some(1009));
    let (mut again, _) = Client::login(&srv, "alice", "phone").await;
    again.send(json!({"type":"heartbeat"})).await;
    again.recv_type("heartbeat_ack").await;
    srv.stop();
}

#[tokio::test]
async fn wrong_token_and_frames_before_auth_are_refused() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = ServerProc::start(dir.path(), &[]);
    let mut c = Client::connect(&srv.addr).await;
    let bobs = srv.token("bob", "phone");
    c.send(json!({"type":"auth","payload":{"user_id":"mallory","auth_token":bobs,"device_id":"phone"}})).await;
    assert_eq!(c.recv_type("error").await["payload"]["code"], 401);
    assert_eq!(c.closed().await, Some(1008));

    let mut c = Client::connect(&srv.addr).await;
    c.say("bob", "x", &ct("sneaky")).await;
    assert_eq!(c.recv_type("error").await["payload"]["code"], 401);
    assert_eq!(c.closed().await, Some(1008));

    // Nobody reads another user's conversation.
    let (mut alice, _) = Client::login(&srv, "alice", "phone").await;
    alice.say("bob", "a1", &ct("private")).await;
    alice.recv_type("message_ack").await;
    let (mut eve, _) = Client::login(&srv, "eve", "phone").await;
    eve.send(json!({"type":"sync","payload":{"conversation_id":"dm:alice:bob"}}))
        .await;
    assert_eq!(eve.recv_type("error").await["payload"]["code"], 403);
    srv.stop();
}

#[tokio::test]
async fn restart_with_durable_store_loses_nothing_acked() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = ServerProc::start(dir.path(), &[]);
    let (bob, _) = Client::login(&srv, "bob", "phone").await;
    drop(bob);
    let (mut alice, _) = Client::login(&srv, "alice", "phone").await;
    let mut acked = Vec::new();
    for i in 0..20 {
        alice
            .say("bob", &format!("r{i}"), &ct(&format!("before crash {i}")))
            .await;
        acked.push(
            alice.recv_type("message_ack").await["payload"]["seq"]
                .as_u64()
                .expect("seq"),
        );
    }
    // Hard kill, no graceful shutdown: only what was committed before each ack survives.
    drop(srv);
    let srv = ServerProc::start(dir.path(), &[]);
    let (mut bob, hello) = Client::login(&srv, "bob", "phone").await;
    assert_eq!(hello["payload"]["unread_count"], 20);
    bob.send(json!({"type":"sync","payload":{"conversation_id":"dm:alice:bob","limit":100}}))
        .await;
    let page = bob.recv_type("sync_page").await;
    let seqs: Vec<u64> = page["payload"]["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, acked);
    // A retry after the restart is still recognised.
    let (mut alice, _) = Client::login(&srv, "alice", "phone").await;
    alice.say("bob", "r3", &ct("before crash 3")).await;
    let e = alice.recv_type("error").await;
    assert_eq!(e["payload"]["code"], 409);
    assert_eq!(e["payload"]["seq"], 4);
    srv.stop();
}

#[tokio::test]
async fn a_kill_mid_burst_loses_nothing_acked_under_group_commit() {
    // `serve`'s default store groups commits: acks wait for the fsync that covers them.
    // Kill the process (SIGKILL) while a burst is half acked: every acked message must
    // be there after the restart, each once, and the unacked ones may be missing.
    let dir = tempfile::tempdir().expect("tmp");
    let srv = ServerProc::start(dir.path(), &[]);
    let (bob, _) = Client::login(&srv, "bob", "phone").await;
    drop(bob);
    let (mut alice, _) = Client::login(&srv, "alice", "phone").await;
    for i in 0..90 {
        alice
            .say("bob", &format!("b{i}"), &ct(&format!("burst {i}")))
            .await;
    }
    let mut acked = std::collections::BTreeSet::new();
    while acked.len() < 30 {
        let ack = alice.recv_type("message_ack").await;
        acked.insert(ack["payload"]["seq"].as_u64().expect("seq"));
    }
    drop(srv); // SIGKILL mid-burst
    let srv = ServerProc::start(dir.path(), &[]);
    let (mut bob, _) = Client::login(&srv, "bob", "phone").await;
    bob.send(json!({"type":"sync","payload":{"conversation_id":"dm:alice:bob","limit":200}}))
        .await;
    let page = bob.recv_type("sync_page").await;
    let kept: Vec<u64> = page["payload"]["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect();
    let distinct: std::collections::BTreeSet<u64> = kept.iter().copied().collect();
    assert_eq!(distinct.len(), kept.len(), "no seq twice: {kept:?}");
    for seq in &acked {
        assert!(
            distinct.contains(seq),
            "acked seq {seq} lost in the kill (kept {kept:?})"
        );
    }
    // What survived is a prefix of the conversation: seqs 1..=n, no gaps.
    assert_eq!(kept, (1..=kept.len() as u64).collect::<Vec<_>>());
    srv.stop();
}

#[tokio::test]
async fn health_metrics_and_graceful_shutdown() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = ServerProc::start(dir.path(), &["--memory"]);
    let (mut alice, _) = Client::login(&srv, "alice", "phone").await;
    alice.say("bob", "m1", &ct("x")).await;
    alice.recv_type("message_ack").await;
    let health = http(&srv.addr, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let metrics = http(&srv.addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(metrics.contains("chatsim_connections 1"), "{metrics}");
    assert!(metrics.contains("chatsim_messages_in_total 1"), "{metrics}");
    assert!(metrics.contains("chatsim_inbox_entries 1"), "{metrics}");
    // Traffic per storage partition: the one message in exactly one of them.
    let per_partition: Vec<u64> = metrics
        .lines()
        .filter(|l| l.starts_with("chatsim_partition_messages_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert_eq!(per_partition.len(), 16, "{metrics}");
    assert_eq!(per_partition.iter().sum::<u64>(), 1, "{metrics}");
    assert!(
        metrics.contains("chatsim_hottest_conversation_messages 0"),
        "no minute has passed yet: {metrics}"
    );
    assert!(!metrics.contains(&ct("x")), "metrics never carry content");
    let pid = srv.child.id();
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    assert_eq!(
        alice.closed().await,
        Some(1012),
        "clients are told the service restarts"
    );
    srv.stop();
}

#[tokio::test]
async fn media_lane_uploads_resume_and_download_only_for_members() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = ServerProc::start(dir.path(), &["--memory"]);
    let alice = srv.token("alice", "phone");
    let body = r#"{"conversation_id":"dm:alice:bob","file_type":"video/mp4","file_size":10}"#;
    let resp = http(&srv.addr, &format!(
        "POST /v1/media:prepare HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nContent-Length: {}\r\n\r\n{body}", body.len())).await;
    assert!(resp.starts_with("HTTP/1.1 201"), "{resp}");
    let v: serde_json::Value =
        serde_json::from_str(resp.split("\r\n\r\n").nth(1).expect("body")).expect("json");
    let url = v["upload_url"].as_str().expect("url").to_string();
    let media_id = v["media_id"].as_str().expect("id").to_string();
    let put = |range: &str, data: &str| {
        format!(
        "PUT {url} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nContent-Range: bytes {range}/10\r\nContent-Length: {}\r\n\r\n{data}", data.len())
    };
    assert!(http(&srv.addr, &put("0-3", "0123"))
        .await
        .starts_with("HTTP/1.1 200"));
    // The connection broke; the client resends from byte 0: told to resume at 4.
    let again = http(&srv.addr, &put("0-3", "0123")).await;
    assert!(
        again.starts_with("HTTP/1.1 409") && again.contains("byte 4"),
        "{again}"
    );
    assert!(http(&srv.addr, &put("4-9", "456789"))
        .await
        .contains(r#""complete":true"#));
    let bob = srv.token("bob", "phone");
    let got = http(
        &srv.addr,
        &format!("GET {url} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {bob}\r\n\r\n"),
    )
    .await;
    assert!(
        got.starts_with("HTTP/1.1 200") && got.ends_with("0123456789"),
        "{got}"
    );
    let eve = srv.token("eve", "phone");
    let denied = http(
        &srv.addr,
        &format!("GET {url} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {eve}\r\n\r\n"),
    )
    .await;
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
    // The message carries only the pointer.
    let (mut a, _) = Client::login(&srv, "alice", "phone").await;
    let (mut b, _) = Client::login(&srv, "bob", "phone").await;
    a.send(json!({"type":"message","client_message_id":"vid","payload":{"receiver_id":"bob","content":ct("key+caption"),"media_id":media_id}})).await;
    a.recv_type("message_ack").await;
    assert_eq!(
        b.recv_type("message").await["payload"]["media_id"],
        media_id
    );
    // Bob's laptop is unlinked: its unexpired token no longer downloads anything.
    let (_laptop, _) = Client::login(&srv, "bob", "laptop").await;
    let laptop = srv.token("bob", "laptop");
    let get_as =
        |tok: &str| format!("GET {url} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n\r\n");
    assert!(http(&srv.addr, &get_as(&laptop))
        .await
        .starts_with("HTTP/1.1 200"));
    b.send(json!({"type":"device_unlink","payload":{"device_id":"laptop"}}))
        .await;
    b.recv_type("device_unlinked").await;
    let refused = http(&srv.addr, &get_as(&laptop)).await;
    assert!(
        refused.starts_with("HTTP/1.1 401") && refused.contains("device unlinked"),
        "{refused}"
    );
    srv.stop();
}

/// One raw HTTP/1.1 exchange on loopback; returns the whole response as text.
async fn http(addr: &str, req: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(common::WAIT, s.read_to_end(&mut out))
        .await
        .expect("response")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_clients_close_frame_is_echoed_as_rfc_6455_asks() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    let dir = tempfile::tempdir().expect("tmp");
    let srv = ServerProc::start(dir.path(), &["--memory"]);
    let (mut alice, _) = Client::login(&srv, "alice", "phone").await;
    alice
        .send_raw(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        })))
        .await;
    assert_eq!(alice.closed().await, Some(1000), "the close comes back");
    srv.stop();
}

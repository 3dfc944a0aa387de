//! The tiered server over real sockets, as separate processes on loopback: a message
//! between devices on different gateway processes (`chatsim cluster`); a gateway process
//! killed mid-run loses nothing acked and its users reconnect through another; a chat
//! service process killed and restarted from its data dir loses nothing acked, and its
//! gateway links again by itself.

mod common;

use common::{ct, Client, WAIT};
use model_server::auth::{mint, Secret};
use model_server::ids::Millis;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process whose stdout banner has been read up to `until`.
struct Proc {
    child: Child,
    lines: Vec<String>,
}

impl Proc {
    fn start(args: &[&str], until: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chatsim"))
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn chatsim");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        let mut lines = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(l) => {
                    let done = l.contains(until);
                    lines.push(l);
                    if done {
                        return Proc { child, lines };
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                Err(_) => break,
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("{args:?} did not print {until:?}: {lines:?}");
    }

    /// The text after `prefix` on the first banner line holding it.
    fn after(&self, prefix: &str) -> String {
        self.lines
            .iter()
            .find_map(|l| l.split_once(prefix).map(|(_, r)| r.to_string()))
            .unwrap_or_else(|| panic!("no {prefix:?} in {:?}", self.lines))
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn token(secret_file: &Path, user: &str, device: &str) -> String {
    let raw = std::fs::read_to_string(secret_file).expect("secret file");
    let secret = Secret::new(raw.trim().as_bytes().to_vec()).expect("secret");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    mint(
        &secret,
        &user.into(),
        &device.into(),
        Millis(now + 3_600_000),
    )
}

/// Logs in on the gateway at `addr`, retrying (bounded) while it answers 503 (no link yet).
async fn login(addr: &str, secret: &Path, user: &str, device: &str) -> (Client, Value) {
    let deadline = Instant::now() + WAIT;
    loop {
        let url = format!("ws://{addr}/ws");
        match tokio_tungstenite::connect_async_with_config(url, None, true).await {
            Ok((ws, _)) => {
                let mut c = Client { ws };
                let tok = token(secret, user, device);
                c.send(json!({"type":"auth","payload":{"user_id":user,"auth_token":tok,"device_id":device}}))
                    .await;
                let ok = c.recv().await;
                assert_eq!(ok["type"], "auth_success", "{ok}");
                return (c, ok);
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("could not connect to {addr}: {e}"),
        }
    }
}

/// A `chatsim cluster` with `gateways` gateway processes on free ports.
struct Cluster {
    proc: Proc,
    secret: PathBuf,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn start(gateways: u16) -> Self {
        let dir = tempfile::tempdir().expect("tmp");
        let data = dir.path().join("data");
        let g = gateways.to_string();
        let data_s = data.to_str().expect("utf-8 path");
        let proc = Proc::start(
            &[
                "cluster",
                "--gateways",
                &g,
                "--base-port",
                "0",
                "--data-dir",
                data_s,
            ],
            "tokens:",
        );
        Cluster {
            proc,
            secret: data.join("secret"),
            _dir: dir,
        }
    }

    /// `(pid, host:port)` of node `name` from the cluster's banner.
    fn node(&self, name: &str) -> (u32, String) {
        let line = self
            .proc
            .lines
            .iter()
            .find(|l| l.trim_start().starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no node {name} in {:?}", self.proc.lines));
        let mut words = line.split_whitespace();
        let pid = words
            .find(|w| *w == "pid")
            .and_then(|_| words.next())
            .and_then(|p| p.parse().ok())
            .expect("pid");
        let ws = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("ws://"))
            .and_then(|w| w.strip_suffix("/ws"))
            .expect("ws address");
        (pid, ws.to_string())
    }
}

fn seqs(page: &Value) -> Vec<u64> {
    page["payload"]["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect()
}

#[tokio::test]
async fn a_message_crosses_two_gateway_processes_and_its_receipt_comes_back() {
    let cl = Cluster::start(2);
    let (_, gw1) = cl.node("gw-1");
    let (_, gw2) = cl.node("gw-2");
    let (mut alice, _) = login(&gw1, &cl.secret, "alice", "phone").await;
    let (mut bob, _) = login(&gw2, &cl.secret, "bob", "phone").await;
    alice.say("bob", "c1", &ct("hello across gateways")).await;
    let ack = alice.recv_type("message_ack").await;
    assert_eq!(ack["payload"]["seq"], 1, "{ack}");
    let m = bob.recv_type("message").await;
    assert_eq!(m["payload"]["sender_id"], "alice", "{m}");
    assert_eq!(m["payload"]["content"], ct("hello across gateways"));
    let id = m["payload"]["message_id"].clone();
    bob.send(json!({"type":"delivery_ack","message_id":id}))
        .await;
    let r = alice.recv_type("delivery_ack").await;
    assert_eq!(r["payload"]["status"], "delivered", "{r}");
    assert_eq!(r["payload"]["by"], "bob", "{r}");
    // A gateway node echoes a client's close frame too (RFC 6455).
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::Message;
    bob.send_raw(Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    })))
    .await;
    assert_eq!(bob.closed().await, Some(1000));
}

#[tokio::test]
async fn a_killed_gateway_process_loses_nothing_acked_and_its_users_reconnect_through_another() {
    let cl = Cluster::start(2);
    let (gw1_pid, gw1) = cl.node("gw-1");
    let (_, gw2) = cl.node("gw-2");
    let (mut alice, _) = login(&gw1, &cl.secret, "alice", "phone").await;
    let (mut bob, _) = login(&gw2, &cl.secret, "bob", "phone").await;
    let mut acked = Vec::new();
    for i in 0..10 {
        bob.say("alice", &format!("b{i}"), &ct(&format!("m{i}")))
            .await;
        acked.push(bob.recv_type("message_ack").await["payload"]["seq"].clone());
    }
    // gw-1 dies without a word (SIGKILL): alice's socket just ends.
    let status = Command::new("kill")
        .args(["-KILL", &gw1_pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    assert_eq!(
        alice.closed().await,
        None,
        "no close frame from a killed process"
    );
    // Bob keeps sending while alice is away: the chat service has dropped gw-1's
    // connections (its link ended), so these wait in alice's inbox.
    for i in 10..20 {
        bob.say("alice", &format!("b{i}"), &ct(&format!("m{i}")))
            .await;
        acked.push(bob.recv_type("message_ack").await["payload"]["seq"].clone());
    }
    let acked: Vec<u64> = acked.iter().map(|v| v.as_u64().expect("seq")).collect();
    assert_eq!(acked, (1..=20).collect::<Vec<u64>>());
    let (mut alice, hello) = login(&gw2, &cl.secret, "alice", "phone").await;
    assert!(
        hello["payload"]["unread_count"].as_u64().expect("unread") >= 10,
        "{hello}"
    );
    alice
        .send(json!({"type":"sync","payload":{"conversation_id":"dm:alice:bob","after_seq":0,"limit":100}}))
        .await;
    assert_eq!(seqs(&alice.recv_type("sync_page").await), acked);
}

#[tokio::test]
async fn a_chat_service_killed_and_restarted_from_its_data_dir_loses_nothing_acked() {
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    let data_s = data.to_str().expect("utf-8 path").to_string();
    let secret = data.join("secret");
    let chat_args = |link: &str| {
        vec![
            "serve".to_string(),
            "--role".into(),
            "chat".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--link-listen".into(),
            link.to_string(),
            "--data-dir".into(),
            data_s.clone(),
        ]
    };
    let args: Vec<String> = chat_args("127.0.0.1:0");
    let mut chat = Proc::start(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "links:",
    );
    let link = chat.after("gateway nodes link to ").trim().to_string();
    let gw = Proc::start(
        &[
            "serve",
            "--role",
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--chat",
            &link,
            "--gateway",
            "gw-1",
            "--secret-file",
            secret.to_str().expect("utf-8 path"),
        ],
        "WebSocket",
    );
    let gw_addr = gw.after("listening on ").trim().to_string();
    let (bob, _) = login(&gw_addr, &secret, "bob", "phone").await;
    drop(bob);
    let (mut alice, _) = login(&gw_addr, &secret, "alice", "phone").await;
    let mut acked = Vec::new();
    for i in 0..20 {
        alice
            .say("bob", &format!("r{i}"), &ct(&format!("before {i}")))
            .await;
        acked.push(
            alice.recv_type("message_ack").await["payload"]["seq"]
                .as_u64()
                .expect("seq"),
        );
    }
    // The chat service dies (SIGKILL): its gateway closes alice with 1012.
    chat.kill9();
    assert_eq!(alice.closed().await, Some(1012));
    // Restarted from the same data dir on the same link address; the gateway links again
    // by itself (it retries every 2 s at most).
    let args = chat_args(&link);
    let _chat = Proc::start(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        "links:",
    );
    let (mut bob, hello) = login(&gw_addr, &secret, "bob", "phone").await;
    assert_eq!(hello["payload"]["unread_count"], 20, "{hello}");
    bob.send(json!({"type":"sync","payload":{"conversation_id":"dm:alice:bob","limit":100}}))
        .await;
    assert_eq!(seqs(&bob.recv_type("sync_page").await), acked);
    // A retry after the restart is still recognised.
    let (mut alice, _) = login(&gw_addr, &secret, "alice", "phone").await;
    alice.say("bob", "r3", &ct("before 3")).await;
    let e = alice.recv_type("error").await;
    assert_eq!(e["payload"]["code"], 409, "{e}");
    assert_eq!(e["payload"]["seq"], 4, "{e}");
}

#[tokio::test]
async fn the_media_lane_passes_through_gateway_processes_and_stays_member_only() {
    let cl = Cluster::start(2);
    let (_, gw1) = cl.node("gw-1");
    let (_, gw2) = cl.node("gw-2");
    let alice = token(&cl.secret, "alice", "phone");
    let body = r#"{"conversation_id":"dm:alice:bob","file_type":"video/mp4","file_size":10}"#;
    let resp = http(&gw1, &format!(
        "POST /v1/media:prepare HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nContent-Length: {}\r\n\r\n{body}", body.len())).await;
    assert!(resp.starts_with("HTTP/1.1 201"), "{resp}");
    let v: Value =
        serde_json::from_str(resp.split("\r\n\r\n").nth(1).expect("body")).expect("json");
    let url = v["upload_url"].as_str().expect("url").to_string();
    let put = format!(
        "PUT {url} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\nContent-Range: bytes 0-9/10\r\nContent-Length: 10\r\n\r\n0123456789"
    );
    let done = http(&gw1, &put).await;
    assert!(done.contains(r#""complete":true"#), "{done}");
    // Downloaded through the other gateway process, by a member only.
    let get =
        |tok: &str| format!("GET {url} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {tok}\r\n\r\n");
    let got = http(&gw2, &get(&token(&cl.secret, "bob", "phone"))).await;
    assert!(
        got.starts_with("HTTP/1.1 200") && got.ends_with("0123456789"),
        "{got}"
    );
    let denied = http(&gw2, &get(&token(&cl.secret, "eve", "phone"))).await;
    assert!(denied.starts_with("HTTP/1.1 403"), "{denied}");
}

/// One raw HTTP/1.1 exchange on loopback; the whole response as text.
async fn http(addr: &str, req: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("response")
        .expect("read");
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn a_load_run_spread_over_two_gateway_processes_delivers_everything_and_measures_the_chat_service()
{
    let cl = Cluster::start(2);
    let (_, gw1) = cl.node("gw-1");
    let (_, gw2) = cl.node("gw-2");
    let (_, chat) = cl.node("chat");
    let out = cl._dir.path().join("load");
    let r = Command::new(env!("CARGO_BIN_EXE_chatsim"))
        .args(["load", "--target", &format!("ws://{gw1}")])
        .args(["--gateway", &format!("ws://{gw2}")])
        .args(["--metrics-url", &format!("http://{chat}/metrics")])
        .arg("--secret-file")
        .arg(&cl.secret)
        .args([
            "--users",
            "40",
            "--rate",
            "2",
            "--ramp",
            "2",
            "--duration",
            "3",
        ])
        .args(["--fail-if", "delivered_ratio<1"])
        .arg("--out")
        .arg(&out)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run chatsim load");
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let s: Value =
        serde_json::from_slice(&std::fs::read(out.join("summary.json")).expect("summary.json"))
            .expect("json");
    assert_eq!(s["target"], format!("ws://{gw1} ws://{gw2}"), "{s}");
    assert!(s["delivered"].as_u64().expect("delivered") > 0, "{s}");
    assert_eq!(s["delivered"], s["expected_deliveries"], "{s}");
    assert_eq!(s["valid"], true, "{s}");
    assert!(
        text.contains("CPU µs per delivery"),
        "the chat service was measured: {text}"
    );
}

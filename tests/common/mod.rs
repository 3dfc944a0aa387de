//! Shared helpers for end-to-end tests: start `chatsim serve` on an ephemeral loopback
//! port, mint tokens from its secret, and talk to it with real WebSocket clients.
#![allow(dead_code)]

pub mod browser;

use futures_util::{SinkExt, StreamExt};
use model_server::auth::{mint, Secret};
use model_server::ids::Millis;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Longest any single wait in these tests may take.
pub const WAIT: Duration = Duration::from_secs(10);

/// A running `chatsim serve` child process.
pub struct ServerProc {
    pub child: Child,
    pub addr: String,
    pub data_dir: PathBuf,
}

impl ServerProc {
    /// Starts the server on 127.0.0.1:0 with its store in `data_dir`.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chatsim"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn chatsim serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut addr = None;
        for _ in 0..10 {
            let Some(Ok(line)) = lines.next() else { break };
            if let Some(a) = line.strip_prefix("chatsim serve: listening on ") {
                addr = Some(a.trim().to_string());
                break;
            }
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let addr = addr.expect("server printed its address");
        ServerProc {
            child,
            addr,
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// A token for `user`'s `device`, signed with this server's secret.
    pub fn token(&self, user: &str, device: &str) -> String {
        let raw = std::fs::read_to_string(self.data_dir.join("secret")).expect("secret file");
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

    /// Stops the server with SIGTERM (graceful) and waits for it.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A WebSocket client speaking docs/PROTOCOL.md.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    /// Connects without authenticating.
    pub async fn connect(addr: &str) -> Self {
        let (ws, _) =
            tokio_tungstenite::connect_async_with_config(format!("ws://{addr}/ws"), None, true)
                .await
                .expect("connect");
        Client { ws }
    }

    /// Connects and authenticates; panics unless `auth_success` arrives.
    pub async fn login(srv: &ServerProc, user: &str, device: &str) -> (Self, Value) {
        let mut c = Self::connect(&srv.addr).await;
        let tok = srv.token(user, device);
        c.send(
            json!({"type":"auth","payload":{"user_id":user,"auth_token":tok,"device_id":device}}),
        )
        .await;
        let ok = c.recv().await;
        assert_eq!(ok["type"], "auth_success", "{ok}");
        (c, ok)
    }

    pub async fn send(&mut self, v: Value) {
        self.ws
            .send(Message::text(v.to_string()))
            .await
            .expect("send");
    }

    pub async fn send_raw(&mut self, m: Message) {
        self.ws.send(m).await.expect("send");
    }

    /// The next text frame as JSON (skipping pings), or panics after `WAIT`.
    pub async fn recv(&mut self) -> Value {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("frame within WAIT")
                .expect("stream open")
                .expect("frame ok");
            match m {
                Message::Text(t) => return serde_json::from_str(t.as_str()).expect("JSON frame"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// The next frame of type `ty`, skipping others (presence, typing, ...).
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        for _ in 0..1000 {
            let v = self.recv().await;
            if v["type"] == ty {
                return v;
            }
        }
        panic!("no {ty} frame");
    }

    /// Waits for the server to close; returns the close code.
    pub async fn closed(&mut self) -> Option<u16> {
        loop {
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("close within WAIT")
            {
                Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    pub async fn say(&mut self, to: &str, cmid: &str, content: &str) {
        self.send(json!({"type":"message","client_message_id":cmid,
            "payload":{"receiver_id":to,"content":content}}))
            .await;
    }
}

/// Opaque "ciphertext" for tests: base64 of some bytes.
pub fn ct(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

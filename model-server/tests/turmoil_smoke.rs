//! The same server, unchanged, on turmoil's simulated network: two simulated clients chat
//! through it over tokio-tungstenite on turmoil TCP. This is the seam `sim/` builds on.

use futures_util::{SinkExt, StreamExt};
use model_server::auth::{mint, Secret};
use model_server::ids::Millis;
use model_server::runtime::{Clock, RuntimeConfig, Server, Spawner};
use model_server::store::MemoryStore;
use model_server::Limits;
use serde_json::{json, Value};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

const EPOCH: u64 = 1_700_000_000_000;
const SECRET: &[u8] = b"simulation-secret-0123";

async fn client(user: &'static str, peer: &'static str) -> turmoil::Result<Vec<Value>> {
    let (mut ws, hello) = login(user).await?;
    let mut seen = vec![hello];
    // Give both sides time to log in, then each sends one message to the other.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let send = json!({"type":"message","client_message_id":format!("{user}-1"),
        "payload":{"receiver_id":peer,"content":"Y2lwaGVy"}});
    ws.send(Message::text(send.to_string())).await?;
    while seen
        .iter()
        .filter(|v: &&Value| v["type"] == "message" || v["type"] == "message_ack")
        .count()
        < 2
    {
        let m = tokio::time::timeout(Duration::from_secs(5), ws.next()).await?;
        match m {
            Some(Ok(Message::Text(t))) => seen.push(serde_json::from_str(t.as_str())?),
            Some(Ok(_)) => {}
            _ => break,
        }
    }
    Ok(seen)
}

/// Runs the unchanged server as host `server` on port 8080 with `cfg()` (local spawner).
fn serve_on(sim: &mut turmoil::Sim<'_>, cfg: fn() -> RuntimeConfig) {
    sim.host("server", move || async move {
        let listener = turmoil::net::TcpListener::bind(("0.0.0.0", 8080)).await?;
        let server = Server::new(
            Limits::default(),
            Secret::new(SECRET.to_vec())?,
            Box::new(MemoryStore::new()),
            RuntimeConfig {
                spawner: Spawner::Local,
                ..cfg()
            },
            Clock::starting_at(EPOCH),
        );
        server.serve(listener).await;
        Ok(())
    });
}

fn run(seed: u64) -> Vec<String> {
    let mut sim = turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(Duration::from_secs(30))
        .build();
    serve_on(&mut sim, RuntimeConfig::default);
    let out = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    for (user, peer) in [("alice", "bob"), ("bob", "alice")] {
        let out = out.clone();
        sim.client(user, async move {
            let seen = client(user, peer).await?;
            out.borrow_mut()
                .push(format!("{user}: {}", serde_json::to_string(&seen)?));
            Ok(())
        });
    }
    sim.run().expect("simulation runs to completion");
    let mut v = out.borrow().clone();
    v.sort();
    v
}

#[test]
fn server_runs_unchanged_on_turmoil_and_two_clients_chat() {
    let log = run(7);
    assert_eq!(log.len(), 2);
    let alice = &log[0];
    assert!(alice.contains(r#""type":"auth_success""#), "{alice}");
    assert!(alice.contains(r#""type":"message_ack""#), "{alice}");
    assert!(
        alice.contains(r#""sender_id":"bob""#),
        "alice got bob's message: {alice}"
    );
    assert!(
        log[1].contains(r#""sender_id":"alice""#),
        "bob got alice's message"
    );
}

#[test]
fn same_seed_gives_the_same_bytes() {
    assert_eq!(run(11), run(11));
}

type SimWs = tokio_tungstenite::WebSocketStream<turmoil::net::TcpStream>;

/// Logs `user` in on a fresh turmoil connection; returns it with the `auth_success` frame.
async fn login(user: &str) -> turmoil::Result<(SimWs, Value)> {
    let stream = turmoil::net::TcpStream::connect(("server", 8080)).await?;
    let (mut ws, _) = tokio_tungstenite::client_async("ws://server:8080/ws", stream).await?;
    let secret = Secret::new(SECRET.to_vec())?;
    let tok = mint(
        &secret,
        &user.into(),
        &"phone".into(),
        Millis(EPOCH + 3_600_000),
    );
    let auth =
        json!({"type":"auth","payload":{"user_id":user,"auth_token":tok,"device_id":"phone"}});
    ws.send(Message::text(auth.to_string())).await?;
    while let Some(Ok(m)) = ws.next().await {
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(t.as_str())?;
            if v["type"] == "auth_success" {
                return Ok((ws, v));
            }
        }
    }
    Err("no auth_success".into())
}

#[test]
fn server_still_hears_a_client_while_a_write_to_it_is_blocked() {
    // Four-segment TCP buffers: a client that stops reading blocks the server's writes to
    // it after a few frames. Bob stops reading while Alice floods him, then sends her a
    // message himself. It must reach her at once, not after the server's 10 s write timeout.
    let mut sim = turmoil::Builder::new()
        .rng_seed(3)
        .tcp_capacity(4)
        .simulation_duration(Duration::from_secs(60))
        .build();
    serve_on(&mut sim, RuntimeConfig::default);
    let sent_at = std::rc::Rc::new(std::cell::Cell::new(None::<Duration>));
    let got_at = std::rc::Rc::new(std::cell::Cell::new(None::<Duration>));
    {
        let sent_at = sent_at.clone();
        sim.client("bob", async move {
            let (mut ws, _) = login("bob").await?;
            // Not reading from here on; Alice's flood fills the pipe to Bob.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let send = json!({"type":"message","client_message_id":"bob-1",
                "payload":{"receiver_id":"alice","content":"Y2lwaGVy"}});
            sent_at.set(turmoil::sim_elapsed());
            ws.send(Message::text(send.to_string())).await?;
            tokio::time::sleep(Duration::from_secs(20)).await;
            Ok(())
        });
    }
    {
        let got_at = got_at.clone();
        sim.client("alice", async move {
            let (mut ws, _) = login("alice").await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            for i in 0..20 {
                let send = json!({"type":"message","client_message_id":format!("a-{i}"),
                    "payload":{"receiver_id":"bob","content":"Y2lwaGVy"}});
                ws.send(Message::text(send.to_string())).await?;
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            while let Ok(Some(Ok(m))) = tokio::time::timeout_at(deadline, ws.next()).await {
                if let Message::Text(t) = m {
                    if t.as_str().contains(r#""sender_id":"bob""#) {
                        got_at.set(turmoil::sim_elapsed());
                        break;
                    }
                }
            }
            Ok(())
        });
    }
    sim.run().expect("simulation runs to completion");
    let sent = sent_at.get().expect("bob sent");
    let got = got_at.get().expect("alice got bob's message");
    assert!(
        got - sent < Duration::from_secs(1),
        "bob's message took {:?} to reach alice while the server's writes to bob were blocked",
        got - sent
    );
}

#[test]
fn streams_past_max_pending_streams_are_closed_at_accept() {
    // Two idle sockets that never send a request head hold both pending slots; a third is
    // closed at once instead of waiting for its head.
    let mut sim = turmoil::Builder::new()
        .rng_seed(5)
        .simulation_duration(Duration::from_secs(60))
        .build();
    serve_on(&mut sim, || RuntimeConfig {
        max_pending_streams: 2,
        head_timeout: Duration::from_secs(30),
        ..RuntimeConfig::default()
    });
    sim.client("idler", async {
        use tokio::io::AsyncReadExt;
        let _a = turmoil::net::TcpStream::connect(("server", 8080)).await?;
        let _b = turmoil::net::TcpStream::connect(("server", 8080)).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut c = turmoil::net::TcpStream::connect(("server", 8080)).await?;
        let mut buf = [0u8; 16];
        let start = tokio::time::Instant::now();
        let n = tokio::time::timeout(Duration::from_secs(20), c.read(&mut buf))
            .await
            .map_err(|_| "third stream was not closed")?
            .unwrap_or(0);
        assert_eq!(n, 0, "closed without an answer");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "closed at accept, not after the 30 s head timeout"
        );
        Ok(())
    });
    sim.run().expect("simulation runs to completion");
}

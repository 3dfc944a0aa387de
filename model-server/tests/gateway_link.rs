//! Gateway nodes on their own turmoil hosts, linked to the chat service over the network:
//! a message crosses two gateways; a gateway cut off from the chat service closes its
//! clients and, once the link is back, they reconnect and sync what was sent meanwhile;
//! a gateway without the server secret is refused.

use futures_util::{SinkExt, StreamExt};
use model_server::auth::{mint, Secret};
use model_server::ids::Millis;
use model_server::runtime::link::gateway::TurmoilConnector;
use model_server::runtime::link::{ChatLinks, GatewayNode, LinkConfig};
use model_server::runtime::{Clock, Hub, RuntimeConfig, Spawner};
use model_server::store::MemoryStore;
use model_server::Limits;
use serde_json::{json, Value};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

const EPOCH: u64 = 1_700_000_000_000;
const SECRET: &[u8] = b"simulation-secret-0123";
const LINK_PORT: u16 = 9000;

type SimWs = tokio_tungstenite::WebSocketStream<turmoil::net::TcpStream>;

fn build(seed: u64) -> turmoil::Sim<'static> {
    turmoil::Builder::new()
        .rng_seed(seed)
        .simulation_duration(Duration::from_secs(60))
        .build()
}

/// The chat service on host `chat`, serving gateway links on `LINK_PORT`.
fn chat_host(sim: &mut turmoil::Sim<'_>) {
    sim.host("chat", || async {
        let hub = Hub::new(
            Limits::default(),
            Secret::new(SECRET.to_vec())?,
            Box::new(MemoryStore::new()),
            None,
        );
        let clock = Clock::starting_at(EPOCH);
        let ticker = {
            let hub = hub.clone();
            async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    let now = hub.now_on(&clock);
                    hub.act(|c| c.tick(now));
                }
            }
        };
        tokio::task::spawn_local(ticker);
        let links = ChatLinks::new(hub, LinkConfig::default(), clock, Spawner::Local);
        let listener = turmoil::net::TcpListener::bind(("0.0.0.0", LINK_PORT)).await?;
        let (_stop, stop) = tokio::sync::watch::channel(false);
        links.serve(listener, stop).await;
        Ok(())
    });
}

/// A gateway node on host `name`, proving itself with `secret`.
fn gateway_host(sim: &mut turmoil::Sim<'_>, name: &'static str, secret: &'static [u8]) {
    sim.host(name, move || async move {
        let cfg = RuntimeConfig {
            gateway: name.into(),
            spawner: Spawner::Local,
            run_timers: false,
            ..RuntimeConfig::default()
        };
        let node = GatewayNode::new(
            cfg,
            LinkConfig::default(),
            &Secret::new(secret.to_vec())?,
            Clock::starting_at(EPOCH),
            None,
        );
        let listener = turmoil::net::TcpListener::bind(("0.0.0.0", 8080)).await?;
        let chat = TurmoilConnector {
            media_port: None,
            host: "chat".into(),
            port: LINK_PORT,
        };
        node.serve(listener, chat).await;
        Ok(())
    });
}

/// Logs `user` in through gateway host `gw`; returns the socket and `auth_success`.
async fn login(gw: &str, user: &str) -> turmoil::Result<(SimWs, Value)> {
    let stream = turmoil::net::TcpStream::connect((gw, 8080)).await?;
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{gw}:8080/ws"), stream)
        .await
        .map_err(|e| format!("{gw}: {e}"))?;
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
    let v = next_of(&mut ws, "auth_success", Duration::from_secs(5)).await?;
    Ok((ws, v))
}

/// Reads until a frame of `kind` arrives (or the socket ends, or `within` passes).
async fn next_of(ws: &mut SimWs, kind: &str, within: Duration) -> turmoil::Result<Value> {
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Some(Ok(m))) = tokio::time::timeout_at(deadline, ws.next()).await {
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(t.as_str())?;
            if v["type"] == kind {
                return Ok(v);
            }
        }
    }
    Err(format!("no {kind} frame").into())
}

fn send(to: &str, cmid: &str) -> Message {
    Message::text(
        json!({"type":"message","client_message_id":cmid,
            "payload":{"receiver_id":to,"content":"Y2lwaGVy"}})
        .to_string(),
    )
}

#[test]
fn a_message_crosses_two_gateway_nodes_over_their_links() {
    let mut sim = build(7);
    chat_host(&mut sim);
    gateway_host(&mut sim, "gw-a", SECRET);
    gateway_host(&mut sim, "gw-b", SECRET);
    let got = Rc::new(RefCell::new(None));
    {
        let got = got.clone();
        sim.client("bob", async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (mut ws, _) = login("gw-b", "bob").await?;
            let m = next_of(&mut ws, "message", Duration::from_secs(10)).await?;
            *got.borrow_mut() = Some(m);
            Ok(())
        });
    }
    sim.client("alice", async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (mut ws, _) = login("gw-a", "alice").await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        ws.send(send("bob", "a-1")).await?;
        let ack = next_of(&mut ws, "message_ack", Duration::from_secs(5)).await?;
        assert_eq!(ack["payload"]["seq"], 1, "{ack}");
        Ok(())
    });
    sim.run().expect("simulation runs");
    let m = got.borrow().clone().expect("bob got the message");
    assert_eq!(m["payload"]["sender_id"], "alice", "{m}");
}

#[test]
fn a_gateway_cut_off_from_the_chat_service_closes_its_clients_and_they_catch_up_after() {
    let mut sim = build(11);
    chat_host(&mut sim);
    gateway_host(&mut sim, "gw-a", SECRET);
    gateway_host(&mut sim, "gw-b", SECRET);
    let close_code = Rc::new(RefCell::new(None));
    let caught_up = Rc::new(RefCell::new(None));
    {
        let (close_code, caught_up) = (close_code.clone(), caught_up.clone());
        sim.client("bob", async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (mut ws, _) = login("gw-b", "bob").await?;
            // The link of gw-b is cut at 2 s: within the link's dead time the gateway
            // closes bob's socket with 1012, though bob's own link to it is fine.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            while let Ok(Some(Ok(m))) = tokio::time::timeout_at(deadline, ws.next()).await {
                if let Message::Close(Some(f)) = m {
                    *close_code.borrow_mut() = Some(u16::from(f.code));
                    break;
                }
            }
            // After the repair, bob logs in again and syncs what alice sent meanwhile.
            tokio::time::sleep(Duration::from_secs(12)).await;
            let (mut ws, _) = login("gw-b", "bob").await?;
            ws.send(Message::text(r#"{"type":"sync","payload":{}}"#))
                .await?;
            let page = next_of(&mut ws, "sync_page", Duration::from_secs(5)).await?;
            *caught_up.borrow_mut() = Some(page);
            Ok(())
        });
    }
    sim.client("alice", async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (mut ws, _) = login("gw-a", "alice").await?;
        tokio::time::sleep(Duration::from_secs(8)).await;
        ws.send(send("bob", "a-1")).await?;
        next_of(&mut ws, "message_ack", Duration::from_secs(5)).await?;
        tokio::time::sleep(Duration::from_secs(20)).await;
        Ok(())
    });
    let mut t = 0;
    while t < 60_000 {
        if t == 2_000 {
            sim.partition("gw-b", "chat");
        }
        if t == 14_000 {
            sim.repair("gw-b", "chat");
        }
        let done = sim.step().expect("simulation steps");
        if done {
            break;
        }
        t = sim.elapsed().as_millis() as u64;
    }
    assert_eq!(
        *close_code.borrow(),
        Some(1012),
        "bob's socket closed as the link died"
    );
    let page = caught_up
        .borrow()
        .clone()
        .expect("bob synced after the repair");
    assert!(
        page.to_string().contains("a-1") || page.to_string().contains(r#""sender_id":"alice""#),
        "the message sent while gw-b was cut off is in bob's sync: {page}"
    );
}

#[test]
fn a_gateway_without_the_server_secret_is_refused() {
    let mut sim = build(3);
    chat_host(&mut sim);
    gateway_host(&mut sim, "gw-x", b"not-the-secret-at-all-000");
    sim.client("mallory", async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let stream = turmoil::net::TcpStream::connect(("gw-x", 8080)).await?;
        let r = tokio_tungstenite::client_async("ws://gw-x:8080/ws", stream).await;
        let e = r.err().ok_or("the unlinked gateway upgraded a client")?;
        assert!(e.to_string().contains("503"), "{e}");
        Ok(())
    });
    sim.run().expect("simulation runs");
}

/// The chat service of `pumps_end_with_their_connections`, for the test to read.
static LINKS: std::sync::Mutex<Option<std::sync::Arc<ChatLinks>>> = std::sync::Mutex::new(None);

#[test]
fn a_connections_pump_ends_when_its_client_leaves_while_the_link_lives_on() {
    let mut sim = build(5);
    sim.host("chat", || async {
        let hub = Hub::new(
            Limits::default(),
            Secret::new(SECRET.to_vec())?,
            Box::new(MemoryStore::new()),
            None,
        );
        let links = ChatLinks::new(
            hub,
            LinkConfig::default(),
            Clock::starting_at(EPOCH),
            Spawner::Local,
        );
        *LINKS.lock().expect("lock") = Some(links.clone());
        let listener = turmoil::net::TcpListener::bind(("0.0.0.0", LINK_PORT)).await?;
        let (_stop, stop) = tokio::sync::watch::channel(false);
        links.serve(listener, stop).await;
        Ok(())
    });
    gateway_host(&mut sim, "gw-a", SECRET);
    let pumps = |()| LINKS.lock().expect("lock").as_ref().map(|l| l.pumps());
    let seen = Rc::new(RefCell::new(Vec::new()));
    {
        let seen = seen.clone();
        sim.client("alice", async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let (ws, _) = login("gw-a", "alice").await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            seen.borrow_mut().push(pumps(()));
            // An idle client leaves: its pump, waiting for frames, must end too.
            drop(ws);
            tokio::time::sleep(Duration::from_secs(2)).await;
            seen.borrow_mut().push(pumps(()));
            Ok(())
        });
    }
    sim.run().expect("simulation runs");
    assert_eq!(*seen.borrow(), vec![Some(1), Some(0)]);
    *LINKS.lock().expect("lock") = None;
}

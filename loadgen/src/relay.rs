//! A bare tokio-tungstenite relay: the baseline the model server is measured against.
//!
//! It speaks just enough of docs/PROTOCOL.md for the load generator (auth, 1:1 and group
//! messages, acks) and does nothing else: no auth check, no store, no dedup, no queues
//! bounds, no receipts. The difference between it and `chatsim serve` under the same load
//! is what the model's rules cost.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

#[derive(Default)]
struct State {
    users: HashMap<String, mpsc::UnboundedSender<String>>,
    groups: HashMap<String, Vec<String>>,
    next: u64,
}

/// Serves the relay on `listener` forever.
pub async fn serve(listener: tokio::net::TcpListener) -> std::io::Result<()> {
    let state = Arc::new(Mutex::new(State::default()));
    loop {
        let (s, _) = listener.accept().await?;
        s.set_nodelay(true)?;
        let state = state.clone();
        tokio::spawn(async move {
            let Ok(ws) = tokio_tungstenite::accept_async(s).await else {
                return;
            };
            let (mut tx, mut rx) = ws.split();
            let (out_tx, mut out_rx) = mpsc::unbounded_channel::<String>();
            let writer = tokio::spawn(async move {
                while let Some(m) = out_rx.recv().await {
                    if tx.send(Message::text(m)).await.is_err() {
                        break;
                    }
                }
            });
            let mut me = String::new();
            while let Some(Ok(Message::Text(t))) = rx.next().await {
                let Ok(v) = serde_json::from_str::<Value>(t.as_str()) else {
                    continue;
                };
                let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
                match v["type"].as_str() {
                    Some("auth") => {
                        me = v["payload"]["user_id"].as_str().unwrap_or("").to_string();
                        lock().users.insert(me.clone(), out_tx.clone());
                        let _ = out_tx.send(json!({"type":"auth_success","payload":{"session_id":"relay","server_time":0,"unread_count":0,"resumed":false,"heartbeat_interval_ms":30000}}).to_string());
                    }
                    Some("message") | Some("group_message") => {
                        let cmid = v["client_message_id"].clone();
                        let p = &v["payload"];
                        let (conv, targets) = {
                            let st = lock();
                            match p["receiver_id"].as_str() {
                                Some(r) => (format!("dm:{me}:{r}"), vec![r.to_string()]),
                                None => {
                                    let g = p["group_id"].as_str().unwrap_or("").to_string();
                                    let members = st.groups.get(&g).cloned().unwrap_or_default();
                                    (
                                        format!("grp:{g}"),
                                        members.into_iter().filter(|m| *m != me).collect(),
                                    )
                                }
                            }
                        };
                        let seq = {
                            let mut st = lock();
                            st.next += 1;
                            st.next
                        };
                        let id = format!("{conv}#{seq}");
                        let _ = out_tx.send(json!({"type":"message_ack","client_message_id":cmid,"payload":{"message_id":id,"conversation_id":conv,"seq":seq,"status":"sent","timestamp":0}}).to_string());
                        let frame = json!({"type": v["type"], "payload":{"message_id":id,"conversation_id":conv,"seq":seq,"sender_id":me,"content":p["content"],"timestamp":0}}).to_string();
                        let st = lock();
                        for t in targets {
                            if let Some(s) = st.users.get(&t) {
                                let _ = s.send(frame.clone());
                            }
                        }
                    }
                    Some("group_create") => {
                        let mut members: Vec<String> = v["payload"]["members"]
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .filter_map(|m| m.as_str().map(str::to_string))
                                    .collect()
                            })
                            .unwrap_or_default();
                        members.push(me.clone());
                        let gid = {
                            let mut st = lock();
                            st.next += 1;
                            let gid = format!("g{}", st.next);
                            st.groups.insert(gid.clone(), members.clone());
                            gid
                        };
                        let _ = out_tx.send(json!({"type":"group_created","payload":{"group_id":gid,"conversation_id":format!("grp:{gid}"),"members":members,"admins":[me],"announcement_only":false}}).to_string());
                    }
                    _ => {}
                }
            }
            state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .users
                .remove(&me);
            writer.abort();
        });
    }
}

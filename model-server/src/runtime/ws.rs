//! One WebSocket connection: frames in go to the core; frames the core queued go out when
//! it wakes us; a close the core decided is written with its final frames and close code.
//!
//! Reads and writes run side by side in one task (`select!` with `biased;` so the order does
//! not depend on an unseeded RNG under simulation): a write blocked on a slow reader does
//! not stop us hearing that client. Every write is bounded by `write_timeout`, so a stalled
//! peer cannot hold the task forever; the core's own timers close silent ones.

use super::http::{self, Head, Prefixed};
use super::{lock, ConnSignal, Server};
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;

/// Serves one upgraded connection until it closes.
pub(super) async fn run<St>(server: Arc<Server>, mut stream: St, head: Head)
where
    St: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let path = head.path.split('?').next().unwrap_or("");
    if path != "/ws" && path != "/" {
        let _ = http::respond(
            &mut stream,
            404,
            "application/json",
            &http::error_json(404, "WebSocket endpoint is /ws"),
        )
        .await;
        return;
    }
    if lock(&server.hub.conns).len() >= server.cfg.max_connections {
        let _ = http::respond(
            &mut stream,
            503,
            "application/json",
            &http::error_json(503, "too many connections"),
        )
        .await;
        return;
    }
    let now = server.now();
    let Some(conn) = lock(&server.hub.core).connect(&server.cfg.gateway, now) else {
        let _ = http::respond(
            &mut stream,
            503,
            "application/json",
            &http::error_json(503, "gateway is not serving"),
        )
        .await;
        return;
    };
    let limits_max = server
        .hub
        .with_core(|c| c.limits().max_transport_frame_bytes);
    let cfg = WebSocketConfig::default()
        .read_buffer_size(server.cfg.ws_buffer_bytes)
        .write_buffer_size(0)
        .max_write_buffer_size(4 * 1024 * 1024)
        .max_message_size(Some(limits_max))
        .max_frame_size(Some(limits_max));
    let _active = ActiveGuard::new(&server);
    let sig = Arc::new(ConnSignal::default());
    lock(&server.hub.conns).insert(conn, sig.clone());
    let ws = match tokio_tungstenite::accept_async_with_config(
        Prefixed::new(head.raw, stream),
        Some(cfg),
    )
    .await
    {
        Ok(ws) => ws,
        Err(e) => {
            tracing::debug!(%conn, error = %e, "websocket handshake failed");
            finish(&server, conn);
            return;
        }
    };
    let (mut tx, mut rx) = ws.split();
    let write_timeout = server.cfg.write_timeout;
    let faults = server.hub.faults();
    let gateway = &server.cfg.gateway;
    let batch = server.cfg.write_batch;
    // The writer and the reader run side by side in this one task: while a write to a
    // slow reader is blocked, frames from it (heartbeats, acks, sends) are still read.
    let ending = {
        let writer = async {
            loop {
                sig.notify.notified().await;
                if let Some(d) = faults.and_then(|f| f.hold(gateway)) {
                    tokio::time::sleep(d).await;
                }
                let close = lock(&sig.close).take();
                if let Some(mut close) = close {
                    // Group commit: the last frames may tell of writes not yet durable.
                    if !close.final_frames.is_empty()
                        && !server
                            .hub
                            .settled(close.incarnation, close.after, write_timeout)
                            .await
                    {
                        close.final_frames.clear();
                    }
                    let send_all = async {
                        for f in close.final_frames {
                            tx.feed(Message::text(f)).await?;
                        }
                        tx.send(Message::Close(Some(CloseFrame {
                            code: CloseCode::from(close.reason.ws_code()),
                            reason: close.reason.as_str().into(),
                        })))
                        .await
                    };
                    let _ = tokio::time::timeout(write_timeout, send_all).await;
                    return Ending::Closed;
                }
                let frames = lock(&server.hub.core).drain(conn, batch);
                if frames.len() == batch {
                    sig.notify.notify_one(); // more queued: come back after this batch
                }
                let written = if faults.is_some() {
                    frames.clone()
                } else {
                    Vec::new()
                };
                let send_all = async {
                    for f in frames {
                        tx.feed(Message::text(f)).await?;
                    }
                    tx.flush().await
                };
                match tokio::time::timeout(write_timeout, send_all).await {
                    Ok(Ok(())) => {
                        if let Some(f) = faults {
                            if f.after_write(gateway, &written) {
                                f.crash(&server.hub);
                            }
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%conn, error = %e, "write failed");
                        return Ending::Closed;
                    }
                    Err(_) => {
                        tracing::info!(%conn, "write timed out; dropping connection");
                        return Ending::Closed;
                    }
                }
            }
        };
        let reader = async {
            loop {
                let msg = rx.next().await;
                if let Some(d) = faults.and_then(|f| f.hold(gateway)) {
                    tokio::time::sleep(d).await;
                }
                let now = server.now();
                let fx = match msg {
                    Some(Ok(Message::Text(t))) => {
                        let mut core = lock(&server.hub.core);
                        let stored = core.stats().messages_stored;
                        let fx = core.on_text(conn, t.as_str(), now);
                        let committed = core.stats().messages_stored > stored;
                        drop(core);
                        if let Some(f) = faults.filter(|_| committed) {
                            if f.after_commit(gateway) {
                                // The ack and the fan-out die with the process.
                                f.crash(&server.hub);
                                continue;
                            }
                        }
                        fx
                    }
                    Some(Ok(Message::Binary(_))) => lock(&server.hub.core).on_binary(conn, now),
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => continue,
                    Some(Ok(Message::Close(_))) | None => return Ending::Closed,
                    Some(Err(tokio_tungstenite::tungstenite::Error::Capacity(e))) => {
                        tracing::debug!(%conn, error = %e, "frame over transport limit");
                        return Ending::TooBig;
                    }
                    Some(Err(e)) => {
                        tracing::debug!(%conn, error = %e, "read failed");
                        return Ending::Closed;
                    }
                };
                server.hub.apply(fx);
            }
        };
        tokio::select! {
            biased;
            e = writer => e,
            e = reader => e,
        }
    };
    if ending == Ending::TooBig {
        // Past the transport limit: we cannot read the frame to answer 413, so close with
        // 1009 (message too big), as RFC 6455 says. A frame the writer had started stays
        // whole in tungstenite's buffer and goes out before the close.
        let close = Message::Close(Some(CloseFrame {
            code: CloseCode::Size,
            reason: "frame too large".into(),
        }));
        let _ = tokio::time::timeout(write_timeout, tx.send(close)).await;
        // Read and discard the rest of the oversized frame for a moment, so the client
        // sees our close frame rather than a TCP reset.
        if let Ok(ws) = tx.reunite(rx) {
            discard_input(ws.into_inner()).await;
        }
    }
    finish(&server, conn);
}

/// Why a connection's task ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// Closed by either side, or a write failed or timed out.
    Closed,
    /// The client sent a frame past the transport limit: close with 1009.
    TooBig,
}

/// Counts this gateway's running connection tasks (graceful shutdown waits for zero).
struct ActiveGuard<'a>(&'a Server);

impl<'a> ActiveGuard<'a> {
    fn new(s: &'a Server) -> Self {
        s.active.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ActiveGuard(s)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Reads and drops up to 8 MiB for up to 2 s, then returns (closing the socket).
async fn discard_input<S: AsyncRead + Unpin>(mut s: S) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(2);
    while total < 8 * 1024 * 1024 {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => total += n,
            _ => break,
        }
    }
}

/// Forgets the connection in the runtime and the core.
fn finish(server: &Server, conn: crate::ids::ConnId) {
    lock(&server.hub.conns).remove(&conn);
    let now = server.now();
    let fx = lock(&server.hub.core).disconnected(conn, now);
    server.hub.apply(fx);
}

//! One WebSocket connection: frames in go to the core; frames the core queued go out when
//! it wakes us; a close the core decided is written with its final frames and close code.
//!
//! Reads and writes run side by side in one task (`select!` with `biased;` so the order does
//! not depend on an unseeded RNG under simulation): a write blocked on a slow reader does
//! not stop us hearing that client. Every write is bounded by `write_timeout`, so a stalled
//! peer cannot hold the task forever; the core's own timers close silent ones.

use super::http::{self, Head, Prefixed};
use super::{lock, Server};
use crate::ids::ConnId;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Serves one upgraded connection until it closes.
pub(super) async fn run<St>(server: Arc<Server>, mut stream: St, head: Head)
where
    St: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    if !endpoint_ok(&mut stream, &head).await {
        return;
    }
    if lock(&server.hub.conns).len() >= server.cfg.max_connections {
        refuse(&mut stream, 503, "too many connections").await;
        return;
    }
    let now = server.now();
    let Some(conn) = lock(&server.hub.core).connect(&server.cfg.gateway, now) else {
        refuse(&mut stream, 503, "gateway is not serving").await;
        return;
    };
    let limits_max = server
        .hub
        .with_core(|c| c.limits().max_transport_frame_bytes);
    let _active = ActiveGuard::new(&server.active);
    let sig = server.hub.watch_conn(conn);
    let Some(ws) = handshake(stream, head, limits_max, server.cfg.ws_buffer_bytes, conn).await
    else {
        server.hub.forget(conn, server.now());
        return;
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
                if let Some(close) = close {
                    // Group commit: the last frames may tell of writes not yet durable.
                    let last = server.hub.closing_frames(&close, write_timeout).await;
                    let (code, why) = (close.reason.ws_code(), close.reason.as_str());
                    write_close(&mut tx, last, code, why, write_timeout).await;
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
                if !write_batch(&mut tx, frames, write_timeout, conn).await {
                    return Ending::Closed;
                }
                if let Some(f) = faults {
                    if f.after_write(gateway, &written) {
                        f.crash(&server.hub);
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
                match classify(conn, msg) {
                    Incoming::Text(t) => server.hub.client_text(gateway, conn, t.as_str(), now),
                    Incoming::Binary => server.hub.client_binary(conn, now),
                    Incoming::Skip => {}
                    Incoming::End(e) => return e,
                }
            }
        };
        tokio::select! {
            biased;
            e = writer => e,
            e = reader => e,
        }
    };
    match ending {
        Ending::TooBig => close_too_big(tx, rx, write_timeout).await,
        Ending::ClientClosed => echo_close(&mut tx, write_timeout).await,
        Ending::Closed => {}
    }
    server.hub.forget(conn, server.now());
}

/// The upgraded socket of one connection.
pub(super) type Socket<St> = WebSocketStream<Prefixed<St>>;

/// Answers 404 unless the upgrade asks for the WebSocket endpoint.
pub(super) async fn endpoint_ok<St: AsyncWrite + Unpin>(stream: &mut St, head: &Head) -> bool {
    let path = head.path.split('?').next().unwrap_or("");
    if path == "/ws" || path == "/" {
        return true;
    }
    refuse(stream, 404, "WebSocket endpoint is /ws").await;
    false
}

/// Answers a refused upgrade with a JSON error.
pub(super) async fn refuse<St: AsyncWrite + Unpin>(stream: &mut St, code: u16, msg: &str) {
    let _ = http::respond(
        stream,
        code,
        "application/json",
        &http::error_json(code, msg),
    )
    .await;
}

/// Completes the WebSocket handshake with buffers of `buffer` bytes and frames of at most
/// `max_frame` bytes; `None` (logged) when the client fails it.
pub(super) async fn handshake<St>(
    stream: St,
    head: Head,
    max_frame: usize,
    buffer: usize,
    conn: ConnId,
) -> Option<Socket<St>>
where
    St: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let cfg = WebSocketConfig::default()
        .read_buffer_size(buffer)
        .write_buffer_size(0)
        .max_write_buffer_size(4 * 1024 * 1024)
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame));
    match tokio_tungstenite::accept_async_with_config(Prefixed::new(head.raw, stream), Some(cfg))
        .await
    {
        Ok(ws) => Some(ws),
        Err(e) => {
            tracing::debug!(%conn, error = %e, "websocket handshake failed");
            None
        }
    }
}

/// What the reader got from the socket.
pub(super) enum Incoming {
    Text(tokio_tungstenite::tungstenite::Utf8Bytes),
    Binary,
    /// Control frames: nothing to hand on.
    Skip,
    End(Ending),
}

/// Sorts one read from the socket.
pub(super) fn classify(
    conn: ConnId,
    msg: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
) -> Incoming {
    match msg {
        Some(Ok(Message::Text(t))) => Incoming::Text(t),
        Some(Ok(Message::Binary(_))) => Incoming::Binary,
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => Incoming::Skip,
        Some(Ok(Message::Close(_))) => Incoming::End(Ending::ClientClosed),
        None => Incoming::End(Ending::Closed),
        Some(Err(tokio_tungstenite::tungstenite::Error::Capacity(e))) => {
            tracing::debug!(%conn, error = %e, "frame over transport limit");
            Incoming::End(Ending::TooBig)
        }
        Some(Err(e)) => {
            tracing::debug!(%conn, error = %e, "read failed");
            Incoming::End(Ending::Closed)
        }
    }
}

/// Writes `frames` and flushes within `timeout`; false (logged) when that failed and the
/// connection must end.
pub(super) async fn write_batch<Si>(
    tx: &mut Si,
    frames: Vec<String>,
    timeout: std::time::Duration,
    conn: ConnId,
) -> bool
where
    Si: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let send_all = async {
        for f in frames {
            tx.feed(Message::text(f)).await?;
        }
        tx.flush().await
    };
    match tokio::time::timeout(timeout, send_all).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::debug!(%conn, error = %e, "write failed");
            false
        }
        Err(_) => {
            tracing::info!(%conn, "write timed out; dropping connection");
            false
        }
    }
}

/// Writes `last` frames, then a close frame, within `timeout`.
pub(super) async fn write_close<Si>(
    tx: &mut Si,
    last: Vec<String>,
    code: u16,
    reason: &str,
    timeout: std::time::Duration,
) where
    Si: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let send_all = async {
        for f in last {
            tx.feed(Message::text(f)).await?;
        }
        tx.send(Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        })))
        .await
    };
    let _ = tokio::time::timeout(timeout, send_all).await;
}

/// Past the transport limit we cannot read the frame to answer 413, so we close with 1009
/// (message too big), as RFC 6455 says. A frame the writer had started stays whole in
/// tungstenite's buffer and goes out before the close.
pub(super) async fn close_too_big<St>(
    mut tx: SplitSink<Socket<St>, Message>,
    rx: SplitStream<Socket<St>>,
    timeout: std::time::Duration,
) where
    St: AsyncRead + AsyncWrite + Unpin,
{
    write_close(&mut tx, Vec::new(), 1009, "frame too large", timeout).await;
    // Read and discard the rest of the oversized frame for a moment, so the client sees
    // our close frame rather than a TCP reset.
    if let Ok(ws) = tx.reunite(rx) {
        discard_input(ws.into_inner()).await;
    }
}

/// Sends the close frame tungstenite queued in answer to the client's, within `timeout`.
pub(super) async fn echo_close<Si>(tx: &mut Si, timeout: std::time::Duration)
where
    Si: futures_util::Sink<Message, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    let _ = tokio::time::timeout(timeout, futures_util::SinkExt::flush(tx)).await;
}

/// Why a connection's task ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Ending {
    /// Closed by either side, or a write failed or timed out.
    Closed,
    /// The client sent a close frame: RFC 6455 wants it echoed (tungstenite has queued
    /// the echo; a flush sends it).
    ClientClosed,
    /// The client sent a frame past the transport limit: close with 1009.
    TooBig,
}

/// Counts a gateway's running connection tasks (graceful shutdown waits for zero).
pub(super) struct ActiveGuard<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> ActiveGuard<'a> {
    pub(super) fn new(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ActiveGuard(count)
    }
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
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

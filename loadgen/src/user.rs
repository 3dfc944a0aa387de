//! The Goose side: one scenario whose users each hold a device connection, send on an
//! open-loop schedule, and read with a task of their own. WebSocket work is recorded with
//! Goose's custom request metrics (`WS send`, `WS ack`, `WS deliver`), so Goose's own
//! report shows it next to ours.

use crate::ledger::Shared;
use base64::Engine;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use goose::prelude::*;
use model_server::auth::mint;
use model_server::ids::Millis;
use model_server::protocol::ServerFrame;
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Mutex};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type Sink = SplitSink<Ws, Message>;

/// Something the reader saw, for the user's next transaction to record in Goose.
enum Seen {
    Ack(Duration),
    Deliver(Duration),
    Error(String),
}

/// One Goose user's connection and schedule (session data: must be Clone + Send + Sync).
#[derive(Clone)]
struct Device {
    index: usize,
    user_id: String,
    sink: Arc<Mutex<Sink>>,
    /// Set when this end closes the socket on purpose (the end of the run), so the reader
    /// does not count the server's answering close as an unexpected one.
    closing: Arc<std::sync::atomic::AtomicBool>,
    next_k: Arc<AtomicU64>,
    seen: Arc<Mutex<mpsc::UnboundedReceiver<Seen>>>,
    /// Where this user's messages go, and to how many devices.
    target: Target,
    /// The reader task of the current connection, and the channel it reports on.
    reader: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    tx: mpsc::UnboundedSender<Seen>,
    /// Set once this device has gone through the reconnect storm.
    stormed: Arc<std::sync::atomic::AtomicBool>,
    /// When it was back from the storm: sends due before then were held by the outage,
    /// not by the generator, so they do not count as schedule slip.
    back_at: Arc<std::sync::Mutex<Option<Instant>>>,
    /// The conversation this device talks in (for typing notices).
    conv: String,
}

#[derive(Clone)]
enum Target {
    User(String),
    Group(String, u32),
}

/// Goose's own report. Markdown, because its HTML report loads its chart library from
/// the internet and is blank offline. Its counts cover the whole run (ramp, idle phase,
/// warm-up and drain), ours only the measured phase.
pub const GOOSE_REPORT: &str = "goose.md";

/// Time after the last scheduled send for in-flight messages to arrive.
pub const GRACE: Duration = Duration::from_secs(2);

fn err(msg: impl Into<String>) -> Box<TransactionError> {
    Box::new(TransactionError::Custom(msg.into()))
}

/// Runs the attack and returns Goose's metrics.
pub async fn attack(shared: Arc<Shared>) -> anyhow::Result<GooseMetrics> {
    let cfg = &shared.cfg;
    let ramp_s = cfg.ramp.as_secs_f64().max(0.001);
    let hatch = (cfg.users as f64 / ramp_s).max(1.0);
    // Goose ramps users up at `hatch`, then keeps them for RunTime: the measured phase
    // (which starts when the last user is connected) plus a grace period with no sends.
    // Goose counts RunTime from the launch of the last user, the phases from the end of
    // its connect (rounded up to a second): 3 s of slack cover a slow last connect; a
    // phase cut short anyway is caught by the verdict.
    let run_time = (cfg.idle + crate::ledger::WARM_UP + cfg.duration + GRACE + GRACE)
        .as_secs()
        .max(1)
        + 4;
    let s1 = shared.clone();
    let connect: TransactionFunction = Arc::new(move |user| {
        let s = s1.clone();
        Box::pin(async move {
            let r = on_start(s.clone(), user).await;
            // Counted whatever happened: the last one starts the measured phase.
            s.user_started();
            r
        })
    });
    let s2 = shared.clone();
    let s3 = shared.clone();
    let send: TransactionFunction = Arc::new(move |user| {
        let s = s2.clone();
        Box::pin(async move { send_next(s, user).await })
    });
    let stop: TransactionFunction = Arc::new(move |user| {
        let s = s3.clone();
        Box::pin(async move { on_stop(s, user).await })
    });
    // Event-loop lag: a task that asks for 50 ms of sleep and records how late it woke.
    let lag_shared = shared.clone();
    let lag_task = tokio::spawn(async move {
        loop {
            let t = Instant::now();
            tokio::time::sleep(Duration::from_millis(50)).await;
            let late = t.elapsed().saturating_sub(Duration::from_millis(50));
            if lag_shared.measuring(Instant::now()) {
                lag_shared.on_lag(late.as_micros() as u64);
            }
            lag_shared.sample_connections();
        }
    });
    let metrics =
        GooseAttack::initialize_with_config(goose::config::GooseConfiguration::default())?
            .register_scenario(
                scenario!("ChatDevice")
                    .register_transaction(
                        Transaction::new(connect).set_name("connect").set_on_start(),
                    )
                    .register_transaction(Transaction::new(send).set_name("send"))
                    .register_transaction(
                        Transaction::new(stop).set_name("disconnect").set_on_stop(),
                    ),
            )
            .set_default(GooseDefault::Host, cfg.target.as_str())?
            .set_default(GooseDefault::Users, cfg.users)?
            .set_default(GooseDefault::IncreaseRate, format!("{hatch:.3}").as_str())?
            .set_default(GooseDefault::RunTime, run_time as usize)?
            .set_default(GooseDefault::NoTelnet, true)?
            .set_default(GooseDefault::Quiet, 1)?
            .set_default(GooseDefault::NoPrintMetrics, true)?
            .set_default(
                GooseDefault::ReportFile,
                cfg.report_dir.join(GOOSE_REPORT).to_string_lossy().as_ref(),
            )?
            .execute()
            .await?;
    lag_task.abort();
    Ok(metrics)
}

/// The kind of a failed connection: refused at authentication, or not connected at all.
pub(crate) fn connect_error_kind(e: &str) -> &'static str {
    if e.starts_with(AUTH_FAILED) || e.starts_with(NO_AUTH_ANSWER) {
        "auth"
    } else {
        "connect"
    }
}

const AUTH_FAILED: &str = "auth failed";
const NO_AUTH_ANSWER: &str = "no auth_success within 10 s";

/// Connects and authenticates one device before the run, so a token the server refuses
/// (a `--secret-file` that is not the server's) stops the run with that reason.
pub(crate) async fn probe(shared: &Shared) -> Result<(), String> {
    let user_id = format!("{}-probe", shared.cfg.run_id);
    let mut ws = connect_ws(shared, &user_id).await?;
    let _ = ws.close(None).await;
    Ok(())
}

/// WebSocket buffers of one generator connection: tungstenite's defaults (128 KiB read
/// buffer allocated up front) would cost far more than the device itself. Frames here are
/// small; a bigger one only grows the buffer while it is read.
fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_write_buffer_size(1 << 20)
}

/// Opens a TCP connection to `hostport`, from `source` when given (so one machine can hold
/// more connections than one source address has ephemeral ports).
async fn tcp(hostport: &str, source: Option<std::net::IpAddr>) -> Result<TcpStream, String> {
    let addr = tokio::net::lookup_host(hostport)
        .await
        .map_err(|e| e.to_string())?
        .next()
        .ok_or_else(|| format!("{hostport}: no address"))?;
    // A source port can be taken for this destination (a connection of an earlier run
    // still in TIME_WAIT): then the next port is tried, a bounded number of times.
    let mut tries = 0;
    loop {
        let sock = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(|e| e.to_string())?;
        if let Some(ip) = source {
            bind_source(&sock, ip)?;
        }
        // TCP_NODELAY on the client too (Nagle + delayed ACK add ~40 ms otherwise).
        sock.set_nodelay(true).map_err(|e| e.to_string())?;
        match sock.connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e)
                if source.is_some()
                    && e.kind() == std::io::ErrorKind::AddrNotAvailable
                    && tries < 16 =>
            {
                tries += 1;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// Source ports handed out for `--source-ip`, in [`PORTS_FROM`, `PORTS_UNTIL`).
static NEXT_PORT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
static PORT_OFFSET: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
const PORTS_FROM: u32 = 20_000;
const PORTS_UNTIL: u32 = 61_000;

/// Binds `sock` to `ip` on an explicit port. bind(ip, 0) makes Linux search every bound
/// port for a free one: with tens of thousands of connections open that took all of both
/// cores. An explicit port is one lookup; a port in use is skipped.
/// SO_REUSEADDR lets a port whose last connection is in TIME_WAIT be bound again (connect
/// still refuses a 4-tuple in use); each process starts at its own offset in the range.
fn bind_source(sock: &tokio::net::TcpSocket, ip: std::net::IpAddr) -> Result<(), String> {
    let _ = sock.set_reuseaddr(true);
    let offset = *PORT_OFFSET.get_or_init(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        (std::process::id().wrapping_mul(7919) ^ t) % (PORTS_UNTIL - PORTS_FROM)
    });
    let mut last = None;
    for _ in 0..64 {
        let k = NEXT_PORT
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(offset);
        let port = PORTS_FROM + k % (PORTS_UNTIL - PORTS_FROM);
        match sock.bind(std::net::SocketAddr::new(ip, port as u16)) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(format!("binding source address {ip}: {e}")),
        }
    }
    Err(format!(
        "binding source address {ip}: no free port found ({})",
        last.map(|e| e.to_string()).unwrap_or_default()
    ))
}

/// Connects device `device_id` of `user_id` and authenticates it.
pub(crate) async fn connect_ws(shared: &Shared, user_id: &str) -> Result<Ws, String> {
    connect_device(shared, user_id, "load").await
}

/// The entry point for `user_id` (`RUN-uN`, `RUN-iN`): user N goes to entry point N mod
/// the number of entry points (`target`, then `gateways`), so pair partners u0, u1 sit on
/// different gateways of a cluster; ids without a number go to `target`.
pub(crate) fn entry_point<'a>(target: &'a str, gateways: &'a [String], user_id: &str) -> &'a str {
    let n = gateways.len() + 1;
    let digits = user_id.len() - user_id.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let index: usize = user_id[user_id.len() - digits..].parse().unwrap_or(0);
    match index % n {
        0 => target,
        k => &gateways[k - 1],
    }
}

/// Connects and authenticates one device; returns the socket after `auth_success`.
pub(crate) async fn connect_device(
    shared: &Shared,
    user_id: &str,
    device_id: &str,
) -> Result<Ws, String> {
    let base = entry_point(&shared.cfg.target, &shared.cfg.gateways, user_id).trim_end_matches('/');
    let hostport = base.trim_start_matches("ws://");
    let url = format!("{base}/ws");
    let stream = tcp(hostport, shared.cfg.source_ip).await?;
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(
        url,
        MaybeTlsStream::Plain(stream),
        Some(ws_config()),
    )
    .await
    .map_err(|e| e.to_string())?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let token = mint(
        &shared.cfg.secret,
        &user_id.into(),
        &device_id.into(),
        Millis(now_ms + 24 * 3_600_000),
    );
    let auth = json!({"type":"auth","payload":{"user_id":user_id,"device_id":device_id,"auth_token":token}});
    ws.send(Message::text(auth.to_string()))
        .await
        .map_err(|e| e.to_string())?;
    let first = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .map_err(|_| NO_AUTH_ANSWER.to_string())?;
    match first {
        Some(Ok(Message::Text(t))) if t.as_str().contains("\"auth_success\"") => Ok(ws),
        Some(Ok(Message::Text(t))) => Err(format!("{AUTH_FAILED}: {t}")),
        other => Err(format!("{AUTH_FAILED}: {other:?}")),
    }
}

async fn create_group(
    sink: &mut Sink,
    read: &mut SplitStream<Ws>,
    members: Vec<String>,
) -> Result<String, String> {
    let f = json!({"type":"group_create","payload":{"members":members}});
    sink.send(Message::text(f.to_string()))
        .await
        .map_err(|e| e.to_string())?;
    for _ in 0..100 {
        let m = tokio::time::timeout(Duration::from_secs(10), read.next())
            .await
            .map_err(|_| "no group_created within 10 s".to_string())?;
        if let Some(Ok(Message::Text(t))) = m {
            if let Ok(ServerFrame::GroupCreated { payload }) = serde_json::from_str(t.as_str()) {
                return Ok(payload.group_id.0);
            }
        }
    }
    Err("no group_created".into())
}

/// A connected sender's set-up: its group (created by the group's first member) or its
/// partner, a presence subscription with `--typing`, and a sync of any backlog.
async fn setup(
    shared: &Shared,
    index: usize,
    user_id: &str,
    sink: &mut Sink,
    read: &mut SplitStream<Ws>,
) -> Result<(Target, String), String> {
    let cfg = &shared.cfg;
    let target = if cfg.group_size >= 2 {
        let k = cfg.group_size;
        let base = index / k * k;
        let members: Vec<String> = (base..base + k)
            .map(|i| format!("{}-u{i}", cfg.run_id))
            .collect();
        // Each member creates its own group of the same members would duplicate groups; the
        // lowest index creates it and shares its id through the ledger's group table.
        let gid = if index == base {
            let gid = create_group(sink, read, members).await?;
            shared
                .groups
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(base, gid.clone());
            gid
        } else {
            let mut found = None;
            for _ in 0..200 {
                if let Some(g) = shared
                    .groups
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&base)
                    .cloned()
                {
                    found = Some(g);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            found.ok_or_else(|| "group was not created within 10 s".to_string())?
        };
        Target::Group(gid, (k - 1) as u32)
    } else {
        let partner = if index % 2 == 0 { index + 1 } else { index - 1 };
        Target::User(format!("{}-u{partner}", cfg.run_id))
    };
    let conv = match &target {
        Target::User(p) => {
            model_server::ids::ConversationId::direct(&user_id.into(), &p.as_str().into()).0
        }
        Target::Group(g, _) => format!("grp:{g}"),
    };
    if cfg.typing_per_sec > 0.0 {
        // Presence churn: follow the partner (or the group's first member).
        if let Target::User(p) = &target {
            let sub = json!({"type":"presence_subscribe","payload":{"user_ids":[p]}});
            sink.send(Message::text(sub.to_string()))
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    // Catch up on anything that arrived before this device connected (offline backlog).
    sink.send(Message::text(r#"{"type":"sync","payload":{}}"#))
        .await
        .map_err(|e| e.to_string())?;
    Ok((target, conv))
}

async fn on_start(shared: Arc<Shared>, user: &mut GooseUser) -> TransactionResult {
    let cfg = &shared.cfg;
    let index = shared.next_user.fetch_add(1, Ordering::Relaxed);
    let user_id = format!("{}-u{index}", cfg.run_id);
    let started = Instant::now();
    let ws = connect_ws(&shared, &user_id).await;
    let ws = match ws {
        Ok(ws) => {
            user.record_custom_request_duration(
                "WS",
                "connect",
                started.elapsed(),
                true,
                None,
                None,
            )
            .await?;
            ws
        }
        Err(e) => {
            shared.error(connect_error_kind(&e));
            user.record_custom_request_duration(
                "WS",
                "connect",
                started.elapsed(),
                false,
                None,
                Some(&e),
            )
            .await?;
            return Err(err(e));
        }
    };
    shared.connections.fetch_add(1, Ordering::Relaxed);
    let (mut sink, mut read) = ws.split();
    // Group, presence and sync set-up: a sender that fails here never sends, so it is an
    // error of the run (`setup`) and no longer counts as connected.
    let setup = setup(&shared, index, &user_id, &mut sink, &mut read).await;
    let (target, conv) = match setup {
        Ok(t) => t,
        Err(e) => {
            shared.error("setup");
            shared.connections.fetch_sub(1, Ordering::Relaxed);
            let _ = sink.close().await;
            return Err(err(e));
        }
    };
    let sink = Arc::new(Mutex::new(sink));
    let (tx, rx) = mpsc::unbounded_channel();
    let closing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handle = tokio::spawn(reader(
        shared.clone(),
        read,
        sink.clone(),
        tx.clone(),
        None,
        closing.clone(),
    ));
    // Senders heartbeat too (PROTOCOL.md §3): at low rates or in a long ramp a sender can
    // be silent for the server's 60 s idle timeout.
    tokio::spawn(heartbeat(sink.clone(), closing.clone()));
    shared.ready.fetch_add(1, Ordering::Relaxed);
    user.set_session_data(Device {
        reader: Arc::new(std::sync::Mutex::new(Some(handle))),
        tx,
        stormed: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        back_at: Arc::default(),
        conv,
        index,
        user_id,
        sink,
        closing,
        next_k: Arc::new(AtomicU64::new(0)),
        seen: Arc::new(Mutex::new(rx)),
        target,
    });
    Ok(())
}

/// Sends `heartbeat` every 30 s on `sink` until the device closes or a send fails
/// (bounded: a day of beats).
async fn heartbeat(sink: Arc<Mutex<Sink>>, closing: Arc<std::sync::atomic::AtomicBool>) {
    let period = Duration::from_secs(30);
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    for _ in 0..2880 {
        beat.tick().await;
        if closing.load(Ordering::Relaxed) {
            return;
        }
        let sent = sink
            .lock()
            .await
            .send(Message::text(r#"{"type":"heartbeat"}"#))
            .await;
        if sent.is_err() {
            return;
        }
    }
}

/// Reads frames until the socket closes: records acks and deliveries, acks deliveries.
async fn reader(
    shared: Arc<Shared>,
    mut read: SplitStream<Ws>,
    sink: Arc<Mutex<Sink>>,
    tx: mpsc::UnboundedSender<Seen>,
    dropped_at: Option<Instant>,
    closing: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut caught_up = dropped_at.is_none();
    let ended = loop {
        let m = match read.next().await {
            Some(Ok(m)) => m,
            Some(Err(_)) => break Some("socket error".to_string()),
            None => break None,
        };
        let t = match m {
            Message::Text(t) => t,
            Message::Close(c) => break Some(close_kind(c.as_ref())),
            _ => continue,
        };
        let now = Instant::now();
        let Ok(f) = serde_json::from_str::<ServerFrame>(t.as_str()) else {
            continue;
        };
        match f {
            ServerFrame::MessageAck {
                client_message_id, ..
            } => {
                if let Some(d) = shared.on_ack(client_message_id.as_str(), now) {
                    let _ = tx.send(Seen::Ack(d));
                }
            }
            ServerFrame::Message { payload } | ServerFrame::GroupMessage { payload } => {
                deliver(&shared, &sink, &tx, &payload, now).await;
            }
            ServerFrame::SyncPage { payload } => {
                for m in &payload.messages {
                    deliver(&shared, &sink, &tx, m, now).await;
                }
                if payload.has_more {
                    let next = json!({"type":"sync","payload":{"cursor":payload.next_cursor}});
                    let _ = sink
                        .lock()
                        .await
                        .send(Message::text(next.to_string()))
                        .await;
                } else if !caught_up {
                    // Backlog drained after a storm reconnect: time from drop to caught up.
                    caught_up = true;
                    if let Some(t0) = dropped_at {
                        shared.on_caught_up(now.saturating_duration_since(t0));
                    }
                }
            }
            ServerFrame::Error { payload } => {
                shared.error(format!("error {}", payload.code));
                let _ = tx.send(Seen::Error(format!("{} {}", payload.code, payload.message)));
            }
            _ => {}
        }
    };
    // A socket the server closed, or that broke, while this end still wanted it, is an
    // error of the run: counted by its close code.
    if !closing.load(Ordering::Relaxed) {
        let kind = ended.unwrap_or_else(|| "closed without a close frame".into());
        let _ = tx.send(Seen::Error(kind.clone()));
        shared.error(kind);
    }
    shared.connections.fetch_sub(1, Ordering::Relaxed);
}

/// The error kind of a close the server sent: `close CODE` (RFC 6455 §7.4).
fn close_kind(c: Option<&tokio_tungstenite::tungstenite::protocol::CloseFrame>) -> String {
    match c {
        Some(f) => format!("close {}", u16::from(f.code)),
        None => "close without a code".into(),
    }
}

/// The reconnect storm: drop this device's socket without a goodbye, back off with jitter
/// (0-1 s, spread by user), reconnect, sync the backlog, and carry on. Messages sent to it
/// meanwhile wait in the server's inbox; their latency includes the outage.
async fn storm_reconnect(shared: &Arc<Shared>, dev: &Device) -> TransactionResult {
    let dropped = Instant::now();
    if let Some(h) = dev.reader.lock().unwrap_or_else(|p| p.into_inner()).take() {
        h.abort();
    }
    {
        // Dropping both halves closes the TCP connection.
        let mut sink = dev.sink.lock().await;
        let _ = sink.close().await;
    }
    shared.connections.fetch_sub(1, Ordering::Relaxed);
    let backoff = Duration::from_millis((dev.index as u64 * 104_729) % 1000);
    tokio::time::sleep(backoff).await;
    let ws = match connect_ws(shared, &dev.user_id).await {
        Ok(ws) => ws,
        Err(e) => {
            shared.error(connect_error_kind(&e));
            return Err(err(e));
        }
    };
    shared.connections.fetch_add(1, Ordering::Relaxed);
    shared.on_reconnect(dropped.elapsed());
    let (mut sink, read) = ws.split();
    sink.send(Message::text(r#"{"type":"sync","payload":{}}"#))
        .await
        .map_err(|e| err(e.to_string()))?;
    *dev.sink.lock().await = sink;
    let handle = tokio::spawn(reader(
        shared.clone(),
        read,
        dev.sink.clone(),
        dev.tx.clone(),
        Some(dropped),
        dev.closing.clone(),
    ));
    *dev.reader.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
    Ok(())
}

/// A message reached this device: measure it and ack it.
async fn deliver(
    shared: &Shared,
    sink: &Mutex<Sink>,
    tx: &mpsc::UnboundedSender<Seen>,
    m: &model_server::protocol::DeliveredMessage,
    now: Instant,
) {
    // The generator's "ciphertext" is base64 of the client_message_id.
    let cmid = base64::engine::general_purpose::STANDARD
        .decode(&m.content)
        .ok()
        .and_then(|b| String::from_utf8(b).ok());
    if let Some(cmid) = cmid {
        if let Some((corrected, _raw)) = shared.on_deliver(&cmid, now, m.timestamp) {
            let _ = tx.send(Seen::Deliver(corrected));
        }
    }
    let ack = json!({"type":"delivery_ack","message_id":m.message_id});
    let _ = sink.lock().await.send(Message::text(ack.to_string())).await;
}

async fn send_next(shared: Arc<Shared>, user: &mut GooseUser) -> TransactionResult {
    let Some(dev) = user.get_session_data::<Device>().cloned() else {
        // This user never connected: do not spin (Goose calls us again at once).
        tokio::time::sleep(Duration::from_secs(1)).await;
        return Err(err("not connected"));
    };
    if let Some(at) = shared.cfg.storm_at {
        let selected = (dev.index * 7919 % 1000) as f64 / 1000.0 < shared.cfg.storm_fraction;
        if selected
            && Instant::now() >= shared.start + at
            && !dev.stormed.swap(true, Ordering::Relaxed)
        {
            storm_reconnect(&shared, &dev).await?;
            *dev.back_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
    }
    // Nothing is sent until every device is connected and the idle phase is over.
    let Some(phases) = shared.phases() else {
        tokio::time::sleep(Duration::from_millis(50)).await;
        return Ok(());
    };
    let interval = Duration::from_secs_f64(1.0 / shared.cfg.rate_per_user);
    // Open loop: send k is due at a fixed time whatever happened to send k-1. Devices are
    // spread over one interval (golden-ratio offsets), so sends do not come in lockstep.
    let offset = (dev.index as f64 * 0.618_033_988_75).fract();
    let first = phases.sends_from + interval.mul_f64(offset);
    let k = dev.next_k.fetch_add(1, Ordering::Relaxed);
    let intended = first + interval.mul_f64(k as f64);
    if shared.finished(intended) {
        // The measured phase is over: idle until Goose stops the user.
        tokio::time::sleep(GRACE).await;
        return Ok(());
    }
    let now = Instant::now();
    if intended > now {
        tokio::time::sleep(intended - now).await;
    }
    let cmid = format!("{}-{}-{k}", shared.cfg.run_id, dev.index);
    let content = base64::engine::general_purpose::STANDARD.encode(&cmid);
    let (frame, recipients) = match &dev.target {
        Target::User(to) => (
            json!({"type":"message","client_message_id":cmid,"payload":{"receiver_id":to,"content":content}}),
            1,
        ),
        Target::Group(g, n) => (
            json!({"type":"group_message","client_message_id":cmid,"payload":{"group_id":g,"content":content}}),
            *n,
        ),
    };
    let typing_every = if shared.cfg.typing_per_sec > 0.0 {
        (shared.cfg.rate_per_user / shared.cfg.typing_per_sec)
            .round()
            .max(1.0) as u64
    } else {
        0
    };
    if typing_every > 0 && k % typing_every == 0 {
        let t = json!({"type":"typing","payload":{"conversation_id":dev.conv}});
        let _ = dev
            .sink
            .lock()
            .await
            .send(Message::text(t.to_string()))
            .await;
    }
    let actual = Instant::now();
    let held_by_storm = dev
        .back_at
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .is_some_and(|b| intended < b);
    shared.on_send(cmid, intended, actual, recipients, !held_by_storm);
    let r = dev
        .sink
        .lock()
        .await
        .send(Message::text(frame.to_string()))
        .await;
    let took = actual.elapsed();
    match r {
        Ok(()) => {
            user.record_custom_request_duration("WS", "send", took, true, None, None)
                .await?
        }
        Err(e) => {
            shared.error("send");
            user.record_custom_request_duration(
                "WS",
                "send",
                took,
                false,
                None,
                Some(&e.to_string()),
            )
            .await?;
        }
    }
    // Hand what the reader saw to Goose's metrics.
    let seen: Vec<Seen> = {
        let mut rx = dev.seen.lock().await;
        let mut v = Vec::new();
        while let Ok(s) = rx.try_recv() {
            v.push(s);
            if v.len() >= 1024 {
                break;
            }
        }
        v
    };
    for s in seen {
        match s {
            Seen::Ack(d) => {
                user.record_custom_request_duration("WS", "ack", d, true, None, None)
                    .await?
            }
            Seen::Deliver(d) => {
                user.record_custom_request_duration("WS", "deliver", d, true, None, None)
                    .await?
            }
            Seen::Error(e) => {
                user.record_custom_request_duration(
                    "WS",
                    "server_error",
                    Duration::ZERO,
                    false,
                    None,
                    Some(&e),
                )
                .await?
            }
        }
    }
    let _ = &dev.user_id;
    Ok(())
}

/// Longest the end of a run waits for messages still in flight.
const DRAIN_LIMIT: Duration = Duration::from_secs(15);

async fn on_stop(shared: Arc<Shared>, user: &mut GooseUser) -> TransactionResult {
    // Keep the socket open until every in-flight send is acked and delivered (bounded), so a
    // slow machine does not turn late messages into missing ones.
    let deadline = Instant::now() + DRAIN_LIMIT;
    while Instant::now() < deadline
        && !shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if let Some(dev) = user.get_session_data::<Device>().cloned() {
        dev.closing.store(true, Ordering::Relaxed);
        let _ = dev.sink.lock().await.close().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::entry_point;

    #[test]
    fn pair_partners_connect_through_different_gateways() {
        let gws = vec!["ws://127.0.0.1:8083".to_string()];
        let t = "ws://127.0.0.1:8082";
        assert_eq!(entry_point(t, &gws, "r1-u0"), t);
        assert_eq!(entry_point(t, &gws, "r1-u1"), gws[0]);
        assert_eq!(entry_point(t, &gws, "r1-s1-u7"), gws[0]);
        assert_eq!(entry_point(t, &gws, "r1-i4"), t);
        assert_eq!(entry_point(t, &gws, "r1-probe"), t);
        assert_eq!(entry_point(t, &[], "r1-u1"), t);
    }
}

//! The gateway node: holds client WebSockets and hands their frames to the chat service
//! over one link, writing back what the chat service sends. It keeps no chat state: a
//! connection's session, queue and messages live in the chat service, so when the link
//! dies the gateway closes its clients (1012) and refuses new ones (503) until it has made
//! the link again; the devices reconnect (here or through another gateway) and sync.

use super::wire::{
    read_msg, write_msg, ToChat, ToGateway, LINK_VERSION, MAX_HELLO_BYTES, MAX_LINK_FRAME_BYTES,
};
use super::LinkConfig;
use crate::auth::{self, Secret};
use crate::ids::ConnId;
use crate::runtime::http::{self, Head};
use crate::runtime::ws::{self, Ending, Incoming};
use crate::runtime::{lock, Clock, FaultPoints, Listener, PendingGuard, RuntimeConfig};
use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, oneshot, watch};

/// How a gateway reaches the chat service: its link, and the HTTP port that serves the
/// media lane (which the gateway passes requests through to, byte for byte).
pub trait Connector: Send + Sync + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn connect(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
    /// A connection to the chat service's HTTP port (the media lane), if it has one.
    fn connect_media(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

/// The chat service at TCP addresses (the real runtime).
#[derive(Clone, Debug)]
pub struct TcpConnector {
    /// Its link address (`serve --role chat --link-listen`).
    pub link: SocketAddr,
    /// Its client/HTTP address, where the media lane is (`--listen`); `None`: media
    /// requests get 503.
    pub media: Option<SocketAddr>,
}

impl Connector for TcpConnector {
    type Stream = tokio::net::TcpStream;

    async fn connect(&self) -> io::Result<Self::Stream> {
        let s = tokio::net::TcpStream::connect(self.link).await?;
        s.set_nodelay(true)?;
        Ok(s)
    }

    async fn connect_media(&self) -> io::Result<Self::Stream> {
        let Some(addr) = self.media else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "no media address given (--chat-http)",
            ));
        };
        let s = tokio::net::TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(s)
    }
}

/// The chat service on a turmoil host (the simulator).
#[cfg(feature = "sim")]
#[derive(Clone, Debug)]
pub struct TurmoilConnector {
    pub host: String,
    /// Link port.
    pub port: u16,
    /// HTTP port of the media lane on the same host, if served.
    pub media_port: Option<u16>,
}

#[cfg(feature = "sim")]
impl Connector for TurmoilConnector {
    type Stream = turmoil::net::TcpStream;

    async fn connect(&self) -> io::Result<Self::Stream> {
        turmoil::net::TcpStream::connect((self.host.as_str(), self.port)).await
    }

    async fn connect_media(&self) -> io::Result<Self::Stream> {
        let Some(port) = self.media_port else {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "the chat host serves no media lane",
            ));
        };
        turmoil::net::TcpStream::connect((self.host.as_str(), port)).await
    }
}

/// What the chat service sends one connection.
enum Down {
    Frames(Vec<String>),
    Close {
        code: u16,
        reason: String,
        final_frames: Vec<String>,
    },
}

/// A connect waiting for its id, and the channel its frames will come on.
type Waiting = oneshot::Sender<Option<(ConnId, mpsc::Receiver<Down>)>>;

/// The link while it is up.
struct Up {
    tx: mpsc::Sender<ToChat>,
    max_frame: usize,
    routes: BTreeMap<ConnId, mpsc::Sender<Down>>,
    waiting: BTreeMap<u64, Waiting>,
}

/// One gateway node.
pub struct GatewayNode {
    cfg: RuntimeConfig,
    link: LinkConfig,
    clock: Clock,
    proof: String,
    faults: Option<Arc<dyn FaultPoints>>,
    up: Mutex<Option<Up>>,
    links_made: AtomicUsize,
    next_req: std::sync::atomic::AtomicU64,
    shutdown: watch::Sender<bool>,
    active: AtomicUsize,
    pending: Arc<AtomicUsize>,
}

impl GatewayNode {
    /// A gateway named `cfg.gateway` whose link proves itself with `secret`; `faults`
    /// (the simulator's) may freeze or slow its handlers.
    pub fn new(
        cfg: RuntimeConfig,
        link: LinkConfig,
        secret: &Secret,
        clock: Clock,
        faults: Option<Arc<dyn FaultPoints>>,
    ) -> Arc<Self> {
        let proof = auth::link_proof(secret, cfg.gateway.as_str());
        Arc::new(GatewayNode {
            cfg,
            link,
            clock,
            proof,
            faults,
            up: Mutex::new(None),
            links_made: AtomicUsize::new(0),
            next_req: Default::default(),
            shutdown: watch::channel(false).0,
            active: AtomicUsize::new(0),
            pending: Arc::default(),
        })
    }

    /// True while the link to the chat service is up.
    pub fn linked(&self) -> bool {
        lock(&self.up).is_some()
    }

    /// Client connections open on this gateway.
    pub fn connections(&self) -> usize {
        lock(&self.up).as_ref().map_or(0, |u| u.routes.len())
    }

    /// Links made to the chat service so far (1 plus the re-made ones).
    pub fn links_made(&self) -> usize {
        self.links_made.load(Ordering::Relaxed)
    }

    /// Asks the accept loop and the link to stop and every connection to close.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Serves clients on `listener` and keeps a link to the chat service through
    /// `connector`, until `shutdown`.
    pub async fn serve<L: Listener, C: Connector>(self: Arc<Self>, listener: L, connector: C) {
        let connector = Arc::new(connector);
        let me = self.clone();
        let c = connector.clone();
        self.cfg.spawner.spawn(async move { me.keep_link(c).await });
        let mut stop = self.shutdown.subscribe();
        // Ready only once linked: until then connections wait in the listener's backlog
        // (for at most the hello timeout) rather than being refused with 503.
        let ready_by = tokio::time::Instant::now() + self.link.hello_timeout;
        while self.links_made() == 0 && tokio::time::Instant::now() < ready_by && !*stop.borrow() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                r = listener.accept() => match r {
                    Ok((stream, _peer)) => {
                        let me = self.clone();
                        let c = connector.clone();
                        self.cfg.spawner.spawn(async move { me.stream(stream, c).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        // Every connection's channel closes with the link: each writes a 1012 close.
        *lock(&self.up) = None;
        for _ in 0..50 {
            if self.active.load(Ordering::Relaxed) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Makes the link, serves it until it dies, and makes it again, until shutdown.
    async fn keep_link<C: Connector>(self: Arc<Self>, connector: Arc<C>) {
        let mut stop = self.shutdown.subscribe();
        let mut wait = self.link.retry_initial;
        let mut failing = false;
        loop {
            if *stop.borrow() {
                break;
            }
            let failed =
                match tokio::time::timeout(self.link.hello_timeout, connector.connect()).await {
                    Ok(Ok(stream)) => {
                        if self.run_link(stream, &mut stop).await {
                            wait = self.link.retry_initial;
                        }
                        None
                    }
                    Ok(Err(e)) => Some(e.to_string()),
                    Err(_) => Some("timed out".to_string()),
                };
            // The first failure of a streak is a warning (an operator sees why clients get
            // 503); the retries after it are debug.
            match failed {
                Some(why) if !failing => {
                    tracing::warn!(gateway = %self.cfg.gateway, error = %why, "cannot reach the chat service; retrying");
                    failing = true;
                }
                Some(why) => tracing::debug!(error = %why, "chat service still unreachable"),
                None => failing = false,
            }
            // Dropping the link's state closes every connection's channel (1012 to each
            // client) and fails every connect waiting for an id.
            if lock(&self.up).take().is_some() {
                tracing::warn!(gateway = %self.cfg.gateway, "link to the chat service lost; clients closed");
            }
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    }

    /// Serves one link; true when the chat service welcomed it.
    async fn run_link<S>(&self, stream: S, stop: &mut watch::Receiver<bool>) -> bool
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (mut rd, wr) = tokio::io::split(stream);
        let mut wr = BufWriter::new(wr);
        let hello = ToChat::Hello {
            version: LINK_VERSION,
            gateway: self.cfg.gateway.clone(),
            region: self.cfg.region.clone(),
            proof: self.proof.clone(),
        };
        let greet = async {
            write_msg(&mut wr, &hello).await?;
            wr.flush().await?;
            read_msg::<_, ToGateway>(&mut rd, MAX_HELLO_BYTES).await
        };
        let max_frame = match tokio::time::timeout(self.link.hello_timeout, greet).await {
            Ok(Ok(Some(ToGateway::Welcome {
                version,
                max_transport_frame_bytes,
            }))) if version == LINK_VERSION => max_transport_frame_bytes,
            Ok(Ok(Some(ToGateway::Refused { reason }))) => {
                tracing::error!(gateway = %self.cfg.gateway, %reason, "the chat service refused this gateway");
                return false;
            }
            _ => return false,
        };
        let (tx, mut rx) = mpsc::channel::<ToChat>(self.link.queue);
        *lock(&self.up) = Some(Up {
            tx: tx.clone(),
            max_frame,
            routes: BTreeMap::new(),
            waiting: BTreeMap::new(),
        });
        self.links_made.fetch_add(1, Ordering::Relaxed);
        tracing::info!(gateway = %self.cfg.gateway, "linked to the chat service");
        let writer = async {
            while let Some(m) = rx.recv().await {
                write_msg(&mut wr, &m).await?;
                while let Ok(m) = rx.try_recv() {
                    write_msg(&mut wr, &m).await?;
                }
                wr.flush().await?;
            }
            Ok::<(), io::Error>(())
        };
        let reader = async {
            loop {
                let msg = tokio::time::timeout(
                    self.link.dead_after,
                    read_msg::<_, ToGateway>(&mut rd, MAX_LINK_FRAME_BYTES),
                )
                .await;
                match msg {
                    Ok(Ok(Some(m))) => self.on_msg(m),
                    Ok(Ok(None)) | Ok(Err(_)) => break,
                    Err(_) => {
                        tracing::info!(gateway = %self.cfg.gateway, "chat service silent; declaring the link dead");
                        break;
                    }
                }
            }
        };
        let pinger = async {
            let mut n = 0;
            loop {
                tokio::time::sleep(self.link.ping_interval).await;
                n += 1;
                if tx.send(ToChat::Ping { n }).await.is_err() {
                    break;
                }
            }
        };
        tokio::select! {
            biased;
            _ = stop.changed() => {}
            _ = writer => {}
            _ = reader => {}
            _ = pinger => {}
        }
        true
    }

    /// Routes one message from the chat service.
    fn on_msg(&self, msg: ToGateway) {
        let mut guard = lock(&self.up);
        let Some(up) = guard.as_mut() else {
            return;
        };
        match msg {
            ToGateway::Connected { req, conn } => {
                let Some(waiter) = up.waiting.remove(&req) else {
                    if let Some(c) = conn {
                        // The client gave up waiting: the chat service may forget it.
                        let _ = up.tx.try_send(ToChat::Gone { conn: c });
                    }
                    return;
                };
                match conn {
                    Some(c) => {
                        // Room for one batch and a close: the chat service sends no more
                        // before this connection's `written`.
                        let (dtx, drx) = mpsc::channel(4);
                        up.routes.insert(c, dtx);
                        if waiter.send(Some((c, drx))).is_err() {
                            up.routes.remove(&c);
                            let _ = up.tx.try_send(ToChat::Gone { conn: c });
                        }
                    }
                    None => {
                        let _ = waiter.send(None);
                    }
                }
            }
            ToGateway::Frames { conn, frames } => match up.routes.get(&conn) {
                Some(r) => {
                    if r.try_send(Down::Frames(frames)).is_err() {
                        // Never drop frames under a live socket: end the connection
                        // instead (its device reconnects and syncs what it missed).
                        up.routes.remove(&conn);
                    }
                }
                None => {
                    // A connection this gateway no longer has (its `gone` may still be on
                    // the way): say so, so the chat service's pump ends.
                    let _ = up.tx.try_send(ToChat::Gone { conn });
                }
            },
            ToGateway::Close {
                conn,
                code,
                reason,
                final_frames,
            } => {
                if let Some(r) = up.routes.remove(&conn) {
                    let _ = r.try_send(Down::Close {
                        code,
                        reason,
                        final_frames,
                    });
                }
            }
            ToGateway::Welcome { .. } | ToGateway::Refused { .. } | ToGateway::Pong { .. } => {}
        }
    }

    /// Asks the chat service for a connection id; `None` with no link, too many waiting,
    /// or no answer in time.
    async fn open(&self) -> Option<(ConnId, mpsc::Receiver<Down>, mpsc::Sender<ToChat>, usize)> {
        let (otx, orx) = oneshot::channel();
        let (tx, req, max_frame) = {
            let mut guard = lock(&self.up);
            let up = guard.as_mut()?;
            if up.waiting.len() >= self.cfg.max_pending_streams {
                return None;
            }
            // Numbered across links, so a late answer or clean-up of an old link's
            // request can never touch a newer link's.
            let req = self.next_req.fetch_add(1, Ordering::Relaxed);
            up.waiting.insert(req, otx);
            (up.tx.clone(), req, up.max_frame)
        };
        let asked = async {
            tx.send(ToChat::Connect { req }).await.ok()?;
            orx.await.ok().flatten()
        };
        let answer = tokio::time::timeout(self.link.hello_timeout, asked).await;
        if let Some(up) = lock(&self.up).as_mut() {
            if up.tx.same_channel(&tx) {
                up.waiting.remove(&req);
            }
        }
        let (conn, down) = answer.ok().flatten()?;
        Some((conn, down, tx, max_frame))
    }

    /// Routes one accepted stream to the WebSocket or HTTP side.
    async fn stream<St, C: Connector>(self: Arc<Self>, mut stream: St, connector: Arc<C>)
    where
        St: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Some(pending) = PendingGuard::take(&self.pending, self.cfg.max_pending_streams) else {
            return;
        };
        let head =
            match tokio::time::timeout(self.cfg.head_timeout, http::read_head(&mut stream)).await {
                Ok(Ok(h)) => h,
                Ok(Err(e)) => {
                    ws::refuse(&mut stream, 400, &e.to_string()).await;
                    return;
                }
                Err(_) => return,
            };
        if head.is_websocket() {
            drop(pending);
            self.websocket(stream, head).await;
        } else if head.path.starts_with("/v1/media") {
            self.media(stream, head, &*connector).await;
        } else {
            self.http(&mut stream, &head).await;
        }
    }

    /// Passes one media-lane request through to the chat service's HTTP port, byte for
    /// byte both ways (the chat service authenticates it and answers `connection: close`),
    /// bounded in time.
    async fn media<St, C>(&self, mut client: St, head: Head, connector: &C)
    where
        St: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        C: Connector,
    {
        let up = tokio::time::timeout(self.link.hello_timeout, connector.connect_media()).await;
        let Ok(Ok(mut up)) = up else {
            let why = "media lane unreachable from this gateway; retry";
            let _ = http::respond(
                &mut client,
                503,
                "application/json",
                &http::error_json(503, why),
            )
            .await;
            return;
        };
        let limit = self.cfg.body_timeout + self.cfg.write_timeout * 4;
        let _ = tokio::time::timeout(limit, async {
            up.write_all(&head.raw).await?;
            up.flush().await?;
            tokio::io::copy_bidirectional(&mut client, &mut up).await
        })
        .await;
    }

    /// Health and metrics of the gateway itself.
    async fn http<St: AsyncWrite + Unpin>(&self, stream: &mut St, head: &Head) {
        let path = head.path.split('?').next().unwrap_or("");
        let linked = self.linked();
        let (code, ctype, body) = match (head.method.as_str(), path) {
            ("GET", "/health") => (
                if linked { 200 } else { 503 },
                "application/json",
                format!(
                    r#"{{"status":"{}","role":"gateway","gateway":"{}","chat_link":"{}"}}"#,
                    if linked { "ok" } else { "unavailable" },
                    self.cfg.gateway,
                    if linked { "up" } else { "down" }
                )
                .into_bytes(),
            ),
            ("GET", "/metrics") => {
                let mut page = format!(
                    "# TYPE chatsim_gateway_connections gauge\nchatsim_gateway_connections {}\n\
                     # TYPE chatsim_gateway_chat_link_up gauge\nchatsim_gateway_chat_link_up {}\n\
                     # TYPE chatsim_gateway_links_made_total counter\nchatsim_gateway_links_made_total {}\n",
                    self.connections(),
                    u8::from(linked),
                    self.links_made()
                );
                // Named apart from the chat service's process figures, so a load report
                // never takes a gateway's page for the chat service's.
                if let Some((cpu_us, rss)) = crate::runtime::metrics::process_usage() {
                    page.push_str(&format!(
                        "# TYPE chatsim_gateway_process_cpu_microseconds_total counter\n\
                         chatsim_gateway_process_cpu_microseconds_total {cpu_us}\n\
                         # TYPE chatsim_gateway_process_resident_bytes gauge\n\
                         chatsim_gateway_process_resident_bytes {rss}\n"
                    ));
                }
                (200, "text/plain; version=0.0.4", page.into_bytes())
            }
            _ => (404, "application/json", http::error_json(404, "not found")),
        };
        let _ = http::respond(stream, code, ctype, &body).await;
    }

    /// Serves one client WebSocket until it closes.
    async fn websocket<St>(&self, mut stream: St, head: Head)
    where
        St: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        if !ws::endpoint_ok(&mut stream, &head).await {
            return;
        }
        if self.active.load(Ordering::Relaxed) >= self.cfg.max_connections {
            ws::refuse(&mut stream, 503, "too many connections").await;
            return;
        }
        let Some((conn, mut down, tx, max_frame)) = self.open().await else {
            ws::refuse(
                &mut stream,
                503,
                "chat service unreachable; try another gateway",
            )
            .await;
            return;
        };
        let _active = ws::ActiveGuard::new(&self.active);
        let Some(socket) =
            ws::handshake(stream, head, max_frame, self.cfg.ws_buffer_bytes, conn).await
        else {
            self.gone(conn, &tx);
            return;
        };
        let (mut sink, mut source) = socket.split();
        let write_timeout = self.cfg.write_timeout;
        let gateway = &self.cfg.gateway;
        let faults = self.faults.as_deref();
        let ending = {
            let writer = async {
                loop {
                    let next = down.recv().await;
                    if let Some(d) = faults.and_then(|f| f.hold(gateway)) {
                        tokio::time::sleep(d).await;
                    }
                    match next {
                        Some(Down::Frames(frames)) => {
                            if !ws::write_batch(&mut sink, frames, write_timeout, conn).await {
                                return Ending::Closed;
                            }
                            let _ = tx.send(ToChat::Written { conn }).await;
                        }
                        Some(Down::Close {
                            code,
                            reason,
                            final_frames,
                        }) => {
                            ws::write_close(&mut sink, final_frames, code, &reason, write_timeout)
                                .await;
                            return Ending::Closed;
                        }
                        None => {
                            let why = "chat service unreachable";
                            ws::write_close(&mut sink, Vec::new(), 1012, why, write_timeout).await;
                            return Ending::Closed;
                        }
                    }
                }
            };
            let reader = async {
                loop {
                    let msg = source.next().await;
                    if let Some(d) = faults.and_then(|f| f.hold(gateway)) {
                        tokio::time::sleep(d).await;
                    }
                    let up = match ws::classify(conn, msg) {
                        Incoming::Text(t) => ToChat::Text {
                            conn,
                            text: t.as_str().to_string(),
                        },
                        Incoming::Binary => ToChat::Binary { conn },
                        Incoming::Skip => continue,
                        Incoming::End(e) => return e,
                    };
                    if tx.send(up).await.is_err() {
                        // The link is gone: the writer sees its channel close and writes
                        // the 1012 close.
                        std::future::pending::<()>().await;
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
            Ending::TooBig => ws::close_too_big(sink, source, write_timeout).await,
            Ending::ClientClosed => ws::echo_close(&mut sink, write_timeout).await,
            Ending::Closed => {}
        }
        self.gone(conn, &tx);
    }

    /// Tells the chat service a client socket is gone and forgets its route. With the
    /// link's queue full, the notice waits for room (for as long as the link lives).
    fn gone(&self, conn: ConnId, tx: &mpsc::Sender<ToChat>) {
        if let Err(mpsc::error::TrySendError::Full(msg)) = tx.try_send(ToChat::Gone { conn }) {
            let tx = tx.clone();
            self.cfg.spawner.spawn(async move {
                let _ = tx.send(msg).await;
            });
        }
        if let Some(up) = lock(&self.up).as_mut() {
            if up.tx.same_channel(tx) {
                up.routes.remove(&conn);
            }
        }
    }

    /// Current time on this gateway's clock.
    pub fn now(&self) -> crate::ids::Millis {
        self.clock.now()
    }
}

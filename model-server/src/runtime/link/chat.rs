//! The chat service's end of the gateway links: accepts links from gateway nodes, checks
//! their proof, and serves each gateway's client connections from the hub as if they were
//! local, with one difference that matters: every frame crosses a network link that can
//! stall, drop or die, so a link that falls silent is declared dead and its gateway's
//! connections are closed in the core (their devices reconnect and sync from the inbox).
//!
//! Per connection a pump task does what a local connection task's writer does: waits for
//! the core's wake-up, drains a batch, sends it over the link and waits for the gateway's
//! `written` before draining the next one, so the core's bounded outbound queue, not the
//! link, is where a slow reader's backlog builds up and overflows.

use super::wire::{
    read_msg, write_msg, ToChat, ToGateway, BATCH_BYTES, LINK_VERSION, MAX_HELLO_BYTES,
    MAX_LINK_FRAME_BYTES,
};
use super::LinkConfig;
use crate::auth;
use crate::ids::{ConnId, GatewayId};
use crate::runtime::{lock, Clock, ConnSignal, Hub, Listener, Spawner};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, watch, Notify};

/// Serves gateway links for one hub.
pub struct ChatLinks {
    hub: Arc<Hub>,
    cfg: LinkConfig,
    clock: Clock,
    spawner: Spawner,
    /// The newest link of each gateway: an older link that dies later must not take the
    /// gateway's newer connections down with it.
    current: Mutex<BTreeMap<GatewayId, u64>>,
    next_link: AtomicU64,
    links: AtomicUsize,
    /// Links still in their `hello` (unauthenticated): few at a time.
    handshakes: AtomicUsize,
    /// Connection pumps running.
    pumps: Arc<AtomicUsize>,
    /// Names no link may take: the chat service's own in-process gateways.
    reserved: Mutex<std::collections::BTreeSet<GatewayId>>,
}

/// Most links in their `hello` at once (unauthenticated peers cannot hold more slots).
const MAX_HANDSHAKES: usize = 16;

/// A connection's pump: the gateway's `written` and the end of the connection.
#[derive(Default)]
struct PumpCtl {
    written: Notify,
    gone: AtomicBool,
}

/// One live link: what its reader and its connections' pumps share.
struct Link {
    gateway: GatewayId,
    tx: mpsc::Sender<ToGateway>,
    mine: Mutex<BTreeMap<ConnId, Arc<PumpCtl>>>,
    dead: watch::Receiver<bool>,
}

impl ChatLinks {
    pub fn new(hub: Arc<Hub>, cfg: LinkConfig, clock: Clock, spawner: Spawner) -> Arc<Self> {
        Arc::new(ChatLinks {
            hub,
            cfg,
            clock,
            spawner,
            current: Mutex::new(BTreeMap::new()),
            next_link: AtomicU64::new(1),
            links: AtomicUsize::new(0),
            handshakes: AtomicUsize::new(0),
            pumps: Arc::default(),
            reserved: Mutex::new(Default::default()),
        })
    }

    /// Refuses links that name `gateway` (a gateway of this process's own, e.g. the one
    /// its direct clients connect through).
    pub fn reserve(&self, gateway: GatewayId) {
        lock(&self.reserved).insert(gateway);
    }

    /// Connection pumps running (one per connection of a live link).
    pub fn pumps(&self) -> usize {
        self.pumps.load(Ordering::Relaxed)
    }

    /// Gateways with a live link now.
    pub fn linked(&self) -> Vec<GatewayId> {
        lock(&self.current).keys().cloned().collect()
    }

    /// Accepts links on `listener` until `stop` turns true.
    pub async fn serve<L: Listener>(self: Arc<Self>, listener: L, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                r = listener.accept() => match r {
                    Ok((stream, peer)) => {
                        // Counted here, before the task runs, so the bounds cannot be
                        // overshot; the task gives both back.
                        if self.links.fetch_add(1, Ordering::AcqRel) >= self.cfg.max_links {
                            self.links.fetch_sub(1, Ordering::AcqRel);
                            tracing::warn!(%peer, "too many gateway links; refusing");
                            continue;
                        }
                        if self.handshakes.fetch_add(1, Ordering::AcqRel) >= MAX_HANDSHAKES {
                            self.handshakes.fetch_sub(1, Ordering::AcqRel);
                            self.links.fetch_sub(1, Ordering::AcqRel);
                            tracing::warn!(%peer, "too many links saying hello; refusing");
                            continue;
                        }
                        let me = self.clone();
                        self.spawner.spawn(async move { me.link(stream).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "link accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
    }

    /// Serves one link from `hello` to its end.
    async fn link<S>(self: Arc<Self>, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // Both counted at accept (`serve`); given back here.
        let _count = Count(&self.links);
        let handshake = Count(&self.handshakes);
        let (mut rd, wr) = tokio::io::split(stream);
        let mut wr = BufWriter::new(wr);
        let hello = tokio::time::timeout(
            self.cfg.hello_timeout,
            read_msg::<_, ToChat>(&mut rd, MAX_HELLO_BYTES),
        );
        let (gateway, region) = match hello.await {
            Ok(Ok(Some(ToChat::Hello {
                version,
                gateway,
                region,
                proof,
            }))) => {
                let refusal = if version != LINK_VERSION {
                    Some(format!(
                        "link version {version}; this chat service speaks {LINK_VERSION}"
                    ))
                } else if let Err(e) = auth::verify_link_proof(
                    &self.hub.with_core(|c| c.secret().clone()),
                    gateway.as_str(),
                    &proof,
                ) {
                    Some(format!("gateway proof refused: {e}"))
                } else {
                    None
                };
                if let Some(reason) = refusal {
                    tracing::warn!(%gateway, %reason, "gateway link refused");
                    let _ = write_msg(&mut wr, &ToGateway::Refused { reason }).await;
                    let _ = wr.flush().await;
                    return;
                }
                (gateway, region)
            }
            _ => {
                tracing::debug!("a link did not say hello in time; closing");
                return;
            }
        };
        drop(handshake);
        let epoch = self.next_link.fetch_add(1, Ordering::Relaxed);
        // Registered, and the gateway brought up in the core, under the `current` lock: an
        // older link's clean-up (which takes it too) cannot come in between.
        let refusal = {
            let mut cur = lock(&self.current);
            if lock(&self.reserved).contains(&gateway) {
                Some(format!(
                    "{gateway} is a gateway of the chat service itself; choose another name"
                ))
            } else if cur.contains_key(&gateway) {
                // Two nodes under one name would take each other's connections down; a
                // restarted gateway gets in once its old link is declared dead (4 s).
                Some(format!("a gateway named {gateway} is linked already"))
            } else {
                cur.insert(gateway.clone(), epoch);
                let now = self.hub.now_on(&self.clock);
                // Connections an older link of this gateway had are gone with that link.
                self.hub.act(|c| {
                    let fx = c.gateway_down(&gateway, now);
                    c.add_gateway(gateway.clone(), region.clone());
                    fx
                });
                None
            }
        };
        if let Some(reason) = refusal {
            tracing::warn!(%gateway, %reason, "gateway link refused");
            let _ = write_msg(&mut wr, &ToGateway::Refused { reason }).await;
            let _ = wr.flush().await;
            return;
        }
        tracing::info!(%gateway, %region, "gateway linked");
        let max = self.hub.with_core(|c| c.limits().max_transport_frame_bytes);
        let (tx, mut rx) = mpsc::channel::<ToGateway>(self.cfg.queue);
        let (dead_tx, dead) = watch::channel(false);
        let link = Arc::new(Link {
            gateway: gateway.clone(),
            tx,
            mine: Mutex::new(BTreeMap::new()),
            dead,
        });
        let _ = link.tx.try_send(ToGateway::Welcome {
            version: LINK_VERSION,
            max_transport_frame_bytes: max,
        });
        let writer = async {
            while let Some(m) = rx.recv().await {
                write_msg(&mut wr, &m).await?;
                while let Ok(m) = rx.try_recv() {
                    write_msg(&mut wr, &m).await?;
                }
                wr.flush().await?;
            }
            Ok::<(), std::io::Error>(())
        };
        let reader = async {
            loop {
                let msg = tokio::time::timeout(
                    self.cfg.dead_after,
                    read_msg::<_, ToChat>(&mut rd, MAX_LINK_FRAME_BYTES),
                )
                .await;
                match msg {
                    Ok(Ok(Some(m))) => {
                        if !self.on_msg(&link, m).await {
                            break;
                        }
                    }
                    Ok(Ok(None)) => break,
                    Ok(Err(e)) => {
                        tracing::info!(%gateway, error = %e, "gateway link failed");
                        break;
                    }
                    Err(_) => {
                        tracing::info!(%gateway, "gateway link silent; declaring it dead");
                        break;
                    }
                }
            }
        };
        tokio::select! {
            biased;
            _ = writer => {}
            _ = reader => {}
        }
        let _ = dead_tx.send(true);
        let conns: Vec<ConnId> = std::mem::take(&mut *lock(&link.mine)).into_keys().collect();
        {
            let mut signals = lock(&self.hub.conns);
            for c in &conns {
                signals.remove(c);
            }
        }
        // Under the `current` lock (see above): a new link of this gateway cannot register
        // between our removal and our `gateway_down`, which would take its connections.
        let newest = {
            let mut cur = lock(&self.current);
            let newest = cur.get(&gateway) == Some(&epoch);
            if newest {
                cur.remove(&gateway);
                let now = self.hub.now_on(&self.clock);
                self.hub.act(|c| c.gateway_down(&gateway, now));
            }
            newest
        };
        if newest {
            tracing::info!(%gateway, connections = conns.len(), "gateway link lost; its connections are closed");
        }
    }

    /// Handles one message from a gateway; false ends the link.
    async fn on_msg(&self, link: &Arc<Link>, msg: ToChat) -> bool {
        let now = self.hub.now_on(&self.clock);
        match msg {
            ToChat::Hello { .. } => return false,
            ToChat::Connect { req } => {
                let conn = if lock(&link.mine).len() < self.cfg.max_conns_per_link {
                    self.hub.with_core(|c| c.connect(&link.gateway, now))
                } else {
                    None
                };
                if let Some(conn) = conn {
                    let sig = self.hub.watch_conn(conn);
                    let ctl = Arc::new(PumpCtl::default());
                    lock(&link.mine).insert(conn, ctl.clone());
                    self.pumps.fetch_add(1, Ordering::Relaxed);
                    let pump = Pump {
                        pumps: self.pumps.clone(),
                        hub: self.hub.clone(),
                        link: link.clone(),
                        conn,
                        sig,
                        ctl,
                        batch: self.cfg.write_batch,
                        settle: self.cfg.settle_timeout,
                    };
                    self.spawner.spawn(pump.run());
                }
                return self.reply(link, ToGateway::Connected { req, conn }).await;
            }
            ToChat::Text { conn, text } => {
                if lock(&link.mine).contains_key(&conn) {
                    self.hub.client_text(&link.gateway, conn, &text, now);
                }
            }
            ToChat::Binary { conn } => {
                if lock(&link.mine).contains_key(&conn) {
                    self.hub.client_binary(conn, now);
                }
            }
            ToChat::Written { conn } => {
                if let Some(ctl) = lock(&link.mine).get(&conn) {
                    ctl.written.notify_one();
                }
            }
            ToChat::Gone { conn } => {
                let ctl = lock(&link.mine).remove(&conn);
                if let Some(ctl) = ctl {
                    ctl.gone.store(true, Ordering::Relaxed);
                    ctl.written.notify_one();
                    self.hub.forget(conn, now);
                }
            }
            ToChat::Ping { n } => return self.reply(link, ToGateway::Pong { n }).await,
        }
        true
    }

    /// Queues an answer on the link; false when the link is dead or stuck.
    async fn reply(&self, link: &Link, msg: ToGateway) -> bool {
        matches!(
            tokio::time::timeout(self.cfg.dead_after, link.tx.send(msg)).await,
            Ok(Ok(()))
        )
    }
}

/// Decrements a counter when dropped.
struct Count<'a>(&'a AtomicUsize);

impl Drop for Count<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Moves one connection's queued frames from the core to its gateway, a batch at a time.
struct Pump {
    /// The running count, given back when the pump ends.
    pumps: Arc<AtomicUsize>,
    hub: Arc<Hub>,
    link: Arc<Link>,
    conn: ConnId,
    sig: Arc<ConnSignal>,
    ctl: Arc<PumpCtl>,
    batch: usize,
    settle: Duration,
}

impl Pump {
    async fn run(self) {
        let _running = Count(&self.pumps);
        let mut dead = self.link.dead.clone();
        let conn = self.conn;
        loop {
            tokio::select! {
                biased;
                _ = dead.changed() => return,
                _ = self.sig.notify.notified() => {}
                // `gone` wakes an idle pump too (it notifies `written`): it must end.
                _ = self.ctl.written.notified() => {}
            }
            if self.ctl.gone.load(Ordering::Relaxed) {
                return;
            }
            let close = lock(&self.sig.close).take();
            if let Some(close) = close {
                let final_frames = self.hub.closing_frames(&close, self.settle).await;
                let msg = ToGateway::Close {
                    conn,
                    code: close.reason.ws_code(),
                    reason: close.reason.as_str().into(),
                    final_frames,
                };
                tokio::select! {
                    biased;
                    _ = dead.changed() => {}
                    _ = self.link.tx.send(msg) => {}
                }
                lock(&self.link.mine).remove(&conn);
                return;
            }
            let frames = lock(&self.hub.core).drain(conn, self.batch);
            if frames.len() == self.batch {
                self.sig.notify.notify_one(); // more queued: come back after this batch
            }
            if frames.is_empty() {
                continue;
            }
            let faults = self.hub.faults();
            // One `frames` message of about `BATCH_BYTES` at most at a time (at least one
            // frame each), each answered by `written` before the next.
            let mut rest = frames.into_iter().peekable();
            while rest.peek().is_some() {
                let mut chunk = Vec::new();
                let mut bytes = 0;
                while let Some(f) =
                    rest.next_if(|f| chunk.is_empty() || bytes + f.len() <= BATCH_BYTES)
                {
                    bytes += f.len();
                    chunk.push(f);
                }
                let written = if faults.is_some() {
                    chunk.clone()
                } else {
                    Vec::new()
                };
                let sent = tokio::select! {
                    biased;
                    _ = dead.changed() => false,
                    r = self.link.tx.send(ToGateway::Frames { conn, frames: chunk }) => r.is_ok(),
                };
                if !sent {
                    return;
                }
                tokio::select! {
                    biased;
                    _ = dead.changed() => return,
                    _ = self.ctl.written.notified() => {}
                }
                if self.ctl.gone.load(Ordering::Relaxed) {
                    return;
                }
                if let Some(f) = &faults {
                    if f.after_write(&self.link.gateway, &written) {
                        f.crash(&self.hub);
                    }
                }
            }
        }
    }
}

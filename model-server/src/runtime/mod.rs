//! The runtime shell: serves a `ChatCore` over WebSocket (tokio-tungstenite) and HTTP on
//! one port. It owns sockets, the clock and tasks; every decision is the core's.
//!
//! The accept loop and connection handling are generic over `Listener`, so the simulator
//! runs this same code on turmoil's network (feature `sim`), spawning with `spawn_local`
//! there to keep task order deterministic.

pub mod faults;
pub mod http;
pub mod link;
pub mod listener;
mod metrics;
mod routes;
mod ws;

pub use faults::FaultPoints;
pub use listener::Listener;

use crate::auth::Secret;
use crate::config::Limits;
use crate::core::{ChatCore, Close, Effects, PushRequest};
use crate::ids::{ConnId, GatewayId, Millis, RegionId};
use crate::store::{KvStore, StoreError, Syncer};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// Where `now` comes from: a fixed epoch plus tokio's monotonic time, which turmoil
/// simulates. The real runtime takes the epoch from the wall clock once at start.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    epoch_ms: u64,
    start: tokio::time::Instant,
}

impl Clock {
    /// A clock reading `epoch_ms` now and advancing with tokio time.
    pub fn starting_at(epoch_ms: u64) -> Self {
        Clock {
            epoch_ms,
            start: tokio::time::Instant::now(),
        }
    }

    /// The wall clock (real runtime only).
    pub fn wall() -> Self {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        Self::starting_at(ms)
    }

    /// Current time.
    pub fn now(&self) -> Millis {
        Millis(self.epoch_ms + self.start.elapsed().as_millis() as u64)
    }
}

/// How the server starts tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spawner {
    /// `tokio::spawn` (multi-threaded real runtime).
    Tokio,
    /// `tokio::task::spawn_local` (turmoil hosts: deterministic across crashes).
    Local,
}

impl Spawner {
    fn spawn<F: Future<Output = ()> + Send + 'static>(self, f: F) {
        match self {
            Spawner::Tokio => {
                tokio::spawn(f);
            }
            Spawner::Local => {
                tokio::task::spawn_local(f);
            }
        }
    }
}

/// Settings of the runtime shell (the model's own bounds are in `Limits`).
#[derive(Clone, Debug)]
pub struct RuntimeConfig {
    pub gateway: GatewayId,
    pub region: RegionId,
    /// Most simultaneous connections; more are refused at accept.
    pub max_connections: usize,
    /// How often the core's timers run.
    pub tick_interval: Duration,
    /// Longest a write to one socket may take before the connection is dropped.
    pub write_timeout: Duration,
    /// Longest a client may take to send its HTTP request head.
    pub head_timeout: Duration,
    /// Longest a client may take to send an HTTP request body (a media chunk), after its
    /// head; answered 408.
    pub body_timeout: Duration,
    /// Most streams of this gateway that are not (yet) WebSockets: reading a request head
    /// or serving HTTP. More are closed at accept, so idle or slow sockets cannot pile up
    /// outside `max_connections`.
    pub max_pending_streams: usize,
    /// Most frames written per wake-up of one connection (fairness).
    pub write_batch: usize,
    /// WebSocket read/write buffer size (tungstenite's default 128 KiB is costly at scale).
    pub ws_buffer_bytes: usize,
    pub spawner: Spawner,
    /// Run the core's timers from this gateway (one gateway per hub should).
    pub run_timers: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            gateway: GatewayId::from("gw-1"),
            region: RegionId::from("region-1"),
            max_connections: 100_000,
            tick_interval: Duration::from_millis(250),
            write_timeout: Duration::from_secs(10),
            head_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            max_pending_streams: 10_000,
            write_batch: 64,
            ws_buffer_bytes: 8 * 1024,
            spawner: Spawner::Tokio,
            run_timers: true,
        }
    }
}

/// Per-connection signals from the core's effects to the connection task.
#[derive(Default)]
struct ConnSignal {
    notify: Notify,
    close: Mutex<Option<Close>>,
}

type PushSink = Box<dyn Fn(&PushRequest) + Send + Sync>;

/// The chat service shared by every gateway: the core behind a lock, and the signals to
/// each connection task of every gateway attached to it. The real server has one hub and
/// one gateway; the simulator attaches several gateways (hosts) to one hub.
pub struct Hub {
    core: Mutex<ChatCore<Box<dyn KvStore>>>,
    conns: Mutex<BTreeMap<ConnId, Arc<ConnSignal>>>,
    push_sink: Option<PushSink>,
    pushes: std::sync::atomic::AtomicU64,
    watch_queues: std::sync::atomic::AtomicBool,
    fullest: Mutex<(u64, u64)>,
    /// Fault points the simulator armed (never set in the real server).
    faults: std::sync::OnceLock<Arc<dyn FaultPoints>>,
    /// Group commit: the store's sync handle (`None`: every commit is durable already).
    /// Replaced with the store by `restart_core`.
    syncer: Mutex<Option<Arc<dyn Syncer>>>,
    /// (restarts of the core, commits known durable): what waiters for a sync watch.
    durable: Mark,
    /// Set when a core call may have committed: the group-commit loop wakes to sync.
    sync_wanted: Notify,
}

/// (incarnation, durable commits) with its waiters woken in the order they began waiting.
/// Not a `tokio::sync::watch`: a watch wakes its receivers in an order drawn from tokio's
/// per-process random source, so two simulation runs of one seed diverged wherever
/// several connections waited for the same group-commit round.
#[derive(Default)]
struct Mark {
    state: Mutex<(u64, u64)>,
    changed: Notify,
}

impl Mark {
    fn get(&self) -> (u64, u64) {
        *lock(&self.state)
    }

    /// Applies `f`; wakes every waiter when it says it changed something.
    fn update(&self, f: impl FnOnce(&mut (u64, u64)) -> bool) {
        let changed = f(&mut lock(&self.state));
        if changed {
            self.changed.notify_waiters();
        }
    }

    /// Waits until `pred` holds; returns the state then.
    async fn wait_for(&self, pred: impl Fn(&(u64, u64)) -> bool) -> (u64, u64) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = self.get();
            if pred(&now) {
                return now;
            }
            notified.await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The core is only mutated through whole calls; a panic mid-call is a bug that tests
    // catch, and continuing with the state is better than taking the server down.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Hub {
    /// A hub over `store`; `push_sink` receives every push request (the simulator's push
    /// service; the real server only counts and logs them).
    pub fn new(
        limits: Limits,
        secret: Secret,
        store: Box<dyn KvStore>,
        push_sink: Option<PushSink>,
    ) -> Arc<Self> {
        let syncer = store.syncer();
        let mut core = ChatCore::new(limits, secret, store);
        if syncer.is_some() {
            core.hold_until_synced();
        }
        Arc::new(Hub {
            core: Mutex::new(core),
            conns: Mutex::new(BTreeMap::new()),
            push_sink,
            pushes: Default::default(),
            watch_queues: Default::default(),
            fullest: Mutex::new((0, 0)),
            faults: std::sync::OnceLock::new(),
            syncer: Mutex::new(syncer),
            durable: Mark::default(),
            sync_wanted: Notify::new(),
        })
    }

    /// True when the store groups commits and answers wait for a sync (see
    /// `crate::store::Syncer`).
    pub fn grouping(&self) -> bool {
        lock(&self.syncer).is_some()
    }

    /// One group-commit round: syncs the store, then lets out every frame that waited for
    /// the commits made before the round began. `in_thread` runs the fsync on tokio's
    /// blocking pool (the real runtime) instead of inline (the simulator's disk, which
    /// passes `fsync_time` to stand for how long the fsync takes). Returns whether there
    /// was anything to sync.
    pub async fn sync_round(
        &self,
        in_thread: bool,
        fsync_time: Duration,
    ) -> Result<bool, StoreError> {
        // The target, the core it belongs to and that core's syncer, read together.
        let (target, incarnation, syncer) = {
            let c = lock(&self.core);
            let Some(syncer) = lock(&self.syncer).clone() else {
                return Ok(false);
            };
            if c.commits() <= c.durable_commits() {
                return Ok(false);
            }
            (c.commits(), c.incarnation(), syncer)
        };
        if !fsync_time.is_zero() {
            tokio::time::sleep(fsync_time).await;
            if self.durable.get().0 != incarnation {
                // The process "died" during the fsync: its round is lost with it.
                return Ok(true);
            }
        }
        if in_thread {
            tokio::task::spawn_blocking(move || syncer.sync())
                .await
                .map_err(|e| StoreError::Backend(format!("sync task: {e}")))??;
        } else {
            syncer.sync()?;
        }
        let fx = {
            let mut c = lock(&self.core);
            if c.incarnation() != incarnation {
                // The core was replaced meanwhile: its own numbering is durable already.
                return Ok(true);
            }
            c.released(target)
        };
        self.durable.update(|d| {
            let newer = d.0 == incarnation && target > d.1;
            if newer {
                d.1 = target;
            }
            newer
        });
        self.apply(fx);
        Ok(true)
    }

    /// Runs group-commit rounds whenever a core call may have committed, until `stop`.
    /// A failed sync releases nothing (every frame waiting stays held) and is retried.
    pub async fn run_group_commit(&self, mut stop: watch::Receiver<bool>, in_thread: bool) {
        if !self.grouping() {
            return;
        }
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = self.sync_wanted.notified() => {}
            }
            if let Err(e) = self.sync_round(in_thread, Duration::ZERO).await {
                tracing::error!(error = %e, "group commit: sync failed; holding answers and retrying");
                tokio::time::sleep(Duration::from_millis(50)).await;
                self.sync_wanted.notify_one();
            }
        }
    }

    /// Returns once a core call may have committed since the last round began (for a
    /// group-commit loop of the simulator's own, which paces and pauses its rounds).
    pub async fn commit_wanted(&self) {
        self.sync_wanted.notified().await;
    }

    /// Waits (up to `timeout`) until the first `after` commits of core `incarnation` are
    /// durable; false if they did not become so in time or that core was replaced (its
    /// unsynced commits may be lost).
    pub async fn settled(&self, incarnation: u64, after: u64, timeout: Duration) -> bool {
        if !self.grouping() {
            return true;
        }
        {
            let c = lock(&self.core);
            if c.incarnation() != incarnation {
                return false;
            }
            if c.durable_commits() >= after {
                return true;
            }
        }
        self.sync_wanted.notify_one();
        let wait = async {
            self.durable
                .wait_for(|d| d.0 != incarnation || d.1 >= after)
                .await
                .0
                == incarnation
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(false)
    }

    /// `settled` for every commit made so far (an HTTP answer about what it just wrote).
    pub async fn settled_now(&self, timeout: Duration) -> bool {
        let (incarnation, after) = {
            let c = lock(&self.core);
            (c.incarnation(), c.commits())
        };
        self.settled(incarnation, after, timeout).await
    }

    /// Runs `f` with the core locked (tests, metrics, the simulator's faults and oracle).
    /// Effects `f` returns are carried out.
    pub fn with_core<R>(&self, f: impl FnOnce(&mut ChatCore<Box<dyn KvStore>>) -> R) -> R {
        f(&mut lock(&self.core))
    }

    /// Calls into the core and carries out the effects it returns.
    pub fn act(&self, f: impl FnOnce(&mut ChatCore<Box<dyn KvStore>>) -> Effects) {
        let fx = f(&mut lock(&self.core));
        self.apply(fx);
    }

    /// Replaces the core by a fresh one over `store` (a chat-service crash and restart:
    /// volatile state is lost, the store keeps what it committed). Every connection task
    /// is told to close.
    pub fn restart_core(&self, limits: Limits, secret: Secret, store: Box<dyn KvStore>) {
        // One lock from reading the old core to swapping in the new one: a connect in
        // between would take an id the new core hands out again.
        let mut guard = lock(&self.core);
        let (gateways, last_conn) = (guard.gateways(), guard.last_conn_id());
        let syncer = store.syncer();
        let mut core = ChatCore::new(limits, secret, store);
        if syncer.is_some() {
            core.hold_until_synced();
        }
        *lock(&self.syncer) = syncer;
        // What the old core committed is durable or lost now; a sync round begun before
        // this restart must not release the new core's frames (see `sync_round`).
        core.continue_commits_after(guard.commits());
        let incarnation = guard.incarnation() + 1;
        core.set_incarnation(incarnation);
        let commits = core.commits();
        self.durable.update(|d| {
            *d = (incarnation, commits);
            true
        });
        // A connection task of the old core may still read a frame before it sees its
        // close: its id must not name a new connection (one user acting as another).
        core.continue_conn_ids_after(last_conn);
        for (gw, region, up) in gateways {
            core.add_gateway(gw.clone(), region);
            if !up {
                let _ = core.gateway_down(&gw, Millis(0));
            }
        }
        *guard = core;
        drop(guard);
        let conns = std::mem::take(&mut *lock(&self.conns));
        for sig in conns.values() {
            *lock(&sig.close) = Some(Close {
                conn: ConnId(0),
                reason: crate::core::CloseReason::GatewayDown,
                final_frames: Vec::new(),
                after: 0,
                incarnation: 0,
            });
            sig.notify.notify_one();
        }
    }

    /// Arms fault points (the simulator's BUGGIFY; once per hub, later calls are ignored).
    pub fn arm_faults(&self, faults: Arc<dyn FaultPoints>) {
        let _ = self.faults.set(faults);
    }

    /// The armed fault points, if any.
    pub(crate) fn faults(&self) -> Option<&Arc<dyn FaultPoints>> {
        self.faults.get()
    }

    /// True when a call into the core panicked while holding its lock (the simulator
    /// fails the run; the real server carries on with the state it has).
    pub fn poisoned(&self) -> bool {
        self.core.is_poisoned()
    }

    /// Push requests carried out so far.
    pub fn pushes(&self) -> u64 {
        self.pushes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Starts measuring, after every core call, the outbound queues it added frames to
    /// (the simulator's oracle checks the bounds against what was really buffered, not
    /// against the core's own high-water counter). Off by default: one branch per call.
    pub fn watch_queues(&self) {
        self.watch_queues
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The fullest queue seen since `watch_queues`: (frames, bytes).
    pub fn fullest_queue(&self) -> (u64, u64) {
        *lock(&self.fullest)
    }

    /// Current time by `clock`, stepped by an armed clock fault.
    pub fn now_on(&self, clock: &Clock) -> Millis {
        let now = clock.now();
        match self.faults() {
            Some(f) => Millis(now.0.saturating_add_signed(f.clock_offset_ms())),
            None => now,
        }
    }

    /// One text frame a client sent on `conn` through `gateway`, with the after-commit
    /// fault point: when it fires, the chat service crashes before the ack and fan-out
    /// the frame queued are carried out.
    pub(crate) fn client_text(&self, gateway: &GatewayId, conn: ConnId, text: &str, now: Millis) {
        let mut core = lock(&self.core);
        let stored = core.stats().messages_stored;
        let fx = core.on_text(conn, text, now);
        let committed = core.stats().messages_stored > stored;
        drop(core);
        if let Some(f) = self.faults().filter(|_| committed) {
            if f.after_commit(gateway) {
                // The ack and the fan-out die with the process.
                f.crash(self);
                return;
            }
        }
        self.apply(fx);
    }

    /// A binary frame on `conn` (not part of the client protocol).
    pub(crate) fn client_binary(&self, conn: ConnId, now: Millis) {
        let fx = lock(&self.core).on_binary(conn, now);
        self.apply(fx);
    }

    /// Forgets a connection whose transport is gone, in the hub and the core.
    pub(crate) fn forget(&self, conn: ConnId, now: Millis) {
        lock(&self.conns).remove(&conn);
        let fx = lock(&self.core).disconnected(conn, now);
        self.apply(fx);
    }

    /// Registers the signal a connection's writer waits on.
    fn watch_conn(&self, conn: ConnId) -> Arc<ConnSignal> {
        let sig = Arc::new(ConnSignal::default());
        lock(&self.conns).insert(conn, sig.clone());
        sig
    }

    /// The frames a close may still write: none when, under group commit, the commits
    /// they tell of did not become durable within `timeout`.
    async fn closing_frames(&self, close: &Close, timeout: Duration) -> Vec<String> {
        if close.final_frames.is_empty()
            || self.settled(close.incarnation, close.after, timeout).await
        {
            close.final_frames.clone()
        } else {
            Vec::new()
        }
    }

    /// Carries out what the core asked for.
    fn apply(&self, fx: Effects) {
        if self.grouping() {
            self.sync_wanted.notify_one();
        }
        if self.watch_queues.load(std::sync::atomic::Ordering::Relaxed) && !fx.wake.is_empty() {
            let core = lock(&self.core);
            let mut f = lock(&self.fullest);
            for c in &fx.wake {
                if let Some((n, b)) = core.queue_depth(*c) {
                    f.0 = f.0.max(n as u64);
                    f.1 = f.1.max(b as u64);
                }
            }
        }
        let mut conns = lock(&self.conns);
        for c in &fx.wake {
            if let Some(sig) = conns.get(c) {
                sig.notify.notify_one();
            }
        }
        for close in fx.close {
            // The core has forgotten the connection; so do we (its task holds the signal).
            if let Some(sig) = conns.remove(&close.conn) {
                tracing::debug!(conn = %close.conn, reason = close.reason.as_str(), "closing");
                *lock(&sig.close) = Some(close);
                sig.notify.notify_one();
            }
        }
        drop(conns);
        for p in fx.push {
            self.pushes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // Content-free by type: a user and a count.
            tracing::debug!(user = %p.user, pending = p.pending, "push wake-up");
            if let Some(sink) = &self.push_sink {
                sink(&p);
            }
        }
    }
}

/// One gateway serving a hub on one listener.
pub struct Server {
    hub: Arc<Hub>,
    cfg: RuntimeConfig,
    clock: Clock,
    shutdown: watch::Sender<bool>,
    /// Connection tasks of this gateway still running.
    active: std::sync::atomic::AtomicUsize,
    /// Streams not (yet) upgraded to WebSocket (see `max_pending_streams`).
    pending: Arc<std::sync::atomic::AtomicUsize>,
    /// HTTP only (the media lane behind gateway nodes): no WebSockets, no gateway.
    http_only: bool,
}

/// Counts one pending (non-WebSocket) stream while it lives.
struct PendingGuard(Arc<std::sync::atomic::AtomicUsize>);

impl PendingGuard {
    /// Takes a slot, or `None` when `max` streams are pending already.
    fn take(count: &Arc<std::sync::atomic::AtomicUsize>, max: usize) -> Option<Self> {
        use std::sync::atomic::Ordering;
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| PendingGuard(count.clone()))
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Server {
    /// A standalone server (its own hub) over `store`.
    pub fn new(
        limits: Limits,
        secret: Secret,
        store: Box<dyn KvStore>,
        cfg: RuntimeConfig,
        clock: Clock,
    ) -> Arc<Self> {
        Self::on_hub(Hub::new(limits, secret, store, None), cfg, clock)
    }

    /// A gateway attached to a shared hub (registers the gateway in its region).
    pub fn on_hub(hub: Arc<Hub>, cfg: RuntimeConfig, clock: Clock) -> Arc<Self> {
        hub.with_core(|c| c.add_gateway(cfg.gateway.clone(), cfg.region.clone()));
        Self::build(hub, cfg, clock, false)
    }

    /// The chat service's HTTP side alone (health, metrics, the media lane), which gateway
    /// nodes pass media requests through to: WebSocket upgrades are refused (clients
    /// connect to a gateway) and no gateway is registered.
    pub fn http_only(hub: Arc<Hub>, cfg: RuntimeConfig, clock: Clock) -> Arc<Self> {
        Self::build(hub, cfg, clock, true)
    }

    fn build(hub: Arc<Hub>, cfg: RuntimeConfig, clock: Clock, http_only: bool) -> Arc<Self> {
        Arc::new(Server {
            hub,
            cfg,
            clock,
            shutdown: watch::channel(false).0,
            active: Default::default(),
            pending: Default::default(),
            http_only,
        })
    }

    /// The hub this gateway serves.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Current time on this server's clock (stepped by an armed clock fault).
    pub fn now(&self) -> Millis {
        self.hub.now_on(&self.clock)
    }

    /// Runs `f` with the core locked.
    pub fn with_core<R>(&self, f: impl FnOnce(&mut ChatCore<Box<dyn KvStore>>) -> R) -> R {
        self.hub.with_core(f)
    }

    /// Asks every connection to close and the accept loop to stop.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Serves `listener` until `shutdown` is called: accepts connections, runs the
    /// core's timers, and on shutdown closes every connection (code 1012) and returns.
    pub async fn serve<L: Listener>(self: Arc<Self>, listener: L) {
        let ticker = {
            let me = self.clone();
            let mut stop = self.shutdown.subscribe();
            async move {
                let mut iv = tokio::time::interval(me.cfg.tick_interval);
                iv.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        biased;
                        _ = stop.changed() => break,
                        _ = iv.tick() => {
                            let now = me.now();
                            me.hub.act(|c| c.tick(now));
                        }
                    }
                }
            }
        };
        if self.cfg.run_timers {
            self.cfg.spawner.spawn(ticker);
            if self.hub.grouping() {
                let me = self.clone();
                let stop = self.shutdown.subscribe();
                let in_thread = self.cfg.spawner == Spawner::Tokio;
                self.cfg
                    .spawner
                    .spawn(async move { me.hub.run_group_commit(stop, in_thread).await });
            }
        }
        let mut stop = self.shutdown.subscribe();
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                r = listener.accept() => match r {
                    Ok((stream, peer)) => {
                        let me = self.clone();
                        self.cfg.spawner.spawn(async move { me.handle_stream(stream, peer).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        // Graceful shutdown: every connection gets a close frame; give them a moment.
        if !self.http_only {
            let now = self.now();
            self.hub.act(|c| c.gateway_down(&self.cfg.gateway, now));
        }
        if self.cfg.run_timers && self.hub.grouping() {
            // The group-commit loop has stopped: sync what is left, so the last acks and
            // the close frames' final frames go out (a few rounds at most).
            let in_thread = self.cfg.spawner == Spawner::Tokio;
            for _ in 0..20 {
                match self.hub.sync_round(in_thread, Duration::ZERO).await {
                    Ok(false) => break,
                    Ok(true) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "group commit at shutdown: sync failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        }
        for _ in 0..50 {
            if self.active.load(std::sync::atomic::Ordering::Relaxed) == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Routes one accepted stream to the WebSocket or HTTP side.
    async fn handle_stream<St>(self: Arc<Self>, mut stream: St, peer: std::net::SocketAddr)
    where
        St: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Some(pending) = PendingGuard::take(&self.pending, self.cfg.max_pending_streams) else {
            tracing::debug!(%peer, "too many pending streams; closing");
            return;
        };
        let head =
            match tokio::time::timeout(self.cfg.head_timeout, http::read_head(&mut stream)).await {
                Ok(Ok(h)) => h,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "bad request head");
                    let _ = http::respond(
                        &mut stream,
                        400,
                        "application/json",
                        &http::error_json(400, &e.to_string()),
                    )
                    .await;
                    return;
                }
                Err(_) => return,
            };
        if head.is_websocket() && self.http_only {
            let _ = http::respond(
                &mut stream,
                404,
                "application/json",
                &http::error_json(404, "no WebSocket endpoint here: connect to a gateway"),
            )
            .await;
        } else if head.is_websocket() {
            // From here on `max_connections` bounds it.
            drop(pending);
            ws::run(self, stream, head).await;
        } else {
            self.handle_http(stream, head).await;
            drop(pending);
        }
    }
}

pub use metrics::render as render_metrics;

/// Reads the server secret from `path`, creating it (32 random bytes, hex, mode 0600) if
/// it does not exist, so that `serve` and `token` agree without configuration.
pub fn load_or_create_secret(path: &std::path::Path) -> std::io::Result<Secret> {
    use std::io::{Error, ErrorKind, Read};
    let bad = |m: String| Error::new(ErrorKind::InvalidData, m);
    match std::fs::read_to_string(path) {
        Ok(s) => Secret::new(s.trim().as_bytes().to_vec())
            .map_err(|e| bad(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut raw = [0u8; 32];
            std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
            let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            use std::io::Write;
            opts.open(path)?.write_all(hex.as_bytes())?;
            Secret::new(hex.into_bytes()).map_err(|e| bad(e.to_string()))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;

    #[test]
    fn a_restarted_core_never_reuses_a_connection_id() {
        // Found by the simulator's crash points: a connection task of the crashed core
        // read one more frame with its old id, which the new core had given to another
        // user's connection.
        let secret = Secret::new(b"test-secret-test-secret".to_vec()).expect("secret");
        let hub = Hub::new(
            Limits::default(),
            secret.clone(),
            Box::new(MemoryStore::new()),
            None,
        );
        let gw = GatewayId::from("gw-1");
        hub.with_core(|c| c.add_gateway(gw.clone(), RegionId::from("r")));
        let old: Vec<ConnId> = (0..3)
            .filter_map(|_| hub.with_core(|c| c.connect(&gw, Millis(0))))
            .collect();
        hub.restart_core(Limits::default(), secret, Box::new(MemoryStore::new()));
        let new = hub
            .with_core(|c| c.connect(&gw, Millis(0)))
            .expect("gateway still up");
        assert!(!old.contains(&new), "{new:?} reused one of {old:?}");
    }
}

//! The sans-IO chat server: connections, sessions, routing, inbox, receipts, presence,
//! groups, media, limits. No sockets, clocks or randomness: the runtime hands in frames and
//! `now`, and takes out frames to send (`drain`), connections to close, and push requests.
//!
//! Every rule of the chat design lives in exactly one function here or in the modules
//! below (`messaging` for send/ack/sync, `groups`, `media`, `session` for auth and
//! presence); the tokio runtime (`crate::runtime`) and the simulator only move bytes.

mod groups;
pub mod hot;
mod media;
mod messaging;
pub mod outbound;
mod presence;
pub mod ratelimit;
pub mod registry;
mod session;
mod unlink;

pub use media::{MediaError, MediaStatus};

use crate::auth::Secret;
use crate::config::Limits;
use crate::ids::{ConnId, ConversationId, GatewayId, GroupId, Millis, RegionId, Seq, UserId};
use crate::protocol::{decode_client, encode_server, ClientFrame, ErrorPayload, ServerFrame};
use crate::store::records::Records;
use crate::store::{KvStore, StoreError};
use outbound::{FrameClass, PushOutcome};
use presence::Presence;
use ratelimit::TokenBucket;
use registry::{Gateway, Registry};
use std::collections::{BTreeMap, BTreeSet};

/// Why the core wants a connection closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// No `auth` within `auth_timeout_ms`.
    AuthTimeout,
    /// `auth` failed, or a frame came before it.
    Unauthorized,
    /// No frame within `presence_timeout_ms`.
    HeartbeatTimeout,
    /// The outbound queue overflowed: the client reads too slowly.
    SlowConsumer,
    /// Another connection authenticated as the same device.
    Replaced,
    /// The gateway holding it went down (deploy, crash, region failover).
    GatewayDown,
    /// A store commit failed while handling one of its frames: frames pipelined behind it
    /// are not handled, so the client resends its outbox in order after reconnecting.
    StorageUnavailable,
    /// The device was unlinked (by itself or another device of its user).
    Unlinked,
}

impl CloseReason {
    /// WebSocket close code to use (RFC 6455 / IANA registry).
    pub fn ws_code(&self) -> u16 {
        match self {
            CloseReason::AuthTimeout | CloseReason::Unauthorized | CloseReason::Unlinked => 1008,
            CloseReason::HeartbeatTimeout => 1001,
            CloseReason::SlowConsumer => 1013,
            CloseReason::Replaced => 1000,
            CloseReason::GatewayDown => 1012,
            CloseReason::StorageUnavailable => 1011,
        }
    }

    /// Short text for the close frame and logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            CloseReason::AuthTimeout => "auth timeout",
            CloseReason::Unauthorized => "unauthorized",
            CloseReason::HeartbeatTimeout => "heartbeat timeout",
            CloseReason::SlowConsumer => "slow consumer",
            CloseReason::Replaced => "replaced by a newer connection",
            CloseReason::GatewayDown => "gateway going away",
            CloseReason::StorageUnavailable => "storage unavailable",
            CloseReason::Unlinked => "device unlinked",
        }
    }
}

/// A connection to close, with the last frames to write before the close frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Close {
    pub conn: ConnId,
    pub reason: CloseReason,
    pub final_frames: Vec<String>,
    /// Commits made before the close: under group commit the final frames wait until
    /// they are durable (see `ChatCore::hold_until_synced`).
    pub after: u64,
    /// The core that made the close (see `ChatCore::incarnation`): after a restart its
    /// commits may be lost, so its final frames are dropped.
    pub incarnation: u64,
}

/// A wake-up for a user with no online device. Carries no content, by construction: it has
/// no field that could hold message text (seed 002: push is "you have mail").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushRequest {
    pub user: UserId,
    /// Messages waiting in the user's inbox (badge count), capped at `PUSH_COUNT_CAP`.
    pub pending: u64,
    /// Always `None`, except under the planted bug `push-with-content`.
    pub preview: Option<String>,
}

/// Largest badge count a push carries.
pub const PUSH_COUNT_CAP: usize = 999;

/// What the runtime must do after a call into the core.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// Connections with new frames to `drain`.
    pub wake: BTreeSet<ConnId>,
    /// Connections to close (already forgotten by the core).
    pub close: Vec<Close>,
    /// Push notifications to send.
    pub push: Vec<PushRequest>,
}

impl Effects {
    fn merge(&mut self, other: Effects) {
        self.wake.extend(other.wake);
        self.close.extend(other.close);
        self.push.extend(other.push);
    }
}

/// Counters for `/metrics` and the simulator's oracle.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub connections_opened: u64,
    pub frames_in: u64,
    pub frames_out: u64,
    pub messages_stored: u64,
    pub messages_deduplicated: u64,
    pub deliveries_enqueued: u64,
    pub pushes: u64,
    pub errors_sent: u64,
    pub droppable_frames_dropped: u64,
    pub slow_consumer_disconnects: u64,
    pub cross_region_deliveries: u64,
    pub messages_expired: u64,
    pub bodies_purged: u64,
    /// Highest outbound depth any connection reached, in frames.
    pub outbound_high_water: u64,
    /// Messages per storage partition and the hottest conversations.
    pub hot: hot::Hot,
}

/// A step of the server's work, recorded for playback when the event log is on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CoreEvent {
    /// A message passed dedup, got its seq and was committed with its inbox copies.
    Stored {
        at: Millis,
        conversation: ConversationId,
        seq: Seq,
        client_message_id: String,
        sender: UserId,
        gateway: GatewayId,
        inbox_copies: usize,
        shared_log: bool,
    },
    /// A retry was recognised: answered with the original seq, nothing stored.
    Deduplicated {
        at: Millis,
        conversation: ConversationId,
        seq: Seq,
        client_message_id: String,
        sender: UserId,
    },
    /// The registry found a device online and the message was queued on its socket.
    Routed {
        at: Millis,
        conversation: ConversationId,
        seq: Seq,
        user: UserId,
        device: crate::ids::DeviceId,
        gateway: GatewayId,
    },
    /// No device of `user` was online: a content-free push was requested.
    Pushed {
        at: Millis,
        user: UserId,
        pending: u64,
    },
    /// A connection's bounded outbound queue overflowed: its queued frames were dropped
    /// (the messages among them wait in the inbox) and it was closed with a resume token.
    SlowConsumerClosed {
        at: Millis,
        user: UserId,
        device: crate::ids::DeviceId,
        gateway: GatewayId,
        queued_frames: usize,
    },
    /// The media lane reserved an upload.
    MediaPrepared {
        at: Millis,
        media_id: crate::ids::MediaId,
        user: UserId,
        conversation: ConversationId,
        size: u64,
    },
    /// A chunk of an upload arrived: `received` of `size` bytes are stored.
    MediaChunk {
        at: Millis,
        media_id: crate::ids::MediaId,
        conversation: ConversationId,
        user: UserId,
        received: u64,
        size: u64,
    },
    /// A member downloaded a complete upload.
    MediaFetched {
        at: Millis,
        media_id: crate::ids::MediaId,
        conversation: ConversationId,
        user: UserId,
        bytes: u64,
    },
    /// A typing notice: forwarded to `devices` online devices (`coalesced` of them
    /// replaced a notice still queued), or dropped by the per-user throttle.
    Typing {
        at: Millis,
        conversation: ConversationId,
        user: UserId,
        devices: usize,
        coalesced: usize,
        throttled: bool,
    },
}

/// A snapshot of gauges for `/metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Gauges {
    pub connections: u64,
    pub authenticated: u64,
    pub outbound_frames: u64,
    pub outbound_bytes: u64,
    pub outbound_max_frames: u64,
}

/// The chat server model. One instance is the chat/inbox service, the registry and the
/// presence service for every gateway attached to it.
pub struct ChatCore<S: KvStore> {
    cfg: Limits,
    secret: Secret,
    db: Records<S>,
    reg: Registry,
    presence: Presence,
    rates: BTreeMap<UserId, TokenBucket>,
    typing_last: BTreeMap<(UserId, ConversationId), Millis>,
    dirty_group_receipts: BTreeSet<(ConversationId, Seq)>,
    next_session: u64,
    last_sweep: Millis,
    /// The last sweep step filled its batch: the next tick continues it.
    sweep_more: bool,
    stats: Stats,
    fx: Effects,
    bugs: crate::config::Bugs,
    /// Member lists cached by the planted bug `stale-group-members` (empty otherwise).
    stale_members: BTreeMap<GroupId, BTreeSet<UserId>>,
    /// Playback's event log; `None` (off) unless `enable_event_log` was called.
    events: Option<Vec<CoreEvent>>,
    /// Group commit: commits up to this count are durable; a queued frame leaves only
    /// once the commits made before it are. `u64::MAX` (every commit durable on return)
    /// unless `hold_until_synced` was called.
    durable: u64,
    /// Connections whose next frame waits for a sync (woken by `released`).
    held: BTreeSet<ConnId>,
    /// Push wake-ups waiting for the commits made before them: (count, request).
    held_pushes: Vec<(u64, PushRequest)>,
    /// Which core this is since the process started (a restart makes the next).
    incarnation: u64,
}

/// An error that becomes an `error` frame to the client.
#[derive(Debug)]
pub(crate) struct Reject(pub Box<ErrorPayload>);

impl Reject {
    pub fn new(code: u16, msg: impl Into<String>) -> Self {
        Reject(Box::new(ErrorPayload::new(code, msg)))
    }
}

impl From<StoreError> for Reject {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store error");
        Reject::new(
            503,
            "storage unavailable (a failed write applies nothing); reconnect and retry",
        )
    }
}

type Handled = Result<(), Reject>;

impl<S: KvStore> ChatCore<S> {
    /// A core over `store`, with these limits and auth secret.
    pub fn new(cfg: Limits, secret: Secret, store: S) -> Self {
        ChatCore {
            cfg,
            secret,
            db: Records::new(store),
            reg: Registry::default(),
            presence: Presence::default(),
            rates: BTreeMap::new(),
            typing_last: BTreeMap::new(),
            dirty_group_receipts: BTreeSet::new(),
            next_session: 0,
            last_sweep: Millis(0),
            sweep_more: false,
            stats: Stats::default(),
            fx: Effects::default(),
            bugs: crate::config::Bugs::default(),
            stale_members: BTreeMap::new(),
            events: None,
            durable: u64::MAX,
            held: BTreeSet::new(),
            held_pushes: Vec::new(),
            incarnation: 0,
        }
    }

    /// Which core this is: 0 for the first, one more for each restart (`Hub::restart_core`
    /// sets it). What an older core committed but did not sync may be lost.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Sets the incarnation (a restart: the old one's plus one).
    pub fn set_incarnation(&mut self, n: u64) {
        self.incarnation = n;
    }

    /// Group commit: from now on the store's commits are durable only once the runtime
    /// says so (`released`), and every frame queued after a commit waits until then. So
    /// an ack, a delivery or a receipt never leaves before the write it tells of is
    /// durable, whichever sync round covers it.
    pub fn hold_until_synced(&mut self) {
        self.durable = self.db.commits;
    }

    /// Commits made so far (the count a sync round covers).
    pub fn commits(&self) -> u64 {
        self.db.commits
    }

    /// Commits known durable (`u64::MAX` without group commit).
    pub fn durable_commits(&self) -> u64 {
        self.durable
    }

    /// A sync covered the first `upto` commits: frames waiting for them may leave. Wakes
    /// the connections that were waiting.
    pub fn released(&mut self, upto: u64) -> Effects {
        if upto > self.durable {
            self.durable = upto;
            let held = std::mem::take(&mut self.held);
            self.fx.wake.extend(held);
            let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.held_pushes)
                .into_iter()
                .partition(|(after, _)| *after <= upto);
            self.held_pushes = waiting;
            self.fx.push.extend(ready.into_iter().map(|(_, p)| p));
        }
        self.take_fx()
    }

    /// Numbers commits after `n`, all of them durable (a restart over a store that kept
    /// what it kept: see `Hub::restart_core`). Keeps a sync round begun before the
    /// restart from releasing frames of commits made after it.
    pub fn continue_commits_after(&mut self, n: u64) {
        self.db.commits = self.db.commits.max(n);
        if self.durable != u64::MAX {
            self.durable = self.db.commits;
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.cfg
    }

    /// The auth secret (the HTTP lane verifies bearer tokens with it).
    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    /// Starts recording `CoreEvent`s (playback). Off by default: no cost when off.
    pub fn enable_event_log(&mut self) {
        self.events.get_or_insert_with(Vec::new);
    }

    /// Takes the events recorded since the last call.
    pub fn take_events(&mut self) -> Vec<CoreEvent> {
        self.events.as_mut().map(std::mem::take).unwrap_or_default()
    }

    fn log(&mut self, e: impl FnOnce() -> CoreEvent) {
        if let Some(v) = self.events.as_mut() {
            v.push(e());
        }
    }

    /// Switches planted bugs on (simulator only).
    pub fn set_bugs(&mut self, bugs: crate::config::Bugs) {
        for c in self.reg.conns.values_mut() {
            c.out.unbounded = bugs.unbounded_outbound_queue;
        }
        self.bugs = bugs;
    }

    /// True when at least one device of `user` is connected and authenticated.
    pub fn is_online(&self, user: &UserId) -> bool {
        self.reg.is_online(user)
    }

    /// Counters so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The store, for inspection by tests and the simulator's oracle.
    pub fn store(&self) -> &S {
        &self.db.kv
    }

    /// Current gauges.
    pub fn gauges(&self) -> Gauges {
        let mut g = Gauges::default();
        for c in self.reg.conns.values() {
            g.connections += 1;
            if c.session.is_some() {
                g.authenticated += 1;
            }
            g.outbound_frames += c.out.len() as u64;
            g.outbound_bytes += c.out.bytes() as u64;
            g.outbound_max_frames = g.outbound_max_frames.max(c.out.len() as u64);
        }
        g
    }

    /// Declares a gateway in a region (up). Idempotent.
    pub fn add_gateway(&mut self, gw: GatewayId, region: RegionId) {
        self.reg.gateways.insert(gw, Gateway { region, up: true });
    }

    /// A new transport connection arrived at `gw`. It must authenticate within
    /// `auth_timeout_ms`. Refused when the gateway is unknown or down.
    pub fn connect(&mut self, gw: &GatewayId, now: Millis) -> Option<ConnId> {
        if !self.reg.gateways.get(gw).is_some_and(|g| g.up) {
            return None;
        }
        let id = self.reg.next_id();
        self.reg.conns.insert(
            id,
            registry::Conn {
                gateway: gw.clone(),
                opened_at: now,
                last_frame: now,
                session: None,
                out: outbound::OutboundQueue::new(
                    self.cfg.outbound_max_frames,
                    self.cfg.outbound_max_bytes,
                ),
                subscriptions: BTreeSet::new(),
            },
        );
        if self.bugs.unbounded_outbound_queue {
            if let Some(c) = self.reg.conns.get_mut(&id) {
                c.out.unbounded = true;
            }
        }
        self.stats.connections_opened += 1;
        Some(id)
    }

    /// One text frame from `conn`.
    pub fn on_text(&mut self, conn: ConnId, text: &str, now: Millis) -> Effects {
        let Some(c) = self.reg.conns.get_mut(&conn) else {
            return self.take_fx();
        };
        c.last_frame = now;
        let authed = c.session.is_some();
        self.stats.frames_in += 1;
        if text.len() > self.cfg.max_frame_bytes {
            let e = ErrorPayload::new(
                413,
                format!("frame exceeds {} bytes", self.cfg.max_frame_bytes),
            );
            self.refuse(conn, e, authed, now);
            return self.take_fx();
        }
        let frame = match decode_client(text) {
            Ok(f) => f,
            Err(e) => {
                self.refuse(conn, ErrorPayload::new(400, e.to_string()), authed, now);
                return self.take_fx();
            }
        };
        if let Err(Reject(mut p)) = self.dispatch(conn, frame, now) {
            if p.code == 401 {
                p.message = format!("{}; closing", p.message);
                self.send_error(conn, *p, now);
                self.close(conn, CloseReason::Unauthorized, now);
            } else if p.code == 503 {
                // Fail-stop: a later frame of this connection (the next send of the same
                // outbox) must not be applied before this one is retried (sender FIFO).
                p.message = format!("{}; closing", p.message);
                self.send_error(conn, *p, now);
                self.close(conn, CloseReason::StorageUnavailable, now);
            } else {
                self.send_error(conn, *p, now);
            }
        }
        self.take_fx()
    }

    /// Answers a bad frame; before authentication a bad frame also closes the connection
    /// (an unauthenticated peer gets no second chance to probe the parser).
    fn refuse(&mut self, conn: ConnId, mut e: ErrorPayload, authed: bool, now: Millis) {
        if authed {
            self.send_error(conn, e, now);
        } else {
            e.message = format!("{}; authenticate first, closing", e.message);
            self.send_error(conn, e, now);
            self.close(conn, CloseReason::Unauthorized, now);
        }
    }

    /// A binary frame: not part of the protocol.
    pub fn on_binary(&mut self, conn: ConnId, now: Millis) -> Effects {
        if let Some(c) = self.reg.conns.get_mut(&conn) {
            c.last_frame = now;
            let authed = c.session.is_some();
            let e = ErrorPayload::new(
                400,
                "binary frames are not supported; send JSON text frames",
            );
            self.refuse(conn, e, authed, now);
        }
        self.take_fx()
    }

    fn dispatch(&mut self, conn: ConnId, frame: ClientFrame, now: Millis) -> Handled {
        let session = self.reg.conns.get(&conn).and_then(|c| c.session.clone());
        let Some(sess) = session else {
            return match frame {
                ClientFrame::Auth { payload } => self.handle_auth(conn, payload, now),
                _ => Err(Reject::new(
                    401,
                    "authenticate first: the first frame must be auth",
                )),
            };
        };
        match frame {
            ClientFrame::Auth { .. } => Err(Reject::new(400, "already authenticated")),
            ClientFrame::Heartbeat { .. } => {
                self.enqueue(
                    conn,
                    &ServerFrame::HeartbeatAck { server_time: now.0 },
                    FrameClass::Essential,
                    None,
                    now,
                );
                Ok(())
            }
            ClientFrame::Message {
                client_message_id,
                payload,
            } => self.handle_send(conn, &sess, client_message_id, payload, now),
            ClientFrame::GroupMessage {
                client_message_id,
                payload,
            } => self.handle_group_send(conn, &sess, client_message_id, payload, now),
            ClientFrame::DeliveryAck { message_id, .. } => {
                self.handle_delivery_ack(&sess, &message_id, now)
            }
            ClientFrame::ReadReceipt { message_ids, .. } => {
                self.handle_read(&sess, &message_ids, now)
            }
            ClientFrame::StatusQuery { message_ids } => {
                self.handle_status_query(conn, &sess, &message_ids, now)
            }
            ClientFrame::Sync { payload } => self.handle_sync(conn, &sess, payload, now),
            ClientFrame::GroupCreate { payload } => {
                self.handle_group_create(conn, &sess, payload, now)
            }
            ClientFrame::GroupAdd { payload } => self.handle_group_add(&sess, payload, now),
            ClientFrame::GroupRemove { payload } => self.handle_group_remove(&sess, payload, now),
            ClientFrame::PresenceSubscribe { payload } => {
                self.handle_presence_subscribe(conn, &sess, payload, now)
            }
            ClientFrame::Typing { payload } => self.handle_typing(&sess, payload, now),
            ClientFrame::Settings { payload } => self.handle_settings(conn, &sess, payload, now),
            ClientFrame::DeviceUnlink { payload } => {
                self.handle_device_unlink(conn, &sess, payload, now)
            }
            ClientFrame::MediaPrepare { payload } => {
                let prepared = self
                    .media_prepare(&sess.user, payload, now)
                    .map_err(|e| Reject(Box::new(e.to_error())))?;
                self.enqueue(
                    conn,
                    &ServerFrame::MediaPrepared { payload: prepared },
                    FrameClass::Essential,
                    None,
                    now,
                );
                Ok(())
            }
        }
    }

    /// The transport under `conn` is gone (client closed, network error, or after the
    /// runtime carried out a `Close`).
    pub fn disconnected(&mut self, conn: ConnId, now: Millis) -> Effects {
        self.forget_conn(conn, now);
        self.take_fx()
    }

    /// Frames and bytes queued for `conn` right now.
    pub fn queue_depth(&self, conn: ConnId) -> Option<(usize, usize)> {
        self.reg
            .conns
            .get(&conn)
            .map(|c| (c.out.len(), c.out.bytes()))
    }

    /// Up to `max` encoded frames queued for `conn`, oldest first; under group commit only
    /// those whose commits are durable (the rest wait for `released`).
    pub fn drain(&mut self, conn: ConnId, max: usize) -> Vec<String> {
        match self.reg.conns.get_mut(&conn) {
            Some(c) => {
                let (out, waiting) = c.out.drain_durable(max, self.durable);
                if waiting {
                    self.held.insert(conn);
                }
                self.stats.frames_out += out.len() as u64;
                out
            }
            None => Vec::new(),
        }
    }

    /// Advances time: closes connections that never authenticated or went silent, flushes
    /// aggregated group receipts, and sweeps expired messages and uploads.
    pub fn tick(&mut self, now: Millis) -> Effects {
        let mut to_close = Vec::new();
        for (id, c) in self.reg.conns.iter_mut() {
            // A clock stepped back would stretch every deadline by the step (a 10-minute
            // NTP step kept silent or unauthenticated sockets 10 minutes longer): readings
            // from the "future" are brought back to now, so a deadline stretches by at
            // most the silence already past, never by the step.
            c.opened_at = c.opened_at.min(now);
            c.last_frame = c.last_frame.min(now);
            match &c.session {
                None if now.since(c.opened_at) >= self.cfg.auth_timeout_ms => {
                    to_close.push((*id, CloseReason::AuthTimeout))
                }
                Some(_) if now.since(c.last_frame) >= self.cfg.presence_timeout_ms => {
                    to_close.push((*id, CloseReason::HeartbeatTimeout))
                }
                _ => {}
            }
        }
        for (id, why) in to_close {
            self.close(id, why, now);
        }
        self.flush_group_receipts(now);
        // A clock stepped back sweeps at once rather than waiting out the step.
        if self.sweep_more
            || now.since(self.last_sweep) >= self.cfg.sweep_interval_ms
            || now < self.last_sweep
        {
            if !self.sweep_more {
                self.last_sweep = now;
            }
            match self.sweep_expired(now) {
                Ok(more) => self.sweep_more = more,
                Err(e) => {
                    self.sweep_more = false;
                    tracing::error!(error = %e.0.message, "expiry sweep failed; will retry next sweep");
                }
            }
        }
        self.take_fx()
    }

    /// Takes a gateway down (deploy, crash): every connection on it is closed at once and
    /// its devices will reconnect elsewhere. Returns the closes.
    pub fn gateway_down(&mut self, gw: &GatewayId, now: Millis) -> Effects {
        if let Some(g) = self.reg.gateways.get_mut(gw) {
            g.up = false;
        }
        let ids: Vec<ConnId> = self
            .reg
            .conns
            .iter()
            .filter(|(_, c)| &c.gateway == gw)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.close(id, CloseReason::GatewayDown, now);
        }
        self.take_fx()
    }

    /// The last connection id this core handed out.
    pub fn last_conn_id(&self) -> u64 {
        self.reg.last_id()
    }

    /// Hands out connection ids above `last` (see `Hub::restart_core`).
    pub fn continue_conn_ids_after(&mut self, last: u64) {
        self.reg.continue_after(last);
    }

    /// Every gateway: (id, region, up), in order.
    pub fn gateways(&self) -> Vec<(GatewayId, RegionId, bool)> {
        self.reg
            .gateways
            .iter()
            .map(|(id, g)| (id.clone(), g.region.clone(), g.up))
            .collect()
    }

    /// Brings a gateway back.
    pub fn gateway_up(&mut self, gw: &GatewayId) {
        if let Some(g) = self.reg.gateways.get_mut(gw) {
            g.up = true;
        }
    }

    /// Fails a whole region over: its gateways go down and users homed there are re-homed
    /// to the first healthy region. Returns the closes.
    pub fn region_down(&mut self, region: &RegionId, now: Millis) -> Effects {
        let gws: Vec<GatewayId> = self
            .reg
            .gateways
            .iter()
            .filter(|(_, g)| &g.region == region)
            .map(|(id, _)| id.clone())
            .collect();
        let mut fx = Effects::default();
        for gw in gws {
            fx.merge(self.gateway_down(&gw, now));
        }
        fx
    }

    /// The home region of `user` as routing sees it now: their stored home if it has a
    /// gateway up, else the first healthy region (failover).
    pub fn home_region(&self, user: &UserId) -> Option<RegionId> {
        let healthy = self.reg.healthy_regions();
        let stored = self
            .db
            .user(user)
            .ok()
            .and_then(|u| u.home_region)
            .map(RegionId);
        match stored {
            Some(r) if healthy.contains(&r) => Some(r),
            _ => healthy.into_iter().next(),
        }
    }

    // ---- internals shared by the handler modules ----

    fn take_fx(&mut self) -> Effects {
        if self.db.commits > self.durable && !self.fx.push.is_empty() {
            // Group commit: a wake-up for a message waits for the sync that covers it.
            let after = self.db.commits;
            let pushes = std::mem::take(&mut self.fx.push);
            self.held_pushes
                .extend(pushes.into_iter().map(|p| (after, p)));
        }
        std::mem::take(&mut self.fx)
    }

    /// Queues `frame` for `conn`, applying the backpressure policy.
    fn enqueue(
        &mut self,
        conn: ConnId,
        frame: &ServerFrame,
        class: FrameClass,
        coalesce_key: Option<String>,
        now: Millis,
    ) -> Option<PushOutcome> {
        let c = self.reg.conns.get_mut(&conn)?;
        let text = encode_server(frame);
        let before = c.out.dropped;
        let outcome = c.out.push_after(text, class, coalesce_key, self.db.commits);
        match outcome {
            PushOutcome::Queued | PushOutcome::Coalesced => {
                self.fx.wake.insert(conn);
            }
            PushOutcome::Dropped => {}
            PushOutcome::Overflow => {
                self.stats.slow_consumer_disconnects += 1;
                self.close(conn, CloseReason::SlowConsumer, now);
                return Some(outcome);
            }
        }
        if let Some(c) = self.reg.conns.get(&conn) {
            self.stats.droppable_frames_dropped += c.out.dropped - before;
            self.stats.outbound_high_water =
                self.stats.outbound_high_water.max(c.out.high_water as u64);
        }
        Some(outcome)
    }

    fn send_error(&mut self, conn: ConnId, p: ErrorPayload, now: Millis) {
        self.stats.errors_sent += 1;
        // Errors are essential; a connection too slow to take one is closed by enqueue
        // (at `now`, which becomes the user's last_seen if it was their last device).
        self.enqueue(
            conn,
            &ServerFrame::Error { payload: p },
            FrameClass::Essential,
            None,
            now,
        );
    }

    /// Closes `conn`: forgets it and hands the runtime the frames still to write. A slow
    /// consumer's queue is discarded (its messages wait in the inbox) and replaced by one
    /// error frame carrying a resume token.
    fn close(&mut self, conn: ConnId, reason: CloseReason, now: Millis) {
        let Some(c) = self.reg.conns.get_mut(&conn) else {
            return;
        };
        let mut final_frames = Vec::new();
        if reason == CloseReason::SlowConsumer {
            let queued_frames = c.out.len();
            c.out.clear();
            if let (Some(s), Some(v)) = (&c.session, self.events.as_mut()) {
                v.push(CoreEvent::SlowConsumerClosed {
                    at: now,
                    user: s.user.clone(),
                    device: s.device.clone(),
                    gateway: c.gateway.clone(),
                    queued_frames,
                });
            }
            if let Some(s) = &c.session {
                let mut p = ErrorPayload::new(
                    503,
                    "outbound queue full: disconnecting; reconnect with resume_token and sync",
                );
                p.resume_token = Some(session::resume_token(&self.secret, &s.user, &s.device));
                final_frames.push(encode_server(&ServerFrame::Error { payload: p }));
            }
        } else {
            final_frames = c.out.drain(usize::MAX);
        }
        self.stats.frames_out += final_frames.len() as u64;
        self.fx.wake.remove(&conn);
        self.fx.close.push(Close {
            conn,
            reason,
            final_frames,
            after: self.db.commits,
            incarnation: self.incarnation,
        });
        self.forget_conn(conn, now);
    }

    /// Delivers an encoded server frame to every online device of `user` except
    /// `except`. Returns how many devices it was queued for.
    fn deliver_to_user(
        &mut self,
        user: &UserId,
        frame: &ServerFrame,
        except: Option<ConnId>,
        from_conn: Option<ConnId>,
        now: Millis,
    ) -> usize {
        let mut n = 0;
        let from_region = from_conn.and_then(|c| self.reg.region_of(c).cloned());
        let routed = match frame {
            ServerFrame::Message { payload } | ServerFrame::GroupMessage { payload } => {
                Some((payload.conversation_id.clone(), payload.seq))
            }
            _ => None,
        };
        for (device, conn) in self.reg.user_conns(user) {
            if Some(conn) == except {
                continue;
            }
            if let Some((conversation, seq)) = &routed {
                let gateway = self.reg.conns.get(&conn).map(|c| c.gateway.clone());
                if let Some(gateway) = gateway {
                    self.log(|| CoreEvent::Routed {
                        at: now,
                        conversation: conversation.clone(),
                        seq: *seq,
                        user: user.clone(),
                        device: device.clone(),
                        gateway,
                    });
                }
            }
            if from_region.is_some() && self.reg.region_of(conn) != from_region.as_ref() {
                self.stats.cross_region_deliveries += 1;
            }
            self.enqueue(conn, frame, FrameClass::Essential, None, now);
            if routed.is_some() {
                // Only messages count as deliveries (receipts and group updates also pass
                // through here): /metrics divides CPU time by this.
                self.stats.deliveries_enqueued += 1;
            }
            n += 1;
        }
        n
    }
}

#[cfg(test)]
pub(crate) mod testkit;
#[cfg(test)]
mod tests;

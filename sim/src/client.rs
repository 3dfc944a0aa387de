//! The simulated phone: offline-first, speaking the real protocol over tokio-tungstenite on
//! turmoil's TCP.
//!
//! What it does is what the seeds' mobile client does: a local pending queue that survives
//! an app kill; the same `client_message_id` on every retry; jittered exponential backoff
//! (1 s doubling to a 60 s cap by default); heartbeats and an idle timeout (turmoil's TCP
//! never retransmits, so a lost segment stalls a stream silently); sync of everything
//! pending after each reconnect; delivery acks and, after a while, read receipts.

use crate::crypto;
pub use crate::device::{dev, gateway_order, now_ms, Control, Ctx, EPOCH_MS};
use crate::ledger::{DeviceKey, Ledger, Shown};
use crate::plan::{device_name, user_name, Target};
use futures_util::{SinkExt, StreamExt};
use model_server::protocol::{DeliveredMessage, ServerFrame, Status};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<turmoil::net::TcpStream>;

/// Why a session ended.
enum End {
    /// Socket closed, broke or went silent: reconnect with backoff.
    Lost(&'static str),
    /// The app was killed or backgrounded: wait until it is back.
    Away,
    /// The battery died: the phone is gone without a FIN; its socket is kept, unread and
    /// unwritten, so the server only notices by its own timeouts.
    Vanished(Box<Ws>),
    /// The run is over.
    Done,
}

/// Runs one device until the end of the run.
pub async fn run_device(ctx: Rc<Ctx>, k: DeviceKey) {
    let mut rng =
        SmallRng::seed_from_u64(ctx.seed ^ ((k.0 as u64) << 20) ^ (k.1 as u64) ^ 0xdead_beef);
    let cfg = ctx.sc.client.clone();
    let mut backoff = cfg.backoff_initial_ms;
    let gateways = gateway_order(&ctx, k);
    let mut attempt = 0usize;
    // Sockets left behind by battery deaths: held open until the run ends (no FIN).
    let mut dead_sockets: Vec<Box<Ws>> = Vec::new();
    // Phones do not all open the app in the same millisecond; a device linked during the
    // run first opens it then.
    let start = rng.random_range(0..=ctx.sc.client.start_jitter_ms);
    let start = start + ctx.plan.links.get(&k).copied().unwrap_or(0);
    tokio::time::sleep(Duration::from_millis(start)).await;
    loop {
        let now = now_ms();
        if now >= ctx.end_ms {
            return;
        }
        ctx.tap_due(k, now);
        let ctl = ctx.control(k);
        if ctl.away_until > now {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let gw = &gateways[attempt % gateways.len()];
        match connect(&ctx, k, gw).await {
            Ok(ws) => {
                ctx.ledger.borrow_mut().device(k).connects.push(now_ms());
                ctx.ledger.borrow_mut().trace(
                    now_ms(),
                    dev(k),
                    "connected",
                    None,
                    None,
                    None,
                    gw.as_str(),
                );
                backoff = cfg.backoff_initial_ms;
                match session(&ctx, k, ws, &mut rng, ctl.generation).await {
                    End::Done => return,
                    End::Vanished(ws) => {
                        ctx.ledger.borrow_mut().trace(
                            now_ms(),
                            dev(k),
                            "battery_dead",
                            None,
                            None,
                            None,
                            "vanished without closing its socket",
                        );
                        dead_sockets.push(ws);
                        continue;
                    }
                    End::Away => {
                        ctx.ledger.borrow_mut().trace(
                            now_ms(),
                            dev(k),
                            "app_away",
                            None,
                            None,
                            None,
                            "",
                        );
                        continue;
                    }
                    End::Lost(why) => {
                        ctx.ledger.borrow_mut().trace(
                            now_ms(),
                            dev(k),
                            "disconnected",
                            None,
                            None,
                            None,
                            why,
                        );
                    }
                }
            }
            Err(why) if why.contains("device unlinked") => {
                // Logged out for good: the app shows its login screen and stops.
                ctx.ledger.borrow_mut().trace(
                    now_ms(),
                    dev(k),
                    "logged_out",
                    None,
                    None,
                    None,
                    why,
                );
                return;
            }
            Err(why) => {
                attempt += 1;
                ctx.ledger.borrow_mut().device(k).connect_failures += 1;
                ctx.ledger.borrow_mut().trace(
                    now_ms(),
                    dev(k),
                    "connect_failed",
                    None,
                    None,
                    None,
                    format!("{gw}: {why}"),
                );
            }
        }
        // Full jitter in [backoff/2, backoff], then double up to the cap.
        let wait = rng.random_range(backoff / 2..=backoff.max(1));
        {
            let mut l = ctx.ledger.borrow_mut();
            l.device(k).backoffs.push(wait);
            l.trace(
                now_ms(),
                dev(k),
                "backoff",
                None,
                None,
                None,
                format!("{wait} ms of {backoff}"),
            );
        }
        backoff = (backoff * 2).min(cfg.backoff_max_ms);
        let until = now_ms() + wait;
        while now_ms() < until && now_ms() < ctx.end_ms {
            ctx.tap_due(k, now_ms());
            let step = (until - now_ms()).min(wake_in(&ctx, k, now_ms()));
            tokio::time::sleep(Duration::from_millis(step.max(1))).await;
        }
    }
}

async fn connect(ctx: &Ctx, k: DeviceKey, gw: &str) -> Result<Ws, String> {
    let attempt = async {
        let stream = turmoil::net::TcpStream::connect((gw, 8080))
            .await
            .map_err(|e| e.to_string())?;
        // Small buffers: tungstenite's 128 KiB defaults cost 4x time and 9x memory here.
        let cfg = WebSocketConfig::default()
            .read_buffer_size(4096)
            .write_buffer_size(0);
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(
            format!("ws://{gw}:8080/ws"),
            stream,
            Some(cfg),
        )
        .await
        .map_err(|e| e.to_string())?;
        let sent_ms = now_ms();
        let (token, expiry) = ctx.session_token(k, sent_ms);
        let auth = json!({"type":"auth","payload":{"user_id":user_name(k.0),"device_id":device_name(k.1),"auth_token":token}});
        ws.send(Message::text(auth.to_string()))
            .await
            .map_err(|e| e.to_string())?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<ServerFrame>(t.as_str())
                {
                    Ok(ServerFrame::AuthSuccess { .. }) => {
                        // The server checked the token somewhere between our send and
                        // now: if its clock read past the expiry all that while, it let in
                        // an expired token.
                        if let Some(exp) = expiry {
                            let now = now_ms();
                            let lowest = ctx.clock.min_reading(sent_ms, now);
                            if lowest >= exp {
                                ctx.ledger.borrow_mut().breach(
                                    crate::invariant::ViolationKind::Auth,
                                    now,
                                    None,
                                    Some(dev(k)),
                                    None,
                                    "a token past its expiry refused".into(),
                                    format!(
                                        "auth_success for a token that expired {} ms before the server read it",
                                        lowest - exp
                                    ),
                                );
                            }
                        }
                        // An unlinked device's token must not work any more: not for an
                        // auth sent after its user saw the unlink answered.
                        let unlinked = ctx
                            .ledger
                            .borrow()
                            .unlinks
                            .get(&k)
                            .and_then(|u| u.confirmed_ms)
                            .filter(|c| *c <= sent_ms);
                        if let Some(c) = unlinked {
                            ctx.ledger.borrow_mut().breach(
                                crate::invariant::ViolationKind::Auth,
                                now_ms(),
                                None,
                                Some(dev(k)),
                                None,
                                "an unlinked device's token refused".into(),
                                format!(
                                    "auth_success for {} sent {} ms after its unlink was answered",
                                    dev(k),
                                    sent_ms - c
                                ),
                            );
                        }
                        if ctx.plan.links.contains_key(&k) {
                            let now = now_ms();
                            ctx.ledger
                                .borrow_mut()
                                .device(k)
                                .linked_ms
                                .get_or_insert(now);
                        }
                        return Ok(ws);
                    }
                    Ok(ServerFrame::Error { payload }) => {
                        if payload.message.contains("expired") {
                            // Log in again: the next attempt gets a fresh token.
                            ctx.session_tokens.borrow_mut().remove(&k);
                        }
                        return Err(format!("auth refused: {}", payload.message));
                    }
                    _ => continue,
                },
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("closed during auth".into()),
            }
        }
    };
    match tokio::time::timeout(Duration::from_secs(3), attempt).await {
        Ok(r) => r,
        Err(_) => Err("timed out".into()),
    }
}

/// Per-connection state of a session.
struct Session {
    /// When each outbox entry was last transmitted on this connection.
    sent_at: BTreeMap<usize, u64>,
    last_frame: u64,
    last_heartbeat: u64,
    next_read_at: u64,
    /// message id -> (conversation, when to send its read receipt).
    reads_due: BTreeMap<String, u64>,
    /// When this device last sent a `typing` notice.
    last_typing: Option<u64>,
    /// `delivery_ack`s sent since the last heartbeat.
    acks_since_heartbeat: Vec<String>,
    /// Per heartbeat in flight, the acks sent before it: its `heartbeat_ack` proves the
    /// server read them (frames on one connection are handled in order).
    heartbeats: std::collections::VecDeque<(u64, Vec<String>)>,
    /// When this session began (its `auth_success` had arrived).
    began: u64,
    /// Membership changes requested on this connection.
    membership_sent: std::collections::BTreeSet<usize>,
    /// Devices this connection asked to unlink.
    unlinks_sent: std::collections::BTreeSet<DeviceKey>,
    /// Own messages whose status to ask for, and when asking is allowed again (after a 429).
    status_wanted: std::collections::BTreeSet<String>,
    status_next_at: u64,
    /// Ids asked for and not known to be answered (asked again after a 429).
    status_asked: std::collections::BTreeSet<String>,
    /// When a status of each own message last arrived on this connection: a query puts
    /// the ids heard least recently first, as the server answers in query order what fits.
    status_heard: BTreeMap<String, u64>,
    /// When to look again for own messages without ✓✓ on this device, and how long the
    /// last wait was: short (`STATUS_SWEEP_MIN_MS`) while answers keep coming (the server
    /// answers what fits its queue, so a long list takes several queries), doubling up to
    /// `STATUS_SWEEP_MS` while nothing new is heard.
    next_status_sweep: u64,
    status_sweep_every: u64,
    /// A status arrived since the last sweep.
    status_heard_since_sweep: bool,
    /// When this connection's pending sync was first asked for, until its last page.
    sync_started: Option<u64>,
}

/// How often a connected phone asks again for ticks it has not seen.
const STATUS_SWEEP_MS: u64 = 10_000;
/// How soon it asks again while the last answers are still arriving.
const STATUS_SWEEP_MIN_MS: u64 = 2_000;

async fn session(
    ctx: &Rc<Ctx>,
    k: DeviceKey,
    mut ws: Ws,
    rng: &mut SmallRng,
    generation: u64,
) -> End {
    let cfg = ctx.sc.client.clone();
    let now = now_ms();
    let mut s = Session {
        sent_at: BTreeMap::new(),
        last_frame: now,
        last_heartbeat: now,
        next_read_at: now,
        reads_due: BTreeMap::new(),
        last_typing: None,
        acks_since_heartbeat: Vec::new(),
        heartbeats: Default::default(),
        began: now,
        membership_sent: Default::default(),
        unlinks_sent: Default::default(),
        status_wanted: Default::default(),
        status_next_at: 0,
        status_asked: Default::default(),
        status_heard: Default::default(),
        next_status_sweep: now + STATUS_SWEEP_MS,
        status_sweep_every: STATUS_SWEEP_MS,
        status_heard_since_sweep: false,
        sync_started: None,
    };
    // Sometimes catch up conversation by conversation first, from the last seq shown
    // without a gap (a client that keeps its own per-chat position)...
    if cfg.sync_after_seq_probability > 0.0
        && rng.random_bool(cfg.sync_after_seq_probability.clamp(0.0, 1.0))
    {
        let convs: Vec<String> = ctx
            .user_convs
            .get(&k.0)
            .map(|c| c.iter().cloned().collect())
            .unwrap_or_default();
        for conv in convs {
            let after = contiguous_seq(&ctx.ledger.borrow(), k, &conv);
            let mut p = json!({"conversation_id":conv,"after_seq":after});
            if cfg.sync_limit > 0 {
                p["limit"] = json!(cfg.sync_limit);
            }
            ctx.ledger.borrow_mut().trace(
                now_ms(),
                dev(k),
                "sync",
                Some(&conv),
                Some(after),
                None,
                "after_seq",
            );
            if let Err(e) = send(&mut ws, json!({"type":"sync","payload":p}).to_string()).await {
                return End::Lost(e);
            }
        }
    }
    // ...then always everything pending for this device.
    s.sync_started = Some(now_ms());
    let mut p = json!({});
    if cfg.sync_limit > 0 {
        p["limit"] = json!(cfg.sync_limit);
    }
    if let Err(e) = send(&mut ws, json!({"type":"sync","payload":p}).to_string()).await {
        return End::Lost(e);
    }
    // Receipts are pushed once: ask for the ticks this device may have missed while its
    // socket was down (1:1 messages this user sent that it has not seen read, and group
    // messages whose counts do not yet show every member delivered).
    let unsettled: Vec<String> = {
        let l = ctx.ledger.borrow();
        let seen = l.devices.get(&k);
        ctx.plan
            .sends
            .iter()
            .enumerate()
            .filter(|(_, p)| p.user == k.0)
            .filter_map(|(i, p)| {
                let mid = l.sends[i].acked.as_ref()?.2.clone();
                let open = match p.target {
                    Target::User(_) => !seen
                        .and_then(|d| d.statuses.get(&mid))
                        .is_some_and(|v| v.contains(&Status::Read)),
                    Target::Group(_) => group_open(seen, &mid),
                };
                open.then_some(mid)
            })
            .collect()
    };
    s.status_wanted.extend(unsettled);
    loop {
        let now = now_ms();
        if now >= ctx.end_ms {
            return End::Done;
        }
        let ctl = ctx.control(k);
        if ctl.generation != generation || ctl.away_until > now {
            if ctl.silent {
                return End::Vanished(Box::new(ws));
            }
            // Killed or backgrounded: the app closes the socket.
            return End::Away;
        }
        ctx.tap_due(k, now);
        // (Re)transmit what is pending: never sent here, or unacked for ack_timeout.
        let outbox = ctx
            .ledger
            .borrow()
            .devices
            .get(&k)
            .map(|d| d.outbox.clone())
            .unwrap_or_default();
        s.sent_at.retain(|i, _| outbox.contains(i));
        for i in outbox {
            let due = s
                .sent_at
                .get(&i)
                .is_none_or(|t| now >= t + cfg.ack_timeout_ms);
            // A file goes over the media lane first; the message then carries its id.
            let media_id = if ctx.plan.sends[i].media_bytes > 0 {
                let st = ctx.uploads.borrow().get(&i).cloned().unwrap_or_default();
                if !st.done {
                    if !st.running {
                        ctx.uploads.borrow_mut().entry(i).or_default().running = true;
                        tokio::task::spawn_local(crate::media::upload(ctx.clone(), k, i));
                    }
                    continue;
                }
                st.media_id
            } else {
                None
            };
            if due {
                s.sent_at.insert(i, now);
                let frame = send_frame(ctx, i, ctl.skew_ms, now, media_id.as_deref());
                {
                    let mut l = ctx.ledger.borrow_mut();
                    l.sends[i].attempts += 1;
                    l.sends[i].first_attempt_ms.get_or_insert(now);
                    l.sends[i].last_attempt_ms = Some(now);
                    let attempts = l.sends[i].attempts;
                    let cmid = ctx.plan.sends[i].cmid.clone();
                    l.trace(
                        now,
                        dev(k),
                        "send",
                        Some(&ctx.send_conv[i]),
                        None,
                        Some(&cmid),
                        if attempts > 1 {
                            format!("retry {}", attempts - 1)
                        } else {
                            String::new()
                        },
                    );
                }
                if let Err(e) = send(&mut ws, frame).await {
                    return End::Lost(e);
                }
            }
        }
        // The user is typing their next message: a notice every `typing_every_ms`.
        if let Some((i, due)) = ctx.typing(k, now, s.last_typing) {
            if due <= now {
                s.last_typing = Some(now);
                let conv = &ctx.send_conv[i];
                {
                    let mut l = ctx.ledger.borrow_mut();
                    l.typed.insert((k.0, conv.clone()));
                    l.trace(now, dev(k), "typing", Some(conv), None, None, "");
                }
                let f = json!({"type":"typing","payload":{"conversation_id":conv}});
                if let Err(e) = send(&mut ws, f.to_string()).await {
                    return End::Lost(e);
                }
            }
        }
        // An admin asks to grow a group (only ever past the cap: see `grow_at_ms`).
        for (g, spec) in ctx.sc.workload.groups.iter().enumerate() {
            let admin = ctx.plan.groups[g].admin;
            if k != (admin, 0)
                || spec.grow_at_ms.is_none_or(|t| t > now)
                || !ctx.grown.borrow_mut().insert(g)
            {
                continue;
            }
            let members = &ctx.plan.groups[g].members;
            let others: Vec<String> = (0..ctx.plan.users)
                .filter(|u| !members.contains(u))
                .map(user_name)
                .collect();
            let gid = &ctx.group_ids[g];
            ctx.ledger.borrow_mut().trace(
                now,
                dev(k),
                "group_add",
                Some(&format!("grp:{gid}")),
                None,
                None,
                format!("{} to a group of {}", others.join(", "), members.len()),
            );
            let f = json!({"type":"group_add","payload":{"group_id":gid,"user_ids":others}});
            if let Err(e) = send(&mut ws, f.to_string()).await {
                return End::Lost(e);
            }
        }
        // The admin changes a group's members (again on each connection until it sees the
        // change in a `group_update`).
        for (i, c) in ctx.plan.membership.iter().enumerate() {
            let admin = ctx.plan.groups[c.group].admin;
            let done = ctx.ledger.borrow().membership[i].confirmed_ms.is_some();
            if k != (admin, 0) || c.at_ms > now || done || !s.membership_sent.insert(i) {
                continue;
            }
            let gid = &ctx.group_ids[c.group];
            {
                let mut l = ctx.ledger.borrow_mut();
                l.membership[i].requested_ms.get_or_insert(now);
                l.trace(
                    now,
                    dev(k),
                    if c.op == "add" {
                        "group_add"
                    } else {
                        "group_remove"
                    },
                    Some(&format!("grp:{gid}")),
                    None,
                    None,
                    user_name(c.user),
                );
            }
            let f = json!({"type": format!("group_{}", c.op),
                "payload":{"group_id":gid,"user_ids":[user_name(c.user)]}});
            if let Err(e) = send(&mut ws, f.to_string()).await {
                return End::Lost(e);
            }
        }
        // Near the end of a long quiet phase, each user's first device asks for the
        // presence of the next user (one subscription: its answer cannot be shed on an
        // idle connection). The oracle compares the answer with who was connected.
        if k.1 == 0 && ctx.plan.users > 1 && presence_probe_at(ctx).is_some_and(|t| now >= t) {
            let first = ctx.ledger.borrow_mut().device(k).probe.is_none();
            if first {
                let x = (k.0 + 1) % ctx.plan.users;
                {
                    let mut l = ctx.ledger.borrow_mut();
                    l.device(k).probe = Some((now, x, s.began));
                    l.trace(
                        now,
                        dev(k),
                        "presence_subscribe",
                        None,
                        None,
                        None,
                        user_name(x),
                    );
                }
                let f = json!({"type":"presence_subscribe","payload":{"user_ids":[user_name(x)]}});
                if let Err(e) = send(&mut ws, f.to_string()).await {
                    return End::Lost(e);
                }
            }
        }
        // Unlink a device of this user (this one, or another), again on each connection
        // until the answer arrives.
        for (&target, &(at, by)) in &ctx.plan.unlinks {
            let done = ctx
                .ledger
                .borrow()
                .unlinks
                .get(&target)
                .is_some_and(|u| u.confirmed_ms.is_some());
            if k != (target.0, by) || at > now || done || !s.unlinks_sent.insert(target) {
                continue;
            }
            {
                let mut l = ctx.ledger.borrow_mut();
                l.unlinks
                    .entry(target)
                    .or_default()
                    .requested_ms
                    .get_or_insert(now);
                l.trace(now, dev(k), "device_unlink", None, None, None, dev(target));
            }
            let f = json!({"type":"device_unlink","payload":{"device_id":device_name(target.1)}});
            if let Err(e) = send(&mut ws, f.to_string()).await {
                return End::Lost(e);
            }
        }
        // Status answers are droppable: now and then, ask again for own 1:1 messages this
        // device has not seen delivered.
        if now >= s.next_status_sweep {
            s.status_sweep_every = if s.status_heard_since_sweep {
                STATUS_SWEEP_MIN_MS
            } else {
                (s.status_sweep_every * 2).min(STATUS_SWEEP_MS)
            };
            s.status_heard_since_sweep = false;
            s.next_status_sweep = now + s.status_sweep_every;
            let l = ctx.ledger.borrow();
            let seen = l.devices.get(&k);
            for (i, p) in ctx.plan.sends.iter().enumerate() {
                if p.user != k.0 {
                    continue;
                }
                let Some(a) = &l.sends[i].acked else { continue };
                let delivered = match p.target {
                    Target::User(_) => seen
                        .and_then(|d| d.statuses.get(&a.2))
                        .is_some_and(|v| v.iter().any(|st| *st >= Status::Delivered)),
                    Target::Group(_) => !group_open(seen, &a.2),
                };
                if !delivered && a.3 + STATUS_SWEEP_MS <= now {
                    s.status_wanted.insert(a.2.clone());
                }
            }
        }
        if let Err(e) = send_status_queries(ctx, k, &mut ws, &mut s).await {
            return End::Lost(e);
        }
        // Read receipts that are due.
        let due: Vec<String> = s
            .reads_due
            .iter()
            .filter(|(_, t)| **t <= now)
            .map(|(id, _)| id.clone())
            .collect();
        if !due.is_empty() {
            for id in &due {
                s.reads_due.remove(id);
            }
            {
                let mut l = ctx.ledger.borrow_mut();
                for id in &due {
                    l.reads_sent
                        .entry(id.clone())
                        .or_default()
                        .entry(k.0)
                        .or_insert(now);
                }
            }
            let f = json!({"type":"read_receipt","message_ids":due});
            if let Err(e) = send(&mut ws, f.to_string()).await {
                return End::Lost(e);
            }
        }
        if now >= s.last_heartbeat + cfg.heartbeat_ms {
            s.last_heartbeat = now;
            let acks = std::mem::take(&mut s.acks_since_heartbeat);
            s.heartbeats.push_back((now, acks));
            // Bounded like every other write: a heartbeat stuck behind a stalled stream
            // must end the session, not hang the phone.
            if let Err(e) = send(&mut ws, r#"{"type":"heartbeat"}"#.to_string()).await {
                return End::Lost(e);
            }
        }
        let slow = ctl.slow_rate.filter(|_| ctl.slow_until > now);
        if slow.is_none() && now > s.last_frame + cfg.idle_timeout_ms {
            return End::Lost("idle timeout");
        }
        let can_read = match slow {
            Some(0) => false,
            _ => now >= s.next_read_at,
        };
        tokio::select! {
            biased;
            m = ws.next(), if can_read => {
                let now = now_ms();
                s.last_frame = now;
                if let Some(rate) = slow {
                    s.next_read_at = now + 1000 / u64::from(rate.max(1));
                }
                match m {
                    Some(Ok(Message::Text(t))) => {
                        if let Ok(f) = serde_json::from_str::<ServerFrame>(t.as_str()) {
                            if let Err(e) = on_frame(ctx, k, &mut ws, &mut s, rng, f).await {
                                return End::Lost(e);
                            }
                        }
                    }
                    Some(Ok(Message::Close(_))) | None => return End::Lost("closed by server"),
                    Some(Ok(_)) => {}
                    Some(Err(_)) => return End::Lost("socket error"),
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(session_wake_in(ctx, k, &s, now, slow.is_some()))) => {}
        }
    }
}

/// When phones probe presence: 9 s before the end (room for a heartbeat of up to 8 s to
/// prove a connection was held past the answer), if the quiet phase lasts at least 15 s
/// (so every fault is long over and connections are idle).
pub fn presence_probe_at(ctx: &Ctx) -> Option<u64> {
    (ctx.sc.quiet_ms >= 15_000).then(|| ctx.end_ms.saturating_sub(9_000))
}

/// Longest a phone waits for one frame to leave before it gives the socket up. Without
/// it, a phone writing to a server that is itself blocked writing to the phone (both TCP
/// windows full) would wait forever.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends one text frame, bounded by `SEND_TIMEOUT`.
async fn send(ws: &mut Ws, text: String) -> Result<(), &'static str> {
    match tokio::time::timeout(SEND_TIMEOUT, ws.send(Message::text(text))).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err("send failed"),
        Err(_) => Err("send timed out"),
    }
}

/// How often a phone looks at what faults did to it (killed, backgrounded, slowed).
const CONTROL_POLL_MS: u64 = 250;

/// Sleep of a connected phone: until the earliest of its deadlines (next tap, heartbeat,
/// ack timeout, read receipt, idle timeout, next slow read), at most `CONTROL_POLL_MS`.
/// Waking only when something is due keeps 1,000-device runs cheap.
fn session_wake_in(ctx: &Ctx, k: DeviceKey, s: &Session, now: u64, slow: bool) -> u64 {
    let cfg = &ctx.sc.client;
    let mut next = now + wake_in(ctx, k, now);
    next = next.min(s.last_heartbeat + cfg.heartbeat_ms);
    if !slow {
        next = next.min(s.last_frame + cfg.idle_timeout_ms + 1);
    } else {
        next = next.min(s.next_read_at.max(now + 1));
    }
    if let Some(t) = s.reads_due.values().min() {
        next = next.min(*t);
    }
    if !s.status_wanted.is_empty() {
        next = next.min(s.status_next_at.max(now + 1));
    }
    next = next.min(s.next_status_sweep.max(now + 1));
    if let Some((_, t)) = ctx.typing(k, now, s.last_typing) {
        next = next.min(t);
    }
    for (g, spec) in ctx.sc.workload.groups.iter().enumerate() {
        if let Some(t) = spec.grow_at_ms {
            if k == (ctx.plan.groups[g].admin, 0) && !ctx.grown.borrow().contains(&g) {
                next = next.min(t.max(now + 1));
            }
        }
    }
    if let Some(t) = s.sent_at.values().min() {
        next = next.min(t + cfg.ack_timeout_ms);
    }
    next.saturating_sub(now).clamp(1, CONTROL_POLL_MS)
}

/// How long to sleep before the loop must look again: at most 50 ms, less when a tap is due
/// sooner (so a send leaves at the moment the user taps, not on the next poll).
fn wake_in(ctx: &Ctx, k: DeviceKey, now: u64) -> u64 {
    let cap = CONTROL_POLL_MS;
    match ctx.next_tap(k) {
        Some(t) if t > now => (t - now).min(cap),
        Some(_) => 1,
        None => cap,
    }
}

fn send_frame(ctx: &Ctx, i: usize, skew_ms: i64, now: u64, media_id: Option<&str>) -> String {
    let s = &ctx.plan.sends[i];
    let sender = user_name(s.user);
    let conv = &ctx.send_conv[i];
    let pt = crypto::plaintext(&sender, &s.cmid);
    let content = crypto::seal(ctx.seed, conv, &sender, &s.cmid, &pt);
    let ts = (EPOCH_MS + now) as i64 + skew_ms;
    match s.target {
        Target::User(u) => json!({"type":"message","client_message_id":s.cmid,
            "payload":{"receiver_id":user_name(u),"content":content,"timestamp":ts.max(0),"media_id":media_id}}),
        Target::Group(g) => json!({"type":"group_message","client_message_id":s.cmid,
            "payload":{"group_id":ctx.group_ids[g],"content":content,"timestamp":ts.max(0),"media_id":media_id}}),
    }
    .to_string()
}

/// Records an ack (or a 409 carrying the original id) for send `i`. Returns true when the
/// ack answered a retry: the first attempt may have been stored, delivered and read while
/// the ack and the receipts were lost with the old socket, so ask for its status.
fn on_acked(ctx: &Ctx, k: DeviceKey, i: usize, conv: &str, seq: u64, mid: &str) -> bool {
    let now = now_ms();
    let mut l = ctx.ledger.borrow_mut();
    // An ack promises the message survives a crash of the chat service and the loss of its
    // region: look at the simulated disk now, not after a crash.
    let cmid = &ctx.plan.sends[i].cmid;
    let (durable, replicated) = ctx.disk.durable_and_replicated(conv, seq, cmid);
    // (An ack that took longer than retention to arrive may answer a message the server
    // has rightly deleted since.)
    let expired = l.sends[i]
        .first_attempt_ms
        .is_some_and(|t| crate::horizon::may_have_expired(&ctx.clock, t, now, ctx.retention_ms));
    if !(expired || durable && replicated) {
        l.breach(
            crate::invariant::ViolationKind::NotDurable,
            now,
            Some(conv),
            Some(dev(k)),
            Some(cmid),
            format!("{mid} ({cmid}) durable and replicated when its ack arrives"),
            format!(
                "{} at the ack",
                match (durable, replicated) {
                    (false, false) => "neither on disk nor on the replica",
                    (false, true) => "not on disk",
                    _ => "not on the replica",
                }
            ),
        );
    }
    let first = l.sends[i].acked.is_none();
    l.sends[i].seqs_seen.insert((conv.to_string(), seq));
    if first {
        l.sends[i].acked = Some((conv.to_string(), seq, mid.to_string(), now));
        l.send_by_message.insert(mid.to_string(), i);
    }
    let d = l.device(k);
    d.outbox.retain(|x| *x != i);
    d.shown.entry(mid.to_string()).or_insert(Shown {
        conv: conv.to_string(),
        seq,
        message_id: mid.to_string(),
        sender: k.0,
        cmid: ctx.plan.sends[i].cmid.clone(),
        at_ms: now,
    });
    let cmid = ctx.plan.sends[i].cmid.clone();
    l.trace(
        now,
        dev(k),
        "ack",
        Some(conv),
        Some(seq),
        Some(&cmid),
        if first { "" } else { "again" },
    );
    first && l.sends[i].attempts > 1 && matches!(ctx.plan.sends[i].target, Target::User(_))
}

/// Sends the status queries that are due: one `status_query` of up to 256 ids.
async fn send_status_queries(
    ctx: &Ctx,
    k: DeviceKey,
    ws: &mut Ws,
    s: &mut Session,
) -> Result<(), &'static str> {
    if s.status_wanted.is_empty() || now_ms() < s.status_next_at {
        return Ok(());
    }
    let mut ids: Vec<String> = s.status_wanted.iter().cloned().collect();
    ids.sort_by_key(|id| s.status_heard.get(id).copied().unwrap_or(0));
    ids.truncate(256);
    for id in &ids {
        s.status_wanted.remove(id);
        s.status_asked.insert(id.clone());
    }
    ctx.ledger.borrow_mut().trace(
        now_ms(),
        dev(k),
        "status_query",
        None,
        None,
        None,
        ids.join(", "),
    );
    send(
        ws,
        json!({"type":"status_query","message_ids":ids}).to_string(),
    )
    .await
}

async fn on_frame(
    ctx: &Rc<Ctx>,
    k: DeviceKey,
    ws: &mut Ws,
    s: &mut Session,
    rng: &mut SmallRng,
    f: ServerFrame,
) -> Result<(), &'static str> {
    match f {
        ServerFrame::MessageAck {
            client_message_id,
            payload,
        } => {
            if let Some(&i) = ctx.cmid_index.get(client_message_id.as_str()) {
                let mid = payload.message_id.as_str();
                if on_acked(
                    ctx,
                    k,
                    i,
                    payload.conversation_id.as_str(),
                    payload.seq.0,
                    mid,
                ) {
                    s.status_wanted.insert(mid.to_string());
                }
            }
        }
        ServerFrame::HeartbeatAck { .. } => {
            // Everything acked before the oldest heartbeat in flight has been read.
            if let Some((sent, acks)) = s.heartbeats.pop_front() {
                let mut l = ctx.ledger.borrow_mut();
                let d = l.device(k);
                d.acks_confirmed.extend(acks);
                match d.answered.last_mut() {
                    Some(last) if last.0 == s.began => last.1 = sent,
                    _ => d.answered.push((s.began, sent)),
                }
            }
        }
        ServerFrame::GroupUpdate { payload } => {
            let now = now_ms();
            let mut l = ctx.ledger.borrow_mut();
            for (i, c) in ctx.plan.membership.iter().enumerate() {
                if ctx.group_ids[c.group] != payload.group_id.as_str()
                    || l.membership[i].requested_ms.is_none()
                    || l.membership[i].confirmed_ms.is_some()
                {
                    continue;
                }
                let member = payload
                    .members
                    .iter()
                    .any(|m| m.as_str() == user_name(c.user));
                if member == (c.op == "add") {
                    l.membership[i].confirmed_ms = Some(now);
                    l.trace(
                        now,
                        dev(k),
                        "group_update",
                        Some(payload.conversation_id.as_str()),
                        None,
                        None,
                        format!("{} {}", c.op, user_name(c.user)),
                    );
                }
            }
        }
        ServerFrame::DeviceUnlinked { payload } => {
            let now = now_ms();
            let target = ctx
                .plan
                .unlinks
                .keys()
                .find(|t| t.0 == k.0 && device_name(t.1) == payload.device_id.as_str())
                .copied();
            if let Some(t) = target {
                let mut l = ctx.ledger.borrow_mut();
                l.unlinks
                    .entry(t)
                    .or_default()
                    .confirmed_ms
                    .get_or_insert(now);
                l.trace(now, dev(k), "device_unlinked", None, None, None, dev(t));
            }
        }
        ServerFrame::Error { payload } => {
            let now = now_ms();
            let cmid = payload.client_message_id.as_ref().map(|c| c.0.clone());
            match (
                payload.code,
                cmid.as_deref().and_then(|c| ctx.cmid_index.get(c)),
            ) {
                (409, Some(&i)) => {
                    if let (Some(conv), Some(seq), Some(mid)) =
                        (&payload.conversation_id, payload.seq, &payload.message_id)
                    {
                        if on_acked(ctx, k, i, conv.as_str(), seq.0, mid.as_str()) {
                            s.status_wanted.insert(mid.to_string());
                        }
                    }
                }
                (429, None) => {
                    // A refused status query (the only frame without an id that costs a
                    // send token): ask again for what is not settled, later.
                    let wait = payload.retry_after_ms.unwrap_or(1000);
                    s.status_next_at = now + wait;
                    let l = ctx.ledger.borrow();
                    let asked = std::mem::take(&mut s.status_asked);
                    s.status_wanted.extend(asked.into_iter().filter(|id| {
                        !l.devices
                            .get(&k)
                            .and_then(|d| d.statuses.get(id))
                            .is_some_and(|v| v.contains(&Status::Read))
                    }));
                }
                (429, Some(&i)) => {
                    let wait = payload.retry_after_ms.unwrap_or(1000);
                    s.sent_at.insert(i, now + wait);
                    ctx.ledger.borrow_mut().sends[i].rate_limited = true;
                }
                (400, Some(&i))
                    if ctx.plan.sends[i].media_bytes > 0
                        && payload.message.contains("unknown media_id") =>
                {
                    // The upload is gone (retention swept it while the message waited):
                    // the app still has the file, so it uploads it again and resends.
                    ctx.uploads.borrow_mut().remove(&i);
                    s.sent_at.remove(&i);
                }
                (400 | 403 | 404 | 413, Some(&i)) => {
                    // A final refusal: the app shows "not sent" and gives the message up.
                    let mut l = ctx.ledger.borrow_mut();
                    if l.sends[i].acked.is_none() {
                        l.sends[i].refused.get_or_insert((payload.code, now));
                        l.device(k).outbox.retain(|x| *x != i);
                    }
                }
                _ => {}
            }
            ctx.ledger.borrow_mut().trace(
                now,
                dev(k),
                "error",
                None,
                payload.seq.map(|x| x.0),
                cmid.as_deref(),
                format!("{} {}", payload.code, payload.message),
            );
        }
        ServerFrame::Message { payload } | ServerFrame::GroupMessage { payload } => {
            receive(ctx, k, ws, s, rng, payload, false).await?;
        }
        ServerFrame::SyncPage { payload } => {
            // A page of one conversation answers the phone's own `after_seq`: resending what
            // it has is then what it asked for, not a redelivery.
            let asked = payload.conversation_id.is_some();
            for m in payload.messages {
                receive(ctx, k, ws, s, rng, m, asked).await?;
            }
            if !asked && !payload.has_more {
                if let Some(start) = s.sync_started.take() {
                    ctx.ledger
                        .borrow_mut()
                        .device(k)
                        .syncs
                        .push((start, now_ms()));
                }
            }
            if payload.has_more {
                let mut p = json!({"cursor":payload.next_cursor});
                if let Some(c) = &payload.conversation_id {
                    p["conversation_id"] = json!(c);
                }
                if ctx.sc.client.sync_limit > 0 {
                    p["limit"] = json!(ctx.sc.client.sync_limit);
                }
                send(ws, json!({"type":"sync","payload":p}).to_string()).await?;
            }
        }
        ServerFrame::GroupReceipt { payload } => {
            check_group_receipt(ctx, k, &payload);
            s.status_heard
                .insert(payload.message_id.0.clone(), now_ms());
            s.status_heard_since_sweep = true;
            ctx.ledger.borrow_mut().trace(
                now_ms(),
                dev(k),
                "group_receipt",
                Some(payload.conversation_id.as_str()),
                Some(payload.seq.0),
                None,
                format!(
                    "delivered to {} of {}, read by {}",
                    payload.delivered, payload.recipients, payload.read
                ),
            );
        }
        ServerFrame::Presence { payload } => {
            let now = now_ms();
            let mut l = ctx.ledger.borrow_mut();
            let d = l.device(k);
            if let Some((_, x, began)) = d.probe {
                if began == s.began && payload.user_id.as_str() == user_name(x) {
                    let online = payload.status == model_server::protocol::PresenceStatus::Online;
                    d.probe_answers.push((now, online));
                }
            }
        }
        ServerFrame::Typing { payload } => {
            check_typing(ctx, k, &payload);
            ctx.ledger.borrow_mut().trace(
                now_ms(),
                dev(k),
                "typing_seen",
                Some(payload.conversation_id.as_str()),
                None,
                None,
                payload.user_id.as_str(),
            );
        }
        ServerFrame::DeliveryAck { payload } | ServerFrame::ReadReceipt { payload } => {
            let now = now_ms();
            check_receipt(ctx, k, &payload);
            for id in &payload.message_ids {
                s.status_heard.insert(id.0.clone(), now);
            }
            s.status_heard_since_sweep = true;
            let mut l = ctx.ledger.borrow_mut();
            for id in &payload.message_ids {
                l.device(k)
                    .statuses
                    .entry(id.0.clone())
                    .or_default()
                    .push(payload.status);
            }
            if payload.status == Status::Read {
                for id in &payload.message_ids {
                    if let Some(&i) = l.send_by_message.get(id.as_str()) {
                        l.sends[i].read_ms.get_or_insert(now);
                    }
                }
            }
            let ev = if payload.status == Status::Read {
                "read_receipt"
            } else {
                "delivery_receipt"
            };
            let seqs: Vec<&str> = payload
                .message_ids
                .iter()
                .filter_map(|id| id.as_str().rsplit_once('#').map(|(_, s)| s))
                .collect();
            l.trace(
                now,
                dev(k),
                ev,
                Some(payload.conversation_id.as_str()),
                None,
                None,
                format!(
                    "seq{} {} by {}",
                    if seqs.len() == 1 { "" } else { "s" },
                    seqs.join(", "),
                    payload.by
                ),
            );
        }
        _ => {}
    }
    Ok(())
}

/// The highest seq of `conv` this device shows with every lower one shown too.
fn contiguous_seq(l: &Ledger, k: DeviceKey, conv: &str) -> u64 {
    let Some(d) = l.devices.get(&k) else {
        return 0;
    };
    let seqs: std::collections::BTreeSet<u64> = d
        .shown
        .values()
        .filter(|x| x.conv == conv)
        .map(|x| x.seq)
        .collect();
    let mut n = 0;
    while seqs.contains(&(n + 1)) {
        n += 1;
    }
    n
}

/// Users who are (or may be) in the conversation other than `sender`: the 1:1 partner, or
/// every user ever in the group.
fn others_in(ctx: &Ctx, conv: &str, sender: usize) -> Vec<usize> {
    (0..ctx.plan.users)
        .filter(|u| *u != sender && ctx.user_convs.get(u).is_some_and(|c| c.contains(conv)))
        .collect()
}

/// A typing notice goes only to the other participants' devices, and only after that
/// user typed in that conversation.
fn check_typing(ctx: &Ctx, k: DeviceKey, p: &model_server::protocol::TypingNotice) {
    let conv = p.conversation_id.as_str();
    let typist = p
        .user_id
        .as_str()
        .strip_prefix('u')
        .and_then(|x| x.parse::<usize>().ok());
    let member = ctx.user_convs.get(&k.0).is_some_and(|c| c.contains(conv));
    let mut l = ctx.ledger.borrow_mut();
    let typed = typist.is_some_and(|t| l.typed.contains(&(t, conv.to_string())));
    let wrong = if typist == Some(k.0) {
        Some("the typist's own device")
    } else if !member {
        Some("a device whose user is not in the conversation")
    } else if !typed {
        Some("a notice for a user who never typed there")
    } else {
        None
    };
    if let Some(what) = wrong {
        l.breach(
            crate::invariant::ViolationKind::Typing,
            now_ms(),
            Some(conv),
            Some(dev(k)),
            None,
            format!(
                "typing of {} in {conv} only on the other participants' devices, after they typed",
                p.user_id.as_str()
            ),
            format!("reached {what}"),
        );
    }
}

/// A receipt must not claim more than happened: ✓✓ only once some recipient device shows
/// the message, blue only once some recipient sent a read receipt for it.
fn check_receipt(ctx: &Ctx, k: DeviceKey, p: &model_server::protocol::ReceiptPayload) {
    let now = now_ms();
    let mut l = ctx.ledger.borrow_mut();
    let conv = p.conversation_id.as_str();
    for id in &p.message_ids {
        let mid = id.as_str();
        let happened = match p.status {
            Status::Read => l.reads_sent.contains_key(mid),
            _ => others_in(ctx, conv, k.0).iter().any(|u| {
                (0..ctx.plan.devices_per_user).any(|d| {
                    l.devices
                        .get(&(*u, d))
                        .is_some_and(|dl| dl.shown.contains_key(mid))
                })
            }),
        };
        if !happened {
            let what = if p.status == Status::Read {
                "a recipient sent a read receipt"
            } else {
                "a recipient device shows it"
            };
            l.breach(
                crate::invariant::ViolationKind::FalseReceipt,
                now,
                Some(conv),
                Some(dev(k)),
                None,
                format!("{:?} for {mid} only after {what}", p.status),
                format!("{:?} before that", p.status),
            );
        }
    }
}

/// Whether this device has seen no counts for its group message `mid` yet, or counts that
/// do not yet show every recipient the server counts delivered.
fn group_open(seen: Option<&crate::ledger::DeviceLog>, mid: &str) -> bool {
    let Some(d) = seen else { return true };
    match (d.group_counts.get(mid), d.group_recipients.get(mid)) {
        (Some(c), Some(n)) => c.0 < *n,
        _ => true,
    }
}

/// Group receipt counts never go backward and never exceed what recipients did.
fn check_group_receipt(ctx: &Ctx, k: DeviceKey, p: &model_server::protocol::GroupReceiptPayload) {
    let now = now_ms();
    let mut l = ctx.ledger.borrow_mut();
    let conv = p.conversation_id.as_str();
    let mid = format!("{conv}#{}", p.seq.0);
    let others = others_in(ctx, conv, k.0);
    let showing = others
        .iter()
        .filter(|u| {
            (0..ctx.plan.devices_per_user).any(|d| {
                l.devices
                    .get(&(**u, d))
                    .is_some_and(|dl| dl.shown.contains_key(&mid))
            })
        })
        .count() as u64;
    let reading = l.reads_sent.get(&mid).map_or(0, |r| r.len()) as u64;
    if p.delivered > showing || p.read > reading {
        l.breach(
            crate::invariant::ViolationKind::FalseReceipt,
            now,
            Some(conv),
            Some(dev(k)),
            None,
            format!(
                "group receipt for {mid}: delivered <= {showing} users showing it, read <= {reading} users who read it"
            ),
            format!("delivered {} read {}", p.delivered, p.read),
        );
    }
    let last = l.device(k).group_counts.get(&mid).copied();
    if let Some((d0, r0)) = last {
        if p.delivered < d0 || p.read < r0 {
            l.breach(
                crate::invariant::ViolationKind::ReceiptRegression,
                now,
                Some(conv),
                Some(dev(k)),
                None,
                format!("group receipt counts of {mid} never decrease"),
                format!("delivered {d0} -> {}, read {r0} -> {}", p.delivered, p.read),
            );
        }
    }
    let (d0, r0) = last.unwrap_or((0, 0));
    let dl = l.device(k);
    dl.group_recipients.insert(mid.clone(), p.recipients);
    dl.group_counts
        .insert(mid, (d0.max(p.delivered), r0.max(p.read)));
}

/// A message arrived (live or by sync): show it once, ack it, maybe read it later.
/// `asked`: it came in a page of the phone's own per-conversation `after_seq` sync.
async fn receive(
    ctx: &Rc<Ctx>,
    k: DeviceKey,
    ws: &mut Ws,
    s: &mut Session,
    rng: &mut SmallRng,
    m: DeliveredMessage,
    asked: bool,
) -> Result<(), &'static str> {
    let now = now_ms();
    let conv = m.conversation_id.as_str().to_string();
    let id = m.message_id.0.clone();
    let pt = crypto::open(ctx.seed, &conv, &m.content);
    let (sender, cmid) = pt
        .as_deref()
        .and_then(crypto::parse_plaintext)
        .unwrap_or_default();
    let sender_idx = sender
        .strip_prefix('u')
        .and_then(|x| x.parse().ok())
        .unwrap_or(usize::MAX);
    let fresh = {
        let mut l = ctx.ledger.borrow_mut();
        let d = l.device(k);
        if d.shown.contains_key(&id) {
            d.redeliveries += 1;
            let needless = !asked && d.acks_confirmed.contains(&id);
            if needless {
                l.breach(
                    crate::invariant::ViolationKind::Redelivery,
                    now,
                    Some(&conv),
                    Some(dev(k)),
                    Some(&cmid),
                    format!("{id} not sent again: the server had read this device's ack"),
                    "sent again".into(),
                );
            }
            false
        } else {
            d.shown.insert(
                id.clone(),
                Shown {
                    conv: conv.clone(),
                    seq: m.seq.0,
                    message_id: id.clone(),
                    sender: sender_idx,
                    cmid: cmid.clone(),
                    at_ms: now,
                },
            );
            l.trace(
                now,
                dev(k),
                "deliver",
                Some(&conv),
                Some(m.seq.0),
                Some(&cmid),
                if pt.is_none() { "undecryptable" } else { "" },
            );
            true
        }
    };
    // A pointer to a file: fetch it over the media lane, beside the socket.
    if let (Some(media_id), Some(&i)) = (&m.media_id, ctx.cmid_index.get(cmid.as_str())) {
        if ctx.downloads.borrow_mut().insert((k, i)) {
            tokio::task::spawn_local(crate::media::download(
                ctx.clone(),
                k,
                i,
                media_id.0.clone(),
            ));
        }
    }
    send(
        ws,
        json!({"type":"delivery_ack","message_id":id}).to_string(),
    )
    .await?;
    s.acks_since_heartbeat.push(id.clone());
    // A 1:1 message this user sent from another device: its receipts may have been
    // pushed before this device was online (or linked), so ask for its status.
    if fresh && sender_idx == k.0 && conv.starts_with("dm:") {
        s.status_wanted.insert(id.clone());
    }
    if fresh && sender_idx != k.0 && rng.random_bool(ctx.sc.client.read_probability.clamp(0.0, 1.0))
    {
        let [lo, hi] = ctx.sc.client.read_delay_ms;
        s.reads_due
            .insert(id, now + rng.random_range(lo..=hi.max(lo)));
    }
    Ok(())
}

//! Builds the turmoil simulation of a scenario and drives it: hosts for the chat service
//! timers, every gateway and every client pool; the fault timeline applied between steps;
//! the quiet phase; then the record handed to the oracle.

use crate::client::{self, now_ms, Control, Ctx, EPOCH_MS};
use crate::disk::SimDisk;
use crate::horizon::ServerClock;
use crate::ledger::{Ledger, SendLog};
use crate::plan::{user_name, Plan, Target};
use crate::scenario::{FaultKind, Scenario};
use model_server::auth::Secret;
use model_server::core::Stats;
use model_server::ids::{ConversationId, GroupId, Millis, UserId};
use model_server::runtime::link::gateway::TurmoilConnector;
use model_server::runtime::link::{ChatLinks, GatewayNode, LinkConfig};
use model_server::runtime::{Clock, FaultPoints, Hub, RuntimeConfig, Server, Spawner};
use model_server::store::MemoryStore;
use model_server::Limits;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use crate::scenario::TCP_CAPACITY;

/// Port of the chat service's gateway links on host `chat` (tiered topology).
const LINK_PORT: u16 = 9000;
/// Port of the chat service's HTTP side (the media lane) on host `chat` (tiered).
const MEDIA_PORT: u16 = 8080;

/// Secret the simulated identity service signs tokens with.
pub const SIM_SECRET: &[u8] = b"chatsim-simulation-secret";

/// Options of one run beyond the scenario.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Planted bugs to switch on in the server.
    pub bugs: model_server::config::Bugs,
}

/// Everything a finished run leaves for the oracle and the report.
pub struct Outcome {
    pub seed: u64,
    /// The concrete scenario that ran (a swarm's design space resolved for this seed).
    pub scenario: Scenario,
    /// Knobs the seed drew from the design space, (name, value), in drawing order.
    pub knobs: Vec<(String, String)>,
    pub plan: Plan,
    pub ledger: Ledger,
    pub store: MemoryStore,
    pub stats: Stats,
    pub limits: Limits,
    /// Users the server considers online at the end.
    pub online_at_end: Vec<bool>,
    /// Number of simulation steps taken.
    pub steps: u64,
    /// Simulated ms at which the run ended (fault phase plus quiet phase).
    pub end_ms: u64,
    /// How the server's clock was stepped during the run.
    pub clock: ServerClock,
}

/// A fault action at a point in time.
#[derive(Clone, Debug)]
enum Action {
    Begin(usize),
    End(usize),
}

/// Runs `sc` with `seed`, checking every line the server logs meanwhile for plaintext.
pub fn run(sc: &Scenario, seed: u64, opts: &RunOptions) -> Result<Outcome, String> {
    let logs = crate::logcheck::LogCheck::default();
    let mut out =
        tracing::subscriber::with_default(logs.clone(), || run_logged(sc, seed, opts, &logs))?;
    for what in logs.hits().into_iter().take(5) {
        out.ledger.breach(
            crate::invariant::ViolationKind::Plaintext,
            0,
            None,
            None,
            None,
            "no plaintext in any line the chat service logs".into(),
            format!("a {what} log event carried message content (the plaintext marker or a body a phone sent)"),
        );
    }
    Ok(out)
}

fn run_logged(
    sc: &Scenario,
    seed: u64,
    opts: &RunOptions,
    logs: &crate::logcheck::LogCheck,
) -> Result<Outcome, String> {
    let drawn = crate::space::draw(sc, seed)?;
    let sc = &drawn.scenario;
    let _capture = panics::capture();
    let limits = sc.limits()?;
    let plan = Plan::draw(sc, seed);
    let secret = Secret::new(SIM_SECRET.to_vec()).map_err(|e| e.to_string())?;
    let mut bugs = opts.bugs.clone();
    for b in &sc.design_flaws {
        bugs.enable(b)?;
    }
    let opts = &RunOptions { bugs };
    let mut disk = SimDisk::new(
        opts.bugs.ack_before_persist,
        opts.bugs.async_replication_failover,
    );
    // Group commit, unless the planted bug acks before persisting (which it models by a
    // disk that lags without syncs).
    let group_commit_ms = sc
        .topology
        .group_commit_ms
        .filter(|_| !opts.bugs.ack_before_persist);
    if group_commit_ms.is_some() {
        disk = if sc.topology.torn_writes {
            disk.torn_group_commit(seed ^ 0x6772_6f75_7063_6f6d)
        } else {
            disk.overlay_group_commit()
        };
    }
    let pushes: Arc<Mutex<Vec<crate::ledger::PushRecord>>> = Arc::default();
    let sink_pushes = pushes.clone();
    let hub = Hub::new(
        limits.clone(),
        secret.clone(),
        disk.store(),
        Some(Box::new(move |p| {
            if let Ok(mut v) = sink_pushes.lock() {
                v.push((now_ms(), p.user.to_string(), p.pending, p.preview.clone()));
            }
        })),
    );
    hub.with_core(|c| {
        c.set_bugs(opts.bugs.clone());
        c.enable_event_log();
    });
    hub.watch_queues();
    let faults = Arc::new(crate::buggify::ServerFaults::new(
        disk.clone(),
        limits.clone(),
        secret.clone(),
        opts.bugs.clone(),
    ));
    let armed = plan.faults.iter().any(|f| f.kind.inside_server());
    if armed {
        // Armed only when the timeline uses them: otherwise the server runs unhooked.
        hub.arm_faults(faults.clone());
    }
    // Every phone is linked to its account before the run (but those `[[workload.links]]`
    // link during it): messages wait for all of them.
    for u in 0..plan.users {
        for d in 0..plan.devices_per_user {
            if plan.links.contains_key(&(u, d)) {
                continue;
            }
            hub.with_core(|c| {
                c.admin_register_device(
                    &UserId(user_name(u)),
                    &model_server::ids::DeviceId(crate::plan::device_name(d)),
                )
            })?;
        }
    }
    // Groups exist before the run (their creation is not what is under test here).
    let mut group_ids = Vec::new();
    for g in &plan.groups {
        let members: Vec<UserId> = g.members.iter().map(|m| UserId(user_name(*m))).collect();
        let gid = hub
            .with_core(|c| {
                c.admin_create_group(
                    &UserId(user_name(g.admin)),
                    &members,
                    g.announcement_only,
                    Millis(EPOCH_MS),
                )
            })
            .map_err(|e| format!("creating group: {e}"))?;
        group_ids.push(gid.0);
    }
    let send_conv: Vec<String> = plan
        .sends
        .iter()
        .map(|s| match s.target {
            Target::User(u) => {
                ConversationId::direct(&UserId(user_name(s.user)), &UserId(user_name(u))).0
            }
            Target::Group(g) => ConversationId::group(&GroupId(group_ids[g].clone())).0,
        })
        .collect();
    // Every body the phones will send, so a server log line carrying one is caught.
    for (i, s) in plan.sends.iter().enumerate() {
        let sender = user_name(s.user);
        let pt = crate::crypto::plaintext(&sender, &s.cmid);
        logs.watch_body(crate::crypto::seal(
            seed,
            &send_conv[i],
            &sender,
            &s.cmid,
            &pt,
        ));
    }
    // The conversations each user takes part in (at any time of the run).
    let mut user_convs: BTreeMap<usize, std::collections::BTreeSet<String>> = BTreeMap::new();
    for (i, s) in plan.sends.iter().enumerate() {
        user_convs
            .entry(s.user)
            .or_default()
            .insert(send_conv[i].clone());
        if let Target::User(u) = s.target {
            user_convs
                .entry(u)
                .or_default()
                .insert(send_conv[i].clone());
        }
    }
    for (g, pg) in plan.groups.iter().enumerate() {
        let conv = ConversationId::group(&GroupId(group_ids[g].clone())).0;
        for m in &pg.members {
            user_convs.entry(*m).or_default().insert(conv.clone());
        }
        for c in plan.membership.iter().filter(|c| c.group == g) {
            user_convs.entry(c.user).or_default().insert(conv.clone());
        }
    }
    let mut device_sends: BTreeMap<(usize, usize), Vec<usize>> = BTreeMap::new();
    for (i, s) in plan.sends.iter().enumerate() {
        device_sends.entry((s.user, s.device)).or_default().push(i);
    }
    let mut ledger = Ledger {
        sends: vec![SendLog::default(); plan.sends.len()],
        membership: vec![Default::default(); plan.membership.len()],
        quiet_from_ms: sc.duration_ms,
        ..Ledger::default()
    };
    for u in 0..plan.users {
        for d in 0..plan.devices_per_user {
            ledger.device((u, d));
        }
    }
    let end_ms = sc.duration_ms + sc.quiet_ms;
    let ctx = Rc::new(Ctx {
        sc: sc.clone(),
        plan: plan.clone(),
        seed,
        secret: secret.clone(),
        ledger: Rc::new(RefCell::new(ledger)),
        control: Rc::new(RefCell::new(BTreeMap::new())),
        device_sends,
        send_conv,
        group_ids,
        cmid_index: plan
            .sends
            .iter()
            .enumerate()
            .map(|(i, s)| (s.cmid.clone(), i))
            .collect(),
        tapped: RefCell::new(BTreeMap::new()),
        grown: RefCell::new(Default::default()),
        uploads: RefCell::new(Default::default()),
        downloads: RefCell::new(Default::default()),
        end_ms,
        disk: disk.clone(),
        user_convs,
        retention_ms: limits.retention_ms,
        clock: ServerClock::from_jumps(
            plan.faults
                .iter()
                .filter(|f| f.kind == FaultKind::ClockJump)
                .map(|f| (f.at_ms, f.skew_ms.unwrap_or(0)))
                .collect(),
        ),
        session_tokens: RefCell::default(),
    });

    let mut builder = turmoil::Builder::new();
    if sc.topology.random_order {
        // Hosts run in an order drawn from the seed at every step.
        builder.enable_random_order();
    }
    let mut sim = builder
        .rng_seed(seed)
        .epoch(std::time::UNIX_EPOCH + Duration::from_millis(EPOCH_MS))
        .simulation_duration(Duration::from_millis(end_ms + 60_000))
        .tick_duration(Duration::from_millis(sc.tick_ms))
        .min_message_latency(Duration::from_millis(sc.topology.latency_ms[0]))
        .max_message_latency(Duration::from_millis(sc.topology.latency_ms[1]))
        .tcp_capacity(sc.topology.tcp_segments)
        .build();

    let tiered = sc.topology.tiered;
    // The chat service's timers and, tiered, its end of the gateway links.
    {
        let hub = hub.clone();
        let disk = disk.clone();
        let faults = faults.clone();
        sim.host("chat", move || {
            let hub = hub.clone();
            let disk = disk.clone();
            let faults = faults.clone();
            async move {
                if tiered {
                    let links = ChatLinks::new(
                        hub.clone(),
                        LinkConfig::default(),
                        Clock::starting_at(EPOCH_MS + now_ms()),
                        Spawner::Local,
                    );
                    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", LINK_PORT)).await?;
                    let (stop_tx, stop) = tokio::sync::watch::channel(false);
                    tokio::task::spawn_local(async move {
                        let _keep = stop_tx;
                        links.serve(listener, stop).await;
                    });
                    // The media lane, which gateway nodes pass requests through to.
                    let media = Server::http_only(
                        hub.clone(),
                        RuntimeConfig {
                            gateway: "chat".into(),
                            spawner: Spawner::Local,
                            run_timers: false,
                            ..RuntimeConfig::default()
                        },
                        Clock::starting_at(EPOCH_MS + now_ms()),
                    );
                    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", MEDIA_PORT)).await?;
                    tokio::task::spawn_local(media.serve(listener));
                }
                if let Some(ms) = group_commit_ms {
                    // Group-commit rounds: each takes `ms` (the fsync; a crash during it
                    // loses the round) and a paused chat service starts none until it
                    // resumes.
                    let hub = hub.clone();
                    let faults = faults.clone();
                    tokio::task::spawn_local(async move {
                        let mut retry = false;
                        loop {
                            if !retry {
                                hub.commit_wanted().await;
                            }
                            while faults.frozen("chat", now_ms()) {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            let fsync = Duration::from_millis(ms.max(1));
                            retry = hub.sync_round(false, fsync).await.is_err();
                            if retry {
                                // Nothing was released; the same round again, later.
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                        }
                    });
                }
                loop {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    if faults.frozen("chat", now_ms()) {
                        continue;
                    }
                    let now = faults.server_now(now_ms());
                    hub.act(|c| c.tick(now));
                    disk.flush();
                }
            }
        });
    }
    let armed: Option<Arc<dyn FaultPoints>> = armed.then(|| faults.clone() as Arc<dyn FaultPoints>);
    for (gw, region) in sc.gateways() {
        let hub = hub.clone();
        let name = gw.clone();
        let secret = secret.clone();
        let armed = armed.clone();
        sim.host(name.as_str(), move || {
            let hub = hub.clone();
            let (gw, region) = (gw.clone(), region.clone());
            let secret = secret.clone();
            let armed = armed.clone();
            async move {
                let listener = turmoil::net::TcpListener::bind(("0.0.0.0", 8080)).await?;
                let cfg = RuntimeConfig {
                    gateway: gw.as_str().into(),
                    region: region.as_str().into(),
                    spawner: Spawner::Local,
                    run_timers: false,
                    ..RuntimeConfig::default()
                };
                let clock = Clock::starting_at(EPOCH_MS + now_ms());
                if tiered {
                    let node = GatewayNode::new(cfg, LinkConfig::default(), &secret, clock, armed);
                    let chat = TurmoilConnector {
                        host: "chat".into(),
                        port: LINK_PORT,
                        media_port: Some(MEDIA_PORT),
                    };
                    node.serve(listener, chat).await;
                } else {
                    Server::on_hub(hub, cfg, clock).serve(listener).await;
                }
                Ok(())
            }
        });
    }
    for (h, host) in sc.client_hosts().into_iter().enumerate() {
        let ctx = ctx.clone();
        let mine: Vec<(usize, usize)> = (0..plan.users)
            .flat_map(|u| (0..plan.devices_per_user).map(move |d| (u, d)))
            .filter(|(u, d)| plan.host_of(sc, *u, *d) == h)
            .collect();
        sim.host(host.as_str(), move || {
            let ctx = ctx.clone();
            let mine = mine.clone();
            async move {
                for k in mine {
                    tokio::task::spawn_local(client::run_device(ctx.clone(), k));
                }
                loop {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
            }
        });
    }

    // The fault timeline, as begin/end actions in time order (stable for equal times).
    let mut timeline: Vec<(u64, Action)> = Vec::new();
    for (i, f) in plan.faults.iter().enumerate() {
        timeline.push((f.at_ms, Action::Begin(i)));
        if let Some(u) = f.until_ms {
            timeline.push((u, Action::End(i)));
        } else if f.kind == FaultKind::Deploy {
            timeline.push((f.at_ms + sc.tick_ms, Action::End(i)));
        }
    }
    timeline.sort_by_key(|(t, _)| *t);
    let mut next = 0;
    let mut steps = 0u64;
    let clients = sc.client_hosts();
    let expand = |h: &str| -> Vec<String> {
        if h == "*" {
            clients.clone()
        } else {
            vec![h.to_string()]
        }
    };
    let mut clock = ServerClock::default();
    while (sim.elapsed().as_millis() as u64) < end_ms {
        let t = sim.elapsed().as_millis() as u64;
        while next < timeline.len() && timeline[next].0 <= t {
            let (_, act) = timeline[next].clone();
            next += 1;
            let (i, begin) = match act {
                Action::Begin(i) => (i, true),
                Action::End(i) => (i, false),
            };
            let f = plan.faults[i].clone();
            let now = faults.server_now(t);
            let label = format!("{:?}{}", f.kind, if begin { "" } else { " ends" }).to_lowercase();
            ctx.ledger.borrow_mut().trace(
                t,
                "sim",
                "fault",
                None,
                None,
                None,
                format!("{label} {}", describe(&f)),
            );
            match f.kind {
                FaultKind::Latency => {
                    let max = if begin {
                        f.max_ms.unwrap_or(sc.topology.latency_ms[1])
                    } else {
                        sc.topology.latency_ms[1]
                    };
                    for a in expand(f.a.as_deref().unwrap_or("*")) {
                        for b in expand(f.b.as_deref().unwrap_or("*")) {
                            sim.set_link_max_message_latency(
                                a.as_str(),
                                b.as_str(),
                                Duration::from_millis(max),
                            );
                        }
                    }
                }
                FaultKind::Partition | FaultKind::Hold | FaultKind::Flaky => {
                    for a in expand(f.a.as_deref().unwrap_or("*")) {
                        for b in expand(f.b.as_deref().unwrap_or("*")) {
                            match (f.kind, begin, f.one_way) {
                                (FaultKind::Partition, true, false) => {
                                    sim.partition(a.as_str(), b.as_str())
                                }
                                (FaultKind::Partition, true, true) => {
                                    sim.partition_oneway(a.as_str(), b.as_str())
                                }
                                (FaultKind::Partition, false, false) => {
                                    sim.repair(a.as_str(), b.as_str())
                                }
                                (FaultKind::Partition, false, true) => {
                                    sim.repair_oneway(a.as_str(), b.as_str())
                                }
                                (FaultKind::Hold, true, _) => sim.hold(a.as_str(), b.as_str()),
                                (FaultKind::Hold, false, _) => sim.release(a.as_str(), b.as_str()),
                                (_, true, _) => sim.set_link_fail_rate(
                                    a.as_str(),
                                    b.as_str(),
                                    f.fail_rate.unwrap_or(0.0),
                                ),
                                (_, false, _) => {
                                    sim.set_link_fail_rate(a.as_str(), b.as_str(), 0.0);
                                    sim.repair(a.as_str(), b.as_str());
                                }
                            }
                        }
                    }
                }
                FaultKind::Crash | FaultKind::Deploy => {
                    let host = f.host.clone().unwrap_or_default();
                    if host == "chat" {
                        if begin {
                            faults.crash(&hub);
                        }
                    } else if begin {
                        sim.crash(host.as_str());
                        if host.starts_with("gw-") && !tiered {
                            // Tiered, the chat service learns it from the dead link.
                            hub.act(|c| c.gateway_down(&host.as_str().into(), now));
                        }
                    } else {
                        sim.bounce(host.as_str());
                    }
                }
                FaultKind::RegionFailover => {
                    let region = f.region.clone().unwrap_or_default();
                    for (gw, r) in sc.gateways() {
                        if r != region {
                            continue;
                        }
                        if begin {
                            sim.crash(gw.as_str());
                            if !tiered {
                                hub.act(|c| c.gateway_down(&gw.as_str().into(), now));
                            }
                        } else {
                            sim.bounce(gw.as_str());
                        }
                    }
                    // The store's primary lives in the first region: losing it promotes the
                    // other region's replica.
                    if begin && sc.topology.regions.first() == Some(&region) {
                        disk.failover();
                        faults.restart(&hub);
                        for (gw, r) in sc.gateways() {
                            if r == region && !tiered {
                                hub.act(|c| c.gateway_down(&gw.as_str().into(), now));
                            }
                        }
                    }
                }
                FaultKind::CrashPoint => {
                    if begin {
                        let point = f.point.unwrap_or(crate::scenario::CrashPoint::AfterCommit);
                        faults.arm_crash(point, f.until_ms.unwrap_or(sc.duration_ms));
                    }
                }
                FaultKind::StoreErrors => {
                    let rate = if begin {
                        f.fail_rate.unwrap_or(0.0)
                    } else {
                        0.0
                    };
                    disk.inject_errors(rate, seed ^ (i as u64).wrapping_mul(0x9e37_79b9));
                }
                FaultKind::Pause | FaultKind::SlowHandler => {
                    if begin {
                        let delay =
                            (f.kind == FaultKind::SlowHandler).then(|| f.max_ms.unwrap_or(100));
                        faults.hold(
                            f.host.as_deref().unwrap_or("chat"),
                            t,
                            f.until_ms.unwrap_or(t),
                            delay,
                        );
                    }
                }
                FaultKind::ClockJump => {
                    if begin {
                        faults.step_clock(f.skew_ms.unwrap_or(0));
                        clock.step(t, f.skew_ms.unwrap_or(0));
                    }
                }
                FaultKind::Offline
                | FaultKind::Kill
                | FaultKind::BatteryDeath
                | FaultKind::SlowConsumer
                | FaultKind::ClockSkew => {
                    let u = f.user.unwrap_or(0);
                    let devices: Vec<usize> = match f.device {
                        Some(d) => vec![d],
                        None => (0..plan.devices_per_user).collect(),
                    };
                    let mut ctl = ctx.control.borrow_mut();
                    for d in devices {
                        let c: &mut Control = ctl.entry((u, d)).or_default();
                        match (f.kind, begin) {
                            (
                                FaultKind::Offline | FaultKind::Kill | FaultKind::BatteryDeath,
                                true,
                            ) => {
                                c.away_until = f.until_ms.unwrap_or(t);
                                c.generation += 1;
                                c.silent = f.kind == FaultKind::BatteryDeath;
                            }
                            (FaultKind::SlowConsumer, true) => {
                                c.slow_rate = Some(f.frames_per_sec.unwrap_or(0));
                                c.slow_until = f.until_ms.unwrap_or(t);
                            }
                            (FaultKind::ClockSkew, true) => c.skew_ms = f.skew_ms.unwrap_or(0),
                            (FaultKind::ClockSkew, false) => c.skew_ms = 0,
                            _ => {}
                        }
                    }
                }
            }
        }
        let stepped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.step()));
        match stepped {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("simulation failed at {t} ms: {e}")),
            Err(_) => {
                let why = panics::take().join("; ");
                if why.contains("server socket buffer full") {
                    return Err(format!(
                        "at {t} ms more connections arrived at one gateway at once than \
                         turmoil's accept backlog holds ([topology] tcp_segments = {}): raise \
                         tcp_segments (up to 4096), add gateways, or spread the app starts \
                         ([client] start_jitter_ms)",
                        sc.topology.tcp_segments
                    ));
                }
                return Err(format!("the simulation itself panicked at {t} ms: {why}"));
            }
        }
        {
            let mut l = ctx.ledger.borrow_mut();
            for (at, point) in faults.take_fired() {
                l.trace(
                    at,
                    "sim",
                    "fault",
                    None,
                    None,
                    None,
                    format!(
                        "crash_point fired at {}: the chat service crashed and restarted",
                        point.name()
                    ),
                );
            }
            let mut events = faults.take_events();
            events.extend(hub.with_core(|c| c.take_events()));
            let step_end = sim.elapsed().as_millis() as u64;
            for e in &events {
                if let model_server::core::CoreEvent::Stored {
                    conversation, seq, ..
                } = e
                {
                    l.stored_ms
                        .entry((conversation.as_str().to_string(), seq.0))
                        .or_default()
                        .push(step_end);
                }
            }
            record_core_events(events, &mut l);
            l.max_queue = hub.fullest_queue();
            let mut broken = panics::take();
            if hub.poisoned() {
                broken.push("the chat core's lock is poisoned".into());
            }
            if !broken.is_empty() {
                for why in broken {
                    l.breach(
                        crate::invariant::ViolationKind::Panic,
                        t,
                        None,
                        None,
                        None,
                        "no simulated task panics".into(),
                        format!("{why} (seed {seed})"),
                    );
                }
                // The system under test is broken: stop here rather than judge the rest.
                steps += 1;
                break;
            }
        }
        steps += 1;
    }
    let stats = hub.with_core(|c| c.stats().clone());
    let online_at_end = (0..plan.users)
        .map(|u| hub.with_core(|c| c.is_online(&UserId(user_name(u)))))
        .collect();
    drop(sim);
    let mut ledger = Rc::try_unwrap(ctx)
        .map_err(|_| "simulation still holds the client context".to_string())?
        .ledger
        .take();
    if let Ok(p) = pushes.lock() {
        ledger.pushes = p.clone();
    }
    if let Ok(p) = disk.plaintext_commits.lock() {
        for table in p.iter().take(5) {
            ledger.breach(
                crate::invariant::ViolationKind::Plaintext,
                0,
                None,
                None,
                None,
                format!("no plaintext in any write committed to table {table}"),
                "a committed write carried the plaintext marker".into(),
            );
        }
    }
    // Server events are drained after each step: put everything in time order (stable).
    ledger.trace.sort_by_key(|e| e.t);
    Ok(Outcome {
        seed,
        scenario: sc.clone(),
        knobs: drawn.knobs,
        plan,
        ledger,
        store: disk.live.clone(),
        stats,
        limits,
        online_at_end,
        steps,
        end_ms,
        clock,
    })
}

/// Moves the chat service's playback events into the trace.
fn record_core_events(events: Vec<model_server::core::CoreEvent>, l: &mut Ledger) {
    use model_server::core::CoreEvent;
    for e in events {
        let t = |at: Millis| at.0.saturating_sub(EPOCH_MS);
        match e {
            CoreEvent::Stored {
                at,
                conversation,
                seq,
                client_message_id,
                sender,
                gateway,
                inbox_copies,
                shared_log,
            } => l.trace(
                t(at),
                "chat",
                "stored",
                Some(conversation.as_str()),
                Some(seq.0),
                Some(&client_message_id),
                format!(
                    "from {sender} via {gateway}; {} ",
                    if shared_log {
                        "shared group log".to_string()
                    } else {
                        format!(
                            "{inbox_copies} inbox {}",
                            if inbox_copies == 1 { "copy" } else { "copies" }
                        )
                    }
                )
                .trim_end()
                .to_string(),
            ),
            CoreEvent::Deduplicated {
                at,
                conversation,
                seq,
                client_message_id,
                sender,
            } => l.trace(
                t(at),
                "chat",
                "dedup",
                Some(conversation.as_str()),
                Some(seq.0),
                Some(&client_message_id),
                format!("retry from {sender}"),
            ),
            CoreEvent::Routed {
                at,
                conversation,
                seq,
                user,
                device,
                gateway,
            } => l.trace(
                t(at),
                "chat",
                "routed",
                Some(conversation.as_str()),
                Some(seq.0),
                None,
                format!("{user}/{device} on {gateway}"),
            ),
            CoreEvent::Pushed { at, user, pending } => l.trace(
                t(at),
                "chat",
                "push",
                None,
                None,
                None,
                format!("{user}: {pending} waiting"),
            ),
            CoreEvent::SlowConsumerClosed {
                at,
                user,
                device,
                gateway,
                queued_frames,
            } => l.trace(
                t(at),
                "chat",
                "slow_consumer",
                None,
                None,
                None,
                format!("{user}/{device} on {gateway}: {queued_frames} frames queued"),
            ),
            CoreEvent::MediaPrepared {
                at,
                media_id,
                user,
                conversation,
                size,
            } => l.trace(
                t(at),
                "chat",
                "media_prepared",
                Some(conversation.as_str()),
                None,
                None,
                format!("{media_id} for {user}: {size} bytes"),
            ),
            CoreEvent::MediaChunk {
                at,
                media_id,
                conversation,
                user,
                received,
                size,
            } => l.trace(
                t(at),
                "chat",
                "media_chunk",
                Some(conversation.as_str()),
                None,
                None,
                format!("{media_id} from {user}: {received} of {size} bytes"),
            ),
            CoreEvent::MediaFetched {
                at,
                media_id,
                conversation,
                user,
                bytes,
            } => l.trace(
                t(at),
                "chat",
                "media_fetched",
                Some(conversation.as_str()),
                None,
                None,
                format!("{media_id} to {user}: {bytes} bytes"),
            ),
            CoreEvent::Typing {
                at,
                conversation,
                user,
                devices,
                coalesced,
                throttled,
            } => l.trace(
                t(at),
                "chat",
                if throttled {
                    "typing_throttled"
                } else {
                    "typing_fwd"
                },
                Some(conversation.as_str()),
                None,
                None,
                if throttled {
                    format!("{user}")
                } else {
                    format!("{user} to {devices} devices ({coalesced} coalesced)")
                },
            ),
        }
    }
}

/// Panics of simulated tasks, caught per thread (each thread runs its own simulation), so
/// that a panic fails the run with its message instead of looking like a dropped socket.
mod panics {
    use std::cell::RefCell;

    thread_local! {
        static CAUGHT: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
    }

    /// Catches panics on this thread until the guard is dropped.
    pub fn capture() -> Guard {
        static HOOK: std::sync::Once = std::sync::Once::new();
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                let caught = CAUGHT.with(|c| match c.borrow_mut().as_mut() {
                    Some(v) => {
                        if v.len() < 16 {
                            v.push(info.to_string().replace('\n', " "));
                        }
                        true
                    }
                    None => false,
                });
                if !caught {
                    previous(info);
                }
            }));
        });
        CAUGHT.with(|c| *c.borrow_mut() = Some(Vec::new()));
        Guard
    }

    /// The panics caught since the last call.
    pub fn take() -> Vec<String> {
        CAUGHT.with(|c| {
            c.borrow_mut()
                .as_mut()
                .map(std::mem::take)
                .unwrap_or_default()
        })
    }

    pub struct Guard;
    impl Drop for Guard {
        fn drop(&mut self) {
            CAUGHT.with(|c| *c.borrow_mut() = None);
        }
    }
}

/// One-line description of a fault for the trace.
pub fn describe(f: &crate::scenario::Fault) -> String {
    let mut parts = Vec::new();
    for (k, v) in [
        ("a", &f.a),
        ("b", &f.b),
        ("host", &f.host),
        ("region", &f.region),
    ] {
        if let Some(v) = v {
            parts.push(format!("{k}={v}"));
        }
    }
    if let Some(u) = f.user {
        parts.push(format!("user=u{u}"));
    }
    if let Some(r) = f.frames_per_sec {
        parts.push(format!("frames_per_sec={r}"));
    }
    if let Some(s) = f.skew_ms {
        parts.push(format!("skew_ms={s}"));
    }
    if let Some(r) = f.fail_rate {
        parts.push(format!("fail_rate={r}"));
    }
    if let Some(m) = f.max_ms {
        parts.push(format!("max_ms={m}"));
    }
    if let Some(p) = f.point {
        parts.push(format!("point={}", p.name()));
    }
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_panic_on_the_simulation_thread_is_caught_with_its_message() {
        let guard = super::panics::capture();
        let r = std::panic::catch_unwind(|| panic!("boom in a simulated task"));
        assert!(r.is_err());
        let caught = super::panics::take();
        assert_eq!(caught.len(), 1);
        assert!(caught[0].contains("boom in a simulated task"), "{caught:?}");
        assert!(super::panics::take().is_empty(), "taken once");
        drop(guard);
    }
}

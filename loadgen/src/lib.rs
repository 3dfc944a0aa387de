//! The load generator: Goose drives virtual users, each holding real WebSocket
//! connections (tokio-tungstenite) to any server speaking docs/PROTOCOL.md, and measures
//! what chat users feel: the time from the sender's send to the recipient's receive.
//!
//! - `ledger`: the shared latency ledger (HdrHistograms in microseconds, per-second windows).
//! - `user`: the Goose transactions: connect, open-loop send schedule, reader task.
//! - `report`: timeseries.csv, latency.csv, the HdrHistogram interval log, report.html,
//!   summary.json; `merge` combines runs exactly; `compare` sets runs side by side;
//!   `fail_if` turns figures into exit codes.
//! - `relay`: a bare tokio-tungstenite relay, the baseline the model is compared with.

pub mod charts;
pub mod compare;
pub mod fail_if;
pub mod fleet;
pub mod ledger;
pub mod merge;
pub mod relay;
pub mod report;
pub mod sweep;
pub mod user;

use model_server::auth::Secret;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What to run.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// `ws://HOST:PORT` of the server under test (loopback only).
    pub target: String,
    /// Further `ws://HOST:PORT` entry points of the same server (the gateway nodes of a
    /// `chatsim cluster`, loopback only): device connections are spread over `target`
    /// and these by user number, so the two users of a pair sit on different gateways.
    pub gateways: Vec<String>,
    pub secret: Secret,
    /// Goose users; each holds one device connection. Users pair up (u0-u1, u2-u3, ...)
    /// or form groups of `group_size`.
    pub users: usize,
    /// 0: 1:1 pairs; k >= 2: groups of k (each user posts to its group).
    pub group_size: usize,
    /// Messages per second each user sends (open loop).
    pub rate_per_user: f64,
    /// Ramp-up: users start spread over this long.
    pub ramp: Duration,
    /// Measured phase after ramp-up.
    pub duration: Duration,
    /// Tag in every user id and client_message_id, so a reused server never dedups a new
    /// run's messages against an old one.
    pub run_id: String,
    pub report_dir: PathBuf,
    /// Reconnect storm: at this time after the start, `storm_fraction` of the devices drop
    /// their sockets at once, reconnect with jittered backoff and sync their backlog.
    pub storm_at: Option<Duration>,
    pub storm_fraction: f64,
    /// Typing notices per second per user (presence and typing churn), 0 for none.
    pub typing_per_sec: f64,
    /// `http://HOST:PORT/metrics` to scrape for server figures, if the target has one.
    pub metrics_url: Option<String>,
    /// Errors a valid run may have (each counted by kind in the report).
    pub max_errors: u64,
    /// Idle phase once every device is connected and before any send: the server's memory
    /// per connection is read at its end. Zero skips it (and that figure).
    pub idle: Duration,
    /// Connections that only authenticate, heartbeat and read (most of a real chat
    /// system's sockets), opened before the senders; not Goose users.
    pub idle_devices: usize,
    /// Source address for every connection (e.g. 127.0.0.2), when not the default.
    pub source_ip: Option<std::net::IpAddr>,
    /// `--fail-if` conditions, judged in the report (the caller sets the exit code).
    pub fail_if: Vec<String>,
}

/// Runs a load test and writes its report. Returns the summary.
pub async fn run(cfg: LoadConfig) -> anyhow::Result<report::Summary> {
    anyhow::ensure!(
        cfg.users >= 2,
        "at least two users are needed (senders need recipients)"
    );
    for t in std::iter::once(&cfg.target).chain(&cfg.gateways) {
        anyhow::ensure!(
            t.starts_with("ws://127.")
                || t.starts_with("ws://localhost")
                || t.starts_with("ws://[::1]"),
            "{t}: load tests only target loopback addresses (ws://127.x.x.x, localhost or [::1])"
        );
    }
    anyhow::ensure!(
        cfg.rate_per_user > 0.0 && cfg.rate_per_user <= 1000.0,
        "rate per user must be in (0, 1000]"
    );
    // Fail fast (rather than spin) when nothing listens at the target.
    let hostport = cfg
        .target
        .trim_start_matches("ws://")
        .trim_end_matches('/')
        .to_string();
    match tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect(&hostport),
    )
    .await
    {
        Ok(Ok(_)) => {}
        _ => anyhow::bail!(
            "cannot reach {}: is `chatsim serve` running there?",
            cfg.target
        ),
    }
    if cfg.group_size >= 2 {
        anyhow::ensure!(
            cfg.users % cfg.group_size == 0,
            "--users {} is not a multiple of --group-size {}: the last group would wait for \
             members that never connect",
            cfg.users,
            cfg.group_size
        );
    } else {
        anyhow::ensure!(
            cfg.users % 2 == 0,
            "--users {} is odd: users talk in pairs, so the last one's partner would never \
             connect",
            cfg.users
        );
    }
    // The server's baseline is read before this run opens any connection (the probe
    // included), so memory per connection compares no clients with all of them idle.
    let baseline = match &cfg.metrics_url {
        Some(u) => report::scrape(u).await.ok(),
        None => None,
    };
    let shared = Arc::new(ledger::Shared::new(cfg.clone()));
    if let Err(e) = user::probe(&shared).await {
        anyhow::bail!(
            "the server refused the first connection, so no run was started: {e}\n\
             (is --secret-file the secret of the server at {}? `chatsim serve` keeps it in \
             DATA_DIR/secret)",
            cfg.target
        );
    }
    std::fs::create_dir_all(&cfg.report_dir)?;
    // Two more reads: at the end of the idle phase (every device connected, nothing sent)
    // and late in the measured phase (CPU per delivered message between the two).
    let scrapes = cfg.metrics_url.clone().map(|u| {
        let shared = shared.clone();
        let cfg = cfg.clone();
        let give_up = std::time::Instant::now() + cfg.ramp + Duration::from_secs(300);
        tokio::spawn(async move {
            let phases = loop {
                if let Some(p) = shared.phases() {
                    break p;
                }
                if std::time::Instant::now() > give_up {
                    return (None, None);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let idle = if cfg.idle > Duration::ZERO {
                // Near the end of the idle phase, so late connects have settled.
                let at = phases.sends_from - cfg.idle.mul_f64(0.2);
                tokio::time::sleep_until(at.into()).await;
                report::scrape(&u).await.ok()
            } else {
                None
            };
            tokio::time::sleep_until(phases.from.into()).await;
            let measured_start = report::scrape(&u).await.ok();
            tokio::time::sleep_until((phases.from + cfg.duration.mul_f64(0.8)).into()).await;
            let late = report::scrape(&u).await.ok();
            (idle, measured_start.zip(late))
        })
    });
    let fleet = if cfg.idle_devices > 0 {
        eprintln!("  opening {} idle devices...", cfg.idle_devices);
        Some(fleet::open(shared.clone()).await)
    } else {
        None
    };
    // The server's figures every second, for report.html's server charts.
    let sampler = cfg.metrics_url.clone().map(|u| {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            // Bounded: the attack ends long before a day of samples.
            for _ in 0..86_400 {
                tick.tick().await;
                let at = shared.start.elapsed().as_secs_f64();
                if let Ok(sc) = report::scrape(&u).await {
                    let sec = at;
                    shared
                        .server_samples
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((sec, sc));
                }
            }
        })
    });
    let metrics = user::attack(shared.clone()).await?;
    if let Some(h) = sampler {
        h.abort();
    }
    let generator = report::GeneratorFigures {
        rss_end_kib: fleet::rss_kib(),
        idle_devices_connected: fleet.as_ref().map_or(0, |f| f.connected),
        rss_before_fleet_kib: fleet.as_ref().and_then(|f| f.rss_before_kib),
        rss_with_fleet_kib: fleet.as_ref().and_then(|f| f.rss_after_kib),
        kib_per_idle_device: fleet.as_ref().and_then(|f| f.kib_per_device()),
    };
    if let Some(f) = fleet {
        f.close().await;
    }
    let (idle, measured) = match scrapes {
        Some(h) => h.await.unwrap_or((None, None)),
        None => (None, None),
    };
    let scrapes = report::Scrapes {
        baseline,
        idle,
        measured,
    };
    let summary = report::write(&shared, &cfg, &scrapes, &generator, &metrics)?;
    Ok(summary)
}

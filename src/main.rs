//! `chatsim`: one CLI over the chat server model, the simulator (and, as they land, the
//! load generator and playback). This file only parses arguments and calls into the crates.

mod capacity_cmd;
mod cluster_cmd;
mod load_cmd;
mod play_cmd;
mod run_cmd;
mod shard_cmd;
mod sweep_cmd;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use model_server::auth;
use model_server::ids::{DeviceId, Millis, UserId};
use model_server::runtime::link::{ChatLinks, GatewayNode, LinkConfig, TcpConnector};
use model_server::runtime::{self, Clock, RuntimeConfig, Server, Spawner};
use model_server::store::{KvStore, MemoryStore, RedbStore};
use model_server::Limits;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "chatsim",
    version,
    about = "Chat system model: serve it, simulate it, load it"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the chat server (WebSocket at /ws, /health, /metrics, media lane).
    Serve(ServeArgs),
    /// Start a local cluster on loopback: one chat service process and G gateway
    /// processes linked to it; prints the endpoints and stops them all on Ctrl-C.
    Cluster(cluster_cmd::ClusterArgs),
    /// Mint an auth token for a user's device.
    Token(TokenArgs),
    /// Run scenarios in the deterministic simulator and check the chat invariants.
    Run(run_cmd::RunArgs),
    /// Run a scenario and narrate it hop by hop (interview prep).
    Play(play_cmd::PlayArgs),
    /// Print performance figures.
    #[command(subcommand)]
    Bench(BenchCmd),
    /// Drive a running server with Goose over real WebSockets and write a load report.
    Load(load_cmd::LoadArgs),
    /// Messages/s, storage and bandwidth from the seeds' inputs; fleet size from a load report.
    Capacity(capacity_cmd::CapacityArgs),
    /// Work with load reports.
    #[command(subcommand)]
    Report(ReportCmd),
}

#[derive(Subcommand)]
enum ReportCmd {
    /// Merge load runs exactly (HdrHistogram logs) into one report. Runs must have loaded
    /// the server together (overlapping measured windows) unless --sequential.
    Merge {
        /// Run directories (each with summary.json, timeseries.csv and the .hlog files).
        #[arg(required = true, num_args = 2..)]
        runs: Vec<PathBuf>,
        #[arg(long, default_value = "reports/merged")]
        out: PathBuf,
        /// Merge runs taken one after another: rates over the sum of their windows.
        #[arg(long)]
        sequential: bool,
    },
    /// The figures of several runs side by side, with deltas against the first; a
    /// terminal table and compare.html.
    Compare {
        /// Run directories (or merged reports), the first is the baseline.
        #[arg(required = true, num_args = 2..)]
        runs: Vec<PathBuf>,
        #[arg(long, default_value = "reports/compare")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Simulated messages per wall-second for the 1,000-device storm vs a bare turmoil echo;
    /// then swarm seeds per wall-minute on all cores, design-space vs fault-only swarm.
    Sim {
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Swarm seeds to run for the throughput figure (seeds 1..=N of each swarm).
        #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
        swarm_seeds: u64,
    },
    /// Max sustained delivery rate of the model on loopback, latency at half of it, and the
    /// same load against a bare relay.
    Load {
        #[arg(long, default_value_t = 1000)]
        users: usize,
        /// Measured seconds per step.
        #[arg(long, default_value_t = 8)]
        secs: u64,
        /// The p99 send→deliver SLO a sustained rate must meet, ms.
        #[arg(long, default_value_t = 50.0)]
        slo_p99_ms: f64,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Directory for the durable store and the server secret.
    #[arg(long, default_value = "chatsim-data")]
    data_dir: PathBuf,
    /// Keep everything in memory (nothing survives a restart).
    #[arg(long)]
    memory: bool,
    /// How the durable store makes commits durable: `group` (one fsync covers every
    /// message that arrived during the previous one; acks wait for it) or `each` (one
    /// fsync per commit, the slow baseline).
    #[arg(long, default_value = "group", value_parser = ["group", "each"])]
    fsync: String,
    /// File holding the token-signing secret [default: DATA_DIR/secret, created if absent].
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Keep message bodies after every device acked them (server-side history for all).
    #[arg(long)]
    keep_history: bool,
    /// Serve a baseline instead of the model: `relay` is a bare tokio-tungstenite relay
    /// (no auth check, no store, no dedup), for measuring the model's overhead.
    #[arg(long, value_parser = ["relay"])]
    baseline: Option<String>,
    /// Which node this process runs: `all` (every node in one process, the default),
    /// `chat` (the chat service: its store, sessions and queues; gateway nodes link to it
    /// on --link-listen, and clients may still connect to it on --listen, where the media
    /// lane is), or `gateway` (a gateway node: client sockets only, linked to the chat
    /// service at --chat; it needs the chat service's secret file).
    #[arg(long, default_value = "all", value_parser = ["all", "chat", "gateway"])]
    role: String,
    /// (role chat) Address gateway nodes link to (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:9000")]
    link_listen: SocketAddr,
    /// (role gateway) The chat service's link address (its --link-listen).
    #[arg(long, default_value = "127.0.0.1:9000")]
    chat: SocketAddr,
    /// (role gateway) The chat service's client/HTTP address (its --listen), where media
    /// requests are passed through to; without it the gateway answers them 503.
    #[arg(long)]
    chat_http: Option<SocketAddr>,
    /// Stop when standard input closes (how `chatsim cluster` makes sure its nodes never
    /// outlive it, even if it is killed).
    #[arg(long, hide = true)]
    stop_with_stdin: bool,
    /// Gateway name reported in routing and logs; each gateway node needs its own (the
    /// chat service refuses a second link under a name already linked) [default: gw-1;
    /// with --role chat, `chat` names the clients connected to the chat service itself].
    #[arg(long)]
    gateway: Option<String>,
    /// Region of this gateway.
    #[arg(long, default_value = "region-1")]
    region: String,
}

#[derive(clap::Args)]
struct TokenArgs {
    #[arg(long)]
    user: String,
    #[arg(long)]
    device: String,
    /// Token lifetime in seconds.
    #[arg(long, default_value_t = 30 * 24 * 3600)]
    ttl_secs: u64,
    /// Directory whose secret `serve` uses.
    #[arg(long, default_value = "chatsim-data")]
    data_dir: PathBuf,
    /// File holding the secret [default: DATA_DIR/secret, created if absent].
    #[arg(long)]
    secret_file: Option<PathBuf>,
}

fn main() {
    if let Err(e) = run() {
        // The cause chain, one line each; no backtrace for a user's mistake.
        eprintln!("chatsim: error: {e:#}");
        std::process::exit(2);
    }
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    // Inside the simulator the server's own log is part of the system under test (the
    // faults it injects log errors by design): keep it off the terminal unless asked.
    let simulated = matches!(
        cli.cmd,
        Cmd::Run(_) | Cmd::Play(_) | Cmd::Bench(BenchCmd::Sim { .. })
    );
    let default_filter = if simulated {
        "info,turmoil=warn,model_server=off"
    } else {
        "info,turmoil=warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.cmd {
        Cmd::Serve(a) => serve(a),
        Cmd::Token(a) => token(a),
        Cmd::Cluster(a) => cluster_cmd::cluster(a),
        Cmd::Bench(BenchCmd::Load {
            users,
            secs,
            slo_p99_ms,
        }) => load_cmd::bench_load(users, secs, slo_p99_ms),
        Cmd::Bench(BenchCmd::Sim { seed, swarm_seeds }) => {
            eprintln!("running the 1,000-device reconnect storm, then a bare turmoil echo of the same size...");
            let mut b = sim::bench::run(seed).map_err(anyhow::Error::msg)?;
            println!(
                "devices {}  hosts {}  simulated {:.0} s",
                b.devices, b.hosts, b.simulated_s
            );
            println!(
                "model:  {} messages delivered in {:.2} s wall = {:.0} msgs/wall-s",
                b.messages_delivered, b.model_wall_s, b.model_msgs_per_wall_s
            );
            println!(
                "echo:   {} messages echoed in {:.2} s wall = {:.0} msgs/wall-s ({:.1} s simulated)",
                b.echo_messages, b.echo_wall_s, b.echo_msgs_per_wall_s, b.echo_simulated_s
            );
            println!(
                "model:  {:.1} simulated s per wall s (1,000 phones with heartbeats, backoff, a deploy storm, sync and receipts)",
                b.simulated_s / b.model_wall_s
            );
            println!(
                "ratio:  the bare echo moves {:.1}x more messages per wall-second",
                b.ratio()
            );
            let jobs = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1);
            eprintln!(
                "running seeds 1..={swarm_seeds} of swarm-space, then of swarm-chaos, on {jobs} threads..."
            );
            let s = &*b
                .swarm
                .insert(sim::bench::swarm(swarm_seeds, jobs).map_err(anyhow::Error::msg)?);
            for (label, r) in [("swarm:", &s.space), ("chaos:", &s.chaos)] {
                println!(
                    "{label:<7} {} seeds {}..={} of {} on {} jobs in {:.2} s wall = {:.1} seeds/wall-min, {}/{} passed",
                    r.seeds,
                    r.first_seed,
                    r.last_seed,
                    r.scenario,
                    r.jobs,
                    r.wall_s,
                    r.seeds_per_min,
                    r.passed,
                    r.seeds
                );
            }
            println!(
                "ratio:  swarm-space runs {:.2}x the seeds per wall-minute of swarm-chaos (the fault-only swarm)",
                s.ratio()
            );
            for r in [&s.space, &s.chaos] {
                if !r.failed.is_empty() {
                    let seeds: Vec<String> = r.failed.iter().map(|(n, _)| n.to_string()).collect();
                    println!("FAIL {}: seeds {}", r.scenario, seeds.join(" "));
                    for (n, why) in &r.failed {
                        println!(
                            "  seed {n}: {why}\n    replay: chatsim run scenarios/{}.toml --seed {n}",
                            r.scenario
                        );
                    }
                }
            }
            if !s.all_passed() {
                std::process::exit(1);
            }
            Ok(())
        }
        Cmd::Capacity(a) => capacity_cmd::capacity(a),
        Cmd::Play(a) => {
            let code = play_cmd::play(a)?;
            std::process::exit(code);
        }
        Cmd::Load(a) => {
            let code = load_cmd::load(a)?;
            std::process::exit(code);
        }
        Cmd::Report(ReportCmd::Merge {
            runs,
            out,
            sequential,
        }) => load_cmd::merge(runs, out, sequential),
        Cmd::Report(ReportCmd::Compare { runs, out }) => load_cmd::compare(runs, out),
        Cmd::Run(a) => {
            let code = run_cmd::run(a)?;
            std::process::exit(code);
        }
    }
}

fn token(a: TokenArgs) -> Result<()> {
    let user = UserId(a.user);
    let device = DeviceId(a.device);
    if !model_server::ids::is_valid_id(user.as_str())
        || !model_server::ids::is_valid_id(device.as_str())
    {
        bail!("--user and --device must be 1-64 characters of [A-Za-z0-9_-]");
    }
    let path = a.secret_file.unwrap_or_else(|| a.data_dir.join("secret"));
    let secret = runtime::load_or_create_secret(&path)
        .with_context(|| format!("reading secret file {}", path.display()))?;
    let now = Clock::wall().now();
    println!(
        "{}",
        auth::mint(&secret, &user, &device, Millis(now.0 + a.ttl_secs * 1000))
    );
    Ok(())
}

fn serve(a: ServeArgs) -> Result<()> {
    if a.baseline.is_some() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        return rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind(a.listen)
                .await
                .with_context(|| format!("binding {}", a.listen))?;
            println!(
                "chatsim serve: listening on {} (baseline relay: no auth check, no store)",
                listener.local_addr()?
            );
            tokio::select! {
                r = loadgen::relay::serve(listener) => r.context("relay")?,
                _ = shutdown_signal() => {}
            }
            anyhow::Ok(())
        });
    }
    if a.role == "gateway" {
        return serve_gateway(a);
    }
    let secret_path = a
        .secret_file
        .clone()
        .unwrap_or_else(|| a.data_dir.join("secret"));
    let secret = runtime::load_or_create_secret(&secret_path)
        .with_context(|| format!("reading secret file {}", secret_path.display()))?;
    let store: Box<dyn KvStore> = if a.memory {
        Box::new(MemoryStore::new())
    } else {
        let opened: Result<Box<dyn KvStore>, _> = if a.fsync == "each" {
            RedbStore::open(&a.data_dir).map(|s| Box::new(s) as Box<dyn KvStore>)
        } else {
            RedbStore::open_grouped(&a.data_dir).map(|s| Box::new(s) as Box<dyn KvStore>)
        };
        opened.with_context(|| format!("opening store in {}", a.data_dir.display()))?
    };
    let limits = Limits {
        keep_history: a.keep_history,
        ..Limits::default()
    };
    let default_name = if a.role == "chat" { "chat" } else { "gw-1" };
    let cfg = RuntimeConfig {
        gateway: a.gateway.as_deref().unwrap_or(default_name).into(),
        region: a.region.as_str().into(),
        ..RuntimeConfig::default()
    };
    let cfg_gateway = cfg.gateway.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("binding {}", a.listen))?;
        let addr = listener.local_addr()?;
        let server = Server::new(limits, secret, store, cfg, Clock::wall());
        println!("chatsim serve: listening on {addr}");
        println!("  WebSocket  ws://{addr}/ws   health http://{addr}/health   metrics http://{addr}/metrics");
        println!(
            "  store: {}   secret: {}",
            if a.memory { "in-memory".to_string() } else { format!("{} (redb, fsync {})", a.data_dir.display(), if a.fsync == "each" { "per commit" } else { "grouped" }) },
            secret_path.display()
        );
        println!(
            "  token: chatsim token --user alice --device phone --secret-file {}",
            secret_path.display()
        );
        let (stop_links, links_stop) = tokio::sync::watch::channel(false);
        let links = if a.role == "chat" {
            let link_listener = tokio::net::TcpListener::bind(a.link_listen)
                .await
                .with_context(|| format!("binding the link address {}", a.link_listen))?;
            let link_addr = link_listener.local_addr()?;
            println!("  links: gateway nodes link to {link_addr}");
            println!(
                "    chatsim serve --role gateway --chat {link_addr} --chat-http {addr} --gateway gw-2 --listen {} --secret-file {}",
                suggest_gateway_listen(addr, link_addr),
                secret_path.display()
            );
            let links = ChatLinks::new(
                server.hub().clone(),
                LinkConfig::default(),
                Clock::wall(),
                Spawner::Tokio,
            );
            // The name its own clients connect under is not for a gateway node to take.
            links.reserve(cfg_gateway.clone());
            Some(tokio::spawn(links.serve(link_listener, links_stop)))
        } else {
            None
        };
        let s2 = server.clone();
        let serving = tokio::spawn(server.clone().serve(listener));
        stop_requested(a.stop_with_stdin).await;
        eprintln!("chatsim serve: shutting down (closing connections)");
        let _ = stop_links.send(true);
        s2.shutdown();
        let _ = serving.await;
        if let Some(l) = links {
            let _ = l.await;
        }
        anyhow::Ok(())
    })
}

/// A listen address for the gateway command the chat role suggests: the next ports after
/// its own, skipping its link port.
fn suggest_gateway_listen(own: SocketAddr, link: SocketAddr) -> SocketAddr {
    let mut port = own.port().wrapping_add(1);
    while port == link.port() || port == own.port() || port == 0 {
        port = port.wrapping_add(1);
    }
    SocketAddr::new(own.ip(), port)
}

/// `serve --role gateway`: a gateway node linked to the chat service at `--chat`.
fn serve_gateway(a: ServeArgs) -> Result<()> {
    // A gateway must prove itself with the chat service's own secret: never create one.
    let Some(secret_path) = a.secret_file.clone() else {
        bail!(
            "serve --role gateway needs --secret-file: the chat service's secret file \
             (the one its banner names, e.g. chatsim-data/secret)"
        );
    };
    let text = std::fs::read_to_string(&secret_path)
        .with_context(|| format!("reading secret file {}", secret_path.display()))?;
    let secret = auth::Secret::new(text.trim().as_bytes().to_vec())
        .map_err(|e| anyhow::anyhow!("{}: {e}", secret_path.display()))?;
    let name = a.gateway.clone().unwrap_or_else(|| "gw-1".into());
    if !model_server::ids::is_valid_id(&name) {
        bail!("--gateway {name:?}: use letters, digits, '-' and '_' only");
    }
    let cfg = RuntimeConfig {
        gateway: name.as_str().into(),
        region: a.region.as_str().into(),
        ..RuntimeConfig::default()
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("binding {}", a.listen))?;
        let addr = listener.local_addr()?;
        let node = GatewayNode::new(cfg, LinkConfig::default(), &secret, Clock::wall(), None);
        println!("chatsim serve: listening on {addr}");
        println!(
            "  gateway node {name} (region {}), linking to the chat service at {} (GET /health says when the link is up)",
            a.region, a.chat
        );
        println!("  WebSocket  ws://{addr}/ws   health http://{addr}/health   metrics http://{addr}/metrics");
        let n2 = node.clone();
        let chat = TcpConnector {
            link: a.chat,
            media: a.chat_http,
        };
        let serving = tokio::spawn(node.serve(listener, chat));
        stop_requested(a.stop_with_stdin).await;
        eprintln!("chatsim serve: shutting down (closing connections)");
        n2.shutdown();
        let _ = serving.await;
        anyhow::Ok(())
    })
}

/// Ctrl-C, SIGTERM or, with `stdin_eof`, the end of standard input.
async fn stop_requested(stdin_eof: bool) {
    if !stdin_eof {
        return shutdown_signal().await;
    }
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
        let _ = tx.send(());
    });
    tokio::select! {
        _ = shutdown_signal() => {}
        _ = rx => {}
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

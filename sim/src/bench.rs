//! `chatsim bench sim`: how fast the simulator runs the model, against a bare turmoil echo
//! of the same shape in the same process, so the model's cost is visible as a ratio; and
//! swarm throughput, seeds of the design-space swarm per wall-clock minute on all cores,
//! against the older fault-only swarm in the same run.
//!
//! Wall-clock time is read here, around whole simulations (or a whole batch), never inside
//! one.

use crate::{RunOptions, Scenario};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// The 1,000-device reconnect storm shipped in `scenarios/`.
pub const STORM: &str = include_str!("../../scenarios/reconnect-storm.toml");

/// The swarm over the whole design space (limits, phones, topology, workload, faults).
pub const SWARM_SPACE: &str = include_str!("../../scenarios/swarm-space.toml");

/// The older fault-only swarm, the baseline for swarm throughput.
pub const SWARM_CHAOS: &str = include_str!("../../scenarios/swarm-chaos.toml");

/// Figures of one benchmark.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SimBench {
    pub devices: usize,
    pub hosts: usize,
    pub messages_delivered: u64,
    pub model_wall_s: f64,
    pub model_msgs_per_wall_s: f64,
    pub simulated_s: f64,
    pub echo_messages: u64,
    pub echo_wall_s: f64,
    pub echo_msgs_per_wall_s: f64,
    /// Simulated seconds the echo needed to move its messages.
    pub echo_simulated_s: f64,
    /// Swarm throughput, when measured (see [`swarm`]).
    pub swarm: Option<SwarmBench>,
}

impl SimBench {
    /// How many times slower per message the model is than the bare echo.
    pub fn ratio(&self) -> f64 {
        self.echo_msgs_per_wall_s / self.model_msgs_per_wall_s.max(f64::MIN_POSITIVE)
    }
}

/// Runs the storm scenario, then the echo with the same hosts, connections and count.
pub fn run(seed: u64) -> Result<SimBench, String> {
    let sc = Scenario::parse(STORM, "reconnect-storm.toml").map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let (_, o) = crate::run_seed(&sc, seed, &RunOptions::default())?;
    let model_wall = t0.elapsed().as_secs_f64();
    let delivered: u64 = o
        .ledger
        .devices
        .iter()
        .map(|((u, _), d)| d.shown.values().filter(|m| m.sender != *u).count() as u64)
        .sum();
    let devices = sc.workload.users * sc.workload.devices_per_user;
    let gateways = sc.gateways().len();
    let clients = sc.topology.client_hosts;
    let per_conn = delivered.div_ceil(devices as u64).max(1);
    let t1 = Instant::now();
    let (echoed, echo_simulated_s) = echo(&sc, gateways, clients, devices, per_conn)?;
    let echo_wall = t1.elapsed().as_secs_f64();
    Ok(SimBench {
        devices,
        hosts: gateways + clients + 1,
        messages_delivered: delivered,
        model_wall_s: model_wall,
        model_msgs_per_wall_s: delivered as f64 / model_wall,
        simulated_s: (sc.duration_ms + sc.quiet_ms) as f64 / 1000.0,
        echo_messages: echoed,
        echo_wall_s: echo_wall,
        echo_msgs_per_wall_s: echoed as f64 / echo_wall,
        echo_simulated_s,
        swarm: None,
    })
}

/// One batch of swarm seeds: how many ran, how fast, and which failed.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SwarmRun {
    pub scenario: String,
    /// Seeds `first_seed..=last_seed`, all run.
    pub first_seed: u64,
    pub last_seed: u64,
    pub seeds: usize,
    pub jobs: usize,
    pub passed: usize,
    /// Seeds that failed their verdict or could not run, with the first reason.
    pub failed: Vec<(u64, String)>,
    /// Wall time of the whole batch (threads started to last seed judged).
    pub wall_s: f64,
    pub seeds_per_min: f64,
}

/// Swarm throughput of the design-space swarm, and of the fault-only swarm as a baseline.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SwarmBench {
    pub space: SwarmRun,
    pub chaos: SwarmRun,
}

impl SwarmBench {
    /// Design-space seeds per minute over fault-only seeds per minute (below 1: slower).
    pub fn ratio(&self) -> f64 {
        self.space.seeds_per_min / self.chaos.seeds_per_min.max(f64::MIN_POSITIVE)
    }

    /// Whether every seed of both batches passed.
    pub fn all_passed(&self) -> bool {
        self.space.failed.is_empty() && self.chaos.failed.is_empty()
    }
}

/// Runs seeds `1..=seeds` of `swarm-space`, then of `swarm-chaos`, each on `jobs` threads.
pub fn swarm(seeds: u64, jobs: usize) -> Result<SwarmBench, String> {
    let space = Scenario::parse(SWARM_SPACE, "swarm-space.toml").map_err(|e| e.to_string())?;
    let chaos = Scenario::parse(SWARM_CHAOS, "swarm-chaos.toml").map_err(|e| e.to_string())?;
    let seeds: Vec<u64> = (1..=seeds).collect();
    Ok(SwarmBench {
        space: swarm_batch(&space, &seeds, jobs),
        chaos: swarm_batch(&chaos, &seeds, jobs),
    })
}

fn swarm_batch(sc: &Scenario, seeds: &[u64], jobs: usize) -> SwarmRun {
    let t0 = Instant::now();
    let results = crate::run_seeds(sc, seeds, &RunOptions::default(), jobs, &|_| {});
    let wall = t0.elapsed().as_secs_f64();
    let failed: Vec<(u64, String)> = results
        .iter()
        .filter_map(|(seed, r)| match r {
            Ok(r) if r.passed => None,
            Ok(r) => Some((*seed, r.failures.first().cloned().unwrap_or_default())),
            Err(e) => Some((*seed, format!("simulation error: {e}"))),
        })
        .collect();
    SwarmRun {
        scenario: sc.name.clone(),
        first_seed: seeds.first().copied().unwrap_or(0),
        last_seed: seeds.last().copied().unwrap_or(0),
        seeds: results.len(),
        jobs: jobs.max(1).min(seeds.len().max(1)),
        passed: results.len() - failed.len(),
        failed,
        wall_s: wall,
        seeds_per_min: results.len() as f64 * 60.0 / wall.max(f64::MIN_POSITIVE),
    }
}

/// A bare turmoil echo: `devices` connections spread over `clients` hosts, each sending
/// `per_conn` 200-byte lines to one of `servers` echo hosts and reading them back.
fn echo(
    sc: &Scenario,
    servers: usize,
    clients: usize,
    devices: usize,
    per_conn: u64,
) -> Result<(u64, f64), String> {
    let mut sim = turmoil::Builder::new()
        .rng_seed(1)
        .tick_duration(Duration::from_millis(sc.tick_ms))
        .min_message_latency(Duration::from_millis(sc.topology.latency_ms[0]))
        .max_message_latency(Duration::from_millis(sc.topology.latency_ms[1]))
        .tcp_capacity(crate::world::TCP_CAPACITY)
        .simulation_duration(Duration::from_secs(3600))
        .build();
    for s in 0..servers {
        sim.host(format!("echo-{s}").as_str(), || async {
            let l = turmoil::net::TcpListener::bind(("0.0.0.0", 8080)).await?;
            loop {
                let (stream, _) = l.accept().await?;
                tokio::task::spawn_local(async move {
                    let (r, mut w) = tokio::io::split(stream);
                    let mut lines = BufReader::new(r).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        if w.write_all(format!("{line}\n").as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
    }
    let counted = std::rc::Rc::new(std::cell::Cell::new(0u64));
    let sc_jitter = sc.client.start_jitter_ms;
    for c in 0..clients {
        let conns: Vec<usize> = (0..devices).filter(|d| d % clients == c).collect();
        let counted = counted.clone();
        sim.client(format!("client-{c}").as_str(), async move {
            let mut tasks = Vec::new();
            for d in conns {
                let counted = counted.clone();
                let jitter = sc_jitter * d as u64 / devices.max(1) as u64;
                tasks.push(tokio::task::spawn_local(async move {
                    // Spread connects as the phones' start jitter does (backlog is bounded).
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                    let server = format!("echo-{}", d % servers);
                    let stream = turmoil::net::TcpStream::connect((server.as_str(), 8080)).await?;
                    let (r, mut w) = tokio::io::split(stream);
                    let mut lines = BufReader::new(r).lines();
                    let payload = "x".repeat(200);
                    for i in 0..per_conn {
                        w.write_all(format!("{i} {payload}\n").as_bytes()).await?;
                        if lines.next_line().await?.is_some() {
                            counted.set(counted.get() + 1);
                        }
                    }
                    Ok::<(), std::io::Error>(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            Ok(())
        });
    }
    sim.run().map_err(|e| e.to_string())?;
    Ok((counted.get(), sim.elapsed().as_secs_f64()))
}

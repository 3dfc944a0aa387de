//! `chatsim load`, `chatsim report merge|compare` and `chatsim bench load`.

use anyhow::{Context, Result};
use loadgen::fail_if::Condition;
use loadgen::report::Summary;
use loadgen::LoadConfig;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct LoadArgs {
    /// Server to load (loopback only): ws://127.0.0.1:8080. Repeat it with --processes to
    /// spread the shards over several servers (shard i loads target i mod T).
    #[arg(long = "target", default_value = "ws://127.0.0.1:8080")]
    pub targets: Vec<String>,
    /// Another gateway of the same server (repeatable; e.g. the gateways `chatsim cluster`
    /// prints): device connections alternate between --target and these by user number,
    /// so the two users of a pair sit on different gateways and every message crosses
    /// the chat service. Passed on to every process of --processes.
    #[arg(long = "gateway", value_name = "URL")]
    pub gateways: Vec<String>,
    /// File with the server's token secret (`chatsim serve` writes DATA_DIR/secret). One
    /// for every target, or one per --target in the same order.
    #[arg(long = "secret-file", default_value = "chatsim-data/secret")]
    pub secret_files: Vec<PathBuf>,
    /// Virtual users that send (one device connection each, a Goose user each).
    #[arg(long, default_value_t = 200)]
    pub users: usize,
    /// Idle devices besides the senders: connections that authenticate, heartbeat and
    /// read, as most real chat sockets do (a few KiB of generator memory each).
    #[arg(long, default_value_t = 0)]
    pub idle_devices: usize,
    /// Generator processes: this process starts them (each with --shard i/N, its own
    /// 127.0.0.x source address, a shared start time) and merges their reports.
    #[arg(long, default_value_t = 1)]
    pub processes: usize,
    /// Run only shard I of N of the load (users in whole conversations, idle devices),
    /// e.g. on one of N machines; pair with --start-at and --run-id.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
    /// Start at this Unix time in ms (shards on several machines start together).
    #[arg(long, value_name = "UNIX_MS")]
    pub start_at: Option<u64>,
    /// Run id, in every user id (default: from the clock and the process id); shards add
    /// `-sI`. Letters, digits, `_` and `-`, at most 24.
    #[arg(long)]
    pub run_id: Option<String>,
    /// Sweep a setting, one run per point, into one latency-throughput report:
    /// `rate=500..16000` (total offered msgs/s, doubling), `rate=500,2000`, or
    /// `group-size=0,4,16`.
    #[arg(long, value_name = "KNOB=A..B")]
    pub sweep: Option<String>,
    /// Source address of every connection (a loopback address, e.g. 127.0.0.2).
    #[arg(long)]
    pub source_ip: Option<std::net::IpAddr>,
    /// Messages per second per user (open loop).
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// 0: 1:1 pairs; k >= 2: groups of k.
    #[arg(long, default_value_t = 0)]
    pub group_size: usize,
    /// Ramp-up seconds (users start spread over it; not measured).
    #[arg(long, default_value_t = 5)]
    pub ramp: u64,
    /// Measured seconds after ramp-up.
    #[arg(long, default_value_t = 20)]
    pub duration: u64,
    /// Report directory [default: reports/load-RUNID].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Fail (exit 1) when a condition holds, e.g. 'p99_deliver_ms>50' (repeatable).
    #[arg(long = "fail-if", value_name = "COND")]
    pub fail_if: Vec<String>,
    /// Reconnect storm: at this many seconds after the start, drop `--storm-fraction` of the
    /// sockets at once; they reconnect with jittered backoff and sync their backlog.
    #[arg(long)]
    pub storm_at: Option<u64>,
    #[arg(long, default_value_t = 0.3)]
    pub storm_fraction: f64,
    /// Typing notices per second per user, plus presence subscriptions (churn); 0: none.
    #[arg(long, default_value_t = 0.0)]
    pub typing: f64,
    /// Errors a valid run may have (every error is counted by kind in the report; more than
    /// this makes the run INVALID and the exit code 1).
    #[arg(long, default_value_t = 0)]
    pub max_errors: u64,
    /// Idle phase, in seconds, once every device is connected and before any send: the
    /// server's memory per connection is read at its end (0 skips it and that figure).
    #[arg(long, default_value_t = 2)]
    pub idle: u64,
    /// Scrape http://HOST:PORT/metrics of the target for server figures.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub scrape_metrics: bool,
    /// Scrape the server's figures here instead of at the target, e.g. the chat service of
    /// a `chatsim cluster` (http://127.0.0.1:8080/metrics): its CPU and memory then stand
    /// for that process alone, not the gateways'. A page without the chat service's
    /// figures (a gateway node's) leaves them "not measured".
    #[arg(long, value_name = "URL")]
    pub metrics_url: Option<String>,
}

pub fn run_id() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    // The process id too: two generators started in the same millisecond must not share
    // user ids (the server would replace one's sessions with the other's).
    format!("r{}p{}", ms % 100_000_000_000, std::process::id())
}

pub fn print_summary(s: &Summary, dir: &std::path::Path) {
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "run {} against {}: {} users sending{}, {:.0} s measured",
        s.run_id,
        s.target,
        s.users,
        if s.idle_devices > 0 {
            format!(" + {} idle devices", s.idle_devices)
        } else {
            String::new()
        },
        s.measured_s
    );
    if let Some(m) = &s.merge {
        println!(
            "  ({} {} runs; measured seconds are the union of their windows, which overlap for {:.1} s)",
            m.runs.len(),
            m.kind,
            m.overlap_s
        );
    }
    if s.idle_devices > 0 {
        let g = &s.generator;
        println!(
            "  generator: {} of {} idle devices connected, {}",
            g.idle_devices_connected,
            s.idle_devices,
            match (g.kib_per_idle_device, g.rss_before_fleet_kib, g.rss_with_fleet_kib) {
                (Some(k), Some(b), Some(a)) => format!(
                    "{k:.1} KiB of generator memory per idle device (resident {b} KiB before the fleet, {a} KiB with it)"
                ),
                _ => "generator memory per idle device not measured".into(),
            }
        );
    }
    println!(
        "  sent {} ({:.1}/s), delivered {} of {} ({:.1}/s), acked {}, errors {}",
        s.sent,
        s.sent_per_s,
        s.delivered,
        s.expected_deliveries,
        s.delivered_per_s,
        s.acked,
        s.errors
    );
    if !s.errors_by_kind.is_empty() {
        let kinds: Vec<String> = s
            .errors_by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        println!("  errors by kind: {}", kinds.join(", "));
    }
    println!(
        "  send→deliver p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  (raw p99 {:.2} ms)   send→ack p99 {:.2} ms",
        ms(s.deliver_us.p50),
        ms(s.deliver_us.p99),
        ms(s.deliver_us.p999),
        ms(s.deliver_raw_us.p99),
        ms(s.ack_us.p99)
    );
    if s.commit_to_receive_us.count > 0 {
        println!(
            "  hops (split at the server's commit stamp, ±2 ms): send→commit p50 {:.1} p99 {:.1} ms, commit→received p50 {:.1} p99 {:.1} ms",
            ms(s.send_to_commit_us.p50),
            ms(s.send_to_commit_us.p99),
            ms(s.commit_to_receive_us.p50),
            ms(s.commit_to_receive_us.p99)
        );
    }
    if let Some(f) = &s.server {
        println!(
            "  server: {} connections, {:.1} CPU µs per delivery (message copy sent to a device; measured phase)",
            f.connections, f.cpu_us_per_delivered
        );
        println!("  server memory: {}", f.memory_line());
    } else {
        println!(
            "  server: CPU and memory not measured (no chat service metrics scraped; with a cluster, --metrics-url http://CHAT/metrics)"
        );
    }
    if let (Some(r), Some(c)) = (&s.storm_reconnect_us, &s.storm_catch_up_us) {
        println!(
            "  reconnect storm: {} devices dropped; reconnected p50 {:.1} ms p99 {:.1} ms, backlog drained p50 {:.1} ms p99 {:.1} ms after the drop",
            r.count,
            ms(r.p50),
            ms(r.p99),
            ms(c.p50),
            ms(c.p99)
        );
    }
    match &s.invalid_reason {
        None => println!(
            "  generator healthy (schedule slip p99 {:.2} ms, loop lag p99 {:.2} ms)",
            ms(s.schedule_slip_us.p99),
            ms(s.event_loop_lag_us.p99)
        ),
        Some(r) => println!("  INVALID: {r}"),
    }
    if s.merge.is_some() {
        println!(
            "  report: {}/report.html (also timeseries.csv, latency.csv, summary.json)",
            dir.display()
        );
    } else {
        println!("  report: {}/report.html (also timeseries.csv, latency.csv, deliver.hlog, histograms.hlog, summary.json; Goose's own counts, whole run included, in goose.md)", dir.display());
    }
}

/// Reads a server's token secret.
pub fn read_secret(path: &std::path::Path) -> Result<model_server::auth::Secret> {
    let raw = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading secret file {} (the server's DATA_DIR/secret)",
            path.display()
        )
    })?;
    model_server::auth::Secret::new(raw.trim().as_bytes().to_vec())
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

pub fn config(a: &LoadArgs) -> Result<LoadConfig> {
    anyhow::ensure!(
        a.group_size != 1,
        "--group-size 1 is not a group: use 0 for 1:1 pairs, or 2 and more"
    );
    anyhow::ensure!(
        a.targets.len() == 1 && a.secret_files.len() == 1,
        "several --target or --secret-file need --processes N (one generator process per shard)"
    );
    let target = a.targets[0].clone();
    let secret = read_secret(&a.secret_files[0])?;
    let id = match &a.run_id {
        Some(r) => {
            anyhow::ensure!(
                !r.is_empty()
                    && r.len() <= 24
                    && r.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
                "--run-id {r:?}: use 1-24 letters, digits, `_` or `-`"
            );
            r.clone()
        }
        None => run_id(),
    };
    let metrics_url = a
        .scrape_metrics
        .then(|| {
            a.metrics_url.clone().or_else(|| {
                target
                    .strip_prefix("ws://")
                    .map(|h| format!("http://{}/metrics", h.trim_end_matches('/')))
            })
        })
        .flatten();
    let (users, idle_devices, id) = match &a.shard {
        None => (a.users, a.idle_devices, id),
        Some(sh) => {
            let (i, n) = crate::shard_cmd::parse_shard(sh)?;
            let block = if a.group_size >= 2 { a.group_size } else { 2 };
            let (u, d) = crate::shard_cmd::share(a.users, block, a.idle_devices, i, n);
            (u, d, format!("{id}-s{i}"))
        }
    };
    Ok(LoadConfig {
        target,
        gateways: a.gateways.clone(),
        idle_devices,
        source_ip: a.source_ip,
        fail_if: a.fail_if.clone(),
        secret,
        users,
        group_size: a.group_size,
        rate_per_user: a.rate,
        ramp: Duration::from_secs(a.ramp),
        duration: Duration::from_secs(a.duration),
        report_dir: a
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("reports/load-{id}"))),
        run_id: id,
        metrics_url,
        storm_at: a.storm_at.map(Duration::from_secs),
        storm_fraction: a.storm_fraction.clamp(0.0, 1.0),
        typing_per_sec: a.typing.max(0.0),
        max_errors: a.max_errors,
        idle: Duration::from_secs(a.idle),
    })
}

pub fn load(a: LoadArgs) -> Result<i32> {
    let conds: Vec<Condition> = a
        .fail_if
        .iter()
        .map(|c| Condition::parse(c).map_err(anyhow::Error::msg))
        .collect::<Result<_>>()?;
    if let Some(spec) = &a.sweep {
        return crate::sweep_cmd::sweep(&a, spec);
    }
    if a.processes > 1 {
        return crate::shard_cmd::coordinate(&a, &conds);
    }
    let cfg = config(&a)?;
    if let Some(at) = a.start_at {
        crate::shard_cmd::wait_until(at)?;
    }
    let dir = cfg.report_dir.clone();
    eprintln!(
        "loading {} with {} users at {}/s each for {}+{} s...",
        cfg.target, cfg.users, cfg.rate_per_user, a.ramp, a.duration
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let s = rt.block_on(loadgen::run(cfg))?;
    print_summary(&s, &dir);
    Ok(verdict_code(&s, &conds))
}

/// Exit code of a finished run: 1 when it is invalid or a `--fail-if` holds.
pub fn verdict_code(s: &Summary, conds: &[Condition]) -> i32 {
    // An invalid run fails whatever `--fail-if` says: its figures are not the server's.
    let mut code = i32::from(!s.valid);
    for c in conds {
        if c.holds(s) {
            println!(
                "  FAIL: {} {} {} (actual {:.3})",
                c.metric,
                c.op,
                c.value,
                c.actual(s)
            );
            code = 1;
        }
    }
    code
}

pub fn merge(runs: Vec<PathBuf>, out: PathBuf, sequential: bool) -> Result<()> {
    let refs: Vec<&std::path::Path> = runs.iter().map(|p| p.as_path()).collect();
    let s = loadgen::merge::merge(&refs, &out, sequential)?;
    if let Some(m) = &s.merge {
        println!(
            "merged {} {} runs, overlapping for {:.1} s ({}):",
            m.runs.len(),
            m.kind,
            m.overlap_s,
            m.rate_basis()
        );
        for r in &m.runs {
            println!(
                "  {} against {}: measured {} to {}{}",
                r.run_id,
                r.target,
                loadgen::merge::utc(r.from_unix_ms),
                loadgen::merge::utc(r.until_unix_ms),
                if r.valid { "" } else { " (INVALID)" }
            );
        }
    }
    print_summary(&s, &out);
    Ok(())
}

pub fn compare(runs: Vec<PathBuf>, out: PathBuf) -> Result<()> {
    let refs: Vec<&std::path::Path> = runs.iter().map(|p| p.as_path()).collect();
    let c = loadgen::compare::compare(&refs, &out)?;
    print!("{}", c.table);
    println!("  report: {}/compare.html", out.display());
    Ok(())
}

/// Cores for `bench load`: the server on the last core, the generator (this process, and
/// the threads it starts from now on) on the others, with `taskset`; or why not.
fn pinning() -> std::result::Result<(String, String), String> {
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if n < 2 {
        return Err(format!("{n} core: nothing to pin apart"));
    }
    let server = format!("{}", n - 1);
    let generator = if n == 2 {
        "0".to_string()
    } else {
        format!("0-{}", n - 2)
    };
    let ok = std::process::Command::new("taskset")
        .args([
            "-a",
            "-p",
            "-c",
            &generator,
            &std::process::id().to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|e| format!("taskset not available: {e}"))?;
    if !ok.success() {
        return Err("taskset could not pin this process".into());
    }
    Ok((server, generator))
}

/// A `chatsim serve` child process on an ephemeral loopback port.
struct Child {
    proc: std::process::Child,
    addr: String,
}

impl Child {
    /// Starts `chatsim ARGS`, on the cores `pin` names when given (`taskset -c`).
    fn start(args: &[&str], pin: Option<&str>) -> Result<Child> {
        use std::io::BufRead;
        let exe = std::env::current_exe()?;
        let mut cmd = match pin {
            Some(cores) => {
                let mut c = std::process::Command::new("taskset");
                c.args(["-c", cores]).arg(&exe);
                c
            }
            None => std::process::Command::new(&exe),
        };
        let mut proc = cmd
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting a chatsim serve child")?;
        let stdout = proc.stdout.take().context("child stdout")?;
        let mut lines = std::io::BufReader::new(stdout).lines();
        let mut addr = None;
        for _ in 0..10 {
            let Some(Ok(line)) = lines.next() else { break };
            if let Some(rest) = line.strip_prefix("chatsim serve: listening on ") {
                addr = rest.split_whitespace().next().map(str::to_string);
                break;
            }
        }
        std::thread::spawn(move || for _ in lines {});
        let addr = addr.context("the server did not print its address")?;
        Ok(Child { proc, addr })
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.proc.kill();
        let _ = self.proc.wait();
    }
}

/// `chatsim bench load`: finds the highest sustained delivery rate of the model (a
/// `chatsim serve --memory` child process on loopback, so its CPU and memory figures are
/// its own), measures latency at half of it, and runs the same half-rate load against the
/// bare relay and against `serve`'s durable default (redb with group commit; two more
/// children), so the model's overhead and the store's cost show as ratios.
pub fn bench_load(users: usize, secs: u64, slo_p99_ms: f64) -> Result<()> {
    let data = std::env::temp_dir().join(format!("chatsim-bench-{}", run_id()));
    let data_s = data.to_string_lossy().to_string();
    let pins = pinning();
    match &pins {
        Ok((server, generator)) => eprintln!(
            "pinned with taskset: server on core {server}, generator on core(s) {generator}"
        ),
        Err(why) => eprintln!("not pinned ({why}): server and generator share every core"),
    }
    let server_pin = pins.as_ref().ok().map(|(s, _)| s.as_str());
    let model = Child::start(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--memory",
            "--data-dir",
            &data_s,
        ],
        server_pin,
    )?;
    let relay = Child::start(
        &["serve", "--baseline", "relay", "--listen", "127.0.0.1:0"],
        server_pin,
    )?;
    // The durable default of `serve` (redb, group commit), sharing the model's secret.
    let durable_dir = data.join("durable");
    let secret_file = data.join("secret").to_string_lossy().to_string();
    let durable = Child::start(
        &[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &durable_dir.to_string_lossy(),
            "--secret-file",
            &secret_file,
        ],
        server_pin,
    )?;
    let raw = std::fs::read_to_string(data.join("secret")).context("reading the child's secret")?;
    let secret = model_server::auth::Secret::new(raw.trim().as_bytes().to_vec())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let run = |addr: &str, rate: f64, tag: &str, metrics: bool| {
            let cfg = LoadConfig {
                gateways: Vec::new(),
                target: format!("ws://{addr}"),
                secret: secret.clone(),
                users,
                group_size: 0,
                rate_per_user: rate,
                ramp: Duration::from_secs(3),
                duration: Duration::from_secs(secs),
                run_id: format!("bench-{tag}-{}", run_id()),
                report_dir: PathBuf::from(format!("reports/bench-load-{tag}")),
                metrics_url: metrics.then(|| format!("http://{addr}/metrics")),
                storm_at: None,
                storm_fraction: 0.0,
                typing_per_sec: 0.0,
                max_errors: 0,
                idle: Duration::from_secs(2),
                idle_devices: 0,
                source_ip: None,
                fail_if: Vec::new(),
            };
            loadgen::run(cfg)
        };
        let ok = |s: &Summary| {
            // Valid: every message delivered, no errors, a healthy generator.
            s.valid && s.deliver_us.p99 as f64 / 1000.0 <= slo_p99_ms
        };
        let mut best: Option<(f64, Summary)> = None;
        let mut stopped_by = None;
        let mut first_memory = None;
        let mut rate = 1.0;
        for step in 0..8 {
            eprintln!("step {step}: {users} users x {rate:.1} msgs/s");
            let s = run(&model.addr, rate, &format!("step{step}"), true).await?;
            if step == 0 {
                // Only the first step meets a fresh server: its idle phase is the memory figure.
                first_memory = s.server.as_ref().map(|f| f.memory_line());
            }
            eprintln!(
                "  sent {:.0}/s, delivered {:.0}/s, p99 {:.2} ms, {}",
                s.sent_per_s,
                s.delivered_per_s,
                s.deliver_us.p99 as f64 / 1000.0,
                s.invalid_reason
                    .clone()
                    .unwrap_or_else(|| "generator healthy".into())
            );
            if !ok(&s) {
                stopped_by = Some(s.invalid_reason.clone().unwrap_or_else(|| {
                    format!(
                        "p99 {:.2} ms is past the {slo_p99_ms} ms SLO",
                        s.deliver_us.p99 as f64 / 1000.0
                    )
                }));
                break;
            }
            best = Some((rate, s));
            rate *= 2.0;
        }
        let Some((max_rate, max_s)) = best else {
            anyhow::bail!(
                "even {users} msgs/s missed the SLO (p99 <= {slo_p99_ms} ms, every message delivered)"
            );
        };
        let half = max_rate / 2.0;
        let m = run(&model.addr, half, "model-half", true).await?;
        let r = run(&relay.addr, half, "relay-half", false).await?;
        let d = run(&durable.addr, half, "durable-half", true).await?;
        let d_ok = ok(&d);
        anyhow::Ok((max_s, m, r, (d, d_ok), first_memory, stopped_by))
    });
    let (max_s, m, r, (d, d_ok), first_memory, stopped_by) = result?;
    let ms = |us: u64| us as f64 / 1000.0;
    println!("\nchatsim bench load: {users} connections (1:1 pairs) on loopback; server = `chatsim serve --memory` child process");
    println!(
        "max sustained: {:.0} delivered msgs/s with p99 {:.2} ms (doubling search; the next step stopped it: {})",
        max_s.delivered_per_s,
        ms(max_s.deliver_us.p99),
        stopped_by.as_deref().unwrap_or("the search reached its last step")
    );
    match &pins {
        Ok((server, _)) => {
            let cores = server.split(',').count() as f64;
            println!(
                "per server core at the p99 <= {slo_p99_ms} ms SLO: {:.0} delivered msgs/s (server pinned to {} core{}){}",
                max_s.delivered_per_s / cores,
                cores,
                if cores == 1.0 { "" } else { "s" },
                max_s
                    .server
                    .as_ref()
                    .filter(|f| f.cpu_us_per_delivered > 0.0)
                    .map(|f| format!("; its own CPU time: {:.0} µs per message", f.cpu_us_per_delivered))
                    .unwrap_or_default()
            );
            if stopped_by
                .as_deref()
                .is_some_and(|w| w.contains("generator"))
            {
                println!("  (the generator's core saturated first: the server's maximum is higher than this)");
            }
        }
        Err(why) => {
            println!("per server core: not measured ({why}; server and generator shared the cores)")
        }
    }
    println!("| target | sent msgs/s | delivered msgs/s | p50 ms | p99 ms | p99.9 ms | connections | KiB/conn | CPU µs/msg |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for (name, s) in [
        ("model, half of max", &m),
        ("bare relay, same load", &r),
        ("model, durable store (group commit), same load", &d),
    ] {
        let (conns, kib, cpu) = s
            .server
            .as_ref()
            .map(|f| {
                (
                    f.connections.to_string(),
                    f.kib_per_connection
                        .map_or("-".into(), |k| format!("{k:.1}")),
                    format!("{:.0}", f.cpu_us_per_delivered),
                )
            })
            .unwrap_or(("-".into(), "-".into(), "-".into()));
        println!(
            "| {name} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {conns} | {kib} | {cpu} |",
            s.sent_per_s,
            s.delivered_per_s,
            ms(s.deliver_us.p50),
            ms(s.deliver_us.p99),
            ms(s.deliver_us.p999)
        );
    }
    println!(
        "model memory, fresh server (first step's idle phase): {}",
        first_memory.unwrap_or_else(|| "no /metrics figures".into())
    );
    println!(
        "ratio model/relay at the same load: p50 {:.2}x, p99 {:.2}x",
        m.deliver_us.p50 as f64 / r.deliver_us.p50.max(1) as f64,
        m.deliver_us.p99 as f64 / r.deliver_us.p99.max(1) as f64
    );
    println!(
        "durable store vs memory at half the memory max ({:.0} msgs/s): p99 {:.2} ms vs {:.2} ms ({:.2}x); {}",
        m.sent_per_s,
        ms(d.deliver_us.p99),
        ms(m.deliver_us.p99),
        d.deliver_us.p99 as f64 / m.deliver_us.p99.max(1) as f64,
        if d_ok {
            format!("meets the p99 <= {slo_p99_ms} ms SLO with every message delivered")
        } else {
            format!(
                "MISSES the SLO ({})",
                d.invalid_reason.clone().unwrap_or_else(|| format!(
                    "p99 {:.2} ms > {slo_p99_ms} ms",
                    ms(d.deliver_us.p99)
                ))
            )
        }
    );
    drop(model);
    drop(relay);
    drop(durable);
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}

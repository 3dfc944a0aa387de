//! `chatsim load`, `chatsim report merge` and `chatsim bench load`.

use anyhow::{bail, Context, Result};
use loadgen::fail_if::Condition;
use loadgen::report::Summary;
use loadgen::LoadConfig;
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args)]
pub struct LoadArgs {
    /// Server to load (loopback only): ws://127.0.0.1:8080
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    pub target: String,
    /// File with the server's token secret [default: chatsim-data/secret].
    #[arg(long, default_value = "chatsim-data/secret")]
    pub secret_file: PathBuf,
    /// Virtual users (one device connection each).
    #[arg(long, default_value_t = 200)]
    pub users: usize,
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
    /// Scrape http://HOST:PORT/metrics of the target for server figures.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub scrape_metrics: bool,
}

fn run_id() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("r{}", ms % 100_000_000_000)
}

pub fn print_summary(s: &Summary, dir: &std::path::Path) {
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "run {} against {}: {} users, {:.0} s measured",
        s.run_id, s.target, s.users, s.measured_s
    );
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
    println!(
        "  send→deliver p50 {:.2} ms  p99 {:.2} ms  p99.9 {:.2} ms  (raw p99 {:.2} ms)   send→ack p99 {:.2} ms",
        ms(s.deliver_us.p50),
        ms(s.deliver_us.p99),
        ms(s.deliver_us.p999),
        ms(s.deliver_raw_us.p99),
        ms(s.ack_us.p99)
    );
    if let Some(f) = &s.server {
        println!(
            "  server: {} connections, {:.1} KiB/connection, {:.1} CPU µs per delivered message",
            f.connections, f.kib_per_connection, f.cpu_us_per_delivered
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
    println!("  report: {}/report.html (also timeseries.csv, latency.csv, deliver.hlog, summary.json, goose.html)", dir.display());
}

pub fn config(a: &LoadArgs) -> Result<LoadConfig> {
    let raw = std::fs::read_to_string(&a.secret_file).with_context(|| {
        format!(
            "reading secret file {} (the server's DATA_DIR/secret)",
            a.secret_file.display()
        )
    })?;
    let secret = model_server::auth::Secret::new(raw.trim().as_bytes().to_vec())
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.secret_file.display()))?;
    let id = run_id();
    let metrics_url = a
        .scrape_metrics
        .then(|| {
            a.target
                .strip_prefix("ws://")
                .map(|h| format!("http://{}/metrics", h.trim_end_matches('/')))
        })
        .flatten();
    Ok(LoadConfig {
        target: a.target.clone(),
        secret,
        users: a.users,
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
    })
}

pub fn load(a: LoadArgs) -> Result<i32> {
    let conds: Vec<Condition> = a
        .fail_if
        .iter()
        .map(|c| Condition::parse(c).map_err(anyhow::Error::msg))
        .collect::<Result<_>>()?;
    let cfg = config(&a)?;
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
    let mut code = 0;
    for c in &conds {
        if c.holds(&s) {
            println!(
                "  FAIL: {} {} {} (actual {:.3})",
                c.metric,
                c.op,
                c.value,
                c.actual(&s)
            );
            code = 1;
        }
    }
    Ok(code)
}

pub fn merge(runs: Vec<PathBuf>, out: PathBuf) -> Result<()> {
    if runs.is_empty() {
        bail!("name at least one run directory");
    }
    let refs: Vec<&std::path::Path> = runs.iter().map(|p| p.as_path()).collect();
    let s = loadgen::merge::merge(&refs, &out)?;
    let ms = |us: u64| us as f64 / 1000.0;
    println!(
        "merged {} runs: sent {}, delivered {} ({:.1}/s), send→deliver p50 {:.2} ms p99 {:.2} ms p99.9 {:.2} ms -> {}",
        runs.len(),
        s.sent,
        s.delivered,
        s.delivered_per_s,
        ms(s.deliver_us.p50),
        ms(s.deliver_us.p99),
        ms(s.deliver_us.p999),
        out.display()
    );
    Ok(())
}

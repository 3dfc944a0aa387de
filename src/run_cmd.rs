//! `chatsim run`: runs scenarios in the simulator, prints a table, shrinks failures.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sim::{RunOptions, RunResult, Scenario};
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct RunArgs {
    /// A scenario file, or a directory of them (searched recursively).
    #[arg(default_value = "scenarios")]
    pub path: PathBuf,
    /// Run this one seed (default: each scenario's own `seed`).
    #[arg(long, conflicts_with = "seeds")]
    pub seed: Option<u64>,
    /// Run a range of seeds, inclusive: `1..100` runs seeds 1 through 100.
    #[arg(long)]
    pub seeds: Option<String>,
    /// Switch on a planted bug in the server (repeatable).
    #[arg(long = "bug", value_name = "NAME")]
    pub bugs: Vec<String>,
    /// Run each seed twice and compare trace hashes.
    #[arg(long)]
    pub check_determinism: bool,
    /// Write the JSONL trace of the run here (one scenario, one seed).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Where traces of failing runs and shrunk scenarios are written.
    #[arg(long, default_value = "reports")]
    pub reports: PathBuf,
    /// Do not shrink failing runs.
    #[arg(long)]
    pub no_shrink: bool,
    /// Most simulation runs spent shrinking one failure.
    #[arg(long, default_value_t = 40)]
    pub shrink_budget: usize,
    /// Threads for many seeds [default: number of cores].
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Run every scenario with in-process gateways (`[topology] tiered = false`, the first
    /// version's topology) instead of gateway nodes linked to the chat service.
    #[arg(long)]
    pub in_process: bool,
    /// Print what each seed drew before its result: the design-space knobs of a swarm
    /// scenario with `[swarm.space]`, and every fault on its timeline (with many seeds, the
    /// failing ones only).
    #[arg(long)]
    pub explain: bool,
}

/// The knobs and faults `seed` draws from `sc`, one line each, indented.
fn explain(sc: &Scenario, seed: u64) -> String {
    let mut out = String::new();
    match sim::space::draw(sc, seed) {
        Ok(d) => {
            if !d.knobs.is_empty() {
                let line: Vec<String> = d.knobs.iter().map(|(k, v)| format!("{k}={v}")).collect();
                out.push_str(&format!("  drew (seed {seed}): {}\n", line.join(" ")));
                for (i, g) in d.scenario.workload.groups.iter().enumerate() {
                    out.push_str(&format!(
                        "    group {i}: size {} messages {}{}{} members {:?}\n",
                        g.size,
                        g.messages,
                        if g.announcement_only {
                            " announcement-only"
                        } else {
                            ""
                        },
                        if g.media_messages > 0 {
                            format!(" media {} bytes", g.media_bytes)
                        } else {
                            String::new()
                        },
                        g.members.clone().unwrap_or_default()
                    ));
                }
                for l in &d.scenario.workload.links {
                    out.push_str(&format!(
                        "    link u{}/d{} at {} ms\n",
                        l.user, l.device, l.at_ms
                    ));
                }
                for c in &d.scenario.workload.membership {
                    out.push_str(&format!(
                        "    {} u{} in group {} at {} ms\n",
                        c.op, c.user, c.group, c.at_ms
                    ));
                }
                for u in &d.scenario.workload.unlinks {
                    out.push_str(&format!(
                        "    unlink u{}/d{} by d{} at {} ms\n",
                        u.user,
                        u.device,
                        u.requester(),
                        u.at_ms
                    ));
                }
            }
            for f in sim::plan::Plan::draw(&d.scenario, seed).faults {
                out.push_str(&format!(
                    "    fault at {} ms: {:?} {}{}\n",
                    f.at_ms,
                    f.kind,
                    sim::world::describe(&f),
                    f.until_ms
                        .map(|u| format!(" until {u} ms"))
                        .unwrap_or_default()
                ));
            }
        }
        Err(e) => out.push_str(&format!("  cannot draw seed {seed}: {e}\n")),
    }
    out
}

fn parse_seeds(s: &str) -> Result<Vec<u64>> {
    let (a, b) = s
        .split_once("..")
        .with_context(|| format!("--seeds '{s}': expected A..B, e.g. 1..100"))?;
    let b = b.trim_start_matches('=');
    let a: u64 = a
        .trim()
        .parse()
        .with_context(|| format!("--seeds '{s}': bad start"))?;
    let b: u64 = b
        .trim()
        .parse()
        .with_context(|| format!("--seeds '{s}': bad end"))?;
    if b < a {
        bail!("--seeds '{s}': end is before start");
    }
    if b - a >= 1_000_000 {
        bail!("--seeds '{s}': at most 1,000,000 seeds per run");
    }
    Ok((a..=b).collect())
}

/// One scenario's outcome over its seeds.
struct Row {
    name: String,
    seeds: usize,
    passed: usize,
    p50: u64,
    p99: u64,
    kinds: String,
    expect: String,
}

pub fn run(a: RunArgs) -> Result<i32> {
    let mut opts = RunOptions::default();
    for b in &a.bugs {
        opts.bugs.enable(b).map_err(anyhow::Error::msg)?;
    }
    let files =
        sim::scenario::collect(&a.path).with_context(|| format!("reading {}", a.path.display()))?;
    if files.is_empty() {
        bail!("no scenario files (*.toml) in {}", a.path.display());
    }
    // Parse everything first: a bad file is reported before any time is spent.
    let mut scenarios = Vec::new();
    for f in &files {
        let mut sc = Scenario::load(f)?;
        if a.in_process {
            sc.topology.tiered = false;
        }
        scenarios.push((f.clone(), sc));
    }
    let jobs = a.jobs.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let bug_flags: String = a.bugs.iter().map(|b| format!(" --bug {b}")).collect();
    let replay_flags = format!(
        "{bug_flags}{}",
        if a.in_process { " --in-process" } else { "" }
    );
    let mut rows = Vec::new();
    let mut failed_any = false;
    for (file, sc) in &scenarios {
        let seeds = match (&a.seeds, a.seed) {
            (Some(r), _) => parse_seeds(r)?,
            (None, Some(s)) => vec![s],
            (None, None) => vec![sc.seed],
        };
        let results = if seeds.len() > 1 {
            let pb = ProgressBar::new(seeds.len() as u64);
            pb.set_style(
                ProgressStyle::with_template(
                    "{prefix:>18} [{bar:30}] {pos}/{len} seeds {msg} ({eta})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            pb.set_prefix(sc.name.clone());
            let failures = std::sync::atomic::AtomicUsize::new(0);
            let results = sim::run_seeds(sc, &seeds, &opts, jobs, &|r| {
                if !matches!(r, Ok(x) if x.passed) {
                    let n = failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    pb.set_message(format!("{n} failing"));
                }
                pb.inc(1);
            });
            pb.finish_and_clear();
            results
        } else {
            seeds
                .iter()
                .map(|s| (*s, sim::run_seed(sc, *s, &opts).map(|(r, _)| r)))
                .collect()
        };
        let mut ok: Vec<&RunResult> = Vec::new();
        let mut bad: Vec<(u64, String)> = Vec::new();
        let mut first_fail: Option<&RunResult> = None;
        for (seed, r) in &results {
            match r {
                Ok(r) if r.passed => ok.push(r),
                Ok(r) => {
                    ok.push(r);
                    bad.push((*seed, r.failures.first().cloned().unwrap_or_default()));
                    first_fail.get_or_insert(r);
                }
                Err(e) => {
                    failed_any = true;
                    bad.push((*seed, format!("simulation error: {e}")));
                }
            }
        }
        if seeds.len() == 1 {
            if let Some(r) = ok.first() {
                println!(
                    "{}: seed {} {} (sends {}, acked {}, deliver p50 {} ms p99 {} ms, trace {:016x})",
                    sc.name,
                    r.seed,
                    if r.passed { "passed" } else { "FAILED" },
                    r.figures.sends,
                    r.figures.acked,
                    r.figures.send_to_deliver_ms.p50,
                    r.figures.send_to_deliver_ms.p99,
                    r.trace_hash
                );
                let f = &r.figures;
                println!(
                    "  send→ack p50/p99 {}/{} ms, send→read p50/p99 {}/{} ms, peak reconnects {}/s, backoff min/median/max {}/{}/{} ms, pushes {}, redeliveries {}, fullest queue {} frames/{} bytes",
                    f.send_to_ack_ms.p50,
                    f.send_to_ack_ms.p99,
                    f.send_to_read_ms.p50,
                    f.send_to_read_ms.p99,
                    f.peak_reconnects_per_sec,
                    f.backoff_ms.0,
                    f.backoff_ms.1,
                    f.backoff_ms.2,
                    f.pushes,
                    f.redeliveries,
                    f.max_queue.0,
                    f.max_queue.1
                );
            }
        }
        if a.explain && seeds.len() == 1 {
            print!("{}", explain(sc, seeds[0]));
        }
        for (seed, why) in bad.iter().take(5) {
            println!("  FAIL {} seed {seed}: {why}", sc.name);
            if a.explain && seeds.len() > 1 {
                print!("{}", explain(sc, *seed));
            }
            println!(
                "       replay: chatsim run {} --seed {seed}{replay_flags}",
                file.display()
            );
        }
        if bad.len() > 5 {
            println!("  ... and {} more failing seeds", bad.len() - 5);
        }
        if let Some(r) = first_fail {
            failed_any = true;
            if let Some(v) = r.violations.first() {
                println!("  witness: {v}");
                for e in v.context.iter().rev().take(6).rev() {
                    println!("    {}", serde_json::to_string(e).unwrap_or_default());
                }
            }
            let trace = write_trace(&a.reports, sc, r.seed, &opts)?;
            println!("  trace: {}", trace.display());
            if !a.no_shrink && sc.name.ends_with("-shrunk") {
                println!("  (already a shrunk scenario: not shrinking again)");
            } else if !a.no_shrink {
                if let Some(kind) = r.violations.first().map(|v| v.kind) {
                    let s = sim::shrink::shrink(sc, r.seed, &opts, kind, a.shrink_budget);
                    let path =
                        write_shrunk(&a.reports, &s.scenario, r.seed, kind, file, &bug_flags)?;
                    println!(
                        "  shrunk in {} runs to {} faults, {} users, {} msgs/user: {}",
                        s.runs,
                        s.scenario.faults.len(),
                        s.scenario.workload.users,
                        s.scenario.workload.messages_per_user,
                        path.display()
                    );
                }
            }
        }
        if a.check_determinism {
            for seed in seeds.iter().take(if seeds.len() > 1 { 3 } else { 1 }) {
                let h1 = sim::run_seed(sc, *seed, &opts)
                    .map(|(r, _)| r.trace_hash)
                    .map_err(anyhow::Error::msg)?;
                let h2 = sim::run_seed(sc, *seed, &opts)
                    .map(|(r, _)| r.trace_hash)
                    .map_err(anyhow::Error::msg)?;
                if h1 == h2 {
                    println!("  determinism: seed {seed} replayed to the same trace ({h1:016x})");
                } else {
                    failed_any = true;
                    println!("  determinism: FAILED seed {seed}: {h1:016x} != {h2:016x}");
                }
            }
        }
        if let Some(path) = &a.trace {
            if scenarios.len() == 1 && seeds.len() == 1 {
                let (_, o) = sim::run_seed(sc, seeds[0], &opts).map_err(anyhow::Error::msg)?;
                std::fs::write(path, o.ledger.trace_jsonl())
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("  trace written to {}", path.display());
            } else {
                bail!("--trace needs exactly one scenario and one seed");
            }
        }
        let mut p50s: Vec<u64> = ok
            .iter()
            .map(|r| r.figures.send_to_deliver_ms.p50)
            .collect();
        p50s.sort_unstable();
        let kinds: std::collections::BTreeSet<&str> = ok
            .iter()
            .flat_map(|r| r.violations.iter().map(|v| v.kind.name()))
            .collect();
        rows.push(Row {
            name: sc.name.clone(),
            seeds: seeds.len(),
            passed: seeds.len() - bad.len(),
            p50: p50s.get(p50s.len() / 2).copied().unwrap_or(0),
            p99: ok
                .iter()
                .map(|r| r.figures.send_to_deliver_ms.p99)
                .max()
                .unwrap_or(0),
            kinds: if kinds.is_empty() {
                "-".into()
            } else {
                kinds.into_iter().collect::<Vec<_>>().join(",")
            },
            expect: if sc.expect.violations.is_empty() {
                "none".into()
            } else {
                sc.expect
                    .violations
                    .iter()
                    .map(|k| k.name())
                    .collect::<Vec<_>>()
                    .join(",")
            },
        });
    }
    println!();
    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(8).max(8);
    println!(
        "{:<width$} {:>6} {:>7} {:>7} {:>10} {:>10}  {:<24} expected",
        "scenario", "seeds", "passed", "failed", "p50 ms", "p99 ms", "violations found"
    );
    for r in &rows {
        println!(
            "{:<width$} {:>6} {:>7} {:>7} {:>10} {:>10}  {:<24} {}",
            r.name,
            r.seeds,
            r.passed,
            r.seeds - r.passed,
            r.p50,
            r.p99,
            r.kinds,
            r.expect
        );
    }
    println!("(p50/p99: send→deliver in simulated ms; p99 is the worst seed's)");
    Ok(if failed_any { 1 } else { 0 })
}

fn write_trace(dir: &Path, sc: &Scenario, seed: u64, opts: &RunOptions) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (_, o) = sim::run_seed(sc, seed, opts).map_err(anyhow::Error::msg)?;
    let path = dir.join(format!("trace-{}-seed{seed}.jsonl", sc.name));
    std::fs::write(&path, o.ledger.trace_jsonl())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

fn write_shrunk(
    dir: &Path,
    sc: &Scenario,
    seed: u64,
    kind: sim::ViolationKind,
    original: &Path,
    bug_flags: &str,
) -> Result<PathBuf> {
    let mut sc = sc.clone();
    sc.seed = seed;
    sc.name = format!("{}-shrunk", sc.name);
    sc.description = format!(
        "Shrunk from {} (seed {seed}) to the smallest variant found that still shows a '{}' violation.",
        original.display(),
        kind.name()
    );
    sc.expect.violations = Vec::new();
    // Planted bugs given with --bug go into the file: it must fail on its own.
    for b in bug_flags
        .split(" --bug ")
        .map(str::trim)
        .filter(|b| !b.is_empty())
    {
        if !sc.design_flaws.iter().any(|x| x == b) {
            sc.design_flaws.push(b.to_string());
        }
    }
    let body = toml::to_string(&sc).context("encoding the shrunk scenario")?;
    let path = dir.join(format!(
        "shrunk-{}-seed{seed}.toml",
        sc.name.trim_end_matches("-shrunk")
    ));
    let text = format!(
        "# Shrunk from {} (seed {seed}{bug_flags}); still shows a '{}' violation.\n# Replay: chatsim run {}\n{body}",
        original.display(),
        kind.name(),
        path.display()
    );
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

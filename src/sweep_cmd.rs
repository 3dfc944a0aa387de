//! `chatsim load --sweep KNOB=A..B`: one load run per point against the same server, in
//! order, and one report of the latency-throughput curve with its knee (loadgen::sweep).
//! The sweep stops at the first invalid point: past it the figures are not the server's.

use crate::load_cmd::{config, LoadArgs};
use anyhow::{bail, Result};
use loadgen::sweep::{knee, Knob, Point, Report, Sweep};
use std::path::PathBuf;

/// Runs the sweep `spec` with the rest of `a`; returns the exit code (1 when no point was
/// valid).
pub fn sweep(a: &LoadArgs, spec: &str) -> Result<i32> {
    let sw = Sweep::parse(spec).map_err(anyhow::Error::msg)?;
    if a.processes > 1 || a.shard.is_some() {
        bail!("--sweep runs in one generator process: drop --processes/--shard");
    }
    if !a.fail_if.is_empty() {
        bail!("--sweep with --fail-if: judge a single run instead (each point has its report)");
    }
    let base = config(a)?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("reports/sweep-{}", base.run_id)));
    std::fs::create_dir_all(&out)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let n = sw.points.len();
    let mut points = Vec::new();
    let mut stopped = None;
    for (k, v) in sw.points.iter().enumerate() {
        let mut cfg = base.clone();
        cfg.run_id = format!("{}-p{k}", base.run_id);
        let dir = format!("point-{}", k + 1);
        cfg.report_dir = out.join(&dir);
        match sw.knob {
            Knob::Rate => {
                cfg.rate_per_user = v / cfg.users as f64;
                if cfg.rate_per_user > 1000.0 {
                    bail!(
                        "--sweep rate={v}: {:.0} msgs/s per sender is past 1000; use more --users",
                        cfg.rate_per_user
                    );
                }
            }
            Knob::GroupSize => cfg.group_size = if *v < 2.0 { 0 } else { *v as usize },
        }
        eprintln!(
            "point {}/{n}: {} = {v} ({} senders x {:.2} msgs/s{})",
            k + 1,
            sw.name(),
            cfg.users,
            cfg.rate_per_user,
            if cfg.group_size >= 2 {
                format!(", groups of {}", cfg.group_size)
            } else {
                String::new()
            }
        );
        let s = rt.block_on(loadgen::run(cfg))?;
        eprintln!(
            "  delivered {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, {}",
            s.delivered_per_s,
            s.deliver_us.p50 as f64 / 1000.0,
            s.deliver_us.p99 as f64 / 1000.0,
            s.invalid_reason.as_deref().unwrap_or("valid")
        );
        points.push(Point::of(*v, &dir, &s));
        if !s.valid {
            if k + 1 < n {
                stopped = Some(format!(
                    "point {} ({} = {v}) was INVALID: {}",
                    k + 1,
                    sw.name(),
                    s.invalid_reason.as_deref().unwrap_or("")
                ));
            }
            break;
        }
    }
    let k = knee(&points);
    let report = Report {
        knob: sw.name().into(),
        users: base.users,
        points: points.clone(),
        knee: k,
        stopped: stopped.clone(),
    };
    loadgen::sweep::write(&out, &report)?;
    println!(
        "sweep of {} against {} ({} senders):",
        sw.name(),
        base.target,
        base.users
    );
    println!(
        "  {:>10}  {:>12}  {:>14}  {:>8}  {:>8}  {:>9}  verdict",
        sw.name(),
        "offered/s",
        "delivered/s",
        "p50 ms",
        "p99 ms",
        "p99.9 ms"
    );
    for (i, p) in points.iter().enumerate() {
        println!(
            "  {:>10}  {:>12.1}  {:>14.1}  {:>8.2}  {:>8.2}  {:>9.2}  {}{}",
            p.setting,
            p.offered_per_s,
            p.delivered_per_s,
            p.p50_ms,
            p.p99_ms,
            p.p999_ms,
            if p.valid { "valid" } else { "INVALID" },
            if k == Some(i) { "  <- knee" } else { "" }
        );
    }
    if let Some(s) = &stopped {
        println!("  stopped early: {s}");
    }
    match k {
        Some(i) => println!(
            "  knee: {:.0} delivered msgs/s at p99 {:.2} ms (the last valid point before p99 doubles and rises 10 ms)",
            points[i].delivered_per_s, points[i].p99_ms
        ),
        None => println!("  no valid point: no knee"),
    }
    println!(
        "  report: {}/sweep.html (also sweep.csv, sweep.json, point-K/)",
        out.display()
    );
    Ok(i32::from(k.is_none()))
}

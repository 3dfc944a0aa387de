//! `chatsim load --processes N` and `--shard I/N`: one load spread over several generator
//! processes (each under the per-process open-file limit, each from its own 127.0.0.x
//! source address), started together and merged exactly. A shard holds whole
//! conversations, so a message's sender and recipients share one process and one clock.

use crate::load_cmd::{print_summary, run_id, verdict_code, LoadArgs};
use anyhow::{bail, Context, Result};
use loadgen::fail_if::Condition;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Parses `I/N` (0 <= I < N).
pub fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let parsed = s
        .split_once('/')
        .and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
    match parsed {
        Some((i, n)) if n >= 1 && i < n => Ok((i, n)),
        _ => bail!("--shard {s:?}: expected I/N with 0 <= I < N, e.g. 0/4"),
    }
}

/// Shard `i` of `n`'s share: senders in whole conversations of `block` users, and idle
/// devices. The shares of 0..n add up to the whole.
pub fn share(users: usize, block: usize, idle: usize, i: usize, n: usize) -> (usize, usize) {
    let blocks = users / block;
    let b = blocks * (i + 1) / n - blocks * i / n;
    (b * block, idle * (i + 1) / n - idle * i / n)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Sleeps until Unix time `at_ms` (refusing one long past or more than 15 min ahead).
pub fn wait_until(at_ms: u64) -> Result<()> {
    let now = now_ms();
    if at_ms + 10_000 < now {
        bail!(
            "--start-at {at_ms} was {:.1} s ago: shards would not run together",
            (now - at_ms) as f64 / 1000.0
        );
    }
    if at_ms > now + 15 * 60_000 {
        bail!("--start-at {at_ms} is more than 15 minutes away");
    }
    if at_ms > now {
        std::thread::sleep(Duration::from_millis(at_ms - now));
    }
    Ok(())
}

/// This process's soft limit on open files (Linux `/proc/self/limits`).
fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Runs `a` as `a.processes` shard processes and merges their reports; returns the exit
/// code (1 when the merged run is invalid, a shard failed, or a `--fail-if` holds).
pub fn coordinate(a: &LoadArgs, conds: &[Condition]) -> Result<i32> {
    let n = a.processes;
    let t = a.targets.len();
    if a.shard.is_some() || a.source_ip.is_some() || a.start_at.is_some() {
        bail!("--processes sets each shard's --shard, --source-ip and --start-at itself");
    }
    if n > 250 {
        bail!("--processes {n}: at most 250 (one 127.0.0.x source address each)");
    }
    if t > n {
        bail!("{t} targets but only {n} processes: every target needs a shard");
    }
    if a.secret_files.len() != 1 && a.secret_files.len() != t {
        bail!(
            "{} --secret-file for {t} --target: give one for all, or one per target",
            a.secret_files.len()
        );
    }
    for f in &a.secret_files {
        crate::load_cmd::read_secret(f)?;
    }
    let block = if a.group_size >= 2 { a.group_size } else { 2 };
    if a.users % block != 0 {
        bail!(
            "--users {} is not a multiple of {block} (senders talk in {}): the last \
             conversation would wait for members that never connect",
            a.users,
            if block == 2 {
                "pairs".to_string()
            } else {
                format!("groups of {block}")
            }
        );
    }
    let limit = open_file_limit().unwrap_or(1024);
    for i in 0..n {
        let (u, d) = share(a.users, block, a.idle_devices, i, n);
        if u < 2 {
            bail!("shard {i} of {n} would get {u} senders: use more --users or fewer --processes");
        }
        // One socket per device, the probe, and some for the process itself.
        let need = u + d + 64;
        if need > limit {
            bail!(
                "shard {i} would hold {} connections, past this machine's per-process limit of \
                 {limit} open files: use --processes {} or more",
                u + d,
                (a.users + a.idle_devices).div_ceil(limit.saturating_sub(64).max(1))
            );
        }
    }
    let id = a.run_id.clone().unwrap_or_else(run_id);
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("reports/load-{id}")));
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    // Time for every child to start and read its secret before the common start.
    let start_at = now_ms() + 2_000 + 100 * n as u64;
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for i in 0..n {
        let target = &a.targets[i % t];
        let secret = &a.secret_files[if a.secret_files.len() == 1 { 0 } else { i % t }];
        let dir = out.join(format!("shard-{i}"));
        let log = out.join(format!("shard-{i}.log"));
        let file = std::fs::File::create(&log)?;
        let mut c = std::process::Command::new(&exe);
        c.arg("load")
            .args(["--target", target])
            .arg("--secret-file")
            .arg(secret)
            .args(["--users", &a.users.to_string()])
            .args(["--idle-devices", &a.idle_devices.to_string()])
            .args(["--shard", &format!("{i}/{n}")])
            .args(a.gateways.iter().flat_map(|g| ["--gateway", g.as_str()]))
            .args(["--start-at", &start_at.to_string()])
            .args(["--run-id", &id])
            .args(["--rate", &a.rate.to_string()])
            .args(["--group-size", &a.group_size.to_string()])
            .args(["--ramp", &a.ramp.to_string()])
            .args(["--idle", &a.idle.to_string()])
            .args(["--duration", &a.duration.to_string()])
            .args(["--max-errors", &a.max_errors.to_string()])
            .args(["--typing", &a.typing.to_string()])
            .args(["--scrape-metrics", &a.scrape_metrics.to_string()])
            .args(
                a.metrics_url
                    .iter()
                    .flat_map(|u| ["--metrics-url", u.as_str()]),
            )
            .arg("--out")
            .arg(&dir)
            .stdout(file.try_clone()?)
            .stderr(file);
        if let Some(s) = a.storm_at {
            c.args(["--storm-at", &s.to_string()])
                .args(["--storm-fraction", &a.storm_fraction.to_string()]);
        }
        if target.starts_with("ws://127.") {
            c.args(["--source-ip", &format!("127.0.0.{}", 2 + i)]);
        }
        let child = c
            .spawn()
            .with_context(|| format!("starting shard {i} ({})", exe.display()))?;
        children.push((i, child, dir, log));
    }
    eprintln!(
        "  {n} generator processes started (logs in {}/shard-I.log); they start together in {:.1} s",
        out.display(),
        start_at.saturating_sub(now_ms()) as f64 / 1000.0
    );
    // Bounded wait: everything a shard does, plus a generous margin.
    let per_shard_devices = (a.users + a.idle_devices) / n + 1;
    let budget = Duration::from_secs(
        5 + a.ramp + a.idle + 1 + a.duration + 4 + 15 + 60 + per_shard_devices as u64 / 100 + 120,
    );
    let deadline = Instant::now() + budget;
    let mut said = Instant::now();
    let mut codes = vec![None; n];
    while codes.iter().any(Option::is_none) {
        if Instant::now() > deadline {
            for (_, c, _, _) in &mut children {
                let _ = c.kill();
            }
            break;
        }
        for (i, c, _, _) in &mut children {
            if codes[*i].is_none() {
                if let Ok(Some(st)) = c.try_wait() {
                    codes[*i] = Some(st.code().unwrap_or(-1));
                }
            }
        }
        if said.elapsed() >= Duration::from_secs(10) {
            said = Instant::now();
            eprintln!(
                "  {} of {n} shards finished",
                codes.iter().filter(|c| c.is_some()).count()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut dirs = Vec::new();
    let mut missing = Vec::new();
    for (i, mut c, dir, log) in children {
        let _ = c.wait();
        if dir.join("summary.json").exists() {
            dirs.push(dir);
        } else {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let last = text
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no output");
            missing.push(format!(
                "shard {i} wrote no report ({}: {last})",
                log.display()
            ));
        }
    }
    if dirs.is_empty() {
        bail!("no shard wrote a report:\n  {}", missing.join("\n  "));
    }
    let refs: Vec<&std::path::Path> = dirs.iter().map(|d| d.as_path()).collect();
    let s =
        loadgen::merge::merge_with(&refs, &out, false, &missing, &a.fail_if, Some(a.max_errors))
            .context("merging the shards' reports (the shards did not run together)")?;
    println!("{n} generator processes, merged:");
    print_summary(&s, &out);
    Ok(verdict_code(&s, conds))
}

#[cfg(test)]
mod tests {
    use super::{parse_shard, share};

    #[test]
    fn shards_split_whole_conversations_and_add_up() {
        let (mut u, mut d) = (0, 0);
        for i in 0..7 {
            let (su, sd) = share(1000, 2, 98_001, i, 7);
            assert_eq!(su % 2, 0, "pairs stay in one shard");
            u += su;
            d += sd;
        }
        assert_eq!((u, d), (1000, 98_001));
        let (g, _) = share(100, 10, 0, 1, 3);
        assert_eq!(g % 10, 0, "groups stay in one shard");
    }

    #[test]
    fn shard_syntax_is_checked() {
        assert_eq!(parse_shard("2/5").ok(), Some((2, 5)));
        assert!(parse_shard("5/5").is_err());
        assert!(parse_shard("x").is_err());
    }
}

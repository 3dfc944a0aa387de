//! `chatsim play`: runs a scenario and narrates its trace, hop by hop.

use anyhow::{Context, Result};
use sim::playback::{html, narrate, Filter};
use sim::{RunOptions, Scenario};
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct PlayArgs {
    /// The scenario to play (e.g. scenarios/stories/one-send.toml).
    pub scenario: PathBuf,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Wait for Enter before each hop (`q` then Enter stops; ignored when stdin is not a terminal).
    #[arg(long)]
    pub step: bool,
    /// Play in simulated time at this speed (1 = real time); 0 prints at once.
    #[arg(long, default_value_t = 0.0)]
    pub speed: f64,
    /// Only this conversation (e.g. dm:u0:u1).
    #[arg(long)]
    pub conv: Option<String>,
    /// Only this user's view (e.g. u0).
    #[arg(long)]
    pub user: Option<String>,
    /// Also write a self-contained HTML sequence diagram here.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Switch on a planted bug (repeatable), to watch it break the story.
    #[arg(long = "bug", value_name = "NAME")]
    pub bugs: Vec<String>,
}

pub fn play(a: PlayArgs) -> Result<i32> {
    let sc = Scenario::load(&a.scenario)?;
    let mut opts = RunOptions::default();
    for b in &a.bugs {
        opts.bugs.enable(b).map_err(anyhow::Error::msg)?;
    }
    let seed = a.seed.unwrap_or(sc.seed);
    let (r, o) = sim::run_seed(&sc, seed, &opts).map_err(anyhow::Error::msg)?;
    let filter = Filter {
        conversation: a.conv.as_deref().map(normalize_conv),
        user: a.user.clone(),
    };
    check_filter(&filter, &o.ledger.trace)?;
    let lines = narrate(&o.ledger.trace, &filter);
    let code = if r.passed { 0 } else { 1 };
    // The page first, so `play ... --html X | head` still writes it.
    if let Some(path) = &a.html {
        let page = html(
            &format!("chatsim play: {} (seed {seed})", sc.name),
            &lines,
            &o.ledger.trace,
            &filter,
        );
        std::fs::write(path, page).with_context(|| format!("writing {}", path.display()))?;
    }
    let mut out = std::io::stdout().lock();
    let told = tell(&mut out, &a, &sc, seed, &r, &lines);
    match told {
        // A closed pipe (`| head`) or `q` at a step: stop quietly.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(code),
        Err(e) => return Err(e.into()),
        Ok(()) => {}
    }
    if let Some(path) = &a.html {
        let _ = writeln!(out, "sequence diagram: {}", path.display());
    }
    Ok(code)
}

/// `dm:u1:u0` and `dm:u0:u1` name the same chat: ids in byte order, as the server writes.
fn normalize_conv(c: &str) -> String {
    match c.strip_prefix("dm:").and_then(|r| r.split_once(':')) {
        Some((a, b)) if a > b => format!("dm:{b}:{a}"),
        _ => c.to_string(),
    }
}

/// A filter naming a user or chat that is not in this run is a mistake: say which exist.
fn check_filter(f: &Filter, trace: &[sim::ledger::TraceEvent]) -> Result<()> {
    let users: std::collections::BTreeSet<&str> = trace
        .iter()
        .filter_map(|e| e.at.split_once('/').map(|(u, _)| u))
        .collect();
    let convs: std::collections::BTreeSet<&str> =
        trace.iter().filter_map(|e| e.conv.as_deref()).collect();
    let list = |set: &std::collections::BTreeSet<&str>| {
        let v: Vec<&str> = set.iter().copied().take(12).collect();
        let more = if set.len() > 12 { ", …" } else { "" };
        format!("{}{more}", v.join(", "))
    };
    if let Some(u) = &f.user {
        if !users.contains(u.as_str()) {
            anyhow::bail!(
                "--user {u}: no such user in this run; users are {}",
                list(&users)
            );
        }
    }
    if let Some(c) = &f.conversation {
        if !convs.contains(c.as_str()) {
            anyhow::bail!(
                "--conv {c}: no such conversation in this run; conversations are {}",
                list(&convs)
            );
        }
    }
    Ok(())
}

/// Prints the narration (paced by `--speed`, one hop per Enter with `--step`; `q` stops).
fn tell(
    out: &mut impl Write,
    a: &PlayArgs,
    sc: &Scenario,
    seed: u64,
    r: &sim::RunResult,
    lines: &[sim::playback::Line],
) -> std::io::Result<()> {
    writeln!(
        out,
        "{} (seed {seed}): {}",
        sc.name,
        sc.description
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    )?;
    writeln!(out)?;
    let stdin = std::io::stdin();
    let interactive = a.step && stdin.is_terminal();
    let mut last_t = 0;
    for l in lines {
        if a.speed > 0.0 {
            out.flush()?;
            let dt = l.t.saturating_sub(last_t) as f64 / a.speed;
            std::thread::sleep(std::time::Duration::from_secs_f64((dt / 1000.0).min(5.0)));
        }
        last_t = l.t;
        writeln!(out, "{l}")?;
        if interactive {
            write!(out, "  [Enter: next, q: quit] ")?;
            out.flush()?;
            let mut s = String::new();
            if stdin.lock().read_line(&mut s)? == 0 || s.trim() == "q" {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
        }
    }
    writeln!(out)?;
    writeln!(
        out,
        "{}: {} ({} hops; sends {}, acked {}; deliver p50 {} ms p99 {} ms)",
        sc.name,
        if r.passed {
            "invariants hold"
        } else {
            "FAILED"
        },
        lines.len(),
        r.figures.sends,
        r.figures.acked,
        r.figures.send_to_deliver_ms.p50,
        r.figures.send_to_deliver_ms.p99
    )?;
    for f in &r.failures {
        writeln!(out, "  {f}")?;
    }
    Ok(())
}

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
    /// Wait for Enter before each hop.
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
        conversation: a.conv.clone(),
        user: a.user.clone(),
    };
    let lines = narrate(&o.ledger.trace, &filter);
    println!(
        "{} (seed {seed}): {}",
        sc.name,
        sc.description
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!();
    let stdin = std::io::stdin();
    let interactive = a.step && stdin.is_terminal();
    let mut last_t = 0;
    for l in &lines {
        if a.speed > 0.0 {
            let dt = l.t.saturating_sub(last_t) as f64 / a.speed;
            std::thread::sleep(std::time::Duration::from_secs_f64((dt / 1000.0).min(5.0)));
        }
        last_t = l.t;
        println!("{l}");
        if interactive {
            print!("  [Enter] ");
            std::io::stdout().flush()?;
            let mut s = String::new();
            if stdin.lock().read_line(&mut s)? == 0 {
                break;
            }
        }
    }
    println!();
    println!(
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
    );
    for f in &r.failures {
        println!("  {f}");
    }
    if let Some(path) = &a.html {
        let page = html(
            &format!("chatsim play: {} (seed {seed})", sc.name),
            &lines,
            &o.ledger.trace,
            &filter,
        );
        std::fs::write(path, page).with_context(|| format!("writing {}", path.display()))?;
        println!("sequence diagram: {}", path.display());
    }
    Ok(if r.passed { 0 } else { 1 })
}

//! A seed is a complete description of a run: `chatsim run --seed S --trace FILE` in two
//! separate processes writes the same trace, byte for byte, and another seed writes another.
//! Separate processes catch what one process re-running a seed cannot: per-process hash
//! seeds, addresses, thread ids and anything else that leaks in from outside the seed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Seeds that finish in a second or two in a debug build, for both scenarios. Seed 4 of
/// swarm-space has many phones download one file while group commit holds the answers:
/// with the waiters of a round woken in tokio's per-process random order (a `watch`
/// channel), two processes wrote different traces in most pairs of runs.
const SEEDS: [u64; 3] = [3, 4, 17];

/// Two traces of one seed, each written by its own `chatsim run` process.
struct Replays {
    seed: u64,
    first: Vec<u8>,
    second: Vec<u8>,
}

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "chatsim-determinism-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Starts `chatsim run SCENARIO --seed SEED --trace OUT --no-shrink` (reports, should the
/// seed fail its verdict, go to `dir` too). Its exit code is not judged: a failing seed
/// exits 1 and still writes its trace.
fn spawn_run(scenario: &str, seed: u64, out: &Path, dir: &Path) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_chatsim"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("run")
        .arg(scenario)
        .arg("--seed")
        .arg(seed.to_string())
        .arg("--trace")
        .arg(out)
        .arg("--no-shrink")
        .arg("--reports")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn chatsim run")
}

/// Runs every seed of `SEEDS` twice, each run its own process (all started at once), and
/// returns the trace bytes. Panics, with the child's output, if a run wrote no trace.
fn replays(scenario: &str) -> Vec<Replays> {
    let tag = Path::new(scenario)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("scenario");
    let dir = TempDir::new(tag);
    let runs: Vec<(u64, PathBuf, std::process::Child)> = SEEDS
        .iter()
        .flat_map(|&seed| [(seed, 1), (seed, 2)])
        .map(|(seed, n)| {
            let out = dir.0.join(format!("trace-seed{seed}-run{n}.jsonl"));
            let child = spawn_run(scenario, seed, &out, &dir.0);
            (seed, out, child)
        })
        .collect();
    let mut traces: Vec<(u64, Vec<u8>)> = Vec::new();
    for (seed, out, child) in runs {
        let o = child.wait_with_output().expect("wait for chatsim run");
        let trace = std::fs::read(&out).unwrap_or_default();
        assert!(
            !trace.is_empty(),
            "chatsim run {scenario} --seed {seed} wrote no trace to {} ({})\nstdout:\n{}\nstderr:\n{}",
            out.display(),
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        traces.push((seed, trace));
    }
    traces
        .chunks(2)
        .map(|pair| Replays {
            seed: pair[0].0,
            first: pair[0].1.clone(),
            second: pair[1].1.clone(),
        })
        .collect()
}

/// The traces of `scenarios/swarm-space.toml`, run once for all tests that need them.
fn swarm_space() -> &'static [Replays] {
    static R: OnceLock<Vec<Replays>> = OnceLock::new();
    R.get_or_init(|| replays("scenarios/swarm-space.toml"))
}

/// The traces of `scenarios/chat-crash.toml`, run once for all tests that need them.
fn chat_crash() -> &'static [Replays] {
    static R: OnceLock<Vec<Replays>> = OnceLock::new();
    R.get_or_init(|| replays("scenarios/chat-crash.toml"))
}

/// The first line on which two traces differ, for a readable failure.
fn first_difference(a: &[u8], b: &[u8]) -> String {
    let (a, b) = (String::from_utf8_lossy(a), String::from_utf8_lossy(b));
    for (i, (x, y)) in a.lines().zip(b.lines()).enumerate() {
        if x != y {
            return format!("line {}:\n  first:  {x}\n  second: {y}", i + 1);
        }
    }
    format!(
        "one trace is a prefix of the other ({} vs {} lines)",
        a.lines().count(),
        b.lines().count()
    )
}

fn assert_same_bytes(scenario: &str, runs: &[Replays]) {
    for r in runs {
        assert!(
            r.first == r.second,
            "{scenario} seed {}: two processes wrote different traces ({} vs {} bytes), {}",
            r.seed,
            r.first.len(),
            r.second.len(),
            first_difference(&r.first, &r.second)
        );
    }
}

fn assert_seeds_differ(scenario: &str, runs: &[Replays]) {
    assert!(
        runs.len() >= 2,
        "expected several seeds, got {}",
        runs.len()
    );
    for (i, a) in runs.iter().enumerate() {
        for b in &runs[i + 1..] {
            assert_ne!(a.seed, b.seed);
            assert!(
                a.first != b.first,
                "{scenario}: seeds {} and {} wrote the same trace; the seed is not reaching the run",
                a.seed,
                b.seed
            );
        }
    }
}

#[test]
fn a_swarm_seed_replays_to_the_same_trace_bytes_in_another_process() {
    assert_same_bytes("swarm-space", swarm_space());
}

#[test]
fn different_swarm_seeds_write_different_traces() {
    assert_seeds_differ("swarm-space", swarm_space());
}

#[test]
fn a_chat_crash_seed_replays_to_the_same_trace_bytes_in_another_process() {
    assert_same_bytes("chat-crash", chat_crash());
}

#[test]
fn different_chat_crash_seeds_write_different_traces() {
    assert_seeds_differ("chat-crash", chat_crash());
}

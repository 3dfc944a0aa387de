//! The `chatsim play --html` page renders in a real browser: headless Chromium loads it,
//! its script runs (the step counter and `#step=N` work), the swimlanes and hop labels are
//! in the rendered DOM, and the screenshots are not blank and change as the page steps.
//!
//! Needs Chromium (`/usr/bin/chromium`, or `$CHROMIUM`); `.ci/run` installs it. Without
//! it the test fails under CI (`CI` set) and is skipped with a notice elsewhere.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|name| {
            std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
                .unwrap_or_default()
                .into_iter()
                .map(move |dir| dir.join(name))
        })
        .find(|p| p.is_file())
}

/// Runs a command, killing it if it takes longer than `limit`.
fn run_bounded(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "{cmd:?} took longer than {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Headless Chromium with the flags this sandbox needs (root, no GPU, closed network).
fn headless(bin: &Path, profile: &Path) -> Command {
    let mut c = Command::new(bin);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--window-size=1400,1000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    c
}

/// Share of pixels that are not (near) white.
fn inked_share(png_path: &Path) -> f64 {
    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(png_path).expect("screenshot exists"),
    ));
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("a frame");
    let channels = info.color_type.samples();
    let px = &buf[..info.buffer_size()];
    let total = px.len() / channels;
    let inked = px
        .chunks(channels)
        .filter(|p| p.iter().take(3).any(|&c| c < 200))
        .count();
    inked as f64 / total as f64
}

#[test]
fn play_html_page_renders_in_headless_chromium_and_steps() {
    let Some(bin) = chromium() else {
        assert!(
            std::env::var_os("CI").is_none(),
            "Chromium is required under CI (apt-get install chromium)"
        );
        eprintln!("SKIPPED: no chromium on PATH (set CHROMIUM=/path/to/chrome to run this test)");
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let page = dir.path().join("one-send.html");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = run_bounded(
        {
            let mut c = Command::new(env!("CARGO_BIN_EXE_chatsim"));
            c.arg("play")
                .arg(root.join("scenarios/stories/one-send.toml"))
                .arg("--html")
                .arg(&page);
            c
        },
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "chatsim play failed: {out:?}");
    let url = format!("file://{}", page.display());

    // The DOM after the script ran, opened at hop 5.
    let mut c = headless(&bin, &dir.path().join("profile-dom"));
    c.arg("--dump-dom").arg(format!("{url}#step=5"));
    let out = run_bounded(c, Duration::from_secs(90));
    assert!(out.status.success(), "chromium --dump-dom failed: {out:?}");
    let dom = String::from_utf8_lossy(&out.stdout);
    let hops = dom.matches("<li data-i=").count();
    assert!(hops >= 10, "expected the hop list, got {hops} items");
    assert!(
        dom.contains(&format!("5 / {hops}")),
        "the script should show hop 5 of {hops}"
    );
    assert_eq!(
        dom.matches("class=\"step on now\"").count(),
        1,
        "exactly one hop is the current one"
    );
    assert_eq!(
        dom.matches("class=\"step on\"").count(),
        4,
        "hops 1-4 shown"
    );
    for label in [
        ">u0/d0<",
        ">u1/d0<",
        ">gw-eu-0<",
        ">chat<",
        ">push<",
        "✓ sent",
        "✓✓ delivered",
        "blue ticks",
        "ack only after the inbox write",
    ] {
        assert!(dom.contains(label), "rendered page lacks {label:?}");
    }

    // Screenshots at the first hop and with every hop shown: not blank, and different.
    let mut shots = Vec::new();
    for (name, hash) in [("first", "#step=1"), ("all", "#step=9999")] {
        let shot = dir.path().join(format!("{name}.png"));
        let mut c = headless(&bin, &dir.path().join(format!("profile-{name}")));
        c.arg(format!("--screenshot={}", shot.display()))
            .arg(format!("{url}{hash}"));
        let out = run_bounded(c, Duration::from_secs(90));
        assert!(
            out.status.success(),
            "chromium --screenshot failed: {out:?}"
        );
        let ink = inked_share(&shot);
        assert!(
            ink > 0.01,
            "{name} screenshot is nearly blank ({ink:.4} inked)"
        );
        shots.push((ink, std::fs::read(&shot).expect("read shot")));
    }
    assert_ne!(
        shots[0].1, shots[1].1,
        "stepping to the end changes the picture"
    );
    assert!(
        shots[1].0 > shots[0].0,
        "with every hop shown more is drawn in full ink ({:.4} vs {:.4})",
        shots[1].0,
        shots[0].0
    );
}

//! The `chatsim play --html` page renders in a real browser: headless Chromium loads it,
//! its script runs (the step counter and `#step=N` work), the swimlanes and hop labels are
//! in the rendered DOM, and the screenshots are not blank and change as the page steps.
//!
//! Needs Chromium (`/usr/bin/chromium`, or `$CHROMIUM`); `.ci/run` installs it. Without
//! it the test fails under CI (`CI` set) and is skipped with a notice elsewhere.

mod common;

use common::browser::{chromium_or_skip, headless, inked_share, run_bounded};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

#[test]
fn play_html_page_renders_in_headless_chromium_and_steps() {
    let Some(bin) = chromium_or_skip() else {
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

//! report.html of a load run and of a merged run, and sweep.html, render in a real browser: headless
//! Chromium draws them (screenshots not blank) and the rendered DOM has the charts' titles,
//! axes and labels: latency with the unmeasured phases shaded, ack latency, errors, the
//! server's CPU, memory and queues every second, and the percentile distribution.
//!
//! Needs Chromium (`/usr/bin/chromium`, or `$CHROMIUM`); `.ci/run` installs it. Without
//! it the test fails under CI (`CI` set) and is skipped with a notice elsewhere.

mod common;

use common::browser::{chromium_or_skip, headless, inked_share, run_bounded};
use common::ServerProc;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn rendered(bin: &Path, page: &Path, tmp: &Path, name: &str) -> (String, f64) {
    let url = format!("file://{}", page.display());
    let mut c = headless(bin, &tmp.join(format!("profile-dom-{name}")));
    c.arg("--dump-dom").arg(&url);
    let out = run_bounded(c, Duration::from_secs(90));
    assert!(out.status.success(), "chromium --dump-dom failed: {out:?}");
    let shot = tmp.join(format!("{name}.png"));
    let mut c = headless(bin, &tmp.join(format!("profile-shot-{name}")));
    c.arg(format!("--screenshot={}", shot.display())).arg(&url);
    let out2 = run_bounded(c, Duration::from_secs(90));
    assert!(
        out2.status.success(),
        "chromium --screenshot failed: {out2:?}"
    );
    (
        String::from_utf8_lossy(&out.stdout).to_string(),
        inked_share(&shot),
    )
}

#[test]
fn load_reports_render_in_headless_chromium_with_every_chart() {
    let Some(bin) = chromium_or_skip() else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let srv = ServerProc::start(&dir.path().join("data"), &["--memory"]);
    let run = dir.path().join("run");
    let out = Command::new(env!("CARGO_BIN_EXE_chatsim"))
        .args(["load", "--target", &format!("ws://{}", srv.addr)])
        .arg("--secret-file")
        .arg(srv.data_dir.join("secret"))
        .args([
            "--users",
            "40",
            "--rate",
            "5",
            "--ramp",
            "1",
            "--duration",
            "3",
        ])
        .args(["--fail-if", "p99_deliver_ms>10000", "--out"])
        .arg(&run)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run chatsim load");
    assert!(out.status.success(), "{out:?}");
    let sweep = dir.path().join("sweep");
    let out = Command::new(env!("CARGO_BIN_EXE_chatsim"))
        .args(["load", "--target", &format!("ws://{}", srv.addr)])
        .arg("--secret-file")
        .arg(srv.data_dir.join("secret"))
        .args(["--users", "10", "--ramp", "1", "--duration", "2"])
        .args(["--sweep", "rate=20,40", "--out"])
        .arg(&sweep)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run chatsim load --sweep");
    assert!(out.status.success(), "{out:?}");
    srv.stop();
    let (dom, ink) = rendered(&bin, &sweep.join("sweep.html"), dir.path(), "sweep");
    for label in [
        "Send→deliver latency against delivered rate",
        "delivered msgs/s",
        "knee:",
        "class=\"knee\"",
    ] {
        assert!(dom.contains(label), "rendered sweep report lacks {label:?}");
    }
    assert!(
        ink > 0.01,
        "the sweep report is nearly blank ({ink:.4} inked)"
    );
    let (dom, ink) = rendered(&bin, &run.join("report.html"), dir.path(), "run");
    for label in [
        "Send→deliver latency, by second of intended send",
        "Send→ack latency",
        "Errors per second",
        "Server CPU (/metrics every second)",
        "Server resident memory",
        "Server outbound queues",
        "Send→deliver percentile distribution",
        "seconds since the start of the run",
        "not measured",
        "99.9%",
        "% of one core",
        "--fail-if 'p99_deliver_ms&gt;10000'",
        "passes",
        "Valid run",
    ] {
        assert!(dom.contains(label), "rendered run report lacks {label:?}");
    }
    assert!(dom.matches("<svg").count() >= 9, "every chart is drawn");
    assert!(
        ink > 0.02,
        "the run report is nearly blank ({ink:.4} inked)"
    );

    // The committed 100,000-connection run, merged again from its six shards.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/reports/load-100k");
    let merged = dir.path().join("merged");
    let mut c = Command::new(env!("CARGO_BIN_EXE_chatsim"));
    c.args(["report", "merge"]);
    for i in 0..6 {
        c.arg(root.join(format!("shard-{i}")));
    }
    let out = c.arg("--out").arg(&merged).output().expect("merge");
    assert!(out.status.success(), "{out:?}");
    let (dom, ink) = rendered(&bin, &merged.join("report.html"), dir.path(), "merged");
    for label in [
        "Merged 6 concurrent runs",
        "Send→deliver latency, by second of intended send",
        "Throughput",
        "Send→deliver percentile distribution",
        "98000 idle devices",
    ] {
        assert!(
            dom.contains(label),
            "rendered merged report lacks {label:?}"
        );
    }
    assert!(
        ink > 0.02,
        "the merged report is nearly blank ({ink:.4} inked)"
    );
}

//! End-to-end: `chatsim serve` on loopback, a short `chatsim load` with a few hundred
//! connections, then the report files are checked for consistency; two runs merge exactly.

mod common;

use common::ServerProc;
use std::process::Command;

fn load(
    srv: &ServerProc,
    out: &std::path::Path,
    users: &str,
    extra: &[&str],
) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_chatsim"))
        .args([
            "load",
            "--target",
            &format!("ws://{}", srv.addr),
            "--secret-file",
        ])
        .arg(srv.data_dir.join("secret"))
        .args([
            "--users",
            users,
            "--rate",
            "2",
            "--ramp",
            "2",
            "--duration",
            "3",
            "--out",
        ])
        .arg(out)
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run chatsim load")
}

fn summary(dir: &std::path::Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("summary.json")).expect("summary.json"))
        .expect("json")
}

#[test]
fn short_load_writes_consistent_reports_and_runs_merge_exactly() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = ServerProc::start(&dir.path().join("data"), &["--memory"]);
    let run1 = dir.path().join("run1");
    let out = load(&srv, &run1, "300", &["--fail-if", "delivered_ratio<0.999"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "timeseries.csv",
        "latency.csv",
        "deliver.hlog",
        "report.html",
        "summary.json",
        "goose.html",
    ] {
        assert!(run1.join(f).exists(), "{f} written");
    }
    let s = summary(&run1);
    assert_eq!(
        s["valid"], true,
        "a clean run is valid: {}",
        s["invalid_reason"]
    );
    let sent = s["sent"].as_u64().expect("sent");
    let delivered = s["delivered"].as_u64().expect("delivered");
    assert!(sent > 0, "something was sent");
    assert!(delivered <= s["expected_deliveries"].as_u64().expect("expected"));
    assert_eq!(delivered, sent, "every sent message accounted for");
    assert_eq!(s["acked"].as_u64(), Some(sent));
    let d = &s["deliver_us"];
    let p = |k: &str| d[k].as_u64().expect("percentile");
    assert!(
        p("p50") <= p("p90")
            && p("p90") <= p("p99")
            && p("p99") <= p("p999")
            && p("p999") <= p("max")
    );
    assert_eq!(p("count"), delivered);
    // timeseries rows add up to the summary over the measured seconds.
    let from = s["measured_from_s"].as_u64().expect("from");
    let ts = std::fs::read_to_string(run1.join("timeseries.csv")).expect("csv");
    let rows: Vec<Vec<u64>> = ts
        .lines()
        .skip(1)
        .map(|l| {
            l.split(',')
                .take(5)
                .map(|x| x.parse().expect("int"))
                .collect()
        })
        .collect();
    let measured_sent: u64 = rows
        .iter()
        .filter(|r| (from..from + 3).contains(&r[0]))
        .map(|r| r[2])
        .sum();
    assert_eq!(measured_sent, sent);
    let html = std::fs::read_to_string(run1.join("report.html")).expect("html");
    assert!(html.contains("<svg") && html.contains("Send→deliver latency per second"));

    // A second generator process; the merge adds the HDR logs, not percentiles.
    let run2 = dir.path().join("run2");
    let out = load(&srv, &run2, "100", &[]);
    assert!(out.status.success());
    let merged = dir.path().join("merged");
    let m = Command::new(env!("CARGO_BIN_EXE_chatsim"))
        .args(["report", "merge"])
        .arg(&run1)
        .arg(&run2)
        .arg("--out")
        .arg(&merged)
        .output()
        .expect("merge");
    assert!(m.status.success(), "{}", String::from_utf8_lossy(&m.stderr));
    let ms = summary(&merged);
    let s2 = summary(&run2);
    assert_eq!(
        ms["sent"].as_u64(),
        Some(sent + s2["sent"].as_u64().expect("sent"))
    );
    assert_eq!(
        ms["deliver_us"]["count"].as_u64(),
        Some(p("count") + s2["deliver_us"]["count"].as_u64().expect("count"))
    );
    assert!(ms["deliver_us"]["max"].as_u64() >= Some(p("max")));

    // A reconnect storm: 30% of the sockets drop at once; every message still arrives
    // (the backlog waits in the inbox and is synced), and the drain time is reported.
    let storm = dir.path().join("storm");
    let out = load(
        &srv,
        &storm,
        "60",
        &[
            "--storm-at",
            "3",
            "--storm-fraction",
            "0.3",
            "--typing",
            "1",
        ],
    );
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let st = summary(&storm);
    assert_eq!(st["delivered"], st["sent"], "nothing lost in the storm");
    assert!(st["storm_catch_up_us"]["count"].as_u64().expect("count") > 0);
    assert!(String::from_utf8_lossy(&out.stdout).contains("reconnect storm:"));

    // --fail-if sets the exit code.
    let out = load(
        &srv,
        &dir.path().join("run3"),
        "20",
        &["--fail-if", "p50_deliver_ms>=0"],
    );
    assert_eq!(out.status.code(), Some(1));

    // A secret that is not the server's: the first token is refused and no run starts
    // (it used to run with every connection refused and call the run valid).
    let wrong = dir.path().join("other-secret");
    std::fs::write(&wrong, "00".repeat(32)).expect("write a wrong secret");
    let run4 = dir.path().join("run4");
    let out = Command::new(env!("CARGO_BIN_EXE_chatsim"))
        .args(["load", "--target", &format!("ws://{}", srv.addr)])
        .arg("--secret-file")
        .arg(&wrong)
        .args(["--users", "4", "--ramp", "1", "--duration", "1", "--out"])
        .arg(&run4)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run chatsim load");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("refused the first connection"), "{err}");
    assert!(
        !run4.join("summary.json").exists(),
        "no report for a run never started"
    );

    // A missing secret file is an error naming it, never a fresh secret.
    let missing = dir.path().join("no-such-dir/secret");
    let out = Command::new(env!("CARGO_BIN_EXE_chatsim"))
        .args(["load", "--target", &format!("ws://{}", srv.addr)])
        .arg("--secret-file")
        .arg(&missing)
        .output()
        .expect("run chatsim load");
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("reading secret file"));
    assert!(!missing.exists(), "no secret was created");
    srv.stop();
}

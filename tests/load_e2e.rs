//! End-to-end: `chatsim serve` on loopback, a short `chatsim load` with a few hundred
//! connections, then the report files are checked for consistency; concurrent runs merge
//! exactly, sequential and duplicate ones are refused; a reused server gives no memory
//! figure; a server that goes away makes the run INVALID with its close code.

mod common;

use common::ServerProc;
use std::process::Command;

fn load(
    srv: &ServerProc,
    out: &std::path::Path,
    users: &str,
    extra: &[&str],
) -> std::process::Output {
    load_cmd(srv, out, users, extra)
        .output()
        .expect("run chatsim load")
}

fn load_cmd(srv: &ServerProc, out: &std::path::Path, users: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_chatsim"));
    c.args([
        "load",
        "--target",
        &format!("ws://{}", srv.addr),
        "--secret-file",
    ])
    .arg(srv.data_dir.join("secret"))
    .args(["--users", users, "--rate", "2", "--ramp", "2", "--out"])
    .arg(out)
    .args(extra)
    .env("RUST_LOG", "warn");
    if !extra.contains(&"--duration") {
        c.args(["--duration", "3"]);
    }
    c
}

fn chatsim(args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_chatsim"))
        .args(args)
        .output()
        .expect("run chatsim")
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
        "histograms.hlog",
        "goose.md",
    ] {
        assert!(run1.join(f).exists(), "{f} written");
    }
    // Goose's HTML report loads its charts from the internet; it is not written.
    assert!(!run1.join("goose.html").exists());
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
    // Every delivery is also split in two hops at the server's commit stamp.
    assert_eq!(s["commit_to_receive_us"]["count"].as_u64(), Some(delivered));
    assert_eq!(s["send_to_commit_us"]["count"].as_u64(), Some(delivered));
    // A fresh server: memory per connection from the idle phase, baseline before any client.
    let server = &s["server"];
    let kib = server["kib_per_connection"]
        .as_f64()
        .expect("memory figure");
    assert!(kib > 0.0, "{server}");
    assert!(server["baseline_kib"].as_u64() < server["idle_kib"].as_u64());
    assert_eq!(server["idle_connections"].as_u64(), Some(300));
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
    assert!(html.contains("<svg") && html.contains("Send→deliver latency, by second"));

    // Two generator processes at once; the merge adds the HDR logs, not percentiles, and
    // its rate is over the seconds both were measuring in.
    let (run2, run2b) = (dir.path().join("run2"), dir.path().join("run2b"));
    let mut other = load_cmd(&srv, &run2b, "60", &["--duration", "6"])
        .spawn()
        .expect("spawn");
    let out = load(&srv, &run2, "100", &["--duration", "6"]);
    assert!(other.wait().expect("wait").success());
    assert!(out.status.success());
    // The server was reused: no memory figure, and the report says why.
    let s2 = summary(&run2);
    assert!(
        s2["server"]["kib_per_connection"].is_null(),
        "{}",
        s2["server"]
    );
    assert!(s2["server"]["memory_note"]
        .as_str()
        .expect("note")
        .contains("connections before this run"));
    let merged = dir.path().join("merged");
    let m = chatsim(&[
        "report".as_ref(),
        "merge".as_ref(),
        run2.as_os_str(),
        run2b.as_os_str(),
        "--out".as_ref(),
        merged.as_os_str(),
    ]);
    assert!(m.status.success(), "{}", String::from_utf8_lossy(&m.stderr));
    let ms = summary(&merged);
    let s2b = summary(&run2b);
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().expect(k);
    assert_eq!(ms["merge"]["kind"], "concurrent");
    assert_eq!(n(&ms, "sent"), n(&s2, "sent") + n(&s2b, "sent"));
    assert_eq!(
        n(&ms["deliver_us"], "count"),
        n(&s2["deliver_us"], "count") + n(&s2b["deliver_us"], "count")
    );
    assert_eq!(
        n(&ms["ack_us"], "count"),
        n(&s2["ack_us"], "count") + n(&s2b["ack_us"], "count"),
        "every histogram is merged, not only send→deliver"
    );
    let rate = |v: &serde_json::Value| v["sent_per_s"].as_f64().expect("rate");
    // Over the seconds both were measuring in: the two steady rates added, within 5%.
    let both = rate(&s2) + rate(&s2b);
    assert!(
        (rate(&ms) - both).abs() < 0.05 * both,
        "{} vs {} + {}",
        rate(&ms),
        rate(&s2),
        rate(&s2b)
    );
    assert!(ms["merge"]["overlap_s"].as_f64().expect("overlap") >= 3.0);
    let html = std::fs::read_to_string(merged.join("report.html")).expect("merged html");
    assert!(html.contains("<svg") && html.contains("Merged 2 concurrent runs"));

    // Runs one after another are not concurrent load: refused unless --sequential, and then
    // the rate is over the sum of the windows (it used to double).
    let seq = dir.path().join("seq");
    let m = chatsim(&[
        "report".as_ref(),
        "merge".as_ref(),
        run1.as_os_str(),
        run2.as_os_str(),
        "--out".as_ref(),
        seq.as_os_str(),
    ]);
    assert!(!m.status.success());
    assert!(String::from_utf8_lossy(&m.stderr).contains("--sequential"));
    let m = chatsim(&[
        "report".as_ref(),
        "merge".as_ref(),
        run1.as_os_str(),
        run2.as_os_str(),
        "--sequential".as_ref(),
        "--out".as_ref(),
        seq.as_os_str(),
    ]);
    assert!(m.status.success(), "{}", String::from_utf8_lossy(&m.stderr));
    let sq = summary(&seq);
    assert_eq!(sq["merge"]["kind"], "sequential");
    let rate = sq["sent_per_s"].as_f64().expect("rate");
    let want = (sent + n(&s2, "sent")) as f64 / 9.0;
    assert!((rate - want).abs() < 1e-6, "{rate} vs {want}");
    // The same run twice is refused.
    let m = chatsim(&[
        "report".as_ref(),
        "merge".as_ref(),
        run2.as_os_str(),
        run2.as_os_str(),
        "--out".as_ref(),
        seq.as_os_str(),
    ]);
    assert!(!m.status.success());
    assert!(String::from_utf8_lossy(&m.stderr).contains("same run"));
    // Side by side, with deltas against the first.
    let cmp = dir.path().join("cmp");
    let c = chatsim(&[
        "report".as_ref(),
        "compare".as_ref(),
        run1.as_os_str(),
        run2.as_os_str(),
        "--out".as_ref(),
        cmp.as_os_str(),
    ]);
    let table = String::from_utf8_lossy(&c.stdout);
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stderr));
    assert!(
        table.contains("send→deliver p99 ms") && table.contains("%)"),
        "{table}"
    );
    assert!(std::fs::read_to_string(cmp.join("compare.html"))
        .expect("compare.html")
        .contains("vs A"));

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

    // The server goes away mid-run: every socket it closes is an error counted by its close
    // code (1012, service restart), and the run is INVALID.
    let run5 = dir.path().join("run5");
    let gone = load_cmd(&srv, &run5, "20", &["--duration", "8"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(std::time::Duration::from_secs(6));
    srv.stop();
    let out = gone.wait_with_output().expect("wait");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("INVALID") && text.contains("close 1012 20"),
        "{text}"
    );
}

#[test]
fn sharded_load_over_two_servers_with_an_idle_fleet_merges_its_shards() {
    // Two servers sharing one secret; three generator processes (shard i loads server
    // i mod 2 from 127.0.0.(2+i)); 600 idle devices besides 60 senders.
    let dir = tempfile::tempdir().expect("tmp");
    let secret = dir.path().join("secret");
    let s = secret.to_str().expect("utf-8 path");
    let a = ServerProc::start(&dir.path().join("a"), &["--memory", "--secret-file", s]);
    let b = ServerProc::start(&dir.path().join("b"), &["--memory", "--secret-file", s]);
    let out = dir.path().join("run");
    let r = Command::new(env!("CARGO_BIN_EXE_chatsim"))
        .args(["load", "--target", &format!("ws://{}", a.addr)])
        .args(["--target", &format!("ws://{}", b.addr)])
        .arg("--secret-file")
        .arg(&secret)
        .args(["--processes", "3", "--users", "60", "--idle-devices", "600"])
        .args(["--rate", "2", "--ramp", "2", "--duration", "4", "--out"])
        .arg(&out)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run chatsim load");
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let m = summary(&out);
    assert_eq!(m["valid"], true, "{}", m["invalid_reason"]);
    assert_eq!(m["merge"]["kind"], "concurrent");
    assert_eq!(m["users"].as_u64(), Some(60));
    assert_eq!(m["idle_devices"].as_u64(), Some(600));
    assert_eq!(m["generator"]["idle_devices_connected"].as_u64(), Some(600));
    let kib = m["generator"]["kib_per_idle_device"]
        .as_f64()
        .expect("generator memory per idle device");
    assert!(kib > 0.0 && kib < 64.0, "{kib} KiB per idle device");
    let mut sent = 0;
    for i in 0..3 {
        let s = summary(&out.join(format!("shard-{i}")));
        assert!(s["run_id"]
            .as_str()
            .expect("id")
            .ends_with(&format!("-s{i}")));
        sent += s["sent"].as_u64().expect("sent");
    }
    assert_eq!(m["sent"].as_u64(), Some(sent));
    assert_eq!(
        m["delivered"].as_u64(),
        Some(sent),
        "every message delivered"
    );
    assert!(text.contains("3 generator processes, merged"), "{text}");
    a.stop();
    b.stop();
}

#[test]
fn a_rate_sweep_writes_one_curve_with_its_knee() {
    let dir = tempfile::tempdir().expect("tmp");
    let srv = ServerProc::start(&dir.path().join("data"), &["--memory"]);
    let out = dir.path().join("sweep");
    let r = load_cmd(
        &srv,
        &out,
        "20",
        &["--sweep", "rate=20,40", "--duration", "2"],
    )
    .output()
    .expect("run chatsim load --sweep");
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&r.stderr)
    );
    let s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("sweep.json")).expect("sweep.json"))
            .expect("json");
    let points = s["points"].as_array().expect("points");
    assert_eq!(points.len(), 2);
    // 20 and 40 msgs/s offered in total over 20 senders.
    for (p, want) in points.iter().zip([20.0, 40.0]) {
        let offered = p["offered_per_s"].as_f64().expect("offered");
        assert!((offered - want).abs() < 1.0, "{offered} vs {want}");
        assert!(out
            .join(p["run_dir"].as_str().expect("dir"))
            .join("report.html")
            .exists());
    }
    assert!(s["knee"].as_u64().is_some(), "{s}");
    let html = std::fs::read_to_string(out.join("sweep.html")).expect("sweep.html");
    assert!(html.contains("knee:") && html.contains("<svg"));
    assert!(text.contains("<- knee"), "{text}");
    srv.stop();
}

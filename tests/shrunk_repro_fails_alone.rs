//! A failing swarm seed's shrunk repro is a plain scenario that fails on its own: every
//! knob the seed drew is written out, and a planted bug given with `--bug` is in its
//! `design_flaws` (it used to be only in a comment, so the repro passed when run alone).

use std::process::Command;

fn chatsim(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_chatsim"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run chatsim");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn a_shrunk_swarm_repro_with_a_planted_bug_fails_when_run_alone() {
    let dir = std::env::temp_dir().join(format!("chatsim-shrunk-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let reports = dir.to_string_lossy().into_owned();
    let (code, out) = chatsim(&[
        "run",
        "scenarios/swarm-space.toml",
        "--seed",
        // The first seed of swarm-space that catches this bug (see the README's figures).
        "2",
        "--bug",
        "early-delivery-receipt",
        "--shrink-budget",
        "12",
        "--reports",
        &reports,
    ]);
    assert_eq!(code, 1, "the bug is caught: {out}");
    let file = dir.join("shrunk-swarm-space-seed2.toml");
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert!(
        text.contains("design_flaws = [\"early-delivery-receipt\"]"),
        "{text}"
    );
    assert!(!text.contains("[swarm.space]"), "knobs written out: {text}");
    assert!(
        text.contains("[server]") && text.contains("[client]"),
        "{text}"
    );
    let (code, out) = chatsim(&[
        "run",
        &file.to_string_lossy(),
        "--no-shrink",
        "--reports",
        &reports,
    ]);
    assert_eq!(code, 1, "the repro fails alone: {out}");
    assert!(out.contains("false_receipt"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

//! The README's report-driven capacity estimate is what `chatsim capacity` prints for the
//! load report committed next to it (docs/reports/bench-load-4000), line for line.

use std::path::Path;
use std::process::Command;

#[test]
fn readme_capacity_estimate_is_the_output_for_the_committed_report() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(env!("CARGO_BIN_EXE_chatsim"))
        .current_dir(root)
        .args([
            "capacity",
            "--from-report",
            "docs/reports/bench-load-4000",
            "--format",
            "markdown",
        ])
        .output()
        .expect("run chatsim capacity");
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8(out.stdout).expect("utf-8");
    assert!(table.contains("bandwidth binds first"), "{table}");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README");
    assert!(
        readme.contains(&table),
        "README's capacity table is not the command's output; regenerate it:\n{table}"
    );
}

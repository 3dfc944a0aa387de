//! The README's report-driven capacity estimate is what `chatsim capacity` prints for the
//! load report committed next to it (docs/reports/bench-load-4000), line for line.

use std::path::Path;
use std::process::Command;

/// `chatsim capacity --from-report docs/reports/bench-load-4000 --format FORMAT`, stdout.
fn capacity_from_committed_report(format: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_chatsim"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "capacity",
            "--from-report",
            "docs/reports/bench-load-4000",
            "--format",
            format,
        ])
        .output()
        .expect("run chatsim capacity");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn readme_capacity_estimate_is_the_output_for_the_committed_report() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let table = capacity_from_committed_report("markdown");
    assert!(table.contains("bandwidth binds first"), "{table}");
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README");
    assert!(
        readme.contains(&table),
        "README's capacity table is not the command's output; regenerate it:\n{table}"
    );
}

#[test]
fn capacity_csv_has_one_raw_number_per_row_for_a_spreadsheet() {
    let text = capacity_from_committed_report("csv");
    let mut r = csv::Reader::from_reader(text.as_bytes());
    let rows: Vec<(String, String)> = r
        .records()
        .map(|rec| {
            let rec = rec.expect("csv row");
            (rec[0].to_string(), rec[1].to_string())
        })
        .collect();
    let num = |k: &str| -> f64 {
        rows.iter()
            .find(|(f, _)| f == k)
            .unwrap_or_else(|| panic!("no row {k}"))
            .1
            .parse()
            .unwrap_or_else(|e| panic!("{k} is not a number: {e}"))
    };
    assert!((num("estimate.avg_msgs_per_s") - 115_740.74).abs() < 0.01);
    assert_eq!(num("estimate.bandwidth_bytes_per_s"), 500e9);
    assert_eq!(num("plan.nodes"), num("plan.nodes_by_bandwidth"));
    assert!(rows
        .iter()
        .any(|(f, v)| f == "plan.binding" && v == "bandwidth"));
}

//! `chatsim report compare A B [...]`: the figures of several runs side by side, each with
//! its change against the first, as a terminal table and `compare.html`. Invalid runs are
//! shown and marked, never silently compared as if their figures were the server's.

use crate::report::Summary;
use std::fmt::Write as _;
use std::path::Path;

/// One compared figure: its name, and whether a lower value is the better one.
struct Figure {
    name: &'static str,
    lower_is_better: Option<bool>,
    get: fn(&Summary) -> Option<f64>,
    decimals: usize,
}

fn ms(us: u64) -> Option<f64> {
    Some(us as f64 / 1000.0)
}

const FIGURES: &[Figure] = &[
    Figure {
        name: "users",
        lower_is_better: None,
        get: |s| Some(s.users as f64),
        decimals: 0,
    },
    Figure {
        name: "sent msgs/s",
        lower_is_better: None,
        get: |s| Some(s.sent_per_s),
        decimals: 1,
    },
    Figure {
        name: "delivered msgs/s",
        lower_is_better: Some(false),
        get: |s| Some(s.delivered_per_s),
        decimals: 1,
    },
    Figure {
        name: "delivered / expected",
        lower_is_better: Some(false),
        get: |s| Some(s.delivered as f64 / s.expected_deliveries.max(1) as f64),
        decimals: 4,
    },
    Figure {
        name: "send→deliver p50 ms",
        lower_is_better: Some(true),
        get: |s| ms(s.deliver_us.p50),
        decimals: 2,
    },
    Figure {
        name: "send→deliver p99 ms",
        lower_is_better: Some(true),
        get: |s| ms(s.deliver_us.p99),
        decimals: 2,
    },
    Figure {
        name: "send→deliver p99.9 ms",
        lower_is_better: Some(true),
        get: |s| ms(s.deliver_us.p999),
        decimals: 2,
    },
    Figure {
        name: "send→deliver max ms",
        lower_is_better: Some(true),
        get: |s| ms(s.deliver_us.max),
        decimals: 2,
    },
    Figure {
        name: "send→ack p99 ms",
        lower_is_better: Some(true),
        get: |s| ms(s.ack_us.p99),
        decimals: 2,
    },
    Figure {
        name: "errors",
        lower_is_better: Some(true),
        get: |s| Some(s.errors as f64),
        decimals: 0,
    },
    Figure {
        name: "schedule slip p99 ms",
        lower_is_better: Some(true),
        get: |s| ms(s.schedule_slip_us.p99),
        decimals: 2,
    },
    Figure {
        name: "server KiB/connection",
        lower_is_better: Some(true),
        get: |s| s.server.as_ref().and_then(|f| f.kib_per_connection),
        decimals: 1,
    },
    Figure {
        name: "server CPU µs/msg",
        lower_is_better: Some(true),
        get: |s| {
            s.server
                .as_ref()
                .map(|f| f.cpu_us_per_delivered)
                .filter(|c| *c > 0.0)
        },
        decimals: 1,
    },
];

/// The comparison: the terminal table, and the runs it read.
pub struct Comparison {
    pub table: String,
    pub runs: Vec<Summary>,
}

/// Change of `b` against `a`, as text: `+12.5%`, or `-` when it has no meaning.
fn delta(a: Option<f64>, b: Option<f64>) -> (String, Option<f64>) {
    match (a, b) {
        (Some(a), Some(b)) if a != 0.0 => {
            let d = (b - a) / a * 100.0;
            (format!("{d:+.1}%"), Some(d))
        }
        (Some(a), Some(b)) if a == b => ("+0.0%".into(), Some(0.0)),
        _ => ("-".into(), None),
    }
}

fn value(f: &Figure, s: &Summary) -> String {
    (f.get)(s).map_or("-".into(), |v| format!("{v:.*}", f.decimals))
}

/// Reads each run's summary.json and writes `out/compare.html`.
pub fn compare(runs: &[&Path], out: &Path) -> anyhow::Result<Comparison> {
    anyhow::ensure!(runs.len() >= 2, "name at least two runs to compare");
    let mut sums = Vec::new();
    for r in runs {
        let p = r.join("summary.json");
        let raw = std::fs::read(&p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
        let s: Summary = serde_json::from_slice(&raw)
            .map_err(|e| anyhow::anyhow!("{}: not a load summary: {e}", p.display()))?;
        sums.push(s);
    }
    let base = &sums[0];
    // Terminal table.
    let mut head = vec!["figure".to_string()];
    for (i, (s, dir)) in sums.iter().zip(runs).enumerate() {
        head.push(format!(
            "{} {}",
            if i == 0 { "A" } else { "vs A" },
            dir.file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_else(|| s.run_id.clone())
        ));
    }
    let mut rows: Vec<Vec<String>> = vec![head];
    let mut verdict = vec!["verdict".to_string()];
    for s in &sums {
        verdict.push(if s.valid { "valid" } else { "INVALID" }.into());
    }
    rows.push(verdict);
    for f in FIGURES {
        let mut row = vec![f.name.to_string()];
        for (i, s) in sums.iter().enumerate() {
            let v = value(f, s);
            if i == 0 {
                row.push(v);
            } else {
                let (d, _) = delta((f.get)(base), (f.get)(s));
                row.push(format!("{v} ({d})"));
            }
        }
        rows.push(row);
    }
    let cols = rows[0].len();
    let width: Vec<usize> = (0..cols)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut table = String::new();
    for r in &rows {
        for (c, cell) in r.iter().enumerate() {
            let pad = width[c] - cell.chars().count();
            if c == 0 {
                let _ = write!(table, "{cell}{}", " ".repeat(pad));
            } else {
                let _ = write!(table, "  {}{cell}", " ".repeat(pad));
            }
        }
        table.push('\n');
    }
    for s in sums.iter().filter(|s| !s.valid) {
        let _ = writeln!(
            table,
            "INVALID {}: {}",
            s.run_id,
            s.invalid_reason.as_deref().unwrap_or("")
        );
    }
    // compare.html
    let mut html = String::from(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>chatsim load comparison</title>\
<style>body{font-family:sans-serif;max-width:980px;margin:2em auto;color:#222}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}.better{color:#060}.worse{color:#b00}.bad{color:#b00;font-weight:bold}</style></head><body>\
<h1>chatsim load comparison</h1><p>Each run against the first (A); changes are relative to A. Green is better, red worse.</p><table><tr><th>figure</th>",
    );
    for (i, (s, dir)) in sums.iter().zip(runs).enumerate() {
        let _ = write!(
            html,
            "<th>{}<br><code>{}</code><br>{}</th>",
            if i == 0 { "A" } else { "vs A" },
            dir.display(),
            s.run_id
        );
    }
    html.push_str("</tr><tr><td>verdict</td>");
    for s in &sums {
        if s.valid {
            html.push_str("<td>valid</td>");
        } else {
            let _ = write!(
                html,
                "<td class=\"bad\" title=\"{}\">INVALID</td>",
                s.invalid_reason.as_deref().unwrap_or("").replace('"', "'")
            );
        }
    }
    html.push_str("</tr>");
    for f in FIGURES {
        let _ = write!(html, "<tr><td>{}</td>", f.name);
        for (i, s) in sums.iter().enumerate() {
            let v = value(f, s);
            if i == 0 {
                let _ = write!(html, "<td>{v}</td>");
                continue;
            }
            let (d, n) = delta((f.get)(base), (f.get)(s));
            let class = match (f.lower_is_better, n) {
                (Some(low), Some(n)) if n.abs() >= 0.05 => {
                    if (n < 0.0) == low {
                        "better"
                    } else {
                        "worse"
                    }
                }
                _ => "",
            };
            let _ = write!(html, "<td>{v} <span class=\"{class}\">({d})</span></td>");
        }
        html.push_str("</tr>");
    }
    html.push_str("</table>");
    for s in sums.iter().filter(|s| !s.valid) {
        let _ = write!(
            html,
            "<p class=\"bad\">INVALID {}: {}</p>",
            s.run_id,
            s.invalid_reason.as_deref().unwrap_or("")
        );
    }
    html.push_str("</body></html>");
    std::fs::create_dir_all(out).map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
    std::fs::write(out.join("compare.html"), html)?;
    Ok(Comparison { table, runs: sums })
}

#[cfg(test)]
mod tests {
    use super::delta;

    #[test]
    fn deltas_are_relative_to_the_baseline_and_blank_without_one() {
        assert_eq!(delta(Some(10.0), Some(12.5)).0, "+25.0%");
        assert_eq!(delta(Some(10.0), Some(5.0)).0, "-50.0%");
        assert_eq!(delta(Some(0.0), Some(0.0)).0, "+0.0%");
        assert_eq!(delta(Some(0.0), Some(3.0)).0, "-");
        assert_eq!(delta(None, Some(3.0)).0, "-");
    }
}

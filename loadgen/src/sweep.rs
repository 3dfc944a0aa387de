//! `chatsim load --sweep rate=500..16000`: one run per point of a swept setting, and one
//! report of them all: the latency-throughput curve (p50/p99/p99.9 against delivered
//! rate) with its knee marked, as `sweep.csv`, `sweep.json` and `sweep.html`.

use crate::report::Summary;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// What a sweep varies.
#[derive(Clone, Debug, PartialEq)]
pub enum Knob {
    /// Total offered messages per second (spread over the senders).
    Rate,
    /// Group size (0 or 1: 1:1 pairs).
    GroupSize,
}

/// A parsed `--sweep` value: the knob and its points in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Sweep {
    pub knob: Knob,
    pub points: Vec<f64>,
}

/// Most points a sweep may have (each is a whole run).
pub const MAX_POINTS: usize = 16;

impl Sweep {
    /// Parses `rate=500..16000` (doubling from 500 up to 16000), `rate=500,2000,8000`, or
    /// `group-size=0,4,16`.
    pub fn parse(s: &str) -> Result<Sweep, String> {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| format!("--sweep {s:?}: expected KNOB=A..B or KNOB=A,B,C"))?;
        let knob = match k.trim() {
            "rate" => Knob::Rate,
            "group-size" | "group_size" => Knob::GroupSize,
            other => {
                return Err(format!(
                    "--sweep: unknown knob {other:?} (rate or group-size; devices per user is \
                     not a load-generator setting yet)"
                ))
            }
        };
        let num = |x: &str| -> Result<f64, String> {
            x.trim()
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| format!("--sweep {s:?}: {x:?} is not a number >= 0"))
        };
        let points = if let Some((a, b)) = v.split_once("..") {
            let (a, b) = (num(a)?, num(b)?);
            if a <= 0.0 || b < a {
                return Err(format!("--sweep {s:?}: a range needs 0 < A <= B"));
            }
            let mut p = vec![a];
            while *p.last().unwrap_or(&b) * 2.0 <= b && p.len() < MAX_POINTS {
                p.push(p[p.len() - 1] * 2.0);
            }
            if *p.last().unwrap_or(&b) < b && p.len() < MAX_POINTS {
                p.push(b);
            }
            p
        } else {
            v.split(',').map(num).collect::<Result<Vec<_>, _>>()?
        };
        if points.is_empty() || points.len() > MAX_POINTS {
            return Err(format!(
                "--sweep {s:?}: between 1 and {MAX_POINTS} points, not {}",
                points.len()
            ));
        }
        if knob == Knob::GroupSize && points.iter().any(|g| g.fract() != 0.0) {
            return Err(format!("--sweep {s:?}: group sizes are whole numbers"));
        }
        if knob == Knob::Rate && points.contains(&0.0) {
            return Err(format!("--sweep {s:?}: a rate of 0 sends nothing"));
        }
        Ok(Sweep { knob, points })
    }

    /// The knob's name as the CLI spells it.
    pub fn name(&self) -> &'static str {
        match self.knob {
            Knob::Rate => "rate",
            Knob::GroupSize => "group-size",
        }
    }
}

/// One point of a sweep: its setting and its run's figures.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Point {
    pub setting: f64,
    pub run_dir: String,
    pub offered_per_s: f64,
    pub delivered_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub valid: bool,
    pub invalid_reason: Option<String>,
}

impl Point {
    /// The point of `s`, a run at `setting` written to `run_dir`.
    pub fn of(setting: f64, run_dir: &str, s: &Summary) -> Point {
        Point {
            setting,
            run_dir: run_dir.to_string(),
            offered_per_s: s.sent_per_s,
            delivered_per_s: s.delivered_per_s,
            p50_ms: s.deliver_us.p50 as f64 / 1000.0,
            p99_ms: s.deliver_us.p99 as f64 / 1000.0,
            p999_ms: s.deliver_us.p999 as f64 / 1000.0,
            valid: s.valid,
            invalid_reason: s.invalid_reason.clone(),
        }
    }
}

/// p99 must rise by at least this much, besides doubling, to end the flat part of the
/// curve: on loopback a p99 of 3 ms going to 6 ms is noise, not a limit.
pub const KNEE_MIN_RISE_MS: f64 = 10.0;

/// The knee: the last valid point (in sweep order) before p99 first exceeds both twice the
/// p99 of the first valid point and that p99 plus [`KNEE_MIN_RISE_MS`], or before the first
/// invalid point. `None` without a valid point.
pub fn knee(points: &[Point]) -> Option<usize> {
    let first = points.iter().position(|p| p.valid)?;
    let base = points[first].p99_ms.max(0.001);
    let mut k = first;
    for (i, p) in points.iter().enumerate().skip(first + 1) {
        if !p.valid || (p.p99_ms > 2.0 * base && p.p99_ms > base + KNEE_MIN_RISE_MS) {
            break;
        }
        k = i;
    }
    Some(k)
}

/// The whole sweep, as written to sweep.json.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Report {
    pub knob: String,
    pub users: usize,
    pub points: Vec<Point>,
    pub knee: Option<usize>,
    /// Why the sweep stopped before its last point, if it did.
    pub stopped: Option<String>,
}

/// Writes sweep.csv, sweep.json and sweep.html into `dir`.
pub fn write(dir: &std::path::Path, r: &Report) -> anyhow::Result<()> {
    let mut w = csv::Writer::from_path(dir.join("sweep.csv"))?;
    w.write_record([
        r.knob.as_str(),
        "offered_per_s",
        "delivered_per_s",
        "p50_ms",
        "p99_ms",
        "p999_ms",
        "valid",
        "knee",
        "run",
    ])?;
    for (i, p) in r.points.iter().enumerate() {
        w.write_record([
            p.setting.to_string(),
            format!("{:.1}", p.offered_per_s),
            format!("{:.1}", p.delivered_per_s),
            format!("{:.3}", p.p50_ms),
            format!("{:.3}", p.p99_ms),
            format!("{:.3}", p.p999_ms),
            p.valid.to_string(),
            (r.knee == Some(i)).to_string(),
            p.run_dir.clone(),
        ])?;
    }
    w.flush()?;
    std::fs::write(dir.join("sweep.json"), serde_json::to_string_pretty(r)?)?;
    std::fs::write(dir.join("sweep.html"), html(r))?;
    Ok(())
}

/// sweep.html: the latency-throughput curve and the table of points.
pub fn html(r: &Report) -> String {
    use crate::charts::{xy_chart, XySeries};
    let pts = |f: fn(&Point) -> f64| -> Vec<(f64, f64)> {
        r.points
            .iter()
            .filter(|p| p.valid)
            .map(|p| (p.delivered_per_s, f(p)))
            .collect()
    };
    let knee = r.knee.map(|k| {
        let p = &r.points[k];
        (
            p.delivered_per_s,
            format!("knee: {:.0} msgs/s", p.delivered_per_s),
        )
    });
    let chart = xy_chart(
        "Send→deliver latency against delivered rate (valid points)",
        "delivered msgs/s",
        "ms",
        &[
            XySeries {
                name: "p50",
                colour: "#1b7837",
                points: pts(|p| p.p50_ms),
            },
            XySeries {
                name: "p99",
                colour: "#d95f02",
                points: pts(|p| p.p99_ms),
            },
            XySeries {
                name: "p99.9",
                colour: "#7570b3",
                points: pts(|p| p.p999_ms),
            },
        ],
        knee,
    );
    let mut rows = String::new();
    for (i, p) in r.points.iter().enumerate() {
        let _ = write!(
            rows,
            "<tr{}><td>{}</td><td>{:.1}</td><td>{:.1}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{}</td><td><a href=\"{}/report.html\">report</a></td></tr>",
            if r.knee == Some(i) { " class=\"knee\"" } else { "" },
            p.setting,
            p.offered_per_s,
            p.delivered_per_s,
            p.p50_ms,
            p.p99_ms,
            p.p999_ms,
            match &p.invalid_reason {
                None => "valid".to_string(),
                Some(w) => format!("<span class=\"bad\">INVALID: {}</span>", w.replace('<', "&lt;")),
            },
            p.run_dir
        );
    }
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>chatsim load sweep</title>\
<style>body{{font-family:sans-serif;max-width:800px;margin:2em auto;color:#222}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}.knee{{background:#ffe9a8}}.bad{{color:#b00}}figcaption{{font-weight:bold}}</style></head><body>\
<h1>chatsim load sweep: {knob}</h1><p>{users} senders; one run per point, each with its own report. The knee is the last valid point before p99 first exceeds both twice the first point's p99 and that p99 plus 10 ms (or before the first invalid point).{stopped}</p>\
{chart}<table><tr><th>{knob}</th><th>offered msgs/s</th><th>delivered msgs/s</th><th>p50 ms</th><th>p99 ms</th><th>p99.9 ms</th><th>verdict</th><th>run</th></tr>{rows}</table></body></html>",
        knob = r.knob,
        users = r.users,
        stopped = r
            .stopped
            .as_ref()
            .map(|s| format!(" The sweep stopped early: {s}."))
            .unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(rate: f64, p99: f64, valid: bool) -> Point {
        Point {
            setting: rate,
            run_dir: format!("point-{rate}"),
            offered_per_s: rate,
            delivered_per_s: rate,
            p50_ms: p99 / 2.0,
            p99_ms: p99,
            p999_ms: p99 * 1.5,
            valid,
            invalid_reason: (!valid).then(|| "saturated".into()),
        }
    }

    #[test]
    fn ranges_double_up_to_their_end_and_lists_are_taken_as_given() {
        let s = Sweep::parse("rate=500..16000").expect("parse");
        assert_eq!(
            s.points,
            vec![500.0, 1000.0, 2000.0, 4000.0, 8000.0, 16000.0]
        );
        let s = Sweep::parse("rate=500..3000").expect("parse");
        assert_eq!(s.points, vec![500.0, 1000.0, 2000.0, 3000.0]);
        let g = Sweep::parse("group-size=0,4,16").expect("parse");
        assert_eq!((g.knob, g.points), (Knob::GroupSize, vec![0.0, 4.0, 16.0]));
        assert!(Sweep::parse("rate=0..10").is_err());
        assert!(Sweep::parse("devices=1..4").is_err());
        assert!(Sweep::parse("group-size=2.5").is_err());
    }

    #[test]
    fn the_knee_is_the_last_point_before_p99_doubles_or_a_run_turns_invalid() {
        let p = [
            pt(500.0, 2.0, true),
            pt(1000.0, 2.5, true),
            pt(2000.0, 3.9, true),
            pt(4000.0, 9.0, true),
            pt(8000.0, 300.0, true),
        ];
        // 9 ms is more than twice 2 ms but only 7 ms more: noise, not the knee.
        assert_eq!(knee(&p), Some(3));
        let q = [
            pt(500.0, 2.0, true),
            pt(1000.0, 2.1, true),
            pt(2000.0, 2.2, false),
        ];
        assert_eq!(knee(&q), Some(1));
        assert_eq!(knee(&[pt(1.0, 1.0, false)]), None);
        let html = html(&Report {
            knob: "rate".into(),
            users: 100,
            points: p.to_vec(),
            knee: knee(&p),
            stopped: None,
        });
        assert!(html.contains("knee: 4000 msgs/s") && html.contains("class=\"knee\""));
    }
}

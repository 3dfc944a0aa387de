//! The SVG charts of report.html, drawn here so the page needs no script and no network:
//! per-second line charts with ticked, gridded axes, the unmeasured phases shaded (and
//! left out of the y-scale, so a ramp spike does not flatten the measured phase), event
//! markers, and an HdrHistogram percentile-distribution plot.

use std::fmt::Write as _;

/// One line of a chart.
pub struct Series<'a> {
    pub name: &'a str,
    pub colour: &'a str,
    /// One value per second; `None` where there is no sample.
    pub points: Vec<Option<f64>>,
}

/// What a per-second chart marks besides its lines.
#[derive(Clone, Default)]
pub struct Frame {
    /// Seconds [from, until) of the measured phase; the rest is shaded.
    pub measured: Option<(usize, usize)>,
    /// Vertical markers: (second, label).
    pub markers: Vec<(usize, String)>,
}

const W: f64 = 760.0;
const H: f64 = 240.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 12.0;
const BOTTOM: f64 = 36.0;

/// A "nice" step (1, 2 or 5 times a power of ten) giving about `ticks` intervals up to `max`.
pub fn nice_step(max: f64, ticks: f64) -> f64 {
    if max <= 0.0 || !max.is_finite() {
        return 1.0;
    }
    let raw = max / ticks;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn label(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 || (v.fract() == 0.0 && v.abs() >= 1.0) {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The opening of a chart: its caption and the SVG element.
fn open_svg(title: &str) -> String {
    format!(
        "<figure><figcaption>{t}</figcaption><svg viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" role=\"img\" aria-label=\"{t}\" font-size=\"11\">",
        t = escape(title)
    )
}

/// Horizontal gridlines with their labels, every `step` from 0 to `top`.
fn y_grid(out: &mut String, top: f64, step: f64, y: &dyn Fn(f64) -> f64) {
    let plot_w = W - LEFT - RIGHT;
    let mut v = 0.0;
    while v <= top + step / 2.0 {
        let _ = write!(
            out,
            "<line x1=\"{LEFT}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT + plot_w,
            LEFT - 4.0,
            y(v) + 4.0,
            label(v),
            py = y(v)
        );
        v += step;
    }
}

/// Legend entry `k` (a colour swatch and the series' name) right of the plot.
fn legend(out: &mut String, k: usize, name: &str, colour: &str) {
    let ly = TOP + 12.0 + 16.0 * k as f64;
    let _ = write!(
        out,
        "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{colour}\" stroke-width=\"3\"/><text x=\"{:.1}\" y=\"{:.1}\" fill=\"{colour}\">{}</text>",
        W - RIGHT + 10.0,
        ly - 4.0,
        W - RIGHT + 28.0,
        ly - 4.0,
        W - RIGHT + 32.0,
        ly,
        escape(name)
    );
}

/// A line chart over seconds: title, y unit, lines, and the frame.
pub fn line_chart(title: &str, unit: &str, series: &[Series<'_>], frame: &Frame) -> String {
    let n = series
        .iter()
        .map(|s| s.points.len())
        .max()
        .unwrap_or(0)
        .max(2);
    let (plot_w, plot_h) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let x = |i: f64| LEFT + plot_w * i / (n - 1) as f64;
    // The y-scale comes from the measured seconds when there are any.
    let in_scale = |i: usize| frame.measured.is_none_or(|(f, u)| i >= f && i < u);
    let mut max = series
        .iter()
        .flat_map(|s| s.points.iter().enumerate())
        .filter(|(i, _)| in_scale(*i))
        .filter_map(|(_, v)| *v)
        .fold(0.0f64, f64::max);
    if max <= 0.0 {
        max = 1.0;
    }
    let step = nice_step(max, 4.0);
    let top = (max / step).ceil() * step;
    let y = |v: f64| TOP + plot_h * (1.0 - (v / top).min(1.0));
    let mut out = open_svg(title);
    // Shaded unmeasured phases.
    if let Some((from, until)) = frame.measured {
        let shade = |a: f64, b: f64, text: &str, out: &mut String| {
            if b > a {
                let _ = write!(
                    out,
                    "<rect x=\"{a:.1}\" y=\"{TOP}\" width=\"{:.1}\" height=\"{plot_h}\" fill=\"#eee\"/><text x=\"{:.1}\" y=\"{:.1}\" fill=\"#888\">{text}</text>",
                    b - a,
                    a + 3.0,
                    TOP + 12.0
                );
            }
        };
        shade(
            x(0.0),
            x((from.min(n - 1)) as f64),
            "not measured",
            &mut out,
        );
        shade(
            x((until.min(n - 1)) as f64),
            x((n - 1) as f64),
            "drain",
            &mut out,
        );
    }
    y_grid(&mut out, top, step, &y);
    // X ticks every nice number of seconds.
    let xstep = [1usize, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600]
        .into_iter()
        .find(|s| (n - 1) / s <= 10)
        .unwrap_or(3600);
    let mut t = 0;
    while t < n {
        let px = x(t as f64);
        let _ = write!(
            out,
            "<line x1=\"{px:.1}\" y1=\"{:.1}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#888\"/><text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{t}</text>",
            TOP + plot_h,
            TOP + plot_h + 4.0,
            TOP + plot_h + 16.0
        );
        t += xstep;
    }
    let _ = write!(
        out,
        "<line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{:.1}\" stroke=\"#888\"/><line x1=\"{LEFT}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#888\"/>\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">seconds since the start of the run</text>\
         <text x=\"12\" y=\"{:.1}\" transform=\"rotate(-90 12 {:.1})\" text-anchor=\"middle\">{}</text>",
        TOP + plot_h,
        TOP + plot_h,
        LEFT + plot_w,
        TOP + plot_h,
        LEFT + plot_w / 2.0,
        H - 4.0,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0,
        escape(unit)
    );
    for (sec, text) in &frame.markers {
        let px = x((*sec).min(n - 1) as f64);
        let _ = write!(
            out,
            "<line x1=\"{px:.1}\" y1=\"{TOP}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#b00\" stroke-dasharray=\"4 3\"/><text x=\"{:.1}\" y=\"{:.1}\" fill=\"#b00\">{}</text>",
            TOP + plot_h,
            px + 3.0,
            TOP + 24.0,
            escape(text)
        );
    }
    for (k, s) in series.iter().enumerate() {
        // Runs of consecutive samples become one polyline each.
        let mut runs: Vec<String> = Vec::new();
        let mut cur = String::new();
        for (i, p) in s.points.iter().enumerate() {
            match p {
                Some(v) => {
                    let _ = write!(cur, "{:.1},{:.1} ", x(i as f64), y(*v));
                }
                None if !cur.is_empty() => runs.push(std::mem::take(&mut cur)),
                None => {}
            }
        }
        if !cur.is_empty() {
            runs.push(cur);
        }
        for r in runs {
            let _ = write!(
                out,
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"{}\"/>",
                s.colour,
                r.trim_end()
            );
        }
        legend(&mut out, k, s.name, s.colour);
    }
    out.push_str("</svg></figure>");
    out
}

/// Percentile-distribution plot (HdrHistogram style): latency against percentile on a
/// log scale of 1/(1 − p), from `(quantile, µs)` points.
pub fn distribution_chart(title: &str, points: &[(f64, u64)]) -> String {
    let (plot_w, plot_h) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    // x = log10(1 / (1 - q)), capped at 5 nines.
    let xq = |q: f64| (1.0 / (1.0 - q.min(0.99999))).log10();
    let xmax = 5.0;
    let max_ms = points
        .iter()
        .map(|(_, us)| *us as f64 / 1000.0)
        .fold(0.0f64, f64::max)
        .max(1e-3);
    let step = nice_step(max_ms, 4.0);
    let top = (max_ms / step).ceil() * step;
    let x = |q: f64| LEFT + plot_w * xq(q) / xmax;
    let y = |ms: f64| TOP + plot_h * (1.0 - ms / top);
    let mut out = open_svg(title);
    y_grid(&mut out, top, step, &y);
    for (q, name) in [
        (0.0, "0%"),
        (0.9, "90%"),
        (0.99, "99%"),
        (0.999, "99.9%"),
        (0.9999, "99.99%"),
        (0.99999, "99.999%"),
    ] {
        let px = x(q);
        let _ = write!(
            out,
            "<line x1=\"{px:.1}\" y1=\"{TOP}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{name}</text>",
            TOP + plot_h,
            TOP + plot_h + 16.0
        );
    }
    let pts: String = points
        .iter()
        .map(|(q, us)| format!("{:.1},{:.1}", x(*q), y(*us as f64 / 1000.0)))
        .collect::<Vec<_>>()
        .join(" ");
    let _ = write!(
        out,
        "<polyline fill=\"none\" stroke=\"#d95f02\" stroke-width=\"1.5\" points=\"{pts}\"/>\
         <line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{b:.1}\" stroke=\"#888\"/><line x1=\"{LEFT}\" y1=\"{b:.1}\" x2=\"{:.1}\" y2=\"{b:.1}\" stroke=\"#888\"/>\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">percentile</text>\
         <text x=\"12\" y=\"{m:.1}\" transform=\"rotate(-90 12 {m:.1})\" text-anchor=\"middle\">ms</text></svg></figure>",
        LEFT + plot_w,
        LEFT + plot_w / 2.0,
        H - 4.0,
        b = TOP + plot_h,
        m = TOP + plot_h / 2.0
    );
    out
}

/// One line of an x-y chart.
pub struct XySeries<'a> {
    pub name: &'a str,
    pub colour: &'a str,
    pub points: Vec<(f64, f64)>,
}

/// An x-y line chart with dots at each point, gridded axes from zero, and an optional
/// vertical marker at an x value.
pub fn xy_chart(
    title: &str,
    xunit: &str,
    yunit: &str,
    series: &[XySeries<'_>],
    marker: Option<(f64, String)>,
) -> String {
    let (plot_w, plot_h) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let all = || series.iter().flat_map(|s| s.points.iter());
    let xmax = all().map(|p| p.0).fold(0.0f64, f64::max).max(1e-9);
    let ymax = all().map(|p| p.1).fold(0.0f64, f64::max).max(1e-9);
    let (xs, ys) = (nice_step(xmax, 5.0), nice_step(ymax, 4.0));
    let (xtop, ytop) = ((xmax / xs).ceil() * xs, (ymax / ys).ceil() * ys);
    let x = |v: f64| LEFT + plot_w * v / xtop;
    let y = |v: f64| TOP + plot_h * (1.0 - v / ytop);
    let mut out = open_svg(title);
    y_grid(&mut out, ytop, ys, &y);
    let mut v = 0.0;
    while v <= xtop + xs / 2.0 {
        let _ = write!(
            out,
            "<line x1=\"{px:.1}\" y1=\"{TOP}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#eee\"/><text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            TOP + plot_h,
            TOP + plot_h + 16.0,
            label(v),
            px = x(v)
        );
        v += xs;
    }
    let _ = write!(
        out,
        "<line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{b:.1}\" stroke=\"#888\"/><line x1=\"{LEFT}\" y1=\"{b:.1}\" x2=\"{:.1}\" y2=\"{b:.1}\" stroke=\"#888\"/>\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\
         <text x=\"12\" y=\"{m:.1}\" transform=\"rotate(-90 12 {m:.1})\" text-anchor=\"middle\">{}</text>",
        LEFT + plot_w,
        LEFT + plot_w / 2.0,
        H - 4.0,
        escape(xunit),
        escape(yunit),
        b = TOP + plot_h,
        m = TOP + plot_h / 2.0
    );
    if let Some((mx, text)) = marker {
        let px = x(mx);
        let _ = write!(
            out,
            "<line x1=\"{px:.1}\" y1=\"{TOP}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#b00\" stroke-dasharray=\"4 3\"/><text x=\"{:.1}\" y=\"{:.1}\" fill=\"#b00\">{}</text>",
            TOP + plot_h,
            px + 3.0,
            TOP + 12.0,
            escape(&text)
        );
    }
    for (k, s) in series.iter().enumerate() {
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|(a, b)| format!("{:.1},{:.1}", x(*a), y(*b)))
            .collect();
        let _ = write!(
            out,
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"1.5\" points=\"{}\"/>",
            pts.join(" "),
            c = s.colour
        );
        for (a, b) in &s.points {
            let _ = write!(
                out,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{}\"/>",
                x(*a),
                y(*b),
                s.colour
            );
        }
        legend(&mut out, k, s.name, s.colour);
    }
    out.push_str("</svg></figure>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_steps_are_one_two_or_five_times_a_power_of_ten() {
        assert_eq!(nice_step(8.35, 4.0), 5.0);
        assert_eq!(nice_step(1000.0, 4.0), 500.0);
        assert_eq!(nice_step(0.7, 4.0), 0.2);
        assert_eq!(nice_step(0.0, 4.0), 1.0);
    }

    #[test]
    fn the_y_scale_ignores_the_unmeasured_ramp() {
        // A 900 ms spike in the ramp must not set the scale of a 2 ms measured phase.
        let mut pts = vec![Some(900.0)];
        pts.extend(std::iter::repeat_n(Some(2.0), 9));
        let svg = line_chart(
            "t",
            "ms",
            &[Series {
                name: "p99",
                colour: "#000",
                points: pts,
            }],
            &Frame {
                measured: Some((2, 10)),
                markers: vec![(5, "storm".into())],
            },
        );
        assert!(svg.contains(">2<") && !svg.contains(">900<"), "{svg}");
        assert!(svg.contains("not measured") && svg.contains(">storm<"));
    }
}

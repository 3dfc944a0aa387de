//! `--fail-if 'p99_deliver_ms>50'`: conditions on a run's figures that set the exit code,
//! so CI can gate on latency and completeness.

use crate::report::Summary;

/// One condition: metric, comparison, threshold.
#[derive(Clone, Debug, PartialEq)]
pub struct Condition {
    pub metric: String,
    pub op: String,
    pub value: f64,
}

/// Metric names a condition may use.
pub const METRICS: [&str; 9] = [
    "p50_deliver_ms",
    "p99_deliver_ms",
    "p999_deliver_ms",
    "p99_ack_ms",
    "delivered_ratio",
    "delivered_per_s",
    "errors",
    "invalid",
    "p99_deliver_raw_ms",
];

impl Condition {
    /// Parses `METRIC OP VALUE` with OP one of `>`, `>=`, `<`, `<=`.
    pub fn parse(s: &str) -> Result<Condition, String> {
        let s = s.replace(' ', "");
        for op in [">=", "<=", ">", "<"] {
            if let Some((m, v)) = s.split_once(op) {
                if !METRICS.contains(&m) {
                    return Err(format!(
                        "unknown metric '{m}' in --fail-if; known: {}",
                        METRICS.join(", ")
                    ));
                }
                let value = v
                    .parse()
                    .map_err(|_| format!("bad number '{v}' in --fail-if '{s}'"))?;
                return Ok(Condition {
                    metric: m.to_string(),
                    op: op.to_string(),
                    value,
                });
            }
        }
        Err(format!(
            "--fail-if '{s}': expected METRIC>VALUE (or >=, <, <=), e.g. p99_deliver_ms>50"
        ))
    }

    /// The metric's value in `s`.
    pub fn actual(&self, s: &Summary) -> f64 {
        let ms = |us: u64| us as f64 / 1000.0;
        match self.metric.as_str() {
            "p50_deliver_ms" => ms(s.deliver_us.p50),
            "p99_deliver_ms" => ms(s.deliver_us.p99),
            "p999_deliver_ms" => ms(s.deliver_us.p999),
            "p99_deliver_raw_ms" => ms(s.deliver_raw_us.p99),
            "p99_ack_ms" => ms(s.ack_us.p99),
            "delivered_ratio" => s.delivered as f64 / s.expected_deliveries.max(1) as f64,
            "delivered_per_s" => s.delivered_per_s,
            "errors" => s.errors as f64,
            "invalid" => f64::from(u8::from(!s.valid)),
            _ => f64::NAN,
        }
    }

    /// True when the condition holds (the run fails).
    pub fn holds(&self, s: &Summary) -> bool {
        let a = self.actual(s);
        match self.op.as_str() {
            ">" => a > self.value,
            ">=" => a >= self.value,
            "<" => a < self.value,
            _ => a <= self.value,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_parse_and_compare() {
        let c = Condition::parse("p99_deliver_ms > 50").expect("parses");
        let mut s = Summary::default();
        s.deliver_us.p99 = 60_000;
        assert!(c.holds(&s));
        s.deliver_us.p99 = 40_000;
        assert!(!c.holds(&s));
        assert!(Condition::parse("p98_x>1").is_err());
        assert!(Condition::parse("p99_deliver_ms").is_err());
        let r = Condition::parse("delivered_ratio<0.99").expect("parses");
        s.expected_deliveries = 100;
        s.delivered = 98;
        assert!(r.holds(&s));
    }
}

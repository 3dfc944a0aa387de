//! `chatsim capacity`: the seeds' back-of-envelope numbers, and a fleet size from a load
//! report.

use anyhow::{Context, Result};
use planner::{estimate, plan, si, Inputs, Machine};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct CapacityArgs {
    /// TOML file with any of these keys at the top level (defaults: seed 001's figures):
    /// registered_users, daily_active_users, messages_per_user_per_day, peak_factor_low,
    /// peak_factor_high, message_bytes, retention_days, undelivered_share, history_share,
    /// history_days, concurrent_connections, bytes_per_connection_per_s, regions (3),
    /// writes_per_message (3), deliveries_per_message (1); and a [machine] table with
    /// cores, memory_gib, nic_gbit_per_s, storage_iops, utilisation (default: a 32-core,
    /// 128 GiB, 25 Gbit/s, 100k-IOPS node planned at 60%).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub daily_active_users: Option<f64>,
    #[arg(long)]
    pub messages_per_user_per_day: Option<f64>,
    #[arg(long)]
    pub concurrent_connections: Option<f64>,
    #[arg(long)]
    pub message_bytes: Option<f64>,
    /// Average traffic per open connection, bytes/s (seed 001: 10,000): drives bandwidth.
    #[arg(long)]
    pub bytes_per_connection_per_s: Option<f64>,
    /// A load report directory (summary.json): size the fleet from its measured figures.
    #[arg(long)]
    pub from_report: Option<PathBuf>,
    /// Cores of the machine the load report was measured on; used only when the report has
    /// no server CPU figure (`cpu_us_per_delivered`).
    #[arg(long, default_value_t = 2.0)]
    pub measured_cores: f64,
    /// table (terminal), markdown or csv.
    #[arg(long, default_value = "table", value_parser = ["table", "markdown", "csv"])]
    pub format: String,
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    #[serde(flatten)]
    inputs: Inputs,
    #[serde(default)]
    machine: Machine,
}

pub fn capacity(a: CapacityArgs) -> Result<()> {
    let mut cfg = match &a.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            toml::from_str::<ConfigFile>(&text)
                .map_err(|e| anyhow::anyhow!("{}: {}", p.display(), e))?
        }
        None => ConfigFile::default(),
    };
    let i = &mut cfg.inputs;
    if let Some(v) = a.daily_active_users {
        i.daily_active_users = v;
    }
    if let Some(v) = a.messages_per_user_per_day {
        i.messages_per_user_per_day = v;
    }
    if let Some(v) = a.concurrent_connections {
        i.concurrent_connections = v;
    }
    if let Some(v) = a.message_bytes {
        i.message_bytes = v;
    }
    if let Some(v) = a.bytes_per_connection_per_s {
        i.bytes_per_connection_per_s = v;
    }
    let e = estimate(&cfg.inputs);
    let mut rows: Vec<(String, String)> = vec![
        ("messages per day".into(), si(e.messages_per_day, "")),
        ("messages/s, average".into(), si(e.avg_msgs_per_s, "/s")),
        (
            format!(
                "messages/s, peak ({}x-{}x)",
                cfg.inputs.peak_factor_low, cfg.inputs.peak_factor_high
            ),
            format!(
                "{} - {}",
                si(e.peak_msgs_per_s_low, "/s"),
                si(e.peak_msgs_per_s_high, "/s")
            ),
        ),
        ("storage per day".into(), si(e.storage_per_day_bytes, "B")),
        ("storage per year".into(), si(e.storage_per_year_bytes, "B")),
        (
            format!(
                "active storage ({} d retention x {:.0}% undelivered + {:.0}% keep {} d history)",
                cfg.inputs.retention_days,
                cfg.inputs.undelivered_share * 100.0,
                cfg.inputs.history_share * 100.0,
                cfg.inputs.history_days
            ),
            si(e.active_storage_bytes, "B"),
        ),
        (
            format!(
                "bandwidth at peak connections ({} connections x {} each)",
                si(cfg.inputs.concurrent_connections, "").trim_end(),
                si(cfg.inputs.bytes_per_connection_per_s, "B/s")
            ),
            si(e.bandwidth_bytes_per_s, "B/s"),
        ),
    ];
    let mut planned = None;
    if let Some(dir) = &a.from_report {
        let path = dir.join("summary.json");
        let s: loadgen::report::Summary = serde_json::from_slice(
            &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("parsing {}", path.display()))?;
        let p = plan(&e, &cfg.inputs, &s, a.measured_cores, &cfg.machine)
            .map_err(anyhow::Error::msg)?;
        planned = Some(p.clone());
        rows.push((
            format!("measured (from {})", dir.display()),
            format!(
                "{:.0} delivered msgs/s at p99 {:.2} ms; {:.0} msgs/s per core ({}); {:.1} KiB/connection",
                p.measured_delivered_per_s, p.p99_deliver_ms, p.delivered_per_core_s, p.cpu_basis, p.kib_per_connection
            ),
        ));
        let m = &cfg.machine;
        rows.push((
            format!(
                "nodes for the peak ({} cores, {} GiB, {} Gbit/s, {} write IOPS at {:.0}%; {} writes per message)",
                m.cores,
                m.memory_gib,
                m.nic_gbit_per_s,
                si(m.storage_iops, "").trim_end(),
                m.utilisation * 100.0,
                cfg.inputs.writes_per_message
            ),
            format!(
                "cpu {:.0}, memory {:.0}, bandwidth {:.0}, storage IOPS {:.0} -> {:.0} nodes; {} binds first",
                p.nodes_by_cpu,
                p.nodes_by_memory,
                p.nodes_by_bandwidth,
                p.nodes_by_storage_iops,
                p.nodes,
                p.binding
            ),
        ));
        rows.push((
            format!("with N+1 headroom in each of {} regions", p.regions),
            format!(
                "{:.0} per region x {} = {:.0} nodes",
                p.nodes_per_region, p.regions, p.nodes_with_headroom
            ),
        ));
    }
    match a.format.as_str() {
        "markdown" => {
            println!("| figure | value |\n| --- | --- |");
            for (k, v) in &rows {
                println!("| {k} | {v} |");
            }
        }
        "csv" => {
            // For a spreadsheet: one raw value per row (inputs, estimate, machine, plan),
            // named by its field, numbers unformatted.
            let mut w = csv::Writer::from_writer(std::io::stdout());
            w.write_record(["figure", "value"])?;
            let mut parts = vec![
                ("input", serde_json::to_value(&cfg.inputs)?),
                ("estimate", serde_json::to_value(&e)?),
            ];
            if let Some(p) = &planned {
                parts.push(("machine", serde_json::to_value(&cfg.machine)?));
                parts.push(("plan", serde_json::to_value(p)?));
            }
            for (prefix, v) in parts {
                for (k, v) in v.as_object().into_iter().flatten() {
                    let value = match v {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    w.write_record([format!("{prefix}.{k}"), value])?;
                }
            }
            w.flush()?;
        }
        _ => {
            let width = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(10);
            for (k, v) in &rows {
                println!("{k:<width$}  {v}");
            }
        }
    }
    Ok(())
}

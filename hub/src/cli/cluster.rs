//! `hub cluster status|rebalance`: the cluster's nodes with their devices and heartbeat
//! ages, and moving devices from the fullest nodes to the others.

use clap::Subcommand;
use serde_json::{json, Value};

use super::format::table;
use super::{exit, ApiClient, CliError};

/// The `hub cluster` subcommands.
#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Show every node: alive or dead, heartbeat age, devices held, devices being handed over.
    #[command(
        after_help = "Examples:\n  hub cluster status\n  hub cluster status --json | jq '.nodes[] | select(.alive | not)'"
    )]
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Ask the nodes above their share to hand the excess to the others: those devices are
    /// closed with 4010 at --rate per node and reconnect through the load balancer.
    #[command(
        after_help = "After a failover the survivors hold every device, and a node that comes back gets none\n\
until devices reconnect. This spreads them again; `cluster.rebalance = \"auto\"` does it by itself.\n\n\
Examples:\n  hub cluster rebalance --dry-run\n  hub cluster rebalance --rate 50"
    )]
    Rebalance {
        /// Devices per second each node hands over (default: cluster.rebalance_rate).
        #[arg(long, value_name = "N")]
        rate: Option<u32>,
        /// Only show what would move.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `hub cluster` subcommand.
///
/// # Errors
/// API failures (404 when the hub is not in a cluster).
pub fn run(api: &ApiClient, command: &ClusterCommand) -> Result<u8, CliError> {
    match command {
        ClusterCommand::Status { json } => status(api, *json),
        ClusterCommand::Rebalance {
            rate,
            dry_run,
            json,
        } => rebalance(api, *rate, *dry_run, *json),
    }
}

fn status(api: &ApiClient, json_out: bool) -> Result<u8, CliError> {
    let v = api.get("/api/v1/cluster")?;
    if json_out {
        emit!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(exit::OK);
    }
    let this = v["node"].as_str().unwrap_or_default();
    let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|n| {
            let id = n["node"].as_str().unwrap_or_default();
            let alive = n["alive"].as_bool() == Some(true);
            vec![
                if id == this {
                    format!("{id} (this hub)")
                } else {
                    id.to_string()
                },
                if alive { "alive" } else { "dead" }.to_string(),
                match n["heartbeat_age_ms"].as_u64() {
                    Some(ms) => format!("{:.1}s ago", ms as f64 / 1000.0),
                    None => "expired".to_string(),
                },
                n["devices"].as_u64().unwrap_or(0).to_string(),
                match n["shedding"].as_u64().unwrap_or(0) {
                    0 => "-".to_string(),
                    k => format!("handing over {k}"),
                },
            ]
        })
        .collect();
    table(
        &["NODE", "STATE", "HEARTBEAT", "DEVICES", "REBALANCING"],
        &rows,
    );
    let live = nodes.iter().filter(|n| n["alive"] == true).count();
    emit!(
        "{} devices on {live} live node(s), a share of {} each; rebalancing is {} at {}/s",
        v["devices"].as_u64().unwrap_or(0),
        v["share"].as_u64().unwrap_or(0),
        v["rebalance"].as_str().unwrap_or("manual"),
        v["rebalance_rate"].as_u64().unwrap_or(0),
    );
    Ok(exit::OK)
}

fn rebalance(
    api: &ApiClient,
    rate: Option<u32>,
    dry_run: bool,
    json_out: bool,
) -> Result<u8, CliError> {
    if rate == Some(0) {
        return Err(CliError::Usage(
            "--rate must be at least 1 (devices per second)".into(),
        ));
    }
    let plan: Value = api.post(
        "/api/v1/cluster/rebalance",
        &json!({ "rate": rate, "dry_run": dry_run }),
    )?;
    if json_out {
        emit!(
            "{}",
            serde_json::to_string_pretty(&plan).unwrap_or_default()
        );
        return Ok(exit::OK);
    }
    let moves = plan["moves"].as_array().cloned().unwrap_or_default();
    let share = plan["share"].as_u64().unwrap_or(0);
    if moves.is_empty() {
        emit!("balanced: no node holds more than its share of {share} devices");
        return Ok(exit::OK);
    }
    let rate = plan["rate"].as_u64().unwrap_or(1);
    for m in &moves {
        emit!(
            "{}: holds {}, {} {} devices at {rate}/s",
            m["node"].as_str().unwrap_or_default(),
            m["holds"].as_u64().unwrap_or(0),
            if dry_run {
                "would hand over"
            } else {
                "hands over"
            },
            m["devices"].as_u64().unwrap_or(0),
        );
    }
    emit!(
        "share {share} devices per node; {} in about {:.1} s (see `hub cluster status`)",
        if dry_run {
            "nothing moved (dry run)"
        } else {
            "done"
        },
        plan["duration_ms"].as_u64().unwrap_or(0) as f64 / 1000.0
    );
    Ok(exit::OK)
}

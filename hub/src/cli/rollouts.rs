//! `hub rollout start|status|pause|resume|abort`: a firmware version offered to many
//! devices, canary first, then in steps, stopped by its failure budget.

use clap::Subcommand;
use serde_json::{json, Value};

use super::format::table;
use super::{exit, ApiClient, CliError};

/// The `hub rollout` subcommands.
#[derive(Subcommand)]
pub enum RolloutCommand {
    /// Offer a stored firmware version to the devices of a tag (or all): the canary
    /// devices first, then each step of the targets once every device before reached an
    /// outcome within the failure budget; past the budget the rollout aborts itself (or
    /// pauses, with --on-failure pause).
    #[command(
        after_help = "Steps are cumulative shares of the targets; the last step always covers every target.\n\
Past the budget, offers not started are withdrawn; devices already updated keep the version.\n\
A paused rollout goes on with `hub rollout resume` (the failures so far are accepted) or ends\n\
with `hub rollout abort`. In a cluster, start it through any hub.\n\n\
Examples:\n  hub rollout start --firmware 1.1 --all --canary 10 --steps 50%,100%\n  \
hub rollout start --firmware 1.1 --tag site=b --steps 10%,50%,100% --max-failures 5 --rate 60/min\n  \
hub rollout start --firmware 1.1 --all --canary 5 --on-failure pause"
    )]
    Start {
        /// The stored version to offer (`hub firmware list`).
        #[arg(long, value_name = "VERSION")]
        firmware: String,
        /// Devices with this tag (repeatable; all must match).
        #[arg(
            long = "tag",
            value_name = "KEY=VALUE",
            required_unless_present = "all"
        )]
        tags: Vec<String>,
        /// Every registered device.
        #[arg(long, conflicts_with = "tags")]
        all: bool,
        /// Devices updated first, alone.
        #[arg(long, default_value_t = 0, value_name = "N")]
        canary: usize,
        /// Cumulative shares, like 10%,50%,100%.
        #[arg(long, default_value = "100%", value_name = "STEPS")]
        steps: String,
        /// The failure budget: stop once more than this percent of the finished devices
        /// failed or rolled back.
        #[arg(long, default_value = "0", value_name = "PCT")]
        max_failures: String,
        /// What happens past the failure budget: `abort` (for good) or `pause` (until
        /// `hub rollout resume` or `abort`).
        #[arg(long, default_value = "abort", value_name = "pause|abort", value_parser = ["pause", "abort"])]
        on_failure: String,
        /// Offers per minute (N/min, N/s, or N per second); default as fast as the hub can.
        #[arg(long, value_name = "RATE")]
        rate: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Rollouts with their counts, or one with each device's update.
    #[command(after_help = "Examples:\n  hub rollout status\n  hub rollout status 3 --json")]
    Status {
        /// A rollout id.
        id: Option<u64>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// No new offers; devices already offered go on.
    #[command(after_help = "Example:\n  hub rollout pause 3")]
    Pause {
        /// Rollout id.
        id: u64,
    },
    /// Go on with a paused rollout (one paused past its failure budget accepts the
    /// failures so far and offers again what it withdrew).
    #[command(after_help = "Example:\n  hub rollout resume 3")]
    Resume {
        /// Rollout id.
        id: u64,
    },
    /// Stop for good: offers not started are withdrawn; updated devices keep the version.
    #[command(after_help = "Example:\n  hub rollout abort 3")]
    Abort {
        /// Rollout id.
        id: u64,
    },
}

fn counts_line(v: &Value) -> String {
    let c = &v["counts"];
    format!(
        "{} targets: {} succeeded, {} failed, {} rolled back, {} in progress, {} offered, {} pending",
        c["targets"], c["succeeded"], c["failed"], c["rolled_back"], c["in_progress"], c["offered"], c["pending"]
    )
}

/// Runs a `hub rollout` subcommand.
///
/// # Errors
/// Bad flags, or the API failed.
pub fn run(api: &ApiClient, command: &RolloutCommand) -> Result<u8, CliError> {
    match command {
        RolloutCommand::Start {
            firmware,
            tags,
            all,
            canary,
            steps,
            max_failures,
            on_failure,
            rate,
            json: json_out,
        } => {
            let select = if *all {
                "all".to_string()
            } else {
                tags.join(",")
            };
            let max_failures: f64 = max_failures
                .trim()
                .trim_end_matches('%')
                .parse()
                .ok()
                .filter(|p: &f64| (0.0..=100.0).contains(p))
                .ok_or_else(|| {
                    CliError::Usage(format!(
                        "--max-failures `{max_failures}`: give a percentage, 0 to 100"
                    ))
                })?;
            let rate = rate.as_deref().map(per_minute).transpose()?.unwrap_or(0.0);
            let v = api.post(
                "/api/v1/rollouts",
                &json!({"version": firmware, "select": select, "canary": canary, "steps": steps, "max_failures": max_failures, "on_failure": on_failure, "rate": rate}),
            )?;
            if *json_out {
                emit!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                emit!(
                    "rollout {} of firmware {}: {}",
                    v["id"],
                    firmware,
                    counts_line(&v)
                );
            }
            Ok(exit::OK)
        }
        RolloutCommand::Status {
            id: Some(id),
            json: json_out,
        } => {
            let v = api.get(&format!("/api/v1/rollouts/{id}"))?;
            if *json_out {
                emit!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                return Ok(exit::OK);
            }
            emit!(
                "rollout {} of firmware {}: {}{}",
                v["id"],
                v["version"].as_str().unwrap_or_default(),
                v["state"].as_str().unwrap_or_default(),
                v["reason"]
                    .as_str()
                    .filter(|r| !r.is_empty())
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            );
            emit!("{}", counts_line(&v));
            let rows: Vec<Vec<String>> = v["devices"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|d| {
                    let state = d["state"].as_str().unwrap_or_default().to_string();
                    let state = if state == "downloading" {
                        format!("downloading {}%", d["percent"])
                    } else {
                        state
                    };
                    vec![
                        d["device"].as_str().unwrap_or_default().to_string(),
                        state,
                        super::format::one_line(d["reason"].as_str().unwrap_or_default()),
                    ]
                })
                .collect();
            table(&["DEVICE", "STATE", "REASON"], &rows);
            Ok(exit::OK)
        }
        RolloutCommand::Status {
            id: None,
            json: json_out,
        } => {
            let v = api.get("/api/v1/rollouts")?;
            if *json_out {
                emit!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                return Ok(exit::OK);
            }
            let rows: Vec<Vec<String>> = v
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|r| {
                    vec![
                        r["id"].to_string(),
                        r["version"].as_str().unwrap_or_default().to_string(),
                        r["state"].as_str().unwrap_or_default().to_string(),
                        format!("{}/{}", r["counts"]["succeeded"], r["counts"]["targets"]),
                        format!(
                            "{}",
                            r["counts"]["failed"].as_u64().unwrap_or(0)
                                + r["counts"]["rolled_back"].as_u64().unwrap_or(0)
                        ),
                        super::format::one_line(r["reason"].as_str().unwrap_or_default()),
                    ]
                })
                .collect();
            table(
                &["ID", "VERSION", "STATE", "SUCCEEDED", "FAILED", "REASON"],
                &rows,
            );
            Ok(exit::OK)
        }
        RolloutCommand::Pause { id } => transition(api, *id, "pause"),
        RolloutCommand::Resume { id } => transition(api, *id, "resume"),
        RolloutCommand::Abort { id } => transition(api, *id, "abort"),
    }
}

fn transition(api: &ApiClient, id: u64, action: &str) -> Result<u8, CliError> {
    let v = api.post(&format!("/api/v1/rollouts/{id}/{action}"), &json!({}))?;
    emit!(
        "rollout {id} is {}",
        v["state"].as_str().unwrap_or_default()
    );
    Ok(exit::OK)
}

/// `--rate` in offers per minute.
fn per_minute(text: &str) -> Result<f64, CliError> {
    hub::jobs::parse_rate(text)
        .map(|per_sec| per_sec * 60.0)
        .map_err(|e| CliError::Usage(format!("--rate: {e}")))
}

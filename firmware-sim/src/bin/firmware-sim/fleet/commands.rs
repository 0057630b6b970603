//! The fleet's command load (`--commands RATE`): `led` commands through the admin API,
//! each timed from the create call to the device's result.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;

use super::Counters;

use super::SETTLE as COMMANDS_SETTLE;

/// Sends `rate` commands a second through the admin API, to the devices in turn, from
/// [`COMMANDS_SETTLE`] after every device has connected once until `stop`, and records each
/// round trip (the create call, which waits for the command's final state); one
/// that ends after `stop` (devices leaving, the hub recording it) is not counted. Each
/// runs on a blocking thread (the HTTP client is blocking); at most `rate` are in flight,
/// and a tick that finds them all busy is skipped (counted as failed), so a slow hub is
/// not flooded.
pub(super) async fn send_commands(
    api: String,
    admin: String,
    ids: Vec<String>,
    rate: u32,
    counters: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let (api, admin) = (Arc::new(api), Arc::new(format!("Bearer {admin}")));
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut in_flight = tokio::task::JoinSet::new();
    let mut next = 0usize;
    let mut settled_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tick.tick() => {}
            Some(_) = in_flight.join_next(), if !in_flight.is_empty() => continue,
        }
        if (Counters::get(&counters.ever_online) as usize) < ids.len() {
            continue;
        }
        let settled =
            *settled_at.get_or_insert_with(|| tokio::time::Instant::now() + COMMANDS_SETTLE);
        if tokio::time::Instant::now() < settled {
            continue;
        }
        counters.commands_issued.fetch_add(1, Ordering::Relaxed);
        if in_flight.len() >= rate as usize {
            counters.commands_failed.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let device = ids[next % ids.len()].clone();
        next += 1;
        let (agent, api, admin, counters, stopping) = (
            agent.clone(),
            api.clone(),
            admin.clone(),
            counters.clone(),
            stop.clone(),
        );
        in_flight.spawn_blocking(move || {
            let started = std::time::Instant::now();
            let outcome = command_round_trip(&agent, &api, &admin, &device);
            if *stopping.borrow() {
                return;
            }
            match outcome {
                Ok(true) => counters.command_round_trip.record(started.elapsed()),
                Ok(false) | Err(_) => {
                    counters.commands_failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    in_flight.abort_all();
}

/// Creates a `led` command for `device` and waits for its final state in the same call
/// (`?wait=`); true when it succeeded.
fn command_round_trip(
    agent: &ureq::Agent,
    api: &str,
    auth: &str,
    device: &str,
) -> anyhow::Result<bool> {
    let body = serde_json::json!({ "name": "led", "args": { "on": true }, "timeout": "10s" });
    // One call: the hub answers once the command is final (or after 30 s).
    let mut resp = agent
        .post(format!("{api}/api/v1/devices/{device}/commands"))
        .query("wait", "30s")
        .header("Authorization", auth)
        .send_json(&body)?;
    if !resp.status().is_success() {
        anyhow::bail!("the admin API refused the command ({})", resp.status());
    }
    let record: serde_json::Value = resp.body_mut().read_json()?;
    record["id"]
        .as_u64()
        .context("no command id in the answer")?;
    Ok(record["state"] == "succeeded")
}

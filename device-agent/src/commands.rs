//! Commands from the hub: the built-ins are answered at once by the event loop, configured
//! actions (see [`crate::actions`]) are run as tasks. Anything else gets a failed result
//! saying why, with code [`REFUSED`].
//!
//! Built-ins (their arguments are a JSON object, as for every command):
//!
//! | name | arguments | does |
//! |---|---|---|
//! | `ping` | none | answers `pong` with the agent's version and uptime |
//! | `report-now` | optional `sensor` | samples every sensor (or the named one) now |
//! | `set-interval` | `sensor`, `interval` (`"5s"`) | changes a sensor's interval until the agent restarts |
//! | `get-config` | none | the running configuration as JSON, without secrets |

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::actions::{parse_args, Action, Outcome, REFUSED};
use crate::config::AgentConfig;
use crate::sensors::SensorHandle;

/// Names of the built-in commands (actions may not use them).
pub const BUILTINS: &[&str] = &["ping", "report-now", "set-interval", "get-config"];

/// Shortest interval `set-interval` accepts (the same as the configuration).
pub const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// What to do with a command.
#[derive(Debug)]
pub enum Dispatch {
    /// Answered already.
    Done(Outcome),
    /// Run this action (in a task) with the command's arguments.
    Run(Arc<Action>),
}

/// The command table.
#[derive(Debug)]
pub struct Commands {
    actions: BTreeMap<String, Arc<Action>>,
    sensors: Vec<SensorHandle>,
    config: Arc<AgentConfig>,
    started: Instant,
}

fn only_keys(args: &BTreeMap<String, String>, allowed: &[&str]) -> Result<(), String> {
    match args.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(format!(
            "refused: unknown argument {k:?} (takes: {})",
            if allowed.is_empty() {
                "none".to_string()
            } else {
                allowed.join(", ")
            }
        )),
        None => Ok(()),
    }
}

impl Commands {
    /// A table for this configuration and these running sensors.
    pub fn new(config: Arc<AgentConfig>, sensors: Vec<SensorHandle>) -> Commands {
        let actions = config
            .actions
            .iter()
            .map(|a| (a.name.clone(), Arc::new(a.clone())))
            .collect();
        Commands {
            actions,
            sensors,
            config,
            started: Instant::now(),
        }
    }

    /// The running sensors.
    pub fn sensors(&self) -> &[SensorHandle] {
        &self.sensors
    }

    /// Decides what command `name` with JSON `args` means.
    pub fn dispatch(&self, name: &str, args: &str) -> Dispatch {
        if let Some(action) = self.actions.get(name) {
            return Dispatch::Run(action.clone());
        }
        let parsed = match parse_args(args) {
            Ok(p) => p,
            Err(why) => return Dispatch::Done(Outcome::refused(format!("refused: {why}"))),
        };
        let result = match name {
            "ping" => self.ping(&parsed),
            "report-now" => self.report_now(&parsed),
            "set-interval" => self.set_interval(&parsed),
            "get-config" => self.get_config(&parsed),
            _ => {
                let mut known: Vec<&str> = BUILTINS.to_vec();
                known.extend(self.actions.keys().map(String::as_str));
                Err(format!(
                    "unknown command {name:?} (this agent knows: {})",
                    known.join(", ")
                ))
            }
        };
        Dispatch::Done(result.unwrap_or_else(|why| Outcome {
            ok: false,
            code: REFUSED,
            output: why,
        }))
    }

    fn ping(&self, args: &BTreeMap<String, String>) -> Result<Outcome, String> {
        only_keys(args, &[])?;
        let up = Duration::from_secs(self.started.elapsed().as_secs());
        Ok(Outcome::ok(format!(
            "pong from {} (device-agent {}, up {})",
            self.config.hub.device_id,
            crate::VERSION,
            humantime::format_duration(up)
        )))
    }

    fn find(&self, name: &str) -> Result<&SensorHandle, String> {
        self.sensors.iter().find(|s| s.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.sensors.iter().map(|s| s.name.as_str()).collect();
            format!(
                "refused: no sensor {name:?} (sensors: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )
        })
    }

    fn report_now(&self, args: &BTreeMap<String, String>) -> Result<Outcome, String> {
        only_keys(args, &["sensor"])?;
        let targets: Vec<&SensorHandle> = match args.get("sensor") {
            Some(name) => vec![self.find(name)?],
            None => self.sensors.iter().collect(),
        };
        for s in &targets {
            s.trigger();
        }
        let names: Vec<&str> = targets.iter().map(|s| s.name.as_str()).collect();
        Ok(Outcome::ok(format!("sampling now: {}", names.join(", "))))
    }

    fn set_interval(&self, args: &BTreeMap<String, String>) -> Result<Outcome, String> {
        only_keys(args, &["sensor", "interval"])?;
        let name = args
            .get("sensor")
            .ok_or("refused: missing argument \"sensor\"")?;
        let text = args
            .get("interval")
            .ok_or("refused: missing argument \"interval\" (a duration like \"30s\")")?;
        let sensor = self.find(name)?;
        let interval = humantime::parse_duration(text.trim())
            .map_err(|_| format!("refused: interval {text:?} is not a duration like \"30s\""))?;
        if !(MIN_INTERVAL..=Duration::from_secs(86_400)).contains(&interval) {
            return Err(format!(
                "refused: interval {text:?} is outside 100ms..=1day"
            ));
        }
        let before = sensor.interval();
        sensor.set_interval(interval);
        Ok(Outcome::ok(format!(
            "sensor {name} now samples every {} (was {}) until the agent restarts",
            humantime::format_duration(interval),
            humantime::format_duration(before)
        )))
    }

    fn get_config(&self, args: &BTreeMap<String, String>) -> Result<Outcome, String> {
        only_keys(args, &[])?;
        let intervals: Vec<(String, Duration)> = self
            .sensors
            .iter()
            .map(|s| (s.name.clone(), s.interval()))
            .collect();
        Ok(Outcome::ok(self.config.summary(&intervals)))
    }
}

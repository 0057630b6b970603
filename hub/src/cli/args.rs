//! The `hub` command line: every subcommand, flag and help text (clap), and the parsers for
//! its values. `main.rs` runs what it describes.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "hub",
    version,
    about = "IoT telemetry and control hub",
    after_help = "Exit statuses: 0 ok; 1 command failed on the device (or was already finished when cancelled); \
2 bad invocation or unknown device; 3 nothing within --timeout; 4 queued, device offline; 5 expired or cancelled; \
69 hub unreachable or not running; 75 the hub's store is unavailable (retry later); 77 admin token refused.\n\n\
The client commands find a local hub through its data directory (--data-dir, default ./hub-data); set --api and \
--token (HUB_API, HUB_ADMIN_TOKEN) for a remote one."
)]
pub struct Cli {
    /// Configuration file (default: ./hub.toml when it exists).
    #[arg(
        long,
        global = true,
        env = "HUB_CONFIG",
        value_name = "FILE",
        hide_env_values = true
    )]
    pub config: Option<PathBuf>,
    /// Data directory (default: ./hub-data); the client commands find a local hub there.
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// `--api` before the subcommand, as the client commands also take it.
    #[arg(long, hide = true, value_name = "URL")]
    pub api: Option<String>,
    /// `--token` before the subcommand, as the client commands also take it.
    #[arg(long, hide = true, value_name = "TOKEN")]
    pub token: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

/// How a client command reaches the hub's admin API (flattened into each client command).
#[derive(Args, Clone, Default)]
pub struct HubApi {
    /// Admin API base URL of the hub, like http://127.0.0.1:8444 (default: the admin-url
    /// file the running hub keeps in its data directory).
    #[arg(
        long,
        global = true,
        env = "HUB_API",
        value_name = "URL",
        hide_env_values = true
    )]
    pub api: Option<String>,
    /// Admin token (default: the admin-token file in the data directory).
    #[arg(
        long,
        global = true,
        env = "HUB_ADMIN_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the hub: the wss device listener, the store, and the admin API.
    #[command(
        after_help = "Examples:\n  hub serve\n  hub serve --listen 0.0.0.0:8443 --data-dir /var/lib/hub\n  HUB_DEVICE__PING_INTERVAL=5s hub serve"
    )]
    Serve(ServeArgs),
    /// Issue or revoke device tokens.
    #[command(after_help = "Examples:\n  hub token issue sensor-17\n  hub token revoke sensor-17")]
    Token {
        #[command(flatten)]
        hub: HubApi,
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Print a one-time link that signs a browser in to the web console.
    #[command(
        after_help = "The console is served by the hub's admin listener at / (default http://127.0.0.1:8444/); \
it also accepts the admin token at its sign-in form. The link works once, within 10 minutes.\n\n\
Examples:\n  hub console\n  hub console --data-dir /var/lib/hub\n  ssh -L 8444:127.0.0.1:8444 hubhost   # then run `hub console` there and open the link here"
    )]
    Console {
        #[command(flatten)]
        hub: HubApi,
    },
    /// Check the configuration or print the defaults.
    #[command(
        subcommand,
        after_help = "Examples:\n  hub config check --config /etc/hub/hub.toml\n  hub config defaults > hub.toml"
    )]
    Config(ConfigCommand),
    /// List devices with presence, last seen, firmware and ping RTT; show one; wait for one.
    #[command(
        after_help = "Filters combine: every --tag must match, and at most one of --online, --offline, --never-connected.\n\nExamples:\n  hub devices\n  hub devices --tag site=b --online\n  hub devices --never-connected --json | jq -r '.[].id'\n  hub devices add sensor-17 --tag site=b --tag hw=rev2\n  hub devices add --from fleet.csv --out tokens.txt\n  hub devices tag sensor-17 floor=3 --remove hw\n  hub devices remove sensor-17 --purge\n  hub devices show sensor-17\n  hub devices wait sensor-17 --timeout 1m"
    )]
    Devices {
        #[command(flatten)]
        hub: HubApi,
        #[command(subcommand)]
        show: Option<DevicesCommand>,
        /// Print JSON instead of text.
        #[arg(long, global = true)]
        json: bool,
        /// Only devices with this tag (repeatable; all must match).
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
        /// Only devices connected now.
        #[arg(long, conflicts_with_all = ["offline", "never_connected"])]
        online: bool,
        /// Only devices not connected now (including never).
        #[arg(long, conflicts_with = "never_connected")]
        offline: bool,
        /// Only registered devices that never connected.
        #[arg(long)]
        never_connected: bool,
    },
    /// Desired state of devices (what they should be) against what they report.
    #[command(
        after_help = "Values are JSON (2, true, \"5s\", null deletes the key); text that is not JSON is a string.\n\nExamples:\n  hub state set sensor-17 interval=2 led=true\n  hub state set --tag site=b interval=10\n  hub state show sensor-17"
    )]
    State {
        #[command(flatten)]
        hub: HubApi,
        #[command(subcommand)]
        command: StateCommand,
    },
    /// A cluster's nodes (devices per node, heartbeat ages) and rebalancing.
    #[command(after_help = "Examples:\n  hub cluster status\n  hub cluster rebalance --dry-run")]
    Cluster {
        #[command(flatten)]
        hub: HubApi,
        #[command(subcommand)]
        command: super::cluster::ClusterCommand,
    },
    /// Firmware images: add (stored, hashed, signed), list, show, remove; the signing key.
    #[command(
        after_help = "Examples:\n  hub firmware add fw.bin --version 1.1\n  hub firmware list\n  hub firmware key"
    )]
    Firmware {
        #[command(flatten)]
        hub: HubApi,
        #[command(subcommand)]
        command: super::firmware::FirmwareCommand,
    },
    /// Staged firmware rollouts: canary devices first, then steps, within a failure budget.
    #[command(
        after_help = "Examples:\n  hub rollout start --firmware 1.1 --all --canary 10 --steps 50%,100%\n  hub rollout status 3\n  hub rollout abort 3"
    )]
    Rollout {
        #[command(flatten)]
        hub: HubApi,
        #[command(subcommand)]
        command: super::rollouts::RolloutCommand,
    },
    /// Send a command to a device and wait for its result, or to many devices as a job.
    #[command(
        after_help = "One device: hub send DEVICE_ID COMMAND. Exit statuses: 0 succeeded; 1 failed on the device; \
3 no result within --timeout; 4 queued because the device is offline (delivered when it reconnects, until --ttl); \
5 expired or cancelled; 2 bad invocation or unknown device.\n\n\
Many devices (a job): hub send --tag KEY=VALUE|--all|--devices FILE|--select SELECTOR COMMAND. The job creates one \
command per device at --rate, stops creating them once --abort-on-failure percent of the finished ones failed, and \
goes on in the hub if this command is interrupted (follow it with `hub jobs show JOB`). It prints a progress line \
on a terminal and a summary once nothing is left to happen but offline devices coming back. Exit statuses: 0 all \
succeeded; 1 some failed or the job was aborted; 4 some are queued for offline devices; 5 some expired or were \
cancelled.\n\n\
Examples:\n  hub send sensor-17 led --args '{\"on\": true}'\n  \
hub send sensor-17 reboot --timeout 2m --ttl 1d\n  hub send sensor-17 report-now --no-wait\n  \
hub send --tag site=b led --args '{\"on\": true}'\n  \
hub send --all reboot --rate 50/min --abort-on-failure 5\n  \
hub send --devices batch-7.txt set-interval --args '{\"seconds\": 60}' --json"
    )]
    Send(SendArgs),
    /// Show a device's command history with states and results, or cancel a command.
    #[command(
        after_help = "Exit statuses of `cancel`: 0 cancelled; 1 the command had already finished; 2 no such command.\n\n\
Examples:\n  hub commands sensor-17\n  hub commands sensor-17 --limit 5 --json\n  hub commands cancel 42"
    )]
    Commands(CommandsArgs),
    /// List jobs (one command over many devices, made by `hub send --tag ...`), show or cancel one.
    #[command(
        after_help = "Exit statuses of `cancel`: 0 cancelled; 1 it had already ended; 2 no such job.\n\n\
Examples:\n  hub jobs\n  hub jobs show 7 --wait\n  hub jobs cancel 7"
    )]
    Jobs(JobsArgs),
    /// Query stored telemetry: raw points or aggregated windows.
    #[command(
        after_help = "Windows are aligned to the Unix epoch (like InfluxDB's aggregateWindow).\n\nExamples:\n  \
hub query sensor-17 --since 10m\n  hub query sensor-17 --metric temperature --since 1d --every 1h --agg mean\n  \
hub query sensor-17 --from 2026-11-25T00:00:00Z --until 2026-11-25T06:00:00Z --format csv"
    )]
    Query(QueryArgs),
    /// Print live events (presence, commands, optionally readings), one per line, until Ctrl-C.
    #[command(
        after_help = "When the hub goes away (a restart, say), watch reconnects and resumes after the last event it \
printed; events the hub no longer knows are reported as missed. It gives up after --reconnect with exit status 69.\n\n\
Examples:\n  hub watch\n  hub watch sensor-17 --readings\n  hub watch --json | jq ."
    )]
    Watch {
        #[command(flatten)]
        hub: HubApi,
        /// Only this device (one that has connected before).
        #[arg(value_parser = device_id)]
        device_id: Option<String>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Include telemetry readings.
        #[arg(long)]
        readings: bool,
        /// How long to keep trying to reconnect when the hub goes away (0s: exit at once).
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
        reconnect: Duration,
    },
}

#[derive(Subcommand)]
pub enum DevicesCommand {
    /// Show one device in detail.
    #[command(
        after_help = "Examples:\n  hub devices show sensor-17\n  hub devices show sensor-17 --json | jq .state"
    )]
    Show {
        /// Device id.
        #[arg(value_parser = device_id)]
        device_id: String,
    },
    /// Wait until a device is online (for scripts: after starting a device, before sending it commands).
    #[command(
        after_help = "Exit statuses: 0 online; 3 not online within --timeout.\n\nExamples:\n  \
hub devices wait sensor-17 && hub send sensor-17 led --args '{\"on\": true}'\n  hub devices wait sensor-17 --timeout 5m"
    )]
    Wait {
        /// Device id (it may never have connected yet).
        #[arg(value_parser = device_id)]
        device_id: String,
        /// How long to wait.
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = positive_duration)]
        timeout: Duration,
    },
    /// Register a device before it exists (prints its token), or many from a CSV file
    /// (id, then KEY=VALUE tags; writes `ID TOKEN` lines, as `firmware-sim fleet --tokens`
    /// reads them). With --cert, each device also gets a client certificate, a second way
    /// in that needs no token.
    #[command(
        after_help = "Examples:\n  hub devices add sensor-17 --tag site=b\n  hub devices add sensor-17 --cert certs/\n  hub devices add --from fleet.csv --out tokens.txt\n  hub devices add --from fleet.csv --out tokens.txt --cert certs/\n\nfleet.csv:\n  id,tags...\n  dev-001,site=a,hw=rev1\n  dev-002,site=b\n\n--cert DIR writes DIR/ID.crt (ECDSA P-256, CN = the device id, clientAuth, signed by the hub's\ndevice CA), DIR/ID.key (mode 0600; made here, never sent to the hub) and DIR/ca.crt; the\ncertificate expires with --ttl. Revoking the device (hub token revoke, hub devices remove)\nrefuses its certificates too."
    )]
    Add {
        /// Device id (not with --from).
        #[arg(required_unless_present = "from", conflicts_with = "from")]
        device_id: Option<String>,
        /// A tag (repeatable).
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
        /// Register every device of this CSV file.
        #[arg(long, value_name = "FILE.csv")]
        from: Option<PathBuf>,
        /// With --from: write the `ID TOKEN` lines here instead of stdout.
        #[arg(long, value_name = "FILE", requires = "from")]
        out: Option<PathBuf>,
        /// Token (and certificate) lifetime.
        #[arg(long, value_name = "DURATION", default_value = "365d")]
        ttl: String,
        /// Also issue a client certificate per device into this directory (ID.crt, ID.key, ca.crt).
        #[arg(long, value_name = "DIR")]
        cert: Option<PathBuf>,
    },
    /// Remove a device: revoke its tokens, close its live session, cancel its open
    /// commands, forget it (its telemetry stays unless --purge).
    #[command(
        after_help = "Examples:\n  hub devices remove sensor-17\n  hub devices remove sensor-17 --purge"
    )]
    Remove {
        /// Device id.
        #[arg(value_parser = device_id)]
        device_id: String,
        /// Also delete its stored telemetry.
        #[arg(long)]
        purge: bool,
    },
    /// Set or remove a device's tags.
    #[command(
        after_help = "Examples:\n  hub devices tag sensor-17 site=b floor=3\n  hub devices tag sensor-17 --remove floor"
    )]
    Tag {
        /// Device id.
        #[arg(value_parser = device_id)]
        device_id: String,
        /// Tags to set.
        #[arg(value_name = "KEY=VALUE")]
        tags: Vec<String>,
        /// A tag key to remove (repeatable).
        #[arg(long = "remove", value_name = "KEY")]
        remove: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum StateCommand {
    /// Change desired state of one device, or of every device with the given tags.
    /// Exit 4: the device is offline and gets it when it connects.
    #[command(
        after_help = "Examples:\n  hub state set sensor-17 interval=2 led=true\n  hub state set sensor-17 mode=null\n  hub state set --tag site=b interval=10\n  hub state set --all interval=60"
    )]
    Set {
        /// DEVICE_ID then KEY=VALUE..., or only KEY=VALUE... with --tag or --all.
        #[arg(value_name = "DEVICE_ID|KEY=VALUE", required = true)]
        args: Vec<String>,
        /// Change every device with this tag (repeatable; all must match).
        #[arg(long = "tag", value_name = "KEY=VALUE")]
        tags: Vec<String>,
        /// Change every device.
        #[arg(long, conflicts_with = "tags")]
        all: bool,
    },
    /// Show desired and reported state, the pending delta, refusals and both versions.
    #[command(
        after_help = "Examples:\n  hub state show sensor-17\n  hub state show sensor-17 --json"
    )]
    Show {
        /// Device id.
        device_id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct SendArgs {
    #[command(flatten)]
    pub hub: HubApi,
    /// DEVICE_ID COMMAND for one device; COMMAND alone with --tag, --all, --devices or --select.
    #[arg(value_name = "DEVICE_ID COMMAND", num_args = 1..=2, required = true)]
    pub target: Vec<String>,
    /// Every device with this tag (repeatable: all must match); makes a job.
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    pub tags: Vec<String>,
    /// Every registered device; makes a job.
    #[arg(long, conflicts_with_all = ["tags", "devices", "select"])]
    pub all: bool,
    /// The devices listed in FILE, one id per line (`#` starts a comment); makes a job.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["tags", "select"])]
    pub devices: Option<PathBuf>,
    /// Devices by selector (like `site=b,online`; see `hub devices --help`); makes a job.
    #[arg(long, value_name = "SELECTOR", conflicts_with = "tags")]
    pub select: Option<String>,
    /// Arguments as a JSON document.
    #[arg(long, value_name = "JSON", default_value = "{}")]
    pub args: String,
    /// How long the device has to report a result once it has the command (more than 0).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = positive_duration)]
    pub timeout: Duration,
    /// How long the command waits for an offline device (more than 0).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = positive_duration)]
    pub ttl: Duration,
    /// Jobs: commands created per second (20, 20/s, 600/min); default as fast as the hub can.
    #[arg(long, value_name = "N/s")]
    pub rate: Option<String>,
    /// Jobs: stop creating commands once this percent of the finished ones failed.
    #[arg(long, value_name = "PCT")]
    pub abort_on_failure: Option<String>,
    /// Return as soon as the command (or job) is created (prints its id).
    #[arg(long)]
    pub no_wait: bool,
    /// Print the command (or job) record as JSON.
    #[arg(long)]
    pub json: bool,
}

impl SendArgs {
    /// Whether the flags ask for a job over many devices.
    pub fn is_job(&self) -> bool {
        !self.tags.is_empty() || self.all || self.devices.is_some() || self.select.is_some()
    }
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct JobsArgs {
    #[command(flatten)]
    pub hub: HubApi,
    #[command(subcommand)]
    pub action: Option<JobsCommand>,
    /// Most jobs listed, newest first.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum JobsCommand {
    /// A job's progress and the state of each of its devices.
    #[command(
        after_help = "Examples:\n  hub jobs show 7\n  hub jobs show 7 --wait\n  hub jobs show 7 --json"
    )]
    Show {
        /// Job id (printed by `hub send --tag ...`, listed by `hub jobs`).
        id: u64,
        /// Follow it with a progress line and the summary, as `hub send` does.
        #[arg(long)]
        wait: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a running job: it creates no more commands and its open ones are cancelled.
    #[command(
        after_help = "Exit statuses: 0 cancelled; 1 it had already ended; 2 no such job.\n\nExample:\n  hub jobs cancel 7"
    )]
    Cancel {
        /// Job id.
        id: u64,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct CommandsArgs {
    #[command(flatten)]
    pub hub: HubApi,
    #[command(subcommand)]
    pub action: Option<CommandsCommand>,
    /// Device id.
    #[arg(required = true, value_parser = device_id)]
    pub device_id: Option<String>,
    /// Most commands shown, newest first.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum CommandsCommand {
    /// Cancel a command that has not finished (queued, sent or acked).
    #[command(
        after_help = "Example:\n  ID=$(hub send sensor-17 reboot --no-wait); hub commands cancel \"$ID\""
    )]
    Cancel {
        /// Command id (printed by `hub send --no-wait`, listed by `hub commands DEVICE_ID`).
        id: u64,
    },
}

#[derive(Args)]
pub struct QueryArgs {
    #[command(flatten)]
    pub hub: HubApi,
    /// Device id.
    #[arg(value_parser = device_id)]
    pub device_id: String,
    /// Only this metric.
    #[arg(long)]
    pub metric: Option<String>,
    /// Range: the last DURATION (default 1h).
    #[arg(long, value_name = "DURATION", conflicts_with = "from", value_parser = parse_duration)]
    pub since: Option<Duration>,
    /// Range start: RFC 3339 time or ms since the epoch.
    #[arg(long, value_name = "TIME")]
    pub from: Option<String>,
    /// Range end (exclusive): RFC 3339 time or ms since the epoch (default now).
    #[arg(long, value_name = "TIME")]
    pub until: Option<String>,
    /// Aggregate into windows of this length.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub every: Option<Duration>,
    /// Aggregate function for --every (default mean).
    #[arg(long, value_name = "FN", requires = "every", value_parser = ["mean", "min", "max", "sum", "count", "last"])]
    pub agg: Option<String>,
    /// Most rows.
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    pub format: super::ops::Format,
}

pub fn parse_duration(raw: &str) -> Result<Duration, String> {
    humantime::parse_duration(raw)
        .map_err(|_| format!("`{raw}` is not a duration (examples: 500ms, 30s, 5m, 2h, 7d)"))
}

/// A duration longer than zero (a zero timeout or TTL would end a command before it began).
pub fn positive_duration(raw: &str) -> Result<Duration, String> {
    match parse_duration(raw)? {
        d if d.is_zero() => Err(format!(
            "`{raw}` is too short: give a duration longer than 0 (examples: 500ms, 30s, 5m)"
        )),
        d => Ok(d),
    }
}

/// A device id as every part of the hub accepts it.
pub fn device_id(raw: &str) -> Result<String, String> {
    if schemas::limits::is_valid_device_id(raw) {
        Ok(raw.to_string())
    } else {
        Err(format!(
            "invalid device id `{raw}`: use letters, digits, '_', '.', '-' (at most 64)"
        ))
    }
}

#[derive(Args)]
pub struct ServeArgs {
    /// Device listener address (config device.listen).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Admin API address (config admin.listen).
    #[arg(long, value_name = "ADDR")]
    pub api_listen: Option<String>,
    /// Serve plain ws (only behind a TLS-terminating proxy).
    #[arg(long)]
    pub plain_ws: bool,
    /// Log format: human or json (config log.format).
    #[arg(long, value_name = "FORMAT")]
    pub log_format: Option<String>,
}

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Print a new token for a device (and nothing else) on stdout.
    #[command(
        after_help = "Examples:\n  hub token issue sensor-17\n  hub token issue sensor-17 --ttl 90d > sensor-17.token"
    )]
    Issue {
        /// Device id: letters, digits, '_', '.', '-', at most 64.
        #[arg(value_parser = device_id)]
        device_id: String,
        /// How long the token is valid (e.g. 30d, 12h).
        #[arg(long, default_value = "365d", value_name = "DURATION")]
        ttl: String,
    },
    /// Revoke every token of a device issued until now; connected sessions are closed.
    #[command(after_help = "Example:\n  hub token revoke sensor-17 && hub token issue sensor-17")]
    Revoke {
        /// Device id.
        #[arg(value_parser = device_id)]
        device_id: String,
    },
}

#[derive(Subcommand)]
pub enum ConfigCommand {
    /// Validate the configuration (file, environment, flags); exit 2 naming every bad key.
    #[command(
        after_help = "Examples:\n  hub config check\n  HUB_DEVICE__PING_INTERVAL=5s hub config check --config hub.toml"
    )]
    Check,
    /// Print every key with its default and meaning, as TOML.
    #[command(after_help = "Example:\n  hub config defaults > hub.toml")]
    Defaults,
}

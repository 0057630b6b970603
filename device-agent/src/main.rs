//! The `device-agent` binary: `run` the agent, `check-config`, inspect the queue with
//! `status`, or try the sensors once with `sample`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use device_agent::config::{self, ConfigError, LogFormat, Sources};
use device_agent::queue::DiskQueue;

/// Exit status for an invalid configuration or command line.
const EXIT_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "device-agent",
    version,
    about = "Native Linux agent for the hub: system and custom sensors, safe actions, store and forward over wss"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Args)]
struct ConfigArg {
    /// Configuration file; DEVICE_AGENT_* variables override it (hub.token_file is
    /// DEVICE_AGENT_HUB__TOKEN_FILE).
    #[arg(
        long,
        short,
        env = "DEVICE_AGENT_CONFIG",
        default_value = "/etc/device-agent/agent.toml",
        value_name = "FILE"
    )]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent until SIGTERM or Ctrl-C.
    #[command(after_help = "Example:\n  device-agent run --config /etc/device-agent/agent.toml")]
    Run(ConfigArg),
    /// Validate the configuration, naming every problem; exit 2 if there is any.
    #[command(after_help = "Example:\n  device-agent check-config --config agent.toml")]
    CheckConfig(ConfigArg),
    /// Show the store-and-forward queue (works while the agent runs).
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Take one sample from every sensor and print it (nothing is sent or queued).
    Sample(ConfigArg),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            if let Some(e @ ConfigError::Invalid(_)) = err.downcast_ref::<ConfigError>() {
                eprintln!("error: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(arg: &ConfigArg) -> Result<config::Loaded, ConfigError> {
    config::load(&Sources {
        file: Some(arg.config.clone()),
        env: std::env::vars().collect(),
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    // Two workers are plenty for an agent and keep its footprint small on a Pi.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Cmd::CheckConfig(arg) => {
            let loaded = load(&arg)?;
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            let c = &loaded.config;
            println!(
                "{}: ok — device {} → {} ({}), {} sensor(s), {} action(s), queue in {}",
                arg.config.display(),
                c.hub.device_id,
                c.hub.url,
                c.hub.encoding.subprotocol(),
                c.sensors.len(),
                c.actions.len(),
                c.queue_dir().display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { config, json } => {
            let dir = config::queue_dir(&Sources {
                file: Some(config.config.clone()),
                env: std::env::vars().collect(),
            })?;
            let stats = DiskQueue::inspect(&dir)
                .with_context(|| format!("reading the queue in {}", dir.display()))?;
            if json {
                println!("{}", serde_json::to_string(&stats)?);
            } else {
                println!("queue:            {}", dir.display());
                println!(
                    "waiting batches:  {} ({} readings)",
                    stats.batches, stats.readings
                );
                println!("sequence numbers: {}..{}", stats.front_seq, stats.next_seq);
                println!(
                    "on disk:          {} bytes in {} segment(s)",
                    stats.bytes, stats.segments
                );
                println!(
                    "dropped readings: {} (queue full, since the queue was created)",
                    stats.dropped_readings
                );
                if stats.lost_batches > 0 {
                    println!(
                        "unreadable:       {} batch(es) (disk corruption)",
                        stats.lost_batches
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Sample(arg) => {
            let loaded = load(&arg)?;
            for w in &loaded.warnings {
                eprintln!("warning: {w}");
            }
            let rt = runtime()?;
            let mut failed = false;
            for sensor in &loaded.config.sensors {
                match rt.block_on(device_agent::sensors::sample_once(sensor)) {
                    Ok(values) => {
                        for (metric, value) in values {
                            println!("{:<12} {metric:<40} {value}", sensor.name);
                        }
                    }
                    Err(why) => {
                        failed = true;
                        eprintln!("{:<12} failed: {why}", sensor.name);
                    }
                }
            }
            Ok(if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
        Cmd::Run(arg) => {
            let loaded = load(&arg)?;
            init_logging(&loaded.config.log);
            for w in &loaded.warnings {
                tracing::warn!("config: {w}");
            }
            let rt = runtime()?;
            rt.block_on(device_agent::agent::run(loaded.config, shutdown_signal()))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn init_logging(log: &config::LogConfig) {
    // RUST_LOG, when set, wins over log.level (handy for a one-off debug run).
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| tracing_subscriber::EnvFilter::try_new(f).ok())
        .or_else(|| tracing_subscriber::EnvFilter::try_new(&log.level).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Without signal handlers the agent still runs; it just cannot stop cleanly.
            std::future::pending::<()>().await;
        }
    }
}

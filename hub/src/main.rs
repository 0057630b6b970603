//! The `hub` binary: `hub serve` runs the hub; the other subcommands are the operator CLI.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use hub::config::{ConfigError, HubConfig, LogFormat, Sources, KEYS};
use hub::datadir::DataDir;
use hub::store::meta::MetaStore;
use hub::store::now_ms;

/// Exit status for an invalid configuration or command line.
const EXIT_USAGE: u8 = 2;

#[derive(Parser)]
#[command(name = "hub", version, about = "IoT telemetry and control hub", long_about = None)]
struct Cli {
    /// Configuration file (default: ./hub.toml when it exists).
    #[arg(long, global = true, env = "HUB_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory (default: ./hub-data).
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the hub: the wss device listener, the store, and the admin API.
    #[command(
        after_help = "Examples:\n  hub serve\n  hub serve --listen 0.0.0.0:8443 --data-dir /var/lib/hub\n  HUB_DEVICE__PING_INTERVAL=5s hub serve"
    )]
    Serve(ServeArgs),
    /// Issue or revoke device tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Check the configuration or print the defaults.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Args)]
struct ServeArgs {
    /// Device listener address (config device.listen).
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Admin API address (config admin.listen).
    #[arg(long, value_name = "ADDR")]
    api_listen: Option<String>,
    /// Serve plain ws (only behind a TLS-terminating proxy).
    #[arg(long)]
    plain_ws: bool,
    /// Log format: human or json (config log.format).
    #[arg(long, value_name = "FORMAT")]
    log_format: Option<String>,
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Print a new token for a device (and nothing else) on stdout.
    #[command(
        after_help = "Examples:\n  hub token issue sensor-17\n  hub token issue sensor-17 --ttl 90d > sensor-17.token"
    )]
    Issue {
        /// Device id: letters, digits, '_', '.', '-', at most 64.
        device_id: String,
        /// How long the token is valid (e.g. 30d, 12h).
        #[arg(long, default_value = "365d", value_name = "DURATION")]
        ttl: String,
    },
    /// Revoke every token of a device issued until now; connected sessions are closed.
    #[command(after_help = "Example:\n  hub token revoke sensor-17 && hub token issue sensor-17")]
    Revoke {
        /// Device id.
        device_id: String,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the configuration (file, environment, flags); exit 2 naming every bad key.
    Check,
    /// Print every key with its default and meaning, as TOML.
    Defaults,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            if let Some(ConfigError::Invalid(_)) = err.downcast_ref::<ConfigError>() {
                eprintln!("error: {err}");
                return ExitCode::from(EXIT_USAGE);
            }
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(cli: &Cli, extra: Vec<(String, String)>) -> Result<HubConfig, ConfigError> {
    let mut overrides = extra;
    if let Some(dir) = &cli.data_dir {
        overrides.push(("data_dir".into(), dir.display().to_string()));
    }
    HubConfig::load(&Sources {
        file: cli.config.clone(),
        env: std::env::vars().collect(),
        overrides,
    })
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Serve(args) => {
            let mut extra = Vec::new();
            if let Some(v) = &args.listen {
                extra.push(("device.listen".into(), v.clone()));
            }
            if let Some(v) = &args.api_listen {
                extra.push(("admin.listen".into(), v.clone()));
            }
            if args.plain_ws {
                extra.push(("device.plain_ws".into(), "true".into()));
            }
            if let Some(v) = &args.log_format {
                extra.push(("log.format".into(), v.clone()));
            }
            let config = load_config(&cli, extra)?;
            init_logging(&config);
            let runtime =
                tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
            runtime.block_on(serve(config))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(TokenCommand::Issue { device_id, ttl }) => {
            let config = load_config(&cli, Vec::new())?;
            if !schemas::limits::is_valid_device_id(device_id) {
                anyhow::bail!("invalid device id `{device_id}`: use letters, digits, '_', '.', '-' (at most 64)");
            }
            let ttl = humantime::parse_duration(ttl)
                .with_context(|| format!("invalid --ttl `{ttl}` (examples: 30d, 12h)"))?;
            let data = DataDir::new(&config.data_dir);
            let secret = data.read_token_secret().with_context(|| {
                format!(
                    "no token secret in {}: run `hub serve` once to create it, or pass --data-dir",
                    config.data_dir.display()
                )
            })?;
            println!(
                "{}",
                hub::token::issue(&secret, device_id, now_ms(), ttl.as_secs())
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(TokenCommand::Revoke { device_id }) => {
            let config = load_config(&cli, Vec::new())?;
            let data = DataDir::new(&config.data_dir);
            if !data.database().exists() {
                anyhow::bail!(
                    "no hub database in {}: pass the hub's --data-dir",
                    config.data_dir.display()
                );
            }
            let meta = MetaStore::open(&data.database(), config.synchronous)?;
            meta.revoke(device_id, now_ms())?;
            eprintln!("revoked every token of {device_id} issued until now; a running hub closes its session within 1 s");
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::Check) => {
            let config = load_config(&cli, Vec::new())?;
            println!(
                "configuration is valid (data dir {})",
                config.data_dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::Defaults) => {
            let mut section = "";
            for (key, default, help) in KEYS {
                let (sec, name) = key.rsplit_once('.').unwrap_or(("", key));
                if sec != section {
                    println!("\n[{sec}]");
                    section = sec;
                }
                println!("# {help}");
                println!("{name} = {}", toml_value(default));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn toml_value(default: &str) -> String {
    if default == "true" || default == "false" || default.parse::<u64>().is_ok() {
        default.to_string()
    } else {
        format!("\"{default}\"")
    }
}

fn init_logging(config: &HubConfig) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

async fn serve(config: HubConfig) -> anyhow::Result<()> {
    let data_dir = config.data_dir.clone();
    let hub = hub::server::start(config).await?;
    let info = &hub.info;
    if !info.created.is_empty() {
        println!("hub: initialised data directory {}", data_dir.display());
    }
    println!("hub: devices connect to {}", info.device_url);
    if let Some(ca) = &info.ca_file {
        println!(
            "hub: devices must trust the CA certificate {}",
            ca.display()
        );
    }
    println!(
        "hub: issue a device token with: hub token issue DEVICE_ID --data-dir {}",
        data_dir.display()
    );
    wait_for_signal().await;
    tracing::info!("shutting down: closing devices with 1001 and flushing the writer");
    hub.shutdown();
    hub.wait().await;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

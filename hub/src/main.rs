//! The `hub` binary: `hub serve` runs the hub; the other subcommands are the operator CLI.

#[macro_use]
mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use cli::args::*;
use cli::{ApiClient, CliError};
use hub::config::{ConfigError, HubConfig, LogFormat, Sources, KEYS};
use hub::datadir::DataDir;
use hub::store::meta::MetaStore;
use hub::store::now_ms;
use hub::store::DeviceRegistry;

/// The hub's allocator. A hub holds many long-lived connections whose TLS handshakes
/// allocate and free large temporaries in between; glibc's malloc keeps the pages those
/// leave behind (33 KB of RSS per idle device against about 14 KB of heap, in the density
/// bench), while jemalloc's size classes and its background threads, which return
/// unused dirty pages to the system within seconds, keep the RSS close to the heap.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit status for an invalid configuration or command line.
const EXIT_USAGE: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            // Bad input (configuration, arguments) is exit status 2, as documented.
            if err.downcast_ref::<ConfigError>().is_some() || err.downcast_ref::<Usage>().is_some()
            {
                eprintln!("error: {err}");
                return ExitCode::from(EXIT_USAGE);
            }
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// A mistake in the invocation (exit status 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

/// The admin API settings of a client command: the same flags given before the
/// subcommand win over the command's own (given or from the environment).
fn merged(cli: &Cli, hub: &HubApi) -> HubApi {
    HubApi {
        api: cli.api.clone().or_else(|| hub.api.clone()),
        token: cli.token.clone().or_else(|| hub.token.clone()),
    }
}

/// Runs the admin-API client commands; `None` for the others.
fn run_client(cli: &Cli) -> Option<ExitCode> {
    let hub = match &cli.command {
        Command::Devices { hub, .. }
        | Command::State { hub, .. }
        | Command::Cluster { hub, .. }
        | Command::Firmware { hub, .. }
        | Command::Rollout { hub, .. }
        | Command::Send(SendArgs { hub, .. })
        | Command::Jobs(JobsArgs { hub, .. })
        | Command::Commands(CommandsArgs { hub, .. })
        | Command::Query(QueryArgs { hub, .. })
        | Command::Watch { hub, .. }
        | Command::Console { hub } => merged(cli, hub),
        _ => return None,
    };
    // The configuration (file, environment) may name the data dir and the admin token;
    // an invalid one is not fatal here, since only those two keys matter to a client.
    let config = load_config(cli, Vec::new()).ok();
    let data_dir = cli
        .data_dir
        .clone()
        .or_else(|| config.as_ref().map(|c| c.data_dir.clone()))
        .unwrap_or_else(|| PathBuf::from("hub-data"));
    let token = hub
        .token
        .clone()
        .or_else(|| config.as_ref().and_then(|c| c.admin_token.clone()));
    let client = || ApiClient::discover(hub.api.as_deref(), token.as_deref(), &data_dir);
    let result: Result<u8, CliError> = match &cli.command {
        Command::Devices {
            show: None,
            json,
            tags,
            online,
            offline,
            never_connected,
            ..
        } => devices_selector(tags, *online, *offline, *never_connected)
            .and_then(|select| client().and_then(|api| cli::ops::devices(&api, &select, *json))),
        Command::Devices {
            show: Some(DevicesCommand::Show { device_id }),
            json,
            ..
        } => client().and_then(|api| cli::ops::device_show(&api, device_id, *json)),
        Command::Devices {
            show: Some(DevicesCommand::Wait { device_id, timeout }),
            json,
            ..
        } => client().and_then(|api| cli::ops::device_wait(&api, device_id, *timeout, *json)),
        Command::Devices {
            show:
                Some(DevicesCommand::Add {
                    device_id,
                    tags,
                    from,
                    out,
                    ttl,
                    cert,
                }),
            ..
        } => client().and_then(|api| match (device_id, from) {
            (_, Some(file)) => {
                cli::fleet::add_from(&api, file, out.as_deref(), ttl, cert.as_deref())
            }
            (Some(id), None) => cli::fleet::add(&api, id, tags, ttl, cert.as_deref()),
            (None, None) => Err(CliError::Usage(
                "give a device id or --from FILE.csv".into(),
            )),
        }),
        Command::Devices {
            show: Some(DevicesCommand::Remove { device_id, purge }),
            ..
        } => client().and_then(|api| cli::fleet::remove(&api, device_id, *purge)),
        Command::Devices {
            show:
                Some(DevicesCommand::Tag {
                    device_id,
                    tags,
                    remove,
                }),
            json,
            ..
        } => client().and_then(|api| cli::fleet::tag(&api, device_id, tags, remove, *json)),
        Command::State {
            command: StateCommand::Set { args, tags, all },
            ..
        } => {
            let selector = if *all {
                Some("all".to_string())
            } else if tags.is_empty() {
                None
            } else {
                devices_selector(tags, false, false, false).ok()
            };
            client().and_then(|api| match selector {
                Some(select) => cli::fleet::state_set(&api, None, Some(&select), args),
                None => match args.split_first() {
                    Some((id, assignments)) => {
                        cli::fleet::state_set(&api, Some(id), None, assignments)
                    }
                    None => Err(CliError::Usage("give a device id and KEY=VALUE".into())),
                },
            })
        }
        Command::State {
            command: StateCommand::Show { device_id, json },
            ..
        } => {
            client().and_then(|api| cli::fleet::state_show(&api, device_id, *json))
        }
        Command::Cluster { command, .. } => client().and_then(|api| cli::cluster::run(&api, command)),
        Command::Console { .. } => client().and_then(|api| cli::console::run(&api)),
        Command::Firmware { command, .. } => {
            client().and_then(|api| cli::firmware::run(&api, command))
        }
        Command::Rollout { command, .. } => {
            client().and_then(|api| cli::rollouts::run(&api, command))
        }
        Command::Send(send) => match serde_json::from_str::<serde_json::Value>(&send.args) {
            Err(e) => Err(CliError::Usage(format!(
                "--args is not valid JSON ({e}); example: --args '{{\"on\": true}}'"
            ))),
            Ok(args) => send_command(&client, send, args),
        },
        Command::Jobs(JobsArgs {
            action: None,
            limit,
            json,
            ..
        }) => client().and_then(|api| cli::jobs::list(&api, *limit, *json)),
        Command::Jobs(JobsArgs {
            action: Some(JobsCommand::Show { id, wait: true, json }),
            ..
        }) => cli::jobs::follow(&client, *id, *json),
        Command::Jobs(JobsArgs {
            action: Some(JobsCommand::Show { id, wait: false, json }),
            ..
        }) => client().and_then(|api| cli::jobs::show(&api, *id, *json)),
        Command::Jobs(JobsArgs {
            action: Some(JobsCommand::Cancel { id }),
            ..
        }) => client().and_then(|api| cli::jobs::cancel(&api, *id)),
        Command::Commands(CommandsArgs {
            action: Some(CommandsCommand::Cancel { id }),
            ..
        }) => client().and_then(|api| cli::ops::cancel(&api, *id)),
        Command::Commands(CommandsArgs {
            device_id,
            limit,
            json,
            ..
        }) => match device_id {
            Some(device) => client().and_then(|api| cli::ops::commands(&api, device, *limit, *json)),
            None => Err(CliError::Usage(
                "give a device id (hub commands DEVICE_ID) or a subcommand (hub commands cancel ID)".into(),
            )),
        },
        Command::Query(q) => {
            let mut params: Vec<(&str, String)> = vec![("limit", q.limit.to_string())];
            if let Some(m) = &q.metric {
                params.push(("metric", m.clone()));
            }
            match (&q.since, &q.from) {
                (Some(since), _) => params.push(("since", format!("{}ms", since.as_millis()))),
                (None, Some(from)) => params.push(("from", from.clone())),
                (None, None) => params.push(("since", "1h".into())),
            }
            if let Some(u) = &q.until {
                params.push(("until", u.clone()));
            }
            if let Some(e) = &q.every {
                params.push(("every", format!("{}ms", e.as_millis())));
                params.push(("agg", q.agg.clone().unwrap_or_else(|| "mean".into())));
            }
            client().and_then(|api| cli::ops::query(&api, &q.device_id, &params, q.format))
        }
        Command::Watch {
            device_id,
            json,
            readings,
            reconnect,
            ..
        } => cli::ops::watch(
            &client,
            &cli::ops::Watch {
                device: device_id.as_deref(),
                json: *json,
                readings: *readings,
                reconnect: *reconnect,
            },
        ),
        _ => return None,
    };
    Some(match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            match &err {
                CliError::Outcome(_, msg) => eprintln!("{msg}"),
                other => eprintln!("error: {other}"),
            }
            ExitCode::from(err.exit_code())
        }
    })
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
    if matches!(cli.command, Command::Serve(_) | Command::Config(_))
        && (cli.api.is_some() || cli.token.is_some())
    {
        return Err(Usage(
            "--api and --token are for the client commands (devices, send, query...), not for `serve` or `config`"
                .to_string(),
        )
        .into());
    }
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
            let json_logs = config.log_format == LogFormat::Json;
            // Blocking work (store calls) waits on the store's locks, so threads beyond a
            // few dozen only wait too; tokio's default of 512 let a connect storm start
            // hundreds, each with its stack and allocator cache.
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .max_blocking_threads(64)
                .build()
                .context("cannot start the async runtime")?;
            match runtime.block_on(serve(config)) {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(err) if json_logs => {
                    // With JSON logs, why the hub could not run is a JSON line too.
                    tracing::error!(error = format!("{err:#}"), "the hub stopped");
                    Ok(ExitCode::FAILURE)
                }
                Err(err) => Err(err),
            }
        }
        Command::Token {
            hub,
            command: TokenCommand::Issue { device_id, ttl },
        } => {
            let hub = merged(&cli, hub);
            let config = load_config(&cli, Vec::new())?;
            let ttl = match humantime::parse_duration(ttl) {
                Ok(ttl) if ttl >= std::time::Duration::from_secs(1) => ttl,
                Ok(_) => {
                    return Err(Usage(format!(
                        "--ttl `{ttl}` is too short: a token must live at least 1s"
                    ))
                    .into())
                }
                Err(_) => {
                    return Err(Usage(format!(
                        "`{ttl}` is not a duration for --ttl (examples: 30d, 12h)"
                    ))
                    .into())
                }
            };
            let data = DataDir::new(&config.data_dir);
            let configured = config
                .token_secret
                .as_deref()
                .and_then(hub::token::TokenSecret::from_hex);
            let secret = configured.or_else(|| data.read_token_secret().ok());
            let token = hub.token.clone().or_else(|| config.admin_token.clone());
            // A running hub issues it and registers the device (in a cluster, for every
            // node); without one, the secret here signs it and the local store registers it.
            let discovered =
                ApiClient::discover(hub.api.as_deref(), token.as_deref(), &config.data_dir);
            let running = discovered
                .as_ref()
                .ok()
                .filter(|api| api.get("/healthz").is_ok());
            if let (Some(secret), None) = (&secret, running) {
                if data.database().exists() {
                    let meta = MetaStore::open(&data.database(), config.sqlite)?;
                    meta.register(&[(device_id.clone(), Default::default())], now_ms())?;
                }
                emit!(
                    "{}",
                    hub::token::issue(secret, device_id, now_ms(), ttl.as_secs())
                );
                return Ok(ExitCode::SUCCESS);
            }
            let api = discovered.map_err(|_| {
                Usage(format!(
                    "no token secret here (neither auth.token_secret nor {}) and no running hub to ask: \
                     run `hub serve` once with this --data-dir, set HUB_AUTH__TOKEN_SECRET as the hub has it, \
                     or pass --api URL --token ADMIN_TOKEN",
                    data.token_secret().display()
                ))
            })?;
            let body =
                serde_json::json!({ "device_id": device_id, "ttl": format!("{}s", ttl.as_secs()) });
            match api.post("/api/v1/tokens", &body) {
                Ok(v) => match v["token"].as_str() {
                    Some(token) => {
                        emit!("{token}");
                        Ok(ExitCode::SUCCESS)
                    }
                    None => anyhow::bail!("the hub answered without a token: {v}"),
                },
                Err(err) => {
                    eprintln!("error: {err}");
                    Ok(ExitCode::from(err.exit_code()))
                }
            }
        }
        Command::Token {
            hub,
            command: TokenCommand::Revoke { device_id },
        } => {
            let hub = merged(&cli, hub);
            let config = load_config(&cli, Vec::new())?;
            // A running hub (or, in a cluster, any node) applies it at once and to every
            // node; without one, the local store takes it and the hub reads it at start.
            let token = hub.token.clone().or_else(|| config.admin_token.clone());
            if let Ok(api) =
                ApiClient::discover(hub.api.as_deref(), token.as_deref(), &config.data_dir)
            {
                let body = serde_json::json!({ "device_id": device_id });
                match api.post("/api/v1/tokens/revoke", &body) {
                    Ok(_) => {
                        eprintln!("revoked every token of {device_id} issued until now; a live session of it is closed");
                        return Ok(ExitCode::SUCCESS);
                    }
                    Err(err @ CliError::Unreachable { .. }) if hub.api.is_none() => {
                        tracing::debug!(error = %err, "no running hub; revoking in the local store");
                    }
                    Err(err) => {
                        eprintln!("error: {err}");
                        return Ok(ExitCode::from(err.exit_code()));
                    }
                }
            }
            let data = DataDir::new(&config.data_dir);
            if !data.database().exists() {
                return Err(Usage(format!(
                    "no running hub and no hub database in {}: pass the hub's --data-dir or --api",
                    config.data_dir.display()
                ))
                .into());
            }
            let meta = MetaStore::open(&data.database(), config.sqlite)?;
            meta.revoke(device_id, now_ms())?;
            eprintln!("revoked every token of {device_id} issued until now (in {}); the hub applies it within 1 s", data.database().display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::Check) => {
            let config = load_config(&cli, Vec::new())?;
            emit!(
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
                    emit!("\n[{sec}]");
                    section = sec;
                }
                emit!("# {help}");
                emit!("{name} = {}", toml_value(default));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Devices { .. }
        | Command::State { .. }
        | Command::Cluster { .. }
        | Command::Firmware { .. }
        | Command::Rollout { .. }
        | Command::Send(_)
        | Command::Jobs(_)
        | Command::Commands(_)
        | Command::Query(_)
        | Command::Watch { .. }
        | Command::Console { .. } => Ok(run_client(&cli).unwrap_or(ExitCode::from(EXIT_USAGE))),
    }
}

/// The selector the `hub devices` filters make (`site=b,online`).
/// `hub send`: one device, or a job when a selection flag is given.
fn send_command(
    client: &dyn Fn() -> Result<ApiClient, CliError>,
    send: &SendArgs,
    args: serde_json::Value,
) -> Result<u8, CliError> {
    if !send.is_job() {
        let [device, command] = send.target.as_slice() else {
            return Err(CliError::Usage(
                "give DEVICE_ID COMMAND, or COMMAND with --tag, --all, --devices or --select for many devices".into(),
            ));
        };
        let device = cli::args::device_id(device).map_err(CliError::Usage)?;
        return client().and_then(|api| {
            cli::ops::send(
                &api,
                &cli::ops::Send {
                    device: &device,
                    command,
                    args,
                    timeout: send.timeout,
                    ttl: send.ttl,
                    no_wait: send.no_wait,
                    json: send.json,
                },
            )
        });
    }
    let [command] = send.target.as_slice() else {
        return Err(CliError::Usage(format!(
            "with --tag, --all, --devices or --select give only the command (got `{}`); the flags say which devices",
            send.target.join(" ")
        )));
    };
    let targets = if let Some(path) = &send.devices {
        ("devices", serde_json::json!(cli::jobs::device_file(path)?))
    } else if send.all {
        ("select", serde_json::json!("all"))
    } else {
        let mut terms = devices_selector(&send.tags, false, false, false)?;
        if let Some(select) = &send.select {
            if !terms.is_empty() {
                terms.push(',');
            }
            terms.push_str(select);
        }
        ("select", serde_json::json!(terms))
    };
    cli::jobs::send(
        client,
        &cli::jobs::NewJob {
            command,
            args,
            targets,
            timeout: send.timeout,
            ttl: send.ttl,
            rate: send.rate.as_deref(),
            abort_on_failure: send.abort_on_failure.as_deref(),
            no_wait: send.no_wait,
            json: send.json,
        },
    )
}

fn devices_selector(
    tags: &[String],
    online: bool,
    offline: bool,
    never_connected: bool,
) -> Result<String, CliError> {
    let mut terms = Vec::new();
    for tag in tags {
        let (k, v) = hub::selector::parse_tag(tag)
            .map_err(|e| CliError::Usage(format!("--tag {tag}: {e}")))?;
        terms.push(format!("{k}={v}"));
    }
    for (flag, word) in [
        (online, "online"),
        (offline, "offline"),
        (never_connected, "never-connected"),
    ] {
        if flag {
            terms.push(word.to_string());
        }
    }
    Ok(terms.join(","))
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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

async fn serve(config: HubConfig) -> anyhow::Result<()> {
    let data_dir = config.data_dir.clone();
    let admin_configured = config.admin_token.is_some();
    let secret_configured = config.token_secret.is_some();
    let json_logs = config.log_format == LogFormat::Json;
    let hub = hub::server::start(config).await?;
    let info = &hub.info;
    if json_logs {
        // Log shippers read one JSON object per line: the banner is a log event too.
        tracing::info!(
            device_url = %info.device_url,
            admin_url = %info.admin_url,
            ca_file = info.ca_file.as_ref().map(|f| f.display().to_string()),
            data_dir = %data_dir.display(),
            initialised = !info.created.is_empty(),
            "hub started"
        );
    } else {
        print_banner(info, &data_dir, admin_configured, secret_configured);
    }
    tokio::select! {
        _ = wait_for_signal() => {
            tracing::info!("shutting down: closing devices with 1001 and flushing the writer");
            hub.shutdown();
        }
        _ = hub.stopping() => {}
    }
    hub.wait().await?;
    tracing::info!("stopped");
    Ok(())
}

/// What a person starting the hub needs to know: where devices connect, where the admin
/// API is, which CA devices trust, and how to issue a token.
fn print_banner(
    info: &hub::server::HubInfo,
    data_dir: &std::path::Path,
    admin_configured: bool,
    secret_configured: bool,
) {
    if !info.created.is_empty() {
        emit!("hub: initialised data directory {}", data_dir.display());
    }
    emit!("hub: devices connect to {}", info.device_url);
    if admin_configured {
        emit!(
            "hub: admin API at {} (admin token: auth.admin_token from the configuration)",
            info.admin_url
        );
    } else {
        emit!(
            "hub: admin API at {} (token in {}/admin-token)",
            info.admin_url,
            data_dir.display()
        );
    }
    if let Some(ca) = &info.ca_file {
        emit!(
            "hub: devices must trust the CA certificate {}",
            ca.display()
        );
    }
    if secret_configured {
        emit!(
            "hub: issue a device token with: hub token issue DEVICE_ID --data-dir {} \
             (with auth.admin_token or auth.token_secret in that shell's configuration)",
            data_dir.display()
        );
    } else {
        emit!(
            "hub: issue a device token with: hub token issue DEVICE_ID --data-dir {}",
            data_dir.display()
        );
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("hub").chain(args.iter().copied()))
    }

    fn help(subcommand: &[&str]) -> String {
        let mut cmd = Cli::command();
        cmd.build();
        let mut at = &mut cmd;
        for name in subcommand {
            at = at.find_subcommand_mut(name).expect("subcommand");
        }
        at.render_long_help().to_string()
    }

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_work_after_the_subcommand() {
        for args in [
            &["devices", "show", "sensor-17", "--json"][..],
            &["devices", "--json", "show", "sensor-17"],
            &[
                "devices",
                "show",
                "sensor-17",
                "--api",
                "http://h:1",
                "--data-dir",
                "d",
            ],
            &["commands", "cancel", "42", "--api", "http://h:1"],
            &["commands", "sensor-17", "--json", "--token", "t"],
            &["token", "issue", "sensor-17", "--api", "http://h:1"],
        ] {
            parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        }
        let cli = parse(&["devices", "show", "s", "--json"]).expect("valid");
        assert!(matches!(cli.command, Command::Devices { json: true, .. }));
        // The form of earlier versions, before the subcommand, still works.
        let cli = parse(&["--api", "http://h:1", "devices"]).expect("valid");
        let Command::Devices { hub, .. } = &cli.command else {
            panic!("devices")
        };
        assert_eq!(merged(&cli, hub).api.as_deref(), Some("http://h:1"));
    }

    #[test]
    fn zero_durations_and_bad_device_ids_are_refused_by_the_parser() {
        for args in [
            &["send", "s", "led", "--ttl", "0"][..],
            &["send", "s", "led", "--timeout", "0s"],
            &["devices", "wait", "s", "--timeout", "0ms"],
        ] {
            let err = parse(args)
                .err()
                .unwrap_or_else(|| panic!("{args:?} accepted"));
            assert_eq!(err.kind(), ErrorKind::ValueValidation, "{args:?}");
            assert_eq!(err.exit_code(), 2);
            assert!(err.to_string().contains("longer than 0"), "{err}");
        }
        // `hub send`'s first argument is a device only without a selection flag, so it is
        // checked after parsing (tests/tests/jobs.rs).
        for args in [
            &["query", "bad id!"][..],
            &["watch", "bad id!"],
            &["token", "issue", "bad id!"],
            &["devices", "show", "a/b"],
        ] {
            let err = parse(args)
                .err()
                .unwrap_or_else(|| panic!("{args:?} accepted"));
            assert!(err.to_string().contains("invalid device id"), "{err}");
            assert_eq!(err.exit_code(), 2);
        }
    }

    #[test]
    fn only_client_commands_list_the_api_flags_and_no_environment_value_shows() {
        for sub in [
            &["serve"][..],
            &["config", "check"],
            &["config", "defaults"],
        ] {
            let text = help(sub);
            assert!(!text.contains("--api <URL>"), "{sub:?}:\n{text}");
            assert!(!text.contains("--token <TOKEN>"), "{sub:?}:\n{text}");
        }
        for sub in [
            &["devices"][..],
            &["devices", "show"],
            &["send"],
            &["commands"],
            &["commands", "cancel"],
            &["query"],
            &["watch"],
            &["token", "issue"],
        ] {
            let text = help(sub);
            assert!(text.contains("--api <URL>"), "{sub:?}:\n{text}");
            assert!(text.contains("[env: HUB_API]"), "{sub:?}:\n{text}");
            assert!(!text.contains("HUB_API="), "{sub:?}:\n{text}");
        }
    }
}

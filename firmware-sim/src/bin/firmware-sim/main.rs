//! `firmware-sim`: provisions simulated boards (`flash`), boots them from their images
//! (`run`), rehearses a whole fleet in one process (`fleet`), and shows what an image
//! holds (`inspect`). Every device runs the no_std firmware client library unchanged, over
//! tokio + rustls adapted to `embedded-io-async`.

mod device;
mod fleet;
mod image;
mod latency;
mod net;
mod partition;
mod run;
mod sim;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use clap::{Args, Parser, Subcommand};
use firmware_sim::ring::{RingOutbox, MIN_CAPACITY};
use firmware_sim::{Endpoint, RamFlash};
use schemas::session::Outbox;

use crate::image::{ClientCertPem, Image, ImageError, Provisioning};
use crate::sim::SensorSet;

/// Exit status for bad input: arguments, images, files.
const EXIT_USAGE: u8 = 2;
/// The firmware version devices report.
pub const FIRMWARE: &str = concat!("firmware-sim ", env!("CARGO_PKG_VERSION"));

#[derive(Parser)]
#[command(name = "firmware-sim", version, about = "Simulated no_std firmware: flash images, boot them, rehearse a fleet", long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a provisioning image: identity, hub, token or client certificate, CA, sensors,
    /// and empty device state.
    #[command(
        after_help = "Examples:\n  firmware-sim flash --out sim-1.img --device sim-1 \\\n    --hub wss://127.0.0.1:8443/v1/device --token \"$(hub token issue sim-1)\" --ca hub-data/tls/ca.pem\n  hub devices add sim-2 --cert certs/ && firmware-sim flash --out sim-2.img --device sim-2 \\\n    --hub wss://127.0.0.1:8443/v1/device --cert certs/sim-2.crt --key certs/sim-2.key --ca hub-data/tls/ca.pem\n\nExit statuses: 0 the image was written; 2 bad arguments or input (an invalid option, an\nunreadable or unusable token or CA file, an existing image without --force, an --out that\ncannot be written)."
    )]
    Flash(FlashArgs),
    /// Boot devices from images; their state (sequence number, unacknowledged readings) is
    /// written back to the images as it changes.
    #[command(
        after_help = "Stop with Ctrl-C (or SIGTERM): devices stop sampling, deliver what is unacknowledged\n(up to --drain-timeout), and close. Events go to stderr, or to stdout as JSON lines with --json.\n\nExit statuses: 0 stopped; 1 a device failed (its image could not be written back, say),\ndid not stop in time, or never connected because the TLS handshake failed; 2 bad arguments or an image that cannot be used (empty, damaged,\nanother format version)."
    )]
    Run(run::RunArgs),
    /// Provision and run N devices (sim-00001, ...) in one process against a hub.
    #[command(
        after_help = "Examples:\n  firmware-sim fleet --count 1000 --data-dir hub-data\n  firmware-sim fleet --count 50 --hub wss://127.0.0.1:8443/v1/device --ca ca.pem --tokens tokens.txt --duration 60s --json\n  firmware-sim fleet --count 10000 --data-dir hub-data --commands 50/s --duration 2m --json   # size a hub: connect rate, ack and command round-trip percentiles\n  firmware-sim fleet --count 19000 --data-dir hub-data --ifaddr 127.0.0.1,127.0.0.2,127.0.0.3,127.0.0.4   # many devices from one machine: spread over loopback source addresses\n\nExit statuses: 0 stopped; 1 a device failed, a device never connected because the TLS\nhandshake failed (the summary says why), or the admin API could not issue tokens; 2 bad\narguments or input (an unreadable CA, tokens file or --data-dir file)."
    )]
    Fleet(fleet::FleetArgs),
    /// Show what an image holds (the token is shortened).
    #[command(
        after_help = "Exit statuses: 0 shown; 2 bad arguments or an image that cannot be used (empty, damaged,\nanother format version)."
    )]
    Inspect {
        /// The image.
        image: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct FlashArgs {
    /// Image file to write.
    #[arg(long, value_name = "IMAGE")]
    out: PathBuf,
    /// Device id: letters, digits, '_', '.', '-', at most 64.
    #[arg(long, value_name = "DEVICE_ID")]
    device: String,
    /// Hub device URL, e.g. wss://127.0.0.1:8443/v1/device.
    #[arg(long, value_name = "URL")]
    hub: String,
    /// Device token (from `hub token issue DEVICE_ID`); not needed with --cert.
    #[arg(
        long,
        value_name = "TOKEN",
        conflicts_with = "token_file",
        required_unless_present_any = ["token_file", "cert"]
    )]
    token: Option<String>,
    /// Read the token from a file instead.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) to trust for wss, e.g. the hub's hub-data/tls/ca.pem.
    #[arg(long, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// Client certificate (PEM) the device presents in TLS, from `hub devices add ID --cert DIR`
    /// (DIR/ID.crt); stored in the image with its key.
    #[arg(long, value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// The client certificate's private key (DIR/ID.key).
    #[arg(long, value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// Sample interval.
    #[arg(long, default_value = "10s", value_name = "DURATION")]
    interval: String,
    /// Sensors to report, comma-separated: temperature, humidity, battery, counter, led,
    /// relay, setpoint, or all.
    #[arg(
        long,
        default_value = "all",
        value_delimiter = ',',
        value_name = "LIST"
    )]
    sensors: Vec<String>,
    /// Size of the device's flash region for unacknowledged readings (bytes).
    #[arg(long, default_value_t = 16384, value_name = "BYTES")]
    ring_bytes: usize,
    /// Overwrite an existing image (its unacknowledged readings are lost).
    #[arg(long)]
    force: bool,
    /// The firmware version the device starts with (reported in `hello`).
    #[arg(long, value_name = "VERSION")]
    firmware: Option<String>,
    /// Take firmware updates signed with this Ed25519 public key (64 hex digits, from
    /// `hub firmware key`): writes the firmware partition IMAGE.fw (two slots, the
    /// factory image of the firmware version in the first) and the device announces the
    /// `firmware` capability.
    #[arg(long, value_name = "HEX")]
    update_key: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Flash(args) => flash(args),
        Command::Run(args) => run::run(args),
        Command::Fleet(args) => fleet::fleet(args),
        Command::Inspect { image, json } => inspect(&image, json),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(exit_status(&err))
        }
    }
}

/// The exit status for a failed command: 2 for bad input (arguments, images, files named
/// on the command line), 1 for anything else.
fn exit_status(err: &anyhow::Error) -> u8 {
    if err.downcast_ref::<ImageError>().is_some() || err.downcast_ref::<UsageError>().is_some() {
        EXIT_USAGE
    } else {
        1
    }
}

/// Bad input from the command line or a file: exit status 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Fails with a [`UsageError`].
pub fn usage<T>(msg: impl Into<String>) -> anyhow::Result<T> {
    Err(UsageError(msg.into()).into())
}

fn init_logging() {
    // Quiet by default: the commands print what an operator needs; FIRMWARE_SIM_LOG=debug
    // shows connection errors per device.
    let filter = tracing_subscriber::EnvFilter::try_from_env("FIRMWARE_SIM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Parses a duration like `10s`, `250ms`, `5m`.
pub fn parse_duration(what: &str, text: &str) -> anyhow::Result<Duration> {
    match humantime::parse_duration(text) {
        Ok(d) => Ok(d),
        Err(_) => usage(format!(
            "invalid {what} `{text}` (examples: 250ms, 10s, 5m)"
        )),
    }
}

/// Parses a sample interval and checks the firmware's limits.
pub fn parse_interval(text: &str) -> anyhow::Result<u32> {
    let d = parse_duration("--interval", text)?;
    let ms = d.as_millis();
    let (min, max) = (
        firmware_sim::client::MIN_INTERVAL_MS,
        firmware_sim::client::MAX_INTERVAL_MS,
    );
    if ms < u128::from(min) || ms > u128::from(max) {
        return usage(format!("--interval must be between {min} ms and 1 day"));
    }
    Ok(ms as u32)
}

/// Reads a CA file and checks that rustls can use it. Either failure is bad input.
pub fn read_ca(path: &Path) -> anyhow::Result<String> {
    let pem = match std::fs::read_to_string(path) {
        Ok(pem) => pem,
        Err(e) => return usage(format!("cannot read the CA file {}: {e}", path.display())),
    };
    if let Err(e) = net::tls_config(&pem, None) {
        return usage(format!("CA file {}: {e:#}", path.display()));
    }
    Ok(pem)
}

/// Reads a file named on the command line; failing to is bad input.
pub fn read_input(path: &Path, what: &str) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) => usage(format!("cannot read {what} {}: {e}", path.display())),
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn flash(args: FlashArgs) -> anyhow::Result<ExitCode> {
    if !schemas::limits::is_valid_device_id(&args.device) {
        return usage(format!(
            "invalid device id `{}`: use letters, digits, '_', '.', '-' (at most 64)",
            args.device
        ));
    }
    let endpoint = match Endpoint::parse(&args.hub) {
        Ok(e) => e,
        Err(e) => return usage(format!("--hub `{}`: {e}", args.hub)),
    };
    let token = match (&args.token, &args.token_file, &args.cert) {
        (Some(t), _, _) => t.trim().to_string(),
        (None, Some(file), _) => read_input(file, "the token file")?.trim().to_string(),
        // The client certificate alone identifies the device.
        (None, None, Some(_)) => String::new(),
        (None, None, None) => {
            return usage("pass --token TOKEN, --token-file FILE, or --cert FILE --key FILE")
        }
    };
    if (token.is_empty() && args.cert.is_none())
        || token.len() > firmware_sim::client::MAX_TOKEN_LEN
        || token.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return usage("the token is empty, longer than 384 bytes, or contains whitespace");
    }
    // Tokens are opaque to devices, but a token for another device is a likely mistake.
    if let Some(id) = token.strip_prefix("v1.").and_then(|t| t.split('.').next()) {
        if id != args.device {
            eprintln!(
                "warning: the token looks issued for `{id}`, not `{}`; the hub will know this device as `{id}`",
                args.device
            );
        }
    }
    let ca_pem = match &args.ca {
        Some(path) => Some(read_ca(path)?),
        None if endpoint.secure => {
            return usage(
                "wss needs --ca FILE (the hub's CA certificate, e.g. hub-data/tls/ca.pem)",
            )
        }
        None => None,
    };
    let client_cert = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => {
            let Some(ca) = &ca_pem else {
                return usage(
                    "--cert needs wss and --ca: a client certificate is presented in TLS",
                );
            };
            let client = ClientCertPem {
                cert_pem: read_input(cert, "the client certificate")?,
                key_pem: read_input(key, "the client key")?,
            };
            if let Err(e) = net::tls_config(ca, Some(&client)) {
                return usage(format!(
                    "--cert {} --key {}: {e:#}",
                    cert.display(),
                    key.display()
                ));
            }
            Some(client)
        }
        _ => None,
    };
    let interval_ms = parse_interval(&args.interval)?;
    let sensors = SensorSet::parse(&args.sensors).or_else(usage)?;
    if args.ring_bytes < MIN_CAPACITY.max(1024) || args.ring_bytes > 16 << 20 {
        return usage("--ring-bytes must be between 1024 and 16777216");
    }
    if args.out.exists() && !args.force {
        return usage(format!(
            "{} exists (it may hold unacknowledged readings); pass --force to overwrite it",
            args.out.display()
        ));
    }
    let firmware = args
        .firmware
        .clone()
        .unwrap_or_else(|| FIRMWARE.to_string());
    if args.firmware.is_some() && !schemas::firmware::is_valid_version(&firmware) {
        return usage(format!(
            "--firmware `{firmware}`: use 1 to 32 of [A-Za-z0-9._+-], not starting with '.'"
        ));
    }
    let update_key = match &args.update_key {
        Some(hex) => match schemas::firmware::decode_hex_array::<32>(hex.trim()) {
            Some(key) => Some(key),
            None => return usage("--update-key must be 64 hex digits (from `hub firmware key`)"),
        },
        None => None,
    };
    // A fresh flash region: the firmware formats it at first boot (sequence 1).
    let image = Image {
        provisioning: Provisioning {
            device_id: args.device.clone(),
            hub_url: args.hub.trim().to_string(),
            token,
            ca_pem,
            interval_ms,
            sensors: sensors.names(),
            firmware: firmware.clone(),
            flashed_at_ms: now_ms(),
            client_cert,
        },
        flash: vec![0xFF; args.ring_bytes],
    };
    image.save(&args.out)?;
    let fw = partition::path_for(&args.out);
    match update_key {
        Some(key) => partition::create(&fw, key, &firmware)?,
        // A partition of an earlier flash would bring its slots back.
        None => {
            let _ = std::fs::remove_file(&fw);
        }
    }
    eprintln!(
        "flashed {} for {} (hub {}, every {} ms, {} bytes of flash)",
        args.out.display(),
        args.device,
        args.hub,
        interval_ms,
        args.ring_bytes
    );
    Ok(ExitCode::SUCCESS)
}

/// The firmware partition next to `image`, as JSON (null when there is none): the active
/// slot, its version, whether it is on trial, both slots' versions, and whether the active
/// slot's bytes are what the boot record says.
fn partition_state(image: &Path) -> anyhow::Result<serde_json::Value> {
    let fw = partition::path_for(image);
    if !fw.exists() {
        return Ok(serde_json::Value::Null);
    }
    let (flash, key) = partition::open(&fw)?;
    let mut updater = firmware_sim::update::Updater::open(flash, Some(key))
        .map_err(|e| anyhow::anyhow!("{}: {e:?}", fw.display()))?;
    let record = updater.record().clone();
    let valid = updater
        .slot_is_valid(record.active)
        .map_err(|e| anyhow::anyhow!("{}: {e:?}", fw.display()))?;
    Ok(serde_json::json!({
        "active": record.active,
        "version": record.slots[usize::from(record.active)].version.as_str(),
        "trial": record.trial,
        "slots": [record.slots[0].version.as_str(), record.slots[1].version.as_str()],
        "active_valid": valid,
        "downloading": record.download.as_ref().map(|d| serde_json::json!({"version": d.version.as_str(), "stored": d.stored, "size": d.size})),
        "report": record.report.as_ref().map(|r| serde_json::json!({"version": r.version.as_str(), "state": r.state.as_str(), "reason": r.reason.as_str()})),
    }))
}

fn inspect(path: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let image = Image::load(path)?;
    let p = &image.provisioning;
    let (mut ring, blank) =
        RingOutbox::mount(RamFlash::new(image.flash.clone())).map_err(|e| ImageError::Corrupt {
            path: path.to_path_buf(),
            why: format!("device state: {e}"),
        })?;
    let pending = ring.len();
    let mut pending_readings = 0;
    for i in 0..pending {
        pending_readings += ring.readings_in(i).map_err(|e| ImageError::Corrupt {
            path: path.to_path_buf(),
            why: format!("device state: {e}"),
        })?;
    }
    let token_hint = format!("{}…", p.token.chars().take(16).collect::<String>());
    let partition = partition_state(path)?;
    if json {
        let v = serde_json::json!({
            "partition": partition,
            "device_id": p.device_id,
            "hub_url": p.hub_url,
            "token": token_hint,
            "ca": p.ca_pem.is_some(),
            "client_cert": p.client_cert.is_some(),
            "interval_ms": p.interval_ms,
            "sensors": p.sensors,
            "firmware": p.firmware,
            "flashed_at_ms": p.flashed_at_ms,
            "booted": !blank,
            "next_seq": ring.front_seq() + pending as u64,
            "oldest_unacked_seq": if pending > 0 { Some(ring.front_seq()) } else { None },
            "unacked_batches": pending,
            "unacked_readings": pending_readings,
            "flash_bytes": image.flash.len(),
            "flash_used_bytes": ring.used_bytes(),
        });
        println!("{v}");
    } else {
        println!("device      {}", p.device_id);
        println!("hub         {}", p.hub_url);
        println!("token       {token_hint}");
        println!(
            "ca          {}",
            if p.ca_pem.is_some() { "yes" } else { "no" }
        );
        println!(
            "client cert {}",
            if p.client_cert.is_some() { "yes" } else { "no" }
        );
        println!("interval    {} ms", p.interval_ms);
        println!("sensors     {}", p.sensors.join(","));
        println!("firmware    {}", p.firmware);
        if !partition.is_null() {
            println!(
                "partition   slot {} active ({}{}), slots {} / {}, active slot {}",
                partition["active"],
                partition["version"].as_str().unwrap_or_default(),
                if partition["trial"] == true {
                    ", on trial"
                } else {
                    ""
                },
                partition["slots"][0].as_str().unwrap_or_default(),
                partition["slots"][1].as_str().unwrap_or_default(),
                if partition["active_valid"] == true {
                    "valid"
                } else {
                    "NOT VALID"
                },
            );
        }
        if blank {
            println!("state       never booted");
        } else {
            println!(
                "state       next seq {}, {} unacknowledged batches ({} readings), {} of {} flash bytes used",
                ring.front_seq() + pending as u64,
                pending,
                pending_readings,
                ring.used_bytes(),
                image.flash.len()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Checks `cond` or fails with a usage error.
pub fn ensure_usage(cond: bool, msg: impl Into<String>) -> anyhow::Result<()> {
    if cond {
        Ok(())
    } else {
        bail!(UsageError(msg.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_errors_exit_2_and_others_1() {
        let missing = Path::new("/nonexistent/firmware-sim-test/ca.pem");
        let err = read_ca(missing).expect_err("no such file");
        assert_eq!(exit_status(&err), EXIT_USAGE, "{err:#}");
        assert!(
            format!("{err:#}").starts_with("cannot read the CA file /nonexistent/"),
            "{err:#}"
        );

        let temp = tempfile::tempdir().expect("temp dir");
        let dir = temp.path();
        let bad = dir.join("ca.pem");
        std::fs::write(&bad, "not a certificate\n").expect("write");
        let err = read_ca(&bad).expect_err("no certificate");
        assert_eq!(exit_status(&err), EXIT_USAGE, "{err:#}");
        assert!(
            format!("{err:#}").contains("holds no certificate"),
            "{err:#}"
        );

        let err = read_input(missing, "the token file").expect_err("no such file");
        assert_eq!(exit_status(&err), EXIT_USAGE);
        // Context added on the way up keeps the status.
        let err = err.context("flash");
        assert_eq!(exit_status(&err), EXIT_USAGE);

        assert_eq!(exit_status(&anyhow::anyhow!("the hub is unreachable")), 1);
    }
}

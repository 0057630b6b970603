//! `hub firmware add|list|show|remove|offer|updates|key`: firmware images the hub stores,
//! hashes and signs, offering one to devices, where their updates stand, and the public key
//! devices are provisioned with to check those signatures.

use std::path::PathBuf;

use clap::Subcommand;
use serde_json::Value;

use super::format::{table, time};
use super::ops::encode;
use super::{exit, ApiClient, CliError};

/// The `hub firmware` subcommands.
#[derive(Subcommand)]
pub enum FirmwareCommand {
    /// Store an image as a version: the hub records its size and SHA-256 and signs it with
    /// its firmware key (created on first use), or keeps the signature given.
    #[command(
        after_help = "Examples:\n  hub firmware add build/fw-1.1.bin --version 1.1\n  \
hub firmware add fw.bin --version 1.1-rev2 --for hw=rev2\n  \
hub firmware add fw.bin --version 1.2 --signature fw.bin.sig"
    )]
    Add {
        /// The image file.
        file: PathBuf,
        /// The version devices report once they run it (1 to 32 of [A-Za-z0-9._+-]).
        #[arg(long)]
        version: String,
        /// Only for devices with this tag (repeatable; all must match).
        #[arg(long = "for", value_name = "KEY=VALUE")]
        for_devices: Vec<String>,
        /// A signature made elsewhere (64 raw bytes or 128 hex digits) over the statement
        /// described in PROTOCOL.md, instead of the hub's own.
        #[arg(long, value_name = "FILE")]
        signature: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List stored images, oldest first.
    #[command(after_help = "Examples:\n  hub firmware list\n  hub firmware list --json")]
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one image: size, SHA-256, signature, who signed it, which devices it is for.
    #[command(after_help = "Example:\n  hub firmware show 1.1")]
    Show {
        /// The version.
        version: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete a stored image.
    #[command(after_help = "Example:\n  hub firmware remove 1.0")]
    Remove {
        /// The version.
        version: String,
    },
    /// Offer a stored version to devices now (each gets it when it is connected), replacing
    /// their current update; follow them with `hub firmware updates`.
    #[command(
        after_help = "Devices must announce the `firmware` capability (firmware-sim does; see PROTOCOL.md section 13).\n\n\
Examples:\n  hub firmware offer 1.1 sensor-17\n  hub firmware offer 1.1 sensor-17 sensor-18"
    )]
    Offer {
        /// The version.
        version: String,
        /// The devices.
        #[arg(required = true, value_parser = super::args::device_id)]
        devices: Vec<String>,
    },
    /// Where devices' updates stand: offered, downloading (percent), installing, rebooting,
    /// succeeded, failed, rolled_back (with the device's reason).
    #[command(
        after_help = "Examples:\n  hub firmware updates\n  hub firmware updates sensor-17\n  hub firmware updates --json"
    )]
    Updates {
        /// Only this device.
        #[arg(value_parser = super::args::device_id)]
        device: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the public firmware signing key (hex), for provisioning devices.
    #[command(
        after_help = "Example:\n  firmware-sim flash dev.img --update-key \"$(hub firmware key)\" ..."
    )]
    Key,
}

/// Runs a `hub firmware` subcommand.
///
/// # Errors
/// The file cannot be read, or the API failed.
pub fn run(api: &ApiClient, command: &FirmwareCommand) -> Result<u8, CliError> {
    match command {
        FirmwareCommand::Add {
            file,
            version,
            for_devices,
            signature,
            json,
        } => {
            let image = std::fs::read(file)
                .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", file.display())))?;
            let mut path = format!("/api/v1/firmware?version={}", encode(version));
            if !for_devices.is_empty() {
                path.push_str(&format!("&for={}", encode(&for_devices.join(","))));
            }
            if let Some(sig) = signature {
                let bytes = std::fs::read(sig)
                    .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", sig.display())))?;
                let sig = hub::firmware::parse_signature(&bytes)
                    .map_err(|e| CliError::Usage(format!("{}: {e}", sig.display())))?;
                let hex: String = sig.iter().map(|b| format!("{b:02x}")).collect();
                path.push_str(&format!("&signature={hex}"));
            }
            let v = api.post_bytes(&path, &image)?;
            if *json {
                emit!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                emit!(
                    "added firmware {} ({} bytes, sha256 {}, signed by {})",
                    v["version"].as_str().unwrap_or(version),
                    v["size"],
                    v["sha256"].as_str().unwrap_or("?"),
                    v["signed_by"].as_str().unwrap_or("?")
                );
            }
            Ok(exit::OK)
        }
        FirmwareCommand::List { json } => {
            let v = api.get("/api/v1/firmware")?;
            if *json {
                emit!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                return Ok(exit::OK);
            }
            let rows: Vec<Vec<String>> = v["artifacts"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|a| {
                    vec![
                        text(&a["version"]),
                        a["size"].to_string(),
                        text(&a["sha256"]).chars().take(16).collect(),
                        text(&a["signed_by"]),
                        Some(text(&a["for"]))
                            .filter(|f| !f.is_empty())
                            .unwrap_or_else(|| "any".into()),
                        a["added_at"].as_u64().map(time).unwrap_or_default(),
                    ]
                })
                .collect();
            table(
                &["VERSION", "SIZE", "SHA256", "SIGNED", "FOR", "ADDED"],
                &rows,
            );
            Ok(exit::OK)
        }
        FirmwareCommand::Show { version, json } => {
            let v = api.get(&format!("/api/v1/firmware/{}", encode(version)))?;
            if *json {
                emit!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                return Ok(exit::OK);
            }
            for (label, key) in [
                ("version", "version"),
                ("size", "size"),
                ("sha256", "sha256"),
                ("signature", "signature"),
                ("signed by", "signed_by"),
                ("for", "for"),
            ] {
                emit!("{label:<10} {}", text(&v[key]));
            }
            if let Some(at) = v["added_at"].as_u64() {
                emit!("{:<10} {}", "added", time(at));
            }
            Ok(exit::OK)
        }
        FirmwareCommand::Remove { version } => {
            api.delete(&format!("/api/v1/firmware/{}", encode(version)))?;
            emit!("removed firmware {version}");
            Ok(exit::OK)
        }
        FirmwareCommand::Offer { version, devices } => {
            for device in devices {
                api.post(
                    &format!("/api/v1/devices/{}/firmware", encode(device)),
                    &serde_json::json!({"version": version}),
                )?;
                emit!("offered firmware {version} to {device}");
            }
            Ok(exit::OK)
        }
        FirmwareCommand::Updates { device, json } => {
            let v = match device {
                Some(d) => Value::Array(vec![
                    api.get(&format!("/api/v1/devices/{}/firmware", encode(d)))?
                ]),
                None => api.get("/api/v1/updates")?,
            };
            if *json {
                emit!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                return Ok(exit::OK);
            }
            let rows: Vec<Vec<String>> = v
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|u| {
                    let state = text(&u["state"]);
                    let state = if state == "downloading" {
                        format!("downloading {}%", u["percent"])
                    } else {
                        state
                    };
                    vec![
                        text(&u["device"]),
                        text(&u["version"]),
                        state,
                        u["rollout"]
                            .as_u64()
                            .map(|r| r.to_string())
                            .unwrap_or_default(),
                        super::format::one_line(&text(&u["reason"])),
                    ]
                })
                .collect();
            table(&["DEVICE", "VERSION", "STATE", "ROLLOUT", "REASON"], &rows);
            Ok(exit::OK)
        }
        FirmwareCommand::Key => {
            let v = api.get("/api/v1/firmware")?;
            emit!("{}", text(&v["signing_key"]));
            Ok(exit::OK)
        }
    }
}

/// A JSON value as plain text: strings without quotes.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

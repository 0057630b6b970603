//! The CLI's fleet operations: registering devices (one, or many from a CSV file, each
//! with a token and, with `--cert`, a client certificate), tagging and removing them, and
//! setting and showing desired state.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::certs;
use super::format::{self, table};
use super::ops::encode;
use super::{exit, ApiClient, CliError};
use hub::selector::parse_tag;

/// Reads `KEY=VALUE` tags given on the command line.
///
/// # Errors
/// A tag that is not `KEY=VALUE` with a valid key and value (exit 2).
pub fn tags(args: &[String]) -> Result<Map<String, Value>, CliError> {
    let mut tags = Map::new();
    for arg in args {
        let (k, v) = parse_tag(arg).map_err(|e| CliError::Usage(format!("--tag {arg}: {e}")))?;
        tags.insert(k, Value::String(v));
    }
    Ok(tags)
}

/// A tags object as `KEY=VALUE` strings, in key order.
pub fn tag_list(tags: &Value) -> Vec<String> {
    tags.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default()
}

/// `hub devices add ID [--tag K=V]... [--cert DIR]`: registers the device and prints its
/// token; with `cert`, also issues its client certificate into that directory.
///
/// # Errors
/// API failures, or the certificate files could not be written.
pub fn add(
    api: &ApiClient,
    id: &str,
    tag_args: &[String],
    ttl: &str,
    cert: Option<&Path>,
) -> Result<u8, CliError> {
    let body = json!({"id": id, "tags": tags(tag_args)?, "ttl": ttl});
    let v = api.post("/api/v1/devices", &body)?;
    match v["token"].as_str() {
        Some(token) => {
            emit!("{token}");
            if v["created"] == false {
                eprintln!(
                    "{id} was already registered; its tags were merged and a new token issued"
                );
            }
            if let Some(dir) = cert {
                let issued = certs::issue_into(api, id, dir, ttl)?;
                eprintln!(
                    "client certificate {} and key {} (trust {}); valid until {}",
                    issued.cert.display(),
                    issued.key.display(),
                    dir.join("ca.crt").display(),
                    format::time(issued.not_after_ms)
                );
            }
            Ok(exit::OK)
        }
        None => Err(CliError::Usage(format!(
            "the hub answered without a token: {v}"
        ))),
    }
}

/// Reads a fleet CSV: one device per line, the id first and then `KEY=VALUE` tags; a first
/// line whose first field is `id` is a header; empty lines and `#` comments are skipped.
///
/// # Errors
/// The file cannot be read, or a line is bad (its number is named).
pub fn read_fleet_csv(path: &Path) -> Result<Vec<Value>, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::Usage(format!("cannot read {}: {e}", path.display())))?;
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .comment(Some(b'#'))
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let mut devices = Vec::new();
    for (n, record) in reader.records().enumerate() {
        let line = n + 1;
        let record =
            record.map_err(|e| CliError::Usage(format!("{}:{line}: {e}", path.display())))?;
        let mut fields = record.iter().filter(|f| !f.is_empty());
        let Some(id) = fields.next() else {
            continue;
        };
        if line == 1 && id.eq_ignore_ascii_case("id") {
            continue;
        }
        let tag_args: Vec<String> = fields.map(str::to_string).collect();
        let tags = tags(&tag_args)
            .map_err(|e| CliError::Usage(format!("{}:{line}: {e}", path.display())))?;
        devices.push(json!({"id": id, "tags": tags}));
    }
    if devices.is_empty() {
        return Err(CliError::Usage(format!(
            "{} lists no devices (one per line: id,KEY=VALUE,...)",
            path.display()
        )));
    }
    Ok(devices)
}

/// `hub devices add --from FILE.csv [--out TOKENS] [--cert DIR]`: registers every device of
/// the file and writes `ID TOKEN` lines (what `firmware-sim fleet --tokens` reads) to
/// `out`, or to stdout; with `cert`, also a certificate and key per device into that
/// directory.
///
/// # Errors
/// A bad file, API failures, or the certificate files could not be written.
pub fn add_from(
    api: &ApiClient,
    file: &Path,
    out: Option<&Path>,
    ttl: &str,
    cert: Option<&Path>,
) -> Result<u8, CliError> {
    let devices = read_fleet_csv(file)?;
    let v = api.post("/api/v1/devices", &json!({"devices": devices, "ttl": ttl}))?;
    let registered = v["devices"].as_array().cloned().unwrap_or_default();
    let mut lines = String::new();
    for d in &registered {
        lines.push_str(&format!(
            "{} {}\n",
            d["device_id"].as_str().unwrap_or_default(),
            d["token"].as_str().unwrap_or_default()
        ));
    }
    match out {
        Some(path) => {
            let mut f = std::fs::File::create(path)
                .map_err(|e| CliError::Usage(format!("cannot write {}: {e}", path.display())))?;
            f.write_all(lines.as_bytes())
                .map_err(|e| CliError::Usage(format!("cannot write {}: {e}", path.display())))?;
            let created = registered.iter().filter(|d| d["created"] == true).count();
            eprintln!(
                "registered {} devices ({created} new); tokens in {}",
                registered.len(),
                path.display()
            );
        }
        None => emit!("{}", lines.trim_end()),
    }
    if let Some(dir) = cert {
        for d in &registered {
            certs::issue_into(api, d["device_id"].as_str().unwrap_or_default(), dir, ttl)?;
        }
        eprintln!(
            "{} client certificates and keys (ID.crt, ID.key) in {}; devices trust {}",
            registered.len(),
            dir.display(),
            dir.join("ca.crt").display()
        );
    }
    Ok(exit::OK)
}

/// `hub devices remove ID [--purge]`.
///
/// # Errors
/// API failures (an unknown device is exit 2).
pub fn remove(api: &ApiClient, id: &str, purge: bool) -> Result<u8, CliError> {
    let path = format!(
        "/api/v1/devices/{}{}",
        encode(id),
        if purge { "?purge=true" } else { "" }
    );
    let v = api.delete(&path)?;
    let cancelled = v["commands_cancelled"].as_u64().unwrap_or(0);
    match v["readings_deleted"].as_u64() {
        Some(n) => eprintln!("removed {id}: tokens revoked, {cancelled} open commands cancelled, {n} readings deleted"),
        None => eprintln!("removed {id}: tokens revoked, {cancelled} open commands cancelled; its telemetry stays (--purge deletes it)"),
    }
    Ok(exit::OK)
}

/// `hub devices tag ID K=V... [--remove KEY]...`: prints the tags afterwards.
///
/// # Errors
/// Bad tags (exit 2), or API failures.
pub fn tag(
    api: &ApiClient,
    id: &str,
    set: &[String],
    remove: &[String],
    json_out: bool,
) -> Result<u8, CliError> {
    if set.is_empty() && remove.is_empty() {
        return Err(CliError::Usage(
            "give tags to set (KEY=VALUE) or --remove KEY".into(),
        ));
    }
    let body = json!({"set": tags(set)?, "remove": remove});
    let v = api.patch(&format!("/api/v1/devices/{}/tags", encode(id)), &body)?;
    if json_out {
        emit!("{}", v["tags"]);
    } else {
        let tags = tag_list(&v["tags"]);
        emit!(
            "{id}: {}",
            if tags.is_empty() {
                "no tags".to_string()
            } else {
                tags.join(" ")
            }
        );
    }
    Ok(exit::OK)
}

/// Reads `KEY=VALUE` assignments of desired state: VALUE is JSON (`2`, `true`, `"5s"`,
/// `null` to delete), or, when it is not JSON, a string.
///
/// # Errors
/// An assignment without `=` (exit 2).
pub fn assignments(args: &[String]) -> Result<Map<String, Value>, CliError> {
    let mut patch = Map::new();
    for arg in args {
        let (key, value) = arg.split_once('=').ok_or_else(|| {
            CliError::Usage(format!(
                "`{arg}` is not KEY=VALUE (for example interval=2, led=true, mode=eco, key=null)"
            ))
        })?;
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.into()));
        patch.insert(key.trim().to_string(), value);
    }
    if patch.is_empty() {
        return Err(CliError::Usage("give at least one KEY=VALUE".into()));
    }
    Ok(patch)
}

/// `hub state set ID KEY=VALUE...` or `hub state set --tag K=V... KEY=VALUE...`.
///
/// # Errors
/// Bad assignments or selector (exit 2), or API failures.
pub fn state_set(
    api: &ApiClient,
    device: Option<&str>,
    selector: Option<&str>,
    args: &[String],
) -> Result<u8, CliError> {
    let body = json!({"desired": assignments(args)?});
    match (device, selector) {
        (Some(id), None) => {
            let v = api.patch(&format!("/api/v1/devices/{}/state", encode(id)), &body)?;
            let online = api
                .get(&format!("/api/v1/devices/{}", encode(id)))
                .map(|d| d["online"] == true)
                .unwrap_or(false);
            eprintln!(
                "{id}: desired version {}{}",
                v["desired_version"],
                if online {
                    "; sent to the device"
                } else {
                    "; the device gets it when it connects"
                }
            );
            Ok(if online {
                exit::OK
            } else {
                exit::QUEUED_OFFLINE
            })
        }
        (None, Some(select)) => {
            let v = api.patch(&format!("/api/v1/state?select={}", encode(select)), &body)?;
            eprintln!(
                "{} devices match {}; {} changed",
                v["matched"],
                v["select"].as_str().unwrap_or(select),
                v["changed"]
            );
            Ok(exit::OK)
        }
        _ => Err(CliError::Usage(
            "give a device id, or --tag KEY=VALUE (or --all) to pick devices".into(),
        )),
    }
}

/// `hub state show ID [--json]`: desired, reported, the delta and both versions.
///
/// # Errors
/// API failures.
pub fn state_show(api: &ApiClient, id: &str, json_out: bool) -> Result<u8, CliError> {
    let v = api.get(&format!("/api/v1/devices/{}/state", encode(id)))?;
    if json_out {
        emit!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return Ok(exit::OK);
    }
    emit!(
        "{id}: desired version {}, reported version {}",
        v["desired_version"],
        v["reported_version"]
    );
    let empty = Map::new();
    let desired = v["desired"].as_object().unwrap_or(&empty);
    let reported = v["reported"].as_object().unwrap_or(&empty);
    let delta = v["delta"].as_object().unwrap_or(&empty);
    let refused = v["refused"].as_object().unwrap_or(&empty);
    let mut keys: Vec<&String> = desired.keys().chain(reported.keys()).collect();
    keys.sort();
    keys.dedup();
    let cell = |m: &Map<String, Value>, k: &str| m.get(k).map_or("-".to_string(), Value::to_string);
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|k| {
            let status = if let Some(why) = refused.get(*k) {
                format!("refused: {}", why.as_str().unwrap_or_default())
            } else if delta.contains_key(*k) {
                "pending".to_string()
            } else if desired.contains_key(*k) {
                "in sync".to_string()
            } else {
                "reported only".to_string()
            };
            vec![k.to_string(), cell(desired, k), cell(reported, k), status]
        })
        .collect();
    if rows.is_empty() {
        emit!("no desired or reported state");
    } else {
        table(&["KEY", "DESIRED", "REPORTED", "STATUS"], &rows);
    }
    Ok(exit::OK)
}

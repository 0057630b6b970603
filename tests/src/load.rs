//! For the benchmarks that load a hub with many devices: `firmware-sim fleet` started as a
//! separate process (the load generator), and what the hub shows of it from outside (its
//! online count from `/metrics`, its resident memory from /proc).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::process::{binary, signal_pid, KillOnDrop};
use crate::{Hub, HubOptions};

/// The number of devices a benchmark loads the hub with: `BENCH_DEVICES`, or `default`.
pub fn bench_devices(default: u64) -> u64 {
    std::env::var("BENCH_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A process's resident memory in bytes, from /proc (0 when it is gone).
pub fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Polls a process's RSS once a second until the last five seconds of readings lie within
/// 0.5 % of each other (at most 60 s), and returns the last one.
///
/// Five seconds, not one: the hub's allocator (jemalloc) gives freed pages back to the
/// system gradually over about ten seconds, and two readings a second apart can look
/// settled in the middle of that.
pub fn settled_rss(pid: u32) -> u64 {
    let mut readings = std::collections::VecDeque::from([rss(pid)]);
    for _ in 0..60 {
        std::thread::sleep(Duration::from_secs(1));
        readings.push_back(rss(pid));
        if readings.len() > 6 {
            readings.pop_front();
        }
        let (low, high) = readings
            .iter()
            .fold((u64::MAX, 0), |(lo, hi), &r| (lo.min(r), hi.max(r)));
        if readings.len() == 6 && (high - low) * 200 < high {
            break;
        }
    }
    readings.back().copied().unwrap_or(0)
}

/// The hub's count of online devices (`hub_devices_online` in `/metrics`); `None` while
/// the API does not answer.
pub fn online(hub: &Hub) -> Option<u64> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    let admin = std::fs::read_to_string(hub.data_dir().join("admin-token")).ok()?;
    let url = std::fs::read_to_string(hub.data_dir().join("admin-url")).ok()?;
    let text = agent
        .get(format!("{}/metrics", url.trim()))
        .header("Authorization", &format!("Bearer {}", admin.trim()))
        .call()
        .ok()?
        .body_mut()
        .read_to_string()
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("hub_devices_online "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// A hub for the load benches: warnings only in its log (a line per connecting device
/// would be measured too), and a per-source handshake share of 1024: a fleet on a few
/// loopback addresses stands for devices that come from many.
pub fn bench_hub() -> Hub {
    Hub::start(HubOptions {
        env: vec![
            ("HUB_LOG__LEVEL".into(), "warn".into()),
            (
                "HUB_DEVICE__MAX_HANDSHAKES_PER_SOURCE".into(),
                "1024".into(),
            ),
        ],
        ..HubOptions::default()
    })
}

/// `--ifaddr` for a large fleet on this machine: 16 loopback source addresses, so the
/// kernel's search for a free source port stays cheap (from one address it dominates the
/// load generator's CPU beyond about 10,000 connections).
pub fn loopback_sources() -> String {
    (1..=16)
        .map(|i| format!("127.0.0.{i}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A running `firmware-sim fleet` against a hub's data directory, with `--json`.
pub struct Fleet(KillOnDrop);

impl Fleet {
    /// Starts `count` devices named `PREFIX00001...` with the extra `args` (interval,
    /// connect rate, ...); tokens come from the hub's admin API.
    pub fn start(hub: &Hub, count: u64, prefix: &str, args: &[&str]) -> Fleet {
        let mut cmd = Command::new(binary("firmware-sim"));
        cmd.args(["fleet", "--count", &count.to_string(), "--data-dir"])
            .arg(hub.data_dir())
            .args(["--prefix", prefix, "--json"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        Fleet(KillOnDrop(cmd.spawn().expect("spawn firmware-sim fleet")))
    }

    /// Panics when the fleet has exited (it runs until stopped).
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.0 .0.try_wait() {
            panic!("firmware-sim fleet exited early with {status}");
        }
    }

    /// Stops it (SIGTERM: devices drain, then it prints its summary) and returns the
    /// summary.
    pub fn stop(mut self) -> serde_json::Value {
        signal_pid(self.0 .0.id(), "TERM");
        let mut summary = String::new();
        if let Some(out) = self.0 .0.stdout.as_mut() {
            let _ = out.read_to_string(&mut summary);
        }
        let _ = self.0 .0.wait();
        serde_json::from_str(summary.trim()).unwrap_or(serde_json::Value::Null)
    }
}

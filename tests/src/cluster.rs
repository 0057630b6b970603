//! A cluster for the cluster tests: hubs that share Redis and VictoriaMetrics (as the
//! line-protocol store) behind nginx, a fleet of simulated devices that connect through
//! nginx, and the views the tests compare: who holds which device according to each
//! hub, the command ledger, and what the store holds.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::sim::{self, SimOptions, SimStats};
use crate::{Hub, HubOptions};

/// The token secret every node shares.
pub const SECRET: &str = "5e0c1d2b3a4f5e6d7c8b9a0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445";
/// The admin token every node shares.
pub const ADMIN: &str = "cluster-admin-token-for-tests";

/// How the nodes of a test cluster run.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// `cluster.heartbeat`.
    pub heartbeat: &'static str,
    /// `device.ping_interval`.
    pub ping_interval: &'static str,
    /// `device.pong_timeout`.
    pub pong_timeout: &'static str,
    /// `cluster.rebalance`.
    pub rebalance: &'static str,
    /// `cluster.rebalance_rate`.
    pub rebalance_rate: u32,
    /// More settings as `HUB_...` environment variables (e.g. a shared `firmware.dir`).
    pub env: Vec<(String, String)>,
}

impl Default for NodeOptions {
    fn default() -> Self {
        NodeOptions {
            heartbeat: "200ms",
            ping_interval: "500ms",
            pong_timeout: "1s",
            rebalance: "manual",
            rebalance_rate: 20,
            env: Vec::new(),
        }
    }
}

/// Starts hub `name` on the backplane at `redis_port` with VictoriaMetrics at `vm_port`,
/// serving plain ws for nginx.
pub fn node(name: &str, redis_port: u16, vm_port: u16, options: &NodeOptions) -> Hub {
    let mut env = vec![
        (
            "HUB_CLUSTER__REDIS_URL".into(),
            format!("redis://127.0.0.1:{redis_port}/"),
        ),
        ("HUB_CLUSTER__HEARTBEAT".into(), options.heartbeat.into()),
        ("HUB_CLUSTER__REBALANCE".into(), options.rebalance.into()),
        (
            "HUB_CLUSTER__REBALANCE_RATE".into(),
            options.rebalance_rate.to_string(),
        ),
        ("HUB_STORAGE__BACKEND".into(), "influxdb".into()),
        (
            "HUB_STORAGE__INFLUXDB__URL".into(),
            format!("http://127.0.0.1:{vm_port}"),
        ),
        ("HUB_STORAGE__INFLUXDB__ORG".into(), "fleet".into()),
        ("HUB_STORAGE__INFLUXDB__BUCKET".into(), "telemetry".into()),
        (
            "HUB_STORAGE__INFLUXDB__TOKEN".into(),
            "unused-by-victoria-metrics".into(),
        ),
        ("HUB_AUTH__TOKEN_SECRET".into(), SECRET.into()),
        ("HUB_AUTH__ADMIN_TOKEN".into(), ADMIN.into()),
        ("HUB_DEVICE__PLAIN_WS".into(), "true".into()),
        ("HUB_CLUSTER__NODE_ID".into(), name.into()),
        ("HUB_DEVICE__FORWARDED_FOR".into(), "true".into()),
    ];
    env.extend(options.env.iter().cloned());
    Hub::start(HubOptions {
        ping_interval: options.ping_interval,
        pong_timeout: options.pong_timeout,
        env,
    })
}

/// Every device record as `hub` answers `GET /api/v1/devices`.
pub fn devices(hub: &Hub) -> Vec<serde_json::Value> {
    let (status, v) = hub.api("GET", "/api/v1/devices", Some(ADMIN), None);
    assert_eq!(status, 200, "{v}");
    v["devices"].as_array().cloned().unwrap_or_default()
}

/// The online devices and the node holding each, as `hub` sees them (None when its API
/// cannot answer, e.g. while it cannot reach Redis).
pub fn holders(hub: &Hub) -> Option<HashMap<String, String>> {
    let (status, v) = hub.api("GET", "/api/v1/devices", Some(ADMIN), None);
    if status != 200 {
        return None;
    }
    Some(
        v["devices"]
            .as_array()?
            .iter()
            .filter(|d| d["online"] == true)
            .map(|d| {
                (
                    d["id"].as_str().unwrap_or_default().to_string(),
                    d["node"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect(),
    )
}

/// The devices `node` holds according to `hub` (empty when its API cannot answer).
pub fn held_by(hub: &Hub, node: &str) -> Vec<String> {
    let mut ids: Vec<String> = holders(hub)
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, n)| n == node)
        .map(|(d, _)| d)
        .collect();
    ids.sort();
    ids
}

/// How many devices each node holds, from a [`holders`] map.
pub fn per_node(holders: &HashMap<String, String>) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for node in holders.values() {
        *out.entry(node.clone()).or_default() += 1;
    }
    out
}

/// `GET /api/v1/cluster` on `hub`.
pub fn status(hub: &Hub) -> Option<serde_json::Value> {
    let (code, v) = hub.api("GET", "/api/v1/cluster", Some(ADMIN), None);
    (code == 200).then_some(v)
}

/// Samples stored in VictoriaMetrics per device (summed over metrics).
pub fn stored(vm_port: u16) -> HashMap<String, u64> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let _ = agent
        .get(format!("http://127.0.0.1:{vm_port}/internal/force_flush"))
        .call();
    let mut resp = agent
        .get(format!("http://127.0.0.1:{vm_port}/api/v1/export"))
        .query("match[]", "{__name__=~\"telemetry.*\"}")
        .call()
        .expect("vm export");
    let body = resp.body_mut().read_to_string().expect("body");
    let mut out = HashMap::new();
    for line in body.lines().filter(|l| !l.is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).expect("export line");
        let device = v["metric"]["device"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        *out.entry(device).or_insert(0) +=
            v["values"].as_array().map(|a| a.len() as u64).unwrap_or(0);
    }
    out
}

/// Waits until VictoriaMetrics holds `expected` readings per device, then checks that it
/// holds exactly that many (every acked reading once). Returns the total.
pub fn assert_stored_exactly(vm_port: u16, expected: &HashMap<String, u64>) -> u64 {
    let got = crate::wait_for(
        Duration::from_secs(20),
        "VictoriaMetrics to hold every reading",
        || {
            let got = stored(vm_port);
            expected
                .iter()
                .all(|(id, n)| got.get(id).copied().unwrap_or(0) >= *n)
                .then_some(got)
        },
    );
    for (id, n) in expected {
        assert_eq!(
            got.get(id).copied().unwrap_or(0),
            *n,
            "{id}: recorded {n}, stored {:?}",
            got.get(id)
        );
    }
    expected.values().sum()
}

/// Simulated devices (`tests/src/sim.rs`) running on the test's runtime.
pub struct Fleet {
    /// Each device's id and counters.
    pub devices: Vec<(String, Arc<SimStats>)>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    stop_now: Arc<AtomicBool>,
}

impl Fleet {
    /// Ids `PREFIX-00`, `PREFIX-01`, ... for `count` devices.
    pub fn numbered(prefix: &str, count: usize) -> Vec<String> {
        (0..count).map(|i| format!("{prefix}-{i:02}")).collect()
    }

    /// Starts a device for each of `ids` against `url`, trusting `ca`, each recording a
    /// batch of `batch` readings every `interval`; `token` issues a device's token.
    pub fn start(
        ids: &[String],
        url: &str,
        ca: PathBuf,
        token: impl Fn(&str) -> String,
        batch: usize,
        interval: Duration,
    ) -> Fleet {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_now = Arc::new(AtomicBool::new(false));
        let mut devices = Vec::new();
        let mut tasks = Vec::new();
        for id in ids {
            let id = id.clone();
            let stats = Arc::new(SimStats::default());
            let opts = SimOptions {
                url: url.to_string(),
                ca: ca.clone(),
                token: token(&id),
                batch,
                interval,
            };
            tasks.push(tokio::spawn(sim::run(
                opts,
                stats.clone(),
                stop.clone(),
                stop_now.clone(),
            )));
            devices.push((id, stats));
        }
        Fleet {
            devices,
            tasks,
            stop,
            stop_now,
        }
    }

    /// Readings recorded by every device so far.
    pub fn recorded(&self) -> u64 {
        self.devices
            .iter()
            .map(|(_, s)| s.recorded.load(Ordering::Relaxed))
            .sum()
    }

    /// Commands each device has run (ids de-duplicated by its session).
    pub fn commands(&self) -> HashMap<String, u64> {
        self.devices
            .iter()
            .map(|(id, s)| (id.clone(), s.commands.load(Ordering::Relaxed)))
            .collect()
    }

    /// The device ids.
    pub fn ids(&self) -> Vec<String> {
        self.devices.iter().map(|(id, _)| id.clone()).collect()
    }

    /// Ends device `id` at once, as if its process died (what it had not delivered dies
    /// with it), and leaves it out of [`Fleet::finish`].
    pub fn kill(&mut self, id: &str) {
        if let Some(i) = self.devices.iter().position(|(d, _)| d == id) {
            self.tasks.remove(i).abort();
            self.devices.remove(i);
        }
    }

    /// Waits until the devices have recorded `more` readings beyond now.
    pub fn wait_for_readings(&self, more: u64, what: &str) {
        let target = self.recorded() + more;
        crate::wait_for(Duration::from_secs(30), what, || {
            (self.recorded() >= target).then_some(())
        });
    }

    /// Stops recording, waits (up to 30 s) until every device has delivered everything it
    /// recorded, and returns what each recorded.
    pub async fn finish(self) -> HashMap<String, u64> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        }
        self.stop_now.store(true, Ordering::Relaxed);
        self.devices
            .iter()
            .map(|(id, s)| {
                assert!(
                    s.drained.load(Ordering::Relaxed),
                    "{id} still holds unacknowledged readings"
                );
                (id.clone(), s.recorded.load(Ordering::Relaxed))
            })
            .collect()
    }
}

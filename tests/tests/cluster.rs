//! The cluster scenario: two hubs behind nginx (wss terminated at nginx, plain ws to the
//! hubs), a Redis backplane, and VictoriaMetrics as the InfluxDB line-protocol store. A
//! fleet spreads across both hubs; commands cross nodes; a node is killed mid-run; then
//! readings recorded, acknowledged and stored are counted, and commands delivered.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e::servers::{nginx_wss, redis, victoria_metrics};
use e2e::sim::{self, SimOptions, SimStats};
use e2e::{wait_for, Hub, HubOptions};

const SECRET: &str = "5e0c1d2b3a4f5e6d7c8b9a0f1e2d3c4b5a69788796a5b4c3d2e1f00112233445";
const ADMIN: &str = "cluster-admin-token-for-tests";

fn node(name: &str, redis_port: u16, vm_port: u16) -> Hub {
    Hub::start(HubOptions {
        ping_interval: "500ms",
        pong_timeout: "1s",
        env: vec![
            (
                "HUB_CLUSTER__REDIS_URL".into(),
                format!("redis://127.0.0.1:{redis_port}/"),
            ),
            ("HUB_CLUSTER__HEARTBEAT".into(), "200ms".into()),
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
        ],
    })
}

fn devices(hub: &Hub) -> Vec<serde_json::Value> {
    let (status, v) = hub.api("GET", "/api/v1/devices", Some(ADMIN), None);
    assert_eq!(status, 200, "{v}");
    v["devices"].as_array().cloned().unwrap_or_default()
}

/// Samples stored in VictoriaMetrics per device (summed over metrics).
fn stored(vm_port: u16) -> HashMap<String, u64> {
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

// Extra workers: the test's own blocking polls must not starve the simulated devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hubs_behind_nginx_share_a_fleet_and_survive_losing_one() {
    let redis = redis();
    let vm = victoria_metrics();
    let mut a = node("node-a", redis.port, vm.port);
    let mut b = node("node-b", redis.port, vm.port);
    let lb = nginx_wss(
        &[a.device_addr(), b.device_addr()],
        &a.data_dir().join("tls/server.pem"),
        &a.data_dir().join("tls/server-key.pem"),
    );
    let url = format!("wss://localhost:{}/v1/device", lb.port);

    // A fleet through the load balancer.
    let fleet = 16;
    let stop = Arc::new(AtomicBool::new(false));
    let stop_now = Arc::new(AtomicBool::new(false));
    let mut stats = Vec::new();
    let mut tasks = Vec::new();
    for i in 0..fleet {
        let id = format!("sim-{i:02}");
        let s = Arc::new(SimStats::default());
        let opts = SimOptions {
            url: url.clone(),
            ca: a.ca(),
            token: a.token(&id),
            batch: 4,
            interval: Duration::from_millis(50),
        };
        tasks.push(tokio::spawn(sim::run(
            opts,
            s.clone(),
            stop.clone(),
            stop_now.clone(),
        )));
        stats.push((id, s));
    }
    let spread = wait_for(
        Duration::from_secs(30),
        "the fleet online on both nodes",
        || {
            let list = devices(&b);
            let online: Vec<_> = list.iter().filter(|d| d["online"] == true).collect();
            let mut nodes: HashMap<String, usize> = HashMap::new();
            for d in &online {
                *nodes
                    .entry(d["node"].as_str().unwrap_or_default().to_string())
                    .or_default() += 1;
            }
            (online.len() == fleet && nodes.len() == 2).then_some(nodes)
        },
    );
    assert!(spread.values().all(|n| *n >= 1), "{spread:?}");
    // Behind nginx, the hubs record the device's own address, from X-Forwarded-For.
    let listed = devices(&b);
    assert!(
        listed.iter().all(|d| d["remote_addr"]
            .as_str()
            .is_some_and(|r| r.contains(" via "))),
        "{listed:?}"
    );

    // A command sent through node B reaches a device held by node A.
    let list = devices(&b);
    let node_of = |id: &str| {
        list.iter()
            .find(|d| d["id"] == id)
            .and_then(|d| d["node"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    let a_node = "node-a".to_string();
    let on_a: Vec<String> = stats
        .iter()
        .map(|(id, _)| id.clone())
        .filter(|id| node_of(id) == a_node)
        .collect();
    let on_b: Vec<String> = stats
        .iter()
        .map(|(id, _)| id.clone())
        .filter(|id| node_of(id) != a_node)
        .collect();
    assert!(!on_a.is_empty() && !on_b.is_empty(), "spread {spread:?}");
    let (code, out, err) = b.cli(&[
        "send",
        &on_a[0],
        "led",
        "--args",
        r#"{"on":true}"#,
        "--timeout",
        "10s",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "done:led");

    // Readings of a device held by node A reach a `hub watch --readings` on node B.
    let mut readings_watch = b.cli_child(&["watch", &on_a[0], "--json", "--readings"]);
    let readings_out = readings_watch.stdout.take().expect("stdout");
    let first_reading = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(readings_out)
            .lines()
            .map_while(Result::ok)
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
            .find(|v| v["type"] == "readings")
    });
    let got = first_reading
        .join()
        .expect("watch thread")
        .expect("a readings event");
    assert_eq!(got["device"], on_a[0].as_str());
    let _ = readings_watch.kill();
    let _ = readings_watch.wait();

    // `hub watch` on node B sees presence changes of devices on node A.
    let mut watch = b.cli_child(&["watch", "--json"]);
    let watch_out = watch.stdout.take().expect("stdout");
    let seen = std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(watch_out)
            .lines()
            .map_while(Result::ok)
        {
            let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            if v["type"] == "presence" && v["online"] == false {
                return Some(v);
            }
        }
        None
    });

    // Let telemetry flow, so the kill lands mid-stream with batches in flight.
    let recorded = |stats: &[(String, Arc<SimStats>)]| -> u64 {
        stats
            .iter()
            .map(|(_, s)| s.recorded.load(Ordering::Relaxed))
            .sum()
    };
    let before = recorded(&stats);
    wait_for(Duration::from_secs(30), "more telemetry", || {
        (recorded(&stats) >= before + 400).then_some(())
    });

    // Kill node A: its devices come back through nginx on node B, and B's watcher hears
    // that they went offline.
    a.kill9();
    wait_for(
        Duration::from_secs(30),
        "every device back online on node B",
        || {
            let list = devices(&b);
            let online = list
                .iter()
                .filter(|d| d["online"] == true && d["node"].as_str() != Some(a_node.as_str()))
                .count();
            (online == fleet).then_some(())
        },
    );
    let offline = seen
        .join()
        .expect("watch thread")
        .expect("an offline event");
    assert!(
        on_a.iter().any(|id| offline["device"] == id.as_str()),
        "{offline}"
    );
    let _ = watch.kill();
    let _ = watch.wait();

    let after_failover = recorded(&stats);
    wait_for(
        Duration::from_secs(30),
        "telemetry after the failover",
        || (recorded(&stats) >= after_failover + 400).then_some(()),
    );

    // A command queued while a device is offline is delivered when it comes back. The
    // device process dies (its unacknowledged readings die with it, so it is left out of
    // the final count) and a fresh one takes its id.
    let victim = on_b[0].clone();
    let idx = stats
        .iter()
        .position(|(id, _)| *id == victim)
        .expect("index");
    tasks[idx].abort();
    wait_for(Duration::from_secs(10), "the device offline", || {
        devices(&b)
            .iter()
            .any(|d| d["id"] == victim.as_str() && d["online"] == false)
            .then_some(())
    });
    let (code, _, err) = b.cli(&["send", &victim, "relay", "--ttl", "1m"]);
    assert_eq!(code, 4, "{err}");
    let revived = Arc::new(SimStats::default());
    let opts = SimOptions {
        url: url.clone(),
        ca: a.ca(),
        token: b.token(&victim),
        batch: 1,
        interval: Duration::from_secs(3600),
    };
    let revived_task = tokio::spawn(sim::run(
        opts,
        revived.clone(),
        stop.clone(),
        stop_now.clone(),
    ));
    wait_for(
        Duration::from_secs(20),
        "the queued command delivered",
        || (revived.commands.load(Ordering::Relaxed) == 1).then_some(()),
    );
    let (code, out, _) = b.cli(&["commands", &victim, "--json"]);
    assert_eq!(code, 0);
    let cmds: Vec<serde_json::Value> = serde_json::from_str(&out).expect("json");
    assert!(
        cmds.iter()
            .any(|c| c["name"] == "relay" && c["state"] == "succeeded"),
        "{out}"
    );

    // Node A comes back (same address); then node B dies: the fleet moves to A. This
    // catches load balancers that keep shunning a hub that failed once.
    a.restart();
    b.kill9();
    wait_for(
        Duration::from_secs(30),
        "every device back online on node A",
        || {
            let list = devices(&a);
            let online = list
                .iter()
                .filter(|d| d["online"] == true && d["node"] == "node-a")
                .count();
            (online == fleet).then_some(())
        },
    );
    let after_second = recorded(&stats);
    wait_for(
        Duration::from_secs(30),
        "telemetry after the second failover",
        || (recorded(&stats) >= after_second + 400).then_some(()),
    );

    // Stop recording; every device drains what it has; nothing acked is lost and nothing
    // is stored twice.
    stop.store(true, Ordering::Relaxed);
    for (i, t) in tasks.into_iter().enumerate() {
        if i != idx {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(30), revived_task).await;
    let expected: HashMap<String, u64> = stats
        .iter()
        .filter(|(id, _)| *id != victim)
        .map(|(id, s)| {
            assert!(
                s.drained.load(Ordering::Relaxed),
                "{id} still holds unacknowledged readings"
            );
            (id.clone(), s.recorded.load(Ordering::Relaxed))
        })
        .collect();
    let got = wait_for(
        Duration::from_secs(20),
        "VictoriaMetrics to hold every reading",
        || {
            let got = stored(vm.port);
            expected
                .iter()
                .all(|(id, n)| got.get(id).copied().unwrap_or(0) >= *n)
                .then_some(got)
        },
    );
    eprintln!(
        "cluster: {} devices recorded {} readings, VictoriaMetrics holds {}; spread {spread:?}",
        expected.len(),
        expected.values().sum::<u64>(),
        expected
            .keys()
            .map(|id| got.get(id).copied().unwrap_or(0))
            .sum::<u64>()
    );
    for (id, n) in &expected {
        assert_eq!(
            got.get(id).copied().unwrap_or(0),
            *n,
            "{id}: recorded {n}, stored {:?}",
            got.get(id)
        );
    }
    drop(lb);
}

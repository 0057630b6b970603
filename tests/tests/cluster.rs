//! The cluster scenario: two hubs behind nginx (wss terminated at nginx, plain ws to the
//! hubs), a Redis backplane, and VictoriaMetrics as the InfluxDB line-protocol store. A
//! fleet spreads across both hubs; commands cross nodes; a node is killed mid-run; then
//! readings recorded, acknowledged and stored are counted, and commands delivered.

use std::collections::HashMap;
use std::time::Duration;

use e2e::cluster::{assert_stored_exactly, devices, node, Fleet, NodeOptions};
use e2e::servers::{nginx_wss, redis, victoria_metrics};
use e2e::wait_for;

// Extra workers: the test's own blocking polls must not starve the simulated devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hubs_behind_nginx_share_a_fleet_and_survive_losing_one() {
    let redis = redis();
    let vm = victoria_metrics();
    let options = NodeOptions::default();
    let mut a = node("node-a", redis.port, vm.port, &options);
    let mut b = node("node-b", redis.port, vm.port, &options);
    let lb = nginx_wss(
        &[a.device_addr(), b.device_addr()],
        &a.data_dir().join("tls/server.pem"),
        &a.data_dir().join("tls/server-key.pem"),
    );
    let url = format!("wss://localhost:{}/v1/device", lb.port);

    // A fleet through the load balancer.
    let fleet = 16;
    let mut sims = Fleet::start(
        &Fleet::numbered("sim", fleet),
        &url,
        a.ca(),
        |id| a.token(id),
        4,
        Duration::from_millis(50),
    );
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
    let on_a: Vec<String> = sims
        .ids()
        .into_iter()
        .filter(|id| node_of(id) == a_node)
        .collect();
    let on_b: Vec<String> = sims
        .ids()
        .into_iter()
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
    sims.wait_for_readings(400, "more telemetry");

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

    sims.wait_for_readings(400, "telemetry after the failover");

    // A command queued while a device is offline is delivered when it comes back. The
    // device process dies (its unacknowledged readings die with it, so it is left out of
    // the final count) and a fresh one takes its id.
    let victim = on_b[0].clone();
    sims.kill(&victim);
    wait_for(Duration::from_secs(10), "the device offline", || {
        devices(&b)
            .iter()
            .any(|d| d["id"] == victim.as_str() && d["online"] == false)
            .then_some(())
    });
    let (code, _, err) = b.cli(&["send", &victim, "relay", "--ttl", "1m"]);
    assert_eq!(code, 4, "{err}");
    let revived = Fleet::start(
        std::slice::from_ref(&victim),
        &url,
        a.ca(),
        |id| b.token(id),
        1,
        Duration::from_secs(3600),
    );
    wait_for(
        Duration::from_secs(20),
        "the queued command delivered",
        || (revived.commands()[&victim] == 1).then_some(()),
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
    sims.wait_for_readings(400, "telemetry after the second failover");

    // Stop recording; every device drains what it has; nothing acked is lost and nothing
    // is stored twice. The device that died took its unacknowledged readings with it, so
    // it is left out of the count.
    let expected = sims.finish().await;
    revived.finish().await;
    let stored = assert_stored_exactly(vm.port, &expected);
    eprintln!(
        "cluster: {} devices recorded {stored} readings, VictoriaMetrics holds them once each; spread {spread:?}",
        expected.len(),
    );
    drop(lb);
}

/// A job created on one node goes on when that node dies: the other node takes it over
/// once the lease lapses, and every device still runs the command exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_survives_the_node_running_it() {
    let redis = redis();
    let vm = victoria_metrics();
    let options = NodeOptions::default();
    let mut a = node("node-a", redis.port, vm.port, &options);
    let b = node("node-b", redis.port, vm.port, &options);
    // Every device on node B; the job runs on node A, where it is created.
    let sims = Fleet::start(
        &Fleet::numbered("job", 20),
        b.device_url.trim(),
        b.ca(),
        |id| b.token(id),
        1,
        Duration::from_secs(3600),
    );
    wait_for(Duration::from_secs(30), "20 devices online", || {
        (devices(&a).iter().filter(|d| d["online"] == true).count() == 20).then_some(())
    });
    let (code, out, err) = a.cli(&["send", "--all", "led", "--rate", "4/s", "--no-wait"]);
    assert_eq!(code, 0, "{err}");
    let id = out.trim().to_string();
    let created = || {
        let (_, out, _) = b.cli(&["jobs", "show", &id, "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        20 - v["counts"]["pending"].as_u64().unwrap_or(20)
    };
    wait_for(Duration::from_secs(20), "some commands created", || {
        (created() >= 4).then_some(())
    });
    a.kill9();
    let (code, out, err) = b.cli(&["jobs", "show", &id, "--wait"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("completed") && out.contains("succeeded      20"),
        "{out}"
    );
    assert!(b.log().contains("job ended"), "node B finished it");
    let ran = sims.commands();
    assert!(ran.values().all(|n| *n == 1), "{ran:?}");
}

//! The cluster under partial failure, on loopback with real Redis, nginx and
//! VictoriaMetrics: a node frozen (SIGSTOP) for longer than the dead-node timeout, a node
//! cut off from Redis while its devices stay connected (a TCP proxy that black-holes
//! traffic), Redis restarted, and a node killed twice within 30 s. After each, within the
//! bounds stated below, every node agrees on who holds which device, every command sent
//! during the fault ran exactly once (or was refused with an error), and every acked
//! reading is stored exactly once.
//!
//! Timing: heartbeat 200 ms, so a node is dead 600 ms after its last beat. Bounds (far
//! above what is measured, for a loaded 2-core machine): detection 5 s, agreement after
//! the fault ends 5 s (10 s when devices must move or Redis must come back), commands 15 s.
//! Each test prints what it measured (`cargo test -p e2e --test cluster_faults --
//! --nocapture`).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use e2e::cluster::{
    assert_stored_exactly, held_by, holders, node, per_node, status, Fleet, NodeOptions, ADMIN,
};
use e2e::process::signal_pid;
use e2e::servers::{nginx_wss, redis, redis_persistent, victoria_metrics, Server, TcpProxy};
use e2e::{wait_for, Hub};

const FLEET: usize = 12;
const DETECTION: Duration = Duration::from_secs(5);
const AGREEMENT: Duration = Duration::from_secs(5);
const MOVED: Duration = Duration::from_secs(10);
const COMMANDS: Duration = Duration::from_secs(15);

/// Two nodes behind nginx, with a fleet spread over both.
struct Cluster {
    vm: Server,
    a: Hub,
    b: Hub,
    _lb: Server,
    fleet: Fleet,
}

/// Starts node-a (on `a_redis`, which may be a proxy) and node-b (on `redis`) with
/// `options`, nginx in front, and a fleet that spreads over both.
fn cluster(redis: u16, a_redis: u16, options: &NodeOptions) -> Cluster {
    let vm = victoria_metrics();
    let a = node("node-a", a_redis, vm.port, options);
    let b = node("node-b", redis, vm.port, options);
    let lb = nginx_wss(
        &[a.device_addr(), b.device_addr()],
        &a.data_dir().join("tls/server.pem"),
        &a.data_dir().join("tls/server-key.pem"),
    );
    let url = format!("wss://localhost:{}/v1/device", lb.port);
    let fleet = Fleet::start(
        &Fleet::numbered("dev", FLEET),
        &url,
        a.ca(),
        |id| a.token(id),
        2,
        Duration::from_millis(100),
    );
    wait_for(
        Duration::from_secs(30),
        "the fleet online on both nodes",
        || {
            let held = holders(&b)?;
            (held.len() == FLEET && per_node(&held).len() == 2).then_some(())
        },
    );
    fleet.wait_for_readings(200, "telemetry before the fault");
    Cluster {
        vm,
        a,
        b,
        _lb: lb,
        fleet,
    }
}

/// Waits until `hubs` all answer and agree on who holds which device, every device is
/// online and `check` holds; returns the agreed map.
fn agreement(
    hubs: &[&Hub],
    within: Duration,
    what: &str,
    check: impl Fn(&HashMap<String, String>) -> bool,
) -> HashMap<String, String> {
    wait_for(within, what, || {
        let first = holders(hubs[0])?;
        for hub in &hubs[1..] {
            if holders(hub)? != first {
                return None;
            }
        }
        (first.len() == FLEET && check(&first)).then_some(first)
    })
}

/// Queues command `led` for `device` through `hub`; the command id, or None when the hub
/// refused (it reported the failure).
fn send(hub: &Hub, device: &str) -> Option<u64> {
    let (code, v) = hub.api(
        "POST",
        &format!("/api/v1/devices/{device}/commands"),
        Some(ADMIN),
        Some(r#"{"name": "led", "args": {"on": true}, "ttl": "2m", "timeout": "1m"}"#),
    );
    (code == 201).then(|| v["id"].as_u64()).flatten()
}

/// Waits until every command in the ledger has succeeded and each device has run exactly
/// as many commands as the ledger holds for it; returns the number of commands.
fn commands_ran_exactly_once(hub: &Hub, fleet: &Fleet, sent: &[u64]) -> usize {
    let ledger = |device: &str| -> Option<Vec<serde_json::Value>> {
        let (code, v) = hub.api(
            "GET",
            &format!("/api/v1/devices/{device}/commands?limit=1000"),
            Some(ADMIN),
            None,
        );
        (code == 200).then(|| v["commands"].as_array().cloned().unwrap_or_default())
    };
    wait_for(COMMANDS, "every command to run exactly once", || {
        let ran = fleet.commands();
        let mut total = 0;
        let mut ids = Vec::new();
        for device in fleet.ids() {
            let commands = ledger(&device)?;
            if commands.iter().any(|c| c["state"] != "succeeded") {
                return None;
            }
            assert!(
                ran[&device] <= commands.len() as u64,
                "{device} ran {} commands, the ledger holds {}",
                ran[&device],
                commands.len()
            );
            if ran[&device] != commands.len() as u64 {
                return None;
            }
            total += commands.len();
            ids.extend(commands.iter().filter_map(|c| c["id"].as_u64()));
        }
        assert!(
            sent.iter().all(|id| ids.contains(id)),
            "accepted commands missing from the ledger"
        );
        Some(total)
    })
}

/// Stops the fleet and checks that VictoriaMetrics holds every recorded reading once.
async fn readings_stored_exactly_once(c: Cluster) -> u64 {
    let recorded = c.fleet.finish().await;
    assert_stored_exactly(c.vm.port, &recorded)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

// Multi-threaded: the test's blocking polls must not starve the simulated devices.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_node_is_seen_alive_again_and_delivers_what_queued_meanwhile() {
    let redis = redis();
    // Devices hear from the hub at most every 3 s and wait 8 s for it: they stay
    // connected to the frozen node, as they do through a GC pause or a swapped VM.
    let options = NodeOptions {
        ping_interval: "3s",
        pong_timeout: "4s",
        ..NodeOptions::default()
    };
    let c = cluster(redis.port, redis.port, &options);
    let on_a = held_by(&c.b, "node-a");

    let frozen = Instant::now();
    signal_pid(c.a.pid(), "STOP");
    wait_for(
        DETECTION,
        "node-b to count node-a's devices offline",
        || {
            let held = holders(&c.b)?;
            on_a.iter().all(|d| !held.contains_key(d)).then_some(())
        },
    );
    let detection = frozen.elapsed();
    // Commands for the frozen node's devices queue meanwhile.
    let sent: Vec<u64> = on_a.iter().filter_map(|d| send(&c.b, d)).collect();
    assert_eq!(sent.len(), on_a.len(), "node-b refused commands");
    wait_for(Duration::from_secs(5), "a 3 s stall", || {
        (frozen.elapsed() >= Duration::from_secs(3)).then_some(())
    });
    let thawed = Instant::now();
    signal_pid(c.a.pid(), "CONT");
    let held = agreement(&[&c.a, &c.b], AGREEMENT, "both nodes to agree", |held| {
        on_a.iter()
            .all(|d| held.get(d).map(String::as_str) == Some("node-a"))
    });
    let converged = thawed.elapsed();
    assert_eq!(per_node(&held)["node-a"], on_a.len());
    let commands = commands_ran_exactly_once(&c.b, &c.fleet, &sent);
    let delivered = thawed.elapsed();
    c.fleet.wait_for_readings(200, "telemetry after the stall");
    let stored = readings_stored_exactly_once(c).await;
    eprintln!(
        "stall: node-a frozen 3 s holding {} devices; node-b counted them offline after {}; \
         both nodes agreed {} after SIGCONT; {commands} commands queued during the stall ran \
         once each, the last {} after SIGCONT; {stored} readings stored once",
        on_a.len(),
        secs(detection),
        secs(converged),
        secs(delivered)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_off_from_redis_gives_its_devices_up_and_rejoins() {
    let redis = redis();
    let proxy = TcpProxy::start(redis.port);
    let c = cluster(redis.port, proxy.port, &NodeOptions::default());
    let on_a = held_by(&c.b, "node-a");

    let cut = Instant::now();
    proxy.pause();
    // Commands sent now find the devices on node-a, which cannot hear about them.
    let sent: Vec<u64> = on_a.iter().filter_map(|d| send(&c.b, d)).collect();
    assert_eq!(sent.len(), on_a.len(), "node-b refused commands");
    agreement(&[&c.b], MOVED, "every device on node-b", |held| {
        held.values().all(|n| n == "node-b")
    });
    let moved = cut.elapsed();
    // While cut off, node-a turns devices away, so that they go to a node that can serve
    // them. (The token comes through node-b: node-a's API cannot register the device.)
    let url = format!("ws://{}/v1/device", c.a.device_addr());
    let refused = e2e::client::connect(
        &url,
        &c.a.ca(),
        Some(&c.b.token("probe")),
        Some("hub.v1.json"),
    )
    .await
    .err()
    .and_then(|e| e2e::client::refusal(&e));
    assert!(
        matches!(&refused, Some((503, body)) if body.contains("backplane")),
        "{refused:?}"
    );
    let commands = commands_ran_exactly_once(&c.b, &c.fleet, &sent);
    let delivered = cut.elapsed();

    let healed = Instant::now();
    proxy.resume();
    wait_for(AGREEMENT, "node-a alive again", || {
        let nodes = status(&c.b)?["nodes"].as_array()?.clone();
        nodes
            .iter()
            .any(|n| n["node"] == "node-a" && n["alive"] == true)
            .then_some(())
    });
    let rejoined = healed.elapsed();
    // node-a holds nothing now; a rebalance gives it its share back.
    let (code, out, err) = c.b.cli(&["cluster", "rebalance", "--rate", "50"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("node-b: holds"), "{out}");
    let rebalancing = Instant::now();
    let held = agreement(&[&c.a, &c.b], MOVED, "the fleet spread again", |held| {
        per_node(held).get("node-a").copied().unwrap_or(0) >= FLEET / 2 - 1
    });
    let rebalanced = rebalancing.elapsed();
    c.fleet
        .wait_for_readings(200, "telemetry after the partition");
    let stored = readings_stored_exactly_once(c).await;
    eprintln!(
        "partition: node-a cut off from Redis; all {FLEET} devices held by node-b after {}; \
         {commands} commands sent at the cut ran once each within {}; node-a alive {} after \
         the cut healed; rebalanced to {:?} in {}; {stored} readings stored once",
        secs(moved),
        secs(delivered),
        secs(rejoined),
        per_node(&held),
        secs(rebalanced)
    );
    drop(proxy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restarted_loses_nothing_and_the_nodes_agree_again() {
    let mut redis = redis_persistent();
    let c = cluster(redis.port, redis.port, &NodeOptions::default());
    let ids = c.fleet.ids();
    // Commands go out through node-b before, during and after the restart: each is
    // either refused with an error or runs exactly once.
    let mut sent: Vec<u64> = ids.iter().filter_map(|d| send(&c.b, d)).collect();
    assert_eq!(sent.len(), FLEET);
    let down = Instant::now();
    let stopping = redis.stop();
    let mut refused = 0;
    for d in &ids[..4] {
        match send(&c.b, d) {
            Some(id) => sent.push(id),
            None => refused += 1,
        }
    }
    // Down for longer than a node may miss beats: every node gives its devices up.
    wait_for(Duration::from_secs(5), "1.5 s without Redis", || {
        (down.elapsed() >= Duration::from_millis(1500)).then_some(())
    });
    redis.start_again();
    let back = Instant::now();
    sent.extend(ids.iter().filter_map(|d| send(&c.b, d)));
    agreement(&[&c.a, &c.b], MOVED, "both nodes to agree", |_| true);
    let converged = back.elapsed();
    let commands = commands_ran_exactly_once(&c.b, &c.fleet, &sent);
    c.fleet
        .wait_for_readings(200, "telemetry after the restart");
    let stored = readings_stored_exactly_once(c).await;
    eprintln!(
        "redis restart: stopped in {}, down {}; every device online and both nodes agreeing \
         {} after it was back; {commands} commands ran once each ({refused} refused while it \
         was down); {stored} readings stored once",
        secs(stopping),
        secs(back - down),
        secs(converged)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_twice_within_30_s_is_detected_fast_both_times() {
    let redis = redis();
    let options = NodeOptions {
        rebalance: "auto",
        rebalance_rate: 50,
        ..NodeOptions::default()
    };
    let mut c = cluster(redis.port, redis.port, &options);
    let mut detections = Vec::new();
    let mut failovers = Vec::new();
    let first = Instant::now();
    let mut sent = Vec::new();
    for round in 0..2 {
        let on_a = held_by(&c.b, "node-a");
        let killed = Instant::now();
        c.a.kill9();
        // Commands for the dead node's devices wait for them wherever they reconnect.
        sent.extend(on_a.iter().filter_map(|d| send(&c.b, d)));
        // Detected: the reaper took node-a out of the cluster.
        wait_for(DETECTION, "node-b to reap node-a", || {
            let nodes = status(&c.b)?["nodes"].as_array()?.clone();
            nodes.iter().all(|n| n["node"] != "node-a").then_some(())
        });
        detections.push(killed.elapsed());
        agreement(&[&c.b], MOVED, "every device on node-b", |held| {
            held.values().all(|n| n == "node-b")
        });
        failovers.push(killed.elapsed());
        if round == 0 {
            // node-a comes back under the same id and, rebalancing automatically, node-b
            // hands it its share.
            c.a.restart();
            agreement(
                &[&c.a, &c.b],
                MOVED * 2,
                "node-a to get devices back",
                |held| per_node(held).get("node-a").copied().unwrap_or(0) >= FLEET / 2 - 2,
            );
        }
    }
    let within = first.elapsed();
    assert!(within < Duration::from_secs(30), "{within:?}");
    let commands = commands_ran_exactly_once(&c.b, &c.fleet, &sent);
    // What an operator sees (the device count is node-b's, as of its last beat).
    let out = wait_for(AGREEMENT, "hub cluster status to show one node", || {
        let (code, out, err) = c.b.cli(&["cluster", "status"]);
        assert_eq!(code, 0, "{err}");
        out.contains(&format!("{FLEET} devices on 1 live node(s)"))
            .then_some(out)
    });
    assert!(out.contains("node-b (this hub)  alive"), "{out}");
    assert!(!out.contains("node-a"), "{out}");
    c.fleet.wait_for_readings(200, "telemetry after the kills");
    let stored = readings_stored_exactly_once(c).await;
    eprintln!(
        "killed twice within {}: node-a reaped after {} and {}, every device on node-b \
         after {} and {}; {commands} commands sent after the kills ran once each; {stored} \
         readings stored once",
        secs(within),
        secs(detections[0]),
        secs(detections[1]),
        secs(failovers[0]),
        secs(failovers[1])
    );
}

//! Firmware updates in a cluster: two hubs share Redis, one firmware directory and one
//! signing key, behind nginx; simulated boards (`firmware-sim`) spread over both nodes. A
//! rollout started through node A reaches the boards on both nodes and completes, with
//! every board's `firmware` events and the rollout's on the event stream of each node; a
//! second rollout survives a `kill -9` of the node advancing it: the other node takes it
//! over once the lease lapses, the dead node's boards reconnect through nginx to the
//! survivor and resume, and every board ends on the new version.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::boards::{self, Flash};
use e2e::cluster::{devices, holders, node, per_node, NodeOptions, ADMIN};
use e2e::servers::{nginx_wss, redis, victoria_metrics};
use e2e::{wait_for, Hub, TempDir};
use serde_json::Value;

const BOARDS: usize = 8;
const WAIT: Duration = Duration::from_secs(60);

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The `firmware` and `rollout` events of `hub`'s event stream, as (name, data), collected
/// by a thread until the stream ends (the hub stops).
fn collect_events(hub: &Hub) -> Arc<Mutex<Vec<(String, Value)>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let resp = agent
        .get(format!("{}/api/v1/events", hub.admin_url()))
        .header("Authorization", format!("Bearer {ADMIN}"))
        .call()
        .expect("event stream");
    assert_eq!(resp.status().as_u16(), 200);
    let out = seen.clone();
    std::thread::spawn(move || {
        let mut name = String::new();
        for line in BufReader::new(resp.into_body().into_reader()).lines() {
            let Ok(line) = line else { return };
            if let Some(v) = line.strip_prefix("event: ") {
                name = v.to_string();
            } else if let Some(v) = line.strip_prefix("data: ") {
                if name == "firmware" || name == "rollout" {
                    if let Ok(mut seen) = out.lock() {
                        seen.push((name.clone(), json(v)));
                    }
                }
            }
        }
    });
    seen
}

/// How many `firmware` events in `events` said each board reached `state` on `version`.
fn outcomes(
    events: &Mutex<Vec<(String, Value)>>,
    version: &str,
    state: &str,
) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for (name, e) in events.lock().expect("events").iter() {
        if name == "firmware" && e["version"] == version && e["state"] == state {
            *out.entry(e["device"].as_str().unwrap_or_default().to_string())
                .or_insert(0) += 1;
        }
    }
    out
}

fn rollout(hub: &Hub, id: u64) -> Value {
    let (code, out, err) = hub.cli(&["rollout", "status", &id.to_string(), "--json"]);
    assert_eq!(code, 0, "{err}");
    json(&out)
}

/// Starts a rollout of `version` over every board through `hub`: a canary of 2, then
/// half, then all.
fn start_rollout(hub: &Hub, version: &str) -> u64 {
    let (code, out, err) = hub.cli(&[
        "rollout",
        "start",
        "--firmware",
        version,
        "--all",
        "--canary",
        "2",
        "--steps",
        "50%,100%",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    json(&out)["id"].as_u64().expect("id")
}

/// Waits for rollout `id` to complete, read on `hub`, with every board succeeded.
fn wait_completed(hub: &Hub, id: u64, logs: &str) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = rollout(hub, id);
        if v["state"] == "completed" {
            assert_eq!(v["counts"]["succeeded"], BOARDS, "{}", v["counts"]);
            return v;
        }
        assert!(
            v["state"] == "running" && Instant::now() < deadline,
            "rollout {id} did not complete: {v}\n{logs}"
        );
        e2e::pause(Duration::from_millis(100));
    }
}

/// How many boards each version runs, among the online ones `hub` lists.
fn versions(hub: &Hub) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for d in devices(hub).iter().filter(|d| d["online"] == true) {
        *out.entry(d["firmware"].as_str().unwrap_or_default().to_string())
            .or_insert(0) += 1;
    }
    out
}

/// `hub_rollouts{state="completed"}` on `hub`'s `/metrics`.
fn completed_gauge(hub: &Hub) -> Option<u64> {
    let (_, body) = hub.api("GET", "/metrics", Some(ADMIN), None);
    let text = body.as_str().unwrap_or_default().to_string();
    text.lines()
        .find(|l| l.starts_with("hub_rollouts{state=\"completed\"}"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

/// Whether `log` says its node advanced rollout `id`.
fn advanced(log: &str, id: u64) -> bool {
    log.lines()
        .any(|l| l.contains("advancing rollout here") && l.contains(&format!("rollout={id}")))
}

#[test]
fn rollouts_reach_boards_on_every_node_and_survive_losing_the_node_running_them() {
    let started = Instant::now();
    let redis = redis();
    let vm = victoria_metrics();
    // The images and the signing key every node shares (a network file system in a
    // deployment).
    let shared = TempDir::new("firmware");
    let options = NodeOptions {
        env: vec![
            (
                "HUB_FIRMWARE__DIR".into(),
                shared.path().join("images").display().to_string(),
            ),
            (
                "HUB_FIRMWARE__SIGNING_KEY".into(),
                shared.path().join("signing-key").display().to_string(),
            ),
        ],
        ..NodeOptions::default()
    };
    let a = node("node-a", redis.port, vm.port, &options);
    let b = node("node-b", redis.port, vm.port, &options);
    let lb = nginx_wss(
        &[a.device_addr(), b.device_addr()],
        &a.data_dir().join("tls/server.pem"),
        &a.data_dir().join("tls/server-key.pem"),
    );
    let url = format!("wss://localhost:{}/v1/device", lb.port);

    // Images added through node A are on node B too, signed with the one key.
    for (version, seed) in [("1.1", 7u8), ("1.2", 8)] {
        boards::add_image(&a, shared.path(), version, 48 * 1024, seed, &[]);
    }
    let (code, key, err) = a.cli(&["firmware", "key"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(b.cli(&["firmware", "key"]).1, key, "one signing key");
    let (code, out, err) = b.cli(&["firmware", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("1.1") && out.contains("1.2"), "{out}");

    let boards_dir = TempDir::new("boards");
    let images: Vec<PathBuf> = (0..BOARDS)
        .map(|i| {
            let device = format!("board-{i:02}");
            boards::flash(&Flash {
                image: boards_dir.path().join(format!("{device}.img")),
                device: &device,
                url: &url,
                token: &a.token(&device),
                ca: &a.ca(),
                version: "1.0",
                update_key: &key,
            })
        })
        .collect();
    let board_log = boards_dir.path().join("boards.log");
    let sims = boards::run(&images, None, Some(&board_log));
    let spread = wait_for(WAIT, "every board online, on both nodes", || {
        let held = holders(&a)?;
        let nodes = per_node(&held);
        (held.len() == BOARDS && nodes.len() == 2).then_some(nodes)
    });
    let logs = |hubs: &[&Hub]| -> String {
        let mut out = format!(
            "boards:\n{}",
            std::fs::read_to_string(&board_log).unwrap_or_default()
        );
        for hub in hubs {
            out += &format!("\nhub:\n{}", hub.log());
        }
        out
    };
    let events_a = collect_events(&a);
    let events_b = collect_events(&b);

    // A rollout started through node A reaches the boards on both nodes.
    let first = Instant::now();
    let id = start_rollout(&a, "1.1");
    wait_completed(&b, id, &logs(&[&a, &b]));
    let first = first.elapsed();
    wait_for(WAIT, "every board on 1.1", || {
        (versions(&a).get("1.1") == Some(&BOARDS)).then_some(())
    });
    // Each node's stream shows every board's outcome, whichever node held the board and
    // whichever advanced the rollout, and the rollout's end.
    let all: Vec<String> = (0..BOARDS).map(|i| format!("board-{i:02}")).collect();
    for events in [&events_a, &events_b] {
        wait_for(WAIT, "every board's succeeded event on both nodes", || {
            let seen = outcomes(events, "1.1", "succeeded");
            (seen.keys().eq(all.iter())).then_some(())
        });
        wait_for(WAIT, "the rollout's completed event on both nodes", || {
            events
                .lock()
                .expect("events")
                .iter()
                .any(|(n, e)| n == "rollout" && e["id"] == id && e["state"] == "completed")
                .then_some(())
        });
    }
    // One outcome event each: a board repeating its outcome changes nothing.
    for events in [&events_a, &events_b] {
        let seen = outcomes(events, "1.1", "succeeded");
        assert!(seen.values().all(|n| *n == 1), "{seen:?}");
    }
    for hub in [&a, &b] {
        wait_for(WAIT, "the completed-rollouts gauge on both nodes", || {
            (completed_gauge(hub) == Some(1)).then_some(())
        });
    }

    // The node advancing the next rollout dies midway (kill -9); the other one takes it
    // over once the lease lapses and the boards it held come back through nginx.
    let second = Instant::now();
    let id = start_rollout(&a, "1.2");
    let a_advances = wait_for(WAIT, "the canary done and the next step offered", || {
        let c = rollout(&b, id)["counts"].clone();
        let offered = BOARDS as u64 - c["pending"].as_u64().unwrap_or(BOARDS as u64);
        if c["succeeded"].as_u64().unwrap_or(0) < 2 || offered <= 2 {
            return None;
        }
        match (advanced(&a.log(), id), advanced(&b.log(), id)) {
            (true, false) => Some(true),
            (false, true) => Some(false),
            _ => None,
        }
    });
    let (mut dead, survivor, survivor_name, survivor_events) = if a_advances {
        (a, b, "node-b", events_b)
    } else {
        (b, a, "node-a", events_a)
    };
    dead.kill9();
    let killed = Instant::now();
    let done = wait_completed(&survivor, id, &logs(&[&survivor, &dead]));
    let takeover = killed.elapsed();
    assert!(
        advanced(&survivor.log(), id),
        "{survivor_name} took the rollout over"
    );
    wait_for(WAIT, "every board on 1.2, all on the survivor", || {
        let held = holders(&survivor)?;
        (versions(&survivor).get("1.2") == Some(&BOARDS)
            && held.len() == BOARDS
            && held.values().all(|n| n == survivor_name))
        .then_some(())
    });
    // The dead node's boards came back and may have said their outcome again: still one
    // event each (an outcome sent just before the kill may not have been forwarded).
    let seen = outcomes(&survivor_events, "1.2", "succeeded");
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");

    // Aborting withdraws what was not started, once: a second abort is refused.
    let (code, out, err) = survivor.cli(&[
        "rollout",
        "start",
        "--firmware",
        "1.1",
        "--all",
        "--rate",
        "1/min",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let id = json(&out)["id"].as_u64().expect("id").to_string();
    let (code, out, err) = survivor.cli(&["rollout", "abort", &id]);
    assert_eq!(
        (code, out.trim()),
        (0, format!("rollout {id} is aborted").as_str()),
        "{err}"
    );
    let (code, _, _) = survivor.cli(&["rollout", "abort", &id]);
    assert_ne!(code, 0, "an aborted rollout is not aborted again");
    let aborted = wait_for(WAIT, "the aborted rollout settled", || {
        let v = rollout(&survivor, id.parse().expect("id"));
        let c = &v["counts"];
        (c["offered"] == 0 && c["in_progress"] == 0).then_some(v)
    });
    assert!(
        aborted["counts"]["pending"].as_u64().unwrap_or(0) >= BOARDS as u64 - 1,
        "at most one board was offered at 1/min: {aborted}"
    );
    eprintln!(
        "{BOARDS} boards over two nodes ({spread:?}); rollout of 1.1 took {:.1} s; rollout of 1.2 with the advancing node killed took {:.1} s ({:.1} s after the kill), counts {}; test {:.1} s",
        first.as_secs_f64(),
        second.elapsed().as_secs_f64(),
        takeover.as_secs_f64(),
        done["counts"],
        started.elapsed().as_secs_f64()
    );
    drop(sims);
    drop(lb);
}

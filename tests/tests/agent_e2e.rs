//! End-to-end tests of `device-agent` against the real `hub`: system readings arrive and
//! can be queried, configured actions run through `hub send` without a shell, readings
//! wait on disk while the hub is down and arrive once (also across a `kill -9` of the
//! agent), a refused token is retried slowly with a clear log line, and desired state
//! reaches sensors and the configured program. Firmware updates: `agent_firmware.rs`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use e2e::agent::{config, script, Agent};
use e2e::process::binary;
use e2e::{try_wait, wait_for, Hub, HubOptions, TempDir};

const T: Duration = Duration::from_secs(30);

/// `hub serve` on a fixed device port over an existing hub's data directory: an agent's
/// hub URL is fixed, while the harness's `Hub::restart` picks a new port.
struct HubOnPort(Option<Child>);

impl HubOnPort {
    fn start(hub: &Hub, port: u16) -> HubOnPort {
        let data = hub.data_dir();
        let url_file = data.join("device-url");
        let _ = std::fs::remove_file(&url_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(hub.dir.path().join("hub.log"))
            .expect("hub log");
        let child = Command::new(binary("hub"))
            .arg("serve")
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--api-listen", "127.0.0.1:0"])
            .env("HUB_DEVICE__PING_INTERVAL", hub.options.ping_interval)
            .env("HUB_DEVICE__PONG_TIMEOUT", hub.options.pong_timeout)
            .env("HUB_LOG__LEVEL", "info,hub=debug")
            .env_remove("HUB_API")
            .env_remove("HUB_ADMIN_TOKEN")
            .current_dir(hub.dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn hub");
        let mut me = HubOnPort(Some(child));
        wait_for(T, "the hub to start on its old port", || {
            if let Some(c) = me.0.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    panic!("hub exited during start-up with {status}:\n{}", hub.log());
                }
            }
            std::fs::read_to_string(&url_file).ok()
        });
        me
    }
}

impl Drop for HubOnPort {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn port_of(url: &str) -> u16 {
    url.trim()
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("port in the device URL")
}

/// A script that counts its runs in `state` and prints the count: a known sequence
/// 1, 2, 3, ... to compare with what the hub stored.
fn counter_sensor(dir: &Path, interval: &str) -> String {
    let script = dir.join("counter.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nn=$(cat \"$1\" 2>/dev/null || echo 0)\nn=$((n+1))\necho \"$n\" > \"$1.tmp\" && mv \"$1.tmp\" \"$1\"\necho \"$n\"\n",
    )
    .expect("script");
    format!(
        r#"[[sensors]]
name = "counter"
kind = "exec"
program = "/bin/sh"
args = ["{script}", "{state}"]
interval = "{interval}"
timeout = "5s"
"#,
        script = script.display(),
        state = dir.join("counter.state").display(),
    )
}

fn counter_value(dir: &Path) -> i64 {
    std::fs::read_to_string(dir.join("counter.state"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// (count, distinct values, min, max) of the stored `counter` readings of a device.
fn stored_counter(hub: &Hub, device: &str) -> (i64, i64, i64, i64) {
    hub.telemetry_db()
        .query_row(
            "SELECT count(*), count(DISTINCT r.value), coalesce(min(r.value), 0), coalesce(max(r.value), 0)
             FROM readings r JOIN series s ON s.id = r.series
             WHERE s.device = ?1 AND s.metric = 'counter'",
            [device],
            |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, f64>(2)? as i64,
                    r.get::<_, f64>(3)? as i64,
                ))
            },
        )
        .expect("query counter readings")
}

/// Waits until the hub holds exactly the counter values 1..=n for some n >= `at_least`,
/// each once, and returns n.
fn wait_for_complete_counter(hub: &Hub, device: &str, at_least: i64, agent: &Agent) -> i64 {
    let mut last = (0, 0, 0, 0);
    let found = try_wait(T, || {
        last = stored_counter(hub, device);
        let (count, distinct, min, max) = last;
        (count >= at_least && count == distinct && min == 1 && max == count).then_some(max)
    });
    match found {
        Some(n) => n,
        None => panic!(
            "counter readings incomplete or duplicated: (count, distinct, min, max) = {last:?}, wanted 1..={at_least} or more once each\nagent log:\n{}\nhub log:\n{}",
            agent.log(),
            hub.log()
        ),
    }
}

fn mem_samples(hub: &Hub, device: &str) -> i64 {
    hub.telemetry_db()
        .query_row(
            "SELECT count(*) FROM readings r JOIN series s ON s.id = r.series
             WHERE s.device = ?1 AND s.metric = 'mem.used_bytes'",
            [device],
            |r| r.get(0),
        )
        .expect("count")
}

fn metrics_of(hub: &Hub, device: &str) -> Vec<String> {
    let db = hub.telemetry_db();
    let mut stmt = db
        .prepare("SELECT metric FROM series WHERE device = ?1 ORDER BY metric")
        .expect("prepare");
    let rows = stmt
        .query_map([device], |r| r.get::<_, String>(0))
        .expect("query");
    rows.filter_map(Result::ok).collect()
}

#[test]
fn system_readings_arrive_and_can_be_queried() {
    let hub = Hub::start(HubOptions::default());
    let mut agents = Vec::new();
    let dirs: Vec<TempDir> = (0..2).map(|_| TempDir::new("agent-sys")).collect();
    for (dir, (device, encoding)) in dirs
        .iter()
        .zip([("pi-postcard", "postcard"), ("pi-json", "json")])
    {
        let extra = "[[sensors]]\nname = \"system\"\nkind = \"system\"\ninterval = \"1s\"\n";
        let cfg = config(&hub, dir.path(), device, encoding, extra);
        agents.push((device, Agent::start(dir.path(), &cfg)));
    }
    let expected = [
        "cpu.usage_pct",
        "mem.total_bytes",
        "mem.used_bytes",
        "load.1",
        "load.15",
        "uptime_s",
        "disk.root.total_bytes",
        "disk.root.used_bytes",
    ];
    for (device, agent) in &agents {
        let found = try_wait(T, || {
            let m = metrics_of(&hub, device);
            let complete = expected.iter().all(|e| m.iter().any(|x| x == e))
                && m.iter()
                    .any(|x| x.starts_with("net.") && x.ends_with(".rx_bytes"));
            complete.then_some(m)
        });
        let Some(metrics) = found else {
            panic!(
                "{device}: system metrics missing; stored: {:?}\nagent log:\n{}",
                metrics_of(&hub, device),
                agent.log()
            );
        };
        assert!(metrics.len() >= expected.len() + 2, "{metrics:?}");
        // Plausible values: total memory is positive and at least what is used.
        let total: f64 = hub
            .telemetry_db()
            .query_row(
                "SELECT max(r.value) FROM readings r JOIN series s ON s.id = r.series
                 WHERE s.device = ?1 AND s.metric = 'mem.total_bytes'",
                [device],
                |r| r.get(0),
            )
            .expect("mem.total_bytes");
        assert!(total > 1e6, "{total}");
        // And the operator sees them with `hub query`.
        let (code, out, err) = hub.cli(&[
            "query",
            device,
            "--metric",
            "mem.total_bytes",
            "--since",
            "10m",
            "--format",
            "csv",
        ]);
        assert_eq!(code, 0, "hub query failed: {err}");
        assert!(out.lines().count() >= 2, "{out}");
        assert!(
            out.contains(&format!("{total}")) || out.contains(&format!("{}", total as u64)),
            "{out}"
        );
    }
    for (_, agent) in &mut agents {
        assert!(agent.stop().success());
        assert!(agent
            .log()
            .contains("stopped; waiting readings stay on disk"));
    }
}

#[test]
fn readings_wait_on_disk_while_the_hub_is_down_and_arrive_once() {
    let mut hub = Hub::start(HubOptions::default());
    let port = port_of(&hub.device_url);
    let dir = TempDir::new("agent-outage");
    let device = "outage-1";
    let cfg = config(
        &hub,
        dir.path(),
        device,
        "postcard",
        &counter_sensor(dir.path(), "200ms"),
    );
    let agent = Agent::start(dir.path(), &cfg);
    wait_for_complete_counter(&hub, device, 3, &agent);

    // The hub goes away (crash) for a while.
    hub.kill9();
    let waiting = try_wait(T, || {
        let s = agent.status();
        (s["batches"].as_u64()? >= 10).then_some(s)
    })
    .unwrap_or_else(|| panic!("readings did not pile up on disk\n{}", agent.log()));
    assert!(waiting["readings"].as_u64().unwrap_or(0) >= 10, "{waiting}");
    let produced_while_down = counter_value(dir.path());

    // Back on the same port: everything arrives, each reading once, no gaps.
    let _back = HubOnPort::start(&hub, port);
    let n = wait_for_complete_counter(&hub, device, produced_while_down, &agent);
    assert!(n >= produced_while_down);
    assert!(
        agent.log().contains("readings wait on disk"),
        "the outage is logged"
    );
    // The agent kept the hub's session ticket across its reconnects and resumed.
    assert!(
        hub.metric(r#"hub_tls_handshakes_total{kind="resumed"}"#) >= Some(1.0),
        "the agent resumed its TLS session with the restarted hub\n{}",
        agent.log()
    );
}

#[test]
fn buffered_readings_survive_kill_9_of_the_agent() {
    let mut hub = Hub::start(HubOptions::default());
    let port = port_of(&hub.device_url);
    let dir = TempDir::new("agent-kill9");
    let device = "kill9-1";
    // One sample a second leaves a wide quiet gap between samples to kill the agent in:
    // a sample being taken at the instant of the kill was never recorded, so it is not
    // what this test is about.
    let cfg = config(
        &hub,
        dir.path(),
        device,
        "postcard",
        &counter_sensor(dir.path(), "1s"),
    );
    let mut agent = Agent::start(dir.path(), &cfg);
    wait_for_complete_counter(&hub, device, 2, &agent);
    hub.kill9();
    // Wait until at least 3 readings wait on disk and the latest sample, taken moments
    // ago, is recorded: the next one is most of a second away.
    let mut seen = (counter_value(dir.path()), std::time::Instant::now());
    let before = wait_for(T, "readings to pile up on disk", || {
        let s = agent.status();
        let counter = counter_value(dir.path());
        if counter != seen.0 {
            seen = (counter, std::time::Instant::now());
        }
        let fresh = seen.1.elapsed() < Duration::from_millis(300);
        let batches = s["batches"].as_u64()?;
        let next_seq = s["next_seq"].as_i64()?;
        // One batch per sample: next_seq - 1 == samples recorded == the counter value.
        (fresh && batches >= 3 && next_seq - 1 == counter).then_some(s)
    });
    agent.kill9();
    let after = agent.status();
    // On a loaded machine one more sample may be recorded between the last status and the
    // kill; everything recorded before it must still be there.
    for key in ["batches", "next_seq"] {
        let (was, is) = (before[key].as_i64(), after[key].as_i64());
        assert!(
            was.zip(is)
                .is_some_and(|(was, is)| is == was || is == was + 1),
            "the queue survived the kill ({key}): {before} -> {after}"
        );
    }
    let recorded = after["next_seq"].as_i64().expect("next_seq") - 1;

    // Hub back, agent restarted: the buffered readings are delivered, none twice.
    let _back = HubOnPort::start(&hub, port);
    agent.spawn();
    let n = wait_for_complete_counter(&hub, device, recorded + 1, &agent);
    assert!(n > recorded);
    // The sequence continued where it was: nothing was renumbered or re-sent as new. The
    // hub stores a batch before its ack reaches the agent, so the agent's queue front
    // passes the recorded batches a moment after the readings are visible in the store.
    let mut status = serde_json::Value::Null;
    let passed = try_wait(T, || {
        status = agent.status();
        (status["front_seq"].as_i64().unwrap_or(0) > recorded).then_some(())
    });
    assert!(
        passed.is_some(),
        "the queue front passed the {recorded} recorded batches: {status}"
    );
}

#[test]
fn a_full_queue_drops_the_oldest_and_reports_how_many() {
    let mut hub = Hub::start(HubOptions::default());
    let port = port_of(&hub.device_url);
    let dir = TempDir::new("agent-full");
    let device = "full-1";
    let cfg = config(
        &hub,
        dir.path(),
        device,
        "postcard",
        &counter_sensor(dir.path(), "100ms"),
    )
    .replace("[queue]\n", "[queue]\nmax_batches = 16\n");
    let agent = Agent::start(dir.path(), &cfg);
    wait_for_complete_counter(&hub, device, 2, &agent);
    hub.kill9();
    // The outage outlasts the queue: the oldest batches go, and are counted.
    let full = wait_for(T, "the queue to overflow", || {
        let s = agent.status();
        (s["dropped_readings"].as_u64()? >= 10).then_some(s)
    });
    assert!(full["batches"].as_u64().unwrap_or(99) <= 16, "{full}");
    let produced = counter_value(dir.path());

    let _back = HubOnPort::start(&hub, port);
    let dropped_metric = |hub: &Hub| -> Option<f64> {
        hub.telemetry_db()
            .query_row(
                "SELECT max(r.value) FROM readings r JOIN series s ON s.id = r.series
                 WHERE s.device = ?1 AND s.metric = 'agent.dropped_readings'",
                [device],
                |r| r.get::<_, Option<f64>>(0),
            )
            .ok()
            .flatten()
    };
    // Eventually the hub holds the newest readings and a drop count covering every gap
    // (the count is reported at most every 5 s while drops happen).
    let (reported, missing) = wait_for(T, "agent.dropped_readings to reach the hub", || {
        let (count, _, _, max) = stored_counter(&hub, device);
        let d = dropped_metric(&hub)?;
        let missing = max - count;
        (max >= produced && missing > 0 && d >= missing as f64).then_some((d, missing))
    });
    let (count, distinct, min, _) = stored_counter(&hub, device);
    assert_eq!(count, distinct, "no reading stored twice");
    assert_eq!(min, 1, "the oldest, delivered before the outage, are kept");
    assert!(reported >= missing as f64);
    assert!(agent.log().contains("queue full: dropped the oldest"));
}

fn send(hub: &Hub, device: &str, command: &str, args: &str) -> (i32, String, String) {
    hub.cli(&["send", device, command, "--args", args, "--timeout", "20s"])
}

#[test]
fn actions_run_through_hub_send_without_a_shell() {
    let hub = Hub::start(HubOptions::default());
    let dir = TempDir::new("agent-actions");
    let device = "actions-1";
    let sentinel = dir.path().join("sentinel");
    std::fs::create_dir(&sentinel).expect("sentinel dir");
    let marker = dir.path().join("pwned");
    let extra = r#"[[sensors]]
name = "system"
kind = "system"
interval = "1h"

[[actions]]
name = "greet"
program = "/bin/echo"
args = ["hello", "{name}"]
[actions.params.name]
allow = ["world", "team-*"]

[[actions]]
name = "echo"
program = "/bin/echo"
args = ["{text}"]
[actions.params.text]
any = true

[[actions]]
name = "fail"
program = "/bin/sh"
args = ["-c", "echo broken >&2; exit 3"]

[[actions]]
name = "slow"
program = "/bin/sleep"
args = ["30"]
timeout = "300ms"
"#;
    let cfg = config(&hub, dir.path(), device, "json", extra);
    let agent = Agent::start(dir.path(), &cfg);
    wait_for(T, "the agent to connect", || {
        agent.log().contains("connected to the hub").then_some(())
    });

    // A configured action, its output back through `hub send`.
    let (code, out, err) = send(&hub, device, "greet", r#"{"name":"team-ops"}"#);
    assert_eq!(code, 0, "{out} {err}\n{}", agent.log());
    assert_eq!(out.trim(), "hello team-ops");

    // Shell metacharacters are just characters: no command substitution, no second
    // command, nothing touched or removed.
    let evil = format!(
        "$(touch {m}); `touch {m}` && rm -rf {s} | cat; *",
        m = marker.display(),
        s = sentinel.display()
    );
    let args = serde_json::json!({ "text": evil }).to_string();
    let (code, out, err) = send(&hub, device, "echo", &args);
    assert_eq!(code, 0, "{out} {err}");
    assert_eq!(out.trim_end_matches('\n'), evil);
    assert!(!marker.exists(), "a shell ran the argument");
    assert!(sentinel.exists(), "a shell ran the argument");

    // Refusals: a value off the allowlist, an option-looking value, unknown arguments and
    // commands. Each is a failed result (exit 1) saying why.
    for (command, args, why) in [
        ("greet", r#"{"name":"root"}"#, "not allowed"),
        ("echo", r#"{"text":"--help"}"#, "starts with '-'"),
        ("greet", r#"{"name":"world","x":1}"#, "unknown argument"),
        ("reboot", "{}", "unknown command"),
    ] {
        let (code, out, err) = send(&hub, device, command, args);
        assert_eq!(code, 1, "{command} {args}: {out} {err}");
        assert!(out.contains(why), "{command} {args}: {out:?} lacks {why:?}");
    }

    // Exit status and stderr of a failing program; a timeout kills it.
    let (code, out, _) = send(&hub, device, "fail", "{}");
    assert_eq!(code, 1);
    assert!(out.contains("broken"), "{out}");
    let (code, out, _) = send(&hub, device, "slow", "{}");
    assert_eq!(code, 1);
    assert!(out.contains("killed after 300ms"), "{out}");

    // Built-ins.
    let before_report = wait_for(T, "the first system sample", || {
        Some(mem_samples(&hub, device)).filter(|n| *n > 0)
    });
    let (code, out, _) = send(&hub, device, "ping", "{}");
    assert_eq!(code, 0);
    assert!(out.contains("pong from actions-1"), "{out}");
    let (code, out, _) = send(&hub, device, "get-config", "{}");
    assert_eq!(code, 0);
    let summary: serde_json::Value = serde_json::from_str(out.trim()).expect("get-config json");
    assert_eq!(summary["device_id"], device);
    let token = std::fs::read_to_string(dir.path().join("agent.token")).expect("token");
    assert!(!out.contains(token.trim()), "no token in get-config: {out}");
    let (code, out, _) = send(&hub, device, "report-now", r#"{"sensor":"system"}"#);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("sampling now: system"), "{out}");
    wait_for(T, "report-now to deliver more system readings", || {
        (mem_samples(&hub, device) > before_report).then_some(())
    });
    let (code, out, _) = send(
        &hub,
        device,
        "set-interval",
        r#"{"sensor":"system","interval":"2s"}"#,
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("now samples every 2s (was 1h)"), "{out}");
    let (code, _, _) = send(
        &hub,
        device,
        "set-interval",
        r#"{"sensor":"nope","interval":"2s"}"#,
    );
    assert_eq!(code, 1);
}

#[test]
fn a_refused_token_is_retried_slowly_with_a_clear_log_line() {
    let hub = Hub::start(HubOptions::default());
    let dir = TempDir::new("agent-refused");
    // No sensors: this test is about the connection only.
    let cfg = format!(
        "sensors = []\n{}",
        config(&hub, dir.path(), "refused-1", "postcard", "")
    );
    let other = Hub::start(HubOptions::default());
    std::fs::write(dir.path().join("agent.token"), other.token("refused-1")).expect("token");
    let agent = Agent::start(dir.path(), &cfg);
    let line = wait_for(T, "the refusal to be logged", || {
        agent
            .log()
            .lines()
            .find(|l| l.contains("the hub refused the token (HTTP 401"))
            .map(str::to_string)
    });
    assert!(line.contains("hub token issue refused-1"), "{line}");
    assert!(line.contains("retrying slowly"), "{line}");
    // The next attempt is at least the refused backoff (60 s) away, not a hammering loop.
    let rest = line.split("next attempt in ").nth(1).expect("next attempt");
    let secs = seconds(rest);
    assert!(
        secs >= 60.0,
        "retry should be a minute or more away, is {secs} s: {line}"
    );
}

/// Reads a leading humantime duration ("1m 23s 456ms") as seconds.
fn seconds(text: &str) -> f64 {
    let mut total = 0.0;
    for token in text.split_whitespace() {
        let digits: String = token.chars().take_while(char::is_ascii_digit).collect();
        let Ok(n) = digits.parse::<f64>() else { break };
        total += n * match &token[digits.len()..] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" | "ns" => 0.0,
            _ => break,
        };
    }
    total
}

/// Desired state reaches the agent: a sensor's interval changes at once, other keys go to
/// the configured program (no shell), whose refusals come back with its output, and the
/// hub sees what was applied with the reported version equal to the desired one.
#[test]
fn desired_state_sets_sensor_intervals_and_runs_the_configured_program() {
    let hub = Hub::start(HubOptions::default());
    let dir = TempDir::new("agent-desired");
    let device = "desired-1";
    let program = script(dir.path(), "apply.sh", "#!/bin/sh\ncase \"$1\" in\n  mode) echo \"$2\" > \"$(dirname \"$0\")/mode\"; exit 0 ;;\n  *) echo \"unsupported $1\"; exit 3 ;;\nesac\n");
    let extra = format!(
        "{}\n[desired]\nprogram = \"{}\"\n",
        counter_sensor(dir.path(), "1h"),
        program.display()
    );
    let admin = hub.admin_token();
    let cfg = config(&hub, dir.path(), device, "postcard", &extra);
    let (status, v) = hub.api(
        "PATCH",
        &format!("/api/v1/devices/{device}/state"),
        Some(&admin),
        Some(
            r#"{"desired": {"sensors.counter.interval": "200ms", "mode": "eco", "colour": "red"}}"#,
        ),
    );
    assert_eq!(status, 200, "{v}");
    let agent = Agent::start(dir.path(), &cfg);
    let state = wait_for(T, "the agent to apply desired state", || {
        let (_, v) = hub.api(
            "GET",
            &format!("/api/v1/devices/{device}/state"),
            Some(&admin),
            None,
        );
        (v["reported_version"] == v["desired_version"]).then_some(v)
    });
    assert_eq!(
        state["reported"]["sensors.counter.interval"], "200ms",
        "{state}"
    );
    assert_eq!(state["reported"]["mode"], "eco", "{state}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("mode"))
            .map(|m| m.trim().to_string())
            .ok(),
        Some("\"eco\"".to_string()),
        "the program got the value as JSON text"
    );
    assert!(
        state["refused"]["colour"]
            .as_str()
            .is_some_and(|r| r.contains("exit 3") && r.contains("unsupported colour")),
        "{state}"
    );
    // The interval went from an hour to 200 ms: the counter moves.
    wait_for(T, "the counter sensor at its new interval", || {
        (counter_value(dir.path()) >= 5).then_some(())
    });
    drop(agent);
}

//! Jobs end to end against the real hub and `firmware-sim fleet`: one command over the
//! devices of a tag (including devices offline when the job starts), a `kill -9` of the
//! hub midway, the CLI's summary and exit statuses, abort on failures, cancellation, and
//! requests the API refuses.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::process::{binary, KillOnDrop};
use e2e::{wait_for, Hub, HubOptions};
use serde_json::Value;

const T: Duration = Duration::from_secs(60);

/// `firmware-sim fleet` for devices `sim-{first}` .. `sim-{first + count - 1}` with the
/// tokens in `tokens`.
fn fleet(hub: &Hub, tokens: &Path, first: usize, count: usize) -> KillOnDrop {
    let child = Command::new(binary("firmware-sim"))
        .args(["fleet", "--interval", "10s"])
        .args(["--first", &first.to_string(), "--count", &count.to_string()])
        .arg("--tokens")
        .arg(tokens)
        .args(["--hub", hub.device_url.trim()])
        .arg("--ca")
        .arg(hub.ca())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn firmware-sim fleet");
    KillOnDrop(child)
}

/// Registers `sim-00001` .. `sim-{n}` with the tag each gets from `site`; returns the
/// tokens file `hub devices add --from` wrote.
fn register(hub: &Hub, n: usize, site: impl Fn(usize) -> &'static str) -> std::path::PathBuf {
    let csv = hub.dir.path().join("fleet.csv");
    let mut text = String::from("id,tags\n");
    for i in 1..=n {
        text.push_str(&format!("sim-{i:05},site={}\n", site(i)));
    }
    std::fs::write(&csv, text).expect("csv");
    let tokens = hub.dir.path().join("tokens.txt");
    let (code, _, err) = hub.cli(&[
        "devices",
        "add",
        "--from",
        csv.to_str().expect("utf8"),
        "--out",
        tokens.to_str().expect("utf8"),
    ]);
    assert_eq!(code, 0, "{err}");
    tokens
}

fn online(hub: &Hub) -> usize {
    let (code, out, err) = hub.cli(&["devices", "--online", "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str::<Value>(&out)
        .expect("json")
        .as_array()
        .map_or(0, Vec::len)
}

fn job(hub: &Hub, id: u64) -> Value {
    let (code, out, err) = hub.cli(&["jobs", "show", &id.to_string(), "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).expect("json")
}

fn count(view: &Value, state: &str) -> u64 {
    view["counts"][state].as_u64().unwrap_or(0)
}

/// Issue 9's scenario: 300 devices in three tags, a job for one tag reaches exactly its
/// 100 devices, 10 of them offline when the job starts, across a `kill -9` of the hub.
#[test]
fn a_job_reaches_exactly_its_tag_across_a_hub_crash_and_late_devices() {
    let mut hub = Hub::start(HubOptions::default());
    // Site b: 101-190 (connected) and 291-300 (offline until later).
    let site = |i: usize| match i {
        1..=100 => "a",
        101..=190 | 291..=300 => "b",
        _ => "c",
    };
    let tokens = register(&hub, 300, site);
    let _early = fleet(&hub, &tokens, 1, 290);
    wait_for(T, "290 devices online", || {
        (online(&hub) == 290).then_some(())
    });

    // Slow enough that the crash lands midway.
    let (code, out, err) = hub.cli(&[
        "send",
        "--tag",
        "site=b",
        "led",
        "--args",
        r#"{"on":true}"#,
        "--rate",
        "25/s",
        "--no-wait",
    ]);
    assert_eq!(code, 0, "{err}");
    let id: u64 = out.trim().parse().expect("job id");
    wait_for(T, "a third of the commands created", || {
        let v = job(&hub, id);
        (100 - count(&v, "pending") >= 30).then_some(())
    });
    hub.restart();

    // The job resumes; the connected 90 succeed, the offline 10 wait.
    let v = wait_for(T, "90 succeeded, 10 waiting", || {
        let v = job(&hub, id);
        (count(&v, "succeeded") == 90 && count(&v, "queued") == 10).then_some(v)
    });
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["waiting_offline"], 10, "{v}");
    // The CLI's summary says so, with the status for "queued for offline devices".
    let (code, out, err) = hub.cli(&["jobs", "show", &id.to_string(), "--wait"]);
    assert_eq!(code, 4, "{out}{err}");
    assert!(out.contains("succeeded      90"), "{out}");
    assert!(out.contains("queued         10"), "{out}");

    let _late = fleet(&hub, &tokens, 291, 10);
    let v = wait_for(T, "the job to complete", || {
        let v = job(&hub, id);
        (v["state"] == "completed").then_some(v)
    });
    assert_eq!(count(&v, "succeeded"), 100, "{v}");
    let (code, out, err) = hub.cli(&["jobs", "show", &id.to_string(), "--wait"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("completed") && out.contains("succeeded     100"),
        "{out}"
    );

    // Exactly one command per device of site b, none anywhere else.
    let db = hub.db();
    let mut stmt = db
        .prepare("SELECT device, count(*) FROM commands GROUP BY device")
        .expect("query");
    let per_device: HashMap<String, i64> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("rows");
    let site_b: BTreeSet<String> = (1..=300)
        .filter(|i| site(*i) == "b")
        .map(|i| format!("sim-{i:05}"))
        .collect();
    assert_eq!(per_device.keys().cloned().collect::<BTreeSet<_>>(), site_b);
    assert!(per_device.values().all(|n| *n == 1), "{per_device:?}");
    assert!(hub.log().contains("job created"), "{}", hub.log());
}

/// The CLI over a small fleet: a summary and exit 0, abort on failures (the firmware
/// refuses unknown commands), cancellation, the list, metrics and refusals.
#[test]
fn the_cli_runs_aborts_cancels_and_lists_jobs() {
    let hub = Hub::start(HubOptions::default());
    let tokens = register(&hub, 30, |i| if i <= 12 { "x" } else { "y" });
    let _devices = fleet(&hub, &tokens, 1, 30);
    wait_for(T, "30 devices online", || {
        (online(&hub) == 30).then_some(())
    });

    let (code, out, err) = hub.cli(&["send", "--tag", "site=x", "led", "--args", r#"{"on":true}"#]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("to 12 devices (site=x): completed"), "{out}");
    assert!(out.contains("succeeded      12"), "{out}");

    // Every command fails on the device: the job stops creating them once 10 finished.
    let (code, out, err) = hub.cli(&[
        "send",
        "--all",
        "no-such-command",
        "--rate",
        "10/s",
        "--abort-on-failure",
        "50%",
    ]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("aborted"), "{out}");
    assert!(
        out.contains("failed: sim-"),
        "the failures are listed: {out}"
    );
    let (_, list, _) = hub.cli(&["jobs", "--json"]);
    let list: Value = serde_json::from_str(&list).expect("json");
    let aborted = &list[0];
    assert_eq!(aborted["state"], "aborted", "{aborted}");
    assert!(
        count(aborted, "skipped") >= 5,
        "it stopped creating: {aborted}"
    );
    assert!(count(aborted, "failed") >= 10, "{aborted}");

    // A slow job, cancelled: it ends, and says what it never sent.
    let (code, out, err) = hub.cli(&[
        "send",
        "--select",
        "site=y",
        "led",
        "--rate",
        "1/s",
        "--no-wait",
    ]);
    assert_eq!(code, 0, "{err}");
    let id = out.trim().to_string();
    let (code, _, err) = hub.cli(&["jobs", "cancel", &id]);
    assert_eq!(code, 0, "{err}");
    let v = job(&hub, id.parse().expect("id"));
    assert_eq!(v["state"], "cancelled", "{v}");
    assert!(count(&v, "skipped") > 0, "{v}");
    assert_eq!(count(&v, "pending"), 0, "{v}");
    let (code, _, err) = hub.cli(&["jobs", "cancel", &id]);
    assert_eq!(code, 1, "cancelling twice: {err}");
    let (code, _, _) = hub.cli(&["jobs", "cancel", "999"]);
    assert_eq!(code, 2);

    let (code, table, _) = hub.cli(&["jobs"]);
    assert_eq!(code, 0);
    assert_eq!(table.lines().count(), 4, "a header and three jobs: {table}");
    // The job gauges are counted in the store at each scrape (a busy store leaves the
    // previous values for one scrape), so poll.
    let lines = [
        "hub_jobs{state=\"completed\"} 1",
        "hub_jobs{state=\"aborted\"} 1",
        "hub_jobs{state=\"cancelled\"} 1",
    ];
    e2e::wait_for(Duration::from_secs(20), "the job gauges", || {
        let (_, metrics) = hub.api("GET", "/metrics", Some(&hub.admin_token()), None);
        let metrics = metrics.as_str().unwrap_or_default().to_string();
        lines
            .iter()
            .all(|line| metrics.contains(line))
            .then_some(())
    });

    // Refusals: usage errors say what to do.
    let (code, _, err) = hub.cli(&["send", "--tag", "site=x", "sim-00001", "led"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("give only the command"), "{err}");
    let (code, _, err) = hub.cli(&["send", "bad id!", "led"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("invalid device id"), "{err}");
    let (code, _, err) = hub.cli(&["send", "--tag", "site=nowhere", "led"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("no device matches"), "{err}");
    let list = hub.dir.path().join("ids.txt");
    std::fs::write(&list, "# ids\nsim-00001\nghost-1\n").expect("ids");
    let (code, _, err) = hub.cli(&["send", "--devices", list.to_str().expect("utf8"), "led"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("ghost-1") && err.contains("not registered"),
        "{err}"
    );

    // A device removed while its job runs is skipped, and the job still completes.
    std::fs::write(&list, "sim-00013\nsim-00014\n").expect("ids");
    let (code, out, err) = hub.cli(&[
        "send",
        "--devices",
        list.to_str().expect("utf8"),
        "led",
        "--args",
        r#"{"on":true}"#,
        "--rate",
        "0.5/s",
        "--no-wait",
    ]);
    assert_eq!(code, 0, "{err}");
    let id = out.trim().to_string();
    let (code, _, err) = hub.cli(&["devices", "remove", "sim-00014"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = hub.cli(&["jobs", "show", &id, "--wait"]);
    assert_eq!(code, 5, "{out}{err}");
    assert!(
        out.contains("completed") && out.contains("skipped         1"),
        "{out}"
    );

    let admin = hub.admin_token();
    for (body, want) in [
        (r#"{"command":"led"}"#, "say which devices"),
        (r#"{"command":"led","select":""}"#, "say `all`"),
        (
            r#"{"command":"led","select":"all","rate":"fast"}"#,
            "not a rate",
        ),
        (
            r#"{"command":"led","select":"all","abort_on_failure":0}"#,
            "percentage",
        ),
    ] {
        let (status, v) = hub.api("POST", "/api/v1/jobs", Some(&admin), Some(body));
        assert_eq!(status, 400, "{body}: {v}");
        assert!(v.to_string().contains(want), "{body}: {v}");
    }
}

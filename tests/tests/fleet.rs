//! The fleet registry end to end, against the real hub: devices registered before they
//! exist, tags and selectors, commands queued for devices that never connected, removal
//! (revocation, the live session closed, telemetry kept or purged).

use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::client::{hello, Device, Received};
use e2e::process::{binary, KillOnDrop};
use e2e::{wait_for, Hub, HubOptions};
use schemas::message::truncated;
use schemas::{DeviceMessage, HubMessage, Reading, Telemetry};

const T: Duration = Duration::from_secs(10);

fn ids(list: &serde_json::Value) -> Vec<String> {
    list["devices"]
        .as_array()
        .expect("devices")
        .iter()
        .map(|d| d["id"].as_str().expect("id").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn registered_devices_exist_before_they_connect_and_selectors_pick_them() {
    let hub = Hub::start(HubOptions::default());
    let admin = hub.admin_token();
    let body = serde_json::json!({"devices": [
        {"id": "a-1", "tags": {"site": "a", "hw": "rev1"}},
        {"id": "b-1", "tags": {"site": "b", "hw": "rev1"}},
        {"id": "b-2", "tags": {"site": "b", "hw": "rev2"}},
    ]});
    let (status, v) = hub.api(
        "POST",
        "/api/v1/devices",
        Some(&admin),
        Some(&body.to_string()),
    );
    assert_eq!(status, 201, "{v}");
    let registered = v["devices"].as_array().expect("devices");
    assert!(registered.iter().all(|d| d["created"] == true));
    let token_b1 = registered[1]["token"].as_str().expect("token").to_string();

    // Every device shows, never connected; selectors combine tags and presence.
    let (_, all) = hub.api("GET", "/api/v1/devices", Some(&admin), None);
    assert_eq!(ids(&all), ["a-1", "b-1", "b-2"]);
    let (_, site_b) = hub.api("GET", "/api/v1/devices?select=site=b", Some(&admin), None);
    assert_eq!(ids(&site_b), ["b-1", "b-2"]);
    let (_, rev1_b) = hub.api(
        "GET",
        "/api/v1/devices?select=site=b,hw=rev1,never-connected",
        Some(&admin),
        None,
    );
    assert_eq!(ids(&rev1_b), ["b-1"]);
    let (status, bad) = hub.api(
        "GET",
        "/api/v1/devices?select=online,offline",
        Some(&admin),
        None,
    );
    assert_eq!(status, 400, "{bad}");

    // A command for a registered device that never connected is queued, and delivered
    // when it connects with the token its registration returned.
    let (status, cmd) = hub.api(
        "POST",
        "/api/v1/devices/b-1/commands",
        Some(&admin),
        Some(r#"{"name": "led", "args": {"on": true}}"#),
    );
    assert_eq!(status, 201, "{cmd}");
    assert_eq!(cmd["state"], "queued");
    let mut d = Device::connect(&hub.device_url, &hub.ca(), &token_b1, false).await;
    d.send(&hello("fw-1")).await;
    assert!(matches!(d.expect(T).await, HubMessage::Welcome(_)));
    let command = loop {
        match d.expect(T).await {
            HubMessage::Command(c) => break c,
            _ => continue,
        }
    };
    assert_eq!(command.name.as_str(), "led");
    let (_, online) = hub.api("GET", "/api/v1/devices?select=online", Some(&admin), None);
    assert_eq!(ids(&online), ["b-1"]);
    let (_, never) = hub.api(
        "GET",
        "/api/v1/devices?select=never-connected",
        Some(&admin),
        None,
    );
    assert_eq!(ids(&never), ["a-1", "b-2"]);

    // Tags change; an unknown device is a 404 that says how to register one.
    let (status, v) = hub.api(
        "PATCH",
        "/api/v1/devices/b-2/tags",
        Some(&admin),
        Some(r#"{"set": {"site": "c"}, "remove": ["hw"]}"#),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["tags"], serde_json::json!({"site": "c"}));
    let (status, v) = hub.api(
        "PATCH",
        "/api/v1/devices/nobody/tags",
        Some(&admin),
        Some("{}"),
    );
    assert_eq!(status, 404, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .is_some_and(|m| m.contains("hub devices add")));

    // A token issued for an id the hub does not know registers it.
    hub.token("c-9");
    let (_, all) = hub.api("GET", "/api/v1/devices", Some(&admin), None);
    assert!(ids(&all).contains(&"c-9".to_string()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_device_is_disconnected_refused_and_forgotten() {
    let hub = Hub::start(HubOptions::default());
    let admin = hub.admin_token();
    for (device, purge) in [("keep-1", false), ("purge-1", true)] {
        let token = hub.token(device);
        let mut d = Device::connect(&hub.device_url, &hub.ca(), &token, false).await;
        d.send(&hello("fw-1")).await;
        assert!(matches!(d.expect(T).await, HubMessage::Welcome(_)));
        let mut readings = heapless::Vec::new();
        for i in 0..3 {
            let _ = readings.push(Reading {
                metric: truncated("temp"),
                ts: 1_764_000_000_000 + i,
                value: i as f64,
            });
        }
        d.send(&DeviceMessage::Telemetry(Telemetry { seq: 1, readings }))
            .await;
        d.wait_ack(1).await;
        assert_eq!(hub.stored_readings(device), 3);

        let path = format!(
            "/api/v1/devices/{device}{}",
            if purge { "?purge=true" } else { "" }
        );
        let (status, v) = hub.api("DELETE", &path, Some(&admin), None);
        assert_eq!(status, 200, "{v}");
        // The live session ends with 1008 ...
        loop {
            match d.recv(T).await {
                Received::Closed(code, _) => {
                    assert_eq!(code, 1008);
                    break;
                }
                Received::Ended => panic!("no close frame"),
                Received::Message(_) => continue,
            }
        }
        // ... the old token is refused, and the device is gone from the registry.
        let err = e2e::client::connect(
            &hub.device_url,
            &hub.ca(),
            Some(&token),
            Some("hub.v1.postcard"),
        )
        .await
        .expect_err("revoked");
        assert_eq!(e2e::client::refusal(&err).map(|(s, _)| s), Some(401));
        let (status, _) = hub.api(
            "GET",
            &format!("/api/v1/devices/{device}"),
            Some(&admin),
            None,
        );
        assert_eq!(status, 404);
        assert_eq!(hub.stored_readings(device), if purge { 0 } else { 3 });
    }
}

/// The fleet from the CLI: a CSV registers devices in three tags, the tokens file it
/// writes is what `firmware-sim fleet --tokens` reads, filters pick devices by tag and
/// presence, desired state set for a tag before the devices exist reaches exactly them.
#[test]
fn the_cli_registers_a_fleet_from_csv_and_acts_on_a_tag() {
    let hub = Hub::start(HubOptions::default());
    let dir = e2e::TempDir::new("fleet-cli");
    let csv = dir.path().join("fleet.csv");
    let mut text = String::from("id,tags\n");
    for n in 1..=30 {
        let site = ["a", "b", "c"][(n - 1) / 10];
        text.push_str(&format!("sim-{n:05},site={site},hw=rev1\n"));
    }
    std::fs::write(&csv, text).expect("csv");
    let tokens = dir.path().join("tokens.txt");
    let (code, _, err) = hub.cli(&[
        "devices",
        "add",
        "--from",
        csv.to_str().expect("utf8"),
        "--out",
        tokens.to_str().expect("utf8"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("registered 30 devices (30 new)"), "{err}");
    let lines = std::fs::read_to_string(&tokens).expect("tokens");
    assert_eq!(lines.lines().count(), 30);
    let listed = |args: &[&str]| -> Vec<String> {
        let mut full = vec!["devices", "--json"];
        full.extend_from_slice(args);
        let (code, out, err) = hub.cli(&full);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("json");
        v.as_array()
            .expect("list")
            .iter()
            .map(|d| d["id"].as_str().expect("id").to_string())
            .collect()
    };
    assert_eq!(listed(&["--never-connected"]).len(), 30);
    let site_b = listed(&["--tag", "site=b"]);
    assert_eq!(site_b.len(), 10);
    assert!(site_b
        .iter()
        .all(|id| ("sim-00011"..="sim-00020").contains(&id.as_str())));

    // Desired state for a tag, set before any device connected: exit 0, 10 changed.
    let (code, _, err) = hub.cli(&["state", "set", "--tag", "site=b", "interval=1"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("10 devices match site=b; 10 changed"), "{err}");
    // One device alone, offline: exit 4, it gets it when it connects.
    let (code, _, err) = hub.cli(&["state", "set", "sim-00001", "led=true"]);
    assert_eq!(code, 4, "{err}");

    let fleet = Command::new(binary("firmware-sim"))
        .args(["fleet", "--count", "30", "--interval", "10s"])
        .arg("--tokens")
        .arg(&tokens)
        .args(["--hub", hub.device_url.trim()])
        .arg("--ca")
        .arg(hub.ca())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("fleet");
    let _fleet = KillOnDrop(fleet);
    wait_for(Duration::from_secs(30), "all 30 devices online", || {
        (listed(&["--online"]).len() == 30).then_some(())
    });
    assert_eq!(listed(&["--tag", "site=b", "--online"]), site_b);
    for id in ["sim-00011", "sim-00020", "sim-00001"] {
        let state = wait_for(Duration::from_secs(10), "desired state applied", || {
            let (code, out, _) = hub.cli(&["state", "show", id, "--json"]);
            assert_eq!(code, 0);
            let v: serde_json::Value = serde_json::from_str(&out).expect("json");
            (v["reported_version"] == v["desired_version"]).then_some(v)
        });
        assert_eq!(state["delta"], serde_json::json!({}), "{id}: {state}");
    }
    // Devices of other tags never got the interval.
    let (_, out, _) = hub.cli(&["state", "show", "sim-00025", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["desired_version"], 0, "{v}");
    // The table shows desired next to reported.
    let (code, out, _) = hub.cli(&["state", "show", "sim-00011"]);
    assert_eq!(code, 0);
    assert!(out.contains("interval") && out.contains("in sync"), "{out}");

    // Tags change; a removed device is gone.
    let (code, _, err) = hub.cli(&["devices", "tag", "sim-00001", "site=z", "--remove", "hw"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(listed(&["--tag", "site=z"]), ["sim-00001"]);
    let (code, _, err) = hub.cli(&["devices", "remove", "sim-00030"]);
    assert_eq!(code, 0, "{err}");
    assert!(!listed(&[]).contains(&"sim-00030".to_string()));
    let (code, _, err) = hub.cli(&["devices", "remove", "sim-00030"]);
    assert_eq!(code, 2, "an unknown device is a usage error: {err}");
}

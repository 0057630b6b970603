//! The fleet registry end to end, against the real hub: devices registered before they
//! exist, tags and selectors, commands queued for devices that never connected, removal
//! (revocation, the live session closed, telemetry kept or purged).

use std::time::Duration;

use e2e::client::{hello, Device, Received};
use e2e::{Hub, HubOptions};
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

//! Checks that the golden vectors in `vectors/v1.json` match what the encoders produce,
//! that both encodings decode to the same message, and that PROTOCOL.md shows each one.
//! Run with `UPDATE_GOLDEN=1` to rewrite the file after an intended protocol change.

use schemas::codec::{decode_json, decode_postcard, encode_json, encode_postcard_vec};
use schemas::message::truncated;
use schemas::*;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn device_vectors() -> Vec<(&'static str, DeviceMessage)> {
    let mut caps = heapless::Vec::new();
    caps.push(truncated("commands")).expect("cap");
    caps.push(truncated("state")).expect("cap");
    let mut readings = heapless::Vec::new();
    readings
        .push(Reading {
            metric: truncated("temperature"),
            ts: 1_764_000_000_000,
            value: 21.5,
        })
        .expect("reading");
    readings
        .push(Reading {
            metric: truncated("battery.volts"),
            ts: 1_764_000_000_000,
            value: 3.7,
        })
        .expect("reading");
    let mut props = heapless::Vec::new();
    props
        .push(Property {
            key: truncated("led"),
            value: truncated("on"),
        })
        .expect("prop");
    vec![
        (
            "hello",
            DeviceMessage::Hello(Hello {
                firmware: truncated("1.4.2"),
                capabilities: caps,
                last_acked_seq: 41,
            }),
        ),
        (
            "telemetry",
            DeviceMessage::Telemetry(Telemetry { seq: 42, readings }),
        ),
        (
            "command_ack",
            DeviceMessage::CommandAck(CommandAck { id: 7 }),
        ),
        (
            "command_result",
            DeviceMessage::CommandResult(CommandResult {
                id: 7,
                ok: true,
                code: 0,
                output: truncated("led on"),
            }),
        ),
        ("state", DeviceMessage::State(State { properties: props })),
        ("applied", DeviceMessage::Applied(applied())),
        (
            "firmware_request",
            DeviceMessage::FirmwareRequest(FirmwareRequest {
                version: truncated("1.1"),
                offset: 16,
                len: 11,
            }),
        ),
        (
            "firmware_status",
            DeviceMessage::FirmwareStatus(FirmwareStatus {
                version: truncated("1.1"),
                state: UpdateState::RolledBack,
                percent: 100,
                reason: truncated("1.1 did not boot"),
            }),
        ),
    ]
}

/// The image of the worked example in PROTOCOL.md ("Firmware updates"), signed with the
/// RFC 8032 test key 1.
const EXAMPLE_IMAGE: &[u8] = b"example firmware image 1.1\n";

fn offer() -> FirmwareOffer {
    FirmwareOffer {
        version: truncated("1.1"),
        size: EXAMPLE_IMAGE.len() as u64,
        sha256: truncated("e67cc498ab3183eec7d619ed83516cb75cf6e795a0c5f7ed60c869e3a4f0c9e2"),
        signature: truncated(
            "9a7983878706c025a376bbdfa1c01186133baf727e0d26eb3671a2b293c1bbe3\
             1b41115dac8fbe857a88dc7b3a7bad2186b666246ea22f70e8484b4af2e6fc07",
        ),
    }
}

fn property(key: &str, value: &str) -> Property {
    Property {
        key: truncated(key),
        value: truncated(value),
    }
}

fn desired() -> Desired {
    let mut properties = heapless::Vec::new();
    properties.push(property("interval", "2")).expect("prop");
    properties.push(property("led", "true")).expect("prop");
    Desired {
        version: 3,
        properties,
        last: true,
    }
}

fn applied() -> Applied {
    let mut properties = heapless::Vec::new();
    properties.push(property("interval", "2")).expect("prop");
    let mut refused = heapless::Vec::new();
    refused
        .push(property("led", "unknown setting"))
        .expect("prop");
    Applied {
        version: 3,
        properties,
        refused,
    }
}

fn hub_vectors() -> Vec<(&'static str, HubMessage)> {
    vec![
        (
            "welcome",
            HubMessage::Welcome(Welcome {
                server_time: 1_764_000_000_123,
                ping_interval_ms: 30_000,
                pong_timeout_ms: 15_000,
                last_seq: 41,
                max_readings: 64,
                max_message_bytes: 16_384,
            }),
        ),
        ("ack", HubMessage::Ack(Ack { up_to_seq: 42 })),
        (
            "command",
            HubMessage::Command(Command {
                id: 7,
                name: truncated("led"),
                args: truncated(r#"{"state":"on"}"#),
                deadline: 1_764_000_060_000,
            }),
        ),
        (
            "error",
            HubMessage::Error(ErrorMessage {
                code: 4001,
                message: truncated("unknown command id 99"),
            }),
        ),
        (
            "command_closed",
            HubMessage::CommandClosed(CommandClosed { id: 7 }),
        ),
        ("desired", HubMessage::Desired(desired())),
        ("firmware_offer", HubMessage::FirmwareOffer(offer())),
        (
            "firmware_chunk",
            HubMessage::FirmwareChunk(FirmwareChunk {
                version: truncated("1.1"),
                offset: 16,
                data: schemas::message::ChunkData::from_slice(&EXAMPLE_IMAGE[16..]),
            }),
        ),
        (
            "firmware_offer_none",
            HubMessage::FirmwareOffer(FirmwareOffer {
                version: truncated(""),
                size: 0,
                sha256: truncated(""),
                signature: truncated(""),
            }),
        ),
    ]
}

fn render() -> String {
    let mut entries = Vec::new();
    for (name, msg) in device_vectors() {
        entries.push(serde_json::json!({
            "name": name,
            "direction": "device_to_hub",
            "message": serde_json::from_str::<serde_json::Value>(&encode_json(&msg)).expect("json"),
            "postcard_hex": hex(&encode_postcard_vec(&msg)),
        }));
    }
    for (name, msg) in hub_vectors() {
        entries.push(serde_json::json!({
            "name": name,
            "direction": "hub_to_device",
            "message": serde_json::from_str::<serde_json::Value>(&encode_json(&msg)).expect("json"),
            "postcard_hex": hex(&encode_postcard_vec(&msg)),
        }));
    }
    serde_json::to_string_pretty(&entries).expect("render") + "\n"
}

#[test]
fn golden_vectors_are_current() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/vectors/v1.json");
    let rendered = render();
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(path, &rendered).expect("write vectors");
    }
    assert_eq!(
        golden::V1,
        rendered,
        "vectors/v1.json is stale: run with UPDATE_GOLDEN=1"
    );
}

#[test]
fn both_encodings_decode_to_the_same_message_and_protocol_md_shows_them() {
    let protocol_md = include_str!("../PROTOCOL.md");
    let vectors: Vec<serde_json::Value> = serde_json::from_str(golden::V1).expect("vectors parse");
    assert_eq!(vectors.len(), device_vectors().len() + hub_vectors().len());
    for v in vectors {
        let json = v["message"].to_string();
        let hex = v["postcard_hex"].as_str().expect("hex");
        let mut buf = [0u8; 4096];
        let bytes = golden::decode_hex(hex, &mut buf).expect("hex decodes");
        match v["direction"].as_str() {
            Some("device_to_hub") => {
                let a: DeviceMessage = decode_json(&json).expect("json decodes");
                let b: DeviceMessage = decode_postcard(bytes).expect("postcard decodes");
                assert_eq!(a, b);
                a.validate().expect("valid");
            }
            Some("hub_to_device") => {
                let a: HubMessage = decode_json(&json).expect("json decodes");
                let b: HubMessage = decode_postcard(bytes).expect("postcard decodes");
                assert_eq!(a, b);
            }
            other => panic!("bad direction {other:?}"),
        }
        assert!(
            protocol_md.contains(&json),
            "PROTOCOL.md lacks the JSON of {}: {json}",
            v["name"]
        );
        let spaced = hex
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).expect("ascii"))
            .collect::<Vec<_>>()
            .join(" ");
        assert!(
            protocol_md.contains(&spaced),
            "PROTOCOL.md lacks the postcard bytes of {}: {spaced}",
            v["name"]
        );
    }
}

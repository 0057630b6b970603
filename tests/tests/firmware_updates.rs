//! Firmware updates end to end against the real hub: artifacts through the CLI (add, list,
//! show, key, refusals, remove), and a 1 MiB transfer to a raw protocol client whose
//! connection is cut at 60 %: it resumes from the offset the device stored (the hub's byte
//! counter shows the image went out about once), telemetry is acknowledged while chunks
//! flow, both encodings carry it, and the reported outcome ends the offer. With a low
//! `firmware.max_transfer_rate`, two devices pulling at once get no more than the cap
//! between them while their telemetry acks keep coming at once.

use std::time::{Duration, Instant};

use e2e::boards::add_image;
use e2e::client::Device;
use e2e::{Hub, HubOptions};
use schemas::message::truncated;
use schemas::{
    capability, DeviceMessage, FirmwareRequest, FirmwareStatus, Hello, HubMessage, Reading,
    Telemetry, UpdateState,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);
const MIB: usize = 1024 * 1024;
const CHUNK: u32 = 4096;
const WINDOW: usize = 8;

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn artifacts_are_stored_signed_listed_and_removed() {
    let hub = Hub::start(HubOptions::default());
    let dir = hub.dir.path();
    let image = dir.join("fw.bin");
    // Larger than the API's usual body limit, so the image route's own limit is exercised.
    std::fs::write(&image, vec![0x5a; 2 * MIB]).expect("image");
    let path = image.to_str().expect("utf8");

    let (code, out, err) = hub.cli(&[
        "firmware",
        "add",
        path,
        "--version",
        "1.1",
        "--for",
        "hw=rev2",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let added = json(&out);
    assert_eq!(added["size"], 2 * MIB);
    assert_eq!(added["signed_by"], "hub");
    assert_eq!(added["for"], "hw=rev2");
    assert_eq!(added["sha256"].as_str().map(str::len), Some(64));
    assert_eq!(added["signature"].as_str().map(str::len), Some(128));

    let (code, key, err) = hub.cli(&["firmware", "key"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(key.trim().len(), 64, "{key}");
    // The key lives apart from the token secret, private to the hub.
    assert!(hub.data_dir().join("firmware-signing-key").exists());

    // Versions are immutable: the same version again is refused.
    let (code, _, err) = hub.cli(&["firmware", "add", path, "--version", "1.1"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("exists already"), "{err}");
    let (code, _, err) = hub.cli(&["firmware", "add", path, "--version", "../up"]);
    assert_eq!(code, 2);
    assert!(err.contains("not a firmware version"), "{err}");

    // A signature made elsewhere is kept as given.
    let sig = dir.join("fw.sig");
    std::fs::write(&sig, "ab".repeat(64)).expect("sig");
    let (code, out, err) = hub.cli(&[
        "firmware",
        "add",
        path,
        "--version",
        "1.2",
        "--signature",
        sig.to_str().expect("utf8"),
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(json(&out)["signed_by"], "external");
    assert_eq!(json(&out)["signature"], "ab".repeat(64));

    let (code, out, err) = hub.cli(&["firmware", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("1.1") && out.contains("1.2") && out.contains("hw=rev2"),
        "{out}"
    );
    let (code, out, _) = hub.cli(&["firmware", "show", "1.1"]);
    assert_eq!(code, 0);
    assert!(
        out.contains(added["sha256"].as_str().expect("hex")),
        "{out}"
    );

    // Offering needs a registered device and a stored version.
    let (code, _, err) = hub.cli(&["firmware", "offer", "1.1", "nobody"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = hub.cli(&["devices", "add", "dev-1"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = hub.cli(&["firmware", "offer", "9.9", "dev-1"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, err) = hub.cli(&["firmware", "offer", "1.1", "dev-1"]);
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = hub.cli(&["firmware", "updates", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(json(&out)[0]["state"], "offered");

    let (code, _, err) = hub.cli(&["firmware", "remove", "1.2"]);
    assert_eq!(code, 0, "{err}");
    let (code, _, _) = hub.cli(&["firmware", "show", "1.2"]);
    assert_eq!(code, 2);
}

/// The image: a pattern in which a byte at the wrong offset shows.
fn image() -> Vec<u8> {
    (0..MIB)
        .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
        .collect()
}

fn firmware_hello() -> DeviceMessage {
    let mut capabilities = heapless::Vec::new();
    let _ = capabilities.push(truncated(capability::FIRMWARE));
    DeviceMessage::Hello(Hello {
        firmware: truncated("1.0"),
        capabilities,
        last_acked_seq: 0,
    })
}

fn request(offset: u64) -> DeviceMessage {
    DeviceMessage::FirmwareRequest(FirmwareRequest {
        version: truncated("1.1"),
        offset,
        len: CHUNK,
    })
}

/// Connects, says hello with the `firmware` capability, and returns the offer.
async fn connect(hub: &Hub, token: &str, json: bool) -> (Device, schemas::FirmwareOffer) {
    let mut d = Device::connect(&hub.device_url, &hub.ca(), token, json).await;
    d.send(&firmware_hello()).await;
    assert!(matches!(d.expect(WAIT).await, HubMessage::Welcome(_)));
    loop {
        match d.expect(WAIT).await {
            HubMessage::FirmwareOffer(offer) => return (d, offer),
            HubMessage::CommandClosed(_) => continue,
            other => panic!("expected an offer, got {other:?}"),
        }
    }
}

/// Pulls the image into `stored` with a window of requests until `stop_at` bytes are
/// stored, sending a telemetry batch every 16 chunks and checking it is acknowledged
/// while chunks are in flight. Returns the longest ack wait.
async fn pull(
    d: &mut Device,
    stored: &mut Vec<u8>,
    size: usize,
    stop_at: usize,
    seq: &mut u64,
) -> Duration {
    let mut next = stored.len() as u64;
    let mut outstanding = 0;
    let mut chunks = 0u64;
    let mut waiting_ack: Option<(u64, Instant)> = None;
    let mut worst = Duration::ZERO;
    while stored.len() < stop_at {
        while outstanding < WINDOW && (next as usize) < size {
            d.send(&request(next)).await;
            next += u64::from(CHUNK);
            outstanding += 1;
        }
        match d.expect(WAIT).await {
            HubMessage::FirmwareChunk(chunk) => {
                outstanding -= 1;
                assert_eq!(
                    chunk.offset,
                    stored.len() as u64,
                    "chunks come in the order asked for"
                );
                stored.extend_from_slice(chunk.data.as_slice());
                chunks += 1;
                if chunks % 16 == 0 && waiting_ack.is_none() {
                    *seq += 1;
                    let mut readings = heapless::Vec::new();
                    let _ = readings.push(Reading {
                        metric: truncated("temp"),
                        ts: 1_764_000_000_000 + *seq,
                        value: 20.0,
                    });
                    d.send(&DeviceMessage::Telemetry(Telemetry {
                        seq: *seq,
                        readings,
                    }))
                    .await;
                    waiting_ack = Some((*seq, Instant::now()));
                }
            }
            HubMessage::Ack(ack) => {
                if let Some((s, at)) = waiting_ack {
                    if ack.up_to_seq >= s {
                        worst = worst.max(at.elapsed());
                        waiting_ack = None;
                    }
                }
            }
            HubMessage::CommandClosed(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    worst
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_cut_at_60_percent_resumes_from_the_stored_offset() {
    let hub = Hub::start(HubOptions::default());
    let file = hub.dir.path().join("fw-1.1.bin");
    let image = image();
    std::fs::write(&file, &image).expect("image");
    let (code, _, err) = hub.cli(&[
        "firmware",
        "add",
        file.to_str().expect("utf8"),
        "--version",
        "1.1",
    ]);
    assert_eq!(code, 0, "{err}");
    let token = hub.token("dev-1");
    let (code, _, err) = hub.cli(&["firmware", "offer", "1.1", "dev-1"]);
    assert_eq!(code, 0, "{err}");

    // First connection (postcard): pull 60 % and vanish.
    let (mut d, offer) = connect(&hub, &token, false).await;
    assert_eq!((offer.version.as_str(), offer.size), ("1.1", MIB as u64));
    let mut stored = Vec::new();
    let mut seq = 0;
    let worst_first = pull(&mut d, &mut stored, MIB, MIB * 6 / 10, &mut seq).await;
    drop(d);

    // Second connection (JSON): the same offer; ask from the stored offset.
    let (mut d, offer) = connect(&hub, &token, true).await;
    assert_eq!(offer.version.as_str(), "1.1");
    let worst_second = pull(&mut d, &mut stored, MIB, MIB, &mut seq).await;
    assert!(stored == image, "the image arrived intact");
    let sent = hub
        .metric("hub_firmware_bytes_sent_total")
        .map_or(0, |v| v as u64);
    eprintln!(
        "hub sent {sent} image bytes for {MIB}; longest telemetry ack wait during the transfer: {:?}",
        worst_first.max(worst_second)
    );
    assert!(sent < (MIB as u64) * 16 / 10, "{sent} bytes sent");
    assert!(sent >= MIB as u64);

    // Progress and the outcome are recorded; the outcome ends the offer.
    d.send(&DeviceMessage::FirmwareStatus(FirmwareStatus {
        version: truncated("1.1"),
        state: UpdateState::Succeeded,
        percent: 100,
        reason: truncated(""),
    }))
    .await;
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match d.expect(WAIT * 2).await {
                HubMessage::FirmwareOffer(o) if o.version.is_empty() => break,
                HubMessage::Ack(_)
                | HubMessage::CommandClosed(_)
                | HubMessage::FirmwareChunk(_) => {}
                other => panic!("expected the offer to end, got {other:?}"),
            }
        }
    })
    .await;
    assert!(
        ended.is_ok(),
        "the offer did not end; hub log:\n{}",
        hub.log()
    );
    let (code, out, _) = hub.cli(&["firmware", "updates", "dev-1", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(json(&out)[0]["state"], "succeeded");

    // A request for a version not offered is refused with a reason, and the session goes on.
    d.send(&request(0)).await;
    loop {
        match d.expect(WAIT).await {
            HubMessage::Error(e) => {
                assert!(e.message.contains("not offered"), "{}", e.message);
                break;
            }
            HubMessage::Ack(_) => {}
            other => panic!("expected an error, got {other:?}"),
        }
    }
}

/// One device pulling the whole image with a window of requests while it sends a
/// telemetry batch every 100 ms: returns how long each chunk took from request to arrival
/// and each batch from sending to its ack.
async fn pull_with_telemetry(mut d: Device, size: u64) -> (Vec<Duration>, Vec<Duration>) {
    let (mut chunk_waits, mut ack_waits) = (Vec::new(), Vec::new());
    let mut asked: std::collections::VecDeque<Instant> = std::collections::VecDeque::new();
    let (mut next, mut stored, mut seq) = (0u64, 0u64, 0u64);
    let mut waiting_ack: Option<(u64, Instant)> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while stored < size {
        while asked.len() < WINDOW && next < size {
            d.send(&DeviceMessage::FirmwareRequest(FirmwareRequest {
                version: truncated("1.1"),
                offset: next,
                len: CHUNK,
            }))
            .await;
            asked.push_back(Instant::now());
            next += u64::from(CHUNK);
        }
        tokio::select! {
            _ = tick.tick(), if waiting_ack.is_none() => {
                seq += 1;
                let mut readings = heapless::Vec::new();
                let _ = readings.push(Reading { metric: truncated("temp"), ts: 1_764_000_000_000 + seq, value: 20.0 });
                d.send(&DeviceMessage::Telemetry(Telemetry { seq, readings })).await;
                waiting_ack = Some((seq, Instant::now()));
            }
            got = d.expect(WAIT) => match got {
                HubMessage::FirmwareChunk(chunk) => {
                    assert_eq!(chunk.offset, stored, "chunks come in the order asked for");
                    stored += chunk.data.as_slice().len() as u64;
                    if let Some(at) = asked.pop_front() {
                        chunk_waits.push(at.elapsed());
                    }
                }
                HubMessage::Ack(ack) => {
                    if let Some((s, at)) = waiting_ack {
                        if ack.up_to_seq >= s {
                            ack_waits.push(at.elapsed());
                            waiting_ack = None;
                        }
                    }
                }
                HubMessage::CommandClosed(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    (chunk_waits, ack_waits)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_transfer_stays_under_the_cap_while_acks_keep_flowing() {
    // 64 KiB/s for two devices pulling 256 KiB each: about 8 s. The bucket lets out at
    // most a chunk and a half at once (a tenth of a second's worth, at least a chunk).
    const CAP: u64 = 64 * 1024;
    const BURST: u64 = 6553;
    const SIZE: u64 = 256 * 1024;
    let hub = Hub::start(HubOptions {
        env: vec![
            ("HUB_FIRMWARE__MAX_TRANSFER_RATE".into(), "64KiB".into()),
            ("HUB_STORAGE__SYNCHRONOUS".into(), "normal".into()),
        ],
        ..HubOptions::default()
    });
    add_image(&hub, hub.dir.path(), "1.1", SIZE as usize, 7, &[]);
    let mut devices = Vec::new();
    for id in ["capped-1", "capped-2"] {
        let token = hub.token(id);
        let (code, _, err) = hub.cli(&["firmware", "offer", "1.1", id]);
        assert_eq!(code, 0, "{err}");
        let (d, offer) = connect(&hub, &token, false).await;
        assert_eq!(offer.size, SIZE);
        devices.push(d);
    }
    let started = Instant::now();
    let pulls: Vec<_> = devices
        .into_iter()
        .map(|d| tokio::spawn(pull_with_telemetry(d, SIZE)))
        .collect();
    let (mut chunk_waits, mut ack_waits) = (Vec::new(), Vec::new());
    for pull in pulls {
        let (chunks, acks) = pull.await.expect("a device's pull");
        chunk_waits.extend(chunks);
        ack_waits.extend(acks);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let sent = hub
        .metric("hub_firmware_bytes_sent_total")
        .map_or(0, |v| v as u64);
    let acks = ack_waits.len();
    let (chunk_median, ack_median) = (median(chunk_waits), median(ack_waits.clone()));
    eprintln!(
        "capped transfer: {sent} bytes in {elapsed:.2} s ({:.1} KiB/s, cap 64 KiB/s); chunk wait median {chunk_median:?}; {acks} acks, median {ack_median:?}, longest {:?}",
        sent as f64 / elapsed / 1024.0,
        ack_waits.iter().max(),
    );
    assert_eq!(sent, 2 * SIZE, "each image went out once");
    // Everything the hub sent fits in the time at the cap plus what a full bucket lets
    // out at once (and one chunk the clock's resolution may let slip).
    let allowed = CAP as f64 * elapsed + (BURST + u64::from(CHUNK)) as f64;
    assert!(
        sent as f64 <= allowed,
        "{sent} bytes in {elapsed:.2} s is over the cap ({allowed:.0} allowed)"
    );
    // And the cap is a cap, not a crawl: at least a quarter of it (leaving room for a
    // loaded machine).
    assert!(
        sent as f64 >= CAP as f64 * elapsed / 4.0,
        "{sent} bytes in {elapsed:.2} s is far below the cap"
    );
    // Telemetry kept flowing: a batch every 100 ms or so was acknowledged, and an ack did
    // not wait behind the chunks (each of which waited for the cap about a second, with
    // eight requested at a time and 32 KiB/s per device).
    assert!(
        acks as f64 >= elapsed * 2.0 * 3.0,
        "only {acks} acks in {elapsed:.2} s"
    );
    assert!(
        ack_median * 4 < chunk_median,
        "acks waited {ack_median:?} (median), chunks {chunk_median:?}: acks are held up by the cap"
    );
}

/// `firmware-sim flash --update-key` for `device` on this hub, starting on `version`.
fn flash_sim(hub: &Hub, device: &str, version: &str) -> std::path::PathBuf {
    let (code, key, err) = hub.cli(&["firmware", "key"]);
    assert_eq!(code, 0, "{err}");
    e2e::boards::flash(&e2e::boards::Flash {
        image: hub.dir.path().join(format!("{device}.img")),
        device,
        url: &hub.device_url,
        token: &hub.token(device),
        ca: &hub.ca(),
        version,
        update_key: &key,
    })
}

fn run_sim(image: &std::path::Path, fail: Option<&str>) -> e2e::process::KillOnDrop {
    e2e::boards::run(
        &[image.to_path_buf()],
        fail,
        Some(&image.with_extension("log")),
    )
}

fn update_of(hub: &Hub, device: &str) -> Value {
    let (code, out, err) = hub.cli(&["firmware", "updates", device, "--json"]);
    assert_eq!(code, 0, "{err}");
    json(&out)[0].clone()
}

fn firmware_of(hub: &Hub, device: &str) -> String {
    let (code, out, err) = hub.cli(&["devices", "show", device, "--json"]);
    assert_eq!(code, 0, "{err}");
    json(&out)["firmware"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Waits for `device`'s update to reach `state`; on a timeout, shows the logs.
fn wait_state(hub: &Hub, device: &str, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let u = update_of(hub, device);
        if u["state"] == state {
            return u;
        }
        if Instant::now() > deadline {
            let board = std::fs::read_to_string(hub.dir.path().join(format!("{device}.log")))
                .unwrap_or_default();
            panic!(
                "{device} never reported {state} (last: {u}); board log:\n{board}\nhub log:\n{}",
                hub.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A simulated board installs a signed update into its other slot, boots it on trial,
/// confirms it once the hub acknowledged its telemetry, and reports `succeeded`; a version
/// that fails to boot is rolled back with the reason; an image with a wrong signature is
/// refused with the reason, and the device stays on what it runs.
#[test]
fn a_simulated_board_installs_rolls_back_and_refuses() {
    let hub = Hub::start(HubOptions::default());
    let dir = hub.dir.path();
    for (version, seed) in [("1.1", 1u8), ("1.2", 2)] {
        add_image(&hub, dir, version, 300 * 1024, seed, &[]);
    }
    let bad = dir.join("bad.sig");
    std::fs::write(&bad, "00".repeat(64)).expect("sig");
    let bad = bad.to_str().expect("utf8");
    add_image(&hub, dir, "1.3", 10_000, 3, &["--signature", bad]);

    let image = flash_sim(&hub, "board-1", "1.0");
    let sim = run_sim(&image, Some("1.2"));
    e2e::wait_for(Duration::from_secs(30), "board-1 on 1.0", || {
        (firmware_of(&hub, "board-1") == "1.0").then_some(())
    });

    // A good update.
    let (code, _, err) = hub.cli(&["firmware", "offer", "1.1", "board-1"]);
    assert_eq!(code, 0, "{err}");
    wait_state(&hub, "board-1", "succeeded");
    assert_eq!(firmware_of(&hub, "board-1"), "1.1");

    // A version that does not boot.
    let (code, _, err) = hub.cli(&["firmware", "offer", "1.2", "board-1"]);
    assert_eq!(code, 0, "{err}");
    let u = wait_state(&hub, "board-1", "rolled_back");
    assert!(
        u["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("did not come up"),
        "{u}"
    );
    e2e::wait_for(Duration::from_secs(30), "board-1 back on 1.1", || {
        (firmware_of(&hub, "board-1") == "1.1").then_some(())
    });

    // A wrong signature.
    let (code, _, err) = hub.cli(&["firmware", "offer", "1.3", "board-1"]);
    assert_eq!(code, 0, "{err}");
    let u = wait_state(&hub, "board-1", "failed");
    assert!(
        u["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("bad signature"),
        "{u}"
    );
    let (code, out, _) = hub.cli(&["firmware", "updates"]);
    assert_eq!(code, 0);
    assert!(out.contains("bad signature"), "{out}");
    assert_eq!(firmware_of(&hub, "board-1"), "1.1");
    drop(sim);
}

/// `firmware-sim inspect --json`'s view of the board's firmware partition.
fn partition(image: &std::path::Path) -> Value {
    let out = std::process::Command::new(e2e::process::binary("firmware-sim"))
        .arg("inspect")
        .arg(image)
        .arg("--json")
        .output()
        .expect("firmware-sim inspect");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json(&String::from_utf8_lossy(&out.stdout))["partition"].clone()
}

/// Power cuts: `kill -9` of `firmware-sim run` at random moments while updates download,
/// install and reboot (the hub offers the other of two versions whenever the board
/// reported an outcome), each followed by a restart of the same image. After every cut the
/// board's active slot holds a valid image; at the end it boots, connects, and runs one of
/// the versions it was given. `POWER_CUTS` sets how many (default 8; the 200 with
/// `POWER_CUTS=200`), `POWER_CUT_SEED` replays the moments of a printed seed.
#[test]
fn kill_9_at_random_moments_never_bricks_a_board() {
    let cuts: usize = std::env::var("POWER_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let hub = Hub::start(HubOptions::default());
    let dir = hub.dir.path();
    for (version, seed) in [("2.1", 5u8), ("2.2", 6)] {
        add_image(&hub, dir, version, 200 * 1024, seed, &[]);
    }
    let image = flash_sim(&hub, "cut-1", "2.0");
    let (code, _, err) = hub.cli(&["firmware", "offer", "2.1", "cut-1"]);
    assert_eq!(code, 0, "{err}");
    // A small linear congruential generator: the test's randomness, seeded from the clock
    // (or `POWER_CUT_SEED`) and printed so that a failure can be replayed.
    let seed = std::env::var("POWER_CUT_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("power-cut seed {seed}");
    let mut state = seed;
    let mut random = move |below: u64| {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) % below
    };
    let mut outcomes = 0;
    for cut in 0..cuts {
        let mut sim = run_sim(&image, None);
        std::thread::sleep(Duration::from_millis(50 + random(900)));
        let _ = sim.0.kill();
        let _ = sim.0.wait();
        drop(sim);
        let p = partition(&image);
        assert_eq!(p["active_valid"], true, "after cut {cut}: {p}");
        let u = update_of(&hub, "cut-1");
        if ["succeeded", "failed", "rolled_back"].contains(&u["state"].as_str().unwrap_or_default())
        {
            outcomes += 1;
            let next = if u["version"] == "2.1" { "2.2" } else { "2.1" };
            let (code, _, err) = hub.cli(&["firmware", "offer", next, "cut-1"]);
            assert_eq!(code, 0, "{err}");
        }
    }
    // Power stays on: the board finishes what it is doing and settles.
    let sim = run_sim(&image, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    let u = loop {
        let u = update_of(&hub, "cut-1");
        if ["succeeded", "failed", "rolled_back"].contains(&u["state"].as_str().unwrap_or_default())
        {
            break u;
        }
        if Instant::now() > deadline {
            let board = std::fs::read_to_string(image.with_extension("log")).unwrap_or_default();
            panic!(
                "the last update never ended (last: {u}; partition {}); board log:\n{board}\nhub log:\n{}",
                partition(&image),
                hub.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let p = partition(&image);
    let running = e2e::wait_for(Duration::from_secs(30), "the board online", || {
        let (code, out, _) = hub.cli(&["devices", "show", "cut-1", "--json"]);
        let v = json(&out);
        (code == 0 && v["online"] == true && v["firmware"] == p["version"]).then_some(v)
    });
    eprintln!(
        "{cuts} power cuts, {outcomes} updates ended between them; last update {u}; running {}",
        running["firmware"]
    );
    assert!(
        ["2.0", "2.1", "2.2"].contains(&p["version"].as_str().unwrap_or_default()),
        "{p}"
    );
    assert_eq!(p["active_valid"], true, "{p}");
    drop(sim);
}

/// Rollouts with `ROLLOUT_DEVICES` simulated boards (default 30; the 200 with
/// `ROLLOUT_DEVICES=200`) on 1.0 in one `firmware-sim run`: 1.1 with a canary of 10 and
/// steps 50 %, 100 %, with a `kill -9` of the hub midway, ends with every board on 1.1 in
/// `hub devices`; then 1.2, which fails
/// to boot, stops after the canary: those boards are back on 1.1 and reported
/// `rolled_back`, and no other board was offered it; with `--on-failure pause` it pauses
/// there instead, goes on when resumed, and ends when aborted.
#[test]
fn a_rollout_goes_canary_then_steps_and_a_bad_version_stops_after_the_canary() {
    let n: usize = std::env::var("ROLLOUT_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let mut hub = Hub::start(HubOptions::default());
    let dir = hub.dir.path().to_path_buf();
    for (version, seed) in [("1.1", 7u8), ("1.2", 8)] {
        add_image(&hub, &dir, version, 48 * 1024, seed, &[]);
    }
    let images: Vec<std::path::PathBuf> = (0..n)
        .map(|i| flash_sim(&hub, &format!("fleet-{i:03}"), "1.0"))
        .collect();
    let start = |fail: Option<&str>| e2e::boards::run(&images, fail, None);
    let firmware_counts = |hub: &Hub| -> std::collections::HashMap<String, usize> {
        let (code, out, err) = hub.cli(&["devices", "--json"]);
        assert_eq!(code, 0, "{err}");
        let mut counts = std::collections::HashMap::new();
        for d in json(&out).as_array().cloned().unwrap_or_default() {
            if d["online"] == true {
                *counts
                    .entry(d["firmware"].as_str().unwrap_or_default().to_string())
                    .or_insert(0) += 1;
            }
        }
        counts
    };
    let sim = start(Some("1.2"));
    e2e::wait_for(Duration::from_secs(60), "every board online on 1.0", || {
        (firmware_counts(&hub).get("1.0") == Some(&n)).then_some(())
    });

    let started = Instant::now();
    let (code, out, err) = hub.cli(&[
        "rollout",
        "start",
        "--firmware",
        "1.1",
        "--all",
        "--canary",
        "10",
        "--steps",
        "50%,100%",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let id = json(&out)["id"].as_u64().expect("id");
    let status = |hub: &Hub| -> Value {
        let (_, out, _) = hub.cli(&["rollout", "status", &id.to_string(), "--json"]);
        json(&out)
    };
    // The canary alone is offered first.
    let mut saw_canary_alone = false;
    e2e::wait_for(Duration::from_secs(60), "the canary offered", || {
        let c = status(&hub)["counts"].clone();
        let offered = n as u64 - c["pending"].as_u64().unwrap_or(0);
        if c["succeeded"].as_u64().unwrap_or(0) < 10 {
            assert!(
                offered <= 10,
                "offered {offered} before the canary finished: {c}"
            );
            saw_canary_alone |= offered == 10;
        }
        saw_canary_alone.then_some(())
    });
    // The hub dies mid-rollout (kill -9) and comes back: the rollout goes on from its
    // stored state, and boards that finished meanwhile report on reconnect.
    hub.restart();
    let deadline = Instant::now() + Duration::from_secs(300);
    let done = loop {
        let v = status(&hub);
        let c = &v["counts"];
        let offered = n as u64 - c["pending"].as_u64().unwrap_or(0);
        if c["succeeded"].as_u64().unwrap_or(0) < 10 {
            assert!(
                offered <= 10,
                "offered {offered} before the canary finished: {c}"
            );
        }
        if v["state"] == "completed" {
            break v;
        }
        if Instant::now() > deadline {
            let stuck: Vec<&Value> = v["devices"]
                .as_array()
                .map(|d| {
                    d.iter()
                        .filter(|d| d["state"] != "succeeded")
                        .take(5)
                        .collect()
                })
                .unwrap_or_default();
            panic!("the rollout did not complete: {c}; some devices: {stuck:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        saw_canary_alone || n <= 10,
        "the canary phase was never seen on its own"
    );
    assert_eq!(done["counts"]["succeeded"], n, "{}", done["counts"]);
    e2e::wait_for(
        Duration::from_secs(60),
        "every board on 1.1 in hub devices",
        || (firmware_counts(&hub).get("1.1") == Some(&n)).then_some(()),
    );
    eprintln!(
        "rollout of 1.1 to {n} boards (canary 10, 50 %, 100 %) took {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // 1.2 fails to boot: the canary rolls back and the rollout aborts itself.
    let (code, out, err) = hub.cli(&[
        "rollout",
        "start",
        "--firmware",
        "1.2",
        "--all",
        "--canary",
        "10",
        "--steps",
        "50%,100%",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let id = json(&out)["id"].as_u64().expect("id");
    let aborted = e2e::wait_for(
        Duration::from_secs(120),
        "the rollout to abort and its canary to finish",
        || {
            let (_, out, _) = hub.cli(&["rollout", "status", &id.to_string(), "--json"]);
            let v = json(&out);
            let c = &v["counts"];
            (v["state"] == "aborted" && c["in_progress"] == 0 && c["offered"] == 0).then_some(v)
        },
    );
    assert!(
        aborted["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("failure budget"),
        "{aborted}"
    );
    let devices = aborted["devices"].as_array().cloned().unwrap_or_default();
    let offered: Vec<&Value> = devices.iter().filter(|d| d["state"] != "pending").collect();
    assert!(
        !offered.is_empty() && offered.len() <= 10,
        "{} offered",
        offered.len()
    );
    for d in &offered {
        assert_eq!(d["state"], "rolled_back", "{d}");
        assert!(
            d["reason"]
                .as_str()
                .unwrap_or_default()
                .contains("did not come up"),
            "{d}"
        );
    }
    let (code, out, _) = hub.cli(&["rollout", "status"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("aborted") && out.contains("completed"),
        "{out}"
    );

    // The same with `--on-failure pause`: past the budget it pauses, saying why, with
    // nothing more offered; a resume goes on to the next step; abort ends it.
    let (code, out, err) = hub.cli(&[
        "rollout",
        "start",
        "--firmware",
        "1.2",
        "--all",
        "--canary",
        "1",
        "--steps",
        "50%,100%",
        "--on-failure",
        "pause",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let id = json(&out)["id"].as_u64().expect("id").to_string();
    let show = |hub: &Hub| json(&hub.cli(&["rollout", "status", &id, "--json"]).1);
    let transition = |action: &str, to: &str| {
        let (code, out, err) = hub.cli(&["rollout", action, &id]);
        assert_eq!(
            (code, out.trim()),
            (0, format!("rollout {id} is {to}").as_str()),
            "{err}"
        );
    };
    let paused = e2e::wait_for(
        Duration::from_secs(120),
        "the rollout to pause with its canary finished",
        || {
            let v = show(&hub);
            let c = &v["counts"];
            (v["state"] == "paused" && c["in_progress"] == 0 && c["offered"] == 0).then_some(v)
        },
    );
    let reason = paused["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("failure budget exceeded: 1 of 1 finished"),
        "{paused}"
    );
    assert_eq!(paused["on_failure"], "pause");
    assert!(
        paused["counts"]["pending"] == n - 1,
        "nothing past the canary offered: {paused}"
    );
    transition("resume", "running");
    e2e::wait_for(
        Duration::from_secs(60),
        "the next step offered after resume",
        || {
            let c = show(&hub)["counts"].clone();
            (c["pending"].as_u64().unwrap_or(n as u64) < n as u64 - 1).then_some(())
        },
    );
    transition("abort", "aborted");
    e2e::wait_for(
        Duration::from_secs(120),
        "the aborted rollout settled",
        || {
            let c = show(&hub)["counts"].clone();
            (c["in_progress"] == 0 && c["offered"] == 0).then_some(())
        },
    );
    e2e::wait_for(Duration::from_secs(60), "every board back on 1.1", || {
        (firmware_counts(&hub).get("1.1") == Some(&n)).then_some(())
    });
    drop(sim);
}

//! End-to-end tests of `device-agent`'s firmware updates against the real `hub`: an offer
//! reaches the install program verified while a bad signature is refused, a rollout over
//! several agents runs each one's program, and a download cut by `kill -9` resumes from
//! the bytes stored.

use std::path::{Path, PathBuf};
use std::time::Duration;

use e2e::agent::{config, script, Agent};
use e2e::{try_wait, wait_for, Hub, HubOptions, TempDir};

const T: Duration = Duration::from_secs(30);

/// `hub firmware updates DEVICE --json`'s record of the device's update.
fn update_of(hub: &Hub, device: &str) -> serde_json::Value {
    let (code, out, err) = hub.cli(&["firmware", "updates", device, "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("updates json");
    v[0].clone()
}

/// Waits for `device`'s update of `version` to reach `state`.
fn wait_update(
    hub: &Hub,
    agent: &Agent,
    device: &str,
    version: &str,
    state: &str,
) -> serde_json::Value {
    try_wait(T, || {
        let u = update_of(hub, device);
        (u["version"] == version && u["state"] == state).then_some(u)
    })
    .unwrap_or_else(|| {
        panic!(
            "{device} never reported {state} for {version} (last: {}); agent log:\n{}",
            update_of(hub, device),
            agent.log()
        )
    })
}

/// Offers `version` to `device` with `hub firmware offer`, waits for its update to reach
/// `state`, and checks that the outcome's text says `says`.
fn offer_until(
    hub: &Hub,
    agent: &Agent,
    device: &str,
    version: &str,
    state: &str,
    says: &str,
) -> serde_json::Value {
    let (code, _, err) = hub.cli(&["firmware", "offer", version, device]);
    assert_eq!(code, 0, "{err}");
    let u = wait_update(hub, agent, device, version, state);
    assert!(
        u["reason"].as_str().is_some_and(|r| r.contains(says)),
        "the outcome of {version} should say {says:?}: {u}"
    );
    u
}

/// `hub firmware add` + `hub firmware offer` update an agent: it downloads the image,
/// checks it against the key from its configuration and hands the verified file to the
/// install program (a script run without a shell), whose output the operator sees; an
/// image whose signature does not verify is refused with the reason, and the program never
/// sees it.
#[test]
fn firmware_offers_reach_the_install_program_and_bad_signatures_are_refused() {
    let hub = Hub::start(HubOptions::default());
    let dir = TempDir::new("agent-ota");
    let device = "ota-1";
    let image: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let file = dir.path().join("fw-2.0.bin");
    std::fs::write(&file, &image).expect("image");
    add_firmware(&hub, &file, "2.0", &[]);
    let bad_sig = dir.path().join("bad.sig");
    std::fs::write(&bad_sig, "00".repeat(64)).expect("signature");
    add_firmware(
        &hub,
        &file,
        "2.1",
        &["--signature", bad_sig.to_str().expect("utf8")],
    );

    // The install program keeps what it was given and says how big it was.
    let program = script(dir.path(), "install.sh", INSTALL);
    let extra = update_section(&hub, Some(&program));
    let cfg = config(&hub, dir.path(), device, "postcard", &extra);
    let agent = Agent::start(dir.path(), &cfg);
    wait_connected(&hub, device);

    // The program's output is the outcome's text.
    offer_until(
        &hub,
        &agent,
        device,
        "2.0",
        "succeeded",
        "installed 100000 bytes",
    );
    assert_eq!(
        std::fs::read(dir.path().join("installed.bin")).ok(),
        Some(image.clone()),
        "the program got the verified image"
    );

    offer_until(&hub, &agent, device, "2.1", "failed", "bad signature");
    let (code, out, _) = hub.cli(&["firmware", "updates"]);
    assert_eq!(code, 0);
    assert!(out.contains("bad signature"), "{out}");
    let installs = std::fs::read_to_string(dir.path().join("installs")).unwrap_or_default();
    assert_eq!(
        installs.lines().count(),
        1,
        "the refused image was not installed: {installs}"
    );

    // An agent with the key but no install program refuses, saying why.
    let dir2 = TempDir::new("agent-ota-no-program");
    let other = "ota-2";
    let extra = update_section(&hub, None);
    let cfg = config(&hub, dir2.path(), other, "json", &extra);
    let agent2 = Agent::start(dir2.path(), &cfg);
    wait_connected(&hub, other);
    offer_until(&hub, &agent2, other, "2.0", "failed", "no [update] program");
    drop(agent2);
    drop(agent);
}

/// A rollout (`hub rollout start`, a canary of one, then everyone) over three agents, in
/// both encodings: it ends `completed` with every agent `succeeded`, each agent's install
/// program having run once with the verified image.
#[test]
fn a_rollout_updates_every_agent_through_its_install_program() {
    let hub = Hub::start(HubOptions::default());
    let root = TempDir::new("agent-rollout");
    let image: Vec<u8> = (0..50_000u32).map(|i| (i * 11 % 241) as u8).collect();
    let file = root.path().join("fw-4.0.bin");
    std::fs::write(&file, &image).expect("image");
    add_firmware(&hub, &file, "4.0", &[]);
    let agents: Vec<(String, PathBuf, Agent)> = (0..3)
        .map(|i| {
            let dir = root.path().join(format!("agent-{i}"));
            std::fs::create_dir_all(&dir).expect("agent dir");
            let device = format!("rollout-{i}");
            let program = script(&dir, "install.sh", INSTALL);
            let extra = update_section(&hub, Some(&program));
            let encoding = if i % 2 == 0 { "postcard" } else { "json" };
            let cfg = config(&hub, &dir, &device, encoding, &extra);
            let agent = Agent::start(&dir, &cfg);
            (device, dir, agent)
        })
        .collect();
    for (device, _, _) in &agents {
        wait_connected(&hub, device);
    }
    let (code, out, err) = hub.cli(&[
        "rollout",
        "start",
        "--firmware",
        "4.0",
        "--all",
        "--canary",
        "1",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let started: serde_json::Value = serde_json::from_str(&out).expect("rollout json");
    let id = started["id"].as_u64().expect("id");
    assert_eq!(started["counts"]["targets"], 3, "{started}");
    let done = try_wait(T, || {
        let (_, out, _) = hub.cli(&["rollout", "status", &id.to_string(), "--json"]);
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        (v["state"] == "completed").then_some(v)
    })
    .unwrap_or_else(|| {
        let logs: Vec<String> = agents.iter().map(|(_, _, a)| a.log()).collect();
        panic!(
            "rollout {id} did not complete: {}\nagent logs:\n{}",
            hub.cli(&["rollout", "status", &id.to_string()]).1,
            logs.join("\n---\n")
        )
    });
    assert_eq!(done["counts"]["succeeded"], 3, "{done}");
    for (device, dir, _) in &agents {
        let u = update_of(&hub, device);
        assert_eq!(
            (&u["state"], &u["rollout"]),
            (&"succeeded".into(), &id.into()),
            "{u}"
        );
        assert!(
            u["reason"]
                .as_str()
                .is_some_and(|r| r.contains("installed 50000 bytes")),
            "{u}"
        );
        assert_eq!(
            std::fs::read(dir.join("installed.bin")).ok(),
            Some(image.clone()),
            "{device}'s program got the verified image"
        );
        let installs = std::fs::read_to_string(dir.join("installs")).unwrap_or_default();
        assert_eq!(
            installs.lines().count(),
            1,
            "{device} installed once: {installs}"
        );
    }
}

/// The install program of the agents' update tests: keeps what it was given (and a line
/// per run in `installs`) and says how big it was.
const INSTALL: &str = "#!/bin/sh\nd=\"$(dirname \"$0\")\"\necho \"$1\" >> \"$d/installs\"\ncp \"$1\" \"$d/installed.bin\" || exit 4\necho \"installed $(wc -c < \"$1\") bytes\"\n";

/// `hub firmware add FILE --version V` plus `extra` arguments.
fn add_firmware(hub: &Hub, file: &Path, version: &str, extra: &[&str]) {
    let mut args = vec![
        "firmware",
        "add",
        file.to_str().expect("utf8"),
        "--version",
        version,
    ];
    args.extend_from_slice(extra);
    let (code, _, err) = hub.cli(&args);
    assert_eq!(code, 0, "{err}");
}

/// An `[update]` section with the hub's public key and `program` (none: `None`).
fn update_section(hub: &Hub, program: Option<&Path>) -> String {
    let (code, key, err) = hub.cli(&["firmware", "key"]);
    assert_eq!(code, 0, "{err}");
    let program = program.map_or(String::new(), |p| {
        format!("program = \"{}\"\n", p.display())
    });
    format!("[update]\n{program}key = \"{}\"\n", key.trim())
}

/// Waits until the hub has seen `device`'s agent say hello.
fn wait_connected(hub: &Hub, device: &str) {
    wait_for(T, "the agent to connect", || {
        let (code, out, _) = hub.cli(&["devices", "show", device, "--json"]);
        (code == 0 && out.contains("device-agent/")).then_some(())
    });
}

/// An agent killed with `kill -9` in the middle of a download resumes from the bytes it
/// stored when it comes back: the hub sends the image well under twice in total.
#[test]
fn a_download_cut_by_kill_9_resumes_from_the_stored_bytes() {
    let hub = Hub::start(HubOptions::default());
    let dir = TempDir::new("agent-ota-resume");
    let device = "ota-resume";
    let size = 8 << 20;
    let image: Vec<u8> = (0..size as u32).map(|i| (i * 13 % 251) as u8).collect();
    let file = dir.path().join("fw-3.0.bin");
    std::fs::write(&file, &image).expect("image");
    add_firmware(&hub, &file, "3.0", &[]);
    let program = script(
        dir.path(),
        "install.sh",
        "#!/bin/sh\ncp \"$1\" \"$(dirname \"$0\")/installed.bin\"\n",
    );
    let extra = update_section(&hub, Some(&program));
    let cfg = config(&hub, dir.path(), device, "postcard", &extra);
    let mut agent = Agent::start(dir.path(), &cfg);
    wait_connected(&hub, device);
    let (code, _, err) = hub.cli(&["firmware", "offer", "3.0", device]);
    assert_eq!(code, 0, "{err}");
    let part = dir
        .path()
        .join("data")
        .join(format!("firmware-{device}"))
        .join("image.part");
    // The file only grows while the download runs: poll it closely and cut at a quarter.
    wait_for(T, "a quarter of the image on disk", || {
        std::fs::metadata(&part)
            .ok()
            .filter(|m| m.len() >= size / 4)
            .map(|_| ())
    });
    agent.kill9();
    let stored = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
    assert!(
        stored > 0 && stored < size,
        "the download was cut before it ended ({stored} of {size})"
    );
    agent.spawn();
    wait_update(&hub, &agent, device, "3.0", "succeeded");
    assert_eq!(
        std::fs::read(dir.path().join("installed.bin")).ok(),
        Some(image),
        "the resumed image is the offered one"
    );
    let sent = hub
        .metric("hub_firmware_bytes_sent_total")
        .map_or(0, |v| v as u64);
    assert!(
        sent < size + size / 2,
        "resumed, not restarted: the hub sent {sent} bytes for an image of {size}"
    );
    drop(agent);
}

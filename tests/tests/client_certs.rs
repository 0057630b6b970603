//! Client certificates as a second way in: `hub devices add --cert DIR` issues one, a
//! device presenting it without a token is accepted and its readings stored; revoking the
//! device (`hub token revoke`, `hub devices remove`) closes its live session and refuses
//! the certificate afterwards, in the log and the refusal counter like a refused token; a
//! certificate from another CA is refused in the TLS handshake; a certificate and a token
//! naming different devices are refused with 403; two hubs configured with the same
//! `tls.device_ca` accept each other's certificates, as the nodes of a cluster must; and
//! `device-agent` (`hub.cert_file`, `hub.key_file`) and `firmware-sim flash --cert --key`
//! connect with a certificate alone.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use e2e::client::{connect_with, hello, refusal, tls_config_with_cert, Device, Received};
use e2e::process::binary;
use e2e::{wait_for, Hub, HubOptions};
use schemas::message::truncated;
use schemas::{DeviceMessage, HubMessage, Reading, Telemetry};

const T: Duration = Duration::from_secs(10);

/// `hub devices add ID --cert DIR`; returns the certificate and key paths.
fn add_with_cert(hub: &Hub, id: &str, dir: &Path) -> (PathBuf, PathBuf) {
    let (code, out, err) = hub.cli(&["devices", "add", id, "--cert", &dir.to_string_lossy()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.trim().starts_with(&format!("v1.{id}.")),
        "a token too: {out}"
    );
    assert!(err.contains(&format!("{id}.crt")), "{err}");
    (dir.join(format!("{id}.crt")), dir.join(format!("{id}.key")))
}

/// Connects presenting `cert`/`key`, trusting `hub`'s CA, with an optional token.
async fn connect_cert(
    hub: &Hub,
    cert: &Path,
    key: &Path,
    token: Option<&str>,
) -> Result<Device, Box<tokio_tungstenite::tungstenite::Error>> {
    let tls = tls_config_with_cert(&hub.ca(), cert, key);
    let ws = connect_with(&hub.device_url, tls, token, Some("hub.v1.postcard")).await?;
    Ok(Device { ws, json: false })
}

async fn welcome(d: &mut Device) {
    d.send(&hello("fw-cert")).await;
    match d.expect(T).await {
        HubMessage::Welcome(_) => {}
        other => panic!("expected welcome, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_with_a_client_certificate_and_no_token_is_accepted_and_its_readings_stored() {
    let hub = Hub::start(HubOptions::default());
    let certs = hub.dir.path().join("certs");
    let (cert, key) = add_with_cert(&hub, "cert-1", &certs);
    let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the key file is private");
    // The CA written next to them is the hub's (which also signed its server certificate).
    assert_eq!(
        std::fs::read_to_string(certs.join("ca.crt")).expect("ca.crt"),
        std::fs::read_to_string(hub.ca()).expect("ca.pem")
    );

    let mut d = connect_cert(&hub, &cert, &key, None)
        .await
        .expect("accepted without a token");
    welcome(&mut d).await;
    let mut readings = heapless::Vec::new();
    for i in 0..4 {
        let _ = readings.push(Reading {
            metric: truncated("temp"),
            ts: 1_764_000_000_000 + i,
            value: i as f64,
        });
    }
    d.send(&DeviceMessage::Telemetry(Telemetry { seq: 1, readings }))
        .await;
    d.wait_ack(1).await;
    assert_eq!(hub.stored_readings("cert-1"), 4);
    let (_, v) = hub.api(
        "GET",
        "/api/v1/devices/cert-1",
        Some(&hub.admin_token()),
        None,
    );
    assert_eq!(v["online"], true, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_certificate_device_is_closed_refused_and_recorded() {
    let hub = Hub::start(HubOptions::default());
    let certs = hub.dir.path().join("certs");
    for (id, revoke) in [
        ("cert-r", ["token", "revoke"]),
        ("cert-x", ["devices", "remove"]),
    ] {
        let (cert, key) = add_with_cert(&hub, id, &certs);
        let mut d = connect_cert(&hub, &cert, &key, None)
            .await
            .expect("accepted");
        welcome(&mut d).await;
        let refused_before = hub.metric("hub_auth_failures_total").unwrap_or(0.0);

        let (code, _, err) = hub.cli(&[revoke[0], revoke[1], id]);
        assert_eq!(code, 0, "{err}");
        // The live session is closed (1008, as for a revoked token) ...
        loop {
            match d.recv(T).await {
                Received::Closed(code, reason) => {
                    assert_eq!(code, 1008, "{reason}");
                    break;
                }
                Received::Ended => panic!("no close frame"),
                Received::Message(_) => continue,
            }
        }
        // ... and the certificate is refused at the upgrade from now on, with a reason.
        let err = connect_cert(&hub, &cert, &key, None)
            .await
            .err()
            .expect("refused");
        let (status, body) = refusal(&err).expect("an HTTP refusal");
        assert_eq!(status, 401, "{body}");
        assert!(
            body.contains(&format!("client certificate of {id} revoked")),
            "{body}"
        );
        // Recorded like a refused token: the log line and the refusal counter.
        wait_for(T, "the refusal in the log", || {
            hub.log()
                .lines()
                .any(|l| {
                    l.contains("device refused at the upgrade (HTTP 401)")
                        && l.contains(id)
                        && l.contains("certificate")
                })
                .then_some(())
        });
        assert!(hub.metric("hub_auth_failures_total").unwrap_or(0.0) > refused_before);
    }
    // The revoked (not removed) device's last cause says why it went.
    let (_, v) = hub.api(
        "GET",
        "/api/v1/devices/cert-r",
        Some(&hub.admin_token()),
        None,
    );
    assert_eq!(v["last_cause"], "token_revoked", "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_foreign_certificate_is_refused_in_tls_and_a_disagreeing_token_with_403() {
    let hub = Hub::start(HubOptions::default());
    let other = Hub::start(HubOptions::default());
    let certs = hub.dir.path().join("certs");
    let foreign = hub.dir.path().join("foreign");

    // Signed by the other hub's CA: this hub's TLS handshake refuses it.
    let (cert, key) = add_with_cert(&other, "cert-f", &foreign);
    let tls_failures = hub.metric("hub_tls_failures_total").unwrap_or(0.0);
    let err = connect_cert(&hub, &cert, &key, None)
        .await
        .err()
        .expect("refused");
    assert!(refusal(&err).is_none(), "refused in TLS, not HTTP: {err}");
    wait_for(T, "the TLS failure counted", || {
        (hub.metric("hub_tls_failures_total").unwrap_or(0.0) > tls_failures).then_some(())
    });

    // A certificate for one device and a token for another: 403, naming both.
    let (cert, key) = add_with_cert(&hub, "cert-a", &certs);
    let token = hub.token("cert-b");
    let err = connect_cert(&hub, &cert, &key, Some(&token))
        .await
        .err()
        .expect("refused");
    let (status, body) = refusal(&err).expect("an HTTP refusal");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("cert-a") && body.contains("cert-b"), "{body}");
    // Both for the same device: accepted.
    let token = hub.token("cert-a");
    let mut d = connect_cert(&hub, &cert, &key, Some(&token))
        .await
        .expect("both for one device");
    welcome(&mut d).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hubs_sharing_a_device_ca_accept_each_others_certificates() {
    let first = Hub::start(HubOptions::default());
    let ca = first.data_dir().join("tls/ca.pem");
    let ca_key = first.data_dir().join("tls/ca-key.pem");
    // The second hub, like a second cluster node, issues and verifies with the first's CA.
    let second = Hub::start(HubOptions {
        env: vec![
            ("HUB_TLS__DEVICE_CA".into(), ca.to_string_lossy().into()),
            (
                "HUB_TLS__DEVICE_CA_KEY".into(),
                ca_key.to_string_lossy().into(),
            ),
        ],
        ..HubOptions::default()
    });
    let certs = second.dir.path().join("certs");
    let (by_second, by_second_key) = add_with_cert(&second, "node-2", &certs);
    let (by_first, by_first_key) = add_with_cert(&first, "node-1", &certs);
    for (hub, cert, key) in [
        (&first, &by_second, &by_second_key),
        (&second, &by_first, &by_first_key),
    ] {
        let mut d = connect_cert(hub, cert, key, None)
            .await
            .expect("a certificate issued by the other hub");
        welcome(&mut d).await;
    }
}

/// Kills the child when dropped, so a failing test leaves no process behind.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_agent_and_the_firmware_connect_with_a_certificate_and_no_token() {
    let hub = Hub::start(HubOptions::default());
    let dir = hub.dir.path().to_path_buf();
    let certs = dir.join("certs");

    // device-agent: hub.cert_file and hub.key_file, no token.
    let (cert, key) = add_with_cert(&hub, "agent-c", &certs);
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = \"{data}\"\n[hub]\nurl = \"{url}\"\ndevice_id = \"agent-c\"\nca_file = \"{ca}\"\ncert_file = \"{cert}\"\nkey_file = \"{key}\"\n[reconnect]\ninitial = \"100ms\"\nmax = \"500ms\"\n\n[[sensors]]\nname = \"system\"\nkind = \"system\"\ninterval = \"1s\"\n",
            data = dir.join("agent-data").display(),
            url = hub.device_url,
            ca = certs.join("ca.crt").display(),
            cert = cert.display(),
            key = key.display(),
        ),
    )
    .expect("agent.toml");
    let _agent = Running(
        Command::new(binary("device-agent"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn device-agent"),
    );

    // firmware-sim: flash --cert --key, no token.
    let (cert, key) = add_with_cert(&hub, "sim-c", &certs);
    let image = dir.join("sim-c.img");
    let out = Command::new(binary("firmware-sim"))
        .args([
            "flash",
            "--device",
            "sim-c",
            "--hub",
            &hub.device_url,
            "--interval",
            "200ms",
        ])
        .arg("--out")
        .arg(&image)
        .arg("--ca")
        .arg(hub.ca())
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .output()
        .expect("firmware-sim flash");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _sim = Running(
        Command::new(binary("firmware-sim"))
            .arg("run")
            .arg(&image)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn firmware-sim run"),
    );

    for device in ["agent-c", "sim-c"] {
        wait_for(T, &format!("readings from {device}"), || {
            (hub.stored_readings(device) > 0).then_some(())
        });
    }
    assert!(
        !hub.log().contains("device refused at the upgrade"),
        "{}",
        hub.log()
    );
}

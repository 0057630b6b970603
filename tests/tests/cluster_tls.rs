//! TLS when nginx terminates it in front of the hubs (`deploy/README.md`, "TLS: what
//! devices trust"): nginx serves a certificate signed by a CA, devices trust that CA. The
//! certificates are made with the `openssl` commands the README gives. A self-signed
//! certificate marked CA:TRUE served as nginx's own is refused by every device, and
//! `firmware-sim` says so on stderr, in its summary and in its exit status, instead of
//! retrying in silence; so does a device given a CA that did not sign the certificate.

use std::path::Path;
use std::process::Command;

use e2e::process::binary;
use e2e::servers::{ensure_installed, nginx_wss};
use e2e::{Hub, HubOptions, TempDir};

/// Runs `openssl` with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new(ensure_installed("openssl", "openssl"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `firmware-sim fleet` for 2 devices for 2 s against `url`, trusting `ca`: exit status,
/// JSON summary, stderr.
fn fleet(hub: &Hub, dir: &Path, url: &str, ca: &Path) -> (i32, serde_json::Value, String) {
    let tokens: String = ["tls-00001", "tls-00002"]
        .iter()
        .map(|id| format!("{id} {}\n", hub.token(id)))
        .collect();
    let tokens_file = dir.join("tokens.txt");
    std::fs::write(&tokens_file, tokens).expect("tokens");
    let out = Command::new(binary("firmware-sim"))
        .args(["fleet", "--count", "2", "--prefix", "tls-", "--hub", url])
        .arg("--ca")
        .arg(ca)
        .arg("--tokens")
        .arg(&tokens_file)
        .args([
            "--interval",
            "200ms",
            "--duration",
            "2s",
            "--drain-timeout",
            "1s",
            "--json",
        ])
        .output()
        .expect("run firmware-sim");
    let summary = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (
        out.status.code().unwrap_or(-1),
        summary,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn devices_trust_the_ca_that_signed_nginxs_certificate_and_say_so_when_they_cannot() {
    let hub = Hub::start(HubOptions {
        env: vec![("HUB_DEVICE__PLAIN_WS".into(), "true".into())],
        ..HubOptions::default()
    });
    let dir = TempDir::new("tls");
    let d = dir.path();
    // The README's recipe: a CA for the devices, and nginx's certificate signed by it.
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        d,
        &[
            &["req", "-x509", "-new"][..],
            &ec,
            &[
                "-days",
                "3650",
                "-keyout",
                "ca-key.pem",
                "-out",
                "ca.pem",
                "-subj",
                "/CN=fleet CA",
            ],
        ]
        .concat(),
    );
    openssl(
        d,
        &[
            &["req", "-new"][..],
            &ec,
            &[
                "-keyout",
                "server-key.pem",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        d.join("server.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-set_serial",
            "1",
            "-days",
            "825",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ],
    );
    // What went wrong in the field: one self-signed certificate, CA:TRUE, as both.
    openssl(
        d,
        &[
            &["req", "-x509", "-new"][..],
            &ec,
            &[
                "-days",
                "30",
                "-keyout",
                "self-key.pem",
                "-out",
                "self.pem",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
            ],
        ]
        .concat(),
    );

    let good = nginx_wss(
        &[hub.device_addr()],
        &d.join("server.pem"),
        &d.join("server-key.pem"),
    );
    let url = format!("wss://localhost:{}/v1/device", good.port);
    let (code, summary, err) = fleet(&hub, d, &url, &d.join("ca.pem"));
    assert_eq!(code, 0, "{summary}\n{err}");
    assert_eq!(summary["ever_connected"], 2, "{summary}");
    assert_eq!(summary["tls_failures"], 0, "{summary}");

    // A CA that did not sign nginx's certificate.
    let (code, summary, err) = fleet(&hub, d, &url, &d.join("self.pem"));
    assert_eq!(code, 1, "{summary}\n{err}");
    assert!(
        err.contains("is not signed by the CA this device trusts"),
        "{err}"
    );
    assert_eq!(summary["ever_connected"], 0, "{summary}");

    // The self-signed CA certificate served as nginx's own.
    let bad = nginx_wss(
        &[hub.device_addr()],
        &d.join("self.pem"),
        &d.join("self-key.pem"),
    );
    let url = format!("wss://localhost:{}/v1/device", bad.port);
    let (code, summary, err) = fleet(&hub, d, &url, &d.join("self.pem"));
    assert_eq!(code, 1, "{summary}\n{err}");
    assert!(
        err.contains(&format!("TLS handshake with localhost:{} failed", bad.port)),
        "{err}"
    );
    assert!(
        err.contains("presents a CA certificate (CA:TRUE) as its own"),
        "{err}"
    );
    assert_eq!(summary["ever_connected"], 0, "{summary}");
    assert!(
        summary["tls_failures"].as_u64().unwrap_or(0) >= 2,
        "{summary}"
    );
    assert!(
        summary["tls_error"]
            .as_str()
            .is_some_and(|e| e.contains("CA:TRUE")),
        "{summary}"
    );
    assert!(
        summary["errors"][0]
            .as_str()
            .is_some_and(|e| e.starts_with("2 of 2 devices never connected; TLS handshake")),
        "{summary}"
    );
}

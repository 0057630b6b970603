//! What `deploy/README.md` tells an operator to do works: the TLS step for the two-hub
//! compose makes a certificate that devices (rustls, like the agent and the firmware
//! simulator) accept for the name they connect to and for no other; `tls.server_names`
//! puts names into the hub's generated certificate; the compose file starts the hubs only
//! once Redis and InfluxDB answer; and the container's health check works in the shell
//! it names.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use e2e::client::tls_config;
use e2e::docs::{sh_blocks, untracked};
use e2e::{Hub, HubOptions, TempDir};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

const T: Duration = Duration::from_secs(10);

fn deploy_file(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../deploy")
            .join(name),
    )
    .unwrap_or_else(|e| panic!("deploy/{name}: {e}"))
}

/// A TLS handshake with `addr` as a device makes it: trusting only `ca`, for `name`.
async fn device_handshake(addr: std::net::SocketAddr, ca: &Path, name: &str) -> Result<(), String> {
    let connector = tokio_rustls::TlsConnector::from(tls_config(ca));
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let server_name = ServerName::try_from(name.to_string()).map_err(|e| e.to_string())?;
    tokio::time::timeout(T, connector.connect(server_name, tcp))
        .await
        .map_err(|_| "handshake timed out".to_string())?
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Serves TLS with `cert` and `key` on a loopback port, for as many handshakes as come.
async fn tls_server(cert: &Path, key: &Path) -> std::net::SocketAddr {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .expect("read server.pem")
        .collect::<Result<_, _>>()
        .expect("certificates");
    let key = PrivateKeyDer::from_pem_file(key).expect("read server-key.pem");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("a usable certificate and key");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A refused handshake is the client's business; the server goes on.
                let _ = acceptor.accept(tcp).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread")]
async fn the_compose_tls_step_makes_a_certificate_devices_accept_for_its_name_only() {
    let readme = deploy_file("README.md");
    let block = sh_blocks(&readme, "Several hubs")
        .into_iter()
        .find(|b| b.contains("openssl x509"))
        .expect("deploy/README.md has a block that makes nginx's certificate");
    // Run as written, from a "repository root" that is a git repository with the
    // project's .gitignore.
    let dir = TempDir::new("deploy-tls");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../.gitignore"),
        dir.path().join(".gitignore"),
    )
    .expect("copy .gitignore");
    for args in [&["init", "-q"][..], &["add", ".gitignore"]] {
        let status = Command::new("git")
            .args(args)
            .current_dir(dir.path())
            .status()
            .expect("git");
        assert!(status.success());
    }
    let out = Command::new("bash")
        .args(["-e", "-c", &block])
        .current_dir(dir.path())
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "the TLS block failed:\n{block}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tls = dir.path().join("deploy/nginx/tls");
    let addr = tls_server(&tls.join("server.pem"), &tls.join("server-key.pem")).await;
    let ca = tls.join("ca.pem");
    device_handshake(addr, &ca, "hub.example.net")
        .await
        .expect("a device accepts the certificate for the name it connects to");
    let other = device_handshake(addr, &ca, "other.example.net").await;
    assert!(other.is_err(), "accepted for another name");
    // The keys are not something git would pick up.
    assert_eq!(untracked(dir.path()), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_server_names_go_into_the_generated_certificate() {
    let hub = Hub::start(HubOptions {
        env: vec![(
            "HUB_TLS__SERVER_NAMES".to_string(),
            "hub.example.net,10.0.0.5".to_string(),
        )],
        ..HubOptions::default()
    });
    let addr: std::net::SocketAddr = hub.device_addr().parse().expect("device address");
    for name in ["hub.example.net", "localhost"] {
        device_handshake(addr, &hub.ca(), name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert!(device_handshake(addr, &hub.ca(), "elsewhere.example.net")
        .await
        .is_err());
}

/// The lines of a YAML block mapping under `key` (a line that reads exactly `key` once
/// trimmed), as far as they are indented deeper than it.
fn under<'a>(yaml: &'a str, key: &str) -> Vec<&'a str> {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut lines = yaml.lines().skip_while(|l| l.trim() != key);
    let Some(head) = lines.next() else {
        panic!("no `{key}` in:\n{yaml}")
    };
    lines
        .take_while(|l| l.trim().is_empty() || indent(l) > indent(head))
        .collect()
}

#[test]
fn the_hubs_start_once_redis_and_influxdb_answer() {
    let compose = deploy_file("compose.yaml");
    let hub = under(&compose, "x-hub: &hub").join("\n");
    let depends = under(&hub, "depends_on:").join("\n");
    for service in ["redis:", "influxdb:"] {
        assert_eq!(
            under(&depends, service)
                .iter()
                .map(|l| l.trim())
                .collect::<Vec<_>>(),
            ["condition: service_healthy"],
            "{service} in:\n{depends}"
        );
    }
    let services = under(&compose, "services:").join("\n");
    for (service, check) in [
        ("influxdb:", r#"test: ["CMD", "influx", "ping"]"#),
        ("redis:", r#"test: ["CMD", "redis-cli", "ping"]"#),
    ] {
        let health = under(&under(&services, service).join("\n"), "healthcheck:").join("\n");
        assert!(health.contains(check), "{service} healthcheck:\n{health}");
    }
}

#[test]
fn the_container_health_check_says_ready_for_a_running_hub() {
    let containerfile = deploy_file("Containerfile");
    let line = containerfile
        .lines()
        .find(|l| l.starts_with("HEALTHCHECK"))
        .expect("a HEALTHCHECK");
    let argv: Vec<String> = serde_json::from_str(&line[line.find("CMD [").expect("CMD") + 4..])
        .expect("the CMD is a JSON array");
    let hub = Hub::start(HubOptions::default());
    let port = hub
        .admin_url()
        .rsplit(':')
        .next()
        .expect("port")
        .to_string();
    // The image's admin port is 8444; this hub's is free-chosen.
    let script = argv[2].replace("/8444", &format!("/{port}"));
    let status = Command::new(&argv[0])
        .args([&argv[1], &script])
        .status()
        .expect("the health check's shell");
    assert!(status.success(), "{argv:?} failed against a ready hub");
    drop(hub);
    let status = Command::new(&argv[0])
        .args([&argv[1], &script])
        .status()
        .expect("the health check's shell");
    assert!(!status.success(), "healthy without a hub");
}

//! Simulated boards for the firmware-update tests: `firmware-sim flash` with the hub's
//! update key (so the board verifies what it is offered), `firmware-sim run` of one or
//! many board images, killed when the test drops it, and test images added to a hub.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::process::{binary, KillOnDrop};
use crate::Hub;

/// Where and how a board connects, and what it starts on.
pub struct Flash<'a> {
    /// The board image to write.
    pub image: PathBuf,
    /// The device id.
    pub device: &'a str,
    /// The device URL it connects to (a hub's, or a load balancer's).
    pub url: &'a str,
    /// Its token.
    pub token: &'a str,
    /// The CA certificate it trusts.
    pub ca: &'a Path,
    /// The firmware version it runs first.
    pub version: &'a str,
    /// The hub's public update key (hex), as `hub firmware key` prints it.
    pub update_key: &'a str,
}

/// `firmware-sim flash --update-key`: writes the board image (telemetry every 200 ms) and
/// returns its path.
pub fn flash(board: &Flash<'_>) -> PathBuf {
    let out = Command::new(binary("firmware-sim"))
        .arg("flash")
        .arg("--out")
        .arg(&board.image)
        .args(["--device", board.device, "--hub", board.url.trim()])
        .args(["--token", board.token])
        .arg("--ca")
        .arg(board.ca)
        .args(["--interval", "200ms", "--firmware", board.version])
        .args(["--update-key", board.update_key.trim()])
        .output()
        .expect("firmware-sim flash");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    board.image.clone()
}

/// `firmware-sim run` of `images` in one process, all connecting at once; `fail` makes
/// that version fail to boot; the log goes to `log` (or nowhere).
pub fn run(images: &[PathBuf], fail: Option<&str>, log: Option<&Path>) -> KillOnDrop {
    let mut cmd = Command::new(binary("firmware-sim"));
    cmd.arg("run").args(images).args(["--connect-rate", "0"]);
    if let Some(v) = fail {
        cmd.args(["--fail-boot-version", v]);
    }
    let stderr = match log {
        Some(path) => Stdio::from(std::fs::File::create(path).expect("board log")),
        None => Stdio::null(),
    };
    cmd.stdout(Stdio::null()).stderr(stderr);
    KillOnDrop(cmd.spawn().expect("spawn firmware-sim run"))
}

/// Writes a `size`-byte image whose bytes depend on `seed` into `dir` and adds it to
/// `hub` as `version` (`extra` arguments after `--version V`, e.g. `--signature FILE`).
pub fn add_image(hub: &Hub, dir: &Path, version: &str, size: usize, seed: u8, extra: &[&str]) {
    let file = dir.join(format!("fw-{version}.bin"));
    std::fs::write(
        &file,
        (0..size).map(|i| (i as u8) ^ seed).collect::<Vec<u8>>(),
    )
    .expect("image");
    let path = file.to_str().expect("utf8");
    let mut args = vec!["firmware", "add", path, "--version", version];
    args.extend_from_slice(extra);
    let (code, _, err) = hub.cli(&args);
    assert_eq!(code, 0, "{err}");
}

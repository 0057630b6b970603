//! The README's First steps and Devices blocks, run as written by `bash -e` in a temporary
//! directory (a git repository holding the project's `.gitignore` and
//! `deploy/agent.toml`, the only files of the tree the blocks use), must succeed, get a
//! device sending readings and answering commands, and leave nothing git would pick up.
//!
//! What differs from a user's terminal, and why: the binaries are the debug builds
//! (`target/release` in the directory is a link to them, and `cargo` a stand-in whose
//! `build` runs the real cargo in the debug profile, where it has nothing left to build,
//! and reports which binaries the README's command builds), so that CI does not build
//! everything twice; and the hub and the
//! agent get free ports through the environment variables the README names
//! (`HUB_DEVICE__LISTEN`, `HUB_ADMIN__LISTEN`, `DEVICE_AGENT_HUB__URL`), so that the test
//! runs beside others. The first First steps block ends in `hub serve`, which runs until
//! stopped: it runs in the background, as in the user's first terminal.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e::docs::{sh_blocks, untracked};
use e2e::process::{bin_dir, binary, without_test_env};
use e2e::{pause, wait_for, TempDir};

/// Longest the blocks of a terminal may run.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(180);

/// Printed before each block of a terminal, to find its output.
const MARK: &str = "=== README block ";

/// The temporary directory: `work/` (where the blocks run), `logs/`, `shim/`.
struct Sandbox {
    root: TempDir,
    /// Process groups of the blocks, killed at the end with whatever they left running.
    groups: Vec<u32>,
}

impl Sandbox {
    fn new() -> Sandbox {
        // The binaries the blocks use, built if needed.
        for name in ["hub", "device-agent", "firmware-sim"] {
            binary(name);
        }
        let root = TempDir::new("readme");
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let work = root.path().join("work");
        std::fs::create_dir_all(work.join("deploy")).expect("work dir");
        std::fs::create_dir_all(root.path().join("logs")).expect("logs dir");
        std::fs::create_dir_all(work.join("target")).expect("target dir");
        for file in [".gitignore", "deploy/agent.toml"] {
            std::fs::copy(repo.join(file), work.join(file)).expect("copy from the tree");
        }
        std::os::unix::fs::symlink(bin_dir(), work.join("target/release")).expect("symlink");
        let shim = root.path().join("shim");
        std::fs::create_dir_all(&shim).expect("shim dir");
        std::fs::write(
            shim.join("cargo"),
            "#!/usr/bin/env bash\n\
             # Stands in for cargo in the README test. `cargo build ARGS` runs the real cargo\n\
             # with ARGS in the debug profile of the test's target directory (where the\n\
             # binaries are current, so it builds nothing) and writes the names of the\n\
             # binaries those ARGS build to $README_TEST_BUILT.\n\
             [ \"$1\" = build ] || { echo \"cargo (README test): only 'cargo build' is stood in for, not: cargo $*\" >&2; exit 2; }\n\
             args=()\n\
             for a in \"$@\"; do [ \"$a\" = --release ] || args+=(\"$a\"); done\n\
             \"$README_TEST_CARGO\" \"${args[@]}\" --manifest-path \"$README_TEST_MANIFEST\" \\\n\
               --target-dir \"$README_TEST_TARGET\" --message-format=json --quiet > \"$README_TEST_BUILT.json\"\n\
             grep -o '\"executable\":\"[^\"]*\"' \"$README_TEST_BUILT.json\" | sed 's|.*/||; s|\"$||' > \"$README_TEST_BUILT\"\n\
             echo \"cargo (README test): the debug binaries are current\"\n",
        )
        .expect("cargo shim");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(shim.join("cargo"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let sandbox = Sandbox {
            root,
            groups: Vec::new(),
        };
        sandbox.git(&["init", "-q"]);
        sandbox.git(&["add", "-A"]);
        sandbox
    }

    fn work(&self) -> PathBuf {
        self.root.path().join("work")
    }

    fn git(&self, args: &[&str]) -> String {
        let out = Command::new("git")
            .args(args)
            .current_dir(self.work())
            .output()
            .expect("git (./run-tests installs it)");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a script of README blocks under `bash -e`, in its own process group, with
    /// its output in `logs/NAME.out` and `.err`.
    fn start(&mut self, name: &str, block: &str, env: &[(&str, String)]) -> Child {
        let logs = self.root.path().join("logs");
        let file = |ext: &str| {
            std::fs::File::create(logs.join(format!("{name}.{ext}"))).expect("log file")
        };
        let path = format!(
            "{}:{}",
            self.root.path().join("shim").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new("bash");
        cmd.args(["-e", "-c", block])
            .current_dir(self.work())
            .env("PATH", path)
            .env("HUB_DEVICE__LISTEN", "127.0.0.1:0")
            .env("HUB_ADMIN__LISTEN", "127.0.0.1:0")
            .stdin(Stdio::null())
            .stdout(file("out"))
            .stderr(file("err"));
        for (key, _) in std::env::vars() {
            if key.starts_with("HUB_") || key.starts_with("DEVICE_AGENT_") {
                cmd.env_remove(key);
            }
        }
        cmd.env("HUB_DEVICE__LISTEN", "127.0.0.1:0")
            .env("HUB_ADMIN__LISTEN", "127.0.0.1:0");
        without_test_env(&mut cmd);
        let target = bin_dir().parent().expect("target dir").to_path_buf();
        cmd.env(
            "README_TEST_CARGO",
            std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()),
        )
        .env(
            "README_TEST_MANIFEST",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"),
        )
        .env("README_TEST_TARGET", target)
        .env("README_TEST_BUILT", logs.join("built"));
        for (key, value) in env {
            cmd.env(key, value);
        }
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().expect("bash");
        self.groups.push(child.id());
        child
    }

    /// Runs a script of README blocks to its end; returns its stdout.
    fn run(&mut self, name: &str, block: &str, env: &[(&str, String)]) -> String {
        let mut child = self.start(name, block, env);
        let started = Instant::now();
        let status = wait_for(BLOCK_TIMEOUT, &format!("block {name} to finish"), || {
            child.try_wait().expect("wait")
        });
        assert!(
            status.success(),
            "block {name} failed ({status}) after {:?}:\n{block}\n--- stdout\n{}\n--- stderr\n{}",
            started.elapsed(),
            self.log(name, "out"),
            self.log(name, "err")
        );
        self.log(name, "out")
    }

    /// `logs/NAME.EXT` (`logs/NAME` when `ext` is empty), or nothing.
    fn log(&self, name: &str, ext: &str) -> String {
        let file = if ext.is_empty() {
            name.to_string()
        } else {
            format!("{name}.{ext}")
        };
        std::fs::read_to_string(self.root.path().join("logs").join(file)).unwrap_or_default()
    }

    fn data(&self, file: &str) -> String {
        std::fs::read_to_string(self.work().join("hub-data").join(file))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    /// Readings the hub stored for `device`, through the admin API.
    fn readings(&self, device: &str) -> usize {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let url = format!(
            "{}/api/v1/devices/{device}/telemetry?since=1h",
            self.data("admin-url")
        );
        let Ok(mut resp) = agent
            .get(&url)
            .header(
                "Authorization",
                format!("Bearer {}", self.data("admin-token")),
            )
            .call()
        else {
            return 0;
        };
        let body = resp.body_mut().read_to_string().unwrap_or_default();
        let value: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        value["rows"].as_array().map_or(0, Vec::len)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for group in &self.groups {
            if let Some(pid) = i32::try_from(*group)
                .ok()
                .and_then(rustix::process::Pid::from_raw)
            {
                // Already gone when everything in it has exited.
                let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
            }
        }
    }
}

#[test]
fn the_readme_first_steps_and_devices_blocks_work_as_written() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let first_steps = sh_blocks(&readme, "First steps");
    let devices = sh_blocks(&readme, "Devices");
    assert_eq!(first_steps.len(), 2, "First steps: the hub, then the rest");
    assert_eq!(devices.len(), 2, "Devices: the agent, then the firmware");
    let mut sandbox = Sandbox::new();

    // The first terminal: build, PATH, `hub serve` (until the end of the test).
    let mut hub = sandbox.start("first-steps-1", &first_steps[0], &[]);
    // Up when it has said where devices connect (it writes hub-data/device-url first).
    let deadline = Instant::now() + Duration::from_secs(60);
    while !sandbox
        .log("first-steps-1", "out")
        .contains("hub: devices connect to")
    {
        let ended = hub.try_wait().expect("wait");
        assert!(
            ended.is_none() && Instant::now() < deadline,
            "the hub block ended ({ended:?}) or printed no banner in time:\n--- stdout\n{}\n--- stderr\n{}",
            sandbox.log("first-steps-1", "out"),
            sandbox.log("first-steps-1", "err")
        );
        pause(Duration::from_millis(20));
    }

    // One command built every binary the README uses.
    let built = sandbox.log("built", "");
    for name in ["hub", "device-agent", "firmware-sim"] {
        assert!(
            built.lines().any(|l| l == name),
            "the README's build command does not build {name}; it builds: {built}"
        );
    }

    // The second terminal, where the rest happens in order in one shell (so the PATH the
    // first of these blocks sets holds for the others, as in a user's terminal): a
    // simulated device, a command and its readings; then the agent (pointed at this hub)
    // and the firmware simulator's tools. A line between blocks marks where each begins.
    let blocks = [
        ("first-steps-2", &first_steps[1]),
        ("devices-1", &devices[0]),
        ("devices-2", &devices[1]),
    ];
    let session: String = blocks
        .iter()
        .map(|(name, block)| format!("echo '{MARK}{name}'\n{block}"))
        .collect();
    let url = sandbox.data("device-url");
    let out = sandbox.run(
        "second-terminal",
        &session,
        &[("DEVICE_AGENT_HUB__URL", url)],
    );
    let part = |name: &str| -> String {
        let start = out
            .find(&format!("{MARK}{name}\n"))
            .unwrap_or_else(|| panic!("block {name} did not run:\n{out}"));
        let rest = &out[start + MARK.len() + name.len() + 1..];
        rest[..rest.find(MARK).unwrap_or(rest.len())].to_string()
    };
    let first = part("first-steps-2");
    assert!(first.contains("sensor-1 is online"), "{first}");
    assert!(first.contains("led on"), "the device's answer:\n{first}");
    assert!(
        first
            .lines()
            .any(|l| l.starts_with("sensor-1 ") && l.contains(" online ")),
        "hub devices:\n{first}"
    );
    let agent = part("devices-1");
    assert!(agent.contains("pi-1 is online"), "{agent}");
    assert!(
        agent.contains("Filesystem") && agent.contains("Mounted on"),
        "df's output from the disk-free action:\n{agent}"
    );
    let firmware = part("devices-2");
    assert!(
        firmware.contains("device      sensor-1"),
        "inspect:\n{firmware}"
    );
    assert!(
        firmware.contains("devices            100 (ever connected 100)"),
        "the fleet's summary:\n{firmware}"
    );
    for device in ["sensor-1", "pi-1"] {
        wait_for(
            Duration::from_secs(20),
            &format!("{device}'s readings"),
            || (sandbox.readings(device) > 0).then_some(()),
        );
    }

    // Nothing the steps left behind would be committed by accident.
    let untracked = untracked(&sandbox.work());
    assert!(
        untracked.is_empty(),
        "files the README's steps leave that git does not ignore: {untracked:?}"
    );
    // And they did leave the files the .gitignore is there for.
    for file in [
        "sensor-1.token",
        "sensor-1.img",
        "agent.token",
        "agent-data",
    ] {
        assert!(sandbox.work().join(file).exists(), "{file} missing");
    }
    let _ = hub.kill();
    let _ = hub.wait();
}

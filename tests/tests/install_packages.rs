//! `tests/install-packages` (what `./run-tests` installs the test servers with) starts no
//! service and leaves none enabled at boot, on a stand-in Debian: fake `apt-get`, `dpkg`,
//! `dpkg-query`, `systemctl` and `update-rc.d` that act like the real ones where it
//! matters. Like Debian's maintainer scripts, the fake `apt-get` enables a package's units
//! on installation and starts them unless `policy-rc.d` forbids it.

use std::path::{Path, PathBuf};
use std::process::Command;

use e2e::TempDir;

fn executable(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// The stand-in Debian: the fake tools, and files that hold its state.
struct FakeDebian {
    dir: TempDir,
}

/// Packages with services in the stand-in repository: (package, unit, init script).
const WITH_SERVICES: &[(&str, &str, &str)] = &[
    ("redis-server", "redis-server.service", "redis-server"),
    ("nginx", "nginx.service", "nginx"),
];

impl FakeDebian {
    fn new(installed: &[&str], enabled: &[&str]) -> FakeDebian {
        let dir = TempDir::new("install-packages");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).expect("bin dir");
        let state = dir.path();
        let write = |name: &str, body: &str| {
            let path = bin.join(name);
            std::fs::write(
                &path,
                format!(
                    "#!/usr/bin/env bash\nset -eu\nS={}\n{body}",
                    state.display()
                ),
            )
            .expect("write fake");
            executable(&path);
        };
        let services: String = WITH_SERVICES
            .iter()
            .map(|(p, u, s)| format!("{p}) echo /lib/systemd/system/{u}; echo /etc/init.d/{s};;\n"))
            .collect();
        write("id", "echo 0\n");
        write(
            "dpkg-query",
            "while read -r p; do echo \"installed $p\"; done < \"$S/installed\"\n",
        );
        write(
            "dpkg",
            &format!(
                "[ \"$1\" = -L ] || exit 2\ncase \"$2\" in\n{services}*) echo /usr/share/doc/$2;;\nesac\n"
            ),
        );
        // Installs each package and a dependency, enables its units, and starts them
        // unless the policy says no (exit status 101), as invoke-rc.d does.
        write(
            "apt-get",
            "echo \"apt-get $*\" >> \"$S/log\"\n\
             [ \"$1\" = install ] || exit 0\n\
             shift\n\
             for p in \"$@\"; do\n\
               case \"$p\" in -*) continue;; esac\n\
               echo \"$p\" >> \"$S/installed\"; echo \"lib$p-dep\" >> \"$S/installed\"\n\
               for f in $(dpkg -L \"$p\"); do\n\
                 case \"$f\" in /lib/systemd/system/*) echo \"$(basename \"$f\")\" >> \"$S/enabled\";; esac\n\
               done\n\
               policy=\"${INSTALL_PACKAGES_POLICY_RC_D:-/usr/sbin/policy-rc.d}\"\n\
               code=0; [ -x \"$policy\" ] && { \"$policy\" \"$p\" start || code=$?; }\n\
               if [ \"$code\" = 101 ]; then echo \"$p\" >> \"$S/not-started\"; else echo \"$p\" >> \"$S/started\"; fi\n\
             done\n",
        );
        write(
            "systemctl",
            "echo \"systemctl $*\" >> \"$S/log\"\n\
             [ \"$1\" = disable ] || exit 0\n\
             unit=\"${@: -1}\"\n\
             grep -vx \"$unit\" \"$S/enabled\" > \"$S/enabled.new\" || true\n\
             mv \"$S/enabled.new\" \"$S/enabled\"\n",
        );
        write("update-rc.d", "echo \"update-rc.d $*\" >> \"$S/log\"\n");
        let lines = |items: &[&str]| items.iter().map(|i| format!("{i}\n")).collect::<String>();
        std::fs::write(state.join("installed"), lines(installed)).expect("installed");
        std::fs::write(state.join("enabled"), lines(enabled)).expect("enabled");
        for file in ["log", "started", "not-started"] {
            std::fs::write(state.join(file), "").expect("state file");
        }
        FakeDebian { dir }
    }

    fn policy(&self) -> PathBuf {
        self.dir.path().join("policy-rc.d")
    }

    /// Runs the script on the stand-in; returns its stdout.
    fn install(&self, packages: &[&str]) -> String {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("install-packages");
        let path = format!(
            "{}:{}",
            self.dir.path().join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = Command::new(script)
            .args(packages)
            .env("PATH", path)
            .env("INSTALL_PACKAGES_POLICY_RC_D", self.policy())
            .output()
            .expect("run install-packages");
        assert!(
            out.status.success(),
            "install-packages failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn lines(&self, file: &str) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join(file))
            .expect("state file")
            .lines()
            .map(str::to_string)
            .collect()
    }
}

#[test]
fn installed_servers_are_neither_started_nor_enabled_and_the_rest_is_untouched() {
    // nginx was there before, enabled by its owner: it stays so.
    let debian = FakeDebian::new(&["nginx", "bash"], &["nginx.service"]);
    let out = debian.install(&["redis-server", "python3"]);
    assert_eq!(debian.lines("started"), Vec::<String>::new());
    assert_eq!(debian.lines("not-started"), ["redis-server", "python3"]);
    assert_eq!(debian.lines("enabled"), ["nginx.service"]);
    let log = debian.lines("log").join("\n");
    assert!(
        log.contains("systemctl disable --quiet redis-server.service"),
        "{log}"
    );
    assert!(log.contains("update-rc.d redis-server disable"), "{log}");
    assert!(
        !log.contains("nginx"),
        "nginx was not ours to touch:\n{log}"
    );
    assert!(out.contains("installed redis-server"), "{out}");
    // The policy was only there while installing.
    assert!(!debian.policy().exists());
}

#[test]
fn a_policy_the_machine_already_had_is_put_back() {
    let debian = FakeDebian::new(&[], &[]);
    let own = "#!/bin/sh\n# the machine's own\nexit 0\n";
    std::fs::write(debian.policy(), own).expect("policy");
    executable(&debian.policy());
    debian.install(&["nginx"]);
    // Forbidden while installing, whatever the machine's policy says...
    assert_eq!(debian.lines("not-started"), ["nginx"]);
    assert_eq!(debian.lines("enabled"), Vec::<String>::new());
    // ...and the machine's policy back afterwards.
    assert_eq!(
        std::fs::read_to_string(debian.policy()).expect("policy"),
        own
    );
}

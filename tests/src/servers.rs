//! Real servers for the tests, from Debian's packages, on ephemeral loopback ports:
//! Redis (the cluster backplane), VictoriaMetrics (it accepts InfluxDB's v2 write API) and
//! nginx (a wss load balancer). Each is installed when missing, by `install-packages`,
//! which starts no service and enables none at boot. Also a TCP proxy that can be paused,
//! to cut one process off from a server.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::process::TempDir;
use crate::wait_for;

/// Installs the Debian package that provides `binary` when it is missing (with
/// `tests/install-packages`, as `./run-tests` does).
pub fn ensure_installed(binary: &str, package: &str) -> PathBuf {
    let find = || {
        ["/usr/bin", "/usr/sbin", "/usr/local/bin"]
            .iter()
            .map(|d| PathBuf::from(d).join(binary))
            .find(|p| p.exists())
    };
    if let Some(p) = find() {
        return p;
    }
    // One installer at a time: concurrent tests may all want the same package.
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open("/tmp/e2e-apt.lock")
        .expect("lock file");
    let _guard = FileLock::new(lock);
    if let Some(p) = find() {
        return p;
    }
    // The script that ./run-tests uses: it starts no service and enables none at boot.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/install-packages");
    let status = Command::new(script)
        .arg(package)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(status.success(), "{script} {package} failed");
    find().unwrap_or_else(|| panic!("{package} installed but {binary} not found"))
}

/// An exclusive flock(1)-free lock: holds a lock file open with a sidecar directory.
struct FileLock {
    dir: PathBuf,
}

impl FileLock {
    fn new(_file: std::fs::File) -> FileLock {
        let dir = PathBuf::from("/tmp/e2e-apt.lock.d");
        wait_for(Duration::from_secs(600), "the apt lock", || {
            std::fs::create_dir(&dir).ok()
        });
        FileLock { dir }
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// A free loopback port (bound and released; the server binds it next).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// A server process, killed on drop.
#[derive(Debug)]
pub struct Server {
    child: Option<Child>,
    /// Its port.
    pub port: u16,
    /// Its working directory.
    pub dir: TempDir,
    /// How it was started (program and arguments), to start it again.
    program: PathBuf,
    args: Vec<OsString>,
    what: &'static str,
}

impl Server {
    /// Stops it the way a service manager does (SIGTERM, so that it saves what it must),
    /// waits for it to exit, and returns how long that took.
    pub fn stop(&mut self) -> Duration {
        let started = std::time::Instant::now();
        if let Some(mut child) = self.child.take() {
            crate::process::signal_pid(child.id(), "TERM");
            wait_for(Duration::from_secs(30), "the server to exit", || {
                child.try_wait().ok().flatten()
            });
        }
        started.elapsed()
    }

    /// Starts it again, as before, on the same port and directory (after [`Server::stop`]).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "{} is still running", self.what);
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        self.child = Some(launch(cmd, self.port, &self.dir, self.what));
    }

    /// Kills it and every process it started (SIGKILL to its process group: nginx's
    /// workers would otherwise outlive their master).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Through the system call, not the kill(1) program, whose parsing of a negative
            // pid once turned "this group" into "every process".
            if let Some(pgid) = i32::try_from(c.id())
                .ok()
                .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn spawn(cmd: Command, port: u16, dir: TempDir, what: &'static str) -> Server {
    let program = PathBuf::from(cmd.get_program());
    let args: Vec<OsString> = cmd.get_args().map(|a| a.to_os_string()).collect();
    let child = launch(cmd, port, &dir, what);
    Server {
        child: Some(child),
        port,
        dir,
        program,
        args,
        what,
    }
}

/// Starts `cmd` (logging to DIR/server.log) and waits until it listens on `port`.
fn launch(mut cmd: Command, port: u16, dir: &TempDir, what: &str) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.path().join("server.log"))
        .expect("log");
    // Its own process group, so that `kill` can take its children along.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd.stdout(Stdio::null()).stderr(log);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    wait_for(Duration::from_secs(30), what, || {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
            panic!("{what} exited with {status}: {log}");
        }
        port_open(port).then_some(())
    });
    child
}

/// Starts `redis-server` on a free port, without persistence.
pub fn redis() -> Server {
    redis_with(false)
}

/// Starts `redis-server` on a free port that keeps its data across a restart
/// ([`Server::stop`], [`Server::start_again`]): an append-only file, synced on every
/// write, as a deployment that holds the command ledger should run it.
pub fn redis_persistent() -> Server {
    redis_with(true)
}

fn redis_with(persistent: bool) -> Server {
    let bin = ensure_installed("redis-server", "redis-server");
    let dir = TempDir::new("redis");
    let port = free_port();
    let mut cmd = Command::new(bin);
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
    ]);
    if persistent {
        cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
    } else {
        cmd.args(["--appendonly", "no"]);
    }
    cmd.arg("--dir").arg(dir.path());
    spawn(cmd, port, dir, "redis-server")
}

/// Starts VictoriaMetrics on a free port (its InfluxDB write endpoint is
/// `http://127.0.0.1:PORT/api/v2/write`).
pub fn victoria_metrics() -> Server {
    let bin = ensure_installed("victoria-metrics", "victoria-metrics");
    let dir = TempDir::new("vm");
    let port = free_port();
    let mut cmd = Command::new(bin);
    cmd.arg(format!("-httpListenAddr=127.0.0.1:{port}"))
        .arg(format!(
            "-storageDataPath={}",
            dir.path().join("data").display()
        ))
        .arg("-search.latencyOffset=0s")
        // Store like InfluxDB: a point re-written with the same series and time replaces
        // itself instead of counting twice.
        .arg("-dedup.minScrapeInterval=1ms")
        .arg("-search.disableCache");
    spawn(cmd, port, dir, "victoria-metrics")
}

/// Starts nginx as a wss load balancer on a free loopback port: it terminates TLS with
/// `cert`/`key` and proxies the WebSocket upgrade to `upstreams` (host:port of hubs
/// serving plain ws), the way `deploy/nginx/hub.conf` does: no stickiness, and a hub that
/// refuses with 503 (full, or handing devices over) passes the device to the next one.
pub fn nginx_wss(upstreams: &[String], cert: &std::path::Path, key: &std::path::Path) -> Server {
    let bin = ensure_installed("nginx", "nginx");
    let dir = TempDir::new("nginx");
    let port = free_port();
    let servers: String = upstreams
        .iter()
        .map(|u| format!("        server {u} max_fails=0;\n"))
        .collect();
    let d = dir.path().display();
    let conf = format!(
        "daemon off;\nuser root;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n    access_log off;\n    client_body_temp_path {d}/body;\n    proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n    uwsgi_temp_path {d}/uwsgi;\n    scgi_temp_path {d}/scgi;\n\
         map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}\n\
         upstream hubs {{\n{servers}    }}\n\
         server {{\n        listen 127.0.0.1:{port} ssl;\n        ssl_certificate {cert};\n        ssl_certificate_key {key};\n\
         location /v1/device {{\n            proxy_pass http://hubs;\n            proxy_http_version 1.1;\n\
         proxy_set_header Upgrade $http_upgrade;\n            proxy_set_header Connection $connection_upgrade;\n\
         proxy_set_header Host $host;\n            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
         proxy_next_upstream error timeout http_503;\n            proxy_connect_timeout 2s;\n\
         proxy_read_timeout 120s;\n            proxy_send_timeout 120s;\n        }}\n    }}\n}}\n",
        cert = cert.display(),
        key = key.display(),
    );
    let path = dir.path().join("nginx.conf");
    std::fs::write(&path, conf).expect("nginx.conf");
    let mut cmd = Command::new(bin);
    cmd.arg("-c").arg(&path).arg("-p").arg(dir.path());
    spawn(cmd, port, dir, "nginx")
}

/// A TCP proxy on a free loopback port in front of `127.0.0.1:upstream`, which can be
/// paused to cut its clients off the way a network partition does: while paused, nothing
/// passes in either direction on any connection, old or new (new ones are accepted and
/// then hang); on resume, what was held back is delivered, as TCP delivers it once a
/// partition heals. Stopped on drop.
#[derive(Debug)]
pub struct TcpProxy {
    /// Where clients connect.
    pub port: u16,
    shared: Arc<ProxyShared>,
    accept: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct ProxyShared {
    paused: Mutex<bool>,
    resumed: Condvar,
    stop: AtomicBool,
    /// Every socket, to shut them down on drop.
    sockets: Mutex<Vec<TcpStream>>,
}

impl ProxyShared {
    /// Blocks while paused; false once the proxy stops.
    fn wait_open(&self) -> bool {
        let mut paused = self.paused.lock().expect("proxy lock");
        while *paused && !self.stop.load(Ordering::Relaxed) {
            paused = self
                .resumed
                .wait_timeout(paused, Duration::from_millis(50))
                .expect("proxy lock")
                .0;
        }
        !self.stop.load(Ordering::Relaxed)
    }
}

impl TcpProxy {
    /// Starts forwarding to `127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> TcpProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let port = listener.local_addr().expect("proxy addr").port();
        listener.set_nonblocking(true).expect("nonblocking");
        let shared = Arc::new(ProxyShared::default());
        let accept = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                while !shared.stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => connect_pair(client, upstream, &shared),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        TcpProxy {
            port,
            shared,
            accept: Some(accept),
        }
    }

    /// Cuts every client off (old and new connections) until [`TcpProxy::resume`].
    pub fn pause(&self) {
        *self.shared.paused.lock().expect("proxy lock") = true;
    }

    /// Closes every connection made so far, as a restarted proxy or a dropped NAT mapping
    /// does; new connections are accepted as before.
    pub fn cut(&self) {
        if let Ok(mut all) = self.shared.sockets.lock() {
            for s in all.drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    /// Lets traffic through again, starting with what was held back.
    pub fn resume(&self) {
        *self.shared.paused.lock().expect("proxy lock") = false;
        self.shared.resumed.notify_all();
    }
}

/// Connects a new client to the upstream and copies both ways on two threads.
fn connect_pair(client: TcpStream, upstream: u16, shared: &Arc<ProxyShared>) {
    let _ = client.set_nonblocking(false);
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    if let Ok(mut all) = shared.sockets.lock() {
        for s in [&client, &server] {
            if let Ok(s) = s.try_clone() {
                all.push(s);
            }
        }
    }
    for (from, to) in [(client, s2), (server, c2)] {
        let shared = shared.clone();
        std::thread::spawn(move || copy_while_open(from, to, &shared));
    }
}

/// Copies `from` to `to`, holding each chunk back while the proxy is paused.
fn copy_while_open(mut from: TcpStream, mut to: TcpStream, shared: &ProxyShared) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !shared.wait_open() || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.resumed.notify_all();
        if let Ok(all) = self.shared.sockets.lock() {
            for s in all.iter() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

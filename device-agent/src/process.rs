//! Running a program for a sensor or an action: never through a shell, with a clean
//! environment, a timeout that kills the program's whole process group, and a cap on how
//! much of its output is kept.
//!
//! The program gets its arguments as separate `argv` entries (`execve`), so characters
//! such as `$`, `;`, `|`, `` ` `` or spaces in an argument are just characters. Its
//! environment is emptied and rebuilt from [`DEFAULT_PATH`], `LANG=C.UTF-8` and what the
//! configuration sets, so the agent's own secrets (a token passed as
//! `DEVICE_AGENT_HUB__TOKEN`, say) never reach it. Its standard input is `/dev/null`.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::time::Instant;

/// `PATH` for programs the agent runs (they are configured by absolute path; this is for
/// what they run in turn).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// After the program exits, how long to keep reading output that a child it left behind
/// may still be writing into the inherited pipes.
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(250);

/// What to run.
#[derive(Debug, Clone)]
pub struct Spec<'a> {
    /// Absolute path of the program.
    pub program: &'a Path,
    /// Its arguments, one `argv` entry each.
    pub args: &'a [String],
    /// Extra environment variables.
    pub env: &'a [(String, String)],
    /// Working directory (default: the agent's).
    pub cwd: Option<&'a Path>,
    /// The program and everything it started are killed after this long.
    pub timeout: Duration,
    /// Most bytes kept of stdout and of stderr (each); the rest is read and discarded so
    /// the program never blocks on a full pipe.
    pub max_output: usize,
}

/// How the program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this status.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
    /// It ran past the timeout and was killed.
    TimedOut,
}

impl Exit {
    /// Shell-style status: the exit code, 128 + signal, or 124 for a timeout (as
    /// `timeout(1)` reports it).
    pub fn code(self) -> i32 {
        match self {
            Exit::Code(c) => c,
            Exit::Signal(s) => 128 + s,
            Exit::TimedOut => 124,
        }
    }

    /// Whether it exited with status 0.
    pub fn success(self) -> bool {
        self == Exit::Code(0)
    }
}

/// What the program did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// How it ended.
    pub exit: Exit,
    /// The first `max_output` bytes of its stdout.
    pub stdout: Vec<u8>,
    /// The first `max_output` bytes of its stderr.
    pub stderr: Vec<u8>,
    /// Whether either stream had more than was kept.
    pub truncated: bool,
    /// How long it ran.
    pub elapsed: Duration,
}

/// The program could not be started.
#[derive(Debug, thiserror::Error)]
#[error("cannot run {program}: {source}")]
pub struct SpawnError {
    /// The program.
    pub program: String,
    /// The OS error (not found, permission denied...).
    #[source]
    pub source: std::io::Error,
}

impl SpawnError {
    /// Shell-style status: 127 for "not found", 126 otherwise.
    pub fn code(&self) -> i32 {
        if self.source.kind() == std::io::ErrorKind::NotFound {
            127
        } else {
            126
        }
    }
}

/// Bounded capture of one output stream.
struct Capture {
    data: Vec<u8>,
    max: usize,
    truncated: bool,
}

impl Capture {
    fn new(max: usize) -> Capture {
        Capture {
            data: Vec::new(),
            max,
            truncated: false,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let room = self.max.saturating_sub(self.data.len());
        if bytes.len() > room {
            self.truncated = true;
        }
        self.data.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

async fn read_some<R: AsyncRead + Unpin>(
    stream: &mut Option<R>,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    match stream {
        Some(s) => s.read(buf).await,
        None => std::future::pending().await,
    }
}

/// Runs the program to completion or timeout.
///
/// # Errors
/// The program could not be started.
///
/// Cancel safety: safe; the child is killed when the future is dropped (`kill_on_drop`).
pub async fn run(spec: &Spec<'_>) -> Result<Outcome, SpawnError> {
    let started = Instant::now();
    let deadline = started + spec.timeout;
    let mut cmd = tokio::process::Command::new(spec.program);
    cmd.args(spec.args)
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("LANG", "C.UTF-8")
        .envs(spec.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so that a timeout kills what it started too.
        .process_group(0)
        // If the agent stops while this runs, do not leave the program behind.
        .kill_on_drop(true);
    if let Some(dir) = spec.cwd {
        cmd.current_dir(dir);
    }
    let mut child = cmd.spawn().map_err(|source| SpawnError {
        program: spec.program.display().to_string(),
        source,
    })?;
    let pid = child.id();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut out = Capture::new(spec.max_output);
    let mut err = Capture::new(spec.max_output);
    let mut out_buf = [0u8; 4096];
    let mut err_buf = [0u8; 4096];
    let mut status = None;
    let mut wake = deadline;
    loop {
        if status.is_some() && stdout.is_none() && stderr.is_none() {
            break;
        }
        tokio::select! {
            r = read_some(&mut stdout, &mut out_buf) => match r {
                Ok(0) | Err(_) => stdout = None,
                Ok(n) => out.push(&out_buf[..n]),
            },
            r = read_some(&mut stderr, &mut err_buf) => match r {
                Ok(0) | Err(_) => stderr = None,
                Ok(n) => err.push(&err_buf[..n]),
            },
            s = child.wait(), if status.is_none() => {
                status = Some(s);
                wake = (Instant::now() + DRAIN_AFTER_EXIT).min(deadline);
            }
            () = tokio::time::sleep_until(wake) => break,
        }
    }
    let exit = match status {
        Some(Ok(s)) => match (s.code(), s.signal()) {
            (Some(code), _) => Exit::Code(code),
            (None, Some(sig)) => Exit::Signal(sig),
            (None, None) => Exit::Code(-1),
        },
        Some(Err(_)) => Exit::Code(-1),
        None => {
            kill_group(pid);
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
            Exit::TimedOut
        }
    };
    Ok(Outcome {
        exit,
        truncated: out.truncated || err.truncated,
        stdout: out.data,
        stderr: err.data,
        elapsed: started.elapsed(),
    })
}

/// SIGKILL to the program's process group (it is the group leader, see `process_group`).
fn kill_group(pid: Option<u32>) {
    let Some(pid) = pid
        .and_then(|p| i32::try_from(p).ok())
        .and_then(rustix::process::Pid::from_raw)
    else {
        return;
    };
    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
}

/// Cuts `text` to at most `max` bytes at a character boundary.
pub fn cut(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn sh() -> PathBuf {
        PathBuf::from("/bin/sh")
    }

    #[tokio::test]
    async fn arguments_are_not_interpreted_by_a_shell() {
        let dir = tempfile::tempdir().expect("temp dir");
        let marker = dir.path().join("marker");
        let arg = format!(
            "$(touch {}); `touch {}` | ; && *",
            marker.display(),
            marker.display()
        );
        let args = vec![arg.clone()];
        let out = run(&Spec {
            program: Path::new("/bin/echo"),
            args: &args,
            env: &[],
            cwd: None,
            timeout: Duration::from_secs(5),
            max_output: 4096,
        })
        .await
        .expect("run");
        assert_eq!(out.exit, Exit::Code(0));
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{arg}\n"));
        assert!(!marker.exists());
    }

    #[tokio::test]
    async fn the_environment_is_clean() {
        std::env::set_var("DEVICE_AGENT_TEST_SECRET", "s3cret");
        let args = vec!["-c".to_string(), "env".to_string()];
        let env = vec![("EXTRA".to_string(), "1".to_string())];
        let out = run(&Spec {
            program: &sh(),
            args: &args,
            env: &env,
            cwd: None,
            timeout: Duration::from_secs(5),
            max_output: 4096,
        })
        .await
        .expect("run");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("s3cret"), "{text}");
        assert!(text.contains("EXTRA=1"), "{text}");
        assert!(text.contains("PATH=/usr/local/sbin"), "{text}");
    }

    #[tokio::test]
    async fn a_timeout_kills_the_process_group() {
        let args = vec![
            "-c".to_string(),
            // A child of the program holds the pipes open; both must die.
            "sleep 30 & echo started; wait".to_string(),
        ];
        let out = run(&Spec {
            program: &sh(),
            args: &args,
            env: &[],
            cwd: None,
            timeout: Duration::from_millis(300),
            max_output: 4096,
        })
        .await
        .expect("run");
        assert_eq!(out.exit, Exit::TimedOut);
        assert_eq!(out.exit.code(), 124);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "started\n");
        assert!(out.elapsed < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn output_is_capped_and_the_program_is_not_blocked() {
        let args = vec![
            "-c".to_string(),
            // 1 MiB on stdout (more than a pipe holds), then a status.
            "head -c 1048576 /dev/zero; echo oops >&2; exit 3".to_string(),
        ];
        let out = run(&Spec {
            program: &sh(),
            args: &args,
            env: &[],
            cwd: None,
            timeout: Duration::from_secs(10),
            max_output: 100,
        })
        .await
        .expect("run");
        assert_eq!(out.exit, Exit::Code(3));
        assert_eq!(out.stdout.len(), 100);
        assert_eq!(out.stderr, b"oops\n");
        assert!(out.truncated);
    }

    #[tokio::test]
    async fn missing_programs_are_reported() {
        let err = run(&Spec {
            program: Path::new("/nonexistent/program"),
            args: &[],
            env: &[],
            cwd: None,
            timeout: Duration::from_secs(1),
            max_output: 10,
        })
        .await
        .expect_err("spawn fails");
        assert_eq!(err.code(), 127);
    }

    #[test]
    fn cut_keeps_char_boundaries() {
        assert_eq!(cut("aé€", 4), "aé");
        assert_eq!(cut("abc", 10), "abc");
    }
}

//! Tests of the write path against a fake InfluxDB: one write per group, duplicates
//! dropped, spooling when InfluxDB is unavailable or silent, draining in order, refusals
//! that say what to fix, marks raised after a restart.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use schemas::message::truncated;
use schemas::Reading;

use super::fake_influx::{cfg, closed_url, FakeInflux};
use super::{lock, InfluxTelemetry};
use crate::store::{Batch, Outcome, SeqStore, StoreError, TelemetryStore};

const T: Duration = Duration::from_secs(15);

/// High-water marks in memory, shared with the test.
#[derive(Clone, Default)]
struct MemSeq(Arc<Mutex<HashMap<String, u64>>>);

impl MemSeq {
    fn mark(&self, device: &str) -> u64 {
        lock(&self.0).get(device).copied().unwrap_or(0)
    }
}

impl SeqStore for MemSeq {
    fn get(&mut self, device: &str) -> Result<u64, StoreError> {
        Ok(self.mark(device))
    }
    fn raise(&mut self, marks: &[(Arc<str>, u64)]) -> Result<(), StoreError> {
        let mut m = lock(&self.0);
        for (device, seq) in marks {
            let e = m.entry(device.to_string()).or_insert(0);
            *e = (*e).max(*seq);
        }
        Ok(())
    }
}

/// A path in a fresh temporary directory, which is removed when this is dropped. The path
/// itself does not exist yet: the code under test creates it. The `TempDir` is held only
/// for its drop.
struct Dir(PathBuf, #[allow(dead_code)] tempfile::TempDir);
impl Dir {
    fn new(label: &str) -> Dir {
        let temp = tempfile::Builder::new()
            .prefix(&format!("hub-influx-{label}-"))
            .tempdir()
            .expect("temp dir");
        Dir(temp.path().join("dir"), temp)
    }
}

const BASE_MS: u64 = 1_764_057_600_000; // 2025-11-25T08:00:00Z

fn batch(device: &str, seq: u64, n: u64) -> Batch {
    Batch {
        device: Arc::from(device),
        seq,
        readings: (0..n)
            .map(|i| Reading {
                metric: truncated(&format!("m{}", i % 2)),
                ts: BASE_MS + seq * 10 + i,
                value: (seq * 100 + i) as f64,
            })
            .collect(),
    }
}

/// The line protocol a batch becomes.
fn lines_of(batches: &[Batch]) -> String {
    batches
        .iter()
        .flat_map(|b| {
            b.readings.iter().map(move |r| {
                format!(
                    "telemetry,device={},metric={} value={:?} {}\n",
                    b.device, r.metric, r.value, r.ts
                )
            })
        })
        .collect()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + T;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_group_is_one_write_and_duplicates_are_dropped() {
    let server = FakeInflux::start(|_, _| (204, String::new()));
    let seq = MemSeq::default();
    let dir = Dir::new("direct");
    let mut store =
        InfluxTelemetry::open(&cfg(&server.url()), &dir.0, Box::new(seq.clone())).expect("open");
    let group = [
        batch("a", 1, 3),
        batch("a", 2, 1),
        batch("a", 2, 1),
        batch("b", 1, 2),
    ];
    let out = store.commit(&group).expect("commit");
    assert_eq!(
        out,
        [
            Outcome::Stored,
            Outcome::Stored,
            Outcome::Duplicate,
            Outcome::Stored
        ]
    );
    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    let (req, _) = &requests[0];
    assert_eq!(req.method, "POST");
    assert_eq!(
        req.target,
        "/api/v2/write?bucket=fleet&org=acme&precision=ms"
    );
    assert_eq!(req.header("authorization"), Some("Token s3cret"));
    assert_eq!(
        req.text(),
        lines_of(&[group[0].clone(), group[1].clone(), group[3].clone()])
    );
    assert_eq!((seq.mark("a"), seq.mark("b")), (2, 1));
    assert_eq!(store.last_seq("a").expect("seq"), 2);
    // A re-sent batch is acknowledged without a write.
    assert_eq!(
        store.commit(&[batch("a", 2, 1)]).expect("commit"),
        [Outcome::Duplicate]
    );
    assert_eq!(server.requests().len(), 1);
    assert_eq!(store.spooled(), (0, 0));
}

#[test]
fn an_unavailable_influxdb_is_spooled_and_drained_in_order() {
    // The direct write and the drain's first retry get 503, then InfluxDB is back.
    let server = FakeInflux::start(|n, _| {
        if n < 2 {
            (503, r#"{"code":"unavailable","message":"too busy"}"#.into())
        } else {
            (204, String::new())
        }
    });
    let seq = MemSeq::default();
    let dir = Dir::new("drain");
    let mut store =
        InfluxTelemetry::open(&cfg(&server.url()), &dir.0, Box::new(seq.clone())).expect("open");
    let first = [batch("a", 1, 4), batch("b", 7, 2)];
    assert_eq!(
        store.commit(&first).expect("commit"),
        [Outcome::Stored, Outcome::Stored]
    );
    // Acknowledged from the spool: the marks are up already.
    assert_eq!(store.last_seq("b").expect("seq"), 7);
    assert_eq!(store.spooled().0, 1);
    // InfluxDB may be back, but older data waits in the spool: this goes behind it.
    let second = [batch("a", 2, 3)];
    store.commit(&second).expect("commit");
    assert_eq!(seq.mark("a"), 2);
    wait_until("the spool to drain", || store.spooled() == (0, 0));
    let requests = server.requests();
    let accepted: String = requests
        .iter()
        .filter(|(_, s)| *s == 204)
        .map(|(r, _)| r.text())
        .collect();
    assert_eq!(
        accepted,
        format!("{}{}", lines_of(&first), lines_of(&second))
    );
    assert!(requests
        .iter()
        .all(|(r, _)| r.target.starts_with("/api/v2/write?")));
    // Drained: the next group is written directly.
    let before = requests.len();
    store.commit(&[batch("a", 3, 1)]).expect("commit");
    let requests = server.requests();
    assert_eq!(requests.len(), before + 1);
    assert_eq!(requests[before].0.text(), lines_of(&[batch("a", 3, 1)]));
}

#[test]
fn an_unreachable_influxdb_is_spooled_and_a_full_spool_refuses() {
    let seq = MemSeq::default();
    let dir = Dir::new("full");
    let mut config = cfg(&closed_url());
    // Room for one small group, not two.
    config.spool_max_bytes = 150;
    let mut store = InfluxTelemetry::open(&config, &dir.0, Box::new(seq.clone())).expect("open");
    assert_eq!(
        store.commit(&[batch("a", 1, 1)]).expect("spooled"),
        [Outcome::Stored]
    );
    assert_eq!(seq.mark("a"), 1);
    let err = store.commit(&[batch("a", 2, 1)]).expect_err("full");
    assert!(err.to_string().contains("full"), "{err}");
    // Refused means not acknowledged: the mark stays, the device keeps the batch.
    assert_eq!(seq.mark("a"), 1);
    assert_eq!(store.spooled().0, 1);
}

#[test]
fn a_refused_write_is_an_error_that_says_what_to_fix() {
    let server = FakeInflux::start(|_, _| {
        (
            401,
            r#"{"code":"unauthorized","message":"unauthorized access"}"#.into(),
        )
    });
    let seq = MemSeq::default();
    let dir = Dir::new("refused");
    let mut store =
        InfluxTelemetry::open(&cfg(&server.url()), &dir.0, Box::new(seq.clone())).expect("open");
    let err = store
        .commit(&[batch("a", 1, 1)])
        .expect_err("refused")
        .to_string();
    assert!(
        err.contains("401")
            && err.contains("unauthorized access")
            && err.contains("storage.influxdb.token"),
        "{err}"
    );
    assert_eq!(store.spooled(), (0, 0));
    assert_eq!(seq.mark("a"), 0);
}

#[test]
fn a_partial_write_is_accepted() {
    let server = FakeInflux::start(|_, _| {
        (422, r#"{"code":"unprocessable entity","message":"failure writing points to database: partial write: points beyond retention policy dropped=1"}"#.into())
    });
    let seq = MemSeq::default();
    let dir = Dir::new("partial");
    let mut store =
        InfluxTelemetry::open(&cfg(&server.url()), &dir.0, Box::new(seq.clone())).expect("open");
    assert_eq!(
        store.commit(&[batch("a", 1, 2)]).expect("commit"),
        [Outcome::Stored]
    );
    assert_eq!(seq.mark("a"), 1);
    assert_eq!(store.spooled(), (0, 0));
}

#[test]
fn a_restart_raises_the_marks_of_spooled_data_and_drains_it() {
    let dir = Dir::new("restart");
    let first = [batch("a", 5, 2), batch("b", 3, 1)];
    {
        let mut store =
            InfluxTelemetry::open(&cfg(&closed_url()), &dir.0, Box::new(MemSeq::default()))
                .expect("open");
        store.commit(&first).expect("spooled");
    }
    // As if the hub died after spooling but before raising the marks.
    let server = FakeInflux::start(|_, _| (204, String::new()));
    let seq = MemSeq::default();
    let store =
        InfluxTelemetry::open(&cfg(&server.url()), &dir.0, Box::new(seq.clone())).expect("reopen");
    assert_eq!((seq.mark("a"), seq.mark("b")), (5, 3));
    wait_until("the spool to drain", || store.spooled() == (0, 0));
    let requests = server.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].0.text(), lines_of(&first));
}

#[test]
fn while_influxdb_refuses_spooled_data_new_batches_are_refused() {
    // 0: unavailable, 1: refusing (bad token), 2: fixed.
    let mode = Arc::new(AtomicUsize::new(0));
    let m = mode.clone();
    let server = FakeInflux::start(move |_, _| match m.load(Ordering::Acquire) {
        0 => (503, String::new()),
        1 => (
            401,
            r#"{"code":"unauthorized","message":"unauthorized access"}"#.into(),
        ),
        _ => (204, String::new()),
    });
    let dir = Dir::new("refusing");
    let mut store = InfluxTelemetry::open(&cfg(&server.url()), &dir.0, Box::new(MemSeq::default()))
        .expect("open");
    store.commit(&[batch("a", 1, 1)]).expect("spooled");
    mode.store(1, Ordering::Release);
    let mut seq = 2;
    wait_until("a commit to be refused", || {
        seq += 1;
        store.commit(&[batch("a", seq, 1)]).is_err()
    });
    mode.store(2, Ordering::Release);
    wait_until("the spool to drain", || store.spooled() == (0, 0));
    seq += 1;
    assert_eq!(
        store.commit(&[batch("a", seq, 1)]).expect("accepted again"),
        [Outcome::Stored]
    );
}

/// A server that accepts connections and never answers.
struct Silent {
    port: u16,
    stop: Arc<AtomicBool>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl Silent {
    fn start() -> Silent {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !halt.load(Ordering::Acquire) {
                if let Ok((stream, _)) = listener.accept() {
                    held.push(stream);
                    counter.fetch_add(1, Ordering::AcqRel);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Silent {
            port,
            stop,
            accepted,
            thread: Some(thread),
        }
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_silent_influxdb_times_out_into_the_spool_and_does_not_hold_up_shutdown() {
    let silent = Silent::start();
    let url = format!("http://127.0.0.1:{}", silent.port);
    let dir = Dir::new("silent");
    let mut config = cfg(&url);
    config.timeout = Duration::from_millis(300);
    let seq = MemSeq::default();
    {
        let mut store =
            InfluxTelemetry::open(&config, &dir.0, Box::new(seq.clone())).expect("open");
        let started = Instant::now();
        assert_eq!(
            store.commit(&[batch("a", 1, 1)]).expect("spooled"),
            [Outcome::Stored]
        );
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert_eq!(store.spooled().0, 1);
    }
    // With a long timeout, the drain's write hangs; dropping the store cancels it.
    config.timeout = Duration::from_secs(60);
    let before = silent.accepted.load(Ordering::Acquire);
    let store = InfluxTelemetry::open(&config, &dir.0, Box::new(seq)).expect("reopen");
    // The drain thread has connected: its write is now hanging.
    wait_until("the drain to connect", || {
        silent.accepted.load(Ordering::Acquire) > before
    });
    let started = Instant::now();
    drop(store);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "shutdown took {:?}",
        started.elapsed()
    );
}

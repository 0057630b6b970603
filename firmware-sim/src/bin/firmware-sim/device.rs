//! One simulated device on the host: the no_std client with a [`SimBoard`], a flash, the
//! host connector and timer, run by the library's driver in a tokio task; a `reboot`
//! command builds a fresh client from the same flash, as a reset would.

use std::sync::Arc;

use firmware_sim::driver;
use firmware_sim::{Client, ClientConfig, ClientStats, Exit, Flash, MaskRng, RamFlash, RingOutbox};
use rand_core::RngCore;
use schemas::session::Outbox;
use tokio::sync::watch;

use crate::image::ImageFlash;
use crate::net::{HostConnector, HostTimer, NetShared};
use crate::sim::{entropy_seed, EventSink, SensorSet, SimBoard};

/// A flash the host can "reset" the device over: a new handle with the same contents.
pub trait HostFlash: Flash + Send + 'static {
    /// A copy of the region as it is now (what the device finds after a reset).
    fn reopen(&self) -> Self;
}

impl HostFlash for RamFlash<Vec<u8>> {
    fn reopen(&self) -> Self {
        RamFlash::new(self.bytes().to_vec())
    }
}

impl HostFlash for ImageFlash {
    fn reopen(&self) -> Self {
        self.clone()
    }
}

/// Everything a device needs besides the network.
pub struct DeviceSpec<F> {
    /// Index among the process's devices.
    pub index: usize,
    /// Device id.
    pub id: Arc<str>,
    /// Device token.
    pub token: String,
    /// Firmware version for `Hello`.
    pub firmware: String,
    /// Sample interval, milliseconds.
    pub interval_ms: u32,
    /// Sensors to report.
    pub sensors: SensorSet,
    /// Its flash.
    pub flash: F,
    /// Receive buffer size.
    pub rx_len: usize,
    /// Transmit buffer size.
    pub tx_len: usize,
}

/// How a device ended.
#[derive(Debug, Clone)]
pub struct DeviceReport {
    /// Index among the process's devices.
    pub index: usize,
    /// Device id.
    pub id: Arc<str>,
    /// Counters, summed over reboots.
    pub stats: ClientStats,
    /// Highest sequence number the hub acknowledged.
    pub last_acked_seq: u64,
    /// Batches still unacknowledged.
    pub unacked_batches: usize,
    /// Simulated reboots.
    pub reboots: u32,
    /// A fatal error, if the device stopped because of one.
    pub error: Option<String>,
}

fn add(a: ClientStats, b: ClientStats) -> ClientStats {
    ClientStats {
        samples: a.samples + b.samples,
        samples_skipped: a.samples_skipped + b.samples_skipped,
        batches_recorded: a.batches_recorded + b.batches_recorded,
        readings_recorded: a.readings_recorded + b.readings_recorded,
        readings_rejected: a.readings_rejected + b.readings_rejected,
        batches_sent: a.batches_sent + b.batches_sent,
        batches_acked: a.batches_acked + b.batches_acked,
        readings_acked: a.readings_acked + b.readings_acked,
        readings_evicted: a.readings_evicted + b.readings_evicted,
        commands: a.commands + b.commands,
        connects: a.connects + b.connects,
        sessions: a.sessions + b.sessions,
    }
}

/// Runs one device until `stop` turns true (then drains for up to `drain_ms`) or a fatal
/// error. Meant for `tokio::spawn`.
pub async fn run_device<F: HostFlash>(
    spec: DeviceSpec<F>,
    net: Arc<NetShared>,
    timer: HostTimer,
    stop: watch::Receiver<bool>,
    drain_ms: u32,
    sink: Arc<dyn EventSink>,
) -> DeviceReport {
    let mut report = DeviceReport {
        index: spec.index,
        id: spec.id.clone(),
        stats: ClientStats::default(),
        last_acked_seq: 0,
        unacked_batches: 0,
        reboots: 0,
        error: None,
    };
    let mut flash = spec.flash;
    let mut connector = HostConnector::new(net);
    let mut seeds = MaskRng::new(entropy_seed(spec.index as u64));
    // Buffers live as long as the device and are lent to each client (one per boot).
    let mut rx = vec![0u8; spec.rx_len];
    let mut tx = vec![0u8; spec.tx_len];
    let mut welcomed_once = false;
    loop {
        let ring = match RingOutbox::mount(flash) {
            Ok((ring, _formatted)) => ring,
            Err(e) => {
                report.error = Some(format!("cannot mount the ring: {e}"));
                return report;
            }
        };
        let mut board = SimBoard::new(
            spec.index,
            spec.id.clone(),
            spec.sensors,
            MaskRng::new(seeds.next_u64()),
            sink.clone(),
        );
        board.welcomed_once = welcomed_once;
        let mut config = ClientConfig::new(&spec.token, &spec.firmware);
        config.sample_interval_ms = spec.interval_ms;
        let rng = MaskRng::new(seeds.next_u64());
        let mut client = match Client::new(config, ring, board, rng, &mut rx, &mut tx) {
            Ok(c) => c,
            Err(e) => {
                report.error = Some(e.to_string());
                return report;
            }
        };
        let mut stop = stop.clone();
        let stopped = async move {
            // A dropped sender also means stop.
            let _ = stop.wait_for(|s| *s).await;
        };
        let result = driver::run(&mut client, &mut connector, &timer, stopped, drain_ms).await;
        report.stats = add(report.stats, client.stats());
        report.last_acked_seq = client.session().last_acked();
        report.unacked_batches = client.outbox().len();
        welcomed_once = client.board().welcomed_once;
        match result {
            Ok(Exit::Reboot) => {
                report.reboots += 1;
                let outbox = client.outbox();
                sink.rebooted(
                    spec.index,
                    &spec.id,
                    outbox.front_seq() + outbox.len() as u64,
                    outbox.len(),
                );
                flash = outbox.flash().reopen();
            }
            Ok(Exit::Stopped) => return report,
            Err(e) => {
                report.error = Some(e.to_string());
                return report;
            }
        }
    }
}

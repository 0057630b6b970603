//! One simulated device on the host: the no_std client with a [`SimBoard`], a flash, the
//! host connector and timer, run by the library's driver in a tokio task; a `reboot`
//! command builds a fresh client from the same flash, as a reset would.

use std::sync::Arc;

use firmware_sim::driver;
use firmware_sim::{Client, ClientConfig, ClientStats, Exit, Flash, MaskRng, RamFlash, RingOutbox};
use rand_core::RngCore;
use schemas::message::truncated;
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
    /// When, after boot, the first sample is taken (see [`ClientConfig::first_sample_ms`]).
    pub first_sample_ms: u32,
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

/// A device that takes firmware updates: its partition, and the test switch.
pub struct UpdateSpec {
    /// The firmware partition (`IMAGE.fw`).
    pub partition: std::path::PathBuf,
    /// A version that fails to boot.
    pub fail_boot_version: Option<String>,
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
    run_device_with_updates(spec, None, net, timer, stop, drain_ms, sink).await
}

/// The bootloader's part of a reset: opens the partition, decides the slot (counting a
/// trial boot, rolling back a version that had its boots), and plays a version the test
/// switch says fails to boot (it resets before confirming, until the bootloader gives up
/// on it). Returns the updater and the version that runs.
fn boot_partition(
    updates: &UpdateSpec,
) -> anyhow::Result<(
    firmware_sim::update::Updater<crate::partition::PartitionFlash>,
    String,
)> {
    let (flash, key) = crate::partition::open(&updates.partition)?;
    let mut updater = firmware_sim::update::Updater::open(flash, Some(key))
        .map_err(|e| anyhow::anyhow!("{}: {e:?}", updates.partition.display()))?;
    loop {
        let boot = updater
            .boot()
            .map_err(|e| anyhow::anyhow!("{}: {e:?}", updates.partition.display()))?;
        let fails = boot.trial
            && updates
                .fail_boot_version
                .as_deref()
                .is_some_and(|v| v == boot.version.as_str());
        if boot.rolled_back {
            tracing::warn!(version = %boot.version, "rolled back: the new version did not come up");
        }
        if !fails {
            return Ok((updater, boot.version.to_string()));
        }
        tracing::warn!(version = %boot.version, "this version fails to boot (--fail-boot-version): resetting");
    }
}

/// [`run_device`], with a firmware partition when `updates` is given: each boot goes
/// through the bootloader, the device reports the version in its active slot, announces
/// the `firmware` capability, and installs what the hub offers.
pub async fn run_device_with_updates<F: HostFlash>(
    spec: DeviceSpec<F>,
    updates: Option<UpdateSpec>,
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
    let mut connector = HostConnector::new(net, spec.index);
    let mut seeds = MaskRng::new(entropy_seed(spec.index as u64));
    // Buffers live as long as the device and are lent to each client (one per boot).
    // A firmware chunk (4 KiB of image in a frame) must fit the receive buffer.
    let rx_len = if updates.is_some() {
        spec.rx_len.max(6 * 1024)
    } else {
        spec.rx_len
    };
    let mut rx = vec![0u8; rx_len];
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
        let mut firmware = spec.firmware.clone();
        if let Some(updates) = &updates {
            match boot_partition(updates) {
                Ok((updater, version)) => {
                    board.updater = Some(updater);
                    firmware = version;
                }
                Err(e) => {
                    report.error = Some(format!("{e:#}"));
                    return report;
                }
            }
        }
        let mut config = ClientConfig::new(&spec.token, &firmware);
        if updates.is_some() {
            let _ = config
                .session
                .capabilities
                .push(truncated(schemas::capability::FIRMWARE));
        }
        config.sample_interval_ms = spec.interval_ms;
        config.first_sample_ms = spec.first_sample_ms;
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

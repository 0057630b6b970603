//! Counters the connection path bumps for every frame, looked up in the metrics registry
//! once per process: `metrics::counter!` hashes the name and takes the registry's lock on
//! every call, which showed in profiles of one-reading frames.

use std::sync::OnceLock;

use metrics::Counter;

/// The per-frame counters (see the `METRICS` list of the API for what each counts).
pub struct WireCounters {
    /// `hub_frames_in_total`.
    pub frames_in: Counter,
    /// `hub_bytes_in_total`.
    pub bytes_in: Counter,
    /// `hub_frames_out_total`.
    pub frames_out: Counter,
    /// `hub_bytes_out_total`.
    pub bytes_out: Counter,
    /// `hub_readings_received_total`.
    pub readings_received: Counter,
}

/// The process's per-frame counters.
pub fn wire() -> &'static WireCounters {
    static COUNTERS: OnceLock<WireCounters> = OnceLock::new();
    COUNTERS.get_or_init(|| {
        // The recorder first: handles taken before it is installed would count nowhere.
        let _ = crate::api::metrics_handle();
        WireCounters {
            frames_in: metrics::counter!("hub_frames_in_total"),
            bytes_in: metrics::counter!("hub_bytes_in_total"),
            frames_out: metrics::counter!("hub_frames_out_total"),
            bytes_out: metrics::counter!("hub_bytes_out_total"),
            readings_received: metrics::counter!("hub_readings_received_total"),
        }
    })
}

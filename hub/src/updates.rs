//! Firmware updates of devices: assigning a stored image to a device, what a device's
//! connection offers it, and recording what the device reports, with an event for every
//! change (SSE `firmware`) and the metrics.
//!
//! A device has at most one update at a time (`store/updates.rs`). Its connection offers
//! that update while it is not over; once the device reports an outcome the offer is
//! withdrawn, so a device that rolled back is not pushed the same image again, and a
//! device that finished while the hub was unreachable reports its outcome when it comes
//! back (the offer of the same version is what tells it the hub still wants to hear).
//!
//! In a cluster the records live in Redis (`cluster/updates.rs`) and a change reaches the
//! device's connection on whichever node holds it (a `hub:control` message); the images
//! are in a `firmware.dir` every node reads.

use std::sync::Arc;
use std::time::Instant;

use schemas::message::truncated;
use schemas::{FirmwareOffer, FirmwareStatus};

use crate::cluster::Backplane;
use crate::events::{EventBus, HubEvent};
use crate::firmware::transfer_cap::TransferCap;
use crate::firmware::{FirmwareError, FirmwareStore};
use crate::presence::Presence;
use crate::store::updates::{UpdateRecord, UpdateStore};
use crate::store::{now_ms, StoreError};

/// Why an update operation failed.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    /// The update store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The artifact is missing or unreadable.
    #[error(transparent)]
    Firmware(#[from] FirmwareError),
}

/// The firmware-update service of one hub.
pub struct Updates {
    store: Arc<dyn UpdateStore>,
    firmware: Arc<FirmwareStore>,
    events: EventBus,
    presence: Arc<Presence>,
    cluster: Option<Arc<Backplane>>,
    holder: String,
    transfer_cap: TransferCap,
}

impl Updates {
    /// The service over `store` and the images in `firmware`, publishing on `events`,
    /// telling connections in `presence` (and, in a cluster, on the node that holds the
    /// device) when an update changes; `holder` names this process in rollout leases.
    pub fn new(
        store: Arc<dyn UpdateStore>,
        firmware: Arc<FirmwareStore>,
        events: EventBus,
        presence: Arc<Presence>,
        cluster: Option<Arc<Backplane>>,
        holder: String,
    ) -> Updates {
        Updates {
            store,
            firmware,
            events,
            presence,
            cluster,
            holder,
            transfer_cap: TransferCap::new(0, Instant::now()),
        }
    }

    /// The same service with chunks to all devices capped at `rate` bytes per second
    /// (`firmware.max_transfer_rate`; 0: no cap).
    pub fn with_transfer_cap(mut self, rate: u64) -> Updates {
        self.transfer_cap = TransferCap::new(rate, Instant::now());
        self
    }

    /// The hub-wide cap on chunk bytes per second, which every connection reserves its
    /// next chunk's bytes from.
    pub fn transfer_cap(&self) -> &TransferCap {
        &self.transfer_cap
    }

    /// The artifacts.
    pub fn firmware(&self) -> &Arc<FirmwareStore> {
        &self.firmware
    }

    /// The update store.
    pub(crate) fn store(&self) -> &dyn UpdateStore {
        self.store.as_ref()
    }

    /// The event bus.
    pub(crate) fn events(&self) -> &EventBus {
        &self.events
    }

    /// Who advances rollouts here (the cluster node id, or "hub").
    pub(crate) fn holder(&self) -> &str {
        &self.holder
    }

    fn publish(&self, record: &UpdateRecord) {
        metrics::counter!("hub_firmware_updates_total", "state" => record.stage.as_str())
            .increment(1);
        self.events.publish(HubEvent::Firmware {
            device: record.device.clone(),
            version: record.version.clone(),
            state: record.stage.as_str().to_string(),
            percent: record.percent,
            reason: record.reason.clone(),
            rollout: record.rollout,
            at_ms: record.updated_at,
        });
    }

    /// Assigns the stored image `version` to `device` (by `rollout`, if one), replacing
    /// its current update, and tells its connection. Blocking (file and database work).
    ///
    /// # Errors
    /// No such artifact, or the store failed.
    pub fn assign(
        &self,
        device: &str,
        version: &str,
        rollout: Option<u64>,
    ) -> Result<UpdateRecord, UpdateError> {
        self.firmware.get(version)?;
        let record = self.store.assign(device, version, rollout, now_ms())?;
        self.publish(&record);
        self.nudge(device);
        Ok(record)
    }

    /// Withdraws `device`'s update if it has not started. Blocking.
    ///
    /// # Errors
    /// The store failed.
    pub fn withdraw(&self, device: &str) -> Result<bool, UpdateError> {
        let withdrawn = self.store.withdraw(device)?;
        if withdrawn {
            self.nudge(device);
        }
        Ok(withdrawn)
    }

    /// Tells `device`'s connection that its offer may have changed: here if it is here,
    /// else (in a cluster) on whichever node holds it. Blocking in a cluster.
    pub fn nudge(&self, device: &str) {
        if let Some(conn) = self.presence.get(device) {
            conn.signals.offer_changed();
        } else if let Some(cluster) = &self.cluster {
            // A lost nudge only delays the offer until the device next connects.
            if let Err(err) = cluster.nudge_update(device) {
                tracing::warn!(%device, error = %err, "cannot tell the device's node about its update");
            }
        }
    }

    /// The device's update, if any.
    ///
    /// # Errors
    /// The store failed.
    pub fn get(&self, device: &str) -> Result<Option<UpdateRecord>, UpdateError> {
        Ok(self.store.get(device)?)
    }

    /// Every update, or those of one rollout.
    ///
    /// # Errors
    /// The store failed.
    pub fn list(&self, rollout: Option<u64>) -> Result<Vec<UpdateRecord>, UpdateError> {
        Ok(self.store.list(rollout)?)
    }

    /// What `device` is to be offered now: its update while that is not over, else
    /// nothing. Blocking.
    ///
    /// # Errors
    /// The store failed, or the assigned artifact cannot be read (removed since).
    pub fn offer_for(&self, device: &str) -> Result<Option<FirmwareOffer>, UpdateError> {
        let Some(record) = self.store.get(device)? else {
            return Ok(None);
        };
        if record.stage.is_final() {
            return Ok(None);
        }
        let artifact = self.firmware.get(&record.version)?;
        Ok(Some(FirmwareOffer {
            version: truncated(&artifact.version),
            size: artifact.size,
            sha256: truncated(&artifact.sha256),
            signature: truncated(&artifact.signature),
        }))
    }

    /// Records what `device` reported; an outcome withdraws the offer. Returns the record
    /// when it changed. Blocking.
    ///
    /// # Errors
    /// The store failed.
    pub fn report(
        &self,
        device: &str,
        status: &FirmwareStatus,
    ) -> Result<Option<UpdateRecord>, UpdateError> {
        let changed = self.store.report(
            device,
            &status.version,
            status.state,
            status.percent,
            &status.reason,
            now_ms(),
        )?;
        if let Some(record) = &changed {
            self.publish(record);
        }
        Ok(changed)
    }
}

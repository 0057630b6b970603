//! The backplane's channels: `hub:control` carries what one node asks of another (new
//! commands for a device it holds, a changed firmware update for a device whichever node
//! holds it, close a superseded connection, hand devices over) and
//! `hub:events` carries every node's events to the others.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::ownership::Owner;
use super::{Backplane, CONTROL, EVENTS, PRESENCE};
use crate::events::{EventBus, HubEvent};
use crate::presence::Presence;
use crate::store::StoreError;

/// A request to one node.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(super) enum Control {
    /// New commands for a device held by `node`.
    Nudge { node: String, device: String },
    /// The device's firmware update changed: the node holding it offers it again. Sent to
    /// every node (no owner lookup, so it also reaches a connection that is just moving).
    Update { device: String },
    /// Close a device's connection on `node` (superseded elsewhere).
    Kick {
        node: String,
        device: String,
        conn_id: u64,
        code: u16,
    },
    /// Hand `devices` of `node`'s devices to other nodes, `rate` per second.
    Shed {
        node: String,
        devices: usize,
        rate: u32,
    },
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope {
    origin: String,
    event: HubEvent,
}

impl Backplane {
    /// Publishes a control message.
    pub(super) async fn publish_control(&self, control: &Control) -> Result<(), StoreError> {
        let mut m = self.manager.clone();
        let payload = serde_json::to_string(control).unwrap_or_default();
        redis::cmd("PUBLISH")
            .arg(CONTROL)
            .arg(payload)
            .query_async::<i64>(&mut m)
            .await?;
        Ok(())
    }

    /// Tells the node that holds `device` (if another one) that it has new commands.
    ///
    /// Cancel safety: safe; a lost nudge is repeated by the owner's next delivery check.
    pub async fn nudge(&self, device: &str) {
        let mut m = self.manager.clone();
        let owner: Result<Option<String>, _> = redis::cmd("HGET")
            .arg(PRESENCE)
            .arg(device)
            .query_async(&mut m)
            .await;
        match owner {
            Ok(Some(v)) => {
                if let Some(owner) = Owner::parse(&v).filter(|o| o.node != self.node) {
                    let nudge = Control::Nudge {
                        node: owner.node,
                        device: device.to_string(),
                    };
                    if let Err(err) = self.publish_control(&nudge).await {
                        tracing::warn!(error = %err, %device, "cannot publish a nudge to the backplane");
                    }
                }
            }
            Ok(None) => {}
            Err(err) => tracing::warn!(error = %err, %device, "cannot look up the device's node"),
        }
    }

    /// Tells whichever node holds `device` that its firmware update changed. Blocking (one
    /// PUBLISH on the stores' connection), for the update service's blocking calls.
    ///
    /// # Errors
    /// Redis failed; the device is then offered its update when it next connects.
    pub fn nudge_update(&self, device: &str) -> Result<(), StoreError> {
        let payload = serde_json::to_string(&Control::Update {
            device: device.to_string(),
        })
        .map_err(|e| StoreError::Other(e.to_string()))?;
        self.redis.run(|c| {
            redis::cmd("PUBLISH")
                .arg(CONTROL)
                .arg(payload)
                .query::<i64>(c)
        })?;
        Ok(())
    }

    /// Asks `owner`'s node to close that connection with `code`.
    ///
    /// Cancel safety: safe; a kick not sent leaves the older connection to be superseded when it next talks to Redis.
    pub async fn kick(&self, owner: &Owner, device: &str, code: u16) {
        let kick = Control::Kick {
            node: owner.node.clone(),
            device: device.to_string(),
            conn_id: owner.conn_id,
            code,
        };
        if let Err(err) = self.publish_control(&kick).await {
            tracing::warn!(error = %err, %device, "cannot publish a kick to the backplane");
        }
    }

    /// Receives control messages and other nodes' events until shutdown, resubscribing
    /// after a lost connection.
    pub(super) async fn subscribe(
        self: Arc<Self>,
        presence: Arc<Presence>,
        events: EventBus,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let connected = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(CONTROL).await?;
                pubsub.subscribe(EVENTS).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            let mut pubsub = tokio::select! {
                _ = crate::stopping(&mut shutdown) => return,
                r = connected => match r {
                    Ok(p) => p,
                    Err(err) => {
                        tracing::warn!(error = %err, "backplane subscription failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                },
            };
            backoff = Duration::from_millis(100);
            let mut stream = pubsub.on_message();
            loop {
                let msg = tokio::select! {
                    _ = crate::stopping(&mut shutdown) => return,
                    m = stream.next() => m,
                };
                let Some(msg) = msg else { break };
                let payload: String = msg.get_payload().unwrap_or_default();
                match msg.get_channel_name() {
                    CONTROL => self.on_control(&presence, &payload),
                    EVENTS => self.on_event(&presence, &events, &payload),
                    _ => {}
                }
            }
            tracing::warn!("backplane subscription dropped; reconnecting");
        }
    }

    fn on_control(&self, presence: &Presence, payload: &str) {
        match serde_json::from_str::<Control>(payload) {
            Ok(Control::Nudge { node, device }) if node == self.node => {
                if let Some(conn) = presence.get(&device) {
                    conn.signals.commands_ready();
                }
            }
            Ok(Control::Update { device }) => {
                if let Some(conn) = presence.get(&device) {
                    conn.signals.offer_changed();
                }
            }
            Ok(Control::Kick {
                node,
                device,
                conn_id,
                code,
            }) if node == self.node => {
                if let Some(conn) = presence.get(&device).filter(|c| c.conn_id == conn_id) {
                    let reason = if code == schemas::close::SUPERSEDED {
                        "superseded by a newer connection of this device"
                    } else {
                        "closed by the hub"
                    };
                    conn.signals.kick(code, reason);
                }
            }
            Ok(Control::Shed {
                node,
                devices,
                rate,
            }) if node == self.node => self.start_shedding(presence, devices, rate),
            Ok(_) => {}
            Err(err) => tracing::debug!(error = %err, "ignoring a malformed control message"),
        }
    }

    fn on_event(&self, presence: &Presence, events: &EventBus, payload: &str) {
        let Ok(envelope) = serde_json::from_str::<Envelope>(payload) else {
            return;
        };
        if envelope.origin == self.node {
            return;
        }
        if let HubEvent::State { device, .. } = &envelope.event {
            // Desired state changed through another node: the connection here sends it.
            if let Some(conn) = presence.get(device) {
                conn.signals.desired_changed();
            }
        }
        if let HubEvent::Command { command, .. } = &envelope.event {
            // A command of a device held here finished elsewhere (a sweep on another
            // node): its window has room again.
            if command.state.is_final() {
                if let Some(conn) = presence.get(&command.device) {
                    conn.signals.commands_ready();
                }
            }
        }
        events.deliver_remote(envelope.event);
    }

    /// Publishes this node's events for the others until shutdown.
    pub(super) async fn forward(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<HubEvent>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let event = tokio::select! {
                _ = crate::stopping(&mut shutdown) => return,
                e = rx.recv() => match e { Some(e) => e, None => return },
            };
            let payload = serde_json::to_string(&Envelope {
                origin: self.node.clone(),
                event,
            })
            .unwrap_or_default();
            let mut m = self.manager.clone();
            let sent: Result<i64, _> = redis::cmd("PUBLISH")
                .arg(EVENTS)
                .arg(payload)
                .query_async(&mut m)
                .await;
            if let Err(err) = sent {
                metrics::counter!("hub_backplane_errors_total").increment(1);
                tracing::debug!(error = %err, "cannot forward an event to the backplane");
            }
        }
    }
}

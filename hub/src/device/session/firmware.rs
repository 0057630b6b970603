//! The firmware-transfer part of [`HubSession`]: the offer a device is told about, and
//! its chunk requests, answered one at a time when nothing else waits (see the module
//! documentation of `session`).

use schemas::FirmwareRequest;

use super::*;

impl HubSession {
    pub(super) fn firmware_request(&mut self, request: FirmwareRequest) {
        let Some(offered) = &self.offered else {
            return self.finish(End::close(
                close::PROTOCOL_VIOLATION,
                "firmware_request before any firmware_offer",
                "protocol:4001",
            ));
        };
        if self.chunk_requests.len() >= MAX_FIRMWARE_REQUESTS {
            return self.finish(End::close(
                close::PROTOCOL_VIOLATION,
                format!("more than {MAX_FIRMWARE_REQUESTS} firmware requests outstanding"),
                "protocol:4001",
            ));
        }
        match offered {
            Some((version, size)) if request.version == version.as_str() => {
                if request.offset >= *size {
                    let why = format!(
                        "firmware_request at offset {} is past the end of {version} ({size} bytes)",
                        request.offset
                    );
                    self.report(close::PROTOCOL_VIOLATION, &why);
                } else {
                    self.chunk_requests.push_back(request);
                }
            }
            _ => {
                // A request for an offer the hub has since replaced (or withdrawn) may
                // have crossed the new offer on the wire: not the device's fault.
                let why = format!(
                    "firmware {} is not offered to this device (any more)",
                    request.version
                );
                self.report(close::PROTOCOL_VIOLATION, &why);
            }
        }
    }

    /// What this device should install changed (a rollout reached it, was paused or
    /// aborted, or the device's outcome was recorded).
    pub fn handle_offer_changed(&mut self) {
        if self.phase == Phase::Ready
            && self.takes_firmware
            && !self.effects.contains(&Effect::FetchOffer)
        {
            self.effects.push_back(Effect::FetchOffer);
        }
    }

    /// The outcome of [`Effect::FetchOffer`]: the update for the device, or `None`. It is
    /// sent when it differs from what this connection last offered (the first answer
    /// always goes out, an empty one too: it tells the device this hub takes firmware
    /// messages). Requests for a replaced offer are dropped.
    pub fn handle_offer(&mut self, offer: Option<FirmwareOffer>) {
        if self.phase != Phase::Ready || !self.takes_firmware {
            return;
        }
        let now_offered = offer
            .as_ref()
            .filter(|o| !o.version.is_empty())
            .map(|o| (o.version.to_string(), o.size));
        if self.offered.as_ref() == Some(&now_offered) {
            return;
        }
        self.chunk_requests.retain(|r| {
            now_offered
                .as_ref()
                .is_some_and(|(v, _)| r.version == v.as_str())
        });
        self.offered = Some(now_offered);
        let offer = offer
            .filter(|o| !o.version.is_empty())
            .unwrap_or_else(|| FirmwareOffer {
                version: heapless::String::new(),
                size: 0,
                sha256: heapless::String::new(),
                signature: heapless::String::new(),
            });
        self.transmits
            .push_back(Transmit::message(HubMessage::FirmwareOffer(offer)));
    }

    /// Whether a chunk request waits and nothing else does: the driver calls
    /// [`HubSession::handle_chunk_due`] when it has nothing more urgent to do.
    pub fn has_chunk_due(&self) -> bool {
        self.phase == Phase::Ready
            && !self.reading_chunk
            && self.transmits.is_empty()
            && self.effects.is_empty()
            && !self.chunk_requests.is_empty()
    }

    /// How many bytes the chunk [`HubSession::handle_chunk_due`] answers next will carry:
    /// what the oldest request asks for, within the chunk limit and the end of the image.
    /// `None` when no request waits. The driver reserves that much of the hub-wide
    /// transfer cap before it lets the chunk go, so the session itself never waits.
    pub fn next_chunk_len(&self) -> Option<u64> {
        let request = self.chunk_requests.front()?;
        let left = match &self.offered {
            Some(Some((_, size))) => size.saturating_sub(request.offset),
            _ => 0,
        };
        Some(u64::from(request.len).min(MAX_CHUNK_BYTES as u64).min(left))
    }

    /// Answers the oldest chunk request: asks for its bytes with [`Effect::ReadChunk`].
    pub fn handle_chunk_due(&mut self) {
        if !self.has_chunk_due() {
            return;
        }
        if let Some(request) = self.chunk_requests.pop_front() {
            self.reading_chunk = true;
            self.effects.push_back(Effect::ReadChunk(request));
        }
    }

    /// The outcome of [`Effect::ReadChunk`]: the bytes (fewer than asked at the end of the
    /// image), or why they could not be read (the image was removed, say), which the
    /// device is told.
    pub fn handle_chunk_read(&mut self, request: &FirmwareRequest, bytes: Result<&[u8], String>) {
        self.reading_chunk = false;
        if self.phase != Phase::Ready {
            return;
        }
        match bytes {
            Ok(bytes) => self
                .transmits
                .push_back(Transmit::message(HubMessage::FirmwareChunk(
                    FirmwareChunk {
                        version: request.version.clone(),
                        offset: request.offset,
                        data: schemas::message::ChunkData::from_slice(bytes),
                    },
                ))),
            Err(why) => self.report(close::INTERNAL, &why),
        }
    }
}

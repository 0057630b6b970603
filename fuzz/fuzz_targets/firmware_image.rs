//! The firmware simulator's provisioning image (`firmware-sim/src/bin/firmware-sim/image.rs`,
//! compiled in here as it is) and the unacknowledged-batch ring the firmware keeps in that
//! image's flash region (`firmware_sim::RingOutbox`). Any bytes are refused or accepted
//! without a panic; an accepted image encodes back to itself; a ring that mounts reads
//! back every batch, takes a new one, and mounts again to the same contents.
//!
//! The input is used three ways: as a whole image file; as an image body behind a valid
//! header (so the checksum does not stop the fuzzer before the body decoder); and as the
//! raw flash region under the ring.
#![no_main]
// The image module carries the simulator's file I/O, which this target does not call.
#![allow(dead_code)]

#[path = "../../firmware-sim/src/bin/firmware-sim/image.rs"]
mod image;

use std::path::Path;

use firmware_sim::{Flash, RamFlash, RingOutbox};
use libfuzzer_sys::fuzz_target;
use schemas::limits::MAX_READINGS;
use schemas::message::truncated;
use schemas::session::Outbox;
use schemas::Reading;

fn batches<F: Flash>(ring: &mut RingOutbox<F>) -> Vec<heapless::Vec<Reading, MAX_READINGS>> {
    (0..ring.len())
        .map(|i| {
            let mut out = heapless::Vec::new();
            ring.read(i, &mut out)
                .expect("a mounted ring reads back every batch");
            out
        })
        .collect()
}

fn ring(flash: Vec<u8>) {
    let Ok((mut ring, _formatted)) = RingOutbox::mount(RamFlash::new(flash)) else {
        return;
    };
    let _ = batches(&mut ring);
    let reading = Reading {
        metric: truncated("temp"),
        ts: 1,
        value: 21.5,
    };
    if ring.push_back(&[reading]).is_err() {
        return;
    }
    let expected = (ring.front_seq(), batches(&mut ring));
    let flash = ring.into_flash();
    let (mut again, formatted) =
        RingOutbox::mount(flash).expect("a ring that was written mounts again");
    assert!(!formatted, "a written ring mounted as blank");
    assert_eq!((again.front_seq(), batches(&mut again)), expected);
}

fn image(bytes: &[u8]) {
    let path = Path::new("fuzz.img");
    if let Ok(img) = image::Image::decode(path, bytes) {
        let again = image::Image::decode(path, &img.encode()).expect("an encoded image decodes");
        assert_eq!(again, img);
        ring(img.flash);
    }
}

fuzz_target!(|data: &[u8]| {
    image(data);
    // The same bytes as the body of an image with a valid header.
    let mut wrapped = Vec::with_capacity(20 + data.len());
    wrapped.extend_from_slice(&image::MAGIC);
    wrapped.extend_from_slice(&image::VERSION.to_le_bytes());
    wrapped.extend_from_slice(&0u16.to_le_bytes());
    wrapped.extend_from_slice(&(data.len() as u32).to_le_bytes());
    wrapped.extend_from_slice(&firmware_sim::crc::crc32(data).to_le_bytes());
    wrapped.extend_from_slice(data);
    image(&wrapped);
    ring(data.to_vec());
});

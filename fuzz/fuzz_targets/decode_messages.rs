//! Decoding every message in both directions and both encodings, as the hub and the devices
//! do it (`schemas::link::decode_frame`, then `validate`). Nothing may panic, and whatever
//! decodes must survive a round trip: postcard → message → postcard is stable, and a valid
//! message carried over JSON comes back the same (floats included).
#![no_main]

use libfuzzer_sys::fuzz_target;
use schemas::codec::{decode_json, decode_postcard, encode_json, encode_postcard_vec, WireMessage};
use schemas::link::{decode_frame, DataFrame};
use schemas::{DeviceMessage, Encoding, HubMessage};

/// The postcard and JSON round trips of one decoded message.
fn round_trips<M: WireMessage + std::fmt::Debug>(msg: &M, valid: bool) {
    let bytes = encode_postcard_vec(msg);
    let again: M = decode_postcard(&bytes).expect("an encoded message decodes");
    assert_eq!(
        encode_postcard_vec(&again),
        bytes,
        "postcard round trip of {msg:?}"
    );
    if valid {
        // Only valid messages: a NaN (which postcard carries and validation refuses) has no
        // JSON spelling.
        let text = encode_json(msg);
        let back: M = decode_json(&text).expect("encoded JSON decodes");
        assert_eq!(
            encode_postcard_vec(&back),
            bytes,
            "JSON round trip of {msg:?} via {text}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    // The hub's side: frames from devices.
    if let Ok(msg) = decode_frame::<DeviceMessage>(Encoding::Postcard, DataFrame::Binary(data)) {
        let valid = msg.validate().is_ok();
        round_trips(&msg, valid);
    }
    // The devices' side: frames from the hub (no value rules there).
    if let Ok(msg) = decode_postcard::<HubMessage>(data) {
        round_trips(&msg, true);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(msg) = decode_frame::<DeviceMessage>(Encoding::Json, DataFrame::Text(text)) {
            let valid = msg.validate().is_ok();
            round_trips(&msg, valid);
        }
        if let Ok(msg) = decode_json::<HubMessage>(text) {
            round_trips(&msg, true);
        }
    }
});

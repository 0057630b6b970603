//! Device tokens (`hub::token`): any string is refused or accepted without a panic, a token
//! the hub issued is accepted exactly while it is valid and names its device, and no change
//! to an issued token (a byte replaced, cut, lengthened) is accepted unless the result is
//! the same text.
#![no_main]

use arbitrary::Arbitrary;
use hub::token::{issue, verify, Revocations, TokenError, TokenSecret};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    raw: String,
    device: String,
    issued_ms: u64,
    ttl_s: u32,
    now_offset_ms: u32,
    edit_at: u16,
    edit_byte: u8,
    revoked_at_offset: Option<i16>,
}

fuzz_target!(|input: Input| {
    let secret = TokenSecret::from_hex(&"5a".repeat(32)).expect("secret");
    let now_ms = input
        .issued_ms
        .saturating_add(u64::from(input.now_offset_ms));
    // Arbitrary text.
    let _ = verify(&secret, &input.raw, now_ms);
    // An issued token.
    if input.issued_ms > u64::MAX / 2 {
        return;
    }
    let token = issue(
        &secret,
        &input.device,
        input.issued_ms,
        u64::from(input.ttl_s),
    );
    let expires_at_s = input.issued_ms / 1000 + u64::from(input.ttl_s);
    let verdict = verify(&secret, &token, now_ms);
    if !schemas::limits::is_valid_device_id(&input.device) {
        assert!(
            verdict.is_err(),
            "a token for an invalid device id: {token}"
        );
    } else if now_ms / 1000 >= expires_at_s {
        assert_eq!(verdict, Err(TokenError::Expired));
    } else {
        let claims = verdict.expect("a fresh token is valid");
        assert_eq!(claims.device_id, input.device);
        assert_eq!(claims.issued_at_ms, input.issued_ms);
        assert_eq!(claims.expires_at_s, expires_at_s);
        let mut revocations = Revocations::default();
        if let Some(offset) = input.revoked_at_offset {
            let at = input.issued_ms.saturating_add_signed(i64::from(offset));
            revocations.insert(&input.device, at);
            assert_eq!(revocations.is_revoked(&claims), input.issued_ms <= at);
        } else {
            assert!(!revocations.is_revoked(&claims));
        }
    }
    // An altered token is refused, unless the alteration changed nothing.
    let mut bytes = token.clone().into_bytes();
    let at = usize::from(input.edit_at) % (bytes.len() + 1);
    if at == bytes.len() {
        bytes.push(input.edit_byte);
    } else if input.edit_byte == 0 {
        bytes.truncate(at);
    } else {
        bytes[at] = input.edit_byte;
    }
    if let Ok(altered) = String::from_utf8(bytes) {
        if altered != token {
            assert!(
                verify(&secret, &altered, input.issued_ms).is_err(),
                "altered token accepted: {altered}"
            );
        }
    }
});

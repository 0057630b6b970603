//! Device tokens: `v1.<device_id>.<issued_at_ms>.<expires_at_s>.<hmac>`, signed with
//! HMAC-SHA256 over everything before the last dot, so that any hub with the secret
//! verifies a token without a lookup. Revocation is per device: every token for a device
//! issued at or before the revocation instant is refused.

use std::collections::HashMap;

use ring::hmac;

/// The secret that signs device tokens (32 bytes).
#[derive(Clone)]
pub struct TokenSecret(hmac::Key);

impl std::fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSecret(..)")
    }
}

impl TokenSecret {
    /// Parses 64 hex digits.
    pub fn from_hex(hex: &str) -> Option<TokenSecret> {
        if hex.len() != 64 {
            return None;
        }
        let bytes = hex_decode(hex)?;
        Some(TokenSecret(hmac::Key::new(hmac::HMAC_SHA256, &bytes)))
    }
}

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// The device the token belongs to.
    pub device_id: String,
    /// When it was issued, ms since the Unix epoch.
    pub issued_at_ms: u64,
    /// When it expires, s since the Unix epoch.
    pub expires_at_s: u64,
}

/// Why a token was refused. The text is sent to the device in the HTTP 401 body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No token in the request.
    #[error("missing token: send `Authorization: Bearer <token>` (or ?token=), or present a client certificate")]
    Missing,
    /// Not of the token format.
    #[error("malformed token")]
    Malformed,
    /// The signature does not match (wrong secret or altered token).
    #[error("invalid token signature")]
    BadSignature,
    /// Past its expiry.
    #[error("token expired")]
    Expired,
    /// Revoked by the operator.
    #[error("token revoked")]
    Revoked,
}

/// Issues a token for `device_id`, valid from `now_ms` for `ttl_s` seconds.
pub fn issue(secret: &TokenSecret, device_id: &str, now_ms: u64, ttl_s: u64) -> String {
    let body = format!("v1.{device_id}.{now_ms}.{}", now_ms / 1000 + ttl_s);
    let tag = hmac::sign(&secret.0, body.as_bytes());
    format!("{body}.{}", hex_encode(tag.as_ref()))
}

/// Verifies a token's signature and expiry (not revocation, see [`Revocations`]).
///
/// # Errors
/// The reason the token is not acceptable.
pub fn verify(secret: &TokenSecret, token: &str, now_ms: u64) -> Result<Claims, TokenError> {
    let (body, tag_hex) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
    let tag = hex_decode(tag_hex).ok_or(TokenError::Malformed)?;
    // Device ids may contain dots, so the fields are taken from the right:
    // `v1.<device id>.<issued>.<expires>`.
    let mut parts = body.rsplitn(3, '.');
    let (Some(expires), Some(issued), Some(head)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed);
    };
    let device_id = head.strip_prefix("v1.").ok_or(TokenError::Malformed)?;
    hmac::verify(&secret.0, body.as_bytes(), &tag).map_err(|_| TokenError::BadSignature)?;
    let issued_at_ms: u64 = issued.parse().map_err(|_| TokenError::Malformed)?;
    let expires_at_s: u64 = expires.parse().map_err(|_| TokenError::Malformed)?;
    if !schemas::limits::is_valid_device_id(device_id) {
        return Err(TokenError::Malformed);
    }
    if now_ms / 1000 >= expires_at_s {
        return Err(TokenError::Expired);
    }
    Ok(Claims {
        device_id: device_id.to_string(),
        issued_at_ms,
        expires_at_s,
    })
}

/// Revoked devices: tokens issued at or before the instant are refused.
#[derive(Debug, Clone, Default)]
pub struct Revocations {
    before_ms: HashMap<String, u64>,
}

impl Revocations {
    /// Records a revocation.
    pub fn insert(&mut self, device_id: &str, revoked_at_ms: u64) {
        let entry = self.before_ms.entry(device_id.to_string()).or_insert(0);
        *entry = (*entry).max(revoked_at_ms);
    }

    /// Whether these claims were revoked.
    pub fn is_revoked(&self, claims: &Claims) -> bool {
        self.before_ms
            .get(&claims.device_id)
            .is_some_and(|&at| claims.issued_at_ms <= at)
    }
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(hex: &str) -> Option<Vec<u8>> {
    // Lowercase only: a token has exactly one spelling.
    if hex.len() % 2 != 0
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(byte: char) -> TokenSecret {
        TokenSecret::from_hex(&byte.to_string().repeat(64)).expect("secret")
    }

    #[test]
    fn issue_verify_expire_revoke() {
        let s = secret('a');
        let t = issue(&s, "dev-1", 1_000_000, 60);
        let claims = verify(&s, &t, 1_000_500).expect("valid");
        assert_eq!(claims.device_id, "dev-1");
        assert_eq!(verify(&s, &t, 1_061_000), Err(TokenError::Expired));
        assert_eq!(
            verify(&secret('b'), &t, 1_000_500),
            Err(TokenError::BadSignature)
        );
        let forged = t.replace("dev-1", "dev-2");
        assert_eq!(
            verify(&s, &forged, 1_000_500),
            Err(TokenError::BadSignature)
        );
        assert_eq!(verify(&s, "garbage", 0), Err(TokenError::Malformed));
        // Device ids may contain dots.
        let dotted = issue(&s, "kitchen.temp.1", 1_000_000, 60);
        assert_eq!(
            verify(&s, &dotted, 1_000_500).map(|c| c.device_id),
            Ok("kitchen.temp.1".to_string())
        );
        let mut rev = Revocations::default();
        rev.insert("dev-1", 1_000_000);
        assert!(rev.is_revoked(&claims));
        let newer = verify(&s, &issue(&s, "dev-1", 1_000_001, 60), 1_000_500).expect("valid");
        assert!(!rev.is_revoked(&newer));
    }
}

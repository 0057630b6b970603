//! Device authentication at the upgrade: token verification against the secret and the
//! revocation list, which is reloaded from the store periodically so that `hub token
//! revoke` takes effect on a running hub (and kicks connected devices) within seconds.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::presence::Presence;
use crate::store::DeviceRegistry;
use crate::token::{self, Claims, Revocations, TokenError, TokenSecret};

/// How often revocations are reloaded from the store.
pub const REVOCATION_REFRESH: Duration = Duration::from_secs(1);

/// Verifies device tokens.
#[derive(Debug)]
pub struct Auth {
    secret: TokenSecret,
    revocations: RwLock<Revocations>,
}

impl Auth {
    /// An authenticator with the given secret and no revocations yet.
    pub fn new(secret: TokenSecret) -> Auth {
        Auth {
            secret,
            revocations: RwLock::new(Revocations::default()),
        }
    }

    /// Issues a token for `device_id`, valid from `now_ms` for `ttl_s` seconds.
    pub fn issue(&self, device_id: &str, now_ms: u64, ttl_s: u64) -> String {
        token::issue(&self.secret, device_id, now_ms, ttl_s)
    }

    /// Checks a token presented at `now_ms`.
    ///
    /// # Errors
    /// Why the token is not acceptable.
    pub fn verify(&self, token: Option<&str>, now_ms: u64) -> Result<Claims, TokenError> {
        let token = token.filter(|t| !t.is_empty()).ok_or(TokenError::Missing)?;
        let claims = token::verify(&self.secret, token, now_ms)?;
        if self.is_revoked(&claims) {
            return Err(TokenError::Revoked);
        }
        Ok(claims)
    }

    /// Whether these claims have been revoked.
    pub fn is_revoked(&self, claims: &Claims) -> bool {
        self.revocations
            .read()
            .map(|r| r.is_revoked(claims))
            .unwrap_or(false)
    }

    /// Replaces the revocation list.
    pub fn set_revocations(&self, list: &[(String, u64)]) {
        let mut fresh = Revocations::default();
        for (device, at) in list {
            fresh.insert(device, *at);
        }
        if let Ok(mut r) = self.revocations.write() {
            *r = fresh;
        }
    }

    /// Reloads revocations and kicks connected devices whose token is now revoked.
    ///
    /// Cancel safety: safe; a refresh cut short is repeated by the next one.
    pub async fn refresh(self: &Arc<Self>, meta: &Arc<dyn DeviceRegistry>, presence: &Presence) {
        let meta = meta.clone();
        match tokio::task::spawn_blocking(move || meta.revocations()).await {
            Ok(Ok(list)) => self.set_revocations(&list),
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "cannot reload token revocations");
                return;
            }
            Err(_) => return,
        }
        for (device, conn) in presence.snapshot() {
            let claims = Claims {
                device_id: device.to_string(),
                issued_at_ms: conn.token_issued_ms,
                expires_at_s: u64::MAX,
            };
            if self.is_revoked(&claims) {
                conn.kick.kick(schemas::close::POLICY, "token revoked");
            }
        }
    }
}

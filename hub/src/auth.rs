//! Device authentication at the upgrade: a bearer token or a verified client certificate
//! (or both, naming the same device), checked against the secret and the revocation list,
//! which is reloaded from the store periodically so that `hub token revoke` takes effect
//! on a running hub (and kicks connected devices) within seconds.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::client_cert::CertError;
use crate::presence::Presence;
use crate::store::DeviceRegistry;
use crate::token::{self, Claims, Revocations, TokenError, TokenSecret};

/// How often revocations are reloaded from the store.
pub const REVOCATION_REFRESH: Duration = Duration::from_secs(1);

/// Why a device was refused at the upgrade. The text is the HTTP body it gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthRefusal {
    /// The token is missing (and no certificate came), malformed, forged, expired or revoked.
    #[error("{0}")]
    Token(TokenError),
    /// The verified client certificate does not name a device.
    #[error("{0}")]
    Certificate(String),
    /// The device's certificates were revoked (`hub token revoke`, `hub devices remove`).
    #[error("client certificate of {0} revoked")]
    CertificateRevoked(String),
    /// Certificate and token name different devices.
    #[error("the client certificate names device {cert} but the token names {token}: present one credential, or both for the same device")]
    Mismatch {
        /// The certificate's device.
        cert: String,
        /// The token's device.
        token: String,
    },
}

impl AuthRefusal {
    /// The HTTP status: 403 when both credentials are valid but disagree, else 401.
    pub fn status(&self) -> u16 {
        match self {
            AuthRefusal::Mismatch { .. } => 403,
            _ => 401,
        }
    }
}

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

    /// Decides who a device is from what it presented: a token (`None` when it sent none),
    /// the identity of its verified client certificate (`None` when it presented none), or
    /// both. A certificate alone stands for its device unless revoked; a token is checked as
    /// [`Auth::verify`] does, also next to a certificate (a bad token is not overlooked
    /// because a certificate came with it); with both, they must name the same device. The
    /// claims returned are the certificate's when there is one (its `notAfter` ends the
    /// session), else the token's.
    ///
    /// # Errors
    /// Why the device is refused.
    pub fn admit(
        &self,
        token: Option<&str>,
        cert: Option<Result<Claims, CertError>>,
        now_ms: u64,
    ) -> Result<Claims, AuthRefusal> {
        let token = token.filter(|t| !t.is_empty());
        let cert = match cert {
            None => None,
            Some(Err(err)) => return Err(AuthRefusal::Certificate(err.to_string())),
            Some(Ok(claims)) if self.is_revoked(&claims) => {
                return Err(AuthRefusal::CertificateRevoked(claims.device_id))
            }
            Some(Ok(claims)) => Some(claims),
        };
        match (cert, token) {
            (None, token) => self.verify(token, now_ms).map_err(AuthRefusal::Token),
            (Some(cert), None) => Ok(cert),
            (Some(cert), Some(token)) => {
                let by_token = self
                    .verify(Some(token), now_ms)
                    .map_err(AuthRefusal::Token)?;
                if by_token.device_id != cert.device_id {
                    return Err(AuthRefusal::Mismatch {
                        cert: cert.device_id,
                        token: by_token.device_id,
                    });
                }
                Ok(cert)
            }
        }
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
        let list = match tokio::task::spawn_blocking(move || meta.revocations()).await {
            Ok(Ok(list)) => list,
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "cannot reload token revocations");
                return;
            }
            Err(_) => return,
        };
        self.set_revocations(&list);
        // Every revoked device is looked at, each time: a connection admitted with the
        // list before this one is still caught. A look-up per revocation rather than a
        // pass over every connection, which held the presence lock that API calls and
        // command signals wait for (10,000 devices, once a second).
        for (device, revoked_at_ms) in &list {
            if let Some(conn) = presence.get(device) {
                if conn.token_issued_ms <= *revoked_at_ms {
                    conn.signals.kick(schemas::close::POLICY, "token revoked");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth() -> Auth {
        Auth::new(TokenSecret::from_hex(&"c".repeat(64)).expect("secret"))
    }

    fn cert(device: &str, issued_at_ms: u64) -> Option<Result<Claims, CertError>> {
        Some(Ok(Claims {
            device_id: device.into(),
            issued_at_ms,
            expires_at_s: 9_000_000,
        }))
    }

    #[test]
    fn a_certificate_a_token_or_both_for_one_device_admit_it() {
        let a = auth();
        let token = a.issue("d1", 1_000, 60);
        let now = 2_000;
        assert_eq!(
            a.admit(Some(&token), None, now).map(|c| c.device_id),
            Ok("d1".into())
        );
        let by_cert = a.admit(None, cert("d1", 1_000), now).expect("cert alone");
        assert_eq!(by_cert.expires_at_s, 9_000_000);
        // Both: the certificate's claims (its expiry), after the token was checked.
        let both = a.admit(Some(&token), cert("d1", 1_000), now).expect("both");
        assert_eq!(both.expires_at_s, 9_000_000);
        assert_eq!(
            a.admit(Some(""), cert("d1", 1_000), now)
                .map(|c| c.device_id),
            Ok("d1".into())
        );
    }

    #[test]
    fn disagreeing_revoked_or_bad_credentials_are_refused_with_their_reason() {
        let a = auth();
        let now = 2_000;
        let token = a.issue("d2", 1_000, 60);
        let mismatch = a.admit(Some(&token), cert("d1", 1_000), now);
        assert_eq!(
            mismatch,
            Err(AuthRefusal::Mismatch {
                cert: "d1".into(),
                token: "d2".into()
            })
        );
        assert_eq!(mismatch.map(|_| ()).expect_err("refused").status(), 403);
        // A bad token next to a good certificate is still a bad token.
        assert_eq!(
            a.admit(Some("v1.d1.1.2.00"), cert("d1", 1_000), now),
            Err(AuthRefusal::Token(TokenError::BadSignature))
        );
        assert_eq!(
            a.admit(None, None, now),
            Err(AuthRefusal::Token(TokenError::Missing))
        );
        assert!(matches!(
            a.admit(None, Some(Err(CertError::NoCommonName)), now),
            Err(AuthRefusal::Certificate(_))
        ));
        // Revocation at 1.5 s: the certificate of 1 s is refused, one of 2 s is not.
        a.set_revocations(&[("d1".to_string(), 1_500)]);
        let revoked = a.admit(None, cert("d1", 1_000), now);
        assert_eq!(revoked, Err(AuthRefusal::CertificateRevoked("d1".into())));
        assert_eq!(revoked.map(|_| ()).expect_err("refused").status(), 401);
        assert!(a.admit(None, cert("d1", 2_000), now).is_ok());
    }
}

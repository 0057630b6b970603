//! TLS 1.3 session tickets that survive a hub restart: a device that reconnects after the
//! hub came back resumes its TLS session (no certificate signature on the hub, no chain
//! verification on the device) instead of a full handshake, which is what makes a
//! reconnect storm cheap.
//!
//! Tickets are sealed with ChaCha20-Poly1305 under a key derived (HKDF-SHA256) from a
//! secret kept in the data directory (`tls/ticket-key`) and the current 12-hour period;
//! a ticket opens under its own period's key or the one before, so keys roll and are
//! forgotten without any state, and a ticket lives at most 24 hours. Resumption in
//! TLS 1.3 as rustls does it still runs an ephemeral key exchange (`psk_dhe_ke`), so
//! traffic keeps forward secrecy; what the secret protects is the resumption secret in
//! each ticket, as the certificate key protects full handshakes.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;

use super::TlsError;

/// How long one ticket key is used to seal tickets, in seconds.
const PERIOD_SECS: u64 = 12 * 3600;
/// Salt of the key derivation, naming what the keys are for.
const SALT: &[u8] = b"hub tls session tickets v1";
/// The shortest secret accepted, in bytes (the generated one is 32 random bytes in hex).
const MIN_SECRET: usize = 32;
/// Bytes before the sealed part: the period (8, big-endian) and the nonce.
const HEADER: usize = 8 + NONCE_LEN;

/// Seals and opens session tickets under period keys derived from one secret.
pub struct Tickets {
    secret: hkdf::Prk,
    random: SystemRandom,
}

impl std::fmt::Debug for Tickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tickets")
    }
}

impl Tickets {
    /// Tickets under `secret` (at least 16 bytes of key material).
    pub fn new(secret: &[u8]) -> Tickets {
        Tickets {
            secret: hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(secret),
            random: SystemRandom::new(),
        }
    }

    /// Tickets under the secret in `path` (its bytes, surrounding whitespace ignored).
    ///
    /// # Errors
    /// The file cannot be read or holds fewer than 32 bytes.
    pub fn from_file(path: &Path) -> Result<Tickets, TlsError> {
        let error = |detail: String| TlsError::TicketKey {
            path: path.display().to_string(),
            detail,
        };
        let bytes = std::fs::read(path).map_err(|e| error(e.to_string()))?;
        let secret = bytes.trim_ascii();
        if secret.len() < MIN_SECRET {
            return Err(error(format!(
                "{} bytes; at least {MIN_SECRET} are needed (e.g. `openssl rand -hex 32`)",
                secret.len()
            )));
        }
        Ok(Tickets::new(secret))
    }

    /// The sealing key of `period`.
    fn key(&self, period: u64) -> Option<LessSafeKey> {
        let info = period.to_be_bytes();
        let info = [info.as_slice()];
        let okm = self.secret.expand(&info, &CHACHA20_POLY1305).ok()?;
        Some(LessSafeKey::new(UnboundKey::from(okm)))
    }

    /// Seals `plain` as a ticket of `period`.
    fn seal(&self, period: u64, plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random.fill(&mut nonce).ok()?;
        let key = self.key(period)?;
        let mut ticket = Vec::with_capacity(HEADER + plain.len() + CHACHA20_POLY1305.tag_len());
        ticket.extend_from_slice(&period.to_be_bytes());
        ticket.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        let aad = period.to_be_bytes();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut body,
        )
        .ok()?;
        ticket.extend_from_slice(&body);
        Some(ticket)
    }

    /// Opens a ticket sealed in `now_period` or the period before; `None` for anything
    /// else (older, from the future, damaged, or not ours).
    fn open(&self, now_period: u64, ticket: &[u8]) -> Option<Vec<u8>> {
        let (period, rest) = ticket.split_first_chunk::<8>()?;
        let period = u64::from_be_bytes(*period);
        if period != now_period && period.checked_add(1) != Some(now_period) {
            return None;
        }
        let (nonce, sealed) = rest.split_first_chunk::<NONCE_LEN>()?;
        let key = self.key(period)?;
        let mut body = sealed.to_vec();
        let plain = key
            .open_in_place(
                Nonce::assume_unique_for_key(*nonce),
                Aad::from(period.to_be_bytes()),
                &mut body,
            )
            .ok()?;
        let len = plain.len();
        body.truncate(len);
        Some(body)
    }
}

/// The current period number.
fn current_period() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / PERIOD_SECS)
}

impl ProducesTickets for Tickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        // A device may keep a ticket as long as some key still opens it: sealed at the
        // very start of a period, that is two periods.
        (PERIOD_SECS * 2) as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal(current_period(), plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open(current_period(), cipher)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_opens_in_its_period_and_the_next_only() {
        let tickets = Tickets::new(&[7u8; 32]);
        let ticket = tickets.seal(100, b"session state").expect("seal");
        assert_eq!(
            tickets.open(100, &ticket).as_deref(),
            Some(&b"session state"[..])
        );
        assert_eq!(
            tickets.open(101, &ticket).as_deref(),
            Some(&b"session state"[..])
        );
        assert_eq!(
            tickets.open(102, &ticket),
            None,
            "two periods later the key is gone"
        );
        assert_eq!(tickets.open(99, &ticket), None, "a ticket from the future");
    }

    #[test]
    fn another_secret_or_a_damaged_ticket_opens_nothing() {
        let tickets = Tickets::new(&[7u8; 32]);
        let ticket = tickets.seal(5, b"state").expect("seal");
        assert_eq!(Tickets::new(&[8u8; 32]).open(5, &ticket), None);
        for i in 0..ticket.len() {
            let mut damaged = ticket.clone();
            damaged[i] ^= 1;
            assert_eq!(tickets.open(5, &damaged), None, "byte {i} flipped");
        }
        for len in 0..ticket.len() {
            assert_eq!(tickets.open(5, &ticket[..len]), None, "cut to {len} bytes");
        }
    }

    #[test]
    fn the_same_secret_opens_tickets_of_an_earlier_process() {
        // What a restarted hub does: a new value from the same secret file.
        let ticket = Tickets::new(b"0123456789abcdef0123456789abcdef")
            .encrypt(b"state")
            .expect("seal");
        let restarted = Tickets::new(b"0123456789abcdef0123456789abcdef");
        assert_eq!(restarted.decrypt(&ticket).as_deref(), Some(&b"state"[..]));
    }
}

//! The crate's one pseudo-random generator: WebSocket masking keys on a board, and the
//! host simulator's board RNG (backoff jitter, sensor noise, per-device seeds).
//!
//! The board's real RNG (a hardware TRNG on most microcontrollers) seeds one of these per
//! connection, so the WebSocket layer can own its generator while the client keeps the
//! board's RNG for backoff jitter. Masking keys only need to be unpredictable to
//! intermediaries, not cryptographically strong; TLS protects the content. The simulator,
//! which has no TRNG, seeds one from OS entropy per device and draws each boot's seeds
//! from it.

use rand_core::{impls, Error, RngCore};

/// xorshift64*, seeded from the board's RNG (or, in the simulator, OS entropy). Not for
/// cryptography.
#[derive(Debug, Clone)]
pub struct MaskRng(u64);

impl MaskRng {
    /// A generator seeded with `seed` (zero is replaced, xorshift cannot leave zero).
    pub fn new(seed: u64) -> MaskRng {
        MaskRng(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }
}

impl RngCore for MaskRng {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        impls::fill_bytes_via_next(self, dest)
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_seed_still_moves() {
        let mut r = MaskRng::new(0);
        let a = r.next_u64();
        let b = r.next_u64();
        assert_ne!(a, b);
        assert_ne!(a, 0);
    }
}

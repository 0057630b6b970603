//! The persistent storage a board gives the client: a byte-addressed region that holds the
//! unacknowledged-telemetry ring (and with it the next sequence number).
//!
//! [`Flash`] is deliberately small: read, write, and a `sync` that marks the end of one
//! complete ring update. Boards whose HAL implements `embedded_storage::Storage` wrap it in
//! [`StorageFlash`]; boards without persistent storage use [`RamFlash`] over a static
//! buffer (the ring then survives reconnects but not resets).

/// A persistent byte region. Offsets are relative to the start of the region.
///
/// Writes may be buffered; [`Flash::sync`] is called after every complete update of the
/// ring (a batch appended, batches acknowledged, a renumbering), and everything written
/// before it must survive a reset once it returns.
pub trait Flash {
    /// Why an access failed.
    type Error: core::fmt::Debug;

    /// Size of the region in bytes.
    fn capacity(&self) -> usize;

    /// Reads `buf.len()` bytes at `offset`.
    ///
    /// # Errors
    /// The hardware failed, or the range is outside the region.
    fn read(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), Self::Error>;

    /// Writes `data` at `offset`.
    ///
    /// # Errors
    /// The hardware failed, or the range is outside the region.
    fn write(&mut self, offset: u32, data: &[u8]) -> Result<(), Self::Error>;

    /// Makes every write so far durable. Write-through storage does nothing (the default).
    ///
    /// # Errors
    /// The data could not be made durable.
    fn sync(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

/// An access outside a [`RamFlash`] region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("flash access of {len} bytes at offset {offset} is outside the {capacity}-byte region")]
pub struct OutOfBounds {
    /// Requested offset.
    pub offset: u32,
    /// Requested length.
    pub len: usize,
    /// Region size.
    pub capacity: usize,
}

/// A region in RAM: a `[u8; N]`, a `&mut [u8]`, or (on a host) a `Vec<u8>`.
///
/// It counts completed updates ([`RamFlash::generation`]) so that a host can tell when to
/// copy the bytes to real storage.
#[derive(Debug, Clone)]
pub struct RamFlash<B> {
    bytes: B,
    generation: u64,
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> RamFlash<B> {
    /// A region over `bytes`. Their current contents are the region's contents: zeroes or
    /// `0xFF` read as blank, a previous image's bytes as that state.
    pub fn new(bytes: B) -> RamFlash<B> {
        RamFlash {
            bytes,
            generation: 0,
        }
    }

    /// The region's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.bytes.as_ref()
    }

    /// How many updates have completed ([`Flash::sync`] calls) since creation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The underlying buffer.
    pub fn into_inner(self) -> B {
        self.bytes
    }

    fn range(&self, offset: u32, len: usize) -> Result<core::ops::Range<usize>, OutOfBounds> {
        let capacity = self.bytes.as_ref().len();
        let start = offset as usize;
        match start.checked_add(len) {
            Some(end) if end <= capacity => Ok(start..end),
            _ => Err(OutOfBounds {
                offset,
                len,
                capacity,
            }),
        }
    }
}

impl<B: AsRef<[u8]> + AsMut<[u8]>> Flash for RamFlash<B> {
    type Error = OutOfBounds;

    fn capacity(&self) -> usize {
        self.bytes.as_ref().len()
    }

    fn read(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), OutOfBounds> {
        let range = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.bytes.as_ref()[range]);
        Ok(())
    }

    fn write(&mut self, offset: u32, data: &[u8]) -> Result<(), OutOfBounds> {
        let range = self.range(offset, data.len())?;
        self.bytes.as_mut()[range].copy_from_slice(data);
        Ok(())
    }

    fn sync(&mut self) -> Result<(), OutOfBounds> {
        self.generation = self.generation.wrapping_add(1);
        Ok(())
    }
}

/// Adapts any `embedded_storage::Storage` (EEPROM, RAM-backed NOR emulation, or a
/// `RmwNorFlashStorage` over a HAL's `NorFlash`) to [`Flash`]. Its writes are treated as
/// write-through, so `sync` does nothing.
#[derive(Debug)]
pub struct StorageFlash<S>(pub S);

impl<S> Flash for StorageFlash<S>
where
    S: embedded_storage::Storage,
    S::Error: core::fmt::Debug,
{
    type Error = S::Error;

    fn capacity(&self) -> usize {
        self.0.capacity()
    }

    fn read(&mut self, offset: u32, buf: &mut [u8]) -> Result<(), S::Error> {
        self.0.read(offset, buf)
    }

    fn write(&mut self, offset: u32, data: &[u8]) -> Result<(), S::Error> {
        self.0.write(offset, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_flash_bounds() {
        let mut f = RamFlash::new([0u8; 8]);
        f.write(4, &[1, 2, 3, 4]).expect("in bounds");
        let mut buf = [0u8; 2];
        f.read(5, &mut buf).expect("in bounds");
        assert_eq!(buf, [2, 3]);
        assert!(f.write(6, &[0; 3]).is_err());
        assert!(f.read(u32::MAX, &mut buf).is_err());
        f.sync().expect("sync");
        assert_eq!(f.generation(), 1);
    }
}

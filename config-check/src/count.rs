//! Whole numbers within bounds (queue lengths, limits). Use the functions with
//! `#[serde(deserialize_with)]`: `within::<_, 1, 64>`.

use std::fmt;

use serde::de::{self, Deserializer, Unexpected, Visitor};

/// A whole number of at least `MIN`.
///
/// # Errors
/// The value is not a whole number, or a smaller one.
pub fn at_least<'de, D: Deserializer<'de>, const MIN: u64>(
    deserializer: D,
) -> Result<usize, D::Error> {
    deserializer.deserialize_u64(Bounded {
        min: MIN,
        max: usize::MAX as u64,
    })
}

/// A whole number from `MIN` to `MAX`.
///
/// # Errors
/// The value is not a whole number, or one outside the bounds.
pub fn within<'de, D: Deserializer<'de>, const MIN: u64, const MAX: u64>(
    deserializer: D,
) -> Result<usize, D::Error> {
    deserializer.deserialize_u64(Bounded { min: MIN, max: MAX })
}

/// Reads a whole number within bounds.
struct Bounded {
    min: u64,
    max: u64,
}

impl Visitor<'_> for Bounded {
    type Value = usize;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.max >= usize::MAX as u64 {
            write!(f, "a whole number of at least {}", self.min)
        } else {
            write!(f, "a whole number from {} to {}", self.min, self.max)
        }
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<usize, E> {
        match usize::try_from(n) {
            Ok(fits) if (self.min..=self.max).contains(&n) => Ok(fits),
            _ => Err(E::invalid_value(Unexpected::Unsigned(n), &self)),
        }
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<usize, E> {
        match u64::try_from(n) {
            Ok(n) => self.visit_u64(n),
            Err(_) => Err(E::invalid_value(Unexpected::Signed(n), &self)),
        }
    }
}

//! The one size syntax of the hub's and the agent's configuration: a number of bytes, or a
//! whole number with a unit: `KiB`, `MiB`, `GiB` (`K`, `M`, `G` for short), `KB`, `MB`,
//! `GB` (powers of ten) or `B`, as in `512KiB` or `1GiB`. Use the functions with
//! `#[serde(deserialize_with)]`.

use std::fmt;

use serde::de::{self, Deserializer, Unexpected, Visitor};

/// The accepted syntax, as messages name it.
pub const SYNTAX: &str = "a size like \"512KiB\", \"64MiB\", \"1GiB\" or a number of bytes";

/// Parses a size in the configuration syntax (spaces allowed around and before the unit).
pub fn parse(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number.parse().ok()?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "k" => 1 << 10,
        "MiB" | "M" => 1 << 20,
        "GiB" | "G" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(multiplier)
}

/// A size as messages show it: `64KiB`, or a number of bytes.
pub fn show(bytes: u64) -> String {
    for (unit, size) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if bytes >= size && bytes % size == 0 {
            return format!("{}{unit}", bytes / size);
        }
    }
    format!("{bytes} bytes")
}

/// Any size, in bytes.
///
/// # Errors
/// The value is not a size in the configuration syntax.
pub fn any<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    deserializer.deserialize_any(AtLeast(0))
}

/// A size of at least `MIN` bytes.
///
/// # Errors
/// The value is not a size, or a smaller one.
pub fn at_least<'de, D: Deserializer<'de>, const MIN: u64>(
    deserializer: D,
) -> Result<u64, D::Error> {
    deserializer.deserialize_any(AtLeast(MIN))
}

/// Reads a size of at least this many bytes.
struct AtLeast(u64);

/// The syntax, as what a wrongly typed value was expected to be.
struct Syntax;

impl de::Expected for Syntax {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(SYNTAX)
    }
}

impl AtLeast {
    fn check<E: de::Error>(self, n: u64, shown: Unexpected<'_>) -> Result<u64, E> {
        if n < self.0 {
            Err(E::invalid_value(shown, &self))
        } else {
            Ok(n)
        }
    }
}

impl Visitor<'_> for AtLeast {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => f.write_str(SYNTAX),
            min => write!(f, "a size of at least {}", show(min)),
        }
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<u64, E> {
        self.check(n, Unexpected::Unsigned(n))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<u64, E> {
        match u64::try_from(n) {
            Ok(n) => self.check(n, Unexpected::Unsigned(n)),
            Err(_) => Err(E::invalid_value(Unexpected::Signed(n), &Syntax)),
        }
    }

    fn visit_f64<E: de::Error>(self, x: f64) -> Result<u64, E> {
        Err(E::invalid_type(Unexpected::Float(x), &Syntax))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<u64, E> {
        match parse(text) {
            Some(n) => self.check(n, Unexpected::Str(text)),
            None => Err(E::invalid_value(Unexpected::Str(text), &Syntax)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse("1024"), Some(1024));
        assert_eq!(parse("64MiB"), Some(64 << 20));
        assert_eq!(parse("2 GiB"), Some(2 << 30));
        assert_eq!(parse("5MB"), Some(5_000_000));
        assert_eq!(parse("lots"), None);
        assert_eq!(parse("5XB"), None);
        assert_eq!(parse("-5"), None);
        assert_eq!(parse("99999999999GiB"), None, "overflow");
        assert_eq!(show(64 << 10), "64KiB");
        assert_eq!(show(1 << 30), "1GiB");
        assert_eq!(show(1000), "1000 bytes");
    }
}

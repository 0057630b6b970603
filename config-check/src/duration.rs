//! The one duration syntax of the hub's and the agent's configuration: humantime, as in
//! `30s`, `500ms`, `1h30m` or `30d`. Use the functions with `#[serde(deserialize_with)]`;
//! bounds are in milliseconds, so `within::<_, 100, 3_600_000>` is 100 ms to 1 h.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Unexpected, Visitor};

/// The accepted syntax, as messages name it.
pub const SYNTAX: &str = "a duration like \"30s\", \"500ms\" or \"1h30m\"";

/// Parses a duration in the configuration syntax (surrounding spaces allowed).
pub fn parse(text: &str) -> Option<Duration> {
    humantime::parse_duration(text.trim()).ok()
}

/// Any duration.
///
/// # Errors
/// The value is not a duration in the configuration syntax.
pub fn any<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    deserializer.deserialize_str(Bounded {
        min: Duration::ZERO,
        max: Duration::MAX,
    })
}

/// A duration of at least `MIN_MS` milliseconds.
///
/// # Errors
/// The value is not a duration, or a shorter one.
pub fn at_least<'de, D: Deserializer<'de>, const MIN_MS: u64>(
    deserializer: D,
) -> Result<Duration, D::Error> {
    deserializer.deserialize_str(Bounded {
        min: Duration::from_millis(MIN_MS),
        max: Duration::MAX,
    })
}

/// A duration from `MIN_MS` to `MAX_MS` milliseconds.
///
/// # Errors
/// The value is not a duration, or one outside the bounds.
pub fn within<'de, D: Deserializer<'de>, const MIN_MS: u64, const MAX_MS: u64>(
    deserializer: D,
) -> Result<Duration, D::Error> {
    deserializer.deserialize_str(Bounded {
        min: Duration::from_millis(MIN_MS),
        max: Duration::from_millis(MAX_MS),
    })
}

/// [`within`] for an optional key (with `#[serde(default)]`).
///
/// # Errors
/// As [`within`].
pub fn optional_within<'de, D: Deserializer<'de>, const MIN_MS: u64, const MAX_MS: u64>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    within::<D, MIN_MS, MAX_MS>(deserializer).map(Some)
}

/// Reads a duration within bounds.
struct Bounded {
    min: Duration,
    max: Duration,
}

/// The syntax, as what a wrongly typed value was expected to be.
struct Syntax;

impl de::Expected for Syntax {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(SYNTAX)
    }
}

impl Visitor<'_> for Bounded {
    type Value = Duration;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let show = |d: Duration| humantime::format_duration(d).to_string();
        match (self.min.is_zero(), self.max == Duration::MAX) {
            (true, true) => f.write_str(SYNTAX),
            (false, true) => write!(f, "a duration of at least {}", show(self.min)),
            _ => write!(
                f,
                "a duration from {} to {}",
                show(self.min),
                show(self.max)
            ),
        }
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Duration, E> {
        match parse(text) {
            None => Err(E::invalid_value(Unexpected::Str(text), &Syntax)),
            Some(d) if d < self.min || d > self.max => {
                Err(E::invalid_value(Unexpected::Str(text), &self))
            }
            Some(d) => Ok(d),
        }
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<Duration, E> {
        Err(E::invalid_type(Unexpected::Unsigned(n), &Syntax))
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<Duration, E> {
        Err(E::invalid_type(Unexpected::Signed(n), &Syntax))
    }
}

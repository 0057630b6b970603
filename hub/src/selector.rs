//! Which devices an operation is about: the selector grammar that `hub devices`, bulk
//! commands (jobs), desired-state changes and the admin API share.
//!
//! A selector is a comma-separated list of terms, all of which must match:
//!
//! - `KEY=VALUE`: the device has tag `KEY` with exactly that value;
//! - `online`, `offline`, `never-connected`: its presence (`offline` includes devices that
//!   never connected);
//! - `all`: every device (the same as an empty selector).
//!
//! For example `site=b,hw=rev2,online`. Tag keys use the metric-name alphabet, so a term
//! with `=` can never be mistaken for a presence word.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use schemas::limits::is_valid_name;

use crate::store::meta::DeviceRecord;

/// Longest tag key, in bytes.
pub const MAX_TAG_KEY_LEN: usize = 32;
/// Longest tag value, in bytes.
pub const MAX_TAG_VALUE_LEN: usize = 64;
/// Most tags per device.
pub const MAX_TAGS: usize = 32;

/// Presence a selector asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceFilter {
    /// Connected now.
    Online,
    /// Not connected now (including never).
    Offline,
    /// Registered, and never connected.
    NeverConnected,
}

/// A parsed selector. See the module documentation for the grammar.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    tags: BTreeMap<String, String>,
    presence: Option<PresenceFilter>,
}

/// Why a selector or a tag does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// A term is neither `KEY=VALUE` nor a presence word.
    #[error(
        "`{0}` is not a selector term (use KEY=VALUE, online, offline, never-connected or all)"
    )]
    UnknownTerm(String),
    /// A tag key outside the name alphabet or too long.
    #[error("tag key `{0}` must be 1 to {MAX_TAG_KEY_LEN} characters of [A-Za-z0-9_.:/-]")]
    BadKey(String),
    /// A tag value that is empty, too long or has control characters.
    #[error("tag value `{0}` must be 1 to {MAX_TAG_VALUE_LEN} bytes without control characters")]
    BadValue(String),
    /// Two presence words.
    #[error("a selector takes one of online, offline, never-connected")]
    TwoPresences,
    /// The same tag key twice with different values.
    #[error("tag `{0}` is asked for twice")]
    TwoValues(String),
}

/// Checks a tag key.
///
/// # Errors
/// [`SelectorError::BadKey`].
pub fn check_tag_key(key: &str) -> Result<(), SelectorError> {
    if is_valid_name(key, MAX_TAG_KEY_LEN) {
        Ok(())
    } else {
        Err(SelectorError::BadKey(key.chars().take(64).collect()))
    }
}

/// Checks a tag value.
///
/// # Errors
/// [`SelectorError::BadValue`].
pub fn check_tag_value(value: &str) -> Result<(), SelectorError> {
    if !value.is_empty() && value.len() <= MAX_TAG_VALUE_LEN && !value.chars().any(char::is_control)
    {
        Ok(())
    } else {
        Err(SelectorError::BadValue(value.chars().take(80).collect()))
    }
}

/// Parses `KEY=VALUE` into a checked tag.
///
/// # Errors
/// No `=`, or a bad key or value.
pub fn parse_tag(text: &str) -> Result<(String, String), SelectorError> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| SelectorError::UnknownTerm(text.chars().take(80).collect()))?;
    let (key, value) = (key.trim(), value.trim());
    check_tag_key(key)?;
    check_tag_value(value)?;
    Ok((key.to_string(), value.to_string()))
}

impl Selector {
    /// The selector that matches every device.
    pub fn all() -> Selector {
        Selector::default()
    }

    /// Adds a tag condition.
    ///
    /// # Errors
    /// The same key already asked for with another value.
    pub fn with_tag(mut self, key: String, value: String) -> Result<Selector, SelectorError> {
        match self.tags.get(&key) {
            Some(existing) if existing != &value => Err(SelectorError::TwoValues(key)),
            _ => {
                self.tags.insert(key, value);
                Ok(self)
            }
        }
    }

    /// Adds a presence condition.
    ///
    /// # Errors
    /// Another presence condition is already there.
    pub fn with_presence(mut self, presence: PresenceFilter) -> Result<Selector, SelectorError> {
        match self.presence {
            Some(p) if p != presence => Err(SelectorError::TwoPresences),
            _ => {
                self.presence = Some(presence);
                Ok(self)
            }
        }
    }

    /// Whether it matches every device.
    pub fn is_all(&self) -> bool {
        self.tags.is_empty() && self.presence.is_none()
    }

    /// Whether a device matches, given whether it is connected now (the record's own
    /// `online` may lag behind live presence).
    pub fn matches(&self, record: &DeviceRecord, online: bool) -> bool {
        let presence_ok = match self.presence {
            None => true,
            Some(PresenceFilter::Online) => online,
            Some(PresenceFilter::Offline) => !online,
            Some(PresenceFilter::NeverConnected) => !online && record.first_seen == 0,
        };
        presence_ok
            && self
                .tags
                .iter()
                .all(|(k, v)| record.tags.get(k).is_some_and(|have| have == v))
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(text: &str) -> Result<Selector, SelectorError> {
        let mut selector = Selector::all();
        for term in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            selector = match term {
                "all" => selector,
                "online" => selector.with_presence(PresenceFilter::Online)?,
                "offline" => selector.with_presence(PresenceFilter::Offline)?,
                "never-connected" => selector.with_presence(PresenceFilter::NeverConnected)?,
                _ => {
                    let (key, value) = parse_tag(term)?;
                    selector.with_tag(key, value)?
                }
            };
        }
        Ok(selector)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut terms: Vec<String> = self.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        if let Some(p) = self.presence {
            terms.push(
                match p {
                    PresenceFilter::Online => "online",
                    PresenceFilter::Offline => "offline",
                    PresenceFilter::NeverConnected => "never-connected",
                }
                .to_string(),
            );
        }
        if terms.is_empty() {
            f.write_str("all")
        } else {
            f.write_str(&terms.join(","))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(tags: &[(&str, &str)], first_seen: u64) -> DeviceRecord {
        DeviceRecord {
            id: "d".into(),
            first_seen,
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..DeviceRecord::default()
        }
    }

    #[test]
    fn terms_must_all_match() {
        let s: Selector = "site=b, hw=rev2 ,online".parse().expect("parse");
        assert_eq!(s.to_string(), "hw=rev2,site=b,online");
        assert!(s.matches(
            &record(&[("site", "b"), ("hw", "rev2"), ("x", "y")], 1),
            true
        ));
        assert!(!s.matches(&record(&[("site", "b"), ("hw", "rev2")], 1), false));
        assert!(!s.matches(&record(&[("site", "a"), ("hw", "rev2")], 1), true));
        assert!(!s.matches(&record(&[("site", "b")], 1), true));
        let never: Selector = "never-connected".parse().expect("parse");
        assert!(never.matches(&record(&[], 0), false));
        assert!(!never.matches(&record(&[], 5), false));
        let offline: Selector = "offline".parse().expect("parse");
        assert!(offline.matches(&record(&[], 0), false));
        let all: Selector = "".parse().expect("parse");
        assert!(all.is_all() && all.matches(&record(&[], 0), false));
        assert_eq!(all.to_string(), "all");
        assert_eq!("all".parse::<Selector>(), Ok(Selector::all()));
    }

    #[test]
    fn bad_selectors_say_why() {
        assert!(matches!(
            "online,offline".parse::<Selector>(),
            Err(SelectorError::TwoPresences)
        ));
        assert!(matches!(
            "site=a,site=b".parse::<Selector>(),
            Err(SelectorError::TwoValues(_))
        ));
        assert!(matches!(
            "bogus".parse::<Selector>(),
            Err(SelectorError::UnknownTerm(_))
        ));
        assert!(matches!(
            "bad key=x".parse::<Selector>(),
            Err(SelectorError::BadKey(_))
        ));
        assert!(matches!(
            "k=".parse::<Selector>(),
            Err(SelectorError::BadValue(_))
        ));
    }
}

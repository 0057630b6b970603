//! Desired and reported state of a device (its twin): what operators want it to be, what
//! it says it is, their versions, and the delta between them. The rules (limits, how a
//! patch applies, what the delta is) live here, whichever store keeps the documents.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use schemas::limits::{is_valid_name, MAX_PROPERTY_KEY_LEN, MAX_PROPERTY_VALUE_LEN};
use schemas::Applied;

/// Largest desired document, serialized, in bytes.
pub const MAX_DESIRED_BYTES: usize = 8 * 1024;
/// Most keys in the desired document.
pub const MAX_DESIRED_KEYS: usize = 64;

/// A device's twin.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Twin {
    /// What operators want, a flat JSON object (`"interval": 2`, `"sensors.cpu.interval":
    /// "5s"`).
    pub desired: Map<String, Value>,
    /// Rises by one with every change of `desired`.
    pub desired_version: u64,
    /// What the device reports (values it applied, and properties it reports on its own).
    pub reported: Map<String, Value>,
    /// The desired version the device last said it applied (0: never).
    pub reported_version: u64,
    /// Desired keys the device refused, with its reason.
    pub refused: Map<String, Value>,
}

impl Twin {
    /// Desired keys whose value differs from the reported one (a desired `null` differs
    /// from any reported value: the device should drop the key).
    pub fn delta(&self) -> Map<String, Value> {
        self.desired
            .iter()
            .filter(|(k, v)| match (self.reported.get(*k), v) {
                (None, Value::Null) => false,
                (Some(have), want) => have != *want,
                (None, _) => true,
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// The delta without the keys the device refused (sending those again would only be
    /// refused again; a new desired value for a key clears its refusal).
    pub fn pending(&self) -> Map<String, Value> {
        self.delta()
            .into_iter()
            .filter(|(k, _)| !self.refused.contains_key(k))
            .collect()
    }

    /// Whether a report of these keys left one of them different from what is desired (the
    /// device applied a value that desired state had already moved on from): then the hub
    /// sends the delta again. Keys the report did not mention do not count, so a device that
    /// cannot answer for every key is not asked again and again.
    pub fn reported_stale(&self, keys: &[(String, Value)]) -> bool {
        keys.iter().any(|(k, _)| {
            self.desired.get(k).is_some_and(|want| {
                self.reported.get(k) != Some(want) && !self.refused.contains_key(k)
            })
        })
    }

    /// Whether the device should hear from the hub: something it can apply differs, or it
    /// has not acknowledged the current version.
    pub fn needs_sync(&self) -> bool {
        self.desired_version > self.reported_version || !self.pending().is_empty()
    }

    /// What a `desired` message to the device carries (key, value as JSON text), or `None`
    /// when there is nothing to say. With `full` (right after `welcome`) it is the whole
    /// document, so a device that lost its settings gets them all again (sent whenever
    /// desired state was ever set); otherwise the delta, when the device needs to hear it.
    pub fn outgoing(&self, full: bool) -> Option<Vec<(String, String)>> {
        let (keys, send) = if full {
            (
                self.desired.clone(),
                self.desired_version > 0 || !self.desired.is_empty(),
            )
        } else {
            (self.delta(), self.needs_sync())
        };
        send.then(|| keys.into_iter().map(|(k, v)| (k, v.to_string())).collect())
    }

    /// Applies an operator's patch to `desired` (a `null` value deletes the key) and raises
    /// the version, if anything changed. Returns whether it did.
    ///
    /// # Errors
    /// A bad key or value, or a document over its limits; the twin is then unchanged.
    pub fn patch_desired(&mut self, patch: &Map<String, Value>) -> Result<bool, TwinError> {
        let mut desired = self.desired.clone();
        for (key, value) in patch {
            check_key(key)?;
            if value.is_null() {
                // A deleted key is sent as `null`, so the device drops it too: it stays as
                // null until the device reports it gone. That holds even when the device has
                // not reported the key yet: the value may be on its way to it.
                if self.desired.contains_key(key) || self.reported.contains_key(key) {
                    desired.insert(key.clone(), Value::Null);
                } else {
                    desired.remove(key);
                }
            } else {
                check_value(key, value)?;
                desired.insert(key.clone(), value.clone());
            }
        }
        if desired.len() > MAX_DESIRED_KEYS {
            return Err(TwinError::TooManyKeys);
        }
        if Value::Object(desired.clone()).to_string().len() > MAX_DESIRED_BYTES {
            return Err(TwinError::TooBig);
        }
        if desired == self.desired {
            return Ok(false);
        }
        for key in patch.keys() {
            self.refused.remove(key);
        }
        self.desired = desired;
        self.desired_version += 1;
        Ok(true)
    }

    /// Records what the device applied for `version`: values (`null` removes the key from
    /// `reported`), refusals, and the version.
    pub fn apply_report(
        &mut self,
        version: u64,
        applied: &[(String, Value)],
        refused: &[(String, String)],
    ) {
        for (key, value) in applied {
            self.refused.remove(key);
            if value.is_null() {
                self.reported.remove(key);
                if self.desired.get(key).is_some_and(Value::is_null) {
                    self.desired.remove(key);
                }
            } else {
                self.reported.insert(key.clone(), value.clone());
            }
        }
        for (key, reason) in refused {
            self.refused
                .insert(key.clone(), Value::String(reason.clone()));
        }
        // A device can only acknowledge versions the hub has sent.
        self.reported_version = self.reported_version.max(version.min(self.desired_version));
    }
}

/// The values of a device's `applied` answer: each is JSON text; one that is not JSON is
/// kept as the text.
pub fn applied_values(applied: &Applied) -> Vec<(String, Value)> {
    applied
        .properties
        .iter()
        .map(|p| {
            let value = serde_json::from_str(&p.value)
                .unwrap_or_else(|_| Value::String(p.value.to_string()));
            (p.key.to_string(), value)
        })
        .collect()
}

/// The keys a device's `applied` answer refused, with its reasons.
pub fn refusals(applied: &Applied) -> Vec<(String, String)> {
    applied
        .refused
        .iter()
        .map(|p| (p.key.to_string(), p.value.to_string()))
        .collect()
}

/// Why a desired-state change is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TwinError {
    /// A key outside the name alphabet.
    #[error("key `{0}` must be 1 to {MAX_PROPERTY_KEY_LEN} characters of [A-Za-z0-9_.:/-]")]
    BadKey(String),
    /// A value too long for a device to take in one property.
    #[error("the value of `{0}` is longer than {MAX_PROPERTY_VALUE_LEN} bytes as JSON")]
    ValueTooLong(String),
    /// Too many keys.
    #[error("desired state holds at most {MAX_DESIRED_KEYS} keys")]
    TooManyKeys,
    /// The document is too big.
    #[error("desired state is at most {MAX_DESIRED_BYTES} bytes as JSON")]
    TooBig,
}

fn check_key(key: &str) -> Result<(), TwinError> {
    if is_valid_name(key, MAX_PROPERTY_KEY_LEN) {
        Ok(())
    } else {
        Err(TwinError::BadKey(key.chars().take(64).collect()))
    }
}

fn check_value(key: &str, value: &Value) -> Result<(), TwinError> {
    if value.to_string().len() <= MAX_PROPERTY_VALUE_LEN {
        Ok(())
    } else {
        Err(TwinError::ValueTooLong(key.to_string()))
    }
}

/// The outcome of a conditional desired-state change.
#[derive(Debug, Clone, PartialEq)]
pub enum DesiredOutcome {
    /// Applied (or nothing to change); the twin as it is now, and whether it changed.
    Done(Twin, bool),
    /// The twin's desired version is not the one the caller expected.
    Stale(Twin),
    /// The device is not registered.
    Unknown,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn the_delta_is_what_differs_and_versions_follow_changes() {
        let mut t = Twin::default();
        assert!(!t.needs_sync());
        assert_eq!(
            t.patch_desired(&map(json!({"interval": 2, "led": true}))),
            Ok(true)
        );
        assert_eq!(t.desired_version, 1);
        assert_eq!(
            t.patch_desired(&map(json!({"interval": 2}))),
            Ok(false),
            "no change"
        );
        assert_eq!(t.desired_version, 1);
        assert_eq!(t.delta(), map(json!({"interval": 2, "led": true})));
        t.apply_report(
            1,
            &[("interval".into(), json!(2))],
            &[("led".into(), "no led".into())],
        );
        assert_eq!(t.delta(), map(json!({"led": true})));
        assert_eq!(t.reported_version, 1);
        assert_eq!(t.refused, map(json!({"led": "no led"})));
        // Deleting a reported key sends null until the device reports it gone.
        t.patch_desired(&map(json!({"interval": null})))
            .expect("patch");
        assert_eq!(t.delta(), map(json!({"interval": null, "led": true})));
        t.apply_report(2, &[("interval".into(), Value::Null)], &[]);
        assert!(!t.desired.contains_key("interval"));
        assert_eq!(t.reported_version, 2);
        // A device cannot acknowledge a version the hub never had.
        t.apply_report(99, &[], &[]);
        assert_eq!(t.reported_version, 2);
    }

    #[test]
    fn limits_hold() {
        let mut t = Twin::default();
        assert!(matches!(
            t.patch_desired(&map(json!({"bad key": 1}))),
            Err(TwinError::BadKey(_))
        ));
        assert!(matches!(
            t.patch_desired(&map(json!({"k": "x".repeat(100)}))),
            Err(TwinError::ValueTooLong(_))
        ));
        let many: Map<String, Value> = (0..65).map(|i| (format!("k{i}"), json!(i))).collect();
        assert_eq!(t.patch_desired(&many), Err(TwinError::TooManyKeys));
        assert_eq!(t, Twin::default(), "unchanged after a refusal");
    }
}

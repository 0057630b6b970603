//! Configuration checking shared by the hub and the device agent: serde-derived structs
//! read from the merged configuration tree so that one run names every bad key at once,
//! each with its full dotted path, plus the one duration syntax and the one size syntax
//! both programs accept.
//!
//! # How every problem is found in one run
//!
//! The `config` crate merges the layers (built-in defaults, the TOML file, the
//! environment, flags; see [`Layers`]) into one `serde_json::Value` tree. The tree is then
//! deserialized into the program's `#[derive(Deserialize)]` structs by this crate's own
//! deserializer, which
//!
//! - knows the dotted path of every value (`device.ping_interval`, `sensors[0].args[1]`);
//! - reports every key a struct does not declare as unknown, naming the keys it does
//!   declare. The list comes from the types themselves: serde hands the field names of a
//!   derived struct to `deserialize_struct`, so no list of keys is kept by hand (and
//!   `#[serde(deny_unknown_fields)]`, which would stop at the first one, is not used);
//! - accepts the strings environment variables and flags produce where a number or a
//!   boolean is expected (`"1024"`, `"true"`), as a TOML value would be.
//!
//! serde itself stops at the first value that does not fit its type. So [`Findings::read`]
//! runs the deserialization again after each failure: the failing value's path is noted
//! with its problem and *set aside*, and the next run goes on without it, taking the
//! built-in default for that key instead (from the `defaults` tree when one is given,
//! else the field's `#[serde(default)]`). Each run sets aside one more value, so the runs
//! end, and the last one yields a complete struct on which the program's validation pass
//! can still check its cross-field rules. A required field that is missing ends the runs
//! early (serde reports only one of those), which is why both programs give every field a
//! default and check "is required" in their validation pass instead.
//!
//! Single-value rules that belong to a type (a duration's range, a size's minimum) are
//! written on the field with the helpers in [`duration`], [`size`] and [`count`], so their
//! problems carry the key's path like any other type error.

use std::fmt;

mod layers;
mod reader;

pub mod count;
pub mod duration;
pub mod size;

pub use layers::Layers;
pub use serde_json::Value;

/// One problem (or warning) about one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The dotted path of the key (`device.ping_interval`, `sensors[1] (cpu).interval`).
    pub key: String,
    /// What is wrong and what is expected.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// One line per problem, each indented by two spaces, for an error message.
pub fn lines(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The dotted path of `name` inside `prefix` (just `name` at the top level).
pub fn key(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// What a table's keys that its struct does not declare mean.
#[derive(Debug, Clone, Copy, Default)]
pub enum OtherKeys<'a> {
    /// Mistakes: each is reported as an unknown key.
    #[default]
    Unknown,
    /// Keys of another struct read from the same table (a sensor's common keys and its
    /// kind's keys): skipped here, any other key is unknown. Only for the top table read.
    SharedWith(&'a [&'static str]),
    /// Not this read's business: skipped silently. Only for the top table read.
    Ignored,
}

/// How [`Findings::read_with`] reads a tree.
#[derive(Debug, Clone, Copy, Default)]
pub struct Read<'a> {
    /// A tree of the same shape holding the built-in defaults, used for a value that was
    /// set aside (without it, the field's own `#[serde(default)]` applies).
    pub defaults: Option<&'a Value>,
    /// What keys the top table's struct does not declare mean.
    pub other_keys: OtherKeys<'a>,
}

/// The problems and warnings found while reading and validating a configuration.
#[derive(Debug, Clone, Default)]
pub struct Findings {
    /// Things that make the configuration unusable.
    pub problems: Vec<Problem>,
    /// Things that work but are probably not what was meant.
    pub warnings: Vec<Problem>,
}

impl Findings {
    /// Notes a problem with `key`.
    pub fn problem(&mut self, key: impl Into<String>, message: impl fmt::Display) {
        self.problems.push(Problem {
            key: key.into(),
            message: message.to_string(),
        });
    }

    /// Notes a warning about `key`.
    pub fn warn(&mut self, key: impl Into<String>, message: impl fmt::Display) {
        self.warnings.push(Problem {
            key: key.into(),
            message: message.to_string(),
        });
    }

    /// Reads `value`, found at path `at` (empty for the whole configuration), into `T`,
    /// noting every unknown key and every value that does not fit (module documentation).
    /// `None` when no `T` could be built: a required field is missing or the value at `at`
    /// itself does not fit.
    pub fn read<'de, T: serde::Deserialize<'de>>(
        &mut self,
        value: &'de Value,
        at: &str,
    ) -> Option<T> {
        self.read_with(value, at, Read::default())
    }

    /// [`Findings::read`] with built-in defaults or a table shared with another struct.
    pub fn read_with<'de, T: serde::Deserialize<'de>>(
        &mut self,
        value: &'de Value,
        at: &str,
        how: Read<'de>,
    ) -> Option<T> {
        let (read, problems) = reader::read(value, at, how);
        self.problems.extend(problems);
        read
    }
}

/// The keys a derived struct declares (its field names after renames), read from the type
/// itself: serde passes them to `deserialize_struct`. Empty for a type that is not a
/// struct.
pub fn fields_of<'de, T: serde::Deserialize<'de>>() -> &'static [&'static str] {
    reader::fields_of::<T>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::time::Duration;

    #[derive(Debug, Deserialize)]
    #[serde(default)]
    struct Device {
        #[serde(deserialize_with = "duration::within::<_, 50, 3_600_000>")]
        ping_interval: Duration,
        #[serde(deserialize_with = "count::at_least::<_, 1>")]
        max_connections: usize,
        plain_ws: bool,
    }

    impl Default for Device {
        fn default() -> Device {
            Device {
                ping_interval: Duration::from_secs(30),
                max_connections: 100,
                plain_ws: false,
            }
        }
    }

    #[derive(Debug, Deserialize, Default)]
    #[serde(default)]
    struct Storage {
        #[serde(deserialize_with = "size::any")]
        max_bytes: u64,
        names: Vec<String>,
    }

    #[derive(Debug, Deserialize, Default)]
    #[serde(default)]
    struct Top {
        device: Device,
        storage: Storage,
        name: String,
    }

    fn tree(text: &str) -> Value {
        serde_json::from_str(text).expect("json")
    }

    fn keys(findings: &Findings) -> Vec<&str> {
        findings.problems.iter().map(|p| p.key.as_str()).collect()
    }

    #[test]
    fn every_bad_key_in_every_section_is_named_with_its_path() {
        let t = tree(
            r#"{"bogus": 1,
                "device": {"ping_interval": "soon", "max_connections": "lots", "plain_ws": "maybe", "flavour": "x"},
                "storage": {"max_bytes": "lots", "names": ["a", {"b": 1}, "c"], "extra": true}}"#,
        );
        let mut f = Findings::default();
        let top: Top = f.read(&t, "").expect("still built");
        let mut found = keys(&f);
        found.sort();
        assert_eq!(
            found,
            [
                "bogus",
                "device.flavour",
                "device.max_connections",
                "device.ping_interval",
                "device.plain_ws",
                "storage.extra",
                "storage.max_bytes",
                "storage.names[1]",
            ]
        );
        // Set-aside values took their defaults; the others were kept.
        assert_eq!(top.device.ping_interval, Duration::from_secs(30));
        assert_eq!(top.storage.names, ["a", "c"]);
        let all = lines(&f.problems);
        assert!(
            all.contains("device.flavour: unknown key (known here: ping_interval, max_connections, plain_ws)"),
            "{all}"
        );
    }

    #[test]
    fn bad_durations_and_sizes_name_the_key_and_the_syntax() {
        let t =
            tree(r#"{"device": {"ping_interval": "10 parsecs"}, "storage": {"max_bytes": "5XB"}}"#);
        let mut f = Findings::default();
        let _: Option<Top> = f.read(&t, "");
        let all = lines(&f.problems);
        assert!(
            all.contains(&format!(
                "device.ping_interval: expected {}, got \"10 parsecs\"",
                duration::SYNTAX
            )),
            "{all}"
        );
        assert!(
            all.contains(&format!(
                "storage.max_bytes: expected {}, got \"5XB\"",
                size::SYNTAX
            )),
            "{all}"
        );
        let t = tree(r#"{"device": {"ping_interval": "1ms", "max_connections": 0}}"#);
        let mut f = Findings::default();
        let _: Option<Top> = f.read(&t, "");
        let all = lines(&f.problems);
        assert!(
            all.contains("device.ping_interval: expected a duration from 50ms to 1h, got \"1ms\""),
            "{all}"
        );
        assert!(
            all.contains("device.max_connections: expected a whole number of at least 1, got 0"),
            "{all}"
        );
    }

    #[test]
    fn strings_from_the_environment_fit_numbers_and_booleans() {
        let t = tree(
            r#"{"device": {"max_connections": " 12 ", "plain_ws": "true"}, "storage": {"max_bytes": "1MiB"}, "name": 5}"#,
        );
        let mut f = Findings::default();
        let top: Top = f.read(&t, "").expect("valid");
        assert!(f.problems.is_empty(), "{:?}", f.problems);
        assert_eq!(top.device.max_connections, 12);
        assert!(top.device.plain_ws);
        assert_eq!(top.storage.max_bytes, 1 << 20);
        assert_eq!(top.name, "5");
    }

    #[test]
    fn a_set_aside_value_takes_the_default_tree_value() {
        #[derive(Debug, Deserialize)]
        struct Strict {
            #[serde(deserialize_with = "count::at_least::<_, 1>")]
            queue: usize,
        }
        let defaults = tree(r#"{"queue": "64"}"#);
        let mut f = Findings::default();
        let read: Strict = f
            .read_with(
                &tree(r#"{"queue": "zero"}"#),
                "ingest",
                Read {
                    defaults: Some(&defaults),
                    ..Read::default()
                },
            )
            .expect("built from the default");
        assert_eq!(read.queue, 64);
        assert_eq!(keys(&f), ["ingest.queue"]);
        // Without defaults a strict struct cannot be built, and says what is missing.
        let mut f = Findings::default();
        let read: Option<Strict> = f.read(&tree(r#"{"queue": "zero"}"#), "ingest");
        assert!(read.is_none());
        assert_eq!(
            lines(&f.problems),
            "  ingest.queue: expected a whole number of at least 1, got \"zero\""
        );
        let mut f = Findings::default();
        let read: Option<Strict> = f.read(&tree("{}"), "ingest");
        assert!(read.is_none());
        assert_eq!(lines(&f.problems), "  ingest.queue: is required");
    }

    #[test]
    fn a_table_shared_by_two_structs_reports_only_keys_neither_declares() {
        #[derive(Debug, Deserialize, Default)]
        #[serde(default)]
        struct Common {
            name: String,
        }
        #[derive(Debug, Deserialize, Default)]
        #[serde(default)]
        struct Specific {
            path: String,
        }
        let t = tree(r#"{"name": "a", "path": "/x", "colour": "red"}"#);
        let mut f = Findings::default();
        let common: Common = f
            .read_with(
                &t,
                "sensors[0] (a)",
                Read {
                    other_keys: OtherKeys::Ignored,
                    ..Read::default()
                },
            )
            .expect("common");
        let specific: Specific = f
            .read_with(
                &t,
                "sensors[0] (a)",
                Read {
                    other_keys: OtherKeys::SharedWith(fields_of::<Common>()),
                    ..Read::default()
                },
            )
            .expect("specific");
        assert_eq!((common.name.as_str(), specific.path.as_str()), ("a", "/x"));
        assert_eq!(
            lines(&f.problems),
            "  sensors[0] (a).colour: unknown key (known here: path, name)"
        );
    }

    #[test]
    fn enums_name_their_variants() {
        #[derive(Debug, Deserialize, Default)]
        #[serde(rename_all = "lowercase")]
        enum Format {
            #[default]
            Human,
            Json,
        }
        #[derive(Debug, Deserialize, Default)]
        #[serde(default)]
        struct Log {
            format: Format,
        }
        let mut f = Findings::default();
        let log: Log = f.read(&tree(r#"{"format": "xml"}"#), "log").expect("built");
        assert!(matches!(log.format, Format::Human));
        assert_eq!(
            lines(&f.problems),
            "  log.format: expected \"human\" or \"json\", got \"xml\""
        );
        let log: Log = f
            .read(&tree(r#"{"format": " json "}"#), "log")
            .expect("built");
        assert!(matches!(log.format, Format::Json));
    }

    #[test]
    fn a_conversion_failing_after_its_value_was_read_is_named_at_that_value() {
        #[derive(Debug, Deserialize)]
        #[serde(try_from = "String")]
        struct Even(u64);
        impl TryFrom<String> for Even {
            type Error = String;
            fn try_from(text: String) -> Result<Even, String> {
                match text.parse::<u64>() {
                    Ok(n) if n % 2 == 0 => Ok(Even(n)),
                    _ => Err("is not an even number".to_string()),
                }
            }
        }
        #[derive(Debug, Deserialize, Default)]
        #[serde(default)]
        struct Lists {
            evens: Vec<Even>,
        }
        let mut f = Findings::default();
        let lists: Lists = f
            .read(&tree(r#"{"evens": ["2", "3", "4", "odd"]}"#), "x")
            .expect("built");
        assert_eq!(lists.evens.iter().map(|e| e.0).collect::<Vec<_>>(), [2, 4]);
        assert_eq!(
            lines(&f.problems),
            "  x.evens[1]: is not an even number (got \"3\")\n  x.evens[3]: is not an even number (got \"odd\")"
        );
    }

    #[test]
    fn fields_come_from_the_type() {
        assert_eq!(
            fields_of::<Device>(),
            ["ping_interval", "max_connections", "plain_ws"]
        );
        assert!(fields_of::<String>().is_empty());
    }
}

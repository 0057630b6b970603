//! Configured actions: a command name mapped to a program, fixed arguments and argument
//! templates filled from the command's JSON arguments, each checked against an allowlist.
//!
//! # Templates
//!
//! Each entry of an action's `args` becomes exactly one `argv` entry. `{name}` in it is
//! replaced by the value of parameter `name` (`--unit={unit}` is fine); `{{` and `}}` are
//! literal braces. A value is inserted verbatim: it is never split, globbed or otherwise
//! interpreted, because no shell is involved (see [`crate::process`]).
//!
//! # Parameter rules
//!
//! Every parameter used in a template must be declared under `[actions.params.NAME]` with
//! at least one rule; a value must pass **every** rule that is set:
//!
//! - `allow = ["nginx.service", "*.log"]`: the value equals one of the entries, or matches
//!   it as a glob. `*` matches any run of characters and `?` one character, but neither
//!   matches `/`, nor a `.` at the start of the value or right after a `/` (so a wildcard
//!   can never produce `..` or reach a hidden file); `\` makes the next character literal.
//! - `charset = "a-zA-Z0-9._-"`: every character of the value is in the set (ranges
//!   `x-y`; a `-` first or last is literal).
//! - `min` / `max`: the value is a decimal integer in that range.
//! - `any = true`: anything (still subject to the checks below). Say it explicitly.
//!
//! Always, whatever the rules: the value is at most `max_len` bytes (default 256), holds no
//! control characters (newlines, NUL), and does not start with `-` unless
//! `allow_leading_dash = true` (a value like `--output=/etc/passwd` would otherwise be
//! read as an option by most programs). A parameter with a `default` may be omitted.
//! Unknown argument names are refused. JSON strings, numbers and booleans are accepted as
//! values; numbers and booleans are used as their JSON text.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use config_check::{count, duration};
use schemas::limits::MAX_OUTPUT_LEN;
use serde::Deserialize;

use crate::process::{self, Spec};

/// One piece of an argument template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Param(String),
}

/// Why a template (an `args` entry of an action) does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A parameter name holds a character outside `[A-Za-z0-9_-]`.
    #[error("{template:?}: parameter names use [A-Za-z0-9_-], found {found:?} (write {{{{ for a literal brace)")]
    NameCharacter {
        /// The template as written.
        template: String,
        /// The first character that cannot be in a name.
        found: char,
    },
    /// A `{` has no matching `}`.
    #[error("{template:?}: unclosed {{")]
    Unclosed {
        /// The template as written.
        template: String,
    },
    /// `{}` names no parameter.
    #[error("{template:?}: empty parameter name {{}}")]
    EmptyName {
        /// The template as written.
        template: String,
    },
    /// A `}` that closes nothing and is not doubled.
    #[error("{template:?}: lone }} (write }}}} for a literal brace)")]
    LoneClose {
        /// The template as written.
        template: String,
    },
}

/// An argument template, see the module documentation.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Template {
    text: String,
    pieces: Vec<Piece>,
}

impl Template {
    /// Parses a template.
    ///
    /// # Errors
    /// [`TemplateError`]: an unclosed `{`, a lone `}`, or a parameter name outside
    /// `[A-Za-z0-9_-]`.
    pub fn parse(text: &str) -> Result<Template, TemplateError> {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) if c.is_ascii_alphanumeric() || c == '_' || c == '-' => {
                                name.push(c)
                            }
                            Some(found) => {
                                return Err(TemplateError::NameCharacter {
                                    template: text.to_string(),
                                    found,
                                })
                            }
                            None => {
                                return Err(TemplateError::Unclosed {
                                    template: text.to_string(),
                                })
                            }
                        }
                    }
                    if name.is_empty() {
                        return Err(TemplateError::EmptyName {
                            template: text.to_string(),
                        });
                    }
                    if !lit.is_empty() {
                        pieces.push(Piece::Literal(std::mem::take(&mut lit)));
                    }
                    pieces.push(Piece::Param(name));
                }
                '}' => {
                    return Err(TemplateError::LoneClose {
                        template: text.to_string(),
                    })
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            pieces.push(Piece::Literal(lit));
        }
        Ok(Template {
            text: text.to_string(),
            pieces,
        })
    }

    /// The parameter names it uses.
    pub fn params(&self) -> impl Iterator<Item = &str> {
        self.pieces.iter().filter_map(|p| match p {
            Piece::Param(n) => Some(n.as_str()),
            Piece::Literal(_) => None,
        })
    }

    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn render(&self, values: &BTreeMap<String, String>) -> String {
        let mut out = String::new();
        for p in &self.pieces {
            match p {
                Piece::Literal(s) => out.push_str(s),
                Piece::Param(n) => out.push_str(values.get(n).map(String::as_str).unwrap_or("")),
            }
        }
        out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GlobToken {
    Literal(char),
    One,
    Many,
}

/// An allowlist entry: an exact value or a glob (module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "String")]
pub struct Glob {
    text: String,
    tokens: Vec<GlobToken>,
}

impl Glob {
    /// Parses an entry (`\` escapes the next character).
    pub fn parse(text: &str) -> Glob {
        let mut tokens = Vec::new();
        let mut chars = text.chars();
        while let Some(c) = chars.next() {
            tokens.push(match c {
                '\\' => GlobToken::Literal(chars.next().unwrap_or('\\')),
                '*' => GlobToken::Many,
                '?' => GlobToken::One,
                c => GlobToken::Literal(c),
            });
        }
        Glob {
            text: text.to_string(),
            tokens,
        }
    }

    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        let s: Vec<char> = value.chars().collect();
        let p = &self.tokens;
        // A wildcard may take s[j] unless it is '/' or a '.' starting a path component.
        let wild = |j: usize| s[j] != '/' && !(s[j] == '.' && (j == 0 || s[j - 1] == '/'));
        // dp[i][j]: p[i..] matches s[j..]. Values are short (max_len), so O(n·m) is fine
        // and, unlike backtracking, never explodes.
        let (n, m) = (p.len(), s.len());
        let mut dp = vec![vec![false; m + 1]; n + 1];
        dp[n][m] = true;
        for i in (0..n).rev() {
            for j in (0..=m).rev() {
                dp[i][j] = match p[i] {
                    GlobToken::Many => dp[i + 1][j] || (j < m && wild(j) && dp[i][j + 1]),
                    GlobToken::One => j < m && wild(j) && dp[i + 1][j + 1],
                    GlobToken::Literal(c) => j < m && s[j] == c && dp[i + 1][j + 1],
                };
            }
        }
        dp[0][0]
    }
}

/// Why a `charset` does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CharsetError {
    /// A range whose end comes before its start (`z-a`).
    #[error("charset {charset:?}: range {from}-{to} is reversed")]
    Reversed {
        /// The set as written.
        charset: String,
        /// The range's first character.
        from: char,
        /// The range's last character, below `from`.
        to: char,
    },
    /// The set allows no character at all.
    #[error("charset is empty")]
    Empty,
}

/// A set of allowed characters (`charset = "a-z0-9_-"`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Charset {
    text: String,
    ranges: Vec<(char, char)>,
}

impl Charset {
    /// Parses a set.
    ///
    /// # Errors
    /// [`CharsetError`]: an empty set or a reversed range.
    pub fn parse(text: &str) -> Result<Charset, CharsetError> {
        let chars: Vec<char> = text.chars().collect();
        let mut ranges = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if i + 2 < chars.len() && chars[i + 1] == '-' {
                let d = chars[i + 2];
                if d < c {
                    return Err(CharsetError::Reversed {
                        charset: text.to_string(),
                        from: c,
                        to: d,
                    });
                }
                ranges.push((c, d));
                i += 3;
            } else {
                ranges.push((c, c));
                i += 1;
            }
        }
        if ranges.is_empty() {
            return Err(CharsetError::Empty);
        }
        Ok(Charset {
            text: text.to_string(),
            ranges,
        })
    }

    /// Whether every character of `value` is in the set.
    pub fn allows(&self, value: &str) -> bool {
        value
            .chars()
            .all(|c| self.ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi))
    }
}

/// The rules for one parameter (module documentation), as `[actions.params.NAME]` gives
/// them.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ParamRule {
    /// Exact values or globs; empty means "not set".
    pub allow: Vec<Glob>,
    /// Allowed characters.
    pub charset: Option<Charset>,
    /// Smallest integer value.
    pub min: Option<i64>,
    /// Largest integer value.
    pub max: Option<i64>,
    /// Accept anything (subject to the universal checks).
    pub any: bool,
    /// Longest value in bytes (1 to 4096).
    #[serde(deserialize_with = "count::within::<_, 1, 4096>")]
    pub max_len: usize,
    /// Allow values starting with `-`.
    pub allow_leading_dash: bool,
    /// Used when the argument is missing; without it the argument is required.
    pub default: Option<String>,
}

/// Why a parameter value is refused. The text completes a sentence that names the value
/// (`argument "unit" value "sshd" is not allowed (...)`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueRefused {
    /// Longer than the rule's `max_len`.
    #[error("is longer than {max_len} bytes")]
    TooLong {
        /// The limit, in bytes.
        max_len: usize,
    },
    /// Holds a newline, NUL or another control character.
    #[error("contains control characters")]
    ControlCharacters,
    /// Starts with `-` and the rule does not set `allow_leading_dash`.
    #[error("starts with '-' (allow_leading_dash is not set)")]
    LeadingDash,
    /// Matches no entry of `allow`.
    #[error("is not allowed (allowed: {})", .allowed.join(", "))]
    NotAllowed {
        /// The entries, as written.
        allowed: Vec<String>,
    },
    /// Has a character outside `charset`.
    #[error("has characters outside [{charset}]")]
    OutsideCharset {
        /// The set, as written.
        charset: String,
    },
    /// `min` or `max` is set and the value is not a decimal integer.
    #[error("is not a decimal integer")]
    NotInteger,
    /// An integer below `min` or above `max`.
    #[error("is outside {}..={}", bound(*.min), bound(*.max))]
    OutOfRange {
        /// The rule's `min`.
        min: Option<i64>,
        /// The rule's `max`.
        max: Option<i64>,
    },
}

/// A bound of [`ValueRefused::OutOfRange`] as the message shows it (nothing when unset).
fn bound(limit: Option<i64>) -> String {
    limit.map(|m| m.to_string()).unwrap_or_default()
}

/// Default [`ParamRule::max_len`].
pub const DEFAULT_MAX_LEN: usize = 256;

impl Default for ParamRule {
    /// No rule set (so not usable yet) and the default length limit.
    fn default() -> ParamRule {
        ParamRule {
            allow: Vec::new(),
            charset: None,
            min: None,
            max: None,
            any: false,
            max_len: DEFAULT_MAX_LEN,
            allow_leading_dash: false,
            default: None,
        }
    }
}

impl ParamRule {
    /// Whether any rule is set (a parameter without one is a configuration error).
    pub fn has_rule(&self) -> bool {
        !self.allow.is_empty()
            || self.charset.is_some()
            || self.min.is_some()
            || self.max.is_some()
            || self.any
    }

    /// Checks a value.
    ///
    /// # Errors
    /// [`ValueRefused`]: the first rule the value breaks.
    pub fn check(&self, value: &str) -> Result<(), ValueRefused> {
        if value.len() > self.max_len {
            return Err(ValueRefused::TooLong {
                max_len: self.max_len,
            });
        }
        if value.chars().any(char::is_control) {
            return Err(ValueRefused::ControlCharacters);
        }
        if value.starts_with('-') && !self.allow_leading_dash {
            return Err(ValueRefused::LeadingDash);
        }
        if !self.allow.is_empty() && !self.allow.iter().any(|g| g.matches(value)) {
            return Err(ValueRefused::NotAllowed {
                allowed: self.allow.iter().map(|g| g.text.clone()).collect(),
            });
        }
        if let Some(cs) = &self.charset {
            if !cs.allows(value) {
                return Err(ValueRefused::OutsideCharset {
                    charset: cs.text.clone(),
                });
            }
        }
        if self.min.is_some() || self.max.is_some() {
            let n: i64 = value.parse().map_err(|_| ValueRefused::NotInteger)?;
            if self.min.is_some_and(|m| n < m) || self.max.is_some_and(|m| n > m) {
                return Err(ValueRefused::OutOfRange {
                    min: self.min,
                    max: self.max,
                });
            }
        }
        Ok(())
    }
}

/// A configured action, as an `[[actions]]` table gives it (the configuration checks the
/// rules that span keys: a program that exists, declared parameters).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Action {
    /// Command name.
    pub name: String,
    /// Absolute path of the program.
    pub program: PathBuf,
    /// Argument templates, one `argv` entry each.
    pub args: Vec<Template>,
    /// Parameter rules by name.
    pub params: BTreeMap<String, ParamRule>,
    /// Kill the program (and its process group) after this long (100 ms to 1 h).
    #[serde(deserialize_with = "duration::within::<_, 100, 3_600_000>")]
    pub timeout: Duration,
    /// Most bytes of output reported (at most the protocol's 1024).
    #[serde(deserialize_with = "count::within::<_, 1, { MAX_OUTPUT_LEN as u64 }>")]
    pub max_output: usize,
    /// Extra environment variables.
    #[serde(deserialize_with = "crate::config::env_table")]
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub working_dir: Option<PathBuf>,
}

impl Default for Action {
    /// What the keys an `[[actions]]` table leaves out mean.
    fn default() -> Action {
        Action {
            name: String::new(),
            program: PathBuf::new(),
            args: Vec::new(),
            params: BTreeMap::new(),
            timeout: Duration::from_secs(30),
            max_output: MAX_OUTPUT_LEN,
            env: Vec::new(),
            working_dir: None,
        }
    }
}

/// A command's outcome, as it goes into `CommandResult`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Whether it succeeded.
    pub ok: bool,
    /// 0, an exit status, 128 + signal, 124 (timeout), 126/127 (cannot run), or
    /// [`REFUSED`].
    pub code: i32,
    /// Output or the reason.
    pub output: String,
}

/// The code of a command refused before anything ran (unknown, bad arguments, deadline).
pub const REFUSED: i32 = -1;

impl Outcome {
    /// A refusal with its reason.
    pub fn refused(reason: impl Into<String>) -> Outcome {
        Outcome {
            ok: false,
            code: REFUSED,
            output: reason.into(),
        }
    }

    /// Success with this output.
    pub fn ok(output: impl Into<String>) -> Outcome {
        Outcome {
            ok: true,
            code: 0,
            output: output.into(),
        }
    }
}

/// Why a command's JSON argument text cannot be read as parameter values.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    /// The text is not JSON.
    #[error("arguments are not JSON: {source}")]
    NotJson {
        /// What the JSON parser found.
        #[source]
        source: serde_json::Error,
    },
    /// Valid JSON, but not an object.
    #[error("arguments must be a JSON object")]
    NotObject,
    /// A value that is an array, an object or null.
    #[error("argument {name:?} must be a string, number or boolean")]
    ValueType {
        /// The argument's name.
        name: String,
    },
}

/// Parses a command's JSON argument text into parameter values.
///
/// # Errors
/// [`ArgsError`]: not a JSON object, or a value that is not a string, number or boolean.
pub fn parse_args(args: &str) -> Result<BTreeMap<String, String>, ArgsError> {
    let text = args.trim();
    if text.is_empty() {
        return Ok(BTreeMap::new());
    }
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|source| ArgsError::NotJson { source })?;
    let serde_json::Value::Object(map) = value else {
        return Err(ArgsError::NotObject);
    };
    let mut out = BTreeMap::new();
    for (k, v) in map {
        let text = match v {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            _ => return Err(ArgsError::ValueType { name: k }),
        };
        out.insert(k, text);
    }
    Ok(out)
}

/// Why an action refuses a command's arguments (nothing is run).
#[derive(Debug, thiserror::Error)]
pub enum ArgvError {
    /// The argument text is unreadable.
    #[error(transparent)]
    Args(#[from] ArgsError),
    /// An argument the action does not declare.
    #[error("unknown argument {name:?} (this action takes: {})", names_or_none(.known))]
    Unknown {
        /// The argument's name.
        name: String,
        /// The parameters the action declares.
        known: Vec<String>,
    },
    /// A value that breaks its parameter's rules.
    #[error("argument {name:?} value {} {reason}", shown(.value))]
    Refused {
        /// The argument's name.
        name: String,
        /// The value as sent (the message shows at most 64 bytes of it).
        value: String,
        /// The rule it breaks.
        reason: ValueRefused,
    },
    /// A parameter without a default that the command left out.
    #[error("missing argument {name:?}")]
    Missing {
        /// The parameter's name.
        name: String,
    },
}

/// A list of names for a message, or `none`.
fn names_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    }
}

/// A value for a message: quoted, cut to 64 bytes.
fn shown(value: &str) -> String {
    let cut = process::cut(value, 64);
    if cut.len() < value.len() {
        format!("{cut:?}...")
    } else {
        format!("{cut:?}")
    }
}

impl Action {
    /// Checks the arguments and builds the `argv` (without the program).
    ///
    /// # Errors
    /// [`ArgvError`]: why the arguments are refused.
    pub fn argv(&self, args: &str) -> Result<Vec<String>, ArgvError> {
        let mut values = parse_args(args)?;
        if let Some(key) = values.keys().find(|k| !self.params.contains_key(*k)) {
            return Err(ArgvError::Unknown {
                name: key.clone(),
                known: self.params.keys().cloned().collect(),
            });
        }
        for (name, rule) in &self.params {
            match values.get(name) {
                Some(v) => rule.check(v).map_err(|reason| ArgvError::Refused {
                    name: name.clone(),
                    value: v.clone(),
                    reason,
                })?,
                None => match &rule.default {
                    Some(d) => {
                        values.insert(name.clone(), d.clone());
                    }
                    None => return Err(ArgvError::Missing { name: name.clone() }),
                },
            }
        }
        Ok(self.args.iter().map(|t| t.render(&values)).collect())
    }

    /// Runs the action with the command's JSON arguments, for at most `limit` (the
    /// command's deadline) or the action's own timeout, whichever is sooner.
    ///
    /// Cancel safety: safe; the program is killed when the future is dropped.
    pub async fn run(&self, args: &str, limit: Option<Duration>) -> Outcome {
        let argv = match self.argv(args) {
            Ok(a) => a,
            Err(why) => return Outcome::refused(format!("refused: {why}")),
        };
        let timeout = limit.map_or(self.timeout, |l| l.min(self.timeout));
        let spec = Spec {
            program: &self.program,
            args: &argv,
            env: &self.env,
            cwd: self.working_dir.as_deref(),
            timeout,
            max_output: self.max_output,
        };
        match process::run(&spec).await {
            Err(e) => Outcome {
                ok: false,
                code: e.code(),
                output: e.to_string(),
            },
            Ok(out) => {
                let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
                if !out.stderr.is_empty() {
                    text.push_str(&String::from_utf8_lossy(&out.stderr));
                }
                let mut note = String::new();
                if out.exit == process::Exit::TimedOut {
                    let _ = write!(
                        note,
                        "\n[killed after {}]",
                        humantime::format_duration(timeout)
                    );
                } else if out.truncated || text.len() > self.max_output {
                    note.push_str("\n[output truncated]");
                }
                let room = self.max_output.saturating_sub(note.len());
                let mut output = process::cut(&text, room).to_string();
                output.push_str(&note);
                Outcome {
                    ok: out.exit.success(),
                    code: out.exit.code(),
                    output: process::cut(&output, self.max_output).to_string(),
                }
            }
        }
    }
}

impl TryFrom<String> for Template {
    type Error = TemplateError;

    fn try_from(text: String) -> Result<Template, TemplateError> {
        Template::parse(&text)
    }
}

impl From<String> for Glob {
    fn from(text: String) -> Glob {
        Glob::parse(&text)
    }
}

impl TryFrom<String> for Charset {
    type Error = CharsetError;

    fn try_from(text: String) -> Result<Charset, CharsetError> {
        Charset::parse(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> ParamRule {
        ParamRule {
            max_len: DEFAULT_MAX_LEN,
            ..ParamRule::default()
        }
    }

    #[test]
    fn templates_parse_and_render() {
        let t = Template::parse("--unit={unit}.{kind} {{x}}").expect("parse");
        assert_eq!(t.params().collect::<Vec<_>>(), ["unit", "kind"]);
        let mut v = BTreeMap::new();
        v.insert("unit".to_string(), "a b".to_string());
        v.insert("kind".to_string(), "$(x)".to_string());
        assert_eq!(t.render(&v), "--unit=a b.$(x) {x}");
        assert!(matches!(
            Template::parse("{unclosed"),
            Err(TemplateError::Unclosed { .. })
        ));
        assert!(matches!(
            Template::parse("lone }"),
            Err(TemplateError::LoneClose { .. })
        ));
        assert!(matches!(
            Template::parse("{bad name}"),
            Err(TemplateError::NameCharacter { found: ' ', .. })
        ));
        assert!(matches!(
            Template::parse("{}"),
            Err(TemplateError::EmptyName { .. })
        ));
    }

    /// The messages reach operators (`check-config` problems, command results): their
    /// words must not change with the types behind them.
    #[test]
    fn refusals_read_as_operators_know_them() {
        let shown = |e: &dyn std::error::Error| e.to_string();
        for (text, expected) in [
            (
                "{a b}",
                r#""{a b}": parameter names use [A-Za-z0-9_-], found ' ' (write {{ for a literal brace)"#,
            ),
            ("x{a", r#""x{a": unclosed {"#),
            ("{}", r#""{}": empty parameter name {}"#),
            ("a}", r#""a}": lone } (write }} for a literal brace)"#),
        ] {
            let err = Template::parse(text).expect_err("refused");
            assert_eq!(shown(&err), expected);
        }
        let err = Charset::parse("z-a").expect_err("reversed");
        assert_eq!(shown(&err), r#"charset "z-a": range z-a is reversed"#);
        assert_eq!(shown(&CharsetError::Empty), "charset is empty");
        let a = action();
        for (args, expected) in [
            (
                r#"{"unit":"sshd"}"#,
                r#"argument "unit" value "sshd" is not allowed (allowed: nginx.service)"#,
            ),
            (
                r#"{"unit":"nginx.service","lines":0}"#,
                r#"argument "lines" value "0" is outside 1..=500"#,
            ),
            (
                r#"{"unit":"nginx.service","lines":"x"}"#,
                r#"argument "lines" value "x" is not a decimal integer"#,
            ),
            (
                r#"{"unit":"-x"}"#,
                r#"argument "unit" value "-x" starts with '-' (allow_leading_dash is not set)"#,
            ),
            (r#"{"lines":3}"#, r#"missing argument "unit""#),
            (
                r#"{"unit":"nginx.service","x":1}"#,
                r#"unknown argument "x" (this action takes: lines, unit)"#,
            ),
            ("[1]", "arguments must be a JSON object"),
            (
                r#"{"unit":null}"#,
                r#"argument "unit" must be a string, number or boolean"#,
            ),
        ] {
            assert_eq!(shown(&a.argv(args).expect_err(args)), expected);
        }
        assert!(
            shown(&a.argv("nope").expect_err("not JSON")).starts_with("arguments are not JSON: ")
        );
        let long = format!(r#"{{"unit":"{}"}}"#, "u".repeat(100));
        assert_eq!(
            shown(&a.argv(&long).expect_err("long")),
            format!(
                r#"argument "unit" value "{}"... is not allowed (allowed: nginx.service)"#,
                "u".repeat(64)
            )
        );
        let mut r = rule();
        r.any = true;
        r.max_len = 3;
        assert_eq!(
            shown(&r.check("abcd").expect_err("long")),
            "is longer than 3 bytes"
        );
        assert_eq!(
            shown(&r.check("a\nb").expect_err("control")),
            "contains control characters"
        );
        let mut r = rule();
        r.charset = Some(Charset::parse("0-9").expect("cs"));
        assert_eq!(
            shown(&r.check("a").expect_err("charset")),
            "has characters outside [0-9]"
        );
        let mut r = rule();
        r.min = Some(5);
        assert_eq!(shown(&r.check("1").expect_err("range")), "is outside 5..=");
        assert!(matches!(
            Action::default().argv(r#"{"x":1}"#),
            Err(ArgvError::Unknown { known, .. }) if known.is_empty()
        ));
        assert_eq!(
            shown(&Action::default().argv(r#"{"x":1}"#).expect_err("unknown")),
            r#"unknown argument "x" (this action takes: none)"#
        );
    }

    #[test]
    fn globs_never_cross_directories_or_produce_dot_dot() {
        let g = Glob::parse("/var/log/*.log");
        assert!(g.matches("/var/log/syslog.log"));
        assert!(!g.matches("/var/log/a/b.log"));
        assert!(!g.matches("/var/log/../../etc/x.log"));
        assert!(!g.matches("/var/log/.hidden.log"));
        let g = Glob::parse("/srv/*");
        assert!(!g.matches("/srv/.."));
        assert!(!g.matches("/srv/."));
        assert!(g.matches("/srv/data"));
        assert!(Glob::parse("nginx.service").matches("nginx.service"));
        assert!(!Glob::parse("nginx.service").matches("nginx.servicex"));
        assert!(Glob::parse("v?").matches("v1"));
        assert!(!Glob::parse("v?").matches("v12"));
        assert!(Glob::parse(r"a\*").matches("a*"));
        assert!(!Glob::parse(r"a\*").matches("ab"));
        assert!(Glob::parse("*a*b*c").matches("xxaxxbxxc"));
        // Pathological patterns stay fast.
        let long = "a".repeat(200);
        assert!(!Glob::parse("*a*a*a*a*a*a*a*a*b").matches(&long));
    }

    #[test]
    fn charsets() {
        let c = Charset::parse("a-z0-9_-").expect("parse");
        assert!(c.allows("abc_1-2"));
        assert!(!c.allows("ABC"));
        assert!(!c.allows("a b"));
        assert!(matches!(
            Charset::parse("z-a"),
            Err(CharsetError::Reversed {
                from: 'z',
                to: 'a',
                ..
            })
        ));
        assert_eq!(Charset::parse(""), Err(CharsetError::Empty));
        let c = Charset::parse("-a").expect("parse");
        assert!(c.allows("-a-"));
    }

    #[test]
    fn rules_all_apply_and_universal_checks_always_do() {
        let mut r = rule();
        r.allow = vec![Glob::parse("nginx.service"), Glob::parse("app-*.service")];
        assert!(r.check("nginx.service").is_ok());
        assert!(r.check("app-web.service").is_ok());
        assert!(matches!(
            r.check("sshd.service"),
            Err(ValueRefused::NotAllowed { allowed }) if allowed == ["nginx.service", "app-*.service"]
        ));
        let mut r = rule();
        r.charset = Some(Charset::parse("0-9").expect("cs"));
        r.min = Some(1);
        r.max = Some(100);
        assert!(r.check("42").is_ok());
        assert_eq!(
            r.check("420"),
            Err(ValueRefused::OutOfRange {
                min: Some(1),
                max: Some(100)
            })
        );
        assert!(matches!(
            r.check("4a"),
            Err(ValueRefused::OutsideCharset { .. })
        ));
        let mut r = rule();
        r.any = true;
        assert!(r.check("$(touch /tmp/x); rm -rf").is_ok());
        assert_eq!(
            r.check("--output=/etc/passwd"),
            Err(ValueRefused::LeadingDash)
        );
        assert_eq!(r.check("a\nb"), Err(ValueRefused::ControlCharacters));
        assert_eq!(
            r.check(&"x".repeat(300)),
            Err(ValueRefused::TooLong {
                max_len: DEFAULT_MAX_LEN
            })
        );
        r.allow_leading_dash = true;
        assert!(r.check("-5").is_ok());
        assert!(!rule().has_rule());
    }

    fn action() -> Action {
        let mut params = BTreeMap::new();
        let mut unit = rule();
        unit.allow = vec![Glob::parse("nginx.service")];
        params.insert("unit".to_string(), unit);
        let mut lines = rule();
        lines.min = Some(1);
        lines.max = Some(500);
        lines.default = Some("50".to_string());
        params.insert("lines".to_string(), lines);
        Action {
            name: "logs".to_string(),
            program: PathBuf::from("/bin/echo"),
            args: vec![
                Template::parse("-u").expect("t"),
                Template::parse("{unit}").expect("t"),
                Template::parse("--lines={lines}").expect("t"),
            ],
            params,
            timeout: Duration::from_secs(5),
            max_output: 1024,
            env: Vec::new(),
            working_dir: None,
        }
    }

    #[test]
    fn argv_is_built_from_checked_arguments() {
        let a = action();
        assert_eq!(
            a.argv(r#"{"unit":"nginx.service"}"#).expect("argv"),
            ["-u", "nginx.service", "--lines=50"]
        );
        assert_eq!(
            a.argv(r#"{"unit":"nginx.service","lines":7}"#)
                .expect("argv"),
            ["-u", "nginx.service", "--lines=7"]
        );
        assert!(matches!(
            a.argv(r#"{"unit":"sshd"}"#),
            Err(ArgvError::Refused { name, value, reason: ValueRefused::NotAllowed { .. } })
                if name == "unit" && value == "sshd"
        ));
        assert!(matches!(
            a.argv("{}"),
            Err(ArgvError::Missing { name }) if name == "unit"
        ));
        assert!(matches!(
            a.argv(r#"{"unit":"nginx.service","x":1}"#),
            Err(ArgvError::Unknown { name, known }) if name == "x" && known == ["lines", "unit"]
        ));
        assert!(matches!(
            a.argv(r#"{"unit":["a"]}"#),
            Err(ArgvError::Args(ArgsError::ValueType { name })) if name == "unit"
        ));
        assert!(matches!(
            a.argv("[1]"),
            Err(ArgvError::Args(ArgsError::NotObject))
        ));
        assert!(matches!(
            a.argv("nope"),
            Err(ArgvError::Args(ArgsError::NotJson { .. }))
        ));
    }

    #[tokio::test]
    async fn runs_and_reports_output_and_refusals() {
        let a = action();
        let out = a.run(r#"{"unit":"nginx.service"}"#, None).await;
        assert_eq!(out, Outcome::ok("-u nginx.service --lines=50\n"));
        let out = a.run(r#"{"unit":"x"}"#, None).await;
        assert!(!out.ok);
        assert_eq!(out.code, REFUSED);
        assert!(out.output.starts_with("refused: "), "{}", out.output);
    }

    #[tokio::test]
    async fn long_output_is_cut_with_a_note() {
        let mut a = action();
        a.program = PathBuf::from("/bin/sh");
        a.params.clear();
        a.args = vec![
            Template::parse("-c").expect("t"),
            Template::parse("head -c 5000 /dev/zero | tr '\\0' x; exit 4").expect("t"),
        ];
        a.max_output = 1024;
        let out = a.run("{}", None).await;
        assert_eq!(out.code, 4);
        assert!(!out.ok);
        assert!(out.output.len() <= 1024);
        assert!(out.output.ends_with("[output truncated]"), "{}", out.output);
    }
}

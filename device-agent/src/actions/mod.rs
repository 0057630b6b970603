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
mod tests;

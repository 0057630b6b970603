//! The deserializer behind [`crate::Findings::read`]: serde over a `serde_json::Value`
//! tree that knows the path of every value, notes the keys a struct does not declare, and
//! leaves out (or replaces by their default) the values an earlier run found bad.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt::{self, Display};

use serde::de::{
    self, DeserializeSeed, Deserializer, Expected, IntoDeserializer, MapAccess, SeqAccess,
    Unexpected, Visitor,
};
use serde::forward_to_deserialize_any;
use serde_json::Value;

use crate::{key, OtherKeys, Problem, Read};

/// What later runs do with a value an earlier run found bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SetAside {
    /// Use the defaults tree's value for the same path (leave it out if there is none).
    UseDefault,
    /// Leave the key out, so the field's own default applies.
    LeaveOut,
}

/// Reads `value` (at path `at`) into `T` with as many runs as it takes (crate
/// documentation): every problem found, and `T` unless one could not be built.
pub(crate) fn read<'de, T: de::Deserialize<'de>>(
    value: &'de Value,
    at: &str,
    how: Read<'de>,
) -> (Option<T>, Vec<Problem>) {
    let mut set_aside: BTreeMap<String, SetAside> = BTreeMap::new();
    let mut problems = Vec::new();
    loop {
        let run = Run {
            set_aside: &set_aside,
            unknown: RefCell::default(),
            other_keys: how.other_keys,
        };
        let result = T::deserialize(Node {
            value,
            default: how.defaults,
            path: at.to_string(),
            run: &run,
            top: true,
        });
        let unknown = run.unknown.into_inner();
        let err = match result {
            Ok(read) => {
                problems.extend(unknown);
                return (Some(read), by_key(problems));
            }
            Err(err) => err,
        };
        let path = err.path.unwrap_or_else(|| at.to_string());
        let before = set_aside.get(&path).copied();
        if before.is_none() {
            problems.push(Problem {
                key: path.clone(),
                message: err.message,
            });
        }
        // Nothing left to set aside: the top value itself, a missing field, or a value
        // that failed even when left out.
        if path == at || err.missing.is_some() || before == Some(SetAside::LeaveOut) {
            problems.extend(unknown);
            return (None, by_key(problems));
        }
        let next = match before {
            None => SetAside::UseDefault,
            Some(_) => SetAside::LeaveOut,
        };
        set_aside.insert(path, next);
    }
}

/// Problems in key order, so a table's unknown keys and bad values read together.
fn by_key(mut problems: Vec<Problem>) -> Vec<Problem> {
    problems.sort_by(|a, b| a.key.cmp(&b.key));
    problems
}

/// What one run shares across the tree.
struct Run<'r> {
    set_aside: &'r BTreeMap<String, SetAside>,
    unknown: RefCell<Vec<Problem>>,
    other_keys: OtherKeys<'r>,
}

/// One value of the tree, with its path.
struct Node<'de, 'r> {
    value: &'de Value,
    /// The same path in the defaults tree, if any.
    default: Option<&'de Value>,
    path: String,
    run: &'r Run<'r>,
    /// Whether this is the value the read started at (where [`OtherKeys`] applies).
    top: bool,
}

impl<'de, 'r> Node<'de, 'r> {
    /// The child at `path`, unless an earlier run left it out.
    fn child(
        &self,
        path: String,
        value: &'de Value,
        default: Option<&'de Value>,
    ) -> Option<Node<'de, 'r>> {
        let (value, default) = match self.run.set_aside.get(&path) {
            None => (value, default),
            Some(SetAside::UseDefault) => (default?, None),
            Some(SetAside::LeaveOut) => return None,
        };
        Some(Node {
            value,
            default,
            path,
            run: self.run,
            top: false,
        })
    }

    /// The entries of a table: only `fields` when it is a struct's.
    fn entries(&self, fields: Option<&[&str]>) -> Entries<'de, 'r> {
        let mut items = Vec::new();
        if let Value::Object(map) = self.value {
            for (name, value) in map {
                if fields.is_some_and(|f| !f.contains(&name.as_str())) {
                    continue;
                }
                let default = self.default.and_then(|d| d.get(name));
                if let Some(node) = self.child(key(&self.path, name), value, default) {
                    items.push((name.as_str(), node));
                }
            }
        }
        Entries {
            items: items.into_iter(),
            pending: None,
        }
    }

    fn elements(&self) -> Elements<'de, 'r> {
        let mut items = Vec::new();
        if let Value::Array(list) = self.value {
            for (i, value) in list.iter().enumerate() {
                let default = self.default.and_then(|d| d.get(i));
                if let Some(node) = self.child(format!("{}[{i}]", self.path), value, default) {
                    items.push(node);
                }
            }
        }
        Elements {
            items: items.into_iter(),
        }
    }

    /// Notes the keys of this table that `fields` does not declare.
    fn note_unknown(&self, fields: &[&str]) {
        let Value::Object(map) = self.value else {
            return;
        };
        let mut known: Vec<&str> = fields.to_vec();
        let mut skipped: &[&str] = &[];
        if self.top {
            match self.run.other_keys {
                OtherKeys::Unknown => {}
                OtherKeys::SharedWith(others) => {
                    known.extend(others);
                    skipped = others;
                }
                OtherKeys::Ignored => return,
            }
        }
        for name in map.keys() {
            if fields.contains(&name.as_str()) || skipped.contains(&name.as_str()) {
                continue;
            }
            self.run.unknown.borrow_mut().push(Problem {
                key: key(&self.path, name),
                message: format!("unknown key (known here: {})", known.join(", ")),
            });
        }
    }

    fn unexpected(&self) -> Unexpected<'de> {
        unexpected(self.value)
    }

    /// Gives `err` this node's path, unless a node further down already did.
    fn attach(&self, err: Error) -> Error {
        claim(err, &self.path, self.value)
    }

    fn any<V: Visitor<'de>>(&self, visitor: V) -> Result<V::Value, Error> {
        match self.value {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
                (Some(u), _, _) => visitor.visit_u64(u),
                (None, Some(i), _) => visitor.visit_i64(i),
                (None, None, Some(f)) => visitor.visit_f64(f),
                _ => Err(de::Error::custom("a number that fits no type")),
            },
            Value::String(s) => visitor.visit_borrowed_str(s),
            Value::Array(_) => visitor.visit_seq(self.elements()),
            Value::Object(_) => visitor.visit_map(self.entries(None)),
        }
    }

    /// Numbers, also from the strings environment variables and flags produce.
    fn integer<V: Visitor<'de>>(&self, visitor: V) -> Result<V::Value, Error> {
        let Value::String(s) = self.value else {
            return self.any(visitor);
        };
        let t = s.trim();
        if let Ok(u) = t.parse::<u64>() {
            visitor.visit_u64(u)
        } else if let Ok(i) = t.parse::<i64>() {
            visitor.visit_i64(i)
        } else {
            self.any(visitor)
        }
    }

    fn float<V: Visitor<'de>>(&self, visitor: V) -> Result<V::Value, Error> {
        match self.value {
            Value::Number(n) => match n.as_f64() {
                Some(f) => visitor.visit_f64(f),
                None => self.any(visitor),
            },
            Value::String(s) => match s.trim().parse::<f64>() {
                Ok(f) => visitor.visit_f64(f),
                Err(_) => self.any(visitor),
            },
            _ => self.any(visitor),
        }
    }

    fn boolean<V: Visitor<'de>>(&self, visitor: V) -> Result<V::Value, Error> {
        match self.value {
            Value::String(s) if s.trim() == "true" => visitor.visit_bool(true),
            Value::String(s) if s.trim() == "false" => visitor.visit_bool(false),
            _ => self.any(visitor),
        }
    }

    /// Strings; a number or boolean is taken as its text (as TOML-less layers give it).
    fn string<V: Visitor<'de>>(&self, visitor: V) -> Result<V::Value, Error> {
        match self.value {
            Value::Number(n) => visitor.visit_string(n.to_string()),
            Value::Bool(b) => visitor.visit_string(b.to_string()),
            _ => self.any(visitor),
        }
    }
}

/// `Deserializer` methods that read the value the way one of `Node`'s methods does
/// (accepting the strings environment variables give) and claim their errors.
macro_rules! coerce {
    ($($method:ident => $how:ident),* $(,)?) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            self.$how(visitor).map_err(|e| self.attach(e))
        }
    )*};
}

impl<'de> Deserializer<'de> for Node<'de, '_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.any(visitor).map_err(|e| self.attach(e))
    }

    coerce! {
        deserialize_bool => boolean,
        deserialize_i8 => integer,
        deserialize_i16 => integer,
        deserialize_i32 => integer,
        deserialize_i64 => integer,
        deserialize_u8 => integer,
        deserialize_u16 => integer,
        deserialize_u32 => integer,
        deserialize_u64 => integer,
        deserialize_f32 => float,
        deserialize_f64 => float,
        deserialize_char => string,
        deserialize_str => string,
        deserialize_string => string,
        deserialize_identifier => string,
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.value {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        let result = match self.value {
            Value::Object(_) => {
                self.note_unknown(fields);
                visitor.visit_map(self.entries(Some(fields)))
            }
            _ => Err(de::Error::invalid_type(self.unexpected(), &"a table")),
        };
        result.map_err(|e| self.attach(e))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        let result = match self.value {
            Value::String(s) => visitor.visit_enum(s.trim().into_deserializer()),
            _ => Err(de::Error::invalid_type(self.unexpected(), &OneOf(variants))),
        };
        result.map_err(|e| self.attach(e))
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }

    forward_to_deserialize_any! {
        i128 u128 bytes byte_buf unit unit_struct seq tuple tuple_struct map
    }
}

/// Gives `err` the path of the value at `path`, unless a value further down already
/// claimed it. A message from a type's own parser (`custom`) may not say what it was
/// given, so the value is added when it is a scalar the message does not show.
fn claim(mut err: Error, path: &str, value: &Value) -> Error {
    if err.path.is_none() {
        err.path = Some(match err.missing {
            Some(field) => key(path, field),
            None => path.to_string(),
        });
        let scalar = !matches!(value, Value::Array(_) | Value::Object(_));
        let shown = shown(&unexpected(value));
        if !err.shows_value && scalar && !err.message.contains(&shown) {
            err.message = format!("{} (got {shown})", err.message);
        }
    }
    err
}

fn unexpected(value: &Value) -> Unexpected<'_> {
    match value {
        Value::Null => Unexpected::Unit,
        Value::Bool(b) => Unexpected::Bool(*b),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => Unexpected::Unsigned(u),
            (None, Some(i)) => Unexpected::Signed(i),
            _ => Unexpected::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) => Unexpected::Str(s),
        Value::Array(_) => Unexpected::Seq,
        Value::Object(_) => Unexpected::Map,
    }
}

/// Deserializes `node` with `seed`, claiming errors for its path: also those a type raises
/// after the node has handed over its value (`#[serde(try_from)]` conversions).
fn deserialize_node<'de, S: DeserializeSeed<'de>>(
    seed: S,
    node: Node<'de, '_>,
) -> Result<S::Value, Error> {
    let (path, value) = (node.path.clone(), node.value);
    seed.deserialize(node).map_err(|e| claim(e, &path, value))
}

/// The entries of a table, handed out key then value.
struct Entries<'de, 'r> {
    items: std::vec::IntoIter<(&'de str, Node<'de, 'r>)>,
    pending: Option<Node<'de, 'r>>,
}

impl<'de> MapAccess<'de> for Entries<'de, '_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some((name, node)) = self.items.next() else {
            return Ok(None);
        };
        self.pending = Some(node);
        seed.deserialize(name.into_deserializer()).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        match self.pending.take() {
            Some(node) => deserialize_node(seed, node),
            None => Err(de::Error::custom("a value without a key")),
        }
    }
}

/// The elements of a list.
struct Elements<'de, 'r> {
    items: std::vec::IntoIter<Node<'de, 'r>>,
}

impl<'de> SeqAccess<'de> for Elements<'de, '_> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        self.items
            .next()
            .map(|node| deserialize_node(seed, node))
            .transpose()
    }
}

/// A problem with one value: its message, and its path once a node has claimed it.
#[derive(Debug)]
pub(crate) struct Error {
    path: Option<String>,
    message: String,
    /// Set for a missing field: the problem is about this field of the struct's table.
    missing: Option<&'static str>,
    /// Whether the message already shows the offending value.
    shows_value: bool,
}

impl Error {
    fn new(message: String, shows_value: bool) -> Error {
        Error {
            path: None,
            message,
            missing: None,
            shows_value,
        }
    }
}

impl Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: Display>(msg: T) -> Error {
        Error::new(msg.to_string(), false)
    }

    fn invalid_type(unexp: Unexpected<'_>, exp: &dyn Expected) -> Error {
        Error::new(
            format!("expected {}, got {}", expected(exp), shown(&unexp)),
            true,
        )
    }

    fn invalid_value(unexp: Unexpected<'_>, exp: &dyn Expected) -> Error {
        Error::invalid_type(unexp, exp)
    }

    fn invalid_length(len: usize, exp: &dyn Expected) -> Error {
        Error::new(
            format!("expected {}, got {len} entries", expected(exp)),
            true,
        )
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Error {
        Error::new(
            format!("expected {}, got {variant:?}", OneOf(expected)),
            true,
        )
    }

    fn missing_field(field: &'static str) -> Error {
        Error {
            missing: Some(field),
            ..Error::new("is required".to_string(), true)
        }
    }
}

/// What serde's own visitors expect, in the words of a configuration file.
fn expected(exp: &dyn Expected) -> String {
    let text = exp.to_string();
    match text.as_str() {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a whole number".to_string(),
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "an integer".to_string(),
        "f32" | "f64" => "a number".to_string(),
        "a boolean" => "true or false".to_string(),
        "a sequence" => "a list".to_string(),
        "a map" => "a table".to_string(),
        t if t.starts_with("struct ") => "a table".to_string(),
        _ => text,
    }
}

/// A value as a message shows it.
fn shown(unexp: &Unexpected<'_>) -> String {
    match unexp {
        Unexpected::Str(s) => format!("{s:?}"),
        Unexpected::Bool(b) => b.to_string(),
        Unexpected::Unsigned(n) => n.to_string(),
        Unexpected::Signed(n) => n.to_string(),
        Unexpected::Float(x) => x.to_string(),
        Unexpected::Seq => "a list".to_string(),
        Unexpected::Map => "a table".to_string(),
        Unexpected::Unit => "nothing".to_string(),
        other => other.to_string(),
    }
}

/// `"a", "b" or "c"`.
struct OneOf(&'static [&'static str]);

impl Display for OneOf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, name) in self.0.iter().enumerate() {
            match i {
                0 => {}
                i if i + 1 == self.0.len() => f.write_str(" or ")?,
                _ => f.write_str(", ")?,
            }
            write!(f, "{name:?}")?;
        }
        Ok(())
    }
}

impl Expected for OneOf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Display::fmt(self, f)
    }
}

/// The field names a derived struct hands to `deserialize_struct` (see
/// [`crate::fields_of`]).
pub(crate) fn fields_of<'de, T: de::Deserialize<'de>>() -> &'static [&'static str] {
    let fields = Cell::new(&[][..]);
    // The probe always fails: only what it saw matters.
    let _ = T::deserialize(FieldProbe(&fields));
    fields.get()
}

/// A deserializer that only records the field names of a struct.
struct FieldProbe<'c>(&'c Cell<&'static [&'static str]>);

impl<'de> Deserializer<'de> for FieldProbe<'_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Error> {
        self.0.set(fields);
        Err(de::Error::custom("probed"))
    }

    forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
        identifier ignored_any
    }
}

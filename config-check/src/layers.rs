//! The layers of a configuration, merged by the `config` crate into one tree: built-in
//! defaults < the TOML file < `PREFIX_SECTION__KEY` environment variables < overrides
//! (command-line flags).

use std::path::Path;

use serde_json::Value;

/// Where a configuration comes from, lowest precedence first.
#[derive(Debug, Clone, Copy, Default)]
pub struct Layers<'a> {
    /// Built-in defaults as (dotted key, value).
    pub defaults: &'a [(&'a str, &'a str)],
    /// The TOML file, if any (it must exist).
    pub file: Option<&'a Path>,
    /// The prefix of the environment variables (`HUB` for `HUB_DEVICE__LISTEN`); sections
    /// are joined with `__`.
    pub env_prefix: &'a str,
    /// The environment (all of it; only variables with the prefix are used).
    pub env: &'a [(String, String)],
    /// Variables with the prefix that are not configuration keys (`HUB_API`).
    pub env_ignored: &'a [&'a str],
    /// Overrides as (dotted key, value).
    pub overrides: &'a [(String, String)],
}

impl Layers<'_> {
    /// The merged tree, unchecked.
    ///
    /// # Errors
    /// The file cannot be read or is not TOML.
    pub fn merge(&self) -> Result<Value, config::ConfigError> {
        let mut builder = config::Config::builder();
        for (key, value) in self.defaults {
            builder = builder.set_default(*key, *value)?;
        }
        if let Some(file) = self.file {
            builder = builder.add_source(
                config::File::from(file)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let start = format!("{}_", self.env_prefix);
        let env: config::Map<String, String> = self
            .env
            .iter()
            .filter(|(k, _)| k.starts_with(&start) && !self.env_ignored.contains(&k.as_str()))
            .cloned()
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix(self.env_prefix)
                .prefix_separator("_")
                .separator("__")
                .source(Some(env)),
        );
        for (key, value) in self.overrides {
            builder = builder.set_override(key.as_str(), value.as_str())?;
        }
        builder.build()?.try_deserialize()
    }
}

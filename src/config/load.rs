//! Loading: the file and the environment layered into one TOML table,
//! each key checked on its own as it is added (so an error names where it
//! came from), then deserialised and validated.

use std::collections::HashMap;
use std::path::Path;

use super::{Config, ConfigError, Sources, DURATION_EXAMPLE, ENV_PREFIX};

impl Config {
    /// Layers file and environment into one TOML table, checking every key
    /// on its own as it is added (so an error names its source), then
    /// deserialises and validates the whole.
    pub(super) fn load_inner(
        path: Option<&Path>,
        env: Option<HashMap<String, String>>,
    ) -> Result<(Config, Sources), ConfigError> {
        let mut layers = Layers::default();
        if let Some(p) = path {
            layers.read_file(p)?;
        }
        let env: Vec<(String, String)> = match env {
            Some(e) => e.into_iter().collect(),
            None => std::env::vars().collect(),
        };
        layers.read_env(env)?;
        let Layers {
            table,
            origins,
            sources,
        } = layers;
        let mut cfg: Config =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Key {
                    origin: "config".into(),
                    reason: explain(e.message(), None),
                })?;
        cfg.validate().map_err(|e| match e {
            ConfigError::Invalid { key, reason } => match origins.get(key) {
                Some(origin) => ConfigError::Key {
                    origin: origin.clone(),
                    reason,
                },
                None => ConfigError::Invalid { key, reason },
            },
            other => other,
        })?;
        // A sandboxed tenant must not read the daemon's config.
        cfg.isolation.daemon_config = path.and_then(|p| p.canonicalize().ok());
        super::sandbox::config_outside_workspaces(&cfg)?;
        Ok((cfg, sources))
    }
}

/// Keys that were renamed: `[section] old` is read as `[section] new`
/// (the later source wins, as for any key), and the operator is told why.
const RENAMED: &[(&str, &str, &str, &str)] = &[(
    "opencode",
    "max_idle_connections",
    "max_connections",
    "it now bounds the calls to OpenCode in flight as well as the idle connections kept",
)];

/// The key `key` of `section` is read as: itself, or its new name (and
/// the note to give).
fn current_name(section: &str, key: String) -> (String, Option<String>) {
    match RENAMED
        .iter()
        .find(|(s, old, _, _)| *s == section && *old == key)
    {
        Some((_, old, new, why)) => (
            new.to_string(),
            Some(format!(
                "[{section}] {old} is read as [{section}] {new}: {why}; rename it"
            )),
        ),
        None => (key, None),
    }
}

/// The table being layered, where each `section.key` came from (for
/// validation errors), and the sources read.
#[derive(Default)]
struct Layers {
    table: toml::Table,
    origins: HashMap<String, String>,
    sources: Sources,
}

impl Layers {
    /// The `--config` file, each key checked as it is added.
    fn read_file(&mut self, p: &Path) -> Result<(), ConfigError> {
        if !p.exists() {
            return Err(ConfigError::Missing {
                path: p.to_path_buf(),
            });
        }
        let text = std::fs::read_to_string(p).map_err(|e| ConfigError::File {
            path: p.to_path_buf(),
            reason: e.to_string(),
        })?;
        let file: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::File {
                path: p.to_path_buf(),
                reason: format!("not valid TOML: {}", e.to_string().trim_end()),
            })?;
        for (section, keys) in file {
            self.read_section(p, section, keys)?;
        }
        self.sources.file = Some(p.to_path_buf());
        Ok(())
    }

    fn read_section(
        &mut self,
        p: &Path,
        section: String,
        keys: toml::Value,
    ) -> Result<(), ConfigError> {
        let origin = |key: Option<&str>| match key {
            Some(k) => format!("config file {}, [{section}] {k}", p.display()),
            None => format!("config file {}, [{section}]", p.display()),
        };
        let toml::Value::Table(keys) = keys else {
            let reason = match check_key(&section, None, keys.clone()) {
                Err(r) => r,
                Ok(()) => "must be a [section] of keys".into(),
            };
            return Err(ConfigError::Key {
                origin: format!("config file {}, {section}", p.display()),
                reason,
            });
        };
        if keys.is_empty() {
            check_key(&section, None, toml::Value::Table(keys.clone())).map_err(|reason| {
                ConfigError::Key {
                    origin: origin(None),
                    reason,
                }
            })?;
        }
        for (key, value) in keys {
            let (name, note) = current_name(&section, key.clone());
            // Said as written, with the name it is read as.
            let written = if name == key {
                key
            } else {
                format!("{key} (read as {name})")
            };
            self.sources.renamed.extend(note);
            let shown = value.to_string();
            check_key(&section, Some(&name), value.clone()).map_err(|reason| ConfigError::Key {
                origin: format!("{} = {shown}", origin(Some(&written))),
                reason,
            })?;
            self.origins
                .insert(format!("{section}.{name}"), origin(Some(&written)));
            insert(&mut self.table, &section, name, value);
        }
        Ok(())
    }

    /// The `OPENCODE_BRIDGE__<SECTION>__<KEY>` variables, in name order.
    fn read_env(&mut self, env: Vec<(String, String)>) -> Result<(), ConfigError> {
        let prefix = format!("{ENV_PREFIX}__");
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .collect();
        env.sort();
        for (name, raw) in env {
            let origin = format!("environment variable {name}={raw:?}");
            let parts: Vec<String> = name[prefix.len()..]
                .split("__")
                .map(str::to_ascii_lowercase)
                .collect();
            let [section, key] = parts.as_slice() else {
                return Err(ConfigError::Key {
                    origin,
                    reason: format!(
                        "the name must be {ENV_PREFIX}__<SECTION>__<KEY> (as in {ENV_PREFIX}__NATS__URL)"
                    ),
                });
            };
            let (current, note) = current_name(section, key.clone());
            self.sources.renamed.extend(note);
            let key = &current;
            let value = env_value(section, key, raw).map_err(|reason| ConfigError::Key {
                origin: format!("{origin} ([{section}] {key})"),
                reason,
            })?;
            self.origins.insert(
                format!("{section}.{key}"),
                format!("environment variable {name} ([{section}] {key})"),
            );
            insert(&mut self.table, section, key.clone(), value);
            self.sources.env.push(name);
        }
        Ok(())
    }
}

/// An environment value is taken as a string first; as a number or a
/// boolean only where the key wants one.
fn env_value(section: &str, key: &str, raw: String) -> Result<toml::Value, String> {
    let typed = parse_scalar(&raw);
    match (
        check_key(section, Some(key), toml::Value::String(raw.clone())),
        typed,
    ) {
        (Ok(()), _) => Ok(toml::Value::String(raw)),
        (Err(e), None) => Err(e),
        (Err(_), Some(v)) => {
            check_key(section, Some(key), v.clone())?;
            Ok(v)
        }
    }
}

/// Puts `section.key = value` into the layered table.
fn insert(table: &mut toml::Table, section: &str, key: String, value: toml::Value) {
    let entry = table
        .entry(section.to_string())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(t) = entry {
        t.insert(key, value);
    }
}

/// An environment value read as TOML would read it, when it is a boolean
/// or a number.
fn parse_scalar(raw: &str) -> Option<toml::Value> {
    let t = raw.trim();
    match t {
        "true" => return Some(toml::Value::Boolean(true)),
        "false" => return Some(toml::Value::Boolean(false)),
        _ => {}
    }
    if let Ok(i) = t.parse::<i64>() {
        return Some(toml::Value::Integer(i));
    }
    t.parse::<f64>().ok().map(toml::Value::Float)
}

/// Checks one key on its own (`None`: only the section's name) by
/// deserialising a config that has just it; the error in plain words.
fn check_key(section: &str, key: Option<&str>, value: toml::Value) -> Result<(), String> {
    let inner = match key {
        Some(k) => {
            let mut t = toml::Table::new();
            t.insert(k.to_string(), value);
            toml::Value::Table(t)
        }
        None => value,
    };
    let mut outer = toml::Table::new();
    outer.insert(section.to_string(), inner);
    toml::Value::Table(outer)
        .try_into::<Config>()
        .map(drop)
        .map_err(|e| explain(e.message(), Some(section)))
}

/// serde's message, said for a person editing a config: unknown keys and
/// enum values list what is valid; a bad duration shows how to write one.
fn explain(message: &str, section: Option<&str>) -> String {
    // serde: "unknown field `x`, expected one of `a`, `b`" / "expected `a` or `b`".
    let valid = || -> Vec<&str> {
        message
            .split_once("expected")
            .map(|(_, rest)| rest.split('`').skip(1).step_by(2).collect())
            .unwrap_or_default()
    };
    if message.starts_with("unknown field") {
        let name = message.split('`').nth(1).unwrap_or("?");
        let list = valid().join(", ");
        return match section {
            Some(s) if name == s => {
                format!("[{name}] is not a known section; the sections are {list}")
            }
            Some(s) => format!("{name} is not a key of [{s}]; its keys are {list}"),
            None => format!("unknown key {name}; valid here: {list}"),
        };
    }
    if message.starts_with("unknown variant") {
        let list: Vec<String> = valid().iter().map(|v| format!("{v:?}")).collect();
        return format!("not a valid value; valid values are {}", list.join(", "));
    }
    if message.contains("expected a duration") {
        return format!("not a duration; write {DURATION_EXAMPLE}");
    }
    let wanted = [
        ("expected usize", "a whole number (0 or more)"),
        ("expected u64", "a whole number (0 or more)"),
        ("expected a boolean", "true or false"),
        ("expected a string", "a string in quotes"),
        (
            "invalid socket address",
            "an address such as \"127.0.0.1:9464\"",
        ),
    ];
    for (needle, what) in wanted {
        if message.contains(needle) {
            return format!("expected {what} ({message})");
        }
    }
    message.to_string()
}

//! Layered configuration: built-in defaults, then `--config FILE`, then
//! `STALL_LAB__SECTION__KEY` environment variables, then command-line flags.
//!
//! The built-in defaults *are* `config/default.toml`, embedded at compile time,
//! so there is one place for every default and the binary runs from any
//! directory. Every key a later layer sets must already exist in that file:
//! a typo such as `STALL_LAB__RUNTIME__WORKERS` is a startup error naming the
//! variable, not a silently ignored setting.
//!
//! Layers are merged as TOML tables and only then deserialized into [`Config`],
//! while a side table remembers which layer set each key. That is what lets a
//! bad value be reported as "runtime.flavor = \"paralel\" (from environment
//! variable STALL_LAB__RUNTIME__FLAVOR)" instead of a bare serde message.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::{Table, Value};

/// The embedded defaults. Also the schema: a key absent here is unknown.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "STALL_LAB__";

/// The effective configuration of one `stall-lab serve` process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub runtime: RuntimeConfig,
    pub limits: LimitsConfig,
    pub telemetry: crate::telemetry::TelemetryConfig,
    pub admin: AdminConfig,
    pub stall: StallConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin server (dashboard, /debug/*).
    pub listen: SocketAddr,
    /// Base URL of the Jaeger UI for trace links.
    pub jaeger_ui_url: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StallConfig {
    /// Whether the poll hooks and the watcher thread run at all.
    pub watch: bool,
    /// A poll longer than this is a stall.
    pub threshold_ms: u64,
    /// Finished stalls kept for /debug/stalls.
    pub history: usize,
    /// At each stall, spawn an empty task from the watcher thread, which
    /// wakes a sleeping worker to take over the I/O driver (README, "A free
    /// worker is not enough"). Off: stall-lab shows the runtime as it is.
    pub wake_idle_worker: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address of the application server; port 0 picks a free port.
    pub listen: SocketAddr,
    /// How long requests in flight may finish after SIGINT/SIGTERM.
    pub shutdown_grace_ms: u64,
    /// A connection that has not sent a whole request head this long after
    /// it started one (or after its previous answer) is closed.
    pub header_read_timeout_ms: u64,
    /// Connections served at once; past it the server stops accepting until
    /// one closes.
    pub max_connections: usize,
    /// Largest request head (request line and headers), in bytes; past it
    /// the answer is 431 and the connection is closed.
    pub max_header_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Flavor {
    /// Several worker threads; tasks run in parallel and can be stolen.
    MultiThread,
    /// One thread polls every task; tasks interleave only at `.await`.
    CurrentThread,
}

impl Flavor {
    pub fn as_str(self) -> &'static str {
        match self {
            Flavor::MultiThread => "multi_thread",
            Flavor::CurrentThread => "current_thread",
        }
    }
}

impl fmt::Display for Flavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    pub flavor: Flavor,
    /// 0 means one worker per CPU core; see [`RuntimeConfig::effective_workers`].
    pub worker_threads: usize,
    pub max_blocking_threads: usize,
}

impl RuntimeConfig {
    /// The number of threads that will poll tasks: 1 for `current_thread`,
    /// otherwise `worker_threads`, where 0 means "one per core".
    pub fn effective_workers(&self) -> usize {
        match self.flavor {
            Flavor::CurrentThread => 1,
            Flavor::MultiThread if self.worker_threads == 0 => {
                std::thread::available_parallelism().map_or(1, |n| n.get())
            }
            Flavor::MultiThread => self.worker_threads,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_ms: u64,
    pub max_fanout: u64,
    pub max_stalling_in_flight: usize,
}

/// Where a configuration value came from, for error messages and
/// `--print-config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    File(PathBuf),
    Env(String),
    Flag(&'static str),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("built-in default"),
            Source::File(path) => write!(f, "config file {}", path.display()),
            Source::Env(var) => write!(f, "environment variable {var}"),
            Source::Flag(flag) => write!(f, "command-line flag {flag}"),
        }
    }
}

/// A configuration problem that stops startup (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error(
        "unknown configuration key `{key}` (from {origin}); see config/default.toml for every key"
    )]
    UnknownKey { key: String, origin: Source },
    #[error("bad value for `{key}` (from {origin}): {message}")]
    BadValue {
        key: String,
        origin: Source,
        message: String,
    },
}

/// Command-line overrides, applied last. Each field is `None` unless the flag
/// was given.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub flavor: Option<Flavor>,
    pub workers: Option<usize>,
    /// `--admin-listen`: `admin.listen`.
    pub admin_listen: Option<SocketAddr>,
    /// `--no-otlp`: `telemetry.otlp = false`.
    pub no_otlp: bool,
    /// `--no-console`: `telemetry.console = false`.
    pub no_console: bool,
}

/// The effective configuration plus where each key's value came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub sources: BTreeMap<String, Source>,
}

impl Loaded {
    /// The configuration as TOML, each key followed by a comment naming the
    /// layer that set it. The output is itself a valid config file.
    pub fn to_annotated_toml(&self) -> String {
        let table = Table::try_from(&self.config).expect("Config serializes to a TOML table");
        let mut out = String::new();
        for (section, body) in &table {
            let Value::Table(body) = body else { continue };
            out.push_str(&format!("[{section}]\n"));
            for (key, value) in body {
                let path = format!("{section}.{key}");
                let source = self.sources.get(&path).unwrap_or(&Source::Default);
                out.push_str(&format!("{key} = {value}  # {source}\n"));
            }
            out.push('\n');
        }
        out
    }
}

/// Loads the configuration from every layer. `env` is passed in (rather than
/// read from the process) so tests can exercise the layering directly.
pub fn load(
    file: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
    overrides: &Overrides,
) -> Result<Loaded, ConfigError> {
    let defaults: Table = DEFAULT_TOML
        .parse()
        .expect("the embedded config/default.toml is valid TOML");
    let mut merged = defaults.clone();
    let mut sources = BTreeMap::new();

    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let table: Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Syntax {
                path: path.to_owned(),
                message: e.message().to_owned(),
            })?;
        let source = Source::File(path.to_owned());
        for (section, body) in table {
            let Value::Table(body) = body else {
                return Err(ConfigError::UnknownKey {
                    key: section,
                    origin: source,
                });
            };
            for (key, value) in body {
                set(
                    &defaults,
                    &mut merged,
                    &mut sources,
                    &section,
                    &key,
                    value,
                    &source,
                )?;
            }
        }
    }

    // Sorted, so that with two bad variables the error is deterministic.
    let mut env: Vec<_> = env
        .into_iter()
        .filter(|(name, _)| name.starts_with(ENV_PREFIX))
        .collect();
    env.sort();
    for (name, raw) in env {
        let source = Source::Env(name.clone());
        let rest = &name[ENV_PREFIX.len()..];
        let Some((section, key)) = rest.split_once("__") else {
            return Err(ConfigError::UnknownKey {
                key: rest.to_lowercase(),
                origin: source,
            });
        };
        let (section, key) = (section.to_lowercase(), key.to_lowercase());
        let value = value_from_env(&defaults, &section, &key, &raw, &source)?;
        set(
            &defaults,
            &mut merged,
            &mut sources,
            &section,
            &key,
            value,
            &source,
        )?;
    }

    let mut config = deserialize(merged, &sources)?;

    if let Some(listen) = overrides.listen {
        config.server.listen = listen;
        sources.insert("server.listen".into(), Source::Flag("--listen"));
    }
    if let Some(flavor) = overrides.flavor {
        config.runtime.flavor = flavor;
        sources.insert("runtime.flavor".into(), Source::Flag("--flavor"));
    }
    if let Some(workers) = overrides.workers {
        config.runtime.worker_threads = workers;
        sources.insert("runtime.worker_threads".into(), Source::Flag("--workers"));
    }

    if let Some(listen) = overrides.admin_listen {
        config.admin.listen = listen;
        sources.insert("admin.listen".into(), Source::Flag("--admin-listen"));
    }
    if overrides.no_otlp {
        config.telemetry.otlp = false;
        sources.insert("telemetry.otlp".into(), Source::Flag("--no-otlp"));
    }
    if overrides.no_console {
        config.telemetry.console = false;
        sources.insert("telemetry.console".into(), Source::Flag("--no-console"));
    }

    let loaded = Loaded { config, sources };
    validate(&loaded)?;
    Ok(loaded)
}

/// Sets `section.key` in `merged`, refusing keys the defaults do not have.
fn set(
    defaults: &Table,
    merged: &mut Table,
    sources: &mut BTreeMap<String, Source>,
    section: &str,
    key: &str,
    value: Value,
    source: &Source,
) -> Result<(), ConfigError> {
    let known = defaults
        .get(section)
        .and_then(Value::as_table)
        .is_some_and(|t| t.contains_key(key));
    if !known {
        return Err(ConfigError::UnknownKey {
            key: format!("{section}.{key}"),
            origin: source.clone(),
        });
    }
    merged
        .get_mut(section)
        .and_then(Value::as_table_mut)
        .expect("section exists: checked against the defaults")
        .insert(key.to_owned(), value);
    sources.insert(format!("{section}.{key}"), source.clone());
    Ok(())
}

/// Environment variables are strings; the default's type says how to read
/// one, so `STALL_LAB__RUNTIME__WORKER_THREADS=two` is "expected an integer"
/// rather than a string that fails later with a vaguer message.
fn value_from_env(
    defaults: &Table,
    section: &str,
    key: &str,
    raw: &str,
    source: &Source,
) -> Result<Value, ConfigError> {
    let default = defaults
        .get(section)
        .and_then(Value::as_table)
        .and_then(|t| t.get(key))
        .ok_or_else(|| ConfigError::UnknownKey {
            key: format!("{section}.{key}"),
            origin: source.clone(),
        })?;
    let bad = |expected: &str| ConfigError::BadValue {
        key: format!("{section}.{key}"),
        origin: source.clone(),
        message: format!("expected {expected}, got {raw:?}"),
    };
    Ok(match default {
        Value::Integer(_) => Value::Integer(raw.trim().parse().map_err(|_| bad("an integer"))?),
        Value::Boolean(_) => Value::Boolean(raw.trim().parse().map_err(|_| bad("true or false"))?),
        Value::Float(_) => Value::Float(raw.trim().parse().map_err(|_| bad("a number"))?),
        _ => Value::String(raw.to_owned()),
    })
}

fn deserialize(merged: Table, sources: &BTreeMap<String, Source>) -> Result<Config, ConfigError> {
    serde_path_to_error::deserialize(Value::Table(merged)).map_err(|err| {
        let key = err.path().to_string();
        let source = sources.get(&key).cloned().unwrap_or(Source::Default);
        ConfigError::BadValue {
            key,
            origin: source,
            message: err.into_inner().message().to_owned(),
        }
    })
}

/// Checks that go beyond types: ranges that would make the runtime panic or
/// the scenarios meaningless.
fn validate(loaded: &Loaded) -> Result<(), ConfigError> {
    let c = &loaded.config;
    let check = |ok: bool, key: &str, message: String| -> Result<(), ConfigError> {
        if ok {
            return Ok(());
        }
        Err(ConfigError::BadValue {
            key: key.to_owned(),
            origin: loaded.sources.get(key).cloned().unwrap_or(Source::Default),
            message,
        })
    };
    // Each (key, value, allowed range): a value outside would make the
    // runtime panic or the scenarios meaningless.
    let ranges: [(&str, u64, std::ops::RangeInclusive<u64>); 10] = [
        (
            "runtime.worker_threads",
            c.runtime.worker_threads as u64,
            0..=256,
        ),
        (
            "runtime.max_blocking_threads",
            c.runtime.max_blocking_threads as u64,
            1..=4096,
        ),
        (
            "server.header_read_timeout_ms",
            c.server.header_read_timeout_ms,
            1..=3_600_000,
        ),
        (
            "server.max_connections",
            c.server.max_connections as u64,
            1..=1_000_000,
        ),
        // hyper's smallest read buffer is 8192 bytes.
        (
            "server.max_header_bytes",
            c.server.max_header_bytes as u64,
            8192..=1_048_576,
        ),
        ("limits.max_ms", c.limits.max_ms, 1..=3_600_000),
        ("limits.max_fanout", c.limits.max_fanout, 1..=10_000),
        ("stall.threshold_ms", c.stall.threshold_ms, 1..=60_000),
        ("stall.history", c.stall.history as u64, 1..=100_000),
        (
            "telemetry.console_task_budget",
            c.telemetry.console_task_budget,
            0..=10_000_000,
        ),
    ];
    for (key, value, allowed) in ranges {
        check(
            allowed.contains(&value),
            key,
            format!("{value} is outside {}..={}", allowed.start(), allowed.end()),
        )?;
    }
    check(
        c.limits.max_stalling_in_flight >= 1,
        "limits.max_stalling_in_flight",
        "must be at least 1".to_owned(),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_deserialize() {
        let loaded = load(None, env(&[]), &Overrides::default()).unwrap();
        assert_eq!(loaded.config.runtime.flavor, Flavor::MultiThread);
        assert_eq!(loaded.config.limits.max_ms, 10_000);
        assert!(loaded.sources.is_empty());
    }

    #[test]
    fn env_overrides_defaults_and_flag_overrides_env() {
        let e = env(&[
            ("STALL_LAB__RUNTIME__FLAVOR", "current_thread"),
            ("STALL_LAB__LIMITS__MAX_MS", "50"),
        ]);
        let loaded = load(None, e.clone(), &Overrides::default()).unwrap();
        assert_eq!(loaded.config.runtime.flavor, Flavor::CurrentThread);
        assert_eq!(loaded.config.limits.max_ms, 50);

        let flags = Overrides {
            flavor: Some(Flavor::MultiThread),
            ..Overrides::default()
        };
        let loaded = load(None, e, &flags).unwrap();
        assert_eq!(loaded.config.runtime.flavor, Flavor::MultiThread);
        assert_eq!(loaded.sources["runtime.flavor"], Source::Flag("--flavor"));
    }

    #[test]
    fn unknown_env_key_is_named() {
        let err = load(
            None,
            env(&[("STALL_LAB__RUNTIME__WORKERS", "2")]),
            &Overrides::default(),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("runtime.workers"), "{msg}");
        assert!(msg.contains("STALL_LAB__RUNTIME__WORKERS"), "{msg}");
    }

    #[test]
    fn bad_env_value_is_named() {
        let err = load(
            None,
            env(&[("STALL_LAB__RUNTIME__FLAVOR", "parallel")]),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("runtime.flavor"), "{err}");
        assert!(err.contains("STALL_LAB__RUNTIME__FLAVOR"), "{err}");
        let err = load(
            None,
            env(&[("STALL_LAB__LIMITS__MAX_MS", "lots")]),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("expected an integer"), "{err}");
    }

    #[test]
    fn annotated_output_is_a_valid_config() {
        let loaded = load(
            None,
            env(&[("STALL_LAB__LIMITS__MAX_MS", "50")]),
            &Overrides::default(),
        )
        .unwrap();
        let text = loaded.to_annotated_toml();
        assert!(
            text.contains("max_ms = 50  # environment variable STALL_LAB__LIMITS__MAX_MS"),
            "{text}"
        );
        let reparsed: Config = toml::from_str(&text).unwrap();
        assert_eq!(reparsed.limits.max_ms, 50);
    }
}

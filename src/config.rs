//! Layered configuration: built-in defaults, then `--config FILE`, then
//! `STALL_LAB__SECTION__KEY` environment variables, then command-line flags.
//!
//! The built-in defaults *are* `config/default.toml`, embedded at compile time,
//! so there is one place for every default and the binary runs from any
//! directory. Every key a later layer sets must already exist in that file:
//! a typo such as `STALL_LAB__RUNTIME__WORKERS` is a startup error naming the
//! variable, not a silently ignored setting.
//!
//! Each layer is a figment provider named after where its keys came from (one
//! per file, per environment variable, per flag). figment merges them and tags
//! every value with its provider, so a bad value is reported as
//! "runtime.flavor (from environment variable STALL_LAB__RUNTIME__FLAVOR)"
//! and `--print-config` can say where each value came from.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Format, Toml};
use figment::value::{Dict, Map, Num, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};

/// The embedded defaults. Also the schema: a key absent here is unknown.
const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Prefix of the environment variables that override configuration keys.
const ENV_PREFIX: &str = "STALL_LAB__";

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
    /// Host names the admin server answers besides loopback ones.
    pub allowed_hosts: Vec<String>,
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
    /// Capture the held worker's stack during a stall (Linux x86_64 and
    /// aarch64).
    pub stacks: bool,
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
    /// Added to the nice value of a blocking-pool thread before it runs
    /// offloaded CPU work: see [`crate::cpu::lower_priority`].
    pub offload_nice: u8,
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
        let table = toml::Table::try_from(&self.config).expect("Config serializes to a TOML table");
        let mut out = String::new();
        for (section, body) in &table {
            let toml::Value::Table(body) = body else {
                continue;
            };
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
    let defaults = Layer {
        source: Source::Default,
        data: toml_dict(DEFAULT_TOML).expect("the embedded config/default.toml is valid TOML"),
    };
    let mut layers = Vec::new();
    if let Some(path) = file {
        layers.push(file_layer(path)?);
    }
    layers.extend(env_layers(&defaults.data, env)?);
    layers.extend(flag_layers(overrides));

    let figment = layers
        .iter()
        .fold(Figment::from(&defaults), |figment, layer| {
            figment.merge(layer)
        });
    let config: Config = figment.extract().map_err(|err| bad_value(err, &layers))?;
    let sources = sources(&figment, &defaults.data, &layers);

    let loaded = Loaded { config, sources };
    validate(&loaded)?;
    Ok(loaded)
}

/// One layer's keys and where they came from: a figment provider whose
/// metadata name is the [`Source`], so figment's errors and
/// `find_metadata` lead back to it.
struct Layer {
    source: Source,
    data: Dict,
}

impl Provider for Layer {
    fn metadata(&self) -> Metadata {
        Metadata::named(self.source.to_string())
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        Ok(Profile::Default.collect(self.data.clone()))
    }
}

impl Layer {
    /// A layer that sets one `section.key`.
    fn one(source: Source, path: &str, value: Value) -> Self {
        let (section, key) = path.split_once('.').expect("a section.key path");
        let body = Dict::from([(key.to_owned(), value)]);
        let data = Dict::from([(section.to_owned(), Value::from(body))]);
        Self { source, data }
    }
}

/// The keys of a TOML document, or the parser's message.
fn toml_dict(text: &str) -> Result<Dict, String> {
    let mut profiles = Toml::string(text).data().map_err(|e| e.kind.to_string())?;
    Ok(profiles.remove(&Profile::Default).unwrap_or_default())
}

fn file_layer(path: &Path) -> Result<Layer, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let data = toml_dict(&text).map_err(|message| ConfigError::Syntax {
        path: path.to_owned(),
        message,
    })?;
    Ok(Layer {
        source: Source::File(path.to_owned()),
        data,
    })
}

/// One layer per `STALL_LAB__SECTION__KEY` variable, sorted by name so that
/// with two bad variables the error is deterministic.
fn env_layers(
    defaults: &Dict,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Vec<Layer>, ConfigError> {
    let mut env: Vec<_> = env
        .into_iter()
        .filter(|(name, _)| name.starts_with(ENV_PREFIX))
        .collect();
    env.sort();
    env.into_iter()
        .map(|(name, raw)| {
            let source = Source::Env(name.clone());
            let rest = &name[ENV_PREFIX.len()..];
            let Some((section, key)) = rest.split_once("__") else {
                return Err(ConfigError::UnknownKey {
                    key: rest.to_lowercase(),
                    origin: source,
                });
            };
            let (section, key) = (section.to_lowercase(), key.to_lowercase());
            let value = value_from_env(defaults, &section, &key, &raw, &source)?;
            Ok(Layer::one(source, &format!("{section}.{key}"), value))
        })
        .collect()
}

/// Environment variables are strings; the default's type says how to read
/// one, so `STALL_LAB__RUNTIME__WORKER_THREADS=two` is "expected an integer"
/// rather than a string that fails later with a vaguer message (figment's
/// `Env` provider guesses the type from the text instead).
fn value_from_env(
    defaults: &Dict,
    section: &str,
    key: &str,
    raw: &str,
    source: &Source,
) -> Result<Value, ConfigError> {
    let default = defaults
        .get(section)
        .and_then(Value::as_dict)
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
    let trimmed = raw.trim();
    Ok(match default {
        Value::Num(_, Num::F32(_) | Num::F64(_)) => {
            trimmed.parse::<f64>().map_err(|_| bad("a number"))?.into()
        }
        Value::Num(..) => trimmed
            .parse::<i64>()
            .map_err(|_| bad("an integer"))?
            .into(),
        Value::Bool(..) => trimmed
            .parse::<bool>()
            .map_err(|_| bad("true or false"))?
            .into(),
        _ => raw.into(),
    })
}

/// One layer per command-line flag given.
fn flag_layers(o: &Overrides) -> Vec<Layer> {
    #[rustfmt::skip]
    let flags: [(&'static str, &str, Option<Value>); 6] = [
        ("--listen", "server.listen", o.listen.map(|a| a.to_string().into())),
        ("--flavor", "runtime.flavor", o.flavor.map(|f| f.as_str().into())),
        ("--workers", "runtime.worker_threads", o.workers.map(|n| (n as u64).into())),
        ("--admin-listen", "admin.listen", o.admin_listen.map(|a| a.to_string().into())),
        ("--no-otlp", "telemetry.otlp", o.no_otlp.then(|| false.into())),
        ("--no-console", "telemetry.console", o.no_console.then(|| false.into())),
    ];
    let layer = |(flag, key, value): (_, _, Option<Value>)| {
        Some(Layer::one(Source::Flag(flag), key, value?))
    };
    flags.into_iter().filter_map(layer).collect()
}

/// The layer a figment metadata names.
fn source_of(metadata: Option<&Metadata>, layers: &[Layer]) -> Source {
    metadata
        .and_then(|m| layers.iter().find(|l| l.source.to_string() == m.name))
        .map_or(Source::Default, |l| l.source.clone())
}

/// A deserialization error, with the key and the layer its value came from.
/// An unknown key is one the structs above, and so `config/default.toml`,
/// do not have (every struct denies unknown fields).
fn bad_value(err: figment::Error, layers: &[Layer]) -> ConfigError {
    let key = err.path.join(".");
    let origin = source_of(err.metadata.as_ref(), layers);
    let message = match err.kind {
        figment::error::Kind::UnknownField(..) => return ConfigError::UnknownKey { key, origin },
        // figment's own wording quotes the list twice.
        figment::error::Kind::UnknownVariant(found, expected) => format!(
            "unknown variant `{found}`, expected one of `{}`",
            expected.join("`, `")
        ),
        kind => kind.to_string(),
    };
    ConfigError::BadValue {
        key,
        origin,
        message,
    }
}

/// Which layer set each key that is not at its default.
fn sources(figment: &Figment, defaults: &Dict, layers: &[Layer]) -> BTreeMap<String, Source> {
    let mut sources = BTreeMap::new();
    for (section, body) in defaults {
        let Some(body) = body.as_dict() else { continue };
        for key in body.keys() {
            let path = format!("{section}.{key}");
            let source = source_of(figment.find_metadata(&path), layers);
            if source != Source::Default {
                sources.insert(path, source);
            }
        }
    }
    sources
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
    let ranges: [(&str, u64, std::ops::RangeInclusive<u64>); 11] = [
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
            "runtime.offload_nice",
            u64::from(c.runtime.offload_nice),
            0..=19,
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
        for nice in ["20", "-1"] {
            let err = load(
                None,
                env(&[("STALL_LAB__RUNTIME__OFFLOAD_NICE", nice)]),
                &Overrides::default(),
            )
            .unwrap_err()
            .to_string();
            assert!(err.contains("runtime.offload_nice"), "{nice}: {err}");
        }
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

//! The environment variables of the OpenTelemetry and tokio-console
//! ecosystems, resolved on top of the `[telemetry]` section.
//!
//! Pure functions of a lookup: tests pass a map instead of mutating the
//! process environment (which is `unsafe` in edition 2024).

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use super::TelemetryError;
use super::settings::{OtlpProtocol, TelemetryConfig};

pub(super) type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

pub(super) fn env_nonempty(env: EnvLookup<'_>, key: &str) -> Option<String> {
    env(key).filter(|v| !v.trim().is_empty())
}

/// Where traces go, after env overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ResolvedOtlp {
    pub(super) protocol: OtlpProtocol,
    /// Full URL handed to the exporter (http: includes `/v1/traces`).
    pub(super) endpoint: String,
    /// Which setting chose the endpoint (for the startup log).
    pub(super) endpoint_source: &'static str,
    pub(super) protocol_source: &'static str,
    /// Per-export deadline (`OTEL_EXPORTER_OTLP_TRACES_TIMEOUT` >
    /// `OTEL_EXPORTER_OTLP_TIMEOUT` > 10 s), milliseconds in the env vars.
    pub(super) timeout: Duration,
}

/// Endpoint precedence: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (as-is) >
/// `OTEL_EXPORTER_OTLP_ENDPOINT` (base) > `telemetry.otlp_endpoint` (base).
/// Protocol: `OTEL_EXPORTER_OTLP_TRACES_PROTOCOL` > `OTEL_EXPORTER_OTLP_PROTOCOL` > config.
///
/// We resolve this ourselves and pass the result to the exporter builder
/// programmatically (which in opentelemetry-otlp 0.33 beats every env var), so
/// the startup log can say exactly where spans go.
pub(super) fn resolve_otlp(
    cfg: &TelemetryConfig,
    env: EnvLookup<'_>,
) -> Result<ResolvedOtlp, TelemetryError> {
    let (protocol, protocol_source) = match [
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
        "OTEL_EXPORTER_OTLP_PROTOCOL",
    ]
    .into_iter()
    .find_map(|k| env_nonempty(env, k).map(|v| (k, v)))
    {
        Some((key, v)) => {
            let p = OtlpProtocol::parse(&v).ok_or_else(|| TelemetryError::Config {
                key: if key.contains("TRACES") {
                    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
                } else {
                    "OTEL_EXPORTER_OTLP_PROTOCOL"
                },
                message: format!(
                    "{v:?} is not supported (use \"http/protobuf\" or \"grpc\"; http/json is not built in)"
                ),
            })?;
            (p, key)
        }
        None => (cfg.otlp_protocol, "telemetry.otlp_protocol"),
    };
    let with_path = |base: &str| match protocol {
        // OTLP/HTTP: a *base* URL gets the per-signal path appended (spec).
        OtlpProtocol::HttpProtobuf => format!("{}/v1/traces", base.trim_end_matches('/')),
        // gRPC has no per-signal path: the service name is the path.
        OtlpProtocol::Grpc => base.to_string(),
    };
    let (endpoint, endpoint_source) =
        if let Some(v) = env_nonempty(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            (v, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        } else if let Some(v) = env_nonempty(env, "OTEL_EXPORTER_OTLP_ENDPOINT") {
            (with_path(&v), "OTEL_EXPORTER_OTLP_ENDPOINT")
        } else {
            (with_path(&cfg.otlp_endpoint), "telemetry.otlp_endpoint")
        };
    let timeout = match [
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ]
    .into_iter()
    .find_map(|k| env_nonempty(env, k).map(|v| (k, v)))
    {
        Some((key, v)) => {
            Duration::from_millis(v.trim().parse().map_err(|_| TelemetryError::Config {
                key: if key.contains("TRACES") {
                    "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT"
                } else {
                    "OTEL_EXPORTER_OTLP_TIMEOUT"
                },
                message: format!("{v:?} is not a number of milliseconds"),
            })?)
        }
        None => Duration::from_secs(10),
    };
    Ok(ResolvedOtlp {
        protocol,
        endpoint,
        endpoint_source,
        protocol_source,
        timeout,
    })
}

/// tokio-console settings after env overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ResolvedConsole {
    pub(super) listen: SocketAddr,
    pub(super) listen_from_env: bool,
    pub(super) retention: Duration,
    pub(super) publish_interval: Duration,
}

/// `TOKIO_CONSOLE_BIND` / `_RETENTION` / `_PUBLISH_INTERVAL` override the
/// config. We parse them here instead of calling console-subscriber's
/// `Builder::with_default_env()`, because that *panics* on a malformed value
/// (and would also read `TOKIO_CONSOLE_RECORD_PATH`/`_BUFFER_CAPACITY`).
pub(super) fn resolve_console(
    cfg: &TelemetryConfig,
    env: EnvLookup<'_>,
) -> Result<ResolvedConsole, TelemetryError> {
    let (listen, listen_from_env) = match env_nonempty(env, "TOKIO_CONSOLE_BIND") {
        Some(v) => {
            let addr = v
                .to_socket_addrs()
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| TelemetryError::Config {
                    key: "TOKIO_CONSOLE_BIND",
                    message: format!("{v:?} is not HOST:PORT"),
                })?;
            (addr, true)
        }
        None => (cfg.console_listen, false),
    };
    // `key` overrides `configured`; a bare number is in `bare_unit`.
    let duration =
        |key: &'static str, bare_unit: Duration, examples: &str, configured| match env_nonempty(
            env, key,
        ) {
            Some(v) => parse_duration(&v, bare_unit).ok_or_else(|| TelemetryError::Config {
                key,
                message: format!("{v:?} is not a duration (e.g. {examples})"),
            }),
            None => Ok(configured),
        };
    let retention = duration(
        "TOKIO_CONSOLE_RETENTION",
        Duration::from_secs(1),
        "600, 600s, 10m",
        Duration::from_secs(cfg.console_retention_secs),
    )?;
    let publish_interval = duration(
        "TOKIO_CONSOLE_PUBLISH_INTERVAL",
        Duration::from_millis(1),
        "1000, 1000ms, 1s",
        Duration::from_millis(cfg.console_publish_interval_ms),
    )?;
    Ok(ResolvedConsole {
        listen,
        listen_from_env,
        retention,
        publish_interval,
    })
}

/// Parses `"250ms"`, `"3s"`, `"10m"`, `"1h"`; a bare number is in `bare_unit`
/// (console-subscriber itself uses humantime and rejects bare numbers).
fn parse_duration(s: &str, bare_unit: Duration) -> Option<Duration> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let unit = match unit.trim() {
        "" => bare_unit,
        "ms" => Duration::from_millis(1),
        "s" | "sec" | "secs" => Duration::from_secs(1),
        "m" | "min" | "mins" => Duration::from_secs(60),
        "h" | "hr" | "hrs" => Duration::from_secs(3600),
        _ => return None,
    };
    unit.checked_mul(u32::try_from(n).ok()?)
}

/// The log filter: `RUST_LOG` wins over `telemetry.log`. Returns the filter
/// and the setting it came from.
pub(super) fn resolve_log(cfg: &TelemetryConfig, env: EnvLookup<'_>) -> (String, &'static str) {
    match env_nonempty(env, "RUST_LOG") {
        Some(v) => (v, "RUST_LOG"),
        None => (cfg.log.clone(), "telemetry.log"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn endpoint_precedence() {
        let cfg = TelemetryConfig::default();
        let r = resolve_otlp(&cfg, &env_of(&[])).unwrap();
        assert_eq!(r.endpoint, "http://localhost:4318/v1/traces");
        assert_eq!(r.protocol, OtlpProtocol::HttpProtobuf);

        let r = resolve_otlp(
            &cfg,
            &env_of(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318/")]),
        )
        .unwrap();
        assert_eq!(r.endpoint, "http://c:4318/v1/traces");

        let r = resolve_otlp(
            &cfg,
            &env_of(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:1/custom"),
            ]),
        )
        .unwrap();
        assert_eq!(r.endpoint, "http://t:1/custom");
        assert_eq!(r.endpoint_source, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    }

    #[test]
    fn protocol_precedence() {
        let cfg = TelemetryConfig {
            otlp_endpoint: "http://x:4317".into(),
            ..Default::default()
        };
        let r = resolve_otlp(&cfg, &env_of(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")])).unwrap();
        assert_eq!(r.protocol, OtlpProtocol::Grpc);
        assert_eq!(r.endpoint, "http://x:4317", "grpc gets no /v1/traces");
        let r = resolve_otlp(
            &cfg,
            &env_of(&[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf"),
            ]),
        )
        .unwrap();
        assert_eq!(r.protocol, OtlpProtocol::HttpProtobuf);
        let err = resolve_otlp(
            &cfg,
            &env_of(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("OTEL_EXPORTER_OTLP_PROTOCOL"),
            "{err}"
        );
    }

    #[test]
    fn console_env_overrides() {
        let cfg = TelemetryConfig::default();
        let c = resolve_console(&cfg, &env_of(&[])).unwrap();
        assert_eq!(c.retention, Duration::from_secs(600));
        assert_eq!(c.publish_interval, Duration::from_millis(1000));
        let c = resolve_console(
            &cfg,
            &env_of(&[
                ("TOKIO_CONSOLE_BIND", "127.0.0.1:7000"),
                ("TOKIO_CONSOLE_RETENTION", "10m"),
                ("TOKIO_CONSOLE_PUBLISH_INTERVAL", "250"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:7000".parse().unwrap());
        assert!(c.listen_from_env);
        assert_eq!(c.retention, Duration::from_secs(600));
        assert_eq!(c.publish_interval, Duration::from_millis(250));
        assert!(resolve_console(&cfg, &env_of(&[("TOKIO_CONSOLE_RETENTION", "soon")])).is_err());
    }
}

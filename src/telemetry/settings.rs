//! The `[telemetry]` section of the configuration.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Wire protocol of the OTLP exporter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
pub enum OtlpProtocol {
    /// OTLP/HTTP with protobuf bodies, POSTed to `<base>/v1/traces` (port 4318).
    #[default]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// OTLP/gRPC via tonic (port 4317).
    #[serde(rename = "grpc")]
    Grpc,
}

impl OtlpProtocol {
    /// Parses the values the OpenTelemetry spec uses in `OTEL_EXPORTER_OTLP_PROTOCOL`.
    pub(super) fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "http/protobuf" => Some(Self::HttpProtobuf),
            "grpc" => Some(Self::Grpc),
            _ => None,
        }
    }
}

impl fmt::Display for OtlpProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::HttpProtobuf => "http/protobuf",
            Self::Grpc => "grpc",
        })
    }
}

/// The `[telemetry]` section of the config file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// fmt layer filter, e.g. `"info,stall_lab=debug"`; `RUST_LOG` overrides it.
    pub log: String,
    /// Filter for what becomes an OTLP span (on top of the fixed deny-list of
    /// tokio/exporter targets). App spans are at INFO.
    pub otlp_filter: String,
    /// Export spans over OTLP. When false there is no OpenTelemetry layer:
    /// no spans, no trace ids, no cost.
    pub otlp: bool,
    /// Base URL of the collector, e.g. `http://localhost:4318` (http) or
    /// `http://localhost:4317` (grpc).
    pub otlp_endpoint: String,
    pub otlp_protocol: OtlpProtocol,
    /// Batch span processor delay. 500 ms so a stall shows up in Jaeger within
    /// ~1 s (the SDK default is 5 s). `OTEL_BSP_SCHEDULE_DELAY` overrides.
    pub batch_delay_ms: u64,
    /// Run the tokio-console server (needs `--cfg tokio_unstable`).
    pub console: bool,
    /// `TOKIO_CONSOLE_BIND` overrides. Port 0 picks a free port; see
    /// [`Telemetry::console_addr`](super::Telemetry::console_addr).
    pub console_listen: SocketAddr,
    /// `TOKIO_CONSOLE_RETENTION` overrides (`600`, `600s`, `10m`).
    pub console_retention_secs: u64,
    /// `TOKIO_CONSOLE_PUBLISH_INTERVAL` overrides (`1000`, `1000ms`, `1s`).
    pub console_publish_interval_ms: u64,
    /// Tasks the console may record per retention window; 0 = no limit.
    /// See `telemetry::console_budget`.
    pub console_task_budget: u64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log: "info".into(),
            otlp_filter: "info".into(),
            otlp: true,
            otlp_endpoint: "http://localhost:4318".into(),
            otlp_protocol: OtlpProtocol::HttpProtobuf,
            batch_delay_ms: 500,
            console: true,
            console_listen: SocketAddr::from(([127, 0, 0, 1], 6669)),
            console_retention_secs: 600,
            console_publish_interval_ms: 1000,
            console_task_budget: 1000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_protocol_names() {
        #[derive(Deserialize)]
        struct W {
            p: OtlpProtocol,
        }
        let w: W = serde_json::from_str(r#"{"p":"http/protobuf"}"#).unwrap();
        assert_eq!(w.p, OtlpProtocol::HttpProtobuf);
        let w: W = serde_json::from_str(r#"{"p":"grpc"}"#).unwrap();
        assert_eq!(w.p, OtlpProtocol::Grpc);
    }
}

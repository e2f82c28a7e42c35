//! The container configuration, through the real binary: `config/docker.toml`
//! is valid for this build, and a server started from it (listeners moved to
//! port 0, OTLP pointed at an in-process receiver instead of `jaeger:4318`)
//! serves and exports. The compose file itself is checked offline by
//! `scripts/check-compose.sh` (schema, docker-compose, cross-file agreement).

use std::time::Duration;

use crate::helpers::run_to_end;

fn docker_toml() -> String {
    format!("{}/config/docker.toml", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn docker_toml_is_a_valid_config_that_listens_beyond_loopback() {
    let output = run_to_end(
        &["serve", "--config", &docker_toml(), "--print-config"],
        &[],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let effective: toml::Table = String::from_utf8(output.stdout).unwrap().parse().unwrap();
    let get = |section: &str, key: &str| {
        effective[section][key]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    // Inside a container 127.0.0.1 is unreachable from the published ports.
    assert_eq!(get("server", "listen"), "0.0.0.0:3000");
    // (The harness moves the admin and console listeners to port 0 through
    // the environment, which beats the file; read the file itself for them.)
    let file: toml::Table = std::fs::read_to_string(docker_toml())
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(file["admin"]["listen"].as_str(), Some("0.0.0.0:3001"));
    assert_eq!(
        file["telemetry"]["console_listen"].as_str(),
        Some("0.0.0.0:6669")
    );
    // The endpoint's port matches its protocol.
    let endpoint = file["telemetry"]["otlp_endpoint"].as_str().unwrap();
    match file["telemetry"]["otlp_protocol"].as_str().unwrap() {
        "http/protobuf" => assert!(endpoint.ends_with(":4318"), "{endpoint}"),
        "grpc" => assert!(endpoint.ends_with(":4317"), "{endpoint}"),
        other => panic!("unknown protocol {other}"),
    }
}

#[tokio::test]
async fn a_server_from_docker_toml_serves_and_exports() {
    let c = crate::otlp_support::Receiver::start("http/protobuf");
    let app = crate::telemetry::traced_app(&c, &["--config", &docker_toml()], &[]);
    let answer = app.get_json("/block/sleep?ms=50").await;
    assert_eq!(answer["workers"].as_array().unwrap().len(), 1);
    let arrived = c
        .store
        .wait_for(
            |spans| spans.iter().any(|s| s.name == "GET /block/sleep"),
            Duration::from_secs(10),
        )
        .await;
    assert!(arrived, "no request span from the docker.toml server");
    let spans = c.store.spans();
    let span = spans.iter().find(|s| s.name == "GET /block/sleep").unwrap();
    assert_eq!(
        span.resource["stall_lab.runtime.workers"], "2",
        "docker.toml pins 2 workers"
    );
}

//! Runs `examples/axum_app.rs` (a plain axum service, not stall-lab) and
//! checks what its user would: the stall is named by its route while it is
//! in progress, and the admin server answers through a total stall.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Example {
    child: Child,
    app: String,
    admin: String,
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GETs `url` and parses its JSON answer.
async fn get_json(client: &reqwest::Client, url: impl reqwest::IntoUrl) -> Value {
    client.get(url).send().await.unwrap().json().await.unwrap()
}

/// Starts the example (built by `cargo test` beside this test binary) with
/// one worker, on free ports, and reads its `listening:` lines.
fn start_example() -> Example {
    let deps = std::env::current_exe().expect("test binary path");
    let examples = deps
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("examples");
    let mut child = Command::new(examples.join("axum_app"))
        .env("APP_ADDR", "127.0.0.1:0")
        .env("ADMIN_ADDR", "127.0.0.1:0")
        .env("WORKERS", "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect(
            "the axum_app example is built by `cargo test -p stall-watch` (or `cargo build -p stall-watch --example axum_app`)",
        );
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let (mut app, mut admin) = (None, None);
    while app.is_none() || admin.is_none() {
        let line = lines.next().expect("a listening line").expect("utf-8");
        if let Some(url) = line.strip_prefix("listening: app ") {
            app = Some(url.to_owned());
        } else if let Some(url) = line.strip_prefix("listening: admin ") {
            admin = Some(url.to_owned());
        }
    }
    // Its logs go to stdout too: keep reading them, or its writes would
    // fail on a closed pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Example {
        child,
        app: app.unwrap_or_default(),
        admin: admin.unwrap_or_default(),
    }
}

#[tokio::test]
async fn a_plain_axum_service_names_its_stall_live_and_its_admin_answers_through_it() {
    let example = start_example();
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();

    // One worker: this request holds all of them for 2 s.
    let blocking = tokio::spawn({
        let client = client.clone();
        let url = format!("{}/orders/7/report", example.app);
        async move { client.get(url).send().await?.text().await }
    });

    let deadline = Instant::now() + Duration::from_secs(5);
    let stall = loop {
        let stalls: Value = get_json(&client, format!("{}/debug/stalls", example.admin)).await;
        if let Some(stall) = stalls["in_progress"].as_array().and_then(|a| a.first()) {
            break stall.clone();
        }
        assert!(Instant::now() < deadline, "no stall in progress: {stalls}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        stall["culprit"]["route"], "GET /orders/{id}/report",
        "{stall}"
    );

    // Every worker is held now, and the admin server still answers.
    let started = Instant::now();
    let dashboard = client.get(&example.admin).send().await.unwrap();
    assert_eq!(dashboard.status(), 200);
    assert!(dashboard.text().await.unwrap().contains("<html"));
    let runtime: Value = get_json(&client, format!("{}/debug/runtime", example.admin)).await;
    assert_eq!(runtime["worker_stats"][0]["state"], "stalled", "{runtime}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "the admin server took {:?} during the stall",
        started.elapsed()
    );

    // And the line that holds the worker, once the stack is in (the first
    // stack of a process waits for the debug info to be read; should that
    // outlast the stall, the filed stall has it).
    let deadline = Instant::now() + Duration::from_secs(10);
    let stack = loop {
        let stalls: Value = get_json(&client, format!("{}/debug/stalls", example.admin)).await;
        if let Some(stack) = stalls["in_progress"][0]["stack"]
            .as_array()
            .or_else(|| stalls["recent"][0]["stack"].as_array())
        {
            break stack.clone();
        }
        assert!(Instant::now() < deadline, "no stack: {stalls}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let top = stack
        .iter()
        .find(|f| f["user_code"] == true)
        .unwrap_or_else(|| panic!("no frame of the example's own: {stack:?}"));
    assert!(
        top["function"].as_str().unwrap().contains("render_report"),
        "{top}"
    );
    assert!(
        top["file"]
            .as_str()
            .unwrap()
            .ends_with("examples/axum_app.rs"),
        "{top}"
    );

    assert_eq!(blocking.await.unwrap().unwrap(), "report 7\n");
    // Once over, the stall is filed with its exact duration.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stalls: Value = get_json(&client, format!("{}/debug/stalls", example.admin)).await;
        if let Some(recent) = stalls["recent"].as_array().and_then(|a| a.first()) {
            assert_eq!(recent["culprit"]["route"], "GET /orders/{id}/report");
            assert!(
                recent["duration_ms"].as_f64().unwrap() >= 1900.0,
                "{recent}"
            );
            assert_eq!(recent["cpu"], "off-cpu", "{recent}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stall was not filed: {stalls}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

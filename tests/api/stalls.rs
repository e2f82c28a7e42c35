//! The stall watcher and the admin server: stalls named while they happen,
//! measured to within a few milliseconds, classified on/off-CPU, exported as
//! `executor.stall` spans; the admin server answering through a total stall.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::{TestApp, as_f64, exclusive, spawn_app, wait_until};

/// Waits until `/debug/stalls` reports at least `count` finished stalls.
async fn wait_for_stalls(app: &TestApp, count: u64) -> Value {
    let seen = wait_until(Duration::from_secs(5), || async move {
        let stalls = app.admin_json("/debug/stalls").await;
        if stalls["total"].as_u64().unwrap() >= count {
            Ok(stalls)
        } else {
            Err(stalls)
        }
    });
    seen.await.unwrap_or_else(|stalls| stalls)
}

/// Finished stalls blamed on the application. A stall classified
/// `preempted` is the OS running other threads on a busy machine (other
/// tests), not something a handler did.
fn app_stalls(stalls: &Value) -> Vec<Value> {
    stalls["recent"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["cpu"] != "preempted")
        .cloned()
        .collect()
}

fn worker_index(answer: &Value) -> u64 {
    let place = answer["workers"][0].as_str().unwrap();
    place.trim_start_matches("worker ").parse().unwrap()
}

#[tokio::test]
async fn a_200_ms_block_on_one_worker_of_two_is_exactly_one_stall() {
    let _exclusive = exclusive().await;
    let app = spawn_app(&["--workers", "2"], &[]);
    let answer = app.get_json("/block/sleep?ms=200").await;
    let stalls = wait_for_stalls(&app, 1).await;
    let found = app_stalls(&stalls);
    assert_eq!(found.len(), 1, "{stalls}");
    let stall = &found[0];
    let duration = as_f64(stall, "duration_ms");
    assert!((190.0..=230.0).contains(&duration), "{stall}");
    assert_eq!(
        stall["worker"].as_u64().unwrap(),
        worker_index(&answer),
        "{stall} vs {answer}"
    );
    assert_eq!(stall["culprit"]["route"], "GET /block/sleep", "{stall}");
    assert_eq!(stall["culprit"]["trace_id"], answer["trace_id"], "{stall}");
    // Traces are not exported in this test, so there is nothing to link to.
    assert!(stall["jaeger_url"].is_null(), "{stall}");
}

#[tokio::test]
async fn cooperative_requests_under_load_cause_no_stall() {
    let _exclusive = exclusive().await;
    let app = spawn_app(&["--workers", "2"], &[]);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let sleepers: Vec<_> = (0..20)
        .map(|_| {
            let (client, url) = (client.clone(), app.url("/coop/sleep?ms=1000"));
            tokio::spawn(async move { client.get(url).send().await.unwrap().status() })
        })
        .collect();
    // /healthz as fast as 4 connections can go, for as long as the sleepers run.
    let deadline = Instant::now() + Duration::from_millis(1000);
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (client, url) = (client.clone(), app.url("/healthz"));
            tokio::spawn(async move {
                let mut served = 0u32;
                while Instant::now() < deadline {
                    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
                    served += 1;
                }
                served
            })
        })
        .collect();
    let mut served = 0;
    for l in load {
        served += l.await.unwrap();
    }
    for s in sleepers {
        assert_eq!(s.await.unwrap(), 200);
    }
    let stalls = app.admin_json("/debug/stalls").await;
    assert!(served > 50, "the load ran: {served} probes");
    assert!(app_stalls(&stalls).is_empty(), "{stalls}");
}

#[tokio::test]
async fn the_admin_server_answers_during_a_total_stall_and_shows_it_live() {
    let _exclusive = exclusive().await;
    let app = spawn_app(&["--flavor", "current_thread"], &[]);
    let blocked = app.get_in_background("/block/sleep?ms=1000");
    app.wait_for_stall().await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut best = Duration::MAX;
    let mut last = Value::Null;
    for _ in 0..3 {
        let start = Instant::now();
        last = app.admin_json("/debug/stalls").await;
        best = best.min(start.elapsed());
    }
    assert!(!blocked.is_finished(), "still blocked while we looked");
    assert!(
        best < Duration::from_millis(50),
        "/debug/stalls took {best:?} during the stall"
    );
    let in_progress = last["in_progress"].as_array().unwrap();
    assert_eq!(in_progress.len(), 1, "{last}");
    assert_eq!(in_progress[0]["culprit"]["route"], "GET /block/sleep");
    assert!(as_f64(&in_progress[0], "elapsed_ms") >= 150.0, "{last}");

    // The other admin endpoints answer too, and agree.
    let runtime = app.admin_json("/debug/runtime").await;
    assert_eq!(runtime["worker_stats"][0]["state"], "stalled", "{runtime}");
    assert_eq!(
        runtime["worker_stats"][0]["current"]["route"], "GET /block/sleep",
        "{runtime}"
    );
    let health = app.admin_json("/healthz").await;
    assert_eq!(health["status"], "ok");
    blocked.await.unwrap().unwrap();
}

#[tokio::test]
async fn busy_loops_are_on_cpu_and_sleeps_off_cpu() {
    let _exclusive = exclusive().await;
    let app = spawn_app(&["--workers", "2"], &[]);
    app.get_json("/block/cpu?ms=200").await;
    app.get_json("/block/sleep?ms=200").await;
    let stalls = wait_for_stalls(&app, 2).await;
    let class_of = |route: &str| {
        stalls["recent"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["culprit"]["route"] == route)
            .map(|s| s["cpu"].as_str().unwrap().to_owned())
    };
    assert_eq!(
        class_of("GET /block/cpu").as_deref(),
        Some("on-cpu"),
        "{stalls}"
    );
    assert_eq!(
        class_of("GET /block/sleep").as_deref(),
        Some("off-cpu"),
        "{stalls}"
    );
}

#[tokio::test]
async fn stalls_of_spawned_jobs_name_their_request() {
    let app = spawn_app(&["--workers", "2"], &[]);
    let answer = app.get_json("/fanout/spawn?n=2&ms=60").await;
    let stalls = wait_for_stalls(&app, 2).await;
    // Not `app_stalls`: two CPU jobs on a busy 2-core machine may well be
    // preempted; what matters here is whom the stall names.
    let jobs: Vec<_> = stalls["recent"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["culprit"]["task"] == "GET /fanout/spawn job")
        .collect();
    assert_eq!(jobs.len(), 2, "{stalls}");
    assert!(
        jobs.iter()
            .all(|s| s["culprit"]["trace_id"] == answer["trace_id"]),
        "{stalls}"
    );
}

#[tokio::test]
async fn the_dashboard_and_events_are_served() {
    let app = spawn_app(&[], &[]);
    let page = app.client.get(app.admin_url("/")).send().await.unwrap();
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = page.text().await.unwrap();
    assert!(
        html.contains("/debug/events") && html.contains("data-route"),
        "dashboard page"
    );

    let info = app.admin_json("/api/info").await;
    assert_eq!(info["app_url"].as_str().unwrap(), app.listeners["app"]);
    assert!(info["scenarios"].as_array().unwrap().len() >= 11);

    // One server-sent event, parsed.
    let mut events = app
        .client
        .get(app.admin_url("/debug/events"))
        .send()
        .await
        .unwrap();
    assert!(
        events.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut text = String::new();
    while !text.contains("\n\n") {
        let chunk = events.chunk().await.unwrap().expect("a chunk");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let data = text
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("a data line");
    let snapshot: Value = serde_json::from_str(data).unwrap();
    assert!(snapshot["runtime"]["worker_stats"].is_array(), "{snapshot}");
    assert!(snapshot["stalls"]["recent"].is_array(), "{snapshot}");
    assert!(snapshot["lag"]["probe_delay_ms"].is_number(), "{snapshot}");

    // The fire proxy forwards to the app, N at once.
    let fired: Value = app
        .client
        .post(app.admin_url("/api/fire?path=/healthz&concurrency=3"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let results = fired["results"].as_array().unwrap();
    assert_eq!(results.len(), 3, "{fired}");
    assert!(
        results
            .iter()
            .all(|r| r["status"] == 200 && r["body"]["scenario"] == "/healthz"),
        "{fired}"
    );
    let refused = app
        .client
        .post(app.admin_url("/api/fire?path=http://elsewhere/"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
}

#[tokio::test]
async fn the_admin_server_refuses_other_sites() {
    let app = spawn_app(&[], &[]);
    let fire = app.admin_url("/api/fire?path=/healthz");
    // Acting is a POST: a GET (an <img> or a link elsewhere) fires nothing.
    let get = app.client.get(&fire).send().await.unwrap();
    assert_eq!(get.status(), 405);
    // A page on another site cannot make the browser fire a stall.
    let cross_site = app
        .client
        .post(&fire)
        .header("Origin", "http://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(cross_site.status(), 403);
    // The dashboard's own page can.
    let admin_origin = app.admin_url("");
    let same_site = app
        .client
        .post(&fire)
        .header("Origin", admin_origin.trim_end_matches('/'))
        .send()
        .await
        .unwrap();
    assert_eq!(same_site.status(), 200);
    // A DNS-rebinding page (another name resolving to 127.0.0.1) reads nothing.
    for path in ["/", "/debug/stalls", "/debug/runtime", "/api/info"] {
        let rebound = app
            .client
            .get(app.admin_url(path))
            .header("Host", "evil.example:3001")
            .send()
            .await
            .unwrap();
        assert_eq!(rebound.status(), 403, "{path}");
    }
    let localhost = app
        .client
        .get(app.admin_url("/debug/stalls"))
        .header("Host", "localhost")
        .send()
        .await
        .unwrap();
    assert_eq!(localhost.status(), 200);
}

#[tokio::test]
async fn the_stall_span_is_exported_and_linked_to_its_culprit() {
    let c = crate::otlp_support::Receiver::start("http/protobuf");
    let app = crate::telemetry::traced_app(&c, &["--workers", "2"], &[]);
    let answer = app.get_json("/block/sleep?ms=300").await;
    let trace_id = answer["trace_id"].as_str().unwrap().to_owned();
    let arrived = c
        .store
        .wait_for(
            |spans| {
                spans.iter().any(|s| s.name == "executor.stall")
                    && spans.iter().any(|s| s.name == "GET /block/sleep")
            },
            Duration::from_secs(10),
        )
        .await;
    assert!(
        arrived,
        "spans: {:?}",
        c.store.spans().iter().map(|s| &s.name).collect::<Vec<_>>()
    );
    let spans = c.store.spans();
    let culprit = spans.iter().find(|s| s.name == "GET /block/sleep").unwrap();
    let stall = spans.iter().find(|s| s.name == "executor.stall").unwrap();
    assert_eq!(culprit.trace_id, trace_id);
    assert!(
        stall
            .links
            .contains(&(culprit.trace_id.clone(), culprit.span_id.clone())),
        "stall links {:?} should point at {}/{}",
        stall.links,
        culprit.trace_id,
        culprit.span_id
    );
    assert_eq!(stall.attributes["culprit.route"], "GET /block/sleep");
    // The line that held the worker, as OpenTelemetry's code.* attributes.
    assert!(
        stall.attributes["code.file.path"].ends_with("src/scenarios/block_sleep.rs"),
        "{:?}",
        stall.attributes
    );
    assert!(stall.attributes["code.line.number"].parse::<u32>().is_ok());
    assert!(stall.attributes["code.function.name"].contains("block_sleep"));
    assert!(stall.attributes["code.stacktrace"].contains("sleep"));
    // With traces exported, the stall links to the culprit's trace in Jaeger.
    let stalls = app.admin_json("/debug/stalls").await;
    let url = stalls["recent"][0]["jaeger_url"]
        .as_str()
        .unwrap_or_default();
    assert!(url.ends_with(&format!("/trace/{trace_id}")), "{stalls}");
    assert!(
        stall.attributes.contains_key("worker") && stall.attributes.contains_key("duration_ms")
    );
    assert!(
        culprit
            .events
            .iter()
            .any(|e| e.starts_with("held worker") && e.contains("without yielding")),
        "culprit events: {:?}",
        culprit.events
    );
    // That event is for Jaeger; the logs tell the stall through the watcher.
    let logs = app.logs();
    assert!(logs.contains("stall in progress"), "{logs}");
    assert!(!logs.contains("without yielding"), "{logs}");
}

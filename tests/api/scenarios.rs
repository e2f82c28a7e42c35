//! Every route's success shape, its 400s, the 404/405 fallbacks and the stall
//! budget's 503.

use std::time::Duration;

use crate::helpers::{as_f64, spawn_app};

/// (path, scenario) for every scenario route, from the server's own
/// catalogue (the one route table), each parameter given a small value.
async fn every_route(app: &crate::helpers::TestApp) -> Vec<(String, String)> {
    let catalogue = app.get_json("/").await;
    let scenarios = catalogue["scenarios"].as_array().expect("the catalogue");
    assert!(scenarios.len() >= 11, "{catalogue}");
    scenarios
        .iter()
        .map(|s| {
            let route = s["route"].as_str().unwrap().to_owned();
            let query: Vec<&str> = s["params"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| match p.as_str().unwrap() {
                    "ms" => "ms=10",
                    "n" => "n=3",
                    other => panic!("a parameter the test does not know: {other}"),
                })
                .collect();
            let path = if query.is_empty() {
                route.clone()
            } else {
                format!("{route}?{}", query.join("&"))
            };
            (path, route)
        })
        .collect()
}

#[tokio::test]
async fn every_scenario_answers_its_measured_shape() {
    let app = spawn_app(&[], &[]);
    for (path, scenario) in every_route(&app).await {
        let body = app.get_json(&path).await;
        assert_eq!(body["scenario"], scenario.as_str(), "{path}: {body}");
        for key in ["wall_ms", "busy_ms", "longest_poll_ms", "sched_delay_ms"] {
            assert!(as_f64(&body, key) >= 0.0, "{path}: {key} in {body}");
        }
        assert!(body["polls"].as_u64().unwrap() >= 1, "{path}: {body}");
        let workers = body["workers"].as_array().unwrap();
        assert!(!workers.is_empty(), "{path}: {body}");
        assert!(
            workers[0].as_str().unwrap().starts_with("worker "),
            "{path}: {body}"
        );
        assert!(
            !body["verdict"].as_str().unwrap().is_empty(),
            "{path}: {body}"
        );
        assert!(body["params"].is_object(), "{path}: {body}");
    }
}

#[tokio::test]
async fn fanouts_report_one_job_each_and_where_it_ran() {
    let app = spawn_app(&["--workers", "2"], &[]);
    let body = app.get_json("/fanout/offload?n=3&ms=20").await;
    let jobs = body["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 3, "{body}");
    assert!(
        jobs.iter().all(|j| j["ran_on"] == "blocking pool"),
        "{body}"
    );

    let body = app.get_json("/fanout/spawn?n=3&ms=20").await;
    let jobs = body["jobs"].as_array().unwrap();
    assert_eq!(jobs.len(), 3, "{body}");
    assert!(
        jobs.iter()
            .all(|j| j["ran_on"].as_str().unwrap().starts_with("worker ")),
        "{body}"
    );
    assert!(jobs.iter().all(|j| as_f64(j, "busy_ms") >= 18.0), "{body}");

    let body = app.get_json("/offload/cpu?ms=30").await;
    assert_eq!(body["jobs"][0]["ran_on"], "blocking pool", "{body}");
    assert!(as_f64(&body["jobs"][0], "busy_ms") >= 28.0, "{body}");
    assert!(as_f64(&body, "busy_ms") < 20.0, "{body}");
}

#[tokio::test]
async fn bad_parameters_answer_400_naming_the_parameter_and_range() {
    let app = spawn_app(&[], &[]);
    let cases: &[(&str, &str, &str)] = &[
        ("/block/sleep", "ms", "0..=10000"),
        ("/block/sleep?ms=abc", "ms", "0..=10000"),
        ("/block/sleep?ms=-5", "ms", "0..=10000"),
        ("/block/sleep?ms=10001", "ms", "0..=10000"),
        ("/block/cpu?ms=1.5", "ms", "0..=10000"),
        ("/coop/sleep?ms=", "ms", "0..=10000"),
        ("/coop/cpu?ms=99999999999999999999999", "ms", "0..=10000"),
        ("/offload/cpu?ms=-1", "ms", "0..=10000"),
        ("/fanout/join?ms=10", "n", "1..=64"),
        ("/fanout/join?n=0&ms=10", "n", "1..=64"),
        ("/fanout/sequential?n=65&ms=10", "n", "1..=64"),
        ("/fanout/spawn?n=-2&ms=10", "n", "1..=64"),
        ("/fanout/offload?n=two&ms=10", "n", "1..=64"),
        ("/fanout/offload?n=2", "ms", "0..=10000"),
        ("/downstream?ms=x", "ms", "0..=10000"),
        ("/coop/sleep?msec=10", "msec", "ms"),
        ("/healthz?verbose=1", "verbose", ""),
    ];
    for (path, parameter, allowed) in cases {
        let response = app.get(path).await;
        assert_eq!(response.status(), 400, "{path}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["parameter"], *parameter, "{path}: {body}");
        assert_eq!(body["allowed"], *allowed, "{path}: {body}");
        assert!(
            body["error"].as_str().unwrap().contains(parameter),
            "{path}: {body}"
        );
    }
}

#[tokio::test]
async fn caps_come_from_configuration() {
    let app = spawn_app(
        &[],
        &[
            ("STALL_LAB__LIMITS__MAX_MS", "50"),
            ("STALL_LAB__LIMITS__MAX_FANOUT", "4"),
        ],
    );
    let response = app.get("/coop/sleep?ms=51").await;
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["allowed"], "0..=50", "{body}");
    assert_eq!(app.get("/fanout/join?n=5&ms=1").await.status(), 400);
    assert_eq!(app.get("/fanout/join?n=4&ms=1").await.status(), 200);
}

#[tokio::test]
async fn unknown_routes_and_methods_answer_json() {
    let app = spawn_app(&[], &[]);
    let response = app.get("/no/such/route").await;
    assert_eq!(response.status(), 404);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("/no/such/route"),
        "{body}"
    );
    assert!(body["hint"].as_str().unwrap().contains("GET /"), "{body}");

    let response = app.client.post(app.url("/healthz")).send().await.unwrap();
    assert_eq!(response.status(), 405);
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("POST"), "{body}");
}

#[tokio::test]
async fn the_catalogue_lists_every_route_as_json_and_html() {
    let app = spawn_app(&[], &[]);
    let body = app.get_json("/").await;
    let routes: Vec<&str> = body["scenarios"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["route"].as_str().unwrap())
        .collect();
    // The public contract's routes (DESIGN.md), checked against the
    // catalogue, which the router is built from.
    for scenario in [
        "/block/sleep",
        "/block/cpu",
        "/coop/sleep",
        "/coop/cpu",
        "/offload/cpu",
        "/fanout/join",
        "/fanout/sequential",
        "/fanout/spawn",
        "/fanout/offload",
        "/downstream",
        "/healthz",
    ] {
        assert!(
            routes.contains(&scenario),
            "{scenario} missing from {routes:?}"
        );
    }
    let block = &body["scenarios"][0];
    assert_eq!(block["route"], "/block/sleep");
    assert_eq!(block["twin"], "/coop/sleep");
    assert!(
        block["example"]
            .as_str()
            .unwrap()
            .starts_with(&app.url("/block/sleep?ms="))
    );

    let response = app
        .client
        .get(app.url("/"))
        .header("accept", "text/html")
        .send()
        .await
        .unwrap();
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let html = response.text().await.unwrap();
    assert!(
        html.contains("/offload/cpu") && html.contains("<table"),
        "{html}"
    );
}

#[tokio::test]
async fn the_stall_budget_is_global_and_answers_503_with_retry_after() {
    let app = spawn_app(
        &["--workers", "2"],
        &[("STALL_LAB__LIMITS__MAX_STALLING_IN_FLIGHT", "1")],
    );
    // The permit's holder runs on the blocking pool, so both workers stay
    // free to answer the probes. (A `/block/*` holder would hold a worker,
    // and tokio does not always let the other worker pick up new requests
    // meanwhile: see "A free worker is not enough" in the README. Then a
    // probe would be answered only after the holder returned its permit.)
    let holder = app.get_in_background("/fanout/offload?n=1&ms=3000");
    // Wait until its job runs on the blocking pool: it took the permit
    // before spawning the job. (Not by probing a stalling route until one
    // is refused: a probe holding the only permit at the wrong moment would
    // get the holder itself refused.)
    let (app_ref, holder_ref) = (&app, &holder);
    let job_ran = crate::helpers::wait_until(Duration::from_secs(10), || async move {
        let runtime = app_ref.admin_json("/debug/runtime").await;
        let busy = runtime["blocking_threads"].as_u64().unwrap()
            - runtime["idle_blocking_threads"].as_u64().unwrap();
        if busy >= 1 {
            return Ok(());
        }
        assert!(
            !holder_ref.is_finished(),
            "the holder ended before its job ran"
        );
        Err(runtime)
    })
    .await;
    if let Err(runtime) = job_ran {
        panic!("the holder's job never ran: {runtime}");
    }
    // The other stalling routes: the budget is shared, not per route.
    for path in [
        "/block/sleep?ms=10",
        "/block/cpu?ms=10",
        "/fanout/spawn?n=2&ms=10",
    ] {
        let response = crate::helpers::fresh_client()
            .get(app.url(path))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let retry_after = response.headers().get("retry-after").cloned();
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(status, 503, "{path}: {body}");
        assert_eq!(retry_after.unwrap(), "1", "{path}");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains("max_stalling_in_flight"),
            "{body}"
        );
    }
    // Cooperative routes are not budgeted.
    assert_eq!(app.get("/coop/sleep?ms=1").await.status(), 200);
    assert_eq!(holder.await.unwrap().unwrap().status(), 200);
    // The permit came back.
    assert_eq!(app.get("/block/cpu?ms=1").await.status(), 200);
}

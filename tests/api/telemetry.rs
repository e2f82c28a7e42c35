//! Telemetry through the real binary: OTLP spans for both protocols (into
//! in-process receivers), export during a total stall, tokio-console task
//! names, flush on shutdown, and bounded shutdown with the collector gone.

use std::time::{Duration, Instant};

use crate::helpers::{TestApp, spawn_app};
use crate::otlp_support::{ConsoleView, Receiver, RecordedSpan, console_tasks, console_view};

const SPAN_WAIT: Duration = Duration::from_secs(10);

/// A server exporting to `c`, with extra args and env.
pub fn traced_app(c: &Receiver, args: &[&str], env: &[(&str, &str)]) -> TestApp {
    let endpoint = c.endpoint();
    let mut all = vec![
        ("STALL_LAB__TELEMETRY__OTLP", "true"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", c.protocol),
        ("STALL_LAB__TELEMETRY__BATCH_DELAY_MS", "100"),
    ];
    all.extend_from_slice(env);
    spawn_app(args, &all)
}

fn server_span<'a>(spans: &'a [RecordedSpan], name: &str) -> Option<&'a RecordedSpan> {
    spans
        .iter()
        .find(|s| s.name == name && s.attributes.contains_key("http.route"))
}

fn children<'a>(spans: &'a [RecordedSpan], parent: &RecordedSpan) -> Vec<&'a RecordedSpan> {
    spans
        .iter()
        .filter(|s| s.trace_id == parent.trace_id && s.parent_span_id == parent.span_id)
        .collect()
}

async fn request_spans_carry_semantics_and_poll_statistics(protocol: &'static str) {
    let c = Receiver::start(protocol);
    let app = traced_app(&c, &[], &[]);

    let block = app.get_json("/block/sleep?ms=200").await;
    let trace_id = block["trace_id"]
        .as_str()
        .expect("trace_id in the answer")
        .to_owned();
    app.get_json("/fanout/join?n=4&ms=10").await;
    app.get_json("/downstream?ms=10").await;
    let inbound = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = app
        .client
        .get(app.url("/healthz"))
        .header("traceparent", format!("00-{inbound}-00f067aa0ba902b7-01"))
        .send()
        .await
        .unwrap();
    let traceresponse = response.headers()["traceresponse"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        traceresponse.starts_with(&format!("00-{inbound}-")),
        "{traceresponse}"
    );

    let arrived = c
        .store
        .wait_for(
            |spans| {
                [
                    "GET /block/sleep",
                    "GET /fanout/join",
                    "GET /downstream",
                    "GET /healthz",
                    "GET /coop/sleep",
                ]
                .iter()
                .all(|name| server_span(spans, name).is_some())
            },
            SPAN_WAIT,
        )
        .await;
    let spans = c.store.spans();
    assert!(
        arrived,
        "{protocol}: server spans missing; got {:?}",
        names(&spans)
    );

    // Semantic conventions and poll statistics on the blocking request.
    let block = server_span(&spans, "GET /block/sleep").unwrap();
    assert_eq!(block.trace_id, trace_id);
    assert_eq!(block.attributes["http.request.method"], "GET");
    assert_eq!(block.attributes["http.route"], "/block/sleep");
    assert_eq!(block.attributes["url.path"], "/block/sleep");
    assert_eq!(block.attributes["http.response.status_code"], "200");
    assert_eq!(block.attributes["polls"], "1", "{block:?}");
    let busy: f64 = block.attributes["busy_ms"].parse().unwrap();
    assert!(busy >= 180.0, "{block:?}");
    for key in ["longest_poll_ms", "sched_delay_ms", "wall_ms", "workers"] {
        assert!(
            block.attributes.contains_key(key),
            "{key} missing: {block:?}"
        );
    }
    assert_eq!(block.resource["service.name"], "stall-lab");
    assert!(block.resource.contains_key("service.version"));
    assert!(block.resource.contains_key("stall_lab.runtime.flavor"));
    assert_eq!(
        children(&spans, block).len(),
        1,
        "the std::thread::sleep span"
    );

    // One child span per join branch.
    let join = server_span(&spans, "GET /fanout/join").unwrap();
    let branches = children(&spans, join);
    assert_eq!(branches.len(), 4, "{:?}", names(&spans));
    assert!(branches.iter().all(|b| b.name == "join branch"));

    // /downstream: its client span and the called server span share a trace.
    let downstream = server_span(&spans, "GET /downstream").unwrap();
    let client = children(&spans, downstream)
        .into_iter()
        .find(|s| s.name == "GET /coop/sleep")
        .expect("client span");
    let called = spans
        .iter()
        .find(|s| s.name == "GET /coop/sleep" && s.parent_span_id == client.span_id)
        .expect("the called server span is a child of the client span");
    assert_eq!(called.trace_id, downstream.trace_id);

    // An inbound traceparent keeps its trace id.
    let health = server_span(&spans, "GET /healthz").unwrap();
    assert_eq!(health.trace_id, inbound);

    // Nothing of tokio's or the exporter's own: every span comes from
    // stall-lab's own code (the stall watcher's `executor.stall` spans are
    // built with the OpenTelemetry API directly, without a code location).
    for span in spans.iter().filter(|s| s.name != "executor.stall") {
        assert!(!span.name.starts_with("runtime."), "exported {span:?}");
        let module = span
            .attributes
            .get("code.module.name")
            .map_or("", String::as_str);
        assert!(
            module.starts_with("stall_lab"),
            "exported a span of {module}: {span:?}"
        );
    }
}

fn names(spans: &[RecordedSpan]) -> Vec<&str> {
    spans.iter().map(|s| s.name.as_str()).collect()
}

#[tokio::test]
async fn http_protobuf_request_spans() {
    request_spans_carry_semantics_and_poll_statistics("http/protobuf").await;
}

#[tokio::test]
async fn grpc_request_spans() {
    request_spans_carry_semantics_and_poll_statistics("grpc").await;
}

/// On a current_thread runtime blocked for 2 s, a span that ended just
/// before the block reaches the receiver before the block ends.
async fn export_keeps_flowing_during_a_total_stall(protocol: &'static str) {
    let _exclusive = crate::helpers::exclusive().await;
    let c = Receiver::start(protocol);
    let app = traced_app(&c, &["--flavor", "current_thread"], &[]);
    app.get_json("/healthz").await;
    let started = Instant::now();
    let blocked = app.get_in_background("/block/sleep?ms=2000");
    let arrived = c
        .store
        .wait_for(
            |spans| server_span(spans, "GET /healthz").is_some(),
            Duration::from_secs(5),
        )
        .await;
    let seen_after = started.elapsed();
    assert!(arrived, "{protocol}: the /healthz span never arrived");
    assert!(
        !blocked.is_finished(),
        "{protocol}: the block was already over"
    );
    assert!(
        seen_after < Duration::from_millis(1900),
        "{protocol}: arrived after {seen_after:?}"
    );
    blocked.await.unwrap().unwrap();
}

#[tokio::test]
async fn http_protobuf_exports_during_a_stall() {
    export_keeps_flowing_during_a_total_stall("http/protobuf").await;
}

#[tokio::test]
async fn grpc_exports_during_a_stall() {
    export_keeps_flowing_during_a_total_stall("grpc").await;
}

#[tokio::test]
async fn tokio_console_shows_a_task_named_after_the_route() {
    let app = spawn_app(&[], &[]);
    let console = app.console_addr();
    let blocked = app.get_in_background("/block/sleep?ms=3000");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = console_tasks(
        console,
        |names| names.iter().any(|n| n == "GET /block/sleep"),
        Duration::from_secs(10),
    )
    .await;
    assert!(
        seen.iter().any(|n| n == "GET /block/sleep"),
        "console saw {seen:?}"
    );
    assert!(!blocked.is_finished(), "seen while the request was running");
    blocked.await.unwrap().unwrap();
}

/// Fires 20 `/healthz` and 20 `/coop/sleep`, and returns how many
/// `GET /healthz` tasks and how many `/coop/sleep` timers the console
/// reports (waiting up to 3 s for all of them), how many of hyper's
/// per-request header timers it reports (none should be), and
/// `/debug/runtime`.
async fn console_sees(app: &TestApp) -> (usize, usize, usize, serde_json::Value) {
    for _ in 0..20 {
        app.get_json("/healthz").await;
        app.get_json("/coop/sleep?ms=1").await;
    }
    let console = app.console_addr();
    let healthz = |v: &ConsoleView| v.tasks.iter().filter(|n| *n == "GET /healthz").count();
    let timers = |v: &ConsoleView| {
        v.resource_files
            .iter()
            .filter(|f| f.ends_with("coop_sleep.rs"))
            .count()
    };
    let view = console_view(
        console,
        |v| healthz(v) >= 20 && timers(v) >= 20,
        Duration::from_secs(3),
    )
    .await;
    let hyper_timers = view
        .resource_files
        .iter()
        .filter(|f| f.contains("hyper"))
        .count();
    (
        healthz(&view),
        timers(&view),
        hyper_timers,
        app.admin_json("/debug/runtime").await,
    )
}

#[tokio::test]
async fn the_console_records_tasks_up_to_its_budget_and_says_so_once() {
    const NOTICE: &str = "tokio-console: task budget used up";
    let fast_publish = ("TOKIO_CONSOLE_PUBLISH_INTERVAL", "100ms");

    // The default budget (1000 per 10 minutes): every request is in the
    // console, and so is the timer each /coop/sleep created.
    let app = spawn_app(&[], &[fast_publish]);
    let (tasks, timers, hyper_timers, runtime) = console_sees(&app).await;
    // (The harness's own readiness check may add a /healthz.)
    assert!(tasks >= 20 && timers == 20, "{tasks} {timers} {runtime}");
    // The connection task is recorded, but not the header timer hyper arms
    // in it for each request: the console would keep one per request.
    assert_eq!(hyper_timers, 0, "hyper's header timers reached the console");
    assert_eq!(runtime["console"]["task_budget"], 1000);
    assert_eq!(runtime["console"]["tasks_not_recorded"], 0, "{runtime}");
    assert!(!app.logs().contains(NOTICE));

    // A budget of 5 per 10 minutes (one more every 2 minutes): startup's
    // own tasks and the first requests spend it, the rest are left out,
    // with the timers they create.
    let app = spawn_app(
        &[],
        &[
            fast_publish,
            ("STALL_LAB__TELEMETRY__CONSOLE_TASK_BUDGET", "5"),
        ],
    );
    let (tasks, timers, _, runtime) = console_sees(&app).await;
    let console = &runtime["console"];
    assert!(tasks <= 5, "console saw {tasks} GET /healthz tasks");
    assert!(timers <= 5, "console saw {timers} /coop/sleep timers");
    assert_eq!(console["task_budget"], 5);
    assert_eq!(console["tasks_recorded"], 5, "{runtime}");
    // 40 request tasks and a connection, minus what the budget allowed.
    assert!(
        console["tasks_not_recorded"].as_u64().unwrap() >= 36,
        "{runtime}"
    );
    // Serving was unaffected, and the budget running out was said once.
    assert_eq!(app.logs().matches(NOTICE).count(), 1, "{}", app.logs());
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_flushes_spans_of_completed_requests() {
    let c = Receiver::start("http/protobuf");
    // A batch delay far longer than the test: only the shutdown flush can
    // deliver these spans.
    let mut app = traced_app(
        &c,
        &[],
        &[("STALL_LAB__TELEMETRY__BATCH_DELAY_MS", "600000")],
    );
    for _ in 0..3 {
        app.get_json("/coop/sleep?ms=1").await;
    }
    let status = tokio::task::block_in_place(|| app.terminate(Duration::from_secs(10)));
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    app.logs_at_exit();
    let spans = c.store.spans();
    let flushed = spans.iter().filter(|s| s.name == "GET /coop/sleep").count();
    assert_eq!(flushed, 3, "{:?}", names(&spans));
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_is_bounded_and_reports_drops_when_the_collector_is_gone() {
    // A port that nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut app = spawn_app(
        &[],
        &[
            ("STALL_LAB__TELEMETRY__OTLP", "true"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("STALL_LAB__TELEMETRY__BATCH_DELAY_MS", "600000"),
            ("STALL_LAB__SERVER__SHUTDOWN_GRACE_MS", "500"),
        ],
    );
    for _ in 0..5 {
        // Serving is unaffected by the missing collector.
        app.get_json("/healthz").await;
    }
    let start = Instant::now();
    let status = tokio::task::block_in_place(|| app.terminate(Duration::from_secs(15)));
    let took = start.elapsed();
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    assert!(
        took < Duration::from_millis(500 + 3000),
        "exit took {took:?}"
    );
    let logs = app.logs_at_exit();
    assert!(logs.contains("dropped"), "{logs}");
}

#[test]
fn a_taken_console_port_is_a_clear_startup_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let output = crate::helpers::run_to_end(
        &["serve", "--listen", "127.0.0.1:0"],
        &[("STALL_LAB__TELEMETRY__CONSOLE_LISTEN", &addr)],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&addr) && stderr.contains("telemetry.console_listen"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

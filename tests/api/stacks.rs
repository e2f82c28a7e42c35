//! The held worker's stack: captured while the stall lasts, symbolized to
//! function, file and line, attached to that stall and no other.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::helpers::{exclusive, spawn_app, wait_until};

/// Fires `path` in the background and returns the stall's stack as soon as
/// `/debug/stalls` shows one for it in progress.
async fn live_stack(app: &crate::helpers::TestApp, path: &str) -> Vec<Value> {
    let request = app.get_in_background(path);
    let route = format!("GET {}", path.split('?').next().unwrap());
    let stack = wait_until(Duration::from_secs(10), || async {
        let stalls = app.admin_json("/debug/stalls").await;
        assert_eq!(stalls["stacks"], "on", "{stalls}");
        stalls["in_progress"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["culprit"]["route"] == route.as_str())
            .and_then(|s| s["stack"].as_array().cloned())
            .ok_or(stalls)
    })
    .await
    .unwrap_or_else(|stalls| panic!("no stack in progress: {stalls}"));
    assert_eq!(request.await.unwrap().unwrap().status(), 200);
    stack
}

fn has(stack: &[Value], pred: impl Fn(&str, &str) -> bool) -> bool {
    stack.iter().any(|f| {
        pred(
            f["function"].as_str().unwrap_or_default(),
            f["file"].as_str().unwrap_or_default(),
        )
    })
}

#[tokio::test]
async fn a_blocking_sleep_and_a_busy_loop_show_their_lines_while_they_hold_the_worker() {
    let _exclusive = exclusive().await;
    let app = spawn_app(&["--workers", "2", "--no-otlp", "--no-console"], &[]);

    let sleep = live_stack(&app, "/block/sleep?ms=1000").await;
    assert!(
        has(&sleep, |f, _| f.starts_with("std::thread::")
            && f.ends_with("sleep")),
        "{sleep:#?}"
    );
    let top = sleep
        .iter()
        .find(|f| f["user_code"] == true)
        .expect("a frame in stall-lab's own code");
    assert!(
        top["function"]
            .as_str()
            .unwrap()
            .contains("block_sleep::handler"),
        "{top}"
    );
    assert!(
        top["file"]
            .as_str()
            .unwrap()
            .ends_with("src/scenarios/block_sleep.rs"),
        "{top}"
    );
    assert!(top["line"].as_u64().is_some(), "{top}");

    let spin = live_stack(&app, "/block/cpu?ms=800").await;
    assert!(
        has(&spin, |f, file| f.ends_with("cpu::burn")
            && file.ends_with("src/cpu.rs")),
        "{spin:#?}"
    );

    // Filed with the stall, and named in the log.
    let stalls = wait_until(Duration::from_secs(5), || async {
        let stalls = app.admin_json("/debug/stalls").await;
        let recent = stalls["recent"].as_array().unwrap();
        let filed = |route: &str| {
            recent
                .iter()
                .any(|s| s["culprit"]["route"] == route && s["stack"].is_array())
        };
        if filed("GET /block/sleep") && filed("GET /block/cpu") {
            Ok(stalls)
        } else {
            Err(stalls)
        }
    })
    .await
    .unwrap_or_else(|stalls| panic!("not filed with their stacks: {stalls}"));
    let capture = &stalls["stack_capture"];
    assert!(capture["captures"].as_u64().unwrap() >= 2, "{capture}");
    let logs = app.logs();
    assert!(
        logs.lines().any(|l| l.contains("stall over")
            && l.contains("GET /block/sleep at ")
            && l.contains("src/scenarios/block_sleep.rs:")
            && l.contains("sleep")),
        "{logs}"
    );
}

#[tokio::test]
async fn without_stacks_the_stalls_say_so() {
    let app = spawn_app(
        &["--no-otlp", "--no-console"],
        &[("STALL_LAB__STALL__STACKS", "false")],
    );
    let stalls = app.admin_json("/debug/stalls").await;
    assert_eq!(stalls["stacks"], "off", "{stalls}");
}

/// Thousands of captured stalls beside allocation-heavy requests on the
/// other worker: no crash, no deadlock, every answer right, and every stack
/// belongs to its own stall (the stalls are `/block/sleep`, the other
/// requests never stall on purpose).
#[tokio::test]
async fn thousands_of_captures_beside_allocating_requests_attach_no_stack_to_the_wrong_stall() {
    let _exclusive = exclusive().await;
    let wanted: u64 = std::env::var("STACK_STRESS_CAPTURES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let app = spawn_app(
        &["--workers", "2", "--no-otlp", "--no-console"],
        &[
            ("STALL_LAB__STALL__THRESHOLD_MS", "5"),
            ("STALL_LAB__STALL__HISTORY", "8192"),
        ],
    );
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The other worker's load: JSON-heavy answers, allocating all along.
    let noise = {
        let client = crate::helpers::fresh_client();
        let url = app.url("/fanout/join?n=64&ms=1");
        let done = done.clone();
        tokio::spawn(async move {
            let mut answered = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let r = client.get(&url).send().await.unwrap();
                assert_eq!(r.status(), 200);
                let body: Value = r.json().await.unwrap();
                assert_eq!(body["jobs"].as_array().unwrap().len(), 64);
                answered += 1;
            }
            answered
        })
    };
    let started = Instant::now();
    let mut fired = 0u64;
    let captures = loop {
        for _ in 0..100 {
            let body = app.get_json("/block/sleep?ms=12").await;
            assert_eq!(body["scenario"], "/block/sleep");
            fired += 1;
        }
        let stalls = app.admin_json("/debug/stalls").await;
        let captures = stalls["stack_capture"]["captures"].as_u64().unwrap_or(0);
        if captures >= wanted {
            break captures;
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "{captures} captures after {fired} stalls: {}",
            stalls["stack_capture"]
        );
    };
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let answered = noise.await.unwrap();

    // Every filed stall with a stack: the stack is its own request's.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stalls = reqwest::get(app.admin_url("/debug/stalls?recent=8192"))
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    let recent = stalls["recent"].as_array().unwrap();
    // A stack belongs to its stall's own poll: a /block/sleep stall never
    // shows a fan-out handler, and no other stall shows the sleep. (Caught
    // early, say while the OS preempted the worker, a /block/sleep poll can
    // still be in routing: its own poll, not yet in the handler.)
    let (mut with_stack, mut in_the_sleep, mut sleep_stacks) = (0, 0, 0);
    for stall in recent {
        let Some(stack) = stall["stack"].as_array() else {
            continue;
        };
        with_stack += 1;
        let sleeping = has(stack, |f, _| f.contains("block_sleep::handler"));
        let fanning_out = has(stack, |f, _| f.contains("fanout_join::handler"));
        if stall["culprit"]["route"] == "GET /block/sleep" {
            assert!(
                !fanning_out,
                "a fan-out stack on a /block/sleep stall: {stall}"
            );
            sleep_stacks += 1;
            in_the_sleep += usize::from(sleeping);
        } else {
            assert!(!sleeping, "a /block/sleep stack on another stall: {stall}");
        }
    }
    assert!(
        in_the_sleep * 2 >= sleep_stacks,
        "only {in_the_sleep} of {sleep_stacks} /block/sleep stacks were in the handler"
    );
    eprintln!(
        "stress: {fired} stalls fired, {captures} captured, {with_stack} filed stalls with a stack \
         of {} listed ({in_the_sleep} of {sleep_stacks} /block/sleep stacks in the handler), \
         {answered} allocating requests beside them, {:.1} s; capture costs {}",
        recent.len(),
        started.elapsed().as_secs_f64(),
        stalls["stack_capture"]
    );
    assert!(with_stack > 0);
}

//! Graceful shutdown: SIGTERM stops accepting, lets requests in flight
//! finish, and exits 0; the grace period bounds the wait.

use std::time::{Duration, Instant};

use crate::helpers::spawn_app;

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_requests_in_flight_finish_then_exits_0() {
    let mut app = spawn_app(&[], &[]);
    let in_flight = app.get_in_background("/coop/sleep?ms=600");
    tokio::time::sleep(Duration::from_millis(150)).await;

    let status = tokio::task::block_in_place(|| app.terminate(Duration::from_secs(10)));
    let response = in_flight
        .await
        .unwrap()
        .expect("the request in flight was answered");
    assert_eq!(response.status(), 200);
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    app.logs_at_exit();
}

#[tokio::test(flavor = "multi_thread")]
async fn the_grace_period_bounds_the_wait() {
    let mut app = spawn_app(&[], &[("STALL_LAB__SERVER__SHUTDOWN_GRACE_MS", "300")]);
    let _in_flight = app.get_in_background("/coop/sleep?ms=5000");
    tokio::time::sleep(Duration::from_millis(150)).await;

    let start = Instant::now();
    let status = tokio::task::block_in_place(|| app.terminate(Duration::from_secs(10)));
    assert_eq!(status.and_then(|s| s.code()), Some(0));
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "exited after {:?}",
        start.elapsed()
    );
    app.logs_at_exit();
}

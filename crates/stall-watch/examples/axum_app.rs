//! A plain axum service with one handler that blocks its worker, watched by
//! stall-watch. The lines marked `// stall-watch` are all it takes.
//!
//! Run with
//!
//! ```not_rust
//! cargo run -p stall-watch --example axum_app
//! ```
//!
//! then `curl localhost:3000/orders/7/report` (it holds a worker for 2 s)
//! and, while it runs, open http://127.0.0.1:3001 (the dashboard) or
//! `curl 127.0.0.1:3001/debug/stalls`: the stall is named
//! `GET /orders/{id}/report`, with the line in `render_report` that holds
//! the worker. `APP_ADDR`, `ADMIN_ADDR` and `WORKERS` override the defaults.

use std::time::Duration;

use axum::Router;
use axum::extract::Path;
use axum::routing::get;

fn main() -> std::io::Result<()> {
    let app_addr = env_or("APP_ADDR", "127.0.0.1:3000");
    let admin_addr = env_or("ADMIN_ADDR", "127.0.0.1:3001");
    let workers = env_or("WORKERS", "2");
    // stall-watch logs through `tracing`: any subscriber shows its lines.
    tracing_subscriber::fmt().init();

    let watch = stall_watch::Watch::new(stall_watch::Config::default()); // stall-watch
    let runtime = watch // stall-watch
        .install(&mut tokio::runtime::Builder::new_multi_thread())
        .worker_threads(workers.parse().expect("WORKERS is a number"))
        .enable_all()
        .build()?;
    let admin = watch.serve_admin(admin_addr.parse().expect("ADMIN_ADDR"))?; // stall-watch
    println!("listening: admin http://{}", admin.local_addr());

    runtime.block_on(async {
        let app = Router::new()
            .route("/", get(|| async { "ok" }))
            .route("/orders/{id}/report", get(report))
            .layer(watch.layer()); // stall-watch
        let listener = tokio::net::TcpListener::bind(&app_addr).await?;
        println!("listening: app http://{}", listener.local_addr()?);
        axum::serve(listener, app).await
    })
}

/// The mistake: synchronous work inside an async handler. It never reaches
/// an `.await`, so it holds its worker thread for the whole call.
async fn report(Path(id): Path<u64>) -> String {
    render_report(id)
}

#[inline(never)]
fn render_report(id: u64) -> String {
    std::thread::sleep(Duration::from_secs(2)); // the line stall-watch names
    format!("report {id}\n")
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_owned())
}

//! The in-process OTLP/HTTP receiver the exporting variants send to.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, mpsc};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;

#[derive(Default)]
pub(crate) struct Received {
    pub(crate) spans: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) bad_batches: AtomicU64,
}

/// Serves `POST /v1/traces` on 127.0.0.1:0 from its own thread and runtime,
/// for the life of the bench; counts what it receives.
pub(crate) fn start_otlp_receiver() -> Result<(SocketAddr, Arc<Received>), String> {
    let received = Arc::new(Received::default());
    let state = Arc::clone(&received);
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("otlp-receiver".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(format!("receiver runtime: {e}")));
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = tx.send(Err(format!("receiver bind: {e}")));
                        return;
                    }
                };
                let _ = tx.send(listener.local_addr().map_err(|e| e.to_string()));
                let app = Router::new()
                    .route("/v1/traces", post(receive_traces))
                    .layer(DefaultBodyLimit::disable())
                    .with_state(state);
                let _ = axum::serve(listener, app).await;
            });
        })
        .map_err(|e| format!("cannot spawn the receiver thread: {e}"))?;
    let addr = rx
        .recv()
        .map_err(|_| "the receiver thread died".to_string())??;
    Ok((addr, received))
}

async fn receive_traces(State(received): State<Arc<Received>>, body: Bytes) -> Response {
    match ExportTraceServiceRequest::decode(body) {
        Ok(request) => {
            let spans: usize = request
                .resource_spans
                .iter()
                .flat_map(|rs| &rs.scope_spans)
                .map(|ss| ss.spans.len())
                .sum();
            received.spans.fetch_add(spans as u64, Ordering::Relaxed);
            received.batches.fetch_add(1, Ordering::Relaxed);
            (
                [(header::CONTENT_TYPE, "application/x-protobuf")],
                ExportTraceServiceResponse::default().encode_to_vec(),
            )
                .into_response()
        }
        Err(e) => {
            received.bad_batches.fetch_add(1, Ordering::Relaxed);
            (StatusCode::BAD_REQUEST, format!("not an OTLP request: {e}")).into_response()
        }
    }
}

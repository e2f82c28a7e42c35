//! Test helpers: in-process OTLP receivers (gRPC and HTTP) and a tokio-console
//! client. Each receiver runs on its **own OS thread with its own runtime**, so
//! it keeps receiving while the runtime under test is deliberately blocked.
#![allow(dead_code, unreachable_pub)] // each test binary uses a different subset

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};

/// One received span, flattened. Attribute values are plain strings
/// (`"42"`, `"true"`, `"/x"`), not protobuf debug output.
#[derive(Debug, Clone)]
pub struct RecordedSpan {
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty string for a root span.
    pub parent_span_id: String,
    pub attributes: BTreeMap<String, String>,
    /// Resource attributes of the batch the span came in (service.name, ...).
    pub resource: BTreeMap<String, String>,
    /// (trace_id, span_id) of each link.
    pub links: Vec<(String, String)>,
    /// Event names (for `tracing` events: the message).
    pub events: Vec<String>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn value_string(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attrs(kvs: &[KeyValue]) -> BTreeMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value_string(&kv.value)))
        .collect()
}

/// Flattens an OTLP request (same message for gRPC and HTTP/protobuf).
pub fn flatten(req: ExportTraceServiceRequest) -> Vec<RecordedSpan> {
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let resource = rs
            .resource
            .map(|r| attrs(&r.attributes))
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                out.push(RecordedSpan {
                    name: s.name,
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent_span_id: hex(&s.parent_span_id),
                    attributes: attrs(&s.attributes),
                    resource: resource.clone(),
                    links: s
                        .links
                        .iter()
                        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                        .collect(),
                    events: s.events.iter().map(|e| e.name.clone()).collect(),
                });
            }
        }
    }
    out
}

/// Spans received so far, shared between the server thread and the test.
#[derive(Clone, Default)]
pub struct SpanStore(Arc<Mutex<Vec<RecordedSpan>>>);

impl SpanStore {
    fn push_all(&self, spans: Vec<RecordedSpan>) {
        self.0.lock().unwrap().extend(spans);
    }
    pub fn spans(&self) -> Vec<RecordedSpan> {
        self.0.lock().unwrap().clone()
    }
    /// Waits (on whatever runtime the caller uses) until `pred` holds.
    pub async fn wait_for(
        &self,
        pred: impl Fn(&[RecordedSpan]) -> bool,
        timeout: Duration,
    ) -> bool {
        let pred = &pred;
        let seen = crate::helpers::wait_until(timeout, || async move {
            pred(&self.0.lock().unwrap()).then_some(()).ok_or(())
        });
        seen.await.is_ok()
    }
}

/// Runs `make_server(listener)` on a new thread with its own current-thread
/// runtime. The runtime lives until the process exits (tests are short).
fn spawn_server<F, Fut>(name: &str, make_server: F) -> SocketAddr
where
    F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            // Receiver internals must not show up in the telemetry under test.
            let _quiet =
                tracing::subscriber::set_default(tracing::subscriber::NoSubscriber::default());
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                make_server(listener).await;
            });
        })
        .unwrap();
    rx.recv().unwrap()
}

struct Collector(SpanStore);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.push_all(flatten(request.into_inner()));
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An in-process OTLP receiver on 127.0.0.1:0, on its own thread and
/// runtime, for either protocol:
///
/// - `grpc`: tonic's `TraceService`. Why not
///   `fake_opentelemetry_collector::FakeCollectorServer` (0.42)? It drops
///   `resource_spans.resource` (so service.name can't be checked), renders
///   attribute values as protobuf `Debug` strings, and pushes into a bounded
///   (64) channel that back-pressures the exporter when the test isn't
///   reading.
/// - `http/protobuf`: axum, `POST /v1/traces` with `application/x-protobuf`,
///   decoded with prost.
pub struct Receiver {
    pub addr: SocketAddr,
    pub store: SpanStore,
    /// The `OTEL_EXPORTER_OTLP_PROTOCOL` value this receiver speaks.
    pub protocol: &'static str,
}

impl Receiver {
    pub fn start(protocol: &'static str) -> Self {
        let store = SpanStore::default();
        let s = store.clone();
        let addr = match protocol {
            "grpc" => spawn_server("grpc-receiver", move |listener| async move {
                tonic::transport::Server::builder()
                    .add_service(TraceServiceServer::new(Collector(s)))
                    .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                    .await
                    .unwrap();
            }),
            "http/protobuf" => spawn_server("http-receiver", move |listener| async move {
                axum::serve(listener, http_receiver(s)).await.unwrap();
            }),
            other => panic!("no receiver for protocol {other}"),
        };
        Self {
            addr,
            store,
            protocol,
        }
    }

    /// Base URL for `OTEL_EXPORTER_OTLP_ENDPOINT` (the exporter appends
    /// `/v1/traces` for http/protobuf).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn http_receiver(store: SpanStore) -> axum::Router {
    use axum::http::{HeaderMap, StatusCode, header};
    use prost::Message;

    axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let store = store.clone();
            async move {
                let ct = headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default();
                if ct != "application/x-protobuf" {
                    return Err((StatusCode::UNSUPPORTED_MEDIA_TYPE, ct.to_string()));
                }
                let req = ExportTraceServiceRequest::decode(body)
                    .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
                store.push_all(flatten(req));
                Ok((
                    [(header::CONTENT_TYPE, "application/x-protobuf")],
                    ExportTraceServiceResponse::default().encode_to_vec(),
                ))
            }
        }),
    )
}

/// What a tokio-console client has seen so far.
#[derive(Debug, Default)]
pub struct ConsoleView {
    /// Names of the named tasks (tokio records an empty name for unnamed
    /// tasks; those are skipped).
    pub tasks: Vec<String>,
    /// The source file where each resource (timer, semaphore, channel...)
    /// was created.
    pub resource_files: Vec<String>,
}

/// Connects to a tokio-console server and collects the tasks and resources
/// it reports, reading updates until `done(view so far)` is true or
/// `timeout` passes. Names arrive as the `task.name` field of each new task
/// (`Field { name: StrName("task.name"), value: DebugVal/StrVal }`). A task
/// spawned just before the watch starts may only appear in a *later* update
/// (the aggregator hasn't drained its event buffer yet), hence the loop.
/// The same task can also arrive twice: in the snapshot a new watcher gets,
/// and again in the next update if the aggregator had not published it yet
/// (seen on a loaded machine). Each task and resource counts once, by id.
pub async fn console_view(
    addr: SocketAddr,
    done: impl Fn(&ConsoleView) -> bool,
    timeout: Duration,
) -> ConsoleView {
    use console_api::field::{Name, Value};
    use console_api::instrument::InstrumentRequest;
    use console_api::instrument::instrument_client::InstrumentClient;

    let mut view = ConsoleView::default();
    let mut seen_tasks = std::collections::HashSet::new();
    let mut seen_resources = std::collections::HashSet::new();
    let attempt = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect()
            .await
            .ok()?;
        let mut client = InstrumentClient::new(channel);
        let mut stream = client
            .watch_updates(InstrumentRequest {})
            .await
            .ok()?
            .into_inner();
        while let Some(update) = stream.message().await.ok()? {
            if let Some(tasks) = update.task_update {
                view.tasks.extend(
                    tasks
                        .new_tasks
                        .iter()
                        .filter(|t| seen_tasks.insert(t.id.as_ref().map(|id| id.id)))
                        .flat_map(|t| t.fields.iter())
                        .filter(|f| matches!(&f.name, Some(Name::StrName(n)) if n == "task.name"))
                        .filter_map(|f| match &f.value {
                            Some(Value::StrVal(s)) | Some(Value::DebugVal(s)) => Some(s.clone()),
                            _ => None,
                        })
                        .filter(|n| !n.is_empty()),
                );
            }
            if let Some(resources) = update.resource_update {
                view.resource_files.extend(
                    resources
                        .new_resources
                        .iter()
                        .filter(|r| seen_resources.insert(r.id.as_ref().map(|id| id.id)))
                        .filter_map(|r| r.location.as_ref()?.file.clone()),
                );
            }
            if done(&view) {
                return Some(());
            }
        }
        None
    };
    let _ = tokio::time::timeout(timeout, attempt).await;
    view
}

/// The names of the tasks a tokio-console server reports: [`console_view`]
/// until `done(names so far)`.
pub async fn console_tasks(
    addr: SocketAddr,
    done: impl Fn(&[String]) -> bool,
    timeout: Duration,
) -> Vec<String> {
    console_view(addr, |view| done(&view.tasks), timeout)
        .await
        .tasks
}

/// What a [`ScriptedCollector`] does with each export it receives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Answers at once.
    Healthy,
    /// Reads the export and never answers, until the behaviour changes
    /// (then answers it: a network blackhole that ends delivers late).
    Blackhole,
    /// Answers each export after this long (or as soon as it is healthy
    /// again).
    Slow(Duration),
}

/// One export a [`ScriptedCollector`] received.
#[derive(Clone, Copy, Debug)]
pub struct ExportSeen {
    pub received: Instant,
    pub spans: usize,
}

enum Control {
    /// Close the listener and every connection, exports in flight included.
    Kill(std::sync::mpsc::Sender<()>),
    /// Listen again on the same port.
    Restart(std::sync::mpsc::Sender<()>),
}

/// An OTLP http/protobuf receiver that a test scripts: answer normally,
/// blackhole, answer slowly, or die (port closed, connections reset) and
/// come back on the same port. Like [`Receiver`], it runs on its own thread
/// and runtime.
pub struct ScriptedCollector {
    pub addr: SocketAddr,
    /// The `OTEL_EXPORTER_OTLP_PROTOCOL` value it speaks.
    pub protocol: &'static str,
    pub store: SpanStore,
    pub exports: Arc<Mutex<Vec<ExportSeen>>>,
    behaviour: Arc<tokio::sync::watch::Sender<Behaviour>>,
    control: tokio::sync::mpsc::UnboundedSender<Control>,
}

impl ScriptedCollector {
    pub fn start() -> Self {
        let store = SpanStore::default();
        let exports = Arc::new(Mutex::new(Vec::new()));
        let behaviour = Arc::new(tokio::sync::watch::Sender::new(Behaviour::Healthy));
        let (control, mut orders) = tokio::sync::mpsc::unbounded_channel();
        let router = scripted_receiver(store.clone(), exports.clone(), behaviour.clone());
        let addr = spawn_server("scripted-collector", move |first| async move {
            let addr = first.local_addr().unwrap();
            let mut listener = Some(first);
            loop {
                let mut connections = tokio::task::JoinSet::new();
                // Serve until told to die.
                let done = loop {
                    let Some(l) = listener.as_ref() else {
                        break None;
                    };
                    tokio::select! {
                        order = orders.recv() => break order,
                        accepted = l.accept() => {
                            let Ok((io, _)) = accepted else { continue };
                            let service = hyper_util::service::TowerToHyperService::new(router.clone());
                            connections.spawn(async move {
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(hyper_util::rt::TokioIo::new(io), service)
                                    .await;
                            });
                        }
                    }
                };
                match done {
                    Some(Control::Kill(ack)) => {
                        listener = None;
                        connections.shutdown().await;
                        let _ = ack.send(());
                    }
                    Some(Control::Restart(ack)) => {
                        let _ = ack.send(());
                    }
                    None => return,
                }
                // Dead: wait for a restart (or another kill).
                while listener.is_none() {
                    match orders.recv().await {
                        Some(Control::Restart(ack)) => {
                            let socket = tokio::net::TcpSocket::new_v4().unwrap();
                            socket.set_reuseaddr(true).unwrap();
                            socket.bind(addr).expect("rebind the collector's port");
                            listener = Some(socket.listen(1024).unwrap());
                            let _ = ack.send(());
                        }
                        Some(Control::Kill(ack)) => {
                            let _ = ack.send(());
                        }
                        None => return,
                    }
                }
            }
        });
        Self {
            addr,
            protocol: "http/protobuf",
            store,
            exports,
            behaviour,
            control,
        }
    }

    /// The same over gRPC, for the behaviours only: [`Self::kill`] and
    /// [`Self::restart`] are http/protobuf's.
    pub fn start_grpc() -> Self {
        let store = SpanStore::default();
        let exports = Arc::new(Mutex::new(Vec::new()));
        let behaviour = Arc::new(tokio::sync::watch::Sender::new(Behaviour::Healthy));
        let (control, _) = tokio::sync::mpsc::unbounded_channel();
        let service = ScriptedGrpc {
            store: store.clone(),
            exports: exports.clone(),
            behaviour: behaviour.clone(),
        };
        let addr = spawn_server("scripted-grpc-collector", move |listener| async move {
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(service))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .unwrap();
        });
        Self {
            addr,
            protocol: "grpc",
            store,
            exports,
            behaviour,
            control,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, behaviour: Behaviour) {
        self.behaviour.send_replace(behaviour);
    }

    /// Closes the port (connections are refused) and resets every
    /// connection, exports in flight included. Returns once done.
    pub fn kill(&self) {
        let (ack, done) = std::sync::mpsc::channel();
        self.control.send(Control::Kill(ack)).unwrap();
        done.recv().unwrap();
    }

    /// Listens on the same port again. Returns once it does.
    pub fn restart(&self) {
        let (ack, done) = std::sync::mpsc::channel();
        self.control.send(Control::Restart(ack)).unwrap();
        done.recv().unwrap();
    }

    /// Exports received so far.
    pub fn exports(&self) -> Vec<ExportSeen> {
        self.exports.lock().unwrap().clone()
    }

    /// How many distinct spans arrived (an export answered late may repeat
    /// one the exporter had given up on and sent again).
    pub fn distinct_spans(&self) -> usize {
        let spans = self.store.0.lock().unwrap();
        spans
            .iter()
            .map(|s| s.span_id.as_str())
            .collect::<std::collections::HashSet<_>>()
            .len()
    }
}

/// Waits as `behaviour` says before an export is answered.
async fn behave(behaviour: &tokio::sync::watch::Sender<Behaviour>) {
    let mut now = behaviour.subscribe();
    loop {
        let current = *now.borrow_and_update();
        match current {
            Behaviour::Healthy => return,
            Behaviour::Blackhole => {
                let _ = now.changed().await;
            }
            Behaviour::Slow(delay) => {
                let healthy = now.wait_for(|b| *b == Behaviour::Healthy);
                let _ = tokio::time::timeout(delay, healthy).await;
                return;
            }
        }
    }
}

struct ScriptedGrpc {
    store: SpanStore,
    exports: Arc<Mutex<Vec<ExportSeen>>>,
    behaviour: Arc<tokio::sync::watch::Sender<Behaviour>>,
}

#[tonic::async_trait]
impl TraceService for ScriptedGrpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let received = Instant::now();
        behave(&self.behaviour).await;
        let spans = flatten(request.into_inner());
        self.exports.lock().unwrap().push(ExportSeen {
            received,
            spans: spans.len(),
        });
        self.store.push_all(spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

fn scripted_receiver(
    store: SpanStore,
    exports: Arc<Mutex<Vec<ExportSeen>>>,
    behaviour: Arc<tokio::sync::watch::Sender<Behaviour>>,
) -> axum::Router {
    use axum::http::{StatusCode, header};
    use prost::Message;

    axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let (store, exports, behaviour) = (store.clone(), exports.clone(), behaviour.clone());
            async move {
                let received = Instant::now();
                let req = ExportTraceServiceRequest::decode(body)
                    .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
                behave(&behaviour).await;
                let spans = flatten(req);
                exports.lock().unwrap().push(ExportSeen {
                    received,
                    spans: spans.len(),
                });
                store.push_all(spans);
                Ok::<_, (StatusCode, String)>((
                    [(header::CONTENT_TYPE, "application/x-protobuf")],
                    ExportTraceServiceResponse::default().encode_to_vec(),
                ))
            }
        }),
    )
}

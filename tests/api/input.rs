//! Bad input, generated: every route's path and query string filled with
//! random bytes, percent-encoding (non-UTF-8 included), huge and negative
//! numbers, repeated and unknown keys. Whatever arrives, the answer is 200,
//! 400, 404, 405 or 503: never a 5xx, never a panic; and every 400 is the
//! JSON `{error, parameter, allowed}`.
//!
//! Most cases run in-process (`tower::ServiceExt::oneshot` on
//! `stall_lab::app::app`), with `limits.max_ms` small so a valid duration
//! costs at most a few milliseconds; `/downstream` calls a real socket
//! server of the same state. A shorter run sends raw bytes through the real
//! binary's socket, where hyper itself answers a request line that is not
//! HTTP (a bare 400, before any route sees it).
//! `PROPTEST_CASES` sets the number of cases (default 256 in-process).

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use proptest::prelude::*;
use tower::ServiceExt;

/// Every route, and a few that are not.
fn route() -> impl Strategy<Value = String> {
    let known: Vec<String> = stall_lab::scenarios::ALL
        .iter()
        .map(|s| s.route.to_owned())
        .chain(["/".to_owned()])
        .collect();
    prop_oneof![
        4 => proptest::sample::select(known.clone()),
        // A known route with junk appended or a segment of random bytes.
        1 => (proptest::sample::select(known), segment())
            .prop_map(|(route, junk)| format!("{route}/{junk}")),
        1 => proptest::collection::vec(segment(), 0..4)
            .prop_map(|segments| format!("/{}", segments.join("/"))),
    ]
}

/// A path segment or query value: random bytes, percent-encoded (so
/// invalid UTF-8 reaches the server), or URI-legal text as is.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..24).prop_map(|bytes| percent(&bytes)),
        "[a-zA-Z0-9._~!$'()*+,;=:@%-]{0,24}",
    ]
}

fn percent(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("%{b:02X}")).collect()
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => Just("ms".to_owned()),
        4 => Just("n".to_owned()),
        1 => Just("MS".to_owned()),
        1 => Just("ms[]".to_owned()),
        1 => Just(String::new()),
        2 => segment(),
    ]
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        // Small valid values: fast.
        4 => (0u64..=5).prop_map(|v| v.to_string()),
        2 => any::<u64>().prop_map(|v| v.to_string()),
        2 => any::<i64>().prop_map(|v| v.to_string()),
        1 => Just("99999999999999999999999999999999999999".to_owned()),
        1 => Just("-0".to_owned()),
        1 => Just("1e3".to_owned()),
        1 => Just("0x10".to_owned()),
        1 => Just("3.5".to_owned()),
        1 => Just("+3".to_owned()),
        1 => Just(" 3".to_owned()),
        1 => Just("%FF%FE".to_owned()),
        1 => Just("%00".to_owned()),
        1 => Just(String::new()),
        2 => segment(),
    ]
}

/// `k=v&k=v…`, keys repeated at will, sometimes a key alone or a stray `&`.
fn query() -> impl Strategy<Value = Option<String>> {
    let pair = prop_oneof![
        6 => (key(), value()).prop_map(|(k, v)| format!("{k}={v}")),
        1 => key(),
        1 => Just(String::new()),
        1 => Just("=".to_owned()),
    ];
    proptest::option::weighted(
        0.9,
        proptest::collection::vec(pair, 0..6).prop_map(|pairs| pairs.join("&")),
    )
}

/// A scenario with its own parameters, valid values (so the handlers run),
/// in any order, sometimes with one more `key=value` of any kind.
fn valid_request() -> impl Strategy<Value = String> {
    (
        proptest::sample::select(stall_lab::scenarios::ALL),
        0u64..=5,
        1u64..=4,
        any::<bool>(),
        proptest::option::weighted(0.3, (key(), value())),
    )
        .prop_map(|(scenario, ms, n, reversed, extra)| {
            let mut pairs: Vec<String> = scenario
                .params
                .iter()
                .map(|p| match *p {
                    "n" => format!("n={n}"),
                    other => format!("{other}={ms}"),
                })
                .collect();
            if reversed {
                pairs.reverse();
            }
            pairs.extend(extra.map(|(k, v)| format!("{k}={v}")));
            match pairs.is_empty() {
                true => scenario.route.to_owned(),
                false => format!("{}?{}", scenario.route, pairs.join("&")),
            }
        })
}

/// Any request target: junk on any route, or a valid call.
fn target() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => (route(), query()).prop_map(|(path, query)| match query {
            Some(q) => format!("{path}?{q}"),
            None => path,
        }),
        1 => valid_request(),
    ]
}

/// Checks one answer: an allowed status, never a 5xx other than the stall
/// budget's 503, and a 400's JSON shape.
fn check(target: &str, status: StatusCode, body: &[u8]) -> Result<(), TestCaseError> {
    prop_assert!(
        matches!(status.as_u16(), 200 | 400 | 404 | 405 | 503),
        "{target} answered {status}: {}",
        String::from_utf8_lossy(body)
    );
    // (A HEAD answer has no body to check.)
    if status == StatusCode::BAD_REQUEST && !target.starts_with("HEAD ") {
        let json: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
            TestCaseError::fail(format!(
                "{target}: 400 that is not JSON ({e}): {}",
                String::from_utf8_lossy(body)
            ))
        })?;
        for field in ["error", "parameter", "allowed"] {
            prop_assert!(
                json[field].is_string(),
                "{target}: 400 without `{field}`: {json}"
            );
        }
    }
    Ok(())
}

/// The in-process server: a router to `oneshot`, and the same state served
/// on a socket for `/downstream` to call.
fn in_process() -> (tokio::runtime::Runtime, axum::Router) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let env = [
        ("STALL_LAB__LIMITS__MAX_MS", "5"),
        ("STALL_LAB__LIMITS__MAX_FANOUT", "4"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let config = stall_lab::config::load(None, env, &stall_lab::config::Overrides::default())
        .expect("config")
        .config;
    let router = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = stall_lab::state::AppState::new(
            &config,
            url,
            None,
            None,
            stall_lab::scenarios::ALL.iter().map(|s| s.route),
        );
        tokio::spawn(stall_lab::server::run(
            listener,
            state.clone(),
            std::future::pending(),
            Duration::from_millis(100),
        ));
        stall_lab::app::app(state)
    });
    (runtime, router)
}

#[test]
fn any_path_and_query_answers_200_400_404_405_or_503() {
    let (runtime, router) = in_process();
    let config = ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256),
        // No regressions file: the cases that failed are in the test output.
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    let method =
        proptest::sample::select(&["GET", "GET", "GET", "GET", "HEAD", "POST", "DELETE"][..]);
    proptest!(config, |(method in method, target in target())| {
        // Not every string is a URI (a `%` not followed by two hex digits,
        // say); those never reach a router, the socket test covers them.
        let Ok(request) = Request::builder().method(method).uri(target.as_str()).body(Body::empty()) else {
            return Ok(());
        };
        let (status, body) = runtime.block_on(async {
            let response = tokio::time::timeout(
                Duration::from_secs(10),
                router.clone().oneshot(request),
            )
            .await
            .expect("answered within 10 s")
            .unwrap();
            let status = response.status();
            let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
            (status, body)
        });
        check(&format!("{method} {target}"), status, &body)?;
    });
}

/// Raw bytes through the real binary's socket: the request line may not be
/// HTTP at all. hyper answers those itself with a bare 400 (no body: no
/// route ran); everything the app answers follows the same rules as above.
#[test]
fn raw_request_lines_through_the_socket_get_an_allowed_answer() {
    let app = crate::helpers::spawn_app(&[], &[("STALL_LAB__LIMITS__MAX_MS", "5")]);
    let addr = app.listeners["app"]
        .trim_start_matches("http://")
        .to_owned();
    let target = prop_oneof![
        3 => target().prop_map(String::into_bytes),
        // Anything but CR, LF and space (which end the request target).
        1 => proptest::collection::vec(any::<u8>().prop_filter("not a separator", |b| !matches!(b, b'\r' | b'\n' | b' ')), 1..64)
            .prop_map(|mut bytes| { bytes.insert(0, b'/'); bytes }),
    ];
    let config = ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(target in target)| {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut request = b"GET ".to_vec();
        request.extend_from_slice(&target);
        request.extend_from_slice(b" HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        stream.write_all(&request).unwrap();
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        let shown = String::from_utf8_lossy(&target).into_owned();
        let text = String::from_utf8_lossy(&answer);
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status: u16 = head.split(' ').nth(1).and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no answer to GET {shown}: {text:?}"));
        let status = StatusCode::from_u16(status).unwrap();
        if status == StatusCode::BAD_REQUEST && body.is_empty() {
            // hyper's own: the request line was not HTTP.
            return Ok(());
        }
        check(&format!("GET {shown}"), status, body.as_bytes())?;
    });
    // The server survived all of it.
    assert!(!app.logs().contains("panicked"), "{}", app.logs());
}

//! Who may talk to the admin server: requests for a loopback or allowed
//! `Host`, and, for anything but GET/HEAD, from no other site's `Origin`.
//!
//! Without the `Host` check a DNS-rebinding page (`evil.example` resolving
//! to 127.0.0.1) could read the dashboard's data from the user's browser;
//! without the `Origin` check any page could make the browser POST to a
//! route that acts.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

pub(super) async fn check(
    State(hosts): State<Arc<[String]>>,
    request: Request,
    next: Next,
) -> Response {
    let headers = request.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().host());
    if !host.is_some_and(|h| allowed(strip_port(h), &hosts)) {
        return refuse("this admin server answers only loopback or configured Host names");
    }
    let acts = !matches!(*request.method(), Method::GET | Method::HEAD);
    if acts
        && let Some(origin) = headers.get(header::ORIGIN)
        && !origin
            .to_str()
            .ok()
            .and_then(origin_host)
            .is_some_and(|h| allowed(h, &hosts))
    {
        return refuse("cross-site requests may not act on this admin server");
    }
    next.run(request).await
}

/// `host[:port]` or `[v6]:port` → host (brackets kept for v6).
fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.split_inclusive(']').next().unwrap_or(host);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h)
}

/// `scheme://host[:port]` → host.
fn origin_host(origin: &str) -> Option<&str> {
    let rest = origin.split_once("://")?.1;
    Some(strip_port(rest.split('/').next()?))
}

fn allowed(host: &str, extra: &[String]) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "localhost"
        || host == "[::1]"
        || host
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
        || extra.contains(&host)
}

fn refuse(why: &'static str) -> Response {
    (
        StatusCode::FORBIDDEN,
        axum::Json(serde_json::json!({ "error": why })),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_configured_hosts_only() {
        let extra = vec!["stall-lab".to_owned()];
        for ok in [
            "localhost",
            "127.0.0.1",
            "127.3.2.1",
            "[::1]",
            "stall-lab",
            "LOCALHOST",
        ] {
            assert!(allowed(ok, &extra), "{ok}");
        }
        for no in [
            "evil.example",
            "10.0.0.1",
            "localhost.evil.example",
            "0.0.0.0",
        ] {
            assert!(!allowed(no, &extra), "{no}");
        }
        assert_eq!(strip_port("127.0.0.1:3001"), "127.0.0.1");
        assert_eq!(strip_port("[::1]:3001"), "[::1]");
        assert_eq!(origin_host("http://localhost:3001"), Some("localhost"));
        assert_eq!(origin_host("null"), None);
    }
}

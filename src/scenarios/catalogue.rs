//! `/` — the catalogue: every scenario, its lesson, its fixed twin and an
//! example URL. JSON by default; an HTML page when the client accepts
//! `text/html` (a browser).

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{Html, IntoResponse, Json, Response};
use serde_json::json;

use super::ALL;
use crate::state::AppState;

/// The lesson, in five lines; the README opens with the same words.
pub(super) const LESSON: [&str; 5] = [
    "axum routes and extracts; it schedules nothing. Concurrency comes from the runtime polling many request tasks; parallelism only from several worker threads.",
    "async is not parallel: a handler that never reaches an .await holds its worker thread for the whole call, and every task queued on that worker waits.",
    "On a current_thread runtime nothing runs in parallel; handlers interleave at .await points.",
    "IO-bound work (timers, network, files) scales because each .await yields.",
    "Parallelism inside a handler is explicit: spawned tasks, join!, spawn_blocking.",
];

pub(super) async fn handler(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let wants_html = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("text/html"));
    if wants_html {
        Html(html(&state)).into_response()
    } else {
        Json(document(&state)).into_response()
    }
}

fn document(state: &AppState) -> serde_json::Value {
    let scenarios: Vec<_> = ALL.iter().map(|s| s.describe(&state.self_url)).collect();
    json!({
        "name": "stall-lab",
        "lesson": LESSON,
        "runtime": { "flavor": state.flavor, "workers": state.workers },
        "limits": state.limits,
        "scenarios": scenarios,
    })
}

fn html(state: &AppState) -> String {
    let mut rows = String::new();
    for s in ALL {
        let example = format!("{}{}", state.self_url, s.example_path());
        let twin = s
            .twin
            .map(|t| format!("<a href=\"{t}\"><code>{t}</code></a>"))
            .unwrap_or_default();
        let badge = if s.stalls {
            "<span class=\"stalls\">stalls</span>"
        } else {
            ""
        };
        rows.push_str(&format!(
            "<tr><td><code>{route}</code> {badge}</td><td>{lesson}</td><td>{twin}</td><td><a href=\"{example}\">{example}</a></td></tr>\n",
            route = s.route,
            lesson = escape(s.lesson),
        ));
    }
    let lesson: String = LESSON
        .iter()
        .map(|l| format!("<li>{}</li>", escape(l)))
        .collect();
    format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>stall-lab</title>
<style>
body{{font:15px/1.5 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;background:#0f1115;color:#e6e6e6}}
a{{color:#7cc4ff}} code{{color:#ffd479}} table{{border-collapse:collapse;width:100%}}
td,th{{border-bottom:1px solid #2a2f3a;padding:.45em .6em;text-align:left;vertical-align:top}}
.stalls{{font-size:11px;border:1px solid #ff6b6b;color:#ff6b6b;border-radius:3px;padding:0 4px}}
</style></head><body>
<h1>stall-lab</h1><p>Runtime: <b>{flavor}</b> with <b>{workers}</b> worker(s). Every scenario answers JSON measuring what happened to it.</p>
<ul>{lesson}</ul>
<table><tr><th>route</th><th>lesson</th><th>fixed twin</th><th>try it</th></tr>
{rows}</table></body></html>"#,
        flavor = state.flavor,
        workers = state.workers,
    )
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

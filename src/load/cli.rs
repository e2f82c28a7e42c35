//! The `stall-lab load` command: its flags, their checks, and the run.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::client::Target;
use super::mix::Mix;
use super::{Mode, Spec, run};

/// Shown at the end of `stall-lab load --help`.
const LOAD_HELP: &str = "\
Examples:
  stall-lab load --url 'http://127.0.0.1:3000/coop/sleep?ms=50' --rate 1000 --duration 10s
  stall-lab load --url http://127.0.0.1:3000 --mix '/coop/sleep?ms=50:90,/block/sleep?ms=200:10'
  stall-lab load --url 'http://127.0.0.1:3000/block/sleep?ms=50' --concurrency 16 --json

Open loop (--rate, the default at 100 req/s): requests leave on a fixed schedule whatever the
server does, on as many connections as needed (up to --max-connections), and latency counts
from when each was due, so time a request spent waiting behind a stall is not hidden
(coordinated omission). Closed loop (--concurrency): C connections, each sending its next
request when the last one is answered; throughput is the figure to read.

The run always ends at --duration; requests still waiting then are counted as unfinished,
with their wait so far as their latency. Errors are counted by status (non-2xx answers) and
by kind (no answer: refused, reset, closed). Progress goes to stderr once a second, the
report to stdout (a table, or JSON with --json). Exit code 2 on bad flags.";

#[derive(Debug, Clone, Args)]
#[command(after_long_help = LOAD_HELP)]
pub(crate) struct LoadArgs {
    /// The server, http://HOST:PORT, with the path every request takes when
    /// there is no --mix (e.g. http://127.0.0.1:3000/coop/sleep?ms=50).
    #[arg(long, value_name = "URL")]
    pub url: String,
    /// Open loop: requests per second, on a fixed schedule [default: 100].
    #[arg(long, value_name = "R", conflicts_with = "concurrency")]
    pub rate: Option<f64>,
    /// Closed loop: this many connections, one request at a time each.
    #[arg(long, value_name = "C")]
    pub concurrency: Option<usize>,
    /// How long to run: 10s, 500ms, 2m, 1h, or plain seconds.
    #[arg(long, value_name = "D", default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Weighted routes, PATH:WEIGHT,…; replaces the path of --url.
    #[arg(long, value_name = "MIX")]
    pub mix: Option<String>,
    /// Print the report as JSON on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Open loop: most connections open at once; due requests past it wait
    /// for a free one (and that wait counts in their latency).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    pub max_connections: usize,
    /// Worker threads of the generator's own tokio runtime.
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub threads: usize,
}

/// Parses `10s`, `500ms`, `2m`, `1h` or plain seconds (`2.5`).
pub(super) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let number: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (try 10s, 500ms, 2m)"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(format!("{text:?}: unknown unit {unit:?} (ms, s, m or h)")),
    };
    if !(seconds.is_finite() && seconds > 0.0) {
        return Err(format!("{text:?}: a duration must be more than zero"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// A bad `--url`, `--mix` or number.
#[derive(Debug)]
pub(crate) struct BadInput(pub String);

impl std::fmt::Display for BadInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for BadInput {}

/// Splits `--url` into the server (scheme, host, port) and its path, and
/// checks it speaks what this client speaks.
pub(super) fn parse_url(url: &str) -> Result<(String, u16, String), BadInput> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| BadInput(format!("--url {url:?} is not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some(other) => {
            return Err(BadInput(format!(
                "--url {url:?}: scheme {other:?} is not supported; stall-lab load speaks plain http:// (HTTP/1.1)"
            )));
        }
        None => {
            return Err(BadInput(format!(
                "--url {url:?} needs a scheme and a host, e.g. http://127.0.0.1:3000"
            )));
        }
    }
    let host = uri
        .host()
        .ok_or_else(|| BadInput(format!("--url {url:?} has no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let path = uri
        .path_and_query()
        .map_or("/".to_owned(), |p| p.as_str().to_owned());
    Ok((host, port, path))
}

impl LoadArgs {
    /// Checks every flag and resolves the host: everything that can be wrong
    /// with the input is reported before the first request.
    pub(crate) async fn to_spec(&self) -> Result<Spec, BadInput> {
        let (host, port, path) = parse_url(&self.url)?;
        let mix = match &self.mix {
            Some(_) if path != "/" => {
                return Err(BadInput(format!(
                    "--url {:?} has a path ({path}) and --mix gives the routes too; keep only one (--url http://HOST:PORT with --mix)",
                    self.url
                )));
            }
            Some(text) => Mix::parse(text).map_err(|e| BadInput(e.to_string()))?,
            None => Mix::single(&path).map_err(|e| BadInput(e.to_string()))?,
        };
        let mode = match (self.rate, self.concurrency) {
            (Some(_), Some(_)) => {
                return Err(BadInput(
                    "--rate and --concurrency both given: choose an open loop (--rate) or a closed one (--concurrency)".into(),
                ));
            }
            (Some(rate), None) if !(rate.is_finite() && rate > 0.0) => {
                return Err(BadInput(format!(
                    "--rate {rate}: must be more than 0 requests per second"
                )));
            }
            (Some(rate), None) => Mode::Open { rate },
            (None, Some(0)) => {
                return Err(BadInput("--concurrency 0: at least one connection".into()));
            }
            (None, Some(concurrency)) => Mode::Closed { concurrency },
            (None, None) => Mode::Open { rate: DEFAULT_RATE },
        };
        if self.max_connections == 0 || self.threads == 0 {
            return Err(BadInput(
                "--max-connections and --threads must be at least 1".into(),
            ));
        }
        let addrs: Vec<std::net::SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
            .await
            .map_err(|e| BadInput(format!("--url {:?}: cannot resolve {host}: {e}", self.url)))?
            .collect();
        // `localhost` may resolve to ::1 first while the server listens on
        // 127.0.0.1 only: take the first address that accepts a connection,
        // else the first one (its refusals are then counted, not hidden).
        let mut reachable = None;
        for addr in &addrs {
            let attempt = tokio::net::TcpStream::connect(addr);
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(1), attempt).await {
                reachable = Some(*addr);
                break;
            }
        }
        let addr = reachable
            .or(addrs.first().copied())
            .ok_or_else(|| BadInput(format!("--url {:?}: {host} has no address", self.url)))?;
        let authority = if port == 80 {
            host.clone()
        } else if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Spec {
            url: self.url.clone(),
            target: Target { addr, authority },
            mix,
            mode,
            duration: self.duration,
            max_connections: self.max_connections,
        })
    }
}

/// The open loop's rate when neither --rate nor --concurrency is given.
pub(super) const DEFAULT_RATE: f64 = 100.0;

/// `stall-lab load`: builds the generator's runtime, runs, prints.
pub(crate) fn main(args: LoadArgs) -> ExitCode {
    // The generator's own runtime: it must keep its schedule while the
    // server it loads (maybe in this same process, in the experiment) is
    // stalled, so it never shares threads with it.
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .thread_name("load")
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("stall-lab load: cannot build a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let spec = match runtime.block_on(args.to_spec()) {
        Ok(spec) => spec,
        Err(e) => {
            eprintln!("stall-lab load: {e}");
            return ExitCode::from(crate::error::EXIT_BAD_CONFIG);
        }
    };
    let report = runtime.block_on(run(&spec, true));
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).expect("a report serializes")
        );
    } else {
        print!("{}", report.table());
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("10 parsecs").is_err());
    }

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("http://127.0.0.1:3000/coop/sleep?ms=50").unwrap(),
            ("127.0.0.1".into(), 3000, "/coop/sleep?ms=50".into())
        );
        assert_eq!(
            parse_url("http://stall-lab:3000").unwrap(),
            ("stall-lab".into(), 3000, "/".into())
        );
        assert!(parse_url("https://x").unwrap_err().0.contains("plain http"));
        assert!(parse_url("127.0.0.1:3000").is_err());
        assert!(parse_url("http://exa mple").is_err());
    }

    #[tokio::test]
    async fn bad_input_is_refused_before_the_first_request() {
        let args = |url: &str, rate: Option<f64>, concurrency: Option<usize>, mix: Option<&str>| {
            LoadArgs {
                url: url.into(),
                rate,
                concurrency,
                duration: Duration::from_secs(1),
                mix: mix.map(Into::into),
                json: false,
                max_connections: 8,
                threads: 1,
            }
        };
        let err = |a: LoadArgs| async move { a.to_spec().await.unwrap_err().0 };
        let both = err(args("http://127.0.0.1:1", Some(5.0), Some(2), None)).await;
        assert!(
            both.contains("--rate and --concurrency both given"),
            "{both}"
        );
        let weights = err(args("http://127.0.0.1:1", None, None, Some("/a:0"))).await;
        assert!(weights.contains("weight of 0"), "{weights}");
        let twice = err(args("http://127.0.0.1:1/a", None, None, Some("/b:1"))).await;
        assert!(twice.contains("keep only one"), "{twice}");
        let url = err(args("ftp://127.0.0.1:1", None, None, None)).await;
        assert!(url.contains("not supported"), "{url}");
        let rate = err(args("http://127.0.0.1:1", Some(0.0), None, None)).await;
        assert!(rate.contains("more than 0"), "{rate}");
    }
}

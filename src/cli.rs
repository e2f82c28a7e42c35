//! The command line: `stall-lab [serve] [flags]`, `stall-lab load`,
//! `stall-lab experiment`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, Flavor, Overrides};

use crate::error::EXIT_BAD_CONFIG;

#[derive(Debug, Parser)]
#[command(
    name = "stall-lab",
    version,
    about = "A diagnostic axum server that shows what is (and is not) parallel about async Rust",
    long_about = "A diagnostic axum server that shows what is (and is not) parallel about async Rust.\n\n\
        Endpoints stall the tokio executor on purpose (/block/*) or do the same work cooperatively \
        (/coop/*, /offload/*); every answer measures what happened to the request. \
        Run `stall-lab serve --help` for the server's flags, then open http://127.0.0.1:3000/.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Flags of `serve`, which is the default command.
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the scenario server (the default command).
    Serve(ServeArgs),
    /// Drive traffic at a server: a fixed rate (open loop, latency counted
    /// from when each request was due) or a fixed number of connections.
    Load(crate::load::LoadArgs),
    /// Measure stall-lab's claims on this machine, on in-process servers,
    /// and write report.md, report.json and SVG charts.
    Experiment(crate::experiment::ExperimentArgs),
}

/// Shown at the end of `stall-lab serve --help`.
const SERVE_ENVIRONMENT: &str = "\
Configuration layers, each overriding the one before: the built-in config/default.toml,
--config FILE, environment variables STALL_LAB__SECTION__KEY (e.g.
STALL_LAB__RUNTIME__FLAVOR=current_thread), then these flags.

Also honoured, as their own ecosystems define them:
  OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT, OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL,
  OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG), OTEL_BSP_*,
  TOKIO_CONSOLE_BIND, TOKIO_CONSOLE_RETENTION, TOKIO_CONSOLE_PUBLISH_INTERVAL, RUST_LOG

Listeners (all loopback by default): app 127.0.0.1:3000, admin 127.0.0.1:3001,
console 127.0.0.1:6669. On start, one `listening: NAME http://ADDR` line each on stdout.
Exit codes: 0 after a clean shutdown, 1 on a runtime error, 2 on bad flags or configuration.";

#[derive(Debug, Clone, Args)]
#[command(after_long_help = SERVE_ENVIRONMENT)]
pub struct ServeArgs {
    /// A TOML file overriding the built-in configuration (any subset of the
    /// keys in config/default.toml).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Application address (server.listen); port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Admin server address: dashboard and /debug/* (admin.listen).
    #[arg(long, value_name = "ADDR")]
    pub admin_listen: Option<SocketAddr>,
    /// Runtime flavor (runtime.flavor).
    #[arg(long, value_enum)]
    pub flavor: Option<Flavor>,
    /// Worker threads of the multi_thread runtime; 0 = one per core
    /// (runtime.worker_threads).
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Do not export traces over OTLP (telemetry.otlp = false). No spans are
    /// made at all then, so answers carry no trace id.
    #[arg(long)]
    pub no_otlp: bool,
    /// Do not serve tokio-console (telemetry.console = false).
    #[arg(long)]
    pub no_console: bool,
    /// Print the effective configuration, with where each value came from,
    /// and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// Parses the command line and runs the chosen command.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Serve(args)) => args,
        Some(Command::Load(args)) => return crate::load::main(args),
        Some(Command::Experiment(args)) => return crate::experiment::main(args),
        None => cli.serve,
    };
    serve(args)
}

fn serve(args: ServeArgs) -> ExitCode {
    let overrides = Overrides {
        listen: args.listen,
        flavor: args.flavor,
        workers: args.workers,
        admin_listen: args.admin_listen,
        no_otlp: args.no_otlp,
        no_console: args.no_console,
    };
    let loaded = match config::load(args.config.as_deref(), std::env::vars(), &overrides) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("stall-lab: configuration error: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    if args.print_config {
        print!("{}", loaded.to_annotated_toml());
        return ExitCode::SUCCESS;
    }
    match crate::server::serve(loaded) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stall-lab: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
